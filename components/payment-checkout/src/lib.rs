//! payment-checkout: part of payment-service. A Redis-trigger component on `astria.payments`
//! that turns `order.awaiting_payment` into a Stripe Checkout session and the payment link
//! message, `checkout.expire` (the customer cancelled an order awaiting payment) into an
//! expired session, so that an old link can no longer take money for a cancelled order, and
//! `payment.refund` into money given back (refund.rs).
//!
//! Why a consumer and not the webhook that completes the photos: the Stripe call must not make
//! WhatsApp's webhook wait, and a failed call must be retried; the outbox and relay already do
//! both. The call runs outside any transaction (no lock held while Stripe answers) with an
//! `Idempotency-Key` derived from the order, so running it twice, on two replicas or after a
//! crash, returns the same session. The claim, the session stored on the order and the link
//! queued for the sender are then committed together, once. A failed call leaves the event
//! uncompleted: the relay brings it back with backoff, and dead-letters it for an operator if
//! Stripe keeps refusing (a bad key, say); a replay after the fix creates the session.
//!
//! Stripe answers a key only with the parameters it was first used with, and replays the
//! first answer (a 5xx included) for 24 hours. So every retry of one key sends identical
//! parameters: the session's `expires_at` is fixed on the order at the first request
//! (`repo::checkout_attempt`). The key moves to a new generation only when the old one can no
//! longer succeed: Stripe refused it as reused with other parameters, replayed a stored
//! failure, or its fixed expiry has come too close for Stripe to accept.

use astria_domain::config::{self, ExposeSecret, StripeCheckout};
use astria_domain::conversation::Message;
use astria_domain::events::{channels, CHECKOUT_EXPIRE, ORDER_AWAITING_PAYMENT, PAYMENT_REFUND};
use astria_domain::stripe::{self, CheckoutRequest, CreateFailure};
use astria_domain::texts::fill;
use astria_domain::Money;
use astria_models::{CheckoutExpire, EventEnvelope, Order, OrderAwaitingPayment, OrderStatus};
use astria_store::{outbox, repo, transaction};
use spin_kit::db::SpinDb;
use spin_kit::events::{self, now_ms};
use spin_kit::{log, SpinVars};
use spin_sdk::redis_component;

mod refund;
mod stripe_api;

use stripe_api::{replayed, StripeClient};

pub(crate) const CONSUMER: &str = "payment-checkout";
/// How long WhatsApp keeps a media id after the message arrived.
const MEDIA_LIFETIME_MS: i64 = 7 * 24 * 60 * 60_000;
/// Time to fetch the photos after payment (and clock skew).
const SAFETY_MS: i64 = 60 * 60_000;

#[redis_component]
fn on_message(payload: bytes::Bytes) -> anyhow::Result<()> {
    spin_kit::trace::Invocation::message(CONSUMER, channels::PAYMENTS, &payload).run(|| consume(&payload))
}

