//! Store: the object storage the archive is written to, through object_store.
//!
//! Amazon S3 or an S3-compatible endpoint (path-style, plain HTTP allowed), or a local directory
//! laid out as MinIO lays out a bucket (`<ARCHIVE_DIR>/<bucket>/topics/...`). Objects appear whole:
//! S3 PUTs are atomic, and the local store writes a staging file (`key#N`), fsyncs it and renames it.
//!
//! Its errors get a bounded reason (the metrics' label) and, where retrying alone will not help,
//! what the operator should fix: the uploaders log them and `check` prints them.

use std::future::Future;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService, ReqwestConnector,
};
use object_store::local::LocalFileSystem;
use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, BackoffConfig, Certificate, ClientOptions, CopyOptions, GetOptions, GetResult, ListResult,
    MultipartId, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
    RenameOptions, Result, RetryConfig, TagSet,
};

use crate::config::{Checksum, Credentials, PutSettings, Sse, StoreConfig};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the archive directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("cannot set up the object store: {0}")]
    Build(#[from] object_store::Error),
}

/// Builds the store named by the configuration.
pub fn build(config: &StoreConfig) -> Result<Arc<dyn ObjectStore>, StoreError> {
    Ok(build_with_multipart(config)?.store)
}

/// A store as [`build_with_multipart`] builds it.
pub struct Built {
    pub store: Arc<dyn ObjectStore>,
    /// The same store by its multipart upload ids, where it has them (S3), so that an upload a
    /// crash leaves open can be aborted later (`pipeline::upload::RecordedUploads`).
    pub multipart: Option<Arc<dyn MultipartStore>>,
}

/// Sees every answer of the S3 client's requests, those object_store retries by itself included,
/// and counts the ones that ask to slow down, 503 (S3's SlowDown) and 429, for the upload that
/// sent them ([`watch_slow_downs`]).
#[derive(Debug)]
struct SlowDownWatch;

impl HttpConnector for SlowDownWatch {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        Ok(HttpClient::new(Watched(ReqwestConnector::default().connect(options)?)))
    }
}

#[derive(Debug)]
struct Watched(HttpClient);

#[async_trait]
impl HttpService for Watched {
    async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        // Requests to S3 are signed; those that fetch credentials (IMDS, STS, the container
        // agents) share the client but are not, and their refusals are no sign of the store's load.
        let signed = req.headers().get("authorization").is_some_and(|v| v.as_bytes().starts_with(b"AWS4-HMAC-SHA256"));
        let response = self.0.execute(req).await?;
        if signed && matches!(response.status().as_u16(), 503 | 429) {
            let _ = SLOWED.try_with(|slowed| slowed.fetch_add(1, Ordering::Relaxed));
        }
        Ok(response)
    }
}

tokio::task_local! {
    /// How many requests of the upload running in this task were asked to slow down.
    static SLOWED: Arc<AtomicU32>;
}

/// Runs `upload` and says how many of its requests the store asked to slow down (503, 429), those
/// object_store retried included, so an upload that succeeded may still have been asked.
pub async fn watch_slow_downs<F: Future>(upload: F) -> (F::Output, u32) {
    let slowed = Arc::new(AtomicU32::new(0));
    let output = SLOWED.scope(slowed.clone(), upload).await;
    (output, slowed.load(Ordering::Relaxed))
}

/// `request`, to be run in another task (a part of a multipart upload), reporting to the upload
/// that started it.
pub fn carry_slow_down_watch<F: Future>(request: F) -> impl Future<Output = F::Output> {
    let slowed = SLOWED.try_with(Arc::clone).ok();
    async move {
        match slowed {
            Some(slowed) => SLOWED.scope(slowed, request).await,
            None => request.await,
        }
    }
}

/// The reason of an answer that asks to slow down (503 SlowDown, 429).
pub const SLOW_DOWN: &str = "slow_down";

/// [`build`], with the store's multipart upload ids where it has them.
pub fn build_with_multipart(config: &StoreConfig) -> Result<Built, StoreError> {
    build_with_connector(config, SlowDownWatch)
}

