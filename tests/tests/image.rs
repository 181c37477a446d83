//! image-service through the whole app (devhost, SQLite or PostgreSQL, a Redis of the test's
//! own) against fake WhatsApp, Stripe and Astria servers, the fake Astria calling back as the
//! real one does: from "hi" to every portrait delivered once, and the faults on the way.

use std::time::{Duration, Instant};

use astria_tests::astria::{self as fa, FakeAstria};
use astria_tests::db::TestDb;
use astria_tests::stripe::{self as ps, FakeStripe};
use astria_tests::whatsapp::{self as wa, FakeGraph};
use astria_tests::world::{Options, World};
use astria_tests::{on_both, wait_until, TestApp, TestRedis};
use serde_json::Value;

const ANA: &str = "4915112345678";
/// Messages Ana has received once her order is training (see `pay`).
const BEFORE_IMAGES: usize = 9;
const IMAGES: usize = fa::PROMPTS as usize * fa::IMAGES_PER_PROMPT;

/// The app and its fakes (`astria_tests::world`): `replicas` apps sharing the database, and a
/// Graph API whose first `media_failures` media lookups fail.
async fn world(postgres: bool, replicas: usize, media_failures: usize) -> World {
    world_with(postgres, replicas, media_failures, &[]).await
}

async fn world_with(postgres: bool, replicas: usize, media_failures: usize, vars: &[(&str, &str)]) -> World {
    let options = Options::on(postgres).replicas(replicas).media_failures(media_failures);
    World::start(vars.iter().fold(options, |o, (k, v)| o.var(k, v))).await
}

async fn db(app: &TestApp) -> TestDb {
    TestDb::of(app).await
}

/// Ana orders, sends two photos, pays; answers her order id once the link is paid (the
/// trainer takes it from there).
async fn pay(w: &World) -> String {
    let steps = wa::order_steps(ANA, "j");
    for (i, m) in steps.into_iter().enumerate() {
        assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![m])).await.0, 200);
        w.graph.wait_for(i + 1).await;
    }
    let sends = w.graph.wait_for(7).await;
    ps::pay_link(&w.app, &w.stripe, &sends[6]).await
}

/// Waits for the training message (the 9th) and answers every send so far.
async fn training_started(w: &World) -> Vec<Value> {
    let sends = w.graph.wait_for(BEFORE_IMAGES).await;
    assert_eq!(sends.len(), BEFORE_IMAGES, "{sends:#?}\n{}", w.app.log());
    assert!(wa::summary(&sends[7]).starts_with("text:Payment received"));
    assert!(wa::summary(&sends[8]).starts_with("text:Your AI model is training"), "{:?}", wa::summary(&sends[8]));
    sends
}

/// Every portrait of the pack was sent, and none twice.
fn assert_each_portrait_once(sends: &[Value]) {
    let links = image_links(sends);
    let mut distinct = links.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!((links.len(), distinct.len()), (IMAGES, IMAGES), "each portrait once: {links:#?}");
}

fn image_links(sends: &[Value]) -> Vec<String> {
    sends.iter().filter(|s| s["type"] == "image").map(|s| s["image"]["link"].as_str().unwrap().to_string()).collect()
}

async fn journey(postgres: bool) {
    let started = Instant::now();
    let w = world(postgres, 3, 0).await;
    // WhatsApp reports every message sent and delivered, as in production.
    w.graph.report_statuses(&w.app);
    let order_id = pay(&w).await;
    training_started(&w).await;
    let tunes = w.astria.tunes();
    // The fake makes a tune per create call (as Astria does): one create is the app's doing.
    assert_eq!((w.astria.creates(), tunes.len()), (1, 1), "one tune for three replicas");
    let tune = &tunes[0];
    assert_eq!((tune.title.as_str(), tune.name.as_str(), tune.image_count), (order_id.as_str(), "man", 2));
    assert_eq!(tune.pack_id, "260", "the pack's Astria id");
    assert_eq!(tune.branch.as_deref(), Some("fast"), "test mode");
    assert!(tune.tune_callback.starts_with("https://bot.example.com/pack-tune-received?order="));
    assert!(tune.prompt_callback.starts_with("https://bot.example.com/update-images?order="));

    w.astria.finish(&w.app, &order_id).await;
    let total = BEFORE_IMAGES + IMAGES + 1;
    let sends = w.graph.wait_for(total).await;
    settle(&w).await;
    let sends_after = w.graph.requests().await;
    assert_eq!(
        (sends.len(), sends_after.len()),
        (total, total),
        "{:#?}",
        sends_after.iter().map(wa::summary).collect::<Vec<_>>()
    );
    assert_each_portrait_once(&sends_after);
    assert_eq!(
        wa::summary(sends_after.last().unwrap()),
        "text:Your portraits have been delivered. Want another pack? Reply MENU."
    );
    // The order is delivered: STATUS says so.
    wa::post_webhook(&w.app, &wa::inbound(ANA, vec![wa::text(ANA, "j9", "status")])).await;
    let sends = w.graph.wait_for(total + 1).await;
    assert_eq!(wa::summary(&sends[total]), "text:Your portraits have been delivered. Want another pack? Reply MENU.");
    // Each portrait's record names the message that carried it.
    let db = db(&w.app).await;
    let linked = "SELECT COUNT(*) FROM generated_images g JOIN outbound_messages m ON m.id = g.message_id \
                  WHERE m.kind = 'image'";
    assert_eq!(db.count(linked).await as usize, IMAGES);
    // Every message WhatsApp took is booked delivered by its status webhooks.
    let delivered = "SELECT COUNT(*) FROM outbound_messages WHERE delivery_status = 'delivered'";
    w.app
        .wait_until(&format!("{} messages booked delivered", total + 1), Duration::from_secs(20), || async {
            (db.count(delivered).await >= (total + 1) as i64).then_some(())
        })
        .await;
    eprintln!("journey ({}) took {} ms", if postgres { "postgres" } else { "sqlite" }, started.elapsed().as_millis());
}

#[tokio::test]
async fn from_hi_to_every_portrait_delivered_once_with_three_trainer_replicas_sqlite() {
    journey(false).await;
}

#[tokio::test]
async fn from_hi_to_every_portrait_delivered_once_with_three_trainer_replicas_postgres() {
    journey(true).await;
}

/// The order failed after payment: the customer's message at `index` says so, the order is
/// `failed`, a refund issue whose detail contains `detail` is recorded, and the payment goes
/// back without a human: one refund of all of it, the customer told once, the issue resolved.
async fn assert_failed_and_flagged(w: &World, order_id: &str, index: usize, detail: &str) {
    let sends = w.graph.wait_for(index + 1).await;
    assert_eq!(
        wa::summary(&sends[index]),
        "text:Something went wrong with your order. We'll refund you and get in touch."
    );
    let db = db(&w.app).await;
    let status = db.order_status(&order_id).await;
    assert_eq!(status, "failed");
    let issue = db.rows("SELECT kind, detail FROM payment_issues WHERE order_id = $1", &[order_id.into()]).await;
    assert_eq!(issue.len(), 1, "{issue:?}");
    assert_eq!(issue[0][0].text(), "needs_refund");
    let found = issue[0][1].text();
    assert!(found.contains(detail), "{found}");
    let refunds = w
        .wait_until("the payment refunded, relaying", Duration::from_secs(60), || async {
            let made = w.stripe.refunds();
            if !made.is_empty() {
                return Some(made);
            }
            relay_now(&w.app).await;
            None
        })
        .await;
    assert_eq!(refunds.len(), 1, "{refunds:#?}");
    assert_eq!(
        (refunds[0]["amount"].as_i64(), refunds[0]["metadata"]["order_id"].as_str()),
        (Some(1999), Some(order_id))
    );
    let told = "text:Your refund of 19.99 USD is on its way back to you. Your bank may take 5 to 10 days to show it.";
    w.wait_until("the customer told of the refund", Duration::from_secs(30), || async {
        w.graph.requests().await.iter().any(|s| wa::summary(s) == told).then_some(())
    })
    .await;
    let open = db.count("SELECT COUNT(*) FROM payment_issues WHERE resolved_at IS NULL").await;
    assert_eq!(open, 0, "the refund settles the issue");
}

/// Makes every outstanding event due and runs the relay, as the every-minute job would once
/// the backoff has passed.
async fn relay_now(app: &TestApp) {
    db(app).await.execute("UPDATE outbox SET next_attempt_at = 0 WHERE status <> 'done'", &[]).await;
    wa::relay(app).await;
}

/// Relays until the training message went out (the trainer's retries are due at once).
async fn relay_until_training(w: &World) {
    w.wait_until("the training message, relaying", Duration::from_secs(30), || async {
        if w.graph.requests().await.len() >= BEFORE_IMAGES {
            return Some(());
        }
        relay_now(&w.app).await;
        None
    })
    .await;
}

#[tokio::test]
async fn astria_504_then_201_makes_one_tune_postgres() {
    let w = world(true, 1, 0).await;
    w.astria.fail_next(vec![504]);
    pay(&w).await;
    w.graph.wait_for(8).await;
    relay_until_training(&w).await;
    training_started(&w).await;
    assert_eq!((w.astria.creates(), w.astria.tunes().len()), (2, 1));
    assert!(w.app.log().contains("will be retried"), "the 504 is logged");
}

#[tokio::test]
async fn astria_422_fails_the_order_tells_the_customer_and_flags_a_refund_postgres() {
    let w = world(true, 1, 0).await;
    w.astria.fail_next(vec![422]);
    let order_id = pay(&w).await;
    assert_failed_and_flagged(&w, &order_id, BEFORE_IMAGES - 1, "Astria refused the tune: HTTP 422").await;
    for _ in 0..3 {
        relay_now(&w.app).await;
    }
    settle(&w).await;
    assert_eq!(w.astria.creates(), 1, "not retried");
    assert!(w.app.log().contains("astria.failed"));
}

