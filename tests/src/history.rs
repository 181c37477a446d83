//! History: what months of business leave in the database, for showing that an operator's
//! reads cost the same however much of it there is (issue 29's G5). Every row is old and done:
//! delivered orders of one-off customers, their sent portraits, the events that carried them,
//! a refund and a resolved payment issue now and then. Nothing a worker or a page's time
//! window would take up.
//!
//! Written straight into the app's database with `INSERT ... SELECT` over a counter, in the
//! SQL both backends speak: a million rows per table take seconds, not a million requests.

use crate::db::TestDb;

/// Days before `now_ms` the history happened: outside every console window and retention rule
/// the reads look at.
pub const AGE_DAYS: i64 = 60;

/// Adds rows `from..from + n` of history to every table the operator reads (contacts, orders,
/// outbound messages, generated images, outbox, refunds, payment issues).
pub async fn add(db: &TestDb, from: i64, n: i64, now_ms: i64) {
    let at = now_ms - AGE_DAYS * 86_400_000;
    // `i` counts from..from+n; a delivered order's payment-to-delivery time walks the buckets.
    // (`at` typed once: PostgreSQL would take `$3 + 60000` for an INTEGER.)
    // (SQLite numbers `$n` in the order they first appear: keep them in order.)
    let counter = "WITH RECURSIVE c(i, at) AS (SELECT CAST($1 AS BIGINT), CAST($2 AS BIGINT)
                   UNION ALL SELECT i + 1, at FROM c WHERE i < $3)";
    let last = from + n - 1;
    let statements = [
        "INSERT INTO contacts (wa_id, profile_name, opted_out, conversation, updated_at, first_seen_at)
         SELECT 'h-' || i, 'History', 0, '{\"state\":\"idle\"}', at, at FROM c",
        "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at, paid_at)
         SELECT 'ho-' || i, 'h-' || i, 'corporate', 'delivered', 1999, 'usd', at, at + 60000 + (i % 9) * 900000, at FROM c",
        "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id, attempts,
                                        next_attempt_at, created_at, updated_at, sent_at)
         SELECT 'hm-' || i, 'h-' || i, 1, 'image', '{}', 'sent', 'he-' || i, 'c', 1, 0, at, at, at FROM c",
        "INSERT INTO generated_images (order_id, url, prompt_id, message_id, created_at)
         SELECT 'ho-' || i, 'https://mp.astria.ai/h/' || i || '.jpg', 1, 'hm-' || i, at FROM c",
        "INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, created_at, status, attempts,
                             next_attempt_at, completed_at, order_id)
         SELECT 'hx-' || i, 'astria.orders', 'order.paid', '{}', 'c', at, 'done', 1, 0, at, 'ho-' || i FROM c",
        "INSERT INTO refunds (id, order_id, payment_intent, status, created_at, updated_at)
         SELECT 'hr-' || i, 'ho-' || i, 'pi_h' || i, 'succeeded', at, at FROM c WHERE i % 10 = 0",
        "INSERT INTO payment_issues (event_id, kind, order_id, detail, created_at, resolved_at)
         SELECT 'hi-' || i, 'needs_refund', 'ho-' || i, 'history', at, at FROM c WHERE i % 10 = 0",
    ];
    for sql in statements {
        db.execute(&format!("{counter} {sql}"), &[from.into(), at.into(), last.into()]).await;
    }
}

/// What is live beside the history, for the pages to show: an order in training with its
/// event, a failed message, a dead letter, and an open payment issue whose refund is under way.
pub async fn add_live(db: &TestDb, now_ms: i64) {
    for sql in [
        "INSERT INTO contacts (wa_id, opted_out, conversation, updated_at, first_seen_at) VALUES ('live', 0, '{}', $1, $1)",
        "INSERT INTO orders (id, wa_id, pack_id, status, price_minor, currency, created_at, updated_at, paid_at)
         VALUES ('live-order', 'live', 'corporate', 'training', 1999, 'usd', $1, $1, $1)",
        "INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, created_at, status, attempts, next_attempt_at, order_id)
         VALUES ('live-event', 'astria.orders', 'order.paid', '{}', 'c', $1, 'done', 1, 0, 'live-order')",
        "INSERT INTO outbox (id, channel, event_type, envelope, correlation_id, created_at, status, attempts, next_attempt_at)
         VALUES ('live-dead', 'astria.messages', 'message.send', '{}', 'c', $1, 'dead', 8, 0)",
        "INSERT INTO outbound_messages (id, wa_id, seq, kind, message, status, event_id, correlation_id, next_attempt_at, created_at, updated_at)
         VALUES ('live-failed', 'live', 1, 'text', '{}', 'failed', 'e', 'c', 0, $1, $1)",
        "INSERT INTO payment_issues (event_id, kind, order_id, detail, created_at) VALUES ('live-issue', 'needs_refund', 'live-order', 'd', $1)",
        "INSERT INTO refunds (id, issue_id, order_id, status, created_at, updated_at) VALUES ('live-refund', 'live-issue', 'live-order', 'pending', $1, $1)",
    ] {
        db.execute(sql, &[now_ms.into()]).await;
    }
}

/// The operator's reads, each with what it shows of [`add_live`]'s rows.
pub const OPERATOR_READS: [&str; 7] = [
    "/maintenance/metrics",
    "/maintenance/console/api/funnel?days=30",
    "/maintenance/console/api/attention",
    "/maintenance/console/api/orders/live-order",
    "/maintenance/dead-letters",
    "/maintenance/payment-issues",
    "/maintenance/messages?status=failed",
];
