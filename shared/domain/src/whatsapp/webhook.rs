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

/// The HMAC an `X-Hub-Signature-256` header carries (`sha256=` and 64 hex digits), or `None`
/// for a missing or malformed header. Checkable before the body is read or any secret is
/// looked up: a request without a well-formed header is refused at the cost of nothing.
pub fn signature_bytes(header: Option<&str>) -> Option<[u8; 32]> {
    let hex_sig = header?.trim().strip_prefix("sha256=")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_sig, &mut out).ok()?;
    Some(out)
}

/// The id the inbox keeps a signed body under: its SHA-256, hex. Meta redelivers a webhook
/// byte for byte, so a redelivery waiting in the inbox is one row.
pub fn body_id(raw_body: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(Sha256::digest(raw_body))
}

/// Checks `X-Hub-Signature-256: sha256=<hex>` against HMAC-SHA256(app secret, raw body), in
/// constant time. An empty secret never verifies: an unconfigured bot accepts nothing.
pub fn verify_signature(app_secret: &str, raw_body: &[u8], header: Option<&str>) -> Result<(), WebhookError> {
    let sig = signature_bytes(header).ok_or(WebhookError::BadSignature)?;
    if app_secret.is_empty() {
        return Err(WebhookError::BadSignature);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes()).map_err(|_| WebhookError::BadSignature)?;
    mac.update(raw_body);
    mac.verify_slice(&sig).map_err(|_| WebhookError::BadSignature)
}

/// Who a message is from, or a status is about: the identifiers WhatsApp gives one person.
///
/// Since 2026 a WhatsApp user may adopt a username and stop sharing their phone number; Meta
/// then names them by a business-scoped user id (BSUID, `US.13491208655302741918`) and, when
/// the business enables them, a parent BSUID (`US.ENT.11815799212886844830`) valid across its
/// linked portfolios. A webhook carries any of the three; at least one is always there.
/// These are personal data like a phone number: never logged.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// `wa_id` / `from`: the phone number in international form without `+`.
    pub phone: Option<String>,
    /// `user_id` / `from_user_id`.
    pub bsuid: Option<String>,
    /// `parent_user_id` / `from_parent_user_id`.
    pub parent_bsuid: Option<String>,
}

impl std::fmt::Debug for Identity {
    // Which identifiers are known, not their values: a Debug print must not leak a person.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("phone", &self.phone.as_ref().map(|_| "…"))
            .field("bsuid", &self.bsuid.as_ref().map(|_| "…"))
            .field("parent_bsuid", &self.parent_bsuid.as_ref().map(|_| "…"))
            .finish()
    }
}

impl Identity {
    pub fn is_empty(&self) -> bool {
        self.phone.is_none() && self.bsuid.is_none() && self.parent_bsuid.is_none()
    }

    /// The identifiers of `self`, completed by those of `other` where `self` has none.
    fn or(self, other: &Identity) -> Identity {
        Identity {
            phone: self.phone.or_else(|| other.phone.clone()),
            bsuid: self.bsuid.or_else(|| other.bsuid.clone()),
            parent_bsuid: self.parent_bsuid.or_else(|| other.parent_bsuid.clone()),
        }
    }

    /// Whether `other` names the same person by any identifier both carry.
    pub fn overlaps(&self, other: &Identity) -> bool {
        let same = |a: &Option<String>, b: &Option<String>| a.is_some() && a == b;
        same(&self.phone, &other.phone)
            || same(&self.bsuid, &other.bsuid)
            || same(&self.parent_bsuid, &other.parent_bsuid)
    }

    /// From the raw fields, each checked: a phone is digits, a BSUID a country code, a dot
    /// and letters, digits or dots. Empty fields count as absent.
    fn parse(
        phone: Option<&str>,
        bsuid: Option<&str>,
        parent: Option<&str>,
        what: &str,
    ) -> Result<Identity, WebhookError> {
        let present = |v: Option<&str>| v.map(str::trim).filter(|v| !v.is_empty()).map(str::to_string);
        let id = Identity { phone: present(phone), bsuid: present(bsuid), parent_bsuid: present(parent) };
        if id.phone.as_deref().is_some_and(|p| !is_phone(p)) {
            return Err(WebhookError::Malformed(format!("{what}: the phone number is not digits")));
        }
        if [&id.bsuid, &id.parent_bsuid].into_iter().flatten().any(|b| !is_bsuid(b)) {
            return Err(WebhookError::Malformed(format!("{what}: a user id is not a business-scoped user id")));
        }
        Ok(id)
    }
}

