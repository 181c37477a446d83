//! The shipped topology in tests: the app started as SpinKube runs it.
//!
//! Each SpinApp of `kubernetes/base/spinapps.yaml` becomes one host process running only its
//! components (`-c`, as the SpinApp's `components:` list does), and each process is supervised:
//! one that exits is started again after a delay, as the kubelet restarts a container. The split
//! is read from the manifests, never repeated here, so the tests run what is deployed.
//!
//! In front of the HTTP processes a small proxy plays the Ingress and the in-cluster Services:
//! it sends each request to the process whose component serves the path (Spin's routing rules:
//! exact route first, then the longest `/...` prefix) and answers 502 while that process is down.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::workspace_root;

/// One SpinApp: its name and the components it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpinAppSpec {
    pub name: String,
    pub components: Vec<String>,
}

/// The SpinApps of `kubernetes/base/spinapps.yaml`, in file order.
pub fn spinapps() -> Result<Vec<SpinAppSpec>> {
    let path = workspace_root().join("kubernetes/base/spinapps.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let docs = yaml_rust2::YamlLoader::load_from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut out = vec![];
    for d in docs.iter().filter(|d| d["kind"].as_str() == Some("SpinApp")) {
        let name = d["metadata"]["name"].as_str().context("a SpinApp without metadata.name")?.to_string();
        let components = d["spec"]["components"]
            .as_vec()
            .with_context(|| format!("SpinApp {name} lists no components"))?
            .iter()
            .map(|c| c.as_str().map(str::to_string).context("a component that is not a string"))
            .collect::<Result<Vec<_>>>()?;
        out.push(SpinAppSpec { name, components });
    }
    if out.is_empty() {
        bail!("no SpinApp in {}", path.display());
    }
    Ok(out)
}

/// What the app's `spin.toml` says about triggers: route → component, and the Redis channels of
/// each Redis-trigger component.
#[derive(Debug, Clone, Default)]
pub struct Triggers {
    pub routes: Vec<(String, String)>,
    pub channels: BTreeMap<String, Vec<String>>,
}

impl Triggers {
    pub fn of_manifest(text: &str) -> Result<Triggers> {
        let doc: toml::Value = toml::from_str(text).context("parsing spin.toml")?;
        let mut t = Triggers::default();
        for h in doc.get("trigger").and_then(|t| t.get("http")).and_then(|h| h.as_array()).into_iter().flatten() {
            if let (Some(route), Some(component)) =
                (h.get("route").and_then(|r| r.as_str()), h.get("component").and_then(|c| c.as_str()))
            {
                t.routes.push((route.to_string(), component.to_string()));
            }
        }
        for r in doc.get("trigger").and_then(|t| t.get("redis")).and_then(|h| h.as_array()).into_iter().flatten() {
            if let (Some(channel), Some(component)) =
                (r.get("channel").and_then(|c| c.as_str()), r.get("component").and_then(|c| c.as_str()))
            {
                t.channels.entry(component.to_string()).or_default().push(channel.to_string());
            }
        }
        Ok(t)
    }

    /// The component serving `path`, by Spin's rules.
    pub fn component_for(&self, path: &str) -> Option<&str> {
        if let Some((_, c)) = self.routes.iter().find(|(r, _)| r == path) {
            return Some(c);
        }
        self.routes
            .iter()
            .filter_map(|(r, c)| {
                r.strip_suffix("/...")
                    .filter(|p| path == *p || path.starts_with(&format!("{p}/")))
                    .map(|p| (p.len(), c))
            })
            .max_by_key(|(len, _)| *len)
            .map(|(_, c)| c.as_str())
    }

    pub fn has_http(&self, components: &[String]) -> bool {
        self.routes.iter().any(|(_, c)| components.contains(c))
    }

    /// The Redis channels the given components subscribe to.
    pub fn channels_of(&self, components: &[String]) -> Vec<String> {
        components.iter().flat_map(|c| self.channels.get(c).cloned().unwrap_or_default()).collect()
    }
}

/// Starts a host process; called again for every restart.
pub type Launcher = Arc<dyn Fn() -> Result<Child> + Send + Sync>;

/// One supervised host process (a SpinApp's pod).
pub struct Process {
    pub name: String,
    pub components: Vec<String>,
    /// Where its HTTP trigger listens, if it has one.
    pub http: Option<SocketAddr>,
    pub log_path: PathBuf,
    child: Arc<Mutex<Option<Child>>>,
    exits: Arc<Mutex<Vec<ExitStatus>>>,
    supervisor: Option<tokio::task::JoinHandle<()>>,
}

impl Process {
    /// Starts the process and a task that restarts it `restart_delay` after each exit.
    pub fn start(
        name: &str,
        components: Vec<String>,
        http: Option<SocketAddr>,
        log_path: PathBuf,
        launch: Launcher,
        restart_delay: Duration,
    ) -> Result<Process> {
        let child = Arc::new(Mutex::new(Some(launch().with_context(|| format!("starting {name}"))?)));
        let exits = Arc::new(Mutex::new(Vec::new()));
        let supervisor = {
            let (child, exits, name) = (child.clone(), exits.clone(), name.to_string());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let exited = match child.lock().unwrap().as_mut() {
                        None => return, // stopped on purpose
                        Some(c) => c.try_wait().ok().flatten(),
                    };
                    let Some(status) = exited else { continue };
                    exits.lock().unwrap().push(status);
                    // Its trigger processes (Spin 3.x) must not outlive it, as in a pod.
                    if let Some(c) = child.lock().unwrap().as_mut() {
                        reap_group(c);
                    }
                    tokio::time::sleep(restart_delay).await;
                    let mut slot = child.lock().unwrap();
                    if slot.is_none() {
                        return;
                    }
                    match launch() {
                        Ok(c) => *slot = Some(c),
                        Err(e) => {
                            eprintln!("[deployment] could not restart {name}: {e:#}");
                            *slot = None;
                            return;
                        }
                    }
                }
            })
        };
        Ok(Process { name: name.to_string(), components, http, log_path, child, exits, supervisor: Some(supervisor) })
    }

    /// How often the process has exited by itself so far.
    pub fn exits(&self) -> Vec<ExitStatus> {
        self.exits.lock().unwrap().clone()
    }

    /// Whether the process is running now.
    pub fn is_running(&self) -> bool {
        matches!(self.child.lock().unwrap().as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Stops the process for good (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self) {
        if let Some(s) = self.supervisor.take() {
            s.abort();
        }
        if let Some(mut c) = self.child.lock().unwrap().take() {
            terminate(&mut c);
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops a host started in a process group of its own (the harness sets
/// `process_group(0)`): SIGTERM to the group, up to 5 s for the leader to exit, then SIGKILL to
/// whatever is left of the group. Spin 3.x runs each trigger as a child process (`spin trigger
/// http`, `spin trigger redis`): signalling the leader alone would orphan them, still
/// subscribed to the shared Redis. Answers the exit status if the leader stopped by itself.
pub fn terminate(child: &mut Child) -> Option<ExitStatus> {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-s", "TERM", "--", &group]).stderr(std::process::Stdio::null()).status();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut status = None;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    reap_group(child);
    status
}

/// SIGKILL to what is left of `child`'s process group (the leader may have exited by itself,
/// as Spin does when Redis goes away), and reaps the leader.
pub fn reap_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-s", "KILL", "--", &group]).stderr(std::process::Stdio::null()).status();
    let _ = child.kill();
    let _ = child.wait();
}

/// The Ingress of the test: routes each request to the process serving its path.
pub async fn start_proxy(
    triggers: Triggers,
    backends: BTreeMap<String, SocketAddr>,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?;
    let state = Arc::new((triggers, backends, client));
    let task = tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                // Out of file descriptors, say: retrying at once would spin and starve the
                // test's own tasks on this runtime; pause as a real server does.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(forward(&state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok((address, task))
}

type ProxyState = (Triggers, BTreeMap<String, SocketAddr>, reqwest::Client);

async fn forward(state: &ProxyState, req: hyper::Request<hyper::body::Incoming>) -> hyper::Response<Full<Bytes>> {
    let (triggers, backends, client) = state;
    let reply = |status: u16, body: &str| {
        hyper::Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("static response")
    };
    let path = req.uri().path().to_string();
    let backend = if path.starts_with("/.well-known/spin/") {
        backends.values().next().copied()
    } else {
        triggers.component_for(&path).and_then(|c| backends.get(c)).copied()
    };
    let Some(backend) = backend else { return reply(404, "no SpinApp serves this path") };
    let (parts, body) = req.into_parts();
    let Ok(body) = body.collect().await.map(|b| b.to_bytes()) else { return reply(400, "unreadable body") };
    let url = format!("http://{backend}{}", parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let mut out = client.request(parts.method, url).body(body);
    for (name, value) in parts.headers.iter() {
        if name != hyper::header::HOST && name != hyper::header::CONTENT_LENGTH {
            out = out.header(name, value);
        }
    }
    match out.send().await {
        Ok(r) => {
            let mut builder = hyper::Response::builder().status(r.status());
            for (name, value) in r.headers().iter() {
                if name != hyper::header::CONTENT_LENGTH && name != hyper::header::TRANSFER_ENCODING {
                    builder = builder.header(name, value);
                }
            }
            let body = r.bytes().await.unwrap_or_default();
            builder.body(Full::new(body)).unwrap_or_else(|_| reply(502, "bad answer from the SpinApp"))
        }
        // The process is down (restarting): what an Ingress answers with no ready endpoint.
        Err(_) => reply(502, "SpinApp unavailable"),
    }
}

/// The `host.log` files of a deployment's processes, each under its name.
pub fn combined_log(processes: &[Process]) -> String {
    processes.iter().map(|p| format!("==== {} ====\n{}", p.name, p.log())).collect::<Vec<_>>().join("\n")
}

/// A file of the given path, opened for appending (a restarted process adds to its log).
pub fn append_log(path: &Path) -> Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
}