async fn forged_or_malformed_callbacks_are_refused_and_repeats_deliver_nothing_twice(postgres: bool) {
    let w = world(postgres, 1, 0).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    let tune = w.astria.tunes().remove(0);
    let path = |url: &str| url.split_once(".com").unwrap().1.to_string();
    let good = path(&tune.prompt_callback);
    let exp = query_param(&good, "exp");
    let prompt =
        serde_json::json!({"id": 7, "tune_id": tune.id, "images": ["https://mp.astria.ai/x.jpg"], "trained_at": "t"});
    let past = (wa::unix_now() - 10).to_string();
    let bad_paths = [
        format!("/update-images?order={order_id}&exp={exp}&token=00"),
        format!("/update-images?order={order_id}&exp={exp}"),
        format!("/update-images?exp={exp}&token={}", token("/update-images", &order_id, &exp)),
        format!("/update-images?order={order_id}&token={}", token("/update-images", &order_id, &exp)),
        format!("/update-images?order={order_id}&exp={exp}&token={}", token("/update-images", "another-order", &exp)),
        // The tune endpoint's token does not open the prompt endpoint, nor the other way round.
        format!("/update-images?order={order_id}&exp={exp}&token={}", token("/pack-tune-received", &order_id, &exp)),
        format!("/pack-tune-received?order={order_id}&exp={exp}&token={}", token("/update-images", &order_id, &exp)),
        // A token past its expiry, and one whose expiry was moved.
        format!("/update-images?order={order_id}&exp={past}&token={}", token("/update-images", &order_id, &past)),
        format!("/update-images?order={order_id}&exp=99999999999&token={}", token("/update-images", &order_id, &exp)),
    ];
    for p in &bad_paths {
        let r = w.app.client.post(w.app.url(p)).json(&prompt).send().await.unwrap();
        assert_eq!(r.status(), 401, "{p}");
    }
    let r = w.app.client.post(w.app.url(&good)).body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 400);
    let db = db(&w.app).await;
    let images = db.count("SELECT COUNT(*) FROM generated_images").await;
    assert_eq!(images, 0, "nothing stored");

    // The tune callback, wrapped as Astria's starter reads it, then again: each a signal only.
    assert_eq!(w.astria.call_back_tune(&w.app, &order_id, true).await.1["result"], "accepted");
    assert_eq!(w.astria.call_back_tune(&w.app, &order_id, false).await.1["result"], "accepted");
    // The same prompt callback five times: its images go out once.
    for _ in 0..5 {
        assert_eq!(w.astria.call_back_prompt(&w.app, &order_id, 1, true).await.0, 200);
    }
    let sends = w.graph.wait_for(BEFORE_IMAGES + fa::IMAGES_PER_PROMPT).await;
    settle(&w).await;
    assert_eq!(w.graph.requests().await.len(), BEFORE_IMAGES + fa::IMAGES_PER_PROMPT);
    assert_eq!(image_links(&sends).len(), fa::IMAGES_PER_PROMPT);
    // A callback for an order that does not exist, with that order's own valid token: 404.
    let ghost = format!(
        "/update-images?order=no-such-order&exp={exp}&token={}",
        token("/update-images", "no-such-order", &exp)
    );
    let r = w.app.client.post(w.app.url(&ghost)).json(&prompt).send().await.unwrap();
    assert_eq!(r.status(), 404);
}

async fn a_callback_body_forged_with_a_valid_token_sends_nothing_astria_did_not_make(postgres: bool) {
    let w = world(postgres, 1, 0).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    let tune = w.astria.tunes().remove(0);
    let path = |url: &str| url.split_once(".com").unwrap().1.to_string();
    // Someone who read the callback URLs (a log, a proxy) posts their own content: images on
    // their host, and on Astria's host but never made by Astria, and a finished tune.
    let forged_prompt = serde_json::json!({"prompt": {"id": 999, "tune_id": tune.id, "trained_at": "2026-11-25T10:00:00Z",
        "images": ["https://evil.example/spam.jpg", "https://mp.astria.ai/forged/0.jpg"]}});
    for _ in 0..3 {
        let r = w.app.client.post(w.app.url(&path(&tune.prompt_callback))).json(&forged_prompt).send().await.unwrap();
        assert_eq!(r.status(), 200, "a valid token: accepted as a signal");
    }
    let forged_tune = serde_json::json!({"id": tune.id, "title": order_id, "trained_at": "2026-11-25T10:00:00Z"});
    let r = w.app.client.post(w.app.url(&path(&tune.tune_callback))).json(&forged_tune).send().await.unwrap();
    assert_eq!(r.status(), 200);
    settle(&w).await;
    // Astria has made nothing yet: nothing is sent, and the order is still training.
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), BEFORE_IMAGES, "{:?}", summaries(&sends));
    let db = db(&w.app).await;
    let status = db.order_status(&order_id).await;
    assert_eq!(status, "training", "a forged 'trained' tune finishes nothing");
    // Astria really finishes: exactly its own images go out, none of the forged ones.
    w.astria.finish(&w.app, &order_id).await;
    let total = BEFORE_IMAGES + IMAGES + 1;
    w.graph.wait_for(total).await;
    settle(&w).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), total, "{:?}", summaries(&sends));
    let links = image_links(&sends);
    assert!(links.iter().all(|l| l.starts_with(&format!("https://mp.astria.ai/{}/", tune.id))), "{links:?}");
    assert!(!sends.iter().any(|s| s.to_string().contains("evil.example") || s.to_string().contains("forged")));
}

#[tokio::test]
async fn images_astria_lists_off_its_own_hosts_are_never_sent_postgres() {
    // This deployment trusts only another host: Astria's links (mp.astria.ai) are then off-list.
    let w = world_with(true, 1, 0, &[("astria_image_hosts", "cdn.example.com")]).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    w.astria.finish(&w.app, &order_id).await;
    settle(&w).await;
    let sends = w.graph.requests().await;
    assert!(image_links(&sends).is_empty(), "{:?}", summaries(&sends));
    assert!(w.app.log().contains("astria.untrusted_image"), "logged for operators");
}

async fn callbacks_that_beat_the_training_commit_are_kept_and_acted_on(postgres: bool) {
    let w = world(postgres, 1, 0).await;
    // Astria makes the tune, finishes it and calls back before its 201 reaches the app: the
    // order is still `paid`, the tune id not yet recorded.
    w.astria.delay_next_create(vec![Duration::from_millis(2500)]);
    let order_id = pay(&w).await;
    w.wait_until("a tune created at Astria", Duration::from_secs(10), || async {
        (!w.astria.tunes().is_empty()).then_some(())
    })
    .await;
    let db = db(&w.app).await;
    let status = db.order_status(&order_id).await;
    assert_eq!(status, "paid", "the callbacks come before the training is recorded");
    w.astria.finish(&w.app, &order_id).await; // each callback answers 200 (asserted inside)
                                              // Astria never calls back again; the app still delivers everything, once.
    let total = BEFORE_IMAGES + IMAGES + 1;
    w.wait_until(&format!("{total} sends, relaying"), Duration::from_secs(30), || async {
        if w.graph.requests().await.len() >= total {
            return Some(());
        }
        relay_now(&w.app).await;
        None
    })
    .await;
    settle(&w).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), total, "{:?}", summaries(&sends));
    assert_each_portrait_once(&sends);
    assert_eq!(w.astria.creates(), 1);
}

async fn astria_down_past_the_events_retries_and_back_still_trains_and_delivers_once(postgres: bool) {
    let w = world_with(
        postgres,
        1,
        0,
        &[("reconcile_paid_after_minutes", "0"), ("reconcile_backoff_minutes", "0"), ("reconcile_after_minutes", "0")],
    )
    .await;
    // Astria answers 500 to 12 creates: more than one event's eight attempts.
    const DOWN: usize = 12;
    w.astria.fail_next(vec![500; DOWN]);
    let order_id = pay(&w).await;
    let db = db(&w.app).await;
    // First the payment's own event runs out of attempts (the reconciliation is held back).
    db.execute("UPDATE orders SET reconcile_next_at = 9999999999999 WHERE id = $1", &[(&order_id).into()]).await;
    let dead = "SELECT COUNT(*) FROM outbox WHERE event_type = 'order.paid' AND status = 'dead'";
    w.wait_until("order.paid dead-lettered, relaying", Duration::from_secs(60), || async {
        if db.count(dead).await > 0 {
            return Some(());
        }
        relay_now(&w.app).await;
        None
    })
    .await;
    let tried = w.astria.creates();
    assert!(tried < DOWN, "{tried} attempts: Astria is still down");
    assert_eq!(w.graph.requests().await.len(), BEFORE_IMAGES - 1, "the customer heard nothing yet");
    // Then the reconciliation's time comes: the paid order is handed to the trainer again.
    db.execute("UPDATE orders SET reconcile_next_at = NULL WHERE id = $1", &[(&order_id).into()]).await;
    w.wait_until("the training message, relaying", Duration::from_secs(60), || async {
        if w.graph.requests().await.len() >= BEFORE_IMAGES {
            return Some(());
        }
        relay_now(&w.app).await;
        None
    })
    .await;
    assert_eq!(w.astria.creates(), DOWN + 1, "tried until Astria came back, then one tune");
    assert_eq!(w.astria.tunes().len(), 1);
    w.astria.finish(&w.app, &order_id).await;
    let total = BEFORE_IMAGES + IMAGES + 1;
    relay_until_sends(&w, total).await;
    // The payment's own event stays in the dead letters (the reconciliation did its work):
    // an operator sees it, and nothing else is left.
    let q = astria_tests::quiet::Quiet { dead_ok: true, ..Default::default() };
    astria_tests::quiet::quiesce_with(&w.app, q).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM outbox WHERE status = 'dead'").await, 1, "only order.paid's");
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), total, "{:?}", summaries(&sends));
    let status = db.order_status(&order_id).await;
    assert_eq!(status, "delivered");
}

async fn a_paid_order_that_never_trains_fails_at_the_give_up_point_with_a_refund_flagged(postgres: bool) {
    let w = world_with(
        postgres,
        1,
        0,
        &[
            ("reconcile_paid_after_minutes", "0"),
            ("reconcile_backoff_minutes", "0"),
            ("reconcile_give_up_minutes", "0"),
        ],
    )
    .await;
    w.astria.fail_next(vec![500; 1000]); // Astria never comes back
    let order_id = pay(&w).await;
    let db = db(&w.app).await;
    let given_up = w
        .wait_until("the relay giving the order up", Duration::from_secs(30), || async {
            db.execute("UPDATE outbox SET next_attempt_at = 0 WHERE status <> 'done'", &[]).await;
            Some(wa::relay(&w.app).await["given_up"].as_i64().unwrap_or(0)).filter(|n| *n > 0)
        })
        .await;
    assert_eq!(given_up, 1);
    assert_failed_and_flagged(&w, &order_id, BEFORE_IMAGES - 1, "training never started").await;
}

/// WhatsApp serves `bytes` for every photo: a fault no retry can mend, so the paid order fails
/// at once (refund flagged, customer told, the message naming `detail`) and Astria is not asked.
async fn photo_bytes_fail_the_order_at_once(postgres: bool, bytes: Vec<u8>, detail: &str) {
    let w = world(postgres, 1, 0).await;
    wiremock::Mock::given(wiremock::matchers::method("GET"))
        .and(wiremock::matchers::path_regex("^/media-bytes/[^/]+$"))
        .respond_with(wiremock::ResponseTemplate::new(200).set_body_bytes(bytes))
        .with_priority(1)
        .mount(&w.graph.server)
        .await;
    let order_id = pay(&w).await;
    assert_failed_and_flagged(&w, &order_id, BEFORE_IMAGES - 1, detail).await;
    assert_eq!(w.astria.creates(), 0, "nothing sent to Astria");
}

async fn a_photo_whose_bytes_do_not_match_fails_the_order_at_once(postgres: bool) {
    // WhatsApp's bytes do not match the sha256 it announced: no download will ever match.
    photo_bytes_fail_the_order_at_once(postgres, b"not the photo".to_vec(), "does not match its sha256").await;
}

