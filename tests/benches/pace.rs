//! Prints how long a 40-image pack takes to reach one customer at the default pace
//! (`whatsapp_pace_ms` in spin.toml), through the real sender in devhost, with a fake Graph API
//! that answers at once. Run: `cargo bench --profile host -p astria-tests --bench pace`.

use std::time::{Duration, Instant};

use astria_tests::whatsapp::{self as wa, FakeGraph};
use astria_tests::TestRedis;

const IMAGES: usize = 40;

#[tokio::main]
async fn main() {
    let manifest = std::fs::read_to_string(astria_tests::workspace_root().join("spin.toml")).unwrap();
    let pace = manifest
        .lines()
        .find(|l| l.starts_with("whatsapp_pace_ms"))
        .and_then(|l| l.split('"').nth(1))
        .expect("spin.toml declares whatsapp_pace_ms")
        .to_string();
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let app = wa::spawn_bot(wa::bot_config(&graph, &redis, false).var("whatsapp_pace_ms", pace.clone()), &redis).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let started = Instant::now();
    for i in 0..IMAGES {
        let message = serde_json::json!({"kind": "image", "link": format!("https://mp.astria.ai/1/{i}.jpg")});
        let send = serde_json::json!({
            "id": uuid::Uuid::new_v4().to_string(), "event_type": "message.send",
            "occurred_at": "2026-11-25T10:00:00Z", "correlation_id": "bench",
            "payload": serde_json::json!({"message_id": uuid::Uuid::new_v4().to_string(), "to": "4915100000000",
                                          "message": message.to_string()}).to_string(),
        });
        let _: i64 =
            redis::cmd("PUBLISH").arg("astria.messages").arg(send.to_string()).query_async(&mut conn).await.unwrap();
    }
    while graph.requests().await.len() < IMAGES {
        assert!(started.elapsed() < Duration::from_secs(600), "stuck:\n{}", app.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{IMAGES} images to one customer at whatsapp_pace_ms={pace}: {:.1} s from the first message.send to the last send",
        started.elapsed().as_secs_f64()
    );
}
