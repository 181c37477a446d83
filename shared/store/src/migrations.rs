//! Schema migrations for SQLite and PostgreSQL, applied at first use by whichever instance gets
//! there first, recorded in `schema_migrations`.
//!
//! Safe with several replicas starting at once: on PostgreSQL the whole check-and-apply runs in
//! one transaction holding an advisory lock; on SQLite `BEGIN IMMEDIATE` serialises writers.
//! Migrations are append-only: never edit one that has shipped, add the next version.

use crate::{transaction, Db, DbError, Dialect, Value};

/// One schema step: `sql` is portable; then `sqlite` or `postgres`, for the database at hand,
/// runs what the two dialects say differently (triggers, JSON); then `then`, portable again.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static [&'static str],
    pub sqlite: &'static [&'static str],
    pub postgres: &'static [&'static str],
    pub then: &'static [&'static str],
}

/// The rest of a migration that has no dialect-specific statements.
const PORTABLE: Migration = Migration { version: 0, name: "", sql: &[], sqlite: &[], postgres: &[], then: &[] };

/// Key of the PostgreSQL advisory lock that serialises migrations (any constant works, as long
/// as nothing else in the database uses it).
const MIGRATION_LOCK: i64 = 0x61_73_74_72_69_61; // "astria"

/// A delivered order's share of the payment-to-delivery histogram, as the SQLite triggers'
/// `UNION ALL` arms: its bucket and its time, each with `$sign` (`-` to take it out).
#[rustfmt::skip] // One WHEN per bucket, a line each.
macro_rules! delivered_deltas {
    ($row:literal, $sign:literal) => {
        concat!(
            " UNION ALL SELECT 'delivered_le:' || CASE ",
            "WHEN ", $row, ".updated_at - ", $row, ".paid_at <= 60000 THEN '60' ",
            "WHEN ", $row, ".updated_at - ", $row, ".paid_at <= 300000 THEN '300' ",
            "WHEN ", $row, ".updated_at - ", $row, ".paid_at <= 900000 THEN '900' ",
            "WHEN ", $row, ".updated_at - ", $row, ".paid_at <= 1800000 THEN '1800' ",
            "WHEN ", $row, ".updated_at - ", $row, ".paid_at <= 3600000 THEN '3600' ",
            "WHEN ", $row, ".updated_at - ", $row, ".paid_at <= 7200000 THEN '7200' ",
            "WHEN ", $row, ".updated_at - ", $row, ".paid_at <= 21600000 THEN '21600' ",
            "WHEN ", $row, ".updated_at - ", $row, ".paid_at <= 86400000 THEN '86400' ",
            "ELSE 'inf' END, ", $sign, "1 WHERE ", $row, ".status = 'delivered' AND ", $row, ".paid_at IS NOT NULL ",
            "UNION ALL SELECT 'delivered_ms', ", $sign, "(", $row, ".updated_at - ", $row, ".paid_at) ",
            "WHERE ", $row, ".status = 'delivered' AND ", $row, ".paid_at IS NOT NULL "
        )
    };
}

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "event outbox and consumer claims",
        sql: &[
            // Every event, written in the same transaction as the change that caused it.
            "CREATE TABLE outbox (
            id TEXT PRIMARY KEY,
            channel TEXT NOT NULL,
            event_type TEXT NOT NULL,
            envelope TEXT NOT NULL,
            correlation_id TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            status TEXT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            next_attempt_at BIGINT NOT NULL,
            completed_at BIGINT,
            last_error TEXT
        )",
            "CREATE INDEX outbox_due ON outbox (status, next_attempt_at)",
            // One row per (event, consumer) that acted: the primary key makes acting twice impossible.
            "CREATE TABLE event_claims (
            event_id TEXT NOT NULL,
            consumer TEXT NOT NULL,
            claimed_at BIGINT NOT NULL,
            PRIMARY KEY (event_id, consumer)
        )",
        ],
        ..PORTABLE
    },
    Migration {
        version: 2,
        name: "contacts, orders, photos, processed webhooks",
        sql: &[
            // `conversation` is the contact's conversation state as JSON (domain::conversation::State).
            "CREATE TABLE contacts (
            wa_id TEXT PRIMARY KEY,
            profile_name TEXT,
            opted_out BIGINT NOT NULL DEFAULT 0,
            last_inbound_at BIGINT,
            conversation TEXT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
            "CREATE TABLE orders (
            id TEXT PRIMARY KEY,
            wa_id TEXT NOT NULL REFERENCES contacts (wa_id),
            pack_id TEXT NOT NULL,
            subject_class TEXT,
            status TEXT NOT NULL,
            price_minor BIGINT NOT NULL,
            currency TEXT NOT NULL,
            paid_minor BIGINT,
            paid_currency TEXT,
            checkout_session_id TEXT,
            checkout_url TEXT,
            astria_tune_id BIGINT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
            "CREATE INDEX orders_by_contact ON orders (wa_id, created_at)",
            "CREATE INDEX orders_by_status ON orders (status, updated_at)",
            // Photos by reference only: the bytes stay at WhatsApp until training.
            "CREATE TABLE order_photos (
            order_id TEXT NOT NULL REFERENCES orders (id),
            sha256 TEXT NOT NULL,
            media_id TEXT NOT NULL,
            mime_type TEXT NOT NULL,
            position BIGINT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (order_id, sha256)
        )",
            // Ids of webhook deliveries already handled (WhatsApp message ids, Stripe event ids).
            "CREATE TABLE processed_webhooks (
            source TEXT NOT NULL,
            external_id TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            PRIMARY KEY (source, external_id)
        )",
        ],
        ..PORTABLE
    },
    Migration {
        version: 3,
        name: "outbound WhatsApp messages and per-contact send leases",
        sql: &[
            // Every message we send, queued in the transaction that decided it; the sender
            // works through a contact's queue in `seq` order (messages/mod docs).
            "CREATE TABLE outbound_messages (
            id TEXT PRIMARY KEY,
            wa_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL,
            status TEXT NOT NULL,
            event_id TEXT NOT NULL,
            correlation_id TEXT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            next_attempt_at BIGINT NOT NULL,
            wamid TEXT,
            delivery_status TEXT,
            error_code BIGINT,
            last_error TEXT,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            sent_at BIGINT
        )",
            "CREATE INDEX outbound_queue ON outbound_messages (wa_id, status, seq)",
            "CREATE UNIQUE INDEX outbound_by_wamid ON outbound_messages (wamid)",
            "CREATE INDEX outbound_by_status ON outbound_messages (status, updated_at)",
            // Who is sending to a contact right now: one sender per contact keeps messages in order.
            "CREATE TABLE send_leases (
            wa_id TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            lease_until BIGINT NOT NULL
        )",
        ],
        ..PORTABLE
    },
    Migration {
        version: 4,
        name: "payment issues for operators",
        sql: &[
            // Money that arrived and could not be accepted (refund), or events for unknown
            // orders: one row per Stripe event, until an operator resolves it.
            "CREATE TABLE payment_issues (
            event_id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            order_id TEXT,
            session_id TEXT,
            payment_intent TEXT,
            amount_minor BIGINT,
            currency TEXT,
            detail TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            resolved_at BIGINT
        )",
            "CREATE INDEX payment_issues_open ON payment_issues (resolved_at, created_at)",
        ],
        ..PORTABLE
    },
    Migration {
        version: 5,
        name: "job leases",
        sql: &[
            // One row per exclusive job (the weekly cleanup): who runs it, until when.
            "CREATE TABLE job_leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            lease_until BIGINT NOT NULL
        )",
        ],
        ..PORTABLE
    },
    Migration {
        version: 6,
        name: "Astria tunes, prompts and generated images",
        sql: &[
            // When Astria reported the tune trained, and how many prompts its pack has.
            "ALTER TABLE orders ADD COLUMN tune_trained_at BIGINT",
            "ALTER TABLE orders ADD COLUMN prompts_expected BIGINT",
            // Each prompt of an order's tune that Astria reported; `done` once it finished.
            "CREATE TABLE astria_prompts (
            order_id TEXT NOT NULL,
            prompt_id BIGINT NOT NULL,
            image_count BIGINT NOT NULL,
            done BIGINT NOT NULL,
            received_at BIGINT NOT NULL,
            PRIMARY KEY (order_id, prompt_id)
        )",
            // Each generated image, once: the primary key is what makes delivery exactly-once.
            "CREATE TABLE generated_images (
            order_id TEXT NOT NULL,
            url TEXT NOT NULL,
            prompt_id BIGINT NOT NULL,
            message_id TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            PRIMARY KEY (order_id, url)
        )",
        ],
        ..PORTABLE
    },
    Migration {
        version: 7,
        name: "reconciliation with Astria",
        sql: &[
            // When training started (the reconciliation's clock), and the reconciliation's backoff.
            "ALTER TABLE orders ADD COLUMN training_started_at BIGINT",
            "ALTER TABLE orders ADD COLUMN reconcile_attempts BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE orders ADD COLUMN reconcile_next_at BIGINT",
            "CREATE INDEX orders_in_training ON orders (status, training_started_at)",
        ],
        ..PORTABLE
    },
    Migration {
        version: 8,
        name: "deterministic Stripe Checkout requests",
        sql: &[
            // The Idempotency-Key generation of the order's session request, and the expires_at
            // it was first sent with: every retry of one key sends identical parameters.
            "ALTER TABLE orders ADD COLUMN checkout_generation BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE orders ADD COLUMN checkout_expires_at BIGINT",
        ],
        ..PORTABLE
    },
    Migration {
        version: 9,
        name: "paid orders are reconciled too",
        sql: &[
            // When the payment settled: the clock of a paid order whose training never started.
            "ALTER TABLE orders ADD COLUMN paid_at BIGINT",
            "UPDATE orders SET paid_at = updated_at WHERE paid_minor IS NOT NULL",
        ],
        ..PORTABLE
    },
    Migration {
        version: 10,
        name: "nothing is sent after STOP",
        sql: &[
            // The one message an opted-out contact still gets: the confirmation of their STOP.
            "ALTER TABLE outbound_messages ADD COLUMN always_send BIGINT NOT NULL DEFAULT 0",
        ],
        ..PORTABLE
    },
    Migration {
        version: 11,
        name: "the operator console",
        sql: &[
            // When the contact first wrote (the console's funnel counts new chats per day);
            // contacts from before this migration count from their last change.
            "ALTER TABLE contacts ADD COLUMN first_seen_at BIGINT",
            "UPDATE contacts SET first_seen_at = updated_at",
            // What the operator who resolved a payment issue wrote about it.
            "ALTER TABLE payment_issues ADD COLUMN resolution TEXT",
        ],
        ..PORTABLE
    },
    Migration {
        version: 12,
        name: "customers known by a username: phone, business-scoped user id, parent id",
        sql: &[
            // `wa_id` stays the contact's key (orders and messages refer to it); what WhatsApp
            // knows the person by moves to these columns, any of which may be absent (a
            // customer with a username may share no phone number).
            "ALTER TABLE contacts ADD COLUMN phone TEXT",
            "ALTER TABLE contacts ADD COLUMN bsuid TEXT",
            "ALTER TABLE contacts ADD COLUMN parent_bsuid TEXT",
            // The marketing opt-out WhatsApp offers in its chat menu (user_preferences).
            "ALTER TABLE contacts ADD COLUMN marketing_opt_out BIGINT NOT NULL DEFAULT 0",
            // Whether this release has recorded the identifiers: 0 on a row a pod of the
            // previous release adds during a rollout (keyed by its phone, `phone` not filled),
            // which lookups by phone also match (identity.rs). A row whose phone was taken by
            // a number change has 1 and no phone: nothing is sent to its old key.
            "ALTER TABLE contacts ADD COLUMN ids_known BIGINT NOT NULL DEFAULT 0",
            // Every contact so far was keyed by its phone number.
            "UPDATE contacts SET phone = wa_id, ids_known = 1",
            "CREATE UNIQUE INDEX contacts_by_phone ON contacts (phone)",
            "CREATE UNIQUE INDEX contacts_by_bsuid ON contacts (bsuid)",
            "CREATE INDEX contacts_by_parent_bsuid ON contacts (parent_bsuid)",
        ],
        ..PORTABLE
    },
    Migration {
        version: 13,
        name: "refunds without a human",
        sql: &[
            // The payment that paid the order: what a refund gives back. Orders paid before
            // this migration have none; the refund looks it up from their Checkout session.
            "ALTER TABLE orders ADD COLUMN payment_intent TEXT",
            "CREATE INDEX orders_by_payment ON orders (payment_intent)",
            // One row per payment given back (refunds.rs): asked for by the app for a payment
            // issue, or made by hand at Stripe and recorded from its webhook.
            "CREATE TABLE refunds (
            id TEXT PRIMARY KEY,
            issue_id TEXT,
            order_id TEXT,
            payment_intent TEXT,
            session_id TEXT,
            amount_minor BIGINT,
            currency TEXT,
            status TEXT NOT NULL,
            stripe_refund_id TEXT,
            attempts BIGINT NOT NULL DEFAULT 0,
            key_generation BIGINT NOT NULL DEFAULT 0,
            last_error TEXT,
            customer_told BIGINT NOT NULL DEFAULT 0,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL
        )",
            // One refund per payment, whatever asks for it.
            "CREATE UNIQUE INDEX refunds_by_payment ON refunds (payment_intent)",
            "CREATE INDEX refunds_by_status ON refunds (status, updated_at)",
            "CREATE INDEX refunds_by_stripe_id ON refunds (stripe_refund_id)",
        ],
        ..PORTABLE
    },
    Migration {
        version: 14,
        name: "portraits outlast WhatsApp outages",
        sql: &[
            // When the message last entered the queue (queued, requeued after the window or
            // START, resent from the console): the sender's retry horizon counts from here.
            "ALTER TABLE outbound_messages ADD COLUMN queued_at BIGINT",
            "UPDATE outbound_messages SET queued_at = created_at",
            // An order is delivered when every portrait's message is sent: found by message.
            "CREATE INDEX generated_images_by_message ON generated_images (message_id)",
            // Portraits recorded before their message was queued under the image's message id
            // (migration-free change of November 2026) name a message that does not exist:
            // link each to the image message that carried its link to the order's contact, so
            // that held_since, the delivered-portraits metric, the cleanup guards and the
            // delivery check above see them.
            "UPDATE generated_images SET message_id = (
                SELECT m.id FROM outbound_messages m JOIN orders o ON o.id = generated_images.order_id
                WHERE m.wa_id = o.wa_id AND m.kind = 'image' AND m.message LIKE '%' || generated_images.url || '%'
                ORDER BY m.created_at, m.id LIMIT 1)
             WHERE NOT EXISTS (SELECT 1 FROM outbound_messages m WHERE m.id = generated_images.message_id)
               AND EXISTS (
                SELECT 1 FROM outbound_messages m JOIN orders o ON o.id = generated_images.order_id
                WHERE m.wa_id = o.wa_id AND m.kind = 'image' AND m.message LIKE '%' || generated_images.url || '%')",
            // Bumped each time a trainer starts asking Astria about the order: callbacks that
            // arrive before the next bump are one signal (one outbox row), however many.
            "ALTER TABLE orders ADD COLUMN sync_generation BIGINT NOT NULL DEFAULT 0",
        ],
        ..PORTABLE
    },
    Migration {
        version: 15,
        name: "workers that cannot go deaf unnoticed",
        sql: &[
            // Each worker replica's last heartbeat per channel (heartbeats.rs).
            "CREATE TABLE worker_heartbeats (
            replica TEXT NOT NULL,
            channel TEXT NOT NULL,
            seen_at BIGINT NOT NULL,
            PRIMARY KEY (replica, channel)
        )",
        ],
        ..PORTABLE
    },
    Migration {
        version: 16,
        name: "the webhook's inbox",
        sql: &[
            // Signed WhatsApp webhook bodies waiting for the conversation worker (inbox.rs),
            // keyed by the body's SHA-256, deleted once worked through.
            "CREATE TABLE inbox (
            id TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            request_id TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            last_error TEXT,
            set_aside_at BIGINT
        )",
            "CREATE INDEX inbox_arrival ON inbox (received_at, id)",
        ],
        ..PORTABLE
    },
    Migration {
        version: 17,
        name: "operator reads that do not grow with history",
        sql: &[
            // The console's order page finds an order's events by this column (outbox.rs
            // fills it from the event's payload), not by a LIKE over every envelope.
            "ALTER TABLE outbox ADD COLUMN order_id TEXT",
            "CREATE INDEX outbox_by_order ON outbox (order_id, created_at)",
            // The console's funnel counts the last days by these columns.
            "CREATE INDEX contacts_by_first_seen ON contacts (first_seen_at)",
            "CREATE INDEX orders_by_created ON orders (created_at)",
            "CREATE INDEX orders_by_paid ON orders (paid_at)",
            "CREATE INDEX worker_heartbeats_by_seen ON worker_heartbeats (seen_at)",
            // The payment-issues page shows each open issue's refund.
            "CREATE INDEX refunds_by_issue ON refunds (issue_id)",
            // Counts over the whole history (orders by status, deliveries, portraits, refunds),
            // kept by the triggers below instead of counted at each scrape (tallies.rs). A
            // trigger only appends a delta: no row every writer updates, so no lock they
            // queue on; the relay folds the deltas into `tallies`.
            "CREATE TABLE tallies (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
            "CREATE TABLE tally_deltas (name TEXT NOT NULL, delta BIGINT NOT NULL)",
        ],
        sqlite: &[
            concat!(
                "CREATE TRIGGER orders_tally_insert AFTER INSERT ON orders BEGIN
                 INSERT INTO tally_deltas (name, delta) SELECT 'orders:' || NEW.status, 1 ",
                delivered_deltas!("NEW", ""),
                "; END"
            ),
            concat!(
                "CREATE TRIGGER orders_tally_update AFTER UPDATE OF status, paid_at, updated_at ON orders
                 WHEN OLD.status <> NEW.status OR ((OLD.status = 'delivered' OR NEW.status = 'delivered')
                      AND (OLD.updated_at IS NOT NEW.updated_at OR OLD.paid_at IS NOT NEW.paid_at)) BEGIN
                 INSERT INTO tally_deltas (name, delta)
                 SELECT 'orders:' || OLD.status, -1 WHERE OLD.status <> NEW.status
                 UNION ALL SELECT 'orders:' || NEW.status, 1 WHERE OLD.status <> NEW.status ",
                delivered_deltas!("OLD", "-"),
                delivered_deltas!("NEW", ""),
                "; END"
            ),
            concat!(
                "CREATE TRIGGER orders_tally_delete AFTER DELETE ON orders BEGIN
                 INSERT INTO tally_deltas (name, delta) SELECT 'orders:' || OLD.status, -1 ",
                delivered_deltas!("OLD", "-"),
                "; END"
            ),
            "CREATE TRIGGER refunds_tally_insert AFTER INSERT ON refunds BEGIN
             INSERT INTO tally_deltas (name, delta) VALUES ('refunds:' || NEW.status, 1); END",
            "CREATE TRIGGER refunds_tally_update AFTER UPDATE OF status ON refunds WHEN OLD.status <> NEW.status BEGIN
             INSERT INTO tally_deltas (name, delta) VALUES ('refunds:' || OLD.status, -1), ('refunds:' || NEW.status, 1); END",
            "CREATE TRIGGER refunds_tally_delete AFTER DELETE ON refunds BEGIN
             INSERT INTO tally_deltas (name, delta) VALUES ('refunds:' || OLD.status, -1); END",
            // A portrait is delivered when the message it names is sent: a change on either
            // side moves the count by the pairs it makes or breaks.
            "CREATE TRIGGER portraits_tally_message_insert AFTER INSERT ON outbound_messages WHEN NEW.status = 'sent' BEGIN
             INSERT INTO tally_deltas (name, delta) SELECT 'portraits_delivered', COUNT(*) FROM generated_images
             WHERE message_id = NEW.id HAVING COUNT(*) > 0; END",
            "CREATE TRIGGER portraits_tally_message_update AFTER UPDATE OF status ON outbound_messages
             WHEN (OLD.status = 'sent') <> (NEW.status = 'sent') BEGIN
             INSERT INTO tally_deltas (name, delta)
             SELECT 'portraits_delivered', CASE WHEN NEW.status = 'sent' THEN COUNT(*) ELSE -COUNT(*) END
             FROM generated_images WHERE message_id = NEW.id HAVING COUNT(*) > 0; END",
            "CREATE TRIGGER portraits_tally_message_delete AFTER DELETE ON outbound_messages WHEN OLD.status = 'sent' BEGIN
             INSERT INTO tally_deltas (name, delta) SELECT 'portraits_delivered', -COUNT(*) FROM generated_images
             WHERE message_id = OLD.id HAVING COUNT(*) > 0; END",
            "CREATE TRIGGER portraits_tally_image_insert AFTER INSERT ON generated_images BEGIN
             INSERT INTO tally_deltas (name, delta) SELECT 'portraits_delivered', 1 FROM outbound_messages
             WHERE id = NEW.message_id AND status = 'sent'; END",
            "CREATE TRIGGER portraits_tally_image_update AFTER UPDATE OF message_id ON generated_images BEGIN
             INSERT INTO tally_deltas (name, delta)
             SELECT 'portraits_delivered', -1 FROM outbound_messages WHERE id = OLD.message_id AND status = 'sent'
             UNION ALL SELECT 'portraits_delivered', 1 FROM outbound_messages WHERE id = NEW.message_id AND status = 'sent';
             END",
            "CREATE TRIGGER portraits_tally_image_delete AFTER DELETE ON generated_images BEGIN
             INSERT INTO tally_deltas (name, delta) SELECT 'portraits_delivered', -1 FROM outbound_messages
             WHERE id = OLD.message_id AND status = 'sent'; END",
            // Events written before this migration: their order, from the payload.
            "UPDATE outbox SET order_id = json_extract(json_extract(envelope, '$.payload'), '$.order_id')
             WHERE json_valid(envelope) AND json_valid(json_extract(envelope, '$.payload'))
               AND json_type(json_extract(envelope, '$.payload')) = 'object'",
        ],
        postgres: &[
            "CREATE FUNCTION astria_delivered_le(ms BIGINT) RETURNS TEXT LANGUAGE sql IMMUTABLE AS $$
             SELECT 'delivered_le:' || CASE WHEN ms <= 60000 THEN '60' WHEN ms <= 300000 THEN '300' WHEN ms <= 900000 THEN '900' WHEN ms <= 1800000 THEN '1800' WHEN ms <= 3600000 THEN '3600' WHEN ms <= 7200000 THEN '7200' WHEN ms <= 21600000 THEN '21600' WHEN ms <= 86400000 THEN '86400' ELSE 'inf' END $$",
            "CREATE FUNCTION astria_orders_tally() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF TG_OP = 'UPDATE' THEN
                 IF OLD.status = NEW.status AND NOT ((OLD.status = 'delivered' OR NEW.status = 'delivered')
                    AND (OLD.updated_at IS DISTINCT FROM NEW.updated_at OR OLD.paid_at IS DISTINCT FROM NEW.paid_at)) THEN
                   RETURN NULL;
                 END IF;
               END IF;
               IF TG_OP <> 'INSERT' THEN
                 INSERT INTO tally_deltas (name, delta) VALUES ('orders:' || OLD.status, -1);
                 IF OLD.status = 'delivered' AND OLD.paid_at IS NOT NULL THEN
                   INSERT INTO tally_deltas (name, delta) VALUES
                     (astria_delivered_le(OLD.updated_at - OLD.paid_at), -1), ('delivered_ms', OLD.paid_at - OLD.updated_at);
                 END IF;
               END IF;
               IF TG_OP <> 'DELETE' THEN
                 INSERT INTO tally_deltas (name, delta) VALUES ('orders:' || NEW.status, 1);
                 IF NEW.status = 'delivered' AND NEW.paid_at IS NOT NULL THEN
                   INSERT INTO tally_deltas (name, delta) VALUES
                     (astria_delivered_le(NEW.updated_at - NEW.paid_at), 1), ('delivered_ms', NEW.updated_at - NEW.paid_at);
                 END IF;
               END IF;
               RETURN NULL;
             END $$",
            "CREATE TRIGGER orders_tally AFTER INSERT OR DELETE OR UPDATE OF status, paid_at, updated_at ON orders
             FOR EACH ROW EXECUTE FUNCTION astria_orders_tally()",
            "CREATE FUNCTION astria_refunds_tally() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
               IF TG_OP <> 'INSERT' THEN
                 INSERT INTO tally_deltas (name, delta) VALUES ('refunds:' || OLD.status, -1);
               END IF;
               IF TG_OP <> 'DELETE' THEN
                 INSERT INTO tally_deltas (name, delta) VALUES ('refunds:' || NEW.status, 1);
               END IF;
               RETURN NULL;
             END $$",
            "CREATE TRIGGER refunds_tally_change AFTER INSERT OR DELETE ON refunds
             FOR EACH ROW EXECUTE FUNCTION astria_refunds_tally()",
            "CREATE TRIGGER refunds_tally_update AFTER UPDATE OF status ON refunds
             FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION astria_refunds_tally()",
            "CREATE FUNCTION astria_portraits_tally_message() RETURNS trigger LANGUAGE plpgsql AS $$
             DECLARE d BIGINT := 0;
             BEGIN
               IF TG_OP <> 'INSERT' THEN
                 IF OLD.status = 'sent' THEN
                   d := d - (SELECT COUNT(*) FROM generated_images WHERE message_id = OLD.id);
                 END IF;
               END IF;
               IF TG_OP <> 'DELETE' THEN
                 IF NEW.status = 'sent' THEN
                   d := d + (SELECT COUNT(*) FROM generated_images WHERE message_id = NEW.id);
                 END IF;
               END IF;
               IF d <> 0 THEN
                 INSERT INTO tally_deltas (name, delta) VALUES ('portraits_delivered', d);
               END IF;
               RETURN NULL;
             END $$",
            "CREATE TRIGGER portraits_tally_message_change AFTER INSERT OR DELETE ON outbound_messages
             FOR EACH ROW EXECUTE FUNCTION astria_portraits_tally_message()",
            "CREATE TRIGGER portraits_tally_message_update AFTER UPDATE OF status ON outbound_messages
             FOR EACH ROW WHEN ((OLD.status = 'sent') IS DISTINCT FROM (NEW.status = 'sent'))
             EXECUTE FUNCTION astria_portraits_tally_message()",
            // The message row is locked FOR SHARE by its id before its status is read: a
            // concurrent change of its status (the sender marking it sent while the cleanup
            // deletes the image) is waited for and seen, so the two triggers never both count,
            // or both miss, the same pair. (With the status in the WHERE, a row whose committed
            // status does not match would be skipped without waiting.)
            "CREATE FUNCTION astria_portraits_tally_image() RETURNS trigger LANGUAGE plpgsql AS $$
             DECLARE d BIGINT := 0; st TEXT;
             BEGIN
               IF TG_OP <> 'INSERT' THEN
                 SELECT status INTO st FROM outbound_messages WHERE id = OLD.message_id FOR SHARE;
                 IF st = 'sent' THEN d := d - 1; END IF;
               END IF;
               IF TG_OP <> 'DELETE' THEN
                 SELECT status INTO st FROM outbound_messages WHERE id = NEW.message_id FOR SHARE;
                 IF st = 'sent' THEN d := d + 1; END IF;
               END IF;
               IF d <> 0 THEN
                 INSERT INTO tally_deltas (name, delta) VALUES ('portraits_delivered', d);
               END IF;
               RETURN NULL;
             END $$",
            "CREATE TRIGGER portraits_tally_image AFTER INSERT OR DELETE OR UPDATE OF message_id ON generated_images
             FOR EACH ROW EXECUTE FUNCTION astria_portraits_tally_image()",
            // Events written before this migration: their order, from the payload (ours, JSON).
            "UPDATE outbox SET order_id = (envelope::jsonb ->> 'payload')::jsonb ->> 'order_id'
             WHERE jsonb_typeof((envelope::jsonb ->> 'payload')::jsonb) = 'object'",
        ],
        then: &[
            // What the database holds now, counted once, after the triggers: on PostgreSQL,
            // creating a trigger locks its table against writers until the migration commits,
            // so no write falls between a count and the first delta (one that committed before
            // is counted, one after waits and leaves a delta). SQLite's writer is alone anyway.
            "INSERT INTO tallies (name, value) SELECT 'orders:' || status, COUNT(*) FROM orders GROUP BY status",
            "INSERT INTO tallies (name, value) SELECT 'refunds:' || status, COUNT(*) FROM refunds GROUP BY status",
            "INSERT INTO tallies (name, value)
             SELECT 'portraits_delivered', COUNT(*) FROM generated_images g JOIN outbound_messages m ON m.id = g.message_id
             WHERE m.status = 'sent'",
            // The payment-to-delivery histogram's buckets (metrics::DELIVERY_BUCKETS_S, in ms,
            // as in `delivered_deltas!` and `astria_delivered_le`; the contract suite checks
            // the tallies against a count over every row by that constant), each counted on
            // its own (render adds them up), and the sum.
            "INSERT INTO tallies (name, value)
             SELECT 'delivered_le:' || le, COUNT(*) FROM (
                 SELECT CASE WHEN ms <= 60000 THEN '60' WHEN ms <= 300000 THEN '300' WHEN ms <= 900000 THEN '900' WHEN ms <= 1800000 THEN '1800' WHEN ms <= 3600000 THEN '3600' WHEN ms <= 7200000 THEN '7200' WHEN ms <= 21600000 THEN '21600' WHEN ms <= 86400000 THEN '86400' ELSE 'inf' END AS le
                 FROM (SELECT updated_at - paid_at AS ms FROM orders WHERE status = 'delivered' AND paid_at IS NOT NULL) d
             ) b GROUP BY le",
            "INSERT INTO tallies (name, value)
             SELECT 'delivered_ms', CAST(COALESCE(SUM(updated_at - paid_at), 0) AS BIGINT) FROM orders
             WHERE status = 'delivered' AND paid_at IS NOT NULL",
        ],
    },
    Migration {
        version: 18,
        name: "the conversation step's hot statements as functions (PostgreSQL)",
        // Spin's PostgreSQL host sends every statement unnamed, so the server parses and plans
        // it at each call; a PL/pgSQL function keeps its statements' plans for the session, and
        // Spin's pool keeps sessions (it recycles them without DISCARD PLANS). The conversation
        // worker runs these for every message (`identity::recognise_first`,
        // `messages::insert_with_event`; `docs/performance.md`, "A step's dedupe with its
        // contact read"). Their statements are the ones the SQLite path runs: changing one
        // there is a new migration here, `CREATE OR REPLACE FUNCTION`.
        postgres: &[
            // $1 phone, $2 BSUID, $3 parent BSUID, $4 the awaiting-window status; $5 source,
            // $6 external id, $7 now: the contacts `identity::recognise` reads, locked, and
            // whether the delivery is new (`o_n`, 0 for a redelivery).
            r#"CREATE FUNCTION astria_recognise_first(text, text, text, text, text, text, bigint)
            RETURNS TABLE (o_wa_id text, o_phone text, o_bsuid text, o_parent_bsuid text, o_ids_known bigint,
                o_opted_out bigint, o_conversation text, o_awaiting_window integer, o_n bigint)
            LANGUAGE plpgsql AS $fn$
            BEGIN
                RETURN QUERY WITH fresh AS (
                    INSERT INTO processed_webhooks (source, external_id, received_at) VALUES ($5, $6, $7)
                    ON CONFLICT (source, external_id) DO NOTHING RETURNING 1)
                SELECT c.*, f.n FROM (SELECT COUNT(*) AS n FROM fresh) f
                LEFT JOIN (
                    SELECT wa_id, phone, bsuid, parent_bsuid, ids_known, opted_out, conversation,
                        CASE WHEN EXISTS (SELECT 1 FROM outbound_messages m WHERE m.wa_id = contacts.wa_id AND m.status = $4)
                             THEN 1 ELSE 0 END AS awaiting_window
                    FROM contacts WHERE phone = $1 OR bsuid = $2 OR parent_bsuid = $3 OR wa_id = $1 OR wa_id = $2
                    FOR UPDATE OF contacts) c ON f.n = 1;
            END $fn$"#,
            // $1-$10 the message as `messages::insert` writes it, $11-$19 its event's outbox
            // row (`outbox::row_params`): answers the outbox rows written (1).
            r#"CREATE FUNCTION astria_queue_message(text, text, bigint, text, text, text, text, text, bigint, bigint,
                text, text, text, text, text, bigint, text, bigint, text)
            RETURNS bigint LANGUAGE plpgsql AS $fn$
            DECLARE written bigint;
            BEGIN
                WITH caused AS (
                    INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id,
                        attempts, next_attempt_at, created_at, updated_at, always_send, queued_at)
                    VALUES ($1, $2,
                        (SELECT CASE WHEN COALESCE(MAX(seq), -1) >= $3 THEN MAX(seq) + 1 ELSE $3 END
                         FROM outbound_messages WHERE wa_id = $2),
                        $4, $5, $6, $7, $8, 0, $9, $9, $9, $10, $9)
                    ON CONFLICT (id) DO NOTHING)
                INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, created_at, status, next_attempt_at, order_id, attempts)
                VALUES ($11, $12, $13, $14, $15, $16, $17, $18, $19, 0);
                GET DIAGNOSTICS written = ROW_COUNT;
                RETURN written;
            END $fn$"#,
        ],
        ..PORTABLE
    },
    Migration {
        version: 19,
        name: "the webhook's accept and the drainer's release as function calls (PostgreSQL)",
        // The webhook stored its row and then read the inbox's lease in two autocommitted
        // statements, each parsed and planned (`inbox::accept` says why two). As one function
        // the row is still in before the lease is read, in a snapshot taken after the row's
        // gate (advisory lock 107148502788450, `inbox::GATE`, held until the row commits; a
        // drainer's release, `astria_inbox_release`, takes it exclusively before deleting the
        // lease): one round trip and no plan per webhook. Their statements are `inbox::INSERT`
        // and `lease::release`'s word for word: changing one is a new migration here.
        postgres: &[
            // $1 id, $2 body, $3 request id, $4 now, $5 the inbox's lease name: 0 when the body
            // was here already, 1 when stored, 2 when stored while a worker drains.
            r#"CREATE FUNCTION astria_inbox_accept(text, text, text, bigint, text)
            RETURNS integer LANGUAGE plpgsql AS $fn$
            BEGIN
                INSERT INTO inbox (id, body, request_id, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING;
                IF NOT FOUND THEN
                    RETURN 0;
                END IF;
                PERFORM pg_advisory_xact_lock_shared(107148502788450);
                IF EXISTS (SELECT 1 FROM job_leases WHERE name = $5 AND lease_until > $4) THEN
                    RETURN 2;
                END IF;
                RETURN 1;
            END $fn$"#,
            // $1 the inbox's lease name, $2 the holder: waits for every webhook that may have
            // read the lease held to commit (`inbox::release`), then gives the lease back.
            r#"CREATE FUNCTION astria_inbox_release(text, text)
            RETURNS bigint LANGUAGE plpgsql AS $fn$
            DECLARE released bigint;
            BEGIN
                PERFORM pg_advisory_xact_lock(107148502788450);
                DELETE FROM job_leases WHERE name = $1 AND holder = $2;
                GET DIAGNOSTICS released = ROW_COUNT;
                RETURN released;
            END $fn$"#,
        ],
        ..PORTABLE
    },
    Migration {
        version: 20,
        name: "a queued message keeps the traceparent of the step that queued it",
        // The sender sends each message in a span under the trace that queued it, and read the
        // message's outbox row per message for nothing but its envelope's traceparent (issue
        // 29); the message's row keeps it now. The function gains the column and an argument:
        // a new overload (PostgreSQL tells them apart by their arguments), the old one left for
        // the old release's pods during an upgrade. `messages::INSERT` word for word.
        sql: &["ALTER TABLE outbound_messages ADD COLUMN traceparent TEXT"],
        postgres: &[
            // $1-$11 the message as `messages::insert` writes it, $12-$20 its event's outbox
            // row (`outbox::row_params`): answers the outbox rows written (1).
            r#"CREATE FUNCTION astria_queue_message(text, text, bigint, text, text, text, text, text, bigint, bigint, text,
                text, text, text, text, text, bigint, text, bigint, text)
            RETURNS bigint LANGUAGE plpgsql AS $fn$
            DECLARE written bigint;
            BEGIN
                WITH caused AS (
                    INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id,
                        attempts, next_attempt_at, created_at, updated_at, always_send, queued_at, traceparent)
                    VALUES ($1, $2,
                        (SELECT CASE WHEN COALESCE(MAX(seq), -1) >= $3 THEN MAX(seq) + 1 ELSE $3 END
                         FROM outbound_messages WHERE wa_id = $2),
                        $4, $5, $6, $7, $8, 0, $9, $9, $9, $10, $9, $11)
                    ON CONFLICT (id) DO NOTHING)
                INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, created_at, status, next_attempt_at, order_id, attempts)
                VALUES ($12, $13, $14, $15, $16, $17, $18, $19, $20, 0);
                GET DIAGNOSTICS written = ROW_COUNT;
                RETURN written;
            END $fn$"#,
        ],
        ..PORTABLE
    },
    Migration {
        version: 21,
        name: "SQLite's inbox moves to a database of its own",
        // On SQLite the webhook's rows go to the `inbox` label's file (`INBOX_MIGRATIONS`):
        // its insert no longer waits for the conversation steps' write lock, and its new
        // connection per request parses the inbox's schema alone. The rows a previous release
        // left here keep waiting under another name until `inbox::adopt` moves them over (at
        // the inbox's first migration, and from the relay every minute); the inbox's lease
        // moves with the inbox. PostgreSQL keeps the inbox in the app's database.
        // The index goes (the rows left are read once, in arrival order, and are few), so that
        // its name is free for the inbox's own.
        sqlite: &[
            "ALTER TABLE inbox RENAME TO inbox_legacy",
            "DROP INDEX inbox_arrival",
            "DELETE FROM job_leases WHERE name = 'inbox'",
        ],
        ..PORTABLE
    },
    Migration {
        version: 22,
        name: "a webhook wakes no worker while another's wake-up is pending (PostgreSQL)",
        // Under load every webhook that found no drainer published a wake-up (a Redis
        // connection per request, and a worker more finding the lease taken). The webhook now
        // learns in the same call whether a wake-up is pending (`inbox::WAKE`, a job lease
        // the publishing webhook holds for a second) and the release clears it under the gate
        // (`inbox::accept` says why that loses no row). New overloads: an old release's pods
        // keep calling the old accept during an upgrade (it wakes whenever no worker drains),
        // and the old release, which they call too, now clears the marker as well.
        // `inbox::INSERT`, `DRAINING`, `WAKING` and `RELEASE` word for word.
        postgres: &[
            // $1 id, $2 body, $3 request id, $4 now, $5 the inbox's lease name, $6 the wake-up's:
            // 0 when the body was here already, 1 when stored, 2 when stored while a worker
            // drains, 3 when stored while a wake-up is pending.
            r#"CREATE FUNCTION astria_inbox_accept(text, text, text, bigint, text, text)
            RETURNS integer LANGUAGE plpgsql AS $fn$
            BEGIN
                INSERT INTO inbox (id, body, request_id, received_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING;
                IF NOT FOUND THEN
                    RETURN 0;
                END IF;
                PERFORM pg_advisory_xact_lock_shared(107148502788450);
                IF EXISTS (SELECT 1 FROM job_leases WHERE name = $5 AND lease_until >= $4) THEN
                    RETURN 2;
                END IF;
                IF EXISTS (SELECT 1 FROM job_leases WHERE name = $6 AND lease_until >= $4) THEN
                    RETURN 3;
                END IF;
                RETURN 1;
            END $fn$"#,
            // $1 the inbox's lease name, $2 the holder, $3 the wake-up's name: waits for every
            // webhook that may have counted on this drain to commit (`inbox::release`), then
            // gives the lease back and clears a pending wake-up.
            r#"CREATE FUNCTION astria_inbox_release(text, text, text)
            RETURNS bigint LANGUAGE plpgsql AS $fn$
            DECLARE released bigint;
            BEGIN
                PERFORM pg_advisory_xact_lock(107148502788450);
                DELETE FROM job_leases WHERE (name = $1 AND holder = $2) OR name = $3;
                GET DIAGNOSTICS released = ROW_COUNT;
                RETURN released;
            END $fn$"#,
            r#"CREATE OR REPLACE FUNCTION astria_inbox_release(text, text)
            RETURNS bigint LANGUAGE sql AS $fn$ SELECT astria_inbox_release($1, $2, 'inbox_wake') $fn$"#,
        ],
        ..PORTABLE
    },
];

