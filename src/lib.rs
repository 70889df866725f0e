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
//! - [`pipeline`]: the consumer thread and its backpressure, the spool (the write-ahead queue on
//!   local disk), the upload tasks, the commit ledger, the status they report, the topic-id check
//!   at start-up, and when a repeating trouble is logged.
//! - [`archive`]: the archive contract, written and read: SINETStream decoding, keys and bodies,
//!   the objects of a record, parsing keys back, listing a topic.
//! - [`tools`]: `check`, `verify`, `restore`, `bench-store`, each with its arguments and `run`;
//!   they use [`archive`], [`store`], [`kafka`], [`config`] and [`record`], never [`pipeline`]
//!   (`tests/architecture.rs`).
//! - [`cli`], [`exit`]: the command line, and the one exit-status policy of every command.
//! - [`config`]: environment and flags, validated once into [`config::Config`].
//! - [`record`]: the record every stage passes.
//! - [`kafka`]: the librdkafka configuration the consumer and the tools share.
//! - [`topics`]: which topics are archived (KAFKA_TOPIC's names and patterns, the exclusions).
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
pub mod store;
pub mod tools;
pub mod topics;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::commit::Ledger;
use crate::pipeline::spool::{Spool, SpoolOptions};
use crate::pipeline::status::{Setup, Status};
use crate::pipeline::{consumer, spool, topic_id, upload};

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
    let opened = open(&config)?;
    let stops = Stops::default();
    let http = serve(&config, &opened, metrics, &stops).await?;
    let uploads = start_uploads(&config, &opened, &stops);
    tokio::pin!(shutdown);
    let signalled = check_topic_ids(&config, &opened, &mut shutdown).await;
    let consumer = (!signalled).then(|| start_consumer(&config, &opened, &stops));
    let result = wait_and_stop(&opened, &stops, uploads, consumer, signalled, &mut shutdown).await;
    stops.http.cancel();
    let _ = http.await;
    tracing::info!(spool_records = opened.spool.record_count(), "stopped");
    result
}

/// What each cancellation token stops.
#[derive(Default)]
struct Stops {
    /// The pipeline: the consumer stops fetching, the uploaders stop taking records and give
    /// those in flight SHUTDOWN_TIMEOUT. Cancelled on the signal or when a stage stops by itself.
    pipeline: CancellationToken,
    /// Cancelled once the uploaders are done: the consumer makes its last commit.
    uploads_drained: CancellationToken,
    /// The HTTP server and the metrics upkeep. They outlive the pipeline's stop, so that a FAILED
    /// state stays visible until the signal.
    http: CancellationToken,
}

/// What the stages share.
struct Opened {
    client: rdkafka::ClientConfig,
    spool: Arc<Spool>,
    store: Arc<dyn object_store::ObjectStore>,
    /// The same store by its multipart upload ids (S3 only).
    multipart: Option<Arc<dyn object_store::multipart::MultipartStore>>,
    ledger: Arc<Mutex<Ledger>>,
    status: Arc<Status>,
}

