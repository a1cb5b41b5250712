//! Expressions in workflows: Jinja (minijinja) with `${{ }}`, `${% %}` and `${# #}` delimiters,
//! so `{{ }}` in payloads passes through untouched.
//!
//! A string that is exactly one `${{ expr }}` evaluates to the expression's JSON value; any
//! other string with delimiters renders as text. `{"$literal": x}` is `x`, never evaluated.
//! Undefined values are errors, and every evaluation has a fuel bound.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, LazyLock, Mutex};

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Serde;
use minijinja::{Environment, Expression, UndefinedBehavior};
use serde_json::Value;

/// Enough for real reshaping work, small enough to stop a runaway loop within milliseconds.
const FUEL: u64 = 1_000_000;
const LITERAL_KEY: &str = "$literal";

/// Why an expression could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ExprError {
    pub kind: ExprErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExprErrorKind {
    /// It does not parse.
    Syntax,
    /// It reads something that does not exist.
    Reference,
    /// It produced the wrong kind of value, or failed while computing.
    Type,
}

impl ExprErrorKind {
    pub fn code(self) -> &'static str {
        match self {
            ExprErrorKind::Syntax => "expression_syntax",
            ExprErrorKind::Reference => "reference_error",
            ExprErrorKind::Type => "type_error",
        }
    }
}

/// The expression engine, configured once.
#[derive(Debug)]
pub struct Expressions {
    env: &'static Environment<'static>,
    /// Expressions compiled, by their text: a workflow's expressions are compiled when it is
    /// checked and again for every step and item they are evaluated for.
    compiled: Mutex<HashMap<String, Arc<Compiled>>>,
}

/// An expression compiled, and the variables it reads (sorted, as plans and messages show
/// them): finding those walks the expression, which a workflow's check does for every
/// expression on every run.
#[derive(Debug)]
struct Compiled {
    expression: Expression<'static, 'static>,
    variables: Vec<String>,
}

/// How many compiled expressions are kept; past that the cache starts again.
const COMPILED_KEPT: usize = 4096;

/// The one environment: its configuration never changes, and compiled expressions borrow it.
static ENVIRONMENT: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    match SyntaxConfig::builder()
        .block_delimiters("${%", "%}")
        .variable_delimiters("${{", "}}")
        .comment_delimiters("${#", "#}")
        // A message that ends in a newline keeps it.
        .keep_trailing_newline(true)
        .build()
    {
        Ok(syntax) => env.set_syntax(syntax),
        Err(error) => tracing::error!(error = %error, "workflow expression syntax rejected"),
    }
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("fromjson", fromjson);
    env
});

impl Default for Expressions {
    fn default() -> Self {
        Expressions::new()
    }
}

/// Where a string stands: plain text, one whole expression, or a template.
enum Form<'a> {
    Plain,
    Whole(&'a str),
    Template,
}

fn form(text: &str) -> Form<'_> {
    let trimmed = text.trim();
    if let Some(inner) = trimmed
        .strip_prefix("${{")
        .and_then(|rest| rest.strip_suffix("}}"))
        && !inner.contains("${{")
        && !inner.contains("${%")
    {
        return Form::Whole(inner.trim());
    }
    if text.contains("${{") || text.contains("${%") || text.contains("${#") {
        Form::Template
    } else {
        Form::Plain
    }
}

/// The variables minijinja found (a set), in a stable order: plans and messages list them.
fn sorted(variables: std::collections::HashSet<String>) -> Vec<String> {
    let mut variables: Vec<String> = variables.into_iter().collect();
    variables.sort();
    variables
}

/// A condition or `for_each` is an expression with or without its `${{ }}`.
fn bare_expression(text: &str) -> &str {
    match form(text) {
        Form::Whole(inner) => inner,
        _ => text.trim(),
    }
}

impl Expressions {
    pub fn new() -> Self {
        Expressions {
            env: &ENVIRONMENT,
            compiled: Mutex::default(),
        }
    }

