//! devhost's behaviour, each test through real wasm components (tests/components) served by
//! the real host binary: routing, chaining, variables, outbound rules, stores, PostgreSQL,
//! Redis triggers, instance isolation and traps.

use std::time::Duration;

use astria_tests::fakes::{fake_server, matchers, port, Mock, ResponseTemplate};
use astria_tests::{
    redis_publish, spawn_app, spawn_app_expecting_failure, wait_for_subscribers, wait_for_subscribers_at, AppConfig,
    TestApp, TestRedis,
};

const MANIFEST: &str = include_str!("../fixtures/probe-app/spin.toml");

fn probe_app() -> AppConfig {
    AppConfig::new(MANIFEST).var("api_token", "t0ken-value")
}

async fn text(app: &TestApp, path: &str) -> (u16, String) {
    let r = app.get(path).await;
    (r.status().as_u16(), r.text().await.unwrap())
}

async fn json(app: &TestApp, path: &str) -> serde_json::Value {
    let r = app.get(path).await;
    assert_eq!(r.status(), 200, "GET {path}");
    r.json().await.unwrap()
}

#[tokio::test]
async fn wildcard_routes_get_spin_headers_and_path_info() {
    let app = spawn_app(probe_app()).await.unwrap();
    let h = json(&app, "/probe/headers?x=1").await;
    assert_eq!(h["spin-path-info"], "/headers");
    assert_eq!(h["spin-matched-route"], "/probe/...");
    assert_eq!(h["spin-raw-component-route"], "/probe/...");
    assert_eq!(h["spin-component-route"], "/probe");
    assert_eq!(h["spin-base-path"], "/");
    let port = app.address.rsplit(':').next().unwrap();
    assert_eq!(h["spin-full-url"], format!("http://127.0.0.1:{port}/probe/headers?x=1"));
    assert!(h["spin-client-addr"].as_str().unwrap().starts_with("127.0.0.1:"));
}

#[tokio::test]
async fn exact_route_beats_the_wildcard_and_has_no_path_info() {
    let app = spawn_app(probe_app()).await.unwrap();
    let h = json(&app, "/probe/exact").await;
    assert_eq!(h["spin-matched-route"], "/probe/exact");
    assert_eq!(h["spin-path-info"], "");
    assert_eq!(h["spin-component-route"], "/probe/exact");
}

#[tokio::test]
async fn unrouted_paths_are_404_and_spin_well_known_routes_answer() {
    let app = spawn_app(probe_app()).await.unwrap();
    assert_eq!(text(&app, "/nowhere").await.0, 404);
    assert_eq!(text(&app, "/probex").await.0, 404, "a wildcard matches whole segments only");
    assert_eq!(text(&app, "/.well-known/spin/health").await, (200, "OK".into()));
}

#[tokio::test]
async fn devhost_only_spin_info_names_the_app() {
    let app = spawn_app(probe_app()).await.unwrap();
    let info = json(&app, "/.well-known/spin/info").await;
    assert_eq!(info["app"], "host-probe");
}

#[tokio::test]
async fn private_component_is_reachable_only_by_allowed_service_chaining() {
    let app = spawn_app(probe_app()).await.unwrap();
    let (status, body) = text(&app, "/probe/fetch?url=http://backend.spin.internal/headers").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("200 "), "{body}");
    assert!(body.contains("\"spin-path-info\":\"/headers\""), "{body}");

    let (status, body) = text(&app, "/denied/fetch?url=http://backend.spin.internal/headers").await;
    assert_eq!(status, 502, "a component without the host in allowed_outbound_hosts is refused: {body}");
    assert!(body.contains("send failed"), "{body}");
}

#[tokio::test]
async fn variables_come_from_defaults_and_templates() {
    let app = spawn_app(probe_app()).await.unwrap();
    assert_eq!(text(&app, "/probe/var?name=greeting").await, (200, "hello world".into()));
    assert_eq!(text(&app, "/probe/var?name=token").await, (200, "t0ken-value".into()));
    let (status, body) = text(&app, "/probe/var?name=not_bound").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("Undefined"), "{body}");
    assert_eq!(text(&app, "/probe/env?name=PROBE_ENV").await, (200, "from-manifest".into()));
}

