//! Kafka Connect REST API on REST_PORT: what scripts and tools written for the old deployment ask
//! a Kafka Connect worker, answered in the documented shapes (field order included) for the two
//! connectors it ran, `s3-sink-timestamp` and `s3-sink-data`.
//!
//! Both connectors are views of the one pipeline: they share its state, and pausing either pauses
//! archiving (the consumer keeps polling, so the group membership stays). Their configuration is
//! what the deployment's `register.sh` registered, derived from the archiver's settings; it holds
//! no secret (the credentials were the worker's environment, as they are the archiver's). Calls
//! that would change a connector (its config, restart, stop, delete, create) answer 405 (409 for
//! creating one of the two) with what to do instead: the archiver is configured by its
//! environment. The reference is `docs/kafka-connect-api.md`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, body::Bytes};
use serde::Serialize;
use serde::ser::SerializeMap;

use crate::config::{Config, StoreConfig};
use crate::pipeline::commit::Ledger;
use crate::pipeline::status::Status;

/// The names under which the Kafka Connect deployment ran its two sink connectors.
pub const CONNECTORS: [&str; 2] = ["s3-sink-timestamp", "s3-sink-data"];
/// The connector whose archive the archiver writes, as its configuration names it.
const CONNECTOR_CLASS: &str = "io.confluent.connect.s3.S3SinkConnector";
const TASK_CLASS: &str = "io.confluent.connect.s3.S3SinkTask";
/// The version of that connector whose objects the archiver reproduces byte for byte.
const CONNECTOR_VERSION: &str = "10.0.7";

/// What the endpoints read.
#[derive(Clone)]
pub struct Api {
    pub status: Arc<Status>,
    pub ledger: Arc<Mutex<Ledger>>,
    /// `host:port`, as Kafka Connect names a worker.
    pub worker_id: String,
    pub configs: Arc<Configs>,
}

/// Each connector's configuration, Kafka Connect style.
#[derive(Debug)]
pub struct Configs(Vec<(&'static str, BTreeMap<String, String>)>);

impl Configs {
    /// The configuration `register.sh` registered for each connector, with the archiver's settings.
    pub fn new(config: &Config) -> Configs {
        let mut common = BTreeMap::new();
        let mut set = |k: &str, v: &str| common.insert(k.to_string(), v.to_string());
        set("connector.class", CONNECTOR_CLASS);
        set("value.converter", "jp.ad.sinet.sinetstream.connect.converters.SinetStreamConverter");
        set("format.class", "io.confluent.connect.s3.format.bytearray.ByteArrayFormat");
        set("storage.class", "io.confluent.connect.s3.storage.S3Storage");
        set("tasks.max", "1");
        set("flush.size", "1");
        set("partitioner.class", "io.confluent.connect.storage.partitioner.TimeBasedPartitioner");
        set("path.format", "'year'=YYYY/'month'=MM/'day'=dd/'hour'=HH");
        set("partition.duration.ms", "3600000");
        set("timestamp.extractor", "Record");
        set("locale", "C");
        set("timezone", config.layout.timezone.name());
        // Connect takes either a list of names or one expression (not both).
        if config.topics.has_patterns() {
            set("topics.regex", &config.topics.as_one_pattern());
        } else {
            set("topics", &config.topics.names().join(","));
        }
        set("group.id", &config.group_id);
        match &config.store {
            StoreConfig::S3 { bucket, region, endpoint, .. } => {
                set("s3.bucket.name", bucket);
                set("s3.region", region);
                if let Some(url) = endpoint {
                    set("store.url", url);
                }
            }
            // Not a Kafka Connect store: the directory the archive goes to, as a URL.
            StoreConfig::Local { dir, bucket } => {
                set("s3.bucket.name", bucket);
                set("store.url", &format!("file://{}", crate::config::absolute(dir).display()));
            }
        }
        // register.sh left the separator at its default, `\n`; another one is part of the config.
        if config.layout.separator.as_ref() != b"\n" {
            set("format.bytearray.separator", &String::from_utf8_lossy(&config.layout.separator));
        }
        let cast = "jp.ad.sinet.sinetstream.connect.transforms.ByteArrayCast$Value";
        let extract = "org.apache.kafka.connect.transforms.ExtractField$Value";
        let with = |name: &'static str, extra: &[(&str, &str)]| {
            let mut c = common.clone();
            c.insert("name".into(), name.into());
            c.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            (name, c)
        };
        Configs(vec![
            with(
                "s3-sink-timestamp",
                &[
                    ("transforms", "Timestamp,ExtractField,ByteArrayCast"),
                    (
                        "transforms.Timestamp.type",
                        "jp.ad.sinet.sinetstream.connect.transforms.MicrosecondTimestampConverter$Value",
                    ),
                    ("transforms.Timestamp.field", "tstamp"),
                    ("transforms.Timestamp.format", "yyyy-MM-dd'T'HH:mm:ss.SSS"),
                    ("transforms.Timestamp.target.type", "string"),
                    ("transforms.ExtractField.type", extract),
                    ("transforms.ExtractField.field", "tstamp"),
                    ("transforms.ByteArrayCast.type", cast),
                    ("format.bytearray.extension", "-timestamp.txt"),
                ],
            ),
            with(
                "s3-sink-data",
                &[
                    ("transforms", "ExtractField,ByteArrayCast"),
                    ("transforms.ExtractField.type", extract),
                    ("transforms.ExtractField.field", "msg"),
                    ("transforms.ByteArrayCast.type", cast),
                    ("format.bytearray.extension", &config.layout.extension),
                ],
            ),
        ])
    }

    fn get(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, c)| c)
    }
}

