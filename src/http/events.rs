//! Resumable streams: every event rmcp sends on a Streamable HTTP stream is kept for a while,
//! so a client whose connection dropped can reconnect with `Last-Event-ID` and get what it
//! missed, then the rest of that stream as it happens.
//!
//! A session's own stream (its `GET`) also keeps what was sent while no `GET` was open: with
//! an event store rmcp gives a new `GET` only what is sent after it opens, so a request or
//! notification sent between `initialize` and the client's `GET` (conductor asks a new client
//! for its roots then) would be lost. [`MemoryEventStore::take_unread`] hands it over.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use futures::StreamExt;
use rmcp::model::JsonRpcMessage;
use rmcp::transport::common::server_side_http::ServerSseMessage;
use rmcp::transport::streamable_http_server::session::store::{
    EventId, EventStore, EventStoreError, EventStream,
};
use tokio::sync::broadcast;

/// Events kept per stream; older ones go first.
const EVENTS_PER_STREAM: usize = 1000;
/// Streams idle this long are forgotten.
const KEEP_STREAMS: Duration = Duration::from_secs(600);
/// A request's stream is kept this long after its answer, for a client whose connection
/// dropped just as the answer went out; every request has a stream, so they cannot all stay
/// for `KEEP_STREAMS`.
const KEEP_ANSWERED: Duration = Duration::from_secs(30);
/// How often forgotten streams are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Events a reconnected client may fall behind the live stream before it loses some.
const LIVE_CAPACITY: usize = 256;

/// An event as kept: rmcp's, or an answer the front wrote as text, parsed only if a client
/// resumes its stream.
#[derive(Clone)]
enum Kept {
    Event(ServerSseMessage),
    Answer(Arc<str>),
}

impl Kept {
    /// The event as rmcp streams it, with its id.
    fn to_event(&self, stream_id: &str, sequence: u64) -> ServerSseMessage {
        match self {
            Kept::Event(event) => event.clone(),
            Kept::Answer(text) => {
                let id = format!("{stream_id}#{sequence}");
                match serde_json::from_str(text) {
                    Ok(message) => ServerSseMessage::new(id, message),
                    Err(error) => {
                        tracing::warn!(error = %error, "a kept answer is not a message");
                        let mut empty = ServerSseMessage::priming(id, Duration::ZERO);
                        empty.retry = None;
                        empty
                    }
                }
            }
        }
    }

    /// A response or error is the last message of a request's stream.
    fn is_final(&self) -> bool {
        match self {
            Kept::Event(event) => is_final(event),
            Kept::Answer(_) => true,
        }
    }
}

/// One stream's recent events, and a way to follow new ones.
struct StreamLog {
    events: Vec<(u64, Kept)>,
    /// Made when a client first resumes the stream: most streams are never resumed.
    live: Option<broadcast::Sender<(u64, ServerSseMessage)>>,
    touched: Instant,
    /// Its final message (a request's answer) is in.
    answered: bool,
    /// For a session's own stream: how many `GET`s are reading it.
    readers: usize,
    /// For a session's own stream: the first event sent while no `GET` was reading it, and not
    /// handed to one since.
    unread_from: Option<u64>,
}

impl StreamLog {
    fn new() -> Self {
        StreamLog {
            events: Vec::new(),
            live: None,
            touched: Instant::now(),
            answered: false,
            readers: 0,
            unread_from: None,
        }
    }

    fn expired(&self) -> bool {
        if self.readers > 0 {
            return false;
        }
        let keep = if self.answered {
            KEEP_ANSWERED
        } else {
            KEEP_STREAMS
        };
        self.touched.elapsed() >= keep
    }
}

/// The events of every stream, in memory.
pub struct MemoryEventStore {
    streams: DashMap<String, StreamLog>,
    next: AtomicU64,
    swept: std::sync::Mutex<Instant>,
}

impl Default for MemoryEventStore {
    fn default() -> Self {
        MemoryEventStore {
            streams: DashMap::new(),
            next: AtomicU64::new(0),
            swept: std::sync::Mutex::new(Instant::now()),
        }
    }
}

