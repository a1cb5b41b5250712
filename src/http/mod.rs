//! Serving over HTTP: Streamable HTTP at `/mcp` (rmcp's service, one `ConductorServer` per
//! session), the legacy HTTP+SSE transport at `/sse` and `/messages` (module `sse`), `/healthz` and
//! `/readyz`, behind bearer-token authentication, a check of every POST body, and a session cap.
//! Streams are resumable: their events are kept (module `events`) for a client that reconnects.
//!
//! The app is a value ([`app`]) so tests can drive it; [`serve`] takes a bound listener and a
//! shutdown signal.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, to_bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use rmcp::model::{
    ProgressNotification, ProgressNotificationParam, ProtocolVersion, ServerJsonRpcMessage,
    ServerNotification,
};
use rmcp::transport::common::server_side_http::ServerSseMessage;
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::session::store::EventStore;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use sse_stream::Sse;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

mod events;
mod sse;

use crate::config::HttpSettings;
use crate::orchestrate::{Orchestrator, Owner};
use crate::registry::{Registry, Status};
use crate::router::Router;
use crate::server::{ConductorServer, Front, Fronts};

/// Why conductor will not serve on an address.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "refusing to serve on {0} without authentication: anyone who can reach it could call every tool. \
         Set a token of at least 16 characters in the environment as `CONDUCTOR_TOKEN`, or in servers.toml \
         (`[http] tokens = [\"${{MY_TOKEN}}\"]`), or serve on a loopback address such as 127.0.0.1"
    )]
    Unauthenticated(SocketAddr),
}

/// Which of the configured bearer tokens a request presented (its place in `[http] tokens`),
/// or `OPEN` on a server without tokens. Put in every authenticated request's extensions:
/// a session, and a run, belong to the credential that made them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Credential(u32);

impl Credential {
    /// Every request of a server without tokens (loopback only).
    pub const OPEN: Credential = Credential(u32::MAX);

    /// Who the runs made with this credential belong to.
    pub fn owner(self) -> Owner {
        if self == Credential::OPEN {
            Owner::named("http")
        } else {
            Owner::named(format!("http:token{}", self.0))
        }
    }
}

tokio::task_local! {
    /// The credential of the request being served. rmcp makes a session's (or a stateless
    /// request's) `ConductorServer` inside that request's future and takes nothing to pass
    /// it, so the factory reads it here.
    static SERVING: Credential;
}

/// The owner of the runs of the request being served; outside one, nobody's (fails closed).
fn serving_owner() -> Owner {
    SERVING
        .try_with(|credential| credential.owner())
        .unwrap_or_else(|_| Owner::named(format!("unattributed:{}", uuid::Uuid::new_v4().simple())))
}

/// What the HTTP handlers share, behind an `Arc`: axum clones a middleware's state for every
/// request.
struct Shared {
    registry: Arc<Registry>,
    settings: HttpSettings,
    sessions: Arc<LocalSessionManager>,
    /// The sessions' kept events (also rmcp's event store).
    events: Arc<events::MemoryEventStore>,
    legacy: Arc<sse::SseSessions>,
    /// The sessions' fronts, which answer plain tool calls without rmcp parsing them.
    fronts: Arc<Fronts>,
    /// As rmcp's streams have them: the reconnection hint, and how often an idle stream gets
    /// a comment.
    sse_retry: std::time::Duration,
    sse_keep_alive: std::time::Duration,
    /// Ends every stream at shutdown.
    shutdown: CancellationToken,
    /// `Host` and `Origin` values accepted on every MCP route (DNS rebinding, foreign pages).
    hosts: Vec<String>,
    origins: Vec<String>,
    /// The credential each Streamable HTTP session was opened with.
    owners: dashmap::DashMap<String, Credential>,
}

impl Shared {
    async fn session_count(&self) -> usize {
        self.sessions.sessions.read().await.len() + self.legacy.count()
    }
}

