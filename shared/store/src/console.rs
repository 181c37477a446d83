//! What the operator console shows (maintenance-service, `/maintenance/console`): the daily
//! funnel, the orders that need a human, one order's story (its customer's messages and its
//! events), and the record of an operator resolving a payment issue.
//!
//! The console refreshes its pages every few seconds while an operator has it open: each query
//! here reads through an index only what it shows (a `LIMIT`, a time window, one order), so a
//! page costs the same however much history the tables hold.

use astria_models::OrderStatus;

use crate::messages::{self, OutboundMessage};
use crate::repo::status_str;
use crate::{Db, DbError, Value};

pub const DAY_MS: i64 = 86_400_000;

/// One UTC day of the funnel: how many customers wrote for the first time, started an order,
/// paid, and had their portraits delivered that day.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FunnelDay {
    /// Midnight UTC starting the day, in ms since the epoch.
    pub day: i64,
    pub chats: i64,
    pub orders: i64,
    pub paid: i64,
    pub delivered: i64,
}

/// The last `days` UTC days up to `now_ms`, oldest first, every day present (zeros included).
pub fn funnel<D: Db + ?Sized>(db: &D, now_ms: i64, days: i64) -> Result<Vec<FunnelDay>, DbError> {
    let today = now_ms.div_euclid(DAY_MS);
    let first = today - days.max(1) + 1;
    let mut out: Vec<FunnelDay> =
        (first..=today).map(|d| FunnelDay { day: d * DAY_MS, ..Default::default() }).collect();
    let since = Value::Int(first * DAY_MS);
    let delivered = Value::from(status_str(OrderStatus::Delivered));
    // (table, time column, extra condition): each series counts rows per UTC day of its column.
    // A delivered order changes no more, so its last change is its delivery.
    let sources: [(&str, &str, &str, fn(&mut FunnelDay) -> &mut i64); 4] = [
        ("contacts", "first_seen_at", "", |d| &mut d.chats),
        ("orders", "created_at", "", |d| &mut d.orders),
        ("orders", "paid_at", "", |d| &mut d.paid),
        ("orders", "updated_at", "AND status = $2", |d| &mut d.delivered),
    ];
    let mut series = Vec::with_capacity(sources.len());
    for (table, column, extra, field) in sources {
        // Integer division by a BIGINT constant means the same on SQLite and PostgreSQL.
        let sql = format!(
            "SELECT {column} / {DAY_MS}, COUNT(*) FROM {table} WHERE {column} >= $1 {extra} GROUP BY {column} / {DAY_MS}"
        );
        let params = if extra.is_empty() { vec![since.clone()] } else { vec![since.clone(), delivered.clone()] };
        let rows: Vec<(i64, i64)> = db
            .query(&db.dialect().sql(&sql), &params)?
            .iter()
            .map(|r| Ok((r.int(0)?, r.int(1)?)))
            .collect::<Result<_, DbError>>()?;
        series.push((rows, field));
    }
    for (rows, field) in series {
        for (day, count) in rows {
            if let Some(slot) = out.get_mut((day - first) as usize) {
                *field(slot) += count;
            }
        }
    }
    Ok(out)
}

