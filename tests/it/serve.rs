//! `conductor serve` as a real child process, spoken to over stdio by an rmcp client, in front
//! of fixture servers over stdio and Streamable HTTP.

use std::time::Duration;

use rmcp::model::{
    ArgumentInfo, CallToolRequest, CallToolRequestParams, ClientRequest, CompleteRequestParams,
    ErrorCode, GetPromptRequestParams, ReadResourceRequestParams, Reference,
};
use rmcp::service::{PeerRequestOptions, ServiceError};
use serde_json::{Value, json};

use super::support::{HttpFixture, RawSession, TestConfig, call, serve, text_of};

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap()
}

#[tokio::test]
async fn tools_from_stdio_and_http_downstreams_pass_through_unchanged() {
    let remote = HttpFixture::start("echo").await;
    let config = TestConfig::new(&format!(
        "[servers.echo]\ncommand = \"{{fixture}}\"\nargs = [\"echo\"]\n\n\
         [servers.math]\ncommand = \"{{fixture}}\"\nargs = [\"math\"]\n\n\
         [servers.remote]\nurl = \"{}\"\n",
        remote.url
    ));
    let session = serve(&config).await;

    let tools = session.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_ref()).collect();
    assert_eq!(
        names,
        [
            "echo__echo",
            "echo__summarize_every_document_in_the_shared_knowledge__968872dc",
            "math__add",
            "math__divide",
            "remote__echo",
            // A different prefix is a different full name, so a different hash.
            "remote__summarize_every_document_in_the_shared_knowledg_1da24df1",
            "orchestrate",
        ]
    );
    // Everything but the name is the downstream's own.
    let echo = to_json(&tools[0]);
    assert_eq!(echo["title"], "Echo");
    assert_eq!(echo["outputSchema"]["required"], json!(["text", "length"]));
    assert_eq!(
        echo["annotations"],
        json!({"readOnlyHint": true, "idempotentHint": true, "openWorldHint": false})
    );
    assert_eq!(echo["icons"][0]["mimeType"], "image/png");
    assert_eq!(echo["_meta"], json!({"fixture/owner": "echo"}));

    let result = call(&session, "echo__echo", json!({"text": "héllo"})).await;
    assert_eq!(text_of(&result), "héllo");
    assert_eq!(
        result.structured_content,
        Some(json!({"text": "héllo", "length": 5}))
    );
    assert_eq!(result.is_error, Some(false));

    let result = call(&session, "remote__echo", json!({"text": "over http"})).await;
    assert_eq!(
        result.structured_content,
        Some(json!({"text": "over http", "length": 9}))
    );

    let result = call(&session, "math__add", json!({"a": 2, "b": 3})).await;
    assert_eq!(result.structured_content, Some(json!({"result": 5.0})));

    let result = call(&session, "math__divide", json!({"a": 1, "b": 0})).await;
    assert_eq!(result.is_error, Some(true));
    assert_eq!(text_of(&result), "division by zero");

    // A downstream's own protocol error comes back as it is.
    let error = session
        .call_tool(
            CallToolRequestParams::new("math__add")
                .with_arguments(json!({"a": "x"}).as_object().cloned().unwrap()),
        )
        .await
        .unwrap_err();
    let ServiceError::McpError(error) = error else {
        panic!("{error}")
    };
    assert_eq!(error.code, ErrorCode::INVALID_PARAMS);
    assert_eq!(error.message, "`a` must be a number");
}

#[tokio::test]
async fn every_content_kind_prompts_resources_and_completions_reach_their_owner() {
    let config = TestConfig::fixtures(&[("content", "content"), ("math", "math")]);
    let session = serve(&config).await;

    let result = call(&session, "content__kinds", json!({})).await;
    let kinds: Vec<Value> = to_json(&result.content)
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["type"].clone())
        .collect();
    assert_eq!(
        kinds,
        [
            json!("text"),
            json!("image"),
            json!("audio"),
            json!("resource"),
            json!("resource_link")
        ]
    );
    assert_eq!(to_json(&result.content)[3]["resource"]["text"], "# Fixture");

    let prompts = session.list_all_prompts().await.unwrap();
    assert_eq!(
        prompts.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["content__greet"]
    );
    assert_eq!(prompts[0].title.as_deref(), Some("Greeting"));
    let prompt = session
        .get_prompt(
            GetPromptRequestParams::new("content__greet")
                .with_arguments(json!({"name": "Ada"}).as_object().cloned().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(
        to_json(&prompt.messages)[0]["content"]["text"],
        "Hello, Ada!"
    );

    let resources = session.list_all_resources().await.unwrap();
    let uris: Vec<&str> = resources.iter().map(|r| r.uri.as_str()).collect();
    assert_eq!(uris, ["fixture://readme", "fixture://logo"]);
    let templates = session.list_all_resource_templates().await.unwrap();
    assert_eq!(templates[0].uri_template, "fixture://items/{id}");

    let read = session
        .read_resource(ReadResourceRequestParams::new("fixture://readme"))
        .await
        .unwrap();
    assert_eq!(
        to_json(&read.contents)[0]["text"],
        "# Fixture\nA server for tests."
    );
    let read = session
        .read_resource(ReadResourceRequestParams::new("fixture://logo"))
        .await
        .unwrap();
    assert!(to_json(&read.contents)[0]["blob"].is_string());
    let read = session
        .read_resource(ReadResourceRequestParams::new("fixture://items/42"))
        .await
        .unwrap();
    assert_eq!(to_json(&read.contents)[0]["text"], "item 42");

    let completion = session
        .complete(CompleteRequestParams::new(
            Reference::for_prompt("content__greet"),
            ArgumentInfo::new("name", "A"),
        ))
        .await
        .unwrap();
    assert_eq!(completion.completion.values, ["Ada", "Alan"]);
    let completion = session
        .complete(CompleteRequestParams::new(
            Reference::for_resource("fixture://items/{id}"),
            ArgumentInfo::new("id", "1"),
        ))
        .await
        .unwrap();
    assert_eq!(completion.completion.values, ["1", "10"]);

    // An unknown resource is a protocol error that names it.
    let error = session
        .read_resource(ReadResourceRequestParams::new("nope://x"))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("nope://x"), "{error}");
}

#[tokio::test]
async fn an_unknown_tool_gets_an_error_with_the_nearest_name() {
    let config = TestConfig::fixtures(&[("math", "math")]);
    let session = serve(&config).await;
    let error = session
        .call_tool(CallToolRequestParams::new("math__ad"))
        .await
        .unwrap_err();
    let ServiceError::McpError(error) = error else {
        panic!("{error}")
    };
    assert_eq!(error.code, ErrorCode::INVALID_PARAMS);
    assert_eq!(
        error.message,
        "unknown tool `math__ad`; did you mean `math__add`?"
    );
}

