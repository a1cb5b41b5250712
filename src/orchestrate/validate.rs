//! Checking a workflow before anything runs: its shape against the schema, then its meaning
//! (ids, tools, arguments against each tool's `inputSchema`, references, cycles). Every problem
//! comes back at once, each with a JSON pointer and, where one helps, a hint.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::expr::{Expressions, References, escape_pointer};
use super::workflow::{ForEach, OnError, Step, Workflow};
use crate::catalog::Catalog;
use crate::config::did_you_mean;
use crate::retry::{RetryOn, is_repeatable};

/// The fields of `steps.<id>` in expressions, as `execute::step_view` shows a step (`items`
/// and `stats` on a `for_each` step).
const STEP_FIELDS: [&str; 9] = [
    "output",
    "status",
    "error",
    "attempts",
    "duration_ms",
    "via_fallback",
    "defaulted",
    "items",
    "stats",
];

/// One thing wrong with a workflow (or worth a warning), at a JSON pointer into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Problem {
    /// Where, as a JSON pointer into the workflow (`/steps/2/args/list_id`).
    pub path: String,
    /// A stable code, listed in `docs/orchestrate.md`.
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

fn problem(
    path: impl Into<String>,
    code: &str,
    message: impl Into<String>,
    hint: Option<String>,
) -> Problem {
    Problem {
        path: path.into(),
        code: code.to_owned(),
        message: message.into(),
        hint,
    }
}

/// How risky a step's call is, from its tool's annotations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Safety {
    /// A `value` step: no call.
    NoCall,
    ReadOnly,
    Idempotent,
    /// Writes, and says it only adds (`destructiveHint: false`).
    Additive,
    Destructive,
    /// No annotations: treated as a destructive write.
    Unknown,
}

/// An edge into a step: which step it waits for, and whether the edge came from a reference
/// rather than `needs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Edge {
    pub step: String,
    pub inferred: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlannedStep {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    pub safety: Safety,
    /// The steps this one waits for.
    pub needs: Vec<Edge>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub for_each: bool,
}

/// What will run, in what order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Plan {
    pub steps: Vec<PlannedStep>,
    /// Steps grouped by depth: each wave's steps depend only on earlier waves. (Execution does
    /// not wait for whole waves: a step starts as soon as its own dependencies settle.)
    pub waves: Vec<Vec<String>>,
}

impl Plan {
    /// For each step (by index), the indices of the steps it waits for.
    pub fn predecessors(&self) -> Vec<Vec<usize>> {
        let index: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, step)| (step.id.as_str(), i))
            .collect();
        self.steps
            .iter()
            .map(|step| {
                step.needs
                    .iter()
                    .filter_map(|edge| index.get(edge.step.as_str()).copied())
                    .collect()
            })
            .collect()
    }
}

/// A workflow that passed every check.
#[derive(Debug, Clone)]
pub struct Validated {
    pub workflow: Workflow,
    pub plan: Plan,
    pub warnings: Vec<Problem>,
}

/// Names a step id cannot take, because expressions use them.
const RESERVED_IDS: [&str; 7] = [
    "inputs", "steps", "item", "loop", "run", "error", "idem_key",
];

/// Field names models often write for ours.
const ALIASES: [(&str, &str); 12] = [
    ("dependsOn", "needs"),
    ("depends_on", "needs"),
    ("when", "if"),
    ("condition", "if"),
    ("arguments", "args"),
    ("params", "args"),
    ("forEach", "for_each"),
    ("foreach", "for_each"),
    ("onError", "on_error"),
    ("timeout", "timeout_ms"),
    ("retries", "retry"),
    ("name", "id"),
];

/// The JSON Schema of a workflow, generated from the Rust types.
pub fn workflow_schema() -> &'static Value {
    static SCHEMA: OnceLock<Value> = OnceLock::new();
    SCHEMA.get_or_init(|| schemars::schema_for!(Workflow).to_value())
}

fn schema_validator() -> Option<&'static jsonschema::Validator> {
    static VALIDATOR: OnceLock<Option<jsonschema::Validator>> = OnceLock::new();
    VALIDATOR
        .get_or_init(|| jsonschema::validator_for(workflow_schema()).ok())
        .as_ref()
}

