//! The batched format (issue 23, ARCHIVE_FORMAT=parquet): many records of one partition and one
//! hour in one Parquet object, zstd-compressed, one row per record.
//!
//! ```text
//! topics/T/year=YYYY/month=MM/day=dd/hour=HH/T+P+<first offset, 10 digits>.zstd.parquet
//! ```
//!
//! The name is Kafka Connect's ParquetFormat's (`T+P+startOffset.<codec>.parquet`), so an object's
//! key is a function of its first offset: a retried upload of the same range rewrites the same key.
//! The columns, in this order (pyarrow and DuckDB read them as the types on the right):
//!
//! ```text
//! offset           int64                                  required
//! kafka_timestamp  timestamp[ms, UTC]                     null when the record had none
//! key              binary                                 null when none
//! headers          list<struct<name: string, value: binary>>  empty when none (null: not kept)
//! tstamp           timestamp[us, UTC]                     the SINETStream tstamp; null when not one
//! payload          binary                                 the SINETStream msg bytes, or the raw value
//! undecodable      string                                 why the value is not a SINETStream message
//! ```
//!
//! Writing is streamed: [`Writer::row_group`] encodes a batch of rows and hands back the bytes
//! produced so far, to be sent on (a multipart upload) before the next batch is encoded, so memory
//! holds one row group, not the object. [`read`] gives the rows back, for `verify`, `restore` and
//! tests.

use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::{Compression, ZstdLevel};
use parquet::column::writer::ColumnWriter;
use parquet::data_type::ByteArray;
use parquet::errors::ParquetError;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::reader::RowIter;
use parquet::record::{Field, List};
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::ColumnPath;

use super::layout::Layout;
use super::sinetstream;
use crate::record::Record;

/// The key's suffix: the codec, then `.parquet`, as Kafka Connect names its Parquet files.
pub const EXTENSION: &str = ".zstd.parquet";

/// The schema, in Parquet's message syntax. `headers` is the standard three-level LIST (not a
/// MAP: Kafka headers may repeat a name).
const SCHEMA: &str = "
message kafka_record {
  required int64 offset;
  optional int64 kafka_timestamp (TIMESTAMP(MILLIS,true));
  optional binary key;
  optional group headers (LIST) {
    repeated group list {
      required group element {
        required binary name (STRING);
        optional binary value;
      }
    }
  }
  optional int64 tstamp (TIMESTAMP(MICROS,true));
  optional binary payload;
  optional binary undecodable (STRING);
}
";

/// One Kafka record as a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub offset: i64,
    /// The Kafka record timestamp, ms; None for a record that had none.
    pub kafka_timestamp_ms: Option<i64>,
    pub key: Option<Bytes>,
    /// The record's headers (name, value), empty when it has none; None in objects written before
    /// headers were kept.
    pub headers: Option<Vec<(String, Option<Bytes>)>>,
    /// The SINETStream tstamp, µs; None when the value is not a SINETStream message.
    pub tstamp_us: Option<i64>,
    /// The SINETStream `msg` bytes, or the raw value when it is not a message (or not decoded);
    /// None for a tombstone.
    pub payload: Option<Bytes>,
    /// Why the value is not a SINETStream message; None for a message, or when not decoded.
    pub undecodable: Option<String>,
}

impl Row {
    /// A record as a row. With `sinetstream`, the value is decoded: a message gives its `msg` and
    /// tstamp, anything else is kept raw with the reason. Without, every value is a plain payload
    /// (topics that do not carry SINETStream messages).
    pub fn of(record: &Record, sinetstream: bool) -> Row {
        Row::decoded(record, sinetstream).0
    }

    /// [`Row::of`], and why the value is not a SINETStream message.
    pub fn decoded(record: &Record, sinetstream: bool) -> (Row, Option<sinetstream::Undecodable>) {
        let (tstamp_us, payload, why) = match &record.value {
            None => (None, None, None),
            Some(value) if !sinetstream => (None, Some(value.clone()), None),
            Some(value) => match sinetstream::decode(value) {
                Ok(msg) => (Some(msg.tstamp_us), Some(value.slice(msg.msg)), None),
                Err(why) => (None, Some(value.clone()), Some(why)),
            },
        };
        let undecodable = why.as_ref().map(ToString::to_string);
        let row = Row {
            offset: record.offset,
            kafka_timestamp_ms: record.time.kafka(),
            key: record.key.clone(),
            headers: record.headers.clone(),
            tstamp_us,
            payload,
            undecodable,
        };
        (row, why)
    }
}

