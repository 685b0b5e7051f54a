//! Every builder setting is checked when `build` is called: a bad one is an error that names
//! it (the flag and its variable when the flags made the builder), and nothing panics or
//! binds a port first.

use std::time::Duration;

use clap::Parser;
use mesh::config::{LimiterSection, NoSection};

/// A server builder's error, as its caller sees it.
async fn server_error(builder: mesh::ServerBuilder) -> String {
    let err = builder.shutdown_on(std::future::pending()).build().await.expect_err("refused");
    format!("{err:#}")
}

fn limiter(rate: f64) -> LimiterSection {
    LimiterSection {
        rate_per_sec: rate,
        burst: None,
        mode: "reject".into(),
        max_wait_ms: 100,
        per_caller: None,
        caller_rate_per_sec: None,
        caller_burst: None,
        methods: Default::default(),
    }
}

#[tokio::test]
async fn each_bad_server_setting_is_refused_naming_it() {
    let free = || mesh::Server::builder("billing").listen("127.0.0.1:0".parse().expect("addr"));
    let dir = tempfile::tempdir().expect("dir");
    let bad_file = dir.path().join("bad.json");
    std::fs::write(&bad_file, r#"{"server": {"colour": 1}}"#).expect("write");
    let cases: Vec<(mesh::ServerBuilder, &str)> = vec![
        (mesh::Server::builder("billing/v1"), "service name"),
        (mesh::Server::builder(""), "service name"),
        (free().instance_id("a/b"), "instance_id"),
        (free().ttl(Duration::from_millis(500)), "ttl"),
        (free().ttl(Duration::from_millis(1500)), "whole seconds"),
        (free().weight(0), "weight"),
        (free().weight(2_000_000), "weight"),
        (free().advertise("no port"), "advertise"),
        (free().limiter(limiter(0.0)), "invalid limiter"),
        (free().limiter(limiter(f64::NAN)), "invalid limiter"),
        (free().config_file(dir.path().join("missing.json")), "missing.json"),
        (free().config_file(&bad_file), "unknown field `colour`"),
        (
            free().tls(mesh::server::TlsFiles {
                cert: dir.path().join("no-cert.pem"),
                key: dir.path().join("no-key.pem"),
                client_ca: None,
            }),
            "tls",
        ),
    ];
    for (builder, words) in cases {
        let err = server_error(builder).await;
        assert!(err.contains(words), "{words}: {err}");
    }
}

#[tokio::test]
async fn a_port_taken_is_reported_with_the_address_and_the_setting() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let err = server_error(mesh::Server::builder("billing").listen(addr)).await;
    assert!(err.contains(&format!("listening on {addr} (listen)")), "{err}");
}

#[derive(Debug, Parser)]
struct ServerFlags {
    #[command(flatten)]
    mesh: mesh::cli::ServerArgs,
}

#[tokio::test]
async fn settings_from_flags_are_named_by_their_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    for (argv, words) in [
        (vec!["--listen", addr.as_str(), "--no-register"], "(--listen (MESH_LISTEN))"),
        (vec!["--listen", "127.0.0.1:0", "--advertise", "nowhere", "--no-register"], "--advertise (MESH_ADVERTISE)"),
        (vec!["--listen", "127.0.0.1:0", "--rate", "0", "--no-register"], "invalid --rate/--burst"),
        (vec!["--listen", "127.0.0.1:0", "--etcd", "ftp://x"], "--etcd"),
    ] {
        let mut full = vec!["server"];
        full.extend(argv.iter().copied());
        let flags = ServerFlags::try_parse_from(&full).expect("parses");
        let err = match flags.mesh.builder::<NoSection>("billing") {
            Ok(builder) => server_error(builder.shutdown_on(std::future::pending())).await,
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(words), "{argv:?}: {err}");
    }
}

/// A client builder's error.
async fn client_error(builder: mesh::ClientBuilder) -> String {
    format!("{:#}", builder.build().await.expect_err("refused"))
}

