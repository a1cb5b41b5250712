//! The `conductor` commands: serve, list the catalog, call one tool, check the config.
//!
//! This is the program's front end: it is the one module besides `main` that uses `anyhow`, and
//! the only one that writes to stdout (outside `serve`, where stdout is the protocol).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ContentBlock, JsonObject, ServerResult, Tool,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::catalog::ToolEntry;
use crate::config::{Config, format_duration};
use crate::orchestrate::execute::{ProgressSink, ProgressUpdate};
use crate::orchestrate::report::RunStatus;
use crate::orchestrate::{self, Orchestrator, Runs, saved};
use crate::registry::{Registry, Status};
use crate::router::{Caller, Router, ToolCall};
use crate::server::{ConductorServer, own_tools, run_workflow_call};

/// One MCP server in front of every MCP server you use.
#[derive(Debug, Parser)]
#[command(name = "conductor", version, about)]
pub struct Cli {
    /// The config file listing the downstream servers.
    #[arg(
        long,
        short,
        global = true,
        env = "CONDUCTOR_CONFIG",
        default_value = "servers.toml"
    )]
    config: PathBuf,
    /// Log filter for stderr, such as `debug` or `mcp_conductor=debug` (default: `info` when
    /// serving, with rmcp's own at `warn`, and `warn` otherwise; `RUST_LOG` works too).
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve every downstream as one MCP server: over stdio (add this to Claude Desktop), or
    /// over HTTP with `--http`.
    Serve {
        /// Serve Streamable HTTP at `http://ADDR/mcp` instead of stdio, e.g. `127.0.0.1:8080`.
        #[arg(long, value_name = "ADDR")]
        http: Option<std::net::SocketAddr>,
        /// Threads for conductor's own work (default: one over stdio, which serves one
        /// client; over HTTP half the cores, at least one, leaving the rest to the servers
        /// conductor starts).
        #[arg(long, env = "CONDUCTOR_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
        threads: Option<u16>,
    },
    /// List the unified catalog of tools.
    Tools {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only this server's tools.
        #[arg(long)]
        server: Option<String>,
    },
    /// Call one tool by its public name and print the result.
    Call {
        /// The tool's public name, such as `fs__read_file`.
        name: String,
        /// The arguments, as a JSON object.
        #[arg(default_value = "{}")]
        arguments: String,
        /// Print the whole result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check the config, connect to every server and show how each one is doing.
    Check,
    /// Write the servers of Claude Desktop, Cursor, VS Code or Claude Code as a `servers.toml`
    /// (to stdout, or to `--output`), saying what does not carry over.
    Import {
        /// The host's file (`claude_desktop_config.json`, `mcp.json`, `.mcp.json`,
        /// `~/.claude.json`); without it, the host's usual place (`--from`).
        file: Option<PathBuf>,
        /// Read this host's usual file.
        #[arg(long, value_enum)]
        from: Option<crate::import::Host>,
        /// Write the config here instead of to stdout (an existing file is kept unless
        /// `--force`).
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Overwrite `--output` if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Run a workflow, from a JSON or TOML file or saved in the config, and print its result.
    Run {
        /// A workflow file (`.json` or `.toml`), or the name of a workflow saved in the config.
        workflow: String,
        /// An input, as `name=value` (the value is read as JSON when it is JSON, else as text).
        #[arg(long = "input", short = 'i', value_name = "NAME=VALUE")]
        inputs: Vec<String>,
        /// `validate` to only check it, `preview` to run only read-only steps.
        #[arg(long)]
        mode: Option<String>,
        /// Print the whole report as JSON.
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    /// How many threads the async runtime gets. Conductor's own work per call is small and
    /// the servers it starts are processes of their own: on 2 cores one thread served both
    /// stdio and HTTP faster than two (docs/performance.md), since the client and servers
    /// need the other core. One thread means tokio's single-threaded scheduler.
    pub fn threads(&self) -> usize {
        match &self.command {
            Command::Serve {
                threads: Some(threads),
                ..
            } => usize::from(*threads),
            Command::Serve { http: Some(_), .. } => {
                std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 2).max(1))
            }
            _ => 1,
        }
    }

    pub async fn run(self) -> anyhow::Result<ExitCode> {
        let default_log = if matches!(self.command, Command::Serve { .. }) {
            // rmcp logs each service's start and end at info: a line or more for every
            // request of a 2026-07-28 client over HTTP.
            "info,rmcp=warn"
        } else {
            "warn"
        };
        init_logging(self.log.as_deref(), default_log);
        // Made from another host's file: no config to load first.
        if let Command::Import {
            file,
            from,
            output,
            force,
        } = self.command
        {
            return import(file, from, output, force);
        }
        let config = load_checked(&self.config)?;
        match self.command {
            Command::Serve { http: None, .. } => serve(config).await,
            Command::Serve {
                http: Some(address),
                ..
            } => serve_http(config, address).await,
            Command::Tools { json, server } => {
                with_registry(config, |registry| async move {
                    tools(&registry, json, server.as_deref())
                })
                .await
            }
            Command::Call {
                name,
                arguments,
                json,
            } => with_registry(config, |registry| call(registry, name, arguments, json)).await,
            Command::Check => {
                with_registry(config, |registry| async move { check(&registry) }).await
            }
            Command::Run {
                workflow,
                inputs,
                mode,
                json,
            } => {
                let workflow = load_workflow(&config, &workflow, &inputs, mode.as_deref())?;
                with_registry(config, |registry| run_workflow(registry, workflow, json)).await
            }
            // Answered above, before a config is loaded.
            Command::Import { .. } => Ok(ExitCode::SUCCESS),
        }
    }
}

