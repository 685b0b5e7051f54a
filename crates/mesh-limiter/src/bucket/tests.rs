use std::time::Duration;

use super::*;

#[test]
fn refills_come_in_whole_milliseconds_and_average_to_the_rate() {
    for rate in [0.5, 1.0, 7.0, 200.0, 300.0, 333.0, 1000.0, 1001.0, 1500.0, 2500.0, 33_333.0, 1_000_000.0, 0.017] {
        let (refill, interval) = refill_of(rate, 100_000);
        assert!(
            interval >= Duration::from_millis(1) && interval.subsec_nanos() % 1_000_000 == 0,
            "{rate}: {interval:?}"
        );
        let got = refill as f64 / interval.as_secs_f64();
        assert!((got - rate).abs() / rate <= 0.005, "{rate}/s became {got}/s ({refill} every {interval:?})");
    }
    // 20 ms apart or more when the burst holds that long's tokens.
    assert_eq!(refill_of(200.0, 20), (4, Duration::from_millis(20)));
    assert_eq!(refill_of(300.0, 30), (6, Duration::from_millis(20)));
    assert_eq!(refill_of(333.0, 34), (7, Duration::from_millis(21)), "333.3/s, within 0.5%");
    assert_eq!(refill_of(200.0, 2), (1, Duration::from_millis(5)), "a burst of 2 cannot wait 20 ms");
    // A refill never spills over the burst, and the rate is never exceeded.
    assert_eq!(refill_of(300.0, 1), (1, Duration::from_millis(4)), "250/s, not 333/s");
    assert_eq!(refill_of(1500.0, 2), (1, Duration::from_millis(1)), "1000/s with a burst of 2");
    assert_eq!(refill_of(0.01, 1), (1, Duration::from_secs(100)), "slower than one a minute");
    assert_eq!(refill_of(1_000_000.0, 1000), (1000, Duration::from_millis(1)));
}

#[tokio::test(start_paused = true)]
async fn a_rate_that_is_not_a_whole_number_of_milliseconds_apart_is_kept() {
    let bucket = Bucket::full(Limit::try_new(300.0, 30).expect("valid"));
    let mut admitted = 0;
    for _ in 0..2000 {
        tokio::time::advance(Duration::from_millis(1)).await;
        while bucket.try_admit() {
            admitted += 1;
        }
    }
    assert!((597..=633).contains(&admitted), "{admitted} in 2 s at 300/s, burst 30");
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
    assert_eq!(bucket.pushback_ms(), 20, "2 tokens every 20 ms");
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

#[test]
fn threads_racing_for_tokens_get_the_rate_and_the_bucket_keeps_refilling() {
    // Four threads take tokens as fast as they can: every token refilled is taken once,
    // none is lost, and refills never stop (leaky-bucket's lock-free path failed both).
    let bucket = std::sync::Arc::new(Bucket::full(Limit::try_new(1000.0, 10).expect("valid")));
    let started = std::time::Instant::now();
    let lasting = Duration::from_millis(400);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let bucket = bucket.clone();
            std::thread::spawn(move || {
                let mut admitted = 0u64;
                while started.elapsed() < lasting {
                    admitted += u64::from(bucket.try_admit());
                }
                admitted
            })
        })
        .collect();
    let admitted: u64 = threads.into_iter().map(|t| t.join().expect("thread")).sum();
    let expected = 1000.0 * started.elapsed().as_secs_f64() + 10.0;
    assert!((admitted as f64 - expected).abs() <= expected * 0.05, "{admitted} admitted, {expected:.0} expected");
}
