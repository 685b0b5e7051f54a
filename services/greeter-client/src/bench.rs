//! The load generator behind `greeter-client bench`: `concurrency` workers each call
//! `SayHello` back to back over one shared client for `warmup + duration`; only calls that
//! start after the warmup are counted. Each call carries the deadline `timeout`. The latency
//! of every counted call, failed or not, goes into an HDR histogram (microseconds, three
//! significant digits, so percentiles are exact to 0.1%): a stall shows in the tail and the
//! max, not only in the error count.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use serde::Serialize;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// Workers calling in parallel, each one call at a time.
    pub concurrency: usize,
    /// How long calls are measured.
    pub duration: Duration,
    /// How long calls run before measuring starts (connections, caches, CPU frequency).
    pub warmup: Duration,
    /// The name sent in each request.
    pub name: String,
    /// The deadline of each call, sent as `grpc-timeout`.
    pub timeout: Option<Duration>,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Concurrency used.
    pub concurrency: usize,
    /// Successful calls in the measured window.
    pub ok: u64,
    /// Failed calls in the measured window.
    pub errors: u64,
    /// Failed calls by gRPC code name.
    pub errors_by_code: BTreeMap<String, u64>,
    /// Length of the measured window, in seconds.
    pub seconds: f64,
    /// Successful calls per second.
    pub throughput: f64,
    /// Latency percentiles of all calls, failed ones included, in microseconds.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Slowest call.
    pub max_us: u64,
    /// Slowest failed call, 0 if none failed.
    pub failed_max_us: u64,
    /// Successful calls per `served_by`, to see where load went.
    pub served_by: BTreeMap<String, u64>,
}

impl BenchReport {
    /// A human-readable summary, several lines.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "concurrency {}: {} ok, {} failed in {:.2} s\nthroughput {:.0} calls/s\nlatency of all calls p50 {} µs, p90 {} µs, p99 {} µs, p99.9 {} µs, max {} µs",
            self.concurrency,
            self.ok,
            self.errors,
            self.seconds,
            self.throughput,
            self.p50_us,
            self.p90_us,
            self.p99_us,
            self.p999_us,
            self.max_us
        );
        for (code, n) in &self.errors_by_code {
            out.push_str(&format!("\n  {n} × {code}"));
        }
        if self.errors > 0 {
            out.push_str(&format!("\nslowest failed call {} µs", self.failed_max_us));
        }
        out
    }
}

struct WorkerResult {
    histogram: Histogram<u64>,
    ok: u64,
    failed_max_us: u64,
    errors: BTreeMap<String, u64>,
    served_by: BTreeMap<String, u64>,
}

/// Runs the benchmark over `channel` (any transport a generated client takes).
pub async fn run<T>(channel: T, config: &BenchConfig) -> BenchReport
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let start = Instant::now();
    let measure_from = start + config.warmup;
    let end = measure_from + config.duration;
    let mut workers = Vec::with_capacity(config.concurrency);
    for _ in 0..config.concurrency.max(1) {
        let mut client = GreeterClient::new(channel.clone());
        let name = config.name.clone();
        let timeout = config.timeout;
        workers.push(tokio::spawn(async move {
            let mut result = WorkerResult {
                histogram: new_histogram(),
                ok: 0,
                failed_max_us: 0,
                errors: BTreeMap::new(),
                served_by: BTreeMap::new(),
            };
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    break;
                }
                let mut request = tonic::Request::new(HelloRequest { name: name.clone() });
                if let Some(timeout) = timeout {
                    request.set_timeout(timeout);
                }
                let outcome = client.say_hello(request).await;
                if t0 < measure_from {
                    continue;
                }
                let micros = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX).max(1);
                result.histogram.saturating_record(micros);
                match outcome {
                    Ok(reply) => {
                        result.ok += 1;
                        *result.served_by.entry(reply.into_inner().served_by).or_default() += 1;
                    }
                    Err(status) => {
                        result.failed_max_us = result.failed_max_us.max(micros);
                        *result.errors.entry(format!("{:?}", status.code())).or_default() += 1;
                    }
                }
            }
            result
        }));
    }
    let mut histogram = new_histogram();
    let mut ok = 0;
    let mut failed_max_us = 0;
    let mut errors_by_code = BTreeMap::new();
    let mut served_by = BTreeMap::new();
    for worker in workers {
        // A worker only ends by its loop; a panic there is a bug worth surfacing as errors.
        match worker.await {
            Ok(r) => {
                let _ = histogram.add(&r.histogram);
                ok += r.ok;
                failed_max_us = failed_max_us.max(r.failed_max_us);
                merge(&mut errors_by_code, r.errors);
                merge(&mut served_by, r.served_by);
            }
            Err(e) => *errors_by_code.entry(format!("worker failed: {e}")).or_default() += 1,
        }
    }
    let seconds = config.duration.as_secs_f64();
    BenchReport {
        concurrency: config.concurrency,
        ok,
        errors: errors_by_code.values().sum(),
        errors_by_code,
        seconds,
        throughput: if seconds > 0.0 { ok as f64 / seconds } else { 0.0 },
        p50_us: histogram.value_at_quantile(0.50),
        p90_us: histogram.value_at_quantile(0.90),
        p99_us: histogram.value_at_quantile(0.99),
        p999_us: histogram.value_at_quantile(0.999),
        max_us: histogram.max(),
        failed_max_us,
        served_by,
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 60 s at three significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant histogram bounds are valid")
}

fn merge(into: &mut BTreeMap<String, u64>, from: BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k).or_default() += v;
    }
}
