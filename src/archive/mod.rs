//! The archive contract: every object the archiver writes and every way it is read back, in one
//! place. The daemon's uploaders write through [`plan()`]; `verify` and `restore` read through
//! [`read`]; nothing else knows what a key or a body looks like.
//!
//! - [`sinetstream`]: a Kafka record value → the SINETStream message it carries (and back, for
//!   tests and `restore`).
//! - [`layout`]: the Kafka Connect per-offset layout, byte for byte as the Kafka Connect
//!   deployment wrote it: keys, bodies, the hour path, the timestamp text
//!   (`../shared/docs/compat.md` is the contract).
//! - [`mod@plan`]: a record → its objects and their user metadata (write side).
//! - [`read`]: a key → what it says; listing a topic's objects hour by hour (read side).
//! - [`parquet`]: the batched format (ARCHIVE_FORMAT=parquet): many records of a partition-hour
//!   in one Parquet object, written row group by row group, and read back.
//!
//! The seam for another format: the per-offset layout is one format, a record in, a few objects
//! out. A batched format adds its own write side next to [`plan()`] (many records, one object) and
//! its own key parser next to [`read::parse_key`]; the hour folders, the metadata names and the
//! SINETStream decoding below are shared.

pub mod layout;
pub mod parquet;
pub mod plan;
pub mod read;
pub mod sinetstream;

pub use layout::{Layout, Object, ObjectKind, RecordPlace, micros_to_millis, timestamp_text};
pub use plan::{Plan, UndecodablePolicy, attributes, headers_from_text, metadata, plan};
pub use read::{
    ArchiveError, ArchivedKey, ListProgress, ListState, Listed, OffsetObjects, Selection, TimeRange, TopicIndex,
    hour_start_ms, list_topic, parse_key, topics,
};

/// User metadata on payload objects (S3 `x-amz-meta-…`; the local-directory store keeps none).
/// The Kafka Connect archive had none of these, so readers fall back to the timestamp object.
pub const META_TSTAMP_US: &str = "sinetstream-tstamp-us";
/// The Kafka record timestamp, milliseconds; absent for a record that had none.
pub const META_KAFKA_TIMESTAMP_MS: &str = "kafka-timestamp-ms";
/// The Kafka record key, base64 (standard alphabet, padded); absent for a record without key.
pub const META_KAFKA_KEY: &str = "kafka-key-base64";
/// `raw`: the payload object holds a record value that was not a SINETStream message
/// (UNDECODABLE=raw), not an Avro `msg` field.
pub const META_FORM: &str = "kafka-s3-archiver-form";
/// S3 limits user metadata to 2 KB per object; a longer key is left out (its length is kept).
pub const MAX_KEY_METADATA_BYTES: usize = 1500;
/// Set instead of [`META_KAFKA_KEY`] when the key was too long to keep: its length in bytes.
pub const META_KAFKA_KEY_OMITTED: &str = "kafka-key-omitted-bytes";
/// The Kafka record headers, in order: `name=value&name=value`, each name and value
/// percent-encoded (every byte but `A-Z a-z 0-9 - . _ ~` as `%XX`), a null value as the name
/// alone; absent for a record without headers ([`plan::headers_text`]).
pub const META_KAFKA_HEADERS: &str = "kafka-headers";
/// Set instead of [`META_KAFKA_HEADERS`] when the headers did not fit in what S3's 2 KB of user
/// metadata left: how many headers the record had.
pub const META_KAFKA_HEADERS_OMITTED: &str = "kafka-headers-omitted";
/// S3's limit on an object's user metadata: the bytes of every name and value. Counted here with
/// each name's `x-amz-meta-` prefix, to keep clear of how a store counts.
pub const MAX_USER_METADATA_BYTES: usize = 2048;
