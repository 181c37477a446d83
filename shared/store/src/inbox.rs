//! The inbox: WhatsApp webhooks accepted but not yet worked through.
//!
//! The webhook (`POST /SmsReceived`) only checks the signature, parses, and [`accept`]s the signed
//! body here, durable before its 200, learning in the same statement whether a worker is draining,
//! is on its way (a wake-up pending), or must be woken; the conversation worker
//! (`components/conversation-worker`) then takes the rows in arrival order and runs the
//! conversation step for each. So the webhook's cost no longer grows with the step's, and a burst
//! waits here instead of in front of Meta.
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

/// What [`accept`] did with a body, and who takes the row if it is new.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// The same body waits in the inbox already (Meta's redelivery): nothing stored.
    Duplicate,
    /// Stored while a conversation worker held the inbox (its job lease, named [`LEASE`]): that
    /// worker takes the row, nobody need be woken.
    Draining,
    /// Stored while a wake-up another webhook published is pending ([`WAKE`]): the worker it
    /// brings takes the row, nobody need be woken again.
    WakePending,
    /// Stored, and no worker is on its way: the caller claims the wake-up ([`claim_wake`]) and,
    /// if it gets it, publishes it.
    NeedsWake,
}

/// Stores a signed webhook body under `id` (its SHA-256), unless that body is here already,
/// and says whether a worker will take it without a wake-up from this webhook. Outside any
/// transaction: the row commits on its own, durable before the webhook's 200. One statement
/// on either database.
///
/// A webhook that wakes nobody relies on a drainer taking the inbox's lease after its row
/// went in, or looking at the inbox once more after giving the lease back ([`release`] and
/// `spin_kit::inbox`). So its row must be committed before the release that ends the drain it
/// counted on, or before the release it would have seen:
/// - `Draining`: the drainer looks once more after its release.
/// - `WakePending`: a webhook claimed a wake-up ([`claim_wake`]; it publishes it next, or
///   gives the claim up if it cannot) since the lease was last given back (a release clears
///   the marker), at most [`WAKE_PENDING_MS`] ago. The worker it brings takes the lease after
///   this row went in (the lease was free then) and reads the inbox, or its release waits for
///   the row and it looks once more; should it find another drainer holding the lease, that
///   one took it after this row went in too, or holds a lease that lapsed without a release
///   (a drainer that died, or clocks that disagree). A wake-up that reaches no worker (none
///   listening, or the one case before) leaves the row to the first webhook after the marker
///   lapses, or to the relay's minute.
///
/// How the release is ordered against the statement:
/// - SQLite: `RETURNING` the lease and marker checks. The statement holds the write lock
///   throughout, so a release is wholly before or after it.
/// - PostgreSQL: the function `astria_inbox_accept` (migrations 19 and 22): the insert, then
///   [`GATE`] taken shared, then the lease and the marker read in a snapshot of their own; the
///   lock is held until the row commits. [`release`] takes [`GATE`] exclusively, so it waits
///   for every webhook that may have counted on its drain to commit its row, and a webhook
///   that comes after it reads the lease released and the marker cleared. Webhooks do not wait
///   for each other, nor for the drainer's renewals. This relies on READ COMMITTED,
///   PostgreSQL's default and the app's: a function then reads each statement in a snapshot of
///   its own (under REPEATABLE READ the reads would see the snapshot from before the wait, and
///   a row could wait for the relay's next minute).
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
    let row = [
        Value::from(id),
        Value::from(body),
        Value::from(request_id),
        Value::Int(now_ms),
        Value::from(LEASE),
        Value::from(WAKE),
    ];
    // 0: a duplicate, 1: stored, 2: stored while a worker drains, 3: stored while a wake-up is
    // pending.
    let answer = match db.dialect() {
        // RETURNING answers whether the row is new (no row on a conflict) in the same
        // statement: no `SELECT changes()` on the hot path.
        crate::Dialect::Sqlite => {
            let sql = format!("{INSERT} RETURNING CASE WHEN {DRAINING} THEN 2 WHEN {WAKING} THEN 3 ELSE 1 END");
            let rows = db.query(&db.dialect().sql(&sql), &row)?;
            match rows.first() {
                Some(stored) => stored.int(0)?,
                None => 0,
            }
        }
        crate::Dialect::Postgres => {
            let rows = db.query("SELECT astria_inbox_accept($1, $2, $3, $4, $5, $6)", &row)?;
            rows.first().ok_or_else(|| DbError::Decode("astria_inbox_accept answered no row".into()))?.int(0)?
        }
    };
    Ok(match answer {
        0 => Accepted::Duplicate,
        2 => Accepted::Draining,
        3 => Accepted::WakePending,
        _ => Accepted::NeedsWake,
    })
}

