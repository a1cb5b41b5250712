//! The text lane of a stdio connection: `tools/call` requests written to the child as text,
//! and their answers taken from its output before rmcp would parse them. Everything else on
//! the connection (the handshake, lists, notifications, the child's own requests) goes
//! through rmcp as before; the lane's requests carry string ids (`cd-N`) that rmcp, which
//! numbers its own, never uses.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use memchr::memmem::Finder;
use rmcp::model::ErrorData;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

use crate::wire::{BoxFuture, Peek, Tap, Writer};

/// What the lane's ids start with, as they appear in the text (quoted).
const ID_PREFIX: &str = "\"cd-";

/// The answer to a call on the lane.
#[derive(Debug)]
pub enum Reply {
    /// The `result`, as the server wrote it.
    Result(Box<RawValue>),
    /// The server's JSON-RPC error.
    Error(ErrorData),
}

/// Tool calls in flight on one child's pipes, by number.
#[derive(Debug)]
pub struct TextLane {
    writer: Writer,
    pending: Mutex<HashMap<u64, oneshot::Sender<Reply>>>,
    next: AtomicU64,
}

/// A call sent on the lane; dropping it forgets the call (its answer, if it comes, is dropped).
#[derive(Debug)]
pub struct SentCall<'a> {
    lane: &'a TextLane,
    number: u64,
    /// `cd-N`.
    id: String,
    answer: oneshot::Receiver<Reply>,
}

impl SentCall<'_> {
    /// The request's id as rmcp names it, for `notifications/cancelled` and progress tokens.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The answer; `None` if the connection ended first.
    pub async fn answer(&mut self) -> Option<Reply> {
        (&mut self.answer).await.ok()
    }
}

impl Drop for SentCall<'_> {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.lane.pending.lock() {
            pending.remove(&self.number);
        }
    }
}

impl TextLane {
    pub fn new(writer: Writer) -> Self {
        TextLane {
            writer,
            pending: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// Write `tools/call` of `name` with `arguments` (an object's text) to the child. With
    /// `progress`, the request's id is its progress token too.
    pub async fn call(
        &self,
        name: &str,
        arguments: Option<&RawValue>,
        progress: bool,
    ) -> std::io::Result<SentCall<'_>> {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(number, reply);
        }
        // Registered before it is written: the answer may come before the write returns.
        let sent = SentCall {
            lane: self,
            number,
            id: format!("cd-{number}"),
            answer,
        };
        let name = serde_json::to_string(name).map_err(std::io::Error::other)?;
        let arguments = arguments.map_or("{}", RawValue::get);
        let mut line = Vec::with_capacity(112 + name.len() + arguments.len());
        line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":\"");
        line.extend_from_slice(sent.id.as_bytes());
        line.extend_from_slice(b"\",\"method\":\"tools/call\",\"params\":{\"name\":");
        line.extend_from_slice(name.as_bytes());
        line.extend_from_slice(b",\"arguments\":");
        line.extend_from_slice(arguments.as_bytes());
        if progress {
            line.extend_from_slice(b",\"_meta\":{\"progressToken\":\"");
            line.extend_from_slice(sent.id.as_bytes());
            line.extend_from_slice(b"\"}");
        }
        line.extend_from_slice(b"}}");
        self.writer.write_line(line).await?;
        Ok(sent)
    }

    /// The number of a lane id's text (`"cd-12"`), if it is one.
    fn number_of(id: &RawValue) -> Option<u64> {
        id.get()
            .strip_prefix(ID_PREFIX)?
            .strip_suffix('"')?
            .parse()
            .ok()
    }
}

impl Tap for TextLane {
    fn take(&self, line: &[u8]) -> bool {
        // Most lines are not the lane's: skip the parse for them.
        // Built once: a finder's set-up costs more than searching a short line.
        static LANE_ID: LazyLock<Finder> = LazyLock::new(|| Finder::new(ID_PREFIX.as_bytes()));
        if LANE_ID.find(line).is_none() {
            return false;
        }
        let Some(peek) = Peek::of(line) else {
            return false;
        };
        let Some(number) = peek.id.and_then(TextLane::number_of) else {
            return false;
        };
        if peek.method.is_some() {
            // The child's own request, with an id like ours: rmcp's.
            return false;
        }
        let reply = match (peek.result, peek.error) {
            (Some(result), _) => Reply::Result(result.to_owned()),
            (None, Some(error)) => {
                Reply::Error(serde_json::from_str(error.get()).unwrap_or_else(|parse| {
                    ErrorData::internal_error(
                        format!("the server answered with an error conductor cannot read: {parse}"),
                        None,
                    )
                }))
            }
            (None, None) => Reply::Error(ErrorData::internal_error(
                "the server answered with neither a result nor an error",
                None,
            )),
        };
        let waiting = self
            .pending
            .lock()
            .ok()
            .and_then(|mut pending| pending.remove(&number));
        match waiting {
            Some(waiting) => {
                let _ = waiting.send(reply);
            }
            // Timed out or cancelled meanwhile: nobody waits for it any more.
            None => tracing::debug!(id = number, "dropping the answer to a call nobody awaits"),
        }
        true
    }

    fn ended(&self) -> BoxFuture {
        // Calls in flight learn that the connection ended: their senders are dropped.
        if let Ok(mut pending) = self.pending.lock() {
            pending.clear();
        }
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_is_written_as_text_and_its_answer_taken_back() {
        let (ours, theirs) = tokio::io::duplex(4096);
        let (_, write) = tokio::io::split(ours);
        let lane = TextLane::new(Writer::new(write));
        let arguments = RawValue::from_string(r#"{"text": "hi"}"#.to_owned()).unwrap();
        let mut sent = lane.call("echo", Some(&arguments), true).await.unwrap();
        let mut written = String::new();
        let mut theirs = tokio::io::BufReader::new(theirs);
        tokio::io::AsyncBufReadExt::read_line(&mut theirs, &mut written)
            .await
            .unwrap();
        let request: serde_json::Value = serde_json::from_str(&written).unwrap();
        assert_eq!(
            request,
            serde_json::json!({"jsonrpc": "2.0", "id": sent.id(), "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "hi"},
                           "_meta": {"progressToken": sent.id()}}})
        );
        assert!(
            !lane.take(br#"{"jsonrpc":"2.0","id":3,"result":{}}"#),
            "rmcp's own"
        );
        let request = format!(
            r#"{{"jsonrpc":"2.0","id":"{}","method":"ping"}}"#,
            sent.id()
        );
        assert!(!lane.take(request.as_bytes()), "the child's own request");
        let answer = format!(
            r#"{{"result":{{"content":[]}},"jsonrpc":"2.0","id":"{}"}}"#,
            sent.id()
        );
        assert!(lane.take(answer.as_bytes()));
        match sent.answer().await {
            Some(Reply::Result(result)) => assert_eq!(result.get(), r#"{"content":[]}"#),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn calls_in_flight_end_with_the_connection() {
        let (ours, _theirs) = tokio::io::duplex(4096);
        let (_, write) = tokio::io::split(ours);
        let lane = TextLane::new(Writer::new(write));
        let mut sent = lane.call("echo", None, false).await.unwrap();
        lane.ended().await;
        assert!(sent.answer().await.is_none());
    }
}
