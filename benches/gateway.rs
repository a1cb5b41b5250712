//! Conductor against the direct path, side by side in one run: `cargo bench --bench gateway`
//! reproduces `docs/performance.md`; `cargo bench --bench gateway -- --quick` (or
//! `cargo test --bench gateway -- --quick`, as CI does) runs every measurement once, small, as
//! a smoke test. `-- --only NAME` runs one group (`calls`, `http`, `streams`, `catalog`, `startup`,
//! `memory`, `orchestrate`). For profiling, `GATEWAY_CALLS=N` sets the calls per load run and
//! `GATEWAY_WRAP="valgrind --tool=callgrind ..."` runs conductor (over stdio) under a tool;
//! `GATEWAY_CONCURRENCY=1` (or `1,16`) runs the load comparisons at those concurrencies only;
//! `GATEWAY_CONDUCTOR=PATH` measures another build of conductor (a copy of an earlier commit's).
//!
//! Every figure is the median of `REPS` repetitions, each measuring the direct path (this
//! benchmark's client talking to its echo server) and the path through conductor with the
//! same client and the same echo server, one after the other. Calls over stdio are measured
//! twice: with a client that begins with `initialize` (every version before 2026-07-28), and
//! with a 2026-07-28 client, which names its version and capabilities in every request.
//!
//! The binary is also its own echo server: `gateway --echo-server [--tools N]
//! [--init-delay-ms N] [--http]`, a minimal rmcp server whose `echo` tool answers its text;
//! and the floor of any gateway process: `gateway --relay PROGRAM ARGS...` copies bytes between
//! its stdio and a child's, reading nothing.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::print_stdout,
    reason = "a benchmark: it fails loudly, and its report goes to stdout"
)]

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    NumberOrString, PaginatedRequestParams, ProgressNotificationParam, ProgressToken,
    ProtocolVersion, RequestMetaObject, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::{
    ClientLifecycleMode, ClientServiceExt, Peer, RequestContext, RoleClient, RoleServer,
    RunningService,
};
use rmcp::transport::{StreamableHttpClientTransport, TokioChildProcess};
use rmcp::{ErrorData as McpError, ServerHandler, ServiceExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

const CONDUCTOR: &str = env!("CARGO_BIN_EXE_conductor");

type Client = RunningService<RoleClient, ()>;

// ---- the echo server ---------------------------------------------------------------------

#[derive(Clone)]
struct Echo {
    tools: Arc<Vec<Tool>>,
}

impl Echo {
    fn new(extra_tools: usize) -> Self {
        let schema = |value: serde_json::Value| match value {
            serde_json::Value::Object(map) => Arc::new(map),
            _ => unreachable!("a literal object"),
        };
        let echo = Tool::new(
            "echo",
            "Answer `text`.",
            schema(
                json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}),
            ),
        );
        let mut tools = vec![echo];
        tools.extend((0..extra_tools).map(|i| {
            Tool::new(
                format!("tool_{i:05}"),
                "One of many, for catalog sizes.",
                schema(json!({"type": "object", "properties": {"text": {"type": "string"}}})),
            )
        }));
        Echo {
            tools: Arc::new(tools),
        }
    }
}

impl ServerHandler for Echo {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(self.tools.as_ref().clone()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        // A caller that asks for progress gets one report first, as a tool that works a while
        // would send: over Streamable HTTP the answer is then a stream.
        if let Some(token) = context.meta.get_progress_token() {
            let progress = ProgressNotificationParam::new(token, 1.0);
            let _ = context.peer.notify_progress(progress).await;
        }
        let text = request
            .arguments
            .as_ref()
            .and_then(|arguments| arguments.get("text"))
            .and_then(|text| text.as_str())
            .unwrap_or_default()
            .to_owned();
        let mut result = CallToolResult::structured(json!({ "text": text }));
        result.content = vec![ContentBlock::text(text)];
        Ok(CallToolResponse::Complete(result))
    }
}

