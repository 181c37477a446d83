//! message-service: the WhatsApp Cloud API webhook (`GET`/`POST /SmsReceived`) and the
//! readiness check (`GET /health/message`). HTTP component; a thin adapter: the domain parses
//! and decides (`astria_domain::whatsapp`, `::conversation`), the store keeps state, and every
//! reply is queued for the message sender (`components/message-sender`) in the same
//! transaction, so the webhook answers without waiting for WhatsApp's API.

mod webhook;

use spin_kit::error::ApiError;
use spin_kit::request::{read_body, Route};
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

const SERVICE: &str = "message";
/// Meta's webhook bodies reach 3 MB; anything larger is not from Meta.
const MAX_BODY: usize = 3 * 1024 * 1024;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    let Route { request_id, method, path, query } = Route::of(&req);
    // Every request's log lines carry a trace id; only the webhook's spans are exported (health
    // probes come every few seconds, and an unknown path must not name a span).
    let trace = spin_kit::trace::Invocation::incoming("message-service", &req, &path).exported(path == "/SmsReceived");
    let result = match (method, path.as_str()) {
        (Method::Get, "/health/message") => Ok(spin_kit::health::readiness(SERVICE, env!("CARGO_PKG_VERSION"))),
        (Method::Get, "/SmsReceived") => webhook::verify(&query),
        (Method::Post, "/SmsReceived") => {
            let signature = spin_kit::header(&req, "x-hub-signature-256");
            match read_body(req, MAX_BODY).await {
                Ok(body) => webhook::receive(&body, signature.as_deref(), &request_id),
                Err(e) => Err(e),
            }
        }
        (_, "/SmsReceived") => Err(ApiError::BadRequest("use GET or POST".into())),
        _ => Err(ApiError::NotFound),
    };
    let response = result.unwrap_or_else(|e| e.into_response(&request_id));
    trace.answered(response)
}
