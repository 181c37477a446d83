//! Draining the inbox (`astria_store::inbox`): the conversation worker's work per wake-up.
//!
//! One drainer at a time, by the `inbox` job lease: rows are worked through strictly in
//! arrival order, so a contact's messages are stepped in the order WhatsApp delivered them,
//! whatever the number of worker replicas. The others return at once.
//!
//! No row is left behind: the webhook wakes the workers after storing a row unless it then saw
//! the lease held or another webhook's wake-up pending (a drainer will take the row: under
//! load this saves a Redis connection per request), and a drainer, after giving the lease back
//! and clearing a pending wake-up (`astria_store::inbox::release`), looks at the inbox once
//! more and drains again if a row came in meanwhile. A webhook that counted on a drain has its
//! row committed before that drain's release completes (`astria_store::inbox::accept` says how
//! on each database), so either the drainer's last look finds the row or the webhook finds
//! nobody coming and wakes someone. A drainer that died holds the lease for at most
//! `LEASE_MS`, a wake-up lost on the way counts as pending for at most a second; the relay
//! wakes the workers every minute while rows wait.
//!
//! Two connections: the app's database for the steps, the inbox's for its rows and its lease
//! (on SQLite a database of its own, on PostgreSQL the same connection; `astria_store::inbox`
//! says why).
//!
//! Rows are read in batches of `BATCH`. Each message's step is its own transaction (a short
//! hold of SQLite's write lock, so webhooks keep storing rows in between); what the batch's
//! steps committed is written once at its end: their events published over one Redis
//! connection and marked in one statement, the rows removed in one statement.

use astria_domain::conversation::Config as ConversationConfig;
use astria_domain::events::{channels, INBOX_WAKE};
use astria_domain::whatsapp;
use astria_models::Pack;
use astria_store::lease::{self, Kind};
use astria_store::{inbox, transaction, Db, Dialect, Grouped};

use crate::error::ApiError;
use crate::events::{now_ms, Pending};
use crate::inbound::{self, Report};

use astria_store::inbox::LEASE;
/// How long a drainer may hold the inbox without renewing; renewed every batch. A drainer that
/// died blocks the inbox for at most this long.
const LEASE_MS: i64 = 60_000;
/// Rows read per batch.
const BATCH: i64 = 100;
/// How long one drain may run before it hands on: a Redis trigger works one message at a time,
/// so a drain that ran on through a long backlog would hold back the sender's messages on the
/// same process. What is left is handed on with a fresh wake-up.
const PASS_MS: i64 = 2_000;

/// What one drain did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Drained {
    /// Another drainer held the inbox: this one did nothing.
    pub busy: bool,
    /// Rows worked through and removed.
    pub rows: usize,
    pub messages: usize,
    pub duplicates: usize,
    pub statuses: usize,
    /// Rows set aside after failing for a reason other than an outage.
    pub set_aside: usize,
    /// The pass ended on its time bound with rows left: the caller wakes a worker for them.
    pub more: bool,
}

impl Drained {
    fn add(&mut self, r: &Report) {
        self.rows += 1;
        self.messages += r.messages;
        self.duplicates += r.duplicates;
        self.statuses += r.statuses;
    }
}

/// What a drain needs beside the database.
pub struct Settings<'a> {
    pub phone_number_id: &'a str,
    pub packs: &'a [Pack],
    pub conversation: &'a ConversationConfig,
    /// Who drains (the lease holder): unique per invocation.
    pub holder: &'a str,
}

/// Works the inbox through until it is empty, if no other drainer holds it. An outage stops
/// the drain with the error, the row kept for the next wake-up (the relay sends one while rows
/// wait); any other failure is booked on the row and, after `inbox::MAX_ATTEMPTS`, sets it
/// aside so that the rows behind it go on.
pub fn drain<D: Db, I: Db + ?Sized>(
    db: &D,
    ib: &I,
    s: &Settings,
    mut publish: impl FnMut(&D, &[Pending]),
) -> Result<Drained, ApiError> {
    let mut out = Drained::default();
    loop {
        if !lease::acquire(ib, Kind::Job, LEASE, s.holder, now_ms(), LEASE_MS)? {
            out.busy = true;
            return Ok(out);
        }
        let result = drain_held(db, ib, s, &mut publish, &mut out, now_ms() + PASS_MS);
        // A release that fails (the database went away) lets the lease lapse instead.
        let _ = inbox::release(ib, s.holder);
        result?;
        if out.more {
            return Ok(out);
        }
        // A webhook that stored a row after the last look saw the lease held and woke nobody
        // (`inbox::accept`): look once more, now that the lease is given back.
        if inbox::next(ib, 1)?.is_empty() {
            return Ok(out);
        }
    }
}

/// Tells the conversation workers that the inbox has rows: after the webhook stored one, and
/// from the relay while rows wait (Redis was down, a worker died). Best effort by design: the
/// rows are the durable part.
pub fn wake(redis_url: &str, correlation_id: &str) -> Result<(), String> {
    let event = crate::events::envelope(INBOX_WAKE, &serde_json::json!({}), correlation_id);
    let json = serde_json::to_vec(&event).map_err(|e| e.to_string())?;
    let conn = spin_sdk::redis::Connection::open(redis_url).map_err(|e| format!("{e:?}"))?;
    conn.publish(channels::INBOX, &json).map_err(|e| format!("{e:?}"))
}