    /// An expression compiled, from the cache when it was compiled before.
    fn compile(&self, expression: &str) -> Result<Arc<Compiled>, minijinja::Error> {
        if let Ok(compiled) = self.compiled.lock()
            && let Some(expression) = compiled.get(expression)
        {
            return Ok(expression.clone());
        }
        let env: &'static Environment<'static> = self.env;
        let compiled = env.compile_expression_owned(expression.to_owned())?;
        let fresh = Arc::new(Compiled {
            variables: sorted(compiled.undeclared_variables(true)),
            expression: compiled,
        });
        if let Ok(mut compiled) = self.compiled.lock() {
            if compiled.len() >= COMPILED_KEPT {
                compiled.clear();
            }
            compiled.insert(expression.to_owned(), fresh.clone());
        }
        Ok(fresh)
    }

    /// Check every expression in `value` and collect the variables it reads, as dotted paths
    /// (`steps.fetch.output.items`). Syntax errors come back with their JSON pointer.
    pub fn references(&self, value: &Value, pointer: &str, found: &mut References) {
        match value {
            Value::String(text) => self.string_references(text, pointer, found),
            Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    self.references(item, &format!("{pointer}/{index}"), found);
                }
            }
            Value::Object(map) if is_literal(map) => {}
            Value::Object(map) => {
                for (key, item) in map {
                    self.references(item, &format!("{pointer}/{}", escape_pointer(key)), found);
                }
            }
            _ => {}
        }
    }

    fn string_references(&self, text: &str, pointer: &str, found: &mut References) {
        match form(text) {
            Form::Plain => {}
            Form::Whole(expression) => self.expression_references(expression, pointer, found),
            Form::Template => match self.env.template_from_str(text) {
                Ok(template) => found.add(&sorted(template.undeclared_variables(true)), pointer),
                Err(error) => found.errors.push((pointer.to_owned(), describe(&error))),
            },
        }
    }

    /// References of a condition or `for_each` expression (`${{ }}` optional).
    pub fn expression_references(&self, text: &str, pointer: &str, found: &mut References) {
        match self.compile(bare_expression(text)) {
            Ok(compiled) => found.add(&compiled.variables, pointer),
            Err(error) => found.errors.push((pointer.to_owned(), describe(&error))),
        }
    }

    /// Evaluate every expression in `value` against `scope`.
    pub fn render(&self, value: &Value, scope: &Scope) -> Result<Value, ExprError> {
        self.render_in(value, &scope.0)
    }

    fn render_in(&self, value: &Value, context: &minijinja::Value) -> Result<Value, ExprError> {
        Ok(match value {
            Value::String(text) => match form(text) {
                Form::Plain => value.clone(),
                Form::Whole(expression) => self.eval(expression, context)?,
                Form::Template => Value::String(
                    self.env
                        .render_str(text, context.clone())
                        .map_err(|error| classify(&error))?,
                ),
            },
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|item| self.render_in(item, context))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) if is_literal(map) => {
                map.get(LITERAL_KEY).cloned().unwrap_or(Value::Null)
            }
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(key, item)| Ok((key.clone(), self.render_in(item, context)?)))
                    .collect::<Result<_, ExprError>>()?,
            ),
            other => other.clone(),
        })
    }

    /// Evaluate a condition or `for_each` expression (`${{ }}` optional) to a JSON value.
    pub fn evaluate(&self, text: &str, scope: &Scope) -> Result<Value, ExprError> {
        self.eval(bare_expression(text), &scope.0)
    }

    /// Evaluate a condition with Jinja truthiness: empty lists, strings and maps, `0`, `none`
    /// and `false` are false.
    pub fn condition(&self, text: &str, scope: &Scope) -> Result<bool, ExprError> {
        let context = scope.0.clone();
        let compiled = self
            .compile(bare_expression(text))
            .map_err(|error| classify(&error))?;
        let value = compiled
            .expression
            .eval(context)
            .map_err(|error| classify(&error))?;
        if value.is_undefined() {
            return Err(undefined(text));
        }
        Ok(value.is_true())
    }

    fn eval(&self, expression: &str, context: &minijinja::Value) -> Result<Value, ExprError> {
        let compiled = self.compile(expression).map_err(|error| classify(&error))?;
        let value =
            compiled
                .expression
                .eval(context.clone())
                .map_err(|error| match error.kind() {
                    minijinja::ErrorKind::UndefinedError => undefined_in(expression, context),
                    _ => classify(&error),
                })?;
        // Strict undefined still lets a missing attribute at the very end of an expression
        // through as `undefined`; that is a reference error too.
        if value.is_undefined() {
            return Err(undefined_in(expression, context));
        }
        serde_json::to_value(&value).map_err(|error| ExprError {
            kind: ExprErrorKind::Type,
            message: format!("`{expression}` gave a value that is not JSON: {error}"),
        })
    }
}

