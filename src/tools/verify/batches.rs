//! Verify for the Parquet format: a partition's objects read in offset order, row by row.
//!
//! An object's name gives only its first offset; its rows give the rest. [`Walk`] opens a
//! partition's objects one after the other (the next one fetched while the current one is read)
//! and hands out their rows in offset order, checking each object on the way: it must be a
//! readable Parquet file, start at the offset its name says, hold its rows in offset order, under
//! the hour folder of their Kafka timestamps, and not hold an offset an earlier object holds (an
//! overlap is one problem naming both objects and the offsets). The caller compares the rows with
//! Kafka's records ([`compare_row`]) or, where Kafka has no records, checks that no offset is
//! missing between them ([`Walk::alone`]). Memory holds a partition's current and next object,
//! compressed.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use tokio::task::JoinHandle;

use super::{KafkaRecord, Problem, ProblemKind, TopicReport};
use crate::archive::parquet::{self, Row, Rows};
use crate::archive::{Layout, Listed, Selection};
use crate::record::{Record, RecordTime};

/// A row and the object it is in.
pub(super) struct Found {
    pub row: Row,
    pub key: Arc<str>,
}

/// The object being read.
struct Open {
    key: Arc<str>,
    hour: String,
    name_offset: i64,
    rows: Rows,
    /// The offset of the object's previous row.
    previous: Option<i64>,
    /// Offsets of this object an earlier object holds: first, last, how many, and that object.
    overlap: Option<(i64, i64, u64, Arc<str>)>,
    /// A row filed under another hour than its Kafka timestamp's was reported.
    misfiled: bool,
}

/// One partition's Parquet objects, read in offset order.
pub(super) struct Walk {
    partition: i32,
    /// Rows outside it are checked as part of their object, not handed out.
    selection: Selection,
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    queue: VecDeque<Listed>,
    fetching: Option<(Listed, JoinHandle<object_store::Result<Bytes>>)>,
    open: Option<Open>,
    peeked: Option<Found>,
    /// The highest offset handed out, and its object.
    highest: Option<(i64, Arc<str>)>,
    /// The last offset checked alone, where Kafka cannot tell (for gaps).
    previous_alone: Option<i64>,
    /// Rows past Kafka's last offset, per object: first, last, how many.
    past_end: Option<(Arc<str>, i64, i64, u64)>,
    /// Kafka's records in no object, one run at a time: the key an object starting at the first
    /// would have, first, last, how many.
    missing: Option<(String, i64, i64, u64)>,
}

impl Walk {
    /// `objects`: the partition's objects, by first offset (as [`crate::archive::TopicIndex`]).
    pub fn new(
        partition: i32,
        objects: Vec<Listed>,
        selection: &Selection,
        store: Arc<dyn ObjectStore>,
        layout: Layout,
    ) -> Walk {
        Walk {
            partition,
            selection: selection.clone(),
            store,
            layout,
            queue: objects.into(),
            fetching: None,
            open: None,
            peeked: None,
            highest: None,
            previous_alone: None,
            past_end: None,
            missing: None,
        }
    }

    /// Starts reading the next object, if there is one and none is being read.
    fn prefetch(&mut self) {
        if self.fetching.is_some() {
            return;
        }
        let Some(listed) = self.queue.pop_front() else { return };
        let store = self.store.clone();
        let path = Path::from(listed.key.as_str());
        let get = tokio::spawn(async move { store.get(&path).await?.bytes().await });
        self.fetching = Some((listed, get));
    }

