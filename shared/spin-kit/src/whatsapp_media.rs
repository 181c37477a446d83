//! WhatsApp's media API: a customer's photo, by the media id their message carried. The
//! client owns the base URL, the access token and the deadlines; the photo is checked against
//! the sha256 WhatsApp gave with the message (`astria_domain::whatsapp::media`).

use std::time::Duration;

use astria_domain::config::{ExposeSecret, WhatsAppMedia};
use astria_domain::whatsapp::media;
use astria_models::Photo;

use crate::http_client::{self, HttpError};

const TIMEOUT: Duration = Duration::from_secs(20);
/// WhatsApp images are at most 5 MB; allow some slack, refuse anything absurd.
pub const MAX_PHOTO: usize = 16 * 1024 * 1024;

/// Why a photo could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PhotoError {
    /// The media id expired or never existed: this photo is gone for good.
    #[error("photo {0} is no longer at WhatsApp")]
    Gone(String),
    /// Larger than [`MAX_PHOTO`]: it will be on every try.
    #[error("photo {0} is larger than {MAX_PHOTO} bytes")]
    TooLarge(String),
    /// The bytes are not the photo the customer sent: WhatsApp's bytes for a media id do not
    /// change, so another download gives the same.
    #[error("photo {0} does not match its sha256")]
    Mismatch(String),
    /// Worth another try later (a timeout, a 5xx, an answer cut short).
    #[error("{0}")]
    Transient(String),
}

pub struct MediaClient<'a> {
    cfg: &'a WhatsAppMedia,
}

impl<'a> MediaClient<'a> {
    pub fn new(cfg: &'a WhatsAppMedia) -> MediaClient<'a> {
        MediaClient { cfg }
    }

    /// The photo's bytes: its download URL first, then the bytes, checked against its sha256.
    pub fn download(&self, photo: &Photo) -> Result<Vec<u8>, PhotoError> {
        let transient = |e: HttpError| PhotoError::Transient(e.to_string());
        let info = self.get(&self.cfg.lookup_url(&photo.media_id), 64 * 1024).map_err(transient)?;
        match info.status {
            200..=299 => {}
            400 | 404 => return Err(PhotoError::Gone(photo.media_id.clone())),
            s => return Err(PhotoError::Transient(format!("media lookup answered HTTP {s}"))),
        }
        let info = media::parse_media_info(&info.body).map_err(|e| PhotoError::Transient(e.to_string()))?;
        let bytes = self.get(&info.url, MAX_PHOTO).map_err(|e| match e {
            HttpError::TooLarge(_) => PhotoError::TooLarge(photo.media_id.clone()),
            e => transient(e),
        })?;
        if !(200..300).contains(&bytes.status) {
            return Err(PhotoError::Transient(format!("media download answered HTTP {}", bytes.status)));
        }
        if !media::sha256_matches(&bytes.body, &photo.sha256) {
            return Err(PhotoError::Mismatch(photo.media_id.clone()));
        }
        Ok(bytes.body)
    }

    fn get(&self, url: &str, max: usize) -> Result<http_client::HttpResponse, HttpError> {
        let auth = format!("Bearer {}", self.cfg.access_token.expose_secret());
        http_client::send(&http_client::Request {
            method: "GET",
            url,
            headers: &[("authorization", &auth)],
            body: &[],
            timeout: TIMEOUT,
            max_response: max,
        })
    }
}
