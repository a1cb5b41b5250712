//! `orchestrate`: validation, planning and runs of workflows across fixture servers.

use std::path::Path;

use mcp_conductor::catalog::{Catalog, Listing};
use mcp_conductor::config::Config;
use mcp_conductor::orchestrate::expr::Expressions;
use mcp_conductor::orchestrate::validate::{validate, workflow_schema};
use serde_json::{Value, json};

/// A catalog with an invoicing server (read-only list), a tracker (writes) and a chat server.
fn catalog() -> Catalog {
    let config = Config::parse(
        "[servers.books]\ncommand = \"x\"\n[servers.tracker]\ncommand = \"x\"\n[servers.chat]\ncommand = \"x\"\n",
        Path::new("servers.toml"),
        |_| None,
    )
    .unwrap();
    let tool = |value: Value| serde_json::from_value(value).unwrap();
    let listings = [
        Listing {
            tools: vec![tool(
                json!({"name": "list_invoices", "inputSchema": {"type": "object", "properties": {"status": {"type": "string", "enum": ["paid", "unpaid"]}}, "required": ["status"]}, "annotations": {"readOnlyHint": true}}),
            )],
            ..Listing::default()
        },
        Listing {
            tools: vec![tool(
                json!({"name": "create_task", "inputSchema": {"type": "object", "properties": {"title": {"type": "string"}, "list": {"type": "string"}}, "required": ["title", "list"]}, "annotations": {"destructiveHint": false}}),
            )],
            ..Listing::default()
        },
        Listing {
            tools: vec![tool(
                json!({"name": "send", "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}),
            )],
            ..Listing::default()
        },
    ];
    Catalog::build(
        &config.separator,
        config.servers.iter().zip(listings.iter()),
    )
}

fn problems(workflow: Value) -> String {
    match validate(&workflow, &catalog(), &Expressions::new()) {
        Ok(_) => panic!("expected problems"),
        Err(problems) => serde_json::to_string_pretty(&problems).unwrap(),
    }
}

#[test]
fn the_schema_has_the_step_definitions_hints_rely_on() {
    let schema = workflow_schema();
    for definition in ["Step", "RetryPolicy", "Fallback", "Resume"] {
        assert!(
            schema
                .pointer(&format!("/$defs/{definition}/properties"))
                .is_some(),
            "{definition} missing: {schema:#}"
        );
    }
}

#[test]
fn shape_problems_come_all_at_once_with_pointers_and_hints() {
    insta::assert_snapshot!(problems(json!({
        "steps": [
            {"id": "unpaid", "tool": "books__list_invoices", "arguments": {}},
            {"id": "Bad-Id", "value": 1, "dependsOn": ["unpaid"], "trigger": "sometimes"},
            {"id": "notify", "tool": "chat__send", "args": {"text": "x"}, "on_error": {"retry": true}, "tolerate_failures": "lots"}
        ],
        "mode": "dry"
    })));
}

#[test]
fn meaning_problems_come_all_at_once_with_pointers_and_hints() {
    insta::assert_snapshot!(problems(json!({
        "inputs": {"list": "L1"},
        "steps": [
            {"id": "unpaid", "tool": "books__list_invoice", "args": {"status": "overdue"}},
            {"id": "tasks", "tool": "tracker__create_task", "for_each": "${{ steps.unpayd.output }}",
             "args": {"title": "${{ itme.number }}", "list": "${{ inputs.lst }}"}},
            {"id": "steps", "value": "${{ steps.tasks.output | lenght }}"},
            {"id": "tasks", "tool": "chat__send", "args": {}, "needs": ["nowhere"], "retry": {"on": ["timeout"]}},
            {"id": "broken", "value": "${{ (1 + }}", "as": "x"}
        ],
        "return": ["unpiad"]
    })));
}

#[test]
fn a_cycle_is_named() {
    insta::assert_snapshot!(problems(json!({
        "steps": [
            {"id": "a", "value": "${{ steps.c.output }}"},
            {"id": "b", "value": "${{ steps.a.output }}"},
            {"id": "c", "value": 1, "needs": ["b"]}
        ]
    })));
}

// ---------------------------------------------------------------------------------------------
// Runs through `conductor serve`, against the books, tracker and chat fixtures.

use std::time::Duration;

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, ClientRequest, ReadResourceRequestParams,
};
use rmcp::service::PeerRequestOptions;

use super::support::{Session, TestConfig, call, serve};

/// Books, tracker and chat servers, all recording to the config's events file.
fn business(tracker_down: bool) -> TestConfig {
    let config = TestConfig::new("");
    let events = config.events_file().display().to_string();
    let fixture = super::support::FIXTURE;
    let down = if tracker_down { "1" } else { "0" };
    let text = format!(
        "[servers.books]\ncommand = \"{fixture}\"\nargs = [\"books\"]\n\n\
         [servers.tracker]\ncommand = \"{fixture}\"\nargs = [\"tracker\"]\nenv = {{ FIXTURE_EVENTS = \"{events}\", TRACKER_DOWN = \"{down}\" }}\n\n\
         [servers.chat]\ncommand = \"{fixture}\"\nargs = [\"chat\"]\nenv = {{ FIXTURE_EVENTS = \"{events}\" }}\n\n\
         [servers.slow]\ncommand = \"{fixture}\"\nargs = [\"slow\"]\nenv = {{ FIXTURE_EVENTS = \"{events}\" }}\n"
    );
    std::fs::write(&config.path, text).unwrap();
    config
}

fn events(config: &TestConfig) -> Vec<String> {
    std::fs::read_to_string(config.events_file())
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn orchestrate(session: &Session, workflow: Value) -> Value {
    let result = call(session, "orchestrate", workflow).await;
    result
        .structured_content
        .clone()
        .unwrap_or_else(|| panic!("no structured content: {result:?}"))
}

fn unpaid_to_tasks() -> Value {
    json!({
        "inputs": {"list": "collections", "channel": "#finance"},
        "steps": [
            {"id": "unpaid", "tool": "books__list_invoices", "args": {"status": "unpaid"}},
            {"id": "tasks", "tool": "tracker__create_task", "for_each": "${{ steps.unpaid.output.invoices }}", "as": "inv",
             "tolerate_failures": 1,
             "args": {"title": "Chase ${{ inv.number }} (${{ inv.customer }})", "list": "${{ inputs.list }}"}},
            {"id": "summary", "tool": "chat__send", "trigger": "all_done",
             "args": {"channel": "${{ inputs.channel }}",
                      "text": "${{ steps.tasks.stats.succeeded }} of ${{ steps.unpaid.output.invoices | length }} follow-ups created${% if steps.tasks.stats.failed %}, ${{ steps.tasks.stats.failed }} failed${% endif %}"}}
        ],
        "output": {"created": "${{ steps.tasks.output | select | map(attribute='title') | list }}"}
    })
}

#[tokio::test]
async fn unpaid_invoices_become_tasks_and_a_summary_that_counts_the_failure() {
    let config = business(false);
    let session = serve(&config).await;

    let report = orchestrate(&session, unpaid_to_tasks()).await;
    assert_eq!(report["status"], "partial", "{report:#}");
    assert_eq!(
        report["steps"]["tasks"]["stats"],
        json!({"total": 3, "succeeded": 2, "failed": 1, "skipped": 0})
    );
    assert_eq!(report["steps"]["tasks"]["failed_items"][0]["index"], 1);
    assert_eq!(
        report["steps"]["tasks"]["failed_items"][0]["error"]["kind"],
        "tool_error"
    );
    assert_eq!(report["steps"]["summary"]["status"], "succeeded");
    assert_eq!(
        report["output"],
        json!({"created": ["Chase INV-1 (Acme)", "Chase INV-3 (Initech)"]})
    );
    assert!(
        report.get("returned").is_none(),
        "intermediate outputs stay out unless asked for"
    );
    let messages: Vec<String> = events(&config)
        .into_iter()
        .filter(|e| e.starts_with("message"))
        .collect();
    assert_eq!(
        messages,
        ["message #finance: 2 of 3 follow-ups created, 1 failed"]
    );

    // The run is kept, readable as a resource.
    let uri = format!("conductor://runs/{}", report["run_id"].as_str().unwrap());
    let read = session
        .read_resource(ReadResourceRequestParams::new(uri))
        .await
        .unwrap();
    let kept: Value =
        serde_json::from_value(serde_json::to_value(&read.contents).unwrap()[0]["text"].clone())
            .map(|text: String| serde_json::from_str(&text).unwrap())
            .unwrap();
    assert_eq!(kept["status"], "partial");
    assert_eq!(kept["run_id"], report["run_id"]);
    let templates = session.list_all_resource_templates().await.unwrap();
    assert!(
        templates
            .iter()
            .any(|t| t.uri_template == "conductor://runs/{run_id}")
    );

    // A resumption must bring the run's own steps and inputs: one step edited is refused,
    // before anything runs (the count of created tasks below says so).
    let mut edited = unpaid_to_tasks();
    edited["resume"] = json!({"run_id": report["run_id"]});
    edited["steps"][0]["description"] = json!("edited");
    let refused = orchestrate(&session, edited).await;
    assert_eq!(refused["status"], "invalid", "{refused:#}");
    assert_eq!(
        refused["errors"][0]["code"], "resume_mismatch",
        "{refused:#}"
    );

    // Resume: only the failed item runs again (and the summary, which depends on it).
    let mut again = unpaid_to_tasks();
    again["resume"] = json!({"run_id": report["run_id"]});
    let resumed = orchestrate(&session, again).await;
    assert_eq!(resumed["status"], "succeeded", "{resumed:#}");
    assert_eq!(resumed["steps"]["unpaid"]["reused"], true);
    assert_eq!(resumed["steps"]["tasks"]["stats"]["succeeded"], 3);
    let created: Vec<String> = events(&config)
        .into_iter()
        .filter(|e| e.starts_with("created"))
        .collect();
    assert_eq!(created.len(), 3, "each task created once: {created:?}");
    assert!(created.contains(&"created Chase INV-2 (Globex)".to_owned()));
    assert_eq!(resumed["output"]["created"].as_array().unwrap().len(), 3);
}

fn weekly_report() -> Value {
    json!({
        "inputs": {"channel": "#reports"},
        "steps": [
            {"id": "totals", "tool": "books__summary"},
            {"id": "open_tasks", "tool": "tracker__list_tasks"},
            {"id": "balances", "tool": "books__customer", "for_each": "${{ steps.totals.output.customers }}", "as": "name",
             "args": {"name": "${{ name }}"}},
            {"id": "report", "value": {
                "title": "Weekly report",
                "body": "Invoiced ${{ steps.totals.output.invoiced }}, paid ${{ steps.totals.output.paid }}, open tasks ${{ steps.open_tasks.output.tasks | length }}.${% for b in steps.balances.output %} ${{ b.name }}: ${{ b.balance }}.${% endfor %}"}},
            {"id": "file", "tool": "tracker__create_report",
             "args": {"title": "${{ steps.report.output.title }}", "body": "${{ steps.report.output.body }}"},
             "on_error": {"fallback": {"tool": "chat__send",
                 "args": {"channel": "${{ inputs.channel }}", "text": "Tracker failed (${{ error.message }}). ${{ steps.report.output.body }}"}}}},
            {"id": "done", "tool": "chat__send", "trigger": "all_done", "needs": ["file"],
             "args": {"channel": "${{ inputs.channel }}",
                      "text": "Weekly report ${% if steps.file.via_fallback %}posted here, the tracker being down${% else %}filed${% endif %}"}}
        ],
        "return": ["report"]
    })
}

#[tokio::test]
async fn a_weekly_report_fans_out_and_in_and_falls_back_when_the_tracker_is_down() {
    let config = business(true);
    let session = serve(&config).await;

    let mut validate = weekly_report();
    validate["mode"] = json!("validate");
    let plan = orchestrate(&session, validate).await;
    assert_eq!(plan["status"], "valid");
    insta::assert_json_snapshot!(plan["plan"]);

    let report = orchestrate(&session, weekly_report()).await;
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(report["steps"]["file"]["via_fallback"], true);
    assert_eq!(report["steps"]["balances"]["stats"]["succeeded"], 3);
    let body = "Invoiced 1200, paid 900, open tasks 0. Acme: 120.0. Globex: 80.5. Initech: 42.0.";
    assert_eq!(report["returned"]["report"]["body"], body);
    let messages: Vec<String> = events(&config)
        .into_iter()
        .filter(|e| e.starts_with("message"))
        .collect();
    assert_eq!(
        messages,
        [
            format!(
                "message #reports: Tracker failed (503 Service Unavailable: the tracker is down for maintenance). {body}"
            ),
            "message #reports: Weekly report posted here, the tracker being down".to_owned(),
        ]
    );
}

#[tokio::test]
async fn independent_steps_run_in_parallel() {
    let config = business(false);
    let session = serve(&config).await;
    let report = orchestrate(&session, json!({"steps": [
        {"id": "a", "tool": "slow__sleep", "args": {"ms": 1500}},
        {"id": "b", "tool": "slow__sleep", "args": {"ms": 1501}},
        {"id": "c", "tool": "slow__sleep", "args": {"ms": 1502}},
        {"id": "after", "value": "${{ [steps.a.output, steps.b.output, steps.c.output] | join(', ') }}"}
    ]})).await;
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(
        report["output"]["after"],
        "slept 1500 ms, slept 1501 ms, slept 1502 ms"
    );
    // Every call started before any finished: they ran side by side, not one after another.
    let log = events(&config);
    let first_finish = log.iter().position(|e| e.starts_with("finished")).unwrap();
    assert_eq!(
        log[..first_finish]
            .iter()
            .filter(|e| e.starts_with("started sleep"))
            .count(),
        3,
        "{log:?}"
    );
}

#[tokio::test]
async fn retries_follow_the_tools_annotations() {
    let config = business(false);
    let session = serve(&config).await;
    let report = orchestrate(&session, json!({"steps": [
        {"id": "write", "tool": "slow__sleep", "args": {"ms": 3000}, "timeout_ms": 200, "on_error": "continue"},
        {"id": "read", "tool": "slow__slow_read", "args": {"ms": 3000}, "timeout_ms": 200,
         "retry": {"initial_delay_ms": 10}, "on_error": "continue"}
    ]})).await;
    assert_eq!(report["status"], "partial", "{report:#}");
    // Not marked idempotent: a timeout may have done the work, so it is not tried again.
    assert_eq!(report["steps"]["write"]["attempts"], 1);
    assert_eq!(report["steps"]["write"]["error"]["kind"], "timeout");
    // Read-only: safe to try again.
    assert_eq!(report["steps"]["read"]["attempts"], 3);
    // Each timed-out attempt was cancelled downstream.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = events(&config);
    assert_eq!(
        log.iter().filter(|e| *e == "cancelled sleep 3000").count(),
        1,
        "{log:?}"
    );
    assert_eq!(
        log.iter().filter(|e| *e == "cancelled read 3000").count(),
        3,
        "{log:?}"
    );
}

#[tokio::test]
async fn cancelling_the_request_cancels_the_calls_in_flight() {
    let config = business(false);
    let session = serve(&config).await;
    let workflow = json!({"steps": [
        {"id": "long", "tool": "slow__sleep", "args": {"ms": 20000}},
        {"id": "later", "value": "${{ steps.long.output }}"}
    ]});
    let request = ClientRequest::CallToolRequest(CallToolRequest::new(
        CallToolRequestParams::new("orchestrate")
            .with_arguments(workflow.as_object().cloned().unwrap()),
    ));
    let handle = session
        .peer()
        .send_cancellable_request(request, PeerRequestOptions::no_options())
        .await
        .unwrap();
    for _ in 0..100 {
        if events(&config).iter().any(|e| e == "started sleep 20000") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.cancel(Some("stop".to_owned())).await.unwrap();
    for _ in 0..100 {
        if events(&config).iter().any(|e| e == "cancelled sleep 20000") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the downstream never saw the cancellation: {:?}",
        events(&config)
    );
}

#[tokio::test]
async fn preview_runs_reads_and_shows_every_write() {
    let config = business(false);
    let session = serve(&config).await;
    let mut workflow = unpaid_to_tasks();
    workflow["mode"] = json!("preview");
    let report = orchestrate(&session, workflow).await;
    assert_eq!(report["status"], "previewed", "{report:#}");
    let calls = report["would_call"].as_array().unwrap();
    let titles: Vec<&str> = calls
        .iter()
        .filter(|c| c["tool"] == "tracker__create_task")
        .map(|c| c["args"]["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles.len(), 3);
    assert!(titles.contains(&"Chase INV-2 (Globex)"));
    assert!(calls.iter().any(|c| c["tool"] == "chat__send"));
    assert!(
        events(&config).is_empty(),
        "nothing was written: {:?}",
        events(&config)
    );
}

const SAVED: &str = r##"
[workflows.chase]
description = "Create a follow-up task for every unpaid invoice, then post a summary"
input_schema = { type = "object", properties = { list = { type = "string" }, channel = { type = "string", default = "#finance" } }, required = ["list"] }
output = { created = "${{ steps.tasks.stats.succeeded }}" }

[[workflows.chase.steps]]
id = "unpaid"
tool = "books__list_invoices"
args = { status = "unpaid" }

[[workflows.chase.steps]]
id = "tasks"
tool = "tracker__create_task"
for_each = "${{ steps.unpaid.output.invoices }}"
as = "inv"
tolerate_failures = "50%"
args = { title = "Chase ${{ inv.number }}", list = "${{ inputs.list }}" }

[[workflows.chase.steps]]
id = "summary"
tool = "chat__send"
trigger = "all_done"
args = { channel = "${{ inputs.channel }}", text = "${{ steps.tasks.stats.succeeded }} follow-ups" }
"##;

fn with_saved(config: &TestConfig) {
    let text = std::fs::read_to_string(&config.path).unwrap() + SAVED;
    std::fs::write(&config.path, text).unwrap();
}

#[tokio::test]
async fn a_saved_workflow_is_a_tool_of_its_own() {
    let config = business(false);
    with_saved(&config);
    let session = serve(&config).await;

    let tools = session.list_all_tools().await.unwrap();
    let tool = tools
        .iter()
        .find(|t| t.name == "workflow__chase")
        .expect("the saved workflow is listed");
    let listed = serde_json::to_value(tool).unwrap();
    assert_eq!(listed["inputSchema"]["required"], json!(["list"]));
    assert_eq!(
        listed["annotations"],
        json!({"readOnlyHint": false, "destructiveHint": false, "idempotentHint": false, "openWorldHint": true}),
        "derived from its steps' tools, failing closed"
    );

    let report =
        orchestrate_named(&session, "workflow__chase", json!({"list": "collections"})).await;
    assert_eq!(report["status"], "partial", "{report:#}");
    assert_eq!(report["output"], json!({"created": 2}));
    assert!(
        events(&config).contains(&"message #finance: 2 follow-ups".to_owned()),
        "the input's default applied"
    );

    let refused = call(&session, "workflow__chase", json!({"list": 7})).await;
    assert_eq!(refused.is_error, Some(true));
    let report = refused.structured_content.unwrap();
    assert_eq!(report["status"], "invalid");
    assert_eq!(report["errors"][0]["path"], "/inputs/list");
}

/// The compiled input schema is kept with the config's workflow: an edited schema must not be
/// checked with the one compiled before the edit.
#[tokio::test]
async fn a_saved_workflows_edited_input_schema_applies_once_reloaded() {
    let config = business(false);
    with_saved(&config);
    let session = serve(&config).await;
    assert!(!chase_takes_a_number(&session).await);

    edit_chase_list_type(&config, "[\"string\", \"integer\"]");
    super::support::eventually(
        std::time::Duration::from_secs(10),
        "the edited schema to take `list: 7`",
        || async { chase_takes_a_number(&session).await.then_some(()) },
    )
    .await;
}

/// A reload goes through the same checks as start-up: an edit that breaks a saved workflow is
/// refused whole, and the running workflow keeps its schema.
#[tokio::test]
async fn a_reload_that_breaks_a_saved_workflow_keeps_the_running_one() {
    let config = business(false);
    with_saved(&config);
    let session = serve(&config).await;

    edit_chase_list_type(&config, "\"nonsense\"");
    // Past two polls of the file, so the watcher has read the edit.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    assert!(
        !chase_takes_a_number(&session).await,
        "the running schema, which wants a string, still applies"
    );
}

/// Whether `workflow__chase` takes `list: 7` past its input schema.
async fn chase_takes_a_number(session: &Session) -> bool {
    let report = orchestrate_named(session, "workflow__chase", json!({"list": 7})).await;
    !(report["status"] == "invalid" && report["errors"][0]["path"] == "/inputs/list")
}

/// Give the saved workflow's `list` input another JSON Schema `type`.
fn edit_chase_list_type(config: &TestConfig, list_type: &str) {
    let text = std::fs::read_to_string(&config.path).unwrap().replace(
        "list = { type = \"string\" }",
        &format!("list = {{ type = {list_type} }}"),
    );
    std::fs::write(&config.path, text).unwrap();
}

async fn orchestrate_named(session: &Session, name: &str, arguments: Value) -> Value {
    call(session, name, arguments)
        .await
        .structured_content
        .expect("a report")
}

#[tokio::test]
async fn a_bad_saved_workflow_is_refused_at_load_with_its_place() {
    let config = business(false);
    let text = std::fs::read_to_string(&config.path).unwrap()
        + "\n[workflows.broken]\ninput_schema = { type = \"nonsense\" }\n\n[[workflows.broken.steps]]\nid = \"a\"\ntool = \"chat__send\"\nwhen = \"true\"\n";
    std::fs::write(&config.path, text).unwrap();
    let (code, stdout, stderr) = super::support::conductor_cli(&config.path, &["check"]).await;
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    insta::assert_snapshot!(stderr.replace(&config.path.display().to_string(), "[CONFIG]"));
}

#[tokio::test]
async fn conductor_run_runs_a_file_or_a_saved_workflow() {
    let config = business(false);
    with_saved(&config);
    let file = config.dir.path().join("chase.json");
    let mut workflow = unpaid_to_tasks();
    workflow.as_object_mut().unwrap().remove("inputs");
    std::fs::write(&file, workflow.to_string()).unwrap();
    let file = file.display().to_string();

    let (code, stdout, stderr) = super::support::conductor_cli(
        &config.path,
        &[
            "run",
            &file,
            "--input",
            "list=collections",
            "--input",
            "channel=#ops",
        ],
    )
    .await;
    assert_eq!(code, 2, "partial exits 2: {stdout}\n{stderr}");
    assert!(stdout.contains(": partial in "), "{stdout}");
    assert!(
        stdout.contains("tasks[1]: list `collections` refused the task `Chase INV-2 (Globex)`"),
        "{stdout}"
    );
    assert!(
        stderr.contains("] tasks: item 3/3 succeeded")
            || stderr.contains("] tasks: item 1/3 succeeded"),
        "live progress: {stderr}"
    );
    assert!(
        events(&config).contains(&"message #ops: 2 of 3 follow-ups created, 1 failed".to_owned())
    );

    let (code, stdout, _) = super::support::conductor_cli(
        &config.path,
        &["run", "chase", "--input", "list=ops", "--json"],
    )
    .await;
    assert_eq!(code, 2, "{stdout}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    // A new process: the tracker refuses INV-2 once again, which 50% tolerates.
    assert_eq!(report["status"], "partial");

    let (code, _, stderr) =
        super::support::conductor_cli(&config.path, &["run", "nothing_here"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: `nothing_here` is neither a file nor a saved workflow (saved: chase)"
    );
}

#[tokio::test]
async fn idempotency_keys_survive_a_resume() {
    let config = business(false);
    let session = serve(&config).await;
    let workflow = json!({"steps": [
        {"id": "tasks", "tool": "tracker__create_task", "for_each": "${{ ['first', 'INV-2 second'] }}",
         "tolerate_failures": 1, "args": {"title": "${{ item }}", "list": "${{ idem_key }}"}}
    ]});
    let first = orchestrate(&session, workflow.clone()).await;
    assert_eq!(first["status"], "partial", "{first:#}");
    let run_id = first["run_id"].as_str().unwrap().to_owned();

    let mut again = workflow;
    again["resume"] = json!({"run_id": run_id});
    let resumed = orchestrate(&session, again).await;
    assert_eq!(resumed["status"], "succeeded", "{resumed:#}");
    assert_ne!(resumed["run_id"], first["run_id"]);

    let tasks = call(&session, "tracker__list_tasks", json!({}))
        .await
        .structured_content
        .unwrap();
    let lists: Vec<&str> = tasks["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["list"].as_str().unwrap())
        .collect();
    assert_eq!(
        lists,
        [format!("{run_id}:tasks:0"), format!("{run_id}:tasks:1")],
        "keys of the first run"
    );
}

#[tokio::test]
async fn conditions_triggers_and_on_error_decide_what_runs() {
    let config = business(false);
    let session = serve(&config).await;
    let report = orchestrate(
        &session,
        json!({"steps": [{"id": "both", "tool": "books__summary", "value": 1}]}),
    )
    .await;
    assert_eq!(report["status"], "invalid", "{report:#}");
    assert_eq!(report["errors"][0]["code"], "tool_and_value");
    let report = orchestrate(
        &session,
        json!({"steps": [{"id": "a", "value": "${{ undefined_thing | default('b') }}"}]}),
    )
    .await;
    assert_eq!(report["status"], "invalid", "{report:#}");
    assert_eq!(report["errors"][0]["code"], "unknown_variable");

    let report = orchestrate(&session, json!({"steps": [
        {"id": "skipped", "value": 1, "if": "false"},
        {"id": "after_skip", "value": "${{ steps.skipped.status }}"},
        {"id": "join", "value": "joined", "trigger": "none_failed", "needs": ["skipped"]},
        {"id": "defaulted", "value": "${{ steps.skipped.output.missing }}", "trigger": "all_done", "on_error": {"default": "fallback value"}},
        {"id": "uses_default", "value": "${{ steps.defaulted.output }}"},
        {"id": "alarm", "value": "raised", "trigger": "any_failed", "needs": ["defaulted"]},
        {"id": "quiet", "value": "raised", "trigger": "any_failed", "needs": ["join"]},
        {"id": "each", "value": "${{ item * 10 }}", "for_each": "${{ [1, 2, 3] }}", "if": "item != 2"}
    ], "output": {"each": "${{ steps.each.output }}", "default": "${{ steps.uses_default.output }}", "join": "${{ steps.join.output }}"}})).await;
    assert_eq!(report["status"], "partial", "{report:#}");
    let status = |id: &str| report["steps"][id]["status"].as_str().unwrap().to_owned();
    assert_eq!(status("skipped"), "skipped");
    assert_eq!(
        status("after_skip"),
        "skipped",
        "all_succeeded after a skip"
    );
    assert_eq!(status("join"), "succeeded", "none_failed after a skip");
    assert_eq!(status("defaulted"), "failed");
    assert_eq!(report["steps"]["defaulted"]["defaulted"], true);
    assert_eq!(
        report["steps"]["defaulted"]["error"]["kind"],
        "reference_error"
    );
    assert_eq!(
        status("uses_default"),
        "succeeded",
        "a defaulted failure lets dependants run"
    );
    assert_eq!(status("alarm"), "succeeded", "any_failed after a failure");
    assert_eq!(status("quiet"), "skipped", "any_failed without one");
    assert_eq!(
        report["output"],
        json!({"each": [10, null, 30], "default": "fallback value", "join": "joined"})
    );
    assert_eq!(
        report["steps"]["each"]["stats"],
        json!({"total": 3, "succeeded": 2, "failed": 0, "skipped": 1})
    );
}

#[tokio::test]
async fn a_failure_stops_new_steps_except_all_done_ones() {
    let config = business(false);
    let session = serve(&config).await;
    let report = orchestrate(
        &session,
        json!({"steps": [
            {"id": "fails", "value": "${{ [1] | first | int + none }}"},
            {"id": "slow_branch", "tool": "slow__sleep", "args": {"ms": 300}},
            {"id": "after_slow", "value": "never", "needs": ["slow_branch"]},
            {"id": "dependant", "value": "${{ steps.fails.output }}"},
            {"id": "report", "value": "${{ steps.fails.status }}", "trigger": "all_done"}
        ]}),
    )
    .await;
    assert_eq!(report["status"], "failed", "{report:#}");
    let step = |id: &str| report["steps"][id].clone();
    assert_eq!(step("fails")["status"], "failed");
    assert_eq!(step("dependant")["status"], "upstream_failed");
    assert_eq!(
        step("slow_branch")["status"],
        "succeeded",
        "a step already running finishes"
    );
    assert_eq!(step("after_slow")["status"], "cancelled");
    assert_eq!(
        step("after_slow")["reason"],
        "the run failed at step `fails`"
    );
    assert_eq!(step("report")["status"], "succeeded");
    assert_eq!(report["output"]["report"], "failed");
}

#[tokio::test]
async fn the_run_timeout_cancels_and_the_budget_limits_calls_in_flight() {
    let config = business(false);
    let session = serve(&config).await;
    let report = orchestrate(
        &session,
        json!({"timeout_ms": 500, "steps": [
            {"id": "long", "tool": "slow__sleep", "args": {"ms": 20000}},
            {"id": "next", "value": 1, "needs": ["long"]}
        ]}),
    )
    .await;
    assert_eq!(report["status"], "cancelled", "{report:#}");
    assert_eq!(report["steps"]["long"]["status"], "cancelled");
    assert_eq!(report["steps"]["next"]["status"], "cancelled");

    // One call in flight at a time: each sleep starts after the previous one finished.
    let report = orchestrate(&session, json!({"max_concurrency": 1, "steps": [
        {"id": "a", "tool": "slow__sleep", "args": {"ms": 201}},
        {"id": "b", "tool": "slow__sleep", "for_each": "${{ [202, 203] }}", "args": {"ms": "${{ item }}"}}
    ]})).await;
    assert_eq!(report["status"], "succeeded", "{report:#}");
    let log: Vec<String> = events(&config)
        .into_iter()
        .filter(|e| e.contains("sleep 20") && !e.contains("20000"))
        .collect();
    for pair in log.chunks(2) {
        assert!(
            pair[0].starts_with("started")
                && pair[1].starts_with("finished")
                && pair[0][8..] == pair[1][9..],
            "{log:?}"
        );
    }
    assert_eq!(log.len(), 6, "{log:?}");
}

/// `for_each` takes the list itself too (what a model writes first), its strings rendered as
/// templates against the step's inputs, and an item name that does not exist is still refused
/// when the workflow is checked.
#[tokio::test]
async fn for_each_takes_a_literal_list() {
    let config = business(false);
    let session = serve(&config).await;
    let workflow = json!({"inputs": {"who": "Initech"}, "steps": [
        {"id": "balances", "tool": "books__customer", "for_each": ["Acme", "${{ inputs.who }}"],
         "as": "name", "args": {"name": "${{ name }}"}}
    ]});
    let report = orchestrate(&session, workflow).await;
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(
        report["steps"]["balances"]["stats"]["succeeded"], 2,
        "{report:#}"
    );

    let broken = json!({"steps": [
        {"id": "balances", "tool": "books__customer", "for_each": ["${{ steps.nowhere.output }}"],
         "as": "name", "args": {"name": "${{ name }}"}}
    ]});
    let report = orchestrate(&session, broken).await;
    assert_eq!(report["status"], "invalid", "{report:#}");
    assert!(
        report.to_string().contains("/steps/0/for_each"),
        "the problem names its place: {report:#}"
    );
}

/// A typo in a field every step has is refused when the workflow is checked, with the field
/// it meant, not found at run time as "undefined".
#[tokio::test]
async fn a_misspelled_step_field_is_refused_with_the_field_it_meant() {
    let config = business(false);
    let session = serve(&config).await;
    let workflow = json!({"mode": "validate", "steps": [
        {"id": "totals", "tool": "books__summary"},
        {"id": "say", "value": "${{ steps.totals.outptu }}"}
    ]});
    let report = orchestrate(&session, workflow).await;
    assert_eq!(report["status"], "invalid", "{report:#}");
    let error = &report["errors"][0];
    assert_eq!(error["code"], "unknown_step_field", "{report:#}");
    assert_eq!(error["path"], "/steps/1/value", "{report:#}");
    assert_eq!(
        error["hint"], "did you mean `steps.totals.output`?",
        "{report:#}"
    );
}

/// Validation reports every problem at once: a cycle together with an unknown tool, not
/// in a later round once the tool is fixed.
#[tokio::test]
async fn a_cycle_is_reported_with_the_other_problems() {
    let config = business(false);
    let session = serve(&config).await;
    let workflow = json!({"mode": "validate", "steps": [
        {"id": "a", "tool": "books__sumary", "needs": ["b"]},
        {"id": "b", "tool": "books__summary", "needs": ["a"]}
    ]});
    let report = orchestrate(&session, workflow).await;
    assert_eq!(report["status"], "invalid", "{report:#}");
    let codes: Vec<&str> = report["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|error| error["code"].as_str())
        .collect();
    assert!(codes.contains(&"cycle"), "{report:#}");
    assert!(codes.len() >= 2, "the unknown tool too: {report:#}");
}
