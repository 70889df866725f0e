//! Restore: replays an archive into a Kafka topic.
//!
//! For each archived partition, in offset order, the payload object becomes a SINETStream v3
//! message again: the Avro `msg` is the body without the separator, and `tstamp` is exact (to the
//! microsecond) from the payload's metadata, or, for objects the Kafka Connect deployment wrote
//! (they carry no metadata), from the timestamp object, which only keeps milliseconds. The record
//! key and Kafka timestamp come back from the metadata when it has them. Records archived raw
//! (UNDECODABLE=raw) go back as they were; dead letters only with `--dead-letters`.
//!
//! In the Parquet format (ARCHIVE_FORMAT=parquet) each row is a record: a SINETStream message
//! (tstamp and msg) is encoded again as v3 with its exact tstamp, any other value (not a message,
//! or VALUE_FORMAT=plain) goes back as it was, a tombstone as a null value, with the key, headers
//! and Kafka timestamp the row kept.
//!
//! Partition P of the archive goes to partition P of the target topic, through an idempotent
//! producer, so each partition's order is kept even when sends are retried. An offset archived
//! twice (overlapping objects, or both formats) is produced once, from its first copy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::archive::parquet::Row;
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
    /// Records with their Kafka headers back (Parquet format; user metadata of the Connect format).
    pub with_headers: u64,
    /// Tombstones (null values) produced again (Parquet format; the per-offset layout has none).
    pub tombstones: u64,
    /// Offsets archived more than once, produced once.
    pub twice: u64,
    /// Offsets that could not be rebuilt (see `problems`); nothing was produced for them.
    pub skipped: u64,
    /// Parquet objects that cannot be read at all: how many records they held is not known.
    pub unreadable_objects: u64,
    pub problems: Vec<String>,
    /// Per partition: first and last offset, records.
    pub partitions: BTreeMap<i32, (i64, i64, u64)>,
}

