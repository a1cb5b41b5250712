//! The front: a client's plain `tools/call` requests taken before rmcp parses them, over
//! stdio (off the line) and Streamable HTTP (out of a POST's body), and forwarded as text, or
//! run as workflows (`orchestrate`, saved workflows). They go through the same router,
//! retries, relay and orchestrator as every call; only the parsing into rmcp's types and the
//! writing out again are skipped, which were most of conductor's work per call
//! (docs/performance.md). Everything else, and every call this path cannot answer exactly as
//! rmcp would, is rmcp's.
#![allow(
    deprecated,
    reason = "logging is deprecated in 2026-07-28; its clients still name a level per request"
)]

use std::sync::{Arc, LazyLock, Mutex, OnceLock};
use std::time::Duration;

use memchr::memmem::Finder;
use rmcp::ErrorData as McpError;
use rmcp::ServiceExt;
use rmcp::model::{
    CacheScope, CallToolResponse, ClientCapabilities, ErrorCode, JsonObject, ListToolsResult,
    LoggingLevel, ProgressToken, ProtocolVersion, RequestId, ServerJsonRpcMessage, ServerResult,
};
use rmcp::service::{Peer, RoleServer, RunningService, ServerInitializeError};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tasks::{self, ClientTasks};
use super::{
    ConductorServer, PAGE_SIZE, ProgressTarget, bridged, forward_call, list_cache_hint,
    listed_tools, page_offset, run_workflow_call, tool_response,
};
use crate::catalog::Catalog;
use crate::config::Config;
use crate::downstream::ListKind;
use crate::maps::HashMap;
use crate::orchestrate::{self, Orchestrator, saved};
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
    /// The `tools/list` pages every session's front answers from.
    pages: Arc<ToolPages>,
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
    /// The session's orchestrator, for `orchestrate` and saved workflows.
    orchestrator: Arc<Orchestrator>,
    /// What each call's caller starts from: the client, its version and capabilities.
    caller: Caller,
    /// The calls in flight here, for the client's `notifications/cancelled`.
    calls: Mutex<HashMap<RequestId, CancellationToken>>,
    /// What its `tools/list` requests are answered from.
    pages: Arc<ToolPages>,
    /// A 2026-07-28 session, begun without `initialize`: each request names its protocol
    /// version and the client's capabilities in its `_meta`.
    per_request: Option<PerRequest>,
    /// The tasks this session's client made of its calls (2025-11-25).
    tasks: ClientTasks,
}

/// What a 2026-07-28 session's requests carry, read once: clients send the same
/// capabilities with every request.
#[derive(Debug, Default)]
struct PerRequest {
    /// The last capabilities' text and what it says.
    capabilities: Mutex<Option<(Box<str>, Arc<ClientCapabilities>)>>,
}

impl PerRequest {
    /// The capabilities a request's `_meta` declares, or `None` if they are not rmcp's type.
    fn capabilities(&self, text: &RawValue) -> Option<Arc<ClientCapabilities>> {
        let mut last = self.capabilities.lock().ok()?;
        if let Some((kept, capabilities)) = last.as_ref()
            && **kept == *text.get()
        {
            return Some(capabilities.clone());
        }
        let capabilities: Arc<ClientCapabilities> =
            Arc::new(serde_json::from_str(text.get()).ok()?);
        *last = Some((text.get().into(), capabilities.clone()));
        Some(capabilities)
    }
}

/// Conductor's `tools/list` as text, page by page, for clients before 2026-07-28: kept until
/// the catalog or the config changes, where rmcp's path clones and serialises every tool of
/// a page for every request (docs/performance.md).
#[derive(Debug, Default)]
pub struct ToolPages {
    rendered: Mutex<Option<Arc<Rendered>>>,
}

/// The pages of one catalog and config.
#[derive(Debug)]
struct Rendered {
    catalog: Arc<Catalog>,
    config: Arc<Config>,
    /// Each page's `tools` array, as rmcp writes it for a client before 2026-07-28.
    pages: Vec<Box<RawValue>>,
}

