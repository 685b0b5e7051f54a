//! A live configuration against a real etcd: puts applied, bad documents refused with the
//! last good kept, 1000 rapid updates, etcd down at the start, the document deleted, and
//! etcd rebuilt without it.

use std::sync::Arc;
use std::time::Duration;

use mesh_config::{ConfigStatus, ConfigWatcher, Document, Layers, LiveConfig, config_key};
use mesh_etcd::{Etcd, EtcdOptions};
use serde_json::json;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Server {
    greeting: String,
    rate_per_sec: f64,
    burst: u32,
}

impl Document for Server {
    fn validate(&self) -> Result<(), String> {
        if !(self.rate_per_sec > 0.0 && self.rate_per_sec <= 1e6) {
            return Err(format!("rate_per_sec is {}; it must be above 0 and at most 1e6", self.rate_per_sec));
        }
        Ok(())
    }
}

const KEY: &str = "/mesh/config/greeter";

fn client(etcd: &mesh_testkit::Etcd) -> Etcd {
    Etcd::new(
        EtcdOptions::new(etcd.endpoints())
            .expect("endpoints")
            .with_request_timeout(Duration::from_millis(800))
            .with_connect_timeout(Duration::from_millis(300))
            .with_watch_progress_interval(Duration::from_millis(500)),
    )
}

/// Defaults, and a flag that sets the burst.
fn layers() -> Layers {
    let defaults = Server { greeting: "Hello, {name}!".into(), rate_per_sec: 100.0, burst: 10 };
    Layers::defaults(&defaults).expect("defaults").patch("flags", json!({"burst": 20})).expect("flags")
}

fn watch(etcd: &mesh_testkit::Etcd) -> LiveConfig<Server> {
    ConfigWatcher::<Server>::new(client(etcd), KEY, &layers()).expect("valid layers").spawn()
}

async fn until_status(config: &LiveConfig<Server>, what: &str, check: impl Fn(&ConfigStatus) -> bool) -> ConfigStatus {
    let mut status = config.status();
    let seen = tokio::time::timeout(Duration::from_secs(10), status.wait_for(|s| check(s))).await;
    match seen {
        Ok(Ok(s)) => s.clone(),
        _ => panic!("{what}: status stayed {:?}", config.status().borrow()),
    }
}