/// One message of the channel, inside its trace.
fn consume(payload: &[u8]) -> anyhow::Result<()> {
    let Some(event) = spin_kit::events::parse_or_drop(&payload, CONSUMER) else { return Ok(()) };
    if spin_kit::heartbeat::is_heartbeat(&event) {
        let db = spin_kit::open_db().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        return Ok(spin_kit::heartbeat::book(&db, &event, channels::PAYMENTS)?);
    }
    match event.event_type.as_str() {
        ORDER_AWAITING_PAYMENT => {}
        CHECKOUT_EXPIRE => return expire(&event),
        PAYMENT_REFUND => return refund::refund(&event),
        other => {
            log::warn(CONSUMER, &format!("ignoring event type {other} on the payments channel"));
            return Ok(());
        }
    }
    let Ok(request) = serde_json::from_str::<OrderAwaitingPayment>(&event.payload) else {
        log::warn(CONSUMER, &format!("dropping {} with an unreadable payload", event.id));
        return Ok(());
    };
    spin_kit::trace::set_order(&request.order_id);
    let fail = |e: String| anyhow::anyhow!(e);
    let db = spin_kit::open_db().map_err(|e| fail(format!("{e:?}")))?;
    let now = now_ms();

    let order = repo::get_order(&db, &request.order_id)?;
    let order = match order {
        Some(o) if o.status == OrderStatus::AwaitingPayment && o.checkout_session_id.is_none() => o,
        // Gone, cancelled meanwhile, or its link already made: nothing to create.
        _ => {
            transaction(&db, |db| {
                outbox::claim(db, &event.id, CONSUMER, now)?;
                outbox::complete(db, &event.id, now)
            })?;
            return Ok(());
        }
    };

    let config::Checkout { stripe: cfg, packs, texts } = config::checkout(&SpinVars)?;

    // WhatsApp deletes media 7 days after it arrived; training starts right after payment,
    // which can come as late as the link's expiry. Photos that would be gone by then are
    // refused now, before any money is taken.
    let oldest = repo::oldest_photo_at(&db, &order.id)?.unwrap_or(now);
    if oldest + MEDIA_LIFETIME_MS - SAFETY_MS < now + cfg.expiry_minutes * 60_000 {
        let pending = transaction(&db, |db| {
            if !outbox::claim(db, &event.id, CONSUMER, now_ms())? {
                return Ok(vec![]);
            }
            let mut pending = vec![];
            if repo::set_order_status(db, &order.id, OrderStatus::AwaitingPayment, OrderStatus::Expired, now_ms())? {
                let sorry = Message::text(&texts.photos_too_old);
                pending.push(spin_kit::messages::queue(db, &order.wa_id, &sorry, 0, &event.correlation_id)?);
            }
            outbox::complete(db, &event.id, now_ms())?;
            Ok::<_, astria_store::DbError>(pending)
        })?;
        log::warn(CONSUMER, &format!("order {}: photos too old for a payment link", order.id));
        publish(&db, &pending);
        return Ok(());
    }
    let product =
        packs.iter().find(|p| p.id == order.pack_id).map(|p| p.title.clone()).unwrap_or(order.pack_id.clone());
    let (generation, expires_at) = checkout_attempt(&db, &order.id, cfg.expiry_minutes)?;
    let session = match create_session(&cfg, &order, &product, generation, expires_at) {
        Ok(session) => session,
        Err(failure) => {
            let detail = match &failure {
                CreateFailure::NewKey(e) => {
                    // This key can never succeed: the next try (the relay's) uses a new one.
                    repo::set_checkout_attempt(
                        &db,
                        &order.id,
                        (generation, Some(expires_at)),
                        generation + 1,
                        now_ms() / 1000 + cfg.expiry_minutes * 60,
                        now_ms(),
                    )?;
                    format!("{e}; the next attempt uses key generation {}", generation + 1)
                }
                CreateFailure::Retry(e) | CreateFailure::Permanent(e) => e.clone(),
            };
            log::error_with("stripe.checkout", &event.correlation_id, &format!("order {}: {detail}", order.id));
            return Err(fail(detail));
        }
    };
    let url = session.url.clone().unwrap_or_default();

    let pending = transaction(&db, |db| {
        if !outbox::claim(db, &event.id, CONSUMER, now_ms())? {
            return Ok(vec![]); // Another replica stored the same session and sent the link.
        }
        let mut pending = vec![];
        if repo::set_checkout(db, &order.id, &session.id, &url, now_ms())? {
            let link = Message::text(fill(&texts.payment_link, &[("url", &url)]));
            pending.push(spin_kit::messages::queue(db, &order.wa_id, &link, 0, &event.correlation_id)?);
        }
        outbox::complete(db, &event.id, now_ms())?;
        Ok::<_, astria_store::DbError>(pending)
    })?;
    publish(&db, &pending);
    // Cancelled while Stripe was making the session: nobody got its link, but it must not stay
    // open (the cancellation's own checkout.expire found no session to expire).
    if repo::get_order(&db, &order.id)?
        .is_some_and(|o| o.status == OrderStatus::Cancelled && o.checkout_session_id.is_none())
    {
        if let Err(e) = expire_session(&cfg, &session.id) {
            log::warn(CONSUMER, &format!("order {}: session made while it was cancelled not expired: {e}", order.id));
        }
    }
    Ok(())
}

