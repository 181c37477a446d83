//! Refunds: money the app gives back without a human, one row per payment.
//!
//! A payment issue that means "this money cannot be used" (an order that failed after
//! payment, a payment for an order that could not take it, money for no known order) asks for
//! a refund ([`request`]) in the transaction that records it; the payment-checkout worker then
//! calls Stripe with an idempotency key derived from the order and the payment, and books the
//! answer ([`settle`]). A refund made by hand in Stripe's dashboard is recorded from its
//! webhook ([`record_at_stripe`]), so the app never gives the same payment back twice: the
//! payment is unique here, whoever asks.
//!
//! Statuses: `requested` (the app will ask Stripe), then Stripe's own (`pending`,
//! `succeeded`, `requires_action`, `failed`, `canceled`), or `refused` (Stripe will not: an
//! operator must look, with Stripe's words in `last_error`).

use astria_models::Money;

use crate::{Db, DbError, Row, Value};

pub mod status {
    pub const REQUESTED: &str = "requested";
    pub const PENDING: &str = "pending";
    pub const SUCCEEDED: &str = "succeeded";
    pub const REQUIRES_ACTION: &str = "requires_action";
    pub const FAILED: &str = "failed";
    pub const CANCELED: &str = "canceled";
    pub const REFUSED: &str = "refused";
}

/// A refund as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub id: String,
    /// The payment issue it settles (`payment_issues.event_id`); none for a refund made at Stripe.
    pub issue_id: Option<String>,
    pub order_id: Option<String>,
    pub payment_intent: Option<String>,
    /// The Checkout session that took the payment, to look the payment up when unknown.
    pub session_id: Option<String>,
    /// What to give back: what was paid.
    pub amount: Option<Money>,
    pub status: String,
    pub stripe_refund_id: Option<String>,
    pub attempts: i64,
    /// Of the idempotency key: moves on only when Stripe replays a stored failure to it.
    pub key_generation: i64,
    pub last_error: Option<String>,
    pub customer_told: bool,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A refund to ask for.
pub struct NewRefund<'a> {
    /// The payment issue's id: the refund's id too.
    pub issue_id: &'a str,
    pub order_id: Option<&'a str>,
    pub payment_intent: Option<&'a str>,
    pub session_id: Option<&'a str>,
    pub amount: Option<&'a Money>,
}

const COLUMNS: &str = "id, issue_id, order_id, payment_intent, session_id, amount_minor, currency, status,
    stripe_refund_id, attempts, last_error, customer_told, created_at, updated_at, key_generation";

fn from_row(r: &Row) -> Result<Refund, DbError> {
    Ok(Refund {
        id: r.text(0)?,
        issue_id: r.opt_text(1)?,
        order_id: r.opt_text(2)?,
        payment_intent: r.opt_text(3)?,
        session_id: r.opt_text(4)?,
        amount: match (r.opt_int(5)?, r.opt_text(6)?) {
            (Some(amount_minor), Some(currency)) => Some(Money { amount_minor, currency }),
            _ => None,
        },
        status: r.text(7)?,
        stripe_refund_id: r.opt_text(8)?,
        attempts: r.int(9)?,
        last_error: r.opt_text(10)?,
        customer_told: r.int(11)? != 0,
        created_at: r.int(12)?,
        updated_at: r.int(13)?,
        key_generation: r.int(14)?,
    })
}

fn one<D: Db + ?Sized>(db: &D, condition: &str, value: &str) -> Result<Option<Refund>, DbError> {
    let rows = db
        .query(&db.dialect().sql(&format!("SELECT {COLUMNS} FROM refunds WHERE {condition}")), &[Value::from(value)])?;
    rows.first().map(from_row).transpose()
}

pub fn get<D: Db + ?Sized>(db: &D, id: &str) -> Result<Option<Refund>, DbError> {
    one(db, "id = $1", id)
}

/// The refund of a payment, whoever asked for it.
pub fn of_payment<D: Db + ?Sized>(db: &D, payment_intent: &str) -> Result<Option<Refund>, DbError> {
    one(db, "payment_intent = $1", payment_intent)
}

pub fn by_stripe_id<D: Db + ?Sized>(db: &D, stripe_refund_id: &str) -> Result<Option<Refund>, DbError> {
    one(db, "stripe_refund_id = $1", stripe_refund_id)
}

/// The refund settling a payment issue.
pub fn of_issue<D: Db + ?Sized>(db: &D, issue_id: &str) -> Result<Option<Refund>, DbError> {
    one(db, "issue_id = $1", issue_id)
}

/// Asks for a refund; `false` if the issue, or the payment, has one already (asked for
/// before, by another issue, or made at Stripe): a payment is given back once.
pub fn request<D: Db + ?Sized>(db: &D, r: &NewRefund<'_>, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "INSERT INTO refunds (id, issue_id, order_id, payment_intent, session_id, amount_minor, currency, status,
                                  created_at, updated_at)
             VALUES ($1, $1, $2, $3, $4, $5, $6, $7, $8, $8) ON CONFLICT DO NOTHING",
        ),
        &[
            Value::from(r.issue_id),
            Value::from(r.order_id),
            Value::from(r.payment_intent),
            Value::from(r.session_id),
            r.amount.map(|m| Value::Int(m.amount_minor)).unwrap_or(Value::Null),
            Value::from(r.amount.map(|m| m.currency.clone())),
            Value::from(status::REQUESTED),
            Value::Int(now_ms),
        ],
    )?;
    Ok(n == 1)
}

