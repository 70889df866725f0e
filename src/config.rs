//! Configuration: environment variables (also read from `.env`), or the equivalent flags,
//! parsed and validated once at start-up into one typed [`Config`].
//!
//! Precedence: a command-line flag, then the process environment, then `.env` in the working
//! directory, then the default. Every variable keeps the meaning and default it had in the Kafka
//! Connect deployment's `.env`, so that file works unchanged. A bad value is reported with the
//! variable's name and what is wrong; secrets are kept in [`Secret`], which never prints.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use chrono_tz::Tz;
use clap::Args;

use crate::archive::{Layout, UndecodablePolicy};
use crate::topics::TopicSelection;

/// A configuration value that is wrong, named by its environment variable.
#[derive(Debug, thiserror::Error)]
#[error("{var}: {message}")]
pub struct ConfigError {
    pub var: String,
    pub message: String,
}

fn invalid(var: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { var: var.to_string(), message: message.into() }
}

/// The raw settings as given on the command line or in the environment. Every field is a string
/// so that validation, not the argument parser, reports a bad value with the variable's name.
#[derive(Args, Debug, Clone, Default)]
pub struct Settings {
    /// Kafka broker: host, host:port or a comma-separated list (port 9092 by default).
    #[arg(long = "broker", env = "BROKER_HOSTNAME")]
    pub broker_hostname: Option<String>,
    /// Topic to archive, or a comma-separated list; an entry that begins with ^ is a regular
    /// expression (topics created later that match it are archived too).
    #[arg(long = "topic", env = "KAFKA_TOPIC")]
    pub kafka_topic: Option<String>,
    /// Topics KAFKA_TOPIC's patterns must not take: names, or patterns beginning with ^.
    #[arg(long = "topic-exclude", env = "KAFKA_TOPIC_EXCLUDE")]
    pub kafka_topic_exclude: Option<String>,
    /// Consumer group that holds the archiver's committed offsets.
    #[arg(long, env = "GROUP_ID")]
    pub group_id: Option<String>,
    /// Object storage access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub aws_access_key_id: Option<String>,
    /// Object storage secret key (AWS_SECRET_ACCESS_KEY is accepted too).
    #[arg(long, env = "AWS_SECRET_KEY", hide_env_values = true)]
    pub aws_secret_key: Option<String>,
    /// Session token of temporary credentials (STS), with AWS_ACCESS_KEY_ID and AWS_SECRET_KEY.
    #[arg(long, env = "AWS_SESSION_TOKEN", hide_env_values = true)]
    pub aws_session_token: Option<String>,
    /// Web identity token file (EKS IRSA), exchanged with STS for AWS_ROLE_ARN's credentials.
    #[arg(long, env = "AWS_WEB_IDENTITY_TOKEN_FILE")]
    pub aws_web_identity_token_file: Option<String>,
    /// Role the web identity token is exchanged for.
    #[arg(long, env = "AWS_ROLE_ARN")]
    pub aws_role_arn: Option<String>,
    /// Session name of the web identity role.
    #[arg(long, env = "AWS_ROLE_SESSION_NAME")]
    pub aws_role_session_name: Option<String>,
    /// STS endpoint of the web identity exchange (https).
    #[arg(long, env = "AWS_ENDPOINT_URL_STS")]
    pub aws_endpoint_url_sts: Option<String>,
    /// ECS task role credentials: the path ECS sets.
    #[arg(long, env = "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")]
    pub aws_container_credentials_relative_uri: Option<String>,
    /// Container credentials URL (EKS Pod Identity), with AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE.
    #[arg(long, env = "AWS_CONTAINER_CREDENTIALS_FULL_URI")]
    pub aws_container_credentials_full_uri: Option<String>,
    /// File holding the token AWS_CONTAINER_CREDENTIALS_FULL_URI wants.
    #[arg(long, env = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")]
    pub aws_container_authorization_token_file: Option<String>,
    /// Bucket name.
    #[arg(long, env = "S3_BUCKET_NAME")]
    pub s3_bucket_name: Option<String>,
    /// Bucket region.
    #[arg(long, env = "S3_REGION")]
    pub s3_region: Option<String>,
    /// Endpoint of an S3-compatible store, e.g. http://minio:9000 (path-style requests).
    #[arg(long, env = "S3_ENDPOINT_URL")]
    pub s3_endpoint_url: Option<String>,
    /// Write-once uploads (If-None-Match): true or false.
    #[arg(long, env = "S3_CONDITIONAL_PUT")]
    pub s3_conditional_put: Option<String>,
    /// PEM file of the certificate authority (or bundle) that signs an HTTPS endpoint's certificate.
    #[arg(long, env = "S3_CA_FILE")]
    pub s3_ca_file: Option<String>,
    /// Storage class every object is written with (STANDARD_IA, GLACIER_IR, ...).
    #[arg(long, env = "S3_STORAGE_CLASS")]
    pub s3_storage_class: Option<String>,
    /// Tags every object is written with, `key=value&key2=value2`.
    #[arg(long, env = "S3_OBJECT_TAGS")]
    pub s3_object_tags: Option<String>,
    /// Server-side encryption: AES256, aws:kms or aws:kms:dsse.
    #[arg(long, env = "S3_SSE")]
    pub s3_sse: Option<String>,
    /// The KMS key of S3_SSE=aws:kms or aws:kms:dsse (the account's AWS managed key when unset).
    #[arg(long, env = "S3_SSE_KMS_KEY_ID")]
    pub s3_sse_kms_key_id: Option<String>,
    /// File holding a customer key for SSE-C (32 bytes, raw or base64).
    #[arg(long, env = "S3_SSE_C_KEY_FILE")]
    pub s3_sse_c_key_file: Option<String>,
    /// HTTP(S) proxy every S3 request goes through (http://[user:password@]host:port).
    #[arg(long, env = "S3_PROXY_URL", hide_env_values = true)]
    pub s3_proxy_url: Option<String>,
    /// Checksum sent with every upload for the store to check the body against: sha256 or crc64nvme.
    #[arg(long, env = "S3_CHECKSUM")]
    pub s3_checksum: Option<String>,
    /// Payload object extension.
    #[arg(long, env = "S3_OBJECT_EXTENSION")]
    pub s3_object_extension: Option<String>,
    /// Appended to every object body; escapes \n \r \t \\ are understood; empty for none.
    #[arg(long, env = "S3_OBJECT_SEPARATOR")]
    pub s3_object_separator: Option<String>,
    /// Local archive directory, used when no S3 bucket or endpoint is configured.
    #[arg(long, env = "ARCHIVE_DIR")]
    pub archive_dir: Option<String>,
    /// Port of the HTTP endpoint: metrics, health, status, the Kafka Connect API.
    #[arg(long, env = "REST_PORT")]
    pub rest_port: Option<String>,
    /// Address the HTTP endpoint binds to.
    #[arg(long, env = "REST_BIND_ADDRESS")]
    pub rest_bind_address: Option<String>,
    /// Directory of the write-ahead spool.
    #[arg(long, env = "SPOOL_DIR")]
    pub spool_dir: Option<String>,
    /// Spool size above which consumption pauses, e.g. 1GiB or 500MB.
    #[arg(long, env = "SPOOL_MAX_BYTES")]
    pub spool_max_bytes: Option<String>,
    /// Free space on SPOOL_DIR's file system below which consumption pauses, e.g. 256MiB.
    #[arg(long, env = "SPOOL_MIN_FREE_BYTES")]
    pub spool_min_free_bytes: Option<String>,
    /// Records in the spool above which consumption pauses.
    #[arg(long, env = "SPOOL_MAX_RECORDS")]
    pub spool_max_records: Option<String>,
    /// Object uploads in flight at once.
    #[arg(long, env = "UPLOAD_WORKERS")]
    pub upload_workers: Option<String>,
    /// Object uploads started per second at most (a token bucket; off when unset).
    #[arg(long, env = "UPLOAD_RATE_LIMIT")]
    pub upload_rate_limit: Option<String>,
    /// Threads running the uploads and the HTTP endpoint.
    #[arg(long, env = "UPLOAD_THREADS")]
    pub upload_threads: Option<String>,
    /// Time zone of the year=/month=/day=/hour= path.
    #[arg(long, env = "PARTITION_TIMEZONE")]
    pub partition_timezone: Option<String>,
    /// What to do with a record that is not a SINETStream message: dead-letter, raw or stop.
    #[arg(long, env = "UNDECODABLE")]
    pub undecodable: Option<String>,
    /// How often done offsets are committed to Kafka, in milliseconds.
    #[arg(long, env = "COMMIT_INTERVAL_MS")]
    pub commit_interval_ms: Option<String>,
    /// Seconds in-flight uploads get to finish on shutdown.
    #[arg(long, env = "SHUTDOWN_TIMEOUT")]
    pub shutdown_timeout: Option<String>,
    /// Archive format: connect (one object per record, the Kafka Connect layout) or parquet.
    #[arg(long, env = "ARCHIVE_FORMAT")]
    pub archive_format: Option<String>,
    /// What the values are (parquet): sinetstream (decoded) or plain (kept as they are).
    #[arg(long, env = "VALUE_FORMAT")]
    pub value_format: Option<String>,
    /// Records in one Parquet object at most.
    #[arg(long, env = "BATCH_MAX_RECORDS")]
    pub batch_max_records: Option<String>,
    /// Record value bytes in one Parquet object at most, e.g. 64MiB.
    #[arg(long, env = "BATCH_MAX_BYTES")]
    pub batch_max_bytes: Option<String>,
    /// How long a record waits for its Parquet object to be sealed at most, e.g. 60s or 500ms.
    #[arg(long, env = "BATCH_MAX_AGE")]
    pub batch_max_age: Option<String>,
    /// zstd level of the Parquet objects (1 to 22).
    #[arg(long, env = "PARQUET_ZSTD_LEVEL")]
    pub parquet_zstd_level: Option<String>,
    /// Log format: text or json.
    #[arg(long, env = "LOG_FORMAT")]
    pub log_format: Option<String>,
    /// A librdkafka property, name=value (repeatable); also KAFKA_PROPERTY_<NAME> variables.
    #[arg(long = "kafka-property", value_name = "NAME=VALUE")]
    pub kafka_property: Vec<String>,
}

/// Each setting's default as `--help` and the README's configuration table show it; a unit test
/// checks them against what the parser gives when the variable is not set.
pub const DEFAULTS: &[(&str, &str)] = &[
    ("S3_REGION", "us-east-1"),
    ("AWS_ROLE_SESSION_NAME", DEFAULT_ROLE_SESSION_NAME),
    ("S3_CONDITIONAL_PUT", "false"),
    ("S3_OBJECT_EXTENSION", ".bin"),
    ("S3_OBJECT_SEPARATOR", "\\n"),
    ("ARCHIVE_DIR", "./data"),
    ("REST_PORT", "8083"),
    ("REST_BIND_ADDRESS", "0.0.0.0"),
    ("GROUP_ID", "kafka-s3-archiver"),
    ("SPOOL_DIR", "./spool"),
    ("SPOOL_MAX_BYTES", "1GiB"),
    ("SPOOL_MAX_RECORDS", "10000 (parquet: 100000)"),
    ("SPOOL_MIN_FREE_BYTES", "256MiB"),
    ("UPLOAD_WORKERS", "32"),
    ("UPLOAD_THREADS", "half the CPUs, at least 1"),
    ("PARTITION_TIMEZONE", "Asia/Tokyo"),
    ("UNDECODABLE", "dead-letter"),
    ("COMMIT_INTERVAL_MS", "1000"),
    ("SHUTDOWN_TIMEOUT", "30"),
    ("ARCHIVE_FORMAT", "connect"),
    ("VALUE_FORMAT", "sinetstream"),
    ("BATCH_MAX_RECORDS", "100000"),
    ("BATCH_MAX_BYTES", "64MiB"),
    ("BATCH_MAX_AGE", "60s"),
    ("PARQUET_ZSTD_LEVEL", "1"),
    ("LOG_FORMAT", "text"),
];

