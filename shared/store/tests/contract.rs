//! The store contract: the same suite against real SQLite and real PostgreSQL, through native
//! `Db` implementations that behave like the spin-sdk backends the components use.

use std::sync::{Arc, Barrier};

use astria_models::{EventEnvelope, OrderStatus};
use astria_store::cleanup;
use astria_store::heartbeats;
use astria_store::identity::{self, Ids, Known, Merge, Recipient, Recognised};
use astria_store::images;
use astria_store::inbox;
use astria_store::lease;
use astria_store::messages;
use astria_store::migrations::{latest_version, migrate, migrate_inbox};
use astria_store::native::{Pg, Sqlite};
use astria_store::outbox::{self, status, Attempt, RelayPolicy};
use astria_store::repo::{self, NewOrder};
use astria_store::{transaction, Db, DbError, Dialect, Value};

fn admin_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh PostgreSQL database, dropped at the end of the test.
struct PgDatabase {
    name: String,
}

impl PgDatabase {
    fn new() -> Self {
        let name = format!("astria_store_{}", uuid::Uuid::new_v4().simple());
        postgres::Client::connect(&admin_url(), postgres::NoTls)
            .expect("PostgreSQL is running (scripts/test.sh starts it)")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        PgDatabase { name }
    }
    fn connect(&self) -> Pg {
        let base = admin_url();
        let url = format!("{}/{}", base.rsplit_once('/').unwrap().0, self.name);
        Pg::connect(&url).unwrap()
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Ok(mut c) = postgres::Client::connect(&admin_url(), postgres::NoTls) {
            let _ = c.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// Runs `suite` on SQLite and on PostgreSQL, each with a fresh database; `connect` gives a new
/// connection to the same database (for concurrency tests).
fn on_both(suite: fn(&dyn Fn() -> Box<dyn Db + Send>)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    suite(&|| Box::new(Sqlite::open(&path).unwrap()));

    let db = PgDatabase::new();
    suite(&|| Box::new(db.connect()));
}

/// Like [`on_both`], with the inbox's database beside the app's, both migrated: on SQLite a
/// file of its own (as the components' `inbox` label), on PostgreSQL the app's database.
fn on_both_with_inbox(suite: fn(&dyn Db, &dyn Db)) {
    let dir = tempfile::tempdir().unwrap();
    let app = Sqlite::open(&dir.path().join("store.db")).unwrap();
    let inbox = Sqlite::open(&dir.path().join("inbox.db")).unwrap();
    migrate(&app, 0).unwrap();
    migrate_inbox(&inbox, 0).unwrap();
    suite(&app, &inbox);

    let database = PgDatabase::new();
    let db = database.connect();
    migrate(&db, 0).unwrap();
    assert!(migrate_inbox(&db, 0).unwrap().is_empty(), "PostgreSQL's inbox is the app's database");
    suite(&db, &db);
}

fn event(id: &str) -> EventEnvelope {
    EventEnvelope {
        id: id.into(),
        event_type: "order.paid".into(),
        occurred_at: "2026-11-25T06:00:00Z".into(),
        correlation_id: "corr-1".into(),
        payload: r#"{"order_id":"o-1"}"#.into(),
        traceparent: None,
    }
}

const POLICY: RelayPolicy =
    RelayPolicy { grace_ms: 1_000, base_backoff_ms: 100, max_backoff_ms: 1_000, max_attempts: 3 };

// ------------------------------------------------------------------ the contract

#[test]
fn migrations_apply_once_and_record_their_version() {
    on_both(|connect| {
        let db = connect();
        let all: Vec<i64> = astria_store::migrations::MIGRATIONS.iter().map(|m| m.version).collect();
        assert_eq!(migrate(db.as_ref(), 1).unwrap(), all);
        assert_eq!(migrate(db.as_ref(), 2).unwrap(), Vec::<i64>::new(), "second run is a no-op");
        let v = db.query("SELECT MAX(version) FROM schema_migrations", &[]).unwrap()[0].int(0).unwrap();
        assert_eq!(v, latest_version());
    });
}

/// What an open reads in one statement (`migrations::open_state`): the schema's version (0
/// before the first migration) and, on SQLite, whether the file is in write-ahead-log mode, so
/// that the switch runs only on a file not switched yet.
#[test]
fn an_open_reads_the_schema_version_and_the_journal_mode_in_one_statement() {
    on_both(|connect| {
        let db = connect();
        let state = || astria_store::migrations::open_state(db.as_ref(), "schema_migrations");
        assert_eq!(state().0, 0, "nothing migrated yet");
        migrate(db.as_ref(), 1).unwrap();
        assert_eq!(state().0, latest_version());
        if db.dialect() == Dialect::Sqlite {
            db.query("PRAGMA journal_mode=DELETE", &[]).unwrap();
            assert_eq!(state(), (latest_version(), false), "a rollback journal is seen");
            db.query("PRAGMA journal_mode=WAL", &[]).unwrap();
            assert_eq!(state(), (latest_version(), true), "the write-ahead log is seen");
        } else {
            assert!(state().1, "PostgreSQL has no journal mode to switch");
        }
    });
}

#[test]
fn concurrent_migrations_from_many_replicas_apply_exactly_once() {
    on_both(|connect| {
        let n = 4;
        let barrier = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|_| {
                let db = connect();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    migrate(db.as_ref(), 1).unwrap()
                })
            })
            .collect();
        let applied: Vec<Vec<i64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(applied.iter().filter(|a| !a.is_empty()).count(), 1, "{applied:?}");
        let db = connect();
        let n = astria_store::migrations::MIGRATIONS.len() as i64;
        assert_eq!(db.query("SELECT COUNT(*) FROM schema_migrations", &[]).unwrap()[0].int(0).unwrap(), n);
    });
}

/// What the previous release left: a database at migration 13, with a paid order a pod of the
/// release before migration 9 wrote during a rollout (no `paid_at`), and portraits recorded
/// before they were queued under the image's message id. Migrated, each is found again.
#[test]
fn an_upgrade_finds_the_orders_and_portraits_the_previous_releases_wrote() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        exec(db, "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)");
        for m in astria_store::migrations::MIGRATIONS.iter().filter(|m| m.version <= 13) {
            for stmt in m.sql {
                exec(db, stmt);
            }
            exec(db, &format!("INSERT INTO schema_migrations VALUES ({}, 'old', 0)", m.version));
        }
        exec(db, "INSERT INTO contacts (wa_id, profile_name, opted_out, conversation, updated_at) VALUES ('ana', 'A', 0, '{}', 1)");
        exec(
            db,
            "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at)
                  VALUES ('o-paid', 'ana', 'p', 'paid', 1999, 'usd', 50, 100)",
        );
        exec(db, "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at, astria_tune_id)
                  VALUES ('o-old', 'ana', 'p', 'delivering', 1999, 'usd', 50, 100, 7)");
        exec(db, "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id, attempts, next_attempt_at, created_at, updated_at)
                  VALUES ('queue-made-id', 'ana', 1, 'image', '{\"type\":\"image\",\"link\":\"https://mp.astria.ai/a.jpg\"}', 'queued', 'e1', 'c', 0, 0, 60, 60)");
        exec(
            db,
            "INSERT INTO generated_images VALUES ('o-old', 'https://mp.astria.ai/a.jpg', 1, 'random-uuid-of-old', 60)",
        );

        let envelope = serde_json::to_string(&EventEnvelope {
            payload: r#"{"order_id":"o-old","tune_id":7}"#.into(),
            ..event("e-old")
        })
        .unwrap();
        db.execute(
            "INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, created_at, status, attempts, next_attempt_at)
             VALUES ('e-old', 'astria.orders', 'order.paid', $1, 'c', 70, 'done', 1, 0)",
            &[Value::from(envelope)],
        )
        .unwrap();

        let newer: Vec<i64> =
            astria_store::migrations::MIGRATIONS.iter().map(|m| m.version).filter(|v| *v > 13).collect();
        assert_eq!(migrate(db, 200).unwrap(), newer);
        // `tallied` reads the metrics, the inbox's figures too.
        migrate_inbox(db, 200).unwrap();
        // Migration 17 counted what the previous releases wrote, and found their events' orders.
        assert_eq!(tallied(db), counted_over_every_row(db));
        assert_eq!(tallied(db).0, [("delivering".to_string(), 1), ("paid".to_string(), 1)]);
        let story = astria_store::console::order_story(db, "o-old", 10).unwrap().unwrap();
        assert_eq!(story.events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["e-old"]);
        // The portrait names the message that carries it: the order waits for it.
        assert_eq!(messages::portrait_order(db, "queue-made-id").unwrap().as_deref(), Some("o-old"));
        assert_eq!(images::progress(db, "o-old").unwrap().unconfirmed, 1);
        assert_eq!(messages::get(db, "queue-made-id").unwrap().unwrap().queued_at, 60, "queued_at from created_at");
        // The paid order without paid_at is reconciled, and given up on, like any other.
        let stale: Vec<String> =
            images::paid_not_training(db, 10_000, 5_000, 10).unwrap().into_iter().map(|s| s.order_id).collect();
        assert_eq!(stale, ["o-paid"]);
    });
}

#[test]
fn a_failed_transaction_leaves_nothing_behind() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 1).unwrap();
        let result: Result<(), DbError> = transaction(db.as_ref(), |db| {
            outbox::enqueue(db, "orders", &event("e1"), 0, &POLICY)?;
            Err(DbError::Query("effect failed".into()))
        });
        assert!(result.is_err());
        assert_eq!(outbox::get(db.as_ref(), "e1").unwrap(), None);
    });
}

#[test]
fn a_duplicate_event_id_is_a_conflict() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 1).unwrap();
        outbox::enqueue(db.as_ref(), "orders", &event("e1"), 0, &POLICY).unwrap();
        let err = outbox::enqueue(db.as_ref(), "orders", &event("e1"), 0, &POLICY).unwrap_err();
        assert!(matches!(err, DbError::Conflict(_)), "{err:?}");
    });
}

#[test]
fn an_event_is_due_for_relay_only_after_its_grace_period_and_until_completed() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 1).unwrap();
        let json = outbox::enqueue(db.as_ref(), "orders", &event("e1"), 10_000, &POLICY).unwrap();
        assert_eq!(serde_json::from_str::<EventEnvelope>(&json).unwrap(), event("e1"));
        outbox::mark_published(db.as_ref(), "e1").unwrap();
        assert!(outbox::due(db.as_ref(), 10_500, 10).unwrap().is_empty());
        let due = outbox::due(db.as_ref(), 11_000, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(
            (due[0].status.as_str(), due[0].attempts, due[0].envelope.as_str()),
            (status::PUBLISHED, 1, json.as_str())
        );

        assert!(outbox::claim(db.as_ref(), "e1", "image-service", 11_000).unwrap());
        outbox::complete(db.as_ref(), "e1", 11_000).unwrap();
        assert!(outbox::due(db.as_ref(), 99_000, 10).unwrap().is_empty());
        assert_eq!(outbox::get(db.as_ref(), "e1").unwrap().unwrap().status, status::DONE);
    });
}

#[test]
fn a_claim_succeeds_once_per_consumer() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 1).unwrap();
        assert!(outbox::claim(db.as_ref(), "e1", "image-service", 1).unwrap());
        assert!(!outbox::claim(db.as_ref(), "e1", "image-service", 2).unwrap());
        assert!(outbox::claim(db.as_ref(), "e1", "message-service", 2).unwrap(), "another consumer has its own claim");
    });
}

#[test]
fn of_three_concurrent_replicas_exactly_one_claims_and_acts() {
    on_both(|connect| {
        migrate(connect().as_ref(), 1).unwrap();
        for round in 0..20 {
            let id = format!("e{round}");
            let barrier = Arc::new(Barrier::new(3));
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    let db = connect();
                    let (barrier, id) = (barrier.clone(), id.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        // Claim and effect in one transaction, as consumers do.
                        transaction(db.as_ref(), |db| {
                            let mine = outbox::claim(db, &id, "image-service", 1)?;
                            if mine {
                                db.execute(
                                    &db.dialect().sql(
                                        "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, 0)",
                                    ),
                                    &[Value::Int(1000 + round), Value::from(id.as_str())],
                                )?;
                            }
                            Ok::<_, DbError>(mine)
                        })
                        .unwrap()
                    })
                })
                .collect();
            let winners = handles.into_iter().map(|h| h.join().unwrap()).filter(|w| *w).count();
            assert_eq!(winners, 1, "round {round}");
        }
        let effects = connect().query("SELECT COUNT(*) FROM schema_migrations WHERE version >= 1000", &[]).unwrap()[0]
            .int(0)
            .unwrap();
        assert_eq!(effects, 20);
    });
}

#[test]
fn relay_attempts_back_off_then_dead_letter_and_can_be_replayed() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 1).unwrap();
        outbox::enqueue(db.as_ref(), "orders", &event("poison"), 0, &POLICY).unwrap();
        outbox::mark_published(db.as_ref(), "poison").unwrap();

        let mut now = POLICY.grace_ms;
        let mut published = 1;
        loop {
            let due = outbox::due(db.as_ref(), now, 10).unwrap();
            assert_eq!(due.len(), 1, "still due at {now}");
            match outbox::record_attempt(db.as_ref(), &due[0], now, &POLICY).unwrap() {
                Some(Attempt::Publish { next_attempt_at }) => {
                    published += 1;
                    assert_eq!(next_attempt_at - now, POLICY.backoff_ms(published));
                    now = next_attempt_at;
                }
                Some(Attempt::DeadLettered) => break,
                None => panic!("attempt lost"),
            }
        }
        assert_eq!(published, POLICY.max_attempts);
        assert!(outbox::due(db.as_ref(), i64::MAX / 2, 10).unwrap().is_empty());
        let dead = outbox::dead_letters(db.as_ref(), 10).unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].last_error.as_deref().unwrap().contains("3 attempts"));

        assert!(outbox::replay(db.as_ref(), "poison", now).unwrap());
        assert!(!outbox::replay(db.as_ref(), "poison", now).unwrap(), "only dead events are replayed");
        assert_eq!(outbox::due(db.as_ref(), now, 10).unwrap()[0].attempts, 0);
    });
}

