//! Astria: the multipart fields of a pack tune create (`POST /p/{pack}/tunes`), and the tune
//! and prompt objects its API answers and its callbacks carry.

use serde_json::{json, Value};

pub const TITLE: &str = "tune[title]";
pub const NAME: &str = "tune[name]";
pub const BRANCH: &str = "tune[branch]";
pub const TUNE_CALLBACK: &str = "tune[callback]";
pub const PROMPT_CALLBACK: &str = "tune[prompt_attributes][callback]";
pub const IMAGES: &str = "tune[images][]";

/// Where Astria hosts generated images (the app's default `astria_image_hosts`).
pub const IMAGE_HOST: &str = "mp.astria.ai";

/// The URL of image `i` of prompt `prompt_id` of tune `tune_id`.
pub fn image_url(tune_id: u64, prompt_id: u64, i: usize) -> String {
    format!("https://{IMAGE_HOST}/{tune_id}/{prompt_id}/{i}.jpg")
}

/// A tune object (`GET /tunes/{id}`, the create's answer, the tune callback's body).
pub fn tune(id: u64, title: &str, name: &str, branch: Option<&str>, image_count: usize, trained: bool) -> Value {
    json!({ "id": id, "title": title, "name": name, "branch": branch,
            "trained_at": if trained { json!("2026-11-25T10:00:00.000Z") } else { Value::Null },
            "created_at": "2026-11-25T09:50:00.000Z", "orig_images": vec!["https://sdbooth.s3/x.jpg"; image_count] })
}

/// Prompt `n` (1-based) of tune `tune_id`: its id is `tune_id * 100 + n`; `images` is empty
/// until it is done.
pub fn prompt(tune_id: u64, n: u64, text: &str, images: &[String]) -> Value {
    let id = prompt_id(tune_id, n);
    json!({ "id": id, "tune_id": tune_id, "text": text,
            "trained_at": if images.is_empty() { Value::Null } else { json!("2026-11-25T10:00:00.000Z") },
            "images": images, "url": format!("https://api.astria.ai/tunes/{tune_id}/prompts/{id}.json") })
}

pub fn prompt_id(tune_id: u64, n: u64) -> u64 {
    tune_id * 100 + n
}

/// The tune id and prompt id in an image URL made by [`image_url`], and the image's index.
pub fn parse_image_url(url: &str) -> Option<(u64, u64, usize)> {
    let rest = url.strip_prefix(&format!("https://{IMAGE_HOST}/"))?;
    let mut parts = rest.split('/');
    let tune = parts.next()?.parse().ok()?;
    let prompt = parts.next()?.parse().ok()?;
    let i = parts.next()?.strip_suffix(".jpg")?.parse().ok()?;
    parts.next().is_none().then_some((tune, prompt, i))
}

#[cfg(test)]
mod tests {
    #[test]
    fn image_urls_round_trip() {
        let url = super::image_url(1001, 100102, 1);
        assert_eq!(super::parse_image_url(&url), Some((1001, 100102, 1)));
        assert_eq!(super::parse_image_url("https://evil.example/1/2/0.jpg"), None);
    }
}
