//! A real etcd with TLS, auth and mesh's least-privilege roles, for tests of what a
//! locked-down etcd allows and refuses.

use std::collections::BTreeMap;
use std::path::PathBuf;

use mesh_etcd_local::pki::{CertFiles, Pki, Validity};
use mesh_etcd_local::{ClusterSpec, Security, Signal, User};

use crate::Error;
use crate::etcd::{Etcd, Member, START_TIMEOUT};

/// How to lock an etcd down.
#[derive(Debug, Clone)]
pub struct SecureOptions {
    /// The root prefix the roles cover.
    pub root: String,
    /// The services that get a server user (`server-{service}`).
    pub services: Vec<String>,
    /// `--auth-token-ttl` in seconds (etcd's default when `None`: 300).
    pub auth_token_ttl: Option<u32>,
    /// Whether etcd requires client certificates.
    pub client_cert_auth: bool,
}

impl Default for SecureOptions {
    /// Root `/mesh`, service `greeter`, client certificates required.
    fn default() -> Self {
        SecureOptions {
            root: "/mesh".into(),
            services: vec!["greeter".into()],
            auth_token_ttl: None,
            client_cert_auth: true,
        }
    }
}

/// What a client of a [`Etcd::start_secure`] etcd needs: the CA, a client certificate, and
/// the users with their passwords (`root`, `admin`, `client`, `server-{service}`).
#[derive(Debug, Clone)]
pub struct Credentials {
    /// The CA etcd's certificate chains to (`--etcd-ca`).
    pub ca: PathBuf,
    /// A client certificate the CA signed (`--etcd-cert`, `--etcd-key`).
    pub client: CertFiles,
    /// The PKI's directory, for more certificates.
    pub dir: PathBuf,
    passwords: BTreeMap<String, (String, PathBuf)>,
}

impl Credentials {
    /// The password of `user` (empty for an unknown user).
    pub fn password(&self, user: &str) -> &str {
        self.passwords.get(user).map_or("", |(p, _)| p.as_str())
    }

    /// A file holding the password of `user`, readable by the owner only
    /// (`--etcd-password-file`).
    pub fn password_file(&self, user: &str) -> PathBuf {
        self.passwords.get(user).map(|(_, f)| f.clone()).unwrap_or_default()
    }

    /// The users, in name order.
    pub fn users(&self) -> Vec<&str> {
        self.passwords.keys().map(String::as_str).collect()
    }
}

impl Etcd {
    /// Starts a one-member etcd with TLS on its client port (a certificate for 127.0.0.1
    /// and localhost from a CA made for it), auth on, and mesh's roles: `server-{service}`
    /// users that write only their service's registrations and status and read its
    /// configuration, a `client` that only reads, an `admin` that writes configuration,
    /// and `root`. Users and roles are created through the gateway of the member started
    /// without TLS first; then it restarts on the same data with TLS.
    pub async fn start_secure(options: SecureOptions) -> Result<(Self, Credentials), Error> {
        let bin = mesh_etcd_local::find_etcd()?;
        let dir = tempfile::Builder::new()
            .prefix("mesh-etcd-secure-")
            .tempdir()
            .map_err(|e| Error::Usage(format!("creating a temp dir for etcd: {e}")))?;
        let pki_dir = dir.path().join("pki");
        let pki = Pki::create(&pki_dir, "etcd")?;
        let server = pki.issue("etcd-server", "etcd", &["127.0.0.1", "localhost"], Validity::Current)?;
        let client = pki.issue("etcd-client", "mesh-test-client", &[], Validity::Current)?;

        let root = options.root.as_str();
        let mut roles = vec![mesh_etcd_local::client_role(root), mesh_etcd_local::admin_role(root)];
        let mut users = vec![
            ("root".to_string(), vec!["root".to_string()]),
            ("admin".to_string(), vec!["mesh-admin".to_string()]),
            ("client".to_string(), vec!["mesh-client".to_string()]),
        ];
        for service in &options.services {
            let role = mesh_etcd_local::server_role(root, service);
            users.push((format!("server-{service}"), vec![role.name.clone()]));
            roles.push(role);
        }
        let mut passwords = BTreeMap::new();
        let mut accounts = Vec::new();
        for (name, roles) in users {
            let password = mesh_etcd_local::random_password()?;
            let file = pki_dir.join(format!("{name}.password"));
            mesh_etcd_local::pki::write(&file, password.as_bytes(), true)?;
            accounts.push(User { name: name.clone(), password: password.clone(), roles });
            passwords.insert(name, (password, file));
        }

        let mut etcd =
            Etcd { bin, spec: ClusterSpec::on_free_ports(dir.path(), 1)?, members: vec![Member::default()], dir };
        etcd.spawn(0)?;
        etcd.wait_healthy(START_TIMEOUT).await?;
        let url = etcd.spec.members[0].client_url();
        tokio::task::spawn_blocking(move || mesh_etcd_local::setup_auth(&url, &roles, &accounts))
            .await
            .map_err(|e| Error::Usage(format!("setting up etcd auth: {e}")))??;
        // A clean stop, so that the restart finds everything on disk.
        if let Some(pid) = etcd.pid(0) {
            mesh_etcd_local::signal(pid, Signal::Term)?;
        }
        if let Some(child) = etcd.members[0].child.as_mut() {
            child.wait().ok();
        }
        etcd.members[0].child = None;
        let security = Security {
            ca: pki.ca_file(),
            cert: server.cert,
            key: server.key,
            client_cert_auth: options.client_cert_auth,
            auth_token_ttl: options.auth_token_ttl,
        };
        etcd.spec = etcd.spec.clone().with_security(security, &[])?;
        etcd.spawn(0)?;
        etcd.wait_healthy(START_TIMEOUT).await?;
        Ok((etcd, Credentials { ca: pki.ca_file(), client, dir: pki_dir, passwords }))
    }
}
