//! image-trainer: part of image-service. A Redis-trigger component on `astria.orders`:
//! - `order.paid`: fetches the order's photos from WhatsApp (checked against their sha256,
//!   held in memory for the one request, never stored), creates the Astria pack tune
//!   (`tune[title]` = order id, Astria's idempotency key; callback URLs with the order's
//!   token), stores the tune, moves the order to training and tells the customer;
//! - `tune.trained`: fetches the tune's prompt list, so the order knows how many prompts to
//!   wait for, and delivers what is already there through the same path as the callbacks;
//! - `tune.reconcile` (from the maintenance relay, for orders training for long): asks Astria
//!   whether the tune is trained, then does the same; a missed callback strands nothing.
//!
//! One replica works on an order at a time (a job lease per order); the others leave the
//! event to it. Astria 5xx/504/429, timeouts and WhatsApp download failures leave the event
//! uncompleted and due again after a backoff (the relay brings it back; the same title keeps
//! Astria from training twice). Astria 401/402/422 or a missing photo are final: the order
//! fails, the customer is told, and the payment is flagged for a refund.

use astria_domain::astria::{self, Answer, CallbackEndpoint, TuneRequest};
use astria_domain::config::{self, ExposeSecret, Trainer};
use astria_domain::conversation::Message;
use astria_domain::events::{channels, ORDER_PAID, TUNE_RECONCILE, TUNE_TRAINED};
use astria_domain::texts::Texts;
use astria_models::{EventEnvelope, Order, OrderPaid, OrderStatus, TuneReconcile, TuneTrained};
use astria_store::outbox::{self, RelayPolicy};
use astria_store::repo::{self, IssueKind, PaymentIssue};
use astria_store::{images, lease, transaction, DbError};
use spin_kit::astria::AstriaClient;
use spin_kit::db::SpinDb;
use spin_kit::events::{self, now_ms, Pending};
use spin_kit::whatsapp_media::{MediaClient, PhotoError};
use spin_kit::{log, SpinVars};
use spin_sdk::redis_component;

const CONSUMER: &str = "image-trainer";
/// How long one replica may work on an order before another may take over.
const LEASE_MS: i64 = 10 * 60_000;
/// How long one replica may ask Astria about an order (a tune and a prompt list: two reads of
/// at most 20 s each, see `spin_kit::astria`) before another may.
const SYNC_LEASE_MS: i64 = 2 * 60_000;

#[redis_component]
fn on_message(payload: bytes::Bytes) -> anyhow::Result<()> {
    spin_kit::trace::Invocation::message(CONSUMER, channels::ORDERS, &payload).run(|| consume(&payload))
}

/// One message of the channel, inside its trace.
fn consume(payload: &[u8]) -> anyhow::Result<()> {
    let Some(event) = spin_kit::events::parse_or_drop(&payload, CONSUMER) else { return Ok(()) };
    let db = spin_kit::open_db().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    if spin_kit::heartbeat::is_heartbeat(&event) {
        return Ok(spin_kit::heartbeat::book(&db, &event, channels::ORDERS)?);
    }
    match event.event_type.as_str() {
        ORDER_PAID => match serde_json::from_str::<OrderPaid>(&event.payload) {
            Ok(p) => {
                spin_kit::trace::set_order(&p.order_id);
                train(&db, &event, &p.order_id)?
            }
            Err(e) => log::warn(CONSUMER, &format!("dropping {} with an unreadable payload: {e}", event.id)),
        },
        TUNE_TRAINED => match serde_json::from_str::<TuneTrained>(&event.payload) {
            Ok(t) => {
                spin_kit::trace::set_order(&t.order_id);
                sync_with_astria(&db, &event, &t.order_id, t.tune_id, false)?
            }
            Err(e) => log::warn(CONSUMER, &format!("dropping {} with an unreadable payload: {e}", event.id)),
        },
        TUNE_RECONCILE => match serde_json::from_str::<TuneReconcile>(&event.payload) {
            Ok(t) => {
                spin_kit::trace::set_order(&t.order_id);
                sync_with_astria(&db, &event, &t.order_id, t.tune_id, true)?
            }
            Err(e) => log::warn(CONSUMER, &format!("dropping {} with an unreadable payload: {e}", event.id)),
        },
        other => log::warn(CONSUMER, &format!("ignoring event type {other} on the orders channel")),
    }
    Ok(())
}

