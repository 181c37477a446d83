//! Stripe for tests: a fake API for `POST /v1/checkout/sessions` that behaves like Stripe's
//! (form-encoded request, bearer key, `Idempotency-Key`: the same key answers the same session),
//! and webhook events signed the way Stripe signs them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::{AppConfig, TestApp};

pub const SECRET_KEY: &str = "sk_test_fake_key";
pub const WEBHOOK_SECRET: &str = "whsec_test_secret";
pub const CHAT_LINK: &str = "https://wa.me/15550783881";

/// One session create request as the fake saw it.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    pub idempotency_key: Option<String>,
    pub form: HashMap<String, String>,
}

#[derive(Default)]
struct State {
    by_key: HashMap<String, Value>,
    requests: Vec<CreateRequest>,
    /// Statuses to answer next (e.g. 500), before behaving normally.
    failures: Vec<u16>,
}

struct Responder(Arc<Mutex<State>>, Duration);

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let form: HashMap<String, String> = form_urlencoded::parse(&request.body).into_owned().collect();
        let key = request.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut state = self.0.lock().unwrap();
        state.requests.push(CreateRequest { idempotency_key: key.clone(), form: form.clone() });
        if !state.failures.is_empty() {
            let status = state.failures.remove(0);
            return ResponseTemplate::new(status)
                .set_body_json(json!({"error": {"type": "api_error", "message": "scripted failure"}}));
        }
        let required = [
            "mode",
            "line_items[0][price_data][unit_amount]",
            "line_items[0][price_data][currency]",
            "line_items[0][price_data][product_data][name]",
            "line_items[0][quantity]",
            "success_url",
            "cancel_url",
        ];
        if let Some(missing) = required.iter().find(|k| !form.contains_key(**k)) {
            return ResponseTemplate::new(400).set_body_json(json!({"error": {
                "type": "invalid_request_error", "message": format!("Missing required param: {missing}.")}}));
        }
        let n = state.by_key.len() + 1;
        let make = || {
            let id = format!("cs_test_{n:04}");
            json!({
                "id": id, "object": "checkout.session", "url": format!("https://checkout.stripe.com/c/pay/{id}"),
                "status": "open", "payment_status": "unpaid", "mode": form["mode"],
                "amount_total": form["line_items[0][price_data][unit_amount]"].parse::<i64>().unwrap_or(0),
                "currency": form["line_items[0][price_data][currency]"],
                "client_reference_id": form.get("client_reference_id"),
                "metadata": { "order_id": form.get("metadata[order_id]") },
                "expires_at": form.get("expires_at").and_then(|v| v.parse::<i64>().ok()),
            })
        };
        let session = match key {
            Some(k) => state.by_key.entry(k).or_insert_with(make).clone(),
            None => make(),
        };
        ResponseTemplate::new(200).set_body_json(session).set_delay(self.1)
    }
}

#[derive(Clone)]
pub struct FakeStripe {
    pub server: Arc<MockServer>,
    state: Arc<Mutex<State>>,
}

impl FakeStripe {
    pub async fn start() -> FakeStripe {
        FakeStripe::start_with_delay(Duration::ZERO).await
    }

    /// Answers each create after `delay`, so that concurrent creators overlap.
    pub async fn start_with_delay(delay: Duration) -> FakeStripe {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::path("/v1/checkout/sessions"))
            .and(wiremock::matchers::header("authorization", format!("Bearer {SECRET_KEY}").as_str()))
            .and(wiremock::matchers::header("content-type", "application/x-www-form-urlencoded"))
            .respond_with(Responder(state.clone(), delay))
            .mount(&server)
            .await;
        FakeStripe { server: Arc::new(server), state }
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    pub fn requests(&self) -> Vec<CreateRequest> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Distinct sessions created (one per idempotency key).
    pub fn sessions_created(&self) -> usize {
        self.state.lock().unwrap().by_key.len()
    }

    /// The session created for `order_id`.
    pub fn session_for(&self, order_id: &str) -> Option<Value> {
        self.state.lock().unwrap().by_key.values().find(|s| s["client_reference_id"] == order_id).cloned()
    }

    /// The only session created so far, if exactly one was.
    pub fn session_for_any(&self) -> Option<Value> {
        let state = self.state.lock().unwrap();
        (state.by_key.len() == 1).then(|| state.by_key.values().next().cloned()).flatten()
    }

    pub fn fail_next(&self, statuses: Vec<u16>) {
        self.state.lock().unwrap().failures.extend(statuses);
    }
}

/// Adds the Stripe settings pointing at `stripe`.
pub fn with_stripe(config: AppConfig, stripe: &FakeStripe) -> AppConfig {
    config
        .var("stripe_secret_key", SECRET_KEY)
        .var("stripe_webhook_secret", WEBHOOK_SECRET)
        .var("stripe_api_url", stripe.uri())
        .var("checkout_expiry_minutes", "60")
        .var("whatsapp_chat_link", CHAT_LINK)
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

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// A webhook event whose `data.object` is a Checkout session.
pub fn event(id: &str, kind: &str, session: Value) -> Value {
    json!({ "id": id, "object": "event", "api_version": "2025-10-29.clover", "created": unix_now(),
            "livemode": false, "type": kind, "data": { "object": session } })
}

/// A completed session for `order_id`.
pub fn session(session_id: &str, order_id: &str, amount: i64, currency: &str, payment_status: &str) -> Value {
    json!({ "id": session_id, "object": "checkout.session", "status": "complete", "mode": "payment",
            "payment_status": payment_status, "amount_total": amount, "currency": currency,
            "client_reference_id": order_id, "metadata": { "order_id": order_id }, "payment_intent": "pi_test_1" })
}

/// Posts an event signed with the webhook secret; answers status and JSON.
pub async fn post_event(app: &TestApp, event: &Value) -> (u16, Value) {
    let body = serde_json::to_vec(event).unwrap();
    post_signed(app, &body, &signature(&[WEBHOOK_SECRET], unix_now(), &body)).await
}

pub async fn post_signed(app: &TestApp, body: &[u8], signature: &str) -> (u16, Value) {
    let r = app
        .client
        .post(app.url("/payment-received"))
        .header("content-type", "application/json")
        .header("stripe-signature", signature)
        .body(body.to_vec())
        .send()
        .await
        .expect("POST reaches the app");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}
