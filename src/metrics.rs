//! Metrics: every metric name the archiver exports, in one place.
//!
//! Prometheus style: the `kafka_s3_archiver_` prefix, `_total` for counters, base units in the
//! name (`_seconds`, `_bytes`), and bounded labels only (object kind, a fixed set of reasons).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const RECORDS_CONSUMED: &str = "kafka_s3_archiver_records_consumed_total";
pub const RECORDS_ARCHIVED: &str = "kafka_s3_archiver_records_archived_total";
pub const OBJECTS_UPLOADED: &str = "kafka_s3_archiver_objects_uploaded_total";
pub const UPLOADED_BYTES: &str = "kafka_s3_archiver_uploaded_bytes_total";
pub const UPLOAD_DURATION: &str = "kafka_s3_archiver_upload_duration_seconds";
pub const UPLOAD_ERRORS: &str = "kafka_s3_archiver_upload_errors_total";
pub const UPLOAD_CONFLICTS: &str = "kafka_s3_archiver_upload_conflicts_total";
pub const ALREADY_STORED: &str = "kafka_s3_archiver_objects_already_stored_total";
pub const UNDECODABLE_RECORDS: &str = "kafka_s3_archiver_undecodable_records_total";
pub const TOMBSTONES: &str = "kafka_s3_archiver_tombstones_total";
pub const RECORDS_WITHOUT_TIMESTAMP: &str = "kafka_s3_archiver_records_without_timestamp_total";
pub const SPOOL_RECORDS: &str = "kafka_s3_archiver_spool_records";
pub const SPOOL_BYTES: &str = "kafka_s3_archiver_spool_bytes";
pub const CONSUMER_PAUSED: &str = "kafka_s3_archiver_consumer_paused";
pub const COMMITS: &str = "kafka_s3_archiver_commits_total";
pub const COMMIT_ERRORS: &str = "kafka_s3_archiver_commit_errors_total";

/// Registers the help text of every metric with the installed recorder.
pub fn describe() {
    describe_counter!(RECORDS_CONSUMED, "Records received from Kafka.");
    describe_counter!(
        RECORDS_ARCHIVED,
        "Records whose objects are all stored (payload and timestamp, or dead letter)."
    );
    describe_counter!(OBJECTS_UPLOADED, "Objects stored, by kind.");
    describe_counter!(UPLOADED_BYTES, Unit::Bytes, "Bytes of object bodies stored.");
    describe_histogram!(UPLOAD_DURATION, Unit::Seconds, "Time of one object PUT that succeeded.");
    describe_counter!(UPLOAD_ERRORS, "Failed object PUTs (each is retried), by reason.");
    describe_counter!(UNDECODABLE_RECORDS, "Records that are not a decodable SINETStream message, by reason.");
    describe_counter!(TOMBSTONES, "Records with a null value, skipped.");
    describe_counter!(
        RECORDS_WITHOUT_TIMESTAMP,
        "Records without a Kafka timestamp; their path uses the time they were consumed."
    );
    describe_gauge!(SPOOL_RECORDS, "Records in the spool waiting for upload.");
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Size of the records in the spool.");
    describe_gauge!(CONSUMER_PAUSED, "1 while consumption is paused (spool full or not writable), else 0.");
    describe_counter!(COMMITS, "Offset commits sent to Kafka.");
    describe_counter!(COMMIT_ERRORS, "Offset commits that failed.");
}