#[test]
fn two_relays_never_both_publish_the_same_attempt() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 1).unwrap();
        outbox::enqueue(db.as_ref(), "orders", &event("e1"), 0, &POLICY).unwrap();
        let seen_by_a = outbox::due(db.as_ref(), 5_000, 10).unwrap();
        let seen_by_b = outbox::due(connect().as_ref(), 5_000, 10).unwrap();
        assert!(outbox::record_attempt(db.as_ref(), &seen_by_a[0], 5_000, &POLICY).unwrap().is_some());
        assert_eq!(outbox::record_attempt(connect().as_ref(), &seen_by_b[0], 5_000, &POLICY).unwrap(), None);
    });
}

#[test]
fn an_attempt_redis_refused_is_given_back_and_a_completed_event_is_left_alone() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 1).unwrap();
        outbox::enqueue(db.as_ref(), "orders", &event("e1"), 0, &POLICY).unwrap();
        outbox::enqueue(db.as_ref(), "orders", &event("e2"), 0, &POLICY).unwrap();
        let due = outbox::due(db.as_ref(), 5_000, 10).unwrap();
        let (e1, e2) = (&due[0], &due[1]);

        // Redis refused e1's publish: the row is again exactly what the relay read.
        assert!(outbox::record_attempt(db.as_ref(), e1, 5_000, &POLICY).unwrap().is_some());
        outbox::unbook_attempt(db.as_ref(), e1).unwrap();
        assert_eq!(outbox::get(db.as_ref(), "e1").unwrap().as_ref(), Some(e1));

        // e2 was published and its consumer completed it at once: giving back is a no-op.
        assert!(outbox::record_attempt(db.as_ref(), e2, 5_000, &POLICY).unwrap().is_some());
        outbox::complete(db.as_ref(), "e2", 5_001).unwrap();
        outbox::unbook_attempt(db.as_ref(), e2).unwrap();
        let after = outbox::get(db.as_ref(), "e2").unwrap().unwrap();
        assert_eq!((after.status.as_str(), after.attempts), (outbox::status::DONE, 1));
    });
}

// ------------------------------------------------------------------ business records

fn usd(cents: i64) -> astria_models::Money {
    astria_models::Money { amount_minor: cents, currency: "usd".into() }
}

fn new_order<'a>(id: &'a str, price: &'a astria_models::Money) -> NewOrder<'a> {
    NewOrder { id, wa_id: "16505551234", pack_id: "corporate", subject_class: "woman", price }
}

#[test]
fn a_contact_is_created_on_first_message_and_refreshed_after() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        assert!(repo::get_contact(db.as_ref(), "16505551234").unwrap().is_none());
        repo::touch_contact(db.as_ref(), "16505551234", Some("Zoë"), 1_000).unwrap();
        repo::touch_contact(db.as_ref(), "16505551234", None, 2_000).unwrap();
        let (contact, state) = repo::get_contact(db.as_ref(), "16505551234").unwrap().unwrap();
        assert_eq!(contact.profile_name.as_deref(), Some("Zoë"), "a message without a name keeps the known one");
        assert_eq!(contact.last_inbound_at.as_deref(), Some("1970-01-01T00:00:02.000Z"));
        assert!(!contact.opted_out);
        assert_eq!(state, r#"{"state":"idle"}"#);

        repo::set_opt_out(db.as_ref(), "16505551234", true, 3_000).unwrap();
        repo::save_conversation(db.as_ref(), "16505551234", r#"{"state":"choosing_pack"}"#, 3_000).unwrap();
        let (contact, state) = repo::get_contact(db.as_ref(), "16505551234").unwrap().unwrap();
        assert!(contact.opted_out);
        assert_eq!(state, r#"{"state":"choosing_pack"}"#);
    });
}

#[test]
fn an_order_keeps_its_photos_in_order_and_refuses_duplicates() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        repo::touch_contact(db.as_ref(), "16505551234", None, 1).unwrap();
        let price = usd(1999);
        repo::create_order(db.as_ref(), &new_order("o1", &price), 10).unwrap();
        let photo = |h: &str| astria_models::Photo {
            media_id: format!("m-{h}"),
            mime_type: "image/jpeg".into(),
            sha256: h.repeat(64),
        };
        assert!(repo::add_photo(db.as_ref(), "o1", &photo("b"), 11).unwrap());
        assert!(repo::add_photo(db.as_ref(), "o1", &photo("a"), 12).unwrap());
        assert!(!repo::add_photo(db.as_ref(), "o1", &photo("b"), 13).unwrap(), "same sha256 again");
        let o = repo::get_order(db.as_ref(), "o1").unwrap().unwrap();
        assert_eq!(o.photos.iter().map(|p| p.media_id.as_str()).collect::<Vec<_>>(), ["m-b", "m-a"]);
        assert_eq!(
            (o.status, o.price.clone(), o.subject_class.as_deref()),
            (OrderStatus::CollectingPhotos, price, Some("woman"))
        );
        assert_eq!(o.created_at, "1970-01-01T00:00:00.010Z");
        assert!(repo::get_order(db.as_ref(), "nope").unwrap().is_none());
    });
}

#[test]
fn a_status_change_from_a_stale_status_changes_nothing() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        repo::touch_contact(db.as_ref(), "16505551234", None, 1).unwrap();
        repo::create_order(db.as_ref(), &new_order("o1", &usd(1999)), 10).unwrap();
        use OrderStatus::*;
        assert!(repo::set_order_status(db.as_ref(), "o1", CollectingPhotos, AwaitingPayment, 20).unwrap());
        assert!(
            !repo::set_order_status(db.as_ref(), "o1", CollectingPhotos, Cancelled, 21).unwrap(),
            "no longer collecting"
        );
        assert_eq!(repo::get_order(db.as_ref(), "o1").unwrap().unwrap().status, AwaitingPayment);
    });
}

#[test]
fn of_concurrent_status_changes_from_the_same_status_exactly_one_wins() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        repo::touch_contact(db.as_ref(), "16505551234", None, 1).unwrap();
        repo::create_order(db.as_ref(), &new_order("o1", &usd(1999)), 10).unwrap();
        repo::set_order_status(db.as_ref(), "o1", OrderStatus::CollectingPhotos, OrderStatus::AwaitingPayment, 11)
            .unwrap();
        let barrier = Arc::new(Barrier::new(3));
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (db, barrier) = (connect(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    transaction(db.as_ref(), |db| {
                        repo::set_order_status(db, "o1", OrderStatus::AwaitingPayment, OrderStatus::Paid, 12)
                    })
                    .unwrap()
                })
            })
            .collect();
        let winners = handles.into_iter().map(|h| h.join().unwrap()).filter(|w| *w).count();
        assert_eq!(winners, 1, "an order is paid once");
    });
}

#[test]
fn a_webhook_delivery_is_handled_once_per_source_and_id() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        assert!(repo::first_delivery(db.as_ref(), "whatsapp", "wamid.1", 1).unwrap());
        assert!(!repo::first_delivery(db.as_ref(), "whatsapp", "wamid.1", 2).unwrap());
        assert!(repo::first_delivery(db.as_ref(), "stripe", "wamid.1", 2).unwrap(), "sources are separate");
    });
}

// ------------------------------------------------------------------ outbound messages

fn queue(db: &dyn Db, id: &str, wa_id: &str, seq: i64, kind: &str, now: i64) {
    let m = messages::NewMessage {
        id,
        wa_id,
        seq,
        kind,
        message: r#"{"kind":"text","body":"x"}"#,
        event_id: &format!("ev-{id}"),
        correlation_id: "c",
        always_send: false,
        traceparent: None,
    };
    assert!(messages::insert(db, &m, now).unwrap());
    assert!(!messages::insert(db, &m, now).unwrap(), "same id twice");
}

/// A contact's messages go in the order they were queued: a `seq` at or below the contact's
/// last (two steps in one millisecond, a pod whose clock is behind) is moved past it.
#[test]
fn a_contacts_queue_is_worked_in_order_and_a_retry_holds_back_later_messages() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        queue(db.as_ref(), "m1", "wa1", 2_000, "text", 10);
        queue(db.as_ref(), "m2", "wa1", 2_000, "text", 10);
        queue(db.as_ref(), "x1", "wa2", 1_000, "text", 10);
        queue(db.as_ref(), "m3", "wa1", 1_000, "text", 10);
        let seq = |id: &str| messages::get(db.as_ref(), id).unwrap().unwrap().seq;
        assert_eq!((seq("m1"), seq("m2"), seq("m3"), seq("x1")), (2_000, 2_001, 2_002, 1_000));
        queue(db.as_ref(), "m4", "wa1", 5_000, "text", 10);
        assert_eq!(seq("m4"), 5_000, "a later seq is kept");
        let next = messages::next_in_queue(db.as_ref(), "wa1").unwrap().unwrap();
        assert_eq!(next.id, "m1");
        assert!(messages::schedule_retry(db.as_ref(), "m1", Some(130429), "rate", 500, 20).unwrap());
        let again = messages::next_in_queue(db.as_ref(), "wa1").unwrap().unwrap();
        assert_eq!((again.id.as_str(), again.attempts, again.next_attempt_at), ("m1", 1, 500));
        assert!(messages::mark_sent(db.as_ref(), "m1", "wamid.1", 30).unwrap());
        assert!(!messages::mark_sent(db.as_ref(), "m1", "wamid.1b", 31).unwrap(), "sent once");
        assert_eq!(messages::next_in_queue(db.as_ref(), "wa1").unwrap().unwrap().id, "m2");
        assert!(messages::mark_failed(db.as_ref(), "m2", Some(131026), "undeliverable", 40).unwrap());
        for later in ["m3", "m4"] {
            assert_eq!(messages::next_in_queue(db.as_ref(), "wa1").unwrap().unwrap().id, later);
            assert!(messages::mark_sent(db.as_ref(), later, &format!("wamid.{later}"), 41).unwrap());
        }
        assert!(messages::next_in_queue(db.as_ref(), "wa1").unwrap().is_none());
        let failed = messages::list(db.as_ref(), messages::status::FAILED, 10).unwrap();
        assert_eq!((failed.len(), failed[0].error_code), (1, Some(131026)));
        let sent = messages::get(db.as_ref(), "m1").unwrap().unwrap();
        assert_eq!((sent.wamid.as_deref(), sent.error_code), (Some("wamid.1"), None));
    });
}

/// A message queued with its event (`insert_with_event`: one function call on PostgreSQL)
/// writes what `insert` and `outbox::enqueue` write apart: the message with its seq moved past
/// the contact's last, the event due after the grace. In a transaction it is all or nothing: an
/// event id written twice is refused and leaves no message behind.
#[test]
fn a_message_queued_with_its_event_writes_both_as_the_two_statements_would() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        queue(db, "m1", "wa1", 2_000, "text", 10);
        let m = messages::NewMessage {
            id: "m2",
            wa_id: "wa1",
            seq: 1_000,
            kind: "text",
            message: r#"{"kind":"text","body":"y"}"#,
            event_id: "ev-m2",
            correlation_id: "c",
            always_send: false,
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        };
        let json = messages::insert_with_event(db, &m, 20, "messages", &event("ev-m2"), &POLICY).unwrap();
        let stored = messages::get(db, "m2").unwrap().unwrap();
        assert_eq!(
            (stored.seq, stored.event_id.as_str(), stored.status.as_str(), stored.message.as_str()),
            (2_001, "ev-m2", messages::status::QUEUED, m.message)
        );
        // The sender's span continues this trace from the row alone (no read of the event).
        assert_eq!(stored.traceparent.as_deref(), m.traceparent);
        assert_eq!(messages::get(db, "m1").unwrap().unwrap().traceparent, None);
        let ev = outbox::get(db, "ev-m2").unwrap().unwrap();
        assert_eq!(
            (ev.channel.as_str(), ev.status.as_str(), ev.attempts, ev.next_attempt_at),
            ("messages", status::PENDING, 0, 20 + POLICY.grace_ms)
        );
        assert_eq!(ev.envelope, json);
        let twice = transaction(db, |db| {
            messages::insert_with_event(
                db,
                &messages::NewMessage { id: "m3", ..m },
                30,
                "messages",
                &event("ev-m2"),
                &POLICY,
            )
        });
        assert!(twice.is_err(), "{twice:?}");
        assert!(messages::get(db, "m3").unwrap().is_none(), "nothing of it was kept");
    });
}

#[test]
fn one_sender_holds_a_contacts_lease_until_it_releases_or_it_expires() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        assert!(messages::acquire_lease(db.as_ref(), "wa1", "a", 100, 1_000).unwrap());
        assert!(!messages::acquire_lease(db.as_ref(), "wa1", "b", 200, 1_000).unwrap(), "a holds it");
        assert!(messages::acquire_lease(db.as_ref(), "wa1", "a", 300, 1_000).unwrap(), "a renews");
        assert!(messages::acquire_lease(db.as_ref(), "wa2", "b", 300, 1_000).unwrap(), "other contact");
        assert!(messages::acquire_lease(db.as_ref(), "wa1", "b", 1_301, 1_000).unwrap(), "a's lease expired");
        messages::release_lease(db.as_ref(), "wa1", "a").unwrap();
        assert!(!messages::acquire_lease(db.as_ref(), "wa1", "c", 1_400, 1_000).unwrap(), "a cannot release b's");
        messages::release_lease(db.as_ref(), "wa1", "b").unwrap();
        assert!(messages::acquire_lease(db.as_ref(), "wa1", "c", 1_400, 1_000).unwrap());
    });
}

