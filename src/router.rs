//! The router: the one path every downstream request takes. It resolves a public name to its
//! owner, sends the request with the server's timeout, and cancels it downstream when the
//! caller goes away.
//!
//! Timeouts live here; retries, the circuit breaker, metrics and audit belong here too, so that
//! a proxied call and a workflow step can never differ in how they reach a server.
#![allow(
    deprecated,
    reason = "logging and resources/subscribe are deprecated in 2026-07-28; older peers still use them"
)]

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use memchr::memmem::Finder;

use rmcp::ErrorData as McpError;
use rmcp::model::RequestId;
use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResult, CancelledNotification,
    CancelledNotificationParam, ClientRequest, CompleteRequest, CompleteRequestParams, ErrorCode,
    GetPromptRequest, GetPromptRequestParams, JsonObject, ReadResourceRequest,
    ReadResourceRequestParams, Reference, ResourceContents, ServerResult, SetLevelRequest,
    SetLevelRequestParams, SubscribeRequest, SubscribeRequestParams, UnsubscribeRequest,
    UnsubscribeRequestParams,
};
use rmcp::model::{
    CancelTaskParams, CancelTaskRequest, ClientCapabilities, GetMeta, GetTaskParams,
    GetTaskRequest, InputRequests, InputResponses, LoggingLevel, ProgressToken, ProtocolVersion,
    Task, TaskPayload, UpdateTaskParams, UpdateTaskRequest,
};
use rmcp::service::{Peer, PeerRequestOptions, RoleClient, RoleServer, ServiceError};
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::bridge::{self, Asks};
use crate::catalog::{Catalog, ResourceRoute};
use crate::config::{Isolation, ServerName, ServerSpec, format_duration};
use crate::downstream::{Connection, Heard, Reply, SentCall, TextLane};
use crate::registry::{Registry, Session};
use crate::relay::{self, InCall, Logs, Origin, ProgressTo, UpdateTarget};
use crate::retry::FailureKind;

/// Why a request did not get an answer from its downstream.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("unknown tool `{name}`{}", hint_suffix(hint))]
    UnknownTool { name: String, hint: Option<String> },
    /// A tool the server has, which its config does not offer.
    #[error("tool `{name}` is hidden by the config: `[servers.{server}.tools]` does not offer it")]
    HiddenTool { name: String, server: ServerName },
    #[error("unknown prompt `{name}`{}", hint_suffix(hint))]
    UnknownPrompt { name: String, hint: Option<String> },
    #[error("no server offers resource `{uri}`")]
    UnknownResource { uri: String },
    #[error("{0}")]
    Unavailable(String),
    #[error("cannot route a {0}")]
    Unroutable(String),
    #[error("server `{server}`: `{what}` timed out after {}", format_duration(*after))]
    Timeout {
        server: ServerName,
        what: String,
        after: Duration,
    },
    #[error("server `{server}`: the connection closed before `{what}` was answered")]
    Closed { server: ServerName, what: String },
    #[error("cancelled by the client")]
    Cancelled,
    #[error(
        "server `{server}`: the circuit is open after repeated failures; calls fail at once for {}",
        if retry_in.is_zero() { "a moment, while a trial call is out".to_owned() } else { format!("another {}", format_duration(*retry_in)) }
    )]
    CircuitOpen {
        server: ServerName,
        retry_in: Duration,
    },
    /// The downstream answered with a JSON-RPC error: passed on as it is. Boxed: an error
    /// is large (its `data` a JSON value), and every call's result carries the type.
    #[error("server `{server}`: {error}")]
    Downstream {
        server: ServerName,
        error: Box<McpError>,
    },
    /// A downstream's answer that is not a JSON-RPC result.
    #[error("the server's answer is not a result: {0}")]
    Unreadable(String),
    #[error("server `{server}`: `{what}`: {error}")]
    Failed {
        server: ServerName,
        what: String,
        error: String,
    },
}

impl CallError {
    /// How the call failed, for the retry policy.
    pub fn kind(&self) -> FailureKind {
        match self {
            // A wrong name stays wrong: a tool of a server that is down is `Unavailable`.
            CallError::UnknownTool { .. } | CallError::HiddenTool { .. } => {
                FailureKind::InvalidArgs
            }
            CallError::UnknownPrompt { .. }
            | CallError::UnknownResource { .. }
            | CallError::Unavailable(_)
            | CallError::Unroutable(_) => FailureKind::NotDelivered,
            CallError::Timeout { .. } => FailureKind::Timeout,
            CallError::Closed { .. } | CallError::Failed { .. } => FailureKind::ConnectionLost,
            CallError::Cancelled => FailureKind::Cancelled,
            CallError::CircuitOpen { .. } => FailureKind::CircuitOpen,
            CallError::Downstream { error, .. } if error.code == ErrorCode::INVALID_PARAMS => {
                FailureKind::InvalidArgs
            }
            CallError::Downstream { .. } | CallError::Unreadable(_) => FailureKind::ProtocolError,
        }
    }
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref()
        .map(|hint| format!("; did you mean `{hint}`?"))
        .unwrap_or_default()
}

/// Workflow steps reach tools through the router, like every other call.
#[async_trait::async_trait]
impl crate::orchestrate::Tools for Router {
    fn catalog(&self) -> Arc<crate::catalog::Catalog> {
        self.registry.catalog()
    }

    async fn call(
        &self,
        name: &str,
        args: JsonObject,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
    ) -> Result<CallToolResult, CallError> {
        let params = CallToolRequestParams::new(name.to_owned()).with_arguments(args);
        let client = self.session.as_ref().and_then(|session| session.client());
        let caller = Caller {
            cancel: cancel.clone(),
            capabilities: client
                .as_ref()
                .and_then(crate::relay::declared_capabilities),
            client,
            ..Caller::default()
        };
        let answer = self
            .call_tool(ToolCall::Params(params), timeout, &caller)
            .await?;
        match answer.into_result()? {
            ServerResult::CallToolResult(result) => Ok(result),
            _ => Err(CallError::Failed {
                server: self
                    .registry
                    .catalog()
                    .tool(name)
                    .map(|entry| entry.server.clone())
                    .ok_or_else(|| CallError::UnknownTool { name: name.to_owned(), hint: None })?,
                what: format!("tools/call {name}"),
                error: "the answer was not a tool result (workflows cannot answer input requests or tasks yet)".to_owned(),
            }),
        }
    }
}

/// A `tools/call` on its way to its server.
#[derive(Debug, Clone)]
pub enum ToolCall {
    /// As rmcp parsed it from a client.
    Params(CallToolRequestParams),
    /// As text: the public name and the arguments object as the client wrote it (the stdio
    /// front forwards calls without parsing them, see `server::front`).
    Text {
        name: String,
        arguments: Option<Arc<RawValue>>,
    },
}

impl ToolCall {
    pub fn name(&self) -> &str {
        match self {
            ToolCall::Params(params) => &params.name,
            ToolCall::Text { name, .. } => name,
        }
    }
}

/// A server's answer: parsed by rmcp, or a tool's result as the server wrote it.
#[derive(Debug)]
pub enum Answer {
    /// Boxed: a `ServerResult` is large, and answers travel up through every caller's future.
    Parsed(Box<ServerResult>),
    ToolResult(Box<RawValue>),
}

