//! Spool: the write-ahead queue on local disk between the consumer and the uploaders.
//!
//! A sled tree indexes the records by (topic, partition, offset), so a record fetched twice is
//! stored once and a partition's records are read back in offset order. The consumer inserts
//! records in batches; the uploaders read them, store their objects, and only then remove them
//! (design invariant 2: removed from the spool implies stored). After a crash, what is left here
//! is the first work.
//!
//! The values themselves are appended to segment files (`values/` in the spool directory), and one
//! index entry covers a run of a partition's records written one after another (a run: where
//! they are, their CRCs, which were removed). sled keeps the nodes it works on in memory and
//! rewrites a node on every change: values inline held the spool's records in memory, and an entry
//! per record bounded the ingest at sled's per-entry cost (figures in `benches/results/HISTORY.md`,
//! "Spool design notes"). A segment file is deleted once none of its records is left, and one that
//! is mostly removed records is rewritten when they pile up on disk behind records that stay, past
//! a quarter of SPOOL_MAX_BYTES (sooner on a disk short of room). A rewrite is all or nothing: one
//! that fails (a full disk) leaves the file and its index entries as they were, and is tried again
//! later.
//!
//! Durability: sled makes the index durable on its periodic flush, and values reach the disk when
//! the OS writes them, not at once. That is enough because Kafka still holds every record that is
//! not committed, and nothing is committed before its objects are stored: an insert lost in a
//! crash is fetched again, a removal lost in a crash repeats an identical upload (removals reach
//! their run's entry every 64, when the run empties, and at
//! [`Spool::flush`]), and a record whose value did not reach the disk (it fails its length or CRC
//! check) is dropped when the spool is opened, so it is fetched again. The exception is a record without a Kafka
//! timestamp, whose path comes from the time it was consumed: [`Spool::insert`] syncs the
//! values and the index before returning when a batch holds one, so a retry never sees another
//! time. Syncing every few MiB as well held the consumer on the disk and wrote values that are
//! uploaded and gone within seconds, for about a tenth of the Parquet format's rate (section 10 of
//! `benches/results/parquet-2026-12-03.txt`). [`Spool::flush`], at shutdown, syncs every value
//! file appended to since a flush last synced it.
//!
//! Large values are compressed with zstd when that saves at least an eighth of them
//! ([`SpoolOptions::compress_min_bytes`]).
//!
//! This file holds the spool itself; each of its parts has a file of its own: `codec` (a record's
//! key and encoded value), `runs` (the index of runs in sled), `segments` (the value files and
//! their compaction), `upgrade` (spools written by older versions), `sealed` (the boundaries of
//! the Parquet format's batches) and `uploads` (multipart uploads in progress).

mod codec;
#[cfg(test)]
mod faults;
#[cfg(test)]
mod model;
mod runs;
mod sealed;
mod segments;
#[cfg(test)]
mod tests;
mod upgrade;
mod uploads;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use self::codec::encode_fields;
pub use self::codec::{Fields, Glimpse, SpoolKey, SpoolOptions, decode_entry, encode_value, partition_prefix};
use self::runs::{
    Around, Location, NORMAL, NewRecord, NewRun, RUNS_TREE, Run, SINGLE, build_runs, run_key, split_run_key,
};
pub use self::sealed::SealedBatch;
use self::segments::{Removals, Segment, Segments, release_garbage};
use self::upgrade::move_record_index;
use crate::record::{Record, RecordTime};

