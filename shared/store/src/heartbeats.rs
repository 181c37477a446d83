//! Which worker replica last heard the relay's heartbeat on which channel.
//!
//! Spin's Redis trigger has no ping and never reconnects: a subscription silently dropped by a
//! NAT or a load balancer leaves a worker pod running and deaf. So the relay (every minute)
//! publishes a heartbeat on each worker channel, and every replica that receives it books it
//! here under its own name (`replica_name`, the pod's name on Kubernetes). A replica whose
//! heartbeat grows old while its pod runs is deaf; the metrics route exports the ages and an
//! alert names it.

use crate::{Db, DbError, Value};

/// Books that `replica` heard, on `channel`, the heartbeat sent at `sent_ms`.
pub fn record<D: Db + ?Sized>(db: &D, replica: &str, channel: &str, sent_ms: i64) -> Result<(), DbError> {
    db.execute(
        &db.dialect().sql(
            "INSERT INTO worker_heartbeats (replica, channel, seen_at) VALUES ($1, $2, $3)
             ON CONFLICT (replica, channel) DO UPDATE SET seen_at = excluded.seen_at",
        ),
        &[Value::from(replica), Value::from(channel), Value::Int(sent_ms)],
    )?;
    Ok(())
}

/// One replica's last heartbeat on one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heard {
    pub channel: String,
    pub replica: String,
    pub seen_at: i64,
}

/// Every replica heard since `since_ms` (older ones are gone: scaled down or replaced), by
/// channel and replica.
pub fn since<D: Db + ?Sized>(db: &D, since_ms: i64) -> Result<Vec<Heard>, DbError> {
    db.query(
        &db.dialect().sql(
            "SELECT channel, replica, seen_at FROM worker_heartbeats WHERE seen_at >= $1 ORDER BY channel, replica",
        ),
        &[Value::Int(since_ms)],
    )?
    .iter()
    .map(|r| Ok(Heard { channel: r.text(0)?, replica: r.text(1)?, seen_at: r.int(2)? }))
    .collect()
}
