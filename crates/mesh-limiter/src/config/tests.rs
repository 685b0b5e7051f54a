use super::*;

#[test]
fn bad_rates_and_bursts_are_refused_in_words() {
    for (rate, burst, setting, words) in [
        (0.0, 10, "rate_per_sec", "must be above 0"),
        (-5.0, 10, "rate_per_sec", "must be above 0"),
        (f64::NAN, 10, "rate_per_sec", "not a number"),
        (f64::INFINITY, 10, "rate_per_sec", "infinite"),
        (1e12, 10, "rate_per_sec", "at most"),
        (100.0, 0, "burst", "at least 1"),
        (50_000.0, 10, "burst", "must be at least 50 "),
    ] {
        let err = Limit::try_new(rate, burst).expect_err("refused");
        assert_eq!(err.setting, setting, "{rate} {burst}");
        assert!(err.to_string().contains(words), "{err}");
    }
    assert!(Limit::try_new(0.5, 1).is_ok(), "a rate below one per second is fine");
    assert!(Limit::try_new(50_000.0, 50).is_ok(), "50 tokens every millisecond");
}

#[test]
fn method_overrides_are_checked_and_found() {
    let default = Limit::try_new(100.0, 10).expect("valid");
    let slow = Limit::try_new(5.0, 1).expect("valid");
    let config = LimiterConfig::try_new(default).expect("valid").with_method("/greeter.v1.Greeter/SayHello", slow);
    config.validate().expect("valid");
    assert_eq!(config.limit_of("/greeter.v1.Greeter/SayHello").rate_per_sec, 5.0);
    assert_eq!(config.limit_of("/greeter.v1.Greeter/SayHelloStream").rate_per_sec, 100.0);

    let bad = LimiterConfig::try_new(default).expect("valid").with_method("SayHello", slow);
    assert_eq!(bad.validate().expect_err("refused").setting, "methods[SayHello]");
    let bad_rate = Limit { rate_per_sec: 0.0, ..slow };
    let bad = LimiterConfig::try_new(default).expect("valid").with_method("/a.B/C", bad_rate);
    assert_eq!(bad.validate().expect_err("refused").setting, "methods[/a.B/C].rate_per_sec");
    let bad = LimiterConfig::try_new(default)
        .expect("valid")
        .with_per_caller(PerCaller::new(CallerKey::Metadata("bad key".into())));
    assert_eq!(bad.validate().expect_err("refused").setting, "per_caller.key");
}

#[test]
fn a_rate_that_whole_millisecond_refills_cannot_match_says_what_it_admits() {
    let limit = Limit::try_new(300.0, 1).expect("valid");
    assert_eq!(limit.effective_rate_per_sec(), 250.0);
    assert_eq!(limit.burst_for_full_rate(), 3, "3 tokens every 10 ms");
    let fine = Limit::try_new(200.0, 20).expect("valid");
    assert_eq!(fine.effective_rate_per_sec(), 200.0);
    assert_eq!(Limit::try_new(0.5, 1).expect("valid").effective_rate_per_sec(), 0.5);
}
