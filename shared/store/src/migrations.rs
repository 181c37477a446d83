//! Schema migrations for SQLite and PostgreSQL, applied at first use by whichever instance gets
//! there first, recorded in `schema_migrations`.
//!
//! Safe with several replicas starting at once: on PostgreSQL the whole check-and-apply runs in
//! one transaction holding an advisory lock; on SQLite `BEGIN IMMEDIATE` serialises writers.
//! Migrations are append-only: never edit one that has shipped, add the next version.

use crate::{transaction, Db, DbError, Dialect, Value};

/// One schema step. `sql` is portable unless a dialect-specific variant is given.
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static [&'static str],
}

/// Key of the PostgreSQL advisory lock that serialises migrations (any constant works, as long
/// as nothing else in the database uses it).
const MIGRATION_LOCK: i64 = 0x61_73_74_72_69_61; // "astria"

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
    },
    Migration {
        version: 9,
        name: "paid orders are reconciled too",
        sql: &[
            // When the payment settled: the clock of a paid order whose training never started.
            "ALTER TABLE orders ADD COLUMN paid_at BIGINT",
            "UPDATE orders SET paid_at = updated_at WHERE paid_minor IS NOT NULL",
        ],
    },
    Migration {
        version: 10,
        name: "nothing is sent after STOP",
        sql: &[
            // The one message an opted-out contact still gets: the confirmation of their STOP.
            "ALTER TABLE outbound_messages ADD COLUMN always_send BIGINT NOT NULL DEFAULT 0",
        ],
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
    },
];

/// Applies every migration not yet recorded; answers the versions it applied.
pub fn migrate<D: Db + ?Sized>(db: &D, now_ms: i64) -> Result<Vec<i64>, DbError> {
    transaction(db, |db| {
        if db.dialect() == Dialect::Postgres {
            db.execute("SELECT pg_advisory_xact_lock($1)", &[Value::Int(MIGRATION_LOCK)])?;
        }
        db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)",
            &[],
        )?;
        let applied: Vec<i64> = db
            .query("SELECT version FROM schema_migrations", &[])?
            .iter()
            .map(|r| r.int(0))
            .collect::<Result<_, _>>()?;
        let mut done = Vec::new();
        for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
            for stmt in m.sql {
                db.execute(stmt, &[])?;
            }
            db.execute(
                &db.dialect().sql("INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)"),
                &[Value::Int(m.version), Value::from(m.name), Value::Int(now_ms)],
            )?;
            done.push(m.version);
        }
        Ok(done)
    })
}

/// The newest schema version this build knows.
pub fn latest_version() -> i64 {
    MIGRATIONS.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Migrates only when the schema is behind: one cheap read on the hot path instead of a write
/// transaction per request.
pub fn ensure_migrated<D: Db + ?Sized>(db: &D, now_ms: i64) -> Result<(), DbError> {
    let current = db
        .query("SELECT MAX(version) FROM schema_migrations", &[])
        .ok()
        .and_then(|rows| rows.first().and_then(|r| r.opt_int(0).ok().flatten()))
        .unwrap_or(0);
    if current < latest_version() {
        migrate(db, now_ms)?;
    }
    Ok(())
}
