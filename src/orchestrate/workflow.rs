//! The workflow language: what a caller of `orchestrate` sends. The JSON Schema offered to
//! clients is generated from these types, so their doc comments are what a model reads.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::retry::{RetryOn, RetryPolicy};

/// A workflow: a graph of tool calls across servers, run as one request. Steps form a graph
/// through `needs` and through `${{ steps.<id>... }}` references; a step starts as soon as the
/// steps it depends on have settled, so independent steps run in parallel.
///
/// Expressions: in any string of `args`, `value`, `output` (and in `if`, `for_each`), write
/// `${{ expr }}` for a Jinja expression, `${% if x %}...${% endif %}` and
/// `${% for x in xs %}...${% endfor %}` for blocks. A string that is exactly one `${{ expr }}`
/// keeps the expression's JSON type (a list stays a list); any other string is rendered as
/// text. Plain `{{ }}` is left alone. In scope: `inputs`, `steps.<id>.output` (also `.status`,
/// `.error`, `.items`, `.stats`), the loop variable of a `for_each` step (`item` unless `as`
/// says otherwise) and `loop.index0`, `idem_key` (a key stable across retries, unique per step
/// and item), and `error` inside a fallback's args. Jinja filters work: `length`, `map`,
/// `select`, `selectattr`, `sum`, `join`, `default`, `tojson`... A step's output is the tool's
/// `structuredContent`, or else its text parsed as JSON when it is JSON, or else the text.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Workflow {
    /// Values the steps read as `${{ inputs.<name> }}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, Value>,
    /// The steps, 1 to 100. Order does not matter: dependencies do.
    #[schemars(length(min = 1, max = 100))]
    pub steps: Vec<Step>,
    /// The run's result, with `${{ }}` expressions over `steps` and `inputs`. Without it the
    /// result is the output of every step no other step depends on, by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Ids of steps whose full outputs are returned too (by default only their status is).
    #[serde(default, rename = "return", skip_serializing_if = "Vec::is_empty")]
    pub return_steps: Vec<String>,
    /// `run` (default) executes; `validate` only checks the workflow and returns the plan;
    /// `preview` runs only read-only steps and shows the arguments every other step would get.
    #[serde(default)]
    pub mode: Mode,
    /// Re-run a recorded run: steps and items that succeeded keep their outputs; failed,
    /// skipped and cancelled ones run again, with their dependants. The steps must be the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<Resume>,
    /// A limit for the whole run, in milliseconds (default 300000); then everything still
    /// running is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3_600_000))]
    pub timeout_ms: Option<u64>,
    /// How many tool calls of this run may be in flight at once, fan-out items included
    /// (default 8).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Run,
    Validate,
    Preview,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// The `run_id` of an earlier run.
    pub run_id: String,
}

/// One node of the graph: a tool call (`tool` + `args`) or a computed value (`value`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Unique name, referenced as `steps.<id>`: a lowercase letter, then lowercase letters,
    /// digits or `_`.
    #[schemars(regex(pattern = r"^[a-z][a-z0-9_]{0,63}$"))]
    pub id: String,
    /// What the step is for; shown in progress messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The tool to call, by its name in `tools/list` (such as `github__create_issue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The tool's arguments; any string may hold `${{ }}` expressions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<serde_json::Map<String, Value>>,
    /// Instead of `tool`: the step's output is this value, with expressions evaluated (to
    /// reshape or combine other steps' outputs, no call made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// Steps that must settle before this one, besides those its expressions reference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<String>,
    /// A condition (an expression, with or without `${{ }}`): when false the step is
    /// `skipped`. On a `for_each` step it is checked per item and may use the item.
    #[serde(default, rename = "if", skip_serializing_if = "Option::is_none")]
    pub condition: Option<String>,
    /// When the step runs, given how its dependencies ended: `all_succeeded` (default),
    /// `none_failed` (skipped dependencies are fine), `all_done` (always, for reports and
    /// notifications), `any_failed` (only after a failure, for alerts or compensation).
    #[serde(default)]
    pub trigger: Trigger,
    /// The list the step runs once per element of, in parallel: an expression that yields a
    /// list, or the list itself (its strings may hold `${{ }}` expressions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub for_each: Option<ForEach>,
    /// The name of the loop variable of `for_each` (default `item`).
    #[serde(default, rename = "as", skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[a-z_][a-z0-9_]{0,63}$"))]
    pub item_name: Option<String>,
    /// How many items of a `for_each` run at once (default 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32))]
    pub max_concurrency: Option<u32>,
    /// The most items a `for_each` accepts (default 100); more is an error, never a silent cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_items: Option<u32>,
    /// How many items of a `for_each` may fail with the step still succeeding: a count, or a
    /// percentage such as `"20%"` (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerate_failures: Option<Tolerance>,
    /// A limit for each attempt of the call, in milliseconds (default: the server's
    /// `call_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3_600_000))]
    pub timeout_ms: Option<u64>,
    /// How to retry a failed call. By default, tools marked read-only or idempotent are retried
    /// on transient failures; other tools only when the call certainly never reached the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// What a failure (after retries) means: `fail` (default: the run fails and no new steps
    /// start, except `all_done`/`any_failed` ones), `continue` (tolerated: dependants run, the
    /// output is null), `{"default": value}` (tolerated, with that output) or
    /// `{"fallback": {"tool": ..., "args": {...}}}` (call another tool; `error` is in scope).
    #[serde(default)]
    pub on_error: OnError,
}

/// When a step runs, given how the steps it depends on ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    #[default]
    AllSucceeded,
    NoneFailed,
    AllDone,
    AnyFailed,
}

/// A count of items, or a percentage of them such as `"20%"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Tolerance {
    Count(u32),
    Percent(#[schemars(regex(pattern = r"^(100|[1-9]?[0-9])%$"))] String),
}

impl Tolerance {
    /// How many of `total` items may fail.
    pub fn allowed(&self, total: usize) -> usize {
        match self {
            Tolerance::Count(count) => *count as usize,
            Tolerance::Percent(text) => {
                let percent: usize = text.trim_end_matches('%').parse().unwrap_or(0);
                total * percent / 100
            }
        }
    }
}

/// What a step's failure means once retries are spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum OnError {
    Simple(OnErrorKind),
    Default(DefaultOutput),
    Fallback(FallbackCall),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnErrorKind {
    Fail,
    Continue,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DefaultOutput {
    /// The output the step takes when it fails.
    pub default: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FallbackCall {
    pub fallback: Fallback,
}

/// Another tool to call when the step fails; its output becomes the step's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fallback {
    pub tool: String,
    #[serde(default)]
    pub args: serde_json::Map<String, Value>,
}

impl Default for OnError {
    fn default() -> Self {
        OnError::Simple(OnErrorKind::Fail)
    }
}

/// What a `for_each` step runs over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ForEach {
    /// An expression that yields a list, with or without its `${{ }}`.
    Expression(String),
    /// The items themselves.
    Items(Vec<Value>),
}
