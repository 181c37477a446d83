//! maintenance-service: the weekly cleanup (`POST /maintenance/run`), the outbox relay
//! (`POST /maintenance/relay`) and operators' views: JSON lists, the metrics, and the console
//! page (`/maintenance/console`, console.rs). HTTP component; a thin adapter over the store's
//! `cleanup`, `metrics` and `console` and spin-kit's relay.
//!
//! Every route but health and the console's static page takes `Authorization: Bearer
//! <admin_token>`; `GET /maintenance/metrics` (Prometheus' text format, `astria_store::metrics`)
//! also takes the read-only `metrics_token`. Schedule: the cleanup on
//! Wednesdays at 04:00 UTC, the relay every minute (Kubernetes CronJobs in production, a loop in
//! `scripts/run.sh` for a local run). A second cleanup while one runs answers 409 and does
//! nothing; a crashed run's lease expires after `cleanup_lease_seconds`.

mod console;
mod reconcile;

use astria_domain::config::{self, ExposeSecret, SecretString};
use astria_store::cleanup::{self, Retention};
use astria_store::outbox::RelayPolicy;
use spin_kit::error::ApiError;
use spin_kit::events;
use spin_kit::SpinVars;
use spin_sdk::http::{IncomingRequest, Method, Response, ResponseOutparam};
use spin_sdk::http_component;
use subtle::ConstantTimeEq;

const SERVICE: &str = "maintenance";
/// Only resolving a payment issue takes a body (a short JSON note); any body is read only up to
/// this size, so that a large one costs nothing but a 413 (the buffered `Request` type would
/// hold any size in memory).
const MAX_BODY: usize = 64 * 1024;

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    // The body is written before the head is handed over (`spin_kit::respond` says why).
    spin_kit::respond(out, answer(req).await);
}

async fn answer(req: IncomingRequest) -> Response {
    let spin_kit::request::Route { request_id, method, path, query } = spin_kit::request::Route::of(&req);
    let auth = spin_kit::header(&req, "authorization").unwrap_or_default();
    // The operations' spans (cleanup, relay, replay, resolve) are exported; the reads (metrics
    // scrapes, the console, health probes) come every few seconds and change nothing, so theirs
    // are not, though their log lines carry a trace id too.
    let trace =
        spin_kit::trace::Invocation::incoming("maintenance-service", &req, &path).exported(method == Method::Post);
    let result = match spin_kit::request::read_body(req, MAX_BODY).await {
        Ok(body) => route(&method, &path, &query, &auth, &body, &request_id),
        Err(e) => Err(e),
    };
    let response = result.unwrap_or_else(|e| e.into_response(&request_id));
    trace.answered(response)
}

fn route(
    method: &Method,
    path: &str,
    query: &str,
    auth: &str,
    body: &[u8],
    request_id: &str,
) -> Result<Response, ApiError> {
    if path == "/maintenance/console" || path.starts_with("/maintenance/console/") {
        return console::route(method, path, query, auth);
    }
    match (method, path) {
        (Method::Get, "/health/maintenance") => Ok(spin_kit::health::readiness(SERVICE, env!("CARGO_PKG_VERSION"))),
        (Method::Post, "/maintenance/run") => authorize(auth).and_then(|()| cleanup(request_id)),
        (Method::Post, "/maintenance/relay") => authorize(auth).and_then(|()| relay(request_id)),
        (Method::Get, "/maintenance/metrics") => authorize_read(auth).and_then(|()| metrics()),
        (Method::Get, "/maintenance/dead-letters") => authorize(auth).and_then(|()| dead_letters()),
        (Method::Get, "/maintenance/payment-issues") => authorize(auth).and_then(|()| payment_issues()),
        (Method::Get, "/maintenance/messages") => authorize(auth).and_then(|()| outbound_messages(query)),
        // Authorised first; the id is parsed without slicing, so no path can make it panic.
        (Method::Post, path) if path.starts_with("/maintenance/dead-letters/") => authorize(auth).and_then(|()| {
            let id = id_in(path, "/maintenance/dead-letters/", "/replay").ok_or(ApiError::NotFound)?;
            replay(&id, request_id)
        }),
        (Method::Post, path) if path.starts_with("/maintenance/payment-issues/") => authorize(auth).and_then(|()| {
            if let Some(id) = id_in(path, "/maintenance/payment-issues/", "/resolve") {
                return resolve_payment_issue(&id, body, request_id);
            }
            let id = id_in(path, "/maintenance/payment-issues/", "/refund").ok_or(ApiError::NotFound)?;
            refund_payment_issue(&id, request_id)
        }),
        (Method::Post, path) if path.starts_with("/maintenance/orders/") => authorize(auth).and_then(|()| {
            let id = id_in(path, "/maintenance/orders/", "/resend").ok_or(ApiError::NotFound)?;
            resend_order(&id, request_id)
        }),
        (_, "/maintenance/relay" | "/maintenance/run") => Err(ApiError::BadRequest("use POST".into())),
        _ => Err(ApiError::NotFound),
    }
}