    /// The next row in offset order, not taken; `None` when every object was read.
    pub async fn peek(&mut self, report: &mut TopicReport) -> Option<&Found> {
        while self.peeked.is_none() {
            if self.open.is_none() && !self.open_next(report).await {
                return None;
            }
            let open = self.open.as_mut().expect("opened above");
            let row = match open.rows.next() {
                None => {
                    self.close(report);
                    continue;
                }
                Some(Err(e)) => {
                    let detail = format!("a row after offset {:?} cannot be read: {e}", open.previous);
                    report.problem(ProblemKind::Mismatched, open.key.as_ref(), detail);
                    self.close(report);
                    continue;
                }
                Some(Ok(row)) => row,
            };
            if open.previous.is_none() && row.offset != open.name_offset {
                let detail = format!("its first row is offset {}, its name says {}", row.offset, open.name_offset);
                report.problem(ProblemKind::Mismatched, open.key.as_ref(), detail);
            }
            if let Some(previous) = open.previous
                && row.offset <= previous
            {
                let detail = format!("offset {} comes after offset {previous}: rows out of offset order", row.offset);
                report.problem(ProblemKind::Mismatched, open.key.as_ref(), detail);
                continue;
            }
            open.previous = Some(row.offset);
            if let Some(ms) = row.kafka_timestamp_ms
                && !open.misfiled
                && self.layout.hour_path(ms) != open.hour
            {
                open.misfiled = true;
                let detail = format!(
                    "offset {} has its Kafka timestamp in {}, not in this object's hour",
                    row.offset,
                    self.layout.hour_path(ms)
                );
                report.problem(ProblemKind::Mismatched, open.key.as_ref(), detail);
            }
            if let Some((highest, other)) = &self.highest
                && row.offset <= *highest
            {
                let o = open.overlap.get_or_insert((row.offset, row.offset, 0, other.clone()));
                o.1 = row.offset;
                o.2 += 1;
                continue;
            }
            self.highest = Some((row.offset, open.key.clone()));
            if !self.selection.keeps_offset(row.offset) {
                continue;
            }
            self.peeked = Some(Found { row, key: open.key.clone() });
        }
        self.peeked.as_ref()
    }

    /// Takes the row [`Walk::peek`] gave.
    pub fn take(&mut self) -> Option<Found> {
        self.peeked.take()
    }

    /// Takes the row at `offset` if an object holds it. Rows below it are checked alone first:
    /// Kafka did not deliver them (they are below `kafka_first`, its first record read, or Kafka
    /// has no record there any more).
    pub async fn take_at(&mut self, offset: i64, kafka_first: i64, report: &mut TopicReport) -> Option<Found> {
        loop {
            let next = self.peek(report).await?.row.offset;
            if next > offset {
                return None;
            }
            let found = self.take().expect("peeked");
            if next == offset {
                return Some(found);
            }
            self.alone(&found, Some(kafka_first), report);
        }
    }

    /// A record Kafka has that no object holds; consecutive ones are one problem.
    pub fn missing(&mut self, r: &KafkaRecord, layout: &Layout, report: &mut TopicReport) {
        if let Some(run) = &mut self.missing
            && run.2 < r.offset
        {
            run.2 = r.offset;
            run.3 += 1;
            return;
        }
        self.flush_missing(report);
        let at = r.timestamp_ms.unwrap_or(0);
        self.missing = Some((parquet::key(layout, &r.topic, r.partition, r.offset, at), r.offset, r.offset, 1));
    }

    /// Reports the run of records in no object, if there is one.
    pub fn flush_missing(&mut self, report: &mut TopicReport) {
        let Some((key, first, last, n)) = self.missing.take() else { return };
        report.counts.missing += n;
        let detail = format!("{} in Kafka and in no object", span(first, last, n));
        report.problems.push(Problem { kind: ProblemKind::Missing, key, detail });
    }

    /// The rows left once Kafka's records were compared (all of them with `--bucket-only`):
    /// checked alone up to Kafka's last offset, reported past it.
    pub async fn finish(mut self, kafka: Option<(i64, i64)>, report: &mut TopicReport) {
        self.flush_missing(report);
        while let Some(found) = self.take_peeked(report).await {
            match kafka {
                Some((_, last)) if found.row.offset > last => {
                    let past = self.past_end.get_or_insert((found.key.clone(), found.row.offset, found.row.offset, 0));
                    if past.0 != found.key {
                        let done = std::mem::replace(past, (found.key.clone(), found.row.offset, found.row.offset, 0));
                        past_end(self.partition, last, done, report);
                    }
                    let past = self.past_end.as_mut().expect("set above");
                    past.2 = found.row.offset;
                    past.3 += 1;
                }
                _ => self.alone(&found, kafka.map(|(first, _)| first), report),
            }
        }
        if let (Some((_, last)), Some(done)) = (kafka, self.past_end.take()) {
            past_end(self.partition, last, done, report);
        }
        if let Some((kafka_first, _)) = kafka
            && let Some(previous) = self.previous_alone
            && previous < kafka_first - 1
        {
            let n = (kafka_first - 1 - previous) as u64;
            report.counts.gap_offsets += n;
            let detail = format!(
                "partition {}: offsets {}..={} are neither archived nor in Kafka any more",
                self.partition,
                previous + 1,
                kafka_first - 1
            );
            report.problems.push(Problem { kind: ProblemKind::Gap, key: String::new(), detail });
        }
    }

