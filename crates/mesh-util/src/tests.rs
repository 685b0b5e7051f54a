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
