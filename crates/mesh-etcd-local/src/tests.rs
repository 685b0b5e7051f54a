use super::*;
use std::time::Duration;

#[test]
fn cluster_spec_names_every_member_in_initial_cluster() {
    let spec = ClusterSpec::on_ports(std::path::Path::new("/tmp/x"), &[(1, 2), (3, 4), (5, 6)]);
    assert_eq!(spec.initial_cluster(), "m0=http://127.0.0.1:2,m1=http://127.0.0.1:4,m2=http://127.0.0.1:6");
    assert_eq!(spec.client_urls(), ["http://127.0.0.1:1", "http://127.0.0.1:3", "http://127.0.0.1:5"]);
}

#[test]
fn nothing_listening_is_unhealthy() {
    let port = free_port().expect("free port");
    assert!(!is_healthy(&format!("http://127.0.0.1:{port}"), Duration::from_millis(200)));
}

#[test]
fn a_bad_etcd_bin_names_the_variable() {
    let err = crate::find::find_etcd_in(Some("/nonexistent/etcd".into()), None).expect_err("must fail");
    assert!(err.to_string().contains("ETCD_BIN=/nonexistent/etcd is not an executable file"), "{err}");
}

#[test]
fn no_etcd_on_path_says_how_to_get_it() {
    let empty = tempfile::tempdir().expect("tempdir");
    let err = crate::find::find_etcd_in(None, Some(empty.path().into())).expect_err("must fail");
    assert!(err.to_string().contains("apt-get install -y etcd-server"), "{err}");
}
