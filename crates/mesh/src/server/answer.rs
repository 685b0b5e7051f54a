//! A bound on how long the server takes to answer a call: the time from its request to its
//! response's headers, which covers a request body that never finishes and a handler that
//! never answers. The bound is the server's own (`--request-timeout`) or the deadline the
//! client sent in `grpc-timeout`, whichever comes first, as tonic's own server keeps the
//! latter. A call over it gets DEADLINE_EXCEEDED and everything it held is dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Answers DEADLINE_EXCEEDED for a call not answered within `limit` (`None`: no bound).
#[derive(Debug, Clone, Copy)]
pub struct AnswerWithinLayer {
    limit: Option<Duration>,
}

impl AnswerWithinLayer {
    /// Calls must be answered within `limit`; `None` for no bound.
    pub fn new(limit: Option<Duration>) -> Self {
        AnswerWithinLayer { limit }
    }
}

impl<S> Layer<S> for AnswerWithinLayer {
    type Service = AnswerWithin<S>;

    fn layer(&self, inner: S) -> AnswerWithin<S> {
        AnswerWithin { inner, limit: self.limit }
    }
}

/// The service of [`AnswerWithinLayer`].
#[derive(Debug, Clone)]
pub struct AnswerWithin<S> {
    inner: S,
    limit: Option<Duration>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AnswerWithin<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = AnswerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let sent = mesh_util::grpc::grpc_timeout(request.headers());
        let (limit, why) = match (sent, self.limit) {
            (Some(sent), Some(own)) if own <= sent => (Some(own), Why::Server),
            (Some(sent), _) => (Some(sent), Why::Client),
            (None, own) => (own, Why::Server),
        };
        AnswerFuture { inner: self.inner.call(request), sleep: limit.map(tokio::time::sleep), limit, why }
    }
}

pin_project! {
    /// The response of an [`AnswerWithin`] call.
    pub struct AnswerFuture<F> {
        #[pin]
        inner: F,
        #[pin]
        sleep: Option<tokio::time::Sleep>,
        limit: Option<Duration>,
        why: Why,
    }
}

/// Whose bound a call has.
#[derive(Debug, Clone, Copy)]
enum Why {
    /// The server's, `--request-timeout`.
    Server,
    /// The deadline the client sent.
    Client,
}

impl<F, ResBody, E> Future for AnswerFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
    ResBody: Default,
{
    type Output = Result<http::Response<ResBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        let (Some(sleep), Some(limit)) = (this.sleep.as_pin_mut(), this.limit) else { return Poll::Pending };
        if sleep.poll(cx).is_pending() {
            return Poll::Pending;
        }
        let message = match this.why {
            Why::Server => {
                format!("the server did not answer within {limit:?} (--request-timeout); the call was dropped")
            }
            Why::Client => format!(
                "the call's deadline ({limit:?}, from its grpc-timeout) passed before the server answered; the call was dropped"
            ),
        };
        Poll::Ready(Ok(tonic::Status::deadline_exceeded(message).into_http()))
    }
}
