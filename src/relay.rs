//! The way back: what a downstream sends while it serves a request (progress, log messages,
//! and its own requests for sampling, elicitation and roots) goes to the client whose request
//! caused it; resource updates go to the clients that subscribed to that resource.
//!
//! The router registers each request it sends on a client's behalf, before it goes out; the
//! downstream's client handler (`downstream::client`) looks up where to send what arrives.

#![allow(
    deprecated,
    reason = "roots and logging are deprecated in 2026-07-28; older peers still use them"
)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::maps::DashMap;
use rmcp::model::{ClientCapabilities, LoggingLevel, ProgressNotificationParam, ProgressToken};
use rmcp::service::{Peer, RoleServer, SubscriptionSink};

use crate::bridge::Asks;
use crate::config::ServerName;
use crate::downstream::ConnectionId;

/// The client a request was made for, and its progress token if it asked for progress.
#[derive(Debug, Clone)]
pub struct Origin {
    pub peer: Peer<RoleServer>,
    pub progress_token: Option<ProgressToken>,
    /// What the client can answer; `None` when it did not say.
    pub capabilities: Option<std::sync::Arc<ClientCapabilities>>,
    /// For a 2026-07-28 client's call: where the downstream's requests go instead.
    pub asks: Option<Asks>,
    /// Where the call's progress goes instead of to the client's session (the HTTP front's
    /// stream of the call).
    pub progress_to: Option<ProgressTo>,
    /// The client session the request was made in (`None` outside any, as the CLI's): what
    /// tells two clients apart on a shared connection.
    pub session: Option<u64>,
    /// Which of the downstream's log messages during the request the client gets.
    pub logs: Logs,
}

/// Which log messages a client gets during its request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Logs {
    All,
    /// A 2026-07-28 client's: those at or above the level its request named.
    AtLeast(LoggingLevel),
    /// A 2026-07-28 client that named no level.
    None,
}

impl Logs {
    pub fn wants(self, level: LoggingLevel) -> bool {
        match self {
            Logs::All => true,
            // Declared from least to most severe.
            Logs::AtLeast(lowest) => level as u8 >= lowest as u8,
            Logs::None => false,
        }
    }
}

/// Why a downstream's request cannot be passed to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoAsker {
    /// No request of any client is in flight on a shared connection: whoever used it last
    /// may not be who it is asking for.
    NoCall,
    /// Calls of several clients are in flight on a shared connection, and the request does
    /// not say which one it belongs to.
    Ambiguous,
}

/// What a downstream's request says of the request it belongs to: over Streamable HTTP, the
/// id of conductor's request on whose response stream it came; elsewhere nothing.
pub type InboundOf<'a> = Option<&'a rmcp::model::RequestId>;

/// Where a call's progress goes, under the client's token.
pub type ProgressTo = tokio::sync::mpsc::UnboundedSender<ProgressNotificationParam>;

/// Where a resource's updates go: a session's client (`resources/subscribe`, up to
/// 2025-11-25), or one `subscriptions/listen` stream (2026-07-28).
#[derive(Debug, Clone)]
pub enum UpdateTarget {
    Session(Peer<RoleServer>),
    Listen(SubscriptionSink),
}

/// A client subscribed to one resource.
#[derive(Debug, Clone)]
struct Subscriber {
    /// The session, or the listen stream, that subscribed.
    subscriber: u64,
    target: UpdateTarget,
    /// The URI as the client knows it (namespaced when several servers offer the same one).
    public_uri: String,
}

/// Where what downstreams send back goes.
#[derive(Debug, Default)]
pub struct Relay {
    /// Per connection, its requests in flight, oldest first: a downstream's own requests and
    /// log messages name no request, so they go to the latest one's client.
    active: DashMap<ConnectionId, Vec<Active>>,
    /// Numbers the registrations, so each can be found again to be given its token or dropped.
    registrations: AtomicU64,
    /// Per connection, the client of its last request, for what arrives between requests.
    last: DashMap<ConnectionId, Peer<RoleServer>>,
    /// Subscriptions, by server and the URI the server knows.
    subscriptions: DashMap<(ServerName, String), Vec<Subscriber>>,
    /// Guards subscribe/unsubscribe so a resource's first and last subscribers are counted right.
    subscribing: Mutex<()>,
    /// Counts `subscriptions/listen` streams, for their subscriber ids.
    listeners: AtomicU64,
    /// How many list-changed notifications downstreams have sent (see
    /// [`crate::catalog::Announcements::handled`]).
    list_changes: AtomicU64,
}

