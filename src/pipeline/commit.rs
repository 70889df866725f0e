//! Commit: which offsets are safe to commit to Kafka.
//!
//! The ledger follows every record between its delivery by the consumer and the storing of its
//! objects. Per partition it keeps the offsets not yet passed by the commit position, each
//! delivered or not (a record found in the spool at start-up is known before the consumer
//! delivers it again) and done or not. The commit position of a partition is the lowest offset
//! not done at or above where its assignment started (delivered in it, or known from an earlier
//! one or from the spool), or one past the highest delivered offset when all are done: a
//! contiguous low watermark, so offsets the broker never delivers (compaction, transaction
//! markers) do not hold it back, and a hole never gets skipped (committed implies stored).
//!
//! The ledger also tells the consumer whether a delivered record needs to be spooled: one already
//! in the spool or already stored is not spooled twice.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::ops::Deref;

/// A topic-partition.
pub type Tp = (String, i32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    delivered: bool,
    done: bool,
    /// The record's Kafka timestamp (ms), for the end-to-end latency measured at commit.
    time_ms: Option<i64>,
    /// A record of a topic deleted and created since (found in the spool at start-up): a record
    /// delivered at its offset is another one.
    stale: bool,
}

/// A partition's slots by offset, and how many of them are not done. The status page and every
/// metrics scrape report that count under the ledger's lock, which the consumer and the uploaders
/// take for every batch: counting the slots there took a scrape a few milliseconds of walking tens
/// of thousands of them. Reads go to the map; changes go through the methods, which keep the count.
#[derive(Debug, Default)]
struct Slots {
    map: BTreeMap<i64, Slot>,
    open: usize,
}

impl Deref for Slots {
    type Target = BTreeMap<i64, Slot>;

    fn deref(&self) -> &BTreeMap<i64, Slot> {
        &self.map
    }
}

impl Slots {
    /// Slots not done.
    fn open(&self) -> usize {
        self.open
    }

    /// Changes the slot at `offset`, if there is one; returns what `f` returns.
    fn update<R>(&mut self, offset: i64, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        let slot = self.map.get_mut(&offset)?;
        Some(change(&mut self.open, slot, f))
    }

    /// Changes the slot at `offset` with `f`, or inserts `new` there when there is none (one
    /// lookup: the consumer does this for every record). Returns what `f` returns, None for an
    /// insert.
    fn upsert<R>(&mut self, offset: i64, new: Slot, f: impl FnOnce(&mut Slot) -> R) -> Option<R> {
        match self.map.entry(offset) {
            Entry::Occupied(mut e) => Some(change(&mut self.open, e.get_mut(), f)),
            Entry::Vacant(e) => {
                self.open += usize::from(!new.done);
                e.insert(new);
                None
            }
        }
    }

    /// Keeps the slots `keep` says to, which may change them too, counting again in the same
    /// pass (a commit drops the done slots it passed every time).
    fn retain(&mut self, mut keep: impl FnMut(i64, &mut Slot) -> bool) {
        let mut open = 0;
        self.map.retain(|&o, s| {
            let kept = keep(o, s);
            open += usize::from(kept && !s.done);
            kept
        });
        self.open = open;
    }

    /// Changes every slot.
    fn update_all(&mut self, mut f: impl FnMut(&mut Slot)) {
        self.retain(|_, s| {
            f(s);
            true
        });
    }

    fn clear(&mut self) {
        self.map.clear();
        self.open = 0;
    }
}

/// `f` applied to `slot`, and `open` adjusted if it changed whether the slot is done.
fn change<R>(open: &mut usize, slot: &mut Slot, f: impl FnOnce(&mut Slot) -> R) -> R {
    let was_open = !slot.done;
    let r = f(slot);
    *open = *open + usize::from(!slot.done) - usize::from(was_open);
    r
}

#[derive(Debug, Default)]
struct PartitionState {
    assigned: bool,
    slots: Slots,
    /// The last position sent to Kafka for this assignment.
    committed: Option<i64>,
    /// The last position Kafka confirmed; a failed commit falls back to it, so the position is
    /// sent again even if no new record arrives.
    acked: Option<i64>,
    /// One past the highest offset delivered in this assignment.
    next_delivery: Option<i64>,
    /// The first offset delivered in this assignment: where the group's committed offset was.
    start: Option<i64>,
    /// Offsets are reused from here while records of the old ones are not stored yet: what is
    /// delivered from here is dropped, and fetched again once they are ([`Ledger::refetch`]).
    held_from: Option<i64>,
    /// The offsets were reused and no position was sent since: what Kafka holds is of the old ones.
    reset: bool,
    /// A record of it was delivered or found in the spool since the process started.
    seen: bool,
    /// Counts the assignments of the partition: work started under one is not taken under
    /// another (the batched format's uploads, [`Ledger::begin_upload`]).
    generation: u64,
    /// Objects of the batched format being stored.
    uploading: usize,
    /// Being revoked: no object of it may start ([`Ledger::closing`]).
    closing: bool,
    /// Every record delivered below this offset in this assignment is in the spool (or needs no
    /// upload): the consumer says so after each write to the spool ([`Ledger::all_spooled`]).
    spooled_to: Option<i64>,
}

