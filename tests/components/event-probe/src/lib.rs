//! Test-only HTTP side of the event pipeline (tests/tests/events.rs): emits events through the
//! real outbox, runs the real relay, and reports what the consumer did.

use astria_store::outbox::RelayPolicy;
use astria_store::{migrations, transaction, Db, DbError};
use spin_kit::db::SpinDb;
use spin_kit::events;
use spin_kit::request::read_body;
use spin_sdk::http::{IncomingRequest, IntoResponse, Response};
use spin_sdk::{http_component, variables};

fn var(name: &str) -> anyhow::Result<String> {
    Ok(variables::get(name)?)
}

pub fn policy() -> anyhow::Result<RelayPolicy> {
    Ok(RelayPolicy {
        grace_ms: var("relay_grace_ms")?.parse()?,
        base_backoff_ms: var("relay_backoff_ms")?.parse()?,
        max_backoff_ms: var("relay_backoff_ms")?.parse()?,
        max_attempts: var("relay_max_attempts")?.parse()?,
    })
}

fn json(status: u16, v: serde_json::Value) -> Response {
    Response::builder().status(status).header("content-type", "application/json").body(v.to_string()).build()
}

fn header(req: &IncomingRequest, name: &str) -> String {
    req.headers()
        .get(&name.to_string())
        .into_iter()
        .next()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default()
}

#[http_component]
async fn handle(req: IncomingRequest) -> anyhow::Result<impl IntoResponse> {
    let path = header(&req, "spin-path-info");
    if path == "/limited" {
        // The shared size-limited reader: 1 KiB here, so tests can exceed it cheaply.
        return Ok(match read_body(req, 1024).await {
            Ok(body) => json(200, serde_json::json!({ "bytes": body.len() })),
            Err(e) => e.into_response("limited"),
        });
    }
    let path_with_query = req.path_with_query().unwrap_or_default();
    // Only /claim-bench reads a body: the outbox ids to claim.
    let body = if path == "/claim-bench" {
        match read_body(req, 1 << 20).await {
            Ok(body) => body,
            Err(e) => return Ok(e.into_response("claim-bench")),
        }
    } else {
        Vec::new()
    };
    let db = SpinDb::open(&var("database_url")?).map_err(|e| anyhow::anyhow!("{e}"))?;
    migrations::ensure_migrated(&db, events::now_ms()).map_err(|e| anyhow::anyhow!("{e}"))?;
    db.execute("CREATE TABLE IF NOT EXISTS probe_effects (event_id TEXT NOT NULL, acted_at BIGINT NOT NULL)", &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let query = path_with_query.split_once('?').map(|(_, q)| q).unwrap_or("");
    let q: std::collections::HashMap<String, String> =
        query.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
    let channel = var("channel")?;
    let redis_url = var("redis_url")?;
    Ok(match path.as_str() {
        "/emit" => {
            let n: usize = q.get("n").and_then(|n| n.parse().ok()).unwrap_or(1);
            let kind = q.get("kind").cloned().unwrap_or_else(|| "ok".into());
            let policy = policy()?;
            let mut pending = Vec::new();
            let started = std::time::Instant::now();
            for i in 0..n {
                let event = events::envelope(&format!("probe.{kind}"), &serde_json::json!({ "i": i }), "test");
                // The state change and its event commit together.
                let p = transaction(&db, |db| events::emit(db, &channel, &event, &policy))
                    .map_err(|e| anyhow::anyhow!("{e}"))?;
                pending.push(p);
            }
            let inserted = started.elapsed();
            let published = events::publish(&db, &redis_url, &pending);
            let ids: Vec<&str> = pending.iter().map(|p| p.id.as_str()).collect();
            json(
                200,
                serde_json::json!({
                    "ids": ids, "published": published,
                    "insert_us": inserted.as_micros() as u64,
                    "publish_us": (started.elapsed() - inserted).as_micros() as u64,
                }),
            )
        }
        "/claim-bench" => {
            // Claim + complete real outbox events (the ids /emit answered), each in its own
            // transaction, as a consumer does (minus its effect); answers how many it claimed.
            let ids: Vec<String> = match serde_json::from_slice(&body) {
                Ok(ids) => ids,
                Err(e) => return Ok(json(400, serde_json::json!({ "error": format!("a JSON list of ids: {e}") }))),
            };
            let started = std::time::Instant::now();
            let mut claimed = 0u64;
            for id in &ids {
                let fresh = transaction(&db, |db| {
                    let fresh = astria_store::outbox::claim(db, id, "bench", events::now_ms())?;
                    astria_store::outbox::complete(db, id, events::now_ms())?;
                    Ok::<_, DbError>(fresh)
                })
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                claimed += u64::from(fresh);
            }
            let elapsed = started.elapsed().as_micros() as u64;
            json(200, serde_json::json!({ "claim_us": elapsed, "claimed": claimed }))
        }
        "/relay" => {
            let report = events::relay(&db, &redis_url, &policy()?, 500).map_err(|e| anyhow::anyhow!("{e}"))?;
            json(200, serde_json::to_value(report)?)
        }
        "/stats" => {
            // One statement, so every count comes from the same snapshot while consumers commit.
            let sql = "SELECT (SELECT COUNT(*) FROM probe_effects), (SELECT COUNT(DISTINCT event_id) FROM probe_effects),
                (SELECT COUNT(*) FROM outbox WHERE status = 'pending'), (SELECT COUNT(*) FROM outbox WHERE status = 'published'),
                (SELECT COUNT(*) FROM outbox WHERE status = 'done'), (SELECT COUNT(*) FROM outbox WHERE status = 'dead')";
            let e = |e: DbError| anyhow::anyhow!("{e}");
            let rows = db.query(sql, &[]).map_err(e)?;
            let c = |i| rows[0].int(i).map_err(e);
            json(
                200,
                serde_json::json!({
                    "effects": c(0)?, "distinct_effects": c(1)?,
                    "outbox": { "pending": c(2)?, "published": c(3)?, "done": c(4)?, "dead": c(5)? },
                }),
            )
        }
        _ => json(404, serde_json::json!({ "error": "not found" })),
    })
}