/// Applies every migration not yet recorded; answers the versions it applied.
pub fn migrate<D: Db + ?Sized>(db: &D, now_ms: i64) -> Result<Vec<i64>, DbError> {
    apply(db, "schema_migrations", MIGRATIONS, i64::MAX, now_ms)
}

/// Applies the migrations up to `version` only: for tests that write what an older release
/// left before migrating the rest.
pub fn migrate_up_to<D: Db + ?Sized>(db: &D, version: i64, now_ms: i64) -> Result<Vec<i64>, DbError> {
    apply(db, "schema_migrations", MIGRATIONS, version, now_ms)
}

/// Applies the migrations of `list` not yet recorded in `table`, up to `up_to`, in one
/// transaction; answers the versions it applied.
fn apply<D: Db + ?Sized>(
    db: &D,
    table: &str,
    list: &[Migration],
    up_to: i64,
    now_ms: i64,
) -> Result<Vec<i64>, DbError> {
    transaction(db, |db| {
        if db.dialect() == Dialect::Postgres {
            db.execute("SELECT pg_advisory_xact_lock($1)", &[Value::Int(MIGRATION_LOCK)])?;
        }
        db.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {table} (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
            ),
            &[],
        )?;
        let applied: Vec<i64> = db
            .query(&format!("SELECT version FROM {table}"), &[])?
            .iter()
            .map(|r| r.int(0))
            .collect::<Result<_, _>>()?;
        let mut done = Vec::new();
        for m in list.iter().filter(|m| m.version <= up_to && !applied.contains(&m.version)) {
            let dialect = match db.dialect() {
                Dialect::Sqlite => m.sqlite,
                Dialect::Postgres => m.postgres,
            };
            for stmt in m.sql.iter().chain(dialect).chain(m.then) {
                db.execute(stmt, &[])?;
            }
            db.execute(
                &db.dialect().sql(&format!("INSERT INTO {table} (version, name, applied_at) VALUES ($1, $2, $3)")),
                &[Value::Int(m.version), Value::from(m.name), Value::Int(now_ms)],
            )?;
            done.push(m.version);
        }
        Ok(done)
    })
}

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    latest(MIGRATIONS)
}

