//! The way back: what a downstream sends while it serves a request (progress, log messages,
//! and its own requests for sampling, elicitation and roots) goes to the client whose request
//! caused it; resource updates go to the clients that subscribed to that resource.
//!
//! The router registers each request it sends on a client's behalf, before it goes out; the
//! downstream's client handler (`downstream::client`) looks up where to send what arrives.

#![allow(
    deprecated,
    reason = "roots are deprecated in 2026-07-28; older peers still use them"
)]

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::maps::DashMap;
use rmcp::model::{ClientCapabilities, ListRootsResult, ProgressNotificationParam, ProgressToken};
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
}

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
    /// The roots conductor last fetched from a client that declared them: a server's
    /// `roots/list` outside any call is answered with these, since the client it would go to
    /// may have left by the time a server asks.
    known_roots: Mutex<Option<ListRootsResult>>,
    /// Counts `subscriptions/listen` streams, for their subscriber ids.
    listeners: AtomicU64,
}

/// A request in flight on a connection.
#[derive(Debug)]
struct Active {
    registration: u64,
    /// The progress token rmcp gave it as it went out; `None` until then.
    token: Option<ProgressToken>,
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
    /// The request went out with this progress token: progress carrying it is the caller's.
    pub fn sent(&self, token: ProgressToken) {
        if let Some(mut active) = self.relay.active.get_mut(&self.connection)
            && let Some(entry) = active
                .iter_mut()
                .find(|entry| entry.registration == self.registration)
        {
            entry.token = Some(token);
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

    /// The client a connection's own requests and log messages go to: that of its latest
    /// request in flight, or else of its last request.
    pub fn client_of(&self, connection: ConnectionId) -> Option<Peer<RoleServer>> {
        self.asker_of(connection).map(|origin| origin.peer)
    }

    /// Like [`Relay::client_of`], with what is known of the request it was made for.
    pub fn asker_of(&self, connection: ConnectionId) -> Option<Origin> {
        if let Some(origin) = self.caller_of(connection) {
            return Some(origin);
        }
        let peer = self.last.get(&connection)?.clone();
        if peer.is_transport_closed() {
            return None;
        }
        Some(Origin {
            capabilities: declared_capabilities(&peer),
            peer,
            progress_token: None,
            asks: None,
            progress_to: None,
        })
    }

    /// Who the latest request in flight on a connection was made for.
    pub fn caller_of(&self, connection: ConnectionId) -> Option<Origin> {
        self.active
            .get(&connection)
            .and_then(|active| active.last().map(|entry| entry.origin.clone()))
    }

    /// Remember the roots a client just gave: servers asking outside any call get these.
    pub fn remember_roots(&self, roots: ListRootsResult) {
        if let Ok(mut known) = self.known_roots.lock() {
            *known = Some(roots);
        }
    }

    /// The roots last fetched from a client, if any client has given them.
    pub fn known_roots(&self) -> Option<ListRootsResult> {
        self.known_roots.lock().ok()?.clone()
    }

    /// Forget a connection that ended.
    pub fn forget(&self, connection: ConnectionId) {
        self.active.remove(&connection);
        self.last.remove(&connection);
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