/// Check a workflow sent as JSON against the tools in `catalog`.
pub fn validate(
    input: &Value,
    catalog: &Catalog,
    expressions: &Expressions,
) -> Result<Validated, Vec<Problem>> {
    let shape = check_shape(input);
    if !shape.is_empty() {
        return Err(shape);
    }
    // Read from the borrowed value: the caller's input is not copied.
    let workflow = Workflow::deserialize(input)
        .map_err(|error| vec![problem("", "invalid_workflow", error.to_string(), None)])?;
    let (plan, warnings) = Checker::new(&workflow, catalog, expressions).run()?;
    Ok(Validated {
        workflow,
        plan,
        warnings,
    })
}

pub(crate) fn check_shape(input: &Value) -> Vec<Problem> {
    let Some(validator) = schema_validator() else {
        return vec![problem(
            "",
            "internal",
            "the workflow schema does not compile",
            None,
        )];
    };
    let mut problems: Vec<Problem> = validator
        .iter_errors(input)
        .flat_map(|error| shape_problems(&error, input))
        .collect();
    problems.sort_by(|a, b| a.path.cmp(&b.path));
    problems.dedup();
    problems
}

fn shape_problems(error: &jsonschema::ValidationError<'_>, input: &Value) -> Vec<Problem> {
    use jsonschema::error::ValidationErrorKind as Kind;
    let path = error.instance_path().to_string();
    match error.kind() {
        Kind::AdditionalProperties { unexpected } => unexpected
            .iter()
            .map(|field| {
                let known = known_fields(&path);
                let hint = ALIASES
                    .iter()
                    .find(|(alias, _)| alias == field)
                    .map(|(_, ours)| *ours)
                    .filter(|ours| known.contains(ours))
                    .or_else(|| did_you_mean(field, known.iter().copied()))
                    .map(|name| format!("did you mean `{name}`?"))
                    .or_else(|| Some(format!("known fields: {}", known.join(", "))));
                problem(
                    format!("{path}/{}", escape_pointer(field)),
                    "unknown_field",
                    format!("unknown field `{field}`"),
                    hint,
                )
            })
            .collect(),
        Kind::Required { property } => {
            let field = property.as_str().unwrap_or("?");
            vec![problem(
                path,
                "missing_field",
                format!("`{field}` is required"),
                None,
            )]
        }
        _ => {
            let hint = if path.ends_with("/on_error") {
                Some("use `fail`, `continue`, `{\"default\": value}` or `{\"fallback\": {\"tool\": \"...\", \"args\": {}}}`".to_owned())
            } else if path.ends_with("/tolerate_failures") {
                Some("use a count such as `2` or a percentage such as `\"20%\"`".to_owned())
            } else {
                None
            };
            let shown = input.pointer(&path).map(short_json).unwrap_or_default();
            let message = match error.kind() {
                Kind::Type { .. }
                | Kind::Enum { .. }
                | Kind::Pattern { .. }
                | Kind::AnyOf { .. }
                | Kind::OneOfNotValid { .. } => {
                    format!("{shown} is not allowed here: {}", error.masked())
                }
                _ => error.to_string(),
            };
            vec![problem(path, "invalid_value", message, hint)]
        }
    }
}

/// The fields allowed in the object at `pointer`, from the schema.
fn known_fields(pointer: &str) -> Vec<&'static str> {
    let schema = workflow_schema();
    let segments: Vec<&str> = pointer.split('/').filter(|s| !s.is_empty()).collect();
    let definition = match segments.as_slice() {
        [] => Some(schema),
        ["steps", _] => schema.pointer("/$defs/Step"),
        ["steps", _, "retry"] => schema.pointer("/$defs/RetryPolicy"),
        ["steps", _, "on_error", "fallback"] => schema.pointer("/$defs/Fallback"),
        ["resume"] => schema.pointer("/$defs/Resume"),
        _ => None,
    };
    let mut fields: Vec<&str> = definition
        .and_then(|definition| definition.get("properties"))
        .and_then(Value::as_object)
        .map(|properties| properties.keys().map(String::as_str).collect())
        .unwrap_or_default();
    fields.sort_unstable();
    fields
}

fn short_json(value: &Value) -> String {
    let text = value.to_string();
    if text.chars().count() > 60 {
        format!("`{}...`", text.chars().take(57).collect::<String>())
    } else {
        format!("`{text}`")
    }
}