/// A `wa_id`: digits only (international form without `+`).
pub fn is_phone(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

/// A BSUID or parent BSUID: `CC.` then letters, digits or dots (`US.1349…`, `US.ENT.1181…`);
/// Meta documents up to 128 characters after the country code.
pub fn is_bsuid(s: &str) -> bool {
    let Some((country, rest)) = s.split_once('.') else { return false };
    country.len() == 2
        && country.bytes().all(|b| b.is_ascii_uppercase())
        && (1..=160).contains(&rest.len())
        && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.')
}

/// One inbound message for our number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundMessage {
    /// WhatsApp's message id (`wamid...`): the dedupe key.
    pub id: String,
    /// The sender: phone, BSUID or both (from the message and its `contacts` entry).
    pub sender: Identity,
    pub profile_name: Option<String>,
    /// Unix seconds.
    pub timestamp: i64,
    pub inbound: Inbound,
    /// A `system` message announcing that the sender now has these identifiers (a new phone
    /// number, and with it a new BSUID): what the contact is known by moves, its orders stay.
    pub identity_change: Option<Identity>,
}

/// A delivery status of a message we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusUpdate {
    pub message_id: String,
    pub status: DeliveryStatus,
    /// `recipient_id` / `recipient_user_id` / `recipient_parent_user_id`, whichever are there
    /// (a send to a BSUID comes back without `recipient_id`).
    pub recipient: Identity,
    pub timestamp: i64,
    /// Error codes WhatsApp reports with a `failed` status.
    pub error_codes: Vec<i64>,
    /// Our `biz_opaque_callback_data` (the message id we gave the send), when present.
    pub callback_data: Option<String>,
}

/// What WhatsApp says became of a message we sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStatus {
    Sent,
    Delivered,
    Read,
    /// A voice message was played.
    Played,
    Failed,
    /// A status this app does not know (kept by name, acted on by none).
    Other(String),
}

impl DeliveryStatus {
    pub fn parse(s: &str) -> DeliveryStatus {
        match s {
            "sent" => DeliveryStatus::Sent,
            "delivered" => DeliveryStatus::Delivered,
            "read" => DeliveryStatus::Read,
            "played" => DeliveryStatus::Played,
            "failed" => DeliveryStatus::Failed,
            other => DeliveryStatus::Other(other.to_string()),
        }
    }

    /// The name WhatsApp uses, as stored.
    pub fn as_str(&self) -> &str {
        match self {
            DeliveryStatus::Sent => "sent",
            DeliveryStatus::Delivered => "delivered",
            DeliveryStatus::Read => "read",
            DeliveryStatus::Played => "played",
            DeliveryStatus::Failed => "failed",
            DeliveryStatus::Other(s) => s,
        }
    }
}

/// A change of the user's messaging preferences (`user_preferences` webhooks): today the
/// marketing opt-out WhatsApp offers in its chat menu.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreferenceUpdate {
    pub who: Identity,
    /// `marketing_messages`, or another category by name.
    pub category: String,
    /// `true` for `stop`, `false` for `resume`.
    pub opted_out: bool,
}

/// What one webhook POST carries for our phone number; anything for other numbers, and the
/// fields this app has no use for (template reviews, account updates, calls), is left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Webhook {
    pub messages: Vec<InboundMessage>,
    pub statuses: Vec<StatusUpdate>,
    pub preferences: Vec<PreferenceUpdate>,
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

// The shapes below name only what the app reads; serde skips every other field, so a field
// Meta adds tomorrow changes nothing. What a kind of message carries is optional here and
// decided in `inbound`: a payload of a kind the app cannot use is answered, never refused.

#[derive(Deserialize)]
struct Value {
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default, deserialize_with = "null_as_empty")]
    contacts: Vec<ContactJson>,
    #[serde(default, deserialize_with = "null_as_empty")]
    messages: Vec<MessageJson>,
    #[serde(default, deserialize_with = "null_as_empty")]
    statuses: Vec<StatusJson>,
    #[serde(default, deserialize_with = "null_as_empty")]
    user_preferences: Vec<PreferenceJson>,
}

