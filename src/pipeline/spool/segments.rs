//! The value files (segments): records' encoded values appended one after another, counted per
//! file so that a file is deleted once none of its records is left, and compacted (its records
//! left rewritten at the end of the current file) when removed ones pile up behind ones that stay,
//! past a quarter of the spool's bound.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[cfg(test)]
use super::faults;
use super::runs::{Location, build_runs, run_key, split_run_key};
use super::{Spool, SpoolError};

/// A value file is closed for appends once it reaches this size.
pub(super) const SEGMENT_BYTES: u64 = 16 << 20;
/// Bytes buffered before they are written to the value file.
const WRITE_BUFFER_BYTES: usize = 256 << 10;
/// A compaction that failed is tried again after this long, doubled after each failure in a row up
/// to 16 times as long, not at every batch: each attempt reads and writes a file's records again,
/// and one that fails part-way leaves what it appended as garbage until that file is compacted.
const COMPACT_RETRY: Duration = Duration::from_secs(10);

/// One value file.
#[derive(Debug)]
pub(super) struct Segment {
    /// Opened for reading; shared with readers outside the lock.
    pub(super) file: Arc<File>,
    pub(super) len: u64,
    pub(super) live: u64,
    pub(super) live_bytes: u64,
    /// Appended to since a flush last synced it.
    pub(super) unsynced: bool,
}

/// Makes value file `id` durable.
#[cfg_attr(not(test), allow(unused_variables))]
pub(super) fn sync_file(id: u32, file: &File) -> std::io::Result<()> {
    #[cfg(test)]
    faults::hit(faults::Point::Sync(id))?;
    file.sync_data()
}

/// The value files, and the one being appended to. Removals and compactions change the index under
/// the lock of this struct; an insert appends and counts its values under it, then indexes them
/// outside it. So a count may include records that are about to be indexed, never one that left.
#[derive(Debug)]
pub(super) struct Segments {
    pub(super) dir: PathBuf,
    pub(super) files: BTreeMap<u32, Segment>,
    /// The file being appended to, with its id.
    pub(super) writer: Option<(u32, BufWriter<File>)>,
    pub(super) next_id: u32,
    /// Runs with removals not yet written to their entry, by run key.
    pub(super) removals: HashMap<Vec<u8>, Removals>,
    /// Compactions that failed in a row, and when the next may be tried.
    pub(super) compact_failures: u32,
    pub(super) compact_after: Option<Instant>,
    /// Index entries were left in place after a failed insert, perhaps not durably: the next insert
    /// flushes the index before it returns, even when it finds the whole batch present.
    pub(super) unflushed: bool,
}

/// A run's removed slots, ahead of its entry.
#[derive(Debug)]
pub(super) struct Removals {
    pub(super) removed: Vec<bool>,
    /// Removals since the entry was written.
    pub(super) unwritten: u32,
}

impl Segments {
    pub(super) fn path(dir: &Path, id: u32) -> PathBuf {
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
            self.files.insert(id, Segment { file, len: 0, live: 0, live_bytes: 0, unsynced: false });
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
        segment.unsynced = true;
        Ok(location)
    }

