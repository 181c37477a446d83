//! `payment.refund`: gives a payment back at Stripe, without a human.
//!
//! The refund row (`astria_store::refunds`) was written with its payment issue; this worker asks
//! Stripe (`POST /v1/refunds`, outside any transaction) with an `Idempotency-Key` derived from
//! the order and the payment and identical parameters on every try, so retries, replicas and
//! redelivered events get the one refund Stripe made. Then, once (the outbox claim): the
//! answer is booked, the issue resolved, the customer told (not after STOP).
//!
//! Stripe busy or down (429, 5xx, a timeout): the event is left for the relay with backoff,
//! the attempt and its error recorded; the relay dead-letters it after its retry budget and the
//! issue stays open, with Stripe's error, for a human. Stripe refusing (the amount exceeds
//! what is left, a disputed charge, a bad key): booked `refused`, the issue stays open. The
//! payment refunded already (in the dashboard): booked, the issue resolved.

use astria_domain::config::{self, StripeCheckout};
use astria_domain::conversation::Message;
use astria_domain::stripe::{self, RefundOutcome, RefundRequest};
use astria_domain::texts::{fill, Texts};
use astria_domain::Money;
use astria_models::{EventEnvelope, PaymentRefund};
use astria_store::refunds::{self, status, Refund};
use astria_store::{console, outbox, repo, transaction, DbError};
use spin_kit::db::SpinDb;
use spin_kit::events::{now_ms, Pending};
use spin_kit::{log, SpinVars};

use crate::stripe_api::{replayed, StripeClient};
use crate::{publish, CONSUMER};

pub fn refund(event: &EventEnvelope) -> anyhow::Result<()> {
    let Ok(request) = serde_json::from_str::<PaymentRefund>(&event.payload) else {
        log::warn(CONSUMER, &format!("dropping {} with an unreadable payload", event.id));
        return Ok(());
    };
    let db = spin_kit::open_db().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let Some(r) = refunds::get(&db, &request.refund_id)?.filter(|r| r.status == status::REQUESTED) else {
        // Given back already (or recorded from Stripe), or left to an operator: nothing to ask.
        return done(&db, event);
    };
    let cfg = config::checkout(&SpinVars)?;
    let payment_intent = match r.payment_intent.clone() {
        Some(pi) => pi,
        None => match find_payment(&cfg.stripe, r.session_id.as_deref()) {
            Ok(pi) => {
                refunds::set_payment_intent(&db, &r.id, &pi, now_ms())?;
                pi
            }
            Err(e) => return retry_later(&db, event, &r, &e),
        },
    };
    match ask_stripe(&cfg.stripe, &r, &payment_intent) {
        RefundOutcome::Retry(e) => retry_later(&db, event, &r, &e),
        RefundOutcome::NewKey(e) => {
            refunds::next_key(&db, &r.id, r.key_generation, now_ms())?;
            retry_later(&db, event, &r, &format!("{e}; the next try uses a new key"))
        }
        outcome => book(&db, event, &r, outcome, &cfg.texts),
    }
}

/// `POST /v1/refunds`: the whole payment back, with the key of the order and the payment.
fn ask_stripe(cfg: &StripeCheckout, r: &Refund, payment_intent: &str) -> RefundOutcome {
    let amount = r.amount.as_ref().and_then(|m| Money::try_from(m).ok());
    let form = stripe::refund_form(&RefundRequest {
        payment_intent,
        amount: amount.as_ref(),
        order_id: r.order_id.as_deref(),
        refund_id: &r.id,
    });
    let key = stripe::refund_idempotency_key(r.order_id.as_deref(), payment_intent, r.key_generation);
    match StripeClient::new(cfg).post("/v1/refunds", &form, Some(&key)) {
        Ok(a) => stripe::classify_refund(a.status, replayed(&a), &a.body),
        // The request may have reached Stripe: the retry's key makes it the same refund.
        Err(e) => RefundOutcome::Retry(format!("Stripe unreachable: {e}")),
    }
}

/// The payment of an order paid before payments were recorded, from its Checkout session.
fn find_payment(cfg: &StripeCheckout, session_id: Option<&str>) -> Result<String, String> {
    let Some(session_id) = session_id else { return Err("no payment and no Checkout session to find it".into()) };
    let a = StripeClient::new(cfg)
        .get(&format!("/v1/checkout/sessions/{session_id}"))
        .map_err(|e| format!("Stripe unreachable: {e}"))?;
    if !(200..300).contains(&a.status) {
        return Err(format!("looking up session {session_id}: Stripe answered {}", a.status));
    }
    let session = stripe::parse_session(&a.body).map_err(|e| e.to_string())?;
    session.payment_intent.ok_or_else(|| format!("session {session_id} names no payment"))
}