/// Refuse a non-loopback address when no tokens are configured.
pub fn check_exposure(address: SocketAddr, settings: &HttpSettings) -> Result<(), HttpError> {
    if address.ip().is_loopback() || !settings.tokens.is_empty() {
        Ok(())
    } else {
        Err(HttpError::Unauthenticated(address))
    }
}

/// The HTTP app for `address`. `shutdown` ends every session when it is cancelled.
pub fn app(
    registry: Arc<Registry>,
    orchestrator: Arc<Orchestrator>,
    address: SocketAddr,
    shutdown: CancellationToken,
) -> axum::Router {
    let settings = registry.config().http.clone();
    let mut session_config = SessionConfig::default();
    session_config.keep_alive = Some(settings.session_idle);
    let sse_retry = session_config
        .sse_retry
        .unwrap_or(SessionConfig::DEFAULT_SSE_RETRY);
    let events = Arc::new(events::MemoryEventStore::default());
    let mut sessions = LocalSessionManager::default().with_event_store(events.clone());
    sessions.session_config = session_config;
    let sessions = Arc::new(sessions);

    let mut hosts = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !address.ip().is_loopback() && !address.ip().is_unspecified() {
        hosts.push(address.ip().to_string());
    }
    hosts.extend(settings.allowed_hosts.iter().cloned());
    let mut origins: Vec<String> = ["http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*"]
        .into_iter()
        .map(str::to_owned)
        .collect();
    origins.extend(settings.allowed_origins.iter().cloned());
    // Host and Origin are checked by `check_host_and_origin` for every MCP route, not by
    // rmcp: axum clones the service, lists included, for every request.
    let config = StreamableHttpServerConfig::default()
        .disable_allowed_hosts()
        .disable_allowed_origins()
        .with_max_request_body_bytes(settings.max_body_bytes)
        // Stateless (2026-07-28) requests get a plain JSON answer when nothing streams before
        // it, and SSE when progress or notifications come first.
        .with_json_response(true)
        .with_cancellation_token(shutdown.clone());
    let sse_keep_alive = config
        .sse_keep_alive
        .unwrap_or(std::time::Duration::from_secs(15));

    let router = Router::new(registry.clone());
    let fronts = Arc::new(Fronts::default());
    let session_fronts = fronts.clone();
    let make_server: Arc<dyn Fn(Owner) -> ConductorServer + Send + Sync> = Arc::new(move |owner| {
        ConductorServer::new(&router, &orchestrator)
            .owned_by(owner)
            .with_fronts(session_fronts.clone())
    });
    let factory = make_server.clone();
    let with_sessions = StreamableHttpService::new(
        move || Ok(factory(serving_owner())),
        sessions.clone(),
        config.clone(),
    );
    // A 2026-07-28 client cancels a request by closing its response stream. rmcp takes that
    // as a cancel only for a stream it does not keep for resumption, so those clients' requests
    // go to a service without an event store (they have no sessions to resume in).
    let factory = make_server.clone();
    let stateless = StreamableHttpService::new(
        move || Ok(factory(serving_owner())),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let services = Arc::new(McpServices {
        with_sessions,
        stateless,
    });
    let legacy = Arc::new(sse::SseSessions::default());
    let shared = Arc::new(Shared {
        registry,
        settings,
        sessions,
        events,
        legacy: legacy.clone(),
        fronts,
        sse_retry,
        sse_keep_alive,
        shutdown: shutdown.clone(),
        hosts,
        origins,
        owners: dashmap::DashMap::new(),
    });
    let legacy_routes = axum::Router::new()
        .route("/sse", get(sse::open))
        .route("/messages", axum::routing::post(sse::post))
        .with_state(sse::SseState {
            sessions: legacy,
            make_server,
            shutdown,
        });
    let mcp = axum::Router::new()
        .route("/mcp", axum::routing::any(serve_mcp).with_state(services))
        .merge(legacy_routes)
        .layer(middleware::from_fn_with_state(shared.clone(), check_post))
        .layer(middleware::from_fn(delete_answers_ok))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            check_host_and_origin,
        ))
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            deliver_unread,
        ))
        .layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(shared)
        .merge(mcp)
}

