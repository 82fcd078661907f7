//! The command line: `kubectl portcullis [--kubeconfig …] [--context …] [-n NS] COMMAND`.

use clap::{Args, Parser, Subcommand};
use std::net::IpAddr;
use std::path::PathBuf;

/// Portcullis from kubectl: API keys, "would this request pass?", what every sidecar enforces, quota use.
#[derive(Debug, Parser)]
#[command(name = "kubectl-portcullis", bin_name = "kubectl portcullis", version)]
pub struct Cli {
    /// Path to the kubeconfig (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace of the ApiClients and UsagePlans (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// An ApiClient's keys: create, rotate, show, revoke.
    #[command(subcommand)]
    Keys(Keys),
    /// Would this request of CLIENT pass right now, and which rule decides? Evaluated with the sidecar's own
    /// decision code against the live table. Exit status: 0 allowed, 3 refused, 1 error.
    Check(CheckArgs),
    /// Per protected Service: the revision the controller wrote, its clients and shards, the sidecar pods, and
    /// what the controller reports (Enforced: which sidecars serve it; Protected/Exposure: bypass findings).
    Status {
        /// Only this Service.
        service: Option<String>,
    },
    /// Quota use per ApiClient and plan (the shared store's counts, from `status.usage`).
    Usage {
        /// Only this ApiClient.
        client: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct Wait {
    /// How long to wait for every sidecar to enforce the change.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
    /// Do not wait: return once the API server has the change.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, Subcommand)]
pub enum Keys {
    /// Add a generated key to CLIENT, wait until every sidecar accepts it, print it (on stdout, nothing else).
    Create {
        client: String,
        /// The key's name in spec.keys (default: k<N+1>); its Secret is <client>-key-<name>.
        #[arg(long)]
        name: Option<String>,
        /// The key is refused from this instant on (RFC 3339, e.g. 2027-01-01T00:00:00Z).
        #[arg(long)]
        expires_at: Option<jiff::Timestamp>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Add a new generated key, wait until every sidecar accepts it, print it; then, if asked, retire the old
    /// keys: now (--remove-old) or later (--remove-old-after: they get spec.keys[].expiresAt).
    Rotate {
        client: String,
        /// The new key's name (default: k<N+1>).
        #[arg(long)]
        name: Option<String>,
        /// The keys to retire (default: every other named key).
        #[arg(long = "old")]
        old: Vec<String>,
        /// Retire the old keys this long after the new one is enforced (e.g. 24h, 7d): sets their expiresAt.
        #[arg(long, value_parser = parse_duration, conflicts_with = "remove_old")]
        remove_old_after: Option<std::time::Duration>,
        /// Remove the old keys as soon as the new one is enforced, and wait until no sidecar accepts them.
        #[arg(long)]
        remove_old: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// List CLIENT's keys (name, where it is kept, fingerprint, expiry); --reveal NAME prints that key alone.
    Show {
        client: String,
        /// Print this key's value (read from its Secret) and nothing else.
        #[arg(long)]
        reveal: Option<String>,
    },
    /// Remove keys from CLIENT and wait until no sidecar accepts them.
    Revoke {
        client: String,
        /// The keys' names in spec.keys.
        #[arg(required = true)]
        names: Vec<String>,
        /// Allow removing the client's last key.
        #[arg(long)]
        allow_no_keys: bool,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The ApiClient.
    pub client: String,
    /// The request's source address, as the sidecar would see it.
    #[arg(long = "from")]
    pub from: IpAddr,
    /// HTTP method, e.g. GET.
    pub method: String,
    /// Request path, e.g. /v1/orders (normalised as the sidecar does).
    pub path: String,
    /// The protected Service (needed when the client's plans grant several).
    #[arg(long)]
    pub service: Option<String>,
}

/// `90s`, `15m`, `24h`, `7d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected a number with s, m, h or d (e.g. 24h)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (s, m, h or d)")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent_and_durations_parse() {
        Cli::command().debug_assert();
        assert_eq!(parse_duration("24h").unwrap().as_secs(), 86_400);
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("7d").unwrap().as_secs(), 604_800);
        assert!(parse_duration("1w").is_err() && parse_duration("h").is_err());
        let cli = Cli::try_parse_from([
            "kubectl-portcullis",
            "-n",
            "demo",
            "check",
            "acme",
            "--from",
            "127.0.0.2",
            "GET",
            "/v1",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Check(ref c) if c.from.to_string() == "127.0.0.2" && c.path == "/v1"));
        assert!(
            Cli::try_parse_from([
                "kubectl-portcullis",
                "keys",
                "rotate",
                "a",
                "--remove-old",
                "--remove-old-after",
                "1h"
            ])
            .is_err()
        );
    }
}
