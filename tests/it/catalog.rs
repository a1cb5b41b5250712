//! Building the catalog: public names, filters, clashes and resource routing.

use std::path::Path;

use mcp_conductor::catalog::{Catalog, Listing, ResourceRoute};
use mcp_conductor::config::{Config, ServerName};
use serde_json::json;

fn config(text: &str) -> Config {
    Config::parse(text, Path::new("servers.toml"), |_| None).unwrap()
}

fn tools(names: &[&str]) -> Listing {
    Listing {
        tools: names
            .iter()
            .map(|name| {
                serde_json::from_value(json!({"name": name, "inputSchema": {"type": "object"}}))
                    .unwrap()
            })
            .collect(),
        ..Listing::default()
    }
}

fn build(config: &Config, listings: &[Listing]) -> Catalog {
    Catalog::build(&config.separator, config.servers.iter().zip(listings))
}

fn names(catalog: &Catalog) -> Vec<&str> {
    catalog
        .tools()
        .iter()
        .map(|entry| entry.tool.name.as_ref())
        .collect()
}

#[test]
fn names_are_always_prefixed_and_route_back() {
    let config = config("[servers.fs]\ncommand = \"x\"\n");
    let catalog = build(&config, &[tools(&["read_file"])]);
    assert_eq!(names(&catalog), ["fs__read_file"]);
    let entry = catalog.tool("fs__read_file").unwrap();
    assert_eq!(entry.server.as_str(), "fs");
    assert_eq!(entry.original, "read_file");
    assert_eq!(catalog.nearest_tool("fs__read_fil"), Some("fs__read_file"));
}

#[test]
fn the_separator_and_prefix_are_configurable() {
    let config = config(
        "[conductor]\nseparator = \"-\"\n[servers.github]\ncommand = \"x\"\nprefix = \"gh\"\n[servers.time]\ncommand = \"x\"\nprefix = false\n",
    );
    let catalog = build(&config, &[tools(&["create_issue"]), tools(&["now"])]);
    assert_eq!(names(&catalog), ["gh-create_issue", "now"]);
}

#[test]
fn allow_deny_rename_and_descriptions_apply() {
    let config = config(
        r#"
[servers.fs]
command = "x"
[servers.fs.tools]
allow = ["read_*", "write_file"]
deny = ["*_secret"]
rename = { write_file = "save" }
descriptions = { read_file = "Read one note." }
"#,
    );
    let catalog = build(
        &config,
        &[tools(&[
            "read_file",
            "read_secret",
            "write_file",
            "delete_file",
        ])],
    );
    assert_eq!(names(&catalog), ["fs__read_file", "fs__save"]);
    assert_eq!(catalog.tool("fs__save").unwrap().original, "write_file");
    assert_eq!(
        catalog
            .tool("fs__read_file")
            .unwrap()
            .tool
            .description
            .as_deref(),
        Some("Read one note.")
    );
}

#[test]
fn the_config_overrides_a_servers_annotations() {
    let config = config(
        "[servers.api]\ncommand = \"x\"\n[servers.api.tools.annotations]\nupsert = { idempotent = true, destructive = false }\n",
    );
    let listing = Listing {
        tools: vec![
            serde_json::from_value(json!({
                "name": "upsert", "inputSchema": {"type": "object"},
                "annotations": {"destructiveHint": true, "openWorldHint": false}
            }))
            .unwrap(),
        ],
        ..Listing::default()
    };
    let catalog = build(&config, &[listing]);
    let annotations = serde_json::to_value(&catalog.tools()[0].tool.annotations).unwrap();
    assert_eq!(
        annotations,
        json!({"destructiveHint": false, "idempotentHint": true, "openWorldHint": false})
    );
}

