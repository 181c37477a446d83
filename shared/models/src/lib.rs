//! The data models every astria-bot service shares, generated from `wit/models.wit`.
//!
//! The WIT file is the single definition; this crate only runs `wit-bindgen` over it (types
//! only: the interfaces have no functions) and adds serde derives, so that the same structs are
//! the JSON wire format of events and health answers. Use the re-exports below rather than the
//! generated module paths.

#[allow(clippy::all, missing_docs)]
mod generated {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "astria-bot:models/models",
        additional_derives: [serde::Serialize, serde::Deserialize, PartialEq, Eq],
        generate_all,
        generate_unused_types: true,
    });
}

pub use generated::astria_bot::models::domain::{Contact, GeneratedImage, Money, Order, OrderStatus, Pack, Photo};
pub use generated::astria_bot::models::events::{
    CheckoutExpire, EventEnvelope, MessageSend, OrderAwaitingPayment, OrderPaid, PaymentRefund, TuneReconcile,
    TuneTrained,
};
pub use generated::astria_bot::models::health::{DependencyCheck, HealthReport, HealthStatus};

/// Every order status, in lifecycle order (`wit/models.wit`): for whatever must cover each (the
/// metrics export every one; tests check each).
pub const ORDER_STATUSES: [OrderStatus; 10] = {
    use OrderStatus::*;
    [
        CollectingPhotos,
        AwaitingPayment,
        Paid,
        Training,
        Delivering,
        DeliveryFailed,
        Delivered,
        Expired,
        Cancelled,
        Failed,
    ]
};

impl HealthReport {
    /// A report whose status follows its checks: `ok` when all pass, `down` otherwise.
    pub fn from_checks(service: &str, version: &str, checks: Vec<DependencyCheck>) -> Self {
        let status = if checks.iter().all(|c| c.ok) { HealthStatus::Ok } else { HealthStatus::Down };
        HealthReport { service: service.to_string(), version: version.to_string(), status, checks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T>(value: &T) -> T
    where
        T: serde::Serialize + serde::de::DeserializeOwned,
    {
        let json = serde_json::to_string(value).expect("serialises");
        serde_json::from_str(&json).expect("deserialises")
    }

    #[test]
    fn health_report_survives_a_json_round_trip() {
        let report = HealthReport {
            service: "message".into(),
            version: "0.1.0".into(),
            status: HealthStatus::Degraded,
            checks: vec![
                DependencyCheck { name: "database".into(), ok: true, detail: None },
                DependencyCheck { name: "redis".into(), ok: false, detail: Some("connection refused".into()) },
            ],
        };
        assert_eq!(round_trip(&report), report);
    }

    #[test]
    fn every_health_status_survives_a_json_round_trip() {
        for status in [HealthStatus::Ok, HealthStatus::Degraded, HealthStatus::Down] {
            assert_eq!(round_trip(&status), status);
        }
    }

    #[test]
    fn event_envelope_survives_a_json_round_trip() {
        let event = EventEnvelope {
            id: "0b6f1c1e-2a8e-4c55-9a57-6f3f2a9d7c10".into(),
            event_type: "order.paid".into(),
            occurred_at: "2026-11-25T06:00:00Z".into(),
            correlation_id: "req-42".into(),
            payload: r#"{"order_id":"o-1","emoji":"📸"}"#.into(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        assert_eq!(round_trip(&event), event);
    }

    #[test]
    fn an_envelope_stored_before_traces_were_carried_still_parses() {
        let old = r#"{"id":"e","event_type":"order.paid","occurred_at":"o","correlation_id":"c","payload":"{}"}"#;
        let event: EventEnvelope = serde_json::from_str(old).unwrap();
        assert_eq!(event.traceparent, None);
    }

    #[test]
    fn every_event_payload_survives_a_json_round_trip() {
        let a = OrderAwaitingPayment { order_id: "o-1".into() };
        assert_eq!(round_trip(&a), a);
        let p = OrderPaid { order_id: "o-1".into(), payment_event_id: "evt_1".into() };
        assert_eq!(round_trip(&p), p);
        let m = MessageSend {
            message_id: "m-1".into(),
            to: "16505551234".into(),
            message: r#"{"kind":"text","body":"hi"}"#.into(),
        };
        assert_eq!(round_trip(&m), m);
    }

    #[test]
    fn event_envelope_json_uses_snake_case_field_names() {
        let event = EventEnvelope {
            id: "e".into(),
            event_type: "t".into(),
            occurred_at: "o".into(),
            correlation_id: "c".into(),
            payload: "{}".into(),
            traceparent: None,
        };
        let value = serde_json::to_value(&event).unwrap();
        for key in ["id", "event_type", "occurred_at", "correlation_id", "payload"] {
            assert!(value.get(key).is_some(), "missing {key} in {value}");
        }
    }

    fn sample_order() -> Order {
        Order {
            id: "ord_01".into(),
            wa_id: "16505551234".into(),
            pack_id: "corporate".into(),
            subject_class: Some("woman".into()),
            photos: vec![Photo { media_id: "m1".into(), mime_type: "image/jpeg".into(), sha256: "ab".repeat(32) }],
            status: OrderStatus::Training,
            price: Money { amount_minor: 1999, currency: "usd".into() },
            paid: Some(Money { amount_minor: 1999, currency: "usd".into() }),
            checkout_session_id: Some("cs_test_1".into()),
            checkout_url: Some("https://checkout.stripe.com/c/pay/cs_test_1".into()),
            astria_tune_id: Some(123456),
            created_at: "2026-11-25T06:00:00Z".into(),
            updated_at: "2026-11-25T06:05:00Z".into(),
        }
    }

    #[test]
    fn order_survives_a_json_round_trip() {
        assert_eq!(round_trip(&sample_order()), sample_order());
    }

    #[test]
    fn every_order_status_survives_a_json_round_trip() {
        for s in crate::ORDER_STATUSES {
            assert_eq!(round_trip(&s), s);
        }
    }

    #[test]
    fn contact_pack_and_generated_image_survive_a_json_round_trip() {
        let contact = Contact {
            wa_id: "16505551234".into(),
            profile_name: Some("Zoë".into()),
            opted_out: false,
            last_inbound_at: Some("2026-11-25T06:00:00Z".into()),
        };
        assert_eq!(round_trip(&contact), contact);
        let pack = Pack {
            id: "corporate".into(),
            title: "Corporate headshots".into(),
            description: "Clean, professional portraits".into(),
            astria_pack_id: 260,
            subject_classes: vec!["man".into(), "woman".into()],
            price: Money { amount_minor: 1999, currency: "usd".into() },
        };
        assert_eq!(round_trip(&pack), pack);
        let image = GeneratedImage {
            astria_prompt_id: 9,
            url: "https://sdbooth2-production.s3.amazonaws.com/x.jpg".into(),
            delivered: true,
        };
        assert_eq!(round_trip(&image), image);
    }

    #[test]
    fn health_report_status_follows_its_checks() {
        let ok = DependencyCheck { name: "db".into(), ok: true, detail: None };
        let bad = DependencyCheck { name: "redis".into(), ok: false, detail: None };
        assert_eq!(HealthReport::from_checks("s", "v", vec![ok.clone()]).status, HealthStatus::Ok);
        assert_eq!(HealthReport::from_checks("s", "v", vec![ok, bad]).status, HealthStatus::Down);
    }
}
