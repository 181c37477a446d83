//! WhatsApp for tests: webhook payloads shaped like Meta's, signed with the app secret, and a
//! fake Graph API (`POST /{version}/{phone-number-id}/messages`) that answers like the real one:
//! a fresh `wamid` per accepted message, or the error a test scripts. Switched on with
//! [`FakeGraph::report_statuses`], it also reports what it accepted as WhatsApp does: signed
//! `sent` then `delivered` status webhooks to the app, each repeating the send's
//! `biz_opaque_callback_data`, after the answer has left (late answers included).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use astria_wire::whatsapp as wire;
use serde_json::{json, Value};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

use crate::{app_manifest, spawn_app, AppConfig, TestApp, TestRedis};

pub const APP_SECRET: &str = "test-app-secret";
pub const VERIFY_TOKEN: &str = "test-verify-token";
pub const ACCESS_TOKEN: &str = "EAAG-test-access-token";
pub const PHONE_NUMBER_ID: &str = "106540352242922";
pub const API_VERSION: &str = "v24.0";
pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const TEMPLATE: &str = "order_update";

pub use astria_wire::unix_now;
pub use astria_wire::whatsapp::{addressee, as_username, sign, sticker, text, with_bsuid};

/// A webhook POST body carrying `messages` from one contact to our number.
pub fn inbound(from: &str, messages: Vec<Value>) -> Value {
    wire::inbound(PHONE_NUMBER_ID, from, "Ana", messages)
}

/// An image message of media `media-{id}`.
pub fn image(from: &str, id: &str, sha256_hex: &str) -> Value {
    wire::image(from, id, &format!("media-{id}"), sha256_hex)
}

/// The bytes the fake Graph API serves for `media_id`.
pub fn photo_bytes(media_id: &str) -> Vec<u8> {
    format!("\u{ff}\u{d8}photo-{media_id}").into_bytes()
}

/// An image message whose sha256 matches what the fake serves for it (media id `media-{id}`).
pub fn photo(from: &str, id: &str) -> Value {
    image(from, id, &astria_wire::sha256_hex(&photo_bytes(&format!("media-{id}"))))
}

pub fn button_reply(from: &str, id: &str, reply_id: &str, title: &str) -> Value {
    wire::button_reply(from, id, Some("wamid.previous"), reply_id, title)
}

pub fn list_reply(from: &str, id: &str, reply_id: &str, title: &str) -> Value {
    wire::list_reply(from, id, None, reply_id, title)
}

/// The messages of one order, as a customer sends them: hi, the pack list reply (corporate),
/// the subject button (man), two photos (the fake Graph API serves them), Done. Message ids are
/// `{prefix}1` to `{prefix}6`.
pub fn order_steps(from: &str, prefix: &str) -> [Value; 6] {
    let id = |n: u8| format!("{prefix}{n}");
    [
        text(from, &id(1), "hi"),
        list_reply(from, &id(2), "pack:corporate", "Corporate headshots"),
        button_reply(from, &id(3), "subject:man", "Man"),
        photo(from, &id(4)),
        photo(from, &id(5)),
        button_reply(from, &id(6), "done", "Done"),
    ]
}

/// A status webhook for a message we sent.
pub fn status(wamid: &str, recipient: &str, status: &str, error_code: Option<i64>) -> Value {
    status_tagged(wamid, recipient, status, error_code, None)
}

/// A status webhook that repeats the `biz_opaque_callback_data` the send carried, as WhatsApp's
/// do.
pub fn status_tagged(wamid: &str, recipient: &str, status: &str, error_code: Option<i64>, tag: Option<&str>) -> Value {
    wire::status(PHONE_NUMBER_ID, wamid, recipient, status, error_code, tag)
}

/// What the fake Graph API answers to one send.
#[derive(Clone, Debug)]
pub enum Answer {
    Ok,
    /// An error as Meta shapes it: HTTP status and Graph error code.
    Error(u16, i64),
    /// A bare HTTP status without a Graph error body (a proxy's 502, say).
    Status(u16),
    /// Accepted (a fresh wamid), but the answer comes after this delay: slower than a client's
    /// timeout, the send went out and the sender never hears so.
    Late(Duration),
}

