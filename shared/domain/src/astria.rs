//! Astria (api.astria.ai), parsed at the edge: callback tokens, tune and prompt objects (bare or
//! wrapped), the multipart request that trains a pack tune, and what an answer means. Also the
//! WhatsApp media lookup that fetches the customer's photos for it. Pure: the image-service
//! components do the I/O.

use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AstriaError {
    #[error("malformed Astria object: {0}")]
    Malformed(String),
}

/// Our two callback endpoints. A token is valid for one of them only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallbackEndpoint {
    /// `POST /pack-tune-received`: the tune finished training.
    Tune,
    /// `POST /update-images`: a prompt's images are ready.
    Prompt,
}

impl CallbackEndpoint {
    pub fn path(self) -> &'static str {
        match self {
            CallbackEndpoint::Tune => "/pack-tune-received",
            CallbackEndpoint::Prompt => "/update-images",
        }
    }

    /// A short name, for logs and keys.
    pub fn name(self) -> &'static str {
        match self {
            CallbackEndpoint::Tune => "tune",
            CallbackEndpoint::Prompt => "prompt",
        }
    }

    pub fn from_path(path: &str) -> Option<CallbackEndpoint> {
        match path {
            "/pack-tune-received" => Some(CallbackEndpoint::Tune),
            "/update-images" => Some(CallbackEndpoint::Prompt),
            _ => None,
        }
    }
}

/// The start of the outbox ids of an order's callback signals
/// (`astria-callback:<order>:<endpoint>:<sync generation>`): one event per generation, however
/// many callbacks (image-service), found again by the trainer after a pass (image-trainer).
pub fn callback_signal_prefix(order_id: &str) -> String {
    format!("astria-callback:{order_id}:")
}

/// How long a callback URL stays valid after training started: Astria calls back within
/// minutes to hours; later, reconciliation fetches the same facts with the API key.
pub const CALLBACK_LIFETIME_S: i64 = 7 * 24 * 3600;

fn callback_mac(secret: &str, endpoint: CallbackEndpoint, order_id: &str, expires_at: i64) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("astria-callback:v2:{}:{expires_at}:", endpoint.path()).as_bytes());
    mac.update(order_id.as_bytes());
    mac
}

/// The token in our callback URLs: Astria does not sign callbacks, so each URL carries
/// HMAC-SHA256(`callback_secret`, endpoint, expiry, order id), hex. It is bound to the order
/// (which is the tune's title), to one endpoint and to an expiry, and it only ever makes the app
/// ask Astria: a callback's body is never trusted.
pub fn callback_token(secret: &str, endpoint: CallbackEndpoint, order_id: &str, expires_at: i64) -> String {
    hex::encode(callback_mac(secret, endpoint, order_id, expires_at).finalize().into_bytes())
}

/// Checks a callback's token in constant time, and that it has not expired at `now_s` (unix
/// seconds). An empty secret never verifies.
pub fn verify_callback_token(
    secret: &str,
    endpoint: CallbackEndpoint,
    order_id: &str,
    expires_at: i64,
    token: &str,
    now_s: i64,
) -> bool {
    if secret.is_empty() || now_s > expires_at {
        return false;
    }
    let Ok(given) = hex::decode(token) else { return false };
    callback_mac(secret, endpoint, order_id, expires_at).verify_slice(&given).is_ok()
}

/// `{base}{path}?order={id}&exp={expires_at}&token={token}`.
pub fn callback_url(
    public_base_url: &str,
    endpoint: CallbackEndpoint,
    secret: &str,
    order_id: &str,
    expires_at: i64,
) -> String {
    let query = form_urlencoded::Serializer::new(String::new())
        .append_pair("order", order_id)
        .append_pair("exp", &expires_at.to_string())
        .append_pair("token", &callback_token(secret, endpoint, order_id, expires_at))
        .finish();
    format!("{}{}?{query}", public_base_url.trim_end_matches('/'), endpoint.path())
}

