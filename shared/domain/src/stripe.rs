//! Stripe, parsed at the edge: the `Stripe-Signature` check, webhook events into domain types,
//! and the Checkout Session request and answer. Pure: the payment-service components do I/O.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::money::Money;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StripeError {
    /// 400: no usable `Stripe-Signature`, none of its `v1` values matches, or its time is
    /// outside the tolerance (a replay).
    #[error("invalid Stripe signature")]
    BadSignature,
    /// 400: not the JSON shape Stripe sends.
    #[error("malformed Stripe event: {0}")]
    Malformed(String),
}

/// Checks `Stripe-Signature: t=<unix>,v1=<hex>[,v1=<hex>...]`: valid if any `v1` equals
/// HMAC-SHA256(secret, "{t}.{raw body}") (compared in constant time; several `v1` appear during
/// secret rotation) and `t` is within `tolerance_s` of `now_s`. An empty secret never verifies.
pub fn verify_signature(
    secret: &str,
    raw_body: &[u8],
    header: Option<&str>,
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), StripeError> {
    let header = header.ok_or(StripeError::BadSignature)?;
    if secret.is_empty() {
        return Err(StripeError::BadSignature);
    }
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => timestamp = v.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let t = timestamp.ok_or(StripeError::BadSignature)?;
    if (now_s - t).abs() > tolerance_s {
        return Err(StripeError::BadSignature);
    }
    let matches = signatures.iter().any(|sig| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else { return false };
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(raw_body);
        mac.verify_slice(sig).is_ok()
    });
    if matches {
        Ok(())
    } else {
        Err(StripeError::BadSignature)
    }
}

/// The Checkout Session fields the bot reads, from events and from the create answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: String,
    /// `client_reference_id`, else `metadata.order_id`.
    pub order_id: Option<String>,
    /// `paid`, `unpaid` or `no_payment_required`.
    pub payment_status: String,
    /// What the customer paid (or is to pay), when Stripe says.
    pub amount: Option<Money>,
    pub payment_intent: Option<String>,
    pub url: Option<String>,
}

/// A refund as Stripe reports it (`refund.*` events, and the answer to `POST /v1/refunds`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub id: String,
    pub status: RefundStatus,
    pub payment_intent: Option<String>,
    pub amount: Option<Money>,
    /// Stripe's reason when the refund failed (`failure_reason`).
    pub failure_reason: Option<String>,
}

/// Where a refund stands at Stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundStatus {
    Pending,
    Succeeded,
    Failed,
    Canceled,
    RequiresAction,
}

impl RefundStatus {
    pub fn parse(s: &str) -> Option<RefundStatus> {
        Some(match s {
            "pending" => RefundStatus::Pending,
            "succeeded" => RefundStatus::Succeeded,
            "failed" => RefundStatus::Failed,
            "canceled" => RefundStatus::Canceled,
            "requires_action" => RefundStatus::RequiresAction,
            _ => return None,
        })
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            RefundStatus::Pending => "pending",
            RefundStatus::Succeeded => "succeeded",
            RefundStatus::Failed => "failed",
            RefundStatus::Canceled => "canceled",
            RefundStatus::RequiresAction => "requires_action",
        }
    }

    /// The money is (or is on its way) back: the payment issue is settled.
    pub fn gives_money_back(&self) -> bool {
        matches!(self, RefundStatus::Pending | RefundStatus::Succeeded | RefundStatus::RequiresAction)
    }
}

/// A charge refunded at Stripe, by the app or by hand in the dashboard (`charge.refunded`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeRefunded {
    pub charge_id: String,
    pub payment_intent: Option<String>,
    /// The refunds the event lists, newest first as Stripe lists them.
    pub refunds: Vec<Refund>,
    pub amount_refunded: Option<Money>,
}

/// A chargeback opened by the customer's bank (`charge.dispute.created`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispute {
    pub id: String,
    pub payment_intent: Option<String>,
    pub charge_id: Option<String>,
    pub amount: Option<Money>,
    pub reason: Option<String>,
}

