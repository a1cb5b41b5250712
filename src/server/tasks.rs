//! Tasks of 2025-11-25 for clients: a client may ask for a tool call to be made a task (a
//! `task` member in the call's params). Conductor answers at once with the task, runs the
//! call on the same path as any other call (the router makes a task at the downstream when
//! the tool requires one), and answers `tasks/get`, `tasks/result`, `tasks/list` and
//! `tasks/cancel` for the session that made it, and for no other. So a client sees tasks for
//! every tool of every downstream, whatever the downstream supports.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::ErrorData as McpError;
use rmcp::model::ErrorCode;
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How long a task is kept when its client names no `ttl`, and the longest it may name.
const DEFAULT_TTL: Duration = Duration::from_secs(60 * 60);
const MAX_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How many tasks one session keeps; the oldest that ended go first.
const MAX_TASKS: usize = 1000;
/// How often clients are asked to poll.
const POLL_INTERVAL_MS: u64 = 500;
/// How many tasks one `tasks/list` page holds.
const LIST_PAGE: usize = 100;

/// The `_meta` key that ties a message to its task.
pub const RELATED_TASK: &str = "io.modelcontextprotocol/related-task";

/// What a task's call came to: the result's text, or the JSON-RPC error it ended with.
pub type Outcome = Result<Box<RawValue>, McpError>;

/// One session's tasks, oldest first.
#[derive(Debug, Default)]
pub struct ClientTasks {
    tasks: Mutex<VecDeque<Arc<ClientTask>>>,
}

#[derive(Debug)]
struct ClientTask {
    /// Random, so a task cannot be guessed.
    id: String,
    created_at: String,
    created: Instant,
    ttl: Duration,
    cancel: CancellationToken,
    state: watch::Sender<State>,
}

#[derive(Debug, Clone)]
enum State {
    Working,
    Ended {
        status: &'static str,
        at: String,
        outcome: Arc<Outcome>,
    },
}

impl ClientTasks {
    /// Make a task of a call: `run` is started with the task's cancellation, and the
    /// `CreateTaskResult` to answer the call with is returned at once. `ttl` is the
    /// client's, in milliseconds.
    pub fn start<F>(&self, ttl: Option<u64>, run: impl FnOnce(CancellationToken) -> F) -> Value
    where
        F: Future<Output = Outcome> + Send + 'static,
    {
        let ttl = ttl.map_or(DEFAULT_TTL, Duration::from_millis).min(MAX_TTL);
        let task = Arc::new(ClientTask {
            id: uuid::Uuid::new_v4().to_string(),
            created_at: now(),
            created: Instant::now(),
            ttl,
            cancel: CancellationToken::new(),
            state: watch::Sender::new(State::Working),
        });
        let running = run(task.cancel.clone());
        let ending = task.clone();
        // The call sees the task's cancellation as its caller's, and tells its server; what
        // it comes to then is dropped, as the task has ended cancelled.
        tokio::spawn(async move {
            let outcome = running.await;
            // A result, even one that says `isError`, completes the task: `tasks/result`
            // gives it; a JSON-RPC error fails it.
            let status = if outcome.is_ok() {
                "completed"
            } else {
                "failed"
            };
            ending.end(status, outcome);
        });
        let created = json!({ "task": task.describe() });
        self.keep(task);
        created
    }

    /// `tasks/get`: the task as it is now.
    pub fn get(&self, id: &str) -> Result<Value, McpError> {
        Ok(self.find(id)?.describe())
    }

