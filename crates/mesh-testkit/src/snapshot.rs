//! Disaster recovery and slow members: what an operator's backup restore and a struggling
//! follower do to a running cluster.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use mesh_etcd_local::Signal;
use serde_json::Value;

use crate::etcd::{START_TIMEOUT, gateway_err};
use crate::{Error, Etcd};

/// How long a snapshot may take to stream.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(60);

impl Etcd {
    /// Saves a snapshot of the store to `path`, as `etcdctl snapshot save` does (the
    /// gateway's `/v3/maintenance/snapshot`, whose answer is a stream of base64 chunks; the
    /// last one carries etcd's checksum, which a restore verifies).
    pub async fn snapshot(&self, path: &Path) -> Result<(), Error> {
        let url = self
            .live()
            .next()
            .map(|i| self.endpoint(i))
            .ok_or_else(|| gateway_err("snapshot", "no etcd member is running".into()))?;
        let text = tokio::task::spawn_blocking(move || {
            mesh_etcd_local::gateway_post(&url, "/v3/maintenance/snapshot", "{}", SNAPSHOT_TIMEOUT)
        })
        .await
        .map_err(|e| gateway_err("snapshot", e.to_string()))?
        .map_err(|e| gateway_err("snapshot", mesh_util::error_chain(&e)))?;
        let mut db = Vec::new();
        for chunk in serde_json::Deserializer::from_str(&text).into_iter::<Value>() {
            let chunk = chunk.map_err(|e| gateway_err("snapshot", format!("unreadable chunk: {e}")))?;
            if let Some(error) = chunk.get("error") {
                return Err(gateway_err("snapshot", error.to_string()));
            }
            let blob = chunk["result"]["blob"].as_str().unwrap_or_default();
            db.extend(B64.decode(blob).map_err(|e| gateway_err("snapshot", format!("bad base64: {e}")))?);
        }
        if db.is_empty() {
            return Err(gateway_err("snapshot", format!("no data in {text:.200}")));
        }
        std::fs::write(path, db).map_err(|e| Error::Usage(format!("writing {}: {e}", path.display())))
    }

    /// Restores every member from the snapshot at `path` and starts them again, as an
    /// operator recovering from a backup does (`etcdutl snapshot restore`, or etcdctl's up
    /// to etcd 3.5): the same member names, peer URLs and cluster token, so the cluster
    /// keeps its id while its revision goes back to the snapshot's, and every lease in the
    /// snapshot lives again for its TTL.
    pub async fn restore(&mut self, path: &Path) -> Result<(), Error> {
        let (tool, is_etcdutl) = mesh_etcd_local::find_snapshot_restorer().ok_or_else(|| {
            Error::Usage(
                "restoring a snapshot needs etcdutl (etcd 3.5+) or etcdctl (Debian: apt-get install etcd-client)"
                    .into(),
            )
        })?;
        for i in 0..self.size() {
            self.kill(i)?;
        }
        for i in 0..self.size() {
            let m = &self.spec.members[i];
            if m.data_dir.exists() {
                std::fs::remove_dir_all(&m.data_dir)
                    .map_err(|e| Error::Usage(format!("removing {}: {e}", m.data_dir.display())))?;
            }
            let mut cmd = Command::new(&tool);
            if !is_etcdutl {
                cmd.env("ETCDCTL_API", "3");
            }
            cmd.args(["snapshot", "restore"])
                .arg(path)
                .args(["--name", &m.name])
                .arg("--data-dir")
                .arg(&m.data_dir)
                .args(["--initial-cluster", &self.spec.initial_cluster()])
                .args(["--initial-cluster-token", &self.spec.token])
                .args(["--initial-advertise-peer-urls", &m.peer_url()]);
            let out = cmd.output().map_err(|e| Error::Usage(format!("running {}: {e}", tool.display())))?;
            if !out.status.success() {
                return Err(Error::Usage(format!(
                    "{} snapshot restore failed: {}",
                    tool.display(),
                    String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default()
                )));
            }
        }
        for i in 0..self.size() {
            self.spawn(i)?;
        }
        self.wait_healthy(START_TIMEOUT).await
    }

    /// Slows member `i` down: stopped for `stopped`, then running for `running`, over and
    /// over, until the returned guard is dropped (which leaves it running). A follower
    /// slowed so falls behind the leader and serves watches from an older revision.
    pub fn slow(&self, i: usize, stopped: Duration, running: Duration) -> Result<Slowdown, Error> {
        let pid = self.pid(i).ok_or_else(|| Error::Usage(format!("etcd member {i} is not running")))?;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if mesh_etcd_local::signal(pid, Signal::Stop).is_err() {
                    return;
                }
                std::thread::sleep(stopped);
                if mesh_etcd_local::signal(pid, Signal::Cont).is_err() {
                    return;
                }
                std::thread::sleep(running);
            }
        });
        Ok(Slowdown { pid, done, thread: Some(thread) })
    }
}

/// A member being slowed down (see [`Etcd::slow`]); dropping it lets the member run again.
#[derive(Debug)]
pub struct Slowdown {
    pid: u32,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Slowdown {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = mesh_etcd_local::signal(self.pid, Signal::Cont);
    }
}
