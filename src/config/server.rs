//! One `[servers.<name>]` table: its transport, names, timeouts and tool rules.

use std::collections::HashMap;
use std::path::Path;

use globset::{Glob, GlobSet, GlobSetBuilder};
use toml::Spanned;
use toml::de::DeValue;

use super::diagnostic::Problems;
use super::reader::{Table, Value, as_table, wrong_type};
use super::*;

pub(super) fn read_server(
    name: Spanned<String>,
    value: &Value<'_>,
    defaults: &Defaults,
    folder: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<ServerSpec> {
    let server_name = check_server_name(&name, &defaults.separator, problems);
    let mut table = as_table(value, format!("servers.{}", name.get_ref()), problems)?;
    let expanded = |text: Option<Spanned<String>>, what: &str, problems: &mut Problems| {
        let text = text?;
        match expand(text.get_ref(), env) {
            Ok(value) => Some(value),
            Err(error) => {
                let hint = matches!(error, ExpandError::Missing(_)).then(|| {
                    "set it in the environment conductor starts in, or give a default: `${NAME:-value}`"
                });
                problems.add_with_hint(
                    text.span(),
                    format!("server `{}`: `{what}`: {error}", name.get_ref()),
                    hint,
                );
                None
            }
        }
    };

    let command = table.string("command", problems);
    // `None` when `url`/`urls` were given wrongly (and reported), so they are not also missing.
    let urls_read = read_urls(&mut table, name.get_ref(), problems);
    let url = urls_read.clone().flatten();
    let transport_kind = table.string("transport", problems);
    let args = table.strings("args", problems);
    let env_vars = table.string_map("env", problems);
    let inherit_env = table.strings("inherit_env", problems);
    let roots = table
        .strings("roots", problems)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|root| {
            let span = root.span();
            let root = expanded(Some(root), "roots", problems)?;
            root_uri(&root, folder).or_else(|| {
                problems.add_with_hint(
                    span,
                    format!("server `{}`: `roots`: `{root}` is not a folder or a URI", name.get_ref()),
                    Some("give an absolute or relative folder (`/home/me/notes`, `notes`) or a URI (`file:///home/me/notes`)"),
                );
                None
            })
        })
        .collect();
    let cwd = table.string("cwd", problems);
    let headers = table.string_map("headers", problems);
    let enabled = table.bool("enabled", problems).unwrap_or(true);
    let prefix = read_prefix(&mut table, &defaults.separator, problems);
    let startup_timeout =
        read_duration(&mut table, "startup_timeout", problems).unwrap_or(defaults.startup_timeout);
    let call_timeout =
        read_duration(&mut table, "call_timeout", problems).unwrap_or(defaults.call_timeout);
    let max_message_bytes =
        super::read_message_size(&mut table, defaults.max_message_bytes, problems);
    let breaker_failures = table
        .count("breaker_failures", problems)
        .map_or(crate::breaker::DEFAULT_FAILURES, |count| {
            count.min(u64::from(u32::MAX)) as u32
        });
    let breaker_cool_down = read_duration(&mut table, "breaker_cool_down", problems)
        .unwrap_or(crate::breaker::DEFAULT_COOL_DOWN);
    let timeout_resets_on_progress = table
        .bool("timeout_resets_on_progress", problems)
        .unwrap_or(false);
    let max_call_time = read_duration(&mut table, "max_call_time", problems);
    let fallback = table.string("fallback", problems).map(|fallback| {
        let span = fallback.span();
        (fallback.into_inner(), span)
    });
    let supervision = read_supervision(&mut table, problems);
    let handshake = read_handshake(&mut table, problems);
    let tools = table
        .table("tools", problems)
        .map(|tools| read_tool_rules(tools, problems))
        .unwrap_or_default();

    // `command` means stdio; `url` means Streamable HTTP unless `transport = "sse"` asks for
    // the legacy HTTP+SSE transport.
    let legacy_sse = transport_kind
        .as_ref()
        .is_some_and(|kind| kind.get_ref() == "sse");
    if let Some(kind) = &transport_kind {
        let fits = match kind.get_ref().as_str() {
            "stdio" => Some(url.is_none()),
            "streamable-http" | "sse" => Some(url.is_some()),
            _ => None,
        };
        match fits {
            Some(true) => {}
            Some(false) => problems.add_with_hint(
                kind.span(),
                format!(
                    "server `{}`: `transport = \"{}\"` does not match the server's {}",
                    name.get_ref(),
                    kind.get_ref(),
                    if url.is_some() { "`url`" } else { "`command`" }
                ),
                Some("`stdio` goes with `command`; `streamable-http` and `sse` go with `url`"),
            ),
            None => problems.add_with_hint(
                kind.span(),
                format!(
                    "server `{}`: unknown transport `{}`",
                    name.get_ref(),
                    kind.get_ref()
                ),
                Some("use `stdio`, `streamable-http` or `sse` (the legacy HTTP+SSE transport)"),
            ),
        }
    }

    let transport = match (command, url) {
        (Some(command), None) => {
            for (key, value) in headers.iter() {
                problems.add(
                    key.span().start..value.span().end,
                    format!(
                        "server `{}`: `headers` only apply to a server with `url`",
                        name.get_ref()
                    ),
                );
            }
            let command = expanded(Some(command), "command", problems);
            let args: Vec<Option<String>> = args
                .unwrap_or_default()
                .into_iter()
                .map(|arg| expanded(Some(arg), "args", problems))
                .collect();
            let env_vars: Vec<Option<(String, String)>> = env_vars
                .into_iter()
                .map(|(key, value)| {
                    let what = format!("env.{}", key.get_ref());
                    expanded(Some(value), &what, problems).map(|value| (key.into_inner(), value))
                })
                .collect();
            let inherit_env = inherit_env
                .unwrap_or_default()
                .into_iter()
                .filter_map(|variable| {
                    let valid =
                        !variable.get_ref().is_empty() && !variable.get_ref().contains(['=', '\0']);
                    if !valid {
                        problems.add(
                            variable.span(),
                            format!(
                                "server `{}`: `inherit_env` lists variable names; `{}` is not one",
                                name.get_ref(),
                                variable.get_ref()
                            ),
                        );
                    }
                    valid.then(|| variable.into_inner())
                })
                .collect();
            let cwd = match cwd {
                Some(cwd) => expanded(Some(cwd), "cwd", problems).map(|cwd| folder.join(cwd)),
                None => Some(folder.to_path_buf()),
            };
            // A relative path to a program (`bin/server`) is relative to the folder the server
            // starts in, like its arguments, whichever folder conductor itself was started in.
            let command = match (command, &cwd) {
                (Some(command), Some(cwd))
                    if command.contains('/') && Path::new(&command).is_relative() =>
                {
                    Some(cwd.join(command).display().to_string())
                }
                (command, _) => command,
            };
            Some(Transport::Stdio(StdioSpec {
                command: command?,
                args: args.into_iter().collect::<Option<_>>()?,
                env: env_vars.into_iter().collect::<Option<_>>()?,
                inherit_env,
                cwd: cwd?,
            }))
        }
        (None, Some(url)) => {
            for key in ["args", "env", "inherit_env", "cwd"] {
                if let Some(value) = table.get(key) {
                    problems.add(
                        value.span(),
                        format!(
                            "server `{}`: `{key}` only applies to a server with `command`",
                            name.get_ref()
                        ),
                    );
                }
            }
            let urls: Vec<Option<String>> = url
                .into_iter()
                .map(|url| {
                    let span = url.span();
                    let url = expanded(Some(url), "url", problems)?;
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        problems.add_with_hint(
                            span,
                            format!(
                                "server `{}`: `url` must start with `http://` or `https://`",
                                name.get_ref()
                            ),
                            Some("a Streamable HTTP endpoint usually ends in `/mcp`"),
                        );
                    }
                    Some(url)
                })
                .collect();
            let headers: Vec<Option<(String, String)>> = headers
                .into_iter()
                .map(|(key, value)| {
                    let what = format!("headers.{}", key.get_ref());
                    expanded(Some(value), &what, problems).map(|value| (key.into_inner(), value))
                })
                .collect();
            let spec = HttpSpec {
                urls: urls.into_iter().collect::<Option<_>>()?,
                headers: headers.into_iter().collect::<Option<_>>()?,
            };
            Some(if legacy_sse {
                Transport::Sse(spec)
            } else {
                Transport::StreamableHttp(spec)
            })
        }
        (Some(command), Some(_)) => {
            // Reported once, below, whichever of `url` and `urls` was given.
            problems.add_with_hint(
                command.span(),
                format!("server `{}` has both `command` and `url`", name.get_ref()),
                Some("a server is either a local process (`command`) or a remote one (`url`)"),
            );
            None
        }
        (None, None) if urls_read.is_none() => None,
        (None, None) => {
            problems.add_with_hint(
                name.span(),
                format!("server `{}` has neither `command` nor `url`", name.get_ref()),
                Some("add `command = \"...\"` for a local process or `url = \"https://...\"` for a remote server"),
            );
            None
        }
    };
    table.finish(problems);
    let transport = transport?;
    if !matches!(transport, Transport::Stdio(_)) {
        let stdio_only = [
            (supervision.replicas > 1, "replicas"),
            (supervision.isolation == Isolation::Session, "isolation"),
        ];
        for (set, key) in stdio_only {
            if set {
                problems.add_with_hint(
                    name.span(),
                    format!(
                        "server `{}`: `{key}` only applies to a server with `command`",
                        name.get_ref()
                    ),
                    Some("for a remote server, list several endpoints in `urls` to fail over"),
                );
            }
        }
    }
    if supervision.replicas > 1 && supervision.isolation == Isolation::Session {
        problems.add_with_hint(
            name.span(),
            format!(
                "server `{}` sets both `replicas` and `isolation = \"session\"`",
                name.get_ref()
            ),
            Some("a session's own child is never shared, so replicas do not apply; keep one"),
        );
    }
    let fallback = match fallback {
        Some((fallback, span)) if fallback == *name.get_ref() => {
            problems.add(
                span,
                format!("server `{fallback}` cannot be its own fallback"),
            );
            None
        }
        Some((fallback, _)) => Some(ServerName(fallback)),
        None => None,
    };
    Some(ServerSpec {
        name: server_name?,
        transport,
        enabled,
        prefix,
        startup_timeout,
        call_timeout,
        max_message_bytes,
        breaker_failures,
        breaker_cool_down,
        timeout_resets_on_progress,
        max_call_time,
        fallback,
        handshake,
        supervision,
        tools,
        roots,
    })
}