/// The routes, for the HTTP server to merge with its own.
pub fn routes(api: Api) -> Router {
    Router::new()
        .route("/connector-plugins", get(plugins))
        .route("/connectors", get(list).post(create))
        .route("/connectors/{name}", get(info).delete(delete))
        .route("/connectors/{name}/config", get(config).put(change_config).patch(change_config))
        .route("/connectors/{name}/status", get(connector_status))
        .route("/connectors/{name}/tasks", get(tasks))
        .route("/connectors/{name}/tasks/{task}/status", get(task_status))
        .route("/connectors/{name}/tasks/{task}/restart", post(restart))
        .route("/connectors/{name}/topics", get(topics))
        .route("/connectors/{name}/topics/reset", put(reset_topics))
        .route("/connectors/{name}/pause", put(pause))
        .route("/connectors/{name}/resume", put(resume))
        .route("/connectors/{name}/stop", put(stop))
        .route("/connectors/{name}/restart", post(restart))
        .with_state(api)
}

/// Kafka Connect's error body: `{"error_code": <the HTTP status>, "message": …}`.
pub fn error(code: StatusCode, message: impl Into<String>) -> Response {
    #[derive(Serialize)]
    struct ErrorMessage {
        error_code: u16,
        message: String,
    }
    (code, Json(ErrorMessage { error_code: code.as_u16(), message: message.into() })).into_response()
}

#[derive(Serialize)]
struct ServerInfo {
    version: &'static str,
    commit: &'static str,
    kafka_cluster_id: Option<String>,
}

/// `GET /`: the worker's version and cluster (the HTTP server routes `/`, which also serves the
/// status page to browsers).
pub fn server_info(status: &Status) -> Response {
    Json(ServerInfo {
        version: env!("CARGO_PKG_VERSION"),
        commit: env!("ARCHIVER_COMMIT"),
        kafka_cluster_id: status.cluster_id(),
    })
    .into_response()
}

#[derive(Serialize)]
struct PluginInfo {
    class: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    version: &'static str,
}

async fn plugins() -> Json<[PluginInfo; 1]> {
    Json([PluginInfo { class: CONNECTOR_CLASS, kind: "sink", version: CONNECTOR_VERSION }])
}

#[derive(Serialize, Clone)]
struct TaskId {
    connector: &'static str,
    task: u32,
}

