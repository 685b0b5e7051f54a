use serde_json::json;

use super::*;
use crate::parse;

#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Doc {
    greeting: String,
    limiter: Limiter,
}

#[derive(Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Limiter {
    rate_per_sec: f64,
    burst: u32,
}

impl Document for Doc {
    fn validate(&self) -> Result<(), String> {
        if self.limiter.rate_per_sec > 0.0 {
            Ok(())
        } else {
            Err(format!("limiter.rate_per_sec is {}; it must be above 0", self.limiter.rate_per_sec))
        }
    }
}

fn defaults() -> Doc {
    Doc { greeting: "Hello, {name}!".into(), limiter: Limiter { rate_per_sec: 100.0, burst: 10 } }
}

#[test]
fn each_layer_replaces_only_the_fields_it_sets() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml_file = dir.path().join("greeter.toml");
    std::fs::write(&toml_file, "greeting = \"Hi, {name}\"\n[limiter]\nburst = 20\n").expect("write");
    let layers = Layers::defaults(&defaults())
        .expect("defaults")
        .file(&toml_file)
        .expect("toml")
        .patch("flags", json!({"limiter": {"rate_per_sec": 50.0}}))
        .expect("flags");
    let doc: Doc = layers.build().expect("valid");
    assert_eq!(doc, Doc { greeting: "Hi, {name}".into(), limiter: Limiter { rate_per_sec: 50.0, burst: 20 } });

    // A document over them: only what it names changes; null removes (back to the default).
    let over: Doc = parse(layers.document(), br#"{"limiter":{"burst":5},"greeting":null}"#, "doc").expect("valid");
    assert_eq!(over, Doc { greeting: String::new(), limiter: Limiter { rate_per_sec: 50.0, burst: 5 } });
}

#[test]
fn bad_layers_and_documents_are_refused_naming_the_origin_and_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json_file = dir.path().join("greeter.json");
    std::fs::write(&json_file, "{\"greeting\": ").expect("write");
    let err = Layers::defaults(&defaults()).expect("defaults").file(&json_file).expect_err("truncated");
    assert!(err.origin.ends_with("greeter.json") && err.reason.starts_with("not JSON"), "{err}");
    let missing = Layers::default().file(dir.path().join("none.toml")).expect_err("missing");
    assert!(missing.to_string().contains("none.toml"), "{missing}");

    let base = Layers::defaults(&defaults()).expect("defaults");
    for (doc, words) in [
        (&b"{\"greeting\": "[..], "not JSON"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (br#"{"limiter": {"rate_per_sec": "fast"}}"#, "limiter.rate_per_sec: invalid type: string \"fast\""),
        (br#"{"limiter": {"rate": 5}}"#, "limiter.rate: unknown field `rate`, expected `rate_per_sec` or `burst`"),
        (br#"{"colour": "blue"}"#, "unknown field `colour`"),
        (br#"{"limiter": {"rate_per_sec": 0}}"#, "limiter.rate_per_sec is 0; it must be above 0"),
        (br#"{"limiter": {"rate_per_sec": -5}}"#, "must be above 0"),
        (br#"{"limiter": {"burst": 1e12}}"#, "limiter.burst: invalid type: floating point"),
        (br#"{"limiter": {"rate_per_sec": 1e999}}"#, "not JSON"),
    ] {
        let err = parse::<Doc>(base.document(), doc, "/mesh/config/greeter at revision 7").expect_err("refused");
        assert_eq!(err.origin, "/mesh/config/greeter at revision 7");
        assert!(err.reason.contains(words), "{}: {}", String::from_utf8_lossy(doc), err.reason);
    }
}

#[test]
fn merge_follows_json_merge_patch() {
    let mut target = json!({"a": {"b": 1, "c": 2}, "d": [1, 2], "e": "x"});
    merge(&mut target, &json!({"a": {"b": null, "f": 3}, "d": [3], "e": {"g": 1}}));
    assert_eq!(target, json!({"a": {"c": 2, "f": 3}, "d": [3], "e": {"g": 1}}));
}
