//! Serving over HTTP: Streamable HTTP at `/mcp` (rmcp's service, one `ConductorServer` per
//! session), `/healthz` and `/readyz`, behind bearer-token authentication, a check of every
//! POST body, and a session cap.
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
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::config::HttpSettings;
use crate::orchestrate::Orchestrator;
use crate::registry::{Registry, Status};
use crate::router::Router;
use crate::server::ConductorServer;

/// Why conductor will not serve on an address.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(
        "refusing to serve on {0} without authentication: anyone who can reach it could call every tool. \
         Set tokens in servers.toml (`[http] tokens = [\"${{CONDUCTOR_TOKEN}}\"]`, at least 16 characters), \
         or serve on a loopback address such as 127.0.0.1"
    )]
    Unauthenticated(SocketAddr),
}

/// What the HTTP handlers share.
#[derive(Clone)]
struct Shared {
    registry: Arc<Registry>,
    settings: HttpSettings,
    sessions: Arc<LocalSessionManager>,
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
    let mut sessions = LocalSessionManager::default();
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
    let config = StreamableHttpServerConfig::default()
        .with_allowed_hosts(hosts)
        .with_allowed_origins(origins)
        .enforce_origin_validation()
        .with_max_request_body_bytes(settings.max_body_bytes)
        .with_cancellation_token(shutdown);

    let router = Router::new(registry.clone());
    let service: StreamableHttpService<ConductorServer, LocalSessionManager> =
        StreamableHttpService::new(
            move || Ok(ConductorServer::new(router.clone(), orchestrator.clone())),
            sessions.clone(),
            config,
        );
    let shared = Shared {
        registry,
        settings,
        sessions,
    };
    let mcp = axum::Router::new()
        .nest_service("/mcp", service)
        .layer(middleware::from_fn_with_state(shared.clone(), check_post))
        .layer(middleware::from_fn_with_state(shared.clone(), authenticate));
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(shared)
        .merge(mcp)
}

/// Serve `app` on `listener` until `shutdown` resolves, then let requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Bearer tokens, compared in constant time so a timing side channel cannot reveal them.
async fn authenticate(State(shared): State<Shared>, request: Request, next: Next) -> Response {
    if shared.settings.tokens.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or("");
    let accepted = shared
        .settings
        .tokens
        .iter()
        .any(|token| bool::from(token.as_bytes().ct_eq(presented.as_bytes())));
    if accepted {
        return next.run(request).await;
    }
    let message = if presented.is_empty() {
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
/// `max_sessions` sessions is 503.
async fn check_post(State(shared): State<Shared>, request: Request, next: Next) -> Response {
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
    let message: Value = match serde_json::from_slice(&bytes) {
        Ok(message) => message,
        Err(error) => return json_rpc_error(-32700, &format!("parse error: {error}")),
    };
    let is_message = |item: &Value| item.get("jsonrpc").and_then(Value::as_str) == Some("2.0");
    let well_formed = match &message {
        Value::Array(batch) => !batch.is_empty() && batch.iter().all(is_message),
        single => is_message(single),
    };
    if !well_formed {
        return json_rpc_error(-32600, "invalid request: not a JSON-RPC 2.0 message");
    }
    let opens_session = !parts.headers.contains_key("mcp-session-id")
        && message.get("method").and_then(Value::as_str) == Some("initialize");
    if opens_session && shared.sessions.sessions.read().await.len() >= shared.settings.max_sessions
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
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

fn json_rpc_error(code: i32, message: &str) -> Response {
    let body = json!({"jsonrpc": "2.0", "id": null, "error": {"code": code, "message": message}});
    (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
}

/// Every downstream's state; 200 when all enabled servers are ready, 503 otherwise. Error
/// details are shown only when no tokens are configured (a loopback-only server).
async fn readyz(State(shared): State<Shared>) -> Response {
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
            if let (true, Status::Failed(reason)) = (show_errors, &state.status) {
                entry["error"] = json!(reason);
            }
            entry
        })
        .collect();
    let ready = states
        .iter()
        .all(|state| matches!(state.status, Status::Ready | Status::Disabled));
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
