//! Sealed batches of the Parquet format (issue 23, not wired in yet): the boundary of an object
//! (a partition's first and last offset, and its hour) is kept here, durably, before the object
//! is completed, so that after a crash the retry uploads the same range under the same key, and
//! records Kafka delivers again do not start another object. Removed once the object is stored.

use super::{Spool, SpoolError, SpoolKey};

/// The sled tree of sealed batches: key = the batch's first record's spool key, value = version
/// byte, last offset, hour time in ms (big endian).
pub(super) const SEALED_TREE: &str = "sealed";
const VERSION: u8 = 1;

/// A batch whose records are decided: `first_offset..=last_offset` of the partition, the object
/// in the hour folder of `hour_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBatch {
    pub topic: String,
    pub partition: i32,
    pub first_offset: i64,
    pub last_offset: i64,
    pub hour_ms: i64,
}

impl Spool {
    /// Keeps `batch`'s boundary; durable when this returns.
    pub fn seal(&self, batch: &SealedBatch) -> Result<(), SpoolError> {
        let key = SpoolKey::new(&batch.topic, batch.partition, batch.first_offset);
        let mut value = Vec::with_capacity(17);
        value.push(VERSION);
        value.extend_from_slice(&batch.last_offset.to_be_bytes());
        value.extend_from_slice(&batch.hour_ms.to_be_bytes());
        self.sealed.insert(key.0, value)?;
        self.sealed.flush()?;
        Ok(())
    }

    /// Every sealed batch, by partition and first offset.
    pub fn sealed(&self) -> Result<Vec<SealedBatch>, SpoolError> {
        let mut out = Vec::new();
        for entry in self.sealed.iter() {
            let (k, v) = entry?;
            let key = SpoolKey(k.to_vec());
            let corrupt = |why| SpoolError::Corrupt { key: key.describe(), why };
            let (topic, partition, first_offset) = key.parts().ok_or_else(|| corrupt("a sealed batch's key"))?;
            if v.len() != 17 || v[0] != VERSION {
                return Err(corrupt("a sealed batch's value"));
            }
            out.push(SealedBatch {
                topic: topic.to_string(),
                partition,
                first_offset,
                last_offset: i64::from_be_bytes(v[1..9].try_into().expect("8 bytes")),
                hour_ms: i64::from_be_bytes(v[9..17].try_into().expect("8 bytes")),
            });
        }
        Ok(out)
    }

    /// Forgets a batch whose object is stored; durable at the next flush (a batch sealed again
    /// after a crash uploads the same object once more).
    pub fn unseal(&self, topic: &str, partition: i32, first_offset: i64) -> Result<(), SpoolError> {
        self.sealed.remove(SpoolKey::new(topic, partition, first_offset).0)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::spool::tests::open_spool;

    fn batch(partition: i32, first_offset: i64, last_offset: i64) -> SealedBatch {
        SealedBatch { topic: "t".into(), partition, first_offset, last_offset, hour_ms: 1_650_247_200_000 }
    }

    /// Set in the child process that seals and then aborts.
    const CHILD: &str = "SPOOL_SEALED_CRASH_DIR";

    #[test]
    fn a_sealed_batch_survives_a_crash_and_goes_once_unsealed() {
        if let Some(dir) = std::env::var_os(CHILD) {
            let spool = Spool::open(std::path::Path::new(&dir), 1 << 20).unwrap();
            spool.seal(&batch(1, 100, 199)).unwrap();
            spool.seal(&batch(0, 5, 9)).unwrap();
            // A crash: no destructor runs, nothing is flushed but what seal() made durable.
            std::process::abort();
        }
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "pipeline::spool::sealed::tests::a_sealed_batch_survives_a_crash_and_goes_once_unsealed"])
            .env(CHILD, dir.path())
            .output()
            .unwrap();
        assert!(!child.status.success(), "the child aborts: {child:?}");
        let spool = open_spool(dir.path());
        assert_eq!(spool.sealed().unwrap(), [batch(0, 5, 9), batch(1, 100, 199)]);
        spool.unseal("t", 0, 5).unwrap();
        spool.flush().unwrap();
        drop(spool);
        let spool = open_spool(dir.path());
        assert_eq!(spool.sealed().unwrap(), [batch(1, 100, 199)]);
        assert_eq!(spool.record_count(), 0, "batches are not records");
    }
}
