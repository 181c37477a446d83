//! What an operator and an autoscaler watch, read from the database in a handful of queries
//! whose cost does not grow with the history: counts over every order, delivery and refund
//! ever made come from the tallies (tallies.rs); the rest counts only what waits or is open,
//! through an index (`orders_by_status`, `outbox_due`, `outbound_by_status`,
//! `payment_issues_open`) or in the inbox, which holds only webhooks not yet worked through.
//! The figures: orders by status and the age of the oldest in each, the outbox backlog per
//! channel and its oldest event, dead letters, open payment issues, outbound messages waiting
//! or failed, portraits delivered, the payment-to-delivery time, refunds by status with the
//! oldest still on its way, open disputes, and each worker replica's last heartbeat
//! (heartbeats.rs).
//!
//! Everything here is a gauge over what the database holds now (retention applies), except the
//! payment-to-delivery histogram, which covers the delivered orders the database still holds.
//! [`render`] writes it in Prometheus' text exposition format (0.0.4), ages in seconds as
//! Prometheus' conventions ask; the maintenance service serves it at `GET /maintenance/metrics`.

use std::fmt::Write;

use crate::outbox::status as outbox_status;
use crate::{Db, DbError, Value};

/// Upper bounds (seconds) of the payment-to-delivery histogram's buckets; `+Inf` follows.
pub const DELIVERY_BUCKETS_S: [i64; 8] = [60, 300, 900, 1800, 3600, 7200, 21600, 86400];

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Per order status: how many orders, and the oldest one's last change (ms since epoch).
    pub orders: Vec<(String, i64, i64)>,
    /// Per channel: events not yet done (pending or published), and the oldest one's creation.
    pub outbox_backlog: Vec<(String, i64, i64)>,
    /// Per channel: dead-lettered events.
    pub dead_letters: Vec<(String, i64)>,
    pub payment_issues_open: i64,
    /// Per outbound message status other than `sent`: how many.
    pub messages: Vec<(String, i64)>,
    /// Generated images whose message was sent.
    pub portraits_delivered: i64,
    /// Delivered orders per bucket of [`DELIVERY_BUCKETS_S`] (cumulative, as Prometheus'
    /// buckets are), then the count, and the sum of their payment-to-delivery times (ms).
    pub delivery_buckets: Vec<i64>,
    pub delivery_count: i64,
    pub delivery_sum_ms: i64,
    /// Refunds by status (`refunds.rs`).
    pub refunds: Vec<(String, i64)>,
    /// When the oldest refund still on its way (asked for, or pending at Stripe) last moved.
    pub refund_oldest_waiting: Option<i64>,
    /// Chargebacks no operator has resolved.
    pub disputes_open: i64,
    /// Each worker replica's last heartbeat per channel (heartbeats.rs), for replicas heard in
    /// the last day.
    pub heartbeats: Vec<crate::heartbeats::Heard>,
    /// Webhooks waiting in the inbox, and when the oldest arrived (inbox.rs).
    pub inbox_waiting: i64,
    pub inbox_oldest: Option<i64>,
    /// Webhooks the worker set aside.
    pub inbox_set_aside: i64,
}

