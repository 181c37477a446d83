//! message-service through the whole app (devhost, real SQLite/PostgreSQL, a Redis of the
//! test's own) against a fake WhatsApp Graph API: the webhook, the conversation, and the
//! sender's exactly-once delivery with retries, the 24-hour window and permanent failures.

use std::time::Duration;

use astria_tests::db::TestDb;
use astria_tests::quiet::quiesce;
use astria_tests::stripe::{self as ps, FakeStripe};
use astria_tests::whatsapp::{self as wa, Answer, FakeGraph};
use astria_tests::world::{Options, World};
use astria_tests::{on_both, TestApp, TestRedis};
use futures::StreamExt;
use serde_json::{json, Value};

const ANA: &str = "4915112345678";

/// The app's database (SQLite or PostgreSQL, whichever it runs on).
async fn pg(app: &TestApp) -> TestDb {
    TestDb::of(app).await
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.count(sql).await
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
    let stripe = FakeStripe::start().await;
    // After payment the trainer takes over: it needs Astria and the photos' media.
    let astria = astria_tests::astria::FakeAstria::start().await;
    graph.serve_media(0).await;
    let config = astria_tests::astria::with_astria(
        ps::with_stripe(wa::bot_config(&graph, &redis, postgres), &stripe),
        &astria,
        &graph.uri(),
    );
    let app = wa::spawn_bot(config, &redis).await;

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

    let photo_a = wa::photo(ANA, "wamid.in4");
    let s = say(&app, &graph, photo_a.clone(), 4).await;
    assert_eq!(s[3], "text:Got it (1/3).");
    let same_photo = wa::image(ANA, "wamid.in5", photo_a["image"]["sha256"].as_str().unwrap());
    let s = say(&app, &graph, same_photo, 5).await;
    assert_eq!(s[4], "text:I already have that photo; please send a different one.");
    let s = say(&app, &graph, wa::sticker(ANA, "wamid.in6"), 6).await;
    assert_eq!(s[5], "text:Please send your selfies as photos (not files or stickers).", "a sticker is re-prompted");
    let s = say(&app, &graph, wa::photo(ANA, "wamid.in7"), 7).await;
    assert_eq!(s[6], "buttons:Got 2 photos. Send more for better results, or tap Done.");
    let done_button = &graph.requests().await[6]["interactive"]["action"]["buttons"][0]["reply"];
    assert_eq!(done_button["id"], "done");

    // The real payment-service takes over: a Checkout session at the fake Stripe, the link
    // through the sender; then Stripe's signed webhook settles the order.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe("astria.orders").await.unwrap();
    let s = say(&app, &graph, wa::button_reply(ANA, "wamid.in8", "done", "Done"), 9).await;
    assert_eq!(s[7], "text:Thanks! Your order is 19.99 USD. I'm preparing your secure payment link…");
    let session = stripe.session_for_any().expect("a Checkout session was created");
    let order_id = session["client_reference_id"].as_str().unwrap().to_string();
    let link = session["url"].as_str().unwrap();
    assert_eq!(s[8], format!("text:Pay securely here: {link}"));

    let paid = ps::session(session["id"].as_str().unwrap(), &order_id, 1999, "usd", "paid");
    let (status, handled) = ps::post_event(&app, &ps::event("evt_paid_1", "checkout.session.completed", paid)).await;
    assert_eq!((status, handled["result"].as_str()), (200, Some("paid")), "{handled}");
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.on_message().next()).await.unwrap().unwrap();
    let event: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    assert_eq!(event["event_type"], "order.paid");
    let sends = graph.wait_for(11).await;
    assert!(wa::summary(&sends[9]).starts_with("text:Payment received, thank you!"), "{sends:#?}");
    assert!(wa::summary(&sends[10]).starts_with("text:Your AI model is training"), "{sends:#?}");

    // WhatsApp has the eleventh message; the sender books it sent just after. Counts are final
    // once the app has nothing left to do.
    quiesce(&app).await;
    {
        let db = pg(&app).await;
        let row =
            db.rows("SELECT status, pack_id, subject_class FROM orders WHERE id = $1", &[(&order_id).into()]).await;
        assert_eq!((row[0][0].text(), row[0][1].text()), ("training".into(), "corporate".into()));
        assert_eq!(count(&db, "SELECT COUNT(*) FROM order_photos").await, 2);
        assert_eq!(count(&db, "SELECT COUNT(*) FROM outbound_messages WHERE status = 'sent'").await, 11);
        assert_eq!(
            count(&db, "SELECT COUNT(*) FROM outbox WHERE status <> 'done' AND channel = 'astria.messages'").await,
            0
        );
    }
    // Nothing else was sent, one session was made and one tune.
    assert_eq!(graph.requests().await.len(), 11);
    assert_eq!(stripe.sessions_created(), 1);
    assert_eq!(astria.creates(), 1);
}

#[tokio::test]
async fn a_customer_goes_from_hi_through_the_payment_link_to_paid_sqlite() {
    full_conversation(false).await;
}

#[tokio::test]
async fn a_customer_goes_from_hi_through_the_payment_link_to_paid_postgres() {
    full_conversation(true).await;
}

// ------------------------------------------------------------------ handshake and commands

#[tokio::test]
async fn the_handshake_answers_the_challenge_only_to_the_configured_token() {
    let w = World::start(Options::on(false)).await;
    let app = &w.app;
    let ok = format!("/SmsReceived?hub.mode=subscribe&hub.verify_token={}&hub.challenge=1158201444", wa::VERIFY_TOKEN);
    let r = app.get(&ok).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1158201444");
    for bad in [
        "/SmsReceived?hub.mode=subscribe&hub.verify_token=wrong&hub.challenge=1",
        "/SmsReceived?hub.mode=unsubscribe&hub.verify_token=test-verify-token&hub.challenge=1",
        "/SmsReceived?hub.verify_token=test-verify-token&hub.challenge=1",
        "/SmsReceived",
    ] {
        assert_eq!(app.get(bad).await.status(), 403, "{bad}");
    }
}

#[tokio::test]
async fn commands_work_from_several_states_postgres() {
    let w = World::start(Options::on(true)).await;
    let (app, graph) = (&w.app, &w.graph);
    let db = pg(&app).await;
    let help =
        "text:Commands: MENU (packs), STATUS, CANCEL (before paying), DONE (after photos), STOP (no more messages).";

    // Idle: HELP, STATUS and CANCEL have nothing to act on.
    let s = say(&app, &graph, wa::text(ANA, "w1", "help"), 1).await;
    assert_eq!(s[0], help);
    let s = say(&app, &graph, wa::text(ANA, "w2", "cancel"), 2).await;
    assert_eq!(s[1], "text:There's nothing to cancel. Reply MENU to see the packs.");
    // Choosing a pack: CANCEL goes back to idle.
    say(&app, &graph, wa::text(ANA, "w3", "menu"), 3).await;
    let s = say(&app, &graph, wa::text(ANA, "w4", "CANCEL"), 4).await;
    assert_eq!(s[3], "text:Your order is cancelled. Reply MENU to start again.");
    // Collecting photos: STATUS counts them, CANCEL cancels the order.
    say(&app, &graph, wa::text(ANA, "w5", "hi"), 5).await;
    say(&app, &graph, wa::text(ANA, "w6", "pets"), 6).await; // one subject class: order created at once
    say(&app, &graph, wa::image(ANA, "w7", &"c".repeat(64)), 7).await;
    let s = say(&app, &graph, wa::text(ANA, "w8", "status"), 8).await;
    assert_eq!(s[7], "text:Got it (1/3).");
    let s = say(&app, &graph, wa::text(ANA, "w9", "help"), 9).await;
    assert_eq!(s[8], help);
    let s = say(&app, &graph, wa::text(ANA, "w10", "cancel"), 10).await;
    assert_eq!(s[9], "text:Your order is cancelled. Reply MENU to start again.");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'cancelled' AND pack_id = 'pets'").await, 1);

    // STOP: confirmed once, then silence until START.
    let s = say(&app, &graph, wa::text(ANA, "w11", "STOP"), 11).await;
    assert_eq!(s[10], "text:You won't receive more messages. Reply START to resume.");
    for (i, body) in ["hi", "menu", "help"].iter().enumerate() {
        let (status, _) =
            wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, &format!("w-quiet{i}"), body)])).await;
        assert_eq!(status, 200);
    }
    wa::worked_through(&app).await;
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 11, "an opted-out contact gets nothing");
    assert_eq!(count(&db, "SELECT opted_out FROM contacts").await, 1);
    let s = say(&app, &graph, wa::text(ANA, "w15", "START"), 12).await;
    assert_eq!(s[11], "text:Welcome back! Reply MENU to see the packs.");
    assert_eq!(count(&db, "SELECT opted_out FROM contacts").await, 0);
    let s = say(&app, &graph, wa::text(ANA, "w16", "menu"), 13).await;
    assert!(s[12].starts_with("list:Hi!"), "{s:?}");
}

// ------------------------------------------------------------------ duplicates and forgeries