#[tokio::test]
async fn environment_overrides_a_variable_default() {
    let app = spawn_app(probe_app().var("name", "devhost")).await.unwrap();
    assert_eq!(text(&app, "/probe/var?name=greeting").await, (200, "hello devhost".into()));
}

#[tokio::test]
async fn missing_required_variable_stops_start_up_naming_it() {
    let err = spawn_app_expecting_failure(AppConfig::new(MANIFEST)).await.unwrap();
    assert!(err.contains("api_token"), "{err}");
}

#[tokio::test]
async fn devhost_only_a_secret_variable_value_never_appears_in_the_host_log() {
    let app = spawn_app(probe_app()).await.unwrap();
    assert_eq!(text(&app, "/probe/var?name=token&print=1").await.0, 200);
    let log = app.log();
    assert!(log.contains("variable value is ***"), "the component's line is logged, redacted: {log}");
    assert!(!log.contains("t0ken-value"), "{log}");
}

#[tokio::test]
async fn outbound_http_reaches_an_allowed_host_only() {
    let allowed = fake_server().await;
    Mock::given(matchers::method("GET"))
        .and(matchers::path("/ping"))
        .respond_with(ResponseTemplate::new(200).set_body_string("pong"))
        .expect(1)
        .mount(&allowed)
        .await;
    let other = fake_server().await;
    Mock::given(matchers::any()).respond_with(ResponseTemplate::new(200)).expect(0).mount(&other).await;

    let app = spawn_app(probe_app().var("fake_port", port(&allowed).to_string())).await.unwrap();
    let (status, body) = text(&app, &format!("/probe/fetch?url={}/ping", allowed.uri())).await;
    assert_eq!((status, body.as_str()), (200, "200 pong"));
    let (status, body) = text(&app, &format!("/probe/fetch?url={}/ping", other.uri())).await;
    assert_eq!(status, 502, "{body}");
}

#[tokio::test]
async fn key_value_and_sqlite_data_persist_across_requests_and_restarts() {
    let state = tempfile::tempdir().unwrap();
    let config = AppConfig { state_dir: Some(state.path().to_path_buf()), ..probe_app() };
    {
        let app = spawn_app(config.clone()).await.unwrap();
        assert_eq!(app.post("/probe/kv?key=colour", "teal").await.status(), 204);
        assert_eq!(text(&app, "/probe/kv?key=colour").await, (200, "teal".into()));
        assert_eq!(json(&app, "/probe/sqlite?note=first").await, serde_json::json!(["first"]));
    }
    let app = spawn_app(config).await.unwrap();
    assert_eq!(text(&app, "/probe/kv?key=colour").await, (200, "teal".into()));
    assert_eq!(json(&app, "/probe/sqlite?note=second").await, serde_json::json!(["first", "second"]));
    assert_eq!(text(&app, "/probe/kv?key=missing").await.0, 404);
}

#[tokio::test]
async fn a_key_value_store_not_granted_to_the_component_is_denied() {
    let app = spawn_app(probe_app()).await.unwrap();
    let (status, body) = text(&app, "/probe/kv-denied").await;
    assert_eq!(status, 403);
    assert!(body.contains("AccessDenied"), "{body}");
}

#[tokio::test]
async fn postgres_round_trip_through_the_component() {
    let app = spawn_app(AppConfig { postgres: true, ..probe_app() }).await.unwrap();
    let url = app.database_url.clone().unwrap();
    let row = json(&app, &format!("/probe/pg?url={url}&table=things")).await;
    assert_eq!(
        row,
        serde_json::json!({"id": 42, "name": "zoë 📸", "ok": true, "data": [0, 1, 2, 255], "n_is_null": true})
    );

    // The row is really in the database.
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let name: String = client.query_one("SELECT name FROM things WHERE id = 42", &[]).await.unwrap().get(0);
    assert_eq!(name, "zoë 📸");
}

