//! Saved workflows: `[workflows.<name>]` in `servers.toml`, offered as tools `workflow__<name>`.

use std::sync::Arc;

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use serde_json::Value;

use super::validate::{Problem, check_shape};
use crate::catalog::Catalog;
use crate::config::{Config, WorkflowSpec};

/// What goes before a saved workflow's name in its tool name.
pub const PREFIX: &str = "workflow__";

/// Check every saved workflow's shape and input schema when the config loads, before any server
/// is up. Each problem reads like a config problem: file, line and column, then what is wrong.
pub fn check_at_load(config: &Config) -> Vec<String> {
    let file = config.path.display();
    let mut found = Vec::new();
    for spec in &config.workflows {
        let place = format!(
            "{file}:{}:{}: workflow `{}`",
            spec.line, spec.column, spec.name
        );
        // Compiled into the spec, where calls of the workflow find it.
        if spec
            .input_validator
            .validator(|| spec.input_schema.clone())
            .is_none()
        {
            found.push(format!(
                "{place}: `input_schema` is not a valid JSON Schema"
            ));
        }
        for problem in check_shape(&spec.body) {
            let hint = problem
                .hint
                .map(|hint| format!("\n  hint: {hint}"))
                .unwrap_or_default();
            found.push(format!(
                "{place}: {}: {}{hint}",
                problem.path, problem.message
            ));
        }
    }
    found
}

/// The saved workflow a tool name refers to.
pub fn find<'c>(config: &'c Config, tool: &str) -> Option<&'c WorkflowSpec> {
    let name = tool.strip_prefix(PREFIX)?;
    config.workflows.iter().find(|spec| spec.name == name)
}

/// A saved workflow as a tool. Its annotations come from its steps' tools, failing closed:
/// read-only only if every call is, not destructive only if every write says so.
pub fn tool(spec: &WorkflowSpec, catalog: &Catalog) -> Tool {
    let mut tool = Tool::default();
    tool.name = format!("{PREFIX}{}", spec.name).into();
    tool.title = Some(format!("Workflow {}", spec.name));
    tool.description = Some(
        spec.description
            .clone()
            .unwrap_or_else(|| format!("Run the saved workflow `{}`.", spec.name))
            .into(),
    );
    tool.input_schema = Arc::new(spec.input_schema.as_object().cloned().unwrap_or_default());
    tool.output_schema = Some(super::report_schema());
    tool.annotations = Some(derived_annotations(spec, catalog));
    tool
}

fn derived_annotations(spec: &WorkflowSpec, catalog: &Catalog) -> ToolAnnotations {
    let mut read_only = true;
    let mut idempotent = true;
    let mut destructive = false;
    let mut open_world = false;
    for name in called_tools(&spec.body) {
        let annotations = catalog
            .tool(&name)
            .and_then(|entry| entry.tool.annotations.clone());
        let Some(a) = annotations else {
            // Unknown: assume the worst.
            read_only = false;
            idempotent = false;
            destructive = true;
            open_world = true;
            continue;
        };
        let this_read_only = a.read_only_hint == Some(true);
        read_only &= this_read_only;
        idempotent &= this_read_only || a.idempotent_hint == Some(true);
        destructive |= !this_read_only && a.destructive_hint != Some(false);
        open_world |= a.open_world_hint != Some(false);
    }
    ToolAnnotations::from_raw(
        None,
        Some(read_only),
        Some(!read_only && destructive),
        Some(idempotent),
        Some(open_world),
    )
}

/// Every tool a workflow body calls, fallbacks included.
fn called_tools(body: &Value) -> Vec<String> {
    let steps = body
        .get("steps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    steps
        .iter()
        .flat_map(|step| [step.get("tool"), step.pointer("/on_error/fallback/tool")])
        .flatten()
        .filter_map(|tool| tool.as_str().map(str::to_owned))
        .collect()
}

/// The workflow to run for a call with `args`: the saved body, with the arguments (checked
/// against the input schema, defaults filled in) as its inputs.
pub fn workflow_for(spec: &WorkflowSpec, args: JsonObject) -> Result<Value, Vec<Problem>> {
    let args = Value::Object(args);
    if let Some(validator) = spec.input_validator.validator(|| spec.input_schema.clone()) {
        let problems: Vec<Problem> = validator
            .iter_errors(&args)
            .map(|error| Problem {
                path: format!("/inputs{}", error.instance_path()),
                code: "invalid_input".to_owned(),
                message: error.masked().to_string(),
                hint: None,
            })
            .collect();
        if !problems.is_empty() {
            return Err(problems);
        }
    }
    let mut inputs = args.as_object().cloned().unwrap_or_default();
    if let Some(properties) = spec
        .input_schema
        .get("properties")
        .and_then(Value::as_object)
    {
        for (name, property) in properties {
            if !inputs.contains_key(name) {
                inputs.insert(
                    name.clone(),
                    property.get("default").cloned().unwrap_or(Value::Null),
                );
            }
        }
    }
    let mut workflow = spec.body.clone();
    if let Value::Object(map) = &mut workflow {
        map.insert("inputs".to_owned(), Value::Object(inputs));
    }
    Ok(workflow)
}

#[cfg(test)]
mod tests {
    /// `[workflows.<name>]` keys are read by the config layer, which knows no workflow types:
    /// each must stay a field of the workflow schema.
    #[test]
    fn the_config_keeps_only_workflow_fields() {
        let properties = crate::orchestrate::validate::workflow_schema()["properties"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        for key in crate::config::WORKFLOW_BODY_KEYS {
            assert!(
                properties.contains_key(key),
                "`{key}` is not a workflow field"
            );
        }
    }
}
