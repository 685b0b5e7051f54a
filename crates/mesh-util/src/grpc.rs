//! The two gRPC headers every layer of a call reads: `grpc-status` (in the headers of a
//! trailers-only response, or in trailers) and `grpc-timeout` (the call's deadline), and
//! the deadline as an instant that the layers of one call share ([`Deadline`]).

use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};

/// `grpc-status`, as a ready-made name: a `&str` key is parsed and checked on every lookup.
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
/// `grpc-timeout`.
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The gRPC status code in `headers` (the headers of a trailers-only response, or the
/// trailers), if there is one and it is a number.
pub fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    let value = headers.get(&GRPC_STATUS)?;
    std::str::from_utf8(value.as_bytes()).ok()?.parse::<i32>().ok()
}

/// The deadline a call carries in its `grpc-timeout` header: digits (at most eight) and a
/// unit, `H`, `M`, `S`, `m`, `u` or `n`.
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
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

/// `timeout` as a `grpc-timeout` value, in the finest unit whose count fits in eight digits
/// (rounded up, so that a deadline is never sent earlier than it is).
pub fn encode_grpc_timeout(timeout: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = timeout.as_nanos();
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let count = nanos.div_ceil(per);
        if count <= MAX {
            return HeaderValue::from_str(&format!("{count}{unit}")).unwrap_or(HeaderValue::from_static("99999999H"));
        }
    }
    HeaderValue::from_static("99999999H")
}

/// A call's deadline as an instant, in the request's extensions: the first mesh layer that
/// reads the call's `grpc-timeout` puts it there, so that every layer below measures the
/// same deadline, however long the call waited on the way (a `grpc-timeout` read again
/// further down would start its count late). The instant is on tokio's clock
/// (`tokio::time::Instant::into_std`), which is std's unless a test paused time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline of `request`: its [`Deadline`] extension, else the time `now` tells
    /// plus its `grpc-timeout`, which is then put in its extensions for the layers below.
    /// `None` when the call has no deadline (and then the clock is not read).
    pub fn of<B>(request: &mut http::Request<B>, now: impl FnOnce() -> Instant) -> Option<Instant> {
        if let Some(Deadline(at)) = request.extensions().get::<Deadline>() {
            return Some(*at);
        }
        let at = now().checked_add(grpc_timeout(request.headers())?)?;
        request.extensions_mut().insert(Deadline(at));
        Some(at)
    }

    /// Sets `request`'s deadline to `at`, in its extensions and as its `grpc-timeout`
    /// (what is left of it at `now`), for an attempt with a deadline of its own.
    pub fn set<B>(request: &mut http::Request<B>, at: Instant, now: Instant) {
        request.extensions_mut().insert(Deadline(at));
        request.headers_mut().insert(&GRPC_TIMEOUT, encode_grpc_timeout(at.saturating_duration_since(now)));
    }
}

/// The gRPC status code in `headers` (a trailers-only response's headers, or trailers),
/// with an OK or a CANCELLED that came once the call's deadline had passed turned into
/// DEADLINE_EXCEEDED in `headers` too: a passed deadline is DEADLINE_EXCEEDED, as the gRPC
/// spec says, whether the answer came a moment too late (tokio's timer fires on the next
/// millisecond) or a tonic server reported its own timeout as CANCELLED "Timeout expired".
/// Any other code says more than the deadline and stays.
pub fn status_at(headers: &mut HeaderMap, deadline: Option<Instant>, now: impl FnOnce() -> Instant) -> Option<i32> {
    const OK: i32 = 0;
    const CANCELLED: i32 = 1;
    const DEADLINE_EXCEEDED: i32 = 4;
    let code = grpc_status(headers)?;
    if !matches!(code, OK | CANCELLED) || deadline.is_none_or(|d| now() < d) {
        return Some(code);
    }
    static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
    headers.insert(&GRPC_STATUS, HeaderValue::from_static("4"));
    headers.insert(&GRPC_MESSAGE, HeaderValue::from_static("the call's deadline passed"));
    Some(DEADLINE_EXCEEDED)
}
