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
