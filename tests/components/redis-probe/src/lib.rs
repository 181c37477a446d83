//! Test-only Redis-trigger component. For a message `m` it stores `msg:m` = the message, and
//! bumps `count:m`, in the default key-value store, where the HTTP probe can read them. The
//! message `trap` panics, to show that a failing handler does not stop the trigger.

use spin_sdk::redis_component;

#[redis_component]
fn on_message(message: bytes::Bytes) -> anyhow::Result<()> {
    let text = String::from_utf8_lossy(&message).to_string();
    if text == "trap" {
        panic!("probe asked to trap");
    }
    let store = spin_sdk::key_value::Store::open_default()?;
    let count_key = format!("count:{text}");
    let count =
        store.get(&count_key)?.and_then(|v| String::from_utf8(v).ok()).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    store.set(&count_key, (count + 1).to_string().as_bytes())?;
    store.set(&format!("msg:{text}"), &message)?;
    Ok(())
}