impl From<ServerResult> for Answer {
    fn from(result: ServerResult) -> Self {
        Answer::Parsed(Box::new(result))
    }
}

impl Answer {
    /// The answer without the `_meta` entry that names the server software that made it
    /// (`io.modelcontextprotocol/serverInfo`, which 2026-07-28 servers put on results): the
    /// client's server is conductor, and clients before 2026-07-28 never get the entry.
    fn without_server_info(self) -> Answer {
        match self {
            Answer::Parsed(mut result) => {
                let meta = match result.as_mut() {
                    ServerResult::CallToolResult(result) => &mut result.meta,
                    ServerResult::GetPromptResult(result) => &mut result.meta,
                    ServerResult::ReadResourceResult(result) => &mut result.meta,
                    ServerResult::CompleteResult(result) => &mut result.meta,
                    _ => return Answer::Parsed(result),
                };
                if let Some(entries) = meta {
                    entries.shift_remove(SERVER_INFO_KEY);
                    if entries.is_empty() {
                        *meta = None;
                    }
                }
                Answer::Parsed(result)
            }
            Answer::ToolResult(text) => {
                // Most results have none: skip the parse for them.
                static SERVER_INFO: LazyLock<Finder> =
                    LazyLock::new(|| Finder::new(SERVER_INFO_KEY.as_bytes()));
                if SERVER_INFO.find(text.get().as_bytes()).is_none() {
                    return Answer::ToolResult(text);
                }
                let Ok(mut result) = serde_json::from_str::<JsonObject>(text.get()) else {
                    return Answer::ToolResult(text);
                };
                if let Some(serde_json::Value::Object(entries)) = result.get_mut("_meta") {
                    entries.shift_remove(SERVER_INFO_KEY);
                    if entries.is_empty() {
                        result.shift_remove("_meta");
                    }
                }
                match serde_json::value::to_raw_value(&result) {
                    Ok(stripped) => Answer::ToolResult(stripped),
                    Err(_) => Answer::ToolResult(text),
                }
            }
        }
    }

    /// The answer as rmcp's type. A tool result that is not one is read as whatever result
    /// it is, as rmcp reads a result it did not expect.
    pub fn into_result(self) -> Result<ServerResult, CallError> {
        match self {
            Answer::Parsed(result) => Ok(*result),
            Answer::ToolResult(text) => serde_json::from_str(text.get())
                .map(ServerResult::CallToolResult)
                .or_else(|_| serde_json::from_str(text.get()))
                .map_err(|error| CallError::Unreadable(error.to_string())),
        }
    }
}

/// A call let through a server's circuit breaker, until its outcome is recorded.
struct Admitted<'a> {
    registry: &'a Registry,
    server: &'a ServerName,
    settled: bool,
}

impl Admitted<'_> {
    /// Record the outcome: a cancelled call proves nothing either way; a transient failure
    /// counts towards opening; anything else shows the server answering.
    fn settle(mut self, outcome: &Result<Answer, CallError>) {
        self.settled = true;
        match outcome {
            Err(CallError::Cancelled) => self.registry.abandon(self.server),
            Err(error) if error.kind().is_transient() => self.registry.record(self.server, true),
            _ => self.registry.record(self.server, false),
        }
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.registry.abandon(self.server);
        }
    }
}

/// The longest a call's answer waits for its client to be told of a list change the
/// downstream announced during the call.
const TELL_FIRST_WITHIN: Duration = Duration::from_secs(2);

/// The `_meta` key of a result that names the server software that made it.
const SERVER_INFO_KEY: &str = "io.modelcontextprotocol/serverInfo";

/// A request on its way to one server.
#[derive(Debug, Clone)]
enum Outgoing {
    /// Boxed: rmcp's requests are large, and tool calls as text are the common case.
    Request(Box<ClientRequest>),
    /// A `tools/call` of the server's own tool name: on the connection's text lane where it
    /// has one, else parsed for rmcp.
    ToolCall {
        name: String,
        arguments: Option<Arc<RawValue>>,
        /// The tool requires a task (see [`crate::catalog::ToolEntry::requires_task`]).
        as_task: bool,
    },
}

impl Outgoing {
    fn request(request: ClientRequest) -> Self {
        Outgoing::Request(Box::new(request))
    }
}

/// A `tools/call` as rmcp's request, its arguments parsed.
fn tool_request(call: TextCall<'_>) -> Result<ClientRequest, String> {
    let mut params = CallToolRequestParams::new(call.name.to_owned());
    if let Some(arguments) = call.arguments {
        let arguments = serde_json::from_str(arguments.get())
            .map_err(|error| format!("the arguments are not a JSON object: {error}"))?;
        params = params.with_arguments(arguments);
    }
    Ok(ClientRequest::CallToolRequest(CallToolRequest::new(params)))
}

/// Whether a client's call carries nothing but its name and arguments, so it may travel as
/// text (rmcp has already taken its `_meta` into the request's context).
fn is_plain(params: &CallToolRequestParams) -> bool {
    params.input_responses.is_none()
        && params.request_state.is_none()
        && params.meta.as_ref().is_none_or(|meta| meta.is_empty())
}

/// Who a request is made for: how it is cancelled, and the client (with its progress token)
/// that what the downstream sends back during it goes to.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub cancel: CancellationToken,
    pub client: Option<Peer<RoleServer>>,
    pub progress_token: Option<ProgressToken>,
    /// The protocol version of the client's request.
    pub protocol: Option<ProtocolVersion>,
    /// What the client can answer, as it declared for this request or its session.
    /// Shared: every request the caller makes carries it, and a relay entry per request too.
    pub capabilities: Option<Arc<ClientCapabilities>>,
    /// Set while a 2026-07-28 client's call runs under the [`Bridge`](crate::bridge::Bridge):
    /// where the downstream's own requests go, to come back as `input_required`.
    pub asks: Option<Asks>,
    /// Where the call's progress goes instead of the client's session.
    pub progress_to: Option<ProgressTo>,
    /// The lowest level of log messages a 2026-07-28 client asked for with its request
    /// (`_meta` `io.modelcontextprotocol/logLevel`); without one it gets none.
    pub log_level: Option<LoggingLevel>,
}

impl Caller {
    /// A caller with no client behind it (the CLI).
    pub fn detached(cancel: CancellationToken) -> Self {
        Caller {
            cancel,
            ..Caller::default()
        }
    }

    /// Which of a downstream's log messages during the call reach the client: for a
    /// 2026-07-28 client, those at or above the level its request named; for older clients,
    /// all (they set levels with `logging/setLevel`, passed on to the servers).
    pub fn logs(&self) -> Logs {
        match (self.takes_input_required(), self.log_level) {
            (false, _) => Logs::All,
            (true, Some(level)) => Logs::AtLeast(level),
            (true, None) => Logs::None,
        }
    }

    /// Whether the client takes `input_required` answers itself (protocol 2026-07-28 on);
    /// older clients are asked by conductor and never see one.
    pub fn takes_input_required(&self) -> bool {
        self.protocol
            .as_ref()
            .is_some_and(|version| *version >= ProtocolVersion::V_2026_07_28)
    }
}

