use std::time::Duration;

use super::*;
use crate::config::CallerKey;

fn per_caller(max_callers: usize) -> LimiterConfig {
    let mut p = PerCaller::new(CallerKey::PeerIp);
    p.max_callers = max_callers;
    p.idle = Duration::from_secs(60);
    LimiterConfig::try_new(Limit::try_new(10.0, 2).expect("valid")).expect("valid").with_per_caller(p)
}

#[tokio::test(start_paused = true)]
async fn the_caller_cap_holds_with_100k_distinct_callers_and_the_rest_share_one_bucket() {
    let table = Table::new(per_caller(1000), None);
    let mut admitted_beyond_cap = 0;
    for i in 0..100_000u32 {
        let bucket = table
            .bucket("/greeter.v1.Greeter/SayHello", Some(&format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255)));
        if i >= 1000 && bucket.try_admit() {
            admitted_beyond_cap += 1;
        }
    }
    assert_eq!(table.callers(), 1000);
    assert_eq!(admitted_beyond_cap, 2, "callers beyond the cap share one bucket of burst 2");
    // Once the first ones have been idle for a minute, new callers get their own again.
    tokio::time::advance(Duration::from_secs(61)).await;
    let fresh = table.bucket("/greeter.v1.Greeter/SayHello", Some("192.168.0.1"));
    assert!(fresh.try_admit() && fresh.try_admit(), "a bucket of its own, full");
    assert_eq!(table.callers(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_update_keeps_unchanged_buckets_and_carries_over_the_others() {
    let limit = Limit::try_new(10.0, 5).expect("valid");
    let config =
        LimiterConfig::try_new(limit).expect("valid").with_method("/a.B/C", Limit::try_new(1.0, 3).expect("valid"));
    let table = Table::new(config.clone(), None);
    for _ in 0..3 {
        assert!(table.bucket("/a.B/D", None).try_admit());
    }
    assert!(table.bucket("/a.B/C", None).try_admit());
    // The default limit changes; /a.B/C's does not.
    let changed = LimiterConfig { default: Limit::try_new(20.0, 8).expect("valid"), ..config };
    let next = Table::new(changed, Some(&table));
    assert!(Arc::ptr_eq(&next.bucket("/a.B/C", None), &table.bucket("/a.B/C", None)), "kept as it was");
    let default = next.bucket("/a.B/D", None);
    assert_eq!((0..10).filter(|_| default.try_admit()).count(), 2, "the 2 tokens it held, not a fresh 8");
}