async fn a_photo_over_the_size_cap_fails_the_order_at_once(postgres: bool) {
    // 17 MiB where WhatsApp keeps images under 5 MB: over the trainer's 16 MiB cap every time.
    photo_bytes_fail_the_order_at_once(postgres, vec![0u8; 17 << 20], "is larger than 16777216 bytes").await;
}

async fn after_stop_nothing_is_sent_and_start_brings_the_paid_portraits_once(postgres: bool) {
    let w = world(postgres, 1, 0).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    // Ana sends STOP while her portraits are being made: she gets the confirmation only.
    assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![wa::text(ANA, "s1", "STOP")])).await.0, 200);
    let sends = w.graph.wait_for(BEFORE_IMAGES + 1).await;
    let confirmation = wa::summary(&sends[BEFORE_IMAGES]);
    w.astria.finish(&w.app, &order_id).await;
    settle(&w).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), BEFORE_IMAGES + 1, "nothing after the STOP confirmation: {:?}", summaries(&sends));
    let db = db(&w.app).await;
    let held = db.count("SELECT COUNT(*) FROM outbound_messages WHERE status = 'held'").await;
    assert_eq!(held as usize, IMAGES, "the portraits are kept");
    let status = db.order_status(&order_id).await;
    assert_eq!(status, "delivering", "kept for her: delivered once WhatsApp has them");
    // Something else is not START: still nothing.
    assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![wa::text(ANA, "s2", "hello?")])).await.0, 200);
    settle(&w).await;
    assert_eq!(w.graph.requests().await.len(), BEFORE_IMAGES + 1);
    // START: everything kept back arrives, each once.
    assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![wa::text(ANA, "s3", "START")])).await.0, 200);
    let total = BEFORE_IMAGES + 1 + 1 + IMAGES + 1;
    w.graph.wait_for(total).await;
    settle(&w).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), total, "{:?}", summaries(&sends));
    assert_each_portrait_once(&sends);
    assert!(confirmation.starts_with("text:"), "{confirmation}");
    assert_eq!(wa::summary(sends.last().unwrap()), DONE, "the closing text after the last portrait");
    assert_eq!(db.order_status(&order_id).await, "delivered");
}

async fn after_stop_and_no_start_in_time_the_held_portraits_are_given_up_and_the_refund_flagged(postgres: bool) {
    let w = world(postgres, 1, 0).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![wa::text(ANA, "s1", "STOP")])).await.0, 200);
    w.graph.wait_for(BEFORE_IMAGES + 1).await;
    w.astria.finish(&w.app, &order_id).await;
    // The portraits are held as the sender reaches them (the closing message waits for them
    // to be accepted, so it is not even queued).
    settle(&w).await;
    let db = db(&w.app).await;
    assert_eq!(db.count("SELECT COUNT(*) FROM outbound_messages WHERE status = 'held'").await as usize, IMAGES);
    // Within held_give_up_days (25 by default) the relay keeps them.
    assert_eq!(wa::relay(&w.app).await["held_given_up"], 0);
    // 26 days pass without START.
    let days = 26 * 24 * 3600 * 1000i64;
    db.execute("UPDATE outbound_messages SET updated_at = updated_at - $1 WHERE status = 'held'", &[days.into()]).await;
    let report = wa::relay(&w.app).await;
    assert_eq!(report["held_given_up"], 1, "{report}");
    settle(&w).await;
    let given_up =
        "SELECT COUNT(*) FROM outbound_messages WHERE status = 'failed' AND last_error LIKE '%never sent START%'";
    assert_eq!(db.count(given_up).await as usize, IMAGES, "the portraits");
    assert_eq!(db.count("SELECT COUNT(*) FROM outbound_messages WHERE status = 'held'").await, 0);
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), BEFORE_IMAGES + 1, "nothing after the STOP confirmation: {:?}", summaries(&sends));
    assert_eq!(db.order_status(&order_id).await, "failed");
    let issues = db.rows("SELECT kind, detail FROM payment_issues WHERE order_id = $1", &[(&order_id).into()]).await;
    assert_eq!(issues.len(), 1, "flagged once: {issues:?}");
    assert_eq!(issues[0][0].text(), "needs_refund");
    assert!(issues[0][1].text().contains("STOP"), "{issues:?}");
    assert!(w.app.log().contains("reconcile.held_give_up"), "logged for operators");
    assert_eq!(w.stripe.refunds().len(), 1, "refunded, in silence: the customer asked for it");
    // START long after: the reply to it, and nothing that was given up.
    assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![wa::text(ANA, "s2", "START")])).await.0, 200);
    w.graph.wait_for(BEFORE_IMAGES + 2).await;
    settle(&w).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), BEFORE_IMAGES + 2, "{:?}", summaries(&sends));
    assert!(image_links(&sends).is_empty());
}

/// Waits until the app has nothing left to do (see `astria_tests::quiet`): counts compared
/// after it are final.
async fn settle(w: &World) {
    astria_tests::quiet::quiesce(&w.app).await;
}

/// Like `settle`, with the app's backoffs skipped (every retry due at once).
async fn fast_forward(w: &World) {
    let q = astria_tests::quiet::Quiet { fast_forward: true, ..Default::default() };
    astria_tests::quiet::quiesce_with(&w.app, q).await;
}

fn query_param(path: &str, name: &str) -> String {
    let query = path.split_once('?').map(|(_, q)| q).unwrap_or("");
    form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned()).unwrap_or_default()
}