/// A record encoded for the spool ([`Spool::entry`]), ready for [`Spool::insert`].
#[derive(Debug)]
pub struct Entry {
    key: SpoolKey,
    value: Vec<u8>,
    /// Its path time is the time it was consumed.
    consumed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt spool entry {key}: {why}")]
    Corrupt { key: String, why: &'static str },
    #[error("spool file error: {0}")]
    Io(#[from] std::io::Error),
}

/// Removals are written to their run's entry once this many gathered (or at [`Spool::flush`]):
/// a crash in between repeats at most this many uploads per run, identical ones.
const WRITE_REMOVALS_EVERY: u32 = 64;

/// Space on the spool's file system, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct DiskSpace {
    pub free: u64,
    pub total: u64,
}

/// The spool: a sled index of runs of records, their values in segment files.
#[derive(Debug)]
pub struct Spool {
    dir: std::path::PathBuf,
    options: SpoolOptions,
    db: sled::Db,
    index: sled::Tree,
    /// Boundaries of the Parquet format's sealed batches (`sealed.rs`).
    sealed: sled::Tree,
    /// Multipart uploads in progress (`uploads.rs`).
    uploads: sled::Tree,
    segments: Mutex<Segments>,
    /// Partition prefixes that have (or recently had) records.
    partitions: Mutex<BTreeSet<Vec<u8>>>,
    /// Woken when records are inserted.
    inserted: Notify,
    count: AtomicU64,
    bytes: AtomicU64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Spool, SpoolError> {
        Spool::open_with(dir, cache_bytes, SpoolOptions::default())
    }

    /// Opens the spool in `dir` for a test, waiting for the lock: right after a spool there was
    /// dropped, sled's file lock has been found still taken (its flusher thread lets go a moment
    /// later).
    #[cfg(test)]
    pub(crate) fn open_in_test(dir: &Path) -> Spool {
        Spool::open_in_test_with(dir, SpoolOptions::default())
    }

    /// [`Spool::open_in_test`] with the given options.
    #[cfg(test)]
    pub(crate) fn open_in_test_with(dir: &Path, options: SpoolOptions) -> Spool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Spool::open_with(dir, 1 << 20, options) {
                Err(SpoolError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
    }

    /// [`Spool::open`] with the given options. Those of the encoding apply to the records inserted
    /// from now on; records already in the spool are read back whatever options wrote them.
    ///
    /// Records whose value is not on disk whole (the OS crashed before writing it) are dropped:
    /// they were never committed, so Kafka delivers them again.
    pub fn open_with(dir: &Path, cache_bytes: u64, options: SpoolOptions) -> Result<Spool, SpoolError> {
        let values = dir.join("values");
        std::fs::create_dir_all(&values)?;
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).flush_every_ms(Some(500)).open()?;
        let index = db.open_tree(RUNS_TREE)?;
        move_record_index(&db, &index)?;
        let mut files = BTreeMap::new();
        for entry in std::fs::read_dir(&values)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let file = Arc::new(File::open(entry.path())?);
            let len = file.metadata()?.len();
            files.insert(id, Segment { file, len, live: 0, live_bytes: 0, unsynced: false });
        }
        let mut partitions = BTreeSet::new();
        let mut lost = 0;
        let mut changed = sled::Batch::default();
        for entry in index.iter() {
            let (k, v) = entry?;
            let mut run = Run::decode(&k, &v)?;
            let before = run.removed.clone();
            for (i, location) in run.locations().collect::<Vec<_>>().into_iter().enumerate() {
                if run.removed[i] {
                    continue;
                }
                let whole = match files.get(&location.segment) {
                    Some(s) => Segments::read(&s.file, location)?.is_some(),
                    None => false,
                };
                if !whole {
                    run.removed[i] = true;
                    lost += 1;
                    continue;
                }
                let segment = files.get_mut(&location.segment).expect("checked above");
                segment.live += 1;
                segment.live_bytes += u64::from(location.len);
            }
            if run.live() == 0 {
                changed.remove(k);
                continue;
            }
            if run.removed != before {
                changed.insert(k.clone(), run.encode());
            }
            partitions.insert(split_run_key(&k).0.prefix().to_vec());
        }
        index.apply_batch(changed)?;
        if lost > 0 {
            tracing::warn!(
                records = lost,
                "spool entries without their whole value on disk (the host crashed before writing them) were dropped; Kafka delivers these records again"
            );
        }
        let next_id = files.keys().next_back().map_or(0, |id| id + 1);
        let mut segments = Segments {
            dir: values,
            files,
            writer: None,
            next_id,
            removals: HashMap::new(),
            compact_failures: 0,
            compact_after: None,
            unflushed: false,
        };
        // Runs found empty were dropped: durable before their files go.
        index.flush()?;
        for id in segments.files.iter().filter(|(_, s)| s.live == 0).map(|(id, _)| *id).collect::<Vec<_>>() {
            segments.delete(id)?;
        }
        let (count, bytes) = segments.live();
        let spool = Spool {
            dir: dir.to_path_buf(),
            options,
            count: AtomicU64::new(count),
            bytes: AtomicU64::new(bytes),
            segments: Mutex::new(segments),
            sealed: db.open_tree(self::sealed::SEALED_TREE)?,
            uploads: db.open_tree(self::uploads::UPLOADS_TREE)?,
            db,
            index,
            partitions: Mutex::new(partitions),
            inserted: Notify::new(),
        };
        spool.move_legacy_records()?;
        Ok(spool)
    }

