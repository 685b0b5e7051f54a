use std::time::Duration;

use mesh::config::{code_name, parse_code};
use mesh_breaker::BreakerConfig;
use mesh_config::{Document as _, Layers};
use mesh_retry::RetryPolicy;

use super::*;

/// The document as the project's docs show it.
const DOC: &str = r#"{"server":{"limiter":{"rate_per_sec":500,"burst":50,"mode":"reject","methods":{"/greeter.v1.Greeter/SayHello":{"rate_per_sec":200,"burst":20}}},
           "greeting":"Hello, {name}!","log_level":"info"},
 "client":{"balancer":{"strategy":"round_robin","hash_header":"x-mesh-hash-key"},
           "breaker":{"failure_threshold":5,"open_ms":1000,"max_open_ms":30000,"half_open_max_requests":1},
           "retry":{"max_attempts":3,"codes":["UNAVAILABLE"],"budget_percent":20},
           "timeout_ms":1000}}"#;

fn parse(doc: &str) -> Result<GreeterConfig, String> {
    let layers = Layers::defaults(&GreeterConfig::default()).expect("defaults");
    mesh_config::parse::<GreeterConfig>(layers.document(), doc.as_bytes(), "doc").map_err(|e| e.reason)
}

#[test]
fn the_documented_example_is_valid_and_means_what_it_says() {
    let config = parse(DOC).expect("valid");
    let limiter = config.server.limiter.as_ref().expect("limits").limiter_config().expect("valid");
    assert_eq!((limiter.default.rate_per_sec, limiter.default.burst), (500.0, 50));
    assert_eq!(limiter.limit_of("/greeter.v1.Greeter/SayHello").rate_per_sec, 200.0);
    assert_eq!(config.server.service.greet("Ada"), "Hello, Ada!");
    assert_eq!(config.client.strategy().expect("valid"), Some(mesh_balancer::Strategy::RoundRobin));
    let breaker = config.client.breaker(&BreakerConfig::default()).expect("valid");
    assert_eq!((breaker.failure_threshold, breaker.max_open_time), (5, Duration::from_secs(30)));
    let retry = config.client.retry(&RetryPolicy::default()).expect("valid");
    assert_eq!(
        (retry.max_attempts, retry.retry_on.clone(), retry.budget_ratio),
        (3, vec![tonic::Code::Unavailable], 0.2)
    );
    assert_eq!(config.client.timeout().expect("valid"), Some(Duration::from_secs(1)));
    // An empty document is the defaults: no limits, the usual greeting, nothing for clients.
    let empty = parse("{}").expect("valid");
    assert_eq!(empty, GreeterConfig::default());
    empty.validate().expect("the defaults are valid");
}

