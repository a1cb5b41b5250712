//! `orchestrate`: run a workflow, a graph of tool calls across servers, as one request.
//!
//! A workflow is validated whole before anything runs ([`mod@validate`]), then executed
//! ([`mod@execute`]) through the [`Tools`] seam, so that a step reaches a server exactly the way a
//! proxied call does: through the router, with its timeouts and cancellation. Finished runs are
//! kept for a while ([`Runs`]) so they can be read back and resumed.

pub mod execute;
pub mod expr;
pub mod report;
pub mod saved;
pub mod validate;
pub mod workflow;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolResult, ContentBlock, JsonObject, ReadResourceResult, ResourceContents,
    ResourceTemplate, Tool, ToolAnnotations,
};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::router::CallError;
use execute::{ProgressSink, RunOptions, RunRecord, execute, new_run_id};
use expr::Expressions;
use report::{RunReport, RunStatus};
use validate::{Problem, Validated, validate};
use workflow::{Mode, Workflow};

/// The name clients call.
pub const TOOL_NAME: &str = "orchestrate";
/// Where kept runs are read, as resources.
const RUNS_URI: &str = "conductor://runs/";

/// The resource template under which kept runs are read.
pub fn run_template() -> ResourceTemplate {
    ResourceTemplate::new(format!("{RUNS_URI}{{run_id}}"), "workflow-run")
        .with_title("A workflow run")
        .with_description(
            "The report of a finished orchestrate run, by its run_id, kept for a day.",
        )
        .with_mime_type("application/json")
}

/// The run id in a run resource's URI.
pub fn run_id_of(uri: &str) -> Option<&str> {
    uri.strip_prefix(RUNS_URI).filter(|id| !id.is_empty())
}

/// How workflows reach tools: the router in conductor, so a step can never bypass routing,
/// timeouts or cancellation.
#[async_trait::async_trait]
pub trait Tools: Send + Sync {
    /// The tools that exist now, with their schemas and annotations.
    fn catalog(&self) -> Arc<Catalog>;

    /// Call one tool by its public name.
    async fn call(
        &self,
        name: &str,
        args: JsonObject,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
    ) -> Result<CallToolResult, CallError>;
}

/// Who a run belongs to: only its owner can read it back or resume it; to anyone else it does
/// not exist. The local user over stdio and the CLI; over HTTP, the credential the session
/// was opened with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Owner(Arc<str>);

impl Owner {
    /// Whoever started conductor: a stdio session, the CLI.
    pub fn local() -> Self {
        Owner(Arc::from("local"))
    }

    pub fn named(name: impl Into<Arc<str>>) -> Self {
        Owner(name.into())
    }
}

/// Enough finished runs for anyone's day; past it, the oldest go first.
const MOST_RUNS_KEPT: usize = 1000;

/// Finished runs, kept for `resume` and for reading back, for a while.
#[derive(Debug)]
pub struct Runs {
    kept: Mutex<Kept>,
    keep_for: Duration,
}

/// The kept runs by id, and their ids oldest first: runs are kept in the order they end, so
/// the expired and the oldest are always at the front, and keeping one never scans them all
/// (which, with a thousand kept, had cost a run more than its workflow: docs/performance.md).
#[derive(Debug, Default)]
struct Kept {
    by_id: HashMap<String, KeptRun>,
    /// When each was kept, the number of its keeping, its id.
    oldest_first: VecDeque<(Instant, u64, String)>,
    /// How many runs were kept so far: numbers each keeping.
    keepings: u64,
}

#[derive(Debug)]
struct KeptRun {
    kept_at: Instant,
    keeping: u64,
    record: Arc<RunRecord>,
    owner: Owner,
    /// The workflow it ran: a resumption must bring the same steps and inputs.
    workflow: Arc<Workflow>,
}

impl Kept {
    /// Forget the oldest run; `false` when there is none.
    fn forget_oldest(&mut self) -> bool {
        let Some((_, keeping, run_id)) = self.oldest_first.pop_front() else {
            return false;
        };
        // Only if it is still that keeping of the run (an id kept again is kept anew).
        if self
            .by_id
            .get(&run_id)
            .is_some_and(|run| run.keeping == keeping)
        {
            self.by_id.remove(&run_id);
        }
        true
    }
}