#[tokio::test]
async fn a_server_that_fails_to_start_is_absent_and_the_rest_serve() {
    let config = TestConfig::new(
        "[servers.broken]\ncommand = \"/nonexistent/mcp-server\"\n\n\
         [servers.hung]\ncommand = \"{fixture}\"\nargs = [\"slow-start\"]\nstartup_timeout = \"500ms\"\n\n\
         [servers.echo]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n",
    );
    let session = serve(&config).await;
    let tools = session.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_ref()).collect();
    assert_eq!(
        names,
        [
            "echo__echo",
            "echo__summarize_every_document_in_the_shared_knowledge__968872dc",
            "orchestrate"
        ]
    );
    let result = call(&session, "echo__echo", json!({"text": "still here"})).await;
    assert_eq!(text_of(&result), "still here");
}

#[tokio::test]
async fn list_changes_downstream_reach_the_client() {
    let config = TestConfig::fixtures(&[("live", "changing")]);
    let session = serve(&config).await;
    let recorder = session.service().recorder.clone();

    call(&session, "live__add_tool", json!({"name": "fresh"})).await;
    recorder
        .wait_for("notifications/tools/list_changed", 1)
        .await;
    let tools = session.list_all_tools().await.unwrap();
    assert!(
        tools.iter().any(|tool| tool.name == "live__fresh"),
        "{tools:?}"
    );
    assert_eq!(
        text_of(&call(&session, "live__fresh", json!({})).await),
        "fresh ran"
    );

    call(&session, "live__add_prompt", json!({"name": "hello"})).await;
    recorder
        .wait_for("notifications/prompts/list_changed", 1)
        .await;
    let prompts = session.list_all_prompts().await.unwrap();
    assert_eq!(
        prompts.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["live__hello"]
    );

    call(&session, "live__add_resource", json!({"name": "doc"})).await;
    recorder
        .wait_for("notifications/resources/list_changed", 1)
        .await;
    let read = session
        .read_resource(ReadResourceRequestParams::new("fixture://added/doc"))
        .await
        .unwrap();
    assert_eq!(to_json(&read.contents)[0]["text"], "added resource doc");

    // A server that says its lists changed when they read the same: the client is told
    // anyway, as it would be directly.
    call(&session, "live__announce", json!({})).await;
    for (list, times) in [("tools", 2), ("prompts", 2), ("resources", 2)] {
        recorder
            .wait_for(&format!("notifications/{list}/list_changed"), times)
            .await;
    }
}

/// A config with the `slow` fixture as server `slow`, recording its events to the config's
/// events file, with `extra` lines added to its table.
fn slow_fixture(extra: &str) -> TestConfig {
    TestConfig::slow_fixture("", extra)
}

async fn wait_for_event(config: &TestConfig, event: &str) {
    config.wait_for_recorded(event, 1).await;
}

/// Have the content fixture say `uri` changed, and wait until `session` hears of it.
async fn touch_and_hear(session: &super::support::Session, uri: &str) {
    call(session, "content__touch", json!({ "uri": uri })).await;
    let recorder = session.service().recorder.clone();
    recorder.wait_for(&format!("updated {uri}"), 1).await;
}

/// A config with the content fixture recording its events; `keys` are more keys of its
/// table, `env` more entries of its environment (each starting with a comma).
fn content_config(keys: &str, env: &str) -> TestConfig {
    let config = TestConfig::new("");
    let events = config.events_file().display().to_string();
    std::fs::write(
        &config.path,
        format!(
            "[servers.content]\ncommand = \"{}\"\nargs = [\"content\"]\n{keys}\
             env = {{ FIXTURE_EVENTS = \"{events}\"{env} }}\n",
            super::support::FIXTURE
        ),
    )
    .unwrap();
    config
}

#[tokio::test]
async fn a_call_timeout_answers_the_client_and_cancels_downstream() {
    let config = slow_fixture("call_timeout = \"300ms\"\n");
    let session = serve(&config).await;

    let result = call(&session, "slow__sleep", json!({"ms": 20000})).await;
    assert_eq!(result.is_error, Some(true));
    assert_eq!(
        text_of(&result),
        "server `slow`: `tools/call sleep` timed out after 300ms"
    );
    wait_for_event(&config, "cancelled sleep 20000").await;

    let result = call(&session, "slow__sleep", json!({"ms": 10})).await;
    assert_eq!(
        text_of(&result),
        "slept 10 ms",
        "the server still serves after a timeout"
    );
}

#[tokio::test]
async fn timeouts_per_tool_and_reset_by_progress() {
    let config = slow_fixture(
        "call_timeout = \"400ms\"\ntimeout_resets_on_progress = true\nmax_call_time = \"2s\"\nbreaker_failures = 100\n\
         [servers.slow.tools]\ntimeouts = { slow_read = \"150ms\" }\n",
    );
    let session = serve(&config).await;
    let answer = |name: &'static str, arguments: serde_json::Value| {
        let session = &session;
        async move { text_of(&call(session, name, arguments).await) }
    };
    // Progress every 100 ms keeps a one-second call alive past its 400 ms timeout...
    assert_eq!(
        answer("slow__sleep", json!({"ms": 1000, "progress_every": 100})).await,
        "slept 1000 ms"
    );
    // ...silence does not...
    assert_eq!(
        answer("slow__sleep", json!({"ms": 1000})).await,
        "server `slow`: `tools/call sleep` timed out after 400ms"
    );
    // ...and progress cannot stretch a call past `max_call_time`.
    assert_eq!(
        answer("slow__sleep", json!({"ms": 10000, "progress_every": 100})).await,
        "server `slow`: `tools/call sleep` timed out after 2s"
    );
    wait_for_event(&config, "cancelled sleep 10000").await;
    // A tool's own timeout replaces the server's.
    assert_eq!(
        answer("slow__slow_read", json!({"ms": 250})).await,
        "server `slow`: `tools/call slow_read` timed out after 150ms"
    );
    assert_eq!(
        answer("slow__sleep", json!({"ms": 250})).await,
        "slept 250 ms"
    );
}

#[tokio::test]
async fn a_client_cancellation_reaches_the_downstream() {
    let config = slow_fixture("");
    let session = serve(&config).await;

    let request = ClientRequest::CallToolRequest(CallToolRequest::new(
        CallToolRequestParams::new("slow__sleep")
            .with_arguments(json!({"ms": 20000}).as_object().cloned().unwrap()),
    ));
    let handle = session
        .peer()
        .send_cancellable_request(request, PeerRequestOptions::no_options())
        .await
        .unwrap();
    wait_for_event(&config, "started sleep 20000").await;
    handle
        .cancel(Some("changed my mind".to_owned()))
        .await
        .unwrap();
    wait_for_event(&config, "cancelled sleep 20000").await;
}

