//! Bridging the two ways a server asks its client for input in the middle of a request.
//!
//! Up to 2025-11-25 a server sends the client requests of its own (`sampling/createMessage`,
//! `elicitation/create`, `roots/list`) and waits for the answers. From 2026-07-28 it answers
//! `input_required` instead, and the client sends the request again with the answers (MRTR).
//! Conductor speaks each side's way:
//!
//! - A 2026-07-28 client calling an older downstream: the call runs in a task of its own. A
//!   request the downstream sends is parked and handed to the client as an input request;
//!   the client's retry names the parked call in `requestState`, which answers the downstream
//!   and waits for what comes next ([`Bridge`]).
//! - An older client calling a 2026-07-28 downstream: conductor sends the client each input
//!   request itself and retries the downstream with the answers ([`fulfil`]).

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rmcp::ErrorData as McpError;
use rmcp::model::{
    ClientCapabilities, ClientResult, ElicitRequestParams, InputRequest, InputRequests,
    InputRequiredResult, InputResponses, ServerRequest, ServerResult,
};
use rmcp::service::{Peer, RoleServer};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::router::{Answer, CallError, Caller};

/// How many input rounds conductor drives for an older client before it gives up.
pub const MAX_ROUNDS: usize = 10;

/// `requestState` values conductor hands out start with this; others belong to a downstream.
const STATE_PREFIX: &str = "conductor-bridge:";

/// A parked call whose client never came back is dropped (and cancelled downstream) after this.
const PARK_LIMIT: Duration = Duration::from_secs(600);

/// One request from a downstream, waiting for a 2026-07-28 client's answer.
#[derive(Debug)]
pub struct Ask {
    pub request: InputRequest,
    pub reply: oneshot::Sender<Result<Value, McpError>>,
}

/// Where a downstream's requests go when its caller answers them by retrying.
pub type Asks = mpsc::UnboundedSender<Ask>;

/// A call waiting for its client to retry with answers.
#[derive(Debug)]
struct Parked {
    outcome: JoinHandle<Result<Answer, CallError>>,
    asks: mpsc::UnboundedReceiver<Ask>,
    /// The downstream requests handed out, by the key the client answers them under.
    pending: HashMap<String, oneshot::Sender<Result<Value, McpError>>>,
    /// Cancels the call downstream.
    cancel: CancellationToken,
    since: Instant,
}

impl Drop for Parked {
    fn drop(&mut self) {
        // Unanswered downstream requests fail (their senders drop), and the call is cancelled.
        self.cancel.cancel();
    }
}

/// Calls of 2026-07-28 clients parked between rounds. Shared by every session: a stateless
/// client's retry may arrive on another connection.
#[derive(Debug, Default)]
pub struct Bridge {
    parked: DashMap<String, Parked>,
}

impl Bridge {
    /// Whether a `requestState` is one conductor handed out.
    pub fn owns(state: Option<&str>) -> bool {
        state.is_some_and(|state| state.starts_with(STATE_PREFIX))
    }

    /// Run `call` for a 2026-07-28 client: its result, or `input_required` with what the
    /// downstream asked for while it runs.
    pub async fn start<F, Fut>(&self, caller: &Caller, call: F) -> Result<Answer, CallError>
    where
        F: FnOnce(Caller) -> Fut,
        Fut: Future<Output = Result<Answer, CallError>> + Send + 'static,
    {
        let (asks, receiver) = mpsc::unbounded_channel();
        // The call outlives this request when it is parked: it has a cancellation of its own.
        let cancel = CancellationToken::new();
        let inner = Caller {
            cancel: cancel.clone(),
            asks: Some(asks),
            ..caller.clone()
        };
        let parked = Parked {
            // Boxed: tokio moves a task's future as it starts and ends it, and a call's is
            // large (docs/performance.md).
            outcome: tokio::spawn(Box::pin(call(inner))),
            asks: receiver,
            pending: HashMap::new(),
            cancel,
            since: Instant::now(),
        };
        self.wait(parked, &caller.cancel).await
    }

    /// Continue a parked call with the client's answers.
    pub async fn resume(
        &self,
        state: &str,
        responses: Option<InputResponses>,
        cancel: &CancellationToken,
    ) -> Result<Answer, CallError> {
        let Some((_, mut parked)) = self.parked.remove(state) else {
            return Err(CallError::Unroutable(format!(
                "retry: `requestState` `{state}` names no waiting call (it was answered, or expired after {} min)",
                PARK_LIMIT.as_secs() / 60
            )));
        };
        let mut responses = responses.unwrap_or_default();
        for (key, reply) in parked.pending.drain() {
            let answer = responses.remove(&key).ok_or_else(|| {
                McpError::invalid_params(
                    format!("the client's retry did not answer input request `{key}`"),
                    None,
                )
            });
            let _ = reply.send(answer);
        }
        self.wait(parked, cancel).await
    }