/// [`build_with_multipart`], the S3 client's requests going through `connector`.
fn build_with_connector(config: &StoreConfig, connector: impl HttpConnector) -> Result<Built, StoreError> {
    match config {
        StoreConfig::Local { dir, bucket } => {
            let root = dir.join(bucket);
            std::fs::create_dir_all(&root)
                .map_err(|source| StoreError::Dir { path: root.display().to_string(), source })?;
            let root =
                root.canonicalize().map_err(|source| StoreError::Dir { path: root.display().to_string(), source })?;
            // fsync: an object counts as stored (and its offset may be committed) only once it is
            // durable, as it is on S3.
            Ok(Built { store: Arc::new(LocalFileSystem::new_with_prefix(root)?.with_fsync(true)), multipart: None })
        }
        StoreConfig::S3 { bucket, region, endpoint, credentials, ca_pem, put, sse, proxy, checksum } => {
            let mut client = ClientOptions::new()
                .with_timeout(Duration::from_secs(120))
                .with_connect_timeout(Duration::from_secs(5))
                .with_pool_max_idle_per_host(256);
            if let Some(proxy) = proxy {
                client = client.with_proxy_url(proxy.url.expose()).with_proxy_excludes(proxy.excludes.join(","));
            }
            if let Some(pem) = ca_pem {
                for cert in Certificate::from_pem_bundle(pem)? {
                    client = client.with_root_certificate(cert);
                }
            }
            let mut b = AmazonS3Builder::new()
                .with_http_connector(connector)
                .with_bucket_name(bucket)
                .with_region(region)
                .with_conditional_put(S3ConditionalPut::ETagMatch)
                .with_retry(RetryConfig {
                    // A short retry here; the uploader's own loop retries for as long as it takes,
                    // logging each failure, so an outage is visible and never drops a record.
                    backoff: BackoffConfig {
                        init_backoff: Duration::from_millis(100),
                        max_backoff: Duration::from_secs(5),
                        base: 2.0,
                    },
                    max_retries: 3,
                    retry_timeout: Duration::from_secs(30),
                })
                .with_client_options(client);
            if let Some(e) = endpoint {
                b = b.with_endpoint(e).with_allow_http(true).with_virtual_hosted_style_request(false);
            }
            b = with_sse(b, sse.as_ref());
            b = match checksum {
                None => b,
                // The signature hashes the body with SHA-256 already: sending it costs no CPU.
                Some(Checksum::Sha256) => b.with_checksum_algorithm(object_store::aws::Checksum::SHA256),
                Some(Checksum::Crc64Nvme) => b.with_checksum_algorithm(object_store::aws::Checksum::CRC64NVME),
            };
            b = with_credentials(b, credentials);
            let s3 = b.build()?;
            if *put == PutSettings::default() {
                let s3 = Arc::new(s3);
                return Ok(Built { store: s3.clone(), multipart: Some(s3) });
            }
            let s3 = Arc::new(PutDefaults::new(s3, put));
            Ok(Built { store: s3.clone(), multipart: Some(s3) })
        }
    }
}

/// The credential source; object_store fetches temporary credentials and refreshes them before
/// they expire.
fn with_credentials(b: AmazonS3Builder, credentials: &Credentials) -> AmazonS3Builder {
    use AmazonS3ConfigKey as K;
    match credentials {
        Credentials::Keys { access_key_id, secret_key, session_token } => {
            let b = b.with_access_key_id(access_key_id.expose()).with_secret_access_key(secret_key.expose());
            match session_token {
                Some(token) => b.with_token(token.expose()),
                None => b,
            }
        }
        Credentials::WebIdentity { token_file, role_arn, session_name, sts_endpoint } => {
            let mut b = b
                .with_config(K::WebIdentityTokenFile, token_file)
                .with_config(K::RoleArn, role_arn)
                .with_config(K::RoleSessionName, session_name);
            if let Some(url) = sts_endpoint {
                b = b.with_config(K::StsEndpoint, url);
            }
            b
        }
        Credentials::EcsTask { relative_uri } => b.with_config(K::ContainerCredentialsRelativeUri, relative_uri),
        Credentials::Container { full_uri, token_file } => b
            .with_config(K::ContainerCredentialsFullUri, full_uri)
            .with_config(K::ContainerAuthorizationTokenFile, token_file),
        // object_store's default: the instance metadata service.
        Credentials::Instance => b,
    }
}