/// The key of the object whose first record is at `first_offset`, in the hour of `hour_ms`.
pub fn key(layout: &Layout, topic: &str, partition: i32, first_offset: i64, hour_ms: i64) -> String {
    format!("topics/{topic}/{}/{topic}+{partition}+{first_offset:010}{EXTENSION}", layout.hour_path(hour_ms))
}

/// Writes one object, row group by row group.
pub struct Writer {
    file: SerializedFileWriter<Vec<u8>>,
}

impl Writer {
    /// A new object compressed with zstd at `zstd_level` (1, the default, is zstd's fastest
    /// regular level; up to 22).
    pub fn new(zstd_level: i32) -> Result<Writer, ParquetError> {
        let schema = Arc::new(parse_message_type(SCHEMA)?);
        let column = |path: &[&str]| ColumnPath::new(path.iter().map(|s| s.to_string()).collect());
        // Statistics where readers prune (offsets, the two timestamps); a payload's min and max
        // would only cost space. Dictionaries rarely pay off on values, but header names repeat.
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::try_new(zstd_level)?))
            .set_statistics_enabled(EnabledStatistics::None)
            .set_dictionary_enabled(false)
            .set_column_dictionary_enabled(column(&["headers", "list", "element", "name"]), true)
            .set_created_by(format!("kafka-s3-archiver {}", env!("CARGO_PKG_VERSION")));
        for name in ["offset", "kafka_timestamp", "tstamp"] {
            props = props.set_column_statistics_enabled(column(&[name]), EnabledStatistics::Page);
        }
        let file = SerializedFileWriter::new(Vec::new(), schema, Arc::new(props.build()))?;
        Ok(Writer { file })
    }

    /// Encodes `rows` as one row group and returns the bytes produced since the last call (the
    /// first call's start with the file's magic). Rows must be in offset order.
    pub fn row_group(&mut self, rows: &[Row]) -> Result<Bytes, ParquetError> {
        let mut group = self.file.next_row_group()?;
        let mut leaf = 0;
        while let Some(mut column) = group.next_column()? {
            write_leaf(leaf, rows, column.untyped())?;
            column.close()?;
            leaf += 1;
        }
        group.close()?;
        self.file.flush()?;
        Ok(Bytes::from(std::mem::take(self.file.inner_mut())))
    }

    /// Writes the footer; returns the object's last bytes.
    pub fn finish(mut self) -> Result<Bytes, ParquetError> {
        self.file.finish()?;
        Ok(Bytes::from(std::mem::take(self.file.inner_mut())))
    }
}

/// The definition levels and present values of an optional column.
fn optional<T: Clone>(values: impl Iterator<Item = Option<T>>) -> (Vec<T>, Vec<i16>) {
    let (mut present, mut levels) = (Vec::new(), Vec::new());
    for v in values {
        levels.push(i16::from(v.is_some()));
        present.extend(v);
    }
    (present, levels)
}

fn byte_array(b: &Bytes) -> ByteArray {
    ByteArray::from(b.clone())
}