/// The insert of [`accept`], on both databases (PostgreSQL's function holds it word for word:
/// `migrations`' tests check).
pub(crate) const INSERT: &str =
    "INSERT INTO inbox (id, body, request_id, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING";

/// Whether a worker holds the inbox's lease ($5 its name, $4 now), as [`accept`] asks on both
/// databases (PostgreSQL's function holds it word for word, after the gate). Up to its last
/// millisecond, as `lease::acquire` refuses it until then: a wake-up is never sent to a lease
/// no worker can take.
pub(crate) const DRAINING: &str = "EXISTS (SELECT 1 FROM job_leases WHERE name = $5 AND lease_until >= $4)";

/// Whether a wake-up is pending ($6 [`WAKE`], $4 now), asked after [`DRAINING`] (PostgreSQL's
/// function holds it word for word). Up to its last millisecond, as [`claim_wake`] refuses to
/// take it over until then: a webhook that finds it lapsed can always claim the next.
pub(crate) const WAKING: &str = "EXISTS (SELECT 1 FROM job_leases WHERE name = $6 AND lease_until >= $4)";

/// The marker of a pending wake-up: a job lease (`lease::Kind::Job`) beside the inbox's, held
/// by the webhook that publishes the wake-up ([`claim_wake`]) for [`WAKE_PENDING_MS`], cleared
/// by every [`release`]. While it is held, webhooks wake nobody: under load, without it, every
/// request that found no drainer opened a Redis connection and sent one more worker to find
/// the lease taken (`docs/performance.md`).
pub const WAKE: &str = "inbox_wake";

/// How long a wake-up counts as pending: longer than a worker usually takes to be woken and
/// take the lease (a worker lagging behind, busy with an earlier message, only means a wake-up
/// more once it lapses), short enough that a wake-up that reaches no worker costs the rows
/// behind it about a second rather than the relay's minute. Publishing counts, whether or not
/// a worker listens: with none listening (a worker SpinApp restarting), a wake-up per request
/// would reach nobody either, and the relay wakes the workers while rows wait.
pub const WAKE_PENDING_MS: i64 = 1_000;

/// After [`accept`] answered [`Accepted::NeedsWake`]: marks a wake-up pending on behalf of
/// `holder` (the request), unless another webhook's is already. That one was claimed after
/// this webhook's [`accept`] found none, so its wake-up brings a drainer that reads this row
/// (on PostgreSQL, should it read before the row commits, its release waits for the row under
/// [`GATE`]). `true`: publish it. A second statement, only while no worker is draining or on
/// its way.
pub fn claim_wake<D: Db + ?Sized>(db: &D, holder: &str, now_ms: i64) -> Result<bool, DbError> {
    crate::lease::acquire(db, crate::lease::Kind::Job, WAKE, holder, now_ms, WAKE_PENDING_MS)
}

/// The wake-up `holder` claimed could not be published (Redis is down): clears the marker, so
/// the next webhook tries again rather than counting on a wake-up that never left.
pub fn unclaim_wake<D: Db + ?Sized>(db: &D, holder: &str) -> Result<(), DbError> {
    crate::lease::release(db, crate::lease::Kind::Job, WAKE, holder)
}

/// PostgreSQL's advisory lock (transaction scope) between [`accept`] and [`release`]: shared by
/// webhooks, exclusive for a release.
pub const GATE: i64 = 0x61_73_74_72_69_62; // "astrib"

/// A drainer gives the inbox's lease back, and clears a pending wake-up's marker ([`WAKE`]: a
/// wake-up published during the drain may have found the lease taken, and brings nobody), in
/// one statement outside any transaction. On PostgreSQL the function `astria_inbox_release`
/// (migration 22) first waits, holding [`GATE`], for every webhook that may have counted on
/// this drain to commit its row ([`accept`] says why), then deletes both: one autocommitted
/// call, so the lock, which every new webhook waits behind, is held for one round trip and
/// never across a transaction left open between the guest's calls.
pub fn release<D: Db + ?Sized>(db: &D, holder: &str) -> Result<(), DbError> {
    debug_assert!(!db.grouped(), "the lease is given back after the batch's transaction");
    let args = [Value::from(LEASE), Value::from(holder), Value::from(WAKE)];
    match db.dialect() {
        crate::Dialect::Sqlite => db.execute(&db.dialect().sql(RELEASE), &args).map(drop),
        crate::Dialect::Postgres => db.query("SELECT astria_inbox_release($1, $2, $3)", &args).map(drop),
    }
}

/// [`release`]'s statement ($1 the inbox's lease, $2 its holder, $3 [`WAKE`]); PostgreSQL's
/// function holds it word for word, after the gate.
pub(crate) const RELEASE: &str = "DELETE FROM job_leases WHERE (name = $1 AND holder = $2) OR name = $3";

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
