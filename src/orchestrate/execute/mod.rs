//! Running a validated workflow: steps start as soon as their own dependencies settle, under one
//! concurrency budget for the run; each call goes through the [`Tools`] seam. This module is
//! the scheduler; `step` runs one step (its call or value, its items, retries and fallback).

mod step;

pub use step::output_of;
use step::run_step;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Tools;
use super::expr::{Expressions, Scope, ScopeValue};
use super::report::{RunReport, RunStatus, StepReport, StepStatus, WouldCall, status_name};
use super::validate::Validated;
use super::workflow::Trigger;

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
    /// What expressions see of each settled step, converted once when it settles.
    views: Vec<Option<ScopeValue>>,
    inputs: ScopeValue,
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
            views: vec![None; validated.workflow.steps.len()],
            inputs: ScopeValue::new(&validated.workflow.inputs),
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
                    Decision::Settle(state) => self.settle(index, *state, context, &mut ready),
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
            Decision::Settle(Box::new(StepState {
                report: StepReport {
                    status,
                    tool: step.tool.clone(),
                    reason: Some(reason),
                    ..StepReport::default()
                },
                ..StepState::default()
            }))
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
        match (trigger, broken, skipped) {
            (Trigger::AllSucceeded | Trigger::NoneFailed, Some((id, state)), _) => {
                return ended(
                    StepStatus::UpstreamFailed,
                    format!("step `{id}` {}", status_name(state.report.status)),
                );
            }
            (Trigger::AllSucceeded, None, Some((id, _))) => {
                return ended(StepStatus::Skipped, format!("step `{id}` was skipped"));
            }
            (Trigger::AnyFailed, _, _) if !any_failed => {
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
            return Decision::Settle(Box::new(state));
        }
        Decision::Run(self.scope(&context.run_id, Some(befores)))
    }

    /// What expressions see: the inputs, the run, and the steps settled so far; for a step,
    /// only those it depends on (every step it references is one), so a long chain does not
    /// gather every earlier step for each step.
    fn scope(&self, run_id: &str, only: Option<&[usize]>) -> Scope {
        let view = |index: usize| {
            let id = &self.validated.workflow.steps[index].id;
            self.views[index].clone().map(|view| (id.clone(), view))
        };
        let steps: Vec<(String, ScopeValue)> = match only {
            Some(indices) => indices.iter().filter_map(|index| view(*index)).collect(),
            None => (0..self.views.len()).filter_map(view).collect(),
        };
        Scope::of_run(&self.inputs, steps.into_iter(), run_id)
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
        if state.report.status.is_settled() {
            self.views[index] = Some(ScopeValue::new(&step_view(&state)));
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

        let scope = self.scope(&context.run_id, None);
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
    /// Boxed: a state is large, and most steps run.
    Settle(Box<StepState>),
    Run(Scope),
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

/// Run ids: random, so that nobody can guess another's run (a run's id is all it takes to
/// name it in a `resume` or a read, which its owner check then refuses).
pub fn new_run_id() -> String {
    format!("r_{}", uuid::Uuid::new_v4().simple())
}
