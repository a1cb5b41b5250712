//! The MCP server conductor offers its clients: the catalog as tools, prompts and resources,
//! each request routed to its owner, and list-changed notifications when the catalog changes.
//!
//! This is the only `ServerHandler`. One value serves one client session; it holds no state of
//! its own beyond the router, so sessions are cheap and isolated.
#![allow(
    deprecated,
    reason = "logging and resources/subscribe are deprecated in 2026-07-28; older peers still use them"
)]

use std::future::Future;
use std::sync::Arc;

use rmcp::ErrorData as McpError;
use rmcp::ServerHandler;
use rmcp::model::{CacheScope, InputResponses, ProgressNotificationParam, ProgressToken};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, CompleteRequestParams, CompleteResult,
    ContentBlock, CustomRequest, CustomResult, GetPromptRequestParams, GetPromptResponse,
    Implementation, JsonObject, ListPromptsResult, ListResourceTemplatesResult,
    ListResourcesResult, ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams,
    ReadResourceResponse, ResultType, ServerCapabilities, ServerConfig, ServerResult,
    SetLevelRequestParams, SubscribeRequestParams, SubscriptionFilter, Tool,
    UnsubscribeRequestParams,
};
use rmcp::service::{NotificationContext, Peer, RequestContext, RoleServer, SubscriptionContext};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::catalog::Catalog;
use crate::config::{Config, WorkflowSpec};
use crate::downstream::ListKind;
use crate::orchestrate::execute::{ProgressSink, ProgressUpdate};
use crate::orchestrate::{self, Orchestrator, saved};
use crate::relay::{ProgressTo, UpdateTarget};
use crate::retry::Retry;
use crate::router::{Answer, CallError, Caller, Router, Told, ToolCall};

mod front;
mod tasks;
pub use front::{Front, Fronts, serve_stdio};
pub use tasks::offer_in_initialize;

/// One client session's view of conductor.
#[derive(Debug, Clone)]
pub struct ConductorServer {
    router: Router,
    orchestrator: Arc<Orchestrator>,
    /// Where an HTTP session's front is registered for the HTTP layer, by session id.
    fronts: Option<Arc<Fronts>>,
    /// The session's front, once it began (held here: the registry keeps a weak reference,
    /// so the front goes with the session).
    front: Arc<std::sync::OnceLock<Arc<Front>>>,
}

impl ConductorServer {
    /// A new client session. Its calls, and its workflows' steps, go through a router of its
    /// own, so servers with `isolation = "session"` give it children of its own.
    pub fn new(router: &Router, orchestrator: &Orchestrator) -> Self {
        let router = router.for_session();
        let orchestrator = Arc::new(orchestrator.with_tools(Arc::new(router.clone())));
        ConductorServer {
            router,
            orchestrator,
            fronts: None,
            front: Arc::default(),
        }
    }

    /// The session's workflow runs belong to `owner`: only it can read or resume them.
    pub fn owned_by(mut self, owner: orchestrate::Owner) -> Self {
        self.orchestrator = Arc::new(self.orchestrator.with_owner(owner));
        self
    }

    /// Register each HTTP session's front in `fronts`, so the HTTP layer answers its plain
    /// tool calls itself (see [`Front`]).
    pub fn with_fronts(mut self, fronts: Arc<Fronts>) -> Self {
        self.fronts = Some(fronts);
        self
    }

    fn catalog(&self) -> Arc<Catalog> {
        self.router.registry().catalog()
    }

    /// The caller a client request makes: its cancellation, its client and progress token.
    fn caller(&self, context: &RequestContext<RoleServer>) -> Caller {
        self.router.remember_client(&context.peer);
        Caller {
            cancel: context.ct.clone(),
            client: Some(context.peer.clone()),
            progress_token: context.meta.get_progress_token(),
            protocol: context.protocol_version(),
            capabilities: context.client_capabilities().map(Arc::new),
            asks: None,
            progress_to: None,
            log_level: context.meta.log_level(),
        }
    }
}

