//! payment-service: Stripe Checkout links and the payment webhook (`/payment-received`) (HTTP component).
//!
//! For now it answers its health route; its real routes land with the payment-service issue.

use astria_models::HealthReport;
use spin_sdk::http::{IntoResponse, Request};
use spin_sdk::http_component;

const SERVICE: &str = "payment";

#[http_component]
fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    Ok(match req.path() {
        "/health/payment" => {
            spin_kit::health_response(&HealthReport::from_checks(SERVICE, env!("CARGO_PKG_VERSION"), vec![]))
        }
        _ => spin_kit::error_response(404, "not found"),
    })
}