/// Server-side encryption on every request that writes (and, with a customer key, reads) an
/// object: object_store sends the headers.
fn with_sse(b: AmazonS3Builder, sse: Option<&Sse>) -> AmazonS3Builder {
    let key = |name: &str| name.parse::<AmazonS3ConfigKey>().expect("a configuration key object_store knows");
    match sse {
        None => b,
        Some(Sse::S3) => b.with_config(key("aws_server_side_encryption"), "AES256"),
        Some(Sse::Kms { dual, key_id }) => {
            let b = b.with_config(key("aws_server_side_encryption"), if *dual { "aws:kms:dsse" } else { "aws:kms" });
            match key_id {
                Some(id) => b.with_config(key("aws_sse_kms_key_id"), id),
                None => b,
            }
        }
        Some(Sse::CustomerKey(k)) => b.with_ssec_encryption(k.expose()),
    }
}

/// An S3 store whose every object (a PUT, or a multipart upload when it is created) is written
/// with the configured storage class and tags (S3_STORAGE_CLASS, S3_OBJECT_TAGS), whichever stage
/// or tool writes it: the uploads of both formats and `check`'s probe alike. An attribute or tags
/// the caller sets itself are kept.
#[derive(Debug)]
pub struct PutDefaults {
    inner: AmazonS3,
    storage_class: Option<String>,
    tags: TagSet,
}

impl PutDefaults {
    pub fn new(inner: AmazonS3, put: &PutSettings) -> PutDefaults {
        let mut tags = TagSet::default();
        for (key, value) in &put.tags {
            tags.push(key, value);
        }
        PutDefaults { inner, storage_class: put.storage_class.clone(), tags }
    }

    fn with_defaults(&self, attributes: &mut Attributes, tags: &mut TagSet) {
        if let Some(class) = &self.storage_class
            && attributes.get(&Attribute::StorageClass).is_none()
        {
            attributes.insert(Attribute::StorageClass, class.clone().into());
        }
        if tags.is_empty() {
            *tags = self.tags.clone();
        }
    }
}

impl std::fmt::Display for PutDefaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (storage class and tags set)", self.inner)
    }
}

#[async_trait]
impl ObjectStore for PutDefaults {
    async fn put_opts(&self, location: &ObjectPath, payload: PutPayload, mut opts: PutOptions) -> Result<PutResult> {
        self.with_defaults(&mut opts.attributes, &mut opts.tags);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjectPath,
        mut opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.with_defaults(&mut opts.attributes, &mut opts.tags);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &ObjectPath, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &ObjectPath, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<ObjectPath>>,
    ) -> BoxStream<'static, Result<ObjectPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&ObjectPath>,
        offset: &ObjectPath,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &ObjectPath, to: &ObjectPath, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &ObjectPath, to: &ObjectPath, options: RenameOptions) -> Result<()> {
        self.inner.rename_opts(from, to, options).await
    }
}

#[async_trait]
impl MultipartStore for PutDefaults {
    async fn create_multipart(&self, path: &ObjectPath) -> Result<MultipartId> {
        self.create_multipart_opts(path, PutMultipartOptions::default()).await
    }

    async fn create_multipart_opts(&self, path: &ObjectPath, mut opts: PutMultipartOptions) -> Result<MultipartId> {
        self.with_defaults(&mut opts.attributes, &mut opts.tags);
        self.inner.create_multipart_opts(path, opts).await
    }

    async fn put_part(&self, path: &ObjectPath, id: &MultipartId, part_idx: usize, data: PutPayload) -> Result<PartId> {
        self.inner.put_part(path, id, part_idx, data).await
    }

    async fn complete_multipart(&self, path: &ObjectPath, id: &MultipartId, parts: Vec<PartId>) -> Result<PutResult> {
        self.inner.complete_multipart(path, id, parts).await
    }

