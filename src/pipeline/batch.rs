//! Batches of the Parquet format (ARCHIVE_FORMAT=parquet): which of a partition's records go into
//! one object, and when the object is sealed.
//!
//! A batch holds consecutive records of one partition whose path times fall in one hour folder
//! (the archive's layout: every record of an object is in that object's hour). It is sealed when a
//! record of another hour comes, when it holds `max_records` or `max_bytes` of payload, or when its
//! oldest record has waited `max_age` (wall clock, so that a quiet partition's records reach the
//! bucket within it). A pure state machine: records and the time in, seal decisions out; where
//! the boundaries are kept durably is the uploader's part.

use std::time::{Duration, Instant};

use crate::archive::{Layout, hour_start_ms};

/// When a batch is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_records: usize,
    /// Record values' bytes.
    pub max_bytes: u64,
    pub max_age: Duration,
}

/// Why a batch was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seal {
    /// The next record is in another hour folder.
    Hour,
    Records,
    Bytes,
    /// Its oldest record waited `max_age`.
    Age,
    /// The spool fills: the largest open batch goes, so that records leave it.
    Spool,
    /// Records after it belong to a batch sealed earlier (before a crash).
    Boundary,
}

impl Seal {
    /// The `reason` label of the seal metric.
    pub fn label(self) -> &'static str {
        match self {
            Seal::Hour => "hour",
            Seal::Records => "records",
            Seal::Bytes => "bytes",
            Seal::Age => "age",
            Seal::Spool => "spool",
            Seal::Boundary => "boundary",
        }
    }
}

/// The open batch of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub first_offset: i64,
    pub last_offset: i64,
    /// `year=…/hour=HH` of its records.
    pub hour: String,
    pub records: usize,
    pub bytes: u64,
    /// The path time of its first record, ms: its hour.
    pub first_ms: i64,
    /// When its first record came.
    pub opened: Instant,
    /// The instants of `hour`, so that a record's hour is told without formatting its path.
    hour_ms: std::ops::Range<i64>,
}

/// What to do with the next record of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// It joins the open batch (or opens one).
    Add,
    /// Seal the open batch first; the record opens the next one.
    SealThenAdd(Seal),
}

/// Decides the batches of one partition.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    layout: Layout,
    open: Option<Batch>,
}

impl Batcher {
    pub fn new(limits: BatchLimits, layout: Layout) -> Batcher {
        Batcher { limits, layout, open: None }
    }

    /// The open batch, if any.
    pub fn open(&self) -> Option<&Batch> {
        self.open.as_ref()
    }

    /// Takes the next record of the partition (offsets increasing) at `now`: its offset, path time
    /// in ms and value length. When the open batch must be sealed first, it is returned with the
    /// reason, and the record opens a new batch.
    pub fn push(&mut self, offset: i64, ms: i64, bytes: u64, now: Instant) -> Option<(Batch, Seal)> {
        // The hour's path only where the record is not within the open batch's hour (a batch's
        // first record, an hour's end, a timestamp that went back).
        let other_hour = |b: &Batch| !b.hour_ms.contains(&ms) && b.hour != self.layout.hour_path(ms);
        let sealed = match &self.open {
            Some(b) if other_hour(b) => Some(Seal::Hour),
            Some(b) if b.records >= self.limits.max_records => Some(Seal::Records),
            // A record larger than max_bytes still goes alone into a batch of its own.
            Some(b) if b.bytes + bytes > self.limits.max_bytes => Some(Seal::Bytes),
            _ => None,
        };
        let done = sealed.and_then(|why| self.open.take().map(|b| (b, why)));
        match &mut self.open {
            Some(b) => {
                b.last_offset = offset;
                b.records += 1;
                b.bytes += bytes;
            }
            None => {
                let hour = self.layout.hour_path(ms);
                // No instant for the path (it cannot happen): every record then compares paths.
                let hour_ms = hour_start_ms(&hour, &self.layout).map_or(0..0, |start| start..start + 3_600_000);
                self.open = Some(Batch {
                    first_offset: offset,
                    last_offset: offset,
                    hour,
                    records: 1,
                    bytes,
                    first_ms: ms,
                    opened: now,
                    hour_ms,
                });
            }
        }
        done
    }

