//! payment-service through the whole app (devhost, PostgreSQL, a Redis of the test's own)
//! against a fake Stripe API and a fake Graph API: Checkout links made once, the signed
//! webhook settling each order once, refunds and unknown orders flagged, and outages.

use std::time::Duration;

use astria_tests::db::TestDb;
use astria_tests::quiet::{quiesce_with, Quiet};
use astria_tests::stripe::{self as ps, FakeStripe};
use astria_tests::whatsapp::{self as wa, FakeGraph};
use astria_tests::{on_both, TestApp, TestRedis};
use futures::StreamExt;
use serde_json::{json, Value};

const ANA: &str = "4915112345678";

struct Bot {
    app: TestApp,
    graph: FakeGraph,
    stripe: FakeStripe,
    redis: TestRedis,
}

/// The components of spin.toml these tests run: all but the image-trainer.
const PAYMENT_WORLD: &[&str] = &[
    "message-service",
    "conversation-worker",
    "message-sender",
    "payment-service",
    "payment-checkout",
    "image-service",
    "maintenance-service",
];

async fn bot_with(stripe: FakeStripe) -> Bot {
    bot_with_vars(stripe, &[]).await
}

async fn bot_with_vars(stripe: FakeStripe, vars: &[(&str, &str)]) -> Bot {
    bot_on(true, stripe, vars).await
}

/// The payment world on SQLite (`postgres` false) or PostgreSQL.
async fn bot_on(postgres: bool, stripe: FakeStripe, vars: &[(&str, &str)]) -> Bot {
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    // What is flagged, and how, is this file's; that flagged money goes back by itself is
    // refund.rs's (auto_refund on): here the issues stay for the assertions to read.
    let base = ps::with_stripe(wa::bot_config(&graph, &redis, postgres), &stripe).var("auto_refund", "false");
    let config = vars.iter().fold(base, |c, (k, v)| c.var(k, *v));
    // Payments only: the image worker (which takes paid orders on to Astria) is another
    // SpinApp's and is left out, so that a paid order stays `paid` for these assertions.
    let config =
        astria_tests::AppConfig { components: PAYMENT_WORLD.iter().map(|c| c.to_string()).collect(), ..config };
    let app = wa::spawn_bot(config, &redis).await;
    astria_tests::wait_for_subscribers_at(&redis.url(), "astria.payments", 1).await.unwrap();
    Bot { app, graph, stripe, redis }
}

async fn bot() -> Bot {
    bot_with(FakeStripe::start().await).await
}

/// Waits until the payment world has nothing left to do (`order.paid` has no consumer here).
async fn quiet(bot: &Bot) {
    let q = Quiet { ignore_event_types: &["order.paid"], ..Default::default() };
    quiesce_with(&bot.app, q).await;
}

/// The app's database (SQLite or PostgreSQL, whichever it runs on).
async fn db(app: &TestApp) -> TestDb {
    TestDb::of(app).await
}

async fn count(db: &TestDb, sql: &str) -> i64 {
    db.count(sql).await
}

async fn order_status(db: &TestDb, id: &str) -> String {
    db.order_status(id).await
}

/// Ana orders the corporate pack and sends two photos (five replies so far).
async fn to_photos(bot: &Bot) {
    let steps = [
        wa::text(ANA, "p1", "hi"),
        wa::list_reply(ANA, "p2", "pack:corporate", "Corporate headshots"),
        wa::button_reply(ANA, "p3", "subject:man", "Man"),
        wa::image(ANA, "p4", &"a".repeat(64)),
        wa::image(ANA, "p5", &"b".repeat(64)),
    ];
    for (i, m) in steps.into_iter().enumerate() {
        assert_eq!(wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![m])).await.0, 200);
        bot.graph.wait_for(i + 1).await;
    }
}

/// ... and taps DONE (six replies so far).
async fn to_done(bot: &Bot) {
    to_photos(bot).await;
    assert_eq!(
        wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![wa::button_reply(ANA, "p6", "done", "Done")])).await.0,
        200
    );
    bot.graph.wait_for(6).await;
}

