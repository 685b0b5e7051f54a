//! A real greeter-server with `--metrics-listen`, scraped over HTTP as Prometheus does.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_testkit::prometheus::{http_get as get, scrape, value};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A greeter-server with `--metrics-listen` and `flags`, once it accepts calls: the process,
/// a channel to it, and the metrics address.
async fn start(flags: &[&str]) -> (Server, tonic::transport::Channel, String) {
    let port = mesh_etcd_local::free_port().expect("port");
    let metrics_port = mesh_etcd_local::free_port().expect("port");
    let (addr, metrics) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{metrics_port}"));
    let server = Server(
        Command::new(env!("CARGO_BIN_EXE_greeter-server"))
            .args(["--listen", &addr, "--no-register", "--metrics-listen", &metrics])
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start greeter-server"),
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).expect("uri");
    let channel = mesh_testkit::eventually("the server to listen", Duration::from_secs(10), || async {
        channel.clone().connect().await.ok()
    })
    .await
    .expect("connected");
    (server, channel, metrics)
}

#[tokio::test]
async fn a_scrape_shows_calls_by_method_and_code_their_latency_and_the_limiter_moving_after_calls() {
    let (_server, channel, metrics) = start(&["--rate", "1000"]).await;
    let (status, _) = get(&metrics, "/metrics").await.expect("a scrape");
    assert_eq!(status, "HTTP/1.1 200 OK");

    let mut client = GreeterClient::new(channel);
    for _ in 0..3 {
        client.say_hello(HelloRequest { name: "metrics".into() }).await.expect("a call");
    }
    let status = client.say_hello(HelloRequest { name: String::new() }).await.expect_err("an empty name");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let say_hello = r#"method="/greeter.v1.Greeter/SayHello""#;
    let samples = mesh_testkit::eventually("the limiter's counts to be sampled", Duration::from_secs(5), || async {
        let samples = scrape(&metrics).await?;
        (value(&samples, "mesh_limiter_admitted_total", &[r#"scope="server""#]) == Some(4.0)).then_some(samples)
    })
    .await
    .expect("scraped");
    assert_eq!(value(&samples, "mesh_server_calls_total", &[say_hello, r#"code="OK""#]), Some(3.0), "{samples:#?}");
    assert_eq!(
        value(&samples, "mesh_server_calls_total", &[say_hello, r#"code="INVALID_ARGUMENT""#]),
        Some(1.0),
        "{samples:#?}"
    );
    assert_eq!(value(&samples, "mesh_server_call_duration_seconds_count", &[say_hello]), Some(4.0), "{samples:#?}");
    assert_eq!(value(&samples, "mesh_server_call_duration_seconds_bucket", &[say_hello, r#"le="+Inf""#]), Some(4.0));
    assert_eq!(value(&samples, "mesh_limiter_rejected_total", &[r#"scope="server""#]), Some(0.0));
    assert_eq!(value(&samples, "mesh_limiter_admitted_total", &[r#"scope="method""#]), Some(0.0));

    let (status, _) = get(&metrics, "/other").await.expect("a request");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}

#[tokio::test]
async fn made_up_paths_share_one_unknown_label_and_never_push_a_served_method_out() {
    let (_server, channel, metrics) = start(&[]).await;
    // More made-up paths than the 256 labels a layer gives the paths it sees first.
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    for i in 0..300 {
        grpc.ready().await.expect("ready");
        let path = format!("/junk.Svc{i}/M").parse().expect("a path");
        let codec = tonic_prost::ProstCodec::<HelloRequest, mesh_proto::pb::HelloReply>::default();
        let status = grpc
            .unary(tonic::Request::new(HelloRequest { name: "junk".into() }), path, codec)
            .await
            .expect_err("no such method");
        assert_eq!(status.code(), tonic::Code::Unimplemented);
    }
    let mut client = GreeterClient::new(channel);
    client.say_hello(HelloRequest { name: "real".into() }).await.expect("a call");

    let (_, body) = get(&metrics, "/metrics").await.expect("a scrape");
    let junk = body.lines().filter(|l| l.contains("junk.Svc")).count();
    assert_eq!(junk, 0, "made-up paths got labels of their own:\n{body}");
    let samples = mesh_testkit::prometheus::parse(&body);
    let unknown = r#"method="unknown""#;
    assert_eq!(
        value(&samples, "mesh_server_calls_total", &[unknown, r#"code="UNIMPLEMENTED""#]),
        Some(300.0),
        "{body}"
    );
    let say_hello = r#"method="/greeter.v1.Greeter/SayHello""#;
    assert_eq!(value(&samples, "mesh_server_calls_total", &[say_hello, r#"code="OK""#]), Some(1.0), "{body}");
}