impl Runs {
    pub fn new(keep_for: Duration) -> Self {
        Runs {
            kept: Mutex::default(),
            keep_for,
        }
    }

    /// A kept run of `owner`'s and the workflow it ran.
    pub fn get(&self, run_id: &str, owner: &Owner) -> Option<(Arc<RunRecord>, Arc<Workflow>)> {
        let kept = self.kept.lock().ok()?;
        kept.by_id
            .get(run_id)
            .filter(|run| run.kept_at.elapsed() < self.keep_for && run.owner == *owner)
            .map(|run| (run.record.clone(), run.workflow.clone()))
    }

    /// A kept run of `owner`'s as a resource: its report, as JSON.
    pub fn read(&self, run_id: &str, uri: &str, owner: &Owner) -> Option<ReadResourceResult> {
        let (record, _) = self.get(run_id, owner)?;
        let text = serde_json::to_string_pretty(&record.report).ok()?;
        let contents = ResourceContents::TextResourceContents {
            uri: uri.to_owned(),
            mime_type: Some("application/json".to_owned()),
            text,
            meta: None,
        };
        Some(ReadResourceResult::new(vec![contents]))
    }

    fn keep(&self, record: Arc<RunRecord>, workflow: Arc<Workflow>, owner: Owner) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        let now = Instant::now();
        while kept
            .oldest_first
            .front()
            .is_some_and(|(kept_at, _, _)| now.duration_since(*kept_at) >= self.keep_for)
        {
            kept.forget_oldest();
        }
        while kept.by_id.len() >= MOST_RUNS_KEPT && kept.forget_oldest() {}
        kept.keepings += 1;
        let keeping = kept.keepings;
        let run_id = record.report.run_id.clone();
        kept.oldest_first.push_back((now, keeping, run_id.clone()));
        let run = KeptRun {
            kept_at: now,
            keeping,
            record,
            owner,
            workflow,
        };
        kept.by_id.insert(run_id, run);
    }
}

/// A saved workflow's call: the workflow named `name` in `config`.
#[derive(Debug, Clone, Copy)]
pub struct Saved<'a> {
    pub config: &'a Arc<Config>,
    pub name: &'a str,
}

/// Saved workflows' checked plans, by workflow name. A saved workflow's check reads only its
/// body (fixed in its config), the catalog and the names of the call's inputs, so its result
/// is kept until one of them changes: checking had been a third of a one-step saved
/// workflow's work per call (docs/performance.md).
#[derive(Debug, Default)]
struct SavedPlans(Mutex<HashMap<String, SavedPlan>>);

#[derive(Debug)]
struct SavedPlan {
    /// Weak, so that an old config or catalog is not kept alive by its plan; and while the
    /// plan holds them, their allocations cannot be reused for a new one at the same address.
    config: Weak<Config>,
    catalog: Weak<Catalog>,
    validated: Validated,
}

impl SavedPlans {
    /// The call's workflow, checked: the plan kept for `saved` with the call's inputs, if it
    /// was checked for the same config, catalog and input names; else checked now, and kept.
    fn checked(
        &self,
        saved: Saved<'_>,
        input: &Value,
        catalog: &Arc<Catalog>,
        expressions: &Expressions,
    ) -> Result<Validated, Vec<Problem>> {
        let inputs: BTreeMap<String, Value> = match input.get("inputs") {
            Some(Value::Object(inputs)) => inputs
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect(),
            _ => BTreeMap::new(),
        };
        if let Ok(plans) = self.0.lock()
            && let Some(plan) = plans.get(saved.name)
            && std::ptr::eq(plan.config.as_ptr(), Arc::as_ptr(saved.config))
            && std::ptr::eq(plan.catalog.as_ptr(), Arc::as_ptr(catalog))
            && plan.validated.workflow.inputs.keys().eq(inputs.keys())
        {
            let mut validated = plan.validated.clone();
            validated.workflow.inputs = inputs;
            return Ok(validated);
        }
        let validated = validate(input, catalog, expressions)?;
        if let Ok(mut plans) = self.0.lock() {
            let plan = SavedPlan {
                config: Arc::downgrade(saved.config),
                catalog: Arc::downgrade(catalog),
                validated: validated.clone(),
            };
            plans.insert(saved.name.to_owned(), plan);
        }
        Ok(validated)
    }
}