/// Cache hints (SEP-2549): a downstream's list is listed again when its `ttlMs` runs out, even
/// with no `list_changed`, and conductor's own list carries the earliest expiry and the
/// narrowest scope of what it is made of.
#[tokio::test]
async fn list_cache_hints_are_honoured_and_passed_on() {
    let config = TestConfig::new(
        "[servers.hinted]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\nenv = { FIXTURE_LIST_TTL_MS = \"1000\" }\n\n\
         [servers.plain]\ncommand = \"{fixture}\"\nargs = [\"math\"]\n",
    );
    let session = serve(&config).await;
    let description = |list: &rmcp::model::ListToolsResult| {
        list.tools
            .iter()
            .find(|tool| tool.name == "hinted__echo")
            .and_then(|tool| tool.description.as_deref().map(str::to_owned))
            .unwrap_or_default()
    };
    let first = session.list_tools(None).await.unwrap();
    assert_eq!(description(&first), "listing 1");
    // `plain` gives no ttl, so conductor promises none either; one private part makes the
    // whole list private.
    assert_eq!(first.ttl_ms, None);
    assert_eq!(first.cache_scope, Some(rmcp::model::CacheScope::Private));

    super::support::eventually(
        Duration::from_secs(10),
        "the tools listed again (`listing 2`)",
        || async {
            let list = session.list_tools(None).await.unwrap();
            (description(&list) == "listing 2").then_some(())
        },
    )
    .await;
    session.cancel().await.unwrap();

    let config = TestConfig::new(
        "[servers.hinted]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\nenv = { FIXTURE_LIST_TTL_MS = \"60000\" }\n",
    );
    let session = serve(&config).await;
    let list = session.list_tools(None).await.unwrap();
    let ttl = list.ttl_ms.expect("a ttl from the only downstream");
    assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");
    assert_eq!(list.cache_scope, Some(rmcp::model::CacheScope::Private));
}

/// A downstream that makes a task of a call (tasks extension) is followed by conductor: the
/// client gets the call's result, and a client that cancels cancels the task.
#[tokio::test]
async fn a_task_made_of_a_call_is_followed_to_its_result_or_cancelled() {
    let config = slow_fixture("");
    let session = serve(&config).await;
    let result = call(&session, "slow__task_sleep", json!({"ms": 200})).await;
    assert_eq!(text_of(&result), "task slept 200 ms");
    wait_for_event(&config, "task task-0 for 200 ms").await;

    let request = ClientRequest::CallToolRequest(CallToolRequest::new(
        CallToolRequestParams::new("slow__task_sleep")
            .with_arguments(json!({"ms": 20000}).as_object().cloned().unwrap()),
    ));
    let handle = session
        .peer()
        .send_cancellable_request(request, PeerRequestOptions::no_options())
        .await
        .unwrap();
    wait_for_event(&config, "task task-1 for 20000 ms").await;
    handle.cancel(None).await.unwrap();
    wait_for_event(&config, "cancelled task task-1").await;
}

/// A 2026-07-28 client on stdio begins without `initialize` and names its version and
/// capabilities in each request. The front answers its plain calls as rmcp's own path answers
/// the same requests (`requestState: null` sends one there): results marked complete, tool
/// errors as they are; and a downstream's requests for input during a call come back as
/// `input_required`, whose retries finish the call.
#[tokio::test]
async fn a_2026_clients_calls_on_stdio_are_answered_as_rmcp_answers_them() {
    let config = TestConfig::new(
        "[servers.math]\ncommand = \"{fixture}\"\nargs = [\"math\"]\n\n\
         [servers.slow]\ncommand = \"{fixture}\"\nargs = [\"slow\"]\nisolation = \"session\"\n",
    );
    let mut raw = RawSession::start(&config);
    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {"sampling": {}, "roots": {}}
    });
    let mut next_id = 0;
    let mut call = async |raw: &mut RawSession, params: Value| -> Value {
        next_id += 1;
        raw.send(
            &json!({"jsonrpc": "2.0", "id": next_id, "method": "tools/call", "params": params}),
        )
        .await;
        loop {
            let message = raw.next().await;
            if message["id"] == next_id {
                break message;
            }
        }
    };
    let params = |name: &str, arguments: Value| json!({"name": name, "arguments": arguments, "_meta": meta.clone()});
    // rmcp opens the session with the first request; the front takes those after it.
    let first = call(&mut raw, params("math__add", json!({"a": 0, "b": 0}))).await;
    assert_eq!(first["result"]["resultType"], "complete", "{first}");

    for (name, arguments) in [
        ("math__add", json!({"a": 1, "b": 2})),
        ("math__divide", json!({"a": 1, "b": 0})),
        ("math__nope", json!({})),
    ] {
        let front = call(&mut raw, params(name, arguments.clone())).await;
        let mut rmcps = params(name, arguments);
        rmcps["requestState"] = Value::Null;
        let rmcps = call(&mut raw, rmcps).await;
        assert_eq!(
            (&front["result"], &front["error"]),
            (&rmcps["result"], &rmcps["error"]),
            "{name}"
        );
    }
    let added = call(&mut raw, params("math__add", json!({"a": 1, "b": 2}))).await;
    assert_eq!(added["result"]["resultType"], "complete", "{added}");
    assert_eq!(
        added["result"]["structuredContent"]["result"], 3.0,
        "{added}"
    );

    // The downstream (2025-06-18) samples, then asks for roots: two rounds of input.
    let mut answer = call(&mut raw, params("slow__ask", json!({"prompt": "hi"}))).await;
    let mut methods = Vec::new();
    while answer["result"]["resultType"] == "input_required" {
        let mut responses = serde_json::Map::new();
        for (key, request) in answer["result"]["inputRequests"].as_object().unwrap() {
            let method = request["method"].as_str().unwrap().to_owned();
            let response = match method.as_str() {
                "sampling/createMessage" => json!({"role": "assistant", "model": "test",
                    "content": {"type": "text", "text": "sampled hi"}}),
                "roots/list" => json!({"roots": [{"uri": "file:///tmp/a", "name": "a"}]}),
                other => panic!("asked {other}: {answer}"),
            };
            methods.push(method);
            responses.insert(key.clone(), response);
        }
        let mut retry = params("slow__ask", json!({"prompt": "hi"}));
        retry["requestState"] = answer["result"]["requestState"].clone();
        retry["inputResponses"] = Value::Object(responses);
        answer = call(&mut raw, retry).await;
    }
    assert_eq!(
        methods,
        ["sampling/createMessage", "roots/list"],
        "{answer}"
    );
    assert_eq!(answer["result"]["resultType"], "complete", "{answer}");
    assert_eq!(
        answer["result"]["content"][0]["text"], "sampled hi; roots: 1",
        "{answer}"
    );
}