/// What a webhook event means for us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// `checkout.session.completed`: paid now, or (`unpaid`) later by an async method.
    Completed,
    /// `checkout.session.async_payment_succeeded`.
    AsyncSucceeded,
    /// `checkout.session.async_payment_failed`.
    AsyncFailed,
    /// `checkout.session.expired`.
    Expired,
    /// `refund.created`, `refund.updated`, `refund.failed`: a refund changed.
    Refund(Refund),
    /// `charge.refunded`: money went back, perhaps refunded by hand in the dashboard.
    ChargeRefunded(ChargeRefunded),
    /// `charge.dispute.created`: a chargeback.
    DisputeCreated(Dispute),
    /// Anything else: acknowledged and ignored.
    Other(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub kind: EventKind,
    /// The session for the four checkout kinds; `None` for others.
    pub session: Option<Session>,
}

#[derive(Deserialize)]
struct RefundJson {
    id: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    payment_intent: Option<serde_json::Value>,
    #[serde(default)]
    amount: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    failure_reason: Option<String>,
}

#[derive(Deserialize)]
struct ListJson<T> {
    #[serde(default = "Vec::new")]
    data: Vec<T>,
}

#[derive(Deserialize)]
struct ChargeJson {
    id: String,
    #[serde(default)]
    payment_intent: Option<serde_json::Value>,
    #[serde(default)]
    amount_refunded: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    refunds: Option<ListJson<RefundJson>>,
}

#[derive(Deserialize)]
struct DisputeJson {
    id: String,
    #[serde(default)]
    payment_intent: Option<serde_json::Value>,
    #[serde(default)]
    charge: Option<serde_json::Value>,
    #[serde(default)]
    amount: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// An id Stripe gives as a string, or as an expanded object carrying one.
fn id_of(v: Option<serde_json::Value>) -> Option<String> {
    match v {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
        Some(serde_json::Value::Object(o)) => o.get("id").and_then(|v| v.as_str()).map(str::to_string),
        _ => None,
    }
}

fn money_of(amount: Option<i64>, currency: Option<&str>) -> Result<Option<Money>, StripeError> {
    match (amount, currency) {
        (Some(a), Some(c)) => Ok(Some(Money::new(a, c).map_err(|e| StripeError::Malformed(e.to_string()))?)),
        _ => Ok(None),
    }
}

fn refund_from(json: RefundJson) -> Result<Refund, StripeError> {
    let status = json.status.as_deref().unwrap_or_default();
    Ok(Refund {
        status: RefundStatus::parse(status)
            .ok_or_else(|| StripeError::Malformed(format!("refund {} has status '{status}'", json.id)))?,
        amount: money_of(json.amount, json.currency.as_deref())?,
        payment_intent: id_of(json.payment_intent),
        failure_reason: json.failure_reason,
        id: json.id,
    })
}

/// Parses the answer of `POST /v1/refunds`.
pub fn parse_refund(raw: &[u8]) -> Result<Refund, StripeError> {
    let json: RefundJson = serde_json::from_slice(raw).map_err(|e| StripeError::Malformed(e.to_string()))?;
    refund_from(json)
}

/// What a refund asks Stripe for.
pub struct RefundRequest<'a> {
    pub payment_intent: &'a str,
    /// What was paid, all of it; `None` lets Stripe refund everything left.
    pub amount: Option<&'a Money>,
    /// The order it belongs to, if the app knows one (`metadata[order_id]`).
    pub order_id: Option<&'a str>,
    /// The refund's own id in the app (`metadata[refund_id]`).
    pub refund_id: &'a str,
}

/// The form body of `POST /v1/refunds`.
pub fn refund_form(r: &RefundRequest<'_>) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("payment_intent", r.payment_intent);
    if let Some(m) = r.amount {
        form.append_pair("amount", &m.amount_minor().to_string());
    }
    form.append_pair("reason", "requested_by_customer");
    form.append_pair("metadata[refund_id]", r.refund_id);
    if let Some(order) = r.order_id {
        form.append_pair("metadata[order_id]", order);
    }
    form.finish()
}

/// The `Idempotency-Key` of a payment's refund: from the order and the payment, so that
/// every retry, replica and redelivery asks for the same refund and gets it once, and two
/// payments of one order (a second Checkout paid by mistake) get a refund each. A new
/// `generation` only when Stripe replays a stored failure to the old key (see
/// [`RefundOutcome::NewKey`]).
pub fn refund_idempotency_key(order_id: Option<&str>, payment_intent: &str, generation: i64) -> String {
    let base = match order_id {
        Some(order) => format!("astria-refund-{order}-{payment_intent}"),
        None => format!("astria-refund-{payment_intent}"),
    };
    match generation {
        0 => base,
        n => format!("{base}-g{n}"),
    }
}

