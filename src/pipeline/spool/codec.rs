//! The value codec: a record's key in the spool, and the encoding of its value side (time, Kafka
//! key, value, zstd when that pays) as it is written to the value files and read back. A record's
//! format on disk lives here alone, so that a change to it is made in one place.

use bytes::{Buf, Bytes};

use super::SpoolError;
use crate::record::{Headers, Record, RecordTime};

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
    pub fn at(prefix: &[u8], offset: i64) -> SpoolKey {
        let mut k = Vec::with_capacity(prefix.len() + 8);
        k.extend_from_slice(prefix);
        k.extend_from_slice(&(offset as u64).to_be_bytes());
        SpoolKey(k)
    }

    /// The offset part of the key.
    pub fn offset(&self) -> i64 {
        let at = self.0.len().saturating_sub(8);
        self.0.get(at..).and_then(|b| b.try_into().ok()).map_or(0, i64::from_be_bytes)
    }

    pub(super) fn describe(&self) -> String {
        match self.parts() {
            Some((t, p, o)) => describe(t, p, o),
            None => format!("{:02x?}", self.0),
        }
    }
}

/// How errors name a record.
fn describe(topic: &str, partition: i32, offset: i64) -> String {
    format!("{topic}+{partition}+{offset}")
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

/// Version 2 added headers; a version 1 entry (written before) has them unknown. An older
/// archiver refuses version 2 entries as corrupt rather than misread them.
const FORMAT_VERSION: u8 = 2;
const FORMAT_VERSION_WITHOUT_HEADERS: u8 = 1;
const FLAG_CONSUMED_TIME: u8 = 1;
const FLAG_ZSTD: u8 = 2;
const FLAG_KEY: u8 = 4;
/// A tombstone: no value follows.
const FLAG_NULL: u8 = 8;
/// Headers follow the key: a count, then each name and value (a null value's length is
/// [`NULL_LEN`]). Entries without headers are written as before this flag existed.
const FLAG_HEADERS: u8 = 16;
const NULL_LEN: u32 = u32::MAX;
/// Values at least this large are tried with zstd.
const COMPRESS_MIN_BYTES: usize = 16 * 1024;
/// Largest value the spool accepts back from disk (guards decompression against corruption).
const MAX_VALUE_BYTES: usize = 1 << 31;

/// How the spool stores records, and the bound it is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Values at least this large are tried with zstd; `None` stores every value as is.
    pub compress_min_bytes: Option<usize>,
    /// The bound the records' bytes are held to (SPOOL_MAX_BYTES), which the value files may
    /// exceed by a quarter in removed records before one is compacted; 0 when there is none.
    pub max_bytes: u64,
    /// The free space consumption pauses under (SPOOL_MIN_FREE_BYTES): under twice as much, removed
    /// records are compacted away as soon as they take a quarter of the live ones, whatever
    /// `max_bytes` allows, so that they are not what keeps the consumer paused.
    pub min_free_bytes: u64,
}

impl Default for SpoolOptions {
    /// Values of 16 KiB and more are tried with zstd; no bounds.
    fn default() -> SpoolOptions {
        SpoolOptions { compress_min_bytes: Some(COMPRESS_MIN_BYTES), max_bytes: 0, min_free_bytes: 0 }
    }
}

/// A record's value side, borrowed from wherever it is: a [`Record`], or a message the consumer
/// fetched (so that its key and value are copied once, into the encoded entry).
#[derive(Debug, Clone, Copy)]
pub struct Fields<'a> {
    pub time: RecordTime,
    pub key: Option<&'a [u8]>,
    /// Empty when the record has none.
    pub headers: &'a [(String, Option<Bytes>)],
    /// None for a tombstone (a null value).
    pub value: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    pub fn of(r: &'a Record) -> Fields<'a> {
        Fields {
            time: r.time,
            key: r.key.as_deref(),
            headers: r.headers.as_deref().unwrap_or_default(),
            value: r.value.as_deref(),
        }
    }
}

