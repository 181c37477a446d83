//! message-service: the WhatsApp Cloud API webhook (`GET`/`POST /SmsReceived`) and the
//! readiness check (`GET /health/message`). HTTP component; a thin adapter: the domain checks
//! and parses (`astria_domain::whatsapp`), and the signed body goes to the inbox for the
//! conversation worker (`components/conversation-worker`), so the webhook answers without
//! waiting for the conversation step, let alone WhatsApp's API.

mod webhook;

use spin_kit::error::ApiError;
use spin_kit::request::{read_body, Route};
use spin_sdk::http::{IncomingRequest, Method, Response, ResponseOutparam};
use spin_sdk::http_component;

const SERVICE: &str = "message";
/// Meta's webhook bodies reach 3 MB; anything larger is not from Meta.
const MAX_BODY: usize = 3 * 1024 * 1024;

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    // The body is written before the head is handed over (`spin_kit::respond` says why).
    spin_kit::respond(out, answer(req).await);
}

async fn answer(req: IncomingRequest) -> Response {
    let Route { request_id, method, path, query } = Route::of(&req);
    // Every request's log lines carry a trace id; only the webhook's spans are exported (health
    // probes come every few seconds, and an unknown path must not name a span).
    let trace = spin_kit::trace::Invocation::incoming("message-service", &req, &path).exported(path == "/SmsReceived");
    let result = match (method, path.as_str()) {
        (Method::Get, "/health/message") => Ok(spin_kit::health::readiness(SERVICE, env!("CARGO_PKG_VERSION"))),
        (Method::Get, "/SmsReceived") => webhook::verify(&query),
        (Method::Post, "/SmsReceived") => {
            let signature = spin_kit::header(&req, "x-hub-signature-256");
            // Nothing unsigned is read: a missing or malformed signature is refused before the
            // body, any variable or the database (so 401 comes before 413 for such a body).
            if astria_domain::whatsapp::signature_bytes(signature.as_deref()).is_none() {
                Err(ApiError::Unauthorized)
            } else {
                match read_body(req, MAX_BODY).await {
                    Ok(body) => webhook::receive(&body, signature.as_deref(), &request_id),
                    Err(e) => Err(e),
                }
            }
        }
        (_, "/SmsReceived") => Err(ApiError::BadRequest("use GET or POST".into())),
        _ => Err(ApiError::NotFound),
    };
    // A refusal (a 4xx: unsigned, forged, a wrong method or verify token) exports no span:
    // anyone can send those, and an export is a variable read and a request to the collector
    // per request. So refusals cost what an empty instance costs (issue 29's G4).
    if matches!(&result, Err(e) if e.status() < 500) {
        trace.set_exported(false);
    }
    let response = result.unwrap_or_else(|e| e.into_response(&request_id));
    trace.answered(response)
}
