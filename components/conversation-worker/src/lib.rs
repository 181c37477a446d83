//! conversation-worker: part of message-service. A Redis-trigger component on `astria.inbox`
//! that works the webhook inbox through: for every signed body the webhook stored, in arrival
//! order, each message's conversation step (dedupe, state change, replies and outbox in one
//! transaction), each delivery status and preference (`spin_kit::inbound`).
//!
//! A wake-up says only "the inbox has rows"; what is done comes from the inbox. One replica
//! drains at a time (`spin_kit::inbox`, the `inbox` job lease), so a contact's messages are
//! stepped in order however many replicas run; the relay sends a wake-up while rows wait
//! (Redis was down when the webhook stored them, a worker died), so none is left behind.

use astria_domain::config::{self, ExposeSecret};
use astria_domain::events::{channels, INBOX_WAKE};
use spin_kit::{log, SpinVars};
use spin_sdk::redis_component;

#[redis_component]
fn on_message(payload: bytes::Bytes) -> anyhow::Result<()> {
    spin_kit::trace::Invocation::message("conversation-worker", channels::INBOX, &payload).run(|| consume(&payload))
}

/// One message of the channel, inside its trace.
fn consume(payload: &[u8]) -> anyhow::Result<()> {
    let Some(event) = spin_kit::events::parse_or_drop(payload, "inbox") else { return Ok(()) };
    let db = spin_kit::open_db().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    if spin_kit::heartbeat::is_heartbeat(&event) {
        return Ok(spin_kit::heartbeat::book(&db, &event, channels::INBOX)?);
    }
    if event.event_type != INBOX_WAKE {
        log::warn("inbox", &format!("ignoring event type {} on the inbox channel", event.event_type));
        return Ok(());
    }
    let phone_number_id = config::phone_number_id(&SpinVars);
    let cfg = config::message_service(&SpinVars)?;
    let redis_url = config::redis_url(&SpinVars)?;
    let holder = uuid::Uuid::new_v4().to_string();
    let settings = spin_kit::inbox::Settings {
        phone_number_id: &phone_number_id,
        packs: &cfg.packs,
        conversation: &cfg.conversation,
        holder: &holder,
    };
    let inbox = spin_kit::open_inbox(&db).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let drained = spin_kit::inbox::drain(&db, &*inbox, &settings, |db, pending| {
        spin_kit::events::publish(db, redis_url.expose_secret(), pending);
    })
    .map_err(|e| anyhow::anyhow!("draining the inbox: {e:?}"))?;
    if drained.more {
        // The pass reached its time bound: the rest goes on in a fresh invocation (this one's or
        // another replica's), so this process's other messages are not held back meanwhile.
        if let Err(e) = spin_kit::inbox::wake(redis_url.expose_secret(), &event.correlation_id) {
            log::warn("inbox", &format!("could not hand on the rest of the inbox, left to the relay: {e}"));
        }
    }
    if drained.rows > 0 || drained.set_aside > 0 {
        log::info_with("inbox", &event.correlation_id, &format!("{drained:?}"));
    }
    Ok(())
}
