//! Restore: replays an archive into a Kafka topic.
//!
//! For each archived partition, in offset order, the payload object becomes a SINETStream v3
//! message again: the Avro `msg` is the body without the separator, and `tstamp` is exact (to the
//! microsecond) from the payload's metadata, or, for objects the Kafka Connect deployment wrote
//! (they carry no metadata), from the timestamp object, which only keeps milliseconds. The record
//! key and Kafka timestamp come back from the metadata when it has them. Records archived raw
//! (UNDECODABLE=raw) go back as they were; dead letters only with `--dead-letters`.
//!
//! Partition P of the archive goes to partition P of the target topic, through an idempotent
//! producer, so each partition's order is kept even when sends are retried.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::archive::sinetstream::{self, Format};
use crate::archive::{self, ArchiveError, OffsetObjects, Selection, TopicIndex};
use crate::config::{Config, Needs, Settings};
use crate::exit::Exit;
use crate::tools::progress::Progress;
use crate::tools::selection::SelectionArgs;
use crate::tools::{KAFKA_SETTINGS, LAYOUT_SETTINGS, STORE_SETTINGS};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("Kafka did not take record {partition}/{offset}: {error}")]
    Delivery { partition: i32, offset: i64, error: rdkafka::error::KafkaError },
    #[error("the archive has nothing for topic {0} in the range asked")]
    Empty(String),
    #[error(
        "target topic {topic} has {has} partition(s); the archive has partition {needs}, and each archived partition \
         goes to the same partition to keep its order: create {topic} with at least {} partitions",
        needs + 1
    )]
    TooFewPartitions { topic: String, has: usize, needs: i32 },
    #[error("target topic {0} does not exist: create it first (with as many partitions as the archive has)")]
    NoTargetTopic(String),
    #[error("cannot read {key}: {source}")]
    Get { key: String, source: object_store::Error },
}

/// What to restore.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The archived topic.
    pub topic: String,
    /// Where to produce; `None` only with `dry_run`.
    pub to_topic: Option<String>,
    /// Partition, offsets, and hour folders (by the archive path) to restore.
    pub selection: Selection,
    /// Also produce dead-lettered records' raw values.
    pub dead_letters: bool,
    /// Read and rebuild everything, produce nothing.
    pub dry_run: bool,
}

/// What a restore did (or, dry, would do).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct RestoreSummary {
    pub produced: u64,
    /// SINETStream messages with the exact tstamp from the payload's metadata.
    pub exact_tstamp: u64,
    /// SINETStream messages whose tstamp came from the timestamp object: milliseconds only.
    pub millisecond_tstamp: u64,
    /// Records archived raw (UNDECODABLE=raw) produced as they were.
    pub raw: u64,
    pub dead_letters_produced: u64,
    pub dead_letters_skipped: u64,
    /// Records with their Kafka key back.
    pub with_key: u64,
    /// Offsets that could not be rebuilt (see `problems`); nothing was produced for them.
    pub skipped: u64,
    pub problems: Vec<String>,
    /// Per partition: first and last offset, records.
    pub partitions: BTreeMap<i32, (i64, i64, u64)>,
}

/// One record rebuilt from the archive.
#[derive(Debug)]
struct Rebuilt {
    offset: i64,
    value: Vec<u8>,
    key: Option<Vec<u8>>,
    timestamp_ms: Option<i64>,
    how: How,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Exact,
    Millisecond,
    Raw,
    DeadLetter,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Topic to produce to; it must exist with at least as many partitions as the archive.
    #[arg(long)]
    pub to_topic: Option<String>,
    /// Also produce the raw values of dead-lettered records.
    #[arg(long)]
    pub dead_letters: bool,
    /// Read and rebuild every record, produce nothing.
    #[arg(long)]
    pub dry_run: bool,
}

impl Args {
    pub fn needs(&self) -> Needs {
        Needs { broker: !self.dry_run, topic: true }
    }
}

/// The settings `restore` reads (the others are hidden from its help).
pub fn reads() -> Vec<&'static str> {
    [KAFKA_SETTINGS, STORE_SETTINGS, LAYOUT_SETTINGS, &["UPLOAD_THREADS", "LOG_FORMAT"]].concat()
}

