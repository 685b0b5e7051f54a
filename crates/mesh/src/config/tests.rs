use mesh_config::{Document as _, Layers};
use proptest::prelude::*;

use super::*;

/// A service section like the Greeter's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Greeting {
    greeting: String,
    shout: bool,
}

impl Default for Greeting {
    fn default() -> Self {
        Greeting { greeting: "Hello, {name}!".into(), shout: false }
    }
}

impl ServiceSection for Greeting {
    fn validate(&self) -> Result<(), String> {
        if self.greeting.is_empty() { Err("greeting is empty".into()) } else { Ok(()) }
    }
}

fn parse<S: ServiceSection>(doc: &str) -> Result<Config<S>, String> {
    let layers = Layers::defaults(&Config::<S>::default()).expect("defaults");
    mesh_config::parse::<Config<S>>(layers.document(), doc.as_bytes(), "doc").map_err(|e| e.reason)
}

#[test]
fn a_services_own_fields_sit_beside_meshs_in_the_server_section() {
    let doc = r#"{"server": {"greeting": "Hi, {name}", "limiter": {"rate_per_sec": 50}, "log_level": "debug"}}"#;
    let config = parse::<Greeting>(doc).expect("valid");
    assert_eq!(config.server.service, Greeting { greeting: "Hi, {name}".into(), shout: false });
    assert_eq!(config.server.limiter.map(|l| l.rate_per_sec), Some(50.0));
    assert_eq!(config.server.log_level.as_deref(), Some("debug"));
    // Left out, the service's fields keep their defaults.
    assert_eq!(parse::<Greeting>("{}").expect("valid"), Config::default());
}

#[test]
fn a_wrong_field_of_either_part_names_its_path() {
    for (doc, words) in [
        (r#"{"server": {"colour": "blue"}}"#, "unknown field `colour`"),
        (r#"{"server": {"greeting": 5}}"#, "server.greeting: invalid type"),
        (r#"{"server": {"shout": "yes"}}"#, "server.shout: invalid type"),
        (r#"{"server": {"greeting": ""}}"#, "server.greeting is empty"),
        (r#"{"server": {"limiter": {"rate_per_sec": "x"}}}"#, "server.limiter.rate_per_sec: invalid type"),
        (r#"{"server": {"limiter": {"rate_per_sec": 0}}}"#, "server.limiter: invalid rate limit"),
        (r#"{"server": {"log_level": 3}}"#, "server.log_level: invalid type"),
        (r#"{"server": 3}"#, "server: invalid type"),
        (r#"{"client": {"timeout_ms": 0}}"#, "client.timeout_ms is 0"),
    ] {
        let reason = parse::<Greeting>(doc).expect_err(doc);
        assert!(reason.contains(words), "{doc}: {reason}");
    }
}

#[test]
fn a_service_with_no_section_refuses_any_field_of_its_own_and_a_client_that_does_not_know_takes_any() {
    let doc = r#"{"server": {"greeting": "Hi"}, "client": {"timeout_ms": 200}}"#;
    let reason = parse::<NoSection>(doc).expect_err("no such field");
    assert!(reason.contains("unknown field `greeting`"), "{reason}");
    let config = parse::<AnySection>(doc).expect("unread");
    assert_eq!(config.client.timeout_ms, Some(200));
    assert_eq!(config.server.service.0.get("greeting"), Some(&Value::from("Hi")));
    // The client section is checked in full either way.
    assert!(parse::<AnySection>(r#"{"client": {"colour": 1}}"#).is_err());
    // And a server section that is not an object is refused by all.
    assert!(parse::<AnySection>(r#"{"server": []}"#).is_err());
}

#[test]
fn a_section_that_takes_a_name_of_meshs_cannot_be_serialized() {
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    struct Clash {
        limiter: u32,
    }
    impl ServiceSection for Clash {}
    let err = serde_json::to_value(Config::<Clash>::default()).expect_err("clash");
    assert!(err.to_string().contains("may not have a field named limiter"), "{err}");
}

#[test]
fn the_defaults_are_valid_for_every_section() {
    Config::<NoSection>::default().validate().expect("valid");
    Config::<AnySection>::default().validate().expect("valid");
    Config::<Greeting>::default().validate().expect("valid");
}

/// A server section as the naive model sees it: mesh's two fields, and everything else
/// the service's, in the order given.
fn naive_split(fields: &[(String, Value)]) -> (Option<Value>, Option<Value>, serde_json::Map<String, Value>) {
    let mut limiter = None;
    let mut log_level = None;
    let mut rest = serde_json::Map::new();
    for (k, v) in fields {
        match k.as_str() {
            "limiter" => limiter = Some(v.clone()),
            "log_level" => log_level = Some(v.clone()),
            _ => {
                rest.insert(k.clone(), v.clone());
            }
        }
    }
    (limiter, log_level, rest)
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![Just("limiter".to_string()), Just("log_level".to_string()), "[a-z_]{1,8}"]
}

fn plain_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i32>().prop_map(Value::from),
        "[ -~]{0,8}".prop_map(Value::from),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever the fields, the section splits as the naive model says, and back.
    #[test]
    fn the_server_section_splits_as_the_naive_model_says(
        fields in proptest::collection::btree_map(field_name(), plain_value(), 0..8),
        level in proptest::option::of("(info|debug|warn)"),
    ) {
        let mut fields: Vec<(String, Value)> = fields.into_iter().collect();
        // mesh's fields with values of their types, so that the split is all that is tested.
        for (k, v) in &mut fields {
            match k.as_str() {
                "limiter" => *v = serde_json::json!({"rate_per_sec": 10.0}),
                "log_level" => *v = level.clone().map_or(Value::Null, Value::from),
                _ => {}
            }
        }
        let object: serde_json::Map<String, Value> = fields.iter().cloned().collect();
        let section: ServerSection<AnySection> =
            serde_json::from_value(Value::Object(object.clone())).expect("any fields");
        let (limiter, log_level, rest) = naive_split(&fields);
        prop_assert_eq!(section.limiter.is_some(), limiter.is_some_and(|v| !v.is_null()));
        prop_assert_eq!(section.log_level.clone().map(Value::from), log_level.filter(|v| !v.is_null()));
        prop_assert_eq!(&section.service.0, &rest);
        // Serialized, it is the same object, with mesh's fields always present.
        let mut expected = object;
        expected.entry("limiter").or_insert(Value::Null);
        expected.entry("log_level").or_insert(Value::Null);
        let back = serde_json::to_value(&section).expect("serializes");
        let mut back = back.as_object().cloned().expect("an object");
        if let Some(l) = back.get_mut("limiter").filter(|l| !l.is_null()) {
            *l = serde_json::json!({"rate_per_sec": 10.0});
        }
        prop_assert_eq!(back, expected);
    }
}
