//! Configuration shared by the services, parsed from Spin variables into typed values at
//! first use. Every error names the variable, so a misconfigured deployment says what to fix.

use astria_models::Pack;

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
    let texts = Texts::from_json_overrides(&src.get("texts_json").unwrap_or_default())
        .map_err(|reason| ConfigError::Invalid { name: "texts_json", reason })?;
    Ok(conversation::Config { min_photos, max_photos, texts })
}

/// How the sender reaches the WhatsApp Cloud API.
#[derive(Clone, PartialEq, Eq)]
pub struct WhatsApp {
    /// `scheme://host[:port]` (`whatsapp_api_url`), no path: it is also the
    /// `allowed_outbound_hosts` entry.
    pub api_url: String,
    /// Graph API version, e.g. `v24.0` (`whatsapp_api_version`).
    pub api_version: String,
    pub phone_number_id: String,
    /// Secret; never logged (Debug leaves it out).
    pub access_token: String,
    pub template: crate::graph::TemplateConfig,
}

impl std::fmt::Debug for WhatsApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhatsApp")
            .field("api_url", &self.api_url)
            .field("api_version", &self.api_version)
            .field("phone_number_id", &self.phone_number_id)
            .field("template", &self.template)
            .finish_non_exhaustive()
    }
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
        access_token: required(src, "whatsapp_access_token")?,
        template: crate::graph::TemplateConfig {
            name: required(src, "whatsapp_template_name")?.trim().to_string(),
            language: required(src, "whatsapp_template_language")?.trim().to_string(),
        },
    })
}

/// What creating a Checkout session needs: `stripe_api_url`, `stripe_secret_key`,
/// `checkout_expiry_minutes`, `whatsapp_chat_link` (where Stripe sends the customer back).
#[derive(Clone, PartialEq, Eq)]
pub struct StripeCheckout {
    pub api_url: String,
    /// Secret; never logged (Debug leaves it out).
    pub secret_key: String,
    /// Clamped to Stripe's 30 minutes to 24 hours.
    pub expiry_minutes: i64,
    pub chat_link: String,
    /// How long one call to Stripe may take (`stripe_timeout_ms`, default 20 s).
    pub timeout_ms: u64,
}

impl std::fmt::Debug for StripeCheckout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeCheckout")
            .field("api_url", &self.api_url)
            .field("expiry_minutes", &self.expiry_minutes)
            .field("chat_link", &self.chat_link)
            .finish_non_exhaustive()
    }
}

pub fn stripe_checkout(src: &impl Source) -> Result<StripeCheckout, ConfigError> {
    let chat_link = required(src, "whatsapp_chat_link")?.trim().to_string();
    if !chat_link.starts_with("https://") {
        return Err(ConfigError::Invalid { name: "whatsapp_chat_link", reason: "must be an https:// URL".into() });
    }
    Ok(StripeCheckout {
        api_url: base_url(src, "stripe_api_url")?,
        secret_key: required(src, "stripe_secret_key")?,
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
#[derive(Clone, PartialEq, Eq)]
pub struct WhatsAppMedia {
    pub api_url: String,
    pub api_version: String,
    pub access_token: String,
}

impl std::fmt::Debug for WhatsAppMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhatsAppMedia").field("api_url", &self.api_url).finish_non_exhaustive()
    }
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
        access_token: required(src, "whatsapp_access_token")?,
    })
}

/// The image-service's Astria settings: `astria_api_url`, `astria_api_key`, `astria_test_mode`,
/// `callback_secret`, `public_base_url`.
#[derive(Clone, PartialEq, Eq)]
pub struct Astria {
    pub api_url: String,
    /// Secret; never logged (Debug leaves it out).
    pub api_key: String,
    /// `tune[branch]=fast`: Astria's free mock training.
    pub test_mode: bool,
    /// Secret; signs our callback URLs.
    pub callback_secret: String,
    /// Where Astria reaches our callbacks, `https://bot.example.com`.
    pub public_base_url: String,
    /// Hosts whose `https` image links may be sent to customers (`astria_image_hosts`).
    pub image_hosts: Vec<String>,
}

impl std::fmt::Debug for Astria {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Astria")
            .field("api_url", &self.api_url)
            .field("test_mode", &self.test_mode)
            .field("public_base_url", &self.public_base_url)
            .finish_non_exhaustive()
    }
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
        api_key: required(src, "astria_api_key")?,
        test_mode,
        callback_secret: required(src, "callback_secret")?,
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
