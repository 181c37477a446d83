//! The inbox: WhatsApp webhooks accepted but not yet worked through.
//!
//! The webhook (`POST /SmsReceived`) only checks the signature, parses, and [`accept`]s the
//! signed body here, durable before its 200, learning in the same statement whether a worker
//! is draining or must be woken; the conversation worker (`components/conversation-worker`)
//! then takes the rows in arrival order and runs the conversation step for each. So the
//! webhook's cost no longer grows with the step's, and a burst waits here instead of in front
//! of Meta.
//!
//! A row is the raw body, keyed by its SHA-256: Meta's redelivery of the same body is one row.
//! Working a row through is idempotent (messages are deduped on their WhatsApp id, a status
//! applies once), so a worker that dies half-way leaves the row to be taken again: at least
//! once here, exactly once in effect. A row whose step keeps failing for a reason that is not
//! an outage is set aside ([`set_aside`]) after [`MAX_ATTEMPTS`], so one bad body cannot stall
//! every customer behind it; operators see it in the metrics and the log.
//!
//! Where the inbox lives: on PostgreSQL, a table of the app's database. On SQLite, a database
//! of its own (Spin's `inbox` label; schema `migrations::INBOX_MIGRATIONS`), with the inbox's
//! job lease beside it: SQLite has one writer per file, so in the app's file every webhook
//! waited for the conversation steps' write lock, and Spin's new connection per request
//! parsed the app's whole schema for an insert into one table (`docs/performance.md`). Every
//! function here takes the inbox's connection; rows an earlier release left in the app's
//! file are moved over by [`adopt`].

use crate::{Db, DbError, Value};

/// The job lease (`lease::Kind::Job`) a drainer holds: one drainer at a time.
pub const LEASE: &str = "inbox";

/// Failed steps (other than outages) before a row is set aside.
pub const MAX_ATTEMPTS: i64 = 5;

/// A row to work through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub body: String,
    pub request_id: String,
    pub received_at: i64,
    pub attempts: i64,
}

/// What [`accept`] did with a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The same body waits in the inbox already (Meta's redelivery): nothing stored.
    Duplicate,
    /// Stored. `draining`: a conversation worker held the inbox (its job lease, named
    /// [`LEASE`]) when the row went in, so that worker takes the row and nobody need be woken.
    New { draining: bool },
}

/// Stores a signed webhook body under `id` (its SHA-256), unless that body is here already,
/// and says whether a worker is draining the inbox. Outside any transaction: the row commits
/// on its own, durable before the webhook's 200. One statement on either database.
///
/// The drainer, after giving the lease back ([`release`]), looks at the inbox once more
/// (`spin_kit::inbox`), so a webhook that saw the lease held must have its row committed
/// before that look: either the drainer's look finds the row, or the webhook finds the lease
/// free and wakes a worker.
/// - SQLite: `RETURNING` the lease check. The statement holds the write lock throughout, so a
///   release is wholly before or after it.
/// - PostgreSQL: the function `astria_inbox_accept` (migration 19): the insert, then [`GATE`]
///   taken shared, then the lease read in a snapshot of its own; the lock is held until the
///   row commits. [`release`] takes [`GATE`] exclusively, so it waits for every webhook that
///   may have seen the lease held to commit its row, and a webhook that comes after it reads
///   the lease released. Webhooks do not wait for each other, nor for the drainer's renewals.
///   This relies on READ COMMITTED, PostgreSQL's default and the app's: a function then reads
///   each statement in a snapshot of its own (under REPEATABLE READ the lease read would see the
///   snapshot from before the wait, and a row could wait for the relay's next minute).
///   (Reading the lease row `FOR SHARE` instead made every webhook wait for each renewal: with
///   the whole app at 500 webhooks/s the replies fell a minute behind, a benchmark run of
///   8881cb7 in `docs/performance.md`. Two autocommitted statements, the insert and then the
///   read, were correct too, at twice the round trips and plans: before migration 19.)
pub fn accept<D: Db + ?Sized>(
    db: &D,
    id: &str,
    body: &str,
    request_id: &str,
    now_ms: i64,
) -> Result<Accepted, DbError> {
    let row = [Value::from(id), Value::from(body), Value::from(request_id), Value::Int(now_ms), Value::from(LEASE)];
    // 0: a duplicate, 1: stored, 2: stored while a worker drains.
    let answer = match db.dialect() {
        // RETURNING answers whether the row is new (no row on a conflict) in the same
        // statement: no `SELECT changes()` on the hot path.
        crate::Dialect::Sqlite => {
            let sql = format!("{INSERT} RETURNING CASE WHEN {DRAINING} THEN 2 ELSE 1 END");
            let rows = db.query(&db.dialect().sql(&sql), &row)?;
            match rows.first() {
                Some(stored) => stored.int(0)?,
                None => 0,
            }
        }
        crate::Dialect::Postgres => {
            let rows = db.query("SELECT astria_inbox_accept($1, $2, $3, $4, $5)", &row)?;
            rows.first().ok_or_else(|| DbError::Decode("astria_inbox_accept answered no row".into()))?.int(0)?
        }
    };
    Ok(match answer {
        0 => Accepted::Duplicate,
        n => Accepted::New { draining: n == 2 },
    })
}

