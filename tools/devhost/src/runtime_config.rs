//! The subset of Spin's runtime-config file this app uses.
//!
//! `[key_value_store.<label>]` with `type = "spin"` (SQLite file at `path`) or `type = "redis"`
//! (`url`), and `[sqlite_database.<label>]` with `type = "spin"` (`path`). Relative paths are
//! relative to the file, as in Spin. Unknown sections, keys and types are rejected.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntimeConfig {
    #[serde(default)]
    key_value_store: BTreeMap<String, toml::Table>,
    #[serde(default)]
    sqlite_database: BTreeMap<String, toml::Table>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvBackend {
    /// SQLite file (Spin's default store type).
    Spin {
        path: PathBuf,
    },
    Redis {
        url: String,
    },
}

#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    pub key_value: BTreeMap<String, KvBackend>,
    pub sqlite: BTreeMap<String, PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpinFile {
    #[serde(rename = "type")]
    _kind: String,
    #[serde(default)]
    path: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RedisStore {
    #[serde(rename = "type")]
    _kind: String,
    url: String,
}

impl RuntimeConfig {
    /// Stores and databases with nothing configured: label `default` in `state_dir`, as Spin's
    /// `.spin/` defaults.
    pub fn defaults(state_dir: &Path) -> Self {
        let mut cfg = RuntimeConfig::default();
        cfg.key_value.insert("default".into(), KvBackend::Spin { path: state_dir.join("sqlite_key_value.db") });
        cfg.sqlite.insert("default".into(), state_dir.join("sqlite_db.db"));
        cfg
    }

    pub fn load(path: &Path, state_dir: &Path, expand: impl Fn(&str) -> Result<String>) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading runtime config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base, state_dir, expand).with_context(|| format!("in runtime config {}", path.display()))
    }

    pub fn parse(text: &str, base: &Path, state_dir: &Path, expand: impl Fn(&str) -> Result<String>) -> Result<Self> {
        let raw: RawRuntimeConfig = toml::from_str(text).context("invalid runtime config")?;
        let mut cfg = Self::defaults(state_dir);
        for (label, table) in raw.key_value_store {
            let kind = table.get("type").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            let backend = match kind.as_str() {
                "spin" => {
                    let s: SpinFile =
                        toml::Value::Table(table).try_into().with_context(|| format!("key_value_store.{label}"))?;
                    let path = s.path.map(|p| base.join(p)).unwrap_or_else(|| state_dir.join(format!("kv_{label}.db")));
                    KvBackend::Spin { path }
                }
                "redis" => {
                    let r: RedisStore =
                        toml::Value::Table(table).try_into().with_context(|| format!("key_value_store.{label}"))?;
                    KvBackend::Redis { url: expand(&r.url)? }
                }
                other => bail!("key_value_store.{label}: devhost does not support type '{other}' (spin, redis)"),
            };
            cfg.key_value.insert(label, backend);
        }
        for (label, table) in raw.sqlite_database {
            let kind = table.get("type").and_then(|v| v.as_str()).unwrap_or_default().to_string();
            if kind != "spin" {
                bail!("sqlite_database.{label}: devhost does not support type '{kind}' (spin)");
            }
            let s: SpinFile =
                toml::Value::Table(table).try_into().with_context(|| format!("sqlite_database.{label}"))?;
            let path = s.path.map(|p| base.join(p)).unwrap_or_else(|| state_dir.join(format!("sqlite_{label}.db")));
            cfg.sqlite.insert(label, path);
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<RuntimeConfig> {
        RuntimeConfig::parse(text, Path::new("/cfg"), Path::new("/state"), |s| Ok(s.to_string()))
    }

    #[test]
    fn defaults_live_in_the_state_dir() {
        let cfg = parse("").unwrap();
        assert_eq!(cfg.key_value["default"], KvBackend::Spin { path: "/state/sqlite_key_value.db".into() });
        assert_eq!(cfg.sqlite["default"], PathBuf::from("/state/sqlite_db.db"));
    }

    #[test]
    fn stores_are_read_with_paths_relative_to_the_file() {
        let cfg = parse("[key_value_store.default]\ntype = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n[sqlite_database.default]\ntype = \"spin\"\npath = \"data/app.db\"\n").unwrap();
        assert_eq!(cfg.key_value["default"], KvBackend::Redis { url: "redis://127.0.0.1:6379".into() });
        assert_eq!(cfg.sqlite["default"], PathBuf::from("/cfg/data/app.db"));
    }

    #[test]
    fn unknown_sections_keys_and_types_are_rejected() {
        assert!(parse("[llm_compute]\ntype = \"spin\"\n").is_err());
        assert!(parse("[key_value_store.x]\ntype = \"spin\"\npath = \"a\"\ncolour = 1\n").is_err());
        let err =
            format!("{:#}", parse("[sqlite_database.x]\ntype = \"libsql\"\nurl = \"u\"\ntoken = \"t\"\n").unwrap_err());
        assert!(err.contains("libsql"), "{err}");
    }
}
