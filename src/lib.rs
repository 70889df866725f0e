//! kafka-s3-archiver: archives Kafka topics into object storage, one object per offset,
//! byte-for-byte as the Kafka Connect S3 sink deployment wrote them.
//!
//! # Layout
//!
//! The folders are the design: the daemon's stages in [`pipeline`], the archive contract in
//! [`archive`], the offline tools in [`tools`], and the wiring and what they share at the top.
//!
//! ```text
//! Kafka ──▶ consumer ──▶ spool ──▶ upload ──▶ store (S3 or a directory)
//!              │                      │
//!              └──── commit ◀─────────┘  offsets committed once stored
//! ```
//!
//! - [`pipeline`]: the consumer thread, the upload tasks, the commit ledger, the status they
//!   report, the topic-id check at start-up, and when a repeating trouble is logged.
//! - [`spool`]: the write-ahead queue on local disk between the consumer and the uploaders.
//! - [`archive`]: the archive contract, written and read: SINETStream decoding, keys and bodies,
//!   the objects of a record, parsing keys back, listing a topic.
//! - [`tools`]: `check`, `verify`, `restore`, `bench-store`, each with its arguments and `run`;
//!   they use [`archive`], [`store`], [`kafka`], [`config`] and [`record`], never [`pipeline`]
//!   (`tests/architecture.rs`).
//! - [`cli`], [`exit`]: the command line, and the one exit-status policy of every command.
//! - [`config`]: environment and flags, validated once into [`config::Config`].
//! - [`record`]: the record every stage passes.
//! - [`kafka`]: the librdkafka configuration the consumer and the tools share.
//! - [`store`]: the object_store backend (S3 or local directory), its error reasons and fixes.
//! - [`http`], [`connect`], [`metrics`]: what an operator and the Kafka Connect tools see.
//! - [`malloc`]: glibc malloc tuning for a long-running process.
//!
//! `docs/design.md` states the invariants the comments cite and where each is tested.
//!
//! [`run`] wires the stages together and owns the shutdown: one cancellation token stops
//! fetching; uploads in flight get SHUTDOWN_TIMEOUT; what is stored is committed; the spool is
//! flushed. When archiving stops by itself (UNDECODABLE=stop, a fatal error) the process stays
//! up, reporting FAILED over HTTP as a Kafka Connect worker does, until it is signalled.

pub mod archive;
pub mod cli;
pub mod config;
pub mod connect;
pub mod exit;
pub mod http;
pub mod kafka;
pub mod malloc;
pub mod metrics;
pub mod pipeline;
pub mod record;
pub mod spool;
pub mod store;
pub mod tools;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::commit::Ledger;
use crate::pipeline::status::Status;
use crate::pipeline::{consumer, topic_id, upload};
use crate::spool::Spool;

