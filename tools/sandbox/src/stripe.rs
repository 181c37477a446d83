//! Stripe: `POST /v1/checkout/sessions` (idempotency as Stripe keeps it: the first answer to a
//! key is replayed, other parameters with the same key are refused),
//! `POST /v1/checkout/sessions/{id}/expire`, and the hosted checkout page. The page's buttons
//! send the events Stripe sends, signed with the webhook secret, to `/payment-received`:
//! - Pay: `checkout.session.completed` (paid);
//! - Fail (async): `checkout.session.completed` (unpaid, a bank debit pending), then
//!   `checkout.session.async_payment_failed`;
//! - Let expire: `checkout.session.expired`.
//!
//! `POST /v1/refunds` gives a session's payment back (idempotent like a create; what is left
//! of the payment at most) and sends `refund.created` and `charge.refunded`, as Stripe does;
//! the "refunds fail" switch answers 500 instead. `GET /v1/checkout/sessions/{id}` reads one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use astria_wire::stripe as wire;

use crate::world::{bearer_is, Session, Stored, World};

pub fn routes() -> Router<Arc<World>> {
    Router::new()
        .route("/v1/checkout/sessions", post(create))
        .route("/v1/checkout/sessions/{id}/expire", post(expire))
        .route("/v1/checkout/sessions/{id}", get(read_session))
        .route("/v1/refunds", post(refund))
        .route("/checkout/{id}", get(page))
        .route("/sandbox/checkout/{id}", get(session_json))
        .route("/sandbox/checkout/{id}/{action}", post(act))
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(wire::error(kind, message))).into_response()
}

fn authorized(world: &World, headers: &HeaderMap) -> bool {
    bearer_is(headers, &world.config.stripe_secret_key)
}

async fn create(State(world): State<Arc<World>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&world, &headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "Invalid API Key provided.");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
    {
        let mut state = world.state.lock().unwrap();
        match key.as_ref().and_then(|k| state.idempotency.get(k)) {
            Some(stored) if stored.form != form => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                )
            }
            Some(Stored { answer: None, .. }) => {
                return error(
                    StatusCode::CONFLICT,
                    "idempotency_error",
                    "There is currently another in-progress request using this Idempotent Key. Please try again later.",
                )
            }
            Some(Stored { answer: Some((status, body)), .. }) => {
                let (status, body) = (*status, body.clone());
                drop(state);
                world.log("stripe", format!("session create replayed for its idempotency key ({status})"));
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                return (status, [("idempotent-replayed", "true")], Json(body)).into_response();
            }
            None => {}
        }
        if let Err(body) = wire::validate_create(&form) {
            return (StatusCode::BAD_REQUEST, Json(body)).into_response();
        }
        if let Some(k) = &key {
            state.idempotency.insert(k.clone(), Stored { form: form.clone(), answer: None });
        }
    }
    // Stripe finishes the work whether or not the caller is still waiting (a caller that timed
    // out drops this handler; the task goes on).
    let work = tokio::spawn(finish_create(world.clone(), key, form));
    match work.await {
        Ok(session) => Json(session).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "the sandbox failed"),
    }
}

async fn finish_create(world: Arc<World>, key: Option<String>, form: HashMap<String, String>) -> Value {
    if world.state.lock().unwrap().faults.stripe_slow {
        let slow = world.config.stripe_slow_seconds;
        world.log("stripe", format!("session create: answering in {slow} s (fault switch)"));
        tokio::time::sleep(Duration::from_secs(slow)).await;
    }
    let session = {
        let mut state = world.state.lock().unwrap();
        let id = format!("cs_test_sbx{:04}", state.next());
        let session = wire::created_session(&id, &form);
        state.sessions.push(Session { object: session.clone() });
        if let Some(k) = key {
            state.idempotency.insert(k, Stored { form, answer: Some((200, session.clone())) });
        }
        session
    };
    world.log("stripe", format!("checkout session {} created", session["id"].as_str().unwrap_or("?")));
    world.changed("sessions");
    session
}

