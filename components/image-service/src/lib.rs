//! image-service: Astria's callbacks (`POST /pack-tune-received`, `POST /update-images`) and
//! the readiness check (`GET /health/image`). HTTP component; training itself is started by
//! its Redis-trigger sibling, `components/image-trainer`.
//!
//! Astria neither signs nor retries callbacks, so each URL carries the order id and a token
//! derived from `callback_secret` (checked in constant time: wrong or missing → 401, nothing
//! stored), and the trainer can always fetch the same facts later. Both callbacks accept the
//! object bare or wrapped. The tune callback records the training as finished and asks the
//! trainer (a `tune.trained` event) for the tune's prompt list; prompt callbacks go through
//! `spin_kit::images`, which delivers each image once. Unknown orders → 404; duplicates and
//! late callbacks → 200 without effect.

use astria_domain::astria::{self, AstriaError};
use astria_domain::events::{channels, TUNE_TRAINED};
use astria_domain::texts::Texts;
use astria_models::{OrderStatus, TuneTrained};
use astria_store::outbox::RelayPolicy;
use astria_store::{images, repo, transaction};
use spin_kit::error::ApiError;
use spin_kit::events::{self, now_ms};
use spin_kit::var;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

const SERVICE: &str = "image";
const MAX_BODY: usize = 1024 * 1024;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    let request_id = spin_kit::request_id_from(spin_kit::header(&req, "x-request-id").as_deref());
    let path_with_query = req.path_with_query().unwrap_or_default();
    let (path, query) = path_with_query.split_once('?').unwrap_or((&path_with_query, ""));
    let (path, query) = (path.to_string(), query.to_string());
    let result = match (req.method(), path.as_str()) {
        (Method::Get, "/health/image") => Ok(spin_kit::health::readiness(SERVICE, env!("CARGO_PKG_VERSION"))),
        (Method::Post, "/pack-tune-received" | "/update-images") => {
            match spin_kit::error::read_body(req, MAX_BODY).await {
                Ok(body) => callback(&path, &query, &body, &request_id),
                Err(e) => Err(e),
            }
        }
        (_, "/pack-tune-received" | "/update-images") => Err(ApiError::BadRequest("use POST".into())),
        _ => Err(ApiError::NotFound),
    };
    result.unwrap_or_else(|e| e.into_response(&request_id))
}

#[derive(serde::Serialize)]
struct Handled {
    result: &'static str,
    new_images: usize,
}

fn malformed(e: AstriaError) -> ApiError {
    ApiError::BadRequest(e.to_string())
}

/// The order a callback is for, if its token is right; checked before the database is even
/// opened, so a caller without the token learns nothing about which orders exist.
fn authorized_order_id(query: &str) -> Result<String, ApiError> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()).unwrap_or_default();
    let (order_id, token) = (param("order"), param("token"));
    if order_id.is_empty() || !astria::verify_callback_token(&var("callback_secret")?, &order_id, &token) {
        return Err(ApiError::Unauthorized);
    }
    Ok(order_id)
}

fn callback(path: &str, query: &str, body: &[u8], request_id: &str) -> Result<Response, ApiError> {
    let order_id = authorized_order_id(query)?;
    let db = spin_kit::open_db()?;
    let order = repo::get_order(&db, &order_id)?.ok_or(ApiError::NotFound)?;
    let texts = Texts::from_json_overrides(&var("texts_json")?).map_err(ApiError::Internal)?;
    let (handled, pending) = if path == "/pack-tune-received" {
        let tune = astria::parse_tune(body).map_err(malformed)?;
        if order.astria_tune_id != Some(tune.id) || tune.trained_at.is_none() {
            // Another tune, or not trained yet: nothing to act on.
            (Handled { result: "ignored", new_images: 0 }, vec![])
        } else {
            transaction(&db, |db| {
                repo::lock_order(db, &order.id)?;
                if !images::mark_trained(db, &order.id, now_ms())? {
                    return Ok((Handled { result: "duplicate", new_images: 0 }, vec![]));
                }
                let event = events::envelope(
                    TUNE_TRAINED,
                    &TuneTrained { order_id: order.id.clone(), tune_id: tune.id },
                    request_id,
                );
                let mut pending = vec![events::emit(db, channels::ORDERS, &event, &RelayPolicy::default())?];
                let mut finished = false;
                if order.status == OrderStatus::Delivering || order.status == OrderStatus::Training {
                    finished = spin_kit::images::finish_if_complete(
                        db,
                        &order.id,
                        &order.wa_id,
                        &texts.delivered_offer_more,
                        request_id,
                        &mut pending,
                    )?;
                }
                let result = if finished { "delivered" } else { "trained" };
                Ok::<_, ApiError>((Handled { result, new_images: 0 }, pending))
            })?
        }
    } else {
        let prompt = astria::parse_prompt(body).map_err(malformed)?;
        if prompt.tune_id.is_some() && prompt.tune_id != order.astria_tune_id {
            (Handled { result: "ignored", new_images: 0 }, vec![])
        } else if !matches!(order.status, OrderStatus::Training | OrderStatus::Delivering) {
            // Late: already delivered (or failed); nothing to add.
            (Handled { result: "late", new_images: 0 }, vec![])
        } else {
            transaction(&db, |db| {
                let d = spin_kit::images::record_prompt(db, &order, &prompt, &texts.delivered_offer_more, request_id)?;
                let result = match (d.order_delivered, d.new_images) {
                    (true, _) => "delivered",
                    (false, 0) => "duplicate",
                    _ => "delivering",
                };
                Ok::<_, ApiError>((Handled { result, new_images: d.new_images }, d.pending))
            })?
        }
    };
    events::publish(&db, &var("redis_url")?, &pending);
    Ok(spin_kit::json_response(200, &handled))
}
