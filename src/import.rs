//! `conductor import`: a host's MCP server list (Claude Desktop, Cursor, VS Code, Claude
//! Code) written as `servers.toml`, with a note for everything that does not carry over.
//!
//! The hosts keep one JSON object of servers, under `mcpServers` (Claude Desktop, Cursor,
//! Claude Code's `.mcp.json` and `~/.claude.json`) or `servers` (VS Code's `mcp.json`, and
//! `mcp.servers` in its settings). Each entry is a local command (`command`, `args`, `env`,
//! `cwd`) or a remote endpoint (`url`, `headers`, and a `type` of `http` or `sse`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// The hosts whose files `import` knows, for `--from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Host {
    ClaudeDesktop,
    Cursor,
    Vscode,
    ClaudeCode,
}

impl Host {
    /// Where the host keeps its servers, most specific first (a project's file before the
    /// user's); the first that exists is read.
    pub fn places(self) -> Vec<PathBuf> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let config_home = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|home| home.join(".config")));
        let app_support = home
            .as_ref()
            .map(|home| home.join("Library/Application Support"));
        let appdata = std::env::var_os("APPDATA").map(PathBuf::from);
        let mut places = Vec::new();
        match self {
            Host::ClaudeDesktop => {
                let file = "Claude/claude_desktop_config.json";
                places.extend(config_home.map(|dir| dir.join(file)));
                places.extend(app_support.map(|dir| dir.join(file)));
                places.extend(appdata.map(|dir| dir.join(file)));
            }
            Host::Cursor => {
                places.push(PathBuf::from(".cursor/mcp.json"));
                places.extend(home.map(|home| home.join(".cursor/mcp.json")));
            }
            Host::Vscode => {
                places.push(PathBuf::from(".vscode/mcp.json"));
                places.extend(config_home.map(|dir| dir.join("Code/User/mcp.json")));
                places.extend(app_support.map(|dir| dir.join("Code/User/mcp.json")));
                places.extend(appdata.map(|dir| dir.join("Code/User/mcp.json")));
            }
            Host::ClaudeCode => {
                places.push(PathBuf::from(".mcp.json"));
                places.extend(home.map(|home| home.join(".claude.json")));
            }
        }
        places
    }
}

/// What an import made: the new config's text, how many servers it has, and what did not
/// carry over.
#[derive(Debug)]
pub struct Imported {
    pub toml: String,
    pub servers: usize,
    pub notes: Vec<String>,
}

/// Read a host's file and write its servers as `servers.toml`.
pub fn import(path: &Path) -> anyhow::Result<Imported> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| anyhow::anyhow!("cannot read `{}`: {error}", path.display()))?;
    let document: Value = serde_json::from_str(&text).map_err(|error| {
        anyhow::anyhow!(
            "`{}` is not JSON: {error} (line {}, column {})",
            path.display(),
            error.line(),
            error.column()
        )
    })?;
    let mut notes = Vec::new();
    let servers = servers_of(&document, &mut notes).ok_or_else(|| {
        anyhow::anyhow!(
            "`{}` has no servers: expected an object `mcpServers` (Claude Desktop, Cursor, Claude Code) or `servers` (VS Code)",
            path.display()
        )
    })?;
    let mut toml = format!(
        "# Imported from {} by `conductor import`.\n# Servers do not inherit conductor's environment: name what each needs in `env` or\n# `inherit_env` (docs/configuration.md).\n",
        path.display()
    );
    let mut count = 0;
    let mut names = Vec::new();
    for (name, entry) in servers {
        let Some(entry) = entry.as_object() else {
            notes.push(format!("`{name}` is not an object: skipped"));
            continue;
        };
        let server = server_name(name, &names);
        if server != *name {
            notes.push(format!(
                "`{name}` is named `{server}`: a server's name is letters, digits, `_` and `-`, without `__`"
            ));
        }
        match server_table(&server, entry, &mut notes) {
            Some(table) => {
                toml.push('\n');
                toml.push_str(&table);
                count += 1;
                names.push(server);
            }
            None => notes.push(format!("`{name}` has neither `command` nor `url`: skipped")),
        }
    }
    Ok(Imported {
        toml,
        servers: count,
        notes,
    })
}

