//! Astria for tests: a fake API that trains pack tunes (multipart `POST /p/{pack}/tunes`; every
//! create is a new tune, as on an account without title idempotency), lists a tune's prompts
//! (`GET /tunes/{id}/prompts`), and calls the callbacks back the way Astria does: the tune
//! callback when training ends, then one prompt callback per prompt with its image URLs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use astria_wire::astria as wire;
use serde_json::{json, Value};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::{AppConfig, TestApp};

pub const API_KEY: &str = "sd_test_astria_key";
pub const CALLBACK_SECRET: &str = "test-callback-secret";

/// One tune the fake made.
#[derive(Clone, Debug)]
pub struct FakeTune {
    pub id: u64,
    pub pack_id: String,
    pub title: String,
    pub name: String,
    pub image_count: usize,
    pub branch: Option<String>,
    pub tune_callback: String,
    pub prompt_callback: String,
    /// Prompts that are done (their images are then listed too), called back or not.
    pub released: Vec<u64>,
    /// Training finished (GET /tunes/{id} says so), called back or not.
    pub trained: bool,
}

#[derive(Default)]
struct State {
    /// Every tune created, in order: a create is a new tune, as on an account without title
    /// idempotency, so "one tune per order" has to come from the app.
    tunes: Vec<FakeTune>,
    /// Delays of the next create answers (the tune exists at once).
    create_delays: Vec<std::time::Duration>,
    creates: usize,
    /// Statuses to answer the next creates with (e.g. 504, 422).
    failures: Vec<u16>,
}

/// Prompts per tune and images per prompt of every pack.
pub const PROMPTS: u64 = 3;
pub const IMAGES_PER_PROMPT: usize = 2;

fn prompt_json(tune: &FakeTune, prompt: u64, with_images: bool) -> Value {
    let id = wire::prompt_id(tune.id, prompt);
    let images: Vec<String> =
        if with_images { (0..IMAGES_PER_PROMPT).map(|i| wire::image_url(tune.id, id, i)).collect() } else { vec![] };
    wire::prompt(tune.id, prompt, &format!("portrait {prompt} of ohwx {}", tune.name), &images)
}

fn tune_json(t: &FakeTune, trained: bool) -> Value {
    wire::tune(t.id, &t.title, &t.name, t.branch.as_deref(), t.image_count, trained)
}

/// The text fields and the file count of a multipart body.
fn parse_multipart(content_type: &str, body: &[u8]) -> (HashMap<String, String>, usize) {
    let boundary = content_type.split("boundary=").nth(1).unwrap_or("").trim_matches('"');
    let text = String::from_utf8_lossy(body);
    let mut fields = HashMap::new();
    let mut files = 0;
    for part in text.split(&format!("--{boundary}")) {
        let Some((head, value)) = part.split_once("\r\n\r\n") else { continue };
        let Some(name) = head.split("name=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        if head.contains("filename=") {
            files += 1;
        } else {
            fields.insert(name.to_string(), value.trim_end_matches("\r\n").to_string());
        }
    }
    (fields, files)
}

struct Create(Arc<Mutex<State>>);

impl Respond for Create {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let content_type = request.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("");
        let (fields, files) = parse_multipart(content_type, &request.body);
        let mut state = self.0.lock().unwrap();
        state.creates += 1;
        if !state.failures.is_empty() {
            let status = state.failures.remove(0);
            return ResponseTemplate::new(status).set_body_json(json!({"base": ["scripted failure"]}));
        }
        let title = fields.get(wire::TITLE).cloned().unwrap_or_default();
        if title.is_empty() || files == 0 {
            return ResponseTemplate::new(422)
                .set_body_json(json!({"title": ["can't be blank"], "images": ["required"]}));
        }
        let pack_id = request.url.path().split('/').nth(2).unwrap_or("").to_string();
        let next_id = 1000 + state.tunes.len() as u64 + 1;
        let tune = FakeTune {
            id: next_id,
            pack_id,
            title,
            name: fields.get(wire::NAME).cloned().unwrap_or_default(),
            image_count: files,
            branch: fields.get(wire::BRANCH).cloned(),
            tune_callback: fields.get(wire::TUNE_CALLBACK).cloned().unwrap_or_default(),
            prompt_callback: fields.get(wire::PROMPT_CALLBACK).cloned().unwrap_or_default(),
            released: vec![],
            trained: false,
        };
        state.tunes.push(tune.clone());
        let delay =
            if state.create_delays.is_empty() { std::time::Duration::ZERO } else { state.create_delays.remove(0) };
        ResponseTemplate::new(201).set_body_json(tune_json(&tune, false)).set_delay(delay)
    }
}

