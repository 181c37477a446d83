//! README command 1, `scripts/run.sh`, run as a newcomer runs it: on devhost (nothing to
//! install), and with a Spin CLI while no Redis is running (the script must start one rather
//! than let `spin up` die). Each run gets its own port, state directory and Redis port. The
//! build step is skipped (`ASTRIA_SKIP_BUILD=1`): scripts/test.sh has built everything.
//!
//! The Spin variant needs a Spin CLI in `ASTRIA_SPIN_CLI` (scripts/test.sh sets it from
//! `SPIN_BIN` or ../shared/tools/spin, and skips it by name, `under_spin`, when there is none).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use astria_tests::whatsapp as wa;
use astria_tests::{free_port, workspace_root};
use serde_json::Value;

struct Run {
    child: Child,
    log: std::path::PathBuf,
    listen: String,
    redis_port: u16,
    _dir: tempfile::TempDir,
}

impl Run {
    fn start(host: &str, spin: Option<&str>) -> Run {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("run.log");
        let out = std::fs::File::create(&log).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let redis_port = free_port();
        let redis = format!("redis://127.0.0.1:{redis_port}");
        let mut cmd = Command::new("bash");
        cmd.arg(workspace_root().join("scripts/run.sh"))
            .env("ASTRIA_HOST", host)
            // scripts/test.sh built everything; a cargo build inside `cargo test` would redo
            // devhost with other features (or wait for the test run's lock).
            .env("ASTRIA_SKIP_BUILD", "1")
            .env("ASTRIA_LISTEN", &listen)
            .env("ASTRIA_STATE_DIR", dir.path().join("state"))
            .env("SPIN_VARIABLE_REDIS_URL", &redis)
            .env("SPIN_VARIABLE_REDIS_HOST", &redis)
            .env("SPIN_VARIABLE_WHATSAPP_APP_SECRET", wa::APP_SECRET)
            .env("SPIN_VARIABLE_WHATSAPP_PHONE_NUMBER_ID", wa::PHONE_NUMBER_ID)
            .env_remove("SPIN_BIN")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            // Its own process group, so that the whole run (host, relay loop, Redis) can be
            // stopped together, as Ctrl-C in a terminal does.
            .process_group(0);
        if let Some(spin) = spin {
            cmd.env("SPIN_BIN", spin);
        }
        Run { child: cmd.spawn().unwrap(), log, listen, redis_port, _dir: dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (bounded) until `/health/message` answers 200.
    async fn serving(&mut self, within: Duration) -> Duration {
        let started = Instant::now();
        let client = reqwest::Client::new();
        loop {
            if let Ok(r) = client.get(format!("http://{}/health/message", self.listen)).send().await {
                if r.status() == 200 {
                    return started.elapsed();
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("scripts/run.sh exited ({status}):\n{}", self.log());
            }
            assert!(started.elapsed() < within, "not serving within {within:?}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A signed WhatsApp webhook is accepted.
    async fn accepts_a_webhook(&self) {
        let body =
            serde_json::to_vec(&wa::inbound("4915112345678", vec![wa::text("4915112345678", "r1", "hi")])).unwrap();
        let r = reqwest::Client::new()
            .post(format!("http://{}/SmsReceived", self.listen))
            .header("content-type", "application/json")
            .header("x-hub-signature-256", wa::sign(wa::APP_SECRET, &body))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let report: Value = r.json().await.unwrap_or(Value::Null);
        assert_eq!((status, report["messages"].as_i64()), (200, Some(1)), "{report}\n{}", self.log());
    }

    /// The admin token the script generated opens the operator console's data: it is in
    /// `<state>/admin-token`, readable by its owner only, and on no line of the output.
    async fn console_opens_with_the_kept_token(&self) {
        use std::os::unix::fs::PermissionsExt;
        let path = self._dir.path().join("state/admin-token");
        let token = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}\n{}", self.log()));
        let token = token.trim();
        assert!(token.len() >= 32, "a generated token: {token:?}");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!self.log().contains(token), "the token is never printed:\n{}", self.log());
        assert!(self.log().contains("/maintenance/console (admin token in "), "{}", self.log());
        let client = reqwest::Client::new();
        let funnel = format!("http://{}/maintenance/console/api/funnel", self.listen);
        let r = client.get(&funnel).bearer_auth(token).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", self.log());
        assert_eq!(client.get(&funnel).bearer_auth("wrong").send().await.unwrap().status(), 401);
    }

    /// Ctrl-C: SIGINT to the group, then waits for the script to end.
    fn interrupt(&mut self) {
        signal_group(&self.child, "INT");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_group(&self.child, "KILL");
        panic!("scripts/run.sh did not stop on Ctrl-C:\n{}", self.log());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        signal_group(&self.child, "KILL");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Sends `signal` to the run's process group (procps' kill needs `--` before a negative pid).
fn signal_group(child: &Child, signal: &str) {
    let _ = Command::new("kill").args(["-s", signal, "--", &format!("-{}", child.id())]).status();
}

async fn redis_answers(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else { return false };
    match tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection()).await {
        Ok(Ok(mut c)) => redis::cmd("PING").query_async::<String>(&mut c).await.is_ok(),
        _ => false,
    }
}

#[tokio::test]
async fn run_script_serves_the_app_on_devhost_with_nothing_running() {
    let mut run = Run::start("devhost", None);
    let took = run.serving(Duration::from_secs(300)).await;
    eprintln!("scripts/run.sh (devhost) served /health/message after {took:?}");
    run.accepts_a_webhook().await;
    run.console_opens_with_the_kept_token().await;
    assert!(!redis_answers(run.redis_port).await, "devhost needs no Redis: none was started");
    run.interrupt();
}

#[tokio::test]
async fn run_script_under_spin_starts_the_redis_it_needs_and_serves() {
    let spin = std::env::var("ASTRIA_SPIN_CLI").expect(
        "this test needs a Spin CLI in ASTRIA_SPIN_CLI (scripts/test.sh skips it by name, under_spin, without one)",
    );
    let mut run = Run::start("spin", Some(&spin));
    assert!(!redis_answers(run.redis_port).await, "no Redis at start");
    let took = run.serving(Duration::from_secs(300)).await;
    eprintln!("scripts/run.sh (Spin) served /health/message after {took:?}");
    assert!(run.log().contains(&format!("started redis-server on 127.0.0.1:{}", run.redis_port)), "{}", run.log());
    run.accepts_a_webhook().await;

    // Redis goes away: spin up stops (its trigger never reconnects); the script restarts the
    // Redis it started and then spin up, and the app serves again.
    let client = redis::Client::open(format!("redis://127.0.0.1:{}", run.redis_port)).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _ = redis::cmd("SHUTDOWN").arg("NOSAVE").query_async::<()>(&mut conn).await;
    astria_tests::wait_until_or(
        "the script to start spin up again once Redis is back",
        Duration::from_secs(60),
        || async { run.log().contains("Redis is back: starting spin up again").then_some(()) },
        || run.log(),
    )
    .await;
    run.serving(Duration::from_secs(60)).await;
    run.interrupt();
    assert!(!redis_answers(run.redis_port).await, "the Redis the script started is stopped with it");
}
