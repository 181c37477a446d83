//! Configuration shared by the services, parsed from Spin variables into typed values at
//! first use. Every error names the variable, so a misconfigured deployment says what to fix;
//! an invalid value is an error, never a silent default (defaults live in `spin.toml`).
//!
//! One loader per component (`message_service`, `sender`, `trainer`, `callbacks`,
//! `payment_webhook`, `checkout`, `maintenance`), built from the shared pieces below, and the
//! infrastructure's own (`database_url`, `redis_url`, `tracing`). Secrets are
//! [`SecretString`]s: they print as `[REDACTED]`, and using one takes an explicit
//! `expose_secret()`.

use std::time::Duration;

use astria_models::Pack;
pub use secrecy::{ExposeSecret, SecretString};

use crate::conversation;
use crate::money::Money;
use crate::texts::Texts;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("variable '{name}' is missing")]
    Missing { name: &'static str },
    #[error("variable '{name}' is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Reads a variable by name (spin-sdk's `variables::get` in components, a map in tests).
pub trait Source {
    fn get(&self, name: &str) -> Option<String>;
}

impl<F: Fn(&str) -> Option<String>> Source for F {
    fn get(&self, name: &str) -> Option<String> {
        self(name)
    }
}

fn required(src: &impl Source, name: &'static str) -> Result<String, ConfigError> {
    src.get(name).filter(|v| !v.trim().is_empty()).ok_or(ConfigError::Missing { name })
}

fn number(src: &impl Source, name: &'static str) -> Result<usize, ConfigError> {
    required(src, name)?.trim().parse().map_err(|e| ConfigError::Invalid { name, reason: format!("{e}") })
}

/// A whole number of at least `min`.
fn at_least(src: &impl Source, name: &'static str, min: i64) -> Result<i64, ConfigError> {
    let n: i64 =
        required(src, name)?.trim().parse().map_err(|e| ConfigError::Invalid { name, reason: format!("{e}") })?;
    if n < min {
        return Err(ConfigError::Invalid { name, reason: format!("must be at least {min}") });
    }
    Ok(n)
}

/// A secret. Present (spin.toml gives every variable a value) but possibly empty: an empty
/// secret refuses everything it guards, never accepts.
fn secret(src: &impl Source, name: &'static str) -> Result<SecretString, ConfigError> {
    src.get(name).map(SecretString::from).ok_or(ConfigError::Missing { name })
}

/// `true` or `false`.
fn boolean(src: &impl Source, name: &'static str) -> Result<bool, ConfigError> {
    match required(src, name)?.trim() {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(ConfigError::Invalid { name, reason: format!("'{other}' is not true/false") }),
    }
}

/// `auto_refund`: give money back by itself when an order cannot be fulfilled after payment
/// (`true`, the default), or only flag it for an operator (`false`).
pub fn auto_refund(src: &impl Source) -> Result<bool, ConfigError> {
    boolean(src, "auto_refund")
}

/// The bot's texts: `texts_json` overrides the defaults; empty keeps them all.
pub fn texts(src: &impl Source) -> Result<Texts, ConfigError> {
    Texts::from_json_overrides(&src.get("texts_json").unwrap_or_default())
        .map_err(|reason| ConfigError::Invalid { name: "texts_json", reason })
}

/// The packs on sale, from `catalogue_json`: a JSON array of packs as in `wit/models.wit`
/// (`id`, `title`, `description`, `astria_pack_id`, `subject_classes`, `price`).
pub fn catalogue(src: &impl Source) -> Result<Vec<Pack>, ConfigError> {
    const NAME: &str = "catalogue_json";
    let packs: Vec<Pack> = serde_json::from_str(&required(src, NAME)?)
        .map_err(|e| ConfigError::Invalid { name: NAME, reason: e.to_string() })?;
    let invalid = |reason: String| ConfigError::Invalid { name: NAME, reason };
    if packs.is_empty() {
        return Err(invalid("no packs".into()));
    }
    let mut ids = std::collections::HashSet::new();
    for p in &packs {
        if p.id.is_empty() || !p.id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(invalid(format!("pack id '{}' must be letters, digits, '-' or '_'", p.id)));
        }
        if !ids.insert(p.id.as_str()) {
            return Err(invalid(format!("pack id '{}' appears twice", p.id)));
        }
        if p.subject_classes.is_empty() {
            return Err(invalid(format!("pack '{}' has no subject classes", p.id)));
        }
        Money::try_from(&p.price).map_err(|e| invalid(format!("pack '{}': {e}", p.id)))?;
    }
    if packs.len() > conversation::limits::LIST_ROWS {
        return Err(invalid(format!("at most {} packs fit a WhatsApp list", conversation::limits::LIST_ROWS)));
    }
    Ok(packs)
}

