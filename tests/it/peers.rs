//! Third-party parts: the official Python SDK as a client of conductor, and the npm reference
//! servers as its downstreams. `scripts/install-peers` installs their pinned versions.

use serde_json::{Value, json};

use super::support::{
    CONDUCTOR, TestConfig, call, conductor_cli, node_server, project_root, serve, text_of,
    tool_names,
};

/// The Python client against `conductor serve` over stdio.
async fn python_client(config: &TestConfig, options: &[&str]) -> Value {
    let config_path = config.path.display().to_string();
    super::support::py_client(options, &[CONDUCTOR, "serve", "--config", &config_path]).await
}

#[tokio::test]
async fn the_python_sdk_client_uses_conductor_in_both_protocol_eras() {
    let config = TestConfig::fixtures(&[("echo", "echo"), ("content", "content")]);

    // Auto mode probes `server/discover` first and settles on 2026-07-28.
    let report = python_client(
        &config,
        &[
            "--call",
            "echo__echo",
            "--args",
            r#"{"text": "from python"}"#,
            "--read",
            "fixture://readme",
        ],
    )
    .await;
    assert_eq!(report["protocol_version"], "2026-07-28");
    assert_eq!(report["server_name"], "mcp-conductor");
    assert_eq!(report["prompts"], json!(["content__greet"]));
    assert_eq!(
        report["resources"],
        json!(["fixture://readme", "fixture://logo"])
    );
    assert_eq!(
        report["call"]["structuredContent"],
        json!({"text": "from python", "length": 11})
    );
    assert_eq!(report["read"][0]["text"], "# Fixture\nA server for tests.");

    // Legacy mode uses `initialize`.
    let report = python_client(&config, &["--mode", "legacy", "--call", "content__kinds"]).await;
    assert_eq!(report["protocol_version"], "2025-11-25");
    let kinds: Vec<&str> = report["call"]["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["text", "image", "audio", "resource", "resource_link"]
    );
}

#[tokio::test]
async fn the_reference_servers_work_behind_conductor() {
    let files = tempfile::tempdir().unwrap();
    std::fs::write(files.path().join("note.txt"), "remember the milk").unwrap();
    let config = TestConfig::new(&format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [\"{}\"]\n\n\
         [servers.fs]\ncommand = \"node\"\nargs = [\"{}\", \"{}\"]\n",
        node_server("server-everything"),
        node_server("server-filesystem"),
        files.path().display(),
    ));
    let session = serve(&config).await;

    let tools = session.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    for expected in [
        "everything__echo",
        "everything__get-sum",
        "fs__read_text_file",
        "fs__list_directory",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }

    let result = call(&session, "everything__echo", json!({"message": "hi"})).await;
    assert_eq!(text_of(&result), "Echo: hi");
    let result = call(
        &session,
        "everything__get-structured-content",
        json!({"location": "New York"}),
    )
    .await;
    assert!(
        result.structured_content.is_some(),
        "structured content passes through: {result:?}"
    );

    let path = files.path().join("note.txt").display().to_string();
    let result = call(&session, "fs__read_text_file", json!({"path": path})).await;
    assert_eq!(text_of(&result), "remember the milk");
    let outside = call(
        &session,
        "fs__read_text_file",
        json!({"path": "/etc/hostname"}),
    )
    .await;
    assert_eq!(
        outside.is_error,
        Some(true),
        "the downstream's own refusal comes back as isError"
    );

    let prompts = session.list_all_prompts().await.unwrap();
    assert!(
        prompts.iter().all(|p| p.name.starts_with("everything__")),
        "{prompts:?}"
    );
    assert!(!prompts.is_empty());
    let resources = session.list_all_resources().await.unwrap();
    let first = resources
        .first()
        .expect("server-everything lists resources");
    let read = session
        .read_resource(rmcp::model::ReadResourceRequestParams::new(
            first.uri.clone(),
        ))
        .await
        .unwrap();
    assert!(!read.contents.is_empty());

    // The Python client reaches the same servers through conductor.
    let report = python_client(
        &config,
        &[
            "--call",
            "everything__get-sum",
            "--args",
            r#"{"a": 2, "b": 40}"#,
        ],
    )
    .await;
    assert!(
        report["call"]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("42"),
        "{report}"
    );
}

