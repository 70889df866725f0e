//! Check: `kafka-s3-archiver check`, the preflight check of a configuration.
//!
//! It tries what the archiver will need, without consuming anything or touching the archive:
//! the spool directory is writable and has room, REST_PORT is free, the brokers answer with the
//! metadata of every topic (and the group's committed offsets), and the bucket takes a probe
//! object, gives it back and deletes it. Each check yields one [`Line`]: OK, or the problem
//! and what to change.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode};
use rdkafka::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::{Config, StoreConfig, proxy_shown};
use crate::exit::Exit;
use crate::store::{error_reason, fix_for};

/// How long the brokers and the store get to answer each request.
const TIMEOUT: Duration = Duration::from_secs(15);

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Worth knowing, but the archiver will run.
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub outcome: Outcome,
    pub what: String,
    pub detail: String,
}

impl Line {
    /// One line each: a store's error body (XML) can hold line breaks.
    fn new(outcome: Outcome, what: impl Into<String>, detail: impl Into<String>) -> Line {
        let detail: String = detail.into();
        Line {
            outcome,
            what: what.into(),
            detail: detail.split(['\r', '\n']).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" "),
        }
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.outcome {
            Outcome::Ok => "OK",
            Outcome::Warn => "WARN",
            Outcome::Fail => "FAIL",
        };
        write!(f, "{tag:<5} {}: {}", self.what, self.detail)
    }
}

