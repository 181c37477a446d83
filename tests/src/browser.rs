//! Headless Chromium for the browser tests (tests/browser.rs: the sandbox; tests/image.rs: the
//! operator console), driven over WebDriver by its own chromedriver, which runs in a process
//! group stopped with the test.
//!
//! Needs `chromium` and `chromedriver` (Debian's `chromium` and `chromium-driver`;
//! `scripts/ensure-chromium.sh` installs them, and scripts/test.sh skips the tests named
//! `browser` with the reason when they cannot be had). `ASTRIA_CHROMEDRIVER` and
//! `ASTRIA_CHROMIUM` name other binaries.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder};
use serde_json::{json, Value};

use crate::{free_port, workspace_root};

/// A process group stopped (TERM, then KILL) when dropped.
pub struct Group(pub Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pgid = self.0.id() as i32;
        let _ = Command::new("kill").args(["-s", "TERM", "--", &format!("-{pgid}")]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{pgid}")]).status();
        let _ = self.0.wait();
    }
}

pub fn binary(env: &str, names: &[&str]) -> String {
    if let Ok(b) = std::env::var(env) {
        return b;
    }
    for name in names {
        for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/bin", "/usr/lib/chromium"]) {
            let p = Path::new(dir).join(name);
            if p.is_file() {
                return p.display().to_string();
            }
        }
    }
    panic!("no {names:?} on this machine: scripts/ensure-chromium.sh installs Debian's chromium and chromium-driver ({env} names another)");
}

/// Headless Chromium under its own chromedriver.
pub struct Browser {
    pub client: Client,
    _driver: Group,
}

impl Browser {
    pub async fn start() -> Browser {
        let driver_bin = binary("ASTRIA_CHROMEDRIVER", &["chromedriver"]);
        let chromium = binary("ASTRIA_CHROMIUM", &["chromium", "chromium-browser", "google-chrome"]);
        let port = free_port();
        let driver = Group(
            Command::new(driver_bin)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("chromedriver starts"),
        );
        let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000"],
            }
        }))
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
            {
                Ok(client) => return Browser { client, _driver: driver },
                Err(e) if Instant::now() > deadline => panic!("no WebDriver session in 30 s: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
}

/// Where the browser tests save their screenshots for a reviewer: `target/browser/`.
pub fn screenshot_dir() -> PathBuf {
    let dir = workspace_root().join("target/browser");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
