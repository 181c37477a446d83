//! `fermyon:spin/sqlite@2.0.0` and `spin:sqlite/sqlite@3.0.0`: Spin's SQLite databases, one file
//! per label, through either interface (the second adds the connection's `changes` and
//! `last-insert-rowid`, which Spin 3.x serves too).

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rusqlite::types::Value as SqlValue;
use wasmtime::component::Resource;

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
    /// SQLite's virtual-machine steps for those statements (`SQLITE_STMTSTATUS_VM_STEP`): the
    /// work a statement did, which grows with the rows it visits and not with the machine's
    /// speed, so a test can show that a query's cost does not grow with a table.
    vm_steps: u64,
}

/// What the SQLite statements of one instance cost, logged when the instance ends.
#[derive(Debug, Default, Clone, Copy)]
pub struct SqliteCost {
    pub statements: u64,
    pub vm_steps: u64,
}

/// A statement's answer in rusqlite's own values, whichever interface asked.
struct Answer {
    columns: Vec<String>,
    rows: Vec<Vec<SqlValue>>,
    vm_steps: u64,
}

fn execute(conn: &rusqlite::Connection, statement: &str, params: Vec<SqlValue>) -> rusqlite::Result<Answer> {
    let mut stmt = conn.prepare_cached(statement)?;
    let columns: Vec<String> = stmt.column_names().into_iter().map(String::from).collect();
    let mut rows = stmt.query(rusqlite::params_from_iter(params.iter()))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let values = (0..columns.len()).map(|i| row.get_ref(i).map(SqlValue::from)).collect::<rusqlite::Result<_>>()?;
        out.push(values);
    }
    drop(rows);
    // The counter belongs to the (cached) statement: read it and start it again at zero.
    let vm_steps = stmt.reset_status(rusqlite::StatementStatus::VmStep).max(0) as u64;
    Ok(Answer { columns, rows: out, vm_steps })
}

impl HostState {
    async fn sqlite_open(&mut self, database: String) -> Result<Resource<SqliteConnection>, OpenError> {
        if !self.ctx.sqlite_databases.contains(&database) {
            return Err(OpenError::AccessDenied);
        }
        let path = self.app.services.sqlite.get(&database).cloned().ok_or(OpenError::NoSuchDatabase)?;
        let conn = tokio::task::spawn_blocking(move || connect(&path))
            .await
            .map_err(|e| OpenError::Io(e.to_string()))?
            .map_err(|e| OpenError::Io(format!("{e:#}")))?;
        let db = Arc::new(Mutex::new(conn));
        self.table.push(SqliteConnection { db, statements: 0, vm_steps: 0 }).map_err(|e| OpenError::Io(e.to_string()))
    }

    async fn sqlite_execute(
        &mut self,
        conn: &Resource<SqliteConnection>,
        statement: String,
        parameters: Vec<SqlValue>,
    ) -> Result<Answer, Option<String>> {
        let db = self.table.get(conn).map_err(|_| None)?.db.clone();
        tracing::trace!(target: "devhost::sqlite", component = %self.ctx.id, statement = %statement, "execute");
        let answer = tokio::task::spawn_blocking(move || {
            let guard = db.lock().map_err(|_| Some("database lock poisoned".to_string()))?;
            execute(&guard, &statement, parameters).map_err(|e| Some(e.to_string()))
        })
        .await
        .map_err(|e| Some(e.to_string()))?;
        let vm_steps = answer.as_ref().map(|a| a.vm_steps).unwrap_or(0);
        if let Ok(entry) = self.table.get_mut(conn) {
            entry.statements += 1;
            entry.vm_steps += vm_steps;
        }
        self.sqlite_cost.statements += 1;
        self.sqlite_cost.vm_steps += vm_steps;
        answer
    }

