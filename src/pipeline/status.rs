//! Status: what the pipeline reports about itself.
//!
//! The stages note here what the commit ledger and the spool do not know: the end offset of each
//! partition, the last error of each partition and of the store, whether consumption is paused,
//! and whether archiving stopped. [`Status::report`] joins these notes with the ledger and the
//! spool into the answer of `/status`; [`Status::set_gauges`] turns the same figures, computed the
//! same way, into the gauges of `/metrics`. It also keeps the last errors (a short list,
//! repeats folded) and what the archiver was started with, for the status page.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::config::{Config, SpoolLimits};
use crate::metrics as m;
use crate::pipeline::backpressure;
use crate::pipeline::commit::{PartitionView, Tp};
use crate::pipeline::spool::{DiskSpace, Spool};

/// The pause reason while archiving is paused on request.
const PAUSED_ON_REQUEST: &str =
    "paused on request (PUT /connectors/{name}/pause); PUT /connectors/{name}/resume resumes";

/// A store that answered within this long counts as reachable without a probe.
pub const STORE_FRESHNESS: Duration = Duration::from_secs(30);

/// How many distinct recent errors `/status` lists.
const RECENT_ERRORS: usize = 20;

/// An error and when it happened.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Note {
    pub message: String,
    /// RFC 3339, UTC.
    pub time: String,
}

impl Note {
    fn now(message: impl Into<String>) -> Note {
        Note { message: message.into(), time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true) }
    }
}

#[derive(Debug, Default)]
struct Notes {
    paused: Option<String>,
    failure: Option<Note>,
    store_ok_at: Option<Instant>,
    store_reachable: Option<bool>,
    store_error: Option<Note>,
    /// High watermark of each partition, as last seen by the consumer.
    ends: HashMap<Tp, i64>,
    /// Archiving paused through the REST API (`PUT /connectors/{name}/pause`).
    paused_on_request: bool,
    /// The Kafka cluster's id, once the consumer has read it.
    cluster_id: Option<String>,
    /// Configured topics that Kafka said do not exist, until they are seen.
    missing_topics: std::collections::BTreeSet<String>,
    /// The topics subscribed to: KAFKA_TOPIC's names and the topics its patterns match now.
    topics: Vec<String>,
    partition_errors: HashMap<Tp, Note>,
    /// The last distinct errors, newest first.
    errors: VecDeque<ErrorEntry>,
}

/// One of the last errors: where, what, when last, and how often in a row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ErrorEntry {
    /// RFC 3339, UTC: the last time it happened.
    pub time: String,
    /// When it first happened, if it happened more than once.
    pub first_time: Option<String>,
    pub count: u64,
    /// `store`, `archiving` (it stopped), `consumer`, or `topic/partition`.
    pub source: String,
    pub message: String,
    /// The message without its numbers: what a repeat has in common with it.
    #[serde(skip)]
    shape: String,
}

/// What the archiver was started with, as the status page shows it: no secret.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Setup {
    pub brokers: Vec<String>,
    pub group_id: String,
    /// Where the archive goes: the bucket and its endpoint, or the directory.
    pub store: String,
    /// ARCHIVE_FORMAT and its settings.
    pub format: String,
    pub spool_dir: String,
    #[serde(skip)]
    pub spool_limits: SpoolLimits,
}

impl Setup {
    pub fn of(config: &Config) -> Setup {
        Setup {
            brokers: config.brokers.clone(),
            group_id: config.group_id.clone(),
            store: config.store.location(),
            format: config.format.describe(),
            spool_dir: crate::config::absolute(&config.spool_dir).display().to_string(),
            spool_limits: config.spool_limits,
        }
    }
}

impl Notes {
    fn store_failed(&mut self, note: Note) {
        self.store_reachable = Some(false);
        self.store_error = Some(note);
    }