/// What expressions see, converted for the evaluator once. Clones are cheap, and naming more
/// (an item, an error) layers the names over it instead of copying it: a fan-out over n items
/// would otherwise copy the whole scope, list included, n times.
#[derive(Debug, Clone)]
pub struct Scope(minijinja::Value);

/// A JSON value converted for the evaluator, to be placed in many scopes without converting
/// it again (a settled step's view, a run's inputs).
#[derive(Debug, Clone)]
pub struct ScopeValue(minijinja::Value);

impl ScopeValue {
    pub fn new(value: &impl serde::Serialize) -> Self {
        Self(minijinja::Value::from(Serde(value)))
    }
}

impl Scope {
    pub fn new(scope: &Value) -> Self {
        Self(minijinja::Value::from(Serde(scope)))
    }

    /// A run's scope: its `inputs`, the `steps` given by id, and `run.id`.
    pub fn of_run(
        inputs: &ScopeValue,
        steps: impl Iterator<Item = (String, ScopeValue)>,
        run_id: &str,
    ) -> Self {
        let steps: BTreeMap<String, minijinja::Value> =
            steps.map(|(id, view)| (id, view.0)).collect();
        Self(minijinja::context! {
            inputs => inputs.0.clone(),
            steps => minijinja::Value::from(steps),
            run => minijinja::context! { id => run_id },
        })
    }

    /// This scope with `names` added; they hide any equal name already in it.
    pub fn with(&self, names: &[(&str, Value)]) -> Self {
        let layer: serde_json::Map<String, Value> = names
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect();
        let layer = minijinja::Value::from(Serde(&layer));
        // The last map with a name wins.
        Self(minijinja::value::merge_maps([self.0.clone(), layer]))
    }
}

/// Variables read by expressions, each with where it was read, and syntax errors found.
#[derive(Debug, Default)]
pub struct References {
    pub paths: Vec<(String, String)>,
    pub errors: Vec<(String, String)>,
}

impl References {
    /// Record the variables read at `pointer` (given sorted, so plans and messages come out
    /// the same every time).
    fn add(&mut self, sorted: &[String], pointer: &str) {
        self.paths
            .extend(sorted.iter().map(|path| (path.clone(), pointer.to_owned())));
    }

    /// The distinct root names read (`steps`, `inputs`, `item`...), each with one place.
    pub fn roots(&self) -> Vec<(&str, &str)> {
        let mut seen = BTreeSet::new();
        self.paths
            .iter()
            .filter_map(|(path, pointer)| {
                let root = path.split('.').next().unwrap_or(path);
                seen.insert(root).then_some((root, pointer.as_str()))
            })
            .collect()
    }

    /// The step ids read through `steps.<id>`, each with the first place it was read.
    pub fn steps(&self) -> Vec<(&str, &str)> {
        let mut seen = BTreeSet::new();
        self.paths
            .iter()
            .filter_map(|(path, pointer)| {
                let mut parts = path.split('.');
                (parts.next() == Some("steps"))
                    .then(|| parts.next())
                    .flatten()
                    .filter(|id| seen.insert(*id))
                    .map(|id| (id, pointer.as_str()))
            })
            .collect()
    }
}

fn is_literal(map: &serde_json::Map<String, Value>) -> bool {
    map.len() == 1 && map.contains_key(LITERAL_KEY)
}

