//! Astria: `POST /p/{pack}/tunes` (multipart: the customer's photos and the callback URLs),
//! `GET /tunes/{id}` and `GET /tunes/{id}/prompts`, all with the API key. A tune trains for
//! `training_seconds`, then Astria calls the tune callback and, one by one, each prompt's
//! callback with its image links. With "drop Astria callbacks" on, the work is done and listed
//! but nobody is called: the app's reconciliation has to ask.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use astria_wire::astria as wire;

use crate::world::{bearer_is, Tune, World};

/// What each pack's prompts ask for; the portraits show the words.
pub const PROMPTS: [&str; 3] =
    ["studio headshot, soft light", "golden hour, outdoors", "black and white film portrait"];
pub const IMAGES_PER_PROMPT: usize = 2;

pub fn routes() -> Router<Arc<World>> {
    Router::new()
        .route("/p/{pack}/tunes", post(create))
        .route("/tunes/{id}", get(get_tune))
        .route("/tunes/{id}/prompts", get(prompts))
        .route("/sandbox/portrait/{tune}/{prompt}/{i}", get(portrait_image))
}

fn authorized(world: &World, headers: &HeaderMap) -> bool {
    bearer_is(headers, &world.config.astria_api_key)
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, Json(json!({ "error": "Unauthorized" }))).into_response()
}

fn tune_json(t: &Tune) -> Value {
    wire::tune(t.id, &t.title, &t.name, t.branch.as_deref(), t.photos.len(), t.trained)
}

fn prompt_json(t: &Tune, n: u64) -> Value {
    let id = wire::prompt_id(t.id, n);
    let images: Vec<String> = if t.released.contains(&n) {
        (0..IMAGES_PER_PROMPT).map(|i| wire::image_url(t.id, id, i)).collect()
    } else {
        vec![]
    };
    wire::prompt(t.id, n, &format!("{} of ohwx {}", PROMPTS[(n - 1) as usize], t.name), &images)
}

async fn create(
    State(world): State<Arc<World>>,
    Path(pack): Path<String>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Response {
    if !authorized(&world, &headers) {
        return unauthorized();
    }
    if world.state.lock().unwrap().faults.astria_refuses {
        world.log("astria", format!("pack {pack}: tune refused → 422 (fault switch)"));
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({ "base": ["This pack cannot be trained (sandbox switch)"] })),
        )
            .into_response();
    }
    let (mut title, mut name, mut branch, mut tune_cb, mut prompt_cb, mut photos) =
        (String::new(), String::new(), None, String::new(), String::new(), vec![]);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({ "error": e.to_string() }))).into_response(),
        };
        let field_name = field.name().unwrap_or_default().to_string();
        let Ok(bytes) = field.bytes().await else { return StatusCode::BAD_REQUEST.into_response() };
        let text = || String::from_utf8_lossy(&bytes).into_owned();
        match field_name.as_str() {
            wire::TITLE => title = text(),
            wire::NAME => name = text(),
            wire::BRANCH => branch = Some(text()),
            wire::TUNE_CALLBACK => tune_cb = text(),
            wire::PROMPT_CALLBACK => prompt_cb = text(),
            wire::IMAGES => photos.push(bytes.to_vec()),
            _ => {}
        }
    }
    if title.is_empty() || photos.is_empty() {
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"title": ["can't be blank"], "images": ["required"]})))
            .into_response();
    }
    let tune = {
        let mut state = world.state.lock().unwrap();
        let id = 1000 + state.tunes.len() as u64 + 1;
        let tune = Tune {
            id,
            title,
            name,
            branch,
            tune_callback: tune_cb,
            prompt_callback: prompt_cb,
            photos,
            trained: false,
            released: vec![],
        };
        let answer = tune_json(&tune);
        state.tunes.push(tune);
        answer
    };
    let id = tune["id"].as_u64().unwrap_or(0);
    world.log(
        "astria",
        format!(
            "pack {pack}: tune {id} created from {} photos, training {} s",
            tune["orig_images"].as_array().map_or(0, Vec::len),
            world.config.training_seconds
        ),
    );
    world.changed("tunes");
    tokio::spawn(train(world.clone(), id));
    (StatusCode::CREATED, Json(tune)).into_response()
}

