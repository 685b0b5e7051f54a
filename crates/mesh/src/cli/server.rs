//! The flags of a mesh server, and the `config` subcommand.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::ServiceSection;
use crate::server::{Origin, ServerBuilder, TlsFiles};

/// Every flag of a mesh server, each with a `MESH_*` environment variable: flatten it into
/// a binary's arguments (`#[command(flatten)]`) and call [`ServerArgs::builder`].
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// Address to listen on; port 0 picks a free port (the bound address is logged).
    #[arg(long, env = "MESH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Connections the kernel queues for the server before it accepts them; default the
    /// system's `net.core.somaxconn` (which also caps it).
    #[arg(long, env = "MESH_LISTEN_BACKLOG", value_parser = clap::value_parser!(u32).range(1..))]
    pub listen_backlog: Option<u32>,

    /// The id this instance registers under (the last segment of its key) and reports as
    /// `served_by`; not empty, no `/`; default: the advertised host:port.
    #[arg(long, env = "MESH_INSTANCE_ID", value_parser = checked_name)]
    pub instance_id: Option<String>,

    /// On SIGINT/SIGTERM, how long in-flight calls get to finish before they are cut,
    /// e.g. `10s`, `500ms`.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// On SIGINT/SIGTERM, how long to keep serving after deregistering, so that clients
    /// watching etcd stop sending calls before this server stops accepting them.
    #[arg(long, env = "MESH_SHUTDOWN_GRACE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// The host:port clients should dial, as registered in etcd; default: the bound address,
    /// or, listening on 0.0.0.0 or `[::]`, this host's first private address (the first
    /// other one without a private one) with the bound port.
    #[arg(long, env = "MESH_ADVERTISE")]
    pub advertise: Option<String>,

    /// The service name to register under (not empty, no `/`); default the binary's.
    #[arg(long, env = "MESH_SERVICE", global = true, value_parser = checked_name)]
    pub service: Option<String>,

    /// etcd endpoints, comma-separated.
    #[arg(long, env = "MESH_ETCD", default_value = "http://127.0.0.1:2379", global = true)]
    pub etcd: String,

    /// Root prefix of mesh's keys in etcd.
    #[arg(long, env = "MESH_ETCD_PREFIX", default_value = "/mesh", global = true)]
    pub etcd_prefix: String,

    /// TLS and auth towards etcd.
    #[command(flatten)]
    pub etcd_access: crate::etcd::EtcdAccess,

    /// Serve TLS with this certificate chain (PEM), with --tls-key; registered as speaking
    /// TLS. Reloaded on SIGHUP or when the file changes.
    #[arg(long, env = "MESH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "MESH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// mTLS: refuse, at the handshake, clients without a certificate this CA (PEM) signed.
    #[arg(long, env = "MESH_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Most streams (calls) one connection may have open at once; more are refused
    /// (REFUSED_STREAM) until some finish.
    #[arg(long, env = "MESH_MAX_CONCURRENT_STREAMS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_concurrent_streams: u32,

    /// Largest header list a request may carry, in bytes.
    #[arg(long, env = "MESH_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_header_list_size: u32,

    /// HTTP/2 rapid-reset protection: a connection whose client resets more than this many
    /// streams before the server has taken them is closed (GOAWAY, ENHANCE_YOUR_CALM).
    #[arg(long, env = "MESH_MAX_PENDING_RESETS", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_pending_resets: u32,

    /// HTTP/2 keepalive: the server pings every connection this often and closes one that
    /// does not answer within --keepalive-timeout, which finds hung peers too. Off (0s) by
    /// default: hyper then resets a timer on every frame read, 3-6% of throughput here;
    /// --tcp-keepalive finds dead peers at no cost per call.
    #[arg(long, env = "MESH_KEEPALIVE_INTERVAL", default_value = "0s", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered.
    #[arg(long, env = "MESH_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Duration,

    /// Response bytes one call may have waiting to be sent to a client that is not reading
    /// them; past it the call's response waits. What one connection can hold is about
    /// --max-concurrent-streams times this (and the message being encoded).
    #[arg(long, env = "MESH_MAX_SEND_BUFFER", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(1024..=16 * 1024 * 1024))]
    pub max_send_buffer: u32,

    /// Connections open at once (TLS handshakes under way count); one more is closed as
    /// soon as it is accepted, with a warning. 0 (the default) for no cap. With
    /// --max-send-buffer and --max-concurrent-streams it bounds what clients can make the
    /// server hold, but whoever holds that many connections keeps everyone else out.
    #[arg(long, env = "MESH_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: u32,

    /// Keepalive enforcement: HTTP/2 PINGs a client may send a second (on average, and at
    /// once), counted afresh whenever the server sends it headers or data; a client that
    /// sends more gets GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and its connection closed.
    /// 0 for no limit.
    #[arg(long, env = "MESH_MAX_PINGS_PER_SEC", default_value_t = 10)]
    pub max_pings_per_sec: u32,

    /// TCP keepalive: how long a connection may be idle before the kernel probes the peer
    /// (a dead peer's connection is then closed); 0s for off.
    #[arg(long, env = "MESH_TCP_KEEPALIVE", default_value = "60s", value_parser = humantime::parse_duration)]
    pub tcp_keepalive: Duration,

    /// Serve Prometheus metrics at http://ADDR/metrics: calls by method and code with
    /// latency histograms, the limiter's admitted and rejected calls, the configuration
    /// applied and refused.
    #[arg(long, env = "MESH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Serve grpc.health.v1 alone, in plaintext, on this address too: for probes that cannot
    /// speak TLS, such as the kubelet's gRPC probe against a TLS server. It answers what the
    /// main port would (NOT_SERVING from the start of a shutdown) and closes last.
    #[arg(long, env = "MESH_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,

    /// How long a call may take to be answered (its response's headers): a request body that
    /// never ends or a handler that never answers gets DEADLINE_EXCEEDED and is dropped;
    /// 0s for no bound. A stream goes on after its headers.
    #[arg(long, env = "MESH_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,

    /// Close a connection that has had no call open for this long, with GOAWAY(NO_ERROR)
    /// "idle" (its client dials again when it next calls); 0s for never.
    #[arg(long, env = "MESH_MAX_CONNECTION_IDLE", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_connection_idle: Duration,

    /// How long a new connection may take to finish its TLS handshake, and then to send its
    /// HTTP/2 preface; it is closed otherwise.
    #[arg(long, env = "MESH_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Lease TTL of the registration: how long the key outlives a crashed server.
    #[arg(long, env = "MESH_TTL", default_value = "10s", value_parser = parse_ttl)]
    pub ttl: Duration,

    /// Weight for weighted balancing.
    #[arg(long, env = "MESH_WEIGHT", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub weight: u32,

    /// Zone label in the registration.
    #[arg(long, env = "MESH_ZONE")]
    pub zone: Option<String>,

    /// Do not use etcd at all: no registration, and no live configuration (serve only).
    #[arg(long, env = "MESH_NO_REGISTER")]
    pub no_register: bool,

    /// A configuration file (TOML, or JSON by any other name) with the same sections as the
    /// document in etcd; the flags and then the document in etcd override it.
    #[arg(long, env = "MESH_CONFIG")]
    pub config: Option<std::path::PathBuf>,

    /// Do not watch `{etcd-prefix}/config/{service}`: run on the file and flag settings.
    #[arg(long, env = "MESH_NO_CONFIG")]
    pub no_config: bool,

    /// Limit the server to this many calls per second (health and reflection exempt); no
    /// limit without it.
    #[arg(long, env = "MESH_RATE")]
    pub rate: Option<f64>,

    /// Calls admitted at once after a quiet spell; default a tenth of --rate (at least 1).
    #[arg(long, env = "MESH_BURST")]
    pub burst: Option<u32>,

    /// Over the limit: `reject` at once with RESOURCE_EXHAUSTED, or `wait` up to
    /// --limit-max-wait for a permit.
    #[arg(long, env = "MESH_LIMIT_MODE", default_value = "reject", value_parser = ["reject", "wait"])]
    pub limit_mode: String,

    /// In `wait` mode, the longest a call waits for a permit.
    #[arg(long, env = "MESH_LIMIT_MAX_WAIT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub limit_max_wait: Duration,

    /// Give each caller its own budget as well as the server's: `peer-ip` (each IPv4
    /// address, each IPv6 /64), or `metadata:KEY` (a tenant header; values over 128 bytes
    /// share one budget).
    #[arg(long, env = "MESH_LIMIT_PER_CALLER", value_parser = checked_caller)]
    pub limit_per_caller: Option<String>,

    /// With --limit-per-caller, each caller's calls per second; default --rate.
    #[arg(long, env = "MESH_CALLER_RATE")]
    pub caller_rate: Option<f64>,

    /// With --limit-per-caller, each caller's burst; default a tenth of its rate.
    #[arg(long, env = "MESH_CALLER_BURST")]
    pub caller_burst: Option<u32>,

    /// A method's own limit, `PATH=RATE` or `PATH=RATE/BURST`, e.g.
    /// `/greeter.v1.Greeter/SayHello=50/5`; repeatable, or comma-separated.
    #[arg(long = "limit-method", env = "MESH_LIMIT_METHOD", value_delimiter = ',', value_parser = parse_method_limit)]
    pub limit_methods: Vec<(String, f64, Option<u32>)>,
}

