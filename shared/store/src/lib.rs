//! The store every component uses, over either SQLite (Spin's embedded default) or PostgreSQL
//! (production), chosen by the `database_url` variable.
//!
//! This crate knows no Spin: [`Db`] is the small synchronous interface both spin-sdk backends
//! offer (`sqlite::Connection::execute`, `pg4::Connection::{query, execute}`). Components
//! implement it over spin-sdk; the contract tests implement it natively over rusqlite and
//! postgres, and run the same suite against both.
//!
//! SQL is written once, with `$1`-style placeholders; [`Dialect::sql`] rewrites them for SQLite.
//! Portable column types only: BIGINT for integers, times (unix milliseconds) and flags, TEXT
//! for strings and JSON.

pub mod cleanup;
pub mod console;
pub mod heartbeats;
pub mod identity;
pub mod images;
pub mod inbox;
pub mod lease;
pub mod messages;
pub mod metrics;
pub mod migrations;
#[cfg(feature = "native")]
pub mod native;
pub mod outbox;
pub mod refunds;
pub mod repo;
pub mod tallies;

use std::fmt;

/// A value bound to, or read from, a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.to_string())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map(Into::into).unwrap_or(Value::Null)
    }
}

/// One result row, by column position.
#[derive(Debug, Clone, PartialEq)]
pub struct Row(pub Vec<Value>);

impl Row {
    pub fn int(&self, i: usize) -> Result<i64, DbError> {
        match self.0.get(i) {
            Some(Value::Int(v)) => Ok(*v),
            other => Err(DbError::Decode(format!("column {i}: expected integer, got {other:?}"))),
        }
    }
    pub fn opt_int(&self, i: usize) -> Result<Option<i64>, DbError> {
        match self.0.get(i) {
            Some(Value::Null) => Ok(None),
            _ => self.int(i).map(Some),
        }
    }
    pub fn text(&self, i: usize) -> Result<String, DbError> {
        match self.0.get(i) {
            Some(Value::Text(v)) => Ok(v.clone()),
            other => Err(DbError::Decode(format!("column {i}: expected text, got {other:?}"))),
        }
    }
    pub fn opt_text(&self, i: usize) -> Result<Option<String>, DbError> {
        match self.0.get(i) {
            Some(Value::Null) => Ok(None),
            _ => self.text(i).map(Some),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// Rewrites `$n` placeholders for the dialect (SQLite takes `?n`).
    pub fn sql(self, sql: &str) -> String {
        match self {
            Dialect::Postgres => sql.to_string(),
            Dialect::Sqlite => {
                let mut out = String::with_capacity(sql.len());
                let mut chars = sql.chars().peekable();
                while let Some(c) = chars.next() {
                    if c == '$' && chars.peek().is_some_and(|d| d.is_ascii_digit()) {
                        out.push('?');
                    } else {
                        out.push(c);
                    }
                }
                out
            }
        }
    }
}

/// Errors from the database layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DbError {
    /// The database could not be reached: a dependency outage (HTTP 503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// A unique or primary-key constraint refused the write.
    #[error("unique constraint violated: {0}")]
    Conflict(String),
    /// Any other failed statement.
    #[error("query failed: {0}")]
    Query(String),
    /// A value did not have the expected type.
    #[error("unexpected value: {0}")]
    Decode(String),
}

impl DbError {
    /// A statement named a table or function the schema does not have yet: the database is not
    /// migrated (SQLite's wording; PostgreSQL's SQLSTATEs 42P01 and 42883, an undefined table
    /// and function, as [`DbError::from_postgres`] keeps them).
    pub fn is_missing_schema(&self) -> bool {
        matches!(self, DbError::Query(m) if m.starts_with("no such table") || m.ends_with("(42P01)") || m.ends_with("(42883)"))
    }

    /// A failed SQLite statement, from SQLite's own message (spin-sdk's SQLite interface reports
    /// failures only as text; the prefixes are SQLite's stable wording). Every adapter maps
    /// through here, so the store's contract tests and the components agree on what a conflict
    /// and an outage are.
    pub fn from_sqlite_message(msg: String) -> DbError {
        if msg.starts_with("UNIQUE constraint failed") {
            DbError::Conflict(msg)
        } else if msg.contains("database is locked") || msg.contains("database is busy") {
            DbError::Unavailable(msg)
        } else {
            DbError::Query(msg)
        }
    }

