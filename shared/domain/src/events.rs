//! Every event the services exchange, and the Redis channel each travels on: the one place
//! that names them.
//!
//! Each event is an [`astria_models::EventEnvelope`] (WIT `events.event-envelope`): a unique
//! `id` (UUID v4, the consumers' dedupe key), a dotted `event_type`, `occurred_at` (RFC 3339
//! UTC), a `correlation_id` tying it to the request or event that caused it, and a JSON
//! `payload`. The envelope's JSON is exactly what is published on Redis and kept in the outbox.
//!
//! Each channel has one consumer service (one Redis-trigger component, any number of
//! replicas; the outbox claim makes one replica act). Channel names get the deployment's
//! `event_channel_prefix` (empty by default) so tests and environments never cross.
//!
//! | channel | event types | consumer |
//! | --- | --- | --- |
//! | `astria.payments` | `order.awaiting_payment`, `checkout.expire`, `payment.refund` | payment-service: creates and expires Checkout sessions, refunds |
//! | `astria.orders` | `order.paid`, `tune.trained`, `tune.reconcile` | image-service trainer: fetches the photos and trains the tune; fetches a trained tune's prompts |
//! | `astria.messages` | `message.send` | message-service sender: calls the WhatsApp API |
//!
//! On every channel the relay also publishes `worker.heartbeat` each minute (not through the
//! outbox: it is only worth something now); every replica books it under its name, which shows
//! a replica whose subscription went deaf (`astria_store::heartbeats`).

/// `order.awaiting_payment`: `{"order_id"}`.
pub const ORDER_AWAITING_PAYMENT: &str = "order.awaiting_payment";
/// `order.paid`: `{"order_id"}`.
pub const ORDER_PAID: &str = "order.paid";
/// `tune.trained`: `{"order_id", "tune_id"}`.
pub const TUNE_TRAINED: &str = "tune.trained";
/// `tune.reconcile`: `{"order_id", "tune_id"}`.
pub const TUNE_RECONCILE: &str = "tune.reconcile";
/// `checkout.expire`: `{"order_id"}`: the order no longer awaits payment; expire its session.
pub const CHECKOUT_EXPIRE: &str = "checkout.expire";
/// `payment.refund`: `{"refund_id"}`: give a payment back (see `store::refunds`).
pub const PAYMENT_REFUND: &str = "payment.refund";
/// `message.send`: `{"message_id", "to", "message"}` (see `conversation::Message`).
pub const MESSAGE_SEND: &str = "message.send";

/// `inbox.wake`: `{}`. The inbox has rows: sent by the webhook after storing one, and by the
/// relay while rows wait. Not an outbox event: the inbox row is the durable part.
pub const INBOX_WAKE: &str = "inbox.wake";

/// Channels, without the deployment prefix.
pub mod channels {
    pub const PAYMENTS: &str = "astria.payments";
    pub const ORDERS: &str = "astria.orders";
    pub const MESSAGES: &str = "astria.messages";
    /// The conversation worker's wake-ups (`inbox.wake`).
    pub const INBOX: &str = "astria.inbox";
    /// Every channel a worker listens on.
    pub const ALL: [&str; 4] = [PAYMENTS, ORDERS, MESSAGES, INBOX];
}

/// `worker.heartbeat`: `{}`. Published by the relay on every channel each minute.
pub const WORKER_HEARTBEAT: &str = "worker.heartbeat";

/// The channel an event type travels on.
pub fn channel_for(event_type: &str) -> Option<&'static str> {
    match event_type {
        ORDER_AWAITING_PAYMENT | CHECKOUT_EXPIRE | PAYMENT_REFUND => Some(channels::PAYMENTS),
        ORDER_PAID | TUNE_TRAINED | TUNE_RECONCILE => Some(channels::ORDERS),
        MESSAGE_SEND => Some(channels::MESSAGES),
        _ => None,
    }
}

/// `prefix` + `channel`, as configured for the deployment.
pub fn channel_name(prefix: &str, channel: &str) -> String {
    format!("{prefix}{channel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_event_type_has_exactly_one_channel() {
        for t in [
            ORDER_AWAITING_PAYMENT,
            CHECKOUT_EXPIRE,
            PAYMENT_REFUND,
            ORDER_PAID,
            TUNE_TRAINED,
            TUNE_RECONCILE,
            MESSAGE_SEND,
        ] {
            assert!(channel_for(t).is_some(), "{t}");
        }
        assert_eq!(channel_for("order.unknown"), None);
        assert_eq!(channel_name("t1-", channels::ORDERS), "t1-astria.orders");
    }
}

/// Why a Redis message is not a usable event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("not an event envelope: {0}")]
    Malformed(String),
    #[error("event envelope without {0}")]
    MissingField(&'static str),
    #[error("event payload is not JSON: {0}")]
    PayloadNotJson(String),
}

/// Parses a Redis message into an envelope, checking what consumers rely on: an id to dedupe
/// on, a type to dispatch on, and a JSON payload. Never panics, whatever the bytes.
pub fn parse_envelope(bytes: &[u8]) -> Result<astria_models::EventEnvelope, EnvelopeError> {
    let e: astria_models::EventEnvelope =
        serde_json::from_slice(bytes).map_err(|err| EnvelopeError::Malformed(err.to_string()))?;
    if e.id.trim().is_empty() {
        return Err(EnvelopeError::MissingField("id"));
    }
    if e.event_type.trim().is_empty() {
        return Err(EnvelopeError::MissingField("event_type"));
    }
    serde_json::from_str::<serde_json::Value>(&e.payload)
        .map_err(|err| EnvelopeError::PayloadNotJson(err.to_string()))?;
    Ok(e)
}

#[cfg(test)]
mod envelope_tests {
    use super::*;
    use proptest::prelude::*;

    fn valid() -> String {
        r#"{"id":"e1","event_type":"order.paid","occurred_at":"2026-11-25T06:00:00Z","correlation_id":"c","payload":"{\"order_id\":\"o1\"}"}"#.into()
    }

    #[test]
    fn a_valid_envelope_parses() {
        assert_eq!(parse_envelope(valid().as_bytes()).unwrap().event_type, ORDER_PAID);
    }

    #[test]
    fn each_defect_has_its_error() {
        assert!(matches!(parse_envelope(b"{"), Err(EnvelopeError::Malformed(_))));
        assert_eq!(
            parse_envelope(valid().replace("\"e1\"", "\" \"").as_bytes()),
            Err(EnvelopeError::MissingField("id"))
        );
        let no_type = valid().replace("order.paid", "");
        assert_eq!(parse_envelope(no_type.as_bytes()), Err(EnvelopeError::MissingField("event_type")));
        let bad_payload = valid().replace(r#""{\"order_id\":\"o1\"}""#, r#""not json""#);
        assert!(matches!(parse_envelope(bad_payload.as_bytes()), Err(EnvelopeError::PayloadNotJson(_))));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_envelope(&bytes);
        }

        #[test]
        fn arbitrary_json_objects_never_panic(
            id in ".{0,8}", t in ".{0,12}", payload in ".{0,24}", extra in proptest::option::of(".{0,8}")
        ) {
            let mut v = serde_json::json!({"id": id, "event_type": t, "occurred_at": "x", "correlation_id": "c", "payload": payload});
            if let Some(x) = extra { v["extra"] = serde_json::Value::String(x); }
            let parsed = parse_envelope(v.to_string().as_bytes());
            if let Ok(e) = parsed {
                prop_assert!(!e.id.trim().is_empty() && !e.event_type.trim().is_empty());
            }
        }
    }
}
