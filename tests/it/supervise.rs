//! Supervision under injected faults: crashes, crash loops, hangs, garbage and huge messages,
//! children that ignore SIGTERM, conductor killed outright; replicas, fallbacks, lazy start,
//! per-session children, hot reload, and a soak test. Each fault is checked for what the
//! client sees and for every other server serving on.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use rmcp::model::CallToolRequestParams;
use serde_json::{Value, json};

use super::support::{
    CONDUCTOR, HttpConductor, Session, TestClient, TestConfig, call, eventually, http_session,
    text_of, tool_names,
};

/// `conductor serve` over stdio, with the process id of conductor itself.
async fn serve_tracked(config: &TestConfig) -> (Session, u32) {
    use rmcp::ServiceExt;
    use rmcp::transport::TokioChildProcess;
    let mut command = tokio::process::Command::new(CONDUCTOR);
    command.arg("serve").arg("--config").arg(&config.path);
    let stderr = if std::env::var_os("CONDUCTOR_TEST_LOG").is_some() {
        std::process::Stdio::inherit()
    } else {
        std::process::Stdio::null()
    };
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(stderr)
        .spawn()
        .expect("conductor starts");
    let pid = transport.id().expect("conductor has a pid");
    let session = TestClient::default()
        .serve(transport)
        .await
        .expect("conductor completes the handshake");
    (session, pid)
}

/// Every live process below `root`, from `/proc`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // `pid (comm) state ppid ...`; comm may hold spaces, so read after the last `)`.
        let Some(rest) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if let Some(ppid) = fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) {
            parents.entry(ppid).or_default().push(pid);
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![root];
    while let Some(pid) = queue.pop() {
        for &child in parents.get(&pid).into_iter().flatten() {
            found.push(child);
            queue.push(child);
        }
    }
    found.sort_unstable();
    found
}