impl ToolPages {
    /// The pages of this catalog and config: those kept, or made now.
    fn of(&self, catalog: Arc<Catalog>, config: Arc<Config>) -> Option<Arc<Rendered>> {
        let mut kept = self.rendered.lock().ok()?;
        if let Some(rendered) = kept.as_ref()
            && Arc::ptr_eq(&rendered.catalog, &catalog)
            && Arc::ptr_eq(&rendered.config, &config)
        {
            return Some(rendered.clone());
        }
        // Through rmcp's own rewriting for older clients, so the text is what rmcp would send.
        let mut all = ServerResult::ListToolsResult(ListToolsResult::with_all_items(
            listed_tools(&catalog, &config).collect(),
        ));
        all.strip_non_object_output_for_legacy_peer();
        let ServerResult::ListToolsResult(all) = all else {
            return None;
        };
        // With each downstream tool's `execution`, which rmcp's `Tool` has no place for.
        let executions = catalog.tools().iter().map(|entry| entry.execution.as_ref());
        let listed: Vec<Listed> = all
            .tools
            .iter()
            .zip(executions.chain(std::iter::repeat(None)))
            .map(|(tool, execution)| Listed { tool, execution })
            .collect();
        let pages = listed
            .chunks(PAGE_SIZE)
            .map(|page| serde_json::value::to_raw_value(page).ok())
            .collect::<Option<Vec<_>>>()?;
        let rendered = Arc::new(Rendered {
            catalog,
            config,
            pages,
        });
        *kept = Some(rendered.clone());
        Some(rendered)
    }
}

/// A listed tool, as rmcp writes it, with the `execution` its downstream gave.
#[derive(Serialize)]
struct Listed<'a> {
    #[serde(flatten)]
    tool: &'a rmcp::model::Tool,
    #[serde(skip_serializing_if = "Option::is_none")]
    execution: Option<&'a serde_json::Value>,
}

/// A `tools/list` request as clients send it.
#[derive(Deserialize)]
struct PlainList<'a> {
    #[serde(borrow)]
    id: &'a RawValue,
    #[serde(borrow)]
    method: std::borrow::Cow<'a, str>,
    #[serde(borrow, default)]
    params: Option<ListParams<'a>>,
}

/// Its params, if they are only a cursor (and a `_meta`, which a list does not act on).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams<'a> {
    #[serde(borrow, default)]
    cursor: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "_meta", default)]
    _meta: Option<IgnoredAny>,
}

/// A `tools/list` result, as rmcp writes one for a client before 2026-07-28.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolsPage<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_scope: Option<CacheScope>,
    tools: &'a RawValue,
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
    #[serde(borrow, rename = "_meta", default)]
    meta: Option<Meta<'a>>,
    /// Asks for the call to be made a task (2025-11-25).
    #[serde(default)]
    task: Option<TaskParams>,
}

#[derive(Deserialize)]
struct TaskParams {
    /// How long the client wants the task kept, in milliseconds.
    #[serde(default)]
    ttl: Option<u64>,
}

/// A `tasks/*` request of a client before 2026-07-28.
#[derive(Deserialize)]
struct TaskRequest<'a> {
    #[serde(borrow)]
    id: &'a RawValue,
    #[serde(borrow)]
    method: std::borrow::Cow<'a, str>,
    #[serde(default)]
    params: Option<TaskRequestParams>,
}

