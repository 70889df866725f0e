//! The spool's part in the Parquet format (ARCHIVE_FORMAT=parquet): a partition's records read
//! from an offset on, in offset order, and the boundaries of sealed batches.
//!
//! The boundary of an object (a partition's first and last offset, and its hour) is kept here,
//! durably, before the object is stored, so that after a crash the retry uploads the same range
//! under the same key, and records Kafka delivers again do not start another object. It stays,
//! marked stored, until Kafka holds a committed offset past it: records of it delivered again
//! after a crash are then known to be stored.

use std::os::unix::fs::FileExt;

use bytes::Bytes;

use super::codec::{decode_value, glimpse_entry};
use super::runs::{Location, NORMAL, run_key, split_run_key};
use super::{Glimpse, Spool, SpoolError, SpoolKey, partition_prefix};
use crate::record::Record;

/// The sled tree of sealed batches: key = the batch's first record's spool key, value = version
/// byte, last offset, hour time in ms, records (big endian), stored (one byte).
pub(super) const SEALED_TREE: &str = "sealed";
const VERSION: u8 = 1;
const VALUE_LEN: usize = 26;

/// A batch whose records are decided: `first_offset..=last_offset` of the partition, the object
/// in the hour folder of `hour_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBatch {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub hour_ms: i64,
    /// How many records it holds (offsets may have gaps: compaction, transaction markers).
    pub records: u64,
    /// Its object is stored.
    pub stored: bool,
}

impl Spool {
    /// Keeps `batch`'s boundary; durable when this returns.
    pub fn seal(&self, batch: &SealedBatch) -> Result<(), SpoolError> {
        self.put_sealed(batch)?;
        self.sealed.flush()?;
        Ok(())
    }

    /// Notes that `batch`'s object is stored. Not made durable at once: lost in a crash, the
    /// object is uploaded again, with the same bytes.
    pub fn mark_stored(&self, batch: &SealedBatch) -> Result<(), SpoolError> {
        self.put_sealed(&SealedBatch { stored: true, ..batch.clone() })
    }

    /// Makes the sealed batches' changes durable (a [`Spool::mark_stored`] before the batch's
    /// offsets are marked done).
    pub fn flush_sealed(&self) -> Result<(), SpoolError> {
        self.sealed.flush()?;
        Ok(())
    }

    fn put_sealed(&self, batch: &SealedBatch) -> Result<(), SpoolError> {
        let key = SpoolKey::new(&batch.topic, batch.partition, batch.first_offset);
        let mut value = Vec::with_capacity(VALUE_LEN);
        value.push(VERSION);
        value.extend_from_slice(&batch.last_offset.to_be_bytes());
        value.extend_from_slice(&batch.hour_ms.to_be_bytes());
        value.extend_from_slice(&batch.records.to_be_bytes());
        value.push(u8::from(batch.stored));
        self.sealed.insert(key.0, value)?;
        Ok(())
    }

    /// Every sealed batch, by partition and first offset.
    pub fn sealed(&self) -> Result<Vec<SealedBatch>, SpoolError> {
        self.sealed_under(&[])
    }

    /// The sealed batches of one partition, by first offset.
    pub fn sealed_of(&self, topic: &str, partition: i32) -> Result<Vec<SealedBatch>, SpoolError> {
        self.sealed_under(&partition_prefix(topic, partition))
    }

    fn sealed_under(&self, prefix: &[u8]) -> Result<Vec<SealedBatch>, SpoolError> {
        let mut out = Vec::new();
        for entry in self.sealed.scan_prefix(prefix) {
            let (k, v) = entry?;
            let key = SpoolKey(k.to_vec());
            let corrupt = |why| SpoolError::Corrupt { key: key.describe(), why };
            let (topic, partition, first_offset) = key.parts().ok_or_else(|| corrupt("a sealed batch's key"))?;
            if v.len() != VALUE_LEN || v[0] != VERSION || v[25] > 1 {
                return Err(corrupt("a sealed batch's value"));
            }
            out.push(SealedBatch {
                topic: topic.to_string(),
                partition,
                first_offset,
                last_offset: i64::from_be_bytes(v[1..9].try_into().expect("8 bytes")),
                hour_ms: i64::from_be_bytes(v[9..17].try_into().expect("8 bytes")),
                records: u64::from_be_bytes(v[17..25].try_into().expect("8 bytes")),
                stored: v[25] == 1,
            });
        }
        Ok(out)
    }

