use proptest::prelude::*;

use super::*;

const PREFIX: &str = "/mesh/services/greeter/";

fn full() -> Instance {
    Instance {
        service: "greeter".into(),
        id: "10.0.0.5:50051".into(),
        addr: "10.0.0.5:50051".into(),
        weight: 100,
        zone: Some("eu-1a".into()),
        version: Some("0.3.0".into()),
        tls: false,
    }
}

#[test]
fn encodes_exactly_the_documented_json() {
    assert_eq!(
        full().encode(),
        r#"{"Op":0,"Addr":"10.0.0.5:50051","Metadata":{"weight":100,"zone":"eu-1a","version":"0.3.0","instance":"10.0.0.5:50051"}}"#
    );
    assert_eq!(full().key("/mesh"), "/mesh/services/greeter/10.0.0.5:50051");
    assert_eq!(full().key("/mesh/"), "/mesh/services/greeter/10.0.0.5:50051");
}

#[test]
fn decodes_what_it_encodes() {
    let i = full();
    assert_eq!(Instance::decode(PREFIX, &i.key("/mesh"), i.encode().as_bytes()), Ok(i));
}

#[test]
fn reads_a_value_written_as_go_writes_it() {
    let got =
        Instance::decode(PREFIX, "/mesh/services/greeter/go-1", br#"{"Op":0,"Addr":"127.0.0.1:9000","Metadata":null}"#)
            .expect("go value");
    assert_eq!(got.addr, "127.0.0.1:9000");
    assert_eq!(got.id, "go-1");
    assert_eq!(got.weight, 1);
    assert_eq!(got.service, "greeter");
    // Go's json omits nothing, but other writers might: no Metadata at all.
    let got = Instance::decode(PREFIX, "/mesh/services/greeter/x", br#"{"Addr":"h:1"}"#).expect("no metadata");
    assert_eq!(got.weight, 1);
    // Go allows any Metadata value; a non-object is ignored.
    let got =
        Instance::decode(PREFIX, "/mesh/services/greeter/x", br#"{"Addr":"h:1","Metadata":"v1"}"#).expect("string");
    assert_eq!(got.weight, 1);
}

#[test]
fn field_names_are_case_insensitive_and_unknown_fields_ignored() {
    let v = br#"{"op":1,"ADDR":"h:7","metadata":{"Weight":3,"ZONE":"z","extra":[1,2]},"Other":true}"#;
    let got = Instance::decode(PREFIX, "/mesh/services/greeter/a", v).expect("tolerant");
    assert_eq!((got.addr.as_str(), got.weight, got.zone.as_deref()), ("h:7", 3, Some("z")));
}

#[test]
fn malformed_values_name_what_is_wrong() {
    let key = "/mesh/services/greeter/a";
    let cases: Vec<(&[u8], &str)> = vec![
        (b"garbage", "not a JSON object"),
        (b"[1,2]", "found an array"),
        (br#"{"Addr":5}"#, "Addr must be a string, found a number"),
        (br#"{"Metadata":{}}"#, "no Addr"),
        (br#"{"Addr":"h:0"}"#, "port 0"),
        (br#"{"Addr":"h"}"#, "has no port"),
        (br#"{"Addr":":80"}"#, "no valid host"),
        (br#"{"Addr":"h:99999"}"#, "no valid port"),
        (br#"{"Addr":"h:1","Metadata":{"weight":"heavy"}}"#, "weight must be a number"),
        (br#"{"Addr":"h:1","Metadata":{"weight":0}}"#, "≥ 1"),
        (br#"{"Addr":"h:1","Metadata":{"weight":-3}}"#, "≥ 1"),
    ];
    for (value, why) in cases {
        let err = Instance::decode(PREFIX, key, value).expect_err(why);
        assert!(err.to_string().contains(why), "{}: {err}", String::from_utf8_lossy(value));
    }
    let huge = vec![b' '; 1 << 20];
    assert_eq!(Instance::decode(PREFIX, key, &huge), Err(DecodeError::TooLarge(1 << 20)));
    for bad_key in ["/mesh/services/greeter/", "/mesh/services/greeter/a/b", "/mesh/services/other/a"] {
        let err = Instance::decode(PREFIX, bad_key, br#"{"Addr":"h:1"}"#).expect_err(bad_key);
        assert!(matches!(err, DecodeError::KeyShape { .. }), "{bad_key}: {err}");
    }
}

#[test]
fn ipv6_addresses_are_fine() {
    assert!(check_addr("[::1]:50051").is_ok());
    assert!(check_addr("[]:50051").is_err());
}

proptest! {
    #[test]
    fn decoding_arbitrary_bytes_never_panics(value in prop::collection::vec(any::<u8>(), 0..512), id in "[a-z0-9:./]{0,20}") {
        let _ = Instance::decode(PREFIX, &format!("{PREFIX}{id}"), &value);
    }

    #[test]
    fn any_valid_instance_round_trips(
        id in "[a-zA-Z0-9._:-]{1,40}",
        host in "[a-z0-9.-]{1,30}",
        port in 1u16..,
        weight in 1u32..1_000_000,
        zone in proptest::option::of("[a-z0-9-]{1,10}"),
    ) {
        let i = Instance { service: "greeter".into(), id, addr: format!("{host}:{port}"), weight, zone, version: None, tls: false };
        prop_assert_eq!(Instance::decode(PREFIX, &i.key("/mesh"), i.encode().as_bytes()), Ok(i));
    }
}

#[test]
fn tls_is_said_in_the_metadata_and_read_back_in_any_spelling() {
    let tls = Instance { tls: true, ..full() };
    assert!(tls.encode().ends_with(r#""instance":"10.0.0.5:50051","tls":true}}"#), "{}", tls.encode());
    assert_eq!(Instance::decode(PREFIX, &tls.key("/mesh"), tls.encode().as_bytes()), Ok(tls));
    for (meta, want) in [(r#"{"tls":"true"}"#, true), (r#"{"TLS":false}"#, false), (r#"{}"#, false)] {
        let value = format!(r#"{{"Addr":"127.0.0.1:1","Metadata":{meta}}}"#);
        let got = Instance::decode(PREFIX, "/mesh/services/greeter/x", value.as_bytes()).expect(meta);
        assert_eq!(got.tls, want, "{meta}");
    }
    let err = Instance::decode(PREFIX, "/mesh/services/greeter/x", br#"{"Addr":"127.0.0.1:1","Metadata":{"tls":1}}"#)
        .expect_err("a number is not a boolean");
    assert!(err.to_string().contains("Metadata.tls"), "{err}");
}
