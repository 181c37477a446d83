//! message-sender: part of message-service. A Redis-trigger component on `astria.messages`
//! that delivers queued WhatsApp messages through the Cloud API, for every service (replies,
//! payment links, training news, images).
//!
//! A `message.send` event only says "this contact has mail", and only for a message the app
//! stored itself (`spin_kit::messages::queue`): an event naming no stored message is ignored,
//! and the recipient is always the stored one. The sender takes the contact's
//! lease (one sender per contact, whatever the number of replicas, so messages arrive in
//! order), then works through the contact's queue, booking each answer in the database
//! (`astria_store::messages`):
//! - accepted → `sent`, with WhatsApp's id for the status webhooks;
//! - rate limits, transient codes, no connection → retried with a backoff capped at 180 retry
//!   bases (15 minutes by default) for a horizon of 17,280 bases from when the message was
//!   queued (24 hours by default: WhatsApp outages of hours happen); the message's outbox event
//!   is made due at the retry time with the relay's attempts started over, so the relay brings
//!   it back for as long as the sender keeps trying. Later messages wait behind it;
//! - an answer that leaves it open whether WhatsApp took the message (a 5xx, a 2xx without an
//!   id, a timeout after the request left) → not sent again at once: every send carries our
//!   message id as `biz_opaque_callback_data`, and a status webhook carrying it marks the message
//!   sent (message-service). Only if none comes within `whatsapp_unconfirmed_wait_ms` is it
//!   sent again, so a slow Graph API no longer doubles portraits (it still can, past that bound);
//! - 131047 or a last inbound message older than 24 hours → the message waits for the window,
//!   the contact gets the configured template once, and the webhook requeues the message when
//!   they write again;
//! - 131026, 190 and other permanent errors, or the horizon passed → `failed`, logged as errors.
//!   A failed portrait makes its order `delivery_failed` with the refund flagged (and, with
//!   `auto_refund`, asked for); an operator can resend it from the console;
//! - 131053 for an image (too large, over 5 MB) → the same link again, as a document (which
//!   then carries the portrait).
//!
//! An order is delivered when WhatsApp has accepted every portrait: the sender booking the last
//! one (or the status webhook confirming it) marks the order delivered and queues the closing
//! text, which this same pass sends after it.
//!
//! Images to one person are paced (`whatsapp_pace_ms` apart, WhatsApp's pair rate limit), and a
//! 131056 is retried after that pace; short waits happen inside the handler, long ones through
//! the relay.

use std::time::Duration;

use astria_domain::config::{self, ExposeSecret, WhatsApp};
use astria_domain::conversation::Message;
use astria_domain::events::{channels, MESSAGE_SEND};
use astria_domain::texts::Texts;
use astria_domain::whatsapp::send::{self, Recipient, SendOutcome};
use astria_models::MessageSend;
use astria_store::identity;
use astria_store::messages::{self, OutboundMessage};
use astria_store::{outbox, transaction, Db, DbError};
use spin_kit::db::SpinDb;
use spin_kit::events::now_ms;
use spin_kit::http_client::{self, HttpError};
use spin_kit::{log, SpinVars};
use spin_sdk::redis_component;

/// How long one sender may hold a contact's queue without renewing (config.rs keeps
/// `whatsapp_timeout_ms` within half of it).
const LEASE_MS: i64 = config::SENDER_LEASE_MS;
/// A lease taken this recently is not renewed before a send (see `drain_leased`).
const RENEW_AFTER_MS: i64 = 1_000;
/// Messages sent per contact per event, so one handler invocation stays short.
const MAX_PER_PASS: usize = 20;
/// Longest wait the sender spends inside one event rather than leaving it to the relay.
const INLINE_WAIT_MS: i64 = 10_000;
/// Passes over one contact's queue per event; anything left is due for the relay.
const MAX_ROUNDS: usize = 5;
/// How the booking of a send whose answer was lost begins (`last_error`).
const UNCONFIRMED: &str = "unconfirmed";
/// WhatsApp's customer service window.
const WINDOW_MS: i64 = 24 * 60 * 60 * 1000;

#[redis_component]
fn on_message(payload: bytes::Bytes) -> anyhow::Result<()> {
    spin_kit::trace::Invocation::message("message-sender", channels::MESSAGES, &payload).run(|| consume(&payload))
}