#[tokio::test]
async fn the_same_webhook_delivered_five_times_gets_one_reply_postgres() {
    let w = World::start(Options::on(true)).await;
    let (app, graph) = (&w.app, &w.graph);
    let body = wa::inbound(ANA, vec![wa::text(ANA, "wamid.same", "hi")]);
    // Two at once, then three more: Meta's retries may overlap the first delivery.
    let (a, b) = tokio::join!(wa::post_webhook(&app, &body), wa::post_webhook(&app, &body));
    let mut reports = vec![a, b];
    for _ in 0..3 {
        reports.push(wa::post_webhook(&app, &body).await);
    }
    assert!(reports.iter().all(|(s, r)| *s == 200 && r["messages"] == 1), "{reports:?}");
    // Stored in the inbox at least once; a copy that finds the same body still waiting is not
    // stored again, and one that comes after it was worked through is deduped by the step.
    assert!(reports.iter().any(|(_, r)| r["queued"] == true), "{reports:?}");
    graph.wait_for(1).await;
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 1, "one reply");
    let db = pg(&app).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbound_messages").await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM processed_webhooks").await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM inbox").await, 0, "every copy worked through");
}

async fn forged_requests_are_refused_with_401_and_store_nothing(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (app, graph) = (&w.app, &w.graph);
    assert_eq!(app.get("/health/message").await.status(), 200, "ready");
    assert!(wa::relay(&app).await["republished"].is_number(), "the relay's first call put the schema in place");
    let body = serde_json::to_vec(&wa::inbound(ANA, vec![wa::text(ANA, "wamid.forged", "hi")])).unwrap();
    let other_body = serde_json::to_vec(&wa::inbound(ANA, vec![wa::text(ANA, "wamid.other", "hi")])).unwrap();
    let valid = wa::sign(wa::APP_SECRET, &body);
    let forgeries: Vec<Option<String>> = vec![
        None,
        Some(String::new()),
        Some("sha256=".into()),
        Some(wa::sign("another-secret", &body)),
        Some(wa::sign(wa::APP_SECRET, &other_body)),
        Some(valid.replace("sha256=", "sha1=")),
        Some(valid[..valid.len() - 2].to_string()),
        // The last hex digit changed, never to itself: the body carries the time, so a fixed
        // replacement would equal the real signature once in 256 runs (it did in a clean clone).
        Some(format!("{}{}", &valid[..valid.len() - 1], if valid.ends_with('0') { '1' } else { '0' })),
        Some("sha256=zz".into()),
        Some(valid.to_uppercase()),
    ];
    for i in 0..100 {
        let mut req = app.client.post(app.url("/SmsReceived")).body(body.clone());
        if let Some(sig) = &forgeries[i % forgeries.len()] {
            req = req.header("x-hub-signature-256", sig);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "forgery {}", i % forgeries.len());
    }
    let db = pg(&app).await;
    for table in ["contacts", "processed_webhooks", "outbound_messages", "outbox", "orders"] {
        assert_eq!(count(&db, &format!("SELECT COUNT(*) FROM {table}")).await, 0, "{table}");
    }
    assert_eq!(count(&TestDb::inbox_of(app).await, "SELECT COUNT(*) FROM inbox").await, 0, "inbox");
    quiesce(&app).await;
    assert!(graph.requests().await.is_empty());
    // The genuine request still works afterwards (nothing was marked as seen).
    say(&app, &graph, wa::text(ANA, "wamid.forged", "hi"), 1).await;
}

on_both!(forged_requests_are_refused_with_401_and_store_nothing);

