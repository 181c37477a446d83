//! WhatsApp Cloud API webhooks, parsed at the edge into domain types: the subscription
//! handshake, the `X-Hub-Signature-256` check, and the JSON envelope with its messages and
//! status updates. Pure: the component passes the raw body and headers.

use astria_models::Photo;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

use crate::conversation::Inbound;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// 401: no signature header, or one that does not match the body.
    #[error("missing or invalid signature")]
    BadSignature,
    /// 400: not JSON, or not the shape WhatsApp sends.
    #[error("malformed webhook: {0}")]
    Malformed(String),
}

/// The `GET` handshake: answers the challenge when mode and token match, `None` otherwise
/// (403).
pub fn verify_subscription<'a>(
    mode: Option<&str>,
    token: Option<&str>,
    challenge: Option<&'a str>,
    expected_token: &str,
) -> Option<&'a str> {
    use subtle::ConstantTimeEq;
    let token_ok = match token {
        Some(t) if !expected_token.is_empty() => bool::from(t.as_bytes().ct_eq(expected_token.as_bytes())),
        _ => false,
    };
    (mode == Some("subscribe") && token_ok).then_some(challenge?)
}

/// Checks `X-Hub-Signature-256: sha256=<hex>` against HMAC-SHA256(app secret, raw body), in
/// constant time. An empty secret never verifies: an unconfigured bot accepts nothing.
pub fn verify_signature(app_secret: &str, raw_body: &[u8], header: Option<&str>) -> Result<(), WebhookError> {
    let hex_sig = header.and_then(|h| h.trim().strip_prefix("sha256=")).ok_or(WebhookError::BadSignature)?;
    let sig = hex::decode(hex_sig).map_err(|_| WebhookError::BadSignature)?;
    if app_secret.is_empty() {
        return Err(WebhookError::BadSignature);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()).map_err(|_| WebhookError::BadSignature)?;
    mac.update(raw_body);
    mac.verify_slice(&sig).map_err(|_| WebhookError::BadSignature)
}

/// One inbound message for our number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// WhatsApp's message id (`wamid...`): the dedupe key.
    pub id: String,
    /// The sender's WhatsApp id.
    pub from: String,
    pub profile_name: Option<String>,
    /// Unix seconds.
    pub timestamp: i64,
    pub inbound: Inbound,
}

/// A delivery status of a message we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub message_id: String,
    pub status: String,
    pub recipient: String,
    pub timestamp: i64,
    /// Error codes WhatsApp reports with a `failed` status.
    pub error_codes: Vec<i64>,
    /// Our `biz_opaque_callback_data` (the message id we gave the send), when present.
    pub callback_data: Option<String>,
}

/// What one webhook POST carries for our phone number; anything for other numbers or fields
/// is left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Webhook {
    pub messages: Vec<InboundMessage>,
    pub statuses: Vec<StatusUpdate>,
}

#[derive(Deserialize)]
struct Envelope {
    object: String,
    #[serde(default)]
    entry: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    changes: Vec<Change>,
}

#[derive(Deserialize)]
struct Change {
    field: String,
    value: serde_json::Value,
}

#[derive(Deserialize)]
struct Value {
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    contacts: Vec<ContactJson>,
    #[serde(default)]
    messages: Vec<MessageJson>,
    #[serde(default)]
    statuses: Vec<StatusJson>,
}

#[derive(Deserialize)]
struct Metadata {
    phone_number_id: String,
}

#[derive(Deserialize)]
struct ContactJson {
    wa_id: String,
    #[serde(default)]
    profile: Option<Profile>,
}