/// A 2026-07-28 client in auto mode sends `server/discover` before anything else; it must get
/// an answer, and the connection must stay usable.
#[tokio::test]
async fn server_discover_before_initialize_gets_an_answer() {
    let config = TestConfig::fixtures(&[("math", "math")]);
    let mut raw = RawSession::start(&config);
    let mut exchange = async |message: Value| -> Value {
        raw.send(&message).await;
        raw.next().await
    };

    let meta = json!({
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {}
    });
    let discover = exchange(
        json!({"jsonrpc": "2.0", "id": 1, "method": "server/discover", "params": {"_meta": meta}}),
    )
    .await;
    assert_eq!(discover["id"], 1);
    let versions = discover["result"]["supportedVersions"]
        .as_array()
        .expect("a discover result");
    assert!(versions.contains(&json!("2026-07-28")), "{discover}");
    assert!(versions.contains(&json!("2025-06-18")), "{discover}");

    // The same connection then serves a 2026-07-28 request with its metadata inline.
    let listed = exchange(
        json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list", "params": {"_meta": meta}}),
    )
    .await;
    let names: Vec<&str> = listed["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["math__add", "math__divide", "orchestrate"]);
}

#[tokio::test]
async fn list_changes_from_an_http_downstream_reach_the_client() {
    let remote = HttpFixture::start("changing").await;
    let config = TestConfig::new(&format!("[servers.live]\nurl = \"{}\"\n", remote.url));
    let session = serve(&config).await;
    let recorder = session.service().recorder.clone();

    call(&session, "live__add_tool", json!({"name": "remote_fresh"})).await;
    recorder
        .wait_for("notifications/tools/list_changed", 1)
        .await;
    assert_eq!(
        text_of(&call(&session, "live__remote_fresh", json!({})).await),
        "remote_fresh ran"
    );
}

/// The pids of the processes whose parent is `parent`, from /proc.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // The fields after the parenthesized command name: state, then the parent pid.
                stat.rsplit_once(") ")
                    .and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

fn is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}

#[tokio::test]
async fn children_stop_when_the_client_goes_away() {
    let config = TestConfig::fixtures(&[("echo", "echo"), ("math", "math")]);
    let mut raw = RawSession::start(&config);
    let conductor = raw.pid();
    let mut downstreams = Vec::new();
    for _ in 0..100 {
        downstreams = children_of(conductor);
        if downstreams.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(downstreams.len(), 2, "conductor started both fixtures");

    // A host's whole life over stdio: the handshake, then closing stdin to say goodbye.
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}});
    raw.send(&initialize).await;
    let answer = raw.next().await;
    assert_eq!(
        answer["result"]["protocolVersion"], "2025-06-18",
        "{answer}"
    );
    raw.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .await;
    let status = raw.close().await;
    assert!(status.success(), "{status}");
    for pid in downstreams {
        assert!(!is_running(pid), "downstream {pid} outlived conductor");
    }
}

#[tokio::test]
async fn a_failing_server_trips_its_circuit_breaker_and_a_trial_closes_it() {
    let config = slow_fixture(
        "call_timeout = \"100ms\"\nbreaker_failures = 2\nbreaker_cool_down = \"700ms\"\n",
    );
    let session = serve(&config).await;
    for _ in 0..2 {
        let result = call(&session, "slow__sleep", json!({"ms": 5000})).await;
        assert!(text_of(&result).contains("timed out"), "{result:?}");
    }
    // Open: the call fails at once and never reaches the server.
    let refused = call(&session, "slow__sleep", json!({"ms": 11})).await;
    assert_eq!(refused.is_error, Some(true));
    assert!(
        text_of(&refused).contains("the circuit is open after repeated failures"),
        "{refused:?}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    // After the cool-down a trial goes through, and its success closes the circuit.
    assert_eq!(
        text_of(&call(&session, "slow__sleep", json!({"ms": 12})).await),
        "slept 12 ms"
    );
    assert_eq!(
        text_of(&call(&session, "slow__sleep", json!({"ms": 13})).await),
        "slept 13 ms"
    );
    let log = std::fs::read_to_string(config.events_file()).unwrap();
    assert!(
        !log.contains("started sleep 11"),
        "the refused call was not sent: {log}"
    );
}

#[tokio::test]
async fn proxied_calls_are_retried_by_the_tools_annotations() {
    let config = slow_fixture("call_timeout = \"200ms\"\n");
    let session = serve(&config).await;
    let read = call(&session, "slow__slow_read", json!({"ms": 3000})).await;
    assert!(text_of(&read).contains("timed out"), "{read:?}");
    let write = call(&session, "slow__sleep", json!({"ms": 3000})).await;
    assert!(text_of(&write).contains("timed out"), "{write:?}");
    wait_for_event(&config, "cancelled sleep 3000").await;
    let log = std::fs::read_to_string(config.events_file()).unwrap();
    // Read-only: tried three times. A write that may have happened: once.
    assert_eq!(
        log.lines()
            .filter(|line| *line == "started read 3000")
            .count(),
        3,
        "{log}"
    );
    assert_eq!(
        log.lines()
            .filter(|line| *line == "started sleep 3000")
            .count(),
        1,
        "{log}"
    );
}

#[tokio::test]
async fn a_downstreams_progress_reaches_the_client_before_the_result() {
    let config = slow_fixture("");
    let session = serve(&config).await;
    let recorder = session.service().recorder.clone();
    // rmcp's client asks for progress on every request, with a token of its own.
    let result = call(
        &session,
        "slow__sleep",
        json!({"ms": 600, "progress_every": 100}),
    )
    .await;
    assert_eq!(text_of(&result), "slept 600 ms");
    let seen = recorder.count("notifications/progress");
    assert!(seen >= 5, "{seen} progress notifications before the result");
}

/// A `tools/list` conductor answers from its pages kept as text is the answer rmcp's own
/// path gives (a request with a param the text path does not take goes there), and follows
/// the catalog when a downstream's tools change.
#[tokio::test]
async fn tools_list_from_kept_pages_is_rmcps_answer_and_follows_the_catalog() {
    let config = TestConfig::fixtures(&[("changing", "changing"), ("math", "math")]);
    let mut raw = RawSession::initialized(&config).await;

    let mut next_id = 1;
    let mut both_ways = async |raw: &mut RawSession| -> Vec<String> {
        let mut answers = Vec::new();
        for params in [json!({}), json!({"rmcp-only": true})] {
            next_id += 1;
            raw.send(
                &json!({"jsonrpc": "2.0", "id": next_id, "method": "tools/list", "params": params}),
            )
            .await;
            let answer = loop {
                let message = raw.next().await;
                if message["id"] == next_id {
                    break message;
                }
            };
            answers.push(answer["result"].clone());
        }
        assert_eq!(answers[0], answers[1], "the kept page is rmcp's answer");
        answers[0]["tools"]
            .as_array()
            .expect("tools")
            .iter()
            .map(|tool| tool["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let before = both_ways(&mut raw).await;
    assert!(before.contains(&"math__add".to_owned()), "{before:?}");
    assert!(before.contains(&"orchestrate".to_owned()), "{before:?}");
    assert!(
        !before.contains(&"changing__fresh".to_owned()),
        "{before:?}"
    );

    raw.send(
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
        "name": "changing__add_tool", "arguments": {"name": "fresh"}}}),
    )
    .await;
    // The client hears of the change once the catalog has it.
    let mut answered = false;
    let mut told = false;
    while !(answered && told) {
        let message = raw.next().await;
        answered |= message["id"] == 1;
        told |= message["method"] == "notifications/tools/list_changed";
    }
    let after = both_ways(&mut raw).await;
    assert!(after.contains(&"changing__fresh".to_owned()), "{after:?}");
    assert_eq!(after.len(), before.len() + 1);
}

/// Progress the downstream writes right before its answer reaches the client before the
/// answer too, all of it and in order: read off conductor's stdout as the client gets it.
#[tokio::test]
async fn a_burst_of_progress_right_before_the_result_comes_first_and_in_order() {
    let config = slow_fixture("");
    let mut raw = RawSession::initialized(&config).await;

    for (id, token) in [(1, json!("mine")), (2, json!(7))] {
        let call = json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {
            "name": "slow__sleep", "arguments": {"ms": 0, "progress_burst": 20},
            "_meta": {"progressToken": token}}});
        raw.send(&call).await;
        let mut progress = Vec::new();
        let answer = loop {
            let message = raw.next().await;
            if message["method"] == "notifications/progress" {
                assert_eq!(message["params"]["progressToken"], token, "{message}");
                progress.push(message["params"]["progress"].as_f64().unwrap());
            } else if message.get("id").is_some() {
                break message;
            }
        };
        assert_eq!(answer["id"], id, "{answer}");
        assert_eq!(answer["result"]["content"][0]["text"], "slept 0 ms");
        let expected: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(
            progress, expected,
            "all the progress, in order, before the answer"
        );
    }
}

