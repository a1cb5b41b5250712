//! Running a validated workflow: steps start as soon as their own dependencies settle, under one
//! concurrency budget for the run; each call goes through the [`Tools`] seam.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Tools;
use super::expr::{ExprError, Expressions};
use super::report::{
    ItemFailure, ItemStats, RunReport, RunStatus, StepError, StepReport, StepStatus, WouldCall,
    status_name,
};
use super::validate::{Safety, Validated};
use super::workflow::{OnError, OnErrorKind, Step, Trigger};
use crate::retry::{FailureKind, Retry};

const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_RUN_CONCURRENCY: usize = 8;
const DEFAULT_ITEM_CONCURRENCY: usize = 4;
const DEFAULT_MAX_ITEMS: usize = 100;

/// A progress report: units (steps and items) settled out of those known so far.
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressUpdate {
    pub settled: u64,
    pub total: u64,
    pub message: String,
}

pub type ProgressSink = Arc<dyn Fn(ProgressUpdate) + Send + Sync>;

/// One item of a `for_each` step as it ended, kept so `resume` can skip the ones that succeeded.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemRecord {
    pub input: Value,
    pub status: StepStatus,
    pub output: Value,
}

/// A step as it ended, with what later steps and `resume` read from it.
#[derive(Debug, Clone, Default)]
pub struct StepState {
    pub report: StepReport,
    pub output: Value,
    /// Failed, but `on_error` or `tolerate_failures` accepted it.
    pub tolerated: bool,
    pub items: Vec<ItemRecord>,
}

/// Everything a run leaves behind.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub report: RunReport,
    pub steps: Vec<StepState>,
    /// What `idem_key` values start with: the first run's id, kept by every resumption so a
    /// downstream sees the same idempotency keys again.
    pub idem_base: String,
}

/// What a run needs besides the workflow.
pub struct RunOptions {
    pub run_id: String,
    pub preview: bool,
    pub progress: Option<ProgressSink>,
    pub cancel: CancellationToken,
    /// The earlier run being resumed.
    pub previous: Option<Arc<RunRecord>>,
}

/// Shared by the tasks of one run.
struct Context {
    tools: Arc<dyn Tools>,
    expressions: Arc<Expressions>,
    budget: Semaphore,
    cancel: CancellationToken,
    run_id: String,
    idem_base: String,
    preview: bool,
    progress: Option<ProgressSink>,
    settled: AtomicU64,
    total: AtomicU64,
}

impl Context {
    fn report_progress(&self, settled: u64, message: String) {
        self.settled.fetch_add(settled, Ordering::Relaxed);
        if let Some(progress) = &self.progress {
            progress(ProgressUpdate {
                settled: self.settled.load(Ordering::Relaxed),
                total: self.total.load(Ordering::Relaxed),
                message,
            });
        }
    }
}

/// Run a validated workflow to its end and report how it went.
pub async fn execute(
    validated: &Validated,
    tools: Arc<dyn Tools>,
    expressions: Arc<Expressions>,
    options: RunOptions,
) -> RunRecord {
    let started = Instant::now();
    let workflow = &validated.workflow;
    let run_cancel = options.cancel.child_token();
    let timeout = workflow
        .timeout_ms
        .map_or(DEFAULT_RUN_TIMEOUT, Duration::from_millis);
    let timer = tokio::spawn({
        let run_cancel = run_cancel.clone();
        async move {
            tokio::time::sleep(timeout).await;
            run_cancel.cancel();
        }
    });
    let context = Arc::new(Context {
        tools,
        expressions,
        budget: Semaphore::new(
            workflow
                .max_concurrency
                .map_or(DEFAULT_RUN_CONCURRENCY, |n| n as usize),
        ),
        cancel: run_cancel.clone(),
        run_id: options.run_id.clone(),
        idem_base: options.previous.as_ref().map_or_else(
            || options.run_id.clone(),
            |previous| previous.idem_base.clone(),
        ),
        preview: options.preview,
        progress: options.progress,
        settled: AtomicU64::new(0),
        total: AtomicU64::new(workflow.steps.len() as u64),
    });

    let mut scheduler = Scheduler::new(validated, options.previous.as_deref());
    scheduler.run(&context).await;
    timer.abort();

    let cancelled = run_cancel.is_cancelled();
    let mut record = scheduler.finish(validated, &context, cancelled, started.elapsed());
    record.report.run_id = options.run_id;
    record.idem_base = context.idem_base.clone();
    record
}

