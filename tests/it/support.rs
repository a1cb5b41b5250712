//! Shared test helpers: where the binaries and peers are, configs in temporary folders,
//! conductor started as a real child process, fixtures served over HTTP.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientCapabilities, ClientConfig, Implementation,
};
use rmcp::service::{NotificationContext, RoleClient, RunningService};
use rmcp::transport::TokioChildProcess;
use rmcp::{ClientHandler, ServiceExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::Notify;

pub const FIXTURE: &str = env!("CARGO_BIN_EXE_mcp-fixture");
pub const CONDUCTOR: &str = env!("CARGO_BIN_EXE_conductor");

/// The project root, where `servers.toml` and `.peers` live.
pub fn project_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `scripts/install-peers` put the third-party peers. Tests that need them fail with
/// a message saying how to install them, rather than passing without having run.
pub fn peers() -> PathBuf {
    let peers = std::env::var_os("CONDUCTOR_PEERS")
        .map(PathBuf::from)
        .unwrap_or_else(|| project_root().join(".peers"));
    assert!(
        peers.join("node/.installed").exists() && peers.join("venv/.installed").exists(),
        "third-party test peers are missing from {}: run `scripts/install-peers`",
        peers.display()
    );
    peers
}

pub fn node_server(name: &str) -> String {
    peers()
        .join("node/node_modules/@modelcontextprotocol")
        .join(name)
        .join("dist/index.js")
        .display()
        .to_string()
}

pub fn python() -> String {
    peers().join("venv/bin/python").display().to_string()
}

/// A `servers.toml` in its own temporary folder. `{fixture}` in the text stands for the
/// fixture binary's path.
pub struct TestConfig {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

/// The config with `list_wait = "60s"` added at its end (no line of the text moves) unless
/// it has a `[conductor]` table: a test's first list sees every server that starts at all,
/// however busy the machine (the default, a few seconds, is for people, who get the rest
/// with `list_changed`).
fn with_patient_lists(text: &str) -> String {
    if text.contains("[conductor]") {
        return text.to_owned();
    }
    format!("{text}\n[conductor]\nlist_wait = \"60s\"\n")
}

impl TestConfig {
    pub fn new(text: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("servers.toml");
        let text = with_patient_lists(&text.replace("{fixture}", FIXTURE));
        std::fs::write(&path, text).expect("config written");
        TestConfig { dir, path }
    }

    /// A stdio fixture server entry for each `(server name, fixture kind)`.
    pub fn fixtures(servers: &[(&str, &str)]) -> Self {
        let text: String = servers
            .iter()
            .map(|(name, kind)| {
                format!("[servers.{name}]\ncommand = \"{{fixture}}\"\nargs = [\"{kind}\"]\n\n")
            })
            .collect();
        TestConfig::new(&text)
    }

    /// The `slow` fixture as server `slow`, recording its events to the events file; `top`
    /// goes before its table (`[http]` settings, say), `extra` into it.
    pub fn slow_fixture(top: &str, extra: &str) -> Self {
        let config = TestConfig::new("");
        let events = config.events_file().display().to_string();
        let text = format!(
            "{top}\n[servers.slow]\ncommand = \"{FIXTURE}\"\nargs = [\"slow\"]\nenv = {{ FIXTURE_EVENTS = \"{events}\" }}\n{extra}"
        );
        std::fs::write(&config.path, text).unwrap();
        config
    }

    /// Add the saved workflow `naps` to a config with the `slow` fixture: `slow__sleep` for
    /// `inputs.ms` (an integer), then for 1 ms.
    pub fn with_naps_workflow(&self) {
        let saved = "\n[workflows.naps]\ninput_schema = { type = \"object\", properties = { ms = { type = \"integer\" } } }\n\
            [[workflows.naps.steps]]\nid = \"first\"\ntool = \"slow__sleep\"\nargs = { ms = \"${{ inputs.ms }}\" }\n\
            [[workflows.naps.steps]]\nid = \"second\"\ntool = \"slow__sleep\"\nneeds = [\"first\"]\nargs = { ms = 1 }\n";
        let text = std::fs::read_to_string(&self.path).unwrap() + saved;
        std::fs::write(&self.path, text).unwrap();
    }

    pub fn events_file(&self) -> PathBuf {
        self.dir.path().join("events.log")
    }

    /// How many times the fixture recorded `event` (fixtures record to `events_file`, given
    /// as their `FIXTURE_EVENTS`).
    pub fn recorded(&self, event: &str) -> usize {
        std::fs::read_to_string(self.events_file())
            .unwrap_or_default()
            .lines()
            .filter(|line| *line == event)
            .count()
    }

    /// Wait (up to 10 s) until the fixture has recorded `event` at least `times` times.
    pub async fn wait_for_recorded(&self, event: &str, times: usize) {
        for _ in 0..100 {
            if self.recorded(event) >= times {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "the fixture never recorded `{event}` {times} times; it recorded: {:?}",
            std::fs::read_to_string(self.events_file()).unwrap_or_default()
        );
    }
}

/// What a test client saw arrive, by notification method.
#[derive(Debug, Clone, Default)]
pub struct Recorder {
    seen: Arc<Mutex<Vec<String>>>,
    arrived: Arc<Notify>,
}

impl Recorder {
    pub fn record(&self, method: &str) {
        self.seen
            .lock()
            .expect("recorder lock")
            .push(method.to_owned());
        self.arrived.notify_waiters();
    }

    pub fn count(&self, method: &str) -> usize {
        self.seen
            .lock()
            .expect("recorder lock")
            .iter()
            .filter(|m| *m == method)
            .count()
    }

    /// Wait until `method` has arrived at least `n` times, or fail after 10 seconds.
    pub async fn wait_for(&self, method: &str, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let arrived = self.arrived.notified();
            if self.count(method) >= n {
                return;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!(
                    "{method} arrived {} times, expected {n}",
                    self.count(method)
                );
            }
        }
    }
}

/// An rmcp client that records the notifications it receives. With `answers`, it declares
/// sampling and roots and answers them: a sample is `sampled: <the prompt>`, and it has one
/// root.
#[derive(Debug, Clone, Default)]
pub struct TestClient {
    pub recorder: Recorder,
    pub answers: bool,
    /// The protocol version to ask for, instead of rmcp's newest with `initialize`.
    pub protocol: Option<rmcp::model::ProtocolVersion>,
}

#[allow(deprecated, reason = "sampling, roots and logging are what is tested")]
impl ClientHandler for TestClient {
    fn get_info(&self) -> ClientConfig {
        let capabilities = if self.answers {
            ClientCapabilities::builder()
                .enable_roots()
                .enable_sampling()
                .build()
        } else {
            ClientCapabilities::default()
        };
        let config = ClientConfig::new(capabilities, Implementation::new("conductor-tests", "0"));
        match &self.protocol {
            Some(version) => config.with_protocol_version(version.clone()),
            None => config,
        }
    }

    async fn create_message(
        &self,
        params: rmcp::model::CreateMessageRequestParams,
        _context: rmcp::service::RequestContext<RoleClient>,
    ) -> Result<rmcp::model::CreateMessageResult, rmcp::ErrorData> {
        self.recorder.record("sampling/createMessage");
        let prompt = params
            .messages
            .first()
            .and_then(|message| message.content.first())
            .and_then(|content| content.as_text().map(|text| text.text.clone()))
            .unwrap_or_default();
        Ok(rmcp::model::CreateMessageResult::new(
            rmcp::model::SamplingMessage::assistant_text(format!("sampled: {prompt}")),
            "test-model".to_owned(),
        ))
    }

    async fn list_roots(
        &self,
        _context: rmcp::service::RequestContext<RoleClient>,
    ) -> Result<rmcp::model::ListRootsResult, rmcp::ErrorData> {
        Ok(rmcp::model::ListRootsResult::new(vec![
            rmcp::model::Root::new("file:///work"),
        ]))
    }

    async fn on_logging_message(
        &self,
        params: rmcp::model::LoggingMessageNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.recorder
            .record(&format!("log {}", params.logger.unwrap_or_default()));
    }

    async fn on_tool_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.recorder.record("notifications/tools/list_changed");
    }

    async fn on_prompt_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.recorder.record("notifications/prompts/list_changed");
    }

    async fn on_resource_list_changed(&self, _context: NotificationContext<RoleClient>) {
        self.recorder.record("notifications/resources/list_changed");
    }

    async fn on_progress(
        &self,
        _params: rmcp::model::ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.recorder.record("notifications/progress");
    }

    async fn on_resource_updated(
        &self,
        params: rmcp::model::ResourceUpdatedNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.recorder.record(&format!("updated {}", params.uri));
    }
}