    /// `tasks/result`: what the task's call answered, once it has; a cancelled task's is an
    /// error.
    pub fn result(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Box<RawValue>, McpError>> + use<> {
        let task = self.find(id);
        async move {
            let task = task?;
            let mut state = task.state.subscribe();
            let ended = state
                .wait_for(|state| matches!(state, State::Ended { .. }))
                .await
                .map(|state| state.clone());
            let Ok(State::Ended { outcome, .. }) = ended else {
                return Err(McpError::internal_error("the task was dropped", None));
            };
            match &*outcome {
                Ok(result) => with_related_task(result, &task.id),
                Err(error) => Err(error.clone()),
            }
        }
    }

    /// `tasks/list`: the session's tasks, newest first, a page at a time.
    pub fn list(&self, cursor: Option<&str>) -> Result<Value, McpError> {
        let skip = match cursor {
            None => 0,
            Some(cursor) => cursor.parse::<usize>().map_err(|_| {
                McpError::invalid_params(
                    format!("`{cursor}` is not a cursor this server gave"),
                    None,
                )
            })?,
        };
        let tasks = self.live();
        let page: Vec<Value> = tasks
            .iter()
            .rev()
            .skip(skip)
            .take(LIST_PAGE)
            .map(|task| task.describe())
            .collect();
        let mut result = json!({ "tasks": page });
        if skip + LIST_PAGE < tasks.len() {
            result["nextCursor"] = Value::String((skip + LIST_PAGE).to_string());
        }
        Ok(result)
    }

    /// `tasks/cancel`: stop the task's call; a task that already ended cannot be.
    pub fn cancel(&self, id: &str) -> Result<Value, McpError> {
        let task = self.find(id)?;
        if let State::Ended { status, .. } = &*task.state.borrow() {
            return Err(McpError::invalid_params(
                format!("task `{id}` cannot be cancelled: it is already {status}"),
                None,
            ));
        }
        task.cancel.cancel();
        task.end(
            "cancelled",
            Err(McpError::new(
                ErrorCode(-32000),
                format!("task `{id}` was cancelled"),
                None,
            )),
        );
        Ok(task.describe())
    }

    fn find(&self, id: &str) -> Result<Arc<ClientTask>, McpError> {
        self.with_live(|tasks| tasks.iter().find(|task| task.id == id).cloned())
            .flatten()
            .ok_or_else(|| McpError::invalid_params(format!("no task `{id}`"), None))
    }

    /// The tasks not yet expired; expired ones are forgotten.
    fn live(&self) -> Vec<Arc<ClientTask>> {
        self.with_live(|tasks| tasks.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// `with` the tasks not yet expired, under the lock; expired ones are forgotten.
    fn with_live<T>(&self, with: impl FnOnce(&mut VecDeque<Arc<ClientTask>>) -> T) -> Option<T> {
        let mut tasks = self.tasks.lock().ok()?;
        tasks.retain(|task| task.created.elapsed() < task.ttl);
        Some(with(&mut tasks))
    }

    fn keep(&self, task: Arc<ClientTask>) {
        self.with_live(|tasks| {
            while tasks.len() >= MAX_TASKS {
                // The oldest that ended, else the oldest.
                let index = tasks
                    .iter()
                    .position(|task| matches!(*task.state.borrow(), State::Ended { .. }))
                    .unwrap_or(0);
                if let Some(dropped) = tasks.remove(index) {
                    dropped.cancel.cancel();
                }
            }
            tasks.push_back(task);
        });
    }
}

impl ClientTask {
    fn end(&self, status: &'static str, outcome: Outcome) {
        self.state.send_if_modified(|state| {
            if matches!(state, State::Ended { .. }) {
                return false;
            }
            *state = State::Ended {
                status,
                at: now(),
                outcome: Arc::new(outcome),
            };
            true
        });
    }

    /// The task as `tasks/get` describes it.
    fn describe(&self) -> Value {
        let state = self.state.borrow();
        let (status, updated, message) = match &*state {
            State::Working => ("working", self.created_at.clone(), None),
            State::Ended {
                status,
                at,
                outcome,
            } => (
                *status,
                at.clone(),
                outcome
                    .as_ref()
                    .as_ref()
                    .err()
                    .map(|error| error.message.to_string()),
            ),
        };
        let mut task = json!({
            "taskId": self.id,
            "status": status,
            "createdAt": self.created_at,
            "lastUpdatedAt": updated,
            "ttl": u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX),
            "pollInterval": POLL_INTERVAL_MS,
        });
        if let Some(message) = message {
            task["statusMessage"] = Value::String(message);
        }
        task
    }
}

/// The protocol version whose clients get tasks from conductor (later ones have the tasks
/// extension, which rmcp serves).
const TASKS_VERSION: &str = "2025-11-25";

/// An answer to `initialize` for a client of 2025-11-25, with the `tasks` capability rmcp's
/// types have no place for: conductor lists tasks, cancels them and makes them of tool
/// calls. `None` for any other message, which goes out as it is.
pub fn offer_in_initialize(message: &[u8]) -> Option<Vec<u8>> {
    static SERVER_INFO: std::sync::LazyLock<memchr::memmem::Finder> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"serverInfo\""));
    SERVER_INFO.find(message)?;
    let mut message: Map<String, Value> = serde_json::from_slice(message).ok()?;
    let result = message.get_mut("result")?.as_object_mut()?;
    if result.get("protocolVersion")?.as_str()? != TASKS_VERSION {
        return None;
    }
    let capabilities = result.get_mut("capabilities")?.as_object_mut()?;
    capabilities.insert(
        "tasks".to_owned(),
        json!({ "list": {}, "cancel": {}, "requests": { "tools": { "call": {} } } }),
    );
    serde_json::to_vec(&message).ok()
}

