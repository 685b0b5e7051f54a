//! The testkit's etcd helpers, proven against the real etcd binary.

use std::time::Duration;

use mesh_testkit::Etcd;

#[tokio::test]
async fn put_survives_restart_on_the_same_data_dir() {
    let mut etcd = Etcd::start().await.expect("etcd starts");
    etcd.put("/t/k", "v1").await.expect("put");
    etcd.restart(0).await.expect("restart");
    assert_eq!(etcd.get("/t/k").await.expect("get").as_deref(), Some("v1"));
}

#[tokio::test]
async fn put_is_gone_after_restart_on_a_fresh_data_dir() {
    let mut etcd = Etcd::start().await.expect("etcd starts");
    let endpoint = etcd.endpoint(0);
    for i in 0..5 {
        etcd.put(&format!("/t/{i}"), "v").await.expect("put");
    }
    let before = etcd.revision().await.expect("revision");
    etcd.restart_fresh().await.expect("fresh restart");
    assert_eq!(etcd.endpoint(0), endpoint, "same port after a fresh restart");
    assert_eq!(etcd.get("/t/0").await.expect("get"), None);
    let after = etcd.revision().await.expect("revision");
    assert!(after < before, "a fresh cluster starts its revisions again: {after} < {before}");
}

#[tokio::test]
async fn kill_9_then_restart_keeps_data() {
    let mut etcd = Etcd::start().await.expect("etcd starts");
    etcd.put("/t/k", "v").await.expect("put");
    let pid = etcd.pid(0).expect("running");
    etcd.kill(0).expect("kill");
    assert_eq!(etcd.pid(0), None);
    assert!(etcd.get("/t/k").await.is_err(), "a killed etcd answers nothing");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || !proc_is_running(pid));
    etcd.restart(0).await.expect("restart");
    assert_eq!(etcd.get("/t/k").await.expect("get").as_deref(), Some("v"));
}

fn proc_is_running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

#[tokio::test]
async fn a_paused_member_answers_nothing_until_resumed() {
    let mut etcd = Etcd::start().await.expect("etcd starts");
    etcd.put("/t/k", "v").await.expect("put");
    etcd.pause(0).expect("pause");
    let url = etcd.endpoint(0);
    let healthy = tokio::task::spawn_blocking(move || mesh_etcd_local::is_healthy(&url, Duration::from_millis(300)))
        .await
        .expect("join");
    assert!(!healthy, "a SIGSTOPped etcd must not answer /health");
    etcd.resume(0).expect("resume");
    etcd.wait_healthy(Duration::from_secs(10)).await.expect("healthy again");
    assert_eq!(etcd.get("/t/k").await.expect("get").as_deref(), Some("v"));
}

#[tokio::test]
async fn compaction_makes_old_revisions_unreadable() {
    let etcd = Etcd::start().await.expect("etcd starts");
    let first = etcd.put("/t/k", "v1").await.expect("put");
    let second = etcd.put("/t/k", "v2").await.expect("put");
    etcd.compact(second).await.expect("compact");
    let err = etcd.get_at("/t/k", first).await.expect_err("compacted revision");
    assert!(err.to_string().contains("compacted"), "{err}");
    assert_eq!(etcd.get("/t/k").await.expect("get").as_deref(), Some("v2"));
}

#[tokio::test]
async fn get_prefix_lists_keys_in_order_with_their_revisions() {
    let etcd = Etcd::start().await.expect("etcd starts");
    etcd.put("/p/b", "2").await.expect("put");
    let rev_a = etcd.put("/p/a", "1").await.expect("put");
    etcd.put("/q/c", "3").await.expect("put");
    let kvs = etcd.get_prefix("/p/").await.expect("prefix");
    let keys: Vec<&str> = kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/p/a", "/p/b"]);
    assert_eq!(kvs[0].mod_revision, rev_a);
    assert_eq!(etcd.delete("/p/a").await.expect("delete"), 1);
    assert_eq!(etcd.get_prefix("/p/").await.expect("prefix").len(), 1);
}

#[tokio::test]
async fn three_member_cluster_elects_a_new_leader_after_its_leader_is_killed() {
    let mut etcd = Etcd::start_cluster(3).await.expect("cluster starts");
    assert_eq!(etcd.endpoints().len(), 3);
    etcd.put("/t/before", "1").await.expect("put");
    let leader = etcd.leader().await.expect("a leader");
    etcd.kill(leader).expect("kill leader");
    let new_leader =
        mesh_testkit::eventually("a new leader", Duration::from_secs(15), || async { etcd.leader().await.ok() })
            .await
            .expect("new leader elected");
    assert_ne!(new_leader, leader);
    etcd.put("/t/after", "2").await.expect("the cluster accepts writes with 2 of 3 members");
    assert_eq!(etcd.get("/t/before").await.expect("get").as_deref(), Some("1"));
    etcd.restart(leader).await.expect("old leader rejoins");
    assert_eq!(etcd.get("/t/after").await.expect("get").as_deref(), Some("2"));
}
