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

/// Opens the database `database_url` names, migrated to the current schema.
pub fn open_db() -> Result<db::SpinDb, error::ApiError> {
    use astria_domain::config::ExposeSecret;
    use astria_store::migrations;
    let db = db::SpinDb::open_plain(astria_domain::config::database_url(&SpinVars)?.expose_secret())?;
    // One statement per open (a connection per request or message under Spin): the schema's
    // version and the journal mode together; the switch and the migration only when needed.
    let (version, wal) = migrations::open_state(&db, "schema_migrations");
    if !wal {
        db.use_wal();
    }
    if version < migrations::latest_version() {
        migrations::migrate(&db, events::now_ms())?;
    }
    Ok(db)
}

/// The label of SQLite's inbox database (spin.toml's `sqlite_databases`, defined in every
/// runtime config): `astria_store::inbox` says why the inbox has a file of its own.
pub const INBOX_LABEL: &str = "inbox";

/// The inbox's connection beside the app's: on SQLite its own database, on PostgreSQL the
/// app's connection itself.
pub enum InboxDb<'a> {
    Own(db::SpinDb),
    Shared(&'a db::SpinDb),
}

impl std::ops::Deref for InboxDb<'_> {
    type Target = db::SpinDb;
    fn deref(&self) -> &db::SpinDb {
        match self {
            InboxDb::Own(db) => db,
            InboxDb::Shared(db) => db,
        }
    }
}

/// Opens the inbox beside `app` ([`open_db`]'s connection), migrated. On SQLite the inbox's
/// first migration also moves in the rows an earlier release left in the app's database
/// (`astria_store::inbox::migrate_adopting`).
pub fn open_inbox(app: &db::SpinDb) -> Result<InboxDb<'_>, error::ApiError> {
    if let db::SpinDb::Postgres(_) = app {
        return Ok(InboxDb::Shared(app));
    }
    let inbox = db::SpinDb::open_plain(&format!("sqlite:{INBOX_LABEL}"))?;
    // As `open_db`: one statement per open, the switch and the migration only when needed.
    let (current, wal) = astria_store::migrations::inbox_open_state(&inbox);
    if !wal {
        inbox.use_wal();
    }
    if !current {
        astria_store::inbox::migrate_adopting(app, &inbox, events::now_ms())?;
    }
    Ok(InboxDb::Own(inbox))
}

/// The webhook's connection: the inbox alone, without the migration check (its one statement
/// fails on a missing table anyway; then [`migrate_inbox`] and try again). On SQLite the
/// `inbox` database, so a webhook never opens the app's; on PostgreSQL the app's database.
pub fn open_inbox_unchecked() -> Result<db::SpinDb, error::ApiError> {
    use astria_domain::config::ExposeSecret;
    let url = astria_domain::config::database_url(&SpinVars)?;
    let url = url.expose_secret();
    if db::is_postgres(url) {
        return Ok(db::SpinDb::open_plain(url)?);
    }
    Ok(db::SpinDb::open_plain(&format!("sqlite:{INBOX_LABEL}"))?)
}

/// Puts the inbox's schema in place for [`open_inbox_unchecked`]'s connection: the app's
/// database migrated first (on SQLite that renames the rows an earlier release left there,
/// migration 21), then on SQLite the inbox's own, in write-ahead-log mode as [`db::SpinDb::open`]
/// sets, with the earlier release's rows moved in as it is created, so they keep their place
/// in arrival order (`astria_store::inbox::migrate_adopting`).
pub fn migrate_inbox(inbox: &db::SpinDb) -> Result<(), error::ApiError> {
    let app = open_db()?;
    if let db::SpinDb::Sqlite(_) = inbox {
        inbox.use_wal();
        astria_store::inbox::migrate_adopting(&app, inbox, events::now_ms())?;
    }
    Ok(())
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
