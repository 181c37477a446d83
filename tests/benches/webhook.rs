//! Throughput and latency of `POST /SmsReceived` on this machine, under the host the tests use
//! (devhost, or the Spin CLI in `SPIN_BIN`), on SQLite and on PostgreSQL.
//!
//! The load is a realistic mix, not one repeated request: contacts walk through the
//! conversation (hi, the pack list reply, the subject button, two photos, a question), so most
//! requests change state and queue a reply; about a quarter are status webhooks for messages
//! the bot sent, and about one in ten is a duplicate WhatsApp redelivers. The sender delivers
//! the replies to a fake Graph API meanwhile, as in production.
//!
//! Phases per database, on one app:
//! - closed loop at 1, 8 and 32 requests in flight: requests/s, p50, p99, max;
//! - open loop at a fixed 500 requests/s for 60 s (`ASTRIA_BENCH_OPEN_SECONDS`): each request
//!   leaves at its scheduled time whether or not earlier ones were answered, and its latency
//!   counts from that time, so a server that falls behind shows its queue instead of slowing
//!   the client down;
//! - unsigned requests (no signature header) at 32 in flight, refused with 401 before the body
//!   is read;
//! - forged requests (a well-formed signature that does not match) at 32 in flight, refused
//!   with 401 after the HMAC;
//! - `PUT` requests at 32 in flight, refused with 400 before the handler reads anything: the cost
//!   of an instance of the component and nothing else;
//! - then, message-service having run alone (every webhook above waits in the inbox), the
//!   conversation worker alone drains the inbox: webhooks worked through per second;
//! - for the whole app, in one process (`spin up`) and as deployed (a process per SpinApp), an
//!   open loop at 500/s whose messages are timed from webhook to step, and to their first reply
//!   sent.
//!
//! Under devhost it first counts the SQLite statements each kind of request costs, per
//! component (devhost counts them per guest connection).
//!
//! Prints the tables and writes them, as Markdown, to `target/bench/webhook-<host>.md`, which
//! `scripts/bench.sh` gathers into `docs/performance.md`.
//!
//! Run: `cargo bench --profile host -p astria-tests --bench webhook` (after scripts/build.sh,
//! with PostgreSQL and Redis up); `SPIN_BIN=/path/to/spin` runs it under real Spin;
//! `ASTRIA_BENCH_DATABASES=sqlite` limits it to one database (Spin 4.0.0-4.0.2 hang on
//! PostgreSQL, spinframework/spin#3671), `ASTRIA_BENCH_SETUPS=deployed` to one setup.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use astria_tests::whatsapp::{self as wa, FakeGraph};
use astria_tests::{TestApp, TestRedis};
use serde_json::Value;

