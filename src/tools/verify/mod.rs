//! Verify: audits an archive against Kafka, and against itself where Kafka no longer has the
//! records.
//!
//! For each topic the bucket is listed one hour folder at a time, in parallel
//! ([`crate::archive::list_topic`]). Records still in Kafka are read with a plain assignment (no
//! group, nothing committed) and each is compared with what the archive contract gives for it:
//! the keys [`crate::archive::plan()`] names, their sizes, and unless `--sizes-only` their bodies
//! and the payload's metadata. Offsets Kafka no longer holds are checked for completeness only:
//! every payload has its timestamp object (every dead letter its reason) and no offset is
//! missing between the first and the last archived one. Either way an offset archived more than
//! once (under two hour folders, or under topics/ and errors/) is one problem naming each copy: the
//! archiver files a record without a Kafka timestamp under the hour it was consumed, so such a
//! record consumed twice (stored, then fetched again before its offset was committed) is written
//! twice. Anything else under the topic's folders is reported as unexpected.
//!
//! Parquet objects (the batched format) are read row by row, a partition's in offset order
//! (`batches.rs`): their rows stand where the per-offset layout has objects, and a topic may hold
//! both formats.

mod batches;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{Attribute, ObjectStore, ObjectStoreExt};
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::archive::{self, ArchiveError, Listed, OffsetObjects, Selection, TopicIndex};
use crate::archive::{Layout, Object, ObjectKind};
use crate::archive::{Plan, UndecodablePolicy, plan};
use crate::config::{ArchiveFormat, Config, Needs, Settings};
use crate::exit::Exit;
use crate::record::{Record, RecordTime};
use crate::tools::progress::Progress;
use crate::tools::selection::SelectionArgs;
use crate::tools::{KAFKA_SETTINGS, LAYOUT_SETTINGS, STORE_SETTINGS};
use crate::topics::TopicSelection;
use batches::Walk;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("Kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("the bucket has no archived topic (nothing under topics/ or errors/)")]
    NoTopics,
    #[error("KAFKA_TOPIC {0} matches no topic in {1}")]
    NoMatch(String, &'static str),
    #[error("topic {0} does not exist in Kafka (use --bucket-only to check the archive alone)")]
    NoSuchTopic(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("Kafka sent no record of {topic} for a minute, partitions {partitions} not read to their end")]
    Stalled { topic: String, partitions: String },
}

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Topics to check (KAFKA_TOPIC, its patterns resolved against Kafka's topics, or against the
    /// bucket's with `bucket_only`); None: every topic the bucket holds.
    pub topics: Option<TopicSelection>,
    /// Partition, offsets, and time range (records by Kafka timestamp, hour folders).
    pub selection: Selection,
    /// Do not read Kafka: completeness of the archive alone.
    pub bucket_only: bool,
    /// Compare sizes only, not bodies (no GET per object).
    pub sizes_only: bool,
    /// Problems printed in full (all are counted).
    pub show: usize,
}

/// One thing wrong with the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: ProblemKind,
    pub key: String,
    pub detail: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    Missing,
    Mismatched,
    Extra,
    Gap,
    /// One offset archived more than once: under two hour folders, or under topics/ and errors/.
    Twice,
}

impl ProblemKind {
    pub fn label(self) -> &'static str {
        match self {
            ProblemKind::Missing => "MISSING",
            ProblemKind::Mismatched => "MISMATCHED",
            ProblemKind::Extra => "EXTRA",
            ProblemKind::Gap => "GAP",
            ProblemKind::Twice => "TWICE",
        }
    }
}

/// Counts for one topic.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Offsets checked, against Kafka or for completeness.
    pub offsets: u64,
    /// Of those, checked against the record in Kafka.
    pub against_kafka: u64,
    /// Objects of the topic found in the bucket (in the selection), archive keys or not.
    pub objects_found: u64,
    /// Objects the records read from Kafka should have.
    pub objects_expected: u64,
    pub bodies_compared: u64,
    pub dead_lettered: u64,
    pub tombstones: u64,
    pub missing: u64,
    pub mismatched: u64,
    pub extra: u64,
    /// Offsets missing between archived ones where Kafka cannot tell (expired records).
    pub gap_offsets: u64,
    /// Offsets archived more than once (each counted once, whatever the number of copies).
    pub archived_twice: u64,
}

impl Counts {
    pub fn problems(&self) -> u64 {
        self.missing + self.mismatched + self.extra + self.gap_offsets + self.archived_twice
    }

    fn add(&mut self, o: &Counts) {
        self.offsets += o.offsets;
        self.against_kafka += o.against_kafka;
        self.objects_found += o.objects_found;
        self.objects_expected += o.objects_expected;
        self.bodies_compared += o.bodies_compared;
        self.dead_lettered += o.dead_lettered;
        self.tombstones += o.tombstones;
        self.missing += o.missing;
        self.mismatched += o.mismatched;
        self.extra += o.extra;
        self.gap_offsets += o.gap_offsets;
        self.archived_twice += o.archived_twice;
    }
}

/// The outcome for one topic.
#[derive(Debug, Default)]
pub struct TopicReport {
    pub topic: String,
    pub counts: Counts,
    /// Per partition: (first, last) offset read from Kafka, if any.
    pub kafka_ranges: BTreeMap<i32, (i64, i64)>,
    pub problems: Vec<Problem>,
}

