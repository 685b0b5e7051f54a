//! Turning what went wrong into the gRPC status a caller sees, in one place.
//!
//! An inner error is mapped as tonic maps it ([`tonic::Status::from_error`]): a `Status`
//! from a per-endpoint layer passes through as it is, an h2 reset keeps its meaning
//! (REFUSED_STREAM is UNAVAILABLE, ENHANCE_YOUR_CALM is RESOURCE_EXHAUSTED, …), a failed
//! connect is UNAVAILABLE. One departure: a deadline that passed is DEADLINE_EXCEEDED, as
//! the gRPC spec says, where tonic reports its `TimeoutExpired` as CANCELLED. A status the
//! balancer derives from a transport error names the endpoint and the whole error chain.

use std::time::Duration;

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
    match Status::try_from_error(error) {
        Ok(status) if status.code() == Code::Unknown => Status::unknown(message),
        Ok(status) => Status::new(status.code(), message),
        Err(_) => Status::unknown(message),
    }
}

/// Whether a response failed in a way that is the endpoint's (not a deadline or a
/// cancellation, which are the caller's).
pub(crate) fn counts_against_endpoint(code: Code) -> bool {
    !matches!(code, Code::Ok | Code::DeadlineExceeded | Code::Cancelled)
}

/// The gRPC status code in a response's headers (a trailers-only response), if any.
pub(crate) fn code_in_headers(headers: &http::HeaderMap) -> Option<Code> {
    // Looked up by a ready-made name: a `&str` key is parsed and checked on every call.
    static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    let value = headers.get(&GRPC_STATUS)?;
    std::str::from_utf8(value.as_bytes()).ok()?.parse::<i32>().ok().map(Code::from_i32)
}

/// The deadline a call carries in its `grpc-timeout` header: digits (at most eight) and a
/// unit, `H`, `M`, `S`, `m`, `u` or `n`.
pub(crate) fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
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
