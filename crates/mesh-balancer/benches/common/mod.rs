// Each bench of this crate includes this module and uses only part of it.
#![allow(dead_code)]

//! What the balancer benches share: a dummy endpoint service that answers at once, and a
//! loopback listener for the endpoints' connections to reach (an endpoint gets calls once
//! its connection is up).

use std::convert::Infallible;
use std::future::Future;
use std::net::TcpListener;
use std::pin::pin;
use std::task::{Context, Poll};

use http::{Request, Response};
use tonic::body::Body;
use tower_service::Service;

/// A per-endpoint service that answers every call at once with an empty 200.
#[derive(Clone, Debug)]
pub(crate) struct Dummy;

impl Service<Request<Body>> for Dummy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<Body>) -> Self::Future {
        std::future::ready(Ok(Response::new(Body::empty())))
    }
}

/// Puts [`Dummy`] in place of each endpoint's tonic `Channel`.
#[derive(Clone, Debug)]
pub(crate) struct DummyLayer;

impl tower_layer::Layer<tonic::transport::Channel> for DummyLayer {
    type Service = Dummy;
    fn layer(&self, _: tonic::transport::Channel) -> Dummy {
        Dummy
    }
}

/// A loopback listener that accepts and holds every connection; its address.
pub(crate) fn listener() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    addr
}

/// A request, with a consistent-hash key when `keyed` (its header name made once, as a
/// client that sets one on every call would).
pub(crate) fn request(keyed: bool) -> Request<Body> {
    static KEY: http::HeaderName = http::HeaderName::from_static("x-mesh-hash-key");
    let mut request = Request::new(Body::empty());
    if keyed {
        request.headers_mut().insert(KEY.clone(), http::HeaderValue::from_static("user-42"));
    }
    request
}

/// One call as tonic's client makes it: ready, call, await (which finishes at once here).
pub(crate) fn call<S>(service: &mut S, cx: &mut Context<'_>, keyed: bool) -> bool
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    if service.poll_ready(cx).is_pending() {
        return false;
    }
    let future = pin!(service.call(request(keyed)));
    matches!(future.poll(cx), Poll::Ready(Ok(_)))
}
