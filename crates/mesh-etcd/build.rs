//! Nothing to build: this script exists so that `protoc-bin-vendored` is a build dependency
//! (see Cargo.toml) and `tools/protoc` finds its binary on a machine without protoc.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