/// `orchestrate` and saved workflows called plainly are run by the front, not rmcp: the answer
/// must be the one rmcp's handler gives, and the workflow's progress must come before it.
#[tokio::test]
async fn a_workflow_called_plainly_answers_as_rmcp_does_with_progress_first() {
    let config = slow_fixture("");
    config.with_naps_workflow();
    let mut raw = RawSession::initialized(&config).await;

    let orchestrate = json!({"steps": [
        {"id": "first", "tool": "slow__sleep", "args": {"ms": 2}},
        {"id": "second", "tool": "slow__sleep", "needs": ["first"], "args": {"ms": 1}}]});
    let cases = [
        ("workflow__naps", json!({"ms": 2})),
        ("workflow__naps", json!({"ms": "two"})),
        ("orchestrate", orchestrate),
    ];
    let mut id = 0;
    for (name, arguments) in cases {
        let mut answers = Vec::new();
        // The front takes the first; a field it does not know leaves the second to rmcp.
        for extra in [json!({}), json!({"rmcp-only": true})] {
            id += 1;
            let mut params = json!({"name": name, "arguments": arguments,
                "_meta": {"progressToken": id}});
            params
                .as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            raw.send(
                &json!({"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": params}),
            )
            .await;
            let mut progress = Vec::new();
            let answer = loop {
                let message = raw.next().await;
                if message["method"] == "notifications/progress" {
                    assert_eq!(message["params"]["progressToken"], id, "{message}");
                    progress.push(message["params"]["progress"].as_f64().unwrap());
                } else if message["id"] == id {
                    break message;
                }
            };
            let runs = answer["result"]["structuredContent"]["status"] != "invalid";
            let expected: Vec<f64> = if runs { vec![1.0, 2.0] } else { vec![] };
            assert_eq!(
                progress, expected,
                "{name}: each step's progress, before {answer}"
            );
            answers.push(without_run_details(answer["result"].clone()));
        }
        assert_eq!(
            answers[0], answers[1],
            "{name}: the front's answer is rmcp's"
        );
    }
}

