//! Spool: the write-ahead queue on local disk between the consumer and the uploaders.
//!
//! A sled tree keyed by (topic, partition, offset), so a record fetched twice is stored once and
//! a partition's records are read back in offset order. The consumer inserts records in batches;
//! the uploaders read them, store their objects, and only then remove them (design invariant 2:
//! removed from the spool implies stored). After a crash, what is left here is the first work.
//!
//! Durability: sled makes writes durable on its periodic flush, not at once. That is enough
//! because Kafka still holds every record that is not committed, and nothing is committed before
//! its objects are stored: an insert lost in a crash is fetched again, a removal lost in a crash
//! repeats an identical upload. The exception is a record without a Kafka timestamp, whose path
//! comes from the time it was consumed: [`Spool::insert_batch`] flushes before returning when a
//! batch holds one, so a retry never sees another time.
//!
//! Large values are compressed with zstd when that saves at least an eighth of them
//! ([`SpoolOptions::compress_min_bytes`]).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool storage error: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt spool entry {key}: {why}")]
    Corrupt { key: String, why: &'static str },
    #[error("spool compression error: {0}")]
    Compression(#[from] std::io::Error),
}

/// When a record's path time was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordTime {
    /// The Kafka record timestamp, milliseconds.
    Kafka(i64),
    /// The record had none: the time it was consumed, milliseconds.
    Consumed(i64),
}

impl RecordTime {
    pub fn millis(self) -> i64 {
        match self {
            RecordTime::Kafka(ms) | RecordTime::Consumed(ms) => ms,
        }
    }

    pub fn kafka(self) -> Option<i64> {
        match self {
            RecordTime::Kafka(ms) => Some(ms),
            RecordTime::Consumed(_) => None,
        }
    }
}

/// A Kafka record as the spool keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub time: RecordTime,
    pub key: Option<Bytes>,
    pub value: Bytes,
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
    /// Inserts flush once this many bytes were written since the last flush. sled holds what it
    /// has not written out in memory, so this bounds the memory a fast consumer can take.
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

/// The spool: a sled database with one tree of records.
#[derive(Debug)]
pub struct Spool {
    dir: std::path::PathBuf,
    options: SpoolOptions,
    db: sled::Db,
    records: sled::Tree,
    /// Partition prefixes that have (or recently had) records.
    partitions: Mutex<BTreeSet<Vec<u8>>>,
    /// Woken when records are inserted.
    inserted: Notify,
    count: AtomicU64,
    bytes: AtomicU64,
    /// Bytes inserted since the last flush.
    unflushed: AtomicU64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Spool, SpoolError> {
        Spool::open_with(dir, cache_bytes, SpoolOptions::default())
    }

