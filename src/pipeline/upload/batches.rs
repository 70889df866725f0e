//! The Parquet format's uploads (ARCHIVE_FORMAT=parquet): an object per sealed batch of a
//! partition's records, not per record.
//!
//! The dispatcher reads each assigned partition from the spool in offset order, from where its
//! assignment started (the group's committed offset), into the partition's open batch
//! ([`crate::pipeline::batch`]). A batch sealed (BATCH_MAX_RECORDS, BATCH_MAX_BYTES,
//! BATCH_MAX_AGE, a new hour, or a filling spool) has its boundary written to the spool durably
//! before its object is started; a task then reads the batch's records back from the spool row
//! group by row group and streams them into the object ([`put_parquet`]), retrying until it is
//! stored. Only then are the records removed from the spool and marked done in the ledger; the
//! boundary stays, marked stored, until Kafka holds a commit past it.
//!
//! What that guarantees (exactly once, as for the Connect layout):
//! - an object's range is decided once: after a crash, a sealed batch is uploaded again under the
//!   same key with the same records, and records Kafka delivers again that lie in a stored batch
//!   are dropped, not put into a second object;
//! - records below where an assignment starts are stored and committed already (by this process
//!   or another): they are dropped from the spool, never batched again;
//! - an object of a partition is only started while this process holds the partition; a
//!   revocation waits (up to SHUTDOWN_TIMEOUT) for those being stored, commits, and drops the
//!   partition's spooled records (the consumer does that part), so the next owner starts exactly
//!   where this process's objects end.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMultipartOptions, PutPayload, WriteMultipart};
use rand::Rng;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{Failure, PART_SIZE, Shared, UploadError, drain, flatten};
use crate::archive::parquet::{self, Row, Writer as ParquetWriter};
use crate::archive::{ObjectKind, UndecodablePolicy};
use crate::config::ParquetSettings;
use crate::metrics as m;
use crate::pipeline::batch::{Batch, BatchLimits, Batcher, Seal};
use crate::pipeline::commit::Tp;
use crate::pipeline::spool::{SealedBatch, Spool, SpoolError, SpoolKey};
use crate::store::watch_slow_downs;

/// A row group holds at most this many records, or this many bytes of values (as spooled), so that
/// readers get groups of a few MiB to tens of MiB and an upload holds one group at a time.
const ROW_GROUP_RECORDS: usize = 65_536;
const ROW_GROUP_BYTES: u64 = 16 << 20;
/// Objects being encoded and stored at once. Each holds a row group and up to
/// [`PARQUET_PARTS_IN_FLIGHT`] parts: this bounds the uploads' memory, whatever the batch size.
const OBJECTS_IN_FLIGHT: usize = 3;
/// Parts of a Parquet object in flight at once: with PART_SIZE, what its upload holds beyond the
/// row group being encoded.
const PARQUET_PARTS_IN_FLIGHT: usize = 4;
/// Records the dispatcher reads from one partition at a time (its other partitions come next).
const READ_RECORDS: usize = 4096;
const READ_BYTES: u64 = 8 << 20;
/// With a batch open, the dispatcher looks at the time at least this often.
const TICK: Duration = Duration::from_millis(100);

/// The Parquet format's settings, and when the spool is full enough to seal batches early.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    pub parquet: ParquetSettings,
    /// Spooled records at which the largest open batch is sealed.
    pub seal_at_records: u64,
    /// Spooled bytes at which the largest open batch is sealed.
    pub seal_at_bytes: u64,
}

/// A batch whose boundary is in the spool.
#[derive(Debug)]
struct Sealed {
    batch: SealedBatch,
    uploading: bool,
    /// The spool holds all its records. A batch sealed before a crash waits until Kafka delivered
    /// again those the crash took from the spool.
    complete: bool,
}

/// An upload task ended: its batch's object is stored, or it gave up (shutdown, revocation).
#[derive(Debug)]
struct Finished {
    prefix: Vec<u8>,
    generation: u64,
    first_offset: i64,
    stored: bool,
}

/// What the dispatcher knows of one partition, under one assignment.
struct Partition {
    tp: Tp,
    prefix: Vec<u8>,
    generation: u64,
    /// Records below where the assignment started were dropped, sealed batches loaded.
    aligned: bool,
    /// The next offset to read from the spool.
    cursor: i64,
    batcher: Batcher,
    /// By first offset.
    sealed: BTreeMap<i64, Sealed>,
    /// Where an object stored by an earlier owner may start (see [`Probe`]); None once none
    /// does.
    probe_at: Option<i64>,
    probe: Probe,
}

/// At the start of an assignment, before a batch is started at an offset no batch of the spool
/// holds, the store is asked whether an object starts there: one stored by an earlier owner of
/// the partition (another instance, or this one with its spool lost) whose offsets were not
/// committed. Such an object is taken as a stored batch, and the next offset after it asked in
/// turn, so that no record goes into a second object.
#[derive(Debug, Default)]
enum Probe {
    #[default]
    Idle,
    Asking,
    /// The answer for this offset: the object's last offset and rows, if there is one.
    Answered(i64, Option<(i64, u64)>),
    /// The store did not answer: asked again after this.
    Later(Instant),
}

/// Where the dispatcher's tasks send what they found.
struct Replies {
    finished: tokio::sync::mpsc::UnboundedSender<Finished>,
    probes: tokio::sync::mpsc::UnboundedSender<ProbeAnswer>,
}

/// A probe's answer, for the dispatcher.
struct ProbeAnswer {
    prefix: Vec<u8>,
    generation: u64,
    at: i64,
    found: Result<Option<(i64, u64)>, String>,
}