/// A task's result with `_meta` naming the task, as `tasks/result` answers.
fn with_related_task(result: &RawValue, id: &str) -> Result<Box<RawValue>, McpError> {
    let unreadable = |error: serde_json::Error| {
        McpError::internal_error(format!("the task's result: {error}"), None)
    };
    let mut result: Map<String, Value> = serde_json::from_str(result.get()).map_err(unreadable)?;
    let meta = result
        .entry("_meta")
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(meta) = meta {
        meta.insert(RELATED_TASK.to_owned(), json!({ "taskId": id }));
    }
    serde_json::value::to_raw_value(&result).map_err(unreadable)
}

/// Now, as ISO 8601 in UTC.
fn now() -> String {
    jiff::Timestamp::now().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[tokio::test]
    async fn a_task_answers_with_its_calls_result_once_it_ends() {
        let tasks = ClientTasks::default();
        let (finish, finished) = tokio::sync::oneshot::channel::<()>();
        let created = tasks.start(Some(60_000), |_| async move {
            let _ = finished.await;
            Ok(text(r#"{"content":[{"type":"text","text":"done"}]}"#))
        });
        let id = created["task"]["taskId"].as_str().unwrap().to_owned();
        assert_eq!(created["task"]["status"], "working");
        assert_eq!(created["task"]["ttl"], 60_000);
        assert_eq!(tasks.get(&id).unwrap()["status"], "working");
        let result = tokio::spawn(tasks.result(&id));
        finish.send(()).unwrap();
        let result: Value = serde_json::from_str(result.await.unwrap().unwrap().get()).unwrap();
        assert_eq!(result["content"][0]["text"], "done");
        assert_eq!(result["_meta"][RELATED_TASK]["taskId"], id.as_str());
        assert_eq!(tasks.get(&id).unwrap()["status"], "completed");
        assert!(
            tasks.cancel(&id).is_err(),
            "an ended task cannot be cancelled"
        );
        assert_eq!(tasks.list(None).unwrap()["tasks"][0]["taskId"], id.as_str());
        assert!(tasks.get("someone-elses").is_err());
    }

    #[tokio::test]
    async fn a_cancelled_task_stops_its_call_and_fails_its_result() {
        let tasks = ClientTasks::default();
        let (seen, saw_cancel) = tokio::sync::oneshot::channel();
        let created = tasks.start(None, |cancel| async move {
            cancel.cancelled().await;
            let _ = seen.send(());
            Ok(text("{}"))
        });
        let id = created["task"]["taskId"].as_str().unwrap().to_owned();
        assert_eq!(tasks.cancel(&id).unwrap()["status"], "cancelled");
        saw_cancel.await.unwrap();
        let error = tasks.result(&id).await.unwrap_err();
        assert!(error.message.contains("cancelled"), "{error:?}");
    }
}
