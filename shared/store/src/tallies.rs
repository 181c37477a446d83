//! Counts over the whole history that operators read at every scrape: orders by status, the
//! payment-to-delivery histogram, portraits delivered, refunds by status. Counting them at
//! each scrape reads every order ever made; here they are kept as they change, so a scrape
//! costs the same with a thousand orders as with millions.
//!
//! Database triggers (migration 17) append a delta to `tally_deltas` on every insert, update
//! and delete that moves a count, whichever code or operator made it, in the writer's own
//! transaction. Only appends: no row that every writer updates, so writers never queue on one
//! another's lock. [`fold`] (the relay, every minute) moves the deltas into `tallies`; [`read`]
//! adds the deltas not yet folded, so what it answers is exact at any time.
//!
//! Names: `orders:<status>`, `refunds:<status>`, `portraits_delivered`, `delivered_le:<s>`
//! (delivered orders whose payment-to-delivery time falls in that bucket of
//! `metrics::DELIVERY_BUCKETS_S`, or `inf`; each counted on its own) and `delivered_ms` (their
//! sum).

use std::collections::BTreeMap;

use crate::{transaction, Db, DbError, Dialect, Value};

/// Every tally by name: the folded value plus the deltas not yet folded.
pub fn read<D: Db + ?Sized>(db: &D) -> Result<BTreeMap<String, i64>, DbError> {
    // PostgreSQL sums BIGINTs as NUMERIC, hence the cast.
    db.query(
        "SELECT name, CAST(SUM(value) AS BIGINT) FROM
           (SELECT name, value FROM tallies UNION ALL SELECT name, delta FROM tally_deltas) t
         GROUP BY name",
        &[],
    )?
    .iter()
    .map(|r| Ok((r.text(0)?, r.int(1)?)))
    .collect()
}

/// The tallies named `<prefix><rest>`, as (rest, value), leaving out zeros, by name.
pub fn with_prefix(tallies: &BTreeMap<String, i64>, prefix: &str) -> Vec<(String, i64)> {
    tallies
        .iter()
        .filter(|(_, n)| **n != 0)
        .filter_map(|(name, n)| Some((name.strip_prefix(prefix)?.to_string(), *n)))
        .collect()
}

/// Deltas folded per statement: a fold after a burst (a bulk import, a backfill) moves them in
/// bounded steps, never one result the size of the burst.
pub const FOLD_BATCH: i64 = 10_000;

/// Moves every delta into `tallies`, [`FOLD_BATCH`] at a time, each batch in one transaction;
/// answers how many deltas it folded. Safe beside writers and beside another fold: a delta is
/// taken by the one `DELETE` that removes it (on PostgreSQL a second fold waits for the first's
/// rows, then skips them; SQLite has one writer at a time).
pub fn fold<D: Db + ?Sized>(db: &D) -> Result<u64, DbError> {
    let mut total = 0;
    loop {
        let n = match db.dialect() {
            Dialect::Postgres => fold_batch_postgres(db)?,
            Dialect::Sqlite => fold_batch_sqlite(db)?,
        };
        total += n;
        if n < FOLD_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// One statement: the batch is deleted, summed into `tallies`, and counted.
fn fold_batch_postgres<D: Db + ?Sized>(db: &D) -> Result<u64, DbError> {
    let rows = db.query(
        "WITH taken AS (
             DELETE FROM tally_deltas WHERE ctid IN (SELECT ctid FROM tally_deltas LIMIT $1) RETURNING name, delta
         ), summed AS (
             INSERT INTO tallies (name, value) SELECT name, CAST(SUM(delta) AS BIGINT) FROM taken GROUP BY name
             ON CONFLICT (name) DO UPDATE SET value = tallies.value + excluded.value
         )
         SELECT COUNT(*) FROM taken",
        &[Value::Int(FOLD_BATCH)],
    )?;
    Ok(rows.first().map(|r| r.int(0)).transpose()?.unwrap_or(0) as u64)
}

/// SQLite has no DELETE in a WITH: the batch is bounded by rowid, summed, then deleted, under
/// the one write lock of the transaction.
fn fold_batch_sqlite<D: Db + ?Sized>(db: &D) -> Result<u64, DbError> {
    transaction(db, |db| {
        let rows = db.query(
            "SELECT MAX(r), COUNT(*) FROM (SELECT rowid AS r FROM tally_deltas ORDER BY rowid LIMIT ?)",
            &[Value::Int(FOLD_BATCH)],
        )?;
        let row = rows.first().ok_or_else(|| DbError::Decode("no row from COUNT".into()))?;
        let (Some(last), n) = (row.opt_int(0)?, row.int(1)?) else { return Ok(0) };
        db.execute(
            "INSERT INTO tallies (name, value) SELECT name, SUM(delta) FROM tally_deltas WHERE rowid <= ? GROUP BY name
             ON CONFLICT (name) DO UPDATE SET value = tallies.value + excluded.value",
            &[Value::Int(last)],
        )?;
        db.execute("DELETE FROM tally_deltas WHERE rowid <= ?", &[Value::Int(last)])?;
        Ok(n as u64)
    })
}
