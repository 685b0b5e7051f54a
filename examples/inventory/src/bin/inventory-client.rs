//! `inventory-client`: calls inventory.v1 through everything mesh gives a client.

use clap::{Parser, Subcommand};
use inventory::pb::{GetRequest, ReserveRequest, inventory_client::InventoryClient};
use inventory::{IDEMPOTENT, InventorySection, SERVICE};
use tokio_stream::StreamExt as _;

#[derive(Parser)]
#[command(name = "inventory-client", about = "An example client on mesh")]
struct Args {
    #[command(subcommand)]
    call: Call,
    #[command(flatten)]
    mesh: mesh::cli::ClientArgs,
    /// The deadline of each call.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Subcommand)]
enum Call {
    /// Prints the stock of an item.
    Get { sku: String },
    /// Reserves units of an item (never retried).
    Reserve { sku: String, quantity: u32 },
    /// Prints the item, then each change, `count` times.
    Watch {
        sku: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = args.mesh.builder::<InventorySection>(SERVICE, &IDEMPOTENT)?.timeout(args.timeout).build().await?;
    let mut inventory = InventoryClient::new(client.channel());
    match args.call {
        Call::Get { sku } => {
            let item = inventory.get(GetRequest { sku }).await?.into_inner();
            println!("{} available: {} (served by {})", item.sku, item.available, item.served_by);
        }
        Call::Reserve { sku, quantity } => {
            let r = inventory.reserve(ReserveRequest { sku, quantity }).await?.into_inner();
            println!("reserved {} of {}, {} left (served by {})", r.quantity, r.sku, r.available, r.served_by);
        }
        Call::Watch { sku, count } => {
            let mut items = inventory.watch(GetRequest { sku }).await?.into_inner().take(count);
            while let Some(item) = items.next().await {
                let item = item?;
                println!("{} available: {} (served by {})", item.sku, item.available, item.served_by);
            }
        }
    }
    Ok(())
}
