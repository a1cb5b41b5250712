//! The text lane of a stdio connection: `tools/call` requests written to the child as text,
//! and their answers taken from its output before rmcp would parse them. Everything else on
//! the connection (the handshake, lists, notifications, the child's own requests) goes
//! through rmcp as before; the lane's requests carry string ids (`cd-N`) that rmcp, which
//! numbers its own, never uses. Progress on a lane call (its token is its id) is taken too,
//! and handed to the call in the order it came, ahead of the answer that follows it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

use memchr::memmem::Finder;
use rmcp::model::{ErrorCode, ErrorData, NumberOrString, ProgressNotificationParam};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

use crate::maps::HashMap;
use crate::wire::{BoxFuture, Peek, Refusal, Tap, Writer};

/// What the lane's ids start with.
const ID_START: &str = "cd-";
/// The same, as they appear in the text (quoted).
const ID_PREFIX: &str = "\"cd-";

/// The answer to a call on the lane.
#[derive(Debug)]
pub enum Reply {
    /// The `result`, as the server wrote it.
    Result(Box<RawValue>),
    /// The server's JSON-RPC error.
    Error(ErrorData),
}

/// What a call on the lane hears next: progress, then its answer.
#[derive(Debug)]
pub enum Heard {
    Progress(ProgressNotificationParam),
    /// `None` if the connection ended first.
    Reply(Option<Reply>),
}

/// Tool calls in flight on one child's pipes, by number.
#[derive(Debug)]
pub struct TextLane {
    writer: Writer,
    pending: Mutex<HashMap<u64, Pending>>,
    next: AtomicU64,
    /// Tools' `execution`, by name, from `tools/list` answers (see [`TextLane::take_executions`]).
    executions: Mutex<HashMap<String, serde_json::Value>>,
    /// The longest message read from the child, to name in the error of a call whose
    /// answer is longer.
    max_line: usize,
}

/// Where what the tap takes for a call goes. Most calls hear only their answer, so a call
/// starts with a oneshot; its first progress brings a queue that the rest (more progress,
/// then the answer) follows on, in the order the child wrote it.
#[derive(Debug)]
enum Pending {
    Waiting {
        first: oneshot::Sender<First>,
        /// Whether the call asked for progress.
        progress: bool,
    },
    Streaming(mpsc::UnboundedSender<Heard>),
}

/// What a call hears first.
#[derive(Debug)]
enum First {
    Reply(Reply),
    Progress(ProgressNotificationParam, mpsc::UnboundedReceiver<Heard>),
}

/// A call sent on the lane; dropping it forgets the call (its answer, if it comes, is dropped).
#[derive(Debug)]
pub struct SentCall<'a> {
    lane: &'a TextLane,
    number: u64,
    hearing: Hearing,
}

#[derive(Debug)]
enum Hearing {
    First(oneshot::Receiver<First>),
    Rest(mpsc::UnboundedReceiver<Heard>),
}

