//! `config validate|apply|show`: a service's configuration document, checked before it goes
//! live, put, and shown with what every instance applied.

use std::path::Path;

use anyhow::Context as _;
use mesh_config::{AppliedStatus, Layers};
use mesh_etcd::Etcd;

use super::{ConfigCommand, ServerArgs};
use crate::config::{Config, ServiceSection};

impl ConfigCommand {
    /// Runs the command for the service `service` (unless `--service` names another) whose
    /// servers have the section `S` of their own, with the etcd that `args` name; prints
    /// what it did, and the error says why not.
    pub async fn run<S: ServiceSection>(&self, args: &ServerArgs, service: &str) -> anyhow::Result<()> {
        run::<S>(args, args.service_or(service), self).await
    }
}

async fn run<S: ServiceSection>(args: &ServerArgs, service: &str, command: &ConfigCommand) -> anyhow::Result<()> {
    let key = mesh_config::config_key(&args.etcd_prefix, service);
    match command {
        ConfigCommand::Validate { file } => {
            let (_, notes) = check::<S>(file)?;
            println!("{}: valid{}", file.display(), if notes.is_empty() { "" } else { " over the defaults" });
            print_notes(&notes);
            Ok(())
        }
        ConfigCommand::Apply { file } => {
            let (document, notes) = check::<S>(file)?;
            let revision = etcd(args)?.put(&key, document, None).await.with_context(|| format!("putting {key}"))?;
            let every = if notes.is_empty() { "every instance applies it now" } else { "instances apply it now, but" };
            println!("{} applied as {key} at revision {revision}; {every}", file.display());
            print_notes(&notes);
            Ok(())
        }
        ConfigCommand::Show => show(args, service, &key).await,
    }
}

/// Reads and checks a document as every instance will (over the defaults; a section it
/// sets stands alone, whatever a server's flags set there); the document and where it
/// depends on an instance's flags, or why it is refused.
fn check<S: ServiceSection>(file: &Path) -> anyhow::Result<(Vec<u8>, Vec<String>)> {
    let document = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let layers = Layers::defaults(&Config::<S>::default())?;
    let config = mesh_config::parse::<Config<S>>(layers.document(), &document, &file.display().to_string())?;
    Ok((document, config.flag_dependencies()))
}

fn print_notes(notes: &[String]) {
    for note in notes {
        println!("note: {note}");
    }
}

fn etcd(args: &ServerArgs) -> anyhow::Result<Etcd> {
    args.etcd_access.etcd(&args.etcd).map_err(anyhow::Error::msg)
}

async fn show(args: &ServerArgs, service: &str, key: &str) -> anyhow::Result<()> {
    let etcd = etcd(args)?;
    match etcd.get(key).await.with_context(|| format!("reading {key}"))? {
        Some(kv) => {
            let text = String::from_utf8_lossy(&kv.value);
            let pretty = serde_json::from_slice::<serde_json::Value>(&kv.value)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or_else(|_| text.to_string());
            println!("{key} at revision {}:\n{pretty}", kv.mod_revision);
        }
        None => println!("{key}: no document; every instance runs on its file and flag settings"),
    }
    let prefix = format!("{}/", mesh_config::status_key(&args.etcd_prefix, service, "").trim_end_matches('/'));
    let listing = etcd.list(&prefix).await.with_context(|| format!("reading {prefix}"))?;
    if listing.kvs.is_empty() {
        println!("\nno instance reports a status under {prefix}");
        return Ok(());
    }
    println!("\n{:<28} {:>9} {:>8}  last refused", "instance", "revision", "applied");
    for kv in &listing.kvs {
        match serde_json::from_slice::<AppliedStatus>(&kv.value) {
            Ok(s) => {
                let revision = s.revision.map_or("flags".to_string(), |r| r.to_string());
                let refused =
                    s.last_rejection.map_or("-".to_string(), |r| format!("revision {}: {}", r.revision, r.reason));
                println!("{:<28} {revision:>9} {:>8}  {refused}", s.instance, s.applied);
            }
            Err(e) => println!("{:<28} (unreadable status: {e})", kv.key.trim_start_matches(&prefix)),
        }
    }
    Ok(())
}
