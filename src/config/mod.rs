//! The configuration: one TOML file of portals, schedules and sinks.
//!
//! Loading has two stages. [`load`] reads the file and turns it into a typed [`Config`]:
//! syntax, types, unknown keys, names, references, cron, time zones, durations, URLs and
//! age recipients, all without touching the network or any other file. Every problem is
//! collected with its file, line, column and key, so an operator fixes them all in one pass.
//! Reading keys and secrets is the second stage (`sinks::build`, [`SecretRef::resolve`]).

mod inputs;
mod raw;
pub use inputs::{DEFAULT_PATH, find_program};
pub use raw::schema;
pub mod secret;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use url::Url;

pub use secret::SecretRef;

pub use crate::schedule::{
    Convergence, DEFAULT_SETTLE_WINDOW, DEFAULT_WATCH_EVERY, OnDrift, ScheduleConfig,
};

/// Where in the config file something was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Loc {
    /// Which file: an index into [`Config::files`] (0 is the config file itself, then the
    /// included files).
    pub file: usize,
    /// 1-based line.
    pub line: usize,
    /// 1-based column (in characters).
    pub column: usize,
}

/// A value with the place it was written, for errors found after parsing (key files, secrets).
#[derive(Debug)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    /// Where it was written.
    pub loc: Loc,
}

