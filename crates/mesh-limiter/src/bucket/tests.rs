use std::time::Duration;

use super::*;

#[test]
fn refills_average_to_the_rate() {
    for rate in [0.5, 1.0, 7.0, 200.0, 1000.0, 1001.0, 2500.0, 33_333.0, 1_000_000.0] {
        let (refill, interval) = refill_of(rate);
        assert!(interval >= Duration::from_millis(1) || rate <= 1000.0, "{rate}: {interval:?}");
        let got = refill as f64 / interval.as_secs_f64();
        assert!((got - rate).abs() / rate < 1e-6, "{rate}/s became {got}/s");
    }
}

#[tokio::test(start_paused = true)]
async fn a_full_bucket_admits_its_burst_then_the_rate() {
    let limit = Limit::try_new(100.0, 20).expect("valid");
    let bucket = Bucket::full(limit);
    let burst = (0..100).filter(|_| bucket.try_admit()).count();
    assert_eq!(burst, 20);
    let mut admitted = 0;
    for _ in 0..1000 {
        tokio::time::advance(Duration::from_millis(1)).await;
        while bucket.try_admit() {
            admitted += 1;
        }
    }
    assert!((99..=101).contains(&admitted), "{admitted} in 1 s at 100/s");
    assert_eq!(bucket.pushback_ms(), 10);
}

#[tokio::test(start_paused = true)]
async fn a_renewed_bucket_keeps_what_it_held_up_to_the_new_burst() {
    let bucket = Bucket::full(Limit::try_new(100.0, 20).expect("valid"));
    for _ in 0..15 {
        assert!(bucket.try_admit());
    }
    let renewed = bucket.renewed(Limit::try_new(10.0, 50).expect("valid"));
    assert_eq!((0..100).filter(|_| renewed.try_admit()).count(), 5, "5 left, not a fresh 50");
    let smaller =
        Bucket::full(Limit::try_new(100.0, 20).expect("valid")).renewed(Limit::try_new(100.0, 3).expect("valid"));
    assert_eq!((0..100).filter(|_| smaller.try_admit()).count(), 3);
}

#[tokio::test(start_paused = true)]
async fn waiting_gets_a_token_within_max_wait_or_gives_up() {
    let bucket = Bucket::full(Limit::try_new(10.0, 1).expect("valid"));
    assert!(bucket.try_admit());
    assert!(bucket.admit_within(Duration::from_millis(150)).await, "a token comes every 100 ms");
    assert!(!bucket.admit_within(Duration::from_millis(50)).await, "none within 50 ms");
}
