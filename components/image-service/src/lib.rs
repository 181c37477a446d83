//! image-service: Astria's callbacks (`POST /pack-tune-received`, `POST /update-images`) and
//! the readiness check (`GET /health/image`). HTTP component; training itself is started by
//! its Redis-trigger sibling, `components/image-trainer`.
//!
//! Astria neither signs nor retries callbacks, so each URL carries the order id, an expiry and
//! a token derived from `callback_secret`, bound to the endpoint (checked in constant time:
//! wrong, missing, expired or another endpoint's → 401, nothing stored).
//!
//! A callback is only a signal. Its body is checked for Astria's shape (bare or wrapped; else
//! 400) and then ignored: whoever holds a token (Astria, a log reader) could write anything
//! there. The callback records a `tune.reconcile` event, and the trainer asks Astria itself,
//! with the API key, for the tune and its prompts, and delivers what is really there through
//! `spin_kit::images` (each image once, only `https` links on Astria's hosts). A callback that
//! comes before the training is recorded (the order is still `paid`) is kept the same way and
//! acted on once it is. Unknown orders → 404; callbacks for finished orders → 200 `late`.
//!
//! Replays are bounded: callbacks that arrive before a trainer starts its next pass for the
//! order are one event (its id names the order, the endpoint and the order's sync generation),
//! and only the trainer replica holding the order's sync lease asks Astria.

use astria_domain::astria::{self, AstriaError, CallbackEndpoint};
use astria_domain::config::{self, ExposeSecret};
use astria_domain::events::{channels, TUNE_RECONCILE};
use astria_models::{OrderStatus, TuneReconcile};
use astria_store::outbox::RelayPolicy;
use astria_store::{images, repo, transaction};
use spin_kit::error::ApiError;
use spin_kit::events::{self, now_ms};
use spin_kit::request::{read_body, Route};
use spin_kit::SpinVars;
use spin_sdk::http::{IncomingRequest, Method, Response, ResponseOutparam};
use spin_sdk::http_component;

const SERVICE: &str = "image";
const MAX_BODY: usize = 1024 * 1024;

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    // The body is written before the head is handed over (`spin_kit::respond` says why).
    spin_kit::respond(out, answer(req).await);
}

async fn answer(req: IncomingRequest) -> Response {
    let Route { request_id, method, path, query } = Route::of(&req);
    // Only the callbacks' spans are exported (see message-service).
    let trace = spin_kit::trace::Invocation::incoming("image-service", &req, &path)
        .exported(matches!(path.as_str(), "/pack-tune-received" | "/update-images"));
    let result = match (method, path.as_str()) {
        (Method::Get, "/health/image") => Ok(spin_kit::health::readiness(SERVICE, env!("CARGO_PKG_VERSION"))),
        (Method::Post, "/pack-tune-received" | "/update-images") => match read_body(req, MAX_BODY).await {
            Ok(body) => callback(&path, &query, &body, &request_id),
            Err(e) => Err(e),
        },
        (_, "/pack-tune-received" | "/update-images") => Err(ApiError::BadRequest("use POST".into())),
        _ => Err(ApiError::NotFound),
    };
    let response = result.unwrap_or_else(|e| e.into_response(&request_id));
    trace.answered(response)
}

#[derive(serde::Serialize)]
struct Handled {
    result: &'static str,
}

fn malformed(e: AstriaError) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

/// The order a callback is for, if its token is right for this endpoint and not expired;
/// checked before the database is even opened, so a caller without the token learns nothing
/// about which orders exist.
fn authorized_order_id(endpoint: CallbackEndpoint, query: &str) -> Result<String, ApiError> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let (order_id, token) = (param("order"), param("token"));
    let expires_at: i64 = param("exp").parse().map_err(|_| ApiError::Unauthorized)?;
    let cfg = config::callbacks(&SpinVars)?;
    let secret = cfg.callback_secret.expose_secret();
    if order_id.is_empty()
        || !astria::verify_callback_token(secret, endpoint, &order_id, expires_at, &token, now_ms() / 1000)
    {
        return Err(ApiError::Unauthorized);
    }
    Ok(order_id)
}

fn callback(path: &str, query: &str, body: &[u8], request_id: &str) -> Result<Response, ApiError> {
    let endpoint = CallbackEndpoint::from_path(path).ok_or(ApiError::NotFound)?;
    let order_id = authorized_order_id(endpoint, query)?;
    spin_kit::trace::set_order(&order_id);
    // The shape is checked (garbage is a caller's error), the content is not used.
    match endpoint {
        CallbackEndpoint::Tune => astria::parse_tune(body).map(|_| ()),
        CallbackEndpoint::Prompt => astria::parse_prompt(body).map(|_| ()),
    }
    .map_err(malformed)?;
    let db = spin_kit::open_db()?;
    let order = repo::get_order(&db, &order_id)?.ok_or(ApiError::NotFound)?;
    if !matches!(order.status, OrderStatus::Paid | OrderStatus::Training | OrderStatus::Delivering) {
        // Delivered, failed or otherwise finished: nothing left to fetch.
        return Ok(spin_kit::json_response(200, &Handled { result: "late" }));
    }
    // One signal per order, endpoint and sync generation: replays (a callback URL is valid for
    // 7 days and visible in ingress logs) while a signal waits are that same event, so they add
    // no outbox row and no Astria call; one trainer pass, which bumps the generation before it
    // asks Astria, answers them all.
    let pending = transaction(&db, |db| {
        let generation = images::sync_generation(db, &order.id)?.unwrap_or(0);
        let signal = TuneReconcile { order_id: order.id.clone(), tune_id: order.astria_tune_id.unwrap_or(0) };
        let mut event = events::envelope(TUNE_RECONCILE, &signal, request_id);
        event.id = format!("{}{}:{generation}", astria::callback_signal_prefix(&order.id), endpoint.name());
        Ok::<_, ApiError>(events::emit_once(db, channels::ORDERS, &event, &RelayPolicy::default())?)
    })?
    .into_iter()
    .collect::<Vec<_>>();
    events::publish(&db, config::redis_url(&SpinVars)?.expose_secret(), &pending);
    Ok(spin_kit::json_response(200, &Handled { result: "accepted" }))
}
