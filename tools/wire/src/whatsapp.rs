//! WhatsApp Cloud API: webhook payloads as Meta sends them (messages and statuses, signed
//! `X-Hub-Signature-256`), and the Graph API's answers to a send, an error and a media lookup.

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::unix_now;

/// The business account and number the webhooks come from (any values do; these are Meta's
/// documentation's).
pub const BUSINESS_ACCOUNT_ID: &str = "102290129340398";
pub const DISPLAY_PHONE_NUMBER: &str = "15550783881";

/// `sha256=<hex HMAC-SHA256(secret, body)>`, as Meta signs (`X-Hub-Signature-256`).
pub fn sign(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn envelope(phone_number_id: &str, value: Value) -> Value {
    let mut value = value;
    value["messaging_product"] = json!("whatsapp");
    value["metadata"] = json!({ "display_phone_number": DISPLAY_PHONE_NUMBER, "phone_number_id": phone_number_id });
    json!({
        "object": "whatsapp_business_account",
        "entry": [{ "id": BUSINESS_ACCOUNT_ID, "changes": [{ "field": "messages", "value": value }] }]
    })
}

/// A webhook body carrying `messages` from contact `from` (profile name `name`) to our number.
pub fn inbound(phone_number_id: &str, from: &str, name: &str, messages: Vec<Value>) -> Value {
    envelope(
        phone_number_id,
        json!({ "contacts": [{ "profile": { "name": name }, "wa_id": from }], "messages": messages }),
    )
}

fn base(from: &str, id: &str, kind: &str) -> Value {
    json!({ "from": from, "id": id, "timestamp": unix_now().to_string(), "type": kind })
}

pub fn text(from: &str, id: &str, body: &str) -> Value {
    let mut m = base(from, id, "text");
    m["text"] = json!({ "body": body });
    m
}

/// An image message: the app downloads `media_id` and checks the bytes against `sha256_hex`.
pub fn image(from: &str, id: &str, media_id: &str, sha256_hex: &str) -> Value {
    let mut m = base(from, id, "image");
    m["image"] = json!({ "mime_type": "image/jpeg", "sha256": sha256_hex, "id": media_id });
    m
}

pub fn sticker(from: &str, id: &str) -> Value {
    let mut m = base(from, id, "sticker");
    m["sticker"] = json!({ "mime_type": "image/webp", "sha256": "00", "id": "media-sticker", "animated": false });
    m
}

/// A tap on a reply button of the message `context_id`.
pub fn button_reply(from: &str, id: &str, context_id: Option<&str>, reply_id: &str, title: &str) -> Value {
    let mut m = base(from, id, "interactive");
    if let Some(c) = context_id {
        m["context"] = json!({ "from": DISPLAY_PHONE_NUMBER, "id": c });
    }
    m["interactive"] = json!({ "type": "button_reply", "button_reply": { "id": reply_id, "title": title } });
    m
}

/// A choice from the list message `context_id`.
pub fn list_reply(from: &str, id: &str, context_id: Option<&str>, reply_id: &str, title: &str) -> Value {
    let mut m = base(from, id, "interactive");
    if let Some(c) = context_id {
        m["context"] = json!({ "from": DISPLAY_PHONE_NUMBER, "id": c });
    }
    m["interactive"] = json!({ "type": "list_reply", "list_reply": { "id": reply_id, "title": title } });
    m
}

/// Whether `id` is a business-scoped user id (`US.13491208655302741918`, or a parent BSUID
/// `US.ENT.…`) rather than a phone number.
pub fn is_user_id(id: &str) -> bool {
    id.contains('.')
}

/// The same webhook body as a customer with a WhatsApp username who shares no phone number
/// sends it (2026): each contact and message loses `wa_id` / `from` and carries `user_id` /
/// `from_user_id` = `bsuid` and the profile's `username` instead.
pub fn as_username(body: &Value, bsuid: &str, username: &str) -> Value {
    with_user_id(body, bsuid, Some(username), false)
}

/// The same webhook body with `bsuid` added beside the phone number, as every webhook carries
/// it since April 2026 (`contacts[].user_id`, `messages[].from_user_id`).
pub fn with_bsuid(body: &Value, bsuid: &str) -> Value {
    with_user_id(body, bsuid, None, true)
}

fn with_user_id(body: &Value, bsuid: &str, username: Option<&str>, keep_phone: bool) -> Value {
    let mut body = body.clone();
    for change in body["entry"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .flat_map(|e| e["changes"].as_array_mut().map(|c| c.iter_mut().collect::<Vec<_>>()).unwrap_or_default())
    {
        let value = &mut change["value"];
        // get_mut: indexing would add a list as null where there is none (a status webhook).
        for c in value.get_mut("contacts").and_then(Value::as_array_mut).into_iter().flatten() {
            c["user_id"] = json!(bsuid);
            if let Some(u) = username {
                c["profile"]["username"] = json!(u);
            }
            if !keep_phone {
                c.as_object_mut().map(|o| o.remove("wa_id"));
            }
        }
        for m in value.get_mut("messages").and_then(Value::as_array_mut).into_iter().flatten() {
            m["from_user_id"] = json!(bsuid);
            if !keep_phone {
                m.as_object_mut().map(|o| o.remove("from"));
            }
        }
    }
    body
}

/// A status webhook (`sent`, `delivered`, `read`, `failed`) for the message `wamid` we sent,
/// repeating its `biz_opaque_callback_data` as WhatsApp does; `failed` carries `error_code`.
pub fn status(
    phone_number_id: &str,
    wamid: &str,
    recipient: &str,
    status: &str,
    error_code: Option<i64>,
    tag: Option<&str>,
) -> Value {
    // A send to a BSUID comes back naming the user id, without `recipient_id`.
    let field = if is_user_id(recipient) { "recipient_user_id" } else { "recipient_id" };
    let mut s = json!({ "id": wamid, "status": status, "timestamp": unix_now().to_string(), field: recipient });
    if let Some(code) = error_code {
        s["errors"] = json!([{ "code": code, "title": "error", "message": "error", "error_data": { "details": "d" } }]);
    }
    if let Some(tag) = tag {
        s["biz_opaque_callback_data"] = json!(tag);
    }
    envelope(phone_number_id, json!({ "statuses": [s] }))
}

/// The Graph API's answer to an accepted send to `to` (a phone number, or a BSUID sent as
/// `recipient`, whose answer names a `user_id` and no `wa_id`).
pub fn send_accepted(to: &str, wamid: &str) -> Value {
    let contact =
        if is_user_id(to) { json!({ "input": to, "user_id": to }) } else { json!({ "input": to, "wa_id": to }) };
    json!({
        "messaging_product": "whatsapp",
        "contacts": [contact],
        "messages": [{ "id": wamid }],
    })
}

/// Whom a send request addresses, as the Graph API reads it: `to` wins over `recipient`.
pub fn addressee(send: &Value) -> Option<&str> {
    send["to"].as_str().or_else(|| send["recipient"].as_str()).filter(|a| !a.is_empty())
}

/// A Graph API error body (`code` is Meta's, e.g. 130429 rate limit, 131047 outside the
/// 24-hour window).
pub fn graph_error(code: i64, message: &str) -> Value {
    json!({
        "error": { "message": format!("(#{code}) {message}"), "type": "OAuthException", "code": code,
                   "error_data": { "messaging_product": "whatsapp", "details": message },
                   "fbtrace_id": "Az8or2yhqkZfEZ-_4Qn_Bam" }
    })
}

/// The answer to `GET /{version}/{media-id}`: where to download the bytes (with the token).
pub fn media_info(id: &str, url: &str, bytes: &[u8]) -> Value {
    json!({
        "messaging_product": "whatsapp", "url": url, "mime_type": "image/jpeg",
        "sha256": crate::sha256_hex(bytes), "file_size": bytes.len().to_string(), "id": id,
    })
}
