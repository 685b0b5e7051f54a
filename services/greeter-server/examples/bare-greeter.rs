//! The baseline of `cargo xtask bench`: a bare tonic server of the same generated greeter.v1
//! code, with the same reply and validation, and none of mesh's layers (no health,
//! reflection, registry, limiter or config). `bare-greeter [ADDR]`, default 127.0.0.1:50050.

use std::net::SocketAddr;

use mesh_proto::pb::greeter_server::{Greeter, GreeterServer};
use mesh_proto::pb::{HelloReply, HelloRequest, HelloStreamRequest};
use tonic::{Request, Response, Status};

struct Bare {
    instance: String,
}

#[tonic::async_trait]
impl Greeter for Bare {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let name = &request.get_ref().name;
        if name.is_empty() || name.len() > 1024 {
            return Err(Status::invalid_argument("name must be 1 to 1024 bytes"));
        }
        Ok(Response::new(HelloReply { message: format!("Hello, {name}!"), served_by: self.instance.clone() }))
    }

    type SayHelloStreamStream = tokio_stream::Iter<std::vec::IntoIter<Result<HelloReply, Status>>>;

    async fn say_hello_stream(
        &self,
        request: Request<HelloStreamRequest>,
    ) -> Result<Response<Self::SayHelloStreamStream>, Status> {
        let HelloStreamRequest { name, count } = request.into_inner();
        let reply = HelloReply { message: format!("Hello, {name}!"), served_by: self.instance.clone() };
        Ok(Response::new(tokio_stream::iter(vec![Ok(reply); count.clamp(1, 10_000) as usize])))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = match std::env::args().nth(1) {
        Some(a) => a.parse().map_err(|e| format!("bad address {a:?}: {e}"))?,
        None => SocketAddr::from(([127, 0, 0, 1], 50050)),
    };
    eprintln!("bare-greeter listening on {addr}");
    tonic::transport::Server::builder()
        .add_service(GreeterServer::new(Bare { instance: addr.to_string() }))
        .serve_with_shutdown(addr, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
