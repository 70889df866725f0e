//! The Parquet format's encoding: what an upload spends turning spooled records into an object,
//! the largest share of the archiver's CPU in that format (`docs/performance.md`).
//!
//! - `parquet_write`: one object of one row group of 16,384 records (about 16 MiB of values, as
//!   a row group holds under load), SINETStream v3 messages of 1 KB whose payloads are sensor
//!   JSON readings like the load benchmark's, at zstd level 1 (the default) and 3 (records/s).
//!
//! Before measuring, it prints the object's size against the values' bytes, to show the data
//! compresses as the load benchmark's does (stored / produced 0.289 there).

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kafka_s3_archiver::archive::parquet::{Row, Writer};
use kafka_s3_archiver::archive::sinetstream::{self, Format};
use kafka_s3_archiver::record::{Record, RecordTime};
use rand::{Rng, SeedableRng};

mod common;
use common::{KAFKA_MS, TOPIC};

/// Records in the benchmarked row group: as many as a Parquet page of the payload column holds
/// several times over, so zstd sees pages as it does in the archive.
const ROWS: usize = 16_384;
/// Size of a record's value, SINETStream envelope included.
const VALUE_BYTES: usize = 1024;

/// A sensor's reading as the load benchmark makes them: a device, a sequence number and readings
/// with two decimals, each drawn on its own around 20 (sd about 3), as many as fit in `size`.
fn sensor_json(rng: &mut impl Rng, i: usize, size: usize) -> Vec<u8> {
    let mut out = format!("{{\"device\": \"sensor-{:03}\", \"seq\": {i}, \"unit\": \"celsius\", \"values\": [", i % 64);
    let mut first = true;
    loop {
        // The sum of 12 uniform draws less 6 is close to a standard normal draw.
        let normal: f64 = (0..12).map(|_| rng.random::<f64>()).sum::<f64>() - 6.0;
        let v = format!("{:.2}", 20.0 + 3.0 * normal);
        if out.len() + v.len() + 2 + 2 > size {
            out.push_str("]}");
            return out.into_bytes();
        }
        if !first {
            out.push_str(", ");
        }
        out.push_str(&v);
        first = false;
    }
}

/// The benchmarked rows and the bytes of the values they came from.
fn rows() -> (Vec<Row>, u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let overhead = sinetstream::encode(KAFKA_MS * 1000, b"", Format::V3).len();
    let mut produced = 0;
    let rows = (0..ROWS)
        .map(|i| {
            let value = Bytes::from(sinetstream::encode(
                KAFKA_MS * 1000 + i as i64,
                &sensor_json(&mut rng, i, VALUE_BYTES - overhead),
                Format::V3,
            ));
            produced += value.len() as u64;
            let record = Record {
                topic: TOPIC.into(),
                partition: 0,
                offset: i as i64,
                time: RecordTime::Kafka(KAFKA_MS + i as i64),
                key: None,
                value: Some(value),
                headers: Some(Vec::new()),
            };
            Row::of(&record, true)
        })
        .collect();
    (rows, produced)
}

/// One object of `rows` as one row group; its size.
fn write(rows: &[Row], level: i32) -> usize {
    let mut writer = Writer::new(level).expect("a writer");
    let body = writer.row_group(rows).expect("a row group");
    body.len() + writer.finish().expect("the footer").len()
}

fn bench_write(c: &mut Criterion) {
    let (rows, produced) = rows();
    let mut g = c.benchmark_group("parquet_write");
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5)).sample_size(20);
    g.throughput(Throughput::Elements(ROWS as u64));
    for level in [1, 3] {
        let stored = write(&rows, level);
        eprintln!("zstd level {level}: the object holds {:.3} of the values' bytes", stored as f64 / produced as f64);
        g.bench_function(format!("zstd{level}"), |b| b.iter(|| black_box(write(black_box(&rows), level))));
    }
    g.finish();
}

criterion_group!(benches, bench_write);
criterion_main!(benches);
