//! The weekly cleanup: what the bot stops keeping, and when. Data kept forever is a liability
//! (phone numbers, selfie references, payment links), so each kind of record has a retention.
//!
//! Rules, all relative to the run's `now`:
//! - processed webhook ids older than `webhook_ids` (Meta retries for days, Stripe for three);
//! - completed outbox events and their claims older than `events`; dead letters older than
//!   `dead_letters` (time for an operator to review and replay), and webhooks the conversation
//!   worker set aside in the inbox as long;
//! - orders abandoned before payment (collecting photos or awaiting payment, untouched for
//!   `abandoned_orders`) become `expired`; photo references of expired and cancelled orders
//!   untouched for `abandoned_orders`, and of delivered orders older than `delivered_photos`,
//!   are removed;
//! - sent and failed outbound messages older than `messages`; generated image URLs older than
//!   `generated_images` (Astria deletes the images after 30 days), but not while their message
//!   is held after STOP (the relay gives those up first, `held_give_up_days`, and flags the
//!   refund);
//! - contacts who opted out and have no open order, untouched for `opted_out_contacts`: their
//!   messages and unpaid orders go, and the contact too unless a paid order (a financial
//!   record) still names it, in which case only its name and conversation are erased.
//!
//! Paid orders not yet delivered (`paid`, `training`, `delivering`) are never touched. Every
//! rule works in batches of `batch` rows, each batch its own short statement, so a run never
//! holds the database for long; a rule is repeated until a batch comes back short. Running the
//! cleanup twice in a row removes nothing the second time.
//!
//! One run at a time: [`acquire_lease`] on the `job_leases` row `cleanup`; a crashed run's lease
//! expires by itself.

use crate::{Db, DbError, Value};

const DAY_MS: i64 = 24 * 60 * 60 * 1000;

/// Retention periods in days.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub webhook_ids: i64,
    pub events: i64,
    pub dead_letters: i64,
    pub abandoned_orders: i64,
    pub delivered_photos: i64,
    pub messages: i64,
    pub opted_out_contacts: i64,
    /// Astria deletes generated images 30 days after training; their URLs are dead after.
    pub generated_images: i64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            webhook_ids: 30,
            events: 14,
            dead_letters: 90,
            abandoned_orders: 7,
            delivered_photos: 7,
            messages: 30,
            opted_out_contacts: 30,
            generated_images: 30,
        }
    }
}

/// What one run removed or changed, per rule.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Report {
    pub processed_webhooks: u64,
    pub outbox_events: u64,
    pub event_claims: u64,
    pub dead_letters: u64,
    pub inbox_set_aside: u64,
    pub orders_expired: u64,
    pub photos_removed: u64,
    pub messages_removed: u64,
    pub contacts_removed: u64,
    pub contacts_erased: u64,
    pub orders_removed: u64,
    pub send_leases: u64,
    pub generated_images: u64,
}

impl Report {
    /// True when the run changed nothing.
    pub fn is_empty(&self) -> bool {
        self == &Report::default()
    }
}

/// Takes the lease on job `name` until `now + lease_ms`; `false` while another run holds it.
pub fn acquire_lease<D: Db + ?Sized>(
    db: &D,
    name: &str,
    holder: &str,
    now_ms: i64,
    lease_ms: i64,
) -> Result<bool, DbError> {
    crate::lease::acquire(db, crate::lease::Kind::Job, name, holder, now_ms, lease_ms)
}

pub fn release_lease<D: Db + ?Sized>(db: &D, name: &str, holder: &str) -> Result<(), DbError> {
    crate::lease::release(db, crate::lease::Kind::Job, name, holder)
}

/// Statuses an order can no longer leave, and those with money taken.
const UNPAID_FINAL: &str = "('expired', 'cancelled')";
const OPEN: &str = "('collecting_photos', 'awaiting_payment', 'paid', 'training', 'delivering')";
const PAID_RECORD: &str = "('paid', 'training', 'delivering', 'delivered', 'failed')";
/// The conversation state of an erased contact (the conversation reads it as idle).
pub const ERASED: &str = r#"{"state":"erased"}"#;