/// The conversation's settings: `min_photos`, `max_photos`, `texts_json`.
pub fn conversation(src: &impl Source) -> Result<conversation::Config, ConfigError> {
    let min_photos = number(src, "min_photos")?;
    let max_photos = number(src, "max_photos")?;
    if min_photos == 0 || max_photos < min_photos {
        return Err(ConfigError::Invalid {
            name: "max_photos",
            reason: format!("need 1 <= min_photos ({min_photos}) <= max_photos ({max_photos})"),
        });
    }
    Ok(conversation::Config { min_photos, max_photos, texts: texts(src)? })
}

/// How the sender reaches the WhatsApp Cloud API.
#[derive(Debug)]
pub struct WhatsApp {
    /// `scheme://host[:port]` (`whatsapp_api_url`), no path: it is also the
    /// `allowed_outbound_hosts` entry.
    pub api_url: String,
    /// Graph API version, e.g. `v24.0` (`whatsapp_api_version`).
    pub api_version: String,
    pub phone_number_id: String,
    pub access_token: SecretString,
    pub template: crate::whatsapp::send::TemplateConfig,
}

impl WhatsApp {
    /// `POST` here to send a message.
    pub fn messages_url(&self) -> String {
        format!("{}/{}/{}/messages", self.api_url, self.api_version, self.phone_number_id)
    }
}

/// A base URL that may only be `scheme://host[:port]`.
pub fn base_url(src: &impl Source, name: &'static str) -> Result<String, ConfigError> {
    let url = required(src, name)?.trim().trim_end_matches('/').to_string();
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.contains(['/', '?', '#', '@', ' ']) => Ok(url),
        _ => Err(ConfigError::Invalid { name, reason: "must be scheme://host[:port] without a path".into() }),
    }
}

/// The sender's settings: `whatsapp_api_url`, `whatsapp_api_version`, `whatsapp_phone_number_id`,
/// `whatsapp_access_token`, `whatsapp_template_name`, `whatsapp_template_language`.
pub fn whatsapp(src: &impl Source) -> Result<WhatsApp, ConfigError> {
    let api_version = required(src, "whatsapp_api_version")?.trim().to_string();
    if !api_version.starts_with('v') || api_version.contains('/') {
        return Err(ConfigError::Invalid { name: "whatsapp_api_version", reason: "expected e.g. v24.0".into() });
    }
    Ok(WhatsApp {
        api_url: base_url(src, "whatsapp_api_url")?,
        api_version,
        phone_number_id: required(src, "whatsapp_phone_number_id")?.trim().to_string(),
        access_token: required(src, "whatsapp_access_token")?.into(),
        template: crate::whatsapp::send::TemplateConfig {
            name: required(src, "whatsapp_template_name")?.trim().to_string(),
            language: required(src, "whatsapp_template_language")?.trim().to_string(),
        },
    })
}

/// What creating a Checkout session needs: `stripe_api_url`, `stripe_secret_key`,
/// `checkout_expiry_minutes`, `whatsapp_chat_link` (where Stripe sends the customer back).
#[derive(Debug)]
pub struct StripeCheckout {
    pub api_url: String,
    pub secret_key: SecretString,
    /// Clamped to Stripe's 30 minutes to 24 hours.
    pub expiry_minutes: i64,
    pub chat_link: String,
    /// How long one call to Stripe may take (`stripe_timeout_ms`, default 20 s).
    pub timeout_ms: u64,
}

