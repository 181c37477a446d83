//! What a test reads and writes in the app's own database, on either backend: the PostgreSQL
//! database the harness created, or the SQLite file in the app's state directory
//! (`<state_dir>/sqlite_db.db`, where Spin and devhost keep the default database).
//!
//! One SQL text serves both: write it in the common subset (`$1` placeholders bind by position
//! on SQLite too). So a test written once runs on SQLite and on PostgreSQL, as the production
//! guarantees must hold on both.
//!
//! SQLite is opened per call with a busy timeout: the app holds the file too (Spin with the
//! rollback journal), and a test's read must wait for the app's write, not fail on it.

use std::path::PathBuf;
use std::time::Duration;

use crate::TestApp;

/// A value bound to a `$n` placeholder.
#[derive(Debug, Clone)]
pub enum Arg {
    Text(String),
    Int(i64),
}

impl From<&str> for Arg {
    fn from(v: &str) -> Self {
        Arg::Text(v.to_string())
    }
}
impl From<&String> for Arg {
    fn from(v: &String) -> Self {
        Arg::Text(v.clone())
    }
}
impl From<String> for Arg {
    fn from(v: String) -> Self {
        Arg::Text(v)
    }
}
impl From<i64> for Arg {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

/// A value read from a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Null,
    Int(i64),
    Text(String),
}

impl Cell {
    pub fn int(&self) -> i64 {
        match self {
            Cell::Int(v) => *v,
            other => panic!("expected an integer, got {other:?}"),
        }
    }
    pub fn text(&self) -> String {
        match self {
            Cell::Text(v) => v.clone(),
            other => panic!("expected text, got {other:?}"),
        }
    }
    pub fn opt_text(&self) -> Option<String> {
        match self {
            Cell::Null => None,
            other => Some(other.text()),
        }
    }
}

/// The app's database, as the test sees it.
pub enum TestDb {
    Postgres(tokio_postgres::Client),
    Sqlite(PathBuf),
}

impl TestDb {
    /// The database `app` uses: PostgreSQL when it was given one, else its SQLite file.
    pub async fn of(app: &TestApp) -> TestDb {
        match &app.database_url {
            Some(url) => {
                let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                    .await
                    .expect("the test reaches the app's PostgreSQL database");
                tokio::spawn(conn);
                TestDb::Postgres(client)
            }
            None => TestDb::Sqlite(app.state_dir.join("sqlite_db.db")),
        }
    }

    /// The database that holds `app`'s inbox (and the inbox's job lease): on SQLite a file of its
    /// own (`astria_store::inbox` says why), on PostgreSQL the app's database.
    pub async fn inbox_of(app: &TestApp) -> TestDb {
        match &app.database_url {
            Some(_) => TestDb::of(app).await,
            None => TestDb::Sqlite(app.state_dir.join("sqlite_inbox.db")),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, TestDb::Postgres(_))
    }

    /// Runs a statement; answers the rows it changed.
    pub async fn execute(&self, sql: &str, args: &[Arg]) -> u64 {
        match self {
            TestDb::Postgres(c) => {
                let params = pg_params(args);
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                c.execute(sql, &refs).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"))
            }
            TestDb::Sqlite(path) => {
                let (path, sql, args) = (path.clone(), sql.to_string(), args.to_vec());
                tokio::task::spawn_blocking(move || {
                    let conn = sqlite(&path);
                    let n = conn
                        .execute(&sql, rusqlite::params_from_iter(args.iter().map(sqlite_value)))
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                    n as u64
                })
                .await
                .expect("SQLite task")
            }
        }
    }