#[derive(Deserialize)]
struct TaskRequestParams {
    #[serde(rename = "taskId", default)]
    task_id: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

/// Of a request's `_meta`, what conductor acts on; the rest is not passed on (as rmcp's own
/// requests do not).
#[derive(Deserialize)]
struct Meta<'a> {
    #[serde(rename = "progressToken", default)]
    progress_token: Option<ProgressToken>,
    /// A 2026-07-28 request's own protocol version and client capabilities.
    #[serde(rename = "io.modelcontextprotocol/protocolVersion", borrow, default)]
    protocol_version: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "io.modelcontextprotocol/clientCapabilities", borrow, default)]
    client_capabilities: Option<&'a RawValue>,
    /// The lowest level of log messages a 2026-07-28 request asks for.
    #[serde(rename = "io.modelcontextprotocol/logLevel", default)]
    log_level: Option<LoggingLevel>,
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
        let caller = Caller {
            client: Some(peer.clone()),
            protocol: Some(info.protocol_version.clone()),
            capabilities: Some(Arc::new(info.capabilities.clone())),
            ..Caller::default()
        };
        Some(Front::new(server, peer, caller, None))
    }

    /// The front of a stdio client that began without `initialize` (2026-07-28): rmcp
    /// checked its first request's metadata; the front takes only requests that name
    /// 2026-07-28 and the client's capabilities, which is what rmcp's handler reads them by.
    pub fn per_request(server: &ConductorServer, peer: &Peer<RoleServer>) -> Option<Front> {
        if peer.peer_info().is_some() {
            return None;
        }
        let caller = Caller {
            client: Some(peer.clone()),
            ..Caller::default()
        };
        Some(Front::new(
            server,
            peer,
            caller,
            Some(PerRequest::default()),
        ))
    }

    /// A front making its calls as `caller`, for the session of `peer`, whose client it
    /// remembers for what downstreams send back during workflow steps.
    fn new(
        server: &ConductorServer,
        peer: &Peer<RoleServer>,
        caller: Caller,
        per_request: Option<PerRequest>,
    ) -> Front {
        server.router.remember_client(peer);
        let pages = server
            .fronts
            .as_ref()
            .map_or_else(Arc::default, |fronts| fronts.pages.clone());
        Front {
            router: server.router.clone(),
            orchestrator: server.orchestrator.clone(),
            caller,
            calls: Mutex::default(),
            pages,
            per_request,
            tasks: ClientTasks::default(),
        }
    }

    /// The protocol version the client agreed on.
    pub fn protocol(&self) -> Option<&ProtocolVersion> {
        self.caller.protocol.as_ref()
    }

    /// Whether a message may be a plain call, a cancellation of one or a `tools/list` (a
    /// cheap look at its text, for the many messages that are none of them).
    pub fn may_take(message: &[u8]) -> bool {
        // Built once: a finder's set-up costs more than searching a short message.
        static CALL: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"tools/call\""));
        static CANCEL: LazyLock<Finder> =
            LazyLock::new(|| Finder::new(b"\"notifications/cancelled\""));
        static LIST: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"tools/list\""));
        static TASKS: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"tasks/"));
        CALL.find(message).is_some()
            || CANCEL.find(message).is_some()
            || LIST.find(message).is_some()
            || TASKS.find(message).is_some()
    }

    /// Take a plain call of a tool (a downstream's, `orchestrate` or a saved workflow): the
    /// returned future answers it, with the response's text (`None` for a call the client
    /// cancelled, which gets no answer). `None` when the message is not one this path takes.
    /// The call's progress goes to `progress_to` if given, else to the client's session.
    pub fn take_call(
        self: &Arc<Self>,
        message: &str,
        progress_to: Option<ProgressTo>,
    ) -> Option<futures::future::BoxFuture<'static, Option<Vec<u8>>>> {
        // One pass over the message: anything but a plain call fails to parse.
        let Ok(PlainCall { id, method, params }) = serde_json::from_str(message) else {
            return self.take_task_request(message);
        };
        let id_text = id;
        let id: RequestId = wire::request_id(id)?;
        if method != "tools/call" || !params.arguments.is_none_or(wire::is_object) {
            return None;
        }
        let target = self.target(&params.name)?;
        let (progress_token, caller) = self.caller_for(params.meta)?;
        let workflow_arguments = match (&target, params.arguments) {
            (Target::Downstream, _) | (_, None) => JsonObject::new(),
            (_, Some(arguments)) => serde_json::from_str(arguments.get()).ok()?,
        };
        if let Some(task) = params.task {
            // A 2026-07-28 client's tasks are rmcp's (the tasks extension).
            if self.per_request.is_some() {
                return None;
            }
            let call = PendingCall {
                target,
                name: params.name.into_owned(),
                arguments: params
                    .arguments
                    .map(|arguments| Arc::from(arguments.to_owned())),
                workflow_arguments,
                progress_token,
                caller,
            };
            let front = self.clone();
            let created = self
                .tasks
                .start(task.ttl, move |cancel| call.outcome(front, cancel));
            let answer = serde_json::value::to_raw_value(&created)
                .ok()
                .map(|created| wire::response_line(id_text, &created));
            return Some(Box::pin(std::future::ready(answer)));
        }
        let cancel = CancellationToken::new();
        if let Ok(mut calls) = self.calls.lock() {
            calls.insert(id.clone(), cancel.clone());
        }
        let answering = Answering {
            front: self.clone(),
            id,
            id_text: id_text.to_owned(),
            modern: caller.takes_input_required(),
        };
        // Boxed: tokio moves a task's future several times as it starts and ends it, and this
        // one holds a whole call's state (docs/performance.md).
        match target {
            Target::Downstream => {
                let call = ToolCall::Text {
                    name: params.name.into_owned(),
                    arguments: params
                        .arguments
                        .map(|arguments| Arc::from(arguments.to_owned())),
                };
                let caller = Caller {
                    cancel,
                    progress_token,
                    progress_to,
                    ..caller
                };
                Some(Box::pin(answering.answer(call, caller)))
            }
            Target::Workflow(config) => {
                let progress = self.workflow_progress(progress_token, progress_to);
                let name = params.name.into_owned();
                Some(Box::pin(answering.run_workflow(
                    config,
                    name,
                    workflow_arguments,
                    progress,
                    cancel,
                )))
            }
        }
    }

    /// Answer a `tasks/*` request of a client before 2026-07-28 about the tasks it made of
    /// its calls. `None` for anything else.
    fn take_task_request(
        &self,
        message: &str,
    ) -> Option<futures::future::BoxFuture<'static, Option<Vec<u8>>>> {
        if self.per_request.is_some() {
            return None;
        }
        let TaskRequest { id, method, params } = serde_json::from_str(message).ok()?;
        let id_text: Box<RawValue> = id.to_owned();
        let id = wire::request_id(id)?;
        let params = params.unwrap_or(TaskRequestParams {
            task_id: None,
            cursor: None,
        });
        let task_id = || {
            params.task_id.clone().ok_or_else(|| {
                McpError::invalid_params(format!("`{method}` needs a `taskId`"), None)
            })
        };
        let answer = move |outcome: Result<Box<RawValue>, McpError>| match outcome {
            Ok(result) => Some(wire::response_line(&id_text, &result)),
            Err(error) => {
                serde_json::to_vec(&ServerJsonRpcMessage::error(error, Some(id.clone()))).ok()
            }
        };
        let value = |result: Result<serde_json::Value, McpError>| {
            result.and_then(|value| {
                serde_json::value::to_raw_value(&value)
                    .map_err(|error| McpError::internal_error(error.to_string(), None))
            })
        };
        let now = |outcome| Some(Box::pin(std::future::ready(answer(outcome))) as _);
        match &*method {
            "tasks/get" => now(value(task_id().and_then(|task| self.tasks.get(&task)))),
            "tasks/list" => now(value(self.tasks.list(params.cursor.as_deref()))),
            "tasks/cancel" => now(value(task_id().and_then(|task| self.tasks.cancel(&task)))),
            "tasks/result" => {
                let waiting = task_id().map(|task| self.tasks.result(&task));
                Some(Box::pin(async move {
                    let outcome = match waiting {
                        Ok(waiting) => waiting.await,
                        Err(error) => Err(error),
                    };
                    answer(outcome)
                }))
            }
            _ => None,
        }
    }

    /// Answer a plain `tools/list` from the pages kept as text: the response's line. `None`
    /// when the message is not one, or names a page this path does not keep (rmcp answers it,
    /// or refuses a cursor conductor did not give).
    pub fn take_list(&self, message: &str) -> Option<Vec<u8>> {
        // The pages are the older clients' shape; a 2026-07-28 list is rmcp's, and so is one
        // that waits for servers still starting.
        if self.per_request.is_some() || self.router.registry().list_wait().is_some() {
            return None;
        }
        let PlainList { id, method, params } = serde_json::from_str(message).ok()?;
        wire::request_id(id)?;
        if method != "tools/list" {
            return None;
        }
        let offset = page_offset(params.and_then(|params| params.cursor).as_deref()).ok()?;
        if offset % PAGE_SIZE != 0 {
            return None;
        }
        let registry = self.router.registry();
        let rendered = self.pages.of(registry.catalog(), registry.config())?;
        let index = offset / PAGE_SIZE;
        let tools = rendered.pages.get(index)?;
        let (ttl_ms, cache_scope) = list_cache_hint(&self.router, ListKind::Tools);
        let page = ToolsPage {
            next_cursor: (index + 1 < rendered.pages.len())
                .then(|| format!("offset:{}", offset + PAGE_SIZE)),
            ttl_ms,
            cache_scope,
            tools,
        };
        let result = serde_json::value::to_raw_value(&page).ok()?;
        Some(wire::response_line(id, &result))
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

    /// A call's progress token and the caller its request makes, as rmcp's handler would
    /// make it; `None` for a request whose metadata this path does not read as rmcp does.
    fn caller_for(&self, meta: Option<Meta<'_>>) -> Option<(Option<ProgressToken>, Caller)> {
        let Some(meta) = meta else {
            // Without `_meta` a 2026-07-28 request names no version: rmcp's to answer.
            return self
                .per_request
                .is_none()
                .then(|| (None, self.caller.clone()));
        };
        let caller = match &self.per_request {
            // A version of the request's own would win over the session's in rmcp.
            None if meta.protocol_version.is_some() || meta.client_capabilities.is_some() => {
                return None;
            }
            None => self.caller.clone(),
            Some(per_request) => {
                if meta.protocol_version.as_deref() != Some(ProtocolVersion::V_2026_07_28.as_str())
                {
                    return None;
                }
                Caller {
                    protocol: Some(ProtocolVersion::V_2026_07_28),
                    capabilities: Some(per_request.capabilities(meta.client_capabilities?)?),
                    log_level: meta.log_level,
                    ..self.caller.clone()
                }
            }
        };
        Some((meta.progress_token, caller))
    }

    /// What a call of `name` is, if it is a tool: a workflow conductor runs, or a
    /// downstream's tool.
    fn target(&self, name: &str) -> Option<Target> {
        let registry = self.router.registry();
        if name == orchestrate::TOOL_NAME {
            return Some(Target::Workflow(None));
        }
        let config = registry.config();
        if saved::find(&config, name).is_some() {
            return Some(Target::Workflow(Some(config)));
        }
        // A name not (yet) in the catalog may be a tool of a server still starting: the
        // router waits for it, and refuses it as rmcp's path would if it never comes.
        let starting = || {
            registry.list_wait().is_some()
                || registry
                    .not_offering(name)
                    .is_some_and(|server| registry.is_starting(&server))
        };
        (registry.catalog().tool(name).is_some() || starting()).then_some(Target::Downstream)
    }
}