/// A secret value: usable, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// Where the archive goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// Amazon S3 or an S3-compatible store.
    S3 {
        bucket: String,
        region: String,
        /// None: Amazon S3 (virtual-hosted style). Some: that endpoint, path-style.
        endpoint: Option<String>,
        /// Where the requests' signing credentials come from (boxed: the variant stays small).
        credentials: Box<Credentials>,
        /// Extra trusted certificate authorities (PEM), for an HTTPS endpoint with a private CA.
        ca_pem: Option<Vec<u8>>,
        /// What every object is written with besides its body.
        put: PutSettings,
        /// Server-side encryption; None: the bucket's default.
        sse: Option<Sse>,
        /// HTTP(S) proxy of every request (boxed: rarely set, and the variant stays small).
        proxy: Option<Box<Proxy>>,
        /// Checksum sent with every upload; None: only the signature's payload hash.
        checksum: Option<Checksum>,
    },
    /// A local directory laid out as MinIO lays out a bucket: `<dir>/<bucket>/topics/...`.
    Local { dir: PathBuf, bucket: String },
}

/// The AWS credential chain, in the order the AWS SDKs take it: the first source that is
/// configured is used. object_store fetches and refreshes temporary credentials before they expire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_KEY, with AWS_SESSION_TOKEN for temporary ones.
    Keys { access_key_id: Secret, secret_key: Secret, session_token: Option<Secret> },
    /// AWS_WEB_IDENTITY_TOKEN_FILE exchanged for AWS_ROLE_ARN's credentials (EKS IRSA); the file is
    /// read again at each refresh, as the platform rotates it.
    WebIdentity { token_file: String, role_arn: String, session_name: String, sts_endpoint: Option<String> },
    /// ECS task role: AWS_CONTAINER_CREDENTIALS_RELATIVE_URI on 169.254.170.2.
    EcsTask { relative_uri: String },
    /// AWS_CONTAINER_CREDENTIALS_FULL_URI with the token of AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE
    /// (EKS Pod Identity).
    Container { full_uri: String, token_file: String },
    /// The instance's role, from the instance metadata service (IMDS).
    Instance,
}

impl Credentials {
    /// For the start-up log and `check`: the source, secrets masked.
    pub fn shown(&self) -> String {
        match self {
            Credentials::Keys { access_key_id, session_token, .. } => format!(
                "credentials=keys access_key_id={} secret_key=***{}",
                mask_key_id(access_key_id.expose()),
                if session_token.is_some() { " session_token=***" } else { "" }
            ),
            Credentials::WebIdentity { token_file, role_arn, sts_endpoint, .. } => format!(
                "credentials=web-identity role={role_arn} token_file={token_file} sts={}",
                sts_endpoint.as_deref().unwrap_or("(AWS)")
            ),
            // The URI names the task to its agent: not shown.
            Credentials::EcsTask { .. } => "credentials=ecs-task".to_string(),
            Credentials::Container { full_uri, token_file } => {
                format!("credentials=container uri={full_uri} token_file={token_file}")
            }
            Credentials::Instance => "credentials=instance (IMDS)".to_string(),
        }
    }
}

/// What every object is written with on S3 (S3_STORAGE_CLASS, S3_OBJECT_TAGS): written directly
/// into its class (no lifecycle transition to pay for) and tagged for lifecycle and retention rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PutSettings {
    pub storage_class: Option<String>,
    /// (key, value) in the order given.
    pub tags: Vec<(String, String)>,
}

/// S3_PROXY_URL, and the hosts it does not take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proxy {
    /// It may carry a password.
    pub url: Secret,
    /// The instance and container credential endpoints (a proxy cannot reach them, and must not
    /// see the credentials), then NO_PROXY's hosts.
    pub excludes: Vec<String>,
}

/// The checksum sent with every upload (S3_CHECKSUM), which the store checks the body against
/// before it stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    Sha256,
    Crc64Nvme,
}

/// Server-side encryption of every object (S3_SSE, S3_SSE_KMS_KEY_ID, S3_SSE_C_KEY_FILE).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sse {
    /// AES256: keys S3 manages.
    S3,
    /// aws:kms, or aws:kms:dsse (two layers); the key's id or ARN, or the AWS managed key.
    Kms { dual: bool, key_id: Option<String> },
    /// SSE-C: the customer's 256-bit key, base64, sent with every request (reads too).
    CustomerKey(Secret),
}

impl Sse {
    /// As the start-up log and `check` show it: never the customer key.
    pub fn describe(&self) -> String {
        match self {
            Sse::S3 => "AES256".to_string(),
            Sse::Kms { dual, key_id } => format!(
                "{} key={}",
                if *dual { "aws:kms:dsse" } else { "aws:kms" },
                key_id.as_deref().unwrap_or("(AWS managed)")
            ),
            Sse::CustomerKey(_) => "SSE-C key=***".to_string(),
        }
    }
}

impl PutSettings {
    /// As the start-up log and `check` show them (tags are no secret).
    pub fn describe(&self) -> String {
        let tags: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "storage_class={} tags={}",
            self.storage_class.as_deref().unwrap_or("(store default)"),
            if tags.is_empty() { "(none)".to_string() } else { tags.join("&") }
        )
    }
}

/// `path` made absolute against the working directory, for what the archiver shows; as it is when
/// that fails.
pub fn absolute(path: &std::path::Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

impl StoreConfig {
    /// Where the archive goes, for the status page: `s3://bucket at endpoint (region)` or the
    /// directory. No credential: an endpoint URL cannot carry one (refused at start-up).
    pub fn location(&self) -> String {
        match self {
            StoreConfig::S3 { bucket, region, endpoint, .. } => {
                format!("s3://{bucket} at {} ({region})", endpoint.as_deref().unwrap_or("AWS"))
            }
            StoreConfig::Local { dir, bucket } => absolute(dir).join(bucket).display().to_string(),
        }
    }

    /// What every object is written with besides its body (class, tags, encryption, checksum), as the
    /// start-up log and `check` show it: never a key. None for the local store.
    pub fn object_settings(&self) -> Option<String> {
        match self {
            StoreConfig::S3 { put, sse, checksum, .. } => Some(format!(
                "{} sse={} checksum={}",
                put.describe(),
                sse.as_ref().map_or("(bucket default)".to_string(), Sse::describe),
                match checksum {
                    None => "(none)",
                    Some(Checksum::Sha256) => "sha256",
                    Some(Checksum::Crc64Nvme) => "crc64nvme",
                }
            )),
            StoreConfig::Local { .. } => None,
        }
    }

    /// Whether any of those is set (else the bucket's defaults apply).
    pub fn sets_object_settings(&self) -> bool {
        matches!(self, StoreConfig::S3 { put, sse, checksum, .. }
            if *put != PutSettings::default() || sse.is_some() || checksum.is_some())
    }

    /// Whether objects keep user metadata (S3 headers); the local-directory store keeps none.
    pub fn keeps_metadata(&self) -> bool {
        matches!(self, StoreConfig::S3 { .. })
    }
}

/// The archive's format (ARCHIVE_FORMAT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveFormat {
    /// One object per record (and one per timestamp), as the Kafka Connect deployment wrote.
    Connect,
    /// Many records of a partition and an hour in one Parquet object (`crate::archive::parquet`).
    Parquet(ParquetSettings),
}

/// The Parquet format's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParquetSettings {
    /// An object is sealed at this many records (BATCH_MAX_RECORDS),
    pub max_records: usize,
    /// or this many bytes of record values (BATCH_MAX_BYTES),
    pub max_bytes: u64,
    /// or when its oldest record waited this long (BATCH_MAX_AGE).
    pub max_age: Duration,
    pub zstd_level: i32,
    /// Values are SINETStream messages, decoded into tstamp and payload (VALUE_FORMAT); else
    /// kept as they are.
    pub sinetstream: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Bounds of the spool (SPOOL_MAX_BYTES, SPOOL_MAX_RECORDS, SPOOL_MIN_FREE_BYTES); the
/// watermarks derived from them and what the consumer does at each are in
/// `pipeline::backpressure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolLimits {
    pub max_bytes: u64,
    pub max_records: u64,
    /// Pause when the spool's file system has less free space than this.
    pub min_free_bytes: u64,
}

/// The validated configuration of one archiver process.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port` of each bootstrap broker.
    pub brokers: Vec<String>,
    pub topics: TopicSelection,
    pub group_id: String,
    /// librdkafka properties passed through as given.
    pub kafka_properties: Vec<(String, String)>,
    pub store: StoreConfig,
    pub layout: Layout,
    pub spool_dir: PathBuf,
    pub spool_limits: SpoolLimits,
    pub upload_workers: usize,
    /// Object uploads a second at most (UPLOAD_RATE_LIMIT); None: no limit.
    pub upload_rate_limit: Option<f64>,
    /// Threads of the async runtime that runs the uploads and the HTTP server.
    pub upload_threads: usize,
    /// Upload with If-None-Match so an existing object is never overwritten (S3_CONDITIONAL_PUT).
    pub conditional_put: bool,
    pub undecodable: UndecodablePolicy,
    pub format: ArchiveFormat,
    /// Settings given that the archive format ignores (said at start-up).
    pub ignored: Vec<&'static str>,
    /// S3 settings given while the archive goes to a local directory (said at start-up).
    pub ignored_by_local: Vec<&'static str>,
    pub http_addr: SocketAddr,
    pub commit_interval: Duration,
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
}

pub const DEFAULT_GROUP_ID: &str = "kafka-s3-archiver";
pub const DEFAULT_REGION: &str = "us-east-1";
pub const DEFAULT_EXTENSION: &str = ".bin";
pub const DEFAULT_SEPARATOR: &str = "\\n";
pub const DEFAULT_ARCHIVE_DIR: &str = "./data";
pub const DEFAULT_LOCAL_BUCKET: &str = "archive";
pub const DEFAULT_REST_PORT: u16 = 8083;
pub const DEFAULT_SPOOL_DIR: &str = "./spool";
pub const DEFAULT_UPLOAD_WORKERS: usize = 32;
/// Half the CPUs, at least one. The uploads are many small requests: more runtime threads wake
/// each other for every request and take CPU from a store on the same host.
pub fn default_upload_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}
pub const DEFAULT_SPOOL_MAX_BYTES: u64 = 1 << 30;
pub const DEFAULT_SPOOL_MAX_RECORDS: u64 = 10_000;
/// The Parquet format's batches wait in the spool until their object is stored, and the largest is
/// sealed when the spool is half full: ten times the room makes objects ten times larger under
/// load (figures in `benches/results/`).
pub const DEFAULT_SPOOL_MAX_RECORDS_PARQUET: u64 = 100_000;
pub const DEFAULT_SPOOL_MIN_FREE_BYTES: u64 = 256 << 20;
pub const DEFAULT_TIMEZONE: &str = "Asia/Tokyo";
pub const DEFAULT_COMMIT_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_SHUTDOWN_TIMEOUT_S: u64 = 30;
pub const DEFAULT_BATCH_MAX_RECORDS: u64 = 100_000;
pub const DEFAULT_BATCH_MAX_BYTES: u64 = 64 << 20;
pub const DEFAULT_BATCH_MAX_AGE: Duration = Duration::from_secs(60);
pub const DEFAULT_PARQUET_ZSTD_LEVEL: u64 = 1;
/// Prefix of the environment variables passed through to librdkafka.
pub const KAFKA_PROPERTY_PREFIX: &str = "KAFKA_PROPERTY_";