    async fn take_peeked(&mut self, report: &mut TopicReport) -> Option<Found> {
        self.peek(report).await?;
        self.take()
    }

    /// A row Kafka did not give: counted, and where Kafka cannot tell (below `kafka_first`, or
    /// no Kafka), the offsets between it and the previous such row are a gap.
    fn alone(&mut self, found: &Found, kafka_first: Option<i64>, report: &mut TopicReport) {
        let offset = found.row.offset;
        report.counts.offsets += 1;
        report.counts.tombstones += u64::from(found.row.payload.is_none());
        if kafka_first.is_some_and(|first| offset >= first) {
            return;
        }
        if let Some(p) = self.previous_alone
            && offset > p + 1
        {
            report.counts.gap_offsets += (offset - p - 1) as u64;
            let detail = format!(
                "partition {}: offsets {}..={} are in no object and Kafka no longer has them \
                 (compaction or a transaction marker also leaves no row)",
                self.partition,
                p + 1,
                offset - 1
            );
            report.problems.push(Problem { kind: ProblemKind::Gap, key: found.key.to_string(), detail });
        }
        self.previous_alone = Some(offset);
    }

    /// Opens the next object; false when there is none left.
    async fn open_next(&mut self, report: &mut TopicReport) -> bool {
        // Nothing is read before the walk is: the partitions not being compared hold no memory.
        self.prefetch();
        while let Some((listed, get)) = self.fetching.take() {
            self.prefetch();
            let body = match get.await.expect("a GET does not panic") {
                Ok(body) => body,
                Err(e) => {
                    report.problem(ProblemKind::Missing, &listed.key, format!("listed, but cannot be read: {e}"));
                    continue;
                }
            };
            report.counts.bodies_compared += 1;
            let parsed = listed.parsed.as_ref().expect("a Parquet object's key parses");
            match parquet::rows(body) {
                Err(e) => {
                    let detail = format!(
                        "not a readable Parquet object ({e}): truncated or not written by an archiver; \
                         its records count as not archived"
                    );
                    report.problem(ProblemKind::Mismatched, &listed.key, detail);
                }
                Ok(rows) if rows.count == 0 => {
                    report.problem(ProblemKind::Mismatched, &listed.key, "holds no rows");
                }
                Ok(rows) => {
                    self.open = Some(Open {
                        key: Arc::from(listed.key.as_str()),
                        hour: parsed.hour.clone(),
                        name_offset: parsed.offset,
                        rows,
                        previous: None,
                        overlap: None,
                        misfiled: false,
                    });
                    return true;
                }
            }
        }
        false
    }

    /// Closes the object being read, reporting its overlap with earlier objects.
    fn close(&mut self, report: &mut TopicReport) {
        let Some(open) = self.open.take() else { return };
        if let Some((first, last, n, other)) = open.overlap {
            report.counts.archived_twice += n;
            let detail = format!(
                "partition {}: {} in both {other} and {}: objects of a partition never overlap, one of them \
                 was not written by this archive's archiver (another archiver, ARCHIVE_FORMAT changed back and \
                 forth, or a lost spool)",
                self.partition,
                span(first, last, n),
                open.key
            );
            report.problems.push(Problem { kind: ProblemKind::Twice, key: open.key.to_string(), detail });
        }
    }
}

fn past_end(partition: i32, last: i64, (key, first, to, n): (Arc<str>, i64, i64, u64), report: &mut TopicReport) {
    let detail = format!("{} past the last offset Kafka has for partition {partition} ({last})", span(first, to, n));
    report.problem(ProblemKind::Extra, key.as_ref(), detail);
}

/// "offset 7 is" or "offsets 7..=11 (5 records) are".
fn span(first: i64, last: i64, n: u64) -> String {
    if first == last { format!("offset {first} is") } else { format!("offsets {first}..={last} ({n} records) are") }
}