pub type Session = RunningService<RoleClient, TestClient>;

/// Start `conductor serve` on `config` as a child process and connect to it over stdio.
pub async fn serve(config: &TestConfig) -> Session {
    serve_with_env(config, &[]).await
}

pub async fn serve_with_env(config: &TestConfig, env: &[(&str, String)]) -> Session {
    serve_as(config, env, TestClient::default()).await
}

/// Start `conductor serve` and connect to it as `client`.
pub async fn serve_as(config: &TestConfig, env: &[(&str, String)], client: TestClient) -> Session {
    let mut command = tokio::process::Command::new(CONDUCTOR);
    command.arg("serve").arg("--config").arg(&config.path);
    for (key, value) in env {
        command.env(key, value);
    }
    // conductor's log is noise in a passing run; CONDUCTOR_TEST_LOG=1 shows it.
    let stderr = if std::env::var_os("CONDUCTOR_TEST_LOG").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    };
    let (transport, _stderr) = TokioChildProcess::builder(command)
        .stderr(stderr)
        .spawn()
        .expect("conductor starts");
    connect_as(client, transport).await
}

/// Connect `client` over `transport`: a 2026-07-28 client has no `initialize`, it opens with
/// `server/discover`.
pub async fn connect_as<T, E, A>(client: TestClient, transport: T) -> Session
where
    T: rmcp::transport::IntoTransport<RoleClient, E, A>,
    E: std::error::Error + Send + Sync + 'static,
{
    let lifecycle = match &client.protocol {
        Some(version) if *version >= rmcp::model::ProtocolVersion::V_2026_07_28 => {
            rmcp::service::ClientLifecycleMode::Discover {
                preferred_versions: vec![version.clone()],
            }
        }
        _ => rmcp::service::ClientLifecycleMode::Initialize,
    };
    rmcp::service::ClientServiceExt::serve_with_lifecycle(client, transport, lifecycle)
        .await
        .expect("conductor completes the handshake")
}

