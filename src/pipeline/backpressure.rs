//! Backpressure: when the consumer takes records, waits for room, pauses and resumes, from the
//! spool's fill alone (design invariant 5: nothing is dropped; a full spool pauses consumption).
//!
//! A pure state machine: [`Backpressure::update`] takes what the spool looks like and the time,
//! and says when the pause state changes and why; the consumer applies it. The watermarks, as
//! fractions of SPOOL_MAX_BYTES and SPOOL_MAX_RECORDS:
//!
//! ```text
//! 100 %  maximum
//!  90 %  high watermark: pause
//!  80 %  low watermark: above it, take no records (wait for room); at or below, resume
//!  50 %  a consumer that waited for room takes records again
//! ```
//!
//! Free space under SPOOL_MIN_FREE_BYTES pauses too, until 5/4 of it is free or the spool has
//! drained to half of what it held.

use std::time::{Duration, Instant};

use crate::config::SpoolLimits;

/// The high watermark, in percent of SPOOL_MAX_BYTES and SPOOL_MAX_RECORDS (the status page
/// shows both watermarks from the report).
pub const PAUSE_AT_PERCENT: u64 = 90;

/// The low watermark, in percent.
pub const WAIT_ABOVE_PERCENT: u64 = 80;

/// At or above either high watermark: pause.
fn is_full(l: &SpoolLimits, bytes: u64, records: u64) -> bool {
    bytes >= share(l.max_bytes, PAUSE_AT_PERCENT) || records >= share(l.max_records, PAUSE_AT_PERCENT)
}

/// At or below both low watermarks: take records, resume.
fn has_room(l: &SpoolLimits, bytes: u64, records: u64) -> bool {
    at_most(l, bytes, records, WAIT_ABOVE_PERCENT)
}

/// At or below half of both maxima: a consumer that waited for room takes records again.
fn has_room_for_more(l: &SpoolLimits, bytes: u64, records: u64) -> bool {
    at_most(l, bytes, records, 50)
}

/// Both sizes at or below `percent` of their maxima.
fn at_most(l: &SpoolLimits, bytes: u64, records: u64, percent: u64) -> bool {
    bytes <= share(l.max_bytes, percent) && records <= share(l.max_records, percent)
}

/// `percent` of `max`, rounded down: multiplied first, or a bound under 100 (SPOOL_MAX_RECORDS
/// may be 10) would have watermarks of 0.
fn share(max: u64, percent: u64) -> u64 {
    (u128::from(max) * u128::from(percent) / 100) as u64
}

/// What the spool looks like to the backpressure decision.
#[derive(Debug, Clone, Copy)]
pub struct SpoolState {
    pub bytes: u64,
    pub records: u64,
    /// Free space on SPOOL_DIR's file system.
    pub free: u64,
    /// Records registered but not yet written (the spool refused them).
    pub unwritten: usize,
}

/// How long the consumer sleeps while it waits for room in the spool.
pub const PACE_WAIT: Duration = Duration::from_millis(5);

/// How long the spool may go without shrinking while the consumer waits for room before it pauses
/// its partitions. Under a backlog every upload shrinks it, many times a second even on a slow
/// store; a second without means a stalled store.
const PACE_LIMIT: Duration = Duration::from_secs(1);

/// Longest wait for room without polling. librdkafka leaves the group when the application has
/// not polled for `max.poll.interval.ms`, so a slow drain (large records, a slow store) waits
/// paused instead after this long: paused partitions are polled, and their records stay in Kafka.
const PACE_POLL_LIMIT: Duration = Duration::from_secs(10);

/// While the consumer waits for room: since when, and the spool's size when it last shrank, and when.
#[derive(Debug)]
struct Pace {
    since: Instant,
    bytes: u64,
    records: u64,
    shrank_at: Instant,
}

