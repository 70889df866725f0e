//! The upload stage and the whole pipeline minus Kafka.
//!
//! - `upload/in_memory`: [`Uploader::run`] with UPLOAD_WORKERS 32 draining 10,000 spooled 1 KB
//!   records into object_store's in-memory store: the uploader's own overhead (dispatch, decode,
//!   keys, spool reads and removals, ledger), timed from its start until the spool is empty.
//! - `pipeline/local_fsync`: 1 KB records inserted into the spool in batches of 1000 (as the
//!   consumer does, each registered in the ledger first) while the uploader stores them in the
//!   local-directory store with fsync on, as in production; timed until every record is stored.
//!
//! Both report records/s; each iteration has a fresh store and ledger.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use kafka_s3_archiver::archive::Layout;
use kafka_s3_archiver::archive::UndecodablePolicy;
use kafka_s3_archiver::config::StoreConfig;
use kafka_s3_archiver::pipeline::commit::{Ledger, Tp};
use kafka_s3_archiver::pipeline::spool::Spool;
use kafka_s3_archiver::pipeline::status::Status;
use kafka_s3_archiver::pipeline::upload::Uploader;
use kafka_s3_archiver::record::Record;
use kafka_s3_archiver::store;
use object_store::ObjectStore;
use tokio::runtime::Runtime;
use tokio_util::sync::CancellationToken;

mod common;
use common::{TOPIC, json_value, records};
use kafka_s3_archiver::SPOOL_CACHE_BYTES;

/// UPLOAD_WORKERS' default.
const WORKERS: usize = 32;
/// Records spooled at a time. The consumer spools at most MAX_BATCH (100, src/pipeline/consumer.rs);
/// this benchmark keeps the 1,000 it started with, so that its figures compare with earlier runs.
const CONSUMER_BATCH: usize = 1000;

/// What the consumer does with a polled batch: register it in the ledger, then spool it.
fn consume(spool: &Spool, ledger: &Mutex<Ledger>, tp: &Tp, batch: &[Record]) {
    {
        let mut ledger = ledger.lock().expect("ledger lock");
        for r in batch {
            ledger.deliver(tp, r.offset, false, r.time.kafka());
        }
    }
    spool.insert_batch(batch).expect("insert");
}

fn uploader(store: Arc<dyn ObjectStore>, spool: &Arc<Spool>, ledger: &Arc<Mutex<Ledger>>) -> Uploader {
    Uploader {
        store,
        spool: spool.clone(),
        ledger: ledger.clone(),
        status: Arc::new(Status::new()),
        layout: Layout::default(),
        policy: UndecodablePolicy::DeadLetter,
        workers: WORKERS,
        rate_limit: None,
        shutdown_timeout: Duration::from_secs(30),
        conditional_put: false,
        metadata: false,
        batches: None,
    }
}

fn new_ledger(tp: &Tp) -> Arc<Mutex<Ledger>> {
    let mut ledger = Ledger::new();
    ledger.assign(tp);
    Arc::new(Mutex::new(ledger))
}

/// Runs `up` until `done` says all is stored; returns the time that took.
async fn run_until(up: Uploader, done: impl Fn() -> bool, started: Instant) -> Duration {
    let stop = CancellationToken::new();
    let run = tokio::spawn(up.run(stop.clone()));
    while !done() {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    stop.cancel();
    run.await.expect("uploader task").expect("uploader");
    elapsed
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime")
}

fn bench_upload(c: &mut Criterion) {
    const N: usize = 10_000;
    let rt = runtime();
    let value = json_value(1024);
    let tp: Tp = (TOPIC.into(), 0);
    let dir = tempfile::tempdir().expect("temporary directory");
    let spool = Arc::new(Spool::open(dir.path(), SPOOL_CACHE_BYTES).expect("open the spool"));
    let mut next = 0;
    let mut g = c.benchmark_group("upload");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function(BenchmarkId::new("in_memory", "1KB"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let ledger = new_ledger(&tp);
                for batch in records(&value, &mut next, N).chunks(CONSUMER_BATCH) {
                    consume(&spool, &ledger, &tp, batch);
                }
                let store = Arc::new(object_store::memory::InMemory::new());
                let up = uploader(store, &spool, &ledger);
                total += rt.block_on(run_until(up, || spool.record_count() == 0, Instant::now()));
            }
            total
        })
    });
    g.finish();
}

fn bench_pipeline(c: &mut Criterion) {
    const N: usize = 5_000;
    let rt = runtime();
    let value = json_value(1024);
    let tp: Tp = (TOPIC.into(), 0);
    let dir = tempfile::tempdir().expect("temporary directory");
    let spool = Arc::new(Spool::open(dir.path(), SPOOL_CACHE_BYTES).expect("open the spool"));
    let mut next = 0;
    let mut g = c.benchmark_group("pipeline");
    g.sample_size(10).sampling_mode(SamplingMode::Flat);
    g.warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(20));
    g.throughput(Throughput::Elements(N as u64));
    g.bench_function(BenchmarkId::new("local_fsync", "1KB"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let archive = tempfile::tempdir().expect("temporary directory");
                let config = StoreConfig::Local { dir: archive.path().to_path_buf(), bucket: "archive".into() };
                let store = store::build(&config).expect("local store");
                let ledger = new_ledger(&tp);
                let up = uploader(store, &spool, &ledger);
                let batches = records(&value, &mut next, N);
                let started = Instant::now();
                let (spool2, tp2) = (spool.clone(), tp.clone());
                let consumer = std::thread::spawn(move || {
                    for batch in batches.chunks(CONSUMER_BATCH) {
                        consume(&spool2, &ledger, &tp2, batch);
                    }
                });
                let done = || consumer.is_finished() && spool.record_count() == 0;
                total += rt.block_on(run_until(up, done, started));
                consumer.join().expect("consumer thread");
                drop(archive);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench_upload, bench_pipeline);
criterion_main!(benches);
