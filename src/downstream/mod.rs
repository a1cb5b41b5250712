//! Live connections to downstream MCP servers: start or reach one, list what it offers, and
//! report what it tells us (list changes, its end) as events.
//!
//! This is the only module that builds transports. A [`Connection`] owns its rmcp client
//! service in a background task; dropping or closing it stops the child process.

mod client;
mod lane;
mod sse;
mod stdio;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rmcp::model::{
    CacheScope, ClientCapabilities, ErrorCode, ProtocolVersion, ServerNotification, ServerPeerInfo,
    SubscriptionFilter,
};
use rmcp::service::MergedList;
use rmcp::service::{ClientLifecycleMode, ClientServiceExt};
use rmcp::service::{Peer, RoleClient, RoleServer, RunningServiceCancellationToken, ServiceError};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::catalog::Listing;
use crate::config::{Handshake, HttpSpec, ServerName, ServerSpec, Transport};
use crate::relay::Relay;
pub use client::DownstreamClient;
pub use lane::{Heard, Reply, SentCall, TextLane};
pub use stdio::{LAUNCHER_ARG, SAFE_ENV, run_launcher, use_launcher};

/// Which of a server's lists changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Tools,
    Prompts,
    Resources,
}

/// What a server said of how long one of its lists stays fresh, and for whom (SEP-2549).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheHint {
    /// `None` when the server gave no `ttlMs`.
    pub fresh_until: Option<Instant>,
    /// `None` when the server gave no `cacheScope`.
    pub scope: Option<CacheScope>,
}

/// The least a server's list is relisted after, however short a `ttlMs` it gives.
const MIN_RELIST: Duration = Duration::from_secs(1);

/// What a downstream connection reports to whoever supervises it.
#[derive(Debug)]
pub enum Event {
    ListChanged {
        server: ServerName,
        kind: ListKind,
    },
    /// The connection ended (the child exited, or the remote closed), with why.
    Closed {
        server: ServerName,
        connection: ConnectionId,
        reason: String,
    },
}

/// Tells one connection from another, so news of an old one is not taken for its successor's.
pub type ConnectionId = u64;