/// What the consumer should do with a record it was just handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// New: spool it.
    Spool,
    /// Already in the spool, being uploaded: nothing to do.
    Pending,
    /// Already stored: nothing to do.
    Done,
    /// Its partition is not assigned to this process (revoked since the record was fetched):
    /// drop it; the partition's next owner fetches it again from the committed offset.
    Revoked,
    /// Another record at an offset whose old record is not stored yet: drop it; it is fetched again
    /// once the old records are stored ([`Ledger::refetch`]).
    Held,
}

/// Offsets delivered, stored and committable, for every partition this process handles.
#[derive(Debug, Default)]
pub struct Ledger {
    partitions: HashMap<Tp, PartitionState>,
    /// Kafka timestamps of the records passed by commits since the last [`Ledger::take_committed_times`].
    committed_times: Vec<i64>,
    /// Partitions whose offsets went back since the last [`Ledger::take_resets`].
    resets: Vec<OffsetsReset>,
    /// Some partition may be held: [`Ledger::refetch`] has something to look at.
    holding: bool,
}

/// Kafka delivered other records at offsets this process had seen: an offset below one delivered
/// earlier in the same assignment (librdkafka reset the fetch position), or a record whose Kafka
/// timestamp is not the one seen at its offset before. The offsets are reused: the topic was deleted
/// and created again, or its log truncated by an unclean leader election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetsReset {
    pub tp: Tp,
    /// One past the highest offset delivered before in this assignment, if any.
    pub was: Option<i64>,
    /// The first offset of the other records.
    pub now: i64,
    /// Records of the old offsets from `now` on are still being stored: the new ones are fetched
    /// again once they are (see [`Ledger::refetch`]).
    pub held: bool,
}

/// An assigned partition as the batched format's uploader sees it ([`Ledger::batching`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// Which assignment of the partition this is.
    pub generation: u64,
    /// The first offset delivered in it, where the group's committed offset was; None until the
    /// first record arrives.
    pub start: Option<i64>,
    /// One past the highest offset delivered in it.
    pub next_delivery: Option<i64>,
    /// The last position Kafka confirmed.
    pub committed: Option<i64>,
    /// Every record below this offset delivered in it is in the spool. Records of the spool at or
    /// above it (left by an earlier run) may still have gaps that Kafka fills as it delivers.
    pub spooled_to: Option<i64>,
}

