//! Per-instance host state, and the Spin interfaces devhost implements for components.
//!
//! Every request and every Redis message gets a fresh [`HostState`] in a fresh store, as in
//! Spin. The state borrows app-wide services (stores, databases, the broker) through
//! [`crate::app::App`] and carries the component's own permissions ([`ComponentCtx`]).

pub mod kv;
pub mod outbound_http;
pub mod postgres;
pub mod redis;
pub mod sqlite;
pub mod variables;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::app::App;
use crate::outbound::AllowedHosts;

pub mod bindings {
    //! wasmtime bindings for the Spin worlds in `tools/devhost/wit`.
    wasmtime::component::bindgen!({
        path: "wit",
        world: "astria-bot:devhost/spin-imports",
        imports: { default: async },
        with: {
            "fermyon:spin/key-value.store": super::kv::KvStore,
            "fermyon:spin/sqlite.connection": super::sqlite::SqliteConnection,
            "spin:sqlite/sqlite.connection": super::sqlite::SqliteConnection,
            "fermyon:spin/redis.connection": super::redis::RedisConnection,
            "spin:postgres/postgres.connection": super::postgres::PgConnection,
        },
    });

    pub mod trigger {
        wasmtime::component::bindgen!({
            path: "wit",
            world: "astria-bot:devhost/redis-trigger",
            exports: { default: async },
        });
    }
}

/// What one component may do, resolved from spin.toml at start-up.
#[derive(Debug)]
pub struct ComponentCtx {
    pub id: String,
    pub allowed_hosts: AllowedHosts,
    /// Component variables, already expanded from their templates.
    pub variables: HashMap<String, String>,
    pub key_value_stores: HashSet<String>,
    pub sqlite_databases: HashSet<String>,
    pub environment: Vec<(String, String)>,
}

/// The store data of one component instance.
pub struct HostState {
    pub wasi: WasiCtx,
    pub http: WasiHttpCtx,
    pub table: ResourceTable,
    pub outbound: outbound_http::OutboundHttp,
    pub ctx: Arc<ComponentCtx>,
    pub app: Arc<App>,
    pub stdout: MemoryOutputPipe,
    pub stderr: MemoryOutputPipe,
    /// The SQLite statements this instance ran and their work, logged when it ends.
    pub sqlite_cost: sqlite::SqliteCost,
}

/// Captured output per instance; longer output is cut (and says so in the log).
const OUTPUT_CAPACITY: usize = 256 * 1024;

impl HostState {
    pub fn new(app: Arc<App>, ctx: Arc<ComponentCtx>) -> Self {
        let stdout = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        let mut builder = WasiCtx::builder();
        builder.stdout(stdout.clone()).stderr(stderr.clone());
        for (k, v) in &ctx.environment {
            builder.env(k, v);
        }
        HostState {
            wasi: builder.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            outbound: outbound_http::OutboundHttp { app: app.clone(), ctx: ctx.clone() },
            ctx,
            app,
            stdout,
            stderr,
            sqlite_cost: Default::default(),
        }
    }
}

impl Drop for HostState {
    /// One line per instance that used SQLite (`DEVHOST_LOG=devhost::sqlite=debug`): what one
    /// request or one message cost, whatever connections it opened.
    fn drop(&mut self) {
        if self.sqlite_cost.statements > 0 {
            tracing::debug!(
                target: "devhost::sqlite",
                component = %self.ctx.id,
                statements = self.sqlite_cost.statements,
                vm_steps = self.sqlite_cost.vm_steps,
                "instance done"
            );
        }
    }
}

/// Writes what an instance printed to devhost's log, one line each, tagged with the component.
/// Values of `secret = true` variables are replaced by `***`, whatever the component printed.
pub fn log_output(component: &str, secrets: &[String], stdout: &MemoryOutputPipe, stderr: &MemoryOutputPipe) {
    for (stream, pipe) in [("stdout", stdout), ("stderr", stderr)] {
        let bytes = pipe.contents();
        for line in String::from_utf8_lossy(&bytes).lines() {
            let mut line = line.to_string();
            for secret in secrets {
                line = line.replace(secret.as_str(), "***");
            }
            tracing::info!(target: "component", component, stream, "{line}");
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for HostState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}
