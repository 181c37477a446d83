//! Stripe: Checkout Sessions as `POST /v1/checkout/sessions` creates them from its form
//! parameters, the error bodies, and webhook events signed the way Stripe signs them
//! (`Stripe-Signature: t=…,v1=…`).

use std::collections::HashMap;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::unix_now;

/// The parameters a session create needs (the app's request shape; Stripe refuses without).
pub const REQUIRED: [&str; 7] = [
    "mode",
    "line_items[0][price_data][unit_amount]",
    "line_items[0][price_data][currency]",
    "line_items[0][price_data][product_data][name]",
    "line_items[0][quantity]",
    "success_url",
    "cancel_url",
];

/// Stripe's error body.
pub fn error(kind: &str, message: &str) -> Value {
    json!({ "error": { "type": kind, "message": message } })
}

/// Validates a create's form as Stripe does: the required parameters, and `expires_at` between
/// 30 minutes and 24 hours from now. `Err` is the 400 body.
pub fn validate_create(form: &HashMap<String, String>) -> Result<(), Value> {
    if let Some(missing) = REQUIRED.iter().find(|k| !form.contains_key(**k)) {
        return Err(error("invalid_request_error", &format!("Missing required param: {missing}.")));
    }
    let now = unix_now();
    match form.get("expires_at").map(|v| v.parse::<i64>()) {
        Some(Ok(at)) if (now + 30 * 60..=now + 24 * 3600).contains(&at) => Ok(()),
        Some(_) => Err(error(
            "invalid_request_error",
            "The `expires_at` timestamp must be between 30 minutes and 24 hours from now.",
        )),
        None => Ok(()),
    }
}

/// Stripe's hosted payment page for session `id`.
pub fn checkout_url(id: &str) -> String {
    format!("https://checkout.stripe.com/c/pay/{id}")
}

/// The open session a valid create makes.
pub fn created_session(id: &str, form: &HashMap<String, String>) -> Value {
    json!({
        "id": id, "object": "checkout.session", "url": checkout_url(id),
        "status": "open", "payment_status": "unpaid", "mode": form["mode"],
        "amount_total": form["line_items[0][price_data][unit_amount]"].parse::<i64>().unwrap_or(0),
        "currency": form["line_items[0][price_data][currency]"],
        "client_reference_id": form.get("client_reference_id"),
        "metadata": { "order_id": form.get("metadata[order_id]") },
        "expires_at": form.get("expires_at").and_then(|v| v.parse::<i64>().ok()),
        "success_url": form.get("success_url"), "cancel_url": form.get("cancel_url"),
    })
}

/// `Stripe-Signature` for `body` at unix time `t`, one `v1` per secret.
pub fn signature(secrets: &[&str], t: i64, body: &[u8]) -> String {
    let mut header = format!("t={t}");
    for secret in secrets {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        header.push_str(&format!(",v1={}", hex::encode(mac.finalize().into_bytes())));
    }
    header
}

/// A webhook event whose `data.object` is a Checkout session.
pub fn event(id: &str, kind: &str, session: Value) -> Value {
    json!({ "id": id, "object": "event", "api_version": "2025-10-29.clover", "created": unix_now(),
            "livemode": false, "type": kind, "data": { "object": session } })
}

/// The payment a session's checkout makes (one per session here, as with a card).
pub fn payment_intent_of(session_id: &str) -> String {
    format!("pi_{}", session_id.trim_start_matches("cs_"))
}

/// A completed session for `order_id` (`payment_status` `paid`, or `unpaid` while an
/// asynchronous payment is pending), with its payment.
pub fn completed_session(session_id: &str, order_id: &str, amount: i64, currency: &str, payment_status: &str) -> Value {
    json!({ "id": session_id, "object": "checkout.session", "status": "complete", "mode": "payment",
            "payment_status": payment_status, "amount_total": amount, "currency": currency,
            "client_reference_id": order_id, "metadata": { "order_id": order_id },
            "payment_intent": payment_intent_of(session_id) })
}

/// Stripe's error body with its `code` (`charge_already_refunded`, `amount_too_large`, ...).
pub fn error_with_code(kind: &str, code: &str, message: &str) -> Value {
    json!({ "error": { "type": kind, "code": code, "message": message } })
}

/// The refund `POST /v1/refunds` makes from its form: `amount` or, without one, `left`.
pub fn refund(id: &str, form: &HashMap<String, String>, left: i64, currency: &str, status: &str) -> Value {
    let amount = form.get("amount").and_then(|a| a.parse::<i64>().ok()).unwrap_or(left);
    let metadata: HashMap<&str, &str> =
        form.iter().filter_map(|(k, v)| Some((k.strip_prefix("metadata[")?.strip_suffix(']')?, v.as_str()))).collect();
    json!({ "id": id, "object": "refund", "amount": amount, "currency": currency, "status": status,
            "payment_intent": form.get("payment_intent"), "reason": form.get("reason"),
            "metadata": metadata, "created": unix_now() })
}

/// The charge of `payment_intent` after `refunds` (newest first), as `charge.refunded` carries it.
pub fn refunded_charge(payment_intent: &str, amount: i64, currency: &str, refunds: &[Value]) -> Value {
    let refunded: i64 = refunds.iter().filter_map(|r| r["amount"].as_i64()).sum();
    json!({ "id": format!("ch_{}", payment_intent.trim_start_matches("pi_")), "object": "charge",
            "payment_intent": payment_intent, "amount": amount, "amount_refunded": refunded, "currency": currency,
            "refunded": refunded >= amount, "refunds": { "object": "list", "data": refunds } })
}