/// What the export shows, read from the app's database `db` and the inbox's (`inbox`: on
/// SQLite a database of its own, on PostgreSQL the same; `crate::inbox` says why).
pub fn snapshot<D: Db + ?Sized, I: Db + ?Sized>(db: &D, inbox: &I, now_ms: i64) -> Result<Snapshot, DbError> {
    let mut s = Snapshot::default();
    // Counts over the whole history come from the tallies (tallies.rs); everything else
    // reads what is waiting or open through an index, so no query here visits the history.
    let tallies = crate::tallies::read(db)?;
    let tally = |name: &str| tallies.get(name).copied().unwrap_or(0);
    let counted: Vec<(String, i64)> = crate::tallies::with_prefix(&tallies, "orders:");
    if !counted.is_empty() {
        // The oldest order of each status: one index seek on (status, updated_at) per status.
        let arms: Vec<String> = (1..=counted.len())
            .map(|i| {
                format!("SELECT * FROM (SELECT status, updated_at FROM orders WHERE status = ${i} ORDER BY updated_at LIMIT 1) o{i}")
            })
            .collect();
        let params: Vec<Value> = counted.iter().map(|(st, _)| Value::from(st.as_str())).collect();
        let oldest: Vec<(String, i64)> = db
            .query(&db.dialect().sql(&arms.join(" UNION ALL ")), &params)?
            .iter()
            .map(|r| Ok((r.text(0)?, r.int(1)?)))
            .collect::<Result<_, DbError>>()?;
        for (status, n) in counted {
            let since = oldest.iter().find(|(st, _)| *st == status).map(|(_, t)| *t).unwrap_or(now_ms);
            s.orders.push((status, n, since));
        }
    }
    let backlog = "SELECT channel, COUNT(*), MIN(created_at) FROM outbox WHERE status IN ($1, $2) GROUP BY channel";
    let open = [Value::from(outbox_status::PENDING), Value::from(outbox_status::PUBLISHED)];
    for r in db.query(&db.dialect().sql(backlog), &open)? {
        s.outbox_backlog.push((r.text(0)?, r.int(1)?, r.int(2)?));
    }
    let dead = "SELECT channel, COUNT(*) FROM outbox WHERE status = $1 GROUP BY channel";
    for r in db.query(&db.dialect().sql(dead), &[Value::from(outbox_status::DEAD)])? {
        s.dead_letters.push((r.text(0)?, r.int(1)?));
    }
    let issues = db.query("SELECT COUNT(*) FROM payment_issues WHERE resolved_at IS NULL", &[])?;
    s.payment_issues_open = issues.first().map(|r| r.int(0)).transpose()?.unwrap_or(0);
    // The statuses a message waits or failed in, named: `status <> 'sent'` would visit every
    // message ever sent.
    use crate::messages::status as m;
    let waiting = "SELECT status, COUNT(*) FROM outbound_messages WHERE status IN ($1, $2, $3, $4) GROUP BY status";
    let statuses = [m::QUEUED, m::AWAITING_WINDOW, m::HELD, m::FAILED].map(Value::from);
    for r in db.query(&db.dialect().sql(waiting), &statuses)? {
        s.messages.push((r.text(0)?, r.int(1)?));
    }
    s.portraits_delivered = tally("portraits_delivered");
    // The buckets are tallied each on its own; Prometheus' are cumulative.
    let mut cumulative = 0;
    for le in DELIVERY_BUCKETS_S {
        cumulative += tally(&format!("delivered_le:{le}"));
        s.delivery_buckets.push(cumulative);
    }
    s.delivery_count = cumulative + tally("delivered_le:inf");
    s.delivery_sum_ms = tally("delivered_ms");
    s.refunds = crate::tallies::with_prefix(&tallies, "refunds:");
    s.refund_oldest_waiting = crate::refunds::oldest_waiting_since(db)?;
    let disputes = db.query(
        &db.dialect().sql("SELECT COUNT(*) FROM payment_issues WHERE resolved_at IS NULL AND kind = $1"),
        &[Value::from(crate::repo::IssueKind::Dispute.as_str())],
    )?;
    s.disputes_open = disputes.first().map(|r| r.int(0)).transpose()?.unwrap_or(0);
    s.heartbeats = crate::heartbeats::since(db, now_ms - 24 * 3_600_000)?;
    (s.inbox_waiting, s.inbox_oldest) = crate::inbox::backlog(inbox)?;
    s.inbox_set_aside = crate::inbox::set_aside_count(inbox)?;
    Ok(s)
}

/// Order statuses an order ends in: their "oldest" is not a warning sign, so it is left out.
fn is_final(status: &str) -> bool {
    use astria_models::OrderStatus::{Cancelled, Delivered, Expired, Failed};
    [Delivered, Failed, Cancelled, Expired].into_iter().any(|s| crate::repo::status_str(s) == status)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}

/// Label values are ours (statuses, channel names), but escape them as the format requires.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A gauge family with one label: its HELP and TYPE lines, then a sample per (label value, value).
fn gauge_by<'a, V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    help: &str,
    label_name: &str,
    samples: impl IntoIterator<Item = (&'a str, V)>,
) {
    header(out, name, "gauge", help);
    for (value_of_label, value) in samples {
        let _ = writeln!(out, "{name}{{{label_name}=\"{}\"}} {value}", label(value_of_label));
    }
}

/// A gauge without labels.
fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    header(out, name, "gauge", help);
    let _ = writeln!(out, "{name} {value}");
}

/// The count for `label` in `samples`, 0 when absent.
fn count_of<'a>(samples: impl IntoIterator<Item = (&'a str, i64)>, label: &str) -> i64 {
    samples.into_iter().find(|(l, _)| *l == label).map(|(_, n)| n).unwrap_or(0)
}