/// What to do after `POST /v1/refunds` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// Stripe made the refund (or had made it for this key before).
    Made(Refund),
    /// The payment was refunded already (in the dashboard, say): nothing more to give back.
    AlreadyRefunded(String),
    /// Try again later with the same key (timeouts, 409, 429, a first 5xx).
    Retry(String),
    /// Stripe replays a stored 5xx to this key (for 24 hours): try again with the next key
    /// generation. Safe: no refund was made under the old key, and the whole payment cannot be
    /// given back twice (Stripe refuses with `charge_already_refunded`).
    NewKey(String),
    /// Stripe will always refuse it (the amount exceeds what is left, a disputed charge, a bad
    /// key): an operator must look, with Stripe's words.
    Refused(String),
}

/// Classifies the answer of a refund call by status, Stripe's `Idempotent-Replayed` header and
/// its error.
pub fn classify_refund(status: u16, replayed: bool, body: &[u8]) -> RefundOutcome {
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    let code = json.as_ref().and_then(|v| v["error"]["code"].as_str()).unwrap_or_default().to_string();
    let message = json.as_ref().and_then(|v| v["error"]["message"].as_str()).unwrap_or_default().to_string();
    let text = format!(
        "Stripe answered {status}{}: {message}",
        if code.is_empty() { String::new() } else { format!(" ({code})") }
    );
    match status {
        200..=299 => match parse_refund(body) {
            Ok(r) => RefundOutcome::Made(r),
            Err(e) => RefundOutcome::Retry(format!("Stripe answered {status} with {e}")),
        },
        400 if code == "charge_already_refunded" => RefundOutcome::AlreadyRefunded(text),
        500..=599 if replayed => RefundOutcome::NewKey(text),
        409 | 429 | 500..=599 => RefundOutcome::Retry(text),
        _ => RefundOutcome::Refused(text),
    }
}

#[derive(Deserialize)]
struct EventJson {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: Option<DataJson>,
}

#[derive(Deserialize)]
struct DataJson {
    object: serde_json::Value,
}

#[derive(Deserialize)]
struct SessionJson {
    id: String,
    #[serde(default)]
    client_reference_id: Option<String>,
    #[serde(default)]
    metadata: Option<std::collections::HashMap<String, String>>,
    #[serde(default)]
    payment_status: Option<String>,
    #[serde(default)]
    amount_total: Option<i64>,
    #[serde(default)]
    currency: Option<String>,
    #[serde(default)]
    payment_intent: Option<serde_json::Value>,
    #[serde(default)]
    url: Option<String>,
}

fn session_from(json: SessionJson) -> Result<Session, StripeError> {
    let amount = match (json.amount_total, json.currency.as_deref()) {
        (Some(a), Some(c)) => Some(Money::new(a, c).map_err(|e| StripeError::Malformed(e.to_string()))?),
        _ => None,
    };
    let order_id = json
        .client_reference_id
        .filter(|s| !s.is_empty())
        .or_else(|| json.metadata.and_then(|m| m.get("order_id").cloned()))
        .filter(|s| !s.is_empty());
    // `payment_intent` is an id, or an expanded object with one.
    let payment_intent = id_of(json.payment_intent);
    Ok(Session {
        id: json.id,
        order_id,
        payment_status: json.payment_status.unwrap_or_default(),
        amount,
        payment_intent,
        url: json.url,
    })
}