    /// Puts an error at the top of the recent ones. The same error again moves up and counts:
    /// same source, and the same message but for its numbers (offsets, the keys of objects), so
    /// that an outage or a run of bad records is one line, not the whole list.
    fn remember(&mut self, source: String, note: &Note) {
        let shape = without_numbers(&note.message);
        let same = self.errors.iter().position(|e| e.source == source && e.shape == shape);
        let (first_time, count) = match same.and_then(|i| self.errors.remove(i)) {
            Some(e) => (e.first_time.or(Some(e.time)), e.count + 1),
            None => (None, 1),
        };
        let entry =
            ErrorEntry { time: note.time.clone(), first_time, count, source, message: note.message.clone(), shape };
        self.errors.push_front(entry);
        self.errors.truncate(RECENT_ERRORS);
    }
}

/// A message with each run of digits as one `#`: what repeats of an error have in common.
fn without_numbers(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for c in message.chars() {
        if !c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('#') {
            out.push('#');
        }
    }
    out
}

/// Shared by every stage; cheap to update from hot paths (one uncontended lock).
#[derive(Debug)]
pub struct Status {
    started: SystemTime,
    setup: Setup,
    notes: Mutex<Notes>,
}

impl Default for Status {
    fn default() -> Status {
        Status::new()
    }
}

/// The answer of `/status`.
#[derive(Debug, Serialize)]
pub struct Report {
    /// RUNNING, or FAILED once archiving stopped with an error.
    pub state: &'static str,
    pub version: &'static str,
    pub started: String,
    pub uptime_seconds: u64,
    pub ready: bool,
    /// Why not ready, as `/readyz` says it; empty when ready.
    pub not_ready: Vec<String>,
    pub setup: Setup,
    pub consumer: ConsumerReport,
    pub spool: SpoolReport,
    pub store: StoreReport,
    pub failure: Option<Note>,
    pub last_error: Option<Note>,
    /// The last distinct errors, newest first (at most 20; a repeat moves its error to the top).
    pub errors: Vec<ErrorEntry>,
    pub partitions: Vec<PartitionReport>,
}