#[test]
fn messages_kept_back_by_the_window_are_requeued_in_order_under_new_events() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        queue(db.as_ref(), "m1", "wa1", 1, "image", 10);
        queue(db.as_ref(), "m2", "wa1", 2, "image", 10);
        assert!(messages::mark_awaiting_window(db.as_ref(), "m2", Some(131047), 20).unwrap());
        assert!(messages::mark_awaiting_window(db.as_ref(), "m1", Some(131047), 20).unwrap());
        assert!(!messages::template_since(db.as_ref(), "wa1", 0).unwrap());
        queue(db.as_ref(), "t1", "wa1", 3, "template", 30);
        assert!(messages::template_since(db.as_ref(), "wa1", 30).unwrap());
        assert!(!messages::template_since(db.as_ref(), "wa1", 31).unwrap(), "the contact wrote since");
        let waiting = messages::parked(db.as_ref(), "wa1", messages::status::AWAITING_WINDOW).unwrap();
        assert_eq!(waiting.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["m1", "m2"]);
        assert!(messages::requeue_parked(db.as_ref(), "m1", "ev-new", messages::status::AWAITING_WINDOW, 40).unwrap());
        assert!(
            !messages::requeue_parked(db.as_ref(), "m1", "ev-newer", messages::status::AWAITING_WINDOW, 41).unwrap(),
            "once"
        );
        let m1 = messages::get(db.as_ref(), "m1").unwrap().unwrap();
        assert_eq!((m1.status.as_str(), m1.event_id.as_str()), (messages::status::QUEUED, "ev-new"));
    });
}

#[test]
fn delivery_statuses_apply_forward_only_to_our_messages() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        queue(db.as_ref(), "m1", "wa1", 1, "text", 10);
        messages::mark_sent(db.as_ref(), "m1", "wamid.1", 20).unwrap();
        let rank = |s: &str| ["sent", "delivered", "read", "failed"].iter().position(|x| *x == s);
        let newer = |old: Option<&str>, new: &str| old.and_then(rank) < rank(new);
        let rec = |s: &str, code| messages::record_delivery(db.as_ref(), "wamid.1", s, code, newer, 30).unwrap();
        assert!(rec("read", None).unwrap().changed);
        assert!(!rec("delivered", None).unwrap().changed, "ours, but older");
        assert_eq!(messages::get(db.as_ref(), "m1").unwrap().unwrap().delivery_status.as_deref(), Some("read"));
        assert!(messages::record_delivery(db.as_ref(), "wamid.other", "read", None, newer, 30).unwrap().is_none());
        assert!(rec("failed", Some(131047)).unwrap().changed);
        assert!(!rec("failed", Some(131047)).unwrap().changed, "the same failure again changes nothing");
        assert!(messages::reopen_for_window(db.as_ref(), "m1", 40).unwrap());
        let m1 = messages::get(db.as_ref(), "m1").unwrap().unwrap();
        assert_eq!((m1.status.as_str(), m1.error_code), (messages::status::AWAITING_WINDOW, Some(131047)));
    });
}

#[test]
fn a_held_message_waits_until_released_once() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        queue(db.as_ref(), "m1", "wa1", 1, "image", 10);
        assert!(messages::hold(db.as_ref(), "m1", 20).unwrap());
        assert!(!messages::hold(db.as_ref(), "m1", 21).unwrap(), "held once");
        assert_eq!(messages::next_in_queue(db.as_ref(), "wa1").unwrap(), None, "not in the queue while held");
        let held = messages::parked(db.as_ref(), "wa1", messages::status::HELD).unwrap();
        assert_eq!(held.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), vec!["m1"]);
        assert!(messages::requeue_parked(db.as_ref(), "m1", "ev-2", messages::status::HELD, 30).unwrap());
        assert!(!messages::requeue_parked(db.as_ref(), "m1", "ev-3", messages::status::HELD, 31).unwrap(), "once");
        assert_eq!(messages::next_in_queue(db.as_ref(), "wa1").unwrap().map(|m| m.event_id), Some("ev-2".into()));
    });
}

#[test]
fn of_concurrent_failed_statuses_exactly_one_applies() {
    on_both(|connect| {
        let setup = connect();
        migrate(setup.as_ref(), 0).unwrap();
        queue(setup.as_ref(), "m1", "wa1", 1, "image", 10);
        messages::mark_sent(setup.as_ref(), "m1", "wamid.1", 20).unwrap();
        // Four webhooks with the same `failed` at once, each in its own transaction.
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (db, barrier) = (connect(), barrier.clone());
                std::thread::spawn(move || {
                    let rank = |s: &str| ["sent", "delivered", "read", "failed"].iter().position(|x| *x == s);
                    let newer = |old: Option<&str>, new: &str| old.and_then(rank) < rank(new);
                    barrier.wait();
                    transaction(db.as_ref(), |db| {
                        messages::record_delivery(db, "wamid.1", "failed", Some(131053), newer, 30)
                    })
                    .unwrap()
                    .unwrap()
                    .changed
                })
            })
            .collect();
        let changed: Vec<bool> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(changed.iter().filter(|c| **c).count(), 1, "{changed:?}");
    });
}

// ------------------------------------------------------------------ payments

#[test]
fn a_checkout_session_is_stored_once_and_payment_settles_once() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        repo::touch_contact(db.as_ref(), "16505551234", None, 1).unwrap();
        repo::create_order(db.as_ref(), &new_order("o1", &usd(1999)), 10).unwrap();
        assert!(!repo::set_checkout(db.as_ref(), "o1", "cs_1", "https://c/1", 11).unwrap(), "not awaiting payment yet");
        repo::set_order_status(db.as_ref(), "o1", OrderStatus::CollectingPhotos, OrderStatus::AwaitingPayment, 12)
            .unwrap();
        assert!(repo::set_checkout(db.as_ref(), "o1", "cs_1", "https://c/1", 13).unwrap());
        assert!(!repo::set_checkout(db.as_ref(), "o1", "cs_2", "https://c/2", 14).unwrap(), "once");
        assert!(repo::mark_paid(db.as_ref(), "o1", &usd(1999), Some("pi_1"), 15).unwrap());
        assert!(!repo::mark_paid(db.as_ref(), "o1", &usd(1999), None, 16).unwrap(), "paid once");
        let o = repo::get_order(db.as_ref(), "o1").unwrap().unwrap();
        assert_eq!(
            (o.status, o.paid, o.checkout_session_id.as_deref()),
            (OrderStatus::Paid, Some(usd(1999)), Some("cs_1"))
        );
    });
}

#[test]
fn a_checkout_attempt_is_fixed_once_and_moves_on_only_from_what_was_read() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        repo::touch_contact(db.as_ref(), "16505551234", None, 1).unwrap();
        assert_eq!(repo::checkout_attempt(db.as_ref(), "o1").unwrap(), None, "no such order");
        repo::create_order(db.as_ref(), &new_order("o1", &usd(1999)), 10).unwrap();
        assert_eq!(repo::checkout_attempt(db.as_ref(), "o1").unwrap(), Some((0, None)), "nothing fixed yet");
        // Two replicas fix the first attempt at once: one wins, the other reads the winner's.
        assert!(repo::set_checkout_attempt(db.as_ref(), "o1", (0, None), 0, 5000, 11).unwrap());
        assert!(!repo::set_checkout_attempt(db.as_ref(), "o1", (0, None), 0, 5001, 11).unwrap());
        assert_eq!(repo::checkout_attempt(db.as_ref(), "o1").unwrap(), Some((0, Some(5000))));
        // The key cannot succeed any more: the next generation, once.
        assert!(repo::set_checkout_attempt(db.as_ref(), "o1", (0, Some(5000)), 1, 9000, 12).unwrap());
        assert!(!repo::set_checkout_attempt(db.as_ref(), "o1", (0, Some(5000)), 1, 9001, 12).unwrap());
        assert_eq!(repo::checkout_attempt(db.as_ref(), "o1").unwrap(), Some((1, Some(9000))));
    });
}

#[test]
fn a_reopened_order_copies_pack_price_and_photos_but_not_the_session() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        repo::touch_contact(db.as_ref(), "16505551234", None, 1).unwrap();
        repo::create_order(db.as_ref(), &new_order("o1", &usd(1999)), 10).unwrap();
        let photo =
            astria_models::Photo { media_id: "m1".into(), mime_type: "image/jpeg".into(), sha256: "a".repeat(64) };
        repo::add_photo(db.as_ref(), "o1", &photo, 11).unwrap();
        repo::set_order_status(db.as_ref(), "o1", OrderStatus::CollectingPhotos, OrderStatus::AwaitingPayment, 12)
            .unwrap();
        repo::set_checkout(db.as_ref(), "o1", "cs_1", "https://c/1", 13).unwrap();
        repo::set_order_status(db.as_ref(), "o1", OrderStatus::AwaitingPayment, OrderStatus::Expired, 14).unwrap();
        repo::reopen_order(db.as_ref(), "o1", "o2", 20).unwrap();
        let o2 = repo::get_order(db.as_ref(), "o2").unwrap().unwrap();
        assert_eq!((o2.status, o2.price, o2.checkout_session_id), (OrderStatus::AwaitingPayment, usd(1999), None));
        assert_eq!((o2.photos, o2.subject_class.as_deref()), (vec![photo], Some("woman")));
        assert_eq!(repo::oldest_photo_at(db.as_ref(), "o2").unwrap(), Some(11), "the photos keep their age");
    });
}

#[test]
fn payment_issues_are_kept_once_per_event_for_operators() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        let issue = repo::PaymentIssue {
            event_id: "evt_1".into(),
            kind: repo::IssueKind::NeedsRefund,
            order_id: Some("o1".into()),
            session_id: Some("cs_1".into()),
            payment_intent: None,
            amount: Some(usd(500)),
            detail: "paid 5.00 USD, expected 19.99 USD".into(),
            created_at: 10,
        };
        assert!(repo::record_payment_issue(db.as_ref(), &issue).unwrap());
        assert!(!repo::record_payment_issue(db.as_ref(), &issue).unwrap());
        let unknown = repo::PaymentIssue {
            event_id: "evt_2".into(),
            kind: repo::IssueKind::UnknownOrder,
            amount: None,
            order_id: None,
            created_at: 20,
            ..issue.clone()
        };
        repo::record_payment_issue(db.as_ref(), &unknown).unwrap();
        let open = repo::open_payment_issues(db.as_ref(), 10).unwrap();
        assert_eq!(open, vec![unknown, issue]);
    });
}

// ------------------------------------------------------------------ cleanup

const DAY: i64 = 24 * 60 * 60 * 1000;
const NOW: i64 = 400 * DAY;

