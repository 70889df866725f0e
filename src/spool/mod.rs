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
//! rewrites a node on every change: with the values inline, a spool of 10,000 records of 1 KB held
//! about 28 MiB of memory while it was filled and drained at once (heaptrack, load benchmark), and
//! with an entry per record, sled's per-entry cost bounded the ingest below 100,000 records/s. A
//! segment file is deleted once none of its records is left, and the oldest is rewritten when
//! removed records would otherwise pile up on disk behind one that stays. A rewrite is all or
//! nothing: one that fails (a full disk) leaves the file and its index entries as they were, and is
//! tried again later.
//!
//! Durability: sled makes the index durable on its periodic flush, and values reach the disk when
//! the OS writes them, not at once. That is enough because Kafka still holds every record that is
//! not committed, and nothing is committed before its objects are stored: an insert lost in a
//! crash is fetched again, a removal lost in a crash repeats an identical upload (removals reach
//! their run's entry every 64, when the run empties, and at
//! [`Spool::flush`]), and a record whose value did not reach the disk (it fails its length or CRC
//! check) is dropped when the spool is opened, so it is fetched again. The exception is a record without a Kafka
//! timestamp, whose path comes from the time it was consumed: [`Spool::insert_batch`] syncs the
//! values and the index before returning when a batch holds one, so a retry never sees another
//! time.
//!
//! Large values are compressed with zstd when that saves at least an eighth of them
//! ([`SpoolOptions::compress_min_bytes`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::record::{Record, RecordTime};

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt spool entry {key}: {why}")]
    Corrupt { key: String, why: &'static str },
    #[error("spool file error: {0}")]
    Io(#[from] std::io::Error),
}

/// The spool key of a record: topic length, topic, partition, offset (big endian, so that sled's
/// byte order is offset order within a partition).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpoolKey(pub Vec<u8>);

impl SpoolKey {
    pub fn new(topic: &str, partition: i32, offset: i64) -> SpoolKey {
        let mut k = partition_prefix(topic, partition);
        k.extend_from_slice(&(offset as u64).to_be_bytes());
        SpoolKey(k)
    }

    /// The (topic, partition, offset) this key stands for.
    pub fn parts(&self) -> Option<(&str, i32, i64)> {
        let k = &self.0;
        let n = usize::from(*k.first()?);
        if k.len() != 1 + n + 12 {
            return None;
        }
        let topic = std::str::from_utf8(&k[1..1 + n]).ok()?;
        let partition = i32::from_be_bytes(k[1 + n..5 + n].try_into().ok()?);
        let offset = i64::from_be_bytes(k[5 + n..13 + n].try_into().ok()?);
        Some((topic, partition, offset))
    }

    /// The partition part of the key.
    pub fn prefix(&self) -> &[u8] {
        &self.0[..self.0.len().saturating_sub(8)]
    }

    /// The key of `offset` in the partition of `prefix`.
    fn at(prefix: &[u8], offset: i64) -> SpoolKey {
        let mut k = Vec::with_capacity(prefix.len() + 8);
        k.extend_from_slice(prefix);
        k.extend_from_slice(&(offset as u64).to_be_bytes());
        SpoolKey(k)
    }

    /// The offset part of the key.
    fn offset(&self) -> i64 {
        let at = self.0.len().saturating_sub(8);
        self.0.get(at..).and_then(|b| b.try_into().ok()).map_or(0, i64::from_be_bytes)
    }

    fn describe(&self) -> String {
        match self.parts() {
            Some((t, p, o)) => format!("{t}+{p}+{o}"),
            None => format!("{:02x?}", self.0),
        }
    }
}

/// The key prefix shared by all records of one partition.
pub fn partition_prefix(topic: &str, partition: i32) -> Vec<u8> {
    debug_assert!(topic.len() <= 255, "Kafka topic names are at most 249 bytes");
    let mut k = Vec::with_capacity(1 + topic.len() + 12);
    k.push(topic.len() as u8);
    k.extend_from_slice(topic.as_bytes());
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

const FORMAT_VERSION: u8 = 1;
const FLAG_CONSUMED_TIME: u8 = 1;
const FLAG_ZSTD: u8 = 2;
const FLAG_KEY: u8 = 4;
/// Values at least this large are tried with zstd.
const COMPRESS_MIN_BYTES: usize = 16 * 1024;
/// See [`SpoolOptions::flush_bytes`].
const FLUSH_BYTES: u64 = 4 << 20;
/// Largest value the spool accepts back from disk (guards decompression against corruption).
const MAX_VALUE_BYTES: usize = 1 << 31;

/// How the spool stores records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Values at least this large are tried with zstd; `None` stores every value as is.
    pub compress_min_bytes: Option<usize>,
    /// Inserts sync the values and the index once this many bytes were written since the last
    /// sync, so that an OS crash loses (and Kafka delivers again) at most about this much.
    pub flush_bytes: u64,
}

impl Default for SpoolOptions {
    /// Values of 16 KiB and more are tried with zstd.
    fn default() -> SpoolOptions {
        SpoolOptions { compress_min_bytes: Some(COMPRESS_MIN_BYTES), flush_bytes: FLUSH_BYTES }
    }
}

/// Encodes a record's value side: version, flags, time, optional key, value.
pub fn encode_value(r: &Record) -> Vec<u8> {
    encode_value_with(r, SpoolOptions::default())
}

/// [`encode_value`] with the given options.
fn encode_value_with(r: &Record, options: SpoolOptions) -> Vec<u8> {
    let mut flags = 0;
    if matches!(r.time, RecordTime::Consumed(_)) {
        flags |= FLAG_CONSUMED_TIME;
    }
    if r.key.is_some() {
        flags |= FLAG_KEY;
    }
    let compressed = options
        .compress_min_bytes
        .is_some_and(|min| r.value.len() >= min)
        .then(|| zstd::bulk::compress(&r.value, 1).ok())
        .flatten()
        .filter(|c| c.len() + r.value.len() / 8 <= r.value.len());
    if compressed.is_some() {
        flags |= FLAG_ZSTD;
    }
    let key_len = r.key.as_ref().map_or(0, |k| 4 + k.len());
    let mut out = Vec::with_capacity(10 + key_len + 4 + r.value.len());
    out.push(FORMAT_VERSION);
    out.push(flags);
    out.extend_from_slice(&r.time.millis().to_be_bytes());
    if let Some(k) = &r.key {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
    }
    match compressed {
        Some(c) => {
            out.extend_from_slice(&(r.value.len() as u32).to_be_bytes());
            out.extend_from_slice(&c);
        }
        None => out.extend_from_slice(&r.value),
    }
    out
}

/// Decodes a spool entry back into a record.
pub fn decode_entry(key: &SpoolKey, raw: &[u8]) -> Result<Record, SpoolError> {
    let corrupt = |why| SpoolError::Corrupt { key: key.describe(), why };
    let (topic, partition, offset) = key.parts().ok_or_else(|| corrupt("bad key"))?;
    if raw.len() < 10 || raw[0] != FORMAT_VERSION {
        return Err(corrupt("unknown format"));
    }
    let flags = raw[1];
    let ms = i64::from_be_bytes(raw[2..10].try_into().expect("8 bytes"));
    let mut rest = &raw[10..];
    let take_len = |rest: &mut &[u8]| -> Result<usize, SpoolError> {
        let (n, tail) = rest.split_first_chunk::<4>().ok_or_else(|| corrupt("cut short"))?;
        *rest = tail;
        Ok(u32::from_be_bytes(*n) as usize)
    };
    let record_key = if flags & FLAG_KEY != 0 {
        let n = take_len(&mut rest)?;
        let k = rest.get(..n).ok_or_else(|| corrupt("key cut short"))?;
        rest = &rest[n..];
        Some(Bytes::copy_from_slice(k))
    } else {
        None
    };
    let value = if flags & FLAG_ZSTD != 0 {
        let n = take_len(&mut rest)?;
        if n > MAX_VALUE_BYTES {
            return Err(corrupt("value too large"));
        }
        Bytes::from(zstd::bulk::decompress(rest, n)?)
    } else {
        Bytes::copy_from_slice(rest)
    };
    let time = if flags & FLAG_CONSUMED_TIME != 0 { RecordTime::Consumed(ms) } else { RecordTime::Kafka(ms) };
    Ok(Record { topic: topic.to_string(), partition, offset, time, key: record_key, value })
}

/// A value file is closed for appends once it reaches this size.
const SEGMENT_BYTES: u64 = 16 << 20;
/// Bytes buffered before they are written to the value file.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// A compaction that failed is tried again after this long, doubled after each failure in a row up
/// to 16 times as long, not at every batch: each attempt reads and writes a file's records again,
/// and one that fails part-way leaves what it appended as garbage until that file is compacted.
const COMPACT_RETRY: Duration = Duration::from_secs(10);
/// The sled tree of the index: one entry per run of records (see [`Run`]).
const RUNS_TREE: &str = "runs";
/// Spools written before runs had one entry per record in the tree "index", and before the value
/// files kept the values in the tree "records"; [`Spool::open`] moves both.
const RECORD_INDEX_TREE: &str = "index";
const LEGACY_TREE: &str = "records";
/// Version byte of a per-record entry of the tree "index".
const LOCATION_VERSION: u8 = 1;
/// Version byte of a run entry.
const RUN_VERSION: u8 = 2;
/// Most records in one run.
const MAX_RUN: usize = 512;
/// Removals are written to their run's entry once this many gathered (or at [`Spool::flush`]):
/// a crash in between repeats at most this many uploads per run, identical ones.
const WRITE_REMOVALS_EVERY: u32 = 64;
/// The last byte of a run's key. A normal run holds records of consecutive spooled offsets of one
/// partition, and the offset ranges of normal runs never overlap. A single holds one record whose
/// offset lies inside a normal run's range: one delivered again after it was removed from that run.
const NORMAL: u8 = 0;
const SINGLE: u8 = 1;

/// Where a record's encoded value is: segment file, position, length and CRC-32 of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    segment: u32,
    position: u64,
    len: u32,
    crc: u32,
}

