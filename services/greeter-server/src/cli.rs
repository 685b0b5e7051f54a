use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

/// Command-line flags of `greeter-server`; each has a `MESH_*` environment variable.
#[derive(Debug, Clone, Parser)]
#[command(name = "greeter-server", version, about = "The reference greeter.v1 server of mesh")]
pub struct Args {
    /// Address to listen on; port 0 picks a free port (the bound address is logged).
    #[arg(long, env = "MESH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// The id this instance reports as `served_by`; default: the bound host:port.
    #[arg(long, env = "MESH_INSTANCE_ID")]
    pub instance_id: Option<String>,

    /// On SIGINT/SIGTERM, how long in-flight calls get to finish before they are cut,
    /// e.g. `10s`, `500ms`.
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// On SIGINT/SIGTERM, how long to keep serving after deregistering, so that clients
    /// watching etcd stop sending calls before this server stops accepting them.
    #[arg(long, env = "MESH_SHUTDOWN_GRACE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// The host:port clients should dial, as registered in etcd; default: the bound address
    /// (required when listening on 0.0.0.0 or [::]).
    #[arg(long, env = "MESH_ADVERTISE")]
    pub advertise: Option<String>,

    /// The service name to register under.
    #[arg(long, env = "MESH_SERVICE", default_value = "greeter")]
    pub service: String,

    /// etcd endpoints, comma-separated.
    #[arg(long, env = "MESH_ETCD", default_value = "http://127.0.0.1:2379")]
    pub etcd: String,

    /// Root prefix of mesh's keys in etcd.
    #[arg(long, env = "MESH_ETCD_PREFIX", default_value = "/mesh")]
    pub etcd_prefix: String,

    /// Lease TTL of the registration: how long the key outlives a crashed server.
    #[arg(long, env = "MESH_TTL", default_value = "10s", value_parser = parse_ttl)]
    pub ttl: Duration,

    /// Weight for weighted balancing.
    #[arg(long, env = "MESH_WEIGHT", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub weight: u32,

    /// Zone label in the registration.
    #[arg(long, env = "MESH_ZONE")]
    pub zone: Option<String>,

    /// Do not register in etcd (serve only).
    #[arg(long, env = "MESH_NO_REGISTER")]
    pub no_register: bool,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
        return Err(format!("{s:?}: etcd leases count whole seconds; use 1s or more, e.g. 10s"));
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_timeout_takes_units_and_a_bad_one_names_the_flag() {
        let args = Args::try_parse_from(["greeter-server", "--drain-timeout", "500ms"]).expect("valid");
        assert_eq!(args.drain_timeout, Duration::from_millis(500));
        let err = Args::try_parse_from(["greeter-server", "--drain-timeout", "soon"]).expect_err("bad");
        assert!(err.to_string().contains("--drain-timeout"), "{err}");
    }

    #[test]
    fn registry_flags_are_checked_and_named() {
        for (flag, value) in [("--ttl", "500ms"), ("--ttl", "1.5s"), ("--weight", "0")] {
            let err = Args::try_parse_from(["greeter-server", flag, value]).expect_err(value);
            assert!(err.to_string().contains(flag), "{err}");
        }
        let args = Args::try_parse_from(["greeter-server", "--ttl", "2s", "--zone", "z1"]).expect("valid");
        assert_eq!(
            (args.ttl, args.zone.as_deref(), args.service.as_str()),
            (Duration::from_secs(2), Some("z1"), "greeter")
        );
    }

    #[test]
    fn a_bad_listen_flag_names_the_flag() {
        let err = Args::try_parse_from(["greeter-server", "--listen", "nowhere"]).expect_err("bad address");
        assert!(err.to_string().contains("--listen"), "{err}");
    }
}
