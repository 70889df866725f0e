//! The offline tools, each a subcommand: `check` (a configuration against its broker, topics,
//! spool directory and bucket), `verify` (the archive against Kafka, or against itself),
//! `restore` (the archive replayed into a topic) and `bench-store` (the store's raw PUT rate).
//! Each owns its command-line arguments (`Args`), says which settings it needs, and has a `run`
//! that returns its exit status.
//!
//! They depend on the archive contract, the store, the Kafka client configuration and the
//! configuration, never on the daemon's pipeline stages (`tests/architecture.rs` holds to that):
//! a tool reads what the archiver wrote, not how it got there.

pub mod bench;
pub mod check;
pub mod progress;
pub mod restore;
pub mod selection;
pub mod verify;

use std::sync::Arc;

use object_store::ObjectStore;

use crate::config::Config;
use crate::exit::Exit;

/// The settings that reach Kafka, by variable (or flag id, for the repeatable property).
pub const KAFKA_SETTINGS: &[&str] = &["BROKER_HOSTNAME", "KAFKA_TOPIC", "kafka_property"];
/// The settings that reach the store.
pub const STORE_SETTINGS: &[&str] = &[
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "S3_BUCKET_NAME",
    "S3_REGION",
    "S3_ENDPOINT_URL",
    "S3_CA_FILE",
    "S3_PROXY_URL",
    "ARCHIVE_DIR",
];
/// The settings that shape keys and bodies.
pub const LAYOUT_SETTINGS: &[&str] = &["S3_OBJECT_EXTENSION", "S3_OBJECT_SEPARATOR", "PARTITION_TIMEZONE"];

/// The store named by the configuration and a runtime to reach it, sized as the daemon's uploads
/// (UPLOAD_THREADS) so that a tool measures and reads alike. A store that cannot be set up is a
/// setting: exit status 2.
fn store_and_runtime(config: &Config) -> Result<(Arc<dyn ObjectStore>, tokio::runtime::Runtime), Exit> {
    let store = crate::store::build(&config.store).map_err(|e| {
        eprintln!("error: {e}");
        Exit::Usage
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.upload_threads)
        .enable_all()
        .build()
        .expect("start the tokio runtime");
    Ok((store, runtime))
}

/// Runs a tool's job against the store: a store that cannot be set up exits 2, a job that fails
/// is said on stderr and exits 1.
fn run_on_store<T, E: std::fmt::Display, F: Future<Output = Result<T, E>>>(
    config: &Config,
    job: impl FnOnce(Arc<dyn ObjectStore>) -> F,
) -> Result<T, Exit> {
    let (store, runtime) = store_and_runtime(config)?;
    runtime.block_on(job(store)).map_err(|e| {
        eprintln!("error: {e}");
        Exit::Failed
    })
}
