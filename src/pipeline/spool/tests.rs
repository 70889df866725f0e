//! Unit tests of the spool: what it holds across inserts, removals, reopenings and compactions,
//! the conversion of older spools, and faults injected into appends, syncs, index writes and
//! deletions (see [`super::faults`]).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;

use super::faults::Point;
use super::segments::{SEGMENT_BYTES, Segment};
use super::upgrade::{LEGACY_TREE, LOCATION_VERSION, RECORD_INDEX_TREE};
use super::*;

pub(super) fn rec(topic: &str, partition: i32, offset: i64, value: Vec<u8>) -> Record {
    Record {
        topic: topic.into(),
        partition,
        offset,
        time: RecordTime::Kafka(1_650_000_000_000),
        key: None,
        value: Some(value.into()),
        headers: Some(Vec::new()),
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

/// [`decode_entry`] of a copy of `raw`; the entry's [`Glimpse`] agrees with what it decodes to,
/// and an entry refused at a glimpse is refused by the decoder too.
fn decode(key: &SpoolKey, raw: &[u8]) -> Result<Record, SpoolError> {
    let decoded = decode_entry(key, Bytes::copy_from_slice(raw));
    match (&decoded, codec::glimpse_entry(key.prefix(), key.offset(), raw)) {
        (Ok(r), Ok(glimpse)) => {
            assert_eq!(glimpse, Glimpse { offset: r.offset, time: r.time, value_len: r.value_bytes().len() as u64 })
        }
        (Ok(_), Err(e)) => panic!("an entry refused at a glimpse decodes: {e}"),
        // A glimpse checks only the lengths.
        (Err(_), _) => {}
    }
    decoded
}

#[test]
fn values_round_trip_with_and_without_compression() {
    let key = SpoolKey::new("t", 0, 5);
    let mut r = rec("t", 0, 5, b"small".to_vec());
    r.key = Some(Bytes::from_static(b"k"));
    r.time = RecordTime::Consumed(-5);
    assert_eq!(decode(&key, &encode_value(&r)).unwrap(), r);
    let big = rec("t", 0, 5, vec![7; 100_000]);
    let enc = encode_value(&big);
    assert!(enc.len() < 10_000, "compressible values shrink");
    assert_eq!(decode(&key, &enc).unwrap(), big);
    let noise: Vec<u8> = (0..100_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let random = rec("t", 0, 5, noise);
    assert_eq!(decode(&key, &encode_value(&random)).unwrap(), random);
    let tombstone = Record { value: None, ..rec("t", 0, 5, Vec::new()) };
    assert_eq!(decode(&key, &encode_value(&tombstone)).unwrap(), tombstone);
    let empty = rec("t", 0, 5, Vec::new());
    assert_eq!(decode(&key, &encode_value(&empty)).unwrap().value.as_deref(), Some(&b""[..]), "empty is not null");
    assert!(decode(&key, &[9, 0]).is_err());
}

#[test]
fn headers_round_trip_and_entries_written_before_them_read_as_none() {
    let key = SpoolKey::new("t", 0, 5);
    let headers = vec![
        ("trace-id".to_string(), Some(Bytes::from_static(b"\x00\x01"))),
        ("trace-id".to_string(), None),
        ("センサー".to_string(), Some(Bytes::new())),
    ];
    for value in [Some(b"small".to_vec()), Some(vec![7; 100_000]), None] {
        let mut r = rec("t", 0, 5, value.clone().unwrap_or_default());
        r.value = value.map(Bytes::from);
        r.key = Some(Bytes::from_static(b"k"));
        r.headers = Some(headers.clone());
        assert_eq!(decode(&key, &encode_value(&r)).unwrap(), r);
        let cut = encode_value(&r);
        assert!(decode(&key, &cut[..16]).is_err(), "headers cut short are corrupt");
        assert!(codec::glimpse_entry(key.prefix(), key.offset(), &cut[..16]).is_err(), "and refused at a glimpse");
    }
    // An entry as the spool wrote it before headers were kept (version 1): version, flags (a
    // key), time, key; its headers are not known.
    let mut old = vec![1, 4];
    old.extend_from_slice(&1_650_000_000_000i64.to_be_bytes());
    old.extend_from_slice(&1u32.to_be_bytes());
    old.extend_from_slice(b"kvalue");
    let r = decode(&key, &old).unwrap();
    assert_eq!((r.key.as_deref(), r.value.as_deref(), r.headers), (Some(&b"k"[..]), Some(&b"value"[..]), None));
    let mut future = encode_value(&rec("t", 0, 5, b"v".to_vec()));
    future[0] = 3;
    assert!(decode(&key, &future).is_err(), "a version this archiver does not know is refused");
}

#[test]
fn uncompressed_spools_store_large_values_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let off = SpoolOptions { compress_min_bytes: None, ..SpoolOptions::default() };
    let s = Spool::open_with(dir.path(), 1 << 20, off).unwrap();
    // Compressible, so only the option keeps it from being compressed.
    let big = rec("t", 0, 1, b"{\"sensor\":\"s-1\",\"temperature\":23.5}\n".repeat(2048)[..64 * 1024].to_vec());
    assert!(encode_value(&big).len() < 16 * 1024, "compressed by default");
    assert_eq!(encode_fields(&Fields::of(&big), off).len(), 10 + 64 * 1024, "stored as is");
    s.insert_batch(std::slice::from_ref(&big)).unwrap();
    assert!(s.byte_count() > 64 * 1024);
    let got = s.pending(&partition_prefix("t", 0), |_| false, 10, usize::MAX).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, big);
    s.flush().unwrap();
    drop(s);
    let reopened = Spool::open_in_test(dir.path());
    assert_eq!(reopened.pending(&partition_prefix("t", 0), |_| false, 10, usize::MAX).unwrap()[0].1, big);
}

#[test]
fn spool_survives_reopen_and_dedupes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = Spool::open_in_test(dir.path());
        s.insert_batch(&[rec("a", 0, 1, b"x".to_vec()), rec("a", 0, 2, b"y".to_vec()), rec("b", 3, 7, b"z".to_vec())])
            .unwrap();
        s.insert_batch(&[rec("a", 0, 1, b"x".to_vec())]).unwrap();
        s.remove(&SpoolKey::new("a", 0, 2)).unwrap();
        s.flush().unwrap();
    }
    let s = Spool::open_in_test(dir.path());
    assert_eq!(s.record_count(), 2);
    assert_eq!(s.partitions(), vec![partition_prefix("a", 0), partition_prefix("b", 3)]);
    let got = s.pending(&partition_prefix("a", 0), |_| false, 10, usize::MAX).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.value_bytes(), Bytes::from_static(b"x"));
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
    let got: Vec<_> = got.iter().map(|(_, r)| (r.offset, r.value.clone().unwrap_or_default())).collect();
    assert_eq!(got, vec![(1, Bytes::from_static(b"x")), (5, Bytes::from_static(b"new"))]);
}

