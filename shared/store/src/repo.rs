//! Reading and writing the business records: contacts (with their conversation state), orders,
//! their photos, and processed webhook ids.
//!
//! Writes that must not race are conditional: a status change names the status it expects to
//! replace, a photo or webhook id is inserted only if new. Callers group writes that belong
//! together in one [`crate::transaction`], with the outbox events they cause. Which status may
//! follow which is the domain's decision (`astria_domain::order::transition`), made before
//! calling [`set_order_status`].

use astria_models::{Contact, Money, Order, OrderStatus, Photo};

use crate::{Db, DbError, Row, Value};

/// The stored spelling of each status.
pub fn status_str(s: OrderStatus) -> &'static str {
    use OrderStatus::*;
    match s {
        CollectingPhotos => "collecting_photos",
        AwaitingPayment => "awaiting_payment",
        Paid => "paid",
        Training => "training",
        Delivering => "delivering",
        DeliveryFailed => "delivery_failed",
        Delivered => "delivered",
        Expired => "expired",
        Cancelled => "cancelled",
        Failed => "failed",
    }
}

pub fn parse_status(s: &str) -> Result<OrderStatus, DbError> {
    use OrderStatus::*;
    Ok(match s {
        "collecting_photos" => CollectingPhotos,
        "awaiting_payment" => AwaitingPayment,
        "paid" => Paid,
        "training" => Training,
        "delivering" => Delivering,
        "delivery_failed" => DeliveryFailed,
        "delivered" => Delivered,
        "expired" => Expired,
        "cancelled" => Cancelled,
        "failed" => Failed,
        other => return Err(DbError::Decode(format!("unknown order status '{other}'"))),
    })
}

/// Milliseconds since the epoch as RFC 3339 UTC (the WIT models carry times as strings).
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm), to avoid a date crate in the store.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms.rem_euclid(1000)
    )
}

/// Records an inbound message from `wa_id`: creates the contact on first contact, refreshes
/// the profile name and the 24-hour window.
pub fn touch_contact<D: Db + ?Sized>(
    db: &D,
    wa_id: &str,
    profile_name: Option<&str>,
    now_ms: i64,
) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql(
            "INSERT INTO contacts (wa_id, profile_name, opted_out, last_inbound_at, conversation, updated_at, first_seen_at)
             VALUES ($1, $2, 0, $3, $4, $3, $3)
             ON CONFLICT (wa_id) DO UPDATE SET
                profile_name = COALESCE(excluded.profile_name, contacts.profile_name),
                last_inbound_at = excluded.last_inbound_at,
                updated_at = excluded.updated_at",
        ),
        &[Value::from(wa_id), Value::from(profile_name), Value::Int(now_ms), Value::from(r#"{"state":"idle"}"#)],
    )?;
    Ok(())
}

/// A contact and its conversation state (JSON).
pub fn get_contact<D: Db + ?Sized>(db: &D, wa_id: &str) -> Result<Option<(Contact, String)>, DbError> {
    let rows = db.query(
        &db.dialect()
            .sql("SELECT wa_id, profile_name, opted_out, last_inbound_at, conversation FROM contacts WHERE wa_id = $1"),
        &[Value::from(wa_id)],
    )?;
    rows.first()
        .map(|r| {
            Ok((
                Contact {
                    wa_id: r.text(0)?,
                    profile_name: r.opt_text(1)?,
                    opted_out: r.int(2)? != 0,
                    last_inbound_at: r.opt_int(3)?.map(rfc3339),
                },
                r.text(4)?,
            ))
        })
        .transpose()
}

pub fn set_opt_out<D: Db + ?Sized>(db: &D, wa_id: &str, opted_out: bool, now_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql("UPDATE contacts SET opted_out = $1, updated_at = $2 WHERE wa_id = $3"),
        &[Value::Int(opted_out.into()), Value::Int(now_ms), Value::from(wa_id)],
    )?;
    Ok(())
}

/// Stores the contact's conversation state, and nothing else of it.
pub fn save_conversation<D: Db + ?Sized>(db: &D, wa_id: &str, state_json: &str, now_ms: i64) -> Result<(), DbError> {
    save_conversation_seen(db, wa_id, state_json, None, 0, now_ms)
}