/// Whether a process exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// The direct children of `root`: conductor's are the launchers, one per server process,
/// each the parent of its server.
fn children(root: u32) -> Vec<u32> {
    descendants(root)
        .into_iter()
        .filter(|&pid| parent_of(pid) == Some(root))
        .collect()
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Wait (up to 10 s) until `root` has `count` children: servers start after `serve` answers.
async fn children_become(root: u32, count: usize) -> Vec<u32> {
    eventually(Duration::from_secs(10), "the servers run", || async move {
        let children = children(root);
        (children.len() == count).then_some(children)
    })
    .await
}

fn zombies_below(root: u32) -> Vec<u32> {
    descendants(root)
        .into_iter()
        .filter(|&pid| !alive(pid))
        .collect()
}

async fn readyz(server: &HttpConductor) -> Value {
    reqwest::get(format!("{}/readyz", server.base))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// The state `/readyz` shows for one server.
async fn server_state(server: &HttpConductor, name: &str) -> Value {
    readyz(server).await["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|entry| entry["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no server `{name}` in /readyz"))
}

/// A call that may fail at the protocol level: its text, or the error's.
async fn try_call(session: &Session, name: &str, arguments: Value) -> Result<String, String> {
    let arguments = arguments.as_object().cloned().unwrap_or_default();
    match session
        .call_tool(CallToolRequestParams::new(name.to_owned()).with_arguments(arguments))
        .await
    {
        Ok(result) if result.is_error == Some(true) => Err(text_of(&result)),
        Ok(result) => Ok(text_of(&result)),
        Err(error) => Err(error.to_string()),
    }
}

async fn pid_of(session: &Session, tool: &str) -> u32 {
    text_of(&call(session, tool, json!({})).await)
        .parse()
        .unwrap_or_else(|_| panic!("`{tool}` answers a pid"))
}

fn crashy(name: &str, extra: &str) -> String {
    format!("[servers.{name}]\ncommand = \"{{fixture}}\"\nargs = [\"crashy\"]\n{extra}\n\n")
}

const ECHO: &str = "[servers.echo]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n\n";

#[tokio::test]
async fn a_child_that_exits_mid_call_fails_that_call_and_is_restarted() {
    let config = TestConfig::new(&(crashy("crashy", "restart_delay = \"100ms\"") + ECHO));
    let session = super::support::serve(&config).await;
    let recorder = session.service().recorder.clone();
    let first = pid_of(&session, "crashy__pid").await;

    let result = call(&session, "crashy__crash", json!({})).await;
    assert_eq!(result.is_error, Some(true));
    assert_eq!(
        text_of(&result),
        "server `crashy`: the connection closed before `tools/call crash` was answered"
    );
    // Its tools leave the catalog and come back with the new child; the client hears both.
    recorder
        .wait_for("notifications/tools/list_changed", 2)
        .await;
    assert!(
        tool_names(&session)
            .await
            .contains(&"crashy__pid".to_owned())
    );
    let second = pid_of(&session, "crashy__pid").await;
    assert_ne!(first, second, "a new child answers");
    assert!(!alive(first), "the crashed child was reaped");
    assert_eq!(
        text_of(&call(&session, "echo__echo", json!({"text": "ok"})).await),
        "ok"
    );
}

#[tokio::test]
async fn a_crash_loop_is_given_up_with_its_last_error() {
    let config = TestConfig::new(
        &(crashy(
            "looping",
            "env = { FIXTURE_CRASH_AFTER_MS = \"300\" }\nrestart_delay = \"50ms\"\nmax_restarts = 2",
        ) + ECHO),
    );
    let server = HttpConductor::start(&config).await;
    // Watch it go through its restarts to the end.
    let mut seen = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let state = loop {
        let state = server_state(&server, "looping").await;
        seen.insert(state["status"].as_str().unwrap().to_owned());
        if state["status"] == "failed" {
            break state;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never given up: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(seen.contains("restarting"), "{seen:?}");
    let detail = state["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("gave up after 2 restarts in a row; the last: connection ended"),
        "{detail}"
    );
    assert_eq!(server_state(&server, "echo").await["status"], "ready");
    let session = http_session(&server.mcp(), None).await;
    let error = try_call(&session, "looping__ok", json!({}))
        .await
        .unwrap_err();
    // Its tools are gone from the list, and a call says why, not "unknown tool".
    assert!(
        error.contains("server `looping` is down: gave up after 2 restarts"),
        "{error}"
    );
    assert_eq!(
        try_call(&session, "echo__echo", json!({"text": "still here"})).await,
        Ok("still here".to_owned())
    );
}

#[tokio::test]
async fn a_hung_server_misses_its_ping_and_is_restarted() {
    let config = TestConfig::new(
        &(crashy(
            "hangs",
            "ping_interval = \"300ms\"\nping_timeout = \"300ms\"\nrestart_delay = \"50ms\"\nstop_grace = \"200ms\"",
        ) + ECHO),
    );
    let session = super::support::serve(&config).await;
    let first = pid_of(&session, "hangs__pid").await;
    let started = std::time::Instant::now();
    // The default call timeout is two minutes: the missed ping ends the call long before.
    let result = try_call(&session, "hangs__hang", json!({})).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let error = result.unwrap_err();
    assert!(
        error.contains("server `hangs`: the connection closed"),
        "{error}"
    );
    let second = eventually(Duration::from_secs(10), "a new child answers", || {
        let session = &session;
        async move {
            try_call(session, "hangs__pid", json!({}))
                .await
                .ok()
                .and_then(|pid| pid.parse::<u32>().ok())
        }
    })
    .await;
    assert_ne!(first, second);
    eventually(
        Duration::from_secs(5),
        "the hung child is killed",
        || async { (!alive(first)).then_some(()) },
    )
    .await;
    assert_eq!(
        try_call(&session, "echo__echo", json!({"text": "ok"})).await,
        Ok("ok".to_owned())
    );
}

/// Any answer to a ping proves the server is alive, an error too (servers of 2026-07-28 answer
/// -32601): it is never restarted for answering.
#[tokio::test]
async fn a_server_that_answers_pings_with_an_error_is_alive() {
    let config = TestConfig::new(&crashy(
        "refuses",
        "ping_interval = \"100ms\"\nping_timeout = \"1s\"\nrestart_delay = \"50ms\"\nenv = { FIXTURE_PING = \"refuse\" }",
    ));
    let session = super::support::serve(&config).await;
    let first = pid_of(&session, "refuses__pid").await;
    // Ten pings, each answered with an error.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(pid_of(&session, "refuses__pid").await, first, "restarted");
    assert!(alive(first));
}

#[tokio::test]
async fn garbage_and_huge_messages_are_answered_clearly() {
    let config = TestConfig::new(
        &(crashy("faulty", "call_timeout = \"3s\"\nrestart_delay = \"50ms\"") + ECHO),
    );
    let session = super::support::serve(&config).await;

    // Lines that are not JSON-RPC are skipped; the call still gets its answer.
    assert_eq!(
        try_call(&session, "faulty__garbage", json!({})).await,
        Ok("after garbage".to_owned())
    );
    // 5 MB passes whole.
    let big = try_call(&session, "faulty__huge", json!({"bytes": 5_000_000}))
        .await
        .unwrap();
    assert_eq!(big.len(), 5_000_000);
    // Beyond the 16 MiB line limit the answer is dropped, and its call fails at once naming
    // the limit (it used to wait out its timeout), and the server goes on serving.
    refused_for_its_size(
        &session,
        20_000_000,
        "larger than the 16777216 bytes conductor reads from it (`max_message_bytes`)",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(
        try_call(&session, "faulty__ok", json!({})).await,
        Ok("fine".to_owned())
    );
    assert_eq!(
        try_call(&session, "echo__echo", json!({"text": "ok"})).await,
        Ok("ok".to_owned())
    );
}

#[tokio::test]
async fn children_die_with_conductor_even_when_it_is_killed() {
    // This child ignores SIGTERM and its stdin closing: only the parent-death signal stops it.
    let config = TestConfig::new(&crashy("stubborn", "env = { FIXTURE_IGNORE_TERM = \"1\" }"));
    // `serve` answers before its servers are up: wait for the child.
    kill_conductor_once_it_runs(&config, &["mcp-fixture"]).await;
}

/// Start `conductor serve --http` on `config`, wait until processes of each of `names` run
/// below it, kill conductor outright (SIGKILL), and wait for every process that was below it
/// to be gone.
async fn kill_conductor_once_it_runs(config: &TestConfig, names: &[&str]) {
    let mut server = HttpConductor::start(config).await;
    let conductor = server.child.id().unwrap();
    let family = eventually(Duration::from_secs(10), "the family runs", || async move {
        let family = descendants(conductor);
        let named = |name: &str| {
            family.iter().any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == name)
            })
        };
        names.iter().all(|name| named(name)).then_some(family)
    })
    .await;
    server.child.start_kill().unwrap();
    let _ = server.child.wait().await;
    eventually(Duration::from_secs(5), "the whole family is gone", || {
        let family = &family;
        async move { family.iter().all(|&pid| !alive(pid)).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn replicas_share_the_calls_and_cover_for_each_other() {
    let config = TestConfig::new(&crashy("pool", "replicas = 3\nrestart_delay = \"300ms\""));
    let server = HttpConductor::start(&config).await;
    let session = http_session(&server.mcp(), None).await;
    children_become(server.child.id().unwrap(), 3).await;

    // Calls in flight together go to the least busy child.
    let pids: HashSet<String> = futures::future::join_all(
        (0..6).map(|_| try_call(&session, "pool__pid", json!({"ms": 300}))),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    assert_eq!(pids.len(), 3, "{pids:?}");

    // One child crashes: the others answer while it restarts.
    let _ = try_call(&session, "pool__crash", json!({})).await;
    let state = server_state(&server, "pool").await;
    assert_eq!(state["status"], "degraded", "{state}");
    assert_eq!(state["detail"], "2 of 3 replicas ready");
    assert!(try_call(&session, "pool__pid", json!({})).await.is_ok());
    eventually(Duration::from_secs(10), "all replicas are back", || {
        let server = &server;
        async move { (server_state(server, "pool").await["status"] == "ready").then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_fallback_serves_while_its_server_is_down() {
    let config = TestConfig::new(
        &(crashy("primary", "fallback = \"backup\"\nrestart_delay = \"1h\"")
            + &crashy("backup", "")),
    );
    let session = super::support::serve(&config).await;
    let primary = pid_of(&session, "primary__pid").await;
    let backup = pid_of(&session, "backup__pid").await;
    let _ = try_call(&session, "primary__crash", json!({})).await;
    // The primary waits an hour to restart; meanwhile its tools stay listed, and answer from
    // the backup.
    let answered = eventually(Duration::from_secs(5), "the backup answers", || {
        let session = &session;
        async move {
            try_call(session, "primary__pid", json!({}))
                .await
                .ok()
                .and_then(|pid| pid.parse::<u32>().ok())
        }
    })
    .await;
    assert_ne!(answered, primary);
    assert_eq!(answered, backup);
    assert!(
        tool_names(&session)
            .await
            .contains(&"primary__pid".to_owned())
    );
}

#[tokio::test]
async fn a_lazy_server_starts_on_its_first_call_and_stops_when_idle() {
    let config = TestConfig::new(&crashy("lazy", "start = \"lazy\"\nidle_timeout = \"1s\""));
    let server = HttpConductor::start(&config).await;
    let conductor = server.child.id().unwrap();
    // It ran once to list its tools, and is stopped until called.
    eventually(
        Duration::from_secs(10),
        "the listing child stops",
        || async { descendants(conductor).is_empty().then_some(()) },
    )
    .await;
    assert_eq!(server_state(&server, "lazy").await["status"], "idle");
    let ready: Value = readyz(&server).await;
    assert_eq!(ready["status"], "ready", "an idle server counts as ready");

    let session = http_session(&server.mcp(), None).await;
    assert!(tool_names(&session).await.contains(&"lazy__pid".to_owned()));
    let pid: u32 = try_call(&session, "lazy__pid", json!({}))
        .await
        .unwrap()
        .parse()
        .unwrap();
    assert!(alive(pid));
    assert_eq!(server_state(&server, "lazy").await["status"], "ready");
    eventually(Duration::from_secs(10), "the idle child stops", || async {
        (!alive(pid)).then_some(())
    })
    .await;
    assert_eq!(server_state(&server, "lazy").await["status"], "idle");
    // And it starts again when needed.
    assert!(try_call(&session, "lazy__ok", json!({})).await.is_ok());
}

#[tokio::test]
async fn each_session_gets_its_own_child_stopped_when_the_session_ends() {
    let config = TestConfig::new(&crashy("private", "isolation = \"session\""));
    let server = HttpConductor::start(&config).await;
    let first = http_session(&server.mcp(), None).await;
    let second = http_session(&server.mcp(), None).await;
    let first_pid = try_call(&first, "private__pid", json!({})).await.unwrap();
    let second_pid = try_call(&second, "private__pid", json!({})).await.unwrap();
    assert_ne!(first_pid, second_pid);
    assert_eq!(
        try_call(&first, "private__pid", json!({})).await.unwrap(),
        first_pid,
        "a session keeps its child"
    );
    let first_pid: u32 = first_pid.parse().unwrap();
    first.cancel().await.unwrap();
    eventually(
        Duration::from_secs(10),
        "the ended session's child stops",
        || async { (!alive(first_pid)).then_some(()) },
    )
    .await;
    assert!(alive(second_pid.parse().unwrap()));
}

#[tokio::test]
async fn editing_the_config_changes_only_what_changed_under_a_live_session() {
    let keep = crashy("keep", "");
    let stubborn = crashy(
        "stubborn",
        "env = { FIXTURE_IGNORE_TERM = \"1\" }\nstop_grace = \"300ms\"",
    );
    let config = TestConfig::new(&(keep.clone() + &stubborn));
    let write = |text: &str| {
        std::fs::write(
            &config.path,
            text.replace("{fixture}", super::support::FIXTURE),
        )
        .unwrap()
    };
    let (session, _conductor) = serve_tracked(&config).await;
    let recorder = session.service().recorder.clone();
    let keep_pid = pid_of(&session, "keep__pid").await;
    let stubborn_pid = pid_of(&session, "stubborn__pid").await;

    // Remove a server (whose child ignores SIGTERM), add one, rename a tool of a third.
    let renamed = crashy("keep", "[servers.keep.tools]\nrename = { ok = \"fine\" }");
    write(&(renamed.clone() + "[servers.math]\ncommand = \"{fixture}\"\nargs = [\"math\"]\n"));
    recorder
        .wait_for("notifications/tools/list_changed", 1)
        .await;
    let names = eventually(Duration::from_secs(10), "the new catalog", || {
        let session = &session;
        async move {
            let names = tool_names(session).await;
            names.contains(&"math__add".to_owned()).then_some(names)
        }
    })
    .await;
    assert!(names.contains(&"keep__fine".to_owned()), "{names:?}");
    assert!(!names.iter().any(|name| name.starts_with("stubborn__")));
    assert_eq!(pid_of(&session, "keep__pid").await, keep_pid, "untouched");
    eventually(
        Duration::from_secs(5),
        "the removed child is killed",
        || async { (!alive(stubborn_pid)).then_some(()) },
    )
    .await;

    // A broken file changes nothing, and the session goes on.
    write("[servers.keep]\ncomand = \"typo\"\n");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let names_now = tool_names(&session).await;
    assert!(names_now.contains(&"math__add".to_owned()), "{names_now:?}");
    assert_eq!(
        try_call(&session, "keep__fine", json!({})).await,
        Ok("fine".to_owned())
    );

    // A changed command restarts that server alone.
    write(
        &(crashy(
            "keep",
            "env = { CHANGED = \"1\" }\n[servers.keep.tools]\nrename = { ok = \"fine\" }",
        ) + "[servers.math]\ncommand = \"{fixture}\"\nargs = [\"math\"]\n"),
    );
    let restarted = eventually(Duration::from_secs(10), "keep restarts", || {
        let session = &session;
        async move {
            let pid = try_call(session, "keep__pid", json!({})).await.ok()?;
            let pid: u32 = pid.parse().ok()?;
            (pid != keep_pid).then_some(pid)
        }
    })
    .await;
    assert!(alive(restarted));
    assert!(
        try_call(&session, "math__add", json!({"a": 1, "b": 2}))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn soak_every_call_is_answered_while_a_server_crash_loops() {
    const CALLS: usize = 2000;
    let config = TestConfig::new(
        &(crashy(
            "crashy",
            "restart_delay = \"20ms\"\nstable_after = \"10ms\"\nbreaker_failures = 1000",
        ) + ECHO
            + "[servers.math]\ncommand = \"{fixture}\"\nargs = [\"math\"]\n"),
    );
    let (session, conductor) = serve_tracked(&config).await;
    let before = children_become(conductor, 3).await.len();

    let outcomes: Vec<&'static str> = futures::stream::iter(0..CALLS)
        .map(|index| {
            let session = &session;
            async move {
                let (name, arguments) = match index % 10 {
                    0 => ("crashy__crash", json!({})),
                    1..=3 => ("crashy__ok", json!({})),
                    4..=6 => ("echo__echo", json!({"text": index.to_string()})),
                    _ => ("math__add", json!({"a": index, "b": 1})),
                };
                let answer = tokio::time::timeout(
                    Duration::from_secs(30),
                    try_call(session, name, arguments),
                )
                .await
                .unwrap_or_else(|_| panic!("call {index} to `{name}` hung"));
                match (name, answer) {
                    ("echo__echo", Ok(text)) => {
                        assert_eq!(text, index.to_string());
                        "ok"
                    }
                    ("echo__echo" | "math__add", Err(error)) => {
                        panic!("a healthy server failed call {index}: {error}")
                    }
                    (_, Ok(_)) => "ok",
                    (_, Err(error)) => {
                        assert!(
                            error.contains("crashy"),
                            "an error names its server: {error}"
                        );
                        "error"
                    }
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(outcomes.len(), CALLS);
    assert!(outcomes.contains(&"error"), "the crashes were felt");

    eventually(Duration::from_secs(10), "crashy is back", || {
        let session = &session;
        async move { try_call(session, "crashy__ok", json!({})).await.ok() }
    })
    .await;
    let after = eventually(
        Duration::from_secs(10),
        "old children are reaped",
        || async {
            let after = children(conductor);
            (after.len() == before).then_some(after)
        },
    )
    .await;
    assert!(zombies_below(conductor).is_empty(), "{after:?}");
}

#[tokio::test]
async fn a_remote_server_fails_over_to_its_next_url() {
    let fixture = super::support::HttpFixture::start("echo").await;
    let config = TestConfig::new(&format!(
        "[servers.remote]\nurls = [\"http://127.0.0.1:1/mcp\", \"{}\"]\n",
        fixture.url
    ));
    let session = super::support::serve(&config).await;
    assert_eq!(
        try_call(&session, "remote__echo", json!({"text": "via the second"})).await,
        Ok("via the second".to_owned())
    );
}

/// A mistyped tool name is refused at once with a hint, never retried; a tool of a server that
/// is down is a tool error naming the server and why, not "unknown tool"; a tool the config
/// hides says so.
#[tokio::test]
async fn a_typo_is_refused_at_once_and_a_down_servers_tool_says_why() {
    let config = TestConfig::new(&format!(
        "[servers.one]\ncommand = \"{fixture}\"\nargs = [\"echo\"]\n\n\
         [servers.gone]\ncommand = \"/nonexistent/mcp-server\"\n\n\
         [servers.math]\ncommand = \"{fixture}\"\nargs = [\"math\"]\n\n\
         [servers.math.tools]\ndeny = [\"divide\"]\n",
        fixture = super::support::FIXTURE
    ));
    let session = super::support::serve(&config).await;

    let started = std::time::Instant::now();
    let refused = session
        .call_tool(CallToolRequestParams::new("one__ehco"))
        .await
        .expect_err("an unknown tool is a protocol error");
    // Retried, it took at least the first backoff (250 ms or more).
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "refused after {:?}: retried",
        started.elapsed()
    );
    assert!(
        refused.to_string().contains("did you mean `one__echo`"),
        "{refused}"
    );

    let down = session
        .call_tool(CallToolRequestParams::new("gone__anything"))
        .await
        .expect("a tool error, not a protocol error");
    assert_eq!(down.is_error, Some(true), "{down:?}");
    let text = text_of(&down);
    // A failed start is tried again, with backoff: the error says so, and why.
    assert!(text.contains("server `gone` is restarting"), "{text}");
    assert!(
        text.contains(", next try in "),
        "when it is tried again: {text}"
    );
    assert!(
        text.contains("cannot start `/nonexistent/mcp-server`"),
        "{text}"
    );

    let hidden = session
        .call_tool(CallToolRequestParams::new("math__divide"))
        .await
        .expect_err("a hidden tool is refused");
    assert!(
        hidden
            .to_string()
            .contains("tool `math__divide` is hidden by the config: `[servers.math.tools]`"),
        "{hidden}"
    );
}

/// A stdio server that fails at its first start (a slow first `npx -y` download, say) is
/// tried again with the crash backoff, and comes up: its tools join and answer.
#[tokio::test]
async fn a_server_that_fails_its_first_start_is_tried_again() {
    let config = TestConfig::new("");
    let mark = config.dir.path().join("started-once");
    let text = format!(
        "[servers.flaky]\ncommand = \"sh\"\nargs = [\"-c\", \"if [ -e '{mark}' ]; then exec '{fixture}' echo; else touch '{mark}'; echo 'npm ERR! network timeout' >&2; exit 1; fi\"]\nrestart_delay = \"100ms\"\n",
        mark = mark.display(),
        fixture = super::support::FIXTURE,
    );
    std::fs::write(&config.path, text).unwrap();
    let session = super::support::serve(&config).await;
    let answer = eventually(Duration::from_secs(10), "the second start serves", || {
        let session = &session;
        async move {
            try_call(session, "flaky__echo", json!({"text": "back"}))
                .await
                .ok()
        }
    })
    .await;
    assert_eq!(answer, "back");
    assert!(mark.exists(), "the first start did fail");
}

/// The size limit is the config's: a server given `max_message_bytes = 100000` fails a call
/// whose answer is larger at once, naming the limit, and goes on serving.
#[tokio::test]
async fn the_message_size_limit_is_configurable() {
    let config = TestConfig::new(&crashy(
        "faulty",
        "max_message_bytes = 100000\ncall_timeout = \"20s\"",
    ));
    let session = super::support::serve(&config).await;
    let fits = try_call(&session, "faulty__huge", json!({"bytes": 50_000}))
        .await
        .unwrap();
    assert_eq!(fits.len(), 50_000);
    refused_for_its_size(
        &session,
        200_000,
        "larger than the 100000 bytes",
        TEN_SECONDS,
    )
    .await;
    drop(session);

    // The same on rmcp's path (a server whose timeout resets on progress is sent rmcp's own
    // requests): the dropped answer is replaced by an error for its request.
    let config = TestConfig::new(&crashy(
        "faulty",
        "max_message_bytes = 100000\ncall_timeout = \"20s\"\ntimeout_resets_on_progress = true",
    ));
    let session = super::support::serve(&config).await;
    refused_for_its_size(
        &session,
        200_000,
        "larger than the 100000 bytes",
        TEN_SECONDS,
    )
    .await;
    assert_eq!(
        try_call(&session, "faulty__ok", json!({})).await,
        Ok("fine".to_owned())
    );
}

/// A server's own child that ignores SIGTERM and stays in its group (a grandchild of
/// conductor) dies with the server's launcher when conductor is killed outright.
#[tokio::test]
async fn grandchildren_die_with_conductor_even_when_it_is_killed() {
    let config = TestConfig::new(&format!(
        "[servers.parent]\ncommand = \"sh\"\nargs = [\"-c\", \"trap '' TERM; sleep 1000 & exec '{}' crashy\"]\n",
        super::support::FIXTURE
    ));
    // The server and its `sleep` (and conductor's launcher between them and conductor).
    kill_conductor_once_it_runs(&config, &["mcp-fixture", "sleep"]).await;
}

/// Every kind of broken value, fed one after another through a live reload: each is refused
/// (the running config stays), nothing panics, and the watcher goes on to apply the next
/// good edit. `check` refuses each with its place.
#[tokio::test]
async fn every_broken_value_in_a_reload_is_refused_and_the_watcher_goes_on() {
    let config = TestConfig::fixtures(&[("one", "echo")]);
    let session = super::support::serve(&config).await;
    // Without the `[conductor]` table the test config ends with, which the edits below set.
    let written = std::fs::read_to_string(&config.path).unwrap();
    let good = written
        .split("\n[conductor]")
        .next()
        .unwrap_or(&written)
        .to_owned();
    let server = |extra: &str| format!("{good}\n[servers.bad]\ncommand = \"x\"\n{extra}\n");
    let broken: Vec<String> = vec![
        format!("[conductor]\ncall_timeout = \"100000000000000000000h\"\n{good}"),
        format!("[conductor]\nstartup_timeout = \"99999999999999999999999h\"\n{good}"),
        format!("[conductor]\nkeep_runs = \"-5s\"\n{good}"),
        format!("[conductor]\nlist_wait = \"soon\"\n{good}"),
        format!("[conductor]\nmax_message_bytes = 0\n{good}"),
        format!("[conductor]\nmax_message_bytes = 99999999999999999999999\n{good}"),
        format!("[conductor]\nseparator = \".\"\n{good}"),
        server("replicas = -1"),
        server("replicas = 99999999999999999999"),
        server("max_restarts = 1.5"),
        server("ping_interval = \"1e400s\""),
        server("enabled = \"yes\""),
        format!("{good}\n[servers.bad]\nurl = \"ftp://example.com\"\n"),
        server("args = [1, 2]"),
        server("env = { KEY = \"${NOT_SET_ANYWHERE_0XYZ}\" }"),
        format!("{good}\n[servers.\"bad name!\"]\ncommand = \"x\"\n"),
        format!("{good}\n[http]\ntokens = [\"short\"]\n"),
        format!("{good}\n[[[not toml"),
        String::new(),
    ];
    for text in &broken {
        std::fs::write(&config.path, text).unwrap();
        // Past a poll of the file, so the watcher has read the edit.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(
            tool_names(&session).await.contains(&"one__echo".to_owned()),
            "still serving the old config after: {text}"
        );
        if text.is_empty() {
            continue;
        }
        let bad = TestConfig::new("");
        std::fs::write(&bad.path, text).unwrap();
        let (code, _, stderr) = super::support::conductor_cli(&bad.path, &["check"]).await;
        assert_ne!(code, 0, "refused: {text}");
        if text.contains("call_timeout") {
            assert!(stderr.contains("longer than"), "{stderr}");
        }
        assert!(
            stderr.contains("servers.toml:"),
            "names its place: {stderr}"
        );
    }
    let grown = format!(
        "{good}\n[servers.two]\ncommand = \"{}\"\nargs = [\"echo\"]\n",
        super::support::FIXTURE
    );
    std::fs::write(&config.path, grown).unwrap();
    eventually(
        Duration::from_secs(10),
        "the next good edit applies",
        || async {
            tool_names(&session)
                .await
                .contains(&"two__echo".to_owned())
                .then_some(())
        },
    )
    .await;
}

const TEN_SECONDS: Duration = Duration::from_secs(10);

/// `faulty__huge` answering `bytes` fails with `expected` in its error, within `within` (at
/// once, not after the call's longer timeout).
async fn refused_for_its_size(session: &Session, bytes: u64, expected: &str, within: Duration) {
    let started = std::time::Instant::now();
    let error = try_call(session, "faulty__huge", json!({"bytes": bytes}))
        .await
        .unwrap_err();
    assert!(error.contains(expected), "{error}");
    assert!(
        started.elapsed() < within,
        "failed at once, not after the call's timeout: {:?}",
        started.elapsed()
    );
}