/// Compares a row with the record Kafka has at its offset. The row says how it was written: a
/// row with neither a tstamp nor a reason is a plain payload (VALUE_FORMAT=plain), any other was
/// decoded as a SINETStream message.
pub(super) fn compare_row(r: &KafkaRecord, found: &Found, report: &mut TopicReport) {
    let record = Record {
        topic: r.topic.clone(),
        partition: r.partition,
        offset: r.offset,
        time: r.timestamp_ms.map_or(RecordTime::Consumed(0), RecordTime::Kafka),
        key: r.key.clone(),
        value: r.value.clone(),
        headers: Some(r.headers.clone()),
    };
    let row = &found.row;
    let plain = row.tstamp_us.is_none() && row.undecodable.is_none();
    let mut want = Row::of(&record, !plain);
    if row.headers.is_none() {
        // Written before headers were kept: there is nothing to compare them with.
        want.headers = None;
    }
    report.counts.tombstones += u64::from(r.value.is_none());
    if want == *row {
        return;
    }
    let mut differ = Vec::new();
    if want.kafka_timestamp_ms != row.kafka_timestamp_ms {
        differ.push(format!("kafka_timestamp {:?} (Kafka: {:?})", row.kafka_timestamp_ms, want.kafka_timestamp_ms));
    }
    if want.key != row.key {
        differ.push("key".to_string());
    }
    if want.tstamp_us != row.tstamp_us {
        differ.push(format!("tstamp {:?} (Kafka: {:?})", row.tstamp_us, want.tstamp_us));
    }
    if want.payload != row.payload {
        let len = |b: &Option<Bytes>| b.as_ref().map_or("null".to_string(), |b| format!("{} bytes", b.len()));
        differ.push(format!("payload {} (Kafka: {})", len(&row.payload), len(&want.payload)));
    }
    if want.headers != row.headers {
        let count = |h: &Option<crate::record::Headers>| h.as_ref().map_or("null".to_string(), |h| h.len().to_string());
        differ.push(format!("headers {} (Kafka: {})", count(&row.headers), count(&want.headers)));
    }
    if want.undecodable != row.undecodable {
        differ.push(format!("undecodable {:?} (Kafka: {:?})", row.undecodable, want.undecodable));
    }
    let detail = format!("offset {}: {} differ from the record in Kafka", r.offset, differ.join(", "));
    report.problem(ProblemKind::Mismatched, found.key.as_ref(), detail);
}

#[cfg(test)]
mod tests {
    use object_store::PutPayload;
    use object_store::memory::InMemory;

    use super::*;
    use crate::archive::sinetstream::{Format, encode};
    use crate::tools::progress::Progress;
    use crate::tools::verify::audit;
    use crate::tools::verify::tests::{config, options};

    /// 10:00 on 2022-04-18 in Tokyo, the default layout's time zone.
    const HOUR: i64 = 1_650_243_600_000;

    /// A SINETStream message at `offset` of partition 0, a second apart from the previous.
    fn row(offset: i64) -> Row {
        let value = Bytes::from(encode(1_650_250_000_000_000 + offset, b"{\"v\":1}", Format::V3));
        let record = Record {
            topic: "t".into(),
            partition: 0,
            offset,
            time: RecordTime::Kafka(HOUR + offset * 1000),
            key: None,
            value: Some(value),
            headers: None,
        };
        Row::of(&record, true)
    }

    /// Stores the rows of `offsets` as one object, named by its first offset; its key.
    async fn put(store: &InMemory, offsets: std::ops::Range<i64>) -> String {
        let rows: Vec<Row> = offsets.map(row).collect();
        let key = parquet::key(&Layout::default(), "t", 0, rows[0].offset, HOUR);
        let mut w = parquet::Writer::new(3).unwrap();
        let body = [w.row_group(&rows).unwrap(), w.finish().unwrap()].concat();
        store.put(&Path::from(key.as_str()), PutPayload::from(body)).await.unwrap();
        key
    }

    async fn verify(store: Arc<InMemory>) -> TopicReport {
        audit(&config(), store, &options(), Progress::new("test")).await.unwrap().remove(0)
    }

    fn kinds(r: &TopicReport) -> Vec<(ProblemKind, &str)> {
        r.problems.iter().map(|p| (p.kind, p.key.as_str())).collect()
    }

    #[tokio::test]
    async fn objects_that_follow_each_other_are_clean() {
        let store = Arc::new(InMemory::new());
        for range in [0..10, 10..25, 25..26] {
            put(&store, range).await;
        }
        let r = verify(store).await;
        assert_eq!(r.counts.problems(), 0, "{:?}", r.problems);
        assert_eq!((r.counts.offsets, r.counts.objects_found, r.counts.bodies_compared), (26, 3, 3));
    }