/// Whether an object of this format starts at `at` under `key`: its last offset and rows. Reads
/// the object's footer only (two ranged GETs), the whole object where the footer has no offset
/// statistics.
async fn probe(store: Arc<dyn ObjectStore>, key: String, at: i64) -> Result<Option<(i64, u64)>, String> {
    let path = Path::from(key.as_str());
    let tail = object_store::GetOptions {
        range: Some(object_store::GetRange::Suffix(parquet::FOOTER_TAIL)),
        ..Default::default()
    };
    let (size, tail) = match store.get_opts(&path, tail).await {
        Ok(r) => (r.meta.size, r.bytes().await.map_err(|e| e.to_string())?),
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        // Credentials that may write but not read: batches start where Kafka's commit is, as
        // without the probe (what a killed owner stored and did not commit may be written over).
        Err(e @ (object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. })) => {
            tracing::warn!(key, error = %e,
                "cannot read the store to find objects an earlier owner stored: batches start at the committed offset");
            return Ok(None);
        }
        Err(e) => return Err(e.to_string()),
    };
    let span = async {
        let length = parquet::metadata_length(&tail).map_err(|e| e.to_string())? as u64;
        let end = size.checked_sub(parquet::FOOTER_TAIL).ok_or("shorter than a footer")?;
        let start = end.checked_sub(length).ok_or("a footer longer than the object")?;
        let metadata = store.get_range(&path, start..end).await.map_err(|e| e.to_string())?;
        match parquet::span_of_metadata(&metadata).map_err(|e| e.to_string())? {
            Some(span) => Ok(span),
            None => {
                let body =
                    store.get(&path).await.map_err(|e| e.to_string())?.bytes().await.map_err(|e| e.to_string())?;
                parquet::span(body).map_err(|e| e.to_string())
            }
        }
    };
    let error = match span.await {
        Ok((first, last, rows)) if first == at && last >= at => return Ok(Some((last, rows))),
        Ok((first, last, _)) => format!("it holds offsets {first}..={last}"),
        Err(error) => error,
    };
    // Not an object of this format (another writer's, cut short, or of other offsets): not
    // taken, and the key is written over by the batch that starts there.
    tracing::warn!(key, error, "an object at the key of the next batch cannot be read: it is replaced");
    Ok(None)
}

/// Runs the Parquet format's uploads until `shutdown`, then gives those in flight the shutdown
/// timeout.
pub(super) async fn run(
    shared: Arc<Shared>,
    settings: BatchSettings,
    shutdown: CancellationToken,
) -> Result<(), UploadError> {
    let limits = BatchLimits {
        max_records: settings.parquet.max_records,
        max_bytes: settings.parquet.max_bytes,
        max_age: settings.parquet.max_age,
    };
    let mut parts: HashMap<Vec<u8>, Partition> = HashMap::new();
    let mut tasks: JoinSet<Result<(), UploadError>> = JoinSet::new();
    let (finished_tx, mut finished) = tokio::sync::mpsc::unbounded_channel::<Finished>();
    let (probes_tx, mut probes) = tokio::sync::mpsc::unbounded_channel::<ProbeAnswer>();
    let replies = Replies { finished: finished_tx, probes: probes_tx };
    let mut result = Ok(());
    loop {
        while let Ok(f) = finished.try_recv() {
            finish(&mut parts, &f);
        }
        while let Ok(a) = probes.try_recv() {
            answered(&mut parts, a);
        }
        while let Some(done) = tasks.try_join_next() {
            if let Err(e) = flatten(done) {
                result = Err(e);
            }
        }
        if result.is_err() || shutdown.is_cancelled() {
            break;
        }
        let now = Instant::now();
        if let Err(e) = dispatch(&shared, &settings, limits, &mut parts, &mut tasks, &replies, now) {
            result = Err(e);
            break;
        }
        let open = parts.values().any(|p| p.batcher.open().is_some());
        tokio::select! {
            _ = shared.up.spool.inserted() => {}
            _ = tokio::time::sleep(TICK), if open => {}
            // Sealed batches wait for a free upload or for Kafka to deliver them again.
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            Some(f) = finished.recv() => finish(&mut parts, &f),
            Some(a) = probes.recv() => answered(&mut parts, a),
            Some(done) = tasks.join_next() => {
                if let Err(e) = flatten(done) {
                    result = Err(e);
                }
            }
            _ = shutdown.cancelled() => {}
        }
    }
    drain(&shared, tasks, result).await
}

/// An upload ended: its batch is stored, or is looked at again (its records counted) before it is
/// uploaded again.
fn finish(parts: &mut HashMap<Vec<u8>, Partition>, f: &Finished) {
    let part = parts.get_mut(&f.prefix).filter(|p| p.generation == f.generation);
    if let Some(s) = part.and_then(|p| p.sealed.get_mut(&f.first_offset)) {
        s.uploading = false;
        s.batch.stored |= f.stored;
        s.complete &= f.stored;
    }
}

/// The store answered a probe (see [`Probe`]).
fn answered(parts: &mut HashMap<Vec<u8>, Partition>, a: ProbeAnswer) {
    let Some(part) = parts.get_mut(&a.prefix).filter(|p| p.generation == a.generation) else { return };
    part.probe = match a.found {
        Ok(found) => Probe::Answered(a.at, found),
        Err(error) => {
            tracing::debug!(topic = %part.tp.0, partition = part.tp.1, offset = a.at, error,
                "cannot ask the store for an earlier owner's object; asking again");
            Probe::Later(Instant::now() + Duration::from_secs(1))
        }
    };
}