/// Decides when the consumer takes records, and when it pauses and resumes its partitions.
///
/// Above the low watermarks the consumer stops taking records and leaves them in librdkafka's
/// queue (bounded by `queued.max.messages.kbytes`) until the uploads bring the spool down to half;
/// then it takes them again. So a long backlog runs as a short one does, with the same memory:
/// pausing instead, each resume had librdkafka refill its queue from nothing, and the bursts grew
/// with the backlog. Half, because the fewer the waits, the less the consumer's rhythm costs the
/// store beside it (`benches/results/HISTORY.md` has the runs behind both choices).
///
/// It pauses when the spool has not shrunk for [`PACE_LIMIT`] while the consumer waits (the store
/// is down), when the wait lasts longer than `poll_limit` (a slow drain: a consumer that waits
/// does not poll, and one that does not poll for `max.poll.interval.ms` leaves the group), at the
/// high watermarks, or when the spool cannot be written; paused partitions are polled and keep the
/// group membership.
#[derive(Debug)]
pub struct Backpressure {
    limits: SpoolLimits,
    /// Longest wait for room before pausing: [`PACE_POLL_LIMIT`], or a quarter of
    /// `max.poll.interval.ms` when that is shorter.
    poll_limit: Duration,
    paused: bool,
    /// While the consumer waits for room: the spool's size when it last shrank, and when.
    pace: Option<Pace>,
    /// Spool size when a pause for low disk space began.
    low_disk_at: Option<u64>,
}

impl Backpressure {
    pub fn new(limits: SpoolLimits, max_poll_interval: Duration) -> Backpressure {
        let poll_limit = PACE_POLL_LIMIT.min(max_poll_interval / 4);
        Backpressure { limits, poll_limit, paused: false, pace: None, low_disk_at: None }
    }