/// [`save_conversation`] for the contact whose message a step answers: its profile name (when
/// the message carries one) and its 24-hour window are refreshed in the same statement, the
/// window never back (Meta may deliver an older message late). For a contact that
/// `identity::recognise` found, this is where they are refreshed; after `identity::identify`
/// or `identity::create`, which wrote them already, it changes neither.
pub fn save_conversation_seen<D: Db + ?Sized>(
    db: &D,
    wa_id: &str,
    state_json: &str,
    profile_name: Option<&str>,
    sent_at_ms: i64,
    now_ms: i64,
) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql(
            "UPDATE contacts SET conversation = $1, updated_at = $2,
                profile_name = COALESCE($3, profile_name),
                last_inbound_at = CASE WHEN $4 > COALESCE(last_inbound_at, 0) THEN $4 ELSE last_inbound_at END
             WHERE wa_id = $5",
        ),
        &[
            Value::from(state_json),
            Value::Int(now_ms),
            Value::from(profile_name),
            Value::Int(sent_at_ms),
            Value::from(wa_id),
        ],
    )?;
    Ok(())
}

/// A new order, collecting photos.
pub struct NewOrder<'a> {
    pub id: &'a str,
    pub wa_id: &'a str,
    pub pack_id: &'a str,
    pub subject_class: &'a str,
    pub price: &'a Money,
}

pub fn create_order<D: Db + ?Sized>(db: &D, o: &NewOrder<'_>, now_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql(
            "INSERT INTO orders (id, wa_id, pack_id, subject_class, status, price_minor, currency, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)",
        ),
        &[
            Value::from(o.id),
            Value::from(o.wa_id),
            Value::from(o.pack_id),
            Value::from(o.subject_class),
            Value::from(status_str(OrderStatus::CollectingPhotos)),
            Value::Int(o.price.amount_minor),
            Value::from(o.price.currency.as_str()),
            Value::Int(now_ms),
        ],
    )?;
    Ok(())
}

const ORDER_COLUMNS: &str =
    "id, wa_id, pack_id, subject_class, status, price_minor, currency, paid_minor, paid_currency,
    checkout_session_id, checkout_url, astria_tune_id, created_at, updated_at";

fn order_from_row(r: &Row, photos: Vec<Photo>) -> Result<Order, DbError> {
    let paid = match (r.opt_int(7)?, r.opt_text(8)?) {
        (Some(amount_minor), Some(currency)) => Some(Money { amount_minor, currency }),
        _ => None,
    };
    Ok(Order {
        id: r.text(0)?,
        wa_id: r.text(1)?,
        pack_id: r.text(2)?,
        subject_class: r.opt_text(3)?,
        photos,
        status: parse_status(&r.text(4)?)?,
        price: Money { amount_minor: r.int(5)?, currency: r.text(6)? },
        paid,
        checkout_session_id: r.opt_text(9)?,
        checkout_url: r.opt_text(10)?,
        astria_tune_id: r.opt_int(11)?.map(|v| v as u64),
        created_at: rfc3339(r.int(12)?),
        updated_at: rfc3339(r.int(13)?),
    })
}

/// An order with its photos in the order they arrived, in one statement (an order row per
/// photo, or one with no photo).
pub fn get_order<D: Db + ?Sized>(db: &D, id: &str) -> Result<Option<Order>, DbError> {
    let columns: Vec<String> = ORDER_COLUMNS.split(',').map(|c| format!("o.{}", c.trim())).collect();
    let rows = db.query(
        &db.dialect().sql(&format!(
            "SELECT {}, p.media_id, p.mime_type, p.sha256 FROM orders o
             LEFT JOIN order_photos p ON p.order_id = o.id WHERE o.id = $1 ORDER BY p.position",
            columns.join(", ")
        )),
        &[Value::from(id)],
    )?;
    let Some(first) = rows.first() else { return Ok(None) };
    let photo = columns.len();
    let mut photos = vec![];
    for r in &rows {
        if let Some(media_id) = r.opt_text(photo)? {
            photos.push(Photo { media_id, mime_type: r.text(photo + 1)?, sha256: r.text(photo + 2)? });
        }
    }
    order_from_row(first, photos).map(Some)
}