#[derive(Deserialize)]
struct Metadata {
    phone_number_id: String,
}

/// The fields WhatsApp names a person by, the same in a contact, a number change and a
/// preference update.
#[derive(Deserialize)]
struct IdsJson {
    #[serde(default)]
    wa_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    parent_user_id: Option<String>,
}

impl IdsJson {
    fn parse(&self, what: &str) -> Result<Identity, WebhookError> {
        Identity::parse(self.wa_id.as_deref(), self.user_id.as_deref(), self.parent_user_id.as_deref(), what)
    }
}

#[derive(Deserialize)]
struct ContactJson {
    #[serde(flatten)]
    ids: IdsJson,
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
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    from_user_id: Option<String>,
    #[serde(default)]
    from_parent_user_id: Option<String>,
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
    #[serde(default)]
    system: Option<SystemJson>,
}

#[derive(Deserialize)]
struct TextJson {
    #[serde(default)]
    body: Option<String>,
}

#[derive(Deserialize)]
struct ImageJson {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    mime_type: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
}

#[derive(Deserialize)]
struct InteractiveJson {
    #[serde(rename = "type", default)]
    kind: Option<String>,
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
    #[serde(default)]
    payload: Option<String>,
    #[serde(default)]
    text: Option<String>,
}

/// A `system` message: `user_changed_number` (with the new `wa_id`, and with BSUIDs the new
/// `user_id`) or `customer_identity_changed`.
#[derive(Deserialize)]
struct SystemJson {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// The new identifiers.
    #[serde(flatten)]
    ids: IdsJson,
}

#[derive(Deserialize)]
struct StatusJson {
    id: String,
    status: String,
    #[serde(default)]
    recipient_id: Option<String>,
    #[serde(default)]
    recipient_user_id: Option<String>,
    #[serde(default)]
    recipient_parent_user_id: Option<String>,
    /// `individual`, or `group` for a message to a group (whose `recipient_id` is the group's).
    #[serde(default)]
    recipient_type: Option<String>,
    timestamp: String,
    #[serde(default, deserialize_with = "null_as_empty")]
    errors: Vec<ErrorJson>,
    #[serde(default)]
    biz_opaque_callback_data: Option<String>,
}

#[derive(Deserialize)]
struct ErrorJson {
    #[serde(default)]
    code: Option<i64>,
}

#[derive(Deserialize)]
struct PreferenceJson {
    #[serde(flatten)]
    ids: IdsJson,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    value: Option<String>,
}

/// A list given as `null` is an empty list: nothing to act on, no reason to refuse.
fn null_as_empty<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

fn seconds(s: &str, what: &str) -> Result<i64, WebhookError> {
    s.trim().parse().map_err(|_| WebhookError::Malformed(format!("{what} timestamp '{s}' is not unix seconds")))
}

/// What the conversation sees of a message. Kinds whose content the app cannot use (a voice
/// note, a location, a Flow's answer) become `Other` and get an answer a customer understands;
/// kinds that change nothing (reactions, edits, deletions, system notices) become `Ignored`.
fn inbound(m: &MessageJson) -> Inbound {
    let other = || Inbound::Other(m.kind.clone());
    match m.kind.as_str() {
        "text" => match m.text.as_ref().and_then(|t| t.body.clone()) {
            Some(body) => Inbound::Text(body),
            None => other(),
        },
        "image" => match m.image.as_ref() {
            Some(ImageJson { id: Some(id), mime_type: Some(mime), sha256: Some(sha) }) => {
                Inbound::Image(Photo { media_id: id.clone(), mime_type: mime.clone(), sha256: sha.clone() })
            }
            _ => other(),
        },
        "interactive" => {
            let i = m.interactive.as_ref();
            match i.and_then(|i| i.button_reply.as_ref().or(i.list_reply.as_ref())) {
                Some(r) => Inbound::Reply { id: r.id.clone(), title: r.title.clone() },
                // A Flow's answer (nfm_reply), a call permission answer, or one WhatsApp could
                // not render: the customer did write, so they are answered.
                None => {
                    Inbound::Other(format!("interactive:{}", i.and_then(|i| i.kind.as_deref()).unwrap_or("unknown")))
                }
            }
        }
        "button" => match m.button.as_ref().map(|b| (b.payload.clone(), b.text.clone())) {
            Some((Some(id), title)) => Inbound::Reply { title: title.unwrap_or_else(|| id.clone()), id },
            _ => other(),
        },
        // A reaction (or its removal), an edit or a deletion of an earlier message, and
        // WhatsApp's own notices change nothing in the conversation.
        "reaction" | "edit" | "revoke" | "deleted" | "system" | "request_welcome" => Inbound::Ignored(m.kind.clone()),
        _ => other(),
    }
}