/// One message of the channel, inside its trace.
fn consume(payload: &[u8]) -> anyhow::Result<()> {
    let Some(event) = spin_kit::events::parse_or_drop(&payload, "sender") else { return Ok(()) };
    if spin_kit::heartbeat::is_heartbeat(&event) {
        let db = spin_kit::open_db().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        return Ok(spin_kit::heartbeat::book(&db, &event, channels::MESSAGES)?);
    }
    if event.event_type != MESSAGE_SEND {
        log::warn("sender", &format!("ignoring event type {} on the messages channel", event.event_type));
        return Ok(());
    }
    let send: MessageSend = match serde_json::from_str(&event.payload) {
        Ok(s) => s,
        Err(e) => {
            log::warn("sender", &format!("dropping message.send {} with an unreadable payload: {e}", event.id));
            return Ok(());
        }
    };
    let cfg = config::sender(&SpinVars)?;
    let db = spin_kit::open_db().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    // Only what this app queued is ever sent: the event names a stored message, and the
    // recipient is the stored one. Anyone able to publish on Redis could otherwise message any
    // number with any text from the business account.
    let Some(stored) = messages::get(&db, &send.message_id)? else {
        log::warn(
            "sender",
            &format!("ignoring message.send {}: message {} was never queued by this app", event.id, send.message_id),
        );
        return Ok(());
    };
    let sender = Sender {
        db: &db,
        cfg: &cfg.whatsapp,
        retry_base_ms: cfg.retry_base_ms,
        pace_ms: cfg.pace_ms,
        unconfirmed_wait_ms: cfg.unconfirmed_wait_ms,
        timeout: cfg.timeout,
        texts: &cfg.texts,
        auto_refund: cfg.auto_refund,
        last_sent: std::cell::Cell::new(None),
        correlation_id: &event.correlation_id,
        woken_by: &event.id,
    };
    sender.drain(&stored.wa_id)?;
    Ok(())
}

struct Sender<'a> {
    db: &'a SpinDb,
    cfg: &'a WhatsApp,
    retry_base_ms: i64,
    /// How long to wait for a status webhook after an unconfirmed send before sending again.
    unconfirmed_wait_ms: i64,
    /// Timeout of one call to the Graph API.
    timeout: Duration,
    /// Least time between two images to one person (WhatsApp's pair rate limit).
    pace_ms: i64,
    texts: &'a Texts,
    auto_refund: bool,
    /// When this contact last had a message accepted, once known: read only when a paced
    /// message is next (a text needs no pace), then kept as this pass sends.
    last_sent: std::cell::Cell<Option<Option<i64>>>,
    correlation_id: &'a str,
    /// The event this invocation handles (perhaps a later message's, waiting behind the head).
    woken_by: &'a str,
}