impl Front {
    /// Where a workflow run for this session's client reports progress: to `token`, if the
    /// call gave one, on the call's own stream (`progress_to`) or the client's session.
    fn workflow_progress(
        &self,
        token: Option<ProgressToken>,
        progress_to: Option<ProgressTo>,
    ) -> Option<ProgressTarget> {
        token
            .zip(self.caller.client.clone())
            .map(|(token, peer)| ProgressTarget {
                peer,
                token,
                progress_to,
            })
    }

    /// Run `orchestrate`, or the saved workflow `name` of `config`, as the handler does.
    async fn run_workflow(
        &self,
        config: Option<Arc<Config>>,
        name: &str,
        arguments: JsonObject,
        progress: Option<ProgressTarget>,
        cancel: CancellationToken,
    ) -> rmcp::model::CallToolResult {
        let saved = config
            .as_ref()
            .and_then(|config| Some((config, saved::find(config, name)?)));
        run_workflow_call(
            &self.router,
            &self.orchestrator,
            saved,
            arguments,
            progress,
            cancel,
        )
        .await
    }
}

/// A tool call's answer as rmcp writes it for a client before 2026-07-28.
fn for_legacy_client(response: CallToolResponse) -> ServerResult {
    let mut result = ServerResult::from(response);
    result.strip_result_type_for_legacy_peer();
    result.strip_non_object_output_for_legacy_peer();
    result
}

