use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use mesh_etcd_local::{ClusterSpec, Signal};
use serde_json::{Value, json};

use crate::Error;

/// How long a member gets to become healthy.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one gateway call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// A real etcd of one or three members on free loopback ports, in a temp dir, killed (and
/// its data removed) on drop.
#[derive(Debug)]
pub struct Etcd {
    pub(crate) bin: PathBuf,
    pub(crate) spec: ClusterSpec,
    pub(crate) members: Vec<Member>,
    // Dropped last, after the members are dead.
    pub(crate) dir: tempfile::TempDir,
}

#[derive(Debug, Default)]
pub(crate) struct Member {
    pub(crate) child: Option<Child>,
    paused: bool,
}

/// One key and value as etcd holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value, as UTF-8 (lossy).
    pub value: String,
    /// The revision of the last change to this key.
    pub mod_revision: i64,
    /// The lease attached to the key, 0 for none.
    pub lease: i64,
}

impl Etcd {
    /// Starts a one-member etcd and waits until it is healthy.
    pub async fn start() -> Result<Self, Error> {
        Self::start_cluster(1).await
    }

    /// Starts a cluster of `size` members and waits until every member is healthy.
    pub async fn start_cluster(size: usize) -> Result<Self, Error> {
        if size == 0 {
            return Err(Error::Usage("an etcd cluster needs at least one member".into()));
        }
        let bin = mesh_etcd_local::find_etcd()?;
        // A port found free can be taken before etcd binds it; then etcd exits and we try
        // again on other ports, in a new dir.
        let mut last_err = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("mesh-etcd-")
                .tempdir()
                .map_err(|e| Error::Usage(format!("creating a temp dir for etcd: {e}")))?;
            let mut etcd = Etcd {
                bin: bin.clone(),
                spec: ClusterSpec::on_free_ports(dir.path(), size)?,
                members: (0..size).map(|_| Member::default()).collect(),
                dir,
            };
            let started: Result<(), Error> = async {
                for i in 0..size {
                    etcd.spawn(i)?;
                }
                etcd.wait_healthy(START_TIMEOUT).await
            }
            .await;
            match started {
                Ok(()) => return Ok(etcd),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| Error::Usage("etcd did not start".into())))
    }

    /// The client URLs of every member, `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.spec.client_urls()
    }

    /// The client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.spec.members.get(i).map(|m| m.client_url()).unwrap_or_default()
    }

    /// The number of members.
    pub fn size(&self) -> usize {
        self.members.len()
    }

    /// The pid of member `i`, if it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members.get(i)?.child.as_ref().map(Child::id)
    }

    /// `kill -9` member `i` and reap it. Its data dir stays, for [`Etcd::restart`].
    pub fn kill(&mut self, i: usize) -> Result<(), Error> {
        let member = self.member_mut(i)?;
        if let Some(mut child) = member.child.take() {
            child.kill().ok();
            child.wait().ok();
        }
        member.paused = false;
        Ok(())
    }

    /// SIGSTOP member `i`: it keeps its sockets but answers nothing, like a hung process.
    pub fn pause(&mut self, i: usize) -> Result<(), Error> {
        self.signal(i, Signal::Stop)?;
        self.member_mut(i)?.paused = true;
        Ok(())
    }

    /// SIGCONT member `i` after [`Etcd::pause`].
    pub fn resume(&mut self, i: usize) -> Result<(), Error> {
        self.signal(i, Signal::Cont)?;
        self.member_mut(i)?.paused = false;
        Ok(())
    }

    /// Restarts member `i` on its data dir and the same ports (killing it first if it runs),
    /// and waits until the running members are healthy.
    pub async fn restart(&mut self, i: usize) -> Result<(), Error> {
        self.kill(i)?;
        self.spawn(i)?;
        self.wait_healthy(START_TIMEOUT).await
    }

    /// `kill -9` every member, then starts them all again on their data dirs, as after a
    /// power cut; waits until they are healthy.
    pub async fn restart_all(&mut self) -> Result<(), Error> {
        for i in 0..self.size() {
            self.kill(i)?;
        }
        for i in 0..self.size() {
            self.spawn(i)?;
        }
        self.wait_healthy(START_TIMEOUT).await
    }

    /// Restarts a one-member etcd on an empty data dir and the same ports: a new cluster,
    /// with a new cluster id, revision 1 and no keys, as after a disaster without backup.
    pub async fn restart_fresh(&mut self) -> Result<(), Error> {
        if self.size() != 1 {
            return Err(Error::Usage(
                "restart_fresh needs a one-member etcd: a member of a cluster cannot rejoin with an empty data dir"
                    .into(),
            ));
        }
        self.kill(0)?;
        let data_dir = &self.spec.members[0].data_dir;
        std::fs::remove_dir_all(data_dir).map_err(|e| Error::Usage(format!("removing {}: {e}", data_dir.display())))?;
        // A new token makes it a different cluster, with a different cluster id.
        self.spec.token.push_str("-fresh");
        self.spawn(0)?;
        self.wait_healthy(START_TIMEOUT).await
    }

    /// Waits until every running, unpaused member reports healthy.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let urls: Vec<String> = self.live().map(|i| self.spec.members[i].health_url()).collect();
            let healthy = tokio::task::spawn_blocking(move || {
                urls.iter().all(|u| mesh_etcd_local::is_healthy(u, Duration::from_millis(500)))
            })
            .await
            .unwrap_or(false);
            if healthy {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Etcd(mesh_etcd_local::Error::Unhealthy {
                    urls: self.endpoints(),
                    detail: format!("not healthy after {timeout:?}; log: {}", self.log_tail()),
                }));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The index of the current leader, as the running members report it.
    pub async fn leader(&self) -> Result<usize, Error> {
        for i in self.live() {
            let Ok(status) = self.call_member(i, "/v3/maintenance/status", json!({})).await else {
                continue;
            };
            let me = number(&status["header"]["member_id"]);
            let leader = number(&status["leader"]);
            if me.is_some() && me == leader {
                return Ok(i);
            }
        }
        Err(Error::Gateway { call: "status".into(), detail: "no running member reports itself leader".into() })
    }

    /// Puts `key` = `value`; returns the revision of the put.
    pub async fn put(&self, key: &str, value: impl AsRef<[u8]>) -> Result<i64, Error> {
        let body = json!({"key": B64.encode(key), "value": B64.encode(value)});
        let resp = self.call("/v3/kv/put", body).await?;
        revision(&resp, &format!("put {key}"))
    }

    /// Puts `key` = `value` through member `i`'s gateway (a follower forwards it to the
    /// leader); returns the revision of the put.
    pub async fn put_on(&self, i: usize, key: &str, value: impl AsRef<[u8]>) -> Result<i64, Error> {
        let body = json!({"key": B64.encode(key), "value": B64.encode(value)});
        let resp = self.call_member(i, "/v3/kv/put", body).await?;
        revision(&resp, &format!("put {key}"))
    }

    /// Gets the value of `key`, if present.
    pub async fn get(&self, key: &str) -> Result<Option<String>, Error> {
        let kvs = self.range(json!({"key": B64.encode(key)}), key).await?;
        Ok(kvs.into_iter().next().map(|kv| kv.value))
    }

    /// Gets the value `key` had at `revision`; fails once that revision is compacted.
    pub async fn get_at(&self, key: &str, revision: i64) -> Result<Option<String>, Error> {
        let body = json!({"key": B64.encode(key), "revision": revision.to_string()});
        let kvs = self.range(body, key).await?;
        Ok(kvs.into_iter().next().map(|kv| kv.value))
    }

    /// Every key under `prefix`, in key order.
    pub async fn get_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, Error> {
        let body =
            json!({"key": B64.encode(prefix), "range_end": B64.encode(mesh_etcd_local::prefix_end(prefix.as_bytes()))});
        self.range(body, prefix).await
    }

    /// Puts every pair in one transaction, so that a watcher gets all of them in one response
    /// at one revision, as a Go program's `Txn().Then(OpPut(…), OpPut(…))` does. Returns that
    /// revision.
    pub async fn put_all(&self, pairs: &[(&str, &str)]) -> Result<i64, Error> {
        let success: Vec<Value> =
            pairs.iter().map(|(k, v)| json!({"request_put": {"key": B64.encode(k), "value": B64.encode(v)}})).collect();
        let resp = self.call("/v3/kv/txn", json!({"success": success})).await?;
        revision(&resp, "txn")
    }

    /// Puts `key` = `value` attached to `lease` (see [`Etcd::grant`]).
    pub async fn put_leased(&self, key: &str, value: impl AsRef<[u8]>, lease: i64) -> Result<i64, Error> {
        let body = json!({"key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string()});
        let resp = self.call("/v3/kv/put", body).await?;
        revision(&resp, &format!("put {key}"))
    }

    /// Puts `key` = `value` keeping the lease the key has (`etcdctl put --ignore-lease`): an
    /// overwrite that a lease-holder's keepalive does not notice.
    pub async fn put_ignore_lease(&self, key: &str, value: impl AsRef<[u8]>) -> Result<i64, Error> {
        let body = json!({"key": B64.encode(key), "value": B64.encode(value), "ignore_lease": true});
        let resp = self.call("/v3/kv/put", body).await?;
        revision(&resp, &format!("put --ignore-lease {key}"))
    }

    /// Runs `ops` in one transaction (`etcdctl txn`): a watcher gets every event in one
    /// response at one revision. Returns that revision.
    pub async fn txn(&self, ops: &[TxnOp]) -> Result<i64, Error> {
        let success: Vec<Value> = ops
            .iter()
            .map(|op| match op {
                TxnOp::Put(k, v) => json!({"request_put": {"key": B64.encode(k), "value": B64.encode(v)}}),
                TxnOp::Delete(k) => json!({"request_delete_range": {"key": B64.encode(k)}}),
                TxnOp::DeletePrefix(p) => json!({"request_delete_range": {
                    "key": B64.encode(p),
                    "range_end": B64.encode(mesh_etcd_local::prefix_end(p.as_bytes())),
                }}),
            })
            .collect();
        let resp = self.call("/v3/kv/txn", json!({"success": success})).await?;
        revision(&resp, "txn")
    }

    /// Every key under `prefix` as it was at `revision`; fails once that revision is
    /// compacted.
    pub async fn get_prefix_at(&self, prefix: &str, revision: i64) -> Result<Vec<KeyValue>, Error> {
        let body = json!({
            "key": B64.encode(prefix),
            "range_end": B64.encode(mesh_etcd_local::prefix_end(prefix.as_bytes())),
            "revision": revision.to_string(),
        });
        self.range(body, prefix).await
    }

    /// Every key under `prefix` with the revision of the store when they were read.
    pub async fn get_prefix_with_revision(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), Error> {
        let body =
            json!({"key": B64.encode(prefix), "range_end": B64.encode(mesh_etcd_local::prefix_end(prefix.as_bytes()))});
        let resp = self.call("/v3/kv/range", body).await?;
        let at = revision(&resp, &format!("get --prefix {prefix}"))?;
        Ok((kvs(&resp, prefix)?, at))
    }

    /// The cluster id and the store revision, as the first running member reports them.
    pub async fn status(&self) -> Result<Status, Error> {
        let resp = self.call("/v3/maintenance/status", json!({})).await?;
        Ok(Status {
            cluster_id: number(&resp["header"]["cluster_id"]).unwrap_or(0) as u64,
            revision: revision(&resp, "status")?,
        })
    }

    /// The index of a running member that is not the leader.
    pub async fn follower(&self) -> Result<usize, Error> {
        let leader = self.leader().await?;
        self.live().find(|&i| i != leader).ok_or_else(|| Error::Usage("no running member besides the leader".into()))
    }

    /// Grants a lease of `ttl_secs`; returns its id.
    pub async fn grant(&self, ttl_secs: i64) -> Result<i64, Error> {
        let resp = self.call("/v3/lease/grant", json!({"TTL": ttl_secs.to_string()})).await?;
        number(&resp["ID"]).ok_or_else(|| gateway_err("grant", format!("no ID in {resp}")))
    }

    /// The seconds `lease` has left (`None` once it expired or was revoked).
    pub async fn time_to_live(&self, lease: i64) -> Result<Option<i64>, Error> {
        let resp = self.call("/v3/lease/timetolive", json!({"ID": lease.to_string()})).await?;
        Ok(number(&resp["TTL"]).filter(|ttl| *ttl > 0))
    }

    /// Revokes `lease`, deleting every key attached to it in one revision.
    pub async fn revoke(&self, lease: i64) -> Result<(), Error> {
        self.call("/v3/lease/revoke", json!({"ID": lease.to_string()})).await.map(drop)
    }

    /// Deletes every key under `prefix` in one revision (`etcdctl del --prefix`); returns
    /// how many went.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<i64, Error> {
        let body =
            json!({"key": B64.encode(prefix), "range_end": B64.encode(mesh_etcd_local::prefix_end(prefix.as_bytes()))});
        let resp = self.call("/v3/kv/deleterange", body).await?;
        Ok(number(&resp["deleted"]).unwrap_or(0))
    }

    /// Deletes `key`; returns how many keys were deleted.
    pub async fn delete(&self, key: &str) -> Result<i64, Error> {
        let resp = self.call("/v3/kv/deleterange", json!({"key": B64.encode(key)})).await?;
        Ok(number(&resp["deleted"]).unwrap_or(0))
    }

    /// The current revision of the store.
    pub async fn revision(&self) -> Result<i64, Error> {
        let resp = self.call("/v3/maintenance/status", json!({})).await?;
        revision(&resp, "status")
    }

    /// Compacts the history up to `revision`: watches from older revisions then fail with
    /// "required revision has been compacted".
    pub async fn compact(&self, revision: i64) -> Result<(), Error> {
        let body = json!({"revision": revision.to_string(), "physical": true});
        self.call("/v3/kv/compaction", body).await.map(drop)
    }

    // === internals ===

    pub(crate) fn spawn(&mut self, i: usize) -> Result<(), Error> {
        let log_path = self.dir.path().join(format!("m{i}.log"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::Usage(format!("opening {}: {e}", log_path.display())))?;
        let child = mesh_etcd_local::start_member(&self.bin, &self.spec, i)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|source| mesh_etcd_local::Error::Spawn { binary: self.bin.clone(), source })?;
        let member = self.member_mut(i)?;
        member.child = Some(child);
        member.paused = false;
        Ok(())
    }

    pub(crate) fn signal(&self, i: usize, sig: Signal) -> Result<(), Error> {
        let pid = self.pid(i).ok_or_else(|| Error::Usage(format!("etcd member {i} is not running")))?;
        Ok(mesh_etcd_local::signal(pid, sig)?)
    }

    pub(crate) fn member_mut(&mut self, i: usize) -> Result<&mut Member, Error> {
        let n = self.members.len();
        self.members.get_mut(i).ok_or_else(|| Error::Usage(format!("no etcd member {i} in a cluster of {n}")))
    }

    pub(crate) fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.members.len()).filter(|&i| self.members[i].child.is_some() && !self.members[i].paused)
    }

    fn check_alive(&mut self) -> Result<(), Error> {
        for (i, m) in self.members.iter_mut().enumerate() {
            if let Some(Ok(Some(status))) = m.child.as_mut().map(Child::try_wait) {
                m.child = None;
                let log = self.dir.path().join(format!("m{i}.log"));
                return Err(Error::Usage(format!("etcd member {i} exited with {status}; log: {}", tail(&log))));
            }
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        (0..self.members.len())
            .map(|i| tail(&self.dir.path().join(format!("m{i}.log"))))
            .collect::<Vec<_>>()
            .join(" || ")
    }

    async fn range(&self, body: Value, what: &str) -> Result<Vec<KeyValue>, Error> {
        let resp = self.call("/v3/kv/range", body).await?;
        kvs(&resp, what)
    }

    /// Calls the gateway on the first running member that answers.
    pub(crate) async fn call(&self, path: &str, body: Value) -> Result<Value, Error> {
        let mut last = None;
        for i in self.live() {
            match self.call_member(i, path, body.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| gateway_err(path, "no etcd member is running".into())))
    }

    async fn call_member(&self, i: usize, path: &str, body: Value) -> Result<Value, Error> {
        let url = self.endpoint(i);
        let p = path.to_string();
        let text = tokio::task::spawn_blocking(move || {
            mesh_etcd_local::gateway_post(&url, &p, &body.to_string(), CALL_TIMEOUT)
        })
        .await
        .map_err(|e| gateway_err(path, e.to_string()))?
        .map_err(|e| gateway_err(path, mesh_util::error_chain(&e)))?;
        serde_json::from_str(&text).map_err(|e| gateway_err(path, format!("{e}: {text}")))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                child.kill().ok();
                child.wait().ok();
            }
        }
    }
}

