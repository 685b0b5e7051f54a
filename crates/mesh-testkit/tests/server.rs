//! TestServer: graceful shutdown finishes in-flight calls; kill fails them, like a crash.

use std::time::Duration;

use mesh_proto::pb::greeter_client::GreeterClient;
use mesh_proto::pb::greeter_server::GreeterServer;
use mesh_proto::pb::{HelloReply, HelloRequest};
use mesh_testkit::{NamedGreeter, TestServer};

/// Answers after 300 ms, so a call is surely in flight when the test stops the server.
fn slow() -> NamedGreeter {
    NamedGreeter { name: "slow".into(), delay: Duration::from_millis(300) }
}
use tonic::{Response, Status};

async fn in_flight(server: &TestServer) -> tokio::task::JoinHandle<Result<Response<HelloReply>, Status>> {
    let mut client = GreeterClient::connect(server.uri()).await.expect("connect");
    // Make sure the connection is up before the call we race against the stop.
    let handle = tokio::spawn(async move { client.say_hello(HelloRequest { name: "x".into() }).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle
}

#[tokio::test]
async fn shutdown_lets_the_in_flight_call_finish() {
    let server = TestServer::serve(GreeterServer::new(slow())).await.expect("serve");
    let call = in_flight(&server).await;
    server.shutdown().await;
    let reply = call.await.expect("join").expect("an in-flight call survives a graceful stop");
    assert_eq!(reply.get_ref().message, "x");
}

#[tokio::test]
async fn kill_fails_the_in_flight_call_and_refuses_new_connections() {
    let server = TestServer::serve(GreeterServer::new(slow())).await.expect("serve");
    let uri = server.uri();
    let call = in_flight(&server).await;
    server.kill().await;
    let err = call.await.expect("join").expect_err("an in-flight call dies with its server");
    // tonic reports a connection that dies mid-call as UNKNOWN "transport error" (broken
    // pipe) or UNAVAILABLE, depending on where the h2 stream was; both mean "the server died".
    assert!(matches!(err.code(), tonic::Code::Unavailable | tonic::Code::Unknown), "{err}");
    assert!(GreeterClient::connect(uri).await.is_err(), "a killed server accepts nothing");
}

#[tokio::test]
async fn serve_at_brings_a_server_back_on_its_old_address() {
    let server = TestServer::serve(GreeterServer::new(slow())).await.expect("serve");
    let addr = server.addr();
    server.kill().await;
    let again = TestServer::serve_at(addr, GreeterServer::new(slow())).await.expect("same address");
    assert_eq!(again.addr(), addr);
    let mut client = GreeterClient::connect(again.uri()).await.expect("connect");
    client.say_hello(HelloRequest { name: "y".into() }).await.expect("served");
}
