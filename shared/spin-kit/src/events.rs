//! Emitting, consuming and relaying events over the outbox and Redis (see
//! `astria_store::outbox` for the design).

use astria_models::EventEnvelope;
use astria_store::outbox::{self, Attempt, RelayPolicy};
use astria_store::{transaction, Db, DbError};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// RFC 3339 UTC time for envelopes.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A new envelope with a fresh id.
pub fn envelope(event_type: &str, payload: &impl serde::Serialize, correlation_id: &str) -> EventEnvelope {
    EventEnvelope {
        id: uuid::Uuid::new_v4().to_string(),
        event_type: event_type.to_string(),
        occurred_at: now_rfc3339(),
        correlation_id: correlation_id.to_string(),
        payload: serde_json::to_string(payload).unwrap_or_else(|_| "null".into()),
        // The emitting span: the consumer continues this trace across the outbox and Redis.
        traceparent: crate::trace::traceparent(),
    }
}

/// An event written to the outbox, to be published once its transaction has committed.
#[derive(Debug, Clone)]
pub struct Pending {
    pub id: String,
    pub channel: String,
    pub json: String,
}

/// Writes `event` to the outbox; call inside the transaction of the change that caused it.
pub fn emit<D: Db + ?Sized>(
    db: &D,
    channel: &str,
    event: &EventEnvelope,
    policy: &RelayPolicy,
) -> Result<Pending, DbError> {
    let json = outbox::enqueue(db, channel, event, now_ms(), policy)?;
    Ok(Pending { id: event.id.clone(), channel: channel.to_string(), json })
}

/// Like [`emit`], unless an event with `event.id` exists already: `None` then (see
/// `outbox::enqueue_once`).
pub fn emit_once<D: Db + ?Sized>(
    db: &D,
    channel: &str,
    event: &EventEnvelope,
    policy: &RelayPolicy,
) -> Result<Option<Pending>, DbError> {
    Ok(outbox::enqueue_once(db, channel, event, now_ms(), policy)?.map(|json| Pending {
        id: event.id.clone(),
        channel: channel.to_string(),
        json,
    }))
}

/// Publishes committed events. A Redis failure is logged and left to the relay: the events are
/// safe in the outbox. Answers how many were published.
pub fn publish<D: Db + ?Sized>(db: &D, redis_url: &str, pending: &[Pending]) -> usize {
    if pending.is_empty() {
        return 0;
    }
    let conn = match spin_sdk::redis::Connection::open(redis_url) {
        Ok(c) => c,
        Err(e) => {
            crate::log::warn(
                "events.publish",
                &format!("redis unavailable, {} event(s) left to the relay: {e:?}", pending.len()),
            );
            leave_to_relay(db, pending);
            return 0;
        }
    };
    publish_with(db, pending, |p| conn.publish(&p.channel, &p.json.as_bytes().to_vec()).map_err(|e| format!("{e:?}")))
}

/// The outbox bookkeeping of [`publish`] over any way of publishing one event: the events that
/// went out are marked published, in one statement; after the first failure, it and the rest
/// are due for the relay at once. The benchmark's native reference server publishes through
/// here with its own Redis client, so that it does the same work.
pub fn publish_with<D: Db + ?Sized>(
    db: &D,
    pending: &[Pending],
    mut send: impl FnMut(&Pending) -> Result<(), String>,
) -> usize {
    let mut published: Vec<&str> = Vec::with_capacity(pending.len());
    for (i, p) in pending.iter().enumerate() {
        if let Err(e) = send(p) {
            crate::log::warn("events.publish", &format!("publishing event {} failed, left to the relay: {e}", p.id));
            leave_to_relay(db, &pending[i..]);
            break;
        }
        published.push(&p.id);
    }
    // Unmarked, an event is only republished by the relay after its grace period: the
    // consumers' claims make that a no-op.
    if let Err(e) = outbox::mark_published_all(db, &published) {
        crate::log::warn("events.publish", &format!("{} event(s) published but not marked: {e}", published.len()));
    }
    published.len()
}