/// A call made a task of, to be run once the task is answered.
struct PendingCall {
    target: Target,
    name: String,
    arguments: Option<Arc<RawValue>>,
    workflow_arguments: JsonObject,
    progress_token: Option<ProgressToken>,
    caller: Caller,
}

impl PendingCall {
    /// Run the call as a task's, cancelled with it: what its client gets from
    /// `tasks/result`, shaped as for a client before 2026-07-28. Its progress goes to the
    /// client's session, as the call's own answer has gone already.
    async fn outcome(self, front: Arc<Front>, cancel: CancellationToken) -> tasks::Outcome {
        let response = match self.target {
            Target::Downstream => {
                let call = ToolCall::Text {
                    name: self.name,
                    arguments: self.arguments,
                };
                let caller = Caller {
                    cancel,
                    progress_token: self.progress_token,
                    ..self.caller
                };
                match forward_call(&front.router, call, &caller).await {
                    Ok(Answer::ToolResult(result)) => return Ok(result),
                    outcome => tool_response(outcome.and_then(Answer::into_result)),
                }
            }
            Target::Workflow(config) => {
                let progress = front.workflow_progress(self.progress_token, None);
                let result = front
                    .run_workflow(
                        config,
                        &self.name,
                        self.workflow_arguments,
                        progress,
                        cancel,
                    )
                    .await;
                Ok(CallToolResponse::Complete(result))
            }
        };
        serde_json::value::to_raw_value(&for_legacy_client(response?))
            .map_err(|error| McpError::internal_error(error.to_string(), None))
    }
}