/// One round over the partitions: align, read, seal, and start the uploads there is room for.
fn dispatch(
    shared: &Arc<Shared>,
    settings: &BatchSettings,
    limits: BatchLimits,
    parts: &mut HashMap<Vec<u8>, Partition>,
    tasks: &mut JoinSet<Result<(), UploadError>>,
    replies: &Replies,
    now: Instant,
) -> Result<(), UploadError> {
    let up = &shared.up;
    let mut prefixes = up.spool.partitions();
    prefixes.extend(parts.keys().filter(|k| !prefixes.contains(k)).cloned().collect::<Vec<_>>());
    for prefix in prefixes {
        let Some((topic, partition, _)) = SpoolKey::at(&prefix, 0).parts().map(|(t, p, o)| (t.to_string(), p, o))
        else {
            continue;
        };
        let tp = (topic, partition);
        let Some(assignment) = up.ledger.lock().expect("ledger lock").batching(&tp) else {
            // Not (or no longer) held: the revocation dropped what was spooled of it.
            parts.remove(&prefix);
            continue;
        };
        let part =
            parts.entry(prefix.clone()).or_insert_with(|| Partition::new(tp.clone(), prefix.clone(), limits, up));
        if part.generation != assignment.generation {
            *part = Partition::new(tp.clone(), prefix.clone(), limits, up);
            part.generation = assignment.generation;
        }
        let Some(start) = assignment.start else { continue };
        if !part.aligned {
            part.align(&up.spool, &up.ledger, start)?;
        }
        if let Some(committed) = assignment.committed {
            part.forget_committed(&up.spool, committed)?;
        }
        // Records a crash left in the spool beyond what Kafka delivered again may have gaps that
        // its deliveries fill: batches are read up to where the spool is known whole.
        if let Some(spooled_to) = assignment.spooled_to {
            part.read(up, spooled_to, now, &replies.probes)?;
        }
        if let Some((batch, why)) = part.batcher.poll(now) {
            part.seal(&up.spool, batch, why, now)?;
        }
        for s in part.sealed.values_mut().filter(|s| !s.batch.stored && !s.complete) {
            let held = up.spool.count_between(&prefix, s.batch.first_offset, s.batch.last_offset)?;
            s.complete = held >= s.batch.records;
        }
    }
    // A filling spool: the largest open batch is sealed so that its records can leave, when an
    // upload can take it (sealing more while sealed batches wait only makes objects smaller).
    let waiting = parts.values().flat_map(|p| p.sealed.values()).any(|s| !s.batch.stored && !s.uploading);
    let pressed =
        up.spool.record_count() >= settings.seal_at_records || up.spool.byte_count() >= settings.seal_at_bytes;
    if pressed && !waiting && tasks.len() < OBJECTS_IN_FLIGHT {
        let largest = parts.values_mut().filter(|p| p.batcher.open().is_some()).max_by_key(|p| {
            let b = p.batcher.open().expect("filtered");
            (b.bytes, b.records)
        });
        if let Some(part) = largest
            && let Some(batch) = part.batcher.seal()
        {
            part.seal(&up.spool, batch, Seal::Spool, now)?;
        }
    }
    // Uploads: one object of a partition at a time, in offset order. Then the objects a killed
    // instance stored and did not commit follow each other from the committed offset, and the
    // next owner finds them all by asking for each in turn ([`Probe`]).
    for part in parts.values_mut() {
        if let Some(s) = part.sealed.values_mut().find(|s| !s.batch.stored)
            && !s.uploading
            && s.complete
        {
            if tasks.len() >= OBJECTS_IN_FLIGHT {
                return Ok(());
            }
            if !up.ledger.lock().expect("ledger lock").begin_upload(&part.tp, part.generation) {
                continue;
            }
            s.uploading = true;
            let (shared, batch, generation) = (shared.clone(), s.batch.clone(), part.generation);
            let (parquet, finished, prefix) = (settings.parquet, replies.finished.clone(), part.prefix.clone());
            tasks.spawn(async move {
                let first_offset = batch.first_offset;
                let result = upload_batch(&shared, batch, generation, parquet).await;
                let stored = matches!(result, Ok(true));
                let _ = finished.send(Finished { prefix, generation, first_offset, stored });
                result.map(drop)
            });
        }
    }
    Ok(())
}

impl Partition {
    fn new(tp: Tp, prefix: Vec<u8>, limits: BatchLimits, up: &super::Uploader) -> Partition {
        Partition {
            tp,
            prefix,
            generation: 0,
            aligned: false,
            cursor: 0,
            batcher: Batcher::new(limits, up.layout.clone()),
            sealed: BTreeMap::new(),
            probe_at: None,
            probe: Probe::Idle,
        }
    }

    /// At the start of an assignment: records and batches below `start` are stored and
    /// committed (by this process before a crash, or by another): they go. Batches sealed before
    /// (a crash, an earlier assignment) are taken up again.
    fn align(
        &mut self,
        spool: &Spool,
        ledger: &std::sync::Mutex<crate::pipeline::commit::Ledger>,
        start: i64,
    ) -> Result<(), SpoolError> {
        let (topic, partition) = (&self.tp.0, self.tp.1);
        let below = spool.remove_below(topic, partition, start)?;
        {
            let mut ledger = ledger.lock().expect("ledger lock");
            for offset in &below {
                ledger.complete(&self.tp, *offset);
            }
        }
        tracing::debug!(topic, partition, start, dropped = below.len(), "assignment starts: records below it dropped");
        self.sealed.clear();
        for batch in spool.sealed_of(topic, partition)? {
            // Committed; or not stored and started below the committed offset (another owner
            // moved it): what is left of it is batched anew. A stored batch the committed offset
            // falls inside (its records delivered again in part before a crash) stays: the rest
            // of its records are in its object.
            if batch.last_offset < start || (!batch.stored && batch.first_offset < start) {
                spool.unseal(topic, partition, batch.first_offset)?;
                continue;
            }
            tracing::debug!(
                topic,
                partition,
                first = batch.first_offset,
                last = batch.last_offset,
                records = batch.records,
                stored = batch.stored,
                "a batch sealed before is taken up again"
            );
            self.sealed.insert(batch.first_offset, Sealed { batch, uploading: false, complete: false });
        }
        self.cursor = start;
        self.probe_at = Some(start);
        self.probe = Probe::Idle;
        self.aligned = true;
        Ok(())
    }

    /// Stored batches that Kafka's committed offset passed are forgotten.
    fn forget_committed(&mut self, spool: &Spool, committed: i64) -> Result<(), SpoolError> {
        let done: Vec<i64> = self
            .sealed
            .values()
            .filter(|s| s.batch.stored && s.batch.last_offset < committed)
            .map(|s| s.batch.first_offset)
            .collect();
        for first in done {
            spool.unseal(&self.tp.0, self.tp.1, first)?;
            self.sealed.remove(&first);
        }
        Ok(())
    }

