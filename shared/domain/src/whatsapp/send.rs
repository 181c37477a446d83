//! WhatsApp Cloud API outbound (`POST /{version}/{phone-number-id}/messages`): the JSON body
//! for each [`Message`], and what an answer means for the sender: sent, retry later, switch to
//! the template (outside the 24-hour window), or give up. Pure: the sender component does the
//! HTTP call and the bookkeeping.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::conversation::Message;

/// The template sent outside the 24-hour window (`whatsapp_template_name`/`_language`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateConfig {
    pub name: String,
    pub language: String,
}

/// Whom a send goes to.
#[derive(Clone, PartialEq, Eq)]
pub enum Recipient {
    /// A phone number (`wa_id`): `"to"`. Meta's advice: use it whenever it is known.
    Phone(String),
    /// A business-scoped user id or parent BSUID, for a customer with a username who shares
    /// no phone number: `"recipient"` (and no `"to"`, which would win).
    User(String),
}

impl std::fmt::Debug for Recipient {
    // Personal data: which kind, never the value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Recipient::Phone(_) => "Recipient::Phone(…)",
            Recipient::User(_) => "Recipient::User(…)",
        })
    }
}

/// The request body that sends `message` to `to`.
///
/// `callback_data` (our message id) goes out as `biz_opaque_callback_data`: WhatsApp repeats it
/// in every status webhook of the message, so a send whose answer was lost can still be
/// recognised as sent.
pub fn request_body(to: &Recipient, message: &Message, template: &TemplateConfig, callback_data: &str) -> Value {
    let mut body = json!({ "messaging_product": "whatsapp", "recipient_type": "individual",
                           "biz_opaque_callback_data": callback_data });
    match to {
        Recipient::Phone(phone) => body["to"] = json!(phone),
        Recipient::User(user_id) => body["recipient"] = json!(user_id),
    }
    let (kind, content) = match message {
        Message::Text { body } => ("text", json!({ "body": body, "preview_url": false })),
        Message::Buttons { body, buttons } => (
            "interactive",
            json!({
                "type": "button",
                "body": { "text": body },
                "action": { "buttons": buttons.iter().map(|b| json!({
                    "type": "reply", "reply": { "id": b.id, "title": b.title }
                })).collect::<Vec<_>>() },
            }),
        ),
        Message::List { body, button, section, rows } => (
            "interactive",
            json!({
                "type": "list",
                "body": { "text": body },
                "action": {
                    "button": button,
                    "sections": [{
                        "title": section,
                        "rows": rows.iter().map(|r| {
                            let mut row = json!({ "id": r.id, "title": r.title });
                            if let Some(d) = &r.description {
                                row["description"] = json!(d);
                            }
                            row
                        }).collect::<Vec<_>>(),
                    }],
                },
            }),
        ),
        Message::Image { link, caption } => {
            let mut image = json!({ "link": link });
            if let Some(c) = caption {
                image["caption"] = json!(c);
            }
            ("image", image)
        }
        Message::Document { link, filename, caption } => {
            let mut document = json!({ "link": link });
            if let Some(f) = filename {
                document["filename"] = json!(f);
            }
            if let Some(c) = caption {
                document["caption"] = json!(c);
            }
            ("document", document)
        }
        Message::Template { parameters } => {
            let mut template = json!({ "name": template.name, "language": { "code": template.language } });
            if !parameters.is_empty() {
                template["components"] = json!([{
                    "type": "body",
                    "parameters": parameters.iter().map(|p| json!({ "type": "text", "text": p })).collect::<Vec<_>>(),
                }]);
            }
            ("template", template)
        }
    };
    body["type"] = json!(kind);
    body[kind] = content;
    body
}

/// What an answer of the messages endpoint means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Accepted; `wamid` is the id later status webhooks refer to.
    Sent { wamid: String },
    /// A temporary failure WhatsApp reported (rate limits, transient codes): nothing was sent;
    /// retry after at least `min_delay_ms`.
    Retry { code: Option<i64>, detail: String, min_delay_ms: i64 },
    /// The request may have been accepted without our hearing so (a 5xx, a 2xx without a
    /// message id, a timeout after the request left): wait for a status webhook carrying our
    /// `biz_opaque_callback_data` before sending again, up to a bound.
    Unconfirmed { detail: String },
    /// 131047: the user's last message is older than 24 hours; only a template gets through.
    OutsideWindow,
    /// A failure that retrying cannot fix (131026 undeliverable, 190 bad token, 100 invalid
    /// parameter, 368 policy block, ...): record it for an operator.
    Rejected { code: Option<i64>, detail: String },
}