impl Location {
    /// Reads an entry of the per-record index of older spools.
    fn decode(key: &[u8], raw: &[u8]) -> Result<Location, SpoolError> {
        if raw.len() != 21 || raw[0] != LOCATION_VERSION {
            return Err(SpoolError::Corrupt { key: SpoolKey(key.to_vec()).describe(), why: "unknown index entry" });
        }
        let be4 = |i: usize| u32::from_be_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
        Ok(Location {
            segment: be4(1),
            position: u64::from_be_bytes(raw[5..13].try_into().expect("8 bytes")),
            len: be4(13),
            crc: be4(17),
        })
    }
}

/// One record of a run: its offset after the run's first, the length and CRC-32 of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    delta: u32,
    len: u32,
    crc: u32,
}

/// Records of one partition whose values lie one after another in one value file, indexed by one
/// sled entry. sled copies a tree node on every change and splits its leaves above 16 entries, so
/// an entry per record bounded the spool's ingest at sled's per-entry cost (91,000-96,000 records
/// of 1 KB per second on the test VM for sled alone, against 2.9-4.6 million with one entry per
/// 100 records).
///
/// The entry's key is the record key of the run's first offset followed by its kind ([`NORMAL`] or
/// [`SINGLE`]); the value holds the file, the position of the first value, the slots and which of
/// them were removed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Run {
    segment: u32,
    position: u64,
    slots: Vec<Slot>,
    removed: Vec<bool>,
}

impl Run {
    fn encode(&self) -> Vec<u8> {
        let n = self.slots.len();
        let mut out = Vec::with_capacity(15 + 12 * n + n.div_ceil(8));
        out.push(RUN_VERSION);
        out.extend_from_slice(&self.segment.to_be_bytes());
        out.extend_from_slice(&self.position.to_be_bytes());
        out.extend_from_slice(&(n as u16).to_be_bytes());
        for s in &self.slots {
            out.extend_from_slice(&s.delta.to_be_bytes());
            out.extend_from_slice(&s.len.to_be_bytes());
            out.extend_from_slice(&s.crc.to_be_bytes());
        }
        for bits in self.removed.chunks(8) {
            out.push(bits.iter().enumerate().fold(0, |b, (i, &r)| b | (u8::from(r) << i)));
        }
        out
    }

    fn decode(key: &[u8], raw: &[u8]) -> Result<Run, SpoolError> {
        let corrupt = || SpoolError::Corrupt {
            key: SpoolKey(key[..key.len() - 1].to_vec()).describe(),
            why: "unknown run entry",
        };
        if raw.len() < 15 || raw[0] != RUN_VERSION {
            return Err(corrupt());
        }
        let be4 = |i: usize| u32::from_be_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
        let n = usize::from(u16::from_be_bytes([raw[13], raw[14]]));
        if n == 0 || raw.len() != 15 + 12 * n + n.div_ceil(8) {
            return Err(corrupt());
        }
        let slots = (0..n).map(|i| 15 + 12 * i).map(|at| Slot { delta: be4(at), len: be4(at + 4), crc: be4(at + 8) });
        let bits = &raw[15 + 12 * n..];
        Ok(Run {
            segment: be4(1),
            position: u64::from_be_bytes(raw[5..13].try_into().expect("8 bytes")),
            slots: slots.collect(),
            removed: (0..n).map(|i| bits[i / 8] & (1 << (i % 8)) != 0).collect(),
        })
    }

    /// Where each slot's value is.
    fn locations(&self) -> impl Iterator<Item = Location> + '_ {
        let mut position = self.position;
        self.slots.iter().map(move |s| {
            let at = position;
            position += u64::from(s.len);
            Location { segment: self.segment, position: at, len: s.len, crc: s.crc }
        })
    }

    fn live(&self) -> usize {
        self.removed.iter().filter(|r| !**r).count()
    }

    /// The records not removed: slot, record key and where the value is. `first` is the key of the
    /// run's first offset.
    fn live_records<'a>(&'a self, first: &'a SpoolKey) -> impl Iterator<Item = (usize, SpoolKey, Location)> + 'a {
        self.slots.iter().zip(self.locations()).enumerate().filter(|(i, _)| !self.removed[*i]).map(
            move |(i, (slot, location))| {
                (i, SpoolKey::at(first.prefix(), first.offset() + i64::from(slot.delta)), location)
            },
        )
    }

    /// The slot holding `delta`, if any.
    fn slot(&self, delta: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&delta, |s| u64::from(s.delta)).ok()
    }
}

/// The key of a run whose first record has `key`.
fn run_key(key: &SpoolKey, kind: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.0.len() + 1);
    k.extend_from_slice(&key.0);
    k.push(kind);
    k
}

/// The record key of a run's first offset, and the run's kind.
fn split_run_key(k: &[u8]) -> (SpoolKey, u8) {
    let (kind, key) = k.split_last().expect("run keys are not empty");
    (SpoolKey(key.to_vec()), *kind)
}

/// The runs of a partition that hold offsets in a range, or whose range covers them.
struct Around {
    /// The offsets they hold that are not removed.
    live: HashSet<i64>,
    /// The (first, last) offsets of the normal ones, in order.
    ranges: Vec<(i64, i64)>,
}

/// A record of a batch that the spool does not hold yet, encoded.
struct NewRecord<'a> {
    key: &'a SpoolKey,
    value: Vec<u8>,
    kind: u8,
    /// See [`NewRun::gap`].
    gap: usize,
    /// Its path time is the time it was consumed.
    consumed: bool,
}

/// A run being built from appended values: records are added while they extend it.
struct NewRun {
    key: SpoolKey,
    kind: u8,
    /// Which gap between existing normal runs its records lie in (see [`Spool::insert_batch`]).
    gap: usize,
    /// Where its last value ends.
    end: u64,
    run: Run,
}

/// Groups appended records (in key order) into runs: a record joins the run before it when both
/// are normal, of the same partition and gap, and its value follows in the same file.
fn build_runs<'a>(records: impl Iterator<Item = (&'a SpoolKey, u8, usize, Location)>) -> Vec<NewRun> {
    let mut runs: Vec<NewRun> = Vec::new();
    for (key, kind, gap, location) in records {
        let offset = key.offset();
        if let Some(last) = runs.last_mut()
            && kind == NORMAL
            && last.kind == NORMAL
            && last.gap == gap
            && last.key.prefix() == key.prefix()
            && last.run.segment == location.segment
            && last.end == location.position
            && last.run.slots.len() < MAX_RUN
            && let Ok(delta) = u32::try_from(offset - last.key.offset())
        {
            last.run.slots.push(Slot { delta, len: location.len, crc: location.crc });
            last.run.removed.push(false);
            last.end += u64::from(location.len);
            continue;
        }
        runs.push(NewRun {
            key: key.clone(),
            kind,
            gap,
            end: location.position + u64::from(location.len),
            run: Run {
                segment: location.segment,
                position: location.position,
                slots: vec![Slot { delta: 0, len: location.len, crc: location.crc }],
                removed: vec![false],
            },
        });
    }
    runs
}

/// One value file.
#[derive(Debug)]
struct Segment {
    /// Opened for reading; shared with readers outside the lock.
    file: Arc<File>,
    len: u64,
    live: u64,
    live_bytes: u64,
}

/// The value files, and the one being appended to. Removals and compactions change the index under
/// the lock of this struct; an insert appends and counts its values under it, then indexes them
/// outside it. So a count may include records that are about to be indexed, never one that left.
#[derive(Debug)]
struct Segments {
    dir: PathBuf,
    files: BTreeMap<u32, Segment>,
    /// The file being appended to, with its id.
    writer: Option<(u32, BufWriter<File>)>,
    next_id: u32,
    /// Value bytes written since the last sync.
    unsynced: u64,
    /// Runs with removals not yet written to their entry, by run key.
    removals: HashMap<Vec<u8>, Removals>,
    /// Compactions that failed in a row, and when the next may be tried.
    compact_failures: u32,
    compact_after: Option<Instant>,
    /// Index entries were left in place after a failed insert, perhaps not durably: the next insert
    /// flushes the index before it returns, even when it finds the whole batch present.
    unflushed: bool,
}

/// A run's removed slots, ahead of its entry.
#[derive(Debug)]
struct Removals {
    removed: Vec<bool>,
    /// Removals since the entry was written.
    unwritten: u32,
}

impl Segments {
    fn path(dir: &Path, id: u32) -> PathBuf {
        dir.join(format!("{id:010}.seg"))
    }