/// The run's bookkeeping: which steps wait for which, and how each ended.
struct Scheduler<'a> {
    validated: &'a Validated,
    previous: Option<&'a RunRecord>,
    predecessors: Vec<Vec<usize>>,
    dependants: Vec<Vec<usize>>,
    waiting: Vec<usize>,
    states: Vec<StepState>,
    /// Steps that ran again in this run (not reused from the resumed one).
    reran: Vec<bool>,
    /// The first step whose failure fails the run: no new steps start after it, except
    /// `all_done` and `any_failed` ones.
    failed_at: Option<String>,
    would_call: Vec<WouldCall>,
}

struct Finished {
    index: usize,
    state: StepState,
    would_call: Vec<WouldCall>,
}

impl<'a> Scheduler<'a> {
    fn new(validated: &'a Validated, previous: Option<&'a RunRecord>) -> Self {
        let predecessors = validated.plan.predecessors();
        let mut dependants = vec![Vec::new(); predecessors.len()];
        for (step, befores) in predecessors.iter().enumerate() {
            for before in befores {
                dependants[*before].push(step);
            }
        }
        Scheduler {
            validated,
            previous,
            waiting: predecessors.iter().map(Vec::len).collect(),
            predecessors,
            dependants,
            states: vec![StepState::default(); validated.workflow.steps.len()],
            reran: vec![false; validated.workflow.steps.len()],
            failed_at: None,
            would_call: Vec::new(),
        }
    }

    async fn run(&mut self, context: &Arc<Context>) {
        let mut ready: VecDeque<usize> = (0..self.states.len())
            .filter(|i| self.waiting[*i] == 0)
            .collect();
        let mut running: JoinSet<Finished> = JoinSet::new();
        loop {
            while let Some(index) = ready.pop_front() {
                match self.decide(index, context) {
                    Decision::Settle(state) => self.settle(index, state, context, &mut ready),
                    Decision::Run(scope) => {
                        self.reran[index] = true;
                        let step = self.validated.workflow.steps[index].clone();
                        let safety = self.validated.plan.steps[index].safety;
                        let previous_items = self
                            .previous
                            .and_then(|record| record.steps.get(index))
                            .map(|state| state.items.clone())
                            .unwrap_or_default();
                        let context = context.clone();
                        running.spawn(async move {
                            let (state, would_call) =
                                run_step(&context, &step, safety, scope, previous_items).await;
                            Finished {
                                index,
                                state,
                                would_call,
                            }
                        });
                    }
                }
            }
            let Some(joined) = running.join_next().await else {
                break;
            };
            match joined {
                Ok(finished) => {
                    self.would_call.extend(finished.would_call);
                    self.settle(finished.index, finished.state, context, &mut ready);
                }
                Err(error) => tracing::error!(error = %error, "a workflow step task failed"),
            }
        }
    }

