//! maintenance-service's cleanup through the whole app (devhost, PostgreSQL): the report, a
//! second run that removes nothing, the lease that refuses a concurrent run and expires after a
//! crash, and the admin token. Which record is kept or removed is the store's contract suite
//! (shared/store/tests/contract.rs, on SQLite and PostgreSQL); the relay endpoint is relay.rs.

use astria_tests::whatsapp as wa;
use astria_tests::{app_manifest, spawn_app, AppConfig, TestApp};
use serde_json::Value;

const DAY: i64 = 24 * 60 * 60 * 1000;

async fn run(app: &TestApp, token: Option<&str>) -> (u16, Value) {
    let mut req = app.client.post(app.url("/maintenance/run"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// The relay's first call (the CronJob's, every minute) migrates the schema; readiness does not
/// (a probe must not write).
async fn schema_in_place(app: &TestApp) {
    assert_eq!(app.get("/health/maintenance").await.status(), 200, "ready");
    let report = wa::relay(app).await;
    assert!(report["republished"].is_number(), "the relay ran: {report}");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn a_cleanup_run_reports_what_it_removed_and_the_next_run_removes_nothing_postgres() {
    let app =
        spawn_app(AppConfig { postgres: true, ..AppConfig::new(app_manifest()) }.var("admin_token", wa::ADMIN_TOKEN))
            .await
            .unwrap();
    schema_in_place(&app).await;
    let (db, conn) = tokio_postgres::connect(app.database_url.as_ref().unwrap(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let old = now_ms() - 40 * DAY;
    let recent = now_ms() - DAY;
    for (id, at) in [("old", old), ("recent", recent)] {
        db.execute("INSERT INTO processed_webhooks VALUES ('whatsapp', $1, $2)", &[&id, &at]).await.unwrap();
    }
    db.execute("INSERT INTO contacts (wa_id, profile_name, opted_out, last_inbound_at, conversation, updated_at) VALUES ('4915', 'Ana', 0, $1, '{\"state\":\"idle\"}', $1)", &[&old])
        .await
        .unwrap();
    for (id, status) in [("abandoned", "awaiting_payment"), ("paid", "paid")] {
        db.execute(
            "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at)
             VALUES ($1, '4915', 'p', $2, 1999, 'usd', $3, $3)",
            &[&id, &status, &old],
        )
        .await
        .unwrap();
        db.execute("INSERT INTO order_photos VALUES ($1, 'h', 'm', 'image/jpeg', 0, $2)", &[&id, &old]).await.unwrap();
    }

    let (status, body) = run(&app, Some(wa::ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let report = &body["report"];
    assert_eq!(
        (report["processed_webhooks"].as_i64(), report["orders_expired"].as_i64(), report["photos_removed"].as_i64()),
        (Some(1), Some(1), Some(1)),
        "{body}"
    );
    let statuses: Vec<(String, String)> = db
        .query("SELECT id, status FROM orders ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(statuses, [("abandoned".into(), "expired".into()), ("paid".into(), "paid".into())]);
    let photos: i64 =
        db.query_one("SELECT COUNT(*) FROM order_photos WHERE order_id = 'paid'", &[]).await.unwrap().get(0);
    assert_eq!(photos, 1, "a paid order not yet delivered is never touched");

    let (status, body) = run(&app, Some(wa::ADMIN_TOKEN)).await;
    assert_eq!(status, 200);
    assert!(body["report"].as_object().unwrap().values().all(|v| v == 0), "second run: {body}");
}

#[tokio::test]
async fn a_second_cleanup_while_one_holds_the_lease_is_refused_until_the_lease_expires_postgres() {
    let app =
        spawn_app(AppConfig { postgres: true, ..AppConfig::new(app_manifest()) }.var("admin_token", wa::ADMIN_TOKEN))
            .await
            .unwrap();
    schema_in_place(&app).await;
    let (db, conn) = tokio_postgres::connect(app.database_url.as_ref().unwrap(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    // A run in progress elsewhere (another replica, a CronJob retry).
    let until = now_ms() + 600_000;
    db.execute("INSERT INTO job_leases VALUES ('cleanup', 'other-run', $1)", &[&until]).await.unwrap();
    let (status, body) = run(&app, Some(wa::ADMIN_TOKEN)).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("a cleanup is already running")));
    // That run crashed; its lease lapses.
    db.execute("UPDATE job_leases SET lease_until = $1", &[&(now_ms() - 1)]).await.unwrap();
    assert_eq!(run(&app, Some(wa::ADMIN_TOKEN)).await.0, 200);
    let leases: i64 = db.query_one("SELECT COUNT(*) FROM job_leases", &[]).await.unwrap().get(0);
    assert_eq!(leases, 0, "released after the run");

    for bad in [None, Some("wrong"), Some("test-admin-toke")] {
        assert_eq!(run(&app, bad).await.0, 401, "{bad:?}");
    }
    assert_eq!(app.get("/maintenance/run").await.status(), 400, "POST only");
}

/// Every operator route, with every kind of credential: the admin token opens each of them; the
/// read-only metrics token opens the metrics and nothing else (no cleanup, relay, replay,
/// resolution, list or console data); no token, a wrong one, a near miss or the token without
/// `Bearer` opens none. The console's static files and the health routes need none.
#[tokio::test]
async fn every_operator_route_takes_exactly_the_tokens_its_scope_names() {
    const METRICS_TOKEN: &str = "scope-metrics-token";
    let app = spawn_app(
        AppConfig::new(app_manifest()).var("admin_token", wa::ADMIN_TOKEN).var("metrics_token", METRICS_TOKEN),
    )
    .await
    .unwrap();
    schema_in_place(&app).await;
    let note = Some(serde_json::json!({ "note": "refunded by hand" }));
    // (method, path, body, what the admin token gets: the route's own answer, never 401).
    let routes: &[(&str, &str, Option<Value>, u16)] = &[
        ("POST", "/maintenance/run", None, 200),
        ("POST", "/maintenance/relay", None, 200),
        ("GET", "/maintenance/metrics", None, 200),
        ("GET", "/maintenance/dead-letters", None, 200),
        ("GET", "/maintenance/payment-issues", None, 200),
        ("GET", "/maintenance/messages?status=failed", None, 200),
        ("POST", "/maintenance/dead-letters/no-such-event/replay", None, 404),
        ("POST", "/maintenance/payment-issues/no-such-issue/resolve", note.clone(), 404),
        ("GET", "/maintenance/console/api/funnel", None, 200),
        ("GET", "/maintenance/console/api/attention", None, 200),
        ("GET", "/maintenance/console/api/orders/no-such-order", None, 404),
    ];
    let near_miss = &wa::ADMIN_TOKEN[..wa::ADMIN_TOKEN.len() - 1];
    for (method, path, body, admin_gets) in routes {
        let (status, answer) = app.call(method, path, Some(wa::ADMIN_TOKEN), body.clone()).await;
        assert_eq!(status, *admin_gets, "{method} {path} with the admin token: {answer}");
        let metrics_gets = if *path == "/maintenance/metrics" { 200 } else { 401 };
        let (status, answer) = app.call(method, path, Some(METRICS_TOKEN), body.clone()).await;
        assert_eq!(status, metrics_gets, "{method} {path} with the metrics token: {answer}");
        for bad in [None, Some("wrong"), Some(near_miss), Some("")] {
            let (status, answer) = app.call(method, path, bad, body.clone()).await;
            assert_eq!(status, 401, "{method} {path} with {bad:?}: {answer}");
        }
        // The token itself, without the scheme, is not a bearer credential.
        let r = app.client.request(method.parse().unwrap(), app.url(path)).header("authorization", wa::ADMIN_TOKEN);
        assert_eq!(r.send().await.unwrap().status().as_u16(), 401, "{method} {path} without 'Bearer '");
    }
    for open in [
        "/maintenance/console",
        "/maintenance/console/app.js",
        "/maintenance/console/style.css",
        "/health/message",
        "/health/image",
        "/health/payment",
        "/health/maintenance",
    ] {
        assert_eq!(app.call("GET", open, None, None).await.0, 200, "{open} needs no token");
    }
}

/// Issue 29's G5: an operator's reads (the metrics scrape, the console's pages, the JSON lists)
/// cost the same with two hundred times the history. devhost counts the work of every
/// statement in SQLite's own unit (virtual-machine steps, which grow with the rows a statement
/// visits and not with the machine's speed); each route is read with 100 orders' worth of
/// history, then with 20,100, and must do exactly the same work. `benches/operator.rs` shows
/// the same with a million rows under Spin, in milliseconds, on both databases.
#[tokio::test]
async fn operator_reads_do_the_same_work_with_two_hundred_times_the_history_devhost_only() {
    use astria_tests::db::TestDb;
    use astria_tests::history;
    let mut config = AppConfig::new(app_manifest()).var("admin_token", wa::ADMIN_TOKEN);
    config.env.insert("DEVHOST_LOG".into(), "info,wasmtime_wasi_http=warn,devhost::sqlite=debug".into());
    // The maintenance service alone, as its SpinApp runs: no worker books the relay's
    // heartbeat between the two readings (a live row, not history, but it would move them).
    config.components = vec!["maintenance-service".into()];
    let app = spawn_app(config).await.unwrap();
    schema_in_place(&app).await;
    let db = TestDb::of(&app).await;
    let now = now_ms();
    history::add_live(&db, now).await;
    // Each route's (statements, VM steps), from the line devhost logs when its instance ends.
    let costs = || async {
        let mut out = vec![];
        for route in history::OPERATOR_READS {
            let mark = app.log().len();
            let (status, answer) = app.call("GET", route, Some(wa::ADMIN_TOKEN), None).await;
            assert_eq!(status, 200, "{route}: {answer}");
            let cost = app
                .wait_until(&format!("devhost's count for {route}"), std::time::Duration::from_secs(20), || async {
                    let log = app.log();
                    astria_tests::devhost_instance_costs(&log[mark..])
                        .into_iter()
                        .find(|(component, _, _)| component == "maintenance-service")
                        .map(|(_, statements, steps)| (statements, steps))
                })
                .await;
            out.push((route, cost));
        }
        out
    };
    history::add(&db, 0, 100, now).await;
    assert!(wa::relay(&app).await["tallies_folded"].as_u64() > Some(0), "the history's deltas folded");
    let small = costs().await;
    history::add(&db, 100, 20_000, now).await;
    assert!(wa::relay(&app).await["tallies_folded"].as_u64() >= Some(20_000), "folded");
    let large = costs().await;
    eprintln!("(statements, SQLite VM steps) per route, 100 orders of history: {small:?}");
    eprintln!("(statements, SQLite VM steps) per route, 20,100 orders of history: {large:?}");
    assert_eq!(large, small, "an operator's read does more work with more history");
    // And what they read is the history: the scrape counts every delivered order.
    let r = app.client.get(app.url("/maintenance/metrics")).bearer_auth(wa::ADMIN_TOKEN).send().await.unwrap();
    let text = r.text().await.unwrap();
    assert!(text.lines().any(|l| l == "astria_orders{status=\"delivered\"} 20100"), "{text}");
    assert!(text.lines().any(|l| l == "astria_portraits_delivered 20100"), "{text}");
    assert!(text.lines().any(|l| l == "astria_payment_to_delivery_seconds_count 20100"), "{text}");
}
