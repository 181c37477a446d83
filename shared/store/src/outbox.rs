//! The durable event outbox, consumer claims and the relay's bookkeeping.
//!
//! Redis pub/sub alone loses a message published while nobody listens, and delivers it to
//! every replica. So an event's truth is its `outbox` row:
//!
//! 1. **Emit**: [`enqueue`] inserts the row in the same transaction as the state change that
//!    caused it (`pending`, due for relay after a grace period); after commit the emitter
//!    publishes the envelope on Redis and calls [`mark_published`].
//! 2. **Consume**: inside one transaction the consumer calls [`claim`] (a primary key on
//!    `(event_id, consumer)`: of three replicas exactly one gets `true`), applies the effects,
//!    and calls [`complete`]. A crash or error rolls all three back together.
//! 3. **Relay**: [`due`] lists events not completed by their due time; for each the relay
//!    books an attempt with [`record_attempt`] (the booking is the relays' lock: of two that
//!    saw the same row, one publishes), then republishes it, and gives the attempt back with
//!    [`unbook_attempt`] if Redis refused it. Attempts back off exponentially; an event that
//!    used up its attempts moves to `dead`, where an operator sees it ([`dead_letters`]) and
//!    can [`replay`] it.
//!
//!    Booking comes before the publish because the consumer may complete the event the
//!    instant it is published: a booking made after it would find the row `done` and the
//!    relay would not know it had delivered it.

use astria_models::EventEnvelope;

use crate::{Db, DbError, Row, Value};

/// Status values of `outbox.status`.
pub mod status {
    pub const PENDING: &str = "pending";
    pub const PUBLISHED: &str = "published";
    pub const DONE: &str = "done";
    pub const DEAD: &str = "dead";
}

/// How the relay paces retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayPolicy {
    /// How long a fresh event may wait for its consumer before the relay republishes it.
    pub grace_ms: i64,
    /// First retry delay; doubles with each attempt.
    pub base_backoff_ms: i64,
    /// Longest retry delay.
    pub max_backoff_ms: i64,
    /// Publishes (first one included) before an event is dead-lettered.
    pub max_attempts: i64,
}

impl Default for RelayPolicy {
    fn default() -> Self {
        RelayPolicy { grace_ms: 30_000, base_backoff_ms: 5_000, max_backoff_ms: 15 * 60_000, max_attempts: 8 }
    }
}

impl RelayPolicy {
    /// Delay before the next try after `attempts` publishes.
    pub fn backoff_ms(&self, attempts: i64) -> i64 {
        let exp = attempts.clamp(1, 30) - 1;
        self.base_backoff_ms.saturating_mul(1i64 << exp).min(self.max_backoff_ms)
    }
}

/// One outbox row as the relay and operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    pub id: String,
    pub channel: String,
    pub event_type: String,
    /// The JSON envelope exactly as published.
    pub envelope: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
}

const COLUMNS: &str = "id, channel, event_type, envelope, status, attempts, next_attempt_at, last_error";

fn from_row(r: &Row) -> Result<OutboxEvent, DbError> {
    Ok(OutboxEvent {
        id: r.text(0)?,
        channel: r.text(1)?,
        event_type: r.text(2)?,
        envelope: r.text(3)?,
        status: r.text(4)?,
        attempts: r.int(5)?,
        next_attempt_at: r.int(6)?,
        last_error: r.opt_text(7)?,
    })
}

/// Records an event to be delivered on `channel`. Call inside the transaction of the change
/// that caused it; publish the returned JSON after commit.
pub fn enqueue<D: Db + ?Sized>(
    db: &D,
    channel: &str,
    event: &EventEnvelope,
    now_ms: i64,
    policy: &RelayPolicy,
) -> Result<String, DbError> {
    insert(db, channel, event, now_ms, policy, "")?.ok_or_else(|| DbError::Decode("an event id written twice".into()))
}

/// Like [`enqueue`], unless an event with this id exists already (of any status): `None`
/// then. For signals that many requests may raise at once and one event answers.
pub fn enqueue_once<D: Db + ?Sized>(
    db: &D,
    channel: &str,
    event: &EventEnvelope,
    now_ms: i64,
    policy: &RelayPolicy,
) -> Result<Option<String>, DbError> {
    insert(db, channel, event, now_ms, policy, " ON CONFLICT (id) DO NOTHING")
}

/// The parameters of an event's outbox row, in the order of [`ROW_COLUMNS`] (and of the
/// function `astria_queue_message`'s last nine, migration 18), with the envelope's JSON.
pub fn row_params(
    channel: &str,
    event: &EventEnvelope,
    now_ms: i64,
    policy: &RelayPolicy,
) -> Result<(Vec<Value>, String), DbError> {
    let envelope = serde_json::to_string(event).map_err(|e| DbError::Decode(e.to_string()))?;
    let params = vec![
        Value::from(event.id.as_str()),
        Value::from(channel),
        Value::from(event.event_type.as_str()),
        Value::from(envelope.as_str()),
        Value::from(event.correlation_id.as_str()),
        Value::Int(now_ms),
        Value::from(status::PENDING),
        Value::Int(now_ms + policy.grace_ms),
        Value::from(order_of(event)),
    ];
    Ok((params, envelope))
}

