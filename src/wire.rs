//! JSON-RPC messages as lines of text over a pipe: stdio on both sides of conductor.
//!
//! rmcp reads and writes through [`LineTransport`] as through its own stdio transport, but a
//! [`Tap`] sees every line first and may take it. That is how a `tools/call` crosses conductor
//! as the text it came as: parsing a message into rmcp's types and writing it out again was
//! half of conductor's work per call (docs/performance.md). [`Peek`] reads just the parts a
//! message is routed by, borrowing the rest as unparsed JSON.

use std::borrow::Cow;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};

use memchr::memmem::Finder;
use rmcp::model::{ErrorCode, NumberOrString};
use rmcp::service::{RxJsonRpcMessage, ServiceRole, TxJsonRpcMessage};
use rmcp::transport::Transport;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

/// The largest message read, as rmcp's own stdio transport allows: a peer that never ends
/// a line must not grow the buffer without bound.
pub const MAX_LINE: usize = 16 * 1024 * 1024;

/// How many of a dropped message's first and last bytes are kept to find its id in.
const DROPPED_EDGE: usize = 256;

/// The id of a message dropped for its size, from its first or last bytes:
/// where writers put it (`{"jsonrpc":"2.0","id":7,...` as rmcp and the Python SDK write, or
/// `...,"jsonrpc":"2.0","id":7}` as the TypeScript SDK writes); only for a request (a
/// `"method"` seen) when `request`, else only for a response.
pub fn dropped_id(head: &[u8], tail: &[u8], request: bool) -> Option<NumberOrString> {
    static METHOD: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"method\""));
    if request != (METHOD.find(head).is_some() || METHOD.find(tail).is_some()) {
        return None;
    }
    let id_text = |text: &[u8]| serde_json::from_slice::<NumberOrString>(text).ok();
    let compact: Vec<u8> = head
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if let Some(rest) = compact.strip_prefix(b"{\"jsonrpc\":\"2.0\",\"id\":")
        && let Some(end) = rest.iter().position(|&b| b == b',')
        && let Some(id) = id_text(&rest[..end])
    {
        return Some(id);
    }
    let tail = std::str::from_utf8(tail).ok()?.trim_end();
    let members = tail.strip_suffix('}')?;
    let at = members.rfind("\"id\":")?;
    id_text(&members.as_bytes()[at + 5..])
}

/// A line buffer larger than this is let go after its message, so that one big message does
/// not keep its memory for the connection's life.
const KEEP_LINE_CAPACITY: usize = 1024 * 1024;

/// The routing parts of a JSON-RPC message, borrowed from its text; the rest stays unparsed.
#[derive(Debug, Deserialize)]
pub struct Peek<'a> {
    #[serde(borrow, default)]
    pub id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub method: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub result: Option<&'a RawValue>,
    #[serde(borrow, default)]
    pub error: Option<&'a RawValue>,
}

impl<'a> Peek<'a> {
    /// The message's parts, or `None` if the line is not one JSON object.
    pub fn of(line: &'a str) -> Option<Peek<'a>> {
        serde_json::from_str(line).ok()
    }

    /// The id as rmcp's type, if it is a number or a string.
    pub fn request_id(&self) -> Option<NumberOrString> {
        self.id.and_then(request_id)
    }
}

/// A JSON-RPC id (unparsed JSON) as rmcp's type, if it is a number or a string. The usual
/// ids, small integers and strings without escapes, are read off the text as they are.
pub fn request_id(id: &RawValue) -> Option<NumberOrString> {
    let text = id.get();
    if let Ok(number) = text.parse::<i64>() {
        return Some(NumberOrString::Number(number));
    }
    if let Some(inner) = text
        .strip_prefix('"')
        .and_then(|rest| rest.strip_suffix('"'))
        && !inner.contains(['\\', '"'])
    {
        return Some(NumberOrString::String(inner.into()));
    }
    serde_json::from_str(text).ok()
}

/// Whether `text` (unparsed JSON) is an object: the only shape tool arguments may have.
pub fn is_object(text: &RawValue) -> bool {
    text.get().trim_start().starts_with('{')
}

/// A line of a response, `{"jsonrpc":"2.0","id":ID,"result":RESULT}`, from their texts.
pub fn response_line(id: &RawValue, result: &RawValue) -> Vec<u8> {
    let (id, result) = (id.get(), result.get());
    // With room for the newline the writer adds.
    let mut line = Vec::with_capacity(37 + id.len() + result.len());
    line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    line.extend_from_slice(id.as_bytes());
    line.extend_from_slice(b",\"result\":");
    line.extend_from_slice(result.as_bytes());
    line.push(b'}');
    line
}

/// The same for a client of 2026-07-28, which needs every result to say `resultType`: the
/// result's text with `"resultType":"complete"` first. `None` when the result is not an
/// object or may name a `resultType` of its own.
pub fn complete_response_line(id: &RawValue, result: &RawValue) -> Option<Vec<u8>> {
    static RESULT_TYPE: LazyLock<Finder> = LazyLock::new(|| Finder::new(b"\"resultType\""));
    let members = result.get().strip_prefix('{')?;
    if RESULT_TYPE.find(members.as_bytes()).is_some() {
        return None;
    }
    let id = id.get();
    let separator = if members.trim_start().starts_with('}') {
        ""
    } else {
        ","
    };
    let mut line = Vec::with_capacity(60 + id.len() + members.len());
    line.extend_from_slice(b"{\"jsonrpc\":\"2.0\",\"id\":");
    line.extend_from_slice(id.as_bytes());
    line.extend_from_slice(b",\"result\":{\"resultType\":\"complete\"");
    line.extend_from_slice(separator.as_bytes());
    line.extend_from_slice(members.as_bytes());
    line.push(b'}');
    Some(line)
}

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Sees each line a [`LineTransport`] reads before rmcp does.
pub trait Tap: Send + Sync + 'static {
    /// Take the message (one line, without its newline), or leave it to rmcp (`false`).
    fn take(&self, line: &str) -> bool;