#[test]
fn pending_stops_at_the_byte_budget_but_returns_at_least_one_record() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open_in_test(dir.path());
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
fn inserts_leave_syncing_to_the_os_and_a_flush_syncs_every_file_appended_to() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open_with(dir.path(), 1 << 20, SpoolOptions { compress_min_bytes: None, ..SpoolOptions::default() })
        .unwrap();
    // Values of 1 MiB and 10 bytes: 16 fill a file.
    let batch =
        |from: i64, n: i64| (from..from + n).map(|o| rec("t", 0, o, vec![o as u8; 1 << 20])).collect::<Vec<_>>();
    let synced = || faults::passed().into_iter().filter(|p| matches!(p, Point::Sync(_))).collect::<Vec<_>>();
    faults::clear();
    s.insert_batch(&batch(0, 16)).unwrap();
    s.insert_batch(&batch(16, 9)).unwrap();
    assert_eq!(synced(), [], "25 MiB in files 0 and 1, none synced");
    s.flush().unwrap();
    assert_eq!(synced(), [Point::Sync(0), Point::Sync(1)]);
    faults::clear();
    s.insert_batch(&batch(25, 10)).unwrap();
    s.flush().unwrap();
    assert_eq!(synced(), [Point::Sync(1), Point::Sync(2)], "only what was appended to since");
}

fn value_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("values")).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
}

/// A spool holding records 0..n of partition t/0, values of 1,000 bytes (1,010 spooled, end to
/// end in the first value file), flushed.
fn spool_of_small_values(dir: &Path, n: i64) -> Spool {
    let s = Spool::open_in_test(dir);
    s.insert_batch(&(0..n).map(|o| rec("t", 0, o, noise(o, 1000))).collect::<Vec<_>>()).unwrap();
    s.flush().unwrap();
    s
}