/// One operation of [`Etcd::txn`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// Put a key (no lease).
    Put(String, String),
    /// Delete a key.
    Delete(String),
    /// Delete every key under a prefix.
    DeletePrefix(String),
}

/// What [`Etcd::status`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The cluster's id.
    pub cluster_id: u64,
    /// The store's revision.
    pub revision: i64,
}

fn kvs(resp: &Value, what: &str) -> Result<Vec<KeyValue>, Error> {
    let kvs = resp["kvs"].as_array().cloned().unwrap_or_default();
    kvs.iter()
        .map(|kv| {
            Ok(KeyValue {
                key: decode(&kv["key"]).map_err(|d| gateway_err(what, d))?,
                value: decode(&kv["value"]).map_err(|d| gateway_err(what, d))?,
                mod_revision: number(&kv["mod_revision"]).unwrap_or(0),
                lease: number(&kv["lease"]).unwrap_or(0),
            })
        })
        .collect()
}

pub(crate) fn gateway_err(call: &str, detail: String) -> Error {
    Error::Gateway { call: call.to_string(), detail }
}

fn number(v: &Value) -> Option<i64> {
    match v {
        Value::String(s) => s.parse::<u64>().ok().map(|n| n as i64),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

fn revision(resp: &Value, call: &str) -> Result<i64, Error> {
    number(&resp["header"]["revision"]).ok_or_else(|| gateway_err(call, format!("no revision in {resp}")))
}

pub(crate) fn decode(v: &Value) -> Result<String, String> {
    let s = v.as_str().unwrap_or_default();
    B64.decode(s).map(|b| String::from_utf8_lossy(&b).into_owned()).map_err(|e| format!("bad base64 {s:?}: {e}"))
}

pub(crate) fn tail(path: &std::path::Path) -> String {
    let text = File::open(path)
        .ok()
        .and_then(|mut f| {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut f, &mut s).ok().map(|_| s)
        })
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