#[tokio::test]
async fn each_bad_client_setting_is_refused_naming_it() {
    let cases: Vec<(mesh::ClientBuilder, &str)> = vec![
        (mesh::Client::builder("billing"), "give the client an etcd"),
        (mesh::Client::builder("bill/ing").targets(["127.0.0.1:1"]), "service name"),
        (mesh::Client::builder("billing").targets(Vec::<String>::new()), "targets needs at least one"),
        (mesh::Client::builder("billing").targets(["nonsense"]), "nonsense"),
        (mesh::Client::builder("billing").weights([1]), "weights weigh targets"),
        (mesh::Client::builder("billing").targets(["127.0.0.1:1"]).weights([1]), "strategy weighted only"),
        (
            mesh::Client::builder("billing")
                .targets(["127.0.0.1:1"])
                .strategy(mesh::client::Strategy::Weighted)
                .weights([0]),
            "weights has 0",
        ),
        (mesh::Client::builder("billing").targets(["127.0.0.1:1"]).timeout(Duration::ZERO), "timeout"),
        (
            mesh::Client::builder("billing")
                .targets(["127.0.0.1:1"])
                .timeout(Duration::from_secs(1))
                .per_try_timeout(Duration::from_secs(2)),
            "per_try_timeout 2s must be shorter than timeout 1s",
        ),
        (mesh::Client::builder("billing").targets(["127.0.0.1:1"]).max_attempts(0), "retry"),
        (mesh::Client::builder("billing").targets(["127.0.0.1:1"]), "cannot reach billing at 127.0.0.1:1"),
        (mesh::Client::builder("billing").etcd(mesh::etcd("http://127.0.0.1:1").expect("etcd")), "no answer from etcd"),
    ];
    for (builder, words) in cases {
        let err = client_error(builder).await;
        assert!(err.contains(words), "{words}: {err}");
    }
}

#[tokio::test]
async fn a_server_with_no_service_refuses_to_serve_and_registers_nothing() {
    let server = mesh::Server::builder("billing")
        .listen("127.0.0.1:0".parse().expect("addr"))
        .shutdown_on(std::future::pending())
        .build()
        .await
        .expect("built");
    let err = server.serve().await.expect_err("nothing to serve");
    assert!(format!("{err:#}").contains("add one with add_service"), "{err:#}");
}

/// Found by a hostile review: the second `metrics_listen` of a process (a service that is
/// also a client of another) failed, as the recorder was installed already.
#[tokio::test]
async fn a_server_and_a_client_in_one_process_each_serve_the_metrics() {
    use mesh_proto::pb::greeter_server::{Greeter, GreeterServer};
    struct Quiet;
    #[tonic::async_trait]
    impl Greeter for Quiet {
        async fn say_hello(
            &self,
            _: tonic::Request<mesh_proto::pb::HelloRequest>,
        ) -> Result<tonic::Response<mesh_proto::pb::HelloReply>, tonic::Status> {
            Ok(tonic::Response::new(mesh_proto::pb::HelloReply::default()))
        }
        type SayHelloStreamStream = tokio_stream::Empty<Result<mesh_proto::pb::HelloReply, tonic::Status>>;
        async fn say_hello_stream(
            &self,
            _: tonic::Request<mesh_proto::pb::HelloStreamRequest>,
        ) -> Result<tonic::Response<Self::SayHelloStreamStream>, tonic::Status> {
            Ok(tonic::Response::new(tokio_stream::empty()))
        }
    }
    let any = || "127.0.0.1:0".parse().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = mesh::Server::builder("greeter")
        .listen(any())
        .metrics_listen(any())
        .shutdown_on(async {
            let _ = stopped.await;
        })
        .build()
        .await
        .expect("the first metrics endpoint");
    let addr = server.local_addr();
    let serving = tokio::spawn(server.add_service(GreeterServer::new(Quiet)).serve());
    let client = mesh::Client::builder("greeter")
        .targets([addr.to_string()])
        .metrics_listen(any())
        .build()
        .await
        .expect("the second metrics endpoint");
    let mut greeter = mesh_proto::pb::greeter_client::GreeterClient::new(client.channel());
    greeter.say_hello(mesh_proto::pb::HelloRequest { name: "x".into() }).await.expect("call");
    let _ = stop.send(());
    serving.await.expect("task").expect("served");
}