/// Where the load goes: the app under a host, or the native reference server.
struct Target {
    client: reqwest::Client,
    url: String,
    /// The native reference's process, stopped on drop.
    child: Option<std::process::Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Target {
    fn of(app: &TestApp) -> Target {
        Target { client: app.client.clone(), url: app.url("/SmsReceived"), child: None }
    }

    /// Starts `tools/native-reference` (built by scripts/bench.sh) on a free port.
    async fn native(bin: &str, database_url: &str, redis: &TestRedis) -> Target {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = std::process::Command::new(bin)
            .args(["--listen", &format!("127.0.0.1:{port}"), "--database-url", database_url])
            .args(["--redis-url", &redis.url()])
            .args(std::env::var("ASTRIA_NATIVE_FRESH").is_ok().then_some("--fresh-connections"))
            .args(["--var", &format!("whatsapp_app_secret={}", wa::APP_SECRET)])
            .args(["--var", &format!("whatsapp_phone_number_id={}", wa::PHONE_NUMBER_ID)])
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin}: {e}"));
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if client.get(format!("{base}/health")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Target { client, url: format!("{base}/SmsReceived"), child: Some(child) }
    }
}

/// Requests per closed-loop run.
const CLOSED: usize = 2000;
const OPEN_RATE: usize = 500;
/// How long the open loops run: the goal's 60 s (issue 29's G2) unless
/// `ASTRIA_BENCH_OPEN_SECONDS` says otherwise (a quick look: 10).
fn open_seconds() -> usize {
    std::env::var("ASTRIA_BENCH_OPEN_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60)
}

/// The setups to run, all three unless `ASTRIA_BENCH_SETUPS` names some (`alone`, `whole`,
/// `deployed`, comma-separated): repeated runs of one setup, for medians, without the others'
/// minutes.
fn setups() -> Vec<Setup> {
    let names = std::env::var("ASTRIA_BENCH_SETUPS").unwrap_or_else(|_| "alone,whole,deployed".into());
    names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| match n {
            "alone" => Setup::Alone,
            "whole" => Setup::Whole,
            "deployed" => Setup::Deployed,
            other => panic!("ASTRIA_BENCH_SETUPS: unknown setup {other} (alone, whole, deployed)"),
        })
        .collect()
}

const FORGED: usize = 10_000;

/// One signed request.
type Signed = (Vec<u8>, String);

/// A mixed load of `n` requests from `contacts` contacts, named apart by `tag` so that phases
/// on one app do not collide.
fn mixed_load(tag: &str, n: usize, contacts: usize) -> Vec<Signed> {
    let mut out: Vec<Signed> = Vec::with_capacity(n);
    let mut step = vec![0usize; contacts];
    for i in 0..n {
        let c = i % contacts;
        let from = format!("49{tag}{c:07}");
        let id = format!("wamid.{tag}.{i}");
        let body: Value = match i % 20 {
            // About one in ten: WhatsApp redelivers an earlier message (same id and body).
            0 | 10 if !out.is_empty() => {
                let again = out[(i * 7919) % out.len()].clone();
                out.push(again);
                continue;
            }
            // About a quarter: delivery statuses for messages the bot sent.
            1 | 5 | 9 | 13 | 17 => wa::status(&format!("wamid.sent.{tag}.{i}"), &from, "delivered", None),
            _ => {
                let s = step[c];
                step[c] += 1;
                let m = match s % 6 {
                    0 => wa::text(&from, &id, "hi"),
                    1 => wa::list_reply(&from, &id, "pack:corporate", "Corporate headshots"),
                    2 => wa::button_reply(&from, &id, "subject:man", "Man"),
                    3 | 4 => wa::photo(&from, &id),
                    _ => wa::text(&from, &id, "how long does it take?"),
                };
                wa::inbound(&from, vec![m])
            }
        };
        let body = serde_json::to_vec(&body).unwrap();
        let sig = wa::sign(wa::APP_SECRET, &body);
        out.push((body, sig));
    }
    out
}

/// Latency figures of one run.
struct Figures {
    rate: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    over_1s: usize,
    /// Answers other than the expected status, by status (0: no answer within 30 s).
    errors: BTreeMap<u16, usize>,
}

fn figures(latencies: Vec<Duration>, errors: BTreeMap<u16, usize>, elapsed: Duration) -> Figures {
    let spread = Spread::of(latencies);
    Figures {
        rate: (spread.0.len() + errors.values().sum::<usize>()) as f64 / elapsed.as_secs_f64(),
        p50: spread.percentile(0.50),
        p99: spread.percentile(0.99),
        max: spread.max(),
        over_1s: spread.0.iter().filter(|l| **l > Duration::from_secs(1)).count(),
        errors,
    }
}

/// Closed loop: `concurrency` workers, each sending its next request when the last answered.
async fn closed_loop(app: &Target, load: Vec<Signed>, concurrency: usize, expect: u16, signed: bool) -> Figures {
    closed_loop_with(app, reqwest::Method::POST, load, concurrency, expect, signed).await
}

async fn closed_loop_with(
    app: &Target,
    method: reqwest::Method,
    load: Vec<Signed>,
    concurrency: usize,
    expect: u16,
    signed: bool,
) -> Figures {
    let queue = Arc::new(Mutex::new(load));
    let errors = Arc::new(Mutex::new(BTreeMap::new()));
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (queue, errors, client, url, method) =
                (queue.clone(), errors.clone(), app.client.clone(), app.url.clone(), method.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                loop {
                    let Some((body, sig)) = queue.lock().unwrap().pop() else { break };
                    let t = Instant::now();
                    let mut req = client.request(method.clone(), &url).body(body);
                    if signed {
                        req = req.header("x-hub-signature-256", sig);
                    }
                    match req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) {
                        s if s == expect => latencies.push(t.elapsed()),
                        s => *errors.lock().unwrap().entry(s).or_insert(0) += 1,
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for w in workers {
        latencies.extend(w.await.unwrap());
    }
    let errors = errors.lock().unwrap().clone();
    figures(latencies, errors, started.elapsed())
}

/// Open loop: request `i` leaves at `start + i / rate`; its latency counts from then.
async fn open_loop(app: &Target, load: Vec<Signed>, rate: usize) -> Figures {
    open_loop_at(app, load, rate).await.0
}

/// [`open_loop`], also answering when (ms since the epoch) request 0 was scheduled to leave.
async fn open_loop_at(app: &Target, load: Vec<Signed>, rate: usize) -> (Figures, i64) {
    let start = tokio::time::Instant::now() + Duration::from_millis(100);
    let start_ms = now_ms() + 100;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut tasks = Vec::with_capacity(load.len());
    for (i, (body, sig)) in load.into_iter().enumerate() {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (client, url) = (app.client.clone(), app.url.clone());
        tasks.push(tokio::spawn(async move {
            // The request's id is its replies' correlation id: [`step_latency`] times them.
            let r = client
                .post(&url)
                .header("x-hub-signature-256", sig)
                .header("x-request-id", format!("{OPEN_REQUEST}{i}"))
                .body(body)
                .send()
                .await;
            (r.map(|r| r.status().as_u16()).unwrap_or(0), scheduled.elapsed())
        }));
    }
    let mut latencies = Vec::new();
    let mut errors = BTreeMap::new();
    for t in tasks {
        match t.await.unwrap() {
            (200, l) => latencies.push(l),
            (s, _) => *errors.entry(s).or_insert(0) += 1,
        }
    }
    (figures(latencies, errors, start.elapsed()), start_ms)
}

/// What runs under the load: see where [`main`] picks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Alone,
    Whole,
    Deployed,
}

/// The open loop's request ids: `open-<i>`.
const OPEN_REQUEST: &str = "open-";

/// How long the conversation worker took over the open loop's messages: from when each
/// message's webhook left (its scheduled time) to its step (`processed_webhooks.received_at`,
/// written in the transaction that queued the reply); how long after the last request the
/// inbox was empty; and, what a customer sees, from the webhook to its first reply sent (the
/// reply's row marked sent once the fake Graph API took it; its correlation id is the
/// webhook's request id), once nothing is queued any more.
async fn step_latency(bot: &TestApp, tag: &str, n: usize, rate: usize, start_ms: i64) -> String {
    let db = astria_tests::db::TestDb::of(bot).await;
    let inbox = astria_tests::db::TestDb::inbox_of(bot).await;
    let load_end = Instant::now();
    let emptied = until_none(&inbox, "SELECT COUNT(*) FROM inbox WHERE set_aside_at IS NULL", load_end, 120).await;
    let prefix = format!("wamid.{tag}.");
    let steps = db
        .rows(
            "SELECT external_id, received_at FROM processed_webhooks WHERE external_id LIKE $1",
            &[format!("{prefix}%").into()],
        )
        .await;
    let steps = Spread::since_sent(&steps, &prefix, start_ms, rate);
    let sent = until_none(&db, "SELECT COUNT(*) FROM outbound_messages WHERE status = 'queued'", load_end, 240).await;
    let replies = db
        .rows(
            "SELECT correlation_id, MIN(updated_at) FROM outbound_messages WHERE status = 'sent' AND correlation_id LIKE $1
             GROUP BY correlation_id",
            &[format!("{OPEN_REQUEST}%").into()],
        )
        .await;
    let replies = Spread::since_sent(&replies, OPEN_REQUEST, start_ms, rate);
    format!(
        "{} of {n} requests' messages stepped: webhook sent to reply queued {}; inbox empty {emptied} after the load \
         ended; {} first replies sent: {}, nothing queued {sent} after the load ended",
        steps.0.len(),
        steps.summary(),
        replies.0.len(),
        replies.summary(),
    )
}

/// Latencies, sorted.
struct Spread(Vec<Duration>);

impl Spread {
    fn of(mut latencies: Vec<Duration>) -> Spread {
        latencies.sort();
        Spread(latencies)
    }

    /// From rows of (`<prefix><i>`, a time in ms): each time less when request `i` of an open
    /// loop at `rate` from `start_ms` was sent.
    fn since_sent(rows: &[Vec<astria_tests::db::Cell>], prefix: &str, start_ms: i64, rate: usize) -> Spread {
        Spread::of(
            rows.iter()
                .filter_map(|r| {
                    let i: usize = r[0].text().strip_prefix(prefix)?.parse().ok()?;
                    let sent = start_ms + (i as f64 * 1000.0 / rate as f64) as i64;
                    Some(Duration::from_millis((r[1].int() - sent).max(0) as u64))
                })
                .collect(),
        )
    }

    fn percentile(&self, p: f64) -> Duration {
        let k = self.0.len().max(1);
        self.0.get(((k as f64 * p) as usize).min(k - 1)).copied().unwrap_or_default()
    }

    fn max(&self) -> Duration {
        self.0.last().copied().unwrap_or_default()
    }

    /// "p50 .. ms, p99 .. ms, max .. ms".
    fn summary(&self) -> String {
        format!("p50 {} ms, p99 {} ms, max {} ms", ms(self.percentile(0.5)), ms(self.percentile(0.99)), ms(self.max()))
    }
}

/// Waits (polling, up to `limit_s` after `since`) until `count_sql` counts nothing; answers
/// how long after `since` that was, as the figure prints it.
async fn until_none(db: &astria_tests::db::TestDb, count_sql: &str, since: Instant, limit_s: u64) -> String {
    loop {
        if db.count(count_sql).await == 0 {
            return format!("{:.1} s", since.elapsed().as_secs_f64());
        }
        if since.elapsed() > Duration::from_secs(limit_s) {
            return format!("not within {limit_s} s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The conversation worker alone (no sender beside it) on the inbox the phases before it filled
/// while no worker ran: webhooks worked through per second and messages stepped per second.
async fn drain_rate(bot: &TestApp, graph: &FakeGraph, redis: &TestRedis, postgres: bool) -> String {
    let db = astria_tests::db::TestDb::of(bot).await;
    let inbox = astria_tests::db::TestDb::inbox_of(bot).await;
    let rows = inbox.count("SELECT COUNT(*) FROM inbox").await;
    let stepped_before = db.count("SELECT COUNT(*) FROM processed_webhooks").await;
    let config = wa::bot_config(graph, redis, postgres)
        .split(&[("worker", &["conversation-worker"])], Duration::from_millis(500))
        .replica_of(bot);
    let worker = astria_tests::spawn_app(config).await.expect("the conversation worker starts");
    let wake = serde_json::json!({
        "id": "bench-wake", "event_type": "inbox.wake", "occurred_at": "2026-01-01T00:00:00Z",
        "correlation_id": "bench", "payload": "{}",
    });
    let started = Instant::now();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: i64 = redis::cmd("PUBLISH").arg("astria.inbox").arg(wake.to_string()).query_async(&mut conn).await.unwrap();
    let took = loop {
        if inbox.count("SELECT COUNT(*) FROM inbox WHERE set_aside_at IS NULL").await == 0 {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(600) {
            panic!("the worker did not drain {rows} webhooks within 600 s:\n{}", worker.log());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let stepped = db.count("SELECT COUNT(*) FROM processed_webhooks").await - stepped_before;
    drop(worker);
    let secs = took.as_secs_f64();
    format!(
        "{rows} waiting webhooks worked through in {secs:.1} s: {:.0} webhooks/s, {:.0} messages stepped/s",
        rows as f64 / secs,
        stepped as f64 / secs
    )
}

/// Milliseconds since the epoch (the app books its times so).
fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn row(db: &str, setup: &str, load: &str, f: &Figures) -> String {
    let other = if f.errors.is_empty() {
        "0".to_string()
    } else {
        f.errors
            .iter()
            .map(|(s, n)| if *s == 0 { format!("{n} no answer") } else { format!("{n} × {s}") })
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "| {db} | {setup} | {load} | {:.0} | {} | {} | {} | {} | {other} |",
        f.rate,
        ms(f.p50),
        ms(f.p99),
        ms(f.max),
        f.over_1s
    )
}

/// Under devhost: the SQLite statements each kind of request costs, per component (the webhook
/// itself, and the sender's work it causes), from devhost's count of the statements each guest
/// connection ran (`DEVHOST_LOG=devhost::sqlite=debug`; `=trace` logs each statement).
async fn statement_census() -> Vec<String> {
    let redis = TestRedis::start().await.expect("redis-server");
    let graph = FakeGraph::start().await;
    let app = wa::spawn_bot(wa::bot_config(&graph, &redis, false), &redis).await;
    let from = "4915100000001";
    let kinds = wa::one_of_each_kind(from, "census");
    let mut out = vec!["| request | statements by component (connections) |".to_string(), "| --- | --- |".to_string()];
    for (kind, body) in kinds {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mark = app.log().len();
        wa::post_webhook(&app, &body).await;
        // The sender delivers the reply within a moment.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let log = app.log();
        let mut by: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (c, n) in astria_tests::devhost_statement_counts(&log[mark..]) {
            let e = by.entry(c).or_default();
            e.0 += n;
            e.1 += 1;
        }
        let cells: Vec<String> = by.iter().map(|(c, (n, k))| format!("{c} {n} ({k})")).collect();
        // The first request of the app also puts the schema in place.
        let kind = if kind == "hi" { "hi (the first request: migrations)" } else { kind };
        out.push(format!("| {kind} | {} |", cells.join(", ")));
    }
    out
}

#[tokio::main]
async fn main() {
    let open_seconds = open_seconds();
    let host_kind = astria_tests::Host::from_env().expect("host");
    let native = std::env::var("ASTRIA_NATIVE_REFERENCE").ok();
    let host = match (&native, std::env::var("ASTRIA_NATIVE_FRESH").is_ok()) {
        (Some(_), false) => "native reference".to_string(),
        (Some(_), true) => "native reference, connections per request".to_string(),
        (None, _) => host_kind.label(),
    };
    let census = if host_kind.is_spin() || native.is_some() {
        vec![]
    } else {
        std::env::set_var("DEVHOST_LOG", "info,wasmtime_wasi_http=warn,devhost::sqlite=debug");
        let c = statement_census().await;
        std::env::remove_var("DEVHOST_LOG");
        println!("SQLite statements per request (devhost's count)\n{}", c.join("\n"));
        c
    };
    let databases = std::env::var("ASTRIA_BENCH_DATABASES").unwrap_or_else(|_| "sqlite,postgres".into());
    let mut rows = vec![
        "| database | running | load | requests/s | p50 ms | p99 ms | max ms | over 1 s | other answers |".to_string(),
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |".to_string(),
    ];
    // The conversation worker's figures (not for the native reference, which has none).
    let mut steps: Vec<String> = vec![];
    println!("POST /SmsReceived under {host}, this machine");
    println!("{}\n{}", rows[0], rows[1]);
    for db in databases.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let postgres = match db {
            "sqlite" => false,
            "postgres" => true,
            other => panic!("ASTRIA_BENCH_DATABASES: unknown database {other}"),
        };
        // Alone: message-service by itself, as production's HTTP SpinApp runs it (the sender and
        // the relay run in the worker SpinApp, on other pods). Whole: every component in one
        // process, as `spin up` runs the app locally; the sender competes for the CPU and the
        // database meanwhile, and Spin's Redis trigger serves the conversation worker's
        // wake-ups and the sender's events one at a time on one connection. Deployed: the
        // whole app as SpinKube runs it, a process per SpinApp of kubernetes/base (the
        // conversation worker and the sender each on their own), behind the test world's
        // stand-in for the Ingress, on the same two cores.
        let variants: Vec<Setup> = if native.is_some() { vec![Setup::Alone] } else { setups() };
        for &variant in &variants {
            let whole = variant != Setup::Alone;
            let redis = TestRedis::start().await.expect("redis-server");
            let graph = FakeGraph::start().await;
            let mut _state = None;
            let mut pg_database = None;
            let (app, bot) = match &native {
                Some(bin) => {
                    let url = if postgres {
                        let name = astria_tests::create_database().await.expect("PostgreSQL");
                        let url = astria_tests::database_url(&name);
                        pg_database = Some(name);
                        url
                    } else {
                        let dir = tempfile::tempdir().unwrap();
                        let url = format!("sqlite:{}", dir.path().join("native.db").display());
                        _state = Some(dir);
                        url
                    };
                    (Target::native(bin, &url, &redis).await, None)
                }
                None if whole => {
                    let mut config = wa::bot_config(&graph, &redis, postgres);
                    if variant == Setup::Deployed {
                        config = config.as_deployment(Duration::from_millis(500));
                    }
                    let bot = wa::spawn_bot(config, &redis).await;
                    (Target::of(&bot), Some(bot))
                }
                None => {
                    let config = wa::bot_config(&graph, &redis, postgres)
                        .split(&[("webhook", &["message-service"])], Duration::from_millis(500));
                    let bot = astria_tests::spawn_app(config).await.expect("message-service starts");
                    (Target::of(&bot), Some(bot))
                }
            };
            let setup = match variant {
                Setup::Alone => "message-service alone",
                Setup::Whole => "whole app",
                Setup::Deployed => "whole app as deployed",
            };
            // Warm-up: migrations, compiled paths, connections.
            for (body, sig) in mixed_load("00", 60, 10) {
                app.client.post(&app.url).header("x-hub-signature-256", sig).body(body).send().await.ok();
            }
            let mut emit = |line: String| {
                println!("{line}");
                rows.push(line);
            };
            let loops: &[usize] = if whole { &[8] } else { &[1, 8, 32] };
            for (n, &concurrency) in loops.iter().enumerate() {
                let f = closed_loop(&app, mixed_load(&format!("1{n}"), CLOSED, 500), concurrency, 200, true).await;
                emit(row(db, setup, &format!("mixed, {concurrency} in flight"), &f));
            }
            if whole {
                // The webhook and the conversation worker (and the sender) together at a fixed
                // rate: how long a message waits in the inbox for its step.
                if let Some(bot) = bot.as_ref() {
                    let n = OPEN_RATE * open_seconds;
                    let (f, start_ms) = open_loop_at(&app, mixed_load("25", n, 500), OPEN_RATE).await;
                    emit(row(db, setup, &format!("mixed, open loop {OPEN_RATE}/s for {open_seconds} s"), &f));
                    let line = format!("| {db} | {setup}: {}", step_latency(bot, "25", n, OPEN_RATE, start_ms).await);
                    println!("{line}");
                    steps.push(line);
                }
                continue;
            }
            let f = open_loop(&app, mixed_load("20", OPEN_RATE * open_seconds, 500), OPEN_RATE).await;
            emit(row(db, setup, &format!("mixed, open loop {OPEN_RATE}/s for {open_seconds} s"), &f));
            if let Some(bot) = bot.as_ref().filter(|_| f.errors.keys().any(|s| *s >= 500)) {
                // What the host and the app said about the 5xx answers, for the reader.
                let log = bot.log();
                let why: Vec<&str> = log
                    .lines()
                    .filter(|l| l.contains("unavailable") || l.contains("internal") || l.contains("rror"))
                    .take(3)
                    .collect();
                eprintln!("first 5xx causes in the log:\n{}", why.join("\n"));
            }
            let f = closed_loop(&app, mixed_load("30", FORGED, 500), 32, 401, false).await;
            emit(row(db, setup, "unsigned (401), 32 in flight", &f));
            // Signed with another secret: the header is well formed, so the body and the app
            // secret are read and the HMAC computed before the 401.
            let forged: Vec<Signed> = mixed_load("35", FORGED, 500)
                .into_iter()
                .map(|(body, _)| {
                    let sig = wa::sign("not the app secret", &body);
                    (body, sig)
                })
                .collect();
            let f = closed_loop(&app, forged, 32, 401, true).await;
            emit(row(db, setup, "forged signature (401), 32 in flight", &f));
            // The floor: a method the route refuses before reading anything (400), which is what
            // creating and dropping an instance of the component costs.
            let f = closed_loop_with(&app, reqwest::Method::PUT, mixed_load("40", FORGED, 500), 32, 400, false).await;
            emit(row(db, setup, "PUT, refused before any work (400), 32 in flight", &f));
            // Everything above waited in the inbox (no worker ran): now a worker alone drains it.
            if let Some(bot) = bot.as_ref() {
                let line = format!("| {db} | {}", drain_rate(bot, &graph, &redis, postgres).await);
                println!("{line}");
                steps.push(line);
            }
            drop(app);
            if let Some(name) = pg_database {
                astria_tests::drop_database(&name).await.ok();
            }
        }
    }
    let commit = astria_tests::commit();
    let mut text = format!(
        "### {host}\n\nCommit {commit}; closed loops of {CLOSED} requests, open loop {OPEN_RATE}/s for {open_seconds} s, \
         {FORGED} unsigned requests.\n\n{}\n",
        rows.join("\n")
    );
    if !steps.is_empty() {
        text.push_str(&format!(
            "\nThe conversation worker (message-service alone filled the inbox; then a worker alone drained it. \
             Whole app: the open loop's messages, from webhook to step):\n\n| database | figure |\n| --- | --- |\n{}\n",
            steps.iter().map(|l| format!("{l} |")).collect::<Vec<_>>().join("\n")
        ));
    }
    if !census.is_empty() {
        text.push_str(&format!(
            "\nSQLite statements per request, one request at a time, counted by devhost per guest connection \
             (the webhook's own, and the conversation worker's and the sender's work it caused within 1.5 s):\n\n{}\n",
            census.join("\n")
        ));
    }
    let file = astria_tests::write_bench_table("webhook", &host, &text);
    println!("written to {}", file.display());
}
