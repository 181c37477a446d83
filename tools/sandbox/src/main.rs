//! The sandbox: every outside party of the app, on loopback, for a person in a browser.
//!
//! - **WhatsApp** (`graph.rs`, `phone.rs`): the Graph API the app sends through, media the app
//!   downloads with its token, and a phone page per customer whose taps and photos reach the
//!   app as webhooks signed with the app secret; delivery and read ticks go back as status
//!   webhooks.
//! - **Stripe** (`stripe.rs`): Checkout Sessions (idempotency as Stripe keeps it), a checkout
//!   page with Pay, Fail (async) and Let expire, each sending the signed webhook events Stripe
//!   sends.
//! - **Astria** (`astria.rs`, `portrait.rs`): pack tunes that train for a few seconds, then call
//!   the tune and prompt callbacks; the portraits are the customer's own photos with a filter
//!   and the prompt's words.
//! - **Fault switches** (`world.rs`): drop Astria's callbacks, make Astria refuse tunes, make
//!   the Graph API rate-limit or fail, make Stripe slow or fail refunds.
//!
//! It talks to the app only through the app's public routes, as the real parties do. The wire
//! formats come from `astria-wire`, the crate the test fakes use.

mod astria;
mod graph;
mod phone;
mod portrait;
mod stripe;
mod world;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

/// The settings the app was started with (`scripts/sandbox.sh` generates the secrets and gives
/// the same values to both).
#[derive(Parser, Debug, Clone)]
#[command(about = "Plays WhatsApp, Stripe and Astria for a local run of the app")]
pub struct Config {
    /// Where the sandbox listens.
    #[arg(long, env = "SANDBOX_LISTEN", default_value = "127.0.0.1:3100")]
    pub listen: SocketAddr,
    /// The app's base URL (its public routes).
    #[arg(long, env = "SANDBOX_APP_URL", default_value = "http://127.0.0.1:3000")]
    pub app_url: String,
    #[arg(long, env = "SPIN_VARIABLE_WHATSAPP_APP_SECRET", hide_env_values = true)]
    pub app_secret: String,
    #[arg(long, env = "SPIN_VARIABLE_WHATSAPP_ACCESS_TOKEN", hide_env_values = true)]
    pub access_token: String,
    #[arg(long, env = "SPIN_VARIABLE_WHATSAPP_PHONE_NUMBER_ID")]
    pub phone_number_id: String,
    #[arg(long, env = "SPIN_VARIABLE_WHATSAPP_API_VERSION", default_value = "v24.0")]
    pub api_version: String,
    #[arg(long, env = "SPIN_VARIABLE_STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: String,
    #[arg(long, env = "SPIN_VARIABLE_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: String,
    #[arg(long, env = "SPIN_VARIABLE_ASTRIA_API_KEY", hide_env_values = true)]
    pub astria_api_key: String,
    /// How long a tune trains before Astria calls back.
    #[arg(long, env = "SANDBOX_TRAINING_SECONDS", default_value_t = 5)]
    pub training_seconds: u64,
    /// How long a slow Stripe takes to answer a session create (the fault switch).
    #[arg(long, env = "SANDBOX_STRIPE_SLOW_SECONDS", default_value_t = 8)]
    pub stripe_slow_seconds: u64,
}

impl Config {
    pub fn training(&self) -> Duration {
        Duration::from_secs(self.training_seconds)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let world = Arc::new(world::World::new(config.clone(), url.clone()));
    let app = axum::Router::new()
        .merge(phone::routes())
        .merge(graph::routes(&config.api_version))
        .merge(stripe::routes())
        .merge(astria::routes())
        .with_state(world);
    eprintln!("[sandbox] listening on {url} (the app at {})", config.app_url);
    axum::serve(listener, app).await?;
    Ok(())
}