#[test]
fn bad_settings_are_refused_naming_the_field() {
    for (doc, words) in [
        (r#"{"server":{"limiter":{"rate_per_sec":0}}}"#, "server.limiter: invalid rate limit rate_per_sec"),
        (r#"{"server":{"limiter":{"rate_per_sec":-1}}}"#, "must be above 0"),
        (r#"{"server":{"limiter":{"rate_per_sec":100,"burst":0}}}"#, "burst: is 0"),
        (r#"{"server":{"limiter":{"rate_per_sec":100,"mode":"queue"}}}"#, "mode is \"queue\""),
        (r#"{"server":{"limiter":{"rate_per_sec":100,"per_caller":"tenant"}}}"#, "per_caller"),
        (r#"{"server":{"limiter":{"rate_per_sec":100,"caller_rate_per_sec":5}}}"#, "need per_caller"),
        (
            r#"{"server":{"limiter":{"rate_per_sec":100,"per_caller":"peer-ip","caller_burst":0}}}"#,
            "caller limit: invalid rate limit burst: is 0",
        ),
        (
            r#"{"server":{"limiter":{"rate_per_sec":100,"methods":{"SayHello":{"rate_per_sec":5}}}}}"#,
            "methods[SayHello]",
        ),
        (r#"{"server":{"limiter":{"burst":5}}}"#, "missing field `rate_per_sec`"),
        (r#"{"server":{"greeting":""}}"#, "server.greeting is 0 bytes"),
        (r#"{"server":{"log_level":"loud=="}}"#, "server.log_level"),
        (r#"{"server":{"log_level":"debgu"}}"#, "\"debgu\" is not a level"),
        (r#"{"server":{"log_level":"info,bogus"}}"#, "\"bogus\" is not a level"),
        (r#"{"server":{"colour":"blue"}}"#, "server.colour: unknown field `colour`"),
        (r#"{"client":{"balancer":{"strategy":"fastest"}}}"#, "client.balancer.strategy"),
        (r#"{"client":{"balancer":{"strategy":"consistent_hash","hash_header":"bad header"}}}"#, "hash_header"),
        (r#"{"client":{"breaker":{"failure_threshold":0}}}"#, "client.breaker"),
        (r#"{"client":{"breaker":{"open_ms":5000,"max_open_ms":10}}}"#, "client.breaker"),
        (r#"{"client":{"retry":{"max_attempts":0}}}"#, "client.retry"),
        (r#"{"client":{"retry":{"codes":["SOMETIMES"]}}}"#, "client.retry.codes"),
        (r#"{"client":{"retry":{"budget_percent":150}}}"#, "budget_percent is 150"),
        (r#"{"client":{"timeout_ms":0}}"#, "client.timeout_ms is 0"),
        (r#"{"client":{"timeout_ms":"1s"}}"#, "client.timeout_ms: invalid type"),
    ] {
        let reason = parse(doc).expect_err(doc);
        assert!(reason.contains(words), "{doc}: {reason}");
    }
}

#[test]
fn codes_are_read_by_name_or_number() {
    assert_eq!(parse_code("UNAVAILABLE"), Ok(tonic::Code::Unavailable));
    assert_eq!(parse_code("deadline-exceeded"), Ok(tonic::Code::DeadlineExceeded));
    assert_eq!(parse_code("8"), Ok(tonic::Code::ResourceExhausted));
    assert!(parse_code("17").is_err() && parse_code("sometimes").is_err());
    assert_eq!(code_name(tonic::Code::ResourceExhausted), "resource_exhausted");
}

#[test]
fn a_limiter_section_in_a_document_stands_alone_whatever_the_flags() {
    // A server started with --rate 100 --limit-method: its layers hold a whole limiter.
    let flags = serde_json::json!({"server": {"limiter": {
        "rate_per_sec": 100.0, "methods": {"/greeter.v1.Greeter/SayHello": {"rate_per_sec": 5.0}}
    }}});
    let with_rate =
        Layers::defaults(&GreeterConfig::default()).expect("defaults").patch("the limit flags", flags).expect("flags");
    let defaults = Layers::defaults(&GreeterConfig::default()).expect("defaults");
    let partial = br#"{"server": {"limiter": {"burst": 5}}}"#;
    for (who, layers) in [("config validate", &defaults), ("a server started with --rate", &with_rate)] {
        let err = mesh_config::parse::<GreeterConfig>(layers.document(), partial, "doc").expect_err(who);
        assert!(err.reason.contains("rate_per_sec"), "{who}: {}", err.reason);
    }
    // A whole section replaces the flags' one, methods included.
    let whole = br#"{"server": {"limiter": {"rate_per_sec": 500}}}"#;
    let config = mesh_config::parse::<GreeterConfig>(with_rate.document(), whole, "doc").expect("valid");
    let limiter = config.server.limiter.expect("limits");
    assert_eq!((limiter.rate_per_sec, limiter.methods.len()), (500.0, 0));
    // A document without one keeps the flags' limits.
    let other = br#"{"server": {"greeting": "Hi, {name}"}}"#;
    let config = mesh_config::parse::<GreeterConfig>(with_rate.document(), other, "doc").expect("valid");
    assert_eq!(config.server.limiter.map(|l| l.rate_per_sec), Some(100.0));
}

#[test]
fn a_document_that_depends_on_a_clients_flags_says_so() {
    let config = parse(r#"{"client": {"breaker": {"open_ms": 20000}}}"#).expect("valid over the defaults");
    let notes = config.flag_dependencies();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("--breaker-max-open below 20000ms"), "{notes:?}");
    let config = parse(r#"{"client": {"breaker": {"max_open_ms": 5000}}}"#).expect("valid over the defaults");
    assert!(config.flag_dependencies()[0].contains("--breaker-open above 5000ms"));
    let both = parse(r#"{"client": {"breaker": {"open_ms": 20000, "max_open_ms": 60000}}}"#).expect("valid");
    assert!(both.flag_dependencies().is_empty());
    assert!(parse(DOC).expect("valid").flag_dependencies().is_empty());
}

#[test]
fn a_caller_limit_is_its_own_and_the_servers_stays() {
    let doc = r#"{"server":{"limiter":{"rate_per_sec":100,"per_caller":"metadata:x-tenant","caller_rate_per_sec":5}}}"#;
    let config = parse(doc).expect("valid");
    let limits = config.server.limiter.expect("limits").limiter_config().expect("valid");
    assert_eq!(limits.default.rate_per_sec, 100.0);
    let per_caller = limits.per_caller.expect("per caller");
    let caller = per_caller.limit.expect("a caller limit");
    assert_eq!((caller.rate_per_sec, caller.burst), (5.0, 1));
}
