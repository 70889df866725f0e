//! Keys and bodies: the exact objects the Kafka Connect deployment wrote for a record.
//!
//! ```text
//! topics/T/year=YYYY/month=MM/day=dd/hour=HH/T+P+OOOOOOOOOO<extension>    payload + separator
//! topics/T/year=YYYY/month=MM/day=dd/hour=HH/T+P+OOOOOOOOOO-timestamp.txt  tstamp text + separator
//! errors/T/year=YYYY/month=MM/day=dd/hour=HH/T+P+OOOOOOOOOO.raw            raw value (dead letter)
//! errors/T/year=YYYY/month=MM/day=dd/hour=HH/T+P+OOOOOOOOOO-reason.txt     why it was dead-lettered
//! ```
//!
//! The hour path is the Kafka record timestamp in the configured time zone (the old connector's
//! TimeBasedPartitioner); the timestamp object is the producer's tstamp in UTC, formatted as
//! Kafka Connect's TimestampConverter did. Every key and body is a function of the record and the
//! settings alone, so a retried upload rewrites identical bytes under the identical key.

use bytes::Bytes;
use chrono::{DateTime, Datelike, TimeZone, Timelike};
use chrono_tz::Tz;

/// The settings that shape keys and bodies.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Time zone of the `year=/month=/day=/hour=` path.
    pub timezone: Tz,
    /// Payload object extension, `.bin` by default (S3_OBJECT_EXTENSION).
    pub extension: String,
    /// Appended to every archived body, `\n` by default (S3_OBJECT_SEPARATOR).
    pub separator: Bytes,
}

impl Default for Layout {
    /// The Kafka Connect deployment's settings: Asia/Tokyo, `.bin`, `\n`.
    fn default() -> Layout {
        Layout { timezone: chrono_tz::Asia::Tokyo, extension: ".bin".into(), separator: Bytes::from_static(b"\n") }
    }
}

/// What an object is, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectKind {
    Payload,
    Timestamp,
    DeadLetter,
    DeadLetterReason,
    /// A Parquet object of the batched format: many records of one partition-hour.
    Parquet,
}

impl ObjectKind {
    pub fn label(self) -> &'static str {
        match self {
            ObjectKind::Payload => "payload",
            ObjectKind::Timestamp => "timestamp",
            ObjectKind::DeadLetter => "dead_letter",
            ObjectKind::DeadLetterReason => "dead_letter_reason",
            ObjectKind::Parquet => "parquet",
        }
    }
}

/// One object to store: its key and its body, kept as chunks so a payload is never copied.
#[derive(Debug, Clone)]
pub struct Object {
    pub kind: ObjectKind,
    pub key: String,
    pub body: Vec<Bytes>,
    /// User metadata (name, value) for stores that keep it; see [`crate::archive`].
    pub metadata: Vec<(&'static str, String)>,
}

impl Object {
    pub fn len(&self) -> usize {
        self.body.iter().map(Bytes::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The body as one contiguous buffer (tests and small objects).
    pub fn body_bytes(&self) -> Vec<u8> {
        self.body.concat()
    }
}

/// Where a record sits in Kafka, and the time its path is derived from.
#[derive(Debug, Clone, Copy)]
pub struct RecordPlace<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Kafka record timestamp (or, for a record without one, the time it was consumed), ms.
    pub path_time_ms: i64,
}

impl Layout {
    /// `topics/T/year=…/hour=HH/T+P+OOOOOOOOOO`: the payload and timestamp keys without suffix.
    fn stem(&self, root: &str, place: &RecordPlace<'_>) -> String {
        let t = place.topic;
        format!("{root}/{t}/{}/{t}+{}+{:010}", self.hour_path(place.path_time_ms), place.partition, place.offset)
    }

    /// `year=YYYY/month=MM/day=dd/hour=HH` of a millisecond timestamp in the layout's time zone.
    pub fn hour_path(&self, ms: i64) -> String {
        let utc = DateTime::from_timestamp_millis(ms)
            .or_else(|| DateTime::from_timestamp_millis(0))
            .expect("epoch is representable");
        let local = self.timezone.from_utc_datetime(&utc.naive_utc());
        format!("year={:04}/month={:02}/day={:02}/hour={:02}", local.year(), local.month(), local.day(), local.hour())
    }

    /// The payload object: the Avro `msg` bytes as carried, then the separator.
    pub fn payload(&self, place: &RecordPlace<'_>, msg: Bytes) -> Object {
        Object {
            kind: ObjectKind::Payload,
            key: format!("{}{}", self.stem("topics", place), self.extension),
            body: self.with_separator(msg),
            metadata: Vec::new(),
        }
    }

    /// The timestamp object: `tstamp_us / 1000` as UTC `yyyy-MM-ddTHH:mm:ss.SSS`, then the separator.
    pub fn timestamp(&self, place: &RecordPlace<'_>, tstamp_ms: i64) -> Object {
        Object {
            kind: ObjectKind::Timestamp,
            key: format!("{}-timestamp.txt", self.stem("topics", place)),
            body: self.with_separator(Bytes::from(timestamp_text(tstamp_ms))),
            metadata: Vec::new(),
        }
    }

