//! The write side of the Kafka Connect layout: what a record becomes in the store. A SINETStream
//! message becomes its payload object and its timestamp object; a record that is not one becomes
//! what UNDECODABLE says. The payload object carries user metadata with what its body alone does
//! not keep, so that `restore` can give the record back as it was.

use bytes::Bytes;
use object_store::{Attribute, AttributeValue, Attributes};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};

use super::layout::{Layout, Object, RecordPlace, micros_to_millis};
use super::sinetstream::{self as decode, Undecodable};
use crate::record::{Headers, Record};

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
/// Kafka timestamp, key and headers), so that `restore` can give a record back as it was. The
/// headers come last and only where they fit in S3's 2 KB ([`super::MAX_USER_METADATA_BYTES`]);
/// otherwise [`super::META_KAFKA_HEADERS_OMITTED`] says how many were left out.
pub fn metadata(record: &Record, tstamp_us: Option<i64>) -> Vec<(&'static str, String)> {
    use base64::Engine;
    let mut m = Vec::with_capacity(4);
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
    if let Some(headers) = record.headers.as_deref().filter(|h| !h.is_empty()) {
        let size = |name: &str, value: &str| "x-amz-meta-".len() + name.len() + value.len();
        let used: usize = m.iter().map(|(k, v)| size(k, v)).sum();
        let text = headers_text(headers);
        if used + size(super::META_KAFKA_HEADERS, &text) <= super::MAX_USER_METADATA_BYTES {
            m.push((super::META_KAFKA_HEADERS, text));
        } else {
            m.push((super::META_KAFKA_HEADERS_OMITTED, headers.len().to_string()));
        }
    }
    m
}

/// Every byte but the unreserved characters of RFC 3986 is percent-encoded: the text is plain
/// ASCII (an HTTP header value), and `&` and `=` separate.
const HEADER_ESCAPES: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// Headers as [`super::META_KAFKA_HEADERS`] keeps them: `name=value&…`, in order.
pub fn headers_text(headers: &[(String, Option<Bytes>)]) -> String {
    let mut out = String::new();
    for (i, (name, value)) in headers.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.extend(percent_encode(name.as_bytes(), HEADER_ESCAPES));
        if let Some(v) = value {
            out.push('=');
            out.extend(percent_encode(v, HEADER_ESCAPES));
        }
    }
    out
}

/// The headers [`headers_text`] wrote; None when the text is not such (a name that is not UTF-8
/// once decoded).
pub fn headers_from_text(text: &str) -> Option<Headers> {
    let mut out = Headers::new();
    if text.is_empty() {
        return Some(out);
    }
    for part in text.split('&') {
        let (name, value) = match part.split_once('=') {
            Some((n, v)) => (n, Some(Bytes::from(percent_decode_str(v).collect::<Vec<u8>>()))),
            None => (part, None),
        };
        out.push((percent_decode_str(name).decode_utf8().ok()?.into_owned(), value));
    }
    Some(out)
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

    #[test]
    fn headers_are_kept_in_order_with_nulls_and_binary_values() {
        let headers: Headers = vec![
            ("traceparent".into(), Some(Bytes::from_static(b"00-4bf9-00f0-01"))),
            ("dup".into(), Some(Bytes::from_static(b"a=b&c"))),
            ("dup".into(), None),
            ("empty".into(), Some(Bytes::new())),
            ("\u{65e5}\u{672c} name".into(), Some(Bytes::from_static(&[0, 0xff, b'%', b' ']))),
        ];
        let text = headers_text(&headers);
        assert_eq!(text, "traceparent=00-4bf9-00f0-01&dup=a%3Db%26c&dup&empty=&%E6%97%A5%E6%9C%AC%20name=%00%FF%25%20");
        assert!(text.is_ascii());
        assert_eq!(headers_from_text(&text), Some(headers));
        assert_eq!(headers_from_text(""), Some(Headers::new()));
        assert_eq!(headers_from_text("%FF=x"), None, "a name that is not UTF-8");
    }

    #[test]
    fn headers_that_do_not_fit_in_two_kilobytes_are_counted_instead() {
        let size = |m: &[(&str, String)]| m.iter().map(|(k, v)| 11 + k.len() + v.len()).sum::<usize>();
        let mut r = record(b"{}");
        r.key = Some(Bytes::from(vec![b'k'; 1000]));
        r.headers = Some(vec![("h".into(), Some(Bytes::from(vec![b'v'; 500])))]);
        let m = metadata(&r, Some(1));
        assert!(m.iter().any(|(k, _)| *k == crate::archive::META_KAFKA_HEADERS));
        assert!(size(&m) <= crate::archive::MAX_USER_METADATA_BYTES, "{}", size(&m));
        // With a key of 1,000 bytes (1,336 in base64), 700 bytes of header do not fit.
        r.headers = Some(vec![("h".into(), Some(Bytes::from(vec![b'v'; 700]))), ("g".into(), None)]);
        let m = metadata(&r, Some(1));
        assert!(!m.iter().any(|(k, _)| *k == crate::archive::META_KAFKA_HEADERS));
        assert!(m.contains(&(crate::archive::META_KAFKA_HEADERS_OMITTED, "2".to_string())));
        // No headers, or an empty list: nothing said.
        r.headers = Some(Headers::new());
        assert_eq!(metadata(&r, Some(1)).len(), 3);
    }
}
