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
//! Topology: by default one host process runs every component. With
//! [`AppConfig::deployment`] the app starts as SpinKube runs it, one supervised process per
//! SpinApp of `kubernetes/base` behind a path-routing proxy (see [`deployment`]).
//!
//! PostgreSQL: a test that uses it must carry `postgres` in its name (the harness refuses
//! otherwise), so that a host that cannot run PostgreSQL skips exactly those, by name
//! (`cargo test -- --skip postgres`; `scripts/test.sh` does so for Spin 4.0.0-4.0.2, which hang
//! on a query returning no rows: spinframework/spin#3671).
//!
//! Set `TEST_LOG=1` to see the host's output.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod astria;
pub mod browser;
pub mod db;
pub mod deployment;
pub mod fakes;
pub mod history;
pub mod otel;
pub mod postgres;
pub mod quiet;
pub mod stripe;
pub mod whatsapp;
pub mod world;

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

    /// What a benchmark prints as its host: `devhost`, or the Spin binary's version line.
    pub fn label(&self) -> String {
        match self {
            Host::Devhost(_) => "devhost".into(),
            Host::Spin(bin) => std::process::Command::new(bin)
                .arg("--version")
                .output()
                .ok()
                // "spin 3.6.3 (<commit> <date>)": the name and version are enough.
                .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().take(2).collect::<Vec<_>>().join(" "))
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| format!("Spin at {}", bin.display())),
        }
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
    /// With `postgres`: a password in the database URL (the test server trusts local users, so
    /// it is accepted and ignored), to prove it never reaches a log.
    pub database_password: Option<String>,
    /// Reuse a state directory (to test persistence across restarts, or to share SQLite).
    pub state_dir: Option<PathBuf>,
    /// Use this channel prefix instead of a fresh one (apps acting as replicas share it).
    pub channel_prefix: Option<String>,
    /// Run only these components (`-c`, as `spin up -c`); empty runs all.
    pub components: Vec<String>,
    /// Start the app as SpinKube runs it: one supervised process per SpinApp.
    pub deployment: bool,
    /// With `deployment`: the process groups, when not the SpinApps of `kubernetes/base`
    /// (a test fixture split the same way).
    pub groups: Option<Vec<deployment::SpinAppSpec>>,
    /// With `deployment`: how long a process that exited stays down before it is started again.
    pub restart_delay: Option<Duration>,
    /// With `deployment`: return before the workers are subscribed (e.g. Redis is absent).
    pub skip_worker_wait: bool,
}

impl AppConfig {
    pub fn new(manifest: impl Into<String>) -> Self {
        AppConfig { manifest: manifest.into(), ..Default::default() }
    }

    pub fn var(mut self, name: &str, value: impl Into<String>) -> Self {
        self.env.insert(format!("SPIN_VARIABLE_{}", name.to_ascii_uppercase()), value.into());
        self
    }

    /// Points the app at the Redis server at `url` (`redis://host:port`): the connection
    /// string (`redis_url`) and the host its components may reach (`redis_host`).
    pub fn redis(self, url: impl Into<String>) -> Self {
        let url = url.into();
        self.var("redis_host", url.clone()).var("redis_url", url)
    }

    /// Starts the app as SpinKube runs it (see [`deployment`]), restarting a process that
    /// exits after `restart_delay`.
    pub fn as_deployment(mut self, restart_delay: Duration) -> Self {
        self.deployment = true;
        self.restart_delay = Some(restart_delay);
        self
    }

