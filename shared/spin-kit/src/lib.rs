//! Helpers shared by the component adapters under `components/`.
//!
//! This is the only shared crate that knows spin-sdk: it turns domain answers into Spin HTTP
//! responses. Domain logic does not belong here.

pub mod db;
pub mod error;
pub mod events;
pub mod log;

use astria_models::HealthReport;
use spin_sdk::http::Response;

/// The request's id for logs and error bodies: the caller's `x-request-id` if it sent a
/// reasonable one, else a fresh UUID.
pub fn request_id(req: &spin_sdk::http::Request) -> String {
    req.header("x-request-id")
        .and_then(|h| h.as_str())
        .filter(|v| !v.is_empty() && v.len() <= 64 && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

/// A JSON response with the given status.
pub fn json_response<T: serde::Serialize>(status: u16, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => Response::builder().status(status).header("content-type", "application/json").body(bytes).build(),
        // Serialising our own plain structs cannot fail; if it ever does, say so generically.
        Err(_) => Response::builder()
            .status(500)
            .header("content-type", "application/json")
            .body(r#"{"error":"internal error"}"#)
            .build(),
    }
}

/// The answer of `GET /health/<service>`: 200 when every check passed, 503 otherwise.
pub fn health_response(report: &HealthReport) -> Response {
    let status = if report.checks.iter().all(|c| c.ok) { 200 } else { 503 };
    json_response(status, report)
}

/// A JSON error body `{"error": message}`; callers pass only public, secret-free text.
pub fn error_response(status: u16, message: &str) -> Response {
    json_response(status, &serde_json::json!({ "error": message }))
}