/// Call a tool and expect an answer (which may still be `isError`).
pub async fn call(session: &Session, name: &str, arguments: serde_json::Value) -> CallToolResult {
    let arguments = arguments.as_object().cloned().unwrap_or_default();
    session
        .call_tool(CallToolRequestParams::new(name.to_owned()).with_arguments(arguments))
        .await
        .unwrap_or_else(|error| panic!("calling `{name}` failed: {error}"))
}

/// The text of a result's first text block.
pub fn text_of(result: &CallToolResult) -> String {
    result
        .content
        .iter()
        .find_map(|block| block.as_text().map(|text| text.text.clone()))
        .unwrap_or_default()
}

/// A fixture served over Streamable HTTP on a free port; stopped when dropped.
pub struct HttpFixture {
    pub url: String,
    _child: tokio::process::Child,
}

impl HttpFixture {
    pub async fn start(kind: &str) -> Self {
        let mut child = tokio::process::Command::new(FIXTURE)
            .args([kind, "--http"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the HTTP fixture starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("the fixture prints its URL in time")
            .expect("stdout readable")
            .expect("a URL line");
        HttpFixture { url, _child: child }
    }
}

/// Run `conductor ARGS` to completion and return (exit code, stdout, stderr).
pub async fn conductor_cli(config: &Path, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(CONDUCTOR)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .await
        .expect("conductor runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `conductor serve --http 127.0.0.1:0` on a config; stopped when dropped.
pub struct HttpConductor {
    pub base: String,
    /// Held so that dropping the guard kills the process.
    pub child: tokio::process::Child,
}

impl HttpConductor {
    pub async fn start(config: &TestConfig) -> Self {
        HttpConductor::start_with(config, &[]).await
    }

    /// Start with these environment variables set.
    pub async fn start_with(config: &TestConfig, env: &[(&str, &str)]) -> Self {
        let mut child = tokio::process::Command::new(CONDUCTOR)
            .args(["serve", "--http", "127.0.0.1:0", "--config"])
            .arg(&config.path)
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("conductor starts");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut lines = BufReader::new(stderr).lines();
        let base = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(at) = line.find("serving Streamable HTTP at http://") {
                    let rest = &line[at + "serving Streamable HTTP at ".len()..];
                    let url = rest.split_whitespace().next().unwrap_or_default();
                    return url.trim_end_matches("/mcp").to_owned();
                }
            }
            panic!("conductor ended without serving");
        })
        .await
        .expect("conductor serves within 30 seconds");
        // Keep reading stderr so the child never blocks on a full pipe (CONDUCTOR_TEST_LOG=1
        // shows it).
        let show = std::env::var_os("CONDUCTOR_TEST_LOG").is_some();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if show {
                    eprintln!("{line}");
                }
            }
        });
        HttpConductor { base, child }
    }

    pub fn mcp(&self) -> String {
        format!("{}/mcp", self.base)
    }
}

/// An rmcp client over Streamable HTTP, with an optional bearer token.
pub async fn http_session(url: &str, token: Option<&str>) -> Session {
    http_session_as(url, token, TestClient::default()).await
}

/// Like [`http_session`], as `client`.
pub async fn http_session_as(url: &str, token: Option<&str>, client: TestClient) -> Session {
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let mut config = StreamableHttpClientTransportConfig::with_uri(url.to_owned());
    if let Some(token) = token {
        config = config.auth_header(token.to_owned());
    }
    client
        .serve(StreamableHttpClientTransport::from_config(config))
        .await
        .expect("an MCP session over HTTP")
}

