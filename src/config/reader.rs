//! Typed reads from a spanned TOML table that record problems instead of stopping at the first.
//!
//! serde stops at the first error it meets; a user fixing a config wants every problem at once,
//! so the document is walked by hand. The keys a table is asked for are its known keys: the
//! leftovers are reported as unknown, with a hint to the closest known one.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::diagnostic::{Problems, did_you_mean};

pub(crate) type Value<'i> = Spanned<DeValue<'i>>;

/// A table being read: where it is, what it is called in messages, and which keys were asked for.
pub(crate) struct Table<'t, 'i> {
    table: &'t DeTable<'i>,
    path: String,
    known: Vec<&'static str>,
}

impl<'t, 'i> Table<'t, 'i> {
    pub(crate) fn new(table: &'t DeTable<'i>, path: impl Into<String>) -> Self {
        Table {
            table,
            path: path.into(),
            known: Vec::new(),
        }
    }

    /// The dotted name of this table, for messages (empty for the document root).
    pub(crate) fn path(&self) -> &str {
        &self.path
    }

    /// A key's dotted name in this table, for messages (`servers.fs.call_timeout`).
    pub(crate) fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub(crate) fn get(&mut self, key: &'static str) -> Option<&'t Value<'i>> {
        self.known.push(key);
        self.table.get(key)
    }

    pub(crate) fn string(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
    ) -> Option<Spanned<String>> {
        let value = self.get(key)?;
        let path = self.child_path(key);
        as_string(value, &path, problems)
    }

    pub(crate) fn bool(&mut self, key: &'static str, problems: &mut Problems) -> Option<bool> {
        let value = self.get(key)?;
        match value.get_ref() {
            DeValue::Boolean(flag) => Some(*flag),
            other => {
                let path = self.child_path(key);
                wrong_type(value.span(), &path, "a boolean", other, problems);
                None
            }
        }
    }

    /// A positive integer.
    pub(crate) fn count(&mut self, key: &'static str, problems: &mut Problems) -> Option<u64> {
        let value = self.get(key)?;
        let path = self.child_path(key);
        match value.get_ref() {
            DeValue::Integer(integer) => match integer.as_str().replace('_', "").parse::<u64>() {
                Ok(count) if count > 0 => Some(count),
                _ => {
                    problems.add(value.span(), format!("`{path}` must be a positive integer"));
                    None
                }
            },
            other => {
                wrong_type(value.span(), &path, "a positive integer", other, problems);
                None
            }
        }
    }

    pub(crate) fn strings(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
    ) -> Option<Vec<Spanned<String>>> {
        let value = self.get(key)?;
        let path = self.child_path(key);
        match value.get_ref() {
            DeValue::Array(items) => Some(
                items
                    .iter()
                    .enumerate()
                    .filter_map(|(index, item)| {
                        as_string(item, &format!("{path}[{index}]"), problems)
                    })
                    .collect(),
            ),
            other => {
                wrong_type(value.span(), &path, "an array of strings", other, problems);
                None
            }
        }
    }

    pub(crate) fn table(&mut self, key: &'static str, problems: &mut Problems) -> Option<Self> {
        let value = self.get(key)?;
        let path = self.child_path(key);
        as_table(value, path, problems)
    }

    /// A table of string values, such as `env` or `headers`, as (key, value) pairs in file order.
    pub(crate) fn string_map(
        &mut self,
        key: &'static str,
        problems: &mut Problems,
    ) -> Vec<(Spanned<String>, Spanned<String>)> {
        let Some(table) = self.table(key, problems) else {
            return Vec::new();
        };
        table
            .entries()
            .filter_map(|(name, value)| {
                let path = format!("{}.{}", table.path, name.get_ref());
                as_string(value, &path, problems).map(|value| (name.clone(), value))
            })
            .collect()
    }

    /// Every entry, for tables whose keys are names chosen by the user.
    pub(crate) fn entries(&self) -> impl Iterator<Item = (Spanned<String>, &'t Value<'i>)> + 't {
        self.table
            .iter()
            .map(|(key, value)| (Spanned::new(key.span(), key.get_ref().to_string()), value))
    }

    /// Report every key that was never asked for.
    pub(crate) fn finish(self, problems: &mut Problems) {
        for (key, _) in self.table.iter() {
            let name = key.get_ref().as_ref();
            if self.known.contains(&name) {
                continue;
            }
            let place = if self.path.is_empty() {
                "at the top level".to_owned()
            } else {
                format!("in `{}`", self.path)
            };
            let hint = did_you_mean(name, self.known.iter().copied())
                .map(|known| format!("did you mean `{known}`?"))
                .or_else(|| Some(format!("known keys here: {}", quoted_list(&self.known))));
            problems.add_with_hint(key.span(), format!("unknown key `{name}` {place}"), hint);
        }
    }
}

pub(crate) fn as_string(
    value: &Value<'_>,
    path: &str,
    problems: &mut Problems,
) -> Option<Spanned<String>> {
    match value.get_ref() {
        DeValue::String(text) => Some(Spanned::new(value.span(), text.to_string())),
        other => {
            wrong_type(value.span(), path, "a string", other, problems);
            None
        }
    }
}

pub(crate) fn as_table<'t, 'i>(
    value: &'t Value<'i>,
    path: String,
    problems: &mut Problems,
) -> Option<Table<'t, 'i>> {
    match value.get_ref() {
        DeValue::Table(table) => Some(Table::new(table, path)),
        other => {
            wrong_type(value.span(), &path, "a table", other, problems);
            None
        }
    }
}

pub(crate) fn wrong_type(
    span: Range<usize>,
    path: &str,
    expected: &str,
    found: &DeValue<'_>,
    problems: &mut Problems,
) {
    problems.add(
        span,
        format!("`{path}` must be {expected}, found {}", found.type_str()),
    );
}

fn quoted_list(names: &[&str]) -> String {
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    sorted
        .iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}
