//! Access to etcd (endpoints, TLS, auth) as flags or from code, and the configuration's
//! metrics.

use std::path::PathBuf;

use mesh_etcd::{Etcd, EtcdOptions};

/// TLS and auth towards etcd. The password is never a flag: it comes from
/// `--etcd-password-file` or `MESH_ETCD_PASSWORD`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EtcdAccess {
    /// The CA that signed etcd's certificate (PEM): speak TLS to etcd (its endpoints
    /// become https://).
    #[arg(long, env = "MESH_ETCD_CA", global = true)]
    pub etcd_ca: Option<PathBuf>,

    /// A client certificate for etcd (PEM), when etcd requires one; with --etcd-key.
    #[arg(long, env = "MESH_ETCD_CERT", global = true, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,

    /// The key of --etcd-cert (PEM).
    #[arg(long, env = "MESH_ETCD_KEY", global = true, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,

    /// The etcd user, for an etcd with auth on; its password comes from
    /// --etcd-password-file or MESH_ETCD_PASSWORD.
    #[arg(long, env = "MESH_ETCD_USER", global = true)]
    pub etcd_user: Option<String>,

    /// A file holding the etcd user's password (first line).
    #[arg(long, env = "MESH_ETCD_PASSWORD_FILE", global = true, requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdAccess {
    /// A handle to the etcd at `endpoints` (`--etcd`) with these settings. Connects lazily;
    /// errors here are bad flags or unreadable files, named.
    pub fn etcd(&self, endpoints: &str) -> Result<Etcd, String> {
        let mut options =
            EtcdOptions::parse_endpoints(endpoints).map_err(|e| format!("invalid --etcd {endpoints:?}: {e}"))?;
        if let Some(ca) = &self.etcd_ca {
            let identity = self.etcd_cert.as_deref().zip(self.etcd_key.as_deref());
            options = options.with_tls(ca, identity).map_err(|e| e.to_string())?;
        } else if self.etcd_cert.is_some() {
            return Err("--etcd-cert needs --etcd-ca (the CA that signed etcd's certificate)".into());
        }
        match (
            &self.etcd_user,
            mesh_etcd::read_password(self.etcd_password_file.as_deref()).map_err(|e| e.to_string())?,
        ) {
            (Some(user), Some(password)) => options = options.with_user(user.clone(), password),
            (Some(user), None) => {
                return Err(format!(
                    "--etcd-user {user} needs a password: --etcd-password-file FILE or {}",
                    mesh_etcd::PASSWORD_ENV
                ));
            }
            (None, _) => {}
        }
        options.check().map_err(|e| e.to_string())?;
        Ok(Etcd::new(options))
    }
}

/// The configuration applied, as metrics: its etcd revision (0 for the file and flag
/// settings alone), documents applied, and documents refused.
pub async fn config_metrics(mut status: tokio::sync::watch::Receiver<mesh_config::ConfigStatus>) {
    let revision = metrics::gauge!("mesh_config_revision");
    let applied = metrics::counter!("mesh_config_applied_total");
    let refused = metrics::counter!("mesh_config_rejections_total");
    let mut last_refused = None;
    loop {
        {
            let now = status.borrow_and_update();
            revision.set(now.revision.unwrap_or(0) as f64);
            applied.absolute(now.applied);
            let this_refusal = now.last_rejection.as_ref().map(|r| r.revision);
            if this_refusal.is_some() && this_refusal != last_refused {
                refused.increment(1);
                last_refused = this_refusal;
            }
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}