impl ServerArgs {
    /// The per-connection limits the flags set.
    pub fn connection_limits(&self) -> crate::server::ConnectionLimits {
        crate::server::ConnectionLimits {
            http2: mesh_tls::Http2Options {
                max_concurrent_streams: self.max_concurrent_streams,
                max_header_list_size: self.max_header_list_size,
                max_pending_resets: self.max_pending_resets as usize,
                keepalive_interval: Some(self.keepalive_interval).filter(|d| !d.is_zero()),
                keepalive_timeout: self.keepalive_timeout,
                max_send_buffer: self.max_send_buffer as usize,
            },
            incoming: mesh_tls::IncomingOptions {
                handshake_timeout: self.handshake_timeout,
                max_pings_per_sec: self.max_pings_per_sec,
                tcp_keepalive: Some(self.tcp_keepalive).filter(|d| !d.is_zero()),
                max_connection_idle: Some(self.max_connection_idle).filter(|d| !d.is_zero()),
                max_connections: Some(self.max_connections as usize).filter(|n| *n > 0),
            },
            request_timeout: Some(self.request_timeout).filter(|d| !d.is_zero()),
        }
    }
}

impl ServerArgs {
    /// The service name: `--service`, or `default`.
    pub fn service_or<'a>(&'a self, default: &'a str) -> &'a str {
        self.service.as_deref().unwrap_or(default)
    }

