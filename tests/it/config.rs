//! Loading `servers.toml`: valid files become typed values, invalid ones report every problem.

use std::path::Path;
use std::time::Duration;

use mcp_conductor::config::{Config, Prefix, Transport};

fn env(name: &str) -> Option<String> {
    match name {
        "TOKEN" => Some("s3cret".to_owned()),
        "HOME" => Some("/home/ada".to_owned()),
        _ => None,
    }
}

fn errors(text: &str) -> String {
    match Config::parse(text, Path::new("servers.toml"), env) {
        Ok(_) => panic!("expected the config to be rejected"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn a_full_config_becomes_typed_values() {
    let text = r#"
[conductor]
separator = "_-"
startup_timeout = "5s"
call_timeout = "1m"

[servers.fs]
command = "npx"
args = ["-y", "server-filesystem", "${HOME}/notes"]
env = { API_TOKEN = "${TOKEN}", MODE = "${MODE:-fast}" }
cwd = "work"
prefix = "files"
call_timeout = "500ms"

[servers.fs.tools]
allow = ["read_*", "list_*"]
deny = ["*_secret"]
rename = { read_text_file = "read" }
descriptions = { read = "Read a note" }

[servers.remote]
url = "https://example.com/mcp"
headers = { Authorization = "Bearer ${TOKEN}" }
prefix = false

[servers.off]
command = "true"
enabled = false
"#;
    let config = Config::parse(text, Path::new("/etc/conductor/servers.toml"), env).unwrap();
    assert_eq!(config.separator, "_-");
    let names: Vec<&str> = config.servers.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["fs", "remote", "off"], "file order is kept");
    let enabled: Vec<&str> = config.enabled_servers().map(|s| s.name.as_str()).collect();
    assert_eq!(enabled, ["fs", "remote"]);

    let fs = &config.servers[0];
    let Transport::Stdio(stdio) = &fs.transport else {
        panic!("fs is stdio")
    };
    assert_eq!(stdio.args, ["-y", "server-filesystem", "/home/ada/notes"]);
    assert_eq!(
        stdio.env,
        [
            ("API_TOKEN".to_owned(), "s3cret".to_owned()),
            ("MODE".to_owned(), "fast".to_owned())
        ]
    );
    assert_eq!(stdio.cwd, Path::new("/etc/conductor/work"));
    assert_eq!(fs.prefix, Prefix::Custom("files".to_owned()));
    assert_eq!(
        fs.startup_timeout,
        Duration::from_secs(5),
        "inherits [conductor]"
    );
    assert_eq!(fs.call_timeout, Duration::from_millis(500), "its own");
    assert!(fs.tools.offers("read_text_file"));
    assert!(!fs.tools.offers("read_secret"));
    assert!(!fs.tools.offers("write_file"));
    assert_eq!(fs.tools.rename["read_text_file"], "read");

    let remote = &config.servers[1];
    let Transport::StreamableHttp(http) = &remote.transport else {
        panic!("remote is http")
    };
    assert_eq!(
        http.headers,
        [("Authorization".to_owned(), "Bearer s3cret".to_owned())]
    );
    assert_eq!(remote.prefix, Prefix::None);
    assert_eq!(remote.call_timeout, Duration::from_secs(60));
    assert!(!config.servers[2].enabled);
}

#[test]
fn a_stdio_server_starts_in_the_config_folder_by_default() {
    let config = Config::parse(
        "[servers.a]\ncommand = \"x\"\n",
        Path::new("/srv/conductor/servers.toml"),
        env,
    )
    .unwrap();
    let Transport::Stdio(stdio) = &config.servers[0].transport else {
        panic!()
    };
    assert_eq!(stdio.cwd, Path::new("/srv/conductor"));
}

#[test]
fn every_problem_is_reported_at_once_with_its_place() {
    let text = r#"
[conductor]
separater = "__"
call_timeout = "soon"

[servers.fs]
comand = "npx"
args = "-y"

[servers.git__hub]
command = "git-mcp"

[servers.remote]
url = "ftp://example.com"
headers = { Authorization = "Bearer ${MISSING_TOKEN}" }
transport = "websocket"

[servers.both]
command = "x"
url = "https://example.com/mcp"

[servers.local]
command = "x"
env = { KEY = "${ALSO_MISSING}" }
headers = { X = "y" }
enabled = "yes"
prefix = "bad prefix"

[servers.local.tools]
allow = ["[unclosed"]
rename = { a = "not a name" }
extra = 1

[server.typo]
command = "x"
"#;
    insta::assert_snapshot!(errors(text));
}

#[test]
fn invalid_toml_is_reported_with_its_place() {
    insta::assert_snapshot!(errors("[servers.a]\ncommand = \"x\nargs = []\n"));
}

#[test]
fn a_missing_file_names_the_file() {
    let error =
        anyhow::Error::from(Config::load(Path::new("/nonexistent/servers.toml")).unwrap_err());
    // As `conductor` prints it: the cause once.
    let shown = format!("{error:#}");
    assert_eq!(
        shown,
        "cannot read config `/nonexistent/servers.toml`: No such file or directory (os error 2)"
    );
}

#[test]
fn the_bundled_config_is_valid() {
    let path = super::support::project_root().join("servers.toml");
    let config = Config::load(&path).unwrap_or_else(|error| panic!("{error}"));
    assert!(
        config.enabled_servers().count() >= 3,
        "the bundled config shows several servers"
    );
}

/// Whatever the file holds, loading it answers with a config or with problems, never a panic.
#[test]
fn no_input_makes_loading_panic() {
    let valid = r#"
[conductor]
separator = "__"
call_timeout = "1.5s"
[servers.fs]
command = "npx"
args = ["-y", "server", "${HOME:-/}"]
env = { K = "v" }
[servers.fs.tools]
allow = ["read_*"]
rename = { a = "b" }
[servers.remote]
url = "https://example.com/mcp"
headers = { A = "${TOKEN}" }
prefix = false
"#;
    // Every prefix of the file, cut at any character.
    for (end, _) in valid.char_indices() {
        let _ = Config::parse(&valid[..end], Path::new("servers.toml"), env);
    }
    // Every byte replaced by characters that matter to TOML, to expansion and to names.
    for index in 0..valid.len() {
        for replacement in ["\"", "[", "]", "=", "$", "{", "}", "\n", "é", "0", "#", "."] {
            let mut mutated = valid.as_bytes().to_vec();
            mutated.splice(index..index + 1, replacement.bytes());
            if let Ok(text) = String::from_utf8(mutated) {
                let _ = Config::parse(&text, Path::new("servers.toml"), env);
            }
        }
    }
}

#[test]
fn supervision_keys_become_typed_values() {
    use mcp_conductor::config::{Isolation, StartMode};
    let text = r#"
[servers.pool]
command = "server"
replicas = 3
max_restarts = 4
restart_delay = "250ms"
stable_after = "2m"
ping_interval = "off"
stop_grace = "1s"
fallback = "remote"
timeout_resets_on_progress = true
max_call_time = "10m"
tools.timeouts = { export = "5m" }

[servers.private]
command = "server"
isolation = "session"
start = "lazy"
idle_timeout = "30s"

[servers.remote]
urls = ["https://a.example.com/mcp", "https://b.example.com/mcp"]
ping_interval = "5s"
ping_timeout = "1s"
"#;
    let config = Config::parse(text, Path::new("servers.toml"), env).unwrap();
    let pool = &config.servers[0];
    assert_eq!(pool.supervision.replicas, 3);
    assert_eq!(pool.supervision.max_restarts, 4);
    assert_eq!(pool.supervision.restart_delay, Duration::from_millis(250));
    assert_eq!(pool.supervision.stable_after, Duration::from_secs(120));
    assert_eq!(pool.supervision.ping_interval, None);
    assert_eq!(pool.supervision.stop_grace, Duration::from_secs(1));
    assert_eq!(pool.fallback.as_ref().unwrap().as_str(), "remote");
    assert!(pool.timeout_resets_on_progress);
    assert_eq!(pool.max_call_time, Some(Duration::from_secs(600)));
    assert_eq!(pool.timeout_for("export"), Duration::from_secs(300));
    assert_eq!(pool.timeout_for("other"), pool.call_timeout);

    let private = &config.servers[1];
    assert_eq!(private.supervision.isolation, Isolation::Session);
    assert_eq!(private.supervision.start, StartMode::Lazy);
    assert_eq!(private.supervision.idle_timeout, Duration::from_secs(30));
    assert_eq!(private.supervision.replicas, 1);

    let remote = &config.servers[2];
    let Transport::StreamableHttp(http) = &remote.transport else {
        panic!("remote is http")
    };
    assert_eq!(http.urls.len(), 2);
    assert_eq!(
        remote.supervision.ping_interval,
        Some(Duration::from_secs(5))
    );
    assert_eq!(remote.supervision.ping_timeout, Duration::from_secs(1));
}

#[test]
fn supervision_mistakes_are_reported_with_their_place() {
    insta::assert_snapshot!(errors(
        r#"
[servers.remote]
url = "https://a.example.com/mcp"
urls = ["https://b.example.com/mcp"]
replicas = 2

[servers.web]
urls = []

[servers.local]
command = "server"
start = "later"
isolation = "user"
protocol = "2026"
fallback = "remtoe"
ping_interval = "sometimes"
tools.timeouts = { export = "forever", import = 5 }

[servers.both]
command = "server"
replicas = 2
isolation = "session"
fallback = "both"

[servers.far]
url = "https://far.example.com/mcp"
replicas = 2
"#
    ));
}

#[test]
fn a_separator_hosts_would_rewrite_is_refused() {
    let error = errors("[conductor]\nseparator = \".\"\n\n[servers.a]\ncommand = \"x\"\n");
    assert!(
        error.contains("separator `.` is not allowed") && error.contains(":2:13"),
        "{error}"
    );
}