/// Books Stripe's answer, once, with what follows from it.
fn book(db: &SpinDb, event: &EventEnvelope, r: &Refund, outcome: RefundOutcome, texts: &Texts) -> anyhow::Result<()> {
    let now = now_ms();
    let pending = transaction(db, |db| {
        if !outbox::claim(db, &event.id, CONSUMER, now)? {
            return Ok(vec![]);
        }
        let mut pending = vec![];
        match &outcome {
            RefundOutcome::Made(made) => {
                refunds::settle(db, &r.id, made.status.as_str(), Some(&made.id), None, now)?;
                if made.status.gives_money_back() {
                    resolve(db, r, &format!("refunded by the app ({})", made.id), now)?;
                    pending.extend(tell_customer(db, r, texts, &event.correlation_id)?);
                }
                log::info_with(
                    "payment.refund",
                    &event.correlation_id,
                    &format!("refund {}: {} at Stripe", r.id, made.status.as_str()),
                );
            }
            RefundOutcome::AlreadyRefunded(text) => {
                refunds::settle(db, &r.id, status::SUCCEEDED, None, Some(text), now)?;
                resolve(db, r, "refunded at Stripe already", now)?;
            }
            RefundOutcome::Refused(text) => {
                refunds::settle(db, &r.id, status::REFUSED, None, Some(text), now)?;
                log::error_with("payment.refund_refused", &event.correlation_id, &format!("refund {}: {text}", r.id));
            }
            RefundOutcome::Retry(_) | RefundOutcome::NewKey(_) => {}
        }
        outbox::complete(db, &event.id, now)?;
        Ok::<_, DbError>(pending)
    })?;
    publish(db, &pending);
    Ok(())
}

fn resolve(db: &SpinDb, r: &Refund, note: &str, now: i64) -> Result<(), DbError> {
    if let Some(issue) = &r.issue_id {
        console::resolve_payment_issue(db, issue, note, now)?;
    }
    Ok(())
}

/// "Your refund is on its way", once, to the order's customer, unless they sent STOP (then
/// nothing is sent, as they asked) or the money came for no order the app knows.
fn tell_customer(db: &SpinDb, r: &Refund, texts: &Texts, correlation_id: &str) -> Result<Option<Pending>, DbError> {
    let Some(order) = r.order_id.as_deref().map(|id| repo::get_order(db, id)).transpose()?.flatten() else {
        return Ok(None);
    };
    let opted_out = repo::get_contact(db, &order.wa_id)?.is_some_and(|(c, _)| c.opted_out);
    if opted_out || !refunds::mark_customer_told(db, &r.id)? {
        return Ok(None);
    }
    let amount = r.amount.as_ref().and_then(|m| Money::try_from(m).ok()).map(|m| m.to_string()).unwrap_or_default();
    let text = Message::text(fill(&texts.refund_issued, &[("amount", &amount)]));
    Ok(Some(spin_kit::messages::queue(db, &order.wa_id, &text, 0, correlation_id)?))
}

/// Completes an event that needs no work.
fn done(db: &SpinDb, event: &EventEnvelope) -> anyhow::Result<()> {
    transaction(db, |db| {
        outbox::claim(db, &event.id, CONSUMER, now_ms())?;
        outbox::complete(db, &event.id, now_ms())
    })?;
    Ok(())
}

/// Leaves the event for the relay to bring back after a backoff, recording the attempt.
fn retry_later(db: &SpinDb, event: &EventEnvelope, r: &Refund, error: &str) -> anyhow::Result<()> {
    refunds::record_attempt(db, &r.id, error, now_ms())?;
    let attempts = outbox::get(db, &event.id)?.map(|e| e.attempts).unwrap_or(1);
    let delay = astria_store::outbox::RelayPolicy::default().backoff_ms(attempts);
    outbox::due_at(db, &event.id, now_ms() + delay)?;
    log::warn(CONSUMER, &format!("refund {} will be asked for again in {delay} ms: {error}", r.id));
    Ok(())
}