/// `kafka-s3-archiver restore`: a summary on stdout; exit status 1 when a record was skipped.
pub fn run(args: Args, config: &Config) -> Exit {
    if config.topics.len() != 1 {
        eprintln!("error: restore takes one archived topic (--topic or KAFKA_TOPIC), not {}", config.topics.join(","));
        return Exit::Usage;
    }
    if args.to_topic.is_none() && !args.dry_run {
        eprintln!("error: give --to-topic (the topic to produce to), or --dry-run");
        return Exit::Usage;
    }
    let selection = match args.selection.parse(config) {
        Ok(s) => s,
        Err(exit) => return exit,
    };
    let options = RestoreOptions {
        topic: config.topics[0].clone(),
        to_topic: args.to_topic,
        selection,
        dead_letters: args.dead_letters,
        dry_run: args.dry_run,
    };
    match super::run_on_store(config, |store| replay(config, store, &options, Progress::new("restore"))) {
        Ok(summary) => {
            print!("{}", render(&summary, &options));
            if summary.skipped == 0 { Exit::Done } else { Exit::Failed }
        }
        Err(exit) => exit,
    }
}

/// Restores the archive of `options.topic`.
pub async fn replay(
    config: &Config,
    store: Arc<dyn ObjectStore>,
    options: &RestoreOptions,
    progress: Arc<Progress>,
) -> Result<RestoreSummary, RestoreError> {
    let layout = &config.layout;
    progress.start_listing(&options.topic);
    let (p, t) = (progress.clone(), options.topic.clone());
    let on_list: archive::ListProgress = Arc::new(move |state| p.listing(&t, state));
    let listed = archive::list_topic(
        store.as_ref(),
        &options.topic,
        options.selection.range,
        layout,
        options.selection.parallel,
        Some(on_list),
    )
    .await?;
    let mut index = TopicIndex::build(&options.topic, listed);
    options.selection.apply(&mut index);
    index.partitions.retain(|_, s| !s.is_empty());
    if index.partitions.is_empty() {
        return Err(RestoreError::Empty(options.topic.clone()));
    }
    let producer = match (&options.to_topic, options.dry_run) {
        (Some(to), false) => Some(producer(config, to, *index.partitions.keys().last().expect("not empty"))?),
        _ => None,
    };
    let total: u64 = index.partitions.values().map(|s| s.len() as u64).sum();
    progress.set_stage(&format!("restoring {}", options.topic), total);
    let mut summary = RestoreSummary::default();
    for (&partition, slots) in &index.partitions {
        let separator = layout.separator.clone();
        let rebuilt = futures::stream::iter(slots.iter())
            .map(|(&offset, slot)| rebuild(store.as_ref(), offset, slot, &separator, options.dead_letters))
            .buffered(options.selection.parallel);
        tokio::pin!(rebuilt);
        let mut pending: VecDeque<(i64, DeliveryFuture)> = VecDeque::new();
        while let Some(r) = rebuilt.next().await {
            progress.inc(1);
            let r = match r? {
                Ok(Some(r)) => r,
                Ok(None) => {
                    summary.dead_letters_skipped += 1;
                    continue;
                }
                Err(problem) => {
                    summary.skipped += 1;
                    summary.problems.push(format!("partition {partition}: {problem}"));
                    continue;
                }
            };
            match r.how {
                How::Exact => summary.exact_tstamp += 1,
                How::Millisecond => summary.millisecond_tstamp += 1,
                How::Raw => summary.raw += 1,
                How::DeadLetter => summary.dead_letters_produced += 1,
            }
            summary.with_key += u64::from(r.key.is_some());
            summary.produced += 1;
            let e = summary.partitions.entry(partition).or_insert((r.offset, r.offset, 0));
            e.1 = r.offset;
            e.2 += 1;
            if let (Some(producer), Some(to)) = (&producer, &options.to_topic) {
                let mut record = FutureRecord::<[u8], [u8]>::to(to).partition(partition).payload(&r.value);
                if let Some(k) = &r.key {
                    record = record.key(k.as_slice());
                }
                if let Some(ts) = r.timestamp_ms {
                    record = record.timestamp(ts);
                }
                let delivery = loop {
                    match producer.send_result(record) {
                        Ok(d) => break d,
                        // The local queue is full: wait for deliveries, then send again.
                        Err((
                            rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                            back,
                        )) => {
                            record = back;
                            if let Some((offset, d)) = pending.pop_front() {
                                delivered(partition, offset, d).await?;
                            } else {
                                producer.poll(Duration::from_millis(100));
                            }
                        }
                        Err((error, _)) => return Err(RestoreError::Delivery { partition, offset: r.offset, error }),
                    }
                };
                pending.push_back((r.offset, delivery));
                while pending.len() > 10_000 {
                    let (offset, d) = pending.pop_front().expect("not empty");
                    delivered(partition, offset, d).await?;
                }
            }
        }
        for (offset, d) in pending {
            delivered(partition, offset, d).await?;
        }
    }
    if let Some(p) = &producer {
        p.flush(Timeout::After(Duration::from_secs(60)))?;
    }
    progress.finish();
    Ok(summary)
}