    #[tokio::test]
    async fn an_offset_range_checks_the_objects_that_hold_it_and_only_its_offsets() {
        let store = Arc::new(InMemory::new());
        for range in [0..10, 10..25, 25..30, 30..40] {
            put(&store, range).await;
        }
        let mut o = options();
        (o.selection.from_offset, o.selection.to_offset) = (Some(12), Some(27));
        let r = audit(&config(), store, &o, Progress::new("test")).await.unwrap().remove(0);
        assert_eq!(r.counts.problems(), 0, "{:?}", r.problems);
        assert_eq!((r.counts.offsets, r.counts.objects_found), (16, 2), "offsets 12..=27 in two objects");
    }

    #[tokio::test]
    async fn a_deleted_object_is_a_gap_between_its_neighbours() {
        let store = Arc::new(InMemory::new());
        let keys = [put(&store, 0..10).await, put(&store, 10..25).await, put(&store, 25..30).await];
        store.delete(&Path::from(keys[1].as_str())).await.unwrap();
        let r = verify(store).await;
        assert_eq!(kinds(&r), [(ProblemKind::Gap, keys[2].as_str())], "{:?}", r.problems);
        assert!(r.problems[0].detail.contains("offsets 10..=24"), "{}", r.problems[0].detail);
        assert_eq!((r.counts.gap_offsets, r.counts.offsets), (15, 15));
    }

    #[tokio::test]
    async fn a_truncated_object_is_unreadable_and_its_records_a_gap() {
        let store = Arc::new(InMemory::new());
        let keys = [put(&store, 0..10).await, put(&store, 10..25).await, put(&store, 25..30).await];
        let path = Path::from(keys[1].as_str());
        let body = store.get(&path).await.unwrap().bytes().await.unwrap();
        store.put(&path, PutPayload::from(body.slice(..body.len() / 2))).await.unwrap();
        let r = verify(store).await;
        assert_eq!(kinds(&r), [(ProblemKind::Mismatched, keys[1].as_str()), (ProblemKind::Gap, keys[2].as_str())]);
        assert!(r.problems[0].detail.contains("not a readable Parquet object"), "{}", r.problems[0].detail);
        assert_eq!(r.counts.gap_offsets, 15);
    }

    #[tokio::test]
    async fn an_overlapping_object_names_both_objects_and_the_offsets() {
        let store = Arc::new(InMemory::new());
        let first = put(&store, 0..10).await;
        let second = put(&store, 6..20).await;
        let r = verify(store).await;
        assert_eq!(kinds(&r), [(ProblemKind::Twice, second.as_str())], "{:?}", r.problems);
        let detail = &r.problems[0].detail;
        assert!(detail.contains("offsets 6..=9 (4 records) are") && detail.contains(&first), "{detail}");
        assert_eq!((r.counts.archived_twice, r.counts.offsets), (4, 20));
    }

    #[tokio::test]
    async fn an_object_whose_name_or_hour_is_not_its_rows_is_mismatched() {
        let store = Arc::new(InMemory::new());
        let key = put(&store, 0..10).await;
        let body = store.get(&Path::from(key.as_str())).await.unwrap().bytes().await.unwrap();
        let renamed = key.replace("+0000000000.", "+0000000003.");
        let moved = key.replace("hour=10", "hour=11").replace("+0000000000.", "+0000000010.");
        store.delete(&Path::from(key.as_str())).await.unwrap();
        store.put(&Path::from(renamed.as_str()), PutPayload::from(body.clone())).await.unwrap();
        let rows: Vec<Row> = (10..12).map(row).collect();
        let mut w = parquet::Writer::new(3).unwrap();
        let body = [w.row_group(&rows).unwrap(), w.finish().unwrap()].concat();
        store.put(&Path::from(moved.as_str()), PutPayload::from(body)).await.unwrap();
        let r = verify(store).await;
        let details: Vec<&str> = r.problems.iter().map(|p| p.detail.as_str()).collect();
        assert_eq!(r.counts.mismatched, 2, "{details:?}");
        assert!(details.iter().any(|d| d.contains("its first row is offset 0, its name says 3")), "{details:?}");
        assert!(details.iter().any(|d| d.contains("not in this object's hour")), "{details:?}");
    }
}