/// Training, then the callbacks (unless dropped).
async fn train(world: Arc<World>, id: u64) {
    tokio::time::sleep(world.config.training()).await;
    let Some((body, url)) = with_tune(&world, id, |t| {
        t.trained = true;
        (tune_json(t), t.tune_callback.clone())
    }) else {
        return;
    };
    world.changed("tunes");
    call_back(&world, &url, &json!({ "tune": body }), &format!("tune {id} trained")).await;
    for n in 1..=PROMPTS.len() as u64 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let Some((body, url)) = with_tune(&world, id, |t| {
            t.released.push(n);
            (prompt_json(t, n), t.prompt_callback.clone())
        }) else {
            return;
        };
        world.changed("tunes");
        call_back(&world, &url, &json!({ "prompt": body }), &format!("tune {id} prompt {n} done")).await;
    }
}

fn with_tune<T>(world: &World, id: u64, f: impl FnOnce(&mut Tune) -> T) -> Option<T> {
    world.state.lock().unwrap().tunes.iter_mut().find(|t| t.id == id).map(f)
}

/// Astria's callback: a POST of the object to the URL the app gave (its path and query on the
/// app's address), retried a few times if the app does not take it.
async fn call_back(world: &World, url: &str, body: &Value, what: &str) {
    if world.state.lock().unwrap().faults.drop_astria_callbacks {
        world.log("astria", format!("{what}: callback dropped (fault switch)"));
        return;
    }
    let path = url.split_once("://").and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..])).unwrap_or(url);
    let bytes = serde_json::to_vec(body).expect("json");
    let status = world.deliver(path, &[], bytes, 4, |status| status == 200, |_| {}).await;
    let route = path.split('?').next().unwrap_or(path);
    world.log("astria", format!("{what}: callback {route} → {status}"));
}

async fn get_tune(State(world): State<Arc<World>>, Path(id): Path<u64>, headers: HeaderMap) -> Response {
    if !authorized(&world, &headers) {
        return unauthorized();
    }
    match with_tune(&world, id, |t| tune_json(t)) {
        Some(t) => {
            let trained = if t["trained_at"].is_null() { "still training" } else { "trained" };
            world.log("astria", format!("the app asked about tune {id}: {trained}"));
            Json(t).into_response()
        }
        None => (StatusCode::NOT_FOUND, Json(json!({ "error": "not found" }))).into_response(),
    }
}

async fn prompts(State(world): State<Arc<World>>, Path(id): Path<u64>, headers: HeaderMap) -> Response {
    if !authorized(&world, &headers) {
        return unauthorized();
    }
    match with_tune(&world, id, |t| (1..=PROMPTS.len() as u64).map(|n| prompt_json(t, n)).collect::<Vec<_>>()) {
        Some(p) => Json(p).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({ "error": "not found" }))).into_response(),
    }
}

/// Image `i` of prompt `prompt_id` of tune `tune_id`, once that prompt is done: one of the
/// customer's photos, filtered and captioned (made on demand; the same every time).
pub fn portrait(world: &World, tune_id: u64, prompt_id: u64, i: usize) -> Option<Vec<u8>> {
    let n = prompt_id.checked_sub(tune_id * 100)?;
    let (photo, text) = with_tune(world, tune_id, |t| {
        (t.released.contains(&n) && i < IMAGES_PER_PROMPT && !t.photos.is_empty()).then(|| {
            let photo = t.photos[(n as usize - 1 + i) % t.photos.len()].clone();
            (photo, PROMPTS[(n - 1) as usize].to_string())
        })
    })??;
    Some(crate::portrait::render(&photo, n as usize, &text))
}

async fn portrait_image(State(world): State<Arc<World>>, Path((tune, prompt, i)): Path<(u64, u64, usize)>) -> Response {
    match portrait(&world, tune, prompt, i) {
        Some(bytes) => ([("content-type", "image/jpeg")], bytes).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}