fn init_logging(filter: Option<&str>, default: &str) {
    let filter = filter
        .map(tracing_subscriber::EnvFilter::new)
        .or_else(|| tracing_subscriber::EnvFilter::try_from_default_env().ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(default));
    // stderr only: in `serve`, stdout carries the protocol.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

/// Start every downstream, run `job`, then stop them all whatever the job's outcome.
async fn with_registry<F, Fut>(config: Config, job: F) -> anyhow::Result<ExitCode>
where
    F: FnOnce(Arc<Registry>) -> Fut,
    Fut: Future<Output = anyhow::Result<ExitCode>>,
{
    let registry = Registry::start(config).await;
    let outcome = job(registry.clone()).await;
    registry.shutdown().await;
    outcome
}

async fn serve(config: Config) -> anyhow::Result<ExitCode> {
    let path = config.path.clone();
    let registry = Registry::launch(config);
    spawn_config_watch(&registry, path);
    let router = Router::new(registry.clone());
    let runs = Arc::new(Runs::new(registry.config().keep_runs));
    let orchestrator = Orchestrator::new(Arc::new(router.clone()), runs);
    let server = ConductorServer::new(&router, &orchestrator);
    tracing::info!(
        tools = registry.catalog().tools().len(),
        "serving over stdio"
    );
    let outcome = match crate::server::serve_stdio(server).await {
        Ok(service) => {
            let stop = service.cancellation_token();
            let waiting = service.waiting();
            tokio::pin!(waiting);
            tokio::select! {
                quit = &mut waiting => quit.map(|_| ()).context("the stdio session failed"),
                () = shutdown_signal() => {
                    // The session keeps serving while requests in flight finish.
                    drain(&registry).await;
                    stop.cancel();
                    let _ = waiting.await;
                    Ok(())
                }
            }
        }
        Err(error) => Err(anyhow::anyhow!(
            "the client did not complete the handshake: {error}"
        )),
    };
    registry.shutdown().await;
    outcome.map(|()| ExitCode::SUCCESS)
}

async fn serve_http(config: Config, address: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    crate::http::check_exposure(address, &config.http)?;
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    let bound = listener
        .local_addr()
        .context("the listener has no address")?;
    let path = config.path.clone();
    let registry = Registry::launch(config);
    spawn_config_watch(&registry, path);
    let router = Router::new(registry.clone());
    let runs = Arc::new(Runs::new(registry.config().keep_runs));
    let orchestrator = Arc::new(Orchestrator::new(Arc::new(router), runs));
    let sessions_end = CancellationToken::new();
    let app = crate::http::app(registry.clone(), orchestrator, bound, sessions_end.clone());
    // Scripts and tests read the address from this line (the port may have been 0).
    tracing::info!(address = %bound, "serving Streamable HTTP at http://{bound}/mcp");
    let draining = registry.clone();
    let outcome = crate::http::serve(listener, app, async move {
        shutdown_signal().await;
        drain(&draining).await;
        sessions_end.cancel();
    })
    .await;
    registry.shutdown().await;
    outcome.context("the HTTP server failed")?;
    Ok(ExitCode::SUCCESS)
}

/// How long shutdown waits for requests in flight before it stops anyway.
const DRAIN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Let the requests in flight finish (up to a deadline), then give their answers a moment to
/// leave before the sessions close.
async fn drain(registry: &Registry) {
    tracing::info!("shutting down: finishing requests in flight");
    if !registry.drained(DRAIN_DEADLINE).await {
        tracing::warn!("requests still in flight after the shutdown deadline; stopping anyway");
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
}

/// How often the config file is looked at for changes while serving.
/// The config at `path`, refused with every problem found, file:line:col first, if it does not
/// load or a saved workflow in it cannot run. Start-up and every reload take this one path, so
/// an edit the watcher applies is one conductor would have started with.
fn load_checked(path: &Path) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    let workflow_problems = saved::check_at_load(&config);
    if !workflow_problems.is_empty() {
        bail!(
            "config `{}` has {} problem{} in its workflows\n{}",
            config.path.display(),
            workflow_problems.len(),
            if workflow_problems.len() == 1 {
                ""
            } else {
                "s"
            },
            workflow_problems.join("\n")
        );
    }
    Ok(config)
}

const CONFIG_POLL: Duration = Duration::from_secs(1);

/// Apply `servers.toml` again whenever its content changes (looked at every second, and at
/// once on SIGHUP). A file with problems is reported, every problem, and the running config
/// stays. Polling the content, rather than watching inotify events, also sees the
/// rename-over-the-old-file that editors do, and costs one small read a second.
fn spawn_config_watch(registry: &Arc<Registry>, path: PathBuf) {
    let registry = Arc::downgrade(registry);
    tokio::spawn(async move {
        let mut seen = std::fs::read(&path).ok();
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup_received = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hangup_received = std::future::pending::<Option<()>>();
            let forced = tokio::select! {
                () = tokio::time::sleep(CONFIG_POLL) => false,
                _ = hangup_received => true,
            };
            let Some(registry) = registry.upgrade() else {
                return;
            };
            let content = match std::fs::read(&path) {
                Ok(content) => content,
                Err(error) => {
                    if seen.is_some() {
                        tracing::warn!(path = %path.display(), error = %error, "cannot read the config; keeping the running one");
                        seen = None;
                    }
                    continue;
                }
            };
            if !forced && seen.as_ref() == Some(&content) {
                continue;
            }
            // An editor that truncates the file before writing it shows it empty for a
            // moment: that is not a config with no servers.
            if content.iter().all(u8::is_ascii_whitespace) {
                if seen
                    .as_ref()
                    .is_some_and(|seen| !seen.iter().all(u8::is_ascii_whitespace))
                {
                    tracing::warn!(path = %path.display(), "the config is empty; keeping the running one (an empty file while serving is taken for a write in progress)");
                }
                seen = Some(content);
                continue;
            }
            seen = Some(content);
            match load_checked(&path) {
                Ok(config) => {
                    tracing::info!(path = %path.display(), "config changed: applying it");
                    registry.reload(config).await;
                    tracing::info!(tools = registry.catalog().tools().len(), "config applied");
                }
                Err(error) => {
                    tracing::error!(
                        "the changed config has problems; keeping the running one:\n{error:#}"
                    );
                }
            }
        }
    });
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = interrupt => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}

