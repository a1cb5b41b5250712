//! Running one step: its condition, its value or call (with retries), each item of a
//! `for_each`, a preview instead of a write, and what `on_error` makes of a failure.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rmcp::model::{CallToolResult, JsonObject};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use super::{Context, DEFAULT_ITEM_CONCURRENCY, DEFAULT_MAX_ITEMS, ItemRecord, StepState};
use crate::orchestrate::expr::{ExprError, Scope};
use crate::orchestrate::report::{
    ItemFailure, ItemStats, StepError, StepReport, StepStatus, WouldCall, status_name,
};
use crate::orchestrate::validate::Safety;
use crate::orchestrate::workflow::{ForEach, OnError, OnErrorKind, Step};
use crate::retry::{FailureKind, Retry};

fn expression_failure(error: ExprError) -> StepError {
    let kind = match error.kind {
        crate::orchestrate::expr::ExprErrorKind::Reference => FailureKind::ReferenceError,
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
    let attempt = || async {
        // Each attempt takes a slot of the run's budget, and gives it back while waiting.
        let permit = tokio::select! {
            permit = context.budget.acquire() => permit,
            () = context.cancel.cancelled() => return Err(cancelled()),
        };
        let outcome = context
            .tools
            .call(tool, args.clone(), timeout, &context.cancel)
            .await;
        drop(permit);
        match outcome {
            Ok(result) if result.is_error != Some(true) => Ok(output_of(&result)),
            Ok(result) => Err(StepError {
                kind: FailureKind::ToolError,
                message: error_text(&result),
            }),
            Err(error) => Err(StepError {
                kind: error.kind(),
                message: error.to_string(),
            }),
        }
    };
    let (outcome, attempts) = retry
        .run(&context.cancel, |failure: &StepError| failure.kind, attempt)
        .await;
    let result = match outcome {
        Err(_) if context.cancel.is_cancelled() => Err(cancelled()),
        other => other,
    };
    Called { result, attempts }
}

fn retry_for(context: &Context, tool: &str, step: &Step) -> Retry {
    let catalog = context.tools.catalog();
    let annotations = catalog
        .tool(tool)
        .and_then(|entry| entry.tool.annotations.clone());
    Retry::for_tool(annotations.as_ref(), step.retry.as_ref())
}

/// Run one step (its call, its items, its fallback) and say how it ended.
pub(super) async fn run_step(
    context: &Context,
    step: &Step,
    safety: Safety,
    scope: Scope,
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
    scope: &Scope,
    would_call: &mut Vec<WouldCall>,
) -> StepState {
    let scope = scope.with(&[(
        "idem_key",
        json!(format!("{}:{}", context.idem_base, step.id)),
    )]);
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
    let called = call_step(context, step, tool, rendered).await;
    match called.result {
        Ok(output) => succeeded(output, called.attempts),
        Err(error) => failed(error, called.attempts),
    }
}

/// The step's tool called with its rendered arguments, retried by the step's policy. Arguments
/// that did not render, or are not an object, fail before any call.
async fn call_step(
    context: &Context,
    step: &Step,
    tool: &str,
    rendered: Result<Value, ExprError>,
) -> Called {
    let args = match rendered {
        Ok(Value::Object(args)) => args,
        Ok(_) => {
            let error = StepError {
                kind: FailureKind::TypeError,
                message: "`args` must be an object".to_owned(),
            };
            return Called {
                result: Err(error),
                attempts: 0,
            };
        }
        Err(error) => {
            return Called {
                result: Err(expression_failure(error)),
                attempts: 0,
            };
        }
    };
    let retry = retry_for(context, tool, step);
    call_with_retry(
        context,
        tool,
        args,
        &retry,
        step.timeout_ms.map(Duration::from_millis),
    )
    .await
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
    scope: &Scope,
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
    let listed = match for_each {
        ForEach::Expression(text) => context.expressions.evaluate(text, scope),
        ForEach::Items(items) => context
            .expressions
            .render(&Value::Array(items.clone()), scope),
    };
    let items = match listed {
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
            let item_scope = scope.with(&[
                (item_name, item.clone()),
                (
                    "loop",
                    json!({"index0": index, "index": index + 1, "length": count}),
                ),
                (
                    "idem_key",
                    json!(format!("{}:{}:{index}", context.idem_base, step.id)),
                ),
            ]);
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
    scope: &Scope,
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
    let called = call_step(context, step, tool, rendered).await;
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
async fn apply_on_error(context: &Context, step: &Step, scope: &Scope, state: &mut StepState) {
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
            let scope = scope.with(&[
                ("error", error),
                (
                    "idem_key",
                    json!(format!("{}:{}:fallback", context.idem_base, step.id)),
                ),
            ]);
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
