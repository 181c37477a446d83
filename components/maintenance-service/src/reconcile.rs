//! No stranded orders: on every relay call, orders training for longer than
//! `reconcile_after_minutes` are handed to the image-trainer (`tune.reconcile`), which asks
//! Astria for the truth and delivers through the same path as the callbacks. Each order backs
//! off (`reconcile_backoff_minutes`, doubling, at most two hours) and at most `reconcile_batch`
//! orders are asked about per call. Past `reconcile_give_up_minutes` an order is failed,
//! flagged for a refund and the customer told: honestly, rather than waiting forever.

use astria_domain::conversation::Message;
use astria_domain::events::{channels, TUNE_RECONCILE};
use astria_domain::texts::Texts;
use astria_models::{OrderStatus, TuneReconcile};
use astria_store::outbox::RelayPolicy;
use astria_store::repo::{self, PaymentIssue};
use astria_store::{images, transaction, Db};
use spin_kit::error::ApiError;
use spin_kit::events::{self, now_ms, Pending};
use spin_kit::var;

const MINUTE_MS: i64 = 60_000;
const MAX_BACKOFF_MS: i64 = 2 * 60 * MINUTE_MS;

#[derive(Debug, Default, serde::Serialize)]
pub struct Report {
    pub reconcile_requested: usize,
    pub given_up: usize,
}

fn number(name: &str) -> Result<i64, ApiError> {
    var(name)?.trim().parse().map_err(|_| ApiError::Internal(format!("{name} is not a number")))
}

pub fn run<D: Db + ?Sized>(db: &D, request_id: &str) -> Result<(Report, Vec<Pending>), ApiError> {
    let now = now_ms();
    let after = number("reconcile_after_minutes")? * MINUTE_MS;
    let backoff = number("reconcile_backoff_minutes")? * MINUTE_MS;
    let give_up = number("reconcile_give_up_minutes")? * MINUTE_MS;
    let batch = number("reconcile_batch")?;
    let texts = Texts::from_json_overrides(&var("texts_json")?).map_err(ApiError::Internal)?;
    let mut report = Report::default();
    let mut pending = vec![];

    for s in images::past_give_up(db, now - give_up, batch)? {
        let given_up = transaction(db, |db| {
            repo::lock_order(db, &s.order_id)?;
            let failed = repo::set_order_status(db, &s.order_id, OrderStatus::Training, OrderStatus::Failed, now)?
                || repo::set_order_status(db, &s.order_id, OrderStatus::Delivering, OrderStatus::Failed, now)?;
            if !failed {
                return Ok(None);
            }
            let order = repo::get_order(db, &s.order_id)?;
            repo::record_payment_issue(
                db,
                &PaymentIssue {
                    event_id: format!("reconcile-give-up:{}", s.order_id),
                    kind: "needs_refund".into(),
                    order_id: Some(s.order_id.clone()),
                    session_id: order.as_ref().and_then(|o| o.checkout_session_id.clone()),
                    payment_intent: None,
                    amount: order.and_then(|o| o.paid),
                    detail: format!(
                        "Astria did not finish tune {} in time ({} reconciliations)",
                        s.tune_id, s.attempts
                    ),
                    created_at: now,
                },
            )?;
            let sorry = Message::text(&texts.failed);
            Ok::<_, ApiError>(Some(spin_kit::messages::queue(db, &s.wa_id, &sorry, 0, request_id)?))
        })?;
        if let Some(p) = given_up {
            spin_kit::log::error_with("reconcile.give_up", request_id, &format!("order {} failed", s.order_id));
            report.given_up += 1;
            pending.push(p);
        }
    }

    for s in images::due_for_reconcile(db, now, now - after, batch)? {
        let delay = backoff.saturating_mul(1i64 << s.attempts.clamp(0, 20)).min(MAX_BACKOFF_MS);
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
