//! Topic id: notices, at start-up, a topic deleted and created again since the archiver last ran
//! with this SPOOL_DIR.
//!
//! Kafka gives a topic a random id when it is created; deleted and created again under the same
//! name, it gets another, and its offsets start again from 0. The archive's keys hold only the
//! topic's name and the offset, so the new records are filed beside the old ones (and replace an
//! older object of the same offset in the same hour folder). [`check`] asks Kafka for each
//! configured topic's id and compares it with the id recorded in SPOOL_DIR under
//! `topic-ids/<topic>` (kept out of the bucket, which holds what the Kafka Connect deployment
//! wrote and nothing else): none recorded, it is recorded; another one, the
//! archiver says so (an error in the log and on `/status`) and records the new id, so that it is
//! said once. (A topic deleted and created again while the archiver runs is noticed by the
//! consumer, when the partition's offsets go back.)
//!
//! The check never stops the archiver from starting: a Kafka that gives no id (a broker before
//! Kafka 2.8, DescribeTopics refused, the broker down: it gives up after [`KAFKA_TIMEOUT`]), or a
//! store that fails, skips it until the next start.

use std::ffi::{CStr, CString, c_char};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use rdkafka::ClientContext;
use rdkafka::bindings as rd;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};

use crate::pipeline::status::Status;
use crate::topics::TopicSelection;

/// How long Kafka gets to give the topics' ids.
pub const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the store gets for each read or write of a recorded id.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TopicIdError {
    #[error("cannot make a Kafka client: {0}")]
    Client(#[from] KafkaError),
    #[error("Kafka did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("Kafka answered DescribeTopics with {0}")]
    Kafka(String),
    #[error("cannot read {key}: {source}")]
    Read { key: String, source: object_store::Error },
    #[error("cannot write {key}: {source}")]
    Write { key: String, source: object_store::Error },
    #[error("{0} did not answer within {STORE_TIMEOUT:?}")]
    StoreTimeout(String),
}

/// What the record said about a topic's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// No id was recorded: this one now is.
    Recorded,
    /// The recorded id is the topic's.
    Same,
    /// Another id was recorded (now replaced): the topic was deleted and created again.
    Changed { was: String },
}

/// Where the id of `topic` is recorded, in the store [`check`] is given (a directory in SPOOL_DIR).
pub fn key(topic: &str) -> String {
    format!("topic-ids/{topic}")
}

/// Compares the id in Kafka of each configured topic (KAFKA_TOPIC's names and the topics its
/// patterns match now; one matched later is recorded at the next start) with the one recorded in
/// SPOOL_DIR, says when a topic was deleted and created again, and records the current ids. Returns the topics that were:
/// the records of theirs still in the spool are of the old topic ([`crate::pipeline::commit::Ledger::topic_recreated`]).
/// Logs what it cannot do and returns: it never keeps the archiver from starting.
pub async fn check(
    client: &ClientConfig,
    topics: &TopicSelection,
    store: Arc<dyn ObjectStore>,
    status: &Status,
) -> Vec<String> {
    let (client, names) = (client.clone(), topics.clone());
    let ids = match tokio::task::spawn_blocking(move || kafka_ids(&client, &names, KAFKA_TIMEOUT)).await {
        Ok(Ok(ids)) => ids,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "cannot ask Kafka for the topics' ids; the check that no topic was deleted and created again is skipped");
            return Vec::new();
        }
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let mut known = Vec::new();
    for (topic, id) in ids {
        match id {
            Ok(Some(id)) => known.push((topic, id)),
            Ok(None) => tracing::debug!(
                topic = %topic,
                "Kafka gave no topic id (a broker before Kafka 2.8?); the check that the topic was not deleted and created again is skipped"
            ),
            Err(e) => {
                tracing::debug!(topic = %topic, error = %e, "Kafka gave no topic id; the check that the topic was not deleted and created again is skipped")
            }
        }
    }
    compare_all(store.as_ref(), &known, status).await
}