    fn segments(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().expect("spool lock")
    }

    /// Encodes a record for [`Spool::insert`]. The consumer does so outside any lock, straight
    /// from the message it fetched.
    pub fn entry(&self, topic: &str, partition: i32, offset: i64, fields: &Fields<'_>) -> Entry {
        Entry {
            key: SpoolKey::new(topic, partition, offset),
            value: encode_fields(fields, self.options),
            consumed: matches!(fields.time, RecordTime::Consumed(_)),
        }
    }

    /// [`Spool::insert`] of whole records.
    pub fn insert_batch(&self, records: &[Record]) -> Result<(), SpoolError> {
        let entries: Vec<Entry> =
            records.iter().map(|r| self.entry(&r.topic, r.partition, r.offset, &Fields::of(r))).collect();
        self.insert(&entries)
    }

    /// Stores a batch of records at once and wakes the uploaders. Records already in the spool
    /// are left as they are. After an error the batch is not in the spool, or (when its index
    /// entries could not be taken back) in it whole: either way the caller inserts it again.
    ///
    /// Only the appends to the value file, and reading which of the batch's offsets are spooled
    /// (a few index entries per partition), happen under the spool's lock; the rest (syncing,
    /// indexing, and the encoding before) is done outside it, so that the uploaders, which
    /// take the lock to read values and remove records on the async runtime's thread, never wait
    /// for sled or the disk, as they did while it was held for the whole batch (figures in
    /// `benches/results/HISTORY.md`, "Spool design notes").
    pub fn insert(&self, entries: &[Entry]) -> Result<(), SpoolError> {
        let mut sorted: Vec<&Entry> = entries.iter().collect();
        sorted.sort_by(|a, b| a.key.cmp(&b.key));
        sorted.dedup_by(|a, b| a.key == b.key);
        // Only the consumer inserts, so what is found here still holds when the batch is indexed
        // (an uploader only removes records, which at worst makes a record found live a removed
        // one: it is stored).
        let mut new = Vec::with_capacity(sorted.len());
        for part in sorted.chunk_by(|a, b| a.key.prefix() == b.key.prefix()) {
            let prefix = part[0].key.prefix();
            let (min, max) = (part[0].key.offset(), part[part.len() - 1].key.offset());
            let Around { live, ranges } = self.around(prefix, min, max)?;
            for e in part {
                let offset = e.key.offset();
                if live.contains(&offset) {
                    continue;
                }
                // The ranges of normal runs must not overlap: a record inside one (it was removed
                // from it and is delivered again) becomes a single, and a new run stays between
                // two existing ones.
                let gap = ranges.partition_point(|&(first, _)| first <= offset);
                let inside = gap > 0 && offset <= ranges[gap - 1].1;
                let kind = if inside { SINGLE } else { NORMAL };
                new.push(NewRecord { key: &e.key, value: &e.value, kind, gap, consumed: e.consumed });
            }
        }
        if new.is_empty() {
            // The consumer's retry of a batch whose entries stayed after a failure: durable now.
            if self.segments().unflushed {
                self.flush_index()?;
                self.segments().unflushed = false;
            }
            return Ok(());
        }
        // Synced before they are indexed when a record's path time is the time it was consumed;
        // otherwise when the OS writes them (see the module doc).
        let must_sync = new.iter().any(|n| n.consumed);
        let appended = {
            let mut segments = self.segments();
            // Entries a failed insert left behind are flushed with this batch's.
            let unflushed = segments.unflushed;
            let mut written = Vec::with_capacity(new.len());
            let values = new.iter().map(|n| n.value);
            match segments.append_all(values, &mut written, must_sync) {
                Ok(to_sync) => Ok((written, to_sync, unflushed)),
                Err(e) => {
                    // A failed write (a full disk) can leave part of a value in the file: append no
                    // more to it, and forget what this batch wrote; the caller fetches these
                    // records again.
                    segments.writer = None;
                    segments.forget(&written)?;
                    self.publish(&segments);
                    Err(e)
                }
            }
        };
        let (written, to_sync, unflushed) = appended?;
        // Values first, so that an index entry never points at bytes a reader cannot see.
        let runs = build_runs(new.iter().zip(&written).map(|(n, l)| (n.key, n.kind, n.gap, *l)));
        let mut batch = sled::Batch::default();
        let mut prefixes: Vec<Vec<u8>> = Vec::new();
        for r in &runs {
            if prefixes.last().is_none_or(|p| p.as_slice() != r.key.prefix()) {
                prefixes.push(r.key.prefix().to_vec());
            }
            batch.insert(run_key(&r.key, r.kind), r.run.encode());
        }
        let mut applied = false;
        let indexed = (|| -> Result<(), SpoolError> {
            for (id, file) in &to_sync {
                segments::sync_file(*id, file)?;
            }
            self.apply(batch)?;
            applied = true;
            if !to_sync.is_empty() || unflushed {
                self.flush_index()?;
            }
            Ok(())
        })();
        release_garbage();
        let mut segments = self.segments();
        if let Err(e) = indexed {
            // Entries that were applied point at the values: they go first, or the values stay.
            let unindexed = if applied { self.take_back(&mut segments, &runs) } else { Ok(written) };
            match unindexed {
                // Their files go only once the taken-back entries are durable: sled may have
                // flushed the entries on its own, and after a crash they would point at nothing.
                Ok(values) if !applied || self.flush_index().is_ok() => {
                    segments.forget(&values)?;
                    self.publish(&segments);
                }
                Ok(values) => {
                    for location in &values {
                        segments.release(*location);
                    }
                    self.publish(&segments);
                }
                Err(undo) => {
                    // The records are in the index: the consumer's retry of the batch finds them
                    // there, whole.
                    tracing::warn!(error = %undo, "the index entries of a batch whose insert failed could not be taken back; its records stay in the spool");
                    segments.unflushed = true;
                    self.publish(&segments);
                    drop(segments);
                    self.partitions.lock().expect("spool lock").extend(prefixes);
                    self.inserted.notify_one();
                }
            }
            return Err(e);
        }
        segments.unflushed &= !unflushed;
        // The batch is in: a compaction that fails now is no failure of the insert.
        self.compact_if_due(&mut segments);
        self.publish(&segments);
        drop(segments);
        self.partitions.lock().expect("spool lock").extend(prefixes);
        self.inserted.notify_one();
        Ok(())
    }

