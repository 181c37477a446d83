//! `fermyon:spin/sqlite`: Spin's `spin` database type, one SQLite file per label.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};
use wasmtime::component::Resource;

use super::bindings::fermyon::spin2_0_0::sqlite::{Error, Host, HostConnection, QueryResult, RowResult, Value};
use super::HostState;

/// Opens one connection to a database file. Each guest `open` gets its own connection, so that
/// a transaction (`BEGIN` ... `COMMIT` over several `execute` calls) belongs to one instance.
pub fn connect(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let conn =
        rusqlite::Connection::open(path).with_context(|| format!("opening sqlite database {}", path.display()))?;
    // Several instances, or several devhost processes in tests, may write one file at once.
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.execute_batch("PRAGMA journal_mode=WAL;").with_context(|| format!("preparing {}", path.display()))?;
    Ok(conn)
}

pub struct SqliteConnection {
    db: Arc<Mutex<rusqlite::Connection>>,
}

fn to_sql(v: &Value) -> ToSqlOutput<'_> {
    match v {
        Value::Integer(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
        Value::Real(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
        Value::Text(s) => ToSqlOutput::Borrowed(ValueRef::Text(s.as_bytes())),
        Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        Value::Null => ToSqlOutput::Owned(SqlValue::Null),
    }
}

fn from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(f) => Value::Real(f),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn execute(conn: &rusqlite::Connection, statement: &str, params: &[Value]) -> rusqlite::Result<QueryResult> {
    let mut stmt = conn.prepare_cached(statement)?;
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let params: Vec<ToSqlOutput<'_>> = params.iter().map(to_sql).collect();
    let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let values = (0..columns.len()).map(|i| row.get_ref(i).map(from_sql)).collect::<rusqlite::Result<_>>()?;
        out.push(RowResult { values });
    }
    Ok(QueryResult { columns, rows: out })
}

impl Host for HostState {}

impl HostConnection for HostState {
    async fn open(&mut self, database: String) -> Result<Resource<SqliteConnection>, Error> {
        if !self.ctx.sqlite_databases.contains(&database) {
            return Err(Error::AccessDenied);
        }
        let path = self.app.services.sqlite.get(&database).cloned().ok_or(Error::NoSuchDatabase)?;
        let conn = tokio::task::spawn_blocking(move || connect(&path))
            .await
            .map_err(|e| Error::Io(e.to_string()))?
            .map_err(|e| Error::Io(format!("{e:#}")))?;
        let db = Arc::new(Mutex::new(conn));
        self.table.push(SqliteConnection { db }).map_err(|e| Error::Io(e.to_string()))
    }

    async fn execute(
        &mut self,
        conn: Resource<SqliteConnection>,
        statement: String,
        parameters: Vec<Value>,
    ) -> Result<QueryResult, Error> {
        let db = self.table.get(&conn).map_err(|_| Error::InvalidConnection)?.db.clone();
        tokio::task::spawn_blocking(move || {
            let guard = db.lock().map_err(|_| Error::Io("database lock poisoned".into()))?;
            execute(&guard, &statement, &parameters).map_err(|e| Error::Io(e.to_string()))
        })
        .await
        .map_err(|e| Error::Io(e.to_string()))?
    }

    async fn drop(&mut self, conn: Resource<SqliteConnection>) -> wasmtime::Result<()> {
        self.table.delete(conn)?;
        Ok(())
    }
}