/// The object of servers in a host's document.
fn servers_of<'a>(document: &'a Value, notes: &mut Vec<String>) -> Option<&'a Map<String, Value>> {
    if let Some(projects) = document.get("projects").and_then(Value::as_object) {
        let with_servers = projects
            .iter()
            .filter(|(_, project)| {
                project
                    .get("mcpServers")
                    .and_then(Value::as_object)
                    .is_some_and(|servers| !servers.is_empty())
            })
            .count();
        if with_servers > 0 {
            notes.push(format!(
                "{with_servers} project(s) of this Claude Code file have servers of their own: import each project's `.mcp.json` on its own"
            ));
        }
    }
    document
        .get("mcpServers")
        .or_else(|| document.get("servers"))
        .or_else(|| document.get("mcp").and_then(|mcp| mcp.get("servers")))
        .and_then(Value::as_object)
}

/// A valid server name for `name`, apart from those already taken.
fn server_name(name: &str, taken: &[String]) -> String {
    let mut clean = crate::catalog::with_name_characters(name);
    while clean.contains("__") {
        clean = clean.replace("__", "_");
    }
    let mut clean = clean.trim_matches('_').chars().take(56).collect::<String>();
    if clean.is_empty() || clean == "runs" || clean == "workflow" {
        clean = format!("server-{clean}").trim_end_matches('-').to_owned();
    }
    let mut candidate = clean.clone();
    let mut n = 2;
    while taken.contains(&candidate) {
        candidate = format!("{clean}-{n}");
        n += 1;
    }
    candidate
}

/// The `[servers.NAME]` table of one entry, or `None` for an entry that is neither local
/// nor remote.
fn server_table(name: &str, entry: &Map<String, Value>, notes: &mut Vec<String>) -> Option<String> {
    let mut table = format!("[servers.{name}]\n");
    let kind = entry.get("type").and_then(Value::as_str);
    let known: &[&str] = if let Some(command) = entry.get("command").and_then(Value::as_str) {
        line(
            &mut table,
            "command",
            &string(&variables(command, name, notes)),
        );
        let args: Vec<String> = entry
            .get("args")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .map(|arg| string(&variables(&text_of(arg), name, notes)))
            .collect();
        if !args.is_empty() {
            line(&mut table, "args", &format!("[{}]", args.join(", ")));
        }
        if let Some(env) = entry.get("env").and_then(Value::as_object) {
            line(&mut table, "env", &inline_table(env, name, notes));
        }
        if let Some(cwd) = entry.get("cwd").and_then(Value::as_str) {
            line(&mut table, "cwd", &string(&variables(cwd, name, notes)));
        }
        &["command", "args", "env", "cwd", "type"]
    } else if let Some(url) = entry
        .get("url")
        .or_else(|| entry.get("serverUrl"))
        .and_then(Value::as_str)
    {
        line(&mut table, "url", &string(&variables(url, name, notes)));
        let sse =
            kind == Some("sse") || (kind.is_none() && url.trim_end_matches('/').ends_with("/sse"));
        if sse {
            line(&mut table, "transport", "\"sse\"");
            if kind.is_none() {
                notes.push(format!(
                    "`{name}`: its URL ends in `/sse`, so it is taken for the legacy HTTP+SSE transport; remove `transport` if it speaks Streamable HTTP"
                ));
            }
        }
        if let Some(headers) = entry.get("headers").and_then(Value::as_object) {
            line(&mut table, "headers", &inline_table(headers, name, notes));
        }
        &["url", "serverUrl", "headers", "type"]
    } else {
        return None;
    };
    if entry.get("disabled").and_then(Value::as_bool) == Some(true) {
        line(&mut table, "enabled", "false");
    }
    for key in entry.keys() {
        if known.contains(&key.as_str()) || key == "disabled" {
            continue;
        }
        let why = match key.as_str() {
            "envFile" => "conductor reads no env files: put the variables in `env`",
            "autoApprove" | "alwaysAllow" => "conductor has no per-tool approvals yet",
            "timeout" => "set `call_timeout` (a duration such as \"60s\") instead",
            "oauth" | "auth" => {
                "conductor does not run OAuth for remote servers: give a token in `headers`"
            }
            _ => "conductor has no such setting",
        };
        notes.push(format!("`{name}`: `{key}` not carried over: {why}"));
    }
    Some(table)
}