struct GetTune(Arc<Mutex<State>>);

impl Respond for GetTune {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id: u64 = request.url.path().split('/').nth(2).and_then(|s| s.parse().ok()).unwrap_or(0);
        let state = self.0.lock().unwrap();
        match state.tunes.iter().find(|t| t.id == id) {
            Some(t) => ResponseTemplate::new(200).set_body_json(tune_json(t, t.trained)),
            None => ResponseTemplate::new(404).set_body_json(json!({"error": "not found"})),
        }
    }
}

struct ListPrompts(Arc<Mutex<State>>);

impl Respond for ListPrompts {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let id: u64 = request.url.path().split('/').nth(2).and_then(|s| s.parse().ok()).unwrap_or(0);
        let state = self.0.lock().unwrap();
        match state.tunes.iter().find(|t| t.id == id) {
            Some(t) => ResponseTemplate::new(200)
                .set_body_json((1..=PROMPTS).map(|p| prompt_json(t, p, t.released.contains(&p))).collect::<Vec<_>>()),
            None => ResponseTemplate::new(404).set_body_json(json!({"error": "not found"})),
        }
    }
}

#[derive(Clone)]
pub struct FakeAstria {
    pub server: Arc<MockServer>,
    state: Arc<Mutex<State>>,
}

impl FakeAstria {
    pub async fn start() -> FakeAstria {
        let server = MockServer::start().await;
        let state = Arc::new(Mutex::new(State::default()));
        let auth = format!("Bearer {API_KEY}");
        Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::path_regex(r"^/p/[0-9]+/tunes$"))
            .and(wiremock::matchers::header("authorization", auth.as_str()))
            .respond_with(Create(state.clone()))
            .mount(&server)
            .await;
        Mock::given(wiremock::matchers::method("GET"))
            .and(wiremock::matchers::path_regex(r"^/tunes/[0-9]+$"))
            .and(wiremock::matchers::header("authorization", auth.as_str()))
            .respond_with(GetTune(state.clone()))
            .mount(&server)
            .await;
        Mock::given(wiremock::matchers::method("GET"))
            .and(wiremock::matchers::path_regex(r"^/tunes/[0-9]+/prompts$"))
            .and(wiremock::matchers::header("authorization", auth.as_str()))
            .respond_with(ListPrompts(state.clone()))
            .mount(&server)
            .await;
        FakeAstria { server: Arc::new(server), state }
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    pub fn tunes(&self) -> Vec<FakeTune> {
        self.state.lock().unwrap().tunes.clone()
    }

    /// GET requests received (a tune, a prompt list): what asking Astria costs against the
    /// shared API key's rate limit.
    pub async fn reads(&self) -> usize {
        self.read_paths().await.len()
    }

    /// The paths of the GET requests received, in order.
    pub async fn read_paths(&self) -> Vec<String> {
        let received = self.server.received_requests().await.unwrap_or_default();
        received.iter().filter(|r| r.method.as_str() == "GET").map(|r| r.url.path().to_string()).collect()
    }

    /// Create requests received, failed ones included.
    pub fn creates(&self) -> usize {
        self.state.lock().unwrap().creates
    }

