//! Test-only HTTP component: each route exercises one host feature and reports what happened,
//! so devhost's tests observe real guest behaviour (see tests/tests/devhost.rs).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use spin_sdk::http::{IntoResponse, Method, Request, Response};
use spin_sdk::http_component;

/// A global: if instances were reused, it would count past 1.
static CALLS: AtomicU64 = AtomicU64::new(0);

fn respond(status: u16, body: impl Into<Vec<u8>>) -> Response {
    Response::builder().status(status).body(body.into()).build()
}

fn query(req: &Request) -> BTreeMap<String, String> {
    req.query()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[http_component]
async fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    // An exact route has no path info: it reports its headers, to show how it was routed.
    let info = match req.header("spin-path-info").and_then(|h| h.as_str()).unwrap_or("") {
        "" => "/headers".to_string(),
        other => other.to_string(),
    };
    let q = query(&req);
    let response = match info.as_str() {
        "/headers" => {
            let spin: BTreeMap<String, String> = req
                .headers()
                .filter(|(k, _)| k.starts_with("spin-"))
                .map(|(k, v)| (k.to_string(), v.as_str().unwrap_or("").to_string()))
                .collect();
            respond(200, serde_json::to_vec(&spin)?)
        }
        "/var" => match spin_sdk::variables::get(q.get("name").map(String::as_str).unwrap_or("")) {
            Ok(v) => {
                if q.contains_key("print") {
                    // A careless component logging a secret: the host must redact it.
                    println!("variable value is {v}");
                }
                respond(200, v)
            }
            Err(e) => respond(404, format!("{e:?}")),
        },
        "/env" => match std::env::var(q.get("name").map(String::as_str).unwrap_or("")) {
            Ok(v) => respond(200, v),
            Err(_) => respond(404, "unset"),
        },
        "/fetch" => {
            let url = q.get("url").cloned().unwrap_or_default();
            let outbound = Request::builder().method(Method::Get).uri(url).build();
            match spin_sdk::http::send::<_, Response>(outbound).await {
                Ok(resp) => respond(200, format!("{} {}", resp.status(), String::from_utf8_lossy(resp.body()))),
                Err(e) => respond(502, format!("send failed: {e}")),
            }
        }
        // spin-kit's HTTP client (what every component calls WhatsApp, Astria and Stripe
        // with): `timeout_ms` is its per-phase timeouts and its overall deadline; `body` bytes
        // are POSTed. Answers the outcome.
        "/deadline-fetch" => {
            let url = q.get("url").cloned().unwrap_or_default();
            let timeout_ms = q.get("timeout_ms").and_then(|t| t.parse().ok()).unwrap_or(1000);
            let body = vec![b'x'; q.get("body").and_then(|b| b.parse().ok()).unwrap_or(0)];
            let request = spin_kit::http_client::Request {
                method: if body.is_empty() { "GET" } else { "POST" },
                url: &url,
                headers: &[],
                body: &body,
                timeout: std::time::Duration::from_millis(timeout_ms),
                max_response: 64 * 1024 * 1024,
            };
            match spin_kit::http_client::send_untraced(&request) {
                Ok(r) => respond(200, format!("{} {} bytes", r.status, r.body.len())),
                Err(e) => respond(504, e.to_string()),
            }
        }
        "/sleep" => {
            let ms = q.get("ms").and_then(|m| m.parse().ok()).unwrap_or(100);
            std::thread::sleep(std::time::Duration::from_millis(ms));
            respond(200, "slept")
        }
        "/global" => respond(200, (CALLS.fetch_add(1, Ordering::SeqCst) + 1).to_string()),
        "/trap" => panic!("probe asked to trap"),
        "/kv" => {
            let store = spin_sdk::key_value::Store::open_default()?;
            let key = q.get("key").cloned().unwrap_or_default();
            if req.method() == &Method::Post {
                store.set(&key, req.body())?;
                respond(204, "")
            } else {
                match store.get(&key)? {
                    Some(v) => respond(200, v),
                    None => respond(404, "no such key"),
                }
            }
        }
        "/kv-denied" => match spin_sdk::key_value::Store::open("secret-store") {
            Ok(_) => respond(200, "opened"),
            Err(e) => respond(403, format!("{e:?}")),
        },
        "/sqlite" => {
            use spin_sdk::sqlite::{Connection, Value};
            let conn = Connection::open_default()?;
            conn.execute("CREATE TABLE IF NOT EXISTS visits (note TEXT NOT NULL)", &[])?;
            conn.execute(
                "INSERT INTO visits (note) VALUES (?)",
                &[Value::Text(q.get("note").cloned().unwrap_or_default())],
            )?;
            let result = conn.execute("SELECT note FROM visits ORDER BY rowid", &[])?;
            let notes: Vec<String> = result.rows().map(|r| r.get::<&str>("note").unwrap_or("").to_string()).collect();
            respond(200, serde_json::to_vec(&notes)?)
        }
        "/pg" => {
            use spin_sdk::pg4::{Connection, ParameterValue};
            let conn = match Connection::open(q.get("url").map(String::as_str).unwrap_or("")) {
                Ok(c) => c,
                Err(e) => return Ok(respond(502, format!("open failed: {e:?}"))),
            };
            let table = q.get("table").cloned().unwrap_or_else(|| "probe".into());
            conn.execute(
                &format!("CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT, ok BOOLEAN, data BYTEA, n INT)"),
                &[],
            )?;
            conn.execute(
                &format!("INSERT INTO {table} VALUES ($1, $2, $3, $4, $5)"),
                &[
                    ParameterValue::Int64(42),
                    ParameterValue::Str("zoë 📸".into()),
                    ParameterValue::Boolean(true),
                    ParameterValue::Binary(vec![0, 1, 2, 255]),
                    ParameterValue::DbNull,
                ],
            )?;
            let rows = conn.query(
                &format!("SELECT id, name, ok, data, n FROM {table} WHERE id = $1"),
                &[ParameterValue::Int64(42)],
            )?;
            let row = rows.rows().next().ok_or_else(|| anyhow::anyhow!("no row"))?;
            let out = serde_json::json!({
                "id": row.get::<i64>("id"),
                "name": row.get::<String>("name"),
                "ok": row.get::<bool>("ok"),
                "data": row.get::<Vec<u8>>("data"),
                "n_is_null": row.get::<i32>("n").is_none(),
            });
            respond(200, serde_json::to_vec(&out)?)
        }
        "/pg-backend" => {
            // Which server process serves this instance's connection: the same one across
            // requests when the host keeps connections (Spin pools them per address).
            use spin_sdk::pg4::Connection;
            let conn = match Connection::open(q.get("url").map(String::as_str).unwrap_or("")) {
                Ok(c) => c,
                Err(e) => return Ok(respond(502, format!("open failed: {e:?}"))),
            };
            let rows = conn.query("SELECT pg_backend_pid() AS pid", &[])?;
            let pid = rows.rows().next().and_then(|r| r.get::<i32>("pid")).ok_or_else(|| anyhow::anyhow!("no pid"))?;
            respond(200, pid.to_string())
        }
        "/publish" => {
            let conn = match spin_sdk::redis::Connection::open(q.get("address").map(String::as_str).unwrap_or("")) {
                Ok(c) => c,
                Err(e) => return Ok(respond(502, format!("open failed: {e:?}"))),
            };
            match conn.publish(q.get("channel").map(String::as_str).unwrap_or(""), &req.body().to_vec()) {
                Ok(()) => respond(204, ""),
                Err(e) => respond(502, format!("publish failed: {e:?}")),
            }
        }
        _ => respond(404, format!("no probe at '{info}'")),
    };
    Ok(response)
}
