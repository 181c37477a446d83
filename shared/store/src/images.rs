//! An order's way through Astria: its tune, the prompts Astria reported, and the generated
//! images, each recorded once. Callbacks and reconciliation both write through here, so an
//! image arriving twice (a repeated callback, a callback after a poll) is delivered once.

use astria_models::OrderStatus;

use crate::repo::status_str;
use crate::{Db, DbError, Value};

/// The order's sync generation (see [`begin_sync`]); `None` for an unknown order.
pub fn sync_generation<D: Db + ?Sized>(db: &D, order_id: &str) -> Result<Option<i64>, DbError> {
    let rows =
        db.query(&db.dialect().sql("SELECT sync_generation FROM orders WHERE id = $1"), &[Value::from(order_id)])?;
    rows.first().map(|r| r.int(0)).transpose()
}

/// A trainer is about to ask Astria about the order: callbacks from now on bring news it may
/// not see, so they make a new signal. Until then every callback for the order is the same one
/// (the callback's event id carries the generation), which bounds the outbox rows and the
/// Astria calls a replayed callback can cause.
pub fn begin_sync<D: Db + ?Sized>(db: &D, order_id: &str) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql("UPDATE orders SET sync_generation = sync_generation + 1 WHERE id = $1"),
        &[Value::from(order_id)],
    )?;
    Ok(())
}

/// Stores the tune and moves the order from paid to training; `false` if it was not paid (a
/// duplicate delivery already did it).
pub fn start_training<D: Db + ?Sized>(db: &D, order_id: &str, tune_id: u64, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect()
            .sql("UPDATE orders SET astria_tune_id = $1, status = $2, updated_at = $3, training_started_at = $3, reconcile_attempts = 0, reconcile_next_at = NULL WHERE id = $4 AND status = $5"),
        &[
            Value::Int(tune_id as i64),
            Value::from(status_str(OrderStatus::Training)),
            Value::Int(now_ms),
            Value::from(order_id),
            Value::from(status_str(OrderStatus::Paid)),
        ],
    )?;
    Ok(n == 1)
}

/// Notes that Astria finished training; `false` if already noted.
pub fn mark_trained<D: Db + ?Sized>(db: &D, order_id: &str, now_ms: i64) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql("UPDATE orders SET tune_trained_at = $1 WHERE id = $2 AND tune_trained_at IS NULL"),
        &[Value::Int(now_ms), Value::from(order_id)],
    )?;
    Ok(n == 1)
}

/// How many prompts the tune has, once known (from Astria's prompt list).
pub fn set_prompts_expected<D: Db + ?Sized>(db: &D, order_id: &str, n: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql(
            "UPDATE orders SET prompts_expected = $1 WHERE id = $2 AND (prompts_expected IS NULL OR prompts_expected < $1)",
        ),
        &[Value::Int(n), Value::from(order_id)],
    )?;
    Ok(())
}

/// Records what Astria reported about one prompt; counts only grow.
pub fn record_prompt<D: Db + ?Sized>(
    db: &D,
    order_id: &str,
    prompt_id: u64,
    image_count: i64,
    done: bool,
    now_ms: i64,
) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql(
            "INSERT INTO astria_prompts (order_id, prompt_id, image_count, done, received_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (order_id, prompt_id) DO UPDATE SET
                image_count = CASE WHEN excluded.image_count > astria_prompts.image_count
                                   THEN excluded.image_count ELSE astria_prompts.image_count END,
                done = CASE WHEN excluded.done > astria_prompts.done THEN excluded.done ELSE astria_prompts.done END",
        ),
        &[Value::from(order_id), Value::Int(prompt_id as i64), Value::Int(image_count), Value::Int(done.into()), Value::Int(now_ms)],
    )?;
    Ok(())
}

/// Records a generated image; `true` if it is new (deliver it), `false` if already known.
pub fn add_image<D: Db + ?Sized>(
    db: &D,
    order_id: &str,
    url: &str,
    prompt_id: u64,
    message_id: &str,
    now_ms: i64,
) -> Result<bool, DbError> {
    let n = db.execute(
        &db.dialect().sql(
            "INSERT INTO generated_images (order_id, url, prompt_id, message_id, created_at) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (order_id, url) DO NOTHING",
        ),
        &[Value::from(order_id), Value::from(url), Value::Int(prompt_id as i64), Value::from(message_id), Value::Int(now_ms)],
    )?;
    Ok(n == 1)
}

