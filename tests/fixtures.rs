//! Every real SINETStream record of the fixtures decodes to what the Kafka Connect deployment
//! stored: the Avro msg bytes as carried and the timestamp text; undecodable ones get a reason.
//! Reads the repository's copy and, when present, every file of `../shared/fixtures/` and of the
//! directory named by `EXTRA_FIXTURES` (more records made with `gen_sinetstream_vectors.py`).

use std::path::{Path, PathBuf};

use bytes::Bytes;
use kafka_s3_archiver::archive::UndecodablePolicy;
use kafka_s3_archiver::archive::sinetstream::{Undecodable, decode};
use kafka_s3_archiver::archive::{Layout, micros_to_millis, timestamp_text};
use kafka_s3_archiver::archive::{Plan, plan};
use kafka_s3_archiver::record::{Record, RecordTime};
use serde_json::Value;

fn fixture_records() -> Vec<Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![root.join("tests/fixtures/sinetstream-records.json")];
    let mut dirs = vec![root.join("../shared/fixtures")];
    dirs.extend(std::env::var_os("EXTRA_FIXTURES").map(PathBuf::from));
    for d in dirs.iter().filter_map(|d| std::fs::read_dir(d).ok()) {
        files.extend(d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "json")));
    }
    let mut out = Vec::new();
    for f in files {
        let doc: Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        out.extend(doc["records"].as_array().unwrap().iter().cloned());
    }
    assert!(out.len() >= 30, "fixtures found: {}", out.len());
    eprintln!("{} fixture records", out.len());
    out
}

fn hex_field(r: &Value, name: &str) -> Option<Vec<u8>> {
    r[name].as_str().map(|h| hex::decode(h).unwrap())
}

fn layout() -> Layout {
    Layout::default()
}

#[test]
fn every_fixture_record_gives_the_stored_payload_and_timestamp() {
    let mut by_variant = std::collections::BTreeMap::<String, usize>::new();
    for r in fixture_records() {
        let variant = r["variant"].as_str().unwrap().to_string();
        let label = format!("{variant}/{}", r["label"].as_str().unwrap());
        let value = hex_field(&r, "record_value_hex").unwrap();
        let record = Record {
            topic: r["topic"].as_str().unwrap().into(),
            partition: r["partition"].as_i64().unwrap() as i32,
            offset: r["offset"].as_i64().unwrap(),
            time: RecordTime::Kafka(r["kafka_timestamp_ms"].as_i64().unwrap()),
            key: None,
            value: Some(Bytes::from(value.clone())),
            headers: None,
        };
        match hex_field(&r, "avro_msg_hex") {
            Some(avro_msg) => {
                let m = decode(&value).unwrap_or_else(|e| panic!("{label}: {e}"));
                assert_eq!(&value[m.msg.clone()], &avro_msg[..], "{label}: payload");
                assert_eq!(m.tstamp_us, r["tstamp_us"].as_i64().unwrap(), "{label}: tstamp");
                let text = r["timestamp_text"].as_str().unwrap();
                assert_eq!(timestamp_text(micros_to_millis(m.tstamp_us)), text, "{label}: timestamp text");
                let Plan::Store { objects, undecodable: None } = plan(&record, &layout(), UndecodablePolicy::Stop)
                else {
                    panic!("{label}: not archived")
                };
                assert_eq!(objects[0].body_bytes(), [&avro_msg[..], b"\n"].concat(), "{label}: payload body");
                assert_eq!(objects[1].body_bytes(), format!("{text}\n").into_bytes(), "{label}: timestamp body");
                assert!(objects[0].key.starts_with(&format!("topics/{}/year=", record.topic)), "{label}");
            }
            None => {
                let why = decode(&value).expect_err(&label);
                match variant.as_str() {
                    "aes" => assert!(matches!(why, Undecodable::Encrypted(1..)), "{label}: {why}"),
                    _ => assert!(!matches!(why, Undecodable::Encrypted(_)), "{label}: {why}"),
                }
                let Plan::Store { objects, .. } = plan(&record, &layout(), UndecodablePolicy::DeadLetter) else {
                    panic!()
                };
                assert!(objects[0].key.starts_with("errors/"), "{label}");
                assert_eq!(objects[0].body_bytes(), value, "{label}: dead letter keeps the raw value");
            }
        }
        *by_variant.entry(variant).or_default() += 1;
    }
    for v in ["v3", "v2", "zstd", "gzip", "aes", "raw"] {
        assert!(by_variant.get(v).copied().unwrap_or(0) > 0, "no {v} fixture");
    }
}
