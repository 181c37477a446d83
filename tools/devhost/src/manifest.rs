//! Loading `spin.toml` (manifest version 2) into typed, checked structures.
//!
//! Only what this app's manifests use is accepted. Anything else Spin knows but devhost does not
//! implement (other trigger types, `files`, AI models, remote sources, ...) is an error at start-up
//! naming the feature, never silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    spin_manifest_version: toml::Value,
    application: Application,
    #[serde(default)]
    variables: BTreeMap<String, VariableDecl>,
    #[serde(default)]
    trigger: BTreeMap<String, toml::Value>,
    #[serde(default)]
    component: BTreeMap<String, ComponentDecl>,
}

#[derive(Debug, Deserialize)]
// Every field Spin accepts is listed so that unknown ones are rejected; devhost reads fewer.
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub struct Application {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub authors: Vec<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub trigger: AppTriggers,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppTriggers {
    #[serde(default)]
    pub http: Option<AppHttp>,
    #[serde(default)]
    pub redis: Option<AppRedis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppHttp {
    #[serde(default)]
    pub base: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppRedis {
    pub address: String,
}

/// One entry of `[variables]`.
#[derive(Debug, Clone, Deserialize)]
// Every field Spin accepts is listed so that unknown ones are rejected; devhost reads fewer.
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub struct VariableDecl {
    #[serde(default)]
    pub required: bool,
    #[serde(default)]
    pub default: Option<String>,
    #[serde(default)]
    pub secret: bool,
    #[serde(default)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
// Every field Spin accepts is listed so that unknown ones are rejected; devhost reads fewer.
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub struct ComponentDecl {
    pub source: toml::Value,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub allowed_outbound_hosts: Vec<String>,
    #[serde(default)]
    pub key_value_stores: Vec<String>,
    #[serde(default)]
    pub sqlite_databases: Vec<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    #[serde(default)]
    pub files: Vec<toml::Value>,
    #[serde(default)]
    pub exclude_files: Vec<String>,
    #[serde(default)]
    pub ai_models: Vec<String>,
    #[serde(default)]
    pub allowed_http_hosts: Vec<String>,
    #[serde(default)]
    pub dependencies: Option<toml::Value>,
    #[serde(default)]
    pub dependencies_inherit_configuration: Option<bool>,
    /// `spin build` settings: not devhost's business (scripts build the components).
    #[serde(default)]
    pub build: Option<toml::Value>,
    #[serde(default)]
    pub tool: Option<toml::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A public route pattern such as `/a`, `/a/...` or `/...`.
    Public(String),
    /// `route = { private = true }`: reachable only through service chaining.
    Private,
}

#[derive(Debug, Clone)]
pub struct HttpTrigger {
    pub route: Route,
    pub component: String,
}

#[derive(Debug, Clone)]
pub struct RedisTrigger {
    pub channel: String,
    pub component: String,
    /// The trigger's own address template, if it overrides the application's.
    pub address: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpTrigger {
    #[serde(default)]
    id: Option<String>,
    route: toml::Value,
    component: toml::Value,
    #[serde(default)]
    executor: Option<toml::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedisTrigger {
    #[serde(default)]
    id: Option<String>,
    channel: String,
    component: toml::Value,
    #[serde(default)]
    address: Option<String>,
}

/// A loaded, checked manifest.
#[derive(Debug)]
pub struct Manifest {
    pub dir: PathBuf,
    pub application: Application,
    pub variables: BTreeMap<String, VariableDecl>,
    pub components: BTreeMap<String, Component>,
    pub http_triggers: Vec<HttpTrigger>,
    pub redis_triggers: Vec<RedisTrigger>,
}

#[derive(Debug)]
pub struct Component {
    pub source: PathBuf,
    pub allowed_outbound_hosts: Vec<String>,
    pub key_value_stores: Vec<String>,
    pub sqlite_databases: Vec<String>,
    pub variables: BTreeMap<String, String>,
    pub environment: BTreeMap<String, String>,
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading manifest {}", path.display()))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &dir).with_context(|| format!("in manifest {}", path.display()))
    }

    pub fn parse(text: &str, dir: &Path) -> Result<Self> {
        let raw: RawManifest = toml::from_str(text).context("invalid spin.toml")?;
        if raw.spin_manifest_version.as_integer() != Some(2) {
            bail!("unsupported spin_manifest_version {}: devhost reads version 2", raw.spin_manifest_version);
        }
        for (name, decl) in &raw.variables {
            check_variable_name(name)?;
            if decl.required == decl.default.is_some() {
                bail!("variable '{name}' must have either `required = true` or a `default`, not both or neither");
            }
        }

        let mut components = BTreeMap::new();
        for (id, decl) in raw.component {
            let component = Component::from_decl(&id, decl, dir)?;
            components.insert(id, component);
        }

        let mut http_triggers = Vec::new();
        let mut redis_triggers = Vec::new();
        for (kind, value) in raw.trigger {
            match kind.as_str() {
                "http" => {
                    let list: Vec<RawHttpTrigger> = value.try_into().context("invalid [[trigger.http]] table")?;
                    for t in list {
                        if let Some(executor) = &t.executor {
                            let kind = executor.get("type").and_then(|v| v.as_str()).unwrap_or("");
                            if kind != "spin" {
                                bail!("devhost does not support the HTTP executor {executor} (trigger {:?})", t.id);
                            }
                        }
                        let route = parse_route(&t.route)?;
                        let component = component_ref(&t.component, "trigger.http")?;
                        http_triggers.push(HttpTrigger { route, component });
                    }
                }
                "redis" => {
                    let list: Vec<RawRedisTrigger> = value.try_into().context("invalid [[trigger.redis]] table")?;
                    for t in list {
                        let _ = &t.id;
                        let component = component_ref(&t.component, "trigger.redis")?;
                        redis_triggers.push(RedisTrigger { channel: t.channel, component, address: t.address });
                    }
                }
                other => bail!("devhost does not support trigger type '{other}' (only http and redis)"),
            }
        }

        for id in http_triggers.iter().map(|t| &t.component).chain(redis_triggers.iter().map(|t| &t.component)) {
            if !components.contains_key(id) {
                bail!("a trigger refers to component '{id}', which the manifest does not define");
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &http_triggers {
            if let Route::Public(r) = &t.route {
                if !seen.insert(normalise_route(r)) {
                    bail!("duplicate HTTP route '{r}'");
                }
            }
        }
        if !redis_triggers.is_empty()
            && raw.application.trigger.redis.is_none()
            && redis_triggers.iter().any(|t| t.address.is_none())
        {
            bail!("[[trigger.redis]] without `address` needs [application.trigger.redis] address");
        }
        if let Some(base) = raw.application.trigger.http.as_ref().and_then(|h| h.base.as_deref()) {
            if base != "/" {
                bail!("devhost does not support [application.trigger.http] base = '{base}' (only '/')");
            }
        }

        Ok(Manifest {
            dir: dir.to_path_buf(),
            application: raw.application,
            variables: raw.variables,
            components,
            http_triggers,
            redis_triggers,
        })
    }
}

impl Manifest {
    /// Keeps only the named components and their triggers, as `spin up -c <id>` (repeatable)
    /// does: a SpinApp's `components:` list runs the same way on SpinKube. An empty list keeps
    /// everything.
    pub fn retain_components(&mut self, ids: &[String]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        for id in ids {
            if !self.components.contains_key(id) {
                bail!("Specified component \"{id}\" not found in application");
            }
        }
        self.components.retain(|id, _| ids.contains(id));
        self.http_triggers.retain(|t| ids.contains(&t.component));
        self.redis_triggers.retain(|t| ids.contains(&t.component));
        Ok(())
    }
}

impl Component {
    fn from_decl(id: &str, decl: ComponentDecl, dir: &Path) -> Result<Self> {
        let unsupported =
            |what: &str| anyhow::anyhow!("component '{id}' uses `{what}`, which devhost does not support");
        if !decl.files.is_empty() {
            return Err(unsupported("files"));
        }
        if !decl.ai_models.is_empty() {
            return Err(unsupported("ai_models"));
        }
        if !decl.allowed_http_hosts.is_empty() {
            return Err(unsupported("allowed_http_hosts (use allowed_outbound_hosts)"));
        }
        if decl.dependencies.is_some() {
            return Err(unsupported("dependencies"));
        }
        let source = match &decl.source {
            toml::Value::String(path) => dir.join(path),
            other => bail!("component '{id}': devhost only loads local file sources, not {other}"),
        };
        for name in decl.variables.keys() {
            check_variable_name(name).with_context(|| format!("component '{id}'"))?;
        }
        Ok(Component {
            source,
            allowed_outbound_hosts: decl.allowed_outbound_hosts,
            key_value_stores: decl.key_value_stores,
            sqlite_databases: decl.sqlite_databases,
            variables: decl.variables,
            environment: decl.environment,
        })
    }
}

fn parse_route(value: &toml::Value) -> Result<Route> {
    match value {
        toml::Value::String(s) => {
            if !s.starts_with('/') {
                bail!("HTTP route '{s}' must start with '/'");
            }
            if s.starts_with("/.well-known/spin") {
                bail!("HTTP route '{s}' is reserved by Spin");
            }
            if s.split('/').any(|seg| seg.starts_with(':')) {
                bail!("devhost does not support named route wildcards ('{s}')");
            }
            Ok(Route::Public(s.clone()))
        }
        toml::Value::Table(t) if t.get("private").and_then(|v| v.as_bool()) == Some(true) && t.len() == 1 => {
            Ok(Route::Private)
        }
        other => bail!("unsupported HTTP route {other}"),
    }
}

fn component_ref(value: &toml::Value, what: &str) -> Result<String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        _ => bail!("devhost needs `component = \"<id>\"` in [[{what}]]; inline components are not supported"),
    }
}

/// Spin treats `/a/` like `/a`.
pub fn normalise_route(route: &str) -> String {
    if route.len() > 1 && route.ends_with('/') && !route.ends_with("/.../") {
        route.trim_end_matches('/').to_string()
    } else {
        route.to_string()
    }
}

/// Spin's rule for variable names: lowercase ASCII letters, digits and underscores, starting
/// with a letter.
pub fn check_variable_name(name: &str) -> Result<()> {
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.contains("__")
        && !name.ends_with('_');
    if ok {
        Ok(())
    } else {
        bail!("invalid variable name '{name}': use lowercase letters, digits and single underscores")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
spin_manifest_version = 2
[application]
name = "t"
[component.a]
source = "a.wasm"
[[trigger.http]]
route = "/a/..."
component = "a"
"#;

    #[test]
    fn parses_a_minimal_manifest() {
        let m = Manifest::parse(MINIMAL, Path::new("/app")).unwrap();
        assert_eq!(m.components["a"].source, PathBuf::from("/app/a.wasm"));
        assert_eq!(m.http_triggers[0].route, Route::Public("/a/...".into()));
    }

    #[test]
    fn rejects_an_unknown_trigger_type_by_name() {
        let text = format!("{MINIMAL}\n[[trigger.cron]]\ncomponent = \"a\"\ncron_expression = \"* * * * *\"\n");
        let err = format!("{:#}", Manifest::parse(&text, Path::new("/")).unwrap_err());
        assert!(err.contains("trigger type 'cron'"), "{err}");
    }

    #[test]
    fn rejects_files_by_name() {
        let text = MINIMAL.replace("source = \"a.wasm\"", "source = \"a.wasm\"\nfiles = [\"static/**\"]");
        let err = format!("{:#}", Manifest::parse(&text, Path::new("/")).unwrap_err());
        assert!(err.contains("`files`"), "{err}");
    }

    #[test]
    fn rejects_unknown_component_fields() {
        let text = MINIMAL.replace("source = \"a.wasm\"", "source = \"a.wasm\"\nfrobnicate = true");
        assert!(Manifest::parse(&text, Path::new("/")).is_err());
    }

    #[test]
    fn rejects_a_variable_both_required_and_defaulted() {
        let text = format!("{MINIMAL}\n[variables]\nx = {{ required = true, default = \"1\" }}\n");
        assert!(Manifest::parse(&text, Path::new("/")).is_err());
    }

    #[test]
    fn rejects_duplicate_routes() {
        let text = format!("{MINIMAL}\n[[trigger.http]]\nroute = \"/a/...\"\ncomponent = \"a\"\n");
        let err = format!("{:#}", Manifest::parse(&text, Path::new("/")).unwrap_err());
        assert!(err.contains("duplicate"), "{err}");
    }

    #[test]
    fn rejects_a_trigger_for_a_missing_component() {
        let text = MINIMAL.replace("component = \"a\"", "component = \"b\"");
        let err = format!("{:#}", Manifest::parse(&text, Path::new("/")).unwrap_err());
        assert!(err.contains("'b'"), "{err}");
    }

    #[test]
    fn selecting_components_keeps_only_them_and_their_triggers() {
        let text = format!(
            "{MINIMAL}\n[application.trigger.redis]\naddress = \"redis://h:1\"\n[component.w]\nsource = \"w.wasm\"\n[[trigger.redis]]\nchannel = \"c\"\ncomponent = \"w\"\n"
        );
        let mut m = Manifest::parse(&text, Path::new("/")).unwrap();
        m.retain_components(&["w".to_string()]).unwrap();
        assert_eq!(m.components.keys().collect::<Vec<_>>(), vec!["w"]);
        assert!(m.http_triggers.is_empty());
        assert_eq!(m.redis_triggers.len(), 1);

        let mut all = Manifest::parse(&text, Path::new("/")).unwrap();
        all.retain_components(&[]).unwrap();
        assert_eq!(all.components.len(), 2, "no selection keeps every component");
    }

    #[test]
    fn selecting_an_unknown_component_fails_as_spin_does() {
        let mut m = Manifest::parse(MINIMAL, Path::new("/")).unwrap();
        let err = format!("{:#}", m.retain_components(&["nope".to_string()]).unwrap_err());
        assert!(err.contains("Specified component \"nope\" not found in application"), "{err}");
    }

    #[test]
    fn variable_names_follow_spin_rules() {
        assert!(check_variable_name("database_url").is_ok());
        assert!(check_variable_name("Database").is_err());
        assert!(check_variable_name("1x").is_err());
        assert!(check_variable_name("a-b").is_err());
    }
}
