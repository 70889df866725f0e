//! Multipart uploads in progress, so that one a crash leaves open is aborted at the next start
//! instead of keeping its parts in the bucket, billed, until a lifecycle rule removes them.
//!
//! An upload is written down (durably) once the store gave its id and before its first part goes
//! up, and forgotten once it is completed or aborted. What is still here at start-up was open
//! when the process stopped.

use super::{Spool, SpoolError};

/// The sled tree of open uploads: key = object key, 0, upload id; value empty.
pub(super) const UPLOADS_TREE: &str = "uploads";

impl Spool {
    /// Notes that the multipart upload `id` of `key` is open; durable when this returns. Async:
    /// called by the uploads, on the runtime's threads, which a blocking flush would hold.
    pub async fn upload_opened(&self, key: &str, id: &str) -> Result<(), SpoolError> {
        self.uploads.insert(upload_key(key, id), &[])?;
        self.uploads.flush_async().await?;
        Ok(())
    }

    /// Forgets the upload: completed or aborted. Not made durable at once: lost in a crash, the
    /// upload is aborted at the next start, and the store answers that it is gone.
    pub fn upload_closed(&self, key: &str, id: &str) -> Result<(), SpoolError> {
        self.uploads.remove(upload_key(key, id))?;
        Ok(())
    }

    /// The uploads noted open: (object key, upload id).
    pub fn open_uploads(&self) -> Result<Vec<(String, String)>, SpoolError> {
        let mut out = Vec::new();
        for entry in self.uploads.iter() {
            let (k, _) = entry?;
            // Keys are written by upload_key from two strings: a 0 byte separates them.
            let Some(at) = k.iter().position(|b| *b == 0) else { continue };
            let key = String::from_utf8_lossy(&k[..at]).into_owned();
            let id = String::from_utf8_lossy(&k[at + 1..]).into_owned();
            out.push((key, id));
        }
        Ok(out)
    }
}

fn upload_key(key: &str, id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1 + id.len());
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k.extend_from_slice(id.as_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_open_upload_survives_a_reopening_and_a_closed_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open_in_test(dir.path());
            spool.upload_opened("topics/t/a.zstd.parquet", "id-1").await.unwrap();
            spool.upload_opened("topics/t/a.zstd.parquet", "id-2").await.unwrap();
            spool.upload_opened("topics/t/b.bin", "id-3").await.unwrap();
            spool.upload_closed("topics/t/a.zstd.parquet", "id-1").unwrap();
            spool.flush().unwrap();
        }
        let spool = Spool::open_in_test(dir.path());
        assert_eq!(
            spool.open_uploads().unwrap(),
            [("topics/t/a.zstd.parquet".to_string(), "id-2".to_string()), ("topics/t/b.bin".into(), "id-3".into())]
        );
    }
}
