//! What the benchmarks share: their inputs, shaped like the archive's.
#![allow(dead_code)] // each bench binary uses a part of it

use bytes::Bytes;
use kafka_s3_archiver::archive::sinetstream::{self, Format};
use kafka_s3_archiver::record::{Record, RecordTime};

pub const TOPIC: &str = "sinetstream.sensor";
pub const KAFKA_MS: i64 = 1_650_250_000_200;

/// JSON-like sensor readings, exactly `len` bytes.
pub fn json_payload(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 128);
    let mut i = 0u64;
    while out.len() < len {
        let line = format!(
            "{{\"sensor\":\"s-{:04}\",\"temperature\":{}.{},\"humidity\":{},\"ts\":{}}}\n",
            i % 97,
            20 + i % 13,
            i % 10,
            40 + i % 31,
            KAFKA_MS + i as i64
        );
        out.extend_from_slice(line.as_bytes());
        i += 1;
    }
    out.truncate(len);
    out
}

/// Wraps `payload` in a SINETStream v3 envelope, trimmed so that the whole value is `len` bytes.
pub fn envelope(mut payload: Vec<u8>, len: usize) -> Bytes {
    let overhead = sinetstream::encode(KAFKA_MS * 1000, &payload[..len], Format::V3).len() - len;
    payload.truncate(len - overhead);
    let value = sinetstream::encode(KAFKA_MS * 1000, &payload, Format::V3);
    debug_assert_eq!(value.len(), len);
    Bytes::from(value)
}

/// A SINETStream v3 message of `len` bytes in all, with a JSON-like payload.
pub fn json_value(len: usize) -> Bytes {
    envelope(json_payload(len), len)
}

/// `n` records of one partition from `*next` on, as the consumer hands them to the spool.
pub fn records(value: &Bytes, next: &mut i64, n: usize) -> Vec<Record> {
    let first = *next;
    *next += n as i64;
    (first..*next)
        .map(|offset| Record {
            topic: TOPIC.into(),
            partition: 0,
            offset,
            time: RecordTime::Kafka(KAFKA_MS + offset),
            key: None,
            value: Some(value.clone()),
            headers: None,
        })
        .collect()
}