/// One record rebuilt from the archive.
#[derive(Debug)]
struct Rebuilt {
    offset: i64,
    /// None: a tombstone.
    value: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    headers: Option<Vec<(String, Option<Bytes>)>>,
    timestamp_ms: Option<i64>,
    how: How,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum How {
    Exact,
    Millisecond,
    Raw,
    DeadLetter,
    Tombstone,
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

/// `kafka-s3-archiver restore`: a summary on stdout; exit status 1 when a record was skipped or an
/// object could not be read.
pub fn run(args: Args, config: &Config) -> Exit {
    let Some(topic) = config.topics.single_name() else {
        eprintln!("error: restore takes one archived topic by name (--topic or KAFKA_TOPIC), not {}", config.topics);
        return Exit::Usage;
    };
    if args.to_topic.is_none() && !args.dry_run {
        eprintln!("error: give --to-topic (the topic to produce to), or --dry-run");
        return Exit::Usage;
    }
    let selection = match args.selection.parse(config) {
        Ok(s) => s,
        Err(exit) => return exit,
    };
    let options = RestoreOptions {
        topic: topic.to_string(),
        to_topic: args.to_topic,
        selection,
        dead_letters: args.dead_letters,
        dry_run: args.dry_run,
    };
    match super::run_on_store(config, |store| replay(config, store, &options, Progress::new("restore"))) {
        Ok(summary) => {
            print!("{}", render(&summary, &options));
            if summary.skipped == 0 && summary.unreadable_objects == 0 { Exit::Done } else { Exit::Failed }
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
    index.batches.retain(|_, objects| !objects.is_empty());
    let partitions: BTreeSet<i32> = index.partitions.keys().chain(index.batches.keys()).copied().collect();
    let Some(&max_partition) = partitions.last() else {
        return Err(RestoreError::Empty(options.topic.clone()));
    };
    let producer = match (&options.to_topic, options.dry_run) {
        (Some(to), false) => Some((producer(config, to, max_partition)?, to.clone())),
        _ => None,
    };
    // Progress counts offsets of the per-offset layout and objects of the Parquet format.
    let total: u64 = index.partitions.values().map(|s| s.len() as u64).sum::<u64>()
        + index.batches.values().map(|o| o.len() as u64).sum::<u64>();
    progress.set_stage(&format!("restoring {}", options.topic), total);
    let mut summary = RestoreSummary::default();
    for partition in partitions {
        let mut out = Output { partition, producer: producer.as_ref(), pending: VecDeque::new(), last: None };
        let mut slots = index.partitions.remove(&partition).unwrap_or_default();
        let objects = index.batches.remove(&partition).unwrap_or_default();
        // A topic archived in both formats (ARCHIVE_FORMAT changed, maybe more than once): the
        // per-offset objects below each Parquet object go before it, the rest after the last.
        for object in &objects {
            let first = object.parsed.as_ref().map_or(0, |k| k.offset);
            let rest = slots.split_off(&first);
            restore_slots(store.as_ref(), &slots, options, layout, &mut out, &mut summary, &progress).await?;
            slots = rest;
            restore_object(store.as_ref(), object, options, &mut out, &mut summary).await?;
            progress.inc(1);
        }
        restore_slots(store.as_ref(), &slots, options, layout, &mut out, &mut summary, &progress).await?;
        out.flush().await?;
    }
    if let Some((p, _)) = &producer {
        p.flush(Timeout::After(Duration::from_secs(60)))?;
    }
    progress.finish();
    Ok(summary)
}

/// Where rebuilt records of one partition go, in offset order.
struct Output<'a> {
    partition: i32,
    producer: Option<&'a (FutureProducer, String)>,
    pending: VecDeque<(i64, DeliveryFuture)>,
    /// The last offset produced: an offset archived twice goes once.
    last: Option<i64>,
}

impl Output<'_> {
    /// Produces `r` (counted in `summary`), unless its offset went already.
    async fn send(&mut self, r: Rebuilt, from: &str, summary: &mut RestoreSummary) -> Result<(), RestoreError> {
        let partition = self.partition;
        if self.last.is_some_and(|last| r.offset <= last) {
            summary.twice += 1;
            summary.problems.push(format!(
                "partition {partition}: offset {} is archived again in {from}: produced once, from the first copy",
                r.offset
            ));
            return Ok(());
        }
        self.last = Some(r.offset);
        match r.how {
            How::Exact => summary.exact_tstamp += 1,
            How::Millisecond => summary.millisecond_tstamp += 1,
            How::Raw => summary.raw += 1,
            How::DeadLetter => summary.dead_letters_produced += 1,
            How::Tombstone => summary.tombstones += 1,
        }
        summary.with_key += u64::from(r.key.is_some());
        summary.with_headers += u64::from(r.headers.as_ref().is_some_and(|h| !h.is_empty()));
        summary.produced += 1;
        let e = summary.partitions.entry(partition).or_insert((r.offset, r.offset, 0));
        e.1 = r.offset;
        e.2 += 1;
        let Some((producer, to)) = self.producer else { return Ok(()) };
        let headers = r.headers.as_ref().map(|hs| {
            hs.iter().fold(OwnedHeaders::new_with_capacity(hs.len()), |h, (name, value)| {
                h.insert(Header { key: name, value: value.as_deref() })
            })
        });
        let mut record = FutureRecord::<[u8], [u8]>::to(to).partition(partition);
        if let Some(v) = &r.value {
            record = record.payload(v);
        }
        if let Some(k) = &r.key {
            record = record.key(k.as_slice());
        }
        if let Some(ts) = r.timestamp_ms {
            record = record.timestamp(ts);
        }
        if let Some(h) = headers {
            record = record.headers(h);
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
                    if let Some((offset, d)) = self.pending.pop_front() {
                        delivered(partition, offset, d).await?;
                    } else {
                        producer.poll(Duration::from_millis(100));
                    }
                }
                Err((error, _)) => return Err(RestoreError::Delivery { partition, offset: r.offset, error }),
            }
        };
        self.pending.push_back((r.offset, delivery));
        while self.pending.len() > 10_000 {
            let (offset, d) = self.pending.pop_front().expect("not empty");
            delivered(partition, offset, d).await?;
        }
        Ok(())
    }

    /// Waits until Kafka took every record sent.
    async fn flush(&mut self) -> Result<(), RestoreError> {
        while let Some((offset, d)) = self.pending.pop_front() {
            delivered(self.partition, offset, d).await?;
        }
        Ok(())
    }
}

/// Restores offsets of the per-offset (Kafka Connect) layout, reading objects in parallel.
async fn restore_slots(
    store: &dyn ObjectStore,
    slots: &BTreeMap<i64, OffsetObjects>,
    options: &RestoreOptions,
    layout: &archive::Layout,
    out: &mut Output<'_>,
    summary: &mut RestoreSummary,
    progress: &Progress,
) -> Result<(), RestoreError> {
    let rebuilt = futures::stream::iter(slots.iter())
        .map(|(&offset, slot)| rebuild(store, offset, slot, &layout.separator, options.dead_letters))
        .buffered(options.selection.parallel);
    tokio::pin!(rebuilt);
    let mut offsets = slots.iter();
    while let Some(r) = rebuilt.next().await {
        progress.inc(1);
        let (_, slot) = offsets.next().expect("one result per slot");
        match r? {
            Ok(Some(r)) => {
                let from = slot.payload.first().or(slot.dead_letter.first()).map_or("", |l| l.key.as_str());
                out.send(r, from, summary).await?;
            }
            Ok(None) => summary.dead_letters_skipped += 1,
            Err(problem) => {
                summary.skipped += 1;
                summary.problems.push(format!("partition {}: {problem}", out.partition));
            }
        }
    }
    Ok(())
}