/// Ana orders the corporate pack with two photos and taps DONE; answers the order id once
/// the payment link has reached her (the 8th message).
async fn order_to_payment_link(bot: &Bot) -> (String, Value) {
    to_done(bot).await;
    let sends = bot.graph.wait_for(7).await;
    assert_eq!(sends.len(), 7, "{sends:#?}\n{}", bot.app.log());
    let session = bot.stripe.session_for_any().expect("one session");
    let url = session["url"].as_str().unwrap();
    assert_eq!(wa::summary(&sends[6]), format!("text:Pay securely here: {url}"));
    (session["client_reference_id"].as_str().unwrap().to_string(), session)
}

fn completed(session: &Value, amount: i64, currency: &str, status: &str) -> Value {
    ps::session(
        session["id"].as_str().unwrap(),
        session["client_reference_id"].as_str().unwrap(),
        amount,
        currency,
        status,
    )
}

async fn admin_get(app: &TestApp, path: &str) -> Value {
    app.call("GET", path, Some(wa::ADMIN_TOKEN), None).await.1
}

#[tokio::test]
async fn the_checkout_session_carries_the_order_and_is_created_once_when_the_step_runs_three_times_postgres() {
    // Stripe answers slowly, so that deliveries of the same event overlap at Stripe. A Spin
    // process handles one message at a time, so overlap comes from replicas: three processes
    // subscribe to astria.payments, and pub/sub hands each of them every message.
    let bot = bot_with(FakeStripe::start_with_delay(Duration::from_millis(400)).await).await;
    let config = || ps::with_stripe(wa::bot_config(&bot.graph, &bot.redis, false), &bot.stripe).replica_of(&bot.app);
    let _replicas =
        [astria_tests::spawn_app(config()).await.unwrap(), astria_tests::spawn_app(config()).await.unwrap()];
    astria_tests::wait_for_subscribers_at(&bot.redis.url(), "astria.payments", 3).await.unwrap();
    to_done(&bot).await;
    // While the deliveries wait for Stripe, the same event arrives twice more (the relay): the
    // outbox row, published as is.
    let db = db(&bot.app).await;
    let envelope = db.text("SELECT envelope FROM outbox WHERE event_type = 'order.awaiting_payment'", &[]).await;
    let client = redis::Client::open(bot.redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    for _ in 0..2 {
        let _: i64 = redis::cmd("PUBLISH").arg("astria.payments").arg(&envelope).query_async(&mut conn).await.unwrap();
    }
    let sends = bot.graph.wait_for(7).await;
    quiet(&bot).await;
    let requests = bot.stripe.requests();
    // The deliveries overlapped at Stripe (the step really ran more than once)...
    assert!(
        (2..=9).contains(&requests.len()),
        "{} create requests (3 replicas × 3 deliveries at most)",
        requests.len()
    );
    assert!(requests.iter().all(|r| r.idempotency_key == requests[0].idempotency_key), "one key per order");
    // ...and still one session, one link.
    assert_eq!(bot.stripe.sessions_created(), 1, "Stripe made one session");
    let links: Vec<String> =
        bot.graph.requests().await.iter().map(wa::summary).filter(|s| s.starts_with("text:Pay securely")).collect();
    assert_eq!(links.len(), 1, "one link: {links:?}");
    assert_eq!(wa::summary(&sends[6]), links[0]);

    let session = bot.stripe.session_for_any().unwrap();
    let order_id = session["client_reference_id"].as_str().unwrap();
    let form = &requests[0].form;
    assert_eq!(form["mode"], "payment");
    assert_eq!((form["client_reference_id"].as_str(), form["metadata[order_id]"].as_str()), (order_id, order_id));
    assert_eq!(form["line_items[0][price_data][unit_amount]"], "1999");
    assert_eq!(form["line_items[0][price_data][currency]"], "usd");
    assert_eq!(form["line_items[0][price_data][product_data][name]"], "Corporate headshots");
    assert_eq!(form["success_url"], format!("{}?text=STATUS", ps::CHAT_LINK));
    let expires: i64 = form["expires_at"].parse().unwrap();
    assert!((expires - ps::unix_now() - 3600).abs() < 120, "60 minutes ahead");
    let stored = db.one("SELECT checkout_session_id FROM orders", &[]).await.opt_text();
    assert_eq!(stored.as_deref(), session["id"].as_str());
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM outbox WHERE event_type = 'order.awaiting_payment' AND status = 'done'").await,
        1
    );
}

