//! The customers' phones: the page (`/`), its live updates (server-sent events), and what a
//! customer does, each turned into the webhook WhatsApp would send the app: a text, a tap on a
//! reply button or a list row, a photo (re-encoded to a JPEG as WhatsApp does, kept as media the
//! app downloads with its token), and reading the bot's messages (`read` statuses).

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use serde_json::{json, Value};

use astria_wire::whatsapp as wire;

use crate::world::{ChatMessage, Faults, World};

pub fn routes() -> Router<Arc<World>> {
    Router::new()
        .route("/", get(|| async { Html(include_str!("../ui/index.html")) }))
        .route(
            "/sandbox/app.js",
            get(|| async { ([("content-type", "text/javascript")], include_str!("../ui/app.js")) }),
        )
        .route(
            "/sandbox/style.css",
            get(|| async { ([("content-type", "text/css")], include_str!("../ui/style.css")) }),
        )
        .route("/sandbox/state", get(|State(world): State<Arc<World>>| async move { Json(world.snapshot()) }))
        .route("/sandbox/events", get(events))
        .route("/sandbox/faults", post(set_faults))
        .route("/sandbox/media/{id}", get(media))
        .route("/sandbox/phone/{wa_id}/text", post(text))
        .route("/sandbox/phone/{wa_id}/reply", post(reply))
        .route("/sandbox/phone/{wa_id}/photo", post(photo))
        .route("/sandbox/phone/{wa_id}/read", post(read))
}