async fn expire(State(world): State<Arc<World>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if !authorized(&world, &headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "Invalid API Key provided.");
    }
    let answer = {
        let mut state = world.state.lock().unwrap();
        match state.sessions.iter_mut().find(|s| s.object["id"] == id.as_str()) {
            None => Err((StatusCode::NOT_FOUND, format!("No such checkout.session: '{id}'"))),
            Some(s) if s.object["status"] != "open" => Err((
                StatusCode::BAD_REQUEST,
                "Only Checkout Sessions with a status in [\"open\"] can be expired.".to_string(),
            )),
            Some(s) => {
                s.object["status"] = json!("expired");
                Ok(s.object.clone())
            }
        }
    };
    match answer {
        Ok(session) => {
            world.log("stripe", format!("checkout session {id} expired by the app"));
            world.changed("sessions");
            Json(session).into_response()
        }
        Err((status, message)) => error(status, "invalid_request_error", &message),
    }
}

fn session(world: &World, id: &str) -> Option<Value> {
    world.state.lock().unwrap().sessions.iter().find(|s| s.object["id"] == id).map(|s| s.object.clone())
}

/// The hosted payment page (the phone opens the session's `url` here).
async fn page(State(world): State<Arc<World>>, Path(id): Path<String>) -> Response {
    if session(&world, &id).is_none() {
        return (StatusCode::NOT_FOUND, Html("<h1>No such checkout session</h1>")).into_response();
    }
    Html(include_str!("../ui/checkout.html")).into_response()
}

/// A button of the checkout page: the session changes as Stripe's would, and the events go to
/// the app.
async fn act(State(world): State<Arc<World>>, Path((id, action)): Path<(String, String)>) -> Response {
    let Some(object) = session(&world, &id) else { return StatusCode::NOT_FOUND.into_response() };
    if object["status"] != "open" {
        let status = object["status"].as_str().unwrap_or("?");
        return (StatusCode::CONFLICT, Json(json!({ "error": format!("this session is {status}") }))).into_response();
    }
    let order = object["client_reference_id"].as_str().unwrap_or_default().to_string();
    let amount = object["amount_total"].as_i64().unwrap_or(0);
    let currency = object["currency"].as_str().unwrap_or("usd").to_string();
    let (new_status, events): (&str, Vec<(&str, Value)>) = match action.as_str() {
        "pay" => (
            "complete",
            vec![("checkout.session.completed", wire::completed_session(&id, &order, amount, &currency, "paid"))],
        ),
        "fail" => (
            "complete",
            vec![
                ("checkout.session.completed", wire::completed_session(&id, &order, amount, &currency, "unpaid")),
                (
                    "checkout.session.async_payment_failed",
                    wire::completed_session(&id, &order, amount, &currency, "unpaid"),
                ),
            ],
        ),
        "expire" => {
            let mut expired = object.clone();
            expired["status"] = json!("expired");
            ("expired", vec![("checkout.session.expired", expired)])
        }
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    {
        let mut state = world.state.lock().unwrap();
        if let Some(s) = state.sessions.iter_mut().find(|s| s.object["id"] == id.as_str()) {
            s.object["status"] = json!(new_status);
            if action == "pay" {
                s.object["payment_status"] = json!("paid");
            }
        }
    }
    world.changed("sessions");
    let mut answers = vec![];
    for (kind, object) in events {
        let event_id = format!("evt_sbx{:06}", world.state.lock().unwrap().next());
        let body = serde_json::to_vec(&wire::event(&event_id, kind, object)).expect("json");
        let signature = wire::signature(&[&world.config.stripe_webhook_secret], astria_wire::unix_now(), &body);
        // Stripe retries an event the endpoint did not take (for days; here a few times).
        let headers = [("stripe-signature", signature)];
        let taken = |status| (200..300).contains(&status);
        let status = world.deliver("/payment-received", &headers, body, 5, taken, |_| {}).await;
        world.log("stripe", format!("{kind} for {id} → the app answered {status}"));
        answers.push(json!({ "event": kind, "status": status }));
    }
    Json(json!({ "session": session(&world, &id), "events": answers })).into_response()
}

/// `GET /v1/checkout/sessions/{id}`, with the payment a completed one took.
async fn read_session(State(world): State<Arc<World>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if !authorized(&world, &headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "Invalid API Key provided.");
    }
    match session(&world, &id) {
        Some(mut s) => {
            if s["status"] == "complete" {
                s["payment_intent"] = json!(wire::payment_intent_of(&id));
            }
            Json(s).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "invalid_request_error", &format!("No such checkout.session: '{id}'")),
    }
}

