//! Metrics: every metric name the archiver exports, in one place, and the Prometheus recorder.
//!
//! Prometheus style: the `kafka_s3_archiver_` prefix, `_total` for counters, base units in the
//! name (`_seconds`, `_bytes`), and bounded labels only: object kind, a fixed set of reasons, and
//! topic and partition on the per-partition gauges. Durations are histograms with fixed buckets,
//! so they can be summed across instances.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;

pub const BUILD_INFO: &str = "kafka_s3_archiver_build_info";
pub const RECORDS_CONSUMED: &str = "kafka_s3_archiver_records_consumed_total";
pub const RECORDS_ARCHIVED: &str = "kafka_s3_archiver_records_archived_total";
pub const OBJECTS_UPLOADED: &str = "kafka_s3_archiver_objects_uploaded_total";
pub const UPLOADED_BYTES: &str = "kafka_s3_archiver_uploaded_bytes_total";
pub const UPLOAD_DURATION: &str = "kafka_s3_archiver_upload_duration_seconds";
pub const UPLOAD_ERRORS: &str = "kafka_s3_archiver_upload_errors_total";
pub const UPLOAD_RETRIES: &str = "kafka_s3_archiver_upload_retries_total";
pub const UPLOAD_CONFLICTS: &str = "kafka_s3_archiver_upload_conflicts_total";
pub const ALREADY_STORED: &str = "kafka_s3_archiver_objects_already_stored_total";
pub const UNDECODABLE_RECORDS: &str = "kafka_s3_archiver_undecodable_records_total";
pub const TOMBSTONES: &str = "kafka_s3_archiver_tombstones_total";
pub const RECORDS_WITHOUT_TIMESTAMP: &str = "kafka_s3_archiver_records_without_timestamp_total";
pub const HEADERS_OMITTED: &str = "kafka_s3_archiver_headers_omitted_total";
pub const UPLOAD_CONCURRENCY_LIMIT: &str = "kafka_s3_archiver_upload_concurrency_limit";
pub const SPOOL_RECORDS: &str = "kafka_s3_archiver_spool_records";
pub const SPOOL_BYTES: &str = "kafka_s3_archiver_spool_bytes";
pub const CONSUMER_PAUSED: &str = "kafka_s3_archiver_consumer_paused";
pub const ASSIGNED_PARTITIONS: &str = "kafka_s3_archiver_assigned_partitions";
pub const COMMITTED_OFFSET: &str = "kafka_s3_archiver_committed_offset";
pub const CONSUMER_LAG: &str = "kafka_s3_archiver_consumer_lag";
pub const END_TO_END_LATENCY: &str = "kafka_s3_archiver_end_to_end_latency_seconds";
pub const COMMITS: &str = "kafka_s3_archiver_commits_total";
pub const COMMIT_ERRORS: &str = "kafka_s3_archiver_commit_errors_total";
pub const STORE_REACHABLE: &str = "kafka_s3_archiver_store_reachable";
pub const FAILED: &str = "kafka_s3_archiver_failed";
pub const BATCHES_SEALED: &str = "kafka_s3_archiver_batches_sealed_total";
pub const BATCH_AGE: &str = "kafka_s3_archiver_batch_age_seconds";
pub const OBJECT_RECORDS: &str = "kafka_s3_archiver_object_records";
pub const OBJECT_SIZE: &str = "kafka_s3_archiver_object_size_bytes";

/// The values of the bounded labels, so every series exists (at 0) from the start: `rate()` and
/// `increase()` then see the first event, and a dashboard shows 0 rather than "no data".
pub const OBJECT_KINDS: [&str; 5] = ["payload", "timestamp", "dead_letter", "dead_letter_reason", "parquet"];
pub const SEAL_REASONS: [&str; 6] = ["hour", "records", "bytes", "age", "spool", "boundary"];
pub const UPLOAD_ERROR_REASONS: [&str; 6] =
    ["permission_denied", "unauthenticated", "not_found", "conflict", "slow_down", "other"];
