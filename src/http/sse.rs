//! The legacy HTTP+SSE transport (2024-11-05), for older clients: `GET /sse` opens a session's
//! event stream, whose first event names the URL (`/messages?sessionId=...`) the client POSTs
//! its messages to. rmcp no longer ships it, so it is built here on rmcp's sink/stream
//! transport: each session is one `ConductorServer` fed by a channel.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Extension, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use dashmap::DashMap;
use futures::StreamExt;
use rmcp::ServiceExt;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::sink_stream::SinkStreamTransport;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, PollSender};

use super::Credential;
use crate::orchestrate::Owner;
use crate::server::ConductorServer;

/// Messages buffered per session in each direction before the sender waits.
const CHANNEL_CAPACITY: usize = 64;

/// The open legacy sessions: where each one's incoming messages go.
#[derive(Debug, Default)]
pub struct SseSessions {
    inboxes: DashMap<String, Inbox>,
}

/// Where a session's messages go, and the credential that opened it: only that one may post.
#[derive(Debug, Clone)]
struct Inbox {
    sender: mpsc::Sender<ClientJsonRpcMessage>,
    owner: Credential,
}

impl SseSessions {
    pub(super) fn count(&self) -> usize {
        self.inboxes.len()
    }
}

/// What the two legacy routes need.
#[derive(Clone)]
pub struct SseState {
    pub sessions: Arc<SseSessions>,
    pub make_server: Arc<dyn Fn(Owner) -> ConductorServer + Send + Sync>,
    pub shutdown: CancellationToken,
}

/// `GET /sse`: a new session, and its stream of events.
pub async fn open(
    State(state): State<SseState>,
    Extension(owner): Extension<Credential>,
) -> Response {
    let id = new_session_id();
    let (inbox, from_client) = mpsc::channel::<ClientJsonRpcMessage>(CHANNEL_CAPACITY);
    let (to_client, mut outbox) = mpsc::channel::<ServerJsonRpcMessage>(CHANNEL_CAPACITY);
    state.sessions.inboxes.insert(
        id.clone(),
        Inbox {
            sender: inbox,
            owner,
        },
    );

    let mut from_client = from_client;
    let incoming = futures::stream::poll_fn(move |cx| from_client.poll_recv(cx));
    let transport = SinkStreamTransport::new(PollSender::new(to_client), incoming);
    let server = (state.make_server)(owner.owner());
    let session_id = id.clone();
    let sessions = state.sessions.clone();
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        match server.serve(transport).await {
            Ok(service) => {
                let cancel = service.cancellation_token();
                tokio::select! {
                    _ = service.waiting() => {}
                    () = shutdown.cancelled() => cancel.cancel(),
                }
            }
            Err(error) => {
                tracing::debug!(session = %session_id, error = %error, "legacy SSE session ended before its handshake")
            }
        }
        sessions.inboxes.remove(&session_id);
    });

    // The stream ends when the session does; when the client goes away, dropping the stream
    // (and the guard in it) removes the session, whose inbox then closes and ends it.
    let guard = SessionGuard {
        sessions: state.sessions.clone(),
        id: id.clone(),
    };
    let endpoint = Event::default()
        .event("endpoint")
        .data(format!("/messages?sessionId={id}"));
    let messages = futures::stream::poll_fn(move |cx| {
        let _alive = &guard;
        outbox.poll_recv(cx)
    })
    .filter_map(|message| async move {
        match serde_json::to_string(&message) {
            Ok(json) => Some(Ok::<_, Infallible>(
                Event::default().event("message").data(json),
            )),
            Err(error) => {
                tracing::error!(error = %error, "a message could not be encoded for SSE");
                None
            }
        }
    });
    let events =
        futures::stream::once(async move { Ok::<_, Infallible>(endpoint) }).chain(messages);
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Removes a session when its event stream is dropped.
struct SessionGuard {
    sessions: Arc<SseSessions>,
    id: String,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.sessions.inboxes.remove(&self.id);
    }
}

#[derive(Debug, Deserialize)]
pub struct SessionQuery {
    #[serde(rename = "sessionId")]
    session_id: Option<String>,
}

/// `POST /messages?sessionId=...`: one message for a session, answered on its stream.
pub async fn post(
    State(state): State<SseState>,
    Extension(credential): Extension<Credential>,
    Query(query): Query<SessionQuery>,
    body: axum::body::Bytes,
) -> Response {
    let Some(session_id) = query.session_id else {
        return (
            StatusCode::BAD_REQUEST,
            "`sessionId` is missing from the URL",
        )
            .into_response();
    };
    let message: ClientJsonRpcMessage = match serde_json::from_slice(&body) {
        Ok(message) => message,
        Err(error) => return super::json_rpc_error(-32600, &format!("invalid request: {error}")),
    };
    // A session opened with another credential is as unknown as one that never was.
    let Some(inbox) = state
        .sessions
        .inboxes
        .get(&session_id)
        .filter(|inbox| inbox.owner == credential)
        .map(|inbox| inbox.sender.clone())
    else {
        return (
            StatusCode::NOT_FOUND,
            format!("no session `{session_id}`: open one with GET /sse"),
        )
            .into_response();
    };
    match inbox.send(message).await {
        Ok(()) => StatusCode::ACCEPTED.into_response(),
        Err(_) => (
            StatusCode::NOT_FOUND,
            format!("session `{session_id}` has ended"),
        )
            .into_response(),
    }
}

/// Unguessable: whoever knows a session id can post into that session.
fn new_session_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