pub fn stripe_checkout(src: &impl Source) -> Result<StripeCheckout, ConfigError> {
    let chat_link = required(src, "whatsapp_chat_link")?.trim().to_string();
    if !chat_link.starts_with("https://") {
        return Err(ConfigError::Invalid { name: "whatsapp_chat_link", reason: "must be an https:// URL".into() });
    }
    Ok(StripeCheckout {
        api_url: base_url(src, "stripe_api_url")?,
        secret_key: required(src, "stripe_secret_key")?.into(),
        expiry_minutes: crate::stripe::expiry_minutes_in_bounds(number(src, "checkout_expiry_minutes")? as i64),
        chat_link,
        timeout_ms: match src.get("stripe_timeout_ms").filter(|v| !v.trim().is_empty()) {
            None => 20_000,
            Some(_) => number(src, "stripe_timeout_ms")? as u64,
        },
    })
}

/// `stripe_webhook_tolerance_seconds`: how old a signed webhook may be (default 300).
pub fn stripe_webhook_tolerance(src: &impl Source) -> Result<i64, ConfigError> {
    match src.get("stripe_webhook_tolerance_seconds").filter(|v| !v.trim().is_empty()) {
        None => Ok(300),
        Some(_) => Ok(number(src, "stripe_webhook_tolerance_seconds")? as i64),
    }
}

/// What fetching the customer's photos from WhatsApp needs: `whatsapp_api_url`,
/// `whatsapp_api_version`, `whatsapp_access_token`.
#[derive(Debug)]
pub struct WhatsAppMedia {
    pub api_url: String,
    pub api_version: String,
    pub access_token: SecretString,
}

impl WhatsAppMedia {
    /// `GET` here for a media id's download URL.
    pub fn lookup_url(&self, media_id: &str) -> String {
        format!("{}/{}/{}", self.api_url, self.api_version, media_id)
    }
}

pub fn whatsapp_media(src: &impl Source) -> Result<WhatsAppMedia, ConfigError> {
    Ok(WhatsAppMedia {
        api_url: base_url(src, "whatsapp_api_url")?,
        api_version: required(src, "whatsapp_api_version")?.trim().to_string(),
        access_token: required(src, "whatsapp_access_token")?.into(),
    })
}

/// The image-service's Astria settings: `astria_api_url`, `astria_api_key`, `astria_test_mode`,
/// `callback_secret`, `public_base_url`.
#[derive(Debug)]
pub struct Astria {
    pub api_url: String,
    pub api_key: SecretString,
    /// `tune[branch]=fast`: Astria's free mock training.
    pub test_mode: bool,
    /// Signs our callback URLs.
    pub callback_secret: SecretString,
    /// Where Astria reaches our callbacks, `https://bot.example.com`.
    pub public_base_url: String,
    /// Hosts whose `https` image links may be sent to customers (`astria_image_hosts`).
    pub image_hosts: Vec<String>,
}

pub fn astria(src: &impl Source) -> Result<Astria, ConfigError> {
    let test_mode = match src.get("astria_test_mode").unwrap_or_default().trim() {
        "" | "false" | "0" => false,
        "true" | "1" => true,
        other => {
            return Err(ConfigError::Invalid {
                name: "astria_test_mode",
                reason: format!("'{other}' is not true/false"),
            })
        }
    };
    Ok(Astria {
        api_url: base_url(src, "astria_api_url")?,
        api_key: required(src, "astria_api_key")?.into(),
        test_mode,
        callback_secret: required(src, "callback_secret")?.into(),
        public_base_url: base_url(src, "public_base_url")?,
        image_hosts: src
            .get("astria_image_hosts")
            .unwrap_or_default()
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect(),
    })
}

// ------------------------------------------------------------------ one loader per component

// message-service's edge reads each of its settings where it needs it, one variable at a time:
// a POST reads only the app secret before its signature is checked, so a forged request costs
// one variable read (what a refusal costs most, docs/performance.md).

/// `whatsapp_verify_token`: the subscription handshake's token (`GET /SmsReceived`); empty
/// passes none.
pub fn whatsapp_verify_token(src: &impl Source) -> Result<SecretString, ConfigError> {
    secret(src, "whatsapp_verify_token")
}

/// `whatsapp_app_secret`: what every webhook POST is signed with (HMAC-SHA256); empty accepts
/// none.
pub fn whatsapp_app_secret(src: &impl Source) -> Result<SecretString, ConfigError> {
    secret(src, "whatsapp_app_secret")
}

