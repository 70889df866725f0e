//! The daemon's stages, in the order a record goes through them:
//!
//! ```text
//! Kafka ──▶ consumer ──▶ spool ──▶ upload ──▶ store
//!              │                      │
//!              └──── commit ◀─────────┘  offsets committed once stored
//! ```
//!
//! - [`consumer`]: the rdkafka consumer thread; batches records into the spool, paces itself on
//!   the spool's fill, commits what the ledger says is stored.
//! - [`batch`]: which records go into one object of the Parquet format, and when it is sealed.
//! - [`backpressure`]: when the consumer waits for room, pauses and resumes, from the spool's fill.
//! - [`spool`]: the write-ahead queue on local disk between the consumer and the uploaders.
//! - [`upload`]: tokio tasks that store each record's objects (or, in the Parquet format, each
//!   sealed batch's object) and retry until they are stored.
//! - [`commit`]: the ledger that turns stored offsets into safe commit positions.
//! - [`status`]: what the stages report for `/status`, readiness and the Kafka Connect API.
//! - [`topic_id`]: at start-up, whether a topic was deleted and created again since the last run.
//! - [`throttle`]: when a trouble that repeats is logged.
//!
//! The offline tools (`crate::tools`) never use anything in here: they read the archive through
//! `crate::archive`.

pub mod backpressure;
pub mod batch;
pub mod commit;
pub mod consumer;
pub mod spool;
pub mod status;
pub mod throttle;
pub mod topic_id;
pub mod upload;
