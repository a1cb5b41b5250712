//! The catalog: every downstream's tools, prompts, resources and templates under public names,
//! with the tables that route each name back to its owner.
//!
//! A catalog is an immutable value, built whole from `(server, listing)` pairs and replaced whole
//! when any downstream's listing changes. Building never fails: a name clash hides the later
//! entry and leaves a warning that says how to fix it.

mod naming;
mod uri;

use std::collections::HashMap;

use rmcp::model::{Prompt, Resource, ResourceTemplate, Tool, ToolAnnotations};

use crate::config::{Prefix, ServerName, ServerSpec, did_you_mean};
use crate::schema::CompiledSchema;
pub use naming::{MAX_NAME_LEN, public_name, with_name_characters};
pub use uri::{namespaced, split_namespaced, template_matches};

/// What one downstream offers, as it listed it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    pub tools: Vec<Tool>,
    pub prompts: Vec<Prompt>,
    pub resources: Vec<Resource>,
    pub templates: Vec<ResourceTemplate>,
    /// Each tool's `execution` (how it takes tasks, 2025-11-25), by its own name, where the
    /// server gave one; rmcp's `Tool` has no place for it.
    pub executions: std::collections::BTreeMap<String, serde_json::Value>,
}

/// A tool as offered, and where it comes from.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolEntry {
    /// The tool as clients see it: public name, possibly a replaced description, the rest
    /// (schemas, annotations, title, icons, `_meta`) exactly as the downstream gave it.
    pub tool: Tool,
    pub server: ServerName,
    /// The downstream's own name for it.
    pub original: String,
    /// Its `execution`, as the downstream gave it (see [`Listing::executions`]).
    pub execution: Option<serde_json::Value>,
    /// Its `inputSchema`, compiled when a workflow first checks a step against it.
    input_validator: CompiledSchema,
}

impl ToolEntry {
    /// Whether the downstream takes calls of this tool only as tasks (2025-11-25:
    /// `execution.taskSupport` is `required`).
    pub fn requires_task(&self) -> bool {
        self.execution
            .as_ref()
            .and_then(|execution| execution.get("taskSupport"))
            .and_then(serde_json::Value::as_str)
            == Some("required")
    }

    /// The tool's compiled `inputSchema`; `None` when it does not compile. Kept with the
    /// catalog: compiling one takes longer than running a short workflow, and the schema
    /// changes only with the catalog.
    pub fn input_validator(&self) -> Option<&jsonschema::Validator> {
        self.input_validator
            .validator(|| serde_json::Value::Object((*self.tool.input_schema).clone()))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PromptEntry {
    pub prompt: Prompt,
    pub server: ServerName,
    pub original: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResourceEntry {
    pub resource: Resource,
    pub server: ServerName,
    pub original_uri: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TemplateEntry {
    pub template: ResourceTemplate,
    pub server: ServerName,
    pub original: String,
}

/// Where a resource URI (or template) is served, and the URI its owner knows it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceRoute {
    pub server: ServerName,
    pub uri: String,
}

/// The current offer to clients.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    tools: Vec<ToolEntry>,
    prompts: Vec<PromptEntry>,
    resources: Vec<ResourceEntry>,
    templates: Vec<TemplateEntry>,
    tool_index: crate::maps::HashMap<String, usize>,
    prompt_index: crate::maps::HashMap<String, usize>,
    resource_index: crate::maps::HashMap<String, usize>,
    template_index: crate::maps::HashMap<String, usize>,
    /// Servers that offer resources or templates, in config order.
    resource_servers: Vec<ServerName>,
    /// Clashes and other things a user may want to fix, as sentences.
    pub warnings: Vec<String>,
    /// How many times each kind of list was announced changed by a server: clients are told
    /// each time, even when the list reads the same again (as they would be directly).
    pub announced: Announcements,
    /// Published while lists still wait for servers starting: clients are not told of it, as
    /// what they list then has it.
    pub while_starting: bool,
}

/// A count of list-changed notifications per kind of list.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Announcements {
    pub tools: u64,
    pub prompts: u64,
    pub resources: u64,
    /// How many list-changed notifications of servers this catalog has taken in (re-listed,
    /// or failed to), to match [`crate::relay::Relay::list_changes_heard`].
    pub handled: u64,
}

impl Announcements {
    pub fn count(&mut self, kind: crate::downstream::ListKind) {
        use crate::downstream::ListKind;
        let count = match kind {
            ListKind::Tools => &mut self.tools,
            ListKind::Prompts => &mut self.prompts,
            ListKind::Resources => &mut self.resources,
        };
        *count += 1;
    }
}

impl Catalog {
    /// Build the catalog from each server's listing, in config order. Earlier servers win clashes.
    pub fn build<'a>(
        separator: &str,
        sources: impl IntoIterator<Item = (&'a ServerSpec, &'a Listing)>,
    ) -> Catalog {
        let sources: Vec<(&ServerSpec, &Listing)> = sources.into_iter().collect();
        let mut catalog = Catalog::default();
        for (spec, listing) in &sources {
            catalog.add_tools(separator, spec, listing);
            catalog.add_prompts(separator, spec, listing);
            if !listing.resources.is_empty() || !listing.templates.is_empty() {
                catalog.resource_servers.push(spec.name.clone());
            }
        }
        catalog.add_resources(&sources);
        catalog.add_templates(&sources);
        catalog
    }