    /// A server builder with every setting these flags make, for the service `service`
    /// unless `--service` names another; errors (from `build`) name the flag.
    pub fn builder<S: ServiceSection>(&self, service: &str) -> anyhow::Result<ServerBuilder<S>> {
        let mut b = ServerBuilder::<S>::new(self.service_or(service))
            .listen(self.listen)
            .listen_backlog(self.listen_backlog)
            .ttl(self.ttl)
            .weight(self.weight)
            .etcd_prefix(self.etcd_prefix.clone())
            .connection_limits(self.connection_limits())
            .drain_timeout(self.drain_timeout)
            .shutdown_grace(self.shutdown_grace)
            .live_config(!self.no_config);
        b.origin = Origin::Flags;
        if let Some(id) = &self.instance_id {
            b = b.instance_id(id.clone());
        }
        if let Some(a) = &self.advertise {
            b = b.advertise(a.clone());
        }
        if let Some(z) = &self.zone {
            b = b.zone(z.clone());
        }
        if !self.no_register {
            b = b.etcd_result(Some(self.etcd_access.etcd(&self.etcd)));
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            b = b.tls(TlsFiles { cert: cert.clone(), key: key.clone(), client_ca: self.tls_client_ca.clone() });
        }
        if let Some(addr) = self.metrics_listen {
            b = b.metrics_listen(addr);
        }
        if let Some(addr) = self.health_listen {
            b = b.health_listen(addr);
        }
        if let Some(file) = &self.config {
            b = b.config_file(file.clone());
        }
        if let Some(section) = self.limiter_section()? {
            b = b.limiter(section);
        }
        Ok(b)
    }
}