/// One problem in the config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The config file.
    pub file: PathBuf,
    /// Where; `None` when the problem is the file itself.
    pub loc: Option<Loc>,
    /// The dotted key, like `portals.acme.url`.
    pub key: String,
    /// What is wrong and what is accepted.
    pub message: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.loc {
            Some(l) => write!(f, "{}:{}:{}: ", self.file.display(), l.line, l.column)?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// Every problem found in a config file; the process exits with 78 (`EX_CONFIG`).
#[derive(Debug, thiserror::Error)]
pub struct ConfigErrors {
    /// The problems, in file order.
    pub errors: Vec<ConfigIssue>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        write!(
            f,
            "the configuration is invalid ({n} error{})",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// The whole, validated configuration.
#[derive(Debug)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// Every file the config was read from: `path`, then the included files in the order
    /// they were read ([`Loc::file`] indexes this).
    pub files: Vec<PathBuf>,
    /// The directories `include` reads (each pattern's, and each included file's): the
    /// daemon watches them, so a file added there is seen.
    pub include_dirs: Vec<PathBuf>,
    /// `[daemon]`.
    pub daemon: DaemonConfig,
    /// `[smtp]`, present when any email sink exists.
    pub smtp: Option<SmtpConfig>,
    /// `[schedules.*]` by name.
    pub schedules: BTreeMap<String, ScheduleConfig>,
    /// `[sinks.*]` by name.
    pub sinks: BTreeMap<String, SinkConfig>,
    /// `[alerts]`.
    pub alerts: Option<AlertsConfig>,
    /// `[storage] type = "postgres"`: the shared database; `None`: SQLite in `state_dir`.
    pub storage: Option<StorageConfig>,
    /// `[portals.*]` by name.
    pub portals: BTreeMap<String, PortalConfig>,
    /// Things that work but deserve attention (literal secrets).
    pub warnings: Vec<ConfigIssue>,
    /// A SHA-256 digest of the text as loaded, the included files' names and texts with it
    /// (no secret: no key): what "the same config" means between the instances of a cluster
    /// (its config generations).
    pub text_fp: String,
}

/// `[daemon]`.
#[derive(Debug)]
pub struct DaemonConfig {
    /// The state directory (SQLite database, locks).
    pub state_dir: PathBuf,
    /// Prometheus listener.
    pub metrics: Option<SocketAddr>,
    /// Rotations in flight at once.
    pub max_concurrent: usize,
    /// Rotations in flight at once against one portal host (scheme, host and port).
    pub max_per_host: usize,
    /// On SIGTERM, how long rotations past their intent get to seal.
    pub stop_timeout: Duration,
    /// Timeout of one HTTP request.
    pub http_timeout: Duration,
    /// Audit records older than this are pruned (SPEC §6).
    pub history_keep: Duration,
}

impl DaemonConfig {
    /// The default [`DaemonConfig::history_keep`].
    pub const HISTORY_KEEP: Duration = Duration::from_secs(400 * 86_400);
}

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpSecurity {
    /// Plain connection upgraded by STARTTLS (required).
    StartTls,
    /// Implicit TLS from the first byte.
    Tls,
    /// No TLS; only to a loopback host.
    None,
}

/// `[smtp]`.
#[derive(Debug)]
pub struct SmtpConfig {
    /// Server host.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// TLS mode.
    pub security: SmtpSecurity,
    /// AUTH user.
    pub username: Option<String>,
    /// AUTH password reference.
    pub password: Option<Located<SecretRef>>,
    /// From address.
    pub from: String,
    /// Extra CA file.
    pub ca_file: Option<Located<PathBuf>>,
    /// Bound of each step of a conversation (three times it bounds the whole).
    pub timeout: Duration,
    /// Conversations with the server at once.
    pub max_sessions: usize,
}

/// `[sinks.NAME]`.
#[derive(Debug)]
pub struct SinkConfig {
    /// The sink's name.
    pub name: String,
    /// What kind of sink, with its settings.
    pub kind: SinkKind,
}

/// A sink's type and settings.
#[derive(Debug)]
pub enum SinkKind {
    /// PGP/MIME email.
    Email(EmailSinkConfig),
    /// A file written atomically.
    File(FileSinkConfig),
    /// A hook: a program that gets the payload on its standard input.
    Exec(ExecSinkConfig),
    /// Events (never codes), POSTed signed to a URL.
    Webhook(WebhookSinkConfig),
}

/// A webhook sink (SPEC §5).
#[derive(Debug)]
pub struct WebhookSinkConfig {
    /// Where events are POSTed.
    pub url: Located<Url>,
    /// The HMAC-SHA256 key (shared with the built sink, which reads it at each send).
    pub secret: Located<std::sync::Arc<SecretRef>>,
    /// An extra trust anchor (PEM).
    pub ca_file: Option<Located<PathBuf>>,
    /// The events it is sent.
    pub events: std::collections::BTreeSet<String>,
    /// Bound of one POST.
    pub timeout: Duration,
}

/// An exec sink.
#[derive(Debug)]
pub struct ExecSinkConfig {
    /// The argv; `{portal}` is replaced by the portal's name.
    pub command: Vec<String>,
    /// Where `command` was written.
    pub command_loc: Loc,
    /// The program, resolved against the hook's `PATH` to an absolute path when the config
    /// was loaded and checked by the trust rule (`None`: not found then; the preflight looks
    /// again and says why).
    pub program: Option<PathBuf>,
    /// The `env` table, in order of name.
    pub env: Vec<(String, EnvValue)>,
    /// How long the hook may run.
    pub timeout: Duration,
    /// How the payload is encrypted.
    pub encrypt: FileEncryption,
}

/// A value of an exec sink's `env` table.
#[derive(Debug, Clone)]
pub enum EnvValue {
    /// A plain string, as written.
    Plain(String),
    /// A secret reference, read at each delivery.
    Secret(std::sync::Arc<SecretRef>),
}

/// An email sink.
#[derive(Debug)]
pub struct EmailSinkConfig {
    /// Recipients, lowercased, each where it was written.
    pub to: Vec<Located<String>>,
    /// Their OpenPGP public keys (empty for S/MIME).
    pub pgp_keys: Vec<Located<PathBuf>>,
    /// S/MIME instead of OpenPGP: their certificates and the CA they chain to.
    pub smime: Option<SmimeConfig>,
}

/// An email sink's S/MIME recipients.
#[derive(Debug)]
pub struct SmimeConfig {
    /// Certificate files (PEM).
    pub certs: Vec<Located<PathBuf>>,
    /// The trust anchors (PEM).
    pub ca: Located<PathBuf>,
}

/// `[storage] type = "postgres"`: several instances share one PostgreSQL database.
#[derive(Debug)]
pub struct StorageConfig {
    /// The connection string (a secret: it may hold a password).
    pub url: Located<SecretRef>,
    /// How long a claim lasts unrenewed.
    pub lease: Duration,
    /// The grace added to the PUT budget: a claim must outlive budget + grace for an
    /// intent, and a successor waits the deadline + grace out before settling.
    pub grace: Duration,
    /// This instance's name; default HOSTNAME:PID.
    pub instance: Option<String>,
    /// An extra CA to trust for TLS.
    pub ca_file: Option<Located<PathBuf>>,
}

impl StorageConfig {
    /// The default [`StorageConfig::grace`].
    pub const GRACE: Duration = Duration::from_secs(10);
    /// The least grace accepted: a PUT written to the socket just before its deadline
    /// reaches the portal well within it.
    pub const MIN_GRACE: Duration = Duration::from_secs(1);
    /// The most grace accepted (it delays every settle after a crash).
    pub const MAX_GRACE: Duration = Duration::from_secs(60);
}

/// A file sink.
#[derive(Debug)]
pub struct FileSinkConfig {
    /// Path template; `{portal}` is replaced by the portal's name.
    pub path: String,
    /// How the content is encrypted.
    pub encrypt: FileEncryption,
    /// Unix mode of the file.
    pub mode: u32,
    /// Every instance of a cluster sees this path.
    pub shared: bool,
}

impl FileSinkConfig {
    /// The file this sink writes for `portal`.
    pub fn path_for(&self, portal: &str) -> PathBuf {
        PathBuf::from(self.path.replace("{portal}", portal))
    }
}

/// Encryption of a file sink.
#[derive(Debug)]
pub enum FileEncryption {
    /// Plain text.
    Plain,
    /// age, to these recipients, each where it was written.
    Age(Vec<Located<String>>),
    /// OpenPGP, to these keys (ASCII armor).
    Pgp(Vec<Located<PathBuf>>),
}

/// `[alerts]`.
#[derive(Debug)]
pub struct AlertsConfig {
    /// Email sinks that get the notices.
    pub sinks: Vec<String>,
    /// Failures in a row before a notice.
    pub after_failures: u32,
    /// Pending age before a notice.
    pub pending_longer_than: Duration,
}

/// `alerts.pending_longer_than` when unset (and what `status --failing` uses without
/// `[alerts]`).
pub const DEFAULT_PENDING_LONGER_THAN: Duration = Duration::from_secs(3600);

/// `[portals.NAME]`.
#[derive(Debug)]
pub struct PortalConfig {
    /// The portal's name.
    pub name: String,
    /// Base URL, always ending in `/`.
    pub url: Url,
    /// API key reference.
    pub api_key: Located<SecretRef>,
    /// Schedule name.
    pub schedule: Option<String>,
    /// The sinks that receive its codes (email, file, exec), by name.
    pub sinks: Vec<String>,
    /// The webhook sinks it lists: they receive its events, never its codes.
    pub webhooks: Vec<String>,
    /// Where its table is in the config (`config.toml:LINE`, for a runtime error's hint).
    pub at: Loc,
}

impl Config {
    /// The schedule of a portal, if it has one.
    pub fn schedule_of(&self, portal: &PortalConfig) -> Option<&ScheduleConfig> {
        portal.schedule.as_ref().and_then(|s| self.schedules.get(s))
    }

    /// The convergence policy of a portal (its schedule's, or the defaults).
    pub fn convergence_of(&self, portal: &PortalConfig) -> Convergence {
        self.schedule_of(portal)
            .map(|s| Convergence {
                watch_every: s.watch_every,
                on_drift: s.on_drift,
                settle_window: s.settle_window,
            })
            .unwrap_or_default()
    }

    /// The file a location is in (the config file itself without one).
    pub fn file_of(&self, loc: Option<Loc>) -> &Path {
        loc.and_then(|l| self.files.get(l.file))
            .unwrap_or(&self.path)
    }

    /// A problem found after loading (a key file, a secret), placed like a validation error.
    pub fn issue(
        &self,
        loc: Option<Loc>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> ConfigIssue {
        ConfigIssue {
            file: self.file_of(loc).to_path_buf(),
            loc,
            key: key.into(),
            message: message.into(),
        }
    }
}

/// What a load does with a file that fails the trust rule (SPEC §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// An error: the config is not used (start, reload, `check`, every command).
    Enforce,
    /// A warning: `check --offline` runs nothing and reads no secret, and CI checkouts are
    /// often writable by group or others.
    Warn,
}

/// Reads and validates a config file, enforcing the trust rule on it and on every file it
/// names.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, Trust::Enforce)
}

/// [`load`], with trust violations handled as `trust` says.
pub fn load_with(path: &Path, trust: Trust) -> Result<Config, ConfigErrors> {
    let file_issue = |message: String| ConfigIssue {
        file: path.to_path_buf(),
        loc: None,
        key: String::new(),
        message,
    };
    let mut walker = crate::trust::Walker::new();
    // The config itself first: a config another user can write is one they can add a hook
    // to. A file that cannot be opened is reported by the read below.
    let mut untrusted = match walker.file(path) {
        Err(e)
            if !matches!(
                e.problem,
                crate::trust::Problem::Io(_) | crate::trust::Problem::Missing
            ) =>
        {
            vec![file_issue(e.to_string())]
        }
        _ => Vec::new(),
    };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        errors: vec![file_issue(format!("reading the config file: {e}"))],
    })?;
    let others_can_read = {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path)
            .map(|m| m.permissions().mode() & 0o004 != 0)
            .unwrap_or(true)
            || acl_lets_others_read(path)
    };
    // Each included file passes the trust rule before it is read (a violation: the file is
    // not used, and said below; offline, a warning and the file is read).
    let mut refused_includes = Vec::new();
    let mut read = |p: &Path| -> Result<Option<(String, bool)>, String> {
        if let Err(e) = walker.file(p)
            && !matches!(
                e.problem,
                crate::trust::Problem::Io(_) | crate::trust::Problem::Missing
            )
        {
            refused_includes.push(ConfigIssue {
                file: p.to_path_buf(),
                loc: None,
                key: String::new(),
                message: e.to_string(),
            });
            if trust == Trust::Enforce {
                return Ok(None);
            }
        }
        validate::read_included(p)
            .map(|r| r.map(|(t, others)| (t, others || acl_lets_others_read(p))))
    };
    let parsed = validate::validate(&text, path, others_can_read, &mut read);
    untrusted.append(&mut refused_includes);
    let mut config = match parsed {
        Ok(c) => c,
        Err(mut e) if trust == Trust::Enforce => {
            untrusted.append(&mut e.errors);
            return Err(ConfigErrors { errors: untrusted });
        }
        Err(e) => return Err(e),
    };
    untrusted.extend(inputs::check(&mut config, &mut walker));
    match trust {
        Trust::Enforce if !untrusted.is_empty() => Err(ConfigErrors { errors: untrusted }),
        Trust::Enforce => Ok(config),
        Trust::Warn => {
            config.warnings.extend(untrusted);
            Ok(config)
        }
    }
}