fn exec(db: &dyn Db, sql: &str) {
    db.execute(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn ids(db: &dyn Db, sql: &str) -> Vec<String> {
    let mut v: Vec<String> = db.query(sql, &[]).unwrap().iter().map(|r| r.text(0).unwrap()).collect();
    v.sort();
    v
}

/// Records of every age and status, the inbox's in `inbox`. Ages in days before NOW.
fn seed(db: &dyn Db, inbox: &dyn Db) {
    let ago = |days: i64| NOW - days * DAY;
    for (source, id, age) in [("whatsapp", "old", 31), ("stripe", "recent", 1)] {
        exec(db, &format!("INSERT INTO processed_webhooks VALUES ('{source}', '{id}', {})", ago(age)));
    }
    // outbox: (id, status, created days ago, completed days ago)
    for (id, status, created, completed) in [
        ("done-old", "done", 20, Some(15)),
        ("done-recent", "done", 2, Some(1)),
        ("pending-old", "published", 60, None),
        ("dead-old", "dead", 91, None),
        ("dead-recent", "dead", 10, None),
    ] {
        let completed = completed.map(|d| ago(d).to_string()).unwrap_or("NULL".into());
        exec(db, &format!(
            "INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, created_at, status, attempts, next_attempt_at, completed_at)
             VALUES ('{id}', 'c', 't', '{{}}', 'x', {}, '{status}', 1, 0, {completed})", ago(created)));
        exec(db, &format!("INSERT INTO event_claims VALUES ('{id}', 'consumer', {})", ago(created)));
    }
    // contacts: (wa_id, opted out, updated days ago)
    for (wa, opted, age) in
        [("active", 0, 90), ("x-gone", 1, 31), ("y-paid-before", 1, 31), ("z-open-order", 1, 31), ("w-recent", 1, 5)]
    {
        exec(
            db,
            &format!(
                "INSERT INTO contacts (wa_id, profile_name, opted_out, last_inbound_at, conversation, updated_at) VALUES ('{wa}', 'Name {wa}', {opted}, {}, '{{\"state\":\"idle\"}}', {})",
                ago(age),
                ago(age)
            ),
        );
    }
    // orders: (id, contact, status, updated days ago), each with two photos
    for (id, wa, status, age) in [
        ("collecting-old", "active", "collecting_photos", 8),
        ("awaiting-old", "active", "awaiting_payment", 8),
        ("awaiting-recent", "active", "awaiting_payment", 1),
        ("paid-old", "active", "paid", 60),
        ("training-old", "active", "training", 60),
        ("delivering-old", "active", "delivering", 60),
        ("delivered-old", "active", "delivered", 8),
        ("delivered-recent", "active", "delivered", 1),
        ("cancelled-old", "active", "cancelled", 8),
        ("cancelled-recent", "active", "cancelled", 1),
        ("x-cancelled", "x-gone", "cancelled", 40),
        ("y-delivered", "y-paid-before", "delivered", 40),
        ("z-training", "z-open-order", "training", 40),
        ("w-expired", "w-recent", "expired", 40),
    ] {
        exec(
            db,
            &format!(
                "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at)
             VALUES ('{id}', '{wa}', 'p', '{status}', 1999, 'usd', {}, {})",
                ago(age + 1),
                ago(age)
            ),
        );
        for n in 0..2 {
            exec(
                db,
                &format!(
                    "INSERT INTO order_photos VALUES ('{id}', '{id}-h{n}', 'm', 'image/jpeg', {n}, {})",
                    ago(age + 1)
                ),
            );
        }
    }
    // outbound messages: (id, contact, status, updated days ago)
    for (id, wa, status, age) in [
        ("sent-old", "active", "sent", 31),
        ("failed-old", "active", "failed", 31),
        ("queued-old", "active", "queued", 31),
        ("waiting-old", "active", "awaiting_window", 31),
        ("sent-recent", "active", "sent", 1),
        ("x-msg", "x-gone", "awaiting_window", 31),
        ("w-msg", "w-recent", "sent", 5),
    ] {
        exec(db, &format!(
            "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id, attempts, next_attempt_at, created_at, updated_at)
             VALUES ('{id}', '{wa}', 1, 'text', '{{}}', '{status}', 'e-{id}', 'c', 0, 0, {}, {})", ago(age), ago(age)));
    }
    for (url, age) in [("https://mp.astria.ai/old.jpg", 31), ("https://mp.astria.ai/new.jpg", 29)] {
        exec(db, &format!("INSERT INTO generated_images VALUES ('delivered-old', '{url}', 1, 'm', {})", ago(age)));
    }
    // inbox: (id, set aside days ago): set aside long ago, lately, and a row still waiting.
    for (id, set_aside) in [("inbox-aside-old", Some(91)), ("inbox-aside-recent", Some(10)), ("inbox-waiting", None)] {
        let at = set_aside.map(|d| ago(d).to_string()).unwrap_or("NULL".into());
        exec(inbox, &format!(
            "INSERT INTO inbox (id, body, request_id, received_at, set_aside_at) VALUES ('{id}', '{{}}', 'r', {}, {at})",
            ago(100)
        ));
    }
    exec(db, &format!("INSERT INTO send_leases VALUES ('old-lease', 'h', {})", ago(2)));
    exec(db, &format!("INSERT INTO send_leases VALUES ('live-lease', 'h', {})", NOW + 60_000));
}

#[test]
fn the_cleanup_removes_exactly_what_retention_says_and_a_second_run_nothing() {
    on_both_with_inbox(|db, inbox| {
        seed(db, inbox);
        let keep = cleanup::Retention::default();
        // A batch of 2 makes every rule go round more than once.
        let report = cleanup::run(db, inbox, NOW, &keep, 2).unwrap();
        assert_eq!(
            report,
            cleanup::Report {
                processed_webhooks: 1,
                outbox_events: 1,
                event_claims: 1,
                dead_letters: 1,
                inbox_set_aside: 1,
                orders_expired: 2,
                // collecting-old, awaiting-old, delivered-old, cancelled-old, w-expired (unpaid and
                // quiet), y-delivered (delivered long ago), x-cancelled (x leaves): 2 each.
                photos_removed: 14,
                // sent-old, failed-old; x's kept-back message.
                messages_removed: 3,
                contacts_removed: 1,
                contacts_erased: 1,
                orders_removed: 1,
                send_leases: 1,
                generated_images: 1,
            }
        );
        assert_eq!(ids(db, "SELECT external_id FROM processed_webhooks"), ["recent"]);
        assert_eq!(ids(db, "SELECT id FROM outbox"), ["dead-recent", "done-recent", "pending-old"]);
        assert_eq!(
            ids(inbox, "SELECT id FROM inbox"),
            ["inbox-aside-recent", "inbox-waiting"],
            "a waiting row is never removed"
        );
        assert_eq!(
            ids(db, "SELECT event_id FROM event_claims"),
            ["dead-old", "dead-recent", "done-recent", "pending-old"]
        );
        assert_eq!(
            ids(db, "SELECT id FROM orders WHERE status = 'expired'"),
            ["awaiting-old", "collecting-old", "w-expired"]
        );
        assert_eq!(
            ids(db, "SELECT DISTINCT order_id FROM order_photos"),
            [
                "awaiting-recent",
                "cancelled-recent",
                "delivered-recent",
                "delivering-old",
                "paid-old",
                "training-old",
                "z-training"
            ],
            "paid orders not yet delivered keep their photos"
        );
        for paid in ["paid-old", "training-old", "delivering-old", "z-training"] {
            let status = ids(db, &format!("SELECT status FROM orders WHERE id = '{paid}'"));
            assert_eq!(status.len(), 1, "{paid} kept");
        }
        assert_eq!(ids(db, "SELECT id FROM outbound_messages"), ["queued-old", "sent-recent", "w-msg", "waiting-old"]);
        assert_eq!(ids(db, "SELECT wa_id FROM contacts"), ["active", "w-recent", "y-paid-before", "z-open-order"]);
        assert_eq!(ids(db, "SELECT id FROM orders WHERE wa_id = 'x-gone'"), Vec::<String>::new());
        let y = db.query("SELECT profile_name, conversation FROM contacts WHERE wa_id = 'y-paid-before'", &[]).unwrap();
        assert_eq!((y[0].opt_text(0).unwrap(), y[0].text(1).unwrap()), (None, cleanup::ERASED.to_string()));
        assert_eq!(ids(db, "SELECT id FROM orders WHERE wa_id = 'y-paid-before'"), ["y-delivered"]);
        assert_eq!(ids(db, "SELECT wa_id FROM send_leases"), ["live-lease"]);
        assert_eq!(ids(db, "SELECT url FROM generated_images"), ["https://mp.astria.ai/new.jpg"]);

        let again = cleanup::run(db, inbox, NOW, &keep, 2).unwrap();
        assert!(again.is_empty(), "second run: {again:?}");
    });
}

#[test]
fn one_cleanup_holds_the_lease_until_it_releases_or_it_expires() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        assert!(cleanup::acquire_lease(db.as_ref(), "cleanup", "a", 100, 1_000).unwrap());
        assert!(!cleanup::acquire_lease(db.as_ref(), "cleanup", "b", 500, 1_000).unwrap(), "held");
        assert!(!cleanup::acquire_lease(db.as_ref(), "cleanup", "a", 500, 1_000).unwrap(), "not re-entrant");
        assert!(cleanup::acquire_lease(db.as_ref(), "cleanup", "b", 1_101, 1_000).unwrap(), "a crashed: expired");
        cleanup::release_lease(db.as_ref(), "cleanup", "a").unwrap();
        assert!(!cleanup::acquire_lease(db.as_ref(), "cleanup", "c", 1_200, 1_000).unwrap(), "a cannot release b's");
        cleanup::release_lease(db.as_ref(), "cleanup", "b").unwrap();
        assert!(cleanup::acquire_lease(db.as_ref(), "cleanup", "c", 1_200, 1_000).unwrap());
    });
}

/// Four threads race for one lease of `kind`: exactly one wins.
fn one_of_concurrent_takers_wins(connect: &dyn Fn() -> Box<dyn Db + Send>, kind: lease::Kind) {
    let db = connect();
    migrate(db.as_ref(), 0).unwrap();
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|i| {
            let (db, barrier) = (connect(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                transaction(db.as_ref(), |db| lease::acquire(db, kind, "key", &format!("h{i}"), 100, 60_000)).unwrap()
            })
        })
        .collect();
    assert_eq!(handles.into_iter().map(|h| h.join().unwrap()).filter(|w| *w).count(), 1, "{kind:?}");
}

#[test]
fn of_concurrent_takers_of_a_lease_exactly_one_wins_for_send_queues_and_jobs() {
    on_both(|connect| one_of_concurrent_takers_wins(connect, lease::Kind::Send));
    on_both(|connect| one_of_concurrent_takers_wins(connect, lease::Kind::Job));
}

#[test]
fn only_the_holder_renews_a_job_lease_and_not_after_someone_else_took_it() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        assert!(lease::acquire(db, lease::Kind::Job, "train:o1", "a", 100, 1_000).unwrap());
        assert!(!lease::renew(db, lease::Kind::Job, "train:o1", "b", 200, 1_000).unwrap(), "not b's");
        assert!(lease::renew(db, lease::Kind::Job, "train:o1", "a", 900, 1_000).unwrap());
        assert!(!lease::acquire(db, lease::Kind::Job, "train:o1", "b", 1_500, 1_000).unwrap(), "renewed to 1,900");
        // a's lease lapses; b takes it; a can no longer renew (it must stop).
        assert!(lease::acquire(db, lease::Kind::Job, "train:o1", "b", 2_000, 1_000).unwrap());
        assert!(!lease::renew(db, lease::Kind::Job, "train:o1", "a", 2_100, 1_000).unwrap());
    });
}

#[test]
fn prompts_only_grow_and_each_image_is_recorded_once() {
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        repo::touch_contact(db.as_ref(), "16505551234", None, 1).unwrap();
        repo::create_order(db.as_ref(), &new_order("o1", &usd(1999)), 10).unwrap();
        let db = db.as_ref();
        assert!(!images::progress(db, "o1").unwrap().complete());
        images::record_prompt(db, "o1", 1, 2, true, 20).unwrap();
        images::record_prompt(db, "o1", 1, 0, false, 21).unwrap(); // a stale report
        assert!(images::add_image(db, "o1", "https://x/1.jpg", 1, "m1", 22).unwrap());
        assert!(!images::add_image(db, "o1", "https://x/1.jpg", 1, "m2", 23).unwrap(), "once");
        images::set_prompts_expected(db, "o1", 2).unwrap();
        images::set_prompts_expected(db, "o1", 1).unwrap(); // never shrinks
        let p = images::progress(db, "o1").unwrap();
        assert_eq!((p.prompts_expected, p.prompts_done, p.images, p.trained), (Some(2), 1, 1, false));
        images::mark_trained(db, "o1", 30).unwrap();
        assert!(!images::mark_trained(db, "o1", 31).unwrap(), "once");
        images::record_prompt(db, "o1", 2, 0, true, 32).unwrap();
        assert!(images::progress(db, "o1").unwrap().complete());
    });
}

fn queue_portrait(db: &dyn astria_store::Db, order: &str, id: &str, url: &str, now: i64) {
    let m = messages::NewMessage {
        id,
        wa_id: "16505551234",
        seq: now,
        kind: "image",
        message: "{}",
        event_id: &format!("e-{id}"),
        correlation_id: "c",
        always_send: false,
        traceparent: None,
    };
    assert!(messages::insert(db, &m, now).unwrap());
    assert!(images::add_image(db, order, url, 1, id, now).unwrap());
}

#[test]
fn an_order_is_delivered_only_once_whatsapp_took_every_portrait_and_a_failed_one_can_be_resent() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        repo::touch_contact(db, "16505551234", None, 1).unwrap();
        repo::create_order(db, &new_order("o1", &usd(1999)), 10).unwrap();
        exec(db, "UPDATE orders SET status = 'paid' WHERE id = 'o1'");
        assert!(images::start_training(db, "o1", 7, 20).unwrap());
        images::set_prompts_expected(db, "o1", 1).unwrap();
        images::mark_trained(db, "o1", 30).unwrap();
        images::record_prompt(db, "o1", 1, 2, true, 40).unwrap();
        queue_portrait(db, "o1", "m1", "https://x/1.jpg", 41);
        queue_portrait(db, "o1", "m2", "https://x/2.jpg", 42);

        let p = images::progress(db, "o1").unwrap();
        assert!(p.complete() && !p.delivered(), "Astria is done, WhatsApp took nothing yet: {p:?}");
        assert_eq!(p.unconfirmed, 2);
        // Waiting only for WhatsApp: not Astria's to reconcile, nor to give up on.
        assert!(images::due_for_reconcile(db, 1_000_000, 1_000_000, 10).unwrap().is_empty());
        assert!(images::past_give_up(db, 1_000_000, 10).unwrap().is_empty());
        assert_eq!(messages::portrait_order(db, "m1").unwrap().as_deref(), Some("o1"));

        assert!(messages::mark_sent(db, "m1", "wamid.1", 50).unwrap());
        assert!(messages::mark_failed(db, "m2", Some(131000), "gave up", 51).unwrap());
        assert!(!images::progress(db, "o1").unwrap().delivered(), "a failed portrait is not delivered");
        let failed: Vec<String> = messages::failed_portraits(db, "o1").unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(failed, ["m2"]);

        // An operator's resend: queued again, tries and horizon starting over, once.
        assert!(messages::resend_failed(db, "m2", "e-again", 60).unwrap());
        assert!(!messages::resend_failed(db, "m2", "e-again-2", 61).unwrap(), "only a failed message");
        let m2 = messages::get(db, "m2").unwrap().unwrap();
        assert_eq!((m2.status.as_str(), m2.attempts, m2.queued_at, m2.event_id.as_str()), ("queued", 0, 60, "e-again"));
        assert!(messages::mark_sent(db, "m2", "wamid.2", 70).unwrap());
        assert!(images::progress(db, "o1").unwrap().delivered());
    });
}