/// Parses a verified webhook body.
pub fn parse_event(raw: &[u8]) -> Result<Event, StripeError> {
    if crate::has_nul_escape(raw) {
        return Err(StripeError::Malformed("NUL character in the event".into()));
    }
    let e: EventJson = serde_json::from_slice(raw).map_err(|e| StripeError::Malformed(e.to_string()))?;
    if e.id.is_empty() {
        return Err(StripeError::Malformed("event without id".into()));
    }
    let object =
        || e.data.as_ref().map(|d| d.object.clone()).ok_or_else(|| StripeError::Malformed("event without data".into()));
    let malformed = |what: &str, err: serde_json::Error| StripeError::Malformed(format!("{what}: {err}"));
    let kind = match e.kind.as_str() {
        "checkout.session.completed" => EventKind::Completed,
        "checkout.session.async_payment_succeeded" => EventKind::AsyncSucceeded,
        "checkout.session.async_payment_failed" => EventKind::AsyncFailed,
        "checkout.session.expired" => EventKind::Expired,
        "refund.created" | "refund.updated" | "refund.failed" => {
            let json: RefundJson = serde_json::from_value(object()?).map_err(|err| malformed("refund", err))?;
            return Ok(Event { id: e.id, kind: EventKind::Refund(refund_from(json)?), session: None });
        }
        "charge.refunded" => {
            let json: ChargeJson = serde_json::from_value(object()?).map_err(|err| malformed("charge", err))?;
            let charge = ChargeRefunded {
                amount_refunded: money_of(json.amount_refunded, json.currency.as_deref())?,
                payment_intent: id_of(json.payment_intent),
                refunds: json
                    .refunds
                    .map(|l| l.data)
                    .unwrap_or_default()
                    .into_iter()
                    .map(refund_from)
                    .collect::<Result<_, _>>()?,
                charge_id: json.id,
            };
            return Ok(Event { id: e.id, kind: EventKind::ChargeRefunded(charge), session: None });
        }
        "charge.dispute.created" => {
            let json: DisputeJson = serde_json::from_value(object()?).map_err(|err| malformed("dispute", err))?;
            let dispute = Dispute {
                amount: money_of(json.amount, json.currency.as_deref())?,
                payment_intent: id_of(json.payment_intent),
                charge_id: id_of(json.charge),
                reason: json.reason,
                id: json.id,
            };
            return Ok(Event { id: e.id, kind: EventKind::DisputeCreated(dispute), session: None });
        }
        other => return Ok(Event { id: e.id, kind: EventKind::Other(other.to_string()), session: None }),
    };
    let object = object()?;
    let session: SessionJson =
        serde_json::from_value(object).map_err(|e| StripeError::Malformed(format!("session: {e}")))?;
    Ok(Event { id: e.id, kind, session: Some(session_from(session)?) })
}

/// Parses a Checkout session as `GET /v1/checkout/sessions/{id}` answers it.
pub fn parse_session(raw: &[u8]) -> Result<Session, StripeError> {
    let json: SessionJson = serde_json::from_slice(raw).map_err(|e| StripeError::Malformed(e.to_string()))?;
    session_from(json)
}

/// Parses the answer of `POST /v1/checkout/sessions`; the URL must be there.
pub fn parse_created_session(raw: &[u8]) -> Result<Session, StripeError> {
    let json: SessionJson = serde_json::from_slice(raw).map_err(|e| StripeError::Malformed(e.to_string()))?;
    let session = session_from(json)?;
    if session.url.as_deref().is_none_or(|u| !u.starts_with("https://")) {
        return Err(StripeError::Malformed("session without an https url".into()));
    }
    Ok(session)
}

/// What the Checkout Session for one order contains.
pub struct CheckoutRequest<'a> {
    pub order_id: &'a str,
    pub product_name: &'a str,
    pub price: &'a Money,
    /// Unix seconds; Stripe accepts 30 minutes to 24 hours ahead.
    pub expires_at: i64,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
}

/// The form body of `POST /v1/checkout/sessions`.
pub fn checkout_form(r: &CheckoutRequest<'_>) -> String {
    form_urlencoded::Serializer::new(String::new())
        .append_pair("mode", "payment")
        .append_pair("line_items[0][quantity]", "1")
        .append_pair("line_items[0][price_data][currency]", r.price.currency())
        .append_pair("line_items[0][price_data][unit_amount]", &r.price.amount_minor().to_string())
        .append_pair("line_items[0][price_data][product_data][name]", r.product_name)
        .append_pair("client_reference_id", r.order_id)
        .append_pair("metadata[order_id]", r.order_id)
        .append_pair("expires_at", &r.expires_at.to_string())
        .append_pair("success_url", r.success_url)
        .append_pair("cancel_url", r.cancel_url)
        .finish()
}

