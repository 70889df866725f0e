//! The Kafka client configuration, one for the daemon (its consumer and the topic-id check) and the
//! tools that read Kafka (`check`, `verify`): the archiver's own settings first, then the
//! KAFKA_PROPERTY_* pass-through, checked by librdkafka when the configuration is loaded so that a
//! misspelt property is a configuration error.

use std::time::Duration;

use bytes::Bytes;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::error::KafkaResult;
use rdkafka::message::BorrowedMessage;

use crate::config::{ArchiveFormat, Config, ConfigError};
use crate::record::Headers;
use crate::topics::TopicSelection;

/// librdkafka's fetch.max.bytes (its default is 50 MiB) and message.max.bytes (librdkafka wants
/// the first no smaller than the second) in the Connect format; see [`client_config`]. A record
/// larger than this is still fetched whole: a broker returns the first batch of a fetch whatever
/// its size (KIP-74).
const FETCH_MAX_BYTES: u64 = 256 << 10;
/// The same in the Parquet format, which archives tens of thousands of records a second where the
/// Connect format stores one or two thousand: fetches of 256 KiB held it to 18,000 records/s of
/// 1 KB from a backlog of 600,000 on 8 partitions, 8 MiB let it take 53,000 (`benches/results/`).
/// A fetch still takes at most 1 MiB of each partition (librdkafka's max.partition.fetch.bytes).
const BATCHED_FETCH_MAX_BYTES: u64 = 8 << 20;

/// How often librdkafka reads the cluster's metadata: a topic created after the start is picked up
/// within this (and a group rejoin).
pub const METADATA_REFRESH: Duration = Duration::from_secs(10);

/// The librdkafka configuration: the archiver's settings, then the pass-through properties.
pub fn client_config(config: &Config) -> Result<ClientConfig, ConfigError> {
    let fetch_max_bytes = match config.format {
        ArchiveFormat::Connect => FETCH_MAX_BYTES,
        ArchiveFormat::Parquet(_) => BATCHED_FETCH_MAX_BYTES,
    };
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", config.brokers.join(","))
        .set("group.id", &config.group_id)
        .set("client.id", "kafka-s3-archiver")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // As Kafka Connect's sink: a new group starts from the oldest record.
        .set("auto.offset.reset", "earliest")
        // librdkafka's defaults prefetch tens of MiB. In the Connect format the spool takes records
        // far faster than any store, so small fetches keep it fed; more is only memory, which comes
        // as a burst at each resume under backpressure. A queue of two fetches lets the next fetch
        // start while the consumer takes the last one (with one, librdkafka waits for the queue to
        // empty).
        .set("queued.max.messages.kbytes", ((2 * fetch_max_bytes) >> 10).to_string())
        .set("fetch.max.bytes", fetch_max_bytes.to_string())
        .set("message.max.bytes", fetch_max_bytes.to_string())
        // With a small queue, librdkafka waits this long once the queue is full before it fetches
        // again; its default (1 s) caps the consumer far below what the spool takes.
        .set("fetch.queue.backoff.ms", "10")
        // Also the rebalance timeout: how long a rebalance waits for a member that crashed. The
        // consumer polls at least every 10 s (a quarter of this when shorter), even under
        // backpressure, so a minute is ample (default 5).
        .set("max.poll.interval.ms", "60000")
        // The partitions' end offsets for /status and the lag gauge come with the statistics.
        .set("statistics.interval.ms", "5000")
        // How soon a topic created after the start is archived: librdkafka reads the topics of the
        // subscription again only this often (default 5 minutes). One metadata request.
        .set("topic.metadata.refresh.interval.ms", METADATA_REFRESH.as_millis().to_string());
    for (k, v) in &config.kafka_properties {
        c.set(k, v);
    }
    // librdkafka requires fetch.max.bytes >= message.max.bytes: when only one of them is given,
    // the other follows it past the default.
    let given =
        |name: &str| config.kafka_properties.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.parse::<u64>().ok());
    match (given("fetch.max.bytes"), given("message.max.bytes")) {
        (None, Some(m)) if m > fetch_max_bytes => {
            c.set("fetch.max.bytes", m.to_string());
        }
        (Some(f), None) if f < fetch_max_bytes => {
            c.set("message.max.bytes", f.to_string());
        }
        _ => {}
    }
    // Every property is checked by librdkafka itself, so a misspelt pass-through is an error now.
    c.create_native_config().map_err(|e| ConfigError {
        var: "KAFKA_PROPERTY_*".into(),
        message: format!("librdkafka rejected a property: {e}"),
    })?;
    Ok(c)
}

/// `client` for a consumer that only looks up metadata: not a group member (without group.id,
/// dropping it closes no group session) and without statistics.
pub fn lookup_config(client: &ClientConfig) -> ClientConfig {
    let mut config = client.clone();
    config.remove("group.id").remove("statistics.interval.ms");
    config
}

/// The topics `selection` takes in the cluster `consumer` talks to (see [`TopicSelection::resolve`]).
/// Without a pattern, the names as given and no request; with one, a metadata request for every
/// topic, which takes at most `timeout`.
pub fn selected_topics<C: ConsumerContext, K: Consumer<C>>(
    consumer: &K,
    selection: &TopicSelection,
    timeout: Duration,
) -> KafkaResult<Vec<String>> {
    if !selection.has_patterns() {
        return Ok(selection.names());
    }
    let metadata = consumer.fetch_metadata(None, timeout)?;
    Ok(selection.resolve(metadata.topics().iter().map(|t| t.name())))
}