#[tokio::test]
async fn a_signed_completed_event_marks_the_order_paid_once_and_announces_order_paid_postgres() {
    let bot = bot().await;
    let (order_id, session) = order_to_payment_link(&bot).await;
    let client = redis::Client::open(bot.redis.url()).unwrap();
    let mut sub = client.get_async_pubsub().await.unwrap();
    sub.subscribe("astria.orders").await.unwrap();

    let event = ps::event("evt_1", "checkout.session.completed", completed(&session, 1999, "usd", "paid"));
    let body = serde_json::to_vec(&event).unwrap();
    let sig = ps::signature(&[ps::WEBHOOK_SECRET], ps::unix_now(), &body);
    // Ten deliveries, five of them at once.
    let burst = futures::future::join_all((0..5).map(|_| ps::post_signed(&bot.app, &body, &sig))).await;
    let mut results: Vec<String> =
        burst.iter().map(|(s, r)| format!("{s}:{}", r["result"].as_str().unwrap_or("?"))).collect();
    for _ in 0..5 {
        let (s, r) = ps::post_signed(&bot.app, &body, &sig).await;
        results.push(format!("{s}:{}", r["result"].as_str().unwrap_or("?")));
    }
    results.sort();
    let mut expected = vec!["200:duplicate".to_string(); 9];
    expected.push("200:paid".into());
    expected.sort();
    assert_eq!(results, expected);

    let msg = tokio::time::timeout(Duration::from_secs(10), sub.on_message().next()).await.unwrap().unwrap();
    let announced: Value = serde_json::from_slice(msg.get_payload_bytes()).unwrap();
    let payload: Value = serde_json::from_str(announced["payload"].as_str().unwrap()).unwrap();
    assert_eq!(
        (announced["event_type"].as_str(), payload["order_id"].as_str()),
        (Some("order.paid"), Some(order_id.as_str()))
    );
    assert_eq!(payload["payment_event_id"], "evt_1");

    let db = db(&bot.app).await;
    assert_eq!(order_status(&db, &order_id).await, "paid");
    let paid: (i64, String) = {
        let r = db.rows("SELECT paid_minor, paid_currency FROM orders", &[]).await;
        (r[0][0].int(), r[0][1].text())
    };
    assert_eq!(paid, (1999, "usd".to_string()));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox WHERE event_type = 'order.paid'").await, 1);
    let sends = bot.graph.wait_for(8).await;
    quiet(&bot).await;
    assert_eq!(bot.graph.requests().await.len(), 8, "one confirmation");
    assert!(wa::summary(&sends[7]).starts_with("text:Payment received"));

    // A late `expired` for the same session never moves the paid order back.
    let late = ps::event("evt_2", "checkout.session.expired", completed(&session, 1999, "usd", "unpaid"));
    assert_eq!(ps::post_event(&bot.app, &late).await.1["result"], "stale");
    assert_eq!(order_status(&db, &order_id).await, "paid");
}

#[tokio::test]
async fn a_payment_of_another_amount_is_not_accepted_and_is_flagged_for_refund_postgres() {
    let bot = bot().await;
    let (order_id, session) = order_to_payment_link(&bot).await;
    for (i, (amount, currency)) in [(500, "usd"), (1999, "eur")].into_iter().enumerate() {
        let event = ps::event(
            &format!("evt_bad{i}"),
            "checkout.session.completed",
            completed(&session, amount, currency, "paid"),
        );
        let (status, handled) = ps::post_event(&bot.app, &event).await;
        assert_eq!((status, handled["result"].as_str()), (200, Some("needs_refund")), "{handled}");
    }
    let db = db(&bot.app).await;
    assert_eq!(order_status(&db, &order_id).await, "awaiting_payment");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox WHERE event_type = 'order.paid'").await, 0);
    let issues = admin_get(&bot.app, "/maintenance/payment-issues").await;
    let list = issues["payment_issues"].as_array().unwrap();
    assert_eq!(list.len(), 2, "{issues}");
    assert!(list.iter().all(|i| i["kind"] == "needs_refund" && i["order_id"] == order_id.as_str()));
    let details: Vec<&str> = list.iter().map(|i| i["detail"].as_str().unwrap()).collect();
    assert!(details.contains(&"paid 5.00 USD, expected 19.99 USD"), "{details:?}");
    let sends = bot.graph.wait_for(9).await;
    assert!(wa::summary(&sends[7]).contains("couldn't match"));
}

