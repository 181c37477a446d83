//! Queuing WhatsApp messages from any component: the message row and its `message.send` event
//! are written in the caller's transaction, so a message decided is a message sent (by the
//! message sender, see `astria_store::messages`).

use astria_domain::conversation::Message;
use astria_domain::events::{channels, MESSAGE_SEND};
use astria_models::{MessageSend, OrderStatus};
use astria_store::messages::{self, NewMessage};
use astria_store::outbox::RelayPolicy;
use astria_store::{Db, DbError};

use crate::events::{emit, envelope, now_ms, Pending};

/// Queues `message` to `to`; `index` orders messages queued in the same transaction. Publish
/// the answer after commit.
pub fn queue<D: Db + ?Sized>(
    db: &D,
    to: &str,
    message: &Message,
    index: usize,
    correlation_id: &str,
) -> Result<Pending, DbError> {
    queue_with(db, &uuid::Uuid::new_v4().to_string(), to, message, index, correlation_id, false)
}

/// Like [`queue`], under a message id the caller chose (a portrait's, recorded with its image
/// so that the order can be found from the message).
pub fn queue_as<D: Db + ?Sized>(
    db: &D,
    id: &str,
    to: &str,
    message: &Message,
    index: usize,
    correlation_id: &str,
) -> Result<Pending, DbError> {
    queue_with(db, id, to, message, index, correlation_id, false)
}

/// Like [`queue`], for the one message sent even though the contact opted out: the
/// confirmation of their STOP.
pub fn queue_always<D: Db + ?Sized>(
    db: &D,
    to: &str,
    message: &Message,
    index: usize,
    correlation_id: &str,
) -> Result<Pending, DbError> {
    queue_with(db, &uuid::Uuid::new_v4().to_string(), to, message, index, correlation_id, true)
}

fn queue_with<D: Db + ?Sized>(
    db: &D,
    id: &str,
    to: &str,
    message: &Message,
    index: usize,
    correlation_id: &str,
    always_send: bool,
) -> Result<Pending, DbError> {
    let now = now_ms();
    let json = serde_json::to_string(message).map_err(|e| DbError::Decode(e.to_string()))?;
    let event = envelope(
        MESSAGE_SEND,
        &MessageSend { message_id: id.to_string(), to: to.to_string(), message: json.clone() },
        correlation_id,
    );
    let new = NewMessage {
        id,
        wa_id: to,
        seq: sequence(now, index),
        kind: message.kind(),
        message: &json,
        event_id: &event.id,
        correlation_id,
        always_send,
        traceparent: event.traceparent.as_deref(),
    };
    // The row and its event together: on PostgreSQL one call of a function that keeps its plan
    // (a step queues one or two replies; `messages::insert_with_event` says why).
    let json = messages::insert_with_event(db, &new, now, channels::MESSAGES, &event, &RelayPolicy::default())?;
    Ok(Pending { id: event.id.clone(), channel: channels::MESSAGES.to_string(), json })
}

/// Puts the contact's messages that waited for the 24-hour window back in the queue (the
/// contact just wrote, so the window is open), ahead of anything queued after.
pub fn requeue_awaiting_window<D: Db + ?Sized>(
    db: &D,
    wa_id: &str,
    correlation_id: &str,
) -> Result<Vec<Pending>, DbError> {
    requeue(db, wa_id, messages::status::AWAITING_WINDOW, correlation_id)
}

/// Puts the messages kept back while the contact had opted out back in the queue (they sent
/// START): the portraits of a paid order reach them after all.
pub fn release_held<D: Db + ?Sized>(db: &D, wa_id: &str, correlation_id: &str) -> Result<Vec<Pending>, DbError> {
    requeue(db, wa_id, messages::status::HELD, correlation_id)
}

/// Marks message `m` failed (its event completed, so nothing sends it again) and logs it for
/// operators. Call inside a transaction.
pub fn fail<D: Db + ?Sized>(
    db: &D,
    m: &messages::OutboundMessage,
    code: Option<i64>,
    detail: &str,
    correlation_id: &str,
    now: i64,
) -> Result<(), DbError> {
    messages::mark_failed(db, &m.id, code, detail, now)?;
    astria_store::outbox::complete(db, &m.event_id, now)?;
    crate::log::error_with(
        "whatsapp.rejected",
        correlation_id,
        &format!("message {} ({}) not delivered: {detail}", m.id, m.kind),
    );
    Ok(())
}

/// Gives message `m` up for good ([`fail`]). If it carried a portrait, its order becomes
/// `delivery_failed` with the refund flagged (and, with `auto_refund`, asked for): answers the
/// refund's events to publish. Call inside a transaction.
#[allow(clippy::too_many_arguments)]
pub fn give_up<D: Db + ?Sized>(
    db: &D,
    m: &messages::OutboundMessage,
    code: Option<i64>,
    detail: &str,
    auto_refund: bool,
    correlation_id: &str,
    now: i64,
) -> Result<Vec<Pending>, DbError> {
    fail(db, m, code, detail, correlation_id, now)?;
    let Some(order_id) = messages::portrait_order(db, &m.id)? else { return Ok(vec![]) };
    let from = [OrderStatus::Training, OrderStatus::Delivering];
    let issue = format!("delivery-failed:{order_id}");
    let why = format!("WhatsApp did not take portrait message {}: {detail}", m.id);
    let failed = crate::refunds::fail_order(
        db,
        &order_id,
        &from,
        OrderStatus::DeliveryFailed,
        &issue,
        &why,
        auto_refund,
        correlation_id,
        now,
    )?;
    let Some(pending) = failed else { return Ok(vec![]) };
    crate::log::error_with(
        "whatsapp.delivery_failed",
        correlation_id,
        &format!("order {order_id} delivery_failed, refund flagged: {why}"),
    );
    Ok(pending)
}

/// Queues the failed portraits of an order again (an operator's resend after
/// `delivery_failed`), each under a fresh event, with its tries and horizon starting over; the
/// order is delivered when the last is accepted. Answers the events to publish (none if no
/// portrait of the order is failed).
pub fn resend_portraits<D: Db + ?Sized>(db: &D, order_id: &str, correlation_id: &str) -> Result<Vec<Pending>, DbError> {
    let mut pending = Vec::new();
    for m in messages::failed_portraits(db, order_id)? {
        let event = envelope(
            MESSAGE_SEND,
            &MessageSend { message_id: m.id.clone(), to: m.wa_id.clone(), message: m.message.clone() },
            correlation_id,
        );
        if messages::resend_failed(db, &m.id, &event.id, now_ms())? {
            pending.push(emit(db, channels::MESSAGES, &event, &RelayPolicy::default())?);
        }
    }
    Ok(pending)
}

fn requeue<D: Db + ?Sized>(db: &D, wa_id: &str, parked: &str, correlation_id: &str) -> Result<Vec<Pending>, DbError> {
    let mut pending = Vec::new();
    for m in messages::parked(db, wa_id, parked)? {
        let event = envelope(
            MESSAGE_SEND,
            &MessageSend { message_id: m.id.clone(), to: m.wa_id.clone(), message: m.message.clone() },
            correlation_id,
        );
        if messages::requeue_parked(db, &m.id, &event.id, parked, now_ms())? {
            pending.push(emit(db, channels::MESSAGES, &event, &RelayPolicy::default())?);
        }
    }
    Ok(pending)
}

/// Queue position: time first, then the order within one transaction.
fn sequence(now_ms: i64, index: usize) -> i64 {
    now_ms.saturating_mul(1000).saturating_add(index.min(999) as i64)
}