/// One event per change; the page fetches `/sandbox/state` again.
async fn events(State(world): State<Arc<World>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = world.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(what) => return Some((Ok(Event::default().data(what)), rx)),
                // A slow page missed some: one "everything" event catches it up.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    return Some((Ok(Event::default().data("all")), rx))
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn set_faults(State(world): State<Arc<World>>, Json(faults): Json<Faults>) -> Response {
    if !["", "rate_limit", "fail"].contains(&faults.graph.as_str()) {
        return (StatusCode::BAD_REQUEST, "graph must be '', 'rate_limit' or 'fail'").into_response();
    }
    let graph = match faults.graph.as_str() {
        "rate_limit" => "rate-limits sends",
        "fail" => "fails sends",
        _ => "accepts sends",
    };
    world.log(
        "sandbox",
        format!(
            "fault switches: Astria tunes {}, Astria callbacks {}, Graph API {graph}, Stripe {}, refunds {}",
            if faults.astria_refuses { "refused" } else { "trained" },
            if faults.drop_astria_callbacks { "dropped" } else { "sent" },
            if faults.stripe_slow { "slow" } else { "prompt" },
            if faults.refunds_fail { "fail" } else { "made" }
        ),
    );
    world.state.lock().unwrap().faults = faults;
    world.changed("faults");
    StatusCode::NO_CONTENT.into_response()
}

/// Media for the page (the app's download route needs the access token; the page does not).
async fn media(State(world): State<Arc<World>>, Path(id): Path<String>) -> Response {
    match world.state.lock().unwrap().media.get(&id) {
        Some(bytes) => ([("content-type", "image/jpeg")], bytes.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A phone number as WhatsApp writes a `wa_id` (digits only, with the country code), or the
/// business-scoped user id (`US.` and digits) of a customer with a username.
fn valid_wa_id(wa_id: &str) -> bool {
    let digits =
        |s: &str, n: std::ops::RangeInclusive<usize>| n.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
    match wa_id.split_once('.') {
        Some((country, rest)) => {
            country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase()) && digits(rest, 8..=20)
        }
        None => digits(wa_id, 8..=15),
    }
}

/// Records the customer's message and sends it to the app as WhatsApp would.
async fn deliver(world: Arc<World>, wa_id: String, shown: Value, message: impl FnOnce(&str) -> Value) -> Response {
    if !valid_wa_id(&wa_id) {
        return (
            StatusCode::BAD_REQUEST,
            "a phone number is 8 to 15 digits, country code first (or a user id: US. and digits)",
        )
            .into_response();
    }
    let (id, name) = {
        let mut state = world.state.lock().unwrap();
        let id = format!("wamid.SBXIN{:06}", state.next());
        let chat = state.chat(&wa_id);
        chat.messages.push(ChatMessage {
            id: id.clone(),
            from_customer: true,
            body: shown,
            status: "sending".into(),
            at: astria_wire::unix_now(),
        });
        (id, chat.name.clone())
    };
    world.changed(&format!("chat:{wa_id}"));
    let mut payload = wire::inbound(&world.config.phone_number_id, &wa_id, &name, vec![message(&id)]);
    if wire::is_user_id(&wa_id) {
        // A customer with a username: WhatsApp names them by their BSUID only.
        payload = wire::as_username(&payload, &wa_id, "sandbox.customer");
    }
    let world2 = world.clone();
    let (wa, mid) = (wa_id.clone(), id.clone());
    // WhatsApp retries in the background; the page sees the answer as the message's status.
    tokio::spawn(async move {
        let status = world2.whatsapp_webhook(&payload, "customer message").await;
        if let Some(m) = world2.state.lock().unwrap().message(&wa, &mid) {
            m.status = status.to_string();
        }
        world2.changed(&format!("chat:{wa}"));
    });
    Json(json!({ "id": id })).into_response()
}

#[derive(Deserialize)]
struct Text {
    body: String,
}

async fn text(State(world): State<Arc<World>>, Path(wa_id): Path<String>, Json(t): Json<Text>) -> Response {
    if t.body.trim().is_empty() || t.body.len() > 4096 {
        return (StatusCode::BAD_REQUEST, "a text is 1 to 4096 characters").into_response();
    }
    let body = t.body.clone();
    deliver(world, wa_id.clone(), json!({ "text": t.body }), move |id| wire::text(&wa_id, id, &body)).await
}

#[derive(Deserialize)]
struct Reply {
    /// `button` or `list`.
    kind: String,
    /// The bot message the reply answers.
    context: String,
    id: String,
    title: String,
}

async fn reply(State(world): State<Arc<World>>, Path(wa_id): Path<String>, Json(r): Json<Reply>) -> Response {
    let shown = json!({ "reply": r.title });
    let wa = wa_id.clone();
    match r.kind.as_str() {
        "button" => {
            deliver(world, wa_id, shown, move |id| wire::button_reply(&wa, id, Some(&r.context), &r.id, &r.title)).await
        }
        "list" => {
            deliver(world, wa_id, shown, move |id| wire::list_reply(&wa, id, Some(&r.context), &r.id, &r.title)).await
        }
        _ => (StatusCode::BAD_REQUEST, "kind is button or list").into_response(),
    }
}

/// WhatsApp recompresses photos; so does the sandbox (at most 1600 px, JPEG).
fn as_whatsapp_jpeg(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let img = image::load_from_memory(bytes).map_err(|e| format!("not an image WhatsApp could send: {e}"))?;
    let img = if img.width().max(img.height()) > 1600 {
        img.resize(1600, 1600, image::imageops::FilterType::Triangle)
    } else {
        img
    };
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img.to_rgb8())
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .map_err(|e| e.to_string())?;
    Ok(out.into_inner())
}

async fn photo(State(world): State<Arc<World>>, Path(wa_id): Path<String>, body: Bytes) -> Response {
    let jpeg = match as_whatsapp_jpeg(&body) {
        Ok(j) => j,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let sha = astria_wire::sha256_hex(&jpeg);
    let media_id = {
        let mut state = world.state.lock().unwrap();
        let media_id = format!("sbx-media-{:06}", state.next());
        state.media.insert(media_id.clone(), jpeg);
        media_id
    };
    let wa = wa_id.clone();
    let shown = json!({ "photo": media_id });
    deliver(world, wa_id, shown, move |id| wire::image(&wa, id, &media_id, &sha)).await
}

/// The phone showed the bot's messages: WhatsApp sends `read` for each delivered one.
async fn read(State(world): State<Arc<World>>, Path(wa_id): Path<String>) -> Response {
    let unread: Vec<(String, Option<String>)> = {
        let mut state = world.state.lock().unwrap();
        let Some(chat) = state.chats.get_mut(&wa_id) else { return StatusCode::NOT_FOUND.into_response() };
        chat.messages
            .iter_mut()
            .filter(|m| !m.from_customer && m.status == "delivered")
            .map(|m| {
                m.status = "read".into();
                (m.id.clone(), m.body["biz_opaque_callback_data"].as_str().map(str::to_string))
            })
            .collect()
    };
    if unread.is_empty() {
        return StatusCode::NO_CONTENT.into_response();
    }
    world.changed(&format!("chat:{wa_id}"));
    tokio::spawn(async move {
        for (wamid, tag) in unread {
            let payload = wire::status(&world.config.phone_number_id, &wamid, &wa_id, "read", None, tag.as_deref());
            world.whatsapp_webhook(&payload, "read status").await;
        }
    });
    StatusCode::NO_CONTENT.into_response()
}
