//! Outbound WhatsApp messages: queued in the transaction that decided them, sent by the
//! message sender, tracked until WhatsApp reports them delivered, read or failed.
//!
//! - **Queue**: [`insert`] stores the message (`queued`) together with its `message.send`
//!   outbox event; `seq` orders a contact's messages.
//! - **Send**: the sender takes the contact's lease ([`acquire_lease`]; one sender per contact
//!   keeps messages in order across replicas), then works through [`next_in_queue`], booking
//!   each answer: [`mark_sent`], [`schedule_retry`], [`mark_failed`], or
//!   [`mark_awaiting_window`] when the 24-hour window has closed.
//! - **Window**: messages awaiting the window are [`requeue_awaiting_window`]d when the contact
//!   writes again.
//! - **Statuses**: [`record_delivery`] applies WhatsApp's status webhooks, forward only.
//!
//! A message is sent at most once unless the sender dies between WhatsApp's answer and the
//! commit that books it (the lease then expires and the message is sent again): WhatsApp has no
//! idempotency key, and a duplicate beats a lost payment link.

use astria_models::EventEnvelope;

use crate::outbox::{self, RelayPolicy};
use crate::{Db, DbError, Row, Value};

/// Values of `outbound_messages.status`.
pub mod status {
    pub const QUEUED: &str = "queued";
    pub const SENT: &str = "sent";
    pub const AWAITING_WINDOW: &str = "awaiting_window";
    /// The customer sent STOP: kept, not sent, until they send START.
    pub const HELD: &str = "held";
    pub const FAILED: &str = "failed";
}

/// A message to queue.
pub struct NewMessage<'a> {
    pub id: &'a str,
    pub wa_id: &'a str,
    /// Position among the contact's messages (the sender sends in `seq` order).
    pub seq: i64,
    pub kind: &'a str,
    /// The message as JSON (`astria_domain::conversation::Message`).
    pub message: &'a str,
    /// The `message.send` outbox event that triggers the sender.
    pub event_id: &'a str,
    pub correlation_id: &'a str,
    /// Sent even to a contact who opted out (only the confirmation of their STOP).
    pub always_send: bool,
    /// W3C `traceparent` of the span queuing it (the event's), kept for the sender's span.
    pub traceparent: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboundMessage {
    pub id: String,
    pub wa_id: String,
    pub seq: i64,
    pub kind: String,
    pub message: String,
    pub status: String,
    pub event_id: String,
    pub correlation_id: String,
    /// Failed tries so far.
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub wamid: Option<String>,
    pub delivery_status: Option<String>,
    pub error_code: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    /// Sent even to a contact who opted out (the confirmation of their STOP).
    pub always_send: bool,
    /// When it last entered the queue: the sender's retry horizon counts from here.
    pub queued_at: i64,
    /// W3C `traceparent` of the span that queued it (its event's): the sender sends it in a
    /// span of that trace without reading the event. None for a message queued before
    /// migration 20.
    pub traceparent: Option<String>,
}

const COLUMNS: &str = "id, wa_id, seq, kind, message, status, event_id, correlation_id, attempts, next_attempt_at,
    wamid, delivery_status, error_code, last_error, created_at, always_send, COALESCE(queued_at, created_at), traceparent";

fn from_row(r: &Row) -> Result<OutboundMessage, DbError> {
    Ok(OutboundMessage {
        id: r.text(0)?,
        wa_id: r.text(1)?,
        seq: r.int(2)?,
        kind: r.text(3)?,
        message: r.text(4)?,
        status: r.text(5)?,
        event_id: r.text(6)?,
        correlation_id: r.text(7)?,
        attempts: r.int(8)?,
        next_attempt_at: r.int(9)?,
        wamid: r.opt_text(10)?,
        delivery_status: r.opt_text(11)?,
        error_code: r.opt_int(12)?,
        last_error: r.opt_text(13)?,
        created_at: r.int(14)?,
        always_send: r.int(15)? != 0,
        queued_at: r.int(16)?,
        traceparent: r.opt_text(17)?,
    })
}

fn select<D: Db + ?Sized>(db: &D, filter: &str, params: &[Value]) -> Result<Vec<OutboundMessage>, DbError> {
    db.query(&db.dialect().sql(&format!("SELECT {COLUMNS} FROM outbound_messages {filter}")), params)?
        .iter()
        .map(from_row)
        .collect()
}

