//! Upload: drains the spool into object storage.
//!
//! A dispatcher takes records from the spool partition by partition, round robin, and starts one
//! task per record, at most UPLOAD_WORKERS records and UPLOAD_WORKERS object PUTs in flight. A
//! task decides the record's objects ([`crate::archive::plan()`]), stores them all, and only
//! then removes the record from the spool and marks it done in the commit ledger. A failed PUT is retried with
//! exponential backoff and jitter for as long as it takes, and so is, with S3_CONDITIONAL_PUT, a failed
//! read of the object a PUT found in its place: a record is never abandoned except on shutdown, and
//! then it stays in the spool and uncommitted (design invariant 4).

mod batches;
mod multipart;
mod pace;

pub use batches::BatchSettings;
pub use multipart::{RecordedUploads, abort_left};

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use object_store::path::Path;
use object_store::{
    Attributes, ObjectStore, ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, WriteMultipart,
};
use rand::Rng;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::archive::UndecodablePolicy;
use crate::archive::sinetstream::Undecodable;
use crate::archive::{Layout, Object, Plan, attributes, plan};
use crate::metrics as m;
use crate::pipeline::commit::{Ledger, Tp};
use crate::pipeline::spool::{Spool, SpoolError, SpoolKey};
use crate::pipeline::status::{STORE_FRESHNESS, Status};
use crate::pipeline::throttle::{Say, Throttle};
use crate::record::Record;
use crate::store::{error_reason, fix_for, watch_slow_downs};
use pace::UploadPace;

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Spool(#[from] SpoolError),
    #[error("cannot encode the Parquet object {key}: {error}")]
    Encode { key: String, error: String },
    #[error(
        "archiving stopped (UNDECODABLE=stop): {topic} partition {partition} offset {offset}: {reason}. \
         The record stays in the spool; set UNDECODABLE=dead-letter to keep it under errors/ and go on"
    )]
    Stopped { topic: String, partition: i32, offset: i64, reason: Undecodable },
}

/// The dispatcher reads at most about this many value bytes per partition at a time (at least
/// one record), so that large records do not pile up in memory before a worker is free.
const QUEUE_CHUNK_BYTES: usize = 8 << 20;

/// Everything the upload stage works with.
#[derive(Debug, Clone)]
pub struct Uploader {
    pub store: Arc<dyn ObjectStore>,
    pub spool: Arc<Spool>,
    pub ledger: Arc<Mutex<Ledger>>,
    pub status: Arc<Status>,
    pub layout: Layout,
    pub policy: UndecodablePolicy,
    pub workers: usize,
    pub shutdown_timeout: Duration,
    /// Write-once: PUT with If-None-Match, compare on conflict (S3_CONDITIONAL_PUT).
    pub conditional_put: bool,
    /// The store keeps user metadata (S3 does; the local-directory store does not).
    pub metadata: bool,
    /// The Parquet format: batches, not records (None: the Connect format).
    pub batches: Option<BatchSettings>,
    /// Uploads a second at most (UPLOAD_RATE_LIMIT).
    pub rate_limit: Option<f64>,
}

/// State shared by the dispatcher and its tasks.
#[derive(Debug)]
struct Shared {
    up: Uploader,
    in_flight: Mutex<HashSet<SpoolKey>>,
    /// Uploads in flight and their rate (UPLOAD_WORKERS, lowered while the store asks to slow
    /// down; UPLOAD_RATE_LIMIT).
    puts: UploadPace,
    /// (topic, partition, reason) already logged: each decision is logged once, not per record.
    logged: Mutex<HashSet<(String, i32, &'static str)>>,
    /// Cancelled when in-flight uploads must give up (shutdown timeout passed).
    abandon: CancellationToken,
    /// Failed uploads by reason (connection, permission_denied, …): each said once, then every few
    /// seconds while it goes on, then when none failed for that long.
    failing: Throttle<&'static str>,
    /// When the store last took a request.
    answered: Mutex<Option<std::time::Instant>>,
}

impl Shared {
    /// The store took a request.
    fn store_answers(&self) {
        self.up.status.store_ok();
        if self.failing.any() {
            *self.answered.lock().expect("answered lock") = Some(std::time::Instant::now());
            self.say_recovered();
        }
    }

