//! Generated protobuf and gRPC code for `greeter.v1`, the reference service of mesh.
//!
//! The code is checked in (see `src/generated/`), so building needs neither protoc nor a
//! build script; `cargo xtask codegen` regenerates it and `cargo xtask codegen --check`
//! fails when it is stale. [`FILE_DESCRIPTOR_SET`] is the encoded descriptor set that
//! `tonic-reflection` serves.
//!
//! ```
//! use mesh_proto::pb::{greeter_client::GreeterClient, HelloRequest};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let mut client = GreeterClient::connect("http://127.0.0.1:50051").await?;
//! let reply = client.say_hello(HelloRequest { name: "world".into() }).await?;
//! println!("{} (from {})", reply.get_ref().message, reply.get_ref().served_by);
//! # Ok(())
//! # }
//! ```
//!
//! This crate holds no behaviour of its own: servers, clients and layers live elsewhere.

#[rustfmt::skip]
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)] // Generated code.
mod generated {
    include!("generated/greeter.v1.rs");
}

/// The `greeter.v1` messages, the `greeter_client` and the `greeter_server` modules.
pub mod pb {
    pub use crate::generated::*;
}

/// The encoded `FileDescriptorSet` of `greeter.v1`, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!("generated/greeter_v1_descriptor.bin");

/// The fully qualified gRPC service name, as health checks and reflection know it.
pub const GREETER_SERVICE_NAME: &str = "greeter.v1.Greeter";

/// The README's example, compiled (and run, unless marked `no_run`) as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