/// A message's headers, as the archiver keeps them. A name that is not UTF-8 (Kafka's clients
/// write names as strings, but the protocol does not check) is kept with its bad bytes replaced:
/// rdkafka's own header reader panics on one, so librdkafka is asked directly.
pub fn headers(message: &BorrowedMessage<'_>) -> Headers {
    use rdkafka::bindings as rd;
    let mut native: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: the message pointer is valid while `message` is borrowed; librdkafka sets
    // `native` to the message's own header list (or leaves it null), valid as long.
    let err = unsafe { rd::rd_kafka_message_headers(message.ptr(), &mut native) };
    if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || native.is_null() {
        return Headers::new();
    }
    // SAFETY: `native` is the message's header list, read only.
    let count = unsafe { rd::rd_kafka_header_cnt(native) };
    let mut out = Headers::with_capacity(count);
    for i in 0..count {
        let (mut name, mut value, mut size) = (std::ptr::null(), std::ptr::null(), 0usize);
        // SAFETY: `i` is below the count; librdkafka points `name` at a NUL-terminated string
        // and `value` at `size` bytes (or null), both owned by the message.
        let err = unsafe { rd::rd_kafka_header_get_all(native, i, &mut name, &mut value, &mut size) };
        if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR || name.is_null() {
            continue;
        }
        // SAFETY: as above.
        let name = unsafe { std::ffi::CStr::from_ptr(name) }.to_string_lossy().into_owned();
        let value = (!value.is_null())
            // SAFETY: as above.
            .then(|| Bytes::copy_from_slice(unsafe { std::slice::from_raw_parts(value.cast::<u8>(), size) }));
        out.push((name, value));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    #[test]
    fn tls_and_sasl_properties_are_accepted_by_librdkafka() {
        // librdkafka refuses these at configuration time when built without OpenSSL or SASL.
        for (protocol, mechanism) in
            [("SASL_SSL", "SCRAM-SHA-512"), ("SASL_SSL", "SCRAM-SHA-256"), ("SASL_PLAINTEXT", "PLAIN")]
        {
            let env = vec![
                ("KAFKA_PROPERTY_SECURITY_PROTOCOL".to_string(), protocol.to_string()),
                ("KAFKA_PROPERTY_SASL_MECHANISM".to_string(), mechanism.to_string()),
                ("KAFKA_PROPERTY_SASL_USERNAME".to_string(), "archiver".to_string()),
                ("KAFKA_PROPERTY_SASL_PASSWORD".to_string(), "secret".to_string()),
            ];
            let config = Config::from_settings(&settings(), &env).unwrap();
            client_config(&config).unwrap_or_else(|e| panic!("{protocol}/{mechanism}: {e}"));
        }
        let env = vec![("KAFKA_PROPERTY_SECURITY_PROTOCOL".to_string(), "SSL".to_string())];
        let s = Settings { kafka_property: vec!["ssl.endpoint.identification.algorithm=https".into()], ..settings() };
        client_config(&Config::from_settings(&s, &env).unwrap()).unwrap();
        let bad = Settings { kafka_property: vec!["no.such.property=1".into()], ..s };
        let err = client_config(&Config::from_settings(&bad, &[]).unwrap()).unwrap_err().to_string();
        assert!(err.contains("no.such.property"), "{err}");
    }

    /// The least a configuration needs: a broker and a topic.
    fn settings() -> Settings {
        Settings { broker_hostname: Some("kafka".into()), kafka_topic: Some("t".into()), ..Default::default() }
    }

    #[test]
    fn fetches_are_small_but_follow_a_larger_message_size() {
        let base = settings();
        let fetch = |props: &[&str]| {
            let s = Settings { kafka_property: props.iter().map(|p| p.to_string()).collect(), ..base.clone() };
            let c = client_config(&Config::from_settings(&s, &[]).unwrap()).unwrap();
            (c.get("fetch.max.bytes").unwrap().to_string(), c.get("message.max.bytes").unwrap().to_string())
        };
        let default = FETCH_MAX_BYTES.to_string();
        assert_eq!(fetch(&[]), (default.clone(), default.clone()));
        // Images of up to 20 MB: librdkafka would refuse fetch.max.bytes below message.max.bytes.
        assert_eq!(fetch(&["message.max.bytes=20000000"]), ("20000000".into(), "20000000".into()));
        assert_eq!(
            fetch(&["message.max.bytes=20000000", "fetch.max.bytes=30000000"]),
            ("30000000".into(), "20000000".into())
        );
        // Smaller fetches than the default are accepted as well.
        assert_eq!(fetch(&["fetch.max.bytes=100000"]), ("100000".into(), "100000".into()));
        assert_eq!(fetch(&["fetch.max.bytes=64000000"]), ("64000000".into(), default));
    }

    #[test]
    fn the_parquet_format_fetches_more_at_a_time() {
        let s = Settings { archive_format: Some("parquet".into()), ..settings() };
        let c = client_config(&Config::from_settings(&s, &[]).unwrap()).unwrap();
        assert_eq!(c.get("fetch.max.bytes"), Some("8388608"));
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("16384"));
    }
}
