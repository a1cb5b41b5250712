//! Public names for tools and prompts: prefixed, kept to what hosts accept, shortened stably.

/// The longest name hosts such as Claude accept (`^[a-zA-Z0-9_-]{1,64}$`).
pub const MAX_NAME_LEN: usize = 64;
const HASH_LEN: usize = 8;

/// The name a client sees for `name` under `prefix`: `<prefix><separator><name>`, with characters
/// hosts reject replaced by `_`, and shortened with a stable hash when longer than 64 characters.
/// The same inputs always give the same name.
pub fn public_name(prefix: Option<&str>, separator: &str, name: &str) -> String {
    let full = match prefix {
        Some(prefix) => format!("{prefix}{separator}{name}"),
        None => name.to_owned(),
    };
    let mut clean = with_name_characters(&full);
    if clean.is_empty() {
        clean.push('_');
    }
    if clean.len() <= MAX_NAME_LEN {
        return clean;
    }
    // Hash the unshortened name, so two long names that share their first characters differ.
    let keep = MAX_NAME_LEN - HASH_LEN - 1;
    format!("{}_{:08x}", &clean[..keep], fnv1a32(full.as_bytes()))
}

/// `text` with each character a name may not have (anything but ASCII letters, digits, `_`
/// and `-`) replaced by `_`.
pub fn with_name_characters(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// FNV-1a, 32 bits: tiny, and its output never changes between builds or platforms, unlike
/// the standard library's hasher.
fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |hash, byte| {
        (hash ^ u32::from(*byte)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_and_keeps_short_names() {
        assert_eq!(public_name(Some("fs"), "__", "read_file"), "fs__read_file");
        assert_eq!(public_name(None, "__", "read_file"), "read_file");
        assert_eq!(
            public_name(Some("gh"), "-", "create.issue"),
            "gh-create_issue"
        );
    }

    #[test]
    fn shortens_long_names_stably_and_distinctly() {
        let long_a = "a".repeat(70);
        let long_b = format!("{}b", "a".repeat(69));
        let a = public_name(Some("server"), "__", &long_a);
        let b = public_name(Some("server"), "__", &long_b);
        assert_eq!(a.len(), MAX_NAME_LEN);
        assert_eq!(b.len(), MAX_NAME_LEN);
        assert_ne!(a, b);
        assert_eq!(a, public_name(Some("server"), "__", &long_a));
        // Pinned: a name must not change between releases.
        assert_eq!(
            a,
            "server__aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa_798a850a"
        );
    }
}
