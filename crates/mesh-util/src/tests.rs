use std::time::Duration;

use super::*;

#[derive(Debug)]
struct Outer(std::io::Error);

impl std::fmt::Display for Outer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("transport error")
    }
}

impl std::error::Error for Outer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[test]
fn the_chain_names_every_source_once() {
    let e = Outer(std::io::Error::other("connection refused"));
    assert_eq!(error_chain(&e), "transport error: connection refused");
}

#[test]
fn backoff_doubles_within_jitter_up_to_its_max_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(400));
    let bounds = [(50, 100), (100, 200), (200, 400), (200, 400), (200, 400)];
    for (lo, hi) in bounds {
        let d = b.next_delay();
        assert!(d >= Duration::from_millis(lo) && d <= Duration::from_millis(hi), "{d:?} not in {lo}..={hi} ms");
    }
    b.reset();
    assert!(b.next_delay() <= Duration::from_millis(100));
}

#[test]
fn grpc_timeouts_parse_in_every_unit_and_junk_is_ignored() {
    let parse = |v: &str| {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", v.parse().expect("header"));
        grpc::grpc_timeout(&h)
    };
    assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
    assert_eq!(parse("2M"), Some(Duration::from_secs(120)));
    assert_eq!(parse("3S"), Some(Duration::from_secs(3)));
    assert_eq!(parse("250m"), Some(Duration::from_millis(250)));
    assert_eq!(parse("7u"), Some(Duration::from_micros(7)));
    assert_eq!(parse("99999999n"), Some(Duration::from_nanos(99_999_999)));
    for junk in ["", "S", "123456789S", "10x", "-1S", "1.5S"] {
        assert_eq!(parse(junk), None, "{junk:?}");
    }
    assert_eq!(grpc::grpc_timeout(&http::HeaderMap::new()), None);
}

#[test]
fn grpc_timeouts_encode_in_the_finest_unit_that_fits_and_round_up() {
    let enc = |d: Duration| grpc::encode_grpc_timeout(d).to_str().expect("ascii").to_string();
    assert_eq!(enc(Duration::from_nanos(1500)), "1500n");
    assert_eq!(enc(Duration::from_millis(200)), "200000u");
    assert_eq!(enc(Duration::from_secs(5)), "5000000u");
    assert_eq!(enc(Duration::from_secs(1000)), "1000000m");
    assert_eq!(enc(Duration::from_nanos(100_000_001)), "100001u");
    for d in [Duration::from_nanos(1), Duration::from_millis(250), Duration::from_secs(86_400 * 400)] {
        let mut h = http::HeaderMap::new();
        h.insert(&grpc::GRPC_TIMEOUT, grpc::encode_grpc_timeout(d));
        let back = grpc::grpc_timeout(&h).expect("parses");
        assert!(back >= d, "{d:?} came back as {back:?}");
    }
}

#[test]
fn grpc_status_reads_numbers_only() {
    let mut h = http::HeaderMap::new();
    assert_eq!(grpc::grpc_status(&h), None);
    h.insert("grpc-status", "14".parse().expect("header"));
    assert_eq!(grpc::grpc_status(&h), Some(14));
    h.insert("grpc-status", "x".parse().expect("header"));
    assert_eq!(grpc::grpc_status(&h), None);
}