    /// The dead letter: the raw record value, stored as is (no separator: it is not an archive body).
    pub fn dead_letter(&self, place: &RecordPlace<'_>, value: Bytes) -> Object {
        Object {
            kind: ObjectKind::DeadLetter,
            key: format!("{}.raw", self.stem("errors", place)),
            body: vec![value],
            metadata: Vec::new(),
        }
    }

    /// A short text beside the dead letter saying where it came from and why it was set aside.
    pub fn dead_letter_reason(&self, place: &RecordPlace<'_>, kafka_ts: Option<i64>, reason: &str) -> Object {
        let ts = kafka_ts.map_or_else(|| "none".to_string(), |ms| ms.to_string());
        let text = format!(
            "topic: {}\npartition: {}\noffset: {}\nkafka_timestamp_ms: {ts}\nreason: {reason}\n",
            place.topic, place.partition, place.offset
        );
        Object {
            kind: ObjectKind::DeadLetterReason,
            key: format!("{}-reason.txt", self.stem("errors", place)),
            body: vec![Bytes::from(text)],
            metadata: Vec::new(),
        }
    }

    /// For a write-once conflict: the object under `errors/` (same path, `errors` root), and a
    /// text beside it naming the key whose bytes differed.
    pub fn conflict(&self, object: &Object) -> [Object; 2] {
        let key = format!("errors/{}", object.key.strip_prefix("topics/").unwrap_or(&object.key));
        let text = format!(
            "key: {}\nreason: write-once conflict: the key already held other bytes; they were kept, and these are the archiver's\n",
            object.key
        );
        [
            Object {
                kind: ObjectKind::DeadLetter,
                key: key.clone(),
                body: object.body.clone(),
                metadata: object.metadata.clone(),
            },
            Object {
                kind: ObjectKind::DeadLetterReason,
                key: format!("{key}-conflict.txt"),
                body: vec![Bytes::from(text)],
                metadata: Vec::new(),
            },
        ]
    }

