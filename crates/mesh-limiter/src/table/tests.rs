use std::time::Duration;

use super::*;
use crate::config::CallerKey;

fn bucket_of(table: &Table, path: &str, caller: Option<Caller<'_>>) -> Arc<Bucket> {
    table.with_bucket(path, caller, |b, _| Arc::clone(b))
}

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
        let bucket = bucket_of(
            &table,
            "/greeter.v1.Greeter/SayHello",
            Some(Caller::Ip(Some(std::net::Ipv4Addr::from(0x0a00_0000 | i).into()))),
        );
        if i >= 1000 && bucket.try_admit() {
            admitted_beyond_cap += 1;
        }
    }
    assert_eq!(table.callers(), 1000);
    assert_eq!(admitted_beyond_cap, 2, "callers beyond the cap share one bucket of burst 2");
    // Once the first ones have been idle for a minute, new callers get their own again.
    tokio::time::advance(Duration::from_secs(61)).await;
    let fresh = bucket_of(&table, "/greeter.v1.Greeter/SayHello", Some(Caller::Ip(Some([192, 168, 0, 1].into()))));
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
        assert!(bucket_of(&table, "/a.B/D", None).try_admit());
    }
    assert!(bucket_of(&table, "/a.B/C", None).try_admit());
    // The default limit changes; /a.B/C's does not.
    let changed = LimiterConfig { default: Limit::try_new(20.0, 8).expect("valid"), ..config };
    let next = Table::new(changed, Some(&table));
    assert!(Arc::ptr_eq(&bucket_of(&next, "/a.B/C", None), &bucket_of(&table, "/a.B/C", None)), "kept as it was");
    let default = bucket_of(&next, "/a.B/D", None);
    assert_eq!((0..10).filter(|_| default.try_admit()).count(), 2, "the 2 tokens it held, not a fresh 8");
}

#[tokio::test(start_paused = true)]
async fn a_caller_has_a_bucket_per_scope_and_counts_once_toward_the_cap() {
    let override_ = Limit::try_new(1.0, 1).expect("valid");
    let config = per_caller(1).with_method("/a.B/C", override_);
    let table = Table::new(config.clone(), None);
    let me = Some(Caller::Ip(Some([10, 0, 0, 1].into())));
    let method = bucket_of(&table, "/a.B/C", me);
    let default = bucket_of(&table, "/a.B/D", me);
    assert!(!Arc::ptr_eq(&method, &default));
    assert_eq!(method.limit, override_);
    assert!(Arc::ptr_eq(&default, &bucket_of(&table, "/a.B/E", me)), "methods without an override share one");
    assert_eq!(table.callers(), 1, "one caller, two scopes");
    // Another caller is over the cap of 1: it gets the shared overflow bucket.
    let other = bucket_of(&table, "/a.B/D", Some(Caller::Ip(Some([10, 0, 0, 2].into()))));
    assert!(!Arc::ptr_eq(&other, &default));
    assert_eq!(table.callers(), 1);

    // Told apart by a metadata key instead: the callers by address are not carried over.
    let by_key =
        LimiterConfig { per_caller: Some(PerCaller::new(CallerKey::Metadata("x-tenant".into()))), ..config.clone() };
    let next = Table::new(by_key, Some(&table));
    assert_eq!(next.callers(), 0);
    let tenant = bucket_of(&next, "/a.B/D", Some(Caller::Key(Some("t1"))));
    assert!(Arc::ptr_eq(&tenant, &bucket_of(&next, "/a.B/D", Some(Caller::Key(Some("t1"))))));
    let keyless = bucket_of(&next, "/a.B/D", Some(Caller::Key(None)));
    assert!(!Arc::ptr_eq(&tenant, &keyless), "calls without the key share a bucket of their own");
    assert_eq!(next.callers(), 1, "callers without the key are not counted toward the cap");
}

#[tokio::test(start_paused = true)]
async fn an_update_carries_each_callers_balance_into_its_new_limit() {
    let table = Table::new(per_caller(10), None);
    let me = Some(Caller::Ip(Some([10, 0, 0, 1].into())));
    let bucket = bucket_of(&table, "/a.B/C", me);
    assert!(bucket.try_admit(), "1 of the burst of 2 taken");
    let raised = LimiterConfig { default: Limit::try_new(10.0, 5).expect("valid"), ..per_caller(10) };
    let next = Table::new(raised, Some(&table));
    assert_eq!(next.callers(), 1, "the caller is kept");
    let renewed = bucket_of(&next, "/a.B/C", me);
    assert_eq!(renewed.limit.burst, 5);
    assert_eq!((0..5).filter(|_| renewed.try_admit()).count(), 1, "the 1 token it held, not a fresh 5");
}

