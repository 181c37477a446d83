//! One test world: the whole app (in devhost, or Spin with `SPIN_BIN`; SQLite or PostgreSQL)
//! with every outside party faked as it really behaves (the WhatsApp Graph API with media,
//! Stripe, Astria calling back) and a Redis of its own, started with [`Options`]. A test that
//! needs the app and its fakes asks for a world instead of wiring them by hand.

use std::time::Duration;

use crate::astria::{self as fa, FakeAstria};
use crate::db::TestDb;
use crate::stripe::FakeStripe;
use crate::whatsapp::{self as wa, FakeGraph};
use crate::{TestApp, TestRedis};

/// How to start a [`World`]. `Options::default()` is one replica on SQLite.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A fresh PostgreSQL database instead of SQLite (the test's name must say `postgres`).
    pub postgres: bool,
    /// Apps sharing the database and Redis channels (replicas of every component); 0 counts
    /// as 1.
    pub replicas: usize,
    /// The first media lookups that the fake Graph API answers 500.
    pub media_failures: usize,
    /// Spin variables over the fakes' configuration.
    pub vars: Vec<(String, String)>,
    /// Started as SpinKube runs it (one supervised process per SpinApp, restarted this long
    /// after it exits) instead of in one host process.
    pub deployment: Option<Duration>,
}

impl Options {
    pub fn on(postgres: bool) -> Options {
        Options { postgres, ..Options::default() }
    }

    pub fn replicas(mut self, n: usize) -> Options {
        self.replicas = n;
        self
    }

    pub fn media_failures(mut self, n: usize) -> Options {
        self.media_failures = n;
        self
    }

    /// As SpinKube runs the app: one supervised process per SpinApp (see `deployment`).
    pub fn as_deployment(mut self, restart_delay: Duration) -> Options {
        self.deployment = Some(restart_delay);
        self
    }

    pub fn var(mut self, name: &str, value: &str) -> Options {
        self.vars.push((name.to_string(), value.to_string()));
        self
    }
}

/// The app and its fakes; everything stops (and the database is dropped) with it.
pub struct World {
    pub app: TestApp,
    /// The other replicas, if any.
    pub replicas: Vec<TestApp>,
    pub graph: FakeGraph,
    pub stripe: FakeStripe,
    pub astria: FakeAstria,
    pub redis: TestRedis,
}

impl World {
    /// Starts the fakes, then the app (and its replicas) configured for them, and waits until
    /// every replica's Redis triggers listen.
    pub async fn start(options: Options) -> World {
        let redis = TestRedis::start()
            .await
            .unwrap_or_else(|e| panic!("a Redis of the test's own starts: {e:#} ({})", crate::open_files()));
        let graph = FakeGraph::start().await;
        graph.serve_media(options.media_failures).await;
        let stripe = FakeStripe::start().await;
        let astria = FakeAstria::start().await;
        let config = || {
            let base = fa::bot_config(&graph, &redis, &stripe, &astria, options.postgres);
            let config = options.vars.iter().fold(base, |c, (k, v)| c.var(k, v.as_str()));
            match options.deployment {
                Some(restart_delay) => config.as_deployment(restart_delay),
                None => config,
            }
        };
        let app = wa::spawn_bot(config(), &redis).await;
        let mut replicas = vec![];
        for _ in 1..options.replicas.max(1) {
            replicas.push(crate::spawn_app(config().replica_of(&app)).await.expect("a replica starts"));
        }
        let n = options.replicas.max(1) as i64;
        crate::wait_for_subscribers_at(&redis.url(), "astria.orders", n).await.expect("every trainer subscribes");
        crate::wait_for_subscribers_at(&redis.url(), "astria.inbox", n)
            .await
            .expect("every conversation worker subscribes");
        World { app, replicas, graph, stripe, astria, redis }
    }

    /// The app's database, as the test reads and writes it.
    pub async fn db(&self) -> TestDb {
        TestDb::of(&self.app).await
    }

    /// Waits until `check` answers `Some` (see [`TestApp::wait_until`]).
    pub async fn wait_until<T, F, Fut>(&self, what: &str, timeout: Duration, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        self.app.wait_until(what, timeout, check).await
    }
}