/// Queues a message; `false` if one with this id exists already.
pub fn insert<D: Db + ?Sized>(db: &D, m: &NewMessage<'_>, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(&db.dialect().sql(INSERT), &insert_params(m, now_ms))?;
    Ok(n == 1)
}

/// Queues a message with the event that sends it; answers the event's JSON. Call inside a
/// transaction. A message id queued before is left as it is, and the event still recorded.
///
/// On PostgreSQL one call of the function `astria_queue_message` (migrations 18 and 20: the
/// message's insert as a CTE of the event's, planned once per session;
/// `identity::recognise_first` says why); SQLite runs the two statements.
pub fn insert_with_event<D: Db + ?Sized>(
    db: &D,
    m: &NewMessage<'_>,
    now_ms: i64,
    channel: &str,
    event: &EventEnvelope,
    policy: &RelayPolicy,
) -> Result<String, DbError> {
    if db.dialect() == crate::Dialect::Sqlite {
        insert(db, m, now_ms)?;
        return outbox::enqueue(db, channel, event, now_ms, policy);
    }
    let (event_params, envelope) = outbox::row_params(channel, event, now_ms, policy)?;
    let params: Vec<Value> = insert_params(m, now_ms).into_iter().chain(event_params).collect();
    let sql = format!("SELECT astria_queue_message({})", crate::placeholders(1, params.len()));
    match db.query(&sql, &params)?.first().map(|r| r.int(0)).transpose()? {
        Some(1) => Ok(envelope),
        _ => Err(DbError::Decode("an event id written twice".into())),
    }
}

// `seq` is the caller's (time, then order within its transaction), but never at or below the
// contact's last: two steps of one contact can fall in the same millisecond, and their replies
// must still go in the order they were decided. The function `astria_queue_message`
// (migration 20) holds the same insert: a change here is a migration there.
pub(crate) const INSERT: &str =
    "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id,
        attempts, next_attempt_at, created_at, updated_at, always_send, queued_at, traceparent)
     VALUES ($1, $2,
        (SELECT CASE WHEN COALESCE(MAX(seq), -1) >= $3 THEN MAX(seq) + 1 ELSE $3 END
         FROM outbound_messages WHERE wa_id = $2),
        $4, $5, $6, $7, $8, 0, $9, $9, $9, $10, $9, $11)
     ON CONFLICT (id) DO NOTHING";

fn insert_params(m: &NewMessage<'_>, now_ms: i64) -> Vec<Value> {
    vec![
        Value::from(m.id),
        Value::from(m.wa_id),
        Value::Int(m.seq),
        Value::from(m.kind),
        Value::from(m.message),
        Value::from(status::QUEUED),
        Value::from(m.event_id),
        Value::from(m.correlation_id),
        Value::Int(now_ms),
        Value::Int(m.always_send.into()),
        Value::from(m.traceparent),
    ]
}

/// Keeps a queued message back because its contact opted out; `false` if it was not queued.
pub fn hold<D: Db + ?Sized>(db: &D, id: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql("UPDATE outbound_messages SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4"),
        &[Value::from(status::HELD), Value::Int(now_ms), Value::from(id), Value::from(status::QUEUED)],
    )?;
    Ok(n == 1)
}

pub fn get<D: Db + ?Sized>(db: &D, id: &str) -> Result<Option<OutboundMessage>, DbError> {
    Ok(select(db, "WHERE id = $1", &[Value::from(id)])?.into_iter().next())
}

/// The contact's first queued message, due or not (a message waiting for its retry holds back
/// the ones after it, so they arrive in order).
pub fn next_in_queue<D: Db + ?Sized>(db: &D, wa_id: &str) -> Result<Option<OutboundMessage>, DbError> {
    Ok(queue_head(db, wa_id, 1)?.into_iter().next())
}

/// The contact's first `n` queued messages, in order ([`next_in_queue`] and what follows it:
/// a sender that sees nothing behind the message it sends need not read the queue again
/// before giving the lease back).
pub fn queue_head<D: Db + ?Sized>(db: &D, wa_id: &str, n: i64) -> Result<Vec<OutboundMessage>, DbError> {
    select(
        db,
        "WHERE wa_id = $1 AND status = $2 ORDER BY seq, created_at, id LIMIT $3",
        &[Value::from(wa_id), Value::from(status::QUEUED), Value::Int(n)],
    )
}

