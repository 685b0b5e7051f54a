//! greeter-client as a user runs it: against a real in-process greeter-server, an
//! unreachable address and bad flags.

use std::process::Command;
use std::time::Duration;

use greeter_client::bench::{self, BenchConfig};
use greeter_server::Greeter;
use mesh_proto::pb::greeter_server::GreeterServer;
use mesh_testkit::TestServer;

fn client() -> Command {
    Command::new(env!("CARGO_BIN_EXE_greeter-client"))
}

#[test]
fn unreachable_server_fails_naming_the_address_without_panic() {
    let out = client().args(["--target", "http://127.0.0.1:1"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach greeter at http://127.0.0.1:1"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // The warning logged on the way is plain text: stderr is a pipe, not a terminal.
    assert!(stderr.contains("WARN") && stderr.contains("is unreachable"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "ANSI escapes in piped logs: {stderr:?}");
}

#[test]
fn bad_flags_name_the_flag() {
    let out = client().args(["--target", "nonsense"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("invalid --target"), "{stderr}");

    let out = client().args(["--strategy", "fastest"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--strategy") && stderr.contains("round_robin"), "{stderr}");

    let out =
        client().args(["--target", "127.0.0.1:1", "--strategy", "weighted", "--weights", "1,2"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--weights has 2 values for 1 targets"), "{stderr}");

    let out = client().args(["bench", "--concurrency", "0"]).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--concurrency"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greets_count_times_and_prints_each_reply() {
    let server = TestServer::serve(GreeterServer::new(Greeter::new("s1"))).await.expect("serve");
    let uri = server.uri();
    let out = tokio::task::spawn_blocking(move || {
        client().args(["--target", &uri, "--name", "mesh", "--count", "3"]).output().expect("run")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("Hello, mesh! (served by s1)").count(), 3, "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_calls_and_reports_ordered_percentiles() {
    let server = TestServer::serve(GreeterServer::new(Greeter::new("s1"))).await.expect("serve");
    let channel = greeter_client::connect(&server.uri()).await.expect("connect");
    let config = BenchConfig {
        concurrency: 4,
        duration: Duration::from_millis(300),
        warmup: Duration::from_millis(100),
        name: "b".into(),
        timeout: Some(Duration::from_secs(1)),
    };
    let report = bench::run(channel, &config).await;
    assert!(report.ok > 0, "{report:?}");
    assert_eq!(report.errors, 0, "{report:?}");
    assert_eq!(report.served_by.get("s1"), Some(&report.ok));
    assert!(report.p50_us <= report.p90_us && report.p90_us <= report.p99_us && report.p99_us <= report.p999_us);
    assert!(report.p999_us <= report.max_us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_counts_failures_by_code_when_the_server_is_killed() {
    let server = TestServer::serve(GreeterServer::new(Greeter::new("s1"))).await.expect("serve");
    let channel = greeter_client::connect(&server.uri()).await.expect("connect");
    server.kill().await;
    let config = BenchConfig {
        concurrency: 2,
        duration: Duration::from_millis(200),
        warmup: Duration::ZERO,
        name: "b".into(),
        timeout: Some(Duration::from_secs(1)),
    };
    let report = bench::run(channel, &config).await;
    assert_eq!(report.ok, 0);
    assert!(report.errors > 0);
    assert!(report.errors_by_code.contains_key("Unavailable"), "{:?}", report.errors_by_code);
}

/// The `--json` report: the last line of stdout.
fn report(stdout: &str) -> serde_json::Value {
    let line =
        stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON report in {stdout}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// Replies per `served_by` in a `--json` report.
fn served_by(report: &serde_json::Value) -> Vec<u64> {
    report["served_by"].as_object().map(|m| m.values().filter_map(|v| v.as_u64()).collect()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_list_is_balanced_and_tabled_and_a_hash_key_sticks() {
    let mut servers = Vec::new();
    for name in ["s1", "s2", "s3"] {
        servers.push(TestServer::serve(GreeterServer::new(Greeter::new(name))).await.expect("serve"));
    }
    let targets = servers.iter().map(|s| s.addr().to_string()).collect::<Vec<_>>().join(",");
    let t = targets.clone();
    let out = tokio::task::spawn_blocking(move || {
        client().args(["--target", &t, "--count", "30", "--quiet"]).output().expect("run")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("strategy round_robin") && stdout.contains("served_by"), "{stdout}");
    assert!(stdout.contains("retries 0 (budget exhausted 0); circuit of greeter closed"), "{stdout}");
    for server in &servers {
        let address = server.addr().to_string();
        let row = stdout.lines().find(|l| l.starts_with(&address)).unwrap_or_else(|| panic!("no row for {address}"));
        assert!(row.split_whitespace().eq([address.as_str(), "10", "0", "ready", "closed"]), "{row}");
    }

    let t = targets.clone();
    let out = tokio::task::spawn_blocking(move || {
        client().args(["--target", &t, "--count", "30", "--quiet", "--json"]).output().expect("run")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = report(&stdout);
    assert_eq!(served_by(&r), [10, 10, 10], "{stdout}");
    assert_eq!(
        (r["calls"].as_u64(), r["failed"].as_u64(), r["strategy"].as_str()),
        (Some(30), Some(0), Some("round_robin"))
    );
    assert_eq!(r["order"].as_array().map(Vec::len), Some(30));
    assert_eq!(r["endpoints"].as_array().map(Vec::len), Some(3));

    let out = tokio::task::spawn_blocking(move || {
        client()
            .args([
                "--target",
                &targets,
                "--count",
                "12",
                "--quiet",
                "--strategy",
                "consistent_hash",
                "--hash-key",
                "user-7",
                "--json",
            ])
            .output()
            .expect("run")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(served_by(&report(&stdout)), [12], "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_target_it_discovers_the_service_in_etcd() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let server = TestServer::serve(GreeterServer::new(Greeter::new("found"))).await.expect("serve");
    let value = format!(r#"{{"Op":0,"Addr":"{}","Metadata":{{"weight":1,"instance":"found"}}}}"#, server.addr());
    etcd.put("/mesh/services/greeter/found", value).await.expect("register");
    let endpoints = etcd.endpoints().join(",");
    let out = tokio::task::spawn_blocking(move || {
        client().args(["--etcd", &endpoints, "--service", "greeter", "--count", "3"]).output().expect("run")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout.matches("(served by found)").count(), 3, "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_errors_say_what_is_missing() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let endpoints = etcd.endpoints().join(",");
    let out = tokio::task::spawn_blocking(move || {
        client().args(["--etcd", &endpoints, "--service", "nobody"]).output().expect("run")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("no servers of nobody are registered in etcd"), "{stderr}");

    let port = mesh_etcd_local::free_port().expect("port");
    let out = tokio::task::spawn_blocking(move || {
        client().args(["--etcd", &format!("127.0.0.1:{port}")]).output().expect("run")
    })
    .await
    .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("cannot discover greeter: no answer from etcd"), "{stderr}");
    assert!(stderr.contains("cargo xtask etcd-up"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_client_serves_metrics_whose_call_counter_moves_between_two_scrapes() {
    use mesh_testkit::prometheus::{scrape, value};
    let server = TestServer::serve(GreeterServer::new(Greeter::new("s1"))).await.expect("serve");
    let uri = server.uri();
    let metrics = format!("127.0.0.1:{}", mesh_etcd_local::free_port().expect("port"));
    let listen = metrics.clone();
    let run = tokio::task::spawn_blocking(move || {
        client()
            .args(["--target", &uri, "--duration", "4s", "--interval", "20ms", "--quiet"])
            .args(["--metrics-listen", &listen])
            .output()
            .expect("run")
    });
    let ok = r#"code="OK""#;
    let method = r#"method="/greeter.v1.Greeter/SayHello""#;
    let first = mesh_testkit::eventually("a first scrape with calls in it", Duration::from_secs(3), || async {
        let samples = scrape(&metrics).await?;
        value(&samples, "mesh_client_calls_total", &[method, ok]).filter(|&n| n > 0.0).map(|n| (n, samples))
    })
    .await
    .expect("scraped");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let second = scrape(&metrics).await.expect("a second scrape");
    let calls = value(&second, "mesh_client_calls_total", &[method, ok]).expect("the call counter");
    assert!(calls > first.0, "the call counter did not move: {} then {calls}", first.0);
    assert_eq!(value(&second, "mesh_endpoint_up", &[]), Some(1.0), "{second:#?}");
    assert!(value(&second, "mesh_endpoint_requests_total", &[]).is_some_and(|n| n > 0.0), "{second:#?}");
    let endpoint = format!(r#"endpoint="{}""#, server.uri().trim_start_matches("http://"));
    assert!(
        value(&second, "mesh_client_endpoint_calls_total", &[&endpoint, method, ok]).is_some_and(|n| n > 0.0),
        "calls by endpoint, method and code: {second:#?}"
    );
    assert_eq!(value(&second, "mesh_breaker_state", &[]), Some(0.0));
    assert_eq!(value(&second, "mesh_retries_total", &[]), Some(0.0));
    assert!(value(&second, "mesh_client_call_duration_seconds_count", &[method]).is_some_and(|n| n >= calls));
    let out = run.await.expect("join");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A server registered by hand in `etcd` that answers after `delay`, and the client's
/// `--etcd` flag value.
async fn registered_slow_server(etcd: &mesh_testkit::Etcd, delay: Duration) -> (TestServer, String) {
    let server = mesh_testkit::NamedGreeter::serve("slow", delay).await.expect("serve");
    let value = format!(r#"{{"Op":0,"Addr":"{}","Metadata":{{"weight":1,"instance":"slow"}}}}"#, server.addr());
    etcd.put("/mesh/services/greeter/slow", value).await.expect("register");
    (server, etcd.endpoints().join(","))
}

/// Runs greeter-client with `args`; the report and stderr.
async fn run_json(args: Vec<String>) -> (serde_json::Value, String) {
    let out = tokio::task::spawn_blocking(move || client().args(&args).arg("--json").output().expect("run"))
        .await
        .expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (report(&String::from_utf8_lossy(&out.stdout)), stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documents_timeout_governs_the_first_call_too() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let (_server, endpoints) = registered_slow_server(&etcd, Duration::from_millis(100)).await;
    etcd.put("/mesh/config/greeter", r#"{"client": {"timeout_ms": 20}}"#).await.expect("document");
    let args = ["--etcd", &endpoints, "--count", "3", "--timeout", "5s"].map(String::from).to_vec();
    let (report, stderr) = run_json(args).await;
    // A 100 ms server and a 20 ms deadline: every call fails, the first one included.
    assert_eq!(report["failed"], 3, "{report}\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_this_clients_flags_make_invalid_is_refused_whole() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let (_server, endpoints) = registered_slow_server(&etcd, Duration::ZERO).await;
    // Valid over the defaults (max_open 30 s), not over --breaker-max-open 10s.
    let document = r#"{"client":{"balancer":{"strategy":"random"},"breaker":{"open_ms":20000},"timeout_ms":5000}}"#;
    etcd.put("/mesh/config/greeter", document).await.expect("document");
    let args = ["--etcd", &endpoints, "--count", "2", "--breaker-max-open", "10s"].map(String::from).to_vec();
    let (report, stderr) = run_json(args).await;
    assert_eq!(report["strategy"], "round_robin", "the strategy of a refused document was applied: {report}");
    assert_eq!(report["failed"], 0, "{report}");
    assert!(stderr.contains("configuration refused") && stderr.contains("max_open_time"), "{stderr}");
}

#[test]
fn flags_that_cannot_work_are_refused_by_name() {
    let refused = |args: &[&str], says: &str| {
        let out = client().args(args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    };
    // Accepted before, and the call succeeded or the flag was ignored.
    refused(&["--target", "127.0.0.1:1", "--timeout", "0s"], "--timeout");
    refused(&["--target", "127.0.0.1:1", "--weights", "0"], "--weights");
    refused(&["--etcd", "127.0.0.1:1", "--weights", "1,2"], "--weights weighs --target addresses");
    refused(&["--target", "127.0.0.1:1,127.0.0.1:2", "--weights", "1,2"], "--strategy weighted only");
    refused(
        &["--target", "127.0.0.1:1", "--timeout", "1s", "--per-try-timeout", "2s"],
        "must be shorter than --timeout",
    );
    refused(&["bench", "--target", "127.0.0.1:1", "--timeout", "0s"], "--timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_json_stdout_is_one_json_document_whatever_fails() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let (_server, endpoints) = registered_slow_server(&etcd, Duration::from_millis(100)).await;
    let args = ["--etcd", &endpoints, "--count", "3", "--timeout", "20ms", "--json", "--table-every", "1ms"];
    let args: Vec<String> = args.map(String::from).to_vec();
    for quiet in [false, true] {
        let mut args = args.clone();
        if quiet {
            args.push("--quiet".into());
        }
        let out = tokio::task::spawn_blocking(move || client().args(&args).output().expect("run")).await.expect("join");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report: serde_json::Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}): {stdout}"));
        assert_eq!(report["failed"], 3, "{report}");
        assert_eq!(out.status.code(), Some(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_exits_1_when_every_call_failed() {
    let etcd = mesh_testkit::Etcd::start().await.expect("etcd");
    let (_server, endpoints) = registered_slow_server(&etcd, Duration::from_millis(100)).await;
    let args = ["bench", "--etcd", &endpoints, "--timeout", "20ms", "--duration", "300ms", "--warmup", "0s", "--json"];
    let args: Vec<String> = args.map(String::from).to_vec();
    let out = tokio::task::spawn_blocking(move || client().args(&args).output().expect("run")).await.expect("join");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "58,857 failed calls exited 0: {stderr}");
    assert!(stderr.contains("every call failed"), "{stderr}");
    let report = report(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(report["ok"], 0, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_does_not_end_a_client_that_runs_for_a_while() {
    let server = TestServer::serve(GreeterServer::new(Greeter::new("s1"))).await.expect("serve");
    let log = tempfile::NamedTempFile::new().expect("log file");
    let mut child = client()
        .args(["health", "--target", &server.uri(), "--duration", "3s", "--every", "100ms", "--json"])
        .env("RUST_LOG", "debug,h2=info,tower=info,hyper=info")
        .stdout(std::process::Stdio::piped())
        .stderr(log.reopen().expect("log handle"))
        .spawn()
        .expect("run");
    let logged = |line: &str| std::fs::read_to_string(log.path()).unwrap_or_default().contains(line);
    // Hang guards, not timing assertions.
    let start = std::time::Instant::now();
    while !logged("SIGHUP handled") {
        assert!(start.elapsed() < Duration::from_secs(60), "no SIGHUP handler in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mesh_etcd_local::signal(child.id(), mesh_etcd_local::Signal::Hup).expect("SIGHUP");
    while !logged("SIGHUP received: nothing to reload") && matches!(child.try_wait(), Ok(None)) {
        assert!(start.elapsed() < Duration::from_secs(60), "SIGHUP not logged in 60 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output()).await.expect("join").expect("wait");
    let logs = std::fs::read_to_string(log.path()).unwrap_or_default();
    // It ran its whole duration and reported, rather than dying of the signal (this
    // server serves no health service, so every answer is UNIMPLEMENTED and it exits 1).
    assert_eq!(out.status.code(), Some(1), "{}:\n{logs}", out.status);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON report");
    assert!(report["checks"].as_u64().unwrap_or(0) > 1, "{report}");
}
