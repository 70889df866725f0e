//! Consumer: the Kafka side, on its own thread (rdkafka's calls block).
//!
//! It subscribes to the topics as a member of GROUP_ID and loops over seven steps: poll a batch,
//! register it in the commit ledger (tombstones are counted, and marked done in the Connect
//! layout) and write the new records to the spool in one batch, pace itself on the spool's fill
//! (`backpressure`: wait for room, pause, resume), fetch again from reused offsets, commit every
//! COMMIT_INTERVAL the positions the ledger says are stored, read the group's commits back, and
//! follow the topics KAFKA_TOPIC's patterns match. On revocation it commits, synchronously, what
//! is done for the revoked partitions before they go (design invariant 6). On shutdown it stops
//! fetching, waits until the uploaders have drained, and commits what they finished.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{BorrowedMessage, Message, Timestamp};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, SpoolLimits};
use crate::kafka::{self, METADATA_REFRESH};
use crate::metrics as m;
use crate::pipeline::backpressure::{Backpressure, PACE_WAIT, SpoolState};
use crate::pipeline::commit::{Delivery, Ledger, Tp};
use crate::pipeline::spool::{Entry, Fields, Spool};
use crate::pipeline::status::Status;
use crate::pipeline::throttle::{Say, Throttle};
use crate::record::RecordTime;
use crate::topics::TopicSelection;

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    #[error("Kafka client: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Most records taken from one poll round before they are spooled together. sled keeps the node
/// copies of a whole batch until the batch is written, so a large batch is a burst of memory; a
/// hundred keeps the spool's ingest far above any store's rate in the Connect format.
const MAX_BATCH: usize = 100;
/// The same in the Parquet format, which takes tens of thousands of records a second: each round
/// also reads the disk's free space, paces, and takes the ledger's lock, and with a hundred records
/// those rounds cost a fifth of the CPU (400,000 records of 1 KB from a backlog: 63,759 / 64,452
/// records/s at 19.4 / 18.9 us of CPU each with 100; 69,253 / 76,473 at 15.0 / 13.1 with 1,000;
/// 4,000 no better).
const MAX_BATCH_BATCHED: usize = 1000;
/// A round also ends once its records hold this many bytes: a thousand images of megabytes are
/// not one insert.
const MAX_BATCH_BYTES: usize = 16 << 20;

/// How often the group's committed offsets are read back from Kafka. rust-rdkafka 0.39 never
/// calls the commit callback for an asynchronous commit (fede1024/rust-rdkafka#856), so this is
/// how a lost commit is noticed (and sent again) and how `/status` knows what Kafka holds.
const READ_BACK_INTERVAL: Duration = Duration::from_secs(5);
/// How long a lookup of the cluster's topics (for KAFKA_TOPIC's patterns) may hold the consumer
/// thread: one metadata request, milliseconds when the broker answers.
const TOPIC_LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// rdkafka callbacks: rebalances go through the ledger so that a revoked partition is committed
/// once, then never again.
struct ArchiverContext {
    ledger: Arc<Mutex<Ledger>>,
    status: Arc<Status>,
    /// Set on assignment: the group's committed offsets are read back at once.
    assigned: AtomicBool,
    /// Whether consumption is paused under backpressure: newly assigned partitions take this
    /// state.
    paused: AtomicBool,
    /// No broker can be reached: said once, then every few seconds, then when one answers.
    unreachable: Throttle<()>,
    /// Why a broker could not be reached, last time (librdkafka's words: refused, unknown host).
    last_transport_error: Mutex<String>,
    /// Other Kafka errors, by librdkafka error code: said once, then every few seconds.
    errors: Throttle<i32>,
    /// The topics subscribed to (KAFKA_TOPIC's names and those its patterns match now).
    subscribed: Mutex<Vec<String>>,
    /// The Parquet format: a revocation waits for the partitions' objects being stored, then
    /// drops their spooled records (see [`ArchiverContext::hand_over`]).
    batched: Option<HandOver>,
}

/// What a revocation needs in the Parquet format.
struct HandOver {
    spool: Arc<Spool>,
    /// How long it waits for objects being stored (SHUTDOWN_TIMEOUT).
    wait: Duration,
}