    /// Upload failures are over once the store took a request after the last of them and none
    /// happened for [`crate::pipeline::throttle::EVERY`] (so that failures among successes, a 503 now and
    /// then, are not said to end at every success).
    fn say_recovered(&self) {
        let Some(answered) = *self.answered.lock().expect("answered lock") else { return };
        let now = std::time::Instant::now();
        let over =
            |last: std::time::Instant| last < answered && now.duration_since(last) >= crate::pipeline::throttle::EVERY;
        for (reason, ended) in self.failing.end_where(over) {
            tracing::info!(
                reason,
                failed_attempts = ended.times,
                lasted_s = ended.lasted.as_secs(),
                "the store takes uploads again"
            );
        }
    }
}

impl Uploader {
    /// Runs until `shutdown` is cancelled, then lets in-flight uploads finish within the
    /// shutdown timeout. Returns an error when UNDECODABLE=stop meets an undecodable record, or the
    /// spool fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), UploadError> {
        let workers = self.workers;
        let batches = self.batches;
        let shared = Arc::new(Shared {
            puts: UploadPace::new(workers, self.rate_limit),
            in_flight: Mutex::new(HashSet::new()),
            logged: Mutex::new(HashSet::new()),
            abandon: CancellationToken::new(),
            failing: Throttle::default(),
            answered: Mutex::new(None),
            up: self,
        });
        if let Some(settings) = batches {
            return batches::run(shared, settings, shutdown).await;
        }
        let records = Arc::new(Semaphore::new(workers));
        let mut tasks: JoinSet<Result<(), UploadError>> = JoinSet::new();
        // Records read from the spool and not yet started. Reading a chunk per partition at a
        // time, rather than one record per free worker, keeps sled scans off the per-record path.
        let mut queue: VecDeque<(SpoolKey, Record)> = VecDeque::new();
        let mut result = Ok(());
        'dispatch: loop {
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = flatten(done) {
                    result = Err(e);
                    break 'dispatch;
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            if queue.is_empty() {
                let partitions = shared.up.spool.partitions();
                let chunk = workers.div_ceil(partitions.len().max(1)).max(1);
                for prefix in partitions {
                    let in_flight = shared.in_flight.lock().expect("in-flight lock");
                    queue.extend(shared.up.spool.pending(
                        &prefix,
                        |k| in_flight.contains(k),
                        chunk,
                        QUEUE_CHUNK_BYTES,
                    )?);
                }
            }
            let Some((key, record)) = queue.pop_front() else {
                tokio::select! {
                    _ = shared.up.spool.inserted() => {}
                    // Idle after an outage: the failures are said to be over once they are.
                    _ = tokio::time::sleep(crate::pipeline::throttle::EVERY), if shared.failing.any() => shared.say_recovered(),
                    Some(done) = tasks.join_next() => {
                        if let Err(e) = flatten(done) {
                            result = Err(e);
                            break;
                        }
                    }
                    _ = shutdown.cancelled() => break,
                }
                continue;
            };
            let permit = tokio::select! {
                p = records.clone().acquire_owned() => p.expect("semaphore is never closed"),
                _ = shutdown.cancelled() => break 'dispatch,
            };
            shared.in_flight.lock().expect("in-flight lock").insert(key.clone());
            let shared = shared.clone();
            tasks.spawn(async move {
                let r = upload_record(&shared, &key, record).await;
                shared.in_flight.lock().expect("in-flight lock").remove(&key);
                drop(permit);
                r
            });
        }
        drain(&shared, tasks, result).await
    }
}

/// Drains the upload tasks: those in flight get the shutdown timeout, then are abandoned (their
/// records stay in the spool and uncommitted). Returns the first error, `result`'s if any.
async fn drain(
    shared: &Shared,
    mut tasks: JoinSet<Result<(), UploadError>>,
    mut result: Result<(), UploadError>,
) -> Result<(), UploadError> {
    // Drain: in-flight uploads get the shutdown timeout, then are abandoned (their records
    // stay in the spool and uncommitted).
    let deadline = tokio::time::sleep(shared.up.shutdown_timeout);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                None => break,
                Some(done) => if let Err(e) = flatten(done) && result.is_ok() { result = Err(e); },
            },
            _ = &mut deadline => {
                tracing::warn!(in_flight = tasks.len(), "shutdown timeout: abandoning uploads in flight; their records stay in the spool");
                // Retrying uploads stop at once (their records stay); a PUT still on the wire
                // gets a moment, then is aborted.
                shared.abandon.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    while tasks.join_next().await.is_some() {}
                })
                .await;
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
                break;
            }
        }
    }
    result
}

