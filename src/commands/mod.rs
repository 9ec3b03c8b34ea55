//! One function per subcommand. [`main`] sets up logging and the runtime, dispatches, and
//! returns the exit code: 0 success, 1 something failed, 2 wrong usage, 78 invalid config.

mod check;
mod demo;
mod history;
pub mod man;
mod rotate;
mod simulate;
mod status;

use std::path::Path;
use std::sync::Arc;

use crate::cli::{Cli, Command, LogFormat};
use crate::config::{self, Config, ConfigIssue};
use crate::rotation::{Engine, EngineError, Report};

pub use crate::errors::Exit;

/// Runs the parsed command line and returns the process exit code.
pub fn main(cli: Cli) -> u8 {
    init_logging(&cli);
    no_core_dumps();
    more_file_descriptors();
    #[cfg(feature = "failpoints")]
    let _failpoints = setup_failpoints();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            crate::err!("error: starting the async runtime: {e}");
            return Exit::Failed as u8;
        }
    };
    let exit = runtime.block_on(dispatch(cli));
    // Do not wait for tasks stuck on a hung connection: everything durable is committed.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    exit as u8
}

/// `migrate-state --to postgres`: the SQLite state of `daemon.state_dir` into the empty
/// database of `[storage]`, in one transaction. Stop every daemon first.
async fn migrate_state(path: &std::path::Path) -> Exit {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let Some(storage) = &config.storage else {
        crate::err!(
            "error: {}: [storage] does not name a PostgreSQL database (type = \"postgres\", url = …); nothing was copied",
            path.display()
        );
        return Exit::Config;
    };
    let dir = &config.daemon.state_dir;
    // Opened (and upgraded) as SQLite first, so the copy reads the current schema; its
    // flock-free read happens while no daemon should run (the operator stopped them).
    if let Err(e) = crate::state::Store::open(dir) {
        crate::err!("error: {e}");
        return Exit::Failed;
    }
    let result = async {
        let data = crate::state::migrate::read_sqlite(dir)?;
        let pg = crate::state::pg::PgStore::open(storage, &config, false)
            .await?
            .ok_or_else(|| crate::state::StateError::Db {
                action: "opening PostgreSQL",
                detail: "no store".into(),
            })?;
        let copied = pg
            .transaction(move |c| crate::state::migrate::write(c, data))
            .await?;
        Ok::<_, crate::state::StateError>(copied)
    }
    .await;
    match result {
        Ok(copied) => {
            for (table, n) in copied {
                crate::out!("{table}: {n} row(s)");
            }
            crate::out!(
                "copied {} into PostgreSQL; the SQLite state is left as it was (remove it once the instances run on PostgreSQL)",
                dir.display()
            );
            Exit::Ok
        }
        Err(e) => {
            crate::err!("error: {e}; nothing was copied");
            Exit::Failed
        }
    }
}

async fn dispatch(cli: Cli) -> Exit {
    let path = cli.config.clone();
    let json = match &cli.command {
        Command::Check { json, .. }
        | Command::Rotate { json, .. }
        | Command::Deliver { json }
        | Command::Resend { json, .. }
        | Command::Settle { json, .. }
        | Command::Forget { json, .. }
        | Command::Status { json, .. }
        | Command::History { json, .. } => *json,
        _ => false,
    };
    let _ = JSON.set(json);
    let _ = QUIET.set(cli.quiet > 0);
    match cli.command {
        Command::Run { dry_run, once } => run_daemon(&path, dry_run, once).await,
        Command::Check { offline, json } => check::run(&path, offline, json).await,
        Command::Rotate {
            portals,
            all,
            dry_run,
            force,
            json,
        } => rotate::rotate(&path, portals, all, dry_run, force, json).await,
        Command::Deliver { json } => rotate::deliver(&path, json).await,
        Command::Resend { portals, json } => rotate::resend(&path, portals, json).await,
        Command::Settle {
            portal,
            abandon,
            reason,
            json,
        } => rotate::settle(&path, portal, abandon, reason, json).await,
        Command::Forget { portal, json } => rotate::forget(&path, portal, json).await,
        Command::Status {
            portals,
            failing,
            json,
        } => status::run(&path, &portals, failing, json).await,
        Command::History {
            portals,
            since,
            json,
            csv,
            verify,
        } => {
            let format = match (json, csv) {
                (true, _) => history::Format::Json,
                (_, true) => history::Format::Csv,
                _ => history::Format::Table,
            };
            history::run(&path, portals, since, format, verify).await
        }
        Command::MigrateState { to: _ } => migrate_state(&path).await,
        Command::Simulate(args) => simulate::run(args).await,
        Command::Demo => demo::run().await,
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tfa-rotator", &mut buf);
            write_stdout(&buf)
        }
        Command::Schema => write_stdout(crate::config::schema().as_bytes()),
        Command::Man { list: true, .. } => match man::pages() {
            Ok(pages) => {
                let text: String = pages
                    .iter()
                    .map(|p| format!("{}\t{}\n", p.file, p.arg))
                    .collect();
                write_stdout(text.as_bytes())
            }
            Err(e) => {
                crate::err!("error: rendering the manual pages: {e}");
                Exit::Failed
            }
        },
        Command::Man { page, .. } => match man::page(page.as_deref()) {
            Ok(text) => write_stdout(&text),
            Err(e) => {
                crate::err!("error: {e}");
                Exit::Usage
            }
        },
    }
}

