//! Asking for a refund from any component: [`request`] records it for a payment issue and
//! emits `payment.refund` in the caller's transaction, so the issue and its refund stand or
//! fall together; the payment-checkout worker gives the money back (`components/payment-checkout`).

use astria_domain::events::{channels, PAYMENT_REFUND};
use astria_models::{OrderStatus, PaymentRefund};
use astria_store::outbox::RelayPolicy;
use astria_store::refunds::{self, NewRefund};
use astria_store::repo::{self, IssueKind, PaymentIssue};
use astria_store::{Db, DbError};

use crate::events::{self, now_ms, Pending};

/// Asks for the refund of the payment `issue` names (unless the payment has one already), and
/// announces it to the refund worker. Only issues that mean "give this money back" ask; a
/// dispute's money is the bank's business.
pub fn request<D: Db + ?Sized>(db: &D, issue: &PaymentIssue, correlation_id: &str) -> Result<Option<Pending>, DbError> {
    if !matches!(issue.kind, IssueKind::NeedsRefund | IssueKind::UnknownOrder) {
        return Ok(None);
    }
    let recorded = payment_of(db, issue)?;
    let new = NewRefund {
        issue_id: &issue.event_id,
        order_id: issue.order_id.as_deref(),
        payment_intent: recorded.as_deref(),
        session_id: issue.session_id.as_deref(),
        amount: issue.amount.as_ref(),
    };
    if !refunds::request(db, &new, now_ms())? {
        return Ok(None);
    }
    let event = events::envelope(PAYMENT_REFUND, &PaymentRefund { refund_id: issue.event_id.clone() }, correlation_id);
    Ok(Some(events::emit(db, channels::PAYMENTS, &event, &RelayPolicy::default())?))
}

/// Moves a paid order that cannot be fulfilled from one of `from` to `to` (`failed`, or
/// `delivery_failed`) under its lock, records the payment issue `issue_id` ("give this money
/// back") and, with `auto_refund`, asks for the refund. Answers the refund's event to publish,
/// or `None`, flagging nothing, if the order was in none of `from` (it moved on, or failed
/// already and was flagged then). Call inside a transaction.
#[allow(clippy::too_many_arguments)]
pub fn fail_order<D: Db + ?Sized>(
    db: &D,
    order_id: &str,
    from: &[OrderStatus],
    to: OrderStatus,
    issue_id: &str,
    detail: &str,
    auto_refund: bool,
    correlation_id: &str,
    now: i64,
) -> Result<Option<Vec<Pending>>, DbError> {
    repo::lock_order(db, order_id)?;
    let mut moved = false;
    for f in from {
        if repo::set_order_status(db, order_id, *f, to, now)? {
            moved = true;
            break;
        }
    }
    if !moved {
        return Ok(None);
    }
    let order = repo::get_order(db, order_id)?;
    let issue = PaymentIssue {
        event_id: issue_id.to_string(),
        kind: IssueKind::NeedsRefund,
        order_id: Some(order_id.to_string()),
        session_id: order.as_ref().and_then(|o| o.checkout_session_id.clone()),
        payment_intent: None,
        amount: order.and_then(|o| o.paid),
        detail: detail.to_string(),
        created_at: now,
    };
    if !repo::record_payment_issue(db, &issue)? || !auto_refund {
        return Ok(Some(vec![]));
    }
    Ok(Some(request(db, &issue, correlation_id)?.into_iter().collect()))
}

/// The payment an issue is about: the issue's own (from Stripe's event), else the one that
/// paid its order.
fn payment_of<D: Db + ?Sized>(db: &D, issue: &PaymentIssue) -> Result<Option<String>, DbError> {
    Ok(match (&issue.payment_intent, &issue.order_id) {
        (Some(pi), _) => Some(pi.clone()),
        (None, Some(order)) => repo::payment_intent(db, order)?,
        (None, None) => None,
    })
}

/// Where the refund of an issue's payment stands: the issue's own, or the payment's, whoever
/// asked for it (refunded in the dashboard, say).
pub fn standing<D: Db + ?Sized>(db: &D, issue: &PaymentIssue) -> Result<Option<refunds::Refund>, DbError> {
    if let Some(r) = refunds::of_issue(db, &issue.event_id)? {
        return Ok(Some(r));
    }
    match payment_of(db, issue)? {
        Some(pi) => refunds::of_payment(db, &pi),
        None => Ok(None),
    }
}