/// One assigned partition as the ledger sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionView {
    pub tp: Tp,
    /// The last position Kafka confirmed (the group's committed offset), once known.
    pub committed: Option<i64>,
    /// One past the highest offset delivered in this assignment.
    pub next_delivery: Option<i64>,
    /// Records delivered or recovered and not yet stored.
    pub pending: usize,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    /// The partition is now assigned to this process.
    pub fn assign(&mut self, tp: &Tp) {
        let p = self.partitions.entry(tp.clone()).or_default();
        p.assigned = true;
        p.generation += 1;
        p.closing = false;
        p.spooled_to = None;
        p.committed = None;
        p.acked = None;
        p.next_delivery = None;
        p.start = None;
        p.held_from = None;
        p.reset = false;
    }

    /// The partition was revoked: stop committing it. Records still in the spool stay known,
    /// so that if it comes back they are not spooled again.
    pub fn revoke(&mut self, tp: &Tp) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.assigned = false;
            p.committed = None;
            p.acked = None;
            p.next_delivery = None;
            p.start = None;
            p.held_from = None;
            p.reset = false;
            p.slots.retain(|_, s| {
                s.delivered = false;
                !s.done
            });
        }
    }

    /// A record found in the spool at start-up: it will be uploaded before the consumer
    /// delivers it again.
    pub fn recover(&mut self, tp: &Tp, offset: i64) {
        let p = self.partitions.entry(tp.clone()).or_default();
        p.seen = true;
        p.slots.upsert(offset, Slot { delivered: false, done: false, time_ms: None, stale: false }, |_| ());
    }

    /// The topic was deleted and created again since the records of it found in the spool were
    /// fetched: a record delivered at one of their offsets is another record, archived once they
    /// are stored.
    pub fn topic_recreated(&mut self, topic: &str) {
        for ((t, _), p) in &mut self.partitions {
            if t == topic {
                p.slots.update_all(|s| s.stale = true);
            }
        }
    }

    /// The consumer delivered a record; `done` is true for one that needs no upload (a tombstone).
    /// `time_ms` is its Kafka timestamp, if it has one.
    pub fn deliver(&mut self, tp: &Tp, offset: i64, done: bool, time_ms: Option<i64>) -> Delivery {
        let Some(p) = self.partitions.get_mut(tp).filter(|p| p.assigned) else {
            // Polled before a revocation, registered after it: rust-rdkafka's poll returns at a
            // rebalance, so a batch can end there. Counted as delivered, it would let a commit of
            // a later assignment pass the records still in the spool.
            return Delivery::Revoked;
        };
        p.seen = true;
        if p.held_from.is_some() {
            return Delivery::Held;
        }
        // librdkafka delivers a partition in order within an assignment: going back means its
        // position was reset. A record whose Kafka timestamp differs from the one seen at its
        // offset is another record. Either way, taken as stored or as spooled, the records at these
        // offsets would be lost.
        let went_back = p.next_delivery.filter(|&was| offset < was);
        let other = p
            .slots
            .get(&offset)
            .is_some_and(|s| s.stale || (s.time_ms.is_some() && time_ms.is_some() && s.time_ms != time_ms));
        if went_back.is_some() || other {
            // What was seen from here on is of the old records: the stored ones are forgotten; the
            // new records wait for the others to be stored, or they would be taken for them.
            p.slots.retain(|o, s| o < offset || !s.done);
            let held = p.slots.range(offset..).next().is_some();
            self.resets.push(OffsetsReset { tp: tp.clone(), was: went_back, now: offset, held });
            if held {
                p.held_from = Some(offset);
                self.holding = true;
                return Delivery::Held;
            }
            p.slots.update_all(|s| s.delivered = false);
            (p.committed, p.acked, p.next_delivery, p.start) = (None, None, None, None);
            p.reset = true;
        }
        p.next_delivery = Some(p.next_delivery.map_or(offset + 1, |n| n.max(offset + 1)));
        p.start.get_or_insert(offset);
        let new = Slot { delivered: true, done, time_ms, stale: false };
        let known = p.slots.upsert(offset, new, |slot| {
            slot.delivered = true;
            slot.done |= done;
            slot.time_ms = time_ms;
            if slot.done { Delivery::Done } else { Delivery::Pending }
        });
        known.unwrap_or(if done { Delivery::Done } else { Delivery::Spool })
    }

    /// All objects of the record are stored.
    pub fn complete(&mut self, tp: &Tp, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.slots.update(offset, |slot| slot.done = true);
        }
    }

    /// The position to commit for each assigned partition whose position moved since the last
    /// call. Passed slots are forgotten.
    pub fn to_commit(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            if !p.assigned {
                continue;
            }
            let Some(position) = p.position() else {
                continue;
            };
            if p.committed.or(p.start).is_some_and(|c| position <= c) {
                continue;
            }
            let passed = p.slots.range(..position).filter(|(_, s)| s.delivered).filter_map(|(_, s)| s.time_ms);
            self.committed_times.extend(passed);
            // Records below where the assignment started that are not stored yet (left from an
            // earlier one) stay known while they are in the spool.
            p.slots.retain(|o, s| o >= position || !s.done);
            p.committed = Some(position);
            p.reset = false;
            out.push((tp.clone(), position));
        }
        out.sort();
        out
    }

    /// The positions that [`Ledger::to_commit`] would return, for the given partitions only,
    /// without marking them committed (for a commit on revocation).
    pub fn positions(&self, tps: &[Tp]) -> Vec<(Tp, i64)> {
        tps.iter()
            .filter_map(|tp| {
                let p = self.partitions.get(tp)?;
                let pos = p.position()?;
                (p.assigned && p.committed.or(p.start).is_none_or(|c| pos > c)).then(|| (tp.clone(), pos))
            })
            .collect()
    }

    /// Kafka confirmed a commit.
    pub fn commit_succeeded(&mut self, tp: &Tp, position: i64) {
        if let Some(p) = self.partitions.get_mut(tp).filter(|p| p.assigned) {
            p.acked = Some(p.acked.map_or(position, |a| a.max(position)));
        }
    }

    /// What Kafka holds as the group's committed offset of a partition, read back. It confirms
    /// the commits sent up to there; a position sent but not held (its commit was lost) is sent
    /// again at the next commit.
    pub fn confirmed(&mut self, tp: &Tp, position: i64) {
        // Above the last position sent: Kafka still holds a commit from before this partition's
        // offsets were reset.
        if let Some(p) =
            self.partitions.get_mut(tp).filter(|p| p.assigned && !p.reset && p.committed.is_none_or(|c| position <= c))
        {
            p.acked = Some(p.acked.map_or(position, |a| a.max(position)));
            if p.committed.is_some_and(|c| c > position) {
                p.committed = p.acked;
            }
        }
    }

    /// A commit failed: the partition's position will be sent again at the next commit.
    pub fn commit_failed(&mut self, tp: &Tp) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.committed = p.acked.filter(|&a| p.committed.is_none_or(|c| a <= c));
        }
    }

    /// The partitions whose offsets were found reused since the last call.
    pub fn take_resets(&mut self) -> Vec<OffsetsReset> {
        std::mem::take(&mut self.resets)
    }

    /// The held partitions whose old records are all stored now, with the offset to fetch again
    /// from (the consumer seeks there). From now on their commits follow the new records.
    pub fn refetch(&mut self) -> Vec<(Tp, i64)> {
        let mut out = Vec::new();
        if !self.holding {
            return out;
        }
        for (tp, p) in &mut self.partitions {
            let Some(from) = p.held_from else { continue };
            if p.slots.range(from..).any(|(_, s)| !s.done) {
                continue;
            }
            p.slots.retain(|o, s| {
                s.delivered = false;
                o < from
            });
            (p.held_from, p.committed, p.acked, p.next_delivery, p.start) = (None, None, None, None, None);
            p.reset = true;
            out.push((tp.clone(), from));
        }
        self.holding = self.partitions.values().any(|p| p.held_from.is_some());
        out
    }

    /// A fetch again could not be set up: the partition stays held and it is tried again.
    pub fn hold(&mut self, tp: &Tp, from: i64) {
        if let Some(p) = self.partitions.get_mut(tp).filter(|p| p.assigned) {
            p.held_from = Some(from);
            self.holding = true;
        }
    }

    /// The partition's current assignment, if it is assigned.
    pub fn batching(&self, tp: &Tp) -> Option<Assignment> {
        let p = self.partitions.get(tp).filter(|p| p.assigned)?;
        Some(Assignment {
            generation: p.generation,
            start: p.start,
            next_delivery: p.next_delivery,
            committed: p.acked,
            spooled_to: p.spooled_to,
        })
    }

    /// An object of the partition starts to be stored under assignment `generation`; false when
    /// the partition is no longer assigned under it (the object must not be stored).
    pub fn begin_upload(&mut self, tp: &Tp, generation: u64) -> bool {
        match self.partitions.get_mut(tp) {
            Some(p) if p.assigned && !p.closing && p.generation == generation => {
                p.uploading += 1;
                true
            }
            _ => false,
        }
    }

    /// An object begun with [`Ledger::begin_upload`] is stored (its records marked complete
    /// first) or given up.
    pub fn end_upload(&mut self, tp: &Tp) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.uploading = p.uploading.saturating_sub(1);
        }
    }

    /// Whether the partition is still held under assignment `generation`.
    pub fn holds(&self, tp: &Tp, generation: u64) -> bool {
        self.partitions.get(tp).is_some_and(|p| p.assigned && p.generation == generation)
    }

    /// The partitions are being revoked: no object of theirs starts from now on (those being
    /// stored finish; the revocation waits for them, then commits).
    pub fn closing(&mut self, tps: &[Tp]) {
        for tp in tps {
            if let Some(p) = self.partitions.get_mut(tp) {
                p.closing = true;
            }
        }
    }

    /// The consumer wrote every record it was handed to the spool: what was delivered so far is
    /// there.
    pub fn all_spooled(&mut self) {
        for p in self.partitions.values_mut().filter(|p| p.assigned) {
            p.spooled_to = p.next_delivery;
        }
    }

    /// Objects being stored for any of `tps`.
    pub fn uploading(&self, tps: &[Tp]) -> usize {
        tps.iter().filter_map(|tp| self.partitions.get(tp)).map(|p| p.uploading).sum()
    }

    /// The partition was revoked and its spooled records dropped (the batched format): they are
    /// forgotten, so that the next assignment spools them again.
    pub fn forget(&mut self, tp: &Tp) {
        if let Some(p) = self.partitions.get_mut(tp).filter(|p| !p.assigned) {
            p.slots.clear();
        }
    }

    /// The last position Kafka confirmed for a partition in this assignment, if any.
    pub fn committed(&self, tp: &Tp) -> Option<i64> {
        self.partitions.get(tp).and_then(|p| p.acked)
    }

    /// The Kafka timestamps of the records whose offsets were committed since the last call.
    pub fn take_committed_times(&mut self) -> Vec<i64> {
        std::mem::take(&mut self.committed_times)
    }

    /// The topics archived since the process started: those of which a record was delivered or
    /// found in the spool, sorted.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> =
            self.partitions.iter().filter(|(_, p)| p.seen).map(|((t, _), _)| t.clone()).collect();
        topics.sort();
        topics.dedup();
        topics
    }

    /// Whether any partition is assigned to this process.
    pub fn any_assigned(&self) -> bool {
        self.partitions.values().any(|p| p.assigned)
    }

    /// The partitions assigned to this process, copied out: what the status page and the metrics
    /// report is built from once the lock on the ledger is released.
    pub fn assigned(&self) -> Vec<PartitionView> {
        let views = self.partitions.iter().filter(|(_, p)| p.assigned).map(|(tp, p)| PartitionView {
            tp: tp.clone(),
            committed: p.acked,
            next_delivery: p.next_delivery,
            pending: p.slots.open(),
        });
        views.collect()
    }
}