/// The newest version of `list`.
fn latest(list: &[Migration]) -> i64 {
    list.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Migrates only when the schema is behind: one cheap read on the hot path instead of a write
/// transaction per request.
pub fn ensure_migrated<D: Db + ?Sized>(db: &D, now_ms: i64) -> Result<(), DbError> {
    if current(db, "schema_migrations") < latest_version() {
        migrate(db, now_ms)?;
    }
    Ok(())
}

/// What an open needs to know of a database, read in one statement: the newest version
/// `table` records (0 when it is not there yet) and, on SQLite, whether the file is in
/// write-ahead-log mode (always `true` on PostgreSQL). Spin opens a connection per `open`, so
/// a statement per open is one per request or message: this one replaces the version's read
/// and an unconditional `PRAGMA journal_mode=WAL`.
pub fn open_state<D: Db + ?Sized>(db: &D, table: &str) -> (i64, bool) {
    match db.dialect() {
        Dialect::Postgres => (current(db, table), true),
        Dialect::Sqlite => db
            .query(
                &format!("SELECT (SELECT MAX(version) FROM {table}), (SELECT journal_mode FROM pragma_journal_mode)"),
                &[],
            )
            .ok()
            .and_then(|rows| {
                let r = rows.first()?;
                Some((r.opt_int(0).ok().flatten().unwrap_or(0), r.opt_text(1).ok().flatten()? == "wal"))
            })
            // No such table yet: a new file, to be switched and migrated.
            .unwrap_or((0, false)),
    }
}

/// The newest version `table` records; 0 when it is not there yet.
fn current<D: Db + ?Sized>(db: &D, table: &str) -> i64 {
    db.query(&format!("SELECT MAX(version) FROM {table}"), &[])
        .ok()
        .and_then(|rows| rows.first().and_then(|r| r.opt_int(0).ok().flatten()))
        .unwrap_or(0)
}

/// The schema of SQLite's inbox database (the `inbox` label, a file of its own: `crate::inbox`
/// says why), recorded in its own table, `inbox_migrations`, so that its versions never meet
/// the app's. Every statement tolerates what it creates being there already: pointed at the
/// app's own file, the inbox label still works (the app's `job_leases` is then shared), as
/// long as the app's migrations run first, as every caller does (`spin_kit::open_inbox` and
/// `migrate_inbox` open the app's database migrated before the inbox's): run before migration
/// 21 there, this would find release 20's `inbox` and create nothing, and 21 would then
/// rename that table away.
pub const INBOX_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "the inbox in a database of its own",
    sql: &[
        // As migration 16 wrote it in the app's database (and `job_leases` as migration 5):
        // the inbox's lease lives beside the inbox, so that the webhook's one statement reads
        // it under the same write lock as a drainer's release (`inbox::accept`).
        "CREATE TABLE IF NOT EXISTS inbox (
            id TEXT PRIMARY KEY,
            body TEXT NOT NULL,
            request_id TEXT NOT NULL,
            received_at BIGINT NOT NULL,
            attempts BIGINT NOT NULL DEFAULT 0,
            last_error TEXT,
            set_aside_at BIGINT
        )",
        "CREATE INDEX IF NOT EXISTS inbox_arrival ON inbox (received_at, id)",
        "CREATE TABLE IF NOT EXISTS job_leases (
            name TEXT PRIMARY KEY,
            holder TEXT NOT NULL,
            lease_until BIGINT NOT NULL
        )",
        // The ids of rows moved in from the app's database (`inbox::adopt`): each is moved
        // once ever. Written once, at the upgrade from a release before migration 21.
        "CREATE TABLE IF NOT EXISTS inbox_adopted (id TEXT PRIMARY KEY)",
    ],
    ..PORTABLE
}];