/// Moves an order from `from` to `to`; `false` if it was no longer in `from` (someone else
/// moved it first), so a stale decision never overwrites a newer status.
pub fn set_order_status<D: Db + ?Sized>(
    db: &D,
    id: &str,
    from: OrderStatus,
    to: OrderStatus,
    now_ms: i64,
) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql("UPDATE orders SET status = $1, updated_at = $2 WHERE id = $3 AND status = $4"),
        &[Value::from(status_str(to)), Value::Int(now_ms), Value::from(id), Value::from(status_str(from))],
    )?;
    Ok(n == 1)
}

/// Adds a photo to an order; `false` if the order already has a photo with this sha256.
pub fn add_photo<D: Db + ?Sized>(db: &D, order_id: &str, photo: &Photo, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "INSERT INTO order_photos (order_id, sha256, media_id, mime_type, position, created_at)
             VALUES ($1, $2, $3, $4, (SELECT COUNT(*) FROM order_photos WHERE order_id = $1), $5)
             ON CONFLICT (order_id, sha256) DO NOTHING",
        ),
        &[
            Value::from(order_id),
            Value::from(photo.sha256.to_ascii_lowercase()),
            Value::from(photo.media_id.as_str()),
            Value::from(photo.mime_type.as_str()),
            Value::Int(now_ms),
        ],
    )?;
    Ok(n == 1)
}

/// When the order's oldest photo arrived (ms): WhatsApp media ids die 7 days after that.
pub fn oldest_photo_at<D: Db + ?Sized>(db: &D, order_id: &str) -> Result<Option<i64>, DbError> {
    let rows = db.query(
        &db.dialect().sql("SELECT MIN(created_at) FROM order_photos WHERE order_id = $1"),
        &[Value::from(order_id)],
    )?;
    Ok(rows.first().map(|r| r.opt_int(0)).transpose()?.flatten())
}

/// Locks the order's row until the transaction ends (PostgreSQL; SQLite's write transaction
/// already excludes other writers), so that decisions read from several rows, like "was this
/// the last prompt?", are made one at a time per order.
pub fn lock_order<D: Db + ?Sized>(db: &D, id: &str) -> Result<(), DbError> {
    if db.dialect() == crate::Dialect::Postgres {
        db.query("SELECT id FROM orders WHERE id = $1 FOR UPDATE", &[Value::from(id)])?;
    }
    Ok(())
}

/// Stores the order's Checkout session, once: `false` if it has one already or no longer
/// awaits payment.
pub fn set_checkout<D: Db + ?Sized>(
    db: &D,
    order_id: &str,
    session_id: &str,
    url: &str,
    now_ms: i64,
) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE orders SET checkout_session_id = $1, checkout_url = $2, updated_at = $3
             WHERE id = $4 AND status = $5 AND checkout_session_id IS NULL",
        ),
        &[
            Value::from(session_id),
            Value::from(url),
            Value::Int(now_ms),
            Value::from(order_id),
            Value::from(status_str(OrderStatus::AwaitingPayment)),
        ],
    )?;
    Ok(n == 1)
}

/// The order's Checkout request as fixed so far: key generation and `expires_at` (unix
/// seconds; `None` before the first request). `None` if the order does not exist.
pub fn checkout_attempt<D: Db + ?Sized>(db: &D, order_id: &str) -> Result<Option<(i64, Option<i64>)>, DbError> {
    let rows = db.query(
        &db.dialect().sql("SELECT checkout_generation, checkout_expires_at FROM orders WHERE id = $1"),
        &[Value::from(order_id)],
    )?;
    rows.first().map(|r| Ok((r.int(0)?, r.opt_int(1)?))).transpose()
}

/// Fixes the order's Checkout request to key generation `generation` expiring at `expires_at`,
/// if it is still as the caller read it (`from`): `false` when another replica changed it first
/// (the caller reads it again and uses theirs).
pub fn set_checkout_attempt<D: Db + ?Sized>(
    db: &D,
    order_id: &str,
    from: (i64, Option<i64>),
    generation: i64,
    expires_at: i64,
    now_ms: i64,
) -> Result<bool, DbError> {
    let same_expiry = if from.1.is_some() { "checkout_expires_at = $6" } else { "checkout_expires_at IS NULL" };
    let mut params = vec![
        Value::Int(generation),
        Value::Int(expires_at),
        Value::Int(now_ms),
        Value::from(order_id),
        Value::Int(from.0),
    ];
    if let Some(e) = from.1 {
        params.push(Value::Int(e));
    }
    let n = db.execute(
        &db.dialect().sql(&format!(
            "UPDATE orders SET checkout_generation = $1, checkout_expires_at = $2, updated_at = $3
             WHERE id = $4 AND checkout_generation = $5 AND {same_expiry}"
        )),
        &params,
    )?;
    Ok(n == 1)
}