fn line(table: &mut String, key: &str, value: &str) {
    let _ = writeln!(table, "{key} = {value}");
}

/// A JSON value as the text of a TOML string value (numbers and booleans as their text).
fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A TOML basic string.
fn string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// An inline table of strings, such as `env` or `headers`.
fn inline_table(map: &Map<String, Value>, server: &str, notes: &mut Vec<String>) -> String {
    let entries: Vec<String> = map
        .iter()
        .map(|(key, value)| {
            let key = if key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                && !key.is_empty()
            {
                key.clone()
            } else {
                string(key)
            };
            format!(
                "{key} = {}",
                string(&variables(&text_of(value), server, notes))
            )
        })
        .collect();
    format!("{{ {} }}", entries.join(", "))
}

/// Variables hosts fill in themselves, which conductor has no value for.
const HOST_VARIABLES: [&str; 6] = [
    "workspaceFolder",
    "workspaceFolderBasename",
    "cwd",
    "pathSeparator",
    "file",
    "fileDirname",
];

/// The hosts' variables in a value, as conductor's `${VAR}`: `${env:VAR}` (VS Code, Cursor)
/// becomes `${VAR}`, Claude Code's `${VAR}` and `${VAR:-default}` stay; a VS Code `${input:ID}`
/// (asked of the user) becomes `${ID}` in capitals, with a note, and other host variables
/// (`${workspaceFolder}`, `${userHome}`) are noted; a lone `$` is doubled.
fn variables(text: &str, server: &str, notes: &mut Vec<String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let Some(body) = after.strip_prefix('{') else {
            out.push_str("$$");
            rest = after;
            continue;
        };
        let Some(end) = body.find('}') else {
            out.push_str("$$");
            rest = after;
            continue;
        };
        let expression = &body[..end];
        if expression == "userHome" {
            out.push_str("${HOME}");
        } else if HOST_VARIABLES.contains(&expression) {
            notes.push(format!(
                "`{server}`: `${{{expression}}}` is the host's own variable: replace it with its value"
            ));
            let _ = write!(out, "$${{{expression}}}");
        } else if let Some(variable) = expression.strip_prefix("env:") {
            let _ = write!(out, "${{{variable}}}");
        } else if let Some(input) = expression.strip_prefix("input:") {
            let variable: String = input
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            notes.push(format!(
                "`{server}`: VS Code asks the user for input `{input}`; conductor reads `${{{variable}}}` from its environment instead"
            ));
            let _ = write!(out, "${{{variable}}}");
        } else if expression.split(":-").next().is_some_and(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        }) {
            let _ = write!(out, "${{{expression}}}");
        } else {
            notes.push(format!(
                "`{server}`: `${{{expression}}}` is the host's own variable: replace it with its value"
            ));
            let _ = write!(out, "$${{{expression}}}");
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_valid_and_distinct() {
        assert_eq!(server_name("github", &[]), "github");
        assert_eq!(server_name("my server.v2", &[]), "my_server_v2");
        assert_eq!(server_name("a__b", &[]), "a_b");
        assert_eq!(server_name("runs", &[]), "server-runs");
        assert_eq!(server_name("x", &["x".to_owned()]), "x-2");
    }

    #[test]
    fn host_variables_become_conductors() {
        let mut notes = Vec::new();
        assert_eq!(variables("${env:HOME}/x", "s", &mut notes), "${HOME}/x");
        assert_eq!(
            variables("${TOKEN:-none}", "s", &mut notes),
            "${TOKEN:-none}"
        );
        assert_eq!(variables("cost $5", "s", &mut notes), "cost $$5");
        assert!(notes.is_empty());
        assert_eq!(variables("${input:api-key}", "s", &mut notes), "${API_KEY}");
        assert_eq!(
            variables("${workspaceFolder}/a", "s", &mut notes),
            "$${workspaceFolder}/a"
        );
        assert_eq!(notes.len(), 2, "{notes:?}");
    }
}
