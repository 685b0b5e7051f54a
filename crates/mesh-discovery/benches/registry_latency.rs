//! How fast a change in etcd reaches a client, over 200 trials each, against a real etcd
//! (mesh-testkit) on loopback:
//! - put → watch event: from issuing a put to the ListWatch consumer seeing it;
//! - register → routable: from spawning a Registration to the balanced channel having the
//!   endpoint in its set and connected, so that calls go to it (registrar put, etcd,
//!   resolver watch, balancer update, connect).
//!
//! Prints one JSON object with p50/p99/max in microseconds; `cargo xtask bench` runs it.
//! Needs an etcd binary (ETCD_BIN or PATH).

use std::time::{Duration, Instant};

use mesh_balancer::{Balancer, BalancerConfig};
use mesh_discovery::EtcdResolver;
use mesh_etcd::{Etcd, EtcdOptions, ListWatch, WatchEvent};
use mesh_registry::{Instance, Registrar, RegistrarConfig};
use mesh_testkit::NamedGreeter;

const TRIALS: usize = 200;

fn summary(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).saturating_sub(1).min(samples.len() - 1)];
    format!(
        r#"{{"trials":{},"p50_us":{},"p99_us":{},"max_us":{}}}"#,
        samples.len(),
        at(0.50).as_micros(),
        at(0.99).as_micros(),
        samples.last().map_or(0, |d| d.as_micros())
    )
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = mesh_testkit::Etcd::start().await?;
    let etcd = Etcd::new(EtcdOptions::new(server.endpoints())?);

    // put → watch event
    let mut watch = ListWatch::new(etcd.clone(), "/bench/watch/");
    let _reset = watch.next().await;
    let mut put_to_event = Vec::with_capacity(TRIALS);
    for i in 0..TRIALS {
        let key = format!("/bench/watch/{i}");
        let t0 = Instant::now();
        etcd.put(&key, "v", None).await?;
        loop {
            if let WatchEvent::Put(kv) = watch.next().await
                && kv.key == key
            {
                break;
            }
        }
        put_to_event.push(t0.elapsed());
    }

    // register → routable
    let greeter = NamedGreeter::serve("bench", Duration::ZERO).await?;
    let resolution = EtcdResolver::new(etcd.clone(), "/bench", "greeter").spawn();
    let channel = Balancer::spawn(BalancerConfig::new("greeter"), resolution.updates());
    let registrar =
        Registrar::new(etcd.clone(), RegistrarConfig { root: "/bench".into(), ttl: Duration::from_secs(10) });
    let mut applied = channel.applied();
    let mut register_to_routable = Vec::with_capacity(TRIALS);
    for i in 0..TRIALS {
        let mut instance = Instance::new("greeter", greeter.addr().to_string());
        instance.id = format!("instance-{i}");
        let t0 = Instant::now();
        let registration = registrar.spawn(&instance);
        while !channel.endpoints().iter().any(|e| e.id == instance.id) {
            applied.changed().await?;
        }
        channel.wait_ready(Duration::from_secs(5)).await?;
        register_to_routable.push(t0.elapsed());
        registration.deregister(Duration::from_secs(3)).await?;
        while channel.endpoints().iter().any(|e| e.id == instance.id) {
            applied.changed().await?;
        }
    }
    println!(
        r#"{{"put_to_watch_event":{},"register_to_routable":{}}}"#,
        summary(put_to_event),
        summary(register_to_routable)
    );
    Ok(())
}