    /// Like [`AppConfig::as_deployment`], with the given process groups (name, components).
    pub fn split(mut self, groups: &[(&str, &[&str])], restart_delay: Duration) -> Self {
        self.groups = Some(
            groups
                .iter()
                .map(|(name, comps)| deployment::SpinAppSpec {
                    name: name.to_string(),
                    components: comps.iter().map(|c| c.to_string()).collect(),
                })
                .collect(),
        );
        self.as_deployment(restart_delay)
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
    /// With a deployment: its processes, one per SpinApp, and the proxy in front of them.
    pub processes: Vec<deployment::Process>,
    proxy: Option<tokio::task::JoinHandle<()>>,
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

    /// `method path` with an optional bearer token and JSON body: the status, and the answer's
    /// JSON (Null when it is not JSON). How tests call the maintenance routes.
    pub async fn call(&self, method: &str, path: &str, bearer: Option<&str>, body: Option<Value>) -> (u16, Value) {
        let mut req = self.client.request(method.parse().expect("an HTTP method"), self.url(path));
        if let Some(token) = bearer {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.expect("the app is reachable");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// `GET /maintenance/metrics` with `token`: the status and the Prometheus text.
    pub async fn metrics(&self, token: &str) -> (u16, String) {
        let r = self
            .client
            .get(self.url("/maintenance/metrics"))
            .bearer_auth(token)
            .send()
            .await
            .expect("metrics reachable");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// What the host printed so far (every process's, for a deployment).
    pub fn log(&self) -> String {
        if !self.processes.is_empty() {
            return deployment::combined_log(&self.processes);
        }
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The whole lines the host printed so far (every process's, for a deployment), for a test
    /// that reads a line's fields: a host may be writing its last line while the log is read,
    /// and half a line has the first fields without the rest.
    pub fn log_lines(&self) -> Vec<String> {
        let logs = if self.processes.is_empty() {
            vec![std::fs::read_to_string(&self.log_path).unwrap_or_default()]
        } else {
            self.processes.iter().map(deployment::Process::log).collect()
        };
        logs.iter().flat_map(|log| log[..log.rfind('\n').map_or(0, |i| i + 1)].lines().map(String::from)).collect()
    }

    /// A deployment's process by SpinApp name.
    pub fn process(&self, spinapp: &str) -> &deployment::Process {
        self.processes.iter().find(|p| p.name == spinapp).unwrap_or_else(|| panic!("no SpinApp {spinapp}"))
    }

    /// Sends SIGTERM and waits up to 5 s; returns the exit status if the host stopped by itself
    /// (it is killed otherwise, and `None` is returned). A deployment's processes are all stopped.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Some(p) = self.proxy.take() {
            p.abort();
        }
        for p in &mut self.processes {
            p.stop();
        }
        let mut child = self.child.take()?;
        deployment::terminate(&mut child)
    }

    /// Waits up to `timeout` for the host to exit by itself; answers its status.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                if let Some(mut c) = self.child.take() {
                    deployment::reap_group(&mut c);
                }
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Sends only the request head of a POST declaring `length` bytes, and reads the answer.
    pub async fn headers_only_post(&self, path: &str, length: usize) -> (u16, String) {
        self.headers_only_post_with(path, length, &[]).await
    }

    /// [`TestApp::headers_only_post`] with extra headers (a signature, say).
    pub async fn headers_only_post_with(&self, path: &str, length: usize, headers: &[(&str, &str)]) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.address.trim_start_matches("http://");
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {length}\r\n{extra}connection: close\r\n\r\n"
        );
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

    /// POSTs `total` bytes chunk-encoded (no Content-Length) over a raw connection and answers
    /// the status. A server that answers 413 early and closes is read, not lost as a broken
    /// pipe (reqwest would report only the failed write).
    pub async fn chunked_post(&self, path: &str, total: usize) -> u16 {
        self.chunked_post_with(path, total, &[]).await
    }

    /// [`TestApp::chunked_post`] with extra headers (a signature, say).
    pub async fn chunked_post_with(&self, path: &str, total: usize, headers: &[(&str, &str)]) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.address.trim_start_matches("http://");
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ntransfer-encoding: chunked\r\n{extra}connection: close\r\n\r\n"
        );
        let writer = tokio::spawn(async move {
            wr.write_all(head.as_bytes()).await?;
            let chunk = vec![b'{'; 64 * 1024];
            let mut sent = 0;
            while sent < total {
                wr.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await?;
                wr.write_all(&chunk).await?;
                wr.write_all(b"\r\n").await?;
                sent += chunk.len();
            }
            wr.write_all(b"0\r\n\r\n").await
        });
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut raw)).await;
        writer.abort();
        let text = String::from_utf8_lossy(&raw);
        text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    /// Waits until `check` answers `Some`, for at most `timeout`; then fails the test naming
    /// what it waited for, with the app's log.
    pub async fn wait_until<T, F, Fut>(&self, what: &str, timeout: Duration, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        wait_until_or(what, timeout, check, || format!("---- the app's log ----\n{}", self.log())).await
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

/// Waits until `check` answers `Some`, polling every 25 ms for at most `timeout`; then fails
/// the test saying what it waited for. The one way a test waits: for a condition, with a
/// deadline, never for a time.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    wait_until_or(what, timeout, check, String::new).await
}

