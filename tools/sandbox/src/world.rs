//! What the sandbox remembers (chats, media, Checkout Sessions, tunes, fault switches, an
//! activity log), the live-update channel the page listens to, and the one way out to the app:
//! a POST to one of its public routes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::Config;

/// One message in a chat, from the customer or from the bot (the business number).
#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    /// The wamid: WhatsApp's id for the message, in both directions.
    pub id: String,
    pub from_customer: bool,
    /// For the bot: the Graph API send body as the app sent it. For the customer: what they did
    /// (`{"text": …}`, `{"photo": media id}`, `{"reply": title}`).
    pub body: Value,
    /// Bot messages: `sent`, `delivered`, `read` or `failed`. Customer messages: what the app
    /// answered the webhook (`200`, `503`, …).
    pub status: String,
    pub at: i64,
}

#[derive(Default, Serialize)]
pub struct Chat {
    pub name: String,
    pub messages: Vec<ChatMessage>,
}

/// The fault switches of the control panel.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Faults {
    /// Astria trains and finishes, but never calls back: the app's reconciliation has to ask.
    pub drop_astria_callbacks: bool,
    /// The Graph API answers sends with `rate_limit` (429, code 130429) or `fail` (500, code
    /// 131000); empty: it accepts them.
    pub graph: String,
    /// Stripe answers session creates after `stripe_slow_seconds`.
    pub stripe_slow: bool,
    /// Stripe fails refunds (500): the app retries with backoff and the same key.
    #[serde(default)]
    pub refunds_fail: bool,
    /// Astria refuses new tunes (422): the order fails after payment, and the app refunds it.
    #[serde(default)]
    pub astria_refuses: bool,
}

/// One line of the activity log: who did what, and how it was answered.
#[derive(Clone, Debug, Serialize)]
pub struct Activity {
    pub at: i64,
    /// `whatsapp`, `stripe`, `astria` or `sandbox` (the switches).
    pub party: &'static str,
    pub text: String,
}

/// A Checkout Session and what Stripe keeps for an idempotency key.
pub struct Session {
    pub object: Value,
}

/// The first request with a key: its parameters, and its answer once there is one (`None`
/// while it is still being answered: Stripe answers 409 to another request with the key).
pub struct Stored {
    pub form: HashMap<String, String>,
    pub answer: Option<(u16, Value)>,
}

/// One pack tune.
pub struct Tune {
    pub id: u64,
    pub title: String,
    pub name: String,
    pub branch: Option<String>,
    pub tune_callback: String,
    pub prompt_callback: String,
    /// The customer's photos as the app uploaded them.
    pub photos: Vec<Vec<u8>>,
    pub trained: bool,
    /// Prompts (1-based) that are done.
    pub released: Vec<u64>,
}

#[derive(Default)]
pub struct State {
    pub chats: BTreeMap<String, Chat>,
    /// WhatsApp media by id: the customers' photos, and what WhatsApp downloaded for the bot's
    /// image messages.
    pub media: HashMap<String, Vec<u8>>,
    pub sessions: Vec<Session>,
    /// Refunds Stripe made, in order.
    pub refunds: Vec<Value>,
    pub idempotency: HashMap<String, Stored>,
    pub tunes: Vec<Tune>,
    pub faults: Faults,
    pub activity: Vec<Activity>,
    seq: u64,
}

impl State {
    /// A number unique in this run, for ids.
    pub fn next(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub fn chat(&mut self, wa_id: &str) -> &mut Chat {
        self.chats.entry(wa_id.to_string()).or_insert_with(|| Chat { name: "Ana".into(), messages: vec![] })
    }

    pub fn message(&mut self, wa_id: &str, id: &str) -> Option<&mut ChatMessage> {
        self.chats.get_mut(wa_id)?.messages.iter_mut().find(|m| m.id == id)
    }
}

pub struct World {
    pub config: Config,
    /// The sandbox's own base URL (media download links point here).
    pub url: String,
    pub state: Mutex<State>,
    pub client: reqwest::Client,
    updates: broadcast::Sender<String>,
}

/// Customer webhooks WhatsApp retries when the app does not answer 200 (it retries for days;
/// the sandbox gives up sooner).
const WEBHOOK_ATTEMPTS: u32 = 6;

/// Whether a request to one of the faked APIs carries `Authorization: Bearer <token>`.
pub fn bearer_is(headers: &axum::http::HeaderMap, token: &str) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some(&format!("Bearer {token}"))
}