impl PartitionState {
    /// The lowest record not stored at or above where this assignment started (delivered in it, or
    /// known from an earlier one or from the spool at start-up: it is stored soon, from the spool),
    /// or one past the highest delivered when there is none.
    fn position(&self) -> Option<i64> {
        let start = self.start?;
        let lowest_open = self.slots.range(start..).find(|(_, s)| !s.done).map(|(&o, _)| o);
        [lowest_open, self.next_delivery, self.held_from].into_iter().flatten().reduce(i64::min)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp() -> Tp {
        ("t".to_string(), 0)
    }

    #[test]
    fn a_partition_being_revoked_starts_no_object_and_a_new_assignment_is_another() {
        let mut l = Ledger::new();
        l.assign(&tp());
        let g = l.batching(&tp()).unwrap().generation;
        assert!(l.begin_upload(&tp(), g));
        l.closing(&[tp()]);
        assert!(!l.begin_upload(&tp(), g), "revoking: no new object");
        assert_eq!(l.uploading(&[tp()]), 1, "the one in flight is waited for");
        assert!(l.holds(&tp(), g), "and still held until revoked: its records may be completed");
        l.end_upload(&tp());
        assert_eq!(l.uploading(&[tp()]), 0);
        l.revoke(&tp());
        assert!(!l.holds(&tp(), g));
        l.assign(&tp());
        let g2 = l.batching(&tp()).unwrap().generation;
        assert!(g2 != g && !l.begin_upload(&tp(), g), "work of the old assignment is refused");
        assert!(l.begin_upload(&tp(), g2));
    }

    #[test]
    fn commit_follows_the_contiguous_low_watermark() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in 0..5 {
            assert_eq!(l.deliver(&tp(), o, false, None), Delivery::Spool);
        }
        assert!(l.to_commit().is_empty(), "nothing stored yet: nothing to commit");
        l.complete(&tp(), 1);
        l.complete(&tp(), 3);
        assert!(l.to_commit().is_empty(), "offset 0 still open");
        l.complete(&tp(), 0);
        assert_eq!(l.to_commit(), vec![(tp(), 2)], "stops at the hole at 2");
        l.complete(&tp(), 2);
        l.complete(&tp(), 4);
        assert_eq!(l.to_commit(), vec![(tp(), 5)]);
        assert!(l.to_commit().is_empty(), "no change, no commit");
    }

