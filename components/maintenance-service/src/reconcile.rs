//! No stranded orders: on every relay call, orders training for longer than
//! `reconcile_after_minutes` are handed to the image-trainer (`tune.reconcile`), which asks
//! Astria for the truth and delivers through the same path as the callbacks. Each order backs
//! off (`reconcile_backoff_minutes`, doubling, at most two hours) and at most `reconcile_batch`
//! orders are asked about per call. Past `reconcile_give_up_minutes` an order is failed,
//! flagged for a refund and the customer told: honestly, rather than waiting forever.
//!
//! Paid orders whose training never started (their `order.paid` died in the dead letters, or
//! Astria, WhatsApp's media or a consumer was down for longer than the event's retries) get a
//! fresh `order.paid` after `reconcile_paid_after_minutes`, with the same backoff, and the same
//! give-up point counted from the payment. So a paid order always ends delivered, or failed
//! with the refund flagged and the customer told.
//!
//! A queued message whose send event died in the dead letters (the sender down, or failing,
//! past the relay's attempts) would wait forever, and its contact's queue behind it: the relay
//! hands the event back while the message is within the sender's horizon, and gives the
//! message up (a portrait's order `delivery_failed`, refund flagged) past it.
//!
//! Portraits kept back because the customer sent STOP wait for START for `held_give_up_days`
//! (keep it below how long Astria keeps the images). Past that the messages are given up, the
//! order fails and the refund is flagged; the customer is not written to: they asked for
//! silence.

use astria_domain::config::Maintenance;
use astria_domain::conversation::Message;
use astria_domain::events::{channels, ORDER_PAID, TUNE_RECONCILE};
use astria_domain::texts::Texts;
use astria_models::{OrderPaid, OrderStatus, TuneReconcile};
use astria_store::outbox::RelayPolicy;
use astria_store::{images, messages, transaction, Db};
use spin_kit::error::ApiError;
use spin_kit::events::{self, now_ms, Pending};

const MINUTE_MS: i64 = 60_000;
const MAX_BACKOFF_MS: i64 = 2 * 60 * MINUTE_MS;

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub reconcile_requested: usize,
    /// Paid orders whose training had not started, handed to the trainer again.
    pub training_requested: usize,
    pub given_up: usize,
    /// Orders whose portraits waited too long for START: failed, refund flagged.
    pub held_given_up: usize,
    /// Queued messages whose send event had died, handed back to the relay.
    pub sends_revived: usize,
    /// Queued messages whose event had died past the sender's horizon: given up.
    pub sends_given_up: usize,
}

pub fn run<D: Db + ?Sized>(db: &D, cfg: &Maintenance, request_id: &str) -> Result<(Report, Vec<Pending>), ApiError> {
    let now = now_ms();
    let r = &cfg.reconcile;
    let after = r.after_minutes * MINUTE_MS;
    let backoff = r.backoff_minutes * MINUTE_MS;
    let give_up = r.give_up_minutes * MINUTE_MS;
    let batch = r.batch;
    let texts = &cfg.texts;
    let mut report = Report::default();
    let mut pending = vec![];

    let (revived, given_up, refunds) = revive_dead_sends(db, cfg, now, request_id)?;
    (report.sends_revived, report.sends_given_up) = (revived, given_up);
    pending.extend(refunds);

    let held_before = now - r.held_give_up_days.saturating_mul(24 * 60 * MINUTE_MS);
    let (held_given_up, refunds) = give_up_held(db, held_before, batch, cfg.auto_refund, now, request_id)?;
    report.held_given_up = held_given_up;
    pending.extend(refunds);

    let stuck = images::past_give_up(db, now - give_up, batch)?.into_iter().map(|s| {
        let detail = format!("Astria did not finish tune {} in time ({} reconciliations)", s.tune_id, s.attempts);
        (s.order_id, s.wa_id, detail)
    });
    let never_trained = images::paid_past_give_up(db, now - give_up, batch)?.into_iter().map(|s| {
        let detail = format!("training never started after payment ({} attempts)", s.attempts);
        (s.order_id, s.wa_id, detail)
    });
    for (order_id, wa_id, detail) in stuck.chain(never_trained) {
        if let Some(p) = fail_and_flag(db, &order_id, &wa_id, &detail, texts, cfg.auto_refund, request_id, now)? {
            spin_kit::log::error_with("reconcile.give_up", request_id, &format!("order {order_id} failed: {detail}"));
            report.given_up += 1;
            pending.extend(p);
        }
    }

    // Per order: the backoff doubles with each request already made, up to two hours.
    let delay_after = |attempts: i64| backoff.saturating_mul(1i64 << attempts.clamp(0, 20)).min(MAX_BACKOFF_MS);
    let paid_after = r.paid_after_minutes * MINUTE_MS;
    for s in images::paid_not_training(db, now, now - paid_after, batch)? {
        let delay = delay_after(s.attempts);
        let p = transaction(db, |db| {
            let paid =
                OrderPaid { order_id: s.order_id.clone(), payment_event_id: format!("reconcile:{}", s.order_id) };
            let event = events::envelope(ORDER_PAID, &paid, request_id);
            images::schedule_reconcile(db, &s.order_id, now + delay)?;
            Ok::<_, ApiError>(events::emit(db, channels::ORDERS, &event, &RelayPolicy::default())?)
        })?;
        spin_kit::log::warn(
            "reconcile",
            &format!("order {} paid but not training: asked the trainer again", s.order_id),
        );
        report.training_requested += 1;
        pending.push(p);
    }

    for s in images::due_for_reconcile(db, now, now - after, batch)? {
        let delay = delay_after(s.attempts);
        let p = transaction(db, |db| {
            let event = events::envelope(
                TUNE_RECONCILE,
                &TuneReconcile { order_id: s.order_id.clone(), tune_id: s.tune_id },
                request_id,
            );
            images::schedule_reconcile(db, &s.order_id, now + delay)?;
            Ok::<_, ApiError>(events::emit(db, channels::ORDERS, &event, &RelayPolicy::default())?)
        })?;
        report.reconcile_requested += 1;
        pending.push(p);
    }
    Ok((report, pending))
}