/// The callback token for `endpoint`, `order` and expiry `exp`, computed as the app does (HMAC
/// with the callback secret).
fn token(endpoint: &str, order: &str, exp: &str) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(fa::CALLBACK_SECRET.as_bytes()).unwrap();
    mac.update(format!("astria-callback:v2:{endpoint}:{exp}:{order}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[tokio::test]
async fn outside_the_24_hour_window_the_template_goes_first_and_the_images_after_the_next_message_postgres() {
    let w = world(true, 1, 0).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    // A day and more passes before Astria is done.
    let long_ago = (wa::unix_now() - 25 * 3600) * 1000;
    db(&w.app).await.execute("UPDATE contacts SET last_inbound_at = $1", &[long_ago.into()]).await;
    w.astria.finish(&w.app, &order_id).await;
    let sends = w.graph.wait_for(BEFORE_IMAGES + 1).await;
    settle(&w).await;
    let sends_now = w.graph.requests().await;
    assert_eq!(sends_now.len(), BEFORE_IMAGES + 1, "{:?}", sends_now.iter().map(wa::summary).collect::<Vec<_>>());
    assert_eq!(wa::summary(&sends[BEFORE_IMAGES]), format!("template:{}", wa::TEMPLATE));

    // Ana answers the template: the kept images, the closing text, then the reply to her.
    wa::post_webhook(&w.app, &wa::inbound(ANA, vec![wa::text(ANA, "j10", "hi")])).await;
    let total = BEFORE_IMAGES + 1 + IMAGES + 1 + 1;
    let sends = w.graph.wait_for(total).await;
    assert_eq!(sends.len(), total, "{:?}", sends.iter().map(wa::summary).collect::<Vec<_>>());
    assert_eq!(image_links(&sends).len(), IMAGES);
    let after: Vec<String> = sends[BEFORE_IMAGES + 1..].iter().map(wa::summary).collect();
    assert!(after[..IMAGES].iter().all(|s| s.starts_with("image:")), "{after:?}");
}

#[tokio::test]
async fn a_photo_download_failing_twice_then_succeeding_still_trains_postgres() {
    let w = world(true, 1, 2).await;
    pay(&w).await;
    w.graph.wait_for(8).await;
    relay_until_training(&w).await;
    training_started(&w).await;
    assert_eq!(w.astria.tunes().len(), 1);
    assert!(w.graph.media_lookups().await >= 4, "two failures, then both photos");
}

// ------------------------------------------------------------------ reconciliation

/// Reconcile at once (tests cannot wait an hour), without backoff between calls.
const RECONCILE_NOW: &[(&str, &str)] = &[("reconcile_after_minutes", "0"), ("reconcile_backoff_minutes", "0")];

async fn relay_until_sends(w: &World, n: usize) -> Vec<Value> {
    for _ in 0..50 {
        let sends = w.graph.requests().await;
        if sends.len() >= n {
            return sends;
        }
        wa::relay(&w.app).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.graph.requests().await
}

fn summaries(sends: &[Value]) -> Vec<String> {
    sends.iter().map(wa::summary).collect()
}

async fn with_every_callback_dropped_reconciliation_delivers_the_order_once_and_late_callbacks_change_nothing(
    postgres: bool,
) {
    let w = world_with(postgres, 1, 0, RECONCILE_NOW).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    w.astria.finish_silently(&order_id, &[1, 2, 3]);
    let total = BEFORE_IMAGES + IMAGES + 1;
    let sends = relay_until_sends(&w, total).await;
    assert_eq!(sends.len(), total, "{:?}", summaries(&sends));
    assert_each_portrait_once(&sends);
    assert_eq!(
        wa::summary(&sends[total - 1]),
        "text:Your portraits have been delivered. Want another pack? Reply MENU."
    );

    // The callbacks Astria would have made arrive late: nothing more is sent.
    assert_eq!(w.astria.call_back_tune(&w.app, &order_id, false).await.1["result"], "late");
    for n in 1..=fa::PROMPTS {
        assert_eq!(w.astria.call_back_prompt(&w.app, &order_id, n, false).await.1["result"], "late");
    }
    for _ in 0..3 {
        wa::relay(&w.app).await;
    }
    settle(&w).await;
    assert_eq!(w.graph.requests().await.len(), total);
}

#[tokio::test]
async fn with_half_the_prompt_callbacks_dropped_the_rest_arrive_through_reconciliation_none_twice_postgres() {
    let w = world_with(true, 1, 0, RECONCILE_NOW).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    assert_eq!(w.astria.call_back_tune(&w.app, &order_id, false).await.0, 200);
    assert_eq!(w.astria.call_back_prompt(&w.app, &order_id, 1, false).await.0, 200);
    w.astria.finish_silently(&order_id, &[2, 3]);
    let total = BEFORE_IMAGES + IMAGES + 1;
    let sends = relay_until_sends(&w, total).await;
    settle(&w).await;
    let sends_after = w.graph.requests().await;
    assert_eq!((sends.len(), sends_after.len()), (total, total), "{:?}", summaries(&sends_after));
    assert_each_portrait_once(&sends_after);
}

#[tokio::test]
async fn when_astria_never_finishes_the_order_is_flagged_and_the_customer_told_at_the_give_up_point_postgres() {
    let w = world_with(true, 1, 0, &[("reconcile_after_minutes", "0"), ("reconcile_give_up_minutes", "0")]).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    let report = wa::relay(&w.app).await;
    assert_eq!(report["given_up"], 1, "{report}");
    assert_failed_and_flagged(&w, &order_id, BEFORE_IMAGES, "did not finish").await;
    // Astria finishing after all changes nothing: the customer was told, the refund flagged.
    w.astria.finish_silently(&order_id, &[1, 2, 3]);
    assert_eq!(w.astria.call_back_prompt(&w.app, &order_id, 1, false).await.1["result"], "late");
    assert_eq!(wa::relay(&w.app).await["given_up"], 0);
    settle(&w).await;
    assert_eq!(w.graph.requests().await.len(), BEFORE_IMAGES + 2, "the apology and the refund's message");
}

// ------------------------------------------------------------------ paced delivery

#[tokio::test]
async fn with_every_second_image_refused_by_the_pair_limit_all_arrive_exactly_once_and_paced_postgres() {
    use std::sync::{Arc, Mutex};
    let pace = Duration::from_millis(200);
    let w = world_with(true, 1, 0, &[("whatsapp_pace_ms", "200")]).await;
    let accepted: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let (seen, log) = (Arc::new(Mutex::new(0usize)), accepted.clone());
    w.graph.rule(move |body| {
        if body["type"] != "image" {
            return wa::Answer::Ok;
        }
        let mut n = seen.lock().unwrap();
        *n += 1;
        if *n % 2 == 0 {
            return wa::Answer::Error(400, 131056);
        }
        log.lock().unwrap().push((Instant::now(), body["image"]["link"].as_str().unwrap().to_string()));
        wa::Answer::Ok
    });
    let order_id = pay(&w).await;
    training_started(&w).await;
    w.astria.finish(&w.app, &order_id).await;
    // No relay call: short waits happen inside the sender.
    w.wait_until(&format!("{IMAGES} images accepted"), Duration::from_secs(20), || async {
        (accepted.lock().unwrap().len() >= IMAGES).then_some(())
    })
    .await;
    settle(&w).await;
    let accepted = accepted.lock().unwrap().clone();
    let mut links: Vec<&String> = accepted.iter().map(|(_, l)| l).collect();
    links.sort();
    links.dedup();
    assert_eq!((accepted.len(), links.len()), (IMAGES, IMAGES), "each image accepted exactly once");
    for pair in accepted.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap >= pace - Duration::from_millis(20), "images {gap:?} apart, pace {pace:?}");
    }
    let sends = w.graph.requests().await;
    assert_eq!(
        wa::summary(sends.last().unwrap()),
        "text:Your portraits have been delivered. Want another pack? Reply MENU."
    );
}

#[tokio::test]
async fn an_image_whatsapp_cannot_take_goes_as_a_document_once_postgres() {
    let w = world(true, 1, 0).await;
    w.graph.rule(|body| if body["type"] == "image" { wa::Answer::Error(400, 131053) } else { wa::Answer::Ok });
    let order_id = pay(&w).await;
    training_started(&w).await;
    w.astria.finish(&w.app, &order_id).await;
    let total = BEFORE_IMAGES + 2 * IMAGES + 1;
    let sends = w.graph.wait_for(total).await;
    settle(&w).await;
    assert_eq!(w.graph.requests().await.len(), total, "{:?}", sends.iter().map(wa::summary).collect::<Vec<_>>());
    let mut documents: Vec<String> = sends
        .iter()
        .filter(|s| s["type"] == "document")
        .map(|s| s["document"]["link"].as_str().unwrap().to_string())
        .collect();
    documents.sort();
    let mut images = image_links(&sends);
    images.sort();
    assert_eq!(documents, images, "every refused image went again as a document, once");
    assert_eq!(documents.len(), IMAGES);
}

#[tokio::test]
async fn photos_whatsapp_no_longer_has_after_payment_fail_the_order_flag_a_refund_and_tell_the_customer_postgres() {
    let w = world(true, 1, 0).await;
    // WhatsApp deleted the media (ids die after 7 days): lookups answer 404.
    wiremock::Mock::given(wiremock::matchers::method("GET"))
        .and(wiremock::matchers::path_regex("^/v[0-9.]+/media-[^/]+$"))
        .respond_with(wiremock::ResponseTemplate::new(404).set_body_json(serde_json::json!({
            "error": {"message": "Unsupported get request.", "type": "GraphMethodException", "code": 100}
        })))
        .with_priority(1)
        .mount(&w.graph.server)
        .await;
    let order_id = pay(&w).await;
    assert_failed_and_flagged(&w, &order_id, BEFORE_IMAGES - 1, "no longer at WhatsApp").await;
    assert!(w.astria.tunes().is_empty(), "nothing trained");
}

on_both!(
    a_callback_body_forged_with_a_valid_token_sends_nothing_astria_did_not_make,
    callbacks_that_beat_the_training_commit_are_kept_and_acted_on,
    astria_down_past_the_events_retries_and_back_still_trains_and_delivers_once,
    a_paid_order_that_never_trains_fails_at_the_give_up_point_with_a_refund_flagged,
    a_photo_whose_bytes_do_not_match_fails_the_order_at_once,
    a_photo_over_the_size_cap_fails_the_order_at_once,
    after_stop_nothing_is_sent_and_start_brings_the_paid_portraits_once,
    forged_or_malformed_callbacks_are_refused_and_repeats_deliver_nothing_twice,
    after_stop_and_no_start_in_time_the_held_portraits_are_given_up_and_the_refund_flagged,
    with_every_callback_dropped_reconciliation_delivers_the_order_once_and_late_callbacks_change_nothing,
);

// ------------------------------------------------------------------ logs

/// A journey with retries and forgeries on the way, every secret set to a value that cannot
/// appear by chance: no host's output holds a secret, a callback token or Ana's number.
async fn no_secret_and_no_phone_number_in_any_log(postgres: bool) {
    const REDIS_PASSWORD: &str = "Redis-Pw-7f3a91";
    const DB_PASSWORD: &str = "Db-Pw-c0ffee42";
    let redis = TestRedis::start_with_password(REDIS_PASSWORD).await.unwrap();
    let graph = FakeGraph::start().await;
    graph.serve_media(1).await;
    let stripe = FakeStripe::start().await;
    let astria = FakeAstria::start().await;
    let base = fa::bot_config(&graph, &redis, &stripe, &astria, postgres);
    let config = astria_tests::AppConfig { database_password: Some(DB_PASSWORD.into()), ..base };
    let app = wa::spawn_bot(config, &redis).await;
    graph.report_statuses(&app);
    // Faults on the way: a proxy's 502 from WhatsApp, a 504 from Astria, Stripe failing once.
    graph.script(vec![wa::Answer::Status(502)]);
    astria.fail_next(vec![504]);
    stripe.fail_next(vec![500]);
    let w = World { app, replicas: vec![], graph, stripe, astria, redis };
    // Forgeries: a webhook signed with another secret, a Stripe event with a bad signature.
    let body = serde_json::to_vec(&wa::inbound(ANA, vec![wa::text(ANA, "f1", "hi")])).unwrap();
    let r = w
        .app
        .client
        .post(w.app.url("/SmsReceived"))
        .header("x-hub-signature-256", wa::sign("not-the-secret", &body))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = w
        .app
        .client
        .post(w.app.url("/payment-received"))
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await;
    assert_eq!(r.unwrap().status(), 400);

    let steps = wa::order_steps(ANA, "j");
    for m in steps {
        assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![m])).await.0, 200);
        fast_forward(&w).await;
    }
    let session = w.stripe.session_for_any().expect("the link was made after Stripe's 500");
    let order_id = session["client_reference_id"].as_str().unwrap().to_string();
    let paid = ps::session(session["id"].as_str().unwrap(), &order_id, 1999, "usd", "paid");
    let (status, _) = ps::post_event(&w.app, &ps::event("evt_logs", "checkout.session.completed", paid)).await;
    assert_eq!(status, 200);
    w.wait_until("a tune created at Astria, relaying", Duration::from_secs(30), || async {
        if !w.astria.tunes().is_empty() {
            return Some(());
        }
        relay_now(&w.app).await;
        None
    })
    .await;
    w.astria.finish(&w.app, &order_id).await;
    fast_forward(&w).await;
    let sends = w.graph.requests().await;
    assert_eq!(image_links(&sends).len(), IMAGES, "{:?}", summaries(&sends));

    let tune = w.astria.tunes().remove(0);
    let tokens: Vec<String> =
        [&tune.tune_callback, &tune.prompt_callback].iter().map(|u| query_param(u, "token")).collect();
    let log = w.app.log();
    assert!(log.len() > 1000, "the app did log: {log}");
    let secrets = [
        ("WhatsApp app secret", wa::APP_SECRET),
        ("WhatsApp access token", wa::ACCESS_TOKEN),
        ("WhatsApp verify token", wa::VERIFY_TOKEN),
        ("admin token", wa::ADMIN_TOKEN),
        ("Stripe secret key", ps::SECRET_KEY),
        ("Stripe webhook secret", ps::WEBHOOK_SECRET),
        ("Astria API key", fa::API_KEY),
        ("callback secret", fa::CALLBACK_SECRET),
        ("Redis password", REDIS_PASSWORD),
        ("database password", DB_PASSWORD),
        ("tune callback token", &tokens[0]),
        ("prompt callback token", &tokens[1]),
        ("Ana's number", ANA),
        ("Ana's number, national part", &ANA[2..]),
    ];
    for (what, value) in secrets {
        assert!(!value.is_empty(), "{what}");
        if let Some(at) = log.find(value) {
            let line =
                log[..at].rsplit('\n').next().unwrap_or("").to_string() + &log[at..].lines().next().unwrap_or("");
            panic!("the {what} appears in the log:\n{line}");
        }
    }
}

on_both!(no_secret_and_no_phone_number_in_any_log);

/// Astria's prompt callbacks can overtake the tune's: each is a signal, so every portrait still
/// goes out once, the closing message last, and the tune's callback after them changes nothing.
async fn prompt_callbacks_before_the_tune_callback_deliver_every_portrait_once(postgres: bool) {
    let w = world(postgres, 1, 0).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    w.astria.finish_silently(&order_id, &[1, 2, 3]);
    for n in 1..=fa::PROMPTS {
        assert_eq!(w.astria.call_back_prompt(&w.app, &order_id, n, false).await.0, 200);
    }
    settle(&w).await;
    assert_eq!(w.astria.call_back_tune(&w.app, &order_id, false).await.0, 200);
    settle(&w).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), BEFORE_IMAGES + IMAGES + 1, "{:?}", summaries(&sends));
    assert_each_portrait_once(&sends);
    assert_eq!(
        wa::summary(sends.last().unwrap()),
        "text:Your portraits have been delivered. Want another pack? Reply MENU."
    );
    assert_eq!(db(&w.app).await.order_status(&order_id).await, "delivered");
}

on_both!(prompt_callbacks_before_the_tune_callback_deliver_every_portrait_once);

// ------------------------------------------------------------------ PostgreSQL outage

