//! `servers.toml`: read the file, check every key, and produce typed values that cannot be wrong.
//!
//! Nothing here knows MCP. The rest of the crate receives a [`Config`] whose servers have valid
//! names, resolved environment variables, parsed durations and compiled globs.

mod diagnostic;
mod expand;
mod reader;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::{Glob, GlobSet, GlobSetBuilder};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use diagnostic::Problems;
pub use diagnostic::{ConfigError, Problem, did_you_mean};
pub use expand::{ExpandError, expand};
use reader::{Table, Value, as_table, wrong_type};

/// The separator between a server's prefix and a tool or prompt name, unless configured.
pub const DEFAULT_SEPARATOR: &str = "__";
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_KEEP_RUNS: Duration = Duration::from_secs(24 * 3600);
/// An environment variable whose value is accepted as a bearer token, besides `[http] tokens`.
pub const TOKEN_VARIABLE: &str = "CONDUCTOR_TOKEN";

/// A whole, valid configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from; relative paths inside it are relative to its folder.
    pub path: PathBuf,
    pub separator: String,
    /// How long finished workflow runs are kept for reading back and resuming.
    pub keep_runs: Duration,
    /// Every server in file order, enabled or not.
    pub servers: Vec<ServerSpec>,
    /// Saved workflows, offered as tools `workflow__<name>`, in file order.
    pub workflows: Vec<WorkflowSpec>,
    /// How `conductor serve --http` serves.
    pub http: HttpSettings,
}

/// `[http]`: serving over HTTP.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Bearer tokens a client may present; none means no authentication (loopback only).
    pub tokens: Vec<String>,
    /// `Host` values accepted besides the loopback names (DNS-rebinding protection).
    pub allowed_hosts: Vec<String>,
    /// Browser origins accepted besides loopback ones; a request from any other is refused.
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
    pub max_sessions: usize,
    /// A session with no traffic for this long is closed.
    pub session_idle: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            tokens: Vec::new(),
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            max_body_bytes: 4 * 1024 * 1024,
            max_sessions: 100,
            session_idle: Duration::from_secs(300),
        }
    }
}

/// A workflow saved in the config. The config only reads it; the orchestrate layer checks what
/// it says (at load, with [`WorkflowSpec::line`] and [`WorkflowSpec::column`] for messages).
#[derive(Debug, Clone)]
pub struct WorkflowSpec {
    pub name: String,
    pub description: Option<String>,
    /// The JSON Schema of the tool's arguments, which become the workflow's `inputs`.
    pub input_schema: serde_json::Value,
    /// The workflow as `orchestrate` takes it (`steps`, `output`, `return`...), without inputs.
    pub body: serde_json::Value,
    /// Where `[workflows.<name>]` is, for messages about it.
    pub line: usize,
    pub column: usize,
}

/// The name of a downstream server: letters, digits, `_` and `-`, never containing the separator.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(String);

impl ServerName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One downstream server as configured.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub name: ServerName,
    pub transport: Transport,
    pub enabled: bool,
    pub prefix: Prefix,
    pub startup_timeout: Duration,
    pub call_timeout: Duration,
    pub tools: ToolRules,
}

/// How conductor reaches a downstream.
#[derive(Debug, Clone)]
pub enum Transport {
    Stdio(StdioSpec),
    StreamableHttp(HttpSpec),
    /// The legacy HTTP+SSE transport (2024-11-05): an event stream and a URL to post to.
    Sse(HttpSpec),
}

impl Transport {
    /// The short name shown in tables and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Transport::Stdio(_) => "stdio",
            Transport::StreamableHttp(_) => "streamable-http",
            Transport::Sse(_) => "sse",
        }
    }
}

/// A child process speaking MCP on its stdin and stdout.
#[derive(Debug, Clone)]
pub struct StdioSpec {
    /// A program name looked up on `PATH`, or a path (a relative one is resolved against `cwd`).
    pub command: String,
    pub args: Vec<String>,
    /// Added to conductor's own environment, after `${VAR}` expansion.
    pub env: Vec<(String, String)>,
    /// The folder it starts in: `cwd` resolved against the config's folder, or that folder.
    pub cwd: PathBuf,
}