/// rmcp's Streamable HTTP service, twice: for clients with sessions (their streams kept, to
/// resume), and for 2026-07-28 clients, which have none (their streams not kept, so closing
/// one cancels its request).
struct McpServices {
    with_sessions: StreamableHttpService<ConductorServer, LocalSessionManager>,
    stateless: StreamableHttpService<ConductorServer, LocalSessionManager>,
}

async fn serve_mcp(State(services): State<Arc<McpServices>>, request: Request) -> Response {
    let service = if cancels_by_closing(request.headers()) {
        &services.stateless
    } else {
        &services.with_sessions
    };
    service.handle(request).await.map(Body::new)
}

/// Whether a request is a 2026-07-28 client's, outside any session: such a client cancels a
/// request by closing its stream.
fn cancels_by_closing(headers: &axum::http::HeaderMap) -> bool {
    !headers.contains_key("mcp-session-id")
        && headers
            .get("mcp-protocol-version")
            .and_then(|version| version.to_str().ok())
            .is_some_and(|version| {
                version.starts_with(|c: char| c.is_ascii_digit())
                    && version >= ProtocolVersion::V_2026_07_28.as_str()
            })
}

/// Serve `app` on `listener` until `shutdown` resolves, then let requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Routes made into services once: axum would otherwise rebuild the router for every
    // connection (docs/performance.md).
    let app = app.with_state::<()>(());
    // No Nagle: an SSE answer is written as several small writes (its priming event, then
    // each message), and Nagle holds each after the first until the client's delayed ACK,
    // about 40 ms every time (docs/performance.md).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(error = %error, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app.into_make_service())
        .with_graceful_shutdown(shutdown)
        .await
}

/// Bearer tokens, compared in constant time so a timing side channel cannot reveal them. The
/// accepted token's [`Credential`] goes into the request's extensions, and a session is
/// served only to the credential that opened it: to any other it does not exist (404).
async fn authenticate(
    State(shared): State<Arc<Shared>>,
    mut request: Request,
    next: Next,
) -> Response {
    let credential = if shared.settings.tokens.is_empty() {
        Credential::OPEN
    } else {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "))
            .unwrap_or("");
        // Every token is compared, so the time taken does not say which one matched.
        let mut accepted = None;
        for (index, token) in shared.settings.tokens.iter().enumerate() {
            if bool::from(token.as_bytes().ct_eq(presented.as_bytes())) {
                accepted = Some(Credential(index as u32));
            }
        }
        match accepted {
            Some(credential) => credential,
            None => return unauthorized(presented.is_empty()),
        }
    };
    let session = header_text(&request, "mcp-session-id");
    if let Some(session) = session
        && shared
            .owners
            .get(session)
            .is_some_and(|owner| *owner != credential)
    {
        tracing::warn!(
            session = %session,
            "a request named a session opened with another credential; answered as unknown"
        );
        let mut response = json_rpc_error(-32600, "session not found");
        *response.status_mut() = StatusCode::NOT_FOUND;
        return response;
    }
    let opens_session = session.is_none();
    request.extensions_mut().insert(credential);
    let response = SERVING.scope(credential, next.run(request)).await;
    if opens_session
        && let Some(opened) = response
            .headers()
            .get("mcp-session-id")
            .and_then(|id| id.to_str().ok())
    {
        bind_session(&shared, opened, credential).await;
    }
    response
}

/// rmcp answers a session's `DELETE` with 202; the reference servers answer 200, and the
/// Python SDK logs anything else as a failed close on every exit.
async fn delete_answers_ok(request: Request, next: Next) -> Response {
    let deleting = request.method() == axum::http::Method::DELETE;
    let mut response = next.run(request).await;
    if deleting && response.status() == StatusCode::ACCEPTED {
        *response.status_mut() = StatusCode::OK;
    }
    response
}