/// Encodes a record's value side: version, flags, time, optional key, optional headers, value.
pub fn encode_value(r: &Record) -> Vec<u8> {
    encode_fields(&Fields::of(r), SpoolOptions::default())
}

/// [`encode_value`] of borrowed fields, with the given options.
pub(super) fn encode_fields(r: &Fields<'_>, options: SpoolOptions) -> Vec<u8> {
    let mut flags = 0;
    if matches!(r.time, RecordTime::Consumed(_)) {
        flags |= FLAG_CONSUMED_TIME;
    }
    if r.key.is_some() {
        flags |= FLAG_KEY;
    }
    if r.value.is_none() {
        flags |= FLAG_NULL;
    }
    let headers = r.headers;
    if !headers.is_empty() {
        flags |= FLAG_HEADERS;
    }
    let value = r.value.unwrap_or_default();
    let compressed = options
        .compress_min_bytes
        .is_some_and(|min| value.len() >= min)
        .then(|| zstd::bulk::compress(value, 1).ok())
        .flatten()
        .filter(|c| c.len() + value.len() / 8 <= value.len());
    if compressed.is_some() {
        flags |= FLAG_ZSTD;
    }
    let key_len = r.key.map_or(0, |k| 4 + k.len());
    let mut out = Vec::with_capacity(10 + key_len + 4 + value.len());
    out.push(FORMAT_VERSION);
    out.push(flags);
    out.extend_from_slice(&r.time.millis().to_be_bytes());
    if let Some(k) = r.key {
        out.extend_from_slice(&(k.len() as u32).to_be_bytes());
        out.extend_from_slice(k);
    }
    if !headers.is_empty() {
        out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (name, value) in headers {
            out.extend_from_slice(&(name.len() as u32).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
            match value {
                Some(v) => {
                    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    out.extend_from_slice(v);
                }
                None => out.extend_from_slice(&NULL_LEN.to_be_bytes()),
            }
        }
    }
    match compressed {
        Some(c) => {
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(&c);
        }
        None => out.extend_from_slice(value),
    }
    out
}

/// What the dispatcher of the Parquet format needs of a spooled record to batch it, read without
/// decoding the record ([`Spool::scan_from`](super::Spool::scan_from)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Glimpse {
    pub offset: i64,
    pub time: RecordTime,
    /// The length of its value as [`decode_entry`] gives it back (0 for a tombstone).
    pub value_len: u64,
}

/// The [`Glimpse`] of an encoded entry: what [`decode_entry`] would give for its time and value
/// length, from the lengths in its header alone (nothing copied, nothing decompressed). It walks
/// the entry as [`decode_entry`] does: a change to the format is made in both. It checks only the
/// lengths, so an entry it accepts can still fail to decode (a header name not UTF-8, a value
/// that does not decompress): the object's upload then fails on it.
///
/// `offset` is the record's, in the partition of `prefix`.
pub(super) fn glimpse_entry(prefix: &[u8], offset: i64, raw: &[u8]) -> Result<Glimpse, SpoolError> {
    let corrupt = |why| SpoolError::Corrupt { key: SpoolKey::at(prefix, offset).describe(), why };
    if raw.len() < 10 || !(raw[0] == FORMAT_VERSION || raw[0] == FORMAT_VERSION_WITHOUT_HEADERS) {
        return Err(corrupt("unknown format"));
    }
    let flags = raw[1];
    let ms = i64::from_be_bytes(raw[2..10].try_into().expect("8 bytes"));
    let mut rest = &raw[10..];
    let take_len = |rest: &mut &[u8]| rest.try_get_u32().map(|n| n as usize).map_err(|_| corrupt("cut short"));
    let skip = |rest: &mut &[u8], n: usize, why| {
        if rest.len() < n {
            return Err(corrupt(why));
        }
        rest.advance(n);
        Ok(())
    };
    if flags & FLAG_KEY != 0 {
        let n = take_len(&mut rest)?;
        skip(&mut rest, n, "key cut short")?;
    }
    if flags & FLAG_HEADERS != 0 {
        for _ in 0..take_len(&mut rest)? {
            let n = take_len(&mut rest)?;
            skip(&mut rest, n, "header name cut short")?;
            match take_len(&mut rest)? {
                n if n == NULL_LEN as usize => {}
                n => skip(&mut rest, n, "header value cut short")?,
            }
        }
    }
    let value_len = if flags & FLAG_NULL != 0 {
        0
    } else if flags & FLAG_ZSTD != 0 {
        match take_len(&mut rest)? {
            n if n > MAX_VALUE_BYTES => return Err(corrupt("value too large")),
            n => n,
        }
    } else {
        rest.len()
    };
    let time = if flags & FLAG_CONSUMED_TIME != 0 { RecordTime::Consumed(ms) } else { RecordTime::Kafka(ms) };
    Ok(Glimpse { offset, time, value_len: value_len as u64 })
}