impl SentCall<'_> {
    /// The request's id as rmcp names it (`cd-N`), for `notifications/cancelled`.
    pub fn id(&self) -> String {
        format!("{ID_START}{}", self.number)
    }

    /// The answer, past any progress; `None` if the connection ended first.
    pub async fn answer(&mut self) -> Option<Reply> {
        loop {
            if let Heard::Reply(reply) = self.next().await {
                return reply;
            }
        }
    }

    /// The call's next progress, or else its answer. Cancel-safe.
    pub async fn next(&mut self) -> Heard {
        match &mut self.hearing {
            Hearing::First(first) => match first.await {
                Ok(First::Reply(reply)) => Heard::Reply(Some(reply)),
                Ok(First::Progress(params, rest)) => {
                    self.hearing = Hearing::Rest(rest);
                    Heard::Progress(params)
                }
                Err(_) => Heard::Reply(None),
            },
            Hearing::Rest(rest) => rest.recv().await.unwrap_or(Heard::Reply(None)),
        }
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
    pub fn new(writer: Writer, max_line: usize) -> Self {
        TextLane {
            writer,
            pending: Mutex::default(),
            next: AtomicU64::new(1),
            executions: Mutex::default(),
            max_line,
        }
    }

    /// Write `tools/call` of `name` with `arguments` (an object's text) to the child. With
    /// `progress`, the request's id is its progress token too; `as_task` asks the server to
    /// make a task of it (tasks of 2025-11-25, for a tool whose `execution` requires one).
    pub async fn call(
        &self,
        name: &str,
        arguments: Option<&RawValue>,
        progress: bool,
        as_task: bool,
    ) -> std::io::Result<SentCall<'_>> {
        use std::io::Write;
        let (number, sent) = self.register(progress);
        let arguments = arguments.map_or("{}", RawValue::get);
        // The whole line, with room for two ids, the name's escapes and the newline.
        let mut line = Vec::with_capacity(180 + name.len() + arguments.len());
        line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":\"");
        write!(line, "{ID_START}{number}")?;
        line.extend_from_slice(b"\",\"method\":\"tools/call\",\"params\":{\"name\":");
        serde_json::to_writer(&mut line, name).map_err(std::io::Error::other)?;
        line.extend_from_slice(b",\"arguments\":");
        line.extend_from_slice(arguments.as_bytes());
        if progress {
            line.extend_from_slice(b",\"_meta\":{\"progressToken\":\"");
            write!(line, "{ID_START}{number}")?;
            line.extend_from_slice(b"\"}");
        }
        if as_task {
            line.extend_from_slice(b",\"task\":{}");
        }
        line.extend_from_slice(b"}}");
        self.writer.write_line(line).await?;
        Ok(sent)
    }

    /// Write another request to the child (`tasks/result` of a task a call made, say), its
    /// answer taken back as a call's is.
    pub async fn request(
        &self,
        method: &str,
        params: &serde_json::Value,
    ) -> std::io::Result<SentCall<'_>> {
        let (number, sent) = self.register(false);
        let line = serde_json::to_vec(&serde_json::json!({
            "jsonrpc": "2.0",
            "id": format!("{ID_START}{number}"),
            "method": method,
            "params": params,
        }))
        .map_err(std::io::Error::other)?;
        self.writer.write_line(line).await?;
        Ok(sent)
    }

    /// A new request's number, waited for before it is written: the answer may come
    /// before the write returns.
    fn register(&self, progress: bool) -> (u64, SentCall<'_>) {
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let (first, hearing) = oneshot::channel();
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(number, Pending::Waiting { first, progress });
        }
        let sent = SentCall {
            lane: self,
            number,
            hearing: Hearing::First(hearing),
        };
        (number, sent)
    }

    /// What the server's last `tools/list` answers said of each tool's `execution` (tasks
    /// of 2025-11-25), which rmcp's `Tool` does not keep; forgotten as it is read.
    pub fn take_executions(&self) -> HashMap<String, serde_json::Value> {
        self.executions
            .lock()
            .map(|mut executions| std::mem::take(&mut *executions))
            .unwrap_or_default()
    }

    /// Keep the `execution` of each tool in a `tools/list` answer, if the line is one.
    fn note_executions(&self, result: &RawValue) {
        #[derive(serde::Deserialize)]
        struct Page {
            tools: Vec<Listed>,
        }
        #[derive(serde::Deserialize)]
        struct Listed {
            name: String,
            #[serde(default)]
            execution: Option<serde_json::Value>,
        }
        let Ok(page) = serde_json::from_str::<Page>(result.get()) else {
            return;
        };
        if let Ok(mut executions) = self.executions.lock() {
            for tool in page.tools {
                if let Some(execution) = tool.execution {
                    executions.insert(tool.name, execution);
                }
            }
        }
    }

    /// The number of a lane id (`cd-12`), if it is one.
    fn number_of(id: &str) -> Option<u64> {
        id.strip_prefix(ID_START)?.parse().ok()
    }

    /// The number of a lane id's text (`"cd-12"`, quoted), if it is one.
    /// Give call `number` its reply; say whether anyone was waiting for it.
    fn answer(&self, number: u64, reply: Reply) -> bool {
        let waiting = self
            .pending
            .lock()
            .ok()
            .and_then(|mut pending| pending.remove(&number));
        match waiting {
            Some(Pending::Waiting { first, .. }) => {
                let _ = first.send(First::Reply(reply));
                true
            }
            // After its progress, in order; the queue ends with it.
            Some(Pending::Streaming(rest)) => {
                let _ = rest.send(Heard::Reply(Some(reply)));
                true
            }
            None => false,
        }
    }

    fn number_of_text(id: &RawValue) -> Option<u64> {
        TextLane::number_of(id.get().strip_prefix('"')?.strip_suffix('"')?)
    }

    /// Hand progress on a lane call to the call; say whether it was one of the lane's.
    /// Progress on a call that ended, or that asked for none, has nobody to go to.
    fn take_progress(&self, params: &RawValue) -> bool {
        let Ok(params) = serde_json::from_str::<ProgressNotificationParam>(params.get()) else {
            // rmcp's to judge.
            return false;
        };
        let NumberOrString::String(token) = &params.progress_token.0 else {
            return false;
        };
        let Some(number) = TextLane::number_of(token) else {
            return false;
        };
        let Ok(mut pending) = self.pending.lock() else {
            return true;
        };
        match pending.get_mut(&number) {
            Some(Pending::Streaming(rest)) => {
                let _ = rest.send(Heard::Progress(params));
            }
            Some(entry @ Pending::Waiting { progress: true, .. }) => {
                let (rest, hearing) = mpsc::unbounded_channel();
                if let Pending::Waiting { first, .. } =
                    std::mem::replace(entry, Pending::Streaming(rest))
                {
                    let _ = first.send(First::Progress(params, hearing));
                }
            }
            Some(Pending::Waiting {
                progress: false, ..
            })
            | None => {}
        }
        true
    }
}

