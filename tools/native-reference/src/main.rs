//! The native reference of the webhook benchmark: `POST /SmsReceived` served by a plain native
//! Rust HTTP server (hyper) doing the same work per request as message-service under Spin,
//! through the same code: the signature check and parsing of `astria_domain::whatsapp`, the
//! configuration read per request, then message-service's own `webhook::store` (the inbox
//! insert, one statement, and the wake-up's claim when no worker is coming) and the wake-up
//! published on Redis. What it does not
//! do is what a native server need not: instantiate a component per request, and open a new
//! database connection per request (it keeps them, as any native server would). The
//! difference in throughput is the cost of Wasm and Spin that `docs/performance.md` reports.
//!
//! message-service is a wasm component (a `cdylib` whose Spin exports a native link refuses),
//! so its `webhook` module is compiled in here from its own source file, unchanged: the same
//! code, not a copy. Its Spin-facing parts (`receive`, `verify`) are never called natively.
//!
//! On SQLite the file at PATH is an inbox database, as the `inbox` label's under Spin (the
//! inbox's schema alone, `astria_store::migrations::migrate_inbox`).
//!
//! Usage: `native-reference --listen 127.0.0.1:PORT --database-url (sqlite:PATH|postgres://...)
//! --redis-url redis://... [--fresh-connections] [--var name=value]...`; variables not given take
//! spin.toml's defaults.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use astria_domain::config::{self, ExposeSecret, Source};
use astria_domain::events::{channels, INBOX_WAKE};
use astria_domain::whatsapp;
use astria_store::native::{Pg, Sqlite};
use astria_store::{Db, DbError, Dialect, Row, Value};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response};
use spin_kit::error::ApiError;
use spin_kit::events::now_ms;

#[allow(dead_code)] // receive and verify are message-service's Spin edge, unused here.
#[path = "../../../components/message-service/src/webhook.rs"]
mod webhook;

/// Meta's webhook bodies reach 3 MB, as in message-service.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// spin.toml's variable defaults, overridden by `--var`.
struct Vars(HashMap<String, String>);

impl Source for Vars {
    fn get(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }
}

/// One database connection of either kind.
enum NativeDb {
    Sqlite(Sqlite),
    Pg(Pg),
}

impl Db for NativeDb {
    fn dialect(&self) -> Dialect {
        match self {
            NativeDb::Sqlite(d) => d.dialect(),
            NativeDb::Pg(d) => d.dialect(),
        }
    }
    fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, DbError> {
        match self {
            NativeDb::Sqlite(d) => d.execute(sql, params),
            NativeDb::Pg(d) => d.execute(sql, params),
        }
    }
    fn query(&self, sql: &str, params: &[Value]) -> Result<Vec<Row>, DbError> {
        match self {
            NativeDb::Sqlite(d) => d.query(sql, params),
            NativeDb::Pg(d) => d.query(sql, params),
        }
    }
}

/// What one request needs beyond its body: a database connection and a Redis connection, kept
/// between requests.
struct Worker {
    db: NativeDb,
    redis: redis::Connection,
}

struct Server {
    vars: Vars,
    database_url: String,
    redis: redis::Client,
    idle: Mutex<Vec<Worker>>,
    /// `--fresh-connections`: open the database and Redis per request, as Spin's hosts do, to
    /// measure what that costs apart from Wasm.
    fresh: bool,
}

impl Server {
    fn worker(&self) -> Result<Worker, ApiError> {
        if let Some(w) = self.idle.lock().unwrap().pop() {
            return Ok(w);
        }
        let db = if self.database_url.starts_with("postgres") {
            NativeDb::Pg(Pg::connect(&self.database_url)?)
        } else {
            let path = self.database_url.strip_prefix("sqlite:").unwrap_or(&self.database_url);
            NativeDb::Sqlite(Sqlite::open(std::path::Path::new(path))?)
        };
        let redis = self
            .redis
            .get_connection()
            .map_err(|e| ApiError::Unavailable { dependency: "redis", detail: e.to_string() })?;
        Ok(Worker { db, redis })
    }