/// The `{id}` of `<prefix>{id}<suffix>`: one non-empty path segment, percent-decoded (the
/// console encodes ids, and the app's own issue ids hold a `:`), or None.
fn id_in(path: &str, prefix: &str, suffix: &str) -> Option<String> {
    let raw = path.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if raw.is_empty() || raw.contains('/') {
        return None;
    }
    let id = percent_encoding::percent_decode_str(raw).decode_utf8().ok()?;
    (!id.is_empty() && !id.contains('/') && !id.chars().any(char::is_control)).then(|| id.into_owned())
}

/// The value of `name=` in a query string, as given (the first one).
pub(crate) fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
}

/// Whether `header` is `Bearer <the value of variable token_var>`, compared in constant time.
/// An empty token configures no access.
fn bearer_matches(header: &str, expected: &SecretString) -> bool {
    let expected = expected.expose_secret();
    let given = header.strip_prefix("Bearer ").unwrap_or("");
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Bearer `admin_token`.
pub(crate) fn authorize(header: &str) -> Result<(), ApiError> {
    match bearer_matches(header, &config::operator_tokens(&SpinVars)?.admin) {
        true => Ok(()),
        false => Err(ApiError::Unauthorized),
    }
}

/// The admin token, or the read-only `metrics_token` (for a Prometheus scraper, which should
/// not be able to run the cleanup or replay dead letters).
fn authorize_read(header: &str) -> Result<(), ApiError> {
    let tokens = config::operator_tokens(&SpinVars)?;
    match bearer_matches(header, &tokens.metrics) || bearer_matches(header, &tokens.admin) {
        true => Ok(()),
        false => Err(ApiError::Unauthorized),
    }
}

fn metrics() -> Result<Response, ApiError> {
    let now = events::now_ms();
    let db = open_db()?;
    let snapshot = astria_store::metrics::snapshot(&db, &*spin_kit::open_inbox(&db)?, now)?;
    let body = astria_store::metrics::render(&snapshot, now, &astria_domain::events::channels::ALL);
    Ok(Response::builder()
        .status(200)
        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
        .header("cache-control", "no-store")
        .body(body)
        .build())
}

/// The store's retention periods from the configuration's (both in days).
fn retention(days: &config::RetentionDays) -> Retention {
    Retention {
        webhook_ids: days.webhook_ids,
        events: days.events,
        dead_letters: days.dead_letters,
        abandoned_orders: days.abandoned_orders,
        delivered_photos: days.delivered_photos,
        messages: days.messages,
        opted_out_contacts: days.opted_out_contacts,
        generated_images: days.generated_images,
    }
}

/// One cleanup run under the `cleanup` lease; answers what it did.
fn cleanup(request_id: &str) -> Result<Response, ApiError> {
    let cfg = config::maintenance(&SpinVars)?;
    let keep = retention(&cfg.retention);
    let batch = cfg.cleanup_batch;
    let lease_ms = cfg.cleanup_lease_seconds.saturating_mul(1000);
    let db = open_db()?;
    let holder = request_id.to_string();
    if !cleanup::acquire_lease(&db, "cleanup", &holder, events::now_ms(), lease_ms)? {
        return Err(ApiError::Conflict("a cleanup is already running".into()));
    }
    let started = events::now_ms();
    let result = spin_kit::open_inbox(&db).and_then(|inbox| Ok(cleanup::run(&db, &*inbox, started, &keep, batch)?));
    if let Err(e) = cleanup::release_lease(&db, "cleanup", &holder) {
        spin_kit::log::warn("maintenance.cleanup", &format!("lease left to expire: {e}"));
    }
    let report = result?;
    let took_ms = events::now_ms() - started;
    spin_kit::log::info_with("maintenance.cleanup", request_id, &format!("{report:?} in {took_ms} ms"));
    Ok(spin_kit::json_response(200, &serde_json::json!({ "report": report, "took_ms": took_ms })))
}

/// Asks about stale orders (reconcile.rs), folds the tallies' deltas, then republishes what is
/// due.
fn relay(request_id: &str) -> Result<Response, ApiError> {
    let cfg = config::maintenance(&SpinVars)?;
    let db = open_db()?;
    let redis_url = config::redis_url(&SpinVars)?;
    let redis_url = redis_url.expose_secret();
    let (stale, pending) = reconcile::run(&db, &cfg, request_id)?;
    // The history's counts (astria_store::tallies): a scrape then reads a minute's deltas at
    // most. Best effort: a failed fold leaves the deltas for the next minute (the counts stay
    // exact meanwhile), and must not keep the outbox's events from being relayed.
    let tallies_folded = astria_store::tallies::fold(&db).unwrap_or_else(|e| {
        spin_kit::log::warn("maintenance.relay", &format!("tallies not folded, left for the next run: {e}"));
        0
    });
    events::publish(&db, redis_url, &pending);
    let report = events::relay(&db, redis_url, &RelayPolicy::default(), cfg.relay_batch)?;
    if report.redis_unavailable {
        return Err(ApiError::Unavailable { dependency: "redis", detail: "relay could not publish".into() });
    }
    // Every worker replica that hears this books it: one whose subscription died silently
    // stops booking, and the metrics route shows it (astria_store::heartbeats).
    let heartbeats = spin_kit::heartbeat::publish(redis_url, request_id);
    // Webhooks stored while Redis was down, or left by a worker that died: wake a worker. On
    // SQLite, first any that a move from an earlier release's database left behind
    // (`inbox::adopt`); best effort, as the wake-up must not wait on it.
    let inbox = spin_kit::open_inbox(&db)?;
    let inbox_adopted = astria_store::inbox::adopt(&db, &*inbox).unwrap_or_else(|e| {
        spin_kit::log::warn(
            "maintenance.relay",
            &format!("inbox rows of the app's database not moved, left for the next run: {e}"),
        );
        0
    });
    let inbox_waiting = spin_kit::inbox::wake_if_waiting(&*inbox, redis_url, request_id)?;
    if report.republished > 0
        || report.dead_lettered > 0
        || stale.reconcile_requested > 0
        || stale.given_up > 0
        || stale.held_given_up > 0
        || stale.sends_revived > 0
        || stale.sends_given_up > 0
        || inbox_waiting > 0
        || inbox_adopted > 0
    {
        spin_kit::log::info_with(
            "maintenance.relay",
            request_id,
            &format!("{report:?} {stale:?} inbox_waiting={inbox_waiting} inbox_adopted={inbox_adopted}"),
        );
    }
    let mut body = serde_json::to_value(&report).map_err(|e| ApiError::Internal(e.into()))?;
    body["reconcile_requested"] = stale.reconcile_requested.into();
    body["given_up"] = stale.given_up.into();
    body["held_given_up"] = stale.held_given_up.into();
    body["sends_revived"] = stale.sends_revived.into();
    body["sends_given_up"] = stale.sends_given_up.into();
    body["heartbeats"] = heartbeats.into();
    body["inbox_waiting"] = inbox_waiting.into();
    body["inbox_adopted"] = inbox_adopted.into();
    body["tallies_folded"] = tallies_folded.into();
    Ok(spin_kit::json_response(200, &body))
}

use spin_kit::open_db;

/// Events the relay gave up on, for an operator to inspect (and replay once fixed).
fn dead_letters() -> Result<Response, ApiError> {
    let dead = astria_store::outbox::dead_letters(&open_db()?, 200)?;
    let list: Vec<_> = dead
        .iter()
        .map(|e| {
            serde_json::json!({
                "id": e.id, "channel": e.channel, "event_type": e.event_type,
                "attempts": e.attempts, "last_error": e.last_error,
            })
        })
        .collect();
    Ok(spin_kit::json_response(200, &serde_json::json!({ "dead_letters": list })))
}

/// Outbound WhatsApp messages in one status (`?status=failed` by default, or
/// `awaiting_window`, `queued`), newest first: what WhatsApp refused and why, for an operator.
fn outbound_messages(query: &str) -> Result<Response, ApiError> {
    use astria_store::messages::{self, status};
    let wanted = query_param(query, "status").unwrap_or(status::FAILED);
    let known = [status::FAILED, status::AWAITING_WINDOW, status::QUEUED, status::SENT];
    let Some(wanted) = known.into_iter().find(|s| *s == wanted) else {
        return Err(ApiError::BadRequest(format!("status must be one of {}", known.join(", "))));
    };
    let list: Vec<_> = messages::list(&open_db()?, wanted, 200)?
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.id, "to": m.wa_id, "kind": m.kind, "status": m.status, "attempts": m.attempts,
                "error_code": m.error_code, "last_error": m.last_error, "wamid": m.wamid,
                "delivery_status": m.delivery_status, "correlation_id": m.correlation_id,
            })
        })
        .collect();
    Ok(spin_kit::json_response(200, &serde_json::json!({ "messages": list })))
}