fn tools(registry: &Registry, json: bool, server: Option<&str>) -> anyhow::Result<ExitCode> {
    if let Some(server) = server
        && !registry
            .config()
            .servers
            .iter()
            .any(|spec| spec.name.as_str() == server)
    {
        bail!("no server named `{server}` in the config");
    }
    let catalog = registry.catalog();
    let entries: Vec<&ToolEntry> = catalog
        .tools()
        .iter()
        .filter(|entry| server.is_none_or(|server| entry.server.as_str() == server))
        .collect();
    // What a client sees besides the catalog: `orchestrate` and the saved workflows.
    let own: Vec<Tool> = match server {
        Some(_) => Vec::new(),
        None => own_tools(&catalog, &registry.config()).collect(),
    };
    if json {
        let listing: Vec<Value> = entries
            .iter()
            .map(|entry| tool_json(&entry.tool, Some(entry)))
            .chain(own.iter().map(|tool| tool_json(tool, None)))
            .collect();
        return output(&serde_json::to_string_pretty(&listing)?);
    }
    let mut rows = vec![row([
        "NAME",
        "SERVER",
        "TITLE",
        "ANNOTATIONS",
        "ORIGINAL",
        "DESCRIPTION",
    ])];
    rows.extend(
        entries
            .iter()
            .map(|entry| tool_row(&entry.tool, Some(entry))),
    );
    rows.extend(own.iter().map(|tool| tool_row(tool, None)));
    let mut text = table(&rows);
    text.push_str(&format!("{} tools\n", entries.len() + own.len()));
    output(text.trim_end())
}