    /// The sealed batch whose range holds `offset`.
    fn sealed_holding(&self, offset: i64) -> Option<&Sealed> {
        self.sealed.range(..=offset).next_back().map(|(_, s)| s).filter(|s| offset <= s.batch.last_offset)
    }

    /// Reads what the spool holds from the cursor up to `below` into batches. Stops at a record
    /// that would start a batch while the store is asked whether an object starts there.
    fn read(
        &mut self,
        up: &super::Uploader,
        below: i64,
        now: Instant,
        answers: &tokio::sync::mpsc::UnboundedSender<ProbeAnswer>,
    ) -> Result<(), SpoolError> {
        let (spool, ledger) = (&up.spool, &up.ledger);
        let waiting = matches!(self.probe, Probe::Asking) || matches!(self.probe, Probe::Later(after) if now < after);
        if self.cursor >= below || (self.probe_at.is_some() && waiting) {
            return Ok(());
        }
        let records = spool.scan_from(&self.prefix, self.cursor, READ_RECORDS, READ_BYTES)?;
        for record in records.into_iter().take_while(|r| r.offset < below) {
            let (offset, ms) = (record.offset, record.time.millis());
            if self.probe_at.is_some()
                && self.sealed_holding(offset).is_none()
                && !self.probed(up, offset, ms, now, answers)?
            {
                return Ok(());
            }
            self.cursor = offset + 1;
            if let Some(s) = self.sealed_holding(offset) {
                let stored = s.batch.stored;
                if let Some(open) = self.batcher.seal() {
                    self.seal(spool, open, Seal::Boundary, now)?;
                }
                if stored {
                    // Delivered again after a crash: it is in a stored object already.
                    spool.remove(&SpoolKey::at(&self.prefix, offset))?;
                    ledger.lock().expect("ledger lock").complete(&self.tp, offset);
                }
                continue;
            }
            if let Some((batch, why)) = self.batcher.push(offset, ms, record.value_len, now) {
                self.seal(spool, batch, why, now)?;
            }
        }
        Ok(())
    }

    /// The record at offset `at`, path time `ms`, starts a batch (none is open while probing):
    /// whether an earlier owner's object starts at it is known and dealt with (true), or the
    /// store is being asked (false).
    fn probed(
        &mut self,
        up: &super::Uploader,
        at: i64,
        ms: i64,
        now: Instant,
        answers: &tokio::sync::mpsc::UnboundedSender<ProbeAnswer>,
    ) -> Result<bool, SpoolError> {
        match std::mem::take(&mut self.probe) {
            Probe::Answered(asked, Some((last, rows))) if asked == at => {
                self.adopt(&up.spool, at, ms, last, rows)?;
                Ok(true)
            }
            Probe::Answered(asked, None) if asked == at => {
                self.probe_at = None;
                Ok(true)
            }
            Probe::Later(after) if now < after => {
                self.probe = Probe::Later(after);
                Ok(false)
            }
            Probe::Asking => {
                self.probe = Probe::Asking;
                Ok(false)
            }
            _ => {
                self.probe = Probe::Asking;
                let key = parquet::key(&up.layout, &self.tp.0, self.tp.1, at, ms);
                let (store, answers) = (up.store.clone(), answers.clone());
                let (prefix, generation) = (self.prefix.clone(), self.generation);
                tokio::spawn(async move {
                    let found = probe(store, key, at).await;
                    let _ = answers.send(ProbeAnswer { prefix, generation, at, found });
                });
                Ok(false)
            }
        }
    }

    /// Takes the object an earlier owner stored at `at..=last` as a stored batch.
    fn adopt(&mut self, spool: &Spool, at: i64, hour_ms: i64, last: i64, rows: u64) -> Result<(), SpoolError> {
        // A batch this spool sealed inside it and never stored (an earlier assignment of this
        // instance) would overlap it: its records go into batches after it.
        let inside: Vec<i64> =
            self.sealed.range(at..=last).filter(|(_, s)| !s.batch.stored).map(|(&first, _)| first).collect();
        for first in inside {
            spool.unseal(&self.tp.0, self.tp.1, first)?;
            self.sealed.remove(&first);
        }
        let batch = SealedBatch {
            topic: self.tp.0.clone(),
            partition: self.tp.1,
            first_offset: at,
            last_offset: last,
            hour_ms,
            records: rows,
            stored: true,
        };
        spool.seal(&batch)?;
        tracing::info!(topic = %self.tp.0, partition = self.tp.1, first = at, last, records = rows,
            "an object an earlier owner stored is taken as it is: its records are not stored again");
        self.sealed.insert(at, Sealed { batch, uploading: false, complete: true });
        self.probe_at = Some(last + 1);
        Ok(())
    }

    /// Keeps `batch`'s boundary durably; its object can then be started.
    fn seal(&mut self, spool: &Spool, batch: Batch, why: Seal, now: Instant) -> Result<(), SpoolError> {
        let sealed = SealedBatch {
            topic: self.tp.0.clone(),
            partition: self.tp.1,
            first_offset: batch.first_offset,
            last_offset: batch.last_offset,
            hour_ms: batch.first_ms,
            records: batch.records as u64,
            stored: false,
        };
        spool.seal(&sealed)?;
        tracing::debug!(topic = %self.tp.0, partition = self.tp.1, first = sealed.first_offset, last = sealed.last_offset,
            records = sealed.records, reason = why.label(), "batch sealed");
        metrics::counter!(m::BATCHES_SEALED, "reason" => why.label()).increment(1);
        metrics::histogram!(m::BATCH_AGE).record(now.duration_since(batch.opened).as_secs_f64());
        self.sealed.insert(batch.first_offset, Sealed { batch: sealed, uploading: false, complete: true });
        Ok(())
    }
}