/// Payments that need an operator: money to refund, or events for unknown orders.
fn payment_issues() -> Result<Response, ApiError> {
    let db = open_db()?;
    let issues = astria_store::repo::open_payment_issues(&db, 200)?;
    // Where each issue's refund stands, if one was asked for.
    let mut refunds = std::collections::HashMap::new();
    for i in &issues {
        if let Some(r) = astria_store::refunds::of_issue(&db, &i.event_id)? {
            let view = serde_json::json!({ "status": r.status, "stripe_refund_id": r.stripe_refund_id,
                                           "attempts": r.attempts, "last_error": r.last_error });
            refunds.insert(i.event_id.clone(), view);
        }
    }
    let list: Vec<_> = issues
        .iter()
        .map(|i| {
            serde_json::json!({
                "event_id": i.event_id, "kind": i.kind.as_str(), "order_id": i.order_id, "session_id": i.session_id,
                "payment_intent": i.payment_intent, "amount": i.amount, "detail": i.detail, "created_at": i.created_at,
                "refund": refunds.get(&i.event_id),
            })
        })
        .collect();
    Ok(spin_kit::json_response(200, &serde_json::json!({ "payment_issues": list })))
}

/// An operator's Refund for a flagged payment (with `auto_refund` off, or after Stripe refused
/// and the cause is fixed): the same path as the app's own refunds, the same key, so pressing
/// it twice, or after the app refunded, gives the money back once. 202 with where the refund
/// stands; 404 for an unknown issue, 400 for a dispute (the bank settles those).
fn refund_payment_issue(issue_id: &str, request_id: &str) -> Result<Response, ApiError> {
    use astria_store::refunds;
    let db = open_db()?;
    let issue = astria_store::repo::payment_issue(&db, issue_id)?.ok_or(ApiError::NotFound)?;
    if issue.kind == astria_store::repo::IssueKind::Dispute {
        return Err(ApiError::BadRequest("a disputed payment is settled by the bank, not refunded".into()));
    }
    let pending = astria_store::transaction(&db, |db| -> Result<Vec<events::Pending>, astria_store::DbError> {
        let now = events::now_ms();
        match refunds::of_issue(db, issue_id)? {
            Some(r) if refunds::request_again(db, &r.id, now)? => {
                let event = events::envelope(
                    astria_domain::events::PAYMENT_REFUND,
                    &astria_models::PaymentRefund { refund_id: r.id.clone() },
                    request_id,
                );
                let policy = astria_store::outbox::RelayPolicy::default();
                Ok(vec![events::emit(db, astria_domain::events::channels::PAYMENTS, &event, &policy)?])
            }
            Some(_) => Ok(vec![]),
            None => Ok(spin_kit::refunds::request(db, &issue, request_id)?.into_iter().collect()),
        }
    })
    .map_err(ApiError::from)?;
    events::publish(&db, config::redis_url(&SpinVars)?.expose_secret(), &pending);
    let state = spin_kit::refunds::standing(&db, &issue)?.map(|r| r.status).unwrap_or_else(|| "none".into());
    spin_kit::log::info_with("maintenance.refund", request_id, &format!("refund of payment issue {issue_id}: {state}"));
    Ok(spin_kit::json_response(202, &serde_json::json!({ "issue": issue_id, "refund": state })))
}