    fn with_separator(&self, body: Bytes) -> Vec<Bytes> {
        if self.separator.is_empty() { vec![body] } else { vec![body, self.separator.clone()] }
    }
}

/// Microseconds to milliseconds as Java's integer division does it: truncated toward zero.
pub fn micros_to_millis(us: i64) -> i64 {
    us / 1000
}

/// Formats epoch milliseconds as Kafka Connect's TimestampConverter did:
/// `SimpleDateFormat("yyyy-MM-dd'T'HH:mm:ss.SSS")` in UTC.
///
/// `SimpleDateFormat` uses Java's `GregorianCalendar`, which switches to the Julian calendar before
/// 1582-10-15 and prints the year of era (1 BC is `0001`). chrono is proleptic Gregorian and
/// stops at year 262143, so the calendar arithmetic is written out here for the full `i64` range.
pub fn timestamp_text(ms: i64) -> String {
    // The first instant of the Gregorian calendar in Java: 1582-10-15T00:00:00Z.
    const GREGORIAN_CUTOVER_MS: i64 = -12_219_292_800_000;
    let days = ms.div_euclid(86_400_000);
    let ms_of_day = ms.rem_euclid(86_400_000);
    let (year, month, day) =
        if ms >= GREGORIAN_CUTOVER_MS { gregorian_from_days(days) } else { julian_from_days(days) };
    let year_of_era = if year <= 0 { 1 - year } else { year };
    format!(
        "{year_of_era:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

/// Proleptic Gregorian date of a day count since 1970-01-01 (astronomical year numbering).
fn gregorian_from_days(days: i64) -> (i64, i64, i64) {
    // Eras of 400 years (146097 days) starting on March 1st, so the leap day ends a year.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Julian calendar date of a day count since 1970-01-01 (astronomical year numbering).
fn julian_from_days(days: i64) -> (i64, i64, i64) {
    // Cycles of 4 Julian years (1461 days) starting on March 1st of year 0; 1970-01-01 is
    // Julian 1969-12-19, which is day 719_470 counted from 0000-03-01 (Julian).
    let z = days + 719_470;
    let cycle = z.div_euclid(1461);
    let doc = z.rem_euclid(1461);
    let yoc = (doc - doc / 1460) / 365;
    let doy = doc - 365 * yoc;
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoc + cycle * 4 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout::default()
    }

    #[test]
    fn keys_follow_the_seed_example() {
        // 2022-04-18T01:00:00Z is 10:00 in Tokyo, as in the seed's listing.
        let place =
            RecordPlace { topic: "sinetstream.sensor", partition: 0, offset: 0, path_time_ms: 1_650_243_600_000 };
        let l = Layout { extension: ".json".into(), ..layout() };
        assert_eq!(
            l.payload(&place, Bytes::new()).key,
            "topics/sinetstream.sensor/year=2022/month=04/day=18/hour=10/sinetstream.sensor+0+0000000000.json"
        );
        assert_eq!(
            l.timestamp(&place, 0).key,
            "topics/sinetstream.sensor/year=2022/month=04/day=18/hour=10/sinetstream.sensor+0+0000000000-timestamp.txt"
        );
    }

    #[test]
    fn wide_offsets_are_written_in_full_and_errors_have_their_own_root() {
        let place = RecordPlace { topic: "t", partition: 12, offset: 12_345_678_901, path_time_ms: 0 };
        let l = layout();
        assert_eq!(
            l.payload(&place, Bytes::new()).key,
            "topics/t/year=1970/month=01/day=01/hour=09/t+12+12345678901.bin"
        );
        assert_eq!(
            l.dead_letter(&place, Bytes::new()).key,
            "errors/t/year=1970/month=01/day=01/hour=09/t+12+12345678901.raw"
        );
        assert_eq!(
            l.dead_letter_reason(&place, None, "x").key,
            "errors/t/year=1970/month=01/day=01/hour=09/t+12+12345678901-reason.txt"
        );
    }

    #[test]
    fn bodies_end_with_the_separator_or_not() {
        let place = RecordPlace { topic: "t", partition: 0, offset: 1, path_time_ms: 0 };
        let l = layout();
        assert_eq!(l.payload(&place, Bytes::from_static(b"abc")).body_bytes(), b"abc\n");
        assert_eq!(l.timestamp(&place, 1_650_250_000_123).body_bytes(), b"2022-04-18T02:46:40.123\n");
        assert_eq!(l.timestamp(&place, 0).len(), 24);
        let bare = Layout { separator: Bytes::new(), ..layout() };
        assert_eq!(bare.payload(&place, Bytes::from_static(b"abc")).body_bytes(), b"abc");
    }

    #[test]
    fn timestamp_text_matches_java() {
        assert_eq!(timestamp_text(micros_to_millis(1_650_250_000_123_456)), "2022-04-18T02:46:40.123");
        assert_eq!(timestamp_text(micros_to_millis(4_102_444_800_000_001)), "2100-01-01T00:00:00.000");
        // Java truncates toward zero: -1 µs is 0 ms, -1500 µs is -1 ms.
        assert_eq!(timestamp_text(micros_to_millis(-1)), "1970-01-01T00:00:00.000");
        assert_eq!(timestamp_text(micros_to_millis(-1500)), "1969-12-31T23:59:59.999");
        // The Gregorian cutover and the Julian calendar before it, as GregorianCalendar prints them.
        assert_eq!(timestamp_text(-12_219_292_800_000), "1582-10-15T00:00:00.000");
        assert_eq!(timestamp_text(-12_219_292_800_001), "1582-10-04T23:59:59.999");
        // 0001-01-01 (Julian) and the day before it, 1 BC, printed as year of era.
        assert_eq!(timestamp_text(-62_135_769_600_000), "0001-01-01T00:00:00.000");
        assert_eq!(timestamp_text(-62_135_769_600_001), "0001-12-31T23:59:59.999");
        // Far future: more than four year digits, past chrono's range.
        assert_eq!(timestamp_text(253_402_300_800_000), "10000-01-01T00:00:00.000");
        // Expected texts printed by Java 17's SimpleDateFormat for the same milliseconds.
        assert_eq!(timestamp_text(i64::MAX / 1000), "294247-01-10T04:00:54.775");
        assert_eq!(timestamp_text(i64::MIN / 1000), "290303-12-10T19:59:05.225");
        assert_eq!(timestamp_text(-62_198_755_200_000), "0002-01-03T00:00:00.000");
        assert_eq!(timestamp_text(-100_000_000_000_000), "1200-02-26T14:13:20.000");
    }

    #[test]
    fn gregorian_dates_agree_with_chrono() {
        for days in (-200_000..200_000).step_by(997) {
            let ms = days * 86_400_000 + 45_296_789;
            let d = DateTime::from_timestamp_millis(ms).unwrap();
            if ms >= -12_219_292_800_000 {
                assert_eq!(timestamp_text(ms), d.format("%Y-%m-%dT%H:%M:%S%.3f").to_string());
            }
        }
    }

    #[test]
    fn hour_path_is_in_the_layout_time_zone() {
        let l = layout();
        // 2022-04-18T14:59:59.999Z is 23:59 in Tokyo; a millisecond later is the next day.
        assert_eq!(l.hour_path(1_650_293_999_999), "year=2022/month=04/day=18/hour=23");
        assert_eq!(l.hour_path(1_650_294_000_000), "year=2022/month=04/day=19/hour=00");
        let utc = Layout { timezone: chrono_tz::UTC, ..layout() };
        assert_eq!(utc.hour_path(1_650_294_000_000), "year=2022/month=04/day=18/hour=15");
    }
}