/// A send the fake Graph API holds, unanswered, until the test opens it: for a test that must
/// change something in the app while a send is in flight, whatever the machine's speed.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<(bool, bool)>, std::sync::Condvar)>);

impl Gate {
    /// Whether the held send has arrived.
    pub fn arrived(&self) -> bool {
        self.0 .0.lock().unwrap().0
    }

    /// Waits (at most 30 s) until the held send has arrived.
    pub async fn wait_arrived(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.arrived() {
            assert!(std::time::Instant::now() < deadline, "the send to hold never reached the fake Graph API");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Lets the held send be answered.
    pub fn open(&self) {
        self.0 .0.lock().unwrap().1 = true;
        self.0 .1.notify_all();
    }

    /// In the fake's own server thread: marks the send arrived and blocks until the test opens
    /// the gate (60 s at most, so that a failed test cannot hang the run).
    fn hold(&self) {
        let (lock, opened) = &*self.0;
        let mut state = lock.lock().unwrap();
        state.0 = true;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !state.1 && std::time::Instant::now() < deadline {
            state = opened.wait_timeout(state, Duration::from_millis(100)).unwrap().0;
        }
    }
}

/// The fake Graph API. Answers come from a script (one per request, in order), then `Ok`; or
/// from a rule given per request body.
#[derive(Clone)]
pub struct FakeGraph {
    pub server: Arc<MockServer>,
    script: Arc<Mutex<Vec<Answer>>>,
    rule: Arc<Mutex<Option<Rule>>>,
    statuses: StatusQueue,
    /// Status webhooks the app did not accept (see `report_statuses`).
    refused: Arc<Mutex<Vec<String>>>,
    held: Arc<Mutex<Option<(Gate, Answer)>>>,
}

type Rule = Box<dyn Fn(&Value) -> Answer + Send + Sync>;

/// An accepted send to report: wamid, recipient, tag, and when its answer left.
type Accepted = (String, String, Option<String>, Duration);
type StatusQueue = Arc<Mutex<Option<tokio::sync::mpsc::UnboundedSender<Accepted>>>>;

struct Responder {
    script: Arc<Mutex<Vec<Answer>>>,
    rule: Arc<Mutex<Option<Rule>>>,
    counter: Arc<AtomicUsize>,
    statuses: StatusQueue,
    held: Arc<Mutex<Option<(Gate, Answer)>>>,
}

impl Respond for Responder {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
        let held = self.held.lock().unwrap().take();
        let scripted = match held {
            Some((gate, answer)) => {
                gate.hold();
                Some(answer)
            }
            None => {
                let mut s = self.script.lock().unwrap();
                (!s.is_empty()).then(|| s.remove(0))
            }
        };
        let answer = scripted.or_else(|| self.rule.lock().unwrap().as_ref().map(|r| r(&body))).unwrap_or(Answer::Ok);
        // Like the Graph API: a send names its recipient (`to`, or `recipient` for a BSUID).
        let Some(to) = wire::addressee(&body) else {
            return ResponseTemplate::new(400).set_body_json(wire::graph_error(100, "The parameter to is required."));
        };
        let accepted = |delay: Duration| {
            let n = self.counter.fetch_add(1, Ordering::SeqCst);
            let wamid = format!("wamid.TEST{n:06}");
            if let Some(tx) = self.statuses.lock().unwrap().as_ref() {
                let tag = body["biz_opaque_callback_data"].as_str().map(str::to_string);
                let _ = tx.send((wamid.clone(), to.to_string(), tag, delay));
            }
            ResponseTemplate::new(200).set_delay(delay).set_body_json(wire::send_accepted(to, &wamid))
        };
        match answer {
            Answer::Ok => accepted(Duration::ZERO),
            Answer::Late(delay) => accepted(delay),
            Answer::Error(status, code) => {
                ResponseTemplate::new(status).set_body_json(wire::graph_error(code, "scripted error"))
            }
            Answer::Status(status) => ResponseTemplate::new(status).set_body_string("<html>bad gateway</html>"),
        }
    }
}

impl FakeGraph {
    pub async fn start() -> FakeGraph {
        let server = MockServer::start().await;
        let script = Arc::new(Mutex::new(Vec::new()));
        let rule = Arc::new(Mutex::new(None));
        let counter = Arc::new(AtomicUsize::new(0));
        let statuses: StatusQueue = Arc::default();
        let held = Arc::new(Mutex::new(None));
        // Only well-formed, authenticated sends to our number are answered; anything else is a
        // 404 the sender would treat as a bug, and the tests see as an unmatched request.
        Mock::given(wiremock::matchers::method("POST"))
            .and(wiremock::matchers::path(format!("/{API_VERSION}/{PHONE_NUMBER_ID}/messages")))
            .and(wiremock::matchers::header("authorization", format!("Bearer {ACCESS_TOKEN}").as_str()))
            .and(wiremock::matchers::header("content-type", "application/json"))
            .respond_with(Responder {
                script: script.clone(),
                rule: rule.clone(),
                counter: counter.clone(),
                statuses: statuses.clone(),
                held: held.clone(),
            })
            .mount(&server)
            .await;
        FakeGraph { server: Arc::new(server), script, rule, statuses, refused: Arc::default(), held }
    }