/// Sends the portraits of a `delivery_failed` order again (WhatsApp is back, or the cause is
/// fixed): each failed portrait is queued anew, and the order becomes `delivered` when the last
/// is accepted. The refund flagged when it failed stays for the operator to decide on. 404 for
/// an unknown order, 409 for one that is not `delivery_failed` or has no failed portrait.
fn resend_order(order_id: &str, request_id: &str) -> Result<Response, ApiError> {
    use astria_models::OrderStatus;
    let db = open_db()?;
    let pending = astria_store::transaction(&db, |db| -> Result<Vec<events::Pending>, ApiError> {
        astria_store::repo::lock_order(db, order_id)?;
        let order = astria_store::repo::get_order(db, order_id)?.ok_or(ApiError::NotFound)?;
        if order.status != OrderStatus::DeliveryFailed {
            let status = astria_store::repo::status_str(order.status);
            return Err(ApiError::Conflict(format!("order is {status}: only a delivery_failed order is resent")));
        }
        let pending = spin_kit::messages::resend_portraits(db, order_id, request_id)?;
        if pending.is_empty() {
            return Err(ApiError::Conflict("the order has no failed portrait to resend".into()));
        }
        Ok(pending)
    })?;
    events::publish(&db, config::redis_url(&SpinVars)?.expose_secret(), &pending);
    spin_kit::log::info_with(
        "maintenance.resend",
        request_id,
        &format!("order {order_id}: {} portrait(s) queued again", pending.len()),
    );
    Ok(spin_kit::json_response(202, &serde_json::json!({ "order": order_id, "resent": pending.len() })))
}