impl World {
    pub fn new(config: Config, url: String) -> World {
        World {
            config,
            url,
            state: Mutex::default(),
            client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().expect("a client"),
            updates: broadcast::channel(256).0,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.updates.subscribe()
    }

    /// Tells the open pages that `what` changed (`chat:<wa_id>`, `sessions`, `tunes`,
    /// `activity`, `faults`).
    pub fn changed(&self, what: &str) {
        let _ = self.updates.send(what.to_string());
    }

    pub fn log(&self, party: &'static str, text: String) {
        eprintln!("[sandbox] {party}: {text}");
        {
            let mut state = self.state.lock().unwrap();
            state.activity.push(Activity { at: astria_wire::unix_now(), party, text });
            let excess = state.activity.len().saturating_sub(200);
            state.activity.drain(..excess);
        }
        self.changed("activity");
    }

    /// POSTs `body` to the app's `path` with the given headers; the status, or 0 when the app
    /// could not be reached.
    pub async fn post_to_app(&self, path: &str, headers: &[(&str, String)], body: Vec<u8>) -> u16 {
        let mut request = self
            .client
            .post(format!("{}{path}", self.config.app_url.trim_end_matches('/')))
            .header("content-type", "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        match request.send().await {
            Ok(r) => r.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Delivers `body` to the app's `path` as an outside party delivers a webhook: up to
    /// `attempts` tries, 2, 4, 8, 16, 16, ... seconds apart, until `taken(status)`; `refused` hears
    /// of each answer that was not taken. The last answer (0: the app could not be reached).
    pub async fn deliver(
        &self,
        path: &str,
        headers: &[(&str, String)],
        body: Vec<u8>,
        attempts: u32,
        taken: impl Fn(u16) -> bool,
        refused: impl Fn(u16),
    ) -> u16 {
        let mut status = 0;
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_secs(1 << attempt.min(4))).await;
            }
            status = self.post_to_app(path, headers, body.clone()).await;
            if taken(status) {
                break;
            }
            refused(status);
        }
        status
    }

    /// A WhatsApp webhook to `/SmsReceived`, signed with the app secret, retried as WhatsApp
    /// retries while the app answers anything but 200. The last answer.
    pub async fn whatsapp_webhook(&self, payload: &Value, what: &str) -> u16 {
        let body = serde_json::to_vec(payload).expect("json");
        let signature = astria_wire::whatsapp::sign(&self.config.app_secret, &body);
        let headers = [("x-hub-signature-256", signature)];
        let refused = |status| self.log("whatsapp", format!("webhook ({what}) answered {status}; WhatsApp retries"));
        self.deliver("/SmsReceived", &headers, body, WEBHOOK_ATTEMPTS, |status| status == 200, refused).await
    }

    /// A snapshot for the page.
    pub fn snapshot(&self) -> Value {
        let state = self.state.lock().unwrap();
        json!({
            "chats": state.chats,
            "sessions": state.sessions.iter().map(|s| &s.object).collect::<Vec<_>>(),
            "refunds": state.refunds,
            "tunes": state.tunes.iter().map(|t| json!({
                "id": t.id, "title": t.title, "name": t.name, "photos": t.photos.len(),
                "trained": t.trained, "released": t.released,
            })).collect::<Vec<_>>(),
            "faults": state.faults,
            "activity": state.activity,
            "training_seconds": self.config.training_seconds,
        })
    }
}