/// Decodes a spool entry back into a record ([`glimpse_entry`] walks it the same way). Its key,
/// value and header values are slices of `raw` (a value stored compressed excepted), not copies:
/// entries read together share one buffer, which lives as long as any of them.
pub fn decode_entry(key: &SpoolKey, raw: Bytes) -> Result<Record, SpoolError> {
    let (topic, partition, offset) =
        key.parts().ok_or_else(|| SpoolError::Corrupt { key: key.describe(), why: "bad key" })?;
    decode_value(topic, partition, offset, raw)
}

/// [`decode_entry`] of the record at `offset` of `topic` and `partition`: for reads of many
/// records of one partition, which take the topic and partition from its key once.
pub(super) fn decode_value(topic: &str, partition: i32, offset: i64, raw: Bytes) -> Result<Record, SpoolError> {
    let corrupt = |why| SpoolError::Corrupt { key: describe(topic, partition, offset), why };
    if raw.len() < 10 || !(raw[0] == FORMAT_VERSION || raw[0] == FORMAT_VERSION_WITHOUT_HEADERS) {
        return Err(corrupt("unknown format"));
    }
    let flags = raw[1];
    let ms = i64::from_be_bytes(raw[2..10].try_into().expect("8 bytes"));
    let mut rest = raw.slice(10..);
    let take_len = |rest: &mut Bytes| rest.try_get_u32().map(|n| n as usize).map_err(|_| corrupt("cut short"));
    let take = |rest: &mut Bytes, n: usize, why| -> Result<Bytes, SpoolError> {
        if rest.len() < n {
            return Err(corrupt(why));
        }
        Ok(rest.split_to(n))
    };
    let record_key = if flags & FLAG_KEY != 0 {
        let n = take_len(&mut rest)?;
        Some(take(&mut rest, n, "key cut short")?)
    } else {
        None
    };
    let mut headers = Headers::new();
    if flags & FLAG_HEADERS != 0 {
        let count = take_len(&mut rest)?;
        for _ in 0..count {
            let n = take_len(&mut rest)?;
            let name = take(&mut rest, n, "header name cut short")?;
            let name = std::str::from_utf8(&name).map_err(|_| corrupt("header name not UTF-8"))?.to_string();
            let value = match take_len(&mut rest)? {
                n if n == NULL_LEN as usize => None,
                n => Some(take(&mut rest, n, "header value cut short")?),
            };
            headers.push((name, value));
        }
    }
    let value = if flags & FLAG_NULL != 0 {
        None
    } else if flags & FLAG_ZSTD != 0 {
        let n = take_len(&mut rest)?;
        if n > MAX_VALUE_BYTES {
            return Err(corrupt("value too large"));
        }
        Some(Bytes::from(zstd::bulk::decompress(&rest, n)?))
    } else {
        Some(rest)
    };
    let time = if flags & FLAG_CONSUMED_TIME != 0 { RecordTime::Consumed(ms) } else { RecordTime::Kafka(ms) };
    let headers = (raw[0] == FORMAT_VERSION).then_some(headers);
    Ok(Record { topic: topic.to_string(), partition, offset, time, key: record_key, value, headers })
}
