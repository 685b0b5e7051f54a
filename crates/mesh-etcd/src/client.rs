use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::sync::OnceCell;

use crate::{ErrorKind, EtcdError, EtcdOptions, MAX_MESSAGE_BYTES};

/// A handle to etcd: cheap to clone, connects lazily on first use (so creating one never
/// fails because etcd is down), and bounds every request by the request timeout.
#[derive(Clone)]
pub struct Etcd {
    inner: Arc<Inner>,
}

struct Inner {
    options: EtcdOptions,
    client: OnceCell<Client>,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd").field("endpoints", &self.inner.options.endpoints).finish_non_exhaustive()
    }
}

/// One key and its value as etcd holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key (UTF-8, lossy).
    pub key: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// The revision of the last change to the key.
    pub mod_revision: i64,
    /// The lease the key is attached to, 0 for none.
    pub lease: i64,
}

/// Everything under a prefix at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// The store revision the listing was taken at.
    pub revision: i64,
    /// The id of the cluster that answered.
    pub cluster_id: u64,
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its id.
    pub id: i64,
    /// The TTL etcd granted, in seconds.
    pub ttl: i64,
}

impl KeyValue {
    pub(crate) fn from_client(kv: &etcd_client::KeyValue) -> Self {
        KeyValue {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            value: kv.value().to_vec(),
            mod_revision: kv.mod_revision(),
            lease: kv.lease(),
        }
    }
}

impl Etcd {
    /// A handle for `options`. Does not connect.
    pub fn new(options: EtcdOptions) -> Self {
        Etcd { inner: Arc::new(Inner { options, client: OnceCell::new() }) }
    }

    /// The options it was made with.
    pub fn options(&self) -> &EtcdOptions {
        &self.inner.options
    }

    /// The endpoints, comma-separated, for messages.
    pub fn endpoints(&self) -> String {
        self.inner.options.endpoints.join(",")
    }

    async fn client(&self) -> Result<Client, EtcdError> {
        let opts = &self.inner.options;
        let client = self
            .inner
            .client
            .get_or_try_init(|| async {
                opts.check()?;
                // Without auth this does not touch the network; with auth it logs in, and a
                // failure leaves the cell empty so the next call tries again.
                let connect = Client::connect(&opts.endpoints, Some(opts.client_options()));
                match tokio::time::timeout(opts.request_timeout, connect).await {
                    Ok(result) => result.map_err(|e| EtcdError::from_client("connect", e)),
                    Err(_) => Err(EtcdError::timeout("connect", opts.request_timeout)),
                }
            })
            .await?;
        Ok(client.clone())
    }