/// `checkout.expire`: the order was cancelled while it awaited payment. Its session, if one was
/// made, is expired at Stripe (safe to repeat); then the event is completed. A failure leaves
/// it for the relay.
fn expire(event: &EventEnvelope) -> anyhow::Result<()> {
    let Ok(request) = serde_json::from_str::<CheckoutExpire>(&event.payload) else {
        log::warn(CONSUMER, &format!("dropping {} with an unreadable payload", event.id));
        return Ok(());
    };
    spin_kit::trace::set_order(&request.order_id);
    let db = spin_kit::open_db().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let order = repo::get_order(&db, &request.order_id)?;
    // Only a cancelled order's session: a paid one completed it, and anything else keeps it.
    if let Some(session_id) = order.filter(|o| o.status == OrderStatus::Cancelled).and_then(|o| o.checkout_session_id) {
        let cfg = config::stripe_checkout(&SpinVars)?;
        expire_session(&cfg, &session_id).map_err(|e| {
            log::error_with("stripe.expire", &event.correlation_id, &format!("order {}: {e}", request.order_id));
            anyhow::anyhow!(e)
        })?;
        log::info_with(
            CONSUMER,
            &event.correlation_id,
            &format!("order {} cancelled: Checkout session expired", request.order_id),
        );
    }
    transaction(&db, |db| {
        outbox::claim(db, &event.id, CONSUMER, now_ms())?;
        outbox::complete(db, &event.id, now_ms())
    })?;
    Ok(())
}

/// `POST /v1/checkout/sessions/{id}/expire`. A session that is no longer open (expired
/// already, or completed: then the payment webhook flags the refund) counts as done.
fn expire_session(cfg: &StripeCheckout, session_id: &str) -> Result<(), String> {
    let response = StripeClient::new(cfg)
        .post(&format!("/v1/checkout/sessions/{session_id}/expire"), "", None)
        .map_err(|e| format!("Stripe unreachable: {e}"))?;
    match stripe::classify_expire(response.status, &response.body) {
        stripe::ExpireOutcome::Expired | stripe::ExpireOutcome::NotOpen => Ok(()),
        stripe::ExpireOutcome::Failed(e) => Err(e),
    }
}

pub(crate) fn publish(db: &SpinDb, pending: &[events::Pending]) {
    match config::redis_url(&SpinVars) {
        Ok(url) => {
            events::publish(db, url.expose_secret(), pending);
        }
        Err(e) => log::warn(CONSUMER, &format!("{e}: the link waits for the relay")),
    }
}

/// The key generation and `expires_at` of the order's session request: as fixed by an earlier
/// attempt, or fixed now (a first attempt, or an expiry too close for Stripe to accept, which
/// then needs a new key). Replicas racing here agree on whichever was stored first.
fn checkout_attempt(db: &SpinDb, order_id: &str, expiry_minutes: i64) -> Result<(i64, i64), anyhow::Error> {
    for _ in 0..3 {
        let now = now_ms();
        let current = repo::checkout_attempt(db, order_id)?.unwrap_or((0, None));
        match current {
            (generation, Some(expires_at)) if stripe::expiry_still_usable(expires_at, now) => {
                return Ok((generation, expires_at))
            }
            (generation, fixed) => {
                let next = if fixed.is_some() { generation + 1 } else { generation };
                let expires_at = now / 1000 + expiry_minutes * 60;
                if repo::set_checkout_attempt(db, order_id, current, next, expires_at, now)? {
                    return Ok((next, expires_at));
                }
            }
        }
    }
    anyhow::bail!("order {order_id}: its checkout attempt keeps changing under us")
}

/// `POST /v1/checkout/sessions` with the given key generation and fixed expiry. Errors carry
/// Stripe's message, never the key.
fn create_session(
    cfg: &StripeCheckout,
    order: &Order,
    product: &str,
    generation: i64,
    expires_at: i64,
) -> Result<stripe::Session, CreateFailure> {
    let price = Money::try_from(&order.price).map_err(|e| CreateFailure::Permanent(e.to_string()))?;
    let back = |text: &str| format!("{}?text={text}", cfg.chat_link);
    let form = stripe::checkout_form(&CheckoutRequest {
        order_id: &order.id,
        product_name: product,
        price: &price,
        expires_at,
        success_url: &back("STATUS"),
        cancel_url: &back("PAY"),
    });
    let key = stripe::idempotency_key(&order.id, generation);
    let response = StripeClient::new(cfg)
        .post("/v1/checkout/sessions", &form, Some(&key))
        .map_err(|e| CreateFailure::Retry(format!("Stripe unreachable: {e}")))?;
    if !(200..300).contains(&response.status) {
        return Err(stripe::classify_create_failure(response.status, replayed(&response), &response.body));
    }
    stripe::parse_created_session(&response.body).map_err(|e| CreateFailure::Permanent(e.to_string()))
}
