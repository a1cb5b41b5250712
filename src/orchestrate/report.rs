//! What `orchestrate` answers: the run's status, its output, and how each step ended. The
//! tool's `outputSchema` is generated from these types.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::validate::{Plan, Problem};
use crate::retry::FailureKind;

/// The result of an `orchestrate` call.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct RunReport {
    /// Identifies the run, for `resume` and for the `conductor://runs/{run_id}` resource.
    pub run_id: String,
    pub status: RunStatus,
    /// The workflow's `output`, or the outputs of the steps nothing depends on, by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// How each step ended, by id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub steps: BTreeMap<String, StepReport>,
    /// Full outputs of the steps named in `return`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub returned: BTreeMap<String, Value>,
    /// Why the workflow was refused, when it was (`status: invalid`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<Problem>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<Problem>,
    /// The plan, in `validate` mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<Plan>,
    /// In `preview` mode: the calls that would be made, with their arguments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub would_call: Vec<WouldCall>,
    pub duration_ms: u64,
    /// How to retry what failed, when something did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_hint: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Every step succeeded or was skipped by its condition.
    #[default]
    Succeeded,
    /// Something failed, and every failure was tolerated (`continue`, `default`,
    /// `tolerate_failures`).
    Partial,
    /// A step failed with `on_error: fail`, or the output could not be computed.
    Failed,
    /// The caller cancelled, or the run timed out.
    Cancelled,
    /// The workflow was refused before anything ran (see `errors`).
    Invalid,
    /// `validate` mode: the workflow is fine (see `plan`).
    Valid,
    /// `preview` mode: read-only steps ran (see `would_call`).
    Previewed,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    #[default]
    Pending,
    Succeeded,
    Failed,
    /// Its condition was false, or a dependency was skipped.
    Skipped,
    /// A step it depends on failed.
    UpstreamFailed,
    Cancelled,
}

impl StepStatus {
    pub fn is_settled(self) -> bool {
        self != StepStatus::Pending
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct StepReport {
    pub status: StepStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// Calls made, retries and fallback included.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    pub duration_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StepError>,
    /// Why it was skipped, upstream-failed or cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For a `for_each` step: how its items ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<ItemStats>,
    /// For a `for_each` step: the items that failed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_items: Vec<ItemFailure>,
    /// The output came from the `on_error` fallback.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub via_fallback: bool,
    /// The step failed and took its `on_error` default.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub defaulted: bool,
    /// Kept from an earlier run by `resume`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
}

fn is_zero(value: &u32) -> bool {
    *value == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepError {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ItemStats {
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub skipped: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ItemFailure {
    pub index: usize,
    pub error: StepError,
    pub attempts: u32,
}

/// A call `preview` mode did not make.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WouldCall {
    pub step: String,
    pub tool: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The arguments, rendered with the data the read-only steps returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Value>,
    /// Why the arguments could not be rendered (they read the output of a call not made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unresolved: Option<String>,
}

impl RunReport {
    /// A few lines for hosts that show only text.
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for step in self.steps.values() {
            *counts.entry(status_name(step.status)).or_default() += 1;
        }
        let counts: Vec<String> = counts
            .iter()
            .map(|(status, n)| format!("{n} {status}"))
            .collect();
        let mut text = format!(
            "run {}: {} in {} ms",
            self.run_id,
            serde_json::to_value(self.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            self.duration_ms,
        );
        // A run that ran no step (a validation) has no counts to show.
        if !counts.is_empty() {
            text.push_str(&format!(" ({})", counts.join(", ")));
        }
        for (id, step) in &self.steps {
            if let Some(error) = &step.error {
                text.push_str(&format!("\n- {id}: {}", error.message));
            }
            for item in &step.failed_items {
                text.push_str(&format!("\n- {id}[{}]: {}", item.index, item.error.message));
            }
        }
        for problem in &self.errors {
            text.push_str(&format!("\n- {}: {}", problem.path, problem.message));
            if let Some(hint) = &problem.hint {
                text.push_str(&format!(" ({hint})"));
            }
        }
        // Text reads best as itself; anything else as compact JSON. Long outputs stay in
        // `structuredContent` only.
        let shown = match &self.output {
            Some(Value::String(output)) => Some(output.trim_end().to_owned()),
            Some(output) => Some(output.to_string()),
            None => None,
        };
        if let Some(shown) = shown.filter(|shown| shown.len() <= 2000) {
            text.push_str(&format!("\noutput: {shown}"));
        }
        text
    }
}

pub fn status_name(status: StepStatus) -> &'static str {
    match status {
        StepStatus::Pending => "pending",
        StepStatus::Succeeded => "succeeded",
        StepStatus::Failed => "failed",
        StepStatus::Skipped => "skipped",
        StepStatus::UpstreamFailed => "upstream_failed",
        StepStatus::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_shows_step_counts_only_when_steps_ran() {
        let validated = RunReport {
            run_id: "r_1".to_owned(),
            duration_ms: 2,
            ..RunReport::default()
        };
        assert!(
            !validated.summary().contains("()"),
            "{}",
            validated.summary()
        );
        let mut ran = validated.clone();
        ran.steps.insert("a".to_owned(), StepReport::default());
        assert!(ran.summary().contains("ms (1 "), "{}", ran.summary());
    }
}
