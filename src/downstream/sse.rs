//! Reaching a downstream over the legacy HTTP+SSE transport (2024-11-05), which rmcp no longer
//! ships: GET its event stream, learn from the first event where to POST, and POST every
//! message there; answers and notifications come back on the stream.

use futures::StreamExt;
use reqwest::header::{ACCEPT, HeaderMap};
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::service::RoleClient;
use rmcp::transport::Transport;
use sse_stream::SseStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::ConnectError;

/// Messages buffered from the stream before the reader waits for the service to take them.
const INCOMING_CAPACITY: usize = 64;

/// Why a message could not be posted.
#[derive(Debug, thiserror::Error)]
pub enum SseSendError {
    #[error("posting to `{endpoint}` failed: {error}")]
    Post { endpoint: String, error: String },
    #[error("`{endpoint}` refused the message with HTTP {status}")]
    Refused { endpoint: String, status: u16 },
}

/// A live legacy SSE connection, as an rmcp transport.
pub struct SseClient {
    client: reqwest::Client,
    endpoint: reqwest::Url,
    headers: HeaderMap,
    incoming: mpsc::Receiver<ServerJsonRpcMessage>,
    reader: JoinHandle<()>,
}

/// Open the event stream at `url` and wait for the server to say where messages go.
pub async fn connect(url: &str, headers: HeaderMap) -> Result<SseClient, ConnectError> {
    let failed = |what: String| ConnectError::Handshake(what);
    let base = reqwest::Url::parse(url)
        .map_err(|error| failed(format!("`{url}` is not a URL: {error}")))?;
    let client = reqwest::Client::new();
    let response = client
        .get(base.clone())
        .headers(headers.clone())
        .header(ACCEPT, "text/event-stream")
        .send()
        .await
        .map_err(|error| failed(format!("cannot open the event stream at `{url}`: {error}")))?;
    if !response.status().is_success() {
        return Err(failed(format!(
            "`{url}` answered HTTP {} to the event stream request",
            response.status().as_u16()
        )));
    }
    let mut events = SseStream::from_bytes_stream(response.bytes_stream());
    let endpoint = loop {
        match events.next().await {
            Some(Ok(event)) if event.event.as_deref() == Some("endpoint") => {
                let path = event.data.unwrap_or_default();
                break base.join(path.trim()).map_err(|error| {
                    failed(format!(
                        "the server named an endpoint `{path}` that is not a URL: {error}"
                    ))
                })?;
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return Err(failed(format!("the event stream broke: {error}"))),
            None => {
                return Err(failed(
                    "the event stream ended before naming an endpoint".to_owned(),
                ));
            }
        }
    };
    let (sender, incoming) = mpsc::channel(INCOMING_CAPACITY);
    let reader = tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let Ok(event) = event else { break };
            if event.event.as_deref().is_some_and(|kind| kind != "message") {
                continue;
            }
            let Some(data) = event.data else { continue };
            match serde_json::from_str::<ServerJsonRpcMessage>(&data) {
                Ok(message) => {
                    if sender.send(message).await.is_err() {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(error = %error, "a downstream SSE message is not JSON-RPC; ignored")
                }
            }
        }
        // Dropping the sender ends `receive`, which ends the connection.
    });
    Ok(SseClient {
        client,
        endpoint,
        headers,
        incoming,
        reader,
    })
}

impl Transport<RoleClient> for SseClient {
    type Error = SseSendError;

    fn send(
        &mut self,
        item: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let endpoint = self.endpoint.to_string();
        let request = self
            .client
            .post(self.endpoint.clone())
            .headers(self.headers.clone())
            .json(&item);
        async move {
            let response = request.send().await.map_err(|error| SseSendError::Post {
                endpoint: endpoint.clone(),
                error: error.to_string(),
            })?;
            if response.status().is_success() {
                Ok(())
            } else {
                Err(SseSendError::Refused {
                    endpoint,
                    status: response.status().as_u16(),
                })
            }
        }
    }

    fn receive(&mut self) -> impl Future<Output = Option<ServerJsonRpcMessage>> + Send {
        self.incoming.recv()
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.reader.abort();
        Ok(())
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        self.reader.abort();
    }
}
