//! The response body of a call the balancer sent: the call counts against its endpoint
//! until the body ends, and the body ends at the call's deadline at the latest.
//!
//! An endpoint that sends its response head and then nothing has not served the call: its
//! failure is counted when the trailers say so, when the body fails, or when the deadline
//! passes first (DEADLINE_EXCEEDED, an error of this body). Trailers that say OK once the
//! deadline has passed came too late: DEADLINE_EXCEEDED, that endpoint's. Dropped before its end and
//! before its deadline, the caller gave up: not the endpoint's doing.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};
use tonic::Status;
use tonic::body::Body;

use crate::balanced::Guard;
use crate::status;

pin_project! {
    pub(crate) struct Counted {
        #[pin]
        inner: Body,
        guard: Guard,
        // Made only if the body has to wait: a unary response usually arrives with its head.
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl Counted {
    pub(crate) fn new(inner: Body, guard: Guard) -> Self {
        Counted { inner, guard, timer: None }
    }
}

impl http_body::Body for Counted {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_trailers() {
                    Ok(mut trailers) => {
                        let now = || Instant::now().into_std();
                        let code = mesh_util::grpc::status_at(&mut trailers, this.guard.deadline, now);
                        let code = code.map_or(tonic::Code::Unknown, tonic::Code::from_i32);
                        this.guard.finish(status::counts_against_endpoint(code));
                        Frame::trailers(trailers)
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(status))) => {
                this.guard.finish(status::counts_against_endpoint(status.code()));
                Poll::Ready(Some(Err(status)))
            }
            Poll::Ready(None) => {
                // A gRPC response that ends without trailers has no status: tonic reports
                // it as an error, and the endpoint sent it.
                this.guard.finish(true);
                Poll::Ready(None)
            }
            Poll::Pending => {
                let Some(deadline) = this.guard.deadline else { return Poll::Pending };
                if this.guard.is_done() {
                    return Poll::Pending;
                }
                let at = Instant::from_std(deadline);
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                std::task::ready!(timer.as_mut().poll(cx));
                this.guard.finish(true);
                Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "{}: its deadline passed while its response was still arriving",
                    this.guard.slot.label
                )))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
