//! "Nothing else happened" without sleeping and hoping: [`quiesce`] waits until the app has
//! nothing left to do, and fails the test with what is still pending if that never comes.
//!
//! The app is quiet when its database says so, on two checks in a row:
//! - no outbox event is pending or published but not completed (no consumer has work to do or
//!   is in the middle of it; an event waiting for its retry time counts as work),
//! - no outbox event is dead-lettered, unless the test says it expects some (`dead_ok`): a dead
//!   event is work the app gave up on, not work it finished,
//! - no outbound message is queued (the sender has nothing to send, now or later),
//! - no webhook waits in the inbox, and none was set aside (unless `dead_ok`),
//! - no sender or job lease is held (no sender or trainer is running).
//!
//! Each round calls the relay (`/maintenance/relay`), as the every-minute job would, so that
//! events whose retry time has come are published again. Counts compared after `quiesce` are
//! final: whatever the app was going to do, it did.

use std::time::{Duration, Instant};

use crate::db::TestDb;
use crate::TestApp;

/// What to wait for.
pub struct Quiet<'a> {
    /// Call the relay each round (the app runs maintenance-service).
    pub relay: bool,
    /// Event types no component of this app consumes (a test that leaves a worker out).
    pub ignore_event_types: &'a [&'a str],
    /// Make every outstanding event and queued message due before each relay call: time
    /// passes for the app's backoffs without the test waiting for it.
    pub fast_forward: bool,
    /// Dead-lettered events are what the test expects (a poison event): quiet regardless.
    pub dead_ok: bool,
    pub timeout: Duration,
}

impl Default for Quiet<'_> {
    fn default() -> Self {
        Quiet {
            relay: true,
            ignore_event_types: &[],
            fast_forward: false,
            dead_ok: false,
            timeout: Duration::from_secs(30),
        }
    }
}

/// Waits until the app is quiet (see the module docs); panics with what is left if it is not
/// within 30 s.
pub async fn quiesce(app: &TestApp) {
    quiesce_with(app, Quiet::default()).await
}

pub async fn quiesce_with(app: &TestApp, q: Quiet<'_>) {
    let (db, inbox) = (TestDb::of(app).await, TestDb::inbox_of(app).await);
    let deadline = Instant::now() + q.timeout;
    let mut calm = 0;
    loop {
        if q.fast_forward {
            db.execute("UPDATE outbox SET next_attempt_at = 0 WHERE status IN ('pending', 'published')", &[]).await;
            db.execute("UPDATE outbound_messages SET next_attempt_at = 0 WHERE status = 'queued'", &[]).await;
        }
        if q.relay {
            crate::whatsapp::relay(app).await;
        }
        let mut left = busy(&db, &inbox, q.ignore_event_types).await;
        if !q.dead_ok {
            left.extend(dead(&db, &inbox, q.ignore_event_types).await);
        }
        if left.is_empty() {
            calm += 1;
            if calm == 2 {
                return;
            }
        } else {
            calm = 0;
        }
        if Instant::now() > deadline {
            panic!("the app never went quiet within {:?}; still to do: {left:#?}\n{}", q.timeout, app.log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Events the app gave up on (dead letters), and webhooks set aside in the inbox (`inbox`, on
/// SQLite a database of its own), one line each.
pub async fn dead(db: &TestDb, inbox: &TestDb, ignore_event_types: &[&str]) -> Vec<String> {
    let mut left = vec![];
    for r in db.rows("SELECT event_type, last_error FROM outbox WHERE status = 'dead' ORDER BY created_at", &[]).await {
        let event_type = r[0].text();
        if !ignore_event_types.contains(&event_type.as_str()) {
            left.push(format!("event {event_type} dead-lettered ({})", r[1].opt_text().unwrap_or_default()));
        }
    }
    for r in inbox.rows("SELECT request_id, last_error FROM inbox WHERE set_aside_at IS NOT NULL", &[]).await {
        left.push(format!("webhook of request {} set aside ({})", r[0].text(), r[1].opt_text().unwrap_or_default()));
    }
    left
}

/// What the app still has to do, one line each; `inbox` is the database of its inbox (on
/// SQLite a file of its own, with the inbox's lease).
pub async fn busy(db: &TestDb, inbox: &TestDb, ignore_event_types: &[&str]) -> Vec<String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let mut left = vec![];
    for r in db
        .rows(
            "SELECT event_type, status, next_attempt_at FROM outbox WHERE status IN ('pending', 'published') ORDER BY created_at",
            &[],
        )
        .await
    {
        let event_type = r[0].text();
        if !ignore_event_types.contains(&event_type.as_str()) {
            left.push(format!("event {event_type} ({}, due in {} ms)", r[1].text(), r[2].int() - now));
        }
    }
    for r in
        db.rows("SELECT kind, next_attempt_at FROM outbound_messages WHERE status = 'queued' ORDER BY seq", &[]).await
    {
        left.push(format!("message {} queued (due in {} ms)", r[0].text(), r[1].int() - now));
    }
    for r in
        inbox.rows("SELECT request_id, attempts FROM inbox WHERE set_aside_at IS NULL ORDER BY received_at", &[]).await
    {
        left.push(format!("webhook of request {} waiting in the inbox ({} failed steps)", r[0].text(), r[1].int()));
    }
    let mut leases = vec![(db, "send_leases"), (db, "job_leases")];
    if !inbox.is_postgres() {
        // SQLite: the inbox's lease is in the inbox's file.
        leases.push((inbox, "job_leases"));
    }
    for (db, table) in leases {
        let n = db.int(&format!("SELECT COUNT(*) FROM {table} WHERE lease_until > $1"), &[now.into()]).await;
        if n > 0 {
            left.push(format!("{n} held in {table}"));
        }
    }
    left
}
