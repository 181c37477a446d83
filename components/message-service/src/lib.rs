//! message-service: the WhatsApp webhook and conversation (HTTP component).
//!
//! For now it answers its health route; the WhatsApp webhook (`/SmsReceived`) lands with the
//! message-service issue.

use astria_models::HealthReport;
use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_component;

const SERVICE: &str = "message";

#[http_component]
fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    Ok(match req.path() {
        "/health/message" => {
            spin_kit::health_response(&HealthReport::from_checks(SERVICE, env!("CARGO_PKG_VERSION"), vec![]))
        }
        _ => spin_kit::error_response(404, "not found"),
    })
}
