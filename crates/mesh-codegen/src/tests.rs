use super::*;

#[test]
fn checked_in_code_matches_the_protos() {
    let root = workspace_root();
    let files = generate(&root).expect("codegen runs");
    let stale = stale(&root, &files);
    assert!(stale.is_empty(), "checked-in generated code is stale: {stale:?}; run `cargo xtask codegen`");
}

#[test]
fn generation_is_deterministic() {
    let root = workspace_root();
    assert_eq!(generate(&root).expect("first run"), generate(&root).expect("second run"));
}