/// Migrates the inbox's database: on SQLite the inbox's own schema ([`INBOX_MIGRATIONS`]); on
/// PostgreSQL, where the inbox is a table of the app's database, the app's ([`migrate`]).
/// Answers the versions it applied.
pub fn migrate_inbox<D: Db + ?Sized>(db: &D, now_ms: i64) -> Result<Vec<i64>, DbError> {
    match db.dialect() {
        Dialect::Sqlite => apply(db, "inbox_migrations", INBOX_MIGRATIONS, i64::MAX, now_ms),
        Dialect::Postgres => migrate(db, now_ms),
    }
}

/// Whether the inbox's schema is current (one read): when not, `inbox::migrate_adopting`.
/// [`open_state`] of SQLite's inbox database: whether its schema is current, and whether it is
/// in write-ahead-log mode.
pub fn inbox_open_state<D: Db + ?Sized>(db: &D) -> (bool, bool) {
    let (version, wal) = open_state(db, "inbox_migrations");
    (version >= latest(INBOX_MIGRATIONS), wal)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The newest definition of each of migrations 18's, 19's and 22's functions holds the
    /// statements the SQLite path runs, word for word (placeholders numbered as the function's
    /// parameters): a change to one of them that forgets the migration re-creating the function
    /// fails here.
    #[test]
    fn the_step_functions_hold_the_statements_the_other_path_runs() {
        let squash = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
        // `signature`: the name and "(", or the whole argument list for one overload.
        let newest = |signature: &str| {
            let defines = format!("FUNCTION {signature}");
            let m = MIGRATIONS.iter().rev().find(|m| m.postgres.iter().any(|s| s.contains(&defines))).unwrap();
            squash(m.postgres.iter().find(|s| s.contains(&defines)).unwrap())
        };
        let recognise = newest("astria_recognise_first(");
        assert!(recognise.contains(&squash(&crate::identity::recognise_sql(Dialect::Postgres))), "{recognise}");
        for part in [
            "INSERT INTO processed_webhooks (source, external_id, received_at) VALUES",
            "ON CONFLICT (source, external_id) DO NOTHING",
        ] {
            assert!(recognise.contains(part), "{part}");
        }
        let queue = newest("astria_queue_message(");
        assert!(queue.contains(&squash(crate::messages::INSERT)), "{queue}");
        assert!(queue.contains(&squash(crate::outbox::ROW_COLUMNS)), "{queue}");
        // In this order: the row in, then the gate, then the lease and the marker read
        // (`inbox::accept`).
        let accept = newest("astria_inbox_accept(text, text, text, bigint, text, text)");
        let (insert, gate) = (crate::inbox::INSERT, crate::inbox::GATE);
        let (draining, waking) = (crate::inbox::DRAINING, crate::inbox::WAKING);
        let ordered = format!(
            "{insert}; IF NOT FOUND THEN RETURN 0; END IF; PERFORM pg_advisory_xact_lock_shared({gate}); \
             IF {draining} THEN RETURN 2; END IF; IF {waking} THEN RETURN 3; END IF; RETURN 1;"
        );
        assert!(accept.contains(&ordered), "{accept}");
        let release = newest("astria_inbox_release(text, text, text)");
        let gated = format!("pg_advisory_xact_lock({gate}); {};", crate::inbox::RELEASE);
        assert!(release.contains(&gated), "{release}");
        // The old release's call, still made by an old release's pods, clears the marker too.
        let old = newest("astria_inbox_release(text, text)");
        assert!(old.contains(&format!("astria_inbox_release($1, $2, '{}')", crate::inbox::WAKE)), "{old}");
    }
}