/// The `requestState` and answers of a client's retry, taken out of its request when the
/// state is one conductor's bridge handed out; a downstream's own state stays for it.
fn bridged_retry(
    state: &mut Option<String>,
    responses: &mut Option<InputResponses>,
) -> Option<(String, Option<InputResponses>)> {
    if !Bridge::owns(state.as_deref()) {
        return None;
    }
    Some((state.take()?, responses.take()))
}

impl ConductorServer {
    /// The cache hint for conductor's own list of one kind, as it goes on the wire.
    fn cache_hint(&self, kind: ListKind) -> (Option<u64>, Option<CacheScope>) {
        list_cache_hint(&self.router, kind)
    }
}

/// Run a request that may ask the client for input. A 2026-07-28 client gets what the
/// downstream asks as `input_required`, and its retry continues the parked call; older
/// clients are asked directly, as the downstream asks (see [`crate::bridge`]).
pub(crate) async fn bridged<F, Fut>(
    router: &Router,
    resume: Option<(String, Option<InputResponses>)>,
    caller: &Caller,
    call: F,
) -> Result<Answer, CallError>
where
    F: FnOnce(Caller) -> Fut,
    Fut: Future<Output = Result<Answer, CallError>> + Send + 'static,
{
    // The bridge's futures are boxed: this one is moved into every request's task, and
    // most calls never take those paths (see docs/performance.md).
    let bridge = router.registry().bridge();
    if let Some((state, responses)) = resume {
        return Box::pin(bridge.resume(&state, responses, &caller.cancel)).await;
    }
    if caller.takes_input_required() {
        return Box::pin(bridge.start(caller, call)).await;
    }
    call(caller.clone()).await
}

