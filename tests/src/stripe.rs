//! Stripe for tests: a fake API for `POST /v1/checkout/sessions` (and `GET` of one, and its
//! `/expire`) and `POST /v1/refunds` that behaves like Stripe's, idempotency included, and
//! webhook events signed the way Stripe signs them.
//!
//! Refunds as Stripe makes them: of a payment a session took (`pi_` + the session's id), at
//! most what is left of it (`amount_too_large` beyond), `charge_already_refunded` once nothing
//! is left; the same idempotency rules as sessions.
//!
//! Idempotency as Stripe documents it: the first answer to a key (a 5xx included) is stored and
//! replayed to every later request with that key, with `Idempotent-Replayed: true`; a request
//! reusing a key with other parameters gets 400 `idempotency_error` (nothing stored); a request
//! while another with the same key is still being answered gets 409. Parameters that fail
//! validation store nothing either.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use astria_wire::stripe as wire;
use serde_json::{json, Value};
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
    /// The status the fake answered.
    pub status: u16,
}

/// What Stripe keeps for a key: the parameters and the first answer.
struct Stored {
    form: HashMap<String, String>,
    status: u16,
    body: Value,
    /// Until when the first request is still being answered (409 for others meanwhile).
    busy_until: Instant,
}

#[derive(Default)]
struct State {
    by_key: HashMap<String, Stored>,
    /// Every session created, in order.
    sessions: Vec<Value>,
    requests: Vec<CreateRequest>,
    /// Statuses to answer next (e.g. 500), before behaving normally. Stored for their key.
    failures: Vec<u16>,
    /// Delays of the next answers, before the fake's constant delay applies.
    delays: Vec<Duration>,
    /// Session ids the app asked to expire, in order.
    expire_calls: Vec<String>,
    /// Every refund made (by the app, or "in the dashboard"), in order.
    refunds: Vec<Value>,
    refund_requests: Vec<CreateRequest>,
    refund_failures: Vec<u16>,
    refund_delays: Vec<Duration>,
}

struct Responder(Arc<Mutex<State>>, Duration);

fn error(status: u16, kind: &str, message: &str) -> (u16, Value) {
    (status, wire::error(kind, message))
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let form: HashMap<String, String> = form_urlencoded::parse(&request.body).into_owned().collect();
        let key = request.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut state = self.0.lock().unwrap();
        let delay = if state.delays.is_empty() { self.1 } else { state.delays.remove(0) };
        let (status, body, replayed) = answer(&mut state, key.as_deref(), &form, delay);
        state.requests.push(CreateRequest { idempotency_key: key, form, status });
        let mut template = ResponseTemplate::new(status).set_body_json(body).set_delay(delay);
        if replayed {
            template = template.insert_header("idempotent-replayed", "true");
        }
        template
    }
}

fn answer(state: &mut State, key: Option<&str>, form: &HashMap<String, String>, delay: Duration) -> (u16, Value, bool) {
    if let Some(stored) = key.and_then(|k| state.by_key.get(k)) {
        if Instant::now() < stored.busy_until {
            let (s, b) = error(
                409,
                "idempotency_error",
                "There is currently another in-progress request using this Idempotent Key. Please try again later.",
            );
            return (s, b, false);
        }
        if &stored.form != form {
            let (s, b) = error(
                400,
                "idempotency_error",
                "Keys for idempotent requests can only be used with the same parameters they were first used with.",
            );
            return (s, b, false);
        }
        return (stored.status, stored.body.clone(), true);
    }
    if let Err(body) = wire::validate_create(form) {
        return (400, body, false);
    }
    let (status, body) = if !state.failures.is_empty() {
        let status = state.failures.remove(0);
        error(status, "api_error", "scripted failure")
    } else {
        let id = format!("cs_test_{:04}", state.sessions.len() + 1);
        let session = wire::created_session(&id, form);
        state.sessions.push(session.clone());
        (200, session)
    };
    if let Some(k) = key {
        let stored = Stored { form: form.clone(), status, body: body.clone(), busy_until: Instant::now() + delay };
        state.by_key.insert(k.to_string(), stored);
    }
    (status, body, false)
}

/// `POST /v1/refunds`.
struct Refunder(Arc<Mutex<State>>);

impl Respond for Refunder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let form: HashMap<String, String> = form_urlencoded::parse(&request.body).into_owned().collect();
        let key = request.headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
        let mut state = self.0.lock().unwrap();
        let delay = if state.refund_delays.is_empty() { Duration::ZERO } else { state.refund_delays.remove(0) };
        let (status, body, replayed) = refund_answer(&mut state, key.as_deref(), &form, delay);
        state.refund_requests.push(CreateRequest { idempotency_key: key, form, status });
        let mut template = ResponseTemplate::new(status).set_body_json(body).set_delay(delay);
        if replayed {
            template = template.insert_header("idempotent-replayed", "true");
        }
        template
    }
}

fn refunded(state: &State, payment_intent: &str) -> i64 {
    state.refunds.iter().filter(|r| r["payment_intent"] == payment_intent).filter_map(|r| r["amount"].as_i64()).sum()
}

