//! Working a WhatsApp webhook through: each inbound message in its own transaction (dedupe on
//! the WhatsApp message id, one conversation step, its writes, and the replies queued with
//! their events), each delivery status, each preference. The conversation worker
//! (`components/conversation-worker`) runs this for every inbox row (`crate::inbox`); the
//! benchmark's native reference calls it too. Events are handed to `publish` right after each
//! commit; if Redis is down they wait in the outbox for the relay.

use anyhow::Context as _;
use astria_domain::conversation::{self, Action, Context, Message, OrderView, State};
use astria_domain::events::{channels, CHECKOUT_EXPIRE, ORDER_AWAITING_PAYMENT};
use astria_domain::whatsapp::send::{codes, status_rank};
use astria_domain::whatsapp::{DeliveryStatus, Identity, InboundMessage, StatusUpdate, Webhook};
use astria_domain::Money;
use astria_models::{CheckoutExpire, OrderAwaitingPayment, Pack};
use astria_store::identity::{self, Ids, Known, Recognised};
use astria_store::outbox::{self, RelayPolicy};
use astria_store::repo::{self, NewOrder};
use astria_store::{messages, transaction, Db, DbError};

use crate::error::ApiError;
use crate::events::{self, now_ms, Pending};
use crate::log;

/// Where WhatsApp dedupe ids are recorded (`processed_webhooks.source`).
const SOURCE: &str = "whatsapp";

/// What working one webhook through did.
#[derive(serde::Serialize, Default, Debug)]
pub struct Report {
    pub messages: usize,
    pub duplicates: usize,
    pub statuses: usize,
}

/// The work of a verified, parsed webhook, whatever the host: each message and each status in
/// its own transaction, and its events handed to `publish` right after that commit.
pub fn handle<D: Db>(
    db: &D,
    hook: &Webhook,
    packs: &[Pack],
    settings: &conversation::Config,
    request_id: &str,
    mut publish: impl FnMut(&D, &[Pending]),
) -> Result<Report, ApiError> {
    let mut report = Report::default();
    for m in &hook.messages {
        match handle_message(db, m, packs, settings, request_id)? {
            Some(pending) => {
                report.messages += 1;
                publish(db, &pending);
            }
            None => report.duplicates += 1,
        }
    }
    for s in &hook.statuses {
        let pending = handle_status(db, s, &settings.texts.delivered_offer_more, request_id)?;
        report.statuses += 1;
        publish(db, &pending);
    }
    for p in &hook.preferences {
        // The marketing opt-out from WhatsApp's chat menu: recorded for whoever sends
        // marketing; this bot sends none, and its STOP/START stays the customer's own word.
        if p.category == "marketing_messages" {
            transaction(db, |db| identity::set_marketing_opt_out(db, ids(&p.who), p.opted_out, now_ms()))?;
        }
    }
    Ok(report)
}

/// The store's view of an identity.
fn ids(id: &Identity) -> Ids<'_> {
    Ids { phone: id.phone.as_deref(), bsuid: id.bsuid.as_deref(), parent_bsuid: id.parent_bsuid.as_deref() }
}

/// Conflicting concurrent work: roll back and let Meta redeliver.
fn retry_later(detail: &str) -> ApiError {
    ApiError::Unavailable { dependency: "database", detail: detail.to_string() }
}

/// Two first messages of one person, one naming the phone and the other only the BSUID, can
/// race to record the same identifier: the loser is retried later (the inbox row stays) and
/// then finds the winner's contact.
fn recording_race(e: DbError) -> ApiError {
    match e {
        DbError::Conflict(_) => retry_later("another message of this person was being recorded"),
        other => other.into(),
    }
}

