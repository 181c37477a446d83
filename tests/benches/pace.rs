//! Prints how long a 40-image pack takes to reach one customer at the default pace
//! (`whatsapp_pace_ms` in spin.toml), through the real sender in devhost, with a fake Graph API
//! that answers at once. Run: `cargo bench --profile host -p astria-tests --bench pace`.

use std::time::{Duration, Instant};

use astria_tests::whatsapp::{self as wa, FakeGraph};
use astria_tests::TestRedis;

const IMAGES: usize = 40;
const CUSTOMER: &str = "4915100000000";

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
    // The sender sends only messages the app stored, to a contact who wrote within 24 hours:
    // the customer says hi, and the images are stored as the image service queues them.
    let (status, _) =
        wa::post_webhook(&app, &wa::inbound(CUSTOMER, vec![wa::text(CUSTOMER, "wamid.pace", "hi")])).await;
    assert_eq!(status, 200);
    graph.wait_for(1).await;
    let db = astria_tests::db::TestDb::of(&app).await;
    let mut sends = vec![];
    for i in 0..IMAGES {
        let message = serde_json::json!({"kind": "image", "link": format!("https://mp.astria.ai/1/{i}.jpg")});
        sends.push(wa::queue_directly(&db, CUSTOMER, &message).await);
    }
    let started = Instant::now();
    for send in &sends {
        wa::publish_message_send(&redis, send).await;
    }
    while graph.requests().await.len() < IMAGES + 1 {
        assert!(started.elapsed() < Duration::from_secs(600), "stuck:\n{}", app.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "{IMAGES} images to one customer at whatsapp_pace_ms={pace}: {:.1} s from the first message.send to the last send",
        started.elapsed().as_secs_f64()
    );
}