/// PostgreSQL (a server of the test's own) stops while the trainer waits for Astria's answer to
/// its create call, and comes back: meanwhile webhooks answer 503 (Meta and Stripe retry) and
/// readiness fails; afterwards the same running app takes the retried webhook, and the relay,
/// trainer and sender finish the order with nothing lost and no portrait sent twice.
///
/// What the outage does cost: the trainer could neither record the tune Astria made nor give
/// back its lease, so once the lease expires (10 minutes; the test expires it) the order is
/// trained again and Astria bills a second tune. Astria has no idempotency key; the README's
/// failure table says so.
#[tokio::test]
async fn postgres_restarted_under_the_running_app_loses_and_doubles_nothing() {
    let mut pg = astria_tests::postgres::TestPostgres::start().await.unwrap();
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    graph.serve_media(0).await;
    let stripe = FakeStripe::start().await;
    let astria = FakeAstria::start().await;
    let config = fa::bot_config(&graph, &redis, &stripe, &astria, false);
    let app = wa::spawn_bot(pg.app_config(config, "astria_restart").await.unwrap(), &redis).await;
    astria_tests::wait_for_subscribers_at(&redis.url(), "astria.orders", 1).await.unwrap();
    let w = World { app, replicas: vec![], graph, stripe, astria, redis };
    w.astria.delay_next_create(vec![Duration::from_millis(1500)]);
    let order_id = pay(&w).await;
    w.wait_until("the trainer calling Astria", Duration::from_secs(10), || async {
        (!w.astria.tunes().is_empty()).then_some(())
    })
    .await;

    pg.stop();
    let status = wa::status("wamid.elsewhere", ANA, "read", None);
    assert_eq!(wa::post_webhook(&w.app, &status).await.0, 503, "Meta will retry");
    assert_eq!(w.app.get("/health/message").await.status(), 503, "not ready");
    let relay = w.app.client.post(w.app.url("/maintenance/relay")).bearer_auth(wa::ADMIN_TOKEN).send().await.unwrap();
    assert_eq!(relay.status(), 503);
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.restart().await.unwrap();

    // The same app, not a new one: Meta's retry is taken, readiness is back.
    assert_eq!(wa::post_webhook(&w.app, &status).await.0, 200);
    assert_eq!(w.app.get("/health/message").await.status(), 200);
    // Ten minutes pass: the training lease the trainer could not give back expires.
    let db = db(&w.app).await;
    assert_eq!(db.execute("UPDATE job_leases SET lease_until = 0 WHERE name LIKE 'train:%'", &[]).await, 1);
    fast_forward(&w).await;
    training_started(&w).await;
    w.astria.finish(&w.app, &order_id).await;
    fast_forward(&w).await;
    let sends = w.graph.requests().await;
    assert_eq!(sends.len(), BEFORE_IMAGES + IMAGES + 1, "{:?}", summaries(&sends));
    assert_each_portrait_once(&sends);
    assert_eq!(w.astria.creates(), 2, "the tune made during the outage, and the one recorded");
    let recorded = db.int("SELECT astria_tune_id FROM orders WHERE id = $1", &[(&order_id).into()]).await;
    assert_eq!(recorded as u64, w.astria.tunes()[1].id, "the second is the order's");
    assert_eq!(db.order_status(&order_id).await, "delivered");
}

const METRICS_TOKEN: &str = "test-metrics-token";

/// Every sample of a scrape, parsed with a Prometheus text-format parser, keyed
/// `name{label="value",...}` (labels sorted).
fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition");
    assert!(!scrape.docs.is_empty(), "HELP lines parsed");
    scrape
        .samples
        .into_iter()
        .map(|s| {
            let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
            labels.sort();
            let key =
                if labels.is_empty() { s.metric.clone() } else { format!("{}{{{}}}", s.metric, labels.join(",")) };
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.iter().find(|b| b.less_than == f64::INFINITY).map_or(f64::NAN, |b| b.count)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            (key, value)
        })
        .collect()
}

