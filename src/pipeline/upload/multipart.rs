//! Multipart uploads a crash cannot leave behind. S3 keeps the parts of an upload that was neither
//! completed nor aborted, and bills them, until a lifecycle rule removes them (many buckets have
//! none). [`RecordedUploads`] writes each upload's id to the spool before its first part goes up
//! and forgets it once the upload is completed or aborted; at start-up, [`abort_left`] aborts the
//! ones an earlier run left open.
//!
//! Not covered: a crash between the store giving the id and the spool holding it (one request's
//! time). The local-directory store has no upload ids: its staging files are removed at start-up
//! instead ([`crate::store::remove_stale_staging_files`]).

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path;
use object_store::{
    CopyOptions, Error, GetOptions, GetResult, ListResult, MultipartId, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result, UploadPart,
};
use tokio_util::sync::CancellationToken;

use crate::pipeline::spool::Spool;

/// A store whose multipart uploads are written down in the spool while they are open. Everything
/// else goes to the store as it is.
pub struct RecordedUploads {
    store: Arc<dyn ObjectStore>,
    /// The same store, by its upload ids.
    multipart: Arc<dyn MultipartStore>,
    spool: Arc<Spool>,
}

impl RecordedUploads {
    /// `store` and `multipart` are the same store.
    pub fn new(store: Arc<dyn ObjectStore>, multipart: Arc<dyn MultipartStore>, spool: Arc<Spool>) -> Self {
        RecordedUploads { store, multipart, spool }
    }
}

impl fmt::Debug for RecordedUploads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordedUploads").field("store", &self.store).finish_non_exhaustive()
    }
}

impl fmt::Display for RecordedUploads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (multipart uploads recorded)", self.store)
    }
}

/// An open upload: its parts as they are stored.
struct Upload {
    multipart: Arc<dyn MultipartStore>,
    spool: Arc<Spool>,
    path: Path,
    id: MultipartId,
    parts: Arc<Mutex<Vec<Option<PartId>>>>,
    started: usize,
}

impl Upload {
    /// The upload is over (completed or aborted): the spool forgets it.
    fn closed(&self) {
        if let Err(e) = self.spool.upload_closed(self.path.as_ref(), &self.id) {
            // Left in the spool, it is aborted at the next start, where the store says it is gone.
            tracing::warn!(key = %self.path, error = %e, "cannot forget a finished multipart upload in the spool");
        }
    }
}

impl fmt::Debug for Upload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upload").field("path", &self.path).field("parts", &self.started).finish()
    }
}

#[async_trait]
impl MultipartUpload for Upload {
    fn put_part(&mut self, data: PutPayload) -> UploadPart {
        let index = self.started;
        self.started += 1;
        let (multipart, path, id, parts) =
            (self.multipart.clone(), self.path.clone(), self.id.clone(), self.parts.clone());
        // WriteMultipart runs the part in a task of its own: its slow-down answers still count
        // for the upload.
        Box::pin(crate::store::carry_slow_down_watch(async move {
            let part = multipart.put_part(&path, &id, index, data).await?;
            let mut parts = parts.lock().expect("parts lock");
            if parts.len() <= index {
                parts.resize(index + 1, None);
            }
            parts[index] = Some(part);
            Ok(())
        }))
    }

    async fn complete(&mut self) -> Result<PutResult> {
        let parts: Option<Vec<PartId>> = self.parts.lock().expect("parts lock").iter().cloned().collect();
        let parts = parts.filter(|p| p.len() == self.started).ok_or_else(|| Error::Generic {
            store: "multipart",
            source: "completed before all its parts were stored".into(),
        })?;
        let result = self.multipart.complete_multipart(&self.path, &self.id, parts).await?;
        self.closed();
        Ok(result)
    }