    async fn abort_multipart(&self, path: &ObjectPath, id: &MultipartId) -> Result<()> {
        self.inner.abort_multipart(path, id).await
    }
}

/// Removes the staging files (`key#N`) that a crash of an earlier run left in a local store.
/// Object keys never contain `#` (Kafka topic names cannot), so such a file is never an object.
/// Only files older than `before` are removed, so this run's writes in progress are left alone.
/// This runs while the run's own uploads create and rename staging files, so an entry or folder
/// that is gone by the time it is looked at is skipped, not an error that ends the scan.
pub fn remove_stale_staging_files(root: &Path, before: SystemTime) -> std::io::Result<usize> {
    let mut removed = 0;
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            entries => entries?,
        };
        for entry in entries {
            match remove_if_stale(entry, before, &mut dirs) {
                Ok(gone) => removed += usize::from(gone),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// One entry of [`remove_stale_staging_files`]: a folder is queued, a stale staging file removed
/// (true).
fn remove_if_stale(
    entry: std::io::Result<std::fs::DirEntry>,
    before: SystemTime,
    dirs: &mut Vec<std::path::PathBuf>,
) -> std::io::Result<bool> {
    let entry = entry?;
    if entry.file_type()?.is_dir() {
        dirs.push(entry.path());
        return Ok(false);
    }
    if !entry.file_name().to_string_lossy().contains('#') || entry.metadata()?.modified()? >= before {
        return Ok(false);
    }
    std::fs::remove_file(entry.path())?;
    Ok(true)
}

/// A bounded label for an object store error.
pub fn error_reason(e: &object_store::Error) -> &'static str {
    match e {
        object_store::Error::NotFound { .. } => "not_found",
        object_store::Error::PermissionDenied { .. } => "permission_denied",
        object_store::Error::Unauthenticated { .. } => "unauthenticated",
        object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. } => "conflict",
        // object_store gave up retrying a request the store kept asking to slow down.
        e => {
            // Written once, not once per word looked for.
            let text = e.to_string();
            if ["status code: 503", "status code: 429", "SlowDown"].iter().any(|w| text.contains(w)) {
                SLOW_DOWN
            } else {
                "other"
            }
        }
    }
}