/// The insert of [`accept`], on both databases (PostgreSQL's function holds it word for word:
/// `migrations`' tests check).
pub(crate) const INSERT: &str =
    "INSERT INTO inbox (id, body, request_id, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING";

/// Whether a worker holds the inbox's lease ($5 its name, $4 now), as [`accept`] asks on both
/// databases (PostgreSQL's function holds it word for word, after the gate).
pub(crate) const DRAINING: &str = "EXISTS (SELECT 1 FROM job_leases WHERE name = $5 AND lease_until > $4)";

/// PostgreSQL's advisory lock (transaction scope) between [`accept`] and [`release`]: shared by
/// webhooks, exclusive for a release.
pub const GATE: i64 = 0x61_73_74_72_69_62; // "astrib"

/// A drainer gives the inbox's lease back, outside any transaction. On PostgreSQL the function
/// `astria_inbox_release` (migration 19) first waits, holding [`GATE`], for every webhook that
/// may have read the lease held to commit its row ([`accept`] says why), then deletes the
/// lease: one autocommitted call, so the lock, which every new webhook waits behind, is held
/// for one round trip and never across a transaction left open between the guest's calls.
pub fn release<D: Db + ?Sized>(db: &D, holder: &str) -> Result<(), DbError> {
    debug_assert!(!db.grouped(), "the lease is given back after the batch's transaction");
    match db.dialect() {
        crate::Dialect::Sqlite => crate::lease::release(db, crate::lease::Kind::Job, LEASE, holder),
        crate::Dialect::Postgres => {
            db.query("SELECT astria_inbox_release($1, $2)", &[Value::from(LEASE), Value::from(holder)])?;
            Ok(())
        }
    }
}

/// Up to `limit` rows in arrival order (ties, requests that arrived in the same millisecond,
/// have no order of their own), rows set aside excluded.
pub fn next<D: Db + ?Sized>(db: &D, limit: i64) -> Result<Vec<Entry>, DbError> {
    db.query(
        &db.dialect().sql(
            "SELECT id, body, request_id, received_at, attempts FROM inbox WHERE set_aside_at IS NULL
             ORDER BY received_at, id LIMIT $1",
        ),
        &[Value::Int(limit)],
    )?
    .iter()
    .map(|r| {
        Ok(Entry {
            id: r.text(0)?,
            body: r.text(1)?,
            request_id: r.text(2)?,
            received_at: r.int(3)?,
            attempts: r.int(4)?,
        })
    })
    .collect()
}

/// The row has been worked through.
pub fn done<D: Db + ?Sized>(db: &D, id: &str) -> Result<(), DbError> {
    done_all(db, &[id.to_string()])
}

/// The rows have been worked through: one statement per [`crate::LIST_CHUNK`] rows, so a drain
/// removes a whole batch at once.
pub fn done_all<D: Db + ?Sized>(db: &D, ids: &[String]) -> Result<(), DbError> {
    delete_ids(db, "inbox", ids)
}

/// Deletes the rows of `table` (`inbox`, `inbox_legacy`) with these ids, a statement per
/// [`crate::LIST_CHUNK`].
fn delete_ids<D: Db + ?Sized>(db: &D, table: &str, ids: &[String]) -> Result<(), DbError> {
    for chunk in ids.chunks(crate::LIST_CHUNK) {
        let sql = format!("DELETE FROM {table} WHERE id IN ({})", crate::placeholders(1, chunk.len()));
        let values: Vec<Value> = chunk.iter().map(|id| Value::from(id.as_str())).collect();
        db.execute(&db.dialect().sql(&sql), &values)?;
    }
    Ok(())
}

/// Books a failed step; answers `true` when that was the last allowed and the row is now set
/// aside.
pub fn failed<D: Db + ?Sized>(db: &D, id: &str, error: &str, now_ms: i64) -> Result<bool, DbError> {
    let rows = db.query(
        &db.dialect().sql(
            "UPDATE inbox SET attempts = attempts + 1, last_error = $2,
             set_aside_at = CASE WHEN attempts + 1 >= $3 THEN CAST($4 AS BIGINT) ELSE NULL END
             WHERE id = $1 RETURNING set_aside_at",
        ),
        &[Value::from(id), Value::from(error), Value::Int(MAX_ATTEMPTS), Value::Int(now_ms)],
    )?;
    Ok(rows.first().map(|r| r.opt_int(0)).transpose()?.flatten().is_some())
}

/// Sets a row aside at once (a body that can never be worked through).
pub fn set_aside<D: Db + ?Sized>(db: &D, id: &str, error: &str, now_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql("UPDATE inbox SET last_error = $2, set_aside_at = $3 WHERE id = $1"),
        &[Value::from(id), Value::from(error), Value::Int(now_ms)],
    )?;
    Ok(())
}

