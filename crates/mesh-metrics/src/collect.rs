//! Metrics read from their source when a scrape comes, instead of copied into the recorder
//! now and then: a series is in the scrape exactly as long as what it describes exists (an
//! endpoint that leaves takes its series with it), and its value is never older than the
//! scrape.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What a [`collector`] writes into at each scrape: samples grouped by metric, each metric
/// with its help and type once, as Prometheus' text format wants.
#[derive(Debug, Default)]
pub struct Families {
    families: BTreeMap<&'static str, Family>,
}

#[derive(Debug)]
struct Family {
    kind: &'static str,
    help: &'static str,
    samples: String,
}

impl Families {
    /// A counter sample: `name{labels} value`.
    pub fn counter(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], value: u64) {
        self.push(name, "counter", help, labels, &value.to_string());
    }

    /// A gauge sample: `name{labels} value` (NaN and the infinities as Prometheus spells them).
    pub fn gauge(&mut self, name: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
        let value = if value.is_nan() {
            "NaN".to_string()
        } else if value.is_infinite() {
            if value > 0.0 { "+Inf" } else { "-Inf" }.to_string()
        } else {
            value.to_string()
        };
        self.push(name, "gauge", help, labels, &value);
    }

    /// Counter samples of calls by method and code from `counts`, each with `labels` too:
    /// `name{labels…,method,code} value`.
    pub fn calls(
        &mut self,
        name: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        counts: &crate::CallCounts,
    ) {
        for (method, code, n) in counts.by_method_and_code() {
            let mut all = labels.to_vec();
            all.push(("method", &method));
            all.push(("code", code));
            self.push(name, "counter", help, &all, &n.to_string());
        }
    }

    fn push(
        &mut self,
        name: &'static str,
        kind: &'static str,
        help: &'static str,
        labels: &[(&str, &str)],
        value: &str,
    ) {
        let family = self.families.entry(name).or_insert_with(|| Family { kind, help, samples: String::new() });
        family.samples.push_str(name);
        if !labels.is_empty() {
            family.samples.push('{');
            for (i, (key, v)) in labels.iter().enumerate() {
                if i > 0 {
                    family.samples.push(',');
                }
                let _ = write!(family.samples, "{key}=\"{}\"", crate::calls::escape(v));
            }
            family.samples.push('}');
        }
        let _ = writeln!(family.samples, " {value}");
    }

    fn render(self, out: &mut String) {
        for (name, family) in self.families {
            let _ = writeln!(out, "# HELP {name} {}\n# TYPE {name} {}", family.help, family.kind);
            out.push_str(&family.samples);
        }
    }
}

type Collect = dyn Fn(&mut Families) + Send + Sync;

static COLLECTORS: Mutex<Vec<(u64, Arc<Collect>)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A registered [`collector`]; dropping it takes its metrics out of the scrape.
#[derive(Debug)]
#[must_use = "the collector is unregistered when this is dropped"]
pub struct Collector {
    id: u64,
}

impl Drop for Collector {
    fn drop(&mut self) {
        COLLECTORS.lock().unwrap_or_else(|p| p.into_inner()).retain(|(id, _)| *id != self.id);
    }
}

/// Registers `collect`, which [`crate::Exporter::render`] calls at every scrape to write the
/// current samples of what it watches (say, a balancer's endpoints). It runs on the scrape's
/// task: it should read counters, not wait.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
///
/// # fn f() -> Result<(), mesh_metrics::MetricsError> {
/// let exporter = mesh_metrics::install()?;
/// let queued = Arc::new(AtomicU64::new(3));
/// let watched = queued.clone();
/// let collector = mesh_metrics::collector(move |out| {
///     out.gauge("jobs_queued", "Jobs waiting.", &[("queue", "mail")], watched.load(Ordering::Relaxed) as f64);
/// });
/// assert!(exporter.render().contains("jobs_queued{queue=\"mail\"} 3"));
/// drop(collector);
/// assert!(!exporter.render().contains("jobs_queued"));
/// # Ok(()) }
/// ```
pub fn collector(collect: impl Fn(&mut Families) + Send + Sync + 'static) -> Collector {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    COLLECTORS.lock().unwrap_or_else(|p| p.into_inner()).push((id, Arc::new(collect)));
    Collector { id }
}

/// Every registered collector's samples, in Prometheus' text format.
pub(crate) fn render() -> String {
    // Called outside the lock: a collector may take a while, or register another.
    let all: Vec<Arc<Collect>> =
        COLLECTORS.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(_, c)| c.clone()).collect();
    let mut families = Families::default();
    for collect in all {
        collect(&mut families);
    }
    let mut out = String::new();
    families.render(&mut out);
    out
}