/// Hands back the dead send events of queued messages within the sender's horizon (counted
/// from when the message was queued), and gives up the others. Answers (revived, given up,
/// refund events to publish).
fn revive_dead_sends<D: Db + ?Sized>(
    db: &D,
    cfg: &Maintenance,
    now: i64,
    request_id: &str,
) -> Result<(usize, usize, Vec<Pending>), ApiError> {
    let horizon = astria_domain::whatsapp::send::horizon_ms(cfg.whatsapp_retry_base_ms);
    let (mut revived, mut given_up, mut refunds) = (0, 0, vec![]);
    for m in messages::queued_with_dead_event(db, cfg.reconcile.batch)? {
        if now - m.queued_at < horizon {
            if astria_store::outbox::replay(db, &m.event_id, now)? {
                revived += 1;
                spin_kit::log::warn("reconcile", &format!("message {}: its dead send event handed back", m.id));
            }
            continue;
        }
        let detail = "its send event died and the sender's horizon has passed";
        let pending =
            transaction(db, |db| spin_kit::messages::give_up(db, &m, None, detail, cfg.auto_refund, request_id, now))?;
        given_up += 1;
        refunds.extend(pending);
    }
    Ok((revived, given_up, refunds))
}

/// Gives up on the messages held since before `before` for a contact who sent STOP, fails the
/// orders whose portraits they carry and flags their refunds, in one transaction (a crash
/// repeats it whole; the flag is recorded once per order). Only messages it gives up name
/// orders, so a message held (or released by START) meanwhile is left for its own turn.
fn give_up_held<D: Db + ?Sized>(
    db: &D,
    before: i64,
    batch: i64,
    auto_refund: bool,
    now: i64,
    request_id: &str,
) -> Result<(usize, Vec<Pending>), ApiError> {
    let held = messages::held_since(db, before, batch.saturating_mul(50))?;
    if held.is_empty() {
        return Ok((0, vec![]));
    }
    transaction(db, |db| {
        let mut orders = std::collections::BTreeSet::new();
        for m in &held {
            if messages::give_up_held(db, &m.id, now)? {
                orders.extend(m.order_id.clone());
            }
        }
        let (mut failed, mut refunds) = (0, vec![]);
        for order_id in &orders {
            let detail = "the customer sent STOP before their portraits arrived and did not send START in time";
            let from = [OrderStatus::Training, OrderStatus::Delivering, OrderStatus::Delivered];
            let issue = format!("held-give-up:{order_id}");
            // The refund is given back in silence too: the customer asked for it (refunds.rs
            // tells no one who opted out).
            if let Some(refund) = spin_kit::refunds::fail_order(
                db,
                order_id,
                &from,
                OrderStatus::Failed,
                &issue,
                detail,
                auto_refund,
                request_id,
                now,
            )? {
                failed += 1;
                refunds.extend(refund);
                spin_kit::log::error_with(
                    "reconcile.held_give_up",
                    request_id,
                    &format!("order {order_id} failed: its portraits were held after STOP for too long"),
                );
            }
        }
        Ok::<_, ApiError>((failed, refunds))
    })
}

/// Fails a paid order that cannot be delivered, flags its refund and queues the apology, in one
/// transaction; `None` if it moved on meanwhile (delivered, or failed already).
#[allow(clippy::too_many_arguments)]
fn fail_and_flag<D: Db + ?Sized>(
    db: &D,
    order_id: &str,
    wa_id: &str,
    detail: &str,
    texts: &Texts,
    auto_refund: bool,
    request_id: &str,
    now: i64,
) -> Result<Option<Vec<Pending>>, ApiError> {
    transaction(db, |db| {
        let from = [OrderStatus::Paid, OrderStatus::Training, OrderStatus::Delivering];
        let issue = format!("reconcile-give-up:{order_id}");
        let Some(mut pending) = spin_kit::refunds::fail_order(
            db,
            order_id,
            &from,
            OrderStatus::Failed,
            &issue,
            detail,
            auto_refund,
            request_id,
            now,
        )?
        else {
            return Ok(None);
        };
        let sorry = Message::text(&texts.failed);
        pending.push(spin_kit::messages::queue(db, wa_id, &sorry, 0, request_id)?);
        Ok::<_, ApiError>(Some(pending))
    })
}