impl TopicReport {
    fn problem(&mut self, kind: ProblemKind, key: impl Into<String>, detail: impl Into<String>) {
        match kind {
            ProblemKind::Missing => self.counts.missing += 1,
            ProblemKind::Mismatched => self.counts.mismatched += 1,
            ProblemKind::Extra => self.counts.extra += 1,
            ProblemKind::Twice => self.counts.archived_twice += 1,
            ProblemKind::Gap => {}
        }
        self.problems.push(Problem { kind, key: key.into(), detail: detail.into() });
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub settings: Settings,
    #[command(flatten)]
    pub selection: SelectionArgs,
    /// Every topic the bucket holds (instead of KAFKA_TOPIC).
    #[arg(long)]
    pub all_topics: bool,
    /// Check the bucket alone (completeness), without reading Kafka.
    #[arg(long)]
    pub bucket_only: bool,
    /// Compare object sizes only, not bodies (no read of each object; Parquet objects are read).
    #[arg(long)]
    pub sizes_only: bool,
    /// How many problems to print in full (all are counted).
    #[arg(long, default_value_t = 20)]
    pub show: usize,
}

impl Args {
    pub fn needs(&self) -> Needs {
        Needs { broker: !self.bucket_only, topic: !self.all_topics }
    }
}

/// The settings `verify` reads (the others are hidden from its help).
pub fn reads() -> Vec<&'static str> {
    [
        KAFKA_SETTINGS,
        STORE_SETTINGS,
        LAYOUT_SETTINGS,
        &["KAFKA_TOPIC_EXCLUDE", "ARCHIVE_FORMAT", "UNDECODABLE", "UPLOAD_THREADS", "LOG_FORMAT"],
    ]
    .concat()
}

/// `kafka-s3-archiver verify`: the report on stdout; exit status 0 only when clean.
pub fn run(args: Args, config: &Config) -> Exit {
    let selection = match args.selection.parse(config) {
        Ok(s) => s,
        Err(exit) => return exit,
    };
    let options = VerifyOptions {
        topics: (!args.all_topics).then(|| config.topics.clone()),
        selection,
        bucket_only: args.bucket_only,
        sizes_only: args.sizes_only,
        show: args.show,
    };
    match super::run_on_store(config, |store| audit(config, store, &options, Progress::new("verify"))) {
        Ok(reports) => {
            print!("{}", render(&reports, &options));
            if totals(&reports).problems() == 0 { Exit::Done } else { Exit::Failed }
        }
        Err(exit) => exit,
    }
}

/// Verifies the archive of each topic; the reports come in topic order.
pub async fn audit(
    config: &Config,
    store: Arc<dyn ObjectStore>,
    options: &VerifyOptions,
    progress: Arc<Progress>,
) -> Result<Vec<TopicReport>, VerifyError> {
    let topics = match &options.topics {
        None => {
            let t = archive::topics(store.as_ref()).await?;
            if t.is_empty() {
                return Err(VerifyError::NoTopics);
            }
            t
        }
        Some(selection) if !selection.has_patterns() => selection.names(),
        Some(selection) if options.bucket_only => {
            let t = selection.resolve(archive::topics(store.as_ref()).await?.iter().map(String::as_str));
            if t.is_empty() {
                return Err(VerifyError::NoMatch(selection.to_string(), "the bucket"));
            }
            t
        }
        Some(selection) => {
            let t = kafka_topics(config, selection).await?;
            if t.is_empty() {
                return Err(VerifyError::NoMatch(selection.to_string(), "Kafka"));
            }
            t
        }
    };
    let mut reports = Vec::new();
    for topic in topics {
        reports.push(verify_topic(config, store.clone(), options, &topic, progress.clone()).await?);
    }
    progress.finish();
    Ok(reports)
}

