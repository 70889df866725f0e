//! The spool: what the consumer's inserts (here through `insert_batch`, which encodes whole
//! records as the consumer encodes fetched messages) and the uploaders' `pending` + `remove` cost.
//!
//! - `spool_insert`: 1 KB records in batches of 1, 100 and 1000 (records/s).
//! - `spool_insert_64KB`: 64 KB values, random (incompressible) and JSON-like (compressible), with
//!   zstd (the default, values of 16 KiB and more) and without (bytes/s).
//! - `spool_drain`: `pending` + `remove` of 1000 spooled 1 KB records, `pending` asking for 32 at a
//!   time (UPLOAD_WORKERS' default, as the dispatcher does when all workers are free) or all 1000.
//! - `spool_read_from`: 4096 spooled 1 KB records of a partition read back whole (`read_from`, the
//!   Parquet format's row groups) and glimpsed (`scan_from`, its batching).
//!
//! Each benchmark has a fresh spool in a temporary directory with the daemon's page cache
//! (`SPOOL_CACHE_BYTES`); every insert is of new offsets, so the spool grows while an insert
//! benchmark runs.

use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kafka_s3_archiver::pipeline::spool::{Spool, SpoolKey, SpoolOptions, partition_prefix};
use rand::{RngCore, SeedableRng};

mod common;
use common::{TOPIC, envelope, json_value, records};
use kafka_s3_archiver::SPOOL_CACHE_BYTES;

/// A SINETStream v3 message of `len` bytes in all whose payload is random bytes.
fn random_value(len: usize) -> Bytes {
    let mut bytes = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut bytes);
    envelope(bytes, len)
}

fn bench_insert(c: &mut Criterion) {
    let value = json_value(1024);
    let mut g = c.benchmark_group("spool_insert");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for batch in [1usize, 100, 1000] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let spool = Spool::open(dir.path(), SPOOL_CACHE_BYTES).expect("open the spool");
        let mut next = 0;
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::new("1KB", format!("batch_{batch}")), |b| {
            b.iter_batched(
                || records(&value, &mut next, batch),
                |rs| spool.insert_batch(&rs).expect("insert"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // 64 KB values: zstd pays on what compresses and only costs on what does not.
    let mut g = c.benchmark_group("spool_insert_64KB");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    const BATCH: usize = 100;
    for (kind, value) in [("random", random_value(64 * 1024)), ("json", json_value(64 * 1024))] {
        let plain = SpoolOptions { compress_min_bytes: None, ..SpoolOptions::default() };
        for (zstd, options) in [("zstd", SpoolOptions::default()), ("plain", plain)] {
            let dir = tempfile::tempdir().expect("temporary directory");
            let spool = Spool::open_with(dir.path(), SPOOL_CACHE_BYTES, options).expect("open the spool");
            let mut next = 0;
            g.throughput(Throughput::Bytes((BATCH * value.len()) as u64));
            g.bench_function(BenchmarkId::new(kind, format!("{zstd}/batch_{BATCH}")), |b| {
                b.iter_batched(
                    || records(&value, &mut next, BATCH),
                    |rs| spool.insert_batch(&rs).expect("insert"),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn bench_drain(c: &mut Criterion) {
    const N: usize = 1000;
    let value = json_value(1024);
    let prefix = partition_prefix(TOPIC, 0);
    let mut g = c.benchmark_group("spool_drain");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(N as u64));
    for max in [32usize, N] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let spool = Spool::open(dir.path(), SPOOL_CACHE_BYTES).expect("open the spool");
        let mut next = 0;
        g.bench_function(BenchmarkId::new("1KB", format!("pending_{max}")), |b| {
            b.iter_batched(
                || spool.insert_batch(&records(&value, &mut next, N)).expect("insert"),
                |()| {
                    let mut drained = 0;
                    loop {
                        let batch = spool.pending(&prefix, |_| false, max, usize::MAX).expect("pending");
                        if batch.is_empty() {
                            break;
                        }
                        for (key, _) in &batch {
                            spool.remove(key).expect("remove");
                        }
                        drained += batch.len();
                    }
                    assert_eq!(drained, N);
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn bench_remove(c: &mut Criterion) {
    const N: usize = 4096;
    let value = json_value(1024);
    let mut g = c.benchmark_group("spool_remove");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(N as u64));
    for all in [false, true] {
        let dir = tempfile::tempdir().expect("temporary directory");
        let spool = Spool::open(dir.path(), SPOOL_CACHE_BYTES).expect("open the spool");
        let mut next = 0;
        let name = if all { "remove_all" } else { "remove" };
        g.bench_function(BenchmarkId::new("1KB", format!("{name}_{N}")), |b| {
            b.iter_batched(
                || {
                    let first = next;
                    spool.insert_batch(&records(&value, &mut next, N)).expect("insert");
                    (first..next).map(|o| SpoolKey::new(TOPIC, 0, o)).collect::<Vec<_>>()
                },
                |keys| {
                    if all {
                        spool.remove_all(&keys).expect("remove");
                    } else {
                        for key in &keys {
                            spool.remove(key).expect("remove");
                        }
                    }
                    assert_eq!(spool.record_count(), 0);
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

fn bench_read_from(c: &mut Criterion) {
    const N: usize = 4096;
    let value = json_value(1024);
    let mut g = c.benchmark_group("spool_read_from");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(N as u64));
    let dir = tempfile::tempdir().expect("temporary directory");
    let spool = Spool::open(dir.path(), SPOOL_CACHE_BYTES).expect("open the spool");
    spool.insert_batch(&records(&value, &mut 0, N)).expect("insert");
    let prefix = partition_prefix(TOPIC, 0);
    g.bench_function(BenchmarkId::new("1KB", N), |b| {
        b.iter(|| {
            let read = spool.read_from(&prefix, 0, usize::MAX, u64::MAX).expect("read");
            assert_eq!(read.len(), N);
        })
    });
    // What the Parquet format's dispatcher reads to batch the records: offset, time and length.
    g.bench_function(BenchmarkId::new("scan_1KB", N), |b| {
        b.iter(|| {
            let read = spool.scan_from(&prefix, 0, usize::MAX, u64::MAX).expect("scan");
            assert_eq!(read.len(), N);
        })
    });
    g.finish();
}

criterion_group!(benches, bench_insert, bench_drain, bench_remove, bench_read_from);
criterion_main!(benches);