#[tokio::test]
async fn forged_stale_and_malformed_webhooks_are_400_and_store_nothing_postgres() {
    let bot = bot().await;
    let (order_id, session) = order_to_payment_link(&bot).await;
    let body =
        serde_json::to_vec(&ps::event("evt_f", "checkout.session.completed", completed(&session, 1999, "usd", "paid")))
            .unwrap();
    let now = ps::unix_now();
    let bad = [
        ("no v1 at all", format!("t={now}")),
        ("another secret", ps::signature(&["whsec_other"], now, &body)),
        ("another body", ps::signature(&[ps::WEBHOOK_SECRET], now, b"{}")),
        // Well outside the 300 s tolerance both ways: the requests before it take time, and a
        // timestamp only 301 s ahead falls back inside the window once a second has passed.
        ("stale timestamp", ps::signature(&[ps::WEBHOOK_SECRET], now - 900, &body)),
        ("future timestamp", ps::signature(&[ps::WEBHOOK_SECRET], now + 900, &body)),
        ("garbage", "nonsense".to_string()),
    ];
    for (why, sig) in bad {
        let (status, r) = ps::post_signed(&bot.app, &body, &sig).await;
        assert_eq!(status, 400, "{why}: {r}");
    }
    let no_header = bot.app.client.post(bot.app.url("/payment-received")).body(body.clone()).send().await.unwrap();
    assert_eq!(no_header.status(), 400);
    let malformed = b"{not json";
    let (status, _) = ps::post_signed(&bot.app, malformed, &ps::signature(&[ps::WEBHOOK_SECRET], now, malformed)).await;
    assert_eq!(status, 400);

    let db = db(&bot.app).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM processed_webhooks WHERE source = 'stripe'").await, 0);
    assert_eq!(order_status(&db, &order_id).await, "awaiting_payment");

    // Secret rotation: an old and the current secret both sign; one valid v1 suffices.
    let (status, r) =
        ps::post_signed(&bot.app, &body, &ps::signature(&["whsec_old", ps::WEBHOOK_SECRET], now, &body)).await;
    assert_eq!((status, r["result"].as_str()), (200, Some("paid")));
}

#[tokio::test]
async fn an_expired_link_expires_the_order_and_pay_brings_a_new_link_postgres() {
    let bot = bot().await;
    let (order_id, session) = order_to_payment_link(&bot).await;
    let expired = ps::event("evt_e", "checkout.session.expired", completed(&session, 1999, "usd", "unpaid"));
    assert_eq!(ps::post_event(&bot.app, &expired).await.1["result"], "expired");
    let db = db(&bot.app).await;
    assert_eq!(order_status(&db, &order_id).await, "expired");
    let sends = bot.graph.wait_for(8).await;
    assert_eq!(
        wa::summary(&sends[7]),
        "text:Your payment link has expired. Reply PAY for a new one, or MENU to start over."
    );

    wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![wa::text(ANA, "p7", "PAY")])).await;
    let sends = bot.graph.wait_for(10).await;
    assert_eq!(sends.len(), 10, "{sends:#?}");
    assert_eq!(bot.stripe.sessions_created(), 2, "a new order, a new session");
    let new_order = db.text("SELECT id FROM orders WHERE status = 'awaiting_payment'", &[]).await;
    assert_ne!(new_order, order_id);
    let new_session = bot.stripe.session_for(&new_order).unwrap();
    assert_eq!(wa::summary(&sends[9]), format!("text:Pay securely here: {}", new_session["url"].as_str().unwrap()));
    assert_eq!(count(&db, &format!("SELECT COUNT(*) FROM order_photos WHERE order_id = '{new_order}'")).await, 2);

    // Paying the expired session's order is money to refund; the new one settles.
    let old = ps::event("evt_old", "checkout.session.completed", completed(&session, 1999, "usd", "paid"));
    assert_eq!(ps::post_event(&bot.app, &old).await.1["result"], "needs_refund");
    let new = ps::event("evt_new", "checkout.session.completed", completed(&new_session, 1999, "usd", "paid"));
    assert_eq!(ps::post_event(&bot.app, &new).await.1["result"], "paid");
}