#[test]
fn a_clash_hides_the_later_tool_and_says_how_to_fix_it() {
    let text = "[servers.a]\ncommand = \"x\"\nprefix = false\n[servers.b]\ncommand = \"x\"\nprefix = false\n";
    let catalog = build(
        &config(text),
        &[tools(&["search", "a_only"]), tools(&["search"])],
    );
    assert_eq!(names(&catalog), ["search", "a_only"]);
    assert_eq!(catalog.tool("search").unwrap().server.as_str(), "a");
    insta::assert_snapshot!(catalog.warnings.join("\n"), @"tool `search` of server `b` is hidden: its name `search` is already taken by `search` of server `a`; give one of them another name with `[servers.b.tools] rename`");

    let fixed = format!("{text}[servers.b.tools]\nrename = {{ search = \"b_search\" }}\n");
    let catalog = build(&config(&fixed), &[tools(&["search"]), tools(&["search"])]);
    assert_eq!(names(&catalog), ["search", "b_search"]);
    assert!(catalog.warnings.is_empty());
}

#[test]
fn long_names_are_shortened_the_same_way_every_time() {
    let long = "summarize_every_document_in_the_shared_knowledge_base_by_topic_and_author";
    let config = config("[servers.docs]\ncommand = \"x\"\n");
    let first = build(&config, &[tools(&[long])]);
    let second = build(&config, &[tools(&[long, "other"])]);
    let name = first.tools()[0].tool.name.to_string();
    assert_eq!(name.len(), 64);
    assert_eq!(name, second.tools()[0].tool.name);
    assert_eq!(first.tool(&name).unwrap().original, long);
}

#[test]
fn adding_a_server_does_not_rename_anything() {
    let one = config("[servers.a]\ncommand = \"x\"\n");
    let two = config("[servers.a]\ncommand = \"x\"\n[servers.b]\ncommand = \"x\"\n");
    let before = build(&one, &[tools(&["search"])]);
    let after = build(&two, &[tools(&["search"]), tools(&["search"])]);
    assert_eq!(names(&before), ["a__search"]);
    assert_eq!(names(&after), ["a__search", "b__search"]);
}

fn resources(uris: &[&str], templates: &[&str]) -> Listing {
    Listing {
        resources: uris
            .iter()
            .map(|uri| serde_json::from_value(json!({"uri": uri, "name": uri})).unwrap())
            .collect(),
        templates: templates
            .iter()
            .map(|t| serde_json::from_value(json!({"uriTemplate": t, "name": t})).unwrap())
            .collect(),
        ..Listing::default()
    }
}

fn route(server: &str, uri: &str) -> Option<ResourceRoute> {
    let config = config(&format!("[servers.{server}]\ncommand = \"x\"\n"));
    Some(ResourceRoute {
        server: config.servers[0].name.clone(),
        uri: uri.to_owned(),
    })
}

#[test]
fn resources_keep_unique_uris_and_namespace_clashes() {
    let config = config("[servers.a]\ncommand = \"x\"\n[servers.b]\ncommand = \"x\"\n");
    let catalog = build(
        &config,
        &[
            resources(&["file:///shared.txt", "a://only"], &["a://items/{id}"]),
            resources(&["file:///shared.txt"], &["b://{+path}"]),
        ],
    );
    let uris: Vec<&str> = catalog
        .resources()
        .iter()
        .map(|e| e.resource.uri.as_str())
        .collect();
    assert_eq!(
        uris,
        [
            "conductor://a/file:///shared.txt",
            "a://only",
            "conductor://b/file:///shared.txt"
        ]
    );
    assert_eq!(catalog.route_resource("a://only"), route("a", "a://only"));
    assert_eq!(
        catalog.route_resource("conductor://b/file:///shared.txt"),
        route("b", "file:///shared.txt")
    );
    assert_eq!(
        catalog.route_resource("a://items/7"),
        route("a", "a://items/7")
    );
    assert_eq!(
        catalog.route_resource("b://deep/path.md"),
        route("b", "b://deep/path.md")
    );
    assert_eq!(
        catalog.route_resource("c://unknown"),
        None,
        "two servers offer resources: no guess"
    );
    assert!(catalog.warnings[0].contains("`file:///shared.txt` is offered by 2 servers"));
}

#[test]
fn a_sole_resource_server_gets_unlisted_uris() {
    let config = config("[servers.a]\ncommand = \"x\"\n[servers.tools_only]\ncommand = \"x\"\n");
    let catalog = build(&config, &[resources(&["a://listed"], &[]), tools(&["t"])]);
    assert_eq!(
        catalog.route_resource("a://dynamic/1"),
        route("a", "a://dynamic/1")
    );
    let _: ServerName = catalog.tools()[0].server.clone();
}