/// Routes requests by public name to the downstream that owns them.
#[derive(Debug, Clone)]
pub struct Router {
    registry: Arc<Registry>,
    /// The client session calls come from, for servers that give each session its own child.
    session: Option<Arc<Session>>,
    /// What the session's client has been told of downstreams' list changes.
    told: Told,
}

/// How many downstream list changes a session's client has been told of
/// ([`crate::catalog::Announcements::handled`]); `None` while nothing tells it. Kept apart
/// from the router, so what tells the client does not keep the session's children alive.
#[derive(Debug, Clone, Default)]
pub struct Told(Arc<tokio::sync::watch::Sender<Option<u64>>>);

impl Told {
    /// The client has been told of the list changes taken into this catalog.
    pub fn told_of(&self, catalog: &crate::catalog::Catalog) {
        self.0.send_replace(Some(catalog.announced.handled));
    }
}

impl Router {
    /// A router for calls that belong to no client session (the CLI's).
    pub fn new(registry: Arc<Registry>) -> Self {
        Router {
            registry,
            session: None,
            told: Told::default(),
        }
    }

    /// A router for one client session: servers with `isolation = "session"` answer it from
    /// children of its own, stopped when the last clone of this router is dropped.
    pub fn for_session(&self) -> Router {
        Router {
            registry: self.registry.clone(),
            session: Some(self.registry.open_session()),
            told: Told::default(),
        }
    }

    /// Remember the client of this router's session, for what downstreams send back during
    /// workflow steps.
    pub fn remember_client(&self, client: &Peer<RoleServer>) {
        if let Some(session) = &self.session {
            session.remember_client(client);
        }
    }

    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Where the session's client's being told of list changes is recorded.
    pub fn told(&self) -> Told {
        self.told.clone()
    }

    /// A downstream that announced a list change during a call (one of `heard_before` or
    /// more): the client hears of it before the call's answer, as it would directly, once
    /// conductor has listed again (at most 2 s is waited, `TELL_FIRST_WITHIN`).
    pub async fn tell_list_changes_first(&self, heard_before: u64) {
        let heard = self.registry.relay().list_changes_heard();
        if heard == heard_before || self.told.0.borrow().is_none() {
            return;
        }
        let mut told = self.told.0.subscribe();
        let _ = tokio::time::timeout(
            TELL_FIRST_WITHIN,
            told.wait_for(|told| told.is_some_and(|told| told >= heard)),
        )
        .await;
    }