#[tokio::test]
async fn bad_input_gets_the_right_status_and_changes_nothing_postgres() {
    let w = World::start(Options::on(true)).await;
    let (app, graph) = (&w.app, &w.graph);
    assert_eq!(app.get("/health/message").await.status(), 200, "ready");
    assert!(wa::relay(&app).await["republished"].is_number(), "the relay's first call put the schema in place");
    let signed_post = |body: Vec<u8>| {
        app.client
            .post(app.url("/SmsReceived"))
            .header("x-hub-signature-256", wa::sign(wa::APP_SECRET, &body))
            .body(body)
            .send()
    };
    assert_eq!(signed_post(b"not json".to_vec()).await.unwrap().status(), 400);
    assert_eq!(
        signed_post(br#"{"object":"whatsapp_business_account","entry":"x"}"#.to_vec()).await.unwrap().status(),
        400
    );
    // 5 MB announced: refused from the head, before the body is read; without a well-formed
    // signature header, refused as unsigned before even the length is looked at.
    let signature = ("x-hub-signature-256", "sha256=00000000000000000000000000000000000000000000000000000000000000ff");
    let (status, body) = app.headers_only_post_with("/SmsReceived", 5 * 1024 * 1024, &[signature]).await;
    assert_eq!(status, 413, "{body}");
    let (status, body) = app.headers_only_post("/SmsReceived", 5 * 1024 * 1024).await;
    assert_eq!(status, 401, "{body}");
    // For another phone number, or another field: accepted (Meta must not retry) and ignored.
    let mut other = wa::inbound(ANA, vec![wa::text(ANA, "wamid.elsewhere", "hi")]);
    other["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = json!("999");
    let (status, report) = wa::post_webhook(&app, &other).await;
    assert_eq!((status, report["messages"].as_i64()), (200, Some(0)));
    let mut field = wa::inbound(ANA, vec![wa::text(ANA, "wamid.field", "hi")]);
    field["entry"][0]["changes"][0]["field"] = json!("account_update");
    assert_eq!(wa::post_webhook(&app, &field).await.0, 200);
    assert_eq!(app.client.put(app.url("/SmsReceived")).send().await.unwrap().status(), 400);

    let db = pg(&app).await;
    for table in ["contacts", "processed_webhooks", "outbound_messages", "outbox", "inbox"] {
        assert_eq!(count(&db, &format!("SELECT COUNT(*) FROM {table}")).await, 0, "{table}");
    }
    quiesce(&app).await;
    assert!(graph.requests().await.is_empty());
}

// ------------------------------------------------------------------ the sender's faults

/// Calls the relay until `graph` has seen `n` sends (as the every-minute scheduler would).
async fn relay_until(app: &TestApp, graph: &FakeGraph, n: usize) -> Vec<Value> {
    for _ in 0..100 {
        let sends = graph.requests().await;
        if sends.len() >= n {
            return sends;
        }
        wa::relay(app).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("only {} sends after relaying:\n{}", graph.requests().await.len(), app.log());
}

async fn message_row(db: &TestDb, kind: &str) -> (String, i64, Option<i64>, Option<String>) {
    let r = db
        .rows(
            "SELECT status, attempts, error_code, wamid FROM outbound_messages WHERE kind = $1 ORDER BY seq LIMIT 1",
            &[kind.into()],
        )
        .await;
    let r = &r[0];
    let code = match &r[2] {
        astria_tests::db::Cell::Null => None,
        c => Some(c.int()),
    };
    (r[0].text(), r[1].int(), code, r[3].opt_text())
}

#[tokio::test]
async fn graph_answering_500_twice_then_200_sends_the_message_once_postgres() {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    graph.script(vec![Answer::Error(500, 2), Answer::Status(502)]);
    let app = wa::spawn_bot(wa::bot_config(&graph, &redis, true), &redis).await;
    let (status, _) = wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.r1", "hi")])).await;
    assert_eq!(status, 200, "the webhook does not wait for WhatsApp");

    let sends = relay_until(&app, &graph, 3).await;
    assert!(sends.iter().all(|s| s == &sends[0]), "the same message each time");
    let db = pg(&app).await;
    let (status, attempts, code, wamid) = message_row(&db, "list").await;
    assert_eq!((status.as_str(), attempts, code), ("sent", 2, None));
    assert!(wamid.unwrap().starts_with("wamid.TEST"));
    for _ in 0..5 {
        wa::relay(&app).await;
    }
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 3, "sent once, never again");
}

#[tokio::test]
async fn undeliverable_and_bad_token_are_not_retried_and_are_recorded_postgres() {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    graph.script(vec![Answer::Error(400, 131026)]);
    let app = wa::spawn_bot(wa::bot_config(&graph, &redis, true), &redis).await;
    let db = pg(&app).await;
    wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.u1", "hi")])).await;
    graph.wait_for(1).await;
    let row = app
        .eventually(Duration::from_secs(5), || async {
            let r = message_row(&db, "list").await;
            (r.0 == "failed").then_some(r)
        })
        .await
        .expect("recorded as failed");
    assert_eq!(row.2, Some(131026));

    graph.script(vec![Answer::Error(401, 190)]);
    let bob = "4915187654321";
    wa::post_webhook(&app, &wa::inbound(bob, vec![wa::text(bob, "wamid.u2", "hi")])).await;
    graph.wait_for(2).await;
    for _ in 0..5 {
        wa::relay(&app).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(graph.requests().await.len(), 2, "neither is retried");
    let codes: Vec<Option<i64>> = db
        .rows("SELECT error_code FROM outbound_messages WHERE status = 'failed' ORDER BY error_code", &[])
        .await
        .iter()
        .map(|r| Some(r[0].int()))
        .collect();
    assert_eq!(codes, [Some(190), Some(131026)]);
    // An operator sees both, with WhatsApp's reason.
    let r = app
        .client
        .get(app.url("/maintenance/messages?status=failed"))
        .header("authorization", format!("Bearer {}", wa::ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    let listed: Value = r.json().await.unwrap();
    let mut listed_codes: Vec<i64> =
        listed["messages"].as_array().unwrap().iter().map(|m| m["error_code"].as_i64().unwrap()).collect();
    listed_codes.sort();
    assert_eq!(listed_codes, [190, 131026], "{listed}");
    assert!(listed["messages"][0]["last_error"].as_str().unwrap().contains("scripted error"));
    assert_eq!(app.get("/maintenance/messages").await.status(), 401, "operators only");
    let log = app.log();
    assert!(log.contains("whatsapp.rejected") && log.contains("code 131026") && log.contains("code 190"), "{log}");
    assert!(!log.contains(wa::ACCESS_TOKEN), "the token never reaches the log");
}

#[tokio::test]
async fn outside_the_24_hour_window_the_template_goes_out_and_the_rest_follows_the_next_message_postgres() {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    graph.rule(|body| if body["type"] == "template" { Answer::Ok } else { Answer::Error(400, 131047) });
    let app = wa::spawn_bot(wa::bot_config(&graph, &redis, true), &redis).await;
    wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.w1", "hi")])).await;
    let sends = graph.wait_for(2).await;
    assert_eq!(
        sends.iter().map(wa::summary).collect::<Vec<_>>(),
        [
            "list:Hi! I turn your selfies into professional AI portraits. Pick a photo pack to start:".to_string(),
            format!("template:{}", wa::TEMPLATE)
        ]
    );
    assert_eq!(sends[1]["template"]["language"]["code"], "en_US");
    let db = pg(&app).await;
    assert_eq!(message_row(&db, "list").await.0, "awaiting_window");
    for _ in 0..3 {
        wa::relay(&app).await;
    }
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 2, "one template per closed window, nothing retried");

    // The customer answers the template: the window is open, the kept message goes first.
    graph.rule(|_| Answer::Ok);
    let sends = {
        wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.w2", "menu")])).await;
        graph.wait_for(4).await
    };
    assert_eq!(sends.len(), 4, "{sends:#?}");
    assert_eq!(sends[2], sends[0], "the kept message, unchanged");
    assert!(wa::summary(&sends[3]).starts_with("list:Hi!"));
    // The sender books each answer just after it arrives.
    app.wait_until("every message booked as sent", Duration::from_secs(10), || async {
        (count(&db, "SELECT COUNT(*) FROM outbound_messages WHERE status <> 'sent'").await == 0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_reply_to_a_message_older_than_24_hours_becomes_the_template_without_a_failed_call() {
    let w = World::start(Options::on(false)).await;
    let (app, graph) = (&w.app, &w.graph);
    let mut old = wa::text(ANA, "wamid.old", "hi");
    old["timestamp"] = json!((wa::unix_now() - 25 * 3600).to_string());
    wa::post_webhook(&app, &wa::inbound(ANA, vec![old])).await;
    let sends = graph.wait_for(1).await;
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 1);
    assert_eq!(wa::summary(&sends[0]), format!("template:{}", wa::TEMPLATE));
}

#[tokio::test]
async fn statuses_are_recorded_forward_only_and_a_window_failure_brings_the_template_postgres() {
    let w = World::start(Options::on(true)).await;
    let (app, graph) = (&w.app, &w.graph);
    let db = pg(&app).await;
    let s = say(&app, &graph, wa::text(ANA, "wamid.s1", "hi"), 1).await;
    assert!(s[0].starts_with("list:"));
    let wamid = app
        .eventually(Duration::from_secs(5), || async { message_row(&db, "list").await.3 })
        .await
        .expect("the wamid is booked");
    let delivery = || async {
        db.one("SELECT delivery_status FROM outbound_messages WHERE wamid = $1", &[(&wamid).into()]).await.opt_text()
    };
    for (st, expect) in [("sent", "sent"), ("read", "read"), ("delivered", "read")] {
        let (status, report) = wa::post_webhook(&app, &wa::status(&wamid, ANA, st, None)).await;
        assert_eq!((status, report["statuses"].as_i64()), (200, Some(1)));
        wa::worked_through(&app).await;
        assert_eq!(delivery().await.as_deref(), Some(expect), "after {st}");
    }
    // Statuses of messages that are not ours are accepted and ignored.
    assert_eq!(wa::post_webhook(&app, &wa::status("wamid.unknown", ANA, "read", None)).await.0, 200);

    // WhatsApp may report the closed window later, in a status.
    let (status, _) = wa::post_webhook(&app, &wa::status(&wamid, ANA, "failed", Some(131047))).await;
    assert_eq!(status, 200);
    let sends = graph.wait_for(2).await;
    assert_eq!(wa::summary(&sends[1]), format!("template:{}", wa::TEMPLATE));
    assert_eq!(message_row(&db, "list").await.0, "awaiting_window");
    assert!(app.log().contains("whatsapp.delivery"));
}

#[tokio::test]
async fn with_redis_stopped_replies_wait_and_are_delivered_once_it_returns_postgres() {
    let mut redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let app =
        wa::spawn_bot(wa::bot_config(&graph, &redis, true).as_deployment(Duration::from_millis(500)), &redis).await;
    say(&app, &graph, wa::text(ANA, "wamid.d1", "hi"), 1).await;

    redis.stop();
    let (status, _) = wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.d2", "corporate")])).await;
    assert_eq!(status, 200, "accepted and stored: Meta must not retry");
    // Readiness depends on the database only: a Redis outage must not take the webhook out of
    // the Service while it still accepts into the outbox.
    let r = app.get("/health/message").await;
    assert_eq!(r.status(), 200);
    let health: Value = r.json().await.unwrap();
    let names: Vec<&str> = health["checks"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, vec!["database"], "{health}");
    app.wait_until("the sender's process to exit with Redis", Duration::from_secs(10), || async {
        (!app.process("astria-message-worker").exits().is_empty()).then_some(())
    })
    .await;
    assert_eq!(app.process("astria-message").exits(), vec![], "the webhook's process stays up");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(graph.requests().await.len(), 1, "nothing can be announced while Redis is down");

    redis.restart().await.unwrap();
    astria_tests::wait_for_subscribers_at(&redis.url(), "astria.messages", 1).await.unwrap();
    let sends = relay_until(&app, &graph, 2).await;
    assert!(wa::summary(&sends[1]).starts_with("buttons:Who is in the photos?"), "{sends:#?}");
    for _ in 0..3 {
        wa::relay(&app).await;
    }
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 2, "delivered once");
    assert_eq!(app.get("/health/message").await.status(), 200);
}

#[tokio::test]
async fn with_the_database_down_the_webhook_answers_503_and_metas_retry_succeeds_postgres() {
    let mut pg = astria_tests::postgres::TestPostgres::start().await.unwrap();
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let config = pg.app_config(wa::bot_config(&graph, &redis, false), "astria_down").await.unwrap();
    let app = wa::spawn_bot(config, &redis).await;
    let body = wa::inbound(ANA, vec![wa::text(ANA, "wamid.db1", "hi")]);
    pg.stop();
    let (status, report) = wa::post_webhook(&app, &body).await;
    assert_eq!(status, 503, "{report}");
    assert_eq!(report["error"], "database unavailable");
    assert!(!app.log().contains("postgres://postgres@"), "no connection string in the log");
    assert_eq!(app.get("/health/message").await.status(), 503);
    pg.restart().await.unwrap();
    // The same running app takes Meta's retry, once.
    assert_eq!(app.get("/health/message").await.status(), 200);
    let (status, report) = wa::post_webhook(&app, &body).await;
    assert_eq!((status, report["messages"].as_i64()), (200, Some(1)), "{report}");
    assert_eq!(wa::post_webhook(&app, &body).await.0, 200, "Meta's second retry");
    graph.wait_for(1).await;
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 1, "one reply");
}

#[tokio::test]
async fn with_two_replicas_a_burst_from_many_contacts_is_answered_exactly_once_each_postgres() {
    let w = World::start(Options::on(true)).await;
    let (app, graph, redis) = (&w.app, &w.graph, &w.redis);
    let replica = astria_tests::spawn_app(wa::bot_config(&graph, &redis, false).replica_of(&app)).await.unwrap();
    astria_tests::wait_for_subscribers_at(&redis.url(), "astria.messages", 2).await.unwrap();
    astria_tests::wait_for_subscribers_at(&redis.url(), "astria.inbox", 2).await.unwrap();
    // 10 contacts write 3 messages each, all at once, to either replica.
    let posts = (0..30).map(|i| {
        let from = format!("49160{:07}", i % 10);
        let target = if i % 2 == 0 { &app } else { &replica };
        let body = wa::inbound(&from, vec![wa::text(&from, &format!("wamid.burst{i}"), "help")]);
        async move { wa::post_webhook(target, &body).await.0 }
    });
    let statuses = futures::future::join_all(posts).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    // Every reply arrives without the relay's help, and none twice.
    let sends = graph.wait_for(30).await;
    quiesce(&app).await;
    let sends_after = graph.requests().await;
    assert_eq!((sends.len(), sends_after.len()), (30, 30), "{}", app.log());
    let db = pg(&app).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbound_messages WHERE status = 'sent'").await, 30);
    assert_eq!(count(&db, "SELECT COUNT(DISTINCT wamid) FROM outbound_messages").await, 30);
    for i in 0..10 {
        let to = format!("49160{i:07}");
        assert_eq!(sends.iter().filter(|s| s["to"] == to.as_str()).count(), 3, "{to}");
    }
}

async fn a_send_whose_answer_was_lost_is_not_sent_again_once_its_status_arrives(postgres: bool) {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    // WhatsApp takes the reply but answers after the sender's timeout; then, as WhatsApp
    // does, it reports the message sent and delivered in status webhooks carrying our tag.
    graph.script(vec![Answer::Late(Duration::from_millis(1500))]);
    let config = wa::bot_config(&graph, &redis, postgres)
        .var("whatsapp_timeout_ms", "400")
        .var("whatsapp_unconfirmed_wait_ms", "1500");
    let app = wa::spawn_bot(config, &redis).await;
    graph.report_statuses(&app);
    wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.l1", "hi")])).await;
    let sends = graph.wait_for(1).await;
    assert!(sends[0]["biz_opaque_callback_data"].is_string(), "every send is tagged");
    let db = pg(&app).await;
    app.wait_until("the timed-out send booked", Duration::from_secs(10), || async {
        (message_row(&db, "list").await.3.is_some() || count_unconfirmed(&db).await).then_some(())
    })
    .await;
    // Past the wait, with the relay running: it is not sent again.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    for _ in 0..3 {
        wa::relay(&app).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let sends = graph.wait_for(1).await;
    assert_eq!(sends.len(), 1, "sent once: {sends:#?}\n{}", app.log());
    let (status, _, _, wamid) = message_row(&db, "list").await;
    assert_eq!((status.as_str(), wamid.as_deref()), ("sent", Some("wamid.TEST000000")), "booked by its status");
    let delivery = db.one("SELECT delivery_status FROM outbound_messages WHERE kind = 'list'", &[]).await;
    assert_eq!(delivery.opt_text().as_deref(), Some("delivered"));
    assert!(app.log().contains("confirmed sent by its status"), "{}", app.log());
}

async fn an_unconfirmed_send_without_a_status_goes_again_only_after_the_wait(postgres: bool) {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    // A proxy's 502: WhatsApp may or may not have taken it.
    graph.script(vec![Answer::Status(502)]);
    let app =
        wa::spawn_bot(wa::bot_config(&graph, &redis, postgres).var("whatsapp_unconfirmed_wait_ms", "1500"), &redis)
            .await;
    let started = std::time::Instant::now();
    wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.u1", "hi")])).await;
    graph.wait_for(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    wa::relay(&app).await;
    assert_eq!(graph.requests().await.len(), 1, "not sent again at once");
    let sends = relay_until(&app, &graph, 2).await;
    assert!(started.elapsed() >= Duration::from_millis(1500), "only after the wait: {:?}", started.elapsed());
    assert_eq!(sends[0]["biz_opaque_callback_data"], sends[1]["biz_opaque_callback_data"], "the same message");
}

/// Whether the reply to Ana is waiting because its send was not confirmed.
async fn count_unconfirmed(db: &TestDb) -> bool {
    count(db, "SELECT COUNT(*) FROM outbound_messages WHERE last_error LIKE 'unconfirmed%'").await > 0
}

async fn a_crafted_message_send_for_no_stored_message_sends_nothing(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (app, graph, redis) = (&w.app, &w.graph, &w.redis);
    say(&app, &graph, wa::text(ANA, "wamid.x1", "hi"), 1).await;
    let db = pg(&app).await;
    let before = count(&db, "SELECT COUNT(*) FROM outbound_messages").await;
    // Someone who can publish on Redis tries to make the bot write to a stranger, and to Ana.
    let spam = json!({"kind": "text", "body": "You won! Pay here: https://evil.example"});
    for to in ["15550001111", ANA] {
        let forged = wa::message_send(&uuid::Uuid::new_v4().to_string(), &uuid::Uuid::new_v4().to_string(), to, &spam);
        wa::publish_message_send(&redis, &forged).await;
    }
    // A message Ana really has queued, announced with someone else's number: it goes to Ana.
    let real = wa::queue_directly(&db, ANA, &json!({"kind": "text", "body": "Your real reply"})).await;
    let mut redirected = real.clone();
    let payload: Value = serde_json::from_str(real["payload"].as_str().unwrap()).unwrap();
    let mut p = payload.clone();
    p["to"] = json!("15550001111");
    redirected["payload"] = json!(p.to_string());
    wa::publish_message_send(&redis, &redirected).await;
    let sends = graph.wait_for(2).await;
    quiesce(&app).await;
    let sends_after = graph.requests().await;
    assert_eq!(
        (sends.len(), sends_after.len()),
        (2, 2),
        "{:#?}",
        sends_after.iter().map(wa::summary).collect::<Vec<_>>()
    );
    assert_eq!(sends_after[1]["to"], ANA);
    assert_eq!(wa::summary(&sends_after[1]), "text:Your real reply");
    assert!(sends_after.iter().all(|s| !s.to_string().contains("evil.example")), "no forged text sent");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbound_messages").await, before + 1, "nothing forged stored");
    assert!(app.log().contains("was never queued by this app"), "{}", app.log());
}

async fn an_image_reported_failed_as_unusable_goes_again_as_a_document(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (app, graph, redis) = (&w.app, &w.graph, &w.redis);
    say(&app, &graph, wa::text(ANA, "wamid.i1", "hi"), 1).await;
    // Another service queues an image (as the image-service does for each portrait: the row,
    // then its message.send).
    let db = pg(&app).await;
    let image = json!({"kind": "image", "link": "https://mp.astria.ai/9/big.jpg"});
    let send = wa::queue_directly(&db, ANA, &image).await;
    wa::publish_message_send(&redis, &send).await;
    graph.wait_for(2).await;
    // The sender books WhatsApp's answer just after it arrives.
    let wamid = app
        .wait_until("the image booked as sent", Duration::from_secs(10), || async { message_row(&db, "image").await.3 })
        .await;
    // WhatsApp accepted it, then could not fetch it (over 5 MB): a failed status with 131053,
    // delivered twice at once (Meta retries; two webhook replicas take them together).
    let failed = wa::status(&wamid, ANA, "failed", Some(131053));
    let (a, b) = tokio::join!(wa::post_webhook(&app, &failed), wa::post_webhook(&app, &failed));
    assert_eq!((a.0, b.0), (200, 200));
    let sends = graph.wait_for(3).await;
    assert_eq!(sends[2]["type"], "document");
    assert_eq!(sends[2]["document"]["link"], "https://mp.astria.ai/9/big.jpg");
    // The same status again changes nothing.
    wa::post_webhook(&app, &wa::status(&wamid, ANA, "failed", Some(131053))).await;
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 3);
}

on_both!(
    a_send_whose_answer_was_lost_is_not_sent_again_once_its_status_arrives,
    an_unconfirmed_send_without_a_status_goes_again_only_after_the_wait,
    a_crafted_message_send_for_no_stored_message_sends_nothing,
    an_image_reported_failed_as_unusable_goes_again_as_a_document,
);

/// Meta redelivers a message it already delivered, in one batch with new ones: the seen one is
/// a duplicate, the new ones are handled, in order, once each.
async fn a_batch_mixing_a_seen_message_with_new_ones_handles_only_the_new(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (app, graph) = (&w.app, &w.graph);
    let first = say(&app, &graph, wa::text(ANA, "wamid.b1", "hi"), 1).await;
    assert!(first[0].starts_with("list:"), "{first:?}");
    let batch = wa::inbound(
        ANA,
        vec![
            wa::text(ANA, "wamid.b1", "hi"),
            wa::list_reply(ANA, "wamid.b2", "pack:corporate", "Corporate headshots"),
            wa::button_reply(ANA, "wamid.b3", "subject:man", "Man"),
        ],
    );
    let (status, report) = wa::post_webhook(&app, &batch).await;
    assert_eq!((status, report["messages"].as_i64(), &report["queued"]), (200, Some(3), &json!(true)), "{report}");
    let sends = graph.wait_for(3).await;
    quiesce(&app).await;
    let sends_after = graph.requests().await;
    assert_eq!(sends_after.len(), 3, "{:?}", sends_after.iter().map(wa::summary).collect::<Vec<_>>());
    assert!(wa::summary(&sends[1]).starts_with("buttons:"), "the subject question: {:?}", wa::summary(&sends[1]));
    let db = pg(&app).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'collecting_photos'").await, 1, "one order");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM processed_webhooks WHERE source = 'whatsapp'").await, 3);
}

on_both!(a_batch_mixing_a_seen_message_with_new_ones_handles_only_the_new);

/// Ana sends four selfies at once; Meta's deliveries land on two replicas, and her DONE races
/// the last selfie. Whatever the order the two replicas take them in, the result is one order
/// with distinct photo counters, stored photos matching the replies, and one Checkout session.
async fn four_selfies_at_once_on_two_replicas_with_done_racing_the_last_make_one_consistent_order(postgres: bool) {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let stripe = FakeStripe::start().await;
    let config = || ps::with_stripe(wa::bot_config(&graph, &redis, postgres), &stripe).var("max_photos", "4");
    let a = wa::spawn_bot(config(), &redis).await;
    let b = astria_tests::spawn_app(config().replica_of(&a)).await.unwrap();
    astria_tests::wait_for_subscribers_at(&redis.url(), "astria.messages", 2).await.unwrap();
    say(&a, &graph, wa::text(ANA, "wamid.r1", "hi"), 1).await;
    say(&b, &graph, wa::list_reply(ANA, "wamid.r2", "pack:corporate", "Corporate headshots"), 2).await;
    say(&a, &graph, wa::button_reply(ANA, "wamid.r3", "subject:man", "Man"), 3).await;

    async fn post(app: &TestApp, m: Value) -> u16 {
        wa::post_webhook(app, &wa::inbound(ANA, vec![m])).await.0
    }
    let selfie = |i: usize| wa::photo(ANA, &format!("wamid.selfie{i}"));
    let first = futures::future::join3(post(&a, selfie(0)), post(&b, selfie(1)), post(&a, selfie(2))).await;
    assert_eq!(first, (200, 200, 200));
    let done = wa::button_reply(ANA, "wamid.rdone", "done", "Done");
    let last = futures::future::join(post(&b, selfie(3)), post(&a, done)).await;
    assert_eq!(last, (200, 200));
    quiesce(&a).await;

    let db = pg(&a).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders").await, 1, "one order");
    let order = db.rows("SELECT id, status FROM orders", &[]).await;
    assert_eq!(order[0][1].text(), "awaiting_payment");
    let positions: Vec<i64> =
        db.rows("SELECT position FROM order_photos ORDER BY position", &[]).await.iter().map(|r| r[0].int()).collect();
    let stored = positions.len();
    assert!(stored == 3 || stored == 4, "DONE took three or four selfies: {positions:?}");
    assert_eq!(positions, (0..stored as i64).collect::<Vec<_>>(), "distinct counters, no gap");
    assert_eq!(stripe.sessions_created(), 1, "one Checkout session");
    let sends: Vec<String> = graph.requests().await.iter().map(wa::summary).collect();
    // "Got it (1/4)." for the first, "Got N photos. ..." after.
    let counter = |s: &String| {
        let n = s.strip_prefix("text:Got it (").or_else(|| s.strip_prefix("buttons:Got "))?;
        n.split(|c: char| !c.is_ascii_digit()).next()?.parse::<i64>().ok()
    };
    let mut counters: Vec<i64> = sends.iter().filter_map(counter).collect();
    counters.sort();
    assert_eq!(counters, (1..=stored as i64).collect::<Vec<_>>(), "one distinct counter per stored selfie: {sends:#?}");
    // The link once; a selfie that came after DONE is answered with the same link again, or
    // with "on its way" if the link was not made yet.
    let links: Vec<&String> = sends.iter().filter(|s| s.starts_with("text:Pay securely here:")).collect();
    let on_its_way = sends.iter().filter(|s| *s == "text:Your payment link is on its way.").count();
    assert!(!links.is_empty(), "{sends:#?}");
    assert_eq!(links.len() + on_its_way, 1 + 4 - stored, "{sends:#?}");
    assert!(links.iter().all(|l| *l == links[0]), "one session's link: {links:?}");
    // Three steps, a reply to each selfie (a counter, or for one that came after DONE the
    // payment reminder), DONE's answer and the link.
    assert_eq!(sends.len(), 3 + 4 + 1 + 1, "{sends:#?}");
}

on_both!(four_selfies_at_once_on_two_replicas_with_done_racing_the_last_make_one_consistent_order);

/// Tracing is best effort: with the collector refusing spans (503) or not there at all, the
/// webhook still answers, the reply still goes out once, and the log says the spans were
/// dropped (under the trace id of the work they describe).
#[tokio::test]
async fn with_the_collector_down_or_refusing_the_replies_still_go_once() {
    let refusing = astria_tests::fakes::fake_server().await;
    astria_tests::fakes::Mock::given(astria_tests::fakes::matchers::path("/v1/traces"))
        .respond_with(astria_tests::fakes::ResponseTemplate::new(503))
        // Spans were offered to it (verified when the server is dropped).
        .expect(1..)
        .mount(&refusing)
        .await;
    let closed = format!("http://127.0.0.1:{}", astria_tests::free_port());
    for (collector, says) in [(refusing.uri(), "the collector answered 503"), (closed, "spans dropped")] {
        let redis = TestRedis::start().await.unwrap();
        let graph = FakeGraph::start().await;
        let config = wa::bot_config(&graph, &redis, false)
            .var("otel_traces_enabled", "true")
            .var("otel_collector_url", collector.as_str());
        let app = wa::spawn_bot(config, &redis).await;
        let (status, _) = wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.t1", "hi")])).await;
        assert_eq!(status, 200, "{collector}");
        graph.wait_for(1).await;
        quiesce(&app).await;
        assert_eq!(graph.requests().await.len(), 1, "one reply with {collector}");
        // A component exports its spans when its work is done, so the line can come after
        // the database went quiet: wait for it.
        let dropped: Vec<Value> = app
            .wait_until(&format!("a trace.export line saying {says:?}"), Duration::from_secs(20), || async {
                // Whole log lines that parse, only: half a line has the words looked for but
                // not yet its trace id, and Spin may pass on two instances' output interleaved
                // within a line (seen under Spin 4.0.2), which is no one's line. (devhost wraps
                // each guest line in its own log line.)
                let lines: Vec<Value> = app
                    .log_lines()
                    .iter()
                    .filter_map(|l| {
                        let (start, end) = (l.find('{')?, l.rfind('}')?);
                        serde_json::from_str::<Value>(l.get(start..=end)?).ok()
                    })
                    .filter(|l| {
                        l["target"] == "trace.export" && l["message"].as_str().is_some_and(|m| m.contains(says))
                    })
                    .collect();
                (!lines.is_empty()).then_some(lines)
            })
            .await;
        assert!(dropped.iter().all(|l| l["trace_id"].as_str().is_some_and(|t| t.len() == 32)), "{dropped:#?}");
    }
    assert!(!refusing.received_requests().await.unwrap_or_default().is_empty(), "the refusing collector was asked");
}

/// A refused webhook (unsigned, forged, a wrong method) exports no span: anyone can send
/// those, and each export would be a request to the collector. A signed one does. An
/// instance exports before its answer leaves, so the collector's count is final when the
/// answer arrives.
#[tokio::test]
async fn refused_webhooks_export_no_spans_and_a_signed_one_does() {
    let collector = astria_tests::fakes::fake_server().await;
    astria_tests::fakes::Mock::given(astria_tests::fakes::matchers::path("/v1/traces"))
        .respond_with(astria_tests::fakes::ResponseTemplate::new(200))
        .mount(&collector)
        .await;
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let config = wa::bot_config(&graph, &redis, false)
        .var("otel_traces_enabled", "true")
        .var("otel_collector_url", collector.uri().as_str());
    let app = wa::spawn_bot(config, &redis).await;
    let exports = || async { collector.received_requests().await.unwrap_or_default().len() };
    assert_eq!(exports().await, 0, "nothing ran yet");
    let body = serde_json::to_vec(&wa::inbound(ANA, vec![wa::text(ANA, "wamid.x1", "hi")])).unwrap();
    let forged = wa::sign("not the app secret", &body);
    for (method, signature, expect) in [
        (reqwest::Method::POST, None, 401),
        (reqwest::Method::POST, Some(forged.as_str()), 401),
        (reqwest::Method::PUT, None, 400),
    ] {
        let mut req = app.client.request(method.clone(), app.url("/SmsReceived")).body(body.clone());
        if let Some(signature) = signature {
            req = req.header("x-hub-signature-256", signature);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), expect, "{method} {signature:?}");
        assert_eq!(exports().await, 0, "{method} {signature:?} exported spans");
    }
    let (status, _) = wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.x1", "hi")])).await;
    assert_eq!(status, 200);
    assert!(exports().await >= 1, "the signed webhook exported its spans");
}

/// The reply's send event dies in the dead letters while the sender cannot act on it (here: a
/// stale contact lease holds the sender back; in production, a sender down or failing past the
/// relay's attempts). Nothing would wake the sender for that message again, and the contact's
/// queue would stall behind it: the relay hands the event back, and the reply goes, once.
async fn a_reply_whose_send_event_died_is_handed_back_by_the_relay_and_sent_once(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (app, graph) = (&w.app, &w.graph);
    assert!(wa::relay(app).await["republished"].is_number(), "the schema is in place");
    let db = pg(app).await;
    let until = wa::unix_now() * 1000 + 600_000;
    db.execute(
        "INSERT INTO send_leases (wa_id, holder, lease_until) VALUES ($1, 'a-dead-sender', $2)",
        &[ANA.into(), until.into()],
    )
    .await;
    let (status, _) = wa::post_webhook(app, &wa::inbound(ANA, vec![wa::text(ANA, "wamid.d1", "hi")])).await;
    assert_eq!(status, 200);
    wa::worked_through(app).await;
    let queued = "SELECT COUNT(*) FROM outbound_messages WHERE status = 'queued'";
    assert_eq!(count(&db, queued).await, 1);
    // The relay gave up on its event (as after relay_max_attempts publishes nobody completed).
    db.execute("UPDATE outbox SET status = 'dead', last_error = 'not completed after 8 attempts' WHERE event_type = 'message.send'", &[])
        .await;
    // Handed back while the lease still holds the sender off, so the count is certain.
    let report = wa::relay(app).await;
    assert_eq!(report["sends_revived"], 1, "{report}");
    db.execute("DELETE FROM send_leases WHERE wa_id = $1", &[ANA.into()]).await;
    // As the every-minute relay would once its backoff has passed.
    w.wait_until("the reply sent, relaying", Duration::from_secs(30), || async {
        if !graph.requests().await.is_empty() {
            return Some(());
        }
        db.execute("UPDATE outbox SET next_attempt_at = 0 WHERE status <> 'done'", &[]).await;
        wa::relay(app).await;
        None
    })
    .await;
    let sends = graph.wait_for(1).await;
    quiesce(app).await;
    assert_eq!(graph.requests().await.len(), 1, "sent once: {sends:?}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbound_messages WHERE status = 'sent'").await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox WHERE status = 'dead'").await, 0);
}

on_both!(a_reply_whose_send_event_died_is_handed_back_by_the_relay_and_sent_once);

// ------------------------------------------------------------------ the inbox

const BEA: &str = "4915187654321";

/// The webhook without its worker (the worker SpinApp down, or not yet scaled up): every signed
/// webhook is answered 200 and waits in the inbox, nothing is stepped. Once a worker runs and
/// the relay wakes it, each contact's messages are stepped in the order they arrived: Ana's
/// STOP comes after her "hi" and before her "menu", so she gets the pack list and the STOP
/// confirmation and nothing for "menu" and "help"; Bea, interleaved, gets her pack list.
async fn webhooks_wait_in_the_inbox_without_a_worker_and_are_stepped_in_arrival_order(postgres: bool) {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let stripe = FakeStripe::start().await;
    let astria = astria_tests::astria::FakeAstria::start().await;
    let config = || astria_tests::astria::bot_config(&graph, &redis, &stripe, &astria, postgres);
    let mut edge = config();
    edge.components = vec!["message-service".into(), "maintenance-service".into()];
    let app = astria_tests::spawn_app(edge).await.unwrap();
    assert!(wa::relay(&app).await["republished"].is_number(), "the schema is in place");

    let arrivals = [
        (ANA, wa::text(ANA, "in.1", "hi")),
        (BEA, wa::text(BEA, "in.2", "hi")),
        (ANA, wa::text(ANA, "in.3", "STOP")),
        (ANA, wa::text(ANA, "in.4", "menu")),
        (ANA, wa::text(ANA, "in.5", "help")),
    ];
    for (from, m) in &arrivals {
        let (status, answer) = wa::post_webhook(&app, &wa::inbound(from, vec![m.clone()])).await;
        assert_eq!((status, &answer["queued"], &answer["messages"]), (200, &json!(true), &json!(1)), "{answer}");
    }
    let db = pg(&app).await;
    let inbox = TestDb::inbox_of(&app).await;
    assert_eq!(count(&inbox, "SELECT COUNT(*) FROM inbox").await, 5, "every webhook waits, durable");
    for table in ["processed_webhooks", "contacts", "outbound_messages"] {
        assert_eq!(count(&db, &format!("SELECT COUNT(*) FROM {table}")).await, 0, "{table}: nothing stepped");
    }

    // A worker SpinApp starts; the relay (the every-minute job) wakes it for what waits.
    let worker = config().split(&[("worker", &["conversation-worker", "message-sender"])], Duration::from_secs(1));
    let _worker = astria_tests::spawn_app(worker.replica_of(&app)).await.unwrap();
    assert_eq!(wa::relay(&app).await["inbox_waiting"], 5);
    wa::worked_through(&app).await;
    graph.wait_for(2).await;
    quiesce(&app).await;
    let sends = graph.requests().await;
    let to = |who: &str| sends.iter().filter(|s| s["to"] == who).map(wa::summary).collect::<Vec<_>>();
    // Stepped in order, Ana's "hi" queued the pack list, then her STOP held it back (all five
    // were stepped before the sender got to her) and queued its confirmation, the one message
    // an opted-out contact gets; "menu" and "help", after STOP, queued nothing.
    assert_eq!(to(ANA), ["text:You won't receive more messages. Reply START to resume."]);
    // Every message queued: Ana's held list and STOP confirmation, Bea's list.
    let all = "SELECT kind || ':' || status FROM outbound_messages ORDER BY kind, status";
    let rows: Vec<String> = db.rows(all, &[]).await.iter().map(|r| r[0].text()).collect();
    assert_eq!(rows, ["list:held", "list:sent", "text:sent"], "in arrival order, STOP before menu and help");
    let bea = to(BEA);
    assert!(bea.len() == 1 && bea[0].starts_with("list:"), "{bea:#?}");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM processed_webhooks").await, 5, "each message stepped once");
}

on_both!(webhooks_wait_in_the_inbox_without_a_worker_and_are_stepped_in_arrival_order);

/// A stored body the worker can never work through (here: not JSON, as only a bug or a hand
/// could leave) is set aside for operators, and the webhooks behind it are stepped: one bad
/// row does not stall every customer.
async fn an_inbox_row_that_cannot_be_worked_through_is_set_aside_and_the_rest_go_on(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (app, graph) = (&w.app, &w.graph);
    assert!(wa::relay(app).await["republished"].is_number(), "the schema is in place");
    let inbox = TestDb::inbox_of(app).await;
    inbox
        .execute("INSERT INTO inbox (id, body, request_id, received_at) VALUES ('bad', 'not json', 'req-bad', 1)", &[])
        .await;
    say(app, graph, wa::text(ANA, "wamid.after-bad", "hi"), 1).await;
    wa::worked_through(app).await;
    assert_eq!(count(&inbox, "SELECT COUNT(*) FROM inbox WHERE id = 'bad' AND set_aside_at IS NOT NULL").await, 1);
    assert!(app.log().contains("webhook bad set aside"), "operators are told:\n{}", app.log());
    let (status, text) = app.metrics(wa::ADMIN_TOKEN).await;
    assert_eq!(status, 200);
    assert!(text.contains("\nastria_inbox_set_aside 1\n"), "{text}");
    assert!(text.contains("\nastria_inbox_waiting 0\n"), "{text}");
    astria_tests::quiet::quiesce_with(app, astria_tests::quiet::Quiet { dead_ok: true, ..Default::default() }).await;
    assert_eq!(graph.requests().await.len(), 1);
}

on_both!(an_inbox_row_that_cannot_be_worked_through_is_set_aside_and_the_rest_go_on);

/// An upgrade on SQLite, where the inbox now has a file of its own: a webhook the previous
/// release stored in the app's database is worked through ahead of the new release's, and
/// once. The state directory holds the app's file as release 20 left it, with Ana's "hi"
/// waiting in its inbox; the new release's first webhook (her pack choice) finds no inbox
/// file, migrates, moves the old row over ahead of its own, and both are stepped in arrival
/// order: she gets the pack list, then the subject question. A row found in the old place
/// later (a move cut short) is moved over by the relay and worked through too.
#[tokio::test]
async fn an_upgrade_works_through_what_the_previous_release_left_in_the_inbox_sqlite() {
    use astria_store::Db;
    let state = tempfile::tempdir().unwrap();
    let body =
        |from: &str, id: &str| serde_json::to_string(&wa::inbound(from, vec![wa::text(from, id, "hi")])).unwrap();
    let insert =
        |table: &str| format!("INSERT INTO {table} (id, body, request_id, received_at) VALUES (?1, ?2, 'old', ?3)");
    {
        let db = astria_store::native::Sqlite::open(&state.path().join("sqlite_db.db")).unwrap();
        astria_store::migrations::migrate_up_to(&db, 20, 0).unwrap();
        let row = [astria_store::Value::from("upgrade.1"), body(ANA, "upgrade.1").into(), astria_store::Value::Int(1)];
        db.execute(&insert("inbox"), &row).unwrap();
    }
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let mut config = wa::bot_config(&graph, &redis, false);
    config.state_dir = Some(state.path().to_path_buf());
    let app = wa::spawn_bot(config, &redis).await;
    let choice = wa::list_reply(ANA, "upgrade.2", "pack:corporate", "Corporate headshots");
    let (status, answer) = wa::post_webhook(&app, &wa::inbound(ANA, vec![choice])).await;
    assert_eq!(status, 200, "{answer}");
    wa::worked_through(&app).await;
    let got: Vec<String> = graph.wait_for(2).await.iter().map(wa::summary).collect();
    assert!(got.len() == 2 && got[0].starts_with("list:") && got[1].starts_with("buttons:"), "in order: {got:#?}");
    let db = pg(&app).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM inbox_legacy").await, 0, "moved over");

    // Bea's "hi", as a move cut short would leave it: the relay moves it and wakes a worker.
    db.execute(&insert("inbox_legacy"), &["upgrade.3".into(), body(BEA, "upgrade.3").into(), 2i64.into()]).await;
    let relay = wa::relay(&app).await;
    assert_eq!(relay["inbox_adopted"], 1, "{relay}");
    wa::worked_through(&app).await;
    let sends = graph.wait_for(3).await;
    assert!(sends.iter().any(|s| s["to"] == BEA && wa::summary(s).starts_with("list:")), "{sends:#?}");
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 3, "each answered once");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM processed_webhooks").await, 3);
}

/// A batch of waiting webhooks is worked through as one transaction on PostgreSQL (one commit
/// for ten steps), each step seeing the ones before it (a contact's second message answers to
/// its first); should a row fail in it, the batch is worked step by step instead, so the good
/// rows go on and the bad one is set aside. On SQLite every step has its own transaction.
/// The webhooks wait while the test holds the drain lease, so they form one batch; the relay
/// wakes the worker once it is let go.
async fn a_batch_is_worked_in_one_transaction_on_postgres_and_step_by_step_when_a_row_fails(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (app, graph) = (&w.app, &w.graph);
    assert!(wa::relay(app).await["republished"].is_number(), "the schema is in place");
    let (db, inbox) = (pg(app).await, TestDb::inbox_of(app).await);
    let hold = "INSERT INTO job_leases (name, holder, lease_until) VALUES ('inbox', 'test', 99999999999999)";
    let let_go = "DELETE FROM job_leases WHERE name = 'inbox'";
    let transactions =
        |ids: &str| format!("SELECT COUNT(DISTINCT xmin::text) FROM processed_webhooks WHERE external_id LIKE '{ids}'");

    inbox.execute(hold, &[]).await;
    let contacts: Vec<String> = (0..5).map(|c| format!("49171{c:07}")).collect();
    for (c, from) in contacts.iter().enumerate() {
        for m in [
            wa::text(from, &format!("group.{c}.1"), "hi"),
            wa::list_reply(from, &format!("group.{c}.2"), "pack:corporate", "Corporate headshots"),
        ] {
            let (status, answer) = wa::post_webhook(app, &wa::inbound(from, vec![m])).await;
            assert_eq!((status, answer["queued"].as_bool()), (200, Some(true)), "{answer}");
        }
    }
    inbox.execute(let_go, &[]).await;
    wa::relay(app).await;
    wa::worked_through(app).await;
    let sends = graph.wait_for(10).await;
    for from in &contacts {
        let got: Vec<String> = sends.iter().filter(|s| s["to"] == from.as_str()).map(wa::summary).collect();
        assert_eq!(got.len(), 2, "{from}: {got:#?}");
        assert!(got[0].starts_with("list:") && got[1].starts_with("buttons:"), "{from}: in order: {got:#?}");
    }
    if postgres {
        assert_eq!(count(&db, &transactions("group.%")).await, 1, "ten steps, one transaction");
    }

    // A row that cannot be worked through, first in the next batch.
    inbox.execute(hold, &[]).await;
    inbox
        .execute("INSERT INTO inbox (id, body, request_id, received_at) VALUES ('bad', 'not json', 'req-bad', 1)", &[])
        .await;
    for c in 0..3 {
        let from = format!("49172{c:07}");
        let (status, _) =
            wa::post_webhook(app, &wa::inbound(&from, vec![wa::text(&from, &format!("after.{c}"), "hi")])).await;
        assert_eq!(status, 200);
    }
    inbox.execute(let_go, &[]).await;
    wa::relay(app).await;
    wa::worked_through(app).await;
    graph.wait_for(13).await;
    assert_eq!(count(&inbox, "SELECT COUNT(*) FROM inbox WHERE id = 'bad' AND set_aside_at IS NOT NULL").await, 1);
    if postgres {
        assert_eq!(count(&db, &transactions("after.%")).await, 3, "step by step after the batch failed");
    }
    astria_tests::quiet::quiesce_with(app, astria_tests::quiet::Quiet { dead_ok: true, ..Default::default() }).await;
    assert_eq!(graph.requests().await.len(), 13, "each answer once");
}

on_both!(a_batch_is_worked_in_one_transaction_on_postgres_and_step_by_step_when_a_row_fails);

/// A webhook that finds another webhook's wake-up pending publishes none, and its message is
/// stepped by the drain that wake-up brings; that drain's release clears the wake-up, so a
/// webhook after it would publish again. Seen on the Redis channel the workers listen on: a
/// wake-up carries its webhook's request id, and a webhook publishes before it answers, so
/// one the first webhook published would arrive first. (`astria_store::inbox::accept` says
/// why no row is left behind; the store's contract tests race it against a release.)
async fn a_webhook_wakes_no_worker_while_another_webhooks_wake_up_is_pending(postgres: bool) {
    let w = World::start(Options::on(postgres)).await;
    let (app, graph) = (&w.app, &w.graph);
    assert!(wa::relay(app).await["republished"].is_number(), "the schema is in place");
    let inbox = TestDb::inbox_of(app).await;
    let client = redis::Client::open(w.redis.url()).unwrap();
    let mut wakes = client.get_async_pubsub().await.unwrap();
    wakes.subscribe("astria.inbox").await.unwrap();
    let pending = "SELECT COUNT(*) FROM job_leases WHERE name = 'inbox_wake'";

    // Another webhook's wake-up, on its way to a worker.
    inbox
        .execute(
            "INSERT INTO job_leases (name, holder, lease_until) VALUES ('inbox_wake', 'another-webhook', 99999999999999)",
            &[],
        )
        .await;
    let bea = "4915200000001";
    let (status, answer) =
        wa::post_webhook_as(app, &wa::inbound(ANA, vec![wa::text(ANA, "pending.1", "hi")]), Some("ana-hi")).await;
    assert_eq!((status, answer["queued"].as_bool()), (200, Some(true)), "{answer}");
    // It is lost on the way and lapses; Bea's webhook finds nobody coming and wakes a worker.
    inbox.execute("UPDATE job_leases SET lease_until = 0 WHERE name = 'inbox_wake'", &[]).await;
    let (status, answer) =
        wa::post_webhook_as(app, &wa::inbound(bea, vec![wa::text(bea, "pending.2", "hi")]), Some("bea-hi")).await;
    assert_eq!((status, answer["queued"].as_bool()), (200, Some(true)), "{answer}");
    let mut wakes = wakes.on_message();
    let first = tokio::time::timeout(Duration::from_secs(30), wakes.next()).await.expect("a wake-up").unwrap();
    let first: Value = serde_json::from_slice(first.get_payload_bytes()).unwrap();
    assert_eq!(first["correlation_id"], "bea-hi", "Ana's webhook counted on the pending wake-up: {first}");

    // The drain Bea's wake-up brought takes both, and its release clears the wake-up (a lapsed
    // one stays until then).
    let sends = graph.wait_for(2).await;
    let mut to: Vec<&str> = sends.iter().map(|s| s["to"].as_str().unwrap()).collect();
    to.sort();
    let mut both = vec![ANA, bea];
    both.sort();
    assert_eq!(to, both, "{sends:#?}");
    w.wait_until("the drain's release cleared the wake-up", Duration::from_secs(30), || async {
        (inbox.int(pending, &[]).await == 0).then_some(())
    })
    .await;
    quiesce(app).await;
    assert_eq!(graph.requests().await.len(), 2, "each answered once");
}

on_both!(a_webhook_wakes_no_worker_while_another_webhooks_wake_up_is_pending);

/// The bot under devhost logging every statement it runs (the budget tests below count them),
/// its schema in place.
async fn statements_traced(mut config: astria_tests::AppConfig, redis: &TestRedis) -> TestApp {
    config.env.insert(
        "DEVHOST_LOG".into(),
        "info,wasmtime_wasi_http=warn,devhost::sqlite=trace,devhost::postgres=trace".into(),
    );
    let app = wa::spawn_bot(config, redis).await;
    assert!(wa::relay(&app).await["republished"].is_number(), "the schema is in place");
    app
}

/// The statement budget of the webhook (issue 29's G5 allows 2), counted by devhost: at most
/// two statements per request on either database, whatever the request, because the
/// conversation step runs in the worker and one statement both stores the row and says whether
/// to wake a worker (on PostgreSQL a function's call, `astria_store::inbox::accept` says why);
/// the second claims the wake-up when no worker is draining or on its way. The
/// worker's statements are printed; the sender's must hold no read of a message's event.
async fn the_webhook_runs_at_most_two_statements_per_request_devhost_only(postgres: bool) {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let app = statements_traced(wa::bot_config(&graph, &redis, postgres), &redis).await;
    let kinds = wa::one_of_each_kind(ANA, "budget");
    let mut report = vec![];
    for (kind, body) in kinds {
        let mark = app.log().len();
        let (status, answer) = wa::post_webhook(&app, &body).await;
        assert_eq!(status, 200, "{kind}: {answer}");
        wa::worked_through(&app).await;
        // devhost logs each statement as it starts, so the request's are in by its answer.
        let log = app.log();
        let webhook = astria_tests::devhost_statements(&log[mark..], "message-service");
        assert!(!webhook.is_empty(), "{kind}: devhost logged the webhook's statements:\n{}", &log[mark..]);
        assert!(webhook.len() <= 2, "{kind}: the webhook ran {} statements: {webhook:#?}", webhook.len());
        let expected = if postgres { "SELECT astria_inbox_accept(" } else { "INSERT INTO inbox " };
        assert!(webhook[0].starts_with(expected), "{kind}: {webhook:?}");
        // The second, if any, claims the wake-up: no worker was draining or on its way.
        assert!(webhook[1..].iter().all(|s| s.starts_with("INSERT INTO job_leases ")), "{kind}: {webhook:?}");
        report.push(format!("{kind}: webhook {}", webhook.len()));
    }
    quiesce(&app).await;
    let worker = astria_tests::devhost_statements(&app.log(), "conversation-worker");
    eprintln!("statements per request: {report:?}; the worker's, in all: {}", worker.len());
    assert!(!worker.is_empty(), "the worker's statements were logged");
    // The sender sends each reply in a span of the trace that queued it, from the
    // `traceparent` the message's row keeps: it reads no event per message (issue 29).
    let sender = astria_tests::devhost_statements(&app.log(), "message-sender");
    assert!(!graph.requests().await.is_empty() && !sender.is_empty(), "the replies went out");
    let event_reads: Vec<&String> = sender.iter().filter(|s| s.contains("FROM outbox WHERE id =")).collect();
    assert!(event_reads.is_empty(), "the sender read its events: {event_reads:#?}");
}

on_both!(the_webhook_runs_at_most_two_statements_per_request_devhost_only);

/// The statement budget of a conversation step (issue 29's G5), counted by devhost: every
/// transaction the conversation worker runs for a message (from `BEGIN` to `COMMIT`: dedupe,
/// contact, state change, replies and their events) or for a status is at most 10
/// statements, for a new contact as for a known one. What the drain does around them (the
/// lease, reading a batch, marking its events published, removing its rows) is per batch, not
/// per step, and printed.
///
/// On PostgreSQL, where every statement is a round trip (two through Spin's host) parsed and
/// planned anew, the dedupe goes with the contact's read and each reply with its event, one
/// call each of a function that keeps its plans (migration 18): no step runs the dedupe or a
/// message's insert as a statement of its own. (Each webhook is worked
/// through before the next is sent, so a PostgreSQL batch, one transaction, is one step.)
async fn a_conversation_step_runs_at_most_ten_statements_devhost_only(postgres: bool) {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    // "Done" asks payment-checkout for a Checkout session.
    let stripe = FakeStripe::start().await;
    let app = statements_traced(ps::with_stripe(wa::bot_config(&graph, &redis, postgres), &stripe), &redis).await;
    let mut kinds = wa::one_of_each_kind(ANA, "steps");
    // The second photo, then "Done", which moves the order to payment: the busiest step.
    kinds.push(("second photo", wa::inbound(ANA, vec![wa::photo(ANA, "steps.6")])));
    kinds.push(("done", wa::inbound(ANA, vec![wa::button_reply(ANA, "steps.7", "done", "Done")])));
    for (kind, body) in &kinds {
        let (status, answer) = wa::post_webhook(&app, body).await;
        assert_eq!(status, 200, "{kind}: {answer}");
        wa::worked_through(&app).await;
    }
    quiesce(&app).await;
    let log = app.log();
    let steps = astria_tests::devhost_transactions(&log, "conversation-worker");
    let dedupe = |s: &String| {
        s.starts_with("INSERT INTO processed_webhooks") || s.starts_with("SELECT * FROM astria_recognise_first(")
    };
    let messages = steps.iter().filter(|t| t.iter().any(dedupe)).count();
    assert!(messages >= kinds.len() - 2, "each message's step was seen: {steps:#?}");
    let sizes: Vec<usize> = steps.iter().map(Vec::len).collect();
    eprintln!("statements per step: {sizes:?}");
    for t in &steps {
        assert!(t.len() <= 10, "a step ran {} statements:\n{}", t.len(), t.join("\n"));
        if postgres {
            let alone = t.iter().find(|s| {
                s.starts_with("INSERT INTO processed_webhooks") || s.starts_with("INSERT INTO outbound_messages")
            });
            assert!(alone.is_none(), "{alone:?} ran as a statement of its own:\n{}", t.join("\n"));
        }
    }
    if postgres {
        let merged = steps.iter().flatten().any(|s| s.starts_with("SELECT astria_queue_message("));
        assert!(merged, "a reply was queued with its event in one statement: {steps:#?}");
    }
    assert!(stripe.session_for_any().is_some(), "the walk reached payment:\n{log}");
    let outside =
        astria_tests::devhost_statements(&log, "conversation-worker").len() - steps.iter().map(Vec::len).sum::<usize>();
    eprintln!("statements outside steps, for {} webhooks: {outside}", kinds.len());
}

on_both!(a_conversation_step_runs_at_most_ten_statements_devhost_only);

/// The statement budget of a reply sent, counted by devhost: the sender's invocation for one
/// text reply (the open's one look at the schema's version and the journal mode, the stored
/// message read, the contact's lease taken and given back, the queue read before and after,
/// the contact's facts in one read, the booking with its event's completion) is 11 statements
/// on either database, down from 16 on PostgreSQL and 17 on SQLite. The sender runs one Redis
/// message at a time per process (Spin's trigger), so every statement of a send is on the path
/// of every reply after it. A text reads nothing only an image needs (the pace's last send,
/// the portrait's order), and an open of a file already in write-ahead-log mode switches
/// nothing.
async fn a_reply_is_sent_within_its_statement_budget_devhost_only(postgres: bool) {
    const BUDGET: usize = 11;
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let app = statements_traced(wa::bot_config(&graph, &redis, postgres), &redis).await;
    quiesce(&app).await;
    let mark = app.log().len();
    let (status, answer) = wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "send.1", "hi")])).await;
    assert_eq!(status, 200, "{answer}");
    app.wait_until("the reply to reach the Graph API", Duration::from_secs(30), || async {
        (!graph.requests().await.is_empty()).then_some(())
    })
    .await;
    quiesce(&app).await;
    assert_eq!(graph.requests().await.len(), 1, "one reply to \"hi\"");
    // The sender's invocations, each from its open's look at the schema; the reply's is the
    // one that booked a send (the others booked the heartbeats of the relay the quiescing
    // calls).
    let mut invocations: Vec<Vec<String>> = vec![];
    for statement in astria_tests::devhost_statements(&app.log()[mark..], "message-sender") {
        let opens = statement.contains("MAX(version) FROM schema_migrations");
        match invocations.last_mut() {
            Some(i) if !opens => i.push(statement),
            _ => invocations.push(vec![statement]),
        }
    }
    let all = invocations.clone();
    invocations.retain(|i| i.iter().any(|s| s.starts_with("UPDATE outbound_messages SET status")));
    let [sender] = invocations.as_slice() else { panic!("one invocation booked the reply: {all:#?}") };
    eprintln!("the sender's statements for one reply ({}):\n{}", sender.len(), sender.join("\n"));
    assert!(sender.len() <= BUDGET, "one reply took {} statements:\n{}", sender.len(), sender.join("\n"));
    let image_only = ["SELECT MAX(sent_at)", "SELECT order_id FROM generated_images"];
    let read: Vec<&String> = sender.iter().filter(|s| image_only.iter().any(|i| s.starts_with(i))).collect();
    assert!(read.is_empty(), "a text reply read what only an image needs: {read:#?}");
    let switch: Vec<&String> = sender.iter().filter(|s| s.starts_with("PRAGMA journal_mode")).collect();
    assert!(switch.is_empty(), "an open switched a file already in write-ahead-log mode: {switch:#?}");
}