/// Whether `url` is an `https` URL on one of `hosts` (exactly, no port, no user info): only such
/// image links are ever sent to a customer.
pub fn trusted_image_url(url: &str, hosts: &[String]) -> bool {
    let Some(rest) = url.strip_prefix("https://") else { return false };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    !authority.is_empty()
        && !authority.contains(['@', ':', '\\'])
        && hosts.iter().any(|h| h.eq_ignore_ascii_case(authority))
        && rest.len() > authority.len()
}

/// A tune, as far as the bot cares.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Tune {
    pub id: u64,
    #[serde(default)]
    pub title: Option<String>,
    #[serde(default)]
    pub trained_at: Option<String>,
}

/// A prompt and the images it produced so far.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Prompt {
    pub id: u64,
    #[serde(default)]
    pub tune_id: Option<u64>,
    #[serde(default)]
    pub trained_at: Option<String>,
    #[serde(default)]
    pub images: Vec<String>,
}

impl Prompt {
    /// Astria is done with it (it may have produced fewer images than asked, even none).
    pub fn is_done(&self) -> bool {
        self.trained_at.is_some() || !self.images.is_empty()
    }
}

/// The object itself, or wrapped as `{"<key>": {...}}` (Astria's starter reads callbacks
/// wrapped; the API docs show them bare: both are accepted).
fn unwrap_object<T: serde::de::DeserializeOwned>(raw: &[u8], key: &str) -> Result<T, AstriaError> {
    let value: serde_json::Value = serde_json::from_slice(raw).map_err(|e| AstriaError::Malformed(e.to_string()))?;
    let object = match value.get(key) {
        Some(inner) if inner.is_object() => inner.clone(),
        _ => value,
    };
    serde_json::from_value(object).map_err(|e| AstriaError::Malformed(format!("{key}: {e}")))
}

pub fn parse_tune(raw: &[u8]) -> Result<Tune, AstriaError> {
    unwrap_object(raw, "tune")
}

pub fn parse_prompt(raw: &[u8]) -> Result<Prompt, AstriaError> {
    let p: Prompt = unwrap_object(raw, "prompt")?;
    if p.images.iter().any(|u| !u.starts_with("https://") && !u.starts_with("http://")) {
        return Err(AstriaError::Malformed("prompt image that is not an http(s) URL".into()));
    }
    Ok(p)
}

/// `GET /tunes/{id}/prompts`: a JSON array of prompts.
pub fn parse_prompts(raw: &[u8]) -> Result<Vec<Prompt>, AstriaError> {
    serde_json::from_slice(raw).map_err(|e| AstriaError::Malformed(e.to_string()))
}

/// One file of a multipart request.
pub struct FilePart<'a> {
    pub field: &'a str,
    pub filename: &'a str,
    pub content_type: &'a str,
    pub bytes: &'a [u8],
}

/// A `multipart/form-data` body built part by part: each file's bytes are copied in once, so a
/// caller can download a photo, add it and drop it before fetching the next (the photos are
/// then held once, in the body, rather than once as downloads and again in the body).
pub struct Multipart {
    boundary: String,
    body: Vec<u8>,
}

impl Multipart {
    /// `boundary` must not occur in any part.
    pub fn new(boundary: &str) -> Multipart {
        Multipart { boundary: boundary.to_string(), body: Vec::new() }
    }

    pub fn field(&mut self, name: &str, value: &str) {
        let b = &self.boundary;
        self.body.extend_from_slice(
            format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").as_bytes(),
        );
    }

    pub fn file(&mut self, f: &FilePart<'_>) {
        let b = &self.boundary;
        self.body.extend_from_slice(
            format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\nContent-Type: {}\r\n\r\n",
                f.field, f.filename, f.content_type
            )
            .as_bytes(),
        );
        self.body.extend_from_slice(f.bytes);
        self.body.extend_from_slice(b"\r\n");
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.body.extend_from_slice(format!("--{}--\r\n", self.boundary).as_bytes());
        self.body
    }
}