/// Why a step did not succeed.
enum Failure {
    /// Another replica holds the order's lease now (ours lapsed during a slow download): it
    /// acts; this one leaves without a word.
    LeaseLost,
    /// Try again later.
    Retry(String),
    /// Retrying cannot help.
    Final(String),
}

/// Completes an event that needs no work (the order moved on, or is gone).
fn skip(db: &SpinDb, event: &EventEnvelope) -> Result<(), DbError> {
    transaction(db, |db| {
        outbox::claim(db, &event.id, CONSUMER, now_ms())?;
        outbox::complete(db, &event.id, now_ms())
    })
}

/// Leaves the event for the relay to bring back after a backoff.
fn retry_later(db: &SpinDb, event: &EventEnvelope, what: &str, detail: &str) -> Result<(), DbError> {
    let attempts = outbox::get(db, &event.id)?.map(|e| e.attempts).unwrap_or(1);
    let delay = RelayPolicy::default().backoff_ms(attempts);
    outbox::due_at(db, &event.id, now_ms() + delay)?;
    log::warn(CONSUMER, &format!("{what} will be retried in {delay} ms: {detail}"));
    Ok(())
}

fn publish(db: &SpinDb, pending: &[Pending]) {
    // Unset or unreadable, the events wait in the outbox for the relay.
    if let Ok(url) = config::redis_url(&SpinVars) {
        events::publish(db, url.expose_secret(), pending);
    }
}

/// The texts for telling a customer their order failed, even when the configuration is what
/// failed: then the defaults, said in the log.
fn texts_for_failure() -> Texts {
    config::texts(&SpinVars).unwrap_or_else(|e| {
        log::warn(CONSUMER, &format!("{e}; the customer is told with the default text"));
        Texts::default()
    })
}

fn train(db: &SpinDb, event: &EventEnvelope, order_id: &str) -> Result<(), DbError> {
    // A cheap first look spares the lease when the order has moved on.
    if !repo::get_order(db, order_id)?.is_some_and(|o| o.status == OrderStatus::Paid) {
        return skip(db, event);
    }
    let holder = uuid::Uuid::new_v4().to_string();
    let key = format!("train:{order_id}");
    if !lease::acquire(db, lease::Kind::Job, &key, &holder, now_ms(), LEASE_MS)? {
        return Ok(()); // Another replica is on it; the relay covers a crash.
    }
    // Read again under the lease: every replica gets every message (pub/sub), and one that
    // held the lease just before us may have made the tune and committed since our first read.
    let booked = match repo::get_order(db, order_id) {
        Ok(Some(order)) if order.status == OrderStatus::Paid => match config::trainer(&SpinVars) {
            // No retry makes a missing or invalid setting appear: the order fails now, its
            // refund is flagged and the customer told, rather than the payment waiting silently.
            Err(e) => fail_order(db, event, &order, &format!("configuration: {e}")),
            Ok(cfg) => match create_tune(&cfg, &order, &|| {
                lease::renew(db, lease::Kind::Job, &key, &holder, now_ms(), LEASE_MS).unwrap_or(false)
            }) {
                Ok(tune_id) => start_training(db, event, &order, tune_id, &cfg.texts),
                Err(Failure::LeaseLost) => {
                    log::warn(CONSUMER, &format!("order {order_id}: lease taken over meanwhile, leaving it"));
                    Ok(())
                }
                Err(Failure::Retry(detail)) => retry_later(db, event, &format!("training order {order_id}"), &detail),
                Err(Failure::Final(detail)) => fail_order(db, event, &order, &detail),
            },
        },
        Ok(_) => skip(db, event),
        Err(e) => Err(e),
    };
    if let Err(e) = lease::release(db, lease::Kind::Job, &key, &holder) {
        log::warn(CONSUMER, &format!("lease left to expire: {e}"));
    }
    booked
}

