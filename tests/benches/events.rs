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
    println!("event pipeline cost, {N} events, measured inside the component (devhost, this machine)");
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
        app.post("/events/emit?n=10", "").await;
        app.post("/events/claim-bench?n=10", "").await;

        let emit: serde_json::Value = app.post(&format!("/events/emit?n={N}"), "").await.json().await.unwrap();
        let claim: serde_json::Value = app.post(&format!("/events/claim-bench?n={N}"), "").await.json().await.unwrap();
        let per = |v: &serde_json::Value| v.as_u64().unwrap_or(0) as f64 / N as f64;
        println!(
            "{name:>24}: outbox insert {:>7.1} µs/event, publish+mark {:>7.1} µs/event, claim+complete {:>7.1} µs/event",
            per(&emit["insert_us"]),
            per(&emit["publish_us"]),
            per(&claim["claim_us"]),
        );
    }
}