/// `whatsapp_phone_number_id`: the number whose webhooks are ours (the conversation worker reads
/// only this of the webhook's settings, never its secrets).
pub fn phone_number_id(src: &impl Source) -> String {
    src.get("whatsapp_phone_number_id").unwrap_or_default().trim().to_string()
}

/// message-service's conversation: the packs (`catalogue_json`) and its settings
/// (`min_photos`, `max_photos`, `texts_json`).
#[derive(Debug)]
pub struct MessageService {
    pub packs: Vec<Pack>,
    pub conversation: conversation::Config,
}

pub fn message_service(src: &impl Source) -> Result<MessageService, ConfigError> {
    Ok(MessageService { packs: catalogue(src)?, conversation: conversation(src)? })
}

/// message-sender: the Graph API ([`WhatsApp`]), the sender's pace (`whatsapp_retry_base_ms`,
/// `whatsapp_pace_ms`, `whatsapp_unconfirmed_wait_ms`, `whatsapp_timeout_ms`), the texts and
/// `auto_refund` (an order whose portraits WhatsApp never took).
#[derive(Debug)]
pub struct Sender {
    pub whatsapp: WhatsApp,
    /// First retry delay; doubles per attempt.
    pub retry_base_ms: i64,
    /// Least time between two images to one customer.
    pub pace_ms: i64,
    /// After an answer that leaves it open whether a message went out, how long to wait for
    /// its status webhook before sending it again.
    pub unconfirmed_wait_ms: i64,
    /// How long one Graph API call may take.
    pub timeout: Duration,
    /// The texts (the one telling the customer every portrait is there).
    pub texts: Texts,
    /// Whether an order WhatsApp could not deliver is refunded without a human.
    pub auto_refund: bool,
}

/// How long one sender may hold a contact's queue without renewing it. The sender renews it
/// before each send, and one Graph API call ends within `whatsapp_timeout_ms` (the HTTP
/// client's overall deadline): so that timeout must stay well inside the lease, or a slow
/// answer would let a second replica take the queue and send the same message.
pub const SENDER_LEASE_MS: i64 = 60_000;

pub fn sender(src: &impl Source) -> Result<Sender, ConfigError> {
    let timeout_ms = at_least(src, "whatsapp_timeout_ms", 1)?;
    if timeout_ms > SENDER_LEASE_MS / 2 {
        return Err(ConfigError::Invalid {
            name: "whatsapp_timeout_ms",
            reason: format!("must be at most {} (half the sender's contact lease)", SENDER_LEASE_MS / 2),
        });
    }
    Ok(Sender {
        whatsapp: whatsapp(src)?,
        retry_base_ms: at_least(src, "whatsapp_retry_base_ms", 1)?,
        pace_ms: at_least(src, "whatsapp_pace_ms", 0)?,
        unconfirmed_wait_ms: at_least(src, "whatsapp_unconfirmed_wait_ms", 0)?,
        timeout: Duration::from_millis(timeout_ms as u64),
        texts: texts(src)?,
        auto_refund: auto_refund(src)?,
    })
}

/// image-trainer: Astria ([`Astria`]), WhatsApp's media ([`WhatsAppMedia`]), the packs and
/// the texts.
#[derive(Debug)]
pub struct Trainer {
    pub astria: Astria,
    pub media: WhatsAppMedia,
    pub packs: Vec<Pack>,
    pub texts: Texts,
    pub auto_refund: bool,
}

pub fn trainer(src: &impl Source) -> Result<Trainer, ConfigError> {
    Ok(Trainer {
        astria: astria(src)?,
        media: whatsapp_media(src)?,
        packs: catalogue(src)?,
        texts: texts(src)?,
        auto_refund: auto_refund(src)?,
    })
}

/// image-service: what checks Astria's callbacks (`callback_secret`; empty accepts none).
#[derive(Debug)]
pub struct Callbacks {
    pub callback_secret: SecretString,
}

pub fn callbacks(src: &impl Source) -> Result<Callbacks, ConfigError> {
    Ok(Callbacks { callback_secret: secret(src, "callback_secret")? })
}

