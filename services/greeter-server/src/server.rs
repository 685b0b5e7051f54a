use std::sync::Arc;

use greeter_config::GreeterSection;
use mesh::server::{LogFilter, MAX_REQUEST_BYTES};
use mesh_proto::pb::greeter_server::GreeterServer;
use tracing::warn;

use crate::{Args, Greeter};

/// The service name greeter servers register under unless `--service` names another.
pub const SERVICE: &str = "greeter";

/// Runs the server process with `args` until SIGINT or SIGTERM, then drains and returns
/// (or runs a `config` command); SIGHUP reloads the TLS files, and ends nothing.
/// `log_filter` lets the configuration set the log level.
pub async fn run(args: Args, log_filter: Option<LogFilter>) -> anyhow::Result<()> {
    if let Some(mesh::cli::Command::Config(command)) = &args.command {
        return command.run::<GreeterSection>(&args.mesh, SERVICE).await;
    }
    let mut builder = args.mesh.builder::<GreeterSection>(SERVICE)?.version(env!("CARGO_PKG_VERSION"));
    if let Some(filter) = log_filter {
        builder = builder.log_filter(filter);
    }
    let server = builder.file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET).build().await?;
    let fault = args.fault();
    if fault.is_on() {
        warn!(
            "FAULT INJECTION ON: {:.0}% of greeter calls fail with {:?}, each delayed {:?}",
            fault.error_rate * 100.0,
            fault.code,
            fault.delay
        );
    }
    let greeter = Greeter::new(server.instance_id()).with_fault(fault).following(server.config());
    server.add_service(greeter_service(greeter)).serve().await
}

/// The greeter as served: requests over [`MAX_REQUEST_BYTES`] refused, as health and
/// reflection refuse them.
pub fn greeter_service(greeter: Greeter) -> GreeterServer<Greeter> {
    GreeterServer::new(greeter).max_decoding_message_size(MAX_REQUEST_BYTES)
}

/// A server of the greeter with `builder`'s settings, ready to serve: what [`run`] does
/// without flags, for tests and tools that serve it in-process.
pub async fn build(builder: mesh::ServerBuilder<GreeterSection>) -> anyhow::Result<mesh::Server<GreeterSection>> {
    let server = builder.file_descriptor_set(mesh_proto::FILE_DESCRIPTOR_SET).build().await?;
    let greeter = Greeter::new(server.instance_id()).following(server.config());
    Ok(server.add_service(greeter_service(greeter)))
}

/// Keeps `greeting` to the configuration's `server.greeting` as it changes.
pub(crate) async fn follow_greeting(
    mut config: tokio::sync::watch::Receiver<Arc<greeter_config::GreeterConfig>>,
    greeting: Arc<arc_swap::ArcSwap<String>>,
) {
    loop {
        let next = config.borrow_and_update().server.service.greeting.clone();
        if **greeting.load() != next {
            tracing::info!(greeting = %next, "greeting now");
            greeting.store(Arc::new(next));
        }
        if config.changed().await.is_err() {
            return;
        }
    }
}