pub const UNDECODABLE_REASONS: [&str; 6] =
    ["encrypted", "no_envelope", "wrong_marker", "wrong_fingerprint", "truncated", "malformed"];

/// Upload durations: a loopback PUT takes about a millisecond, a distant region tens to hundreds.
const UPLOAD_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Record timestamp to commit: sub-second when keeping up, hours when catching up a backlog.
const LATENCY_BUCKETS: &[f64] =
    &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 21600.0, 86400.0];

/// Records per Parquet object: from a quiet partition's few to BATCH_MAX_RECORDS.
const OBJECT_RECORDS_BUCKETS: &[f64] = &[1.0, 10.0, 100.0, 1e3, 1e4, 3e4, 1e5, 3e5, 1e6];
/// Bytes per Parquet object: 1 KiB to 1 GiB, by fours.
const OBJECT_SIZE_BUCKETS: &[f64] = &[
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
];
/// A batch's oldest record at its seal: up to BATCH_MAX_AGE (a minute by default) or longer.
const BATCH_AGE_BUCKETS: &[f64] = &[0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0];

/// Gauges not set for this long disappear from `/metrics`: the per-partition gauges of a
/// partition that was revoked. Every gauge is set again at each scrape, so live ones never expire.
const GAUGE_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How often histogram samples are folded into their buckets when nobody scrapes `/metrics`.
const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds recorded histogram samples into their buckets every few seconds until `stop`. The
/// recorder keeps every sample until then: without this, a process that is never scraped grows by
/// three samples per record archived.
pub async fn upkeep(handle: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    while stop.run_until_cancelled(tick.tick()).await.is_some() {
        handle.run_upkeep();
    }
}

/// Installs the Prometheus recorder for the whole process and describes every metric.
pub fn install() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(UPLOAD_DURATION.into()), UPLOAD_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(END_TO_END_LATENCY.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(OBJECT_RECORDS.into()), OBJECT_RECORDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(OBJECT_SIZE.into()), OBJECT_SIZE_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_AGE.into()), BATCH_AGE_BUCKETS)?
        .idle_timeout(MetricKindMask::GAUGE, Some(GAUGE_IDLE_TIMEOUT))
        .install_recorder()?;
    describe();
    for name in [
        RECORDS_CONSUMED,
        RECORDS_ARCHIVED,
        UPLOADED_BYTES,
        UPLOAD_RETRIES,
        UPLOAD_CONFLICTS,
        ALREADY_STORED,
        TOMBSTONES,
        RECORDS_WITHOUT_TIMESTAMP,
        HEADERS_OMITTED,
        COMMITS,
        COMMIT_ERRORS,
    ] {
        metrics::counter!(name).increment(0);
    }
    for kind in OBJECT_KINDS {
        metrics::counter!(OBJECTS_UPLOADED, "kind" => kind).increment(0);
    }
    // Histograms too: the Parquet format's stay at zero with the Connect format.
    for name in [UPLOAD_DURATION, END_TO_END_LATENCY, OBJECT_RECORDS, OBJECT_SIZE, BATCH_AGE] {
        let _ = metrics::histogram!(name);
    }
    for reason in SEAL_REASONS {
        metrics::counter!(BATCHES_SEALED, "reason" => reason).increment(0);
    }
    for reason in UPLOAD_ERROR_REASONS {
        metrics::counter!(UPLOAD_ERRORS, "reason" => reason).increment(0);
    }
    for reason in UNDECODABLE_REASONS {
        metrics::counter!(UNDECODABLE_RECORDS, "reason" => reason).increment(0);
    }
    Ok(handle)
}