/// PAY on an expired link makes a new order with the same photos, and with their age: photos
/// WhatsApp will have deleted before training get no new link (the money would only go back).
#[tokio::test]
async fn pay_after_the_link_expired_keeps_the_photos_age_postgres() {
    let bot = bot().await;
    let (_, session) = order_to_payment_link(&bot).await;
    let expired = ps::event("evt_e", "checkout.session.expired", completed(&session, 1999, "usd", "unpaid"));
    assert_eq!(ps::post_event(&bot.app, &expired).await.1["result"], "expired");
    bot.graph.wait_for(8).await;
    // Meanwhile the selfies have grown almost a week old.
    let db = db(&bot.app).await;
    let old = (ps::unix_now() - 6 * 24 * 3600 - 23 * 3600) * 1000;
    db.execute("UPDATE order_photos SET created_at = $1", &[old.into()]).await;

    wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![wa::text(ANA, "p7", "PAY")])).await;
    let too_old = "text:WhatsApp only keeps photos for 7 days and yours are nearly that old, so I can't use them. Reply MENU to start again with fresh selfies.";
    bot.app
        .wait_until("the customer told the photos are too old", Duration::from_secs(30), || async {
            bot.graph.requests().await.iter().map(wa::summary).any(|s| s == too_old).then_some(())
        })
        .await;
    // The checkout worker decided in the transaction that sent that text: no session, ever.
    assert_eq!(bot.stripe.sessions_created(), 1, "no new session for photos that will be gone");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM order_photos").await, 4, "the photos, copied to the new order");
    assert_eq!(count(&db, &format!("SELECT COUNT(*) FROM order_photos WHERE created_at <> {old}")).await, 0);
}

#[tokio::test]
async fn delayed_methods_wait_for_the_async_outcome_postgres() {
    let bot = bot().await;
    let (order_id, session) = order_to_payment_link(&bot).await;
    let db = db(&bot.app).await;
    let pending = ps::event("evt_u", "checkout.session.completed", completed(&session, 1999, "usd", "unpaid"));
    assert_eq!(ps::post_event(&bot.app, &pending).await.1["result"], "awaiting_async_payment");
    assert_eq!(order_status(&db, &order_id).await, "awaiting_payment");
    let ok = ps::event("evt_s", "checkout.session.async_payment_succeeded", completed(&session, 1999, "usd", "paid"));
    assert_eq!(ps::post_event(&bot.app, &ok).await.1["result"], "paid");
    // A failure reported after success (out of order) changes nothing.
    let failed =
        ps::event("evt_x", "checkout.session.async_payment_failed", completed(&session, 1999, "usd", "unpaid"));
    assert_eq!(ps::post_event(&bot.app, &failed).await.1["result"], "stale");
    assert_eq!(order_status(&db, &order_id).await, "paid");
}

#[tokio::test]
async fn unknown_orders_and_event_types_are_acknowledged_and_unknown_orders_recorded_postgres() {
    let bot = bot().await;
    let db = db(&bot.app).await;
    let ghost =
        ps::event("evt_g", "checkout.session.completed", ps::session("cs_ghost", "no-such-order", 1999, "usd", "paid"));
    assert_eq!(ps::post_event(&bot.app, &ghost).await, (200, json!({"event_id": "evt_g", "result": "unknown_order"})));
    let other =
        json!({"id": "evt_o", "object": "event", "type": "charge.refunded", "data": {"object": {"id": "ch_1"}}});
    assert_eq!(ps::post_event(&bot.app, &other).await.1["result"], "ignored");
    let issues = admin_get(&bot.app, "/maintenance/payment-issues").await;
    assert_eq!(issues["payment_issues"][0]["kind"], "unknown_order");
    assert_eq!(issues["payment_issues"][0]["session_id"], "cs_ghost");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders").await, 0);
}