/// Takes (or renews) the right to send to `wa_id` until `now + lease_ms`; `false` while another
/// holder's lease runs.
pub fn acquire_lease<D: Db + ?Sized>(
    db: &D,
    wa_id: &str,
    holder: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<bool, DbError> {
    crate::lease::acquire(db, crate::lease::Kind::Send, wa_id, holder, now_ms, lease_ms)
}

pub fn release_lease<D: Db + ?Sized>(db: &D, wa_id: &str, holder: &str) -> Result<(), DbError> {
    crate::lease::release(db, crate::lease::Kind::Send, wa_id, holder)
}

fn update<D: Db + ?Sized>(db: &D, set: &str, id: &str, params: &[Value]) -> Result<bool, DbError> {
    let mut all = params.to_vec();
    all.push(Value::from(id));
    all.push(Value::from(status::QUEUED));
    let n = params.len();
    let sql = format!("UPDATE outbound_messages SET {set} WHERE id = ${} AND status = ${}", n + 1, n + 2);
    Ok(db.execute(&db.dialect().sql(&sql), &all)? == 1)
}

/// WhatsApp accepted the message. Only a queued message can become sent.
pub fn mark_sent<D: Db + ?Sized>(db: &D, id: &str, wamid: &str, now_ms: i64) -> Result<bool, DbError> {
    update(
        db,
        "status = $1, wamid = $2, sent_at = $3, updated_at = $3, error_code = NULL, last_error = NULL",
        id,
        &[Value::from(status::SENT), Value::from(wamid), Value::Int(now_ms)],
    )
}

/// A temporary failure: try again at `next_attempt_at`.
pub fn schedule_retry<D: Db + ?Sized>(
    db: &D,
    id: &str,
    code: Option<i64>,
    detail: &str,
    next_attempt_at: i64,
    now_ms: i64,
) -> Result<bool, DbError> {
    update(
        db,
        "attempts = attempts + 1, next_attempt_at = $1, error_code = $2, last_error = $3, updated_at = $4",
        id,
        &[Value::Int(next_attempt_at), Value::from(code), Value::from(detail), Value::Int(now_ms)],
    )
}

/// A failure retrying cannot fix; kept for an operator.
pub fn mark_failed<D: Db + ?Sized>(
    db: &D,
    id: &str,
    code: Option<i64>,
    detail: &str,
    now_ms: i64,
) -> Result<bool, DbError> {
    update(
        db,
        "status = $1, attempts = attempts + 1, error_code = $2, last_error = $3, updated_at = $4",
        id,
        &[Value::from(status::FAILED), Value::from(code), Value::from(detail), Value::Int(now_ms)],
    )
}

/// Outside the 24-hour window: kept until the contact writes again.
pub fn mark_awaiting_window<D: Db + ?Sized>(db: &D, id: &str, code: Option<i64>, now_ms: i64) -> Result<bool, DbError> {
    update(
        db,
        "status = $1, error_code = $2, updated_at = $3",
        id,
        &[Value::from(status::AWAITING_WINDOW), Value::from(code), Value::Int(now_ms)],
    )
}

/// Whether a template went (or is going) to `wa_id` at or after `since_ms`: one invitation per
/// closed window is enough.
pub fn template_since<D: Db + ?Sized>(db: &D, wa_id: &str, since_ms: i64) -> Result<bool, DbError> {
    let rows = db.query(
        &db.dialect().sql(
            "SELECT COUNT(*) FROM outbound_messages
             WHERE wa_id = $1 AND kind = 'template' AND created_at >= $2 AND status IN ($3, $4)",
        ),
        &[Value::from(wa_id), Value::Int(since_ms), Value::from(status::QUEUED), Value::from(status::SENT)],
    )?;
    Ok(rows.first().map(|r| r.int(0)).transpose()?.unwrap_or(0) > 0)
}

/// The contact's messages kept back in `parked` (`awaiting_window` or `held`), in queue order.
pub fn parked<D: Db + ?Sized>(db: &D, wa_id: &str, parked: &str) -> Result<Vec<OutboundMessage>, DbError> {
    select(
        db,
        "WHERE wa_id = $1 AND status = $2 ORDER BY seq, created_at, id",
        &[Value::from(wa_id), Value::from(parked)],
    )
}

/// Puts a message kept back in `parked` (by the window, or by STOP) into the queue again, under
/// a fresh outbox event; `false` if another request did it first.
pub fn requeue_parked<D: Db + ?Sized>(
    db: &D,
    id: &str,
    event_id: &str,
    parked: &str,
    now_ms: i64,
) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE outbound_messages SET status = $1, event_id = $2, next_attempt_at = $3, updated_at = $3,
                queued_at = $3, attempts = 0
             WHERE id = $4 AND status = $5",
        ),
        &[Value::from(status::QUEUED), Value::from(event_id), Value::Int(now_ms), Value::from(id), Value::from(parked)],
    )?;
    Ok(n == 1)
}