/// [`wait_until`], adding `context()` (the app's log, say) to the failure.
pub async fn wait_until_or<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
    context: impl FnOnce() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    match eventually(timeout, &mut check).await {
        Some(v) => v,
        None => panic!("waited {timeout:?} for {what}, in vain ({})\n{}", open_files(), context()),
    }
}

/// This process's open files by kind, and its limit: one line that a failed wait or start
/// prints, so that a run short of file descriptors (a leak, or a low `ulimit -n`) says so
/// instead of looking like a slow app.
pub fn open_files() -> String {
    let kinds = open_file_kinds();
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_string())
        })
        .unwrap_or_else(|| "?".into());
    let total: usize = kinds.values().sum();
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
    format!("open files: {total} of a soft limit of {limit} ({})", kinds.join(", "))
}

/// This process's open file descriptors by kind: `socket`, `pipe`, an anonymous inode's own
/// name (`[eventpoll]`, `[eventfd]`), or `file` for a path.
fn open_file_kinds() -> std::collections::BTreeMap<String, usize> {
    let mut kinds = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir("/proc/self/fd").into_iter().flatten().flatten() {
        let target = std::fs::read_link(entry.path()).map(|t| t.display().to_string()).unwrap_or_default();
        let kind = match target.split_once(':') {
            Some((kind, what)) if kind == "anon_inode" => what.to_string(),
            Some((kind, _)) if !target.starts_with('/') => kind.to_string(),
            _ => "file".to_string(),
        };
        *kinds.entry(kind).or_default() += 1;
    }
    kinds
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

/// URL of a database on the test server. `sslmode=disable`: Spin's PostgreSQL client would
/// otherwise negotiate TLS and verify a local server's self-signed certificate (devhost and
/// tokio-postgres read the parameter too).
pub fn database_url(name: &str) -> String {
    let admin = postgres_admin_url();
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}?sslmode=disable")
}

/// Refuses a PostgreSQL test whose name does not say so (see the module docs).
fn check_postgres_test_name() -> Result<()> {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("main");
    if name != "main" && !name.contains("postgres") {
        bail!(
            "test '{name}' uses PostgreSQL but its name does not contain 'postgres': hosts that cannot run \
             PostgreSQL skip tests by that word (cargo test -- --skip postgres)"
        );
    }
    Ok(())
}

/// A port free on loopback now (the OS picks it), and never one this process handed out
/// before: a host binds its port only later, and meanwhile the OS may offer the same port to
/// the next caller (a deployment once got one port for two of its SpinApps, and the second
/// could not listen).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind :0").local_addr().expect("addr").port();
        if GIVEN.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// The repository's own `spin.toml`, with component sources made absolute so that it can be
/// started from a temporary directory.
pub fn app_manifest() -> String {
    let text = std::fs::read_to_string(workspace_root().join("spin.toml")).expect("reading spin.toml");
    text.replace("source = \"target/", &format!("source = \"{}/target/", workspace_root().display()))
}