fn next_connection_id() -> ConnectionId {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Why a downstream could not be started or reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot start `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("header `{name}` is not a valid HTTP header")]
    Header { name: String },
    #[error("handshake failed: {0}")]
    Handshake(String),
    /// The remote server refused conductor's credentials (HTTP 401 or 403): trying again
    /// with the same ones cannot help.
    #[error(
        "the server refused conductor's credentials ({0}); give them in the server's `headers`, such as `Authorization = \"Bearer ${{TOKEN}}\"`"
    )]
    Unauthorized(&'static str),
    #[error("listing {what} failed: {error}")]
    List { what: &'static str, error: String },
    #[error("not ready within the startup timeout of {}", crate::config::format_duration(*.0))]
    Timeout(Duration),
}

/// Why a handshake failed, in words about the server (rmcp's own text names its transport's
/// Rust type); a refusal of conductor's credentials is told apart.
fn handshake_error(error: rmcp::service::ClientInitializeError) -> ConnectError {
    use rmcp::service::ClientInitializeError;
    let (error, context) = match error {
        ClientInitializeError::TransportError { error, context } => (error, context),
        ClientInitializeError::ConnectionClosed(waiting) => {
            return ConnectError::Handshake(format!(
                "the server closed the connection while conductor waited for the {waiting}"
            ));
        }
        other => return ConnectError::Handshake(other.to_string()),
    };
    let text = error.error.to_string();
    match text.as_str() {
        "Auth required" => ConnectError::Unauthorized("HTTP 401"),
        "Insufficient scope" => ConnectError::Unauthorized("HTTP 403"),
        _ => {
            let when = context.strip_prefix("send ").unwrap_or(&context);
            ConnectError::Handshake(format!("{text}, sending the {when}"))
        }
    }
}

/// One live downstream connection.
pub struct Connection {
    pub id: ConnectionId,
    pub server: ServerName,
    pub peer: Peer<RoleClient>,
    /// What the server said about itself when it connected.
    pub info: ServerPeerInfo,
    /// The child process, for stdio servers.
    pub pid: Option<u32>,
    /// Tool calls as text, for stdio servers (see [`TextLane`]).
    lane: Option<Arc<TextLane>>,
    /// When it was established.
    pub opened: Instant,
    /// Requests sent on it and not yet answered, to pick the least busy replica.
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` of the last request's end, to stop idle servers.
    last_used_ms: AtomicU64,
    /// Fired when the connection has ended, however it ended.
    ended: tokio_util::sync::CancellationToken,
    /// Per list kind (tools, prompts, resources), the server's cache hint for it, and how
    /// many times it was listed (only the latest listing's relist timer fires).
    hints: Arc<std::sync::Mutex<[(CacheHint, u64); 3]>>,
    /// Where a list whose `ttlMs` ran out is reported, to be listed again.
    events: mpsc::UnboundedSender<Event>,
    /// Forgets this connection's clients when it goes.
    relay: Arc<Relay>,
    cancel: std::sync::Mutex<Option<RunningServiceCancellationToken>>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// A 2026-07-28 server's resource subscriptions, as one `subscriptions/listen` stream.
    /// An async lock, held while a new stream is acknowledged: changes apply in order.
    resource_stream: tokio::sync::Mutex<Option<ResourceStream>>,
    /// Turns true once the server has been given roots (see [`Connection::roots_given`]).
    roots_given: tokio::sync::watch::Receiver<bool>,
}

/// An open `subscriptions/listen` stream for resource updates, and the task passing them on.
/// Dropping it ends the task, which drops rmcp's subscription, which cancels the request.
#[derive(Debug)]
struct ResourceStream {
    uris: Vec<String>,
    forwarding: JoinHandle<()>,
}

impl Drop for ResourceStream {
    fn drop(&mut self) {
        self.forwarding.abort();
    }
}

/// Counts one request on a connection while it lives.
#[derive(Debug)]
pub struct Busy<'a>(&'a Connection);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        let now = self.0.opened.elapsed().as_millis() as u64;
        self.0.last_used_ms.fetch_max(now, Ordering::Relaxed);
    }
}

impl Connection {
    /// Wait until the server has been given roots, or `grace` has passed: a server that
    /// asks for roots does so as it starts, and its first call must not race the answer.
    pub async fn roots_given(&self, grace: Duration) {
        let mut given = self.roots_given.clone();
        let _ = tokio::time::timeout(grace, given.wait_for(|given| *given)).await;
    }

    /// Start or reach the server and complete the MCP handshake, within its startup timeout.
    /// `client` is the one client a session's own child serves: the child is offered only
    /// what that client can do. Shared connections (`None`) are offered everything.
    pub async fn open(
        spec: &ServerSpec,
        events: mpsc::UnboundedSender<Event>,
        relay: Arc<Relay>,
        client: Option<(Peer<RoleServer>, ClientCapabilities)>,
    ) -> Result<Connection, ConnectError> {
        let opening = async {
            match &spec.transport {
                Transport::Stdio(stdio) => {
                    let child = stdio::spawn(&spec.name, stdio, spec.max_message_bytes)?;
                    let opened = Opened {
                        pid: child.pid,
                        lane: Some(child.lane),
                    };
                    let stderr = child.stderr;
                    match serve(spec, child.transport, opened, events, relay, client).await {
                        // What the child said as it failed is usually why.
                        Err(ConnectError::Handshake(error)) => {
                            let words = stderr.last_words(Duration::from_millis(500)).await;
                            Err(ConnectError::Handshake(if words.is_empty() {
                                error
                            } else {
                                format!("{error}; its stderr ended with: {}", words.join(" | "))
                            }))
                        }
                        outcome => outcome,
                    }
                }
                Transport::Sse(http) | Transport::StreamableHttp(http) => {
                    // Each endpoint in turn: the first that answers serves (failover).
                    let mut failures = Vec::new();
                    for url in &http.urls {
                        match Self::open_remote(spec, url, http, events.clone(), relay.clone())
                            .await
                        {
                            Ok(connection) => return Ok(connection),
                            Err(error) if http.urls.len() == 1 => return Err(error),
                            Err(error) => {
                                tracing::warn!(server = %spec.name, url, error = %error, "endpoint unreachable, trying the next");
                                failures.push(format!("{url}: {error}"));
                            }
                        }
                    }
                    Err(ConnectError::Handshake(format!(
                        "no endpoint answered ({})",
                        failures.join("; ")
                    )))
                }
            }
        };
        tokio::time::timeout(spec.startup_timeout, opening)
            .await
            .map_err(|_| ConnectError::Timeout(spec.startup_timeout))?
    }

    async fn open_remote(
        spec: &ServerSpec,
        url: &str,
        http: &HttpSpec,
        events: mpsc::UnboundedSender<Event>,
        relay: Arc<Relay>,
    ) -> Result<Connection, ConnectError> {
        if matches!(spec.transport, Transport::Sse(_)) {
            let transport = sse::connect(url, header_map(http)?).await?;
            serve(spec, transport, Opened::default(), events, relay, None).await
        } else {
            let transport = StreamableHttpClientTransport::from_config(http_config(url, http)?);
            serve(spec, transport, Opened::default(), events, relay, None).await
        }
    }

    /// Count a request on this connection while the returned guard lives.
    pub fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        Busy(self)
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// How long since its last request ended (or since it opened, if it never had one).
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_used_ms.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    /// The lane tool calls may take as text: a stdio server's, if its protocol has no
    /// answers conductor must read (2026-07-28 servers may answer `input_required`).
    pub fn text_lane(&self) -> Option<&TextLane> {
        if self.info.protocol_version >= ProtocolVersion::V_2026_07_28 {
            return None;
        }
        self.lane.as_deref()
    }

    /// Whether the connection is still open.
    pub fn is_open(&self) -> bool {
        !self.ended.is_cancelled() && !self.peer.is_transport_closed()
    }

    /// Resolves when the connection has ended.
    pub async fn ended(&self) {
        self.ended.cancelled().await;
    }

    /// Everything the server offers, asking only for what its capabilities declare.
    /// A list method the server answers with "method not found" counts as an empty list.
    pub async fn list(&self) -> Result<Listing, ConnectError> {
        let mut listing = Listing::default();
        for kind in [ListKind::Tools, ListKind::Prompts, ListKind::Resources] {
            self.list_into(kind, &mut listing).await?;
        }
        Ok(listing)
    }

    /// Re-list one kind into `listing`, after the server said it changed.
    pub async fn list_into(
        &self,
        kind: ListKind,
        listing: &mut Listing,
    ) -> Result<(), ConnectError> {
        let hint = match kind {
            _ if !self.offers(kind) => CacheHint::default(),
            ListKind::Tools => {
                // What rmcp's `Tool` drops of the answers, the lane notes as they pass.
                if let Some(lane) = &self.lane {
                    lane.take_executions();
                }
                let list = self.peer.list_all_tools_with_cache_hint().await;
                let (tools, hint) = tolerate_missing("tools", list)?;
                listing.tools = tools;
                listing.executions = self
                    .lane
                    .as_ref()
                    .map(|lane| lane.take_executions().into_iter().collect())
                    .unwrap_or_default();
                hint
            }
            ListKind::Prompts => {
                let list = self.peer.list_all_prompts_with_cache_hint().await;
                let (prompts, hint) = tolerate_missing("prompts", list)?;
                listing.prompts = prompts;
                hint
            }
            ListKind::Resources => {
                let list = self.peer.list_all_resources_with_cache_hint().await;
                let (resources, hint) = tolerate_missing("resources", list)?;
                let list = self
                    .peer
                    .list_all_resource_templates_with_cache_hint()
                    .await;
                let (templates, templates_hint) = tolerate_missing("resource templates", list)?;
                listing.resources = resources;
                listing.templates = templates;
                hint.merge(templates_hint)
            }
        };
        self.keep_hint(kind, hint);
        Ok(())
    }

    /// Whether the server declared the capability for one kind of list.
    pub fn offers(&self, kind: ListKind) -> bool {
        let capabilities = &self.info.capabilities;
        match kind {
            ListKind::Tools => capabilities.tools.is_some(),
            ListKind::Prompts => capabilities.prompts.is_some(),
            ListKind::Resources => capabilities.resources.is_some(),
        }
    }

    /// The server's cache hint for one of its lists.
    pub fn hint(&self, kind: ListKind) -> CacheHint {
        self.hints
            .lock()
            .map(|hints| hints[kind as usize].0)
            .unwrap_or_default()
    }

    /// Keep a list's cache hint, and have the list listed again when its `ttlMs` runs out
    /// (the downstream promised nothing after that, and may not say when it changes).
    fn keep_hint(&self, kind: ListKind, hint: CacheHint) {
        let Ok(mut hints) = self.hints.lock() else {
            return;
        };
        let (kept, listings) = &mut hints[kind as usize];
        *kept = hint;
        *listings += 1;
        let listing = *listings;
        drop(hints);
        let Some(fresh_until) = hint.fresh_until else {
            return;
        };
        let relist_at = fresh_until.max(Instant::now() + MIN_RELIST);
        let (ended, events, server) =
            (self.ended.clone(), self.events.clone(), self.server.clone());
        let hints = self.hints.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = tokio::time::sleep_until(relist_at.into()) => {}
                () = ended.cancelled() => return,
            }
            // Listed again meanwhile (the server said it changed): that listing's timer counts.
            let latest = hints.lock().map(|hints| hints[kind as usize].1).ok();
            if latest == Some(listing) {
                let _ = events.send(Event::ListChanged { server, kind });
            }
        });
    }

    /// Whether the server takes resource subscriptions as a `subscriptions/listen` stream
    /// (2026-07-28) rather than `resources/subscribe`, which it refuses.
    pub fn listens_for_resources(&self) -> bool {
        self.info.protocol_version >= ProtocolVersion::V_2026_07_28
    }

    /// Have the server send updates for exactly the resources of it that have subscribers
    /// now. A listen stream's filter is fixed, so a new stream replaces the old one, which ends
    /// only once the new one is acknowledged: no update falls between them. No URIs, no stream.
    pub async fn listen_for_resources(&self) -> Result<(), ServiceError> {
        let mut current = self.resource_stream.lock().await;
        // Read under the lock: of two changes at once, the later stream has both.
        let uris = self.relay.subscribed_uris(&self.server);
        if current.as_ref().map(|stream| &stream.uris) == Some(&uris) {
            return Ok(());
        }
        if uris.is_empty() {
            *current = None;
            return Ok(());
        }
        let mut filter = SubscriptionFilter::new();
        filter.resource_subscriptions = Some(uris.clone());
        let mut subscription = self.peer.listen(filter).await?;
        let (relay, server, ended) = (self.relay.clone(), self.server.clone(), self.ended.clone());
        let forwarding = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = subscription.next() => next,
                    () = ended.cancelled() => return,
                };
                match next {
                    Ok(Some(ServerNotification::ResourceUpdatedNotification(update))) => {
                        client::pass_resource_update(&relay, &server, update.params).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => return,
                    Err(error) => {
                        tracing::debug!(server = %server, error = %error, "the resource listen stream failed");
                        return;
                    }
                }
            }
        });
        *current = Some(ResourceStream { uris, forwarding });
        Ok(())
    }

    /// Stop the connection: close the transport, and for a child, its stdin; a child still
    /// running after `grace` gets SIGTERM (its whole process group), and after `grace` again
    /// SIGKILL. Calls still in flight fail with "connection closed".
    pub async fn close(&self, grace: Duration) {
        self.cancel();
        let task = self.task.lock().ok().and_then(|mut task| task.take());
        let Some(mut task) = task else {
            return;
        };
        if tokio::time::timeout(grace, &mut task).await.is_ok() {
            return;
        }
        if let Some(pid) = self.pid {
            use nix::sys::signal::Signal;
            stdio::signal_group(&self.server, pid, Signal::SIGTERM);
            if tokio::time::timeout(grace, &mut task).await.is_ok() {
                return;
            }
            tracing::warn!(server = %self.server, pid, "child ignored SIGTERM; killing it");
            // rmcp's own shutdown is still waiting on the child, and reaps it once it dies.
            stdio::signal_group(&self.server, pid, Signal::SIGKILL);
        }
        if tokio::time::timeout(grace, &mut task).await.is_err() {
            task.abort();
        }
    }

    fn cancel(&self) {
        if let Some(cancel) = self.cancel.lock().ok().and_then(|mut cancel| cancel.take()) {
            cancel.cancel();
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.id)
            .field("server", &self.server)
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.relay.forget(self.id);
        self.cancel();
    }
}

/// What a transport's opening gave besides the transport: a child's pid and text lane.
#[derive(Default)]
struct Opened {
    pid: Option<u32>,
    lane: Option<Arc<TextLane>>,
}

/// Complete the handshake over `transport` and run the connection in the background.
async fn serve<T, E, A>(
    spec: &ServerSpec,
    transport: T,
    opened: Opened,
    events: mpsc::UnboundedSender<Event>,
    relay: Arc<Relay>,
    client: Option<(Peer<RoleServer>, ClientCapabilities)>,
) -> Result<Connection, ConnectError>
where
    T: rmcp::transport::IntoTransport<RoleClient, E, A>,
    E: std::error::Error + Send + Sync + 'static,
{
    let id = next_connection_id();
    let (gave_roots, roots_given) = tokio::sync::watch::channel(false);
    let client = DownstreamClient::new(
        spec.name.clone(),
        id,
        events.clone(),
        relay.clone(),
        client,
        spec.roots.clone(),
        gave_roots,
    );
    let lifecycle = match spec.handshake {
        Handshake::Initialize => ClientLifecycleMode::Initialize,
        Handshake::Discover => ClientLifecycleMode::Discover {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
        },
        Handshake::Auto => ClientLifecycleMode::Auto {
            preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            legacy_version: None,
        },
    };
    let service = client
        .serve_with_lifecycle(transport, lifecycle)
        .await
        .map_err(handshake_error)?;
    let peer = service.peer().clone();
    let info = peer
        .peer_info()
        .map(|info| (*info).clone())
        .ok_or_else(|| ConnectError::Handshake("the server sent no initialize result".into()))?;
    let cancel = service.cancellation_token();
    let relist_events = events.clone();
    let server = spec.name.clone();
    let ended = tokio_util::sync::CancellationToken::new();
    let ending = ended.clone();
    let task = tokio::spawn(async move {
        let reason = match service.waiting().await {
            Ok(rmcp::service::QuitReason::Cancelled) => "stopped".to_owned(),
            Ok(rmcp::service::QuitReason::Closed) => "the connection closed".to_owned(),
            Ok(other) => format!("{other:?}"),
            Err(error) => format!("the connection task failed: {error}"),
        };
        ending.cancel();
        let _ = events.send(Event::Closed {
            server,
            connection: id,
            reason,
        });
    });
    Ok(Connection {
        id,
        server: spec.name.clone(),
        peer,
        info,
        pid: opened.pid,
        lane: opened.lane,
        opened: Instant::now(),
        in_flight: AtomicUsize::new(0),
        last_used_ms: AtomicU64::new(0),
        ended,
        hints: Arc::new(std::sync::Mutex::new([(CacheHint::default(), 0); 3])),
        events: relist_events,
        relay,
        cancel: std::sync::Mutex::new(Some(cancel)),
        task: std::sync::Mutex::new(Some(task)),
        resource_stream: tokio::sync::Mutex::new(None),
        roots_given,
    })
}

impl CacheHint {
    /// The hint of two lists served together: fresh while both are, private if either is.
    pub fn merge(self, other: CacheHint) -> CacheHint {
        let fresh_until = match (self.fresh_until, other.fresh_until) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        };
        let scope = match (self.scope, other.scope) {
            (Some(CacheScope::Private), _) | (_, Some(CacheScope::Private)) => {
                Some(CacheScope::Private)
            }
            (Some(CacheScope::Public), Some(CacheScope::Public)) => Some(CacheScope::Public),
            _ => None,
        };
        CacheHint { fresh_until, scope }
    }
}

/// The configured headers as HTTP headers, each name and value checked.
fn header_map(http: &HttpSpec) -> Result<http::HeaderMap, ConnectError> {
    let mut headers = http::HeaderMap::new();
    for (name, value) in &http.headers {
        let header_name = http::HeaderName::try_from(name.as_str())
            .map_err(|_| ConnectError::Header { name: name.clone() })?;
        let header_value = http::HeaderValue::try_from(value.as_str())
            .map_err(|_| ConnectError::Header { name: name.clone() })?;
        headers.insert(header_name, header_value);
    }
    Ok(headers)
}

fn http_config(
    url: &str,
    http: &HttpSpec,
) -> Result<StreamableHttpClientTransportConfig, ConnectError> {
    let headers: HashMap<http::HeaderName, http::HeaderValue> = header_map(http)?
        .into_iter()
        .filter_map(|(name, value)| name.map(|name| (name, value)))
        .collect();
    // A server that restarted has forgotten our session: start a new one rather than fail.
    Ok(
        StreamableHttpClientTransportConfig::with_uri(url.to_owned())
            .custom_headers(headers)
            .reinit_on_expired_session(true),
    )
}

fn tolerate_missing<T>(
    what: &'static str,
    result: Result<MergedList<T>, ServiceError>,
) -> Result<(Vec<T>, CacheHint), ConnectError> {
    match result {
        Ok(list) => {
            let hint = CacheHint {
                fresh_until: list
                    .ttl_ms
                    .and_then(|ttl| Instant::now().checked_add(Duration::from_millis(ttl))),
                scope: list.cache_scope,
            };
            Ok((list.items, hint))
        }
        Err(ServiceError::McpError(error)) if error.code == ErrorCode::METHOD_NOT_FOUND => {
            Ok((Vec::new(), CacheHint::default()))
        }
        Err(error) => Err(ConnectError::List {
            what,
            error: service_error_text(&error),
        }),
    }
}

/// rmcp's error in words about the server: its transport errors name the transport's Rust
/// type, which says nothing to a user; what went wrong is the error inside.
pub fn service_error_text(error: &ServiceError) -> String {
    match error {
        ServiceError::TransportSend(error) => {
            format!("could not send the request: {}", error.error)
        }
        other => other.to_string(),
    }
}
