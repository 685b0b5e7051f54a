// Each test binary of this crate includes this module and uses only part of it.
#![allow(dead_code)]

//! Greeter servers for the balancer's tests: each answers with its own name, optionally
//! after a delay, served in-process on 127.0.0.1:0 by mesh-testkit.

use std::collections::BTreeMap;
use std::time::Duration;

use mesh_balancer::{BalancedChannel, Endpoint, EndpointSet};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_testkit::{NamedGreeter, TestServer};
use tonic::Status;
use tonic::transport::Channel;

pub(crate) async fn server(name: &str) -> TestServer {
    slow_server(name, Duration::ZERO).await
}

pub(crate) async fn slow_server(name: &str, delay: Duration) -> TestServer {
    NamedGreeter::serve(name, delay).await.expect("serve")
}

/// An endpoint whose id is the server's name, so replies and ids match.
pub(crate) fn endpoint(name: &str, server: &TestServer) -> Endpoint {
    Endpoint::new(server.addr().to_string()).with_id(name)
}

pub(crate) fn set(servers: &[(&str, &TestServer)]) -> EndpointSet {
    EndpointSet::new(servers.iter().map(|(n, s)| endpoint(n, s)).collect())
}

/// Makes `n` calls one after another; returns replies per `served_by` and failures.
pub(crate) async fn calls(channel: &BalancedChannel<Channel>, n: usize) -> (BTreeMap<String, usize>, Vec<Status>) {
    let mut client = GreeterClient::new(channel.clone());
    let mut by = BTreeMap::new();
    let mut failures = Vec::new();
    for _ in 0..n {
        match client.say_hello(HelloRequest { name: "t".into() }).await {
            Ok(r) => *by.entry(r.into_inner().served_by).or_default() += 1,
            Err(s) => failures.push(s),
        }
    }
    (by, failures)
}

/// Everything logged by this test process, for tests that check what was said (once
/// installed, every thread logs here; tests tell their lines apart by unique addresses).
pub(crate) fn logs() -> &'static Logs {
    static LOGS: std::sync::OnceLock<Logs> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Logs::default();
        let writer = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init();
        logs
    })
}

/// A log sink that keeps every line.
#[derive(Clone, Default)]
pub(crate) struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// The lines that contain every one of `words`.
    pub(crate) fn lines_with(&self, words: &[&str]) -> Vec<String> {
        let text = String::from_utf8_lossy(&self.0.lock().expect("log lock")).into_owned();
        text.lines().filter(|l| words.iter().all(|w| l.contains(w))).map(str::to_string).collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits until `n` calls are in flight across the channel's endpoints.
pub(crate) async fn wait_in_flight<S>(channel: &BalancedChannel<S>, n: u64) {
    mesh_testkit::eventually("calls in flight", Duration::from_secs(5), || async {
        (channel.endpoints().iter().map(|e| e.in_flight).sum::<u64>() >= n).then_some(())
    })
    .await
    .expect("in flight");
}