fn start_training(
    db: &SpinDb,
    event: &EventEnvelope,
    order: &Order,
    tune_id: u64,
    texts: &Texts,
) -> Result<(), DbError> {
    let pending = transaction(db, |db| {
        if !outbox::claim(db, &event.id, CONSUMER, now_ms())? {
            return Ok(vec![]);
        }
        let mut pending = vec![];
        if images::start_training(db, &order.id, tune_id, now_ms())? {
            let news = Message::text(&texts.training);
            pending.push(spin_kit::messages::queue(db, &order.wa_id, &news, 0, &event.correlation_id)?);
        }
        outbox::complete(db, &event.id, now_ms())?;
        Ok::<_, DbError>(pending)
    })?;
    log::info_with("astria.tune", &event.correlation_id, &format!("order {} training as tune {tune_id}", order.id));
    publish(db, &pending);
    Ok(())
}

/// A final failure after payment: the order fails, the customer is told, the money is flagged.
fn fail_order(db: &SpinDb, event: &EventEnvelope, order: &Order, detail: &str) -> Result<(), DbError> {
    log::error_with("astria.failed", &event.correlation_id, &format!("order {}: {detail}", order.id));
    let pending = transaction(db, |db| {
        if !outbox::claim(db, &event.id, CONSUMER, now_ms())? {
            return Ok(vec![]);
        }
        let mut pending = vec![];
        if repo::set_order_status(db, &order.id, OrderStatus::Paid, OrderStatus::Failed, now_ms())? {
            let issue = PaymentIssue {
                event_id: event.id.clone(),
                kind: IssueKind::NeedsRefund,
                order_id: Some(order.id.clone()),
                session_id: order.checkout_session_id.clone(),
                payment_intent: None,
                amount: order.paid.clone(),
                detail: format!("training failed: {detail}"),
                created_at: now_ms(),
            };
            // auto_refund is read on its own: the trainer's configuration may be what failed.
            let auto = config::auto_refund(&SpinVars).unwrap_or_else(|e| {
                log::warn(CONSUMER, &format!("{e}: the refund is flagged for an operator only"));
                false
            });
            if repo::record_payment_issue(db, &issue)? && auto {
                pending.extend(spin_kit::refunds::request(db, &issue, &event.correlation_id)?);
            }
            let sorry = Message::text(texts_for_failure().failed);
            pending.push(spin_kit::messages::queue(db, &order.wa_id, &sorry, 0, &event.correlation_id)?);
        }
        outbox::complete(db, &event.id, now_ms())?;
        Ok::<_, DbError>(pending)
    })?;
    publish(db, &pending);
    Ok(())
}

impl From<PhotoError> for Failure {
    fn from(e: PhotoError) -> Failure {
        match e {
            PhotoError::Transient(detail) => Failure::Retry(detail),
            gone_or_wrong => Failure::Final(gone_or_wrong.to_string()),
        }
    }
}

