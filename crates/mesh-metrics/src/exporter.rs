//! The process's Prometheus recorder and its scrape endpoint.

use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::debug;

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("metrics: {0}")]
pub struct MetricsError(String);

/// Latency buckets, in seconds: 100 µs to 10 s.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 10.0];

/// The recorder of this process, to render and serve.
#[derive(Debug, Clone)]
pub struct Exporter {
    handle: PrometheusHandle,
}

static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether [`install`] has put a recorder in place in this process.
pub fn installed() -> bool {
    INSTALLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs a Prometheus recorder behind the `metrics` facade for this process; histograms
/// whose name ends in `_seconds` get latency buckets from 100 µs to 10 s. Fails if a
/// recorder is installed already.
pub fn install() -> Result<Exporter, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS)
        .map_err(|e| MetricsError(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError(e.to_string()))?;
    describe();
    INSTALLED.store(true, std::sync::atomic::Ordering::Relaxed);
    Ok(Exporter { handle })
}

impl Exporter {
    /// Everything recorded so far, in Prometheus' text format: what went through the
    /// `metrics` facade, the call metrics of every [`crate::CallMetricsLayer`], and what
    /// every registered [`crate::collector`] reads now.
    pub fn render(&self) -> String {
        let mut text = self.handle.render();
        text.push_str(&crate::calls::render());
        text.push_str(&crate::collect::render());
        text
    }

    /// Answers `GET /metrics` on `listener` (HTTP/1.1, one request per connection) until the
    /// returned task is aborted; any other path gets 404. Also runs the recorder's upkeep.
    pub fn serve(&self, listener: TcpListener) -> JoinHandle<()> {
        let exporter = self.clone();
        tokio::spawn(async move {
            let upkeep = exporter.handle.clone();
            let _upkeep = AbortOnDrop(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    upkeep.run_upkeep();
                }
            }));
            loop {
                let Ok((tcp, peer)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let exporter = exporter.clone();
                tokio::spawn(async move {
                    if let Err(e) = exporter.answer(tcp).await {
                        debug!("metrics scrape from {peer}: {e}");
                    }
                });
            }
        })
    }

    async fn answer(&self, mut tcp: TcpStream) -> std::io::Result<()> {
        // The request line and headers: at most 8 KiB within 5 s.
        let mut request = Vec::with_capacity(512);
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                let n = tcp.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(())
        })
        .await;
        if !matches!(read, Ok(Ok(()))) {
            return Ok(());
        }
        let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
        let mut words = line.split(|&b| b == b' ');
        let (method, path) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
        let path = path.split(|&b| b == b'?').next().unwrap_or_default();
        let (status, body) = match (method, path) {
            (b"GET", b"/metrics") => ("200 OK", self.render()),
            (b"GET", _) => ("404 Not Found", "not found; metrics are at /metrics\n".to_string()),
            _ => ("405 Method Not Allowed", "GET /metrics\n".to_string()),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        tcp.shutdown().await
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The help text of the metrics the services record through the facade (the configuration's),
/// shown as `# HELP` in a scrape; the other metrics come with their collectors' help.
fn describe() {
    use metrics::{describe_counter, describe_gauge};
    describe_gauge!("mesh_config_revision", "etcd revision of the configuration applied; 0 for file and flags alone.");
    describe_counter!("mesh_config_applied_total", "Configuration documents applied.");
    describe_counter!("mesh_config_rejections_total", "Configuration documents refused.");
}