impl Sender<'_> {
    /// Sends the contact's queue in order while holding its lease.
    ///
    /// A sender that finds the lease taken leaves at once, trusting the holder to reach its
    /// message. So the holder looks at the queue again after releasing: a message committed
    /// while it held the lease (whose own sender just left) is then seen, and sent.
    fn drain(&self, wa_id: &str) -> Result<(), DbError> {
        let holder = uuid::Uuid::new_v4().to_string();
        for _ in 0..MAX_ROUNDS {
            if !messages::acquire_lease(self.db, wa_id, &holder, now_ms(), LEASE_MS)? {
                // Another sender is working through this queue and will look again when done.
                return Ok(());
            }
            let result = self.drain_leased(wa_id, &holder, now_ms());
            if let Err(e) = messages::release_lease(self.db, wa_id, &holder) {
                log::warn("sender", &format!("lease left to expire: {e}"));
            }
            result?;
            match messages::next_in_queue(self.db, wa_id)? {
                Some(m) if m.next_attempt_at <= now_ms() => continue,
                // Empty, or waiting for a retry the relay brings back.
                _ => return Ok(()),
            }
        }
        Ok(())
    }

    /// Sends up to `MAX_PER_PASS` messages of the queue; the lease was taken at `leased_at`.
    fn drain_leased(&self, wa_id: &str, holder: &str, leased_at: i64) -> Result<(), DbError> {
        let mut leased_at = leased_at;
        for _ in 0..MAX_PER_PASS {
            // The head and whether anything is behind it: when nothing is, the pass ends after
            // the head without reading the queue again (the look after the lease is given
            // back, in `drain`, finds whatever was queued meanwhile).
            let head = messages::queue_head(self.db, wa_id, 2)?;
            let Some(m) = head.first().cloned() else { return Ok(()) };
            let last = head.len() == 1;
            let wait = m.next_attempt_at - now_ms();
            // A send waiting for its status webhook is never waited for here, however short
            // the wait: the status comes through the inbox, whose worker may run in this very
            // process, one Redis message at a time (Spin's trigger), so it could not be applied
            // while this handler slept, and the message would go twice.
            let for_status = wait > 0 && m.last_error.as_deref().is_some_and(|e| e.starts_with(UNCONFIRMED));
            if wait > INLINE_WAIT_MS || for_status {
                // Waiting long for its retry, holding back the messages after it: the relay
                // brings the event back then. So does the event that woke us, if it is a later
                // message's: neither may die in the dead letters while the head is retried
                // (that would leave the queue with nothing to wake it).
                outbox::retry_at(self.db, &m.event_id, m.next_attempt_at)?;
                if self.woken_by != m.event_id {
                    outbox::retry_at(self.db, self.woken_by, m.next_attempt_at)?;
                }
                return Ok(());
            }
            // A short wait (a pair-limit retry, the pace between images) is cheaper here than
            // a round through the relay.
            let pace_wait = match is_paced(&m) {
                true => self.last_sent(wa_id)?.map_or(0, |last| last + self.pace_ms - now_ms()),
                false => 0,
            };
            let wait = wait.max(pace_wait);
            if wait > 0 {
                std::thread::sleep(Duration::from_millis(wait as u64));
            }
            // Renew the lease before each send, so that it outlasts the call; but not for a
            // send right after taking it (no wait, under RENEW_AFTER_MS ago), where renewing
            // would only cost a write for a lease that has almost all of LEASE_MS left.
            if wait > 0 || now_ms() - leased_at > RENEW_AFTER_MS {
                if !messages::acquire_lease(self.db, wa_id, holder, now_ms(), LEASE_MS)? {
                    return Ok(()); // Our lease lapsed and someone else took over.
                }
                leased_at = now_ms();
            }
            // After a wait, read it again: a status webhook may have confirmed an unconfirmed
            // send meanwhile (then it is sent, and must not go again).
            let m = match wait > 0 {
                true => match messages::get(self.db, &m.id)?.filter(|m| m.status == messages::status::QUEUED) {
                    Some(fresh) => fresh,
                    None => continue,
                },
                false => m,
            };
            if !self.send_one(&m)? {
                // Rescheduled: the next round looks at its retry time.
                continue;
            }
            if last {
                return Ok(());
            }
        }
        Ok(())
    }

    /// When the contact last had a message accepted (read once per pass, then kept).
    fn last_sent(&self, wa_id: &str) -> Result<Option<i64>, DbError> {
        if let Some(known) = self.last_sent.get() {
            return Ok(known);
        }
        let read = messages::last_sent_at(self.db, wa_id)?;
        self.last_sent.set(Some(read));
        Ok(read)
    }

    /// [`Self::deliver`] in a span of the trace that queued the message: whichever sender
    /// invocation holds the contact's lease sends it, often not the one its event woke. The
    /// message's row keeps that trace's `traceparent`, so no read of its event is needed.
    fn send_one(&self, m: &OutboundMessage) -> Result<bool, DbError> {
        let queued_by = m.traceparent.as_deref();
        spin_kit::trace::in_span_under(queued_by, "deliver message", spin_kit::trace::Kind::Internal, || {
            spin_kit::trace::attr("astria.message_id", m.id.as_str());
            spin_kit::trace::attr("astria.message_kind", m.kind.as_str());
            self.deliver(m)
        })
    }

    /// Sends one message and books the answer; `false` when the queue must wait (retry).
    fn deliver(&self, m: &OutboundMessage) -> Result<bool, DbError> {
        let message: Message = match serde_json::from_str(&m.message) {
            Ok(msg) => msg,
            Err(e) => {
                self.book(m, SendOutcome::Rejected { code: None, detail: format!("unreadable message: {e}") })?;
                return Ok(true);
            }
        };
        // What the send needs of the contact, in one read.
        let facts = identity::send_facts(self.db, &m.wa_id)?;
        // STOP means nothing more is sent (but the STOP's own confirmation): the message is
        // kept back, and goes out if the contact sends START.
        if !m.always_send && facts.as_ref().is_some_and(|f| f.opted_out) {
            transaction(self.db, |db| {
                messages::hold(db, &m.id, now_ms())?;
                outbox::complete(db, &m.event_id, now_ms())
            })?;
            log::info_with("sender", self.correlation_id, &format!("message {} held: the contact opted out", m.id));
            return Ok(true);
        }
        let window_closed = !matches!(message, Message::Template { .. })
            && facts.as_ref().and_then(|f| f.last_inbound_at).is_some_and(|t| now_ms() - t > WINDOW_MS);
        let to = facts.and_then(|f| f.recipient).map(into_recipient);
        let outcome = if window_closed { SendOutcome::OutsideWindow } else { self.send_to_contact(m, &message, to)? };
        self.book(m, outcome)
    }

    /// Sends to whatever the contact is known by now (a number change since the message was
    /// queued is followed): the phone number when known, else the BSUID. WhatsApp refuses a
    /// BSUID for some kinds of message (131062): then the phone number, if one is known by
    /// now, else the message fails with that reason.
    fn send_to_contact(
        &self,
        m: &OutboundMessage,
        message: &Message,
        to: Option<Recipient>,
    ) -> Result<SendOutcome, DbError> {
        let Some(to) = to else {
            return Ok(SendOutcome::Rejected {
                code: None,
                detail: "the contact has no phone number or user id to send to".into(),
            });
        };
        let outcome = self.call(&m.id, &to, message);
        let bsuid_refused =
            matches!(outcome, SendOutcome::Rejected { code: Some(send::codes::BSUID_NOT_SUPPORTED), .. });
        if !(bsuid_refused && matches!(to, Recipient::User(_))) {
            return Ok(outcome);
        }
        Ok(match recipient(self.db, &m.wa_id)? {
            Some(phone @ Recipient::Phone(_)) => self.call(&m.id, &phone, message),
            _ => SendOutcome::Rejected {
                code: Some(send::codes::BSUID_NOT_SUPPORTED),
                detail: "WhatsApp takes no user id (BSUID) as the recipient of this kind of message (131062), \
                         and the customer shares no phone number"
                    .into(),
            },
        })
    }

    fn call(&self, id: &str, to: &Recipient, message: &Message) -> SendOutcome {
        let body = send::request_body(to, message, &self.cfg.template, id).to_string();
        let auth = format!("Bearer {}", self.cfg.access_token.expose_secret());
        let url = self.cfg.messages_url();
        let request = http_client::Request {
            method: "POST",
            url: &url,
            headers: &[("authorization", &auth), ("content-type", "application/json")],
            body: body.as_bytes(),
            timeout: self.timeout,
            max_response: 256 * 1024,
        };
        match http_client::send(&request) {
            Ok(r) => send::classify(r.status, &r.body),
            Err(e @ HttpError::Refused(_)) | Err(e @ HttpError::TooLarge(_)) => {
                SendOutcome::Rejected { code: None, detail: e.to_string() }
            }
            // The request may have reached WhatsApp before the answer was lost.
            Err(e @ HttpError::Timeout) | Err(e @ HttpError::Other(_)) => {
                SendOutcome::Unconfirmed { detail: e.to_string() }
            }
            // Never connected: nothing left.
            Err(e) => SendOutcome::Retry { code: None, detail: e.to_string(), min_delay_ms: 0 },
        }
    }

    /// Records what happened to `m`, in one transaction with its event's completion.
    fn book(&self, m: &OutboundMessage, outcome: SendOutcome) -> Result<bool, DbError> {
        let now = now_ms();
        transaction(self.db, |db| {
            let go_on = match outcome {
                SendOutcome::Sent { wamid } => {
                    messages::mark_sent(db, &m.id, &wamid, now)?;
                    outbox::complete(db, &m.event_id, now)?;
                    self.last_sent.set(Some(Some(now)));
                    // The last portrait accepted delivers the order; the closing text it
                    // queues is next in this contact's queue (no publish needed). Only an
                    // image or a document carries a portrait.
                    let portrait = match is_media(m) {
                        true => messages::portrait_order(db, &m.id)?,
                        false => None,
                    };
                    if let Some(order_id) = portrait {
                        let done = &self.texts.delivered_offer_more;
                        let mut queued = vec![];
                        spin_kit::images::finish_if_complete(
                            db,
                            &order_id,
                            &m.wa_id,
                            done,
                            self.correlation_id,
                            &mut queued,
                        )?;
                    }
                    true
                }
                SendOutcome::Retry { code, detail, min_delay_ms } => {
                    // The pair limit asks for the pace this deployment is configured with.
                    let floor = if code == Some(send::codes::PAIR_LIMIT) { self.pace_ms } else { min_delay_ms };
                    self.retry_or_give_up(db, m, code, &detail, floor, now)?
                }
                SendOutcome::Unconfirmed { detail } => {
                    // Perhaps sent: not again before the wait for a status webhook with our id,
                    // which marks it sent meanwhile (the retry then finds nothing to send).
                    let detail = format!("{UNCONFIRMED}, waiting for a status webhook: {detail}");
                    self.retry_or_give_up(db, m, None, &detail, self.unconfirmed_wait_ms, now)?
                }
                SendOutcome::Rejected { code: Some(send::codes::MEDIA_UPLOAD), detail } if as_document(m).is_some() => {
                    // Too large (or unusable) as an image: the same link goes as a document,
                    // which carries the portrait from now on (the order waits for it).
                    let detail = format!("{detail}; resent as a document");
                    let code = Some(send::codes::MEDIA_UPLOAD);
                    spin_kit::messages::fail(db, m, code, &detail, self.correlation_id, now)?;
                    if let Some(doc) = as_document(m) {
                        let doc_id = uuid::Uuid::new_v4().to_string();
                        let pending =
                            spin_kit::messages::queue_as(db, &doc_id, &m.wa_id, &doc, 0, self.correlation_id)?;
                        messages::move_portrait(db, &m.id, &doc_id)?;
                        outbox::due_at(db, &pending.id, now)?;
                    }
                    true
                }
                SendOutcome::Rejected { code, detail } => {
                    self.fail(db, m, code, &detail, now)?;
                    true
                }
                SendOutcome::OutsideWindow => {
                    messages::mark_awaiting_window(db, &m.id, Some(send::codes::OUTSIDE_WINDOW), now)?;
                    outbox::complete(db, &m.event_id, now)?;
                    let since = messages::last_inbound_at(db, &m.wa_id)?.unwrap_or(0);
                    if !messages::template_since(db, &m.wa_id, since)? {
                        // Queued behind everything else: this same pass sends it next.
                        let invite = Message::Template { parameters: vec![] };
                        let pending = spin_kit::messages::queue(db, &m.wa_id, &invite, 0, self.correlation_id)?;
                        outbox::due_at(db, &pending.id, now)?;
                    }
                    true
                }
            };
            Ok(go_on)
        })
    }

    /// Schedules another try no sooner than `floor_ms` (backing off per attempt), or gives the
    /// message up once its horizon, counted from when it was queued, has passed; `false` when
    /// the queue must wait for the retry.
    fn retry_or_give_up<D: Db + ?Sized>(
        &self,
        db: &D,
        m: &OutboundMessage,
        code: Option<i64>,
        detail: &str,
        floor_ms: i64,
        now: i64,
    ) -> Result<bool, DbError> {
        let horizon = send::horizon_ms(self.retry_base_ms);
        if now - m.queued_at >= horizon {
            let tries = m.attempts + 1;
            let detail = format!("gave up after {tries} tries over {} s: {detail}", (now - m.queued_at) / 1000);
            self.fail(db, m, code, &detail, now)?;
            return Ok(true);
        }
        let at = now + send::retry_delay_ms(self.retry_base_ms, m.attempts + 1, floor_ms);
        messages::schedule_retry(db, &m.id, code, detail, at, now)?;
        outbox::retry_at(db, &m.event_id, at)?;
        log::warn("sender", &format!("message {} will be retried in {} ms: {detail}", m.id, at - now));
        Ok(false)
    }

    /// Gives `m` up (`spin_kit::messages::give_up`: a portrait's order becomes
    /// `delivery_failed`, its refund flagged; the refund's event waits in the outbox for the
    /// relay, this worker has no Redis to publish it on).
    fn fail<D: Db + ?Sized>(
        &self,
        db: &D,
        m: &OutboundMessage,
        code: Option<i64>,
        detail: &str,
        now: i64,
    ) -> Result<(), DbError> {
        spin_kit::messages::give_up(db, m, code, detail, self.auto_refund, self.correlation_id, now)?;
        Ok(())
    }
}

/// Where the contact `key`'s messages go now (`astria_store::identity::recipient`).
fn recipient(db: &SpinDb, key: &str) -> Result<Option<Recipient>, DbError> {
    Ok(identity::recipient(db, key)?.map(into_recipient))
}

fn into_recipient(r: identity::Recipient) -> Recipient {
    match r {
        identity::Recipient::Phone(p) => Recipient::Phone(p),
        identity::Recipient::User(u) => Recipient::User(u),
    }
}

fn is_paced(m: &OutboundMessage) -> bool {
    serde_json::from_str::<Message>(&m.message).map(|msg| msg.is_paced()).unwrap_or(false)
}

/// Whether `m` is an image or a document (what a portrait goes as). An unreadable message is
/// counted as one: the portrait's read then decides, as it did for every message.
fn is_media(m: &OutboundMessage) -> bool {
    serde_json::from_str::<Message>(&m.message).map(|msg| msg.is_media()).unwrap_or(true)
}

fn as_document(m: &OutboundMessage) -> Option<Message> {
    serde_json::from_str::<Message>(&m.message).ok().and_then(|msg| msg.image_as_document())
}
