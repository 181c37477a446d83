//! What an operator's reads cost as the history grows (issue 29's G5), under the host the tests
//! use (devhost, or the Spin CLI in `SPIN_BIN`), on SQLite and on PostgreSQL.
//!
//! For each database: one app, the live rows of `astria_tests::history::add_live`, then
//! history added up to each size in turn (default 1,000 and 1,000,000 delivered orders, with
//! their contacts, portraits, events, refunds and payment issues), the relay's fold, and each
//! operator read (`history::OPERATOR_READS`) timed over 50 requests, each on a new connection.
//! On PostgreSQL the database is `VACUUM ANALYZE`d after the fold, as autovacuum would.
//!
//! Prints the table and writes it, as Markdown, to `target/bench/operator-<host>.md`.
//!
//! Run: `cargo bench --profile host -p astria-tests --bench operator` (after scripts/build.sh,
//! with PostgreSQL and Redis up); `SPIN_BIN=/path/to/spin` runs it under real Spin;
//! `ASTRIA_BENCH_DATABASES=sqlite` limits it to one database; `ASTRIA_BENCH_HISTORY=1000,20000`
//! sets the sizes.

use std::time::{Duration, Instant};

use astria_tests::db::TestDb;
use astria_tests::history;
use astria_tests::whatsapp as wa;
use astria_tests::{app_manifest, spawn_app, AppConfig};

const REQUESTS: usize = 50;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() {
    let host = astria_tests::Host::from_env().expect("host").label();
    let sizes: Vec<i64> = std::env::var("ASTRIA_BENCH_HISTORY")
        .unwrap_or_else(|_| "1000,1000000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("ASTRIA_BENCH_HISTORY: whole numbers"))
        .collect();
    let databases = std::env::var("ASTRIA_BENCH_DATABASES").unwrap_or_else(|_| "sqlite,postgres".into());
    let mut rows = vec![
        "| database | history (delivered orders) | read | p50 ms | p99 ms | max ms |".to_string(),
        "| --- | ---: | --- | ---: | ---: | ---: |".to_string(),
    ];
    println!("Operator reads under {host}, this machine\n{}\n{}", rows[0], rows[1]);
    // A new connection per request: the figure is the read's, not a keep-alive stall's.
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    for db_name in databases.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let postgres = db_name == "postgres";
        let app =
            spawn_app(AppConfig { postgres, ..AppConfig::new(app_manifest()) }.var("admin_token", wa::ADMIN_TOKEN))
                .await
                .expect("the app starts");
        assert!(wa::relay(&app).await["republished"].is_number(), "the schema is in place");
        let db = TestDb::of(&app).await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        history::add_live(&db, now).await;
        let mut held = 0;
        for &size in &sizes {
            let started = Instant::now();
            history::add(&db, held, size - held, now).await;
            held = size;
            let folded = wa::relay(&app).await["tallies_folded"].clone();
            if postgres {
                // As autovacuum does within a minute of a burst: the fold deleted millions of
                // deltas, whose dead rows a scan of tally_deltas reads until a vacuum (29 ms
                // for 4 million here, 0.3 ms after one).
                db.execute("VACUUM ANALYZE", &[]).await;
            }
            eprintln!("{db_name}: history of {size} written and folded ({folded} deltas) in {:?}", started.elapsed());
            for route in history::OPERATOR_READS {
                let mut ms = Vec::with_capacity(REQUESTS);
                for _ in 0..REQUESTS {
                    let t = Instant::now();
                    let r = client
                        .get(app.url(route))
                        .bearer_auth(wa::ADMIN_TOKEN)
                        .timeout(Duration::from_secs(60))
                        .send()
                        .await
                        .expect("the app answers");
                    assert_eq!(r.status(), 200, "{route}");
                    r.bytes().await.unwrap();
                    ms.push(t.elapsed().as_secs_f64() * 1000.0);
                }
                ms.sort_by(f64::total_cmp);
                let row = format!(
                    "| {db_name} | {size} | `{route}` | {:.1} | {:.1} | {:.1} |",
                    percentile(&ms, 0.5),
                    percentile(&ms, 0.99),
                    ms[ms.len() - 1]
                );
                println!("{row}");
                rows.push(row);
            }
        }
    }
    let text = format!(
        "### {host}\n\nCommit {}; {REQUESTS} requests per read.\n\n{}\n",
        astria_tests::commit(),
        rows.join("\n")
    );
    let file = astria_tests::write_bench_table("operator", &host, &text);
    println!("written to {}", file.display());
}
