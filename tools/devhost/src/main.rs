//! devhost: runs this repository's `spin.toml` the way `spin up` does, on wasmtime, where the
//! Spin CLI cannot be installed. A faithful subset of Spin, not a new platform: whatever the
//! manifest asks for that devhost lacks stops start-up with its name.
//!
//! ```text
//! devhost up [--from spin.toml] [--listen 127.0.0.1:3000] [--state-dir .spin]
//!            [--runtime-config-file F] [--redis memory] [--cache-dir DIR]
//!            [-c COMPONENT-ID]...
//! ```
//!
//! As in Spin, when a Redis trigger loses its server (or never reaches it) the whole app stops
//! with "A trigger exited unexpectedly. Terminating." and exit status 1: a supervisor restarts
//! it. Only the in-process broker (`--redis memory`) has no such failure.

mod app;
mod broker;
mod host;
mod manifest;
mod outbound;
mod router;
mod runtime_config;
mod variables;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "devhost", version, about = "Run a Spin app (spin.toml) on wasmtime, as `spin up` would")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the application.
    Up(UpArgs),
}

#[derive(clap::Args)]
struct UpArgs {
    /// The application manifest.
    #[arg(short = 'f', long = "from", default_value = "spin.toml")]
    manifest: PathBuf,
    /// Address the HTTP trigger listens on (127.0.0.1:3000). Like Spin, refused when the
    /// selected components have no HTTP trigger.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Where default key-value stores and SQLite databases live (Spin: `.spin/`).
    #[arg(long, default_value = ".spin")]
    state_dir: PathBuf,
    /// Spin runtime configuration file.
    #[arg(long = "runtime-config-file")]
    runtime_config: Option<PathBuf>,
    /// `memory` serves Redis (outbound and triggers) from an in-process broker: no server needed.
    #[arg(long)]
    redis: Option<String>,
    /// Cache of compiled components.
    #[arg(long, env = "DEVHOST_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Run only this component (repeatable), as `spin up -c`; a SpinApp's `components:`.
    #[arg(short = 'c', long = "component-id")]
    component_ids: Vec<String>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVHOST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,wasmtime_wasi_http=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Up(args) => match runtime.block_on(up(args))? {
            Outcome::Stopped => Ok(()),
            Outcome::TriggerExited { error, with_http } => {
                // Spin's words, so that logs and supervisors read the same under both hosts.
                // Spin prints the last line only when other triggers (HTTP) ran beside Redis.
                eprintln!("Error: {error:?}");
                if with_http {
                    eprintln!("A trigger exited unexpectedly. Terminating.");
                }
                std::process::exit(1)
            }
        },
    }
}

/// How `up` ended.
enum Outcome {
    /// A signal asked it to stop.
    Stopped,
    /// A Redis trigger ended (its server went away or never answered).
    TriggerExited { error: anyhow::Error, with_http: bool },
}

async fn up(args: UpArgs) -> Result<Outcome> {
    let started = std::time::Instant::now();
    let redis_memory = match args.redis.as_deref() {
        None => false,
        Some("memory") => true,
        Some(other) => bail!("--redis takes only 'memory' (got '{other}'); real Redis addresses come from spin.toml"),
    };
    let opts = app::Options {
        manifest: args.manifest,
        state_dir: args.state_dir,
        runtime_config: args.runtime_config,
        redis_memory,
        cache_dir: args.cache_dir,
        components: args.component_ids,
        env: std::env::vars().collect(),
    };
    let app = app::App::load(&opts).await?;
    let listener = if app.has_http() {
        let addr = args.listen.unwrap_or_else(|| "127.0.0.1:3000".parse().expect("a valid address"));
        Some(tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?)
    } else if args.listen.is_some() {
        bail!("--listen: the selected components have no HTTP trigger (spin up refuses it too)");
    } else {
        None
    };
    let mut triggers = app.start_redis_triggers();
    let redis_ended = async {
        match triggers.join_next().await {
            Some(Ok(e)) => e,
            Some(Err(join)) => anyhow::Error::new(join).context("redis trigger task failed"),
            None => std::future::pending().await,
        }
    };
    let http = async {
        match listener {
            Some(listener) => {
                tracing::info!(
                    "serving '{}' on http://{} (ready in {} ms)",
                    app.name,
                    listener.local_addr()?,
                    started.elapsed().as_millis()
                );
                app.clone().serve(listener, std::future::pending()).await
            }
            None => {
                tracing::info!("running '{}' without HTTP (ready in {} ms)", app.name, started.elapsed().as_millis());
                std::future::pending().await
            }
        }
    };
    let outcome = tokio::select! {
        _ = shutdown_signal() => Outcome::Stopped,
        error = redis_ended => Outcome::TriggerExited { error, with_http: app.has_http() },
        served = http => { served?; Outcome::Stopped }
    };
    tracing::info!("shutting down");
    Ok(outcome)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