    /// Whether a step whose dependencies have all settled runs, and if not, how it ends.
    fn decide(&self, index: usize, context: &Context) -> Decision {
        let step = &self.validated.workflow.steps[index];
        let ended = |status: StepStatus, reason: String| {
            Decision::Settle(StepState {
                report: StepReport {
                    status,
                    tool: step.tool.clone(),
                    reason: Some(reason),
                    ..StepReport::default()
                },
                ..StepState::default()
            })
        };
        if context.cancel.is_cancelled() {
            return ended(StepStatus::Cancelled, "the run was cancelled".to_owned());
        }
        let trigger = step.trigger;
        let befores = &self.predecessors[index];
        let of = |i: &usize| (&self.validated.workflow.steps[*i].id, &self.states[*i]);
        let broken = befores.iter().map(of).find(|(_, state)| {
            matches!(
                state.report.status,
                StepStatus::Failed | StepStatus::UpstreamFailed | StepStatus::Cancelled
            ) && !state.tolerated
        });
        let skipped = befores
            .iter()
            .map(of)
            .find(|(_, state)| state.report.status == StepStatus::Skipped);
        let any_failed = befores
            .iter()
            .map(of)
            .any(|(_, state)| state.report.status == StepStatus::Failed);
        match trigger {
            Trigger::AllSucceeded | Trigger::NoneFailed if broken.is_some() => {
                let (id, state) = broken.unwrap_or_else(|| unreachable!());
                return ended(
                    StepStatus::UpstreamFailed,
                    format!("step `{id}` {}", status_name(state.report.status)),
                );
            }
            Trigger::AllSucceeded if skipped.is_some() => {
                let (id, _) = skipped.unwrap_or_else(|| unreachable!());
                return ended(StepStatus::Skipped, format!("step `{id}` was skipped"));
            }
            Trigger::AnyFailed if !any_failed => {
                return ended(
                    StepStatus::Skipped,
                    "no step it depends on failed".to_owned(),
                );
            }
            _ => {}
        }
        if let Some(failed) = &self.failed_at
            && !matches!(trigger, Trigger::AllDone | Trigger::AnyFailed)
        {
            return ended(
                StepStatus::Cancelled,
                format!("the run failed at step `{failed}`"),
            );
        }
        // Resuming: a step that succeeded before keeps its result, unless something it depends
        // on ran again.
        // A fan-out that succeeded with failed items runs again; its succeeded items are
        // still kept, item by item.
        if let Some(previous) = self.previous.and_then(|record| record.steps.get(index))
            && previous.report.status == StepStatus::Succeeded
            && previous.report.failed_items.is_empty()
            && !befores.iter().any(|before| self.reran[*before])
        {
            let mut state = previous.clone();
            state.report.reused = true;
            return Decision::Settle(state);
        }
        Decision::Run(self.scope(&context.run_id))
    }

    /// What expressions see: the inputs, the run, and every step settled so far.
    fn scope(&self, run_id: &str) -> Value {
        let steps: serde_json::Map<String, Value> = self
            .validated
            .workflow
            .steps
            .iter()
            .zip(&self.states)
            .filter(|(_, state)| state.report.status.is_settled())
            .map(|(step, state)| (step.id.clone(), step_view(state)))
            .collect();
        json!({
            "inputs": self.validated.workflow.inputs,
            "steps": steps,
            "run": {"id": run_id},
        })
    }

    fn settle(
        &mut self,
        index: usize,
        state: StepState,
        context: &Context,
        ready: &mut VecDeque<usize>,
    ) {
        let step = &self.validated.workflow.steps[index];
        let failed_hard = state.report.status == StepStatus::Failed && !state.tolerated;
        if failed_hard && self.failed_at.is_none() {
            self.failed_at = Some(step.id.clone());
        }
        let mut message = format!("{}: {}", step.id, status_name(state.report.status));
        if let Some(error) = &state.report.error {
            message.push_str(&format!(" ({})", error.message));
        }
        self.states[index] = state;
        context.report_progress(1, message);
        for dependant in self.dependants[index].clone() {
            self.waiting[dependant] -= 1;
            if self.waiting[dependant] == 0 {
                ready.push_back(dependant);
            }
        }
    }