/// Record who opened a session; forget the sessions that have ended meanwhile.
async fn bind_session(shared: &Shared, session: &str, credential: Credential) {
    {
        let live = shared.sessions.sessions.read().await;
        shared.owners.retain(|id, _| live.contains_key(id.as_str()));
    }
    shared.owners.insert(session.to_owned(), credential);
}

/// 401, with the challenge a client library recognizes.
fn unauthorized(nothing_presented: bool) -> Response {
    let message = if nothing_presented {
        "this server needs a bearer token: send `Authorization: Bearer <token>`"
    } else {
        "the bearer token is not valid"
    };
    let mut response = (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({"error": message})),
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"mcp-conductor\""),
    );
    response
}

/// Every POST body, before rmcp sees it: too large is 413; not JSON, or not JSON-RPC, is a
/// JSON-RPC error (what a client library can report); and a new `initialize` beyond
/// `max_sessions` sessions is 503. A session's plain tool call is answered here, by its
/// [`Front`].
async fn check_post(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = to_bytes(body, shared.settings.max_body_bytes).await else {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body is larger than {} bytes",
                shared.settings.max_body_bytes
            ),
        )
            .into_response();
    };
    let Some(initialize) = opens_session(&bytes) else {
        return refusal_response(&bytes);
    };
    let session = parts
        .headers
        .get("mcp-session-id")
        .and_then(|id| id.to_str().ok());
    if session.is_none()
        && initialize
        && shared.session_count().await >= shared.settings.max_sessions
    {
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"error": format!("too many sessions (at most {}); try again later", shared.settings.max_sessions)})),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        return response;
    }
    if parts.uri.path() == "/mcp"
        && let Some(session) = session
        && let Some(answered) = answer_plain(&shared, session, &parts.headers, &bytes).await
    {
        return answered;
    }
    let sent_as_json = is_sent_as_json(&parts.headers);
    // Cheap to keep: the body's bytes are shared, not copied.
    let kept = bytes.clone();
    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    // rmcp answers a JSON body its types do not take with 415 and plain text: answer as
    // JSON-RPC says instead, with the request's id where it can be read.
    if response.status() == StatusCode::UNSUPPORTED_MEDIA_TYPE && sent_as_json {
        return refusal_response(&kept);
    }
    if initialize && response.status() == StatusCode::OK {
        return offer_tasks(response).await;
    }
    response
}

/// rmcp's answer to `initialize`, with the `tasks` capability conductor has for clients of
/// 2025-11-25, which rmcp's types cannot say (see [`crate::server::offer_in_initialize`]).
/// The answer is one message, as JSON or as one event of a stream that then ends.
async fn offer_tasks(response: Response) -> Response {
    /// More than any answer to `initialize`.
    const MOST: usize = 1024 * 1024;
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, MOST).await else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the answer to initialize was lost",
        )
            .into_response();
    };
    let offered = match crate::server::offer_in_initialize(&bytes) {
        Some(offered) => Some(offered),
        // A stream: the message is an event's `data` line.
        None => std::str::from_utf8(&bytes).ok().and_then(|text| {
            let mut changed = false;
            let lines: Vec<String> = text
                .split('\n')
                .map(|line| {
                    let offered = line.strip_prefix("data:").and_then(|data| {
                        crate::server::offer_in_initialize(data.trim_start().as_bytes())
                    });
                    match offered.and_then(|offered| String::from_utf8(offered).ok()) {
                        Some(offered) => {
                            changed = true;
                            format!("data: {offered}")
                        }
                        None => line.to_owned(),
                    }
                })
                .collect();
            changed.then(|| lines.join("\n").into_bytes())
        }),
    };
    let bytes = offered.map_or(bytes, axum::body::Bytes::from);
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(bytes))
}

