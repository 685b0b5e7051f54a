use super::*;

#[test]
fn names_parse_back_to_their_strategy() {
    for s in [
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::consistent_hash(),
        Strategy::Weighted,
        Strategy::P2c(P2cLoad::InFlight),
        Strategy::P2c(P2cLoad::PeakEwma { decay: Duration::from_secs(10) }),
    ] {
        assert_eq!(s.name().parse::<Strategy>(), Ok(s.clone()), "{s}");
    }
    assert_eq!("Round-Robin".parse::<Strategy>(), Ok(Strategy::RoundRobin));
}

#[test]
fn an_unknown_name_lists_the_known_ones() {
    let err = "fastest".parse::<Strategy>().expect_err("unknown");
    assert!(err.to_string().contains("round_robin, random, consistent_hash, weighted, p2c"), "{err}");
}

#[test]
fn hash_config_rejects_bad_headers_and_vnode_counts() {
    assert!(HashConfig::try_new("x-user", 160, MissingKey::Random).is_ok());
    assert_eq!(
        HashConfig::try_new("bad header", 160, MissingKey::Random),
        Err(InvalidStrategy::BadHeader("bad header".into()))
    );
    assert_eq!(HashConfig::try_new("x", 0, MissingKey::Random), Err(InvalidStrategy::BadVirtualNodes(0)));
    assert_eq!(HashConfig::try_new("x", 10_001, MissingKey::Random), Err(InvalidStrategy::BadVirtualNodes(10_001)));
}

#[test]
fn defaults_are_the_documented_ones() {
    let cfg = HashConfig::default();
    assert_eq!(cfg.header.as_str(), DEFAULT_HASH_HEADER);
    assert_eq!(cfg.virtual_nodes, 160);
    assert_eq!(cfg.on_missing_key, MissingKey::Random);
    assert_eq!(Strategy::default(), Strategy::RoundRobin);
}