/// Writes leaf column `leaf` (schema order) of `rows`.
fn write_leaf(leaf: usize, rows: &[Row], column: &mut ColumnWriter<'_>) -> Result<(), ParquetError> {
    let int64 = |column: &mut ColumnWriter<'_>, (values, defs): (Vec<i64>, Vec<i16>)| -> Result<(), ParquetError> {
        let ColumnWriter::Int64ColumnWriter(w) = column else { unreachable!("schema: int64") };
        w.write_batch(&values, Some(&defs), None).map(drop)
    };
    let bytes =
        |column: &mut ColumnWriter<'_>, (values, defs): (Vec<ByteArray>, Vec<i16>)| -> Result<(), ParquetError> {
            let ColumnWriter::ByteArrayColumnWriter(w) = column else { unreachable!("schema: binary") };
            w.write_batch(&values, Some(&defs), None).map(drop)
        };
    match leaf {
        0 => {
            let ColumnWriter::Int64ColumnWriter(w) = column else { unreachable!("schema: int64") };
            let offsets: Vec<i64> = rows.iter().map(|r| r.offset).collect();
            w.write_batch(&offsets, None, None).map(drop)
        }
        1 => int64(column, optional(rows.iter().map(|r| r.kafka_timestamp_ms))),
        2 => bytes(column, optional(rows.iter().map(|r| r.key.as_ref().map(byte_array)))),
        3 | 4 => write_headers(leaf == 4, rows, column),
        5 => int64(column, optional(rows.iter().map(|r| r.tstamp_us))),
        6 => bytes(column, optional(rows.iter().map(|r| r.payload.as_ref().map(byte_array)))),
        7 => bytes(column, optional(rows.iter().map(|r| r.undecodable.as_deref().map(ByteArray::from)))),
        _ => Err(ParquetError::General(format!("the schema has no leaf column {leaf}"))),
    }
}

/// The `name` (or with `value`, the `value`) leaf of the headers. Definition levels: 0 no list,
/// 1 an empty list, 2 an element (a null value), 3 a value; repetition 1 for every element of a
/// row after its first.
fn write_headers(value: bool, rows: &[Row], column: &mut ColumnWriter<'_>) -> Result<(), ParquetError> {
    let ColumnWriter::ByteArrayColumnWriter(w) = column else { unreachable!("schema: binary") };
    let (mut values, mut defs, mut reps) = (Vec::new(), Vec::new(), Vec::new());
    for row in rows {
        let Some(h) = row.headers.as_ref().filter(|h| !h.is_empty()) else {
            // No list (0), or an empty one (1).
            defs.push(i16::from(row.headers.is_some()));
            reps.push(0);
            continue;
        };
        for (i, (name, v)) in h.iter().enumerate() {
            reps.push(i16::from(i > 0));
            match (value, v) {
                (false, _) => {
                    defs.push(2);
                    values.push(ByteArray::from(name.as_str()));
                }
                (true, Some(v)) => {
                    defs.push(3);
                    values.push(byte_array(v));
                }
                (true, None) => defs.push(2),
            }
        }
    }
    w.write_batch(&values, Some(&defs), Some(&reps)).map(drop)
}

/// How long the footer's metadata is, from an object's last 8 bytes ([`FOOTER_TAIL`]): the
/// metadata is the bytes just before them.
pub fn metadata_length(tail: &[u8]) -> Result<usize, ParquetError> {
    Ok(parquet::file::metadata::FooterTail::try_from(tail)?.metadata_length())
}

/// The size of an object's tail that says how long its metadata is.
pub const FOOTER_TAIL: u64 = 8;

/// The first and last offset and the row count, from an object's footer metadata (the offset
/// column's row-group statistics); None when it has no such statistics (another writer).
pub fn span_of_metadata(metadata: &[u8]) -> Result<Option<(i64, i64, u64)>, ParquetError> {
    use parquet::file::metadata::ParquetMetaDataReader;
    use parquet::file::statistics::Statistics;
    let meta = ParquetMetaDataReader::decode_metadata(metadata)?;
    let count = meta.file_metadata().num_rows().max(0) as u64;
    let (mut first, mut last) = (None::<i64>, None::<i64>);
    for group in meta.row_groups() {
        let Some(Statistics::Int64(s)) = group.column(0).statistics() else { return Ok(None) };
        let (Some(&lo), Some(&hi)) = (s.min_opt(), s.max_opt()) else { return Ok(None) };
        first = Some(first.map_or(lo, |f| f.min(lo)));
        last = Some(last.map_or(hi, |l| l.max(hi)));
    }
    match (first, last) {
        (Some(f), Some(l)) => Ok(Some((f, l, count))),
        _ => Err(ParquetError::General("no rows".into())),
    }
}