async fn echo_server(args: &[String]) {
    let value = |flag: &str| {
        args.iter()
            .position(|arg| arg == flag)
            .and_then(|at| args.get(at + 1))
            .and_then(|value| value.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Slow to answer `initialize`, for the startup figure.
    tokio::time::sleep(Duration::from_millis(value("--init-delay-ms"))).await;
    let echo = Echo::new(value("--tools") as usize);
    if args.iter().any(|arg| arg == "--http") {
        use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
        use rmcp::transport::streamable_http_server::{
            StreamableHttpServerConfig, StreamableHttpService,
        };
        let service: StreamableHttpService<Echo, LocalSessionManager> = StreamableHttpService::new(
            move || Ok(echo.clone()),
            Default::default(),
            StreamableHttpServerConfig::default(),
        );
        let router = axum::Router::new().nest_service("/mcp", service);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("http://{}/mcp", listener.local_addr().unwrap());
        axum::serve(listener, router).await.unwrap();
    } else {
        let service = echo.serve(rmcp::transport::stdio()).await.unwrap();
        let _ = service.waiting().await;
    }
}

/// Copy bytes both ways between this process's stdio and a child's, as tokio does it: what
/// one more process in the path costs when it does no work at all.
async fn relay(args: &[String]) {
    let mut child = tokio::process::Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (mut to_child, mut from_child) =
        (child.stdin.take().unwrap(), child.stdout.take().unwrap());
    let (mut stdin, mut stdout) = rmcp::transport::stdio_pipes();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_child, &mut stdout).await;
    });
    let _ = tokio::io::copy(&mut stdin, &mut to_child).await;
    drop(to_child);
    let _ = back.await;
}

// ---- processes and clients ---------------------------------------------------------------

fn me() -> String {
    std::env::current_exe().unwrap().display().to_string()
}

/// A `servers.toml` with `count` echo servers, `echo`, `echo2`..., each run with `args`.
fn config(dir: &Path, name: &str, count: usize, args: &[&str]) -> PathBuf {
    let mut text = String::from("[conductor]\ncall_timeout = \"60s\"\nstartup_timeout = \"60s\"\n");
    let mut all = vec!["--echo-server".to_owned()];
    all.extend(args.iter().map(|arg| (*arg).to_owned()));
    for i in 0..count {
        let server = if i == 0 {
            "echo".to_owned()
        } else {
            format!("echo{}", i + 1)
        };
        text.push_str(&format!(
            "\n[servers.{server}]\ncommand = \"{}\"\nargs = {:?}\nping_interval = \"off\"\n",
            me(),
            all
        ));
    }
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// How a client begins: with `initialize`, as every client before 2026-07-28 does, or with
/// 2026-07-28's `server/discover`, naming its version and capabilities in every request.
#[derive(Debug, Clone, Copy)]
enum Lifecycle {
    Initialize,
    Discover,
}

/// A client of a child process over stdio, and the child's pid.
async fn stdio_client(lifecycle: Lifecycle, program: &str, args: &[&str]) -> (Client, u32) {
    let mut command = tokio::process::Command::new(program);
    command.args(args).env("RUST_LOG", "error");
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = transport.id().unwrap();
    let client = match lifecycle {
        Lifecycle::Initialize => ().serve(transport).await,
        Lifecycle::Discover => {
            let mode = ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            };
            ().serve_with_lifecycle(transport, mode).await
        }
    };
    (client.unwrap(), pid)
}

/// Direct over stdio: the client starts the echo server itself.
async fn direct_stdio(lifecycle: Lifecycle, args: &[&str]) -> (Client, u32) {
    let mut all = vec!["--echo-server"];
    all.extend(args);
    stdio_client(lifecycle, &me(), &all).await
}

/// The command that runs conductor with `args`: with `GATEWAY_WRAP="valgrind
/// --tool=callgrind"` (say), under that command; with `GATEWAY_CONDUCTOR=PATH`, another build
/// of conductor (to compare two commits in one session).
fn conductor_command(args: &[&str]) -> (String, Vec<String>) {
    let mut command: Vec<String> = std::env::var("GATEWAY_WRAP")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    command.push(std::env::var("GATEWAY_CONDUCTOR").unwrap_or_else(|_| CONDUCTOR.to_owned()));
    command.extend(args.iter().map(|arg| (*arg).to_owned()));
    let program = command.remove(0);
    (program, command)
}