impl ArchiverContext {
    /// The Parquet format, on revocation: the objects being stored of the revoked partitions get
    /// `wait` to finish (so the commit that follows covers them and the next owner starts after
    /// them); no new one starts (the ledger refuses it).
    fn wait_for_objects(&self, tps: &[Tp]) {
        let Some(h) = &self.batched else { return };
        self.ledger.lock().expect("ledger lock").closing(tps);
        let deadline = Instant::now() + h.wait;
        loop {
            let n = self.ledger.lock().expect("ledger lock").uploading(tps);
            if n == 0 {
                return;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    objects = n,
                    "revocation: objects still being stored after SHUTDOWN_TIMEOUT; the next owner of their partitions may store the same records again (verify reports overlaps)"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The Parquet format, after the revocation's commit: the revoked partitions' spooled records
    /// and batches sealed but not stored go. They are not committed, so their next owner (this process or
    /// another) fetches them from the committed offset and batches them from there; kept, they
    /// could end up in two objects.
    fn hand_over(&self, tps: &[Tp]) {
        let Some(h) = &self.batched else { return };
        for tp in tps {
            let dropped = (|| -> Result<usize, crate::pipeline::spool::SpoolError> {
                let records = h.spool.remove_below(&tp.0, tp.1, i64::MAX)?.len();
                // Stored batches stay: the committed offset may lie inside one (records of it
                // delivered again after a crash were marked done), and if the partition comes
                // back, the rest of its records must not go into a second object.
                for batch in h.spool.sealed_of(&tp.0, tp.1)?.iter().filter(|b| !b.stored) {
                    h.spool.unseal(&tp.0, tp.1, batch.first_offset)?;
                }
                Ok(records)
            })();
            match dropped {
                Ok(records) => {
                    self.ledger.lock().expect("ledger lock").forget(tp);
                    tracing::debug!(topic = %tp.0, partition = tp.1, records, "revoked: spooled records dropped; the next owner fetches them");
                }
                // Kept in the ledger: if the partition comes back, they are not spooled twice.
                Err(e) => tracing::warn!(topic = %tp.0, partition = tp.1, error = %e,
                    "revoked: cannot drop the partition's spooled records"),
            }
        }
    }

    /// A Kafka error, from librdkafka's error callback or from a poll (librdkafka reports a broker
    /// that refuses connections both ways, about 20 times a second).
    fn kafka_error(&self, error: &KafkaError, reason: &str) {
        self.status.error(None, format!("Kafka: {reason}"));
        let code = error.rdkafka_error_code();
        // One broker that cannot be reached (its reason says why: refused, unknown host), or all.
        let transport = matches!(
            code,
            Some(
                RDKafkaErrorCode::BrokerTransportFailure
                    | RDKafkaErrorCode::Resolve
                    | RDKafkaErrorCode::BrokerNotAvailable
            )
        );
        if transport {
            *self.last_transport_error.lock().expect("error lock") = reason.to_string();
        }
        if code == Some(RDKafkaErrorCode::AllBrokersDown) || (transport && self.unreachable.any()) {
            // All brokers down: said once with the last broker's reason; the failures of each
            // broker while it lasts only count.
            let why = self.last_transport_error.lock().expect("error lock").clone();
            let why = if why.is_empty() { reason.to_string() } else { why };
            match self.unreachable.happened(&()) {
                Say::First => tracing::error!(error = %why,
                    "cannot reach the Kafka broker: check BROKER_HOSTNAME, that the broker runs, and that the addresses it advertises (advertised.listeners) resolve and can be reached from here; retrying, and saying so every 10 s while it lasts"),
                Say::Again { times, since } => {
                    tracing::warn!(error = %why, errors = times, seconds = since.as_secs(),
                    "still cannot reach the Kafka broker")
                }
                Say::Nothing => {}
            }
            return;
        }
        if matches!(code, Some(RDKafkaErrorCode::UnknownTopicOrPartition | RDKafkaErrorCode::UnknownTopic)) {
            // "Subscribed topic not available: T: Broker: Unknown topic or partition"
            let topic = reason
                .split(": ")
                .nth(1)
                .filter(|t| self.subscribed.lock().expect("subscription lock").iter().any(|c| c == t));
            if let Some(topic) = topic {
                if self.status.topic_missing(topic) {
                    tracing::warn!(
                        topic,
                        "a topic to archive does not exist; it is archived once it is created (the topics are looked up every 10 s)"
                    );
                }
                return;
            }
        }
        match self.errors.happened(&code.map_or(-1, |c| c as i32)) {
            Say::First => tracing::warn!(error = %reason, "Kafka consumer error"),
            Say::Again { times, since } => {
                tracing::warn!(error = %reason, times, seconds = since.as_secs(), "Kafka consumer error, repeated")
            }
            Say::Nothing => {}
        }
    }

    /// A broker answered: if none could be reached before, say that it is over.
    fn broker_answers(&self) {
        if self.unreachable.any() {
            for ((), ended) in self.unreachable.ended() {
                tracing::info!(
                    errors = ended.times,
                    after_s = ended.lasted.as_secs(),
                    "the Kafka broker answers again"
                );
            }
        }
    }
}

impl ClientContext for ArchiverContext {
    /// librdkafka's errors, throttled (see [`ArchiverContext::kafka_error`]).
    fn error(&self, error: KafkaError, reason: &str) {
        self.kafka_error(&error, reason);
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): the partitions' high watermarks
    /// for `/status` and the lag gauge, and whether a broker is connected. Only those fields are
    /// read, so a field that another librdkafka version adds or drops does not matter.
    fn stats_raw(&self, json: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Stats {
            #[serde(default)]
            topics: HashMap<String, TopicStats>,
            #[serde(default)]
            brokers: HashMap<String, BrokerStats>,
        }
        #[derive(serde::Deserialize)]
        struct BrokerStats {
            state: String,
        }
        #[derive(serde::Deserialize)]
        struct TopicStats {
            #[serde(default)]
            partitions: HashMap<String, PartitionStats>,
        }
        #[derive(serde::Deserialize)]
        struct PartitionStats {
            partition: i32,
            hi_offset: i64,
        }
        match serde_json::from_slice::<Stats>(json) {
            Ok(stats) => {
                if stats.brokers.values().any(|b| b.state == "UP") {
                    self.broker_answers();
                }
                for (topic, t) in stats.topics {
                    if t.partitions.values().any(|p| p.partition >= 0) {
                        self.status.topic_found(&topic);
                    }
                    // Partition -1 is librdkafka's internal "unassigned" queue.
                    for p in t.partitions.values().filter(|p| p.partition >= 0 && p.hi_offset >= 0) {
                        self.status.set_end(&(topic.clone(), p.partition), p.hi_offset);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read librdkafka's statistics"),
        }
    }
}

impl ConsumerContext for ArchiverContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let tps = tps_of(tpl);
            self.wait_for_objects(&tps);
            let positions = self.ledger.lock().expect("ledger lock").positions(&tps);
            if !positions.is_empty() {
                commit(consumer, &positions, CommitMode::Sync);
            }
            let mut ledger = self.ledger.lock().expect("ledger lock");
            for tp in &tps {
                ledger.revoke(tp);
            }
            drop(ledger);
            self.hand_over(&tps);
            tracing::info!(partitions = %describe(&tps), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let tps = tps_of(tpl);
                let mut ledger = self.ledger.lock().expect("ledger lock");
                for tp in &tps {
                    ledger.assign(tp);
                }
                drop(ledger);
                // librdkafka keeps a partition's pause flag across revocation and assignment until
                // it is resumed (librdkafka#1849): a partition paused under an earlier assignment
                // would come back paused and never be fetched. Each assigned partition takes the
                // current state, explicitly.
                let paused = self.paused.load(Ordering::Relaxed) || self.status.paused_on_request();
                let set = if paused { consumer.pause(tpl) } else { consumer.resume(tpl) };
                if let Err(e) = set {
                    self.status.error(None, format!("cannot pause or resume the assigned partitions: {e}"));
                    tracing::warn!(error = %e, "cannot pause or resume the assigned partitions");
                }
                self.assigned.store(true, Ordering::Relaxed);
                self.broker_answers();
                for (topic, _) in &tps {
                    self.status.topic_found(topic);
                }
                tracing::info!(partitions = %describe(&tps), paused, "partitions assigned");
            }
            Rebalance::Error(e) => {
                self.status.error(None, format!("rebalance error: {e}"));
                tracing::warn!(error = %e, "rebalance error")
            }
            Rebalance::Revoke(_) => {}
        }
    }

    /// Called for synchronous commits only, as of rust-rdkafka 0.39 (see [`READ_BACK_INTERVAL`]).
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        let mut ledger = self.ledger.lock().expect("ledger lock");
        match result {
            Ok(()) => {
                for e in offsets.elements() {
                    if let Offset::Offset(position) = e.offset() {
                        ledger.commit_succeeded(&(e.topic().to_string(), e.partition()), position);
                    }
                }
            }
            Err(e) => {
                let tps = tps_of(offsets);
                for tp in &tps {
                    ledger.commit_failed(tp);
                    self.status.error(Some(tp), format!("offset commit failed: {e}"));
                }
                metrics::counter!(m::COMMIT_ERRORS).increment(1);
                tracing::warn!(error = %e, partitions = %describe(&tps), "offset commit failed; it is sent again at the next commit");
            }
        }
    }
}

fn tps_of(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

fn describe(tps: &[Tp]) -> String {
    tps.iter().map(|(t, p)| format!("{t}[{p}]")).collect::<Vec<_>>().join(",")
}

fn commit(consumer: &BaseConsumer<ArchiverContext>, positions: &[(Tp, i64)], mode: CommitMode) {
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), offset) in positions {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset)) {
            tracing::error!(error = %e, "cannot build the commit list");
            return;
        }
    }
    let result = consumer.commit(&tpl, mode);
    let mut ledger = consumer.context().ledger.lock().expect("ledger lock");
    match result {
        Ok(()) => {
            metrics::counter!(m::COMMITS).increment(1);
            tracing::debug!(?positions, "committed");
            if matches!(mode, CommitMode::Sync) {
                for (tp, position) in positions {
                    ledger.commit_succeeded(tp, *position);
                }
            }
        }
        Err(e) => {
            for (tp, _) in positions {
                ledger.commit_failed(tp);
                consumer.context().status.error(Some(tp), format!("offset commit failed: {e}"));
            }
            metrics::counter!(m::COMMIT_ERRORS).increment(1);
            tracing::warn!(error = %e, "offset commit failed; it is sent again at the next commit");
        }
    }
}

