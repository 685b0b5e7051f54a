//! The process's metrics exporter, shared: a server and a client in one process (a service
//! that calls another) each serve the same metrics on their own `metrics_listen`.

use std::sync::Mutex;

static EXPORTER: Mutex<Option<mesh_metrics::Exporter>> = Mutex::new(None);

/// The exporter installed in this process, installed now if none is.
pub(crate) fn exporter() -> Result<mesh_metrics::Exporter, mesh_metrics::MetricsError> {
    let mut held = EXPORTER.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(exporter) = held.as_ref() {
        return Ok(exporter.clone());
    }
    let exporter = mesh_metrics::install()?;
    *held = Some(exporter.clone());
    Ok(exporter)
}