    /// The next create answers come after these delays; the tune exists (and Astria may call
    /// back) before the app hears of it.
    pub fn delay_next_create(&self, delays: Vec<std::time::Duration>) {
        self.state.lock().unwrap().create_delays.extend(delays);
    }

    pub fn fail_next(&self, statuses: Vec<u16>) {
        self.state.lock().unwrap().failures.extend(statuses);
    }

    /// Astria finishes `title`'s tune and the given prompts (1-based) without calling anybody
    /// back: a dropped callback, as when the app was down or being deployed.
    pub fn finish_silently(&self, title: &str, prompts: &[u64]) {
        let mut state = self.state.lock().unwrap();
        let t = state.tunes.iter_mut().rev().find(|t| t.title == title).expect("a tune for this title");
        t.trained = true;
        for p in prompts {
            if !t.released.contains(p) {
                t.released.push(*p);
            }
        }
    }

    /// The tune callback for `title`'s tune, to the app (Astria would call `public_base_url`;
    /// the fake keeps the path and query, with the token, and calls `app`).
    pub async fn call_back_tune(&self, app: &TestApp, title: &str, wrapped: bool) -> (u16, Value) {
        self.finish_silently(title, &[]);
        let tune = self.tunes().into_iter().rev().find(|t| t.title == title).expect("a tune for this title");
        let body = if wrapped { json!({ "tune": tune_json(&tune, true) }) } else { tune_json(&tune, true) };
        post(app, &tune.tune_callback, &body).await
    }

    /// The prompt callback of prompt `n` (1-based) of `title`'s tune.
    pub async fn call_back_prompt(&self, app: &TestApp, title: &str, n: u64, wrapped: bool) -> (u16, Value) {
        let tune = {
            let mut state = self.state.lock().unwrap();
            let t = state.tunes.iter_mut().rev().find(|t| t.title == title).expect("a tune for this title");
            if !t.released.contains(&n) {
                t.released.push(n);
            }
            t.clone()
        };
        let prompt = prompt_json(&tune, n, true);
        let body = if wrapped { json!({ "prompt": prompt }) } else { prompt };
        post(app, &tune.prompt_callback, &body).await
    }

    /// Everything Astria sends when a tune is done: the tune callback, then every prompt's.
    pub async fn finish(&self, app: &TestApp, title: &str) {
        assert_eq!(self.call_back_tune(app, title, false).await.0, 200);
        for n in 1..=PROMPTS {
            assert_eq!(self.call_back_prompt(app, title, n, n % 2 == 0).await.0, 200);
        }
    }
}

/// POSTs `body` to `url`'s path and query on `app`.
pub async fn post(app: &TestApp, url: &str, body: &Value) -> (u16, Value) {
    let path = url.split_once("://").map(|(_, rest)| rest).and_then(|r| r.find('/').map(|i| &r[i..])).unwrap_or(url);
    let r = app.client.post(app.url(path)).json(body).send().await.expect("callback reaches the app");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Adds the Astria settings pointing at `astria` (test mode on, as a test account would).
pub fn with_astria(config: AppConfig, astria: &FakeAstria, media_host: &str) -> AppConfig {
    config
        .var("astria_api_key", API_KEY)
        .var("astria_api_url", astria.uri())
        .var("astria_test_mode", "true")
        .var("callback_secret", CALLBACK_SECRET)
        .var("public_base_url", "https://bot.example.com")
        .var("whatsapp_media_url", media_host)
}

/// The whole app against fake WhatsApp, Stripe and Astria servers (media served by the fake
/// Graph API), on PostgreSQL or SQLite.
pub fn bot_config(
    graph: &crate::whatsapp::FakeGraph,
    redis: &crate::TestRedis,
    stripe: &crate::stripe::FakeStripe,
    astria: &FakeAstria,
    postgres: bool,
) -> AppConfig {
    let base = crate::stripe::with_stripe(crate::whatsapp::bot_config(graph, redis, postgres), stripe);
    with_astria(base, astria, &graph.uri())
}
