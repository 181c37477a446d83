//! maintenance-service: weekly cleanup and the outbox relay (`/maintenance/run`, `/maintenance/relay`) (HTTP component).
//!
//! For now it answers its health route; its real routes land with the maintenance-service issue.

use astria_models::HealthReport;
use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_component;

const SERVICE: &str = "maintenance";

#[http_component]
fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    Ok(match req.path() {
        "/health/maintenance" => {
            spin_kit::health_response(&HealthReport::from_checks(SERVICE, env!("CARGO_PKG_VERSION"), vec![]))
        }
        _ => spin_kit::error_response(404, "not found"),
    })
}