/// Writes generated text to stdout; a closed stdout is not an error worth a panic.
fn write_stdout(bytes: &[u8]) -> Exit {
    use std::io::Write;
    match std::io::stdout().lock().write_all(bytes) {
        Ok(()) => Exit::Ok,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Exit::Ok,
        Err(e) => {
            crate::err!("error: writing to stdout: {e}");
            Exit::Failed
        }
    }
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let daemon = matches!(cli.command, Command::Run { .. });
    let base = match (daemon, i16::from(cli.verbose) - i16::from(cli.quiet)) {
        (_, n) if n >= 3 => "trace",
        (_, 2) => "debug",
        (_, 1) => "info",
        (true, 0) => "info",
        (false, 0) => "warn",
        _ => "error",
    };
    // RUST_LOG, as every tracing program reads it; TFA_ROTATOR_LOG, its older name, after.
    let filter = EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| EnvFilter::try_from_env("TFA_ROTATOR_LOG"))
        .unwrap_or_else(|_| {
            EnvFilter::new(format!(
                "{base},hyper=warn,reqwest=warn,rustls=warn,h2=warn"
            ))
        });
    // The file watcher's library logs every inotify event at trace level: with the log
    // written into the watched directory, each line it logs raises the next event (78 MB in
    // 5 s). Its own lines are capped at warnings, whatever the filter asks.
    let filter = match "notify=warn".parse() {
        Ok(d) => filter.add_directive(d),
        Err(_) => filter,
    };
    // Under systemd the journal stamps each line (do not stamp twice) and reads its
    // priority from a `<N>` prefix.
    let journald = crate::logging::stderr_is_journal();
    // A log line that cannot be written (stderr is a closed pipe) is dropped: the
    // subscriber's own report of it would be an eprintln! that panics mid-rotation.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .with_target(false);
    let _ = match (cli.log_format, journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder
            .with_ansi(false)
            .event_format(crate::logging::Priority(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_target(false)
                    .with_ansi(false),
            ))
            .try_init(),
        (LogFormat::Text, false) => builder.with_ansi(crate::logging::colour()).try_init(),
    };
}

/// A core dump of this process would hold codes and API keys: the process forbids its own
/// (RLIMIT_CORE 0, and not dumpable, which also keeps other users' debuggers out), whatever
/// the unit or shell set. A failure is logged, not fatal: the unit's `LimitCORE=0` stands.
pub fn no_core_dumps() {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if let Err(e) = setrlimit(Resource::Core, none) {
        tracing::warn!(error = %e, "could not disable core dumps (RLIMIT_CORE)");
    }
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        tracing::warn!(error = %e, "could not mark the process not dumpable");
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit: idle connections of other local users
/// to the metrics listener, many portals and the database together must not run a rotation
/// out of descriptors (SPEC §6). Children get [`crate::sinks::exec::CHILD_NOFILE`] again
/// (the exec guard sets it before it starts a hook).
pub fn more_file_descriptors() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current != now.maximum {
        let raised = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "could not raise the soft limit of open files");
        }
    }
}

