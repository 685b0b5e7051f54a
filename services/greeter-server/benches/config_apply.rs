//! How fast a configuration put in etcd is in force at a server: from issuing the put of
//! a greeter document (a new greeting and rate each time) to a running greeter-server
//! replying with the new greeting. 100 updates against a real etcd (mesh-testkit) on
//! loopback. The server follows its watch; this bench asks it for a greeting in a loop
//! until the new one comes, so the figures include up to one call (about 0.1 ms).
//!
//! Prints one JSON object with p50/p99/max in microseconds; `cargo xtask bench` runs it.
//! Needs an etcd binary (ETCD_BIN or PATH).

use std::time::{Duration, Instant};

use greeter_config::GreeterSection;
use mesh_etcd::{Etcd, EtcdOptions};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;

const UPDATES: usize = 100;
const KEY: &str = "/bench/config/greeter";

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = mesh_testkit::Etcd::start().await?;
    let etcd = Etcd::new(EtcdOptions::new(server.endpoints())?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // Serving and following the document at KEY, registering nowhere.
    let builder = mesh::Server::builder("greeter")
        .section::<GreeterSection>()
        .listener(listener)
        .etcd(etcd.clone())
        .etcd_prefix("/bench")
        .register(false)
        .drain_timeout(Duration::from_secs(1))
        .shutdown_grace(Duration::ZERO)
        .shutdown_on(async {
            let _ = stopped.await;
        });
    let server = greeter_server::build(builder).await.map_err(|e| format!("{e:#}"))?;
    let task = tokio::spawn(server.serve());
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = GreeterClient::new(channel);

    let mut samples = Vec::with_capacity(UPDATES);
    for i in 0..UPDATES {
        let greeting = format!("update {i}, {{name}}");
        let want = format!("update {i}, bench");
        let doc =
            format!(r#"{{"server": {{"greeting": "{greeting}", "limiter": {{"rate_per_sec": {}}}}}}}"#, 100_000 + i);
        let t0 = Instant::now();
        etcd.put(KEY, doc, None).await?;
        loop {
            let reply = client.say_hello(HelloRequest { name: "bench".into() }).await?;
            if reply.into_inner().message == want {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                return Err(format!("update {i} not applied within 5 s").into());
            }
        }
        samples.push(t0.elapsed());
    }
    let _ = stop.send(());
    let _ = task.await;
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).saturating_sub(1).min(samples.len() - 1)];
    println!(
        r#"{{"put_to_applied":{{"updates":{},"p50_us":{},"p99_us":{},"max_us":{}}}}}"#,
        samples.len(),
        at(0.50).as_micros(),
        at(0.99).as_micros(),
        samples.last().map_or(0, |d| d.as_micros())
    );
    Ok(())
}
