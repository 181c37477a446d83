//! The loaded application: compiled components, their permissions, app-wide services, and the
//! two triggers (HTTP and Redis) that call them.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store};
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::{WasiBody, WasiHttpView};

use crate::broker::Broker;
use crate::host::bindings::trigger::RedisTriggerPre;
use crate::host::bindings::SpinImports;
use crate::host::kv::KvBackend;
use crate::host::{log_output, ComponentCtx, HostState};
use crate::manifest::{Manifest, Route};
use crate::outbound::AllowedHosts;
use crate::router::{RouteMatch, Router};
use crate::runtime_config::{self, RuntimeConfig};
use crate::variables::Variables;

/// How devhost is asked to run an app.
#[derive(Debug, Clone)]
pub struct Options {
    pub manifest: PathBuf,
    pub state_dir: PathBuf,
    pub runtime_config: Option<PathBuf>,
    /// Serve Redis (outbound and triggers) from the in-process broker instead of a server.
    pub redis_memory: bool,
    /// Where compiled components are cached between runs (None: no cache).
    pub cache_dir: Option<PathBuf>,
    /// Run only these components (`spin up -c`); empty runs all.
    pub components: Vec<String>,
    pub env: HashMap<String, String>,
}

/// App-wide backends shared by every instance.
pub struct Services {
    pub kv: HashMap<String, Arc<KvBackend>>,
    pub sqlite: HashMap<String, PathBuf>,
    pub broker: Option<Arc<Broker>>,
    redis: tokio::sync::Mutex<HashMap<String, redis::aio::MultiplexedConnection>>,
    /// PostgreSQL connection pools by address, as Spin keeps them (see [`Services::postgres_pool`]).
    postgres: std::sync::Mutex<HashMap<String, deadpool_postgres::Pool>>,
}

/// Connections per PostgreSQL address, Spin's `CONNECTION_POOL_SIZE`.
const POSTGRES_POOL_SIZE: usize = 64;

impl Services {
    /// A cached multiplexed connection to `address`, connecting on first use.
    pub async fn redis_connection(&self, address: &str) -> Result<redis::aio::MultiplexedConnection> {
        let mut conns = self.redis.lock().await;
        if let Some(c) = conns.get(address) {
            return Ok(c.clone());
        }
        let client = redis::Client::open(address).context("invalid redis address")?;
        let conn = tokio::time::timeout(Duration::from_secs(5), client.get_multiplexed_async_connection())
            .await
            .context("connecting to redis timed out")?
            .context("connecting to redis")?;
        conns.insert(address.to_string(), conn.clone());
        Ok(conn)
    }

    pub async fn forget_redis(&self, address: &str) {
        self.redis.lock().await.remove(address);
    }

    /// The pool of connections to `address`, made on first use. Spin's PostgreSQL host
    /// (`factor-outbound-pg`) keeps a deadpool-postgres pool of 64 connections per address with
    /// `RecyclingMethod::Clean` (one round trip resetting the session at every checkout), so a
    /// guest's `open` takes a kept connection, and waits when all 64 are out. devhost does the
    /// same: with a connection per `open`, a load of a few hundred requests/s ran PostgreSQL out
    /// of connections ("sorry, too many clients already"), where Spin's pool holds at 64.
    pub fn postgres_pool(&self, address: &str) -> Result<deadpool_postgres::Pool> {
        let mut pools = self.postgres.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pool) = pools.get(address) {
            return Ok(pool.clone());
        }
        let config: tokio_postgres::Config = address.parse().context("parsing the PostgreSQL address")?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig { recycling_method: deadpool_postgres::RecyclingMethod::Clean },
        );
        let pool = deadpool_postgres::Pool::builder(manager)
            .max_size(POSTGRES_POOL_SIZE)
            .build()
            .context("building the PostgreSQL pool")?;
        pools.insert(address.to_string(), pool.clone());
        Ok(pool)
    }
}

struct LoadedComponent {
    ctx: Arc<ComponentCtx>,
    proxy: Option<ProxyPre<HostState>>,
    redis: Option<RedisTriggerPre<HostState>>,
    /// The first route the component is reachable on, for chained requests' headers.
    route: Option<String>,
}

