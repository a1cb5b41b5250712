//! The stdio front: one client over stdin and stdout, served by rmcp, except that its plain
//! `tools/call` requests are taken off the line before rmcp parses them and forwarded as
//! text. They go through the same router, retries and relay as every call; only the parsing
//! into rmcp's types and the writing out again are skipped, which were most of conductor's
//! work per call (docs/performance.md). Everything else, and every call this path cannot
//! serve exactly as rmcp would, is rmcp's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use memchr::memmem;
use rmcp::ServiceExt;
use rmcp::model::{ProgressToken, ProtocolVersion, RequestId, ServerJsonRpcMessage, ServerResult};
use rmcp::service::{Peer, RoleServer, RunningService, ServerInitializeError};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ConductorServer, forward_call, tool_response};
use crate::router::{Answer, Caller, Router, ToolCall};
use crate::wire::{self, BoxFuture, LineTransport, Peek, Tap, Writer};

/// How long answers still owed may take once the client has closed its end, as rmcp gives
/// its own handlers.
const DRAIN: Duration = Duration::from_secs(5);

/// Serve one client over this process's stdin and stdout.
pub async fn serve_stdio(
    server: ConductorServer,
) -> Result<RunningService<RoleServer, ConductorServer>, ServerInitializeError> {
    // When stdin and stdout are pipes (as MCP hosts start servers) they are read and written
    // on the IO reactor; anything else (a terminal) falls back to blocking handles.
    let (read, write) = rmcp::transport::stdio_pipes();
    let writer = Writer::new(write);
    let front = Arc::new(Front {
        session: OnceLock::new(),
        writer: writer.clone(),
        calls: Arc::default(),
        tasks: TaskTracker::new(),
    });
    let transport = LineTransport::<RoleServer, _>::new(read, writer, front.clone());
    let service = server.clone().serve(transport).await?;
    front.open(server, service.peer());
    Ok(service)
}

/// Takes a client's plain tool calls off the line.
struct Front {
    /// Set once rmcp has completed the handshake with a client this path can serve; until
    /// then every line is rmcp's.
    session: OnceLock<Session>,
    writer: Writer,
    /// The calls in flight here, for the client's `notifications/cancelled`.
    calls: Arc<Mutex<HashMap<RequestId, CancellationToken>>>,
    /// The calls' tasks, awaited (a while) when the client closes its end.
    tasks: TaskTracker,
}

struct Session {
    server: ConductorServer,
    /// What each call's caller starts from: the client, its version and capabilities.
    caller: Caller,
}

/// A `tools/call`'s params, if they are only what this path forwards; anything else (a
/// retry with `requestState`, say) fails to parse and stays rmcp's.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlainParams<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    arguments: Option<&'a RawValue>,
    #[serde(rename = "_meta", default)]
    meta: Option<Meta>,
}

/// Of a request's `_meta`, what conductor acts on; the rest is not passed on (as rmcp's own
/// requests do not).
#[derive(Deserialize)]
struct Meta {
    #[serde(rename = "progressToken", default)]
    progress_token: Option<ProgressToken>,
}

#[derive(Deserialize)]
struct CancelledParams {
    #[serde(rename = "requestId")]
    request_id: RequestId,
}

impl Front {
    /// Start taking calls, if the client is one this path answers exactly as rmcp would:
    /// one that began with `initialize` on a version before 2026-07-28 (later clients may
    /// need `input_required` answers, and results marked `complete`; a session without
    /// `initialize` has no peer info).
    fn open(&self, server: ConductorServer, peer: &Peer<RoleServer>) {
        let Some(info) = peer.peer_info() else {
            return;
        };
        if info.protocol_version >= ProtocolVersion::V_2026_07_28 {
            return;
        }
        server.router.remember_client(peer);
        let caller = Caller {
            client: Some(peer.clone()),
            protocol: Some(info.protocol_version.clone()),
            capabilities: Some(info.capabilities.clone()),
            ..Caller::default()
        };
        let _ = self.session.set(Session { server, caller });
    }