/// A JSON-RPC error for a body no MCP type takes (see [`crate::wire::refusal`]): with the
/// request's id and 200, as any error answer to a request, where the id can be read; else
/// 400 and a `null` id. A notification's or a response's gets 202 and no body.
fn refusal_response(body: &[u8]) -> Response {
    let Some(refusal) = crate::wire::refusal(body) else {
        return StatusCode::ACCEPTED.into_response();
    };
    let status = if refusal.id.is_some() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, axum::Json(refusal.to_json())).into_response()
}

/// Whether a POST body, which must be JSON-RPC 2.0, is an `initialize`; `None` for a body
/// that is not one JSON-RPC message.
fn opens_session(body: &[u8]) -> Option<bool> {
    /// What is checked of a message; the rest is skipped, not parsed.
    #[derive(serde::Deserialize)]
    struct Message<'a> {
        #[serde(borrow, default)]
        jsonrpc: Option<&'a RawValue>,
        #[serde(borrow, default)]
        method: Option<&'a RawValue>,
    }
    let message = serde_json::from_slice::<Message>(body).ok()?;
    if message.jsonrpc.map(RawValue::get) != Some("\"2.0\"") {
        return None;
    }
    Some(message.method.map(RawValue::get) == Some("\"initialize\""))
}

/// A body sent as JSON by a client that takes both kinds of answer, in the plain form every
/// client sends. Anything else (weights, parameters, a missing type) goes to rmcp, which
/// answers it or refuses it (406, 415) with its own words.
fn rmcp_would_read(headers: &axum::http::HeaderMap) -> bool {
    let accepts = |wanted: &str| {
        header_values(headers, header::ACCEPT)
            .flat_map(|value| value.split(','))
            .any(|kind| kind.trim().eq_ignore_ascii_case(wanted))
    };
    is_sent_as_json(headers) && accepts("application/json") && accepts("text/event-stream")
}

/// Whether a request's body says it is JSON.
fn is_sent_as_json(headers: &axum::http::HeaderMap) -> bool {
    header_values(headers, header::CONTENT_TYPE).any(|value| {
        let essence = value.split(';').next().unwrap_or(value);
        essence.trim().eq_ignore_ascii_case("application/json")
    })
}

fn header_values(
    headers: &axum::http::HeaderMap,
    name: header::HeaderName,
) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|value| value.to_str().ok())
}

/// Answer a session's plain tool call (or its cancellation) here, as its front does, if the
/// request is one rmcp would take as it is: the session's own version in the header, and
/// none of the headers (SEP-2243) rmcp checks against the body. The answer is plain JSON if
/// it comes first, within [`ANSWER_AT_ONCE`]; else the call's progress and answer are a
/// resumable stream, as rmcp's.
async fn answer_plain(
    shared: &Shared,
    session: &str,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> Option<Response> {
    if !Front::may_take(body)
        || headers.contains_key("mcp-method")
        || headers.contains_key("mcp-name")
        || !rmcp_would_read(headers)
    {
        return None;
    }
    // A body that is not UTF-8 is rmcp's to refuse.
    let body = std::str::from_utf8(body).ok()?;
    let front = shared.fronts.get(session)?;
    let version = headers
        .get("mcp-protocol-version")
        .map(|version| version.to_str().ok());
    if let Some(version) = version
        && version != front.protocol().map(|protocol| protocol.as_str())
    {
        return None;
    }
    let (progress_to, mut progress) = tokio::sync::mpsc::unbounded_channel();
    let Some(answering) = front.take_call(body, Some(progress_to)) else {
        if let Some(answer) = front.take_list(body) {
            keep_alive(shared, session).await;
            return Some(json_answer(answer));
        }
        return front
            .take_cancel(body)
            .then(|| StatusCode::ACCEPTED.into_response());
    };
    keep_alive(shared, session).await;
    // The call runs on its own: it goes on if the client's connection drops.
    let (answered, mut answer) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        if let Some(text) = answering.await {
            let _ = answered.send(text);
        }
    });
    // Plain JSON if the answer comes first, and soon; a stream if progress comes first (it
    // must reach the client before the answer) or the call takes a while.
    let deadline = tokio::time::Instant::now() + ANSWER_AT_ONCE;
    let mut progressing = true;
    let first = loop {
        tokio::select! {
            biased;
            update = progress.recv(), if progressing => match update {
                Some(update) => break Some(update),
                None => progressing = false,
            },
            text = &mut answer => {
                return Some(match text {
                    Ok(text) => json_answer(text),
                    // Cancelled by the client, which expects no answer.
                    Err(_) => StatusCode::ACCEPTED.into_response(),
                });
            }
            () = tokio::time::sleep_until(deadline) => break None,
        }
    };
    Some(stream_answer(shared, first, progress, answer).await)
}