#[tokio::test]
async fn postgres_connections_are_kept_between_requests_as_spin_pools_them() {
    // Spin's PostgreSQL host pools connections per address; with a connection per `open`, a
    // few hundred requests/s ran PostgreSQL out of connections under devhost alone.
    let app = spawn_app(AppConfig { postgres: true, ..probe_app() }).await.unwrap();
    let url = app.database_url.clone().unwrap();
    let mut pids = std::collections::HashSet::new();
    for _ in 0..20 {
        let (status, body) = text(&app, &format!("/probe/pg-backend?url={url}")).await;
        assert_eq!(status, 200, "{body}");
        pids.insert(body);
    }
    // One request at a time needs one connection; a second can be opened while the previous
    // instance is still being torn down, but never one per request.
    assert!(pids.len() <= 3, "20 requests one at a time were served by {} server processes", pids.len());
}

#[tokio::test]
async fn postgres_address_not_allowed_is_refused() {
    let app = spawn_app(AppConfig { postgres: true, ..probe_app() }).await.unwrap();
    let url = app.database_url.clone().unwrap().replace("127.0.0.1:5432", "localhost:5432");
    let (status, body) = text(&app, &format!("/probe/pg?url={url}")).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("not permitted"), "{body}");
}

async fn wait_for_kv(app: &TestApp, key: &str) -> Option<String> {
    app.eventually(Duration::from_secs(10), || async {
        let (status, body) = text(app, &format!("/probe/kv?key={key}")).await;
        (status == 200).then_some(body)
    })
    .await
}

#[tokio::test]
async fn redis_trigger_delivers_messages_from_a_real_redis() {
    let app = spawn_app(probe_app()).await.unwrap();
    let channel = format!("{}probe", app.channel_prefix);
    wait_for_subscribers(&channel, 1).await.unwrap();

    redis_publish(&channel, b"from-test").await.unwrap();
    assert_eq!(wait_for_kv(&app, "msg:from-test").await.as_deref(), Some("from-test"));

    // The app's own outbound Redis publish reaches its trigger too.
    let r = app.post(&format!("/probe/publish?address=redis://127.0.0.1:6379&channel={channel}"), "from-app").await;
    assert_eq!(r.status(), 204);
    assert_eq!(wait_for_kv(&app, "msg:from-app").await.as_deref(), Some("from-app"));
    assert_eq!(wait_for_kv(&app, "count:from-app").await.as_deref(), Some("1"));
}

/// What a Spin host does when its Redis trigger loses the server: it stops every trigger of
/// the app, HTTP included, with this line and status 1 (Spin's `spin up`; devhost the same).
const TRIGGER_EXITED: &str = "A trigger exited unexpectedly. Terminating.";

#[tokio::test]
async fn a_redis_trigger_that_loses_its_server_stops_the_whole_app_with_status_1() {
    let mut redis = TestRedis::start().await.unwrap();
    let mut app = spawn_app(probe_app().var("redis_address", redis.url())).await.unwrap();
    let channel = format!("{}probe", app.channel_prefix);
    wait_for_subscribers_at(&redis.url(), &channel, 1).await.unwrap();
    assert_eq!(text(&app, "/probe/headers").await.0, 200);

    redis.stop();
    let status =
        app.wait_exit(Duration::from_secs(15)).await.unwrap_or_else(|| panic!("still running:\n{}", app.log()));
    assert_eq!(status.code(), Some(1), "{}", app.log());
    let log = app.log();
    assert!(log.contains(TRIGGER_EXITED), "{log}");
    assert!(log.contains(&format!("disconnected from 127.0.0.1:{}", redis.port)), "{log}");
    assert!(app.client.get(app.url("/probe/headers")).send().await.is_err(), "HTTP stopped with it");
}

#[tokio::test]
async fn a_redis_trigger_that_cannot_connect_at_start_stops_the_app() {
    let mut redis = TestRedis::start().await.unwrap();
    redis.stop();
    let config = probe_app().var("redis_address", redis.url());
    // The HTTP listener may or may not answer before the trigger fails: either way the host ends.
    let log = match spawn_app(config).await {
        Err(e) => format!("{e:#}"),
        Ok(mut app) => {
            let status = app.wait_exit(Duration::from_secs(15)).await.expect("the host stops");
            assert_eq!(status.code(), Some(1));
            app.log()
        }
    };
    assert!(log.contains(TRIGGER_EXITED), "{log}");
    assert!(log.contains(&format!("Redis trigger failed to connect to 127.0.0.1:{}", redis.port)), "{log}");
}

