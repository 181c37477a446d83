//! message-service: the WhatsApp Cloud API webhook (`GET`/`POST /SmsReceived`) and the
//! readiness check (`GET /health/message`). HTTP component; a thin adapter: the domain parses
//! and decides (`astria_domain::whatsapp`, `::conversation`), the store keeps state, and every
//! reply is queued for the message sender (`components/message-sender`) in the same
//! transaction, so the webhook answers without waiting for WhatsApp's API.

mod webhook;

use astria_models::HealthReport;
use spin_kit::error::ApiError;
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

const SERVICE: &str = "message";
/// Meta's webhook bodies reach 3 MB; anything larger is not from Meta.
const MAX_BODY: usize = 3 * 1024 * 1024;

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    let request_id = request_id(&req);
    let path_with_query = req.path_with_query().unwrap_or_default();
    let (path, query) = path_with_query.split_once('?').unwrap_or((&path_with_query, ""));
    let result = match (req.method(), path) {
        (Method::Get, "/health/message") => Ok(health()),
        (Method::Get, "/SmsReceived") => webhook::verify(query),
        (Method::Post, "/SmsReceived") => {
            let signature = header(&req, "x-hub-signature-256");
            match spin_kit::error::read_body(req, MAX_BODY).await {
                Ok(body) => webhook::receive(&body, signature.as_deref(), &request_id),
                Err(e) => Err(e),
            }
        }
        (_, "/SmsReceived") => Err(ApiError::BadRequest("use GET or POST".into())),
        _ => Err(ApiError::NotFound),
    };
    result.unwrap_or_else(|e| e.into_response(&request_id))
}

fn header(req: &IncomingRequest, name: &str) -> Option<String> {
    req.headers().get(&name.to_string()).into_iter().next().and_then(|v| String::from_utf8(v).ok())
}

fn request_id(req: &IncomingRequest) -> String {
    spin_kit::request_id_from(header(req, "x-request-id").as_deref())
}

/// Ready when the database answers (and is migrated) and Redis answers: replies are queued in
/// the one and announced on the other.
fn health() -> Response {
    let mut checks = vec![spin_kit::health::database()];
    match spin_kit::var("redis_url") {
        Ok(url) => checks.push(spin_kit::health::redis(&url)),
        Err(_) => checks.push(astria_models::DependencyCheck {
            name: "redis".into(),
            ok: false,
            detail: Some("redis_url is not set".into()),
        }),
    }
    spin_kit::health_response(&HealthReport::from_checks(SERVICE, env!("CARGO_PKG_VERSION"), checks))
}
