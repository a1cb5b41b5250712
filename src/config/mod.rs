//! `servers.toml`: read the file, check every key, and produce typed values that cannot be wrong.
//!
//! Nothing here knows MCP. The rest of the crate receives a [`Config`] whose servers have valid
//! names, resolved environment variables, parsed durations and compiled globs.

mod diagnostic;
mod expand;
mod http;
mod reader;
mod server;
mod workflows;

pub use workflows::WORKFLOW_BODY_KEYS;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use globset::GlobSet;
use toml::de::DeTable;

use diagnostic::Problems;
pub use diagnostic::{ConfigError, Problem, did_you_mean};
pub use expand::{ExpandError, expand};
use reader::Table;

/// The separator between a server's prefix and a tool or prompt name, unless configured.
pub const DEFAULT_SEPARATOR: &str = "__";
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_KEEP_RUNS: Duration = Duration::from_secs(24 * 3600);
/// The largest message read from a stdio server or a stdio client (16 MiB).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// How long a client's first lists wait for servers still starting.
pub const DEFAULT_LIST_WAIT: Duration = Duration::from_secs(3);
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
    /// While servers are starting, how long after conductor starts a list waits for them;
    /// later lists, and those after every server has started, answer at once.
    pub list_wait: Duration,
    /// The largest message read from a stdio client, in bytes.
    pub max_message_bytes: usize,
    /// Every server in file order, enabled or not.
    pub servers: Vec<ServerSpec>,
    /// Saved workflows, offered as tools `workflow__<name>`, in file order.
    pub workflows: Vec<WorkflowSpec>,
    /// How `conductor serve --http` serves.
    pub http: HttpSettings,
}

/// `[http]`: serving over HTTP.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// `input_schema`, compiled by the check at start-up, or else when the workflow is first
    /// called (a config applied by a reload is not checked).
    pub input_validator: crate::schema::CompiledSchema,
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
    /// The largest message read from this server (a stdio child), in bytes.
    pub max_message_bytes: usize,
    /// Consecutive transient failures that open the server's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open circuit fails calls at once before it lets a trial through.
    pub breaker_cool_down: Duration,
    /// The call timeout starts again whenever the server reports progress on the call.
    pub timeout_resets_on_progress: bool,
    /// With `timeout_resets_on_progress`, the most a call may take however much progress it
    /// reports.
    pub max_call_time: Option<Duration>,
    /// A server whose tools answer in this one's place while it is down or its circuit is open.
    pub fallback: Option<ServerName>,
    /// How conductor opens its session with the server.
    pub handshake: Handshake,
    pub supervision: Supervision,
    pub tools: ToolRules,
    /// The roots a shared server is given when it asks (`roots`, as URIs); a client's own
    /// roots reach only its session's children, never a server other clients share.
    pub roots: Vec<String>,
}

impl ServerSpec {
    /// Whether going from `self` to `new` needs the server's processes or connections replaced;
    /// other changes (names, timeouts, rules) apply to the running server.
    pub fn needs_restart(&self, new: &ServerSpec) -> bool {
        self.transport != new.transport
            || self.enabled != new.enabled
            || self.handshake != new.handshake
            || self.supervision.start != new.supervision.start
            || self.supervision.isolation != new.supervision.isolation
            || self.supervision.replicas != new.supervision.replicas
            || self.roots != new.roots
    }

    /// The timeout of one call to the tool `original`, unless a workflow step sets its own.
    pub fn timeout_for(&self, original: &str) -> Duration {
        self.tools
            .timeouts
            .get(original)
            .copied()
            .unwrap_or(self.call_timeout)
    }
}

/// How conductor opens its session with a server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Handshake {
    /// `initialize`, as every protocol version up to 2025-11-25 does.
    #[default]
    Initialize,
    /// `server/discover`, then self-contained requests: protocol 2026-07-28 only.
    Discover,
    /// `server/discover`, falling back to `initialize` when the server does not know it. A
    /// server that crashes on an unknown first request fails here, hence not the default.
    Auto,
}

