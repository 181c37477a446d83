//! The integration-test harness: start the app's real wasm components in a real host, with
//! fresh state, and talk to it over HTTP.
//!
//! [`spawn_app`] builds nothing itself: `scripts/test.sh` builds the components and devhost
//! first (the harness says so clearly if they are missing). Each app gets a free port, a fresh
//! state directory, optionally a fresh PostgreSQL database and a unique Redis channel prefix,
//! and is stopped (and its database dropped) when the [`TestApp`] is dropped.
//!
//! Host selection: devhost by default; set `SPIN_BIN=/path/to/spin` to run the same tests
//! under the real Spin CLI (`spin up`). Tests that need devhost-only features (the in-memory
//! broker) are skipped there with a message.
//!
//! Set `TEST_LOG=1` to see the host's output.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod astria;
pub mod fakes;
pub mod stripe;
pub mod whatsapp;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Where the wasm components are built.
pub fn wasm_dir() -> PathBuf {
    workspace_root().join("target/wasm32-wasip2/release")
}

/// PostgreSQL server used by tests (trust auth on these machines and CI).
pub fn postgres_admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Redis server used by tests.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Which host runs the app.
#[derive(Debug, Clone)]
pub enum Host {
    Devhost(PathBuf),
    Spin(PathBuf),
}

impl Host {
    pub fn from_env() -> Result<Host> {
        if let Ok(spin) = std::env::var("SPIN_BIN") {
            return Ok(Host::Spin(PathBuf::from(spin)));
        }
        let bin = std::env::var("DEVHOST_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| workspace_root().join("target/host/devhost"));
        if !bin.exists() {
            bail!(
                "devhost is not built at {} (run scripts/test.sh, or cargo build --profile host -p devhost)",
                bin.display()
            );
        }
        Ok(Host::Devhost(bin))
    }

    pub fn is_spin(&self) -> bool {
        matches!(self, Host::Spin(_))
    }
}

/// How to start one app.
#[derive(Debug, Clone, Default)]
pub struct AppConfig {
    /// Manifest text. `@WASM_DIR@` becomes the components' build directory and
    /// `@CHANNEL_PREFIX@` this app's unique Redis channel prefix.
    pub manifest: String,
    pub runtime_config: Option<String>,
    /// Extra environment (e.g. `SPIN_VARIABLE_X`).
    pub env: BTreeMap<String, String>,
    /// Use devhost's in-process broker instead of a Redis server.
    pub redis_memory: bool,
    /// Create a fresh PostgreSQL database; its URL is in `TestApp::database_url`.
    pub postgres: bool,
    /// Reuse a state directory (to test persistence across restarts, or to share SQLite).
    pub state_dir: Option<PathBuf>,
    /// Use this channel prefix instead of a fresh one (apps acting as replicas share it).
    pub channel_prefix: Option<String>,
}

impl AppConfig {
    pub fn new(manifest: impl Into<String>) -> Self {
        AppConfig { manifest: manifest.into(), ..Default::default() }
    }

    pub fn var(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.insert(format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase()), value.into());
        self
    }

    /// A replica of `app`: same manifest settings, same database, same state directory and
    /// Redis channels, so that both consume the same events.
    pub fn replica_of(mut self, app: &TestApp) -> Self {
        self.postgres = false;
        if let Some(url) = &app.database_url {
            self = self.var("database_url", url.clone());
        }
        self.state_dir = Some(app.state_dir.clone());
        self.channel_prefix = Some(app.channel_prefix.clone());
        self
    }
}

/// A running app. Dropping it stops the host and drops its database.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub state_dir: PathBuf,
    pub channel_prefix: String,
    pub database_url: Option<String>,
    child: Option<Child>,
    log_path: PathBuf,
    _work: tempfile::TempDir,
    owns_database: Option<String>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("GET reaches the app")
    }

    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.client.post(self.url(path)).body(body).send().await.expect("POST reaches the app")
    }

    /// What the host printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to 5 s; returns the exit status if the host stopped by itself
    /// (it is killed otherwise, and `None` is returned).
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// Sends only the request head of a POST declaring `length` bytes, and reads the answer.
    pub async fn headers_only_post(&self, path: &str, length: usize) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.address.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head =
            format!("POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {length}\r\nconnection: close\r\n\r\n");
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await;
        let text = String::from_utf8_lossy(&raw).to_string();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        // The body may be chunk-encoded: keep the JSON object itself.
        let body = match (text.find('{'), text.rfind('}')) {
            (Some(a), Some(b)) if a < b => text[a..=b].to_string(),
            _ => text.clone(),
        };
        (status, body)
    }

    /// Polls `check` until it returns `Some`, for at most `timeout`.
    pub async fn eventually<T, F, Fut>(&self, timeout: Duration, mut check: F) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        eventually(timeout, &mut check).await
    }
}

/// Polls `check` until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, check: &mut F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop();
        if std::env::var_os("TEST_LOG").is_some() {
            eprintln!("---- host log ----\n{}", self.log());
        }
        if let Some(db) = self.owns_database.take() {
            // Drop runs outside any async context we can borrow: use a thread of its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
                rt.block_on(async { drop_database(&db).await.ok() })
            })
            .join();
        }
    }
}

async fn admin() -> Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(&postgres_admin_url(), tokio_postgres::NoTls)
        .await
        .context("connecting to PostgreSQL for test set-up (is it running? scripts/test.sh starts it)")?;
    tokio::spawn(conn);
    Ok(client)
}

