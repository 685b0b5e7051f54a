use super::*;

#[test]
fn a_limit_with_twenty_thousand_methods_is_one_short_log_line() {
    let mut config =
        mesh_limiter::LimiterConfig::try_new(mesh_limiter::Limit::try_new(500.0, 50).expect("limit")).expect("config");
    for i in 0..20_000 {
        config = config.with_method(
            format!("/billing.v1.Billing/Method{i:05}"),
            mesh_limiter::Limit::try_new(10.0, 1).expect("limit"),
        );
    }
    let line = describe(&config);
    assert!(line.len() < 600, "{} bytes: {line:.300}", line.len());
    assert!(line.ends_with("; and 19995 more method limits"), "{line}");
    assert!(line.contains("/billing.v1.Billing/Method00000 10/s"), "{line}");
}