/// Validates and runs workflows.
pub struct Orchestrator {
    tools: Arc<dyn Tools>,
    /// Whose runs this orchestrator makes, reads and resumes.
    owner: Owner,
    expressions: Arc<Expressions>,
    runs: Arc<Runs>,
    saved_plans: Arc<SavedPlans>,
}

impl std::fmt::Debug for Orchestrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Orchestrator").finish_non_exhaustive()
    }
}

impl Orchestrator {
    pub fn new(tools: Arc<dyn Tools>, runs: Arc<Runs>) -> Self {
        Orchestrator {
            tools,
            owner: Owner::local(),
            expressions: Arc::new(Expressions::new()),
            runs,
            saved_plans: Arc::default(),
        }
    }

    /// The same orchestrator (expressions, kept runs, saved workflows' plans) reaching tools
    /// through `tools`: a client session's own router.
    pub fn with_tools(&self, tools: Arc<dyn Tools>) -> Self {
        Orchestrator {
            tools,
            owner: self.owner.clone(),
            expressions: self.expressions.clone(),
            runs: self.runs.clone(),
            saved_plans: self.saved_plans.clone(),
        }
    }

    /// The same orchestrator, making and reading `owner`'s runs.
    pub fn with_owner(&self, owner: Owner) -> Self {
        Orchestrator {
            tools: self.tools.clone(),
            owner,
            expressions: self.expressions.clone(),
            runs: self.runs.clone(),
            saved_plans: self.saved_plans.clone(),
        }
    }

    /// A kept run of this orchestrator's owner, as a resource.
    pub fn read_run(&self, run_id: &str, uri: &str) -> Option<ReadResourceResult> {
        self.runs.read(run_id, uri, &self.owner)
    }

    /// The `orchestrate` tool as clients list it.
    pub fn tool() -> Tool {
        // Built once: `tools/list` asks for it on every listing, and it never changes.
        static TOOL: OnceLock<Tool> = OnceLock::new();
        TOOL.get_or_init(|| {
            let mut tool = Tool::default();
            tool.name = TOOL_NAME.into();
            tool.title = Some("Run a workflow of tool calls".to_owned());
            tool.description = Some(DESCRIPTION.into());
            tool.input_schema = Arc::new(object_schema(validate::workflow_schema()));
            tool.output_schema = Some(report_schema());
            tool.annotations = Some(ToolAnnotations::from_raw(
                Some("Run a workflow".to_owned()),
                Some(false),
                Some(true),
                Some(false),
                Some(true),
            ));
            tool
        })
        .clone()
    }