/// Creates an empty database and returns its name.
pub async fn create_database() -> Result<String> {
    let name = format!("astria_test_{}", uuid::Uuid::new_v4().simple());
    admin().await?.batch_execute(&format!("CREATE DATABASE {name}")).await.context("creating test database")?;
    Ok(name)
}

pub async fn drop_database(name: &str) -> Result<()> {
    admin().await?.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
    Ok(())
}

/// URL of a database on the test server.
pub fn database_url(name: &str) -> String {
    let admin = postgres_admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0").local_addr().expect("addr").port()
}

/// The repository's own `spin.toml`, with component sources made absolute so that it can be
/// started from a temporary directory.
pub fn app_manifest() -> String {
    let text = std::fs::read_to_string(workspace_root().join("spin.toml")).expect("reading spin.toml");
    text.replace("source = \"target/", &format!("source = \"{}/target/", workspace_root().display()))
}

/// Starts the app and waits until it answers `/.well-known/spin/health`.
pub async fn spawn_app(config: AppConfig) -> Result<TestApp> {
    let host = Host::from_env()?;
    let work = tempfile::tempdir()?;
    let channel_prefix = config
        .channel_prefix
        .clone()
        .unwrap_or_else(|| format!("t{}-", &uuid::Uuid::new_v4().simple().to_string()[..12]));
    let manifest = config
        .manifest
        .replace("@WASM_DIR@", &wasm_dir().display().to_string())
        .replace("@CHANNEL_PREFIX@", &channel_prefix);
    let manifest_path = work.path().join("spin.toml");
    std::fs::write(&manifest_path, manifest)?;
    let state_dir = config.state_dir.clone().unwrap_or_else(|| work.path().join("state"));

    let (database_url, owns_database) = if config.postgres {
        let name = create_database().await?;
        (Some(database_url(&name)), Some(name))
    } else {
        (None, None)
    };

    let port = free_port();
    let address = format!("http://127.0.0.1:{port}");
    let log_path = work.path().join("host.log");
    let log = std::fs::File::create(&log_path)?;

    let mut cmd = match &host {
        Host::Devhost(bin) => {
            let mut c = Command::new(bin);
            c.arg("up");
            c.env("DEVHOST_CACHE_DIR", workspace_root().join("target/devhost-cache"));
            if config.redis_memory {
                c.args(["--redis", "memory"]);
            }
            c
        }
        Host::Spin(bin) => {
            if config.redis_memory {
                bail!("the in-memory broker is devhost-only (SPIN_BIN is set)");
            }
            let mut c = Command::new(bin);
            c.arg("up");
            c
        }
    };
    cmd.arg("--from").arg(&manifest_path);
    cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
    cmd.arg("--state-dir").arg(&state_dir);
    if let Some(rc) = &config.runtime_config {
        let rc_path = work.path().join("runtime-config.toml");
        std::fs::write(&rc_path, rc.replace("@STATE_DIR@", &state_dir.display().to_string()))?;
        cmd.arg("--runtime-config-file").arg(rc_path);
    }
    if let Some(url) = &database_url {
        cmd.env("SPIN_VARIABLE_DATABASE_URL", url);
    }
    cmd.envs(&config.env);
    cmd.current_dir(work.path());
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let child = cmd.spawn().with_context(|| format!("starting {host:?}"))?;

    let mut app = TestApp {
        address,
        client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
        state_dir,
        channel_prefix,
        database_url,
        child: Some(child),
        log_path,
        _work: work,
        owns_database,
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(child) = app.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                app.child = None;
                bail!("host exited during start-up ({status}):\n{}", app.log());
            }
        }
        if let Ok(r) = app.client.get(app.url("/.well-known/spin/health")).send().await {
            if r.status().is_success() {
                return Ok(app);
            }
        }
        if Instant::now() > deadline {
            bail!("host did not become healthy within 60 s:\n{}", app.log());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts the host expecting it to fail during start-up; returns what it printed.
pub async fn spawn_app_expecting_failure(config: AppConfig) -> Result<String> {
    match spawn_app(config).await {
        Ok(app) => bail!("host started although it should not have:\n{}", app.log()),
        Err(e) => Ok(format!("{e:#}")),
    }
}

/// Waits until a Redis channel has at least `n` subscribers (the trigger is listening).
pub async fn wait_for_subscribers(channel: &str, n: i64) -> Result<()> {
    wait_for_subscribers_at(&redis_url(), channel, n).await
}

/// Like [`wait_for_subscribers`], on the Redis at `url`.
pub async fn wait_for_subscribers_at(url: &str, channel: &str, n: i64) -> Result<()> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, count): (String, i64) =
            redis::cmd("PUBSUB").arg("NUMSUB").arg(channel).query_async::<(String, i64)>(&mut conn).await?;
        if count >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("channel {channel} has {count} subscribers, expected {n}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Redis server of the test's own, on a free port, that the test may stop and restart
/// (stopping the shared one would disturb other tests).
pub struct TestRedis {
    pub port: u16,
    child: Option<Child>,
}

impl TestRedis {
    pub async fn start() -> Result<TestRedis> {
        let mut r = TestRedis { port: free_port(), child: None };
        r.restart().await?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port).
    pub async fn restart(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (scripts/ensure-services.sh installs it)")?;
        self.child = Some(child);
        let client = redis::Client::open(self.url())?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING").query_async::<String>(&mut c).await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("redis-server on port {} did not start", self.port);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the server, as an outage would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Publishes a message on the test Redis server.
pub async fn redis_publish(channel: &str, payload: &[u8]) -> Result<i64> {
    let client = redis::Client::open(redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    Ok(redis::cmd("PUBLISH").arg(channel).arg(payload).query_async(&mut conn).await?)
}