struct RedisSubscription {
    address: String,
    channel: String,
    component: String,
}

pub struct App {
    pub name: String,
    engine: Engine,
    components: HashMap<String, LoadedComponent>,
    router: Router,
    pub services: Services,
    subscriptions: Vec<RedisSubscription>,
    /// Values of secret variables, redacted from component output.
    secrets: Vec<String>,
}

fn engine() -> Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    Ok(Engine::new(&config)?)
}

/// Compiles a component, or loads it from the cache when the same bytes were compiled by the
/// same engine before.
fn compile(engine: &Engine, path: &std::path::Path, cache_dir: Option<&std::path::Path>) -> Result<Component> {
    use std::hash::{Hash, Hasher};
    let bytes = std::fs::read(path).with_context(|| format!("reading component {} (was it built?)", path.display()))?;
    let Some(cache_dir) = cache_dir else {
        return Component::new(engine, &bytes)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("compiling {}", path.display()));
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let cached = cache_dir.join(format!("{:016x}-{}.cwasm", hasher.finish(), bytes.len()));
    if cached.exists() {
        // SAFETY: the file was written by `precompile_component` of a compatible engine (the
        // key includes the engine's compatibility hash) into a cache only devhost writes.
        if let Ok(c) = unsafe { Component::deserialize_file(engine, &cached) } {
            return Ok(c);
        }
    }
    let compiled = engine
        .precompile_component(&bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("compiling {}", path.display()))?;
    std::fs::create_dir_all(cache_dir).ok();
    let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, &compiled).is_ok() {
        let _ = std::fs::rename(&tmp, &cached);
    }
    // SAFETY: `compiled` was produced just now by this engine.
    Ok(unsafe { Component::deserialize(engine, &compiled) }?)
}

impl App {
    pub async fn load(opts: &Options) -> Result<Arc<App>> {
        let mut manifest = Manifest::load(&opts.manifest)?;
        manifest.retain_components(&opts.components)?;
        let dotenv = manifest.dir.join(".env");
        let vars = Variables::resolve(&manifest.variables, &opts.env, Some(&dotenv))?;

        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("creating state dir {}", opts.state_dir.display()))?;
        let rc = match &opts.runtime_config {
            Some(path) => RuntimeConfig::load(path, &opts.state_dir, |s| vars.expand(s))?,
            None => RuntimeConfig::defaults(&opts.state_dir),
        };