/// A client script's reports on server-everything's sampling and elicitation tools: it was
/// asked once each, and the tool got its answers (`sample`, and the name Ada) back.
pub fn assert_sampled_and_elicited(
    label: &str,
    sampled: &serde_json::Value,
    sample: &str,
    elicited: &serde_json::Value,
) {
    assert_eq!(sampled["sampling"], 1, "{label}: {sampled:#}");
    assert!(
        sampled["call"].to_string().contains(sample),
        "{label}: {sampled:#}"
    );
    assert_eq!(elicited["elicitation"], 1, "{label}: {elicited:#}");
    assert!(
        elicited["call"].to_string().contains("Ada"),
        "{label}: {elicited:#}"
    );
}

/// Run `tests/peers/py_client.py` (the official Python SDK client) with `options` against
/// `target` (a command, or one URL) and return its JSON report; fail if it failed.
pub async fn py_client(options: &[&str], target: &[&str]) -> serde_json::Value {
    let output = tokio::process::Command::new(python())
        .arg(project_root().join("tests/peers/py_client.py"))
        .args(options)
        .arg("--")
        .args(target)
        .output()
        .await
        .expect("the Python client runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Python client failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).expect("the Python client prints JSON")
}

/// The names of every tool a session lists.
pub async fn tool_names(session: &Session) -> Vec<String> {
    session
        .list_all_tools()
        .await
        .expect("tools/list answers")
        .into_iter()
        .map(|tool| tool.name.to_string())
        .collect()
}

/// Poll `check` every 50 ms until it gives a value, or fail after `limit` saying `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Conductor serving stdio to a test that writes and reads the raw lines itself.
pub struct RawSession {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl RawSession {
    pub fn start(config: &TestConfig) -> RawSession {
        let mut child = tokio::process::Command::new(CONDUCTOR)
            .args(["serve", "--config"])
            .arg(&config.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        RawSession {
            child,
            stdin,
            lines,
        }
    }

    /// A session past its handshake, as a client on 2025-06-18.
    pub async fn initialized(config: &TestConfig) -> RawSession {
        let mut raw = RawSession::start(config);
        let initialize = serde_json::json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}});
        raw.send(&initialize).await;
        raw.send(&serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        assert_eq!(raw.next().await["id"], 0);
        raw
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("conductor is running")
    }

    /// Close conductor's stdin, as a host that goes away does, and wait (up to 20 s) for it
    /// to exit.
    pub async fn close(self) -> std::process::ExitStatus {
        let RawSession {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        tokio::time::timeout(Duration::from_secs(20), child.wait())
            .await
            .expect("conductor exits")
            .unwrap()
    }

    pub async fn send(&mut self, message: &serde_json::Value) {
        self.stdin
            .write_all(format!("{message}\n").as_bytes())
            .await
            .unwrap();
    }

    /// The next line conductor writes, within 10 s.
    pub async fn next(&mut self) -> serde_json::Value {
        let line = tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .expect("a line in time")
            .unwrap()
            .expect("a line, not a closed connection");
        serde_json::from_str(&line).unwrap()
    }

    /// Write `line` as it is (well-formed or not) and read the next line back as text.
    pub async fn exchange(&mut self, line: &str) -> String {
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("no answer to {line}"))
            .unwrap()
            .expect("a line, not a closed connection")
    }
}

/// server-everything's tools listed only to clients that declare sampling, elicitation (in
/// each mode) or roots. Conductor offers a shared server every capability (and refuses per
/// request what the client lacks), so through conductor these may be listed to a client that
/// would not see them directly.
pub const EVERYTHING_CAPABILITY_GATED: [&str; 4] = [
    "trigger-sampling-request",
    "trigger-elicitation-request",
    "trigger-url-elicitation",
    "get-roots-list",
];

/// Options that make a client script (`py_client.py`, `node_client.mjs`) declare sampling,
/// elicitation and roots and answer them, so server-everything offers the tools that ask.
pub const ANSWERING: [&str; 6] = [
    "--sampling-reply",
    "a sample",
    "--elicit-accept",
    r#"{"name": "Ada"}"#,
    "--roots",
    "file:///work/notes",
];

/// The tool names a client script listed of server-everything, sorted, without conductor's
/// prefix and its own `orchestrate`: what it lists directly and through conductor alike.
pub fn everything_names(names: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = names
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(serde_json::Value::as_str)
        .filter(|name| *name != "orchestrate")
        .map(|name| name.trim_start_matches("everything__").to_owned())
        .collect();
    names.sort();
    names
}