#[derive(Debug, Serialize)]
pub struct ConsumerReport {
    /// The topics subscribed to: KAFKA_TOPIC's names and the existing topics its patterns match
    /// (looked up again every 10 s), minus KAFKA_TOPIC_EXCLUDE.
    pub topics: Vec<String>,
    pub assigned_partitions: usize,
    /// Configured topics that do not exist (yet): they are archived once they are created.
    pub missing_topics: Vec<String>,
    pub paused: bool,
    pub pause_reason: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct SpoolReport {
    pub records: u64,
    pub bytes: u64,
    /// SPOOL_MAX_RECORDS, SPOOL_MAX_BYTES, SPOOL_MIN_FREE_BYTES: above `wait_above_percent` of
    /// either bound the consumer waits for the uploads, at `pause_at_percent` (or under the
    /// minimum free space) it pauses.
    pub max_records: u64,
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    pub wait_above_percent: u64,
    pub pause_at_percent: u64,
    /// The spool's file system: space free for the archiver, and its size.
    pub disk_free_bytes: Option<u64>,
    pub disk_total_bytes: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct StoreReport {
    /// None until the first request or probe answered.
    pub reachable: Option<bool>,
    pub last_error: Option<Note>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PartitionReport {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (the next offset to archive), once known.
    pub committed: Option<i64>,
    /// One past the last offset in the partition, as far as the consumer has seen.
    pub end: Option<i64>,
    /// `end - committed`: records not yet archived and committed.
    pub lag: Option<i64>,
    /// Records of this partition consumed but not yet stored.
    pub spool_records: usize,
    pub last_error: Option<Note>,
}

impl Status {
    pub fn new() -> Status {
        Status::with_setup(Setup::default())
    }

    pub fn with_setup(setup: Setup) -> Status {
        Status { started: SystemTime::now(), setup, notes: Mutex::new(Notes::default()) }
    }

    fn notes(&self) -> std::sync::MutexGuard<'_, Notes> {
        self.notes.lock().expect("status lock")
    }

    /// Something went wrong with a partition (or, with `None`, with the pipeline as a whole).
    pub fn error(&self, tp: Option<&Tp>, message: impl Into<String>) {
        let note = Note::now(message);
        let source = tp.map_or_else(|| "consumer".to_string(), |(t, p)| format!("{t}/{p}"));
        let mut n = self.notes();
        n.remember(source, &note);
        if let Some(tp) = tp {
            n.partition_errors.insert(tp.clone(), note);
        }
    }

    /// A request to the store succeeded.
    pub fn store_ok(&self) {
        let mut n = self.notes();
        n.store_ok_at = Some(Instant::now());
        n.store_reachable = Some(true);
    }

    /// A request to the store failed; the message says what to check.
    pub fn store_error(&self, message: impl Into<String>) {
        let note = Note::now(message);
        let mut n = self.notes();
        n.remember("store".into(), &note);
        n.store_failed(note);
    }

    /// An upload of a partition's object failed: the partition's last error and the store's, one
    /// entry among the last errors (the store's).
    pub fn upload_error(&self, tp: &Tp, message: impl Into<String>) {
        let note = Note::now(message);
        let mut n = self.notes();
        n.remember("store".into(), &note);
        n.partition_errors.insert(tp.clone(), note.clone());
        n.store_failed(note);
    }

    /// Whether the store answered recently, so no probe is needed.
    pub fn store_answered_within(&self, d: Duration) -> bool {
        self.notes().store_ok_at.is_some_and(|t| t.elapsed() < d)
    }

    /// The consumer's latest high watermark of a partition.
    pub fn set_end(&self, tp: &Tp, end: i64) {
        self.notes().ends.insert(tp.clone(), end);
    }

    /// Consumption paused (with the reason) or resumed (`None`) by the backpressure.
    pub fn set_paused(&self, reason: Option<String>) {
        self.notes().paused = reason;
    }

    /// Archiving paused (or resumed) on request; returns whether that changed anything.
    pub fn set_paused_on_request(&self, paused: bool) -> bool {
        std::mem::replace(&mut self.notes().paused_on_request, paused) != paused
    }

    /// Whether archiving is paused on request: the consumer pauses its partitions while it is.
    pub fn paused_on_request(&self) -> bool {
        self.notes().paused_on_request
    }

    /// Kafka says a configured topic does not exist; returns whether that is news.
    pub fn topic_missing(&self, topic: &str) -> bool {
        self.notes().missing_topics.insert(topic.to_string())
    }

    /// A configured topic has partitions (called with every statistics report, so cheap when
    /// nothing is missing).
    pub fn topic_found(&self, topic: &str) {
        let mut n = self.notes();
        if !n.missing_topics.is_empty() && n.missing_topics.remove(topic) {
            tracing::info!(topic, "the topic exists now; it is archived once its partitions are assigned");
        }
    }

    /// The consumer subscribed to these topics.
    pub fn set_topics(&self, topics: Vec<String>) {
        let mut n = self.notes();
        // A topic no longer subscribed to is no longer missing.
        n.missing_topics.retain(|t| topics.contains(t));
        n.topics = topics;
    }

    pub fn set_cluster_id(&self, id: String) {
        self.notes().cluster_id = Some(id);
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.notes().cluster_id.clone()
    }

    /// Archiving stopped with this error: the process reports FAILED until it is restarted.
    pub fn fail(&self, message: impl Into<String>) {
        let note = Note::now(message);
        let mut n = self.notes();
        n.remember("archiving".into(), &note);
        n.failure = Some(note);
    }

    /// The error archiving stopped with, if it did.
    pub fn failure(&self) -> Option<Note> {
        self.notes().failure.clone()
    }

    /// Why the process is not ready to archive, if it is not: it must have partitions assigned,
    /// a reachable store, and not have stopped.
    pub fn not_ready(&self, any_assigned: bool) -> Vec<String> {
        let n = self.notes();
        let mut why = Vec::new();
        if let Some(f) = &n.failure {
            why.push(format!("archiving stopped: {}", f.message));
        }
        if !any_assigned {
            why.push(
                "no partitions assigned (the group is still joining, the topic is missing, or there are \
                 more instances than partitions)"
                    .into(),
            );
        }
        match n.store_reachable {
            Some(true) => {}
            Some(false) => why.push(format!(
                "the object store is not reachable: {}",
                n.store_error.as_ref().map_or("", |e| e.message.as_str())
            )),
            None => why.push("the object store has not answered yet".into()),
        }
        why
    }

    /// A snapshot for `/status`. `assigned` is copied out of the ledger under its lock
    /// ([`Ledger::assigned`]), which the consumer and uploaders take: the report is built outside
    /// it.
    ///
    /// [`Ledger::assigned`]: crate::pipeline::commit::Ledger::assigned
    pub fn report(&self, assigned: &[PartitionView], spool: &Spool, disk: Option<DiskSpace>) -> Report {
        let partitions = self.partitions(assigned);
        let not_ready = self.not_ready(!assigned.is_empty());
        let limits = self.setup.spool_limits;
        let n = self.notes();
        Report {
            state: if n.failure.is_some() { "FAILED" } else { "RUNNING" },
            version: env!("CARGO_PKG_VERSION"),
            started: chrono::DateTime::<chrono::Utc>::from(self.started)
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            uptime_seconds: self.started.elapsed().map_or(0, |d| d.as_secs()),
            ready: not_ready.is_empty(),
            not_ready,
            setup: self.setup.clone(),
            consumer: ConsumerReport {
                topics: n.topics.clone(),
                assigned_partitions: partitions.len(),
                missing_topics: n.missing_topics.iter().cloned().collect(),
                paused: n.paused.is_some() || n.paused_on_request,
                pause_reason: if n.paused_on_request { Some(PAUSED_ON_REQUEST.into()) } else { n.paused.clone() },
            },
            spool: SpoolReport {
                records: spool.record_count(),
                bytes: spool.byte_count(),
                max_records: limits.max_records,
                max_bytes: limits.max_bytes,
                min_free_bytes: limits.min_free_bytes,
                wait_above_percent: backpressure::WAIT_ABOVE_PERCENT,
                pause_at_percent: backpressure::PAUSE_AT_PERCENT,
                disk_free_bytes: disk.map(|d| d.free),
                disk_total_bytes: disk.map(|d| d.total),
            },
            store: StoreReport { reachable: n.store_reachable, last_error: n.store_error.clone() },
            failure: n.failure.clone(),
            // The newest of the last errors: each error is remembered there.
            last_error: n.errors.front().map(|e| Note { message: e.message.clone(), time: e.time.clone() }),
            errors: n.errors.iter().cloned().collect(),
            partitions,
        }
    }

    /// The assigned partitions, in topic and partition order.
    fn partitions(&self, assigned: &[PartitionView]) -> Vec<PartitionReport> {
        let n = self.notes();
        let mut out: Vec<PartitionReport> = assigned
            .iter()
            .map(|v| {
                // The consumer's watermark can lag what it has already delivered (and some brokers
                // report it low); nothing before a delivered or committed offset can be missing.
                let end = [n.ends.get(&v.tp).copied(), v.next_delivery, v.committed].into_iter().flatten().max();
                PartitionReport {
                    topic: v.tp.0.clone(),
                    partition: v.tp.1,
                    committed: v.committed,
                    end,
                    lag: v.committed.zip(end).map(|(c, e)| (e - c).max(0)),
                    spool_records: v.pending,
                    last_error: n.partition_errors.get(&v.tp).cloned(),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        out
    }

    /// Sets every gauge from the current state (`assigned` as for [`Status::report`]); called
    /// before each scrape of `/metrics`.
    pub fn set_gauges(&self, assigned: &[PartitionView], spool: &Spool) {
        let partitions = self.partitions(assigned);
        metrics::gauge!(m::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        metrics::gauge!(m::ASSIGNED_PARTITIONS).set(partitions.len() as f64);
        for p in &partitions {
            let labels = [("topic", p.topic.clone()), ("partition", p.partition.to_string())];
            if let Some(c) = p.committed {
                metrics::gauge!(m::COMMITTED_OFFSET, &labels).set(c as f64);
            }
            if let Some(lag) = p.lag {
                metrics::gauge!(m::CONSUMER_LAG, &labels).set(lag as f64);
            }
        }
        metrics::gauge!(m::SPOOL_RECORDS).set(spool.record_count() as f64);
        metrics::gauge!(m::SPOOL_BYTES).set(spool.byte_count() as f64);
        let n = self.notes();
        metrics::gauge!(m::CONSUMER_PAUSED).set(if n.paused.is_some() || n.paused_on_request { 1.0 } else { 0.0 });
        metrics::gauge!(m::STORE_REACHABLE).set(if n.store_reachable == Some(true) { 1.0 } else { 0.0 });
        metrics::gauge!(m::FAILED).set(if n.failure.is_some() { 1.0 } else { 0.0 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::commit::Ledger;

    fn tp(p: i32) -> Tp {
        ("t".to_string(), p)
    }

    #[test]
    fn lag_is_end_minus_committed_and_never_below_what_was_delivered() {
        let (status, mut ledger) = (Status::new(), Ledger::new());
        ledger.assign(&tp(0));
        ledger.assign(&tp(1));
        for o in 10..15 {
            ledger.deliver(&tp(0), o, false, Some(0));
        }
        ledger.complete(&tp(0), 10);
        ledger.to_commit();
        ledger.commit_succeeded(&tp(0), 11);
        // The broker's watermark (12) is behind what was delivered (up to 14).
        status.set_end(&tp(0), 12);
        status.error(Some(&tp(0)), "upload failed");
        let ps = status.partitions(&ledger.assigned());
        assert_eq!(ps.len(), 2);
        assert_eq!((ps[0].committed, ps[0].end, ps[0].lag, ps[0].spool_records), (Some(11), Some(15), Some(4), 4));
        assert_eq!(ps[0].last_error.as_ref().unwrap().message, "upload failed");
        assert_eq!((ps[1].committed, ps[1].end, ps[1].lag), (None, None, None), "nothing known yet");
    }

    #[test]
    fn ready_needs_partitions_a_reachable_store_and_no_failure() {
        let (status, mut ledger) = (Status::new(), Ledger::new());
        assert_eq!(status.not_ready(ledger.any_assigned()).len(), 2);
        ledger.assign(&tp(0));
        status.store_error("refused (403): check AWS_ACCESS_KEY_ID");
        let why = status.not_ready(ledger.any_assigned());
        assert_eq!(why.len(), 1);
        assert!(why[0].contains("403"), "{why:?}");
        status.store_ok();
        assert!(status.not_ready(ledger.any_assigned()).is_empty());
        status.fail("archiving stopped (UNDECODABLE=stop)");
        assert!(status.not_ready(ledger.any_assigned())[0].starts_with("archiving stopped"));
    }

    #[test]
    fn the_last_errors_fold_repeats_and_keep_the_newest() {
        let status = Status::new();
        status.upload_error(&tp(0), "upload of t+0+0000000001.bin failed: connection refused");
        status.error(Some(&tp(3)), "offset 7: undecodable record (no envelope)");
        status.upload_error(&tp(1), "upload of t+1+0000000002.bin failed: connection refused");
        status.store_error("upload of t+0+0000000003.bin failed: connection refused");
        status.error(Some(&tp(3)), "offset 8: undecodable record (no envelope)");
        let n = status.notes();
        let errors: Vec<_> = n.errors.iter().map(|e| (e.source.as_str(), e.message.as_str(), e.count)).collect();
        assert_eq!(
            errors,
            [
                ("t/3", "offset 8: undecodable record (no envelope)", 2),
                ("store", "upload of t+0+0000000003.bin failed: connection refused", 3)
            ],
            "a repeat, but for its numbers, moves up and counts"
        );
        assert_eq!(n.partition_errors[&tp(1)].message, "upload of t+1+0000000002.bin failed: connection refused");
        assert!(n.errors.iter().all(|e| e.first_time.is_some()), "each happened more than once");
        drop(n);
        // Thirty errors that differ in more than their numbers: the newest 20 stay.
        let name = |i: u8| format!("error {}{}", (b'a' + i / 26) as char, (b'a' + i % 26) as char);
        for i in 0..30 {
            status.error(None, name(i));
        }
        let n = status.notes();
        assert_eq!(n.errors.len(), RECENT_ERRORS);
        assert_eq!(n.errors[0].message, name(29));
        assert_eq!(n.errors.back().unwrap().message, name(10));
    }
}
