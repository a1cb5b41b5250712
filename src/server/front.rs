//! The front: a client's plain `tools/call` requests taken before rmcp parses them and
//! forwarded as text, over stdio (off the line) and Streamable HTTP (out of a POST's body).
//! They go through the same router, retries and relay as every call; only the parsing into
//! rmcp's types and the writing out again are skipped, which were most of conductor's work
//! per call (docs/performance.md). Everything else, and every call this path cannot answer
//! exactly as rmcp would, is rmcp's.

use std::future::Future;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use memchr::memmem::Finder;
use rmcp::ServiceExt;
use rmcp::model::{ProgressToken, ProtocolVersion, RequestId, ServerJsonRpcMessage, ServerResult};
use rmcp::service::{Peer, RoleServer, RunningService, ServerInitializeError};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ConductorServer, forward_call, tool_response};
use crate::maps::HashMap;
use crate::relay::ProgressTo;
use crate::router::{Answer, Caller, Router, ToolCall};
use crate::wire::{self, BoxFuture, LineTransport, Peek, Tap, Writer};

/// How long answers still owed may take once a stdio client has closed its end, as rmcp
/// gives its own handlers.
const DRAIN: Duration = Duration::from_secs(5);

/// The fronts of HTTP sessions, by session id. Weak: a front goes with its session.
#[derive(Debug, Default)]
pub struct Fronts {
    sessions: dashmap::DashMap<String, Registered>,
}

#[derive(Debug)]
struct Registered {
    front: std::sync::Weak<Front>,
    /// When the HTTP layer last told rmcp the session is in use (see [`Fronts::due`]).
    touched: Mutex<std::time::Instant>,
}

impl Fronts {
    pub fn register(&self, session: &str, front: &Arc<Front>) {
        // Sessions end without telling: forget those gone whenever one begins.
        self.sessions
            .retain(|_, registered| registered.front.strong_count() > 0);
        self.sessions.insert(
            session.to_owned(),
            Registered {
                front: Arc::downgrade(front),
                touched: Mutex::new(std::time::Instant::now()),
            },
        );
    }

    /// The front of a live session.
    pub fn get(&self, session: &str) -> Option<Arc<Front>> {
        self.sessions.get(session)?.front.upgrade()
    }

    /// Whether the session is due to be shown to rmcp as in use again, at most once per
    /// `every` (rmcp closes a session it has seen no traffic on for a while).
    pub fn due(&self, session: &str, every: Duration) -> bool {
        let Some(registered) = self.sessions.get(session) else {
            return false;
        };
        let Ok(mut touched) = registered.touched.lock() else {
            return false;
        };
        if touched.elapsed() < every {
            return false;
        }
        *touched = std::time::Instant::now();
        true
    }
}

/// One client session's front: what its calls are made with, and its calls in flight.
#[derive(Debug)]
pub struct Front {
    router: Router,
    /// What each call's caller starts from: the client, its version and capabilities.
    caller: Caller,
    /// The calls in flight here, for the client's `notifications/cancelled`.
    calls: Mutex<HashMap<RequestId, CancellationToken>>,
}