/// How a server's processes are started, kept alive and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Supervision {
    pub start: StartMode,
    pub isolation: Isolation,
    /// How many children of a stdio server run side by side; each call goes to the least busy.
    pub replicas: usize,
    /// Restarts in a row (each one failing, or crashing before `stable_after`) before the
    /// server is given up as failed. Remote servers are reconnected without limit.
    pub max_restarts: u32,
    /// The wait before the first restart or reconnection; it doubles each time, up to
    /// [`MAX_RESTART_DELAY`].
    pub restart_delay: Duration,
    /// A child that ran this long before it ended starts its restart count afresh.
    pub stable_after: Duration,
    /// How often a ready server is pinged; `None` turns health checks off.
    pub ping_interval: Option<Duration>,
    /// A ping not answered within this marks the server unhealthy: it is restarted or reconnected.
    pub ping_timeout: Duration,
    /// A lazily started server, or a session's own child, is stopped after this long unused.
    pub idle_timeout: Duration,
    /// How long a stopping child gets after its stdin closes, and again after SIGTERM, before
    /// it is killed.
    pub stop_grace: Duration,
}

/// The longest wait between two restarts or reconnections of a server.
pub const MAX_RESTART_DELAY: Duration = Duration::from_secs(30);

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            start: StartMode::Eager,
            isolation: Isolation::Shared,
            replicas: 1,
            max_restarts: 10,
            restart_delay: Duration::from_millis(500),
            stable_after: Duration::from_secs(60),
            ping_interval: Some(Duration::from_secs(30)),
            ping_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(600),
            stop_grace: Duration::from_secs(2),
        }
    }
}

/// When a server is started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartMode {
    /// With conductor.
    Eager,
    /// On its first call (it runs once at startup to list what it offers), and stopped again
    /// after `idle_timeout` unused.
    Lazy,
}

/// Who shares a stdio server's children.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Every client session uses the same children.
    Shared,
    /// Each client session gets its own child, stopped when the session ends or idles.
    Session,
}

/// How conductor reaches a downstream.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioSpec {
    /// A program name looked up on `PATH`, or a path (a relative one is resolved against `cwd`).
    pub command: String,
    pub args: Vec<String>,
    /// Set in the child's environment, after `${VAR}` expansion, over the safe set
    /// (`downstream::SAFE_ENV`) and what `inherit_env` names.
    pub env: Vec<(String, String)>,
    /// Variables of conductor's own environment the child may see, by name. Nothing else of
    /// conductor's environment reaches a child: it may hold other servers' secrets.
    pub inherit_env: Vec<String>,
    /// The folder it starts in: `cwd` resolved against the config's folder, or that folder.
    pub cwd: PathBuf,
}

/// A remote server speaking Streamable HTTP or HTTP+SSE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpSpec {
    /// Where it is; with several, each is tried in turn when connecting (failover).
    pub urls: Vec<String>,
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
    /// Original tool name to its own call timeout, in place of the server's.
    pub timeouts: HashMap<String, Duration>,
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

    /// Whether `new` serves HTTP differently (which takes a restart).
    pub fn http_changed(&self, new: &Config) -> bool {
        self.http != new.http
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
    list_wait: Duration,
    max_message_bytes: usize,
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
            list_wait: DEFAULT_LIST_WAIT,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
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
            .filter_map(|(name, value)| {
                server::read_server(name, value, &defaults, &folder, env, problems)
            })
            .collect(),
        None => Vec::new(),
    };
    check_fallbacks(&servers, document, problems);
    let workflows = match root.table("workflows", problems) {
        Some(table) => table
            .entries()
            .filter_map(|(name, value)| workflows::read_workflow(name, value, problems))
            .collect(),
        None => Vec::new(),
    };
    let mut http = root
        .table("http", problems)
        .map(|table| http::read_http(table, env, problems))
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
        list_wait: defaults.list_wait,
        max_message_bytes: defaults.max_message_bytes,
        servers,
        workflows,
        http,
    })
}