/// A workflow's result with what differs from run to run taken out: its run id and timings.
fn without_run_details(mut result: Value) -> Value {
    fn strip(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("run_id");
                map.remove("duration_ms");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let run_id = result["structuredContent"]["run_id"]
        .as_str()
        .expect("a run id")
        .to_owned();
    strip(&mut result);
    let summary = result["content"][0]["text"].as_str().expect("a summary");
    // "run <id>: succeeded in <n> ms (...)"
    let (head, rest) = summary.split_once(" in ").expect("a duration");
    let (_, rest) = rest.split_once(" ms").expect("in ms");
    result["content"][0]["text"] = json!(format!("{} in N ms{rest}", head.replace(&run_id, "RUN")));
    result
}

#[tokio::test]
async fn a_downstream_asks_the_client_through_conductor() {
    // The client's own child: a shared server is given the roots of its config instead.
    let config = slow_fixture("isolation = \"session\"");
    let client = super::support::TestClient {
        answers: true,
        ..Default::default()
    };
    let session = super::support::serve_as(&config, &[], client).await;
    let recorder = session.service().recorder.clone();
    let result = call(&session, "slow__ask", json!({"prompt": "the weather"})).await;
    assert_eq!(text_of(&result), "sampled: the weather; roots: 1");
    assert_eq!(recorder.count("sampling/createMessage"), 1);
    // Its log message came too, under the server's name.
    recorder.wait_for("log slow", 1).await;

    // A client that cannot sample gets a clear refusal, which the server reports.
    let plain = serve(&config).await;
    let result = call(&plain, "slow__ask", json!({"prompt": "the weather"})).await;
    let text = text_of(&result);
    assert!(
        text.contains(
            "sampling failed: Mcp error: -32601: the client connected to conductor does not support `sampling/createMessage`"
        ),
        "{text}"
    );
}

/// Every pairing of a client and a downstream on every protocol version, with the client on
/// stdio and on Streamable HTTP: each side gets its own version, and progress and sampling and
/// roots cross between them. Between 2026-07-28 (which asks by `input_required`) and older
/// peers (which send requests of their own), conductor bridges one way to the other.
#[tokio::test]
async fn every_pairing_of_protocol_versions_works() {
    use rmcp::model::ProtocolVersion;
    let versions = [
        ProtocolVersion::V_2024_11_05,
        ProtocolVersion::V_2025_03_26,
        ProtocolVersion::V_2025_06_18,
        ProtocolVersion::V_2025_11_25,
        ProtocolVersion::V_2026_07_28,
    ];
    for downstream in &versions {
        let handshake = if *downstream >= ProtocolVersion::V_2026_07_28 {
            "discover"
        } else {
            "initialize"
        };
        let config = TestConfig::new(&format!(
            "[servers.slow]\ncommand = \"{{fixture}}\"\nargs = [\"slow\"]\nprotocol = \"{handshake}\"\nisolation = \"session\"\nenv = {{ FIXTURE_PROTOCOL = \"{downstream}\" }}\n"
        ));
        let http = super::support::HttpConductor::start(&config).await;
        for (client_version, over_http) in versions
            .iter()
            .flat_map(|version| [(version, false), (version, true)])
        {
            let client = super::support::TestClient {
                answers: true,
                protocol: Some(client_version.clone()),
                ..Default::default()
            };
            let session = if over_http {
                let transport =
                    rmcp::transport::StreamableHttpClientTransport::from_uri(http.mcp());
                super::support::connect_as(client, transport).await
            } else {
                super::support::serve_as(&config, &[], client).await
            };
            let pairing = format!(
                "client {client_version} over {}, downstream {downstream}",
                if over_http { "HTTP" } else { "stdio" }
            );
            let agreed = session.peer().peer_info().unwrap().protocol_version.clone();
            assert_eq!(&agreed, client_version, "{pairing}");
            assert_eq!(
                text_of(&call(&session, "slow__protocol", json!({})).await),
                downstream.to_string(),
                "{pairing}"
            );
            let recorder = session.service().recorder.clone();
            let result = call(
                &session,
                "slow__sleep",
                json!({"ms": 300, "progress_every": 100}),
            )
            .await;
            assert_eq!(text_of(&result), "slept 300 ms", "{pairing}");
            assert!(recorder.count("notifications/progress") >= 2, "{pairing}");
            assert_eq!(
                text_of(&call(&session, "slow__ask", json!({"prompt": "hi"})).await),
                "sampled: hi; roots: 1",
                "{pairing}"
            );
            session.cancel().await.unwrap();
        }
    }
}

/// Resource updates reach the clients that subscribed, with `resources/subscribe` on
/// 2025-11-25 and with `subscriptions/listen` on 2026-07-28; the owner is asked once, and told
/// to stop when the last subscriber goes.
#[tokio::test]
#[allow(
    deprecated,
    reason = "resources/subscribe is what 2025-11-25 clients use"
)]
async fn resource_updates_reach_subscribers_of_both_eras() {
    use rmcp::model::{
        ProtocolVersion, ServerNotification, SubscribeRequestParams, SubscriptionFilter,
    };
    let config = content_config("", "");
    let session = serve(&config).await;
    session
        .subscribe(SubscribeRequestParams::new("fixture://readme"))
        .await
        .unwrap();
    wait_for_event(&config, "subscribed fixture://readme").await;
    touch_and_hear(&session, "fixture://readme").await;

    // A 2026-07-28 client listens instead; its stream shares the owner's one subscription.
    let client = super::support::TestClient {
        protocol: Some(ProtocolVersion::V_2026_07_28),
        ..Default::default()
    };
    let modern = super::support::serve_as(&config, &[], client).await;
    let mut filter = SubscriptionFilter::new();
    filter.resource_subscriptions = Some(vec!["fixture://readme".to_owned()]);
    let mut stream = modern.peer().listen(filter).await.unwrap();
    assert_eq!(
        stream.acknowledged().resource_subscriptions,
        Some(vec!["fixture://readme".to_owned()])
    );
    call(
        &modern,
        "content__touch",
        json!({"uri": "fixture://readme"}),
    )
    .await;
    let update = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await.unwrap() {
                Some(ServerNotification::ResourceUpdatedNotification(update)) => return update,
                Some(_) => continue,
                None => panic!("the stream ended"),
            }
        }
    })
    .await
    .expect("an update on the listen stream");
    assert_eq!(update.params.uri, "fixture://readme");
    drop(stream);
    session
        .unsubscribe(rmcp::model::UnsubscribeRequestParams::new(
            "fixture://readme",
        ))
        .await
        .unwrap();
    wait_for_event(&config, "unsubscribed fixture://readme").await;
}

/// A 2026-07-28 server refuses `resources/subscribe`: conductor keeps one
/// `subscriptions/listen` stream to it with every subscribed resource, replaced as the set
/// changes, and passes its updates to the subscribers, who may speak any version.
#[tokio::test]
#[allow(
    deprecated,
    reason = "resources/subscribe is what clients before 2026-07-28 use"
)]
async fn a_2026_server_gets_subscriptions_as_one_listen_stream() {
    use rmcp::model::{SubscribeRequestParams, UnsubscribeRequestParams};
    let config = content_config(
        "protocol = \"discover\"\n",
        ", FIXTURE_PROTOCOL = \"2026-07-28\"",
    );
    let session = serve(&config).await;
    session
        .subscribe(SubscribeRequestParams::new("fixture://readme"))
        .await
        .unwrap();
    wait_for_event(&config, "listening fixture://readme").await;
    session
        .subscribe(SubscribeRequestParams::new("fixture://items/7"))
        .await
        .unwrap();
    wait_for_event(&config, "listening fixture://items/7,fixture://readme").await;
    wait_for_event(&config, "stopped listening fixture://readme").await;

    touch_and_hear(&session, "fixture://items/7").await;

    // Narrowed: a stream for the one left replaces the stream for both.
    session
        .unsubscribe(UnsubscribeRequestParams::new("fixture://items/7"))
        .await
        .unwrap();
    config
        .wait_for_recorded("listening fixture://readme", 2)
        .await;
    assert_eq!(
        config.recorded("listening fixture://readme"),
        2,
        "listening again for the one left"
    );
    wait_for_event(
        &config,
        "stopped listening fixture://items/7,fixture://readme",
    )
    .await;
    // The last stream ends with the last subscription.
    session
        .unsubscribe(UnsubscribeRequestParams::new("fixture://readme"))
        .await
        .unwrap();
    config
        .wait_for_recorded("stopped listening fixture://readme", 2)
        .await;
    let text = std::fs::read_to_string(config.events_file()).unwrap_or_default();
    assert_eq!(
        text.lines()
            .filter(|line| line.starts_with("listening"))
            .count(),
        text.lines()
            .filter(|line| line.starts_with("stopped listening"))
            .count(),
        "every stream ended: {text}"
    );
    assert!(
        !text.lines().any(|line| line.starts_with("subscribed ")),
        "no resources/subscribe to a 2026 server: {text}"
    );
}