on_both!(a_reply_is_sent_within_its_statement_budget_devhost_only);

/// Spin opens SQLite with the rollback journal; the app switches its files (the app's and the
/// inbox's) to the write-ahead log on the open that finds them not switched yet (one look at
/// the schema and the journal mode per open, `astria_store::migrations::open_state`), under
/// devhost as under Spin. The mode is stored in the file.
#[tokio::test]
async fn the_apps_sqlite_files_are_switched_to_the_write_ahead_log_sqlite() {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let app = wa::spawn_bot(wa::bot_config(&graph, &redis, false), &redis).await;
    let (status, answer) = wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "wal.1", "hi")])).await;
    assert_eq!(status, 200, "{answer}");
    wa::worked_through(&app).await;
    app.wait_until("the reply to reach the Graph API", Duration::from_secs(30), || async {
        (!graph.requests().await.is_empty()).then_some(())
    })
    .await;
    quiesce(&app).await;
    assert_eq!(TestDb::of(&app).await.text("PRAGMA journal_mode", &[]).await, "wal", "the app's database");
    assert_eq!(TestDb::inbox_of(&app).await.text("PRAGMA journal_mode", &[]).await, "wal", "the inbox's");
}

/// Ten contacts walk the first three steps (hi, a pack, a subject) at once, each contact's
/// messages one after the other, half of them through each of two replicas, each of which runs
/// a conversation worker. Every contact gets the three answers in the order of the conversation
/// (a step taken out of order answers differently), each once, and no webhook waits for the
/// relay: nothing here calls it until every answer has come.
async fn contacts_writing_at_once_to_two_replicas_are_each_stepped_in_order_without_the_relay(postgres: bool) {
    let w = World::start(Options::on(postgres).replicas(2)).await;
    let (app, graph) = (&w.app, &w.graph);
    let walks = (0..10).map(|c| {
        let from = format!("49161{c:07}");
        let target = if c % 2 == 0 { app } else { &w.replicas[0] };
        async move {
            let steps = [
                wa::text(&from, &format!("walk.{c}.1"), "hi"),
                wa::list_reply(&from, &format!("walk.{c}.2"), "pack:corporate", "Corporate headshots"),
                wa::button_reply(&from, &format!("walk.{c}.3"), "subject:woman", "Woman"),
            ];
            for m in steps {
                let (status, answer) = wa::post_webhook(target, &wa::inbound(&from, vec![m])).await;
                assert_eq!(status, 200, "{answer}");
            }
        }
    });
    futures::future::join_all(walks).await;
    let sends = graph.wait_for(30).await;
    assert_eq!(sends.len(), 30, "{}", app.log());
    quiesce(app).await;
    assert_eq!(graph.requests().await.len(), 30, "each answer once");
    for c in 0..10 {
        let to = format!("49161{c:07}");
        let got: Vec<String> = sends.iter().filter(|s| s["to"] == to.as_str()).map(wa::summary).collect();
        assert_eq!(got.len(), 3, "{to}: {got:#?}");
        assert!(got[0].starts_with("list:"), "{to}: {got:#?}");
        assert!(got[1].starts_with("buttons:"), "{to}: {got:#?}");
        assert!(got[2].starts_with("text:"), "{to}: the photo request last: {got:#?}");
    }
}

on_both!(contacts_writing_at_once_to_two_replicas_are_each_stepped_in_order_without_the_relay);