/// The consumer stage.
#[derive(Debug)]
pub struct KafkaConsumer {
    pub client: ClientConfig,
    pub topics: TopicSelection,
    pub spool: Arc<Spool>,
    pub ledger: Arc<Mutex<Ledger>>,
    pub status: Arc<Status>,
    pub commit_interval: Duration,
    pub limits: SpoolLimits,
    /// The Parquet format: how long a revocation waits for objects being stored; None for the
    /// Connect format.
    pub batched: Option<Duration>,
}

/// The next subscription, from the one `before`, the topics a lookup `matched`, and the topics
/// the previous lookup missed: a subscribed topic stays until two lookups in a row miss it.
/// Returns the subscription (sorted) and the topics this lookup missed.
fn next_subscription(
    before: &[String],
    matched: Vec<String>,
    missed_before: &HashSet<String>,
) -> (Vec<String>, HashSet<String>) {
    let mut topics = matched;
    let mut missed = HashSet::new();
    for t in before {
        if !topics.contains(t) && !missed_before.contains(t) {
            missed.insert(t.clone());
            topics.push(t.clone());
        }
    }
    topics.sort();
    (topics, missed)
}

/// What the consumer loop carries from one round to the next.
struct Loop {
    backpressure: Backpressure,
    /// Registered in the ledger but not yet written to the spool (the write failed).
    unspooled: Vec<Entry>,
    spool_failures: u32,
    /// Partitions whose first tombstone was logged (the rest are counted).
    tombstones_logged: HashSet<Tp>,
    /// The pause state last applied to the assignment, and when.
    pause_applied: bool,
    last_pause: Instant,
    last_commit: Instant,
    last_read_back: Instant,
    /// The topics subscribed to; None before the first subscription.
    subscribed: Option<Vec<String>>,
    /// Subscribed topics the last lookup did not find (they go if the next misses them too).
    missed_once: HashSet<String>,
    last_topic_lookup: Instant,
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
        let consumer: BaseConsumer<ArchiverContext> = self.client.create_with_context(ArchiverContext {
            ledger: self.ledger.clone(),
            status: self.status.clone(),
            assigned: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            unreachable: Throttle::default(),
            last_transport_error: Mutex::new(String::new()),
            errors: Throttle::default(),
            subscribed: Mutex::new(Vec::new()),
            batched: self.batched.map(|wait| HandOver { spool: self.spool.clone(), wait }),
        })?;
        let max_poll_interval = self
            .client
            .get("max.poll.interval.ms")
            .and_then(|v| v.parse().ok())
            .map_or(Duration::from_secs(300), Duration::from_millis);
        let mut state = Loop {
            backpressure: Backpressure::new(self.limits, max_poll_interval),
            unspooled: Vec::new(),
            spool_failures: 0,
            tombstones_logged: HashSet::new(),
            pause_applied: false,
            last_pause: Instant::now(),
            last_commit: Instant::now(),
            last_read_back: Instant::now(),
            subscribed: None,
            missed_once: HashSet::new(),
            last_topic_lookup: Instant::now(),
        };
        self.follow_topics(&consumer, &mut state)?;
        let max_batch = if self.batched.is_some() { MAX_BATCH_BATCHED } else { MAX_BATCH };
        let mut batch: Vec<BorrowedMessage<'_>> = Vec::with_capacity(max_batch);
        while !shutdown.is_cancelled() {
            self.poll(&consumer, &state, &mut batch, max_batch);
            let new = self.register(&mut batch, &mut state.tombstones_logged);
            state.unspooled.extend(new);
            self.spool(&mut state);
            self.pace(&consumer, &mut state)?;
            self.refetch(&consumer);
            self.commit_when_due(&consumer, &mut state);
            self.read_back_when_due(&consumer, &mut state)?;
            self.follow_topics(&consumer, &mut state)?;
        }
        self.stop(&consumer, &state, &drained, drain_wait)
    }

    /// Step 1, poll: up to `max_batch` records or [`MAX_BATCH_BYTES`]; or, while the spool is
    /// above its low watermarks, a short wait with the records left in librdkafka's queue (a wait
    /// longer than the backpressure's poll limit becomes a pause, and paused partitions are
    /// polled).
    fn poll<'c>(
        &self,
        consumer: &'c BaseConsumer<ArchiverContext>,
        state: &Loop,
        batch: &mut Vec<BorrowedMessage<'c>>,
        max_batch: usize,
    ) {
        if state.backpressure.pacing() {
            std::thread::sleep(PACE_WAIT);
            return;
        }
        let mut wait = Duration::from_millis(100);
        let mut bytes = 0;
        while batch.len() < max_batch && bytes < MAX_BATCH_BYTES {
            match consumer.poll(wait) {
                Some(Ok(msg)) => {
                    bytes += msg.payload_len() + msg.key_len();
                    batch.push(msg);
                }
                Some(Err(e)) => {
                    // rust-rdkafka hands every error event to the context's error callback
                    // (which says it, with librdkafka's reason) before poll returns it.
                    tracing::debug!(error = %e, "Kafka consumer error from poll");
                    break;
                }
                None => break,
            }
            wait = Duration::ZERO;
        }
    }

    /// Step 2, spool: the registered records in one batch. A write that fails (a full disk, an I/O
    /// error) keeps them for the next round and pauses consumption; nothing is lost, because they
    /// are registered, so nothing past them is committed.
    fn spool(&self, state: &mut Loop) {
        if state.unspooled.is_empty() {
            self.ledger.lock().expect("ledger lock").all_spooled();
            return;
        }
        match self.spool.insert(&state.unspooled) {
            Ok(()) => {
                if state.spool_failures > 0 {
                    tracing::info!("the spool accepts writes again");
                }
                state.unspooled.clear();
                state.spool_failures = 0;
                // The Parquet format batches a partition's records in offset order up to here.
                self.ledger.lock().expect("ledger lock").all_spooled();
            }
            Err(e) => {
                state.spool_failures += 1;
                self.status.error(None, format!("cannot write to the spool in SPOOL_DIR: {e}"));
                if state.spool_failures.is_power_of_two() {
                    tracing::error!(error = %e, records = state.unspooled.len(), attempt = state.spool_failures,
                        "cannot write to the spool in SPOOL_DIR (disk full?); consumption is paused until it can");
                }
            }
        }
    }

    /// Step 3, pace (design invariant 5): the backpressure's decision from the spool's fill, and
    /// the pause applied to the assignment. Paused partitions keep the group membership alive.
    fn pace(&self, consumer: &BaseConsumer<ArchiverContext>, state: &mut Loop) -> KafkaResult<()> {
        let (bytes, records) = (self.spool.byte_count(), self.spool.record_count());
        let spool = SpoolState { bytes, records, free: self.spool.available_space(), unwritten: state.unspooled.len() };
        let change = state.backpressure.update(&spool, Instant::now());
        // Paused on request through the REST API, too: the partitions are paused and polled.
        let paused = state.backpressure.paused() || self.status.paused_on_request();
        consumer.context().paused.store(paused, Ordering::Relaxed);
        if paused {
            // A paused consumer inserts nothing, so no insert checks for compaction.
            self.spool.compact_if_short_of_room(spool.free);
        }
        // Assigned partitions take the state on assignment; setting it again every second
        // covers a pause or resume that failed there or here.
        if change.is_some() || paused != state.pause_applied || state.last_pause.elapsed() >= Duration::from_secs(1) {
            let assignment = consumer.assignment()?;
            if paused {
                consumer.pause(&assignment)?;
            } else {
                consumer.resume(&assignment)?;
            }
            (state.pause_applied, state.last_pause) = (paused, Instant::now());
        }
        if let Some(why) = change {
            let on_request = if self.status.paused_on_request() { " (still paused on request)" } else { "" };
            tracing::info!(spool_bytes = bytes, spool_records = records, free_bytes = spool.free, "{why}{on_request}");
            self.status.set_paused(state.backpressure.paused().then_some(why));
        }
        Ok(())
    }

    /// Step 4: records at reused offsets that waited for the old ones are fetched again now.
    fn refetch(&self, consumer: &BaseConsumer<ArchiverContext>) {
        let refetch = self.ledger.lock().expect("ledger lock").refetch();
        for ((topic, partition), from) in refetch {
            if let Err(e) = consumer.seek(&topic, partition, Offset::Offset(from), Duration::from_secs(5)) {
                tracing::warn!(topic = %topic, partition, offset = from, error = %e,
                    "cannot fetch the partition again from a reused offset; trying again");
                self.ledger.lock().expect("ledger lock").hold(&(topic, partition), from);
            } else {
                tracing::info!(topic = %topic, partition, offset = from, "fetching again from a reused offset");
            }
        }
    }

    /// Step 5, commit: every COMMIT_INTERVAL, what the ledger says is stored (design invariant 1).
    fn commit_when_due(&self, consumer: &BaseConsumer<ArchiverContext>, state: &mut Loop) {
        if state.last_commit.elapsed() < self.commit_interval {
            return;
        }
        let positions = self.ledger.lock().expect("ledger lock").to_commit();
        if !positions.is_empty() {
            commit(consumer, &positions, CommitMode::Async);
        }
        self.record_latencies();
        state.last_commit = Instant::now();
    }

    /// Step 6, read back commits: after an assignment and every [`READ_BACK_INTERVAL`].
    fn read_back_when_due(&self, consumer: &BaseConsumer<ArchiverContext>, state: &mut Loop) -> KafkaResult<()> {
        if !consumer.context().assigned.swap(false, Ordering::Relaxed)
            && state.last_read_back.elapsed() < READ_BACK_INTERVAL
        {
            return Ok(());
        }
        if self.status.cluster_id().is_none() {
            // Known from the metadata by the time partitions are assigned: no wait.
            if let Some(id) = consumer.client().fetch_cluster_id(Duration::from_millis(100)) {
                self.status.set_cluster_id(id);
            }
        }
        self.read_back_commits(consumer)?;
        state.last_read_back = Instant::now();
        Ok(())
    }

    /// Step 7, subscribe: at the start, then, when KAFKA_TOPIC holds a pattern, every
    /// [`METADATA_REFRESH`] to the topics it matches now. The subscription changes (and the group
    /// rebalances) only when they do; a topic leaves it only once two lookups in a row missed it,
    /// so that one short answer (a broker restarting) does not revoke it. A lookup that fails is
    /// tried again at the next refresh.
    fn follow_topics(&self, consumer: &BaseConsumer<ArchiverContext>, state: &mut Loop) -> KafkaResult<()> {
        let first = state.subscribed.is_none();
        if !first && (!self.topics.has_patterns() || state.last_topic_lookup.elapsed() < METADATA_REFRESH) {
            return Ok(());
        }
        state.last_topic_lookup = Instant::now();
        let (matched, looked_up) = match kafka::selected_topics(consumer, &self.topics, TOPIC_LOOKUP_TIMEOUT) {
            Ok(t) => (t, true),
            Err(e) if first => {
                tracing::warn!(error = %e, "cannot list the cluster's topics for KAFKA_TOPIC's patterns; trying again every 10 s");
                (self.topics.resolve([]), false)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot list the cluster's topics for KAFKA_TOPIC's patterns");
                return Ok(());
            }
        };
        let before = state.subscribed.take().unwrap_or_default();
        let (topics, missed) = next_subscription(&before, matched, &state.missed_once);
        state.missed_once = missed;
        if !first && before == topics {
            state.subscribed = Some(topics);
            return Ok(());
        }
        if topics.is_empty() {
            consumer.unsubscribe();
            if looked_up {
                tracing::warn!(topics = %self.topics,
                    "KAFKA_TOPIC matches no topic yet; a topic created later that matches is archived (the topics are looked up every 10 s)");
            }
        } else {
            consumer.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
            let added: Vec<&str> = topics.iter().filter(|t| !before.contains(t)).map(String::as_str).collect();
            let removed: Vec<&str> = before.iter().filter(|t| !topics.contains(t)).map(String::as_str).collect();
            if first {
                tracing::info!(topics = %topics.join(","), selection = %self.topics, "subscribed");
            } else {
                tracing::info!(added = %added.join(","), removed = %removed.join(","), topics = %topics.join(","),
                    "the topics KAFKA_TOPIC matches changed; subscribed again");
            }
        }
        *consumer.context().subscribed.lock().expect("subscription lock") = topics.clone();
        self.status.set_topics(topics.clone());
        state.subscribed = Some(topics);
        Ok(())
    }

    /// On shutdown: stop fetching, keep serving the client while the uploaders drain (at most
    /// `drain_wait`), then commit synchronously what they stored.
    fn stop(
        &self,
        consumer: &BaseConsumer<ArchiverContext>,
        state: &Loop,
        drained: &CancellationToken,
        drain_wait: Duration,
    ) -> Result<(), ConsumerError> {
        if !state.unspooled.is_empty() && self.spool.insert(&state.unspooled).is_err() {
            tracing::error!(
                records = state.unspooled.len(),
                "the spool still cannot be written; these records are not committed and will be fetched again"
            );
        }
        // Stop fetching; keep serving the client while the uploaders drain. A partition assigned
        // meanwhile is paused too.
        consumer.context().paused.store(true, Ordering::Relaxed);
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
            commit(consumer, &positions, CommitMode::Sync);
        }
        self.record_latencies();
        tracing::info!(committed = ?positions, "consumer stopped");
        Ok(())
    }

    /// End-to-end latency of the records whose offsets were just committed.
    fn record_latencies(&self) {
        let times = self.ledger.lock().expect("ledger lock").take_committed_times();
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let histogram = metrics::histogram!(m::END_TO_END_LATENCY);
        for t in times {
            histogram.record((now_ms - t).max(0) as f64 / 1000.0);
        }
    }

    /// Reads the group's committed offsets back from Kafka (see [`READ_BACK_INTERVAL`]).
    fn read_back_commits(&self, consumer: &BaseConsumer<ArchiverContext>) -> KafkaResult<()> {
        let assignment = consumer.assignment()?;
        if assignment.count() == 0 {
            return Ok(());
        }
        // Short: the consumer thread also keeps the group membership and the backpressure going.
        match consumer.committed_offsets(assignment, Duration::from_secs(2)) {
            Ok(tpl) => {
                let mut ledger = self.ledger.lock().expect("ledger lock");
                for e in tpl.elements() {
                    if let Offset::Offset(o) = e.offset() {
                        ledger.confirmed(&(e.topic().to_string(), e.partition()), o);
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot read the committed offsets back; trying again later"),
        }
        Ok(())
    }

    /// Registers a polled batch in the ledger; returns the records that are new and must be
    /// spooled, encoded for the spool straight from the fetched messages.
    fn register(&self, batch: &mut Vec<BorrowedMessage<'_>>, tombstones_logged: &mut HashSet<Tp>) -> Vec<Entry> {
        if batch.is_empty() {
            return Vec::new();
        }
        metrics::counter!(m::RECORDS_CONSUMED).increment(batch.len() as u64);
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let mut ledger = self.ledger.lock().expect("ledger lock");
        let mut new = Vec::with_capacity(batch.len());
        // A poll's records come in runs of one partition: the ledger's key is built once a run.
        let mut tp: Tp = (String::new(), -1);
        for (i, msg) in batch.iter().enumerate() {
            if tp.1 != msg.partition() || tp.0 != msg.topic() {
                tp = (msg.topic().to_string(), msg.partition());
            }
            let kafka_ms = kafka_time(msg);
            let tombstone = msg.payload().is_none();
            if tombstone {
                metrics::counter!(m::TOMBSTONES).increment(1);
            }
            // The Connect layout has nothing to store for a tombstone; the Parquet format keeps
            // it as a row with a null payload.
            if tombstone && self.batched.is_none() {
                if tombstones_logged.insert(tp.clone()) {
                    tracing::info!(topic = %tp.0, partition = tp.1, offset = msg.offset(),
                        "tombstone (null value) skipped; further ones of this partition are counted, not logged");
                }
                ledger.deliver(&tp, msg.offset(), true, kafka_ms);
                continue;
            }
            if ledger.deliver(&tp, msg.offset(), false, kafka_ms) == Delivery::Spool {
                new.push((i, kafka_ms));
            }
        }
        for reset in ledger.take_resets() {
            let (topic, partition) = (&reset.tp.0, reset.tp.1);
            let seen = match reset.was {
                Some(was) => format!("went back from offset {was} to {}", reset.now),
                None => format!("holds another record at offset {} than this instance saw there", reset.now),
            };
            let what = if reset.held {
                "they are fetched again once the old records at these offsets are stored"
            } else {
                "they are archived from there"
            };
            let problem = format!(
                "offsets reused: {topic}[{partition}] {seen} (the topic was deleted and created again, or its log truncated); \
                 {what}, each under the hour of its own timestamp: an older object of the same offset in the same hour folder is replaced unless S3_CONDITIONAL_PUT=true"
            );
            tracing::error!(topic = %topic, partition, offset = reset.now, held = reset.held,
                "offsets reused: the partition's offsets hold other records (the topic deleted and created again, or its log truncated); they are archived as new records");
            self.status.error(Some(&reset.tp), problem);
        }
        drop(ledger);
        // Encoded outside the ledger's lock, which the uploaders take.
        let entries = new
            .into_iter()
            .map(|(i, kafka_ms)| {
                let msg = &batch[i];
                // A column of the Parquet format; user metadata of the Connect layout's payload.
                let headers = crate::kafka::headers(msg);
                let fields = Fields {
                    time: kafka_ms.map_or(RecordTime::Consumed(now_ms), RecordTime::Kafka),
                    key: msg.key(),
                    headers: &headers,
                    value: msg.payload(),
                };
                self.spool.entry(msg.topic(), msg.partition(), msg.offset(), &fields)
            })
            .collect();
        batch.clear();
        entries
    }
}

fn kafka_time(msg: &BorrowedMessage<'_>) -> Option<i64> {
    match msg.timestamp() {
        Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) if ms >= 0 => Some(ms),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_topic_leaves_the_subscription_only_when_two_lookups_in_a_row_miss_it() {
        let before = names(&["a", "b"]);
        // One lookup misses b (a broker answering with part of its topics): b stays.
        let (topics, missed) = next_subscription(&before, names(&["a", "c"]), &HashSet::new());
        assert_eq!(topics, ["a", "b", "c"]);
        assert_eq!(missed, HashSet::from(["b".to_string()]));
        // Found again: nothing pending.
        let (topics, again) = next_subscription(&topics, names(&["a", "b", "c"]), &missed);
        assert_eq!(topics, ["a", "b", "c"]);
        assert!(again.is_empty());
        // Missed twice in a row: gone. An empty answer never empties the subscription at once.
        let (topics, missed) = next_subscription(&before, Vec::new(), &HashSet::new());
        assert_eq!(topics, ["a", "b"]);
        let (topics, _) = next_subscription(&topics, Vec::new(), &missed);
        assert!(topics.is_empty());
    }
}