/// What a server binary does instead of serving: flatten it as a subcommand.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// The service's configuration document in etcd (`{etcd-prefix}/config/{service}`).
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `config …`: the service's configuration document, checked, put and shown.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ConfigCommand {
    /// Checks a JSON document: exit 0, or 1 with the reason.
    Validate {
        /// The document.
        file: std::path::PathBuf,
    },
    /// Checks a JSON document, then puts it in etcd, where every instance applies it.
    Apply {
        /// The document.
        file: std::path::PathBuf,
    },
    /// Prints the document in etcd and what each instance applied.
    Show,
}

impl ServerArgs {
    /// The rate limits the flags ask for, as the configuration's `server.limiter` section:
    /// none without --rate.
    pub fn limiter_section(&self) -> anyhow::Result<Option<crate::config::LimiterSection>> {
        let Some(rate) = self.rate else {
            anyhow::ensure!(
                self.burst.is_none()
                    && self.limit_methods.is_empty()
                    && self.limit_per_caller.is_none()
                    && self.caller_rate.is_none()
                    && self.caller_burst.is_none(),
                "--burst, --limit-method, --limit-per-caller, --caller-rate and --caller-burst need --rate"
            );
            return Ok(None);
        };
        let methods = self
            .limit_methods
            .iter()
            .map(|(path, rate, burst)| {
                (path.clone(), crate::config::MethodLimit { rate_per_sec: *rate, burst: *burst })
            })
            .collect();
        Ok(Some(crate::config::LimiterSection {
            rate_per_sec: rate,
            burst: self.burst,
            mode: self.limit_mode.clone(),
            max_wait_ms: u64::try_from(self.limit_max_wait.as_millis()).unwrap_or(u64::MAX),
            per_caller: self.limit_per_caller.clone(),
            caller_rate_per_sec: self.caller_rate,
            caller_burst: self.caller_burst,
            methods,
        }))
    }
}

fn checked_caller(s: &str) -> Result<String, String> {
    crate::config::parse_caller(s).map(|_| s.to_string())
}

fn parse_method_limit(s: &str) -> Result<(String, f64, Option<u32>), String> {
    let usage = || format!("{s:?}: give PATH=RATE or PATH=RATE/BURST, e.g. /greeter.v1.Greeter/SayHello=50/5");
    let (path, limit) = s.split_once('=').ok_or_else(usage)?;
    let (rate, burst) = match limit.split_once('/') {
        Some((rate, burst)) => (rate, Some(burst.parse::<u32>().map_err(|_| usage())?)),
        None => (limit, None),
    };
    Ok((path.to_string(), rate.parse::<f64>().map_err(|_| usage())?, burst))
}