    /// Runs `f` with a client, bounded by the request timeout.
    async fn run<T, F, Fut>(&self, op: impl Fn() -> String, f: F) -> Result<T, EtcdError>
    where
        F: FnOnce(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let timeout = self.inner.options.request_timeout;
        let client = self.client().await.map_err(|e| EtcdError::new(op(), e.kind().clone()))?;
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(EtcdError::from_client(op(), e)),
            Err(_) => Err(EtcdError::timeout(op(), timeout)),
        }
    }

    /// Every key under `prefix`, with the revision and cluster id of the answer.
    pub async fn list(&self, prefix: &str) -> Result<Listing, EtcdError> {
        self.range(prefix, true).await
    }

    /// `key` alone, as a listing (empty if absent).
    pub async fn list_key(&self, key: &str) -> Result<Listing, EtcdError> {
        self.range(key, false).await
    }

    /// The value of `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, EtcdError> {
        Ok(self.list_key(key).await?.kvs.into_iter().next())
    }

    async fn range(&self, key: &str, prefix: bool) -> Result<Listing, EtcdError> {
        let op = || if prefix { format!("list {key}") } else { format!("get {key}") };
        if !prefix {
            let resp = self.run(op, |c| async move { kv(&c).get(key, None).await }).await?;
            let header = resp.header().ok_or_else(|| no_header(op()))?;
            return Ok(Listing {
                kvs: resp.kvs().iter().map(KeyValue::from_client).collect(),
                revision: header.revision(),
                cluster_id: header.cluster_id(),
            });
        }
        // A compaction between two pages makes the revision of the first unreadable: list
        // again from the start, at a newer revision.
        let mut attempt = 0;
        loop {
            match self.list_pages(key).await {
                Err(e) if matches!(e.kind(), ErrorKind::Compacted(_)) && attempt < 3 => attempt += 1,
                other => return other,
            }
        }
    }

    /// Lists `prefix` in pages of `list_page_size` keys, every page at the revision of the
    /// first, so that the listing is one consistent view however large the prefix.
    async fn list_pages(&self, prefix: &str) -> Result<Listing, EtcdError> {
        let end = prefix_end(prefix.as_bytes());
        let page = self.inner.options.list_page_size.max(1);
        let mut start = prefix.as_bytes().to_vec();
        let mut listing = Listing { kvs: Vec::new(), revision: 0, cluster_id: 0 };
        loop {
            let op = || format!("list {prefix} (page from {:?})", String::from_utf8_lossy(&start));
            let mut options = GetOptions::new().with_range(end.clone()).with_limit(page);
            if listing.revision > 0 {
                options = options.with_revision(listing.revision);
            }
            let from = start.clone();
            let resp = self.run(op, |c| async move { kv(&c).get(from, Some(options)).await }).await?;
            let header = resp.header().ok_or_else(|| no_header(op()))?;
            if listing.revision == 0 {
                listing.revision = header.revision();
                listing.cluster_id = header.cluster_id();
            }
            listing.kvs.extend(resp.kvs().iter().map(KeyValue::from_client));
            match resp.kvs().last() {
                Some(last) if resp.more() => {
                    // The next page starts right after the last key: the key with a 0 byte
                    // appended is the smallest key above it.
                    start = last.key().to_vec();
                    start.push(0);
                }
                _ => return Ok(listing),
            }
        }
    }

    /// Puts `key` = `value`, attached to `lease` if given; returns the new revision.
    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>, lease: Option<i64>) -> Result<i64, EtcdError> {
        let value = value.into();
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let resp = self.run(|| format!("put {key}"), |mut c| async move { c.put(key, value, options).await }).await?;
        resp.header().map(|h| h.revision()).ok_or_else(|| no_header(format!("put {key}")))
    }

    /// Puts `key` = `value` (attached to `lease` if given) only if the key's last change is
    /// still at `mod_revision`, where 0 means "the key does not exist": a compare-and-swap
    /// in one transaction, so two writers of one key cannot both win. Returns the new
    /// revision, or `None` when the key had changed (read it again, or watch it, to see how).
    pub async fn put_if(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
        lease: Option<i64>,
        mod_revision: i64,
    ) -> Result<Option<i64>, EtcdError> {
        let value = value.into();
        let op = || format!("put {key} if at revision {mod_revision}");
        let options = lease.map(|l| PutOptions::new().with_lease(l));
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::put(key, value, options)]);
        let resp = self.run(op, |mut c| async move { c.txn(txn).await }).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        resp.header().map(|h| Some(h.revision())).ok_or_else(|| no_header(op()))
    }

    /// Deletes `key`; returns how many keys went.
    pub async fn delete(&self, key: &str) -> Result<i64, EtcdError> {
        let resp = self.run(|| format!("delete {key}"), |mut c| async move { c.delete(key, None).await }).await?;
        Ok(resp.deleted())
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1).
    pub async fn grant(&self, ttl: Duration) -> Result<Lease, EtcdError> {
        let secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let resp = self
            .run(|| format!("grant a {secs}s lease"), |mut c| async move { c.lease_grant(secs, None).await })
            .await?;
        Ok(Lease { id: resp.id(), ttl: resp.ttl() })
    }

    /// Revokes lease `id`, deleting the keys attached to it.
    pub async fn revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.run(|| format!("revoke lease {id:x}"), |mut c| async move { c.lease_revoke(id).await }).await.map(drop)
    }

    /// Opens a keepalive stream for lease `id`.
    pub async fn keep_alive(&self, id: i64) -> Result<crate::LeaseKeepAlive, EtcdError> {
        let op = || format!("keep lease {id:x} alive");
        let (keeper, stream) = self.run(op, |mut c| async move { c.lease_keep_alive(id).await }).await?;
        Ok(crate::LeaseKeepAlive::new(id, keeper, stream, self.inner.options.request_timeout))
    }

    /// Compacts the history up to `revision` (physically, waiting for it).
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let op = || format!("compact to revision {revision}");
        self.run(op, |mut c| async move {
            c.compact(revision, Some(etcd_client::CompactionOptions::new().with_physical())).await
        })
        .await
        .map(drop)
    }

    /// Opens a watch on `key` (or every key under it, if `prefix`) from `start_revision`,
    /// with progress notifications.
    pub(crate) async fn watch(&self, key: &str, prefix: bool, start_revision: i64) -> Result<WatchStart, EtcdError> {
        match self.try_watch(key, prefix, start_revision).await {
            // etcd refuses a watch made with an expired token in its first message, not as
            // an error etcd-client would renew the token on: log in again and retry once.
            Err(e) if matches!(e.kind(), ErrorKind::AuthFailed(_)) && self.inner.options.user.is_some() => {
                let client = self.client().await?;
                let op = || format!("log in again to watch {key}");
                match tokio::time::timeout(self.inner.options.request_timeout, client.refresh_token()).await {
                    Ok(Ok(())) => self.try_watch(key, prefix, start_revision).await,
                    Ok(Err(e)) => Err(EtcdError::from_client(op(), e)),
                    Err(_) => Err(EtcdError::timeout(op(), self.inner.options.request_timeout)),
                }
            }
            other => other,
        }
    }

    async fn try_watch(&self, key: &str, prefix: bool, start_revision: i64) -> Result<WatchStart, EtcdError> {
        let mut options = WatchOptions::new().with_start_revision(start_revision).with_progress_notify();
        if prefix {
            options = options.with_prefix();
        }
        let mut stream = self
            .run(
                || format!("watch {key} from revision {start_revision}"),
                |c| async move {
                    c.watch_client().max_decoding_message_size(MAX_MESSAGE_BYTES).watch(key, Some(options)).await
                },
            )
            .await?;
        // The first message says whether the watch was created, or why not.
        let timeout = self.inner.options.request_timeout;
        let op = || format!("watch {key} from revision {start_revision}");
        let first = match tokio::time::timeout(timeout, stream.message()).await {
            Err(_) => return Err(EtcdError::timeout(op(), timeout)),
            Ok(Err(e)) => return Err(EtcdError::from_client(op(), e)),
            Ok(Ok(None)) => return Err(EtcdError::new(op(), ErrorKind::Unavailable("watch stream closed".into()))),
            Ok(Ok(Some(first))) => first,
        };
        if first.compact_revision() > 0 {
            return Err(EtcdError::new(op(), ErrorKind::Compacted(first.compact_revision())));
        }
        if first.canceled() {
            let reason = first.cancel_reason();
            let kind = if reason.contains("invalid auth token") || reason.contains("authentication") {
                ErrorKind::AuthFailed(reason.to_string())
            } else if reason.contains("permission denied") {
                ErrorKind::PermissionDenied(reason.to_string())
            } else {
                ErrorKind::Other(format!("watch canceled: {reason}"))
            };
            return Err(EtcdError::new(op(), kind));
        }
        let header = first.header().ok_or_else(|| no_header(op()))?;
        Ok(WatchStart { cluster_id: header.cluster_id(), revision: header.revision(), stream })
    }
}

/// A watch just created: its stream and the header of the creation response.
pub(crate) struct WatchStart {
    pub(crate) stream: etcd_client::WatchStream,
    pub(crate) cluster_id: u64,
    pub(crate) revision: i64,
}

/// A KV client of `client` that reads answers as large as etcd sends.
fn kv(client: &Client) -> etcd_client::KvClient {
    client.kv_client().max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// The end of the range of keys that start with `prefix`, as etcd's `WithPrefix` computes
/// it: the prefix with its last byte below 0xff incremented and the rest dropped; `\0` (every
/// key) when there is none.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn no_header(op: String) -> EtcdError {
    EtcdError::new(op, ErrorKind::Other("response without a header".into()))
}