/// Events that never reached Redis are due for the relay's next pass, not after the grace
/// period meant for consumers that are merely slow.
fn leave_to_relay<D: Db + ?Sized>(db: &D, pending: &[Pending]) {
    for p in pending {
        if let Err(e) = outbox::due_at(db, &p.id, now_ms()) {
            crate::log::warn("events.publish", &format!("event {} stays due after its grace period: {e}", p.id));
        }
    }
}

/// Parses a Redis message into an event, or logs why it is dropped (redelivery cannot repair
/// it; a real event is safe in the outbox whatever happens here).
pub fn parse_or_drop(payload: &[u8], consumer: &str) -> Option<EventEnvelope> {
    match astria_domain::events::parse_envelope(payload) {
        Ok(e) => Some(e),
        Err(e) => {
            crate::log::warn(consumer, &format!("dropping a message that is {e}"));
            None
        }
    }
}

/// What happened to one consumed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Consumed {
    /// This consumer acted on the event, and completed it.
    Acted(String),
    /// The event was already claimed: a duplicate delivery or another replica's.
    Duplicate(String),
    /// The payload was not an event envelope; nothing can make it one, so it is dropped.
    Malformed,
}

/// Consumes one Redis message: claims the event for `consumer`, runs `handle`, and marks the
/// event complete, all in one transaction. If `handle` fails, nothing is kept and the relay
/// delivers the event again.
pub fn consume<D, E>(
    db: &D,
    consumer: &str,
    payload: &[u8],
    handle: impl FnOnce(&D, &EventEnvelope) -> Result<(), E>,
) -> Result<Consumed, E>
where
    D: Db + ?Sized,
    E: From<DbError>,
{
    let event: EventEnvelope = match astria_domain::events::parse_envelope(payload) {
        Ok(e) => e,
        Err(e) => {
            // Redelivery cannot repair it; a real event is safe in the outbox whatever happens here.
            crate::log::warn("events.consume", &format!("dropping a message that is {e}"));
            return Ok(Consumed::Malformed);
        }
    };
    transaction(db, |db| {
        if !outbox::claim(db, &event.id, consumer, now_ms())? {
            return Ok(Consumed::Duplicate(event.id.clone()));
        }
        handle(db, &event)?;
        outbox::complete(db, &event.id, now_ms())?;
        Ok(Consumed::Acted(event.id.clone()))
    })
}

/// What one relay pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayReport {
    pub republished: usize,
    pub dead_lettered: usize,
    /// True when Redis could not be reached: nothing was published, nothing was counted.
    pub redis_unavailable: bool,
}

/// Republishes up to `limit` events that are due, backing off and dead-lettering per `policy`.
pub fn relay<D: Db + ?Sized>(
    db: &D,
    redis_url: &str,
    policy: &RelayPolicy,
    limit: i64,
) -> Result<RelayReport, DbError> {
    let mut report = RelayReport::default();
    let due = outbox::due(db, now_ms(), limit)?;
    if due.is_empty() {
        return Ok(report);
    }
    let conn = spin_sdk::redis::Connection::open(redis_url).ok();
    for event in due {
        if event.attempts >= policy.max_attempts {
            if let Some(Attempt::DeadLettered) = outbox::record_attempt(db, &event, now_ms(), policy)? {
                report.dead_lettered += 1;
                crate::log::warn("events.relay", &format!("event {} ({}) dead-lettered", event.id, event.event_type));
            }
            continue;
        }
        let Some(conn) = conn.as_ref() else {
            report.redis_unavailable = true;
            break;
        };
        // Book, then publish: the consumer may complete the event as soon as it is published,
        // and a booking made after that would find it done (see `outbox`'s module docs).
        if outbox::record_attempt(db, &event, now_ms(), policy)?.is_none() {
            continue; // another relay booked it, or it was completed since `due` read it
        }
        if conn.publish(&event.channel, &event.envelope.as_bytes().to_vec()).is_err() {
            // An attempt that never reached Redis must not bring the event closer to the
            // dead-letter state.
            outbox::unbook_attempt(db, &event)?;
            report.redis_unavailable = true;
            break;
        }
        report.republished += 1;
    }
    Ok(report)
}