/// Error codes of the Graph API this bot treats specially.
pub mod codes {
    pub const OUTSIDE_WINDOW: i64 = 131047;
    pub const THROUGHPUT_LIMIT: i64 = 130429;
    pub const SPAM_LIMIT: i64 = 131048;
    pub const PAIR_LIMIT: i64 = 131056;
    pub const ACCOUNT_LIMIT: i64 = 80007;
    pub const UNDELIVERABLE: i64 = 131026;
    pub const TOKEN_INVALID: i64 = 190;
    /// The media could not be fetched or used (an image over 5 MB, say).
    pub const MEDIA_UPLOAD: i64 = 131053;
    /// A business-scoped user id is not accepted as the recipient of this kind of message
    /// (authentication templates, for one): send to the phone number, if known.
    pub const BSUID_NOT_SUPPORTED: i64 = 131062;
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    messages: Vec<SentId>,
    error: Option<GraphError>,
}

#[derive(Deserialize)]
struct SentId {
    id: String,
}

#[derive(Deserialize)]
struct GraphError {
    code: Option<i64>,
    #[serde(default)]
    message: String,
    error_data: Option<ErrorData>,
}

#[derive(Deserialize)]
struct ErrorData {
    #[serde(default)]
    details: String,
}

/// Delay floors for rate limits: Meta asks to slow down, not to hammer again in 5 s.
fn rate_limit_delay(code: i64) -> Option<i64> {
    use codes::*;
    match code {
        THROUGHPUT_LIMIT | ACCOUNT_LIMIT => Some(60_000),
        SPAM_LIMIT => Some(5 * 60_000),
        PAIR_LIMIT => Some(6_000),
        // 4: application request limit; 80004/80008: business use case limits.
        4 | 80004 | 80008 => Some(60_000),
        _ => None,
    }
}

/// Temporary errors Meta documents as "try again later".
fn transient(code: i64) -> bool {
    // 1 unknown API error, 2 temporary service error, 131000 something went wrong,
    // 131016 service unavailable, 133004 server temporarily unavailable.
    matches!(code, 1 | 2 | 131000 | 131016 | 133004)
}

/// Classifies an HTTP answer of the messages endpoint.
pub fn classify(status: u16, body: &[u8]) -> SendOutcome {
    let answer: Option<Answer> = serde_json::from_slice(body).ok();
    if (200..300).contains(&status) {
        if let Some(id) = answer.as_ref().and_then(|a| a.messages.first()).map(|m| m.id.clone()) {
            return SendOutcome::Sent { wamid: id };
        }
        // Accepted, perhaps, but without an id to track: a status webhook may still tell.
        return SendOutcome::Unconfirmed { detail: format!("HTTP {status} without a message id") };
    }
    let error = answer.and_then(|a| a.error);
    let code = error.as_ref().and_then(|e| e.code);
    let detail = match &error {
        Some(e) => {
            let details = e.error_data.as_ref().map(|d| d.details.as_str()).unwrap_or("");
            format!("HTTP {status}, code {}: {} {}", code.unwrap_or(0), e.message, details).trim_end().to_string()
        }
        None => format!("HTTP {status}"),
    };
    match code {
        Some(codes::OUTSIDE_WINDOW) => SendOutcome::OutsideWindow,
        Some(c) if rate_limit_delay(c).is_some() => {
            SendOutcome::Retry { code, detail, min_delay_ms: rate_limit_delay(c).unwrap_or(0) }
        }
        Some(c) if transient(c) => SendOutcome::Retry { code, detail, min_delay_ms: 0 },
        _ if status == 429 => SendOutcome::Retry { code, detail, min_delay_ms: 60_000 },
        _ if status >= 500 => SendOutcome::Unconfirmed { detail },
        _ => SendOutcome::Rejected { code, detail },
    }
}

/// The longest wait between two tries, as a multiple of the retry base: 15 minutes at the
/// default 5 s. Once WhatsApp answers again, a message goes within this.
pub const BACKOFF_CAP_BASES: i64 = 180;
/// How long the sender keeps trying a message, counted from when it was queued, as a multiple
/// of the retry base: 24 hours at the default 5 s (WhatsApp outages of hours happen; Astria
/// keeps the images 30 days). Tests shrink both through `whatsapp_retry_base_ms`.
pub const HORIZON_BASES: i64 = 17_280;

