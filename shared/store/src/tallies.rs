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

use crate::{transaction, Db, DbError, Value};

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

/// Moves every delta into `tallies`, in one transaction; answers how many deltas it folded.
/// Safe beside writers and beside another fold: a delta is taken by the one `DELETE` that
/// removes it (on PostgreSQL a second fold waits for the first's rows, then skips them).
pub fn fold<D: Db + ?Sized>(db: &D) -> Result<u64, DbError> {
    transaction(db, |db| {
        let taken = db.query("DELETE FROM tally_deltas RETURNING name, delta", &[])?;
        let mut sums: BTreeMap<String, i64> = BTreeMap::new();
        for r in &taken {
            *sums.entry(r.text(0)?).or_default() += r.int(1)?;
        }
        if !sums.is_empty() {
            let rows: Vec<String> = (0..sums.len()).map(|i| format!("(${}, ${})", 2 * i + 1, 2 * i + 2)).collect();
            let sql = format!(
                "INSERT INTO tallies (name, value) VALUES {} ON CONFLICT (name) DO UPDATE SET value = tallies.value + excluded.value",
                rows.join(", ")
            );
            let params: Vec<Value> =
                sums.into_iter().flat_map(|(name, n)| [Value::from(name), Value::Int(n)]).collect();
            db.execute(&db.dialect().sql(&sql), &params)?;
        }
        Ok(taken.len() as u64)
    })
}