/// An outbox row's columns: [`row_params`] fills the first nine, `attempts` starts at 0. The
/// function `astria_queue_message` (migration 18) writes the same: a change here is a
/// migration there.
pub(crate) const ROW_COLUMNS: &str = "INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, \
    created_at, status, next_attempt_at, order_id, attempts)";

fn insert<D: Db + ?Sized>(
    db: &D,
    channel: &str,
    event: &EventEnvelope,
    now_ms: i64,
    policy: &RelayPolicy,
    on_conflict: &str,
) -> Result<Option<String>, DbError> {
    let (params, envelope) = row_params(channel, event, now_ms, policy)?;
    let sql = format!("{ROW_COLUMNS} VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 0){on_conflict}");
    let n = db.execute(&db.dialect().sql(&sql), &params)?;
    Ok((n == 1).then_some(envelope))
}

/// The order an event is about, when its payload names one: the console lists an order's
/// events by it (`outbox_by_order`).
fn order_of(event: &EventEnvelope) -> Option<String> {
    let payload: serde_json::Value = serde_json::from_str(&event.payload).ok()?;
    payload.get("order_id")?.as_str().map(String::from)
}

/// Notes the first successful publish. The event stays due for relay until completed.
pub fn mark_published<D: Db + ?Sized>(db: &D, id: &str) -> Result<(), DbError> {
    mark_published_all(db, &[id])
}

/// [`mark_published`] for many events at once: one statement per [`crate::LIST_CHUNK`] events.
pub fn mark_published_all<D: Db + ?Sized>(db: &D, ids: &[&str]) -> Result<(), DbError> {
    for chunk in ids.chunks(crate::LIST_CHUNK) {
        let sql = format!(
            "UPDATE outbox SET status = $1, attempts = attempts + 1 WHERE status = $2 AND id IN ({})",
            crate::placeholders(3, chunk.len())
        );
        let mut values = vec![Value::from(status::PUBLISHED), Value::from(status::PENDING)];
        values.extend(chunk.iter().map(|id| Value::from(*id)));
        db.execute(&db.dialect().sql(&sql), &values)?;
    }
    Ok(())
}

/// Makes an event due for the relay at `at_ms`, unless it is done or dead: after a publish
/// that failed (due at once, not after the grace period), or when a consumer that could not
/// act yet knows when to try again.
pub fn due_at<D: Db + ?Sized>(db: &D, id: &str, at_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql("UPDATE outbox SET next_attempt_at = $1 WHERE id = $2 AND status IN ($3, $4)"),
        &[Value::Int(at_ms), Value::from(id), Value::from(status::PENDING), Value::from(status::PUBLISHED)],
    )?;
    Ok(())
}

/// Like [`due_at`], for a consumer that is alive and acting on the event, only not able to
/// finish it yet (the sender waiting out a WhatsApp outage): the relay's attempts start over,
/// so the consumer's own horizon, not the relay's dead-letter count, decides when to stop.
pub fn retry_at<D: Db + ?Sized>(db: &D, id: &str, at_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql("UPDATE outbox SET next_attempt_at = $1, attempts = 0 WHERE id = $2 AND status IN ($3, $4)"),
        &[Value::Int(at_ms), Value::from(id), Value::from(status::PENDING), Value::from(status::PUBLISHED)],
    )?;
    Ok(())
}

/// Claims `event_id` for `consumer`; `true` means this caller must act, `false` that someone
/// already did (or is doing so in a transaction that will commit first).
pub fn claim<D: Db + ?Sized>(db: &D, event_id: &str, consumer: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "INSERT INTO event_claims (event_id, consumer, claimed_at) VALUES ($1, $2, $3)
             ON CONFLICT (event_id, consumer) DO NOTHING",
        ),
        &[Value::from(event_id), Value::from(consumer), Value::Int(now_ms)],
    )?;
    Ok(n == 1)
}

/// Marks the event delivered: the relay will not send it again.
pub fn complete<D: Db + ?Sized>(db: &D, event_id: &str, now_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql("UPDATE outbox SET status = $1, completed_at = $2 WHERE id = $3"),
        &[Value::from(status::DONE), Value::Int(now_ms), Value::from(event_id)],
    )?;
    Ok(())
}

/// Events whose consumer has not completed them by their due time, oldest first.
pub fn due<D: Db + ?Sized>(db: &D, now_ms: i64, limit: i64) -> Result<Vec<OutboxEvent>, DbError> {
    db.query(
        &db.dialect().sql(&format!(
            "SELECT {COLUMNS} FROM outbox WHERE status IN ($1, $2) AND next_attempt_at <= $3
             ORDER BY next_attempt_at LIMIT $4"
        )),
        &[Value::from(status::PENDING), Value::from(status::PUBLISHED), Value::Int(now_ms), Value::Int(limit)],
    )?
    .iter()
    .map(from_row)
    .collect()
}