/// What a plain call calls.
enum Target {
    /// A downstream's tool, forwarded as text.
    Downstream,
    /// `orchestrate`, or a saved workflow of this config.
    Workflow(Option<Arc<Config>>),
}

/// One call being answered.
struct Answering {
    front: Arc<Front>,
    id: RequestId,
    /// The id as the client wrote it, to answer with.
    id_text: Box<RawValue>,
    /// The client speaks 2026-07-28: results say `resultType`, keep their shape, and a
    /// downstream's requests come back as `input_required`.
    modern: bool,
}

impl Answering {
    async fn answer(self, call: ToolCall, caller: Caller) -> Option<Vec<u8>> {
        let outcome = if self.modern {
            // Through the bridge, as the handler's calls of 2026-07-28 clients go.
            let router = self.front.router.clone();
            bridged(&self.front.router, None, &caller, |caller| async move {
                forward_call(&router, call, &caller).await
            })
            .await
        } else {
            forward_call(&self.front.router, call, &caller).await
        };
        if !self.owes_answer(&caller.cancel) {
            return None;
        }
        if let Ok(Answer::ToolResult(result)) = &outcome {
            if !self.modern {
                return Some(wire::response_line(&self.id_text, result));
            }
            if let Some(line) = wire::complete_response_line(&self.id_text, result) {
                return Some(line);
            }
        }
        // Failures, and answers rmcp parsed (a server without a text lane).
        self.shaped(tool_response(outcome.and_then(Answer::into_result)))
    }

    /// Run `orchestrate`, or the saved workflow `name` of `config`, as the handler does.
    async fn run_workflow(
        self,
        config: Option<Arc<Config>>,
        name: String,
        arguments: JsonObject,
        progress: Option<ProgressTarget>,
        cancel: CancellationToken,
    ) -> Option<Vec<u8>> {
        let result = self
            .front
            .run_workflow(config, &name, arguments, progress, cancel.clone())
            .await;
        if !self.owes_answer(&cancel) {
            return None;
        }
        self.shaped(Ok(CallToolResponse::Complete(result)))
    }

