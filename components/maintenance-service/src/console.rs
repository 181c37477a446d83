//! The operator console: one plain HTML page (console/index.html, app.js, style.css, no build
//! step) and the JSON it reads. The page itself holds no data and needs no token; the operator
//! types the admin token into it, and every data call carries it as a bearer token, like the
//! other `/maintenance` routes. The page also uses those routes: dead letters and their replay,
//! payment issues and their resolution.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /maintenance/console` (+ `/app.js`, `/style.css`) | the page |
//! | `GET /maintenance/console/api/funnel?days=N` | chats, orders, paid, delivered per UTC day |
//! | `GET /maintenance/console/api/attention?stuck_minutes=N` | orders that need a human |
//! | `GET /maintenance/console/api/orders/<id>` | one order, its customer's messages, its events |

use astria_store::console;
use spin_kit::error::ApiError;
use spin_kit::{events, open_db};
use spin_sdk::http::{Method, Response};

use crate::authorize;

const INDEX: &str = include_str!("console/index.html");
const APP_JS: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");

/// The page loads nothing but its own script and stylesheet and talks only to this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Days of funnel the page shows by default, and the most it may ask for.
const FUNNEL_DAYS: i64 = 14;
const MAX_FUNNEL_DAYS: i64 = 90;
/// A paid, training or delivering order unchanged this long is "stuck" unless the page asks
/// otherwise (the reconciliation asks Astria well before; an hour means it did not help).
const STUCK_MINUTES: i64 = 60;
/// Failed orders are listed for this long after they failed.
const FAILED_DAYS: i64 = 7;
const LIST_LIMIT: i64 = 200;

pub fn route(method: &Method, path: &str, query: &str, auth: &str) -> Result<Response, ApiError> {
    if *method != Method::Get {
        return Err(ApiError::BadRequest("use GET".into()));
    }
    match path {
        "/maintenance/console" => Ok(asset(INDEX, "text/html; charset=utf-8")),
        "/maintenance/console/app.js" => Ok(asset(APP_JS, "text/javascript; charset=utf-8")),
        "/maintenance/console/style.css" => Ok(asset(STYLE, "text/css; charset=utf-8")),
        "/maintenance/console/api/funnel" => authorize(auth).and_then(|()| funnel(query)),
        "/maintenance/console/api/attention" => authorize(auth).and_then(|()| attention(query)),
        _ => match path.strip_prefix("/maintenance/console/api/orders/") {
            Some(id) => authorize(auth).and_then(|()| order(id)),
            None => Err(ApiError::NotFound),
        },
    }
}

fn asset(body: &'static str, content_type: &str) -> Response {
    Response::builder()
        .status(200)
        .header("content-type", content_type)
        .header("content-security-policy", CSP)
        .header("x-content-type-options", "nosniff")
        .header("referrer-policy", "no-referrer")
        .header("cache-control", "no-store")
        .body(body)
        .build()
}

/// `name=<whole number in 1..=max>` from the query string, or `default` when absent.
fn bounded(query: &str, name: &str, default: i64, max: i64) -> Result<i64, ApiError> {
    let Some(raw) = crate::query_param(query, name) else { return Ok(default) };
    match raw.parse::<i64>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::BadRequest(format!("{name} must be a whole number from 1 to {max}"))),
    }
}

fn funnel(query: &str) -> Result<Response, ApiError> {
    let days = bounded(query, "days", FUNNEL_DAYS, MAX_FUNNEL_DAYS)?;
    let list = console::funnel(&open_db()?, events::now_ms(), days)?;
    Ok(spin_kit::json_response(200, &serde_json::json!({ "days": list })))
}

fn attention(query: &str) -> Result<Response, ApiError> {
    let stuck_minutes = bounded(query, "stuck_minutes", STUCK_MINUTES, 30 * 24 * 60)?;
    let now = events::now_ms();
    let list = console::needing_attention(
        &open_db()?,
        now - stuck_minutes * 60_000,
        now - FAILED_DAYS * console::DAY_MS,
        LIST_LIMIT,
    )?;
    Ok(spin_kit::json_response(200, &serde_json::json!({ "orders": list, "stuck_minutes": stuck_minutes })))
}

/// Order ids are UUIDs (and test ids plain words): letters, digits and `-` only; anything else
/// is refused before the database is asked.
fn valid_order_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

fn order(id: &str) -> Result<Response, ApiError> {
    if !valid_order_id(id) {
        return Err(ApiError::BadRequest("an order id holds letters, digits and '-' only".into()));
    }
    let story = console::order_story(&open_db()?, id, LIST_LIMIT)?.ok_or(ApiError::NotFound)?;
    // The messages as stored, with their JSON parsed so the page need not parse it twice.
    let messages: Vec<_> = story
        .messages
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.id, "kind": m.kind, "status": m.status, "created_at": m.created_at,
                "delivery_status": m.delivery_status, "error_code": m.error_code, "last_error": m.last_error,
                "message": serde_json::from_str::<serde_json::Value>(&m.message).unwrap_or(serde_json::Value::Null),
            })
        })
        .collect();
    let conversation = story.conversation.as_deref().and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok());
    Ok(spin_kit::json_response(
        200,
        &serde_json::json!({
            "order": story.order, "conversation": conversation, "messages": messages, "events": story.events,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_numbers_take_the_default_or_refuse() {
        assert_eq!(bounded("", "days", 14, 90).unwrap(), 14);
        assert_eq!(bounded("x=1&days=30", "days", 14, 90).unwrap(), 30);
        assert_eq!(bounded("daysx=3", "days", 14, 90).unwrap(), 14, "another name that starts alike");
        for bad in ["days=0", "days=91", "days=-1", "days=ten", "days="] {
            assert!(bounded(bad, "days", 14, 90).is_err(), "{bad}");
        }
    }

    #[test]
    fn order_ids_are_plain() {
        assert!(valid_order_id("3f0c8a4e-6f0e-4bb5-9d2b-0a8f9f1c2d3e"));
        for bad in ["", "a%b", "a_b", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_order_id(bad), "{bad}");
        }
    }
}