fn flatten(r: Result<Result<(), UploadError>, tokio::task::JoinError>) -> Result<(), UploadError> {
    match r {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn upload_record(shared: &Shared, key: &SpoolKey, record: Record) -> Result<(), UploadError> {
    let up = &shared.up;
    let (objects, undecodable) = match plan(&record, &up.layout, up.policy) {
        Plan::Store { objects, undecodable } => (objects, undecodable),
        Plan::Stop(reason) => {
            return Err(UploadError::Stopped {
                topic: record.topic.clone(),
                partition: record.partition,
                offset: record.offset,
                reason,
            });
        }
    };
    if matches!(record.time, crate::record::RecordTime::Consumed(_)) {
        metrics::counter!(m::RECORDS_WITHOUT_TIMESTAMP).increment(1);
    }
    let headers_omitted = up.metadata
        && objects.iter().any(|o| o.metadata.iter().any(|(k, _)| *k == crate::archive::META_KAFKA_HEADERS_OMITTED));
    let conditional = up.conditional_put;
    let tp = (record.topic.clone(), record.partition);
    let stored =
        futures::future::join_all(objects.into_iter().map(|o| put_until_stored(shared, &tp, o, conditional))).await;
    let stored = stored.into_iter().collect::<Result<Vec<_>, _>>()?;
    if stored.iter().any(|s| matches!(s, Stored::Abandoned)) {
        // Not stored: the record must stay in the spool and hold the commit back.
        return Ok(());
    }
    for outcome in stored {
        if let Stored::Conflict(object) = outcome {
            // Write-once and the key holds other bytes: keep them, and keep ours beside them.
            metrics::counter!(m::UPLOAD_CONFLICTS).increment(1);
            up.status.error(Some(&tp), format!("conflict: {} exists with other bytes", object.key));
            tracing::error!(key = %object.key,
                "conflict: the object exists with other bytes; it is kept, and the archiver's bytes go under errors/");
            for o in up.layout.conflict(&object) {
                if matches!(put_until_stored(shared, &tp, o, false).await?, Stored::Abandoned) {
                    return Ok(());
                }
            }
        }
    }
    if let Some(why) = &undecodable {
        log_undecodable(shared, &record, why);
    }
    if headers_omitted {
        metrics::counter!(m::HEADERS_OMITTED).increment(1);
        if !HEADERS_OMITTED_SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(topic = %record.topic, partition = record.partition, offset = record.offset,
                "a record's Kafka headers do not fit in S3's 2 KB of user metadata: its payload object says how many were left out (kafka-headers-omitted), and kafka_s3_archiver_headers_omitted_total counts such records; said once (the Parquet format keeps every header)");
        }
    }
    up.spool.remove(key)?;
    up.ledger.lock().expect("ledger lock").complete(&(record.topic, record.partition), record.offset);
    metrics::counter!(m::RECORDS_ARCHIVED).increment(1);
    Ok(())
}

/// Whether the first record whose headers did not fit was logged (once per process).
static HEADERS_OMITTED_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Bodies at least this large are stored with a multipart upload.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Part size of a multipart upload (S3 wants at least 5 MiB per part but the last).
pub(super) const PART_SIZE: usize = 8 << 20;

/// Counts an undecodable record once stored; logs the first of each kind per partition.
fn log_undecodable(shared: &Shared, record: &Record, why: &Undecodable) {
    metrics::counter!(m::UNDECODABLE_RECORDS, "reason" => why.label()).increment(1);
    shared.up.status.error(
        Some(&(record.topic.clone(), record.partition)),
        format!("offset {}: undecodable record ({why})", record.offset),
    );
    let first = shared.logged.lock().expect("log lock").insert((record.topic.clone(), record.partition, why.label()));
    if first {
        let action = match shared.up.policy {
            UndecodablePolicy::Raw => "archived raw as the payload",
            _ => "stored under errors/ with a reason object",
        };
        tracing::warn!(
            topic = %record.topic, partition = record.partition, offset = record.offset, reason = %why,
            "undecodable record {action}; further such records of this partition are counted, not logged"
        );
    }
}

/// How a PUT ended.
#[derive(Debug)]
enum Stored {
    /// The object is stored (or, write-once, was already there with the same bytes).
    Done,
    /// Write-once, and the key already holds other bytes.
    Conflict(Object),
    /// Given up at the shutdown timeout: not stored. The record stays in the spool, uncommitted.
    Abandoned,
}

/// Stores one object, retrying with exponential backoff and jitter until it is stored.
/// `conditional`: never overwrite (If-None-Match); an existing object is compared instead, and a
/// failed read of it is retried like a failed PUT.
async fn put_until_stored(shared: &Shared, tp: &Tp, object: Object, conditional: bool) -> Result<Stored, UploadError> {
    let path = Path::from(object.key.as_str());
    let size = object.len() as u64;
    let multipart = object.len() >= MULTIPART_THRESHOLD;
    let payload: PutPayload = object.body.iter().cloned().collect();
    let attributes = if shared.up.metadata { attributes(&object.metadata) } else { Attributes::new() };
    let opts = |mode: PutMode| PutOptions { mode, attributes: attributes.clone(), ..PutOptions::default() };
    let mut attempt: u32 = 0;
    loop {
        if attempt > 0 {
            metrics::counter!(m::UPLOAD_RETRIES).increment(1);
        }
        let permit = shared.puts.acquire().await;
        let started = Instant::now();
        let store = shared.up.store.as_ref();
        let (result, slowed) = watch_slow_downs(async {
            match (conditional, multipart) {
                (false, false) => store.put_opts(&path, payload.clone(), opts(PutMode::Overwrite)).await.map(drop),
                (false, true) => put_multipart(store, &path, &payload, &attributes).await,
                (true, false) => store.put_opts(&path, payload.clone(), opts(PutMode::Create)).await.map(drop),
                // Multipart uploads have no If-None-Match: look first (a race with another writer
                // remains possible for these large objects only).
                (true, true) => match store.head(&path).await {
                    Ok(_) => {
                        Err(object_store::Error::AlreadyExists { path: path.to_string(), source: "exists".into() })
                    }
                    Err(object_store::Error::NotFound { .. }) => {
                        put_multipart(store, &path, &payload, &attributes).await
                    }
                    Err(e) => Err(e),
                },
            }
        })
        .await;
        permit.done(result.is_ok(), slowed);
        let failure = match result {
            Ok(()) => {
                shared.store_answers();
                metrics::histogram!(m::UPLOAD_DURATION).record(started.elapsed().as_secs_f64());
                metrics::counter!(m::OBJECTS_UPLOADED, "kind" => object.kind.label()).increment(1);
                metrics::counter!(m::UPLOADED_BYTES).increment(size);
                return Ok(Stored::Done);
            }
            Err(object_store::Error::AlreadyExists { .. }) if conditional => {
                let (existing, slowed) = watch_slow_downs(async { store.get(&path).await?.bytes().await }).await;
                pace::count_slow_downs(slowed);
                match existing {
                    Ok(existing) => {
                        shared.store_answers();
                        if !same_bytes(&existing, &payload) {
                            return Ok(Stored::Conflict(object));
                        }
                        metrics::counter!(m::ALREADY_STORED).increment(1);
                        return Ok(Stored::Done);
                    }
                    Err(e) => Failure::ReadBack(e),
                }
            }
            Err(e) => Failure::Put(e),
        };
        attempt += 1;
        let ceiling = Duration::from_millis(100).saturating_mul(1 << attempt.min(9)).min(Duration::from_secs(10));
        let wait = ceiling.mul_f64(rand::rng().random_range(0.5..=1.0));
        failure.report(shared, tp, &object.key, attempt, wait);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.abandon.cancelled() => return Ok(Stored::Abandoned),
        }
    }
}