/// sled's page cache, for the spool's index (keys and where the values are, 21 bytes each); a
/// larger cache bought no throughput in the load benchmark, only memory. The benchmarks use it too.
pub const SPOOL_CACHE_BYTES: u64 = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("cannot open the spool in SPOOL_DIR: {0}")]
    Spool(#[from] spool::SpoolError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Upload(#[from] upload::UploadError),
    #[error(transparent)]
    Consumer(#[from] consumer::ConsumerError),
    #[error("the consumer thread panicked")]
    ConsumerPanicked,
}

/// Runs the archiver until `shutdown` completes (or archiving must stop), then drains, commits
/// and flushes. `metrics` is the installed Prometheus recorder's handle, served on `/metrics`.
pub async fn run(
    config: Config,
    metrics: PrometheusHandle,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let client = kafka::client_config(&config)?;
    let spool = Arc::new(Spool::open(&config.spool_dir, SPOOL_CACHE_BYTES)?);
    let store = store::build(&config.store)?;
    if let config::StoreConfig::Local { dir, bucket } = &config.store {
        let (root, started) = (dir.join(bucket), std::time::SystemTime::now());
        tokio::task::spawn_blocking(move || match store::remove_stale_staging_files(&root, started) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(files = n, "removed staging files an interrupted run left in the archive directory")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot clean staging files in the archive directory")
            }
        });
    }
    let ledger = Arc::new(Mutex::new(Ledger::new()));
    let recovered = recover(&spool, &ledger)?;
    if recovered > 0 {
        tracing::info!(records = recovered, "uploading what the spool held from the last run first");
    }

    let status = Arc::new(Status::new());
    let stop = CancellationToken::new();
    // The HTTP server outlives the pipeline's stop: a FAILED state stays visible until the signal.
    let http_stop = CancellationToken::new();
    tokio::spawn(metrics::upkeep(metrics.clone(), http_stop.clone()));
    let view = http::View {
        metrics,
        status: status.clone(),
        ledger: ledger.clone(),
        spool: spool.clone(),
        connectors: Arc::new(connect::Configs::new(&config)),
    };
    let http = http::serve(config.http_addr, view, http_stop.clone()).await?;
    let http = tokio::spawn(http);
    tokio::spawn(upload::watch_store(store.clone(), status.clone(), stop.clone()));

    let drained = CancellationToken::new();
    let uploader = upload::Uploader {
        store: store.clone(),
        spool: spool.clone(),
        ledger: ledger.clone(),
        status: status.clone(),
        layout: config.layout.clone(),
        policy: config.undecodable,
        workers: config.upload_workers,
        shutdown_timeout: config.shutdown_timeout,
        conditional_put: config.conditional_put,
        metadata: config.store.keeps_metadata(),
    };
    let mut uploads = tokio::spawn(uploader.run(stop.clone()));

    // Before consuming (and while the spool's records upload): a topic deleted and created again
    // since the archiver last ran. It takes seconds at most; a signal meanwhile is taken, and then
    // the consumer does not start. The ids are kept in SPOOL_DIR: the bucket holds the archive only.
    let topic_ids = object_store::local::LocalFileSystem::new_with_prefix(&config.spool_dir)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot keep the topics' ids in SPOOL_DIR; the check that no topic was deleted and created again is skipped"))
        .ok();
    tokio::pin!(shutdown);
    let (recreated, mut signalled) = match topic_ids {
        Some(ids) => tokio::select! {
            r = topic_id::check(&client, &config.topics, Arc::new(ids), &status) => (r, false),
            _ = &mut shutdown => (Vec::new(), true),
        },
        None => (Vec::new(), false),
    };
    // Their records left in the spool are of the old topic: the new records at those offsets are
    // other records, not these.
    for topic in &recreated {
        ledger.lock().expect("ledger lock").topic_recreated(topic);
    }

    let kafka = consumer::KafkaConsumer {
        client,
        topics: config.topics.clone(),
        spool: spool.clone(),
        ledger: ledger.clone(),
        status: status.clone(),
        commit_interval: config.commit_interval,
        limits: config.spool_limits,
    };
    let (consumer_stop, consumer_drained) = (stop.clone(), drained.clone());
    let drain_wait = config.shutdown_timeout + Duration::from_secs(5);
    let (consumer_done_tx, consumer_done_rx) = tokio::sync::oneshot::channel();
    let consumer_thread = (!signalled).then(|| {
        std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || {
                let result = kafka.run(consumer_stop.clone(), consumer_drained, drain_wait);
                consumer_stop.cancel();
                let _ = consumer_done_tx.send(());
                result
            })
            .expect("spawn the consumer thread")
    });

    // Wait for the signal, or for a stage that stops by itself (UNDECODABLE=stop, a fatal error).
    let mut upload_result = None;
    if !signalled {
        tokio::select! {
            _ = &mut shutdown => signalled = true,
            r = &mut uploads => upload_result = Some(r),
            _ = consumer_done_rx => {}
        }
    }
    if signalled {
        tracing::info!("shutting down: fetching stops, uploads in flight finish");
    }
    stop.cancel();
    let upload_result = match upload_result {
        Some(r) => r,
        None => uploads.await,
    };
    drained.cancel();
    let consumer_result = match consumer_thread {
        Some(thread) => tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join the consumer thread")
            .map_err(|_| RunError::ConsumerPanicked)?,
        None => Ok(()),
    };
    spool.flush()?;
    let result = match upload_result {
        Ok(r) => r.map_err(RunError::from).and(consumer_result.map_err(RunError::from)),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    if let Err(e) = &result
        && !signalled
    {
        status.fail(format!("{e}"));
        tracing::error!(error = %e,
            "archiving stopped; the process stays up to report FAILED on /status and /connectors until it is stopped (exit code 1)");
        shutdown.await;
    }
    http_stop.cancel();
    let _ = http.await;
    tracing::info!(spool_records = spool.record_count(), "stopped");
    result
}

/// Registers every record left in the spool, so the consumer does not spool it twice.
fn recover(spool: &Spool, ledger: &Mutex<Ledger>) -> Result<u64, spool::SpoolError> {
    let mut ledger = ledger.lock().expect("ledger lock");
    let mut n = 0;
    for key in spool.keys()? {
        if let Some((topic, partition, offset)) = key.parts() {
            ledger.recover(&(topic.to_string(), partition), offset);
            n += 1;
        }
    }
    Ok(n)
}