/// The `Idempotency-Key` of an order's session in key generation `generation`: a retry with
/// the same key and the same parameters returns the same session. A new generation is used
/// only when Stripe can no longer answer the old key usefully (see [`classify_create_failure`]).
pub fn idempotency_key(order_id: &str, generation: i64) -> String {
    match generation {
        0 => format!("astria-checkout-{order_id}"),
        n => format!("astria-checkout-{order_id}-g{n}"),
    }
}

/// Least time left before a session's `expires_at` for a request to use it: Stripe refuses an
/// `expires_at` less than 30 minutes ahead (one more minute for the call and clock skew).
pub const MIN_EXPIRY_LEAD_MS: i64 = 31 * 60_000;

/// Whether a session request fixed to expire at `expires_at` (unix seconds) can still be sent
/// at `now_ms`; if not, the order needs a new expiry, and so a new key generation.
pub fn expiry_still_usable(expires_at: i64, now_ms: i64) -> bool {
    expires_at.saturating_mul(1000) >= now_ms + MIN_EXPIRY_LEAD_MS
}

/// What to do after `POST /v1/checkout/sessions` failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateFailure {
    /// Try again later with the same key (timeouts, 5xx seen for the first time, 409: another
    /// request with the key is in flight, 429).
    Retry(String),
    /// The key can never succeed: Stripe refuses it with other parameters (400
    /// `idempotency_error`), or replays a stored failure to every retry for 24 hours
    /// (`Idempotent-Replayed: true` on a 5xx). Move to the next key generation.
    NewKey(String),
    /// A request Stripe will always refuse (bad key, invalid parameters): no retry helps until
    /// an operator acts; the event ends in the dead letters for a replay after the fix.
    Permanent(String),
}

/// Classifies a failed create by status, Stripe's `Idempotent-Replayed` header and the error
/// body. The message is Stripe's own text, which never contains the key.
pub fn classify_create_failure(status: u16, replayed: bool, body: &[u8]) -> CreateFailure {
    let error = serde_json::from_slice::<serde_json::Value>(body).ok();
    let kind = error.as_ref().and_then(|v| v["error"]["type"].as_str().map(str::to_string)).unwrap_or_default();
    let message = error.as_ref().and_then(|v| v["error"]["message"].as_str().map(str::to_string)).unwrap_or_default();
    let text = format!("Stripe answered {status}{}: {message}", if replayed { " (replayed)" } else { "" });
    match status {
        400 if kind == "idempotency_error" => CreateFailure::NewKey(text),
        500..=599 if replayed => CreateFailure::NewKey(text),
        409 | 429 | 500..=599 => CreateFailure::Retry(text),
        400..=499 => CreateFailure::Permanent(text),
        _ => CreateFailure::Retry(text),
    }
}

/// What `POST /v1/checkout/sessions/{id}/expire` answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpireOutcome {
    /// The session is expired now.
    Expired,
    /// Stripe refused because the session is not open (expired already, or completed): nothing
    /// left to expire.
    NotOpen,
    /// Anything else: try again later.
    Failed(String),
}

/// Classifies the answer of an expire call by status and Stripe's error.
pub fn classify_expire(status: u16, body: &[u8]) -> ExpireOutcome {
    let json = serde_json::from_slice::<serde_json::Value>(body).ok();
    let message = json.as_ref().and_then(|v| v["error"]["message"].as_str()).unwrap_or_default().to_string();
    match status {
        200..=299 => ExpireOutcome::Expired,
        400 if json.as_ref().is_some_and(|v| v["error"]["type"] == "invalid_request_error") => ExpireOutcome::NotOpen,
        _ => ExpireOutcome::Failed(format!("Stripe answered {status}: {message}")),
    }
}

