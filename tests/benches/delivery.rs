//! How fast the app delivers, with pacing off and fakes that answer at once, under devhost or
//! (with `SPIN_BIN`) real Spin, on SQLite and PostgreSQL:
//! - **replies**: 500 customers each write "hi" (8 webhooks in flight); how many replies per
//!   second reach the fake Graph API through the outbox, Redis and the sender, and how long the
//!   last one trails the last webhook's answer;
//! - **a pack, end to end**: one customer from "hi" to the last portrait (pack list, subject,
//!   two photos, Done, the Stripe payment, Astria's tune and prompt callbacks), and the time from
//!   Astria's last callback to the last portrait on WhatsApp.
//!
//! Prints a table and writes it to `target/bench/webhook-<host>-delivery.md` for `scripts/bench.sh`.
//! Run: `cargo bench --profile host -p astria-tests --bench delivery`
//! (`ASTRIA_BENCH_DATABASES=sqlite` for one database; `ASTRIA_BENCH_WORKER_REPLICAS=N` runs N
//! copies of the app's workers on the same database and Redis, as N worker pods would, to see
//! what more replicas of a pub/sub consumer add; `ASTRIA_BENCH_GRAPH_LATENCY_MS=M` makes the fake
//! Graph API take M ms per send, as the real one does).

use std::time::{Duration, Instant};

use astria_tests::astria::{self as fa, FakeAstria};
use astria_tests::stripe::{self as ps, FakeStripe};
use astria_tests::whatsapp::{self as wa, FakeGraph};
use astria_tests::TestRedis;
use futures::StreamExt;

const CUSTOMERS: usize = 500;
const ANA: &str = "4915112345678";

#[tokio::main]
async fn main() {
    let host = astria_tests::Host::from_env().expect("host").label();
    let databases = std::env::var("ASTRIA_BENCH_DATABASES").unwrap_or_else(|_| "sqlite,postgres".into());
    // The real Graph API takes a while to answer a send; the fake answers at once unless told.
    let graph_latency = Duration::from_millis(
        std::env::var("ASTRIA_BENCH_GRAPH_LATENCY_MS").ok().and_then(|n| n.parse().ok()).unwrap_or(0),
    );
    let worker_replicas: usize = std::env::var("ASTRIA_BENCH_WORKER_REPLICAS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1);
    let mut rows = vec!["| database | what | figure |".to_string(), "| --- | --- | --- |".to_string()];
    println!("Delivery with pacing off under {host}, this machine");
    for db in databases.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let postgres = db == "postgres";
        let redis = TestRedis::start().await.expect("redis-server");
        let graph = FakeGraph::start().await;
        graph.serve_media(0).await;
        if graph_latency > Duration::ZERO {
            graph.rule(move |_| astria_tests::whatsapp::Answer::Late(graph_latency));
        }
        let stripe = FakeStripe::start().await;
        let astria = FakeAstria::start().await;
        let config = || fa::bot_config(&graph, &redis, &stripe, &astria, postgres).var("whatsapp_pace_ms", "0");
        let app = wa::spawn_bot(config(), &redis).await;
        let mut _replicas = vec![];
        for _ in 1..worker_replicas {
            _replicas.push(astria_tests::spawn_app(config().replica_of(&app)).await.expect("a replica"));
        }
        // The app's own spin.toml, on a Redis of this run's own: the channels carry no prefix.
        astria_tests::wait_for_subscribers_at(&redis.url(), "astria.messages", worker_replicas as i64)
            .await
            .expect("every replica's sender subscribed");
        let mut emit = |what: &str, figure: String| {
            let line = format!("| {db} | {what} | {figure} |");
            println!("{line}");
            rows.push(line);
        };

        // Replies: one "hi" from each of 500 customers.
        let started = Instant::now();
        let bodies: Vec<_> = (0..CUSTOMERS)
            .map(|i| {
                let from = format!("4917{i:08}");
                wa::inbound(&from, vec![wa::text(&from, &format!("wamid.hi.{i}"), "hi")])
            })
            .collect();
        let statuses: Vec<u16> = futures::stream::iter(bodies.iter().map(|b| wa::post_webhook(&app, b)))
            .buffer_unordered(8)
            .map(|(status, _)| status)
            .collect()
            .await;
        assert!(statuses.iter().all(|s| *s == 200), "webhooks refused: {statuses:?}");
        let answered = started.elapsed();
        let deadline = Instant::now() + Duration::from_secs(300);
        while graph.requests().await.len() < CUSTOMERS {
            assert!(
                Instant::now() < deadline,
                "{} replies of {CUSTOMERS}:\n{}",
                graph.requests().await.len(),
                app.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let delivered = started.elapsed();
        // Each customer got one reply, whatever the number of replicas racing for the messages.
        let sent = graph.requests().await;
        let recipients: std::collections::BTreeSet<&str> = sent.iter().filter_map(|r| r["to"].as_str()).collect();
        assert_eq!((sent.len(), recipients.len()), (CUSTOMERS, CUSTOMERS), "one reply per customer");
        emit(
            &format!(
                "{CUSTOMERS} replies, 8 webhooks in flight, {worker_replicas} worker replica(s), Graph answering in {} ms",
                graph_latency.as_millis()
            ),
            format!(
                "{:.0} replies/s; webhooks answered in {:.2} s, last reply sent {:.2} s after the first webhook ({:.2} s after the last answer)",
                CUSTOMERS as f64 / delivered.as_secs_f64(),
                answered.as_secs_f64(),
                delivered.as_secs_f64(),
                (delivered - answered).as_secs_f64()
            ),
        );

        // A pack, end to end, for one customer.
        let before = graph.requests().await.len();
        let started = Instant::now();
        let steps = wa::order_steps(ANA, "j");
        for (i, m) in steps.into_iter().enumerate() {
            assert_eq!(wa::post_webhook(&app, &wa::inbound(ANA, vec![m])).await.0, 200);
            graph.wait_for(before + i + 1).await;
        }
        // The payment link is the 7th message; the customer pays at once.
        let sends = graph.wait_for(before + 7).await;
        let link = wa::summary(&sends[before + 6]);
        let session_id = link.rsplit('/').next().unwrap().to_string();
        let order_id =
            stripe.session_for_any().expect("a checkout session")["client_reference_id"].as_str().unwrap().to_string();
        let paid = ps::session(&session_id, &order_id, 1999, "usd", "paid");
        let (status, _) =
            ps::post_event(&app, &ps::event(&format!("evt_{order_id}"), "checkout.session.completed", paid)).await;
        assert_eq!(status, 200);
        // "Payment received" and "training": then Astria calls back, as soon as it can.
        graph.wait_for(before + 9).await;
        astria.finish(&app, &order_id).await;
        let called_back = Instant::now();
        let images = fa::PROMPTS as usize * fa::IMAGES_PER_PROMPT;
        graph.wait_for(before + 9 + images + 1).await;
        emit(
            &format!("a pack of {images} portraits, end to end"),
            format!(
                "{:.2} s from \"hi\" to the last message; {:.2} s from Astria's last callback to the last portrait",
                started.elapsed().as_secs_f64(),
                called_back.elapsed().as_secs_f64()
            ),
        );
    }
    let dir = astria_tests::workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("webhook-{}-delivery.md", host.replace(' ', "-")));
    std::fs::write(&file, format!("#### Delivery, pacing off ({host})\n\n{}\n", rows.join("\n"))).unwrap();
    println!("written to {}", file.display());
}
