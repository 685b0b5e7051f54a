//! The inventory example end to end, as its user runs it: three `inventory-server`
//! processes registered in a real etcd, and a client built with `mesh::Client::builder`
//! balancing over them. `Reserve` is never retried when its server is killed mid-call;
//! `Get` is; a live change of the service's own section and of the limiter is applied; a
//! SIGTERMed server loses no call.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use inventory::pb::{GetRequest, Item, ReserveRequest, inventory_client::InventoryClient};
use inventory::{IDEMPOTENT, InventorySection};
use mesh::client::MeshChannel;
use tonic::Code;

/// One inventory-server process; killed when dropped.
struct Server {
    id: String,
    child: Option<Child>,
}

impl Server {
    fn start(etcd: &mesh_testkit::Etcd, id: &str, delay: &str) -> Server {
        let port = mesh_etcd_local::free_port().expect("a free port");
        let child = Command::new(env!("CARGO_BIN_EXE_inventory-server"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--instance-id", id, "--ttl", "2s"])
            .args(["--shutdown-grace", "500ms", "--drain-timeout", "5s", "--delay", delay])
            .args(["--etcd", &etcd.endpoints().join(",")])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start inventory-server");
        Server { id: id.to_string(), child: Some(child) }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn terminate(&mut self) -> Child {
        let child = self.child.take().expect("running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
            .expect("SIGTERM");
        child
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

const SERVICES: &str = "/mesh/services/inventory/";

/// Three servers, registered.
async fn three(etcd: &mesh_testkit::Etcd, delay: &str) -> Vec<Server> {
    let servers: Vec<Server> = ["s0", "s1", "s2"].iter().map(|id| Server::start(etcd, id, delay)).collect();
    mesh_testkit::eventually("three servers registered", Duration::from_secs(20), || async {
        (etcd.get_prefix(SERVICES).await.ok()?.len() == 3).then_some(())
    })
    .await
    .expect("registered");
    servers
}

/// The client as the example's `main` builds it.
async fn client(etcd: &mesh_testkit::Etcd) -> mesh::Client {
    mesh::Client::builder("inventory")
        .section::<InventorySection>()
        .etcd(mesh::etcd(&etcd.endpoints().join(",")).expect("etcd"))
        .idempotent(IDEMPOTENT)
        .timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("client")
}

/// Calls Get until every one of `ids` has answered (bounded), so that the balancer has a
/// connection to each.
async fn reach(inventory: &mut InventoryClient<MeshChannel>, ids: &[&str]) -> Vec<Item> {
    let mut seen: Vec<Item> = Vec::new();
    for _ in 0..60 {
        let item = inventory.get(GetRequest { sku: "apple".into() }).await.expect("get").into_inner();
        if !seen.iter().any(|s| s.served_by == item.served_by) {
            seen.push(item);
        }
        if ids.iter().all(|id| seen.iter().any(|s| s.served_by == *id)) {
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("not every one of {ids:?} answered: {:?}", seen.iter().map(|s| &s.served_by).collect::<Vec<_>>());
}

#[tokio::test]
async fn get_is_retried_and_reserve_never_is_when_a_server_is_killed_mid_call() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let mut servers = three(&etcd, "600ms").await;
    let client = client(&etcd).await;
    let mut inventory = InventoryClient::new(client.channel());
    reach(&mut inventory, &["s0", "s1", "s2"]).await;

    // Three Gets at once, one on each server; s0 dies with its Get in flight.
    let gets: Vec<_> = (0..3)
        .map(|_| {
            let mut inventory = inventory.clone();
            tokio::spawn(async move { inventory.get(GetRequest { sku: "apple".into() }).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    servers[0].kill();
    for get in gets {
        let item = get.await.expect("task").expect("a Get is retried on another server").into_inner();
        assert_ne!(item.served_by, "s0");
    }
    assert!(client.retries.retries() >= 1, "the Get on s0 was retried");

    // Once s0 has left the set, two Reserves at once, one on each server; s1 dies with its
    // Reserve in flight, which fails and is not run again elsewhere.
    mesh_testkit::eventually("s0 gone from the client's set", Duration::from_secs(20), || async {
        (!client.balanced.endpoints().iter().any(|e| e.id == "s0")).then_some(())
    })
    .await
    .expect("s0 gone");
    reach(&mut inventory, &["s1", "s2"]).await;
    let retries_before = client.retries.retries();
    let reserves: Vec<_> = (0..2)
        .map(|_| {
            let mut inventory = inventory.clone();
            tokio::spawn(async move { inventory.reserve(ReserveRequest { sku: "apple".into(), quantity: 1 }).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    servers[1].kill();
    let mut outcomes = Vec::new();
    for reserve in reserves {
        outcomes.push(reserve.await.expect("task").map(|r| r.into_inner().served_by).map_err(|s| s.code()));
    }
    assert_eq!(outcomes.iter().filter(|o| o.as_ref().is_ok_and(|by| by == "s2")).count(), 1, "{outcomes:?}");
    assert!(
        outcomes.iter().any(|o| matches!(o, Err(Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal))),
        "the Reserve on s1 fails: {outcomes:?}"
    );
    assert_eq!(client.retries.retries(), retries_before, "no Reserve is retried");
    // s2, the one server left, made exactly its own reservation.
    let items = reach(&mut inventory, &["s2"]).await;
    assert_eq!(items[0].reservations, 1, "s2 ran one Reserve, not the one s1 took too");
    drop(servers);
}

/// Waits until every instance reports the document at `revision` applied.
async fn applied(etcd: &mesh_testkit::Etcd, ids: &[&str], revision: i64) {
    mesh_testkit::eventually("the document applied by every instance", Duration::from_secs(20), || async {
        for id in ids {
            let status = etcd.get(&format!("/mesh/status/inventory/{id}")).await.ok()??;
            let status: serde_json::Value = serde_json::from_str(&status).ok()?;
            if status["revision"].as_i64() != Some(revision) {
                return None;
            }
        }
        Some(())
    })
    .await
    .expect("applied");
}

#[tokio::test]
async fn its_own_section_and_the_limiter_apply_live_and_a_sigterm_loses_no_call() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let mut servers = three(&etcd, "0s").await;
    let client = client(&etcd).await;
    let mut inventory = InventoryClient::new(client.channel());
    reach(&mut inventory, &["s0", "s1", "s2"]).await;
    let reserve = |quantity| ReserveRequest { sku: "pear".into(), quantity };

    // The service's own section: at most 2 units a reservation.
    let ids = ["s0", "s1", "s2"];
    let doc = r#"{"server": {"max_per_reservation": 2}}"#;
    applied(&etcd, &ids, etcd.put("/mesh/config/inventory", doc).await.expect("put")).await;
    for _ in 0..3 {
        let refused = inventory.reserve(reserve(3)).await.expect_err("over the maximum");
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().contains("server.max_per_reservation"), "{}", refused.message());
        inventory.reserve(reserve(2)).await.expect("within it");
    }

    // The limiter: one Reserve per server, and then none for a hundred seconds.
    let doc = r#"{"server": {"max_per_reservation": 2, "limiter": {"rate_per_sec": 1000,
                  "methods": {"/inventory.v1.Inventory/Reserve": {"rate_per_sec": 0.01, "burst": 1}}}}}"#;
    applied(&etcd, &ids, etcd.put("/mesh/config/inventory", doc).await.expect("put")).await;
    let mut admitted = 0;
    let mut limited = 0;
    for _ in 0..9 {
        match inventory.reserve(reserve(1)).await {
            Ok(_) => admitted += 1,
            Err(s) if s.code() == Code::ResourceExhausted => limited += 1,
            Err(s) => panic!("unexpected {s:?}"),
        }
    }
    assert_eq!((admitted, limited), (3, 6), "one Reserve per server's bucket, not retried");

    // SIGTERM one server while Gets flow: none fails, and it exits cleanly.
    let mut calls = 0;
    let mut child = None;
    for i in 0..400 {
        if i == 20 {
            child = Some(servers[2].terminate());
        }
        inventory.get(GetRequest { sku: "pear".into() }).await.expect("no call fails during a graceful shutdown");
        calls += 1;
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            assert!(status.success(), "s2 exited with {status}");
            if i > 60 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = child.expect("terminated").wait().expect("wait");
    assert!(status.success(), "s2 exited with {status}");
    assert!(calls > 20, "{calls} calls");
    assert!(etcd.get(&format!("{SERVICES}{}", servers[2].id)).await.expect("get").is_none(), "s2 deregistered");
}
