use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;

use mesh_proto::pb::greeter_server;
use mesh_proto::pb::{HelloReply, HelloRequest, HelloStreamRequest};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// The longest name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// The most greetings one `SayHelloStream` call may ask for.
pub const MAX_STREAM_COUNT: u32 = 10_000;

/// The greeter.v1 service: greets by name and says which instance answered.
#[derive(Debug, Clone)]
pub struct Greeter {
    instance: Arc<str>,
    fault: Fault,
    /// The reply, `{name}` replaced by the caller's name; changed live by configuration.
    greeting: Arc<ArcSwap<String>>,
}

/// Faults injected into greeter calls, for tests and the demo: off by default.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// The share of calls failed with `code`, from 0 to 1.
    pub error_rate: f64,
    /// The status code of a failed call.
    pub code: tonic::Code,
    /// A delay before every call is answered.
    pub delay: std::time::Duration,
}

impl Default for Fault {
    fn default() -> Self {
        Fault { error_rate: 0.0, code: tonic::Code::Unavailable, delay: std::time::Duration::ZERO }
    }
}

impl Fault {
    /// Whether any fault is injected.
    pub fn is_on(&self) -> bool {
        self.error_rate > 0.0 || !self.delay.is_zero()
    }

    /// Waits the delay, then fails the call at the error rate.
    async fn apply(&self) -> Result<(), Status> {
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.error_rate > 0.0 && rand::random::<f64>() < self.error_rate {
            return Err(Status::new(self.code, format!("injected fault (--fault-error-rate {})", self.error_rate)));
        }
        Ok(())
    }
}

impl Greeter {
    /// A greeter that reports `instance` (its instance id) as `served_by`.
    pub fn new(instance: impl Into<Arc<str>>) -> Self {
        let greeting = Arc::new(ArcSwap::from_pointee(greeter_config::DEFAULT_GREETING.to_string()));
        Greeter { instance: instance.into(), fault: Fault::default(), greeting }
    }

    /// The greeting template it replies with, shared: storing a new one changes the replies
    /// from the next call on.
    pub fn greeting(&self) -> Arc<ArcSwap<String>> {
        self.greeting.clone()
    }

    /// Replies with the `server.greeting` of `config` from now on, as it changes (a task
    /// follows it while the configuration's sender lives).
    pub fn following(self, config: tokio::sync::watch::Receiver<Arc<greeter_config::GreeterConfig>>) -> Self {
        self.greeting.store(Arc::new(config.borrow().server.service.greeting.clone()));
        tokio::spawn(crate::server::follow_greeting(config, self.greeting.clone()));
        self
    }

    /// Injects `fault` into every greeter call.
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    fn reply(&self, name: &str) -> HelloReply {
        HelloReply { message: self.greeting.load().replace("{name}", name), served_by: self.instance.to_string() }
    }
}

/// Checks a name; the message says what is wrong in words a caller can act on.
fn validate(name: &str) -> Result<(), Status> {
    if name.is_empty() {
        return Err(Status::invalid_argument("name must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "name is {} bytes long; at most {MAX_NAME_BYTES} bytes are allowed",
            name.len()
        )));
    }
    Ok(())
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<HelloReply, Status>> + Send>>;

#[tonic::async_trait]
impl greeter_server::Greeter for Greeter {
    async fn say_hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloReply>, Status> {
        let name = &request.get_ref().name;
        validate(name)?;
        if self.fault.is_on() {
            self.fault.apply().await?;
        }
        Ok(Response::new(self.reply(name)))
    }

    type SayHelloStreamStream = ReplyStream;

    async fn say_hello_stream(
        &self,
        request: Request<HelloStreamRequest>,
    ) -> Result<Response<Self::SayHelloStreamStream>, Status> {
        let HelloStreamRequest { name, count } = request.into_inner();
        validate(&name)?;
        if count > MAX_STREAM_COUNT {
            return Err(Status::invalid_argument(format!(
                "count is {count}; at most {MAX_STREAM_COUNT} greetings per call"
            )));
        }
        if self.fault.is_on() {
            self.fault.apply().await?;
        }
        let reply = self.reply(&name);
        let n = count.max(1) as usize;
        Ok(Response::new(Box::pin(tokio_stream::iter(std::iter::repeat_n(Ok(reply), n)))))
    }
}

#[cfg(test)]
mod tests;