/// Asks again for a refund that Stripe refused, failed or canceled (an operator pressed
/// Refund after fixing the cause): back to `requested`, with the next key, since Stripe keeps
/// the refusal as the old key's answer for a day (and a failed refund gave nothing back, so a
/// new one is owed). `false` if it is under way or done.
pub fn request_again<D: Db + ?Sized>(db: &D, id: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE refunds SET status = $1, last_error = NULL, updated_at = $2, key_generation = key_generation + 1
             WHERE id = $3 AND status IN ($4, $5, $6)",
        ),
        &[
            Value::from(status::REQUESTED),
            Value::Int(now_ms),
            Value::from(id),
            Value::from(status::REFUSED),
            Value::from(status::FAILED),
            Value::from(status::CANCELED),
        ],
    )?;
    Ok(n == 1)
}

/// Records the payment a refund gives back, once looked up (an order paid before payments
/// were recorded).
pub fn set_payment_intent<D: Db + ?Sized>(
    db: &D,
    id: &str,
    payment_intent: &str,
    now_ms: i64,
) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect()
            .sql("UPDATE refunds SET payment_intent = $1, updated_at = $2 WHERE id = $3 AND payment_intent IS NULL"),
        &[Value::from(payment_intent), Value::Int(now_ms), Value::from(id)],
    )?;
    Ok(n == 1)
}

/// Moves the refund to its next idempotency key (Stripe replays a stored failure to the old
/// one); conditional on the generation seen, so concurrent workers move it once.
pub fn next_key<D: Db + ?Sized>(db: &D, id: &str, seen_generation: i64, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE refunds SET key_generation = key_generation + 1, updated_at = $1 WHERE id = $2 AND key_generation = $3",
        ),
        &[Value::Int(now_ms), Value::from(id), Value::Int(seen_generation)],
    )?;
    Ok(n == 1)
}

/// A call to Stripe that will be tried again: counted, with its error.
pub fn record_attempt<D: Db + ?Sized>(db: &D, id: &str, error: &str, now_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql("UPDATE refunds SET attempts = attempts + 1, last_error = $1, updated_at = $2 WHERE id = $3"),
        &[Value::from(error), Value::Int(now_ms), Value::from(id)],
    )?;
    Ok(())
}

/// Books where the refund stands (`status`, Stripe's id, the error if any); `true` if that
/// changed anything, so that what follows (telling the customer, reopening the issue) happens
/// once however often Stripe reports it.
pub fn settle<D: Db + ?Sized>(
    db: &D,
    id: &str,
    new_status: &str,
    stripe_refund_id: Option<&str>,
    error: Option<&str>,
    now_ms: i64,
) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE refunds SET status = $1, stripe_refund_id = COALESCE(CAST($2 AS TEXT), stripe_refund_id),
                last_error = $3, attempts = attempts + 1, updated_at = $4
             WHERE id = $5 AND (status <> $1 OR stripe_refund_id IS NULL AND CAST($2 AS TEXT) IS NOT NULL)",
        ),
        &[
            Value::from(new_status),
            Value::from(stripe_refund_id),
            Value::from(error),
            Value::Int(now_ms),
            Value::from(id),
        ],
    )?;
    Ok(n == 1)
}

/// `true` the first time only: the customer is told about their refund once.
pub fn mark_customer_told<D: Db + ?Sized>(db: &D, id: &str) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql("UPDATE refunds SET customer_told = 1 WHERE id = $1 AND customer_told = 0"),
        &[Value::from(id)],
    )?;
    Ok(n == 1)
}

/// A refund made at Stripe, by hand or by the app, recorded from its webhook: if the payment
/// has no refund row yet, one is made (`id` = `stripe:<refund id>`) so that the app never
/// asks for it again. Answers the payment's refund row, or `None` when Stripe's refund id is
/// already booked for another payment (contradictory input: nothing is changed).
pub fn record_at_stripe<D: Db + ?Sized>(
    db: &D,
    stripe_refund_id: &str,
    payment_intent: &str,
    order_id: Option<&str>,
    refund_status: &str,
    amount: Option<&Money>,
    now_ms: i64,
) -> Result<Option<Refund>, DbError> {
    db.execute(
        &db.dialect().sql(
            "INSERT INTO refunds (id, order_id, payment_intent, amount_minor, currency, status, stripe_refund_id,
                                  customer_told, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $8) ON CONFLICT DO NOTHING",
        ),
        &[
            Value::from(format!("stripe:{stripe_refund_id}")),
            Value::from(order_id),
            Value::from(payment_intent),
            amount.map(|m| Value::Int(m.amount_minor)).unwrap_or(Value::Null),
            Value::from(amount.map(|m| m.currency.clone())),
            Value::from(refund_status),
            Value::from(stripe_refund_id),
            Value::Int(now_ms),
        ],
    )?;
    of_payment(db, payment_intent)
}

/// Refunds by status, for the metrics.
pub fn count_by_status<D: Db + ?Sized>(db: &D) -> Result<Vec<(String, i64)>, DbError> {
    // Kept by the tallies' triggers: the same answer as a GROUP BY, without reading every refund.
    Ok(crate::tallies::with_prefix(&crate::tallies::read(db)?, "refunds:"))
}

/// When the oldest refund still on its way (asked for, or pending at Stripe) last moved.
pub fn oldest_waiting_since<D: Db + ?Sized>(db: &D) -> Result<Option<i64>, DbError> {
    let rows = db.query(
        &db.dialect().sql("SELECT MIN(updated_at) FROM refunds WHERE status IN ($1, $2, $3)"),
        &[Value::from(status::REQUESTED), Value::from(status::PENDING), Value::from(status::REQUIRES_ACTION)],
    )?;
    rows.first().map(|r| r.opt_int(0)).transpose().map(Option::flatten)
}