/// The checks that need the whole workflow and the catalog.
struct Checker<'a> {
    workflow: &'a Workflow,
    catalog: &'a Catalog,
    expressions: &'a Expressions,
    ids: BTreeMap<&'a str, usize>,
    errors: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl<'a> Checker<'a> {
    fn new(workflow: &'a Workflow, catalog: &'a Catalog, expressions: &'a Expressions) -> Self {
        Checker {
            workflow,
            catalog,
            expressions,
            ids: BTreeMap::new(),
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// The plan and the warnings, or every problem found.
    fn run(mut self) -> Result<(Plan, Vec<Problem>), Vec<Problem>> {
        self.check_ids();
        let mut planned = Vec::new();
        for (index, step) in self.workflow.steps.iter().enumerate() {
            planned.push(self.check_step(index, step));
        }
        self.check_output();
        self.check_return();
        // With the rest: a cycle reported only once every other problem is fixed would make
        // fixing a workflow take rounds.
        self.check_cycles(&planned);
        if !self.errors.is_empty() {
            self.errors.sort_by(|a, b| a.path.cmp(&b.path));
            return Err(self.errors);
        }
        let waves = waves(&planned);
        let plan = Plan {
            steps: planned,
            waves,
        };
        Ok((plan, self.warnings))
    }

    fn check_ids(&mut self) {
        for (index, step) in self.workflow.steps.iter().enumerate() {
            let path = format!("/steps/{index}/id");
            if RESERVED_IDS.contains(&step.id.as_str()) {
                self.errors.push(problem(
                    path.clone(),
                    "reserved_id",
                    format!("`{}` is reserved for expressions", step.id),
                    Some(format!("reserved: {}", RESERVED_IDS.join(", "))),
                ));
            }
            if let Some(first) = self.ids.get(step.id.as_str()) {
                self.errors.push(problem(
                    path,
                    "duplicate_id",
                    format!("step id `{}` is already used by /steps/{first}", step.id),
                    None,
                ));
            } else {
                self.ids.insert(&step.id, index);
            }
        }
    }

    /// `id` names no step: an `unknown_step` problem at `pointer`, hinting the nearest id.
    fn unknown_step(&mut self, pointer: impl Into<String>, id: &str) {
        let hint = self.nearest_id(id);
        self.errors.push(problem(
            pointer,
            "unknown_step",
            format!("no step `{id}`"),
            hint,
        ));
    }

    fn nearest_id(&self, id: &str) -> Option<String> {
        did_you_mean(id, self.ids.keys().copied()).map(|near| format!("did you mean `{near}`?"))
    }

    fn check_step(&mut self, index: usize, step: &Step) -> PlannedStep {
        let base = format!("/steps/{index}");
        let mut needs: Vec<Edge> = Vec::new();
        for (position, need) in step.needs.iter().enumerate() {
            if self.ids.contains_key(need.as_str()) {
                add_edge(&mut needs, need, false);
            } else {
                self.unknown_step(format!("{base}/needs/{position}"), need);
            }
        }

        // The step's args as one value, for the tool's schema and for the references in them.
        let args = Value::Object(step.args.clone().unwrap_or_default());
        let safety = match (&step.tool, &step.value) {
            (Some(_), Some(_)) => {
                self.errors.push(problem(
                    &base,
                    "tool_and_value",
                    "a step has `tool` or `value`, not both",
                    None,
                ));
                Safety::NoCall
            }
            (None, None) => {
                self.errors.push(problem(
                    &base,
                    "no_tool_or_value",
                    "a step needs `tool` (a call) or `value` (a computed output)",
                    None,
                ));
                Safety::NoCall
            }
            (None, Some(_)) => {
                if step.args.is_some() {
                    self.errors.push(problem(
                        format!("{base}/args"),
                        "args_without_tool",
                        "`args` only goes with `tool`",
                        None,
                    ));
                }
                Safety::NoCall
            }
            (Some(tool), None) => self.check_call(
                tool,
                &args,
                &format!("{base}/tool"),
                &format!("{base}/args"),
            ),
        };

        if step.for_each.is_none() {
            for (field, set) in [
                ("as", step.item_name.is_some()),
                ("max_items", step.max_items.is_some()),
                ("max_concurrency", step.max_concurrency.is_some()),
                ("tolerate_failures", step.tolerate_failures.is_some()),
            ] {
                if set {
                    self.errors.push(problem(
                        format!("{base}/{field}"),
                        "needs_for_each",
                        format!("`{field}` only applies to a `for_each` step"),
                        None,
                    ));
                }
            }
        }

        if let Some(retry) = &step.retry
            && let Some(on) = &retry.on
            && matches!(
                safety,
                Safety::Additive | Safety::Destructive | Safety::Unknown
            )
            && on.iter().any(|kind| kind.may_repeat_effects())
        {
            let named: Vec<&RetryOn> = on.iter().filter(|kind| kind.may_repeat_effects()).collect();
            self.warnings.push(problem(
                format!("{base}/retry/on"),
                "unsafe_retry",
                format!("`{}` is not marked read-only or idempotent: retrying it on {named:?} may repeat its effect", step.tool.as_deref().unwrap_or("")),
                Some("retry only `not_delivered` and `rate_limited`, or pass an idempotency key such as `${{ idem_key }}`".to_owned()),
            ));
        }

        if let OnError::Fallback(fallback) = &step.on_error {
            self.check_call(
                &fallback.fallback.tool,
                &Value::Object(fallback.fallback.args.clone()),
                &format!("{base}/on_error/fallback/tool"),
                &format!("{base}/on_error/fallback/args"),
            );
        }

        // References: every `steps.<id>` read anywhere in the step is an edge.
        let item = step
            .for_each
            .as_ref()
            .map(|_| step.item_name.clone().unwrap_or_else(|| "item".to_owned()));
        let mut found = References::default();
        if step.args.is_some() {
            self.expressions
                .references(&args, &format!("{base}/args"), &mut found);
        }
        if let Some(value) = &step.value {
            self.expressions
                .references(value, &format!("{base}/value"), &mut found);
        }
        if let Some(condition) = &step.condition {
            self.expressions
                .expression_references(condition, &format!("{base}/if"), &mut found);
        }
        if let Some(for_each) = &step.for_each {
            let mut listing = References::default();
            let path = format!("{base}/for_each");
            match for_each {
                ForEach::Expression(text) => {
                    self.expressions
                        .expression_references(text, &path, &mut listing);
                }
                ForEach::Items(items) => {
                    self.expressions
                        .references(&Value::Array(items.clone()), &path, &mut listing);
                }
            }
            // The list is computed before any item exists.
            self.check_roots(&listing, None, false);
            self.add_step_edges(&listing, step, &mut needs);
        }
        match &step.on_error {
            OnError::Default(default) => {
                self.expressions.references(
                    &default.default,
                    &format!("{base}/on_error/default"),
                    &mut found,
                );
            }
            OnError::Fallback(fallback) => {
                let mut fallback_refs = References::default();
                let args = Value::Object(fallback.fallback.args.clone());
                self.expressions.references(
                    &args,
                    &format!("{base}/on_error/fallback/args"),
                    &mut fallback_refs,
                );
                self.check_roots(&fallback_refs, item.as_deref(), true);
                self.add_step_edges(&fallback_refs, step, &mut needs);
            }
            OnError::Simple(_) => {}
        }
        self.check_roots(&found, item.as_deref(), false);
        self.add_step_edges(&found, step, &mut needs);

        PlannedStep {
            id: step.id.clone(),
            tool: step.tool.clone(),
            safety,
            needs,
            for_each: step.for_each.is_some(),
        }
    }

    /// A call to `tool` with `args`: the tool must exist and may not be a workflow itself, and
    /// the literal parts of `args` must fit its `inputSchema`.
    fn check_call(&mut self, tool: &str, args: &Value, tool_path: &str, args_path: &str) -> Safety {
        if tool == "orchestrate" || tool.starts_with("workflow__") {
            self.errors.push(problem(
                tool_path,
                "recursion",
                format!("a step cannot call `{tool}`: workflows do not run workflows"),
                None,
            ));
            return Safety::Unknown;
        }
        let Some(entry) = self.catalog.tool(tool) else {
            let hint = self
                .catalog
                .nearest_tool(tool)
                .map(|near| format!("did you mean `{near}`?"));
            self.errors.push(problem(
                tool_path,
                "unknown_tool",
                format!("no tool `{tool}`"),
                hint,
            ));
            return Safety::Unknown;
        };
        if let Some(validator) = entry.input_validator() {
            for error in validator.iter_errors(args) {
                let pointer = error.instance_path().to_string();
                // A value an expression will compute cannot be checked before the run.
                if is_computed(args, &pointer) {
                    continue;
                }
                let code = match error.kind() {
                    jsonschema::error::ValidationErrorKind::Required { .. } => "missing_argument",
                    _ => "invalid_argument",
                };
                self.errors.push(problem(
                    format!("{args_path}{pointer}"),
                    code,
                    format!("`{tool}`: {}", error.masked()),
                    Some(format!(
                        "`conductor tools --json` shows the input schema of `{tool}`"
                    )),
                ));
            }
        }
        let annotations = entry.tool.annotations.as_ref();
        match annotations {
            Some(a) if a.read_only_hint == Some(true) => Safety::ReadOnly,
            Some(_) if is_repeatable(annotations) => Safety::Idempotent,
            Some(a) if a.destructive_hint == Some(false) => Safety::Additive,
            Some(_) => Safety::Destructive,
            None => Safety::Unknown,
        }
    }

    /// Every variable an expression reads must exist where it is read.
    fn check_roots(&mut self, found: &References, item: Option<&str>, in_fallback: bool) {
        for (pointer, message) in &found.errors {
            self.errors
                .push(problem(pointer, "expression_syntax", message.clone(), None));
        }
        let mut allowed = vec!["inputs", "steps", "run", "idem_key"];
        if let Some(item) = item {
            allowed.extend([item, "loop"]);
        }
        if in_fallback {
            allowed.push("error");
        }
        for (root, pointer) in found.roots() {
            if !allowed.contains(&root) {
                let hint = did_you_mean(root, allowed.iter().copied())
                    .map(|near| format!("did you mean `{near}`?"))
                    .or_else(|| Some(format!("in scope here: {}", allowed.join(", "))));
                self.errors.push(problem(
                    pointer,
                    "unknown_variable",
                    format!("`{root}` is not defined here"),
                    hint,
                ));
            }
        }
        for (path, pointer) in &found.paths {
            let mut parts = path.split('.');
            if path.starts_with("steps.")
                && let Some(field) = path.split('.').nth(2)
                && !STEP_FIELDS.contains(&field)
            {
                let step = path.split('.').nth(1).unwrap_or_default();
                let hint = did_you_mean(field, STEP_FIELDS.iter().copied())
                    .map(|near| format!("did you mean `steps.{step}.{near}`?"))
                    .or_else(|| Some(format!("a step has: {}", STEP_FIELDS.join(", "))));
                self.errors.push(problem(
                    pointer,
                    "unknown_step_field",
                    format!("`steps.{step}` has no `{field}`"),
                    hint,
                ));
            }
            if parts.next() == Some("inputs")
                && let Some(name) = parts.next()
                && !self.workflow.inputs.contains_key(name)
            {
                let hint = did_you_mean(name, self.workflow.inputs.keys().map(String::as_str))
                    .map(|near| format!("did you mean `inputs.{near}`?"))
                    .or_else(|| Some("add it under `inputs`".to_owned()));
                self.errors.push(problem(
                    pointer,
                    "unknown_input",
                    format!("no input `{name}`"),
                    hint,
                ));
            }
        }
    }

    fn add_step_edges(&mut self, found: &References, step: &Step, needs: &mut Vec<Edge>) {
        for (id, pointer) in found.steps() {
            if id == step.id {
                self.errors.push(problem(
                    pointer,
                    "cycle",
                    format!("step `{id}` reads its own output"),
                    None,
                ));
            } else if self.ids.contains_key(id) {
                add_edge(needs, id, true);
            } else {
                self.unknown_step(pointer, id);
            }
        }
    }

    fn check_output(&mut self) {
        let Some(output) = &self.workflow.output else {
            return;
        };
        let mut found = References::default();
        self.expressions.references(output, "/output", &mut found);
        self.check_roots(&found, None, false);
        for (id, pointer) in found.steps() {
            if !self.ids.contains_key(id) {
                self.unknown_step(pointer, id);
            }
        }
    }

    fn check_return(&mut self) {
        for (position, id) in self.workflow.return_steps.iter().enumerate() {
            if !self.ids.contains_key(id.as_str()) {
                self.unknown_step(format!("/return/{position}"), id);
            }
        }
    }

    /// A cycle is an error that names every step on it.
    fn check_cycles(&mut self, planned: &[PlannedStep]) {
        let index: HashMap<&str, usize> = planned
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect();
        let mut state = vec![0u8; planned.len()]; // 0 unseen, 1 on the path, 2 done
        let mut path: Vec<usize> = Vec::new();
        for start in 0..planned.len() {
            if state[start] == 0
                && let Some(cycle) = find_cycle(start, planned, &index, &mut state, &mut path)
            {
                let names: Vec<&str> = cycle.iter().map(|i| planned[*i].id.as_str()).collect();
                self.errors.push(problem(
                    format!("/steps/{}", cycle[0]),
                    "cycle",
                    format!(
                        "steps wait for each other in a cycle: {} -> {}",
                        names.join(" -> "),
                        names[0]
                    ),
                    Some(
                        "remove a `needs` entry or a `steps.<id>` reference on the cycle"
                            .to_owned(),
                    ),
                ));
                return;
            }
        }
    }
}

fn add_edge(needs: &mut Vec<Edge>, id: &str, inferred: bool) {
    if !needs.iter().any(|edge| edge.step == id) {
        needs.push(Edge {
            step: id.to_owned(),
            inferred,
        });
    }
}

/// Depth-first search along "waits for" edges; returns the steps of a cycle, in order.
fn find_cycle(
    at: usize,
    planned: &[PlannedStep],
    index: &HashMap<&str, usize>,
    state: &mut [u8],
    path: &mut Vec<usize>,
) -> Option<Vec<usize>> {
    state[at] = 1;
    path.push(at);
    for edge in &planned[at].needs {
        let Some(&next) = index.get(edge.step.as_str()) else {
            continue;
        };
        if state[next] == 1 {
            let start = path.iter().position(|step| *step == next).unwrap_or(0);
            let mut cycle = path[start..].to_vec();
            cycle.reverse();
            return Some(cycle);
        }
        if state[next] == 0
            && let Some(cycle) = find_cycle(next, planned, index, state, path)
        {
            return Some(cycle);
        }
    }
    path.pop();
    state[at] = 2;
    None
}

/// Steps grouped by depth in the graph.
fn waves(planned: &[PlannedStep]) -> Vec<Vec<String>> {
    let index: HashMap<&str, usize> = planned
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut depth: Vec<Option<usize>> = vec![None; planned.len()];
    fn depth_of(
        at: usize,
        planned: &[PlannedStep],
        index: &HashMap<&str, usize>,
        depth: &mut [Option<usize>],
    ) -> usize {
        if let Some(known) = depth[at] {
            return known;
        }
        let value = planned[at]
            .needs
            .iter()
            .filter_map(|edge| index.get(edge.step.as_str()))
            .map(|&before| depth_of(before, planned, index, depth) + 1)
            .max()
            .unwrap_or(0);
        depth[at] = Some(value);
        value
    }
    let mut waves: Vec<Vec<String>> = Vec::new();
    for at in 0..planned.len() {
        let level = depth_of(at, planned, &index, &mut depth);
        if waves.len() <= level {
            waves.resize(level + 1, Vec::new());
        }
        waves[level].push(planned[at].id.clone());
    }
    waves
}

/// Whether the value at `pointer` in `instance` (or one of its parents) is a string an
/// expression will compute.
fn is_computed(instance: &Value, pointer: &str) -> bool {
    let mut current = instance;
    let check = |value: &Value| matches!(value, Value::String(text) if text.contains("${{") || text.contains("${%"));
    if check(current) {
        return true;
    }
    for segment in pointer.split('/').filter(|s| !s.is_empty()) {
        let key = segment.replace("~1", "/").replace("~0", "~");
        current = match current {
            Value::Object(map) => match map.get(&key) {
                Some(next) => next,
                None => return false,
            },
            Value::Array(items) => match key.parse::<usize>().ok().and_then(|i| items.get(i)) {
                Some(next) => next,
                None => return false,
            },
            _ => return false,
        };
        if check(current) {
            return true;
        }
    }
    false
}