/// Marks an order awaiting payment as paid with what Stripe reported; `false` if it no longer
/// awaited payment (a concurrent or earlier event settled it).
pub fn mark_paid<D: Db + ?Sized>(
    db: &D,
    order_id: &str,
    paid: &Money,
    payment_intent: Option<&str>,
    now_ms: i64,
) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE orders SET status = $1, paid_minor = $2, paid_currency = $3, updated_at = $4, paid_at = $4,
                payment_intent = $7
             WHERE id = $5 AND status = $6",
        ),
        &[
            Value::from(status_str(OrderStatus::Paid)),
            Value::Int(paid.amount_minor),
            Value::from(paid.currency.as_str()),
            Value::Int(now_ms),
            Value::from(order_id),
            Value::from(status_str(OrderStatus::AwaitingPayment)),
            Value::from(payment_intent),
        ],
    )?;
    Ok(n == 1)
}

/// The payment (Stripe's `payment_intent`) that paid the order, when recorded.
pub fn payment_intent<D: Db + ?Sized>(db: &D, order_id: &str) -> Result<Option<String>, DbError> {
    let rows =
        db.query(&db.dialect().sql("SELECT payment_intent FROM orders WHERE id = $1"), &[Value::from(order_id)])?;
    rows.first().map(|r| r.opt_text(0)).transpose().map(Option::flatten)
}

/// The order a payment paid, if the app knows it.
pub fn order_of_payment<D: Db + ?Sized>(db: &D, payment_intent: &str) -> Result<Option<Order>, DbError> {
    let rows =
        db.query(&db.dialect().sql("SELECT id FROM orders WHERE payment_intent = $1"), &[Value::from(payment_intent)])?;
    match rows.first() {
        Some(r) => get_order(db, &r.text(0)?),
        None => Ok(None),
    }
}

/// Creates `new_id` awaiting payment as a copy of `from_id` (pack, subject, price, photos),
/// without its Checkout session. The photos keep their age: WhatsApp deletes them 7 days after
/// they arrived, whatever order names them, and the payment link's check counts from then.
pub fn reopen_order<D: Db + ?Sized>(db: &D, from_id: &str, new_id: &str, now_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql(
            "INSERT INTO orders (id, wa_id, pack_id, subject_class, status, price_minor, currency, created_at, updated_at)
             SELECT $1, wa_id, pack_id, subject_class, $2, price_minor, currency, $3, $3 FROM orders WHERE id = $4",
        ),
        &[
            Value::from(new_id),
            Value::from(status_str(OrderStatus::AwaitingPayment)),
            Value::Int(now_ms),
            Value::from(from_id),
        ],
    )?;
    db.execute(
        &db.dialect().sql(
            "INSERT INTO order_photos (order_id, sha256, media_id, mime_type, position, created_at)
             SELECT $1, sha256, media_id, mime_type, position, created_at FROM order_photos WHERE order_id = $2",
        ),
        &[Value::from(new_id), Value::from(from_id)],
    )?;
    Ok(())
}

/// What a payment issue asks of an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueKind {
    /// Money was taken for an order the app cannot fulfil: refund it.
    NeedsRefund,
    /// A paid session names no order the app knows.
    UnknownOrder,
    /// The customer's bank opened a chargeback: the money is the bank's to settle now.
    Dispute,
}

impl IssueKind {
    /// The stored (and reported) name.
    pub fn as_str(self) -> &'static str {
        match self {
            IssueKind::NeedsRefund => "needs_refund",
            IssueKind::UnknownOrder => "unknown_order",
            IssueKind::Dispute => "dispute",
        }
    }

    pub fn parse(s: &str) -> Result<IssueKind, DbError> {
        match s {
            "needs_refund" => Ok(IssueKind::NeedsRefund),
            "unknown_order" => Ok(IssueKind::UnknownOrder),
            "dispute" => Ok(IssueKind::Dispute),
            other => Err(DbError::Decode(format!("unknown payment issue kind '{other}'"))),
        }
    }
}