/// Properties the archiver sets itself: a pass-through value would break its guarantees.
const MANAGED_PROPERTIES: &[(&str, &str)] = &[
    ("bootstrap.servers", "set BROKER_HOSTNAME"),
    ("group.id", "set GROUP_ID"),
    ("enable.auto.commit", "the archiver commits only what is stored"),
    ("enable.auto.offset.store", "the archiver commits only what is stored"),
];

/// What a command needs of the configuration: the daemon and `check` need brokers and topics;
/// a tool may not (`verify --bucket-only`, `verify --all-topics`, `bench-store`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Needs {
    /// Brokers, and pass-through properties librdkafka accepts.
    pub broker: bool,
    pub topic: bool,
}

impl Needs {
    pub const ALL: Needs = Needs { broker: true, topic: true };
}

impl Config {
    /// Validates the settings. `env` gives the process environment (for the variables that are
    /// not flags: AWS_SECRET_ACCESS_KEY and KAFKA_PROPERTY_*).
    pub fn from_settings(s: &Settings, env: &[(String, String)]) -> Result<Config, ConfigError> {
        let brokers = parse_brokers(required(&s.broker_hostname, "BROKER_HOSTNAME")?)?;
        let topics = TopicSelection::parse(required(&s.kafka_topic, "KAFKA_TOPIC")?, s.kafka_topic_exclude.as_deref())
            .map_err(|(var, message)| invalid(var, message))?;
        let group_id = non_empty(&s.group_id).unwrap_or(DEFAULT_GROUP_ID).to_string();
        let kafka_properties = parse_kafka_properties(&s.kafka_property, env)?;
        let store = parse_store(s, env)?;
        let timezone = parse_timezone(s.partition_timezone.as_deref())?;
        let extension = s.s3_object_extension.clone().unwrap_or_else(|| DEFAULT_EXTENSION.to_string());
        if extension.contains('/') {
            return Err(invalid(
                "S3_OBJECT_EXTENSION",
                format!("{extension:?} contains '/': it must not add a folder"),
            ));
        }
        let separator = unescape(s.s3_object_separator.as_deref().unwrap_or(DEFAULT_SEPARATOR), "S3_OBJECT_SEPARATOR")?;
        let spool_dir = PathBuf::from(non_empty(&s.spool_dir).unwrap_or(DEFAULT_SPOOL_DIR));
        let (format, ignored) = parse_format(s)?;
        let spool_limits = SpoolLimits {
            max_bytes: parse_size(&s.spool_max_bytes, "SPOOL_MAX_BYTES", DEFAULT_SPOOL_MAX_BYTES)?,
            min_free_bytes: parse_size(&s.spool_min_free_bytes, "SPOOL_MIN_FREE_BYTES", DEFAULT_SPOOL_MIN_FREE_BYTES)?,
            max_records: parse_number(
                &s.spool_max_records,
                "SPOOL_MAX_RECORDS",
                match format {
                    ArchiveFormat::Connect => DEFAULT_SPOOL_MAX_RECORDS,
                    ArchiveFormat::Parquet(_) => DEFAULT_SPOOL_MAX_RECORDS_PARQUET,
                },
                10,
                1 << 40,
            )?,
        };
        let upload_workers =
            parse_number(&s.upload_workers, "UPLOAD_WORKERS", DEFAULT_UPLOAD_WORKERS as u64, 1, 4096)? as usize;
        let upload_rate_limit = match non_empty(&s.upload_rate_limit) {
            None => None,
            Some(v) => match v.parse::<f64>() {
                Ok(r) if r.is_finite() && r >= 0.01 => Some(r),
                _ => {
                    return Err(invalid(
                        "UPLOAD_RATE_LIMIT",
                        format!("{v:?} is not a number of uploads a second, 0.01 or more (e.g. 500, or 0.5)"),
                    ));
                }
            },
        };
        let upload_threads =
            parse_number(&s.upload_threads, "UPLOAD_THREADS", default_upload_threads() as u64, 1, 1024)? as usize;
        let conditional_put = match non_empty(&s.s3_conditional_put).map(str::to_ascii_lowercase).as_deref() {
            None | Some("false" | "0" | "no" | "off") => false,
            Some("true" | "1" | "yes" | "on") => true,
            Some(other) => {
                return Err(invalid("S3_CONDITIONAL_PUT", format!("{other:?} is not true or false")));
            }
        };
        if let StoreConfig::S3 { put: PutSettings { storage_class: Some(class), .. }, .. } = &store
            && conditional_put
            && ARCHIVE_CLASSES.contains(&class.as_str())
        {
            return Err(invalid(
                "S3_STORAGE_CLASS",
                format!(
                    "{class} objects cannot be read without a restore, and S3_CONDITIONAL_PUT=true reads an object back when it finds it stored: choose GLACIER_IR or another class, or S3_CONDITIONAL_PUT=false"
                ),
            ));
        }
        let undecodable = match non_empty(&s.undecodable).unwrap_or("dead-letter") {
            "dead-letter" | "dead_letter" | "deadletter" => UndecodablePolicy::DeadLetter,
            "raw" => UndecodablePolicy::Raw,
            "stop" => UndecodablePolicy::Stop,
            other => {
                return Err(invalid("UNDECODABLE", format!("{other:?} is not one of dead-letter, raw, stop")));
            }
        };
        let port = parse_number(&s.rest_port, "REST_PORT", u64::from(DEFAULT_REST_PORT), 0, 65535)? as u16;
        let bind: IpAddr = match non_empty(&s.rest_bind_address) {
            None => IpAddr::from([0, 0, 0, 0]),
            Some(a) => a.parse().map_err(|_| {
                invalid("REST_BIND_ADDRESS", format!("{a:?} is not an IP address (e.g. 0.0.0.0 or 127.0.0.1)"))
            })?,
        };
        let commit_interval = Duration::from_millis(parse_number(
            &s.commit_interval_ms,
            "COMMIT_INTERVAL_MS",
            DEFAULT_COMMIT_INTERVAL_MS,
            10,
            3_600_000,
        )?);
        let shutdown_timeout = Duration::from_secs(parse_number(
            &s.shutdown_timeout,
            "SHUTDOWN_TIMEOUT",
            DEFAULT_SHUTDOWN_TIMEOUT_S,
            0,
            3600,
        )?);
        let log_format = match non_empty(&s.log_format).unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid("LOG_FORMAT", format!("{other:?} is not one of text, json")));
            }
        };
        Ok(Config {
            brokers,
            topics,
            group_id,
            kafka_properties,
            layout: Layout { timezone, extension, separator },
            spool_dir,
            spool_limits,
            upload_workers,
            upload_rate_limit,
            upload_threads,
            conditional_put,
            undecodable,
            format,
            ignored,
            ignored_by_local: match store {
                StoreConfig::Local { .. } => [
                    ("S3_STORAGE_CLASS", &s.s3_storage_class),
                    ("S3_OBJECT_TAGS", &s.s3_object_tags),
                    ("S3_SSE", &s.s3_sse),
                    ("S3_SSE_KMS_KEY_ID", &s.s3_sse_kms_key_id),
                    ("S3_SSE_C_KEY_FILE", &s.s3_sse_c_key_file),
                    ("S3_PROXY_URL", &s.s3_proxy_url),
                    ("S3_CHECKSUM", &s.s3_checksum),
                ]
                .into_iter()
                .filter(|(_, v)| non_empty(v).is_some())
                .map(|(name, _)| name)
                .collect(),
                StoreConfig::S3 { .. } => Vec::new(),
            },
            store,
            http_addr: SocketAddr::new(bind, port),
            commit_interval,
            shutdown_timeout,
            log_format,
        })
    }

    /// One line for the start-up log: the effective settings, secrets masked.
    pub fn summary(&self) -> String {
        let store = match &self.store {
            StoreConfig::S3 { bucket, region, endpoint, credentials, ca_pem, proxy, .. } => {
                format!(
                    "s3 bucket={bucket} region={region} endpoint={} {} custom_ca={} proxy={} {}",
                    endpoint.as_deref().unwrap_or("(AWS)"),
                    credentials.shown(),
                    ca_pem.is_some(),
                    proxy.as_ref().map_or("(none)".to_string(), |p| proxy_shown(p.url.expose())),
                    self.store.object_settings().unwrap_or_default(),
                )
            }
            StoreConfig::Local { dir, bucket } => {
                format!("local dir={} bucket={bucket}", dir.display())
            }
        };
        format!(
            "brokers={} topics={} group_id={} store=[{store}] extension={} separator={:?} timezone={} spool_dir={} \
             spool_max_bytes={} spool_max_records={} spool_min_free_bytes={} upload_workers={} upload_threads={} conditional_put={} undecodable={:?} format={} http={} commit_interval={:?} shutdown_timeout={:?} kafka_properties=[{}]",
            self.brokers.join(","),
            self.topics,
            self.group_id,
            self.layout.extension,
            String::from_utf8_lossy(&self.layout.separator),
            self.layout.timezone,
            self.spool_dir.display(),
            self.spool_limits.max_bytes,
            self.spool_limits.max_records,
            self.spool_limits.min_free_bytes,
            self.upload_workers,
            self.upload_threads,
            self.conditional_put,
            self.undecodable,
            self.format.describe(),
            self.http_addr,
            self.commit_interval,
            self.shutdown_timeout,
            self.kafka_properties
                .iter()
                .map(|(k, v)| if is_secret_property(k) { format!("{k}=***") } else { format!("{k}={v}") })
                .collect::<Vec<_>>()
                .join(","),
        )
    }

    /// `auto.offset.reset` as given through KAFKA_PROPERTY_*, `earliest` by default.
    pub fn offset_reset(&self) -> OffsetReset {
        self.kafka_properties
            .iter()
            .rfind(|(k, _)| k == "auto.offset.reset")
            .and_then(|(_, v)| offset_reset(v))
            .unwrap_or(OffsetReset::Earliest)
    }

    /// Settings that are valid but can cost records, said once at start-up.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.ignored.is_empty() {
            out.push(format!(
                "{} set, but ARCHIVE_FORMAT is connect: they apply to ARCHIVE_FORMAT=parquet only and do nothing here",
                self.ignored.join(", ")
            ));
        }
        if !self.ignored_by_local.is_empty() {
            out.push(format!(
                "{} set, but the archive goes to a local directory: they apply to an S3 store only and do nothing here",
                self.ignored_by_local.join(", ")
            ));
        }
        if let StoreConfig::S3 { put: PutSettings { storage_class: Some(class), .. }, .. } = &self.store
            && ARCHIVE_CLASSES.contains(&class.as_str())
        {
            out.push(format!(
                "S3_STORAGE_CLASS={class}: objects of this class cannot be read until restored, so `check` cannot read its probe back, and `verify` and `restore` cannot read the archive without a restore first"
            ));
        }
        if self.offset_reset() == OffsetReset::Latest {
            out.push(
                "auto.offset.reset=latest: a new group, or a partition whose committed offset is out of range \
                 (a topic deleted and created again, records deleted by retention), starts at the newest record; \
                 the records before it are NOT archived"
                    .to_string(),
            );
        }
        out
    }
}