/// Why an order is on the console's "needs a human" list.
pub mod reason {
    /// Paid, training or delivering, with no change for longer than the console's threshold.
    pub const STUCK: &str = "stuck";
    pub const FAILED: &str = "failed";
    /// A payment issue asks for a refund and nobody has resolved it yet.
    pub const REFUND: &str = "refund";
    /// WhatsApp did not take its portraits within the sender's horizon: resend when it does.
    pub const DELIVERY_FAILED: &str = "delivery_failed";
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Attention {
    pub order_id: String,
    pub wa_id: String,
    pub pack_id: String,
    pub status: String,
    /// The order's last change (ms since the epoch).
    pub since: i64,
    pub reason: &'static str,
    pub detail: String,
}

/// Orders that need a human, most urgent kind first (refunds, failures, then stuck orders):
/// paid/training/delivering orders unchanged since `stuck_before`, orders failed since
/// `failed_since`, and orders with an open refund issue. An order appears once, under its
/// first reason.
pub fn needing_attention<D: Db + ?Sized>(
    db: &D,
    stuck_before: i64,
    failed_since: i64,
    limit: i64,
) -> Result<Vec<Attention>, DbError> {
    let mut out: Vec<Attention> = Vec::new();
    let mut push = |row: &crate::Row, reason: &'static str, detail: String| -> Result<(), DbError> {
        let order_id = row.text(0)?;
        if !out.iter().any(|a| a.order_id == order_id) {
            out.push(Attention {
                order_id,
                wa_id: row.text(1)?,
                pack_id: row.text(2)?,
                status: row.text(3)?,
                since: row.int(4)?,
                reason,
                detail,
            });
        }
        Ok(())
    };
    // First: these wait for an operator's Resend, whatever became of their refund.
    let undelivered = db.query(
        &db.dialect().sql(
            "SELECT id, wa_id, pack_id, status, updated_at FROM orders WHERE status = $1
             ORDER BY updated_at LIMIT $2",
        ),
        &[Value::from(status_str(OrderStatus::DeliveryFailed)), Value::Int(limit)],
    )?;
    for r in &undelivered {
        push(r, reason::DELIVERY_FAILED, "WhatsApp did not take every portrait: resend once it does".into())?;
    }
    let refunds = db.query(
        &db.dialect().sql(
            "SELECT o.id, o.wa_id, o.pack_id, o.status, o.updated_at, p.detail FROM payment_issues p
             JOIN orders o ON o.id = p.order_id
             WHERE p.resolved_at IS NULL AND p.kind = 'needs_refund' ORDER BY p.created_at LIMIT $1",
        ),
        &[Value::Int(limit)],
    )?;
    for r in &refunds {
        push(r, reason::REFUND, r.text(5)?)?;
    }
    let failed = db.query(
        &db.dialect().sql(
            "SELECT id, wa_id, pack_id, status, updated_at FROM orders WHERE status = $1 AND updated_at >= $2
             ORDER BY updated_at DESC LIMIT $3",
        ),
        &[Value::from(status_str(OrderStatus::Failed)), Value::Int(failed_since), Value::Int(limit)],
    )?;
    for r in &failed {
        push(r, reason::FAILED, "the order failed".into())?;
    }
    let stuck = db.query(
        &db.dialect().sql(
            "SELECT id, wa_id, pack_id, status, updated_at FROM orders WHERE status IN ($1, $2, $3) AND updated_at < $4
             ORDER BY updated_at LIMIT $5",
        ),
        &[
            Value::from(status_str(OrderStatus::Paid)),
            Value::from(status_str(OrderStatus::Training)),
            Value::from(status_str(OrderStatus::Delivering)),
            Value::Int(stuck_before),
            Value::Int(limit),
        ],
    )?;
    for r in &stuck {
        let status = r.text(3)?;
        push(r, reason::STUCK, format!("{status} with no change since then"))?;
    }
    out.truncate(limit.max(0) as usize);
    Ok(out)
}

/// One order as the console shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OrderView {
    pub id: String,
    pub wa_id: String,
    pub pack_id: String,
    pub status: String,
    pub price_minor: i64,
    pub currency: String,
    pub paid_minor: Option<i64>,
    pub checkout_session_id: Option<String>,
    pub astria_tune_id: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub paid_at: Option<i64>,
    pub training_started_at: Option<i64>,
    pub photos: i64,
    pub images: i64,
}

/// One outbox event about an order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EventView {
    pub id: String,
    pub channel: String,
    pub event_type: String,
    pub status: String,
    pub attempts: i64,
    pub created_at: i64,
    pub completed_at: Option<i64>,
    pub last_error: Option<String>,
}

