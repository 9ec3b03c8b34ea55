//! The command line, as clap definitions only.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Keeps the two-factor backup codes of ONLYOFFICE DocSpace accounts fresh.
#[derive(Parser, Debug)]
#[command(
    name = "tfa-rotator",
    version = env!("TFA_ROTATOR_VERSION_LINE"),
    about,
    propagate_version = true
)]
pub struct Cli {
    /// The config file.
    #[arg(
        long,
        global = true,
        env = "TFA_ROTATOR_CONFIG",
        default_value = "/etc/tfa-rotator/config.toml"
    )]
    pub config: PathBuf,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// More log detail (-v info, -vv debug, -vvv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Less output (-q: errors only).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub quiet: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the daemon.
    Run {
        /// Only log what would be done.
        #[arg(long)]
        dry_run: bool,
        /// Do what the daemon would do now (fires due since the last run, changed or new
        /// portals, watch reads), then exit: for systemd timers and cron.
        #[arg(long)]
        once: bool,
    },
    /// Validate the config, resolve secrets, preflight every portal and sink; print the plan.
    Check {
        /// Do not contact portals or sinks.
        #[arg(long)]
        offline: bool,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Rotate now, deliver, exit.
    Rotate {
        /// Portals to rotate.
        portals: Vec<String>,
        /// Every portal in the config.
        #[arg(long, conflicts_with = "portals")]
        all: bool,
        /// Only the read-only steps.
        #[arg(long)]
        dry_run: bool,
        /// Ignore `min_interval`.
        #[arg(long)]
        force: bool,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Retry every pending delivery (webhook events too) now, then exit.
    Deliver {
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Read the current codes and deliver them again, without rotating.
    Resend {
        /// Portals.
        #[arg(required = true)]
        portals: Vec<String>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Ask the portal now about a rotation whose outcome is unknown, or close it by hand.
    Settle {
        /// The portal.
        portal: String,
        /// Close the open intent by hand (recorded with who and why): for a key revoked
        /// mid-rotation, which no GET can settle.
        #[arg(long)]
        abandon: bool,
        /// Why, recorded with --abandon.
        #[arg(long, requires = "abandon")]
        reason: Option<String>,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Drop, on purpose, the open intent and pending payloads of a portal (or of sinks)
    /// removed from the config.
    Forget {
        /// The portal.
        portal: String,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Copy the SQLite state (daemon.state_dir) into the empty PostgreSQL database of
    /// [storage], keeping every pending payload and the fingerprint key.
    MigrateState {
        /// The target: `postgres` (the [storage] table must name it).
        #[arg(long, value_parser = ["postgres"])]
        to: String,
    },
    /// Per portal: last rotation, next due time, unused codes, pending deliveries.
    Status {
        /// Only these portals (default: every one the config or the state knows).
        portals: Vec<String>,
        /// Only the portals that need attention: a failed last attempt, an open intent, a
        /// delivery pending longer than `pending_longer_than`, FLAPPING, a 429 pause. Exit 1
        /// when it lists any.
        #[arg(long)]
        failing: bool,
        /// One JSON document on stdout.
        #[arg(long)]
        json: bool,
    },
    /// The audit record, oldest first: every rotation, settle, abandon, forget, drift and
    /// delivery, with who or what triggered it; never a code. Read-only.
    History {
        /// Only these portals (default: all).
        portals: Vec<String>,
        /// Only records at or after this time: RFC 3339 (2026-12-01T00:00:00Z) or an age (7d).
        #[arg(long)]
        since: Option<String>,
        /// JSON Lines on stdout.
        #[arg(long, conflicts_with_all = ["csv", "verify"])]
        json: bool,
        /// CSV with a header on stdout.
        #[arg(long, conflicts_with = "verify")]
        csv: bool,
        /// Recompute every hash chain; exit 1 naming the first record that does not verify.
        #[arg(long)]
        verify: bool,
    },
    /// Serve a local DocSpace-compatible portal.
    Simulate(SimulateArgs),
    /// A tour: a simulated portal, a throwaway config, one rotation, proof the codes work.
    Demo,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print a manual page (roff) on stdout: `tfa-rotator man check | man -l -`.
    Man {
        /// The page: a subcommand (`check`), `config` for tfa-rotator.toml(5),
        /// `tfa-rotator-run` for tfa-rotator-run(8); none: tfa-rotator(1).
        page: Option<String>,
        /// List every page (file name, then what `man` takes), for packaging.
        #[arg(long, conflicts_with = "page")]
        list: bool,
    },
    /// Print the config file's JSON Schema on stdout (config/tfa-rotator.schema.json).
    Schema,
}

/// The flags of `simulate`.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// A TOML file describing the portal and its users (see README).
    #[arg(long)]
    pub portal_file: Option<PathBuf>,
    /// Add this many generated users (their keys are printed).
    #[arg(long, default_value_t = 0)]
    pub users: usize,
    /// Add a user with this API key (repeatable).
    #[arg(long = "key")]
    pub keys: Vec<String>,
    /// Codes per set.
    #[arg(long)]
    pub codes: Option<usize>,
    /// Characters per code.
    #[arg(long)]
    pub code_length: Option<usize>,
    /// Status of the "not available" error (500, 403 or 405).
    #[arg(long)]
    pub not_available_status: Option<u16>,
    /// Requests per key per minute before 429.
    #[arg(long)]
    pub rate_limit: Option<u32>,
    /// Delay every answer this long (like `25ms`), to rehearse a portal across the internet.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub latency: Option<std::time::Duration>,
}
