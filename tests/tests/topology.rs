//! The shipped topology (kubernetes/base: an HTTP SpinApp and a worker SpinApp per service),
//! one supervised host process per SpinApp, through Redis outages. Spin's Redis trigger never
//! reconnects: a worker exits when Redis goes and is restarted after a delay, as the kubelet
//! would; the HTTP SpinApps have no Redis trigger and keep answering. Nothing is lost (the
//! outbox and the relay) and nothing is done twice (the claims).

use std::time::{Duration, Instant};

use astria_tests::astria as fa;
use astria_tests::stripe as ps;
use astria_tests::whatsapp::{self as wa, FakeGraph};
use astria_tests::world::{Options, World};
use astria_tests::{TestApp, TestRedis};
use serde_json::Value;

const ANA: &str = "4915112345678";
/// Messages Ana has received once her order is training.
const BEFORE_IMAGES: usize = 9;
const IMAGES: usize = fa::PROMPTS as usize * fa::IMAGES_PER_PROMPT;
/// How long the kubelet (here, the harness) waits before starting an exited process again.
const RESTART_DELAY: Duration = Duration::from_millis(1500);
const HTTP_SPINAPPS: [&str; 4] = ["astria-message", "astria-image", "astria-payment", "astria-maintenance"];
const WORKERS: [&str; 4] =
    ["astria-message-worker", "astria-conversation-worker", "astria-image-worker", "astria-payment-worker"];

/// The app as SpinKube runs it, with its fakes (`astria_tests::world`).
async fn world(postgres: bool) -> World {
    World::start(Options::on(postgres).as_deployment(RESTART_DELAY)).await
}

/// Waits until the fake WhatsApp has `n` sends, calling the relay every second as the CronJob
/// does every minute; fails with what was sent if they do not come within `timeout`.
async fn sends_with_relay(w: &World, n: usize, timeout: Duration) -> Vec<Value> {
    let last_relay = std::cell::Cell::new(Instant::now() - Duration::from_secs(1));
    // What had arrived at the last look, for the report if the rest never comes.
    let seen = std::cell::RefCell::new(Vec::<Value>::new());
    let (last_relay, seen_ref) = (&last_relay, &seen);
    let what = format!("{n} sends, relaying every second");
    astria_tests::wait_until_or(
        &what,
        timeout,
        || async move {
            let sends = w.graph.requests().await;
            if sends.len() >= n {
                return Some(sends);
            }
            *seen_ref.borrow_mut() = sends;
            if last_relay.get().elapsed() >= Duration::from_secs(1) {
                wa::relay(&w.app).await;
                last_relay.set(Instant::now());
            }
            None
        },
        || {
            format!(
                "{:#?}
{}",
                seen.borrow().iter().map(wa::summary).collect::<Vec<_>>(),
                w.app.log()
            )
        },
    )
    .await
}

/// Ana orders, sends two photos and pays; answers her order id once training has started.
async fn order_paid_and_training(w: &World) -> String {
    let steps = wa::order_steps(ANA, "o");
    for (i, m) in steps.into_iter().enumerate() {
        assert_eq!(wa::post_webhook(&w.app, &wa::inbound(ANA, vec![m])).await.0, 200);
        sends_with_relay(w, i + 1, Duration::from_secs(20)).await;
    }
    let sends = sends_with_relay(w, 7, Duration::from_secs(20)).await;
    let order_id = ps::pay_link(&w.app, &w.stripe, &sends[6]).await;
    let sends = sends_with_relay(w, BEFORE_IMAGES, Duration::from_secs(20)).await;
    assert!(wa::summary(&sends[8]).starts_with("text:Your AI model is training"), "{:?}", wa::summary(&sends[8]));
    order_id
}

/// Every HTTP SpinApp's readiness route answers 200 through the proxy (the Ingress/Services).
async fn http_spinapps_ready(app: &TestApp) {
    for service in ["message", "image", "payment", "maintenance"] {
        let r = app.get(&format!("/health/{service}")).await;
        assert_eq!(r.status(), 200, "/health/{service} during the outage:\n{}", app.log());
    }
}

/// Waits (bounded) until every worker has exited at least `n` times.
async fn workers_exited(app: &TestApp, n: usize) {
    app.wait_until(&format!("every worker to exit {n} times"), Duration::from_secs(30), || async {
        WORKERS.iter().all(|w| app.process(w).exits().len() >= n).then_some(())
    })
    .await;
}