/// rmcp closes a session it sees no traffic on: what the front answers is traffic.
async fn keep_alive(shared: &Shared, session: &str) {
    let every = (shared.settings.session_idle / 4).min(std::time::Duration::from_secs(1));
    if shared.fronts.due(session, every) {
        let handle = shared.sessions.sessions.read().await.get(session).cloned();
        if let Some(handle) = handle {
            // Closing a request stream that never was: a no-op rmcp counts as activity.
            let _ = handle.close_request_wise_channel(u64::MAX).await;
        }
    }
}

/// An answer the front wrote, as one JSON body.
fn json_answer(text: Vec<u8>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        text,
    )
        .into_response()
}

/// A call's progress and answer, streamed as rmcp streams them and resumable the same way: a
/// first event with an id and a retry hint, then each event as it comes, kept in the event
/// store whether or not the client is still there to read it.
async fn stream_answer(
    shared: &Shared,
    first: Option<ProgressNotificationParam>,
    mut progress: tokio::sync::mpsc::UnboundedReceiver<ProgressNotificationParam>,
    mut answer: tokio::sync::oneshot::Receiver<Vec<u8>>,
) -> Response {
    let stream_id = uuid::Uuid::new_v4().to_string();
    let retry = shared.sse_retry;
    let priming = shared
        .events
        .store_event(&stream_id, &ServerSseMessage::retry(retry))
        .await
        .map(|id| Sse::default().data("").id(id).retry_duration(retry))
        .ok();
    let (to_client, events) = futures::channel::mpsc::unbounded();
    let store = shared.events.clone();
    tokio::spawn(async move {
        let mut next = first;
        let mut progressing = true;
        loop {
            if let Some(update) = next.take() {
                let notification = ServerJsonRpcMessage::notification(
                    ServerNotification::ProgressNotification(ProgressNotification::new(update)),
                );
                let Ok(data) = serde_json::to_string(&notification) else {
                    continue;
                };
                let event = ServerSseMessage::from_message(notification);
                if let Ok(id) = store.store_event(&stream_id, &event).await {
                    let _ = to_client.unbounded_send(Sse::default().data(data).id(id));
                }
            }
            tokio::select! {
                biased;
                update = progress.recv(), if progressing => match update {
                    Some(update) => next = Some(update),
                    None => progressing = false,
                },
                text = &mut answer => {
                    let Ok(text) = text else {
                        return;
                    };
                    match String::from_utf8(text) {
                        Ok(text) => {
                            let id = store.store_answer(&stream_id, text.as_str().into());
                            let _ = to_client.unbounded_send(Sse::default().data(text).id(id));
                        }
                        Err(error) => tracing::error!(error = %error, "an answer that is not text"),
                    }
                    return;
                }
            }
        }
    });
    let shutdown = shared.shutdown.clone();
    let events = futures::stream::iter(priming)
        .chain(events)
        .map(Ok::<_, std::convert::Infallible>)
        .take_until(async move { shutdown.cancelled().await });
    let body = sse_stream::SseBody::new(events)
        .with_keep_alive::<Tick>(sse_stream::KeepAlive::new().interval(shared.sse_keep_alive));
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::HeaderName::from_static("x-accel-buffering"),
                HeaderValue::from_static("no"),
            ),
        ],
        Body::new(body),
    )
        .into_response()
}

