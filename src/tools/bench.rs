//! Bench: `kafka-s3-archiver bench-store`, the raw PUT rate of the configured store.
//!
//! It puts objects shaped like an archive's (per record a payload of the given size and a 24-byte
//! timestamp object, under keys as long as the archive's, the payload with the user metadata the
//! archiver gives a SINETStream record on S3) with the archiver's own S3 client and a fixed number
//! in flight, and nothing else: no Kafka, no spool, no decoding. That is the ceiling the
//! archiver's throughput is measured against, and it tells a user what their store can take at a
//! given UPLOAD_WORKERS.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{Attributes, ObjectStore, PutOptions, PutPayload};
use serde::Serialize;

use crate::archive;
use crate::config::{Config, Needs, Settings};
use crate::exit::Exit;
use crate::record::{Record, RecordTime};
use crate::tools::STORE_SETTINGS;

/// Bytes of a timestamp object (`2022-04-18T02:46:40.123\n`).
const TIMESTAMP_BYTES: usize = 24;

/// What one run measured.
#[derive(Debug, Serialize)]
pub struct PutReport {
    pub objects: usize,
    pub concurrency: usize,
    pub payload_bytes: usize,
    pub seconds: f64,
    pub objects_per_second: f64,
    /// Records per second: two objects each.
    pub records_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub errors: usize,
    /// Whether the payload objects carried the archiver's user metadata.
    pub metadata: bool,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub settings: Settings,
    /// Records to put (two objects each).
    #[arg(long, default_value_t = 10_000)]
    pub records: usize,
    /// Payload size in bytes (the separator byte is added).
    #[arg(long, default_value_t = 1024)]
    pub payload_bytes: usize,
    /// Key prefix of the objects.
    #[arg(long, default_value = ".kafka-s3-archiver/bench")]
    pub prefix: String,
    /// Put the payloads without the user metadata the archiver gives them on S3, to see what
    /// the metadata costs the store.
    #[arg(long)]
    pub no_metadata: bool,
}

impl Args {
    pub fn needs(&self) -> Needs {
        Needs { broker: false, topic: false }
    }
}

/// The settings `bench-store` reads (the others are hidden from its help).
pub fn reads() -> Vec<&'static str> {
    [STORE_SETTINGS, &["UPLOAD_WORKERS", "UPLOAD_THREADS", "LOG_FORMAT"]].concat()
}

/// `kafka-s3-archiver bench-store`: the report as JSON on stdout.
pub fn run(args: Args, config: &Config) -> Exit {
    let (store, runtime) = match super::store_and_runtime(config) {
        Ok(x) => x,
        Err(exit) => return exit,
    };
    let report = runtime.block_on(put_ceiling(
        store,
        &args.prefix,
        args.records,
        args.payload_bytes,
        config.upload_workers,
        config.store.keeps_metadata() && !args.no_metadata,
    ));
    println!("{}", serde_json::to_string(&report).expect("serialize the report"));
    Exit::Done
}

/// Puts `records` × 2 objects under `prefix`, `concurrency` at a time; a failed PUT is counted
/// and tried again, as the archiver does. With `metadata`, each payload carries the user metadata
/// the archiver sends with a SINETStream record that has a Kafka timestamp and no key: a store may
/// spend more on such a request (it stores and signs more).
pub async fn put_ceiling(
    store: Arc<dyn ObjectStore>,
    prefix: &str,
    records: usize,
    payload_bytes: usize,
    concurrency: usize,
    metadata: bool,
) -> PutReport {
    let objects = records * 2;
    let next = Arc::new(AtomicUsize::new(0));
    let payload = PutPayload::from(vec![b'x'; payload_bytes + 1]);
    let timestamp = PutPayload::from(vec![b'0'; TIMESTAMP_BYTES]);
    let attributes = if metadata {
        let record = Record {
            topic: "bench".into(),
            partition: 0,
            offset: 0,
            time: RecordTime::Kafka(1_764_201_600_125),
            key: None,
            value: Some(Bytes::new()),
            headers: None,
        };
        archive::attributes(&archive::metadata(&record, Some(1_764_201_600_123_456)))
    } else {
        Attributes::new()
    };
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.max(1) {
        let (store, next, prefix) = (store.clone(), next.clone(), prefix.to_string());
        let (payload, timestamp, attributes) = (payload.clone(), timestamp.clone(), attributes.clone());
        workers.spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0usize);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= objects {
                    return (latencies, errors);
                }
                let (record, is_payload) = (i / 2, i % 2 == 0);
                let key = format!(
                    "{prefix}/topics/bench/year=2026/month=01/day=01/hour=00/bench+{}+{:010}{}",
                    record % 8,
                    record,
                    if is_payload { ".bin" } else { "-timestamp.txt" }
                );
                let (body, attributes) = if is_payload {
                    (payload.clone(), attributes.clone())
                } else {
                    (timestamp.clone(), Attributes::new())
                };
                let path = Path::from(key.as_str());
                loop {
                    let t = Instant::now();
                    let opts = PutOptions { attributes: attributes.clone(), ..PutOptions::default() };
                    match store.put_opts(&path, body.clone(), opts).await {
                        Ok(_) => {
                            latencies.push(t.elapsed());
                            break;
                        }
                        Err(_) => {
                            errors += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
        });
    }
    let (mut latencies, mut errors) = (Vec::with_capacity(objects), 0);
    while let Some(done) = workers.join_next().await {
        let (l, e) = done.expect("bench worker");
        latencies.extend(l);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies.sort();
    let quantile = |q: f64| {
        latencies.get(((latencies.len() as f64 - 1.0) * q).round() as usize).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    PutReport {
        objects,
        concurrency,
        payload_bytes,
        seconds,
        objects_per_second: objects as f64 / seconds,
        records_per_second: records as f64 / seconds,
        p50_ms: quantile(0.5),
        p99_ms: quantile(0.99),
        errors,
        metadata,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::archive;
    use object_store::{Attribute, ObjectStoreExt};

    #[tokio::test]
    async fn puts_two_objects_per_record_of_the_archives_sizes() {
        let store = Arc::new(object_store::memory::InMemory::new());
        let report = put_ceiling(store.clone(), "b", 50, 1000, 8, true).await;
        assert_eq!((report.objects, report.errors), (100, 0));
        let listed: Vec<_> = futures::StreamExt::collect::<Vec<_>>(store.list(Some(&Path::from("b")))).await;
        let sizes: Vec<u64> = listed.into_iter().map(|m| m.unwrap().size).collect();
        assert_eq!(sizes.len(), 100);
        assert_eq!(sizes.iter().filter(|&&s| s == 1001).count(), 50);
        assert_eq!(sizes.iter().filter(|&&s| s == 24).count(), 50);
        assert!(report.p50_ms <= report.p99_ms);
        // The payloads carry the archiver's user metadata; the timestamp objects none.
        let attributes = |key: &str| {
            let path = Path::from(format!("b/topics/bench/year=2026/month=01/day=01/hour=00/bench+3+0000000003{key}"));
            let store = store.clone();
            async move { store.get(&path).await.unwrap().attributes }
        };
        let payload = attributes(".bin").await;
        assert_eq!(payload.get(&Attribute::Metadata(archive::META_TSTAMP_US.into())).map(|v| v.len()), Some(16));
        assert!(payload.get(&Attribute::Metadata(archive::META_KAFKA_TIMESTAMP_MS.into())).is_some());
        assert!(attributes("-timestamp.txt").await.is_empty());
    }
}