    /// From now on, reports each accepted send to `app` as WhatsApp does: a signed `sent` status
    /// webhook just after the answer left, then `delivered`, both carrying the send's tag. The
    /// webhooks must be accepted (200); a refusal fails the test at its next `wait_for`.
    pub fn report_statuses(&self, app: &TestApp) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Accepted>();
        *self.statuses.lock().unwrap() = Some(tx);
        let (client, url, refused) = (app.client.clone(), app.url("/SmsReceived"), self.refused.clone());
        tokio::spawn(async move {
            while let Some((wamid, to, tag, delay)) = rx.recv().await {
                let (client, url, refused) = (client.clone(), url.clone(), refused.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(delay + Duration::from_millis(50)).await;
                    for st in ["sent", "delivered"] {
                        let body = serde_json::to_vec(&status_tagged(&wamid, &to, st, None, tag.as_deref())).unwrap();
                        let r = client
                            .post(&url)
                            .header("content-type", "application/json")
                            .header("x-hub-signature-256", sign(APP_SECRET, &body))
                            .body(body)
                            .send()
                            .await;
                        let code = r.map(|r| r.status().as_u16()).unwrap_or(0);
                        if code != 200 {
                            refused.lock().unwrap().push(format!("{st} status for {wamid}: HTTP {code}"));
                        }
                    }
                });
            }
        });
    }

    pub fn uri(&self) -> String {
        self.server.uri()
    }

    /// Serves media like WhatsApp: `GET /{version}/{media-id}` answers the download URL (on
    /// this server) and `GET /media-bytes/{media-id}` the bytes, both only with the token. The
    /// first `failures` lookups answer 500.
    pub async fn serve_media(&self, failures: usize) {
        let auth = format!("Bearer {ACCESS_TOKEN}");
        let lookups = Arc::new(AtomicUsize::new(0));
        let base = self.uri();
        Mock::given(wiremock::matchers::method("GET"))
            .and(wiremock::matchers::path_regex(format!("^/{API_VERSION}/media-[^/]+$")))
            .and(wiremock::matchers::header("authorization", auth.as_str()))
            .respond_with(move |req: &Request| {
                if lookups.fetch_add(1, Ordering::SeqCst) < failures {
                    return ResponseTemplate::new(500)
                        .set_body_json(json!({"error": {"message": "temporary", "code": 2}}));
                }
                let id = req.url.path().rsplit('/').next().unwrap_or("").to_string();
                ResponseTemplate::new(200).set_body_json(wire::media_info(
                    &id,
                    &format!("{base}/media-bytes/{id}"),
                    &photo_bytes(&id),
                ))
            })
            .mount(&self.server)
            .await;
        Mock::given(wiremock::matchers::method("GET"))
            .and(wiremock::matchers::path_regex("^/media-bytes/[^/]+$"))
            .and(wiremock::matchers::header("authorization", auth.as_str()))
            .respond_with(|req: &Request| {
                let id = req.url.path().rsplit('/').next().unwrap_or("").to_string();
                ResponseTemplate::new(200).insert_header("content-type", "image/jpeg").set_body_bytes(photo_bytes(&id))
            })
            .mount(&self.server)
            .await;
    }

    /// Media lookups received (each photo fetch starts with one).
    pub async fn media_lookups(&self) -> usize {
        let prefix = format!("/{API_VERSION}/media-");
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.method.as_str() == "GET" && r.url.path().starts_with(&prefix))
            .count()
    }

    /// Holds the next send unanswered until the returned gate is opened, then answers it with
    /// `answer`. The fake answers nothing else meanwhile (one server thread).
    pub fn hold_next(&self, answer: Answer) -> Gate {
        let gate = Gate::default();
        *self.held.lock().unwrap() = Some((gate.clone(), answer));
        gate
    }

    /// The next answers, in order.
    pub fn script(&self, answers: Vec<Answer>) {
        self.script.lock().unwrap().extend(answers);
    }

    /// Answers chosen from each request's JSON body (after the script is used up).
    pub fn rule(&self, rule: impl Fn(&Value) -> Answer + Send + Sync + 'static) {
        *self.rule.lock().unwrap() = Some(Box::new(rule));
    }

    /// Every send request's JSON body, in arrival order (media downloads left out).
    pub async fn requests(&self) -> Vec<Value> {
        self.server
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter(|r| r.method.as_str() == "POST")
            .map(|r| serde_json::from_slice(&r.body).unwrap_or(Value::Null))
            .collect()
    }

    /// Waits until at least `n` requests arrived, and answers them all; fails the test with
    /// what did arrive if they do not within 20 s.
    pub async fn wait_for(&self, n: usize) -> Vec<Value> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let refused = self.refused.lock().unwrap().clone();
            assert!(refused.is_empty(), "the app refused WhatsApp's status webhooks: {refused:?}");
            let r = self.requests().await;
            if r.len() >= n {
                return r;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "waited for {n} sends to WhatsApp, {} arrived ({}): {:#?}",
                    r.len(),
                    crate::open_files(),
                    r.iter().map(summary).collect::<Vec<_>>()
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// A one-line summary of a send, for readable assertions: `text:<body>`, `list:<body>`,
/// `buttons:<body>`, `image:<link>`, `template:<name>`.
pub fn summary(send: &Value) -> String {
    match send["type"].as_str().unwrap_or("") {
        "text" => format!("text:{}", send["text"]["body"].as_str().unwrap_or("")),
        "interactive" => format!(
            "{}:{}",
            if send["interactive"]["type"] == "list" { "list" } else { "buttons" },
            send["interactive"]["body"]["text"].as_str().unwrap_or("")
        ),
        "image" => format!("image:{}", send["image"]["link"].as_str().unwrap_or("")),
        "template" => format!("template:{}", send["template"]["name"].as_str().unwrap_or("")),
        other => format!("{other}:?"),
    }
}

/// The whole app configured for a fake Graph API and a Redis of the test's own.
pub fn bot_config(graph: &FakeGraph, redis: &TestRedis, postgres: bool) -> AppConfig {
    AppConfig { postgres, ..AppConfig::new(app_manifest()) }
        .var("redis_url", redis.url())
        .var("redis_host", redis.host())
        .var("whatsapp_app_secret", APP_SECRET)
        .var("whatsapp_verify_token", VERIFY_TOKEN)
        .var("whatsapp_access_token", ACCESS_TOKEN)
        .var("whatsapp_phone_number_id", PHONE_NUMBER_ID)
        .var("whatsapp_api_url", graph.uri())
        .var("whatsapp_api_version", API_VERSION)
        .var("whatsapp_template_name", TEMPLATE)
        .var("whatsapp_retry_base_ms", "20")
        .var("whatsapp_pace_ms", "50")
        .var("whatsapp_unconfirmed_wait_ms", "300")
        .var("admin_token", ADMIN_TOKEN)
        .var("min_photos", "2")
        .var("max_photos", "3")
}

/// Starts the app and waits until its Redis triggers listen.
pub async fn spawn_bot(config: AppConfig, redis: &TestRedis) -> TestApp {
    let app = spawn_app(config).await.expect("the app starts");
    crate::wait_for_subscribers_at(&redis.url(), "astria.messages", 1).await.expect("the sender subscribes");
    crate::wait_for_subscribers_at(&redis.url(), "astria.inbox", 1).await.expect("the conversation worker subscribes");
    app
}

/// One webhook of each kind a conversation sees, from `from`, in the order a customer sends
/// them, named for reports: hi, the pack list reply, the subject button, a photo, a question,
/// that question redelivered, and a delivery status. Ids carry `tag`.
pub fn one_of_each_kind(from: &str, tag: &str) -> Vec<(&'static str, Value)> {
    let id = |n: u32| format!("{tag}.{n}");
    vec![
        ("hi", inbound(from, vec![text(from, &id(1), "hi")])),
        ("pack list reply", inbound(from, vec![list_reply(from, &id(2), "pack:corporate", "Corporate")])),
        ("subject button", inbound(from, vec![button_reply(from, &id(3), "subject:man", "Man")])),
        ("photo", inbound(from, vec![photo(from, &id(4))])),
        ("question", inbound(from, vec![text(from, &id(5), "how long does it take?")])),
        ("duplicate", inbound(from, vec![text(from, &id(5), "how long does it take?")])),
        ("delivery status", status(&format!("wamid.{tag}"), from, "delivered", None)),
    ]
}

/// Waits until the conversation worker has worked every stored webhook through: the inbox
/// is empty (a row leaves it in the step's own commit order, after its effects are written).
pub async fn worked_through(app: &TestApp) {
    let db = crate::db::TestDb::inbox_of(app).await;
    let waiting = "SELECT COUNT(*) FROM inbox WHERE set_aside_at IS NULL";
    app.wait_until("the inbox to be worked through", Duration::from_secs(30), || async {
        (db.int(waiting, &[]).await == 0).then_some(())
    })
    .await
}

/// Posts a signed webhook body; answers status and JSON.
pub async fn post_webhook(app: &TestApp, body: &Value) -> (u16, Value) {
    post_webhook_as(app, body, None).await
}

/// [`post_webhook`] with the request's id (`x-request-id`): what its log lines and the events
/// it caused carry as their correlation id.
pub async fn post_webhook_as(app: &TestApp, body: &Value, request_id: Option<&str>) -> (u16, Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let mut request = app
        .client
        .post(app.url("/SmsReceived"))
        .header("content-type", "application/json")
        .header("x-hub-signature-256", sign(APP_SECRET, &bytes));
    if let Some(id) = request_id {
        request = request.header("x-request-id", id);
    }
    let r = request.body(bytes).send().await.expect("POST reaches the app");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Calls the outbox relay as the scheduler would.
pub async fn relay(app: &TestApp) -> Value {
    app.call("POST", "/maintenance/relay", Some(ADMIN_TOKEN), None).await.1
}

/// Stores a queued message as `spin_kit::messages::queue` does, and answers its `message.send`
/// envelope (not yet published).
pub async fn queue_directly(db: &crate::db::TestDb, to: &str, message: &Value) -> Value {
    let (id, event_id) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let kind = message["kind"].as_str().unwrap();
    db.execute(
        "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id, attempts, \
         next_attempt_at, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'queued', $6, 'test', 0, $7, $7, $7)",
        &[
            (&id).into(),
            to.into(),
            (now * 1000).into(),
            kind.into(),
            message.to_string().into(),
            (&event_id).into(),
            now.into(),
        ],
    )
    .await;
    message_send(&event_id, &id, to, message)
}

/// A `message.send` envelope for `message_id` to `to`, as the outbox publishes it.
pub fn message_send(event_id: &str, message_id: &str, to: &str, message: &Value) -> Value {
    json!({
        "id": event_id, "event_type": "message.send", "occurred_at": "2026-11-25T10:00:00Z",
        "correlation_id": "test", "payload": json!({"message_id": message_id, "to": to,
                                                     "message": message.to_string()}).to_string(),
    })
}

/// Publishes `envelope` on the sender's channel, as the outbox would, and checks the sender
/// listens.
pub async fn publish_message_send(redis: &TestRedis, envelope: &Value) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let n: i64 =
        redis::cmd("PUBLISH").arg("astria.messages").arg(envelope.to_string()).query_async(&mut conn).await.unwrap();
    assert_eq!(n, 1, "the sender listens");
}