/// Whether a POSIX ACL on `path` lets a named user or group read it: the mode shows the
/// owner, the owning group and others, an ACL can add anyone.
fn acl_lets_others_read(path: &Path) -> bool {
    let mut buf = [0u8; 4096];
    match rustix::fs::getxattr(path, "system.posix_acl_access", &mut buf[..]) {
        Ok(n) => acl_grants_named_read(&buf[..n.min(buf.len())]),
        Err(_) => false,
    }
}

/// Parses the kernel's ACL blob (a version word, then 8-byte entries of tag, permissions and
/// id, little-endian): a named user (tag 2) or group (8) entry with read, not masked off.
fn acl_grants_named_read(blob: &[u8]) -> bool {
    let Some(entries) = blob.get(4..) else {
        return false;
    };
    let (mut named_read, mut mask) = (false, 0o7u16);
    for e in entries.chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        match tag {
            0x02 | 0x08 if perm & 0o4 != 0 => named_read = true,
            0x10 => mask = perm,
            _ => {}
        }
    }
    named_read && mask & 0o4 != 0
}

/// Validates config text as if read from `path`. `others_can_read` is whether the file is
/// readable by other users, which decides whether literal secrets are refused.
pub fn parse(text: &str, path: &Path, others_can_read: bool) -> Result<Config, ConfigErrors> {
    validate::validate(text, path, others_can_read, &mut validate::read_included)
}