/// The `servers.toml` in the repository starts every server it lists.
#[tokio::test]
async fn the_bundled_config_starts_every_server() {
    super::support::peers();
    let (code, stdout, stderr) =
        conductor_cli(&project_root().join("servers.toml"), &["check"]).await;
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    for server in ["everything", "fs", "memory", "time"] {
        assert!(
            stdout
                .lines()
                .any(|line| line.starts_with(server) && line.contains(" ready ")),
            "{server} is not ready:\n{stdout}"
        );
    }
}

/// The same workflow as an ordinary tool call from the Python SDK, with progress notifications.
#[tokio::test]
async fn the_python_sdk_runs_a_workflow_with_progress() {
    let config =
        TestConfig::fixtures(&[("books", "books"), ("tracker", "tracker"), ("chat", "chat")]);
    let workflow = json!({
        "inputs": {"list": "collections"},
        "steps": [
            {"id": "unpaid", "tool": "books__list_invoices", "args": {"status": "unpaid"}},
            {"id": "tasks", "tool": "tracker__create_task", "for_each": "${{ steps.unpaid.output.invoices }}", "as": "inv",
             "tolerate_failures": 1, "args": {"title": "Chase ${{ inv.number }}", "list": "${{ inputs.list }}"}},
            {"id": "summary", "tool": "chat__send", "trigger": "all_done",
             "args": {"channel": "#finance", "text": "${{ steps.tasks.stats.succeeded }} created"}}
        ]
    })
    .to_string();
    for mode in ["auto", "legacy"] {
        let report = python_client(
            &config,
            &[
                "--mode",
                mode,
                "--call",
                "orchestrate",
                "--args",
                &workflow,
                "--progress",
            ],
        )
        .await;
        let run = &report["call"]["structuredContent"];
        assert_eq!(run["status"], "partial", "{report:#}");
        assert_eq!(run["steps"]["tasks"]["stats"]["succeeded"], 2);
        assert_eq!(report["call"]["isError"], false);
        // One notification per settled step and per settled item: 3 steps, 3 items.
        assert_eq!(report["progress"], 6, "{report:#}");
        assert!(
            report["tools"]
                .as_array()
                .unwrap()
                .contains(&json!("orchestrate"))
        );
    }
}

/// A third-party server listening on a free loopback port; stopped when dropped.
struct Listening {
    port: u16,
    _child: tokio::process::Child,
}

impl Listening {
    /// Start `command` with `{port}` in its arguments or `PORT` in its environment replaced by
    /// a free port, and wait until the port accepts connections.
    async fn start(program: &str, args: &[&str]) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Listening::start_on(port, program, args).await
    }

    async fn start_on(port: u16, program: &str, args: &[&str]) -> Self {
        let args: Vec<String> = args
            .iter()
            .map(|arg| arg.replace("{port}", &port.to_string()))
            .collect();
        let child = tokio::process::Command::new(program)
            .args(&args)
            .env("PORT", port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("the server starts");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Listening {
                    port,
                    _child: child,
                };
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("{program} {args:?} did not listen on {port}");
    }
}

/// Third-party servers reached over Streamable HTTP and over the legacy HTTP+SSE transport.
#[tokio::test]
async fn third_party_http_servers_are_reached_over_both_transports() {
    let fixture = project_root()
        .join("tests/peers/py_fixture_server.py")
        .display()
        .to_string();
    let python = super::support::python();
    let everything = node_server("server-everything");
    let py_http = Listening::start(
        &python,
        &[
            &fixture,
            "--transport",
            "streamable-http",
            "--port",
            "{port}",
        ],
    )
    .await;
    let py_sse = Listening::start(
        &python,
        &[&fixture, "--transport", "sse", "--port", "{port}"],
    )
    .await;
    let ev_http = Listening::start("node", &[&everything, "streamableHttp"]).await;
    let ev_sse = Listening::start("node", &[&everything, "sse"]).await;
    let config = TestConfig::new(&format!(
        "[servers.py_http]\nurl = \"http://127.0.0.1:{}/mcp\"\n\n\
         [servers.py_sse]\nurl = \"http://127.0.0.1:{}/sse\"\ntransport = \"sse\"\n\n\
         [servers.ev_http]\nurl = \"http://127.0.0.1:{}/mcp\"\n\n\
         [servers.ev_sse]\nurl = \"http://127.0.0.1:{}/sse\"\ntransport = \"sse\"\n",
        py_http.port, py_sse.port, ev_http.port, ev_sse.port
    ));
    let session = serve(&config).await;
    for server in ["py_http", "py_sse"] {
        let result = call(&session, &format!("{server}__test_simple_text"), json!({})).await;
        assert!(!text_of(&result).is_empty(), "{server}: {result:?}");
        let failed = call(
            &session,
            &format!("{server}__test_error_handling"),
            json!({}),
        )
        .await;
        assert_eq!(failed.is_error, Some(true), "{server}");
    }
    for server in ["ev_http", "ev_sse"] {
        let result = call(
            &session,
            &format!("{server}__echo"),
            json!({"message": server}),
        )
        .await;
        assert_eq!(text_of(&result), format!("Echo: {server}"));
    }
}