#[tokio::test]
async fn selected_components_run_alone_as_with_spin_up_c() {
    let app = spawn_app(AppConfig { components: vec!["exact".into()], ..probe_app() }).await.unwrap();
    assert_eq!(text(&app, "/probe/exact").await.0, 200, "{}", app.log());
    assert_eq!(text(&app, "/probe/headers").await.0, 404, "probe is not selected");
    let channel = format!("{}probe", app.channel_prefix);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(redis_publish(&channel, b"x").await.unwrap(), 0, "the listener is not selected: nobody subscribes");

    let err = spawn_app_expecting_failure(AppConfig { components: vec!["nope".into()], ..probe_app() }).await.unwrap();
    assert!(err.contains("Specified component \"nope\" not found in application"), "{err}");
}

#[tokio::test]
async fn devhost_only_redis_trigger_works_with_the_in_process_broker() {
    // No Redis server at this address: everything goes through the in-process broker.
    let config = AppConfig { redis_memory: true, ..probe_app().var("redis_address", "redis://127.0.0.1:6379") };
    let app = spawn_app(config).await.unwrap();
    let channel = format!("{}probe", app.channel_prefix);
    let r = app.post(&format!("/probe/publish?address=redis://127.0.0.1:6379&channel={channel}"), "in-memory").await;
    assert_eq!(r.status(), 204);
    assert_eq!(wait_for_kv(&app, "msg:in-memory").await.as_deref(), Some("in-memory"));
    assert_eq!(redis_publish(&channel, b"x").await.unwrap(), 0, "nothing subscribed on the real server");
}

#[tokio::test]
async fn outbound_redis_to_an_address_not_allowed_is_refused() {
    let app = spawn_app(probe_app()).await.unwrap();
    let r = app.post("/probe/publish?address=redis://localhost:6379&channel=x", "x").await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("InvalidAddress"));
}

#[tokio::test]
async fn each_request_gets_a_fresh_instance() {
    let app = spawn_app(probe_app()).await.unwrap();
    for _ in 0..3 {
        assert_eq!(text(&app, "/probe/global").await, (200, "1".into()));
    }
}

#[tokio::test]
async fn a_trapping_component_gives_500_and_the_host_keeps_serving() {
    let app = spawn_app(probe_app()).await.unwrap();
    let (status, body) = text(&app, "/probe/trap").await;
    assert_eq!(status, 500);
    assert!(!body.contains("probe asked to trap"), "no internal detail in the response: {body}");
    assert_eq!(text(&app, "/probe/global").await, (200, "1".into()));
    assert!(app.log().contains("probe asked to trap"), "the panic is logged with the component id");
}

#[tokio::test]
async fn a_trapping_redis_handler_does_not_stop_the_trigger() {
    let app = spawn_app(probe_app()).await.unwrap();
    let channel = format!("{}probe", app.channel_prefix);
    wait_for_subscribers(&channel, 1).await.unwrap();
    redis_publish(&channel, b"trap").await.unwrap();
    redis_publish(&channel, b"after-trap").await.unwrap();
    assert_eq!(wait_for_kv(&app, "msg:after-trap").await.as_deref(), Some("after-trap"));
}

#[tokio::test]
async fn requests_are_served_concurrently() {
    let app = std::sync::Arc::new(spawn_app(probe_app()).await.unwrap());
    // Ten requests that each sleep 400 ms inside the component: one after another they would
    // take 4 s; served concurrently they overlap.
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let app = app.clone();
            tokio::spawn(async move { app.get("/probe/sleep?ms=400").await.status().as_u16() })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(2500), "10 x 400 ms took {elapsed:?}: requests were serialised");
}

