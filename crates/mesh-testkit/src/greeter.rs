use std::time::Duration;

use mesh_proto::pb::greeter_server::{Greeter, GreeterServer};
use mesh_proto::pb::{HelloReply, HelloRequest, HelloStreamRequest};
use tonic::{Request, Response, Status};

use crate::{Error, TestServer};

/// A greeter for tests of layers and clients: it answers `SayHello` with the name it was
/// asked for as the message and its own `name` as `served_by`, after `delay` if set.
/// `SayHelloStream` sends `count` replies (at least one).
#[derive(Debug, Clone)]
pub struct NamedGreeter {
    /// What it reports as `served_by`.
    pub name: String,
    /// How long each call takes.
    pub delay: Duration,
}

impl NamedGreeter {
    /// Serves a `NamedGreeter` on 127.0.0.1:0.
    pub async fn serve(name: &str, delay: Duration) -> Result<TestServer, Error> {
        TestServer::serve(GreeterServer::new(NamedGreeter { name: name.into(), delay })).await
    }
}

#[tonic::async_trait]
impl Greeter for NamedGreeter {
    async fn say_hello(&self, r: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        Ok(Response::new(HelloReply { message: r.into_inner().name, served_by: self.name.clone() }))
    }

    type SayHelloStreamStream = tokio_stream::Iter<std::vec::IntoIter<Result<HelloReply, Status>>>;

    async fn say_hello_stream(
        &self,
        r: Request<HelloStreamRequest>,
    ) -> Result<Response<Self::SayHelloStreamStream>, Status> {
        let HelloStreamRequest { name, count } = r.into_inner();
        let reply = HelloReply { message: name, served_by: self.name.clone() };
        Ok(Response::new(tokio_stream::iter(vec![Ok(reply); count.clamp(1, 1000) as usize])))
    }
}