fn refund_answer(
    state: &mut State,
    key: Option<&str>,
    form: &HashMap<String, String>,
    delay: Duration,
) -> (u16, Value, bool) {
    if let Some(stored) = key.and_then(|k| state.by_key.get(k)) {
        if Instant::now() < stored.busy_until {
            let message = "There is currently another in-progress request using this Idempotent Key.";
            let (s, b) = error(409, "idempotency_error", message);
            return (s, b, false);
        }
        if &stored.form != form {
            let (s, b) = error(
                400,
                "idempotency_error",
                "Keys for idempotent requests can only be used with the same parameters they were first used with.",
            );
            return (s, b, false);
        }
        return (stored.status, stored.body.clone(), true);
    }
    let (status, body) = refund_outcome(state, form);
    if let Some(k) = key {
        let stored = Stored { form: form.clone(), status, body: body.clone(), busy_until: Instant::now() + delay };
        state.by_key.insert(k.to_string(), stored);
    }
    (status, body, false)
}

fn refund_outcome(state: &mut State, form: &HashMap<String, String>) -> (u16, Value) {
    if !state.refund_failures.is_empty() {
        let status = state.refund_failures.remove(0);
        return error(status, "api_error", "scripted failure");
    }
    let pi = form.get("payment_intent").cloned().unwrap_or_default();
    let Some(session) = state.sessions.iter().find(|s| wire::payment_intent_of(s["id"].as_str().unwrap_or("")) == pi)
    else {
        return (
            400,
            wire::error_with_code(
                "invalid_request_error",
                "resource_missing",
                &format!("No such payment_intent: '{pi}'"),
            ),
        );
    };
    let (paid, currency) =
        (session["amount_total"].as_i64().unwrap_or(0), session["currency"].as_str().unwrap_or("usd").to_string());
    let left = paid - refunded(state, &pi);
    if left <= 0 {
        let message = format!("Charge for {pi} has already been refunded.");
        return (400, wire::error_with_code("invalid_request_error", "charge_already_refunded", &message));
    }
    if form.get("amount").and_then(|a| a.parse::<i64>().ok()).is_some_and(|a| a > left) {
        let message = "Refund amount is greater than unrefunded amount on charge.";
        return (400, wire::error_with_code("invalid_request_error", "amount_too_large", message));
    }
    let refund = wire::refund(&format!("re_test_{:04}", state.refunds.len() + 1), form, left, &currency, "succeeded");
    state.refunds.push(refund.clone());
    (200, refund)
}

/// `GET /v1/checkout/sessions/{id}`.
struct SessionReader(Arc<Mutex<State>>);

impl Respond for SessionReader {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id = request.url.path().trim_start_matches("/v1/checkout/sessions/").to_string();
        let state = self.0.lock().unwrap();
        match state.sessions.iter().find(|s| s["id"] == id.as_str()) {
            Some(s) => {
                let mut s = s.clone();
                s["payment_intent"] = json!(wire::payment_intent_of(&id));
                ResponseTemplate::new(200).set_body_json(s)
            }
            None => {
                let (st, b) = error(404, "invalid_request_error", &format!("No such checkout.session: '{id}'"));
                ResponseTemplate::new(st).set_body_json(b)
            }
        }
    }
}

/// `POST /v1/checkout/sessions/{id}/expire`: an open session becomes expired (its link can no
/// longer be paid); any other answers 400, as Stripe does.
struct Expirer(Arc<Mutex<State>>);