/// A root as the URI a server is given: a URI stays as it is; a folder, relative to the
/// config's folder, becomes a `file://` URI.
fn root_uri(root: &str, folder: &Path) -> Option<String> {
    if root.is_empty() {
        return None;
    }
    if root.contains("://") {
        return Some(root.to_owned());
    }
    let path = folder.join(root);
    let path = std::path::absolute(&path).unwrap_or(path);
    Some(format!("file://{}", path.display()))
}

/// `protocol = "initialize" | "discover" | "auto"`: how conductor opens its session with the
/// server.
fn read_handshake(table: &mut Table<'_, '_>, problems: &mut Problems) -> Handshake {
    let Some(protocol) = table.string("protocol", problems) else {
        return Handshake::default();
    };
    match protocol.get_ref().as_str() {
        "initialize" => Handshake::Initialize,
        "discover" => Handshake::Discover,
        "auto" => Handshake::Auto,
        other => {
            problems.add_with_hint(
                protocol.span(),
                format!("`{}.protocol`: unknown handshake `{other}`", table.path()),
                Some("use `initialize` (protocol 2025-11-25 and before, the default), `discover` (2026-07-28) or `auto` (try `discover`, fall back to `initialize`)"),
            );
            Handshake::default()
        }
    }
}

/// `url = "..."` or, to fail over between endpoints, `urls = ["...", "..."]`: `Some(None)`
/// when neither is given, `None` when they are given wrongly (reported here).
fn read_urls(
    table: &mut Table<'_, '_>,
    server: &str,
    problems: &mut Problems,
) -> Option<Option<Vec<Spanned<String>>>> {
    let url = table.string("url", problems);
    let urls = table.strings("urls", problems);
    match (url, urls) {
        (Some(url), None) => Some(Some(vec![url])),
        (None, Some(urls)) if urls.is_empty() => {
            if let Some(value) = table.get("urls") {
                problems.add(value.span(), format!("server `{server}`: `urls` is empty"));
            }
            None
        }
        (None, Some(urls)) => Some(Some(urls)),
        (Some(url), Some(_)) => {
            problems.add_with_hint(
                url.span(),
                format!("server `{server}` has both `url` and `urls`"),
                Some("keep `url` for one endpoint, or list every endpoint in `urls`"),
            );
            None
        }
        (None, None) => Some(None),
    }
}