#[tokio::test]
async fn with_the_database_down_the_webhook_answers_503_and_stripes_retry_succeeds_once_postgres() {
    let mut pg = astria_tests::postgres::TestPostgres::start().await.unwrap();
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let stripe = FakeStripe::start().await;
    let config = ps::with_stripe(wa::bot_config(&graph, &redis, false), &stripe);
    let app = wa::spawn_bot(pg.app_config(config, "astria_down").await.unwrap(), &redis).await;
    let event = ps::event("evt_db", "checkout.session.completed", ps::session("cs_x", "o-x", 1999, "usd", "paid"));
    assert_eq!(app.get("/health/payment").await.status(), 200);
    pg.stop();
    let (status, r) = ps::post_event(&app, &event).await;
    assert_eq!((status, r["error"].as_str()), (503, Some("database unavailable")));
    assert_eq!(app.get("/health/payment").await.status(), 503);
    pg.restart().await.unwrap();
    // The same running app takes Stripe's retry, once.
    assert_eq!(app.get("/health/payment").await.status(), 200);
    assert_eq!(ps::post_event(&app, &event).await.1["result"], "unknown_order");
    assert_eq!(ps::post_event(&app, &event).await.1["result"], "duplicate", "acted on once");
}

/// Ana goes from "hi" to DONE (the pets pack, two photos); her payment link is being made.
async fn to_done_with_relay(bot: &Bot) {
    let steps = [
        wa::text(ANA, "q1", "hi"),
        wa::text(ANA, "q2", "pets"),
        wa::image(ANA, "q3", &"a".repeat(64)),
        wa::image(ANA, "q4", &"b".repeat(64)),
        wa::text(ANA, "q5", "done"),
    ];
    for (i, m) in steps.into_iter().enumerate() {
        wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![m])).await;
        bot.graph.wait_for(i + 1).await;
    }
}

/// Calls the relay, with every pending event made due, until the link has gone out (or fails).
/// Rounds are 600 ms apart: the relay's real backoff is longer, but the event's eight attempts
/// must still outlast a slow Stripe answer (2.5 s below).
async fn relay_until_the_link(bot: &Bot) -> Vec<Value> {
    let db = db(&bot.app).await;
    for _ in 0..40 {
        if bot.graph.requests().await.len() >= 6 {
            break;
        }
        db.execute("UPDATE outbox SET next_attempt_at = 0 WHERE status <> 'done'", &[]).await;
        wa::relay(&bot.app).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    // A few more rounds: nothing further may go out.
    for _ in 0..3 {
        db.execute("UPDATE outbox SET next_attempt_at = 0 WHERE status <> 'done'", &[]).await;
        wa::relay(&bot.app).await;
    }
    quiet(&bot).await;
    let sends = bot.graph.requests().await;
    assert_eq!(sends.len(), 6, "{:#?}\n{}", sends.iter().map(wa::summary).collect::<Vec<_>>(), bot.app.log());
    assert!(wa::summary(&sends[5]).starts_with("text:Pay securely here: https://checkout.stripe.com/"));
    sends
}

async fn cancel_after_the_link_expires_the_session_so_the_old_link_cannot_be_paid(postgres: bool) {
    let bot = bot_on(postgres, FakeStripe::start().await, &[]).await;
    to_done_with_relay(&bot).await;
    let sends = bot.graph.wait_for(6).await;
    assert!(wa::summary(&sends[5]).starts_with("text:Pay securely here:"), "{:?}", wa::summary(&sends[5]));
    let session_id = bot.stripe.session_for_any().unwrap()["id"].as_str().unwrap().to_string();
    assert!(bot.stripe.can_pay(&session_id), "the link works before the cancel");

    assert_eq!(wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![wa::text(ANA, "q6", "cancel")])).await.0, 200);
    let db = db(&bot.app).await;
    bot.app
        .wait_until("the Checkout session expired at Stripe, relaying", Duration::from_secs(15), || async {
            if !bot.stripe.can_pay(&session_id) {
                return Some(());
            }
            wa::relay(&bot.app).await;
            None
        })
        .await;
    assert_eq!(bot.stripe.expire_calls(), vec![session_id.clone()], "expired once");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'cancelled'").await, 1);
    let sends = bot.graph.wait_for(7).await;
    assert!(wa::summary(&sends[6]).to_lowercase().contains("cancel"), "{:?}", wa::summary(&sends[6]));
    // The event is done: the relay does not expire it again.
    for _ in 0..3 {
        wa::relay(&bot.app).await;
    }
    quiet(&bot).await;
    assert_eq!(bot.stripe.expire_calls().len(), 1);
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM outbox WHERE event_type = 'checkout.expire' AND status = 'done'").await,
        1
    );
}