#[tokio::test]
async fn devhost_only_unsupported_manifest_features_stop_start_up_naming_them() {
    let with_files = MANIFEST.replace(
        "[component.exact]\nsource = \"@WASM_DIR@/host_probe.wasm\"",
        "[component.exact]\nsource = \"@WASM_DIR@/host_probe.wasm\"\nfiles = [\"static/**\"]",
    );
    let err = spawn_app_expecting_failure(AppConfig::new(with_files).var("api_token", "t")).await.unwrap();
    assert!(err.contains("`files`"), "{err}");

    let with_cron = format!("{MANIFEST}\n[[trigger.cron]]\ncomponent = \"probe\"\ncron_expression = \"0 4 * * 3\"\n");
    let err = spawn_app_expecting_failure(AppConfig::new(with_cron).var("api_token", "t")).await.unwrap();
    assert!(err.contains("trigger type 'cron'"), "{err}");
}

#[tokio::test]
async fn an_unknown_key_value_label_stops_start_up() {
    let manifest = MANIFEST
        .replace("key_value_stores = [\"default\"]\nsqlite", "key_value_stores = [\"default\", \"cache\"]\nsqlite");
    let err = spawn_app_expecting_failure(AppConfig::new(manifest).var("api_token", "t")).await.unwrap();
    assert!(err.contains("unknown key_value_stores label \"cache\" for component \"probe\""), "{err}");
}

/// A server that answers slowly on purpose: the head at once, then one body byte every 200 ms
/// for as long as the client stays (`trickle`), or never reading the request body at all.
struct SlowServer {
    port: u16,
    /// Answer bytes trickled so far.
    trickled: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl SlowServer {
    async fn start(trickle: bool) -> SlowServer {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let trickled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = trickled.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let count = count.clone();
                tokio::spawn(async move {
                    // The request head only: a body is never read.
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    if !trickle {
                        tokio::time::sleep(Duration::from_secs(600)).await;
                        return;
                    }
                    let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n";
                    if socket.write_all(answer).await.is_err() {
                        return;
                    }
                    for _ in 0..3000 {
                        if socket.write_all(b"x").await.is_err() {
                            return; // The client gave up.
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                });
            }
        });
        SlowServer { port, trickled }
    }
}

/// A call through spin-kit's HTTP client (what the sender and the trainer call WhatsApp and
/// Astria with) to a server that trickles its answer a byte every 200 ms, under per-phase
/// timeouts of 1.5 s that each byte resets: only the overall deadline ends it. Before, this
/// held the call (and the sender's or trainer's lease) for as long as the server liked.
#[tokio::test]
async fn an_outbound_call_ends_at_its_deadline_however_slowly_the_answer_trickles() {
    let slow = SlowServer::start(true).await;
    let app = spawn_app(probe_app().var("fake_port", slow.port.to_string())).await.unwrap();
    let path = format!("/probe/deadline-fetch?url=http://127.0.0.1:{}/x&timeout_ms=1500", slow.port);
    let (status, body) = tokio::time::timeout(Duration::from_secs(120), text(&app, &path))
        .await
        .expect("the call ended (a call bounded only per phase never does)");
    assert_eq!((status, body.as_str()), (504, "timed out"));
    assert!(slow.trickled.load(std::sync::atomic::Ordering::SeqCst) > 0, "the answer had started to trickle");
}

/// A server that never reads the request body: writing a 32 MiB body blocks once the socket
/// buffers are full, and the overall deadline ends that too.
#[tokio::test]
async fn an_outbound_call_ends_at_its_deadline_when_the_server_never_reads_the_body() {
    let slow = SlowServer::start(false).await;
    let app = spawn_app(probe_app().var("fake_port", slow.port.to_string())).await.unwrap();
    let path = format!("/probe/deadline-fetch?url=http://127.0.0.1:{}/x&timeout_ms=1500&body={}", slow.port, 32 << 20);
    let (status, body) = tokio::time::timeout(Duration::from_secs(120), text(&app, &path))
        .await
        .expect("the call ended (a body write without a deadline never does)");
    assert_eq!((status, body.as_str()), (504, "timed out"));
}