/// What `conductor tools` shows in the server column for conductor's own tools.
const OWN_SERVER: &str = "(conductor)";

/// A tool as `conductor tools` shows it: a downstream's, with its entry, or one of
/// conductor's own.
fn tool_row(tool: &Tool, entry: Option<&ToolEntry>) -> Vec<String> {
    let (server, original) = match entry {
        // The original is shown only where the public name does not already end with it:
        // shortened or renamed.
        Some(entry) if tool.name.ends_with(entry.original.as_str()) => (entry.server.as_str(), ""),
        Some(entry) => (entry.server.as_str(), entry.original.as_str()),
        None => (OWN_SERVER, ""),
    };
    row([
        &tool.name,
        server,
        tool.title.as_deref().unwrap_or(""),
        &annotation_flags(tool),
        original,
        &one_line(tool.description.as_deref().unwrap_or(""), 70),
    ])
}

/// A tool as `conductor tools --json` lists it: a downstream's, with its entry, or one of
/// conductor's own (no server, no original name).
fn tool_json(tool: &Tool, entry: Option<&ToolEntry>) -> Value {
    json!({
        "name": tool.name,
        "server": entry.map(|entry| entry.server.as_str()),
        "originalName": entry.map(|entry| &entry.original),
        "title": tool.title,
        "description": tool.description,
        "annotations": tool.annotations,
        "inputSchema": tool.input_schema,
        "outputSchema": tool.output_schema,
    })
}

/// Short flags for the tool annotations that matter to a caller.
fn annotation_flags(tool: &rmcp::model::Tool) -> String {
    let Some(annotations) = &tool.annotations else {
        return String::new();
    };
    let flags = [
        (annotations.read_only_hint, "read-only"),
        (annotations.destructive_hint, "destructive"),
        (annotations.idempotent_hint, "idempotent"),
        (annotations.open_world_hint, "open-world"),
    ];
    flags
        .iter()
        .filter(|(hint, _)| *hint == Some(true))
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
}

