//! The response future of a [`crate::Breaker`], and the body that records a call's outcome
//! when its trailers arrive.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::Frame;
use pin_project_lite::pin_project;
use tonic::body::Body;

use std::time::Instant;

use crate::classify::Classify;
use crate::service::BoxError;
use crate::shared::{Shared, now};
use crate::state::{Admission, Outcome};

/// Records one call's outcome, once; dropped unrecorded, the call was the caller's to
/// cancel and counts as [`Outcome::Ignored`], unless its deadline had passed: then the
/// endpoint did not answer in time (a layer above ended the call at its deadline), a
/// failure. So is any other outcome that says nothing of the endpoint (CANCELLED) but came
/// at or after the deadline.
#[derive(Debug)]
pub(crate) struct Recorder<C> {
    shared: Arc<Shared>,
    admitted: Admission,
    classifier: C,
    deadline: Option<Instant>,
    done: bool,
}

impl<C> Recorder<C> {
    pub(crate) fn new(shared: Arc<Shared>, admitted: Admission, classifier: C, deadline: Option<Instant>) -> Self {
        Recorder { shared, admitted, classifier, deadline, done: false }
    }

    fn finish(&mut self, outcome: Outcome) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let outcome = match outcome {
            Outcome::Ignored if self.deadline.is_some_and(|d| now() >= d) => Outcome::Failure,
            other => other,
        };
        self.shared.record(self.admitted, outcome);
    }

    /// The first message of a probe's response: the endpoint answers, and the probe's
    /// verdict is a success now, not when a stream ends (a long stream would hold the
    /// half-open circuit shut to every other call). The rest of the call counts as a call
    /// let through while closed.
    fn answered(&mut self) {
        if let Admission::Probe(_) = self.admitted
            && !self.done
        {
            self.shared.record(self.admitted, Outcome::Success);
            self.admitted = Admission::Allowed;
        }
    }
}

impl<C> Drop for Recorder<C> {
    fn drop(&mut self) {
        self.finish(Outcome::Ignored);
    }
}

pin_project! {
    /// The response of a [`crate::Breaker`] call.
    #[derive(Debug)]
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F, C>,
    }
}

pin_project! {
    #[project = KindProj]
    #[derive(Debug)]
    enum Kind<F, C> {
        Refused { error: Option<BoxError> },
        FailFast { status: Option<tonic::Status> },
        Called { #[pin] inner: F, recorder: Option<Recorder<C>> },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn refused(error: BoxError) -> Self {
        ResponseFuture { kind: Kind::Refused { error: Some(error) } }
    }

    pub(crate) fn fail_fast(status: tonic::Status) -> Self {
        ResponseFuture { kind: Kind::FailFast { status: Some(status) } }
    }

    pub(crate) fn called(inner: F, recorder: Recorder<C>) -> Self {
        ResponseFuture { kind: Kind::Called { inner, recorder: Some(recorder) } }
    }
}

impl<F, C, B, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    E: Into<BoxError>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    C: Classify,
{
    type Output = Result<http::Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let kind = self.project().kind;
        if !matches!(*kind, Kind::Called { .. }) {
            // Answered without I/O: spend tokio's cooperative budget, so that a caller looping
            // on an open circuit yields to the other tasks of its thread now and then.
            std::task::ready!(tokio::task::coop::poll_proceed(cx)).made_progress();
        }
        match kind.project() {
            KindProj::Refused { error } => {
                Poll::Ready(Err(error.take().unwrap_or_else(|| "breaker response polled after completion".into())))
            }
            KindProj::FailFast { status } => {
                let status = status
                    .take()
                    .unwrap_or_else(|| tonic::Status::internal("breaker response polled after completion"));
                Poll::Ready(Ok(status.into_http()))
            }
            KindProj::Called { inner, recorder } => {
                let result = std::task::ready!(inner.poll(cx));
                let Some(mut recorder) = recorder.take() else {
                    return Poll::Ready(Err("breaker response polled after completion".into()));
                };
                Poll::Ready(match result {
                    Ok(response) => {
                        let (parts, body) = response.into_parts();
                        let body = match recorder.classifier.classify_head(parts.status, &parts.headers) {
                            Some(outcome) => {
                                recorder.finish(outcome);
                                Body::new(body)
                            }
                            None => Body::new(RecordingBody { inner: body, recorder: Some(recorder) }),
                        };
                        Ok(http::Response::from_parts(parts, body))
                    }
                    Err(e) => {
                        let e = e.into();
                        let outcome = recorder.classifier.classify_error(&*e);
                        recorder.finish(outcome);
                        Err(e)
                    }
                })
            }
        }
    }
}

pin_project! {
    /// A response body that records the call's outcome at its end: its trailers, its end
    /// without trailers, or an error. Dropped before that, the caller cancelled.
    struct RecordingBody<B, C> {
        #[pin]
        inner: B,
        recorder: Option<Recorder<C>>,
    }
}

impl<B, C> http_body::Body for RecordingBody<B, C>
where
    B: http_body::Body<Data = bytes::Bytes>,
    B::Error: Into<BoxError>,
    C: Classify,
{
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match std::task::ready!(this.inner.poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(mut recorder) = this.recorder.take() {
                        let outcome = recorder.classifier.classify_end(Some(trailers));
                        recorder.finish(outcome);
                    }
                } else if let Some(recorder) = this.recorder {
                    recorder.answered();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                let e = e.into();
                if let Some(mut recorder) = this.recorder.take() {
                    let outcome = recorder.classifier.classify_error(&*e);
                    recorder.finish(outcome);
                }
                Poll::Ready(Some(Err(e)))
            }
            None => {
                if let Some(mut recorder) = this.recorder.take() {
                    let outcome = recorder.classifier.classify_end(None);
                    recorder.finish(outcome);
                }
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not before the end has been seen and recorded.
        self.recorder.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