/// Repeats `sql` (which must affect at most `batch` rows, bound as the last parameter) until a
/// batch comes back short; answers the total.
fn in_batches<D: Db + ?Sized>(db: &D, sql: &str, params: &[Value], batch: i64) -> Result<u64, DbError> {
    let sql = db.dialect().sql(sql);
    let mut all = params.to_vec();
    all.push(Value::Int(batch));
    let mut total = 0;
    loop {
        let n = db.execute(&sql, &all)?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}

/// Runs every rule once, on the app's database `db` and the inbox's (`inbox`: on SQLite a
/// database of its own, on PostgreSQL the same). Call while holding the lease.
pub fn run<D: Db + ?Sized, I: Db + ?Sized>(
    db: &D,
    inbox: &I,
    now_ms: i64,
    keep: &Retention,
    batch: i64,
) -> Result<Report, DbError> {
    let before = |days: i64| Value::Int(now_ms - days * DAY_MS);
    let batch = batch.max(1);
    let mut r = Report::default();

    r.processed_webhooks = in_batches(
        db,
        "DELETE FROM processed_webhooks WHERE (source, external_id) IN
            (SELECT source, external_id FROM processed_webhooks WHERE received_at < $1 LIMIT $2)",
        &[before(keep.webhook_ids)],
        batch,
    )?;

    // Claims first: they are found through their event.
    r.event_claims = in_batches(
        db,
        "DELETE FROM event_claims WHERE (event_id, consumer) IN
            (SELECT c.event_id, c.consumer FROM event_claims c JOIN outbox o ON o.id = c.event_id
             WHERE o.status = 'done' AND o.completed_at < $1 LIMIT $2)",
        &[before(keep.events)],
        batch,
    )?;
    r.outbox_events = in_batches(
        db,
        "DELETE FROM outbox WHERE id IN
            (SELECT id FROM outbox WHERE status = 'done' AND completed_at < $1 LIMIT $2)",
        &[before(keep.events)],
        batch,
    )?;
    r.dead_letters = in_batches(
        db,
        "DELETE FROM outbox WHERE id IN
            (SELECT id FROM outbox WHERE status = 'dead' AND created_at < $1 LIMIT $2)",
        &[before(keep.dead_letters)],
        batch,
    )?;
    // Webhooks the conversation worker set aside are the inbox's dead letters: kept as long.
    r.inbox_set_aside = in_batches(
        inbox,
        "DELETE FROM inbox WHERE id IN
            (SELECT id FROM inbox WHERE set_aside_at IS NOT NULL AND set_aside_at < $1 LIMIT $2)",
        &[before(keep.dead_letters)],
        batch,
    )?;

    r.orders_expired = in_batches(
        db,
        // `updated_at` keeps meaning "last activity", so the photo rule below sees these too.
        "UPDATE orders SET status = 'expired' WHERE id IN
            (SELECT id FROM orders WHERE status IN ('collecting_photos', 'awaiting_payment')
             AND updated_at < $1 LIMIT $2)",
        &[before(keep.abandoned_orders)],
        batch,
    )?;
    r.photos_removed = in_batches(
        db,
        &format!(
            "DELETE FROM order_photos WHERE (order_id, sha256) IN
                (SELECT p.order_id, p.sha256 FROM order_photos p JOIN orders o ON o.id = p.order_id
                 WHERE (o.status IN {UNPAID_FINAL} AND o.updated_at < $1)
                    OR (o.status = 'delivered' AND o.updated_at < $2)
                 LIMIT $3)"
        ),
        &[before(keep.abandoned_orders), before(keep.delivered_photos)],
        batch,
    )?;

    r.messages_removed = in_batches(
        db,
        "DELETE FROM outbound_messages WHERE id IN
            (SELECT id FROM outbound_messages WHERE status IN ('sent', 'failed') AND updated_at < $1 LIMIT $2)",
        &[before(keep.messages)],
        batch,
    )?;

    // Opted-out contacts with no open order, quiet for long enough. Not while portraits are
    // kept back for them (`held`): those wait for START or for the relay to give up on them and
    // flag the refund (`held_give_up_days`); deleting them here would lose a paid order quietly.
    let gone = format!(
        "SELECT c.wa_id FROM contacts c WHERE c.opted_out = 1 AND c.updated_at < $1
         AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.wa_id = c.wa_id AND o.status IN {OPEN})
         AND NOT EXISTS (SELECT 1 FROM outbound_messages h WHERE h.wa_id = c.wa_id AND h.status = 'held')"
    );
    let contact_cutoff = before(keep.opted_out_contacts);
    r.messages_removed += in_batches(
        db,
        &format!("DELETE FROM outbound_messages WHERE id IN (SELECT id FROM outbound_messages WHERE wa_id IN ({gone}) LIMIT $2)"),
        &[contact_cutoff.clone()],
        batch,
    )?;
    r.photos_removed += in_batches(
        db,
        &format!(
            "DELETE FROM order_photos WHERE (order_id, sha256) IN
                (SELECT p.order_id, p.sha256 FROM order_photos p JOIN orders o ON o.id = p.order_id
                 WHERE o.wa_id IN ({gone}) LIMIT $2)"
        ),
        &[contact_cutoff.clone()],
        batch,
    )?;
    r.orders_removed = in_batches(
        db,
        &format!(
            "DELETE FROM orders WHERE id IN
                (SELECT id FROM orders WHERE status IN {UNPAID_FINAL} AND wa_id IN ({gone}) LIMIT $2)"
        ),
        &[contact_cutoff.clone()],
        batch,
    )?;
    r.contacts_removed = in_batches(
        db,
        &format!(
            "DELETE FROM contacts WHERE wa_id IN
                (SELECT wa_id FROM ({gone}) g WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.wa_id = g.wa_id) LIMIT $2)"
        ),
        &[contact_cutoff.clone()],
        batch,
    )?;
    // Those a paid order still names keep only their number; `erased` marks them done.
    r.contacts_erased = in_batches(
        db,
        &format!(
            "UPDATE contacts SET profile_name = NULL, conversation = '{ERASED}' WHERE wa_id IN
                (SELECT g.wa_id FROM ({gone}) g JOIN contacts k ON k.wa_id = g.wa_id
                 WHERE k.conversation <> '{ERASED}'
                 AND EXISTS (SELECT 1 FROM orders o WHERE o.wa_id = g.wa_id AND o.status IN {PAID_RECORD}) LIMIT $2)"
        ),
        &[contact_cutoff],
        batch,
    )?;

    r.generated_images = in_batches(
        db,
        // Not while its message is held after STOP: the relay needs the link to the order to
        // flag the refund when it gives the message up.
        "DELETE FROM generated_images WHERE (order_id, url) IN
            (SELECT order_id, url FROM generated_images g WHERE created_at < $1
             AND NOT EXISTS (SELECT 1 FROM outbound_messages m WHERE m.id = g.message_id AND m.status = 'held')
             LIMIT $2)",
        &[before(keep.generated_images)],
        batch,
    )?;

    r.send_leases = in_batches(
        db,
        "DELETE FROM send_leases WHERE wa_id IN (SELECT wa_id FROM send_leases WHERE lease_until < $1 LIMIT $2)",
        &[before(1)],
        batch,
    )?;
    Ok(r)
}