    /// Validate `input` and, by its mode, return the plan, preview it, or run it. `saved` says
    /// which saved workflow `input` is a call of, whose checked plan may be kept.
    pub async fn run(
        &self,
        input: Value,
        saved: Option<Saved<'_>>,
        progress: Option<ProgressSink>,
        cancel: CancellationToken,
    ) -> RunReport {
        let started = Instant::now();
        let catalog = self.tools.catalog();
        let checked = match saved {
            Some(saved) => self
                .saved_plans
                .checked(saved, &input, &catalog, &self.expressions),
            None => validate(&input, &catalog, &self.expressions),
        };
        let mut validated = match checked {
            Ok(validated) => validated,
            Err(errors) => return invalid(errors, started),
        };
        let previous = match validated.workflow.resume.clone() {
            Some(resume) => match self.check_resume(&resume.run_id, &validated.workflow) {
                Ok(previous) => Some(previous),
                Err(problem) => return invalid(vec![problem], started),
            },
            None => None,
        };
        let mode = validated.workflow.mode;
        if mode == Mode::Validate {
            return RunReport {
                run_id: new_run_id(),
                status: RunStatus::Valid,
                plan: Some(validated.plan),
                warnings: validated.warnings,
                duration_ms: started.elapsed().as_millis() as u64,
                ..RunReport::default()
            };
        }
        validated.workflow.resume = None;
        let options = RunOptions {
            run_id: new_run_id(),
            preview: mode == Mode::Preview,
            progress,
            cancel,
            previous,
        };
        let record = Arc::new(
            execute(
                &validated,
                self.tools.clone(),
                self.expressions.clone(),
                options,
            )
            .await,
        );
        let report = record.report.clone();
        if mode == Mode::Run {
            // Kept as it ran (moved, not copied), for a resumption to be compared with.
            self.runs
                .keep(record, Arc::new(validated.workflow), self.owner.clone());
        }
        report
    }

    fn check_resume(&self, run_id: &str, workflow: &Workflow) -> Result<Arc<RunRecord>, Problem> {
        // Another owner's run is as unknown as one that never was.
        let Some((record, ran)) = self.runs.get(run_id, &self.owner) else {
            return Err(Problem {
                path: "/resume/run_id".to_owned(),
                code: "unknown_run".to_owned(),
                message: format!("no kept run `{run_id}`"),
                hint: Some(
                    "runs are kept for `[conductor] keep_runs` (a day by default) after they end"
                        .to_owned(),
                ),
            });
        };
        if ran.steps != workflow.steps || ran.inputs != workflow.inputs {
            return Err(Problem {
                path: "/steps".to_owned(),
                code: "resume_mismatch".to_owned(),
                message: format!("the steps or inputs differ from those of run `{run_id}`"),
                hint: Some("resume with exactly the steps and inputs of the run; start a new run to change them".to_owned()),
            });
        }
        Ok(record)
    }
}

/// The report for a call whose arguments were refused before any workflow was built.
pub fn invalid_input(errors: Vec<Problem>) -> RunReport {
    invalid(errors, Instant::now())
}

fn invalid(errors: Vec<Problem>, started: Instant) -> RunReport {
    RunReport {
        run_id: new_run_id(),
        status: RunStatus::Invalid,
        errors,
        duration_ms: started.elapsed().as_millis() as u64,
        ..RunReport::default()
    }
}

/// The tool result for a report: the report as structured content, a summary as text.
pub fn tool_result(report: &RunReport) -> CallToolResult {
    let is_error = matches!(
        report.status,
        RunStatus::Failed | RunStatus::Invalid | RunStatus::Cancelled
    );
    let mut result = if is_error {
        CallToolResult::error(vec![ContentBlock::text(report.summary())])
    } else {
        CallToolResult::success(vec![ContentBlock::text(report.summary())])
    };
    result.structured_content = serde_json::to_value(report).ok();
    result
}

/// The `outputSchema` of `orchestrate` and of every saved workflow: a run's report.
pub(crate) fn report_schema() -> Arc<JsonObject> {
    static SCHEMA: OnceLock<Arc<JsonObject>> = OnceLock::new();
    SCHEMA
        .get_or_init(|| Arc::new(object_schema(&schemars::schema_for!(RunReport).to_value())))
        .clone()
}

/// A generated schema as a tool publishes it: an object, with only the `format`s JSON Schema
/// defines. schemars adds Rust ones (`uint64`, `double`...) that clients' validators warn about.
pub(crate) fn object_schema(schema: &Value) -> JsonObject {
    let mut schema = schema.clone();
    keep_standard_formats(&mut schema);
    schema.as_object().cloned().unwrap_or_default()
}

const STANDARD_FORMATS: [&str; 19] = [
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

fn keep_standard_formats(value: &mut Value) {
    match value {
        Value::Object(map) => {
            let nonstandard = map
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|format| !STANDARD_FORMATS.contains(&format));
            if nonstandard {
                map.shift_remove("format");
            }
            map.values_mut().for_each(keep_standard_formats);
        }
        Value::Array(items) => items.iter_mut().for_each(keep_standard_formats),
        _ => {}
    }
}

