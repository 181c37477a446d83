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
    // Several instances, or several devhost processes in tests, may write one file at once: a
    // writer waits for the lock up to rusqlite's default of 5 s, as Spin's does (Spin opens
    // with `rusqlite::Connection::open` and sets nothing else), then gets "database is locked".
    // No journal mode of our own: Spin opens the file with SQLite's defaults (a rollback
    // journal), and the app switches it to WAL itself (spin-kit's `SpinDb::open`), so devhost
    // shows what the app costs under Spin instead of hiding it.
    Ok(conn)
}

pub struct SqliteConnection {
    db: Arc<Mutex<rusqlite::Connection>>,
    /// Statements run on this connection, logged when the guest drops it
    /// (`DEVHOST_LOG=devhost::sqlite=debug`; `=trace` logs each statement): what a request costs.
    statements: u64,
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
        self.table.push(SqliteConnection { db, statements: 0 }).map_err(|e| Error::Io(e.to_string()))
    }

    async fn execute(
        &mut self,
        conn: Resource<SqliteConnection>,
        statement: String,
        parameters: Vec<Value>,
    ) -> Result<QueryResult, Error> {
        let entry = self.table.get_mut(&conn).map_err(|_| Error::InvalidConnection)?;
        entry.statements += 1;
        let db = entry.db.clone();
        tracing::trace!(target: "devhost::sqlite", component = %self.ctx.id, statement = %statement, "execute");
        tokio::task::spawn_blocking(move || {
            let guard = db.lock().map_err(|_| Error::Io("database lock poisoned".into()))?;
            execute(&guard, &statement, &parameters).map_err(|e| Error::Io(e.to_string()))
        })
        .await
        .map_err(|e| Error::Io(e.to_string()))?
    }

    async fn drop(&mut self, conn: Resource<SqliteConnection>) -> wasmtime::Result<()> {
        let closed = self.table.delete(conn)?;
        tracing::debug!(target: "devhost::sqlite", component = %self.ctx.id, statements = closed.statements, "connection closed");
        Ok(())
    }
}