async fn redis_outage_mid_journey(postgres: bool) {
    let mut w = world(postgres).await;
    let order_id = order_paid_and_training(&w).await;
    assert_eq!(w.astria.creates(), 1);

    // Redis goes away for 20 s while Astria finishes and Ana writes.
    let outage = Instant::now();
    w.redis.stop();
    workers_exited(&w.app, 1).await;
    let log = w.app.log();
    assert!(log.contains(&format!("disconnected from 127.0.0.1:{}", w.redis.port)), "Spin's words:\n{log}");
    w.astria.finish(&w.app, &order_id).await; // the callbacks answer 200 (asserted inside)
    let (status, report) = wa::post_webhook(&w.app, &wa::inbound(ANA, vec![wa::text(ANA, "o7", "status")])).await;
    assert_eq!((status, report["messages"].as_i64()), (200, Some(1)), "{report}");
    http_spinapps_ready(&w.app).await;
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(outage.elapsed())).await;

    // Through the whole outage: the workers kept exiting and being restarted, the HTTP SpinApps
    // never stopped, and nothing reached the customer.
    for name in WORKERS {
        assert!(w.app.process(name).exits().len() >= 2, "{name} restarted and exited again:\n{}", w.app.log());
    }
    for name in HTTP_SPINAPPS {
        assert_eq!(w.app.process(name).exits(), vec![], "{name} stayed up:\n{}", w.app.log());
    }
    assert_eq!(w.graph.requests().await.len(), BEFORE_IMAGES, "nothing could be announced while Redis was down");

    // Redis returns: the workers come back on their next restart and the relay announces what
    // waited in the outbox. Ana gets her status answer, every portrait and the closing message.
    w.redis.restart().await.unwrap();
    let total = BEFORE_IMAGES + 1 + IMAGES + 1;
    sends_with_relay(&w, total, Duration::from_secs(60)).await;
    // A few more relay rounds and a pause: nothing further may arrive.
    for _ in 0..3 {
        wa::relay(&w.app).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let sends = w.graph.requests().await;
    let summaries: Vec<String> = sends.iter().map(wa::summary).collect();
    assert_eq!(sends.len(), total, "every reply and portrait exactly once: {summaries:#?}");
    let mut links: Vec<String> = sends
        .iter()
        .filter(|s| s["type"] == "image")
        .map(|s| s["image"]["link"].as_str().unwrap().to_string())
        .collect();
    links.sort();
    links.dedup();
    assert_eq!(links.len(), IMAGES, "each portrait once: {summaries:#?}");
    assert_eq!(summaries.last().unwrap(), "text:Your portraits have been delivered. Want another pack? Reply MENU.");
    assert_eq!(w.astria.creates(), 1, "one tune");
    for name in HTTP_SPINAPPS {
        assert_eq!(w.app.process(name).exits(), vec![], "{name} never restarted");
    }
    for name in WORKERS {
        assert!(w.app.process(name).is_running(), "{name} runs again");
    }
}

#[tokio::test]
async fn a_20_second_redis_outage_mid_journey_keeps_webhooks_up_and_loses_or_doubles_nothing_sqlite() {
    redis_outage_mid_journey(false).await;
}

#[tokio::test]
async fn a_20_second_redis_outage_mid_journey_keeps_webhooks_up_and_loses_or_doubles_nothing_postgres() {
    redis_outage_mid_journey(true).await;
}

#[tokio::test]
async fn with_redis_absent_at_start_the_http_spinapps_serve_and_the_workers_wait_for_it() {
    let mut redis = TestRedis::start().await.unwrap();
    redis.stop();
    let graph = FakeGraph::start().await;
    let config = wa::bot_config(&graph, &redis, false).as_deployment(RESTART_DELAY);
    let app = astria_tests::spawn_app(astria_tests::AppConfig { skip_worker_wait: true, ..config }).await.unwrap();
    workers_exited(&app, 1).await;
    http_spinapps_ready(&app).await;
    let (status, report) = wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "a1", "hi")])).await;
    assert_eq!((status, report["messages"].as_i64()), (200, Some(1)), "{report}");
    for name in HTTP_SPINAPPS {
        assert_eq!(app.process(name).exits(), vec![], "{name} serves without Redis");
    }

    redis.restart().await.unwrap();
    astria_tests::wait_for_subscribers_at(&redis.url(), "astria.messages", 1).await.unwrap();
    app.wait_until("the reply, relaying", Duration::from_secs(20), || async {
        if !graph.requests().await.is_empty() {
            return Some(());
        }
        wa::relay(&app).await;
        None
    })
    .await;
    for _ in 0..3 {
        wa::relay(&app).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sends = graph.requests().await;
    assert_eq!(sends.len(), 1, "the reply once: {:#?}", sends.iter().map(wa::summary).collect::<Vec<_>>());
    assert!(wa::summary(&sends[0]).starts_with("list:"), "{}", wa::summary(&sends[0]));
}

#[tokio::test]
async fn a_redis_that_needs_a_password_is_reached_with_it_in_redis_url_only() {
    const PASSWORD: &str = "s3cret-redis-passw0rd";
    let redis = TestRedis::start_with_password(PASSWORD).await.unwrap();
    let graph = FakeGraph::start().await;
    // redis_url carries the password; redis_host (allowed_outbound_hosts) cannot, and does not.
    let config = wa::bot_config(&graph, &redis, false).as_deployment(RESTART_DELAY);
    assert_eq!(config.env["SPIN_VARIABLE_REDIS_HOST"], format!("redis://127.0.0.1:{}", redis.port));
    let app = wa::spawn_bot(config, &redis).await;
    let (status, report) = wa::post_webhook(&app, &wa::inbound(ANA, vec![wa::text(ANA, "p1", "hi")])).await;
    assert_eq!((status, report["messages"].as_i64()), (200, Some(1)), "{report}");
    let sends = graph.wait_for(1).await;
    assert_eq!(sends.len(), 1, "published with the password, heard by the worker's trigger:\n{}", app.log());
    assert!(!app.log().contains(PASSWORD), "the password is in no log:\n{}", app.log());
}