    pub fn tools(&self) -> &[ToolEntry] {
        &self.tools
    }

    pub fn prompts(&self) -> &[PromptEntry] {
        &self.prompts
    }

    pub fn resources(&self) -> &[ResourceEntry] {
        &self.resources
    }

    pub fn templates(&self) -> &[TemplateEntry] {
        &self.templates
    }

    pub fn tool(&self, name: &str) -> Option<&ToolEntry> {
        self.tool_index.get(name).map(|index| &self.tools[*index])
    }

    pub fn prompt(&self, name: &str) -> Option<&PromptEntry> {
        self.prompt_index
            .get(name)
            .map(|index| &self.prompts[*index])
    }

    /// The offered tool name closest to `name`, for "did you mean" hints.
    pub fn nearest_tool(&self, name: &str) -> Option<&str> {
        did_you_mean(
            name,
            self.tools.iter().map(|entry| entry.tool.name.as_ref()),
        )
    }

    pub fn nearest_prompt(&self, name: &str) -> Option<&str> {
        did_you_mean(
            name,
            self.prompts.iter().map(|entry| entry.prompt.name.as_str()),
        )
    }

    /// The owner of a resource URI: a listed resource, a namespaced URI, a URI one of the
    /// templates produces, or, when only one server offers resources at all, that server.
    pub fn route_resource(&self, uri: &str) -> Option<ResourceRoute> {
        if let Some(index) = self.resource_index.get(uri) {
            let entry = &self.resources[*index];
            return Some(route(&entry.server, &entry.original_uri));
        }
        if let Some((server, original)) = split_namespaced(uri)
            && let Some(server) = self.resource_servers.iter().find(|s| s.as_str() == server)
        {
            return Some(route(server, original));
        }
        if let Some(entry) = self.templates.iter().find(|entry| {
            entry.template.uri_template == entry.original && template_matches(&entry.original, uri)
        }) {
            return Some(route(&entry.server, uri));
        }
        match self.resource_servers.as_slice() {
            [only] => Some(route(only, uri)),
            _ => None,
        }
    }

    /// The owner of a resource template, by its public `uriTemplate` (for completions).
    pub fn route_template(&self, uri_template: &str) -> Option<ResourceRoute> {
        match self.template_index.get(uri_template) {
            Some(index) => {
                let entry = &self.templates[*index];
                Some(route(&entry.server, &entry.original))
            }
            None => self.route_resource(uri_template),
        }
    }

    fn add_tools(&mut self, separator: &str, spec: &ServerSpec, listing: &Listing) {
        for tool in &listing.tools {
            let original = tool.name.to_string();
            if !spec.tools.offers(&original) {
                continue;
            }
            let local = spec.tools.rename.get(&original).unwrap_or(&original);
            let name = public_name(prefix_of(spec), separator, local);
            if let Some(existing) = self.tool_index.get(&name).map(|index| &self.tools[*index]) {
                self.warnings.push(format!(
                    "tool `{original}` of server `{}` is hidden: its name `{name}` is already taken by `{}` of server `{}`; give one of them another name with `[servers.{}.tools] rename`",
                    spec.name, existing.original, existing.server, spec.name
                ));
                continue;
            }
            let mut offered = tool.clone();
            offered.name = name.clone().into();
            if let Some(description) = spec.tools.descriptions.get(&original) {
                offered.description = Some(description.clone().into());
            }
            if let Some(hints) = spec.tools.annotations.get(&original) {
                let annotations = offered
                    .annotations
                    .get_or_insert_with(ToolAnnotations::default);
                let overrides = [
                    (&mut annotations.read_only_hint, hints.read_only),
                    (&mut annotations.destructive_hint, hints.destructive),
                    (&mut annotations.idempotent_hint, hints.idempotent),
                    (&mut annotations.open_world_hint, hints.open_world),
                ];
                for (hint, configured) in overrides {
                    if configured.is_some() {
                        *hint = configured;
                    }
                }
            }
            self.tool_index.insert(name, self.tools.len());
            self.tools.push(ToolEntry {
                tool: offered,
                server: spec.name.clone(),
                execution: listing.executions.get(&original).cloned(),
                original,
                input_validator: CompiledSchema::default(),
            });
        }
    }