/// Restores the rows of one Parquet object that are in the selection.
async fn restore_object(
    store: &dyn ObjectStore,
    object: &archive::Listed,
    options: &RestoreOptions,
    out: &mut Output<'_>,
    summary: &mut RestoreSummary,
) -> Result<(), RestoreError> {
    let (body, _) = get(store, &object.key).await?;
    let rows = match archive::parquet::rows(body) {
        Ok(rows) => rows,
        Err(e) => {
            // How many records it held is in the footer it lacks: counted as an object.
            summary.unreadable_objects += 1;
            let problem = format!("{} is not a readable Parquet object ({e}): none of its records", object.key);
            summary.problems.push(format!("partition {}: {problem}", out.partition));
            return Ok(());
        }
    };
    let count = rows.count;
    for (read, row) in rows.enumerate() {
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                // The footer gives the rows left, this one included (the selection is not known
                // for rows that cannot be read: all of them count).
                let left = count.saturating_sub(read as u64).max(1);
                summary.skipped += left;
                let problem =
                    format!("{}: row {read} cannot be read ({e}): it and the {} after it", object.key, left - 1);
                summary.problems.push(format!("partition {}: {problem}", out.partition));
                return Ok(());
            }
        };
        if !options.selection.keeps_offset(row.offset) {
            continue;
        }
        out.send(rebuild_row(row), &object.key, summary).await?;
    }
    Ok(())
}