    /// Take a plain call of a downstream tool: answer it from a task of its own.
    fn take_call(&self, session: &Session, line: &[u8]) -> bool {
        let Some(peek) = Peek::of(line) else {
            return false;
        };
        let (Some("tools/call"), Some(id_text), Some(id), Some(params)) = (
            peek.method.as_deref(),
            peek.id,
            peek.request_id(),
            peek.params,
        ) else {
            return false;
        };
        let Ok(params) = serde_json::from_str::<PlainParams>(params.get()) else {
            return false;
        };
        if !params.arguments.is_none_or(wire::is_object) || !session.server.proxies(&params.name) {
            return false;
        }
        let cancel = CancellationToken::new();
        if let Ok(mut calls) = self.calls.lock() {
            calls.insert(id.clone(), cancel.clone());
        }
        let call = ToolCall::Text {
            name: params.name.into_owned(),
            arguments: params
                .arguments
                .map(|arguments| Arc::from(arguments.to_owned())),
        };
        let caller = Caller {
            cancel,
            progress_token: params.meta.and_then(|meta| meta.progress_token),
            ..session.caller.clone()
        };
        let answering = Answering {
            router: session.server.router.clone(),
            writer: self.writer.clone(),
            calls: self.calls.clone(),
            id,
            id_text: id_text.to_owned(),
        };
        // Boxed: tokio moves a task's future several times as it starts and ends it, and this
        // one holds a whole call's state (docs/performance.md).
        self.tasks.spawn(Box::pin(answering.answer(call, caller)));
        true
    }

    /// Take the client's cancellation of a call this path is answering.
    fn take_cancel(&self, line: &[u8]) -> bool {
        let Some(peek) = Peek::of(line) else {
            return false;
        };
        let (Some("notifications/cancelled"), None, Some(params)) =
            (peek.method.as_deref(), peek.id, peek.params)
        else {
            return false;
        };
        let Ok(params) = serde_json::from_str::<CancelledParams>(params.get()) else {
            return false;
        };
        let cancel = self
            .calls
            .lock()
            .ok()
            .and_then(|calls| calls.get(&params.request_id).cloned());
        match cancel {
            Some(cancel) => {
                cancel.cancel();
                true
            }
            None => false,
        }
    }
}

impl Tap for Front {
    fn take(&self, line: &[u8]) -> bool {
        let Some(session) = self.session.get() else {
            return false;
        };
        // Most lines are neither: skip the parse for them.
        if memmem::find(line, b"\"tools/call\"").is_some() {
            return self.take_call(session, line);
        }
        if memmem::find(line, b"\"notifications/cancelled\"").is_some() {
            return self.take_cancel(line);
        }
        false
    }

    fn ended(&self) -> BoxFuture {
        self.tasks.close();
        let tasks = self.tasks.clone();
        Box::pin(async move {
            if tokio::time::timeout(DRAIN, tasks.wait()).await.is_err() {
                tracing::warn!("tool calls still unanswered when the client closed its end");
            }
        })
    }
}

/// What answering one call needs.
struct Answering {
    router: Router,
    writer: Writer,
    calls: Arc<Mutex<HashMap<RequestId, CancellationToken>>>,
    id: RequestId,
    /// The id as the client wrote it, to answer with.
    id_text: Box<RawValue>,
}

impl Answering {
    async fn answer(self, call: ToolCall, caller: Caller) {
        let outcome = forward_call(&self.router, call, &caller).await;
        if let Ok(mut calls) = self.calls.lock() {
            calls.remove(&self.id);
        }
        // A cancelled request gets no answer.
        if caller.cancel.is_cancelled() {
            return;
        }
        let line = match outcome {
            Ok(Answer::ToolResult(result)) => wire::response_line(&self.id_text, &result),
            outcome => {
                // Failures, and answers rmcp parsed (a server without a text lane): shaped as
                // the handler shapes them, for a client before 2026-07-28.
                let message = match tool_response(outcome.and_then(Answer::into_result)) {
                    Ok(response) => {
                        let mut result = ServerResult::from(response);
                        result.strip_result_type_for_legacy_peer();
                        result.strip_non_object_output_for_legacy_peer();
                        ServerJsonRpcMessage::response(result, self.id)
                    }
                    Err(error) => ServerJsonRpcMessage::error(error, Some(self.id)),
                };
                match serde_json::to_vec(&message) {
                    Ok(line) => line,
                    Err(error) => {
                        tracing::error!(error = %error, "could not write an answer");
                        return;
                    }
                }
            }
        };
        if let Err(error) = self.writer.write_line(line).await {
            tracing::debug!(error = %error, "could not answer a tool call");
        }
    }
}