/// Downloads the photos and creates the tune; answers its id. `renew` renews the order's lease
/// before each call (each ends within its own deadline, see `http_client`), answering `false`
/// if another replica holds it: however many photos and however slow the hosts, no second
/// replica can take the order while this one works, and none calls Astria after losing it.
fn create_tune(cfg: &Trainer, order: &Order, renew: &dyn Fn() -> bool) -> Result<u64, Failure> {
    let Some(pack) = cfg.packs.iter().find(|p| p.id == order.pack_id) else {
        return Err(Failure::Final(format!("pack {} is no longer in the catalogue", order.pack_id)));
    };
    let subject = order.subject_class.clone().unwrap_or_else(|| pack.subject_classes[0].clone());
    let a = &cfg.astria;
    let expires_at = now_ms() / 1000 + astria::CALLBACK_LIFETIME_S;
    let url = |endpoint| {
        astria::callback_url(&a.public_base_url, endpoint, a.callback_secret.expose_secret(), &order.id, expires_at)
    };
    let (tune_callback, prompt_callback) = (url(CallbackEndpoint::Tune), url(CallbackEndpoint::Prompt));
    let request = TuneRequest {
        order_id: &order.id,
        subject_class: &subject,
        tune_callback: &tune_callback,
        prompt_callback: &prompt_callback,
        fast: a.test_mode,
    };
    let astria = AstriaClient::new(a);
    let media = MediaClient::new(&cfg.media);
    // Each photo is downloaded, copied into the body and dropped before the next: the photos
    // are held once (up to max_photos of them, each at most whatsapp_media::MAX_PHOTO).
    let mut upload = astria.tune_upload(&request);
    for (i, photo) in order.photos.iter().enumerate() {
        if !renew() {
            return Err(Failure::LeaseLost);
        }
        let bytes = media.download(photo)?;
        upload.photo(&format!("{i}.{}", extension(&photo.mime_type)), &photo.mime_type, &bytes);
    }
    if !renew() {
        return Err(Failure::LeaseLost);
    }
    match astria.create_tune(pack.astria_pack_id, upload).map_err(|e| Failure::Retry(e.to_string()))? {
        Answer::Ok(tune) => Ok(tune.id),
        Answer::Retry(d) => Err(Failure::Retry(format!("Astria: {d}"))),
        Answer::Rejected(d) => Err(Failure::Final(format!("Astria refused the tune: {d}"))),
    }
}

fn extension(mime: &str) -> &'static str {
    if mime == "image/png" {
        "png"
    } else {
        "jpg"
    }
}

/// Learns from Astria what the callbacks said (or would have said): after the tune callback,
/// the prompt list; for a reconciliation (`check_tune`), first whether the tune is trained at
/// all. Everything found goes through the same delivery path as the callbacks, so whichever
/// way news arrives, each image is delivered once.
fn sync_with_astria(
    db: &SpinDb,
    event: &EventEnvelope,
    order_id: &str,
    event_tune_id: u64,
    check_tune: bool,
) -> Result<(), DbError> {
    let Some(order) = repo::get_order(db, order_id)? else { return skip(db, event) };
    match order.status {
        OrderStatus::Training | OrderStatus::Delivering => {}
        // A callback that came before our own training transaction committed: ask again once
        // the tune is recorded (Astria does not call back twice).
        OrderStatus::Paid => {
            return retry_later(
                db,
                event,
                &format!("asking Astria about order {order_id}"),
                "training not recorded yet",
            )
        }
        _ => return skip(db, event),
    }
    // One replica asks Astria per order at a time: the others leave the event to it (the relay
    // brings it back if the holder dies). Every replica gets every message (pub/sub), and a
    // replayed callback must not cost an Astria call per replica.
    let holder = uuid::Uuid::new_v4().to_string();
    let key = format!("sync:{order_id}");
    if !lease::acquire(db, lease::Kind::Job, &key, &holder, now_ms(), SYNC_LEASE_MS)? {
        return Ok(());
    }
    let result = sync_leased(db, event, &order, event_tune_id, check_tune);
    if let Err(e) = lease::release(db, lease::Kind::Job, &key, &holder) {
        log::warn(CONSUMER, &format!("lease left to expire: {e}"));
    }
    // Callbacks that came during our pass raised a new signal, and every replica that got it
    // left it to us (the lease was ours): hand it out again now, not after the relay's grace,
    // or a prompt's portraits would wait a minute.
    let waiting: Vec<Pending> = outbox::undone_with_prefix(db, &astria::callback_signal_prefix(order_id), 10)?
        .into_iter()
        .filter(|e| e.id != event.id)
        .map(|e| Pending { id: e.id, channel: e.channel, json: e.envelope })
        .collect();
    publish(db, &waiting);
    result
}