/// A `multipart/form-data` body with `boundary` (which must not occur in any part).
pub fn multipart(boundary: &str, fields: &[(&str, &str)], files: &[FilePart<'_>]) -> Vec<u8> {
    let mut body = Multipart::new(boundary);
    for (name, value) in fields {
        body.field(name, value);
    }
    for f in files {
        body.file(f);
    }
    body.finish()
}

/// The text fields of `POST /p/{pack_id}/tunes` for one order.
pub struct TuneRequest<'a> {
    /// Astria treats the title as an idempotency key: the order id.
    pub order_id: &'a str,
    pub subject_class: &'a str,
    pub tune_callback: &'a str,
    pub prompt_callback: &'a str,
    /// `tune[branch]=fast`: Astria's free mock mode (test mode).
    pub fast: bool,
}

pub fn tune_fields<'a>(r: &'a TuneRequest<'a>) -> Vec<(&'static str, &'a str)> {
    let mut fields = vec![
        ("tune[title]", r.order_id),
        ("tune[name]", r.subject_class),
        ("tune[callback]", r.tune_callback),
        ("tune[prompt_attributes][callback]", r.prompt_callback),
    ];
    if r.fast {
        fields.push(("tune[branch]", "fast"));
    }
    fields
}

/// What an answer of Astria means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer<T> {
    Ok(T),
    /// 5xx (504 included: probably processed, the title makes the retry safe), 429, timeouts.
    Retry(String),
    /// 401 bad key, 402 plan, 422 validation: retrying cannot help.
    Rejected(String),
}