/// How long a front's call may take to be answered with plain JSON. A call answered at once is
/// best sent whole: clients read a JSON body to its end and keep the connection, while a
/// stream dropped after its answer costs them a new connection (docs/performance.md). A
/// longer call is streamed, so that a client whose connection drops can resume it.
const ANSWER_AT_ONCE: std::time::Duration = std::time::Duration::from_millis(100);

/// The timer of an SSE stream's keep-alive comments.
struct Tick(std::pin::Pin<Box<tokio::time::Sleep>>);

impl Future for Tick {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.0.as_mut().poll(context)
    }
}

impl sse_stream::Timer for Tick {
    fn reset(mut self: std::pin::Pin<&mut Self>, instant: std::time::Instant) {
        self.0.as_mut().reset(instant.into());
    }

    fn from_duration(duration: std::time::Duration) -> Self {
        Tick(Box::pin(tokio::time::sleep(duration)))
    }
}

/// A session's `GET /mcp` delivers first what was sent on the session's own stream while no
/// `GET` was reading it (see `events`), then what rmcp streams. A `GET` resuming that stream
/// with `Last-Event-ID` gets it from the store instead, and only counts as reading.
async fn deliver_unread(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    if request.method() != axum::http::Method::GET || request.uri().path() != "/mcp" {
        return next.run(request).await;
    }
    let resumes = header_text(&request, "last-event-id").map(str::to_owned);
    let Some(session) = header_text(&request, "mcp-session-id").map(str::to_owned) else {
        return next.run(request).await;
    };
    let resumes_own_stream = resumes
        .as_deref()
        .is_some_and(|id| events::is_session_event(&session, id));
    if resumes.is_some() && !resumes_own_stream {
        return next.run(request).await;
    }
    // Counted as reading before rmcp opens its stream, so nothing sent in between is kept as
    // unread as well as delivered.
    shared.events.open_session_stream(&session);
    let reading = Reading {
        events: shared.events.clone(),
        session,
    };
    let response = next.run(request).await;
    let streams = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    if !response.status().is_success() || !streams {
        return response;
    }
    // A resumed stream replays from the store what it missed, the unread included.
    let unread = shared.events.take_unread(&reading.session);
    let first: Vec<Result<_, axum::Error>> = if resumes_own_stream {
        Vec::new()
    } else {
        unread
            .iter()
            .filter_map(events::sse_frame)
            .map(Ok)
            .collect()
    };
    let (parts, body) = response.into_parts();
    let rest = body.into_data_stream().map(move |chunk| {
        // Held as long as the stream is read: dropped with it, it ends the reading.
        let _reading = &reading;
        chunk
    });
    Response::from_parts(
        parts,
        Body::from_stream(futures::stream::iter(first).chain(rest)),
    )
}

/// A header's value, if it is there and is text (as rmcp reads it).
fn header_text(request: &Request, name: impl header::AsHeaderName) -> Option<&str> {
    request.headers().get(name)?.to_str().ok()
}

/// A `GET` reading a session's own stream; dropped when it ends.
struct Reading {
    events: Arc<events::MemoryEventStore>,
    session: String,
}

impl Drop for Reading {
    fn drop(&mut self) {
        self.events.close_session_stream(&self.session);
    }
}

pub(crate) fn json_rpc_error(code: i32, message: &str) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// DNS-rebinding protection for every MCP route: the `Host` must be one we answer to, and a
/// browser's `Origin` one we trust.
async fn check_host_and_origin(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let allowed = header_text(&request, header::HOST)
        .is_some_and(|host| host_allowed(host, &shared.hosts))
        && header_text(&request, header::ORIGIN)
            .is_none_or(|origin| origin_allowed(origin, &shared.origins));
    if !allowed {
        return (StatusCode::FORBIDDEN, "this Host or Origin is not allowed").into_response();
    }
    // A new legacy session counts against the cap too.
    if request.uri().path() == "/sse"
        && shared.session_count().await >= shared.settings.max_sessions
    {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many sessions; try again later",
        )
            .into_response();
    }
    next.run(request).await
}

