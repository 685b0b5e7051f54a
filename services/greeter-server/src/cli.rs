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
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

/// Parses `500ms`, `2s`, `1.5s`, `1m`; a bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let value: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 500ms, 2s, 1m"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("{s:?} has an unknown unit {unit:?}; use ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{s:?} is not a valid non-negative duration"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_are_named() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("soon").unwrap_err().contains("\"soon\""));
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn a_bad_listen_flag_names_the_flag() {
        let err = Args::try_parse_from(["greeter-server", "--listen", "nowhere"]).expect_err("bad address");
        assert!(err.to_string().contains("--listen"), "{err}");
    }
}