    /// Forgets a batch whose object is stored; durable at the next flush (a batch sealed again
    /// after a crash uploads the same object once more).
    pub fn unseal(&self, topic: &str, partition: i32, first_offset: i64) -> Result<(), SpoolError> {
        self.sealed.remove(SpoolKey::new(topic, partition, first_offset).0)?;
        Ok(())
    }

    /// Records of partition `prefix` from offset `from` on, in offset order: at least `max`
    /// records or `max_bytes` of values (as stored) when the spool holds that many, all of those
    /// up to the last one returned. Records read together share a buffer of up to
    /// [`STRETCH_BYTES`]: copy what is kept longer than the records themselves.
    pub fn read_from(&self, prefix: &[u8], from: i64, max: usize, max_bytes: u64) -> Result<Vec<Record>, SpoolError> {
        let wanted = self.locate(prefix, from, max, max_bytes)?;
        let first = SpoolKey::at(prefix, from);
        let (topic, partition, _) =
            first.parts().ok_or_else(|| SpoolError::Corrupt { key: first.describe(), why: "bad key" })?;
        let mut out = Vec::with_capacity(wanted.len());
        for stretch in Stretches(&wanted) {
            let mut buf = vec![0; stretch.len()];
            let read = self.read_stretch(&stretch, &mut buf);
            // The records' keys, values and header values are slices of the stretch, not copies.
            let buf = Bytes::from(buf);
            self.each_value(prefix, &stretch, &buf, read, |offset, value| {
                let raw = match value {
                    Value::In(range) => buf.slice(range),
                    Value::Alone(raw) => raw.into(),
                };
                out.push(decode_value(topic, partition, offset, raw)?);
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// What [`Spool::read_from`] would return, each record only glimpsed: its offset, time and
    /// value length, which is what batching needs. Nothing is decoded or kept, so the dispatcher
    /// reads its partitions through one buffer instead of building every record it will read
    /// again for its object.
    pub fn scan_from(&self, prefix: &[u8], from: i64, max: usize, max_bytes: u64) -> Result<Vec<Glimpse>, SpoolError> {
        let wanted = self.locate(prefix, from, max, max_bytes)?;
        let mut out = Vec::with_capacity(wanted.len());
        let mut buf = Vec::new();
        for stretch in Stretches(&wanted) {
            if buf.len() < stretch.len() {
                buf.resize(stretch.len(), 0);
            }
            let read = self.read_stretch(&stretch, &mut buf[..stretch.len()]);
            let buf = &buf[..stretch.len()];
            self.each_value(prefix, &stretch, buf, read, |offset, value| {
                let raw = match &value {
                    Value::In(range) => &buf[range.clone()],
                    Value::Alone(raw) => raw,
                };
                out.push(glimpse_entry(prefix, offset, raw)?);
                Ok(())
            })?;
        }
        Ok(out)
    }

    /// Hands each record of `stretch` (partition `prefix`) to `each` with where its value is: in
    /// `buf`, the stretch as read when `read`, or, when the bytes there fail their check (moved by
    /// a compaction, or not whole on disk), looked up alone. A record gone meanwhile is skipped.
    fn each_value(
        &self,
        prefix: &[u8],
        stretch: &Stretch<'_>,
        buf: &[u8],
        read: bool,
        mut each: impl FnMut(i64, Value) -> Result<(), SpoolError>,
    ) -> Result<(), SpoolError> {
        for &(offset, location) in stretch.records {
            match stretch.at(&location, read, buf) {
                Some(range) => each(offset, Value::In(range))?,
                None => {
                    if let Some(raw) = self.value(&SpoolKey::at(prefix, offset), location)? {
                        each(offset, Value::Alone(raw))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The offsets and locations of the records [`Spool::read_from`] returns, in offset order.
    fn locate(&self, prefix: &[u8], from: i64, max: usize, max_bytes: u64) -> Result<Vec<(i64, Location)>, SpoolError> {
        let mut wanted: Vec<(i64, Location)> = Vec::new();
        // Under the lock that removals take, so that none removed is read; values outside it.
        let segments = self.segments();
        let lo = run_key(&SpoolKey::at(prefix, from), NORMAL);
        let start = match self.normal_before(prefix, &lo)? {
            Some((k, _)) => k.to_vec(),
            None => lo,
        };
        // A single (a record delivered again after it was removed) comes after the normal run
        // whose range holds its offset: the runs are read on while they may hold offsets below
        // the highest one read.
        let (mut covered, mut bytes) = (i64::MIN, 0u64);
        for entry in self.index.range(start..) {
            let (k, v) = entry?;
            let (first, kind) = split_run_key(&k);
            if first.prefix() != prefix || ((wanted.len() >= max || bytes >= max_bytes) && first.offset() > covered) {
                break;
            }
            let run = self.run(&segments, &k, &v)?;
            if kind == NORMAL {
                let last = first.offset() + i64::from(run.slots.last().expect("runs are not empty").delta);
                covered = covered.max(last);
            }
            for (offset, location) in run.live_offsets(first.offset()) {
                if offset >= from {
                    bytes += u64::from(location.len);
                    wanted.push((offset, location));
                }
            }
        }
        drop(segments);
        wanted.sort_by_key(|&(offset, _)| offset);
        Ok(wanted)
    }

    /// Reads `stretch` into `buf` (its length) with one read, not one per record: a read per
    /// record took the spool's lock and a system call every time, under the consumer's appends.
    /// False when it could not be read whole (the file is gone: compacted).
    fn read_stretch(&self, stretch: &Stretch<'_>, buf: &mut [u8]) -> bool {
        let file = self.segments().files.get(&stretch.first.segment).map(|s| s.file.clone());
        file.is_some_and(|f| f.read_exact_at(buf, stretch.first.position).is_ok())
    }

    /// How many records of partition `prefix` the spool holds in `first..=last`.
    pub fn count_between(&self, prefix: &[u8], first: i64, last: i64) -> Result<u64, SpoolError> {
        let segments = self.segments();
        let lo = run_key(&SpoolKey::at(prefix, first), NORMAL);
        let start = match self.normal_before(prefix, &lo)? {
            Some((k, _)) => k.to_vec(),
            None => lo,
        };
        let mut n = 0;
        for entry in self.index.range(start..) {
            let (k, v) = entry?;
            let (run_first, _) = split_run_key(&k);
            if run_first.prefix() != prefix || run_first.offset() > last {
                break;
            }
            let run = self.run(&segments, &k, &v)?;
            n += run.live_offsets(run_first.offset()).filter(|(offset, _)| (first..=last).contains(offset)).count()
                as u64;
        }
        Ok(n)
    }

    /// Removes every record (not the sealed batches); returns how many there were.
    pub fn remove_all_records(&self) -> Result<u64, SpoolError> {
        let keys = self.keys()?;
        for key in &keys {
            self.remove(key)?;
        }
        Ok(keys.len() as u64)
    }

    /// Removes the records of a partition below offset `below` and returns their offsets.
    pub fn remove_below(&self, topic: &str, partition: i32, below: i64) -> Result<Vec<i64>, SpoolError> {
        let prefix = partition_prefix(topic, partition);
        let mut keys = Vec::new();
        {
            let segments = self.segments();
            for entry in self.index.scan_prefix(&prefix) {
                let (k, v) = entry?;
                let first = split_run_key(&k).0;
                // Keys are in offset order: a run that starts at `below` holds nothing under it.
                if first.offset() >= below {
                    break;
                }
                let run = self.run(&segments, &k, &v)?;
                keys.extend(run.live_records(&first).map(|(key, _)| key).filter(|k| k.offset() < below));
            }
        }
        for key in &keys {
            self.remove(key)?;
        }
        Ok(keys.iter().map(SpoolKey::offset).collect())
    }
}

/// Records whose values lie end to end in one file (a partition's records of one insert do), at
/// most [`STRETCH_BYTES`] together unless one alone is larger: read with one read.
struct Stretch<'a> {
    records: &'a [(i64, Location)],
    first: Location,
}

impl Stretch<'_> {
    /// Bytes from the first value's start to the last one's end.
    fn len(&self) -> usize {
        let last = self.records[self.records.len() - 1].1;
        (last.position + u64::from(last.len) - self.first.position) as usize
    }

    /// Where the value at `location` is in the stretch's buffer, when the stretch was `read` and
    /// the bytes there are the value's (its CRC); otherwise it is looked up alone (moved by a
    /// compaction, or not whole on disk).
    fn at(&self, location: &Location, read: bool, buf: &[u8]) -> Option<std::ops::Range<usize>> {
        let at = (location.position - self.first.position) as usize;
        let range = at..at + location.len as usize;
        (read && crc32fast::hash(&buf[range.clone()]) == location.crc).then_some(range)
    }
}

/// Where [`Spool::each_value`] found a record's value.
enum Value {
    /// This range of the stretch's buffer.
    In(std::ops::Range<usize>),
    /// Read alone.
    Alone(Vec<u8>),
}

/// Splits records in offset order into [`Stretch`]es.
struct Stretches<'a>(&'a [(i64, Location)]);

impl<'a> Iterator for Stretches<'a> {
    type Item = Stretch<'a>;

    fn next(&mut self) -> Option<Stretch<'a>> {
        let wanted = self.0;
        let first = wanted.first()?.1;
        let mut n = 1;
        let mut bytes = u64::from(first.len);
        while let Some((_, next)) = wanted.get(n) {
            let prev = wanted[n - 1].1;
            bytes += u64::from(next.len);
            if next.segment != prev.segment
                || next.position != prev.position + u64::from(prev.len)
                || bytes > STRETCH_BYTES
            {
                break;
            }
            n += 1;
        }
        let (records, rest) = wanted.split_at(n);
        self.0 = rest;
        Some(Stretch { records, first })
    }
}

/// The most bytes read at once by [`Spool::read_from`] and [`Spool::scan_from`] (a record larger
/// than this is read alone): under malloc's mmap threshold (`crate::malloc`), so that each of
/// `read_from`'s buffers, which its records keep, is heap the allocator reuses, not a new mapping
/// whose every page faults in and is zeroed.
const STRETCH_BYTES: u64 = 64 << 10;
const _: () = assert!((STRETCH_BYTES as usize) < crate::malloc::MMAP_THRESHOLD);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::spool::tests::rec;

    #[test]
    fn values_of_every_size_read_back_whole_across_stretches() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_in_test(dir.path());
        // From empty to four times a stretch, and noise (stored as is, not compressed), so that
        // reads split between records, and a record larger than a stretch is read alone.
        let value = |o: i64| -> Vec<u8> {
            let len = [0, 1, 1000, 40_000, STRETCH_BYTES as usize + 1, 4 * STRETCH_BYTES as usize][o as usize % 6];
            let mut x = o as u64 + 1;
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect()
        };
        let batch: Vec<_> = (0..60)
            .map(|o| {
                let mut r = rec("t", 0, o, value(o));
                r.key = (o % 2 == 0).then(|| Bytes::from(format!("key-{o}")));
                r.headers = Some(vec![("h".to_string(), (o % 3 != 0).then(|| Bytes::from(format!("v{o}"))))]);
                r
            })
            .collect();
        spool.insert_batch(&batch).unwrap();
        let read = spool.read_from(&partition_prefix("t", 0), 0, usize::MAX, u64::MAX).unwrap();
        assert_eq!(read, batch);
        let glimpsed = spool.scan_from(&partition_prefix("t", 0), 0, usize::MAX, u64::MAX).unwrap();
        let want =
            batch.iter().map(|r| Glimpse { offset: r.offset, time: r.time, value_len: r.value_bytes().len() as u64 });
        assert_eq!(glimpsed, want.collect::<Vec<_>>(), "a scan glimpses what a read decodes");
    }

    #[test]
    fn a_read_takes_contiguous_values_up_to_a_stretch_and_a_larger_one_alone() {
        let contiguous = |wanted: &[(i64, Location)]| Stretches(wanted).next().expect("one").records.len();
        let at = |segment, position, len| (0, Location { segment, position, len, crc: 0 });
        let stretch = STRETCH_BYTES as u32;
        // 1 KiB values end to end: as many as fit in a stretch.
        let small: Vec<_> = (0..200u64).map(|i| at(0, i * 1024, 1024)).collect();
        assert_eq!(contiguous(&small), (STRETCH_BYTES / 1024) as usize);
        // A value larger than a stretch is read alone, and ends the stretch before it.
        let big = [at(0, 0, 2 * stretch), at(0, 2 * u64::from(stretch), 10)];
        assert_eq!(contiguous(&big), 1);
        let before = [at(0, 0, 10), at(0, 10, stretch)];
        assert_eq!(contiguous(&before), 1);
        // A gap, or another file, ends it.
        assert_eq!(contiguous(&[at(0, 0, 10), at(0, 11, 10)]), 1);
        assert_eq!(contiguous(&[at(0, 0, 10), at(1, 10, 10)]), 1);
        assert_eq!(contiguous(&[at(0, 0, 10), at(0, 10, 10)]), 2);
    }

    #[test]
    fn a_partition_reads_in_offset_order_from_any_offset_with_records_delivered_again() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open_in_test(dir.path());
        let batch: Vec<_> = (0..2000).map(|o| rec("t", 0, o, vec![o as u8; 10])).collect();
        spool.insert_batch(&batch).unwrap();
        spool.insert_batch(&[rec("t", 1, 5, vec![1]), rec("s", 0, 3, vec![1])]).unwrap();
        // 700 and 701 removed, then delivered again: each a run of its own after the one
        // that held it.
        for o in [700, 701] {
            spool.remove(&SpoolKey::new("t", 0, o)).unwrap();
        }
        spool.insert_batch(&[rec("t", 0, 701, vec![9]), rec("t", 0, 700, vec![9])]).unwrap();
        let prefix = partition_prefix("t", 0);
        let offsets = |from, max, bytes| -> Vec<i64> {
            let read: Vec<i64> = spool.read_from(&prefix, from, max, bytes).unwrap().iter().map(|r| r.offset).collect();
            let scanned: Vec<i64> =
                spool.scan_from(&prefix, from, max, bytes).unwrap().iter().map(|g| g.offset).collect();
            assert_eq!(scanned, read, "a scan takes the records a read does");
            read
        };
        // Whole runs are read: at least `max`, contiguous from `from`, every one in order.
        for (from, max) in [(0, 1), (600, 150), (650, 100), (1999, 10), (5, 10_000)] {
            let got = offsets(from, max, u64::MAX);
            assert!(got.len() >= max.min(2000 - from as usize), "{from}: {}", got.len());
            assert_eq!(got, (from..from + got.len() as i64).collect::<Vec<_>>(), "from {from}");
        }
        assert!(offsets(2000, 10, u64::MAX).is_empty(), "nothing beyond the last");
        assert!(offsets(0, usize::MAX, 100).len() < 2000, "bounded by bytes");
        let read = spool.read_from(&prefix, 700, 2, u64::MAX).unwrap();
        assert_eq!(read[0].value_bytes(), [9], "the record delivered again");

        assert_eq!(spool.count_between(&prefix, 650, 749).unwrap(), 100);
        assert_eq!(spool.count_between(&prefix, 1990, 3000).unwrap(), 10);
        assert_eq!(spool.remove_below("t", 0, 702).unwrap(), (0..702).collect::<Vec<_>>());
        assert_eq!(offsets(0, 1, u64::MAX)[0], 702);
        assert_eq!(spool.record_count(), 2000 - 702 + 2, "other partitions keep theirs");
    }

    fn batch(partition: i32, first_offset: i64, last_offset: i64) -> SealedBatch {
        SealedBatch {
            topic: "t".into(),
            partition,
            first_offset,
            last_offset,
            hour_ms: 1_650_247_200_000,
            records: 7,
            stored: false,
        }
    }

    /// Set in the child process that seals and then aborts.
    const CHILD: &str = "SPOOL_SEALED_CRASH_DIR";

    #[test]
    fn a_sealed_batch_survives_a_crash_and_goes_once_unsealed() {
        if let Some(dir) = std::env::var_os(CHILD) {
            let spool = Spool::open_in_test(std::path::Path::new(&dir));
            spool.seal(&batch(1, 100, 199)).unwrap();
            spool.seal(&batch(0, 5, 9)).unwrap();
            // A crash: no destructor runs, nothing is flushed but what seal() made durable.
            std::process::abort();
        }
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "pipeline::spool::sealed::tests::a_sealed_batch_survives_a_crash_and_goes_once_unsealed"])
            .env(CHILD, dir.path())
            .output()
            .unwrap();
        assert!(!child.status.success(), "the child aborts: {child:?}");
        let spool = Spool::open_in_test(dir.path());
        assert_eq!(spool.sealed().unwrap(), [batch(0, 5, 9), batch(1, 100, 199)]);
        spool.unseal("t", 0, 5).unwrap();
        spool.flush().unwrap();
        drop(spool);
        let spool = Spool::open_in_test(dir.path());
        assert_eq!(spool.sealed().unwrap(), [batch(1, 100, 199)]);
        assert_eq!(spool.record_count(), 0, "batches are not records");
        spool.mark_stored(&batch(1, 100, 199)).unwrap();
        assert_eq!(spool.sealed_of("t", 1).unwrap(), [SealedBatch { stored: true, ..batch(1, 100, 199) }]);
        assert!(spool.sealed_of("t", 0).unwrap().is_empty());
    }
}