async fn delivered(partition: i32, offset: i64, d: DeliveryFuture) -> Result<(), RestoreError> {
    match d.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((error, _))) => Err(RestoreError::Delivery { partition, offset, error }),
        Err(_) => Err(RestoreError::Delivery { partition, offset, error: rdkafka::error::KafkaError::Canceled }),
    }
}

/// An idempotent producer to `topic`, which must have a partition `max_partition`.
fn producer(config: &Config, topic: &str, max_partition: i32) -> Result<FutureProducer, RestoreError> {
    let mut c = rdkafka::ClientConfig::new();
    c.set("bootstrap.servers", config.brokers.join(","));
    for (k, v) in &config.kafka_properties {
        c.set(k, v);
    }
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("client.id", "kafka-s3-archiver-restore");
    let producer: FutureProducer = c.create()?;
    let metadata = producer.client().fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let t = metadata.topics().iter().find(|t| t.name() == topic);
    match t {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            let has = t.partitions().len();
            if max_partition as usize >= has {
                return Err(RestoreError::TooFewPartitions { topic: topic.to_string(), has, needs: max_partition });
            }
            Ok(producer)
        }
        _ => Err(RestoreError::NoTargetTopic(topic.to_string())),
    }
}

/// Rebuilds one offset's record. `Ok(Err(problem))`: it cannot be rebuilt; `Ok(Ok(None))`: a
/// dead letter left out.
async fn rebuild(
    store: &dyn ObjectStore,
    offset: i64,
    slot: &OffsetObjects,
    separator: &Bytes,
    dead_letters: bool,
) -> Result<Result<Option<Rebuilt>, String>, RestoreError> {
    if let Some(payload) = slot.payload.first() {
        let (body, attrs) = get(store, &payload.key).await?;
        let Some(msg) = body.strip_suffix(separator.as_ref()) else {
            return Ok(Err(format!(
                "{} does not end with S3_OBJECT_SEPARATOR {:?}: set it as the archive was written",
                payload.key,
                String::from_utf8_lossy(separator)
            )));
        };
        let (key, kafka_ts) = kafka_key_and_time(&attrs);
        if meta(&attrs, archive::META_FORM).as_deref() == Some("raw") {
            return Ok(Ok(Some(Rebuilt { offset, value: msg.to_vec(), key, timestamp_ms: kafka_ts, how: How::Raw })));
        }
        let (tstamp_us, how) = match meta(&attrs, archive::META_TSTAMP_US).and_then(|v| v.parse::<i64>().ok()) {
            Some(us) => (us, How::Exact),
            None => {
                let Some(ts) = slot.timestamp.first() else {
                    return Ok(Err(format!("{} has neither tstamp metadata nor a timestamp object", payload.key)));
                };
                let (text, _) = get(store, &ts.key).await?;
                let text = text.strip_suffix(separator.as_ref()).unwrap_or(&text);
                match parse_timestamp_text(text) {
                    Some(ms) => (ms * 1000, How::Millisecond),
                    None => {
                        return Ok(Err(format!(
                            "{} does not hold a yyyy-MM-ddTHH:mm:ss.SSS time: {:?}",
                            ts.key,
                            String::from_utf8_lossy(text)
                        )));
                    }
                }
            }
        };
        let value = sinetstream::encode(tstamp_us, msg, Format::V3);
        // The archive of the Kafka Connect deployment has no Kafka timestamp: the producer's
        // tstamp is the closest (SINETStream sets both from the same clock).
        let timestamp_ms = kafka_ts.or(Some(crate::archive::micros_to_millis(tstamp_us)));
        return Ok(Ok(Some(Rebuilt { offset, value, key, timestamp_ms, how })));
    }
    if let Some(dead) = slot.dead_letter.first() {
        if !dead_letters {
            return Ok(Ok(None));
        }
        let (body, attrs) = get(store, &dead.key).await?;
        let (key, timestamp_ms) = kafka_key_and_time(&attrs);
        return Ok(Ok(Some(Rebuilt { offset, value: body.to_vec(), key, timestamp_ms, how: How::DeadLetter })));
    }
    Ok(Err(format!(
        "offset {offset} has no payload object (only {})",
        slot.all().map(|l| l.key.as_str()).collect::<Vec<_>>().join(", ")
    )))
}