    /// Call a tool by its public name. The downstream's result comes back unchanged.
    /// `timeout` replaces the server's call timeout for this call.
    pub async fn call_tool(
        &self,
        call: ToolCall,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<Answer, CallError> {
        let catalog = self.catalog_for_tool(call.name(), timeout).await;
        let Some(entry) = catalog.tool(call.name()) else {
            if let Some(server) = self.registry.not_offering(call.name()) {
                return Err(CallError::Unavailable(
                    self.registry.unavailable_reason(&server),
                ));
            }
            if let Some(server) = self.registry.hiding(call.name()) {
                return Err(CallError::HiddenTool {
                    name: call.name().to_owned(),
                    server,
                });
            }
            return Err(CallError::UnknownTool {
                hint: catalog.nearest_tool(call.name()).map(str::to_owned),
                name: call.name().to_owned(),
            });
        };
        let what = format!("tools/call {}", entry.original);
        let timeout = timeout.or_else(|| {
            self.registry
                .spec(&entry.server)
                .map(|spec| spec.timeout_for(&entry.original))
        });
        let name = entry.original.clone();
        let as_task = entry.requires_task();
        let outgoing = match call {
            ToolCall::Text { arguments, .. } => Outgoing::ToolCall {
                name,
                arguments,
                as_task,
            },
            ToolCall::Params(params) if is_plain(&params) => Outgoing::ToolCall {
                name,
                as_task,
                arguments: match &params.arguments {
                    Some(arguments) => Some(
                        serde_json::value::to_raw_value(arguments)
                            .map(Arc::from)
                            .map_err(|error| CallError::Failed {
                                server: entry.server.clone(),
                                what: what.clone(),
                                error: error.to_string(),
                            })?,
                    ),
                    None => None,
                },
            },
            ToolCall::Params(mut params) => {
                params.name = name.into();
                Outgoing::request(ClientRequest::CallToolRequest(CallToolRequest::new(params)))
            }
        };
        self.send(&entry.server, what, outgoing, timeout, caller)
            .await
    }

    /// The catalog to find tool `name` in: if its server is still starting, once it has
    /// started (waiting at most `timeout`, or the server's call timeout).
    pub async fn catalog_for_tool(&self, name: &str, timeout: Option<Duration>) -> Arc<Catalog> {
        let catalog = self.registry.catalog();
        if catalog.tool(name).is_some() {
            return catalog;
        }
        // Rare: boxed, so every call's future does not carry the waiting's size.
        Box::pin(self.catalog_after_waiting(name, timeout)).await
    }

    /// [`Router::catalog_for_tool`] for a name not in the catalog now.
    async fn catalog_after_waiting(&self, name: &str, timeout: Option<Duration>) -> Arc<Catalog> {
        let catalog = self
            .catalog_finding(|catalog| catalog.tool(name).is_some())
            .await;
        if catalog.tool(name).is_some() {
            return catalog;
        }
        match self.registry.not_offering(name) {
            Some(server) if self.registry.is_starting(&server) => {
                let within = timeout
                    .or_else(|| self.registry.spec(&server).map(|spec| spec.call_timeout))
                    .unwrap_or(crate::config::DEFAULT_CALL_TIMEOUT);
                self.registry.started_server(&server, within).await;
                self.registry.catalog()
            }
            _ => catalog,
        }
    }

    /// The catalog to find something in: the current one, or, when it lacks it while
    /// servers are still starting (within `list_wait`), the one once they have started.
    async fn catalog_finding(&self, found: impl Fn(&Catalog) -> bool) -> Arc<Catalog> {
        let catalog = self.registry.catalog();
        if found(&catalog) {
            return catalog;
        }
        self.registry.catalog_to_list().await
    }

    pub async fn get_prompt(
        &self,
        mut params: GetPromptRequestParams,
        caller: &Caller,
    ) -> Result<ServerResult, CallError> {
        let catalog = self
            .catalog_finding(|catalog| catalog.prompt(&params.name).is_some())
            .await;
        let Some(entry) = catalog.prompt(&params.name) else {
            return Err(CallError::UnknownPrompt {
                hint: catalog.nearest_prompt(&params.name).map(str::to_owned),
                name: params.name,
            });
        };
        let what = format!("prompts/get {}", entry.original);
        params.name = entry.original.clone();
        let request = ClientRequest::GetPromptRequest(GetPromptRequest::new(params));
        self.request(&entry.server, what, request, None, caller)
            .await
    }

    /// Read a resource; the owner sees the URI it listed, the client gets back the one it asked.
    pub async fn read_resource(
        &self,
        mut params: ReadResourceRequestParams,
        caller: &Caller,
    ) -> Result<ServerResult, CallError> {
        let public_uri = params.uri.clone();
        let Some(ResourceRoute { server, uri }) = self
            .catalog_finding(|catalog| catalog.route_resource(&public_uri).is_some())
            .await
            .route_resource(&public_uri)
        else {
            return Err(CallError::UnknownResource { uri: public_uri });
        };
        let what = format!("resources/read {uri}");
        params.uri = uri.clone();
        let request = ClientRequest::ReadResourceRequest(ReadResourceRequest::new(params));
        let mut result = self.request(&server, what, request, None, caller).await?;
        if uri != public_uri
            && let ServerResult::ReadResourceResult(read) = &mut result
        {
            for contents in &mut read.contents {
                if let ResourceContents::TextResourceContents { uri: owned, .. }
                | ResourceContents::BlobResourceContents { uri: owned, .. } = contents
                    && *owned == uri
                {
                    owned.clone_from(&public_uri);
                }
            }
        }
        Ok(result)
    }

    /// Completion for a prompt argument or a resource template variable, from its owner.
    pub async fn complete(
        &self,
        mut params: CompleteRequestParams,
        caller: &Caller,
    ) -> Result<ServerResult, CallError> {
        let catalog = self
            .catalog_finding(|catalog| match &params.r#ref {
                Reference::Prompt(prompt) => catalog.prompt(&prompt.name).is_some(),
                Reference::Resource(resource) => catalog.route_template(&resource.uri).is_some(),
                _ => true,
            })
            .await;
        let server = match &mut params.r#ref {
            Reference::Prompt(prompt) => {
                let Some(entry) = catalog.prompt(&prompt.name) else {
                    return Err(CallError::UnknownPrompt {
                        hint: catalog.nearest_prompt(&prompt.name).map(str::to_owned),
                        name: prompt.name.clone(),
                    });
                };
                prompt.name = entry.original.clone();
                entry.server.clone()
            }
            Reference::Resource(resource) => {
                let Some(route) = catalog.route_template(&resource.uri) else {
                    return Err(CallError::UnknownResource {
                        uri: resource.uri.clone(),
                    });
                };
                resource.uri = route.uri;
                route.server
            }
            other => {
                return Err(CallError::Unroutable(format!(
                    "completion reference of type `{}`",
                    other.reference_type()
                )));
            }
        };
        let request = ClientRequest::CompleteRequest(CompleteRequest::new(params));
        self.request(
            &server,
            "completion/complete".to_owned(),
            request,
            None,
            caller,
        )
        .await
    }

    /// Subscribe the caller's session to a resource's updates.
    pub async fn subscribe(
        &self,
        params: SubscribeRequestParams,
        caller: &Caller,
    ) -> Result<(), CallError> {
        let (session, client) = self.session_of(caller)?;
        self.subscribe_for(params, session, UpdateTarget::Session(client), caller)
            .await
    }

    /// End the caller's session's subscription.
    pub async fn unsubscribe(
        &self,
        params: UnsubscribeRequestParams,
        caller: &Caller,
    ) -> Result<(), CallError> {
        let (session, _) = self.session_of(caller)?;
        self.unsubscribe_for(params, session, caller).await
    }

    /// Subscribe a session or listen stream (`subscriber`) to a resource's updates; its owner
    /// is asked on the first subscription to it, so each server sees one subscription whatever
    /// the clients.
    pub async fn subscribe_for(
        &self,
        mut params: SubscribeRequestParams,
        subscriber: u64,
        target: UpdateTarget,
        caller: &Caller,
    ) -> Result<(), CallError> {
        let ResourceRoute { server, uri } = self.resource_route(&params.uri).await?;
        let relay = self.registry.relay();
        if relay.subscribe(&server, &uri, &params.uri, subscriber, target) {
            params.uri.clone_from(&uri);
            let request = ClientRequest::SubscribeRequest(SubscribeRequest::new(params));
            let what = format!("resources/subscribe {uri}");
            if let Err(error) = self
                .tell_subscriptions(&server, what, request, caller)
                .await
            {
                relay.unsubscribe(&server, &uri, subscriber);
                return Err(error);
            }
        }
        Ok(())
    }

    /// A resource of `server` gained its first subscriber or lost its last: send `request`
    /// (`resources/subscribe` or `unsubscribe`), or to a 2026-07-28 server, which refuses
    /// those, listen again for the resources now subscribed.
    async fn tell_subscriptions(
        &self,
        server: &ServerName,
        what: String,
        request: ClientRequest,
        caller: &Caller,
    ) -> Result<(), CallError> {
        let spec = self
            .registry
            .spec(server)
            .ok_or_else(|| CallError::Unavailable(format!("no server `{server}`")))?;
        let connection = self.connection(&spec, caller).await?;
        if !connection.listens_for_resources() {
            return self
                .request(server, what, request, None, caller)
                .await
                .map(|_| ());
        }
        let what = "subscriptions/listen";
        match tokio::time::timeout(spec.call_timeout, connection.listen_for_resources()).await {
            Ok(listened) => listened.map_err(|error| classify(server, what, error)),
            Err(_) => Err(CallError::Timeout {
                server: server.clone(),
                what: what.to_owned(),
                after: spec.call_timeout,
            }),
        }
    }

    /// Whether the server's connections are shared by every session (not one child each).
    fn shared(&self, server: &ServerName) -> bool {
        self.registry
            .spec(server)
            .is_some_and(|spec| spec.supervision.isolation != Isolation::Session)
    }

    /// End a subscription; the resource's owner is told when no subscriber is left.
    pub async fn unsubscribe_for(
        &self,
        mut params: UnsubscribeRequestParams,
        subscriber: u64,
        caller: &Caller,
    ) -> Result<(), CallError> {
        let ResourceRoute { server, uri } = self.resource_route(&params.uri).await?;
        if self.registry.relay().unsubscribe(&server, &uri, subscriber) {
            params.uri.clone_from(&uri);
            let request = ClientRequest::UnsubscribeRequest(UnsubscribeRequest::new(params));
            let what = format!("resources/unsubscribe {uri}");
            self.tell_subscriptions(&server, what, request, caller)
                .await?;
        }
        Ok(())
    }

    /// Tell servers that resources a session ended with have no subscriber left. A server
    /// that is not running lost its subscriptions anyway (it is not started for this), and a
    /// session's own child stops with the session.
    pub async fn unsubscribe_abandoned(&self, abandoned: Vec<(ServerName, String)>) {
        for (server, uri) in abandoned {
            if !self.shared(&server) || self.registry.pick(&server).is_none() {
                continue;
            }
            let params = UnsubscribeRequestParams::new(uri.clone());
            let request = ClientRequest::UnsubscribeRequest(UnsubscribeRequest::new(params));
            let what = format!("resources/unsubscribe {uri}");
            let caller = Caller::detached(CancellationToken::new());
            if let Err(error) = self
                .tell_subscriptions(&server, what, request, &caller)
                .await
            {
                tracing::debug!(server = %server, uri, error = %error, "could not unsubscribe after its session ended");
            }
        }
    }

    /// Subscribe a server that came back to every resource of it that has subscribers
    /// (a session's own child is new to its session, and subscribed through it).
    pub async fn resubscribe(&self, server: &ServerName) {
        if !self.shared(server) {
            return;
        }
        let caller = Caller::detached(CancellationToken::new());
        for uri in self.registry.relay().subscribed_uris(server) {
            let params = SubscribeRequestParams::new(uri.clone());
            let request = ClientRequest::SubscribeRequest(SubscribeRequest::new(params));
            let what = format!("resources/subscribe {uri}");
            if let Err(error) = self
                .tell_subscriptions(server, what, request, &caller)
                .await
            {
                tracing::warn!(server = %server, uri, error = %error, "could not subscribe again after the server came back");
            }
        }
    }

    /// The owner of a public resource URI, and the URI it knows.
    async fn resource_route(&self, public_uri: &str) -> Result<ResourceRoute, CallError> {
        self.catalog_finding(|catalog| catalog.route_resource(public_uri).is_some())
            .await
            .route_resource(public_uri)
            .ok_or_else(|| CallError::UnknownResource {
                uri: public_uri.to_owned(),
            })
    }

    /// The caller's session id and client, which `resources/subscribe` needs.
    fn session_of(&self, caller: &Caller) -> Result<(u64, Peer<RoleServer>), CallError> {
        match (&self.session, &caller.client) {
            (Some(session), Some(client)) => Ok((session.id(), client.clone())),
            _ => Err(CallError::Unroutable(
                "subscription outside a client session".to_owned(),
            )),
        }
    }

    /// Set the log level of every ready server that logs; one that fails is logged and skipped.
    pub async fn set_level(&self, params: SetLevelRequestParams, caller: &Caller) {
        if let Some(session) = &self.session {
            session.set_log_level(params.level);
        }
        let servers: Vec<ServerName> = self
            .registry
            .config()
            .servers
            .iter()
            .map(|spec| spec.name.clone())
            .filter(|server| {
                self.registry
                    .pick(server)
                    .is_some_and(|connection| connection.info.capabilities.logging.is_some())
            })
            .collect();
        let sends = servers.iter().map(|server| {
            let request = ClientRequest::SetLevelRequest(SetLevelRequest::new(params.clone()));
            self.request(server, "logging/setLevel".to_owned(), request, None, caller)
        });
        for (server, outcome) in servers.iter().zip(futures::future::join_all(sends).await) {
            if let Err(error) = outcome {
                tracing::warn!(server = %server, error = %error, "could not set its log level");
            }
        }
    }

    /// The session's client says its roots changed: tell the session's own children, which
    /// ask it again. Shared servers keep the roots of their config (see
    /// `DownstreamClient::list_roots`), so they are not told.
    pub async fn roots_changed(&self) {
        let Some(session) = &self.session else {
            return;
        };
        for connection in session.connections() {
            if let Err(error) = connection.peer.notify_roots_list_changed().await {
                tracing::debug!(server = %connection.server, error = %error, "could not pass roots/list_changed on");
            }
        }
    }

    /// Send a request rmcp parses the answer of.
    async fn request(
        &self,
        server: &ServerName,
        what: String,
        request: ClientRequest,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<ServerResult, CallError> {
        self.send(server, what, Outgoing::request(request), timeout, caller)
            .await?
            .into_result()
    }

    /// Send one request to a server: the single place every downstream request goes through.
    /// A server that is down or whose circuit is open hands the request to its `fallback`, if
    /// it has one: the request never reached it, so nothing can happen twice.
    async fn send(
        &self,
        server: &ServerName,
        what: String,
        request: Outgoing,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<Answer, CallError> {
        let _in_flight = self.registry.track();
        let spec = self.spec_of(server)?;
        let fallback = spec
            .fallback
            .clone()
            .map(|fallback| (fallback, request.clone()));
        let outcome = self
            .send_to(&spec, what.clone(), request, timeout, caller)
            .await;
        match (outcome, fallback) {
            (Err(error), Some((fallback, request)))
                if matches!(
                    error.kind(),
                    FailureKind::NotDelivered | FailureKind::CircuitOpen
                ) =>
            {
                tracing::info!(server = %server, fallback = %fallback, reason = %error, "served by its fallback");
                let fallback = self.spec_of(&fallback)?;
                Box::pin(self.send_to(&fallback, what, request, timeout, caller)).await
            }
            (outcome, _) => outcome,
        }
    }

    /// A server's spec, or why there is none to send to.
    fn spec_of(&self, server: &ServerName) -> Result<Arc<ServerSpec>, CallError> {
        self.registry
            .spec(server)
            .ok_or_else(|| CallError::Unavailable(self.registry.unavailable_reason(server)))
    }

    /// Send to one server, through its circuit breaker.
    async fn send_to(
        &self,
        spec: &ServerSpec,
        what: String,
        request: Outgoing,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<Answer, CallError> {
        let server = &spec.name;
        if let Err(retry_in) = self.registry.admit(server) {
            return Err(CallError::CircuitOpen {
                server: server.clone(),
                retry_in,
            });
        }
        // Settled with the outcome; a call whose future is dropped (its caller went) says
        // nothing of the server, which the guard tells the breaker.
        let admitted = Admitted {
            registry: &self.registry,
            server,
            settled: false,
        };
        let outcome = self
            .send_admitted(spec, what, request, timeout, caller)
            .await;
        admitted.settle(&outcome);
        outcome
    }

    /// The connection this router's calls to `spec`'s server go to: the session's own child,
    /// or the least busy shared one (started now if the server is lazy and idle).
    async fn connection(
        &self,
        spec: &ServerSpec,
        caller: &Caller,
    ) -> Result<Arc<Connection>, CallError> {
        let connection = match &self.session {
            Some(session) if spec.supervision.isolation == Isolation::Session => {
                session
                    .connection(spec, caller.capabilities.as_deref())
                    .await
            }
            _ => self.registry.connection(&spec.name).await,
        };
        connection.map_err(CallError::Unavailable)
    }

    async fn send_admitted(
        &self,
        spec: &ServerSpec,
        what: String,
        request: Outgoing,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<Answer, CallError> {
        let connection = tokio::select! {
            connection = self.connection(spec, caller) => connection?,
            () = caller.cancel.cancelled() => return Err(CallError::Cancelled),
        };
        let _busy = connection.busy();
        let answer = self
            .send_on(&connection, spec, what, request, timeout, caller)
            .await?;
        Ok(
            if connection.info.protocol_version >= ProtocolVersion::V_2026_07_28 {
                answer.without_server_info()
            } else {
                answer
            },
        )
    }

    /// Send a request on one connection, on its text lane where it can go as text.
    async fn send_on(
        &self,
        connection: &Connection,
        spec: &ServerSpec,
        what: String,
        request: Outgoing,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<Answer, CallError> {
        let request = match request {
            Outgoing::Request(request) => *request,
            // rmcp's progress-reset timeouts need rmcp's own requests.
            Outgoing::ToolCall {
                name,
                arguments,
                as_task,
            } => {
                let call = TextCall {
                    name: &name,
                    arguments: arguments.as_deref(),
                    as_task,
                };
                // rmcp's progress-reset timeouts need rmcp's own requests; a task only the
                // lane can ask for.
                if let Some(lane) = connection.text_lane()
                    && (as_task || !spec.timeout_resets_on_progress)
                {
                    return self
                        .exchange_text(connection, lane, spec, &what, call, timeout, caller)
                        .await;
                }
                tool_request(call).map_err(|error| CallError::Failed {
                    server: spec.name.clone(),
                    what: what.clone(),
                    error,
                })?
            }
        };
        // Boxed: rmcp's request futures are large, and the text lane's calls should not
        // carry their size (see docs/performance.md).
        Box::pin(self.send_parsed(connection, spec, what, request, timeout, caller))
            .await
            .map(Answer::from)
    }

    /// Send a request through rmcp and read its answer: following a task the server makes of
    /// it, and asking the client for the input a 2026-07-28 server needs, for a client that
    /// cannot be asked itself.
    async fn send_parsed(
        &self,
        connection: &Connection,
        spec: &ServerSpec,
        what: String,
        request: ClientRequest,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<ServerResult, CallError> {
        // A 2026-07-28 downstream may answer `input_required`; a client that cannot take it
        // is asked by conductor, and the request goes again with the answers.
        let bridging = !caller.takes_input_required()
            && connection.info.protocol_version >= ProtocolVersion::V_2026_07_28;
        let mut request = request;
        for _ in 0..bridge::MAX_ROUNDS {
            let again = bridging.then(|| request.clone());
            let outcome = match self
                .exchange(connection, spec, &what, request, timeout, caller)
                .await
            {
                Ok(ServerResult::CreateTaskResult(created)) => {
                    // Boxed, as the bridging below: rare paths should not grow every call's future.
                    Box::pin(self.follow_task(
                        connection,
                        spec,
                        &what,
                        created.task,
                        timeout,
                        caller,
                    ))
                    .await
                }
                outcome => outcome,
            };
            let (Ok(ServerResult::InputRequiredResult(input)), Some(again)) = (&outcome, again)
            else {
                return outcome;
            };
            let requests = input.input_requests.clone().unwrap_or_default();
            let responses = Box::pin(ask_for_input(spec, &what, requests, caller)).await?;
            request = with_input(again, responses, input.request_state.clone()).ok_or_else(|| {
                CallError::Failed {
                    server: spec.name.clone(),
                    what: what.clone(),
                    error: "`input_required` is only allowed for tools/call, prompts/get and resources/read".to_owned(),
                }
            })?;
        }
        Err(CallError::Failed {
            server: spec.name.clone(),
            what,
            error: format!("still asking for input after {} rounds", bridge::MAX_ROUNDS),
        })
    }

    /// Read a text lane's result that made a task, and follow the task.
    async fn follow_made_task(
        &self,
        connection: &Connection,
        spec: &ServerSpec,
        what: &str,
        result: &RawValue,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<Answer, CallError> {
        let result = match serde_json::from_str(result.get()) {
            Ok(ServerResult::CreateTaskResult(created)) => {
                self.follow_task(connection, spec, what, created.task, timeout, caller)
                    .await?
            }
            Ok(other) => other,
            Err(error) => return Err(CallError::Unreadable(error.to_string())),
        };
        Ok(Answer::from(result))
    }

    /// Follow a task the downstream made of a call (tasks extension) until it ends, and
    /// answer with its result: the client sees the call's result as if no task were made.
    /// Input the task asks for goes to the client; a caller that goes cancels the task.
    async fn follow_task(
        &self,
        connection: &Connection,
        spec: &ServerSpec,
        what: &str,
        task: Task,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<ServerResult, CallError> {
        let failed = |error: String| CallError::Failed {
            server: spec.name.clone(),
            what: what.to_owned(),
            error,
        };
        let task_id = task.task_id;
        let mut poll_interval = task.poll_interval_ms;
        // The task's own requests are not cancelled with the call: a cancelled call cancels
        // the task instead, between polls.
        let polling = Caller {
            cancel: CancellationToken::new(),
            ..caller.clone()
        };
        loop {
            let wait = Duration::from_millis(poll_interval.unwrap_or(200).clamp(10, 5_000));
            tokio::select! {
                biased;
                () = caller.cancel.cancelled() => {
                    let cancel = ClientRequest::CancelTaskRequest(CancelTaskRequest::new(
                        CancelTaskParams::new(task_id.clone()),
                    ));
                    if let Err(error) = self.exchange(connection, spec, what, cancel, timeout, &polling).await {
                        tracing::debug!(server = %spec.name, error = %error, "could not cancel a task");
                    }
                    return Err(CallError::Cancelled);
                }
                () = tokio::time::sleep(wait) => {}
            }
            let get = ClientRequest::GetTaskRequest(GetTaskRequest::new(GetTaskParams::new(
                task_id.clone(),
            )));
            let ServerResult::GetTaskResult(got) = self
                .exchange(connection, spec, what, get, timeout, &polling)
                .await?
            else {
                return Err(failed(
                    "`tasks/get` answered with another kind of result".to_owned(),
                ));
            };
            poll_interval = got.task.task.poll_interval_ms.or(poll_interval);
            match got.task.payload {
                TaskPayload::Completed { result } => {
                    return serde_json::from_value(serde_json::Value::Object(result))
                        .map(ServerResult::CallToolResult)
                        .map_err(|error| failed(format!("the task's result: {error}")));
                }
                TaskPayload::Failed { error } => {
                    let error = serde_json::from_value(serde_json::Value::Object(error))
                        .unwrap_or_else(|_| McpError::internal_error("the task failed", None));
                    return Err(CallError::Downstream {
                        server: spec.name.clone(),
                        error: Box::new(error),
                    });
                }
                TaskPayload::Cancelled => {
                    return Err(failed("the server cancelled the task".to_owned()));
                }
                TaskPayload::InputRequired { input_requests } => {
                    let responses = ask_for_input(spec, what, input_requests, caller).await?;
                    let update = ClientRequest::UpdateTaskRequest(UpdateTaskRequest::new(
                        UpdateTaskParams::new(task_id.clone(), responses),
                    ));
                    self.exchange(connection, spec, what, update, timeout, &polling)
                        .await?;
                }
                _ => {}
            }
        }
    }

    /// The level a 2026-07-28 server is asked to send log messages at during a request, as
    /// the caller would get them directly: the level a 2026-07-28 client named, or none; for
    /// an older client, the level its session set, or every message (as older servers send
    /// before a level is set).
    fn log_level_for(&self, caller: &Caller) -> Option<LoggingLevel> {
        match caller.logs() {
            Logs::AtLeast(level) => Some(level),
            Logs::None => None,
            Logs::All => Some(
                self.session
                    .as_ref()
                    .and_then(|session| session.log_level())
                    .unwrap_or(LoggingLevel::Debug),
            ),
        }
    }

    /// Register a request about to go out on `connection` for the caller's client: what the
    /// downstream sends back during it goes there.
    fn register(&self, connection: &Connection, caller: &Caller) -> Option<InCall<'_>> {
        caller.client.clone().map(|client| {
            let origin = Origin {
                peer: client,
                progress_token: caller.progress_token.clone(),
                capabilities: caller.capabilities.clone(),
                asks: caller.asks.clone(),
                progress_to: caller.progress_to.clone(),
                session: self.session.as_ref().map(|session| session.id()),
                logs: caller.logs(),
            };
            self.registry.relay().register(connection.id, origin)
        })
    }

    /// One request and its answer on `connection`, cancelled downstream if the caller goes.
    async fn exchange(
        &self,
        connection: &Connection,
        spec: &ServerSpec,
        what: &str,
        request: ClientRequest,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<ServerResult, CallError> {
        let server = &spec.name;
        let options = request_options(spec, timeout);
        let mut request = request;
        if connection.info.protocol_version >= ProtocolVersion::V_2026_07_28
            && let Some(level) = self.log_level_for(caller)
        {
            request.get_meta_mut().set_log_level(level);
        }
        let in_call = self.register(connection, caller);
        let handle = connection
            .peer
            .send_request_with_option(request, options)
            .await
            .map_err(|error| classify(server, what, error))?;
        if let Some(in_call) = &in_call {
            in_call.sent(handle.id.clone(), handle.progress_token.clone());
        }
        let id = handle.id.clone();
        let peer = handle.peer.clone();
        let outcome = tokio::select! {
            biased;
            response = handle.await_response() => response.map_err(|error| classify(server, what, error)),
            // A request queued as the connection ended may never be answered nor dropped:
            // the end itself fails it.
            () = connection.ended() => Err(CallError::Closed { server: server.clone(), what: what.to_owned() }),
            () = caller.cancel.cancelled() => {
                tell_cancelled(&peer, server, id).await;
                Err(CallError::Cancelled)
            }
        };
        if caller.progress_token.is_some() {
            let_progress_pass().await;
        }
        outcome
    }

    /// A tool call and its answer on a connection's text lane: as [`Router::exchange`], with
    /// the request written and the result kept as text. A server may make a task of any call
    /// (tasks extension): that answer is read, and the task followed as on rmcp's path.
    #[allow(clippy::too_many_arguments, reason = "exchange's, and the lane")]
    async fn exchange_text(
        &self,
        connection: &Connection,
        lane: &TextLane,
        spec: &ServerSpec,
        what: &str,
        call: TextCall<'_>,
        timeout: Option<Duration>,
        caller: &Caller,
    ) -> Result<Answer, CallError> {
        let closed = || CallError::Closed {
            server: spec.name.clone(),
            what: what.to_owned(),
        };
        let timeout = timeout.unwrap_or(spec.call_timeout);
        let progress = caller.progress_token.is_some();
        // Registered before it goes out, for the server's own requests and log messages; its
        // progress comes back on the lane, in order, and goes out here before the answer.
        let _in_call = self.register(connection, caller);
        let mut sent = lane
            .call(call.name, call.arguments, progress, call.as_task)
            .await
            .map_err(|_| closed())?;
        // One deadline for the call and the task it makes.
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let answer = self
            .hear(
                connection,
                spec,
                what,
                &mut sent,
                deadline.as_mut(),
                timeout,
                caller,
            )
            .await?;
        drop(sent);
        if call.as_task
            && let Answer::ToolResult(text) = &answer
            && let Some(task_id) = made_task_id(text)
        {
            // `tasks/result` answers when the task ends; what the task asks for meanwhile
            // comes on it, and goes to this call's client as the call's own would.
            let params = serde_json::json!({ "taskId": task_id });
            let mut sent = lane
                .request("tasks/result", &params)
                .await
                .map_err(|_| closed())?;
            let outcome = self
                .hear(
                    connection,
                    spec,
                    what,
                    &mut sent,
                    deadline.as_mut(),
                    timeout,
                    caller,
                )
                .await;
            if let Err(CallError::Cancelled | CallError::Timeout { .. }) = outcome {
                // Its answer is not awaited: dropping the request forgets it.
                drop(lane.request("tasks/cancel", &params).await);
            }
            return outcome;
        }
        match answer {
            Answer::ToolResult(text) if makes_task(&text) => {
                Box::pin(self.follow_made_task(
                    connection,
                    spec,
                    what,
                    &text,
                    Some(timeout),
                    caller,
                ))
                .await
            }
            answer => Ok(answer),
        }
    }

    /// A lane request's answer, passing its progress on; cancelled with the caller, or when
    /// `deadline` passes, with the server told.
    #[allow(
        clippy::too_many_arguments,
        reason = "exchange_text's, and the request"
    )]
    async fn hear(
        &self,
        connection: &Connection,
        spec: &ServerSpec,
        what: &str,
        sent: &mut SentCall<'_>,
        mut deadline: std::pin::Pin<&mut tokio::time::Sleep>,
        timeout: Duration,
        caller: &Caller,
    ) -> Result<Answer, CallError> {
        let server = &spec.name;
        let closed = || CallError::Closed {
            server: server.clone(),
            what: what.to_owned(),
        };
        let ended = connection.ended();
        let cancelled = caller.cancel.cancelled();
        tokio::pin!(ended, cancelled);
        loop {
            let heard = tokio::select! {
                biased;
                heard = sent.next() => heard,
                () = &mut deadline => {
                    // Boxed: rare, and rmcp's notification future would grow every call's.
                    let id = RequestId::String(sent.id().into());
                    Box::pin(tell_cancelled(&connection.peer, server, id)).await;
                    break Err(CallError::Timeout { server: server.clone(), what: what.to_owned(), after: timeout });
                }
                () = &mut ended => break Err(closed()),
                () = &mut cancelled => {
                    let id = RequestId::String(sent.id().into());
                    Box::pin(tell_cancelled(&connection.peer, server, id)).await;
                    break Err(CallError::Cancelled);
                }
            };
            break match heard {
                Heard::Progress(params) => {
                    if let (Some(client), Some(token)) = (&caller.client, &caller.progress_token) {
                        let progress_to = caller.progress_to.as_ref();
                        relay::pass_progress(client, token.clone(), progress_to, params, server)
                            .await;
                    }
                    continue;
                }
                Heard::Reply(Some(Reply::Result(result))) => Ok(Answer::ToolResult(result)),
                Heard::Reply(Some(Reply::Error(error))) => Err(CallError::Downstream {
                    server: server.clone(),
                    error: Box::new(error),
                }),
                Heard::Reply(None) => Err(closed()),
            };
        }
    }
}

/// The id of the task a call made in the tasks of 2025-11-25 (`{"task": {"taskId": ...}}`,
/// no `resultType`), if the result is one.
fn made_task_id(result: &RawValue) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Created {
        task: Made,
        #[serde(rename = "resultType", default)]
        result_type: Option<IgnoredAny>,
    }
    #[derive(serde::Deserialize)]
    struct Made {
        #[serde(rename = "taskId")]
        task_id: String,
    }
    let created: Created = serde_json::from_str(result.get()).ok()?;
    created
        .result_type
        .is_none()
        .then_some(created.task.task_id)
}

/// Whether a tool call's result (as text) is something other than the call's result: a task
/// the server made of the call (tasks extension), which says so with a `resultType` other
/// than `complete` (or, in its first form, with a `task` member).
fn makes_task(result: &RawValue) -> bool {
    #[derive(serde::Deserialize)]
    struct Members<'a> {
        #[serde(borrow, default)]
        task: Option<&'a RawValue>,
        #[serde(rename = "resultType", borrow, default)]
        result_type: Option<std::borrow::Cow<'a, str>>,
    }
    let text = result.get().as_bytes();
    // Most results have neither: skip the parse for them.
    // Built once: a finder's set-up costs more than searching a short result.
    static RESULT_TYPE: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"resultType\""));
    static TASK: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"task\""));
    if RESULT_TYPE.find(text).is_none() && TASK.find(text).is_none() {
        return false;
    }
    serde_json::from_str::<Members>(result.get()).is_ok_and(|members| {
        members.task.is_some() || members.result_type.is_some_and(|kind| kind != "complete")
    })
}

