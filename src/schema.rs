//! JSON Schemas compiled once and kept with what they belong to (a tool of the catalog, a
//! saved workflow of the config): compiling one takes longer than running a short workflow.

use std::sync::{Arc, OnceLock};

use serde_json::Value;

/// A schema's validator, compiled on first use.
#[derive(Clone, Default)]
pub struct CompiledSchema(OnceLock<Option<Arc<jsonschema::Validator>>>);

impl CompiledSchema {
    /// The validator of the schema `schema` gives, compiled the first time; `None` when the
    /// schema does not compile.
    pub fn validator(&self, schema: impl FnOnce() -> Value) -> Option<&jsonschema::Validator> {
        self.0
            .get_or_init(|| jsonschema::validator_for(&schema()).ok().map(Arc::new))
            .as_deref()
    }
}

impl std::fmt::Debug for CompiledSchema {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("CompiledSchema")
    }
}

/// Derived from the schema, so it never makes two values differ.
impl PartialEq for CompiledSchema {
    fn eq(&self, _other: &Self) -> bool {
        true
    }
}