/// The most an operator's note on a resolved payment issue may hold.
const MAX_NOTE_CHARS: usize = 500;

/// Records that an operator resolved a payment issue (refunded it, matched it by hand, ...):
/// body `{"note": "what was done"}`. 404 if the issue is unknown or resolved already.
fn resolve_payment_issue(event_id: &str, body: &[u8], request_id: &str) -> Result<Response, ApiError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Resolution {
        note: String,
    }
    let Resolution { note } = serde_json::from_slice(body)
        .map_err(|_| ApiError::BadRequest("the body must be {\"note\": \"what was done\"}".into()))?;
    let note = note.trim();
    if note.is_empty() || note.chars().count() > MAX_NOTE_CHARS {
        return Err(ApiError::BadRequest(format!("the note must hold 1 to {MAX_NOTE_CHARS} characters")));
    }
    // Text a person wrote: line breaks and tabs, but no other control characters (PostgreSQL
    // cannot store a NUL, and none belongs in a note shown on the console).
    if note.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApiError::BadRequest("the note must not hold control characters".into()));
    }
    if !astria_store::console::resolve_payment_issue(&open_db()?, event_id, note, events::now_ms())? {
        return Err(ApiError::NotFound);
    }
    spin_kit::log::info_with("maintenance.payment_issue", request_id, &format!("payment issue {event_id} resolved"));
    Ok(spin_kit::json_response(200, &serde_json::json!({ "resolved": event_id })))
}

/// Hands a dead-lettered event back to the relay with fresh attempts.
fn replay(id: &str, request_id: &str) -> Result<Response, ApiError> {
    if !astria_store::outbox::replay(&open_db()?, id, events::now_ms())? {
        return Err(ApiError::NotFound);
    }
    spin_kit::log::info_with("maintenance.replay", request_id, &format!("dead letter {id} handed back to the relay"));
    Ok(spin_kit::json_response(200, &serde_json::json!({ "replayed": id })))
}
