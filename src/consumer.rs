//! Consumer: the Kafka side, on its own thread (rdkafka's calls block).
//!
//! It subscribes to the topics as a member of GROUP_ID, polls records in batches, registers each
//! in the commit ledger, and writes the new ones to the spool in one batch. Tombstones (null
//! values) are counted and marked done. It also commits: every COMMIT_INTERVAL the positions
//! the ledger says are stored, and on revocation, synchronously, what is done for the revoked
//! partitions before they go (design invariant 6). On shutdown it stops fetching, waits until the
//! uploaders have drained, and commits what they finished.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message, Timestamp};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::commit::{Delivery, Ledger, Tp};
use crate::config::{Config, ConfigError};
use crate::metrics as m;
use crate::spool::{Record, RecordTime, Spool};

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("Kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Most records taken from one poll round before they are spooled together.
const MAX_BATCH: usize = 1000;

/// The librdkafka configuration: the archiver's settings, then the pass-through properties.
pub fn client_config(config: &Config) -> Result<ClientConfig, ConfigError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", config.brokers.join(","))
        .set("group.id", &config.group_id)
        .set("client.id", "kafka-s3-archiver")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // As Kafka Connect's sink: a new group starts from the oldest record.
        .set("auto.offset.reset", "earliest")
        // librdkafka prefetches up to 64 MiB per partition set by default; keep memory modest.
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &config.kafka_properties {
        c.set(k, v);
    }
    // Every property is checked by librdkafka itself, so a misspelt pass-through is an error now.
    c.create_native_config().map_err(|e| ConfigError {
        var: "KAFKA_PROPERTY_*".into(),
        message: format!("librdkafka rejected a property: {e}"),
    })?;
    Ok(c)
}

/// rdkafka callbacks: rebalances go through the ledger so that a revoked partition is committed
/// once, then never again.
struct ArchiverContext {
    ledger: Arc<Mutex<Ledger>>,
}

impl ClientContext for ArchiverContext {}

impl ConsumerContext for ArchiverContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps = tps_of(tpl);
            let positions = self.ledger.lock().expect("ledger lock").positions(&tps);
            if !positions.is_empty() {
                commit(consumer, &positions, CommitMode::Sync);
            }
            let mut ledger = self.ledger.lock().expect("ledger lock");
            for tp in &tps {
                ledger.revoke(tp);
            }
            tracing::info!(partitions = %describe(&tps), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let tps = tps_of(tpl);
                let mut ledger = self.ledger.lock().expect("ledger lock");
                for tp in &tps {
                    ledger.assign(tp);
                }
                tracing::info!(partitions = %describe(&tps), "partitions assigned");
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(e) = result {
            metrics::counter!(m::COMMIT_ERRORS).increment(1);
            tracing::warn!(error = %e, partitions = %describe(&tps_of(offsets)), "offset commit failed; it is retried with the next commit");
        }
    }
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

fn describe(tps: &[Tp]) -> String {
    tps.iter()
        .map(|(t, p)| format!("{t}[{p}]"))
        .collect::<Vec<_>>()
        .join(",")
}

fn commit(consumer: &BaseConsumer<ArchiverContext>, positions: &[(Tp, i64)], mode: CommitMode) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in positions {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(error = %e, "cannot build the commit list");
            return;
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            metrics::counter!(m::COMMITS).increment(1);
            tracing::debug!(?positions, "committed");
        }
        Err(e) => {
            metrics::counter!(m::COMMIT_ERRORS).increment(1);
            tracing::warn!(error = %e, "offset commit failed; it is retried with the next commit");
        }
    }
}

/// The consumer stage.
#[derive(Debug)]
pub struct KafkaConsumer {
    pub client: ClientConfig,
    pub topics: Vec<String>,
    pub spool: Arc<Spool>,
    pub ledger: Arc<Mutex<Ledger>>,
    pub commit_interval: Duration,
}

