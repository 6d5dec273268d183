//! Runs the inbox against the in-process bus (embedded mode): same handler, same DLQ
//! semantics, in publish order.

use std::sync::Arc;

use tokio::sync::broadcast::{Receiver, error::RecvError};
use tokio_util::sync::CancellationToken;

use super::{InboundMessage, Inbox};
use crate::publish::BusRecord;

/// Consumes the inbox topics from `records` (a subscription to the bus, taken before
/// anything can publish, so nothing is missed) until `stop`.
pub async fn run(mut records: Receiver<BusRecord>, inbox: Arc<Inbox>, stop: CancellationToken) {
    let topics = inbox.topics();
    loop {
        let record = tokio::select! {
            _ = stop.cancelled() => return,
            record = records.recv() => record,
        };
        match record {
            Ok(record) if topics.contains(&record.topic) => {
                if !inbox.process(&inbound(record), &stop).await {
                    return;
                }
            }
            Ok(_) => {}
            Err(RecvError::Lagged(skipped)) => {
                tracing::error!(skipped, "in-process bus consumer fell behind")
            }
            Err(RecvError::Closed) => return,
        }
    }
}

fn inbound(record: BusRecord) -> InboundMessage {
    InboundMessage {
        topic: record.topic,
        partition: 0,
        offset: record.offset as i64,
        key: Some(record.key.into_bytes()),
        headers: record.headers,
        payload: record.payload,
    }
}