/// `kafka-s3-archiver check`: each check's outcome on stdout as soon as it is known; exit status
/// 1 when one failed.
pub fn run(config: &Config) -> Exit {
    println!("kafka-s3-archiver {} check", env!("CARGO_PKG_VERSION"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("start the tokio runtime");
    let lines = runtime.block_on(checks(config, |line| println!("{line}")));
    if passed(&lines) {
        println!("all checks passed: start the archiver with `kafka-s3-archiver`");
        Exit::Done
    } else {
        let n = lines.iter().filter(|l| l.outcome == Outcome::Fail).count();
        println!("{n} problem(s): fix them and run `kafka-s3-archiver check` again");
        Exit::Failed
    }
}

/// Runs every check, calling `report` with each line as soon as it is known.
pub async fn checks(config: &Config, mut report: impl FnMut(&Line)) -> Vec<Line> {
    let mut lines = Vec::new();
    let mut add = |line: Line| {
        report(&line);
        lines.push(line);
    };
    add(Line::new(Outcome::Ok, "configuration", describe(config)));
    add(spool_dir(config));
    add(rest_port(config).await);
    let kafka_config = config.clone();
    match tokio::task::spawn_blocking(move || kafka(&kafka_config)).await {
        Ok(kafka_lines) => kafka_lines.into_iter().for_each(&mut add),
        Err(e) => add(Line::new(Outcome::Fail, "Kafka", format!("the check panicked: {e}"))),
    }
    for line in store(config).await {
        add(line);
    }
    lines
}

fn describe(config: &Config) -> String {
    let store = match &config.store {
        StoreConfig::S3 { bucket, endpoint, proxy, credentials, .. } => format!(
            "S3 bucket {bucket} at {}{} ({} {})",
            endpoint.as_deref().unwrap_or("Amazon S3"),
            proxy.as_ref().map_or(String::new(), |p| format!(" through proxy {}", proxy_shown(p.url.expose()))),
            credentials.shown(),
            config.store.object_settings().unwrap_or_default()
        ),
        StoreConfig::Local { dir, bucket } => format!("local directory {}", dir.join(bucket).display()),
    };
    format!("topics {}, group {}, {store}, format {}", config.topics, config.group_id, config.format.describe())
}

fn spool_dir(config: &Config) -> Line {
    let dir = &config.spool_dir;
    let what = format!("spool directory {}", dir.display());
    let probe = dir.join(".kafka-s3-archiver-check");
    let writable = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(&probe, b"probe\n"))
        .and_then(|()| std::fs::remove_file(&probe));
    if let Err(e) = writable {
        return Line::new(
            Outcome::Fail,
            what,
            format!("cannot write there ({e}): set SPOOL_DIR to a directory on local disk this user may write"),
        );
    }
    let free = fs4::available_space(dir).unwrap_or(u64::MAX);
    let min = config.spool_limits.min_free_bytes;
    let size = |b: u64| bytesize::ByteSize(b).display().iec().to_string();
    if free < min {
        return Line::new(
            Outcome::Fail,
            what,
            format!(
                "only {} free, below SPOOL_MIN_FREE_BYTES ({}): consumption would stay paused; free space or move SPOOL_DIR",
                size(free),
                size(min)
            ),
        );
    }
    Line::new(Outcome::Ok, what, format!("writable, {} free", size(free)))
}

async fn rest_port(config: &Config) -> Line {
    let what = format!("REST port {}", config.http_addr);
    match tokio::net::TcpListener::bind(config.http_addr).await {
        Ok(_) => Line::new(Outcome::Ok, what, "free"),
        Err(e) => Line::new(
            Outcome::Fail,
            what,
            format!("cannot listen ({e}): is an archiver or Kafka Connect still running? Stop it or set REST_PORT"),
        ),
    }
}

/// Keeps librdkafka's last error instead of logging it: the check prints it in its own line.
#[derive(Default)]
struct Capture {
    last_error: Mutex<Option<String>>,
}

impl ClientContext for Capture {
    fn log(&self, level: RDKafkaLogLevel, _fac: &str, message: &str) {
        if (level as i32) <= (RDKafkaLogLevel::Error as i32) {
            *self.last_error.lock().expect("capture lock") = Some(message.to_string());
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        *self.last_error.lock().expect("capture lock") = Some(format!("{error}: {reason}"));
    }
}

impl ConsumerContext for Capture {}

fn kafka(config: &Config) -> Vec<Line> {
    let brokers = format!("Kafka brokers {}", config.brokers.join(","));
    let consumer: BaseConsumer<Capture> = match crate::kafka::client_config(config)
        .map_err(|e| e.to_string())
        .and_then(|c| c.create_with_context(Capture::default()).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => return vec![Line::new(Outcome::Fail, brokers, e)],
    };
    let mut lines = Vec::new();
    let mut topics = config.topics.names();
    // With patterns, every topic's metadata: the topics checked below are looked up in it, not
    // asked for again one by one.
    let mut all_metadata = None;
    if config.topics.has_patterns() {
        let metadata = match consumer.fetch_metadata(None, TIMEOUT) {
            Ok(m) => m,
            Err(e) => return vec![no_answer(&consumer, brokers, e)],
        };
        lines.push(Line::new(Outcome::Ok, brokers.clone(), format!("{} broker(s) answered", metadata.brokers().len())));
        let all = config.topics.resolve(metadata.topics().iter().map(|t| t.name()));
        let matched: Vec<&str> = all.iter().filter(|t| !topics.contains(t)).map(String::as_str).collect();
        let what = format!("topics matching {}", config.topics);
        lines.push(if matched.is_empty() {
            Line::new(
                Outcome::Warn,
                what,
                "none yet: a topic created later that matches is archived within 10 s of its creation",
            )
        } else {
            Line::new(Outcome::Ok, what, format!("{} topic(s): {}", matched.len(), matched.join(", ")))
        });
        topics = all;
        all_metadata = Some(metadata);
    }
    for topic in &topics {
        // Without patterns, and for a named topic missing from the whole list, the topic is asked
        // for alone, so that the brokers say why one is missing (it does not exist, or this client
        // may not see it).
        let single;
        let found = match all_metadata.as_ref().and_then(|m| m.topics().iter().find(|t| t.name() == topic)) {
            Some(t) => Some(t),
            None => {
                single = match consumer.fetch_metadata(Some(topic), TIMEOUT) {
                    Ok(m) => m,
                    Err(e) => return vec![no_answer(&consumer, brokers, e)],
                };
                if lines.is_empty() {
                    let answered = format!("{} broker(s) answered", single.brokers().len());
                    lines.push(Line::new(Outcome::Ok, brokers.clone(), answered));
                }
                single.topics().iter().find(|t| t.name() == topic)
            }
        };
        let what = format!("topic {topic}");
        let Some(t) = found else {
            lines.push(Line::new(Outcome::Fail, what, "not in the brokers' answer: check KAFKA_TOPIC"));
            continue;
        };
        if let Some(err) = t.error() {
            let err = rdkafka::types::RDKafkaErrorCode::from(err);
            let detail = if err == rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition {
                "does not exist: create it, or correct KAFKA_TOPIC".to_string()
            } else {
                format!("the brokers answered {err}: check the topic's ACLs for this client")
            };
            lines.push(Line::new(Outcome::Fail, what, detail));
            continue;
        }
        lines.push(Line::new(Outcome::Ok, what, group_position(&consumer, config, topic, t.partitions().len())));
    }
    lines
}

/// The line that says the brokers did not answer, with librdkafka's reason when it gave one.
fn no_answer(consumer: &BaseConsumer<Capture>, brokers: String, e: KafkaError) -> Line {
    // librdkafka's own errors (connection refused, TLS, SASL) arrive as events.
    let _ = consumer.poll(Duration::from_millis(200));
    let cause = consumer.context().last_error.lock().expect("capture lock").take();
    Line::new(
        Outcome::Fail,
        brokers,
        format!(
            "no answer ({e}{}): check BROKER_HOSTNAME (host:port), that the brokers' advertised \
             listeners resolve from here, and the KAFKA_PROPERTY_SECURITY_* settings",
            cause.map(|c| format!("; {c}")).unwrap_or_default()
        ),
    )
}

/// Where the group stands on a topic, for the topic's line.
fn group_position(consumer: &BaseConsumer<Capture>, config: &Config, topic: &str, partitions: usize) -> String {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition(topic, p);
    }
    let committed = match consumer.committed_offsets(tpl, TIMEOUT) {
        Ok(c) => c.elements().iter().filter(|e| matches!(e.offset(), Offset::Offset(_))).count(),
        Err(e) => return format!("{partitions} partition(s); the group's offsets cannot be read ({e})"),
    };
    let start = if committed == 0 {
        "nothing committed yet: the archiver starts from the oldest record"
    } else {
        "the archiver resumes from the committed offsets"
    };
    format!(
        "{partitions} partition(s); group {} has committed offsets for {committed} of them ({start})",
        config.group_id
    )
}

async fn store(config: &Config) -> Vec<Line> {
    let what = match &config.store {
        StoreConfig::S3 { bucket, .. } => format!("bucket {bucket}"),
        StoreConfig::Local { dir, bucket } => format!("archive directory {}", dir.join(bucket).display()),
    };
    let store = match crate::store::build(&config.store) {
        Ok(s) => s,
        Err(e) => return vec![Line::new(Outcome::Fail, what, e.to_string())],
    };
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
    let path = Path::from(format!(".kafka-s3-archiver/check-{}-{stamp}", std::process::id()));
    let body = format!("kafka-s3-archiver check probe, written {stamp}; safe to delete\n");
    // The probe is written as the archive's objects are: a store without the storage class, or
    // that refuses tags, says no here.
    let put = config.store.object_settings().filter(|_| config.store.sets_object_settings());
    let problem = |step: &str, e: &object_store::Error| {
        // The store's answer names what it refused (InvalidStorageClass, InvalidTag, a KMS key
        // the account may not use, ...): only then are the object's settings the fix.
        let text = e.to_string();
        let refused_settings = ["StorageClass", "Tag", "KMS", "Kms", "kms", "ncryption", "Digest", "hecksum"]
            .iter()
            .any(|w| text.contains(w));
        let settings = put.as_ref().filter(|_| refused_settings).map(|put| {
            format!("{e}: the store refused the object's settings ({put}): check S3_STORAGE_CLASS (a class this store has), S3_OBJECT_TAGS (s3:PutObjectTagging), S3_SSE / S3_SSE_KMS_KEY_ID (kms:GenerateDataKey, kms:Decrypt), S3_CHECKSUM (an algorithm this store checks)")
        });
        let fix = settings.or_else(|| fix_for(error_reason(e)).map(str::to_string));
        let fix = fix.unwrap_or_else(|| {
            format!(
                "{e}: check S3_ENDPOINT_URL (reachable from here?), S3_REGION{}",
                match config.store {
                    StoreConfig::S3 { proxy: Some(_), .. } => {
                        ", S3_PROXY_URL (the proxy runs and may reach the store?), and S3_CA_FILE for HTTPS with a private CA"
                    }
                    StoreConfig::S3 { .. } => {
                        ", S3_CA_FILE for HTTPS with a private CA, and HTTPS_PROXY / NO_PROXY if a proxy stands between"
                    }
                    StoreConfig::Local { .. } => "",
                }
            )
        });
        Line::new(Outcome::Fail, what.clone(), format!("cannot {step} a probe object: {fix}"))
    };
    let timed = |step: &str| {
        Line::new(
            Outcome::Fail,
            what.clone(),
            format!("no answer within {}s to {step}: check S3_ENDPOINT_URL and the network", TIMEOUT.as_secs()),
        )
    };
    match tokio::time::timeout(TIMEOUT, store.put(&path, body.clone().into())).await {
        Err(_) => return vec![timed("write")],
        Ok(Err(e)) => return vec![problem("write", &e)],
        Ok(Ok(_)) => {}
    }
    let read = match tokio::time::timeout(TIMEOUT, async { store.get(&path).await?.bytes().await }).await {
        Err(_) => return vec![timed("read")],
        Ok(Err(e)) => return vec![problem("read back", &e)],
        Ok(Ok(bytes)) => bytes,
    };
    if read != body.as_bytes() {
        return vec![Line::new(
            Outcome::Fail,
            what,
            "the probe object came back with other bytes: is a proxy or a lifecycle rule rewriting objects?",
        )];
    }
    let with = put.as_ref().map(|put| format!(", written with {put}")).unwrap_or_default();
    let mut lines = vec![Line::new(
        Outcome::Ok,
        what.clone(),
        format!("wrote, read back and deleted the probe object {path}{with}"),
    )];
    if config.conditional_put {
        lines.push(match store.put_opts(&path, "overwrite".into(), PutMode::Create.into()).await {
            Err(object_store::Error::AlreadyExists { .. }) => Line::new(
                Outcome::Ok,
                "write-once (S3_CONDITIONAL_PUT)",
                "the store refuses to overwrite an object (If-None-Match)",
            ),
            Ok(_) => Line::new(
                Outcome::Fail,
                "write-once (S3_CONDITIONAL_PUT)",
                "the store overwrote the probe object: it ignores If-None-Match; set S3_CONDITIONAL_PUT=false",
            ),
            Err(e) => {
                Line::new(Outcome::Fail, "write-once (S3_CONDITIONAL_PUT)", format!("a conditional write failed: {e}"))
            }
        });
    }
    if let Err(e) = store.delete(&path).await {
        // The archiver never deletes, so a key without delete permission is fine.
        lines[0] = Line::new(
            Outcome::Warn,
            what,
            format!(
                "wrote and read back the probe object, but cannot delete it ({}): remove {path} by hand",
                error_reason(&e)
            ),
        );
    }
    lines
}

/// Whether a check found a problem.
pub fn passed(lines: &[Line]) -> bool {
    lines.iter().all(|l| l.outcome != Outcome::Fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn a_check_is_one_line_whatever_its_detail_holds() {
        let line = Line::new(Outcome::Fail, "bucket b", "refused: <?xml?>\r\n<Error>\n<Code>X</Code></Error>\n");
        assert_eq!(line.to_string().lines().count(), 1, "{line}");
        assert!(line.to_string().ends_with("refused: <?xml?> <Error> <Code>X</Code></Error>"), "{line}");
    }

    fn config(dir: &std::path::Path, broker: &str) -> Config {
        let s = Settings {
            broker_hostname: Some(broker.into()),
            kafka_topic: Some("sensor".into()),
            archive_dir: Some(dir.join("data").display().to_string()),
            spool_dir: Some(dir.join("spool").display().to_string()),
            rest_port: Some("0".into()),
            rest_bind_address: Some("127.0.0.1".into()),
            ..Default::default()
        };
        Config::from_settings(&s, &[]).unwrap()
    }

    #[tokio::test]
    async fn a_local_store_and_spool_pass_and_an_unreachable_broker_fails_with_what_to_check() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens on port 1.
        let c = config(dir.path(), "127.0.0.1:1");
        let lines = checks(&c, |_| {}).await;
        let find = |what: &str| lines.iter().find(|l| l.what.starts_with(what)).unwrap_or_else(|| panic!("{lines:?}"));
        assert_eq!(find("spool directory").outcome, Outcome::Ok);
        assert_eq!(find("REST port").outcome, Outcome::Ok);
        assert_eq!(find("archive directory").outcome, Outcome::Ok, "{lines:?}");
        let kafka = find("Kafka brokers");
        assert_eq!(kafka.outcome, Outcome::Fail);
        assert!(kafka.detail.contains("BROKER_HOSTNAME"), "{kafka}");
        assert!(!passed(&lines));
        // The probe object is gone again; the archive holds nothing.
        let left: Vec<_> = walk(&dir.path().join("data"));
        assert!(left.is_empty(), "{left:?}");
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }
}