const DESCRIPTION: &str = "Run a workflow: a graph of tool calls across servers, in one request, and get one merged \
result. Use it instead of many separate calls when results of one call feed the next, when the \
same tool runs for each item of a list, or when independent calls can run in parallel. Steps \
name tools exactly as tools/list does. Data flows through `${{ }}` expressions such as \
`${{ steps.fetch.output.items }}`; a step waits for the steps it references. Check a workflow \
first with \"mode\": \"validate\", or see what it would write with \"mode\": \"preview\". \
Example: {\"steps\": [{\"id\": \"unpaid\", \"tool\": \"books__list_invoices\", \"args\": \
{\"status\": \"unpaid\"}}, {\"id\": \"tasks\", \"tool\": \"tracker__create_task\", \"for_each\": \
\"${{ steps.unpaid.output.invoices }}\", \"as\": \"inv\", \"args\": {\"title\": \"Chase ${{ inv.number }}\"}, \
\"on_error\": \"continue\"}, {\"id\": \"note\", \"tool\": \"chat__send\", \"trigger\": \"all_done\", \
\"args\": {\"text\": \"${{ steps.tasks.stats.succeeded }} tasks created\"}}]}";

#[cfg(test)]
mod tests {
    use super::*;

    fn record(run_id: &str) -> Arc<RunRecord> {
        Arc::new(RunRecord {
            report: RunReport {
                run_id: run_id.to_owned(),
                ..RunReport::default()
            },
            steps: Vec::new(),
            idem_base: run_id.to_owned(),
        })
    }

    /// A kept plan serves a call of the same workflow, config, catalog and input names, and
    /// only that: any of them new, and the workflow is checked again.
    #[test]
    fn a_saved_plan_is_kept_per_config_catalog_and_input_names() {
        let parse = |text: &str| {
            Arc::new(
                Config::parse(text, std::path::Path::new("servers.toml"), |_| None)
                    .expect("a config"),
            )
        };
        let config = parse("[servers.echo]\ncommand = \"echo\"\n");
        let listing = crate::catalog::Listing {
            tools: vec![Tool::new("echo", "Echo.", Arc::new(JsonObject::new()))],
            ..Default::default()
        };
        let with_echo = Arc::new(Catalog::build("__", [(&config.servers[0], &listing)]));
        let without_echo = Arc::new(Catalog::default());
        let plans = SavedPlans::default();
        let expressions = Expressions::new();
        let saved = Saved {
            config: &config,
            name: "greet",
        };
        let call = |tool: &str, inputs: Value| {
            serde_json::json!({"steps": [{"id": "a", "tool": tool,
                "args": {"text": "${{ inputs.text }}"}}], "inputs": inputs})
        };
        let hi = call("echo__echo", serde_json::json!({"text": "hi"}));
        assert!(plans.checked(saved, &hi, &with_echo, &expressions).is_ok());

        // Kept: the body is not checked again (a saved workflow's is fixed in its config),
        // and the plan gets the call's inputs.
        let kept = plans
            .checked(
                saved,
                &call("missing__tool", serde_json::json!({"text": "bye"})),
                &with_echo,
                &expressions,
            )
            .expect("the kept plan");
        assert_eq!(kept.workflow.inputs["text"], "bye");
        assert_eq!(kept.workflow.steps[0].tool.as_deref(), Some("echo__echo"));

        // A new catalog, without the step's tool.
        assert!(
            plans
                .checked(saved, &hi, &without_echo, &expressions)
                .is_err()
        );
        assert!(plans.checked(saved, &hi, &with_echo, &expressions).is_ok());
        // Other input names: `inputs.text` is not one.
        let no_text = call("echo__echo", serde_json::json!({"other": 1}));
        assert!(
            plans
                .checked(saved, &no_text, &with_echo, &expressions)
                .is_err()
        );
        // A new config, whose workflow calls another tool.
        let reloaded = parse("[servers.echo]\ncommand = \"echo\"\n");
        let saved = Saved {
            config: &reloaded,
            name: "greet",
        };
        let missing = call("missing__tool", serde_json::json!({"text": "hi"}));
        assert!(
            plans
                .checked(saved, &missing, &with_echo, &expressions)
                .is_err()
        );
    }