/// The supervision keys of a server table, each defaulting to [`Supervision::default`].
fn read_supervision(table: &mut Table<'_, '_>, problems: &mut Problems) -> Supervision {
    let defaults = Supervision::default();
    let start = match table.string("start", problems) {
        None => defaults.start,
        Some(start) => match start.get_ref().as_str() {
            "eager" => StartMode::Eager,
            "lazy" => StartMode::Lazy,
            other => {
                problems.add_with_hint(
                    start.span(),
                    format!("`{}.start`: unknown mode `{other}`", table.path()),
                    Some("use `eager` (with conductor, the default) or `lazy` (on its first call)"),
                );
                defaults.start
            }
        },
    };
    let isolation = match table.string("isolation", problems) {
        None => defaults.isolation,
        Some(isolation) => match isolation.get_ref().as_str() {
            "shared" => Isolation::Shared,
            "session" => Isolation::Session,
            other => {
                problems.add_with_hint(
                    isolation.span(),
                    format!("`{}.isolation`: unknown mode `{other}`", table.path()),
                    Some("use `shared` (the default) or `session` (a child per client session)"),
                );
                defaults.isolation
            }
        },
    };
    let replicas = table
        .count("replicas", problems)
        .map_or(defaults.replicas, |count| count.min(64) as usize);
    let max_restarts = table
        .count("max_restarts", problems)
        .map_or(defaults.max_restarts, |count| {
            count.min(u64::from(u32::MAX)) as u32
        });
    let ping_interval = match table.get("ping_interval") {
        Some(value) if matches!(value.get_ref(), DeValue::String(text) if text == "off") => None,
        Some(_) => read_duration(table, "ping_interval", problems).or(defaults.ping_interval),
        None => defaults.ping_interval,
    };
    let mut read = |key, default| read_duration(table, key, problems).unwrap_or(default);
    Supervision {
        start,
        isolation,
        replicas,
        max_restarts,
        restart_delay: read("restart_delay", defaults.restart_delay),
        stable_after: read("stable_after", defaults.stable_after),
        ping_interval,
        ping_timeout: read("ping_timeout", defaults.ping_timeout),
        idle_timeout: read("idle_timeout", defaults.idle_timeout),
        stop_grace: read("stop_grace", defaults.stop_grace),
    }
}