/// A tool call for a text lane: the server's own tool name and the arguments' text.
#[derive(Debug, Clone, Copy)]
struct TextCall<'a> {
    name: &'a str,
    arguments: Option<&'a RawValue>,
    /// Made a task of at the server (the tool requires it).
    as_task: bool,
}

/// Tell a server that a request it was sent is no longer awaited.
async fn tell_cancelled(peer: &Peer<RoleClient>, server: &ServerName, id: RequestId) {
    let cancelled = CancelledNotification::new(CancelledNotificationParam::new(
        Some(id),
        Some("cancelled by the client".to_owned()),
    ));
    if let Err(error) = peer.send_notification(cancelled.into()).await {
        tracing::debug!(server = %server, error = %error, "could not pass on a cancellation");
    }
}

/// rmcp hands each notification to a task of its own: let those that arrived before an
/// answer pass their progress on before the answer goes out.
async fn let_progress_pass() {
    for _ in 0..3 {
        tokio::task::yield_now().await;
    }
}

/// Ask the caller's client what a downstream (or its task) needs to go on.
async fn ask_for_input(
    spec: &ServerSpec,
    what: &str,
    requests: InputRequests,
    caller: &Caller,
) -> Result<InputResponses, CallError> {
    let Some(client) = &caller.client else {
        return Err(CallError::Failed {
            server: spec.name.clone(),
            what: what.to_owned(),
            error: "the server asks for input, and no client is there to give it".to_owned(),
        });
    };
    bridge::fulfil(client, caller.capabilities.as_deref(), requests)
        .await
        .map_err(|error| CallError::Downstream {
            server: spec.name.clone(),
            error: Box::new(error),
        })
}

