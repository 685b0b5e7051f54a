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
    /// (required when listening on 0.0.0.0 or `[::]`).
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

    /// FAULT INJECTION, for tests and demos: fail this share (0 to 1) of greeter calls
    /// with --fault-code.
    #[arg(long, env = "MESH_FAULT_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_error_rate: f64,

    /// FAULT INJECTION: the status code of injected failures, by name (unavailable,
    /// internal, deadline_exceeded, resource_exhausted, …) or number.
    #[arg(long, env = "MESH_FAULT_CODE", default_value = "unavailable", value_parser = parse_code)]
    pub fault_code: tonic::Code,

    /// FAULT INJECTION: delay every greeter call by this much, e.g. `200ms`.
    #[arg(long, env = "MESH_FAULT_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub fault_delay: Duration,
}

impl Args {
    /// The faults the flags ask for (none by default).
    pub fn fault(&self) -> crate::Fault {
        crate::Fault { error_rate: self.fault_error_rate, code: self.fault_code, delay: self.fault_delay }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?}: give a share from 0 to 1, e.g. 0.5")),
    }
}

/// A gRPC status code by its name (any case, `_` or `-`) or its number.
pub fn parse_code(s: &str) -> Result<tonic::Code, String> {
    if let Ok(n) = s.parse::<i32>() {
        return match tonic::Code::from_i32(n) {
            tonic::Code::Unknown if n != 2 => Err(format!("{s:?} is not a gRPC status code (0 to 16)")),
            code => Ok(code),
        };
    }
    let wanted = s.to_ascii_lowercase().replace('-', "_");
    (0..=16)
        .map(tonic::Code::from_i32)
        .find(|c| code_name(*c) == wanted)
        .ok_or_else(|| format!("{s:?} is not a gRPC status code; try unavailable, internal or deadline_exceeded"))
}

/// `unavailable`, `deadline_exceeded`, …: a code's name in snake case.
pub fn code_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::new();
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
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
    fn fault_flags_are_off_by_default_and_checked() {
        let args = Args::try_parse_from(["greeter-server"]).expect("valid");
        assert!(!args.fault().is_on());
        let args = Args::try_parse_from([
            "greeter-server",
            "--fault-error-rate",
            "0.5",
            "--fault-code",
            "DEADLINE-EXCEEDED",
            "--fault-delay",
            "200ms",
        ])
        .expect("valid");
        assert_eq!(args.fault().code, tonic::Code::DeadlineExceeded);
        assert_eq!(args.fault().delay, Duration::from_millis(200));
        assert_eq!(parse_code("14"), Ok(tonic::Code::Unavailable));
        for (flag, value) in [
            ("--fault-error-rate", "1.5"),
            ("--fault-error-rate", "NaN"),
            ("--fault-code", "sad"),
            ("--fault-code", "17"),
        ] {
            let err = Args::try_parse_from(["greeter-server", flag, value]).expect_err(value);
            assert!(err.to_string().contains(flag), "{err}");
        }
    }

    #[test]
    fn a_bad_listen_flag_names_the_flag() {
        let err = Args::try_parse_from(["greeter-server", "--listen", "nowhere"]).expect_err("bad address");
        assert!(err.to_string().contains("--listen"), "{err}");
    }
}