/// Prometheus' text for `s`; `channels` are the worker channels, each exported in the outbox
/// families even when nothing waits on it.
pub fn render(s: &Snapshot, now_ms: i64, channels: &[&str]) -> String {
    let mut out = String::new();
    let orders = |st: &str| count_of(s.orders.iter().map(|(k, n, _)| (k.as_str(), *n)), st);
    gauge_by(
        &mut out,
        "astria_orders",
        "Orders by status.",
        "status",
        // Every status, 0 when no order has it: an alert or a dashboard on a status then
        // reads a series, as Prometheus advises, instead of an absent one.
        astria_models::ORDER_STATUSES.map(crate::repo::status_str).map(|st| (st, orders(st))),
    );
    gauge_by(
        &mut out,
        "astria_order_oldest_age_seconds",
        "Per non-final order status, seconds since the oldest order in it last changed.",
        "status",
        s.orders
            .iter()
            .filter(|(st, _, _)| !is_final(st))
            .map(|(st, _, oldest)| (st.as_str(), seconds(now_ms - oldest))),
    );
    // The worker channels, then any other channel an event names (an event of a release that
    // had one more).
    let mut all_channels: Vec<&str> = channels.to_vec();
    for ch in s.outbox_backlog.iter().map(|(c, _, _)| c).chain(s.dead_letters.iter().map(|(c, _)| c)) {
        if !all_channels.contains(&ch.as_str()) {
            all_channels.push(ch);
        }
    }
    let backlog = |ch: &str| count_of(s.outbox_backlog.iter().map(|(k, n, _)| (k.as_str(), *n)), ch);
    gauge_by(
        &mut out,
        "astria_outbox_backlog",
        "Events not yet handled by their consumer, per channel.",
        "channel",
        all_channels.iter().map(|ch| (*ch, backlog(ch))),
    );
    gauge_by(
        &mut out,
        "astria_outbox_oldest_pending_age_seconds",
        "Per channel, seconds since the oldest event not yet handled was written.",
        "channel",
        s.outbox_backlog.iter().map(|(ch, _, oldest)| (ch.as_str(), seconds(now_ms - oldest))),
    );
    let dead_on = |ch: &str| count_of(s.dead_letters.iter().map(|(k, n)| (k.as_str(), *n)), ch);
    gauge_by(
        &mut out,
        "astria_dead_letters",
        "Dead-lettered events, per channel (replay or resolve them).",
        "channel",
        all_channels.iter().map(|ch| (*ch, dead_on(ch))),
    );
    let dead: i64 = s.dead_letters.iter().map(|(_, n)| n).sum();
    gauge(&mut out, "astria_dead_letters_total", "Dead-lettered events, all channels.", dead);
    gauge(
        &mut out,
        "astria_payment_issues_open",
        "Payment issues no operator has resolved (refunds owed, unknown orders).",
        s.payment_issues_open,
    );
    gauge_by(
        &mut out,
        "astria_outbound_messages",
        "WhatsApp messages not (yet) sent, by status: queued, awaiting_window (outside the 24-hour window), held, failed.",
        "status",
        {
            use crate::messages::status as m;
            let waiting = |st: &str| count_of(s.messages.iter().map(|(k, n)| (k.as_str(), *n)), st);
            [m::QUEUED, m::AWAITING_WINDOW, m::HELD, m::FAILED].map(|st| (st, waiting(st)))
        },
    );
    gauge(
        &mut out,
        "astria_portraits_delivered",
        "Portraits sent to customers (rows retained in the database).",
        s.portraits_delivered,
    );
    header(
        &mut out,
        "astria_payment_to_delivery_seconds",
        "histogram",
        "Time from payment to the last portrait, over the delivered orders the database holds.",
    );
    for (le, count) in DELIVERY_BUCKETS_S.iter().zip(&s.delivery_buckets) {
        let _ = writeln!(out, "astria_payment_to_delivery_seconds_bucket{{le=\"{le}\"}} {count}");
    }
    let _ = writeln!(out, "astria_payment_to_delivery_seconds_bucket{{le=\"+Inf\"}} {}", s.delivery_count);
    let _ = writeln!(out, "astria_payment_to_delivery_seconds_sum {}", seconds(s.delivery_sum_ms));
    let _ = writeln!(out, "astria_payment_to_delivery_seconds_count {}", s.delivery_count);
    // Every status is exported, 0 when none: an alert on a status then has a series to read.
    use crate::refunds::status as r;
    let statuses = [r::REQUESTED, r::PENDING, r::SUCCEEDED, r::REQUIRES_ACTION, r::FAILED, r::CANCELED, r::REFUSED];
    let count = |st: &str| count_of(s.refunds.iter().map(|(k, n)| (k.as_str(), *n)), st);
    gauge_by(
        &mut out,
        "astria_refunds",
        "Refunds by status: requested (the app will ask Stripe), pending, succeeded, requires_action, failed, canceled (at Stripe), refused (Stripe will not; an operator must look).",
        "status",
        statuses.iter().map(|st| (*st, count(st))),
    );
    gauge(
        &mut out,
        "astria_refund_oldest_waiting_age_seconds",
        "Seconds since the oldest refund still on its way (requested, pending, requires_action) last moved; 0 when none.",
        s.refund_oldest_waiting.map(|t| (now_ms - t).max(0) / 1000).unwrap_or(0),
    );
    gauge(&mut out, "astria_disputes_open", "Chargebacks (disputes) no operator has resolved.", s.disputes_open);
    gauge(
        &mut out,
        "astria_inbox_waiting",
        "WhatsApp webhooks accepted and not yet worked through by the conversation worker.",
        s.inbox_waiting,
    );
    gauge(
        &mut out,
        "astria_inbox_oldest_age_seconds",
        "Seconds since the oldest webhook waiting in the inbox arrived; 0 when none.",
        s.inbox_oldest.map(|t| (now_ms - t).max(0) / 1000).unwrap_or(0),
    );
    gauge(
        &mut out,
        "astria_inbox_set_aside",
        "Webhooks the conversation worker could not work through and set aside (see the log).",
        s.inbox_set_aside,
    );
    header(
        &mut out,
        "astria_worker_heartbeat_age_seconds",
        "gauge",
        "Per worker replica and channel, seconds since it last heard the relay's heartbeat (published every minute); a replica whose pod runs and whose age grows is deaf.",
    );
    for h in &s.heartbeats {
        let _ = writeln!(
            out,
            "astria_worker_heartbeat_age_seconds{{channel=\"{}\",replica=\"{}\"}} {}",
            label(&h.channel),
            label(&h.replica),
            (now_ms - h.seen_at).max(0) / 1000
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_renders_as_prometheus_text() {
        let s = Snapshot {
            orders: vec![("delivered".into(), 3, 0), ("training".into(), 2, 10_000)],
            outbox_backlog: vec![("astria.messages".into(), 5, 40_000)],
            dead_letters: vec![("astria.orders".into(), 1)],
            payment_issues_open: 2,
            messages: vec![("failed".into(), 1)],
            portraits_delivered: 18,
            delivery_buckets: vec![0, 1, 2, 3, 3, 3, 3, 3],
            delivery_count: 3,
            delivery_sum_ms: 1_500_000,
            refunds: vec![("pending".into(), 1), ("succeeded".into(), 4)],
            refund_oldest_waiting: Some(10_000),
            disputes_open: 1,
            heartbeats: vec![crate::heartbeats::Heard {
                channel: "astria.messages".into(),
                replica: "astria-message-worker-7d9f-x2".into(),
                seen_at: 40_000,
            }],
            inbox_waiting: 4,
            inbox_oldest: Some(58_000),
            inbox_set_aside: 1,
        };
        let text = render(&s, 70_000, &["astria.payments", "astria.orders", "astria.messages"]);
        for line in [
            "astria_orders{status=\"delivered\"} 3",
            "astria_order_oldest_age_seconds{status=\"training\"} 60",
            "astria_outbox_backlog{channel=\"astria.messages\"} 5",
            "astria_outbox_oldest_pending_age_seconds{channel=\"astria.messages\"} 30",
            "astria_dead_letters{channel=\"astria.orders\"} 1",
            "astria_dead_letters_total 1",
            "astria_payment_issues_open 2",
            "astria_outbound_messages{status=\"failed\"} 1",
            "astria_portraits_delivered 18",
            "astria_payment_to_delivery_seconds_bucket{le=\"300\"} 1",
            "astria_payment_to_delivery_seconds_bucket{le=\"+Inf\"} 3",
            "astria_payment_to_delivery_seconds_sum 1500",
            "astria_refunds{status=\"pending\"} 1",
            "astria_refunds{status=\"succeeded\"} 4",
            "astria_refunds{status=\"refused\"} 0",
            "astria_refund_oldest_waiting_age_seconds 60",
            "astria_disputes_open 1",
            "astria_inbox_waiting 4",
            "astria_inbox_oldest_age_seconds 12",
            "astria_inbox_set_aside 1",
            // Every known label value has a series, 0 when nothing has it.
            "astria_orders{status=\"delivery_failed\"} 0",
            "astria_orders{status=\"collecting_photos\"} 0",
            "astria_outbox_backlog{channel=\"astria.payments\"} 0",
            "astria_dead_letters{channel=\"astria.messages\"} 0",
            "astria_outbound_messages{status=\"held\"} 0",
            "astria_worker_heartbeat_age_seconds{channel=\"astria.messages\",replica=\"astria-message-worker-7d9f-x2\"} 30",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("oldest_age_seconds{status=\"delivered\"}"), "final statuses have no age");
    }
}
