//! Application variables: resolved once at start-up, as Spin's `env` provider does.
//!
//! Order: `SPIN_VARIABLE_<NAME>` in the environment, then the same key in a `.env` file beside
//! the manifest, then the manifest default. A required variable with no value stops start-up
//! with its name. Templates (`{{ name }}`) in component variables, `allowed_outbound_hosts` and
//! trigger addresses are expanded against the resolved values.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::manifest::VariableDecl;

#[derive(Debug, Clone, Default)]
pub struct Variables {
    values: HashMap<String, String>,
    secrets: Vec<String>,
}

impl Variables {
    /// Resolves every declared variable. `env` is the process environment (passed in for tests).
    pub fn resolve(
        decls: &BTreeMap<String, VariableDecl>,
        env: &HashMap<String, String>,
        dotenv: Option<&Path>,
    ) -> Result<Self> {
        let file_values = match dotenv {
            Some(path) if path.exists() => read_dotenv(path)?,
            _ => HashMap::new(),
        };
        let mut values = HashMap::new();
        let mut secrets = Vec::new();
        for (name, decl) in decls {
            let key = format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase());
            let value = env.get(&key).or_else(|| file_values.get(&key)).cloned().or_else(|| decl.default.clone());
            match value {
                Some(v) => {
                    if decl.secret && !v.is_empty() {
                        secrets.push(v.clone());
                    }
                    values.insert(name.clone(), v);
                }
                None => bail!("required variable '{name}' has no value: set {key} or add it to .env"),
            }
        }
        Ok(Variables { values, secrets })
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    /// Values of `secret = true` variables, so that logs can redact them.
    pub fn secret_values(&self) -> &[String] {
        &self.secrets
    }

    /// Expands `{{ name }}` placeholders; an unknown name is an error naming it.
    pub fn expand(&self, template: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find("}}").with_context(|| format!("unclosed '{{{{' in '{template}'"))?;
            let name = after[..end].trim();
            let value = self
                .get(name)
                .with_context(|| format!("template '{template}' refers to undeclared variable '{name}'"))?;
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }
}

fn read_dotenv(path: &Path) -> Result<HashMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut map = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let (k, v) =
            line.split_once('=').with_context(|| format!("{}:{}: expected KEY=VALUE", path.display(), n + 1))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
            .unwrap_or(v);
        map.insert(k.trim().to_string(), v.to_string());
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decls() -> BTreeMap<String, VariableDecl> {
        let mut d = BTreeMap::new();
        d.insert(
            "port".into(),
            VariableDecl { required: false, default: Some("80".into()), secret: false, description: None },
        );
        d.insert("token".into(), VariableDecl { required: true, default: None, secret: true, description: None });
        d
    }

    #[test]
    fn environment_overrides_default_and_supplies_required() {
        let env = HashMap::from([
            ("SPIN_VARIABLE_PORT".to_string(), "8080".to_string()),
            ("SPIN_VARIABLE_TOKEN".to_string(), "s3cret".to_string()),
        ]);
        let v = Variables::resolve(&decls(), &env, None).unwrap();
        assert_eq!(v.get("port"), Some("8080"));
        assert_eq!(v.secret_values(), ["s3cret".to_string()]);
    }

    #[test]
    fn missing_required_variable_names_it() {
        let err = Variables::resolve(&decls(), &HashMap::new(), None).unwrap_err().to_string();
        assert!(err.contains("'token'") && err.contains("SPIN_VARIABLE_TOKEN"), "{err}");
    }

    #[test]
    fn dotenv_file_supplies_values_below_the_environment() {
        let dir = std::env::temp_dir().join(format!("devhost-dotenv-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join(".env");
        std::fs::write(&file, "# comment\nSPIN_VARIABLE_TOKEN=\"from-file\"\nSPIN_VARIABLE_PORT=1\n").unwrap();
        let env = HashMap::from([("SPIN_VARIABLE_PORT".to_string(), "2".to_string())]);
        let v = Variables::resolve(&decls(), &env, Some(&file)).unwrap();
        assert_eq!(v.get("token"), Some("from-file"));
        assert_eq!(v.get("port"), Some("2"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn templates_expand_and_unknown_names_fail() {
        let env = HashMap::from([("SPIN_VARIABLE_TOKEN".to_string(), "t".to_string())]);
        let v = Variables::resolve(&decls(), &env, None).unwrap();
        assert_eq!(v.expand("redis://h:{{ port }}/{{token}}").unwrap(), "redis://h:80/t");
        assert!(v.expand("{{ nope }}").unwrap_err().to_string().contains("'nope'"));
    }
}