/// The topics of Kafka that `selection` takes (its patterns resolved as the daemon does).
async fn kafka_topics(config: &Config, selection: &TopicSelection) -> Result<Vec<String>, VerifyError> {
    let c = crate::kafka::lookup_config(&crate::kafka::client_config(config)?);
    let selection = selection.clone();
    let lookup = move || -> Result<Vec<String>, VerifyError> {
        let consumer: BaseConsumer = c.create()?;
        Ok(crate::kafka::selected_topics(&consumer, &selection, Duration::from_secs(10))?)
    };
    tokio::task::spawn_blocking(lookup).await.unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

/// The sum of the reports' counts.
pub fn totals(reports: &[TopicReport]) -> Counts {
    let mut c = Counts::default();
    for r in reports {
        c.add(&r.counts);
    }
    c
}

async fn verify_topic(
    config: &Config,
    store: Arc<dyn ObjectStore>,
    options: &VerifyOptions,
    topic: &str,
    progress: Arc<Progress>,
) -> Result<TopicReport, VerifyError> {
    let layout = &config.layout;
    progress.start_listing(topic);
    let (p, t) = (progress.clone(), topic.to_string());
    let on_list: archive::ListProgress = Arc::new(move |state| p.listing(&t, state));
    let listed = archive::list_topic(
        store.as_ref(),
        topic,
        options.selection.range,
        layout,
        options.selection.parallel,
        Some(on_list),
    )
    .await?;
    let mut index = TopicIndex::build(topic, listed);
    let mut report = TopicReport { topic: topic.to_string(), ..TopicReport::default() };
    report.counts.objects_found = index.unexpected.len() as u64;
    for l in std::mem::take(&mut index.unexpected) {
        // errors/T/year=/month=/day=/hour=/key: a conflict copy; anything else is not the archiver's.
        let in_errors_hour = l.key.starts_with("errors/") && l.key.matches('/').count() >= 6;
        let why = if l.key.ends_with("-conflict.txt") || in_errors_hour {
            "a write-once conflict copy (see its -conflict.txt): the key under topics/ holds other bytes than the record"
        } else {
            "not an archive key of this topic (another extension, an unpadded offset, or not written by an archiver)"
        };
        report.problem(ProblemKind::Extra, l.key, why);
    }
    options.selection.apply(&mut index);
    report.counts.objects_found +=
        index.partitions.values().flat_map(|slots| slots.values()).map(|slot| slot.all().count() as u64).sum::<u64>();
    report.counts.objects_found += index.batches.values().map(|objects| objects.len() as u64).sum::<u64>();
    let mut walks: BTreeMap<i32, Walk> = std::mem::take(&mut index.batches)
        .into_iter()
        .map(|(p, objects)| (p, Walk::new(p, objects, &options.selection, store.clone(), layout.clone())))
        .collect();
    if !options.bucket_only {
        check_against_kafka(
            config,
            store.clone(),
            options,
            topic,
            &mut index,
            &mut walks,
            &mut report,
            progress.clone(),
        )
        .await?;
    }
    // What Kafka did not account for: completeness of the archive alone.
    for (partition, walk) in walks {
        let kafka = report.kafka_ranges.get(&partition).copied();
        walk.finish(kafka, &mut report).await;
    }
    for (&partition, slots) in &index.partitions {
        let kafka = report.kafka_ranges.get(&partition).copied();
        check_alone(partition, slots, kafka, layout, &mut report);
    }
    report.problems.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
    Ok(report)
}

/// Reads the topic's records from Kafka and compares each with its objects. Slots it accounts
/// for are removed from `index`; rows are taken from the partitions' `walks` (those of the
/// partitions read are finished here, so that memory holds a few partitions' objects at a time).
#[allow(clippy::too_many_arguments)]
async fn check_against_kafka(
    config: &Config,
    store: Arc<dyn ObjectStore>,
    options: &VerifyOptions,
    topic: &str,
    index: &mut TopicIndex,
    walks: &mut BTreeMap<i32, Walk>,
    report: &mut TopicReport,
    progress: Arc<Progress>,
) -> Result<(), VerifyError> {
    // Partitions with Parquet objects are read from Kafka a few at a time; the others at once.
    let with_objects: Vec<i32> = walks.keys().copied().collect();
    let mut groups: Vec<Box<dyn Fn(i32) -> bool + Send>> = Vec::new();
    for chunk in with_objects.chunks(PARQUET_PARTITIONS_AT_ONCE) {
        let chunk = chunk.to_vec();
        groups.push(Box::new(move |p| chunk.contains(&p)));
    }
    groups.push(Box::new(move |p| !with_objects.contains(&p)));
    for group in groups {
        let reader = KafkaReader::new(config, topic, options, group)?;
        let partitions: Vec<i32> = reader.ranges.keys().copied().collect();
        check_partitions(config, store.clone(), reader, options, topic, index, walks, report, &progress).await?;
        for p in partitions {
            if let Some(walk) = walks.remove(&p) {
                let kafka = report.kafka_ranges.get(&p).copied();
                walk.finish(kafka, report).await;
            }
        }
    }
    Ok(())
}

/// How many partitions with Parquet objects are compared at once: each holds two objects.
const PARQUET_PARTITIONS_AT_ONCE: usize = 4;

#[allow(clippy::too_many_arguments)]
async fn check_partitions(
    config: &Config,
    store: Arc<dyn ObjectStore>,
    reader: KafkaReader,
    options: &VerifyOptions,
    topic: &str,
    index: &mut TopicIndex,
    walks: &mut BTreeMap<i32, Walk>,
    report: &mut TopicReport,
    progress: &Progress,
) -> Result<(), VerifyError> {
    let total = reader.total();
    if total == 0 {
        return Ok(());
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<KafkaRecord>, VerifyError>>(4);
    progress.set_stage(&format!("checking {topic} against Kafka"), total);
    let reading = tokio::task::spawn_blocking(move || reader.read(tx));
    let policy = config.undecodable;
    let parquet_archive = matches!(config.format, ArchiveFormat::Parquet(_));
    while let Some(batch) = rx.recv().await {
        let batch = batch?;
        let mut fetches = Vec::new();
        for r in &batch {
            let range = report.kafka_ranges.entry(r.partition).or_insert((r.offset, r.offset));
            range.0 = range.0.min(r.offset);
            range.1 = range.1.max(r.offset);
            let kafka_first = range.0;
            let slot = index.partitions.get_mut(&r.partition).and_then(|s| s.remove(&r.offset)).unwrap_or_default();
            if parquet_archive && slot.all().next().is_none() {
                // A partition with no object yet is still one of this format.
                walks.entry(r.partition).or_insert_with(|| {
                    Walk::new(r.partition, Vec::new(), &options.selection, store.clone(), config.layout.clone())
                });
            }
            let row = match walks.get_mut(&r.partition) {
                Some(walk) => walk.take_at(r.offset, kafka_first, report).await,
                None => None,
            };
            if r.timestamp_ms.is_some_and(|ts| !options.selection.range.contains(ts)) {
                // Outside the time range: its objects are not this run's business (nor is it part
                // of a run of missing records).
                if let Some(walk) = walks.get_mut(&r.partition) {
                    walk.flush_missing(report);
                }
                continue;
            }
            report.counts.offsets += 1;
            report.counts.against_kafka += 1;
            let walk = walks.get_mut(&r.partition);
            let Some(row) = row else {
                match walk {
                    Some(walk) if slot.all().next().is_none() => walk.missing(r, &config.layout, report),
                    _ => {
                        // In the other format: a run of records missing from Parquet objects ends.
                        if let Some(walk) = walk {
                            walk.flush_missing(report);
                        }
                        compare_record(r, &slot, &config.layout, policy, options.sizes_only, report, &mut fetches)
                    }
                }
                continue;
            };
            if let Some(walk) = walk {
                walk.flush_missing(report);
            }
            batches::compare_row(r, &row, report);
            if let Some(other) = slot.all().next() {
                let detail = format!("offset {} is archived twice: in {} and {}", r.offset, row.key, other.key);
                report.problem(ProblemKind::Twice, row.key.as_ref(), detail);
            }
        }
        let n = batch.len() as u64;
        compare_bodies(store.as_ref(), fetches, options.selection.parallel, report).await;
        progress.inc(n);
    }
    reading.await.expect("the Kafka reader does not panic")?;
    Ok(())
}

/// A record as read from Kafka.
#[derive(Debug)]
struct KafkaRecord {
    topic: String,
    partition: i32,
    offset: i64,
    timestamp_ms: Option<i64>,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: crate::record::Headers,
}

/// A body and its attributes (user metadata) as read.
type Fetched = (Bytes, object_store::Attributes);

/// An object whose body (and metadata) must be read to be compared.
struct Fetch {
    key: String,
    expected: Object,
}

fn compare_record(
    r: &KafkaRecord,
    slot: &OffsetObjects,
    layout: &Layout,
    policy: UndecodablePolicy,
    sizes_only: bool,
    report: &mut TopicReport,
    fetches: &mut Vec<Fetch>,
) {
    let Some(value) = &r.value else {
        report.counts.tombstones += 1;
        for l in slot.all() {
            report.problem(
                ProblemKind::Extra,
                &l.key,
                format!("offset {} is a tombstone in Kafka: nothing is archived for it", r.offset),
            );
        }
        return;
    };
    let decodable = crate::archive::sinetstream::decode(value).is_ok();
    // An undecodable record may have been archived under either policy: take the form found.
    let policy = if decodable {
        policy
    } else if !slot.payload.is_empty() {
        UndecodablePolicy::Raw
    } else {
        UndecodablePolicy::DeadLetter
    };
    if !decodable && policy == UndecodablePolicy::DeadLetter {
        report.counts.dead_lettered += 1;
    }
    let objects_at = |time: RecordTime| {
        let record = Record {
            topic: r.topic.clone(),
            partition: r.partition,
            offset: r.offset,
            time,
            key: r.key.clone(),
            value: Some(value.clone()),
            headers: Some(r.headers.clone()),
        };
        match plan(&record, layout, policy) {
            Plan::Store { objects, .. } => objects,
            Plan::Stop(_) => unreachable!("the policy is never Stop here"),
        }
    };
    let copies = slot.copies(layout);
    // The objects the record gives, as many times as it is to be found. A record with a Kafka
    // timestamp is filed under that hour. One without was filed under the hour it was consumed,
    // which Kafka does not tell: each copy found is compared as written at its hour, and with
    // none found the objects at any hour stand for what is missing.
    let expected: Vec<Vec<Object>> = match r.timestamp_ms {
        Some(ms) => vec![objects_at(RecordTime::Kafka(ms))],
        None => {
            let mut at_hours = Vec::new();
            for found in copies.values() {
                let Some(ms) = found[0].parsed.as_ref().and_then(|k| archive::hour_start_ms(&k.hour, layout)) else {
                    continue;
                };
                let objects = objects_at(RecordTime::Consumed(ms));
                // A copy under the other root (or with its offset spelled otherwise) is not this
                // policy's form of the record: it is reported as a second copy below.
                if objects.iter().any(|o| found.iter().any(|l| l.key == o.key)) {
                    at_hours.push(objects);
                }
            }
            if at_hours.is_empty() {
                at_hours.push(objects_at(RecordTime::Consumed(0)));
            }
            at_hours
        }
    };
    let expected_keys: Vec<&str> = expected.iter().flatten().map(|o| o.key.as_str()).collect();
    let unexpected: Vec<&Listed> = slot.all().filter(|l| !expected_keys.contains(&l.key.as_str())).collect();
    for object in expected.into_iter().flatten() {
        report.counts.objects_expected += 1;
        match slot.all().find(|l| l.key == object.key) {
            Some(l) => check_size_and_queue(l, object, sizes_only, report, fetches),
            None => {
                let instead = unexpected.iter().find(|l| l.parsed.as_ref().is_some_and(|k| k.kind == object.kind));
                let detail = match instead {
                    Some(other) => format!("offset {} is in Kafka; found instead at {}", r.offset, other.key),
                    None => format!("offset {} is in Kafka", r.offset),
                };
                report.problem(ProblemKind::Missing, object.key, detail);
            }
        }
    }
    let known = match r.timestamp_ms {
        Some(ms) => Known::FiledUnder(layout.hour_path(ms)),
        None => Known::NoTimestamp,
    };
    // Objects of a second copy are named by its problem; alone, a stray object is extra.
    if !archived_twice(r.offset, &copies, known, report) {
        for l in unexpected {
            report.problem(ProblemKind::Extra, &l.key, format!("offset {} does not archive to this key", r.offset));
        }
    }
}

/// What Kafka tells of a record whose offset is archived more than once.
enum Known {
    /// Nothing: the record was not read (`--bucket-only`, or Kafka no longer has it).
    Nothing,
    /// It has no Kafka timestamp.
    NoTimestamp,
    /// Its Kafka timestamp files it under this hour folder.
    FiledUnder(String),
}

/// Reports an offset archived more than once (its objects under more than one stem, see
/// [`OffsetObjects::copies`]) as one problem naming each copy by its payload or dead letter, and
/// why it can happen. Returns whether it did.
fn archived_twice(offset: i64, copies: &BTreeMap<&str, Vec<&Listed>>, known: Known, report: &mut TopicReport) -> bool {
    if copies.len() < 2 {
        return false;
    }
    let main =
        |l: &Listed| l.parsed.as_ref().is_some_and(|k| matches!(k.kind, ObjectKind::Payload | ObjectKind::DeadLetter));
    let keys: Vec<&str> =
        copies.values().map(|objects| objects.iter().find(|l| main(l)).unwrap_or(&objects[0]).key.as_str()).collect();
    let hours: BTreeSet<&str> =
        copies.values().flatten().filter_map(|l| l.parsed.as_ref().map(|k| k.hour.as_str())).collect();
    let roots: BTreeSet<&str> = copies.keys().filter_map(|stem| stem.split('/').next()).collect();
    let mut why = Vec::new();
    if hours.len() > 1 {
        why.push(match known {
            Known::Nothing => "the archiver files a record under two hours only if it has no Kafka timestamp (it is \
                filed under the hour it was consumed) and was consumed twice: stored, then fetched again before its \
                offset was committed (otherwise the topic was deleted and created again, or PARTITION_TIMEZONE changed)"
                .to_string(),
            Known::NoTimestamp => "the record has no Kafka timestamp, so it is filed under the hour it was consumed, \
                and it was consumed twice: stored, then fetched again before its offset was committed"
                .to_string(),
            Known::FiledUnder(hour) => format!(
                "the record's Kafka timestamp files it under {hour} only: a copy under another hour is of an \
                 earlier record at this offset (the topic deleted and created again) or written with another \
                 PARTITION_TIMEZONE"
            ),
        });
    }
    if roots.len() > 1 {
        why.push(
            "under both topics/ and errors/: it was consumed twice with UNDECODABLE changed in between".to_string(),
        );
    }
    if why.is_empty() {
        why.push(
            "the partition or offset spelled with other digits in one key: not written by an archiver".to_string(),
        );
    }
    let (last, rest) = keys.split_last().expect("two copies or more");
    let times = if keys.len() == 2 { "twice".to_string() } else { format!("{} times", keys.len()) };
    let detail = format!("offset {offset} is archived {times}: {} and {last}; {}", rest.join(", "), why.join("; "));
    report.problem(ProblemKind::Twice, keys[0], detail);
    true
}

fn check_size_and_queue(
    l: &Listed,
    expected: Object,
    sizes_only: bool,
    report: &mut TopicReport,
    fetches: &mut Vec<Fetch>,
) {
    let want = expected.len() as u64;
    if l.size != want {
        report.problem(ProblemKind::Mismatched, &l.key, format!("{} bytes, the record gives {want}", l.size));
    } else if !sizes_only {
        fetches.push(Fetch { key: l.key.clone(), expected });
    }
}

async fn compare_bodies(store: &dyn ObjectStore, fetches: Vec<Fetch>, parallel: usize, report: &mut TopicReport) {
    let results: Vec<(Fetch, object_store::Result<Fetched>)> = futures::stream::iter(fetches)
        .map(|f| async move {
            let got = async {
                let r = store.get(&Path::from(f.key.as_str())).await?;
                let attributes = r.attributes.clone();
                Ok((r.bytes().await?, attributes))
            }
            .await;
            (f, got)
        })
        .buffer_unordered(parallel)
        .collect()
        .await;
    for (f, got) in results {
        match got {
            Err(object_store::Error::NotFound { .. }) => {
                report.problem(ProblemKind::Missing, f.key, "listed, then gone when read");
            }
            Err(e) => report.problem(ProblemKind::Mismatched, f.key, format!("cannot be read: {e}")),
            Ok((body, attributes)) => {
                report.counts.bodies_compared += 1;
                let want = f.expected.body_bytes();
                if body.as_ref() != want.as_slice() {
                    let at = body.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(body.len().min(want.len()));
                    report.problem(
                        ProblemKind::Mismatched,
                        f.key,
                        format!("body differs from the record's from byte {at}"),
                    );
                    continue;
                }
                // Metadata: checked where the object has it (archives of the old deployment have none).
                for (name, value) in &f.expected.metadata {
                    if let Some(stored) = attributes.get(&Attribute::Metadata((*name).into()))
                        && stored.as_ref() != value
                    {
                        report.problem(
                            ProblemKind::Mismatched,
                            f.key.clone(),
                            format!("metadata {name} is {:?}, the record gives {value:?}", stored.as_ref()),
                        );
                    }
                }
            }
        }
    }
}

/// Completeness of one partition's objects that Kafka did not account for: offsets below what
/// Kafka still holds (expired), or all of them with `--bucket-only`.
fn check_alone(
    partition: i32,
    slots: &BTreeMap<i64, OffsetObjects>,
    kafka: Option<(i64, i64)>,
    layout: &Layout,
    report: &mut TopicReport,
) {
    let mut previous: Option<i64> = None;
    for (&offset, slot) in slots {
        if let Some((_, last)) = kafka
            && offset > last
        {
            for l in slot.all() {
                report.problem(
                    ProblemKind::Extra,
                    &l.key,
                    format!("offset {offset} is past the last offset Kafka has for partition {partition} ({last})"),
                );
            }
            continue;
        }
        report.counts.offsets += 1;
        // Within what Kafka still has, Kafka accounted for every offset between these.
        let expired = kafka.is_none_or(|(first, _)| offset < first);
        if expired
            && let Some(p) = previous
            && offset > p + 1
        {
            let n = (offset - p - 1) as u64;
            report.counts.gap_offsets += n;
            let first = slot.all().next().map(|l| l.key.clone()).unwrap_or_default();
            report.problems.push(Problem {
                kind: ProblemKind::Gap,
                key: first,
                detail: format!(
                    "partition {partition}: offsets {}..={} have no objects and Kafka no longer has them \
                     (a tombstone, compaction or a transaction marker also leaves no object)",
                    p + 1,
                    offset - 1
                ),
            });
        }
        if expired {
            previous = Some(offset);
        }
        if !slot.dead_letter.is_empty() || !slot.reason.is_empty() {
            report.counts.dead_lettered += 1;
        }
        let pairs = [
            (&slot.payload, &slot.timestamp, "-timestamp.txt", layout.extension.as_str()),
            (&slot.dead_letter, &slot.reason, "-reason.txt", ".raw"),
        ];
        for (main, companion, companion_suffix, main_suffix) in pairs {
            unpaired(main, main_suffix, companion, companion_suffix, report);
            unpaired(companion, companion_suffix, main, main_suffix, report);
        }
        archived_twice(offset, &slot.copies(layout), Known::Nothing, report);
    }
    if let Some((kafka_first, _)) = kafka
        && let Some(first) = slots.range(..kafka_first).next_back().map(|(o, _)| o)
        && *first < kafka_first - 1
    {
        // The archive stops short of where Kafka's records begin.
        let n = (kafka_first - 1 - first) as u64;
        report.counts.gap_offsets += n;
        report.problems.push(Problem {
            kind: ProblemKind::Gap,
            key: String::new(),
            detail: format!(
                "partition {partition}: offsets {}..={} are neither archived nor in Kafka any more",
                first + 1,
                kafka_first - 1
            ),
        });
    }
}

/// Each object of `these` (keys ending in `suffix`) whose companion in `others` (same stem, ending
/// in `other_suffix`) is absent: the companion is missing.
fn unpaired(these: &[Listed], suffix: &str, others: &[Listed], other_suffix: &str, report: &mut TopicReport) {
    for l in these {
        let stem = l.key.strip_suffix(suffix).unwrap_or(&l.key);
        if !others.iter().any(|o| o.key.strip_suffix(other_suffix) == Some(stem)) {
            report.problem(
                ProblemKind::Missing,
                format!("{stem}{other_suffix}"),
                format!("{} has no companion", l.key),
            );
        }
    }
}

/// Reads a topic's records with a plain assignment, from each partition's first offset in range
/// to its end as it was when the reading started.
struct KafkaReader {
    consumer: BaseConsumer,
    topic: String,
    /// partition -> (start, end exclusive)
    ranges: HashMap<i32, (i64, i64)>,
    to_offset: Option<i64>,
}

impl KafkaReader {
    /// A reader of the topic's partitions that `read_partition` takes.
    fn new(
        config: &Config,
        topic: &str,
        options: &VerifyOptions,
        read_partition: impl Fn(i32) -> bool,
    ) -> Result<KafkaReader, VerifyError> {
        let mut c = crate::kafka::client_config(config)?;
        // Its own group id, never committed to: the archiver's offsets are not touched.
        c.set("group.id", "kafka-s3-archiver-verify")
            .set("enable.auto.commit", "false")
            .set("statistics.interval.ms", "0");
        let consumer: BaseConsumer = c.create()?;
        let timeout = Duration::from_secs(10);
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == topic && t.error().is_none())
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        if partitions.is_empty() {
            return Err(VerifyError::NoSuchTopic(topic.to_string()));
        }
        let partitions =
            partitions.into_iter().filter(|&p| options.selection.partition.is_none_or(|q| q == p) && read_partition(p));
        let mut ranges = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
            let mut start = low.max(options.selection.from_offset.unwrap_or(0));
            if let Some(since) = options.selection.range.since_ms {
                // The first offset at or after an hour before `since` (timestamps need not be
                // in offset order; an hour covers a producer's clock or batching skew).
                let mut q = TopicPartitionList::new();
                q.add_partition_offset(topic, p, Offset::Offset(since - 3_600_000))?;
                if let Some(Offset::Offset(o)) =
                    consumer.offsets_for_times(q, timeout)?.find_partition(topic, p).map(|e| e.offset())
                {
                    start = start.max(o);
                }
            }
            let end = options.selection.to_offset.map_or(high, |t| high.min(t + 1));
            if start < end {
                ranges.insert(p, (start, end));
                tpl.add_partition_offset(topic, p, Offset::Offset(start))?;
            }
        }
        consumer.assign(&tpl)?;
        Ok(KafkaReader { consumer, topic: topic.to_string(), ranges, to_offset: options.selection.to_offset })
    }

    fn total(&self) -> u64 {
        self.ranges.values().map(|(s, e)| (e - s) as u64).sum()
    }

    /// Sends batches of records until every partition reached its end. Some brokers report an
    /// end below the last record of a batch: records past it that arrive are kept, and reading
    /// stops once every partition reached its end and a second passed without a record.
    fn read(self, tx: tokio::sync::mpsc::Sender<Result<Vec<KafkaRecord>, VerifyError>>) -> Result<(), VerifyError> {
        let mut open: HashMap<i32, i64> = self.ranges.iter().map(|(&p, &(_, e))| (p, e)).collect();
        let mut batch = Vec::new();
        let mut last_record = Instant::now();
        loop {
            let quiet = last_record.elapsed();
            if open.is_empty() && quiet > Duration::from_secs(1) {
                break;
            }
            if quiet > STALL {
                let left: Vec<String> = open.keys().map(|p| p.to_string()).collect();
                let _ = tx
                    .blocking_send(Err(VerifyError::Stalled { topic: self.topic.clone(), partitions: left.join(",") }));
                return Ok(());
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                None => {
                    if !batch.is_empty() {
                        if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                            return Ok(());
                        }
                        // The wait for the comparison (a slow store) is not Kafka's silence.
                        last_record = Instant::now();
                    }
                    // A partition whose last offsets are never delivered (transaction markers)
                    // is done once the consumer's position passed its end.
                    if let Ok(positions) = self.consumer.position() {
                        for e in positions.elements() {
                            if let (Offset::Offset(pos), Some(&end)) = (e.offset(), open.get(&e.partition()))
                                && pos >= end
                            {
                                open.remove(&e.partition());
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    let _ = tx.blocking_send(Err(e.into()));
                    return Ok(());
                }
                Some(Ok(m)) => {
                    last_record = Instant::now();
                    let (p, o) = (m.partition(), m.offset());
                    if open.get(&p).is_some_and(|&end| o + 1 >= end) {
                        open.remove(&p);
                    }
                    if self.to_offset.is_some_and(|t| o > t) {
                        continue;
                    }
                    batch.push(KafkaRecord {
                        topic: self.topic.clone(),
                        partition: p,
                        offset: o,
                        timestamp_ms: m.timestamp().to_millis(),
                        key: m.key().map(Bytes::copy_from_slice),
                        value: m.payload().map(Bytes::copy_from_slice),
                        headers: crate::kafka::headers(&m),
                    });
                    if batch.len() >= 1000 {
                        if tx.blocking_send(Ok(std::mem::take(&mut batch))).is_err() {
                            return Ok(());
                        }
                        last_record = Instant::now();
                    }
                }
            }
        }
        if !batch.is_empty() {
            let _ = tx.blocking_send(Ok(batch));
        }
        Ok(())
    }
}

/// How long reading may go without a record before the partitions left count as unreadable.
const STALL: Duration = Duration::from_secs(60);

/// The report as the `verify` command prints it.
pub fn render(reports: &[TopicReport], options: &VerifyOptions) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for r in reports {
        let c = &r.counts;
        let _ = writeln!(out, "topic {}:", r.topic);
        for (p, (first, last)) in &r.kafka_ranges {
            let _ = writeln!(out, "  partition {p}: offsets {first}..={last} compared with Kafka");
        }
        let bodies = if options.sizes_only {
            "sizes only".to_string()
        } else {
            format!("{} bodies compared", c.bodies_compared)
        };
        // The per-offset layout's objects follow from the records; the Parquet format's do not.
        let expected = if c.objects_expected > 0 {
            format!(" ({} expected from Kafka's records)", c.objects_expected)
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  checked {} offsets ({} against Kafka, {} from the bucket alone), {} objects found{expected}, {bodies}; {} dead-lettered, {} tombstones",
            c.offsets,
            c.against_kafka,
            c.offsets - c.against_kafka,
            c.objects_found,
            c.dead_lettered,
            c.tombstones
        );
        let _ = writeln!(
            out,
            "  missing {}, mismatched {}, extra {}, offsets in gaps {}, archived twice {}",
            c.missing, c.mismatched, c.extra, c.gap_offsets, c.archived_twice
        );
        let shown = r.problems.iter().take(options.show);
        for p in shown {
            let _ = writeln!(out, "  {:<10} {}  {}", p.kind.label(), p.key, p.detail);
        }
        if r.problems.len() > options.show {
            let _ = writeln!(out, "  … and {} more (--show N prints more)", r.problems.len() - options.show);
        }
    }
    let t = totals(reports);
    if t.problems() == 0 {
        let _ = writeln!(out, "clean: {} offsets, {} objects", t.offsets, t.objects_found);
    } else {
        let _ = writeln!(
            out,
            "NOT CLEAN: missing {}, mismatched {}, extra {}, offsets in gaps {}, archived twice {}",
            t.missing, t.mismatched, t.extra, t.gap_offsets, t.archived_twice
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, PutPayload};

    pub(super) fn config() -> Config {
        let s = Settings {
            broker_hostname: Some("unused:9092".into()),
            kafka_topic: Some("t".into()),
            ..Default::default()
        };
        Config::from_settings(&s, &[]).unwrap()
    }

    pub(super) fn options() -> VerifyOptions {
        VerifyOptions {
            topics: Some(TopicSelection::parse("t", None).unwrap()),
            selection: Selection { parallel: 4, ..Selection::default() },
            bucket_only: true,
            sizes_only: false,
            show: 20,
        }
    }

    /// A SINETStream message of partition 0 at `offset`.
    fn record(offset: i64, time: RecordTime) -> Record {
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            time,
            key: None,
            value: Some(Bytes::from(crate::archive::sinetstream::encode(
                1_650_250_000_000_123,
                b"{}",
                crate::archive::sinetstream::Format::V3,
            ))),
            headers: None,
        }
    }

    /// Stores a record's objects as the uploader writes them; their keys.
    async fn put(store: &InMemory, record: &Record, policy: UndecodablePolicy) -> Vec<String> {
        let Plan::Store { objects, .. } = plan(record, &Layout::default(), policy) else { unreachable!() };
        let mut keys = Vec::new();
        for o in objects {
            store.put(&Path::from(o.key.as_str()), PutPayload::from(o.body_bytes())).await.unwrap();
            keys.push(o.key);
        }
        keys
    }

    /// The archive of offsets 0..n of partition 0, as the uploader writes it.
    async fn archive(store: &InMemory, offsets: impl Iterator<Item = i64>) -> Vec<String> {
        let mut keys = Vec::new();
        for offset in offsets {
            let r = record(offset, RecordTime::Kafka(1_650_250_000_000 + offset * 1000));
            keys.extend(put(store, &r, UndecodablePolicy::DeadLetter).await);
        }
        keys
    }

    /// Offset 2 without a Kafka timestamp, consumed twice two hours apart (stored, then fetched
    /// again before its offset was committed), between offsets 0..5 with one: the keys of its
    /// two payloads.
    async fn archive_with_a_record_consumed_twice(store: &InMemory) -> [String; 2] {
        archive(store, (0..2).chain(3..5)).await;
        let first =
            put(store, &record(2, RecordTime::Consumed(1_650_250_000_000)), UndecodablePolicy::DeadLetter).await;
        let again = RecordTime::Consumed(1_650_250_000_000 + 2 * 3_600_000);
        let second = put(store, &record(2, again), UndecodablePolicy::DeadLetter).await;
        assert_ne!(first[0], second[0], "two hour folders");
        [first[0].clone(), second[0].clone()]
    }

    fn twice(r: &TopicReport) -> Vec<&Problem> {
        r.problems.iter().filter(|p| p.kind == ProblemKind::Twice).collect()
    }

    async fn verify(store: Arc<InMemory>) -> TopicReport {
        let mut reports = audit(&config(), store, &options(), Progress::new("test")).await.unwrap();
        reports.remove(0)
    }

    #[tokio::test]
    async fn a_complete_archive_is_clean_from_the_bucket_alone() {
        let store = Arc::new(InMemory::new());
        archive(&store, 0..30).await;
        let r = verify(store).await;
        assert_eq!(r.counts.offsets, 30);
        assert_eq!(r.counts.objects_found, 60);
        assert_eq!(r.counts.problems(), 0, "{:?}", r.problems);
        assert_eq!(r.counts.archived_twice, 0);
    }

    #[tokio::test]
    async fn the_bucket_alone_shows_lost_companions_gaps_and_strangers() {
        let store = Arc::new(InMemory::new());
        let keys = archive(&store, (0..10).chain(15..20)).await;
        let lost = keys.iter().find(|k| k.contains("+0000000003-timestamp.txt")).unwrap().clone();
        store.delete(&Path::from(lost.as_str())).await.unwrap();
        let stranger = format!("{}/notes.txt", keys[0].rsplit_once('/').unwrap().0);
        store.put(&Path::from(stranger.as_str()), PutPayload::from_static(b"hi")).await.unwrap();
        let r = verify(store).await;
        let found: Vec<(ProblemKind, &str)> = r.problems.iter().map(|p| (p.kind, p.key.as_str())).collect();
        assert!(found.contains(&(ProblemKind::Missing, lost.as_str())), "{found:?}");
        assert!(found.contains(&(ProblemKind::Extra, stranger.as_str())), "{found:?}");
        assert_eq!(r.counts.gap_offsets, 5, "offsets 10..=14");
        assert!(r.problems.iter().any(|p| p.kind == ProblemKind::Gap && p.detail.contains("offsets 10..=14")));
        assert_eq!((r.counts.missing, r.counts.extra, r.counts.mismatched), (1, 1, 0));
    }

    #[tokio::test]
    async fn keys_above_the_hour_folders_are_reported_and_counted() {
        let store = Arc::new(InMemory::new());
        let keys = archive(&store, 0..3).await;
        let topic = keys[0].split('/').nth(1).unwrap().to_string();
        let strays = [
            format!("topics/{topic}/stray.txt"),
            format!("topics/{topic}/year=2022/notes.txt"),
            format!("topics/{topic}/junk/x.bin"),
            format!("errors/{topic}/month.txt"),
        ];
        for k in &strays {
            store.put(&Path::from(k.as_str()), PutPayload::from_static(b"?")).await.unwrap();
        }
        let r = verify(store).await;
        let extra: Vec<&str> =
            r.problems.iter().filter(|p| p.kind == ProblemKind::Extra).map(|p| p.key.as_str()).collect();
        for k in &strays {
            assert!(extra.contains(&k.as_str()), "{k} not reported: {:?}", r.problems);
        }
        assert_eq!(r.counts.extra, 4);
        assert_eq!(r.counts.objects_found, 6 + 4, "the archive's objects and the strays");
        let out = render(&[r], &options());
        assert!(out.contains("10 objects found"), "{out}");
    }

    #[tokio::test]
    async fn the_bucket_alone_shows_an_offset_archived_under_two_hour_folders() {
        let store = Arc::new(InMemory::new());
        let [first, second] = archive_with_a_record_consumed_twice(&store).await;
        let r = verify(store).await;
        let found = twice(&r);
        assert_eq!(found.len(), 1, "{:?}", r.problems);
        assert_eq!(found[0].key, first);
        assert!(found[0].detail.contains(&first) && found[0].detail.contains(&second), "{}", found[0].detail);
        assert!(found[0].detail.contains("only if it has no Kafka timestamp"), "{}", found[0].detail);
        assert!(found[0].detail.contains("fetched again before its offset was committed"), "{}", found[0].detail);
        assert_eq!(r.counts.archived_twice, 1);
        assert_eq!((r.counts.missing, r.counts.extra, r.counts.gap_offsets), (0, 0, 0), "{:?}", r.problems);
        assert_eq!((r.counts.offsets, r.counts.objects_found), (5, 12));
        let out = render(&[r], &options());
        assert!(
            out.contains(&format!("  TWICE      {first}  offset 2 is archived twice: {first} and {second}")),
            "{out}"
        );
        assert!(
            out.contains("NOT CLEAN: missing 0, mismatched 0, extra 0, offsets in gaps 0, archived twice 1"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn the_bucket_alone_shows_an_offset_archived_under_topics_and_errors() {
        let store = Arc::new(InMemory::new());
        archive(&store, (0..2).chain(3..5)).await;
        let mut r = record(2, RecordTime::Kafka(1_650_250_002_000));
        r.value = Some(Bytes::from_static(b"not a SINETStream message"));
        let raw = put(&store, &r, UndecodablePolicy::Raw).await;
        let dead = put(&store, &r, UndecodablePolicy::DeadLetter).await;
        let r = verify(store).await;
        let found = twice(&r);
        assert_eq!(found.len(), 1, "{:?}", r.problems);
        assert!(found[0].detail.contains(&raw[0]) && found[0].detail.contains(&dead[0]), "{}", found[0].detail);
        assert!(found[0].detail.contains("UNDECODABLE"), "{}", found[0].detail);
        assert_eq!(r.counts.problems(), 1, "{:?}", r.problems);
    }

    /// The objects of offset 2 as verify finds them in `store`.
    async fn slot_of_offset_2(store: &InMemory) -> OffsetObjects {
        let listed = archive::list_topic(store, "t", Default::default(), &Layout::default(), 4, None).await.unwrap();
        let mut index = TopicIndex::build("t", listed);
        index.partitions.get_mut(&0).and_then(|s| s.remove(&2)).unwrap()
    }

    /// Offset 2 as Kafka gives it: no timestamp.
    fn in_kafka() -> KafkaRecord {
        let r = record(2, RecordTime::Consumed(0));
        KafkaRecord {
            topic: r.topic,
            partition: 0,
            offset: 2,
            timestamp_ms: None,
            key: None,
            value: r.value,
            headers: Vec::new(),
        }
    }

    /// Offset 2 of the archive compared with the record Kafka has, bodies included.
    async fn compare_offset_2_with_kafka(store: &Arc<InMemory>) -> TopicReport {
        let slot = slot_of_offset_2(store).await;
        let mut report = TopicReport::default();
        let mut fetches = Vec::new();
        let layout = Layout::default();
        compare_record(&in_kafka(), &slot, &layout, UndecodablePolicy::DeadLetter, false, &mut report, &mut fetches);
        compare_bodies(store.as_ref(), fetches, 4, &mut report).await;
        report
    }

    #[tokio::test]
    async fn against_kafka_a_record_without_timestamp_archived_twice_is_one_problem_and_both_copies_are_compared() {
        let store = Arc::new(InMemory::new());
        let [first, second] = archive_with_a_record_consumed_twice(&store).await;
        let report = compare_offset_2_with_kafka(&store).await;
        let found = twice(&report);
        assert_eq!(found.len(), 1, "{:?}", report.problems);
        assert!(found[0].detail.contains(&first) && found[0].detail.contains(&second), "{}", found[0].detail);
        assert!(found[0].detail.contains("has no Kafka timestamp"), "{}", found[0].detail);
        assert_eq!(report.counts.problems(), 1, "{:?}", report.problems);
        assert_eq!(report.counts.bodies_compared, 4, "both copies match the record");
    }

    #[tokio::test]
    async fn against_kafka_a_record_without_timestamp_archived_once_is_clean() {
        let store = Arc::new(InMemory::new());
        put(&store, &record(2, RecordTime::Consumed(1_650_250_000_000)), UndecodablePolicy::DeadLetter).await;
        let report = compare_offset_2_with_kafka(&store).await;
        assert_eq!(report.counts.problems(), 0, "{:?}", report.problems);
        assert_eq!(report.counts.bodies_compared, 2);
    }
}