    /// Wait for the call's result, or for its next requests, which park it again.
    async fn wait(
        &self,
        mut parked: Parked,
        cancel: &CancellationToken,
    ) -> Result<Answer, CallError> {
        let first = tokio::select! {
            outcome = &mut parked.outcome => {
                return outcome.unwrap_or_else(|error| Err(CallError::Unroutable(format!("the call's task failed: {error}"))));
            }
            Some(ask) = parked.asks.recv() => ask,
            () = cancel.cancelled() => return Err(CallError::Cancelled),
        };
        let mut requests = InputRequests::new();
        let mut next = Some(first);
        while let Some(Ask { request, reply }) = next {
            let key = format!("input-{}", fastrand::u64(..));
            requests.insert(key.clone(), request);
            parked.pending.insert(key, reply);
            // Requests sent together are asked together.
            next = parked.asks.try_recv().ok();
        }
        let state = format!(
            "{STATE_PREFIX}{:016x}{:016x}",
            fastrand::u64(..),
            fastrand::u64(..)
        );
        parked.since = Instant::now();
        self.parked
            .retain(|_, parked| parked.since.elapsed() < PARK_LIMIT);
        self.parked.insert(state.clone(), parked);
        Ok(Answer::from(ServerResult::InputRequiredResult(
            InputRequiredResult::new(Some(requests), Some(state)),
        )))
    }
}

/// Ask an older client each of a 2026-07-28 downstream's input requests, as the server-to-client
/// requests they stand for; the answers, under the same keys, go into the retry.
pub async fn fulfil(
    client: &Peer<RoleServer>,
    capabilities: Option<&ClientCapabilities>,
    requests: InputRequests,
) -> Result<InputResponses, McpError> {
    let mut responses = InputResponses::new();
    for (key, request) in requests {
        let Some((method, request)) = as_server_request(request) else {
            return Err(McpError::invalid_params(
                format!("input request `{key}` is of a kind conductor cannot pass to the client"),
                None,
            ));
        };
        let answer = ask(client, capabilities, method, request).await?;
        let answer = serde_json::to_value(&answer).map_err(|error| {
            McpError::internal_error(format!("the client's `{method}` answer: {error}"), None)
        })?;
        responses.insert(key, answer);
    }
    Ok(responses)
}

/// Send a client one of a downstream's requests, if it declared the capability for it; its
/// answer, or its error, comes back unchanged.
pub async fn ask(
    client: &Peer<RoleServer>,
    capabilities: Option<&ClientCapabilities>,
    method: &str,
    request: ServerRequest,
) -> Result<ClientResult, McpError> {
    if !capable(capabilities, &request) {
        return Err(McpError::new(
            rmcp::model::ErrorCode::METHOD_NOT_FOUND,
            format!("the client connected to conductor does not support `{method}`"),
            None,
        ));
    }
    client
        .send_request(request)
        .await
        .map_err(|error| match error {
            rmcp::ServiceError::McpError(error) => error,
            other => McpError::internal_error(
                format!(
                    "passing `{method}` to the client failed: {}",
                    crate::downstream::service_error_text(&other)
                ),
                None,
            ),
        })
}

/// An input request as the server-to-client request it stands for, with its method name.
pub fn as_server_request(request: InputRequest) -> Option<(&'static str, ServerRequest)> {
    Some(match request {
        InputRequest::CreateMessage(request) => (
            "sampling/createMessage",
            ServerRequest::CreateMessageRequest(request),
        ),
        InputRequest::Elicitation(request) => {
            ("elicitation/create", ServerRequest::ElicitRequest(request))
        }
        InputRequest::ListRoots(request) => {
            ("roots/list", ServerRequest::ListRootsRequest(request))
        }
        _ => return None,
    })
}

/// A server-to-client request as an input request, if it is one of the three kinds MRTR carries.
pub fn as_input_request(request: ServerRequest) -> Option<InputRequest> {
    match request {
        ServerRequest::CreateMessageRequest(request) => Some(InputRequest::CreateMessage(request)),
        ServerRequest::ElicitRequest(request) => Some(InputRequest::Elicitation(request)),
        ServerRequest::ListRootsRequest(request) => Some(InputRequest::ListRoots(request)),
        _ => None,
    }
}

/// Read a client's answer to an input request back as the result type the downstream expects.
pub fn answer_as(method: &str, answer: Value) -> Result<ClientResult, McpError> {
    let parsed = match method {
        "sampling/createMessage" => serde_json::from_value(answer)
            .map(|result| ClientResult::CreateMessageResult(Box::new(result))),
        "elicitation/create" => serde_json::from_value(answer).map(ClientResult::ElicitResult),
        _ => serde_json::from_value(answer).map(ClientResult::ListRootsResult),
    };
    parsed.map_err(|error| {
        McpError::invalid_params(format!("the client's answer to `{method}`: {error}"), None)
    })
}

/// Whether the client declared the capability a request needs. Unknown capabilities (a client
/// that declares them per request and did not) get the benefit of the doubt.
pub fn capable(capabilities: Option<&ClientCapabilities>, request: &ServerRequest) -> bool {
    let Some(capabilities) = capabilities else {
        return true;
    };
    match request {
        ServerRequest::CreateMessageRequest(_) => capabilities.sampling.is_some(),
        // An empty `elicitation` means the form mode alone (as before URL mode existed).
        ServerRequest::ElicitRequest(request) => match &request.params {
            ElicitRequestParams::UrlElicitationParams { .. } => capabilities
                .elicitation
                .as_ref()
                .is_some_and(|elicitation| elicitation.url.is_some()),
            _ => capabilities.elicitation.is_some(),
        },
        ServerRequest::ListRootsRequest(_) => capabilities.roots.is_some(),
        _ => true,
    }
}
