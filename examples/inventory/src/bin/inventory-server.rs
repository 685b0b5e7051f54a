//! `inventory-server`: serves inventory.v1 with everything mesh gives a server.

use std::time::Duration;

use clap::Parser;
use inventory::{InventorySection, SERVICE, Store, pb::inventory_server::InventoryServer};

#[derive(Parser)]
#[command(name = "inventory-server", about = "An example service on mesh")]
struct Args {
    #[command(subcommand)]
    command: Option<mesh::cli::Command>,
    #[command(flatten)]
    mesh: mesh::cli::ServerArgs,
    /// Units of every item at the start.
    #[arg(long, default_value_t = 1000)]
    stock: u32,
    /// Answer every call after this long, e.g. `200ms`.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    delay: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(mesh::cli::Command::Config(command)) = &args.command {
        return command.run::<InventorySection>(&args.mesh, SERVICE).await;
    }
    let log_filter = mesh::logging::init("info");
    let server = args
        .mesh
        .builder::<InventorySection>(SERVICE)?
        .log_filter(log_filter)
        .file_descriptor_set(inventory::FILE_DESCRIPTOR_SET)
        .build()
        .await?;
    let store = Store::new(server.instance_id(), args.stock, server.config()).with_delay(args.delay);
    server.add_service(InventoryServer::new(store)).serve().await
}