    fn finish(
        mut self,
        validated: &Validated,
        context: &Context,
        cancelled: bool,
        elapsed: Duration,
    ) -> RunRecord {
        let workflow = &validated.workflow;
        let mut report = RunReport {
            duration_ms: elapsed.as_millis() as u64,
            warnings: validated.warnings.clone(),
            would_call: std::mem::take(&mut self.would_call),
            ..RunReport::default()
        };
        let any_cancelled = self
            .states
            .iter()
            .any(|s| s.report.status == StepStatus::Cancelled);
        let hard_failure = self.failed_at.is_some();
        let soft_failure = self.states.iter().any(|s| {
            (s.report.status == StepStatus::Failed && s.tolerated)
                || s.report.stats.is_some_and(|stats| stats.failed > 0)
        });
        report.status = if context.preview {
            RunStatus::Previewed
        } else if cancelled && any_cancelled {
            RunStatus::Cancelled
        } else if hard_failure {
            RunStatus::Failed
        } else if soft_failure {
            RunStatus::Partial
        } else {
            RunStatus::Succeeded
        };

        let scope = self.scope(&context.run_id);
        report.output = match &workflow.output {
            Some(output) => match context.expressions.render(output, &scope) {
                Ok(value) => Some(value),
                Err(error) => {
                    if report.status == RunStatus::Succeeded || report.status == RunStatus::Partial
                    {
                        report.status = RunStatus::Failed;
                    }
                    report.errors.push(super::validate::Problem {
                        path: "/output".to_owned(),
                        code: error.kind.code().to_owned(),
                        message: format!("the output could not be computed: {error}"),
                        hint: None,
                    });
                    None
                }
            },
            None => Some(Value::Object(
                (0..self.states.len())
                    .filter(|i| self.dependants[*i].is_empty())
                    .map(|i| (workflow.steps[i].id.clone(), self.states[i].output.clone()))
                    .collect(),
            )),
        };
        for id in &workflow.return_steps {
            if let Some(index) = workflow.steps.iter().position(|step| &step.id == id) {
                report
                    .returned
                    .insert(id.clone(), self.states[index].output.clone());
            }
        }
        report.steps = workflow
            .steps
            .iter()
            .zip(&self.states)
            .map(|(step, state)| (step.id.clone(), state.report.clone()))
            .collect();
        if matches!(
            report.status,
            RunStatus::Failed | RunStatus::Partial | RunStatus::Cancelled
        ) {
            let again: usize = self
                .states
                .iter()
                .map(|s| match s.report.status {
                    StepStatus::Succeeded => s.report.failed_items.len(),
                    _ => 1,
                })
                .sum();
            report.resume_hint = Some(format!(
                "call orchestrate again with the same steps and \"resume\": {{\"run_id\": \"{}\"}} to run the {again} failed, skipped or cancelled steps and items again",
                context.run_id
            ));
        }
        RunRecord {
            report,
            steps: self.states,
            idem_base: String::new(),
        }
    }
}

enum Decision {
    Settle(StepState),
    Run(Value),
}

/// What `steps.<id>` shows to expressions.
fn step_view(state: &StepState) -> Value {
    let mut view = json!({
        "output": state.output,
        "status": status_name(state.report.status),
        "attempts": state.report.attempts,
        "duration_ms": state.report.duration_ms,
        "error": state.report.error.as_ref().map(|error| json!({"kind": error.kind, "message": error.message})),
        "via_fallback": state.report.via_fallback,
        "defaulted": state.report.defaulted,
    });
    if let Some(stats) = &state.report.stats {
        view["stats"] = json!(stats);
        view["items"] = Value::Array(
            state
                .items
                .iter()
                .map(|item| json!({"status": status_name(item.status), "output": item.output}))
                .collect(),
        );
    }
    view
}

fn with_vars(scope: &Value, vars: &[(&str, Value)]) -> Value {
    let mut scope = scope.clone();
    if let Value::Object(map) = &mut scope {
        for (name, value) in vars {
            map.insert((*name).to_owned(), value.clone());
        }
    }
    scope
}

fn expression_failure(error: ExprError) -> StepError {
    let kind = match error.kind {
        super::expr::ExprErrorKind::Reference => FailureKind::ReferenceError,
        _ => FailureKind::TypeError,
    };
    StepError {
        kind,
        message: error.message,
    }
}

/// What a finished call gives the steps after it: its structured content, else its text
/// (parsed when it is JSON), else its content blocks.
pub fn output_of(result: &CallToolResult) -> Value {
    if let Some(structured) = &result.structured_content {
        return structured.clone();
    }
    match result.content.as_slice() {
        [] => Value::Null,
        [single] => match single.as_text() {
            Some(text) => serde_json::from_str(&text.text)
                .unwrap_or_else(|_| Value::String(text.text.clone())),
            None => serde_json::to_value(single).unwrap_or(Value::Null),
        },
        blocks => serde_json::to_value(blocks).unwrap_or(Value::Null),
    }
}