impl ArchiveFormat {
    /// The settings as the start-up log and `check` show them.
    pub fn describe(&self) -> String {
        match self {
            ArchiveFormat::Connect => "connect".to_string(),
            ArchiveFormat::Parquet(p) => format!(
                "parquet (values {}, batches of at most {} records, {} bytes, {:?}; zstd level {})",
                if p.sinetstream { "sinetstream" } else { "plain" },
                p.max_records,
                p.max_bytes,
                p.max_age,
                p.zstd_level
            ),
        }
    }
}

/// ARCHIVE_FORMAT and its settings, and those of the settings given that the format ignores
/// (the Parquet settings with the connect format: said at start-up, as the user may have meant
/// ARCHIVE_FORMAT=parquet). They are validated either way.
fn parse_format(s: &Settings) -> Result<(ArchiveFormat, Vec<&'static str>), ConfigError> {
    let sinetstream = match non_empty(&s.value_format).map(str::to_ascii_lowercase).as_deref() {
        None | Some("sinetstream") => true,
        Some("plain") => false,
        Some(other) => {
            return Err(invalid("VALUE_FORMAT", format!("{other:?} is not one of sinetstream, plain")));
        }
    };
    let parquet = ParquetSettings {
        max_records: parse_number(&s.batch_max_records, "BATCH_MAX_RECORDS", DEFAULT_BATCH_MAX_RECORDS, 1, 100_000_000)?
            as usize,
        max_bytes: parse_size(&s.batch_max_bytes, "BATCH_MAX_BYTES", DEFAULT_BATCH_MAX_BYTES)?.max(1),
        max_age: parse_duration(&s.batch_max_age, "BATCH_MAX_AGE", DEFAULT_BATCH_MAX_AGE)?,
        zstd_level: parse_number(&s.parquet_zstd_level, "PARQUET_ZSTD_LEVEL", DEFAULT_PARQUET_ZSTD_LEVEL, 1, 22)?
            as i32,
        sinetstream,
    };
    match non_empty(&s.archive_format).map(str::to_ascii_lowercase).as_deref() {
        None | Some("connect") => {
            let given = [
                ("VALUE_FORMAT", &s.value_format),
                ("BATCH_MAX_RECORDS", &s.batch_max_records),
                ("BATCH_MAX_BYTES", &s.batch_max_bytes),
                ("BATCH_MAX_AGE", &s.batch_max_age),
                ("PARQUET_ZSTD_LEVEL", &s.parquet_zstd_level),
            ];
            Ok((
                ArchiveFormat::Connect,
                given.iter().filter(|(_, v)| non_empty(v).is_some()).map(|(n, _)| *n).collect(),
            ))
        }
        Some("parquet") => Ok((ArchiveFormat::Parquet(parquet), Vec::new())),
        Some(other) => Err(invalid("ARCHIVE_FORMAT", format!("{other:?} is not one of connect, parquet"))),
    }
}

/// A duration: a number with `ms`, `s`, `m` or `h` (seconds when none), from 10 ms to a day.
fn parse_duration(value: &Option<String>, var: &str, default: Duration) -> Result<Duration, ConfigError> {
    let Some(v) = non_empty(value) else {
        return Ok(default);
    };
    let split = v.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(v.len());
    let (number, unit) = v.split_at(split);
    let scale = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(invalid(var, format!("{v:?}: the unit is not one of ms, s, m, h"))),
    };
    let n: f64 = number.parse().map_err(|_| invalid(var, format!("{v:?} is not a number with a unit, e.g. 60s")))?;
    let d = Duration::from_secs_f64(n * scale);
    if d < Duration::from_millis(10) || d > Duration::from_secs(86_400) {
        return Err(invalid(var, format!("{v} is out of range (10ms to 24h)")));
    }
    Ok(d)
}

/// Shows only the first four characters of an access key id.
/// AWS_ROLE_SESSION_NAME when unset (object_store's and the AWS SDKs' choice).
const DEFAULT_ROLE_SESSION_NAME: &str = "WebIdentitySession";

/// The first credential source configured, in the AWS SDKs' order (see [`Credentials`]).
fn parse_credentials(s: &Settings, secret: Option<String>) -> Result<Credentials, ConfigError> {
    let access_key_id = non_empty(&s.aws_access_key_id);
    let session_token = non_empty(&s.aws_session_token);
    match (access_key_id, secret) {
        (Some(id), Some(secret)) => {
            return Ok(Credentials::Keys {
                access_key_id: Secret(id.to_string()),
                secret_key: Secret(secret),
                session_token: session_token.map(|t| Secret(t.to_string())),
            });
        }
        (Some(_), None) => return Err(invalid("AWS_SECRET_KEY", "is required when AWS_ACCESS_KEY_ID is set")),
        (None, Some(_)) => return Err(invalid("AWS_ACCESS_KEY_ID", "is required when AWS_SECRET_KEY is set")),
        (None, None) if session_token.is_some() => {
            return Err(invalid(
                "AWS_SESSION_TOKEN",
                "belongs to temporary credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_KEY with it",
            ));
        }
        (None, None) => {}
    }
    let token_file = non_empty(&s.aws_web_identity_token_file);
    let role_arn = non_empty(&s.aws_role_arn);
    match (token_file, role_arn) {
        (Some(file), Some(role_arn)) => {
            // Read once here: a file the archiver's user may not read is the usual IRSA mistake.
            readable("AWS_WEB_IDENTITY_TOKEN_FILE", file)?;
            let sts_endpoint = non_empty(&s.aws_endpoint_url_sts).map(str::to_string);
            if let Some(url) = &sts_endpoint
                && !url.starts_with("https://")
            {
                return Err(invalid(
                    "AWS_ENDPOINT_URL_STS",
                    format!("{url:?}: the token exchange is made over https:// only"),
                ));
            }
            return Ok(Credentials::WebIdentity {
                token_file: file.to_string(),
                role_arn: role_arn.to_string(),
                session_name: non_empty(&s.aws_role_session_name).unwrap_or(DEFAULT_ROLE_SESSION_NAME).to_string(),
                sts_endpoint,
            });
        }
        (Some(_), None) => {
            return Err(invalid("AWS_ROLE_ARN", "is required with AWS_WEB_IDENTITY_TOKEN_FILE (the role to assume)"));
        }
        (None, Some(_)) => {
            return Err(invalid(
                "AWS_WEB_IDENTITY_TOKEN_FILE",
                "is required with AWS_ROLE_ARN (the token to assume it with)",
            ));
        }
        (None, None) => {}
    }
    if let Some(uri) = non_empty(&s.aws_container_credentials_relative_uri) {
        return Ok(Credentials::EcsTask { relative_uri: uri.to_string() });
    }
    if let Some(uri) = non_empty(&s.aws_container_credentials_full_uri) {
        let Some(file) = non_empty(&s.aws_container_authorization_token_file) else {
            return Err(invalid(
                "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
                "is required with AWS_CONTAINER_CREDENTIALS_FULL_URI (the agent's token)",
            ));
        };
        readable("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", file)?;
        // The token goes with each request: plain http only to this host or the agents' link-local
        // addresses, as the AWS SDKs allow.
        let agent = |u: &url::Url| bare_host(u).is_some_and(|h| CREDENTIAL_ENDPOINTS.contains(&h.as_str()));
        match url::Url::parse(uri) {
            Ok(u) if u.scheme() == "https" || (u.scheme() == "http" && (is_loopback(&u) || agent(&u))) => {}
            _ => {
                return Err(invalid(
                    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                    format!(
                        "{uri:?}: give an https:// URL (plain http only to this host or 169.254.170.23, 169.254.170.2)"
                    ),
                ));
            }
        }
        return Ok(Credentials::Container { full_uri: uri.to_string(), token_file: file.to_string() });
    }
    Ok(Credentials::Instance)
}

fn mask_key_id(id: &str) -> &str {
    id.get(..4).unwrap_or("***")
}

/// librdkafka properties whose values must never be logged.
pub fn is_secret_property(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n.contains("password") || n.contains("secret") || n.ends_with(".pem") || n.contains("key.pem")
}

fn required<'a>(value: &'a Option<String>, var: &str) -> Result<&'a str, ConfigError> {
    non_empty(value).ok_or_else(|| invalid(var, "is required but not set (see the README's configuration table)"))
}

/// An unset or blank value is treated as unset: an empty line in `.env` means "the default".
fn non_empty(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

fn parse_number(value: &Option<String>, var: &str, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let Some(v) = non_empty(value) else {
        return Ok(default);
    };
    let n: u64 = v.parse().map_err(|_| invalid(var, format!("{v:?} is not a whole number")))?;
    if n < min || n > max {
        return Err(invalid(var, format!("{n} is out of range ({min} to {max})")));
    }
    Ok(n)
}

/// A size in bytes: a number with an optional unit (`1GiB`, `500 MB`, `65536`).
fn parse_size(value: &Option<String>, var: &str, default: u64) -> Result<u64, ConfigError> {
    let Some(v) = non_empty(value) else {
        return Ok(default);
    };
    let size: bytesize::ByteSize =
        v.parse().map_err(|_| invalid(var, format!("{v:?} is not a size (e.g. 1GiB, 500MB, 65536)")))?;
    if size.as_u64() < 1 << 20 {
        return Err(invalid(var, format!("{v:?} is below the minimum of 1MiB")));
    }
    Ok(size.as_u64())
}

fn parse_brokers(value: &str) -> Result<Vec<String>, ConfigError> {
    let var = "BROKER_HOSTNAME";
    let mut out = Vec::new();
    for part in value.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(invalid(var, format!("{value:?} has an empty entry")));
        }
        let (host, port) = split_host_port(part).map_err(|m| invalid(var, format!("{part:?}: {m}")))?;
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(invalid(var, format!("{part:?} is not a host name (expected host or host:port)")));
        }
        out.push(format!("{host}:{port}"));
    }
    Ok(out)
}

fn split_host_port(s: &str) -> Result<(&str, u16), String> {
    let parse_port = |p: &str| match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("port {p:?} is not a number from 1 to 65535")),
        Ok(n) => Ok(n),
    };
    if let Some(rest) = s.strip_prefix('[') {
        // [IPv6]:port
        let (host, after) = rest.split_once(']').ok_or("missing ']' after an IPv6 address")?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((&s[..host.len() + 2], parse_port(p)?)),
            None if after.is_empty() => Ok((&s[..host.len() + 2], 9092)),
            None => Err("unexpected text after ']'".into()),
        };
    }
    match s.rsplit_once(':') {
        Some((host, _)) if host.contains(':') => Err("an IPv6 address needs brackets: [::1]:9092".into()),
        Some((host, p)) => Ok((host, parse_port(p)?)),
        None => Ok((s, 9092)),
    }
}

