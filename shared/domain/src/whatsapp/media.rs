//! WhatsApp's media API, as the trainer reads a customer's photo: the answer to
//! `GET /{version}/{media-id}` (where to download the bytes), and the check that the bytes are
//! the photo the customer sent. Pure: spin-kit's media client does the HTTP.

use serde::Deserialize;
use sha2::{Digest, Sha256};

/// A media lookup's answer that is not what WhatsApp sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    #[error("malformed media answer: {0}")]
    Malformed(String),
}

/// WhatsApp's answer to `GET /{version}/{media-id}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct MediaInfo {
    pub url: String,
    #[serde(default)]
    pub mime_type: Option<String>,
    #[serde(default)]
    pub sha256: Option<String>,
}

pub fn parse_media_info(raw: &[u8]) -> Result<MediaInfo, MediaError> {
    let m: MediaInfo = serde_json::from_slice(raw).map_err(|e| MediaError::Malformed(e.to_string()))?;
    if !m.url.starts_with("https://") && !m.url.starts_with("http://") {
        return Err(MediaError::Malformed("media url is not http(s)".into()));
    }
    Ok(m)
}

/// Whether downloaded bytes are the photo the customer sent (the `sha256` of the image
/// message and of the media lookup). Meta's reference calls it hex, but the webhooks observed
/// carry it base64-encoded; either is accepted, since a digest cannot match by accident in both.
pub fn sha256_matches(bytes: &[u8], expected: &str) -> bool {
    use base64::Engine;
    let digest = Sha256::digest(bytes);
    let expected = expected.trim();
    if hex::encode(digest).eq_ignore_ascii_case(expected) {
        return true;
    }
    let b64 = base64::engine::general_purpose::STANDARD_NO_PAD;
    b64.decode(expected.trim_end_matches('=')).is_ok_and(|d| d[..] == digest[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_is_checked_against_its_sha256() {
        let bytes = b"photo";
        let hex = hex::encode(Sha256::digest(bytes));
        assert!(sha256_matches(bytes, &hex.to_uppercase()));
        assert!(!sha256_matches(b"other", &hex));
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(bytes));
        assert!(sha256_matches(bytes, &b64), "base64, as the webhooks carry it");
        assert!(sha256_matches(bytes, b64.trim_end_matches('=')));
        assert!(!sha256_matches(b"other", &b64));
        assert!(parse_media_info(br#"{"url":"https://lookaside.fbsbx.com/x","mime_type":"image/jpeg","sha256":"ab","file_size":"303833","id":"1"}"#).is_ok());
        assert!(parse_media_info(br#"{"url":"file:///etc/passwd"}"#).is_err());
    }

    #[test]
    fn a_media_answer_must_name_an_http_url() {
        let ok = parse_media_info(br#"{"messaging_product":"whatsapp","url":"https://lookaside.fbsbx.com/x","mime_type":"image/jpeg","sha256":"ab","file_size":"3","id":"1"}"#);
        assert_eq!(ok.unwrap().url, "https://lookaside.fbsbx.com/x");
        assert!(parse_media_info(br#"{"url":"file:///etc/passwd"}"#).is_err());
        assert!(parse_media_info(b"not json").is_err());
    }
}