/// The relay's part: a wake-up if any row waits in the inbox (`ib`); answers how many wait.
pub fn wake_if_waiting<I: Db + ?Sized>(ib: &I, redis_url: &str, correlation_id: &str) -> Result<i64, ApiError> {
    let (waiting, _) = inbox::backlog(ib)?;
    if waiting > 0 {
        wake(redis_url, correlation_id).map_err(|detail| ApiError::Unavailable {
            dependency: "redis",
            detail: format!("inbox wake-up: {detail}"),
        })?;
    }
    Ok(waiting)
}

/// Works batches through while the lease is held. What a batch's steps committed is written
/// at its end, even when it stopped on an error: its events published (one Redis connection,
/// one statement marking them) and its rows removed (one statement). A row stepped but not yet
/// removed when the drainer dies is stepped again by the next: a no-op, as every step is.
fn drain_held<D: Db, I: Db + ?Sized>(
    db: &D,
    ib: &I,
    s: &Settings,
    publish: &mut impl FnMut(&D, &[Pending]),
    out: &mut Drained,
    until_ms: i64,
) -> Result<(), ApiError> {
    loop {
        let entries = inbox::next(ib, BATCH)?;
        if entries.is_empty() {
            return Ok(());
        }
        let mut batch = Batch::default();
        let worked = work_batch(db, ib, s, &entries, &mut batch, out, until_ms);
        publish(db, &batch.pending);
        let removed = inbox::done_all(ib, &batch.done);
        worked?;
        removed?;
        if out.more {
            return Ok(());
        }
        if !lease::renew(ib, Kind::Job, LEASE, s.holder, now_ms(), LEASE_MS)? {
            // It lapsed and another drainer has it: it goes on from here.
            return Ok(());
        }
    }
}

/// What a batch leaves to write at its end.
#[derive(Default)]
struct Batch {
    /// Rows worked through, to remove.
    done: Vec<String>,
    /// Events their steps committed, to publish.
    pending: Vec<Pending>,
}

/// Works a batch through. On PostgreSQL, first as one transaction (`Grouped`): the steps see
/// each other's effects as they would one after the other, and a commit with its WAL flush
/// and two statements per step are saved; its row locks hold the sender back at most for the
/// batch. Should any row fail in it, nothing of it is kept and the batch is worked step by
/// step, as on SQLite, where one transaction would hold the single write lock, and with it
/// every webhook, for the whole batch.
fn work_batch<D: Db, I: Db + ?Sized>(
    db: &D,
    ib: &I,
    s: &Settings,
    entries: &[inbox::Entry],
    batch: &mut Batch,
    out: &mut Drained,
    until_ms: i64,
) -> Result<(), ApiError> {
    if db.dialect() == Dialect::Postgres {
        let (before, done, pending) = (out.clone(), batch.done.len(), batch.pending.len());
        match transaction(db, |db| work_steps(&Grouped(db), ib, s, entries, batch, out, until_ms)) {
            Ok(()) => return Ok(()),
            Err(e) => {
                // Rolled back: nothing the group counted, removed or published happened.
                *out = before;
                batch.done.truncate(done);
                batch.pending.truncate(pending);
                crate::log::warn("inbox", &format!("a batch failed as one transaction, stepping it row by row: {e}"))
            }
        }
    }
    work_steps(db, ib, s, entries, batch, out, until_ms)
}

/// The batch row by row, each step in its own transaction; or, on a `Grouped` connection, all
/// in the caller's, where the first failure fails the batch (the rows are then worked again
/// step by step, and a failure is booked on its row in the inbox, `ib`).
fn work_steps<D: Db, I: Db + ?Sized>(
    db: &D,
    ib: &I,
    s: &Settings,
    entries: &[inbox::Entry],
    batch: &mut Batch,
    out: &mut Drained,
    until_ms: i64,
) -> Result<(), ApiError> {
    for entry in entries {
        // Looked at per row (no statement), so a pass, and with it the work under the
        // lease, stays within a step of the bound.
        if now_ms() > until_ms {
            out.more = true;
            return Ok(());
        }
        let parsed = whatsapp::parse_webhook(entry.body.as_bytes(), s.phone_number_id);
        let hook = match parsed {
            Ok(hook) => hook,
            Err(e) if db.grouped() => {
                return Err(ApiError::BadRequest(format!("webhook {} does not parse: {e:?}", entry.id)))
            }
            Err(e) => {
                // The webhook parsed this body before storing it, so only a row it did not
                // write (or a parser an upgrade changed) fails here. Nothing will make it
                // parse: set aside for operators.
                inbox::set_aside(ib, &entry.id, &format!("{e:?}"), now_ms())?;
                crate::log::error_with("inbox", &entry.request_id, &format!("webhook {} set aside: {e:?}", entry.id));
                out.set_aside += 1;
                continue;
            }
        };
        let collect = |_: &D, pending: &[Pending]| batch.pending.extend_from_slice(pending);
        match inbound::handle(db, &hook, s.packs, s.conversation, &entry.request_id, collect) {
            Ok(report) => {
                batch.done.push(entry.id.clone());
                out.add(&report);
            }
            Err(e @ ApiError::Unavailable { .. }) => return Err(e),
            Err(e) if db.grouped() => return Err(e),
            Err(e) => {
                let detail = match &e {
                    ApiError::Internal(cause) => format!("{cause:#}"),
                    other => other.to_string(),
                };
                if inbox::failed(ib, &entry.id, &detail, now_ms())? {
                    crate::log::error_with(
                        "inbox",
                        &entry.request_id,
                        &format!("webhook {} set aside after {} failed steps: {detail}", entry.id, inbox::MAX_ATTEMPTS),
                    );
                    out.set_aside += 1;
                    continue;
                }
                // Kept in place, so the contact's later messages wait behind it.
                return Err(e);
            }
        }
    }
    Ok(())
}