/// One inbound message; `None` if it was handled before.
fn handle_message(
    db: &impl Db,
    m: &InboundMessage,
    packs: &[Pack],
    settings: &conversation::Config,
    correlation_id: &str,
) -> Result<Option<Vec<Pending>>, ApiError> {
    let now = now_ms();
    transaction(db, |db| {
        // The window runs from the message's own time (Meta may deliver it late), never ahead.
        let sent_at = m.timestamp.saturating_mul(1000).clamp(0, now);
        // The dedupe on the WhatsApp message id, and the contact the sender's identifiers lead
        // to with what the step needs of it, in one statement where the database allows
        // (`identity::recognise_first`). The contact's row stays locked until commit
        // (PostgreSQL), so two messages from one person are stepped one after the other, each
        // seeing the other's effects. Mostly that read answers: a contact known by exactly
        // these identifiers, whose profile name and window are refreshed with the
        // conversation at the end, or a person new to us, recorded in one statement.
        // Otherwise (a new or moved identifier, a number change) `identify` records the
        // identifiers first.
        let delivery = identity::Delivery { source: SOURCE, external_id: &m.id, now_ms: now };
        let recognised = match &m.identity_change {
            None => identity::recognise_first(db, delivery, ids(&m.sender))?,
            Some(_) => repo::first_delivery(db, SOURCE, &m.id, now)?.then_some(Recognised::Other),
        };
        let Some(recognised) = recognised else { return Ok(None) };
        let known = match recognised {
            Recognised::Known(known) => known,
            Recognised::New => {
                identity::create(db, ids(&m.sender), m.profile_name.as_deref(), sent_at, now).map_err(recording_race)?
            }
            Recognised::Other => identify(db, m, sent_at, correlation_id, now)?,
        };
        let key = known.key.as_str();
        let state: State = serde_json::from_str(&known.conversation).unwrap_or_else(|e| {
            log::warn("webhook", &format!("unreadable conversation state reset to idle: {e}"));
            State::Idle
        });
        // The contact wrote: the 24-hour window is open again for messages that waited for it.
        let mut pending = match known.awaiting_window {
            true => crate::messages::requeue_awaiting_window(db, key, correlation_id)?,
            false => vec![],
        };

        let order = match &state {
            State::Order { order_id } => {
                crate::trace::set_order(order_id);
                repo::get_order(db, order_id)?.map(order_view).transpose()?
            }
            _ => None,
        };
        let new_order_id = uuid::Uuid::new_v4().to_string();
        let ctx = Context {
            packs,
            config: settings,
            opted_out: known.opted_out,
            order: order.as_ref(),
            new_order_id: &new_order_id,
        };
        let outcome = conversation::step(&ctx, &state, &m.inbound);

        let mut sent = 0;
        // The reply to STOP (its confirmation) is the one message an opted-out contact gets.
        let confirming_stop = outcome.actions.contains(&Action::SetOptOut(true));
        for action in outcome.actions {
            match action {
                Action::Send(message) => {
                    pending.push(match confirming_stop {
                        true => crate::messages::queue_always(db, key, &message, sent, correlation_id)?,
                        false => crate::messages::queue(db, key, &message, sent, correlation_id)?,
                    });
                    sent += 1;
                }
                Action::SetOptOut(true) => repo::set_opt_out(db, key, true, now)?,
                Action::SetOptOut(false) => {
                    // START: what was kept back since STOP (a paid order's portraits) goes out.
                    repo::set_opt_out(db, key, false, now)?;
                    pending.extend(crate::messages::release_held(db, key, correlation_id)?);
                }
                Action::CreateOrder { order_id, pack_id, subject_class, price } => {
                    crate::trace::set_order(&order_id);
                    let price = astria_models::Money::from(&price);
                    let new = NewOrder {
                        id: &order_id,
                        wa_id: key,
                        pack_id: &pack_id,
                        subject_class: &subject_class,
                        price: &price,
                    };
                    repo::create_order(db, &new, now)?;
                }
                Action::AddPhoto { order_id, photo } => {
                    // `false` means the same photo again: the conversation has said so already.
                    repo::add_photo(db, &order_id, &photo, now)?;
                }
                Action::SetStatus { order_id, from, to } => {
                    if !repo::set_order_status(db, &order_id, from, to, now)? {
                        return Err(retry_later("the order changed meanwhile"));
                    }
                }
                Action::ReopenOrder { from_order_id, order_id } => {
                    repo::reopen_order(db, &from_order_id, &order_id, now)?;
                }
                Action::OrderAwaitingPayment { order_id } => {
                    let event =
                        events::envelope(ORDER_AWAITING_PAYMENT, &OrderAwaitingPayment { order_id }, correlation_id);
                    pending.push(events::emit(db, channels::PAYMENTS, &event, &RelayPolicy::default())?);
                }
                Action::ExpireCheckout { order_id } => {
                    // In the transaction that cancelled the order: the session is expired even
                    // if Stripe or Redis is down right now (the relay brings the event back).
                    let event = events::envelope(CHECKOUT_EXPIRE, &CheckoutExpire { order_id }, correlation_id);
                    pending.push(events::emit(db, channels::PAYMENTS, &event, &RelayPolicy::default())?);
                }
            }
        }
        let state_json = serde_json::to_string(&outcome.state).context("serialising the conversation state")?;
        repo::save_conversation_seen(db, key, &state_json, m.profile_name.as_deref(), sent_at, now)?;
        Ok(Some(pending))
    })
}

/// Records the sender of `m` with every identifier the message carries (`identity::identify`,
/// then a number change's new identifiers), and reads what the step needs of the contact.
fn identify(db: &impl Db, m: &InboundMessage, sent_at: i64, correlation_id: &str, now: i64) -> Result<Known, ApiError> {
    let fresh_key = format!("contact-{}", uuid::Uuid::new_v4());
    let who = identity::identify(db, ids(&m.sender), m.profile_name.as_deref(), sent_at, &fresh_key, now)
        .map_err(recording_race)?;
    let key = who.key.as_str();
    if !who.merged.is_empty() {
        log::info_with("webhook", correlation_id, "two contacts of one person merged (same identifiers)");
    }
    // WhatsApp says the sender's number (and with it their BSUID) changed: what they are
    // known by moves, their orders and conversation stay.
    if let Some(new) = &m.identity_change {
        identity::attach(db, key, ids(new), identity::Merge::Never, now)?;
        log::info_with("webhook", correlation_id, "a contact's WhatsApp identifiers changed");
    }
    let (contact, conversation) =
        repo::get_contact(db, key)?.ok_or_else(|| anyhow::anyhow!("the contact just recorded is gone"))?;
    // Whether messages wait for the window is not worth a read here: this path is rare.
    Ok(Known { key: who.key, opted_out: contact.opted_out, conversation, awaiting_window: true })
}

