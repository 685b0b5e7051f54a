//! The client stack's metrics as a scrape sees them, in a process of their own (the
//! Prometheus recorder is installed once per process).

use std::time::Duration;

use greeter_client::{Mesh, collect_metrics};
use greeter_server::Greeter;
use mesh_balancer::{BalancerConfig, EndpointSet};
use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_proto::pb::greeter_server::GreeterServer;
use mesh_testkit::TestServer;
use mesh_testkit::prometheus::{parse, value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_that_leaves_the_set_leaves_the_scrape_and_calls_are_counted_by_endpoint_and_code() {
    let exporter = mesh_metrics::install().expect("the only recorder of this process");
    let a = TestServer::serve(GreeterServer::new(Greeter::new("a"))).await.expect("serve a");
    let b = TestServer::serve(GreeterServer::new(Greeter::new("b"))).await.expect("serve b");
    let (a_addr, b_addr) = (a.addr().to_string(), b.addr().to_string());
    let (updates, rx) = tokio::sync::mpsc::unbounded_channel();
    updates.send(EndpointSet::from_addresses([a_addr.clone(), b_addr.clone()])).expect("send");
    let mesh = Mesh::spawn(
        BalancerConfig::new("greeter"),
        &greeter_client::resilience(),
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
    )
    .expect("valid settings");
    let _collector = collect_metrics(&mesh);
    let mut client = GreeterClient::new(mesh.channel.clone());
    for _ in 0..6 {
        client.say_hello(HelloRequest { name: "m".into() }).await.expect("a call");
    }
    let status = client.say_hello(HelloRequest { name: String::new() }).await.expect_err("an empty name");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let samples = parse(&exporter.render());
    let ok = r#"code="OK""#;
    let method = r#"method="/greeter.v1.Greeter/SayHello""#;
    // Which endpoint took which call depends on which connected first; what each endpoint's
    // counts by code add up to does not.
    let invalid = r#"code="INVALID_ARGUMENT""#;
    let (mut oks, mut invalids) = (0.0, 0.0);
    for addr in [&a_addr, &b_addr] {
        let endpoint = format!(r#"endpoint="{addr}""#);
        assert_eq!(value(&samples, "mesh_endpoint_up", &[&endpoint]), Some(1.0), "{samples:#?}");
        let good = value(&samples, "mesh_client_endpoint_calls_total", &[&endpoint, method, ok]).unwrap_or(0.0);
        let bad = value(&samples, "mesh_client_endpoint_calls_total", &[&endpoint, method, invalid]).unwrap_or(0.0);
        let sent = value(&samples, "mesh_endpoint_requests_total", &[&endpoint]);
        assert_eq!(sent, Some(good + bad), "an endpoint's calls by code add up to its attempts: {samples:#?}");
        (oks, invalids) = (oks + good, invalids + bad);
    }
    assert_eq!((oks, invalids), (6.0, 1.0), "{samples:#?}");
    assert_eq!(value(&samples, "mesh_client_calls_total", &[method, ok]), Some(6.0));

    // b leaves the set: its series leave the scrape, a's stay.
    updates.send(EndpointSet::from_addresses([a_addr.clone()])).expect("send");
    let b_label = format!(r#"endpoint="{b_addr}""#);
    let samples = mesh_testkit::eventually("b's series to leave the scrape", Duration::from_secs(5), || async {
        let mut client = client.clone();
        client.say_hello(HelloRequest { name: "m".into() }).await.ok()?;
        let samples = parse(&exporter.render());
        (!samples.keys().any(|series| series.contains(&b_label))).then_some(samples)
    })
    .await
    .expect("b gone from the scrape");
    let a_label = format!(r#"endpoint="{a_addr}""#);
    assert_eq!(value(&samples, "mesh_endpoint_up", &[&a_label]), Some(1.0), "{samples:#?}");
    assert!(value(&samples, "mesh_client_endpoint_calls_total", &[&a_label, ok]).is_some_and(|n| n >= 1.0));

    // Two ids at one address (a server restarted under a new id before its old
    // registration expired): one series each, told apart by id (11 lines of one series,
    // with different values, were scraped).
    updates
        .send(EndpointSet::new(vec![
            mesh_balancer::Endpoint::new(a_addr.clone()).with_id("old"),
            mesh_balancer::Endpoint::new(a_addr.clone()).with_id("new"),
        ]))
        .expect("send");
    let text = mesh_testkit::eventually("both ids in the scrape", Duration::from_secs(5), || async {
        let text = exporter.render();
        (text.contains(r#"id="old""#) && text.contains(r#"id="new""#)).then_some(text)
    })
    .await
    .expect("both ids");
    let mut up: Vec<&str> = text.lines().filter(|l| l.starts_with("mesh_endpoint_up{")).collect();
    let all = up.len();
    up.sort_unstable();
    up.dedup_by(|a, b| a.rsplit_once(' ').map(|p| p.0) == b.rsplit_once(' ').map(|p| p.0));
    assert_eq!((all, up.len()), (2, 2), "one series per endpoint: {up:#?}");
}