    /// Every row of a query.
    pub async fn rows(&self, sql: &str, args: &[Arg]) -> Vec<Vec<Cell>> {
        match self {
            TestDb::Postgres(c) => {
                let params = pg_params(args);
                let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                    params.iter().map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
                let rows = c.query(sql, &refs).await.unwrap_or_else(|e| panic!("{sql}: {e:?}"));
                rows.iter().map(pg_row).collect()
            }
            TestDb::Sqlite(path) => {
                let (path, sql, args) = (path.clone(), sql.to_string(), args.to_vec());
                tokio::task::spawn_blocking(move || {
                    let conn = sqlite(&path);
                    let mut stmt = conn.prepare(&sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
                    let n = stmt.column_count();
                    let rows = stmt
                        .query_map(rusqlite::params_from_iter(args.iter().map(sqlite_value)), |r| {
                            (0..n)
                                .map(|i| {
                                    Ok(match r.get_ref(i)? {
                                        rusqlite::types::ValueRef::Null => Cell::Null,
                                        rusqlite::types::ValueRef::Integer(v) => Cell::Int(v),
                                        rusqlite::types::ValueRef::Text(t) => {
                                            Cell::Text(String::from_utf8_lossy(t).into_owned())
                                        }
                                        other => panic!("unexpected SQLite value {other:?}"),
                                    })
                                })
                                .collect::<rusqlite::Result<Vec<Cell>>>()
                        })
                        .unwrap_or_else(|e| panic!("{sql}: {e}"));
                    rows.collect::<rusqlite::Result<Vec<_>>>().unwrap_or_else(|e| panic!("{sql}: {e}"))
                })
                .await
                .expect("SQLite task")
            }
        }
    }

    /// The first column of the one row a query answers.
    pub async fn one(&self, sql: &str, args: &[Arg]) -> Cell {
        let rows = self.rows(sql, args).await;
        assert_eq!(rows.len(), 1, "{sql}: expected one row, got {rows:?}");
        rows[0][0].clone()
    }

    pub async fn int(&self, sql: &str, args: &[Arg]) -> i64 {
        self.one(sql, args).await.int()
    }

    pub async fn text(&self, sql: &str, args: &[Arg]) -> String {
        self.one(sql, args).await.text()
    }

    /// `orders.status` of one order.
    pub async fn order_status(&self, order_id: &str) -> String {
        self.text("SELECT status FROM orders WHERE id = $1", &[order_id.into()]).await
    }

    /// `SELECT COUNT(*) ...`.
    pub async fn count(&self, sql: &str) -> i64 {
        self.int(sql, &[]).await
    }
}

fn sqlite(path: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
    conn.busy_timeout(Duration::from_secs(20)).expect("busy timeout");
    conn
}

fn sqlite_value(a: &Arg) -> rusqlite::types::Value {
    match a {
        Arg::Text(s) => rusqlite::types::Value::Text(s.clone()),
        Arg::Int(i) => rusqlite::types::Value::Integer(*i),
    }
}

fn pg_params(args: &[Arg]) -> Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> {
    args.iter()
        .map(|a| -> Box<dyn tokio_postgres::types::ToSql + Sync + Send> {
            match a {
                Arg::Text(s) => Box::new(s.clone()),
                Arg::Int(i) => Box::new(*i),
            }
        })
        .collect()
}

fn pg_row(r: &tokio_postgres::Row) -> Vec<Cell> {
    use tokio_postgres::types::Type;
    (0..r.len())
        .map(|i| {
            let t = r.columns()[i].type_().clone();
            if t == Type::INT8 {
                r.get::<_, Option<i64>>(i).map_or(Cell::Null, Cell::Int)
            } else if t == Type::INT4 {
                r.get::<_, Option<i32>>(i).map_or(Cell::Null, |v| Cell::Int(v.into()))
            } else if t == Type::INT2 {
                r.get::<_, Option<i16>>(i).map_or(Cell::Null, |v| Cell::Int(v.into()))
            } else if t == Type::BOOL {
                r.get::<_, Option<bool>>(i).map_or(Cell::Null, |v| Cell::Int(v.into()))
            } else {
                r.get::<_, Option<String>>(i).map_or(Cell::Null, Cell::Text)
            }
        })
        .collect()
}