/// What every host process of one app shares.
#[derive(Clone)]
struct Launch {
    host: Host,
    manifest_path: PathBuf,
    state_dir: PathBuf,
    runtime_config: Option<PathBuf>,
    database_url: Option<String>,
    env: BTreeMap<String, String>,
    redis_memory: bool,
    cwd: PathBuf,
}

impl Launch {
    /// The host command for `components` (all when empty), listening on `port` if given.
    fn command(&self, components: &[String], port: Option<u16>, log: std::fs::File) -> Result<Command> {
        let mut cmd = match &self.host {
            Host::Devhost(bin) => {
                let mut c = Command::new(bin);
                c.arg("up");
                c.env("DEVHOST_CACHE_DIR", workspace_root().join("target/devhost-cache"));
                if self.redis_memory {
                    c.args(["--redis", "memory"]);
                }
                c
            }
            Host::Spin(bin) => {
                if self.redis_memory {
                    bail!("the in-memory broker is devhost-only (SPIN_BIN is set)");
                }
                let mut c = Command::new(bin);
                c.arg("up");
                c
            }
        };
        cmd.arg("--from").arg(&self.manifest_path);
        for c in components {
            cmd.arg("-c").arg(c);
        }
        if let Some(port) = port {
            cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
        }
        cmd.arg("--state-dir").arg(&self.state_dir);
        if let Some(rc) = &self.runtime_config {
            cmd.arg("--runtime-config-file").arg(rc);
        }
        if let Some(url) = &self.database_url {
            cmd.env("SPIN_VARIABLE_DATABASE_URL", url);
        }
        cmd.envs(&self.env);
        cmd.current_dir(&self.cwd);
        cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // A group of its own, so that stopping it stops Spin's trigger processes too
        // (deployment::terminate).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(cmd)
    }
}

/// The runtime config of an app a test starts, as the repository's `runtime-config.toml` with
/// the state directory's paths: Spin's `default` database where Spin keeps it without one
/// (`sqlite_db.db`), the inbox's beside it (`db::TestDb::inbox_of` reads both).
pub const RUNTIME_CONFIG: &str = r#"
[sqlite_database.default]
type = "spin"
path = "@STATE_DIR@/sqlite_db.db"

[sqlite_database.inbox]
type = "spin"
path = "@STATE_DIR@/sqlite_inbox.db"
"#;