pub fn classify<T>(status: u16, body: &[u8], parse: impl Fn(&[u8]) -> Result<T, AstriaError>) -> Answer<T> {
    let snippet = String::from_utf8_lossy(&body[..body.len().min(300)]).to_string();
    match status {
        200..=299 => match parse(body) {
            Ok(v) => Answer::Ok(v),
            Err(e) => Answer::Retry(format!("unreadable answer: {e}")),
        },
        429 | 500..=599 => Answer::Retry(format!("HTTP {status}: {snippet}")),
        _ => Answer::Rejected(format!("HTTP {status}: {snippet}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callback_tokens_are_per_order_endpoint_expiry_and_secret() {
        use CallbackEndpoint::{Prompt, Tune};
        let t = callback_token("s", Prompt, "o1", 1000);
        assert!(verify_callback_token("s", Prompt, "o1", 1000, &t, 999));
        assert!(verify_callback_token("s", Prompt, "o1", 1000, &t, 1000));
        assert!(!verify_callback_token("s", Prompt, "o1", 1000, &t, 1001), "expired");
        assert!(!verify_callback_token("s", Prompt, "o1", 5000, &t, 999), "expiry moved");
        assert!(!verify_callback_token("s", Tune, "o1", 1000, &t, 999), "the other endpoint");
        assert!(!verify_callback_token("s", Prompt, "o2", 1000, &t, 999), "another order's token");
        assert!(!verify_callback_token("other", Prompt, "o1", 1000, &t, 999));
        assert!(
            !verify_callback_token("", Prompt, "o1", 1000, &callback_token("", Prompt, "o1", 1000), 999),
            "empty secret"
        );
        assert!(!verify_callback_token("s", Prompt, "o1", 1000, "zz", 999));
        let url = callback_url("https://bot.example/", Prompt, "s", "o 1", 1000);
        assert_eq!(
            url,
            format!(
                "https://bot.example/update-images?order=o+1&exp=1000&token={}",
                callback_token("s", Prompt, "o 1", 1000)
            )
        );
        assert_eq!(CallbackEndpoint::from_path(Tune.path()), Some(Tune));
    }

    #[test]
    fn only_https_links_on_astrias_hosts_are_trusted() {
        let hosts = vec!["mp.astria.ai".to_string()];
        assert!(trusted_image_url("https://mp.astria.ai/1/2/0.jpg", &hosts));
        assert!(trusted_image_url("https://MP.astria.ai/x.png", &hosts));
        for bad in [
            "http://mp.astria.ai/x.jpg",
            "https://evil.example/x.jpg",
            "https://mp.astria.ai.evil.example/x.jpg",
            "https://mp.astria.ai@evil.example/x.jpg",
            "https://mp.astria.ai:8443/x.jpg",
            "https://mp.astria.ai",
            "javascript:alert(1)",
            "",
        ] {
            assert!(!trusted_image_url(bad, &hosts), "{bad}");
        }
        assert!(!trusted_image_url("https://mp.astria.ai/x.jpg", &[]), "no hosts, no trust");
    }

    #[test]
    fn tunes_and_prompts_are_read_bare_or_wrapped() {
        let bare = br#"{"id":7,"title":"o1","name":"man","trained_at":"2026-11-25T10:00:00Z","steps":null}"#;
        let wrapped = br#"{"tune":{"id":7,"title":"o1","trained_at":"2026-11-25T10:00:00Z"}}"#;
        assert_eq!(parse_tune(bare).unwrap(), parse_tune(wrapped).unwrap());
        let p = parse_prompt(
            br#"{"prompt":{"id":3,"tune_id":7,"images":["https://mp.astria.ai/a.jpg"],"trained_at":"x"}}"#,
        )
        .unwrap();
        assert_eq!((p.id, p.images.len(), p.is_done()), (3, 1, true));
        assert!(!parse_prompt(br#"{"id":4,"images":[]}"#).unwrap().is_done());
        for bad in [&b"nope"[..], br#"{"prompt":{"images":[]}}"#, br#"{"id":3,"images":["javascript:x"]}"#] {
            assert!(parse_prompt(bad).is_err());
        }
        assert_eq!(parse_prompts(br#"[{"id":1,"images":[]},{"id":2,"images":["https://x/1.jpg"]}]"#).unwrap().len(), 2);
    }

    #[test]
    fn the_multipart_body_carries_fields_and_files() {
        let r = TuneRequest {
            order_id: "o1",
            subject_class: "woman",
            tune_callback: "https://b/t",
            prompt_callback: "https://b/p",
            fast: true,
        };
        let fields = tune_fields(&r);
        assert!(fields.contains(&("tune[branch]", "fast")));
        let body = multipart(
            "XyZ",
            &fields,
            &[FilePart {
                field: "tune[images][]",
                filename: "0.jpg",
                content_type: "image/jpeg",
                bytes: b"\xff\xd8jpeg",
            }],
        );
        let text = String::from_utf8_lossy(&body);
        assert!(text.starts_with("--XyZ\r\nContent-Disposition: form-data; name=\"tune[title]\"\r\n\r\no1\r\n"));
        assert!(text.contains("name=\"tune[images][]\"; filename=\"0.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n"));
        assert!(text.ends_with("--XyZ--\r\n"));
        let slow = TuneRequest { fast: false, ..r };
        let plain = tune_fields(&slow);
        assert!(!plain.iter().any(|(k, _)| *k == "tune[branch]"));
    }

    #[test]
    fn answers_are_classified() {
        let ok = classify(201, br#"{"id":9}"#, parse_tune);
        assert_eq!(ok, Answer::Ok(Tune { id: 9, title: None, trained_at: None }));
        assert!(matches!(classify(504, b"", parse_tune), Answer::Retry(_)));
        assert!(matches!(classify(429, b"", parse_tune), Answer::Retry(_)));
        for status in [401, 402, 422] {
            assert!(
                matches!(classify(status, br#"{"images":["too small"]}"#, parse_tune), Answer::Rejected(_)),
                "{status}"
            );
        }
    }
}
