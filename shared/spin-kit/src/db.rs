//! The store's [`Db`] interface over spin-sdk: Spin's `default` SQLite database, or PostgreSQL
//! when the `database_url` variable holds a `postgres://` URL.

use astria_store::{Db, DbError, Dialect, Row, Value};
// `sqlite3` is spin-sdk's binding of `spin:sqlite@3.0.0` (Spin 3.x and devhost serve it): the
// same connection as `sqlite`, plus the connection's `changes()` counter.
use spin_sdk::{pg4, sqlite3 as sqlite};

/// An open database connection of either kind.
pub enum SpinDb {
    Sqlite(sqlite::Connection),
    Postgres(pg4::Connection),
}

impl SpinDb {
    /// Opens the database `database_url` names: `sqlite:default` (or empty) for Spin's default
    /// SQLite database, `postgres://...` for PostgreSQL.
    pub fn open(database_url: &str) -> Result<Self, DbError> {
        let db = Self::open_plain(database_url)?;
        db.use_wal();
        Ok(db)
    }

    /// SQLite: switches the file to the write-ahead log. Spin opens the file with SQLite's
    /// default rollback journal: every commit then writes and syncs a journal, the database
    /// and the journal's removal, and readers wait for writers. The write-ahead log costs one
    /// sync per commit and lets readers run beside the writer; the mode is stored in the file,
    /// so after the first connection this is a no-op that takes no lock. If another connection
    /// holds the file at that moment the switch waits for the next open (rollback still works).
    pub fn use_wal(&self) {
        if let SpinDb::Sqlite(conn) = self {
            let _ = conn.execute("PRAGMA journal_mode=WAL", &[]);
        }
    }

    /// Like [`SpinDb::open`], without the journal switch: one statement less for a hot path
    /// (the webhook) on a file that other opens have switched already.
    pub fn open_plain(database_url: &str) -> Result<Self, DbError> {
        if is_postgres(database_url) {
            pg4::Connection::open(database_url).map(SpinDb::Postgres).map_err(pg_error)
        } else {
            let label = database_url.strip_prefix("sqlite:").filter(|l| !l.is_empty()).unwrap_or("default");
            sqlite::Connection::open(label).map(SpinDb::Sqlite).map_err(sqlite_error)
        }
    }
}

/// Whether `database_url` names PostgreSQL (else a SQLite label).
pub fn is_postgres(database_url: &str) -> bool {
    database_url.starts_with("postgres://") || database_url.starts_with("postgresql://")
}

/// spin-sdk's errors, classified by the store's shared mapping (`DbError::from_*`), the same
/// the store's contract tests run through.
fn sqlite_error(e: sqlite::Error) -> DbError {
    match e {
        sqlite::Error::Io(msg) => DbError::from_sqlite_message(msg),
        other => DbError::Unavailable(format!("{other:?}")),
    }
}

fn pg_error(e: pg4::PgError) -> DbError {
    match e {
        pg4::PgError::ConnectionFailed(msg) => DbError::Unavailable(msg),
        pg4::PgError::QueryFailed(pg4::QueryError::DbError(db)) => DbError::from_postgres(Some(&db.code), db.message),
        pg4::PgError::QueryFailed(pg4::QueryError::Text(t)) => DbError::from_postgres(None, t),
        other => DbError::Query(format!("{other:?}")),
    }
}

fn sqlite_params(params: &[Value]) -> Vec<sqlite::Value> {
    params
        .iter()
        .map(|v| match v {
            Value::Null => sqlite::Value::Null,
            Value::Int(i) => sqlite::Value::Integer(*i),
            Value::Text(s) => sqlite::Value::Text(s.clone()),
            Value::Blob(b) => sqlite::Value::Blob(b.clone()),
        })
        .collect()
}

fn pg_params(params: &[Value]) -> Vec<pg4::ParameterValue> {
    params
        .iter()
        .map(|v| match v {
            Value::Null => pg4::ParameterValue::DbNull,
            Value::Int(i) => pg4::ParameterValue::Int64(*i),
            Value::Text(s) => pg4::ParameterValue::Str(s.clone()),
            Value::Blob(b) => pg4::ParameterValue::Binary(b.clone()),
        })
        .collect()
}

fn from_sqlite(v: &sqlite::Value) -> Value {
    match v {
        sqlite::Value::Null => Value::Null,
        sqlite::Value::Integer(i) => Value::Int(*i),
        sqlite::Value::Text(s) => Value::Text(s.clone()),
        sqlite::Value::Blob(b) => Value::Blob(b.clone()),
        sqlite::Value::Real(f) => Value::Text(f.to_string()),
    }
}

fn from_pg(v: &pg4::DbValue) -> Result<Value, DbError> {
    Ok(match v {
        pg4::DbValue::DbNull => Value::Null,
        pg4::DbValue::Int16(i) => Value::Int((*i).into()),
        pg4::DbValue::Int32(i) => Value::Int((*i).into()),
        pg4::DbValue::Int64(i) => Value::Int(*i),
        pg4::DbValue::Boolean(b) => Value::Int((*b).into()),
        pg4::DbValue::Str(s) => Value::Text(s.clone()),
        pg4::DbValue::Binary(b) => Value::Blob(b.clone()),
        other => return Err(DbError::Decode(format!("unsupported PostgreSQL value {other:?}"))),
    })
}

/// Whether `sql` is a statement whose affected rows SQLite counts (`changes()`).
fn changes_rows(sql: &str) -> bool {
    let verb = sql.trim_start().split(|c: char| !c.is_ascii_alphabetic()).next().unwrap_or("");
    ["INSERT", "UPDATE", "DELETE", "REPLACE", "WITH"].iter().any(|v| verb.eq_ignore_ascii_case(v))
}

impl Db for SpinDb {
    fn dialect(&self) -> Dialect {
        match self {
            SpinDb::Sqlite(_) => Dialect::Sqlite,
            SpinDb::Postgres(_) => Dialect::Postgres,
        }
    }

    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self {
            SpinDb::Sqlite(c) => {
                c.execute(sql, &sqlite_params(params)).map_err(sqlite_error)?;
                if !changes_rows(sql) {
                    // BEGIN, COMMIT, PRAGMA...: `changes()` would still name the last write's rows.
                    return Ok(0);
                }
                // The connection's counter, not another statement.
                Ok(c.changes())
            }
            SpinDb::Postgres(c) => c.execute(sql, &pg_params(params)).map_err(pg_error),
        }
    }

    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            SpinDb::Sqlite(c) => {
                let r = c.execute(sql, &sqlite_params(params)).map_err(sqlite_error)?;
                Ok(r.rows.iter().map(|row| Row(row.values.iter().map(from_sqlite).collect())).collect())
            }
            SpinDb::Postgres(c) => {
                let r = c.query(sql, &pg_params(params)).map_err(pg_error)?;
                r.rows.iter().map(|row| row.iter().map(from_pg).collect::<Result<Vec<_>, _>>().map(Row)).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::changes_rows;

    #[test]
    fn only_statements_that_change_rows_are_counted() {
        for sql in
            ["INSERT INTO t VALUES (1)", "  update t SET a = 1", "DELETE FROM t", "WITH x AS (SELECT 1) DELETE FROM t"]
        {
            assert!(changes_rows(sql), "{sql}");
        }
        for sql in ["BEGIN IMMEDIATE", "COMMIT", "ROLLBACK", "PRAGMA journal_mode=WAL", "SELECT 1", ""] {
            assert!(!changes_rows(sql), "{sql}");
        }
    }
}