/// [`compare`] for each `(topic, id)`, saying what it found. The first store failure stops it: the
/// store is down or refuses this key, and one warning says so.
async fn compare_all(store: &dyn ObjectStore, ids: &[(String, String)], status: &Status) -> Vec<String> {
    let mut recreated = Vec::new();
    for (topic, id) in ids {
        match compare(store, topic, id).await {
            Ok(Outcome::Recorded) => {
                tracing::info!(topic = %topic, topic_id = %id, key = key(topic), "recorded the topic's id")
            }
            Ok(Outcome::Same) => {
                tracing::debug!(topic = %topic, topic_id = %id, "the topic's id is the one recorded")
            }
            Ok(Outcome::Changed { was }) => {
                status.error(None, changed_message(topic, &was, id));
                tracing::error!(topic = %topic, recorded_topic_id = %was, topic_id = %id,
                    "a topic was deleted and created again since the archiver last ran; {CONSEQUENCES}");
                recreated.push(topic.clone());
            }
            Err(e) => {
                tracing::warn!(topic = %topic, error = %e,
                    "cannot read or record the topic's id in SPOOL_DIR; the check that no topic was deleted and created again is skipped until the next start");
                break;
            }
        }
    }
    recreated
}

/// What follows from a topic deleted and created again, for the log and `/status`.
const CONSEQUENCES: &str = "its offsets start again, and its records are archived beside the old ones: a record filed \
    in the same hour folder as an older one at the same offset replaces it unless S3_CONDITIONAL_PUT=true; \
    kafka-s3-archiver verify reports the offsets archived twice";

/// What `/status` says about a topic deleted and created again.
fn changed_message(topic: &str, was: &str, now: &str) -> String {
    format!(
        "topic {topic} was deleted and created again (topic id {was}, now {now}) since the archiver last ran; \
         {CONSEQUENCES}"
    )
}

/// Compares `id` with the id recorded for `topic`, and records `id` unless it was already.
pub async fn compare(store: &dyn ObjectStore, topic: &str, id: &str) -> Result<Outcome, TopicIdError> {
    let k = key(topic);
    let path = Path::from(k.as_str());
    let recorded = match timed(&k, async { store.get(&path).await?.bytes().await }).await? {
        Ok(body) => Some(String::from_utf8_lossy(&body).trim().to_string()).filter(|s| !s.is_empty()),
        Err(object_store::Error::NotFound { .. }) => None,
        Err(source) => return Err(TopicIdError::Read { key: k, source }),
    };
    let outcome = match recorded {
        Some(was) if was == id => return Ok(Outcome::Same),
        Some(was) => Outcome::Changed { was },
        None => Outcome::Recorded,
    };
    match timed(&k, store.put(&path, PutPayload::from(format!("{id}\n")))).await? {
        Ok(_) => Ok(outcome),
        Err(source) => Err(TopicIdError::Write { key: k, source }),
    }
}

async fn timed<T>(key: &str, f: impl Future<Output = T>) -> Result<T, TopicIdError> {
    tokio::time::timeout(STORE_TIMEOUT, f).await.map_err(|_| TopicIdError::StoreTimeout(key.to_string()))
}

/// A topic id as Kafka's tools print it (`kafka-topics.sh --describe`): its 16 bytes in URL-safe
/// base64 without padding. The all-zero id is Kafka's "no id".
pub fn format_id(most: i64, least: i64) -> Option<String> {
    if most == 0 && least == 0 {
        return None;
    }
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&most.to_be_bytes());
    bytes[8..].copy_from_slice(&least.to_be_bytes());
    Some(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// librdkafka's log lines of this short-lived client go to the debug level: the consumer's own
/// client reports the same broker problems.
struct Quiet;

impl ClientContext for Quiet {
    fn log(&self, _level: RDKafkaLogLevel, fac: &str, message: &str) {
        tracing::debug!(target: "librdkafka", "topic id client: {fac} {message}");
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::debug!(target: "librdkafka", "topic id client: {error}: {reason}");
    }
}

impl ConsumerContext for Quiet {}

/// Frees a librdkafka object when dropped, on every path.
struct Owned<T>(*mut T, unsafe extern "C" fn(*mut T));

impl<T> Drop for Owned<T> {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: the pointer came from the librdkafka constructor that `self.1` is the
            // destructor of, and nothing else frees it.
            unsafe { (self.1)(self.0) }
        }
    }
}

/// A topic's id as Kafka gave it: `Ok(None)` when Kafka gives none (the all-zero id), `Err` with
/// Kafka's error for that topic (it does not exist, it may not be described).
type Answer = (String, Result<Option<String>, String>);