/// The first value file, open for writing: to damage it as a crash or a bad disk would.
fn first_value_file(dir: &Path) -> File {
    File::options().write(true).open(&value_files(dir)[0]).unwrap()
}

fn noise(seed: i64, n: usize) -> Vec<u8> {
    (0..n as u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed as u8).collect()
}

#[test]
fn value_files_go_once_their_records_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open_in_test(dir.path());
    // 40 MiB: three value files.
    for batch in 0..40 {
        s.insert_batch(&(0..64).map(|i| rec("t", 0, batch * 64 + i, noise(i, 16_000))).collect::<Vec<_>>()).unwrap();
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
    let s = Spool::open_in_test(dir.path());
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
    drop(spool_of_small_values(dir.path(), 4));
    // The host crashed while the last value was being written: its bytes are cut short; the
    // one before it holds other bytes.
    let f = first_value_file(dir.path());
    f.set_len(f.metadata().unwrap().len() - 10).unwrap();
    f.write_all_at(&[0; 5], 2 * 1010 + 20).unwrap();
    let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
    assert_holds(&s, &records);
    drop(s);
    let s = Spool::open_in_test(dir.path());
    assert_eq!(s.record_count(), 2500, "moved once, not twice");
}

#[test]
fn records_inserted_while_others_are_removed_are_each_read_once() {
    // An insert indexes its batch outside the lock that removals take: the counts and the
    // index must still agree, and every record must come out exactly once.
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(Spool::open_in_test(dir.path()));
    const N: i64 = 20_000;
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || {
            for from in (0..N).step_by(100) {
                let mut batch: Vec<_> =
                    (from..from + 100).map(|o| rec("t", (o % 4) as i32, o, noise(o, 1000))).collect();
                // Every tenth batch is synced and its index flushed before it returns, as
                // records without a Kafka timestamp are, while the removals go on.
                if from % 1000 == 0 {
                    batch[0].time = RecordTime::Consumed(1_650_000_000_000);
                }
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
                assert_eq!(record.value_bytes(), noise(record.offset, 1000));
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
    let s = Spool::open_in_test(dir.path());
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
        got.into_iter().map(|(_, r)| (r.offset, r.value.unwrap_or_default())).collect()
    };
    {
        let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
    assert_holds(&s, &records);
    // Delivered again: not spooled twice.
    s.insert_batch(&records[..50]).unwrap();
    assert_eq!(s.record_count(), 300);
    drop(s);
    let s = Spool::open_in_test(dir.path());
    assert_eq!(s.record_count(), 300, "moved once, not twice");
    for r in &records {
        s.remove(&SpoolKey::new(&r.topic, r.partition, r.offset)).unwrap();
    }
    assert_eq!((s.record_count(), s.keys().unwrap().len()), (0, 0));
    assert!(value_files(dir.path()).is_empty(), "the old value file goes with its last record");
}

#[test]
fn compaction_takes_a_file_mostly_of_removed_records_over_an_older_one_mostly_live() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open_in_test(dir.path());
    // File 0: a partition whose batches are filling, three in four of its records still in.
    // Values of 16,010 bytes, 1,048 to a file.
    let filling: Vec<_> = (0..1048).map(|o| rec("t", 9, o, noise(o, 16_000))).collect();
    for chunk in filling.chunks(64) {
        s.insert_batch(chunk).unwrap();
    }
    for o in (0..1048).step_by(4) {
        s.remove(&SpoolKey::new("t", 9, o)).unwrap();
    }
    let oldest = value_files(dir.path()).remove(0);
    // Then another partition's records pass through, one in 500 staying, until compactions ran.
    let mut stay = Vec::new();
    for batch in 0..80 {
        let records: Vec<_> = (batch * 64..batch * 64 + 64).map(|o| rec("t", 0, o, noise(o, 16_000))).collect();
        s.insert_batch(&records).unwrap();
        for r in &records {
            if r.offset % 500 == 0 {
                stay.push(r.clone());
            } else {
                s.remove(&SpoolKey::new("t", 0, r.offset)).unwrap();
            }
        }
    }
    let files = value_files(dir.path());
    assert!(files.len() <= 4, "compacted: {files:?}");
    assert!(files.contains(&oldest), "the mostly live file stays where it is, the passing ones went: {files:?}");
    let mut want: Vec<_> = filling.into_iter().filter(|r| r.offset % 4 != 0).collect();
    want.extend(stay);
    assert_holds_once(&s, &want);
}

#[test]
fn compaction_takes_the_oldest_file_half_removed_else_the_one_most_removed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open_in_test(dir.path());
    let mut segments = s.segments();
    let file = Arc::new(tempfile::tempfile().unwrap());
    // Files by (size, live bytes) in MiB, oldest first; the last is being written when `current`.
    // `bound`: the spool's bound (SPOOL_MAX_BYTES) in MiB; `short`: the disk is short of room.
    let mut due = |files: &[(u64, u64)], current: bool, bound: u64, short: bool| {
        segments.files = (0u32..)
            .zip(files)
            .map(|(id, &(len, live))| {
                (id, Segment { file: file.clone(), len: len << 20, live: 1, live_bytes: live << 20, unsynced: false })
            })
            .collect();
        let last = files.len() as u32 - 1;
        segments.writer = current.then(|| (last, std::io::BufWriter::new(tempfile::tempfile().unwrap())));
        segments.to_compact(bound << 20, || short)
    };
    // 96 MiB on disk, 61 MiB live: due. No file is half removed: of files 1 and 3, which hold
    // the most removed records, the older.
    let six = [(16, 10), (16, 9), (16, 11), (16, 9), (16, 12), (16, 10)];
    assert_eq!(due(&six, false, 0, false), Some(1));
    // File 4 (closed early) is half removed: it goes first, though files 1 and 3 hold more.
    assert_eq!(due(&[(16, 10), (16, 9), (16, 11), (16, 9), (8, 4), (16, 10)], false, 0, false), Some(4));
    // Removed records under a quarter of the live ones and 32 MiB: nothing is due.
    assert_eq!(due(&[(16, 16), (16, 16), (16, 16), (16, 16), (16, 16), (16, 1)], false, 0, false), None);
    // Under a bound, removed records may take a quarter of it: 35 MiB of them are due at a bound
    // of 128 MiB (a quarter: 32 MiB), not at 160 MiB (40 MiB), nor at the default 1 GiB.
    assert_eq!(due(&six, false, 128, false), Some(1));
    assert_eq!(due(&six, false, 160, false), None);
    assert_eq!(due(&six, false, 1024, false), None);
    // Unless the disk is short of room: then a quarter of the live records is the limit again.
    assert_eq!(due(&six, false, 1024, true), Some(1));
    // Due, but every removed record is in the file being written: nothing to gain elsewhere.
    assert_eq!(due(&[(16, 16), (16, 16), (16, 16), (16, 16), (64, 1)], true, 0, false), None);
}