impl Tap for TextLane {
    fn take(&self, line: &str) -> bool {
        // Most lines are not the lane's: skip the parse for them.
        // Built once: a finder's set-up costs more than searching a short line.
        static LANE_ID: LazyLock<Finder> = LazyLock::new(|| Finder::new(ID_PREFIX.as_bytes()));
        static EXECUTION: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"execution\""));
        if LANE_ID.find(line.as_bytes()).is_none() {
            // rmcp's listing of tools that say how they run: noted, and left to rmcp.
            if EXECUTION.find(line.as_bytes()).is_some()
                && let Some(peek) = Peek::of(line)
                && peek.method.is_none()
                && let Some(result) = peek.result
            {
                self.note_executions(result);
            }
            return false;
        }
        let Some(peek) = Peek::of(line) else {
            return false;
        };
        if peek.id.is_none() && peek.method.as_deref() == Some("notifications/progress") {
            return peek.params.is_some_and(|params| self.take_progress(params));
        }
        let Some(number) = peek.id.and_then(TextLane::number_of_text) else {
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
        if !self.answer(number, reply) {
            // Timed out or cancelled meanwhile: nobody waits for it any more.
            tracing::debug!(id = number, "dropping the answer to a call nobody awaits");
        }
        true
    }

    /// An answer over the size conductor reads fails its call at once, naming the limit,
    /// instead of leaving it to time out: a lane call's here, one of rmcp's requests by an
    /// error response put in the dropped answer's place.
    fn too_long(&self, head: &[u8], tail: &[u8]) -> Option<Vec<u8>> {
        let message = format!(
            "the server's answer is larger than the {} bytes conductor reads from it (`max_message_bytes`); none of it was passed on",
            self.max_line
        );
        let id = crate::wire::dropped_id(head, tail, false)?;
        if let NumberOrString::String(text) = &id
            && let Some(number) = TextLane::number_of(text)
        {
            self.answer(
                number,
                Reply::Error(ErrorData::internal_error(message, None)),
            );
            return None;
        }
        Some(Refusal::new(Some(id), ErrorCode::INTERNAL_ERROR, message).line())
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
        let lane = TextLane::new(Writer::new(write), crate::wire::MAX_LINE);
        let arguments = RawValue::from_string(r#"{"text": "hi"}"#.to_owned()).unwrap();
        let mut sent = lane
            .call("echo", Some(&arguments), true, false)
            .await
            .unwrap();
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
            !lane.take(r#"{"jsonrpc":"2.0","id":3,"result":{}}"#),
            "rmcp's own"
        );
        let request = format!(
            r#"{{"jsonrpc":"2.0","id":"{}","method":"ping"}}"#,
            sent.id()
        );
        assert!(!lane.take(&request), "the child's own request");
        let answer = format!(
            r#"{{"result":{{"content":[]}},"jsonrpc":"2.0","id":"{}"}}"#,
            sent.id()
        );
        assert!(lane.take(&answer));
        match sent.answer().await {
            Some(Reply::Result(result)) => assert_eq!(result.get(), r#"{"content":[]}"#),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn progress_taken_before_the_answer_is_heard_before_it() {
        let (ours, _theirs) = tokio::io::duplex(4096);
        let (_, write) = tokio::io::split(ours);
        let lane = TextLane::new(Writer::new(write), crate::wire::MAX_LINE);
        let mut quiet = lane.call("echo", None, false, false).await.unwrap();
        let mut sent = lane.call("echo", None, true, false).await.unwrap();
        let progress = |id: &str, n: u32| {
            format!(
                r#"{{"jsonrpc":"2.0","method":"notifications/progress","params":{{"progressToken":"{id}","progress":{n}}}}}"#
            )
        };
        // All of it is read before the call looks: the answer must not overtake.
        for n in 1..=5 {
            assert!(lane.take(&progress(&sent.id(), n)));
        }
        assert!(lane.take(&progress(&quiet.id(), 1)), "the lane's, dropped");
        assert!(!lane.take(&progress("cd", 1)), "not a lane id: rmcp's");
        assert!(!lane.take(r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":3,"progress":1}}"#));
        let answer = format!(r#"{{"jsonrpc":"2.0","id":"{}","result":{{}}}}"#, sent.id());
        assert!(lane.take(&answer));
        let mut heard = Vec::new();
        loop {
            match sent.next().await {
                Heard::Progress(params) => heard.push(params.progress),
                Heard::Reply(Some(Reply::Result(_))) => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(heard, [1.0, 2.0, 3.0, 4.0, 5.0]);
        let answer = format!(r#"{{"jsonrpc":"2.0","id":"{}","result":{{}}}}"#, quiet.id());
        assert!(lane.take(&answer));
        assert!(matches!(
            quiet.next().await,
            Heard::Reply(Some(Reply::Result(_)))
        ));
    }

    #[tokio::test]
    async fn calls_in_flight_end_with_the_connection() {
        let (ours, _theirs) = tokio::io::duplex(4096);
        let (_, write) = tokio::io::split(ours);
        let lane = TextLane::new(Writer::new(write), crate::wire::MAX_LINE);
        let mut sent = lane.call("echo", None, false, false).await.unwrap();
        lane.ended().await;
        assert!(sent.answer().await.is_none());
    }
}