/// Registers the help text of every metric with the installed recorder.
pub fn describe() {
    describe_gauge!(BUILD_INFO, "Always 1; the version label tells which build runs.");
    describe_counter!(RECORDS_CONSUMED, "Records received from Kafka.");
    describe_counter!(
        RECORDS_ARCHIVED,
        "Records whose objects are all stored (payload and timestamp, or dead letter)."
    );
    describe_counter!(
        OBJECTS_UPLOADED,
        "Objects stored, by kind (payload, timestamp, dead_letter, dead_letter_reason; parquet in the Parquet format)."
    );
    describe_counter!(UPLOADED_BYTES, Unit::Bytes, "Bytes of object bodies stored.");
    describe_histogram!(UPLOAD_DURATION, Unit::Seconds, "Time of one object PUT that succeeded.");
    describe_counter!(
        UPLOAD_ERRORS,
        "Failed object PUTs (each is retried), by reason (permission_denied, unauthenticated, not_found, conflict, other); slow_down counts every 503 SlowDown or 429 answer, those the S3 client retried by itself included."
    );
    describe_counter!(UPLOAD_RETRIES, "Object PUTs sent again after a failure.");
    describe_counter!(
        UPLOAD_CONFLICTS,
        "Write-once conflicts: the key held other bytes; the archiver's went under errors/."
    );
    describe_counter!(ALREADY_STORED, "Write-once PUTs that found the same bytes already stored.");
    describe_counter!(UNDECODABLE_RECORDS, "Records that are not a decodable SINETStream message, by reason.");
    describe_counter!(
        TOMBSTONES,
        "Records with a null value (skipped in the Connect layout; rows with a null payload in the Parquet format)."
    );
    describe_counter!(
        RECORDS_WITHOUT_TIMESTAMP,
        "Records without a Kafka timestamp; their path uses the time they were consumed."
    );
    describe_counter!(
        HEADERS_OMITTED,
        "Records archived in the Connect format whose Kafka headers did not fit in S3's 2 KB of user metadata (kafka-headers-omitted gives their number)."
    );
    describe_gauge!(
        UPLOAD_CONCURRENCY_LIMIT,
        "Uploads allowed in flight: UPLOAD_WORKERS, halved when the store asks to slow down (503, 429), climbing back as it takes uploads."
    );
    describe_gauge!(SPOOL_RECORDS, "Records in the spool waiting for upload.");
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Size of the records in the spool.");
    describe_gauge!(CONSUMER_PAUSED, "1 while consumption is paused (spool full or not writable), else 0.");
    describe_gauge!(ASSIGNED_PARTITIONS, "Partitions assigned to this instance by the consumer group.");
    describe_gauge!(COMMITTED_OFFSET, "Offset committed to Kafka for the group, by topic and partition.");
    describe_gauge!(
        CONSUMER_LAG,
        "Records not yet archived and committed (end offset minus committed offset), by topic and partition."
    );
    describe_histogram!(
        END_TO_END_LATENCY,
        Unit::Seconds,
        "From a record's Kafka timestamp to the commit of its offset (its objects are stored by then)."
    );
    describe_counter!(COMMITS, "Offset commits sent to Kafka.");
    describe_counter!(COMMIT_ERRORS, "Offset commits that failed.");
    describe_gauge!(
        STORE_REACHABLE,
        "1 when the last request to the object store succeeded (or a probe found it reachable), else 0."
    );
    describe_counter!(
        BATCHES_SEALED,
        "Parquet format: batches sealed, by reason (hour, records, bytes, age, spool, boundary)."
    );
    describe_histogram!(
        BATCH_AGE,
        Unit::Seconds,
        "Parquet format: how long a batch's oldest record waited when it was sealed."
    );
    describe_histogram!(OBJECT_RECORDS, "Parquet format: records per object stored.");
    describe_histogram!(OBJECT_SIZE, Unit::Bytes, "Parquet format: size of each object stored.");
    describe_gauge!(FAILED, "1 when archiving stopped with an error (UNDECODABLE=stop or a fatal error); see /status.");
}