fn error_text(result: &CallToolResult) -> String {
    let text: Vec<&str> = result
        .content
        .iter()
        .filter_map(|block| block.as_text().map(|t| t.text.as_str()))
        .collect();
    if text.is_empty() {
        "the tool reported an error".to_owned()
    } else {
        text.join("\n")
    }
}

/// The outcome of one call with its retries.
struct Called {
    result: Result<Value, StepError>,
    attempts: u32,
}

async fn call_with_retry(
    context: &Context,
    tool: &str,
    args: JsonObject,
    retry: &Retry,
    timeout: Option<Duration>,
) -> Called {
    let cancelled = || StepError {
        kind: FailureKind::Cancelled,
        message: "cancelled".to_owned(),
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        let permit = tokio::select! {
            permit = context.budget.acquire() => permit,
            () = context.cancel.cancelled() => return Called { result: Err(cancelled()), attempts: attempts - 1 },
        };
        let outcome = context
            .tools
            .call(tool, args.clone(), timeout, &context.cancel)
            .await;
        drop(permit);
        let failure = match outcome {
            Ok(result) if result.is_error != Some(true) => {
                return Called {
                    result: Ok(output_of(&result)),
                    attempts,
                };
            }
            Ok(result) => StepError {
                kind: FailureKind::ToolError,
                message: error_text(&result),
            },
            Err(error) => StepError {
                kind: error.kind(),
                message: error.to_string(),
            },
        };
        if context.cancel.is_cancelled() {
            return Called {
                result: Err(cancelled()),
                attempts,
            };
        }
        if !retry.retries(failure.kind, attempts) {
            return Called {
                result: Err(failure),
                attempts,
            };
        }
        tokio::select! {
            () = tokio::time::sleep(retry.delay(attempts)) => {}
            () = context.cancel.cancelled() => return Called { result: Err(cancelled()), attempts },
        }
    }
}

fn retry_for(context: &Context, tool: &str, step: &Step) -> Retry {
    let catalog = context.tools.catalog();
    let annotations = catalog
        .tool(tool)
        .and_then(|entry| entry.tool.annotations.clone());
    Retry::for_tool(annotations.as_ref(), step.retry.as_ref())
}

/// Run one step (its call, its items, its fallback) and say how it ended.
async fn run_step(
    context: &Context,
    step: &Step,
    safety: Safety,
    scope: Value,
    previous_items: Vec<ItemRecord>,
) -> (StepState, Vec<WouldCall>) {
    let started = Instant::now();
    let mut would_call = Vec::new();
    let mut state = if step.for_each.is_some() {
        run_items(
            context,
            step,
            safety,
            &scope,
            &previous_items,
            &mut would_call,
        )
        .await
    } else {
        run_single(context, step, safety, &scope, &mut would_call).await
    };
    state.report.tool = step.tool.clone();
    if state.report.status == StepStatus::Failed {
        apply_on_error(context, step, &scope, &mut state).await;
    }
    state.report.duration_ms = started.elapsed().as_millis() as u64;
    (state, would_call)
}

fn failed(error: StepError, attempts: u32) -> StepState {
    let status = if error.kind == FailureKind::Cancelled {
        StepStatus::Cancelled
    } else {
        StepStatus::Failed
    };
    StepState {
        report: StepReport {
            status,
            attempts,
            error: Some(error),
            ..StepReport::default()
        },
        ..StepState::default()
    }
}

fn succeeded(output: Value, attempts: u32) -> StepState {
    StepState {
        report: StepReport {
            status: StepStatus::Succeeded,
            attempts,
            ..StepReport::default()
        },
        output,
        ..StepState::default()
    }
}

fn skipped(reason: &str) -> StepState {
    StepState {
        report: StepReport {
            status: StepStatus::Skipped,
            reason: Some(reason.to_owned()),
            ..StepReport::default()
        },
        ..StepState::default()
    }
}