    /// The stream ended: what must finish before the transport says so (answers the tap
    /// still owes, say).
    fn ended(&self) -> BoxFuture {
        Box::pin(async {})
    }

    /// A message over the size limit was dropped: `head` and `tail` are its first and last
    /// bytes, where its id is (see [`dropped_id`]). The tap may answer for it, or return a
    /// message for rmcp instead (an error response to rmcp's own request, say).
    fn too_long(&self, _head: &[u8], _tail: &[u8]) -> Option<Vec<u8>> {
        None
    }

    /// What rmcp writes, one message, before it goes out: the tap may rewrite it.
    fn sending(&self, line: Vec<u8>) -> Vec<u8> {
        line
    }
}

/// A tap that takes nothing.
#[derive(Debug)]
pub struct NoTap;

impl Tap for NoTap {
    fn take(&self, _line: &str) -> bool {
        false
    }
}

type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// The writing end of a pipe, shared by rmcp and the tap; each line goes out whole.
#[derive(Clone)]
pub struct Writer {
    inner: Arc<tokio::sync::Mutex<Option<BoxWrite>>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    pub fn new(write: impl AsyncWrite + Send + Unpin + 'static) -> Self {
        Writer {
            inner: Arc::new(tokio::sync::Mutex::new(Some(Box::new(write)))),
        }
    }

    /// Write one message and its newline, with one write where the pipe takes it.
    pub async fn write_line(&self, mut line: Vec<u8>) -> std::io::Result<()> {
        line.push(b'\n');
        let mut write = self.inner.lock().await;
        let Some(write) = write.as_mut() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the pipe is closed",
            ));
        };
        write.write_all(&line).await?;
        write.flush().await
    }

    /// Close the pipe: for a child, its stdin, which tells it to exit.
    pub async fn close(&self) {
        let taken = self.inner.lock().await.take();
        if let Some(mut write) = taken {
            let _ = write.shutdown().await;
        }
    }
}

/// rmcp's transport over a pipe's two ends, one message per line, with a [`Tap`].
pub struct LineTransport<Role, R> {
    read: BufReader<R>,
    /// The line being read: a read cancelled mid-line (rmcp polls `receive` in a `select!`)
    /// leaves its part here for the next call.
    line: Vec<u8>,
    /// Skipping the rest of a line over `max_line`: its first bytes, and its last so far.
    discarding: Option<(Vec<u8>, Vec<u8>)>,
    /// The longest message read (the config's `max_message_bytes`).
    max_line: usize,
    writer: Writer,
    tap: Arc<dyn Tap>,
    _role: PhantomData<fn() -> Role>,
}

