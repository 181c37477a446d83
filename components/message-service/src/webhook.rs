//! `/SmsReceived`: the subscription handshake and the signed webhook.
//!
//! A POST is checked (the signature header's form before anything is read, then the size, then the
//! signature), parsed for our phone number, and the signed body stored in the inbox
//! (`astria_store::inbox`), durable before the 200, in one autocommit statement that also says
//! whether a worker is draining the inbox already or on its way (a wake-up another webhook
//! published is pending); unless one is, the webhook claims the wake-up (a second statement) and
//! publishes it to the conversation workers on Redis (`astria.inbox`). The worker works the inbox
//! through in arrival order (`spin_kit::inbox`). A database fault answers 503 so that Meta
//! redelivers; a Redis fault does not matter here: the relay wakes the worker for rows left
//! waiting.

use astria_domain::config::{self, ExposeSecret};
use astria_domain::whatsapp::{self, Webhook, WebhookError};
use astria_store::{inbox, Db};
use spin_kit::error::ApiError;
use spin_kit::events::now_ms;
use spin_kit::{log, SpinVars};
use spin_sdk::http::Response;

/// `GET /SmsReceived?hub.mode=subscribe&hub.verify_token=...&hub.challenge=...`.
pub fn verify(query: &str) -> Result<Response, ApiError> {
    let params: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let token = config::whatsapp_verify_token(&SpinVars)?;
    let expected = token.expose_secret();
    match whatsapp::verify_subscription(param("hub.mode"), param("hub.verify_token"), param("hub.challenge"), expected)
    {
        Some(challenge) => {
            Ok(Response::builder().status(200).header("content-type", "text/plain").body(challenge.to_string()).build())
        }
        None => Err(ApiError::Forbidden("verification failed")),
    }
}

/// What the webhook answers (Meta ignores it; operators and tests read it).
#[derive(serde::Serialize, Default, Debug)]
pub struct Accepted {
    /// Messages for us in the body.
    pub messages: usize,
    /// Delivery statuses for us in the body.
    pub statuses: usize,
    /// `false` when the same body was waiting in the inbox already (Meta's redelivery).
    pub queued: bool,
}

/// `POST /SmsReceived`, once the header's form has been checked and the body read.
pub fn receive(body: &[u8], signature: Option<&str>, request_id: &str) -> Result<Response, ApiError> {
    // Only the secret before the signature is checked: a forged request reads one variable.
    let app_secret = config::whatsapp_app_secret(&SpinVars)?;
    whatsapp::verify_signature(app_secret.expose_secret(), body, signature).map_err(|_| ApiError::Unauthorized)?;
    let hook = parse(body, &config::phone_number_id(&SpinVars))?;
    let mut accepted = Accepted { messages: hook.messages.len(), statuses: hook.statuses.len(), queued: false };
    if hook.messages.is_empty() && hook.statuses.is_empty() && hook.preferences.is_empty() {
        return Ok(spin_kit::json_response(200, &accepted));
    }
    // On SQLite the inbox's own database: a webhook never opens the app's.
    let db = spin_kit::open_inbox_unchecked()?;
    let stored = store(&db, body, request_id, || spin_kit::migrate_inbox(&db))?;
    accepted.queued = stored.queued;
    if stored.wake && !wake(request_id) {
        // Not published: the next webhook tries again rather than count on it (a third
        // statement, only while Redis fails). Should this fail too, the marker lapses on its
        // own within `inbox::WAKE_PENDING_MS`.
        let _ = inbox::unclaim_wake(&db, request_id);
    }
    Ok(spin_kit::json_response(200, &accepted))
}

/// What [`store`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The body is new in the inbox.
    pub queued: bool,
    /// No worker is draining or on its way, and this request claimed the wake-up: publish it.
    pub wake: bool,
}

/// Stores a verified body in the inbox (not again if it waits there already), and says whether to
/// wake a worker: the request's one statement (on PostgreSQL a function's call, `inbox::accept`
/// says why), and a second when no worker is draining or on its way, to claim the wake-up
/// (`inbox::claim_wake`: of the webhooks that found nobody coming, one publishes a wake-up and the
/// others count on it). Should the schema not be there yet (a new database, or a release that adds
/// the inbox or its function), `migrate` puts it in place and the insert runs again. The
/// benchmark's native reference server (`tools/native-reference`) calls this too, so that the two
/// measure the same work.
pub fn store<D: Db>(
    db: &D,
    body: &[u8],
    request_id: &str,
    migrate: impl FnOnce() -> Result<(), ApiError>,
) -> Result<Stored, ApiError> {
    // serde_json parsed it, so it is UTF-8; the check costs nothing next to the HMAC.
    let text = std::str::from_utf8(body).map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))?;
    let id = whatsapp::body_id(body);
    let accepted = match inbox::accept(db, &id, text, request_id, now_ms()) {
        Err(e) if e.is_missing_schema() => {
            migrate()?;
            inbox::accept(db, &id, text, request_id, now_ms())?
        }
        other => other?,
    };
    // A worker draining now takes this row too (it looks again after it lets go), and so does
    // the worker a pending wake-up brings (`inbox::accept` says why).
    Ok(match accepted {
        inbox::Accepted::Duplicate => Stored { queued: false, wake: false },
        inbox::Accepted::Draining | inbox::Accepted::WakePending => Stored { queued: true, wake: false },
        inbox::Accepted::NeedsWake => {
            let claimed = inbox::claim_wake(db, request_id, now_ms()).unwrap_or_else(|e| {
                // The row is in: wake a worker anyway rather than answer 503 for it.
                log::warn("webhook", &format!("inbox wake-up not claimed, published anyway: {e}"));
                true
            });
            Stored { queued: true, wake: claimed }
        }
    })
}

/// Tells the conversation workers that the inbox has work; answers whether it was published.
/// Best effort: if Redis is down the row waits, and the relay wakes them once Redis is back.
fn wake(request_id: &str) -> bool {
    let result = config::redis_url(&SpinVars)
        .map_err(|e| e.to_string())
        .and_then(|url| spin_kit::inbox::wake(url.expose_secret(), request_id));
    if let Err(e) = &result {
        log::warn("webhook", &format!("inbox wake-up not published, left to the relay: {e}"));
    }
    result.is_ok()
}

/// The signed body, parsed for our phone number.
pub fn parse(body: &[u8], phone_number_id: &str) -> Result<Webhook, ApiError> {
    whatsapp::parse_webhook(body, phone_number_id).map_err(|e| match e {
        WebhookError::BadSignature => ApiError::Unauthorized,
        WebhookError::Malformed(m) => ApiError::BadRequest(m),
    })
}