/// The default config path: `$TFA_ROTATOR_CONFIG`, else `/etc/tfa-rotator/config.toml`.
pub fn default_path() -> PathBuf {
    std::env::var_os("TFA_ROTATOR_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/tfa-rotator/config.toml"))
}

/// Parses `"90s"`, `"15m"`, `"6h"`, `"30d"` (and combinations `humantime` accepts).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|_| {
        format!("`{s}` is not a duration; accepted: a number and a unit, like \"90s\", \"15m\", \"6h\", \"30d\"")
    })
}

/// True for `localhost`, 127.0.0.0/8 and `::1`.
pub fn is_loopback_host(host: &str) -> bool {
    let h = host.trim_start_matches('[').trim_end_matches(']');
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

#[cfg(test)]
mod acl_tests {
    use super::acl_grants_named_read;

    fn entry(tag: u16, perm: u16, id: u32) -> Vec<u8> {
        [tag.to_le_bytes(), perm.to_le_bytes()]
            .concat()
            .into_iter()
            .chain(id.to_le_bytes())
            .collect()
    }

    #[test]
    fn named_read_entries_count_unless_masked() {
        let base = |extra: Vec<u8>, mask: u16| {
            let mut b = 2u32.to_le_bytes().to_vec();
            b.extend(entry(0x01, 6, u32::MAX));
            b.extend(extra);
            b.extend(entry(0x04, 0, u32::MAX));
            b.extend(entry(0x10, mask, u32::MAX));
            b.extend(entry(0x20, 0, u32::MAX));
            b
        };
        assert!(acl_grants_named_read(&base(entry(0x02, 4, 1000), 4)));
        assert!(acl_grants_named_read(&base(entry(0x08, 4, 100), 7)));
        assert!(
            !acl_grants_named_read(&base(entry(0x02, 4, 1000), 0)),
            "masked off"
        );
        assert!(
            !acl_grants_named_read(&base(entry(0x02, 2, 1000), 7)),
            "write only"
        );
        assert!(!acl_grants_named_read(&base(Vec::new(), 7)));
        assert!(!acl_grants_named_read(&[]));
    }
}
