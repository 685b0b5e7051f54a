//! Judging how a call ended, kept apart from the policy that reacts to it (as linkerd's
//! `http-classify` is).
//!
//! A gRPC call's status can arrive three ways: in the headers of a trailers-only response
//! (what a server sends when it fails a call before any message), in the trailers after the
//! messages (so a streaming call is judged when it ends), or as an error of the transport
//! (a connection refused or reset, a deadline that passed on the client). A response body
//! dropped before its end is the caller's cancellation, which says nothing of the endpoint.

use http::HeaderMap;
use tonic::Code;

use crate::state::Outcome;

/// Turns the parts of a call's end into an [`Outcome`].
pub trait Classify: Clone + Send + Sync + 'static {
    /// The outcome, if the response's head already decides it (a trailers-only response, an
    /// HTTP error); `None` when the body and trailers must be read first.
    fn classify_head(&self, status: http::StatusCode, headers: &HeaderMap) -> Option<Outcome>;

    /// The outcome of a body that ended with `trailers`, or with none.
    fn classify_end(&self, trailers: Option<&HeaderMap>) -> Outcome;

    /// The outcome of a call that failed with `error`, before or during its body.
    fn classify_error(&self, error: &(dyn std::error::Error + 'static)) -> Outcome;
}

/// Classifies by gRPC status: the codes in its set are failures, OK is a success, and any
/// other code is ignored. The default set is UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL,
/// UNKNOWN and DATA_LOSS; RESOURCE_EXHAUSTED (the server's pushback) and CANCELLED (the
/// caller's) are left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrpcClassifier {
    /// Bit `c` set: code `c` is a failure.
    failures: u32,
}

impl Default for GrpcClassifier {
    fn default() -> Self {
        GrpcClassifier::with_failure_codes(&[
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
        ])
    }
}

impl GrpcClassifier {
    /// Counts exactly `codes` as failures (OK in the list is ignored: it is always a
    /// success).
    pub fn with_failure_codes(codes: &[Code]) -> Self {
        let failures = codes.iter().filter(|c| **c != Code::Ok).fold(0u32, |bits, c| bits | 1 << (*c as i32));
        GrpcClassifier { failures }
    }

    /// Whether `code` counts as a failure.
    pub fn is_failure(&self, code: Code) -> bool {
        self.failures & (1 << (code as i32)) != 0
    }

    /// The outcome of a call that ended with `code`.
    pub fn outcome(&self, code: Code) -> Outcome {
        if code == Code::Ok {
            Outcome::Success
        } else if self.is_failure(code) {
            Outcome::Failure
        } else {
            Outcome::Ignored
        }
    }

    fn code_of(headers: &HeaderMap) -> Option<Code> {
        mesh_util::grpc::grpc_status(headers).map(Code::from_i32)
    }
}

impl Classify for GrpcClassifier {
    fn classify_head(&self, status: http::StatusCode, headers: &HeaderMap) -> Option<Outcome> {
        if let Some(code) = Self::code_of(headers) {
            return Some(self.outcome(code));
        }
        if status.is_success() {
            return None;
        }
        // An HTTP error with no gRPC status, mapped as the gRPC spec maps it.
        let code = match status.as_u16() {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502..=504 => Code::Unavailable,
            _ => Code::Unknown,
        };
        Some(self.outcome(code))
    }

    fn classify_end(&self, trailers: Option<&HeaderMap>) -> Outcome {
        // A body that ends without a status is a broken call: tonic reports it as UNKNOWN.
        let code = trailers.and_then(Self::code_of).unwrap_or(Code::Unknown);
        self.outcome(code)
    }

    fn classify_error(&self, error: &(dyn std::error::Error + 'static)) -> Outcome {
        // A call the server never took (a graceful GOAWAY) says nothing of its health.
        if mesh_util::transport::never_taken(error) {
            return Outcome::Ignored;
        }
        let mut next = Some(error);
        while let Some(e) = next {
            if let Some(status) = e.downcast_ref::<tonic::Status>() {
                return self.outcome(status.code());
            }
            if e.is::<tonic::TimeoutExpired>() {
                return self.outcome(Code::DeadlineExceeded);
            }
            next = e.source();
        }
        // A connection that could not be made or broke: the endpoint's, as UNAVAILABLE.
        self.outcome(Code::Unavailable)
    }
}

#[cfg(test)]
mod tests;