/// A request with the params of a plain `tools/call`.
#[derive(Deserialize)]
struct PlainCall<'a> {
    #[serde(borrow)]
    id: &'a RawValue,
    #[serde(borrow)]
    method: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    params: PlainParams<'a>,
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
    /// The front of a client session, if the client is one this path answers exactly as
    /// rmcp would: one that began with `initialize` on a version before 2026-07-28 (later
    /// clients may need `input_required` answers, and results marked `complete`; a session
    /// without `initialize` has no peer info).
    pub fn for_client(server: &ConductorServer, peer: &Peer<RoleServer>) -> Option<Front> {
        let info = peer.peer_info()?;
        if info.protocol_version >= ProtocolVersion::V_2026_07_28 {
            return None;
        }
        server.router.remember_client(peer);
        Some(Front {
            router: server.router.clone(),
            caller: Caller {
                client: Some(peer.clone()),
                protocol: Some(info.protocol_version.clone()),
                capabilities: Some(Arc::new(info.capabilities.clone())),
                ..Caller::default()
            },
            calls: Mutex::default(),
        })
    }

    /// The protocol version the client agreed on.
    pub fn protocol(&self) -> Option<&ProtocolVersion> {
        self.caller.protocol.as_ref()
    }

    /// Whether a message may be a plain call or a cancellation of one (a cheap look at its
    /// text, for the many messages that are neither).
    pub fn may_take(message: &[u8]) -> bool {
        // Built once: a finder's set-up costs more than searching a short message.
        static CALL: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"tools/call\""));
        static CANCEL: LazyLock<Finder> =
            LazyLock::new(|| Finder::new(b"\"notifications/cancelled\""));
        CALL.find(message).is_some() || CANCEL.find(message).is_some()
    }

    /// Take a plain call of a downstream tool: the returned future answers it, with the
    /// response's text (`None` for a call the client cancelled, which gets no answer).
    /// `None` when the message is not one this path takes. The call's progress goes to
    /// `progress_to` if given, else to the client's session.
    pub fn take_call(
        self: &Arc<Self>,
        message: &str,
        progress_to: Option<ProgressTo>,
    ) -> Option<impl Future<Output = Option<Vec<u8>>> + Send + 'static> {
        // One pass over the message: anything but a plain call fails to parse.
        let PlainCall { id, method, params } = serde_json::from_str(message).ok()?;
        let id_text = id;
        let id: RequestId = wire::request_id(id)?;
        if method != "tools/call"
            || !params.arguments.is_none_or(wire::is_object)
            || !self.proxies(&params.name)
        {
            return None;
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
            progress_to,
            ..self.caller.clone()
        };
        let answering = Answering {
            front: self.clone(),
            id,
            id_text: id_text.to_owned(),
        };
        // Boxed: tokio moves a task's future several times as it starts and ends it, and this
        // one holds a whole call's state (docs/performance.md).
        Some(Box::pin(answering.answer(call, caller)))
    }

    /// Take the client's cancellation of a call this front is answering.
    pub fn take_cancel(&self, message: &str) -> bool {
        let Some(peek) = Peek::of(message) else {
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

    /// Whether a call of `name` goes to a downstream as it is (not a workflow conductor runs).
    fn proxies(&self, name: &str) -> bool {
        let registry = self.router.registry();
        name != crate::orchestrate::TOOL_NAME
            && registry.catalog().tool(name).is_some()
            && crate::orchestrate::saved::find(&registry.config(), name).is_none()
    }
}

/// One call being answered.
struct Answering {
    front: Arc<Front>,
    id: RequestId,
    /// The id as the client wrote it, to answer with.
    id_text: Box<RawValue>,
}

impl Answering {
    async fn answer(self, call: ToolCall, caller: Caller) -> Option<Vec<u8>> {
        let outcome = forward_call(&self.front.router, call, &caller).await;
        if let Ok(mut calls) = self.front.calls.lock() {
            calls.remove(&self.id);
        }
        // A cancelled request gets no answer.
        if caller.cancel.is_cancelled() {
            return None;
        }
        if let Ok(Answer::ToolResult(result)) = &outcome {
            return Some(wire::response_line(&self.id_text, result));
        }
        // Failures, and answers rmcp parsed (a server without a text lane): shaped as the
        // handler shapes them, for a client before 2026-07-28.
        let message = match tool_response(outcome.and_then(Answer::into_result)) {
            Ok(response) => {
                let mut result = ServerResult::from(response);
                result.strip_result_type_for_legacy_peer();
                result.strip_non_object_output_for_legacy_peer();
                ServerJsonRpcMessage::response(result, self.id)
            }
            Err(error) => ServerJsonRpcMessage::error(error, Some(self.id)),
        };
        serde_json::to_vec(&message)
            .inspect_err(|error| tracing::error!(error = %error, "could not write an answer"))
            .ok()
    }
}

/// Serve one client over this process's stdin and stdout.
pub async fn serve_stdio(
    server: ConductorServer,
) -> Result<RunningService<RoleServer, ConductorServer>, ServerInitializeError> {
    // When stdin and stdout are pipes (as MCP hosts start servers) they are read and written
    // on the IO reactor; anything else (a terminal) falls back to blocking handles.
    let (read, write) = rmcp::transport::stdio_pipes();
    let writer = Writer::new(write);
    let tap = Arc::new(StdioTap {
        front: OnceLock::new(),
        writer: writer.clone(),
        tasks: TaskTracker::new(),
    });
    let transport = LineTransport::<RoleServer, _>::new(read, writer, tap.clone());
    let service = server.clone().serve(transport).await?;
    if let Some(front) = Front::for_client(&server, service.peer()) {
        let _ = tap.front.set(Arc::new(front));
    }
    Ok(service)
}

/// Takes a stdio client's plain tool calls off the line, and answers each from a task.
struct StdioTap {
    /// Set once rmcp has completed the handshake with a client the front can serve; until
    /// then every line is rmcp's.
    front: OnceLock<Arc<Front>>,
    writer: Writer,
    /// The calls' tasks, awaited (a while) when the client closes its end.
    tasks: TaskTracker,
}

impl Tap for StdioTap {
    fn take(&self, line: &str) -> bool {
        let Some(front) = self.front.get() else {
            return false;
        };
        if !Front::may_take(line.as_bytes()) {
            return false;
        }
        let Some(answering) = front.take_call(line, None) else {
            return front.take_cancel(line);
        };
        let writer = self.writer.clone();
        self.tasks.spawn(async move {
            if let Some(answer) = answering.await
                && let Err(error) = writer.write_line(answer).await
            {
                tracing::debug!(error = %error, "could not answer a tool call");
            }
        });
        true
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