/// A row as the record it was: a SINETStream message is encoded again (v3, the exact tstamp),
/// anything else goes back as it was kept.
fn rebuild_row(row: Row) -> Rebuilt {
    let (value, how) = match (row.payload, row.tstamp_us) {
        (None, _) => (None, How::Tombstone),
        (Some(msg), Some(us)) if row.undecodable.is_none() => {
            (Some(sinetstream::encode(us, &msg, Format::V3)), How::Exact)
        }
        (Some(raw), _) => (Some(raw.to_vec()), How::Raw),
    };
    Rebuilt {
        offset: row.offset,
        value,
        key: row.key.map(|k| k.to_vec()),
        headers: row.headers,
        // A record that had no Kafka timestamp gets the tstamp's millisecond, as from the
        // per-offset layout, rather than the time of the restore.
        timestamp_ms: row.kafka_timestamp_ms.or(row.tstamp_us.map(crate::archive::micros_to_millis)),
        how,
    }
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
            return Ok(Ok(Some(Rebuilt {
                offset,
                value: Some(msg.to_vec()),
                key,
                headers: kafka_headers(&attrs),
                timestamp_ms: kafka_ts,
                how: How::Raw,
            })));
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
        let headers = kafka_headers(&attrs);
        return Ok(Ok(Some(Rebuilt { offset, value: Some(value), key, headers, timestamp_ms, how })));
    }
    if let Some(dead) = slot.dead_letter.first() {
        if !dead_letters {
            return Ok(Ok(None));
        }
        let (body, attrs) = get(store, &dead.key).await?;
        let (key, timestamp_ms) = kafka_key_and_time(&attrs);
        let (value, headers) = (Some(body.to_vec()), kafka_headers(&attrs));
        return Ok(Ok(Some(Rebuilt { offset, value, key, headers, timestamp_ms, how: How::DeadLetter })));
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

/// The record headers an object's metadata kept, where it has them (written since they are kept).
fn kafka_headers(attributes: &Attributes) -> Option<crate::record::Headers> {
    meta(attributes, archive::META_KAFKA_HEADERS).and_then(|text| archive::headers_from_text(&text))
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
        "  {} SINETStream messages with the exact tstamp (microseconds, from the payload's metadata or the Parquet row)",
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
    let _ = writeln!(
        out,
        "  {} raw values (archived with UNDECODABLE=raw, or rows of the Parquet format that are not SINETStream messages)",
        s.raw
    );
    if s.tombstones > 0 {
        let _ = writeln!(out, "  {} tombstones (null values)", s.tombstones);
    }
    let _ = writeln!(out, "  {} dead letters as their raw values", s.dead_letters_produced);
    let _ = writeln!(out, "  {} with their Kafka key", s.with_key);
    if s.with_headers > 0 {
        let _ = writeln!(out, "  {} with their Kafka headers", s.with_headers);
    }
    if s.twice > 0 {
        let _ = writeln!(out, "left out: {} offsets archived twice, produced once (verify names the copies)", s.twice);
    }
    if s.dead_letters_skipped > 0 {
        let _ = writeln!(
            out,
            "left out: {} dead letters (--dead-letters produces their raw values)",
            s.dead_letters_skipped
        );
    }
    if s.skipped > 0 || s.unreadable_objects > 0 {
        let objects = match s.unreadable_objects {
            0 => String::new(),
            n => format!(" and the records of {n} unreadable objects"),
        };
        let _ = writeln!(out, "NOT RESTORED: {} offsets that cannot be rebuilt{objects}:", s.skipped);
        for p in s.problems.iter().take(20) {
            let _ = writeln!(out, "  {p}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use object_store::PutPayload;
    use object_store::memory::InMemory;

    use super::*;
    use crate::archive::Layout;
    use crate::record::{Record, RecordTime};

    /// A record of partition 1 at `offset` with `value`, an hour in Tokyo from 10:00 2022-04-18.
    fn row(offset: i64, value: Option<&[u8]>, sinetstream: bool) -> Row {
        let record = Record {
            topic: "t".into(),
            partition: 1,
            offset,
            time: RecordTime::Kafka(1_650_243_600_000 + offset),
            key: Some(Bytes::from(format!("k{offset}"))),
            value: value.map(Bytes::copy_from_slice),
            headers: None,
        };
        Row::of(&record, sinetstream)
    }

    async fn put(store: &InMemory, rows: &[Row]) {
        let key = archive::parquet::key(&Layout::default(), "t", 1, rows[0].offset, 1_650_243_600_000);
        let mut w = archive::parquet::Writer::new(3).unwrap();
        let body = [w.row_group(rows).unwrap(), w.finish().unwrap()].concat();
        store.put(&Path::from(key.as_str()), PutPayload::from(body)).await.unwrap();
    }

    /// A dry run of topic t's restore from `store`.
    async fn dry_run(store: Arc<InMemory>) -> RestoreSummary {
        let settings = Settings {
            kafka_topic: Some("t".into()),
            broker_hostname: Some("unused:9092".into()),
            ..Default::default()
        };
        let config = Config::from_settings(&settings, &[]).unwrap();
        let options = RestoreOptions {
            topic: "t".into(),
            to_topic: None,
            selection: Selection { parallel: 2, ..Selection::default() },
            dead_letters: false,
            dry_run: true,
        };
        replay(&config, store, &options, Progress::new("test")).await.unwrap()
    }

    #[tokio::test]
    async fn a_partition_archived_in_both_formats_by_turns_is_restored_in_offset_order() {
        let message = |o: i64| sinetstream::encode(1_650_243_600_000_000 + o, b"{}", Format::V3);
        let store = Arc::new(InMemory::new());
        // Parquet 0..=1, the per-offset layout 2..=3, Parquet 4..=5, the per-offset layout 6.
        put(&store, &[row(0, Some(&message(0)), true), row(1, Some(&message(1)), true)]).await;
        put(&store, &[row(4, Some(&message(4)), true), row(5, Some(&message(5)), true)]).await;
        for o in [2, 3, 6] {
            let record = Record {
                topic: "t".into(),
                partition: 1,
                offset: o,
                time: RecordTime::Kafka(1_650_243_600_000 + o),
                key: None,
                value: Some(Bytes::from(message(o))),
                headers: None,
            };
            let archive::Plan::Store { objects, .. } =
                archive::plan(&record, &Layout::default(), archive::UndecodablePolicy::DeadLetter)
            else {
                unreachable!()
            };
            for obj in objects {
                store.put(&Path::from(obj.key.as_str()), PutPayload::from(obj.body_bytes())).await.unwrap();
            }
        }
        let s = dry_run(store).await;
        assert_eq!((s.produced, s.twice, s.skipped), (7, 0, 0), "{s:?}");
        assert_eq!(s.partitions.get(&1), Some(&(0, 6, 7)));
    }

    #[tokio::test]
    async fn records_of_damaged_parquet_objects_are_counted_as_not_restored() {
        let message = |o: i64| sinetstream::encode(1_650_243_600_000_000 + o, b"{}", Format::V3);
        let rows: Vec<Row> = (0..10).map(|o| row(o, Some(&message(o)), true)).collect();
        let store = Arc::new(InMemory::new());
        // Offsets 0..=9 in two row groups (0..=1, 2..=9), the second one damaged: its 8 rows
        // cannot be read.
        let mut w = archive::parquet::Writer::new(3).unwrap();
        let (first, mut second) = (w.row_group(&rows[..2]).unwrap(), w.row_group(&rows[2..]).unwrap().to_vec());
        second.iter_mut().for_each(|b| *b = 0xff);
        let body = [first, second.into(), w.finish().unwrap()].concat();
        let key = archive::parquet::key(&Layout::default(), "t", 1, 0, 1_650_243_600_000);
        store.put(&Path::from(key.as_str()), PutPayload::from(body)).await.unwrap();
        // Offsets 20..=21 in an object cut short: no footer, its records unknown.
        let key = archive::parquet::key(&Layout::default(), "t", 1, 20, 1_650_243_600_000);
        let mut w = archive::parquet::Writer::new(3).unwrap();
        let whole = [w.row_group(&[row(20, Some(&message(20)), true)]).unwrap(), w.finish().unwrap()].concat();
        store.put(&Path::from(key.as_str()), PutPayload::from(whole[..whole.len() / 2].to_vec())).await.unwrap();
        let s = dry_run(store).await;
        assert_eq!((s.produced, s.skipped, s.unreadable_objects), (2, 8, 1), "{s:?}");
        assert!(
            s.problems.iter().any(|p| p.contains("row 2 cannot be read") && p.contains("the 7 after it")),
            "{:?}",
            s.problems
        );
        let text = render(
            &s,
            &RestoreOptions {
                topic: "t".into(),
                to_topic: None,
                selection: Selection::default(),
                dead_letters: false,
                dry_run: true,
            },
        );
        assert!(
            text.contains("NOT RESTORED: 8 offsets that cannot be rebuilt and the records of 1 unreadable objects"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn parquet_rows_rebuild_as_the_records_they_were_and_an_overlap_goes_once() {
        let message = sinetstream::encode(1_650_243_600_123_456, b"{\"v\":1}", Format::V2);
        let mut rows = [
            row(0, Some(&message), true),
            row(1, Some(b"not a message"), true),
            row(2, None, true),
            row(3, Some(b"{\"plain\":true}"), false),
        ];
        rows[3].headers = Some(vec![("h".into(), Some(Bytes::from_static(b"v"))), ("h".into(), None)]);
        let store = Arc::new(InMemory::new());
        put(&store, &rows[..3]).await;
        put(&store, &rows[2..]).await; // offset 2 in both objects
        let s = dry_run(store).await;
        assert_eq!((s.produced, s.exact_tstamp, s.raw, s.tombstones, s.twice), (4, 1, 2, 1, 1), "{s:?}");
        assert_eq!((s.with_key, s.with_headers, s.skipped), (4, 1, 0));
        assert_eq!(s.partitions.get(&1), Some(&(0, 3, 4)));
        assert!(s.problems[0].contains("offset 2 is archived again"), "{:?}", s.problems);

        let back = rebuild_row(rows[0].clone());
        // The v2 message comes back as v3, with the same tstamp and msg.
        let decoded = sinetstream::decode(back.value.as_deref().unwrap()).unwrap();
        assert_eq!(decoded.tstamp_us, 1_650_243_600_123_456);
        assert_eq!(&back.value.as_ref().unwrap()[decoded.msg], b"{\"v\":1}");
        assert_eq!((back.key.as_deref(), back.timestamp_ms), (Some(&b"k0"[..]), Some(1_650_243_600_000)));
        assert_eq!(rebuild_row(rows[1].clone()).value.as_deref(), Some(&b"not a message"[..]));
        assert_eq!(rebuild_row(rows[3].clone()).headers, rows[3].headers);
        let untimed = Row { kafka_timestamp_ms: None, ..rows[0].clone() };
        assert_eq!(rebuild_row(untimed).timestamp_ms, Some(1_650_243_600_123), "the tstamp's millisecond");
    }

    #[test]
    fn timestamp_objects_parse_back_to_their_milliseconds() {
        for ms in [0, 1_650_250_000_123, 1_650_250_000_999, 253_402_300_799_999] {
            let text = crate::archive::timestamp_text(ms);
            assert_eq!(parse_timestamp_text(text.as_bytes()), Some(ms), "{text}");
        }
        assert_eq!(parse_timestamp_text(b"2022-04-18 02:46:40"), None);
    }
}
