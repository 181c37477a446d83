//! The order lifecycle: which status may follow which, and whether a payment settles an order.
//!
//! ```text
//! collecting-photos ─► awaiting-payment ─► paid ─► training ─► delivering ─► delivered
//!        │                    │              │         │            │            ▲
//!        ├─► cancelled ◄──────┤              │         │            ▼            │
//!        └─► expired   ◄──────┘              │         │      delivery-failed ───┤
//!                                            └─────────┴────────────┴────────────┴─► failed
//! ```
//! A status never moves backwards; the four on the right and bottom are final. Cancelling is
//! only possible before payment: a paid order is fulfilled or fails (and is refunded).
//! `delivery-failed` (WhatsApp took not every portrait within the sender's horizon) is not
//! final: an operator's resend can still deliver it.

use astria_models::OrderStatus;

use crate::money::Money;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("an order cannot go from {from:?} to {to:?}")]
pub struct TransitionError {
    pub from: OrderStatus,
    pub to: OrderStatus,
}

/// Position in the lifecycle; a transition must strictly increase it.
fn rank(s: OrderStatus) -> u8 {
    use OrderStatus::*;
    match s {
        CollectingPhotos => 0,
        AwaitingPayment => 1,
        Paid => 2,
        Training => 3,
        Delivering => 4,
        DeliveryFailed => 5,
        Delivered | Expired | Cancelled | Failed => 6,
    }
}

/// True for statuses nothing follows.
pub fn is_final(s: OrderStatus) -> bool {
    use OrderStatus::*;
    matches!(s, Delivered | Expired | Cancelled | Failed)
}

/// True once money has been taken: such an order must be delivered or refunded.
pub fn is_paid(s: OrderStatus) -> bool {
    use OrderStatus::*;
    matches!(s, Paid | Training | Delivering | DeliveryFailed | Delivered)
}

/// Checks one status change against the lifecycle.
pub fn transition(from: OrderStatus, to: OrderStatus) -> Result<OrderStatus, TransitionError> {
    use OrderStatus::*;
    let allowed = match (from, to) {
        (CollectingPhotos, AwaitingPayment) => true,
        (CollectingPhotos | AwaitingPayment, Cancelled | Expired) => true,
        (AwaitingPayment, Paid) => true,
        (Paid, Training) => true,
        (Training, Delivering) => true,
        (Delivering, Delivered) => true,
        (Training | Delivering, DeliveryFailed) => true,
        (DeliveryFailed, Delivered) => true,
        (Paid | Training | Delivering | DeliveryFailed, Failed) => true,
        _ => false,
    };
    debug_assert!(!allowed || rank(to) > rank(from), "lifecycle table goes backwards");
    if allowed {
        Ok(to)
    } else {
        Err(TransitionError { from, to })
    }
}

/// What a reported payment means for an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PaymentCheck {
    /// Amount and currency match and the order awaits payment: mark it paid.
    Settles,
    /// The order is already paid (a duplicate or late event): nothing to do.
    AlreadyPaid,
    /// Money arrived that the order cannot take: flag for a refund, never accept silently.
    NeedsRefund(RefundReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundReason {
    AmountMismatch { expected: Money, paid: Money },
    OrderNotPayable(OrderStatus),
}

/// Decides what a payment of `paid` means for an order in `status` priced at `price`.
pub fn check_payment(status: OrderStatus, price: &Money, paid: &Money) -> PaymentCheck {
    if is_paid(status) {
        return PaymentCheck::AlreadyPaid;
    }
    if status != OrderStatus::AwaitingPayment && status != OrderStatus::CollectingPhotos {
        return PaymentCheck::NeedsRefund(RefundReason::OrderNotPayable(status));
    }
    if price != paid {
        return PaymentCheck::NeedsRefund(RefundReason::AmountMismatch { expected: price.clone(), paid: paid.clone() });
    }
    if status == OrderStatus::CollectingPhotos {
        // A link is only sent once photos are complete; a payment before that is not ours.
        return PaymentCheck::NeedsRefund(RefundReason::OrderNotPayable(status));
    }
    PaymentCheck::Settles
}

#[cfg(test)]
mod tests {
    use super::*;
    use OrderStatus::*;

    const ALL: [OrderStatus; 10] = astria_models::ORDER_STATUSES;

    #[test]
    fn the_happy_path_is_allowed() {
        let mut s = CollectingPhotos;
        for next in [AwaitingPayment, Paid, Training, Delivering, Delivered] {
            s = transition(s, next).unwrap();
        }
        assert_eq!(s, Delivered);
    }

    #[test]
    fn no_transition_goes_backwards_or_leaves_a_final_status() {
        for from in ALL {
            for to in ALL {
                if transition(from, to).is_ok() {
                    assert!(rank(to) > rank(from), "{from:?} -> {to:?}");
                    assert!(!is_final(from), "{from:?} is final");
                }
            }
        }
    }

    #[test]
    fn a_paid_order_cannot_be_cancelled_or_expire() {
        for from in [Paid, Training, Delivering] {
            assert!(transition(from, Cancelled).is_err());
            assert!(transition(from, Expired).is_err());
            assert!(transition(from, Failed).is_ok());
        }
    }

    #[test]
    fn an_order_whatsapp_could_not_deliver_may_still_be_delivered_by_a_resend_or_fail() {
        assert!(transition(Delivering, DeliveryFailed).is_ok());
        assert!(transition(DeliveryFailed, Delivered).is_ok());
        assert!(transition(DeliveryFailed, Failed).is_ok());
        assert!(transition(Delivered, DeliveryFailed).is_err());
        assert!(is_paid(DeliveryFailed) && !is_final(DeliveryFailed));
    }

    fn usd(n: i64) -> Money {
        Money::new(n, "usd").unwrap()
    }

    #[test]
    fn a_matching_payment_settles_an_order_awaiting_payment() {
        assert_eq!(check_payment(AwaitingPayment, &usd(1999), &usd(1999)), PaymentCheck::Settles);
    }

    #[test]
    fn a_different_amount_or_currency_needs_a_refund() {
        assert!(matches!(
            check_payment(AwaitingPayment, &usd(1999), &usd(999)),
            PaymentCheck::NeedsRefund(RefundReason::AmountMismatch { .. })
        ));
        let eur = Money::new(1999, "eur").unwrap();
        assert!(matches!(
            check_payment(AwaitingPayment, &usd(1999), &eur),
            PaymentCheck::NeedsRefund(RefundReason::AmountMismatch { .. })
        ));
    }

    #[test]
    fn a_payment_for_a_cancelled_or_expired_order_needs_a_refund() {
        for s in [Cancelled, Expired, Failed] {
            assert_eq!(check_payment(s, &usd(1), &usd(1)), PaymentCheck::NeedsRefund(RefundReason::OrderNotPayable(s)));
        }
    }

    #[test]
    fn a_second_payment_event_is_recognised_as_already_paid() {
        for s in [Paid, Training, Delivering, Delivered] {
            assert_eq!(check_payment(s, &usd(1999), &usd(1999)), PaymentCheck::AlreadyPaid);
        }
    }
}