/// [`sync_with_astria`] under the order's sync lease.
fn sync_leased(
    db: &SpinDb,
    event: &EventEnvelope,
    order: &Order,
    event_tune_id: u64,
    check_tune: bool,
) -> Result<(), DbError> {
    let order_id = order.id.as_str();
    // Callbacks from now on raise a new signal: what they report may come after our reads.
    images::begin_sync(db, order_id)?;
    // The holder before us may have finished this very event.
    if outbox::get(db, &event.id)?.is_some_and(|e| e.status == outbox::status::DONE) {
        return Ok(());
    }
    // The tune id we stored when training started, never one from a callback.
    let Some(tune_id) = order.astria_tune_id else { return skip(db, event) };
    if event_tune_id != 0 && event_tune_id != tune_id {
        log::warn(CONSUMER, &format!("order {order_id}: event names tune {event_tune_id}, the order has {tune_id}"));
    }
    let cfg = match config::trainer(&SpinVars) {
        Ok(c) => c,
        Err(e) => return retry_later(db, event, "asking Astria", &e.to_string()),
    };
    let client = AstriaClient::new(&cfg.astria);
    let what = format!("asking Astria about order {order_id}");
    if check_tune {
        match client.tune(tune_id) {
            Ok(Answer::Ok(tune)) if tune.trained_at.is_some() => {}
            // Still training: the next reconciliation asks again.
            Ok(Answer::Ok(_)) => return skip(db, event),
            Ok(Answer::Retry(d)) => return retry_later(db, event, &what, &d),
            Err(e) => return retry_later(db, event, &what, &e.to_string()),
            Ok(Answer::Rejected(d)) => {
                log::error_with("astria.tune", &event.correlation_id, &format!("order {order_id}: {d}"));
                return skip(db, event);
            }
        }
    }
    let mut prompts = match client.prompts(tune_id) {
        Ok(Answer::Ok(p)) => p,
        Ok(Answer::Retry(d)) => return retry_later(db, event, &what, &d),
        Err(e) => return retry_later(db, event, &what, &e.to_string()),
        Ok(Answer::Rejected(d)) => {
            log::error_with("astria.prompts", &event.correlation_id, &format!("order {order_id}: {d}"));
            return skip(db, event);
        }
    };
    // Only https links on Astria's own hosts are ever sent to a customer.
    for p in &mut prompts {
        let (trusted, untrusted): (Vec<String>, Vec<String>) =
            p.images.drain(..).partition(|url| astria::trusted_image_url(url, &cfg.astria.image_hosts));
        if !untrusted.is_empty() {
            log::error_with(
                "astria.untrusted_image",
                &event.correlation_id,
                &format!(
                    "order {order_id}: prompt {} has {} image(s) off astria_image_hosts; not sent",
                    p.id,
                    untrusted.len()
                ),
            );
        }
        p.images = trusted;
    }
    let done_text = cfg.texts.delivered_offer_more.clone();
    let pending = transaction(db, |db| {
        if !outbox::claim(db, &event.id, CONSUMER, now_ms())? {
            return Ok(vec![]);
        }
        repo::lock_order(db, &order.id)?;
        // Read again under the lock: another replica may have moved the order since.
        let Some(mut current) = repo::get_order(db, &order.id)?
            .filter(|o| matches!(o.status, OrderStatus::Training | OrderStatus::Delivering))
        else {
            outbox::complete(db, &event.id, now_ms())?;
            return Ok(vec![]);
        };
        if check_tune {
            images::mark_trained(db, &order.id, now_ms())?;
        }
        images::set_prompts_expected(db, &order.id, prompts.len() as i64)?;
        let mut pending = vec![];
        for p in &prompts {
            let d = spin_kit::images::record_prompt(db, &current, p, &done_text, &event.correlation_id)?;
            if d.new_images > 0 && current.status == OrderStatus::Training {
                current.status = OrderStatus::Delivering;
            }
            pending.extend(d.pending);
        }
        spin_kit::images::finish_if_complete(
            db,
            &order.id,
            &order.wa_id,
            &done_text,
            &event.correlation_id,
            &mut pending,
        )?;
        outbox::complete(db, &event.id, now_ms())?;
        Ok::<_, DbError>(pending)
    })?;
    publish(db, &pending);
    Ok(())
}
