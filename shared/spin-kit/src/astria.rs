//! Astria's API as the trainer uses it: create a pack tune with the customer's photos, read a
//! tune, list its prompts. The client owns the base URL, the API key and the deadlines; what
//! an answer means is the domain's (`astria_domain::astria::classify`).

use std::time::Duration;

use astria_domain::astria::{self, Answer, FilePart, Multipart, Prompt, Tune, TuneRequest};
use astria_domain::config::{Astria, ExposeSecret};

use crate::http_client::{self, HttpError};

/// Uploading photos can take a while; Astria itself gives up after 30 s (504).
const CREATE_TIMEOUT: Duration = Duration::from_secs(60);
const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// A prompt list of a large pack (up to 120 prompts with their image links).
const MAX_READ: usize = 4 * 1024 * 1024;

pub struct AstriaClient<'a> {
    cfg: &'a Astria,
}

/// A tune's creation request being written: its form fields, then each photo as it is
/// downloaded (so that only one photo at a time is held apart from the body).
pub struct TuneUpload {
    boundary: String,
    body: Multipart,
}

impl TuneUpload {
    pub fn photo(&mut self, filename: &str, content_type: &str, bytes: &[u8]) {
        self.body.file(&FilePart { field: "tune[images][]", filename, content_type, bytes });
    }
}

impl<'a> AstriaClient<'a> {
    pub fn new(cfg: &'a Astria) -> AstriaClient<'a> {
        AstriaClient { cfg }
    }

    /// Starts the multipart body of `POST /p/{pack}/tunes` with the request's fields.
    pub fn tune_upload(&self, request: &TuneRequest<'_>) -> TuneUpload {
        let boundary = format!("astria-{}", uuid::Uuid::new_v4().simple());
        let mut body = Multipart::new(&boundary);
        for (name, value) in astria::tune_fields(request) {
            body.field(name, value);
        }
        TuneUpload { boundary, body }
    }

    /// `POST /p/{astria_pack_id}/tunes`: trains the pack for the person in the photos.
    pub fn create_tune(&self, astria_pack_id: u64, upload: TuneUpload) -> Result<Answer<Tune>, HttpError> {
        let content_type = format!("multipart/form-data; boundary={}", upload.boundary);
        let body = upload.body.finish();
        let url = format!("{}/p/{astria_pack_id}/tunes", self.cfg.api_url);
        let auth = self.auth();
        let answer = http_client::send(&http_client::Request {
            method: "POST",
            url: &url,
            headers: &[("authorization", &auth), ("content-type", &content_type)],
            body: &body,
            timeout: CREATE_TIMEOUT,
            max_response: 1024 * 1024,
        })?;
        Ok(astria::classify(answer.status, &answer.body, astria::parse_tune))
    }

    /// `GET /tunes/{id}`: whether the tune is trained.
    pub fn tune(&self, id: u64) -> Result<Answer<Tune>, HttpError> {
        self.get(&format!("/tunes/{id}"), astria::parse_tune)
    }

    /// `GET /tunes/{id}/prompts`: the pack's prompts and the images made so far.
    pub fn prompts(&self, id: u64) -> Result<Answer<Vec<Prompt>>, HttpError> {
        self.get(&format!("/tunes/{id}/prompts"), astria::parse_prompts)
    }

    fn auth(&self) -> String {
        format!("Bearer {}", self.cfg.api_key.expose_secret())
    }

    fn get<T>(
        &self,
        path: &str,
        parse: impl Fn(&[u8]) -> Result<T, astria::AstriaError>,
    ) -> Result<Answer<T>, HttpError> {
        let url = format!("{}{path}", self.cfg.api_url);
        let auth = self.auth();
        let answer = http_client::send(&http_client::Request {
            method: "GET",
            url: &url,
            headers: &[("authorization", &auth)],
            body: &[],
            timeout: READ_TIMEOUT,
            max_response: MAX_READ,
        })?;
        Ok(astria::classify(answer.status, &answer.body, parse))
    }
}
