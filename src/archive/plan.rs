//! The write side of the Kafka Connect layout: what a record becomes in the store. A SINETStream
//! message becomes its payload object and its timestamp object; a record that is not one becomes
//! what UNDECODABLE says. The payload object carries user metadata with what its body alone does
//! not keep, so that `restore` can give the record back as it was.

use object_store::{Attribute, AttributeValue, Attributes};

use super::layout::{Layout, Object, RecordPlace, micros_to_millis};
use super::sinetstream::{self as decode, Undecodable};
use crate::record::Record;

/// What to do with a record that is not a SINETStream message (UNDECODABLE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndecodablePolicy {
    /// Store the raw value under `errors/` with a reason object; keep archiving.
    DeadLetter,
    /// Archive the raw value as the payload, the Kafka timestamp as the timestamp object.
    Raw,
    /// Halt archiving with an error (the Kafka Connect behaviour).
    Stop,
}

/// What a record becomes in the store.
#[derive(Debug)]
pub enum Plan {
    /// Store these objects.
    Store { objects: Vec<Object>, undecodable: Option<Undecodable> },
    /// UNDECODABLE=stop and the record cannot be decoded.
    Stop(Undecodable),
}

/// Decides the objects of a record: its payload and timestamp objects when it is a SINETStream
/// message, otherwise what the UNDECODABLE policy says. A tombstone has no objects in this layout
/// (the consumer does not spool it for this format).
pub fn plan(record: &Record, layout: &Layout, policy: UndecodablePolicy) -> Plan {
    let Some(value) = &record.value else {
        return Plan::Store { objects: Vec::new(), undecodable: None };
    };
    let place = RecordPlace {
        topic: &record.topic,
        partition: record.partition,
        offset: record.offset,
        path_time_ms: record.time.millis(),
    };
    match decode::decode(value) {
        Ok(msg) => {
            let mut payload = layout.payload(&place, value.slice(msg.msg));
            payload.metadata = metadata(record, Some(msg.tstamp_us));
            Plan::Store {
                objects: vec![payload, layout.timestamp(&place, micros_to_millis(msg.tstamp_us))],
                undecodable: None,
            }
        }
        Err(why) => match policy {
            UndecodablePolicy::DeadLetter => {
                let mut dead = layout.dead_letter(&place, value.clone());
                dead.metadata = metadata(record, None);
                Plan::Store {
                    objects: vec![dead, layout.dead_letter_reason(&place, record.time.kafka(), &why.to_string())],
                    undecodable: Some(why),
                }
            }
            UndecodablePolicy::Raw => {
                let mut payload = layout.payload(&place, value.clone());
                payload.metadata = metadata(record, None);
                payload.metadata.push((super::META_FORM, "raw".to_string()));
                Plan::Store {
                    objects: vec![payload, layout.timestamp(&place, record.time.millis())],
                    undecodable: Some(why),
                }
            }
            UndecodablePolicy::Stop => Plan::Stop(why),
        },
    }
}

/// The payload object's user metadata: what the body alone does not keep (the exact tstamp, the
/// Kafka timestamp and key), so that `restore` can give a record back as it was.
pub fn metadata(record: &Record, tstamp_us: Option<i64>) -> Vec<(&'static str, String)> {
    use base64::Engine;
    let mut m = Vec::with_capacity(3);
    if let Some(us) = tstamp_us {
        m.push((super::META_TSTAMP_US, us.to_string()));
    }
    if let Some(ms) = record.time.kafka() {
        m.push((super::META_KAFKA_TIMESTAMP_MS, ms.to_string()));
    }
    if let Some(key) = &record.key {
        let encoded = base64::engine::general_purpose::STANDARD.encode(key);
        if encoded.len() <= super::MAX_KEY_METADATA_BYTES {
            m.push((super::META_KAFKA_KEY, encoded));
        } else {
            m.push((super::META_KAFKA_KEY_OMITTED, key.len().to_string()));
        }
    }
    m
}

/// User metadata as object_store sends it (`x-amz-meta-*` headers on S3).
pub fn attributes(metadata: &[(&'static str, String)]) -> Attributes {
    metadata.iter().map(|(k, v)| (Attribute::Metadata((*k).into()), AttributeValue::from(v.clone()))).collect()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::record::RecordTime;

    fn layout() -> Layout {
        Layout::default()
    }

    fn record(value: &[u8]) -> Record {
        Record {
            topic: "t".into(),
            partition: 1,
            offset: 2,
            time: RecordTime::Kafka(0),
            key: None,
            value: Some(Bytes::copy_from_slice(value)),
            headers: None,
        }
    }

    #[test]
    fn policies_for_undecodable_records() {
        let r = record(b"{\"no\":\"envelope\"}");
        let Plan::Store { objects, undecodable } = plan(&r, &layout(), UndecodablePolicy::DeadLetter) else { panic!() };
        assert_eq!(undecodable, Some(Undecodable::NoEnvelope));
        assert_eq!(objects[0].key, "errors/t/year=1970/month=01/day=01/hour=09/t+1+0000000002.raw");
        assert_eq!(objects[0].body_bytes(), r.value_bytes().to_vec());
        assert!(String::from_utf8(objects[1].body_bytes()).unwrap().contains("no SINETStream envelope"));

        let Plan::Store { objects, .. } = plan(&r, &layout(), UndecodablePolicy::Raw) else { panic!() };
        assert_eq!(objects[0].key, "topics/t/year=1970/month=01/day=01/hour=09/t+1+0000000002.bin");
        assert_eq!(objects[0].body_bytes(), [r.value_bytes(), b"\n"].concat());
        assert_eq!(objects[1].body_bytes(), b"1970-01-01T00:00:00.000\n");

        assert!(matches!(plan(&r, &layout(), UndecodablePolicy::Stop), Plan::Stop(Undecodable::NoEnvelope)));
    }
}