#[test]
fn a_paid_order_the_previous_release_wrote_without_paid_at_is_still_reconciled() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        repo::touch_contact(db, "16505551234", None, 1).unwrap();
        repo::create_order(db, &new_order("o-old", &usd(1999)), 10).unwrap();
        // A pod of the release before migration 9, during the rollout: status, no paid_at.
        exec(db, "UPDATE orders SET status = 'paid', paid_at = NULL, updated_at = 100 WHERE id = 'o-old'");
        let stale: Vec<String> =
            images::paid_not_training(db, 10_000, 5_000, 10).unwrap().into_iter().map(|s| s.order_id).collect();
        assert_eq!(stale, ["o-old"]);
        let past: Vec<String> =
            images::paid_past_give_up(db, 5_000, 10).unwrap().into_iter().map(|s| s.order_id).collect();
        assert_eq!(past, ["o-old"]);
        assert!(images::paid_not_training(db, 10_000, 50, 10).unwrap().is_empty(), "paid after the cut-off");
    });
}

#[test]
fn portraits_held_after_stop_keep_their_contact_until_given_up_then_go() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        // The cleanup below looks at the inbox too: here in the same file (SQLite).
        migrate_inbox(db, 0).unwrap();
        let ago = |days: i64| NOW - days * DAY;
        exec(
            db,
            &format!(
                "INSERT INTO contacts (wa_id, profile_name, opted_out, last_inbound_at, conversation, updated_at) VALUES ('quiet', 'Q', 1, {}, '{{\"state\":\"idle\"}}', {})",
                ago(40),
                ago(40)
            ),
        );
        exec(
            db,
            &format!(
                "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at)
                 VALUES ('o-held', 'quiet', 'p', 'delivered', 1999, 'usd', {}, {})",
                ago(41),
                ago(40)
            ),
        );
        for (id, age) in [("held-1", 40), ("held-2", 40), ("held-new", 1)] {
            exec(db, &format!(
                "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id, attempts, next_attempt_at, created_at, updated_at)
                 VALUES ('{id}', 'quiet', 1, 'image', '{{}}', 'held', 'e-{id}', 'c', 0, 0, {}, {})", ago(age), ago(age)));
        }
        for (url, m) in [("https://mp.astria.ai/1.jpg", "held-1"), ("https://mp.astria.ai/2.jpg", "held-2")] {
            exec(db, &format!("INSERT INTO generated_images VALUES ('o-held', '{url}', 1, '{m}', {})", ago(40)));
        }
        // The weekly cleanup leaves an opted-out contact alone while portraits wait for START.
        cleanup::run(db, db, NOW, &cleanup::Retention::default(), 100).unwrap();
        assert_eq!(ids(db, "SELECT id FROM outbound_messages"), ["held-1", "held-2", "held-new"]);
        assert_eq!(ids(db, "SELECT wa_id FROM contacts"), ["quiet"]);
        assert_eq!(ids(db, "SELECT message_id FROM generated_images"), ["held-1", "held-2"], "the links to the order");

        // Held for longer than the limit: each message once, portraits with their order.
        let limit = ago(25);
        let held = messages::held_since(db, limit, 10).unwrap();
        let seen: Vec<(&str, Option<&str>)> = held.iter().map(|h| (h.id.as_str(), h.order_id.as_deref())).collect();
        assert_eq!(seen, [("held-1", Some("o-held")), ("held-2", Some("o-held"))]);
        assert!(messages::give_up_held(db, "held-1", NOW).unwrap());
        assert!(!messages::give_up_held(db, "held-1", NOW).unwrap(), "once");
        assert!(messages::give_up_held(db, "held-2", NOW).unwrap());
        assert!(messages::held_since(db, limit, 10).unwrap().is_empty());
        assert_eq!(ids(db, "SELECT id FROM outbound_messages WHERE status = 'held'"), ["held-new"]);
    });
}

#[test]
fn the_metrics_snapshot_counts_exactly_what_the_tables_hold() {
    use astria_store::metrics;
    on_both_with_inbox(|db, inbox| {
        assert_eq!(metrics::snapshot(db, inbox, 1).unwrap().delivery_count, 0, "an empty database has no deliveries");
        repo::touch_contact(db, "16505551234", None, 1_000).unwrap();
        let order = |id: &str, status: &str, updated: i64, paid: Option<i64>| {
            let paid = paid.map(Value::Int).unwrap_or(Value::Null);
            db.execute(
                "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at, paid_at)
                 VALUES ($1, '16505551234', 'corporate', $2, 1999, 'usd', 0, $3, $4)",
                &[id.into(), status.into(), Value::Int(updated), paid],
            )
            .unwrap();
        };
        order("o1", "delivered", 200_000, Some(80_000)); // 120 s
        order("o2", "delivered", 4_000_000, Some(0)); // 4000 s
        order("o3", "training", 5_000, Some(1_000));
        order("o4", "training", 9_000, Some(2_000));
        let outbox = |id: &str, channel: &str, status: &str, created: i64| {
            db.execute(
                "INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, created_at, status, next_attempt_at)
                 VALUES ($1, $2, 'order.paid', '{}', 'c', $3, $4, 0)",
                &[id.into(), channel.into(), Value::Int(created), status.into()],
            )
            .unwrap();
        };
        outbox("e1", "astria.orders", status::PENDING, 700);
        outbox("e2", "astria.orders", status::PUBLISHED, 300);
        outbox("e3", "astria.orders", status::DONE, 100);
        outbox("e4", "astria.messages", status::DEAD, 100);
        db.execute(
            "INSERT INTO payment_issues (event_id, kind, detail, created_at) VALUES ('evt_1', 'refund', 'd', 1)",
            &[],
        )
        .unwrap();
        let message = |id: &str, status: &str| {
            db.execute(
                "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id,
                 next_attempt_at, created_at, updated_at) VALUES ($1, '16505551234', 1, 'image', '{}', $2, 'e', 'c', 0, 0, 0)",
                &[id.into(), status.into()],
            )
            .unwrap();
        };
        message("m1", messages::status::SENT);
        message("m2", messages::status::SENT);
        message("m3", messages::status::FAILED);
        for (url, m) in [("https://a/1", "m1"), ("https://a/2", "m2"), ("https://a/3", "m3")] {
            db.execute(
                "INSERT INTO generated_images (order_id, url, prompt_id, message_id, created_at) VALUES ('o1', $1, 1, $2, 0)",
                &[url.into(), m.into()],
            )
            .unwrap();
        }

        // Replica b last heard the heartbeat two days ago: gone, not listed.
        heartbeats::record(db, "a", "astria.orders", 1_000_000).unwrap();
        heartbeats::record(db, "a", "astria.orders", 1_500_000).unwrap();
        heartbeats::record(db, "b", "astria.orders", 1_500_000 - 2 * 86_400_000).unwrap();
        // The inbox's figures come from the inbox's database (on SQLite a file of its own).
        for (id, at) in [("aside", 1_400_000), ("older", 1_450_000), ("newer", 1_550_000)] {
            inbox::accept(inbox, id, "{}", "r", at).unwrap();
        }
        inbox::set_aside(inbox, "aside", "boom", 1_500_000).unwrap();
        let s = metrics::snapshot(db, inbox, 1_600_000).unwrap();
        assert_eq!((s.inbox_waiting, s.inbox_oldest, s.inbox_set_aside), (2, Some(1_450_000), 1));
        let heard: Vec<(&str, &str, i64)> =
            s.heartbeats.iter().map(|h| (h.channel.as_str(), h.replica.as_str(), h.seen_at)).collect();
        assert_eq!(heard, [("astria.orders", "a", 1_500_000)]);
        let mut orders = s.orders.clone();
        orders.sort();
        assert_eq!(orders, vec![("delivered".into(), 2, 200_000), ("training".into(), 2, 5_000)]);
        assert_eq!(s.outbox_backlog, vec![("astria.orders".into(), 2, 300)]);
        assert_eq!(s.dead_letters, vec![("astria.messages".into(), 1)]);
        assert_eq!(s.payment_issues_open, 1);
        assert_eq!(s.messages, vec![("failed".into(), 1)]);
        assert_eq!(s.portraits_delivered, 2, "the image whose message failed is not delivered");
        // Buckets 60, 300, 900, 1800, 3600, 7200, ...: 120 s falls in 300, 4000 s in 7200.
        assert_eq!(s.delivery_buckets, vec![0, 1, 1, 1, 1, 2, 2, 2]);
        assert_eq!((s.delivery_count, s.delivery_sum_ms), (2, 4_120_000));
    });
}

/// What the metrics' history counts are, counted the slow way: over every row.
fn counted_over_every_row(db: &dyn Db) -> (Vec<(String, i64)>, i64, Vec<i64>, i64, i64, Vec<(String, i64)>) {
    let pairs = |sql: &str| -> Vec<(String, i64)> {
        let mut v: Vec<(String, i64)> =
            db.query(sql, &[]).unwrap().iter().map(|r| (r.text(0).unwrap(), r.int(1).unwrap())).collect();
        v.sort();
        v
    };
    let one = |sql: &str| db.query(sql, &[]).unwrap()[0].int(0).unwrap();
    let orders = pairs("SELECT status, COUNT(*) FROM orders GROUP BY status");
    let portraits = one(
        "SELECT COUNT(*) FROM generated_images g JOIN outbound_messages m ON m.id = g.message_id WHERE m.status = 'sent'",
    );
    let delivered = "FROM orders WHERE status = 'delivered' AND paid_at IS NOT NULL";
    let buckets = astria_store::metrics::DELIVERY_BUCKETS_S
        .iter()
        .map(|le| one(&format!("SELECT COUNT(*) {delivered} AND updated_at - paid_at <= {}", le * 1000)))
        .collect();
    let count = one(&format!("SELECT COUNT(*) {delivered}"));
    let sum = one(&format!("SELECT CAST(COALESCE(SUM(updated_at - paid_at), 0) AS BIGINT) {delivered}"));
    let refunds = pairs("SELECT status, COUNT(*) FROM refunds GROUP BY status");
    (orders, portraits, buckets, count, sum, refunds)
}

/// The metrics' history counts as the tallies keep them, in [`counted_over_every_row`]'s shape
/// (the inbox's figures, which the snapshot reads too, from the same database).
fn tallied(db: &dyn Db) -> (Vec<(String, i64)>, i64, Vec<i64>, i64, i64, Vec<(String, i64)>) {
    let s = astria_store::metrics::snapshot(db, db, NOW).unwrap();
    let mut orders: Vec<(String, i64)> = s.orders.iter().map(|(st, n, _)| (st.clone(), *n)).collect();
    orders.sort();
    (orders, s.portraits_delivered, s.delivery_buckets, s.delivery_count, s.delivery_sum_ms, s.refunds)
}

/// The tallies (migration 17's triggers) follow every insert, update and delete, whoever
/// makes it, folded or not: at each step they say what a count over every row says. Among
/// the changes: orders moving through statuses, delivered and un-delivered, a delivered
/// order's times corrected, portraits linked before and after their message is sent, rows
/// removed by the weekly cleanup, and refunds changing status.
#[test]
fn the_tallies_follow_every_change_folded_or_not() {
    use astria_store::tallies;
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        // The cleanup below looks at the inbox too: here in the same file (SQLite).
        migrate_inbox(db, 0).unwrap();
        let check = |when: &str| {
            let (want, got) = (counted_over_every_row(db), tallied(db));
            assert_eq!(got, want, "{when}: tallied (left) against counted (right)");
        };
        check("empty");
        seed(db, db);
        exec(db, "UPDATE orders SET paid_at = updated_at - 100000 WHERE status = 'delivered'");
        check("seeded");
        // Through the statuses, the way the app moves an order.
        exec(db, "UPDATE orders SET status = 'paid', paid_at = 1000, updated_at = 2000 WHERE id = 'awaiting-recent'");
        exec(db, "UPDATE orders SET status = 'training', updated_at = 3000 WHERE id = 'awaiting-recent'");
        exec(db, "UPDATE orders SET status = 'delivered', updated_at = 4000000 WHERE id = 'awaiting-recent'");
        check("delivered");
        assert!(tallies::fold(db).unwrap() > 0, "deltas to fold");
        assert_eq!(tallies::fold(db).unwrap(), 0, "folded once");
        check("folded");
        // A correction of a delivered order's times moves it between buckets; an update that
        // changes neither status nor times moves nothing.
        exec(db, "UPDATE orders SET updated_at = 30000 WHERE id = 'awaiting-recent'");
        exec(db, "UPDATE orders SET pack_id = 'q' WHERE id = 'awaiting-recent'");
        exec(db, "UPDATE orders SET status = 'delivery_failed' WHERE id = 'delivered-recent'");
        exec(db, "UPDATE orders SET paid_at = NULL WHERE id = 'delivered-old'");
        check("corrected");
        // Portraits: linked to a queued message that is then sent; to a sent one; relinked;
        // a sent message with two portraits deleted.
        exec(
            db,
            "INSERT INTO generated_images VALUES ('delivered-old', 'https://mp.astria.ai/1.jpg', 1, 'queued-old', 0)",
        );
        exec(
            db,
            "INSERT INTO generated_images VALUES ('delivered-old', 'https://mp.astria.ai/2.jpg', 1, 'sent-recent', 0)",
        );
        exec(
            db,
            "INSERT INTO generated_images VALUES ('delivered-old', 'https://mp.astria.ai/3.jpg', 1, 'sent-recent', 0)",
        );
        check("portraits linked");
        exec(db, "UPDATE outbound_messages SET status = 'sent' WHERE id = 'queued-old'");
        exec(db, "UPDATE generated_images SET message_id = 'failed-old' WHERE url = 'https://mp.astria.ai/1.jpg'");
        exec(db, "UPDATE outbound_messages SET status = 'queued' WHERE id = 'queued-old'");
        check("portraits sent and moved");
        tallies::fold(db).unwrap();
        exec(db, "DELETE FROM outbound_messages WHERE id = 'sent-recent'");
        exec(db, "DELETE FROM generated_images WHERE url = 'https://mp.astria.ai/2.jpg'");
        check("portraits deleted");
        // Refunds.
        let refund = |id: &str, status: &str| {
            exec(
                db,
                &format!("INSERT INTO refunds (id, status, created_at, updated_at) VALUES ('{id}', '{status}', 0, 0)"),
            )
        };
        refund("r1", "requested");
        refund("r2", "pending");
        exec(db, "UPDATE refunds SET status = 'succeeded' WHERE id = 'r2'");
        exec(db, "UPDATE refunds SET status = 'pending' WHERE id = 'r1'");
        exec(db, "UPDATE refunds SET attempts = 2 WHERE id = 'r1'");
        check("refunds");
        // The weekly cleanup removes orders, messages and portraits by the batch.
        let report = cleanup::run(db, db, NOW, &cleanup::Retention::default(), 2).unwrap();
        assert!(report.orders_removed + report.messages_removed + report.generated_images > 0, "{report:?}");
        check("cleaned up");
        tallies::fold(db).unwrap();
        exec(db, "DELETE FROM refunds WHERE id = 'r2'");
        check("folded, then a refund removed");
        assert_eq!(db.query("SELECT COUNT(*) FROM tally_deltas", &[]).unwrap()[0].int(0).unwrap(), 1);
    });
}