    /// Appends a value to the current file (starting a new one when it is full).
    fn append(&mut self, value: &[u8]) -> Result<Location, SpoolError> {
        #[cfg(test)]
        faults::hit(faults::Point::Append)?;
        let full = self.writer.as_ref().is_some_and(|(id, _)| self.files[id].len >= SEGMENT_BYTES);
        if full && let Some((_, mut out)) = self.writer.take() {
            out.flush()?;
        }
        if self.writer.is_none() {
            let id = self.next_id;
            self.next_id += 1;
            let path = Segments::path(&self.dir, id);
            let out = File::options().create_new(true).append(true).open(&path)?;
            let file = Arc::new(File::open(&path)?);
            self.files.insert(id, Segment { file, len: 0, live: 0, live_bytes: 0 });
            self.writer = Some((id, BufWriter::with_capacity(WRITE_BUFFER_BYTES, out)));
        }
        let (id, out) = self.writer.as_mut().expect("a writer was just opened");
        out.write_all(value)?;
        let segment = self.files.get_mut(id).expect("the writer's file is known");
        let location =
            Location { segment: *id, position: segment.len, len: value.len() as u32, crc: crc32fast::hash(value) };
        segment.len += value.len() as u64;
        segment.live += 1;
        segment.live_bytes += value.len() as u64;
        self.unsynced += value.len() as u64;
        Ok(location)
    }