/// A remote server that goes away is reached again when it comes back, and its tools return.
#[tokio::test]
async fn remote_servers_that_restart_are_reconnected() {
    let fixture = project_root()
        .join("tests/peers/py_fixture_server.py")
        .display()
        .to_string();
    let python = super::support::python();
    let sse_args = [fixture.as_str(), "--transport", "sse", "--port", "{port}"];
    let http_args = [
        fixture.as_str(),
        "--transport",
        "streamable-http",
        "--port",
        "{port}",
    ];
    let sse = Listening::start(&python, &sse_args).await;
    let http = Listening::start(&python, &http_args).await;
    let (sse_port, http_port) = (sse.port, http.port);
    let config = TestConfig::new(&format!(
        "[servers.old]\nurl = \"http://127.0.0.1:{sse_port}/sse\"\ntransport = \"sse\"\n\n\
         [servers.new]\nurl = \"http://127.0.0.1:{http_port}/mcp\"\n"
    ));
    let session = serve(&config).await;
    let recorder = session.service().recorder.clone();
    for server in ["old", "new"] {
        assert_eq!(
            text_of(
                &call(
                    &session,
                    &format!("{server}__echo"),
                    json!({"message": "before"})
                )
                .await
            ),
            "Echo: before"
        );
    }

    drop(sse);
    drop(http);
    // The SSE stream ends at once: the server's tools leave the catalog.
    recorder
        .wait_for("notifications/tools/list_changed", 1)
        .await;
    let names: Vec<String> = tool_names(&session).await;
    assert!(
        !names.iter().any(|name| name.starts_with("old__")),
        "{names:?}"
    );

    let _sse = Listening::start_on(sse_port, &python, &sse_args).await;
    let _http = Listening::start_on(http_port, &python, &http_args).await;
    recorder
        .wait_for("notifications/tools/list_changed", 2)
        .await;
    for server in ["old", "new"] {
        let mut answer = String::new();
        for _ in 0..50 {
            let params = rmcp::model::CallToolRequestParams::new(format!("{server}__echo"))
                .with_arguments(json!({"message": "after"}).as_object().cloned().unwrap());
            if let Ok(result) = session.call_tool(params).await
                && result.is_error != Some(true)
            {
                answer = text_of(&result);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        assert_eq!(answer, "Echo: after", "{server} is served again");
    }
}

/// A downstream that pages its 1,200 tools 100 at a time is followed to the end; conductor's
/// own list is paged in turn (500 a page), and a bad cursor is refused.
#[tokio::test]
async fn large_catalogs_are_paged_both_ways() {
    let root = super::support::project_root();
    let config = TestConfig::new(&format!(
        "[servers.big]\ncommand = \"{}\"\nargs = [\"{}\", \"--extra-tools\", \"1200\", \"--page-size\", \"100\"]\n",
        super::support::python(),
        root.join("tests/peers/py_fixture_server.py").display()
    ));
    let session = super::support::serve(&config).await;
    let first = session
        .list_tools(Some(rmcp::model::PaginatedRequestParams::default()))
        .await
        .unwrap();
    assert_eq!(first.tools.len(), 500);
    let cursor = first.next_cursor.clone().expect("a second page");
    let all = session.list_all_tools().await.unwrap();
    let names: std::collections::HashSet<String> =
        all.iter().map(|tool| tool.name.to_string()).collect();
    assert_eq!(names.len(), all.len(), "no tool twice");
    assert!(all.len() > 1200, "{}", all.len());
    assert!(names.contains("orchestrate"));
    let second = session
        .list_tools(Some(
            rmcp::model::PaginatedRequestParams::default().with_cursor(Some(cursor)),
        ))
        .await
        .unwrap();
    assert_eq!(second.tools[0].name, all[500].name);
    let refused = session
        .list_tools(Some(
            rmcp::model::PaginatedRequestParams::default().with_cursor(Some("x".to_owned())),
        ))
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("is not a cursor conductor gave"),
        "{refused}"
    );
}

/// server-everything asks its client for a sample, an elicitation and the roots: through
/// conductor, the Python SDK client answers each, on 2025-11-25 as requests of their own, and
/// on 2026-07-28 (which has no server-to-client requests) as `input_required` results that
/// conductor's bridge makes of them.
#[tokio::test]
async fn server_everything_asks_the_python_client_through_conductor() {
    let config = TestConfig::new(&format!(
        // Each client's own child: a shared server is given the roots of its config.
        "[servers.everything]\ncommand = \"node\"\nargs = [\"{}\"]\nisolation = \"session\"\n",
        node_server("server-everything"),
    ));
    let answering = [
        "--sampling-reply",
        "a sample from python",
        "--elicit-accept",
        r#"{"name": "Ada", "check": true, "email": "ada@example.com", "integer": 3, "number": 1.5}"#,
        "--roots",
        "file:///work/notes",
    ];
    for mode in ["legacy", "auto"] {
        let run = |call: &'static str, args: &'static str| {
            let mut options = vec!["--mode", mode, "--call", call, "--args", args];
            options.extend(answering);
            let config = &config;
            async move { python_client(config, &options).await }
        };
        let sampled = run(
            "everything__trigger-sampling-request",
            r#"{"prompt": "hi"}"#,
        )
        .await;
        let version = if mode == "auto" {
            "2026-07-28"
        } else {
            "2025-11-25"
        };
        assert_eq!(sampled["protocol_version"], version, "{mode}: {sampled:#}");
        let elicited = run("everything__trigger-elicitation-request", "{}").await;
        super::support::assert_sampled_and_elicited(
            mode,
            &sampled,
            "a sample from python",
            &elicited,
        );
        let roots = run("everything__get-roots-list", "{}").await;
        assert!(roots["roots"].as_u64().unwrap() >= 1, "{mode}: {roots:#}");
        assert!(
            roots["call"].to_string().contains("file:///work/notes"),
            "{mode}: {roots:#}"
        );
    }
}

/// The Python SDK's own server asks for a sample and an elicitation in both protocol eras
/// (mid-call requests up to 2025-11-25, `input_required` on 2026-07-28), and the Python SDK
/// client answers in both: all four pairings go through conductor, which bridges the mixed ones.
#[tokio::test]
async fn the_python_sdk_server_and_client_ask_and_answer_across_eras() {
    let root = super::support::project_root();
    for handshake in ["initialize", "discover"] {
        let config = TestConfig::new(&format!(
            "[servers.py]\ncommand = \"{}\"\nargs = [\"{}\"]\nprotocol = \"{handshake}\"\n",
            super::support::python(),
            root.join("tests/peers/py_fixture_server.py").display()
        ));
        for mode in ["legacy", "auto"] {
            let pairing = format!("downstream {handshake}, client {mode}");
            let run = |call: &'static str, args: &'static str| {
                let options = vec![
                    "--mode",
                    mode,
                    "--call",
                    call,
                    "--args",
                    args,
                    "--sampling-reply",
                    "a sample from python",
                    "--elicit-accept",
                    r#"{"response": "yes please"}"#,
                ];
                let config = &config;
                async move { python_client(config, &options).await }
            };
            let sampled = run("py__test_sampling", r#"{"prompt": "hi"}"#).await;
            assert_eq!(sampled["sampling"], 1, "{pairing}: {sampled:#}");
            assert!(
                sampled["call"]
                    .to_string()
                    .contains("LLM response: a sample from python"),
                "{pairing}: {sampled:#}"
            );
            let elicited = run("py__test_elicitation", r#"{"message": "go?"}"#).await;
            assert_eq!(elicited["elicitation"], 1, "{pairing}: {elicited:#}");
            assert!(
                elicited["call"].to_string().contains("yes please"),
                "{pairing}: {elicited:#}"
            );
        }
    }
}

/// A child sees the safe set, what its config lets it inherit and its own `env`; never the rest
/// of conductor's environment, which holds conductor's token and other servers' secrets
/// (server-everything's `get-env` prints the child's whole environment).
#[tokio::test]
async fn a_child_sees_only_the_safe_environment_and_what_its_config_names() {
    let config = TestConfig::new(&format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [\"{}\"]\n\
         inherit_env = [\"SHARED_SETTING\"]\nenv = {{ OWN_SETTING = \"own\" }}\n",
        node_server("server-everything"),
    ));
    let session = super::support::serve_with_env(
        &config,
        &[
            ("CONDUCTOR_TOKEN", "conductor-secret".to_owned()),
            ("OTHER_SERVER_API_KEY", "other-secret".to_owned()),
            ("SHARED_SETTING", "shared".to_owned()),
        ],
    )
    .await;
    let printed = text_of(&call(&session, "everything__get-env", json!({})).await);
    let env: serde_json::Map<String, Value> =
        serde_json::from_str(&printed).expect("get-env prints a JSON object");
    assert_eq!(env.get("SHARED_SETTING"), Some(&json!("shared")));
    assert_eq!(env.get("OWN_SETTING"), Some(&json!("own")));
    assert!(
        env.contains_key("PATH"),
        "PATH is in the safe set: {printed}"
    );
    for secret in ["CONDUCTOR_TOKEN", "OTHER_SERVER_API_KEY"] {
        assert!(!env.contains_key(secret), "{secret} reached the child");
    }
    let unexpected: Vec<&String> = env
        .keys()
        .filter(|name| {
            !mcp_conductor::downstream::SAFE_ENV.contains(&name.as_str())
                && !["SHARED_SETTING", "OWN_SETTING"].contains(&name.as_str())
        })
        .collect();
    assert!(unexpected.is_empty(), "the child saw {unexpected:?}");
    session.cancel().await.unwrap();
}

/// What one script of client steps saw of server-everything, as JSON text (key order and all),
/// with `prefix` taken off the names conductor gives its tools and prompts.
async fn everything_transcript(session: &super::support::Session, prefix: &str) -> Vec<String> {
    let text = |value: &dyn erased::Serialize| {
        serde_json::to_string(&value).expect("rmcp's types serialize")
    };
    let mut lines = Vec::new();
    let mut tools = session.list_all_tools().await.unwrap();
    tools.sort_by(|a, b| a.name.cmp(&b.name));
    for mut tool in tools {
        tool.name = tool.name.trim_start_matches(prefix).to_owned().into();
        lines.push(format!("tool {}", text(&tool)));
    }
    let mut prompts = session.list_all_prompts().await.unwrap();
    prompts.sort_by(|a, b| a.name.cmp(&b.name));
    for mut prompt in prompts {
        prompt.name = prompt.name.trim_start_matches(prefix).to_owned();
        lines.push(format!("prompt {}", text(&prompt)));
    }
    for (tool, arguments) in [
        ("echo", json!({"message": "hi"})),
        ("get-sum", json!({"a": 2, "b": 40})),
        ("get-structured-content", json!({"location": "New York"})),
        (
            "get-annotated-message",
            json!({"messageType": "error", "includeImage": false}),
        ),
    ] {
        let result = call(session, &format!("{prefix}{tool}"), arguments).await;
        lines.push(format!("call {tool} {}", text(&result)));
    }
    lines
}

/// Serialize anything through one function without naming each type.
mod erased {
    pub trait Serialize {
        fn to_value(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Serialize for T {
        fn to_value(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("serializes")
        }
    }
    impl serde::Serialize for dyn Serialize + '_ {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            self.to_value().serialize(serializer)
        }
    }
}

/// The same client steps against server-everything directly and through conductor, over
/// stdio and over Streamable HTTP, see the same tools, prompts and results, down to the order
/// of each object's keys (a schema's `properties` included).
#[tokio::test]
async fn server_everything_looks_the_same_directly_and_through_conductor() {
    let mut command = tokio::process::Command::new("node");
    command.arg(node_server("server-everything"));
    let (transport, _) = rmcp::transport::TokioChildProcess::builder(command)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // A client that answers sampling, elicitation and roots, as conductor does for its
    // downstreams: server-everything offers the tools that ask only to such a client.
    let client = || super::support::TestClient {
        answers: true,
        ..Default::default()
    };
    let direct = super::support::connect_as(client(), transport).await;
    let direct = everything_transcript(&direct, "").await;
    assert!(direct.len() > 10, "{direct:#?}");

    let config = TestConfig::new(&format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [\"{}\"]\n",
        node_server("server-everything"),
    ));
    let session = super::support::serve_as(&config, &[], client()).await;
    let through_stdio = everything_transcript(&session, "everything__").await;
    let server = super::support::HttpConductor::start(&config).await;
    let session = super::support::http_session_as(&server.mcp(), None, client()).await;
    let through_http = everything_transcript(&session, "everything__").await;
    // And as the bytes a client reads: the schema's properties in the server's order
    // (`prompt` first), not sorted.
    let mut raw = super::support::RawSession::initialized(&config).await;
    let listed = raw
        .exchange(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#)
        .await;
    let tool = listed
        .find(r#""name":"everything__trigger-sampling-request""#)
        .expect("the sampling tool is listed");
    let at = |key: &str| listed[tool..].find(key).expect("a property of the tool");
    assert!(
        at(r#""prompt":"#) < at(r#""maxTokens":"#),
        "{}",
        &listed[tool..]
    );
    for (transport, mut through) in [("stdio", through_stdio), ("HTTP", through_http)] {
        // Conductor's own tool; and those server-everything lists only for a capability this
        // client did not declare (elicitation), which a shared server is offered.
        through.retain(|line| {
            let gated = super::support::EVERYTHING_CAPABILITY_GATED
                .iter()
                .any(|name| line.starts_with(&format!(r#"tool {{"name":"{name}""#)));
            !line.starts_with(r#"tool {"name":"orchestrate""#) && (!gated || direct.contains(line))
        });
        let only_direct: Vec<_> = direct
            .iter()
            .filter(|line| !through.contains(line))
            .collect();
        let only_through: Vec<_> = through
            .iter()
            .filter(|line| !direct.contains(line))
            .collect();
        assert!(
            only_direct.is_empty() && only_through.is_empty(),
            "over {transport}, seen only directly: {only_direct:#?}\n\nonly through conductor: {only_through:#?}"
        );
    }
}

/// A 2026-07-28 server stamps its results with its own identity
/// (`_meta["io.modelcontextprotocol/serverInfo"]`); through conductor, whose client's server
/// is conductor, no result carries it: not a tool's result (passed as text), nor a prompt's
/// (parsed).
#[tokio::test]
async fn a_downstreams_identity_stamp_stays_behind() {
    let root = super::support::project_root();
    let config = TestConfig::new(&format!(
        "[servers.py]\ncommand = \"{}\"\nargs = [\"{}\"]\nprotocol = \"discover\"\n",
        super::support::python(),
        root.join("tests/peers/py_fixture_server.py").display()
    ));
    let mut raw = super::support::RawSession::initialized(&config).await;
    for request in [
        json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
               "params": {"name": "py__test_simple_text", "arguments": {}}}),
        json!({"jsonrpc": "2.0", "id": 2, "method": "prompts/get",
               "params": {"name": "py__test_simple_prompt", "arguments": {}}}),
    ] {
        let answer = raw.exchange(&request.to_string()).await;
        assert!(answer.contains("\"result\""), "{request} => {answer}");
        assert!(
            !answer.contains("io.modelcontextprotocol/serverInfo"),
            "{request} => {answer}"
        );
    }
}

/// Log messages cross eras as they would reach the client directly: the Python SDK client
/// in each mode, with and without a per-request log level, gets as many from the Python SDK
/// server's logging tool through conductor (in front of it opened with `initialize` and with
/// `server/discover`) as it gets from that server directly.
#[tokio::test]
async fn log_messages_reach_clients_of_each_era_as_directly() {
    let root = super::support::project_root();
    let fixture = root.join("tests/peers/py_fixture_server.py");
    let fixture = fixture.display().to_string();
    let python = super::support::python();
    let runs: [&[&str]; 3] = [
        &["--mode", "legacy"],
        &["--mode", "auto"],
        &["--mode", "auto", "--log-level", "info"],
    ];
    for client in runs {
        let mut options = client.to_vec();
        options.extend(["--call", "test_tool_with_logging"]);
        let direct = super::support::py_client(&options, &[&python, &fixture]).await;
        let expected = &direct["logging"];
        for handshake in ["initialize", "discover"] {
            let config = TestConfig::new(&format!(
                "[servers.py]\ncommand = \"{python}\"\nargs = [\"{fixture}\"]\nprotocol = \"{handshake}\"\nprefix = false\n",
            ));
            let through = python_client(&config, &options).await;
            assert_eq!(
                &through["logging"], expected,
                "client {client:?}, downstream {handshake}: through {through:#} against directly {direct:#}"
            );
        }
    }
}

/// server-filesystem started with no folder takes its allowed folders from its client's roots,
/// asked once as it starts. As a session's own child it gets its client's roots then, for a
/// client of either era: a 2026-07-28 client, which cannot be asked outside a call, is asked
/// through the call that starts the child. (The server applies the roots after answering,
/// so the call that starts it may still find none: the second call is the one checked.)
#[tokio::test]
async fn a_sessions_child_gets_its_clients_roots_as_it_starts_in_both_eras() {
    let kept = tempfile::tempdir().unwrap();
    let folder = kept.path().canonicalize().unwrap();
    let root = format!("file://{}", folder.display());
    let config = TestConfig::new(&format!(
        "[servers.fs]\ncommand = \"node\"\nargs = [\"{}\"]\nisolation = \"session\"\n",
        node_server("server-filesystem"),
    ));
    for mode in ["legacy", "auto"] {
        let options = [
            "--mode",
            mode,
            "--roots",
            &root,
            "--call",
            "fs__list_allowed_directories",
            "--repeat",
            "2",
        ];
        let over_stdio = python_client(&config, &options).await;
        let server = super::support::HttpConductor::start(&config).await;
        let over_http = super::support::py_client(&options, &[&server.mcp()]).await;
        for (transport, out) in [("stdio", over_stdio), ("HTTP", over_http)] {
            if mode == "auto" && transport == "HTTP" {
                // A 2026-07-28 client over HTTP has no session: each of its requests is a
                // session of its own, with a child of its own (a known gap, see
                // docs/configuration.md), so each call's new child asks, and is answered
                // through that call; whether the folder is applied in time is the server's.
                assert!(
                    out["roots"].as_u64() >= Some(1),
                    "{mode}, {transport}: {out:#}"
                );
                continue;
            }
            assert_eq!(out["roots"], 1, "{mode}, {transport}: asked once: {out:#}");
            assert!(
                out["call"]
                    .to_string()
                    .contains(&folder.display().to_string()),
                "{mode}, {transport}: {out:#}"
            );
        }
    }
}

/// The Python SDK client, in each of its modes, sees server-everything the same directly and
/// through conductor over stdio: the same tools, prompts and resources (names without the
/// prefix) and the same results, field for field.
#[tokio::test]
async fn the_python_client_sees_server_everything_the_same_directly_and_through_conductor() {
    let everything = node_server("server-everything");
    let config = TestConfig::new(&format!(
        "[servers.everything]\ncommand = \"node\"\nargs = [\"{everything}\"]\n"
    ));
    // A client that answers sampling, elicitation and roots: server-everything offers the
    // tools that ask only to such a client, and conductor offers it every capability.
    let answering = super::support::ANSWERING;
    let calls = [
        ("echo", r#"{"message": "hi"}"#),
        ("get-sum", r#"{"a": 2, "b": 40}"#),
        ("get-structured-content", r#"{"location": "Chicago"}"#),
        ("get-annotated-message", r#"{"messageType": "success"}"#),
    ];
    for mode in ["legacy", "auto"] {
        for (tool, args) in calls {
            let mut direct_options = vec!["--mode", mode, "--call", tool, "--args", args];
            direct_options.extend(answering);
            let direct = super::support::py_client(&direct_options, &["node", &everything]).await;
            let public = format!("everything__{tool}");
            let mut options = vec!["--mode", mode, "--call", &public, "--args", args];
            options.extend(answering);
            let through = python_client(&config, &options).await;
            let what = format!("{mode}, {tool}");
            assert_eq!(direct["call"], through["call"], "{what}");
            for list in ["tools", "prompts", "resources"] {
                assert_eq!(
                    super::support::everything_names(&direct[list]),
                    super::support::everything_names(&through[list]),
                    "{what}: {list}"
                );
            }
        }
    }
}
