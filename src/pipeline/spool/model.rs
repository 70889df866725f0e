//! The spool against a model of what it should hold, through random inserts (with records
//! delivered again, before and after their removal), removals (one by one and of ranges) and
//! reopenings.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    /// Records (partition, offset) delivered in one batch.
    Insert(Vec<(i32, i64)>),
    /// Removes the live records picked by these numbers.
    Remove(Vec<usize>),
    /// Removes every offset of a partition's range at once, those not in the spool included.
    RemoveAll(i32, i64, i64),
    /// Flushes, closes and opens the spool again.
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0i64..120, prop::collection::vec((0i32..3, 0i64..100), 1..150))
            .prop_map(|(base, rs)| Op::Insert(rs.into_iter().map(|(p, o)| (p, base + o)).collect())),
        3 => prop::collection::vec(any::<usize>(), 1..30).prop_map(Op::Remove),
        2 => (0i32..3, 0i64..220, 0i64..120).prop_map(|(p, first, len)| Op::RemoveAll(p, first, first + len)),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn the_spool_holds_what_was_inserted_and_not_removed(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::open_in_test(dir.path());
        let mut model: BTreeMap<(i32, i64), Vec<u8>> = BTreeMap::new();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Insert(rs) => {
                    let batch: Vec<Record> = rs
                        .iter()
                        .map(|&(p, o)| Record {
                            topic: "t".into(),
                            partition: p,
                            offset: o,
                            time: RecordTime::Kafka(1),
                            key: None,
                            value: Some(format!("{p}/{o}/{step}").into_bytes().into()), headers: None })
                        .collect();
                    spool.insert_batch(&batch).unwrap();
                    for r in &batch {
                        model.entry((r.partition, r.offset)).or_insert_with(|| r.value_bytes().to_vec());
                    }
                }
                Op::Remove(picks) => {
                    for pick in picks {
                        if model.is_empty() {
                            break;
                        }
                        let (p, o) = *model.keys().nth(pick % model.len()).unwrap();
                        spool.remove(&SpoolKey::new("t", p, o)).unwrap();
                        model.remove(&(p, o));
                    }
                }
                Op::RemoveAll(p, first, last) => {
                    let keys: Vec<SpoolKey> = (first..=last).map(|o| SpoolKey::new("t", p, o)).collect();
                    spool.remove_all(&keys).unwrap();
                    model.retain(|&(q, o), _| q != p || !(first..=last).contains(&o));
                }
                Op::Reopen => {
                    spool.flush().unwrap();
                    drop(spool);
                    spool = Spool::open_in_test(dir.path());
                }
            }
            let mut held = BTreeMap::new();
            for p in 0..3 {
                for (key, r) in spool.pending(&partition_prefix("t", p), |_| false, usize::MAX, usize::MAX).unwrap() {
                    prop_assert_eq!(key, SpoolKey::new("t", p, r.offset));
                    prop_assert!(held.insert((p, r.offset), r.value_bytes().to_vec()).is_none(), "read twice: {}/{}", p, r.offset);
                }
            }
            prop_assert_eq!(&held, &model);
            // The Parquet format's reads, from an offset on, see the same.
            for p in 0..3 {
                let from = (step as i64 * 37) % 150;
                let read: Vec<(i64, Vec<u8>)> = spool
                    .read_from(&partition_prefix("t", p), from, usize::MAX, u64::MAX)
                    .unwrap()
                    .into_iter()
                    .map(|r| (r.offset, r.value_bytes().to_vec()))
                    .collect();
                let expected: Vec<(i64, Vec<u8>)> =
                    model.range((p, from)..(p + 1, i64::MIN)).map(|(&(_, o), v)| (o, v.clone())).collect();
                prop_assert_eq!(read, expected);
            }
            prop_assert_eq!(spool.record_count(), model.len() as u64);
            prop_assert_eq!(spool.keys().unwrap().len(), model.len());
        }
    }
}
