//! The `[http]` table: how `conductor serve --http` serves.

use toml::Spanned;
use toml::de::DeValue;

use super::diagnostic::Problems;
use super::reader::{Table, wrong_type};
use super::*;

pub(super) fn read_http(
    mut table: Table<'_, '_>,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> HttpSettings {
    let defaults = HttpSettings::default();
    let mut tokens = Vec::new();
    for token in table.strings("tokens", problems).unwrap_or_default() {
        match expand(token.get_ref(), env) {
            Ok(value) if value.len() >= 16 => tokens.push(value),
            Ok(_) => problems.add_with_hint(
                token.span(),
                "`http.tokens`: a token must be at least 16 characters",
                Some("generate one with `openssl rand -hex 32`"),
            ),
            Err(error) => problems.add_with_hint(
                token.span(),
                format!("`http.tokens`: {error}"),
                Some("set it in the environment conductor starts in"),
            ),
        }
    }
    let strings =
        |table: &mut Table<'_, '_>, key: &'static str, problems: &mut Problems| -> Vec<String> {
            table
                .strings(key, problems)
                .unwrap_or_default()
                .into_iter()
                .map(Spanned::into_inner)
                .collect()
        };
    let allowed_hosts = strings(&mut table, "allowed_hosts", problems);
    let allowed_origins = strings(&mut table, "allowed_origins", problems);
    let count = |table: &mut Table<'_, '_>,
                 key: &'static str,
                 default: usize,
                 problems: &mut Problems|
     -> usize {
        match table.get(key).map(|value| (value.span(), value.get_ref())) {
            None => default,
            Some((_, DeValue::Integer(integer)))
                if integer.as_str().parse::<usize>().is_ok_and(|n| n > 0) =>
            {
                integer.as_str().parse().unwrap_or(default)
            }
            Some((span, other)) => {
                wrong_type(
                    span,
                    &format!("http.{key}"),
                    "a positive integer",
                    other,
                    problems,
                );
                default
            }
        }
    };
    let max_body_bytes = count(
        &mut table,
        "max_body_bytes",
        defaults.max_body_bytes,
        problems,
    );
    let max_sessions = count(&mut table, "max_sessions", defaults.max_sessions, problems);
    let session_idle =
        read_duration(&mut table, "session_idle", problems).unwrap_or(defaults.session_idle);
    table.finish(problems);
    HttpSettings {
        tokens,
        allowed_hosts,
        allowed_origins,
        max_body_bytes,
        max_sessions,
        session_idle,
    }
}