fn check_server_name(
    name: &Spanned<String>,
    separator: &str,
    problems: &mut Problems,
) -> Option<ServerName> {
    let text = name.get_ref();
    if !is_valid_public_name(text) {
        problems.add_with_hint(
            name.span(),
            format!("server name `{text}` is not allowed"),
            Some("use 1 to 64 letters, digits, `_` or `-`"),
        );
        return None;
    }
    if text == "runs" || text == "workflow" {
        problems.add_with_hint(
            name.span(),
            format!("server name `{text}` is reserved: conductor uses it for workflows"),
            Some("give this server another name"),
        );
        return None;
    }
    if text.contains(separator) {
        problems.add_with_hint(
            name.span(),
            format!("server name `{text}` contains the separator `{separator}`"),
            Some("tool names are `<server><separator><tool>`, so the server part must not contain the separator; rename the server or set `[conductor] separator`"),
        );
        return None;
    }
    Some(ServerName(text.clone()))
}

fn read_prefix(table: &mut Table<'_, '_>, separator: &str, problems: &mut Problems) -> Prefix {
    let path = format!("{}.prefix", table.path());
    let Some(value) = table.get("prefix") else {
        return Prefix::ServerName;
    };
    match value.get_ref() {
        DeValue::Boolean(true) => Prefix::ServerName,
        DeValue::Boolean(false) => Prefix::None,
        DeValue::String(text) if text.is_empty() => Prefix::None,
        DeValue::String(text) if !is_valid_public_name(text) || text.contains(separator) => {
            problems.add_with_hint(
                value.span(),
                format!("prefix `{text}` is not allowed"),
                Some(format!(
                    "use letters, digits, `_` or `-`, without the separator `{separator}`; or `prefix = false` for no prefix"
                )),
            );
            Prefix::ServerName
        }
        DeValue::String(text) => Prefix::Custom(text.to_string()),
        other => {
            wrong_type(value.span(), &path, "a string or `false`", other, problems);
            Prefix::ServerName
        }
    }
}