fn order_view(o: astria_models::Order) -> Result<OrderView, DbError> {
    Ok(OrderView {
        price: Money::try_from(&o.price).map_err(|e| DbError::Decode(e.to_string()))?,
        photo_hashes: o.photos.into_iter().map(|p| p.sha256).collect(),
        id: o.id,
        pack_id: o.pack_id,
        status: o.status,
        checkout_url: o.checkout_url,
    })
}

/// A delivery status of one of our messages. A failure is logged for operators; one caused by
/// the closed 24-hour window puts the message back to wait for it and invites the contact back
/// with the template. A status confirming a portrait whose send was unconfirmed may be the one
/// that delivers its order (then `done_text` is queued).
fn handle_status(
    db: &impl Db,
    s: &StatusUpdate,
    done_text: &str,
    correlation_id: &str,
) -> Result<Vec<Pending>, ApiError> {
    let now = now_ms();
    let code = s.error_codes.first().copied();
    transaction(db, |db| {
        let newer = |old: Option<&str>, new: &str| old.and_then(status_rank) < status_rank(new);
        let status = s.status.as_str();
        let mut delivery = messages::record_delivery(db, &s.message_id, status, code, newer, now)?;
        // The closing text, if confirming this send delivered its order.
        let mut confirmed = vec![];
        // A wamid we never heard of: a send whose answer the sender never got (a timeout, a
        // 5xx). The status carries our message id as biz_opaque_callback_data, so it went out
        // after all: booked as sent, then the status applies as to any of our messages. The
        // message is matched by that id, whatever recipient fields the status carries (a send
        // to a BSUID comes back without a phone); a recipient that names another contact of
        // ours, though, is not this message's.
        if let (None, Some(id)) = (&delivery, s.callback_data.as_deref()) {
            let named = identity::find(db, ids(&s.recipient))?;
            if let Some(m) = messages::get(db, id)?
                .filter(|m| m.wamid.is_none() && named.as_deref().is_none_or(|key| key == m.wa_id))
            {
                if messages::mark_sent(db, &m.id, &s.message_id, now)? {
                    outbox::complete(db, &m.event_id, now)?;
                    log::info_with("webhook", correlation_id, &format!("message {id} confirmed sent by its status"));
                    delivery = messages::record_delivery(db, &s.message_id, status, code, newer, now)?;
                    if let Some(order_id) = messages::portrait_order(db, &m.id)? {
                        let mut queued = vec![];
                        crate::images::finish_if_complete(
                            db,
                            &order_id,
                            &m.wa_id,
                            done_text,
                            correlation_id,
                            &mut queued,
                        )?;
                        confirmed = queued;
                    }
                }
            }
        }
        let Some(delivery) = delivery else {
            return Ok(confirmed);
        };
        // Act on a failure once: a repeated, late or concurrent `failed` changes nothing (only
        // the webhook whose conditional update moved the status acts).
        if s.status != DeliveryStatus::Failed || !delivery.changed {
            return Ok(confirmed);
        }
        let m = delivery.message;
        log::error_with(
            "whatsapp.delivery",
            correlation_id,
            &format!("message {} ({}) failed with code {}", m.id, m.kind, code.unwrap_or(0)),
        );
        let mut pending = confirmed;
        // What was sent, as the domain's message (the stored JSON of one we queued).
        let sent: Option<Message> = serde_json::from_str(&m.message).ok();
        // An image WhatsApp could not use (over 5 MB): the same link again, as a document.
        if s.error_codes.contains(&codes::MEDIA_UPLOAD) {
            if let Some(doc) = sent.as_ref().and_then(Message::image_as_document) {
                pending.push(crate::messages::queue(db, &m.wa_id, &doc, 0, correlation_id)?);
            }
        }
        if s.error_codes.contains(&codes::OUTSIDE_WINDOW)
            && !matches!(sent, Some(Message::Template { .. }))
            && messages::reopen_for_window(db, &m.id, now)?
        {
            let since = messages::last_inbound_at(db, &m.wa_id)?.unwrap_or(0);
            if !messages::template_since(db, &m.wa_id, since)? {
                let invite = Message::Template { parameters: vec![] };
                pending.push(crate::messages::queue(db, &m.wa_id, &invite, 0, correlation_id)?);
            }
        }
        Ok(pending)
    })
}
