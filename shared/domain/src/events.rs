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
//! | `astria.payments` | `order.awaiting_payment` | payment-service: creates the Checkout session |
//! | `astria.orders` | `order.paid` | image-service: fetches the photos, trains the tune |
//! | `astria.messages` | `message.send` | message-service sender: calls the WhatsApp API |

/// `order.awaiting_payment`: `{"order_id"}`.
pub const ORDER_AWAITING_PAYMENT: &str = "order.awaiting_payment";
/// `order.paid`: `{"order_id"}`.
pub const ORDER_PAID: &str = "order.paid";
/// `message.send`: `{"message_id", "to", "message"}` (see `conversation::Message`).
pub const MESSAGE_SEND: &str = "message.send";

/// Channels, without the deployment prefix.
pub mod channels {
    pub const PAYMENTS: &str = "astria.payments";
    pub const ORDERS: &str = "astria.orders";
    pub const MESSAGES: &str = "astria.messages";
}

/// The channel an event type travels on.
pub fn channel_for(event_type: &str) -> Option<&'static str> {
    match event_type {
        ORDER_AWAITING_PAYMENT => Some(channels::PAYMENTS),
        ORDER_PAID => Some(channels::ORDERS),
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
        for t in [ORDER_AWAITING_PAYMENT, ORDER_PAID, MESSAGE_SEND] {
            assert!(channel_for(t).is_some(), "{t}");
        }
        assert_eq!(channel_for("order.unknown"), None);
        assert_eq!(channel_name("t1-", channels::ORDERS), "t1-astria.orders");
    }
}