/// Why an attempt to store an object failed.
enum Failure {
    /// The PUT (or, multipart write-once, its look first) failed.
    Put(object_store::Error),
    /// Write-once: the key is taken, and reading its object back to compare failed.
    ReadBack(object_store::Error),
}

impl Failure {
    /// Counts the failure, notes it on the partition and the store, and logs it when uploads start
    /// failing, then at most every [`crate::pipeline::throttle::EVERY`] while they go on (all uploads together: with
    /// the store down, each one in flight fails on its own).
    fn report(&self, shared: &Shared, tp: &Tp, key: &str, attempt: u32, wait: Duration) {
        let (e, fix) = match self {
            Failure::Put(e) => (e, fix_for(error_reason(e))),
            Failure::ReadBack(e) => (e, fix_for_read_back(error_reason(e))),
        };
        let reason = error_reason(e);
        if reason != crate::store::SLOW_DOWN {
            // Slow-down answers are counted as they come (`pace`), those object_store retried too.
            metrics::counter!(m::UPLOAD_ERRORS, "reason" => reason).increment(1);
        }
        let problem = match (self, fix) {
            (Failure::Put(_), Some(fix)) => format!("upload of {key} refused: {fix}"),
            (Failure::Put(_), None) => format!("upload of {key} failed: {e}"),
            (Failure::ReadBack(_), Some(fix)) => format!("cannot read the existing {key} to compare: {fix}"),
            (Failure::ReadBack(_), None) => format!("cannot read the existing {key} to compare: {e}"),
        };
        shared.up.status.upload_error(tp, problem.clone());
        match shared.failing.happened(&reason) {
            Say::First => {}
            Say::Again { times, since } => {
                tracing::warn!(failed_attempts = times, seconds = since.as_secs(), last = %problem,
                    "uploads still failing; retrying");
                return;
            }
            Say::Nothing => return,
        }
        match (self, fix) {
            (Failure::Put(_), Some(fix)) => tracing::error!(key, attempt, reason, error = %e, retry_in = ?wait,
                "upload refused: {fix}; retrying until it is accepted"),
            (Failure::Put(_), None) => {
                tracing::warn!(key, attempt, reason, error = %e, retry_in = ?wait, "upload failed; retrying")
            }
            (Failure::ReadBack(_), Some(fix)) => tracing::error!(key, attempt, reason, error = %e, retry_in = ?wait,
                "cannot read the existing object to compare: {fix}; retrying until it can"),
            (Failure::ReadBack(_), None) => tracing::warn!(key, attempt, reason, error = %e, retry_in = ?wait,
                "cannot read the existing object; retrying"),
        }
    }
}