#[cfg(feature = "failpoints")]
fn setup_failpoints() -> fail::FailScenario<'static> {
    let scenario = fail::FailScenario::setup();
    // `TFA_ROTATOR_ABORT_AT=name[,name…]` kills the process at those points, as a crash would.
    if let Ok(points) = std::env::var("TFA_ROTATOR_ABORT_AT") {
        for p in points.split(',').filter(|p| !p.is_empty()) {
            let _ = fail::cfg_callback(p.to_string(), || std::process::abort());
        }
    }
    scenario
}

/// Whether the command asked for `--json`: then an invalid config is printed as JSON too.
static JSON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn json_output() -> bool {
    JSON.get().copied().unwrap_or(false)
}

/// Whether the command was run with `-q`: `check` and `status` print only the problems and
/// their summary line (SPEC §2).
static QUIET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

pub(crate) fn quiet() -> bool {
    QUIET.get().copied().unwrap_or(false)
}

/// Prints config warnings, one per line, on stderr.
pub(crate) fn print_warnings(issues: &[ConfigIssue]) {
    for i in issues {
        crate::err!("warning: {i}");
    }
}

/// Reports an invalid configuration, every problem once, in the one format of every
/// command: a line per problem (`error: FILE:LINE:COLUMN: KEY: what is wrong; accepted: …`)
/// and a count, on stderr; with `--json`, also one JSON document on stdout. Exit 78.
pub(crate) fn config_errors(issues: &[ConfigIssue]) -> Exit {
    for i in issues {
        crate::err!("error: {i}");
    }
    let n = issues.len();
    crate::err!(
        "error: the configuration is invalid ({n} error{})",
        if n == 1 { "" } else { "s" }
    );
    if json_output() {
        let errors: Vec<serde_json::Value> = issues
            .iter()
            .map(|i| {
                serde_json::json!({
                    "file": i.file.display().to_string(),
                    "line": i.loc.map(|l| l.line),
                    "column": i.loc.map(|l| l.column),
                    "key": i.key,
                    "message": i.message,
                })
            })
            .collect();
        let doc =
            serde_json::json!({ "ok": false, "error": "invalid configuration", "errors": errors });
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    }
    Exit::Config
}

/// Loads and validates the config; reports every error and gives exit 78 on failure.
pub(crate) fn load_config(path: &Path) -> Result<Arc<Config>, Exit> {
    load_config_with(path, config::Trust::Enforce)
}

/// [`load_config`], with trust violations handled as `trust` says.
pub(crate) fn load_config_with(path: &Path, trust: config::Trust) -> Result<Arc<Config>, Exit> {
    match config::load_with(path, trust) {
        Ok(c) => {
            print_warnings(&c.warnings);
            Ok(Arc::new(c))
        }
        Err(errors) => Err(config_errors(&errors.errors)),
    }
}

/// Builds the engine; config problems found while building (keys) give exit 78.
pub(crate) fn engine(config: Arc<Config>, dry_run: bool) -> Result<Engine, Exit> {
    engine_with(config, dry_run, crate::sinks::Secrets::Read)
}

/// [`engine`], reading the sinks' secrets as `secrets` says.
pub(crate) fn engine_with(
    config: Arc<Config>,
    dry_run: bool,
    secrets: crate::sinks::Secrets,
) -> Result<Engine, Exit> {
    Engine::with_secrets(config, dry_run, secrets).map_err(|e| match e {
        EngineError::Config(issues) => config_errors(&issues),
        other => {
            crate::err!("error: {other}");
            Exit::Failed
        }
    })
}

/// `run`: loads the config, builds the engine (secrets deferred: one portal's unreadable
/// credential is reported at start and fails that portal alone) and runs the daemon until
/// SIGTERM or SIGINT.
async fn run_daemon(path: &Path, dry_run: bool, once: bool) -> Exit {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(e) => return e,
    };
    let engine = match engine_with(config, dry_run, crate::sinks::Secrets::Defer) {
        Ok(e) => e,
        Err(e) => return e,
    };
    let token = tokio_util::sync::CancellationToken::new();
    let stop = token.clone();
    let signals = tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("SIGTERM or SIGINT received");
        stop.cancel();
    });
    let exit = crate::daemon::run(engine, path, once, token).await;
    signals.abort();
    let _ = signals.await;
    exit
}