/// Stores one sealed batch's object, retrying until it is stored (or the shutdown timeout passes,
/// or the partition is no longer held); then removes its records from the spool and marks them
/// done. Returns whether it is stored.
async fn upload_batch(
    shared: &Shared,
    batch: SealedBatch,
    generation: u64,
    settings: ParquetSettings,
) -> Result<bool, UploadError> {
    let up = &shared.up;
    let tp = (batch.topic.clone(), batch.partition);
    let result = async {
        let Some(offsets) = store_batch(shared, &batch, settings).await? else { return Ok(None) };
        // A revocation waits for this upload (it counts until end_upload below), so the partition
        // is still held unless that wait timed out; then its spool and sealed batches are the
        // next assignment's, not this task's.
        if !up.ledger.lock().expect("ledger lock").holds(&tp, generation) {
            return Ok(None);
        }
        // Stored durably before its offsets are done: a commit inside the batch must find it
        // stored after a crash (records of it delivered again are then not batched again).
        up.spool.mark_stored(&batch)?;
        up.spool.flush_sealed()?;
        let keys: Vec<SpoolKey> =
            offsets.iter().map(|offset| SpoolKey::new(&batch.topic, batch.partition, *offset)).collect();
        up.spool.remove_all(&keys)?;
        Ok::<_, UploadError>(Some(offsets))
    }
    .await;
    let mut ledger = up.ledger.lock().expect("ledger lock");
    if let Ok(Some(offsets)) = &result
        && ledger.holds(&tp, generation)
    {
        for offset in offsets {
            ledger.complete(&tp, *offset);
        }
        metrics::counter!(m::RECORDS_ARCHIVED).increment(offsets.len() as u64);
        metrics::histogram!(m::OBJECT_RECORDS).record(offsets.len() as f64);
    }
    // Last: the revocation's commit, which waits for this, then covers the batch.
    ledger.end_upload(&tp);
    result.map(|offsets| offsets.is_some())
}

/// Uploads the batch's object until it is stored; the offsets it holds, or None when given up.
async fn store_batch(
    shared: &Shared,
    batch: &SealedBatch,
    settings: ParquetSettings,
) -> Result<Option<Vec<i64>>, UploadError> {
    let up = &shared.up;
    let key = parquet::key(&up.layout, &batch.topic, batch.partition, batch.first_offset, batch.hour_ms);
    let path = Path::from(key.as_str());
    let tp = (batch.topic.clone(), batch.partition);
    let mut attempt: u32 = 0;
    loop {
        if attempt > 0 {
            metrics::counter!(m::UPLOAD_RETRIES).increment(1);
        }
        let rows = BatchRows::new(up.spool.clone(), batch, settings.sinetstream, up.policy);
        let started = Instant::now();
        let permit = shared.puts.acquire().await;
        let (result, slowed) =
            watch_slow_downs(put_parquet(up.store.as_ref(), &path, rows, settings.zstd_level, &shared.abandon)).await;
        permit.done(result.is_ok(), slowed);
        let failure = match result {
            Ok((rows, size)) => {
                shared.store_answers();
                metrics::histogram!(m::UPLOAD_DURATION).record(started.elapsed().as_secs_f64());
                metrics::counter!(m::OBJECTS_UPLOADED, "kind" => ObjectKind::Parquet.label()).increment(1);
                metrics::counter!(m::UPLOADED_BYTES).increment(size);
                metrics::histogram!(m::OBJECT_SIZE).record(size as f64);
                rows.report_undecodable(shared, &tp);
                return Ok(Some(rows.offsets));
            }
            Err(BatchError::Rows(e)) => return Err(e),
            Err(BatchError::Abandoned) => return Ok(None),
            // Not stored; the dispatcher waits until the spool holds the batch again.
            Err(e @ BatchError::Short { .. }) => {
                tracing::debug!(key, error = %e, "batch not whole in the spool; not stored");
                return Ok(None);
            }
            Err(BatchError::Encode(e)) => {
                // The rows are the spool's; an encoder that refuses them fails every retry.
                return Err(UploadError::Encode { key, error: e.to_string() });
            }
            Err(BatchError::Store(e)) => Failure::Put(e),
        };
        attempt += 1;
        let ceiling = Duration::from_millis(100).saturating_mul(1 << attempt.min(9)).min(Duration::from_secs(10));
        let wait = ceiling.mul_f64(rand::rng().random_range(0.5..=1.0));
        failure.report(shared, &tp, &key, attempt, wait);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.abandon.cancelled() => return Ok(None),
        }
    }
}

/// The rows of one sealed batch, read from the spool a row group at a time.
struct BatchRows {
    spool: Arc<Spool>,
    prefix: Vec<u8>,
    topic: String,
    partition: i32,
    next: i64,
    last: i64,
    /// How many records the batch was sealed with.
    records: u64,
    sinetstream: bool,
    policy: UndecodablePolicy,
    /// The offsets read, in order.
    offsets: Vec<i64>,
    /// The first undecodable record of each kind: (offset, reason label, reason), and how many.
    undecodable: Vec<(i64, &'static str, String)>,
    undecodable_count: HashMap<&'static str, u64>,
}

impl BatchRows {
    fn new(spool: Arc<Spool>, batch: &SealedBatch, sinetstream: bool, policy: UndecodablePolicy) -> BatchRows {
        BatchRows {
            spool,
            prefix: crate::pipeline::spool::partition_prefix(&batch.topic, batch.partition),
            topic: batch.topic.clone(),
            partition: batch.partition,
            next: batch.first_offset,
            last: batch.last_offset,
            records: batch.records,
            sinetstream,
            policy,
            offsets: Vec::new(),
            undecodable: Vec::new(),
            undecodable_count: HashMap::new(),
        }
    }