#[test]
fn a_damaged_value_is_an_error_for_reads_and_scans_not_a_wrong_record() {
    let dir = tempfile::tempdir().unwrap();
    let s = spool_of_small_values(dir.path(), 3);
    // A byte of the second record's value flipped on disk: its CRC no longer holds.
    first_value_file(dir.path()).write_at(&[0x55], 1010 + 500).unwrap();
    let prefix = partition_prefix("t", 0);
    for error in [s.read_from(&prefix, 0, 10, u64::MAX).map(drop), s.scan_from(&prefix, 0, 10, u64::MAX).map(drop)] {
        let e = error.expect_err("a damaged value is not read as a record");
        assert!(e.to_string().contains("value missing or damaged"), "{e}");
    }
}

/// A spool whose oldest value file is due for compaction at the next insert. File 0 holds a run
/// of 64 records of partition 9 whose odd ones were stored (their removals not yet written to
/// the run's entry), then records of partition 0 pass through files 0 to 3, one in 500 staying;
/// file 3, the one written to, is ten values short of full. Returns the records it holds.
fn due_for_compaction(dir: &Path) -> (Spool, Vec<Record>) {
    // Inserts never sync on their own: the syncs seen are the compaction's.
    let s = Spool::open_in_test(dir);
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

/// [`due_for_compaction`], flushed and closed: the records it holds, and its oldest value file.
fn closed_due_for_compaction(dir: &Path) -> (Vec<Record>, PathBuf) {
    let (s, want) = due_for_compaction(dir);
    s.flush().unwrap();
    drop(s);
    (want, Segments::path(&dir.join("values"), 0))
}

/// A bound (SPOOL_MAX_BYTES) of 1 GiB, on a disk with room or, `short`, with less than twice the
/// minimum free.
fn bound_of_1_gib(short: bool) -> SpoolOptions {
    SpoolOptions { max_bytes: 1 << 30, min_free_bytes: if short { u64::MAX / 4 } else { 0 }, ..SpoolOptions::default() }
}

#[test]
fn under_its_bound_the_spool_leaves_removed_records_where_they_are_unless_short_of_room() {
    let dir = tempfile::tempdir().unwrap();
    let (mut want, first_file) = closed_due_for_compaction(dir.path());
    // About 63 MiB of removed records: due with no bound, not under a bound of 1 GiB (a quarter
    // of it, 256 MiB, may be removed records).
    let s = Spool::open_in_test_with(dir.path(), bound_of_1_gib(false));
    let trigger = rec("t", 1, 0, noise(1, 16_000));
    want.push(trigger.clone());
    s.insert_batch(std::slice::from_ref(&trigger)).unwrap();
    assert!(value_files(dir.path()).contains(&first_file), "no record moved");
    assert_holds_once(&s, &want);
    // Under the same bound, on a disk short of room (less than twice the minimum free), the next
    // insert compacts.
    drop(s);
    let s = Spool::open_in_test_with(dir.path(), bound_of_1_gib(true));
    let trigger = rec("t", 1, 1, noise(2, 16_000));
    want.push(trigger.clone());
    s.insert_batch(std::slice::from_ref(&trigger)).unwrap();
    assert!(!value_files(dir.path()).contains(&first_file), "compacted");
    assert_holds_once(&s, &want);
}

#[test]
fn a_paused_consumer_compacts_on_a_disk_short_of_room_as_an_insert_would() {
    // A consumer paused for free space inserts nothing, so no insert checks for compaction: it
    // asks the spool itself while it waits.
    let dir = tempfile::tempdir().unwrap();
    let (mut want, first_file) = closed_due_for_compaction(dir.path());
    // Under a bound of 1 GiB with room on the disk, nothing moves.
    let s = Spool::open_in_test_with(dir.path(), bound_of_1_gib(false));
    s.compact_if_short_of_room(s.available_space());
    assert!(value_files(dir.path()).contains(&first_file), "no record moved");
    assert_holds_once(&s, &want);
    drop(s);
    // Short of room: a removal (the uploads go on) does not compact, the paused consumer's call
    // does, with the removal not yet in the index.
    let s = Spool::open_in_test_with(dir.path(), bound_of_1_gib(true));
    let gone = want.pop().expect("a record held");
    s.remove(&SpoolKey::new(&gone.topic, gone.partition, gone.offset)).unwrap();
    assert!(value_files(dir.path()).contains(&first_file), "a removal compacts nothing");
    s.compact_if_short_of_room(s.available_space());
    assert!(!value_files(dir.path()).contains(&first_file), "compacted");
    assert_holds_once(&s, &want);
    s.flush().unwrap();
    drop(s);
    assert_holds_once(&Spool::open_in_test(dir.path()), &want);
}

/// Compacts the file due for it now (after a failure, the inserts wait before they try again).
fn compact_now(s: &Spool) {
    let mut segments = s.segments();
    let id = segments.to_compact(0, || false).expect("a file is due for compaction");
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
    assert_holds_once(&Spool::open_in_test(dir.path()), &want);
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

#[test]
fn a_batch_with_a_record_without_a_kafka_timestamp_is_synced_before_it_is_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open_in_test(dir.path());
    faults::clear();
    s.insert_batch(&consumed_batch()).unwrap();
    let passed: Vec<_> = faults::passed().into_iter().filter(|p| *p != Point::Append).collect();
    assert_eq!(passed, [Point::Sync(0), Point::ApplyIndex, Point::FlushIndex]);
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
    let s = Spool::open_in_test(dir);
    assert!(held(&s) == batch, "every record with its value after a reopening");
    assert_eq!(s.record_count(), batch.len() as u64);
}

#[test]
fn a_batch_whose_index_flush_fails_is_stored_whole_by_the_retry() {
    let dir = tempfile::tempdir().unwrap();
    let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
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
    let s = Spool::open_in_test(dir.path());
    assert_eq!(s.record_count(), 0);
    assert!(value_files(dir.path()).is_empty(), "an opening deletes the files no entry points at");
    the_retry_stores_the_batch_whole(dir.path(), s, &consumed_batch());
}