    /// message-service's `receive`, natively: the same checks, the same inbox statement
    /// (`webhook::store`), and the wake-up published on the kept Redis connection.
    fn receive(&self, body: &[u8], signature: Option<&str>, request_id: &str) -> Result<String, ApiError> {
        let app_secret = config::whatsapp_app_secret(&self.vars)?;
        whatsapp::verify_signature(app_secret.expose_secret(), body, signature).map_err(|_| ApiError::Unauthorized)?;
        let hook = webhook::parse(body, &config::phone_number_id(&self.vars))?;
        let mut accepted =
            webhook::Accepted { messages: hook.messages.len(), statuses: hook.statuses.len(), queued: false };
        if hook.messages.is_empty() && hook.statuses.is_empty() && hook.preferences.is_empty() {
            return Ok(serde_json::to_string(&accepted).unwrap());
        }
        let mut w = self.worker()?;
        let stored = webhook::store(&w.db, body, request_id, || {
            astria_store::migrations::migrate_inbox(&w.db, now_ms()).map(drop).map_err(ApiError::from)
        })?;
        accepted.queued = stored.queued;
        if stored.wake {
            let event = spin_kit::events::envelope(INBOX_WAKE, &serde_json::json!({}), request_id);
            let json = serde_json::to_string(&event).unwrap();
            // Best effort, as in message-service: the row is the durable part.
            if redis::cmd("PUBLISH").arg(channels::INBOX).arg(json).query::<i64>(&mut w.redis).is_err() {
                let _ = astria_store::inbox::unclaim_wake(&w.db, request_id);
            }
        }
        if !self.fresh {
            self.idle.lock().unwrap().push(w);
        }
        Ok(serde_json::to_string(&accepted).unwrap())
    }
}

fn respond(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

async fn serve(server: Arc<Server>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/health") => Ok(respond(200, "{}".into())),
        (Method::POST, "/SmsReceived") => {
            let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
            let signature = header("x-hub-signature-256");
            let request_id = header("x-request-id").unwrap_or_else(|| format!("native-{}", now_ms()));
            if header("content-length").and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| l > MAX_BODY) {
                return Ok(respond(413, r#"{"error":"request body too large"}"#.into()));
            }
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return Ok(respond(400, r#"{"error":"could not read the body"}"#.into())),
            };
            if body.len() > MAX_BODY {
                return Ok(respond(413, r#"{"error":"request body too large"}"#.into()));
            }
            // The database work blocks, as it does in a Spin instance: off the async workers.
            let result =
                tokio::task::spawn_blocking(move || server.receive(&body, signature.as_deref(), &request_id)).await;
            Ok(match result {
                Ok(Ok(report)) => respond(200, report),
                Ok(Err(e)) => {
                    let status = e.status();
                    respond(status, serde_json::json!({ "error": e.to_string() }).to_string())
                }
                Err(e) => respond(500, serde_json::json!({ "error": e.to_string() }).to_string()),
            })
        }
        // As message-service answers a method it does not serve: before any work.
        (_, "/SmsReceived") => Ok(respond(400, r#"{"error":"use GET or POST"}"#.into())),
        _ => Ok(respond(404, r#"{"error":"not found"}"#.into())),
    }
}

/// spin.toml's `[variables]` defaults.
fn manifest_defaults(manifest: &str) -> anyhow::Result<HashMap<String, String>> {
    let doc: toml::Table = toml::from_str(manifest).context("parsing spin.toml")?;
    let mut out = HashMap::new();
    if let Some(vars) = doc.get("variables").and_then(|v| v.as_table()) {
        for (name, spec) in vars {
            if let Some(d) = spec.get("default").and_then(|d| d.as_str()) {
                out.insert(name.clone(), d.to_string());
            }
        }
    }
    Ok(out)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (mut listen, mut database_url, mut redis_url, mut fresh) = (None, None, None, false);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut vars = manifest_defaults(&std::fs::read_to_string(root.join("spin.toml")).context("reading spin.toml")?)?;
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(value()?),
            "--database-url" => database_url = Some(value()?),
            "--redis-url" => redis_url = Some(value()?),
            "--fresh-connections" => fresh = true,
            "--var" => {
                let v = value()?;
                let (k, v) = v.split_once('=').context("--var takes name=value")?;
                vars.insert(k.to_string(), v.to_string());
            }
            other => bail!("unknown argument {other}"),
        }
    }
    let listen = listen.context("--listen is required")?;
    let server = Arc::new(Server {
        vars: Vars(vars),
        database_url: database_url.context("--database-url is required")?,
        redis: redis::Client::open(redis_url.context("--redis-url is required")?.as_str())?,
        idle: Mutex::new(Vec::new()),
        fresh,
    });
    let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("binding {listen}"))?;
    eprintln!("native reference listening on http://{listen}");
    loop {
        let (stream, _) = listener.accept().await?;
        let server = server.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| serve(server.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