/// The metrics route after a real journey, then after a stuck order and a dead letter are
/// injected: each value is exact. Only the admin token and the read-only metrics token read it,
/// and the metrics token runs nothing else (every other operator route with it:
/// `maintenance.rs`, `every_operator_route_takes_exactly_the_tokens_its_scope_names`).
async fn metrics_are_exact_after_a_journey_and_injected_failures(postgres: bool) {
    let w = world_with(postgres, 1, 0, &[("metrics_token", METRICS_TOKEN)]).await;
    assert_eq!(w.app.metrics("wrong").await.0, 401);
    assert_eq!(w.app.metrics(wa::ADMIN_TOKEN).await.0, 200);
    let run = w
        .app
        .client
        .post(w.app.url("/maintenance/run"))
        .header("authorization", format!("Bearer {METRICS_TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(run.status().as_u16(), 401, "the metrics token is read-only");

    let order_id = pay(&w).await;
    training_started(&w).await;
    w.astria.finish(&w.app, &order_id).await;
    w.graph.wait_for(BEFORE_IMAGES + IMAGES + 1).await;
    settle(&w).await;
    let (status, text) = w.app.metrics(METRICS_TOKEN).await;
    assert_eq!(status, 200);
    let m = samples(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k} in\n{text}"));
    assert_eq!(get("astria_orders{status=\"delivered\"}"), 1.0, "{text}");
    assert_eq!(get("astria_portraits_delivered"), IMAGES as f64);
    assert_eq!(get("astria_dead_letters_total"), 0.0);
    assert_eq!(get("astria_payment_issues_open"), 0.0);
    // Every worker channel has its series, each at 0 once settled.
    for channel in ["astria.payments", "astria.orders", "astria.messages", "astria.inbox"] {
        assert_eq!(get(&format!("astria_outbox_backlog{{channel=\"{channel}\"}}")), 0.0, "{channel}:\n{text}");
        assert_eq!(get(&format!("astria_dead_letters{{channel=\"{channel}\"}}")), 0.0, "{channel}");
    }
    assert!(
        !m.keys().any(|k| k.starts_with("astria_outbox_backlog{") && m[k] != 0.0),
        "nothing left in the outbox:\n{text}"
    );
    assert_eq!(get("astria_orders{status=\"failed\"}"), 0.0, "a status no order has is there, at 0");
    assert_eq!(get("astria_outbound_messages{status=\"queued\"}"), 0.0);
    assert_eq!(get("astria_inbox_waiting"), 0.0);
    assert!(!text.contains("astria_order_oldest_age_seconds{"), "no order in a non-final status:\n{text}");
    assert_eq!(get("astria_payment_to_delivery_seconds"), 1.0, "one delivered order in the histogram");
    assert!(
        text.contains("astria_payment_to_delivery_seconds_bucket{le=\"60\"} 1"),
        "delivered within a minute:\n{text}"
    );

    // Injected: an order stuck in training for two hours, and a dead letter.
    let db = db(&w.app).await;
    let two_hours_ago = wa::unix_now() * 1000 - 7_200_000;
    db.execute(
        "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at, paid_at)
         VALUES ('stuck-order', $1, 'corporate', 'training', 1999, 'usd', $2, $2, $2)",
        &[ANA.into(), two_hours_ago.into()],
    )
    .await;
    let channel = db.text("SELECT channel FROM outbox ORDER BY created_at LIMIT 1", &[]).await;
    db.execute("UPDATE outbox SET status = 'dead' WHERE id = (SELECT id FROM outbox ORDER BY created_at LIMIT 1)", &[])
        .await;
    let (_, text) = w.app.metrics(wa::ADMIN_TOKEN).await;
    let m = samples(&text);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("no sample {k} in\n{text}"));
    assert_eq!(get("astria_orders{status=\"training\"}"), 1.0);
    let age = get("astria_order_oldest_age_seconds{status=\"training\"}");
    assert!((7200.0..7260.0).contains(&age), "two hours, give or take the test's own time: {age}");
    assert_eq!(get(&format!("astria_dead_letters{{channel=\"{channel}\"}}")), 1.0);
    assert_eq!(get("astria_dead_letters_total"), 1.0);
    assert_eq!(get("astria_orders{status=\"delivered\"}"), 1.0, "the delivered order is still counted");
}

on_both!(metrics_are_exact_after_a_journey_and_injected_failures);

// ---------------------------------------------------------------- the operator console

/// Today's entry of the funnel, as [chats, orders, paid, delivered].
fn today(funnel: &Value) -> [i64; 4] {
    let day = funnel["days"].as_array().unwrap().last().unwrap().clone();
    ["chats", "orders", "paid", "delivered"].map(|k| day[k].as_i64().unwrap())
}

/// Ana's order paid and training, then left two hours without change (as if Astria never
/// called back and nobody looked); a Stripe payment for an order that does not exist.
async fn console_world(postgres: bool) -> (World, String) {
    let w = world_with(postgres, 1, 0, &[("metrics_token", METRICS_TOKEN)]).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    settle(&w).await;
    let db = db(&w.app).await;
    db.execute("UPDATE orders SET updated_at = updated_at - 7200000 WHERE id = $1", &[order_id.as_str().into()]).await;
    let ghost = ps::event(
        "evt_ghost",
        "checkout.session.completed",
        ps::session("cs_ghost", "no-such-order", 1999, "usd", "paid"),
    );
    assert_eq!(ps::post_event(&w.app, &ghost).await.1["result"], "unknown_order");
    (w, order_id)
}

async fn console_answers_what_the_database_holds_and_refuses_bad_input(postgres: bool) {
    let (w, order_id) = console_world(postgres).await;
    let app = &w.app;
    let db = db(app).await;
    let token = Some(wa::ADMIN_TOKEN);

    // The page itself holds no data: served without a token, locked down by its CSP.
    let page = app.get("/maintenance/console").await;
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert!(page.text().await.unwrap().contains("Admin token"));
    assert_eq!(app.get("/maintenance/console/app.js").await.status(), 200);

    // Data needs the admin token; the read-only metrics token is not enough.
    for path in ["/maintenance/console/api/funnel", "/maintenance/console/api/attention"] {
        assert_eq!(app.call("GET", path, None, None).await.0, 401, "{path}");
        assert_eq!(app.call("GET", path, Some("wrong"), None).await.0, 401, "{path}");
        assert_eq!(app.call("GET", path, Some(METRICS_TOKEN), None).await.0, 401, "{path} with the metrics token");
    }
    assert_eq!(app.metrics(METRICS_TOKEN).await.0, 200, "the metrics token is configured: it reads the metrics");
    let (status, funnel) = app.call("GET", "/maintenance/console/api/funnel", token, None).await;
    assert_eq!(status, 200);
    assert_eq!(funnel["days"].as_array().unwrap().len(), 14);
    assert_eq!(today(&funnel), [1, 1, 1, 0], "one chat, one order, paid, none delivered: {funnel}");
    assert_eq!(
        app.call("GET", "/maintenance/console/api/funnel?days=3", token, None).await.1["days"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    for bad in ["days=0", "days=91", "days=two"] {
        let (status, body) = app.call("GET", &format!("/maintenance/console/api/funnel?{bad}"), token, None).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }

    // The order left in training for two hours is stuck at the default threshold (an hour),
    // and not at three hours.
    let (_, attention) = app.call("GET", "/maintenance/console/api/attention", token, None).await;
    let orders = attention["orders"].as_array().unwrap();
    assert_eq!(orders.len(), 1, "{attention}");
    assert_eq!(
        (orders[0]["order_id"].as_str(), orders[0]["reason"].as_str()),
        (Some(order_id.as_str()), Some("stuck"))
    );
    assert_eq!(orders[0]["status"], "training");
    let (_, later) = app.call("GET", "/maintenance/console/api/attention?stuck_minutes=180", token, None).await;
    assert_eq!(later["orders"].as_array().unwrap().len(), 0, "{later}");

    // Its story: every message sent to Ana, and every event that names the order.
    let (status, story) = app.call("GET", &format!("/maintenance/console/api/orders/{order_id}"), token, None).await;
    assert_eq!(status, 200, "{story}");
    let sent = db.int("SELECT COUNT(*) FROM outbound_messages WHERE wa_id = $1", &[ANA.into()]).await;
    assert_eq!(story["messages"].as_array().unwrap().len() as i64, sent);
    assert_eq!(sent, BEFORE_IMAGES as i64);
    assert!(story["messages"][0]["message"]["body"].as_str().is_some(), "messages parsed: {story}");
    let types: Vec<&str> =
        story["events"].as_array().unwrap().iter().map(|e| e["event_type"].as_str().unwrap()).collect();
    assert!(types.contains(&"order.paid"), "{types:?}");
    let naming = db.int("SELECT COUNT(*) FROM outbox WHERE envelope LIKE $1", &[format!("%{order_id}%").into()]).await;
    assert_eq!(types.len() as i64, naming);
    assert_eq!(story["order"]["photos"], 2);
    assert_eq!(story["conversation"]["state"].as_str().is_some(), true);
    assert_eq!(app.call("GET", "/maintenance/console/api/orders/no-such-order", token, None).await.0, 404);
    assert_eq!(app.call("GET", "/maintenance/console/api/orders/a%25b", token, None).await.0, 400);
    assert_eq!(app.call("GET", "/maintenance/console/api/orders/x_y", token, None).await.0, 400);

    // Resolving a payment issue is recorded with the operator's note, once.
    let resolve = "/maintenance/payment-issues/evt_ghost/resolve";
    let note = json_note("refunded pi_123 in the Stripe dashboard");
    assert_eq!(app.call("POST", resolve, None, Some(note.clone())).await.0, 401);
    for bad in [
        serde_json::json!({}),
        json_note(""),
        json_note("   "),
        json_note(&"x".repeat(501)),
        serde_json::json!({"note": "ok", "by": "me"}),
        // A NUL (which PostgreSQL cannot store: a 500 before) and other control characters.
        json_note("refunded\u{0}"),
        json_note("refunded\u{1b}[31m"),
    ] {
        let (status, body) = app.call("POST", resolve, token, Some(bad.clone())).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(
        db.count("SELECT COUNT(*) FROM payment_issues WHERE resolved_at IS NOT NULL").await,
        0,
        "bad input changes nothing"
    );
    assert_eq!(
        app.call("POST", "/maintenance/payment-issues/evt_other/resolve", token, Some(note.clone())).await.0,
        404
    );
    let (status, body) = app.call("POST", resolve, token, Some(note.clone())).await;
    assert_eq!((status, body["resolved"].as_str()), (200, Some("evt_ghost")));
    let recorded =
        db.rows("SELECT resolution, resolved_at FROM payment_issues WHERE event_id = 'evt_ghost'", &[]).await;
    assert_eq!(recorded[0][0].text(), "refunded pi_123 in the Stripe dashboard");
    assert!(recorded[0][1].int() > 0);
    assert_eq!(app.call("POST", resolve, token, Some(json_note("again"))).await.0, 404, "the first resolution stands");
    let (_, issues) = app.call("GET", "/maintenance/payment-issues", token, None).await;
    assert_eq!(issues["payment_issues"].as_array().unwrap().len(), 0, "{issues}");
}

fn json_note(note: &str) -> Value {
    serde_json::json!({ "note": note })
}

on_both!(console_answers_what_the_database_holds_and_refuses_bad_input);

/// The console in headless Chromium, as an operator uses it: a wrong token is refused; the
/// right one shows the funnel and the stuck order; the order opens with Ana's messages and its
/// events; a dead letter is replayed and leaves the list; a payment issue is resolved with a
/// note. Screenshots under target/browser/console-*.png.
#[tokio::test(flavor = "multi_thread")]
async fn browser_console_shows_the_funnel_and_a_stuck_order_and_replays_a_dead_letter() {
    use astria_tests::browser::{screenshot_dir, Browser};
    use fantoccini::Locator;

    let (w, order_id) = console_world(false).await;
    let db = db(&w.app).await;
    let dead = db
        .text(
            "SELECT id FROM outbox WHERE event_type = 'order.paid' AND envelope LIKE $1",
            &[format!("%{order_id}%").into()],
        )
        .await;
    db.execute(
        "UPDATE outbox SET status = 'dead', last_error = 'not completed after 12 attempts' WHERE id = $1",
        &[dead.as_str().into()],
    )
    .await;

    let browser = Browser::start().await;
    let c = &browser.client;
    let shots = screenshot_dir();
    c.goto(&w.app.url("/maintenance/console")).await.unwrap();
    let find = |css: &'static str| async move { c.wait().for_element(Locator::Css(css)).await.unwrap() };
    let text_of = |css: String| async move {
        let what = format!("text shown at {css}");
        wait_until(&what, Duration::from_secs(15), || async {
            c.find(Locator::Css(&css)).await.ok()?.text().await.ok().filter(|t| !t.is_empty())
        })
        .await
    };
    // The console redraws its tables every few seconds: an element found just before a redraw
    // is stale by the click, so find and click in one try, until both work.
    let click = |css: String| async move {
        wait_until(&format!("a click on {css}"), Duration::from_secs(15), || async {
            c.find(Locator::Css(&css)).await.ok()?.click().await.ok()
        })
        .await
    };
    let gone = |css: String| async move {
        wait_until(&format!("{css} gone from the page"), Duration::from_secs(15), || async {
            c.find(Locator::Css(&css)).await.is_err().then_some(())
        })
        .await
    };

    // A wrong token: refused, the console stays closed.
    find("#token").await.send_keys("not-the-token").await.unwrap();
    click("#login button".into()).await;
    assert_eq!(text_of("#status".into()).await, "That token was refused.");
    assert!(!find("#console").await.is_displayed().await.unwrap());

    find("#token").await.send_keys(wa::ADMIN_TOKEN).await.unwrap();
    click("#login button".into()).await;
    // The funnel: 14 days of four bars, and the totals the database holds.
    let totals: Vec<String> = {
        let mut out = vec![];
        for series in ["chats", "orders", "paid", "delivered"] {
            out.push(text_of(format!("#funnel-totals td[data-total={series}]")).await);
        }
        out
    };
    assert_eq!(totals, ["1", "1", "1", "0"]);
    assert!(!find("#login").await.is_displayed().await.unwrap(), "the login form goes once logged in");
    assert_eq!(c.find_all(Locator::Css("#funnel svg rect")).await.unwrap().len(), 14 * 4);

    // The stuck order, and its story.
    let row = format!("#attention tr[data-order='{order_id}']");
    assert_eq!(text_of(format!("{row} td:nth-child(2)")).await, "stuck");
    assert_eq!(c.find_all(Locator::Css("#attention tbody tr")).await.unwrap().len(), 1);
    click(row.clone()).await;
    assert!(text_of("#order h3".into()).await.contains(ANA));
    let bubbles = c.find_all(Locator::Css("#order-chat .bubble")).await.unwrap();
    assert_eq!(bubbles.len(), BEFORE_IMAGES);
    assert!(bubbles[BEFORE_IMAGES - 2].text().await.unwrap().starts_with("Payment received"));
    let events = c.find_all(Locator::Css("#order-events tbody tr")).await.unwrap();
    let naming = db.int("SELECT COUNT(*) FROM outbox WHERE envelope LIKE $1", &[format!("%{order_id}%").into()]).await;
    assert_eq!(events.len() as i64, naming);
    std::fs::write(shots.join("console-overview.png"), c.screenshot().await.unwrap()).unwrap();
    c.execute("document.querySelector('#order').scrollIntoView()", vec![]).await.unwrap();
    std::fs::write(shots.join("console-order.png"), c.screenshot().await.unwrap()).unwrap();

    // Replay the dead letter: it leaves the list and the relay has it again.
    let dead_in_order = Locator::XPath("//table[@id='order-events']//td[text()='dead']");
    assert!(c.find(dead_in_order).await.is_ok(), "the open order shows its dead event");
    let dead_row = format!("#dead-letters tr[data-event='{dead}']");
    assert!(text_of(dead_row.clone()).await.contains("order.paid"));
    click(format!("{dead_row} button")).await;
    gone(dead_row).await;
    assert_eq!(text_of("#dead-letters td.empty".into()).await, "No dead letters.");
    let status = db.text("SELECT status FROM outbox WHERE id = $1", &[dead.as_str().into()]).await;
    assert_ne!(status, "dead");
    // The open order shows the event handed back, too.
    wait_until("the order's events without the dead letter", Duration::from_secs(15), || async {
        c.find(dead_in_order).await.is_err().then_some(())
    })
    .await;

    // Resolve the payment issue: a note is required, then it is recorded.
    let issue_row = "#payment-issues tr[data-issue='evt_ghost']".to_string();
    assert!(text_of(issue_row.clone()).await.contains("unknown_order"));
    click(format!("{issue_row} button")).await;
    assert!(text_of("#status".into()).await.starts_with("Say what was done"));
    assert_eq!(db.count("SELECT COUNT(*) FROM payment_issues WHERE resolved_at IS NOT NULL").await, 0);
    c.find(Locator::Css(&format!("{issue_row} input")))
        .await
        .unwrap()
        .send_keys("no order: refunded in Stripe")
        .await
        .unwrap();
    click(format!("{issue_row} button")).await;
    gone(issue_row).await;
    assert_eq!(
        db.text("SELECT resolution FROM payment_issues WHERE event_id = 'evt_ghost'", &[]).await,
        "no order: refunded in Stripe"
    );
    std::fs::write(shots.join("console-after-actions.png"), c.screenshot().await.unwrap()).unwrap();
}

// ------------------------------------------------------------------ traces

/// The trace a caller's `traceparent` names on Stripe's webhook, and that caller's span.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

/// The `traceparent` headers a fake API received, in order.
async fn traceparents(server: &wiremock::MockServer, method: &str) -> Vec<String> {
    let requests = server.received_requests().await.unwrap_or_default();
    requests
        .iter()
        .filter(|r| r.method.as_str() == method)
        .filter_map(|r| r.headers.get("traceparent").and_then(|v| v.to_str().ok()).map(str::to_string))
        .collect()
}

/// With tracing on, a payment is one trace, whatever the hops: Stripe's webhook, sent inside a
/// trace of the caller's, → the outbox → Redis → the trainer → Astria, and → the sender →
/// WhatsApp, for the sender's news of the payment and the trainer's news of the training. Each
/// consumer's span is the child of the span that emitted its event, each outbound call sends
/// its own span's `traceparent`, and every log line of the journey carries a trace id (the
/// trainer's also the order id). Spans are decoded as a collector decodes OTLP protobuf.
async fn one_trace_follows_a_payment_across_redis_to_astria_and_whatsapp(postgres: bool) {
    use astria_tests::otel::{FakeCollector, ReceivedSpan, CLIENT, CONSUMER, INTERNAL, SERVER};
    let collector = FakeCollector::start().await;
    let collector_url = collector.url();
    let w =
        world_with(postgres, 1, 0, &[("otel_traces_enabled", "true"), ("otel_collector_url", &collector_url)]).await;
    for (i, m) in wa::order_steps(ANA, "t").into_iter().enumerate() {
        assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![m])).await.0, 200);
        w.graph.wait_for(i + 1).await;
    }
    let sends = w.graph.wait_for(7).await;
    let session_id = wa::summary(&sends[6]).rsplit('/').next().unwrap().to_string();
    let order_id = w.stripe.session_for_any().unwrap()["client_reference_id"].as_str().unwrap().to_string();
    let paid = ps::session(&session_id, &order_id, 1999, "usd", "paid");
    let body = serde_json::to_vec(&ps::event("evt_traced", "checkout.session.completed", paid)).unwrap();
    let r = w
        .app
        .client
        .post(w.app.url("/payment-received"))
        .header("content-type", "application/json")
        .header("stripe-signature", ps::signature(&[ps::WEBHOOK_SECRET], ps::unix_now(), &body))
        .header("traceparent", format!("00-{TRACE}-{CALLER_SPAN}-01"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    training_started(&w).await;

    // The payment's trace: the webhook, the trainer and two sender invocations, each with the
    // call it made. Spans come when each invocation ends, so wait for all of them.
    let in_trace = |spans: &[ReceivedSpan], service: &str, kind: i32| -> Vec<ReceivedSpan> {
        spans.iter().filter(|s| s.trace_id == TRACE && s.service == service && s.kind == kind).cloned().collect()
    };
    let spans = w
        .app
        .eventually(Duration::from_secs(20), || async {
            let spans = collector.spans().await;
            let complete = in_trace(&spans, "payment-service", SERVER).len() == 1
                && in_trace(&spans, "image-trainer", CONSUMER).len() == 1
                && !in_trace(&spans, "image-trainer", CLIENT).is_empty()
                && in_trace(&spans, "message-sender", INTERNAL).len() >= 2
                && in_trace(&spans, "message-sender", CLIENT).len() >= 2;
            complete.then_some(spans)
        })
        .await;
    let Some(spans) = spans else {
        panic!("the payment's trace is incomplete: {:#?}\n{}", collector.spans().await, w.app.log());
    };

    let webhook = &in_trace(&spans, "payment-service", SERVER)[0];
    assert_eq!(webhook.name, "POST /payment-received");
    assert_eq!(webhook.parent_span_id, CALLER_SPAN, "the webhook continues the caller's trace");
    assert_eq!(webhook.remote_parent, Some(true));
    assert_eq!(webhook.attr("astria.order_id"), Some(order_id.as_str()));
    assert_eq!(webhook.attr("http.response.status_code"), Some("200"));
    assert_eq!(webhook.error, None);

    // Across the outbox and Redis: the order.paid event stored the webhook's span, and the
    // trainer's span is its child.
    let db = db(&w.app).await;
    let paid_event = db
        .text(
            &format!("SELECT envelope FROM outbox WHERE envelope LIKE '%order.paid%' AND envelope LIKE '%{order_id}%'"),
            &[],
        )
        .await;
    let paid_event: Value = serde_json::from_str(&paid_event).unwrap();
    assert_eq!(paid_event["traceparent"], format!("00-{TRACE}-{}-01", webhook.span_id));
    let trainer = &in_trace(&spans, "image-trainer", CONSUMER)[0];
    assert_eq!(trainer.name, "process astria.orders");
    assert_eq!(trainer.parent_span_id, webhook.span_id, "the consumer continues the span that emitted the event");
    assert_eq!(trainer.remote_parent, Some(true), "its parent ran in another invocation");
    assert_eq!(trainer.attr("messaging.message.id"), paid_event["id"].as_str());
    assert_eq!(trainer.attr("astria.event_type"), Some("order.paid"));
    assert_eq!(trainer.attr("astria.order_id"), Some(order_id.as_str()));

    // The trainer's calls to Astria are its children, and Astria saw their traceparents.
    let astria_calls = in_trace(&spans, "image-trainer", CLIENT);
    let astria_host = w.astria.server.address().to_string();
    assert!(astria_calls.iter().all(|c| c.parent_span_id == trainer.span_id), "{astria_calls:#?}");
    assert!(astria_calls.iter().all(|c| c.remote_parent == Some(false)), "{astria_calls:#?}");
    let create =
        astria_calls.iter().find(|c| c.attr("server.address") == Some(astria_host.as_str())).expect("a call to Astria");
    assert_eq!(create.attr("http.request.method"), Some("POST"));
    assert!(
        traceparents(&w.astria.server, "POST").await.contains(&format!("00-{TRACE}-{}-01", create.span_id)),
        "Astria received the call's traceparent"
    );

    // The sender: the payment's news (queued by the webhook) and the training's (queued by the
    // trainer) are each delivered in a span of the trace that queued them, whichever sender
    // invocation held the contact's queue; each call to WhatsApp is a child of its delivery.
    let deliveries = in_trace(&spans, "message-sender", INTERNAL);
    let parents: Vec<&str> = deliveries.iter().map(|s| s.parent_span_id.as_str()).collect();
    assert!(
        parents.contains(&webhook.span_id.as_str()) && parents.contains(&trainer.span_id.as_str()),
        "{deliveries:#?}"
    );
    assert!(deliveries.iter().all(|d| d.name == "deliver message" && d.attr("astria.message_id").is_some()));
    let graph_host = w.graph.server.address().to_string();
    let graph_headers = traceparents(&w.graph.server, "POST").await;
    for call in in_trace(&spans, "message-sender", CLIENT) {
        assert!(deliveries.iter().any(|d| d.span_id == call.parent_span_id), "{call:#?}");
        assert_eq!(call.attr("server.address"), Some(graph_host.as_str()));
        assert_eq!(call.attr("http.response.status_code"), Some("200"));
        assert!(graph_headers.contains(&format!("00-{TRACE}-{}-01", call.span_id)), "WhatsApp saw {call:#?}");
    }

    // Every hop of the whole journey links: each consumer span's parent is a span the
    // collector received, in the same trace; the customer's webhooks start their own traces.
    assert_eq!(w.app.get("/health/message").await.status(), 200);
    assert_eq!(w.app.get("/health/payment").await.status(), 200);
    let all = collector.spans().await;
    let consumers: Vec<&ReceivedSpan> = all.iter().filter(|s| s.kind == CONSUMER).collect();
    assert!(
        consumers.len() >= 9,
        "a consumer span per message sent, the checkout's and the trainer's: {}",
        consumers.len()
    );
    let sent = w.graph.requests().await.len();
    let delivered: Vec<&ReceivedSpan> =
        all.iter().filter(|s| s.kind == INTERNAL && s.name == "deliver message").collect();
    assert!(delivered.len() >= sent, "a delivery span per message WhatsApp took ({sent}): {}", delivered.len());
    for c in consumers.iter().chain(&delivered) {
        assert!(
            all.iter().any(|p| p.span_id == c.parent_span_id && p.trace_id == c.trace_id),
            "{c:#?} has no parent among {all:#?}"
        );
    }
    let customer_webhooks: Vec<&ReceivedSpan> =
        all.iter().filter(|s| s.service == "message-service" && s.kind == SERVER).collect();
    assert_eq!(customer_webhooks.len(), 6, "one per step");
    assert!(customer_webhooks.iter().all(|s| s.parent_span_id.is_empty() && s.trace_id != TRACE));
    assert!(all.iter().all(|s| s.attributes.values().all(|v| !v.contains(ANA))), "no phone number in a span");
    // Health probes are not exported (one was made before the spans were read).
    assert!(all.iter().all(|s| !s.name.contains("/health")), "{all:#?}");
    assert!(all.iter().filter(|s| s.kind == SERVER).all(|s| s.name.starts_with("POST /")), "{all:#?}");

    // Logs: every line of the components carries a trace id; the trainer's carry the order.
    let log = w.app.log();
    // A component's line is its JSON object, wherever the host puts it on its own line.
    let lines: Vec<Value> = log
        .lines()
        .filter_map(|l| {
            let json = &l[l.find("{\"")?..];
            serde_json::Deserializer::from_str(json).into_iter::<Value>().next()?.ok()
        })
        .filter(|v| v.get("level").is_some() && v.get("target").is_some())
        .collect();
    assert!(lines.len() >= 2, "the journey logged too little:\n{log}");
    for line in &lines {
        let trace_id = line["trace_id"].as_str().unwrap_or_default();
        assert!(trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()), "{line}");
    }
    let of_the_payment: Vec<&Value> = lines.iter().filter(|l| l["trace_id"] == TRACE).collect();
    assert!(of_the_payment.iter().any(|l| l["target"] == "payment.paid"), "{lines:#?}");
    assert!(of_the_payment.iter().any(|l| l["target"] == "astria.tune"), "the trainer's line: {lines:#?}");
    assert!(of_the_payment.iter().all(|l| l["order_id"] == order_id.as_str()), "{of_the_payment:#?}");
}

on_both!(one_trace_follows_a_payment_across_redis_to_astria_and_whatsapp);

// ------------------------------------------------------------------ delivery that outlasts outages

/// The closing text, which goes only once every portrait is accepted.
const DONE: &str = "text:Your portraits have been delivered. Want another pack? Reply MENU.";

/// Image sends the fake Graph API refused, and the links it accepted, in order.
#[derive(Default)]
struct Outage {
    refused: usize,
    accepted: Vec<String>,
}

/// A WhatsApp that refuses every image while `down` (503, and every third time a proxy's bare
/// 502), and accepts otherwise; everything else is accepted. (A 429 asks for a fixed minute
/// whatever the retry base: `send.rs`'s unit tests cover it.)
fn images_refused_while(
    w: &World,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::sync::Arc<std::sync::Mutex<Outage>> {
    use std::sync::atomic::Ordering;
    let seen: std::sync::Arc<std::sync::Mutex<Outage>> = Default::default();
    let log = seen.clone();
    w.graph.rule(move |body| {
        if body["type"] != "image" {
            return wa::Answer::Ok;
        }
        let mut o = log.lock().unwrap();
        if down.load(Ordering::SeqCst) {
            o.refused += 1;
            return if o.refused % 3 == 0 { wa::Answer::Status(502) } else { wa::Answer::Status(503) };
        }
        o.accepted.push(body["image"]["link"].as_str().unwrap().to_string());
        wa::Answer::Ok
    });
    seen
}

/// Waits (relaying, as the every-minute job would) until WhatsApp has accepted every portrait,
/// lets the app settle, and checks each was accepted once and the closing text went last;
/// answers every send.
async fn every_portrait_accepted_once(w: &World, seen: &std::sync::Mutex<Outage>) -> Vec<Value> {
    w.wait_until(&format!("{IMAGES} portraits accepted, relaying"), Duration::from_secs(60), || async {
        if seen.lock().unwrap().accepted.len() >= IMAGES {
            return Some(());
        }
        wa::relay(&w.app).await;
        None
    })
    .await;
    settle(w).await;
    let accepted = seen.lock().unwrap().accepted.clone();
    let mut distinct = accepted.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!((accepted.len(), distinct.len()), (IMAGES, IMAGES), "each portrait once: {accepted:#?}");
    let sends = w.graph.requests().await;
    assert_eq!(wa::summary(sends.last().unwrap()), DONE, "the closing text goes last");
    sends
}

/// WhatsApp refuses every portrait for longer than the sender's whole retry budget of before
/// (8 tries), then takes messages again: every portrait arrives exactly once, the closing text
/// last, the order delivered, and no event was given up on.
async fn a_whatsapp_outage_longer_than_the_old_retry_budget_still_delivers_every_portrait_once(postgres: bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // A retry base of 2 ms: backoff capped at 360 ms, horizon 34.56 s (24 h at the default).
    let vars = [("whatsapp_retry_base_ms", "2"), ("whatsapp_unconfirmed_wait_ms", "20"), ("whatsapp_pace_ms", "0")];
    let w = world_with(postgres, 1, 0, &vars).await;
    let down = std::sync::Arc::new(AtomicBool::new(true));
    let seen = images_refused_while(&w, down.clone());
    let order_id = pay(&w).await;
    training_started(&w).await;
    w.astria.finish(&w.app, &order_id).await;
    // Until the first portrait has been refused three times the old budget: condition, not time.
    // The relay runs as the every-minute job would: a sender invocation tries a message a
    // bounded number of times, then leaves its event, due at the next retry, to the relay.
    w.wait_until("24 refused image sends, relaying", Duration::from_secs(60), || async {
        if seen.lock().unwrap().refused >= 24 {
            return Some(());
        }
        wa::relay(&w.app).await;
        None
    })
    .await;
    let db = db(&w.app).await;
    assert_eq!(db.order_status(&order_id).await, "delivering", "not delivered while no portrait arrived");
    assert_eq!(db.count("SELECT COUNT(*) FROM outbound_messages WHERE status = 'failed'").await, 0);
    down.store(false, Ordering::SeqCst);

    let sends = every_portrait_accepted_once(&w, &seen).await;
    assert_eq!(sends.iter().filter(|s| wa::summary(s) == DONE).count(), 1);
    assert_eq!(db.order_status(&order_id).await, "delivered");
    assert_eq!(db.count("SELECT COUNT(*) FROM payment_issues").await, 0, "nothing to refund");
}

/// WhatsApp never takes the portraits within the horizon: the order is `delivery_failed`, its
/// refund flagged and given back, the metric says so, the customer never hears "delivered".
/// Once WhatsApp is back, the console's resend delivers every portrait once, closing text last.
async fn portraits_whatsapp_never_takes_fail_the_delivery_and_a_resend_delivers_them_once(postgres: bool) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // A retry base of 1 ms: horizon 17.28 s (24 h at the default), backoff capped at 180 ms.
    let vars = [("whatsapp_retry_base_ms", "1"), ("whatsapp_unconfirmed_wait_ms", "10"), ("whatsapp_pace_ms", "0")];
    let w = world_with(postgres, 1, 0, &vars).await;
    let down = std::sync::Arc::new(AtomicBool::new(true));
    let seen = images_refused_while(&w, down.clone());
    let order_id = pay(&w).await;
    training_started(&w).await;
    w.astria.finish(&w.app, &order_id).await;
    let db = db(&w.app).await;
    // Time passes for the horizon without the test waiting it out: once every portrait is
    // queued and WhatsApp has refused one, each was queued an hour ago as far as the sender
    // knows (the horizon counts from `queued_at`).
    let images = "SELECT COUNT(*) FROM outbound_messages WHERE kind = 'image'";
    w.wait_until("every portrait queued and one refused", Duration::from_secs(30), || async {
        (db.count(images).await as usize == IMAGES && seen.lock().unwrap().refused > 0).then_some(())
    })
    .await;
    db.execute("UPDATE outbound_messages SET queued_at = queued_at - 3600000 WHERE kind = 'image'", &[]).await;
    w.wait_until("the order delivery_failed, relaying", Duration::from_secs(90), || async {
        if db.order_status(&order_id).await == "delivery_failed" {
            return Some(());
        }
        wa::relay(&w.app).await;
        None
    })
    .await;
    let issue = db
        .rows("SELECT event_id, kind, detail FROM payment_issues WHERE order_id = $1", &[order_id.as_str().into()])
        .await;
    assert_eq!(issue.len(), 1, "{issue:?}");
    assert_eq!(
        (issue[0][0].text(), issue[0][1].text()),
        (format!("delivery-failed:{order_id}"), "needs_refund".into())
    );
    assert!(issue[0][2].text().contains("gave up after"), "{}", issue[0][2].text());
    // The refund's event waits in the outbox for the relay (the sender has no Redis).
    let refunds = w
        .wait_until("the payment refunded, relaying", Duration::from_secs(60), || async {
            let made = w.stripe.refunds();
            if !made.is_empty() {
                return Some(made);
            }
            wa::relay(&w.app).await;
            None
        })
        .await;
    assert_eq!(refunds.len(), 1, "{refunds:#?}");
    settle(&w).await;
    let (status, metrics) = w.app.metrics(wa::ADMIN_TOKEN).await;
    assert_eq!(status, 200);
    assert!(metrics.contains("astria_orders{status=\"delivery_failed\"} 1"), "{metrics}");
    let sends = w.graph.requests().await;
    assert!(!sends.iter().any(|s| wa::summary(s) == DONE), "never told 'delivered'");
    assert!(seen.lock().unwrap().accepted.is_empty());
    let failed = db.count("SELECT COUNT(*) FROM outbound_messages WHERE status = 'failed' AND kind = 'image'").await;
    assert_eq!(failed as usize, IMAGES, "every portrait given up");

    // Only a delivery_failed order is resent, and only by an operator.
    let path = format!("/maintenance/orders/{order_id}/resend");
    assert_eq!(w.app.call("POST", &path, None, None).await.0, 401);
    assert_eq!(
        w.app.call("POST", "/maintenance/orders/no-such-order/resend", Some(wa::ADMIN_TOKEN), None).await.0,
        404
    );
    down.store(false, Ordering::SeqCst);
    let (status, body) = w.app.call("POST", &path, Some(wa::ADMIN_TOKEN), None).await;
    assert_eq!((status, body["resent"].as_u64()), (202, Some(IMAGES as u64)), "{body}");
    every_portrait_accepted_once(&w, &seen).await;
    assert_eq!(db.order_status(&order_id).await, "delivered");
    let (status, _) = w.app.call("POST", &path, Some(wa::ADMIN_TOKEN), None).await;
    assert_eq!(status, 409, "a delivered order is not resent");
}

// ------------------------------------------------------------------ replayed callbacks

/// A valid prompt callback URL replayed 1,000 times (it is valid for 7 days and shows in
/// ingress logs) while a trainer is asking Astria about the order (its sync lease held): one
/// outbox row, and once the lease is free, one pass of one replica of three asks Astria (a
/// tune and a prompt list) for all of them. Before, every replay was a row and each of three
/// replicas asked Astria twice for each.
async fn a_callback_replayed_a_thousand_times_costs_one_event_and_one_pass(postgres: bool) {
    let w = world(postgres, 3, 0).await;
    let order_id = pay(&w).await;
    training_started(&w).await;
    settle(&w).await;
    let db = db(&w.app).await;
    let signals = "SELECT COUNT(*) FROM outbox WHERE event_type = 'tune.reconcile'";
    let before = (db.count(signals).await, w.astria.reads().await);
    // A trainer's pass is in flight: it holds the order's sync lease.
    let until = wa::unix_now() * 1000 + 600_000;
    db.execute(
        "INSERT INTO job_leases (name, holder, lease_until) VALUES ($1, 'a-trainer-mid-pass', $2)",
        &[format!("sync:{order_id}").as_str().into(), until.into()],
    )
    .await;
    let tune = w.astria.tunes().remove(0);
    w.astria.finish_silently(&order_id, &[1]);
    let body = serde_json::json!({ "prompt": { "id": 1, "tune_id": tune.id, "images": [], "trained_at": "t" } });
    use futures::StreamExt;
    let replays = futures::stream::iter(0..1000)
        .map(|_| fa::post(&w.app, &tune.prompt_callback, &body))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    // A replay that waited out SQLite's busy timeout behind the others' writes (three
    // replicas, 16 in flight, on a busy machine) is answered 503, which Astria retries; what
    // counts is that no answer is anything else and that the replays make one event.
    let unexpected: Vec<_> = replays.iter().filter(|(status, _)| ![200, 503].contains(status)).take(5).collect();
    assert!(unexpected.is_empty(), "replays answered neither 200 nor 503 (the first five): {unexpected:?}");
    let accepted = replays.iter().filter(|(status, _)| *status == 200).count();
    assert!(accepted >= 900, "only {accepted} of 1,000 replays were accepted");
    assert_eq!(db.count(signals).await, before.0 + 1, "1,000 replays are one event");
    assert_eq!(w.astria.reads().await, before.1, "no replica asked Astria while the lease is held");

    db.execute("DELETE FROM job_leases WHERE name = $1", &[format!("sync:{order_id}").as_str().into()]).await;
    let sends = w
        .wait_until("the prompt's portraits sent, relaying", Duration::from_secs(30), || async {
            let sends = w.graph.requests().await;
            if image_links(&sends).len() >= fa::IMAGES_PER_PROMPT {
                return Some(sends);
            }
            relay_now(&w.app).await;
            None
        })
        .await;
    settle(&w).await;
    assert_eq!(image_links(&sends).len(), fa::IMAGES_PER_PROMPT);
    // One pass of one replica reads the tune and the prompt list; a pass whose commit failed
    // (SQLite busy under three replicas) is retried whole. Before: 2 × 3 replicas × 1,000.
    let reads = w.astria.reads().await - before.1;
    let paths = w.astria.read_paths().await;
    assert!(
        (2..=6).contains(&reads) && reads % 2 == 0,
        "{reads} Astria reads for 1,000 replays: {:?}\n{}\n{}",
        &paths[before.1..],
        w.app.log(),
        std::fs::read_dir(w.app.state_dir.join("logs"))
            .map(|d| d
                .flatten()
                .map(|f| format!("== {:?}\n{}", f.path(), std::fs::read_to_string(f.path()).unwrap_or_default()))
                .collect::<Vec<_>>()
                .join("\n"))
            .unwrap_or_default()
    );
    assert_eq!(db.count(signals).await, before.0 + 1);
}

on_both!(a_callback_replayed_a_thousand_times_costs_one_event_and_one_pass);

on_both!(
    a_whatsapp_outage_longer_than_the_old_retry_budget_still_delivers_every_portrait_once,
    portraits_whatsapp_never_takes_fail_the_delivery_and_a_resend_delivers_them_once,
);
