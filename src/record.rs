//! The record the stages pass: a Kafka record as the spool gives it to the uploaders (the consumer
//! encodes what it fetches for the spool directly), and as the tools rebuild it from Kafka or the
//! archive.

use bytes::Bytes;

/// When a record's path time was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordTime {
    /// The Kafka record timestamp, milliseconds.
    Kafka(i64),
    /// The record had none: the time it was consumed, milliseconds.
    Consumed(i64),
}

impl RecordTime {
    pub fn millis(self) -> i64 {
        match self {
            RecordTime::Kafka(ms) | RecordTime::Consumed(ms) => ms,
        }
    }

    pub fn kafka(self) -> Option<i64> {
        match self {
            RecordTime::Kafka(ms) => Some(ms),
            RecordTime::Consumed(_) => None,
        }
    }
}

/// A record's headers as Kafka gives them: in order, a name may repeat, a value may be null.
pub type Headers = Vec<(String, Option<Bytes>)>;

/// A Kafka record as the archiver keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub time: RecordTime,
    pub key: Option<Bytes>,
    /// None for a tombstone (a null value).
    pub value: Option<Bytes>,
    /// Empty when the record has none; None where they were not kept (the Connect layout has no
    /// place for them; a spool entry written before they were kept).
    pub headers: Option<Headers>,
}

impl Record {
    /// The value's bytes; empty for a tombstone.
    pub fn value_bytes(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }
}