    /// Counts the batch's undecodable records and notes the first of each kind on the partition.
    fn report_undecodable(&self, shared: &Shared, tp: &Tp) {
        for (label, n) in &self.undecodable_count {
            metrics::counter!(m::UNDECODABLE_RECORDS, "reason" => *label).increment(*n);
        }
        for (offset, label, why) in &self.undecodable {
            shared.up.status.error(Some(tp), format!("offset {offset}: undecodable record ({why})"));
            let first = shared.logged.lock().expect("log lock").insert((tp.0.clone(), tp.1, label));
            if first {
                tracing::warn!(topic = %tp.0, partition = tp.1, offset, reason = %why,
                    "undecodable record archived raw in its Parquet row, with the reason; further such records of this partition are counted, not logged");
            }
        }
    }
}

/// Where the row groups of an object come from.
pub trait RowGroups: Send + 'static {
    /// The next row group; None after the last.
    fn next_group(&mut self) -> Result<Option<Vec<Row>>, BatchError>;
}

impl RowGroups for BatchRows {
    fn next_group(&mut self) -> Result<Option<Vec<Row>>, BatchError> {
        if self.next > self.last {
            return self.check_whole();
        }
        let records = self
            .spool
            .read_from(&self.prefix, self.next, ROW_GROUP_RECORDS, ROW_GROUP_BYTES)
            .map_err(|e| BatchError::Rows(e.into()))?;
        let mut rows = Vec::with_capacity(records.len());
        for record in records.into_iter().take_while(|r| r.offset <= self.last) {
            let (row, why) = Row::decoded(&record, self.sinetstream);
            if let Some(why) = why {
                if self.policy == UndecodablePolicy::Stop {
                    return Err(BatchError::Rows(UploadError::Stopped {
                        topic: self.topic.clone(),
                        partition: self.partition,
                        offset: record.offset,
                        reason: why,
                    }));
                }
                let n = self.undecodable_count.entry(why.label()).or_default();
                if *n == 0 {
                    self.undecodable.push((record.offset, why.label(), why.to_string()));
                }
                *n += 1;
            }
            self.offsets.push(record.offset);
            rows.push(row);
        }
        let Some(last) = rows.last() else {
            // Nothing more of the range in the spool.
            self.next = self.last + 1;
            return self.check_whole();
        };
        self.next = last.offset + 1;
        Ok(Some(rows))
    }
}

impl BatchRows {
    /// At the end: every record of the batch was read. Fewer means the spool lost some since the
    /// batch was sealed (the partition was revoked meanwhile): the object must not be completed.
    fn check_whole(&self) -> Result<Option<Vec<Row>>, BatchError> {
        match self.offsets.len() as u64 {
            n if n == self.records => Ok(None),
            n => Err(BatchError::Short { read: n, sealed: self.records }),
        }
    }
}

impl RowGroups for std::vec::IntoIter<Vec<Row>> {
    fn next_group(&mut self) -> Result<Option<Vec<Row>>, BatchError> {
        Ok(self.next())
    }
}