/// The identifiers a `system` message announces for its sender (a number change).
fn identity_change(m: &MessageJson) -> Result<Option<Identity>, WebhookError> {
    let Some(system) = m.system.as_ref().filter(|s| s.kind.as_deref() == Some("user_changed_number")) else {
        return Ok(None);
    };
    let new = system.ids.parse(&format!("number change {}", m.id))?;
    Ok((!new.is_empty()).then_some(new))
}

/// Parses a webhook body; keeps what concerns `our_phone_number_id`: messages and statuses
/// (`messages` changes) and marketing preferences (`user_preferences`). Every other field is
/// well formed and of no use here: answered, not refused.
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
        if change.field != "messages" && change.field != "user_preferences" {
            continue;
        }
        let value: Value =
            serde_json::from_value(change.value.clone()).map_err(|e| WebhookError::Malformed(e.to_string()))?;
        match value.metadata.as_ref().map(|m| m.phone_number_id.as_str()) {
            Some(id) if id == our_phone_number_id => {}
            // Preferences are the account's: they may come without a number's metadata.
            None if change.field == "user_preferences" => {}
            _ => continue,
        }
        let contacts = value
            .contacts
            .iter()
            .map(|c| Ok((c.ids.parse("contact")?, c.profile.as_ref().and_then(|p| p.name.clone()))))
            .collect::<Result<Vec<_>, WebhookError>>()?;
        for m in &value.messages {
            let what = format!("message {}", m.id);
            let own =
                Identity::parse(m.from.as_deref(), m.from_user_id.as_deref(), m.from_parent_user_id.as_deref(), &what)?;
            // The contacts entry for this sender completes what the message itself names.
            let contact = contacts.iter().find(|(c, _)| c.overlaps(&own));
            let sender = match contact {
                Some((c, _)) => own.or(c),
                None => own,
            };
            if sender.is_empty() {
                return Err(WebhookError::Malformed(format!("{what} names no sender")));
            }
            out.messages.push(InboundMessage {
                id: m.id.clone(),
                sender,
                profile_name: contact.and_then(|(_, name)| name.clone()),
                timestamp: seconds(&m.timestamp, "message")?,
                inbound: inbound(m),
                identity_change: identity_change(m)?,
            });
        }
        for s in &value.statuses {
            // A group's status names the group, not a person.
            let recipient = if s.recipient_type.as_deref() == Some("group") {
                Identity::default()
            } else {
                Identity::parse(
                    s.recipient_id.as_deref(),
                    s.recipient_user_id.as_deref(),
                    s.recipient_parent_user_id.as_deref(),
                    &format!("status {}", s.id),
                )?
            };
            out.statuses.push(StatusUpdate {
                message_id: s.id.clone(),
                status: DeliveryStatus::parse(&s.status),
                recipient,
                timestamp: seconds(&s.timestamp, "status")?,
                error_codes: s.errors.iter().filter_map(|e| e.code).collect(),
                callback_data: s.biz_opaque_callback_data.clone().filter(|d| !d.is_empty()),
            });
        }
        for p in &value.user_preferences {
            let who = p.ids.parse("preference")?;
            let opted_out = match p.value.as_deref() {
                Some("stop") => true,
                Some("resume") => false,
                _ => continue,
            };
            if !who.is_empty() {
                out.preferences.push(PreferenceUpdate {
                    who,
                    category: p.category.clone().unwrap_or_default(),
                    opted_out,
                });
            }
        }
    }
    Ok(out)
}
