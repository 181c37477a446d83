//! The event pipeline through real components (tests/components/event-*), devhost and real
//! Redis, on SQLite and PostgreSQL: nothing lost when Redis is down, nothing acted on twice by
//! replicas, failed consumers retried, poison events dead-lettered.

use std::time::Duration;

use astria_tests::{spawn_app, wait_for_subscribers, wait_for_subscribers_at, AppConfig, TestApp, TestRedis};
use serde_json::Value;

const MANIFEST: &str = include_str!("../fixtures/event-app/spin.toml");

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

fn config(backend: Backend) -> AppConfig {
    AppConfig { postgres: matches!(backend, Backend::Postgres), ..AppConfig::new(MANIFEST) }
}

async fn post_json(app: &TestApp, path: &str) -> Value {
    let r = app.post(path, "").await;
    assert_eq!(r.status(), 200, "POST {path}");
    r.json().await.unwrap()
}

async fn stats(app: &TestApp) -> Value {
    let r = app.get("/events/stats").await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Waits until `stats` satisfies `pred`, and returns them.
async fn wait_stats(app: &TestApp, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
    let found = app
        .eventually(timeout, || async {
            let s = stats(app).await;
            pred(&s).then_some(s)
        })
        .await;
    match found {
        Some(s) => s,
        None => panic!("condition not reached; last stats {}\nlog:\n{}", stats(app).await, app.log()),
    }
}

/// Waits until the fixture has nothing left to do (no event pending or published but not
/// completed, and the counts unchanged over two looks), then answers its stats: counts compared
/// after it are final. Fails if that never comes.
async fn quiet_stats(app: &TestApp) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut last = Value::Null;
    loop {
        let s = stats(app).await;
        let idle = s["outbox"]["pending"] == 0 && s["outbox"]["published"] == 0;
        if idle && s == last {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "never quiet; last stats {s}\n{}", app.log());
        last = s;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The fixture split as the app is deployed: the HTTP component and the Redis-trigger consumer
/// in processes of their own, the consumer restarted after it exits (Spin's trigger ends when
/// Redis goes away).
const SPLIT: &[(&str, &[&str])] = &[("probe", &["probe"]), ("consumer", &["consumer"])];

async fn survives_a_redis_outage(backend: Backend) {
    let mut redis = TestRedis::start().await.unwrap();
    let app = spawn_app(config(backend).redis(redis.url()).split(SPLIT, Duration::from_millis(500))).await.unwrap();
    let channel = format!("{}events", app.channel_prefix);
    wait_for_subscribers_at(&redis.url(), &channel, 1).await.unwrap();

    redis.stop();
    app.wait_until("the consumer's process to exit with Redis", Duration::from_secs(10), || async {
        (!app.process("consumer").exits().is_empty()).then_some(())
    })
    .await;
    let emitted = post_json(&app, "/events/emit?n=1").await;
    assert_eq!(emitted["published"], 0, "Redis is down: nothing published");
    let s = stats(&app).await;
    assert_eq!((s["outbox"]["pending"].as_i64(), s["effects"].as_i64()), (Some(1), Some(0)), "{s}");

    // While Redis is down the relay cannot help, and it says so without using up attempts.
    let report = post_json(&app, "/events/relay").await;
    assert_eq!(report["redis_unavailable"], true, "{report}");

    redis.restart().await.unwrap();
    wait_for_subscribers_at(&redis.url(), &channel, 1).await.unwrap();
    let report = post_json(&app, "/events/relay").await;
    assert_eq!(report["republished"], 1, "{report}");
    let s = wait_stats(&app, Duration::from_secs(10), |s| s["effects"] == 1 && s["outbox"]["done"] == 1).await;
    assert_eq!(s["distinct_effects"], 1);

    // Once done, the relay leaves it alone: acted on once.
    assert_eq!(post_json(&app, "/events/relay").await["republished"], 0);
    assert_eq!(quiet_stats(&app).await["effects"], 1);
    assert_eq!(app.process("probe").exits(), vec![], "the HTTP process never stopped");
}

#[tokio::test]
async fn an_event_published_while_redis_is_down_is_acted_on_once_after_it_returns_sqlite() {
    survives_a_redis_outage(Backend::Sqlite).await;
}

#[tokio::test]
async fn an_event_published_while_redis_is_down_is_acted_on_once_after_it_returns_postgres() {
    survives_a_redis_outage(Backend::Postgres).await;
}

async fn three_replicas_act_once(backend: Backend) {
    let first = spawn_app(config(backend)).await.unwrap();
    let second = spawn_app(config(backend).replica_of(&first)).await.unwrap();
    let third = spawn_app(config(backend).replica_of(&first)).await.unwrap();
    let channel = format!("{}events", first.channel_prefix);
    wait_for_subscribers(&channel, 3).await.unwrap();

    let emitted = post_json(&first, "/events/emit?n=200").await;
    assert_eq!(emitted["published"], 200);
    let s = wait_stats(&first, Duration::from_secs(60), |s| s["outbox"]["done"] == 200).await;
    assert_eq!((s["effects"].as_i64(), s["distinct_effects"].as_i64()), (Some(200), Some(200)), "{s}");

    // Every replica received every message; exactly one acted on each.
    assert_eq!(quiet_stats(&third).await["effects"], 200);
    drop((second, third));
}

#[tokio::test]
async fn with_three_replicas_each_of_200_events_is_acted_on_exactly_once_sqlite() {
    three_replicas_act_once(Backend::Sqlite).await;
}

#[tokio::test]
async fn with_three_replicas_each_of_200_events_is_acted_on_exactly_once_postgres() {
    three_replicas_act_once(Backend::Postgres).await;
}

async fn failed_consumer_is_redelivered(backend: Backend) {
    let app = spawn_app(config(backend)).await.unwrap();
    wait_for_subscribers(&format!("{}events", app.channel_prefix), 1).await.unwrap();
    post_json(&app, "/events/emit?n=1&kind=fail_once").await;
    // The first delivery fails: the claim and the effect are rolled back together.
    wait_stats(&app, Duration::from_secs(10), |_| app.log().contains("failing once")).await;
    let s = stats(&app).await;
    assert_eq!((s["effects"].as_i64(), s["outbox"]["published"].as_i64()), (Some(0), Some(1)), "{s}");

    post_json(&app, "/events/relay").await;
    let s = wait_stats(&app, Duration::from_secs(10), |s| s["outbox"]["done"] == 1).await;
    assert_eq!(s["effects"], 1);
}

#[tokio::test]
async fn a_consumer_that_fails_mid_way_gets_the_event_again_and_completes_it_once_sqlite() {
    failed_consumer_is_redelivered(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_consumer_that_fails_mid_way_gets_the_event_again_and_completes_it_once_postgres() {
    failed_consumer_is_redelivered(Backend::Postgres).await;
}

async fn poison_is_dead_lettered(backend: Backend) {
    let app = spawn_app(config(backend).var("relay_max_attempts", "3")).await.unwrap();
    wait_for_subscribers(&format!("{}events", app.channel_prefix), 1).await.unwrap();
    post_json(&app, "/events/emit?n=1&kind=poison").await;
    let mut relays = 0;
    let s = app
        .eventually(Duration::from_secs(20), || {
            relays += 1;
            let app = &app;
            async move {
                post_json(app, "/events/relay").await;
                let s = stats(app).await;
                (s["outbox"]["dead"] == 1).then_some(s)
            }
        })
        .await
        .unwrap_or_else(|| panic!("never dead-lettered:\n{}", app.log()));
    assert_eq!(s["effects"], 0);
    // Dead letters stay dead: the relay publishes them no more.
    let report = post_json(&app, "/events/relay").await;
    assert_eq!((report["republished"].as_i64(), report["dead_lettered"].as_i64()), (Some(0), Some(0)), "{report}");
    // The consumer's own failure line, once per delivery (the dead-letter line names the event
    // type, not the consumer's error).
    let failures = app.log().matches(r#"Refused("poison")"#).count();
    assert_eq!(failures, 3, "delivered relay_max_attempts times before dying:\n{}", app.log());
    assert!(relays >= 2, "the relay, not the first publish, delivered the retries ({relays} rounds)");
}

#[tokio::test]
async fn a_poison_event_ends_in_dead_letter_after_the_configured_attempts_sqlite() {
    poison_is_dead_lettered(Backend::Sqlite).await;
}

#[tokio::test]
async fn a_poison_event_ends_in_dead_letter_after_the_configured_attempts_postgres() {
    poison_is_dead_lettered(Backend::Postgres).await;
}

#[tokio::test]
async fn a_message_that_is_not_an_event_is_dropped_without_failing_the_consumer() {
    let app = spawn_app(config(Backend::Sqlite)).await.unwrap();
    let channel = format!("{}events", app.channel_prefix);
    wait_for_subscribers(&channel, 1).await.unwrap();
    astria_tests::redis_publish(&channel, b"{not json").await.unwrap();
    post_json(&app, "/events/emit?n=1").await;
    let s = wait_stats(&app, Duration::from_secs(10), |s| s["outbox"]["done"] == 1).await;
    assert_eq!(s["effects"], 1);
    assert!(app.log().contains("not an event envelope"), "{}", app.log());
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_with_413_and_a_request_id() {
    let app = spawn_app(config(Backend::Sqlite)).await.unwrap();
    let ok = app.post("/events/limited", vec![b'x'; 1024]).await;
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.json::<Value>().await.unwrap()["bytes"], 1024);

    // A declared 5 MB body is refused from its headers alone, before any of it is read.
    let (status, body) = app.headers_only_post("/events/limited", 5 * 1024 * 1024).await;
    assert_eq!(status, 413, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "request body larger than 1024 bytes");
    assert!(body["request_id"].is_string());

    // Without a content-length (chunked), the limit holds while streaming.
    let chunks = futures::stream::iter((0..30).map(|_| Ok::<_, std::io::Error>(vec![b'y'; 100])));
    let r = app.client.post(app.url("/events/limited")).body(reqwest::Body::wrap_stream(chunks)).send().await.unwrap();
    assert_eq!(r.status(), 413);
}