/// A remote server speaking Streamable HTTP.
#[derive(Debug, Clone)]
pub struct HttpSpec {
    pub url: String,
    pub headers: Vec<(String, String)>,
}

/// What goes in front of a server's tool and prompt names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefix {
    /// The server's name (the default).
    ServerName,
    Custom(String),
    /// No prefix: names stay exactly as the server gives them.
    None,
}

/// Which of a server's tools are offered, and under what names and descriptions.
#[derive(Debug, Clone, Default)]
pub struct ToolRules {
    /// When set, only tools matching one of these globs are offered.
    pub allow: Option<GlobSet>,
    /// Tools matching one of these are hidden, even when allowed.
    pub deny: Option<GlobSet>,
    /// Original tool name to the name to offer in its place (before the prefix).
    pub rename: HashMap<String, String>,
    /// Original tool name to a description that replaces the server's.
    pub descriptions: HashMap<String, String>,
    /// Original tool name to annotation hints that replace the server's own: a server's
    /// annotations are untrusted, and retries and workflow safety depend on them.
    pub annotations: HashMap<String, AnnotationOverride>,
}

/// Hints set in the config for one tool; unset ones keep the server's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnnotationOverride {
    pub read_only: Option<bool>,
    pub destructive: Option<bool>,
    pub idempotent: Option<bool>,
    pub open_world: Option<bool>,
}

impl ToolRules {
    /// Whether a tool with this original name is offered.
    pub fn offers(&self, tool: &str) -> bool {
        let allowed = self.allow.as_ref().is_none_or(|allow| allow.is_match(tool));
        let denied = self.deny.as_ref().is_some_and(|deny| deny.is_match(tool));
        allowed && !denied
    }
}

impl Config {
    /// Read and validate a config file, expanding `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&source, path, |name| std::env::var(name).ok())
    }

    /// Validate config text that came from `path`, with `env` answering `${VAR}` lookups.
    pub fn parse(
        source: &str,
        path: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut problems = Problems::new(source);
        let config = match DeTable::parse_recoverable(source) {
            (document, errors) if errors.is_empty() => {
                validate(document.get_ref(), path, &env, &mut problems)
            }
            (_, errors) => {
                for error in errors {
                    let span = error.span().unwrap_or(0..0);
                    problems.add(span, format!("invalid TOML: {}", error.message().trim()));
                }
                None
            }
        };
        let problems = problems.into_vec();
        match config {
            Some(config) if problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            }),
        }
    }

    /// The enabled servers, in file order.
    pub fn enabled_servers(&self) -> impl Iterator<Item = &ServerSpec> {
        self.servers.iter().filter(|server| server.enabled)
    }
}

/// Defaults from `[conductor]` that each server may override.
struct Defaults {
    separator: String,
    startup_timeout: Duration,
    call_timeout: Duration,
    keep_runs: Duration,
}