/// Each topic's id, from Kafka's DescribeTopics (rust-rdkafka has no API for it). Blocks for at
/// most about `timeout`.
fn kafka_ids(
    client: &ClientConfig,
    selection: &TopicSelection,
    timeout: Duration,
) -> Result<Vec<Answer>, TopicIdError> {
    let consumer: BaseConsumer<Quiet> = crate::kafka::lookup_config(client).create_with_context(Quiet)?;
    let topics = crate::kafka::selected_topics(&consumer, selection, timeout)?;
    if topics.is_empty() {
        return Ok(Vec::new());
    }
    // Live until `consumer` is dropped, at the end of this function: after every guard below,
    // since they are declared after it.
    let rk = consumer.client().native_ptr();
    // Topic names were checked against Kafka's rule (letters, digits, '.', '_', '-'): no NUL.
    let names: Vec<CString> = topics.iter().filter_map(|t| CString::new(t.as_str()).ok()).collect();
    let mut name_ptrs: Vec<*const c_char> = names.iter().map(|n| n.as_ptr()).collect();
    let timeout_ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `rk` is a live client handle; each new object is owned by its guard, which frees it
    // once. `name_ptrs` holds `name_ptrs.len()` NUL-terminated strings (`names`, alive here), which
    // librdkafka copies.
    let (queue, options, collection) = unsafe {
        (
            Owned(rd::rd_kafka_queue_new(rk), rd::rd_kafka_queue_destroy),
            Owned(
                rd::rd_kafka_AdminOptions_new(rk, rd::rd_kafka_admin_op_t::RD_KAFKA_ADMIN_OP_DESCRIBETOPICS),
                rd::rd_kafka_AdminOptions_destroy,
            ),
            Owned(
                rd::rd_kafka_TopicCollection_of_topic_names(name_ptrs.as_mut_ptr(), name_ptrs.len()),
                rd::rd_kafka_TopicCollection_destroy,
            ),
        )
    };
    if queue.0.is_null() || options.0.is_null() || collection.0.is_null() {
        return Err(TopicIdError::Kafka("librdkafka could not allocate the request".into()));
    }
    let mut errstr = [0 as c_char; 256];
    // SAFETY: every pointer is live and not null; `errstr` is writable for its length. librdkafka
    // copies the collection and the options into its request, so their guards may free them at
    // any time. The polled event is owned by its guard. An answer that comes after `queue` is freed
    // (the poll gave up) is dropped by librdkafka.
    let event = unsafe {
        // Refused only for a timeout out of range, and 5 s is not.
        rd::rd_kafka_AdminOptions_set_request_timeout(options.0, timeout_ms, errstr.as_mut_ptr(), errstr.len());
        rd::rd_kafka_DescribeTopics(rk, collection.0, options.0, queue.0);
        // The request times out by itself; the extra second covers librdkafka's own timer.
        Owned(rd::rd_kafka_queue_poll(queue.0, timeout_ms.saturating_add(1000)), rd::rd_kafka_event_destroy)
    };
    if event.0.is_null() {
        return Err(TopicIdError::NoAnswer(timeout));
    }
    // SAFETY: `event` is live and not null, and owns everything read from it (the result, its
    // topic descriptions, their names, errors and ids), which is copied out before it is freed:
    // `read_answers` returns owned values only.
    unsafe { read_answers(event.0) }
}

