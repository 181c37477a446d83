//! Native [`Db`] implementations over rusqlite and the synchronous `postgres` client, for code
//! that runs outside Spin: the store's contract tests and the benchmark's native reference
//! server (`tools/native-reference`). They behave like the spin-sdk backends the components
//! use: errors go through the same `DbError::from_*` mappings, values convert the same way.
//! Behind the `native` feature, so that the components' wasm build never compiles them.

use std::cell::RefCell;

use crate::{Db, DbError, Dialect, Row, Value};

/// A SQLite connection, in WAL mode as the app puts its database.
pub struct Sqlite(pub rusqlite::Connection);

impl Sqlite {
    /// Opens (or creates) the file; a writer waits up to 10 s for the lock.
    pub fn open(path: &std::path::Path) -> Result<Self, DbError> {
        let c = rusqlite::Connection::open(path).map_err(sqlite_err)?;
        c.busy_timeout(std::time::Duration::from_secs(10)).map_err(sqlite_err)?;
        c.execute_batch("PRAGMA journal_mode=WAL;").map_err(sqlite_err)?;
        Ok(Sqlite(c))
    }
}

/// Through the mapping the components use (spin-sdk hands them SQLite's message).
fn sqlite_err(e: rusqlite::Error) -> DbError {
    DbError::from_sqlite_message(e.to_string())
}

impl Db for Sqlite {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let p: Vec<rusqlite::types::Value> = params.iter().map(to_sqlite).collect();
        self.0.execute(sql, rusqlite::params_from_iter(p)).map(|n| n as u64).map_err(sqlite_err)
    }
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let p: Vec<rusqlite::types::Value> = params.iter().map(to_sqlite).collect();
        let mut stmt = self.0.prepare(sql).map_err(sqlite_err)?;
        let n = stmt.column_count();
        let rows = stmt
            .query_map(rusqlite::params_from_iter(p), |r| {
                (0..n)
                    .map(|i| {
                        Ok(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(v) => Value::Int(v),
                            rusqlite::types::ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into()),
                            rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                            rusqlite::types::ValueRef::Real(f) => Value::Text(f.to_string()),
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
                    .map(Row)
            })
            .map_err(sqlite_err)?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(sqlite_err)
    }
}

fn to_sqlite(v: &Value) -> rusqlite::types::Value {
    match v {
        Value::Null => rusqlite::types::Value::Null,
        Value::Int(i) => rusqlite::types::Value::Integer(*i),
        Value::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Value::Blob(b) => rusqlite::types::Value::Blob(b.clone()),
    }
}

/// A PostgreSQL connection.
pub struct Pg(pub RefCell<postgres::Client>);

impl Pg {
    /// Connects without TLS (a local server, or one behind the cluster's network).
    pub fn connect(url: &str) -> Result<Self, DbError> {
        postgres::Client::connect(url, postgres::NoTls).map(|c| Pg(RefCell::new(c))).map_err(pg_err)
    }
}

/// Through the mapping the components use: the server's SQLSTATE and message, as spin-sdk
/// hands them over, or the client's message.
fn pg_err(e: postgres::Error) -> DbError {
    match e.as_db_error() {
        Some(db) => DbError::from_postgres(Some(db.code().code()), db.message().to_string()),
        None if e.is_closed() => DbError::from_postgres(None, format!("connection closed: {e}")),
        None => DbError::from_postgres(None, e.to_string()),
    }
}

/// SQL NULL for a parameter of any type, as spin-sdk's `DbNull` is.
#[derive(Debug)]
struct Null;

impl postgres::types::ToSql for Null {
    fn to_sql(
        &self,
        _: &postgres::types::Type,
        _: &mut postgres::types::private::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(postgres::types::IsNull::Yes)
    }
    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
    postgres::types::to_sql_checked!();
}

fn pg_params(params: &[Value]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    params
        .iter()
        .map(|v| -> Box<dyn postgres::types::ToSql + Sync> {
            match v {
                Value::Null => Box::new(Null),
                Value::Int(i) => Box::new(*i),
                Value::Text(s) => Box::new(s.clone()),
                Value::Blob(b) => Box::new(b.clone()),
            }
        })
        .collect()
}

impl Db for Pg {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        let p = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = p.iter().map(|b| b.as_ref()).collect();
        self.0.borrow_mut().execute(sql, &refs).map_err(pg_err)
    }
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        let p = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = p.iter().map(|b| b.as_ref()).collect();
        let rows = self.0.borrow_mut().query(sql, &refs).map_err(pg_err)?;
        rows.iter()
            .map(|r| {
                (0..r.len())
                    .map(|i| {
                        use postgres::types::Type;
                        let t = r.columns()[i].type_().clone();
                        Ok(match t {
                            Type::INT8 => r.get::<_, Option<i64>>(i).map(Value::Int),
                            Type::INT4 => r.get::<_, Option<i32>>(i).map(|v| Value::Int(v.into())),
                            Type::TEXT | Type::VARCHAR => r.get::<_, Option<String>>(i).map(Value::Text),
                            Type::BYTEA => r.get::<_, Option<Vec<u8>>>(i).map(Value::Blob),
                            other => return Err(DbError::Decode(format!("type {other}"))),
                        }
                        .unwrap_or(Value::Null))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Row)
            })
            .collect()
    }
}