/// payment-service: Stripe's signed webhook (`stripe_webhook_secret`, empty accepts none;
/// `stripe_webhook_tolerance_seconds`) and the texts.
#[derive(Debug)]
pub struct PaymentWebhook {
    pub webhook_secret: SecretString,
    pub tolerance_s: i64,
    pub texts: Texts,
    pub auto_refund: bool,
}

pub fn payment_webhook(src: &impl Source) -> Result<PaymentWebhook, ConfigError> {
    Ok(PaymentWebhook {
        webhook_secret: secret(src, "stripe_webhook_secret")?,
        tolerance_s: stripe_webhook_tolerance(src)?,
        texts: texts(src)?,
        auto_refund: auto_refund(src)?,
    })
}

/// payment-checkout: Stripe's Checkout API ([`StripeCheckout`]), the packs and the texts.
#[derive(Debug)]
pub struct Checkout {
    pub stripe: StripeCheckout,
    pub packs: Vec<Pack>,
    pub texts: Texts,
}

pub fn checkout(src: &impl Source) -> Result<Checkout, ConfigError> {
    Ok(Checkout { stripe: stripe_checkout(src)?, packs: catalogue(src)?, texts: texts(src)? })
}

/// How long the weekly cleanup keeps each kind of record, in days (`retention_*_days`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionDays {
    pub webhook_ids: i64,
    pub events: i64,
    pub dead_letters: i64,
    pub abandoned_orders: i64,
    pub delivered_photos: i64,
    pub messages: i64,
    pub opted_out_contacts: i64,
    pub generated_images: i64,
}

/// The maintenance relay's reconciliation with Astria and its give-ups (`reconcile_*`,
/// `held_give_up_days`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconcile {
    pub after_minutes: i64,
    pub backoff_minutes: i64,
    pub give_up_minutes: i64,
    pub batch: i64,
    pub paid_after_minutes: i64,
    pub held_give_up_days: i64,
}

/// maintenance-service's edge: the operators' tokens (`admin_token`; the read-only
/// `metrics_token` for a Prometheus scraper; an empty one opens nothing). Read apart from
/// [`maintenance`] so that a refused request costs two variables.
#[derive(Debug)]
pub struct OperatorTokens {
    pub admin: SecretString,
    pub metrics: SecretString,
}

pub fn operator_tokens(src: &impl Source) -> Result<OperatorTokens, ConfigError> {
    Ok(OperatorTokens { admin: secret(src, "admin_token")?, metrics: secret(src, "metrics_token")? })
}

/// maintenance-service's work: the relay (`relay_batch`), the cleanup (`retention_*_days`,
/// `cleanup_batch`, `cleanup_lease_seconds`), the reconciliation and the texts.
#[derive(Debug)]
pub struct Maintenance {
    pub relay_batch: i64,
    pub retention: RetentionDays,
    pub cleanup_batch: i64,
    pub cleanup_lease_seconds: i64,
    pub reconcile: Reconcile,
    pub texts: Texts,
    pub auto_refund: bool,
    /// The sender's retry base (`whatsapp_retry_base_ms`): the horizon within which the relay
    /// revives a queued message whose event died.
    pub whatsapp_retry_base_ms: i64,
}

pub fn maintenance(src: &impl Source) -> Result<Maintenance, ConfigError> {
    let days = |name| at_least(src, name, 1);
    Ok(Maintenance {
        relay_batch: at_least(src, "relay_batch", 1)?,
        retention: RetentionDays {
            webhook_ids: days("retention_webhook_ids_days")?,
            events: days("retention_events_days")?,
            dead_letters: days("retention_dead_letters_days")?,
            abandoned_orders: days("retention_abandoned_orders_days")?,
            delivered_photos: days("retention_delivered_photos_days")?,
            messages: days("retention_messages_days")?,
            opted_out_contacts: days("retention_opted_out_contacts_days")?,
            generated_images: days("retention_generated_images_days")?,
        },
        cleanup_batch: at_least(src, "cleanup_batch", 1)?,
        cleanup_lease_seconds: at_least(src, "cleanup_lease_seconds", 1)?,
        reconcile: Reconcile {
            after_minutes: at_least(src, "reconcile_after_minutes", 0)?,
            backoff_minutes: at_least(src, "reconcile_backoff_minutes", 0)?,
            give_up_minutes: at_least(src, "reconcile_give_up_minutes", 0)?,
            batch: at_least(src, "reconcile_batch", 1)?,
            paid_after_minutes: at_least(src, "reconcile_paid_after_minutes", 0)?,
            held_give_up_days: at_least(src, "held_give_up_days", 0)?,
        },
        texts: texts(src)?,
        auto_refund: auto_refund(src)?,
        whatsapp_retry_base_ms: at_least(src, "whatsapp_retry_base_ms", 1)?,
    })
}