    /// Seals the open batch now, if there is one.
    pub fn seal(&mut self) -> Option<Batch> {
        self.open.take()
    }

    /// Seals the open batch when it holds `max_records` or `max_bytes`, or its oldest record has
    /// waited `max_age` at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<(Batch, Seal)> {
        let b = self.open.as_ref()?;
        let why = if b.records >= self.limits.max_records {
            Seal::Records
        } else if b.bytes >= self.limits.max_bytes {
            Seal::Bytes
        } else if now.duration_since(b.opened) >= self.limits.max_age {
            Seal::Age
        } else {
            return None;
        };
        self.open.take().map(|b| (b, why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR_MS: i64 = 3_600_000;
    /// 2022-04-18T11:00:00+09:00, the start of an hour folder in Asia/Tokyo.
    const T0: i64 = 1_650_247_200_000;

    fn batcher(max_records: usize, max_bytes: u64) -> Batcher {
        Batcher::new(BatchLimits { max_records, max_bytes, max_age: Duration::from_secs(60) }, Layout::default())
    }

    #[test]
    fn a_new_hour_seals_the_batch() {
        let (mut b, now) = (batcher(1000, 1 << 20), Instant::now());
        assert_eq!(b.push(0, T0, 10, now), None);
        assert_eq!(b.push(1, T0 + HOUR_MS - 1, 10, now), None);
        let (sealed, why) = b.push(2, T0 + HOUR_MS, 10, now).unwrap();
        assert_eq!((sealed.first_offset, sealed.last_offset, sealed.records, why), (0, 1, 2, Seal::Hour));
        assert_eq!(sealed.hour, "year=2022/month=04/day=18/hour=11");
        let open = b.open().unwrap();
        assert_eq!((open.first_offset, open.hour.as_str()), (2, "year=2022/month=04/day=18/hour=12"));
    }

    #[test]
    fn records_and_bytes_bound_a_batch_and_a_large_record_goes_alone() {
        let (mut b, now) = (batcher(3, 100), Instant::now());
        let sealed: Vec<_> = (0..7).filter_map(|o| b.push(o, T0, 10, now)).collect();
        assert_eq!(
            sealed.iter().map(|(s, w)| (s.first_offset, s.last_offset, *w)).collect::<Vec<_>>(),
            [(0, 2, Seal::Records), (3, 5, Seal::Records)]
        );
        let (mut b, now) = (batcher(1000, 100), Instant::now());
        assert_eq!(b.push(0, T0, 60, now), None);
        let (s, why) = b.push(1, T0, 60, now).unwrap();
        assert_eq!((s.last_offset, s.bytes, why), (0, 60, Seal::Bytes));
        let (s, why) = b.push(2, T0, 500, now).unwrap();
        assert_eq!((s.first_offset, s.last_offset, why), (1, 1, Seal::Bytes));
        let (s, why) = b.poll(now).unwrap();
        assert_eq!((s.first_offset, s.bytes, why), (2, 500, Seal::Bytes), "over max_bytes alone: sealed at once");
    }

    #[test]
    fn a_quiet_partition_is_sealed_after_max_age_of_its_oldest_record() {
        let (mut b, start) = (batcher(1000, 1 << 20), Instant::now());
        assert_eq!(b.poll(start), None, "nothing open");
        b.push(0, T0, 10, start);
        b.push(1, T0, 10, start + Duration::from_secs(50));
        assert_eq!(b.poll(start + Duration::from_secs(59)), None);
        let (s, why) = b.poll(start + Duration::from_secs(60)).unwrap();
        assert_eq!((s.first_offset, s.last_offset, why), (0, 1, Seal::Age));
        assert!(b.open().is_none());
    }
}
