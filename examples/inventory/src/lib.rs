//! An inventory service built only on mesh's public API: the service, its own section of
//! the configuration document, and the two `main`s in `src/bin/` that serve and call it.
//!
//! `Get` and `Watch` are idempotent, so the client retries them on another server;
//! `Reserve` takes stock and is never retried.
//!
//! ```
//! use inventory::{InventorySection, Store};
//! use inventory::pb::inventory_server::Inventory as _;
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let config = tokio::sync::watch::channel(std::sync::Arc::new(mesh::Config::<InventorySection>::default())).1;
//! let store = Store::new("s1", 10, config);
//! let request = inventory::pb::ReserveRequest { sku: "apple".into(), quantity: 3 };
//! let reservation = store.reserve(tonic::Request::new(request)).await.expect("in stock");
//! assert_eq!(reservation.get_ref().available, 7);
//! # }
//! ```

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

#[rustfmt::skip]
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)] // Generated code.
mod generated {
    include!("generated/inventory.v1.rs");
}

/// The `inventory.v1` messages and the client and server modules.
pub mod pb {
    pub use crate::generated::*;
}

/// The encoded `FileDescriptorSet` of `inventory.v1`, for reflection and metrics.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/inventory_v1_descriptor.bin");

/// The methods a client may retry: reading and watching change nothing.
pub const IDEMPOTENT: [&str; 2] = ["/inventory.v1.Inventory/Get", "/inventory.v1.Inventory/Watch"];

/// The service name inventory servers register under.
pub const SERVICE: &str = "inventory";

/// The inventory's own settings in the document's `server` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InventorySection {
    /// The most units one reservation may take.
    pub max_per_reservation: u32,
}

impl Default for InventorySection {
    fn default() -> Self {
        InventorySection { max_per_reservation: 100 }
    }
}

impl mesh::ServiceSection for InventorySection {
    fn validate(&self) -> Result<(), String> {
        if self.max_per_reservation == 0 {
            return Err("max_per_reservation is 0; give 1 or more".into());
        }
        Ok(())
    }
}

/// The configuration the service follows.
pub type Config = watch::Receiver<Arc<mesh::Config<InventorySection>>>;

/// The inventory.v1 service: each item starts with the same stock, kept in memory.
#[derive(Debug, Clone)]
pub struct Store {
    instance: Arc<str>,
    initial: u32,
    stock: Arc<Mutex<HashMap<String, u32>>>,
    reservations: Arc<AtomicU64>,
    changes: watch::Sender<()>,
    config: Config,
    delay: Duration,
}

impl Store {
    /// A store answering as `instance`, `initial` units of every item, following `config`.
    pub fn new(instance: impl Into<Arc<str>>, initial: u32, config: Config) -> Self {
        Store {
            instance: instance.into(),
            initial,
            stock: Arc::default(),
            reservations: Arc::default(),
            changes: watch::channel(()).0,
            config,
            delay: Duration::ZERO,
        }
    }

    /// Answers every call after `delay` (to show calls in flight when a server goes).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    fn item(&self, sku: &str) -> pb::Item {
        let available = self.stock.lock().unwrap_or_else(|p| p.into_inner()).get(sku).copied().unwrap_or(self.initial);
        pb::Item {
            sku: sku.to_string(),
            available,
            reservations: self.reservations.load(Ordering::Relaxed),
            served_by: self.instance.to_string(),
        }
    }

    async fn pause(&self) {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
    }
}

fn check_sku(sku: &str) -> Result<(), Status> {
    if sku.is_empty() || sku.len() > 128 {
        return Err(Status::invalid_argument(format!("sku is {} bytes; give 1 to 128", sku.len())));
    }
    Ok(())
}

type ItemStream = Pin<Box<dyn Stream<Item = Result<pb::Item, Status>> + Send>>;

#[tonic::async_trait]
impl pb::inventory_server::Inventory for Store {
    async fn get(&self, request: Request<pb::GetRequest>) -> Result<Response<pb::Item>, Status> {
        check_sku(&request.get_ref().sku)?;
        self.pause().await;
        Ok(Response::new(self.item(&request.get_ref().sku)))
    }

    async fn reserve(&self, request: Request<pb::ReserveRequest>) -> Result<Response<pb::Reservation>, Status> {
        let pb::ReserveRequest { sku, quantity } = request.into_inner();
        check_sku(&sku)?;
        let max = self.config.borrow().server.service.max_per_reservation;
        if quantity == 0 || quantity > max {
            return Err(Status::invalid_argument(format!(
                "quantity is {quantity}; give 1 to {max} (server.max_per_reservation)"
            )));
        }
        self.pause().await;
        let available = {
            let mut stock = self.stock.lock().unwrap_or_else(|p| p.into_inner());
            let left = stock.entry(sku.clone()).or_insert(self.initial);
            if *left < quantity {
                return Err(Status::failed_precondition(format!("{left} units of {sku} left, {quantity} asked")));
            }
            *left -= quantity;
            *left
        };
        self.reservations.fetch_add(1, Ordering::Relaxed);
        self.changes.send_replace(());
        Ok(Response::new(pb::Reservation { sku, quantity, available, served_by: self.instance.to_string() }))
    }

    type WatchStream = ItemStream;

    async fn watch(&self, request: Request<pb::GetRequest>) -> Result<Response<ItemStream>, Status> {
        let sku = request.into_inner().sku;
        check_sku(&sku)?;
        let store = self.clone();
        let mut changes = self.changes.subscribe();
        let stream = async_stream(move |tx| async move {
            loop {
                if tx.send(Ok(store.item(&sku))).await.is_err() || changes.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task that `produce` runs: it ends when the task returns or the
/// caller hangs up (the task's sends then fail).
fn async_stream<F, Fut>(produce: F) -> ItemStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::Item, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The project README's "Use mesh in your own service", compiled as doctests against this
/// crate.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