/// The answers in a DescribeTopics result event.
///
/// # Safety
///
/// `event` must be a live event polled from the queue of a DescribeTopics request.
unsafe fn read_answers(event: *mut rd::rd_kafka_event_t) -> Result<Vec<Answer>, TopicIdError> {
    // SAFETY: as the caller guarantees; each pointer librdkafka returns is checked for null before
    // it is read, and `descriptions` has `count` elements.
    unsafe {
        if rd::rd_kafka_event_type(event) != rd::RD_KAFKA_EVENT_DESCRIBETOPICS_RESULT {
            return Err(TopicIdError::Kafka(format!("an unexpected event ({})", rd::rd_kafka_event_type(event))));
        }
        let err = rd::rd_kafka_event_error(event);
        if err != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
            let text = rd::rd_kafka_event_error_string(event);
            let text = if text.is_null() { String::new() } else { CStr::from_ptr(text).to_string_lossy().into_owned() };
            return Err(TopicIdError::Kafka(format!("{}: {text}", RDKafkaErrorCode::from(err))));
        }
        let result = rd::rd_kafka_event_DescribeTopics_result(event);
        if result.is_null() {
            return Err(TopicIdError::Kafka("an event without a result".into()));
        }
        let mut count = 0usize;
        let descriptions = rd::rd_kafka_DescribeTopics_result_topics(result, &mut count);
        let mut out = Vec::with_capacity(count);
        for i in 0..if descriptions.is_null() { 0 } else { count } {
            let d = *descriptions.add(i);
            let name = if d.is_null() { std::ptr::null() } else { rd::rd_kafka_TopicDescription_name(d) };
            if name.is_null() {
                continue;
            }
            let name = CStr::from_ptr(name).to_string_lossy().into_owned();
            let error = rd::rd_kafka_TopicDescription_error(d);
            let code = if error.is_null() {
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR
            } else {
                rd::rd_kafka_error_code(error)
            };
            if code != RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR {
                out.push((name, Err(RDKafkaErrorCode::from(code).to_string())));
                continue;
            }
            let id = rd::rd_kafka_TopicDescription_topic_id(d);
            let id = if id.is_null() {
                None
            } else {
                format_id(rd::rd_kafka_Uuid_most_significant_bits(id), rd::rd_kafka_Uuid_least_significant_bits(id))
            };
            out.push((name, Ok(id)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;

    use super::*;
    use crate::pipeline::spool::Spool;

    const OLD: &str = "AAAAAAAAAAAAAAAAAAAAAQ";
    const NEW: &str = "3q2-796tvu_erb7v3q2-7w";

    async fn recorded(store: &InMemory, topic: &str) -> Option<String> {
        match store.get(&Path::from(key(topic))).await {
            Ok(r) => Some(String::from_utf8(r.bytes().await.unwrap().to_vec()).unwrap()),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => panic!("{e}"),
        }
    }

    /// The error `/status` shows, if any.
    fn status_error(status: &Status) -> Option<String> {
        let spool_dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(spool_dir.path(), crate::SPOOL_CACHE_BYTES).unwrap();
        status.report(&[], &spool, None).last_error.map(|n| n.message)
    }

    #[test]
    fn ids_read_as_kafka_prints_them() {
        assert_eq!(format_id(0, 1).as_deref(), Some(OLD), "Kafka's METADATA_TOPIC_ID");
        assert_eq!(format_id(0xdead_beef_dead_beef_u64 as i64, 0xdead_beef_dead_beef_u64 as i64).as_deref(), Some(NEW));
        assert_eq!(format_id(0, 0), None, "the all-zero id is no id");
    }

    #[tokio::test]
    async fn an_absent_id_is_recorded_without_an_error() {
        let (store, status) = (InMemory::new(), Status::new());
        compare_all(&store, &[("t".into(), OLD.into())], &status).await;
        assert_eq!(recorded(&store, "t").await.as_deref(), Some(format!("{OLD}\n").as_str()));
        assert_eq!(status_error(&status), None);
    }

    #[tokio::test]
    async fn the_same_id_is_no_problem() {
        let (store, status) = (InMemory::new(), Status::new());
        assert_eq!(compare(&store, "t", OLD).await.unwrap(), Outcome::Recorded);
        compare_all(&store, &[("t".into(), OLD.into())], &status).await;
        assert_eq!(compare(&store, "t", OLD).await.unwrap(), Outcome::Same);
        assert_eq!(status_error(&status), None);
    }

    #[tokio::test]
    async fn another_id_is_reported_then_replaced() {
        let (store, status) = (InMemory::new(), Status::new());
        compare(&store, "t", OLD).await.unwrap();
        compare(&store, "other", OLD).await.unwrap();
        compare_all(&store, &[("other".into(), OLD.into()), ("t".into(), NEW.into())], &status).await;
        let error = status_error(&status).expect("an error on /status");
        assert!(
            error.starts_with(&format!("topic t was deleted and created again (topic id {OLD}, now {NEW})")),
            "{error}"
        );
        assert!(error.contains("S3_CONDITIONAL_PUT=true"), "{error}");
        assert_eq!(recorded(&store, "t").await.as_deref(), Some(format!("{NEW}\n").as_str()), "the new id is recorded");
        assert_eq!(recorded(&store, "other").await.as_deref(), Some(format!("{OLD}\n").as_str()));
        // Said once: the next start finds the new id.
        assert_eq!(compare(&store, "t", NEW).await.unwrap(), Outcome::Same);
    }

    #[tokio::test]
    async fn a_store_failure_stops_the_check_without_an_error_on_status() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the ids' folder should be: every read and write of an id fails.
        std::fs::write(dir.path().join("topic-ids"), b"not a folder").unwrap();
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        assert!(compare(&store, "t", OLD).await.is_err());
        let status = Status::new();
        compare_all(&store, &[("t".into(), OLD.into()), ("u".into(), OLD.into())], &status).await;
        assert_eq!(status_error(&status), None);
    }
}