#[test]
fn a_caller_reads_as_who_it_is() {
    assert_eq!(Caller::Ip(Some([10, 0, 0, 1].into())).to_string(), "10.0.0.1");
    assert_eq!(Caller::Ip(None).to_string(), "an unknown address");
    assert_eq!(Caller::Key(Some("tenant-7")).to_string(), "tenant-7");
    assert_eq!(Caller::Key(None).to_string(), "callers without the key");
}

/// The reference for the per-caller table: each caller a plain token count made full when
/// the caller first calls, refilled at every interval since; at most `cap` callers, those
/// idle for `idle` dropped when a new caller finds the table full (looked at no more than
/// once per tenth of `idle`), callers beyond the cap and calls from no one sharing a count
/// each.
mod model {
    use std::collections::HashMap;
    use std::time::Duration;

    use proptest::prelude::*;
    use tokio::time::Instant;

    use super::*;
    use crate::bucket::refill_of;

    #[derive(Debug, Clone)]
    struct Count {
        balance: usize,
        next: Instant,
    }

    struct Model {
        limit: Limit,
        refill: usize,
        interval: Duration,
        cap: usize,
        idle: Duration,
        callers: HashMap<u8, (Count, Instant)>,
        overflow: Option<Count>,
        unknown: Option<Count>,
        looked: Option<Instant>,
    }

    impl Model {
        fn full(&self, now: Instant) -> Count {
            Count { balance: self.limit.burst as usize, next: now + self.interval }
        }

        fn take(&self, count: &mut Count, now: Instant) -> bool {
            while count.next <= now {
                count.balance = (count.balance + self.refill).min(self.limit.burst as usize);
                count.next += self.interval;
            }
            let admitted = count.balance > 0;
            count.balance -= usize::from(admitted);
            admitted
        }

        fn call(&mut self, who: Option<u8>, now: Instant) -> bool {
            let Some(who) = who else {
                let mut count = self.unknown.take().unwrap_or_else(|| self.full(now));
                let admitted = self.take(&mut count, now);
                self.unknown = Some(count);
                return admitted;
            };
            if let Some((mut count, _)) = self.callers.remove(&who) {
                let admitted = self.take(&mut count, now);
                self.callers.insert(who, (count, now));
                return admitted;
            }
            if self.callers.len() >= self.cap && self.looked.is_none_or(|at| now - at >= self.idle / 10) {
                self.looked = Some(now);
                let idle = self.idle;
                self.callers.retain(|_, (_, used)| now - *used < idle);
            }
            if self.callers.len() >= self.cap {
                let mut count = self.overflow.take().unwrap_or_else(|| self.full(now));
                let admitted = self.take(&mut count, now);
                self.overflow = Some(count);
                return admitted;
            }
            let mut count = self.full(now);
            let admitted = self.take(&mut count, now);
            self.callers.insert(who, (count, now));
            admitted
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Wait(u64),
        Call(Option<u8>),
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        #[test]
        fn the_table_admits_what_one_token_count_per_caller_admits(
            rate in 1u32..200,
            burst in 1u32..5,
            cap in 1usize..6,
            idle_ms in 100u64..3000,
            ops in prop::collection::vec(
                prop_oneof![
                    2 => (0u64..400).prop_map(Op::Wait),
                    6 => prop::option::weighted(0.9, 0u8..10).prop_map(Op::Call),
                ],
                1..200,
            ),
        ) {
            let Ok(limit) = Limit::try_new(f64::from(rate), burst) else { return Ok(()) };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().expect("rt");
            runtime.block_on(async {
                let mut settings = PerCaller::new(CallerKey::PeerIp);
                settings.max_callers = cap;
                settings.idle = Duration::from_millis(idle_ms);
                let config = LimiterConfig::try_new(limit).expect("valid").with_per_caller(settings.clone());
                let table = Table::new(config, None);
                let (refill, interval) = refill_of(limit.rate_per_sec, limit.burst);
                let mut model = Model {
                    limit, refill, interval, cap, idle: settings.idle,
                    callers: HashMap::new(), overflow: None, unknown: None, looked: None,
                };
                for (step, op) in ops.into_iter().enumerate() {
                    match op {
                        Op::Wait(ms) => tokio::time::advance(Duration::from_millis(ms)).await,
                        Op::Call(who) => {
                            let caller = Caller::Ip(who.map(|w| std::net::Ipv4Addr::new(10, 0, 0, w).into()));
                            let admitted = table.with_bucket("/a.B/C", Some(caller), |b, _| b.try_admit());
                            prop_assert_eq!(admitted, model.call(who, Instant::now()), "step {}: {:?}", step, who);
                            prop_assert_eq!(table.callers(), model.callers.len(), "callers after step {}", step);
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
}