impl KafkaConsumer {
    /// Runs on the calling thread until `shutdown` is cancelled. Then waits (at most
    /// `drain_wait`) for `drained` to be cancelled by the upload stage, and commits what it stored.
    pub fn run(
        self,
        shutdown: CancellationToken,
        drained: CancellationToken,
        drain_wait: Duration,
    ) -> Result<(), ConsumerError> {
        let consumer: BaseConsumer<ArchiverContext> =
            self.client.create_with_context(ArchiverContext {
                ledger: self.ledger.clone(),
            })?;
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        tracing::info!(topics = %self.topics.join(","), "subscribed");
        let mut last_commit = Instant::now();
        let mut tombstones_logged: HashSet<Tp> = HashSet::new();
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(MAX_BATCH);
        while !shutdown.is_cancelled() {
            let mut wait = Duration::from_millis(100);
            while batch.len() < MAX_BATCH {
                match consumer.poll(wait) {
                    Some(Ok(msg)) => batch.push(msg),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "Kafka consumer error");
                        break;
                    }
                    None => break,
                }
                wait = Duration::ZERO;
            }
            self.spool_batch(&mut batch, &mut tombstones_logged, &shutdown);
            if last_commit.elapsed() >= self.commit_interval {
                let positions = self.ledger.lock().expect("ledger lock").to_commit();
                if !positions.is_empty() {
                    commit(&consumer, &positions, CommitMode::Async);
                }
                last_commit = Instant::now();
            }
        }
        // Stop fetching; keep serving the client while the uploaders drain.
        let assignment = consumer.assignment()?;
        if assignment.count() > 0 {
            consumer.pause(&assignment)?;
        }
        let until = Instant::now() + drain_wait;
        while !drained.is_cancelled() && Instant::now() < until {
            if let Some(Ok(msg)) = consumer.poll(Duration::from_millis(100)) {
                // Fetched before the pause took effect: not spooled, not committed; fetched again next time.
                drop(msg);
            }
        }
        let positions = self.ledger.lock().expect("ledger lock").to_commit();
        if !positions.is_empty() {
            commit(&consumer, &positions, CommitMode::Sync);
        }
        tracing::info!(committed = ?positions, "consumer stopped");
        Ok(())
    }

    /// Registers a polled batch in the ledger and spools the records that are new.
    fn spool_batch(
        &self,
        batch: &mut Vec<BorrowedMessage<'_>>,
        tombstones_logged: &mut HashSet<Tp>,
        shutdown: &CancellationToken,
    ) {
        if batch.is_empty() {
            return;
        }
        metrics::counter!(m::RECORDS_CONSUMED).increment(batch.len() as u64);
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut records = Vec::with_capacity(batch.len());
        {
            let mut ledger = self.ledger.lock().expect("ledger lock");
            for msg in batch.iter() {
                let tp = (msg.topic().to_string(), msg.partition());
                let Some(value) = msg.payload() else {
                    metrics::counter!(m::TOMBSTONES).increment(1);
                    if tombstones_logged.insert(tp.clone()) {
                        tracing::info!(topic = %tp.0, partition = tp.1, offset = msg.offset(),
                            "tombstone (null value) skipped; further ones of this partition are counted, not logged");
                    }
                    ledger.deliver(&tp, msg.offset(), true);
                    continue;
                };
                if ledger.deliver(&tp, msg.offset(), false) != Delivery::Spool {
                    continue;
                }
                let time = match msg.timestamp() {
                    Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) if ms >= 0 => {
                        RecordTime::Kafka(ms)
                    }
                    _ => RecordTime::Consumed(now_ms),
                };
                records.push(Record {
                    topic: tp.0,
                    partition: tp.1,
                    offset: msg.offset(),
                    time,
                    key: msg.key().map(Bytes::copy_from_slice),
                    value: Bytes::copy_from_slice(value),
                });
            }
        }
        batch.clear();
        // A spool that cannot write (disk full, I/O error) is retried: the records are registered
        // and must not be lost. Fetching waits meanwhile.
        let mut attempt = 0u32;
        while let Err(e) = self.spool.insert_batch(&records) {
            attempt += 1;
            if attempt == 1 || attempt.is_power_of_two() {
                tracing::error!(error = %e, records = records.len(), attempt, "cannot write to the spool; retrying");
            }
            if shutdown.is_cancelled() && attempt > 3 {
                tracing::error!(
                    "giving up on the spool write at shutdown; these records are not committed and will be fetched again"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(200).saturating_mul(attempt.min(25)));
        }
    }
}