async fn run_single(
    context: &Context,
    step: &Step,
    safety: Safety,
    scope: &Value,
    would_call: &mut Vec<WouldCall>,
) -> StepState {
    let scope = with_vars(
        scope,
        &[(
            "idem_key",
            json!(format!("{}:{}", context.idem_base, step.id)),
        )],
    );
    if let Some(condition) = &step.condition {
        match context.expressions.condition(condition, &scope) {
            Ok(true) => {}
            Ok(false) => return skipped("its condition was false"),
            Err(error) => return failed(expression_failure(error), 0),
        }
    }
    if let Some(value) = &step.value {
        return match context.expressions.render(value, &scope) {
            Ok(output) => succeeded(output, 0),
            Err(error) => failed(expression_failure(error), 0),
        };
    }
    let Some(tool) = &step.tool else {
        return failed(
            StepError {
                kind: FailureKind::InvalidArgs,
                message: "no tool".to_owned(),
            },
            0,
        );
    };
    let args = Value::Object(step.args.clone().unwrap_or_default());
    let rendered = context.expressions.render(&args, &scope);
    if context.preview && safety != Safety::ReadOnly {
        would_call.push(preview_call(step, tool, None, rendered));
        return not_called();
    }
    let args = match rendered {
        Ok(Value::Object(args)) => args,
        Ok(_) => {
            return failed(
                StepError {
                    kind: FailureKind::TypeError,
                    message: "`args` must be an object".to_owned(),
                },
                0,
            );
        }
        Err(error) => return failed(expression_failure(error), 0),
    };
    let called = call_with_retry(
        context,
        tool,
        args,
        &retry_for(context, tool, step),
        step.timeout_ms.map(Duration::from_millis),
    )
    .await;
    match called.result {
        Ok(output) => succeeded(output, called.attempts),
        Err(error) => failed(error, called.attempts),
    }
}

/// In preview, a write is not made; its dependants still get to show what they would do.
fn not_called() -> StepState {
    let mut state = succeeded(Value::Null, 0);
    state.report.reason = Some("preview: not called".to_owned());
    state
}

fn preview_call(
    step: &Step,
    tool: &str,
    index: Option<usize>,
    rendered: Result<Value, ExprError>,
) -> WouldCall {
    let (args, unresolved) = match rendered {
        Ok(args) => (Some(args), None),
        Err(error) => (None, Some(error.message)),
    };
    WouldCall {
        step: step.id.clone(),
        tool: tool.to_owned(),
        index,
        args,
        unresolved,
    }
}