/// `host[:port]` against entries that are a host or a `host:port`.
fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    let (bare, _) = split_port(&host, "");
    let bare = bare
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    allowed.iter().any(|entry| {
        let entry = entry.to_ascii_lowercase();
        entry == host || entry.trim_start_matches('[').trim_end_matches(']') == bare
    })
}

/// `scheme://host[:port]` against entries of the same form, where the port may be `*`.
fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    let origin = origin.to_ascii_lowercase();
    let Some((scheme, rest)) = origin.split_once("://") else {
        return false;
    };
    let default_port = if scheme == "https" { "443" } else { "80" };
    let (host, port) = split_port(rest, default_port);
    allowed.iter().any(|entry| {
        let entry = entry.to_ascii_lowercase();
        let Some((entry_scheme, entry_rest)) = entry.split_once("://") else {
            return false;
        };
        let (entry_host, entry_port) = split_port(entry_rest, "*");
        entry_scheme == scheme && entry_host == host && (entry_port == "*" || entry_port == port)
    })
}

/// A `host:port` authority split at its port, which is `default_port` when absent (IPv6
/// literals keep their colons inside brackets).
fn split_port(authority: &str, default_port: &str) -> (String, String) {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && !port.contains(']')
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            (host.to_owned(), port.to_owned())
        }
        _ => (authority.to_owned(), default_port.to_owned()),
    }
}

/// Every downstream's state; 200 when all enabled servers are ready, 503 otherwise. Error
/// details are shown only when no tokens are configured (a loopback-only server).
async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let show_errors = shared.settings.tokens.is_empty();
    let states = shared.registry.states();
    let servers: Vec<Value> = states
        .iter()
        .map(|state| {
            let mut entry = json!({
                "name": state.spec.name.as_str(),
                "transport": state.spec.transport.kind(),
                "status": state.status.label(),
                "tools": state.listing.tools.len(),
            });
            if shared.registry.circuit_open(&state.spec.name) {
                entry["circuit"] = json!("open");
            }
            if let Status::Restarting { attempt, .. } | Status::Reconnecting { attempt, .. } =
                &state.status
            {
                entry["attempt"] = json!(attempt);
            }
            if show_errors && let Some(detail) = state.status.detail() {
                entry["detail"] = json!(detail);
            }
            entry
        })
        .collect();
    let ready = states.iter().all(|state| {
        matches!(
            state.status,
            Status::Ready | Status::Idle | Status::Disabled
        )
    });
    let status = if ready { "ready" } else { "degraded" };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        axum::Json(json!({"status": status, "servers": servers})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|item| (*item).to_owned()).collect()
    }

    #[test]
    fn hosts_match_with_or_without_a_port() {
        let allowed = list(&["localhost", "127.0.0.1", "::1", "example.com:8080"]);
        assert!(host_allowed("localhost:3000", &allowed));
        assert!(host_allowed("127.0.0.1", &allowed));
        assert!(host_allowed("[::1]:9000", &allowed));
        assert!(host_allowed("example.com:8080", &allowed));
        assert!(!host_allowed("example.com:9090", &allowed));
        assert!(!host_allowed("evil.example", &allowed));
    }

    #[test]
    fn origins_match_scheme_host_and_port() {
        let allowed = list(&["http://localhost:*", "https://app.example.com:443"]);
        assert!(origin_allowed("http://localhost:5173", &allowed));
        assert!(origin_allowed("https://app.example.com", &allowed));
        assert!(!origin_allowed("http://app.example.com", &allowed));
        assert!(!origin_allowed("https://evil.example", &allowed));
        assert!(!origin_allowed("null", &allowed));
    }
}
