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