        let engine = engine()?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)?;
        SpinImports::add_to_linker::<_, HasSelf<_>>(&mut linker, |s| s)?;

        let http_components: HashSet<&str> = manifest.http_triggers.iter().map(|t| t.component.as_str()).collect();
        let redis_components: HashSet<&str> = manifest.redis_triggers.iter().map(|t| t.component.as_str()).collect();

        let mut used_kv = HashSet::new();
        let mut components = HashMap::new();
        for (id, c) in &manifest.components {
            let allowed = c
                .allowed_outbound_hosts
                .iter()
                .map(|h| vars.expand(h))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("component '{id}' allowed_outbound_hosts"))?;
            let allowed_hosts = AllowedHosts::parse(&allowed).with_context(|| format!("component '{id}'"))?;
            let variables = c
                .variables
                .iter()
                .map(|(k, t)| Ok((k.clone(), vars.expand(t)?)))
                .collect::<Result<HashMap<_, _>>>()
                .with_context(|| format!("component '{id}' variables"))?;
            for label in &c.key_value_stores {
                if !rc.key_value.contains_key(label) {
                    bail!("unknown key_value_stores label \"{label}\" for component \"{id}\"");
                }
                used_kv.insert(label.clone());
            }
            for label in &c.sqlite_databases {
                if !rc.sqlite.contains_key(label) {
                    bail!("unknown sqlite_databases label \"{label}\" for component \"{id}\"");
                }
            }
            let ctx = Arc::new(ComponentCtx {
                id: id.clone(),
                allowed_hosts,
                variables,
                key_value_stores: c.key_value_stores.iter().cloned().collect(),
                sqlite_databases: c.sqlite_databases.iter().cloned().collect(),
                environment: c.environment.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            });
            let is_http = http_components.contains(id.as_str());
            let is_redis = redis_components.contains(id.as_str());
            if !is_http && !is_redis {
                // Spin loads only triggered components (and chaining targets need a trigger).
                continue;
            }
            let component = compile(&engine, &c.source, opts.cache_dir.as_deref())?;
            let pre = linker
                .instantiate_pre(&component)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("component '{id}' needs an import devhost does not provide"))?;
            let proxy = if is_http {
                Some(
                    ProxyPre::new(pre.clone())
                        .map_err(anyhow::Error::from)
                        .with_context(|| format!("component '{id}' is not an HTTP component"))?,
                )
            } else {
                None
            };
            let redis = if is_redis {
                Some(
                    RedisTriggerPre::new(pre)
                        .map_err(anyhow::Error::from)
                        .with_context(|| format!("component '{id}' is not a Redis component"))?,
                )
            } else {
                None
            };
            let route = manifest.http_triggers.iter().find(|t| &t.component == id).and_then(|t| match &t.route {
                Route::Public(r) => Some(r.clone()),
                Route::Private => None,
            });
            components.insert(id.clone(), LoadedComponent { ctx, proxy, redis, route });
        }

        let mut kv = HashMap::new();
        for label in used_kv {
            let backend = match &rc.key_value[&label] {
                runtime_config::KvBackend::Spin { path } => KvBackend::sqlite(path)?,
                runtime_config::KvBackend::Redis { url } => {
                    KvBackend::redis(url).await.with_context(|| format!("key_value_store.{label}"))?
                }
            };
            kv.insert(label, Arc::new(backend));
        }

        let mut subscriptions = Vec::new();
        for t in &manifest.redis_triggers {
            let template = t
                .address
                .clone()
                .or_else(|| manifest.application.trigger.redis.as_ref().map(|r| r.address.clone()))
                .context("redis trigger without address")?;
            let address = vars.expand(&template).context("redis trigger address")?;
            subscriptions.push(RedisSubscription {
                address,
                channel: t.channel.clone(),
                component: t.component.clone(),
            });
        }

        let router = Router::new(manifest.http_triggers.iter().map(|t| (&t.route, t.component.as_str())));
        Ok(Arc::new(App {
            name: manifest.application.name.clone(),
            engine,
            components,
            router,
            services: Services {
                kv,
                sqlite: rc.sqlite.clone().into_iter().collect(),
                broker: opts.redis_memory.then(|| Arc::new(Broker::default())),
                redis: Default::default(),
                postgres: Default::default(),
            },
            subscriptions,
            secrets: vars.secret_values().to_vec(),
        }))
    }

    fn new_store(self: &Arc<Self>, component: &LoadedComponent) -> Store<HostState> {
        Store::new(&self.engine, HostState::new(self.clone(), component.ctx.clone()))
    }

    /// Serves one request with a fresh instance of `component`.
    async fn handle_http<B>(
        self: &Arc<Self>,
        component_id: &str,
        mut req: http::Request<B>,
        route: &RouteMatch,
        client: SocketAddr,
    ) -> Result<http::Response<WasiBody>>
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        let component = self.components.get(component_id).with_context(|| format!("no component '{component_id}'"))?;
        let proxy =
            component.proxy.clone().with_context(|| format!("component '{component_id}' has no HTTP trigger"))?;
        set_spin_headers(&mut req, route, client)?;

        let mut store = self.new_store(component);
        let (stdout, stderr) = (store.data().stdout.clone(), store.data().stderr.clone());
        let (sender, receiver) = tokio::sync::oneshot::channel();
        let incoming = store.data_mut().http().new_incoming_request(Scheme::Http, req)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        let id = component_id.to_string();
        let app = self.clone();
        let task = tokio::task::spawn(async move {
            let result = async {
                let proxy = proxy.instantiate_async(&mut store).await?;
                proxy.wasi_http_incoming_handler().call_handle(&mut store, incoming, out).await
            }
            .await;
            log_output(&id, &app.secrets, &stdout, &stderr);
            result
        });
        match receiver.await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(code)) => bail!("component '{component_id}' answered with error {code:?}"),
            Err(_) => {
                let err = match task.await {
                    Ok(Ok(())) => anyhow::anyhow!("component '{component_id}' did not set a response"),
                    Ok(Err(e)) => anyhow::Error::from(e).context(format!("component '{component_id}' failed")),
                    Err(e) => anyhow::Error::new(e).context(format!("component '{component_id}' task failed")),
                };
                Err(err)
            }
        }
    }

    /// A request from outside: route it, or answer 404.
    async fn handle_external(
        self: Arc<Self>,
        req: http::Request<hyper::body::Incoming>,
        client: SocketAddr,
    ) -> http::Response<WasiBody> {
        let path = req.uri().path().to_string();
        match path.as_str() {
            "/.well-known/spin/health" => return text(200, "OK"),
            "/.well-known/spin/info" => {
                let body =
                    serde_json::json!({ "app": self.name, "host": "devhost", "version": env!("CARGO_PKG_VERSION") });
                return text(200, &body.to_string());
            }
            _ => {}
        }
        let Some(route) = self.router.route(&path) else {
            return text(404, "Not Found");
        };
        let started = std::time::Instant::now();
        let method = req.method().clone();
        match self.handle_http(&route.component.clone(), req, &route, client).await {
            Ok(resp) => {
                tracing::debug!(component = %route.component, %method, path, status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "request");
                resp
            }
            Err(e) => {
                tracing::error!(component = %route.component, %method, path, "request failed: {e:#}");
                text(500, "Internal Server Error")
            }
        }
    }

    /// Local service chaining: a request to `http://<target>.spin.internal/...`.
    pub async fn chain(
        self: &Arc<Self>,
        target: &str,
        req: http::Request<WasiBody>,
    ) -> Result<http::Response<WasiBody>> {
        let component = self.components.get(target).with_context(|| format!("no HTTP component '{target}'"))?;
        let raw = component.route.clone().unwrap_or_else(|| "/...".to_string());
        let prefix = raw.strip_suffix("/...").unwrap_or(&raw).to_string();
        let route = RouteMatch {
            component: target.to_string(),
            raw_route: raw,
            component_route: prefix,
            path_info: req.uri().path().to_string(),
        };
        let client: SocketAddr = "127.0.0.1:0".parse()?;
        match self.handle_http(target, req, &route, client).await {
            Ok(r) => Ok(r),
            Err(e) => {
                tracing::error!(component = target, "chained request failed: {e:#}");
                Ok(text(500, "Internal Server Error"))
            }
        }
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = listener.accept() => {
                    let (stream, client) = match accepted {
                        Ok(a) => a,
                        Err(e) => { tracing::warn!("accept failed: {e}"); continue; }
                    };
                    let app = self.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let app = app.clone();
                            async move { Ok::<_, std::convert::Infallible>(app.handle_external(req, client).await) }
                        });
                        if let Err(e) = hyper::server::conn::http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                            .await
                        {
                            tracing::debug!("connection from {client} ended: {e}");
                        }
                    });
                }
            }
        }
    }

    /// Whether any selected component has an HTTP trigger (Spin listens only then).
    pub fn has_http(&self) -> bool {
        self.components.values().any(|c| c.proxy.is_some())
    }

    /// Starts one subscriber per Redis trigger address, as Spin does. Each handles one message
    /// at a time (Spin awaits the handler before reading the next message).
    ///
    /// With the in-process broker the subscribers run until shutdown. With a real Redis they
    /// behave as Spin's trigger: a subscription that cannot connect, cannot subscribe, or loses
    /// its connection ends with an error and is never retried. The returned set yields that
    /// error; `devhost up` then stops the whole app, as `spin up` does, and whatever supervises
    /// it (the kubelet, a script, the test harness) starts it again.
    pub fn start_redis_triggers(self: &Arc<Self>) -> tokio::task::JoinSet<anyhow::Error> {
        let mut ended = tokio::task::JoinSet::new();
        let mut by_address: HashMap<String, Vec<(String, String)>> = HashMap::new();
        for s in &self.subscriptions {
            by_address.entry(s.address.clone()).or_default().push((s.channel.clone(), s.component.clone()));
        }
        for (address, channels) in by_address {
            let app = self.clone();
            match &self.services.broker {
                Some(broker) => {
                    for (channel, component) in channels {
                        let mut rx = broker.subscribe(&channel);
                        let app = app.clone();
                        tracing::info!("subscribed to in-memory channel '{channel}' for component '{component}'");
                        tokio::spawn(async move {
                            loop {
                                match rx.recv().await {
                                    Ok(payload) => app.handle_message(&component, &channel, payload).await,
                                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                                        tracing::warn!(
                                            "channel '{channel}': {n} messages dropped (subscriber too slow)"
                                        )
                                    }
                                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                                }
                            }
                        });
                    }
                }
                None => {
                    ended.spawn(async move {
                        match app.run_listener(&address, &channels).await {
                            Ok(never) => match never {},
                            Err(e) => e,
                        }
                    });
                }
            }
        }
        ended
    }

    /// One subscription to a real Redis, as Spin's `Subscriber::run_listener`: it returns only
    /// with the error that ended it, with Spin's wording.
    async fn run_listener(
        self: Arc<Self>,
        address: &str,
        channels: &[(String, String)],
    ) -> Result<std::convert::Infallible> {
        let client = redis::Client::open(address).context("invalid redis address")?;
        let server = client.get_connection_info().addr.to_string();
        let mut pubsub =
            client.get_async_pubsub().await.with_context(|| format!("Redis trigger failed to connect to {server}"))?;
        for (channel, component) in channels {
            pubsub
                .subscribe(channel)
                .await
                .with_context(|| format!("Redis trigger failed to subscribe to channel {channel:?} on {server}"))?;
            tracing::info!("subscribed to redis channel '{channel}' on {server} for component '{component}'");
        }
        let routes: HashMap<String, String> = channels.iter().cloned().collect();
        let mut stream = pubsub.on_message();
        while let Some(msg) = stream.next().await {
            let channel = msg.get_channel_name().to_string();
            match routes.get(&channel) {
                Some(component) => self.handle_message(component, &channel, msg.get_payload_bytes().to_vec()).await,
                None => tracing::error!("message from unexpected channel {channel:?}"),
            }
        }
        bail!("disconnected from {server}")
    }

    /// Calls the component for one message in a fresh instance and waits for it; errors are
    /// logged, as in Spin.
    async fn handle_message(self: &Arc<Self>, component_id: &str, channel: &str, payload: Vec<u8>) {
        let Some(component) = self.components.get(component_id) else { return };
        let Some(pre) = component.redis.clone() else { return };
        let mut store = self.new_store(component);
        let (stdout, stderr) = (store.data().stdout.clone(), store.data().stderr.clone());
        let result = async {
            let instance = pre.instantiate_async(&mut store).await?;
            instance.fermyon_spin_inbound_redis().call_handle_message(&mut store, &payload).await
        }
        .await;
        log_output(component_id, &self.secrets, &stdout, &stderr);
        match result {
            Ok(Ok(())) => tracing::debug!(component = %component_id, channel, "message handled"),
            Ok(Err(e)) => tracing::warn!(component = %component_id, channel, "handler returned an error: {e:?}"),
            Err(e) => tracing::error!(component = %component_id, channel, "handler trapped: {e:#}"),
        }
    }
}

fn text(status: u16, body: &str) -> http::Response<WasiBody> {
    http::Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(body.to_string())).map_err(|never| match never {}).boxed_unsync())
        .expect("static response")
}

/// The headers Spin adds to every request it routes to a component.
fn set_spin_headers<B>(req: &mut http::Request<B>, route: &RouteMatch, client: SocketAddr) -> Result<()> {
    let host = req.headers().get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost").to_string();
    let path_and_query = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let full_url = format!("http://{host}{path_and_query}");
    let pairs = [
        ("spin-full-url", full_url),
        ("spin-path-info", route.path_info.clone()),
        ("spin-matched-route", route.raw_route.clone()),
        ("spin-base-path", "/".to_string()),
        ("spin-raw-component-route", route.raw_route.clone()),
        ("spin-component-route", route.component_route.clone()),
        ("spin-client-addr", client.to_string()),
    ];
    let headers = req.headers_mut();
    for (name, value) in pairs {
        headers.insert(name, http::HeaderValue::from_str(&value).with_context(|| format!("header {name}"))?);
    }
    Ok(())
}