    /// A workflow told apart by its `timeout_ms`, for the kept runs' tests.
    fn ran(n: usize) -> Arc<Workflow> {
        let workflow = serde_json::json!({"steps": [{"id": "a", "value": 1}], "timeout_ms": n});
        Arc::new(serde_json::from_value(workflow).unwrap())
    }

    #[test]
    fn past_the_most_kept_the_oldest_runs_go_first() {
        let runs = Runs::new(Duration::from_secs(3600));
        for n in 0..MOST_RUNS_KEPT + 5 {
            runs.keep(record(&format!("run-{n}")), ran(n), Owner::local());
        }
        for n in 0..5 {
            assert!(
                runs.get(&format!("run-{n}"), &Owner::local()).is_none(),
                "run-{n} kept"
            );
        }
        for n in [5, 6, MOST_RUNS_KEPT + 4] {
            let (kept, workflow) = runs
                .get(&format!("run-{n}"), &Owner::local())
                .expect("kept");
            assert_eq!(
                (kept.report.run_id.as_str(), workflow.timeout_ms),
                (format!("run-{n}").as_str(), Some(n as u64))
            );
        }
        let kept = runs.kept.lock().unwrap();
        assert_eq!(kept.by_id.len(), MOST_RUNS_KEPT);
        assert_eq!(kept.oldest_first.len(), MOST_RUNS_KEPT);
    }

    #[test]
    fn a_kept_run_is_given_only_to_its_owner() {
        let runs = Runs::new(Duration::from_secs(3600));
        let (alice, bob) = (Owner::named("http:0"), Owner::named("http:1"));
        runs.keep(record("mine"), ran(0), alice.clone());
        assert!(runs.get("mine", &alice).is_some());
        assert!(runs.get("mine", &bob).is_none());
        assert!(runs.read("mine", "conductor://runs/mine", &bob).is_none());
        assert!(runs.get("mine", &Owner::local()).is_none());
    }

    #[test]
    fn run_ids_are_random() {
        let ids: std::collections::HashSet<String> = (0..100).map(|_| new_run_id()).collect();
        assert_eq!(ids.len(), 100);
        for id in &ids {
            // 128 random bits: nobody guesses one from another.
            assert_eq!(id.len(), "r_".len() + 32, "{id}");
        }
    }

    #[test]
    fn expired_runs_are_forgotten_when_the_next_is_kept() {
        let runs = Runs::new(Duration::from_millis(20));
        runs.keep(record("old"), ran(0), Owner::local());
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            runs.get("old", &Owner::local()).is_none(),
            "expired runs are not given out"
        );
        runs.keep(record("new"), ran(0), Owner::local());
        let kept = runs.kept.lock().unwrap();
        assert_eq!(kept.by_id.keys().collect::<Vec<_>>(), ["new"]);
        assert_eq!(kept.oldest_first.len(), 1);
    }

    #[test]
    fn a_run_kept_again_is_not_forgotten_with_its_first_keeping() {
        let runs = Runs::new(Duration::from_secs(3600));
        runs.keep(record("again"), ran(1), Owner::local());
        runs.keep(record("between"), ran(0), Owner::local());
        runs.keep(record("again"), ran(2), Owner::local());
        for n in 0..MOST_RUNS_KEPT - 1 {
            runs.keep(record(&format!("run-{n}")), ran(0), Owner::local());
        }
        // Full: the first keeping of `again` went, then `between`; the second keeping stays.
        assert!(runs.get("between", &Owner::local()).is_none());
        assert_eq!(
            runs.get("again", &Owner::local())
                .map(|(_, workflow)| workflow.timeout_ms),
            Some(Some(2))
        );
    }
}