/// Each `fallback` names another configured server.
fn check_fallbacks(servers: &[ServerSpec], document: &DeTable<'_>, problems: &mut Problems) {
    for server in servers {
        let Some(fallback) = &server.fallback else {
            continue;
        };
        if servers.iter().any(|other| &other.name == fallback) {
            continue;
        }
        let span = document
            .get("servers")
            .and_then(|servers| servers.get_ref().as_table())
            .and_then(|servers| servers.get(server.name.as_str()))
            .and_then(|table| table.get_ref().as_table())
            .and_then(|table| table.get("fallback"))
            .map_or(0..0, |value| value.span());
        let names = servers.iter().map(|other| other.name.as_str());
        problems.add_with_hint(
            span,
            format!(
                "server `{}`: `fallback` names `{fallback}`, which is not a configured server",
                server.name
            ),
            did_you_mean(fallback.as_str(), names).map(|name| format!("did you mean `{name}`?")),
        );
    }
}

fn read_defaults(mut table: Table<'_, '_>, problems: &mut Problems) -> Defaults {
    let separator = match table.string("separator", problems) {
        Some(separator) if is_valid_separator(separator.get_ref()) => separator.into_inner(),
        Some(separator) => {
            problems.add_with_hint(
                separator.span(),
                format!("separator `{}` is not allowed", separator.get_ref()),
                Some("use one or more of letters, digits, `_` and `-`, the characters hosts accept in a tool's name; the default is `__`"),
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
    let list_wait = read_duration(&mut table, "list_wait", problems).unwrap_or(DEFAULT_LIST_WAIT);
    let max_message_bytes = read_message_size(&mut table, DEFAULT_MAX_MESSAGE_BYTES, problems);
    table.finish(problems);
    Defaults {
        separator,
        startup_timeout,
        call_timeout,
        keep_runs,
        list_wait,
        max_message_bytes,
    }
}

/// `max_message_bytes`: at least 1 KiB, at most 1 GiB.
fn read_message_size(table: &mut Table<'_, '_>, default: usize, problems: &mut Problems) -> usize {
    const LEAST: u64 = 1024;
    const MOST: u64 = 1024 * 1024 * 1024;
    let span = table.get("max_message_bytes").map(|value| value.span());
    match (table.count("max_message_bytes", problems), span) {
        (Some(bytes), _) if (LEAST..=MOST).contains(&bytes) => bytes as usize,
        (Some(_), Some(span)) => {
            problems.add_with_hint(
                span,
                format!(
                    "`{}` must be between 1024 and 1073741824",
                    table.child_path("max_message_bytes")
                ),
                Some("the default is 16777216 (16 MiB)"),
            );
            default
        }
        _ => default,
    }
}

/// A separator hosts accept in a tool's name (`.` they do not: it would become `_`).
fn is_valid_separator(separator: &str) -> bool {
    !separator.is_empty()
        && separator
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

/// Whether `name` may be offered to clients: `^[a-zA-Z0-9_-]{1,64}$`, what Claude and other
/// hosts accept.
pub fn is_valid_public_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
}

fn read_duration(
    table: &mut Table<'_, '_>,
    key: &'static str,
    problems: &mut Problems,
) -> Option<Duration> {
    let text = table.string(key, problems)?;
    duration_of(text, &format!("{}.{key}", table.path()), problems)
}

/// The duration `text` (at `path`, for the message) gives, or a problem saying it gives none.
fn duration_of(
    text: toml::Spanned<String>,
    path: &str,
    problems: &mut Problems,
) -> Option<Duration> {
    match parse_duration(text.get_ref()) {
        Some(duration) if duration > MAX_DURATION => {
            problems.add_with_hint(
                text.span(),
                format!(
                    "`{path}`: `{}` is longer than conductor waits for anything",
                    text.get_ref()
                ),
                Some("write at most a year: `8760h`"),
            );
            None
        }
        Some(duration) => Some(duration),
        None => {
            problems.add_with_hint(
                text.span(),
                format!("`{path}`: `{}` is not a duration", text.get_ref()),
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
    if seconds.is_nan() || seconds <= 0.0 {
        return None;
    }
    // A number too large for a `Duration` saturates (and is refused as too long), never a
    // panic.
    Some(Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX))
        .filter(|duration| !duration.is_zero())
}

/// The longest duration a config may give: waits are added to the clock, and a year is
/// beyond any timeout, interval or delay anyone means.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

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
        // Too large for a `Duration`: the largest, refused as too long, never a panic.
        assert_eq!(
            parse_duration("100000000000000000000h"),
            Some(Duration::MAX)
        );
        assert_eq!(parse_duration("1e400s"), None);
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_micros(300)), "0ms");
    }
}