impl MemoryEventStore {
    /// Forget expired streams, at most once per `SWEEP_EVERY` (not on every event: a sweep
    /// visits every stream).
    fn sweep(&self) {
        let Ok(mut swept) = self.swept.try_lock() else {
            return;
        };
        if swept.elapsed() < SWEEP_EVERY {
            return;
        }
        *swept = Instant::now();
        drop(swept);
        self.streams.retain(|_, log| !log.expired());
    }

    /// A `GET` starts reading `session`'s own stream: from now on what is sent there is
    /// delivered by rmcp, not kept as unread. Pair with
    /// [`MemoryEventStore::close_session_stream`].
    pub fn open_session_stream(&self, session: &str) {
        let mut log = self
            .streams
            .entry(session_stream(session))
            .or_insert_with(StreamLog::new);
        log.readers += 1;
        log.touched = Instant::now();
    }

    /// What was sent on `session`'s own stream while no `GET` was reading it, handed over
    /// once: the `GET` that takes it delivers it before what rmcp streams.
    pub fn take_unread(&self, session: &str) -> Vec<ServerSseMessage> {
        let Some(mut log) = self.streams.get_mut(&session_stream(session)) else {
            return Vec::new();
        };
        let Some(from) = log.unread_from.take() else {
            return Vec::new();
        };
        log.events
            .iter()
            .filter_map(|(sequence, kept)| match kept {
                Kept::Event(event) if *sequence >= from && event.message.is_some() => {
                    Some(event.clone())
                }
                _ => None,
            })
            .collect()
    }

    /// Keep the answer to a request the front answered, on the stream it opened for it.
    pub fn store_answer(&self, stream_id: &str, text: Arc<str>) -> String {
        self.keep(stream_id, |_| Kept::Answer(text))
    }

    /// Keep an event on its stream, made knowing its id; the id.
    fn keep(&self, stream_id: &str, make: impl FnOnce(&str) -> Kept) -> String {
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{stream_id}#{sequence}");
        let kept = make(&id);
        self.sweep();
        let mut log = self
            .streams
            .entry(stream_id.to_owned())
            .or_insert_with(StreamLog::new);
        if log.events.len() >= EVENTS_PER_STREAM {
            log.events.remove(0);
        }
        if log.readers == 0 && log.unread_from.is_none() && stream_id.ends_with(SESSION_STREAM) {
            log.unread_from = Some(sequence);
        }
        log.answered |= kept.is_final();
        log.touched = Instant::now();
        if let Some(live) = &log.live {
            let _ = live.send((sequence, kept.to_event(stream_id, sequence)));
        }
        log.events.push((sequence, kept));
        id
    }

    /// A `GET` of `session`'s own stream ended.
    pub fn close_session_stream(&self, session: &str) {
        if let Some(mut log) = self.streams.get_mut(&session_stream(session)) {
            log.readers = log.readers.saturating_sub(1);
            log.touched = Instant::now();
        }
    }
}

/// An event as the SSE frame rmcp would write for it; `None` for one without a message.
pub fn sse_frame(event: &ServerSseMessage) -> Option<axum::body::Bytes> {
    let message = serde_json::to_string(event.message.as_deref()?).ok()?;
    let id = event
        .event_id
        .as_deref()
        .map(|id| format!("id: {id}\n"))
        .unwrap_or_default();
    Some(format!("{id}data: {message}\n\n").into())
}

/// What rmcp appends to a session's id to name the session's own stream in the store.
const SESSION_STREAM: &str = ":common";

/// rmcp's name for a session's own stream in the store.
fn session_stream(session: &str) -> String {
    format!("{session}{SESSION_STREAM}")
}

/// Whether `last_event_id` is an event of `session`'s own stream.
pub fn is_session_event(session: &str, last_event_id: &str) -> bool {
    parse(last_event_id).is_some_and(|(stream, _)| stream == session_stream(session))
}

/// Event ids are `<stream>#<sequence>`: the stream to replay, and where in it.
fn parse(event_id: &str) -> Option<(&str, u64)> {
    let (stream, sequence) = event_id.rsplit_once('#')?;
    Some((stream, sequence.parse().ok()?))
}