impl<Role: ServiceRole, R: AsyncRead + Send + Unpin + 'static> LineTransport<Role, R> {
    pub fn new(read: R, writer: Writer, tap: Arc<dyn Tap>, max_line: usize) -> Self {
        LineTransport {
            read: BufReader::new(read),
            line: Vec::new(),
            discarding: None,
            max_line,
            writer,
            tap,
            _role: PhantomData,
        }
    }

    pub fn writer(&self) -> &Writer {
        &self.writer
    }

    /// The next whole line into `self.line` (`false` at the end of the stream). Cancel-safe:
    /// bytes are moved from the reader's buffer to the line with no await in between.
    async fn read_line(&mut self) -> bool {
        loop {
            let (consumed, done) = {
                let available = match self.read.fill_buf().await {
                    Ok(available) => available,
                    Err(error) => {
                        tracing::debug!(error = %error, "stopped reading a pipe");
                        return false;
                    }
                };
                if available.is_empty() {
                    return false;
                }
                let newline = memchr::memchr(b'\n', available);
                let take = newline.map_or(available.len(), |at| at + 1);
                if self.discarding.is_none() && self.line.len() + take > self.max_line {
                    tracing::error!(
                        max = self.max_line,
                        "a message longer than the most conductor reads was dropped"
                    );
                    let mut head = self.line[..self.line.len().min(DROPPED_EDGE)].to_vec();
                    let more = DROPPED_EDGE - head.len();
                    head.extend_from_slice(&available[..take.min(more)]);
                    // Its memory goes with it.
                    self.line = Vec::new();
                    self.discarding = Some((head, Vec::new()));
                }
                match &mut self.discarding {
                    Some((_, tail)) => {
                        let part = &available[..newline.unwrap_or(available.len())];
                        tail.extend_from_slice(&part[part.len().saturating_sub(DROPPED_EDGE)..]);
                        let excess = tail.len().saturating_sub(DROPPED_EDGE);
                        tail.drain(..excess);
                    }
                    None => self.line.extend_from_slice(&available[..take]),
                }
                // The dropped message has ended: the tap may put something in its place.
                if newline.is_some()
                    && let Some((head, tail)) = self.discarding.take()
                    && let Some(instead) = self.tap.too_long(&head, &tail)
                {
                    self.line = instead;
                }
                (take, newline.is_some() && !self.line.is_empty())
            };
            self.read.consume(consumed);
            if done {
                return true;
            }
        }
    }
}

impl<Role: ServiceRole, R: AsyncRead + Send + Unpin + 'static> Transport<Role>
    for LineTransport<Role, R>
{
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<Role>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let writer = self.writer.clone();
        let line = serde_json::to_vec(&item).map(|line| self.tap.sending(line));
        async move {
            writer
                .write_line(line.map_err(std::io::Error::other)?)
                .await
        }
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<Role>> {
        loop {
            if !self.read_line().await {
                self.tap.ended().await;
                return None;
            }
            let mut line = std::mem::take(&mut self.line);
            let message = self.message(&line);
            // Keep the buffer's capacity for the next line, unless a big message grew it.
            if line.capacity() <= KEEP_LINE_CAPACITY {
                line.clear();
                self.line = line;
            }
            if let Some(message) = message {
                return Some(message);
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.writer.close().await;
        Ok(())
    }
}

impl<Role: ServiceRole, R> LineTransport<Role, R> {
    /// The message a line holds for rmcp, or `None` when the tap took it or there is none.
    fn message(&self, line: &[u8]) -> Option<RxJsonRpcMessage<Role>> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return None;
        }
        // Checked as UTF-8 once here, not string by string in every parse.
        let text = std::str::from_utf8(line).ok();
        let parsed = match text {
            Some(text) if self.tap.take(text) => return None,
            Some(text) => serde_json::from_str(text),
            None => serde_json::from_slice(line),
        };
        match parsed {
            Ok(message) => Some(message),
            Err(error) => {
                self.refuse(line, error);
                None
            }
        }
    }

    /// A line rmcp's types do not take: answered as JSON-RPC says ([`refusal`]), with the
    /// request's id where it can be read, so the peer is never left waiting. Responses and
    /// notifications get no answer.
    fn refuse(&self, line: &[u8], error: serde_json::Error) {
        let Some(refusal) = refusal(line) else {
            tracing::debug!(error = %error, "ignoring a message that is not MCP and wants no answer");
            return;
        };
        tracing::debug!(error = %error, refusal = %refusal.message, "refusing a message that is not MCP");
        let writer = self.writer.clone();
        // Written apart: `receive` may be cancelled at any await.
        tokio::spawn(async move {
            if let Ok(line) = serde_json::to_vec(&refusal.to_json()) {
                let _ = writer.write_line(line).await;
            }
        });
    }
}

/// Why a message is refused, as JSON-RPC 2.0 says (one no MCP type takes, or one too large to
/// read): the code, the words, and the id to answer with where the message has one that can
/// be read (else `null`).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub id: Option<NumberOrString>,
    pub code: i32,
    pub message: String,
}