async fn replayed_stripe_failures_move_to_a_new_key_and_the_link_still_goes_out_once(postgres: bool) {
    let stripe = FakeStripe::start().await;
    // Stripe stores a first 500 (and 502) for its key and replays it to every retry with it.
    stripe.fail_next(vec![500, 502]);
    let bot = bot_on(postgres, stripe, &[]).await;
    to_done_with_relay(&bot).await;
    relay_until_the_link(&bot).await;
    let requests = bot.stripe.requests();
    let trail: Vec<(String, u16)> =
        requests.iter().map(|r| (r.idempotency_key.clone().unwrap_or_default(), r.status)).collect();
    let order = requests[0].form["client_reference_id"].clone();
    let key = |g: &str| format!("astria-checkout-{order}{g}");
    assert_eq!(
        trail,
        vec![(key(""), 500), (key(""), 500), (key("-g1"), 502), (key("-g1"), 502), (key("-g2"), 200)],
        "a replayed failure moves to the next key, once"
    );
    assert_eq!(bot.stripe.sessions_created(), 1);
    assert!(bot.app.log().contains("Stripe answered 500 (replayed)"), "the failure is logged");
    assert!(!bot.app.log().contains(ps::SECRET_KEY), "the key never is");
}

async fn a_stripe_answer_slower_than_the_timeout_is_fetched_again_with_the_same_key_and_parameters(postgres: bool) {
    let stripe = FakeStripe::start().await;
    // Stripe creates the session but answers after the client gave up.
    stripe.delay_next(vec![Duration::from_millis(2500)]);
    let bot = bot_on(postgres, stripe, &[("stripe_timeout_ms", "1000")]).await;
    to_done_with_relay(&bot).await;
    relay_until_the_link(&bot).await;
    let requests = bot.stripe.requests();
    assert!(requests.len() >= 2, "the first answer timed out: {requests:#?}");
    assert!(requests.iter().all(|r| r.idempotency_key == requests[0].idempotency_key), "one key");
    assert!(requests.iter().all(|r| r.form == requests[0].form), "identical parameters, expires_at included");
    assert_eq!(requests.last().unwrap().status, 200, "the stored session, replayed");
    assert_eq!(bot.stripe.sessions_created(), 1, "one session");
    let link = bot.graph.requests().await.iter().map(wa::summary).filter(|s| s.starts_with("text:Pay")).count();
    assert_eq!(link, 1, "one link");
}

#[tokio::test]
async fn photos_too_old_to_survive_until_training_get_no_payment_link_postgres() {
    let bot = bot().await;
    to_photos(&bot).await;
    // The selfies came almost a week ago (WhatsApp deletes media after 7 days).
    let db = db(&bot.app).await;
    let old = (ps::unix_now() - 6 * 24 * 3600 - 23 * 3600) * 1000;
    db.execute("UPDATE order_photos SET created_at = $1", &[old.into()]).await;
    wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![wa::button_reply(ANA, "p6", "done", "Done")])).await;
    let sends = bot.graph.wait_for(7).await;
    assert_eq!(
        wa::summary(&sends[6]),
        "text:WhatsApp only keeps photos for 7 days and yours are nearly that old, so I can't use them. Reply MENU to start again with fresh selfies."
    );
    assert!(bot.stripe.requests().is_empty(), "no link, no payment");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM orders WHERE status = 'expired'").await, 1);
}

on_both!(
    cancel_after_the_link_expires_the_session_so_the_old_link_cannot_be_paid,
    replayed_stripe_failures_move_to_a_new_key_and_the_link_still_goes_out_once,
    a_stripe_answer_slower_than_the_timeout_is_fetched_again_with_the_same_key_and_parameters,
);

// ------------------------------------------------------------------ out of order