/// PostgreSQL, two writers at once: the sender marks a portrait's message sent while the
/// weekly cleanup deletes the portrait. Each trigger reads the other table; without a lock
/// the message's trigger would count the pair (the deletion is not committed) and the image's
/// would not subtract it (the message not yet sent), one too many for good. The image's
/// trigger waits for the message's row instead, and the tally stays exact.
#[test]
fn a_portrait_deleted_while_its_message_is_sent_is_counted_exactly_postgres() {
    let database = PgDatabase::new();
    let (sender, cleanup) = (database.connect(), database.connect());
    migrate(&sender, 0).unwrap();
    exec(&sender, "INSERT INTO contacts (wa_id, conversation, updated_at) VALUES ('ana', '{}', 0)");
    exec(
        &sender,
        "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id,
         next_attempt_at, created_at, updated_at) VALUES ('m', 'ana', 1, 'image', '{}', 'queued', 'e', 'c', 0, 0, 0)",
    );
    exec(&sender, "INSERT INTO generated_images VALUES ('o', 'https://mp.astria.ai/a.jpg', 1, 'm', 0)");
    exec(&sender, "BEGIN");
    exec(&sender, "UPDATE outbound_messages SET status = 'sent' WHERE id = 'm'");
    let deleting = std::thread::spawn(move || {
        exec(&cleanup, "DELETE FROM generated_images WHERE message_id = 'm'");
        cleanup
    });
    // The deletion waits for the sender's row: seen in pg_stat_activity, not assumed.
    let watcher = database.connect();
    let never = "the deletion never waited for the message's row";
    let row = ["transactionid", "tuple"];
    until_it_waits_on_a_lock(&watcher, "DELETE FROM generated_images", &row, || deleting.is_finished(), never);
    exec(&sender, "COMMIT");
    let cleanup = deleting.join().unwrap();
    assert_eq!(tallied(&cleanup), counted_over_every_row(&cleanup));
    assert_eq!(tallied(&cleanup).1, 0, "no portrait is delivered: its row is gone");
}

/// A burst (here 25,000 orders in one statement, as a bulk import writes them) is folded in
/// batches of `FOLD_BATCH`, never as one result the size of the burst, and every delta lands.
#[test]
fn a_burst_of_deltas_is_folded_in_bounded_batches() {
    use astria_store::tallies;
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        exec(db, "INSERT INTO contacts (wa_id, conversation, updated_at) VALUES ('ana', '{}', 0)");
        exec(
            db,
            "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 25000)
             INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at)
             SELECT 'o-' || i, 'ana', 'p', 'paid', 1999, 'usd', 0, 0 FROM c",
        );
        assert!(25_000 > 2 * tallies::FOLD_BATCH, "more than two batches");
        assert_eq!(tallies::fold(db).unwrap(), 25_000);
        assert_eq!(db.query("SELECT COUNT(*) FROM tally_deltas", &[]).unwrap()[0].int(0).unwrap(), 0);
        assert_eq!(tallies::read(db).unwrap().get("orders:paid"), Some(&25_000));
    });
}

/// Two folds at once and writers beside them: every delta is folded exactly once.
#[test]
fn concurrent_folds_take_each_delta_once() {
    use astria_store::tallies;
    on_both(|connect| {
        let db = connect();
        migrate(db.as_ref(), 0).unwrap();
        exec(db.as_ref(), "INSERT INTO contacts (wa_id, conversation, updated_at) VALUES ('ana', '{}', 0)");
        let n = 4;
        let barrier = Arc::new(Barrier::new(n));
        let handles: Vec<_> = (0..n)
            .map(|t| {
                let db = connect();
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    for i in 0..25 {
                        let id = format!("o-{t}-{i}");
                        retry(|| {
                            db.execute(
                                "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at)
                                 VALUES ($1, 'ana', 'p', 'paid', 1999, 'usd', 0, 0)",
                                &[Value::from(id.as_str())],
                            )
                        });
                        if i % 5 == 0 {
                            retry(|| tallies::fold(db.as_ref()));
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        let db = connect();
        tallies::fold(db.as_ref()).unwrap();
        assert_eq!(tallies::read(db.as_ref()).unwrap().get("orders:paid"), Some(&100));
    });
}

/// SQLite answers "database is locked" to a writer that waited its 5 s out; these tests'
/// writers retry as the app's callers do.
fn retry<T>(mut f: impl FnMut() -> Result<T, DbError>) -> T {
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if format!("{e}").contains("locked") || format!("{e}").contains("busy") => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

const PHONE: &str = "16505551234";
const BSUID: &str = "US.13491208655302741918";

fn who<'a>(phone: Option<&'a str>, bsuid: Option<&'a str>) -> Ids<'a> {
    Ids { phone, bsuid, parent_bsuid: None }
}

#[test]
fn a_contact_is_found_by_bsuid_then_phone_and_gains_every_identifier_it_is_seen_with() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        // A username customer: keyed by the BSUID, sent to as a user id.
        let first = identity::identify(db, who(None, Some(BSUID)), Some("Ana"), 1_000, "fresh-1", 1_000).unwrap();
        assert_eq!((first.key.as_str(), first.new), (BSUID, true));
        assert_eq!(identity::recipient(db, BSUID).unwrap(), Some(Recipient::User(BSUID.into())));
        // Later seen with the phone too: the same contact, now sent to by phone.
        let again = identity::identify(db, who(Some(PHONE), Some(BSUID)), None, 2_000, "fresh-2", 2_000).unwrap();
        assert_eq!((again.key.as_str(), again.new, again.merged.len()), (BSUID, false, 0));
        assert_eq!(identity::recipient(db, BSUID).unwrap(), Some(Recipient::Phone(PHONE.into())));
        // By phone alone it is still them.
        assert_eq!(identity::find(db, who(Some(PHONE), None)).unwrap().as_deref(), Some(BSUID));
        let (contact, _) = repo::get_contact(db, BSUID).unwrap().unwrap();
        assert_eq!(contact.profile_name.as_deref(), Some("Ana"));
        assert_eq!(db.query("SELECT COUNT(*) FROM contacts", &[]).unwrap()[0].int(0).unwrap(), 1);
    });
}

#[test]
fn a_person_seen_by_phone_then_by_bsuid_then_by_both_becomes_one_contact_with_every_order() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        let by_phone = identity::identify(db, who(Some(PHONE), None), None, 1, "f1", 1).unwrap().key;
        let price = usd(1999);
        repo::create_order(db, &NewOrder { wa_id: &by_phone, ..new_order("o-phone", &price) }, 2).unwrap();
        repo::save_conversation(db, &by_phone, r#"{"state":"order","order_id":"o-phone"}"#, 2).unwrap();
        repo::set_opt_out(db, &by_phone, true, 2).unwrap();
        let by_bsuid = identity::identify(db, who(None, Some(BSUID)), None, 3, "f2", 3).unwrap().key;
        assert_ne!(by_phone, by_bsuid, "nothing said yet that they are one person");
        repo::save_conversation(db, &by_bsuid, r#"{"state":"choosing_pack"}"#, 3).unwrap();

        let both =
            transaction(db, |db| identity::identify(db, who(Some(PHONE), Some(BSUID)), None, 4, "f3", 4)).unwrap();
        assert_eq!((both.key.as_str(), both.merged.clone()), (by_bsuid.as_str(), vec![by_phone.clone()]));
        let contacts = db.query("SELECT wa_id, phone, bsuid, opted_out, conversation FROM contacts", &[]).unwrap();
        assert_eq!(contacts.len(), 1);
        let c = &contacts[0];
        assert_eq!(
            (c.text(0).unwrap(), c.opt_text(1).unwrap(), c.opt_text(2).unwrap(), c.int(3).unwrap()),
            (by_bsuid.clone(), Some(PHONE.into()), Some(BSUID.into()), 1),
            "one contact with both identifiers, still opted out"
        );
        assert_eq!(c.text(4).unwrap(), r#"{"state":"order","order_id":"o-phone"}"#, "the open order goes on");
        assert_eq!(repo::get_order(db, "o-phone").unwrap().unwrap().wa_id, by_bsuid, "the order moved");
    });
}

#[test]
fn a_number_change_moves_the_identifiers_and_takes_a_recycled_number_from_its_old_holder() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        let ana = identity::identify(db, who(Some(PHONE), Some(BSUID)), None, 1, "f1", 1).unwrap().key;
        // Someone else had the number Ana moves to.
        let old_holder = identity::identify(db, who(Some("16505559876"), None), None, 1, "f2", 1).unwrap().key;
        let new = who(Some("16505559876"), Some("US.48120937561029384756"));
        let merged = identity::attach(db, &ana, new, Merge::Never, 2).unwrap();
        assert!(merged.is_empty(), "a number change never merges two people");
        assert_eq!(identity::recipient(db, &ana).unwrap(), Some(Recipient::Phone("16505559876".into())));
        assert_eq!(identity::find(db, who(None, Some("US.48120937561029384756"))).unwrap(), Some(ana.clone()));
        assert_eq!(identity::find(db, who(None, Some(BSUID))).unwrap(), None, "the old BSUID is gone with the number");
        assert_eq!(identity::recipient(db, &old_holder).unwrap(), None, "the old holder lost the number, kept its key");
        // A new person writing from Ana's old number gets a contact of their own.
        let newcomer = identity::identify(db, who(Some(PHONE), None), None, 3, "fresh-key", 3).unwrap();
        assert!(newcomer.new);
        assert_eq!(newcomer.key, "fresh-key", "the old number is Ana's key: the newcomer gets a fresh one");
    });
}

#[test]
fn a_contact_written_by_the_release_before_usernames_is_found_by_its_phone() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        // What a pod of the previous release writes during a rollout: no identifier columns.
        repo::touch_contact(db, PHONE, Some("Ana"), 1).unwrap();
        assert_eq!(identity::recipient(db, PHONE).unwrap(), Some(Recipient::Phone(PHONE.into())));
        let seen = identity::identify(db, who(Some(PHONE), Some(BSUID)), None, 2, "f", 2).unwrap();
        assert_eq!((seen.key.as_str(), seen.new, seen.merged.len()), (PHONE, false, 0));
        assert_eq!(identity::find(db, who(None, Some(BSUID))).unwrap().as_deref(), Some(PHONE));
        assert!(identity::set_marketing_opt_out(db, who(None, Some(BSUID)), true, 3).unwrap());
        assert!(!identity::set_marketing_opt_out(db, who(Some("99"), None), true, 3).unwrap(), "unknown: nothing");
    });
}