/// Step 1: the Kafka client configuration, the spool (what it holds from the last run registered
/// in the ledger, to be uploaded first), the store (staging files an interrupted run left in a
/// local archive directory are removed in the background; on S3, multipart uploads are written
/// down in the spool while open, and those a stopped run left are aborted in step 3).
fn open(config: &Config) -> Result<Opened, RunError> {
    let client = kafka::client_config(config)?;
    let limits = &config.spool_limits;
    let options =
        SpoolOptions { max_bytes: limits.max_bytes, min_free_bytes: limits.min_free_bytes, ..SpoolOptions::default() };
    let spool = Arc::new(Spool::open_with(&config.spool_dir, SPOOL_CACHE_BYTES, options)?);
    let store::Built { mut store, multipart } = store::build_with_multipart(&config.store)?;
    if let Some(multipart) = &multipart {
        store = Arc::new(upload::RecordedUploads::new(store, multipart.clone(), spool.clone()));
    }
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
    if matches!(config.format, config::ArchiveFormat::Parquet(_)) {
        // The Parquet format batches a partition's records in offset order from where Kafka
        // delivers them again, so records a stopped run left are fetched again rather than kept:
        // kept, they would count against the spool's bounds before they could leave it (a full
        // spool would pause the consumer for good), and those of partitions now held elsewhere
        // would stay. The sealed batches' boundaries stay (`pipeline::upload::batches`).
        let dropped = spool.remove_all_records()?;
        spool.flush()?;
        if dropped > 0 {
            tracing::info!(
                records = dropped,
                "Parquet format: the records the spool held are fetched again from the committed offsets"
            );
        }
    }
    let ledger = Arc::new(Mutex::new(Ledger::new()));
    let recovered = recover(&spool, &ledger)?;
    if recovered > 0 {
        tracing::info!(records = recovered, "uploading what the spool held from the last run first");
    }
    Ok(Opened { client, spool, store, multipart, ledger, status: Arc::new(Status::with_setup(Setup::of(config))) })
}

/// Step 2: the HTTP server (metrics, health, status, the Kafka Connect API).
async fn serve(
    config: &Config,
    opened: &Opened,
    metrics: PrometheusHandle,
    stops: &Stops,
) -> Result<tokio::task::JoinHandle<()>, RunError> {
    tokio::spawn(metrics::upkeep(metrics.clone(), stops.http.clone()));
    let view = http::View {
        metrics,
        status: opened.status.clone(),
        ledger: opened.ledger.clone(),
        spool: opened.spool.clone(),
        connectors: Arc::new(connect::Configs::new(config)),
    };
    let server = http::serve(config.http_addr, view, stops.http.clone()).await?;
    Ok(tokio::spawn(server))
}