    async fn abort(&mut self) -> Result<()> {
        match self.multipart.abort_multipart(&self.path, &self.id).await {
            Ok(()) | Err(Error::NotFound { .. }) => {
                self.closed();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl ObjectStore for RecordedUploads {
    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        let id = self.multipart.create_multipart_opts(location, opts).await?;
        if let Err(e) = self.spool.upload_opened(location.as_ref(), &id).await {
            // Not written down, it could be left behind: it is not used.
            let _ = self.multipart.abort_multipart(location, &id).await;
            return Err(Error::Generic { store: "spool", source: Box::new(e) });
        }
        Ok(Box::new(Upload {
            multipart: self.multipart.clone(),
            spool: self.spool.clone(),
            path: location.clone(),
            id,
            parts: Arc::default(),
            started: 0,
        }))
    }

    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.store.put_opts(location, payload, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.store.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.store.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.store.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.store.list(prefix)
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        self.store.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.store.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.store.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.store.rename_opts(from, to, options).await
    }
}

/// Aborts `left`, the multipart uploads the spool held as open at start-up (read before any
/// upload of this run began, so none of them is one): an earlier run stopped before it completed
/// or aborted them. Those the store does not answer for are retried, less and less often, until
/// `shutdown`; those it refuses (403: the key may not abort uploads) stay in the spool for the next
/// start, said once.
pub async fn abort_left(
    spool: Arc<Spool>,
    multipart: Arc<dyn MultipartStore>,
    mut left: Vec<(String, String)>,
    shutdown: CancellationToken,
) {
    let (mut aborted, mut refused) = (0usize, 0usize);
    let mut wait = Duration::from_secs(1);
    while !left.is_empty() {
        let mut failed = Vec::new();
        for (key, id) in left {
            // The key as the spool has it, already encoded: parsed, not encoded again.
            let path = match Path::parse(&key) {
                Ok(path) => path,
                Err(e) => {
                    tracing::warn!(key, error = %e, "a multipart upload in the spool has an invalid key; not aborted");
                    continue;
                }
            };
            match multipart.abort_multipart(&path, &id).await {
                // Gone already: completed (the object stays) or aborted before the spool forgot it.
                Ok(()) | Err(Error::NotFound { .. }) => {
                    aborted += 1;
                    if let Err(e) = spool.upload_closed(&key, &id) {
                        tracing::warn!(key, error = %e, "cannot forget an aborted multipart upload in the spool");
                    }
                }
                Err(e @ (Error::PermissionDenied { .. } | Error::Unauthenticated { .. })) => {
                    if refused == 0 {
                        tracing::warn!(
                            key,
                            error = %e,
                            "the store refused to abort a multipart upload an earlier run left open: allow s3:AbortMultipartUpload, or let a lifecycle rule abort incomplete uploads; tried again at the next start"
                        );
                    }
                    refused += 1;
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "cannot abort a multipart upload an earlier run left open; retrying");
                    failed.push((key, id));
                }
            }
        }
        left = failed;
        if !left.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.cancelled() => return,
            }
            wait = (wait * 2).min(Duration::from_secs(300));
        }
    }
    if aborted > 0 {
        tracing::info!(uploads = aborted, "aborted the multipart uploads an earlier run left open");
    }
}

#[cfg(test)]
mod tests {
    use object_store::memory::InMemory;
    use object_store::{ObjectStoreExt, WriteMultipart};

    use super::*;

    #[tokio::test]
    async fn an_upload_left_open_is_aborted_at_the_next_start_and_a_finished_one_is_not_noted() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Arc::new(InMemory::new());
        let left_id = {
            let spool = Arc::new(Spool::open_in_test(dir.path()));
            let store = RecordedUploads::new(memory.clone(), memory.clone(), spool.clone());
            // Completed: the object is there and the spool forgot the upload.
            let done = Path::from("topics/t/done.zstd.parquet");
            let mut up = WriteMultipart::new_with_chunk_size(store.put_multipart(&done).await.unwrap(), 5);
            up.write(b"0123456789ab");
            up.finish().await.unwrap();
            assert_eq!(memory.get(&done).await.unwrap().bytes().await.unwrap().as_ref(), b"0123456789ab");
            // Aborted: forgotten too.
            let mut up = store.put_multipart(&Path::from("topics/t/aborted.bin")).await.unwrap();
            up.put_part(PutPayload::from_static(b"part")).await.unwrap();
            up.abort().await.unwrap();
            // Left open, as a crash leaves it: noted. Its key has a character paths encode.
            let mut up = store.put_multipart(&Path::from_iter(["topics", "t", "left~1.bin"])).await.unwrap();
            up.put_part(PutPayload::from_static(b"part")).await.unwrap();
            let open = spool.open_uploads().unwrap();
            assert_eq!(open.len(), 1, "{open:?}");
            assert_eq!(open[0].0, "topics/t/left%7E1.bin");
            // Read back as the same path, not encoded a second time (the store is asked for it).
            assert_eq!(Path::parse(&open[0].0).unwrap(), Path::from_iter(["topics", "t", "left~1.bin"]));
            spool.flush().unwrap();
            open[0].1.clone()
        };
        let left = Path::from_iter(["topics", "t", "left~1.bin"]);
        // Still open in the store until the next start aborts it.
        memory.put_part(&left, &left_id, 1, PutPayload::from_static(b"more")).await.unwrap();
        let spool = Arc::new(Spool::open_in_test(dir.path()));
        let open = spool.open_uploads().unwrap();
        abort_left(spool.clone(), memory.clone(), open, CancellationToken::new()).await;
        assert!(spool.open_uploads().unwrap().is_empty());
        let after = memory.put_part(&left, &left_id, 2, PutPayload::from_static(b"more")).await;
        assert!(after.is_err(), "the upload is aborted: {after:?}");
        assert!(memory.head(&left).await.is_err(), "and never completed");
    }
}