/// Stripe's bounds on `expires_at`: between 30 minutes and 24 hours from now.
pub fn expiry_minutes_in_bounds(minutes: i64) -> i64 {
    minutes.clamp(30, 24 * 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(secret: &str, t: i64, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    const NOW: i64 = 1_764_064_800;

    #[test]
    fn a_create_failure_moves_to_a_new_key_only_when_the_old_one_cannot_succeed() {
        let err = |t: &str| format!(r#"{{"error":{{"type":"{t}","message":"m"}}}}"#).into_bytes();
        let new_key = |f: CreateFailure| matches!(f, CreateFailure::NewKey(_));
        let retry = |f: CreateFailure| matches!(f, CreateFailure::Retry(_));
        assert!(new_key(classify_create_failure(400, false, &err("idempotency_error"))), "other parameters");
        assert!(new_key(classify_create_failure(500, true, &err("api_error"))), "a replayed 5xx");
        assert!(retry(classify_create_failure(500, false, &err("api_error"))), "a first 5xx");
        assert!(retry(classify_create_failure(409, false, &err("idempotency_error"))), "a concurrent request");
        assert!(retry(classify_create_failure(429, false, &err("rate_limit_error"))));
        assert!(matches!(
            classify_create_failure(401, false, &err("invalid_request_error")),
            CreateFailure::Permanent(_)
        ));
        assert!(matches!(classify_create_failure(400, false, b"not json"), CreateFailure::Permanent(_)));
    }

    #[test]
    fn an_expire_call_is_done_when_expired_or_no_longer_open() {
        let err = |t: &str| format!(r#"{{"error":{{"type":"{t}","message":"m"}}}}"#).into_bytes();
        assert_eq!(classify_expire(200, b"{}"), ExpireOutcome::Expired);
        assert_eq!(classify_expire(400, &err("invalid_request_error")), ExpireOutcome::NotOpen);
        assert!(matches!(classify_expire(500, &err("api_error")), ExpireOutcome::Failed(_)));
        assert!(
            matches!(classify_expire(401, &err("invalid_request_error")), ExpireOutcome::Failed(_)),
            "a bad key is no success"
        );
    }

    #[test]
    fn an_expiry_is_usable_only_more_than_31_minutes_ahead() {
        let now_ms = NOW * 1000;
        assert!(expiry_still_usable(NOW + 24 * 3600, now_ms));
        assert!(expiry_still_usable(NOW + 31 * 60, now_ms));
        assert!(!expiry_still_usable(NOW + 31 * 60 - 1, now_ms));
        assert!(!expiry_still_usable(NOW - 10, now_ms));
    }

    #[test]
    fn a_signature_is_valid_only_for_its_secret_body_and_time() {
        let body = br#"{"id":"evt_1"}"#;
        let good = format!("t={NOW},v1={}", sign("whsec_a", NOW, body));
        assert_eq!(verify_signature("whsec_a", body, Some(&good), NOW + 10, 300), Ok(()));
        let cases = [
            (None, "missing"),
            (Some(format!("t={NOW},v1={}", sign("whsec_b", NOW, body))), "other secret"),
            (Some(format!("t={NOW},v1={}", sign("whsec_a", NOW, b"{}"))), "other body"),
            (Some(format!("t={},v1={}", NOW - 301, sign("whsec_a", NOW - 301, body))), "stale"),
            (Some(format!("t={},v1={}", NOW + 301, sign("whsec_a", NOW + 301, body))), "future"),
            (Some(format!("v1={}", sign("whsec_a", NOW, body))), "no time"),
            (Some(format!("t={NOW},v0={}", sign("whsec_a", NOW, body))), "no v1"),
            (Some("garbage".to_string()), "garbage"),
        ];
        for (header, why) in cases {
            assert_eq!(
                verify_signature("whsec_a", body, header.as_deref(), NOW, 300),
                Err(StripeError::BadSignature),
                "{why}"
            );
        }
        assert!(verify_signature("", body, Some(&good), NOW, 300).is_err(), "empty secret");
    }

    #[test]
    fn any_matching_v1_is_enough_during_secret_rotation() {
        let body = b"{}";
        let header = format!("t={NOW},v1={},v1={}", sign("whsec_old", NOW, body), sign("whsec_new", NOW, body));
        assert_eq!(verify_signature("whsec_new", body, Some(&header), NOW, 300), Ok(()));
        assert_eq!(verify_signature("whsec_old", body, Some(&header), NOW, 300), Ok(()));
    }

    #[test]
    fn checkout_events_carry_the_session() {
        let raw = br#"{"id":"evt_1","object":"event","type":"checkout.session.completed","created":1,"livemode":false,
            "data":{"object":{"id":"cs_1","object":"checkout.session","status":"complete","payment_status":"paid",
            "amount_total":1999,"currency":"usd","client_reference_id":"o1","metadata":{"order_id":"o1"},"payment_intent":"pi_1"}}}"#;
        let e = parse_event(raw).unwrap();
        assert_eq!(e.kind, EventKind::Completed);
        let s = e.session.unwrap();
        assert_eq!((s.id.as_str(), s.order_id.as_deref(), s.payment_status.as_str()), ("cs_1", Some("o1"), "paid"));
        assert_eq!(s.amount, Some(Money::new(1999, "usd").unwrap()));
        assert_eq!(s.payment_intent.as_deref(), Some("pi_1"));
    }

    #[test]
    fn the_order_id_falls_back_to_metadata_and_other_types_are_ignored() {
        let raw = br#"{"id":"evt_2","type":"checkout.session.expired","data":{"object":{"id":"cs_2","metadata":{"order_id":"o2"},"payment_status":"unpaid"}}}"#;
        let e = parse_event(raw).unwrap();
        assert_eq!((e.kind, e.session.unwrap().order_id.as_deref()), (EventKind::Expired, Some("o2")));
        let other = parse_event(br#"{"id":"evt_3","type":"charge.captured","data":{"object":{"id":"ch_1"}}}"#).unwrap();
        assert_eq!(other.kind, EventKind::Other("charge.captured".into()));
        for bad in [
            &b"nope"[..],
            br#"{"type":"checkout.session.completed"}"#,
            br#"{"id":"e","type":"checkout.session.completed"}"#,
        ] {
            assert!(matches!(parse_event(bad), Err(StripeError::Malformed(_))));
        }
    }

    #[test]
    fn the_checkout_form_has_every_field_stripe_needs() {
        let price = Money::new(1999, "usd").unwrap();
        let form = checkout_form(&CheckoutRequest {
            order_id: "o1",
            product_name: "Corporate & co",
            price: &price,
            expires_at: NOW + 3600,
            success_url: "https://wa.me/15550783881?text=STATUS",
            cancel_url: "https://wa.me/15550783881",
        });
        let pairs: std::collections::HashMap<String, String> =
            form_urlencoded::parse(form.as_bytes()).into_owned().collect();
        assert_eq!(pairs["mode"], "payment");
        assert_eq!(pairs["line_items[0][price_data][unit_amount]"], "1999");
        assert_eq!(pairs["line_items[0][price_data][currency]"], "usd");
        assert_eq!(pairs["line_items[0][price_data][product_data][name]"], "Corporate & co");
        assert_eq!((pairs["client_reference_id"].as_str(), pairs["metadata[order_id]"].as_str()), ("o1", "o1"));
        assert_eq!(pairs["expires_at"], (NOW + 3600).to_string());
        assert_eq!(pairs["success_url"], "https://wa.me/15550783881?text=STATUS");
        assert_eq!(idempotency_key("o1", 0), idempotency_key("o1", 0));
        assert_ne!(idempotency_key("o1", 0), idempotency_key("o2", 0));
        assert_ne!(idempotency_key("o1", 0), idempotency_key("o1", 1), "a new generation is a new key");
        assert_eq!(idempotency_key("o1", 0), "astria-checkout-o1", "generation 0 keeps the key orders already used");
        assert_eq!((expiry_minutes_in_bounds(5), expiry_minutes_in_bounds(5000)), (30, 1440));
    }

    #[test]
    fn refund_events_charges_refunded_and_disputes_are_read() {
        let refund = parse_event(br#"{"id":"evt_r","type":"refund.updated","data":{"object":{"id":"re_1","object":"refund",
            "status":"failed","payment_intent":"pi_1","amount":1999,"currency":"usd","failure_reason":"expired_or_canceled_card",
            "metadata":{"order_id":"o1"}}}}"#).unwrap();
        let EventKind::Refund(r) = refund.kind else { panic!("{:?}", refund.kind) };
        assert_eq!(
            (r.id.as_str(), &r.status, r.payment_intent.as_deref()),
            ("re_1", &RefundStatus::Failed, Some("pi_1"))
        );
        assert_eq!(r.failure_reason.as_deref(), Some("expired_or_canceled_card"));
        let charge = parse_event(br#"{"id":"evt_c","type":"charge.refunded","data":{"object":{"id":"ch_1","object":"charge",
            "payment_intent":"pi_1","amount_refunded":1999,"currency":"usd","refunded":true,
            "refunds":{"object":"list","data":[{"id":"re_9","status":"succeeded","amount":1999,"currency":"usd","payment_intent":"pi_1"}]}}}}"#).unwrap();
        let EventKind::ChargeRefunded(c) = charge.kind else { panic!() };
        assert_eq!((c.payment_intent.as_deref(), c.refunds[0].id.as_str()), (Some("pi_1"), "re_9"));
        assert_eq!(c.amount_refunded, Some(Money::new(1999, "usd").unwrap()));
        let dispute = parse_event(br#"{"id":"evt_d","type":"charge.dispute.created","data":{"object":{"id":"dp_1","object":"dispute",
            "charge":"ch_1","payment_intent":"pi_1","amount":1999,"currency":"usd","reason":"fraudulent","status":"needs_response"}}}"#).unwrap();
        let EventKind::DisputeCreated(d) = dispute.kind else { panic!() };
        assert_eq!(
            (d.id.as_str(), d.payment_intent.as_deref(), d.reason.as_deref()),
            ("dp_1", Some("pi_1"), Some("fraudulent"))
        );
        let odd =
            parse_event(br#"{"id":"evt_x","type":"refund.updated","data":{"object":{"id":"re_2","status":"lost"}}}"#);
        assert!(matches!(odd, Err(StripeError::Malformed(_))), "a status Stripe does not document");
    }

    #[test]
    fn a_refund_asks_for_the_payment_once_per_order_and_payment() {
        let paid = Money::new(1999, "usd").unwrap();
        let form = refund_form(&RefundRequest {
            payment_intent: "pi_1",
            amount: Some(&paid),
            order_id: Some("o1"),
            refund_id: "r1",
        });
        let pairs: std::collections::HashMap<String, String> =
            form_urlencoded::parse(form.as_bytes()).into_owned().collect();
        assert_eq!(pairs["payment_intent"], "pi_1");
        assert_eq!(pairs["amount"], "1999");
        assert_eq!(pairs["reason"], "requested_by_customer");
        assert_eq!((pairs["metadata[order_id]"].as_str(), pairs["metadata[refund_id]"].as_str()), ("o1", "r1"));
        assert_eq!(refund_idempotency_key(Some("o1"), "pi_1", 0), refund_idempotency_key(Some("o1"), "pi_1", 0));
        assert_ne!(refund_idempotency_key(Some("o1"), "pi_1", 0), refund_idempotency_key(Some("o1"), "pi_2", 0));
        assert_ne!(refund_idempotency_key(Some("o1"), "pi_1", 0), refund_idempotency_key(Some("o1"), "pi_1", 1));
        let err = |code: &str| {
            format!(r#"{{"error":{{"type":"invalid_request_error","code":"{code}","message":"m"}}}}"#).into_bytes()
        };
        assert!(matches!(
            classify_refund(200, false, br#"{"id":"re_1","status":"succeeded"}"#),
            RefundOutcome::Made(_)
        ));
        assert!(matches!(
            classify_refund(400, false, &err("charge_already_refunded")),
            RefundOutcome::AlreadyRefunded(_)
        ));
        assert!(matches!(classify_refund(400, false, &err("amount_too_large")), RefundOutcome::Refused(_)));
        assert!(matches!(classify_refund(402, false, &err("card_declined")), RefundOutcome::Refused(_)));
        for s in [409, 429, 500, 503] {
            assert!(matches!(classify_refund(s, false, &err("")), RefundOutcome::Retry(_)), "{s}");
        }
        assert!(matches!(classify_refund(500, true, &err("")), RefundOutcome::NewKey(_)), "a replayed 5xx");
    }

    #[test]
    fn a_created_session_needs_an_https_url() {
        let ok = parse_created_session(
            br#"{"id":"cs_1","url":"https://checkout.stripe.com/c/pay/cs_1","payment_status":"unpaid"}"#,
        );
        assert_eq!(ok.unwrap().url.as_deref(), Some("https://checkout.stripe.com/c/pay/cs_1"));
        assert!(parse_created_session(br#"{"id":"cs_1"}"#).is_err());
        assert!(parse_created_session(br#"{"id":"cs_1","url":"javascript:x"}"#).is_err());
    }
}
