//! The client side of a downstream connection: what conductor says it is, and what it does
//! with the notifications the downstream sends.
#![allow(
    deprecated,
    reason = "logging is deprecated in 2026-07-28, but older downstreams still send it"
)]

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    ClientCapabilities, ClientConfig, ClientResult, CreateMessageRequest,
    CreateMessageRequestParams, CreateMessageResult, ElicitRequest, ElicitRequestParams,
    ElicitResult, ElicitationCapability, FormElicitationCapability, Implementation,
    ListRootsRequest, ListRootsResult, LoggingLevel, LoggingMessageNotificationParam,
    ProgressNotificationParam, ResourceUpdatedNotificationParam, Root, ServerRequest,
    UrlElicitationCapability,
};
use rmcp::service::{
    InboundStreamOrigin, NotificationContext, Peer, RequestContext, RoleClient, RoleServer,
};
use rmcp::{ClientHandler, ErrorData as McpError};
use tokio::sync::{mpsc, oneshot};

use super::{ConnectionId, Event, ListKind};
use crate::bridge::{self, Ask};
use crate::config::ServerName;
use crate::relay::{self, NoAsker, Relay, UpdateTarget};

/// Handles one downstream connection's notifications and requests: list changes and its end
/// become [`Event`]s; progress, log messages and its requests to a client go, through the
/// [`Relay`], to the client whose request caused them.
#[derive(Debug, Clone)]
pub struct DownstreamClient {
    server: ServerName,
    connection: ConnectionId,
    events: mpsc::UnboundedSender<Event>,
    relay: Arc<Relay>,
    /// For a session's own child, its one client and what it declared it can answer.
    client: Option<(Peer<RoleServer>, ClientCapabilities)>,
    /// The roots its config gives it, for a shared server.
    roots: Vec<String>,
    /// Told once the server has been given roots.
    gave_roots: Arc<tokio::sync::watch::Sender<bool>>,
}

/// How long a session's child asking for roots waits for its client's next call, through
/// which a 2026-07-28 client is asked.
const ROOTS_WAIT_FOR_CALL: Duration = Duration::from_secs(30);

impl DownstreamClient {
    pub fn new(
        server: ServerName,
        connection: ConnectionId,
        events: mpsc::UnboundedSender<Event>,
        relay: Arc<Relay>,
        client: Option<(Peer<RoleServer>, ClientCapabilities)>,
        roots: Vec<String>,
        gave_roots: tokio::sync::watch::Sender<bool>,
    ) -> Self {
        DownstreamClient {
            server,
            connection,
            events,
            relay,
            client,
            roots,
            gave_roots: Arc::new(gave_roots),
        }
    }

    /// Pass a downstream's request to the client it is for, if that client can answer it;
    /// the answer comes back unchanged. A 2026-07-28 client gets it as an input request of
    /// its call (see [`crate::bridge`]). Where conductor cannot tell which client it is for,
    /// it refuses rather than guess: the request may carry one client's data.
    async fn ask_client(
        &self,
        method: &str,
        request: ServerRequest,
        context: &RequestContext<RoleClient>,
    ) -> Result<ClientResult, McpError> {
        let inbound = match context.extensions.get::<InboundStreamOrigin>() {
            Some(InboundStreamOrigin::OutboundRequest(id)) => Some(id),
            _ => None,
        };
        let origin = match self
            .relay
            .asker_of(self.connection, inbound, self.client.is_some())
        {
            Ok(origin) => origin,
            Err(why) => {
                let server = &self.server;
                let message = match why {
                    NoAsker::NoCall => format!(
                        "conductor refused `{method}` from `{server}`: no client call is in flight on it, so there is no client to ask"
                    ),
                    NoAsker::Ambiguous => format!(
                        "conductor refused `{method}` from `{server}`: calls of several clients are in flight on this shared server and it cannot tell which one is asking; set `isolation = \"session\"` on `[servers.{server}]` to give each client its own"
                    ),
                };
                tracing::warn!(server = %server, method, "{message}");
                return Err(McpError::internal_error(message, None));
            }
        };
        let capabilities = origin.capabilities.as_deref();
        if let Some(asks) = &origin.asks
            && bridge::capable(capabilities, &request)
            && let Some(input) = bridge::as_input_request(request.clone())
        {
            let (reply, answer) = oneshot::channel();
            let gone = || {
                McpError::internal_error(
                    format!("the client's call ended before it answered `{method}`"),
                    None,
                )
            };
            asks.send(Ask {
                request: input,
                reply,
            })
            .map_err(|_| gone())?;
            let answer = answer.await.map_err(|_| gone())??;
            return bridge::answer_as(method, answer);
        }
        bridge::ask(&origin.peer, capabilities, method, request).await
    }