/// A JSON pointer segment for `key` (RFC 6901).
pub fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// An undefined reference, saying, for a plain path such as `steps.a.output.text`, what the
/// last part that exists holds: its kind, a short preview, and the nearest field it has.
fn undefined_in(expression: &str, context: &minijinja::Value) -> ExprError {
    let path = expression.trim();
    let plain = !path.is_empty()
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !plain {
        return undefined(expression);
    }
    let parts: Vec<&str> = path.split('.').collect();
    let mut value = context.clone();
    for (at, part) in parts.iter().enumerate() {
        let next = value.get_attr(part).unwrap_or(minijinja::Value::UNDEFINED);
        if !next.is_undefined() {
            value = next;
            continue;
        }
        if at == 0 {
            break;
        }
        let found = parts[..at].join(".");
        let mut message = format!("`{path}` is undefined: `{found}` ");
        if value.kind() == minijinja::value::ValueKind::Map {
            let keys: Vec<String> = value
                .try_iter()
                .map(|keys| keys.map(|key| key.to_string()).collect())
                .unwrap_or_default();
            message.push_str(&format!("has no `{part}`"));
            match crate::config::did_you_mean(part, keys.iter().map(String::as_str)) {
                Some(near) => message.push_str(&format!("; did you mean `{found}.{near}`?")),
                None if !keys.is_empty() => {
                    message.push_str(&format!(" (it has: {})", keys.join(", ")));
                }
                None => {}
            }
        } else {
            let preview = serde_json::to_string(&value).unwrap_or_default();
            let preview: String = preview.chars().take(60).collect();
            message.push_str(&format!(
                "is {} ({preview}), which has no fields",
                kind_name(&value)
            ));
        }
        return ExprError {
            kind: ExprErrorKind::Reference,
            message,
        };
    }
    undefined(expression)
}

fn kind_name(value: &minijinja::Value) -> &'static str {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::String => "a string",
        ValueKind::Number => "a number",
        ValueKind::Bool => "a boolean",
        ValueKind::Seq => "a list",
        ValueKind::None => "null",
        _ => "a value",
    }
}

fn undefined(expression: &str) -> ExprError {
    ExprError {
        kind: ExprErrorKind::Reference,
        message: format!("`{}` is undefined", expression.trim()),
    }
}

fn describe(error: &minijinja::Error) -> String {
    let mut message = error.kind().to_string();
    if let Some(detail) = error.detail() {
        message.push_str(": ");
        message.push_str(detail);
    }
    message
}

fn classify(error: &minijinja::Error) -> ExprError {
    use minijinja::ErrorKind;
    let kind = match error.kind() {
        ErrorKind::SyntaxError => ExprErrorKind::Syntax,
        ErrorKind::UndefinedError
        | ErrorKind::UnknownFunction
        | ErrorKind::UnknownFilter
        | ErrorKind::UnknownMethod
        | ErrorKind::UnknownTest => ExprErrorKind::Reference,
        _ => ExprErrorKind::Type,
    };
    ExprError {
        kind,
        message: describe(error),
    }
}