    #[test]
    fn gaps_the_broker_never_delivers_do_not_hold_it_back() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in [10, 11, 15, 20] {
            l.deliver(&tp(), o, false, None);
        }
        for o in [10, 11, 15] {
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 20)]);
        l.complete(&tp(), 20);
        assert_eq!(l.to_commit(), vec![(tp(), 21)]);
    }

    #[test]
    fn tombstones_are_done_on_delivery() {
        let mut l = Ledger::new();
        l.assign(&tp());
        assert_eq!(l.deliver(&tp(), 0, true, None), Delivery::Done);
        assert_eq!(l.to_commit(), vec![(tp(), 1)]);
    }

    #[test]
    fn recovered_records_are_not_spooled_twice() {
        let mut l = Ledger::new();
        l.recover(&tp(), 7);
        l.recover(&tp(), 8);
        l.complete(&tp(), 7);
        l.assign(&tp());
        assert_eq!(l.deliver(&tp(), 6, false, None), Delivery::Spool);
        assert_eq!(l.deliver(&tp(), 7, false, None), Delivery::Done);
        assert_eq!(l.deliver(&tp(), 8, false, None), Delivery::Pending);
        l.complete(&tp(), 6);
        assert_eq!(l.to_commit(), vec![(tp(), 8)]);
        l.complete(&tp(), 8);
        assert_eq!(l.to_commit(), vec![(tp(), 9)]);
    }

    #[test]
    fn a_failed_commit_is_sent_again_without_new_records() {
        let mut l = Ledger::new();
        l.assign(&tp());
        l.deliver(&tp(), 0, false, None);
        l.complete(&tp(), 0);
        assert_eq!(l.to_commit(), vec![(tp(), 1)]);
        assert!(l.to_commit().is_empty(), "sent, waiting for the answer");
        l.commit_failed(&tp());
        assert_eq!(l.to_commit(), vec![(tp(), 1)], "sent again although nothing new arrived");
        l.commit_succeeded(&tp(), 1);
        assert_eq!(l.committed(&tp()), Some(1));
        l.commit_failed(&tp()); // a late failure of an older commit
        assert!(l.to_commit().is_empty(), "1 is confirmed: nothing to resend");
    }

    #[test]
    fn a_commit_that_kafka_does_not_hold_is_sent_again() {
        let mut l = Ledger::new();
        l.assign(&tp());
        l.deliver(&tp(), 0, false, None);
        l.deliver(&tp(), 1, false, None);
        l.complete(&tp(), 0);
        l.complete(&tp(), 1);
        assert_eq!(l.to_commit(), vec![(tp(), 2)]);
        l.confirmed(&tp(), 0);
        assert_eq!(l.committed(&tp()), Some(0));
        assert_eq!(l.to_commit(), vec![(tp(), 2)], "Kafka holds 0: the commit of 2 was lost");
        l.confirmed(&tp(), 2);
        assert_eq!(l.committed(&tp()), Some(2));
        assert!(l.to_commit().is_empty());
        l.confirmed(&tp(), 1); // an older read: changes nothing
        assert_eq!(l.committed(&tp()), Some(2));
        assert!(l.to_commit().is_empty());
    }

    #[test]
    fn commits_hand_over_the_timestamps_of_the_records_they_pass() {
        let mut l = Ledger::new();
        l.assign(&tp());
        l.deliver(&tp(), 0, false, Some(100));
        l.deliver(&tp(), 1, true, Some(150));
        l.deliver(&tp(), 2, false, Some(200));
        l.complete(&tp(), 0);
        assert_eq!(l.to_commit(), vec![(tp(), 2)]);
        assert_eq!(l.take_committed_times(), vec![100, 150], "the tombstone counts too; 2 is not committed");
        assert!(l.take_committed_times().is_empty());
        l.complete(&tp(), 2);
        l.to_commit();
        assert_eq!(l.take_committed_times(), vec![200]);
    }

    #[test]
    fn revoked_partitions_are_not_committed() {
        let mut l = Ledger::new();
        l.assign(&tp());
        l.deliver(&tp(), 0, false, None);
        l.deliver(&tp(), 1, false, None);
        l.complete(&tp(), 0);
        assert_eq!(l.positions(&[tp()]), vec![(tp(), 1)]);
        l.revoke(&tp());
        l.complete(&tp(), 1);
        assert!(l.to_commit().is_empty());
        // Back again from the committed offset (none: 0). Offset 0 was stored and forgotten, so
        // it is spooled again (an identical upload); offset 1 is still known and now stored.
        l.assign(&tp());
        assert_eq!(l.deliver(&tp(), 0, false, None), Delivery::Spool);
        assert_eq!(l.deliver(&tp(), 1, false, None), Delivery::Done);
        assert!(l.to_commit().is_empty());
        l.complete(&tp(), 0);
        assert_eq!(l.to_commit(), vec![(tp(), 2)]);
    }

    /// A batch polled before a revocation reaches the ledger after it (rust-rdkafka's poll returns
    /// at the rebalance, so the consumer registers the batch it holds then). Those records must not
    /// count as delivered: when the partition comes back, the commit must not pass the records
    /// that were delivered before and are still only in the spool.
    #[test]
    fn a_batch_registered_after_the_revocation_does_not_move_the_commit_past_unstored_records() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in 0..10 {
            l.deliver(&tp(), o, false, None);
        }
        for o in 0..5 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.positions(&[tp()]), vec![(tp(), 5)], "the commit on revocation");
        l.revoke(&tp());
        for o in 10..60 {
            // Fetched for the old assignment: not to be spooled or counted.
            assert_ne!(l.deliver(&tp(), o, false, None), Delivery::Spool);
        }
        l.assign(&tp());
        assert_eq!(l.positions(&[tp()]), vec![], "nothing delivered in this assignment yet");
        assert_eq!(l.to_commit(), vec![]);
        // Fetched again from the committed offset 5: 5..10 are in the spool, not stored.
        for o in 5..60 {
            let d = l.deliver(&tp(), o, false, None);
            assert_ne!(d, Delivery::Done, "offset {o} is not stored");
        }
        assert_eq!(l.to_commit(), vec![], "5 is the lowest record not stored");
        for o in 5..60 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 60)]);
    }

    /// Records known from an earlier assignment and not yet stored hold the commit back even when
    /// the broker does not deliver them again in this one.
    #[test]
    fn records_of_an_earlier_assignment_still_in_the_spool_hold_the_commit() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in 0..10 {
            l.deliver(&tp(), o, false, None);
        }
        l.revoke(&tp());
        l.assign(&tp());
        l.deliver(&tp(), 3, false, None);
        l.complete(&tp(), 3);
        l.deliver(&tp(), 20, false, None);
        l.complete(&tp(), 20);
        assert_eq!(l.to_commit(), vec![(tp(), 4)], "4..10 are only in the spool");
        for o in 4..10 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 21)]);
    }

    #[test]
    fn records_at_reused_offsets_are_archived_and_the_commit_follows_them() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in 0..100 {
            l.deliver(&tp(), o, false, None);
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 100)]);
        l.commit_succeeded(&tp(), 100);
        assert!(l.take_resets().is_empty());
        // The topic was deleted and created again: librdkafka resets the position to 0.
        assert_eq!(l.deliver(&tp(), 0, false, None), Delivery::Spool, "another record at offset 0");
        assert_eq!(l.take_resets(), vec![OffsetsReset { tp: tp(), was: Some(100), now: 0, held: false }]);
        for o in 1..5 {
            assert_eq!(l.deliver(&tp(), o, false, None), Delivery::Spool);
        }
        assert_eq!(l.to_commit(), vec![], "nothing of the new records stored yet");
        l.confirmed(&tp(), 100); // Kafka still holds the old commit
        for o in 0..3 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 3)], "the commit goes back to follow the new offsets");
        l.commit_failed(&tp());
        assert_eq!(l.to_commit(), vec![(tp(), 3)], "sent again, not held back by the old 100");
    }

    /// The topic is deleted and created again while the old records at the same offsets are still
    /// being uploaded: the new ones must not be taken for them.
    #[test]
    fn records_at_reused_offsets_wait_for_the_old_ones_and_are_fetched_again() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in 0..10 {
            assert_eq!(l.deliver(&tp(), o, false, Some(1000 + o)), Delivery::Spool);
        }
        l.complete(&tp(), 0);
        assert_eq!(l.to_commit(), vec![(tp(), 1)]);
        // Offset 0 again: a reset. 1..10 of the old topic are not stored yet.
        assert_eq!(l.deliver(&tp(), 0, false, Some(5000)), Delivery::Held);
        assert_eq!(l.take_resets(), vec![OffsetsReset { tp: tp(), was: Some(10), now: 0, held: true }]);
        assert_eq!(l.deliver(&tp(), 1, false, Some(5001)), Delivery::Held, "dropped: fetched again later");
        for o in 1..10 {
            l.complete(&tp(), o);
            assert!(l.to_commit().iter().all(|(_, c)| *c <= 0), "no commit past the held offset 0");
        }
        assert_eq!(l.refetch(), vec![(tp(), 0)]);
        assert!(l.refetch().is_empty());
        for o in 0..3 {
            assert_eq!(l.deliver(&tp(), o, false, Some(5000 + o)), Delivery::Spool, "offset {o} is a new record");
        }
        assert_eq!(l.to_commit(), vec![]);
        l.complete(&tp(), 0);
        assert_eq!(l.to_commit(), vec![(tp(), 1)]);
    }

    /// Records in the spool at start-up of a topic deleted and created again while the archiver was
    /// down: the new records at their offsets wait for them to be stored and are fetched again.
    #[test]
    fn records_of_a_topic_created_again_found_in_the_spool_are_not_taken_for_the_new_ones() {
        let mut l = Ledger::new();
        for o in 5..8 {
            l.recover(&tp(), o);
        }
        l.complete(&tp(), 5);
        l.topic_recreated("t");
        l.assign(&tp());
        for o in 0..5 {
            assert_eq!(l.deliver(&tp(), o, false, Some(9000 + o)), Delivery::Spool);
        }
        assert_eq!(l.deliver(&tp(), 5, false, Some(9005)), Delivery::Held, "offset 5 holds another record now");
        assert_eq!(l.take_resets(), vec![OffsetsReset { tp: tp(), was: None, now: 5, held: true }]);
        for o in 0..5 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 5)]);
        l.complete(&tp(), 6);
        assert!(l.refetch().is_empty(), "old offset 7 is not stored yet");
        l.complete(&tp(), 7);
        assert_eq!(l.refetch(), vec![(tp(), 5)]);
        for o in 5..8 {
            assert_eq!(l.deliver(&tp(), o, false, Some(9000 + o)), Delivery::Spool, "offset {o} is a new record");
        }
        assert!(l.to_commit().iter().all(|(_, c)| *c <= 5), "the new records are not stored yet");
        for o in 5..8 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 8)]);
    }

    /// A commit past records of an earlier assignment (another member committed them) keeps them
    /// known while they are in the spool: offsets reused later wait for them.
    #[test]
    fn records_below_the_start_stay_known_after_a_commit_passes_them() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in 0..10 {
            l.deliver(&tp(), o, false, Some(1000 + o));
        }
        for o in 0..5 {
            l.complete(&tp(), o);
        }
        l.revoke(&tp());
        // Another member stored and committed up to 50; the partition comes back.
        l.assign(&tp());
        for o in 50..60 {
            assert_eq!(l.deliver(&tp(), o, false, Some(1000 + o)), Delivery::Spool);
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 60)]);
        assert_eq!(l.assigned()[0].pending, 5, "5..9 are still in the spool");
        // The topic is created again: offset 5 holds another record while the old 5 is unstored.
        assert_eq!(l.deliver(&tp(), 5, false, Some(9005)), Delivery::Held);
        for o in 5..10 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.refetch(), vec![(tp(), 5)]);
        assert_eq!(l.deliver(&tp(), 5, false, Some(9005)), Delivery::Spool);
    }

    /// After the offsets went back, Kafka still holds the old topic's committed offset until a
    /// position of the new records is sent: it is not taken for one.
    #[test]
    fn the_committed_offset_of_the_old_records_is_not_taken_for_the_new_ones() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in 0..10 {
            l.deliver(&tp(), o, false, Some(1000 + o));
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 10)]);
        l.commit_succeeded(&tp(), 10);
        assert_eq!(l.deliver(&tp(), 0, false, Some(9000)), Delivery::Spool, "all old records are stored");
        l.confirmed(&tp(), 10);
        assert_eq!(l.committed(&tp()), None, "10 is the old topic's offset");
        l.complete(&tp(), 0);
        assert_eq!(l.to_commit(), vec![(tp(), 1)]);
        l.confirmed(&tp(), 1);
        assert_eq!(l.committed(&tp()), Some(1));
    }

    /// After a revocation the ledger still knows the old records; the next assignment of the new
    /// topic starts with no position to go back from: the Kafka timestamp tells the records apart.
    #[test]
    fn another_record_at_a_known_offset_in_a_later_assignment_is_not_taken_for_the_old_one() {
        let mut l = Ledger::new();
        l.assign(&tp());
        for o in 0..10 {
            l.deliver(&tp(), o, false, Some(1000 + o));
        }
        for o in 0..5 {
            l.complete(&tp(), o);
        }
        l.revoke(&tp());
        l.complete(&tp(), 5); // stored after the revocation
        l.assign(&tp());
        // The topic was created again: offset 5 holds another record than the one stored.
        assert_eq!(l.deliver(&tp(), 5, false, Some(9005)), Delivery::Held);
        assert!(l.take_resets()[0].held);
        for o in 6..10 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.refetch(), vec![(tp(), 5)]);
        for o in 5..10 {
            assert_eq!(l.deliver(&tp(), o, false, Some(9000 + o)), Delivery::Spool);
        }
        for o in 5..10 {
            l.complete(&tp(), o);
        }
        assert_eq!(l.to_commit(), vec![(tp(), 10)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Assign,
        Revoke,
        Forget,
        Deliver(i64, bool, i64),
        Recover(i64),
        Complete(i64),
        Commit,
        Refetch,
        Recreated,
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Op::Assign),
            Just(Op::Revoke),
            Just(Op::Forget),
            (0..24i64, any::<bool>(), 0..2i64).prop_map(|(o, done, t)| Op::Deliver(o, done, t)),
            (0..24i64).prop_map(Op::Recover),
            (0..24i64).prop_map(Op::Complete),
            Just(Op::Commit),
            Just(Op::Refetch),
            Just(Op::Recreated),
        ]
    }

    proptest::proptest! {
        /// The status page's count of records not stored yet is kept as the slots change, not
        /// counted when asked: after every change it is what counting them gives.
        #[test]
        fn the_count_of_records_not_stored_follows_every_change(ops in proptest::collection::vec(op(), 1..200)) {
            let mut l = Ledger::new();
            l.assign(&tp());
            for op in ops {
                match op {
                    Op::Assign => l.assign(&tp()),
                    Op::Revoke => l.revoke(&tp()),
                    Op::Forget => l.forget(&tp()),
                    // Two timestamps per offset, so that some deliveries are other records.
                    Op::Deliver(o, done, t) => {
                        l.deliver(&tp(), o, done, Some(t));
                    }
                    Op::Recover(o) => l.recover(&tp(), o),
                    Op::Complete(o) => l.complete(&tp(), o),
                    Op::Commit => {
                        l.to_commit();
                    }
                    Op::Refetch => {
                        l.refetch();
                    }
                    Op::Recreated => l.topic_recreated("t"),
                }
                let p = &l.partitions[&tp()];
                let counted = p.slots.values().filter(|s| !s.done).count();
                proptest::prop_assert_eq!(p.slots.open(), counted);
                if p.assigned {
                    proptest::prop_assert_eq!(l.assigned()[0].pending, counted);
                }
            }
        }
    }
}