/// What the operator should check for an error that retrying alone will not fix.
pub fn fix_for(reason: &str) -> Option<&'static str> {
    match reason {
        "permission_denied" => Some(
            "the store denied access (403): check AWS_ACCESS_KEY_ID / AWS_SECRET_KEY and that the key may write to S3_BUCKET_NAME",
        ),
        "unauthenticated" => {
            Some("the store did not accept the credentials (401): check AWS_ACCESS_KEY_ID / AWS_SECRET_KEY")
        }
        "not_found" => Some("the bucket was not found (404): create S3_BUCKET_NAME or correct it"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use object_store::ObjectStoreExt;

    use super::*;

    /// A request as the recorder keeps it: method, URL, headers.
    type Seen = (String, String, Vec<(String, String)>);

    /// Answers as an ECS agent and an S3 server would, and keeps every request.
    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Seen>>>);

    impl HttpConnector for Recorder {
        fn connect(&self, _: &ClientOptions) -> object_store::Result<HttpClient> {
            Ok(HttpClient::new(self.clone()))
        }
    }

    #[async_trait]
    impl HttpService for Recorder {
        async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
            let headers = req.headers().iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string())).collect();
            self.0.lock().unwrap().push((req.method().to_string(), req.uri().to_string(), headers));
            let mut answer = if req.uri().host() == Some("169.254.170.2") {
                HttpResponse::new(
                    r#"{"AccessKeyId":"ASIATASKROLE","SecretAccessKey":"task-secret","Token":"task-token","Expiration":"2099-01-01T00:00:00Z"}"#
                        .to_string()
                        .into(),
                )
            } else {
                HttpResponse::new(String::new().into())
            };
            answer.headers_mut().insert("etag", "\"e\"".parse().unwrap());
            Ok(answer)
        }
    }

    /// The requests the test bed cannot check: the ECS task role's credentials are fetched from
    /// 169.254.170.2 and sign the PUT with their token, and the CRC64NVME checksum is sent.
    #[tokio::test]
    async fn an_ecs_task_role_signs_and_a_crc64nvme_checksum_goes_with_the_body() {
        let config = StoreConfig::S3 {
            bucket: "archive".into(),
            region: "us-east-1".into(),
            endpoint: Some("http://store.test:9000".into()),
            credentials: Box::new(Credentials::EcsTask { relative_uri: "/v2/credentials/task-1".into() }),
            ca_pem: None,
            put: PutSettings::default(),
            sse: None,
            proxy: None,
            checksum: Some(Checksum::Crc64Nvme),
        };
        let recorder = Recorder::default();
        let store = build_with_connector(&config, recorder.clone()).unwrap().store;
        store.put(&ObjectPath::from("topics/t/x.bin"), Bytes::from_static(b"123456789").into()).await.unwrap();
        let requests = recorder.0.lock().unwrap().clone();
        let header = |h: &[(String, String)], name: &str| h.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(
            (requests[0].0.as_str(), requests[0].1.as_str()),
            ("GET", "http://169.254.170.2/v2/credentials/task-1")
        );
        let (method, url, put) = &requests[1];
        assert_eq!((method.as_str(), url.as_str()), ("PUT", "http://store.test:9000/archive/topics/t/x.bin"));
        assert!(header(put, "authorization").unwrap().contains("Credential=ASIATASKROLE/"), "{put:?}");
        assert_eq!(header(put, "x-amz-security-token").as_deref(), Some("task-token"));
        // CRC-64/NVME of "123456789" is 0xAE8B14860A799888 (the check value of the CRC catalogue).
        assert_eq!(header(put, "x-amz-checksum-crc64nvme").as_deref(), Some("rosUhgp5mIg="));
    }

    #[test]
    fn stale_staging_files_go_and_objects_stay() {
        let dir = tempfile::tempdir().unwrap();
        let hour = dir.path().join("topics/t/year=2022/month=04/day=18/hour=10");
        std::fs::create_dir_all(&hour).unwrap();
        std::fs::write(hour.join("t+0+0000000000.bin"), b"x\n").unwrap();
        std::fs::write(hour.join("t+0+0000000001.bin#3"), b"partial").unwrap();
        assert_eq!(
            remove_stale_staging_files(dir.path(), SystemTime::UNIX_EPOCH).unwrap(),
            0,
            "newer than the cut-off"
        );
        let later = SystemTime::now() + Duration::from_secs(1);
        assert_eq!(remove_stale_staging_files(dir.path(), later).unwrap(), 1);
        assert!(hour.join("t+0+0000000000.bin").exists());
        assert!(!hour.join("t+0+0000000001.bin#3").exists());
    }

    #[test]
    fn staging_files_renamed_during_the_scan_do_not_end_it() {
        // The run's own uploads write `key#N` and rename it while the scan looks at the folder.
        let dir = tempfile::tempdir().unwrap();
        let hour = dir.path().join("topics/t/year=2022/month=04/day=18/hour=10");
        std::fs::create_dir_all(&hour).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (hour, stop) = (hour.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let staging = hour.join(format!("t+0+{n:010}.bin#1"));
                    std::fs::write(&staging, b"x\n").unwrap();
                    std::fs::rename(&staging, hour.join(format!("t+0+{n:010}.bin"))).unwrap();
                    n += 1;
                }
            })
        };
        let scans = (0..300).map(|_| remove_stale_staging_files(dir.path(), SystemTime::UNIX_EPOCH));
        let failed: Vec<_> = scans.filter_map(Result::err).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        assert!(failed.is_empty(), "{} of 300 scans failed, e.g. {}", failed.len(), failed[0]);
    }

    #[test]
    fn an_archive_directory_not_made_yet_has_nothing_to_clean() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(remove_stale_staging_files(&dir.path().join("archive"), SystemTime::now()).unwrap(), 0);
    }
}