impl Refusal {
    pub fn new(id: Option<NumberOrString>, code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            id,
            code: code.0,
            message: message.into(),
        }
    }

    /// The error response's line.
    pub fn line(&self) -> Vec<u8> {
        self.to_json().to_string().into_bytes()
    }

    /// The error response, as JSON (`id` is `null` where none could be read).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "jsonrpc": "2.0",
            "id": self.id,
            "error": {"code": self.code, "message": self.message},
        })
    }
}

/// What to answer a message (its whole text) that rmcp's types do not take, or `None` for one
/// that gets no answer: a response, or a notification (JSON-RPC answers neither).
pub fn refusal(text: &[u8]) -> Option<Refusal> {
    use serde_json::Value;
    let message = match serde_json::from_slice::<Value>(text) {
        Ok(Value::Object(message)) => message,
        Ok(Value::Array(_)) => {
            return Some(Refusal::new(
                None,
                ErrorCode::INVALID_REQUEST,
                "invalid request: a batch (a JSON array) is not accepted; MCP removed JSON-RPC batching in 2025-06-18, send each message on its own",
            ));
        }
        Ok(_) => {
            return Some(Refusal::new(
                None,
                ErrorCode::INVALID_REQUEST,
                "invalid request: a JSON-RPC message is a JSON object",
            ));
        }
        Err(error) => {
            return Some(Refusal::new(
                None,
                ErrorCode::PARSE_ERROR,
                format!("parse error: {error}"),
            ));
        }
    };
    let id = match message.get("id") {
        None => None,
        Some(id) => match serde_json::from_value::<NumberOrString>(id.clone()) {
            Ok(id) => Some(id),
            Err(_) => {
                return Some(Refusal::new(
                    None,
                    ErrorCode::INVALID_REQUEST,
                    format!("invalid request: `id` must be a string or an integer, not {id}"),
                ));
            }
        },
    };
    let method = message.get("method");
    if method.is_none() && (message.contains_key("result") || message.contains_key("error")) {
        return None;
    }
    let invalid = |words: String| Some(Refusal::new(id.clone(), ErrorCode::INVALID_REQUEST, words));
    if message.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return invalid("invalid request: `jsonrpc` must be \"2.0\"".to_owned());
    }
    let Some(method) = method else {
        return invalid("invalid request: no `method`".to_owned());
    };
    let Some(method) = method.as_str() else {
        return invalid(format!(
            "invalid request: `method` must be a string, not {method}"
        ));
    };
    // A notification gets no answer, even a refusal.
    id.as_ref()?;
    let (code, message) = request_problem(method, message.get("params").cloned());
    Some(Refusal::new(id, code, message))
}

/// Why a request of `method` that could not be read is refused: an unknown method, or what
/// is wrong with the params of a known one.
pub fn request_problem(method: &str, params: Option<serde_json::Value>) -> (ErrorCode, String) {
    match params_problem(method, params) {
        Some(problem) => (ErrorCode::INVALID_PARAMS, problem),
        None if !is_mcp_request(method) => (
            ErrorCode::METHOD_NOT_FOUND,
            format!("method not found: `{method}`"),
        ),
        None => (
            ErrorCode::INVALID_REQUEST,
            format!("invalid request: a `{method}` request this server cannot read"),
        ),
    }
}

/// What is wrong with the `params` of a request of an MCP method (of a known method only).
#[allow(
    deprecated,
    reason = "logging is deprecated in 2026-07-28; older clients still set levels"
)]
fn params_problem(method: &str, params: Option<serde_json::Value>) -> Option<String> {
    use rmcp::model::*;
    use serde::de::DeserializeOwned;
    fn problem<T: DeserializeOwned>(params: Option<serde_json::Value>) -> Option<String> {
        serde_json::from_value::<T>(params.unwrap_or_else(|| serde_json::json!({})))
            .err()
            .map(|error| error.to_string())
    }
    if let Some(params) = &params
        && !params.is_object()
        && is_mcp_request(method)
    {
        return Some(format!(
            "invalid params for `{method}`: `params` must be an object, not {params}"
        ));
    }
    let problem = match method {
        "initialize" => problem::<InitializeRequestParams>(params),
        "tools/call" => problem::<CallToolRequestParams>(params),
        "prompts/get" => problem::<GetPromptRequestParams>(params),
        "resources/read" => problem::<ReadResourceRequestParams>(params),
        "resources/subscribe" => problem::<SubscribeRequestParams>(params),
        "resources/unsubscribe" => problem::<UnsubscribeRequestParams>(params),
        "completion/complete" => problem::<CompleteRequestParams>(params),
        "logging/setLevel" => problem::<SetLevelRequestParams>(params),
        "tools/list" | "prompts/list" | "resources/list" | "resources/templates/list" => {
            problem::<PaginatedRequestParams>(params)
        }
        _ => None,
    }?;
    Some(format!("invalid params for `{method}`: {problem}"))
}