async fn call(
    registry: Arc<Registry>,
    name: String,
    arguments: String,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let arguments: JsonObject = match serde_json::from_str(&arguments) {
        Ok(Value::Object(object)) => object,
        Ok(other) => bail!(
            "the arguments must be a JSON object, not {}",
            json_kind(&other)
        ),
        Err(error) => bail!("the arguments are not valid JSON: {error}"),
    };
    let config = registry.config();
    let router = Router::new(registry);
    let saved = saved::find(&config, &name);
    let result = if name == orchestrate::TOOL_NAME || saved.is_some() {
        // As a client's call of it is run, through the server's one path for workflows.
        let runs = Arc::new(Runs::new(config.keep_runs));
        let orchestrator = Orchestrator::new(Arc::new(router.clone()), runs);
        let saved = saved.map(|spec| (&config, spec));
        let cancel = CancellationToken::new();
        run_workflow_call(&router, &orchestrator, saved, arguments, None, cancel).await
    } else {
        let params = CallToolRequestParams::new(name).with_arguments(arguments);
        let caller = Caller::detached(CancellationToken::new());
        // The path a client's call takes, retries by the tool's annotations included.
        match crate::server::forward_call(&router, ToolCall::Params(params), &caller)
            .await?
            .into_result()?
        {
            ServerResult::CallToolResult(result) => result,
            _ => bail!("the server answered with something other than a tool result"),
        }
    };
    if json {
        output(&serde_json::to_string_pretty(&result)?)?;
    } else {
        output(&render_result(&result))?;
    }
    Ok(if result.is_error == Some(true) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// A tool result as a person reads it: text as it is, other content summarized, and the
/// structured content when there is no text.
fn render_result(result: &CallToolResult) -> String {
    let mut parts: Vec<String> = result.content.iter().map(render_block).collect();
    let has_text = result.content.iter().any(|block| block.as_text().is_some());
    if !has_text && let Some(structured) = &result.structured_content {
        parts.push(serde_json::to_string_pretty(structured).unwrap_or_default());
    }
    parts.join("\n")
}

fn render_block(block: &ContentBlock) -> String {
    let value = serde_json::to_value(block).unwrap_or(Value::Null);
    let kind = value
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("content");
    let field = |name: &str| value.get(name).and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" => field("text").to_owned(),
        "image" | "audio" => format!(
            "[{kind} {}, {} bytes base64]",
            field("mimeType"),
            field("data").len()
        ),
        "resource_link" => format!("[resource link {}]", field("uri")),
        "resource" => {
            let resource = &value["resource"];
            let uri = resource.get("uri").and_then(Value::as_str).unwrap_or("");
            match resource.get("text").and_then(Value::as_str) {
                Some(text) => format!("[resource {uri}]\n{text}"),
                None => format!("[resource {uri}, binary]"),
            }
        }
        other => format!("[{other}]"),
    }
}

/// The workflow to run: a file, or a saved workflow, with `--input` values as its inputs.
fn load_workflow(
    config: &Config,
    source: &str,
    inputs: &[String],
    mode: Option<&str>,
) -> anyhow::Result<Value> {
    let mut extra = serde_json::Map::new();
    for input in inputs {
        let Some((name, value)) = input.split_once('=') else {
            bail!("`--input {input}` must be `name=value`");
        };
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_owned()));
        extra.insert(name.to_owned(), value);
    }
    let path = std::path::Path::new(source);
    let mut workflow = if path.is_file() {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read `{source}`"))?;
        let parsed: Value = if path.extension().is_some_and(|ext| ext == "toml") {
            toml::from_str(&text)
                .map_err(|error| anyhow::anyhow!("`{source}` is not valid TOML: {error}"))?
        } else {
            serde_json::from_str(&text)
                .map_err(|error| anyhow::anyhow!("`{source}` is not valid JSON: {error}"))?
        };
        if let Some(Value::Object(existing)) = parsed.get("inputs") {
            let mut merged = existing.clone();
            merged.extend(extra);
            extra = merged;
        }
        parsed
    } else if let Some(spec) = saved::find(
        config,
        &format!(
            "{}{}",
            saved::PREFIX,
            source.trim_start_matches(saved::PREFIX)
        ),
    ) {
        match saved::workflow_for(spec, extra.clone()) {
            Ok(workflow) => {
                extra = workflow
                    .get("inputs")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                workflow
            }
            Err(problems) => {
                let lines: Vec<String> = problems
                    .iter()
                    .map(|p| format!("{}: {}", p.path, p.message))
                    .collect();
                bail!(
                    "the inputs of workflow `{source}` are not valid:\n{}",
                    lines.join("\n")
                );
            }
        }
    } else {
        let saved: Vec<&str> = config
            .workflows
            .iter()
            .map(|spec| spec.name.as_str())
            .collect();
        bail!(
            "`{source}` is neither a file nor a saved workflow{}",
            if saved.is_empty() {
                String::new()
            } else {
                format!(" (saved: {})", saved.join(", "))
            }
        );
    };
    if let Value::Object(map) = &mut workflow {
        if !extra.is_empty() {
            map.insert("inputs".to_owned(), Value::Object(extra));
        }
        if let Some(mode) = mode {
            map.insert("mode".to_owned(), Value::String(mode.to_owned()));
        }
    }
    Ok(workflow)
}