// ------------------------------------------------------------------ infrastructure

/// `database_url`: `sqlite:<label>` or `postgres://user:password@host:port/db` (a secret: it
/// may carry a password).
pub fn database_url(src: &impl Source) -> Result<SecretString, ConfigError> {
    Ok(required(src, "database_url")?.into())
}

/// `redis_url`: where events are announced (a secret: a managed Redis's URL carries its
/// password).
pub fn redis_url(src: &impl Source) -> Result<SecretString, ConfigError> {
    Ok(required(src, "redis_url")?.into())
}

/// Where spans go: the collector's base URL when `otel_traces_enabled` is `true`, `None` when
/// it is `false` or empty.
pub fn tracing(src: &impl Source) -> Result<Option<String>, ConfigError> {
    match src.get("otel_traces_enabled").unwrap_or_default().trim() {
        "" | "false" => Ok(None),
        "true" => Ok(Some(base_url(src, "otel_collector_url")?)),
        other => {
            Err(ConfigError::Invalid { name: "otel_traces_enabled", reason: format!("'{other}' is not true/false") })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn src(pairs: &[(&str, &str)]) -> impl Source {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name: &str| map.get(name).cloned()
    }

    const PACK: &str = r#"{"id":"corporate","title":"Corporate","description":"d","astria_pack_id":260,"subject_classes":["man","woman"],"price":{"amount_minor":1999,"currency":"usd"}}"#;

    #[test]
    fn a_valid_catalogue_is_read() {
        let packs = catalogue(&src(&[("catalogue_json", &format!("[{PACK}]"))])).unwrap();
        assert_eq!(packs[0].astria_pack_id, 260);
    }

    #[test]
    fn catalogue_errors_name_the_variable_and_the_problem() {
        let cases = [
            ("", "missing"),
            ("not json", "invalid"),
            ("[]", "no packs"),
            (&*format!("[{PACK},{PACK}]"), "twice"),
            (&*format!("[{}]", PACK.replace("1999", "-5")), "must not be negative"),
            (&*format!("[{}]", PACK.replace("\"man\",\"woman\"", "")), "no subject classes"),
        ];
        for (json, expect) in cases {
            let err = catalogue(&src(&[("catalogue_json", json)])).unwrap_err().to_string();
            assert!(err.contains("catalogue_json") && err.contains(expect), "{json}: {err}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_variable_values_give_typed_errors_never_panics(
            catalogue_json in ".{0,200}", min in ".{0,6}", max in ".{0,6}", texts in ".{0,60}"
        ) {
            let s = src(&[("catalogue_json", &catalogue_json), ("min_photos", &min), ("max_photos", &max), ("texts_json", &texts)]);
            let _ = catalogue(&s);
            if let Ok(c) = conversation(&s) {
                proptest::prop_assert!(c.min_photos >= 1 && c.min_photos <= c.max_photos);
            }
        }
    }

    #[test]
    fn whatsapp_settings_are_read_and_urls_checked() {
        let vars = |url: &str| {
            src(&[
                ("whatsapp_api_url", url),
                ("whatsapp_api_version", "v24.0"),
                ("whatsapp_phone_number_id", "1055"),
                ("whatsapp_access_token", "EAAG-secret"),
                ("whatsapp_template_name", "order_update"),
                ("whatsapp_template_language", "en_US"),
            ])
        };
        let w = whatsapp(&vars("https://graph.facebook.com/")).unwrap();
        assert_eq!(w.messages_url(), "https://graph.facebook.com/v24.0/1055/messages");
        assert!(!format!("{w:?}").contains("EAAG-secret"));
        for bad in ["graph.facebook.com", "https://graph.facebook.com/v24.0", "ftp://x", "https://"] {
            let err = whatsapp(&vars(bad)).unwrap_err();
            assert!(matches!(err, ConfigError::Invalid { name: "whatsapp_api_url", .. }), "{bad}: {err}");
        }
        assert_eq!(whatsapp(&vars("http://127.0.0.1:9000")).unwrap().api_url, "http://127.0.0.1:9000");
    }

    #[test]
    fn stripe_settings_are_read_and_bounded() {
        let vars = |expiry: &str, link: &str| {
            src(&[
                ("stripe_api_url", "https://api.stripe.com"),
                ("stripe_secret_key", "sk_test_123"),
                ("checkout_expiry_minutes", expiry),
                ("whatsapp_chat_link", link),
            ])
        };
        let s = stripe_checkout(&vars("10", "https://wa.me/15550783881")).unwrap();
        assert_eq!(s.expiry_minutes, 30, "Stripe's minimum");
        assert!(!format!("{s:?}").contains("sk_test_123"));
        assert!(stripe_checkout(&vars("x", "https://wa.me/1")).is_err());
        assert!(stripe_checkout(&vars("60", "wa.me/1")).is_err());
        assert_eq!(stripe_webhook_tolerance(&src(&[])).unwrap(), 300);
        assert_eq!(stripe_webhook_tolerance(&src(&[("stripe_webhook_tolerance_seconds", "60")])).unwrap(), 60);
    }

    #[test]
    fn astria_settings_are_read_and_secrets_kept_out_of_debug() {
        let vars = |mode: &str| {
            src(&[
                ("astria_api_url", "https://api.astria.ai"),
                ("astria_api_key", "sd_secret"),
                ("astria_test_mode", mode),
                ("callback_secret", "cb_secret"),
                ("public_base_url", "https://bot.example.com/"),
            ])
        };
        let a = astria(&vars("true")).unwrap();
        assert!(a.test_mode);
        assert_eq!(a.public_base_url, "https://bot.example.com");
        let debug = format!("{a:?}");
        assert!(!debug.contains("sd_secret") && !debug.contains("cb_secret"));
        assert!(!astria(&vars("")).unwrap().test_mode);
        assert!(astria(&vars("maybe")).is_err());
    }

    /// Every variable a component reads, at spin.toml's defaults, with distinctive secrets.
    fn defaults(overrides: &[(&str, &str)]) -> impl Source {
        let mut vars: HashMap<String, String> = [
            ("whatsapp_app_secret", "app-SECRET-1"),
            ("whatsapp_verify_token", "verify-SECRET-2"),
            ("whatsapp_access_token", "EAAG-SECRET-3"),
            ("whatsapp_phone_number_id", "1055"),
            ("whatsapp_api_url", "https://graph.facebook.com"),
            ("whatsapp_api_version", "v24.0"),
            ("whatsapp_template_name", "hello_world"),
            ("whatsapp_template_language", "en_US"),
            ("whatsapp_retry_base_ms", "5000"),
            ("whatsapp_pace_ms", "3000"),
            ("whatsapp_timeout_ms", "15000"),
            ("whatsapp_unconfirmed_wait_ms", "120000"),
            ("catalogue_json", &format!("[{PACK}]")),
            ("min_photos", "4"),
            ("max_photos", "10"),
            ("texts_json", ""),
            ("astria_api_url", "https://api.astria.ai"),
            ("astria_api_key", "sd_SECRET-4"),
            ("astria_test_mode", "false"),
            ("callback_secret", "cb-SECRET-5"),
            ("public_base_url", "https://bot.example.com"),
            ("stripe_api_url", "https://api.stripe.com"),
            ("stripe_secret_key", "sk_SECRET-6"),
            ("stripe_webhook_secret", "whsec_SECRET-7"),
            ("checkout_expiry_minutes", "1440"),
            ("whatsapp_chat_link", "https://wa.me/"),
            ("admin_token", "admin-SECRET-8"),
            ("metrics_token", "metrics-SECRET-9"),
            ("relay_batch", "500"),
            ("retention_webhook_ids_days", "30"),
            ("retention_events_days", "14"),
            ("retention_dead_letters_days", "90"),
            ("retention_abandoned_orders_days", "7"),
            ("retention_delivered_photos_days", "7"),
            ("retention_messages_days", "30"),
            ("retention_opted_out_contacts_days", "30"),
            ("retention_generated_images_days", "30"),
            ("cleanup_batch", "1000"),
            ("cleanup_lease_seconds", "900"),
            ("reconcile_after_minutes", "60"),
            ("reconcile_backoff_minutes", "5"),
            ("reconcile_give_up_minutes", "1440"),
            ("reconcile_batch", "20"),
            ("reconcile_paid_after_minutes", "15"),
            ("held_give_up_days", "25"),
            ("database_url", "postgres://u:db-SECRET-10@db:5432/astria"),
            ("redis_url", "redis://:redis-SECRET-11@redis:6379"),
            ("otel_traces_enabled", "false"),
            ("otel_collector_url", "http://127.0.0.1:4318"),
            ("auto_refund", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in overrides {
            vars.insert(k.to_string(), v.to_string());
        }
        move |name: &str| vars.get(name).cloned()
    }

    #[test]
    fn every_component_loads_from_the_defaults_and_prints_no_secret() {
        let src = defaults(&[]);
        let printed = format!(
            "{:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?} {:?}",
            (whatsapp_app_secret(&src).unwrap(), whatsapp_verify_token(&src).unwrap()),
            message_service(&src).unwrap(),
            sender(&src).unwrap(),
            trainer(&src).unwrap(),
            callbacks(&src).unwrap(),
            payment_webhook(&src).unwrap(),
            checkout(&src).unwrap(),
            operator_tokens(&src).unwrap(),
            maintenance(&src).unwrap(),
            database_url(&src).unwrap(),
            redis_url(&src).unwrap(),
            tracing(&src).unwrap(),
        );
        assert!(!printed.contains("SECRET"), "a secret in a Debug print: {printed}");
        assert!(printed.contains("REDACTED"));
        assert_eq!(sender(&src).unwrap().timeout, Duration::from_millis(15_000));
        assert_eq!(maintenance(&src).unwrap().reconcile.held_give_up_days, 25);
        assert_eq!(
            tracing(&defaults(&[("otel_traces_enabled", "true")])).unwrap().as_deref(),
            Some("http://127.0.0.1:4318")
        );
    }

    #[test]
    fn an_invalid_value_is_an_error_naming_its_variable_never_a_default() {
        let cases: &[(&str, &str)] = &[
            ("whatsapp_retry_base_ms", "soon"),
            ("whatsapp_pace_ms", "-1"),
            ("whatsapp_timeout_ms", "0"),
            ("whatsapp_timeout_ms", "30001"),
            ("whatsapp_unconfirmed_wait_ms", ""),
            ("texts_json", "{not json"),
            ("relay_batch", "0"),
            ("retention_events_days", "two weeks"),
            ("cleanup_lease_seconds", "1.5"),
            ("reconcile_batch", "x"),
            ("held_give_up_days", "-3"),
            ("otel_traces_enabled", "yes"),
            ("astria_test_mode", "maybe"),
            ("auto_refund", "sometimes"),
        ];
        for (name, value) in cases {
            let src = defaults(&[(name, value)]);
            let errors: Vec<String> = [
                sender(&src).err(),
                trainer(&src).err(),
                payment_webhook(&src).err(),
                checkout(&src).err(),
                maintenance(&src).err(),
                tracing(&src).err(),
            ]
            .into_iter()
            .flatten()
            .map(|e| e.to_string())
            .collect();
            assert!(!errors.is_empty(), "{name}={value:?} was accepted");
            assert!(errors.iter().all(|e| e.contains(name)), "{name}={value:?}: {errors:?}");
        }
    }

    #[test]
    fn photo_bounds_are_checked() {
        let ok = conversation(&src(&[("min_photos", "4"), ("max_photos", "10")])).unwrap();
        assert_eq!((ok.min_photos, ok.max_photos), (4, 10));
        for (min, max) in [("0", "3"), ("5", "4"), ("x", "4")] {
            assert!(conversation(&src(&[("min_photos", min), ("max_photos", max)])).is_err(), "{min} {max}");
        }
        let err = conversation(&src(&[("max_photos", "4")])).unwrap_err();
        assert_eq!(err, ConfigError::Missing { name: "min_photos" });
    }
}