/// A `for_each` step: the list, then each item with its own condition, arguments and retries.
async fn run_items(
    context: &Context,
    step: &Step,
    safety: Safety,
    scope: &Value,
    previous_items: &[ItemRecord],
    would_call: &mut Vec<WouldCall>,
) -> StepState {
    let Some(for_each) = &step.for_each else {
        return failed(
            StepError {
                kind: FailureKind::TypeError,
                message: "no for_each".to_owned(),
            },
            0,
        );
    };
    let items = match context.expressions.evaluate(for_each, scope) {
        Ok(Value::Array(items)) => items,
        Ok(other) => {
            let kind = match other {
                Value::Null => "null",
                Value::Object(_) => "an object",
                Value::String(_) => "a string",
                _ => "not a list",
            };
            return failed(
                StepError {
                    kind: FailureKind::TypeError,
                    message: format!("`for_each` must give a list, and gave {kind}"),
                },
                0,
            );
        }
        Err(error) => return failed(expression_failure(error), 0),
    };
    let max_items = step.max_items.map_or(DEFAULT_MAX_ITEMS, |n| n as usize);
    if items.len() > max_items {
        return failed(
            StepError {
                kind: FailureKind::InvalidArgs,
                message: format!(
                    "`for_each` gave {} items, more than `max_items` ({max_items})",
                    items.len()
                ),
            },
            0,
        );
    }
    context
        .total
        .fetch_add(items.len() as u64, Ordering::Relaxed);
    let item_name = step.item_name.as_deref().unwrap_or("item");
    let limit = Semaphore::new(
        step.max_concurrency
            .map_or(DEFAULT_ITEM_CONCURRENCY, |n| n as usize),
    );
    let count = items.len();
    let runs = items.iter().enumerate().map(|(index, item)| {
        let limit = &limit;
        let previous = previous_items
            .get(index)
            .filter(|p| p.status == StepStatus::Succeeded && &p.input == item);
        async move {
            if let Some(previous) = previous {
                return (previous.clone(), 0, None, None, true);
            }
            let Ok(_slot) = limit.acquire().await else {
                return (
                    item_record(item, StepStatus::Cancelled, Value::Null),
                    0,
                    None,
                    None,
                    false,
                );
            };
            let item_scope = with_vars(
                scope,
                &[
                    (item_name, item.clone()),
                    (
                        "loop",
                        json!({"index0": index, "index": index + 1, "length": count}),
                    ),
                    (
                        "idem_key",
                        json!(format!("{}:{}:{index}", context.idem_base, step.id)),
                    ),
                ],
            );
            let (record, attempts, error, preview) =
                run_item(context, step, safety, item, index, &item_scope).await;
            let message = format!(
                "{}: item {}/{count} {}",
                step.id,
                index + 1,
                status_name(record.status)
            );
            context.report_progress(1, message);
            (record, attempts, error, preview, false)
        }
    });
    let results = futures::future::join_all(runs).await;

    let mut stats = ItemStats {
        total: count,
        ..ItemStats::default()
    };
    let mut state = StepState::default();
    let mut cancelled = false;
    for (index, (record, attempts, error, preview, _reused)) in results.into_iter().enumerate() {
        state.report.attempts += attempts;
        match record.status {
            StepStatus::Succeeded => stats.succeeded += 1,
            StepStatus::Skipped => stats.skipped += 1,
            StepStatus::Cancelled => cancelled = true,
            _ => stats.failed += 1,
        }
        if let Some(error) = error {
            state.report.failed_items.push(ItemFailure {
                index,
                error,
                attempts,
            });
        }
        would_call.extend(preview);
        state.items.push(record);
    }
    state.output = Value::Array(state.items.iter().map(|item| item.output.clone()).collect());
    let allowed = step
        .tolerate_failures
        .as_ref()
        .map_or(0, |tolerance| tolerance.allowed(count));
    state.report.status = if cancelled {
        StepStatus::Cancelled
    } else if stats.failed > allowed {
        state.report.error = Some(StepError {
            kind: state
                .report
                .failed_items
                .first()
                .map_or(FailureKind::ToolError, |f| f.error.kind),
            message: format!(
                "{} of {count} items failed, more than the {allowed} tolerated",
                stats.failed
            ),
        });
        StepStatus::Failed
    } else {
        StepStatus::Succeeded
    };
    state.report.stats = Some(stats);
    state
}

fn item_record(input: &Value, status: StepStatus, output: Value) -> ItemRecord {
    ItemRecord {
        input: input.clone(),
        status,
        output,
    }
}