fn validate(
    document: &DeTable<'_>,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<Config> {
    let mut root = Table::new(document, "");
    let defaults = match root.table("conductor", problems) {
        Some(table) => read_defaults(table, problems),
        None => Defaults {
            separator: DEFAULT_SEPARATOR.to_owned(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            keep_runs: DEFAULT_KEEP_RUNS,
        },
    };
    // Absolute, so a child's folder does not depend on where conductor was started.
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let folder = std::path::absolute(&folder).unwrap_or(folder);
    let servers = match root.table("servers", problems) {
        Some(table) => table
            .entries()
            .filter_map(|(name, value)| read_server(name, value, &defaults, &folder, env, problems))
            .collect(),
        None => Vec::new(),
    };
    let workflows = match root.table("workflows", problems) {
        Some(table) => table
            .entries()
            .filter_map(|(name, value)| read_workflow(name, value, problems))
            .collect(),
        None => Vec::new(),
    };
    let mut http = root
        .table("http", problems)
        .map(|table| read_http(table, env, problems))
        .unwrap_or_default();
    // A token may also come from the environment alone, with no `[http]` table at all.
    if let Some(token) = env(TOKEN_VARIABLE).filter(|token| !token.is_empty()) {
        if token.len() >= 16 {
            http.tokens.push(token);
        } else {
            problems.add_with_hint(
                0..0,
                format!("`{TOKEN_VARIABLE}` is set but shorter than 16 characters"),
                Some("generate one with `openssl rand -hex 32`"),
            );
        }
    }
    root.finish(problems);
    Some(Config {
        path: path.to_owned(),
        separator: defaults.separator,
        keep_runs: defaults.keep_runs,
        servers,
        workflows,
        http,
    })
}

fn read_defaults(mut table: Table<'_, '_>, problems: &mut Problems) -> Defaults {
    let separator = match table.string("separator", problems) {
        Some(separator) if is_valid_separator(separator.get_ref()) => separator.into_inner(),
        Some(separator) => {
            problems.add_with_hint(
                separator.span(),
                format!("separator `{}` is not allowed", separator.get_ref()),
                Some("use one or more of letters, digits, `_`, `-` and `.`; the default is `__`"),
            );
            DEFAULT_SEPARATOR.to_owned()
        }
        None => DEFAULT_SEPARATOR.to_owned(),
    };
    let startup_timeout =
        read_duration(&mut table, "startup_timeout", problems).unwrap_or(DEFAULT_STARTUP_TIMEOUT);
    let call_timeout =
        read_duration(&mut table, "call_timeout", problems).unwrap_or(DEFAULT_CALL_TIMEOUT);
    let keep_runs = read_duration(&mut table, "keep_runs", problems).unwrap_or(DEFAULT_KEEP_RUNS);
    table.finish(problems);
    Defaults {
        separator,
        startup_timeout,
        call_timeout,
        keep_runs,
    }
}

fn is_valid_separator(separator: &str) -> bool {
    !separator.is_empty()
        && separator
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Whether `name` may be offered to clients: `^[a-zA-Z0-9_-]{1,64}$`, what Claude and other
/// hosts accept.
pub fn is_valid_public_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

fn read_server(
    name: Spanned<String>,
    value: &Value<'_>,
    defaults: &Defaults,
    folder: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<ServerSpec> {
    let server_name = check_server_name(&name, &defaults.separator, problems);
    let mut table = as_table(value, format!("servers.{}", name.get_ref()), problems)?;
    let expanded = |text: Option<Spanned<String>>, what: &str, problems: &mut Problems| {
        let text = text?;
        match expand(text.get_ref(), env) {
            Ok(value) => Some(value),
            Err(error) => {
                let hint = matches!(error, ExpandError::Missing(_)).then(|| {
                    "set it in the environment conductor starts in, or give a default: `${NAME:-value}`"
                });
                problems.add_with_hint(
                    text.span(),
                    format!("server `{}`: `{what}`: {error}", name.get_ref()),
                    hint,
                );
                None
            }
        }
    };

    let command = table.string("command", problems);
    let url = table.string("url", problems);
    let transport_kind = table.string("transport", problems);
    let args = table.strings("args", problems);
    let env_vars = table.string_map("env", problems);
    let cwd = table.string("cwd", problems);
    let headers = table.string_map("headers", problems);
    let enabled = table.bool("enabled", problems).unwrap_or(true);
    let prefix = read_prefix(&mut table, &defaults.separator, problems);
    let startup_timeout =
        read_duration(&mut table, "startup_timeout", problems).unwrap_or(defaults.startup_timeout);
    let call_timeout =
        read_duration(&mut table, "call_timeout", problems).unwrap_or(defaults.call_timeout);
    let tools = table
        .table("tools", problems)
        .map(|tools| read_tool_rules(tools, problems))
        .unwrap_or_default();

    // `command` means stdio; `url` means Streamable HTTP unless `transport = "sse"` asks for
    // the legacy HTTP+SSE transport.
    let legacy_sse = transport_kind
        .as_ref()
        .is_some_and(|kind| kind.get_ref() == "sse");
    if let Some(kind) = &transport_kind {
        let fits = match kind.get_ref().as_str() {
            "stdio" => Some(url.is_none()),
            "streamable-http" | "sse" => Some(url.is_some()),
            _ => None,
        };
        match fits {
            Some(true) => {}
            Some(false) => problems.add_with_hint(
                kind.span(),
                format!(
                    "server `{}`: `transport = \"{}\"` does not match the server's {}",
                    name.get_ref(),
                    kind.get_ref(),
                    if url.is_some() { "`url`" } else { "`command`" }
                ),
                Some("`stdio` goes with `command`; `streamable-http` and `sse` go with `url`"),
            ),
            None => problems.add_with_hint(
                kind.span(),
                format!(
                    "server `{}`: unknown transport `{}`",
                    name.get_ref(),
                    kind.get_ref()
                ),
                Some("use `stdio`, `streamable-http` or `sse` (the legacy HTTP+SSE transport)"),
            ),
        }
    }

    let transport = match (command, url) {
        (Some(command), None) => {
            for (key, value) in headers.iter() {
                problems.add(
                    key.span().start..value.span().end,
                    format!(
                        "server `{}`: `headers` only apply to a server with `url`",
                        name.get_ref()
                    ),
                );
            }
            let command = expanded(Some(command), "command", problems);
            let args: Vec<Option<String>> = args
                .unwrap_or_default()
                .into_iter()
                .map(|arg| expanded(Some(arg), "args", problems))
                .collect();
            let env_vars: Vec<Option<(String, String)>> = env_vars
                .into_iter()
                .map(|(key, value)| {
                    let what = format!("env.{}", key.get_ref());
                    expanded(Some(value), &what, problems).map(|value| (key.into_inner(), value))
                })
                .collect();
            let cwd = match cwd {
                Some(cwd) => expanded(Some(cwd), "cwd", problems).map(|cwd| folder.join(cwd)),
                None => Some(folder.to_path_buf()),
            };
            // A relative path to a program (`bin/server`) is relative to the folder the server
            // starts in, like its arguments, whichever folder conductor itself was started in.
            let command = match (command, &cwd) {
                (Some(command), Some(cwd))
                    if command.contains('/') && Path::new(&command).is_relative() =>
                {
                    Some(cwd.join(command).display().to_string())
                }
                (command, _) => command,
            };
            Some(Transport::Stdio(StdioSpec {
                command: command?,
                args: args.into_iter().collect::<Option<_>>()?,
                env: env_vars.into_iter().collect::<Option<_>>()?,
                cwd: cwd?,
            }))
        }
        (None, Some(url)) => {
            let span = url.span();
            for key in ["args", "env", "cwd"] {
                if let Some(value) = table.get(key) {
                    problems.add(
                        value.span(),
                        format!(
                            "server `{}`: `{key}` only applies to a server with `command`",
                            name.get_ref()
                        ),
                    );
                }
            }
            let url = expanded(Some(url), "url", problems);
            if let Some(url) = &url
                && !(url.starts_with("http://") || url.starts_with("https://"))
            {
                problems.add_with_hint(
                    span,
                    format!(
                        "server `{}`: `url` must start with `http://` or `https://`",
                        name.get_ref()
                    ),
                    Some("a Streamable HTTP endpoint usually ends in `/mcp`"),
                );
            }
            let headers: Vec<Option<(String, String)>> = headers
                .into_iter()
                .map(|(key, value)| {
                    let what = format!("headers.{}", key.get_ref());
                    expanded(Some(value), &what, problems).map(|value| (key.into_inner(), value))
                })
                .collect();
            let spec = HttpSpec {
                url: url?,
                headers: headers.into_iter().collect::<Option<_>>()?,
            };
            Some(if legacy_sse {
                Transport::Sse(spec)
            } else {
                Transport::StreamableHttp(spec)
            })
        }
        (Some(command), Some(_)) => {
            problems.add_with_hint(
                command.span(),
                format!("server `{}` has both `command` and `url`", name.get_ref()),
                Some("a server is either a local process (`command`) or a remote one (`url`)"),
            );
            None
        }
        (None, None) => {
            problems.add_with_hint(
                name.span(),
                format!("server `{}` has neither `command` nor `url`", name.get_ref()),
                Some("add `command = \"...\"` for a local process or `url = \"https://...\"` for a remote server"),
            );
            None
        }
    };
    table.finish(problems);
    Some(ServerSpec {
        name: server_name?,
        transport: transport?,
        enabled,
        prefix,
        startup_timeout,
        call_timeout,
        tools,
    })
}

fn read_http(
    mut table: Table<'_, '_>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> HttpSettings {
    let defaults = HttpSettings::default();
    let mut tokens = Vec::new();
    for token in table.strings("tokens", problems).unwrap_or_default() {
        match expand(token.get_ref(), env) {
            Ok(value) if value.len() >= 16 => tokens.push(value),
            Ok(_) => problems.add_with_hint(
                token.span(),
                "`http.tokens`: a token must be at least 16 characters",
                Some("generate one with `openssl rand -hex 32`"),
            ),
            Err(error) => problems.add_with_hint(
                token.span(),
                format!("`http.tokens`: {error}"),
                Some("set it in the environment conductor starts in"),
            ),
        }
    }
    let strings =
        |table: &mut Table<'_, '_>, key: &'static str, problems: &mut Problems| -> Vec<String> {
            table
                .strings(key, problems)
                .unwrap_or_default()
                .into_iter()
                .map(Spanned::into_inner)
                .collect()
        };
    let allowed_hosts = strings(&mut table, "allowed_hosts", problems);
    let allowed_origins = strings(&mut table, "allowed_origins", problems);
    let count = |table: &mut Table<'_, '_>,
                 key: &'static str,
                 default: usize,
                 problems: &mut Problems|
     -> usize {
        match table.get(key).map(|value| (value.span(), value.get_ref())) {
            None => default,
            Some((_, DeValue::Integer(integer)))
                if integer.as_str().parse::<usize>().is_ok_and(|n| n > 0) =>
            {
                integer.as_str().parse().unwrap_or(default)
            }
            Some((span, other)) => {
                wrong_type(
                    span,
                    &format!("http.{key}"),
                    "a positive integer",
                    other,
                    problems,
                );
                default
            }
        }
    };
    let max_body_bytes = count(
        &mut table,
        "max_body_bytes",
        defaults.max_body_bytes,
        problems,
    );
    let max_sessions = count(&mut table, "max_sessions", defaults.max_sessions, problems);
    let session_idle =
        read_duration(&mut table, "session_idle", problems).unwrap_or(defaults.session_idle);
    table.finish(problems);
    HttpSettings {
        tokens,
        allowed_hosts,
        allowed_origins,
        max_body_bytes,
        max_sessions,
        session_idle,
    }
}

/// The keys of `[workflows.<name>]` that belong to the workflow itself.
pub const WORKFLOW_BODY_KEYS: [&str; 5] =
    ["steps", "output", "return", "timeout_ms", "max_concurrency"];

fn read_workflow(
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

fn check_server_name(
    name: &Spanned<String>,
    separator: &str,
    problems: &mut Problems,
) -> Option<ServerName> {
    let text = name.get_ref();
    if !is_valid_public_name(text) {
        problems.add_with_hint(
            name.span(),
            format!("server name `{text}` is not allowed"),
            Some("use 1 to 64 letters, digits, `_` or `-`"),
        );
        return None;
    }
    if text == "runs" || text == "workflow" {
        problems.add_with_hint(
            name.span(),
            format!("server name `{text}` is reserved: conductor uses it for workflows"),
            Some("give this server another name"),
        );
        return None;
    }
    if text.contains(separator) {
        problems.add_with_hint(
            name.span(),
            format!("server name `{text}` contains the separator `{separator}`"),
            Some("tool names are `<server><separator><tool>`, so the server part must not contain the separator; rename the server or set `[conductor] separator`"),
        );
        return None;
    }
    Some(ServerName(text.clone()))
}

fn read_prefix(table: &mut Table<'_, '_>, separator: &str, problems: &mut Problems) -> Prefix {
    let path = format!("{}.prefix", table.path());
    let Some(value) = table.get("prefix") else {
        return Prefix::ServerName;
    };
    match value.get_ref() {
        DeValue::Boolean(true) => Prefix::ServerName,
        DeValue::Boolean(false) => Prefix::None,
        DeValue::String(text) if text.is_empty() => Prefix::None,
        DeValue::String(text) if !is_valid_public_name(text) || text.contains(separator) => {
            problems.add_with_hint(
                value.span(),
                format!("prefix `{text}` is not allowed"),
                Some(format!(
                    "use letters, digits, `_` or `-`, without the separator `{separator}`; or `prefix = false` for no prefix"
                )),
            );
            Prefix::ServerName
        }
        DeValue::String(text) => Prefix::Custom(text.to_string()),
        other => {
            wrong_type(value.span(), &path, "a string or `false`", other, problems);
            Prefix::ServerName
        }
    }
}

fn read_tool_rules(mut table: Table<'_, '_>, problems: &mut Problems) -> ToolRules {
    let allow = table
        .strings("allow", problems)
        .map(|globs| compile_globs(globs, problems));
    let deny = table
        .strings("deny", problems)
        .map(|globs| compile_globs(globs, problems));
    let rename = table
        .string_map("rename", problems)
        .into_iter()
        .filter(|(_, new_name)| {
            let valid = is_valid_public_name(new_name.get_ref());
            if !valid {
                problems.add_with_hint(
                    new_name.span(),
                    format!("`{}` is not a valid tool name", new_name.get_ref()),
                    Some("use 1 to 64 letters, digits, `_` or `-`"),
                );
            }
            valid
        })
        .map(|(old, new)| (old.into_inner(), new.into_inner()))
        .collect();
    let descriptions = table
        .string_map("descriptions", problems)
        .into_iter()
        .map(|(tool, text)| (tool.into_inner(), text.into_inner()))
        .collect();
    let mut annotations = HashMap::new();
    if let Some(overrides) = table.table("annotations", problems) {
        for (tool, value) in overrides.entries() {
            let path = format!("{}.{}", overrides.path(), tool.get_ref());
            let Some(mut hints) = as_table(value, path, problems) else {
                continue;
            };
            let hint = AnnotationOverride {
                read_only: hints.bool("read_only", problems),
                destructive: hints.bool("destructive", problems),
                idempotent: hints.bool("idempotent", problems),
                open_world: hints.bool("open_world", problems),
            };
            hints.finish(problems);
            annotations.insert(tool.into_inner(), hint);
        }
    }
    table.finish(problems);
    ToolRules {
        allow,
        deny,
        rename,
        descriptions,
        annotations,
    }
}

fn compile_globs(globs: Vec<Spanned<String>>, problems: &mut Problems) -> GlobSet {
    let mut builder = GlobSetBuilder::new();
    for glob in globs {
        match Glob::new(glob.get_ref()) {
            Ok(compiled) => {
                builder.add(compiled);
            }
            Err(error) => problems.add(
                glob.span(),
                format!("invalid glob `{}`: {}", glob.get_ref(), error.kind()),
            ),
        }
    }
    builder.build().unwrap_or_else(|_| GlobSet::empty())
}

fn read_duration(
    table: &mut Table<'_, '_>,
    key: &'static str,
    problems: &mut Problems,
) -> Option<Duration> {
    let text = table.string(key, problems)?;
    match parse_duration(text.get_ref()) {
        Some(duration) => Some(duration),
        None => {
            problems.add_with_hint(
                text.span(),
                format!(
                    "`{}.{key}`: `{}` is not a duration",
                    table.path(),
                    text.get_ref()
                ),
                Some("write a number and a unit: `500ms`, `30s`, `2m` or `1h`"),
            );
            None
        }
    }
}

/// Parse `500ms`, `30s`, `2m`, `1h` (also with a fraction, like `1.5s`). Zero is not a duration.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    (seconds > 0.0 && seconds.is_finite()).then(|| Duration::from_secs_f64(seconds))
}

/// Shows a duration the way the config writes it.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1000 || !millis.is_multiple_of(1000) {
        format!("{millis}ms")
    } else {
        format!("{}s", duration.as_secs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("30"), None);
        assert_eq!(parse_duration("3 days"), None);
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_micros(300)), "0ms");
    }

    #[test]
    fn tool_rules_allow_then_deny() {
        let mut problems = Problems::new("");
        let rules = ToolRules {
            allow: Some(compile_globs(
                vec![Spanned::new(0..0, "read_*".into())],
                &mut problems,
            )),
            deny: Some(compile_globs(
                vec![Spanned::new(0..0, "*_secret".into())],
                &mut problems,
            )),
            ..ToolRules::default()
        };
        assert!(rules.offers("read_file"));
        assert!(!rules.offers("read_secret"));
        assert!(!rules.offers("write_file"));
        assert!(ToolRules::default().offers("anything"));
    }
}
