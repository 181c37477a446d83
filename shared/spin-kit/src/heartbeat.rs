//! Worker heartbeats (see `astria_store::heartbeats` for why): the relay publishes one on every
//! channel; each worker books the one it hears under its replica name.

use astria_domain::events::{channels, WORKER_HEARTBEAT};
use astria_models::EventEnvelope;
use astria_store::{heartbeats, Db, DbError};

use crate::events::{envelope, now_ms};

/// Publishes a heartbeat on every worker channel, straight to Redis (not through the outbox:
/// a late heartbeat proves nothing). Answers how many channels got it.
pub fn publish(redis_url: &str, correlation_id: &str) -> usize {
    let Ok(conn) = spin_sdk::redis::Connection::open(redis_url) else { return 0 };
    let event = envelope(WORKER_HEARTBEAT, &serde_json::json!({}), correlation_id);
    let Ok(json) = serde_json::to_vec(&event) else { return 0 };
    channels::ALL.iter().filter(|channel| conn.publish(channel, &json).is_ok()).count()
}

/// Whether `event` is a heartbeat (a worker books it with [`book`] and does nothing else).
pub fn is_heartbeat(event: &EventEnvelope) -> bool {
    event.event_type == WORKER_HEARTBEAT
}

/// Books the heartbeat `event` this replica heard on `channel`, under the `replica_name`
/// variable (the pod's name on Kubernetes, from the downward API), at the time the relay sent
/// it: a replica working through a backlog of old heartbeats does not look fresh, and one that
/// hears nothing sent after a given moment provably heard nothing since.
pub fn book<D: Db + ?Sized>(db: &D, event: &EventEnvelope, channel: &str) -> Result<(), DbError> {
    let replica = spin_sdk::variables::get("replica_name").unwrap_or_else(|_| "unnamed".into());
    let sent = chrono::DateTime::parse_from_rfc3339(&event.occurred_at)
        .map(|t| t.timestamp_millis())
        .unwrap_or_else(|_| now_ms());
    heartbeats::record(db, &replica, channel, sent)
}