/// A response or error is the last message of a request's stream.
fn is_final(event: &ServerSseMessage) -> bool {
    event.message.as_deref().is_some_and(|message| {
        matches!(
            message,
            JsonRpcMessage::Response(_) | JsonRpcMessage::Error(_)
        )
    })
}

#[async_trait::async_trait]
impl EventStore for MemoryEventStore {
    async fn store_event(
        &self,
        stream_id: &str,
        event: &ServerSseMessage,
    ) -> Result<EventId, EventStoreError> {
        Ok(self.keep(stream_id, |id| {
            let mut event = event.clone();
            event.event_id = Some(id.to_owned());
            Kept::Event(event)
        }))
    }

    async fn replay_events_after(
        &self,
        last_event_id: &str,
    ) -> Result<EventStream, EventStoreError> {
        let (stream_id, after) = parse(last_event_id)
            .ok_or_else(|| format!("`{last_event_id}` is not an event id of this server"))?;
        let Some(mut log) = self.streams.get_mut(stream_id) else {
            return Err(format!("stream of `{last_event_id}` is no longer kept").into());
        };
        // Subscribe before reading what is kept, so nothing falls between the two.
        let live = log
            .live
            .get_or_insert_with(|| broadcast::channel(LIVE_CAPACITY).0)
            .subscribe();
        let missed: Vec<(u64, ServerSseMessage)> = log
            .events
            .iter()
            .filter(|(sequence, _)| *sequence > after)
            .map(|(sequence, kept)| (*sequence, kept.to_event(stream_id, *sequence)))
            .collect();
        drop(log);
        let finished = missed.iter().any(|(_, event)| is_final(event));
        let last_missed = missed.last().map_or(after, |(sequence, _)| *sequence);
        let replay = futures::stream::iter(missed.into_iter().map(|(_, event)| event));
        if finished {
            return Ok(Box::pin(replay));
        }
        // Then follow the stream until its final message (a request's answer); a stream that
        // has none (the session's own) is followed until the client goes away.
        let following =
            futures::stream::unfold((live, false), move |(mut live, done)| async move {
                if done {
                    return None;
                }
                loop {
                    match live.recv().await {
                        Ok((sequence, event)) if sequence > last_missed => {
                            let done = is_final(&event);
                            return Some((event, (live, done)));
                        }
                        Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
        Ok(Box::pin(replay.chain(following)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ping(id: i64) -> ServerSseMessage {
        let message: rmcp::model::ServerJsonRpcMessage = serde_json::from_value(
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "ping"}),
        )
        .unwrap();
        ServerSseMessage::from_message(message)
    }

    fn ids(events: &[ServerSseMessage]) -> Vec<String> {
        events
            .iter()
            .filter_map(|event| serde_json::to_value(event.message.as_deref()?).ok())
            .map(|message| message["id"].to_string())
            .collect()
    }

    #[tokio::test]
    async fn what_no_get_read_is_handed_to_the_next_get_once() {
        let store = MemoryEventStore::default();
        store.store_event("s:common", &ping(1)).await.unwrap();
        store.store_event("s:common", &ping(2)).await.unwrap();
        store.store_event("request", &ping(9)).await.unwrap();
        let get = |store: &MemoryEventStore| {
            store.open_session_stream("s");
            ids(&store.take_unread("s"))
        };
        assert_eq!(get(&store), ["1", "2"]);
        // Sent while a GET reads: rmcp delivers it, so it is not handed over again.
        store.store_event("s:common", &ping(3)).await.unwrap();
        assert!(get(&store).is_empty(), "a second GET");
        store.close_session_stream("s");
        store.close_session_stream("s");
        store.store_event("s:common", &ping(4)).await.unwrap();
        assert_eq!(get(&store), ["4"]);
        assert!(is_session_event("s", "s:common#4"));
        assert!(!is_session_event("s", "t:common#4"));
        assert!(!is_session_event("s", "request#9"));
        assert_eq!(
            sse_frame(&ping(5)).unwrap(),
            "data: {\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"ping\"}\n\n"
        );
    }

    #[test]
    fn event_ids_name_their_stream_and_place() {
        assert_eq!(parse("0#12"), Some(("0", 12)));
        assert_eq!(parse("a#b#3"), Some(("a#b", 3)));
        assert_eq!(parse("nope"), None);
    }
}
