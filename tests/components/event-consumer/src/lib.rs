//! Test-only consumer (tests/tests/events.rs): acts on `probe.*` events through the shared
//! claim. `probe.ok` records an effect; `probe.fail_once` fails on its first delivery (the
//! failure is remembered outside the rolled-back transaction, in the key-value store) and
//! succeeds on the next; `probe.poison` always fails.

use astria_store::{Db, DbError, Value};
use spin_kit::db::SpinDb;
use spin_kit::events::{self, Consumed};
use spin_sdk::{key_value, redis_component, variables};

// The fields are read through Debug, in the handler-error log line.
#[allow(dead_code)]
#[derive(Debug)]
enum Error {
    Db(DbError),
    Refused(&'static str),
}

impl From<DbError> for Error {
    fn from(e: DbError) -> Self {
        Error::Db(e)
    }
}

#[redis_component]
fn on_message(message: bytes::Bytes) -> anyhow::Result<()> {
    let db = SpinDb::open(&variables::get("database_url")?).map_err(|e| anyhow::anyhow!("{e}"))?;
    astria_store::migrations::ensure_migrated(&db, events::now_ms()).map_err(|e| anyhow::anyhow!("{e}"))?;
    db.execute("CREATE TABLE IF NOT EXISTS probe_effects (event_id TEXT NOT NULL, acted_at BIGINT NOT NULL)", &[])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let result = events::consume(&db, "probe-consumer", &message, |db, event| {
        match event.event_type.as_str() {
            "probe.poison" => return Err(Error::Refused("poison")),
            "probe.fail_once" => {
                let store = key_value::Store::open_default().map_err(|_| Error::Refused("kv"))?;
                let key = format!("failed:{}", event.id);
                if store.get(&key).map_err(|_| Error::Refused("kv"))?.is_none() {
                    store.set(&key, b"1").map_err(|_| Error::Refused("kv"))?;
                    return Err(Error::Refused("failing once, as asked"));
                }
            }
            _ => {}
        }
        db.execute(
            &db.dialect().sql("INSERT INTO probe_effects (event_id, acted_at) VALUES ($1, $2)"),
            &[Value::from(event.id.as_str()), Value::Int(events::now_ms())],
        )?;
        Ok(())
    });
    match result {
        Ok(Consumed::Acted(_)) | Ok(Consumed::Duplicate(_)) | Ok(Consumed::Malformed) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("consumer failed: {e:?}")),
    }
}
