//! Prints the throughput of `POST /SmsReceived` for a signed text message under devhost on
//! this machine: requests per second and latency percentiles, on SQLite and PostgreSQL, at a
//! few concurrency levels. Every request is a new message from one of many contacts (so each
//! is a real conversation step: dedupe, contact upsert, state, reply queued, event published),
//! and the sender delivers the replies to a fake Graph API meanwhile.
//!
//! Run: `cargo bench --profile host -p astria-tests --bench webhook` (after scripts/build.sh,
//! with PostgreSQL and Redis up; `scripts/bench.sh` does all of it).

use std::time::{Duration, Instant};

use astria_tests::whatsapp::{self as wa, FakeGraph};
use astria_tests::TestRedis;

const REQUESTS: usize = 2000;

#[tokio::main]
async fn main() {
    let host = astria_tests::Host::from_env().expect("host").label();
    println!("POST /SmsReceived, signed text message, {REQUESTS} requests per run ({host}, this machine)");
    for postgres in [false, true] {
        for concurrency in [1usize, 8, 32] {
            let redis = TestRedis::start().await.expect("redis-server");
            let graph = FakeGraph::start().await;
            let app = wa::spawn_bot(wa::bot_config(&graph, &redis, postgres), &redis).await;
            // Warm-up: migrations, compiled paths, connections.
            for i in 0..20 {
                let from = format!("49000{i:07}");
                wa::post_webhook(&app, &wa::inbound(&from, vec![wa::text(&from, &format!("warm{i}"), "hi")])).await;
            }
            let bodies: Vec<(Vec<u8>, String)> = (0..REQUESTS)
                .map(|i| {
                    let from = format!("49170{:07}", i % 500);
                    let body =
                        serde_json::to_vec(&wa::inbound(&from, vec![wa::text(&from, &format!("wamid.b{i}"), "help")]))
                            .unwrap();
                    let sig = wa::sign(wa::APP_SECRET, &body);
                    (body, sig)
                })
                .collect();
            let queue = std::sync::Arc::new(std::sync::Mutex::new(bodies));
            let started = Instant::now();
            let workers: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (queue, client, url) = (queue.clone(), app.client.clone(), app.url("/SmsReceived"));
                    tokio::spawn(async move {
                        let mut latencies = Vec::new();
                        loop {
                            let Some((body, sig)) = queue.lock().unwrap().pop() else { break };
                            let t = Instant::now();
                            let r = client.post(&url).header("x-hub-signature-256", sig).body(body).send().await;
                            assert_eq!(r.expect("reachable").status(), 200);
                            latencies.push(t.elapsed());
                        }
                        latencies
                    })
                })
                .collect();
            let mut latencies: Vec<Duration> = Vec::new();
            for w in workers {
                latencies.extend(w.await.unwrap());
            }
            let elapsed = started.elapsed();
            latencies.sort();
            let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
            println!(
                "{:>8}, {concurrency:>2} concurrent: {:>6.0} requests/s, p50 {:>6.1} ms, p99 {:>6.1} ms, max {:>6.1} ms",
                if postgres { "postgres" } else { "sqlite" },
                REQUESTS as f64 / elapsed.as_secs_f64(),
                pct(0.50).as_secs_f64() * 1000.0,
                pct(0.99).as_secs_f64() * 1000.0,
                latencies.last().unwrap().as_secs_f64() * 1000.0,
            );
        }
    }
}
