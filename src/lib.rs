//! tfa-rotator keeps the two-factor backup codes of ONLYOFFICE DocSpace accounts fresh.
//!
//! Modules, in the direction dependencies point (each uses only those above it):
//! - [`secret`]: redacting, zeroizing types for keys, passwords and codes; [`errors`]: an
//!   error and its causes on one line, each said once, and the exit codes; [`trust`]: the
//!   walk that decides whether a path another local user could change may be read;
//!   [`outcome`]: what happened to a portal, typed; [`json`]: how `--json` writes times;
//!   [`metrics`]: what the daemon counts, served on `/metrics` and `/healthz`;
//!   [`placeholder`]: the example config's recipients, which no sink may deliver to.
//! - [`config`]: the TOML file → a typed, validated [`config::Config`] (reading it and what
//!   it names: keys, CA files, exec programs, each checked by [`trust`]).
//! - [`schedule`]: cron in a time zone, jitter, and the planner: when a portal is next due
//!   and why, from what it is given (policy, what the state knows, the clock).
//! - [`docspace`]: the HTTP client of the DocSpace API, with one error kind per failure.
//! - [`crypto`]: OpenPGP and age encryption, key checks, keyed fingerprints of code sets.
//! - [`sinks`]: where codes go (file, email, exec): preflight, seal, deliver.
//! - [`state`]: the store (SQLite, or PostgreSQL for a cluster): portals, the rotation
//!   journal, the spool, history, notices, locks and claims; one set of statements for both.
//! - [`coordinator`]: who may work on a portal now: this process alone (a `flock`) or a
//!   cluster (claims, the PUT deadline, config generations, the instances' heartbeat).
//! - [`rotation`]: the protocol (preflight, intent, PUT verified by GET, seal, deliver), the
//!   settling of unknown outcomes, drift, concurrency limits, and recovery after a crash.
//! - [`daemon`]: the long-running loop on the planner ([`schedule::plan`]), its agenda, the
//!   config watcher, the coalesced alert checks and systemd notifications.
//! - [`simulator`]: a DocSpace-compatible server for tests, `simulate` and `demo`.
//! - [`commands`]: one function per subcommand; [`cli`] defines the command line.
//! - [`fuzzing`]: the entry points of the fuzz targets in `fuzz/`, replayed by the tests.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// `println!` that never panics: output to a closed pipe (`… | head -1`) is dropped, and the
/// command goes on to its end quietly, so nothing it was doing is cut short.
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `eprintln!` that never panics on a closed stderr (see [`out!`]). Under journald
/// (stderr is the journal's stream) each line is marked priority *err*, as a log line of
/// level ERROR is.
#[macro_export]
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let text = format!($($t)*);
        let mut stderr = std::io::stderr().lock();
        for line in text.lines() {
            let _ = writeln!(stderr, "{}{line}", $crate::logging::priority_prefix(3));
        }
    }};
}

pub mod logging;

pub mod cli;
pub mod commands;
pub mod config;
pub mod coordinator;
pub mod crypto;
pub mod daemon;
pub mod docspace;
pub mod errors;
pub mod fuzzing;
pub mod json;
pub mod metrics;
pub mod outcome;
pub mod placeholder;
pub mod rotation;
pub mod schedule;
pub mod secret;
pub mod simulator;
pub mod sinks;
pub mod state;
pub mod trust;

/// Completes on SIGINT or SIGTERM (systemd stops services with SIGTERM).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