impl Respond for Expirer {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id =
            request.url.path().trim_start_matches("/v1/checkout/sessions/").trim_end_matches("/expire").to_string();
        let mut state = self.0.lock().unwrap();
        state.expire_calls.push(id.clone());
        let Some(session) = state.sessions.iter_mut().find(|s| s["id"] == id.as_str()) else {
            let (s, b) = error(404, "invalid_request_error", &format!("No such checkout.session: '{id}'"));
            return ResponseTemplate::new(s).set_body_json(b);
        };
        if session["status"] != "open" {
            let (s, b) = error(
                400,
                "invalid_request_error",
                "Only Checkout Sessions with a status in [\"open\"] can be expired.",
            );
            return ResponseTemplate::new(s).set_body_json(b);
        }
        session["status"] = json!("expired");
        ResponseTemplate::new(200).set_body_json(session.clone())
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
        Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::path_regex(r"^/v1/checkout/sessions/[^/]+/expire$"))
            .and(wiremock::matchers::header("authorization", format!("Bearer {SECRET_KEY}").as_str()))
            .respond_with(Expirer(state.clone()))
            .mount(&server)
            .await;
        Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::path("/v1/refunds"))
            .and(wiremock::matchers::header("authorization", format!("Bearer {SECRET_KEY}").as_str()))
            .and(wiremock::matchers::header("content-type", "application/x-www-form-urlencoded"))
            .respond_with(Refunder(state.clone()))
            .mount(&server)
            .await;
        Mock::given(wiremock::matchers::method("GET"))
            .and(wiremock::matchers::path_regex(r"^/v1/checkout/sessions/[^/]+$"))
            .and(wiremock::matchers::header("authorization", format!("Bearer {SECRET_KEY}").as_str()))
            .respond_with(SessionReader(state.clone()))
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

    /// Sessions created.
    pub fn sessions_created(&self) -> usize {
        self.state.lock().unwrap().sessions.len()
    }

    /// The (last) session created for `order_id`.
    pub fn session_for(&self, order_id: &str) -> Option<Value> {
        self.state.lock().unwrap().sessions.iter().rev().find(|s| s["client_reference_id"] == order_id).cloned()
    }

    /// The only session created so far, if exactly one was.
    pub fn session_for_any(&self) -> Option<Value> {
        let state = self.state.lock().unwrap();
        (state.sessions.len() == 1).then(|| state.sessions[0].clone())
    }

    /// Whether a customer opening the session's link could pay now (the session is open).
    pub fn can_pay(&self, session_id: &str) -> bool {
        self.state.lock().unwrap().sessions.iter().any(|s| s["id"] == session_id && s["status"] == "open")
    }

    /// Session ids the app asked Stripe to expire.
    pub fn expire_calls(&self) -> Vec<String> {
        self.state.lock().unwrap().expire_calls.clone()
    }

    /// The next creates fail with these statuses; each is stored for its key, as Stripe stores
    /// a first answer, and replayed to retries with that key.
    pub fn fail_next(&self, statuses: Vec<u16>) {
        self.state.lock().unwrap().failures.extend(statuses);
    }

    /// The next answers come after these delays (the session is created at once): an answer
    /// slower than the client's timeout, as when Stripe is slow after doing the work.
    pub fn delay_next(&self, delays: Vec<Duration>) {
        self.state.lock().unwrap().delays.extend(delays);
    }

    /// Every refund made, in order.
    pub fn refunds(&self) -> Vec<Value> {
        self.state.lock().unwrap().refunds.clone()
    }

    /// Every refund request, with its key and the status answered.
    pub fn refund_requests(&self) -> Vec<CreateRequest> {
        self.state.lock().unwrap().refund_requests.clone()
    }

    /// The next refund requests fail with these statuses (stored for their key and replayed).
    pub fn fail_next_refunds(&self, statuses: Vec<u16>) {
        self.state.lock().unwrap().refund_failures.extend(statuses);
    }

    /// The next refund answers come after these delays (the refund is made at once).
    pub fn delay_next_refunds(&self, delays: Vec<Duration>) {
        self.state.lock().unwrap().refund_delays.extend(delays);
    }

    /// A refund of what is left of the payment, made by hand in the dashboard (no key): the
    /// refund, and the `charge.refunded` object Stripe then sends.
    pub fn refund_in_dashboard(&self, payment_intent: &str) -> (Value, Value) {
        let mut state = self.state.lock().unwrap();
        let session = state
            .sessions
            .iter()
            .find(|s| wire::payment_intent_of(s["id"].as_str().unwrap_or("")) == payment_intent)
            .cloned()
            .expect("a payment of a session the fake made");
        let (paid, currency) =
            (session["amount_total"].as_i64().unwrap(), session["currency"].as_str().unwrap().to_string());
        let form: HashMap<String, String> = [("payment_intent".to_string(), payment_intent.to_string())].into();
        let left = paid - refunded(&state, payment_intent);
        let refund =
            wire::refund(&format!("re_dash_{:04}", state.refunds.len() + 1), &form, left, &currency, "succeeded");
        state.refunds.push(refund.clone());
        let refunds: Vec<Value> =
            state.refunds.iter().rev().filter(|r| r["payment_intent"] == payment_intent).cloned().collect();
        (refund, wire::refunded_charge(payment_intent, paid, &currency, &refunds))
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

pub use astria_wire::stripe::{event, payment_intent_of, signature};
pub use astria_wire::unix_now;

/// A completed session for `order_id`.
pub fn session(session_id: &str, order_id: &str, amount: i64, currency: &str, payment_status: &str) -> Value {
    wire::completed_session(session_id, order_id, amount, currency, payment_status)
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

/// Pays the Checkout session whose link is the WhatsApp send `link` (its text carries the
/// session's URL), as Stripe does: a signed `checkout.session.completed` the app must accept
/// as `paid`. Answers the order id.
pub async fn pay_link(app: &TestApp, stripe: &FakeStripe, link: &Value) -> String {
    let text = crate::whatsapp::summary(link);
    assert!(text.contains("checkout.stripe.com"), "not a payment link: {text}");
    let session_id = text.rsplit('/').next().unwrap().to_string();
    let order_id = stripe.session_for_any().unwrap()["client_reference_id"].as_str().unwrap().to_string();
    let paid = session(&session_id, &order_id, 1999, "usd", "paid");
    let (status, r) = post_event(app, &event(&format!("evt_{order_id}"), "checkout.session.completed", paid)).await;
    assert_eq!((status, r["result"].as_str()), (200, Some("paid")), "{r}");
    order_id
}