/// Where an order stands with Astria.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    pub trained: bool,
    pub prompts_expected: Option<i64>,
    pub prompts_done: i64,
    pub images: i64,
    /// Portraits whose message WhatsApp has not yet accepted (queued, retrying, unconfirmed,
    /// waiting for the window or START, or failed).
    pub unconfirmed: i64,
}

impl Progress {
    /// Training finished, the prompt count is known, and every prompt has finished.
    pub fn complete(&self) -> bool {
        self.trained && self.prompts_expected.is_some_and(|n| self.prompts_done >= n)
    }

    /// Astria is done and WhatsApp accepted every portrait: the order is delivered.
    pub fn delivered(&self) -> bool {
        self.complete() && self.unconfirmed == 0
    }
}

pub fn progress<D: Db + ?Sized>(db: &D, order_id: &str) -> Result<Progress, DbError> {
    let rows = db.query(
        &db.dialect().sql(
            "SELECT o.tune_trained_at, o.prompts_expected,
                    (SELECT COUNT(*) FROM astria_prompts p WHERE p.order_id = o.id AND p.done = 1),
                    (SELECT COUNT(*) FROM generated_images g WHERE g.order_id = o.id),
                    (SELECT COUNT(*) FROM generated_images g JOIN outbound_messages m ON m.id = g.message_id
                     WHERE g.order_id = o.id AND m.status <> $2)
             FROM orders o WHERE o.id = $1",
        ),
        &[Value::from(order_id), Value::from(crate::messages::status::SENT)],
    )?;
    let Some(r) = rows.first() else { return Ok(Progress::default()) };
    Ok(Progress {
        trained: r.opt_int(0)?.is_some(),
        prompts_expected: r.opt_int(1)?,
        prompts_done: r.int(2)?,
        images: r.int(3)?,
        unconfirmed: r.int(4)?,
    })
}

/// The order's generated image URLs in the order they arrived (tests and operators).
pub fn image_urls<D: Db + ?Sized>(db: &D, order_id: &str) -> Result<Vec<String>, DbError> {
    db.query(
        &db.dialect().sql("SELECT url FROM generated_images WHERE order_id = $1 ORDER BY created_at, prompt_id, url"),
        &[Value::from(order_id)],
    )?
    .iter()
    .map(|r| r.text(0))
    .collect()
}

/// An order whose tune Astria may have finished without telling us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    pub order_id: String,
    pub wa_id: String,
    pub tune_id: u64,
    pub attempts: i64,
}

const IN_TRAINING: &str = "('training', 'delivering')";
/// Astria trained the tune and finished every prompt: the order waits only for WhatsApp (the
/// sender's own horizon decides), not for Astria, so neither reconciliation nor its give-up
/// point concern it.
const ASTRIA_DONE: &str = "(tune_trained_at IS NOT NULL AND prompts_expected IS NOT NULL
     AND (SELECT COUNT(*) FROM astria_prompts p WHERE p.order_id = orders.id AND p.done = 1) >= prompts_expected)";

fn stale_rows<D: Db + ?Sized>(db: &D, filter: &str, params: &[Value]) -> Result<Vec<Stale>, DbError> {
    db.query(
        &db.dialect().sql(&format!(
            "SELECT id, wa_id, astria_tune_id, reconcile_attempts FROM orders
             WHERE status IN {IN_TRAINING} AND astria_tune_id IS NOT NULL AND NOT {ASTRIA_DONE} AND {filter}"
        )),
        params,
    )?
    .iter()
    .map(|r| Ok(Stale { order_id: r.text(0)?, wa_id: r.text(1)?, tune_id: r.int(2)? as u64, attempts: r.int(3)? }))
    .collect()
}

/// Orders in training since before `started_before` whose next reconciliation is due, oldest
/// first, at most `limit`.
pub fn due_for_reconcile<D: Db + ?Sized>(
    db: &D,
    now_ms: i64,
    started_before: i64,
    limit: i64,
) -> Result<Vec<Stale>, DbError> {
    stale_rows(
        db,
        "training_started_at < $1 AND (reconcile_next_at IS NULL OR reconcile_next_at <= $2)
         ORDER BY training_started_at LIMIT $3",
        &[Value::Int(started_before), Value::Int(now_ms), Value::Int(limit)],
    )
}

