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
    fn a_bad_listen_flag_names_the_flag() {
        let err = Args::try_parse_from(["greeter-server", "--listen", "nowhere"]).expect_err("bad address");
        assert!(err.to_string().contains("--listen"), "{err}");
    }
}