/// Where the probe looks: a key outside the archive's prefixes that is never written.
const PROBE_KEY: &str = ".kafka-s3-archiver/probe";

/// Keeps the store's reachability known for `/readyz` while no uploads run: every
/// [`STORE_FRESHNESS`] without an answer from the store, asks for an object that does not exist.
pub async fn watch_store(store: Arc<dyn ObjectStore>, status: Arc<Status>, shutdown: CancellationToken) {
    let path = Path::from(PROBE_KEY);
    loop {
        if !status.store_answered_within(STORE_FRESHNESS) {
            match tokio::time::timeout(Duration::from_secs(20), store.head(&path)).await {
                // "Not found" is an answer from the bucket: it is there and the credentials work.
                Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. })) => status.store_ok(),
                Ok(Err(e)) => status.store_error(match fix_for(error_reason(&e)) {
                    Some(fix) => format!("probe refused: {fix}"),
                    None => format!("probe failed: {e}"),
                }),
                Err(_) => status.store_error("probe timed out after 20 s: check S3_ENDPOINT_URL and the network"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(STORE_FRESHNESS / 3) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

fn same_bytes(stored: &[u8], payload: &PutPayload) -> bool {
    stored.len() == payload.content_length() && payload.iter().flat_map(|b| b.iter()).eq(stored.iter())
}

/// One object as a multipart upload (parts in parallel); a failed part aborts the upload.
async fn put_multipart(
    store: &dyn ObjectStore,
    path: &Path,
    payload: &PutPayload,
    attributes: &Attributes,
) -> object_store::Result<()> {
    let opts = PutMultipartOptions { attributes: attributes.clone(), ..PutMultipartOptions::default() };
    let upload = store.put_multipart_opts(path, opts).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    for chunk in payload {
        writer.put(chunk.clone());
    }
    writer.finish().await.map(drop)
}

/// What the operator should check when write-once cannot read back the object it found.
fn fix_for_read_back(reason: &str) -> Option<&'static str> {
    match reason {
        "permission_denied" => Some(
            "the store denied reading it (403): S3_CONDITIONAL_PUT needs s3:GetObject to compare an existing object; \
             allow it for the key, or set S3_CONDITIONAL_PUT=false",
        ),
        // The object went away between the PUT and the read: the next PUT stores it.
        "not_found" => None,
        _ => fix_for(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RecordTime;
    use bytes::Bytes;

    impl Record {
        fn at(self, offset: i64) -> Record {
            Record { topic: "t".into(), partition: 0, offset, ..self }
        }
    }

    fn record(value: &[u8]) -> Record {
        Record {
            topic: "t".into(),
            partition: 1,
            offset: 2,
            time: RecordTime::Kafka(0),
            key: None,
            value: Some(Bytes::copy_from_slice(value)),
            headers: None,
        }
    }

    /// The upload stage over `store`, with one SINETStream record of t/0 at offset 0 spooled and
    /// delivered; the shutdown timeout is 200 ms.
    fn stage(dir: &std::path::Path, store: Arc<dyn ObjectStore>, conditional_put: bool) -> (Uploader, Record) {
        let spool = Arc::new(Spool::open_in_test(dir));
        let value =
            Bytes::from(crate::archive::sinetstream::encode(1, b"payload", crate::archive::sinetstream::Format::V3));
        let rec = Record { value: Some(value), ..record(b"") }.at(0);
        spool.insert_batch(std::slice::from_ref(&rec)).unwrap();
        let tp = ("t".to_string(), 0);
        let ledger = Arc::new(Mutex::new(Ledger::new()));
        ledger.lock().unwrap().assign(&tp);
        ledger.lock().unwrap().deliver(&tp, 0, false, None);
        let up = Uploader {
            store,
            spool,
            ledger,
            status: Arc::new(Status::new()),
            layout: Layout::default(),
            policy: UndecodablePolicy::DeadLetter,
            workers: 4,
            rate_limit: None,
            shutdown_timeout: Duration::from_millis(200),
            conditional_put,
            metadata: false,
            batches: None,
        };
        (up, rec)
    }

    #[tokio::test]
    async fn uploads_abandoned_at_shutdown_stay_in_the_spool_and_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens on port 1: every PUT fails, and is retried until the shutdown timeout.
        let store = crate::store::build(&crate::config::StoreConfig::S3 {
            bucket: "bucket-x".into(),
            region: "us-east-1".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            credentials: Box::new(crate::config::Credentials::Instance),
            ca_pem: None,
            put: Default::default(),
            sse: None,
            proxy: None,
            checksum: None,
        })
        .unwrap();
        let (up, _) = stage(dir.path(), store, false);
        let (spool, ledger, status) = (up.spool.clone(), up.ledger.clone(), up.status.clone());
        let stop = CancellationToken::new();
        let run = tokio::spawn(up.run(stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
        run.await.unwrap().unwrap();
        assert_eq!(spool.record_count(), 1, "the record stays in the spool");
        assert!(ledger.lock().unwrap().to_commit().is_empty(), "and nothing is committed");
        let why = status.not_ready(ledger.lock().unwrap().any_assigned());
        assert!(why.iter().any(|w| w.starts_with("the object store is not reachable: upload of")), "{why:?}");
    }

    /// An in-memory store (which refuses a create of an existing key, as S3 does with
    /// If-None-Match) whose key may not read objects while `deny` is set; GETs are counted.
    #[derive(Debug, Default)]
    struct NoGet {
        inner: object_store::memory::InMemory,
        deny: std::sync::atomic::AtomicBool,
        gets: std::sync::atomic::AtomicUsize,
    }

    impl std::fmt::Display for NoGet {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "NoGet({})", self.inner)
        }
    }

    type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = object_store::Result<T>> + Send + 'a>>;

    // The trait is declared with #[async_trait]; these are its methods written out.
    impl ObjectStore for NoGet {
        fn put_opts<'s, 'l, 'f>(
            &'s self,
            location: &'l Path,
            payload: PutPayload,
            opts: PutOptions,
        ) -> BoxFuture<'f, object_store::PutResult>
        where
            's: 'f,
            'l: 'f,
            Self: 'f,
        {
            self.inner.put_opts(location, payload, opts)
        }

        fn put_multipart_opts<'s, 'l, 'f>(
            &'s self,
            location: &'l Path,
            opts: PutMultipartOptions,
        ) -> BoxFuture<'f, Box<dyn object_store::MultipartUpload>>
        where
            's: 'f,
            'l: 'f,
            Self: 'f,
        {
            self.inner.put_multipart_opts(location, opts)
        }

        fn get_opts<'s, 'l, 'f>(
            &'s self,
            location: &'l Path,
            options: object_store::GetOptions,
        ) -> BoxFuture<'f, object_store::GetResult>
        where
            's: 'f,
            'l: 'f,
            Self: 'f,
        {
            use std::sync::atomic::Ordering::SeqCst;
            if !options.head {
                self.gets.fetch_add(1, SeqCst);
                if self.deny.load(SeqCst) {
                    let denied = object_store::Error::PermissionDenied {
                        path: location.to_string(),
                        source: "403 Forbidden: AccessDenied".into(),
                    };
                    return Box::pin(std::future::ready(Err(denied)));
                }
            }
            self.inner.get_opts(location, options)
        }

        fn delete_stream(
            &self,
            locations: futures::stream::BoxStream<'static, object_store::Result<Path>>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<Path>> {
            self.inner.delete_stream(locations)
        }

        fn list(
            &self,
            prefix: Option<&Path>,
        ) -> futures::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>> {
            self.inner.list(prefix)
        }

        fn list_with_delimiter<'s, 'l, 'f>(
            &'s self,
            prefix: Option<&'l Path>,
        ) -> BoxFuture<'f, object_store::ListResult>
        where
            's: 'f,
            'l: 'f,
            Self: 'f,
        {
            self.inner.list_with_delimiter(prefix)
        }

        fn copy_opts<'s, 'a, 'b, 'f>(
            &'s self,
            from: &'a Path,
            to: &'b Path,
            options: object_store::CopyOptions,
        ) -> BoxFuture<'f, ()>
        where
            's: 'f,
            'a: 'f,
            'b: 'f,
            Self: 'f,
        {
            self.inner.copy_opts(from, to, options)
        }
    }

    /// S3_CONDITIONAL_PUT, the record's payload object is already stored (an earlier run stored it
    /// and stopped before committing), and the key may not read it back.
    async fn taken_and_unreadable(dir: &std::path::Path) -> (Uploader, Arc<NoGet>) {
        let store = Arc::new(NoGet::default());
        let (up, rec) = stage(dir, store.clone(), true);
        let Plan::Store { objects, .. } = plan(&rec, &up.layout, up.policy) else { panic!() };
        let payload: PutPayload = objects[0].body.iter().cloned().collect();
        store.inner.put(&Path::from(objects[0].key.as_str()), payload).await.unwrap();
        store.deny.store(true, std::sync::atomic::Ordering::SeqCst);
        (up, store)
    }

    #[tokio::test]
    async fn a_taken_key_that_cannot_be_read_back_is_retried_with_backoff_and_reported_until_it_can() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let (up, store) = taken_and_unreadable(dir.path()).await;
        let (spool, ledger, status) = (up.spool.clone(), up.ledger.clone(), up.status.clone());
        let stop = CancellationToken::new();
        let run = tokio::spawn(up.run(stop.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;

        // Waits of 100-200 ms, 200-400, 400-800, 800-1600: at most 5 reads in 2 s (every 200 ms, 10).
        let gets = store.gets.load(SeqCst);
        assert!((2..=6).contains(&gets), "{gets} reads of the existing object in 2 s");
        let why = status.not_ready(ledger.lock().unwrap().any_assigned());
        assert!(
            why.iter().any(|w| w.starts_with("the object store is not reachable: cannot read the existing")
                && w.contains("S3_CONDITIONAL_PUT needs s3:GetObject")),
            "{why:?}"
        );
        let report = status.report(&ledger.lock().unwrap().assigned(), &spool, None);
        let partition = report.partitions[0].last_error.as_ref().map(|e| e.message.clone()).unwrap_or_default();
        assert!(partition.contains("s3:GetObject"), "{partition}");
        assert_eq!(spool.record_count(), 1, "the record waits in the spool");
        assert!(ledger.lock().unwrap().to_commit().is_empty(), "and nothing is committed");

        // The key is allowed s3:GetObject: a retry compares, finds the same bytes, and is done.
        store.deny.store(false, SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while spool.record_count() > 0 {
            assert!(Instant::now() < deadline, "the record is still in the spool after the read was allowed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(ledger.lock().unwrap().to_commit(), vec![(("t".to_string(), 0), 1)]);
        assert!(status.not_ready(ledger.lock().unwrap().any_assigned()).is_empty(), "ready again");
        stop.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_taken_key_that_cannot_be_read_back_is_abandoned_at_the_shutdown_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let (up, _store) = taken_and_unreadable(dir.path()).await;
        let (spool, ledger) = (up.spool.clone(), up.ledger.clone());
        let stop = CancellationToken::new();
        let run = tokio::spawn(up.run(stop.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        let stopping = Instant::now();
        run.await.unwrap().unwrap();
        // The retry stops at the 200 ms shutdown timeout; it is not left for the abort 1 s later.
        assert!(stopping.elapsed() < Duration::from_millis(700), "stopped after {:?}", stopping.elapsed());
        assert_eq!(spool.record_count(), 1, "the record stays in the spool");
        assert!(ledger.lock().unwrap().to_commit().is_empty(), "and nothing is committed");
    }

    #[tokio::test]
    async fn large_bodies_go_up_in_parts_and_arrive_whole() {
        let store = object_store::memory::InMemory::new();
        let body: Vec<u8> = (0..(MULTIPART_THRESHOLD + 3 * PART_SIZE / 2)).map(|i| (i % 251) as u8).collect();
        let payload: PutPayload = vec![Bytes::from(body.clone()), Bytes::from_static(b"\n")].into_iter().collect();
        let path = Path::from("topics/t/x+0+0000000000.bin");
        put_multipart(&store, &path, &payload, &Attributes::new()).await.unwrap();
        let got = store.get(&path).await.unwrap().bytes().await.unwrap();
        assert_eq!(got.len(), body.len() + 1);
        assert!(got[..body.len()] == body[..] && got[body.len()] == b'\n');
    }

    #[test]
    fn every_label_value_is_one_the_metrics_module_initialises() {
        use crate::archive::ObjectKind;
        for kind in [
            ObjectKind::Payload,
            ObjectKind::Timestamp,
            ObjectKind::DeadLetter,
            ObjectKind::DeadLetterReason,
            ObjectKind::Parquet,
        ] {
            assert!(m::OBJECT_KINDS.contains(&kind.label()), "{}", kind.label());
        }
        let errors = [
            object_store::Error::NotFound { path: "p".into(), source: "x".into() },
            object_store::Error::PermissionDenied { path: "p".into(), source: "x".into() },
            object_store::Error::Unauthenticated { path: "p".into(), source: "x".into() },
            object_store::Error::AlreadyExists { path: "p".into(), source: "x".into() },
            object_store::Error::Generic { store: "S3", source: "x".into() },
        ];
        for e in &errors {
            assert!(m::UPLOAD_ERROR_REASONS.contains(&error_reason(e)), "{}", error_reason(e));
        }
        let undecodable = [
            Undecodable::Encrypted(1),
            Undecodable::NoEnvelope,
            Undecodable::WrongMarker,
            Undecodable::WrongFingerprint("f".into()),
            Undecodable::Truncated("t"),
            Undecodable::Malformed("m"),
        ];
        for why in &undecodable {
            assert!(m::UNDECODABLE_REASONS.contains(&why.label()), "{}", why.label());
        }
    }
}