/// Prints reports as text lines on stdout, or as one JSON document.
pub(crate) fn print_reports(config: &Config, reports: &[Report], json: bool) {
    if json {
        let doc = serde_json::json!({ "portals": reports });
        crate::out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        for r in reports {
            let placed = r.api_error.as_ref().and_then(|kind| {
                let pc = config.portals.get(&r.portal)?;
                placed(config, pc, &r.message, kind)
            });
            match placed {
                Some(line) => crate::out!("{line}"),
                None => crate::out!("{}: {}", r.portal, r.message),
            }
        }
    }
}

/// How a state reads at a glance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tone {
    /// Nothing to do (green).
    Good,
    /// Needs a look soon (yellow).
    Warn,
    /// Failing (red).
    Bad,
}

/// Whether `check` and `status` colour their states: stdout is a terminal, and `NO_COLOR`
/// is unset or empty (no-color.org).
fn stdout_colour() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        use std::io::IsTerminal;
        crate::logging::colour_on(std::io::stdout().is_terminal())
    })
}

/// `text` in its tone's colour when [`stdout_colour`] says so, else as it is.
pub(crate) fn paint(text: &str, tone: Tone) -> String {
    if !stdout_colour() {
        return text.to_string();
    }
    let code = match tone {
        Tone::Good => "32",
        Tone::Warn => "33",
        Tone::Bad => "1;31",
    };
    format!("\x1b[{code}m{text}\x1b[0m")
}

/// A failure every call to the portal shares (the key, the network, the URL), on one line:
/// where the portal is in the config, what failed, and a hint at the fix (SPEC §2). `None`
/// for a failure of one call only.
pub(crate) fn placed(
    config: &Config,
    pc: &crate::config::PortalConfig,
    message: &str,
    kind: &crate::docspace::ApiErrorKind,
) -> Option<String> {
    use crate::docspace::ApiErrorKind as K;
    let hint = match kind {
        K::Unauthorized => format!(
            "check its api_key (line {}) and that the key is active in the portal",
            pc.api_key.loc.line
        ),
        K::Forbidden { .. } => "the key lacks a scope: rotating needs *:read and *:write".into(),
        K::Timeout => format!(
            "check its url and the network; daemon.http_timeout is {}",
            humantime::format_duration(config.daemon.http_timeout)
        ),
        K::Transport { .. } => "check its url (host, port, TLS) and the network".into(),
        K::Redirect { .. } => {
            "set its url to the portal's final address (redirects are not followed)".into()
        }
        K::PaymentRequired => "the portal's subscription has lapsed".into(),
        _ => return None,
    };
    // The place names the portal: the error's own "portal NAME: " would say it twice.
    let message = message
        .strip_prefix(&format!("portal {}: ", pc.name))
        .unwrap_or(message);
    Some(format!(
        "{}:{}: portals.{}: {message}; hint: {hint}",
        config.file_of(Some(pc.at)).display(),
        pc.at.line,
        pc.name
    ))
}

/// 1 when any report is a failure or leaves a delivery pending.
pub(crate) fn exit_of(reports: &[Report]) -> Exit {
    if reports.iter().any(Report::is_failure) {
        Exit::Failed
    } else {
        Exit::Ok
    }
}

/// Formats Unix milliseconds for people ([`crate::schedule::fmt_utc`]), `never` for none.
pub(crate) fn fmt_ms(ms: Option<i64>) -> String {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(crate::schedule::fmt_utc)
        .unwrap_or_else(|| "never".into())
}

/// A time relative to `now`, rounded to what a person needs: `in 5h 59m`, `3m 10s ago`.
pub(crate) fn fmt_relative(ms: i64, now: chrono::DateTime<chrono::Utc>) -> String {
    let delta = ms - now.timestamp_millis();
    let secs = (delta.unsigned_abs() + 500) / 1000;
    // Above an hour, seconds are noise; above a day, minutes are.
    let secs = match secs {
        s if s >= 86_400 => s - s % 3600,
        s if s >= 3600 => s - s % 60,
        s => s,
    };
    let d = humantime::format_duration(std::time::Duration::from_secs(secs)).to_string();
    match (secs, delta >= 0) {
        (0, _) => "now".into(),
        (_, true) => format!("in {d}"),
        (_, false) => format!("{d} ago"),
    }
}