fn parse_timezone(value: Option<&str>) -> Result<Tz, ConfigError> {
    let v = value.map(str::trim).filter(|v| !v.is_empty()).unwrap_or(DEFAULT_TIMEZONE);
    v.parse::<Tz>().map_err(|_| {
        invalid("PARTITION_TIMEZONE", format!("{v:?} is not an IANA time zone name (e.g. Asia/Tokyo, UTC)"))
    })
}

fn parse_store(s: &Settings, env: &[(String, String)]) -> Result<StoreConfig, ConfigError> {
    let bucket = non_empty(&s.s3_bucket_name);
    let endpoint = non_empty(&s.s3_endpoint_url);
    let archive_dir = non_empty(&s.archive_dir);
    if let Some(b) = bucket {
        validate_bucket(b)?;
    }
    if archive_dir.is_some() && endpoint.is_some() {
        return Err(invalid(
            "ARCHIVE_DIR",
            "set either ARCHIVE_DIR (local directory) or S3_ENDPOINT_URL (S3), not both",
        ));
    }
    if archive_dir.is_some() || (bucket.is_none() && endpoint.is_none()) {
        return Ok(StoreConfig::Local {
            dir: PathBuf::from(archive_dir.unwrap_or(DEFAULT_ARCHIVE_DIR)),
            bucket: bucket.unwrap_or(DEFAULT_LOCAL_BUCKET).to_string(),
        });
    }
    let bucket = bucket.ok_or_else(|| invalid("S3_BUCKET_NAME", "is required when S3_ENDPOINT_URL is set"))?;
    let endpoint = endpoint.map(validate_endpoint).transpose()?;
    let secret = non_empty(&s.aws_secret_key).map(str::to_string).or_else(|| {
        env.iter()
            .find(|(k, _)| k == "AWS_SECRET_ACCESS_KEY")
            .map(|(_, v)| v.trim().to_string())
            .filter(|v| !v.is_empty())
    });
    let credentials = parse_credentials(s, secret)?;
    let region = non_empty(&s.s3_region).unwrap_or(DEFAULT_REGION);
    if !region.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(invalid("S3_REGION", format!("{region:?} is not a region name (e.g. us-east-1)")));
    }
    let ca_pem = match non_empty(&s.s3_ca_file) {
        None => None,
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| invalid("S3_CA_FILE", format!("cannot read {path:?}: {e}")))?;
            match object_store::Certificate::from_pem_bundle(&pem) {
                Ok(certs) if !certs.is_empty() => Some(pem),
                _ => return Err(invalid("S3_CA_FILE", format!("{path:?} holds no PEM certificate"))),
            }
        }
    };
    let sse = match parse_sse(s)? {
        Some(Sse::CustomerKey(_)) if endpoint.as_deref().is_some_and(plain_http_off_host) => {
            return Err(invalid(
                "S3_SSE_C_KEY_FILE",
                "a customer key is sent with every request: it needs an https:// S3_ENDPOINT_URL (plain http only to this host)",
            ));
        }
        sse => sse,
    };
    Ok(StoreConfig::S3 {
        bucket: bucket.to_string(),
        region: region.to_string(),
        endpoint,
        credentials: Box::new(credentials.clone()),
        ca_pem,
        put: PutSettings {
            storage_class: non_empty(&s.s3_storage_class).map(parse_storage_class).transpose()?,
            tags: non_empty(&s.s3_object_tags).map(parse_tags).transpose()?.unwrap_or_default(),
        },
        sse,
        proxy: non_empty(&s.s3_proxy_url).map(|url| parse_proxy(url, env, &credentials).map(Box::new)).transpose()?,
        checksum: match non_empty(&s.s3_checksum).map(str::to_ascii_lowercase).as_deref() {
            None | Some("none") => None,
            Some("sha256") => Some(Checksum::Sha256),
            Some("crc64nvme") => Some(Checksum::Crc64Nvme),
            Some(other) => {
                return Err(invalid("S3_CHECKSUM", format!("{other:?}: use sha256 or crc64nvme (or none)")));
            }
        },
    })
}

/// The link-local credential endpoints: the instance metadata service, the ECS agent, the EKS Pod
/// Identity agent (IPv4 and IPv6). A proxy elsewhere cannot reach them.
const CREDENTIAL_ENDPOINTS: [&str; 5] =
    ["169.254.169.254", "169.254.170.2", "fd00:ec2::254", "169.254.170.23", "fd00:ec2::23"];

/// S3_PROXY_URL: an http:// or https:// proxy, with credentials if it wants them. It does not
/// take the credential endpoints, nor NO_PROXY's (or no_proxy's) hosts from `env`.
fn parse_proxy(value: &str, env: &[(String, String)], credentials: &Credentials) -> Result<Proxy, ConfigError> {
    let shown = proxy_shown(value);
    let url = url::Url::parse(value)
        .map_err(|e| invalid("S3_PROXY_URL", format!("{shown:?} is not a URL ({e}); e.g. http://proxy:3128")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("S3_PROXY_URL", format!("{shown:?}: give http:// or https://, a host and a port")));
    }
    let mut excludes: Vec<String> = CREDENTIAL_ENDPOINTS.map(String::from).into();
    if let Credentials::Container { full_uri, .. } = credentials
        && let Some(host) = url::Url::parse(full_uri).ok().as_ref().and_then(bare_host)
        && !excludes.contains(&host)
    {
        excludes.push(host);
    }
    if let Some((_, hosts)) = env.iter().find(|(k, v)| (k == "NO_PROXY" || k == "no_proxy") && !v.trim().is_empty()) {
        excludes.extend(hosts.split(',').map(str::trim).filter(|h| !h.is_empty()).map(String::from));
    }
    Ok(Proxy { url: Secret(value.to_string()), excludes })
}

/// A proxy URL as the log and `check` show it: a password in it is masked.
pub fn proxy_shown(value: &str) -> String {
    if let Ok(mut url) = url::Url::parse(value)
        && url.has_host()
    {
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        }
        return url.to_string();
    }
    // Not a URL with a host: whatever follows an @ is shown, never what precedes it.
    value.rsplit_once('@').map_or(value.to_string(), |(_, host)| format!("***@{host}"))
}

/// An `http://` endpoint on another host: what it is sent crosses the network in clear.
fn plain_http_off_host(endpoint: &str) -> bool {
    url::Url::parse(endpoint).is_ok_and(|url| url.scheme() == "http" && !is_loopback(&url))
}

/// Whether a URL's host is this host (localhost, 127.0.0.0/8, ::1).
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// A URL's host as NO_PROXY lists hosts: an IPv6 address without its brackets.
fn bare_host(url: &url::Url) -> Option<String> {
    url.host_str().map(|h| h.trim_matches(['[', ']']).to_string())
}

/// A file the archiver must be able to read (a token file), read once to be sure.
fn readable(var: &str, file: &str) -> Result<(), ConfigError> {
    std::fs::read(file).map(drop).map_err(|e| invalid(var, format!("cannot read {file:?}: {e}")))
}

/// S3_SSE, S3_SSE_KMS_KEY_ID and S3_SSE_C_KEY_FILE, which must agree.
fn parse_sse(s: &Settings) -> Result<Option<Sse>, ConfigError> {
    let key_id = non_empty(&s.s3_sse_kms_key_id).map(str::to_string);
    let customer = non_empty(&s.s3_sse_c_key_file);
    let sse = match (non_empty(&s.s3_sse), customer) {
        (Some(_), Some(_)) => {
            return Err(invalid(
                "S3_SSE_C_KEY_FILE",
                "customer keys (SSE-C) are an encryption of their own: set S3_SSE or S3_SSE_C_KEY_FILE, not both",
            ));
        }
        (None, Some(path)) => Some(Sse::CustomerKey(read_customer_key(path)?)),
        (None, None) => None,
        (Some("AES256"), None) => Some(Sse::S3),
        (Some("aws:kms"), None) => Some(Sse::Kms { dual: false, key_id: key_id.clone() }),
        (Some("aws:kms:dsse"), None) => Some(Sse::Kms { dual: true, key_id: key_id.clone() }),
        (Some(other), None) => {
            return Err(invalid(
                "S3_SSE",
                format!("{other:?} is not one of AES256, aws:kms, aws:kms:dsse (customer keys: S3_SSE_C_KEY_FILE)"),
            ));
        }
    };
    if key_id.is_some() && !matches!(sse, Some(Sse::Kms { .. })) {
        return Err(invalid("S3_SSE_KMS_KEY_ID", "is set, but S3_SSE is not aws:kms or aws:kms:dsse"));
    }
    Ok(sse)
}

/// A 256-bit SSE-C key from a file: 32 raw bytes, or their base64 (whitespace around it ignored).
/// The key itself is never part of an error.
fn read_customer_key(path: &str) -> Result<Secret, ConfigError> {
    use base64::Engine;
    let bytes = std::fs::read(path).map_err(|e| invalid("S3_SSE_C_KEY_FILE", format!("cannot read {path:?}: {e}")))?;
    if bytes.len() == 32 {
        return Ok(Secret(base64::engine::general_purpose::STANDARD.encode(&bytes)));
    }
    let text = String::from_utf8_lossy(&bytes);
    match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
        Ok(key) if key.len() == 32 => Ok(Secret(text.trim().to_string())),
        _ => Err(invalid(
            "S3_SSE_C_KEY_FILE",
            format!("{path:?} does not hold a 256-bit key (32 bytes, or their base64; e.g. `openssl rand 32 > key`)"),
        )),
    }
}

/// Classes whose objects must be restored before they can be read (a GET answers 403
/// InvalidObjectState).
const ARCHIVE_CLASSES: [&str; 2] = ["GLACIER", "DEEP_ARCHIVE"];

/// A storage class as S3 names them (STANDARD_IA, GLACIER_IR, ...). Not checked against AWS's
/// list: S3-compatible stores have classes of their own; the store refuses one it does not know
/// (`check` tries it).
fn parse_storage_class(v: &str) -> Result<String, ConfigError> {
    let ok = v.len() <= 64 && v.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(v.to_string())
    } else {
        Err(invalid(
            "S3_STORAGE_CLASS",
            format!("{v:?} is not a storage class name (capitals, digits and '_', e.g. STANDARD_IA, GLACIER_IR)"),
        ))
    }
}