/// A request in flight on a connection.
#[derive(Debug)]
struct Active {
    registration: u64,
    /// The progress token rmcp gave it as it went out; `None` until then.
    token: Option<ProgressToken>,
    /// Its JSON-RPC id on the connection, once it went out (rmcp's requests only).
    request_id: Option<rmcp::model::RequestId>,
    origin: Origin,
}

/// Keeps a request registered until dropped.
#[derive(Debug)]
pub struct InCall<'a> {
    relay: &'a Relay,
    connection: ConnectionId,
    registration: u64,
}

impl InCall<'_> {
    /// The request went out with this id and progress token: progress carrying the token is
    /// the caller's, and so is a request the server sends on the id's response stream.
    pub fn sent(&self, id: rmcp::model::RequestId, token: ProgressToken) {
        if let Some(mut active) = self.relay.active.get_mut(&self.connection)
            && let Some(entry) = active
                .iter_mut()
                .find(|entry| entry.registration == self.registration)
        {
            entry.token = Some(token);
            entry.request_id = Some(id);
        }
    }
}

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        if let Some(mut active) = self.relay.active.get_mut(&self.connection) {
            active.retain(|entry| entry.registration != self.registration);
        }
    }
}

impl Relay {
    /// Register a request about to be sent on `connection` for `origin`. Registered before it
    /// goes out: a downstream may ask its client something before the sender runs again.
    pub fn register(&self, connection: ConnectionId, origin: Origin) -> InCall<'_> {
        let registration = self.registrations.fetch_add(1, Ordering::Relaxed);
        self.last.insert(connection, origin.peer.clone());
        self.active.entry(connection).or_default().push(Active {
            registration,
            token: None,
            request_id: None,
            origin,
        });
        InCall {
            relay: self,
            connection,
            registration,
        }
    }

    /// Who the request with this progress token was made for.
    pub fn origin(&self, connection: ConnectionId, token: &ProgressToken) -> Option<Origin> {
        let active = self.active.get(&connection)?;
        active
            .iter()
            .find(|entry| entry.token.as_ref() == Some(token))
            .map(|entry| entry.origin.clone())
    }

    /// The client's request a downstream's notification (a log message) belongs to, as
    /// [`Relay::asker_of`] says, or none.
    pub fn origin_of(&self, connection: ConnectionId, own_child: bool) -> Option<Origin> {
        self.asker_of(connection, None, own_child).ok()
    }

    /// Who a downstream's request (sampling, elicitation, roots) is for, never a guess: the
    /// request it came on the response stream of (`inbound`, Streamable HTTP); else the one
    /// client with calls in flight on the connection. A session's own child (`own_child`)
    /// has one client, whose last request answers even between calls. On a shared connection
    /// with calls of several clients in flight, or none, there is no telling who it is for.
    pub fn asker_of(
        &self,
        connection: ConnectionId,
        inbound: InboundOf<'_>,
        own_child: bool,
    ) -> Result<Origin, NoAsker> {
        if let Some(active) = self.active.get(&connection) {
            if let Some(id) = inbound
                && let Some(entry) = active
                    .iter()
                    .find(|entry| entry.request_id.as_ref() == Some(id))
            {
                return Ok(entry.origin.clone());
            }
            if let Some(latest) = active.last() {
                let one_client = own_child
                    || active
                        .iter()
                        .all(|entry| entry.origin.session == latest.origin.session);
                return if one_client {
                    Ok(latest.origin.clone())
                } else {
                    Err(NoAsker::Ambiguous)
                };
            }
        }
        if !own_child {
            return Err(NoAsker::NoCall);
        }
        let peer = self.last.get(&connection).ok_or(NoAsker::NoCall)?.clone();
        if peer.is_transport_closed() {
            return Err(NoAsker::NoCall);
        }
        Ok(Origin {
            capabilities: declared_capabilities(&peer),
            peer,
            progress_token: None,
            asks: None,
            progress_to: None,
            session: None,
            logs: Logs::All,
        })
    }

    /// Whether any request is in flight on a connection.
    pub fn in_call(&self, connection: ConnectionId) -> bool {
        self.active
            .get(&connection)
            .is_some_and(|active| !active.is_empty())
    }

    /// Forget a connection that ended.
    pub fn forget(&self, connection: ConnectionId) {
        self.active.remove(&connection);
        self.last.remove(&connection);
    }

    /// A downstream said one of its lists changed; counted before the registry hears of it.
    pub fn heard_list_change(&self) {
        self.list_changes.fetch_add(1, Ordering::Relaxed);
    }

    /// How many list changes downstreams have announced so far.
    pub fn list_changes_heard(&self) -> u64 {
        self.list_changes.load(Ordering::Relaxed)
    }

    /// An id for a `subscriptions/listen` stream, apart from every session id.
    pub fn listener_id(&self) -> u64 {
        (1 << 63) | self.listeners.fetch_add(1, Ordering::Relaxed)
    }

    /// Record a subscription of a session or listen stream; say whether it is the resource's
    /// first, which the server must be told of.
    pub fn subscribe(
        &self,
        server: &ServerName,
        uri: &str,
        public_uri: &str,
        subscriber: u64,
        target: UpdateTarget,
    ) -> bool {
        let _guard = self.subscribing.lock();
        let mut subscribers = self
            .subscriptions
            .entry((server.clone(), uri.to_owned()))
            .or_default();
        let first = subscribers.is_empty();
        if !subscribers.iter().any(|s| s.subscriber == subscriber) {
            subscribers.push(Subscriber {
                subscriber,
                target,
                public_uri: public_uri.to_owned(),
            });
        }
        first
    }

    /// Drop a subscription; say whether it was the resource's last, so the server can be
    /// told to stop.
    pub fn unsubscribe(&self, server: &ServerName, uri: &str, subscriber: u64) -> bool {
        let _guard = self.subscribing.lock();
        let key = (server.clone(), uri.to_owned());
        let Some(mut subscribers) = self.subscriptions.get_mut(&key) else {
            return false;
        };
        let before = subscribers.len();
        subscribers.retain(|s| s.subscriber != subscriber);
        let last = before > 0 && subscribers.is_empty();
        drop(subscribers);
        if last {
            self.subscriptions.remove(&key);
        }
        last
    }

    /// Drop every subscription of a session that ended; give back the resources it was the
    /// last subscriber of, whose servers should be told to stop.
    pub fn end_session(&self, session: u64) -> Vec<(ServerName, String)> {
        let _guard = self.subscribing.lock();
        let mut abandoned = Vec::new();
        self.subscriptions.retain(|(server, uri), subscribers| {
            let before = subscribers.len();
            subscribers.retain(|s| s.subscriber != session);
            if subscribers.is_empty() && before > 0 {
                abandoned.push((server.clone(), uri.clone()));
            }
            !subscribers.is_empty()
        });
        abandoned
    }

    /// The server's resources that have a subscriber, in a stable order.
    pub fn subscribed_uris(&self, server: &ServerName) -> Vec<String> {
        let mut uris: Vec<String> = self
            .subscriptions
            .iter()
            .filter(|entry| &entry.key().0 == server)
            .map(|entry| entry.key().1.clone())
            .collect();
        uris.sort();
        uris
    }

    /// Where a server's resource's updates go, with the URI each subscriber knows it by.
    pub fn subscribers(&self, server: &ServerName, uri: &str) -> Vec<(UpdateTarget, String)> {
        self.subscriptions
            .get(&(server.clone(), uri.to_owned()))
            .map(|subscribers| {
                subscribers
                    .iter()
                    .map(|s| (s.target.clone(), s.public_uri.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Pass a downstream's progress on under the client's own token: to the call's stream when
/// it has one, else to the client's session. Returns once it has gone out, so what the
/// caller sends after it comes after it.
pub async fn pass_progress(
    peer: &Peer<RoleServer>,
    token: ProgressToken,
    progress_to: Option<&ProgressTo>,
    mut params: ProgressNotificationParam,
    server: &ServerName,
) {
    params.progress_token = token;
    if let Some(progress_to) = progress_to {
        let _ = progress_to.send(params);
        return;
    }
    if let Err(error) = peer.notify_progress(params).await {
        tracing::debug!(server = %server, error = %error, "could not pass progress on");
    }
}

/// What a client declared it can answer, to be shared by every request made for it.
pub fn declared_capabilities(
    peer: &Peer<RoleServer>,
) -> Option<std::sync::Arc<ClientCapabilities>> {
    peer.peer_info()
        .map(|info| std::sync::Arc::new(info.capabilities.clone()))
}

/// Whether a client declared roots for its session (with `initialize`): such a client can be
/// asked for them outside any call. A 2026-07-28 client declares per request, and takes no
/// request outside its own calls.
pub fn declares_roots(peer: &Peer<RoleServer>) -> bool {
    peer.peer_info()
        .is_some_and(|info| info.capabilities.roots.is_some())
}