    /// A failed PostgreSQL statement: its SQLSTATE when the server answered (23505 is a unique
    /// violation; class 08 and the shutdown codes 57P01-57P03 mean the server went away), or
    /// the client's message when it did not.
    pub fn from_postgres(sqlstate: Option<&str>, msg: String) -> DbError {
        match sqlstate {
            Some("23505") => DbError::Conflict(msg),
            Some(code) if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03") => {
                DbError::Unavailable(msg)
            }
            Some(code) => DbError::Query(format!("{msg} ({code})")),
            None if msg.contains("connection closed") || msg.contains("connection refused") => {
                DbError::Unavailable(msg)
            }
            None => DbError::Query(msg),
        }
    }
}

/// The database operations the store needs, as both spin-sdk backends offer them.
pub trait Db {
    fn dialect(&self) -> Dialect;
    /// Runs a statement that returns no rows; answers the number of rows affected.
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError>;
    /// Runs a statement that returns rows.
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError>;
    /// Whether this is a connection inside a transaction that several units of work share
    /// ([`Grouped`]): [`transaction`] then runs its work in that one.
    fn grouped(&self) -> bool {
        false
    }
}

/// A connection inside one transaction that several units of work share, each of which calls
/// [`transaction`] as if alone: their work runs in the shared transaction, and the first
/// failure fails the group, which whoever opened it rolls back (and may redo unit by unit).
/// The conversation worker groups a batch's steps this way on PostgreSQL, saving a commit
/// (and its WAL flush) and two statements per step.
pub struct Grouped<'a, D: ?Sized>(pub &'a D);

impl<D: Db + ?Sized> Db for Grouped<'_, D> {
    fn dialect(&self) -> Dialect {
        self.0.dialect()
    }
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        self.0.execute(sql, params)
    }
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        self.0.query(sql, params)
    }
    fn grouped(&self) -> bool {
        true
    }
}

/// Most values one statement binds for a list (`id IN (...)`): far below SQLite's limit of
/// 32,766 variables and PostgreSQL's 65,535 parameters.
pub const LIST_CHUNK: usize = 500;

/// The placeholders of a list of `n` values numbered from `first`: `$first, $first+1, ...`.
pub fn placeholders(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// Runs `f` inside a transaction: committed when it returns `Ok`, rolled back otherwise. On a
/// [`Grouped`] connection, inside the group's.
pub fn transaction<D: Db + ?Sized, T, E>(db: &D, f: impl FnOnce(&D) -> Result<T, E>) -> Result<T, E>
where
    E: From<DbError>,
{
    if db.grouped() {
        return f(db);
    }
    // IMMEDIATE takes SQLite's write lock at once, so two writers never deadlock upgrading.
    let begin = match db.dialect() {
        Dialect::Sqlite => "BEGIN IMMEDIATE",
        Dialect::Postgres => "BEGIN",
    };
    db.execute(begin, &[])?;
    match f(db) {
        Ok(v) => {
            db.execute("COMMIT", &[])?;
            Ok(v)
        }
        Err(e) => {
            // The error that made us roll back is the one worth reporting.
            let _rollback = db.execute("ROLLBACK", &[]);
            Err(e)
        }
    }
}

impl fmt::Display for Dialect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_rewritten_for_sqlite_only() {
        let sql = "SELECT $1, '$x', $12 FROM t WHERE a = $2";
        assert_eq!(Dialect::Sqlite.sql(sql), "SELECT ?1, '$x', ?12 FROM t WHERE a = ?2");
        assert_eq!(Dialect::Postgres.sql(sql), sql);
    }

    #[test]
    fn list_placeholders_are_numbered_from_the_first() {
        assert_eq!(placeholders(3, 3), "$3, $4, $5");
        assert_eq!(placeholders(1, 0), "");
    }

    #[test]
    fn driver_errors_map_to_one_classification() {
        let c = |e: DbError| std::mem::discriminant(&e);
        let m = |s: &str| s.to_string();
        assert_eq!(c(DbError::from_sqlite_message(m("UNIQUE constraint failed: t.id"))), c(DbError::Conflict(m(""))));
        assert_eq!(c(DbError::from_sqlite_message(m("database is locked"))), c(DbError::Unavailable(m(""))));
        assert_eq!(c(DbError::from_sqlite_message(m("no such table: x"))), c(DbError::Query(m(""))));
        assert_eq!(c(DbError::from_postgres(Some("23505"), m("dup"))), c(DbError::Conflict(m(""))));
        assert_eq!(c(DbError::from_postgres(Some("57P01"), m("shutdown"))), c(DbError::Unavailable(m(""))));
        assert_eq!(c(DbError::from_postgres(Some("08006"), m("lost"))), c(DbError::Unavailable(m(""))));
        assert_eq!(c(DbError::from_postgres(Some("42P01"), m("no table"))), c(DbError::Query(m(""))));
        assert_eq!(c(DbError::from_postgres(None, m("connection closed"))), c(DbError::Unavailable(m(""))));
    }
}
