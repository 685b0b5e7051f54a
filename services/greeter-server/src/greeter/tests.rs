use super::*;
use mesh_proto::pb::greeter_server::Greeter as _;
use tokio_stream::StreamExt as _;

#[tokio::test]
async fn greets_by_name_and_names_the_instance() {
    let g = Greeter::new("10.0.0.5:50051");
    let reply = g.say_hello(Request::new(HelloRequest { name: "world".into() })).await.expect("ok");
    assert_eq!(reply.get_ref().message, "Hello, world!");
    assert_eq!(reply.get_ref().served_by, "10.0.0.5:50051");
}

#[tokio::test]
async fn empty_name_is_invalid_argument() {
    let g = Greeter::new("i");
    let err = g.say_hello(Request::new(HelloRequest { name: String::new() })).await.expect_err("empty");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "name must not be empty");
}

#[tokio::test]
async fn name_of_1025_bytes_is_invalid_and_1024_is_fine() {
    let g = Greeter::new("i");
    let ok = g.say_hello(Request::new(HelloRequest { name: "x".repeat(1024) })).await;
    assert!(ok.is_ok());
    let err = g.say_hello(Request::new(HelloRequest { name: "x".repeat(1025) })).await.expect_err("too long");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("1025 bytes"), "{}", err.message());
}

#[tokio::test]
async fn stream_sends_count_greetings_and_at_least_one() {
    let g = Greeter::new("i");
    for (count, expect) in [(0, 1), (1, 1), (7, 7)] {
        let resp = g.say_hello_stream(Request::new(HelloStreamRequest { name: "s".into(), count })).await.expect("ok");
        let replies: Vec<_> = resp.into_inner().collect().await;
        assert_eq!(replies.len(), expect, "count {count}");
    }
    let err = g
        .say_hello_stream(Request::new(HelloStreamRequest { name: "s".into(), count: MAX_STREAM_COUNT + 1 }))
        .await
        .err()
        .expect("too many");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