/// A worker whose Redis connection goes silent (a NAT or load balancer dropped it without a
/// word) is named by its heartbeat. Spin's Redis trigger has no ping: the deaf replica's Spin
/// never notices (its HTTP, which Spin stops when a trigger ends, still answers; Redis still
/// counts its subscription), while every relay call's heartbeat is booked by the healthy
/// replica only, and the metrics route shows the deaf one's heartbeat growing old.
/// `ASTRIA_DEAF_OBSERVE_SECS=n` keeps watching the deaf replica for n seconds more and prints
/// whether Spin ever noticed (a measurement, off by default).
#[tokio::test]
async fn a_worker_whose_redis_connection_goes_silent_is_named_by_its_heartbeat() {
    use astria_tests::fakes::BlackHole;
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let redis = TestRedis::start().await.unwrap();
    let graph = FakeGraph::start().await;
    let healthy = wa::spawn_bot(wa::bot_config(&graph, &redis, false).var("replica_name", "replica-a"), &redis).await;
    let proxy = BlackHole::start(redis.port).await;
    let config = wa::bot_config(&graph, &redis, false).replica_of(&healthy).redis(proxy.redis_url());
    let deaf = astria_tests::spawn_app(config.var("replica_name", "replica-b")).await.unwrap();
    astria_tests::wait_for_subscribers_at(&redis.url(), "astria.messages", 2).await.unwrap();
    let db = astria_tests::db::TestDb::of(&healthy).await;
    let heard = |replica: &'static str| {
        let db = &db;
        async move {
            db.rows("SELECT channel, seen_at FROM worker_heartbeats WHERE replica = $1", &[replica.into()])
                .await
                .iter()
                .map(|r| (r[0].text(), r[1].int()))
                .collect::<std::collections::BTreeMap<String, i64>>()
        }
    };
    healthy
        .wait_until("both replicas heard a heartbeat on every channel", Duration::from_secs(30), || async {
            wa::relay(&healthy).await;
            // astria.payments, .orders, .messages and .inbox: every worker channel.
            (heard("replica-a").await.len() == 4 && heard("replica-b").await.len() == 4).then_some(())
        })
        .await;
    // One more heartbeat, heard by both on every channel: then none is in flight at the cut.
    let (a0, b0) = (heard("replica-a").await, heard("replica-b").await);
    wa::relay(&healthy).await;
    healthy
        .wait_until("both replicas heard the last heartbeat before the cut", Duration::from_secs(30), || async {
            let (a, b) = (heard("replica-a").await, heard("replica-b").await);
            a.iter()
                .chain(b.iter())
                .all(|(ch, seen)| *seen > a0.get(ch).max(b0.get(ch)).copied().unwrap_or(0))
                .then_some(())
        })
        .await;

    proxy.close();
    let cut = now();
    for round in 0..3 {
        let before = heard("replica-a").await["astria.messages"];
        healthy
            .wait_until(&format!("replica-a booked heartbeat {round}"), Duration::from_secs(30), || async {
                wa::relay(&healthy).await;
                (heard("replica-a").await["astria.messages"] > before).then_some(())
            })
            .await;
    }
    let b = heard("replica-b").await;
    assert!(b.values().all(|seen| *seen < cut), "the deaf replica heard nothing since the cut: {b:?}");
    assert_eq!(deaf.get("/health/message").await.status(), 200, "Spin did not notice: its triggers still run");
    let (status, text) = healthy.metrics(wa::ADMIN_TOKEN).await;
    assert_eq!(status, 200);
    let age = |replica: &str| -> i64 {
        let prefix =
            format!("astria_worker_heartbeat_age_seconds{{channel=\"astria.messages\",replica=\"{replica}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.parse().ok()).expect(&prefix)
    };
    assert!(age("replica-b") >= age("replica-a"), "{text}");
    assert!(age("replica-b") * 1000 >= now() - cut - 1000, "its age counts from before the cut: {text}");

    let observe: u64 = std::env::var("ASTRIA_DEAF_OBSERVE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    if observe > 0 {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(observe) && deaf.get("/health/message").await.status() == 200 {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let b = heard("replica-b").await;
        let running = deaf.get("/health/message").await.status() == 200;
        eprintln!(
            "black-holed for {} s: the deaf replica's Spin {} (booked no heartbeat since the cut: {})",
            (now() - cut) / 1000,
            if running { "never noticed" } else { "stopped" },
            b.values().all(|seen| *seen < cut)
        );
    }
}
