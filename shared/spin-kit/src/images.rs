//! The one path by which generated images reach a customer, whichever way Astria's news
//! arrives (a prompt callback, or the prompt list fetched after the tune callback, or later a
//! reconciliation poll): record the prompt, queue each image not seen before for the sender,
//! and when every prompt of a trained tune is done *and WhatsApp accepted every portrait*, mark
//! the order delivered and tell the customer. The last of those two to happen decides: the
//! trainer recording the last prompt, or the sender (or a status webhook) confirming the last
//! portrait, each calling [`finish_if_complete`] under the order's lock. Call inside one
//! transaction; publish the answer after commit.

use astria_domain::astria::Prompt;
use astria_domain::conversation::Message;
use astria_models::{Order, OrderStatus};
use astria_store::Db;
use astria_store::{images, repo, DbError};

use crate::events::{now_ms, Pending};

/// What one report changed.
#[derive(Debug, Default)]
pub struct Delivered {
    pub new_images: usize,
    pub order_delivered: bool,
    pub pending: Vec<Pending>,
}

/// Records `prompt` for `order` and queues its new images.
pub fn record_prompt<D: Db + ?Sized>(
    db: &D,
    order: &Order,
    prompt: &Prompt,
    done_text: &str,
    correlation_id: &str,
) -> Result<Delivered, DbError> {
    let now = now_ms();
    let mut out = Delivered::default();
    // Concurrent callbacks for the last prompts must not both conclude "not complete yet".
    repo::lock_order(db, &order.id)?;
    images::record_prompt(db, &order.id, prompt.id, prompt.images.len() as i64, prompt.is_done(), now)?;
    for url in &prompt.images {
        let message = Message::Image { link: url.clone(), caption: None };
        // The message id is chosen before the insert decides; only a new image is queued, under
        // that id, so that the image row names its message (and the message its order).
        let message_id = uuid::Uuid::new_v4().to_string();
        if images::add_image(db, &order.id, url, prompt.id, &message_id, now)? {
            let p = crate::messages::queue_as(db, &message_id, &order.wa_id, &message, out.new_images, correlation_id)?;
            out.pending.push(p);
            out.new_images += 1;
        }
    }
    if out.new_images > 0 && order.status == OrderStatus::Training {
        repo::set_order_status(db, &order.id, OrderStatus::Training, OrderStatus::Delivering, now)?;
    }
    out.order_delivered = finish_if_complete(db, &order.id, &order.wa_id, done_text, correlation_id, &mut out.pending)?;
    Ok(out)
}

/// Marks the order delivered and queues `done_text` once Astria is done with every prompt and
/// WhatsApp accepted every portrait; `true` if this call did it. Takes the order's lock, so
/// the trainer and the sender finishing at once cannot both conclude "not yet".
pub fn finish_if_complete<D: Db + ?Sized>(
    db: &D,
    order_id: &str,
    wa_id: &str,
    done_text: &str,
    correlation_id: &str,
    pending: &mut Vec<Pending>,
) -> Result<bool, DbError> {
    repo::lock_order(db, order_id)?;
    if !images::progress(db, order_id)?.delivered() {
        return Ok(false);
    }
    let now = now_ms();
    // From training (a pack whose prompts produced nothing new here), from delivering, or
    // from delivery_failed (an operator's resend got the last portraits through).
    let moved = repo::set_order_status(db, order_id, OrderStatus::Delivering, OrderStatus::Delivered, now)?
        || repo::set_order_status(db, order_id, OrderStatus::DeliveryFailed, OrderStatus::Delivered, now)?
        || (repo::set_order_status(db, order_id, OrderStatus::Training, OrderStatus::Delivering, now)?
            && repo::set_order_status(db, order_id, OrderStatus::Delivering, OrderStatus::Delivered, now)?);
    if moved {
        // Every portrait is accepted: this goes after the last of them.
        pending.push(crate::messages::queue(db, wa_id, &Message::text(done_text), 999, correlation_id)?);
    }
    Ok(moved)
}
