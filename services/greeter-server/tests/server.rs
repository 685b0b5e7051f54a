//! greeter-server served in-process on 127.0.0.1:0: greeter, health, reflection, limits and
//! shutdown, as a client sees them.

use std::time::Duration;

use mesh_proto::pb::HelloRequest;
use mesh_proto::pb::greeter_client::GreeterClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

struct Running {
    channel: Channel,
    stop: oneshot::Sender<()>,
    task: JoinHandle<anyhow::Result<()>>,
}

async fn start(instance: &str) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let builder = mesh::Server::builder("greeter")
        .section()
        .listener(listener)
        .instance_id(instance)
        .drain_timeout(Duration::from_secs(5))
        .shutdown_grace(Duration::ZERO)
        .shutdown_on(async {
            let _ = stopped.await;
        });
    let task = tokio::spawn(async move { greeter_server::build(builder).await?.serve().await });
    let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
    Running { channel, stop, task }
}

#[tokio::test]
async fn greets_and_reports_its_instance() {
    let s = start("inst-1").await;
    let reply =
        GreeterClient::new(s.channel.clone()).say_hello(HelloRequest { name: "world".into() }).await.expect("call");
    assert_eq!(reply.get_ref().message, "Hello, world!");
    assert_eq!(reply.get_ref().served_by, "inst-1");
}

#[tokio::test]
async fn health_is_serving_for_the_server_and_greeter() {
    let s = start("i").await;
    let mut health = HealthClient::new(s.channel.clone());
    for service in ["", "greeter.v1.Greeter"] {
        let resp = health.check(HealthCheckRequest { service: service.into() }).await.expect("health check");
        assert_eq!(resp.get_ref().status(), ServingStatus::Serving, "service {service:?}");
    }
}

#[tokio::test]
async fn reflection_lists_greeter_in_v1_and_v1alpha() {
    let s = start("i").await;
    use tonic_reflection::pb::v1 as r1;
    use tonic_reflection::pb::v1alpha as r0;
    let mut c1 = r1::server_reflection_client::ServerReflectionClient::new(s.channel.clone());
    let req = r1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = c1.server_reflection_info(tokio_stream::iter([req])).await.expect("v1").into_inner();
    let resp = stream.next().await.expect("a response").expect("ok");
    let Some(r1::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected v1 response");
    };
    assert!(list.service.iter().any(|s| s.name == "greeter.v1.Greeter"), "{list:?}");

    let mut c0 = r0::server_reflection_client::ServerReflectionClient::new(s.channel.clone());
    let req = r0::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(r0::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut stream = c0.server_reflection_info(tokio_stream::iter([req])).await.expect("v1alpha").into_inner();
    let resp = stream.next().await.expect("a response").expect("ok");
    let Some(r0::server_reflection_response::MessageResponse::ListServicesResponse(list)) = resp.message_response
    else {
        panic!("unexpected v1alpha response");
    };
    assert!(list.service.iter().any(|s| s.name == "greeter.v1.Greeter"), "{list:?}");
}

#[tokio::test]
async fn empty_and_oversized_requests_get_clear_errors() {
    let s = start("i").await;
    let mut client = GreeterClient::new(s.channel.clone());
    let err = client.say_hello(HelloRequest { name: String::new() }).await.expect_err("empty");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "name must not be empty");

    let err = client.say_hello(HelloRequest { name: "n".repeat(2000) }).await.expect_err("long");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("2000 bytes"), "{}", err.message());

    // 1 MiB: refused by the decoder before it reaches the greeter.
    let err = client.say_hello(HelloRequest { name: "n".repeat(1 << 20) }).await.expect_err("huge");
    assert!(err.message().contains("too large"), "code {:?}, message {:?}", err.code(), err.message());
    // The server is still fine afterwards.
    client.say_hello(HelloRequest { name: "ok".into() }).await.expect("still serving");
}

#[tokio::test]
async fn shutdown_reports_not_serving_to_watchers_then_exits_cleanly() {
    let s = start("i").await;
    let mut health = HealthClient::new(s.channel.clone());
    let mut watch =
        health.watch(HealthCheckRequest { service: "greeter.v1.Greeter".into() }).await.expect("watch").into_inner();
    let first = watch.next().await.expect("first").expect("ok");
    assert_eq!(first.status(), ServingStatus::Serving);
    s.stop.send(()).expect("stop");
    let next = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("a status before the deadline");
    if let Some(Ok(update)) = next {
        assert_eq!(update.status(), ServingStatus::NotServing);
    }
    // A health watch is a call that never ends by itself; the watcher leaves once told.
    drop(watch);
    tokio::time::timeout(Duration::from_secs(10), s.task)
        .await
        .expect("exits within the drain timeout")
        .expect("join")
        .expect("clean exit");
}

#[test]
fn bad_flags_are_refused_in_words_before_the_port_is_taken() {
    // The port is held here: a server that bound before checking its flags would report
    // the address in use instead of the bad flag.
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = held.local_addr().expect("addr").to_string();
    let dir = tempfile::tempdir().expect("tempdir");
    let bad_file = dir.path().join("greeter.toml");
    std::fs::write(&bad_file, "[server]\ncolour = \"blue\"\n").expect("write");
    let bad_file = bad_file.to_str().expect("utf-8 path");
    let bad_file_words = format!("config file {bad_file}: server.colour: unknown field `colour`");
    for (flags, words) in [
        (&["--config", bad_file][..], bad_file_words.as_str()),
        (&["--config", "/no/such/greeter.toml"][..], "config file /no/such/greeter.toml: No such file"),
        (&["--rate", "10", "--burst", "0"][..], "burst: is 0"),
        (&["--rate", "50000", "--burst", "10"][..], "it must be at least 50"),
        (&["--rate", "10", "--limit-per-caller", "metadata:bad key"][..], "\"bad key\" is not a metadata key"),
        (&["--rate", "10", "--limit-method", "SayHello=5"][..], "--limit-method"),
        (&["--advertise", "no-port"][..], "invalid --advertise"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_greeter-server"))
            .args(["--no-register", "--listen", &addr])
            .args(flags)
            .output()
            .expect("run greeter-server");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} accepted");
        assert!(stderr.contains(words), "{flags:?}: {stderr}");
        assert!(!stderr.contains("listening"), "{flags:?} bound first: {stderr}");
    }
}