/// Starts the app and waits until it answers `/.well-known/spin/health` (for a deployment:
/// until every HTTP process answers and every worker is subscribed).
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
    std::fs::write(&manifest_path, &manifest)?;
    let state_dir = config.state_dir.clone().unwrap_or_else(|| work.path().join("state"));

    let uses_postgres =
        config.postgres || config.env.get("SPIN_VARIABLE_DATABASE_URL").is_some_and(|u| u.starts_with("postgres"));
    if uses_postgres {
        check_postgres_test_name()?;
    }
    let (database_url, owns_database) = if config.postgres {
        let name = create_database().await?;
        let mut url = database_url(&name);
        if let Some(pw) = &config.database_password {
            url = url.replacen("://postgres@", &format!("://postgres:{pw}@"), 1);
        }
        (Some(url), Some(name))
    } else {
        // A PostgreSQL URL the test gave (a server of its own): the test reads the same.
        (config.env.get("SPIN_VARIABLE_DATABASE_URL").filter(|u| u.starts_with("postgres")).cloned(), None)
    };
    // Always a runtime config: the app's manifest declares the `inbox` SQLite label, which
    // Spin (and devhost) refuse to start without.
    let rc = config.runtime_config.as_deref().unwrap_or(RUNTIME_CONFIG);
    let rc_path = work.path().join("runtime-config.toml");
    std::fs::write(&rc_path, rc.replace("@STATE_DIR@", &state_dir.display().to_string()))?;
    let runtime_config = Some(rc_path);
    let launch = Launch {
        host: host.clone(),
        manifest_path,
        state_dir: state_dir.clone(),
        runtime_config,
        database_url: database_url.clone(),
        env: config.env.clone(),
        redis_memory: config.redis_memory,
        cwd: work.path().to_path_buf(),
    };

    let mut app = TestApp {
        address: String::new(),
        client: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?,
        state_dir,
        channel_prefix,
        database_url,
        child: None,
        log_path: work.path().join("host.log"),
        processes: vec![],
        proxy: None,
        _work: work,
        owns_database,
    };

    if config.deployment {
        start_deployment(&mut app, &launch, &manifest, &config).await?;
        return Ok(app);
    }

    let port = free_port();
    app.address = format!("http://127.0.0.1:{port}");
    let log = std::fs::File::create(&app.log_path)?;
    let mut cmd = launch.command(&config.components, Some(port), log)?;
    app.child = Some(cmd.spawn().with_context(|| format!("starting {host:?}"))?);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(child) = app.child.as_mut() {
            if let Some(status) = child.try_wait()? {
                deployment::reap_group(child);
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

/// One process per SpinApp, supervised, behind the proxy; waits until they serve.
async fn start_deployment(app: &mut TestApp, launch: &Launch, manifest: &str, config: &AppConfig) -> Result<()> {
    let triggers = deployment::Triggers::of_manifest(manifest)?;
    let restart_delay = config.restart_delay.unwrap_or(Duration::from_secs(1));
    let mut backends = BTreeMap::new();
    let groups = match &config.groups {
        Some(g) => g.clone(),
        None => deployment::spinapps()?,
    };
    for spec in groups {
        let port = triggers.has_http(&spec.components).then(free_port);
        let log_path = app._work.path().join(format!("{}.log", spec.name));
        let (l, comps, lp) = (launch.clone(), spec.components.clone(), log_path.clone());
        let launcher: deployment::Launcher = Arc::new(move || {
            let log = deployment::append_log(&lp)?;
            Ok(l.command(&comps, port, log)?.spawn()?)
        });
        let http = port.map(|p| SocketAddr::from(([127, 0, 0, 1], p)));
        if let Some(addr) = http {
            for c in &spec.components {
                backends.insert(c.clone(), addr);
            }
        }
        app.processes.push(deployment::Process::start(
            &spec.name,
            spec.components,
            http,
            log_path,
            launcher,
            restart_delay,
        )?);
    }
    let (proxy, task) = deployment::start_proxy(triggers.clone(), backends).await?;
    app.address = format!("http://{proxy}");
    app.proxy = Some(task);

    let redis = config.env.get("SPIN_VARIABLE_REDIS_URL").cloned().unwrap_or_else(redis_url);
    let deadline = Instant::now() + Duration::from_secs(60);
    for p in &app.processes {
        match p.http {
            Some(addr) => loop {
                let ok = app.client.get(format!("http://{addr}/.well-known/spin/health")).send().await;
                if ok.is_ok_and(|r| r.status().is_success()) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("SpinApp {} did not become healthy within 60 s:\n{}", p.name, app.log());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            },
            None if config.skip_worker_wait => {}
            None => {
                for channel in triggers.channels_of(&p.components) {
                    wait_for_subscribers_at(&redis, &channel, 1)
                        .await
                        .with_context(|| format!("SpinApp {} did not subscribe:\n{}", p.name, app.log()))?;
                }
            }
        }
    }
    Ok(())
}

/// Starts the host expecting it to fail during start-up; returns what it printed.
pub async fn spawn_app_expecting_failure(config: AppConfig) -> Result<String> {
    match spawn_app(config).await {
        Ok(app) => bail!("host started although it should not have:\n{}", app.log()),
        Err(e) => Ok(format!("{e:#}")),
    }
}

/// The SQLite statements devhost counted per guest connection, from its log
/// (`DEVHOST_LOG=devhost::sqlite=debug` logs each connection's count when it closes): one
/// (component, statements) per connection, in the log's order.
pub fn devhost_statement_counts(log: &str) -> Vec<(String, u64)> {
    log.lines()
        .filter(|l| l.contains("connection closed"))
        .filter_map(|line| Some((log_field(line, "component")?, log_field(line, "statements")?.parse().ok()?)))
        .collect()
}

/// Every SQLite or PostgreSQL statement `component` ran, its first line each, in the log's
/// order (`DEVHOST_LOG=devhost::sqlite=trace,devhost::postgres=trace` logs every statement as
/// it starts; a statement of several lines continues on lines of its own, which carry no
/// marker).
pub fn devhost_statements(log: &str, component: &str) -> Vec<String> {
    let marker = format!("execute component={component} statement=");
    log.lines().filter_map(|line| line.split_once(&marker)).map(|(_, statement)| statement.trim().to_string()).collect()
}

/// The transactions `component` ran, each as its statements' first lines from `BEGIN` to
/// `COMMIT` or `ROLLBACK` inclusive, in the log's order ([`devhost_statements`]).
pub fn devhost_transactions(log: &str, component: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    let mut open: Option<Vec<String>> = None;
    for statement in devhost_statements(log, component) {
        let first = statement.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        match (first.as_str(), open.as_mut()) {
            ("BEGIN", _) => open = Some(vec![statement]),
            ("COMMIT" | "ROLLBACK", Some(t)) => {
                t.push(statement);
                out.extend(open.take());
            }
            (_, Some(t)) => t.push(statement),
            (_, None) => {}
        }
    }
    out
}

/// The value of `name=value` in one of devhost's log lines.
fn log_field(line: &str, name: &str) -> Option<String> {
    line.split(&format!("{name}="))
        .nth(1)
        .map(|v| v.split_whitespace().next().unwrap_or("").trim_matches('"').to_string())
}

/// What one instance's SQLite statements cost, as devhost logs it when the instance ends
/// (`DEVHOST_LOG=devhost::sqlite=debug`): one (component, statements, SQLite VM steps) per
/// instance that ran a statement, in the log's order.
pub fn devhost_instance_costs(log: &str) -> Vec<(String, u64, u64)> {
    log.lines()
        .filter(|l| l.contains("instance done"))
        .filter_map(|line| {
            let number = |name: &str| log_field(line, name)?.parse().ok();
            Some((log_field(line, "component")?, number("statements")?, number("vm_steps")?))
        })
        .collect()
}

/// Writes a benchmark's Markdown to `target/bench/<name>-<host>.md` (spaces in the host's
/// label become dashes), where `scripts/bench.sh` gathers it; answers the file.
pub fn write_bench_table(name: &str, host: &str, text: &str) -> std::path::PathBuf {
    let dir = workspace_root().join("target/bench");
    std::fs::create_dir_all(&dir).expect("target/bench");
    let file = dir.join(format!("{name}-{}.md", host.replace(' ', "-")));
    std::fs::write(&file, text).expect("writing the benchmark's table");
    file
}

/// The checked-out commit, short, for a benchmark's heading ("" outside a git checkout).
pub fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
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
    password: Option<String>,
    child: Option<Child>,
}

impl TestRedis {
    pub async fn start() -> Result<TestRedis> {
        let mut r = TestRedis { port: free_port(), password: None, child: None };
        r.restart().await?;
        Ok(r)
    }

    /// A server that refuses clients without `password` (as managed Redis does).
    pub async fn start_with_password(password: &str) -> Result<TestRedis> {
        let mut r = TestRedis { port: free_port(), password: Some(password.to_string()), child: None };
        r.restart().await?;
        Ok(r)
    }

    /// `redis://[:password@]127.0.0.1:<port>`: what `redis_url` holds.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => self.host(),
        }
    }

    /// `redis://127.0.0.1:<port>`, without credentials: what `redis_host` holds.
    pub fn host(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port).
    pub async fn restart(&mut self) -> Result<()> {
        let mut args = vec!["--port".to_string(), self.port.to_string()];
        args.extend(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(String::from));
        if let Some(p) = &self.password {
            args.extend(["--requirepass".to_string(), p.clone()]);
        }
        let child = Command::new("redis-server")
            .args(&args)
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

/// Runs one test body on both databases: `on_both!(name)` turns `async fn name(postgres:
/// bool)` into the tests `name::sqlite` and `name::postgres` (the second carries the word the
/// harness and `--skip postgres` look for).
#[macro_export]
macro_rules! on_both {
    ($($f:ident),+ $(,)?) => {$(
        mod $f {
            #[tokio::test]
            async fn sqlite() {
                super::$f(false).await
            }
            #[tokio::test]
            async fn postgres() {
                super::$f(true).await
            }
        }
    )+};
}

/// Unit tests that open or count this process's file descriptors take it, so that one does
/// not count the other's sockets.
#[cfg(test)]
static DESCRIPTOR_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod open_files_tests {
    /// The report counts what the process holds, by kind, and names the limit.
    #[test]
    fn open_files_counts_the_files_and_sockets_this_process_holds() {
        let _alone = super::DESCRIPTOR_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let count =
            |kinds: &std::collections::BTreeMap<String, usize>, kind: &str| kinds.get(kind).copied().unwrap_or(0);
        let before = super::open_file_kinds();
        let files: Vec<_> = (0..3).map(|_| std::fs::File::open("/proc/self/status").unwrap()).collect();
        let sockets: Vec<_> = (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let after = super::open_file_kinds();
        assert_eq!(count(&after, "file"), count(&before, "file") + 3, "{before:?} / {after:?}");
        assert_eq!(count(&after, "socket"), count(&before, "socket") + 2, "{before:?} / {after:?}");
        let report = super::open_files();
        assert!(report.contains("socket ") && report.contains("of a soft limit of "), "{report}");
        drop((files, sockets));
    }
}

#[cfg(test)]
mod free_port_tests {
    /// Two thousand ports asked for in a row are all different (the OS alone repeated 127 of
    /// 2,000 here, as the birthday bound over its ephemeral range predicts).
    #[test]
    fn free_port_never_hands_out_a_port_twice() {
        let _alone = super::DESCRIPTOR_TESTS.lock().unwrap_or_else(|e| e.into_inner());
        let ports: Vec<u16> = (0..2000).map(|_| super::free_port()).collect();
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
    }
}

#[cfg(test)]
mod devhost_log_tests {
    /// Transactions are cut from BEGIN to COMMIT or ROLLBACK, per component, a statement of
    /// several lines counted once, statements outside a transaction left out.
    #[test]
    fn devhost_transactions_cuts_one_components_statements_into_transactions() {
        let log = "\
T devhost::sqlite: execute component=worker statement=SELECT 1 FROM job_leases
T devhost::sqlite: execute component=worker statement=BEGIN IMMEDIATE
T devhost::sqlite: execute component=web statement=INSERT INTO inbox
T devhost::sqlite: execute component=worker statement=INSERT INTO a (x)
             VALUES (?1)
T devhost::sqlite: execute component=worker statement=COMMIT
T devhost::sqlite: execute component=worker statement=begin
T devhost::sqlite: execute component=worker statement=UPDATE b
T devhost::sqlite: execute component=worker statement=ROLLBACK
T devhost::sqlite: execute component=worker statement=DELETE FROM inbox";
        let t = super::devhost_transactions(log, "worker");
        assert_eq!(
            t,
            vec![
                vec!["BEGIN IMMEDIATE".to_string(), "INSERT INTO a (x)".into(), "COMMIT".into()],
                vec!["begin".to_string(), "UPDATE b".into(), "ROLLBACK".into()],
            ]
        );
        assert!(super::devhost_transactions(log, "web").is_empty());
    }
}
