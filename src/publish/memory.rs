//! In-process event bus: the embedded default. Keeps a bounded log per topic and fans new
//! records out to subscribers, with the same per-message outcomes as Kafka (including a
//! size limit, so dead-lettering behaves the same).

use std::{
    collections::{HashMap, VecDeque},
    sync::Mutex,
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{OutboundMessage, PublishError, Publisher};

/// How many records each topic keeps for inspection and late subscribers.
const RETAINED_PER_TOPIC: usize = 10_000;

/// A published record with its offset in the topic.
#[derive(Debug, Clone)]
pub struct BusRecord {
    /// Topic.
    pub topic: String,
    /// Position in the topic, from 0.
    pub offset: u64,
    /// Key.
    pub key: String,
    /// Value.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, String)>,
}

/// The in-process bus.
pub struct InMemoryBus {
    /// Retained records and the next offset per topic.
    topics: Mutex<HashMap<String, (u64, VecDeque<BusRecord>)>>,
    /// Live fan-out to subscribers.
    sender: broadcast::Sender<BusRecord>,
    /// Largest accepted payload, like a broker's `message.max.bytes`.
    max_message_bytes: usize,
}

impl InMemoryBus {
    /// A bus rejecting payloads larger than `max_message_bytes`.
    pub fn new(max_message_bytes: usize) -> Self {
        let (sender, _) = broadcast::channel(1024);
        Self { topics: Mutex::new(HashMap::new()), sender, max_message_bytes }
    }

    /// The retained records of `topic`, oldest first.
    pub fn records(&self, topic: &str) -> Vec<BusRecord> {
        self.topics
            .lock()
            .map(|topics| topics.get(topic).map(|(_, log)| log.iter().cloned().collect()).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Receives every record published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<BusRecord> {
        self.sender.subscribe()
    }
}

#[async_trait]
impl Publisher for InMemoryBus {
    async fn publish(&self, messages: Vec<OutboundMessage>) -> Vec<Result<(), PublishError>> {
        let Ok(mut topics) = self.topics.lock() else {
            return messages
                .iter()
                .map(|_| Err(PublishError::Retriable("bus lock poisoned".into())))
                .collect();
        };
        // Keys whose message failed: nothing after it with that key is delivered.
        let mut failed = std::collections::HashSet::new();
        messages
            .into_iter()
            .map(|m| {
                if failed.contains(&m.key) {
                    return Err(super::held_back());
                }
                if m.payload.len() > self.max_message_bytes {
                    failed.insert(m.key);
                    return Err(PublishError::Permanent(format!(
                        "message of {} bytes exceeds the bus limit of {} bytes",
                        m.payload.len(),
                        self.max_message_bytes
                    )));
                }
                let (next, log) = topics.entry(m.topic.clone()).or_default();
                let record = BusRecord {
                    topic: m.topic,
                    offset: *next,
                    key: m.key,
                    payload: m.payload,
                    headers: super::owned_headers(m.headers),
                };
                *next += 1;
                if log.len() == RETAINED_PER_TOPIC {
                    log.pop_front();
                }
                log.push_back(record.clone());
                let _ = self.sender.send(record); // no subscribers is fine
                Ok(())
            })
            .collect()
    }

    async fn flush(&self, _timeout: Duration) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(bytes: usize) -> OutboundMessage {
        OutboundMessage {
            topic: "t".into(),
            key: "k".into(),
            payload: vec![b'x'; bytes],
            headers: Vec::new(),
        }
    }

    #[tokio::test]
    async fn keeps_order_rejects_oversize_messages_for_good_and_holds_back_their_key() {
        let bus = InMemoryBus::new(10);
        let other = OutboundMessage { key: "other".into(), ..message(2) };
        let results = bus.publish(vec![message(1), message(11), message(10), other]).await;
        assert!(results[0].is_ok());
        assert!(matches!(results[1], Err(PublishError::Permanent(_))));
        assert!(matches!(results[2], Err(PublishError::Retriable(_))), "held back behind its key's failure");
        assert!(results[3].is_ok(), "other keys go on");
        let keys: Vec<String> = bus.records("t").into_iter().map(|r| r.key).collect();
        assert_eq!(keys, ["k", "other"]);
    }
}