    /// Appends a batch's values and makes them readable; `written` gets their locations. Returns
    /// the files to sync before they are indexed: those the batch wrote to, when `sync` is asked
    /// or `flush_bytes` were written since the last sync; none otherwise.
    fn append_all<'a>(
        &mut self,
        values: impl Iterator<Item = &'a [u8]>,
        written: &mut Vec<Location>,
        sync: bool,
        flush_bytes: u64,
    ) -> Result<Vec<Arc<File>>, SpoolError> {
        for value in values {
            written.push(self.append(value)?);
        }
        self.finish(false)?;
        if !sync && self.unsynced < flush_bytes {
            return Ok(Vec::new());
        }
        self.unsynced = 0;
        let mut ids: Vec<u32> = written.iter().map(|l| l.segment).collect();
        ids.dedup();
        Ok(ids.iter().filter_map(|id| self.files.get(id)).map(|s| s.file.clone()).collect())
    }

    /// Takes back values that were appended but will not be indexed; deletes the files left empty.
    /// All are released before a file is deleted, and every deletion is tried, so that a deletion
    /// that fails leaves no value counted that is not indexed; the first error is returned.
    fn forget(&mut self, written: &[Location]) -> Result<(), SpoolError> {
        let mut empty: Vec<u32> = written.iter().filter_map(|l| self.release(*l)).collect();
        empty.dedup();
        empty.into_iter().map(|id| self.delete(id)).fold(Ok(()), Result::and)
    }

    /// Makes the values at `written` durable: syncs every file they lie in (appends that went past
    /// [`SEGMENT_BYTES`] lie in two).
    fn sync(&mut self, written: &[Location]) -> Result<(), SpoolError> {
        self.finish(false)?;
        let mut ids: Vec<u32> = written.iter().map(|l| l.segment).collect();
        ids.dedup();
        for id in ids {
            if let Some(segment) = self.files.get(&id) {
                #[cfg(test)]
                faults::hit(faults::Point::Sync(id))?;
                segment.file.sync_data()?;
            }
        }
        Ok(())
    }

    /// Makes what was appended readable; with `sync`, durable.
    fn finish(&mut self, sync: bool) -> Result<(), SpoolError> {
        if let Some((_, out)) = &mut self.writer {
            out.flush()?;
            if sync {
                out.get_ref().sync_data()?;
            }
        }
        if sync {
            self.unsynced = 0;
        }
        Ok(())
    }

    /// A record at `location` left the index; returns its file when none of its records is left.
    fn release(&mut self, location: Location) -> Option<u32> {
        let segment = self.files.get_mut(&location.segment)?;
        segment.live = segment.live.saturating_sub(1);
        segment.live_bytes = segment.live_bytes.saturating_sub(u64::from(location.len));
        if segment.live > 0 {
            return None;
        }
        if self.writer.as_ref().is_some_and(|(id, _)| *id == location.segment) {
            self.writer = None;
        }
        Some(location.segment)
    }

    fn delete(&mut self, id: u32) -> Result<(), SpoolError> {
        #[cfg(test)]
        faults::hit(faults::Point::Delete(id))?;
        self.files.remove(&id);
        match std::fs::remove_file(Segments::path(&self.dir, id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    fn read(file: &File, location: Location) -> std::io::Result<Option<Vec<u8>>> {
        let mut buf = vec![0; location.len as usize];
        match file.read_exact_at(&mut buf, location.position) {
            Ok(()) => Ok((crc32fast::hash(&buf) == location.crc).then_some(buf)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn disk_bytes(&self) -> u64 {
        self.files.values().map(|s| s.len).sum()
    }

    fn live(&self) -> (u64, u64) {
        self.files.values().fold((0, 0), |(n, b), s| (n + s.live, b + s.live_bytes))
    }

    /// The oldest file other than the current one, when removed records take more room on disk
    /// than a quarter of the records left, and more than two files: so the files never take more
    /// than 1.25 times the records plus 32 MiB.
    fn to_compact(&self) -> Option<u32> {
        let (_, live_bytes) = self.live();
        let garbage = self.disk_bytes() - live_bytes;
        if garbage <= (live_bytes / 4).max(2 * SEGMENT_BYTES) {
            return None;
        }
        let current = self.writer.as_ref().map(|(id, _)| *id);
        self.files.keys().copied().find(|id| Some(*id) != current)
    }
}

/// Hands the garbage this thread left in sled to the epoch collector now. sled frees replaced
/// tree nodes and written 512 KiB log buffers through crossbeam-epoch, which keeps them in a
/// thread-local bag until 64 have gathered: a consumer paused under backpressure could hold its last
/// ones for as long as the pause lasted, and a resume burst stacked new ones on top. The largest
/// rise of RSS at a resume over a 200,000-record backlog (ad hoc, garage): 1.5-3.8 MiB in four
/// runs without, 1.5 MiB with; with the 80 % resume watermark as well, 1.1 MiB. The spool alone,
/// driven like a long backlog under heaptrack: peak heap 31.8 MiB after 100,000 records and
/// 33.9-35.8 after 1,000,000 without; 31.9-32.3 and 32.0-33.7 with. Its cost does not show in
/// `cargo bench` (spool_drain 259,000 / 241,000 records/s, 264,000 / 239,000 before).
fn release_garbage() {
    crossbeam_epoch::pin().flush();
}

/// The spool: a sled index of runs of records, their values in segment files.
#[derive(Debug)]
pub struct Spool {
    dir: std::path::PathBuf,
    options: SpoolOptions,
    db: sled::Db,
    index: sled::Tree,
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

    /// [`Spool::open`] with the given options. They apply to the records inserted from now on;
    /// records already in the spool are read back whatever options wrote them.
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
            files.insert(id, Segment { file, len, live: 0, live_bytes: 0 });
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
            unsynced: 0,
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
            db,
            index,
            partitions: Mutex::new(partitions),
            inserted: Notify::new(),
        };
        spool.move_legacy_records()?;
        Ok(spool)
    }

    /// Moves the records of a spool written with the values inside sled into this layout.
    fn move_legacy_records(&self) -> Result<(), SpoolError> {
        if !self.db.tree_names().iter().any(|n| n.as_ref() == LEGACY_TREE.as_bytes()) {
            return Ok(());
        }
        let legacy = self.db.open_tree(LEGACY_TREE)?;
        let mut records = Vec::new();
        for entry in legacy.iter() {
            let (k, v) = entry?;
            records.push(decode_entry(&SpoolKey(k.to_vec()), &v)?);
            if records.len() == 1000 {
                self.insert_batch(&std::mem::take(&mut records))?;
            }
        }
        self.insert_batch(&records)?;
        self.flush()?;
        self.db.drop_tree(LEGACY_TREE)?;
        Ok(())
    }

    fn segments(&self) -> MutexGuard<'_, Segments> {
        self.segments.lock().expect("spool lock")
    }

    /// A run as it stands: its entry with the removals not yet written to it. Called under the
    /// spool's lock, which removals take.
    fn run(&self, segments: &Segments, key: &[u8], raw: &[u8]) -> Result<Run, SpoolError> {
        let mut run = Run::decode(key, raw)?;
        if let Some(r) = segments.removals.get(key) {
            run.removed.clone_from(&r.removed);
        }
        Ok(run)
    }

    /// The run holding the record `key` and its slot, if the record is in the spool. Called under
    /// the spool's lock.
    fn find(&self, segments: &Segments, key: &SpoolKey) -> Result<Option<(Vec<u8>, Run, usize)>, SpoolError> {
        let single = run_key(key, SINGLE);
        if let Some(v) = self.index.get(&single)? {
            return Ok(Some((single.clone(), self.run(segments, &single, &v)?, 0)));
        }
        let Some((k, v)) = self.normal_before(key.prefix(), &single)? else { return Ok(None) };
        let run = self.run(segments, &k, &v)?;
        let first = split_run_key(&k).0;
        let found = u64::try_from(key.offset() - first.offset()).ok().and_then(|d| run.slot(d));
        Ok(found.filter(|&i| !run.removed[i]).map(|i| (k.to_vec(), run, i)))
    }

    /// The normal run of partition `prefix` with the greatest key below `key`; singles in between
    /// are passed (a single covers its own offset only).
    fn normal_before(&self, prefix: &[u8], key: &[u8]) -> Result<Option<(sled::IVec, sled::IVec)>, SpoolError> {
        let mut below = self.index.get_lt(key)?;
        while let Some((k, v)) = below {
            let (first, kind) = split_run_key(&k);
            if first.prefix() != prefix {
                return Ok(None);
            }
            if kind == NORMAL {
                return Ok(Some((k, v)));
            }
            below = self.index.get_lt(&k)?;
        }
        Ok(None)
    }

    /// What the spool holds of partition `prefix` around the offsets `min..=max`.
    fn around(&self, prefix: &[u8], min: i64, max: i64) -> Result<Around, SpoolError> {
        // Under the lock that removals take, so that no removal is half seen.
        let segments = self.segments();
        let lo = run_key(&SpoolKey::at(prefix, min), NORMAL);
        let hi = run_key(&SpoolKey::at(prefix, max), SINGLE);
        let mut found: Vec<_> = self.normal_before(prefix, &lo)?.into_iter().collect();
        for entry in self.index.range(lo..=hi) {
            found.push(entry?);
        }
        let mut live = HashSet::new();
        let mut ranges = Vec::new();
        for (k, v) in found {
            let run = self.run(&segments, &k, &v)?;
            let (first, kind) = split_run_key(&k);
            let first = first.offset();
            for (slot, removed) in run.slots.iter().zip(&run.removed) {
                if !removed {
                    live.insert(first + i64::from(slot.delta));
                }
            }
            if kind == NORMAL {
                ranges.push((first, first + i64::from(run.slots.last().expect("runs are not empty").delta)));
            }
        }
        ranges.sort_unstable();
        Ok(Around { live, ranges })
    }

    /// Stores a batch of records at once and wakes the uploaders. Records already in the spool
    /// are left as they are. After an error the batch is not in the spool, or (when its index
    /// entries could not be taken back) in it whole: either way the caller inserts it again.
    ///
    /// Only the appends to the value file, and reading which of the batch's offsets are spooled
    /// (a few index entries per partition), happen under the spool's lock; the rest (encoding,
    /// syncing, indexing) is done outside it, so that the uploaders, which
    /// take the lock to read values and remove records on the async runtime's thread, never wait
    /// for sled or the disk. Holding it for the whole batch, they did: on s3s-fs (two CPUs shared
    /// with the store) the consumer held the lock about 2 ms per batch of 100 and the runtime
    /// waited for it 1.0-1.2 s per 100,000 records, 320-370 times for more than a millisecond;
    /// now 0.06-0.08 s, 13-18 times (instrumented build, three runs each).
    pub fn insert_batch(&self, records: &[Record]) -> Result<(), SpoolError> {
        let mut sorted: Vec<(SpoolKey, &Record)> =
            records.iter().map(|r| (SpoolKey::new(&r.topic, r.partition, r.offset), r)).collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        sorted.dedup_by(|a, b| a.0 == b.0);
        // Only the consumer inserts, so what is found here still holds when the batch is indexed
        // (an uploader only removes records, which at worst makes a record found live a removed
        // one: it is stored).
        let mut new = Vec::with_capacity(sorted.len());
        for part in sorted.chunk_by(|a, b| a.0.prefix() == b.0.prefix()) {
            let prefix = part[0].0.prefix();
            let (min, max) = (part[0].0.offset(), part[part.len() - 1].0.offset());
            let Around { live, ranges } = self.around(prefix, min, max)?;
            for (key, r) in part {
                let offset = key.offset();
                if live.contains(&offset) {
                    continue;
                }
                // The ranges of normal runs must not overlap: a record inside one (it was removed
                // from it and is delivered again) becomes a single, and a new run stays between
                // two existing ones.
                let gap = ranges.partition_point(|&(first, _)| first <= offset);
                let inside = gap > 0 && offset <= ranges[gap - 1].1;
                let kind = if inside { SINGLE } else { NORMAL };
                let consumed = matches!(r.time, RecordTime::Consumed(_));
                new.push(NewRecord { key, value: encode_value_with(r, self.options), kind, gap, consumed });
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
        // Synced before they are indexed at least every `flush_bytes`, and at once when a record's
        // path time is the time it was consumed (see the module doc).
        let must_sync = new.iter().any(|n| n.consumed);
        let appended = {
            let mut segments = self.segments();
            // Entries a failed insert left behind are flushed with this batch's.
            let unflushed = segments.unflushed;
            let mut written = Vec::with_capacity(new.len());
            let values = new.iter().map(|n| n.value.as_slice());
            match segments.append_all(values, &mut written, must_sync, self.options.flush_bytes) {
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
            for file in &to_sync {
                file.sync_data()?;
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
                live.extend(run.live_records(&split_run_key(k).0).map(|(_, _, location)| location));
            }
            undo.remove(k.as_slice());
        }
        self.apply(undo)?;
        for k in &keys {
            segments.removals.remove(k);
        }
        Ok(live)
    }

    /// Compacts the oldest value file when it is due (see [`Segments::to_compact`]). One that
    /// fails changed nothing: it is logged and tried again later (see [`COMPACT_RETRY`]).
    fn compact_if_due(&self, segments: &mut Segments) {
        let Some(id) = segments.to_compact() else { return };
        if segments.compact_after.is_some_and(|at| Instant::now() < at) {
            return;
        }
        match self.compact(segments, id) {
            Ok(()) => {
                if segments.compact_failures > 0 {
                    tracing::info!(failed = segments.compact_failures, "the spool's value files are compacted again");
                }
                segments.compact_failures = 0;
                segments.compact_after = None;
            }
            Err(e) => {
                segments.compact_failures += 1;
                let wait = COMPACT_RETRY * (1 << (segments.compact_failures - 1).min(4));
                segments.compact_after = Some(Instant::now() + wait);
                if segments.compact_failures.is_power_of_two() {
                    tracing::warn!(
                        error = %e,
                        file = id,
                        attempt = segments.compact_failures,
                        retry_after_s = wait.as_secs(),
                        "could not compact the spool's value files (disk full?); their records stay where they were, and it is tried again later"
                    );
                }
            }
        }
    }

    /// Rewrites the records left in file `id` at the end of the current one, then deletes it.
    ///
    /// All or nothing: the runs' entries, their removals not yet written and the counts change only
    /// once the moved runs are indexed durably. On an error the values it appended are taken back
    /// and the old file and entries stay as they were. Called under the spool's lock.
    fn compact(&self, segments: &mut Segments, id: u32) -> Result<(), SpoolError> {
        let file = segments.files[&id].file.clone();
        // The entries of the runs moved, as they were; the keys of the runs they became; where the
        // moved values went.
        let mut old: Vec<(sled::IVec, sled::IVec)> = Vec::new();
        let mut new_keys: Vec<Vec<u8>> = Vec::new();
        let mut written: Vec<Location> = Vec::new();
        let mut applied = false;
        let moved = (|| -> Result<(), SpoolError> {
            let mut batch = sled::Batch::default();
            for entry in self.index.iter() {
                let (k, v) = entry?;
                let run = self.run(segments, &k, &v)?;
                if run.segment != id {
                    continue;
                }
                let (first, kind) = split_run_key(&k);
                let mut moved = Vec::with_capacity(run.slots.len());
                for (_, key, location) in run.live_records(&first) {
                    let value = Segments::read(&file, location)?.ok_or_else(|| SpoolError::Corrupt {
                        key: key.describe(),
                        why: "value failed its check while the spool was compacted",
                    })?;
                    let at = segments.append(&value)?;
                    written.push(at);
                    moved.push((key, at));
                }
                // The run's removed records are left behind; what is moved may span two files.
                batch.remove(k.clone());
                for r in build_runs(moved.iter().map(|(key, location)| (key, kind, 0, *location))) {
                    let key = run_key(&r.key, r.kind);
                    batch.insert(key.clone(), r.run.encode());
                    new_keys.push(key);
                }
                old.push((k, v));
            }
            // Durable before the old file goes, for the reason given in [`Spool::remove`].
            segments.sync(&written)?;
            self.apply(batch)?;
            applied = true;
            self.flush_index()?;
            Ok(())
        })();
        if let Err(e) = moved {
            // A failed write can leave part of a value in the file: append no more to it.
            segments.writer = None;
            let undone = !applied || {
                let mut undo = sled::Batch::default();
                for k in &new_keys {
                    undo.remove(k.as_slice());
                }
                for (k, v) in &old {
                    undo.insert(k.clone(), v.clone());
                }
                self.apply(undo).is_ok()
            };
            if undone && self.flush_index().is_ok() {
                segments.forget(&written)?;
            } else if undone {
                // The old entries are back, but not durably: after a crash the index may still
                // point at the moved values, so their files stay until the next opening, which
                // deletes the files no entry points at. Only the counts are taken back.
                for location in &written {
                    segments.release(*location);
                }
                self.publish(segments);
            } else {
                // The index points at the moved values (not durably yet): they stay, and the
                // records of the old file count as moved. The file itself goes at the next
                // compaction, which finds none of its records, or at the next opening.
                for (k, _) in &old {
                    segments.removals.remove(k.as_ref());
                }
                if let Some(old) = segments.files.get_mut(&id) {
                    (old.live, old.live_bytes) = (0, 0);
                }
            }
            return Err(e);
        }
        // Their removals are in the moved runs, which hold only the records left.
        for (k, _) in &old {
            segments.removals.remove(k.as_ref());
        }
        if let Err(e) = segments.delete(id) {
            // Nothing points at it any more: it is deleted at the next opening.
            tracing::warn!(error = %e, file = id, "could not delete a compacted value file of the spool");
        }
        Ok(())
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
                for (_, key, location) in run.live_records(&first) {
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
            let record = decode_entry(&key, &raw)?;
            bytes += record.value.len();
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
            keys.extend(run.live_records(&split_run_key(&k).0).map(|(_, key, _)| key));
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
        let mut segments = self.segments();
        if let Some((k, mut run, slot)) = self.find(&segments, key)? {
            let location = run.locations().nth(slot).expect("the slot exists");
            run.removed[slot] = true;
            let unwritten = segments.removals.remove(&k).map_or(0, |r| r.unwritten) + 1;
            if run.live() == 0 {
                self.index.remove(&k)?;
            } else if unwritten >= WRITE_REMOVALS_EVERY {
                self.index.insert(&k, run.encode())?;
            } else {
                segments.removals.insert(k, Removals { removed: run.removed, unwritten });
            }
            if let Some(empty) = segments.release(location) {
                // The removals must be durable before the values go: an entry that came back in a
                // crash without its value would be fetched again, and a record without a Kafka
                // timestamp would then get another time, so another path.
                self.index.flush()?;
                segments.delete(empty)?;
            }
            self.publish(&segments);
        }
        release_garbage();
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

    /// Bytes of the records in the spool, as stored (the value files take at most a quarter more,
    /// plus 32 MiB).
    pub fn byte_count(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Free space on the spool's file system (`u64::MAX` when it cannot be read).
    pub fn available_space(&self) -> u64 {
        fs4::available_space(&self.dir).unwrap_or(u64::MAX)
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

/// Moves the per-record index of an older spool into runs of one record each.
fn move_record_index(db: &sled::Db, runs: &sled::Tree) -> Result<(), SpoolError> {
    if !db.tree_names().iter().any(|n| n.as_ref() == RECORD_INDEX_TREE.as_bytes()) {
        return Ok(());
    }
    let old = db.open_tree(RECORD_INDEX_TREE)?;
    let mut batch = sled::Batch::default();
    for entry in old.iter() {
        let (k, v) = entry?;
        let l = Location::decode(&k, &v)?;
        let run = Run {
            segment: l.segment,
            position: l.position,
            slots: vec![Slot { delta: 0, len: l.len, crc: l.crc }],
            removed: vec![false],
        };
        batch.insert(run_key(&SpoolKey(k.to_vec()), NORMAL), run.encode());
    }
    runs.apply_batch(batch)?;
    runs.flush()?;
    db.drop_tree(RECORD_INDEX_TREE)?;
    Ok(())
}

/// Failures the tests make happen, and the order in which value files were synced and deleted.
/// Per thread, so that tests running at once do not see each other's.
#[cfg(test)]
mod faults {
    use std::cell::RefCell;
    use std::mem::discriminant;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub(super) enum Point {
        /// A value is appended.
        Append,
        /// A value file is synced by a compaction.
        Sync(u32),
        /// A value file is deleted.
        Delete(u32),
        /// A batch is applied to the index.
        ApplyIndex,
        /// The index is flushed.
        FlushIndex,
    }

    thread_local! {
        /// Points that fail, each after letting this many more through.
        static ARMED: RefCell<Vec<(Point, u32)>> = const { RefCell::new(Vec::new()) };
        /// Points passed.
        static PASSED: RefCell<Vec<Point>> = const { RefCell::new(Vec::new()) };
    }

    /// Makes every `point` (of any file) fail once `after` more have passed.
    pub(super) fn arm(point: Point, after: u32) {
        ARMED.with_borrow_mut(|armed| armed.push((point, after)));
    }

    /// Lets everything pass again and forgets what passed.
    pub(super) fn clear() {
        ARMED.with_borrow_mut(Vec::clear);
        PASSED.with_borrow_mut(Vec::clear);
    }

    /// The points passed since [`clear`], in order.
    pub(super) fn passed() -> Vec<Point> {
        PASSED.with_borrow(Clone::clone)
    }

    pub(super) fn hit(point: Point) -> std::io::Result<()> {
        let fails = ARMED.with_borrow_mut(|armed| {
            armed.iter_mut().filter(|(p, _)| discriminant(p) == discriminant(&point)).any(|(_, left)| {
                let fails = *left == 0;
                *left = left.saturating_sub(1);
                fails
            })
        });
        if fails {
            return Err(std::io::Error::other(format!("injected failure at {point:?}")));
        }
        PASSED.with_borrow_mut(|passed| passed.push(point));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::faults::Point;
    use super::*;

    fn rec(topic: &str, partition: i32, offset: i64, value: Vec<u8>) -> Record {
        Record {
            topic: topic.into(),
            partition,
            offset,
            time: RecordTime::Kafka(1_650_000_000_000),
            key: None,
            value: value.into(),
        }
    }

    /// Opens the spool in `dir`. Right after a spool there was dropped, sled's file lock has been
    /// found still taken (its flusher thread lets go a moment later): wait for it.
    pub(super) fn open_spool(dir: &Path) -> Spool {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Spool::open(dir, 1 << 20) {
                Err(SpoolError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
    }

    #[test]
    fn keys_sort_by_offset_within_a_partition() {
        let a = SpoolKey::new("t", 1, 9);
        let b = SpoolKey::new("t", 1, 10);
        let c = SpoolKey::new("t", 2, 0);
        assert!(a < b && b < c);
        assert_eq!(b.parts(), Some(("t", 1, 10)));
        assert_eq!(a.prefix(), partition_prefix("t", 1));
    }

    #[test]
    fn values_round_trip_with_and_without_compression() {
        let key = SpoolKey::new("t", 0, 5);
        let mut r = rec("t", 0, 5, b"small".to_vec());
        r.key = Some(Bytes::from_static(b"k"));
        r.time = RecordTime::Consumed(-5);
        assert_eq!(decode_entry(&key, &encode_value(&r)).unwrap(), r);
        let big = rec("t", 0, 5, vec![7; 100_000]);
        let enc = encode_value(&big);
        assert!(enc.len() < 10_000, "compressible values shrink");
        assert_eq!(decode_entry(&key, &enc).unwrap(), big);
        let noise: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let random = rec("t", 0, 5, noise);
        assert_eq!(decode_entry(&key, &encode_value(&random)).unwrap(), random);
        assert!(decode_entry(&key, &[9, 0]).is_err());
    }

    #[test]
    fn uncompressed_spools_store_large_values_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let off = SpoolOptions { compress_min_bytes: None, ..SpoolOptions::default() };
        let s = Spool::open_with(dir.path(), 1 << 20, off).unwrap();
        // Compressible, so only the option keeps it from being compressed.
        let big = rec("t", 0, 1, b"{\"sensor\":\"s-1\",\"temperature\":23.5}\n".repeat(2048)[..64 * 1024].to_vec());
        assert!(encode_value(&big).len() < 16 * 1024, "compressed by default");
        assert_eq!(encode_value_with(&big, off).len(), 10 + 64 * 1024, "stored as is");
        s.insert_batch(std::slice::from_ref(&big)).unwrap();
        assert!(s.byte_count() > 64 * 1024);
        let got = s.pending(&partition_prefix("t", 0), |_| false, 10, usize::MAX).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, big);
        s.flush().unwrap();
        drop(s);
        let reopened = open_spool(dir.path());
        assert_eq!(reopened.pending(&partition_prefix("t", 0), |_| false, 10, usize::MAX).unwrap()[0].1, big);
    }

    #[test]
    fn spool_survives_reopen_and_dedupes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open_spool(dir.path());
            s.insert_batch(&[
                rec("a", 0, 1, b"x".to_vec()),
                rec("a", 0, 2, b"y".to_vec()),
                rec("b", 3, 7, b"z".to_vec()),
            ])
            .unwrap();
            s.insert_batch(&[rec("a", 0, 1, b"x".to_vec())]).unwrap();
            s.remove(&SpoolKey::new("a", 0, 2)).unwrap();
            s.flush().unwrap();
        }
        let s = open_spool(dir.path());
        assert_eq!(s.record_count(), 2);
        assert_eq!(s.partitions(), vec![partition_prefix("a", 0), partition_prefix("b", 3)]);
        let got = s.pending(&partition_prefix("a", 0), |_| false, 10, usize::MAX).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.value, Bytes::from_static(b"x"));
        let skipped = s.pending(&partition_prefix("a", 0), |k| k.parts().unwrap().2 == 1, 10, usize::MAX).unwrap();
        assert!(skipped.is_empty());
        // Kafka delivering again what the reopened spool holds, and a record twice in one batch.
        s.insert_batch(&[
            rec("a", 0, 1, b"again".to_vec()),
            rec("b", 3, 7, b"again".to_vec()),
            rec("a", 0, 5, b"new".to_vec()),
            rec("a", 0, 5, b"new".to_vec()),
        ])
        .unwrap();
        assert_eq!(s.record_count(), 3);
        let got = s.pending(&partition_prefix("a", 0), |_| false, 10, usize::MAX).unwrap();
        let got: Vec<_> = got.iter().map(|(_, r)| (r.offset, r.value.clone())).collect();
        assert_eq!(got, vec![(1, Bytes::from_static(b"x")), (5, Bytes::from_static(b"new"))]);
    }

    #[test]
    fn pending_stops_at_the_byte_budget_but_returns_at_least_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        s.insert_batch(&(0..5).map(|o| rec("t", 0, o, noise(o, 4000))).collect::<Vec<_>>()).unwrap();
        let offsets = |max_bytes| -> Vec<i64> {
            let got = s.pending(&partition_prefix("t", 0), |_| false, 10, max_bytes).unwrap();
            got.iter().map(|(_, r)| r.offset).collect()
        };
        assert_eq!(offsets(10_000), vec![0, 1, 2], "stops once 10,000 bytes are reached");
        assert_eq!(offsets(1), vec![0], "a record larger than the budget still comes");
        assert_eq!(offsets(usize::MAX), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn inserts_sync_once_the_unsynced_bytes_reach_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { flush_bytes: 10_000, ..SpoolOptions::default() };
        let s = Spool::open_with(dir.path(), 1 << 20, options).unwrap();
        s.insert_batch(&[rec("t", 0, 0, vec![1; 6_000])]).unwrap();
        assert!(s.segments().unsynced >= 6_000, "below the bound: not synced yet");
        s.insert_batch(&[rec("t", 0, 1, vec![2; 6_000])]).unwrap();
        assert_eq!(s.segments().unsynced, 0, "the bound was passed: synced");
    }

    fn value_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = std::fs::read_dir(dir.join("values")).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    }

    fn noise(seed: i64, n: usize) -> Vec<u8> {
        (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed as u8).collect()
    }

    #[test]
    fn value_files_go_once_their_records_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        // 40 MiB: three value files.
        for batch in 0..40 {
            s.insert_batch(&(0..64).map(|i| rec("t", 0, batch * 64 + i, noise(i, 16_000))).collect::<Vec<_>>())
                .unwrap();
        }
        assert_eq!(value_files(dir.path()).len(), 3);
        assert!(s.byte_count() >= 40 * 64 * 16_000);
        for offset in 0..40 * 64 {
            s.remove(&SpoolKey::new("t", 0, offset)).unwrap();
        }
        assert_eq!((s.record_count(), s.byte_count()), (0, 0));
        assert!(value_files(dir.path()).is_empty(), "no file is left behind");
    }

    #[test]
    fn a_record_that_stays_does_not_keep_removed_ones_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        let stuck = rec("t", 9, 0, noise(9, 16_000));
        s.insert_batch(std::slice::from_ref(&stuck)).unwrap();
        // 160 MiB pass through while one record (an upload that keeps failing) stays.
        let disk = || value_files(dir.path()).iter().map(|f| std::fs::metadata(f).unwrap().len()).sum::<u64>();
        let mut peak = 0;
        for batch in 0..160 {
            let records: Vec<_> = (0..64).map(|i| rec("t", 0, batch * 64 + i, noise(i, 16_000))).collect();
            s.insert_batch(&records).unwrap();
            for r in &records {
                s.remove(&SpoolKey::new("t", 0, r.offset)).unwrap();
            }
            peak = peak.max(disk());
        }
        assert!(peak <= 4 * SEGMENT_BYTES, "disk use stays bounded: peak {peak} bytes");
        assert!(value_files(dir.path()).len() <= 2);
        assert_eq!((s.record_count(), s.byte_count()), (1, 10 + 16_000));
        let got = s.pending(&partition_prefix("t", 9), |_| false, 10, usize::MAX).unwrap();
        assert_eq!(got, vec![(SpoolKey::new("t", 9, 0), stuck)], "the record that stayed is intact");
    }

    #[test]
    fn entries_whose_value_did_not_reach_the_disk_are_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open_spool(dir.path());
            s.insert_batch(&(0..4).map(|o| rec("t", 0, o, noise(o, 1000))).collect::<Vec<_>>()).unwrap();
            s.flush().unwrap();
        }
        // The host crashed while the last value was being written: its bytes are cut short; the
        // one before it holds other bytes.
        let file = &value_files(dir.path())[0];
        let len = std::fs::metadata(file).unwrap().len();
        let f = File::options().write(true).open(file).unwrap();
        f.set_len(len - 10).unwrap();
        f.write_all_at(&[0; 5], 2 * 1010 + 20).unwrap();
        let s = open_spool(dir.path());
        let offsets: Vec<i64> = s
            .pending(&partition_prefix("t", 0), |_| false, 10, usize::MAX)
            .unwrap()
            .iter()
            .map(|(_, r)| r.offset)
            .collect();
        assert_eq!(offsets, vec![0, 1], "records 2 and 3 are fetched from Kafka again");
        assert_eq!(s.record_count(), 2);
        assert_eq!(s.keys().unwrap().len(), 2);
    }

    /// The spool holds exactly `records` (in three partitions of topic "t"), each in offset order.
    fn assert_holds(s: &Spool, records: &[Record]) {
        assert_eq!(s.record_count(), records.len() as u64);
        assert_eq!(s.partitions().len(), 3);
        for p in 0..3 {
            let got = s.pending(&partition_prefix("t", p), |_| false, usize::MAX, usize::MAX).unwrap();
            let want: Vec<_> = records.iter().filter(|r| r.partition == p).cloned().collect();
            assert_eq!(got.into_iter().map(|(_, r)| r).collect::<Vec<_>>(), want);
        }
    }

    #[test]
    fn a_spool_with_values_inside_sled_is_moved_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<_> = (0..2500).map(|o| rec("t", (o % 3) as i32, o, noise(o, 300))).collect();
        {
            // How the spool kept records before the value files.
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let legacy = db.open_tree(LEGACY_TREE).unwrap();
            for r in &records {
                legacy.insert(SpoolKey::new(&r.topic, r.partition, r.offset).0, encode_value(r)).unwrap();
            }
            db.flush().unwrap();
        }
        let s = open_spool(dir.path());
        assert_holds(&s, &records);
        drop(s);
        let s = open_spool(dir.path());
        assert_eq!(s.record_count(), 2500, "moved once, not twice");
    }

    #[test]
    fn records_inserted_while_others_are_removed_are_each_read_once() {
        // An insert indexes its batch outside the lock that removals take: the counts and the
        // index must still agree, and every record must come out exactly once.
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { flush_bytes: 64 << 10, ..SpoolOptions::default() };
        let s = Arc::new(Spool::open_with(dir.path(), 1 << 20, options).unwrap());
        const N: i64 = 20_000;
        let writer = {
            let s = s.clone();
            std::thread::spawn(move || {
                for from in (0..N).step_by(100) {
                    let batch: Vec<_> =
                        (from..from + 100).map(|o| rec("t", (o % 4) as i32, o, noise(o, 1000))).collect();
                    s.insert_batch(&batch).unwrap();
                }
            })
        };
        let mut seen = vec![0u8; N as usize];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while !(writer.is_finished() && s.record_count() == 0) {
            assert!(std::time::Instant::now() < deadline, "{} records never came out", s.record_count());
            for p in 0..4 {
                for (key, record) in s.pending(&partition_prefix("t", p), |_| false, 32, usize::MAX).unwrap() {
                    assert_eq!(record.value, noise(record.offset, 1000));
                    seen[record.offset as usize] += 1;
                    s.remove(&key).unwrap();
                }
            }
        }
        writer.join().unwrap();
        assert!(seen.iter().all(|&n| n == 1), "every record read once");
        assert_eq!((s.record_count(), s.byte_count(), s.keys().unwrap().len()), (0, 0, 0));
    }

    #[test]
    fn a_batch_that_cannot_be_written_leaves_the_spool_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        let batch = |from: i64, n: i64| (from..from + n).map(|o| rec("t", 0, o, noise(o, 16_000))).collect::<Vec<_>>();
        // 1,040 values of 16,010 bytes: the first file is 8 values short of full.
        for from in (0..1040).step_by(80) {
            s.insert_batch(&batch(from, 80)).unwrap();
        }
        // The next file cannot be created (as on a full disk).
        let blocker = Segments::path(&dir.path().join("values"), 1);
        std::fs::create_dir(&blocker).unwrap();
        assert!(s.insert_batch(&batch(1040, 64)).is_err());
        assert_eq!(s.record_count(), 1040);
        assert_eq!(s.keys().unwrap().len(), 1040, "no index entry for the batch that failed");
        std::fs::remove_dir(&blocker).unwrap();
        s.insert_batch(&batch(1040, 64)).unwrap();
        assert_eq!(s.record_count(), 1104, "the values of the failed batch are not counted");
        let got = s.pending(&partition_prefix("t", 0), |_| false, usize::MAX, usize::MAX).unwrap();
        assert_eq!(got.into_iter().map(|(_, r)| r).collect::<Vec<_>>(), batch(0, 1104));
    }

    #[test]
    fn a_record_delivered_again_after_its_removal_is_stored_and_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let offsets = |s: &Spool| -> Vec<(i64, Bytes)> {
            let got = s.pending(&partition_prefix("t", 0), |_| false, usize::MAX, usize::MAX).unwrap();
            got.into_iter().map(|(_, r)| (r.offset, r.value)).collect()
        };
        {
            let s = open_spool(dir.path());
            s.insert_batch(&(0..10).map(|o| rec("t", 0, o, vec![o as u8])).collect::<Vec<_>>()).unwrap();
            s.remove(&SpoolKey::new("t", 0, 3)).unwrap();
            s.remove(&SpoolKey::new("t", 0, 5)).unwrap();
            // Kafka delivers 3 and 4 again (a rebalance before the commit), and 10 for the first time.
            s.insert_batch(&[
                rec("t", 0, 3, b"again".to_vec()),
                rec("t", 0, 4, b"again".to_vec()),
                rec("t", 0, 10, vec![10]),
            ])
            .unwrap();
            assert_eq!(s.record_count(), 10);
            let first = |o: i64| (o, Bytes::from(vec![o as u8]));
            let want: Vec<(i64, Bytes)> = [0, 1, 2, 4, 6, 7, 8, 9].into_iter().map(first).collect();
            let want = [want, vec![(3, Bytes::from_static(b"again")), first(10)]].concat();
            assert_eq!(offsets(&s), want, "4 is kept as first stored; 3 comes after the records it was spooled with");
            s.flush().unwrap();
        }
        let s = open_spool(dir.path());
        assert_eq!(s.record_count(), 10);
        assert_eq!(s.keys().unwrap().len(), 10);
        for o in [3, 3, 0, 10] {
            s.remove(&SpoolKey::new("t", 0, o)).unwrap();
        }
        assert_eq!(s.record_count(), 7, "removing a record twice removes it once");
        s.insert_batch(&[rec("t", 0, 3, b"third".to_vec())]).unwrap();
        let got = offsets(&s);
        assert_eq!(got.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![1, 2, 4, 6, 7, 8, 9, 3]);
        assert_eq!(got.last().unwrap().1, Bytes::from_static(b"third"));
    }

    #[test]
    fn compaction_moves_the_records_left_in_a_partly_removed_run() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        // Records passing through: stored and removed as soon as they are in.
        let mut next = 0;
        let mut pass = |s: &Spool, batches: i64| {
            for _ in 0..batches {
                let records: Vec<_> = (0..64).map(|i| rec("t", 0, next + i, noise(i, 16_000))).collect();
                next += 64;
                s.insert_batch(&records).unwrap();
                for r in &records {
                    s.remove(&SpoolKey::new("t", 0, r.offset)).unwrap();
                }
            }
        };
        // Three runs of 64 records in three value files; the odd ones are stored, the even ones stay
        // (their uploads fail). Each file is then mostly garbage, more than two files' worth in all.
        let mut stuck = Vec::new();
        let mut first_file = None;
        for run in 0..3 {
            let records: Vec<_> = (run * 64..run * 64 + 64).map(|o| rec("t", 9, o, noise(o, 16_000))).collect();
            s.insert_batch(&records).unwrap();
            first_file.get_or_insert_with(|| value_files(dir.path()).pop().unwrap());
            for o in (run * 64 + 1..run * 64 + 64).step_by(2) {
                s.remove(&SpoolKey::new("t", 9, o)).unwrap();
            }
            stuck.extend(records);
            pass(&s, 20);
        }
        pass(&s, 100);
        let files = value_files(dir.path());
        assert!(!files.contains(first_file.as_ref().unwrap()), "the oldest file was compacted away: {files:?}");
        assert!(files.len() <= 3, "{files:?}");
        let want: Vec<_> = stuck.iter().filter(|r| r.offset % 2 == 0).cloned().collect();
        let left = |s: &Spool| -> Vec<Record> {
            s.pending(&partition_prefix("t", 9), |_| false, usize::MAX, usize::MAX)
                .unwrap()
                .into_iter()
                .map(|(_, r)| r)
                .collect()
        };
        assert_eq!(left(&s), want, "the records that stayed are intact, the stored ones do not come back");
        assert_eq!(s.record_count(), 96);
        s.flush().unwrap();
        drop(s);
        let s = open_spool(dir.path());
        assert_eq!(left(&s), want);
        assert_eq!(s.record_count(), 96);
    }

    #[test]
    fn a_spool_with_an_index_entry_per_record_is_moved_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let records: Vec<_> = (0..300).map(|o| rec("t", (o % 3) as i32, o, noise(o, 500))).collect();
        {
            // How the spool indexed its values before runs: one 21-byte entry per record.
            let values = dir.path().join("values");
            std::fs::create_dir_all(&values).unwrap();
            let mut file = File::create(Segments::path(&values, 7)).unwrap();
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let index = db.open_tree(RECORD_INDEX_TREE).unwrap();
            let mut position = 0u64;
            for r in &records {
                let value = encode_value(r);
                file.write_all(&value).unwrap();
                let mut entry = vec![LOCATION_VERSION];
                entry.extend_from_slice(&7u32.to_be_bytes());
                entry.extend_from_slice(&position.to_be_bytes());
                entry.extend_from_slice(&(value.len() as u32).to_be_bytes());
                entry.extend_from_slice(&crc32fast::hash(&value).to_be_bytes());
                index.insert(SpoolKey::new(&r.topic, r.partition, r.offset).0, entry).unwrap();
                position += value.len() as u64;
            }
            db.flush().unwrap();
        }
        let s = open_spool(dir.path());
        assert_holds(&s, &records);
        // Delivered again: not spooled twice.
        s.insert_batch(&records[..50]).unwrap();
        assert_eq!(s.record_count(), 300);
        drop(s);
        let s = open_spool(dir.path());
        assert_eq!(s.record_count(), 300, "moved once, not twice");
        for r in &records {
            s.remove(&SpoolKey::new(&r.topic, r.partition, r.offset)).unwrap();
        }
        assert_eq!((s.record_count(), s.keys().unwrap().len()), (0, 0));
        assert!(value_files(dir.path()).is_empty(), "the old value file goes with its last record");
    }

    /// A spool whose oldest value file is due for compaction at the next insert. File 0 holds a run
    /// of 64 records of partition 9 whose odd ones were stored (their removals not yet written to
    /// the run's entry), then records of partition 0 pass through files 0 to 3, one in 500 staying;
    /// file 3, the one written to, is ten values short of full. Returns the records it holds.
    fn due_for_compaction(dir: &Path) -> (Spool, Vec<Record>) {
        // Inserts never sync on their own: the syncs seen are the compaction's.
        let options = SpoolOptions { flush_bytes: u64::MAX, ..SpoolOptions::default() };
        let s = Spool::open_with(dir, 1 << 20, options).unwrap();
        let stuck: Vec<_> = (0..64).map(|o| rec("t", 9, o, noise(o, 16_000))).collect();
        s.insert_batch(&stuck).unwrap();
        for o in (1..64).step_by(2) {
            s.remove(&SpoolKey::new("t", 9, o)).unwrap();
        }
        // Values of 16,010 bytes, 1,048 to a file.
        let passing: Vec<_> = (0..4118).map(|o| rec("t", 0, o, noise(o, 16_000))).collect();
        for chunk in passing.chunks(64) {
            s.insert_batch(chunk).unwrap();
        }
        assert_eq!(value_files(dir).len(), 4);
        for r in passing.iter().filter(|r| r.offset % 500 != 0) {
            s.remove(&SpoolKey::new("t", 0, r.offset)).unwrap();
        }
        let mut held: Vec<_> = passing.into_iter().filter(|r| r.offset % 500 == 0).collect();
        held.extend(stuck.into_iter().filter(|r| r.offset % 2 == 0));
        (s, held)
    }

    /// The spool holds exactly `want` (values of 16,000 bytes), each record read once, with its
    /// value.
    fn assert_holds_once(s: &Spool, want: &[Record]) {
        let mut got: Vec<Record> = Vec::new();
        for prefix in s.partitions() {
            got.extend(s.pending(&prefix, |_| false, usize::MAX, usize::MAX).unwrap().into_iter().map(|(_, r)| r));
        }
        got.sort_by_key(|r| (r.partition, r.offset));
        let mut want = want.to_vec();
        want.sort_by_key(|r| (r.partition, r.offset));
        let offsets = |rs: &[Record]| rs.iter().map(|r| (r.partition, r.offset)).collect::<Vec<_>>();
        assert_eq!(offsets(&got), offsets(&want), "each record read once, no stored one again");
        assert!(got == want, "every value intact");
        assert_eq!(s.record_count(), want.len() as u64, "record_count");
        assert_eq!(s.byte_count(), want.len() as u64 * 16_010, "byte_count");
        assert_eq!(s.keys().unwrap().len(), want.len());
    }

    /// Compacts the file due for it now (after a failure, the inserts wait before they try again).
    fn compact_now(s: &Spool) {
        let mut segments = s.segments();
        let id = segments.to_compact().expect("a file is due for compaction");
        s.compact(&mut segments, id).unwrap();
        s.publish(&segments);
    }

    /// Inserts a record into a spool [`due_for_compaction`] with each `(point, after)` failing once
    /// `after` of them passed, then compacts again once the failures are gone.
    fn a_failed_compaction_leaves_the_spool_as_it_was(failures: &[(Point, u32)]) {
        let dir = tempfile::tempdir().unwrap();
        let (s, mut want) = due_for_compaction(dir.path());
        let first_file = Segments::path(&dir.path().join("values"), 0);
        let trigger = rec("t", 1, 0, noise(1, 16_000));
        want.push(trigger.clone());
        faults::clear();
        for &(point, after) in failures {
            faults::arm(point, after);
        }
        let inserted = s.insert_batch(std::slice::from_ref(&trigger));
        faults::clear();
        assert_holds_once(&s, &want);
        assert!(value_files(dir.path()).contains(&first_file), "the file holding live records is kept");
        assert!(inserted.is_ok(), "the batch was written, its insert succeeds: {inserted:?}");
        compact_now(&s);
        assert_holds_once(&s, &want);
        assert!(!value_files(dir.path()).contains(&first_file), "compacted once the failure is gone");
        s.flush().unwrap();
        drop(s);
        assert_holds_once(&open_spool(dir.path()), &want);
    }

    #[test]
    fn a_compaction_that_fails_while_appending_leaves_the_spool_as_it_was() {
        // The batch's value goes in, then the disk is full at the compaction's 12th, in file 4.
        a_failed_compaction_leaves_the_spool_as_it_was(&[(Point::Append, 12)]);
    }

    #[test]
    fn a_compaction_that_fails_to_sync_leaves_the_spool_as_it_was() {
        a_failed_compaction_leaves_the_spool_as_it_was(&[(Point::Sync(0), 0)]);
    }

    #[test]
    fn a_compaction_whose_index_flush_fails_leaves_the_spool_as_it_was() {
        // The moved runs are applied to the index, then taken back.
        a_failed_compaction_leaves_the_spool_as_it_was(&[(Point::FlushIndex, 0)]);
    }

    #[test]
    fn a_compaction_whose_index_flush_fails_and_cannot_be_taken_back_loses_nothing() {
        // The batch's entries and the moved runs are applied; taking the moved runs back fails, so
        // they stay, and the old file goes at the next compaction.
        a_failed_compaction_leaves_the_spool_as_it_was(&[(Point::FlushIndex, 0), (Point::ApplyIndex, 2)]);
    }

    #[test]
    fn a_compaction_that_failed_is_tried_again_later_not_at_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = due_for_compaction(dir.path());
        let batch = |o: i64| [rec("t", 1, o, noise(o, 16_000))];
        faults::clear();
        faults::arm(Point::Sync(0), 0);
        s.insert_batch(&batch(0)).unwrap();
        faults::clear();
        s.insert_batch(&batch(1)).unwrap();
        assert_eq!(faults::passed(), vec![Point::Append, Point::ApplyIndex], "the next batch writes only itself");
        s.segments().compact_after = Some(Instant::now());
        s.insert_batch(&batch(2)).unwrap();
        assert!(faults::passed().contains(&Point::Delete(0)), "compacted once the wait is over");
        assert_eq!(s.record_count(), 41 + 3);
    }

    #[test]
    fn a_compaction_syncs_every_file_it_moved_records_to_before_the_old_one_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = due_for_compaction(dir.path());
        faults::clear();
        s.insert_batch(&[rec("t", 1, 0, noise(1, 16_000))]).unwrap();
        let passed: Vec<_> = faults::passed().into_iter().filter(|p| *p != Point::Append).collect();
        let files: BTreeSet<u32> = s
            .index
            .scan_prefix(partition_prefix("t", 9))
            .map(|e| e.map(|(k, v)| Run::decode(&k, &v).unwrap().segment).unwrap())
            .collect();
        assert_eq!(files, BTreeSet::from([3, 4]), "the moved records fill file 3 and go on in file 4");
        let deleted = passed.iter().position(|p| *p == Point::Delete(0)).expect("file 0 was compacted");
        for id in files {
            assert!(passed[..deleted].contains(&Point::Sync(id)), "file {id} synced before file 0 went: {passed:?}");
        }
    }

    /// Records without a Kafka timestamp: their insert syncs and flushes the index before it
    /// returns.
    fn consumed_batch() -> Vec<Record> {
        (0..10)
            .map(|o| Record { time: RecordTime::Consumed(1_650_000_000_000 + o), ..rec("t", 0, o, noise(o, 1000)) })
            .collect()
    }

    /// The consumer retries a batch whose insert failed: afterwards, and after a reopening, the
    /// spool holds each record with its value.
    fn the_retry_stores_the_batch_whole(dir: &Path, s: Spool, batch: &[Record]) {
        s.insert_batch(batch).unwrap();
        let held = |s: &Spool| -> Vec<Record> {
            let got = s.pending(&partition_prefix("t", 0), |_| false, usize::MAX, usize::MAX).unwrap();
            got.into_iter().map(|(_, r)| r).collect()
        };
        assert!(held(&s) == batch, "every record with its value");
        assert_eq!(s.record_count(), batch.len() as u64);
        s.flush().unwrap();
        drop(s);
        let s = open_spool(dir);
        assert!(held(&s) == batch, "every record with its value after a reopening");
        assert_eq!(s.record_count(), batch.len() as u64);
    }

    #[test]
    fn a_batch_whose_index_flush_fails_is_stored_whole_by_the_retry() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        let batch = consumed_batch();
        faults::clear();
        faults::arm(Point::FlushIndex, 0);
        assert!(s.insert_batch(&batch).is_err());
        faults::clear();
        the_retry_stores_the_batch_whole(dir.path(), s, &batch);
    }

    /// An insert of `batch` whose index flush fails and whose entries cannot be taken back either:
    /// they stay in the index, perhaps not durably.
    fn fail_leaving_entries(s: &Spool, batch: &[Record]) {
        faults::clear();
        faults::arm(Point::FlushIndex, 0);
        faults::arm(Point::ApplyIndex, 1);
        assert!(s.insert_batch(batch).is_err());
        faults::clear();
    }

    #[test]
    fn a_batch_whose_index_flush_fails_is_stored_whole_by_the_retry_even_if_its_entries_stay() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        let batch = consumed_batch();
        fail_leaving_entries(&s, &batch);
        // The records' path time is the time they were consumed: their entries must be durable
        // when the retry returns, or a crash would have them fetched again under another hour.
        s.insert_batch(&batch).unwrap();
        assert!(faults::passed().contains(&Point::FlushIndex), "the retry flushed the index: {:?}", faults::passed());
        the_retry_stores_the_batch_whole(dir.path(), s, &batch);
    }

    #[test]
    fn a_retry_that_brings_new_records_too_flushes_the_entries_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        let batch = consumed_batch();
        fail_leaving_entries(&s, &batch);
        // The retry carries a new record with a Kafka timestamp, which alone would not flush.
        let mut retry = batch.clone();
        retry.push(rec("t", 0, 10, noise(10, 1000)));
        s.insert_batch(&retry).unwrap();
        assert!(faults::passed().contains(&Point::FlushIndex), "the retry flushed the index: {:?}", faults::passed());
        the_retry_stores_the_batch_whole(dir.path(), s, &retry);
    }

    #[test]
    fn the_values_of_a_taken_back_batch_stay_on_disk_until_the_index_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_spool(dir.path());
        faults::clear();
        // The batch's entries are applied, the flush fails, they are taken back, and the flush of
        // that fails too: sled may still have the entries durably, pointing at these values.
        faults::arm(Point::FlushIndex, 0);
        assert!(s.insert_batch(&consumed_batch()).is_err());
        faults::clear();
        assert_eq!(value_files(dir.path()).len(), 1, "the file of the values is kept");
        assert_eq!(s.record_count(), 0);
        s.flush().unwrap();
        drop(s);
        let s = open_spool(dir.path());
        assert_eq!(s.record_count(), 0);
        assert!(value_files(dir.path()).is_empty(), "an opening deletes the files no entry points at");
        the_retry_stores_the_batch_whole(dir.path(), s, &consumed_batch());
    }
}

