//! Property tests over arbitrary input for the stages that read untrusted bytes: the decoder and
//! the key builder never panic, never allocate in proportion to a claimed length, and every
//! accepted message round-trips. (The bad-input part of the crash-safety issue.)

use bytes::Bytes;
use kafka_s3_archiver::archive::UndecodablePolicy;
use kafka_s3_archiver::archive::sinetstream::{
    Format, SCHEMA_FINGERPRINT, V2_MARKER, V3_MARKER, decode, encode, write_long,
};
use kafka_s3_archiver::archive::{Layout, RecordPlace, timestamp_text};
use kafka_s3_archiver::archive::{Plan, plan};
use kafka_s3_archiver::record::{Record, RecordTime};
use proptest::prelude::*;

fn zigzag(v: i64) -> Vec<u8> {
    let mut out = Vec::new();
    write_long(&mut out, v);
    out
}

/// A header a real message could start with, followed by anything.
fn framed() -> impl Strategy<Value = Vec<u8>> {
    let header = prop_oneof![
        Just(vec![]),
        Just(V2_MARKER.to_vec()),
        Just([&V2_MARKER[..], &SCHEMA_FINGERPRINT[..]].concat()),
        Just([&V3_MARKER[..], &[0, 0], &V2_MARKER[..], &SCHEMA_FINGERPRINT[..]].concat()),
        any::<u16>().prop_map(|kv| [&V3_MARKER[..], &kv.to_be_bytes()[..]].concat()),
    ];
    (header, any::<i64>(), any::<i64>(), prop::collection::vec(any::<u8>(), 0..64))
        .prop_map(|(h, ts, len, tail)| [h, zigzag(ts), zigzag(len), tail].concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, ..ProptestConfig::default() })]

    #[test]
    fn decode_never_panics_and_stays_in_bounds(value in prop_oneof![prop::collection::vec(any::<u8>(), 0..256), framed()]) {
        if let Ok(m) = decode(&value) {
            prop_assert!(m.msg.start <= m.msg.end && m.msg.end == value.len());
        }
    }

    #[test]
    fn valid_messages_round_trip(ts in any::<i64>(), msg in prop::collection::vec(any::<u8>(), 0..300), v3 in any::<bool>()) {
        let value = encode(ts, &msg, if v3 { Format::V3 } else { Format::V2 });
        let m = decode(&value).unwrap();
        prop_assert_eq!(m.tstamp_us, ts);
        prop_assert_eq!(&value[m.msg], &msg[..]);
    }

    #[test]
    fn keys_and_bodies_for_any_record(
        value in prop_oneof![prop::collection::vec(any::<u8>(), 0..128), framed()],
        partition in 0..i32::MAX, offset in 0..i64::MAX, ms in any::<i64>(), consumed in any::<bool>(),
        policy in prop_oneof![Just(UndecodablePolicy::DeadLetter), Just(UndecodablePolicy::Raw), Just(UndecodablePolicy::Stop)],
    ) {
        let time = if consumed { RecordTime::Consumed(ms) } else { RecordTime::Kafka(ms) };
        let record = Record { topic: "fuzz.topic".into(), partition, offset, time, key: None, value: Some(Bytes::from(value)), headers: None };
        let layout = Layout::default();
        match plan(&record, &layout, policy) {
            Plan::Store { objects, .. } => {
                prop_assert_eq!(objects.len(), 2);
                let stem = format!("/fuzz.topic+{partition}+{offset:010}");
                for o in &objects {
                    prop_assert!(o.key.starts_with("topics/fuzz.topic/year=") || o.key.starts_with("errors/fuzz.topic/year="));
                    prop_assert!(o.key.contains(&stem), "{} lacks {}", o.key, stem);
                    prop_assert!(!o.key.contains("//") && !o.key.contains('#'));
                }
            }
            Plan::Stop(_) => prop_assert_eq!(policy, UndecodablePolicy::Stop),
        }
        let text = timestamp_text(ms);
        prop_assert!(text.len() >= 23 && text.is_ascii());
        let place = RecordPlace { topic: "t", partition, offset, path_time_ms: ms };
        prop_assert!(layout.timestamp(&place, ms).key.ends_with("-timestamp.txt"));
    }
}
