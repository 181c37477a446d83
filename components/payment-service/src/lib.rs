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
use astria_store::{console, refunds};
use astria_store::{transaction, Db};
use spin_kit::error::ApiError;
use spin_kit::events::{self, now_ms, Pending};
use spin_kit::request::{read_body, Route};
use spin_kit::{log, SpinVars};
use spin_sdk::http::{IncomingRequest, Method, Response, ResponseOutparam};
use spin_sdk::http_component;

const SERVICE: &str = "payment";
/// Stripe's event bodies are small; a checkout session event is a few kB.
const MAX_BODY: usize = 512 * 1024;
/// Where Stripe event ids are recorded (`processed_webhooks.source`).
const SOURCE: &str = "stripe";

#[http_component]
async fn handle(req: IncomingRequest, out: ResponseOutparam) {
    // The body is written before the head is handed over (`spin_kit::respond` says why).
    spin_kit::respond(out, answer(req).await);
}

async fn answer(req: IncomingRequest) -> Response {
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
        let ctx = Ctx { db, texts, event_id: &event.id, request_id, auto_refund: cfg.auto_refund };
        match (&event.kind, &event.session) {
            (EventKind::Refund(r), _) => ctx.refund_changed(r),
            (EventKind::ChargeRefunded(c), _) => ctx.charge_refunded(c),
            (EventKind::DisputeCreated(d), _) => ctx.dispute(d),
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
    /// Give back money the app cannot use by itself (`auto_refund`).
    auto_refund: bool,
}

type Outcome = Result<(&'static str, Vec<Pending>), ApiError>;

impl<D: Db + ?Sized> Ctx<'_, D> {
    /// Records a payment issue for the session's payment and, with `auto_refund`, asks for its
    /// refund; answers the refund's event to publish, if any.
    fn issue(&self, kind: IssueKind, s: &Session, detail: String) -> Result<Vec<Pending>, ApiError> {
        let name = kind.as_str();
        log::error_with("payment.issue", self.request_id, &format!("{name} for event {}: {detail}", self.event_id));
        let issue = PaymentIssue {
            event_id: self.event_id.to_string(),
            kind,
            order_id: s.order_id.clone(),
            session_id: Some(s.id.clone()),
            payment_intent: s.payment_intent.clone(),
            amount: s.amount.as_ref().map(astria_models::Money::from),
            detail,
            created_at: now_ms(),
        };
        if !repo::record_payment_issue(self.db, &issue)? || !self.auto_refund {
            return Ok(vec![]);
        }
        Ok(spin_kit::refunds::request(self.db, &issue, self.request_id)?.into_iter().collect())
    }

    /// Money arrived for the session's order.
    fn settle(&self, s: &Session) -> Outcome {
        let order = match s.order_id.as_deref() {
            Some(id) => repo::get_order(self.db, id)?,
            None => None,
        };
        let Some(order) = order else {
            let refund =
                self.issue(IssueKind::UnknownOrder, s, format!("paid session {} names no known order", s.id))?;
            return Ok((IssueKind::UnknownOrder.as_str(), refund));
        };
        let price =
            Money::try_from(&order.price).map_err(|e| anyhow::anyhow!("order {}: stored price: {e}", order.id))?;
        let Some(paid) = s.amount.clone() else {
            let refund = self.issue(IssueKind::NeedsRefund, s, "paid session without an amount".into())?;
            return Ok((IssueKind::NeedsRefund.as_str(), refund));
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
                    s.payment_intent.as_deref(),
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
                let mut pending = self.issue(IssueKind::NeedsRefund, s, detail)?;
                let sorry = astria_domain::conversation::Message::text(&self.texts.payment_needs_refund);
                pending.push(spin_kit::messages::queue(self.db, &order.wa_id, &sorry, 0, self.request_id)?);
                Ok((IssueKind::NeedsRefund.as_str(), pending))
            }
        }
    }

    /// A refund changed at Stripe. One that failed or was canceled after the app counted the
    /// money as given back opens its payment issue again, for a human.
    fn refund_changed(&self, r: &stripe::Refund) -> Outcome {
        let known = match refunds::by_stripe_id(self.db, &r.id)? {
            Some(k) => Some(k),
            None => r.payment_intent.as_deref().map(|pi| refunds::of_payment(self.db, pi)).transpose()?.flatten(),
        };
        let Some(known) = known else {
            // Made at Stripe by hand: charge.refunded records it with its payment.
            return Ok(("ignored", vec![]));
        };
        let error = r.failure_reason.as_ref().map(|why| format!("Stripe: refund {}: {why}", r.status.as_str()));
        if !refunds::settle(self.db, &known.id, r.status.as_str(), Some(&r.id), error.as_deref(), now_ms())? {
            return Ok(("unchanged", vec![]));
        }
        if !r.status.gives_money_back() {
            if let Some(issue) = &known.issue_id {
                let why = format!("refund {} {} at Stripe", r.id, r.status.as_str());
                console::reopen_payment_issue(self.db, issue, &why)?;
                log::error_with("payment.refund_failed", self.request_id, &format!("issue {issue}: {why}"));
            }
            return Ok(("refund_failed", vec![]));
        }
        Ok(("refund_updated", vec![]))
    }

    /// Money went back at Stripe (by the app, or by hand in the dashboard): recorded with its
    /// payment, so that the app never gives it back again, and its payment issue settled.
    fn charge_refunded(&self, c: &stripe::ChargeRefunded) -> Outcome {
        let Some(pi) = c.payment_intent.as_deref() else { return Ok(("ignored", vec![])) };
        let refund = c.refunds.first();
        let stripe_id = refund.map(|r| r.id.clone()).unwrap_or_else(|| format!("charge:{}", c.charge_id));
        let status = refund.map(|r| r.status.as_str()).unwrap_or(refunds::status::SUCCEEDED);
        let order = repo::order_of_payment(self.db, pi)?;
        let amount = c.amount_refunded.as_ref().map(astria_models::Money::from);
        let Some(recorded) = refunds::record_at_stripe(
            self.db,
            &stripe_id,
            pi,
            order.as_ref().map(|o| o.id.as_str()),
            status,
            amount.as_ref(),
            now_ms(),
        )?
        else {
            // Stripe's refund id is booked for another payment: the event contradicts what
            // Stripe told before. Nothing is changed; acknowledged so that Stripe does not
            // redeliver it for days, and logged for an operator.
            log::error_with(
                "payment.refund_conflict",
                self.request_id,
                &format!("refund {stripe_id} names payment {pi}, but is booked for another payment"),
            );
            return Ok(("refund_conflict", vec![]));
        };
        if recorded.status == refunds::status::REQUESTED {
            // The app's own refund was about to be asked for: it was made (in the dashboard,
            // say). Booked, so the worker finds nothing to do.
            refunds::settle(self.db, &recorded.id, status, Some(&stripe_id), None, now_ms())?;
        }
        // Every open issue asking for this payment back is settled (the app's own, or one an
        // operator was to handle by hand).
        let mut issues = repo::open_refund_issues(self.db, pi, order.as_ref().map(|o| o.id.as_str()))?;
        issues.extend(recorded.issue_id.clone());
        // One order for every handler: two reports of the same payment at once (Stripe sends
        // them concurrently) otherwise lock the same issues in opposite orders and deadlock.
        issues.sort();
        issues.dedup();
        for issue in issues {
            console::resolve_payment_issue(self.db, &issue, &format!("refunded at Stripe ({stripe_id})"), now_ms())?;
        }
        Ok(("refund_recorded", vec![]))
    }

    /// A chargeback: the payment is the bank's to settle now. Flagged for an operator (and the
    /// alert), the order stopped if it was still being made, nothing refunded on top.
    fn dispute(&self, d: &stripe::Dispute) -> Outcome {
        let order = d.payment_intent.as_deref().map(|pi| repo::order_of_payment(self.db, pi)).transpose()?.flatten();
        let issue = PaymentIssue {
            event_id: self.event_id.to_string(),
            kind: IssueKind::Dispute,
            order_id: order.as_ref().map(|o| o.id.clone()),
            session_id: order.as_ref().and_then(|o| o.checkout_session_id.clone()),
            payment_intent: d.payment_intent.clone(),
            amount: d.amount.as_ref().map(astria_models::Money::from),
            detail: format!("dispute {} ({})", d.id, d.reason.as_deref().unwrap_or("no reason given")),
            created_at: now_ms(),
        };
        repo::record_payment_issue(self.db, &issue)?;
        log::error_with("payment.dispute", self.request_id, &format!("{} for event {}", issue.detail, self.event_id));
        if let Some(o) = &order {
            for from in [OrderStatus::Paid, OrderStatus::Training, OrderStatus::Delivering] {
                if repo::set_order_status(self.db, &o.id, from, OrderStatus::Failed, now_ms())? {
                    let stopped =
                        astria_store::images::stop_delivery(self.db, &o.id, "the payment is disputed", now_ms())?;
                    log::info_with(
                        "payment.dispute",
                        self.request_id,
                        &format!("order {} stopped ({stopped} messages)", o.id),
                    );
                }
            }
        }
        Ok(("dispute", vec![]))
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
