use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tower_service::Service;

use crate::classify::Classify;
use crate::config::{BreakerConfig, InvalidBreakerConfig};
use crate::error::BreakerOpen;
use crate::future::{Recorder, ResponseFuture};
use crate::shared::Shared;
use crate::state::{Admission, Outcome, State};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What an open breaker does with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OnOpen {
    /// `poll_ready` fails with [`BreakerOpen`].
    Refuse,
    /// `poll_ready` succeeds and the call is answered with UNAVAILABLE at once.
    FailFast,
}

/// A circuit breaker around `S`: see the crate docs. Built by [`crate::BreakerLayer`].
///
/// A place is reserved in `poll_ready` (a probe's, when half-open) and spent by the next
/// `call`; a clone starts with none, and a dropped breaker gives back a place it reserved
/// and did not spend.
#[derive(Debug)]
pub struct Breaker<S, C> {
    inner: S,
    classifier: C,
    on_open: OnOpen,
    place: Place,
}

/// The circuit, and the place reserved in it by `poll_ready`, given back if never spent.
#[derive(Debug)]
struct Place {
    shared: Arc<Shared>,
    reserved: Option<Admission>,
}

impl Drop for Place {
    fn drop(&mut self) {
        if let Some(admitted @ Admission::Probe(_)) = self.reserved.take() {
            self.shared.record(admitted, Outcome::Ignored);
        }
    }
}

/// A view of a breaker's circuit, for tables and metrics; shared with the breaker.
#[derive(Debug, Clone)]
pub struct BreakerHandle {
    shared: Arc<Shared>,
}

/// A [`BreakerHandle`] that does not keep the circuit alive: for a table of endpoints'
/// breakers whose entries should go when the endpoints' stacks do.
#[derive(Debug, Clone)]
pub struct WeakBreakerHandle {
    shared: std::sync::Weak<Shared>,
}

impl WeakBreakerHandle {
    /// The handle, while some breaker (or handle) still holds the circuit.
    pub fn upgrade(&self) -> Option<BreakerHandle> {
        self.shared.upgrade().map(|shared| BreakerHandle { shared })
    }

    /// Whether the circuit is gone.
    pub fn is_gone(&self) -> bool {
        self.shared.strong_count() == 0
    }
}

impl BreakerHandle {
    /// A handle that does not keep the circuit alive.
    pub fn downgrade(&self) -> WeakBreakerHandle {
        WeakBreakerHandle { shared: Arc::downgrade(&self.shared) }
    }

    /// Changes the settings of the circuit every clone of this breaker shares, from the next
    /// call on (see [`crate::Circuit::reconfigure`]); the error names a bad setting.
    pub fn reconfigure(&self, config: BreakerConfig) -> Result<(), InvalidBreakerConfig> {
        config.validate()?;
        self.shared.reconfigure(config);
        Ok(())
    }

    /// The settings in force.
    pub fn config(&self) -> BreakerConfig {
        self.shared.config()
    }

    /// What the breaker guards.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Its state now.
    pub fn state(&self) -> State {
        self.shared.state()
    }

    /// Changes of state so far.
    pub fn transitions(&self) -> u64 {
        self.shared.transitions()
    }

    /// Asks the circuit to let a call through, for code that is not a tower service; a
    /// call let through must end with [`BreakerHandle::record`].
    pub fn admit(&self) -> Admission {
        self.shared.admit()
    }

    /// Records how a call that [`BreakerHandle::admit`] let through ended.
    pub fn record(&self, admitted: Admission, outcome: Outcome) {
        self.shared.record(admitted, outcome);
    }
}

impl<S, C> Breaker<S, C> {
    pub(crate) fn from_parts(inner: S, shared: Arc<Shared>, classifier: C, on_open: OnOpen) -> Self {
        Breaker { inner, classifier, on_open, place: Place { shared, reserved: None } }
    }

    /// A handle on the circuit, which every clone of this breaker shares.
    pub fn handle(&self) -> BreakerHandle {
        BreakerHandle { shared: self.place.shared.clone() }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service, dropping the breaker (and any place it reserved).
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn open_error(&self) -> BreakerOpen {
        BreakerOpen { name: self.place.shared.name.clone(), retry_in: self.place.shared.retry_in() }
    }
}

impl<S: Clone, C: Clone> Clone for Breaker<S, C> {
    /// Shares the circuit; the clone has no place reserved.
    fn clone(&self) -> Self {
        Breaker::from_parts(self.inner.clone(), self.place.shared.clone(), self.classifier.clone(), self.on_open)
    }
}

impl<S, C, ReqBody, ResBody> Service<http::Request<ReqBody>> for Breaker<S, C>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    ResBody::Error: Into<BoxError>,
    C: Classify,
{
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let admitted = match self.place.reserved {
            Some(admitted) => admitted,
            None => {
                let admitted = self.place.shared.admit();
                if let Admission::Refused { .. } = admitted
                    && self.on_open == OnOpen::Refuse
                {
                    return Poll::Ready(Err(self.open_error().into()));
                }
                self.place.reserved = Some(admitted);
                admitted
            }
        };
        if let Admission::Refused { .. } = admitted {
            // Fail fast: ready, and the call is answered without the inner service.
            return Poll::Ready(Ok(()));
        }
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(e)) => {
                if let Some(admitted) = self.place.reserved.take() {
                    self.place.shared.record(admitted, Outcome::Ignored);
                }
                Poll::Ready(Err(e.into()))
            }
            other => other.map_err(Into::into),
        }
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        // Called without `poll_ready`: decide now.
        let admitted = self.place.reserved.take().unwrap_or_else(|| self.place.shared.admit());
        if let Admission::Refused { .. } = admitted {
            let open = self.open_error();
            return match self.on_open {
                OnOpen::FailFast => ResponseFuture::fail_fast(open.to_status()),
                OnOpen::Refuse => ResponseFuture::refused(open.into()),
            };
        }
        let deadline = mesh_util::grpc::Deadline::of(&mut request, crate::shared::now);
        let recorder = Recorder::new(self.place.shared.clone(), admitted, self.classifier.clone(), deadline);
        ResponseFuture::called(self.inner.call(request), recorder)
    }
}

#[cfg(test)]
mod tests;