    fn add_prompts(&mut self, separator: &str, spec: &ServerSpec, listing: &Listing) {
        for prompt in &listing.prompts {
            let name = public_name(prefix_of(spec), separator, &prompt.name);
            if let Some(existing) = self
                .prompt_index
                .get(&name)
                .map(|index| &self.prompts[*index])
            {
                self.warnings.push(format!(
                    "prompt `{}` of server `{}` is hidden: its name `{name}` is already taken by `{}` of server `{}`",
                    prompt.name, spec.name, existing.original, existing.server
                ));
                continue;
            }
            let mut offered = prompt.clone();
            offered.name = name.clone();
            self.prompt_index.insert(name, self.prompts.len());
            self.prompts.push(PromptEntry {
                prompt: offered,
                server: spec.name.clone(),
                original: prompt.name.clone(),
            });
        }
    }

    /// A URI offered by one server is kept as it is; one offered by several is namespaced for
    /// every owner, so no server's URI depends on which was listed first.
    fn add_resources(&mut self, sources: &[(&ServerSpec, &Listing)]) {
        let owners = count_owners(sources, |listing| {
            listing
                .resources
                .iter()
                .map(|resource| resource.uri.as_str())
        });
        for (spec, listing) in sources {
            for resource in &listing.resources {
                let mut offered = resource.clone();
                if owners.get(resource.uri.as_str()).copied().unwrap_or(0) > 1 {
                    offered.uri = namespaced(spec.name.as_str(), &resource.uri);
                }
                if self.resource_index.contains_key(&offered.uri) {
                    continue; // the same server listed the same URI twice
                }
                self.resource_index
                    .insert(offered.uri.clone(), self.resources.len());
                self.resources.push(ResourceEntry {
                    resource: offered,
                    server: spec.name.clone(),
                    original_uri: resource.uri.clone(),
                });
            }
        }
        self.warn_clashes("resource URI", &owners);
    }

    fn add_templates(&mut self, sources: &[(&ServerSpec, &Listing)]) {
        let owners = count_owners(sources, |listing| {
            listing
                .templates
                .iter()
                .map(|template| template.uri_template.as_str())
        });
        for (spec, listing) in sources {
            for template in &listing.templates {
                let mut offered = template.clone();
                if owners
                    .get(template.uri_template.as_str())
                    .copied()
                    .unwrap_or(0)
                    > 1
                {
                    offered.uri_template = namespaced(spec.name.as_str(), &template.uri_template);
                }
                if self.template_index.contains_key(&offered.uri_template) {
                    continue;
                }
                self.template_index
                    .insert(offered.uri_template.clone(), self.templates.len());
                self.templates.push(TemplateEntry {
                    template: offered,
                    server: spec.name.clone(),
                    original: template.uri_template.clone(),
                });
            }
        }
        self.warn_clashes("resource template", &owners);
    }

    fn warn_clashes(&mut self, what: &str, owners: &HashMap<&str, usize>) {
        let mut clashes: Vec<&&str> = owners
            .iter()
            .filter(|(_, count)| **count > 1)
            .map(|(uri, _)| uri)
            .collect();
        clashes.sort();
        for uri in clashes {
            self.warnings.push(format!(
                "{what} `{uri}` is offered by {} servers; each is offered as `conductor://<server>/{uri}`",
                owners[*uri]
            ));
        }
    }
}

fn route(server: &ServerName, uri: &str) -> ResourceRoute {
    ResourceRoute {
        server: server.clone(),
        uri: uri.to_owned(),
    }
}

/// The prefix of a server's public names, if it has one.
pub fn prefix_of(spec: &ServerSpec) -> Option<&str> {
    match &spec.prefix {
        Prefix::ServerName => Some(spec.name.as_str()),
        Prefix::Custom(prefix) => Some(prefix),
        Prefix::None => None,
    }
}

/// How many servers offer each key (a server that repeats a key counts once).
fn count_owners<'a, I>(
    sources: &[(&ServerSpec, &'a Listing)],
    keys: impl Fn(&'a Listing) -> I,
) -> HashMap<&'a str, usize>
where
    I: Iterator<Item = &'a str>,
{
    let mut owners: HashMap<&str, usize> = HashMap::new();
    for (_, listing) in sources {
        let mut seen: Vec<&str> = keys(listing).collect();
        seen.sort_unstable();
        seen.dedup();
        for key in seen {
            *owners.entry(key).or_default() += 1;
        }
    }
    owners
}
