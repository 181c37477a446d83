//! The WhatsApp Graph API as the app calls it: `POST /{version}/{phone-number-id}/messages`
//! (the bot's messages land in the customer's chat), `GET /{version}/{media-id}` and the
//! download URL it answers (the customers' photos, only with the access token).
//!
//! After accepting a send, WhatsApp reports it: a `sent` and a `delivered` status webhook
//! (`read` comes when the phone page shows it). An image message's link is downloaded first, as
//! WhatsApp does; a link it cannot fetch ends in a `failed` status with code 131053.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;

use astria_wire::whatsapp as wire;

use crate::world::{bearer_is, ChatMessage, World};

pub fn routes(version: &str) -> Router<Arc<World>> {
    Router::new()
        .route(&format!("/{version}/{{phone}}/messages"), post(send))
        .route(&format!("/{version}/{{media}}"), get(media_info))
        .route("/media-bytes/{media}", get(media_bytes))
}

fn graph_error(status: StatusCode, code: i64, message: &str) -> Response {
    (status, Json(wire::graph_error(code, message))).into_response()
}

async fn send(State(world): State<Arc<World>>, Path(phone): Path<String>, headers: HeaderMap, body: Bytes) -> Response {
    if !bearer_is(&headers, &world.config.access_token) {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token");
    }
    if phone != world.config.phone_number_id {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Unsupported post request");
    }
    let Ok(send): Result<Value, _> = serde_json::from_slice(&body) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "Invalid JSON");
    };
    // `to` (a phone number) wins over `recipient` (a BSUID), as in the Graph API.
    let Some(to) = wire::addressee(&send).map(str::to_string) else {
        return graph_error(StatusCode::BAD_REQUEST, 100, "The parameter to is required.");
    };
    let fault = world.state.lock().unwrap().faults.graph.clone();
    match fault.as_str() {
        "rate_limit" => {
            world.log("whatsapp", format!("send to {to} refused: 429 rate limit (fault switch)"));
            return graph_error(StatusCode::TOO_MANY_REQUESTS, 130429, "Rate limit hit");
        }
        "fail" => {
            world.log("whatsapp", format!("send to {to} failed: 500 (fault switch)"));
            return graph_error(StatusCode::INTERNAL_SERVER_ERROR, 131000, "Something went wrong");
        }
        _ => {}
    }
    let wamid = {
        let mut state = world.state.lock().unwrap();
        let wamid = format!("wamid.SBX{:06}", state.next());
        let message = ChatMessage {
            id: wamid.clone(),
            from_customer: false,
            body: send.clone(),
            status: "accepted".into(),
            at: astria_wire::unix_now(),
        };
        state.chat(&to).messages.push(message);
        wamid
    };
    world.changed(&format!("chat:{to}"));
    tokio::spawn(report(world.clone(), to.clone(), wamid.clone(), send));
    Json(wire::send_accepted(&to, &wamid)).into_response()
}

/// What WhatsApp does after accepting a send: fetch an image's link, then report the message
/// `sent` and `delivered` (or `failed`).
async fn report(world: Arc<World>, to: String, wamid: String, send: Value) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tag = send["biz_opaque_callback_data"].as_str().map(str::to_string);
    let mut outcome = Ok(());
    if let Some(link) = send["image"]["link"].as_str() {
        outcome = download(&world, &wamid, link).await;
    }
    if let Err(e) = &outcome {
        world.log("whatsapp", format!("could not fetch the image {wamid} links to: {e}"));
    }
    let steps: &[&str] = if outcome.is_ok() { &["sent", "delivered"] } else { &["failed"] };
    for status in steps {
        let code = outcome.is_err().then_some(131053);
        set_status(&world, &to, &wamid, status);
        let payload = wire::status(&world.config.phone_number_id, &wamid, &to, status, code, tag.as_deref());
        let answer = world.whatsapp_webhook(&payload, &format!("{status} status")).await;
        if answer != 200 {
            world.log("whatsapp", format!("the {status} status of {wamid} was not accepted ({answer})"));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub fn set_status(world: &World, wa_id: &str, wamid: &str, status: &str) {
    if let Some(m) = world.state.lock().unwrap().message(wa_id, wamid) {
        m.status = status.to_string();
    }
    world.changed(&format!("chat:{wa_id}"));
}

/// Fetches an image link as WhatsApp does and keeps the bytes as the message's media (the phone
/// shows them). Astria's image links are the sandbox's own portraits; any other host is
/// outside this machine's reach.
async fn download(world: &World, wamid: &str, link: &str) -> Result<(), String> {
    let bytes = match astria_wire::astria::parse_image_url(link) {
        Some((tune, prompt, i)) => crate::astria::portrait(world, tune, prompt, i).ok_or("no such image on Astria")?,
        None => return Err(format!("{link} is not reachable from the sandbox")),
    };
    world.state.lock().unwrap().media.insert(wamid.to_string(), bytes);
    Ok(())
}

async fn media_info(State(world): State<Arc<World>>, Path(media): Path<String>, headers: HeaderMap) -> Response {
    if !bearer_is(&headers, &world.config.access_token) {
        return graph_error(StatusCode::UNAUTHORIZED, 190, "Invalid OAuth access token");
    }
    let state = world.state.lock().unwrap();
    match state.media.get(&media) {
        Some(bytes) => {
            Json(wire::media_info(&media, &format!("{}/media-bytes/{media}", world.url), bytes)).into_response()
        }
        None => graph_error(StatusCode::BAD_REQUEST, 100, "Unsupported get request"),
    }
}

async fn media_bytes(State(world): State<Arc<World>>, Path(media): Path<String>, headers: HeaderMap) -> Response {
    if !bearer_is(&headers, &world.config.access_token) {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    match world.state.lock().unwrap().media.get(&media) {
        Some(bytes) => ([("content-type", "image/jpeg")], bytes.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