    /// Applies `batch` to the index.
    fn apply(&self, batch: sled::Batch) -> Result<(), SpoolError> {
        #[cfg(test)]
        faults::hit(faults::Point::ApplyIndex)?;
        Ok(self.index.apply_batch(batch)?)
    }

    /// Makes the index durable.
    fn flush_index(&self) -> Result<(), SpoolError> {
        #[cfg(test)]
        faults::hit(faults::Point::FlushIndex)?;
        self.index.flush()?;
        Ok(())
    }

    /// Takes the runs of an insert back out of the index (their keys were new) and returns where
    /// the values of their records still live are: an uploader may have removed some since they
    /// were indexed, which released those. Changes nothing when it fails. Called under the spool's
    /// lock.
    fn take_back(&self, segments: &mut Segments, runs: &[NewRun]) -> Result<Vec<Location>, SpoolError> {
        let keys: Vec<Vec<u8>> = runs.iter().map(|r| run_key(&r.key, r.kind)).collect();
        let mut undo = sled::Batch::default();
        let mut live = Vec::new();
        for k in &keys {
            if let Some(v) = self.index.get(k)? {
                let run = self.run(segments, k, &v)?;
                live.extend(run.live_offsets(split_run_key(k).0.offset()).map(|(_, location)| location));
            }
            undo.remove(k.as_slice());
        }
        self.apply(undo)?;
        for k in &keys {
            segments.removals.remove(k);
        }
        Ok(live)
    }

