//! The two gRPC headers every layer of a call reads: `grpc-status` (in the headers of a
//! trailers-only response, or in trailers) and `grpc-timeout` (the call's deadline).

use std::time::Duration;

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
