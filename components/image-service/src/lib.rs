//! image-service: Astria training and its callbacks (`/pack-tune-received`, `/update-images`) (HTTP component).
//!
//! For now it answers its health route; its real routes land with the image-service issue.

use astria_models::HealthReport;
use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_component;

const SERVICE: &str = "image";

#[http_component]
fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    Ok(match req.path() {
        "/health/image" => {
            spin_kit::health_response(&HealthReport::from_checks(SERVICE, env!("CARGO_PKG_VERSION"), vec![]))
        }
        _ => spin_kit::error_response(404, "not found"),
    })
}