/// A payment an operator must look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentIssue {
    /// The Stripe event that revealed it (one issue per event).
    pub event_id: String,
    pub kind: IssueKind,
    pub order_id: Option<String>,
    pub session_id: Option<String>,
    pub payment_intent: Option<String>,
    pub amount: Option<Money>,
    pub detail: String,
    pub created_at: i64,
}

pub fn record_payment_issue<D: Db + ?Sized>(db: &D, issue: &PaymentIssue) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "INSERT INTO payment_issues (event_id, kind, order_id, session_id, payment_intent, amount_minor, currency, detail, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (event_id) DO NOTHING",
        ),
        &[
            Value::from(issue.event_id.as_str()),
            Value::from(issue.kind.as_str()),
            Value::from(issue.order_id.clone()),
            Value::from(issue.session_id.clone()),
            Value::from(issue.payment_intent.clone()),
            issue.amount.as_ref().map(|m| Value::Int(m.amount_minor)).unwrap_or(Value::Null),
            Value::from(issue.amount.as_ref().map(|m| m.currency.clone())),
            Value::from(issue.detail.as_str()),
            Value::Int(issue.created_at),
        ],
    )?;
    Ok(n == 1)
}

/// A payment issue by id, resolved or not.
pub fn payment_issue<D: Db + ?Sized>(db: &D, event_id: &str) -> Result<Option<PaymentIssue>, DbError> {
    db.query(
        &db.dialect().sql(
            "SELECT event_id, kind, order_id, session_id, payment_intent, amount_minor, currency, detail, created_at
             FROM payment_issues WHERE event_id = $1",
        ),
        &[Value::from(event_id)],
    )?
    .first()
    .map(payment_issue_from)
    .transpose()
}

fn payment_issue_from(r: &Row) -> Result<PaymentIssue, DbError> {
    Ok(PaymentIssue {
        event_id: r.text(0)?,
        kind: IssueKind::parse(&r.text(1)?)?,
        order_id: r.opt_text(2)?,
        session_id: r.opt_text(3)?,
        payment_intent: r.opt_text(4)?,
        amount: match (r.opt_int(5)?, r.opt_text(6)?) {
            (Some(amount_minor), Some(currency)) => Some(Money { amount_minor, currency }),
            _ => None,
        },
        detail: r.text(7)?,
        created_at: r.int(8)?,
    })
}

/// The open issues that ask for a payment's money back (by the payment, or by its order).
pub fn open_refund_issues<D: Db + ?Sized>(
    db: &D,
    payment_intent: &str,
    order_id: Option<&str>,
) -> Result<Vec<String>, DbError> {
    db.query(
        &db.dialect().sql(
            "SELECT event_id FROM payment_issues
             WHERE resolved_at IS NULL AND kind IN ($1, $2) AND (payment_intent = $3 OR order_id = $4)",
        ),
        &[
            Value::from(IssueKind::NeedsRefund.as_str()),
            Value::from(IssueKind::UnknownOrder.as_str()),
            Value::from(payment_intent),
            Value::from(order_id),
        ],
    )?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

/// Unresolved payment issues, newest first.
pub fn open_payment_issues<D: Db + ?Sized>(db: &D, limit: i64) -> Result<Vec<PaymentIssue>, DbError> {
    db.query(
        &db.dialect().sql(
            "SELECT event_id, kind, order_id, session_id, payment_intent, amount_minor, currency, detail, created_at
             FROM payment_issues WHERE resolved_at IS NULL ORDER BY created_at DESC LIMIT $1",
        ),
        &[Value::Int(limit)],
    )?
    .iter()
    .map(payment_issue_from)
    .collect()
}

/// Records a webhook delivery id; `true` if it is new (handle it), `false` for a redelivery.
pub fn first_delivery<D: Db + ?Sized>(db: &D, source: &str, external_id: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "INSERT INTO processed_webhooks (source, external_id, received_at) VALUES ($1, $2, $3)
             ON CONFLICT (source, external_id) DO NOTHING",
        ),
        &[Value::from(source), Value::from(external_id), Value::Int(now_ms)],
    )?;
    Ok(n == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_764_050_400_123), "2025-11-25T06:00:00.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn every_status_has_a_stored_spelling_that_parses_back() {
        for s in astria_models::ORDER_STATUSES {
            assert_eq!(parse_status(status_str(s)).unwrap(), s);
        }
        assert!(parse_status("shipped").is_err());
    }
}
