//! What a user does after reading the README: a crate of its own, outside this workspace,
//! with its own proto (compiled by its build script with protox, no protoc), depending on
//! mesh by path, serves its service with `mesh::Server::builder` and calls it with
//! `mesh::Client::builder`, through a real etcd.
//!
//! The crate is built in a temporary directory with this workspace's lockfile (the same
//! versions, offline) into `target/outside-crate`, which later runs build incrementally.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const MANIFEST: &str = r#"[package]
name = "billing"
version = "0.1.0"
edition = "2024"
publish = false

[workspace]

[dependencies]
mesh = { path = "MESH_PATH" }
tonic = "0.14"
tonic-prost = "0.14"
prost = "0.14"
tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
anyhow = "1"

[build-dependencies]
tonic-prost-build = "0.14"
protox = "0.10"
prost = "0.14"
"#;

const PROTO: &str = r#"syntax = "proto3";
package billing.v1;

service Billing {
  rpc Quote(QuoteRequest) returns (QuoteReply);
}

message QuoteRequest { string item = 1; }
message QuoteReply { uint64 cents = 1; string served_by = 2; }
"#;

const BUILD: &str = r#"fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(["proto/billing.proto"], ["proto"])?;
    std::fs::write(out.join("billing_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/billing.proto");
    Ok(())
}
"#;

const MAIN: &str = r#"use std::time::Duration;

use pb::billing_client::BillingClient;
use pb::billing_server::{Billing, BillingServer};
use pb::{QuoteReply, QuoteRequest};

mod pb {
    tonic::include_proto!("billing.v1");
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("billing_descriptor");
}

struct Quotes {
    instance: String,
}

#[tonic::async_trait]
impl Billing for Quotes {
    async fn quote(&self, request: tonic::Request<QuoteRequest>) -> Result<tonic::Response<QuoteReply>, tonic::Status> {
        let cents = 100 * request.get_ref().item.len() as u64;
        Ok(tonic::Response::new(QuoteReply { cents, served_by: self.instance.clone() }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let etcd = mesh::etcd(&args[2])?;
    match args[1].as_str() {
        "serve" => {
            let server = mesh::Server::builder("billing")
                .listen("127.0.0.1:0".parse()?)
                .instance_id(args[3].clone())
                .ttl(Duration::from_secs(2))
                .etcd(etcd)
                .file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
                .build()
                .await?;
            let quotes = Quotes { instance: server.instance_id().to_string() };
            server.add_service(BillingServer::new(quotes)).serve().await
        }
        _ => {
            let client = mesh::Client::builder("billing")
                .etcd(etcd)
                .idempotent(["/billing.v1.Billing/Quote"])
                .timeout(Duration::from_secs(2))
                .build()
                .await?;
            let mut billing = BillingClient::new(client.channel());
            for _ in 0..20 {
                let reply = billing.quote(QuoteRequest { item: "pen".into() }).await?.into_inner();
                println!("{} {}", reply.cents, reply.served_by);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok(())
        }
    }
}
"#;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("the workspace root").to_path_buf()
}

/// Writes the crate and builds it; the path of its binary.
fn build_outside_crate(dir: &Path) -> PathBuf {
    let root = workspace();
    let mesh = root.join("crates/mesh");
    std::fs::create_dir_all(dir.join("src")).expect("src");
    std::fs::create_dir_all(dir.join("proto")).expect("proto");
    std::fs::write(dir.join("Cargo.toml"), MANIFEST.replace("MESH_PATH", &mesh.display().to_string()))
        .expect("manifest");
    std::fs::write(dir.join("proto/billing.proto"), PROTO).expect("proto");
    std::fs::write(dir.join("build.rs"), BUILD).expect("build script");
    std::fs::write(dir.join("src/main.rs"), MAIN).expect("main");
    // The workspace's versions, so that the build needs nothing new from the registry.
    std::fs::copy(root.join("Cargo.lock"), dir.join("Cargo.lock")).expect("lockfile");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("outside-crate");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--quiet", "--offline", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS")
        .stdin(Stdio::null())
        .output()
        .expect("run cargo");
    assert!(out.status.success(), "the outside crate does not build:\n{}", String::from_utf8_lossy(&out.stderr));
    target.join("debug").join("billing")
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ =
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.0.id() as i32), nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_crate_of_its_own_serves_and_calls_its_service_with_the_builders() {
    let dir = tempfile::tempdir().expect("temp dir");
    let binary = build_outside_crate(dir.path());
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let endpoints = etcd.endpoints().join(",");
    let servers: Vec<Running> = ["b1", "b2"]
        .iter()
        .map(|id| {
            Running(
                Command::new(&binary)
                    .args(["serve", &endpoints, id])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start the server"),
            )
        })
        .collect();
    mesh_testkit::eventually("both registered", Duration::from_secs(20), || async {
        (etcd.get_prefix("/mesh/services/billing/").await.ok()?.len() == 2).then_some(())
    })
    .await
    .expect("registered");
    let out = Command::new(&binary).args(["call", &endpoints]).output().expect("run the client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 20, "{stdout}");
    assert!(lines.iter().all(|l| l.starts_with("300 ")), "{stdout}");
    for id in ["b1", "b2"] {
        assert!(lines.iter().any(|l| l.ends_with(id)), "{id} served none of:\n{stdout}");
    }
    drop(servers);
    // SIGTERMed, both deregistered.
    assert!(etcd.get_prefix("/mesh/services/billing/").await.expect("list").is_empty());
}