/// `request` again, carrying a client's answers to the input it was asked for.
fn with_input(
    request: ClientRequest,
    responses: InputResponses,
    state: Option<String>,
) -> Option<ClientRequest> {
    let mut request = request;
    match &mut request {
        ClientRequest::CallToolRequest(request) => {
            request.params.input_responses = Some(responses);
            request.params.request_state = state;
        }
        ClientRequest::GetPromptRequest(request) => {
            request.params.input_responses = Some(responses);
            request.params.request_state = state;
        }
        ClientRequest::ReadResourceRequest(request) => {
            request.params.input_responses = Some(responses);
            request.params.request_state = state;
        }
        _ => return None,
    }
    Some(request)
}

/// How long a request to `spec`'s server may take: `timeout` (a step's or tool's) or the
/// server's, started again by progress when the server says so, within `max_call_time`.
fn request_options(spec: &ServerSpec, timeout: Option<Duration>) -> PeerRequestOptions {
    let mut options = PeerRequestOptions::with_timeout(timeout.unwrap_or(spec.call_timeout));
    if spec.timeout_resets_on_progress {
        options = options.reset_timeout_on_progress();
        if let Some(max) = spec.max_call_time {
            options = options.with_max_total_timeout(max);
        }
    }
    options
}

fn classify(server: &ServerName, what: &str, error: ServiceError) -> CallError {
    let server = server.clone();
    let what = what.to_owned();
    match error {
        ServiceError::McpError(error) => CallError::Downstream {
            server,
            error: Box::new(error),
        },
        ServiceError::Timeout { timeout } => CallError::Timeout {
            server,
            what,
            after: timeout,
        },
        ServiceError::TransportClosed => CallError::Closed { server, what },
        ServiceError::Cancelled { .. } => CallError::Cancelled,
        other => CallError::Failed {
            server,
            what,
            error: crate::downstream::service_error_text(&other),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use rmcp::ServiceExt;
    use rmcp::model::{CallToolResponse, ProgressNotificationParam};
    use rmcp::service::RequestContext;
    use tokio::time::Instant;

    use super::*;
    use crate::config::Config;

    /// A server whose one tool takes `seconds`, reporting progress every second if asked.
    struct Sleeper;

    impl rmcp::ServerHandler for Sleeper {
        fn get_info(&self) -> rmcp::model::ServerConfig {
            rmcp::model::ServerConfig::new(
                rmcp::model::ServerCapabilities::builder()
                    .enable_tools()
                    .build(),
            )
        }

        async fn call_tool(
            &self,
            request: CallToolRequestParams,
            context: RequestContext<RoleServer>,
        ) -> Result<CallToolResponse, McpError> {
            let arguments = request.arguments.unwrap_or_default();
            let seconds = arguments
                .get("seconds")
                .and_then(|s| s.as_u64())
                .unwrap_or(0);
            let progress = arguments.get("progress").is_some();
            let token = context.meta.get_progress_token();
            for done in 1..=seconds {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let (true, Some(token)) = (progress, &token) {
                    let params = ProgressNotificationParam::new(token.clone(), done as f64);
                    let _ = context.peer.notify_progress(params).await;
                }
            }
            Ok(CallToolResponse::Complete(CallToolResult::success(vec![])))
        }
    }

    fn spec(extra: &str) -> ServerSpec {
        let text = format!("[servers.s]\ncommand = \"x\"\ncall_timeout = \"3s\"\n{extra}");
        let config = Config::parse(&text, Path::new("servers.toml"), |_| None).unwrap();
        config.servers[0].clone()
    }

    /// Call the sleeper over an in-process transport with `spec`'s options; say how long the
    /// call took (in paused time) and whether it timed out.
    async fn timed_call(spec: &ServerSpec, arguments: serde_json::Value) -> (Duration, bool) {
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            if let Ok(service) = Sleeper.serve(server_end).await {
                let _ = service.waiting().await;
            }
        });
        let client = ().serve(client_end).await.unwrap();
        let arguments = arguments.as_object().cloned().unwrap_or_default();
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(
            CallToolRequestParams::new("sleep").with_arguments(arguments),
        ));
        let started = Instant::now();
        let handle = client
            .peer()
            .send_request_with_option(request, request_options(spec, None))
            .await
            .unwrap();
        let outcome = handle.await_response().await;
        let timed_out = matches!(outcome, Err(ServiceError::Timeout { .. }));
        (started.elapsed(), timed_out)
    }

    #[tokio::test(start_paused = true)]
    async fn calls_time_out_and_progress_can_extend_them_within_a_maximum() {
        let plain = spec("");
        let (took, timed_out) = timed_call(&plain, serde_json::json!({"seconds": 10})).await;
        assert!(timed_out);
        assert_eq!(took.as_secs(), 3);

        let resets = spec("timeout_resets_on_progress = true\nmax_call_time = \"7s\"");
        let (took, timed_out) =
            timed_call(&resets, serde_json::json!({"seconds": 5, "progress": true})).await;
        assert!(!timed_out, "progress every second kept a 5 s call alive");
        assert_eq!(took.as_secs(), 5);
        let (took, timed_out) = timed_call(
            &resets,
            serde_json::json!({"seconds": 60, "progress": true}),
        )
        .await;
        assert!(timed_out);
        assert_eq!(took.as_secs(), 7, "but not past max_call_time");
        let (took, timed_out) = timed_call(&resets, serde_json::json!({"seconds": 60})).await;
        assert!(timed_out);
        assert_eq!(took.as_secs(), 3, "silence still times out");
    }
}