#[derive(Serialize)]
struct ConnectorInfo<'a> {
    name: &'static str,
    config: &'a BTreeMap<String, String>,
    tasks: [TaskId; 1],
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct WorkerState {
    state: &'static str,
    worker_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace: Option<String>,
}

#[derive(Serialize)]
struct TaskState {
    id: u32,
    #[serde(flatten)]
    state: WorkerState,
}

#[derive(Serialize)]
struct ConnectorState {
    name: &'static str,
    connector: WorkerState,
    tasks: [TaskState; 1],
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct TaskInfo {
    id: TaskId,
    config: BTreeMap<String, String>,
}

/// Keys in the order given (Kafka Connect answers `expand` in the order it was asked).
struct Ordered<K, V>(Vec<(K, V)>);

impl<K: Serialize, V: Serialize> Serialize for Ordered<K, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl Api {
    /// The connector's own name (static), if it is one of the two.
    fn known(&self, name: &str) -> Option<&'static str> {
        CONNECTORS.into_iter().find(|c| *c == name)
    }

    fn state(&self) -> WorkerState {
        let (state, trace) = match self.status.failure() {
            Some(f) => ("FAILED", Some(format!("{} (at {})", f.message, f.time))),
            None if self.status.paused_on_request() => ("PAUSED", None),
            None => ("RUNNING", None),
        };
        WorkerState { state, worker_id: self.worker_id.clone(), trace }
    }

    fn connector_state(&self, name: &'static str) -> ConnectorState {
        // One pipeline writes both connectors' objects: its one task is theirs.
        ConnectorState {
            name,
            connector: self.state(),
            tasks: [TaskState { id: 0, state: self.state() }],
            kind: "sink",
        }
    }

    fn info(&self, name: &'static str) -> ConnectorInfo<'_> {
        ConnectorInfo {
            name,
            config: self.configs.get(name).expect("a config for each connector"),
            tasks: [TaskId { connector: name, task: 0 }],
            kind: "sink",
        }
    }
}

/// `?expand=status&expand=info`: the values of every `expand`, in order.
fn expands(query: Option<&str>) -> Vec<&str> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == "expand")
        .map(|(_, v)| v)
        .collect()
}

async fn list(State(api): State<Api>, RawQuery(query): RawQuery) -> Response {
    let expand = expands(query.as_deref());
    if expand.is_empty() {
        return Json(CONNECTORS).into_response();
    }
    let connectors = CONNECTORS.map(|name| {
        let mut parts = Ordered(Vec::new());
        for e in &expand {
            let part = match *e {
                "status" => serde_json::to_value(api.connector_state(name)),
                "info" => serde_json::to_value(api.info(name)),
                _ => continue,
            };
            if !parts.0.iter().any(|(k, _)| k == e) {
                parts.0.push((*e, part.expect("plain data serializes")));
            }
        }
        (name, parts)
    });
    Json(Ordered(connectors.into())).into_response()
}

async fn info(State(api): State<Api>, Path(name): Path<String>) -> Response {
    match api.known(&name) {
        Some(name) => Json(api.info(name)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("Connector {name} not found")),
    }
}

async fn config(State(api): State<Api>, Path(name): Path<String>) -> Response {
    match api.configs.get(&name) {
        Some(c) => Json(c).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("Connector {name} not found")),
    }
}

async fn connector_status(State(api): State<Api>, Path(name): Path<String>) -> Response {
    match api.known(&name) {
        Some(name) => Json(api.connector_state(name)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("No status found for connector {name}")),
    }
}

async fn tasks(State(api): State<Api>, Path(name): Path<String>) -> Response {
    let Some(name) = api.known(&name) else {
        return error(StatusCode::NOT_FOUND, format!("Connector {name} not found"));
    };
    let mut config = api.configs.get(name).expect("a config for each connector").clone();
    config.insert("task.class".into(), TASK_CLASS.into());
    Json([TaskInfo { id: TaskId { connector: name, task: 0 }, config }]).into_response()
}

