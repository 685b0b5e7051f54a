use std::sync::Arc;

use tower_layer::Layer;

use crate::classify::{Classify, GrpcClassifier};
use crate::config::{BreakerConfig, InvalidBreakerConfig};
use crate::service::{Breaker, OnOpen};
use crate::shared::Shared;

/// Wraps a service in a [`Breaker`]. Each call of [`Layer::layer`] makes a new circuit, which
/// every clone of the service it returns shares: layer once per endpoint for per-endpoint
/// breakers (a balancer's per-endpoint stack), once around a client for a per-service one.
#[derive(Debug, Clone)]
pub struct BreakerLayer<C = GrpcClassifier> {
    name: Arc<str>,
    config: BreakerConfig,
    classifier: C,
    on_open: OnOpen,
}

impl BreakerLayer {
    /// A layer whose breakers guard `name` (named in errors and logs) with `config` and the
    /// default gRPC classifier. An open breaker refuses in `poll_ready`, which a balancer
    /// takes as "skip this endpoint"; see [`BreakerLayer::fail_fast`] for the other way.
    pub fn try_new(name: impl Into<Arc<str>>, config: BreakerConfig) -> Result<Self, InvalidBreakerConfig> {
        config.validate()?;
        Ok(BreakerLayer { name: name.into(), config, classifier: GrpcClassifier::default(), on_open: OnOpen::Refuse })
    }
}

impl<C> BreakerLayer<C> {
    /// Classifies outcomes with `classifier` instead.
    pub fn with_classifier<C2: Classify>(self, classifier: C2) -> BreakerLayer<C2> {
        BreakerLayer { name: self.name, config: self.config, classifier, on_open: self.on_open }
    }

    /// Names what the next breakers guard.
    pub fn with_name(mut self, name: impl Into<Arc<str>>) -> Self {
        self.name = name.into();
        self
    }

    /// An open breaker is always ready, and answers each call at once with UNAVAILABLE
    /// "circuit open for {name}", sending nothing: the shape for a breaker around a whole
    /// client, whose caller (a generated tonic client) expects a status, not a readiness
    /// error.
    pub fn fail_fast(mut self) -> Self {
        self.on_open = OnOpen::FailFast;
        self
    }

    /// The settings.
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }
}

impl<S, C: Clone> Layer<S> for BreakerLayer<C> {
    type Service = Breaker<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Arc::new(Shared::new(self.name.clone(), self.config.clone()));
        Breaker::from_parts(inner, shared, self.classifier.clone(), self.on_open)
    }
}