impl ServerHandler for ConductorServer {
    fn get_info(&self) -> ServerConfig {
        let capabilities = ServerCapabilities::builder()
            .enable_tools()
            .enable_tool_list_changed()
            .enable_prompts()
            .enable_prompts_list_changed()
            .enable_resources()
            .enable_resources_list_changed()
            .enable_completions()
            .enable_logging()
            .enable_resources_subscribe()
            .build();
        ServerConfig::new(capabilities)
            .with_server_info(Implementation::new(
                "mcp-conductor",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Tools, prompts and resources of several MCP servers. Tool and prompt names are \
                 `<server>__<name>`; each call goes to the server that owns it.",
            )
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        // Boxed: rmcp moves every request's future into a task of its own, and the
        // futures of these handlers are large (see docs/performance.md).
        Box::pin(async move {
            self.router.set_level(request, &self.caller(&context)).await;
            Ok(())
        })
        .await
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        // Boxed: rmcp moves every request's future into a task of its own, and the
        // futures of these handlers are large (see docs/performance.md).
        Box::pin(async move {
            self.router
                .subscribe(request, &self.caller(&context))
                .await
                .map_err(subscription_error)
        })
        .await
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), McpError> {
        // Boxed: rmcp moves every request's future into a task of its own, and the
        // futures of these handlers are large (see docs/performance.md).
        Box::pin(async move {
            self.router
                .unsubscribe(request, &self.caller(&context))
                .await
                .map_err(subscription_error)
        })
        .await
    }

    /// rmcp takes any request it cannot read as a custom one, a known method with malformed
    /// params included: those get "invalid params" with what is wrong, not "not found".
    async fn on_custom_request(
        &self,
        request: CustomRequest,
        _context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, McpError> {
        let (code, message) = crate::wire::request_problem(&request.method, request.params);
        Err(McpError::new(code, message, None))
    }

    async fn on_roots_list_changed(&self, _context: NotificationContext<RoleServer>) {
        // In a task of its own: the children asking again must not wait behind this
        // notification.
        let router = self.router.clone();
        tokio::spawn(async move { router.roots_changed().await });
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        let catalog = self.router.registry().catalog_to_list().await;
        let config = self.router.registry().config();
        let (tools, next_cursor) = page(listed_tools(&catalog, &config), request)?;
        let mut result = ListToolsResult::with_all_items(tools);
        result.next_cursor = next_cursor;
        (result.ttl_ms, result.cache_scope) = self.cache_hint(ListKind::Tools);
        Ok(result)
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        // Boxed: rmcp moves every request's future into a task of its own, and the
        // futures of these handlers are large (see docs/performance.md).
        Box::pin(async move {
            // Also remembers the session's client, which a workflow's steps relay to.
            let caller = self.caller(&context);
            let config = self.router.registry().config();
            let saved = saved::find(&config, &request.name);
            if request.name == orchestrate::TOOL_NAME || saved.is_some() {
                let progress = context
                    .meta
                    .get_progress_token()
                    .map(|token| ProgressTarget {
                        peer: context.peer.clone(),
                        token,
                        progress_to: None,
                    });
                let result = run_workflow_call(
                    &self.router,
                    &self.orchestrator,
                    saved.map(|spec| (&config, spec)),
                    request.arguments.unwrap_or_default(),
                    progress,
                    context.ct.clone(),
                )
                .await;
                return Ok(CallToolResponse::Complete(result));
            }
            let mut request = request;
            let resume = bridged_retry(&mut request.request_state, &mut request.input_responses);
            let router = self.router.clone();
            let outcome = bridged(&self.router, resume, &caller, |caller| async move {
                forward_call(&router, ToolCall::Params(request), &caller).await
            })
            .await;
            tool_response(outcome.and_then(Answer::into_result))
        })
        .await
    }

    async fn list_prompts(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, McpError> {
        let catalog = self.router.registry().catalog_to_list().await;
        let prompts = catalog.prompts().iter().map(|entry| entry.prompt.clone());
        let (prompts, next_cursor) = page(prompts, request)?;
        let mut result = ListPromptsResult::with_all_items(prompts);
        result.next_cursor = next_cursor;
        (result.ttl_ms, result.cache_scope) = self.cache_hint(ListKind::Prompts);
        Ok(result)
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, McpError> {
        // Boxed: rmcp moves every request's future into a task of its own, and the
        // futures of these handlers are large (see docs/performance.md).
        Box::pin(async move {
            let mut request = request;
            let resume = bridged_retry(&mut request.request_state, &mut request.input_responses);
            let router = self.router.clone();
            let caller = self.caller(&context);
            let outcome = bridged(&self.router, resume, &caller, |caller| async move {
                router.get_prompt(request, &caller).await.map(Answer::from)
            })
            .await;
            match outcome.and_then(Answer::into_result) {
                Ok(ServerResult::GetPromptResult(mut result)) => {
                    mark_complete(&mut result.result_type);
                    Ok(GetPromptResponse::Complete(result))
                }
                Ok(ServerResult::InputRequiredResult(result)) => {
                    Ok(GetPromptResponse::InputRequired(result))
                }
                Ok(other) => Err(unexpected("prompts/get", &other)),
                Err(error) => Err(protocol_error(error)),
            }
        })
        .await
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        let catalog = self.router.registry().catalog_to_list().await;
        let resources = catalog
            .resources()
            .iter()
            .map(|entry| entry.resource.clone());
        let (resources, next_cursor) = page(resources, request)?;
        let mut result = ListResourcesResult::with_all_items(resources);
        result.next_cursor = next_cursor;
        (result.ttl_ms, result.cache_scope) = self.cache_hint(ListKind::Resources);
        Ok(result)
    }

    async fn list_resource_templates(
        &self,
        request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        let catalog = self.router.registry().catalog_to_list().await;
        let templates = catalog
            .templates()
            .iter()
            .map(|entry| entry.template.clone())
            .chain(std::iter::once_with(orchestrate::run_template));
        let (templates, next_cursor) = page(templates, request)?;
        let mut result = ListResourceTemplatesResult::with_all_items(templates);
        result.next_cursor = next_cursor;
        (result.ttl_ms, result.cache_scope) = self.cache_hint(ListKind::Resources);
        Ok(result)
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        // Boxed: rmcp moves every request's future into a task of its own, and the
        // futures of these handlers are large (see docs/performance.md).
        Box::pin(async move {
            if let Some(run_id) = orchestrate::run_id_of(&request.uri) {
                return match self.orchestrator.read_run(run_id, &request.uri) {
                    Some(result) => Ok(ReadResourceResponse::Complete(result)),
                    None => Err(McpError::resource_not_found(
                        format!(
                            "no kept run `{run_id}` (runs are kept for `[conductor] keep_runs`)"
                        ),
                        None,
                    )),
                };
            }
            let mut request = request;
            let resume = bridged_retry(&mut request.request_state, &mut request.input_responses);
            let router = self.router.clone();
            let caller = self.caller(&context);
            let outcome = bridged(&self.router, resume, &caller, |caller| async move {
                router
                    .read_resource(request, &caller)
                    .await
                    .map(Answer::from)
            })
            .await;
            match outcome.and_then(Answer::into_result) {
                Ok(ServerResult::ReadResourceResult(mut result)) => {
                    mark_complete(&mut result.result_type);
                    Ok(ReadResourceResponse::Complete(result))
                }
                Ok(ServerResult::InputRequiredResult(result)) => {
                    Ok(ReadResourceResponse::InputRequired(result))
                }
                Ok(other) => Err(unexpected("resources/read", &other)),
                Err(error @ CallError::UnknownResource { .. }) => {
                    Err(McpError::resource_not_found(error.to_string(), None))
                }
                Err(error) => Err(protocol_error(error)),
            }
        })
        .await
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, McpError> {
        // Boxed: rmcp moves every request's future into a task of its own, and the
        // futures of these handlers are large (see docs/performance.md).
        Box::pin(async move {
            match self.router.complete(request, &self.caller(&context)).await {
                Ok(ServerResult::CompleteResult(mut result)) => {
                    mark_complete(&mut result.result_type);
                    Ok(result)
                }
                Ok(other) => Err(unexpected("completion/complete", &other)),
                Err(error) => Err(protocol_error(error)),
            }
        })
        .await
    }

    /// Sessions that began with `initialize` get list-changed notifications pushed to them.
    async fn on_initialized(&self, context: NotificationContext<RoleServer>) {
        // rmcp gives an HTTP session's messages their request's parts, its session id too.
        if let Some(fronts) = &self.fronts
            && let Some(parts) = context.extensions.get::<http::request::Parts>()
            && let Some(session) = parts
                .headers
                .get("mcp-session-id")
                .and_then(|id| id.to_str().ok())
            && let Some(front) = Front::for_client(self, &context.peer)
        {
            let front = Arc::new(front);
            fronts.register(session, &front);
            let _ = self.front.set(front);
        }
        let peer = context.peer;
        let changes = self.router.registry().subscribe();
        let told = self.router.told();
        tokio::spawn(async move {
            follow_catalog(told, changes, |kind| {
                let peer = peer.clone();
                async move {
                    match kind {
                        Changed::Tools => peer.notify_tool_list_changed().await.is_ok(),
                        Changed::Prompts => peer.notify_prompt_list_changed().await.is_ok(),
                        Changed::Resources => peer.notify_resource_list_changed().await.is_ok(),
                    }
                }
            })
            .await;
        });
    }

    /// 2026-07-28 clients ask for list-changed notifications and resource updates with
    /// `subscriptions/listen`; updates are accepted for the resources some server offers.
    fn accepted_subscription_filter(
        &self,
        requested: &SubscriptionFilter,
    ) -> Option<SubscriptionFilter> {
        let mut accepted = SubscriptionFilter::new();
        accepted.tools_list_changed = requested.tools_list_changed;
        accepted.prompts_list_changed = requested.prompts_list_changed;
        accepted.resources_list_changed = requested.resources_list_changed;
        let catalog = self.catalog();
        // While servers start, what they will offer is not known yet: every URI is taken, and
        // subscribed to once its owner is up.
        let starting = self.router.registry().list_wait().is_some();
        accepted.resource_subscriptions = requested.resource_subscriptions.as_ref().map(|uris| {
            uris.iter()
                .filter(|uri| starting || catalog.route_resource(uri).is_some())
                .cloned()
                .collect()
        });
        Some(accepted)
    }

    async fn listen(&self, subscription: SubscriptionContext) -> Result<(), McpError> {
        // Boxed: rmcp moves every request's future into a task of its own, and the
        // futures of these handlers are large (see docs/performance.md).
        Box::pin(async move {
            let changes = self.router.registry().subscribe();
            let wanted = subscription.accepted().clone();
            let sink = subscription.sink().clone();
            // Resource updates: the stream subscribes like a session of its own, for as long as
            // it is open.
            let caller = self.caller(subscription.request_context());
            let listener = self.router.registry().relay().listener_id();
            let uris = wanted.resource_subscriptions.clone().unwrap_or_default();
            for uri in &uris {
                let target = UpdateTarget::Listen(sink.clone());
                let params = SubscribeRequestParams::new(uri.clone());
                if let Err(error) = self
                    .router
                    .subscribe_for(params, listener, target, &caller)
                    .await
                {
                    tracing::warn!(uri = %uri, error = %error, "could not subscribe a listen stream to a resource");
                }
            }
            let following = follow_catalog(self.router.told(), changes, |kind| {
                let sink = sink.clone();
                let wanted = wanted.clone();
                async move {
                    let result = match kind {
                        Changed::Tools if wanted.tools_list_changed == Some(true) => {
                            sink.notify_tool_list_changed().await
                        }
                        Changed::Prompts if wanted.prompts_list_changed == Some(true) => {
                            sink.notify_prompt_list_changed().await
                        }
                        Changed::Resources if wanted.resources_list_changed == Some(true) => {
                            sink.notify_resource_list_changed().await
                        }
                        _ => Ok(()),
                    };
                    result.is_ok()
                }
            });
            tokio::select! {
                () = following => {}
                () = subscription.cancelled() => {}
            }
            let caller = Caller::detached(tokio_util::sync::CancellationToken::new());
            for uri in uris {
                let params = UnsubscribeRequestParams::new(uri.clone());
                if let Err(error) = self.router.unsubscribe_for(params, listener, &caller).await {
                    tracing::debug!(uri = %uri, error = %error, "could not end a listen stream's subscription");
                }
            }
            Ok(())
        })
        .await
    }
}

/// A proxied tool call, through the router, tried again as the tool's annotations allow: the
/// same policy as workflow steps (read-only and idempotent tools are tried again after
/// transient failures, others only if the call never went out).
pub(crate) async fn forward_call(
    router: &Router,
    call: ToolCall,
    caller: &Caller,
) -> Result<Answer, CallError> {
    let annotations = router
        .catalog_for_tool(call.name(), None)
        .await
        .tool(call.name())
        .and_then(|entry| entry.tool.annotations.clone());
    let retry = Retry::for_tool(annotations.as_ref(), None);
    let heard = router.registry().relay().list_changes_heard();
    let (outcome, _) = retry
        .run(&caller.cancel, CallError::kind, || {
            router.call_tool(call.clone(), None, caller)
        })
        .await;
    router.tell_list_changes_first(heard).await;
    outcome
}

/// What the client gets for a proxied tool call.
fn tool_response(outcome: Result<ServerResult, CallError>) -> Result<CallToolResponse, McpError> {
    match outcome {
        Ok(ServerResult::CallToolResult(mut result)) => {
            mark_complete(&mut result.result_type);
            Ok(CallToolResponse::Complete(result))
        }
        Ok(ServerResult::InputRequiredResult(result)) => {
            Ok(CallToolResponse::InputRequired(result))
        }
        Ok(ServerResult::CreateTaskResult(result)) => Ok(CallToolResponse::Task(result)),
        Ok(other) => Err(unexpected("tools/call", &other)),
        Err(error @ (CallError::UnknownTool { .. } | CallError::HiddenTool { .. })) => {
            Err(McpError::invalid_params(error.to_string(), None))
        }
        Err(CallError::Downstream { error, .. }) => Err(*error),
        // A tool that fails still answers, with a message the model can act on.
        Err(error) => Ok(CallToolResponse::Complete(CallToolResult::error(vec![
            ContentBlock::text(error.to_string()),
        ]))),
    }
}

/// How many entries one page of a list holds. Large enough that most catalogs fit in one, so
/// clients that ignore cursors still see everything of an ordinary setup.
pub const PAGE_SIZE: usize = 500;

/// One page of a list: the entries from the cursor on (an offset, opaque to clients), and the
/// cursor of the next page if there is one. Only the page's entries are built.
fn page<T>(
    entries: impl Iterator<Item = T>,
    request: Option<PaginatedRequestParams>,
) -> Result<(Vec<T>, Option<String>), McpError> {
    let offset = page_offset(request.and_then(|request| request.cursor).as_deref())?;
    let mut entries: Vec<T> = entries.skip(offset).take(PAGE_SIZE + 1).collect();
    let next = (entries.len() > PAGE_SIZE).then(|| {
        entries.truncate(PAGE_SIZE);
        format!("offset:{}", offset + PAGE_SIZE)
    });
    Ok((entries, next))
}

/// Where the page a cursor names begins.
fn page_offset(cursor: Option<&str>) -> Result<usize, McpError> {
    let Some(cursor) = cursor else {
        return Ok(0);
    };
    cursor
        .strip_prefix("offset:")
        .and_then(|offset| offset.parse::<usize>().ok())
        .ok_or_else(|| {
            McpError::invalid_params(format!("`{cursor}` is not a cursor conductor gave"), None)
        })
}

/// Every tool conductor lists, in order: the catalog's, then conductor's own.
fn listed_tools(catalog: &Catalog, config: &Config) -> impl Iterator<Item = Tool> {
    catalog
        .tools()
        .iter()
        .map(|entry| entry.tool.clone())
        .chain(own_tools(catalog, config))
}

/// The tools conductor itself answers: `orchestrate`, then the config's saved workflows.
pub(crate) fn own_tools(catalog: &Catalog, config: &Config) -> impl Iterator<Item = Tool> {
    std::iter::once_with(Orchestrator::tool).chain(
        config
            .workflows
            .iter()
            .map(|spec| saved::tool(spec, catalog)),
    )
}

/// The cache hint of conductor's own list of one kind, as it goes on the wire.
fn list_cache_hint(router: &Router, kind: ListKind) -> (Option<u64>, Option<CacheScope>) {
    let hint = router.registry().cache_hint(kind);
    let ttl_ms = hint.fresh_until.map(|until| {
        let left = until.saturating_duration_since(std::time::Instant::now());
        u64::try_from(left.as_millis()).unwrap_or(u64::MAX)
    });
    (ttl_ms, hint.scope)
}

/// A subscription that could not be made: a downstream's own error passes through as it is.
fn subscription_error(error: CallError) -> McpError {
    match error {
        CallError::Downstream { error, .. } => *error,
        CallError::UnknownResource { .. } => McpError::invalid_params(error.to_string(), None),
        other => McpError::internal_error(other.to_string(), None),
    }
}

/// Progress of a workflow, sent to the client in order under the client's own token.
/// Where a workflow call's progress goes, under the client's token.
pub(crate) struct ProgressTarget {
    pub peer: Peer<RoleServer>,
    pub token: ProgressToken,
    /// The call's own stream (the HTTP front's), instead of the client's session.
    pub progress_to: Option<ProgressTo>,
}

/// Run `orchestrate`, or the saved workflow `saved` (of the config given with it), for one
/// call with `arguments`: the handler's calls and the front's take this one path.
pub(crate) async fn run_workflow_call(
    router: &Router,
    orchestrator: &Orchestrator,
    saved: Option<(&Arc<Config>, &WorkflowSpec)>,
    arguments: JsonObject,
    progress: Option<ProgressTarget>,
    cancel: CancellationToken,
) -> CallToolResult {
    // A whole workflow counts as in flight, between its steps too.
    let _in_flight = router.registry().track();
    // Checked against the catalog: one with the servers still starting, within `list_wait`.
    router.registry().catalog_to_list().await;
    let input = match saved {
        None => Value::Object(arguments),
        Some((_, spec)) => match saved::workflow_for(spec, arguments) {
            Ok(workflow) => workflow,
            Err(problems) => {
                return orchestrate::tool_result(&orchestrate::invalid_input(problems));
            }
        },
    };
    let (sink, forwarding) = match progress.map(progress_sink) {
        Some((sink, forwarding)) => (Some(sink), forwarding),
        None => (None, None),
    };
    // Boxed: a workflow's future is large, and proxied calls should not carry its size.
    let saved = saved.map(|(config, spec)| orchestrate::Saved {
        config,
        name: &spec.name,
    });
    let report = Box::pin(orchestrator.run(input, saved, sink, cancel)).await;
    // The run has dropped the sink: send every notification before the result, since a
    // client ignores progress for a request it has seen answered.
    if let Some(forwarding) = forwarding {
        let _ = forwarding.await;
    }
    orchestrate::tool_result(&report)
}

/// A workflow's progress sink, and the task sending what it takes to the client's session
/// (none for a call's own stream, which takes each update as it comes).
fn progress_sink(target: ProgressTarget) -> (ProgressSink, Option<JoinHandle<()>>) {
    let ProgressTarget {
        peer,
        token,
        progress_to,
    } = target;
    let params = move |update: ProgressUpdate| {
        let mut params = ProgressNotificationParam::new(token.clone(), update.settled as f64);
        params.total = Some(update.total as f64);
        params.message = Some(update.message);
        params
    };
    if let Some(progress_to) = progress_to {
        let sink: ProgressSink = Arc::new(move |update| {
            let _ = progress_to.send(params(update));
        });
        return (sink, None);
    }
    let (sender, mut receiver) = mpsc::unbounded_channel::<ProgressUpdate>();
    let forwarding = tokio::spawn(async move {
        while let Some(update) = receiver.recv().await {
            if peer.notify_progress(params(update)).await.is_err() {
                break;
            }
        }
    });
    let sink: ProgressSink = Arc::new(move |update| {
        let _ = sender.send(update);
    });
    (sink, Some(forwarding))
}

/// Which part of the catalog changed.
#[derive(Debug, Clone, Copy)]
enum Changed {
    Tools,
    Prompts,
    Resources,
}

/// Call `notify` for each part of the catalog that changes, until it returns false (the
/// client is gone) or the registry is dropped, recording what the client was `told`. While
/// lists still wait for servers starting (`list_wait`), nothing is said: what the client
/// lists then already has them.
async fn follow_catalog<F, Fut>(told: Told, mut changes: watch::Receiver<Arc<Catalog>>, notify: F)
where
    F: Fn(Changed) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut last = changes.borrow_and_update().clone();
    told.told_of(&last);
    while changes.changed().await.is_ok() {
        let current = changes.borrow_and_update().clone();
        if current.while_starting {
            told.told_of(&current);
            last = current;
            continue;
        }
        let mut parts = Vec::new();
        let (was, now) = (last.announced, current.announced);
        if last.tools() != current.tools() || was.tools != now.tools {
            parts.push(Changed::Tools);
        }
        if last.prompts() != current.prompts() || was.prompts != now.prompts {
            parts.push(Changed::Prompts);
        }
        if last.resources() != current.resources()
            || last.templates() != current.templates()
            || was.resources != now.resources
        {
            parts.push(Changed::Resources);
        }
        for part in parts {
            if !notify(part).await {
                return;
            }
        }
        told.told_of(&current);
        last = current;
    }
}

/// A result from a downstream of an older protocol version has no `resultType`; a 2026-07-28
/// client requires one, and rmcp removes it again for older clients.
fn mark_complete(result_type: &mut Option<ResultType>) {
    result_type.get_or_insert(ResultType::COMPLETE);
}

fn protocol_error(error: CallError) -> McpError {
    match error {
        CallError::Downstream { error, .. } => *error,
        error @ (CallError::UnknownPrompt { .. }
        | CallError::UnknownTool { .. }
        | CallError::HiddenTool { .. }) => McpError::invalid_params(error.to_string(), None),
        error @ CallError::UnknownResource { .. } => {
            McpError::resource_not_found(error.to_string(), None)
        }
        error => McpError::internal_error(error.to_string(), None),
    }
}

fn unexpected(method: &str, result: &ServerResult) -> McpError {
    let kind = serde_json::to_value(result)
        .ok()
        .and_then(|value| {
            value
                .get("resultType")
                .and_then(|kind| kind.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".to_owned());
    McpError::internal_error(
        format!("the downstream answered `{method}` with an unexpected result (`{kind}`)"),
        None,
    )
}
