//! devhost: runs this repository's `spin.toml` the way `spin up` does, on wasmtime, where the
//! Spin CLI cannot be installed. A faithful subset of Spin, not a new platform: whatever the
//! manifest asks for that devhost lacks stops start-up with its name.
//!
//! ```text
//! devhost up [--from spin.toml] [--listen 127.0.0.1:3000] [--state-dir .spin]
//!            [--runtime-config-file F] [--redis memory] [--cache-dir DIR]
//! ```

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
    /// Address the HTTP trigger listens on.
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
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
        Command::Up(args) => runtime.block_on(up(args)),
    }
}

async fn up(args: UpArgs) -> Result<()> {
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
        env: std::env::vars().collect(),
    };
    let app = app::App::load(&opts).await?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    app.start_redis_triggers();
    tracing::info!("serving '{}' on http://{local} (ready in {} ms)", app.name, started.elapsed().as_millis());
    app.serve(listener, shutdown_signal()).await?;
    tracing::info!("shutting down");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