    /// Appends a batch's values and makes them readable; `written` gets their locations. Returns
    /// the files to sync before they are indexed, with their ids: those the batch wrote to when
    /// `sync` is asked, none otherwise.
    pub(super) fn append_all<'a>(
        &mut self,
        values: impl Iterator<Item = &'a [u8]>,
        written: &mut Vec<Location>,
        sync: bool,
    ) -> Result<Vec<(u32, Arc<File>)>, SpoolError> {
        for value in values {
            written.push(self.append(value)?);
        }
        self.finish(false)?;
        Ok(if sync { self.files_of(written) } else { Vec::new() })
    }

    /// The files the values at `written` lie in, with their ids (appends that went past
    /// [`SEGMENT_BYTES`] lie in two).
    fn files_of(&self, written: &[Location]) -> Vec<(u32, Arc<File>)> {
        let mut ids: Vec<u32> = written.iter().map(|l| l.segment).collect();
        ids.dedup();
        ids.into_iter().filter_map(|id| Some((id, self.files.get(&id)?.file.clone()))).collect()
    }

    /// Takes back values that were appended but will not be indexed; deletes the files left empty.
    /// All are released before a file is deleted, and every deletion is tried, so that a deletion
    /// that fails leaves no value counted that is not indexed; the first error is returned.
    pub(super) fn forget(&mut self, written: &[Location]) -> Result<(), SpoolError> {
        let mut empty: Vec<u32> = written.iter().filter_map(|l| self.release(*l)).collect();
        empty.dedup();
        empty.into_iter().map(|id| self.delete(id)).fold(Ok(()), Result::and)
    }

    /// Makes the values at `written` durable: syncs every file they lie in.
    fn sync(&mut self, written: &[Location]) -> Result<(), SpoolError> {
        self.finish(false)?;
        for (id, file) in self.files_of(written) {
            sync_file(id, &file)?;
        }
        Ok(())
    }

    /// Makes what was appended readable; with `sync`, durable: syncs every file appended to since
    /// a flush last synced it.
    pub(super) fn finish(&mut self, sync: bool) -> Result<(), SpoolError> {
        if let Some((_, out)) = &mut self.writer {
            out.flush()?;
        }
        if sync {
            for (id, segment) in self.files.iter_mut().filter(|(_, s)| s.unsynced) {
                sync_file(*id, &segment.file)?;
                segment.unsynced = false;
            }
        }
        Ok(())
    }

    /// A record at `location` left the index; returns its file when none of its records is left.
    pub(super) fn release(&mut self, location: Location) -> Option<u32> {
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

    pub(super) fn delete(&mut self, id: u32) -> Result<(), SpoolError> {
        #[cfg(test)]
        faults::hit(faults::Point::Delete(id))?;
        self.files.remove(&id);
        match std::fs::remove_file(Segments::path(&self.dir, id)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    pub(super) fn read(file: &File, location: Location) -> std::io::Result<Option<Vec<u8>>> {
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

    pub(super) fn live(&self) -> (u64, u64) {
        self.files.values().fold((0, 0), |(n, b), s| (n + s.live, b + s.live_bytes))
    }

    /// A file other than the current one, when removed records take more room on disk than a
    /// quarter of `max_bytes` (the spool's bound) or of the records left, whichever is more, and
    /// more than two files: so the files never take more than 1.25 times that plus 32 MiB. Below
    /// that nothing is moved, as the disk is sized for the bound: in the Parquet format the records
    /// of the last seconds lie in every recent file while their batches fill, and whole files go a
    /// moment later without a record copied. Unless the disk is `short_of_room` (asked only then):
    /// a quarter of the records left is the limit again. The oldest file that is at least half
    /// removed records; when none is, the one with the most (moving mostly live records frees
    /// little).
    pub(super) fn to_compact(&self, max_bytes: u64, short_of_room: impl FnOnce() -> bool) -> Option<u32> {
        let (_, live_bytes) = self.live();
        let garbage = self.disk_bytes() - live_bytes;
        if garbage <= (live_bytes / 4).max(2 * SEGMENT_BYTES) || (garbage <= max_bytes / 4 && !short_of_room()) {
            return None;
        }
        let current = self.writer.as_ref().map(|(id, _)| *id);
        // Files with removed records in them: one without frees nothing for what it copies.
        let old = || self.files.iter().filter(move |(id, s)| Some(**id) != current && s.len > s.live_bytes);
        old()
            .find(|(_, s)| s.live_bytes * 2 <= s.len)
            .or_else(|| old().max_by_key(|(id, s)| (s.len - s.live_bytes, std::cmp::Reverse(**id))))
            .map(|(id, _)| *id)
    }
}

/// Hands the garbage this thread left in sled to the epoch collector now. sled frees replaced
/// tree nodes and written 512 KiB log buffers through crossbeam-epoch, which keeps them in a
/// thread-local bag until 64 have gathered: a consumer paused under backpressure could hold its last
/// ones for as long as the pause lasted, and a resume burst stacked new ones on top. Handing them
/// over after each insert and removal lowers the memory peaks at a resume and over a long backlog,
/// at no cost the benchmarks show (figures in `benches/results/HISTORY.md`, "Spool design notes").
pub(super) fn release_garbage() {
    crossbeam_epoch::pin().flush();
}

// Compaction, under the spool's lock, on the consumer's thread: after an insert, and while the
// consumer is paused. Only there: an insert appends its values, then indexes them outside the
// lock, and a compaction in between would delete a file whose new records it did not see.
impl Spool {
    /// Compacts a value file when one is due (see [`Segments::to_compact`]). One that
    /// fails changed nothing: it is logged and tried again later (see [`COMPACT_RETRY`]).
    pub(super) fn compact_if_due(&self, segments: &mut Segments) {
        self.compact_when(segments, || self.short_of_room(self.available_space()));
    }

    /// For the consumer while it is paused, which inserts nothing: with `free` bytes free on the
    /// spool's disk (as it just read them), compacts as an insert would on a disk short of room,
    /// so that room comes back while it waits for room (a record that stays, such as a batch
    /// whose upload keeps failing, pins every file it is in). Nothing otherwise, without taking
    /// the lock. Only the consumer may call it (see above).
    pub fn compact_if_short_of_room(&self, free: u64) {
        if !self.short_of_room(free) {
            return;
        }
        let mut segments = self.segments();
        self.compact_when(&mut segments, || true);
        self.publish(&segments);
    }

    /// Less than twice SPOOL_MIN_FREE_BYTES free: removed records may no longer wait for the bound.
    fn short_of_room(&self, free: u64) -> bool {
        free < self.options.min_free_bytes.saturating_mul(2)
    }

    /// [`Spool::compact_if_due`], `short_of_room` asked only when the answer matters.
    fn compact_when(&self, segments: &mut Segments, short_of_room: impl FnOnce() -> bool) {
        let Some(id) = segments.to_compact(self.options.max_bytes, short_of_room) else { return };
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
    pub(super) fn compact(&self, segments: &mut Segments, id: u32) -> Result<(), SpoolError> {
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
                for (key, location) in run.live_records(&first) {
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
}
