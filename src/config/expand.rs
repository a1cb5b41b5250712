//! `${VAR}` expansion in config strings, from the process environment.

/// Why a string could not be expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("environment variable `{0}` is not set")]
    Missing(String),
    #[error("unterminated `${{` (write `$${{` for a literal `${{`)")]
    Unterminated,
    #[error("`${{{0}}}` is not a valid variable name")]
    BadName(String),
}

/// Expand `${VAR}` and `${VAR:-default}` in `input`; `$$` is a literal `$`.
/// A variable that is unset and has no default is an error naming it.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(index) = rest.find('$') {
        out.push_str(&rest[..index]);
        let after = &rest[index + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body.find('}').ok_or(ExpandError::Unterminated)?;
            let expression = &body[..end];
            let (name, default) = match expression.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (expression, None),
            };
            if !is_variable_name(name) {
                return Err(ExpandError::BadName(expression.to_owned()));
            }
            match (lookup(name), default) {
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => out.push_str(default),
                (None, None) => return Err(ExpandError::Missing(name.to_owned())),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(first) if first.is_ascii_alphabetic() || first == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "TOKEN").then(|| "s3cret".to_owned())
    }

    #[test]
    fn expands_set_variables_and_defaults() {
        assert_eq!(expand("Bearer ${TOKEN}", env), Ok("Bearer s3cret".into()));
        assert_eq!(
            expand("${HOST:-localhost}:1", env),
            Ok("localhost:1".into())
        );
        assert_eq!(
            expand("cost $5 and $${X}", env),
            Ok("cost $5 and ${X}".into())
        );
    }

    #[test]
    fn names_what_is_wrong() {
        assert_eq!(
            expand("${NOPE}", env),
            Err(ExpandError::Missing("NOPE".into()))
        );
        assert_eq!(expand("${TOKEN", env), Err(ExpandError::Unterminated));
        assert_eq!(expand("${1X}", env), Err(ExpandError::BadName("1X".into())));
    }
}
