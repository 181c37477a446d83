//! message-service through the whole app (devhost, real SQLite/PostgreSQL, a Redis of the
//! test's own) against a fake WhatsApp Graph API: the webhook, the conversation, and the
//! sender's exactly-once delivery with retries, the 24-hour window and permanent failures.

use std::time::Duration;

use astria_tests::whatsapp::{self as wa, Answer, FakeGraph};
use astria_tests::{TestApp, TestRedis};
use futures::StreamExt;
use serde_json::{json, Value};

const ANA: &str = "4915112345678";

async fn pg(app: &TestApp) -> tokio_postgres::Client {
    let (client, conn) =
        tokio_postgres::connect(app.database_url.as_ref().expect("postgres app"), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

async fn count(db: &tokio_postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).await.unwrap().get(0)
}

/// Posts one message from Ana and waits until the fake Graph API has seen `expect_total` sends.
async fn say(app: &TestApp, graph: &FakeGraph, message: Value, expect_total: usize) -> Vec<String> {
    let (status, report) = wa::post_webhook(app, &wa::inbound(ANA, vec![message])).await;
    assert_eq!(status, 200, "{report}");
    let sends = graph.wait_for(expect_total).await;
    assert_eq!(sends.len(), expect_total, "sends so far: {sends:#?}\n{}", app.log());
    sends.iter().map(wa::summary).collect()
}

async fn full_conversation(postgres: bool) {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let app = wa::spawn_bot(wa::bot_config(&graph, &redis, postgres), &redis).await;

    let s = say(&app, &graph, wa::text(ANA, "wamid.in1", "hi"), 1).await;
    assert!(s[0].starts_with("list:"), "{s:?}");
    let first = &graph.requests().await[0];
    assert_eq!(first["to"], ANA);
    assert_eq!(first["interactive"]["action"]["sections"][0]["rows"][0]["id"], "pack:corporate");

    let s = say(&app, &graph, wa::list_reply(ANA, "wamid.in2", "pack:corporate", "Corporate headshots"), 2).await;
    assert!(s[1].starts_with("buttons:"), "subject choice: {s:?}");
    let buttons = &graph.requests().await[1]["interactive"]["action"]["buttons"];
    assert_eq!(buttons[1]["reply"]["id"], "subject:woman");

    let s = say(&app, &graph, wa::button_reply(ANA, "wamid.in3", "subject:woman", "Woman"), 3).await;
    assert_eq!(s[2], "text:Great choice: Corporate headshots. Send me 2 to 3 clear selfies, one face, good light.");

    let photo_a = "a".repeat(64);
    let s = say(&app, &graph, wa::image(ANA, "wamid.in4", &photo_a), 4).await;
    assert_eq!(s[3], "text:Got it (1/3).");
    let s = say(&app, &graph, wa::image(ANA, "wamid.in5", &photo_a), 5).await;
    assert_eq!(s[4], "text:I already have that photo; please send a different one.");
    let s = say(&app, &graph, wa::sticker(ANA, "wamid.in6"), 6).await;
    assert_eq!(s[5], "text:Please send your selfies as photos (not files or stickers).", "a sticker is re-prompted");
    let s = say(&app, &graph, wa::image(ANA, "wamid.in7", &"b".repeat(64)), 7).await;
    assert_eq!(s[6], "buttons:Got 2 photos. Send more for better results, or tap Done.");
    let done_button = &graph.requests().await[6]["interactive"]["action"]["buttons"][0]["reply"];
    assert_eq!(done_button["id"], "done");

    // The payment-service's part is played by the test: it hears order.awaiting_payment on
    // Redis and asks the sender, through a message.send event, to deliver the link.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe("astria.payments").await.unwrap();
    let s = say(&app, &graph, wa::button_reply(ANA, "wamid.in8", "done", "Done"), 8).await;
    assert!(s[7].contains("19.99"), "the price is announced: {s:?}");
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.on_message().next()).await.unwrap().unwrap();
    let event: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(event["event_type"], "order.awaiting_payment");
    let order_id = serde_json::from_str::<Value>(event["payload"].as_str().unwrap()).unwrap()["order_id"]
        .as_str()
        .unwrap()
        .to_string();

    let link = format!("https://checkout.stripe.com/c/pay/cs_test_{order_id}");
    let send = json!({
        "id": uuid::Uuid::new_v4().to_string(), "event_type": "message.send", "occurred_at": "2026-11-25T10:00:00Z",
        "correlation_id": "fake-payment-service",
        "payload": json!({ "message_id": uuid::Uuid::new_v4().to_string(), "to": ANA,
                           "message": json!({"kind":"text","body": format!("Pay here: {link}")}).to_string() }).to_string(),
    });
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 =
        redis::cmd("PUBLISH").arg("astria.messages").arg(send.to_string()).query_async(&mut conn).await.unwrap();
    let sends = graph.wait_for(9).await;
    assert_eq!(wa::summary(&sends[8]), format!("text:Pay here: {link}"));

    if postgres {
        let db = pg(&app).await;
        let row = db
            .query_one("SELECT status, pack_id, subject_class FROM orders WHERE id = $1", &[&order_id])
            .await
            .unwrap();
        assert_eq!((row.get::<_, String>(0), row.get::<_, String>(1)), ("awaiting_payment".into(), "corporate".into()));
        assert_eq!(count(&db, "SELECT COUNT(*) FROM order_photos").await, 2);
        assert_eq!(count(&db, "SELECT COUNT(*) FROM outbound_messages WHERE status = 'sent'").await, 9);
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM outbox WHERE status <> 'done' AND channel = 'astria.messages'").await,
            0
        );
    }
    // Nothing else was sent.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(graph.requests().await.len(), 9);
}

#[tokio::test]
async fn a_customer_goes_from_hi_to_a_payment_link_sqlite() {
    full_conversation(false).await;
}

#[tokio::test]
async fn a_customer_goes_from_hi_to_a_payment_link_postgres() {
    full_conversation(true).await;
}