/// `fromjson`: parse a JSON string, for tools that answer with JSON as text.
fn fromjson(text: &str) -> Result<minijinja::Value, minijinja::Error> {
    serde_json::from_str::<Value>(text)
        .map(|value| minijinja::Value::from(Serde(value)))
        .map_err(|error| {
            minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                format!("fromjson: {error}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope() -> Scope {
        Scope::new(&json!({
            "inputs": {"list": "L1"},
            "steps": {"unpaid": {"output": {"invoices": [{"n": "INV-1", "due": 10.5}, {"n": "INV-2", "due": 0}]}}}
        }))
    }

    #[test]
    fn names_added_to_a_scope_hide_equal_names_and_keep_the_rest() {
        let expressions = Expressions::new();
        let scope = scope().with(&[("item", json!({"n": 1})), ("inputs", json!({"list": "L2"}))]);
        assert_eq!(
            expressions
                .render(
                    &json!("${{ [item.n, inputs.list, steps.unpaid.output.invoices | length] }}"),
                    &scope
                )
                .unwrap(),
            json!([1, "L2", 2])
        );
        let error = expressions
            .render(&json!("${{ missing }}"), &scope)
            .unwrap_err();
        assert_eq!(error.kind, ExprErrorKind::Reference, "{error}");
        assert_eq!(
            expressions
                .render(&json!("${{ inputs.list }}"), &self::scope())
                .unwrap(),
            json!("L1"),
            "the scope it was made from is unchanged"
        );
    }

    #[test]
    fn a_whole_expression_keeps_its_type() {
        let expressions = Expressions::new();
        let value =
            json!("${{ steps.unpaid.output.invoices | selectattr('due', 'gt', 0) | list }}");
        assert_eq!(
            expressions.render(&value, &scope()).unwrap(),
            json!([{"n": "INV-1", "due": 10.5}])
        );
        let value = json!({"count": "${{ steps.unpaid.output.invoices | length }}"});
        assert_eq!(
            expressions.render(&value, &scope()).unwrap(),
            json!({"count": 2})
        );
    }

    #[test]
    fn mixed_strings_render_as_text_and_plain_braces_pass_through() {
        let expressions = Expressions::new();
        let value = json!(
            "List ${{ inputs.list }}: ${% for i in steps.unpaid.output.invoices %}${{ i.n }} ${% endfor %}{{ keep }}"
        );
        assert_eq!(
            expressions.render(&value, &scope()).unwrap(),
            json!("List L1: INV-1 INV-2 {{ keep }}")
        );
        let value = json!({"$literal": "${{ not evaluated }}"});
        assert_eq!(
            expressions.render(&value, &scope()).unwrap(),
            json!("${{ not evaluated }}")
        );
    }

    #[test]
    fn undefined_values_are_reference_errors() {
        let expressions = Expressions::new();
        let error = expressions
            .render(&json!("${{ steps.unpaid.output.nope }}"), &scope())
            .unwrap_err();
        assert_eq!(error.kind, ExprErrorKind::Reference);
        let error = expressions
            .render(&json!("${{ steps.missing.output }}"), &scope())
            .unwrap_err();
        assert_eq!(error.kind, ExprErrorKind::Reference, "{error}");
    }

    #[test]
    fn an_undefined_path_says_what_its_last_existing_part_holds() {
        let expressions = Expressions::new();
        let error = expressions
            .evaluate("steps.unpaid.output.invoice", &scope())
            .unwrap_err();
        assert_eq!(
            error.message,
            "`steps.unpaid.output.invoice` is undefined: `steps.unpaid.output` has no `invoice`; \
             did you mean `steps.unpaid.output.invoices`?"
        );
        let error = expressions
            .evaluate("inputs.list.text", &scope())
            .unwrap_err();
        assert_eq!(
            error.message,
            "`inputs.list.text` is undefined: `inputs.list` is a string (\"L1\"), which has no fields"
        );
    }

    #[test]
    fn fuel_stops_runaway_loops() {
        let expressions = Expressions::new();
        let runaway = json!(
            "${% for a in range(1000) %}${% for b in range(1000) %}${% endfor %}${% endfor %}"
        );
        let error = expressions.render(&runaway, &scope()).unwrap_err();
        assert!(error.message.contains("fuel"), "{error}");
    }

    #[test]
    fn conditions_use_jinja_truthiness() {
        let expressions = Expressions::new();
        assert!(
            expressions
                .condition("steps.unpaid.output.invoices", &scope())
                .unwrap()
        );
        assert!(
            !expressions
                .condition("${{ inputs.list == 'other' }}", &scope())
                .unwrap()
        );
        assert!(!expressions.condition("[]", &scope()).unwrap());
    }

    #[test]
    fn references_name_the_steps_read_and_syntax_errors_their_place() {
        let expressions = Expressions::new();
        let mut found = References::default();
        let args = json!({"a": "${{ steps.unpaid.output.invoices | length }}", "b": ["x ${{ inputs.list }} ${{ item.n }}"], "c": "${{ oops( }}"});
        expressions.references(&args, "/steps/1/args", &mut found);
        assert_eq!(found.steps(), [("unpaid", "/steps/1/args/a")]);
        let roots: Vec<&str> = found.roots().into_iter().map(|(root, _)| root).collect();
        assert_eq!(
            roots,
            ["steps", "inputs", "item"],
            "in the order of the places read"
        );
        assert_eq!(found.errors.len(), 1);
        assert_eq!(found.errors[0].0, "/steps/1/args/c");
    }
}
