//! A throwaway certificate authority for a local etcd and local services under TLS: a CA,
//! and certificates it signs for servers and clients, written as PEM files. For
//! `cargo xtask etcd-up --secure` and tests; a real deployment brings its own PKI.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::Error;

/// A certificate and its key on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8), readable by the owner only.
    pub key: PathBuf,
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From 1975 to 4096: valid now.
    Current,
    /// During 2020 only: expired.
    Expired,
}

/// A CA whose files live in one directory.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    name: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

fn pki_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::io(format!("{what}: {e}"), std::io::Error::other(e.to_string()))
}

impl Pki {
    /// A new CA named `name`, its certificate written to `dir/{name}-ca.pem`.
    pub fn create(dir: &Path, name: &str) -> Result<Self, Error> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| pki_error("CA parameters", e))?;
        params.distinguished_name.push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().map_err(|e| pki_error("generating the CA key", e))?;
        let ca = CertifiedIssuer::self_signed(params, key).map_err(|e| pki_error("signing the CA", e))?;
        let pki = Pki { dir: dir.to_path_buf(), name: name.to_string(), ca };
        write(&pki.ca_file(), pki.ca.pem().as_bytes(), false)?;
        Ok(pki)
    }

    /// The CA certificate's file, which servers and clients trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A certificate for `common_name`, valid for the DNS names and IP addresses in
    /// `names` (empty for a client), usable by servers and clients alike, written to
    /// `dir/{stem}.pem` and `dir/{stem}.key`.
    pub fn issue(&self, stem: &str, common_name: &str, names: &[&str], validity: Validity) -> Result<CertFiles, Error> {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).map_err(|e| pki_error("certificate parameters", e))?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        if validity == Validity::Expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().map_err(|e| pki_error("generating a key", e))?;
        let cert = params.signed_by(&key, &self.ca).map_err(|e| pki_error("signing a certificate", e))?;
        let files = CertFiles { cert: self.dir.join(format!("{stem}.pem")), key: self.dir.join(format!("{stem}.key")) };
        write(&files.cert, cert.pem().as_bytes(), false)?;
        write(&files.key, key.serialize_pem().as_bytes(), true)?;
        Ok(files)
    }
}

/// Writes `bytes` to `path` through a temp file and a rename, so that a process watching
/// the file never reads half of it; `secret` files are readable by the owner only.
pub fn write(path: &Path, bytes: &[u8], secret: bool) -> Result<(), Error> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let context = || format!("writing {}", path.display());
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let _ = secret;
    let mut file = options.open(&tmp).map_err(|e| Error::io(context(), e))?;
    std::io::Write::write_all(&mut file, bytes).map_err(|e| Error::io(context(), e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| Error::io(context(), e))
}