/// A delayed method that finally fails: the order expires, Ana is told, PAY brings a new link.
async fn an_async_payment_that_fails_in_the_end_expires_the_order_and_pay_brings_a_new_link(postgres: bool) {
    let bot = bot_on(postgres, FakeStripe::start().await, &[]).await;
    let (order_id, session) = order_to_payment_link(&bot).await;
    let db = db(&bot.app).await;
    let pending = ps::event("evt_u1", "checkout.session.completed", completed(&session, 1999, "usd", "unpaid"));
    assert_eq!(ps::post_event(&bot.app, &pending).await.1["result"], "awaiting_async_payment");
    let failed =
        ps::event("evt_f1", "checkout.session.async_payment_failed", completed(&session, 1999, "usd", "unpaid"));
    assert_eq!(ps::post_event(&bot.app, &failed).await.1["result"], "expired");
    assert_eq!(order_status(&db, &order_id).await, "expired");
    let sends = bot.graph.wait_for(8).await;
    assert_eq!(
        wa::summary(&sends[7]),
        "text:Your payment didn't go through. Reply PAY to try again, or MENU to start over."
    );
    // The same failure again: nothing more.
    assert_eq!(ps::post_event(&bot.app, &failed).await.1["result"], "duplicate");
    quiet(&bot).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox WHERE event_type = 'order.paid'").await, 0);
    assert_eq!(bot.graph.requests().await.len(), 8);
    wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![wa::text(ANA, "f7", "PAY")])).await;
    let sends = bot.graph.wait_for(10).await;
    assert!(wa::summary(&sends[9]).starts_with("text:Pay securely here:"), "{:?}", wa::summary(&sends[9]));
    assert_eq!(bot.stripe.sessions_created(), 2);
}

/// Stripe does not promise order: the success of a delayed method can come before the
/// `completed` (unpaid) that announced it. The order is paid once; the late `completed`
/// changes nothing.
async fn an_async_success_before_its_completed_event_pays_once(postgres: bool) {
    let bot = bot_on(postgres, FakeStripe::start().await, &[]).await;
    let (order_id, session) = order_to_payment_link(&bot).await;
    let db = db(&bot.app).await;
    let ok = ps::event("evt_s2", "checkout.session.async_payment_succeeded", completed(&session, 1999, "usd", "paid"));
    assert_eq!(ps::post_event(&bot.app, &ok).await.1["result"], "paid");
    let late = ps::event("evt_u2", "checkout.session.completed", completed(&session, 1999, "usd", "unpaid"));
    assert_eq!(ps::post_event(&bot.app, &late).await.1["result"], "awaiting_async_payment");
    quiet(&bot).await;
    assert_eq!(order_status(&db, &order_id).await, "paid");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM outbox WHERE event_type = 'order.paid'").await, 1);
    let sends = bot.graph.requests().await;
    assert_eq!(sends.len(), 8, "one confirmation: {:?}", sends.iter().map(wa::summary).collect::<Vec<_>>());
    assert!(wa::summary(&sends[7]).starts_with("text:Payment received"));
}

/// A selfie that arrives after DONE (WhatsApp delivers it late, or Ana sends one more) is not
/// added to the order whose price and link are fixed: Ana is reminded of the payment.
async fn a_photo_after_done_is_not_added_and_the_link_stays_the_same(postgres: bool) {
    let bot = bot_on(postgres, FakeStripe::start().await, &[]).await;
    let (order_id, session) = order_to_payment_link(&bot).await;
    assert_eq!(
        wa::post_webhook(&bot.app, &wa::inbound(ANA, vec![wa::image(ANA, "late1", &"c".repeat(64))])).await.0,
        200
    );
    let sends = bot.graph.wait_for(8).await;
    quiet(&bot).await;
    let db = db(&bot.app).await;
    let photos = db.int("SELECT COUNT(*) FROM order_photos WHERE order_id = $1", &[(&order_id).into()]).await;
    assert_eq!(photos, 2, "the order keeps the photos it was priced with");
    assert_eq!(order_status(&db, &order_id).await, "awaiting_payment");
    assert_eq!(bot.stripe.sessions_created(), 1, "no new session");
    assert_eq!(bot.graph.requests().await.len(), 8, "one answer");
    let reminder = wa::summary(&sends[7]);
    assert!(
        reminder.contains(session["url"].as_str().unwrap()) || reminder.to_lowercase().contains("pay"),
        "{reminder}"
    );
}

on_both!(
    a_photo_after_done_is_not_added_and_the_link_stays_the_same,
    an_async_payment_that_fails_in_the_end_expires_the_order_and_pay_brings_a_new_link,
    an_async_success_before_its_completed_event_pays_once,
);