/// A server that crashed and came back knows nothing of its old subscriptions: conductor
/// subscribes it again, by `resources/subscribe` or by a listen stream, and updates flow.
#[tokio::test]
#[allow(
    deprecated,
    reason = "resources/subscribe is what clients before 2026-07-28 use"
)]
async fn a_restarted_server_is_subscribed_again() {
    use rmcp::model::SubscribeRequestParams;
    let crashing = ", FIXTURE_CRASH_AFTER_MS = \"3000\"";
    for (keys, env, event) in [
        (
            String::new(),
            crashing.to_owned(),
            "subscribed fixture://readme",
        ),
        (
            "protocol = \"discover\"\n".to_owned(),
            format!("{crashing}, FIXTURE_PROTOCOL = \"2026-07-28\""),
            "listening fixture://readme",
        ),
    ] {
        let config = content_config(&format!("restart_delay = \"50ms\"\n{keys}"), &env);
        let session = serve(&config).await;
        session
            .subscribe(SubscribeRequestParams::new("fixture://readme"))
            .await
            .unwrap();
        config.wait_for_recorded(event, 2).await;
        assert_eq!(
            config.recorded(event),
            2,
            "{event}, again after the restart"
        );
        touch_and_hear(&session, "fixture://readme").await;
    }
}

/// A shared server gets the roots its config names, whoever connects: a client that declares
/// roots of its own (`file:///work`) changes nothing for it, at start, after the client
/// comes, when the client says its roots changed, or when the server restarts.
#[tokio::test]
async fn a_shared_server_gets_the_roots_of_its_config_never_a_clients() {
    let config = content_config(
        "restart_delay = \"50ms\"\nroots = [\"/srv/shared\"]\n",
        ", FIXTURE_CRASH_AFTER_MS = \"1500\"",
    );
    let server = super::support::HttpConductor::start(&config).await;
    wait_for_event(&config, "roots [file:///srv/shared]").await;
    let client = super::support::TestClient {
        answers: true,
        ..super::support::TestClient::default()
    };
    let session = super::support::http_session_as(&server.mcp(), None, client).await;
    session.notify_roots_list_changed().await.unwrap();
    call(&session, "content__kinds", json!({})).await;
    // The fixture restarts every 1.5 s and asks again as it starts.
    config
        .wait_for_recorded("roots [file:///srv/shared]", 2)
        .await;
    assert_eq!(config.recorded("roots [file:///work]"), 0);
}

/// A server with `isolation = "session"` gets its own client's roots, and only its own: the
/// child of a client that declared roots gets them, the child of one that did not gets
/// the config's (none).
#[tokio::test]
async fn a_sessions_own_child_gets_its_own_clients_roots() {
    let config = content_config("isolation = \"session\"\n", "");
    let server = super::support::HttpConductor::start(&config).await;
    let with_roots = super::support::TestClient {
        answers: true,
        ..super::support::TestClient::default()
    };
    let first = super::support::http_session_as(&server.mcp(), None, with_roots).await;
    let second = super::support::http_session(&server.mcp(), None).await;
    call(&first, "content__kinds", json!({})).await;
    call(&second, "content__kinds", json!({})).await;
    wait_for_event(&config, "roots [file:///work]").await;
    wait_for_event(&config, "roots []").await;
    assert_eq!(config.recorded("roots [file:///work]"), 1);
}

/// Two clients with calls in flight on one shared server: a request the server makes during
/// one of them cannot be told apart by its origin over stdio, so conductor refuses it rather
/// than hand one client's prompt to the other; with `isolation = "session"` each client's
/// child asks its own client.
#[tokio::test]
async fn a_downstreams_request_never_reaches_another_client() {
    for isolation in ["shared", "session"] {
        let config = TestConfig::new(&format!(
            "[servers.slow]\ncommand = \"{{fixture}}\"\nargs = [\"slow\"]\nisolation = \"{isolation}\"\n"
        ));
        let server = super::support::HttpConductor::start(&config).await;
        let answering = || super::support::TestClient {
            answers: true,
            ..super::support::TestClient::default()
        };
        let asker = super::support::http_session_as(&server.mcp(), None, answering()).await;
        let bystander = super::support::http_session_as(&server.mcp(), None, answering()).await;
        // The asker's call waits before asking, so the bystander's call is in flight, and
        // is the latest, when the server asks.
        let asked = call(
            &asker,
            "slow__ask",
            json!({"prompt": "the asker's secret", "wait_ms": 600}),
        );
        let waiting = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            call(&bystander, "slow__sleep", json!({"ms": 1500})).await
        };
        let (asked, _) = tokio::join!(asked, waiting);
        let asked = text_of(&asked);
        let bystander_asked = bystander.service().recorder.count("sampling/createMessage");
        assert_eq!(
            bystander_asked, 0,
            "{isolation}: the bystander was asked: {asked}"
        );
        if isolation == "shared" {
            assert!(
                asked.contains("sampling failed") && asked.contains("isolation = \"session\""),
                "{isolation}: {asked}"
            );
        } else {
            assert_eq!(
                asked, "sampled: the asker's secret; roots: 1",
                "{isolation}"
            );
        }
    }
}

/// A session that ends without unsubscribing: its server is told once no session is left
/// watching the resource, not before.
#[tokio::test]
#[allow(
    deprecated,
    reason = "resources/subscribe is what clients before 2026-07-28 use"
)]
async fn a_session_that_ends_unsubscribes_what_only_it_watched() {
    use rmcp::model::SubscribeRequestParams;
    let config = content_config("", "");
    let server = super::support::HttpConductor::start(&config).await;
    let first = super::support::http_session(&server.mcp(), None).await;
    let second = super::support::http_session(&server.mcp(), None).await;
    for session in [&first, &second] {
        session
            .subscribe(SubscribeRequestParams::new("fixture://readme"))
            .await
            .unwrap();
    }
    wait_for_event(&config, "subscribed fixture://readme").await;
    let unsubscribed = || config.recorded("unsubscribed fixture://readme");
    first.cancel().await.unwrap();
    // The second session still watches it: given time to (wrongly) unsubscribe, none comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        unsubscribed(),
        0,
        "unsubscribed while a session still watched"
    );
    second.cancel().await.unwrap();
    wait_for_event(&config, "unsubscribed fixture://readme").await;
    assert_eq!(unsubscribed(), 1);
}

/// A session's own child is offered only what its client can do; a shared child, started
/// before any client, is offered everything (and conductor refuses per request what the
/// current client cannot do).
#[tokio::test]
async fn a_sessions_own_child_is_offered_only_its_clients_capabilities() {
    let config = TestConfig::new(
        "[servers.own]\ncommand = \"{fixture}\"\nargs = [\"slow\"]\nisolation = \"session\"\n\n\
         [servers.shared]\ncommand = \"{fixture}\"\nargs = [\"slow\"]\n",
    );
    let offered = |session: &super::support::Session, tool: &'static str| {
        let session = session.peer().clone();
        async move {
            let result = session
                .call_tool(CallToolRequestParams::new(tool))
                .await
                .unwrap();
            serde_json::from_str::<Value>(&text_of(&result)).unwrap()
        }
    };
    let plain = serve(&config).await;
    let own = offered(&plain, "own__client_capabilities").await;
    assert!(
        own.get("sampling").is_none() && own.get("roots").is_none(),
        "{own}"
    );
    let shared = offered(&plain, "shared__client_capabilities").await;
    assert!(
        shared.get("sampling").is_some() && shared.get("elicitation").is_some(),
        "{shared}"
    );

    let answering = super::support::TestClient {
        answers: true,
        ..Default::default()
    };
    let answering = super::support::serve_as(&config, &[], answering).await;
    let own = offered(&answering, "own__client_capabilities").await;
    assert!(
        own.get("sampling").is_some() && own.get("roots").is_some(),
        "{own}"
    );
    assert!(own.get("elicitation").is_none(), "{own}");
}

