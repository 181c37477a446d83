//! Leases: a row that says who may do a piece of work until when. Taking one is a single
//! upsert, so of concurrent takers exactly one wins; a holder that dies simply lets it expire.
//! Two kinds: a contact's send queue (`send_leases`, renewed by its holder while it sends) and
//! exclusive jobs such as the weekly cleanup (`job_leases`, never re-entered).

use crate::{Db, DbError, Value};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Keyed by the contact's `wa_id`; the holder renews it.
    Send,
    /// Keyed by the job's name; not re-entrant.
    Job,
}

impl Kind {
    fn table(self) -> (&'static str, &'static str) {
        match self {
            Kind::Send => ("send_leases", "wa_id"),
            Kind::Job => ("job_leases", "name"),
        }
    }
}

/// Takes the lease on `key` until `now + lease_ms`; `false` while another holder's runs (or,
/// for a job, while any runs).
pub fn acquire<D: Db + ?Sized>(
    db: &D,
    kind: Kind,
    key: &str,
    holder: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<bool, DbError> {
    let (table, column) = kind.table();
    let renew = match kind {
        Kind::Send => format!(" OR {table}.holder = excluded.holder"),
        Kind::Job => String::new(),
    };
    let n = db.execute(
        &db.dialect().sql(&format!(
            "INSERT INTO {table} ({column}, holder, lease_until) VALUES ($1, $2, $3)
             ON CONFLICT ({column}) DO UPDATE SET holder = excluded.holder, lease_until = excluded.lease_until
             WHERE {table}.lease_until < $4{renew}"
        )),
        &[Value::from(key), Value::from(holder), Value::Int(now_ms + lease_ms), Value::Int(now_ms)],
    )?;
    Ok(n == 1)
}

/// Extends `holder`'s lease on `key` to `now + lease_ms`; `false` if it is no longer theirs
/// (it lapsed and someone else took it). Long work calls this between its steps.
pub fn renew<D: Db + ?Sized>(
    db: &D,
    kind: Kind,
    key: &str,
    holder: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<bool, DbError> {
    let (table, column) = kind.table();
    let n = db.execute(
        &db.dialect().sql(&format!("UPDATE {table} SET lease_until = $1 WHERE {column} = $2 AND holder = $3")),
        &[Value::Int(now_ms + lease_ms), Value::from(key), Value::from(holder)],
    )?;
    Ok(n == 1)
}

/// Gives the lease back, if `holder` still has it.
pub fn release<D: Db + ?Sized>(db: &D, kind: Kind, key: &str, holder: &str) -> Result<(), DbError> {
    let (table, column) = kind.table();
    let sql = format!("DELETE FROM {table} WHERE {column} = $1 AND holder = $2");
    db.execute(&db.dialect().sql(&sql), &[Value::from(key), Value::from(holder)])?;
    Ok(())
}