async fn task_status(State(api): State<Api>, Path((name, task)): Path<(String, String)>) -> Response {
    let Ok(id) = task.parse::<u32>() else {
        return error(StatusCode::NOT_FOUND, "HTTP 404 Not Found");
    };
    match api.known(&name) {
        Some(_) if id == 0 => Json(TaskState { id, state: api.state() }).into_response(),
        _ => error(StatusCode::NOT_FOUND, format!("No status found for task {name}-{id}")),
    }
}

async fn topics(State(api): State<Api>, Path(name): Path<String>) -> Response {
    #[derive(Serialize)]
    struct ActiveTopics {
        topics: Vec<String>,
    }
    // Kafka Connect answers an unknown connector with no topics, not 404.
    let topics = if api.known(&name).is_some() { api.ledger.lock().expect("ledger lock").topics() } else { Vec::new() };
    let mut out = serde_json::Map::new();
    out.insert(name, serde_json::to_value(ActiveTopics { topics }).expect("a list of strings"));
    Json(out).into_response()
}

async fn pause(State(api): State<Api>, Path(name): Path<String>) -> Response {
    set_paused(&api, &name, true)
}

async fn resume(State(api): State<Api>, Path(name): Path<String>) -> Response {
    set_paused(&api, &name, false)
}

/// Pauses or resumes archiving: both connectors, which are one pipeline. Not kept across a restart.
fn set_paused(api: &Api, name: &str, paused: bool) -> Response {
    if api.known(name).is_none() {
        return error(StatusCode::NOT_FOUND, format!("Unknown connector {name}"));
    }
    if api.status.set_paused_on_request(paused) {
        if paused {
            tracing::info!(connector = name, "archiving paused on request; PUT /connectors/{name}/resume resumes it");
        } else {
            tracing::info!(connector = name, "archiving resumed on request");
        }
    }
    StatusCode::ACCEPTED.into_response()
}

/// What the archiver is, for the calls it refuses.
const CONFIGURED_BY_ENV: &str = "kafka-s3-archiver runs its two connectors, s3-sink-timestamp and s3-sink-data, as one \
    pipeline configured by its environment (.env), not through this API";

fn refused(api: &Api, name: &str, not_found: String, what: &str) -> Response {
    if api.known(name).is_none() {
        return error(StatusCode::NOT_FOUND, not_found);
    }
    error(StatusCode::METHOD_NOT_ALLOWED, format!("{CONFIGURED_BY_ENV}: {what}"))
}

fn stop_instead(name: &str) -> String {
    format!("stop the service to stop archiving, or PUT /connectors/{name}/pause to pause it")
}

async fn create(body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    struct Create {
        name: String,
    }
    match serde_json::from_slice::<Create>(&body) {
        Ok(c) if CONNECTORS.contains(&c.name.as_str()) => error(
            StatusCode::CONFLICT,
            format!(
                "Connector {} already exists: {CONFIGURED_BY_ENV}; change the .env and restart the service to change it",
                c.name
            ),
        ),
        _ => not_creatable(),
    }
}

fn not_creatable() -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{CONFIGURED_BY_ENV}: to archive more topics, list them in KAFKA_TOPIC (comma-separated; a pattern beginning with ^ also takes topics created later) and restart the service"
        ),
    )
}

async fn delete(State(api): State<Api>, Path(name): Path<String>) -> Response {
    refused(&api, &name, format!("Connector {name} not found"), &stop_instead(&name))
}

async fn change_config(State(api): State<Api>, Path(name): Path<String>) -> Response {
    // Kafka Connect creates the connector a config is put for, if there is none.
    if api.known(&name).is_none() {
        return not_creatable();
    }
    refused(&api, &name, String::new(), "change the .env and restart the service")
}

async fn stop(State(api): State<Api>, Path(name): Path<String>) -> Response {
    refused(&api, &name, format!("Unknown connector {name}"), &stop_instead(&name))
}