async fn get(store: &dyn ObjectStore, key: &str) -> Result<(Bytes, Attributes), RestoreError> {
    let fail = |source| RestoreError::Get { key: key.to_string(), source };
    let r = store.get(&Path::from(key)).await.map_err(fail)?;
    let attributes = r.attributes.clone();
    Ok((r.bytes().await.map_err(fail)?, attributes))
}

fn meta(attributes: &Attributes, name: &'static str) -> Option<String> {
    attributes.get(&Attribute::Metadata(name.into())).map(|v| v.as_ref().to_string())
}

/// The record key and Kafka timestamp an object's metadata kept, where it has them.
fn kafka_key_and_time(attributes: &Attributes) -> (Option<Vec<u8>>, Option<i64>) {
    use base64::Engine;
    let key = meta(attributes, archive::META_KAFKA_KEY)
        .and_then(|k| base64::engine::general_purpose::STANDARD.decode(k).ok());
    (key, meta(attributes, archive::META_KAFKA_TIMESTAMP_MS).and_then(|v| v.parse().ok()))
}

/// Milliseconds since the epoch of the timestamp object's text, `yyyy-MM-ddTHH:mm:ss.SSS` UTC.
pub fn parse_timestamp_text(text: &[u8]) -> Option<i64> {
    let s = std::str::from_utf8(text).ok()?;
    let t = chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.3f").ok()?;
    Some(t.and_utc().timestamp_millis())
}

/// The summary as the `restore` command prints it.
pub fn render(s: &RestoreSummary, options: &RestoreOptions) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let target = options.to_topic.as_deref().unwrap_or("(none)");
    let verb = if options.dry_run { "would produce" } else { "produced" };
    let _ = writeln!(
        out,
        "restore {} -> {target}{}",
        options.topic,
        if options.dry_run { " (dry run: nothing produced)" } else { "" }
    );
    for (p, (first, last, n)) in &s.partitions {
        let _ = writeln!(out, "  partition {p}: offsets {first}..={last}, {n} records, in offset order");
    }
    let _ = writeln!(out, "{verb} {} records:", s.produced);
    let _ = writeln!(
        out,
        "  {} SINETStream messages with the exact tstamp (microseconds, from the payload's metadata)",
        s.exact_tstamp
    );
    if s.millisecond_tstamp > 0 {
        let _ = writeln!(
            out,
            "  {} SINETStream messages with the tstamp to the millisecond only: archived without metadata (by the \
             Kafka Connect deployment, or to a local directory), so it comes from the timestamp object",
            s.millisecond_tstamp
        );
    }
    let _ = writeln!(out, "  {} raw values (archived with UNDECODABLE=raw)", s.raw);
    let _ = writeln!(out, "  {} dead letters as their raw values", s.dead_letters_produced);
    let _ = writeln!(out, "  {} with their Kafka key", s.with_key);
    if s.dead_letters_skipped > 0 {
        let _ = writeln!(
            out,
            "left out: {} dead letters (--dead-letters produces their raw values)",
            s.dead_letters_skipped
        );
    }
    if s.skipped > 0 {
        let _ = writeln!(out, "NOT RESTORED: {} offsets that cannot be rebuilt:", s.skipped);
        for p in s.problems.iter().take(20) {
            let _ = writeln!(out, "  {p}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_objects_parse_back_to_their_milliseconds() {
        for ms in [0, 1_650_250_000_123, 1_650_250_000_999, 253_402_300_799_999] {
            let text = crate::archive::timestamp_text(ms);
            assert_eq!(parse_timestamp_text(text.as_bytes()), Some(ms), "{text}");
        }
        assert_eq!(parse_timestamp_text(b"2022-04-18 02:46:40"), None);
    }
}