#[derive(Deserialize)]
struct Profile {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
struct MessageJson {
    id: String,
    from: String,
    timestamp: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<TextJson>,
    #[serde(default)]
    image: Option<ImageJson>,
    #[serde(default)]
    interactive: Option<InteractiveJson>,
    #[serde(default)]
    button: Option<ButtonJson>,
}

#[derive(Deserialize)]
struct TextJson {
    body: String,
}

#[derive(Deserialize)]
struct ImageJson {
    id: String,
    mime_type: String,
    sha256: String,
}

#[derive(Deserialize)]
struct InteractiveJson {
    #[serde(default)]
    button_reply: Option<ReplyJson>,
    #[serde(default)]
    list_reply: Option<ReplyJson>,
}

#[derive(Deserialize)]
struct ReplyJson {
    id: String,
    title: String,
}

/// A quick-reply tap on a template button.
#[derive(Deserialize)]
struct ButtonJson {
    payload: String,
    text: String,
}

#[derive(Deserialize)]
struct StatusJson {
    id: String,
    status: String,
    recipient_id: String,
    timestamp: String,
    #[serde(default)]
    errors: Vec<ErrorJson>,
    #[serde(default)]
    biz_opaque_callback_data: Option<String>,
}

#[derive(Deserialize)]
struct ErrorJson {
    code: i64,
}

fn seconds(s: &str, what: &str) -> Result<i64, WebhookError> {
    s.trim().parse().map_err(|_| WebhookError::Malformed(format!("{what} timestamp '{s}' is not unix seconds")))
}

fn inbound(m: &MessageJson) -> Result<Inbound, WebhookError> {
    let missing = |what: &str| WebhookError::Malformed(format!("message {} of type {} has no {what}", m.id, m.kind));
    Ok(match m.kind.as_str() {
        "text" => Inbound::Text(m.text.as_ref().ok_or_else(|| missing("text"))?.body.clone()),
        "image" => {
            let i = m.image.as_ref().ok_or_else(|| missing("image"))?;
            Inbound::Image(Photo { media_id: i.id.clone(), mime_type: i.mime_type.clone(), sha256: i.sha256.clone() })
        }
        "interactive" => {
            let i = m.interactive.as_ref().ok_or_else(|| missing("interactive"))?;
            let r = i.button_reply.as_ref().or(i.list_reply.as_ref()).ok_or_else(|| missing("reply"))?;
            Inbound::Reply { id: r.id.clone(), title: r.title.clone() }
        }
        "button" => {
            let b = m.button.as_ref().ok_or_else(|| missing("button"))?;
            Inbound::Reply { id: b.payload.clone(), title: b.text.clone() }
        }
        other => Inbound::Other(other.to_string()),
    })
}

/// Parses a webhook body; keeps only `messages` changes for `our_phone_number_id`.
pub fn parse_webhook(raw: &[u8], our_phone_number_id: &str) -> Result<Webhook, WebhookError> {
    if crate::has_nul_escape(raw) {
        return Err(WebhookError::Malformed("NUL character in the body".into()));
    }
    let env: Envelope = serde_json::from_slice(raw).map_err(|e| WebhookError::Malformed(e.to_string()))?;
    if env.object != "whatsapp_business_account" {
        return Err(WebhookError::Malformed(format!("object '{}' is not whatsapp_business_account", env.object)));
    }
    let mut out = Webhook::default();
    for change in env.entry.iter().flat_map(|e| &e.changes) {
        if change.field != "messages" {
            continue;
        }
        let value: Value =
            serde_json::from_value(change.value.clone()).map_err(|e| WebhookError::Malformed(e.to_string()))?;
        if value.metadata.as_ref().map(|m| m.phone_number_id.as_str()) != Some(our_phone_number_id) {
            continue;
        }
        for m in &value.messages {
            let profile_name = value
                .contacts
                .iter()
                .find(|c| c.wa_id == m.from)
                .and_then(|c| c.profile.as_ref())
                .and_then(|p| p.name.clone());
            out.messages.push(InboundMessage {
                id: m.id.clone(),
                from: m.from.clone(),
                profile_name,
                timestamp: seconds(&m.timestamp, "message")?,
                inbound: inbound(m)?,
            });
        }
        for s in &value.statuses {
            out.statuses.push(StatusUpdate {
                message_id: s.id.clone(),
                status: s.status.clone(),
                recipient: s.recipient_id.clone(),
                timestamp: seconds(&s.timestamp, "status")?,
                error_codes: s.errors.iter().map(|e| e.code).collect(),
                callback_data: s.biz_opaque_callback_data.clone().filter(|d| !d.is_empty()),
            });
        }
    }
    Ok(out)
}
