//! payment-service: the Stripe webhook (`POST /payment-received`) and the readiness check
//! (`GET /health/payment`). HTTP component; Checkout sessions are created by its Redis-trigger
//! sibling, `components/payment-checkout`.
//!
//! The webhook verifies `Stripe-Signature` before parsing (400 and nothing stored otherwise),
//! then handles each event once (its id is recorded in the same transaction as its effects):
//! - `checkout.session.completed` (paid) and `async_payment_succeeded`: the order becomes paid
//!   only if amount and currency match and it awaits payment; the `order.paid` event and the
//!   customer's confirmation are queued in the same transaction. Otherwise the payment is
//!   recorded as needing a refund (`payment_issues`) and the customer told.
//! - `completed` unpaid: nothing yet (the async outcome follows).
//! - `async_payment_failed` and `expired`: an order still awaiting that session's payment
//!   expires, and the customer is told they can reply PAY for a new link.
//! - an order that does not exist: recorded for an operator, 200 (Stripe must not retry forever).
//! A status never moves backwards: a late `expired` after `paid` changes nothing.

use astria_domain::config::{self, ExposeSecret};
use astria_domain::events::{channels, ORDER_PAID};
use astria_domain::order::{check_payment, PaymentCheck, RefundReason};
use astria_domain::stripe::{self, EventKind, Session, StripeError};
use astria_domain::texts::Texts;
use astria_domain::Money;
use astria_models::{OrderPaid, OrderStatus};
use astria_store::outbox::RelayPolicy;
use astria_store::repo::{self, IssueKind, PaymentIssue};
use astria_store::{transaction, Db};
use spin_kit::error::ApiError;
use spin_kit::events::{self, now_ms, Pending};
use spin_kit::request::{read_body, Route};
use spin_kit::{log, SpinVars};
use spin_sdk::http::{IncomingRequest, Method, Response};
use spin_sdk::http_component;

const SERVICE: &str = "payment";
/// Stripe's event bodies are small; a checkout session event is a few kB.
const MAX_BODY: usize = 512 * 1024;
/// Where Stripe event ids are recorded (`processed_webhooks.source`).
const SOURCE: &str = "stripe";

#[http_component]
async fn handle(req: IncomingRequest) -> Response {
    let Route { request_id, method, path, .. } = Route::of(&req);
    // Only the webhook's spans are exported (see message-service).
    let trace =
        spin_kit::trace::Invocation::incoming("payment-service", &req, &path).exported(path == "/payment-received");
    let result = match (method, path.as_str()) {
        (Method::Get, "/health/payment") => Ok(spin_kit::health::readiness(SERVICE, env!("CARGO_PKG_VERSION"))),
        (Method::Post, "/payment-received") => {
            let signature = spin_kit::header(&req, "stripe-signature");
            match read_body(req, MAX_BODY).await {
                Ok(body) => receive(&body, signature.as_deref(), &request_id),
                Err(e) => Err(e),
            }
        }
        (_, "/payment-received") => Err(ApiError::BadRequest("use POST".into())),
        _ => Err(ApiError::NotFound),
    };
    let response = result.unwrap_or_else(|e| e.into_response(&request_id));
    trace.answered(response)
}

/// What the webhook did with one event (the response body; Stripe ignores it).
#[derive(serde::Serialize)]
struct Handled {
    event_id: String,
    result: &'static str,
}

fn receive(body: &[u8], signature: Option<&str>, request_id: &str) -> Result<Response, ApiError> {
    let cfg = config::payment_webhook(&SpinVars)?;
    let now_s = now_ms() / 1000;
    stripe::verify_signature(cfg.webhook_secret.expose_secret(), body, signature, now_s, cfg.tolerance_s)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let event = stripe::parse_event(body).map_err(|e| match e {
        StripeError::BadSignature => ApiError::BadRequest(e.to_string()),
        StripeError::Malformed(m) => ApiError::BadRequest(m),
    })?;
    if let Some(order_id) = event.session.as_ref().and_then(|s| s.order_id.as_deref()) {
        spin_kit::trace::set_order(order_id);
    }
    let texts = &cfg.texts;
    let db = spin_kit::open_db()?;
    let (result, pending) = transaction(&db, |db| {
        if !repo::first_delivery(db, SOURCE, &event.id, now_ms())? {
            return Ok(("duplicate", vec![]));
        }
        let ctx = Ctx { db, texts, event_id: &event.id, request_id };
        match (&event.kind, &event.session) {
            (EventKind::Other(_), _) | (_, None) => Ok(("ignored", vec![])),
            (EventKind::Completed, Some(s)) if s.payment_status == "unpaid" => Ok(("awaiting_async_payment", vec![])),
            (EventKind::Completed | EventKind::AsyncSucceeded, Some(s)) => ctx.settle(s),
            (EventKind::AsyncFailed, Some(s)) => ctx.lapse(s, &texts.payment_failed),
            (EventKind::Expired, Some(s)) => ctx.lapse(s, &texts.payment_expired),
        }
    })?;
    events::publish(&db, config::redis_url(&SpinVars)?.expose_secret(), &pending);
    Ok(spin_kit::json_response(200, &Handled { event_id: event.id, result }))
}

