//! The run index: the sled tree that says where each record's value is. One entry covers a run of
//! a partition's records written one after another (their file, position, lengths, CRCs and which
//! were removed), because an entry per record made sled's per-entry cost the bound of the ingest.

use std::collections::HashSet;

use super::segments::Segments;
use super::{Spool, SpoolError, SpoolKey};

/// The sled tree of the index: one entry per run of records (see [`Run`]).
pub(super) const RUNS_TREE: &str = "runs";

/// Version byte of a run entry.
const RUN_VERSION: u8 = 2;
/// Most records in one run.
const MAX_RUN: usize = 512;

/// The last byte of a run's key. A normal run holds records of consecutive spooled offsets of one
/// partition, and the offset ranges of normal runs never overlap. A single holds one record whose
/// offset lies inside a normal run's range: one delivered again after it was removed from that run.
pub(super) const NORMAL: u8 = 0;
pub(super) const SINGLE: u8 = 1;

/// Where a record's encoded value is: segment file, position, length and CRC-32 of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Location {
    pub(super) segment: u32,
    pub(super) position: u64,
    pub(super) len: u32,
    pub(super) crc: u32,
}

/// One record of a run: its offset after the run's first, the length and CRC-32 of its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Slot {
    pub(super) delta: u32,
    pub(super) len: u32,
    pub(super) crc: u32,
}

/// Records of one partition whose values lie one after another in one value file, indexed by one
/// sled entry. sled copies a tree node on every change and splits its leaves above 16 entries, so
/// an entry per record bounded the spool's ingest at sled's per-entry cost (figures in
/// `benches/results/HISTORY.md`, "Spool design notes").
///
/// The entry's key is the record key of the run's first offset followed by its kind ([`NORMAL`] or
/// [`SINGLE`]); the value holds the file, the position of the first value, the slots and which of
/// them were removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) segment: u32,
    pub(super) position: u64,
    pub(super) slots: Vec<Slot>,
    pub(super) removed: Vec<bool>,
}

impl Run {
    pub(super) fn encode(&self) -> Vec<u8> {
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

    pub(super) fn decode(key: &[u8], raw: &[u8]) -> Result<Run, SpoolError> {
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
    pub(super) fn locations(&self) -> impl Iterator<Item = Location> + '_ {
        let mut position = self.position;
        self.slots.iter().map(move |s| {
            let at = position;
            position += u64::from(s.len);
            Location { segment: self.segment, position: at, len: s.len, crc: s.crc }
        })
    }

    pub(super) fn live(&self) -> usize {
        self.removed.iter().filter(|r| !**r).count()
    }

    /// The records not removed: offset and where the value is. `first` is the run's first offset.
    pub(super) fn live_offsets(&self, first: i64) -> impl Iterator<Item = (i64, Location)> + '_ {
        self.slots
            .iter()
            .zip(self.locations())
            .zip(&self.removed)
            .filter(|(_, removed)| !**removed)
            .map(move |((slot, location), _)| (first + i64::from(slot.delta), location))
    }

    /// [`Run::live_offsets`] with each record's key. `first` is the key of the run's first offset.
    pub(super) fn live_records<'a>(&'a self, first: &'a SpoolKey) -> impl Iterator<Item = (SpoolKey, Location)> + 'a {
        self.live_offsets(first.offset()).map(|(offset, location)| (SpoolKey::at(first.prefix(), offset), location))
    }

    /// The slot holding `delta`, if any.
    pub(super) fn slot(&self, delta: u64) -> Option<usize> {
        self.slots.binary_search_by_key(&delta, |s| u64::from(s.delta)).ok()
    }
}

/// The key of a run whose first record has `key`.
pub(super) fn run_key(key: &SpoolKey, kind: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.0.len() + 1);
    k.extend_from_slice(&key.0);
    k.push(kind);
    k
}

/// The record key of a run's first offset, and the run's kind.
pub(super) fn split_run_key(k: &[u8]) -> (SpoolKey, u8) {
    let (kind, key) = k.split_last().expect("run keys are not empty");
    (SpoolKey(key.to_vec()), *kind)
}

/// The runs of a partition that hold offsets in a range, or whose range covers them.
pub(super) struct Around {
    /// The offsets they hold that are not removed.
    pub(super) live: HashSet<i64>,
    /// The (first, last) offsets of the normal ones, in order.
    pub(super) ranges: Vec<(i64, i64)>,
}

/// A record of a batch that the spool does not hold yet, encoded.
pub(super) struct NewRecord<'a> {
    pub(super) key: &'a SpoolKey,
    pub(super) value: &'a [u8],
    pub(super) kind: u8,
    /// See [`NewRun::gap`].
    pub(super) gap: usize,
    /// Its path time is the time it was consumed.
    pub(super) consumed: bool,
}

/// A run being built from appended values: records are added while they extend it.
pub(super) struct NewRun {
    pub(super) key: SpoolKey,
    pub(super) kind: u8,
    /// Which gap between existing normal runs its records lie in (see [`Spool::insert`]).
    pub(super) gap: usize,
    /// Where its last value ends.
    pub(super) end: u64,
    pub(super) run: Run,
}

/// Groups appended records (in key order) into runs: a record joins the run before it when both
/// are normal, of the same partition and gap, and its value follows in the same file.
pub(super) fn build_runs<'a>(records: impl Iterator<Item = (&'a SpoolKey, u8, usize, Location)>) -> Vec<NewRun> {
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

// Finding records in the index.
impl Spool {
    /// A run as it stands: its entry with the removals not yet written to it. Called under the
    /// spool's lock, which removals take.
    pub(super) fn run(&self, segments: &Segments, key: &[u8], raw: &[u8]) -> Result<Run, SpoolError> {
        let mut run = Run::decode(key, raw)?;
        if let Some(r) = segments.removals.get(key) {
            run.removed.clone_from(&r.removed);
        }
        Ok(run)
    }

    /// The run holding the record `key` and its slot, if the record is in the spool. Called under
    /// the spool's lock.
    pub(super) fn find(
        &self,
        segments: &Segments,
        key: &SpoolKey,
    ) -> Result<Option<(Vec<u8>, Run, usize)>, SpoolError> {
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
    pub(super) fn normal_before(
        &self,
        prefix: &[u8],
        key: &[u8],
    ) -> Result<Option<(sled::IVec, sled::IVec)>, SpoolError> {
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
    pub(super) fn around(&self, prefix: &[u8], min: i64, max: i64) -> Result<Around, SpoolError> {
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
}
