//! Prints the cost of the event pipeline's database work, measured inside a real component in
//! devhost: publishing one event (outbox insert in its own transaction, then a Redis PUBLISH
//! and the row marked published) and claiming one (claim + complete in a transaction), on
//! SQLite and on PostgreSQL.
//!
//! `scripts/bench.sh` runs it (needs scripts/build.sh and the services).

use astria_tests::{spawn_app, AppConfig};

const MANIFEST: &str = include_str!("../fixtures/event-app/spin.toml");
const N: u64 = 500;

#[tokio::main]
async fn main() {
    let host = astria_tests::Host::from_env().expect("host").label();
    println!("event pipeline cost, {N} events, measured inside the component ({host}, this machine)");
    // The same app without its consumer isolates the emitter's cost; with it, the figures
    // include the contention of consumers acting on the events at the same time.
    let start = MANIFEST.find("[[trigger.redis]]").expect("fixture has a redis trigger");
    let end = start + MANIFEST[start..].find("component = \"consumer\"\n").expect("trigger names consumer") + 23;
    let without_consumer = format!("{}{}", &MANIFEST[..start], &MANIFEST[end..]);
    for (name, postgres, manifest) in [
        ("sqlite", false, without_consumer.as_str()),
        ("postgres", true, without_consumer.as_str()),
        ("sqlite, consumer live", false, MANIFEST),
        ("postgres, consumer live", true, MANIFEST),
    ] {
        let app = spawn_app(AppConfig { postgres, ..AppConfig::new(manifest) }).await.expect("app starts");
        // Warm up: migrations, connections, caches.
        let warm = post(&app, "/events/emit?n=10", "").await;
        post(&app, "/events/claim-bench", &warm["ids"].to_string()).await;

        let emit = post(&app, &format!("/events/emit?n={N}"), "").await;
        let ids = emit["ids"].as_array().expect("emit answers the ids");
        assert_eq!(ids.len() as u64, N, "{emit}");
        let claim = post(&app, "/events/claim-bench", &emit["ids"].to_string()).await;
        // Every event claimed by the bench's consumer, once (live consumers claim as another).
        assert_eq!(claim["claimed"].as_u64(), Some(N), "{claim}");
        let per = |v: &serde_json::Value| v.as_u64().expect("a timing") as f64 / N as f64;
        println!(
            "{name:>24}: outbox insert {:>7.1} µs/event, publish+mark {:>7.1} µs/event, claim+complete {:>7.1} µs/event",
            per(&emit["insert_us"]),
            per(&emit["publish_us"]),
            per(&claim["claim_us"]),
        );
    }
}

/// Posts and answers the JSON body; any status but 200 ends the benchmark with the answer.
async fn post(app: &astria_tests::TestApp, path: &str, body: &str) -> serde_json::Value {
    let r = app.post(path, body.to_string()).await;
    let status = r.status();
    let text = r.text().await.unwrap_or_default();
    assert_eq!(status, 200, "{path}: {text}\n{}", app.log());
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
}