/// Orders still not delivered although training started before `started_before`: the give-up
/// point.
pub fn past_give_up<D: Db + ?Sized>(db: &D, started_before: i64, limit: i64) -> Result<Vec<Stale>, DbError> {
    stale_rows(
        db,
        "training_started_at < $1 ORDER BY training_started_at LIMIT $2",
        &[Value::Int(started_before), Value::Int(limit)],
    )
}

/// A paid order whose training has not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StalePaid {
    pub order_id: String,
    pub wa_id: String,
    pub attempts: i64,
}

/// `paid_at` is missing on orders a pod of a release before migration 9 marked paid during a
/// rolling deploy: their last change (the payment) stands in for it.
fn stale_paid_rows<D: Db + ?Sized>(db: &D, filter: &str, params: &[Value]) -> Result<Vec<StalePaid>, DbError> {
    db.query(
        &db.dialect()
            .sql(&format!("SELECT id, wa_id, reconcile_attempts FROM orders WHERE status = 'paid' AND {filter}")),
        params,
    )?
    .iter()
    .map(|r| Ok(StalePaid { order_id: r.text(0)?, wa_id: r.text(1)?, attempts: r.int(2)? }))
    .collect()
}

/// Orders paid before `paid_before` whose training has not started and whose next nudge is
/// due, oldest first, at most `limit`: their `order.paid` may have died (dead letters, a long
/// Astria or media outage, a consumer that was down).
pub fn paid_not_training<D: Db + ?Sized>(
    db: &D,
    now_ms: i64,
    paid_before: i64,
    limit: i64,
) -> Result<Vec<StalePaid>, DbError> {
    stale_paid_rows(
        db,
        "COALESCE(paid_at, updated_at) < $1 AND (reconcile_next_at IS NULL OR reconcile_next_at <= $2)
         ORDER BY COALESCE(paid_at, updated_at) LIMIT $3",
        &[Value::Int(paid_before), Value::Int(now_ms), Value::Int(limit)],
    )
}

/// Paid orders still not training although paid before `paid_before`: the give-up point.
pub fn paid_past_give_up<D: Db + ?Sized>(db: &D, paid_before: i64, limit: i64) -> Result<Vec<StalePaid>, DbError> {
    stale_paid_rows(
        db,
        "COALESCE(paid_at, updated_at) < $1 ORDER BY COALESCE(paid_at, updated_at) LIMIT $2",
        &[Value::Int(paid_before), Value::Int(limit)],
    )
}

/// Books one reconciliation request and when the next may be made.
pub fn schedule_reconcile<D: Db + ?Sized>(db: &D, order_id: &str, next_at: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect()
            .sql("UPDATE orders SET reconcile_attempts = reconcile_attempts + 1, reconcile_next_at = $1 WHERE id = $2"),
        &[Value::Int(next_at), Value::from(order_id)],
    )?;
    Ok(())
}

/// Stops the delivery of an order's portraits (its payment is disputed): every portrait not
/// yet sent fails with `reason`, and its send event is completed, so nothing of the order goes
/// out any more and nothing waits in the outbox for it. Answers how many messages it stopped.
pub fn stop_delivery<D: Db + ?Sized>(db: &D, order_id: &str, reason: &str, now_ms: i64) -> Result<u64, DbError> {
    use crate::messages::status as m;
    let unsent = "SELECT id FROM outbound_messages WHERE status IN ($3, $4, $5)
                  AND id IN (SELECT message_id FROM generated_images WHERE order_id = $2)";
    db.execute(
        &db.dialect().sql(&format!(
            "UPDATE outbox SET status = $1, completed_at = $6
             WHERE id IN (SELECT event_id FROM outbound_messages WHERE id IN ({unsent}))"
        )),
        &[
            Value::from(crate::outbox::status::DONE),
            Value::from(order_id),
            Value::from(m::QUEUED),
            Value::from(m::AWAITING_WINDOW),
            Value::from(m::HELD),
            Value::Int(now_ms),
        ],
    )?;
    db.execute(
        &db.dialect().sql(&format!(
            "UPDATE outbound_messages SET status = $1, last_error = $6, updated_at = $7 WHERE id IN ({unsent})"
        )),
        &[
            Value::from(m::FAILED),
            Value::from(order_id),
            Value::from(m::QUEUED),
            Value::from(m::AWAITING_WINDOW),
            Value::from(m::HELD),
            Value::from(reason),
            Value::Int(now_ms),
        ],
    )
}
