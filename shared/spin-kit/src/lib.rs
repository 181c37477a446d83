//! Helpers shared by the component adapters under `components/`.
//!
//! This is the only shared crate that knows spin-sdk: it turns domain answers into Spin HTTP
//! responses. Domain logic does not belong here.

pub mod astria;
pub mod db;
pub mod error;
pub mod events;
pub mod heartbeat;
pub mod http_client;
pub mod images;
pub mod inbound;
pub mod inbox;
pub mod log;
pub mod messages;
pub mod refunds;
pub mod request;
pub mod respond;
pub mod trace;
pub mod whatsapp_media;

use astria_models::HealthReport;
use spin_sdk::http::Response;

/// The request's id for logs and error bodies, from its `x-request-id` header: the caller's
/// if it sent a reasonable one, else a fresh UUID ([`request::Route`] reads it).
pub fn request_id_from(header: Option<&str>) -> String {
    header
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

/// Spin variables as the domain's configuration source.
pub struct SpinVars;

impl astria_domain::config::Source for SpinVars {
    fn get(&self, name: &str) -> Option<String> {
        spin_sdk::variables::get(name).ok()
    }
}

/// Opens the database `database_url` names, without the migration check: for a hot path whose
/// first statement fails on a missing table anyway (then it calls [`open_db`] and tries again).
pub fn open_db_unchecked() -> Result<db::SpinDb, error::ApiError> {
    use astria_domain::config::ExposeSecret;
    Ok(db::SpinDb::open_plain(astria_domain::config::database_url(&SpinVars)?.expose_secret())?)
}

/// Opens the database `database_url` names, migrated to the current schema.
pub fn open_db() -> Result<db::SpinDb, error::ApiError> {
    use astria_domain::config::ExposeSecret;
    let db = db::SpinDb::open(astria_domain::config::database_url(&SpinVars)?.expose_secret())?;
    astria_store::migrations::ensure_migrated(&db, events::now_ms())?;
    Ok(db)
}

pub use request::header;
pub use respond::respond;

/// Readiness checks for `GET /health/<service>`.
pub mod health {
    use astria_models::{DependencyCheck, HealthReport};
    use astria_store::Db;

    /// The readiness answer of a service: 200 when its database answers, 503 naming the
    /// failure otherwise. It depends on nothing else on purpose. Not on Redis: during a Redis
    /// outage the webhooks keep accepting into the outbox, so taking them out of the Service's
    /// endpoints would turn a degraded app into a down one. And it migrates nothing: a probe
    /// runs every few seconds on every pod and must not write.
    pub fn readiness(service: &str, version: &str) -> spin_sdk::http::Response {
        crate::health_response(&HealthReport::from_checks(service, version, vec![database()]))
    }

    /// The database answers a query. The detail names the failure, never the URL (it may
    /// carry a password).
    pub fn database() -> DependencyCheck {
        use astria_domain::config::ExposeSecret;
        let result = astria_domain::config::database_url(&crate::SpinVars)
            .map_err(|e| e.to_string())
            .and_then(|url| crate::db::SpinDb::open(url.expose_secret()).map_err(|e| e.to_string()))
            .and_then(|db| db.query("SELECT 1", &[]).map(|_| ()).map_err(|e| e.to_string()));
        DependencyCheck { name: "database".to_string(), ok: result.is_ok(), detail: result.err() }
    }
}