/// Queues a `failed` message again under a fresh outbox event (an operator's resend), with
/// its tries and retry horizon starting over; `false` if it is not failed.
pub fn resend_failed<D: Db + ?Sized>(db: &D, id: &str, event_id: &str, now_ms: i64) -> Result<bool, DbError> {
    requeue_parked(db, id, event_id, status::FAILED, now_ms)
}

/// The order whose portrait message `id` carries, if it carries one.
pub fn portrait_order<D: Db + ?Sized>(db: &D, id: &str) -> Result<Option<String>, DbError> {
    let rows =
        db.query(&db.dialect().sql("SELECT order_id FROM generated_images WHERE message_id = $1"), &[Value::from(id)])?;
    rows.first().map(|r| r.text(0)).transpose()
}

/// The portrait `from` carried is carried by `to` from now on (an image resent as a document).
pub fn move_portrait<D: Db + ?Sized>(db: &D, from: &str, to: &str) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql("UPDATE generated_images SET message_id = $2 WHERE message_id = $1"),
        &[Value::from(from), Value::from(to)],
    )?;
    Ok(())
}

/// Queued messages whose send event was dead-lettered (the sender kept failing on it, or
/// was down past the relay's attempts): nothing would wake the sender for them any more.
pub fn queued_with_dead_event<D: Db + ?Sized>(db: &D, limit: i64) -> Result<Vec<OutboundMessage>, DbError> {
    select(
        db,
        "WHERE status = $1 AND event_id IN (SELECT id FROM outbox WHERE status = $2) ORDER BY seq LIMIT $3",
        &[Value::from(status::QUEUED), Value::from(crate::outbox::status::DEAD), Value::Int(limit)],
    )
}

/// The failed portrait messages of an order, in queue order (what a resend sends again).
pub fn failed_portraits<D: Db + ?Sized>(db: &D, order_id: &str) -> Result<Vec<OutboundMessage>, DbError> {
    select(
        db,
        "WHERE status = $1 AND id IN (SELECT message_id FROM generated_images WHERE order_id = $2)
         ORDER BY seq, created_at, id",
        &[Value::from(status::FAILED), Value::from(order_id)],
    )
}

/// A message kept back (`held`) after STOP, and the order whose portrait it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub id: String,
    pub wa_id: String,
    pub order_id: Option<String>,
}

/// Messages held since before `before_ms`: their contact sent STOP and has not written START
/// since. Portraits name their order.
pub fn held_since<D: Db + ?Sized>(db: &D, before_ms: i64, limit: i64) -> Result<Vec<Held>, DbError> {
    db.query(
        &db.dialect().sql(
            "SELECT m.id, m.wa_id, g.order_id FROM outbound_messages m
             LEFT JOIN generated_images g ON g.message_id = m.id
             WHERE m.status = $1 AND m.updated_at < $2 ORDER BY m.updated_at, m.id LIMIT $3",
        ),
        &[Value::from(status::HELD), Value::Int(before_ms), Value::Int(limit)],
    )?
    .iter()
    .map(|r| Ok(Held { id: r.text(0)?, wa_id: r.text(1)?, order_id: r.opt_text(2)? }))
    .collect()
}

/// Gives up on one held message (the contact never sent START): it becomes `failed` with the
/// reason, so a START much later does not bring it, and the cleanup may remove it. `false` if
/// it is no longer held (START came first).
pub fn give_up_held<D: Db + ?Sized>(db: &D, id: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE outbound_messages SET status = $1, last_error = $2, updated_at = $3 WHERE id = $4 AND status = $5",
        ),
        &[
            Value::from(status::FAILED),
            Value::from("held after STOP for longer than held_give_up_days: the contact never sent START"),
            Value::Int(now_ms),
            Value::from(id),
            Value::from(status::HELD),
        ],
    )?;
    Ok(n == 1)
}

/// What [`record_delivery`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The message as it was before.
    pub message: OutboundMessage,
    /// Whether this call moved its delivery status: of two concurrent webhooks carrying the
    /// same status, exactly one gets `true`, so only one acts on it.
    pub changed: bool,
}

