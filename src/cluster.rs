//! The store shared by many nodes (docs/SCALE.md): the catalog's records
//! in etcd, the blobs in an S3-compatible object store, this node's store
//! a mirror and a cache of them ([`crate::store::Shared`]).
//!
//! Owns a tokio runtime on which the async clients (`etcd-client`,
//! `object_store`) run. The FUSE threads call in through [`Cluster::call`],
//! which runs the future on the calling thread (`Runtime::block_on`: no
//! runtime thread is blocked) with a deadline, so an unreachable server
//! turns into an error, never a hang. A thread of its own keeps the mirror:
//! a range read of every record, then a watch from the revision after it;
//! a lost watch (a dropped connection, a compacted revision) is followed by
//! a fresh read and a new watch, so every node converges.
//!
//! Promises: a write is committed in etcd (a transaction on the model's
//! key, only if it is at the revision this node last saw) before this node
//! shows it; a blob is in the object store (create-only) before a record
//! names it; a blob fetched from the object store is refused unless it
//! hashes to its name. With etcd unreachable, writes fail with EAGAIN and
//! reads are served from the mirror.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, TxnOpResponse, WatchOptions};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tokio::io::AsyncWriteExt;

use crate::error::{Error, Result};
use crate::store::{Committed, Digest, Shared, SharedRecord, Store};

/// How long one call to etcd or the object store may take.
const DEADLINE: Duration = Duration::from_secs(5);
/// A blob this large or larger is uploaded in parts.
const MULTIPART_BYTES: u64 = 64 << 20;

pub struct Cluster {
    runtime: tokio::runtime::Runtime,
    etcd: etcd_client::Client,
    /// `etcd://...`, as given.
    catalog_url: String,
    /// Keys of model records: `<prefix>/models/<name>`.
    models_prefix: String,
    /// Keys of live nodes' entries: `<prefix>/nodes/<node>`.
    nodes_prefix: String,
    blobs: Arc<dyn ObjectStore>,
    blobs_url: String,
    blobs_prefix: String,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The revision the mirror is at.
    revision: i64,
    /// When etcd last failed to answer, until it answers again.
    unreachable_since: Option<std::time::SystemTime>,
    /// Every live node's entry, as last read (see [`Cluster::announce`]).
    nodes: Vec<serde_json::Value>,
}

/// A node's entry lives as long as its lease: this long without renewal.
const NODE_TTL_S: i64 = 10;
/// How often a node renews its lease, rewrites its entry, and reads the
/// others'.
const NODE_EVERY: Duration = Duration::from_secs(3);