/// The longest wait between tries for a retry base of `base_ms`.
pub fn backoff_cap_ms(base_ms: i64) -> i64 {
    base_ms.saturating_mul(BACKOFF_CAP_BASES)
}

/// How long a message is tried before it is given up, for a retry base of `base_ms`.
pub fn horizon_ms(base_ms: i64) -> i64 {
    base_ms.saturating_mul(HORIZON_BASES)
}

/// When to try again after `attempts` failed tries: exponential from `base_ms` up to
/// [`backoff_cap_ms`]; at least the answer's floor (a `Retry-After`, the pair-rate pace),
/// itself at most 15 minutes.
pub fn retry_delay_ms(base_ms: i64, attempts: i64, floor_ms: i64) -> i64 {
    let exp = attempts.clamp(1, 30) - 1;
    base_ms.saturating_mul(1i64 << exp).min(backoff_cap_ms(base_ms)).max(floor_ms.min(15 * 60_000))
}

/// Status updates move forward only (`sent` → `delivered` → `read`; `failed` is final), since
/// WhatsApp's webhooks can arrive out of order.
pub fn status_rank(status: &str) -> Option<u8> {
    match status {
        "sent" => Some(1),
        "delivered" => Some(2),
        "read" => Some(3),
        "failed" => Some(4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conversation::Choice;

    fn template() -> TemplateConfig {
        TemplateConfig { name: "order_update".into(), language: "en_US".into() }
    }

    #[test]
    fn a_customer_known_only_by_a_bsuid_is_sent_to_as_recipient_without_to() {
        let b =
            request_body(&Recipient::User("US.13491208655302741918".into()), &Message::text("hi"), &template(), "m1");
        assert_eq!(b["recipient"], "US.13491208655302741918");
        assert!(b.get("to").is_none(), "`to` would win over `recipient`: {b}");
        let b = request_body(&Recipient::Phone("4915".into()), &Message::text("hi"), &template(), "m1");
        assert_eq!(b["to"], "4915");
        assert!(b.get("recipient").is_none());
        assert_eq!(format!("{:?}", Recipient::User("US.1".into())), "Recipient::User(…)", "never printed");
    }

    #[test]
    fn text_and_image_bodies_follow_the_documented_shape() {
        let b = request_body(&Recipient::Phone("4915".into()), &Message::text("hi"), &template(), "m1");
        assert_eq!(b["biz_opaque_callback_data"], "m1", "every send is tagged with our message id");
        assert_eq!(
            b,
            json!({"messaging_product":"whatsapp","recipient_type":"individual","to":"4915","type":"text",
                   "biz_opaque_callback_data":"m1","text":{"body":"hi","preview_url":false}})
        );
        let img = Message::Image { link: "https://x/1.png".into(), caption: Some("1/2".into()) };
        let b = request_body(&Recipient::Phone("4915".into()), &img, &template(), "m1");
        assert_eq!(b["type"], "image");
        assert_eq!(b["image"], json!({"link":"https://x/1.png","caption":"1/2"}));
    }

    #[test]
    fn interactive_bodies_carry_buttons_and_list_rows() {
        let c = |id: &str| Choice { id: id.into(), title: id.to_uppercase(), description: Some("d".into()) };
        let buttons = Message::Buttons { body: "pick".into(), buttons: vec![c("a"), c("b")] };
        let b = request_body(&Recipient::Phone("1".into()), &buttons, &template(), "m1");
        assert_eq!(b["interactive"]["type"], "button");
        assert_eq!(b["interactive"]["action"]["buttons"][1], json!({"type":"reply","reply":{"id":"b","title":"B"}}));
        let list =
            Message::List { body: "pick".into(), button: "Packs".into(), section: "All".into(), rows: vec![c("x")] };
        let b = request_body(&Recipient::Phone("1".into()), &list, &template(), "m1");
        assert_eq!(b["interactive"]["action"]["button"], "Packs");
        assert_eq!(
            b["interactive"]["action"]["sections"][0]["rows"][0],
            json!({"id":"x","title":"X","description":"d"})
        );
    }

    #[test]
    fn an_image_too_large_goes_as_a_document_of_the_same_link() {
        let img = Message::Image { link: "https://mp.astria.ai/1/2/0.jpg".into(), caption: None };
        let doc = img.image_as_document().unwrap();
        let b = request_body(&Recipient::Phone("1".into()), &doc, &template(), "m1");
        assert_eq!(b["type"], "document");
        assert_eq!(b["document"], json!({"link":"https://mp.astria.ai/1/2/0.jpg","filename":"0.jpg"}));
        assert!(doc.is_paced() && img.is_paced() && !Message::text("x").is_paced());
        assert_eq!(Message::text("x").image_as_document(), None);
    }

    #[test]
    fn templates_use_the_configured_name_and_language() {
        let b =
            request_body(&Recipient::Phone("1".into()), &Message::Template { parameters: vec![] }, &template(), "m1");
        assert_eq!(b["template"], json!({"name":"order_update","language":{"code":"en_US"}}));
        let b = request_body(
            &Recipient::Phone("1".into()),
            &Message::Template { parameters: vec!["Ana".into()] },
            &template(),
            "m1",
        );
        assert_eq!(b["template"]["components"][0]["parameters"][0], json!({"type":"text","text":"Ana"}));
    }

    fn error(status: u16, code: i64) -> SendOutcome {
        let body = json!({"error":{"message":"m","type":"OAuthException","code":code,
            "error_data":{"messaging_product":"whatsapp","details":"d"},"fbtrace_id":"x"}});
        classify(status, body.to_string().as_bytes())
    }

    #[test]
    fn answers_are_classified_by_error_code() {
        let ok =
            br#"{"messaging_product":"whatsapp","contacts":[{"input":"1","wa_id":"1"}],"messages":[{"id":"wamid.A"}]}"#;
        assert_eq!(classify(200, ok), SendOutcome::Sent { wamid: "wamid.A".into() });
        assert_eq!(error(400, codes::OUTSIDE_WINDOW), SendOutcome::OutsideWindow);
        assert!(matches!(error(400, codes::THROUGHPUT_LIMIT), SendOutcome::Retry { min_delay_ms: 60_000, .. }));
        assert!(matches!(error(400, codes::PAIR_LIMIT), SendOutcome::Retry { min_delay_ms: 6_000, .. }));
        assert!(matches!(error(500, 131000), SendOutcome::Retry { .. }));
        assert!(matches!(error(400, codes::UNDELIVERABLE), SendOutcome::Rejected { code: Some(131026), .. }));
        assert!(matches!(error(401, codes::TOKEN_INVALID), SendOutcome::Rejected { code: Some(190), .. }));
        assert!(matches!(error(400, 100), SendOutcome::Rejected { .. }));
        // No answer we can trust either way: the send may have gone out.
        assert!(matches!(classify(502, b"<html>bad gateway</html>"), SendOutcome::Unconfirmed { .. }));
        assert!(matches!(classify(200, b"{}"), SendOutcome::Unconfirmed { .. }));
        assert!(matches!(classify(400, b"nonsense"), SendOutcome::Rejected { code: None, .. }));
    }

    #[test]
    fn rejection_detail_names_the_code_and_message() {
        let SendOutcome::Rejected { detail, .. } = error(400, codes::UNDELIVERABLE) else { panic!() };
        assert_eq!(detail, "HTTP 400, code 131026: m d");
    }

    #[test]
    fn retry_delays_grow_and_respect_floor_and_cap() {
        assert_eq!(retry_delay_ms(1000, 1, 0), 1000);
        assert_eq!(retry_delay_ms(1000, 3, 0), 4000);
        assert_eq!(retry_delay_ms(1000, 1, 60_000), 60_000);
        assert_eq!(retry_delay_ms(1000, 40, 0), 180_000, "capped at 180 bases");
        assert_eq!(retry_delay_ms(5000, 40, 0), 15 * 60_000, "15 minutes at the default base");
        assert_eq!(retry_delay_ms(1, 1, 24 * 3_600_000), 15 * 60_000, "a floor is at most 15 minutes");
    }

    #[test]
    fn at_the_default_base_a_message_is_tried_for_24_hours() {
        assert_eq!(horizon_ms(5000), 24 * 3_600_000);
        // Shrunk for tests: the same shape, 5,000 times shorter.
        assert_eq!((horizon_ms(1), backoff_cap_ms(1)), (17_280, 180));
    }

    #[test]
    fn statuses_only_move_forward() {
        assert!(status_rank("read") > status_rank("delivered"));
        assert!(status_rank("failed") > status_rank("read"));
        assert_eq!(status_rank("deleted"), None);
    }
}