fn is_mcp_request(method: &str) -> bool {
    matches!(
        method,
        "initialize"
            | "ping"
            | "server/discover"
            | "tools/list"
            | "tools/call"
            | "prompts/list"
            | "prompts/get"
            | "resources/list"
            | "resources/templates/list"
            | "resources/read"
            | "resources/subscribe"
            | "resources/unsubscribe"
            | "completion/complete"
            | "logging/setLevel"
            | "subscriptions/listen"
            | "tasks/get"
            | "tasks/list"
            | "tasks/result"
            | "tasks/cancel"
            | "tasks/update"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_message_is_known_by_its_id_at_either_end() {
        let rmcp = br#"{"jsonrpc":"2.0","id":7,"result":{"content":[{"type":"text","text":"xxxx"#;
        assert_eq!(
            dropped_id(rmcp, b"xxxx\"}]}}", false),
            Some(NumberOrString::Number(7))
        );
        let typescript = br#"xxxx"}]},"jsonrpc":"2.0","id":"cd-3"}"#;
        assert_eq!(
            dropped_id(br#"{"result":{"content":[{"id":1,"#, typescript, false),
            Some(NumberOrString::String("cd-3".into()))
        );
        let request = br#"{"method":"tools/call","params":{"arguments":{"text":"xxx"#;
        let end = br#"xxx"}},"jsonrpc":"2.0","id":12}"#;
        assert_eq!(
            dropped_id(request, end, true),
            Some(NumberOrString::Number(12))
        );
        assert_eq!(
            dropped_id(request, end, false),
            None,
            "a request is not a response"
        );
        assert_eq!(dropped_id(b"{\"result\":", b"xxxx", false), None);
    }

    #[test]
    fn a_peek_borrows_what_it_does_not_route_by() {
        let line =
            r#"{"result":{"content":[{"type":"text","text":"a\nb"}]},"jsonrpc":"2.0","id":"cd-7"}"#;
        let peek = Peek::of(line).unwrap();
        assert_eq!(peek.id.unwrap().get(), r#""cd-7""#);
        assert_eq!(
            peek.result.unwrap().get(),
            r#"{"content":[{"type":"text","text":"a\nb"}]}"#
        );
        assert!(peek.method.is_none() && peek.error.is_none());
        assert_eq!(
            peek.request_id(),
            Some(NumberOrString::String("cd-7".into()))
        );
        assert!(Peek::of("[1,2]").is_none());
        assert!(Peek::of("{\"id\":").is_none());
    }

    #[test]
    fn ids_read_off_the_text_are_the_ids_serde_reads() {
        for text in [
            "0",
            "-7",
            "9223372036854775807",
            "18446744073709551616",
            "1.5",
            r#""cd-1""#,
            r#""""#,
            r#""a\"b""#,
            r#""\u00e9t\u00e9""#,
            r#""été""#,
            "null",
            "{}",
        ] {
            let id = RawValue::from_string(text.to_owned()).unwrap();
            let by_serde: Option<NumberOrString> = serde_json::from_str(text).ok();
            assert_eq!(request_id(&id), by_serde, "{text}");
        }
    }

    #[test]
    fn a_complete_response_line_says_so_first_unless_the_result_cannot_take_it() {
        let id = RawValue::from_string(r#""a""#.to_owned()).unwrap();
        let line = |result: &str| {
            let result = RawValue::from_string(result.to_owned()).unwrap();
            complete_response_line(&id, &result)
                .map(|line| serde_json::from_slice::<serde_json::Value>(&line).unwrap())
        };
        assert_eq!(
            line(r#"{"content":[],"isError":false}"#),
            Some(serde_json::json!({"jsonrpc": "2.0", "id": "a",
                "result": {"resultType": "complete", "content": [], "isError": false}}))
        );
        assert_eq!(
            line("{ }"),
            Some(serde_json::json!({"jsonrpc": "2.0", "id": "a",
                "result": {"resultType": "complete"}}))
        );
        // Its own `resultType` (a task, say) is for the parsed path to read.
        assert_eq!(line(r#"{"resultType":"task","task":{}}"#), None);
        assert_eq!(line("[1]"), None);
    }

    #[test]
    fn a_response_line_is_the_two_texts_joined() {
        let id = RawValue::from_string("12".to_owned()).unwrap();
        let result = RawValue::from_string(r#"{"content":[]}"#.to_owned()).unwrap();
        let line = response_line(&id, &result);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"jsonrpc": "2.0", "id": 12, "result": {"content": []}})
        );
    }
}