/// Applies a status webhook to the message WhatsApp calls `wamid`, if `newer` says the status
/// moves it forward. The change is conditional on the status read, so concurrent webhooks
/// cannot both apply the same step. `None` if the message is not ours.
pub fn record_delivery<D: Db + ?Sized>(
    db: &D,
    wamid: &str,
    delivery_status: &str,
    error_code: Option<i64>,
    newer: impl Fn(Option<&str>, &str) -> bool,
    now_ms: i64,
) -> Result<Option<Delivery>, DbError> {
    let Some(m) = select(db, "WHERE wamid = $1", &[Value::from(wamid)])?.into_iter().next() else {
        return Ok(None);
    };
    if !newer(m.delivery_status.as_deref(), delivery_status) {
        return Ok(Some(Delivery { message: m, changed: false }));
    }
    let mut params = vec![Value::from(delivery_status), Value::Int(now_ms), Value::from(m.id.as_str())];
    // Only a failure carries a code; other statuses keep the code already recorded.
    let set_code = match error_code {
        Some(code) => {
            params.push(Value::Int(code));
            format!(", error_code = ${}", params.len())
        }
        None => String::new(),
    };
    let same_status = match &m.delivery_status {
        Some(old) => {
            params.push(Value::from(old.as_str()));
            format!("delivery_status = ${}", params.len())
        }
        None => "delivery_status IS NULL".to_string(),
    };
    let n = db.execute(
        &db.dialect().sql(&format!(
            "UPDATE outbound_messages SET delivery_status = $1, updated_at = $2{set_code} WHERE id = $3 AND {same_status}"
        )),
        &params,
    )?;
    Ok(Some(Delivery { message: m, changed: n == 1 }))
}

/// Moves a sent message whose delivery failed because the window had closed back to waiting
/// for the window (WhatsApp may report 131047 in a status webhook rather than in its answer).
pub fn reopen_for_window<D: Db + ?Sized>(db: &D, id: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql("UPDATE outbound_messages SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4"),
        &[Value::from(status::AWAITING_WINDOW), Value::Int(now_ms), Value::from(id), Value::from(status::SENT)],
    )?;
    Ok(n == 1)
}

/// Messages in `status`, newest first, for operators.
pub fn list<D: Db + ?Sized>(db: &D, status: &str, limit: i64) -> Result<Vec<OutboundMessage>, DbError> {
    select(db, "WHERE status = $1 ORDER BY updated_at DESC LIMIT $2", &[Value::from(status), Value::Int(limit)])
}

/// Messages to one contact in queue order (tests and operators).
pub fn for_contact<D: Db + ?Sized>(db: &D, wa_id: &str) -> Result<Vec<OutboundMessage>, DbError> {
    select(db, "WHERE wa_id = $1 ORDER BY seq, created_at, id", &[Value::from(wa_id)])
}

/// The newest `limit` messages to one contact, in queue order (the operator console).
pub fn latest_for_contact<D: Db + ?Sized>(db: &D, wa_id: &str, limit: i64) -> Result<Vec<OutboundMessage>, DbError> {
    let mut newest = select(
        db,
        "WHERE wa_id = $1 ORDER BY seq DESC, created_at DESC, id DESC LIMIT $2",
        &[Value::from(wa_id), Value::Int(limit)],
    )?;
    newest.reverse();
    Ok(newest)
}

/// When the last message to the contact was accepted by WhatsApp (ms), for pacing.
pub fn last_sent_at<D: Db + ?Sized>(db: &D, wa_id: &str) -> Result<Option<i64>, DbError> {
    let rows = db.query(
        &db.dialect().sql("SELECT MAX(sent_at) FROM outbound_messages WHERE wa_id = $1 AND status = $2"),
        &[Value::from(wa_id), Value::from(status::SENT)],
    )?;
    Ok(rows.first().map(|r| r.opt_int(0)).transpose()?.flatten())
}

/// The contact's last inbound message time (ms), which opens WhatsApp's 24-hour window.
pub fn last_inbound_at<D: Db + ?Sized>(db: &D, wa_id: &str) -> Result<Option<i64>, DbError> {
    let rows =
        db.query(&db.dialect().sql("SELECT last_inbound_at FROM contacts WHERE wa_id = $1"), &[Value::from(wa_id)])?;
    Ok(rows.first().map(|r| r.opt_int(0)).transpose()?.flatten())
}