impl Cluster {
    /// Connects to `etcd://HOST:PORT[,HOST:PORT...]/PREFIX` and
    /// `s3://BUCKET/PREFIX` (credentials, region and endpoint from the
    /// usual `AWS_*` variables).
    pub fn connect(catalog: &str, blobs: &str) -> Result<Arc<Cluster>> {
        let bad = |what: &str, why: &str| Error::InvalidArgument(format!("{what}: {why}"));
        let rest = catalog.strip_prefix("etcd://").ok_or_else(|| bad(catalog, "expected etcd://HOST:PORT/PREFIX"))?;
        let (hosts, prefix) = rest.split_once('/').unwrap_or((rest, "aifs"));
        let endpoints: Vec<String> = hosts.split(',').map(str::to_string).collect();
        let prefix = prefix.trim_matches('/');
        let rest = blobs.strip_prefix("s3://").ok_or_else(|| bad(blobs, "expected s3://BUCKET/PREFIX"))?;
        let (bucket, blobs_prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cluster-io")
            .enable_all()
            .build()
            .map_err(|e| Error::io("starting the cluster runtime", e))?;
        // Keep-alive pings find a dead connection that no reset announces
        // (a partition): the watch then ends and the mirror is read again.
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(DEADLINE)
            .with_timeout(DEADLINE)
            .with_keep_alive(Duration::from_secs(2), DEADLINE)
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let etcd = runtime
            .block_on(etcd_client::Client::connect(&endpoints, Some(options)))
            .map_err(|e| Error::CatalogUnreachable(format!("{catalog} ({e})")))?;
        // A whole transfer may take long (a large blob); a stall may not:
        // bounds on connecting and on each read, object_store's retries
        // for the rest. (Set as keys, so the AWS_* settings stay.)
        use object_store::{aws::AmazonS3ConfigKey as Key, ClientConfigKey as Client};
        let s3 = object_store::aws::AmazonS3Builder::from_env()
            .with_config(Key::Client(Client::Timeout), "1h")
            .with_config(Key::Client(Client::ConnectTimeout), "5s")
            .with_config(Key::Client(Client::ReadTimeout), "30s")
            .with_bucket_name(bucket)
            .build()
            .map_err(|e| bad(blobs, &e.to_string()))?;
        Ok(Arc::new(Cluster {
            runtime,
            etcd,
            catalog_url: catalog.to_string(),
            models_prefix: format!("{prefix}/models/"),
            nodes_prefix: format!("{prefix}/nodes/"),
            blobs: Arc::new(s3),
            blobs_url: blobs.to_string(),
            blobs_prefix: blobs_prefix.trim_matches('/').to_string(),
            state: Mutex::default(),
        }))
    }

    /// Runs `future` on the calling thread, within [`DEADLINE`].
    fn call<T>(&self, future: impl std::future::Future<Output = T>) -> Option<T> {
        self.runtime.block_on(async { tokio::time::timeout(DEADLINE, future).await.ok() })
    }

    /// One request to etcd, within [`DEADLINE`], its failure an [`Error`].
    fn ask_etcd<T>(
        &self,
        request: impl std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        let answer =
            self.call(request).ok_or_else(|| self.unreachable("no answer"))?.map_err(|e| self.etcd_error(e))?;
        self.reached();
        Ok(answer)
    }

    fn key(&self, model: &str) -> String {
        format!("{}{model}", self.models_prefix)
    }

    fn object(&self, digest: &Digest) -> object_store::path::Path {
        match self.blobs_prefix.as_str() {
            "" => object_store::path::Path::from(digest.file_name()),
            prefix => object_store::path::Path::from(format!("{prefix}/{}", digest.file_name())),
        }
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> Error {
        let mut st = self.state.lock().unwrap();
        st.unreachable_since.get_or_insert_with(std::time::SystemTime::now);
        tracing::warn!(catalog = %self.catalog_url, "etcd: {why}");
        Error::CatalogUnreachable(self.catalog_url.clone())
    }

    /// An error etcd answered with: unreachable (EAGAIN) if it is down or
    /// has no leader, else refused (EIO, with etcd's reason: a record over
    /// its request size, ...).
    fn etcd_error(&self, e: etcd_client::Error) -> Error {
        use etcd_client::Error as E;
        let down = match &e {
            // gRPC's CANCELLED, UNKNOWN, DEADLINE_EXCEEDED, UNAVAILABLE.
            E::GRpcStatus(status) => matches!(i32::from(status.code()), 1 | 2 | 4 | 14),
            E::TransportError(_) | E::IoError(_) => true,
            _ => false,
        };
        if down {
            return self.unreachable(e);
        }
        self.reached();
        Error::CatalogRefused { url: self.catalog_url.clone(), message: crate::error::one_line(&e.to_string()) }
    }

    fn reached(&self) {
        self.state.lock().unwrap().unreachable_since = None;
    }

    fn blob_error(&self, message: impl std::fmt::Display) -> Error {
        Error::BlobStore { url: self.blobs_url.clone(), message: crate::error::one_line(&message.to_string()) }
    }

    /// Every model record now: (name, record, revision), and the revision
    /// of the read.
    fn read_all(&self) -> Result<(Vec<SharedRecord>, i64)> {
        let mut etcd = self.etcd.clone();
        let response = self.ask_etcd(etcd.get(self.models_prefix.as_str(), Some(GetOptions::new().with_prefix())))?;
        let revision = response.header().map_or(0, |h| h.revision());
        let records = response
            .kvs()
            .iter()
            .filter_map(|kv| {
                let name = kv.key_str().ok()?.strip_prefix(&self.models_prefix)?.to_string();
                Some((name, kv.value().to_vec(), kv.mod_revision()))
            })
            .collect();
        Ok((records, revision))
    }

    /// Puts this node's entry (`describe()`: its devices, loaded models,
    /// queues) under `<prefix>/nodes/<node>`, held by a lease that lives
    /// while the node renews it, and keeps it and the list of every live
    /// node's entry fresh, from a task on the runtime.
    pub fn announce(self: &Arc<Self>, node: &str, describe: impl Fn() -> serde_json::Value + Send + Sync + 'static) {
        let cluster = self.clone();
        let key = format!("{}{node}", self.nodes_prefix);
        let node = node.to_string();
        self.runtime.spawn(async move {
            let mut lease = None;
            loop {
                let mut etcd = cluster.etcd.clone();
                let renewed = async {
                    let id = match lease {
                        Some(id) => id,
                        None => etcd.lease_grant(NODE_TTL_S, None).await?.id(),
                    };
                    lease = Some(id);
                    let (mut keeper, mut replies) = etcd.lease_keep_alive(id).await?;
                    keeper.keep_alive().await?;
                    if replies.message().await?.is_none_or(|r| r.ttl() <= 0) {
                        lease = None; // expired while away: a new one next time
                        return Ok(());
                    }
                    let mut entry = describe();
                    entry["node"] = node.clone().into();
                    entry["aifs"] = env!("CARGO_PKG_VERSION").into();
                    let options = etcd_client::PutOptions::new().with_lease(id);
                    etcd.put(key.as_str(), entry.to_string(), Some(options)).await?;
                    let all = etcd.get(cluster.nodes_prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
                    let nodes =
                        all.kvs().iter().filter_map(|kv| serde_json::from_slice(kv.value()).ok()).collect::<Vec<_>>();
                    cluster.state.lock().unwrap().nodes = nodes;
                    Ok::<(), etcd_client::Error>(())
                };
                let renewed = match tokio::time::timeout(DEADLINE, renewed).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no answer in {} s", DEADLINE.as_secs())),
                };
                if let Err(e) = renewed {
                    tracing::debug!("renewing the node's entry: {e}");
                    lease = None;
                }
                tokio::time::sleep(NODE_EVERY).await;
            }
        });
    }

    /// Mirrors the shared catalog into `store` now, then keeps it mirrored
    /// from a thread of its own.
    pub fn mirror(self: &Arc<Self>, store: &Arc<Store>) -> Result<()> {
        let (records, revision) = self.read_all()?;
        store.resync(records, revision)?;
        self.state.lock().unwrap().revision = revision;
        let (cluster, store) = (self.clone(), store.clone());
        std::thread::Builder::new()
            .name("cluster-watch".into())
            .spawn(move || cluster.keep_mirrored(&store))
            .map_err(|e| Error::io("starting the cluster watch", e))?;
        Ok(())
    }

    /// Watches the catalog from the mirror's revision, applying each change;
    /// after a lost watch, reads everything again and watches anew.
    fn keep_mirrored(&self, store: &Store) {
        loop {
            let from = self.state.lock().unwrap().revision + 1;
            if let Err(e) = self.runtime.block_on(self.watch(store, from)) {
                tracing::warn!(catalog = %self.catalog_url, "watch lost: {e}; reading the catalog again");
            }
            loop {
                std::thread::sleep(Duration::from_millis(250));
                match self.read_all().and_then(|(records, revision)| Ok((store.resync(records, revision)?, revision))) {
                    Ok(((), revision)) => {
                        self.state.lock().unwrap().revision = revision;
                        break;
                    }
                    Err(e) => tracing::debug!("resync: {e}"),
                }
            }
        }
    }

    async fn watch(&self, store: &Store, from: i64) -> std::result::Result<(), String> {
        let mut etcd = self.etcd.clone();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = etcd.watch(self.models_prefix.as_str(), Some(options)).await.map_err(|e| e.to_string())?;
        while let Some(response) = stream.message().await.map_err(|e| e.to_string())? {
            if response.canceled() || response.compact_revision() > 0 {
                return Err(format!("canceled (compacted to revision {})", response.compact_revision()));
            }
            self.reached();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(name) = kv.key_str().ok().and_then(|k| k.strip_prefix(&self.models_prefix)) else {
                    continue;
                };
                let record = (event.event_type() == EventType::Put).then(|| kv.value());
                if let Err(e) = store.apply_remote(name, record, kv.mod_revision()) {
                    tracing::warn!(model = name, "applying a change from the catalog: {e}");
                }
                let mut st = self.state.lock().unwrap();
                st.revision = st.revision.max(kv.mod_revision());
            }
        }
        Err("the watch ended".into())
    }
}

impl Shared for Cluster {
    fn commit(&self, name: &str, record: Option<&[u8]>, seen: i64) -> Result<Committed> {
        let key = self.key(name);
        let write = match record {
            Some(bytes) => TxnOp::put(key.as_str(), bytes, None),
            None => TxnOp::delete(key.as_str(), None),
        };
        // An absent key's mod revision is 0: one compare covers creation.
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, seen)])
            .and_then(vec![write])
            .or_else(vec![TxnOp::get(key.as_str(), None)]);
        let mut etcd = self.etcd.clone();
        let response = self.ask_etcd(etcd.txn(txn))?;
        if response.succeeded() {
            let header = response.header().ok_or_else(|| Error::Internal("etcd answered without a revision".into()))?;
            return Ok(Committed::At(header.revision()));
        }
        let now = response.op_responses().into_iter().find_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision()))),
            _ => None,
        });
        Ok(Committed::Changed(now.flatten()))
    }

    fn upload(&self, digest: &Digest, path: &Path) -> Result<()> {
        let object = self.object(digest);
        let blobs = self.blobs.clone();
        let len = std::fs::metadata(path).map_err(|e| Error::io(path.display().to_string(), e))?.len();
        let upload = async {
            match blobs.head(&object).await {
                Ok(_) => return Ok(()), // content-addressed: already these bytes
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.to_string()),
            }
            if len < MULTIPART_BYTES {
                let bytes = tokio::fs::read(path).await.map_err(|e| e.to_string())?;
                let options = PutOptions { mode: PutMode::Create, ..Default::default() };
                match blobs.put_opts(&object, PutPayload::from(bytes), options).await {
                    Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            } else {
                // Parts cannot be create-only on every store; the bytes are
                // the same whoever writes them.
                let mut file = tokio::fs::File::open(path).await.map_err(|e| e.to_string())?;
                let mut writer = object_store::buffered::BufWriter::new(blobs.clone(), object.clone());
                let copied = match tokio::io::copy(&mut file, &mut writer).await {
                    Ok(_) => writer.shutdown().await,
                    Err(e) => Err(e),
                };
                if copied.is_err() {
                    // No unfinished multipart upload left in the bucket.
                    let _ = writer.abort().await;
                }
                copied.map_err(|e| e.to_string())
            }
        };
        // A large blob takes longer than one call's deadline.
        let started = Instant::now();
        let result = self.runtime.block_on(upload);
        tracing::debug!(blob = %digest, bytes = len, ms = started.elapsed().as_millis() as u64, "uploaded");
        result.map_err(|e| self.blob_error(e))
    }

    fn size(&self, digest: &Digest) -> Result<u64> {
        let object = self.object(digest);
        let blobs = self.blobs.clone();
        match self.call(async move { blobs.head(&object).await }) {
            Some(Ok(meta)) => Ok(meta.size),
            Some(Err(e)) => Err(self.blob_error(e)),
            None => Err(self.blob_error("no answer")),
        }
    }

    fn download(&self, digest: &Digest, to: &Path) -> Result<Digest> {
        use sha2::Digest as _;
        let object = self.object(digest);
        let blobs = self.blobs.clone();
        let download = async {
            let got = blobs.get(&object).await.map_err(|e| e.to_string())?;
            let mut file = tokio::fs::File::create(to).await.map_err(|e| e.to_string())?;
            let mut stream = got.into_stream();
            // Hashed as it comes: one pass over the bytes.
            let mut hasher = Digest::hasher();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| e.to_string())?;
                hasher.update(&chunk);
                file.write_all(&chunk).await.map_err(|e| e.to_string())?;
            }
            file.sync_all().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(Digest::finish(hasher))
        };
        self.runtime.block_on(download).map_err(|e| self.blob_error(e))
    }

    fn describe(&self) -> serde_json::Value {
        let st = self.state.lock().unwrap();
        serde_json::json!({
            "catalog": self.catalog_url,
            "blobs": self.blobs_url,
            "revision": st.revision,
            "unreachable_since": st.unreachable_since.map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            "nodes": st.nodes,
        })
    }
}
