//! The in-process Redis stand-in used by `--redis memory`: pub/sub channels plus the few data
//! commands outbound Redis offers. Semantics follow Redis pub/sub: a message published while no
//! subscriber listens is dropped, exactly as a real Redis would.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use tokio::sync::broadcast;

#[derive(Default)]
pub struct Broker {
    channels: Mutex<HashMap<String, broadcast::Sender<Vec<u8>>>>,
    strings: Mutex<HashMap<String, Vec<u8>>>,
    sets: Mutex<HashMap<String, BTreeSet<String>>>,
}

impl Broker {
    fn sender(&self, channel: &str) -> broadcast::Sender<Vec<u8>> {
        let mut channels = self.channels.lock().expect("broker lock");
        channels.entry(channel.to_string()).or_insert_with(|| broadcast::channel(4096).0).clone()
    }

    pub fn subscribe(&self, channel: &str) -> broadcast::Receiver<Vec<u8>> {
        self.sender(channel).subscribe()
    }

    /// Returns how many subscribers received the message, like Redis' PUBLISH.
    pub fn publish(&self, channel: &str, payload: Vec<u8>) -> usize {
        self.sender(channel).send(payload).unwrap_or(0)
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.strings.lock().expect("broker lock").get(key).cloned()
    }

    pub fn set(&self, key: &str, value: Vec<u8>) {
        self.strings.lock().expect("broker lock").insert(key.to_string(), value);
    }

    pub fn incr(&self, key: &str) -> Result<i64, String> {
        let mut strings = self.strings.lock().expect("broker lock");
        let current = match strings.get(key) {
            Some(v) => {
                std::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()).ok_or("value is not an integer")?
            }
            None => 0,
        };
        let next = current + 1;
        strings.insert(key.to_string(), next.to_string().into_bytes());
        Ok(next)
    }

    pub fn del(&self, keys: &[String]) -> u32 {
        let mut strings = self.strings.lock().expect("broker lock");
        let mut sets = self.sets.lock().expect("broker lock");
        keys.iter().filter(|k| strings.remove(*k).is_some() | sets.remove(*k).is_some()).count() as u32
    }

    pub fn sadd(&self, key: &str, values: &[String]) -> u32 {
        let mut sets = self.sets.lock().expect("broker lock");
        let set = sets.entry(key.to_string()).or_default();
        values.iter().filter(|v| set.insert((*v).clone())).count() as u32
    }

    pub fn smembers(&self, key: &str) -> Vec<String> {
        self.sets.lock().expect("broker lock").get(key).map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    pub fn srem(&self, key: &str, values: &[String]) -> u32 {
        let mut sets = self.sets.lock().expect("broker lock");
        match sets.get_mut(key) {
            Some(set) => values.iter().filter(|v| set.remove(*v)).count() as u32,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_reaches_current_subscribers_only() {
        let b = Broker::default();
        assert_eq!(b.publish("c", b"lost".to_vec()), 0);
        let mut rx = b.subscribe("c");
        assert_eq!(b.publish("c", b"hi".to_vec()), 1);
        assert_eq!(rx.try_recv().unwrap(), b"hi");
    }

    #[test]
    fn data_commands_behave_like_redis() {
        let b = Broker::default();
        assert_eq!(b.incr("n").unwrap(), 1);
        assert_eq!(b.incr("n").unwrap(), 2);
        b.set("s", b"x".to_vec());
        assert!(b.incr("s").is_err());
        assert_eq!(b.sadd("set", &["a".into(), "b".into(), "a".into()]), 2);
        assert_eq!(b.smembers("set"), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(b.srem("set", &["a".into()]), 1);
        assert_eq!(b.del(&["n".into(), "set".into(), "missing".into()]), 2);
    }
}