fn read_tool_rules(mut table: Table<'_, '_>, problems: &mut Problems) -> ToolRules {
    let allow = table
        .strings("allow", problems)
        .map(|globs| compile_globs(globs, problems));
    let deny = table
        .strings("deny", problems)
        .map(|globs| compile_globs(globs, problems));
    let rename = table
        .string_map("rename", problems)
        .into_iter()
        .filter(|(_, new_name)| {
            let valid = is_valid_public_name(new_name.get_ref());
            if !valid {
                problems.add_with_hint(
                    new_name.span(),
                    format!("`{}` is not a valid tool name", new_name.get_ref()),
                    Some("use 1 to 64 letters, digits, `_` or `-`"),
                );
            }
            valid
        })
        .map(|(old, new)| (old.into_inner(), new.into_inner()))
        .collect();
    let descriptions = table
        .string_map("descriptions", problems)
        .into_iter()
        .map(|(tool, text)| (tool.into_inner(), text.into_inner()))
        .collect();
    let mut timeouts = HashMap::new();
    if let Some(table) = table.table("timeouts", problems) {
        for (tool, value) in table.entries() {
            let path = format!("{}.{}", table.path(), tool.get_ref());
            let duration = super::reader::as_string(value, &path, problems)
                .and_then(|text| duration_of(text, &path, problems));
            if let Some(duration) = duration {
                timeouts.insert(tool.into_inner(), duration);
            }
        }
    }
    let mut annotations = HashMap::new();
    if let Some(overrides) = table.table("annotations", problems) {
        for (tool, value) in overrides.entries() {
            let path = format!("{}.{}", overrides.path(), tool.get_ref());
            let Some(mut hints) = as_table(value, path, problems) else {
                continue;
            };
            let hint = AnnotationOverride {
                read_only: hints.bool("read_only", problems),
                destructive: hints.bool("destructive", problems),
                idempotent: hints.bool("idempotent", problems),
                open_world: hints.bool("open_world", problems),
            };
            hints.finish(problems);
            annotations.insert(tool.into_inner(), hint);
        }
    }
    table.finish(problems);
    ToolRules {
        allow,
        deny,
        rename,
        descriptions,
        annotations,
        timeouts,
    }
}

pub(super) fn compile_globs(globs: Vec<Spanned<String>>, problems: &mut Problems) -> GlobSet {
    let mut builder = GlobSetBuilder::new();
    for glob in globs {
        match Glob::new(glob.get_ref()) {
            Ok(compiled) => {
                builder.add(compiled);
            }
            Err(error) => problems.add(
                glob.span(),
                format!("invalid glob `{}`: {}", glob.get_ref(), error.kind()),
            ),
        }
    }
    builder.build().unwrap_or_else(|_| GlobSet::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_rules_allow_then_deny() {
        let mut problems = Problems::new("");
        let rules = ToolRules {
            allow: Some(compile_globs(
                vec![Spanned::new(0..0, "read_*".into())],
                &mut problems,
            )),
            deny: Some(compile_globs(
                vec![Spanned::new(0..0, "*_secret".into())],
                &mut problems,
            )),
            ..ToolRules::default()
        };
        assert!(rules.offers("read_file"));
        assert!(!rules.offers("read_secret"));
        assert!(!rules.offers("write_file"));
        assert!(ToolRules::default().offers("anything"));
    }
}