/// The first and last offset of an object and how many rows it has: from its footer without
/// decoding the rows where it has statistics, from the rows otherwise.
pub fn span(object: Bytes) -> Result<(i64, i64, u64), ParquetError> {
    let n = object.len();
    let tail = object.get(n.saturating_sub(FOOTER_TAIL as usize)..).unwrap_or_default();
    let length = metadata_length(tail)?;
    let start = n.checked_sub(FOOTER_TAIL as usize + length).ok_or_else(|| ParquetError::EOF("footer".into()))?;
    if let Some(span) = span_of_metadata(&object[start..n - FOOTER_TAIL as usize])? {
        return Ok(span);
    }
    let offsets: Vec<i64> = rows(object)?.map(|r| r.map(|r| r.offset)).collect::<Result<_, _>>()?;
    match (offsets.iter().min(), offsets.iter().max()) {
        (Some(&f), Some(&l)) => Ok((f, l, offsets.len() as u64)),
        _ => Err(ParquetError::General("no rows".into())),
    }
}

/// The rows of a Parquet object written by [`Writer`], in the order they were written.
pub fn read(object: Bytes) -> Result<Vec<Row>, ParquetError> {
    rows(object)?.collect()
}

/// The rows of an object one at a time, decoded page by page: memory holds the object's
/// compressed bytes, not its rows. Fails at once when the object has no valid footer (a truncated
/// or foreign object).
pub fn rows(object: Bytes) -> Result<Rows, ParquetError> {
    let reader = SerializedFileReader::new(object)?;
    let count = reader.metadata().file_metadata().num_rows().max(0) as u64;
    Ok(Rows { rows: RowIter::from_file_into(Box::new(reader)), count })
}

/// The iterator [`rows`] gives.
pub struct Rows {
    rows: RowIter<'static>,
    /// How many rows the footer says the object has.
    pub count: u64,
}

impl Iterator for Rows {
    type Item = Result<Row, ParquetError>;

    fn next(&mut self) -> Option<Self::Item> {
        Some(self.rows.next()?.and_then(|row| as_row(&row)))
    }
}

fn as_row(row: &parquet::record::Row) -> Result<Row, ParquetError> {
    let mut r = Row {
        offset: 0,
        kafka_timestamp_ms: None,
        key: None,
        headers: None,
        tstamp_us: None,
        payload: None,
        undecodable: None,
    };
    for (name, field) in row.get_column_iter() {
        match (name.as_str(), field) {
            (_, Field::Null) => {}
            ("offset", Field::Long(v)) => r.offset = *v,
            ("kafka_timestamp", Field::TimestampMillis(v)) => r.kafka_timestamp_ms = Some(*v),
            ("key", Field::Bytes(b)) => r.key = Some(Bytes::copy_from_slice(b.data())),
            ("headers", Field::ListInternal(list)) => r.headers = Some(headers(list)?),
            ("tstamp", Field::TimestampMicros(v)) => r.tstamp_us = Some(*v),
            ("payload", Field::Bytes(b)) => r.payload = Some(Bytes::copy_from_slice(b.data())),
            ("undecodable", Field::Str(s)) => r.undecodable = Some(s.clone()),
            (name, other) => {
                return Err(ParquetError::General(format!("unexpected column {name}: {other:?}")));
            }
        }
    }
    Ok(r)
}