#[tokio::test]
async fn a_put_is_applied_over_the_flags_and_bad_documents_are_refused_whole_keeping_the_last_good() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    assert_eq!(config_key("/mesh/", "greeter"), KEY);
    let config = watch(&etcd);
    let base = config.current();
    assert_eq!((base.greeting.as_str(), base.rate_per_sec, base.burst), ("Hello, {name}!", 100.0, 20));

    let good = etcd.put(KEY, r#"{"greeting":"Hi, {name}","rate_per_sec":250}"#).await.expect("put");
    until_status(&config, "applied", |s| s.revision == Some(good)).await;
    let applied = config.current();
    // What the document names changes; the rest stays as the defaults and flags say.
    assert_eq!(*applied, Server { greeting: "Hi, {name}".into(), rate_per_sec: 250.0, burst: 20 });

    for (doc, words) in [
        ("{\"greeting\": ", "not JSON"),
        (r#"{"rate_per_sec": "fast"}"#, "rate_per_sec: invalid type: string \"fast\", expected f64"),
        (r#"{"rate": 5}"#, "unknown field `rate`"),
        (r#"{"rate_per_sec": 0}"#, "rate_per_sec is 0"),
        (r#"{"rate_per_sec": -5}"#, "rate_per_sec is -5"),
        (r#"{"rate_per_sec": "NaN"}"#, "invalid type: string \"NaN\""),
        (r#"{"rate_per_sec": 1e300}"#, "at most 1e6"),
        (r#"{"burst": 99999999999}"#, "burst: invalid value: integer `99999999999`"),
        (r#"{"greeting": "x", "rate_per_sec": 5, "extra": {}}"#, "unknown field `extra`"),
        ("[]", "must be a JSON object"),
    ] {
        let revision = etcd.put(KEY, doc).await.expect("put");
        let status =
            until_status(&config, doc, |s| s.last_rejection.as_ref().is_some_and(|r| r.revision == revision)).await;
        let reason = status.last_rejection.map(|r| r.reason).unwrap_or_default();
        assert!(reason.contains(words), "{doc}: {reason}");
        assert_eq!(status.revision, Some(good), "{doc}: the last good stays applied");
        assert!(Arc::ptr_eq(&config.current(), &applied), "{doc}: the same configuration, untouched");
    }
    // A good one after them is applied; the last refusal stays visible.
    let later = etcd.put(KEY, r#"{"rate_per_sec": 300}"#).await.expect("put");
    let status = until_status(&config, "applied after refusals", |s| s.revision == Some(later)).await;
    assert_eq!(config.current().rate_per_sec, 300.0);
    assert_eq!(status.applied, 2);
    assert!(status.last_rejection.is_some());
}

#[tokio::test]
async fn a_thousand_rapid_updates_end_at_the_last_one_put() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let config = watch(&etcd);
    let writer = client(&etcd);
    let mut last = 0;
    for i in 1..=1000 {
        last = writer.put(KEY, format!(r#"{{"rate_per_sec": {i}}}"#), None).await.expect("put");
    }
    until_status(&config, "the last update", |s| s.revision == Some(last)).await;
    assert_eq!(config.current().rate_per_sec, 1000.0);
}

#[tokio::test]
async fn etcd_down_at_the_start_runs_on_the_flags_and_the_stored_document_applies_when_it_comes() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let stored = etcd.put(KEY, r#"{"greeting": "stored"}"#).await.expect("put");
    etcd.kill(0).expect("kill");
    let config = watch(&etcd);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(config.current().greeting, "Hello, {name}!", "the defaults and flags, at once");
    assert_eq!(config.status().borrow().revision, None);
    etcd.restart(0).await.expect("restart");
    until_status(&config, "applied once etcd came", |s| s.revision == Some(stored)).await;
    assert_eq!(config.current().greeting, "stored");
}

#[tokio::test]
async fn a_deleted_document_goes_back_to_the_flags_and_a_rebuilt_etcd_keeps_the_last_good() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let config = watch(&etcd);
    let first = etcd.put(KEY, r#"{"greeting": "from etcd", "burst": 5}"#).await.expect("put");
    until_status(&config, "applied", |s| s.revision == Some(first)).await;
    assert_eq!(config.current().burst, 5);

    // Deleted on a live etcd: back to the defaults and flags.
    etcd.delete(KEY).await.expect("delete");
    until_status(&config, "back to the flags", |s| s.revision.is_none()).await;
    assert_eq!((config.current().greeting.as_str(), config.current().burst), ("Hello, {name}!", 20));

    // Put again, then etcd rebuilt on an empty data dir: the document is gone, and the
    // configuration in force stays; an outage is not a deletion.
    let second = etcd.put(KEY, r#"{"greeting": "kept"}"#).await.expect("put");
    until_status(&config, "applied again", |s| s.revision == Some(second)).await;
    let resets = config.view().borrow().resets;
    etcd.restart_fresh().await.expect("fresh etcd");
    let mut view = config.view();
    tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| v.resets > resets && v.in_sync))
        .await
        .expect("the watch relisted the fresh etcd")
        .expect("the watch runs");
    assert_eq!(config.current().greeting, "kept");
    assert_eq!(config.status().borrow().revision, Some(second));

    // A document put in the new cluster has a lower revision than the old one, and applies.
    let fresh = etcd.put(KEY, r#"{"greeting": "new cluster"}"#).await.expect("put");
    assert!(fresh < second, "{fresh} < {second}");
    until_status(&config, "applied in the new cluster", |s| s.revision == Some(fresh)).await;
    assert_eq!(config.current().greeting, "new cluster");
}

#[tokio::test]
async fn each_instance_reports_what_it_applied_and_refused_under_its_own_lease() {
    use mesh_config::{AppliedStatus, StatusReport, status_key};

    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let config = watch(&etcd);
    let key = status_key("/mesh", "greeter", "10.0.0.5:50051");
    assert_eq!(key, "/mesh/status/greeter/10.0.0.5:50051");
    let report = StatusReport::spawn(client(&etcd), &key, "10.0.0.5:50051", Duration::from_secs(2), config.status());
    let read = |etcd: &mesh_testkit::Etcd| {
        let etcd_endpoints = etcd.endpoints();
        let key = key.clone();
        async move {
            let c = Etcd::new(EtcdOptions::new(etcd_endpoints).expect("endpoints"));
            let kv = c.get(&key).await.ok().flatten()?;
            serde_json::from_slice::<AppliedStatus>(&kv.value).ok().map(|s| (s, kv.lease))
        }
    };
    let (status, lease) = eventually_some("the first report", || read(&etcd)).await;
    assert_eq!((status.instance.as_str(), status.revision, status.applied), ("10.0.0.5:50051", None, 0));
    assert!(lease != 0, "written under a lease");

    let good = etcd.put(KEY, r#"{"greeting": "reported"}"#).await.expect("put");
    let bad = etcd.put(KEY, r#"{"rate_per_sec": 0}"#).await.expect("put");
    let (status, _) = eventually_some("the refusal reported", || async {
        read(&etcd).await.filter(|(s, _)| s.last_rejection.as_ref().is_some_and(|r| r.revision == bad))
    })
    .await;
    assert_eq!(status.revision, Some(good));
    assert!(status.last_rejection.is_some_and(|r| r.reason.contains("rate_per_sec is 0")));

    // etcd rebuilt: the lease is gone with everything else; the status comes back under a
    // new one, still saying what runs.
    etcd.restart_fresh().await.expect("fresh etcd");
    let (status, _) = eventually_some("reported again in the new cluster", || read(&etcd)).await;
    assert_eq!(status.revision, Some(good));

    report.stop(Duration::from_secs(2)).await.expect("stopped");
    assert!(read(&etcd).await.is_none(), "the key leaves with the lease");
}

/// Polls `check` every 50 ms for up to 10 s.
async fn eventually_some<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    mesh_testkit::eventually(what, Duration::from_secs(10), &mut check).await.expect(what)
}

#[tokio::test]
async fn an_etcd_outage_changes_nothing_and_the_watch_resumes_after_it() {
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let config = watch(&etcd);
    let applied = etcd.put(KEY, r#"{"greeting": "through the outage"}"#).await.expect("put");
    until_status(&config, "applied", |s| s.revision == Some(applied)).await;
    let before = config.current();
    etcd.kill(0).expect("kill");
    let mut view = config.view();
    tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| !v.in_sync))
        .await
        .expect("the outage noticed")
        .expect("watching");
    assert!(Arc::ptr_eq(&config.current(), &before), "no fallback during the outage");
    assert_eq!(config.status().borrow().revision, Some(applied));
    etcd.restart(0).await.expect("restart");
    tokio::time::timeout(Duration::from_secs(10), view.wait_for(|v| v.in_sync))
        .await
        .expect("back in sync")
        .expect("watching");
    assert!(Arc::ptr_eq(&config.current(), &before), "the same document, not applied twice");
    let next = etcd.put(KEY, r#"{"greeting": "after"}"#).await.expect("put");
    until_status(&config, "a put after the outage", |s| s.revision == Some(next)).await;
    assert_eq!(config.status().borrow().applied, 2);
}

#[tokio::test]
async fn after_a_restore_from_a_snapshot_the_older_document_etcd_holds_again_is_applied() {
    // Apply A, snapshot, apply B, restore the snapshot: etcd holds A again, at a revision
    // below B's, with the same cluster id. A listing is the truth: every watcher runs A, as
    // a watcher started afterwards does, so the fleet is not split.
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let a = etcd.put(KEY, r#"{"greeting": "A", "rate_per_sec": 5}"#).await.expect("put A");
    let config = watch(&etcd);
    until_status(&config, "A applied", |s| s.revision == Some(a)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshot = dir.path().join("snap.db");
    etcd.snapshot(&snapshot).await.expect("snapshot");
    let b = etcd.put(KEY, r#"{"greeting": "B", "rate_per_sec": 6}"#).await.expect("put B");
    until_status(&config, "B applied", |s| s.revision == Some(b)).await;
    // The restore and a few writes elsewhere, which move the restored etcd's revision past
    // B's, happen before the watcher lists again: this test's runtime has one thread, held
    // here until they are done. Its revisions then cannot tell that etcd went back.
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Runtime::new().expect("runtime");
                runtime.block_on(async {
                    etcd.restore(&snapshot).await.expect("restore");
                    for i in 0..3 {
                        etcd.put("/mesh/other", i.to_string()).await.expect("put");
                    }
                })
            })
            .join()
            .expect("restore thread");
    });
    assert!(etcd.revision().await.expect("revision") > b, "the restored etcd is past B's revision");
    until_status(&config, "A applied again", |s| s.revision == Some(a)).await;
    assert_eq!(config.current().greeting, "A");
    let fresh = watch(&etcd);
    until_status(&fresh, "a new watcher runs A", |s| s.revision == Some(a)).await;
    assert_eq!(*fresh.current(), *config.current(), "old and new watchers run the same document");
}

/// Runs `work` against `etcd` on a thread of its own while this test's one-thread runtime
/// is held, so that no watcher lists again before it is done.
fn while_watchers_wait(etcd: &mut mesh_testkit::Etcd, work: impl AsyncFnOnce(&mut mesh_testkit::Etcd) + Send) {
    std::thread::scope(|scope| {
        scope
            .spawn(|| tokio::runtime::Runtime::new().expect("runtime").block_on(work(etcd)))
            .join()
            .expect("work thread");
    });
}

#[tokio::test]
async fn after_a_restore_from_a_snapshot_without_the_document_every_watcher_runs_the_flags() {
    // The same cluster, back to before any document: the fleet split, the running servers
    // keeping B ("etcd was rebuilt and holds no document") while new ones ran the flags.
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let config = watch(&etcd);
    until_status(&config, "listed", |s| s.listed).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshot = dir.path().join("snap.db");
    etcd.snapshot(&snapshot).await.expect("snapshot");
    let b = etcd.put(KEY, r#"{"greeting": "B"}"#).await.expect("put B");
    until_status(&config, "B applied", |s| s.revision == Some(b)).await;
    etcd.restore(&snapshot).await.expect("restore");
    until_status(&config, "back to the flags", |s| s.revision.is_none()).await;
    assert_eq!(config.current().greeting, "Hello, {name}!");
    let fresh = watch(&etcd);
    until_status(&fresh, "a new watcher lists", |s| s.listed).await;
    assert_eq!(*fresh.current(), *config.current(), "old and new watchers run the same");
}

#[tokio::test]
async fn a_document_written_after_a_restore_at_the_revision_the_lost_one_had_is_applied() {
    // Apply A, snapshot, apply B (revision r), restore: C, written before the watcher lists
    // again, gets revision r too. Told apart by revision alone, watchers kept B.
    let mut etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let a = etcd.put(KEY, r#"{"greeting": "A"}"#).await.expect("put A");
    let config = watch(&etcd);
    until_status(&config, "A applied", |s| s.revision == Some(a)).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let snapshot = dir.path().join("snap.db");
    etcd.snapshot(&snapshot).await.expect("snapshot");
    let b = etcd.put(KEY, r#"{"greeting": "B"}"#).await.expect("put B");
    until_status(&config, "B applied", |s| s.revision == Some(b)).await;
    let mut c = 0;
    while_watchers_wait(&mut etcd, async |etcd| {
        etcd.restore(&snapshot).await.expect("restore");
        while etcd.revision().await.expect("revision") + 1 < b {
            etcd.put("/mesh/other", "x").await.expect("put");
        }
        c = etcd.put(KEY, r#"{"greeting": "C"}"#).await.expect("put C");
    });
    assert_eq!(c, b, "C has the revision B had");
    until_status(&config, "C applied", |s| s.applied == 3).await;
    assert_eq!(config.current().greeting, "C");
}

#[tokio::test]
async fn a_status_key_deleted_or_overwritten_is_written_again_under_the_registrations_lease() {
    use mesh_config::{AppliedStatus, StatusReport, status_key};

    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let config = watch(&etcd);
    let key = status_key("/mesh", "greeter", "s7");
    let lease = etcd.grant(30).await.expect("lease");
    let (_registration, held) = tokio::sync::watch::channel(Some(lease));
    let _report = StatusReport::spawn_under(client(&etcd), &key, "s7", config.status(), held);
    let c = client(&etcd);
    let read = || async {
        let kv = c.get(&key).await.ok().flatten()?;
        let status = serde_json::from_slice::<AppliedStatus>(&kv.value).ok()?;
        (status.instance == "s7" && status.applied == 0 && kv.lease == lease).then_some(())
    };
    eventually_some("the first report", read).await;
    etcd.delete(&key).await.expect("delete");
    eventually_some("written again after a delete", read).await;
    etcd.put(&key, r#"{"instance":"s7","revision":1,"applied":99,"last_rejection":null}"#).await.expect("overwrite");
    eventually_some("written again after an overwrite", read).await;
}

/// Found by the randomized checker on a busy machine (seed 2329666074, 3 members, a
/// snapshot restored): a registration that puts its own key back under the same lease
/// says "none" and then that lease again; a status key deleted in between was never
/// written again, as its deletion was seen while the registration held nothing.
#[tokio::test]
async fn a_status_key_deleted_while_the_registration_holds_nothing_is_written_when_it_holds_its_lease_again() {
    use mesh_config::{AppliedStatus, StatusReport, status_key};

    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let config = watch(&etcd);
    let key = status_key("/mesh", "greeter", "s8");
    let lease = etcd.grant(30).await.expect("lease");
    let (registration, held) = tokio::sync::watch::channel(Some(lease));
    let _report = StatusReport::spawn_under(client(&etcd), &key, "s8", config.status(), held);
    let c = client(&etcd);
    let read = || async {
        let kv = c.get(&key).await.ok().flatten()?;
        let status = serde_json::from_slice::<AppliedStatus>(&kv.value).ok()?;
        (status.instance == "s8" && kv.lease == lease).then_some(())
    };
    eventually_some("the first report", read).await;
    // The registration puts its key back: it holds nothing for a moment, and the status
    // key goes meanwhile (a restore, or an operator).
    registration.send_replace(None);
    etcd.delete(&key).await.expect("delete");
    // Time for the deletion to reach the report while it is told of no lease; on a slow
    // machine the report may see it only after the lease is back, which passes either way.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(c.get(&key).await.expect("get").is_none(), "not written while the registration holds nothing");
    registration.send_replace(Some(lease));
    eventually_some("written again once the registration holds its lease", read).await;
}
