//! The spool: what the consumer's `insert_batch` and the uploaders' `pending` + `remove` cost.
//!
//! - `spool_insert`: 1 KB records in batches of 1, 100 and 1000 (records/s).
//! - `spool_insert_64KB`: 64 KB values, random (incompressible) and JSON-like (compressible), with
//!   zstd (the default, values of 16 KiB and more) and without (bytes/s).
//! - `spool_drain`: `pending` + `remove` of 1000 spooled 1 KB records, `pending` asking for 32 at a
//!   time (UPLOAD_WORKERS' default, as the dispatcher does when all workers are free) or all 1000.
//!
//! Each benchmark has a fresh spool in a temporary directory with the daemon's 64 MiB page cache;
//! every insert is of new offsets, so the spool grows while an insert benchmark runs.

// The allocator of the binary, so the figures are the archiver's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kafka_s3_archiver::decode::{self, Format};
use kafka_s3_archiver::spool::{Record, RecordTime, Spool, SpoolOptions, partition_prefix};
use rand::{RngCore, SeedableRng};

/// As `SPOOL_CACHE_BYTES` in src/lib.rs.
const SPOOL_CACHE_BYTES: u64 = 64 * 1024 * 1024;
const TOPIC: &str = "sinetstream.sensor";
const KAFKA_MS: i64 = 1_650_250_000_200;

/// A SINETStream v3 message of `len` bytes in all whose payload is JSON-like sensor readings.
fn json_value(len: usize) -> Bytes {
    let mut text = Vec::with_capacity(len + 128);
    let mut i = 0u64;
    while text.len() < len {
        let line = format!(
            "{{\"sensor\":\"s-{:04}\",\"temperature\":{}.{},\"humidity\":{},\"ts\":{}}}\n",
            i % 97,
            20 + i % 13,
            i % 10,
            40 + i % 31,
            KAFKA_MS + i as i64
        );
        text.extend_from_slice(line.as_bytes());
        i += 1;
    }
    envelope(text, len)
}

/// A SINETStream v3 message of `len` bytes in all whose payload is random bytes.
fn random_value(len: usize) -> Bytes {
    let mut bytes = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(5).fill_bytes(&mut bytes);
    envelope(bytes, len)
}

/// Wraps `payload` in a v3 envelope, trimmed so the whole value is `len` bytes.
fn envelope(mut payload: Vec<u8>, len: usize) -> Bytes {
    let overhead = decode::encode(KAFKA_MS * 1000, &payload[..len], Format::V3).len() - len;
    payload.truncate(len - overhead);
    let value = decode::encode(KAFKA_MS * 1000, &payload, Format::V3);
    debug_assert_eq!(value.len(), len);
    Bytes::from(value)
}

/// `n` records of one partition from `*next` on, as the consumer hands them to the spool.
fn records(value: &Bytes, next: &mut i64, n: usize) -> Vec<Record> {
    let first = *next;
    *next += n as i64;
    (first..*next)
        .map(|offset| Record {
            topic: TOPIC.into(),
            partition: 0,
            offset,
            time: RecordTime::Kafka(KAFKA_MS + offset),
            key: None,
            value: value.clone(),
        })
        .collect()
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
        for (zstd, options) in [("zstd", SpoolOptions::default()), ("plain", SpoolOptions { compress_min_bytes: None })]
        {
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
                        let batch = spool.pending(&prefix, |_| false, max).expect("pending");
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

criterion_group!(benches, bench_insert, bench_drain);
criterion_main!(benches);