fn headers(list: &List) -> Result<Vec<(String, Option<Bytes>)>, ParquetError> {
    let mut out = Vec::with_capacity(list.len());
    for element in list.elements() {
        let Field::Group(group) = element else {
            return Err(ParquetError::General(format!("a header is not a struct: {element:?}")));
        };
        let (mut name, mut value) = (None, None);
        for (field_name, field) in group.get_column_iter() {
            match (field_name.as_str(), field) {
                ("name", Field::Str(s)) => name = Some(s.clone()),
                ("value", Field::Bytes(b)) => value = Some(Bytes::copy_from_slice(b.data())),
                ("value", Field::Null) => {}
                (other, f) => return Err(ParquetError::General(format!("unexpected header field {other}: {f:?}"))),
            }
        }
        let name = name.ok_or_else(|| ParquetError::General("a header without a name".into()))?;
        out.push((name, value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use parquet::file::statistics::Statistics;

    use super::*;
    use crate::archive::sinetstream::{Format, encode};
    use crate::record::RecordTime;

    fn record(offset: i64, value: Bytes) -> Record {
        Record {
            topic: "t".into(),
            partition: 3,
            offset,
            time: RecordTime::Kafka(1_650_250_000_000 + offset),
            key: None,
            value: Some(value),
            headers: None,
        }
    }

    fn object(groups: &[&[Row]]) -> Bytes {
        let mut w = Writer::new(3).unwrap();
        let mut out = Vec::new();
        for g in groups {
            out.extend_from_slice(&w.row_group(g).unwrap());
        }
        out.extend_from_slice(&w.finish().unwrap());
        Bytes::from(out)
    }

    #[test]
    fn every_column_comes_back_as_written() {
        let message = Bytes::from(encode(1_650_250_000_000_123, b"{\"t\":1}", Format::V3));
        let mut rows = vec![
            Row::of(&record(10, message.clone()), true),
            Row::of(&record(11, Bytes::from_static(b"not a message")), true),
            Row::of(
                &Record { key: Some(Bytes::from_static(b"k")), time: RecordTime::Consumed(5), ..record(12, message) },
                true,
            ),
            Row::of(&record(13, Bytes::from_static(b"")), false),
        ];
        rows[1].headers = Some(vec![]);
        rows[2].headers = Some(vec![("a".into(), Some(Bytes::from_static(b"x"))), ("a".into(), None)]);
        rows[3].headers = Some(vec![("b".into(), Some(Bytes::new()))]);
        rows.push(Row { payload: None, ..Row::of(&record(14, Bytes::new()), false) });

        assert_eq!(rows[0].tstamp_us, Some(1_650_250_000_000_123));
        assert_eq!(rows[0].payload.as_deref(), Some(&b"{\"t\":1}"[..]));
        assert!(rows[1].undecodable.as_deref().unwrap().contains("no SINETStream envelope"), "{:?}", rows[1]);
        assert_eq!(rows[2].kafka_timestamp_ms, None, "consumed time is not a Kafka timestamp");
        assert_eq!((rows[3].tstamp_us, rows[3].undecodable.as_deref()), (None, None), "not decoded");

        let back = read(object(&[&rows[..2], &rows[2..]])).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn row_groups_stream_out_and_the_footer_has_the_statistics_readers_prune_on() {
        let rows: Vec<Row> = (100..1100).map(|o| Row::of(&record(o, Bytes::from(vec![b'x'; 1000])), false)).collect();
        let mut w = Writer::new(1).unwrap();
        let first = w.row_group(&rows[..500]).unwrap();
        assert!(first.starts_with(b"PAR1") && first.len() > 100, "the first row group leaves at once");
        let second = w.row_group(&rows[500..]).unwrap();
        assert!(!second.is_empty());
        let footer = w.finish().unwrap();
        assert!(footer.ends_with(b"PAR1"));
        let object = Bytes::from([first, second, footer].concat());
        // 1,000 values of 1 KB of one byte: zstd takes them to almost nothing.
        assert!(object.len() < 20_000, "{} bytes", object.len());

        let reader = SerializedFileReader::new(object.clone()).unwrap();
        let meta = reader.metadata();
        assert_eq!(meta.num_row_groups(), 2);
        assert_eq!(meta.file_metadata().num_rows(), 1000);
        let Some(Statistics::Int64(offsets)) = meta.row_group(1).column(0).statistics() else {
            panic!("no offset statistics")
        };
        assert_eq!((offsets.min_opt(), offsets.max_opt()), (Some(&600), Some(&1099)));
        let Some(Statistics::Int64(times)) = meta.row_group(0).column(1).statistics() else {
            panic!("no timestamp statistics")
        };
        assert_eq!(times.min_opt(), Some(&(1_650_250_000_000 + 100)));
        assert!(meta.row_group(0).column(6).statistics().is_none(), "no statistics on payloads");
        assert_eq!(span(object.clone()).unwrap(), (100, 1099, 1000), "from the footer");
        assert_eq!(read(object).unwrap(), rows);
    }

    #[test]
    fn the_key_is_kafka_connects_parquet_name_in_the_hour_folder() {
        let key = key(&Layout::default(), "sensor", 2, 1234, 1_650_250_000_000);
        assert_eq!(key, "topics/sensor/year=2022/month=04/day=18/hour=11/sensor+2+0000001234.zstd.parquet");
    }
}