/// An order, the messages the app sent its customer (newest `limit`, oldest first), the
/// customer's conversation state, and the events that carried the order's work.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OrderStory {
    pub order: OrderView,
    /// The contact's conversation state (JSON), as the state machine keeps it.
    pub conversation: Option<String>,
    pub messages: Vec<OutboundMessage>,
    pub events: Vec<EventView>,
}

/// The order `order_id` and what happened to it; `None` if there is no such order.
pub fn order_story<D: Db + ?Sized>(db: &D, order_id: &str, limit: i64) -> Result<Option<OrderStory>, DbError> {
    let rows = db.query(
        &db.dialect().sql(
            "SELECT id, wa_id, pack_id, status, price_minor, currency, paid_minor, checkout_session_id, astria_tune_id,
                    created_at, updated_at, paid_at, training_started_at,
                    (SELECT COUNT(*) FROM order_photos p WHERE p.order_id = orders.id),
                    (SELECT COUNT(*) FROM generated_images g WHERE g.order_id = orders.id)
             FROM orders WHERE id = $1",
        ),
        &[Value::from(order_id)],
    )?;
    let Some(r) = rows.first() else { return Ok(None) };
    let order = OrderView {
        id: r.text(0)?,
        wa_id: r.text(1)?,
        pack_id: r.text(2)?,
        status: r.text(3)?,
        price_minor: r.int(4)?,
        currency: r.text(5)?,
        paid_minor: r.opt_int(6)?,
        checkout_session_id: r.opt_text(7)?,
        astria_tune_id: r.opt_int(8)?,
        created_at: r.int(9)?,
        updated_at: r.int(10)?,
        paid_at: r.opt_int(11)?,
        training_started_at: r.opt_int(12)?,
        photos: r.int(13)?,
        images: r.int(14)?,
    };
    let conversation = db
        .query(
            &db.dialect().sql("SELECT conversation FROM contacts WHERE wa_id = $1"),
            &[Value::from(order.wa_id.as_str())],
        )?
        .first()
        .map(|r| r.text(0))
        .transpose()?;
    let messages = messages::latest_for_contact(db, &order.wa_id, limit)?;
    // An event's order is the one its payload names (outbox.rs keeps it in `order_id`).
    let events = db
        .query(
            &db.dialect().sql(
                "SELECT id, channel, event_type, status, attempts, created_at, completed_at, last_error FROM outbox
                 WHERE order_id = $1 ORDER BY created_at LIMIT $2",
            ),
            &[Value::from(order_id), Value::Int(limit)],
        )?
        .iter()
        .map(|r| {
            Ok(EventView {
                id: r.text(0)?,
                channel: r.text(1)?,
                event_type: r.text(2)?,
                status: r.text(3)?,
                attempts: r.int(4)?,
                created_at: r.int(5)?,
                completed_at: r.opt_int(6)?,
                last_error: r.opt_text(7)?,
            })
        })
        .collect::<Result<_, DbError>>()?;
    Ok(Some(OrderStory { order, conversation, messages, events }))
}

/// Records that an operator resolved an open payment issue, with their note. `false` if there
/// is no such issue or it was resolved already (the first resolution stands).
/// Opens a resolved payment issue again (its refund failed at Stripe after all), saying why.
pub fn reopen_payment_issue<D: Db + ?Sized>(db: &D, event_id: &str, why: &str) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE payment_issues SET resolved_at = NULL, resolution = NULL, detail = detail || $1
             WHERE event_id = $2 AND resolved_at IS NOT NULL",
        ),
        &[Value::from(format!("; {why}")), Value::from(event_id)],
    )?;
    Ok(n == 1)
}

pub fn resolve_payment_issue<D: Db + ?Sized>(db: &D, event_id: &str, note: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "UPDATE payment_issues SET resolved_at = $1, resolution = $2 WHERE event_id = $3 AND resolved_at IS NULL",
        ),
        &[Value::Int(now_ms), Value::from(note), Value::from(event_id)],
    )?;
    Ok(n == 1)
}
