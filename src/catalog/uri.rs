//! Resource URIs: matching a URI against a URI template, and the namespaced form used on clashes.

/// The scheme of a resource URI rewritten because two servers offer the same one:
/// `conductor://<server>/<original uri>`.
const NAMESPACED_SCHEME: &str = "conductor://";

pub fn namespaced(server: &str, uri: &str) -> String {
    format!("{NAMESPACED_SCHEME}{server}/{uri}")
}

/// Split a namespaced URI into its server and original URI.
pub fn split_namespaced(uri: &str) -> Option<(&str, &str)> {
    uri.strip_prefix(NAMESPACED_SCHEME)?.split_once('/')
}

/// Whether `uri` is one that the RFC 6570 `template` can produce.
///
/// Literal parts must match exactly; each `{...}` expression matches one or more characters.
/// Simple expressions (`{name}`) stop at `/`, `?` and `#`; reserved and path forms
/// (`{+path}`, `{/segments}`, `{?query}`...) may span them.
pub fn template_matches(template: &str, uri: &str) -> bool {
    match parse(template) {
        Some(parts) => matches_from(&parts, uri),
        None => false,
    }
}

enum Part<'t> {
    Literal(&'t str),
    Expression { spans_slashes: bool },
}

fn parse(template: &str) -> Option<Vec<Part<'_>>> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Literal(&rest[..open]));
        }
        let close = rest[open..].find('}')? + open;
        let operator = rest[open + 1..close].chars().next();
        parts.push(Part::Expression {
            spans_slashes: matches!(operator, Some('+' | '#' | '/' | '?' | '&' | ';' | '.')),
        });
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest));
    }
    Some(parts)
}

fn matches_from(parts: &[Part<'_>], uri: &str) -> bool {
    match parts.split_first() {
        None => uri.is_empty(),
        Some((Part::Literal(literal), rest)) => uri
            .strip_prefix(literal)
            .is_some_and(|tail| matches_from(rest, tail)),
        Some((Part::Expression { spans_slashes }, rest)) => {
            // The expression takes at least one character; try every end point. Templates and
            // URIs are short, so this backtracking is cheap.
            for (index, c) in uri.char_indices() {
                if !spans_slashes && matches!(c, '/' | '?' | '#') {
                    return false;
                }
                if matches_from(rest, &uri[index + c.len_utf8()..]) {
                    return true;
                }
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_expressions_stay_within_a_segment() {
        assert!(template_matches("test://item/{id}", "test://item/42"));
        assert!(!template_matches("test://item/{id}", "test://item/42/more"));
        assert!(!template_matches("test://item/{id}", "test://item/"));
        assert!(template_matches("test://{a}/x/{b}", "test://one/x/two"));
        assert!(!template_matches("test://item/{id}", "other://item/42"));
    }

    #[test]
    fn reserved_expressions_span_slashes() {
        assert!(template_matches("file:///{+path}", "file:///a/b/c.txt"));
        assert!(template_matches("demo://{+rest}.md", "demo://x/y.md"));
    }

    #[test]
    fn namespaced_round_trip() {
        let uri = namespaced("fs", "file:///a/b");
        assert_eq!(uri, "conductor://fs/file:///a/b");
        assert_eq!(split_namespaced(&uri), Some(("fs", "file:///a/b")));
        assert_eq!(split_namespaced("file:///a"), None);
    }
}