    /// A connection's own counter, as SQLite keeps it (`sqlite3_changes64`,
    /// `sqlite3_last_insert_rowid`): not a statement, so not counted as one.
    fn sqlite_counter(&mut self, conn: &Resource<SqliteConnection>, f: fn(&rusqlite::Connection) -> i64) -> i64 {
        let Ok(entry) = self.table.get(conn) else { return 0 };
        entry.db.lock().map(|c| f(&c)).unwrap_or(0)
    }

    fn sqlite_drop(&mut self, conn: Resource<SqliteConnection>) -> wasmtime::Result<()> {
        let closed = self.table.delete(conn)?;
        tracing::debug!(
            target: "devhost::sqlite",
            component = %self.ctx.id,
            statements = closed.statements,
            vm_steps = closed.vm_steps,
            "connection closed"
        );
        Ok(())
    }
}

/// How an `open` fails, in either interface's terms.
enum OpenError {
    AccessDenied,
    NoSuchDatabase,
    Io(String),
}

/// The conversions and the calls both interfaces share: they differ in their generated types
/// only (and v3 has two more methods, given as `$extra`).
macro_rules! sqlite_interface {
    ($bindings:path, { $($extra:item)* }) => {
        use super::*;
        use $bindings::{Error, Host, HostConnection, QueryResult, RowResult, Value};

        fn to_sql(v: Value) -> SqlValue {
            match v {
                Value::Integer(i) => SqlValue::Integer(i),
                Value::Real(f) => SqlValue::Real(f),
                Value::Text(s) => SqlValue::Text(s),
                Value::Blob(b) => SqlValue::Blob(b),
                Value::Null => SqlValue::Null,
            }
        }

        fn from_sql(v: SqlValue) -> Value {
            match v {
                SqlValue::Null => Value::Null,
                SqlValue::Integer(i) => Value::Integer(i),
                SqlValue::Real(f) => Value::Real(f),
                SqlValue::Text(t) => Value::Text(t),
                SqlValue::Blob(b) => Value::Blob(b),
            }
        }

        impl Host for HostState {}

        impl HostConnection for HostState {
            async fn open(&mut self, database: String) -> Result<Resource<SqliteConnection>, Error> {
                self.sqlite_open(database).await.map_err(|e| match e {
                    OpenError::AccessDenied => Error::AccessDenied,
                    OpenError::NoSuchDatabase => Error::NoSuchDatabase,
                    OpenError::Io(m) => Error::Io(m),
                })
            }

            async fn execute(
                &mut self,
                conn: Resource<SqliteConnection>,
                statement: String,
                parameters: Vec<Value>,
            ) -> Result<QueryResult, Error> {
                let params = parameters.into_iter().map(to_sql).collect();
                let answer = self.sqlite_execute(&conn, statement, params).await.map_err(|e| match e {
                    None => Error::InvalidConnection,
                    Some(m) => Error::Io(m),
                })?;
                Ok(QueryResult {
                    columns: answer.columns,
                    rows: answer
                        .rows
                        .into_iter()
                        .map(|r| RowResult { values: r.into_iter().map(from_sql).collect() })
                        .collect(),
                })
            }

            $($extra)*

            async fn drop(&mut self, conn: Resource<SqliteConnection>) -> wasmtime::Result<()> {
                self.sqlite_drop(conn)
            }
        }
    };
}

/// `fermyon:spin/sqlite@2.0.0`, spin-sdk's `sqlite` module.
mod v2 {
    sqlite_interface!(crate::host::bindings::fermyon::spin2_0_0::sqlite, {});
}

/// `spin:sqlite/sqlite@3.0.0`, spin-sdk's `sqlite3` module: the same, with the connection's
/// `changes` and `last-insert-rowid`.
mod v3 {
    sqlite_interface!(crate::host::bindings::spin::sqlite::sqlite, {
        async fn last_insert_rowid(&mut self, conn: Resource<SqliteConnection>) -> i64 {
            self.sqlite_counter(&conn, |c| c.last_insert_rowid())
        }

        async fn changes(&mut self, conn: Resource<SqliteConnection>) -> u64 {
            self.sqlite_counter(&conn, |c| c.changes() as i64) as u64
        }
    });
}