/// `POST /v1/refunds`: the payment (or what is left of it) back, once per key.
async fn refund(State(world): State<Arc<World>>, headers: HeaderMap, body: Bytes) -> Response {
    if !authorized(&world, &headers) {
        return error(StatusCode::UNAUTHORIZED, "invalid_request_error", "Invalid API Key provided.");
    }
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
    let pi = form.get("payment_intent").cloned().unwrap_or_default();
    let (status, answer, made) = {
        let mut state = world.state.lock().unwrap();
        if let Some(stored) = key.as_ref().and_then(|k| state.idempotency.get(k)) {
            if stored.form != form {
                return error(
                    StatusCode::BAD_REQUEST,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                );
            }
            if let Some((status, body)) = &stored.answer {
                let mut r =
                    (StatusCode::from_u16(*status).unwrap_or(StatusCode::OK), Json(body.clone())).into_response();
                r.headers_mut().insert("idempotent-replayed", "true".parse().expect("header"));
                return r;
            }
        }
        let paid = state
            .sessions
            .iter()
            .find(|s| {
                wire::payment_intent_of(s.object["id"].as_str().unwrap_or("")) == pi && s.object["status"] == "complete"
            })
            .map(|s| {
                (
                    s.object["amount_total"].as_i64().unwrap_or(0),
                    s.object["currency"].as_str().unwrap_or("usd").to_string(),
                )
            });
        let left = |state: &crate::world::State, paid: i64| {
            paid - state
                .refunds
                .iter()
                .filter(|r| r["payment_intent"] == pi.as_str())
                .filter_map(|r| r["amount"].as_i64())
                .sum::<i64>()
        };
        let (status, answer, made) = match paid {
            _ if state.faults.refunds_fail => {
                (500, wire::error("api_error", "The refund could not be made (sandbox switch)."), None)
            }
            None => (
                400,
                wire::error_with_code(
                    "invalid_request_error",
                    "resource_missing",
                    &format!("No such payment_intent: '{pi}'"),
                ),
                None,
            ),
            Some((paid, _)) if left(&state, paid) <= 0 => (
                400,
                wire::error_with_code(
                    "invalid_request_error",
                    "charge_already_refunded",
                    "Charge has already been refunded.",
                ),
                None,
            ),
            Some((paid, currency)) => {
                let id = format!("re_sbx{:06}", state.next());
                let r = wire::refund(&id, &form, left(&state, paid), &currency, "succeeded");
                state.refunds.push(r.clone());
                (200, r.clone(), Some((paid, currency)))
            }
        };
        if let Some(k) = &key {
            state.idempotency.insert(k.clone(), Stored { form: form.clone(), answer: Some((status, answer.clone())) });
        }
        (status, answer, made)
    };
    world.changed("refunds");
    world.log("stripe", format!("refund of {pi} → {status}"));
    if let Some((paid, currency)) = made {
        // Stripe tells the endpoint too.
        let refunds: Vec<Value> = world
            .state
            .lock()
            .unwrap()
            .refunds
            .iter()
            .rev()
            .filter(|r| r["payment_intent"] == pi.as_str())
            .cloned()
            .collect();
        let charge = wire::refunded_charge(&pi, paid, &currency, &refunds);
        let events = [("refund.created", answer.clone()), ("charge.refunded", charge)];
        let world2 = world.clone();
        tokio::spawn(async move {
            for (kind, object) in events {
                let event_id = format!("evt_sbx{:06}", world2.state.lock().unwrap().next());
                let body = serde_json::to_vec(&wire::event(&event_id, kind, object)).expect("json");
                let signature =
                    wire::signature(&[&world2.config.stripe_webhook_secret], astria_wire::unix_now(), &body);
                let headers = [("stripe-signature", signature)];
                let taken = |status| (200..300).contains(&status);
                let status = world2.deliver("/payment-received", &headers, body, 5, taken, |_| {}).await;
                world2.log("stripe", format!("{kind} → the app answered {status}"));
            }
        });
    }
    (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), Json(answer)).into_response()
}

/// The session as the checkout page shows it.
async fn session_json(State(world): State<Arc<World>>, Path(id): Path<String>) -> Response {
    match session(&world, &id) {
        Some(s) => Json(s).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