async fn run_item(
    context: &Context,
    step: &Step,
    safety: Safety,
    item: &Value,
    index: usize,
    scope: &Value,
) -> (ItemRecord, u32, Option<StepError>, Option<WouldCall>) {
    if let Some(condition) = &step.condition {
        match context.expressions.condition(condition, scope) {
            Ok(true) => {}
            Ok(false) => {
                return (
                    item_record(item, StepStatus::Skipped, Value::Null),
                    0,
                    None,
                    None,
                );
            }
            Err(error) => {
                return (
                    item_record(item, StepStatus::Failed, Value::Null),
                    0,
                    Some(expression_failure(error)),
                    None,
                );
            }
        }
    }
    if let Some(value) = &step.value {
        return match context.expressions.render(value, scope) {
            Ok(output) => (
                item_record(item, StepStatus::Succeeded, output),
                0,
                None,
                None,
            ),
            Err(error) => (
                item_record(item, StepStatus::Failed, Value::Null),
                0,
                Some(expression_failure(error)),
                None,
            ),
        };
    }
    let tool = step.tool.as_deref().unwrap_or_default();
    let rendered = context
        .expressions
        .render(&Value::Object(step.args.clone().unwrap_or_default()), scope);
    if context.preview && safety != Safety::ReadOnly {
        let call = preview_call(step, tool, Some(index), rendered);
        return (
            item_record(item, StepStatus::Succeeded, Value::Null),
            0,
            None,
            Some(call),
        );
    }
    let args = match rendered {
        Ok(Value::Object(args)) => args,
        Ok(_) => {
            let error = StepError {
                kind: FailureKind::TypeError,
                message: "`args` must be an object".to_owned(),
            };
            return (
                item_record(item, StepStatus::Failed, Value::Null),
                0,
                Some(error),
                None,
            );
        }
        Err(error) => {
            return (
                item_record(item, StepStatus::Failed, Value::Null),
                0,
                Some(expression_failure(error)),
                None,
            );
        }
    };
    let called = call_with_retry(
        context,
        tool,
        args,
        &retry_for(context, tool, step),
        step.timeout_ms.map(Duration::from_millis),
    )
    .await;
    match called.result {
        Ok(output) => (
            item_record(item, StepStatus::Succeeded, output),
            called.attempts,
            None,
            None,
        ),
        Err(error) if error.kind == FailureKind::Cancelled => (
            item_record(item, StepStatus::Cancelled, Value::Null),
            called.attempts,
            None,
            None,
        ),
        Err(error) => (
            item_record(item, StepStatus::Failed, Value::Null),
            called.attempts,
            Some(error),
            None,
        ),
    }
}

/// After retries: the step's `on_error` decides what its failure means.
async fn apply_on_error(context: &Context, step: &Step, scope: &Value, state: &mut StepState) {
    match &step.on_error {
        OnError::Simple(OnErrorKind::Fail) => {}
        OnError::Simple(OnErrorKind::Continue) => state.tolerated = true,
        OnError::Default(default) => {
            state.tolerated = true;
            state.report.defaulted = true;
            state.output = context
                .expressions
                .render(&default.default, scope)
                .unwrap_or_else(|_| default.default.clone());
        }
        OnError::Fallback(fallback) => {
            let fallback = &fallback.fallback;
            let error = state.report.error.as_ref().map_or(
                Value::Null,
                |error| json!({"kind": error.kind, "message": error.message}),
            );
            let scope = with_vars(
                scope,
                &[
                    ("error", error),
                    (
                        "idem_key",
                        json!(format!("{}:{}:fallback", context.idem_base, step.id)),
                    ),
                ],
            );
            let args = match context
                .expressions
                .render(&Value::Object(fallback.args.clone()), &scope)
            {
                Ok(Value::Object(args)) => args,
                Ok(_) | Err(_) => {
                    let message = "the fallback's `args` could not be computed".to_owned();
                    append_error(state, &message);
                    return;
                }
            };
            let catalog = context.tools.catalog();
            let annotations = catalog
                .tool(&fallback.tool)
                .and_then(|entry| entry.tool.annotations.clone());
            let retry = Retry::for_tool(annotations.as_ref(), None);
            let called = call_with_retry(
                context,
                &fallback.tool,
                args,
                &retry,
                step.timeout_ms.map(Duration::from_millis),
            )
            .await;
            state.report.attempts += called.attempts;
            match called.result {
                Ok(output) => {
                    state.report.status = StepStatus::Succeeded;
                    state.report.via_fallback = true;
                    state.output = output;
                }
                Err(error) => append_error(
                    state,
                    &format!(
                        "the fallback `{}` failed too: {}",
                        fallback.tool, error.message
                    ),
                ),
            }
        }
    }
}

fn append_error(state: &mut StepState, message: &str) {
    if let Some(error) = &mut state.report.error {
        error.message = format!("{}; {message}", error.message);
    }
}

/// Run ids: time-ordered and unique within the process.
pub fn new_run_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_millis());
    format!(
        "r_{millis:x}_{:04x}",
        COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff
    )
}