/// The step's one read: `Known` only when `identify` would change no identifier, `New` only
/// for a stranger, anything else left to `identify`. Every answer is asked twice more, as the
/// worker asks it, with a message's dedupe (`recognise_first`, one statement on PostgreSQL):
/// the first delivery of a message id answers the same, its redelivery `None`.
#[test]
fn recognise_answers_known_only_when_nothing_would_change_and_new_only_for_a_stranger() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        let deliveries = std::cell::Cell::new(0);
        let recognise = |ids: Ids| {
            let plain = identity::recognise(db, ids).unwrap();
            deliveries.set(deliveries.get() + 1);
            let id = format!("wamid.recognise.{}", deliveries.get());
            let delivery = identity::Delivery { source: "whatsapp", external_id: &id, now_ms: 1 };
            let first = identity::recognise_first(db, delivery, ids).unwrap();
            assert_eq!(first.as_ref(), Some(&plain), "a first delivery answers as recognise does");
            assert_eq!(identity::recognise_first(db, delivery, ids).unwrap(), None, "a redelivery");
            plain
        };
        let known = |phone, bsuid| match recognise(who(phone, bsuid)) {
            Recognised::Known(k) => Some(k),
            _ => None,
        };
        let kind = |ids: Ids| match recognise(ids) {
            Recognised::Known(_) => "known",
            Recognised::New => "new",
            Recognised::Other => "other",
        };
        assert_eq!(kind(who(Some(PHONE), None)), "new");
        assert_eq!(kind(who(None, None)), "other", "no identifier to go by");
        let created = identity::create(db, who(Some(PHONE), None), Some("Ana"), 1_000, 1_000).unwrap();
        let idle = r#"{"state":"idle"}"#.to_string();
        let ana = Known { key: PHONE.into(), opted_out: false, conversation: idle, awaiting_window: false };
        assert_eq!(created, ana);
        assert_eq!(known(Some(PHONE), None), Some(ana.clone()));
        assert_eq!(kind(who(Some(PHONE), Some(BSUID))), "other", "a BSUID new to the contact is recorded first");
        identity::identify(db, who(Some(PHONE), Some(BSUID)), None, 2_000, "f", 2_000).unwrap();
        for (phone, bsuid) in [(Some(PHONE), Some(BSUID)), (None, Some(BSUID)), (Some(PHONE), None)] {
            assert_eq!(known(phone, bsuid).map(|k| k.key), Some(PHONE.to_string()), "{phone:?} {bsuid:?}");
        }
        let parent = Ids { parent_bsuid: Some("US.ENT.1"), ..who(Some(PHONE), None) };
        assert_eq!(kind(parent), "other", "a parent BSUID new to the contact");
        identity::identify(db, parent, None, 2_500, "f", 2_500).unwrap();
        assert_eq!(kind(parent), "known");
        // What the step reads: opt-out, conversation, and whether messages wait for the window.
        repo::set_opt_out(db, PHONE, true, 3_000).unwrap();
        repo::save_conversation(db, PHONE, r#"{"state":"choosing_pack"}"#, 3_000).unwrap();
        queue(db, "m-window", PHONE, 1, "text", 3_000);
        db.execute("UPDATE outbound_messages SET status = 'awaiting_window' WHERE id = 'm-window'", &[]).unwrap();
        let k = known(Some(PHONE), None).unwrap();
        assert_eq!(
            (k.opted_out, k.conversation.as_str(), k.awaiting_window),
            (true, r#"{"state":"choosing_pack"}"#, true)
        );
        // A BSUID held by another contact than the phone's: a merge, `identify`'s work.
        identity::create(db, who(Some("16505550000"), Some("US.OTHER")), None, 1, 1).unwrap();
        assert_eq!(kind(who(Some(PHONE), Some("US.OTHER"))), "other");
        // Creating a contact with an identifier another holds is refused, as a race would be.
        assert!(matches!(
            identity::create(db, who(Some("1650555999"), Some(BSUID)), None, 1, 1),
            Err(DbError::Conflict(_))
        ));
        // A previous release's row, and a key whose number moved away: never new, never known.
        repo::touch_contact(db, "16505557777", None, 1).unwrap();
        assert_eq!(kind(who(Some("16505557777"), None)), "other");
        db.execute("UPDATE contacts SET phone = NULL WHERE wa_id = '16505550000'", &[]).unwrap();
        assert_eq!(kind(who(Some("16505550000"), None)), "other", "the key is taken: identify picks a fresh one");
    });
}

/// The step's final write for a known contact refreshes the profile name and the window, the
/// window never backwards.
#[test]
fn saving_a_known_contacts_step_refreshes_the_profile_and_the_window_forward_only() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        identity::create(db, who(Some(PHONE), None), Some("Ana"), 5_000, 5_000).unwrap();
        let read = || {
            let r = &db
                .query(
                    &db.dialect()
                        .sql("SELECT profile_name, last_inbound_at, conversation FROM contacts WHERE wa_id = $1"),
                    &[Value::from(PHONE)],
                )
                .unwrap()[0];
            (r.opt_text(0).unwrap(), r.int(1).unwrap(), r.text(2).unwrap())
        };
        repo::save_conversation_seen(db, PHONE, r#"{"state":"choosing_pack"}"#, None, 4_000, 6_000).unwrap();
        assert_eq!(read(), (Some("Ana".into()), 5_000, r#"{"state":"choosing_pack"}"#.into()), "a late message");
        repo::save_conversation_seen(db, PHONE, r#"{"state":"idle"}"#, Some("Ana B"), 7_000, 7_000).unwrap();
        assert_eq!(read(), (Some("Ana B".into()), 7_000, r#"{"state":"idle"}"#.into()));
    });
}

/// Marking events published and removing inbox rows by the list take more values than one
/// statement binds.
#[test]
fn lists_longer_than_one_statement_binds_are_marked_and_removed_whole() {
    on_both_with_inbox(|db, ib| {
        let n = astria_store::LIST_CHUNK * 2 + 1;
        let ids: Vec<String> = (0..n).map(|i| format!("e{i}")).collect();
        for id in &ids {
            outbox::enqueue(db, "orders", &event(id), 1, &POLICY).unwrap();
            inbox::accept(ib, id, "{}", "req", 1).unwrap();
        }
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        outbox::mark_published_all(db, &refs[1..]).unwrap();
        let published =
            db.query("SELECT COUNT(*) FROM outbox WHERE status = 'published'", &[]).unwrap()[0].int(0).unwrap();
        assert_eq!(published, n as i64 - 1);
        inbox::done_all(ib, &ids[1..]).unwrap();
        assert_eq!(inbox::next(ib, 10).unwrap().iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), vec!["e0"]);
    });
}

#[test]
fn a_payment_is_refunded_once_whoever_asks_and_a_dashboard_refund_counts() {
    use astria_store::refunds::{self, status, NewRefund};
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate(db, 0).unwrap();
        let paid = usd(1999);
        let ask = |issue: &'static str, pi: Option<&'static str>| NewRefund {
            issue_id: issue,
            order_id: Some("o1"),
            payment_intent: pi,
            session_id: Some("cs_1"),
            amount: Some(&paid),
        };
        assert!(refunds::request(db, &ask("issue-1", Some("pi_1")), 1).unwrap());
        assert!(!refunds::request(db, &ask("issue-1", Some("pi_1")), 2).unwrap(), "the same issue again");
        assert!(!refunds::request(db, &ask("issue-2", Some("pi_1")), 2).unwrap(), "another issue, the same payment");
        let r = refunds::get(db, "issue-1").unwrap().unwrap();
        assert_eq!((r.status.as_str(), r.amount.clone(), r.key_generation), (status::REQUESTED, Some(paid.clone()), 0));
        // Booked once; a repeated report changes nothing, and the customer is told once.
        assert!(refunds::settle(db, "issue-1", status::SUCCEEDED, Some("re_1"), None, 3).unwrap());
        assert!(!refunds::settle(db, "issue-1", status::SUCCEEDED, Some("re_1"), None, 4).unwrap());
        assert!(refunds::mark_customer_told(db, "issue-1").unwrap());
        assert!(!refunds::mark_customer_told(db, "issue-1").unwrap());
        assert_eq!(refunds::by_stripe_id(db, "re_1").unwrap().unwrap().id, "issue-1");
        assert!(!refunds::request_again(db, "issue-1", 5).unwrap(), "done: not asked again");
        // A refund made in the dashboard for another payment is recorded; the app's ask for
        // that payment then finds it.
        let dash = refunds::record_at_stripe(db, "re_dash", "pi_2", Some("o2"), status::SUCCEEDED, Some(&paid), 6)
            .unwrap()
            .unwrap();
        assert_eq!((dash.id.as_str(), dash.customer_told), ("stripe:re_dash", true));
        // The same Stripe refund named with another payment contradicts the first report: none.
        assert_eq!(refunds::record_at_stripe(db, "re_dash", "pi_9", None, status::SUCCEEDED, None, 6).unwrap(), None);
        assert_eq!(refunds::of_payment(db, "pi_9").unwrap(), None, "nothing booked for the contradicting payment");
        assert!(!refunds::request(db, &NewRefund { payment_intent: Some("pi_2"), ..ask("issue-3", None) }, 7).unwrap());
        // Refused, then asked again with a fixed cause; a new key only from the generation seen.
        assert!(refunds::request(db, &ask("issue-4", None), 8).unwrap());
        assert!(refunds::set_payment_intent(db, "issue-4", "pi_4", 9).unwrap());
        assert!(refunds::settle(db, "issue-4", status::REFUSED, None, Some("Stripe answered 402"), 10).unwrap());
        assert!(refunds::request_again(db, "issue-4", 11).unwrap());
        assert_eq!(refunds::get(db, "issue-4").unwrap().unwrap().key_generation, 1, "a refused key is not used again");
        assert!(refunds::next_key(db, "issue-4", 1, 12).unwrap());
        assert!(!refunds::next_key(db, "issue-4", 1, 12).unwrap(), "moved once by concurrent workers");
        let counts = refunds::count_by_status(db).unwrap();
        assert!(
            counts.contains(&("requested".to_string(), 1)) && counts.contains(&("succeeded".to_string(), 2)),
            "{counts:?}"
        );
        assert_eq!(refunds::oldest_waiting_since(db).unwrap(), Some(12));
    });
}

// ------------------------------------------------------------------ the inbox

