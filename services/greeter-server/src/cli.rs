use std::time::Duration;

use clap::Parser;

/// Command-line flags of `greeter-server`: every flag of a mesh server (each with a
/// `MESH_*` environment variable), and the greeter's fault injection.
#[derive(Debug, Clone, Parser)]
#[command(name = "greeter-server", version, about = "The reference greeter.v1 server of mesh")]
pub struct Args {
    /// Instead of serving: check, put or show the service's configuration document.
    #[command(subcommand)]
    pub command: Option<mesh::cli::Command>,

    /// Everything a mesh server is told: listening, registration, TLS, limits, metrics,
    /// configuration.
    #[command(flatten)]
    pub mesh: mesh::cli::ServerArgs,

    /// FAULT INJECTION, for tests and demos: fail this share (0 to 1) of greeter calls
    /// with --fault-code.
    #[arg(long, env = "MESH_FAULT_ERROR_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    pub fault_error_rate: f64,

    /// FAULT INJECTION: the status code of injected failures, by name (unavailable,
    /// internal, deadline_exceeded, resource_exhausted, …) or number.
    #[arg(long, env = "MESH_FAULT_CODE", default_value = "unavailable", value_parser = mesh::config::parse_code)]
    pub fault_code: tonic::Code,

    /// FAULT INJECTION: delay every greeter call by this much, e.g. `200ms`.
    #[arg(long, env = "MESH_FAULT_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub fault_delay: Duration,
}

impl std::ops::Deref for Args {
    type Target = mesh::cli::ServerArgs;

    fn deref(&self) -> &mesh::cli::ServerArgs {
        &self.mesh
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