fn checked_name(s: &str) -> Result<String, String> {
    mesh_registry::check_name(s).map(|()| s.to_string())
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    crate::server::check_ttl(ttl)
        .map_err(|e| format!("{s:?}: {}", e.split_once(": ").map_or(e.as_str(), |(_, why)| why)))?;
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    /// A binary's arguments, as a user flattens them.
    #[derive(Debug, Parser)]
    struct Args {
        #[command(flatten)]
        mesh: ServerArgs,
    }

    impl std::ops::Deref for Args {
        type Target = ServerArgs;
        fn deref(&self) -> &ServerArgs {
            &self.mesh
        }
    }

    impl ServerArgs {
        fn limits(&self) -> anyhow::Result<Option<mesh_limiter::LimiterConfig>> {
            let section = self.limiter_section()?;
            crate::server::layers::<crate::config::NoSection>(None, section.as_ref(), Origin::Flags)?;
            Ok(section.map(|s| s.limiter_config().expect("checked")))
        }
    }

    #[test]
    fn drain_timeout_takes_units_and_a_bad_one_names_the_flag() {
        let args = Args::try_parse_from(["greeter-server", "--drain-timeout", "500ms"]).expect("valid");
        assert_eq!(args.drain_timeout, Duration::from_millis(500));
        let err = Args::try_parse_from(["greeter-server", "--drain-timeout", "soon"]).expect_err("bad");
        assert!(err.to_string().contains("--drain-timeout"), "{err}");
    }

    #[test]
    fn registry_flags_are_checked_and_named() {
        for (flag, value) in [
            ("--ttl", "500ms"),
            ("--ttl", "1.5s"),
            ("--ttl", "10000000000s"),
            ("--weight", "0"),
            ("--instance-id", "zone-a/s1"),
            ("--instance-id", ""),
            ("--service", "billing/v1"),
            ("--service", ""),
        ] {
            let err = Args::try_parse_from(["greeter-server", flag, value]).expect_err(value);
            assert!(err.to_string().contains(flag), "{err}");
        }
        let args = Args::try_parse_from(["greeter-server", "--ttl", "2s", "--zone", "z1"]).expect("valid");
        assert_eq!(
            (args.ttl, args.zone.as_deref(), args.service_or("greeter")),
            (Duration::from_secs(2), Some("z1"), "greeter")
        );
    }

    #[test]
    fn limit_flags_build_the_limits_and_bad_ones_name_the_flag() {
        let args = Args::try_parse_from(["greeter-server"]).expect("valid");
        assert_eq!(args.limits().expect("no limit"), None);
        let args = Args::try_parse_from([
            "greeter-server",
            "--rate",
            "200",
            "--limit-mode",
            "wait",
            "--limit-method",
            "/greeter.v1.Greeter/SayHello=50/5",
            "--limit-per-caller",
            "metadata:X-Tenant",
        ])
        .expect("valid");
        let config = args.limits().expect("valid").expect("a limit");
        assert_eq!((config.default.rate_per_sec, config.default.burst), (200.0, 20));
        assert_eq!(config.default.mode, mesh_limiter::Mode::Wait { max_wait: Duration::from_millis(100) });
        let say = config.limit_of("/greeter.v1.Greeter/SayHello");
        assert_eq!((say.rate_per_sec, say.burst), (50.0, 5));
        assert_eq!(config.per_caller.map(|p| p.key), Some(mesh_limiter::CallerKey::Metadata("x-tenant".into())));

        for (argv, words) in [
            (
                vec!["--rate", "0"],
                "invalid --rate/--burst/--limit-method/--limit-per-caller/--limit-max-wait: invalid rate limit rate_per_sec",
            ),
            (vec!["--rate", "NaN"], "not a number"),
            (vec!["--rate", "10", "--burst", "0"], "burst"),
            (vec!["--burst", "5"], "need --rate"),
            (vec!["--rate", "10", "--limit-method", "SayHello=5"], "methods[SayHello]"),
        ] {
            let mut full = vec!["greeter-server"];
            full.extend(argv.iter().copied());
            let err = Args::try_parse_from(full).expect("parses").limits().expect_err("refused");
            assert!(format!("{err:#}").contains(words), "{argv:?}: {err:#}");
        }
        for (flag, value) in [("--limit-method", "/a.B/C"), ("--limit-per-caller", "tenant"), ("--limit-mode", "drop")]
        {
            let err = Args::try_parse_from(["greeter-server", "--rate", "5", flag, value]).expect_err(value);
            assert!(err.to_string().contains(flag), "{err}");
        }
    }

    #[test]
    fn a_bad_listen_flag_names_the_flag() {
        let err = Args::try_parse_from(["greeter-server", "--listen", "nowhere"]).expect_err("bad address");
        assert!(err.to_string().contains("--listen"), "{err}");
    }
}
