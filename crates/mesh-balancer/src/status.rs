//! Turning what went wrong into the gRPC status a caller sees, in one place.
//!
//! An inner error is mapped as tonic maps it ([`tonic::Status::from_error`]): a `Status`
//! from a per-endpoint layer passes through as it is, an h2 reset keeps its meaning
//! (REFUSED_STREAM is UNAVAILABLE, ENHANCE_YOUR_CALM is RESOURCE_EXHAUSTED, …), a failed
//! connect is UNAVAILABLE. Two departures, both as the gRPC spec says:
//! - a deadline that passed is DEADLINE_EXCEEDED, where tonic reports its `TimeoutExpired`
//!   as CANCELLED;
//! - a connection that broke under a call is UNAVAILABLE: hyper's "canceled" (the
//!   connection closed before the call was answered), an incomplete message, a closed
//!   connection, a socket error (a reset when the server was killed), and a stream refused
//!   by the server's GOAWAY(NO_ERROR) as it shut down, which tonic reports as CANCELLED,
//!   UNKNOWN or INTERNAL. None is the caller's doing, and
//!   UNAVAILABLE is what tells a retry layer that another endpoint may serve the call.
//!
//! A status the balancer derives from a transport error names the endpoint and the whole
//! error chain.

use tonic::{Code, Status};

pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The status of a call that failed with `error` at the endpoint `label` names.
pub(crate) fn of_error(error: BoxError, label: &str) -> Status {
    if chain_has::<tonic::TimeoutExpired>(&*error) {
        return Status::deadline_exceeded(format!("{label}: the call's deadline passed"));
    }
    let error = match error.downcast::<Status>() {
        Ok(status) => return *status,
        Err(error) => error,
    };
    let message = format!("{label}: {}", mesh_util::error_chain(&*error));
    if connection_broke(&*error) {
        return Status::unavailable(message);
    }
    match Status::try_from_error(error) {
        Ok(status) if status.code() == Code::Unknown => Status::unknown(message),
        Ok(status) => Status::new(status.code(), message),
        Err(_) => Status::unknown(message),
    }
}

/// Whether a call that ended with `code` failed at the endpoint: any status but OK and
/// CANCELLED (the caller's). A deadline that passed counts: the endpoint did not answer in
/// time, which is what a per-endpoint breaker ejects a hung server for.
pub(crate) fn counts_against_endpoint(code: Code) -> bool {
    !matches!(code, Code::Ok | Code::Cancelled)
}

/// The gRPC status code in a response's headers (a trailers-only response), if any; a
/// CANCELLED that came once the deadline had passed is DEADLINE_EXCEEDED, there too.
pub(crate) fn code_at(
    headers: &mut http::HeaderMap,
    deadline: Option<std::time::Instant>,
    now: impl FnOnce() -> std::time::Instant,
) -> Option<Code> {
    mesh_util::grpc::status_at(headers, deadline, now).map(Code::from_i32)
}

pub(crate) use mesh_util::grpc::grpc_timeout;

/// Whether `error` says the connection under the call broke, rather than the call failing.
fn connection_broke(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(h) = e.downcast_ref::<hyper::Error>()
            && (h.is_canceled() || h.is_incomplete_message() || h.is_closed())
        {
            return true;
        }
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && (h2.is_io() || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR)))
        {
            return true;
        }
        // The socket itself failed: reset, aborted, a broken pipe, an early end of file.
        if e.is::<std::io::Error>() {
            return true;
        }
        next = e.source();
    }
    false
}

fn chain_has<T: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        if e.is::<T>() {
            return true;
        }
        next = e.source();
    }
    false
}

#[cfg(test)]
mod tests;