/// Step 3: the uploaders, the store watch that tells readiness whether the store answers, and the
/// abort of multipart uploads a stopped run left open.
fn start_uploads(
    config: &Config,
    opened: &Opened,
    stops: &Stops,
) -> tokio::task::JoinHandle<Result<(), upload::UploadError>> {
    tokio::spawn(upload::watch_store(opened.store.clone(), opened.status.clone(), stops.pipeline.clone()));
    if let Some(multipart) = &opened.multipart {
        // Read now, before this run's uploads start, so that none of theirs is among them.
        match opened.spool.open_uploads() {
            Ok(left) if left.is_empty() => {}
            Ok(left) => {
                tokio::spawn(upload::abort_left(opened.spool.clone(), multipart.clone(), left, stops.pipeline.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the open multipart uploads from the spool; none aborted"),
        }
    }
    let uploader = upload::Uploader {
        store: opened.store.clone(),
        spool: opened.spool.clone(),
        ledger: opened.ledger.clone(),
        status: opened.status.clone(),
        layout: config.layout.clone(),
        policy: config.undecodable,
        workers: config.upload_workers,
        rate_limit: config.upload_rate_limit,
        shutdown_timeout: config.shutdown_timeout,
        conditional_put: config.conditional_put,
        metadata: config.store.keeps_metadata(),
        batches: match config.format {
            config::ArchiveFormat::Connect => None,
            // Half the spool's bounds: the largest open batch is sealed there, so that batches
            // leave the spool before consumption has to pause.
            config::ArchiveFormat::Parquet(parquet) => Some(upload::BatchSettings {
                parquet,
                seal_at_records: config.spool_limits.max_records / 2,
                seal_at_bytes: config.spool_limits.max_bytes / 2,
            }),
        },
    };
    tokio::spawn(uploader.run(stops.pipeline.clone()))
}

/// Step 4, before consuming (while the spool's records upload): a topic deleted and created again
/// since the archiver last ran; its records left in the spool are of the old topic, so the new
/// records at those offsets are other records. It takes seconds at most; a signal meanwhile is
/// taken (returns true), and then the consumer does not start. The ids are kept in SPOOL_DIR: the
/// bucket holds the archive only.
async fn check_topic_ids(
    config: &Config,
    opened: &Opened,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> bool {
    let Some(ids) = object_store::local::LocalFileSystem::new_with_prefix(&config.spool_dir)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot keep the topics' ids in SPOOL_DIR; the check that no topic was deleted and created again is skipped"))
        .ok()
    else {
        return false;
    };
    let recreated = tokio::select! {
        r = topic_id::check(&opened.client, &config.topics, Arc::new(ids), &opened.status) => r,
        _ = shutdown.as_mut() => return true,
    };
    for topic in &recreated {
        opened.ledger.lock().expect("ledger lock").topic_recreated(topic);
    }
    false
}

/// The consumer thread, and a channel that says when it ended.
struct ConsumerThread {
    thread: std::thread::JoinHandle<Result<(), consumer::ConsumerError>>,
    done: tokio::sync::oneshot::Receiver<()>,
}

/// Step 5: the consumer, on its own thread (rdkafka's calls block). When it ends by itself (a
/// fatal error), it stops the pipeline.
fn start_consumer(config: &Config, opened: &Opened, stops: &Stops) -> ConsumerThread {
    let kafka = consumer::KafkaConsumer {
        client: opened.client.clone(),
        topics: config.topics.clone(),
        spool: opened.spool.clone(),
        ledger: opened.ledger.clone(),
        status: opened.status.clone(),
        commit_interval: config.commit_interval,
        limits: config.spool_limits,
        batched: matches!(config.format, config::ArchiveFormat::Parquet(_)).then_some(config.shutdown_timeout),
    };
    let (stop, drained) = (stops.pipeline.clone(), stops.uploads_drained.clone());
    let drain_wait = config.shutdown_timeout + Duration::from_secs(5);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("kafka-consumer".into())
        .spawn(move || {
            let result = kafka.run(stop.clone(), drained, drain_wait);
            stop.cancel();
            let _ = done_tx.send(());
            result
        })
        .expect("spawn the consumer thread");
    ConsumerThread { thread, done }
}

/// Step 6: waits for the signal, or for a stage that stops by itself (UNDECODABLE=stop, a fatal
/// error); then stops in order: the pipeline, the uploads (SHUTDOWN_TIMEOUT), the consumer's last
/// commit, the spool's flush. When archiving stopped by itself, the process reports FAILED until
/// the signal comes.
async fn wait_and_stop(
    opened: &Opened,
    stops: &Stops,
    mut uploads: tokio::task::JoinHandle<Result<(), upload::UploadError>>,
    consumer: Option<ConsumerThread>,
    mut signalled: bool,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<(), RunError> {
    let mut upload_result = None;
    let consumer = match consumer {
        Some(ConsumerThread { thread, done }) if !signalled => {
            tokio::select! {
                _ = shutdown.as_mut() => signalled = true,
                r = &mut uploads => upload_result = Some(r),
                _ = done => {}
            }
            Some(thread)
        }
        other => other.map(|c| c.thread),
    };
    if signalled {
        tracing::info!("shutting down: fetching stops, uploads in flight finish");
    }
    stops.pipeline.cancel();
    let upload_result = match upload_result {
        Some(r) => r,
        None => uploads.await,
    };
    stops.uploads_drained.cancel();
    let consumer_result = match consumer {
        Some(thread) => tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("join the consumer thread")
            .map_err(|_| RunError::ConsumerPanicked)?,
        None => Ok(()),
    };
    opened.spool.flush()?;
    let result = match upload_result {
        Ok(r) => r.map_err(RunError::from).and(consumer_result.map_err(RunError::from)),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    if let Err(e) = &result
        && !signalled
    {
        opened.status.fail(format!("{e}"));
        tracing::error!(error = %e,
            "archiving stopped; the process stays up to report FAILED on /status and /connectors until it is stopped (exit code 1)");
        shutdown.as_mut().await;
    }
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