    fn publish(&self, segments: &Segments) {
        let (count, bytes) = segments.live();
        self.count.store(count, Ordering::Relaxed);
        self.bytes.store(bytes, Ordering::Relaxed);
    }

    /// Up to `max` records of one partition in offset order, passing over keys `skip` accepts,
    /// and stopping once their values reach `max_bytes` (at least one record is returned).
    ///
    /// A record delivered again after it was removed is read after the run it was removed from.
    pub fn pending(
        &self,
        prefix: &[u8],
        mut skip: impl FnMut(&SpoolKey) -> bool,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(SpoolKey, Record)>, SpoolError> {
        // Which records, under the lock that removals take, so that none removed is read; their
        // values outside it.
        let mut wanted = Vec::new();
        {
            let segments = self.segments();
            'runs: for entry in self.index.scan_prefix(prefix) {
                let (k, v) = entry?;
                let run = self.run(&segments, &k, &v)?;
                let first = split_run_key(&k).0;
                for (key, location) in run.live_records(&first) {
                    if skip(&key) {
                        continue;
                    }
                    wanted.push((key, location));
                    if wanted.len() >= max {
                        break 'runs;
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(wanted.len());
        let mut bytes = 0;
        for (key, location) in wanted {
            let Some(raw) = self.value(&key, location)? else {
                continue;
            };
            let record = decode_entry(&key, raw.into())?;
            bytes += record.value_bytes().len();
            out.push((key, record));
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The encoded value of `key`, read at `location`; `None` when the record was removed since
    /// its location was read.
    fn value(&self, key: &SpoolKey, mut location: Location) -> Result<Option<Vec<u8>>, SpoolError> {
        loop {
            let file = self.segments().files.get(&location.segment).map(|s| s.file.clone());
            if let Some(file) = file
                && let Some(value) = Segments::read(&file, location)?
            {
                return Ok(Some(value));
            }
            // Gone, or moved by a compaction since the index was read: look again.
            let segments = self.segments();
            let Some((_, run, slot)) = self.find(&segments, key)? else { return Ok(None) };
            let now = run.locations().nth(slot).expect("the slot exists");
            if now == location {
                return Err(SpoolError::Corrupt { key: key.describe(), why: "value missing or damaged" });
            }
            location = now;
        }
    }

    /// Every key in the spool (start-up recovery).
    pub fn keys(&self) -> Result<Vec<SpoolKey>, SpoolError> {
        let segments = self.segments();
        let mut keys = Vec::new();
        for entry in self.index.iter() {
            let (k, v) = entry?;
            let run = self.run(&segments, &k, &v)?;
            keys.extend(run.live_records(&split_run_key(&k).0).map(|(key, _)| key));
        }
        Ok(keys)
    }

    /// Removes a record whose objects are stored.
    ///
    /// The removal reaches the run's entry with the run's next removals (every 64),
    /// at [`Spool::flush`], or when the run empties and its entry goes. One lost in a crash repeats
    /// an identical upload (design invariant 3), as it did when sled's periodic flush was the only
    /// thing making removals durable.
    pub fn remove(&self, key: &SpoolKey) -> Result<(), SpoolError> {
        self.remove_all(std::slice::from_ref(key))
    }

    /// Removes the records of `keys`, in key order (an object's records), as [`Spool::remove`]
    /// would one after the other, with the lock taken once and each run read and written once:
    /// removed one by one, a run of n records was decoded n times (13.8 % of the Parquet format's
    /// CPU was removals).
    pub fn remove_all(&self, keys: &[SpoolKey]) -> Result<(), SpoolError> {
        let mut segments = self.segments();
        let result = self.remove_under_lock(&mut segments, keys);
        self.publish(&segments);
        drop(segments);
        release_garbage();
        result
    }

    fn remove_under_lock(&self, segments: &mut Segments, keys: &[SpoolKey]) -> Result<(), SpoolError> {
        // The run at hand: its key, the run, its values' locations, removals not in its entry.
        let mut open: Option<(Vec<u8>, Run, Vec<Location>, u32)> = None;
        for key in keys {
            let held = open.as_ref().and_then(|(k, run, _, _)| {
                let (first, kind) = split_run_key(k);
                let delta = u64::try_from(key.offset() - first.offset()).ok()?;
                let slot = (first.prefix() == key.prefix() && (kind == NORMAL || delta == 0)).then(|| run.slot(delta));
                // A removed slot may have been delivered again into a single run: find() looks.
                slot.flatten().filter(|&slot| !run.removed[slot])
            });
            let slot = match held {
                Some(slot) => slot,
                None => {
                    if let Some((k, run, _, unwritten)) = open.take() {
                        self.put_removals(segments, k, run, unwritten)?;
                    }
                    let Some((k, run, slot)) = self.find(segments, key)? else { continue };
                    let unwritten = segments.removals.remove(&k).map_or(0, |r| r.unwritten);
                    let locations = run.locations().collect();
                    open = Some((k, run, locations, unwritten));
                    slot
                }
            };
            let (_, run, locations, unwritten) = open.as_mut().expect("a run is open");
            run.removed[slot] = true;
            *unwritten += 1;
            if let Some(empty) = segments.release(locations[slot]) {
                // The removals must be durable before the values go: an entry that came back in a
                // crash without its value would be fetched again, and a record without a Kafka
                // timestamp would then get another time, so another path.
                let (k, run, locations, unwritten) = open.take().expect("a run is open");
                let live = run.live();
                self.put_removals(segments, k.clone(), run, unwritten)?;
                self.index.flush()?;
                segments.delete(empty)?;
                if live > 0 {
                    // Taken up again as put_removals left it.
                    if let Some(v) = self.index.get(&k)? {
                        let run = self.run(segments, &k, &v)?;
                        let unwritten = segments.removals.remove(&k).map_or(0, |r| r.unwritten);
                        open = Some((k, run, locations, unwritten));
                    }
                }
            }
        }
        if let Some((k, run, _, unwritten)) = open.take() {
            self.put_removals(segments, k, run, unwritten)?;
        }
        Ok(())
    }

    /// Puts a run's removals where [`Spool::remove_all`] keeps them: the entry goes when the run
    /// is empty, is written again every [`WRITE_REMOVALS_EVERY`] removals, else they wait.
    fn put_removals(&self, segments: &mut Segments, k: Vec<u8>, run: Run, unwritten: u32) -> Result<(), SpoolError> {
        if run.live() == 0 {
            self.index.remove(&k)?;
        } else if unwritten >= WRITE_REMOVALS_EVERY {
            self.index.insert(&k, run.encode())?;
        } else if unwritten > 0 {
            segments.removals.insert(k, Removals { removed: run.removed, unwritten });
        }
        Ok(())
    }

    /// Partition prefixes with records; forgets those found empty.
    pub fn partitions(&self) -> Vec<Vec<u8>> {
        let mut set = self.partitions.lock().expect("spool lock");
        set.retain(|p| self.index.scan_prefix(p).next().is_some());
        set.iter().cloned().collect()
    }

    /// Waits until records are inserted.
    pub async fn inserted(&self) {
        self.inserted.notified().await
    }

    pub fn record_count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Bytes of the records in the spool, as stored (the value files take at most a quarter of the
    /// spool's bound more, plus 32 MiB).
    pub fn byte_count(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Free space on the spool's file system (`u64::MAX` when it cannot be read).
    pub fn available_space(&self) -> u64 {
        self.disk_space().map_or(u64::MAX, |d| d.free)
    }

    /// The spool's file system: free space (for the archiver) and size, when they can be read.
    pub fn disk_space(&self) -> Option<DiskSpace> {
        let stats = fs4::statvfs(&self.dir).ok()?;
        Some(DiskSpace { free: stats.available_space(), total: stats.total_space() })
    }

    /// Makes every earlier write durable, removals included.
    pub fn flush(&self) -> Result<(), SpoolError> {
        let mut segments = self.segments();
        let mut batch = sled::Batch::default();
        for (k, removals) in segments.removals.drain() {
            if let Some(v) = self.index.get(&k)? {
                let mut run = Run::decode(&k, &v)?;
                run.removed = removals.removed;
                batch.insert(k, run.encode());
            }
        }
        self.index.apply_batch(batch)?;
        segments.finish(true)?;
        self.db.flush()?;
        Ok(())
    }
}