    /// The call is over: forget it, and say whether the client still wants its answer (a
    /// cancelled request gets none).
    fn owes_answer(&self, cancel: &CancellationToken) -> bool {
        if let Ok(mut calls) = self.front.calls.lock() {
            calls.remove(&self.id);
        }
        !cancel.is_cancelled()
    }

    /// The answer's line, shaped as rmcp shapes the handler's answers for the client's era.
    fn shaped(self, response: Result<CallToolResponse, McpError>) -> Option<Vec<u8>> {
        let message = match response {
            Ok(response) if self.modern => {
                let mut result = ServerResult::from(response);
                result.fill_missing_cache_hints();
                ServerJsonRpcMessage::response(result, self.id)
            }
            Ok(response) => ServerJsonRpcMessage::response(for_legacy_client(response), self.id),
            Err(mut error) => {
                if self.modern && error.code == ErrorCode::RESOURCE_NOT_FOUND {
                    error.code = ErrorCode::INVALID_PARAMS;
                }
                ServerJsonRpcMessage::error(error, Some(self.id))
            }
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
    let max_line = server.router.registry().config().max_message_bytes;
    // When stdin and stdout are pipes (as MCP hosts start servers) they are read and written
    // on the IO reactor; anything else (a terminal) falls back to blocking handles.
    let (read, write) = rmcp::transport::stdio_pipes();
    let writer = Writer::new(write);
    let tap = Arc::new(StdioTap {
        front: OnceLock::new(),
        writer: writer.clone(),
        tasks: TaskTracker::new(),
        max_line,
    });
    let transport = LineTransport::<RoleServer, _>::new(read, writer, tap.clone(), max_line);
    let service = server.clone().serve(transport).await?;
    let peer = service.peer();
    if let Some(front) =
        Front::for_client(&server, peer).or_else(|| Front::per_request(&server, peer))
    {
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
    /// The longest message read from the client.
    max_line: usize,
}

impl Tap for StdioTap {
    fn take(&self, line: &str) -> bool {
        let Some(front) = self.front.get() else {
            return false;
        };
        if !Front::may_take(line.as_bytes()) {
            return false;
        }
        let writer = self.writer.clone();
        if let Some(answering) = front.take_call(line, None) {
            self.tasks.spawn(async move {
                if let Some(answer) = answering.await
                    && let Err(error) = writer.write_line(answer).await
                {
                    tracing::debug!(error = %error, "could not answer a tool call");
                }
            });
            return true;
        }
        if let Some(answer) = front.take_list(line) {
            self.tasks.spawn(async move {
                if let Err(error) = writer.write_line(answer).await {
                    tracing::debug!(error = %error, "could not answer a tools/list");
                }
            });
            return true;
        }
        front.take_cancel(line)
    }

    /// A client's request over the size limit gets an error with its id at once (rmcp never
    /// sees it); nothing else the client sends is answered.
    fn too_long(&self, head: &[u8], tail: &[u8]) -> Option<Vec<u8>> {
        let id = wire::dropped_id(head, tail, true)?;
        let message = format!(
            "the request is larger than the {} bytes conductor reads (`max_message_bytes`); it was not read",
            self.max_line
        );
        let answer = wire::Refusal::new(Some(id), ErrorCode::INVALID_REQUEST, message).line();
        let writer = self.writer.clone();
        self.tasks.spawn(async move {
            if let Err(error) = writer.write_line(answer).await {
                tracing::debug!(error = %error, "could not refuse a request too large");
            }
        });
        None
    }

    fn sending(&self, line: Vec<u8>) -> Vec<u8> {
        // Until the handshake is done: rmcp's answer to `initialize` cannot say that
        // conductor takes tasks (2025-11-25), which it does for such clients.
        if self.front.get().is_none()
            && let Some(offered) = tasks::offer_in_initialize(&line)
        {
            return offered;
        }
        line
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
