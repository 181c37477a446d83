//! The app's own relay entry point (maintenance-service `POST /maintenance/relay`) delivering
//! an event that another component emitted while Redis was down, through the shared database.

use std::time::Duration;

use astria_tests::{app_manifest, spawn_app, wait_for_subscribers_at, AppConfig, TestApp, TestRedis};
use serde_json::Value;

const EVENT_APP: &str = include_str!("../fixtures/event-app/spin.toml");

async fn stats(app: &TestApp) -> Value {
    app.get("/events/stats").await.json().await.unwrap()
}

async fn relay(app: &TestApp, token: Option<&str>) -> (u16, Value) {
    app.call("POST", "/maintenance/relay", token, None).await
}

#[tokio::test]
async fn the_maintenance_relay_delivers_an_event_stuck_by_a_redis_outage_once_postgres() {
    let mut redis = TestRedis::start().await.unwrap();
    // Split as deployed: the consumer exits with Redis and is restarted; HTTP stays up.
    let split: &[(&str, &[&str])] = &[("probe", &["probe"]), ("consumer", &["consumer"])];
    let events = spawn_app(
        AppConfig { postgres: true, ..AppConfig::new(EVENT_APP) }
            .redis(redis.url())
            .split(split, Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let maintenance = spawn_app(
        AppConfig::new(app_manifest())
            .var("database_url", events.database_url.clone().unwrap())
            .redis(redis.url())
            .var("admin_token", "s3cret-admin")
            .split(&[("maintenance", &["maintenance-service"])], Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let channel = format!("{}events", events.channel_prefix);
    wait_for_subscribers_at(&redis.url(), &channel, 1).await.unwrap();

    redis.stop();
    let emitted: Value = events.post("/events/emit?n=1", "").await.json().await.unwrap();
    assert_eq!(emitted["published"], 0);

    // While Redis is down the relay answers 503 (retry later) and uses up no attempt.
    let (status, body) = relay(&maintenance, Some("s3cret-admin")).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"], "redis unavailable");

    redis.restart().await.unwrap();
    wait_for_subscribers_at(&redis.url(), &channel, 1).await.unwrap();

    for bad in [None, Some("wrong"), Some("s3cret-admi"), Some("s3cret-admin2"), Some("S3CRET-ADMIN")] {
        let (status, _) = relay(&maintenance, bad).await;
        assert_eq!(status, 401, "{bad:?}");
    }
    assert_eq!(stats(&events).await["outbox"]["pending"], 1, "refused calls relayed nothing");

    let (status, report) = relay(&maintenance, Some("s3cret-admin")).await;
    assert_eq!((status, report["republished"].as_i64()), (200, Some(1)), "{report}");
    let done = events
        .eventually(Duration::from_secs(10), || async {
            let s = stats(&events).await;
            (s["outbox"]["done"] == 1).then_some(s)
        })
        .await
        .unwrap_or_else(|| panic!("not delivered:\n{}\n{}", events.log(), maintenance.log()));
    assert_eq!(done["effects"], 1);
    assert_eq!(relay(&maintenance, Some("s3cret-admin")).await.1["republished"], 0, "done events stay done");
}

#[tokio::test]
async fn odd_replay_paths_are_refused_before_anything_else_and_never_crash() {
    let app = spawn_app(AppConfig::new(app_manifest()).var("admin_token", "ops")).await.unwrap();
    let odd = [
        "/maintenance/dead-letters/replay",
        "/maintenance/dead-letters//replay",
        "/maintenance/dead-letters/x",
        "/maintenance/dead-letters/a/b/replay",
        "/maintenance/dead-letters/",
    ];
    for path in odd {
        let anonymous = app.client.post(app.url(path)).send().await.unwrap();
        assert_eq!(anonymous.status(), 401, "{path}: authorised first");
        let operator = app.client.post(app.url(path)).bearer_auth("ops").send().await.unwrap();
        assert_eq!(operator.status(), 404, "{path}: a clear 404, not a trap");
    }
    assert!(!app.log().contains("trapped") && !app.log().contains("panicked"), "{}", app.log());
}

#[tokio::test]
async fn without_an_admin_token_configured_the_relay_refuses_everyone() {
    let app = spawn_app(AppConfig::new(app_manifest())).await.unwrap();
    assert_eq!(relay(&app, None).await.0, 401);
    assert_eq!(relay(&app, Some("")).await.0, 401);
    let (status, body) = relay(&app, Some("anything")).await;
    assert_eq!(status, 401);
    assert!(body["request_id"].is_string(), "{body}");
}

#[tokio::test]
async fn an_operator_sees_dead_letters_and_replays_them_postgres() {
    let events = spawn_app(AppConfig { postgres: true, ..AppConfig::new(EVENT_APP) }.var("relay_max_attempts", "2"))
        .await
        .unwrap();
    let maintenance = spawn_app(
        AppConfig::new(app_manifest())
            .var("database_url", events.database_url.clone().unwrap())
            .var("admin_token", "ops"),
    )
    .await
    .unwrap();
    astria_tests::wait_for_subscribers(&format!("{}events", events.channel_prefix), 1).await.unwrap();
    let emitted: Value = events.post("/events/emit?n=1&kind=poison", "").await.json().await.unwrap();
    let id = emitted["ids"][0].as_str().unwrap().to_string();

    // The event app's relay (test policy: 2 attempts, no backoff) dead-letters it.
    let dead = events
        .eventually(Duration::from_secs(20), || async {
            events.post("/events/relay", "").await;
            let s = stats(&events).await;
            (s["outbox"]["dead"] == 1).then_some(s)
        })
        .await;
    assert!(dead.is_some(), "not dead-lettered:\n{}", events.log());

    let get = |token: &'static str| {
        maintenance.client.get(maintenance.url("/maintenance/dead-letters")).bearer_auth(token).send()
    };
    assert_eq!(get("wrong").await.unwrap().status(), 401);
    let list: Value = get("ops").await.unwrap().json().await.unwrap();
    let letters = list["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 1, "{list}");
    assert_eq!(
        (letters[0]["id"].as_str(), letters[0]["event_type"].as_str()),
        (Some(id.as_str()), Some("probe.poison"))
    );

    let replay = |id: String| {
        maintenance
            .client
            .post(maintenance.url(&format!("/maintenance/dead-letters/{id}/replay")))
            .bearer_auth("ops")
            .send()
    };
    assert_eq!(replay(id.clone()).await.unwrap().status(), 200);
    assert_eq!(replay(id.clone()).await.unwrap().status(), 404, "no longer dead");
    assert_eq!(replay("no-such-event".into()).await.unwrap().status(), 404);
    let s = stats(&events).await;
    assert_eq!((s["outbox"]["dead"].as_i64(), s["outbox"]["pending"].as_i64()), (Some(0), Some(1)), "{s}");
}
