//! A local etcd with TLS and auth: the launch flags, and the least-privilege role layout of
//! mesh set up through etcd's JSON gateway before TLS is turned on (so no password ever
//! goes through a command line).

use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, gateway_post};

/// TLS and auth for a local cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Security {
    /// The CA clients' and peers' certificates chain to (`--trusted-ca-file`).
    pub ca: PathBuf,
    /// The members' certificate (`--cert-file`), valid for 127.0.0.1 and localhost.
    pub cert: PathBuf,
    /// Its key (`--key-file`).
    pub key: PathBuf,
    /// Require clients to present a certificate the CA signed (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// `--auth-token-ttl`: seconds a simple auth token lives unused (etcd's default: 300).
    pub auth_token_ttl: Option<u32>,
}

/// What a role may do with a key or prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

/// One permission of a role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    /// Read, or read and write.
    pub access: Access,
    /// The key, or the prefix when `prefix`.
    pub key: String,
    /// Whether `key` is a prefix (every key starting with it).
    pub prefix: bool,
}

/// A role and its permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// Its name.
    pub name: String,
    /// What it may do.
    pub permissions: Vec<Permission>,
}

/// A user, its password and roles. `Debug` leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// Its name.
    pub name: String,
    /// Its password.
    pub password: String,
    /// The roles granted to it.
    pub roles: Vec<String>,
}

impl std::fmt::Debug for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("User").field("name", &self.name).field("roles", &self.roles).finish_non_exhaustive()
    }
}

fn perm(access: Access, key: String, prefix: bool) -> Permission {
    Permission { access, key, prefix }
}

/// The role of a server of `service`: it writes its registration and its applied status,
/// and reads its configuration; nothing else.
pub fn server_role(root: &str, service: &str) -> Role {
    let root = root.trim_end_matches('/');
    Role {
        name: format!("mesh-server-{service}"),
        permissions: vec![
            perm(Access::ReadWrite, format!("{root}/services/{service}/"), true),
            perm(Access::ReadWrite, format!("{root}/status/{service}/"), true),
            perm(Access::Read, format!("{root}/config/{service}"), false),
        ],
    }
}

/// The role of a client: it reads everything under the root (registrations and
/// configuration) and writes nothing.
pub fn client_role(root: &str) -> Role {
    let root = root.trim_end_matches('/');
    Role { name: "mesh-client".into(), permissions: vec![perm(Access::Read, format!("{root}/"), true)] }
}

/// The role of an operator: writes configuration documents, reads everything under the root.
pub fn admin_role(root: &str) -> Role {
    let root = root.trim_end_matches('/');
    Role {
        name: "mesh-admin".into(),
        permissions: vec![
            perm(Access::ReadWrite, format!("{root}/config/"), true),
            perm(Access::Read, format!("{root}/"), true),
        ],
    }
}

/// A random password of 24 letters and digits, from the kernel's random source.
pub fn random_password() -> Result<String, Error> {
    use std::io::Read;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| Error::io("reading /dev/urandom", e))?;
    Ok(bytes.iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect())
}

/// Creates `roles` and `users` (which must include `root` with the `root` role), then
/// turns auth on, through the JSON gateway of the plaintext member at `client_url`.
/// Bodies carry the passwords; no command line does.
pub fn setup_auth(client_url: &str, roles: &[Role], users: &[User]) -> Result<(), Error> {
    let timeout = Duration::from_secs(5);
    let post = |path: &str, body: String| gateway_post(client_url, path, &body, timeout).map(drop);
    for role in roles {
        post("/v3/auth/role/add", format!(r#"{{"name":{}}}"#, json_str(&role.name)))?;
        for p in &role.permissions {
            let kind = match p.access {
                Access::Read => "READ",
                Access::ReadWrite => "READWRITE",
            };
            let range_end = if p.prefix {
                format!(r#","range_end":"{}""#, base64(&prefix_end(p.key.as_bytes())))
            } else {
                String::new()
            };
            post(
                "/v3/auth/role/grant",
                format!(
                    r#"{{"name":{},"perm":{{"permType":"{kind}","key":"{}"{range_end}}}}}"#,
                    json_str(&role.name),
                    base64(p.key.as_bytes())
                ),
            )?;
        }
    }
    for user in users {
        // The error names the URL and etcd's answer, never the body sent.
        post(
            "/v3/auth/user/add",
            format!(r#"{{"name":{},"password":{}}}"#, json_str(&user.name), json_str(&user.password)),
        )?;
        for role in &user.roles {
            post("/v3/auth/user/grant", format!(r#"{{"user":{},"role":{}}}"#, json_str(&user.name), json_str(role)))?;
        }
    }
    post("/v3/auth/enable", "{}".into())
}

/// The end of the range of keys starting with `prefix` (etcd's `GetPrefix`): its last byte
/// below 0xff plus one.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_prefix_end_match_what_etcd_expects() {
        assert_eq!(base64(b"/mesh/"), "L21lc2gv");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(prefix_end(b"/mesh/services/a/"), b"/mesh/services/a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
    }

    #[test]
    fn a_server_role_reaches_its_own_service_only() {
        let role = server_role("/mesh", "greeter");
        let keys: Vec<(&str, bool, Access)> =
            role.permissions.iter().map(|p| (p.key.as_str(), p.prefix, p.access)).collect();
        assert_eq!(
            keys,
            vec![
                ("/mesh/services/greeter/", true, Access::ReadWrite),
                ("/mesh/status/greeter/", true, Access::ReadWrite),
                ("/mesh/config/greeter", false, Access::Read),
            ]
        );
        assert!(
            !format!("{:?}", User { name: "u".into(), password: "hunter2".into(), roles: vec![] }).contains("hunter2")
        );
    }
}
