//! A PostgreSQL server of the test's own, as [`crate::TestRedis`] is for Redis: a fresh cluster
//! (`initdb`) in a temporary directory on a free port, which the test can stop and start again
//! under a running app, on the same port and with the same data, to show the app recovering.
//!
//! Debian's server binaries (`/usr/lib/postgresql/<version>/bin`, the `postgresql` package
//! `scripts/ensure-services.sh` installs) are used directly. PostgreSQL refuses to run as root,
//! so as root the cluster belongs to, and runs as, the `postgres` user.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub struct TestPostgres {
    pub port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    child: Option<Child>,
}

fn server_bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: PostgreSQL's server package is not installed")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    versions.sort_by_key(|p| {
        p.parent().and_then(|v| v.file_name()).and_then(|v| v.to_str()).and_then(|v| v.parse::<u32>().ok())
    });
    versions.pop().context("no initdb under /usr/lib/postgresql/*/bin")
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// `program args...`, as the `postgres` user when we are root.
fn as_server_user(program: &std::path::Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

impl TestPostgres {
    /// A fresh cluster (trust auth for `postgres` over TCP), started and accepting queries.
    pub async fn start() -> Result<TestPostgres> {
        let bin = server_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("astria-pg").tempdir()?;
        if is_root() {
            let status = Command::new("chown").arg("postgres:postgres").arg(dir.path()).status()?;
            if !status.success() {
                bail!("chown postgres {}: {status}", dir.path().display());
            }
        }
        let data = dir.path().join("data");
        let out = as_server_user(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "-D"])
            .arg(&data)
            .stdin(Stdio::null())
            .output()
            .context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut pg = TestPostgres { port, dir, bin, child: None };
        pg.restart().await?;
        Ok(pg)
    }

    /// `host:port`, the form of the `postgres_host` variable.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}?sslmode=disable", self.port)
    }

    /// `config` pointed at database `name` on this server (created here).
    pub async fn app_config(&self, config: crate::AppConfig, name: &str) -> Result<crate::AppConfig> {
        self.create_database(name).await?;
        Ok(config.var("database_url", self.url(name)).var("postgres_host", self.host()))
    }

    /// Creates database `name`.
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let (client, conn) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        client.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        Ok(())
    }

    /// Starts the server (again), on the same port and data, and waits until it answers.
    pub async fn restart(&mut self) -> Result<()> {
        let data = self.dir.path().join("data");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("server.log"))?;
        let child = as_server_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .arg("-k")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting postgres")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok((client, conn)) = tokio_postgres::connect(&self.url("postgres"), tokio_postgres::NoTls).await {
                tokio::spawn(conn);
                if client.simple_query("SELECT 1").await.is_ok() {
                    return Ok(());
                }
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("postgres exited ({status}):\n{}", self.server_log());
            }
            if Instant::now() > deadline {
                bail!("postgres did not answer within 30 s:\n{}", self.server_log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the server at once, as a crash or a pod eviction would (immediate shutdown: open
    /// connections are cut, nothing is flushed politely).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            // As root the child is runuser; the server is its child, signalled through pkill.
            let _ = Command::new("pkill").args(["-QUIT", "-P", &pid]).status();
            let _ = Command::new("kill").args(["-s", "QUIT", &pid]).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
            // Until the postmaster is gone, its port and pid file block the restart.
            let pidfile = self.dir.path().join("data/postmaster.pid");
            let deadline = Instant::now() + Duration::from_secs(10);
            while pidfile.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for TestPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}