/// The spool against a model of what it should hold, through random inserts (with records
/// delivered again, before and after their removal), removals and reopenings.
#[cfg(test)]
mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        /// Records (partition, offset) delivered in one batch.
        Insert(Vec<(i32, i64)>),
        /// Removes the live records picked by these numbers.
        Remove(Vec<usize>),
        /// Flushes, closes and opens the spool again.
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0i64..120, prop::collection::vec((0i32..3, 0i64..100), 1..150))
                .prop_map(|(base, rs)| Op::Insert(rs.into_iter().map(|(p, o)| (p, base + o)).collect())),
            3 => prop::collection::vec(any::<usize>(), 1..30).prop_map(Op::Remove),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn the_spool_holds_what_was_inserted_and_not_removed(ops in prop::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().unwrap();
            let mut spool = super::tests::open_spool(dir.path());
            let mut model: BTreeMap<(i32, i64), Vec<u8>> = BTreeMap::new();
            for (step, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(rs) => {
                        let batch: Vec<Record> = rs
                            .iter()
                            .map(|&(p, o)| Record {
                                topic: "t".into(),
                                partition: p,
                                offset: o,
                                time: RecordTime::Kafka(1),
                                key: None,
                                value: format!("{p}/{o}/{step}").into_bytes().into(),
                            })
                            .collect();
                        spool.insert_batch(&batch).unwrap();
                        for r in &batch {
                            model.entry((r.partition, r.offset)).or_insert_with(|| r.value.to_vec());
                        }
                    }
                    Op::Remove(picks) => {
                        for pick in picks {
                            if model.is_empty() {
                                break;
                            }
                            let (p, o) = *model.keys().nth(pick % model.len()).unwrap();
                            spool.remove(&SpoolKey::new("t", p, o)).unwrap();
                            model.remove(&(p, o));
                        }
                    }
                    Op::Reopen => {
                        spool.flush().unwrap();
                        drop(spool);
                        spool = super::tests::open_spool(dir.path());
                    }
                }
                let mut held = BTreeMap::new();
                for p in 0..3 {
                    for (key, r) in spool.pending(&partition_prefix("t", p), |_| false, usize::MAX, usize::MAX).unwrap() {
                        prop_assert_eq!(key, SpoolKey::new("t", p, r.offset));
                        prop_assert!(held.insert((p, r.offset), r.value.to_vec()).is_none(), "read twice: {}/{}", p, r.offset);
                    }
                }
                prop_assert_eq!(&held, &model);
                prop_assert_eq!(spool.record_count(), model.len() as u64);
                prop_assert_eq!(spool.keys().unwrap().len(), model.len());
            }
        }
    }
}
