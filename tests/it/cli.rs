//! The `conductor` commands people and scripts use: `tools`, `call`, `check`.

use super::support::{TestConfig, conductor_cli};

/// Snapshots must not depend on where the test runs or how long startup took.
fn redact(text: &str, config: &TestConfig) -> String {
    let text = text.replace(&config.path.display().to_string(), "[CONFIG]");
    text.lines()
        .map(|line| {
            line.split("  ")
                .map(|cell| {
                    let trimmed = cell.trim();
                    let digits = trimmed.trim_end_matches("ms").trim_end_matches('s');
                    let is_duration = trimmed.ends_with('s')
                        && !digits.is_empty()
                        && digits.chars().all(|c| c.is_ascii_digit());
                    if is_duration {
                        cell.replace(trimmed, "[T]")
                    } else {
                        cell.to_owned()
                    }
                })
                .collect::<Vec<_>>()
                .join("  ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test]
async fn tools_lists_the_unified_catalog() {
    let config = TestConfig::fixtures(&[("echo", "echo"), ("math", "math")]);
    let (code, stdout, _) = conductor_cli(&config.path, &["tools"]).await;
    assert_eq!(code, 0);
    insta::assert_snapshot!(stdout);

    let (code, stdout, _) =
        conductor_cli(&config.path, &["tools", "--server", "math", "--json"]).await;
    assert_eq!(code, 0);
    insta::assert_snapshot!(stdout);

    let (code, _, stderr) = conductor_cli(&config.path, &["tools", "--server", "nope"]).await;
    assert_eq!(code, 1);
    assert_eq!(stderr.trim(), "error: no server named `nope` in the config");
}

#[tokio::test]
async fn call_prints_the_result_and_its_exit_code_says_if_it_failed() {
    let config = TestConfig::fixtures(&[("echo", "echo"), ("math", "math")]);
    let (code, stdout, _) =
        conductor_cli(&config.path, &["call", "echo__echo", r#"{"text":"hi"}"#]).await;
    assert_eq!((code, stdout.as_str()), (0, "hi\n"));

    let (code, stdout, _) = conductor_cli(
        &config.path,
        &["call", "math__add", r#"{"a":1,"b":2}"#, "--json"],
    )
    .await;
    assert_eq!(code, 0);
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(result["structuredContent"]["result"], 3.0);

    let (code, stdout, _) =
        conductor_cli(&config.path, &["call", "math__divide", r#"{"a":1,"b":0}"#]).await;
    assert_eq!((code, stdout.as_str()), (1, "division by zero\n"));

    let (code, _, stderr) = conductor_cli(&config.path, &["call", "math__ad", "{}"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: unknown tool `math__ad`; did you mean `math__add`?"
    );

    let (code, _, stderr) = conductor_cli(&config.path, &["call", "math__add", "[1]"]).await;
    assert_eq!(code, 1);
    assert_eq!(
        stderr.trim(),
        "error: the arguments must be a JSON object, not an array"
    );
}

#[tokio::test]
async fn conductors_own_tools_are_listed_and_called_as_a_client_sees_them() {
    let config = TestConfig::new(
        "[servers.echo]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n\n\
         [workflows.greet]\ndescription = \"Greet someone.\"\n\
         input_schema = { type = \"object\", properties = { who = { type = \"string\" } }, required = [\"who\"] }\n\
         output = \"${{ steps.hello.output }}\"\n\
         [[workflows.greet.steps]]\nid = \"hello\"\ntool = \"echo__echo\"\n\
         args = { text = \"hello ${{ inputs.who }}\" }\n",
    );
    let (code, stdout, stderr) = conductor_cli(&config.path, &["tools", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let names: Vec<_> = listed
        .iter()
        .map(|tool| (&tool["name"], &tool["server"]))
        .collect();
    assert_eq!(
        format!("{names:?}"),
        r#"[(String("echo__echo"), String("echo")), (String("echo__summarize_every_document_in_the_shared_knowledge__968872dc"), String("echo")), (String("orchestrate"), Null), (String("workflow__greet"), Null)]"#
    );
    assert_eq!(listed[3]["description"], "Greet someone.");
    // A server filter shows that server's tools only.
    let (code, stdout, _) = conductor_cli(&config.path, &["tools", "--server", "echo"]).await;
    assert_eq!(code, 0);
    assert!(stdout.trim_end().ends_with("\n2 tools"), "{stdout}");

    let (code, stdout, stderr) = conductor_cli(
        &config.path,
        &["call", "workflow__greet", r#"{"who":"Ada"}"#, "--json"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(
        result["structuredContent"]["status"], "succeeded",
        "{stdout}"
    );
    assert_eq!(
        result["structuredContent"]["output"]["text"], "hello Ada",
        "{stdout}"
    );

    // Its input is checked against its schema, as a client's call is; the run says what is wrong.
    let (code, stdout, _) = conductor_cli(&config.path, &["call", "workflow__greet", "{}"]).await;
    assert_eq!(code, 1);
    assert!(
        stdout.contains(r#""who" is a required property"#),
        "{stdout}"
    );

    let workflow = r#"{"steps": [{"id": "a", "tool": "echo__echo", "args": {"text": "hi"}}]}"#;
    let (code, stdout, stderr) =
        conductor_cli(&config.path, &["call", "orchestrate", workflow]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("succeeded"), "{stdout}");
}

#[tokio::test]
async fn check_shows_every_server_and_fails_when_one_failed() {
    let config = TestConfig::new(
        "[servers.echo]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n\n\
         [servers.content]\ncommand = \"{fixture}\"\nargs = [\"content\"]\n\n\
         [servers.broken]\ncommand = \"/nonexistent/mcp-server\"\n\n\
         [servers.off]\ncommand = \"x\"\nenabled = false\n",
    );
    let (code, stdout, _) = conductor_cli(&config.path, &["check"]).await;
    assert_eq!(code, 1);
    insta::assert_snapshot!(redact(&stdout, &config));

    let healthy = TestConfig::fixtures(&[("echo", "echo")]);
    let (code, _, _) = conductor_cli(&healthy.path, &["check"]).await;
    assert_eq!(code, 0);
}

#[tokio::test]
async fn a_bad_config_is_reported_with_file_line_and_column() {
    let config = TestConfig::new("[servers.echo]\ncommand = \"{fixture}\"\nargz = [\"echo\"]\n");
    let (code, stdout, stderr) = conductor_cli(&config.path, &["check"]).await;
    assert_eq!(code, 1);
    assert_eq!(stdout, "");
    insta::assert_snapshot!(redact(&stderr, &config));
}

#[tokio::test]
async fn a_thread_count_of_zero_is_refused_by_name() {
    let config = TestConfig::new("");
    let (code, stdout, stderr) = conductor_cli(&config.path, &["serve", "--threads", "0"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stdout, "");
    assert!(stderr.contains("--threads"), "{stderr}");
}

/// A server that dies as it starts: `check` shows why, from the last lines it wrote to
/// stderr, without `--log`.
#[tokio::test]
async fn check_shows_what_a_failed_server_said_on_stderr() {
    let config = TestConfig::new(
        "[servers.broken]\ncommand = \"sh\"\nargs = [\"-c\", \"echo 'ImportError: no mcp_thing' >&2; exit 3\"]\n",
    );
    let (code, stdout, _) = conductor_cli(&config.path, &["check"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(
        stdout.contains("its stderr ended with: ImportError"),
        "{stdout}"
    );
    assert!(
        stdout.contains("the server exited with status 3"),
        "and how it ended: {stdout}"
    );
}

/// A remote server that refuses conductor's credentials (HTTP 401) is `failed
/// (unauthorized)`, said in words about the server (no rmcp type names), not tried again,
/// and `check` exits 1; with the token in its `headers` it is ready.
#[tokio::test]
async fn a_remote_that_refuses_the_token_is_failed_unauthorized() {
    let token = "a-test-token-0123456789";
    let remote = TestConfig::new(&format!(
        "[http]\ntokens = [\"{token}\"]\n\n[servers.echo]\ncommand = \"{{fixture}}\"\nargs = [\"echo\"]\n"
    ));
    let server = super::support::HttpConductor::start(&remote).await;
    let without = TestConfig::new(&format!("[servers.remote]\nurl = \"{}\"\n", server.mcp()));
    let (code, stdout, _) = conductor_cli(&without.path, &["check"]).await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("failed (unauthorized)"), "{stdout}");
    assert!(stdout.contains("HTTP 401"), "{stdout}");
    assert!(!stdout.contains("rmcp::"), "{stdout}");
    let with = TestConfig::new(&format!(
        "[servers.remote]\nurl = \"{}\"\nheaders = {{ Authorization = \"Bearer {token}\" }}\n",
        server.mcp()
    ));
    let (code, stdout, _) = conductor_cli(&with.path, &["check"]).await;
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("ready"), "{stdout}");
}

/// `conductor import` in a folder, with `HOME` there too (the hosts' usual places), and no
/// variable of the imported files set.
async fn import_in(dir: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(super::support::CONDUCTOR)
        .arg("import")
        .args(args)
        .current_dir(dir)
        .env("HOME", dir)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("CONDUCTOR_TOKEN")
        .output()
        .await
        .expect("conductor runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Each host's file, as its documentation shows it (Claude Desktop, Cursor, VS Code, Claude
/// Code's `.mcp.json` and `~/.claude.json`), becomes a `servers.toml` that loads, with a note
/// for each thing that does not carry over.
#[tokio::test]
async fn import_writes_each_hosts_servers_as_a_config() {
    let samples = super::support::project_root().join("tests/it/import");
    for sample in [
        "claude_desktop_config.json",
        "cursor_mcp.json",
        "vscode_mcp.json",
        "claude_code_mcp.json",
        "claude.json",
    ] {
        let (code, stdout, stderr) = import_in(&samples, &[sample]).await;
        assert_eq!(code, 0, "{sample}: {stderr}");
        insta::assert_snapshot!(
            format!("import_{}", sample.trim_end_matches(".json")),
            format!("{stdout}\n--- notes ---\n{stderr}")
        );
    }
}

/// An imported Claude Desktop config serves: found at the host's usual place, written to
/// `--output` (kept unless `--force`), and `check` passes with its server up.
#[tokio::test]
async fn an_imported_config_serves() {
    let config = TestConfig::new("");
    let dir = config.dir.path();
    let desktop = dir.join(".config/Claude");
    std::fs::create_dir_all(&desktop).unwrap();
    let host = serde_json::json!({"mcpServers": {"echo": {
        "command": super::support::FIXTURE, "args": ["echo"], "env": {"GREETING": "hi"}}}});
    std::fs::write(desktop.join("claude_desktop_config.json"), host.to_string()).unwrap();
    let written = dir.join("imported.toml");
    let output = written.display().to_string();
    let (code, _, stderr) =
        import_in(dir, &["--from", "claude-desktop", "--output", &output]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("wrote 1 server"), "{stderr}");
    let (code, _, stderr) =
        import_in(dir, &["--from", "claude-desktop", "--output", &output]).await;
    assert_eq!(code, 1, "an existing file is kept: {stderr}");
    assert!(stderr.contains("--force"), "{stderr}");
    let (code, stdout, stderr) = conductor_cli(&written, &["check"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("echo") && stdout.contains("ready"),
        "{stdout}"
    );
    let (code, _, stderr) = import_in(dir, &["--from", "cursor"]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains(".cursor/mcp.json"),
        "names where it looked: {stderr}"
    );
}

/// `conductor call` takes a client's path: a read-only tool that times out is tried again,
/// three times in all, as a proxied call is (issue 25: it used to be tried once).
#[tokio::test]
async fn call_retries_as_a_clients_call_does() {
    let config = TestConfig::slow_fixture("", "call_timeout = \"200ms\"\n");
    let (code, _, stderr) = conductor_cli(
        &config.path,
        &["call", "slow__slow_read", r#"{"ms": 3000}"#],
    )
    .await;
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("timed out"), "{stderr}");
    let log = std::fs::read_to_string(config.events_file()).unwrap_or_default();
    assert_eq!(
        log.lines()
            .filter(|line| *line == "started read 3000")
            .count(),
        3,
        "{log}"
    );
}
