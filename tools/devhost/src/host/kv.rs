//! `fermyon:spin/key-value`: Spin's `spin` store type (one SQLite file, table `spin_key_value`,
//! as `.spin/sqlite_key_value.db`) and its `redis` store type.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use redis::AsyncCommands;
use wasmtime::component::Resource;

use super::bindings::fermyon::spin2_0_0::key_value::{Error, Host, HostStore};
use super::HostState;

/// One store backend, shared by every instance that opens its label.
pub enum KvBackend {
    Sqlite(Arc<Mutex<rusqlite::Connection>>),
    Redis(redis::aio::ConnectionManager),
}

impl KvBackend {
    pub fn sqlite(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let conn =
            rusqlite::Connection::open(path).with_context(|| format!("opening key-value file {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS spin_key_value (
                store TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL, PRIMARY KEY (store, key));",
        )
        .with_context(|| format!("preparing key-value file {}", path.display()))?;
        Ok(KvBackend::Sqlite(Arc::new(Mutex::new(conn))))
    }

    pub async fn redis(url: &str) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).context("invalid redis url for key-value store")?;
        let manager =
            redis::aio::ConnectionManager::new(client).await.context("connecting key-value store to redis")?;
        Ok(KvBackend::Redis(manager))
    }
}

/// An open store: the label and its backend.
pub struct KvStore {
    label: String,
    backend: Arc<KvBackend>,
}

fn other(e: impl std::fmt::Display) -> Error {
    Error::Other(e.to_string())
}

/// Runs a blocking SQLite call off the async threads.
async fn with_sqlite<T: Send + 'static>(
    conn: &Arc<Mutex<rusqlite::Connection>>,
    f: impl FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
) -> Result<T, Error> {
    let conn = conn.clone();
    tokio::task::spawn_blocking(move || {
        let guard = conn.lock().map_err(|_| Error::Other("key-value store lock poisoned".into()))?;
        f(&guard).map_err(other)
    })
    .await
    .map_err(other)?
}

impl Host for HostState {}

impl HostStore for HostState {
    async fn open(&mut self, label: String) -> Result<Resource<KvStore>, Error> {
        if !self.ctx.key_value_stores.contains(&label) {
            return Err(Error::AccessDenied);
        }
        let backend = self.app.services.kv.get(&label).cloned().ok_or(Error::NoSuchStore)?;
        self.table.push(KvStore { label, backend }).map_err(other)
    }

    async fn get(&mut self, store: Resource<KvStore>, key: String) -> Result<Option<Vec<u8>>, Error> {
        let s = self.table.get(&store).map_err(other)?;
        match &*s.backend {
            KvBackend::Sqlite(conn) => {
                let label = s.label.clone();
                with_sqlite(conn, move |c| {
                    use rusqlite::OptionalExtension;
                    c.query_row("SELECT value FROM spin_key_value WHERE store = ?1 AND key = ?2", [&label, &key], |r| {
                        r.get(0)
                    })
                    .optional()
                })
                .await
            }
            KvBackend::Redis(m) => m.clone().get(key).await.map_err(other),
        }
    }

    async fn set(&mut self, store: Resource<KvStore>, key: String, value: Vec<u8>) -> Result<(), Error> {
        let s = self.table.get(&store).map_err(other)?;
        match &*s.backend {
            KvBackend::Sqlite(conn) => {
                let label = s.label.clone();
                with_sqlite(conn, move |c| {
                    c.execute(
                        "INSERT INTO spin_key_value (store, key, value) VALUES (?1, ?2, ?3)
                         ON CONFLICT(store, key) DO UPDATE SET value = excluded.value",
                        rusqlite::params![label, key, value],
                    )
                    .map(|_| ())
                })
                .await
            }
            KvBackend::Redis(m) => m.clone().set(key, value).await.map_err(other),
        }
    }

    async fn delete(&mut self, store: Resource<KvStore>, key: String) -> Result<(), Error> {
        let s = self.table.get(&store).map_err(other)?;
        match &*s.backend {
            KvBackend::Sqlite(conn) => {
                let label = s.label.clone();
                with_sqlite(conn, move |c| {
                    c.execute("DELETE FROM spin_key_value WHERE store = ?1 AND key = ?2", [label, key]).map(|_| ())
                })
                .await
            }
            KvBackend::Redis(m) => m.clone().del(key).await.map_err(other),
        }
    }

    async fn exists(&mut self, store: Resource<KvStore>, key: String) -> Result<bool, Error> {
        Ok(self.get(store, key).await?.is_some())
    }

    async fn get_keys(&mut self, store: Resource<KvStore>) -> Result<Vec<String>, Error> {
        let s = self.table.get(&store).map_err(other)?;
        match &*s.backend {
            KvBackend::Sqlite(conn) => {
                let label = s.label.clone();
                with_sqlite(conn, move |c| {
                    let mut stmt = c.prepare("SELECT key FROM spin_key_value WHERE store = ?1")?;
                    let keys = stmt.query_map([label], |r| r.get(0))?.collect::<rusqlite::Result<Vec<String>>>();
                    keys
                })
                .await
            }
            KvBackend::Redis(m) => m.clone().keys("*").await.map_err(other),
        }
    }

    async fn drop(&mut self, store: Resource<KvStore>) -> wasmtime::Result<()> {
        self.table.delete(store)?;
        Ok(())
    }
}
