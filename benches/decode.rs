//! Decoding and key building: the CPU work an uploader does per record before it stores anything.
//!
//! - `decode`: [`decode::decode`] on SINETStream v3 and v2 messages of 1 KB and 64 KB.
//! - `keys`: the payload and timestamp objects of a record ([`Layout::payload`], [`Layout::timestamp`]).
//! - `plan`: both, as [`archive::plan`] does them for a spooled record.
//!
//! Each group comes in records/s (`Throughput::Elements`) and, for decoding, in bytes/s.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime};
use kafka_s3_archiver::archive::UndecodablePolicy;
use kafka_s3_archiver::archive::sinetstream::{self as decode, Format};
use kafka_s3_archiver::archive::{self, Plan};
use kafka_s3_archiver::archive::{Layout, RecordPlace, micros_to_millis};
use kafka_s3_archiver::record::{Record, RecordTime};

mod common;
use common::{KAFKA_MS, TOPIC, json_payload};

/// The producer's tstamp (µs) and the Kafka record timestamp (ms) of every benchmarked record.
const TSTAMP_US: i64 = 1_650_250_000_123_456;

/// The benchmarked messages: (name, record value).
fn messages() -> Vec<(&'static str, Bytes)> {
    let kinds = [
        ("v3/1KB", Format::V3, 1024),
        ("v3/64KB", Format::V3, 64 * 1024),
        ("v2/1KB", Format::V2, 1024),
        ("v2/64KB", Format::V2, 64 * 1024),
    ];
    kinds.map(|(name, format, len)| (name, Bytes::from(decode::encode(TSTAMP_US, &json_payload(len), format)))).to_vec()
}

fn quick(group: &mut BenchmarkGroup<'_, WallTime>) {
    group.warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
}

fn bench_decode(c: &mut Criterion) {
    let messages = messages();
    let mut g = c.benchmark_group("decode");
    quick(&mut g);
    g.throughput(Throughput::Elements(1));
    for (name, value) in &messages {
        g.bench_function(*name, |b| b.iter(|| decode::decode(black_box(value)).expect("decodes")));
    }
    g.finish();

    let mut g = c.benchmark_group("decode_bytes");
    quick(&mut g);
    for (name, value) in &messages {
        g.throughput(Throughput::Bytes(value.len() as u64));
        g.bench_function(*name, |b| b.iter(|| decode::decode(black_box(value)).expect("decodes")));
    }
    g.finish();
}

fn record(value: Bytes) -> Record {
    Record {
        topic: TOPIC.into(),
        partition: 3,
        offset: 1_234_567,
        time: RecordTime::Kafka(KAFKA_MS),
        key: None,
        value: Some(value),
        headers: None,
    }
}

fn bench_keys(c: &mut Criterion) {
    let layout = Layout::default();
    let mut g = c.benchmark_group("keys");
    quick(&mut g);
    g.throughput(Throughput::Elements(1));
    // The key building alone: a decoded 1 KB message's payload and timestamp objects.
    let value = Bytes::from(decode::encode(TSTAMP_US, &json_payload(1024), Format::V3));
    let msg = decode::decode(&value).expect("decodes");
    let place = RecordPlace { topic: TOPIC, partition: 3, offset: 1_234_567, path_time_ms: KAFKA_MS };
    g.bench_function("payload+timestamp", |b| {
        b.iter(|| {
            let place = black_box(&place);
            let payload = layout.payload(place, value.slice(msg.msg.clone()));
            let timestamp = layout.timestamp(place, micros_to_millis(black_box(msg.tstamp_us)));
            (payload, timestamp)
        })
    });
    g.finish();

    // Decode and keys together, as an upload task starts.
    let mut g = c.benchmark_group("plan");
    quick(&mut g);
    g.throughput(Throughput::Elements(1));
    for (name, value) in messages() {
        let r = record(value);
        g.bench_function(name, |b| {
            b.iter(|| {
                let plan = archive::plan(black_box(&r), &layout, UndecodablePolicy::DeadLetter);
                assert!(matches!(plan, Plan::Store { undecodable: None, .. }));
                plan
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_decode, bench_keys);
criterion_main!(benches);
