//! Conversion of spools written by older versions, done once when the spool is opened: values kept
//! inside sled move to the value files, and an index with one entry per record becomes runs of one
//! record each. Kept apart so that the current layout reads without the old ones.

use bytes::Bytes;

use super::runs::{Location, NORMAL, Run, Slot, run_key};
use super::{Spool, SpoolError, SpoolKey, decode_entry};

/// Spools written before runs had one entry per record in the tree "index", and before the value
/// files kept the values in the tree "records"; [`Spool::open`] moves both.
pub(super) const RECORD_INDEX_TREE: &str = "index";
pub(super) const LEGACY_TREE: &str = "records";
/// Version byte of a per-record entry of the tree "index".
pub(super) const LOCATION_VERSION: u8 = 1;

impl Location {
    /// Reads an entry of the per-record index of older spools.
    fn decode(key: &[u8], raw: &[u8]) -> Result<Location, SpoolError> {
        if raw.len() != 21 || raw[0] != LOCATION_VERSION {
            return Err(SpoolError::Corrupt { key: SpoolKey(key.to_vec()).describe(), why: "unknown index entry" });
        }
        let be4 = |i: usize| u32::from_be_bytes(raw[i..i + 4].try_into().expect("4 bytes"));
        Ok(Location {
            segment: be4(1),
            position: u64::from_be_bytes(raw[5..13].try_into().expect("8 bytes")),
            len: be4(13),
            crc: be4(17),
        })
    }
}

impl Spool {
    /// Moves the records of a spool written with the values inside sled into this layout.
    pub(super) fn move_legacy_records(&self) -> Result<(), SpoolError> {
        if !self.db.tree_names().iter().any(|n| n.as_ref() == LEGACY_TREE.as_bytes()) {
            return Ok(());
        }
        let legacy = self.db.open_tree(LEGACY_TREE)?;
        let mut records = Vec::new();
        for entry in legacy.iter() {
            let (k, v) = entry?;
            records.push(decode_entry(&SpoolKey(k.to_vec()), Bytes::copy_from_slice(&v))?);
            if records.len() == 1000 {
                self.insert_batch(&std::mem::take(&mut records))?;
            }
        }
        self.insert_batch(&records)?;
        self.flush()?;
        self.db.drop_tree(LEGACY_TREE)?;
        Ok(())
    }
}

/// Moves the per-record index of an older spool into runs of one record each.
pub(super) fn move_record_index(db: &sled::Db, runs: &sled::Tree) -> Result<(), SpoolError> {
    if !db.tree_names().iter().any(|n| n.as_ref() == RECORD_INDEX_TREE.as_bytes()) {
        return Ok(());
    }
    let old = db.open_tree(RECORD_INDEX_TREE)?;
    let mut batch = sled::Batch::default();
    for entry in old.iter() {
        let (k, v) = entry?;
        let l = Location::decode(&k, &v)?;
        let run = Run {
            segment: l.segment,
            position: l.position,
            slots: vec![Slot { delta: 0, len: l.len, crc: l.crc }],
            removed: vec![false],
        };
        batch.insert(run_key(&SpoolKey(k.to_vec()), NORMAL), run.encode());
    }
    runs.apply_batch(batch)?;
    runs.flush()?;
    db.drop_tree(RECORD_INDEX_TREE)?;
    Ok(())
}