/// Why a Parquet object could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Rows(UploadError),
    #[error("the spool holds {read} of the batch's {sealed} records")]
    Short { read: u64, sealed: u64 },
    #[error("given up at the shutdown timeout")]
    Abandoned,
    #[error("cannot encode the Parquet object: {0}")]
    Encode(#[from] ::parquet::errors::ParquetError),
    #[error(transparent)]
    Store(#[from] object_store::Error),
}

/// Stores one Parquet object from its row groups, in order, unless `abandon` is cancelled first;
/// gives back the source and the object's size. Each row group is read and encoded on a blocking thread and its bytes go on at
/// once: into one PUT while the object is smaller than a part, else into a multipart upload with
/// at most [`PARQUET_PARTS_IN_FLIGHT`] parts in flight. Memory holds a row group and a few
/// parts, never the object. A multipart upload that fails is aborted.
pub async fn put_parquet<G: RowGroups>(
    store: &dyn ObjectStore,
    path: &Path,
    groups: G,
    zstd_level: i32,
    abandon: &CancellationToken,
) -> Result<(G, u64), BatchError> {
    let mut upload = None;
    // Given up at the shutdown timeout: the multipart upload is aborted rather than left to the
    // bucket's lifecycle rule.
    let result = tokio::select! {
        r = write_parquet(store, path, groups, zstd_level, &mut upload) => r,
        _ = abandon.cancelled() => Err(BatchError::Abandoned),
    };
    // An upload left open by a failure is aborted; finish() aborts its own failures.
    if let (Err(_), Some(up)) = (&result, upload) {
        let _ = up.abort().await;
    }
    result
}

/// [`put_parquet`]'s work; a multipart upload it starts is left in `upload` until it finishes it.
async fn write_parquet<G: RowGroups>(
    store: &dyn ObjectStore,
    path: &Path,
    mut groups: G,
    zstd_level: i32,
    upload: &mut Option<WriteMultipart>,
) -> Result<(G, u64), BatchError> {
    let mut writer = ParquetWriter::new(zstd_level)?;
    let mut small = Vec::<Bytes>::new();
    let mut size = 0u64;
    loop {
        let (w, g, encoded) = tokio::task::spawn_blocking(move || {
            let encoded = match groups.next_group() {
                Ok(Some(rows)) => writer.row_group(&rows).map(Some).map_err(BatchError::from),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            };
            (writer, groups, encoded)
        })
        .await
        .expect("the encoding task does not panic");
        (writer, groups) = (w, g);
        let Some(bytes) = encoded? else { break };
        size += bytes.len() as u64;
        if let Some(up) = upload {
            up.put(bytes);
            up.wait_for_capacity(PARQUET_PARTS_IN_FLIGHT).await?;
            continue;
        }
        small.push(bytes);
        if small.iter().map(Bytes::len).sum::<usize>() >= PART_SIZE {
            let mut up = WriteMultipart::new_with_chunk_size(
                store.put_multipart_opts(path, PutMultipartOptions::default()).await?,
                PART_SIZE,
            );
            small.drain(..).for_each(|b| up.put(b));
            *upload = Some(up);
        }
    }
    let footer = writer.finish()?;
    size += footer.len() as u64;
    match upload.take() {
        Some(mut up) => {
            up.put(footer);
            up.finish().await?;
        }
        None => {
            small.push(footer);
            store.put(path, PutPayload::from_iter(small)).await?;
        }
    }
    Ok((groups, size))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use object_store::ObjectStoreExt;
    use rand::Rng;

    use super::*;
    use crate::archive::Layout;
    use crate::pipeline::commit::Ledger;
    use crate::pipeline::status::Status;
    use crate::pipeline::upload::Uploader;
    use crate::record::{Record, RecordTime};

    /// 2022-04-18T11:00:00+09:00, the start of an hour folder in Asia/Tokyo.
    const T0: i64 = 1_650_247_200_000;

    fn message(offset: i64, ms: i64) -> Record {
        let value = crate::archive::sinetstream::encode(
            ms * 1000 + 7,
            format!("{{\"n\":{offset}}}").as_bytes(),
            crate::archive::sinetstream::Format::V3,
        );
        Record {
            topic: "t".into(),
            partition: 0,
            offset,
            time: RecordTime::Kafka(ms),
            key: None,
            value: Some(value.into()),
            headers: None,
        }
    }

    fn uploader(dir: &std::path::Path, store: Arc<dyn ObjectStore>, max_records: usize) -> Uploader {
        Uploader {
            store,
            spool: Arc::new(Spool::open_in_test(dir)),
            ledger: Arc::new(std::sync::Mutex::new(Ledger::new())),
            status: Arc::new(Status::new()),
            layout: Layout::default(),
            policy: UndecodablePolicy::DeadLetter,
            workers: 4,
            rate_limit: None,
            shutdown_timeout: Duration::from_millis(500),
            conditional_put: false,
            metadata: false,
            batches: Some(BatchSettings {
                parquet: ParquetSettings {
                    max_records,
                    max_bytes: 1 << 30,
                    max_age: Duration::from_millis(200),
                    zstd_level: 3,
                    sinetstream: true,
                },
                seal_at_records: u64::MAX,
                seal_at_bytes: u64::MAX,
            }),
        }
    }

    /// The consumer's part: `records` delivered (the partition assigned first) and spooled.
    fn deliver(up: &Uploader, records: &[Record]) {
        let tp = ("t".to_string(), 0);
        let mut ledger = up.ledger.lock().unwrap();
        if ledger.batching(&tp).is_none() {
            ledger.assign(&tp);
        }
        let new: Vec<Record> = records
            .iter()
            .filter(|r| {
                ledger.deliver(&tp, r.offset, false, r.time.kafka()) == crate::pipeline::commit::Delivery::Spool
            })
            .cloned()
            .collect();
        up.spool.insert_batch(&new).unwrap();
        ledger.all_spooled();
    }

    /// Every object under topics/t: key → offsets of its rows (negative for a null payload).
    async fn objects(store: &dyn ObjectStore) -> BTreeMap<String, Vec<i64>> {
        use futures::TryStreamExt;
        let mut out = BTreeMap::new();
        let metas: Vec<_> = store.list(Some(&Path::from("topics/t"))).try_collect().await.unwrap();
        for meta in metas {
            let bytes = store.get(&meta.location).await.unwrap().bytes().await.unwrap();
            let rows = crate::archive::parquet::read(bytes).unwrap();
            out.insert(
                meta.location.to_string(),
                rows.iter().map(|r| if r.payload.is_some() { r.offset } else { -r.offset }).collect(),
            );
        }
        out
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn committed(ledger: &Mutex<Ledger>) -> Option<i64> {
        ledger.lock().unwrap().to_commit().last().map(|(_, p)| *p)
    }

    #[tokio::test]
    async fn batches_become_objects_by_count_hour_and_age_and_every_offset_is_in_one() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let up = uploader(dir.path(), store.clone(), 4);
        let (spool, ledger) = (up.spool.clone(), up.ledger.clone());
        // 0..6 in one hour, 6..9 in the next (with a gap at 7: a compacted offset).
        let mut records: Vec<Record> = (0..6).map(|o| message(o, T0 + o)).collect();
        records[5].value = None; // a tombstone: a row with a null payload
        records.extend([6, 8].map(|o| message(o, T0 + 3_600_000 + o)));
        deliver(&up, &records);
        let stop = CancellationToken::new();
        let run = tokio::spawn(up.run(stop.clone()));
        until("all stored", || spool.record_count() == 0).await;
        until("all committed", || committed(&ledger) == Some(9)).await;
        let got = objects(store.as_ref()).await;
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            [
                (
                    "topics/t/year=2022/month=04/day=18/hour=11/t+0+0000000000.zstd.parquet".to_string(),
                    vec![0, 1, 2, 3]
                ),
                ("topics/t/year=2022/month=04/day=18/hour=11/t+0+0000000004.zstd.parquet".to_string(), vec![4, -5]),
                ("topics/t/year=2022/month=04/day=18/hour=12/t+0+0000000006.zstd.parquet".to_string(), vec![6, 8]),
            ]
        );
        assert!(spool.sealed().unwrap().iter().all(|b| b.stored), "kept until Kafka holds the commit");
        stop.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn objects_an_earlier_owner_stored_are_taken_as_they_are_and_the_next_starts_after_them() {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let records: Vec<Record> = (0..12).map(|o| message(o, T0 + o)).collect();
        // Another instance stored 0..=3 and 4..=6 and was killed before committing: Kafka
        // delivers from 0 again to an owner without its spool.
        let earlier = tempfile::tempdir().unwrap();
        let first = uploader(earlier.path(), store.clone(), 4);
        deliver(&first, &records[..7]);
        let first_spool = first.spool.clone();
        let stop = CancellationToken::new();
        let run = tokio::spawn(first.run(stop.clone()));
        until("the earlier owner stored 0..=6", || first_spool.record_count() == 0).await;
        stop.cancel();
        run.await.unwrap().unwrap();
        let before = objects(store.as_ref()).await;
        assert_eq!(before.values().cloned().collect::<Vec<_>>(), [vec![0, 1, 2, 3], vec![4, 5, 6]]);

        let dir = tempfile::tempdir().unwrap();
        let up = uploader(dir.path(), store.clone(), 4);
        let (spool, ledger) = (up.spool.clone(), up.ledger.clone());
        deliver(&up, &records);
        let stop = CancellationToken::new();
        let run = tokio::spawn(up.run(stop.clone()));
        until("all stored", || spool.record_count() == 0).await;
        until("all committed", || committed(&ledger) == Some(12)).await;
        let got = objects(store.as_ref()).await;
        assert_eq!(
            got.values().cloned().collect::<Vec<_>>(),
            [vec![0, 1, 2, 3], vec![4, 5, 6], vec![7, 8, 9, 10], vec![11]]
        );
        for (key, offsets) in &before {
            assert_eq!(&got[key], offsets, "{key} is not written again");
        }
        stop.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn after_a_crash_a_sealed_batch_keeps_its_range_and_records_of_a_stored_one_are_not_stored_again() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        {
            // The last run sealed 0..=2 (stored) and 3..=5 (not stored), then crashed before
            // committing: the spool holds 3..=5 and the boundaries.
            let spool = Spool::open_in_test(dir.path());
            let batch = |first, last, stored| SealedBatch {
                topic: "t".into(),
                partition: 0,
                first_offset: first,
                last_offset: last,
                hour_ms: T0,
                records: 3,
                stored,
            };
            spool.seal(&batch(0, 2, true)).unwrap();
            spool.seal(&batch(3, 5, false)).unwrap();
            spool.insert_batch(&(3..6).map(|o| message(o, T0)).collect::<Vec<_>>()).unwrap();
            spool.flush().unwrap();
        }
        // This run batches by 100: had it batched anew, 0..=9 would be one object.
        let up = uploader(dir.path(), store.clone(), 100);
        let (spool, ledger) = (up.spool.clone(), up.ledger.clone());
        let stop = CancellationToken::new();
        let run = tokio::spawn(up.clone().run(stop.clone()));
        // Kafka delivers again from the committed offset, 0.
        deliver(&up, &(0..10).map(|o| message(o, T0)).collect::<Vec<_>>());
        until("all committed", || committed(&ledger) == Some(10)).await;
        let got = objects(store.as_ref()).await;
        let keys: Vec<_> = got.iter().map(|(k, v)| (k.rsplit('/').next().unwrap().to_string(), v.clone())).collect();
        assert_eq!(
            keys,
            [
                ("t+0+0000000003.zstd.parquet".to_string(), vec![3, 4, 5]),
                ("t+0+0000000006.zstd.parquet".to_string(), vec![6, 7, 8, 9]),
            ],
            "0..=2 was stored before the crash (not in this store: not written again); 3..=5 kept its range"
        );
        assert_eq!(spool.record_count(), 0);
        stop.cancel();
        run.await.unwrap().unwrap();
    }

    fn random_rows(offsets: std::ops::Range<i64>, len: usize) -> Vec<Row> {
        offsets
            .map(|o| {
                let mut value = vec![0u8; len];
                rand::rng().fill(&mut value[..]);
                let record = Record {
                    topic: "t".into(),
                    partition: 0,
                    offset: o,
                    time: RecordTime::Kafka(0),
                    key: None,
                    value: Some(Bytes::from(value)),
                    headers: None,
                };
                Row::of(&record, false)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_parquet_object_goes_up_row_group_by_row_group_and_reads_back_whole() {
        let store = object_store::memory::InMemory::new();
        // Small: one PUT. Large (three row groups of 5 MiB that zstd cannot shrink): a multipart
        // upload of 8 MiB parts.
        for (name, groups) in [
            ("small", vec![random_rows(0..10, 100)]),
            ("large", vec![random_rows(0..1024, 5120), random_rows(1024..2048, 5120), random_rows(2048..3072, 5120)]),
        ] {
            let path = Path::from(format!("topics/t/{name}.zstd.parquet"));
            let never = CancellationToken::new();
            let (_, size) = put_parquet(&store, &path, groups.clone().into_iter(), 3, &never).await.unwrap();
            let object = store.get(&path).await.unwrap().bytes().await.unwrap();
            assert_eq!(object.len() as u64, size);
            if name == "large" {
                assert!(object.len() > PART_SIZE, "{} bytes: more than a part", object.len());
            }
            let rows = crate::archive::parquet::read(object).unwrap();
            assert_eq!(rows, groups.concat(), "{name}");
        }
    }

    #[tokio::test]
    async fn a_committed_offset_inside_a_stored_batch_starts_no_second_object() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        {
            // The last run stored 0..=4, then, after a crash, saw 0 and 1 delivered again (in the
            // object: marked done), committed 2 and crashed again.
            let spool = Spool::open_in_test(dir.path());
            spool
                .seal(&SealedBatch {
                    topic: "t".into(),
                    partition: 0,
                    first_offset: 0,
                    last_offset: 4,
                    hour_ms: T0,
                    records: 5,
                    stored: true,
                })
                .unwrap();
            spool.flush().unwrap();
        }
        let up = uploader(dir.path(), store.clone(), 100);
        let ledger = up.ledger.clone();
        let stop = CancellationToken::new();
        let run = tokio::spawn(up.clone().run(stop.clone()));
        deliver(&up, &(2..10).map(|o| message(o, T0)).collect::<Vec<_>>());
        until("all committed", || committed(&ledger) == Some(10)).await;
        let keys: Vec<_> = objects(store.as_ref())
            .await
            .into_iter()
            .map(|(k, v)| (k.rsplit('/').next().unwrap().to_string(), v))
            .collect();
        assert_eq!(keys, [("t+0+0000000005.zstd.parquet".to_string(), vec![5, 6, 7, 8, 9])]);
        stop.cancel();
        run.await.unwrap().unwrap();
    }
}