async fn run_workflow(
    registry: Arc<Registry>,
    workflow: Value,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let runs = Arc::new(Runs::new(registry.config().keep_runs));
    let orchestrator = Orchestrator::new(Arc::new(Router::new(registry)), runs);
    // Live progress for the person watching, on stderr so stdout stays the result.
    let progress: ProgressSink = Arc::new(|update: ProgressUpdate| {
        let mut stderr = std::io::stderr().lock();
        let _ = writeln!(
            stderr,
            "[{}/{}] {}",
            update.settled, update.total, update.message
        );
    });
    let cancel = CancellationToken::new();
    let report = tokio::select! {
        report = orchestrator.run(workflow, None, Some(progress), cancel.clone()) => report,
        () = shutdown_signal() => {
            cancel.cancel();
            bail!("interrupted: the run was cancelled");
        }
    };
    if json {
        output(&serde_json::to_string_pretty(&report)?)?;
    } else {
        output(&report.summary())?;
    }
    Ok(match report.status {
        RunStatus::Succeeded | RunStatus::Valid | RunStatus::Previewed => ExitCode::SUCCESS,
        RunStatus::Partial => ExitCode::from(2),
        RunStatus::Failed | RunStatus::Invalid | RunStatus::Cancelled => ExitCode::FAILURE,
    })
}