struct Ctx<'a, D: Db + ?Sized> {
    db: &'a D,
    texts: &'a Texts,
    event_id: &'a str,
    request_id: &'a str,
}

type Outcome = Result<(&'static str, Vec<Pending>), ApiError>;

impl<D: Db + ?Sized> Ctx<'_, D> {
    fn issue(&self, kind: IssueKind, s: &Session, detail: String) -> Result<(), ApiError> {
        let name = kind.as_str();
        log::error_with("payment.issue", self.request_id, &format!("{name} for event {}: {detail}", self.event_id));
        repo::record_payment_issue(
            self.db,
            &PaymentIssue {
                event_id: self.event_id.to_string(),
                kind,
                order_id: s.order_id.clone(),
                session_id: Some(s.id.clone()),
                payment_intent: s.payment_intent.clone(),
                amount: s.amount.as_ref().map(astria_models::Money::from),
                detail,
                created_at: now_ms(),
            },
        )?;
        Ok(())
    }

    /// Money arrived for the session's order.
    fn settle(&self, s: &Session) -> Outcome {
        let order = match s.order_id.as_deref() {
            Some(id) => repo::get_order(self.db, id)?,
            None => None,
        };
        let Some(order) = order else {
            self.issue(IssueKind::UnknownOrder, s, format!("paid session {} names no known order", s.id))?;
            return Ok((IssueKind::UnknownOrder.as_str(), vec![]));
        };
        let price = Money::try_from(&order.price).map_err(|e| anyhow::anyhow!("order {}: stored price: {e}", order.id))?;
        let Some(paid) = s.amount.clone() else {
            self.issue(IssueKind::NeedsRefund, s, "paid session without an amount".into())?;
            return Ok((IssueKind::NeedsRefund.as_str(), vec![]));
        };
        let other_session = order.checkout_session_id.as_deref().is_some_and(|id| id != s.id);
        let check = match check_payment(order.status, &price, &paid) {
            // A second session paid for an order already paid: that money must go back.
            PaymentCheck::AlreadyPaid if other_session => {
                PaymentCheck::NeedsRefund(RefundReason::OrderNotPayable(order.status))
            }
            c => c,
        };
        match check {
            PaymentCheck::Settles => {
                if !repo::mark_paid(
                    self.db,
                    &order.id,
                    &astria_models::Money::from(&paid),
                    now_ms(),
                )? {
                    // Someone else moved the order in between: let Stripe retry on fresh state.
                    return Err(ApiError::Unavailable {
                        dependency: "database",
                        detail: "order changed meanwhile".into(),
                    });
                }
                let paid_event = events::envelope(
                    ORDER_PAID,
                    &OrderPaid { order_id: order.id.clone(), payment_event_id: self.event_id.to_string() },
                    self.request_id,
                );
                let mut pending = vec![events::emit(self.db, channels::ORDERS, &paid_event, &RelayPolicy::default())?];
                let thanks = astria_domain::conversation::Message::text(&self.texts.payment_received);
                pending.push(spin_kit::messages::queue(self.db, &order.wa_id, &thanks, 0, self.request_id)?);
                log::info_with("payment.paid", self.request_id, &format!("order {} paid ({paid})", order.id));
                Ok(("paid", pending))
            }
            PaymentCheck::AlreadyPaid => Ok(("already_paid", vec![])),
            PaymentCheck::NeedsRefund(reason) => {
                let detail = match reason {
                    RefundReason::AmountMismatch { expected, paid } => format!("paid {paid}, expected {expected}"),
                    RefundReason::OrderNotPayable(status) => format!("order {} is {status:?}", order.id),
                };
                self.issue(IssueKind::NeedsRefund, s, detail)?;
                let sorry = astria_domain::conversation::Message::text(&self.texts.payment_needs_refund);
                Ok((
                    IssueKind::NeedsRefund.as_str(),
                    vec![spin_kit::messages::queue(self.db, &order.wa_id, &sorry, 0, self.request_id)?],
                ))
            }
        }
    }

    /// The session lapsed (expired, or its async payment failed): an order still waiting for
    /// exactly this session expires; anything else is stale and changes nothing.
    fn lapse(&self, s: &Session, tell: &str) -> Outcome {
        let Some(order) = s.order_id.as_deref().map(|id| repo::get_order(self.db, id)).transpose()?.flatten() else {
            return Ok(("ignored", vec![]));
        };
        if order.status != OrderStatus::AwaitingPayment || order.checkout_session_id.as_deref() != Some(s.id.as_str()) {
            return Ok(("stale", vec![]));
        }
        if !repo::set_order_status(self.db, &order.id, OrderStatus::AwaitingPayment, OrderStatus::Expired, now_ms())? {
            return Ok(("stale", vec![]));
        }
        let message = astria_domain::conversation::Message::text(tell);
        Ok(("expired", vec![spin_kit::messages::queue(self.db, &order.wa_id, &message, 0, self.request_id)?]))
    }
}