/// `key=value&key2=value2` (percent-encoding understood), within S3's limits: at most 10 tags,
/// keys of 1-128 and values of at most 256 characters, no key twice.
fn parse_tags(v: &str) -> Result<Vec<(String, String)>, ConfigError> {
    let bad = |why: String| invalid("S3_OBJECT_TAGS", format!("{v:?}: {why} (expected key=value&key2=value2)"));
    let mut tags: Vec<(String, String)> = Vec::new();
    for pair in v.split('&') {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(bad(format!("{pair:?} has no '='")));
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|d| d.into_owned())
                .map_err(|_| bad(format!("{s:?} is not UTF-8 once decoded")))
        };
        let (key, value) = (decode(key)?, decode(value)?);
        if key.is_empty() || key.chars().count() > 128 {
            return Err(bad(format!("the key {key:?} must be 1-128 characters")));
        }
        if value.chars().count() > 256 {
            return Err(bad(format!("the value of {key:?} is longer than 256 characters")));
        }
        if tags.iter().any(|(k, _)| *k == key) {
            return Err(bad(format!("the key {key:?} is given twice")));
        }
        tags.push((key, value));
    }
    if tags.len() > 10 {
        return Err(bad(format!("{} tags; S3 takes at most 10", tags.len())));
    }
    Ok(tags)
}

fn validate_bucket(b: &str) -> Result<(), ConfigError> {
    let ok = (3..=63).contains(&b.len())
        && b.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && b.starts_with(|c: char| c.is_ascii_alphanumeric())
        && b.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "S3_BUCKET_NAME",
            format!("{b:?} is not a valid bucket name (3-63 lowercase letters, digits, '.', '-')"),
        ))
    }
}

fn validate_endpoint(e: &str) -> Result<String, ConfigError> {
    let url = url::Url::parse(e)
        .map_err(|err| invalid("S3_ENDPOINT_URL", format!("{e:?} is not a URL ({err}); e.g. http://minio:9000")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("S3_ENDPOINT_URL", format!("{e:?}: the scheme must be http or https")));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("S3_ENDPOINT_URL", format!("{e:?} has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(invalid("S3_ENDPOINT_URL", "must not carry credentials: use AWS_ACCESS_KEY_ID and AWS_SECRET_KEY"));
    }
    if url.path() != "/" || url.query().is_some() {
        return Err(invalid(
            "S3_ENDPOINT_URL",
            format!("{e:?}: give only scheme, host and port (the bucket is S3_BUCKET_NAME)"),
        ));
    }
    Ok(e.trim_end_matches('/').to_string())
}

/// Understands `\n`, `\r`, `\t` and `\\`, so a newline separator can be written in `.env`.
fn unescape(value: &str, var: &str) -> Result<Bytes, ConfigError> {
    let mut out = Vec::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('n') => out.push(b'\n'),
            Some('r') => out.push(b'\r'),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            other => {
                return Err(invalid(
                    var,
                    format!(
                        "unknown escape \\{} (use \\n, \\r, \\t or \\\\)",
                        other.map(String::from).unwrap_or_default()
                    ),
                ));
            }
        }
    }
    Ok(Bytes::from(out))
}

fn parse_kafka_properties(flags: &[String], env: &[(String, String)]) -> Result<Vec<(String, String)>, ConfigError> {
    let mut props: Vec<(String, String, String)> = Vec::new();
    for (k, v) in env {
        if let Some(name) = k.strip_prefix(KAFKA_PROPERTY_PREFIX) {
            props.push((name.to_ascii_lowercase().replace('_', "."), v.clone(), k.clone()));
        }
    }
    props.sort();
    for f in flags {
        let (name, value) =
            f.split_once('=').ok_or_else(|| invalid("--kafka-property", format!("{f:?} is not NAME=VALUE")))?;
        props.push((name.trim().to_string(), value.to_string(), "--kafka-property".into()));
    }
    let mut out: Vec<(String, String)> = Vec::new();
    for (name, value, var) in props {
        if name.is_empty() {
            return Err(invalid(&var, "the property name is empty"));
        }
        if let Some((_, why)) = MANAGED_PROPERTIES.iter().find(|(p, _)| *p == name) {
            return Err(invalid(&var, format!("{name} cannot be passed through: {why}")));
        }
        if name == "auto.offset.reset" && offset_reset(&value).is_none() {
            return Err(invalid(
                &var,
                format!(
                    "auto.offset.reset={value} is not supported: `earliest` (the default: a new group starts \
                     at the oldest record), `latest` (starts at the newest: older records are not archived) \
                     or `error` (an offset out of range stops the partition with an error instead of a reset)"
                ),
            ));
        }
        out.retain(|(n, _)| *n != name);
        out.push((name, value));
    }
    Ok(out)
}

/// Where a partition without a usable committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetReset {
    Earliest,
    Latest,
    Error,
}