    /// The roots the server is given: a shared server's are those of its config, whoever
    /// is calling, so no client can widen or narrow what every other client's calls see.
    /// A session's own child gets its client's: through the call in flight (which reaches
    /// a 2026-07-28 client as input), or else straight from a client that declared roots;
    /// one that did not has none to give.
    async fn roots_for(
        &self,
        context: &RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, McpError> {
        let Some((client, declared)) = &self.client else {
            return Ok(configured_roots(&self.roots));
        };
        // A client that declares roots in its requests (2026-07-28) can be asked only through
        // a call: a child that asks before its session's first call waits for that call.
        let asked_through_calls = declared.roots.is_some() && !relay::declares_roots(client);
        if asked_through_calls {
            let waited = tokio::time::timeout(ROOTS_WAIT_FOR_CALL, async {
                while !self.relay.in_call(self.connection) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
            if waited.await.is_err() {
                return Ok(configured_roots(&self.roots));
            }
        }
        if self.relay.in_call(self.connection) {
            let request = ServerRequest::ListRootsRequest(ListRootsRequest::default());
            return match self.ask_client("roots/list", request, context).await? {
                ClientResult::ListRootsResult(result) => Ok(result),
                _ => Err(unexpected("roots/list")),
            };
        }
        if declared.roots.is_none() || !relay::declares_roots(client) {
            return Ok(configured_roots(&self.roots));
        }
        let request = ServerRequest::ListRootsRequest(ListRootsRequest::default());
        match bridge::ask(client, None, "roots/list", request).await? {
            ClientResult::ListRootsResult(result) => Ok(result),
            _ => Err(unexpected("roots/list")),
        }
    }

    fn list_changed(&self, kind: ListKind) {
        self.relay.heard_list_change();
        let _ = self.events.send(Event::ListChanged {
            server: self.server.clone(),
            kind,
        });
    }
}

impl ClientHandler for DownstreamClient {
    fn get_info(&self) -> ClientConfig {
        // Shared downstreams start before any client connects, so every capability a client
        // may have is offered, and a request the current client cannot answer gets an error.
        // A session's own child is offered what its one client can do. Tasks are followed by
        // conductor itself (`Router::follow_task`), whatever the client.
        let mut capabilities = ClientCapabilities::builder()
            .enable_roots()
            .enable_roots_list_changed()
            .enable_sampling()
            .enable_tasks()
            .build();
        // Both modes: a server offers URL elicitation's tools only to clients that take it.
        capabilities.elicitation = Some(
            ElicitationCapability::new()
                .with_form(FormElicitationCapability::default())
                .with_url(UrlElicitationCapability::default()),
        );
        if let Some((_, client)) = &self.client {
            if self.roots.is_empty() {
                capabilities.roots.clone_from(&client.roots);
            }
            capabilities.sampling.clone_from(&client.sampling);
            capabilities.elicitation.clone_from(&client.elicitation);
        }
        ClientConfig::new(
            capabilities,
            Implementation::new("mcp-conductor", env!("CARGO_PKG_VERSION")),
        )
    }

    async fn create_message(
        &self,
        params: CreateMessageRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<CreateMessageResult, McpError> {
        let request = ServerRequest::CreateMessageRequest(CreateMessageRequest::new(params));
        match self
            .ask_client("sampling/createMessage", request, &context)
            .await?
        {
            ClientResult::CreateMessageResult(result) => Ok(*result),
            _ => Err(unexpected("sampling/createMessage")),
        }
    }

    async fn create_elicitation(
        &self,
        params: ElicitRequestParams,
        context: RequestContext<RoleClient>,
    ) -> Result<ElicitResult, McpError> {
        let request = ServerRequest::ElicitRequest(ElicitRequest::new(params));
        match self
            .ask_client("elicitation/create", request, &context)
            .await?
        {
            ClientResult::ElicitResult(result) => Ok(result),
            _ => Err(unexpected("elicitation/create")),
        }
    }

    async fn list_roots(
        &self,
        context: RequestContext<RoleClient>,
    ) -> Result<ListRootsResult, McpError> {
        let roots = self.roots_for(&context).await;
        if roots.is_ok() {
            self.gave_roots.send_replace(true);
        }
        roots
    }

    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        // Progress on a request the client did not ask progress for stays here.
        let Some(origin) = self.relay.origin(self.connection, &params.progress_token) else {
            return;
        };
        let Some(token) = origin.progress_token else {
            return;
        };
        let progress_to = origin.progress_to.as_ref();
        relay::pass_progress(&origin.peer, token, progress_to, params, &self.server).await;
    }

    async fn on_resource_updated(
        &self,
        params: ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        pass_resource_update(&self.relay, &self.server, params).await;
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Tools);
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Prompts);
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.list_changed(ListKind::Resources);
    }

    async fn on_logging_message(
        &self,
        params: LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let server = &self.server;
        if let Some(origin) = self.relay.origin_of(self.connection, self.client.is_some())
            && origin.logs.wants(params.level)
        {
            let client = origin.peer;
            // The server's name says where it came from; its own logger name follows.
            let mut forwarded = params.clone();
            forwarded.logger = Some(match &params.logger {
                Some(logger) => format!("{server}/{logger}"),
                None => server.to_string(),
            });
            if let Err(error) = client.notify_logging_message(forwarded).await {
                tracing::debug!(server = %server, error = %error, "could not pass a log message on");
            }
        }
        let logger = params.logger.as_deref().unwrap_or("");
        let data = params.data;
        match params.level {
            LoggingLevel::Debug => {
                tracing::debug!(server = %server, logger, %data, "downstream log")
            }
            LoggingLevel::Info | LoggingLevel::Notice => {
                tracing::info!(server = %server, logger, %data, "downstream log")
            }
            LoggingLevel::Warning => {
                tracing::warn!(server = %server, logger, %data, "downstream log")
            }
            _ => tracing::error!(server = %server, logger, %data, "downstream log"),
        }
    }
}

/// The roots a server's config gives it, as `roots/list` answers them.
fn configured_roots(roots: &[String]) -> ListRootsResult {
    ListRootsResult::new(roots.iter().map(|uri| Root::new(uri.clone())).collect())
}

fn unexpected(method: &str) -> McpError {
    McpError::internal_error(
        format!("the client answered `{method}` with another kind of result"),
        None,
    )
}

/// A server's resource changed: tell every session and listen stream subscribed to it, under
/// the URI each knows it by. Updates come here from `resources/subscribe` (as notifications on
/// the connection) and from a 2026-07-28 server's `subscriptions/listen` stream.
pub(super) async fn pass_resource_update(
    relay: &Relay,
    server: &ServerName,
    params: ResourceUpdatedNotificationParam,
) {
    for (target, public_uri) in relay.subscribers(server, &params.uri) {
        let sent = match target {
            UpdateTarget::Session(peer) => {
                let mut params = params.clone();
                params.uri = public_uri;
                peer.notify_resource_updated(params)
                    .await
                    .map_err(|error| error.to_string())
            }
            UpdateTarget::Listen(sink) => sink
                .notify_resource_updated(public_uri)
                .await
                .map_err(|error| error.to_string()),
        };
        if let Err(error) = sent {
            tracing::debug!(server = %server, error = %error, "could not pass a resource update on");
        }
    }
}