/// Over stdio, a client of 2025-11-25 is offered tasks in the answer to `initialize`, and a
/// call it makes a task of is answered by `tasks/result`; a client of 2025-06-18 is not.
#[tokio::test]
async fn a_stdio_client_of_2025_11_25_is_offered_tasks_and_makes_them() {
    let config = slow_fixture("");
    for (version, offered) in [("2025-06-18", false), ("2025-11-25", true)] {
        let mut raw = RawSession::start(&config);
        raw.send(
            &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
            "protocolVersion": version, "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}}),
        )
        .await;
        let initialized = raw.next().await;
        assert_eq!(
            initialized["result"]["capabilities"].get("tasks").is_some(),
            offered,
            "{version}: {initialized}"
        );
        if !offered {
            continue;
        }
        raw.send(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await;
        raw.send(
            &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "slow__sleep", "arguments": {"ms": 50}, "task": {}}}),
        )
        .await;
        let created = raw.next().await;
        let task = created["result"]["task"]["taskId"].clone();
        assert!(task.is_string(), "{created}");
        raw.send(&json!({"jsonrpc": "2.0", "id": 2, "method": "tasks/result", "params": {"taskId": task}}))
            .await;
        let result = raw.next().await;
        assert_eq!(result["id"], 2, "{result}");
        assert_eq!(
            result["result"]["content"][0]["text"], "slept 50 ms",
            "{result}"
        );
    }
}

/// A list change a downstream announces during a call reaches the client before the call's
/// answer, as it would directly: conductor lists again first, so the client's next list is
/// the new one. Over stdio, where one line follows another, for a changed list and for one
/// that reads the same.
#[tokio::test]
async fn a_list_change_announced_during_a_call_comes_before_its_answer() {
    let config = TestConfig::fixtures(&[("live", "changing")]);
    let mut raw = RawSession::initialized(&config).await;
    for (id, tool, arguments, notification) in [
        (
            1,
            "live__add_resource",
            json!({"name": "doc"}),
            "notifications/resources/list_changed",
        ),
        (
            2,
            "live__add_tool",
            json!({"name": "fresh"}),
            "notifications/tools/list_changed",
        ),
        (
            3,
            "live__announce",
            json!({}),
            "notifications/prompts/list_changed",
        ),
    ] {
        raw.send(&json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
                         "params": {"name": tool, "arguments": arguments}}))
            .await;
        let mut heard = Vec::new();
        loop {
            let message = raw.next().await;
            if message["id"] == id {
                break;
            }
            heard.push(message["method"].as_str().unwrap_or_default().to_owned());
        }
        assert!(
            heard.iter().any(|method| method == notification),
            "{tool}: {heard:?}"
        );
    }
    raw.send(&json!({"jsonrpc": "2.0", "id": 4, "method": "resources/list"}))
        .await;
    let listed = raw.next().await;
    assert!(
        listed.to_string().contains("fixture://added/doc"),
        "{listed}"
    );
}

/// `serve` answers at once while servers start: `initialize` is answered though one server
/// hangs in its handshake; a first list waits for the others within `list_wait`, then
/// answers with what is ready; a server that comes up later joins with `list_changed`; and a
/// call of its tool made before it is up waits for it.
#[tokio::test]
async fn serve_answers_at_once_and_servers_join_as_they_start() {
    let config = TestConfig::new(
        "[conductor]\nlist_wait = \"700ms\"\n\n\
         [servers.hung]\ncommand = \"{fixture}\"\nargs = [\"slow-start\"]\nstartup_timeout = \"60s\"\n\n\
         [servers.late]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\nenv = { FIXTURE_START_DELAY_MS = \"2500\" }\n\n\
         [servers.echo]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n",
    );
    // Over stdio, by hand: the handshake is answered while `hung` still hangs in its own.
    let mut raw = RawSession::initialized(&config).await;
    raw.send(&json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                     "params": {"name": "late__echo", "arguments": {"text": "waited"}}}))
        .await;
    raw.send(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}))
        .await;
    let mut heard = Vec::new();
    let listed = loop {
        let message = raw.next().await;
        if message["id"] == 2 {
            break message;
        }
        assert_ne!(message["id"], 1, "the list is answered before `late` is up");
        heard.push(message["method"].as_str().unwrap_or_default().to_owned());
    };
    let names: Vec<&str> = listed["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|tool| tool["name"].as_str())
        .collect();
    assert!(names.contains(&"echo__echo"), "{names:?}");
    assert!(
        !names.iter().any(|name| name.starts_with("late__")),
        "{names:?}"
    );
    // `late` comes up: the client hears of it, and the call that waited is answered.
    heard.clear();
    let answer = loop {
        let message = raw.next().await;
        if message["id"] == 1 {
            break message;
        }
        heard.push(message["method"].as_str().unwrap_or_default().to_owned());
    };
    assert_eq!(answer["result"]["content"][0]["text"], "waited", "{answer}");
    assert!(
        heard
            .iter()
            .any(|method| method == "notifications/tools/list_changed"),
        "{heard:?}"
    );
    raw.send(&json!({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}))
        .await;
    let listed = raw.next().await.to_string();
    assert!(listed.contains("late__echo"), "{listed}");
}

/// A stdio client's request over `max_message_bytes` gets an error with its id at once, and
/// the session goes on.
#[tokio::test]
async fn a_request_over_the_size_limit_is_refused_with_its_id() {
    let config = TestConfig::new(
        "[conductor]\nmax_message_bytes = 2000\n\n[servers.echo]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n",
    );
    let mut raw = RawSession::initialized(&config).await;
    let big = "x".repeat(10_000);
    raw.send(&json!({"jsonrpc": "2.0", "id": 41, "method": "tools/call",
                     "params": {"name": "echo__echo", "arguments": {"text": big}}}))
        .await;
    let refused = raw.next().await;
    assert_eq!(refused["id"], 41, "{refused}");
    assert_eq!(refused["error"]["code"], -32600, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2000 bytes"),
        "{refused}"
    );
    raw.send(&json!({"jsonrpc": "2.0", "id": 42, "method": "tools/call",
                     "params": {"name": "echo__echo", "arguments": {"text": "small"}}}))
        .await;
    let answer = raw.next().await;
    assert_eq!(answer["result"]["content"][0]["text"], "small", "{answer}");
}