#[test]
fn an_inbox_row_is_stored_once_per_body_without_a_migrated_schema_it_says_so() {
    on_both(|connect| {
        let db = connect();
        // Before any migration, the insert fails in the way the webhook recognises (and then
        // migrates): SQLite's "no such table", PostgreSQL's 42883 (its function is not there yet).
        let missing = inbox::accept(db.as_ref(), "h1", "{}", "r1", 1).unwrap_err();
        assert!(missing.is_missing_schema(), "{missing:?}");
        migrate_inbox(db.as_ref(), 1).unwrap();
        assert_eq!(inbox::accept(db.as_ref(), "h1", r#"{"a":1}"#, "r1", 10).unwrap(), NEW);
        assert_eq!(
            inbox::accept(db.as_ref(), "h1", r#"{"a":1}"#, "r2", 11).unwrap(),
            inbox::Accepted::Duplicate,
            "the same body again"
        );
        let rows = inbox::next(db.as_ref(), 10).unwrap();
        assert_eq!(
            rows,
            vec![inbox::Entry {
                id: "h1".into(),
                body: r#"{"a":1}"#.into(),
                request_id: "r1".into(),
                received_at: 10,
                attempts: 0
            }]
        );
        inbox::done(db.as_ref(), "h1").unwrap();
        assert!(inbox::next(db.as_ref(), 10).unwrap().is_empty());
        assert_eq!(
            inbox::accept(db.as_ref(), "h1", r#"{"a":1}"#, "r3", 12).unwrap(),
            NEW,
            "stored again once worked through"
        );
    });
}

/// What a new body's row answers while no worker drains the inbox and no wake-up is pending.
const NEW: inbox::Accepted = inbox::Accepted::NeedsWake;

#[test]
fn storing_a_body_says_whether_a_worker_holds_the_inbox() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate_inbox(db, 1).unwrap();
        assert_eq!(inbox::accept(db, "a", "{}", "r", 100).unwrap(), NEW, "nobody drains");
        assert!(lease::acquire(db, lease::Kind::Job, inbox::LEASE, "worker", 100, 1_000).unwrap());
        assert_eq!(inbox::accept(db, "b", "{}", "r", 200).unwrap(), inbox::Accepted::Draining);
        assert_eq!(inbox::accept(db, "b", "{}", "r", 300).unwrap(), inbox::Accepted::Duplicate);
        // Another job's lease is not the inbox's.
        lease::release(db, lease::Kind::Job, inbox::LEASE, "worker").unwrap();
        assert!(lease::acquire(db, lease::Kind::Job, "cleanup", "worker", 300, 1_000).unwrap());
        assert_eq!(inbox::accept(db, "c", "{}", "r", 400).unwrap(), NEW, "released");
        assert!(lease::acquire(db, lease::Kind::Job, inbox::LEASE, "worker", 400, 1_000).unwrap());
        assert_eq!(inbox::accept(db, "d", "{}", "r", 1_401).unwrap(), NEW, "the lease lapsed at 1,400");
        assert_eq!(inbox::next(db, 10).unwrap().len(), 4);
    });
}

/// Of the webhooks that find no worker draining, the first claims the wake-up and the others,
/// while it is pending, count on it: until a drainer gives the lease back (which clears it),
/// for at most `inbox::WAKE_PENDING_MS`, or until the webhook that claimed it gives it up
/// because it could not publish. A worker draining comes first: nobody need be woken then.
#[test]
fn a_webhook_wakes_nobody_while_another_webhooks_wake_up_is_pending() {
    on_both(|connect| {
        let db = connect();
        let db = db.as_ref();
        migrate_inbox(db, 1).unwrap();
        let pending = inbox::Accepted::WakePending;
        assert_eq!(inbox::accept(db, "a", "{}", "ra", 100).unwrap(), NEW);
        assert!(inbox::claim_wake(db, "ra", 100).unwrap(), "a publishes the wake-up");
        assert!(!inbox::claim_wake(db, "rx", 101).unwrap(), "another webhook that found nobody counts on a's");
        assert_eq!(inbox::accept(db, "b", "{}", "rb", 200).unwrap(), pending);
        assert_eq!(inbox::accept(db, "b", "{}", "rb", 201).unwrap(), inbox::Accepted::Duplicate);
        // The worker it woke drains, and gives the lease back: the wake-up is spent.
        assert!(lease::acquire(db, lease::Kind::Job, inbox::LEASE, "worker", 300, 60_000).unwrap());
        assert_eq!(inbox::accept(db, "c", "{}", "rc", 400).unwrap(), inbox::Accepted::Draining);
        inbox::release(db, "worker").unwrap();
        assert_eq!(inbox::accept(db, "d", "{}", "rd", 500).unwrap(), NEW, "the release cleared the wake-up");
        // A wake-up published during a drain, that found the lease taken: the release clears it too.
        assert!(inbox::claim_wake(db, "rd", 500).unwrap());
        assert!(lease::acquire(db, lease::Kind::Job, inbox::LEASE, "worker", 510, 60_000).unwrap());
        inbox::release(db, "worker").unwrap();
        assert_eq!(inbox::accept(db, "e", "{}", "re", 520).unwrap(), NEW);
        // A wake-up lost on the way: pending for WAKE_PENDING_MS, then the next webhook wakes.
        assert!(inbox::claim_wake(db, "re", 600).unwrap());
        let lapsed = 600 + inbox::WAKE_PENDING_MS;
        assert_eq!(inbox::accept(db, "f", "{}", "rf", lapsed).unwrap(), pending, "still pending at its end");
        assert_eq!(inbox::accept(db, "g", "{}", "rg", lapsed + 1).unwrap(), NEW, "lapsed");
        assert!(inbox::claim_wake(db, "rg", lapsed + 1).unwrap(), "a lapsed wake-up is claimed again");
        // One that could not be published is given up at once; another's is not.
        inbox::unclaim_wake(db, "rx").unwrap();
        assert_eq!(inbox::accept(db, "h", "{}", "rh", lapsed + 2).unwrap(), pending, "rx held none");
        inbox::unclaim_wake(db, "rg").unwrap();
        assert_eq!(inbox::accept(db, "i", "{}", "ri", lapsed + 3).unwrap(), NEW);
        // Another job's lease is neither.
        assert!(lease::acquire(db, lease::Kind::Job, "cleanup", "job", lapsed, 60_000).unwrap());
        assert_eq!(inbox::accept(db, "j", "{}", "rj", lapsed + 4).unwrap(), NEW);
        inbox::release(db, "worker").unwrap();
        assert!(!lease::acquire(db, lease::Kind::Job, "cleanup", "other", lapsed + 5, 60_000).unwrap(), "kept");
        assert_eq!(inbox::next(db, 20).unwrap().len(), 10, "every body stored once");
    });
}

/// Waits until a statement of this test's database starting with `prefix` waits on a lock of
/// one of `kinds` (pg_stat_activity's `wait_event`: "advisory", "transactionid", "tuple"),
/// seen in pg_stat_activity, not assumed; fails with `never` if `finished` says the thread
/// running it got through without waiting.
fn until_it_waits_on_a_lock(watcher: &Pg, prefix: &str, kinds: &[&str], finished: impl Fn() -> bool, never: &str) {
    let kinds = kinds.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
    let sql = format!(
        "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'
         AND wait_event IN ({kinds}) AND query LIKE $1"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let waiting = || watcher.query(&sql, &[Value::from(format!("{prefix}%").as_str())]).unwrap()[0].int(0).unwrap() > 0;
    while !waiting() {
        assert!(!finished(), "{never}");
        assert!(std::time::Instant::now() < deadline, "{never} (nothing waited within 20 s)");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// A migrated PostgreSQL database whose inbox lease "worker" holds, with three connections to
/// it: a webhook's, the drainer's and a watcher's.
fn inbox_held_by_a_worker() -> (PgDatabase, [Pg; 3]) {
    let database = PgDatabase::new();
    let connections = [database.connect(), database.connect(), database.connect()];
    migrate(&connections[0], 0).unwrap();
    assert!(lease::acquire(&connections[1], lease::Kind::Job, inbox::LEASE, "worker", 100, 60_000).unwrap());
    (database, connections)
}

/// PostgreSQL: a webhook that read the inbox's lease held (and so wakes nobody) has its row
/// committed before the drainer's release completes, so the drainer's look after the release
/// finds the row. The webhook is held between its lease read and its commit.
#[test]
fn a_release_waits_for_a_webhook_that_saw_the_lease_held_postgres() {
    let (_database, [webhook, drainer, watcher]) = inbox_held_by_a_worker();
    exec(&webhook, "BEGIN");
    assert_eq!(inbox::accept(&webhook, "late", "{}", "r", 200).unwrap(), inbox::Accepted::Draining);
    let releasing = std::thread::spawn(move || {
        inbox::release(&drainer, "worker").unwrap();
        inbox::next(&drainer, 10).unwrap()
    });
    let never = "the release did not wait for the webhook's row";
    until_it_waits_on_a_lock(&watcher, "SELECT astria_inbox_release", &["advisory"], || releasing.is_finished(), never);
    exec(&webhook, "COMMIT");
    let look = releasing.join().unwrap();
    assert_eq!(look.into_iter().map(|e| e.id).collect::<Vec<_>>(), ["late"], "the drainer's look finds the row");
    assert_eq!(inbox::accept(&webhook, "next", "{}", "r", 300).unwrap(), NEW, "released");
}

/// PostgreSQL: a webhook that read a wake-up pending (and so wakes nobody) while the worker that
/// wake-up brings takes the lease and reads the inbox before the webhook's row commits: that
/// drain's release waits for the row, and its look after the release finds it.
#[test]
fn a_release_waits_for_a_webhook_that_saw_a_wake_up_pending_postgres() {
    let database = PgDatabase::new();
    let [webhook, drainer, watcher] = [database.connect(), database.connect(), database.connect()];
    migrate(&webhook, 0).unwrap();
    assert!(inbox::claim_wake(&drainer, "another-webhook", 100).unwrap());
    exec(&webhook, "BEGIN");
    assert_eq!(inbox::accept(&webhook, "late", "{}", "r", 200).unwrap(), inbox::Accepted::WakePending);
    let draining = std::thread::spawn(move || {
        assert!(lease::acquire(&drainer, lease::Kind::Job, inbox::LEASE, "worker", 210, 60_000).unwrap());
        let first = inbox::next(&drainer, 10).unwrap();
        inbox::release(&drainer, "worker").unwrap();
        (first, inbox::next(&drainer, 10).unwrap())
    });
    let never = "the release did not wait for the webhook's row";
    until_it_waits_on_a_lock(&watcher, "SELECT astria_inbox_release", &["advisory"], || draining.is_finished(), never);
    exec(&webhook, "COMMIT");
    let (first, look) = draining.join().unwrap();
    assert!(first.is_empty(), "(the set-up) the drain read the inbox before the row committed: {first:?}");
    assert_eq!(look.into_iter().map(|e| e.id).collect::<Vec<_>>(), ["late"], "the look after the release finds it");
    assert_eq!(inbox::accept(&webhook, "next", "{}", "r", 300).unwrap(), NEW, "the wake-up was spent");
}

/// PostgreSQL: a webhook that comes while a release is under way waits for it and then reads
/// the lease released and the wake-up cleared (in a snapshot taken after the wait, not at its
/// statement's start), so it wakes a worker. The release is held in its delete, with the gate
/// taken, by a transaction that has the lease's row locked.
#[test]
fn a_webhook_during_a_release_reads_the_lease_released_postgres() {
    let (database, [webhook, drainer, watcher]) = inbox_held_by_a_worker();
    // A wake-up published during the drain, that found the lease taken.
    assert!(inbox::claim_wake(&webhook, "another-webhook", 150).unwrap());
    let row_holder = database.connect();
    exec(&row_holder, "BEGIN");
    exec(&row_holder, "SELECT 1 FROM job_leases WHERE name = 'inbox' FOR UPDATE");
    let releasing = std::thread::spawn(move || inbox::release(&drainer, "worker").unwrap());
    let at_the_row = ["transactionid", "tuple"];
    let never = "the release did not reach the lease's row";
    until_it_waits_on_a_lock(&watcher, "SELECT astria_inbox_release", &at_the_row, || releasing.is_finished(), never);
    let accepting = std::thread::spawn(move || inbox::accept(&webhook, "early", "{}", "r", 200).unwrap());
    let never = "the webhook did not wait for the release";
    until_it_waits_on_a_lock(&watcher, "SELECT astria_inbox_accept", &["advisory"], || accepting.is_finished(), never);
    exec(&row_holder, "COMMIT");
    releasing.join().unwrap();
    assert_eq!(accepting.join().unwrap(), NEW, "the lease read after the release committed: a worker is woken");
}

/// What an earlier release left waiting in the inbox of the app's database (before migration
/// 21): three rows, one of them set aside and one with failed steps, and its drainer's lease.
fn leave_rows_as_release_20_did(db: &dyn Db) {
    astria_store::migrations::migrate_up_to(db, 20, 0).unwrap();
    exec(db, "INSERT INTO inbox (id, body, request_id, received_at) VALUES ('second', '{}', 'r2', 200)");
    exec(db, "INSERT INTO inbox (id, body, request_id, received_at, attempts) VALUES ('first', '{}', 'r1', 100, 2)");
    exec(
        db,
        "INSERT INTO inbox (id, body, request_id, received_at, attempts, last_error, set_aside_at)
         VALUES ('aside', 'x', 'r0', 50, 5, 'boom', 60)",
    );
    exec(db, "INSERT INTO job_leases (name, holder, lease_until) VALUES ('inbox', 'old-drainer', 99999999999999)");
}

/// Every column of the inbox's rows, in arrival order.
fn inbox_rows(db: &dyn Db, table: &str) -> Vec<Vec<Value>> {
    let sql = format!(
        "SELECT id, body, request_id, received_at, attempts, last_error, set_aside_at FROM {table} ORDER BY received_at, id"
    );
    db.query(&sql, &[]).unwrap().into_iter().map(|r| r.0).collect()
}

/// SQLite: an upgrade moves the rows an earlier release left in the app's database into the
/// inbox's own as the inbox is created, as they were (every column), and each once ever: a row
/// found in the old place again (a move cut short between its copy and its delete) is not
/// stored a second time, even after it was worked through and removed. Migration 21 gives the
/// old drainer's lease up. PostgreSQL keeps its one database: nothing moves and every row is
/// where it was.
#[test]
fn an_upgrade_moves_the_inbox_rows_an_earlier_release_left_in_the_app_database() {
    let dir = tempfile::tempdir().unwrap();
    let app = Sqlite::open(&dir.path().join("store.db")).unwrap();
    let ib = Sqlite::open(&dir.path().join("inbox.db")).unwrap();
    leave_rows_as_release_20_did(&app);
    let before = inbox_rows(&app, "inbox");
    assert_eq!(migrate(&app, 1).unwrap(), (21..=latest_version()).collect::<Vec<_>>());
    assert_eq!(ids(&app, "SELECT name FROM job_leases"), Vec::<String>::new(), "the old drainer's lease is given up");
    assert_eq!(inbox::migrate_adopting(&app, &ib, 1).unwrap(), 3);
    assert_eq!(inbox_rows(&ib, "inbox"), before, "moved as they were");
    assert_eq!(ids(&app, "SELECT id FROM inbox_legacy"), Vec::<String>::new());
    assert_eq!(inbox::accept(&ib, "new", "{}", "r3", 300).unwrap(), NEW);
    assert_eq!(inbox::migrate_adopting(&app, &ib, 2).unwrap(), 0, "created once");
    assert_eq!(inbox::adopt(&app, &ib).unwrap(), 0, "nothing left to move");

    // A move cut short: "first" copied, not yet deleted; later worked through and removed.
    let again = "INSERT INTO inbox_legacy (id, body, request_id, received_at) VALUES ('first', '{}', 'r1', 100)";
    exec(&app, again);
    assert_eq!(inbox::adopt(&app, &ib).unwrap(), 0, "still waiting: one row");
    inbox::done(&ib, "first").unwrap();
    exec(&app, again);
    assert_eq!(inbox::adopt(&app, &ib).unwrap(), 0, "worked through: not stored again");
    assert_eq!(ids(&app, "SELECT id FROM inbox_legacy"), Vec::<String>::new(), "removed from the old place");
    assert_eq!(inbox::next(&ib, 10).unwrap().iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), ["second", "new"]);
    // A row never moved before is.
    exec(&app, "INSERT INTO inbox_legacy (id, body, request_id, received_at) VALUES ('late', '{}', 'r4', 150)");
    assert_eq!(inbox::adopt(&app, &ib).unwrap(), 1);
    assert_eq!(
        inbox::next(&ib, 10).unwrap().iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        ["late", "second", "new"]
    );

    let database = PgDatabase::new();
    let db = database.connect();
    leave_rows_as_release_20_did(&db);
    let before = inbox_rows(&db, "inbox");
    assert_eq!(migrate(&db, 1).unwrap(), (21..=latest_version()).collect::<Vec<_>>());
    assert_eq!(inbox::migrate_adopting(&db, &db, 1).unwrap(), 0);
    assert_eq!(inbox::adopt(&db, &db).unwrap(), 0);
    assert_eq!(inbox_rows(&db, "inbox"), before, "where they were");
}

#[test]
fn inbox_rows_come_in_arrival_order_and_a_failing_one_is_set_aside_after_its_attempts() {
    on_both(|connect| {
        let db = connect();
        migrate_inbox(db.as_ref(), 1).unwrap();
        // Arrival order, not key order: "c" came first.
        for (id, at) in [("c", 100), ("a", 200), ("b", 300)] {
            assert_eq!(inbox::accept(db.as_ref(), id, "{}", "r", at).unwrap(), NEW);
        }
        let order = |db: &dyn Db| inbox::next(db, 10).unwrap().into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(order(db.as_ref()), ["c", "a", "b"]);
        assert_eq!(inbox::next(db.as_ref(), 2).unwrap().len(), 2, "the limit holds");
        assert_eq!(inbox::backlog(db.as_ref()).unwrap(), (3, Some(100)));

        for attempt in 1..inbox::MAX_ATTEMPTS {
            assert!(!inbox::failed(db.as_ref(), "c", "boom", 1_000).unwrap(), "attempt {attempt} keeps it in line");
            assert_eq!(order(db.as_ref())[0], "c");
        }
        assert!(inbox::failed(db.as_ref(), "c", "boom", 1_000).unwrap(), "the last attempt sets it aside");
        assert_eq!(order(db.as_ref()), ["a", "b"]);
        assert_eq!(inbox::backlog(db.as_ref()).unwrap(), (2, Some(200)));
        assert_eq!(inbox::set_aside_count(db.as_ref()).unwrap(), 1);

        inbox::set_aside(db.as_ref(), "a", "unreadable", 1_000).unwrap();
        assert_eq!(order(db.as_ref()), ["b"]);
        assert_eq!(inbox::set_aside_count(db.as_ref()).unwrap(), 2);
    });
}