    /// [`Spool::open`] with the given options. They apply to the records inserted from now on;
    /// records already in the spool are read back whatever options wrote them.
    pub fn open_with(dir: &Path, cache_bytes: u64, options: SpoolOptions) -> Result<Spool, SpoolError> {
        std::fs::create_dir_all(dir)?;
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).flush_every_ms(Some(500)).open()?;
        let records = db.open_tree("records")?;
        let (mut count, mut bytes) = (0, 0);
        let mut partitions = BTreeSet::new();
        for entry in records.iter() {
            let (k, v) = entry?;
            count += 1;
            bytes += (k.len() + v.len()) as u64;
            let key = SpoolKey(k.to_vec());
            partitions.insert(key.prefix().to_vec());
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            options,
            db,
            records,
            partitions: Mutex::new(partitions),
            inserted: Notify::new(),
            count: AtomicU64::new(count),
            bytes: AtomicU64::new(bytes),
            unflushed: AtomicU64::new(0),
        })
    }

    /// Stores a batch of records at once and wakes the uploaders.
    pub fn insert_batch(&self, records: &[Record]) -> Result<(), SpoolError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut added = 0u64;
        let mut must_flush = false;
        let mut prefixes = Vec::new();
        for r in records {
            let key = SpoolKey::new(&r.topic, r.partition, r.offset);
            let value = encode_value_with(r, self.options);
            added += (key.0.len() + value.len()) as u64;
            must_flush |= matches!(r.time, RecordTime::Consumed(_));
            if prefixes.last().is_none_or(|p: &Vec<u8>| p.as_slice() != key.prefix()) {
                prefixes.push(key.prefix().to_vec());
            }
            batch.insert(key.0, value);
        }
        self.records.apply_batch(batch)?;
        let unflushed = self.unflushed.fetch_add(added, Ordering::Relaxed) + added;
        if must_flush || unflushed >= self.options.flush_bytes {
            self.unflushed.store(0, Ordering::Relaxed);
            self.records.flush()?;
        }
        self.count.fetch_add(records.len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(added, Ordering::Relaxed);
        self.partitions.lock().expect("spool lock").extend(prefixes);
        self.inserted.notify_one();
        Ok(())
    }

    /// Up to `max` records of one partition in offset order, passing over keys `skip` accepts,
    /// and stopping once their values reach `max_bytes` (at least one record is returned).
    pub fn pending(
        &self,
        prefix: &[u8],
        mut skip: impl FnMut(&SpoolKey) -> bool,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<(SpoolKey, Record)>, SpoolError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for entry in self.records.scan_prefix(prefix) {
            let (k, v) = entry?;
            let key = SpoolKey(k.to_vec());
            if skip(&key) {
                continue;
            }
            let record = decode_entry(&key, &v)?;
            bytes += record.value.len();
            out.push((key, record));
            if out.len() >= max || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Every key in the spool (start-up recovery).
    pub fn keys(&self) -> impl Iterator<Item = Result<SpoolKey, SpoolError>> + '_ {
        self.records.iter().keys().map(|k| Ok(SpoolKey(k?.to_vec())))
    }

    /// Removes a record whose objects are stored.
    pub fn remove(&self, key: &SpoolKey) -> Result<(), SpoolError> {
        if let Some(old) = self.records.remove(&key.0)? {
            self.count.fetch_sub(1, Ordering::Relaxed);
            self.bytes.fetch_sub((key.0.len() + old.len()) as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Partition prefixes with records; forgets those found empty.
    pub fn partitions(&self) -> Vec<Vec<u8>> {
        let mut set = self.partitions.lock().expect("spool lock");
        set.retain(|p| self.records.scan_prefix(p).next().is_some());
        set.iter().cloned().collect()
    }

    /// Waits until records are inserted.
    pub async fn inserted(&self) {
        self.inserted.notified().await
    }

    pub fn record_count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn byte_count(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Free space on the spool's file system (`u64::MAX` when it cannot be read).
    pub fn available_space(&self) -> u64 {
        fs4::available_space(&self.dir).unwrap_or(u64::MAX)
    }

    /// Makes every earlier write durable.
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
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
        let reopened = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(reopened.pending(&partition_prefix("t", 0), |_| false, 10, usize::MAX).unwrap()[0].1, big);
    }

    #[test]
    fn spool_survives_reopen_and_dedupes() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Spool::open(dir.path(), 1 << 20).unwrap();
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
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.record_count(), 2);
        assert_eq!(s.partitions(), vec![partition_prefix("a", 0), partition_prefix("b", 3)]);
        let got = s.pending(&partition_prefix("a", 0), |_| false, 10, usize::MAX).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1.value, Bytes::from_static(b"x"));
        let skipped = s.pending(&partition_prefix("a", 0), |k| k.parts().unwrap().2 == 1, 10, usize::MAX).unwrap();
        assert!(skipped.is_empty());
    }

    #[test]
    fn pending_stops_at_the_byte_budget_but_returns_at_least_one_record() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spool::open(dir.path(), 1 << 20).unwrap();
        let noise = |o: i64| (0..4000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ o as u8).collect();
        s.insert_batch(&(0..5).map(|o| rec("t", 0, o, noise(o))).collect::<Vec<_>>()).unwrap();
        let offsets = |max_bytes| -> Vec<i64> {
            let got = s.pending(&partition_prefix("t", 0), |_| false, 10, max_bytes).unwrap();
            got.iter().map(|(_, r)| r.offset).collect()
        };
        assert_eq!(offsets(10_000), vec![0, 1, 2], "stops once 10,000 bytes are reached");
        assert_eq!(offsets(1), vec![0], "a record larger than the budget still comes");
        assert_eq!(offsets(usize::MAX), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn inserts_flush_once_the_unflushed_bytes_reach_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let options = SpoolOptions { flush_bytes: 10_000, ..SpoolOptions::default() };
        let s = Spool::open_with(dir.path(), 1 << 20, options).unwrap();
        s.insert_batch(&[rec("t", 0, 0, vec![1; 6_000])]).unwrap();
        assert!(s.unflushed.load(Ordering::Relaxed) >= 6_000, "below the bound: not flushed yet");
        s.insert_batch(&[rec("t", 0, 1, vec![2; 6_000])]).unwrap();
        assert_eq!(s.unflushed.load(Ordering::Relaxed), 0, "the bound was passed: flushed");
    }
}
