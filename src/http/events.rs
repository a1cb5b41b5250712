//! Resumable streams: every event rmcp sends on a Streamable HTTP stream is kept for a while,
//! so a client whose connection dropped can reconnect with `Last-Event-ID` and get what it
//! missed, then the rest of that stream as it happens.

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

/// One stream's recent events, and a way to follow new ones.
struct StreamLog {
    events: Vec<(u64, ServerSseMessage)>,
    /// Made when a client first resumes the stream: most streams are never resumed.
    live: Option<broadcast::Sender<(u64, ServerSseMessage)>>,
    touched: Instant,
    /// Its final message (a request's answer) is in.
    answered: bool,
}

impl StreamLog {
    fn expired(&self) -> bool {
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
        let sequence = self.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{stream_id}#{sequence}");
        let mut kept = event.clone();
        kept.event_id = Some(id.clone());
        self.sweep();
        let mut log = self
            .streams
            .entry(stream_id.to_owned())
            .or_insert_with(|| StreamLog {
                events: Vec::new(),
                live: None,
                touched: Instant::now(),
                answered: false,
            });
        if log.events.len() >= EVENTS_PER_STREAM {
            log.events.remove(0);
        }
        log.answered |= is_final(&kept);
        log.touched = Instant::now();
        if let Some(live) = &log.live {
            let _ = live.send((sequence, kept.clone()));
        }
        log.events.push((sequence, kept));
        Ok(id)
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
            .cloned()
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

    #[test]
    fn event_ids_name_their_stream_and_place() {
        assert_eq!(parse("0#12"), Some(("0", 12)));
        assert_eq!(parse("a#b#3"), Some(("a#b", 3)));
        assert_eq!(parse("nope"), None);
    }
}