/// librdkafka's names for each `auto.offset.reset`.
fn offset_reset(value: &str) -> Option<OffsetReset> {
    match value.trim().to_ascii_lowercase().as_str() {
        "earliest" | "smallest" | "beginning" => Some(OffsetReset::Earliest),
        "latest" | "largest" | "end" => Some(OffsetReset::Latest),
        "error" => Some(OffsetReset::Error),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Settings {
        Settings { broker_hostname: Some("kafka".into()), kafka_topic: Some("sensor".into()), ..Default::default() }
    }

    fn err(s: Settings) -> String {
        Config::from_settings(&s, &[]).unwrap_err().to_string()
    }

    /// [`base`] with an S3 bucket.
    fn s3() -> Settings {
        Settings { s3_bucket_name: Some("bucket-x".into()), ..base() }
    }

    /// The S3 store `s` configures.
    fn s3_store(s: &Settings) -> StoreConfig {
        match Config::from_settings(s, &[]).map(|c| c.store) {
            Ok(store @ StoreConfig::S3 { .. }) => store,
            other => panic!("{other:?}"),
        }
    }

    /// The credentials `s` configures.
    fn credentials(s: Settings) -> Credentials {
        match s3_store(&s) {
            StoreConfig::S3 { credentials, .. } => *credentials,
            StoreConfig::Local { .. } => unreachable!(),
        }
    }

    #[test]
    fn the_store_location_names_the_bucket_and_endpoint_only() {
        let at = |endpoint: Option<&str>| {
            let s = Settings {
                s3_endpoint_url: endpoint.map(String::from),
                aws_access_key_id: Some("AKIDEXAMPLE".into()),
                aws_secret_key: Some("secret-key-123".into()),
                ..s3()
            };
            s3_store(&s).location()
        };
        assert_eq!(at(Some("http://127.0.0.1:3900")), "s3://bucket-x at http://127.0.0.1:3900 (us-east-1)");
        assert_eq!(at(None), "s3://bucket-x at AWS (us-east-1)");
    }

    #[test]
    fn the_credential_chain_takes_the_first_source_configured_as_the_aws_sdks_do() {
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_str().unwrap().to_string();
        let all = Settings {
            aws_access_key_id: Some("ASIAEXAMPLE".into()),
            aws_secret_key: Some("s3cr3t".into()),
            aws_session_token: Some("t0ken".into()),
            aws_web_identity_token_file: Some(path.clone()),
            aws_role_arn: Some("arn:aws:iam::1:role/r".into()),
            aws_endpoint_url_sts: Some("https://sts.example".into()),
            aws_container_credentials_relative_uri: Some("/v2/credentials/x".into()),
            aws_container_credentials_full_uri: Some("http://127.0.0.1:1/creds".into()),
            aws_container_authorization_token_file: Some(path.clone()),
            ..s3()
        };
        let keys = credentials(all.clone());
        assert!(matches!(&keys, Credentials::Keys { session_token: Some(t), .. } if t.expose() == "t0ken"), "{keys:?}");
        assert_eq!(keys.shown(), "credentials=keys access_key_id=ASIA secret_key=*** session_token=***");
        let no_keys = Settings { aws_access_key_id: None, aws_secret_key: None, aws_session_token: None, ..all };
        let web = credentials(no_keys.clone());
        assert_eq!(
            web,
            Credentials::WebIdentity {
                token_file: path.clone(),
                role_arn: "arn:aws:iam::1:role/r".into(),
                session_name: DEFAULT_ROLE_SESSION_NAME.into(),
                sts_endpoint: Some("https://sts.example".into())
            }
        );
        let no_web = Settings { aws_web_identity_token_file: None, aws_role_arn: None, ..no_keys };
        assert_eq!(credentials(no_web.clone()), Credentials::EcsTask { relative_uri: "/v2/credentials/x".into() });
        let no_ecs = Settings { aws_container_credentials_relative_uri: None, ..no_web };
        assert_eq!(
            credentials(no_ecs.clone()),
            Credentials::Container { full_uri: "http://127.0.0.1:1/creds".into(), token_file: path }
        );
        let none = Settings { aws_container_credentials_full_uri: None, ..no_ecs };
        assert_eq!(credentials(none), Credentials::Instance);
    }

    #[test]
    fn an_incomplete_credential_source_is_named() {
        let e = err(Settings { aws_session_token: Some("t".into()), ..s3() });
        assert!(e.starts_with("AWS_SESSION_TOKEN:"), "{e}");
        let e = err(Settings { aws_role_arn: Some("arn:aws:iam::1:role/r".into()), ..s3() });
        assert!(e.starts_with("AWS_WEB_IDENTITY_TOKEN_FILE:"), "{e}");
        let e = err(Settings { aws_web_identity_token_file: Some("/nonexistent/token".into()), ..s3() });
        assert!(e.starts_with("AWS_ROLE_ARN:"), "{e}");
        let e = err(Settings {
            aws_web_identity_token_file: Some("/nonexistent/token".into()),
            aws_role_arn: Some("arn:aws:iam::1:role/r".into()),
            ..s3()
        });
        assert!(e.starts_with("AWS_WEB_IDENTITY_TOKEN_FILE:") && e.contains("cannot read"), "{e}");
        let file = tempfile::NamedTempFile::new().unwrap();
        let e = err(Settings {
            aws_web_identity_token_file: Some(file.path().to_str().unwrap().into()),
            aws_role_arn: Some("arn:aws:iam::1:role/r".into()),
            aws_endpoint_url_sts: Some("http://sts.example".into()),
            ..s3()
        });
        assert!(e.starts_with("AWS_ENDPOINT_URL_STS:"), "{e}");
        let e = err(Settings { aws_container_credentials_full_uri: Some("http://127.0.0.1:1/c".into()), ..s3() });
        assert!(e.starts_with("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE:"), "{e}");
        let e = err(Settings {
            aws_web_identity_token_file: Some(std::env::temp_dir().to_str().unwrap().into()),
            aws_role_arn: Some("arn:aws:iam::1:role/r".into()),
            ..s3()
        });
        assert!(e.starts_with("AWS_WEB_IDENTITY_TOKEN_FILE:"), "a directory is no token file: {e}");
        let container = |uri: &str| Settings {
            aws_container_credentials_full_uri: Some(uri.into()),
            aws_container_authorization_token_file: Some(file.path().to_str().unwrap().into()),
            s3_proxy_url: Some("http://proxy:3128".into()),
            ..s3()
        };
        let e = err(container("http://agent.example/creds"));
        assert!(e.starts_with("AWS_CONTAINER_CREDENTIALS_FULL_URI:"), "{e}");
        for uri in
            ["http://169.254.170.23/v1/credentials", "http://[fd00:ec2::23]/v1/credentials", "https://agent.example/c"]
        {
            let StoreConfig::S3 { proxy: Some(p), .. } = s3_store(&container(uri)) else { panic!() };
            let host = url::Url::parse(uri).unwrap().host_str().unwrap().trim_matches(['[', ']']).to_string();
            assert!(p.excludes.contains(&host), "{uri}: the agent is reached without the proxy: {:?}", p.excludes);
        }
    }

    #[test]
    fn a_proxy_keeps_its_password_out_of_the_log_and_skips_the_credential_endpoints() {
        let s = Settings { s3_proxy_url: Some("http://archiver:pr0xyPass@proxy.lab:3128".into()), ..s3() };
        let env = [("NO_PROXY".to_string(), "minio.lab, .internal".to_string())];
        let c = Config::from_settings(&s, &env).unwrap();
        let StoreConfig::S3 { proxy: Some(p), .. } = &c.store else { panic!() };
        assert_eq!(p.url.expose(), "http://archiver:pr0xyPass@proxy.lab:3128");
        assert_eq!(p.excludes[..5], CREDENTIAL_ENDPOINTS);
        assert_eq!(p.excludes[5..], ["minio.lab", ".internal"]);
        let shown = format!("{} {c:?}", c.summary());
        assert!(!shown.contains("pr0xyPass"), "{shown}");
        assert!(shown.contains("proxy=http://archiver:***@proxy.lab:3128"), "{shown}");
        let bad = Settings { s3_proxy_url: Some("socks5://u:pr0xyPass@h:1080".into()), ..s3() };
        let e = err(bad);
        assert!(e.starts_with("S3_PROXY_URL:") && !e.contains("pr0xyPass"), "{e}");
        assert_eq!(proxy_shown("u:pr0xyPass@not a url"), "***@not a url");
    }

    #[test]
    fn checksums() {
        let with = |v: &str| match s3_store(&Settings { s3_checksum: Some(v.into()), ..s3() }) {
            StoreConfig::S3 { checksum, .. } => checksum,
            _ => unreachable!(),
        };
        assert_eq!(with("SHA256"), Some(Checksum::Sha256));
        assert_eq!(with("crc64nvme"), Some(Checksum::Crc64Nvme));
        assert_eq!(with("none"), None);
        assert!(err(Settings { s3_checksum: Some("md5".into()), ..s3() }).starts_with("S3_CHECKSUM:"));
        let store = s3_store(&Settings { s3_checksum: Some("sha256".into()), ..s3() });
        assert!(store.sets_object_settings() && store.object_settings().unwrap().ends_with("checksum=sha256"));
    }

    #[test]
    fn the_defaults_shown_are_the_defaults_used() {
        let given = |var: &str, v: &str| {
            let mut s = base();
            let v = Some(v.replace("\\n", "\n"));
            match var {
                "S3_CONDITIONAL_PUT" => s.s3_conditional_put = v,
                "S3_OBJECT_EXTENSION" => s.s3_object_extension = v,
                "S3_OBJECT_SEPARATOR" => s.s3_object_separator = v,
                "ARCHIVE_DIR" => s.archive_dir = v,
                "REST_PORT" => s.rest_port = v,
                "REST_BIND_ADDRESS" => s.rest_bind_address = v,
                "GROUP_ID" => s.group_id = v,
                "SPOOL_DIR" => s.spool_dir = v,
                "SPOOL_MAX_BYTES" => s.spool_max_bytes = v,
                "SPOOL_MAX_RECORDS" => s.spool_max_records = Some("10000".into()),
                "SPOOL_MIN_FREE_BYTES" => s.spool_min_free_bytes = v,
                "UPLOAD_WORKERS" => s.upload_workers = v,
                "PARTITION_TIMEZONE" => s.partition_timezone = v,
                "UNDECODABLE" => s.undecodable = v,
                "COMMIT_INTERVAL_MS" => s.commit_interval_ms = v,
                "SHUTDOWN_TIMEOUT" => s.shutdown_timeout = v,
                "LOG_FORMAT" => s.log_format = v,
                "ARCHIVE_FORMAT" => s.archive_format = v,
                // Said to do nothing with the connect format (a warning): checked below.
                "VALUE_FORMAT" | "BATCH_MAX_RECORDS" | "BATCH_MAX_BYTES" | "BATCH_MAX_AGE" | "PARQUET_ZSTD_LEVEL" => {
                    return None;
                }
                // Only with an S3 store; a sentence, not a value.
                "S3_REGION" | "UPLOAD_THREADS" => return None,
                // Only with web identity: the credential chain's test.
                "AWS_ROLE_SESSION_NAME" => return None,
                other => panic!("{other} has a default but is not checked here"),
            }
            Some(s)
        };
        let unset = Config::from_settings(&base(), &[]).unwrap().summary();
        for (var, default) in DEFAULTS {
            if let Some(s) = given(var, default) {
                assert_eq!(Config::from_settings(&s, &[]).unwrap().summary(), unset, "{var}={default}");
            }
        }
        let s3 = |region: Option<&str>| {
            let s = Settings { s3_bucket_name: Some("bucket".into()), s3_region: region.map(Into::into), ..base() };
            Config::from_settings(&s, &[]).unwrap().summary()
        };
        assert_eq!(s3(None), s3(Some("us-east-1")));
        let parquet = |extra: Option<(&str, &str)>| {
            let mut s = Settings { archive_format: Some("parquet".into()), ..base() };
            match extra {
                Some(("VALUE_FORMAT", v)) => s.value_format = Some(v.into()),
                Some(("BATCH_MAX_RECORDS", v)) => s.batch_max_records = Some(v.into()),
                Some(("BATCH_MAX_BYTES", v)) => s.batch_max_bytes = Some(v.into()),
                Some(("BATCH_MAX_AGE", v)) => s.batch_max_age = Some(v.into()),
                Some(("PARQUET_ZSTD_LEVEL", v)) => s.parquet_zstd_level = Some(v.into()),
                _ => {}
            }
            Config::from_settings(&s, &[]).unwrap().summary()
        };
        for (var, default) in DEFAULTS.iter().filter(|(v, _)| {
            ["VALUE_FORMAT", "BATCH_MAX_RECORDS", "BATCH_MAX_BYTES", "BATCH_MAX_AGE", "PARQUET_ZSTD_LEVEL"].contains(v)
        }) {
            assert_eq!(parquet(Some((var, default))), parquet(None), "{var}={default}");
        }
    }

    #[test]
    fn the_parquet_settings_are_read_and_said_to_do_nothing_with_the_connect_format() {
        let s = Settings {
            archive_format: Some("Parquet".into()),
            value_format: Some("plain".into()),
            batch_max_records: Some("500".into()),
            batch_max_bytes: Some("1MiB".into()),
            batch_max_age: Some("250ms".into()),
            parquet_zstd_level: Some("9".into()),
            ..base()
        };
        let c = Config::from_settings(&s, &[]).unwrap();
        assert_eq!(
            c.format,
            ArchiveFormat::Parquet(ParquetSettings {
                max_records: 500,
                max_bytes: 1 << 20,
                max_age: Duration::from_millis(250),
                zstd_level: 9,
                sinetstream: false,
            })
        );
        let age =
            |v: &str| Settings { archive_format: Some("parquet".into()), batch_max_age: Some(v.into()), ..base() };
        let format = |s: &Settings| Config::from_settings(s, &[]).map(|c| c.format);
        assert!(matches!(format(&age("2m")), Ok(ArchiveFormat::Parquet(p)) if p.max_age == Duration::from_secs(120)));
        assert!(matches!(format(&age("90")), Ok(ArchiveFormat::Parquet(p)) if p.max_age == Duration::from_secs(90)));
        assert!(err(age("1 week")).contains("BATCH_MAX_AGE"));
        assert!(err(age("1ms")).contains("out of range"));
        let c = Config::from_settings(&Settings { batch_max_records: Some("10".into()), ..base() }, &[]).unwrap();
        assert_eq!(c.format, ArchiveFormat::Connect);
        assert!(c.warnings().iter().any(|w| w.contains("BATCH_MAX_RECORDS set, but ARCHIVE_FORMAT is connect")));
        assert!(err(Settings { batch_max_age: Some("soon".into()), ..base() }).contains("BATCH_MAX_AGE"));
        assert!(err(Settings { archive_format: Some("avro".into()), ..base() }).contains("connect, parquet"));
        let e =
            err(Settings { archive_format: Some("parquet".into()), parquet_zstd_level: Some("30".into()), ..base() });
        assert!(e.contains("PARQUET_ZSTD_LEVEL"), "{e}");
    }

    #[test]
    fn the_readme_table_shows_the_same_defaults() {
        let readme = include_str!("../README.md");
        for (var, default) in DEFAULTS {
            let row =
                readme.lines().find(|l| l.starts_with(&format!("| `{var}` |"))).unwrap_or_else(|| panic!("{var}"));
            let shown = row.split(" | ").nth(1).unwrap().trim_matches('`');
            assert_eq!(shown, *default, "{var}");
        }
    }

    #[test]
    fn defaults_match_the_seed() {
        let c = Config::from_settings(&base(), &[]).unwrap();
        assert_eq!(c.brokers, ["kafka:9092"]);
        assert_eq!(c.topics.names(), ["sensor"]);
        assert_eq!(c.group_id, "kafka-s3-archiver");
        assert_eq!(c.layout.extension, ".bin");
        assert_eq!(&c.layout.separator[..], b"\n");
        assert_eq!(c.layout.timezone, chrono_tz::Asia::Tokyo);
        assert_eq!(c.http_addr.port(), 8083);
        assert_eq!(c.undecodable, UndecodablePolicy::DeadLetter);
        assert_eq!(c.store, StoreConfig::Local { dir: "./data".into(), bucket: "archive".into() });
    }

    #[test]
    fn s3_store_from_the_seed_env() {
        let s = Settings {
            s3_bucket_name: Some("mybucket".into()),
            s3_endpoint_url: Some("http://minio:9000".into()),
            aws_access_key_id: Some("AKIAIOSFODNN7EXAMPLE".into()),
            ..base()
        };
        let env = vec![("AWS_SECRET_ACCESS_KEY".to_string(), "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".to_string())];
        let c = Config::from_settings(&s, &env).unwrap();
        let StoreConfig::S3 { bucket, region, endpoint, credentials, .. } = &c.store else { panic!() };
        let Credentials::Keys { secret_key, .. } = &**credentials else { panic!("{credentials:?}") };
        assert_eq!(
            (bucket.as_str(), region.as_str(), endpoint.as_deref()),
            ("mybucket", "us-east-1", Some("http://minio:9000"))
        );
        assert_eq!(secret_key.expose(), "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY");
        let shown = format!("{} {:?}", c.summary(), c);
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(!shown.contains("AKIAIOSFODNN7EXAMPLE"), "{shown}");
    }

    #[test]
    fn brokers_and_topics_lists() {
        let s = Settings {
            broker_hostname: Some("a, b:9093,[::1]:9094".into()),
            kafka_topic: Some("x,y,x".into()),
            ..base()
        };
        let c = Config::from_settings(&s, &[]).unwrap();
        assert_eq!(c.brokers, ["a:9092", "b:9093", "[::1]:9094"]);
        assert_eq!(c.topics.names(), ["x", "y"]);
    }

    #[test]
    fn bad_values_name_their_variable() {
        assert!(err(Settings { broker_hostname: None, ..base() }).starts_with("BROKER_HOSTNAME: is required"));
        assert!(err(Settings { broker_hostname: Some("h:99999".into()), ..base() }).starts_with("BROKER_HOSTNAME:"));
        assert!(err(Settings { kafka_topic: Some("a/b".into()), ..base() }).starts_with("KAFKA_TOPIC:"));
        assert!(err(Settings { kafka_topic: Some("^a(".into()), ..base() }).starts_with("KAFKA_TOPIC:"));
        assert!(
            err(Settings { kafka_topic_exclude: Some("a b".into()), ..base() }).starts_with("KAFKA_TOPIC_EXCLUDE:")
        );
        assert!(err(Settings { rest_port: Some("80a".into()), ..base() }).starts_with("REST_PORT:"));
        assert!(err(Settings { upload_workers: Some("0".into()), ..base() }).starts_with("UPLOAD_WORKERS:"));
        assert!(err(Settings { upload_threads: Some("0".into()), ..base() }).starts_with("UPLOAD_THREADS:"));
        assert!(
            err(Settings { partition_timezone: Some("Mars/Olympus".into()), ..base() })
                .starts_with("PARTITION_TIMEZONE:")
        );
        assert!(err(Settings { undecodable: Some("ignore".into()), ..base() }).starts_with("UNDECODABLE:"));
        assert!(
            err(Settings { s3_endpoint_url: Some("minio:9000".into()), s3_bucket_name: Some("b12".into()), ..base() })
                .starts_with("S3_ENDPOINT_URL:")
        );
        assert!(
            err(Settings { s3_endpoint_url: Some("http://minio:9000".into()), ..base() })
                .starts_with("S3_BUCKET_NAME:")
        );
        assert!(err(Settings { s3_bucket_name: Some("My_Bucket".into()), ..base() }).starts_with("S3_BUCKET_NAME:"));
        assert!(
            err(Settings { s3_object_separator: Some("\\x".into()), ..base() }).starts_with("S3_OBJECT_SEPARATOR:")
        );
        assert!(err(Settings { kafka_property: vec!["group.id=x".into()], ..base() }).starts_with("--kafka-property:"));
    }

    #[test]
    fn an_offset_reset_that_would_skip_records_is_refused_or_warned_about() {
        let with = |v: &str| {
            let env = vec![("KAFKA_PROPERTY_AUTO_OFFSET_RESET".to_string(), v.to_string())];
            Config::from_settings(&base(), &env)
        };
        let default = Config::from_settings(&base(), &[]).unwrap();
        assert_eq!(default.offset_reset(), OffsetReset::Earliest);
        assert!(default.warnings().is_empty());
        assert_eq!(with("smallest").unwrap().offset_reset(), OffsetReset::Earliest);
        assert_eq!(with("error").unwrap().offset_reset(), OffsetReset::Error);
        let latest = with("latest").unwrap();
        assert_eq!(latest.offset_reset(), OffsetReset::Latest);
        assert!(latest.warnings()[0].contains("NOT archived"), "{:?}", latest.warnings());
        let e = with("newest").unwrap_err().to_string();
        assert!(e.starts_with("KAFKA_PROPERTY_AUTO_OFFSET_RESET:") && e.contains("`earliest`"), "{e}");
    }

    #[test]
    fn storage_class_and_tags_are_read_checked_and_said_to_do_nothing_locally() {
        let s3 = |class: Option<&str>, tags: Option<&str>| Settings {
            s3_storage_class: class.map(Into::into),
            s3_object_tags: tags.map(Into::into),
            ..s3()
        };
        let put = |s: Settings| match s3_store(&s) {
            StoreConfig::S3 { put, .. } => put,
            StoreConfig::Local { .. } => unreachable!(),
        };
        assert_eq!(put(s3(None, None)), PutSettings::default());
        let given = put(s3(Some("STANDARD_IA"), Some("project=sensors&retention=1y&note=a%20b%26c&empty=")));
        assert_eq!(given.storage_class.as_deref(), Some("STANDARD_IA"));
        let pairs: Vec<(&str, &str)> = given.tags.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("project", "sensors"), ("retention", "1y"), ("note", "a b&c"), ("empty", "")]);
        assert!(
            Config::from_settings(&s3(Some("GLACIER_IR"), Some("a=1")), &[])
                .unwrap()
                .summary()
                .contains("storage_class=GLACIER_IR tags=a=1")
        );
        assert!(err(s3(Some("standard-ia"), None)).starts_with("S3_STORAGE_CLASS:"));
        for bad in ["project", "=x", "a=1&a=2", "a=1&&b=2", &format!("k={}", "v".repeat(257))] {
            assert!(err(s3(None, Some(bad))).starts_with("S3_OBJECT_TAGS:"), "{bad}");
        }
        let eleven: Vec<String> = (0..11).map(|i| format!("k{i}=v")).collect();
        assert!(err(s3(None, Some(&eleven.join("&")))).contains("at most 10"));
        let local = Settings { s3_storage_class: Some("STANDARD_IA".into()), ..base() };
        let c = Config::from_settings(&local, &[]).unwrap();
        assert!(matches!(c.store, StoreConfig::Local { .. }));
        assert!(
            c.warnings().iter().any(|w| w.contains("S3_STORAGE_CLASS set, but the archive goes to a local directory"))
        );
    }

    #[test]
    fn encryption_settings_are_read_checked_and_the_customer_key_never_shown() {
        use base64::Engine;
        let sse = |s: Settings| match s3_store(&s) {
            StoreConfig::S3 { sse, .. } => sse,
            StoreConfig::Local { .. } => unreachable!(),
        };
        assert_eq!(sse(s3()), None);
        assert_eq!(sse(Settings { s3_sse: Some("AES256".into()), ..s3() }), Some(Sse::S3));
        let kms = Settings { s3_sse: Some("aws:kms:dsse".into()), s3_sse_kms_key_id: Some("alias/x".into()), ..s3() };
        assert_eq!(sse(kms), Some(Sse::Kms { dual: true, key_id: Some("alias/x".into()) }));
        assert!(err(Settings { s3_sse: Some("aes256".into()), ..s3() }).starts_with("S3_SSE:"));
        let stray = Settings { s3_sse: Some("AES256".into()), s3_sse_kms_key_id: Some("k".into()), ..s3() };
        assert!(err(stray).starts_with("S3_SSE_KMS_KEY_ID:"));

        let dir = tempfile::tempdir().unwrap();
        let key = [7u8; 32];
        let b64 = base64::engine::general_purpose::STANDARD.encode(key);
        std::fs::write(dir.path().join("raw"), key).unwrap();
        std::fs::write(dir.path().join("b64"), format!("{b64}\n")).unwrap();
        std::fs::write(dir.path().join("short"), [7u8; 16]).unwrap();
        let file =
            |name: &str| Settings { s3_sse_c_key_file: Some(dir.path().join(name).display().to_string()), ..s3() };
        for name in ["raw", "b64"] {
            assert_eq!(sse(file(name)), Some(Sse::CustomerKey(Secret(b64.clone()))), "{name}");
        }
        let summary = Config::from_settings(&file("raw"), &[]).unwrap().summary();
        assert!(summary.contains("sse=SSE-C key=***") && !summary.contains(&b64), "{summary}");
        assert!(!format!("{:?}", sse(file("raw"))).contains(&b64));
        let short = err(file("short"));
        assert!(short.starts_with("S3_SSE_C_KEY_FILE:") && short.contains("256-bit"), "{short}");
        assert!(err(file("missing")).starts_with("S3_SSE_C_KEY_FILE: cannot read"));
        let both = Settings { s3_sse: Some("AES256".into()), ..file("raw") };
        assert!(err(both).contains("not both"));
        // The key goes with every request: not in clear to another host.
        let at = |url: &str| Settings { s3_endpoint_url: Some(url.into()), ..file("raw") };
        assert!(err(at("http://minio.lab:9000")).contains("https://"));
        for ok in ["https://minio.lab:9000", "http://127.0.0.1:9000", "http://localhost:9000", "http://[::1]:9000"] {
            assert!(matches!(sse(at(ok)), Some(Sse::CustomerKey(_))), "{ok}");
        }
    }

    #[test]
    fn archive_classes_are_refused_with_write_once_and_said_to_need_a_restore() {
        let glacier = Settings { s3_storage_class: Some("DEEP_ARCHIVE".into()), ..s3() };
        let c = Config::from_settings(&glacier, &[]).unwrap();
        assert!(c.warnings().iter().any(|w| w.contains("cannot be read until restored")));
        let once = Settings { s3_conditional_put: Some("true".into()), ..glacier };
        assert!(err(once).starts_with("S3_STORAGE_CLASS: DEEP_ARCHIVE objects cannot be read"));
        let ir =
            Settings { s3_storage_class: Some("GLACIER_IR".into()), s3_conditional_put: Some("true".into()), ..s3() };
        assert!(Config::from_settings(&ir, &[]).unwrap().warnings().is_empty());
    }

    #[test]
    fn spool_sizes_with_units() {
        let c = Config::from_settings(&Settings { spool_max_bytes: Some("2GiB".into()), ..base() }, &[]).unwrap();
        assert_eq!(c.spool_limits.max_bytes, 2 << 30);
        let c = Config::from_settings(&Settings { spool_max_bytes: Some("500 MB".into()), ..base() }, &[]).unwrap();
        assert_eq!(c.spool_limits.max_bytes, 500_000_000);
    }

    #[test]
    fn store_options_are_checked() {
        assert!(
            err(Settings { s3_ca_file: Some("/nonexistent/ca.pem".into()), ..s3() })
                .starts_with("S3_CA_FILE: cannot read")
        );
        assert!(err(Settings { s3_ca_file: Some("Cargo.toml".into()), ..s3() }).starts_with("S3_CA_FILE:"));
        assert!(err(Settings { s3_conditional_put: Some("maybe".into()), ..s3() }).starts_with("S3_CONDITIONAL_PUT:"));
        let c = Config::from_settings(&Settings { s3_conditional_put: Some("TRUE".into()), ..s3() }, &[]).unwrap();
        assert!(c.conditional_put);
        assert!(!Config::from_settings(&s3(), &[]).unwrap().conditional_put);
    }

    #[test]
    fn separator_escapes_and_empty() {
        let c = Config::from_settings(&Settings { s3_object_separator: Some("\\r\\n".into()), ..base() }, &[]).unwrap();
        assert_eq!(&c.layout.separator[..], b"\r\n");
        let c = Config::from_settings(&Settings { s3_object_separator: Some(String::new()), ..base() }, &[]).unwrap();
        assert!(c.layout.separator.is_empty());
    }

    #[test]
    fn kafka_properties_pass_through() {
        let env = vec![
            ("KAFKA_PROPERTY_SECURITY_PROTOCOL".to_string(), "SASL_SSL".to_string()),
            ("KAFKA_PROPERTY_SASL_PASSWORD".to_string(), "hunter2".to_string()),
        ];
        let s = Settings { kafka_property: vec!["fetch.max.bytes=1048576".into()], ..base() };
        let c = Config::from_settings(&s, &env).unwrap();
        assert_eq!(
            c.kafka_properties,
            [
                ("sasl.password".to_string(), "hunter2".to_string()),
                ("security.protocol".to_string(), "SASL_SSL".to_string()),
                ("fetch.max.bytes".to_string(), "1048576".to_string())
            ]
        );
        assert!(!c.summary().contains("hunter2"));
    }
}