/// What the relay should do with a due event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// Publish it now; if it is not completed, it is due again at `next_attempt_at`.
    Publish { next_attempt_at: i64 },
    /// It used up its attempts and is now dead-lettered: do not publish.
    DeadLettered,
}

/// Books one relay attempt for `id`. Conditional on the row still being due, so two relays
/// running at once never both publish it.
pub fn record_attempt<D: Db + ?Sized>(
    db: &D,
    event: &OutboxEvent,
    now_ms: i64,
    policy: &RelayPolicy,
) -> Result<Option<Attempt>, DbError> {
    if event.attempts >= policy.max_attempts {
        let n = db.execute(
            &db.dialect().sql(
                "UPDATE outbox SET status = $1, last_error = $2 WHERE id = $3 AND attempts = $4 AND status IN ($5, $6)",
            ),
            &[
                Value::from(status::DEAD),
                Value::from(format!("not completed after {} attempts", event.attempts)),
                Value::from(event.id.as_str()),
                Value::Int(event.attempts),
                Value::from(status::PENDING),
                Value::from(status::PUBLISHED),
            ],
        )?;
        return Ok((n == 1).then_some(Attempt::DeadLettered));
    }
    let attempts = event.attempts + 1;
    let next = now_ms + policy.backoff_ms(attempts);
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE outbox SET status = $1, attempts = $2, next_attempt_at = $3
             WHERE id = $4 AND attempts = $5 AND status IN ($6, $7)",
        ),
        &[
            Value::from(status::PUBLISHED),
            Value::Int(attempts),
            Value::Int(next),
            Value::from(event.id.as_str()),
            Value::Int(event.attempts),
            Value::from(status::PENDING),
            Value::from(status::PUBLISHED),
        ],
    )?;
    Ok((n == 1).then_some(Attempt::Publish { next_attempt_at: next }))
}

/// Gives back an attempt booked by [`record_attempt`] whose publish never reached Redis, so
/// an outage does not bring the event closer to the dead-letter state: the row returns to what
/// the relay read (`event`), unless someone completed or re-booked it meanwhile.
pub fn unbook_attempt<D: Db + ?Sized>(db: &D, event: &OutboxEvent) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql(
            "UPDATE outbox SET status = $1, attempts = $2, next_attempt_at = $3
             WHERE id = $4 AND attempts = $5 AND status = $6",
        ),
        &[
            Value::from(event.status.as_str()),
            Value::Int(event.attempts),
            Value::Int(event.next_attempt_at),
            Value::from(event.id.as_str()),
            Value::Int(event.attempts + 1),
            Value::from(status::PUBLISHED),
        ],
    )?;
    Ok(())
}

/// Events not yet done whose id starts with `prefix` (signals keyed by their subject, such as
/// an order's callback signals), oldest first.
pub fn undone_with_prefix<D: Db + ?Sized>(db: &D, prefix: &str, limit: i64) -> Result<Vec<OutboxEvent>, DbError> {
    db.query(
        &db.dialect().sql(&format!(
            "SELECT {COLUMNS} FROM outbox WHERE id LIKE $1 AND status IN ($2, $3) ORDER BY created_at LIMIT $4"
        )),
        &[
            Value::from(format!("{prefix}%")),
            Value::from(status::PENDING),
            Value::from(status::PUBLISHED),
            Value::Int(limit),
        ],
    )?
    .iter()
    .map(from_row)
    .collect()
}

/// Dead-lettered events, for operators.
pub fn dead_letters<D: Db + ?Sized>(db: &D, limit: i64) -> Result<Vec<OutboxEvent>, DbError> {
    db.query(
        &db.dialect().sql(&format!("SELECT {COLUMNS} FROM outbox WHERE status = $1 ORDER BY created_at LIMIT $2")),
        &[Value::from(status::DEAD), Value::Int(limit)],
    )?
    .iter()
    .map(from_row)
    .collect()
}

/// Puts a dead-lettered event back in the relay's hands with fresh attempts; `false` if it was
/// not dead.
pub fn replay<D: Db + ?Sized>(db: &D, id: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE outbox SET status = $1, attempts = 0, next_attempt_at = $2, last_error = NULL WHERE id = $3 AND status = $4",
        ),
        &[Value::from(status::PENDING), Value::Int(now_ms), Value::from(id), Value::from(status::DEAD)],
    )?;
    Ok(n == 1)
}

/// One event by id.
pub fn get<D: Db + ?Sized>(db: &D, id: &str) -> Result<Option<OutboxEvent>, DbError> {
    Ok(db
        .query(&db.dialect().sql(&format!("SELECT {COLUMNS} FROM outbox WHERE id = $1")), &[Value::from(id)])?
        .first()
        .map(from_row)
        .transpose()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        let p = RelayPolicy { grace_ms: 0, base_backoff_ms: 1000, max_backoff_ms: 10_000, max_attempts: 5 };
        assert_eq!([1, 2, 3, 4, 5].map(|a| p.backoff_ms(a)), [1000, 2000, 4000, 8000, 10_000]);
        assert_eq!(p.backoff_ms(1000), 10_000);
    }
}