fn check(registry: &Registry) -> anyhow::Result<ExitCode> {
    let mut rows = vec![row([
        "SERVER",
        "TRANSPORT",
        "STATUS",
        "TOOLS",
        "PROMPTS",
        "RESOURCES",
        "STARTUP",
        "DETAIL",
    ])];
    let mut failed = 0;
    // Each failure's whole cause (the table's column is cut short).
    let mut why = Vec::new();
    for state in registry.states() {
        let listing = &state.listing;
        let serves = state.status.serves();
        let count = |n: usize| {
            if serves {
                n.to_string()
            } else {
                "-".to_owned()
            }
        };
        // Not up once start-up is over: given up, or to be tried again by a serving
        // conductor (a check does not wait for that).
        let (label, detail) = match &state.status {
            Status::Restarting { error, .. } | Status::Reconnecting { error, .. } => {
                ("failed", Some(error.clone()))
            }
            status => (status.label(), status.detail()),
        };
        if label.starts_with("failed")
            && let Some(detail) = &detail
        {
            failed += 1;
            why.push(format!("{}: {detail}", state.spec.name));
        }
        let error = detail
            .map(|detail| one_line(&detail, 100))
            .unwrap_or_default();
        rows.push(row([
            state.spec.name.as_str(),
            state.spec.transport.kind(),
            label,
            &count(listing.tools.len()),
            &count(listing.prompts.len()),
            &count(listing.resources.len() + listing.templates.len()),
            &state
                .startup
                .map(format_duration)
                .unwrap_or_else(|| "-".to_owned()),
            &error,
        ]));
    }
    let mut text = table(&rows);
    for line in &why {
        text.push_str(&format!("failed {line}\n"));
    }
    let catalog = registry.catalog();
    for warning in &catalog.warnings {
        text.push_str(&format!("warning: {warning}\n"));
    }
    text.push_str(&format!(
        "{} servers, {failed} failed; {} tools, {} prompts, {} resources, {} templates offered",
        registry.config().servers.len(),
        catalog.tools().len(),
        catalog.prompts().len(),
        catalog.resources().len(),
        catalog.templates().len(),
    ));
    output(&text)?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `conductor import`: the file given, or the host's first usual place that exists.
fn import(
    file: Option<PathBuf>,
    from: Option<crate::import::Host>,
    output: Option<PathBuf>,
    force: bool,
) -> anyhow::Result<ExitCode> {
    let file = match (file, from) {
        (Some(file), _) => file,
        (None, Some(host)) => {
            let places = host.places();
            places
                .iter()
                .find(|place| place.is_file())
                .cloned()
                .ok_or_else(|| {
                    let looked: Vec<String> = places
                        .iter()
                        .map(|place| format!("`{}`", place.display()))
                        .collect();
                    anyhow::anyhow!(
                        "no server list of that host found; looked at {}; give the file's path",
                        looked.join(", ")
                    )
                })?
        }
        (None, None) => bail!(
            "give the host's file, or `--from claude-desktop|cursor|vscode|claude-code` to read its usual place"
        ),
    };
    let imported = crate::import::import(&file)?;
    // What it made must load as conductor's config, whichever `${VAR}` it reads is set; those
    // not set now are named.
    let check_path = output
        .clone()
        .unwrap_or_else(|| PathBuf::from("servers.toml"));
    let unset = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let lookup = |name: &str| match std::env::var(name) {
        Ok(value) => Some(value),
        Err(_) if name == crate::config::TOKEN_VARIABLE => None,
        Err(_) => {
            if let Ok(mut unset) = unset.lock() {
                unset.insert(name.to_owned());
            }
            Some("https://placeholder.invalid".to_owned())
        }
    };
    if let Err(error) = Config::parse(&imported.toml, &check_path, lookup) {
        bail!(
            "the imported config does not load: {error}\n{}",
            imported.toml
        );
    }
    let mut notes = imported.notes.clone();
    if let Ok(unset) = unset.into_inner()
        && !unset.is_empty()
    {
        let names: Vec<String> = unset.iter().map(|name| format!("`{name}`")).collect();
        notes.push(format!(
            "the config reads {} from conductor's environment, not set now: set {} before `conductor serve`",
            names.join(", "),
            if names.len() == 1 { "it" } else { "them" }
        ));
    }
    for note in &notes {
        eprintln!("note: {note}");
    }
    match &output {
        Some(path) => {
            if path.exists() && !force {
                bail!(
                    "`{}` exists; give `--force` to replace it, or another `--output`",
                    path.display()
                );
            }
            std::fs::write(path, &imported.toml)
                .with_context(|| format!("cannot write `{}`", path.display()))?;
            eprintln!(
                "wrote {} server{} from `{}` to `{}`",
                imported.servers,
                if imported.servers == 1 { "" } else { "s" },
                file.display(),
                path.display()
            );
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            write!(stdout, "{}", imported.toml).context("cannot write to stdout")?;
        }
    }
    Ok(if imported.servers == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn row<const N: usize>(cells: [&str; N]) -> Vec<String> {
    cells.iter().map(|cell| (*cell).to_owned()).collect()
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .map(|row| row[column].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(column, cell)| {
                if column + 1 == columns {
                    cell.clone()
                } else {
                    format!("{cell:<width$}", width = widths[column])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The first line of `text`, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    if line.chars().count() > max {
        format!("{}...", line.chars().take(max - 3).collect::<String>())
    } else {
        line.to_owned()
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Write command output to stdout, where people and scripts read it.
fn output(text: &str) -> anyhow::Result<ExitCode> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").context("cannot write to stdout")?;
    Ok(ExitCode::SUCCESS)
}