/// How many rows wait and when the oldest arrived: the backlog the relay wakes the worker for,
/// and the metrics export. Reads the arrival index only.
pub fn backlog<D: Db + ?Sized>(db: &D) -> Result<(i64, Option<i64>), DbError> {
    let rows = db.query("SELECT COUNT(*), MIN(received_at) FROM inbox WHERE set_aside_at IS NULL", &[])?;
    let row = rows.first().ok_or_else(|| DbError::Decode("no row from COUNT".into()))?;
    Ok((row.int(0)?, row.opt_int(1)?))
}

/// Rows set aside, for operators.
pub fn set_aside_count<D: Db + ?Sized>(db: &D) -> Result<i64, DbError> {
    let rows = db.query("SELECT COUNT(*) FROM inbox WHERE set_aside_at IS NOT NULL", &[])?;
    rows.first().ok_or_else(|| DbError::Decode("no row from COUNT".into()))?.int(0)
}

/// Rows [`adopt`] reads per statement.
const ADOPT_BATCH: i64 = 100;

/// Migrates the inbox's database (`migrations::migrate_inbox`) and, on SQLite, when that
/// creates the inbox, moves in the rows an earlier release left in the app's database
/// (`inbox_legacy`, migration 21) in the same transaction: it holds the inbox's write lock, so
/// no webhook stores a row, and no drainer takes one, before the earlier rows are in, and they
/// keep their place in arrival order. Then removes them from the app's database. Call with
/// the app's database migrated. Answers the rows moved.
pub fn migrate_adopting<D: Db + ?Sized, I: Db + ?Sized>(app: &D, inbox: &I, now_ms: i64) -> Result<usize, DbError> {
    if inbox.dialect() != crate::Dialect::Sqlite || app.dialect() != crate::Dialect::Sqlite {
        crate::migrations::migrate_inbox(inbox, now_ms)?;
        return Ok(0);
    }
    let (ids, moved) = crate::transaction(inbox, |ib| {
        let ib = crate::Grouped(ib);
        if crate::migrations::migrate_inbox(&ib, now_ms)?.is_empty() {
            return Ok((vec![], 0));
        }
        copy_legacy(app, &ib)
    })?;
    delete_ids(app, "inbox_legacy", &ids)?;
    Ok(moved)
}

/// SQLite: moves the rows an earlier release left in the app's database into the inbox's own,
/// as they were (arrival time, attempts, set aside or not), and answers how many were new.
/// [`migrate_adopting`] does this as the inbox is created; this is for what a move cut short
/// left (the copy committed, the delete not), and runs from the relay every minute. Each row
/// is moved once ever: the inbox's database remembers the ids it took (`inbox_adopted`), so a
/// row copied again after it was worked through and removed is not stepped a second time (a
/// preference would otherwise be applied again over a newer one). PostgreSQL has one
/// database: nothing to do.
pub fn adopt<D: Db + ?Sized, I: Db + ?Sized>(app: &D, inbox: &I) -> Result<usize, DbError> {
    if app.dialect() != crate::Dialect::Sqlite || inbox.dialect() != crate::Dialect::Sqlite {
        return Ok(0);
    }
    // Almost always nothing: one read, rather than the inbox's write lock every minute.
    if app.query("SELECT 1 FROM inbox_legacy LIMIT 1", &[])?.is_empty() {
        return Ok(0);
    }
    let (ids, moved) = crate::transaction(inbox, |ib| copy_legacy(app, ib))?;
    delete_ids(app, "inbox_legacy", &ids)?;
    Ok(moved)
}

/// Copies every row of `inbox_legacy` not taken before into the inbox, inside the caller's
/// transaction on `inbox`; answers the ids read (to delete) and how many rows were new.
fn copy_legacy<D: Db + ?Sized, I: Db + ?Sized>(app: &D, inbox: &I) -> Result<(Vec<String>, usize), DbError> {
    let (mut ids, mut moved) = (Vec::new(), 0);
    let mut after = (i64::MIN, String::new());
    loop {
        let rows = app.query(
            "SELECT id, body, request_id, received_at, attempts, last_error, set_aside_at FROM inbox_legacy
             WHERE (received_at, id) > (?1, ?2) ORDER BY received_at, id LIMIT ?3",
            &[Value::Int(after.0), Value::from(after.1.as_str()), Value::Int(ADOPT_BATCH)],
        )?;
        for r in &rows {
            let id = r.text(0)?;
            moved += inbox.execute(
                "INSERT INTO inbox (id, body, request_id, received_at, attempts, last_error, set_aside_at)
                 SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE NOT EXISTS (SELECT 1 FROM inbox_adopted WHERE id = ?1)
                 ON CONFLICT (id) DO NOTHING",
                &r.0,
            )? as usize;
            inbox.execute(
                "INSERT INTO inbox_adopted (id) VALUES (?1) ON CONFLICT (id) DO NOTHING",
                &[Value::from(id.as_str())],
            )?;
            after = (r.int(3)?, id.clone());
            ids.push(id);
        }
        if (rows.len() as i64) < ADOPT_BATCH {
            return Ok((ids, moved));
        }
    }
}