async fn restart(State(api): State<Api>, Path(params): Path<Vec<(String, String)>>) -> Response {
    let name = params.iter().find(|(k, _)| k == "name").map_or("", |(_, v)| v.as_str());
    // POST /connectors/{name}/tasks/{task}/restart: a task that is not there is not found.
    if let Some((_, task)) = params.iter().find(|(k, _)| k == "task") {
        match task.parse::<u32>() {
            Err(_) => return error(StatusCode::NOT_FOUND, "HTTP 404 Not Found"),
            Ok(id) if id != 0 && api.known(name).is_some() => {
                return error(StatusCode::NOT_FOUND, format!("Unknown task: {name}-{id}"));
            }
            Ok(_) => {}
        }
    }
    refused(
        &api,
        name,
        format!("Unknown connector: {name}"),
        "restart the service (for example systemctl restart kafka-s3-archiver)",
    )
}

async fn reset_topics(State(api): State<Api>, Path(name): Path<String>) -> Response {
    refused(&api, &name, format!("Connector {name} not found"), "the topics it archives are those of KAFKA_TOPIC")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;

    fn configs(s: Settings) -> Configs {
        let base = Settings { broker_hostname: Some("kafka".into()), kafka_topic: Some("a,b".into()), ..s };
        Configs::new(&Config::from_settings(&base, &[]).unwrap())
    }

    #[test]
    fn patterns_are_shown_as_connects_topics_regex() {
        let base = Settings {
            broker_hostname: Some("kafka".into()),
            kafka_topic: Some("^sensor-.*,camera,^cam".into()),
            ..Default::default()
        };
        let c = Configs::new(&Config::from_settings(&base, &[]).unwrap());
        let data = c.get("s3-sink-data").unwrap();
        assert!(data.get("topics").is_none());
        assert_eq!(data["topics.regex"], "^sensor-.*|^camera$|^cam");
    }

    #[test]
    fn the_config_is_register_sh_with_the_archivers_settings_and_no_secret() {
        let c = configs(Settings {
            s3_bucket_name: Some("mybucket".into()),
            s3_endpoint_url: Some("http://minio:9000".into()),
            aws_access_key_id: Some("AKIAEXAMPLE".into()),
            aws_secret_key: Some("s3cr3t".into()),
            s3_object_extension: Some(".json".into()),
            partition_timezone: Some("UTC".into()),
            ..Default::default()
        });
        let data = c.get("s3-sink-data").unwrap();
        assert_eq!(data["name"], "s3-sink-data");
        assert_eq!(data["topics"], "a,b");
        assert_eq!(data["s3.bucket.name"], "mybucket");
        assert_eq!(data["store.url"], "http://minio:9000");
        assert_eq!(data["timezone"], "UTC");
        assert_eq!(data["format.bytearray.extension"], ".json");
        assert_eq!(data["transforms.ExtractField.field"], "msg");
        assert!(!data.contains_key("format.bytearray.separator"), "the default separator is not set");
        let ts = c.get("s3-sink-timestamp").unwrap();
        assert_eq!(ts["format.bytearray.extension"], "-timestamp.txt");
        assert_eq!(ts["transforms.ExtractField.field"], "tstamp");
        for v in data.values().chain(ts.values()) {
            assert!(!v.contains("s3cr3t") && !v.contains("AKIAEXAMPLE"), "{v}");
        }
        assert!(c.get("nosuch").is_none());
    }

    #[test]
    fn a_separator_other_than_the_default_is_part_of_the_config() {
        let c = configs(Settings { s3_object_separator: Some("".into()), ..Default::default() });
        assert_eq!(c.get("s3-sink-data").unwrap()["format.bytearray.separator"], "");
        assert!(c.get("s3-sink-data").unwrap()["store.url"].starts_with("file:///"), "the local store");
    }

    #[test]
    fn expand_takes_every_value_in_order() {
        assert_eq!(expands(Some("expand=info&expand=status")), ["info", "status"]);
        assert_eq!(expands(Some("x=1&expand=status")), ["status"]);
        assert!(expands(None).is_empty());
    }
}