/// Through conductor over stdio, in front of the servers in `config`.
async fn conductor_stdio(lifecycle: Lifecycle, config: &Path) -> (Client, u32) {
    let config = config.display().to_string();
    let (program, args) = conductor_command(&["serve", "--config", &config]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stdio_client(lifecycle, &program, &args).await
}

/// Wait up to 30 s for a process to exit on its own (so a profiler it runs under writes its
/// report).
async fn wait_for_exit(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A process serving HTTP, killed when dropped, and its URL.
struct HttpProcess {
    child: tokio::process::Child,
    url: String,
}

/// The echo server over Streamable HTTP: it prints its URL first on stdout.
async fn echo_http(args: &[&str]) -> HttpProcess {
    let mut child = tokio::process::Command::new(me())
        .arg("--echo-server")
        .arg("--http")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = lines.next_line().await.unwrap().unwrap();
    HttpProcess { child, url }
}

/// Conductor over Streamable HTTP: it logs its URL on stderr.
async fn conductor_http(config: &Path) -> HttpProcess {
    let config = config.display().to_string();
    let (program, args) =
        conductor_command(&["serve", "--http", "127.0.0.1:0", "--config", &config]);
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next_line().await.unwrap().expect("conductor serves");
        if let Some(at) = line.find("serving Streamable HTTP at ") {
            let rest = &line[at + "serving Streamable HTTP at ".len()..];
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    HttpProcess { child, url }
}

async fn http_client(url: &str) -> Client {
    ().serve(StreamableHttpClientTransport::from_uri(url.to_owned()))
        .await
        .unwrap()
}

/// A process's resident set now and at its peak, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|line| line.starts_with(name))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kib| kib.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

// ---- measuring -----------------------------------------------------------------------------

/// Latencies and throughput of one load run.
#[derive(Debug, Clone, Copy)]
struct Load {
    p50: Duration,
    p99: Duration,
    per_second: f64,
}

/// `total` calls of `tool` with `{"text": "hello"}`, `concurrency` at a time.
async fn load(peer: &Peer<RoleClient>, tool: &str, concurrency: usize, total: usize) -> Load {
    let arguments = json!({"text": "hello"});
    load_calls(peer, tool, &arguments, false, concurrency, total).await
}

/// `total` calls of `tool` with `arguments`, `concurrency` at a time; with `progress`, each
/// call carries a progress token (so a Streamable HTTP server answers it as an SSE stream).
async fn load_calls(
    peer: &Peer<RoleClient>,
    tool: &str,
    arguments: &serde_json::Value,
    progress: bool,
    concurrency: usize,
    total: usize,
) -> Load {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (peer, next, tool) = (peer.clone(), next.clone(), tool.to_owned());
            let arguments = arguments.as_object().cloned().unwrap();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let number = next.fetch_add(1, Ordering::Relaxed);
                    if number >= total {
                        break;
                    }
                    let mut params =
                        CallToolRequestParams::new(tool.clone()).with_arguments(arguments.clone());
                    if progress {
                        let token = ProgressToken(NumberOrString::Number(number as i64));
                        params.meta = Some(RequestMetaObject::with_progress_token(token));
                    }
                    let sent = Instant::now();
                    let result = peer.call_tool(params).await.unwrap();
                    assert_ne!(result.is_error, Some(true), "{result:?}");
                    latencies.push(sent.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(total);
    for worker in workers {
        latencies.extend(worker.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    Load {
        p50: at(0.50),
        p99: at(0.99),
        per_second: total as f64 / elapsed.as_secs_f64(),
    }
}

/// A process's CPU time so far (user, system), from `/proc`, counted in 10 ms ticks.
fn cpu_time(pid: u32) -> Option<(Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis, from the state (field 3) on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // Linux reports these in USER_HZ, 100 a second on every architecture it runs here on.
    let ticks = 100.0;
    let time = |field: usize| -> Option<Duration> {
        let count: f64 = fields.get(field)?.parse().ok()?;
        Some(Duration::from_secs_f64(count / ticks))
    };
    Some((time(11)?, time(12)?))
}

fn median_by<T: Copy>(samples: &[T], key: impl Fn(&T) -> f64) -> f64 {
    let mut values: Vec<f64> = samples.iter().map(key).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

struct Bench {
    quick: bool,
    reps: usize,
    dir: tempfile::TempDir,
}

impl Bench {
    /// How many calls one load run makes at `concurrency`, over HTTP (slower) or stdio.
    fn calls(&self, concurrency: usize, http: bool) -> usize {
        if let Some(calls) = std::env::var("GATEWAY_CALLS")
            .ok()
            .and_then(|calls| calls.parse().ok())
        {
            return calls;
        }
        match (self.quick, concurrency, http) {
            (true, _, _) => 40,
            (false, 1, _) => 2_000,
            (false, _, false) => 10_000,
            (false, _, true) => 4_000,
        }
    }

    /// The concurrencies a load comparison runs at: 1, 16 and 64, or for profiling only those in
    /// `GATEWAY_CONCURRENCY` (comma-separated).
    fn concurrencies(&self) -> Vec<usize> {
        match std::env::var("GATEWAY_CONCURRENCY") {
            Ok(list) => list
                .split(',')
                .map(|level| level.trim().parse().expect("GATEWAY_CONCURRENCY: numbers"))
                .collect(),
            Err(_) => vec![1, 16, 64],
        }
    }

    /// Direct and through conductor (and, if given, through the bare relay), at concurrency 1,
    /// 16 and 64, `reps` times each.
    async fn compare_calls(
        &self,
        title: &str,
        direct: &Peer<RoleClient>,
        through: &Peer<RoleClient>,
        relay: Option<&Peer<RoleClient>>,
        http: bool,
        cpu_of: &[(&str, u32)],
    ) {
        println!("\n### {title}\n");
        let mut cpu_rows = Vec::new();
        let (relay_head, relay_rule) = match relay {
            Some(_) => (" relay added p50 µs | relay calls/s |", " ---: | ---: |"),
            None => ("", ""),
        };
        println!(
            "| concurrency | direct p50 µs | conductor p50 µs | added p50 µs | direct p99 µs | conductor p99 µs | direct calls/s | conductor calls/s | ratio |{relay_head}"
        );
        println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |{relay_rule}");
        for concurrency in self.concurrencies() {
            let total = self.calls(concurrency, http);
            // Warm every path up: connections, allocators, caches.
            load(direct, "echo", concurrency, total / 10 + 1).await;
            load(through, "echo__echo", concurrency, total / 10 + 1).await;
            if let Some(relay) = relay {
                load(relay, "echo", concurrency, total / 10 + 1).await;
            }
            let (mut direct_runs, mut through_runs, mut relay_runs) =
                (Vec::new(), Vec::new(), Vec::new());
            let cpu_before: Vec<_> = cpu_of.iter().map(|(_, pid)| cpu_time(*pid)).collect();
            for _ in 0..self.reps {
                direct_runs.push(load(direct, "echo", concurrency, total).await);
                through_runs.push(load(through, "echo__echo", concurrency, total).await);
                if let Some(relay) = relay {
                    relay_runs.push(load(relay, "echo", concurrency, total).await);
                }
            }
            let calls = (total * self.reps) as f64;
            let cpu_cells: Vec<String> = cpu_of
                .iter()
                .zip(cpu_before)
                .map(|((_, pid), before)| match (before, cpu_time(*pid)) {
                    (Some(before), Some(after)) => {
                        let per_call = |from: Duration, to: Duration| micros(to - from) / calls;
                        format!(
                            "{:.1} + {:.1}",
                            per_call(before.0, after.0),
                            per_call(before.1, after.1)
                        )
                    }
                    _ => "?".to_owned(),
                })
                .collect();
            cpu_rows.push((concurrency, cpu_cells));
            let p50 = |runs: &[Load]| median_by(runs, |run| micros(run.p50));
            let p99 = |runs: &[Load]| median_by(runs, |run| micros(run.p99));
            let rate = |runs: &[Load]| median_by(runs, |run| run.per_second);
            let relay_cells = if relay_runs.is_empty() {
                String::new()
            } else {
                format!(
                    " {:.0} | {:.0} |",
                    p50(&relay_runs) - p50(&direct_runs),
                    rate(&relay_runs)
                )
            };
            println!(
                "| {concurrency} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x |{relay_cells}",
                p50(&direct_runs),
                p50(&through_runs),
                p50(&through_runs) - p50(&direct_runs),
                p99(&direct_runs),
                p99(&through_runs),
                rate(&direct_runs),
                rate(&through_runs),
                rate(&through_runs) / rate(&direct_runs),
            );
        }
        if !cpu_rows.is_empty() && !cpu_of.is_empty() {
            let names: Vec<&str> = cpu_of.iter().map(|(name, _)| *name).collect();
            println!(
                "\nCPU per call, µs user + sys (all of each process's threads, over the measured runs):\n"
            );
            println!("| concurrency | {} |", names.join(" | "));
            println!("| ---: |{}", " ---: |".repeat(names.len()));
            for (concurrency, cells) in cpu_rows {
                println!("| {concurrency} | {} |", cells.join(" | "));
            }
        }
    }

    /// Once with a client that begins with `initialize`, once with a 2026-07-28 client.
    async fn calls_over_stdio(&self) {
        for (lifecycle, title) in [
            (
                Lifecycle::Initialize,
                "`tools/call`, stdio client to stdio server (direct), through conductor over stdio, and through a bare relay",
            ),
            (
                Lifecycle::Discover,
                "The same with a 2026-07-28 client (`server/discover`, then its version and capabilities in every request)",
            ),
        ] {
            let (direct, _) = direct_stdio(lifecycle, &[]).await;
            let config = config(self.dir.path(), "one", 1, &[]);
            let (through, pid) = conductor_stdio(lifecycle, &config).await;
            let echo = me();
            let relay_args = ["--relay", &echo, "--echo-server"];
            let (relay, relay_pid) = stdio_client(lifecycle, &me(), &relay_args).await;
            self.compare_calls(
                title,
                direct.peer(),
                through.peer(),
                Some(relay.peer()),
                false,
                &[("conductor", pid), ("bare relay", relay_pid)],
            )
            .await;
            // Close conductor's stdin and let it exit on its own.
            let _ = through.cancel().await;
            wait_for_exit(pid).await;
        }
    }

    async fn calls_over_http(&self) {
        let echo = echo_http(&[]).await;
        let direct = http_client(&echo.url).await;
        let conductor = conductor_http(&config(self.dir.path(), "one", 1, &[])).await;
        let through = http_client(&conductor.url).await;
        self.compare_calls(
            "`tools/call` over Streamable HTTP: the echo server serving HTTP (direct), and conductor serving HTTP in front of it over stdio",
            direct.peer(),
            through.peer(),
            None,
            true,
            &[],
        )
        .await;
        // SIGTERM: conductor drains and exits on its own.
        if let Some(pid) = conductor.child.id() {
            let pid = nix::unistd::Pid::from_raw(pid as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            wait_for_exit(pid.as_raw() as u32).await;
        }
        drop((echo.child, conductor.child));
    }

    /// Calls whose answer comes as a stream of events (over Streamable HTTP, an SSE response):
    /// those with a progress token, to which the echo tool reports progress once, and
    /// `orchestrate`, which reports each step. Against the same call over stdio and answered as
    /// plain JSON, one call at a time.
    async fn streamed_answers(&self) {
        let config = config(self.dir.path(), "streams", 1, &[]);
        let (stdio, stdio_pid) = conductor_stdio(Lifecycle::Initialize, &config).await;
        let echo = echo_http(&[]).await;
        let direct_http = http_client(&echo.url).await;
        let conductor = conductor_http(&config).await;
        let http = http_client(&conductor.url).await;
        let hello = json!({"text": "hello"});
        let two_steps = json!({"steps": [
            {"id": "first", "tool": "echo__echo", "args": {"text": "hello"}},
            {"id": "second", "tool": "echo__echo", "args": {"text": "${{ steps.first.output.text }}"}}
        ]});
        let rows: [(&str, &Peer<RoleClient>, &str, &serde_json::Value, bool); 7] = [
            (
                "echo over HTTP, direct, plain",
                direct_http.peer(),
                "echo",
                &hello,
                false,
            ),
            (
                "echo over HTTP, direct, with progress (an SSE answer)",
                direct_http.peer(),
                "echo",
                &hello,
                true,
            ),
            (
                "conductor over stdio, with progress",
                stdio.peer(),
                "echo__echo",
                &hello,
                true,
            ),
            (
                "conductor over HTTP, plain (a JSON answer)",
                http.peer(),
                "echo__echo",
                &hello,
                false,
            ),
            (
                "conductor over HTTP, with progress (an SSE answer)",
                http.peer(),
                "echo__echo",
                &hello,
                true,
            ),
            (
                "two-step `orchestrate` with a progress token, conductor over stdio",
                stdio.peer(),
                "orchestrate",
                &two_steps,
                true,
            ),
            (
                "two-step `orchestrate` with a progress token, conductor over HTTP (an SSE answer)",
                http.peer(),
                "orchestrate",
                &two_steps,
                true,
            ),
        ];
        let total = if self.quick { 20 } else { 1_000 };
        let mut runs: Vec<Vec<Load>> = vec![Vec::new(); rows.len()];
        for (_, peer, tool, arguments, progress) in &rows {
            load_calls(peer, tool, arguments, *progress, 1, total / 10 + 1).await;
        }
        // Alternating, so a slow minute on this machine falls on every row alike.
        for _ in 0..self.reps {
            for ((_, peer, tool, arguments, progress), runs) in rows.iter().zip(&mut runs) {
                runs.push(load_calls(peer, tool, arguments, *progress, 1, total).await);
            }
        }
        println!("\n### Answers sent as a stream, one call at a time\n");
        println!("| call | p50 µs | p99 µs | calls/s |");
        println!("| --- | ---: | ---: | ---: |");
        for ((label, ..), runs) in rows.iter().zip(&runs) {
            println!(
                "| {label} | {:.0} | {:.0} | {:.0} |",
                median_by(runs, |run| micros(run.p50)),
                median_by(runs, |run| micros(run.p99)),
                median_by(runs, |run| run.per_second),
            );
        }
        let _ = stdio.cancel().await;
        wait_for_exit(stdio_pid).await;
        drop((echo.child, conductor.child));
    }

    async fn catalog(&self) {
        println!("\n### `tools/list`, every page\n");
        println!("| downstream tools | direct ms | conductor ms | ratio |");
        println!("| ---: | ---: | ---: | ---: |");
        for tools in [1_000usize, 10_000] {
            let count = tools.to_string();
            let (direct, _) = direct_stdio(Lifecycle::Initialize, &["--tools", &count]).await;
            let config = config(
                self.dir.path(),
                &format!("tools{tools}"),
                1,
                &["--tools", &count],
            );
            let (through, _) = conductor_stdio(Lifecycle::Initialize, &config).await;
            let iterations = if self.quick { 1 } else { 20_000 / tools.max(1) };
            let time = |client: &Client| {
                let peer = client.peer().clone();
                async move {
                    let started = Instant::now();
                    for _ in 0..iterations {
                        let listed = peer.list_all_tools().await.unwrap();
                        assert!(listed.len() > tools);
                    }
                    started.elapsed() / iterations as u32
                }
            };
            time(&direct).await;
            time(&through).await;
            let (mut direct_runs, mut through_runs) = (Vec::new(), Vec::new());
            for _ in 0..self.reps {
                direct_runs.push(time(&direct).await);
                through_runs.push(time(&through).await);
            }
            let direct_ms = median_by(&direct_runs, |run| millis(*run));
            let through_ms = median_by(&through_runs, |run| millis(*run));
            println!(
                "| {tools} | {direct_ms:.2} | {through_ms:.2} | {:.2}x |",
                through_ms / direct_ms
            );
        }
    }

    async fn startup(&self) {
        let servers = if self.quick { 3 } else { 20 };
        let delay = "200";
        let many = config(
            self.dir.path(),
            "slow-many",
            servers,
            &["--init-delay-ms", delay],
        );
        let one = config(self.dir.path(), "slow-one", 1, &["--init-delay-ms", delay]);
        // Until the client has conductor's answer to `initialize` and every server's tools.
        let ready = |config: PathBuf, expected: usize| async move {
            let started = Instant::now();
            let (client, _) = conductor_stdio(Lifecycle::Initialize, &config).await;
            let listed = client.peer().list_all_tools().await.unwrap();
            assert_eq!(listed.len(), expected + 1, "every echo and orchestrate");
            let elapsed = started.elapsed();
            drop(client);
            elapsed
        };
        let direct_ready = || async {
            let started = Instant::now();
            let (client, _) =
                direct_stdio(Lifecycle::Initialize, &["--init-delay-ms", delay]).await;
            client.peer().list_all_tools().await.unwrap();
            started.elapsed()
        };
        let (mut alone, mut slowest, mut all) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.reps {
            alone.push(direct_ready().await);
            slowest.push(ready(one.clone(), 1).await);
            all.push(ready(many.clone(), servers).await);
        }
        let alone = median_by(&alone, |run| millis(*run));
        let slowest = median_by(&slowest, |run| millis(*run));
        let all = median_by(&all, |run| millis(*run));
        println!("\n### Startup: downstreams that take {delay} ms to answer `initialize`\n");
        println!("| path | time to ready ms |");
        println!("| --- | ---: |");
        println!("| one slow server, direct | {alone:.0} |");
        println!("| conductor with that one server | {slowest:.0} |");
        println!("| conductor with {servers} such servers | {all:.0} |");
        println!(
            "\n{servers} servers take {:.0} ms more than the slowest alone through conductor.",
            all - slowest
        );

        // What a client waits for before it is served at all: the answer to `initialize`,
        // with thirteen servers that take 2 s to start, and with one more that hangs in its
        // handshake (given up after 10 s).
        let thirteen = config(
            self.dir.path(),
            "thirteen",
            13,
            &["--init-delay-ms", "2000"],
        );
        let hanging = self.dir.path().join("hanging.toml");
        let mut text = std::fs::read_to_string(&thirteen).unwrap();
        text.push_str(&format!(
            "\n[servers.hung]\ncommand = \"{}\"\nargs = [\"--echo-server\", \"--init-delay-ms\", \"600000\"]\nstartup_timeout = \"10s\"\nping_interval = \"off\"\n",
            me()
        ));
        std::fs::write(&hanging, text).unwrap();
        let handshake = |config: PathBuf| async move {
            let started = Instant::now();
            let (client, _) = conductor_stdio(Lifecycle::Initialize, &config).await;
            let elapsed = started.elapsed();
            drop(client);
            elapsed
        };
        let (mut plain, mut hung) = (Vec::new(), Vec::new());
        for _ in 0..self.reps.min(3) {
            plain.push(handshake(thirteen.clone()).await);
            hung.push(handshake(hanging.clone()).await);
        }
        let plain = median_by(&plain, |run| millis(*run));
        let hung = median_by(&hung, |run| millis(*run));
        println!("\n### Start to the answer to `initialize`\n");
        println!("| servers | ms |");
        println!("| --- | ---: |");
        println!("| 13 that take 2 s to start | {plain:.0} |");
        println!("| the same and one that hangs in its handshake | {hung:.0} |");
    }

    async fn memory(&self) {
        println!("\n### Memory (resident set)\n");
        println!("| what | MiB |");
        println!("| --- | ---: |");
        let (echo, echo_pid) = direct_stdio(Lifecycle::Initialize, &[]).await;
        echo.peer().list_all_tools().await.unwrap();
        let (_, echo_peak) = rss_kib(echo_pid);
        let (client, pid) = conductor_stdio(
            Lifecycle::Initialize,
            &config(self.dir.path(), "ten", 10, &[]),
        )
        .await;
        client.peer().list_all_tools().await.unwrap();
        tokio::time::sleep(Duration::from_secs(if self.quick { 0 } else { 2 })).await;
        let (now, peak) = rss_kib(pid);
        let mib = |kib: u64| kib as f64 / 1024.0;
        println!("| one echo server (direct), peak | {:.1} |", mib(echo_peak));
        println!(
            "| conductor with 10 idle downstreams, peak | {:.1} |",
            mib(peak)
        );
        println!(
            "| conductor with 10 idle downstreams, now | {:.1} |",
            mib(now)
        );
        drop((client, echo));

        let sessions = if self.quick { 10 } else { 100 };
        let added = |pid: u32, url: String| async move {
            let (before, _) = rss_kib(pid);
            let mut clients = Vec::new();
            for _ in 0..sessions {
                let client = http_client(&url).await;
                client.peer().list_all_tools().await.unwrap();
                clients.push(client);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (after, _) = rss_kib(pid);
            drop(clients);
            after.saturating_sub(before)
        };
        let echo = echo_http(&[]).await;
        let echo_added = added(echo.child.id().unwrap(), echo.url.clone()).await;
        let conductor = conductor_http(&config(self.dir.path(), "one", 1, &[])).await;
        let conductor_added = added(conductor.child.id().unwrap(), conductor.url.clone()).await;
        println!(
            "| added by {sessions} HTTP sessions, echo server (direct) | {:.1} |",
            mib(echo_added)
        );
        println!(
            "| added by {sessions} HTTP sessions, conductor | {:.1} |",
            mib(conductor_added)
        );
    }

    async fn orchestrate(&self) {
        let steps = if self.quick { 10 } else { 100 };
        let (direct, _) = direct_stdio(Lifecycle::Initialize, &[]).await;
        let config = config(self.dir.path(), "saved", 1, &[]);
        // A saved workflow of one step: what conductor adds to a call by making a tool of it.
        let mut text = std::fs::read_to_string(&config).unwrap();
        text.push_str(concat!(
            "\n[workflows.echo_saved]\n",
            "input_schema = { type = \"object\", properties = { text = { type = \"string\" } }, required = [\"text\"] }\n",
            "output = \"${{ steps.echo.output }}\"\n",
            "[[workflows.echo_saved.steps]]\n",
            "id = \"echo\"\ntool = \"echo__echo\"\nargs = { text = \"${{ inputs.text }}\" }\n",
        ));
        std::fs::write(&config, text).unwrap();
        let (through, pid) = conductor_stdio(Lifecycle::Initialize, &config).await;
        let chain: Vec<_> = (0..steps)
            .map(|i| {
                let text = if i == 0 {
                    "hello".to_owned()
                } else {
                    format!("${{{{ steps.s{}.output.text }}}}", i - 1)
                };
                json!({"id": format!("s{i}"), "tool": "echo__echo", "args": {"text": text}})
            })
            .collect();
        let chain = json!({"steps": chain, "timeout_ms": 600_000});
        let items: Vec<usize> = (0..steps).collect();
        let fan_out = json!({
            "max_concurrency": 32,
            "timeout_ms": 600_000,
            "inputs": {"items": items},
            "steps": [{"id": "each", "tool": "echo__echo", "for_each": "${{ inputs.items }}",
                       "max_concurrency": 32, "args": {"text": "${{ item | string }}"}}]
        });
        let run = |workflow: serde_json::Value| {
            let peer = through.peer().clone();
            async move {
                let arguments = workflow.as_object().cloned().unwrap();
                let started = Instant::now();
                let result = peer
                    .call_tool(CallToolRequestParams::new("orchestrate").with_arguments(arguments))
                    .await
                    .unwrap();
                let status = result.structured_content.as_ref().unwrap()["status"].clone();
                assert_eq!(status, "succeeded", "{result:?}");
                started.elapsed()
            }
        };
        let (mut chain_runs, mut fan_runs, mut sequential, mut parallel) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        run(chain.clone()).await;
        for _ in 0..self.reps {
            chain_runs.push(run(chain.clone()).await);
            fan_runs.push(run(fan_out.clone()).await);
            // The downstream time alone: the same calls, made directly.
            let started = Instant::now();
            load(direct.peer(), "echo", 1, steps).await;
            sequential.push(started.elapsed());
            let started = Instant::now();
            load(direct.peer(), "echo", 32, steps).await;
            parallel.push(started.elapsed());
        }
        let per_step = |workflow: &[Duration], calls: &[Duration]| {
            (median_by(workflow, |run| micros(*run)) - median_by(calls, |run| micros(*run)))
                / steps as f64
        };
        println!("\n### orchestrate: engine time per step beyond the downstream calls\n");
        println!("| workflow | workflow ms | the same calls direct ms | overhead per step µs |");
        println!("| --- | ---: | ---: | ---: |");
        println!(
            "| {steps}-step chain | {:.1} | {:.1} | {:.1} |",
            median_by(&chain_runs, |run| millis(*run)),
            median_by(&sequential, |run| millis(*run)),
            per_step(&chain_runs, &sequential)
        );
        println!(
            "| {steps}-wide fan-out (32 at a time) | {:.1} | {:.1} | {:.1} |",
            median_by(&fan_runs, |run| millis(*run)),
            median_by(&parallel, |run| millis(*run)),
            per_step(&fan_runs, &parallel)
        );
        let calls = if self.quick { 20 } else { 2_000 };
        load(through.peer(), "workflow__echo_saved", 1, calls).await;
        let (mut saved, mut proxied) = (Vec::new(), Vec::new());
        for _ in 0..self.reps {
            saved.push(
                load(through.peer(), "workflow__echo_saved", 1, calls)
                    .await
                    .p50,
            );
            proxied.push(load(through.peer(), "echo__echo", 1, calls).await.p50);
        }
        let (saved, proxied) = (
            median_by(&saved, |p50| micros(*p50)),
            median_by(&proxied, |p50| micros(*p50)),
        );
        println!(
            "\nA saved one-step workflow called as a tool, one call at a time: p50 {saved:.0} µs, \
             against {proxied:.0} µs for its tool called through conductor: {:.0} µs added.",
            saved - proxied
        );
        let _ = through.cancel().await;
        wait_for_exit(pid).await;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--relay") {
        // One thread, as conductor serves stdio: tokio's multi-threaded scheduler alone adds
        // about 20 µs to a round trip here (docs/performance.md).
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(relay(&args[1..]));
        return;
    }
    if args.first().map(String::as_str) == Some("--echo-server") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(echo_server(&args));
        return;
    }
    let quick = args.iter().any(|arg| arg == "--quick");
    let only = args
        .iter()
        .position(|arg| arg == "--only")
        .and_then(|at| args.get(at + 1))
        .cloned();
    let bench = Bench {
        quick,
        reps: if quick { 1 } else { 5 },
        dir: tempfile::tempdir().unwrap(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "## gateway benchmark ({} mode, median of {} repetitions; {} CPUs)",
        if quick { "quick" } else { "full" },
        bench.reps,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    let wanted = |group: &str| only.as_deref().is_none_or(|only| only == group);
    runtime.block_on(async {
        if wanted("calls") {
            bench.calls_over_stdio().await;
        }
        if wanted("http") {
            bench.calls_over_http().await;
        }
        if wanted("streams") {
            bench.streamed_answers().await;
        }
        if wanted("catalog") {
            bench.catalog().await;
        }
        if wanted("startup") {
            bench.startup().await;
        }
        if wanted("memory") {
            bench.memory().await;
        }
        if wanted("orchestrate") {
            bench.orchestrate().await;
        }
    });
}