    /// Whether the partitions are paused (the consumer polls them to keep its membership).
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Whether the consumer waits for room instead of polling: not paused (a paused consumer polls
    /// to keep its membership alive), and the spool above its low watermarks.
    pub fn pacing(&self) -> bool {
        !self.paused && self.pace.is_some()
    }

    /// Updates the state at `now`; returns the reason when the pause state changed.
    pub fn update(&mut self, s: &SpoolState, now: Instant) -> Option<String> {
        let l = self.limits;
        let room = has_room(&l, s.bytes, s.records);
        match &mut self.pace {
            None if !room => self.pace = Some(Pace { since: now, bytes: s.bytes, records: s.records, shrank_at: now }),
            Some(_) if has_room_for_more(&l, s.bytes, s.records) => self.pace = None,
            Some(p) if s.bytes < p.bytes || s.records < p.records => {
                *p = Pace { bytes: s.bytes, records: s.records, shrank_at: now, ..*p };
            }
            _ => {}
        }
        let stalled = self.pace.as_ref().is_some_and(|p| now.duration_since(p.shrank_at) >= PACE_LIMIT);
        // Stays true until the spool is down to half, where the wait ends.
        let slow = self.pace.as_ref().is_some_and(|p| now.duration_since(p.since) >= self.poll_limit);
        let low_disk = s.free < l.min_free_bytes;
        if low_disk && self.low_disk_at.is_none() {
            self.low_disk_at = Some(s.bytes);
        }
        // Free space may not come back as the spool drains (other files on the disk, or sled's
        // index file, which it does not shrink): a spool drained to half of what it held also
        // has room.
        if let Some(at) = self.low_disk_at
            && (s.free >= l.min_free_bytes / 4 * 5 || s.bytes <= at / 2)
        {
            self.low_disk_at = None;
        }
        let reason = if s.unwritten > 0 {
            Some(format!(
                "pausing consumption: the spool in SPOOL_DIR cannot be written ({} records wait)",
                s.unwritten
            ))
        } else if self.low_disk_at.is_some() {
            Some(format!(
                "pausing consumption: {} MiB free on SPOOL_DIR's disk, below SPOOL_MIN_FREE_BYTES ({} MiB)",
                s.free >> 20,
                l.min_free_bytes >> 20
            ))
        } else if is_full(&l, s.bytes, s.records) || (self.paused && !room) {
            Some(format!(
                "pausing consumption: the spool is at its high watermark (SPOOL_MAX_BYTES {} MiB, SPOOL_MAX_RECORDS {})",
                l.max_bytes >> 20,
                l.max_records
            ))
        } else if stalled {
            Some(format!(
                "pausing consumption: the uploads made no room in the spool for {} s (SPOOL_MAX_BYTES {} MiB, SPOOL_MAX_RECORDS {})",
                PACE_LIMIT.as_secs(),
                l.max_bytes >> 20,
                l.max_records
            ))
        } else if slow {
            Some(format!(
                "pausing consumption: the uploads drain the spool slowly; paused until it is down to half (SPOOL_MAX_BYTES {} MiB, SPOOL_MAX_RECORDS {})",
                l.max_bytes >> 20,
                l.max_records
            ))
        } else {
            None
        };
        let pause = reason.is_some();
        if pause == self.paused {
            return None;
        }
        self.paused = pause;
        Some(reason.unwrap_or_else(|| "resuming consumption: the spool has room again".to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn limits() -> SpoolLimits {
        SpoolLimits { max_bytes: 100 * MIB, max_records: 1000, min_free_bytes: 10 * MIB }
    }

    fn now() -> Instant {
        Instant::now()
    }

    fn state(bytes: u64, records: u64, free: u64) -> SpoolState {
        SpoolState { bytes, records, free, unwritten: 0 }
    }

    #[test]
    fn watermarks_of_the_configured_bounds() {
        // SPOOL_MAX_BYTES=500 MB, SPOOL_MAX_RECORDS=500000.
        let l = SpoolLimits { max_bytes: 500_000_000, max_records: 500_000, min_free_bytes: 0 };
        assert!(is_full(&l, 450_000_000, 0) && !is_full(&l, 449_999_999, 0));
        assert!(has_room(&l, 400_000_000, 0) && !has_room(&l, 400_000_001, 0));
        assert!(is_full(&l, 0, 450_000) && !has_room(&l, 0, 400_001));
        assert!(has_room_for_more(&l, 250_000_000, 250_000) && !has_room_for_more(&l, 250_000_001, 0));
    }

    #[test]
    fn watermarks_of_the_smallest_bound() {
        // SPOOL_MAX_RECORDS=10, the least allowed: pause at 9 records, resume at 8, take records
        // again after a wait at 5. Divided before the multiplication, a bound under 100 had
        // watermarks of 0: one record in the spool made the consumer wait until it was empty.
        let l = SpoolLimits { max_bytes: u64::MAX, max_records: 10, min_free_bytes: 0 };
        assert!(is_full(&l, 0, 9) && !is_full(&l, 0, 8));
        assert!(has_room(&l, 0, 8) && !has_room(&l, 0, 9));
        assert!(has_room_for_more(&l, 0, 5) && !has_room_for_more(&l, 0, 6));
        let mut b = Backpressure::new(l, Duration::from_secs(60));
        assert_eq!(b.update(&state(0, 1, u64::MAX), now()), None);
        assert!(!b.pacing(), "one record is no reason to wait for room");
    }

    #[test]
    fn pauses_at_the_high_watermark_and_resumes_at_the_low_one() {
        let mut b = Backpressure::new(limits(), Duration::from_secs(60));
        assert_eq!(b.update(&state(80 * MIB, 10, u64::MAX), now()), None);
        assert!(b.update(&state(90 * MIB, 10, u64::MAX), now()).unwrap().contains("high watermark"));
        assert_eq!(b.update(&state(81 * MIB, 10, u64::MAX), now()), None, "still above the low watermark");
        assert!(b.update(&state(80 * MIB, 10, u64::MAX), now()).unwrap().starts_with("resuming"));
        assert!(b.update(&state(0, 900, u64::MAX), now()).unwrap().contains("SPOOL_MAX_RECORDS"));
    }

    #[test]
    fn above_the_low_watermark_waits_for_room_and_pauses_when_none_comes() {
        let mut b = Backpressure::new(limits(), Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |quarters: u32| t0 + PACE_LIMIT * quarters / 4;
        assert_eq!(b.update(&state(79 * MIB, 10, u64::MAX), at(0)), None);
        assert!(!b.pacing());
        assert_eq!(b.update(&state(85 * MIB, 10, u64::MAX), at(0)), None, "no pause yet");
        assert!(b.pacing(), "waits for room instead of polling");
        assert_eq!(b.update(&state(78 * MIB, 10, u64::MAX), at(2)), None);
        assert_eq!(b.update(&state(51 * MIB, 10, u64::MAX), at(2)), None);
        assert!(b.pacing(), "takes records again at half");
        assert_eq!(b.update(&state(50 * MIB, 10, u64::MAX), at(2)), None);
        assert!(!b.pacing());
        // A slow store: no pause while uploads still make room.
        assert_eq!(b.update(&state(81 * MIB, 10, u64::MAX), at(3)), None);
        assert_eq!(b.update(&state(81 * MIB - 1, 10, u64::MAX), at(6)), None, "the spool shrank");
        assert!(b.pacing());
        // A stopped store: no room for PACE_LIMIT.
        let why = b.update(&state(81 * MIB - 1, 10, u64::MAX), at(10)).unwrap();
        assert!(why.contains("made no room"), "{why}");
        assert!(b.paused && !b.pacing(), "paused: polls to keep the membership");
        assert!(b.update(&state(80 * MIB, 10, u64::MAX), at(11)).unwrap().starts_with("resuming"));
        assert!(b.pacing(), "then waits for half again");
    }

    #[test]
    fn a_slow_drain_pauses_so_that_the_consumer_keeps_polling() {
        // max.poll.interval.ms of 20 s: the consumer may wait for room 5 s without polling.
        let mut b = Backpressure::new(limits(), Duration::from_secs(20));
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(b.update(&state(0, 850, u64::MAX), at(0)), None);
        assert!(b.pacing());
        // One upload every 0.9 s: the spool shrinks, never for long enough to be stalled.
        let mut records = 850;
        let mut ms = 0;
        let mut waited_without_polling = Duration::ZERO;
        while ms < 60_000 && b.pacing() {
            ms += 900;
            records -= 1;
            assert_eq!(b.update(&state(0, records, u64::MAX), at(ms)).filter(|w| !w.contains("slowly")), None);
            if b.pacing() {
                waited_without_polling = Duration::from_millis(ms);
            }
        }
        assert!(b.paused && !b.pacing(), "paused after {ms} ms: polls again");
        assert!(waited_without_polling <= Duration::from_secs(5), "waited {waited_without_polling:?} without polling");
        // Stays paused (polling) down to half, not only to the low watermark, then takes records.
        assert_eq!(b.update(&state(0, 700, u64::MAX), at(ms + 1000)), None);
        assert!(b.paused);
        assert!(b.update(&state(0, 500, u64::MAX), at(ms + 2000)).unwrap().starts_with("resuming"));
        assert!(!b.pacing());
    }

    #[test]
    fn pauses_while_the_spool_cannot_be_written() {
        let mut b = Backpressure::new(limits(), Duration::from_secs(60));
        assert!(
            b.update(&SpoolState { unwritten: 5, ..state(0, 0, u64::MAX) }, now())
                .unwrap()
                .contains("cannot be written")
        );
        assert!(b.update(&state(0, 0, u64::MAX), now()).unwrap().starts_with("resuming"));
    }

    #[test]
    fn low_disk_resumes_on_free_space_or_a_drained_spool() {
        let mut b = Backpressure::new(limits(), Duration::from_secs(60));
        assert!(b.update(&state(40 * MIB, 10, 9 * MIB), now()).unwrap().contains("SPOOL_MIN_FREE_BYTES"));
        assert_eq!(b.update(&state(30 * MIB, 10, 11 * MIB), now()), None, "hysteresis: 12.5 MiB needed");
        assert!(b.update(&state(30 * MIB, 10, 13 * MIB), now()).unwrap().starts_with("resuming"));
        // The disk stays full (something else holds it), but the spool drained to half: room again.
        assert!(b.update(&state(40 * MIB, 10, 9 * MIB), now()).is_some());
        assert!(b.update(&state(20 * MIB, 10, 9 * MIB), now()).unwrap().starts_with("resuming"));
    }
}
