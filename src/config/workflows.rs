//! `[workflows.<name>]` tables: saved workflows, read as JSON with their place in the file.

use toml::Spanned;
use toml::de::DeValue;

use super::diagnostic::Problems;
use super::reader::{Value, as_table, wrong_type};
use super::*;

/// The keys of `[workflows.<name>]` that belong to the workflow itself.
pub const WORKFLOW_BODY_KEYS: [&str; 5] =
    ["steps", "output", "return", "timeout_ms", "max_concurrency"];

pub(super) fn read_workflow(
    name: Spanned<String>,
    value: &Value<'_>,
    problems: &mut Problems,
) -> Option<WorkflowSpec> {
    let mut table = as_table(value, format!("workflows.{}", name.get_ref()), problems)?;
    let tool_name = format!("workflow__{}", name.get_ref());
    let valid_name = name
        .get_ref()
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && is_valid_public_name(&tool_name);
    if !valid_name {
        problems.add_with_hint(
            name.span(),
            format!("workflow name `{}` is not allowed", name.get_ref()),
            Some("use letters, digits, `_` or `-`; the tool `workflow__<name>` must fit in 64 characters"),
        );
    }
    let description = table
        .string("description", problems)
        .map(Spanned::into_inner);
    let input_schema = match table.get("input_schema") {
        Some(schema) if matches!(schema.get_ref(), DeValue::Table(_)) => to_json(schema.get_ref()),
        Some(schema) => {
            wrong_type(
                schema.span(),
                &format!("workflows.{}.input_schema", name.get_ref()),
                "a table (a JSON Schema)",
                schema.get_ref(),
                problems,
            );
            serde_json::json!({"type": "object"})
        }
        None => serde_json::json!({"type": "object"}),
    };
    let mut body = serde_json::Map::new();
    for key in WORKFLOW_BODY_KEYS {
        if let Some(value) = table.get(key) {
            body.insert(key.to_owned(), to_json(value.get_ref()));
        }
    }
    if !body.contains_key("steps") {
        problems.add_with_hint(
            name.span(),
            format!("workflow `{}` has no steps", name.get_ref()),
            Some("add steps as `[[workflows.<name>.steps]]` tables"),
        );
    }
    table.finish(problems);
    let (line, column) = diagnostic::line_column(problems.source(), name.span().start);
    valid_name.then(|| WorkflowSpec {
        name: name.into_inner(),
        description,
        input_schema,
        body: serde_json::Value::Object(body),
        line,
        column,
        input_validator: Default::default(),
    })
}

/// A TOML value as JSON: what `orchestrate` and JSON Schema speak. Datetimes become strings.
fn to_json(value: &DeValue<'_>) -> serde_json::Value {
    use serde_json::Value as Json;
    match value {
        DeValue::String(text) => Json::String(text.to_string()),
        DeValue::Integer(integer) => integer
            .as_str()
            .replace('_', "")
            .parse::<i64>()
            .map(Json::from)
            .unwrap_or_else(|_| Json::String(integer.as_str().to_owned())),
        DeValue::Float(float) => float
            .as_str()
            .replace('_', "")
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or(Json::Null, Json::Number),
        DeValue::Boolean(flag) => Json::Bool(*flag),
        DeValue::Datetime(datetime) => Json::String(datetime.to_string()),
        DeValue::Array(items) => {
            Json::Array(items.iter().map(|item| to_json(item.get_ref())).collect())
        }
        DeValue::Table(table) => Json::Object(
            table
                .iter()
                .map(|(key, item)| (key.get_ref().to_string(), to_json(item.get_ref())))
                .collect(),
        ),
    }
}
