//! The config file as written: serde structs, one per table, that reject unknown keys.
//!
//! Values that validation checks beyond their type are `Spanned`, so an error can name the
//! line and column. Nothing here has meaning yet; `validate` turns these into [`super::Config`].

use serde::Deserialize;
use toml::Spanned;

use super::secret::SecretRef;

/// `[daemon]`: how the process runs.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// Where the SQLite state lives; default `$STATE_DIRECTORY`, else `/var/lib/tfa-rotator`.
    pub state_dir: Option<Spanned<String>>,
    /// Address of the Prometheus `/metrics` and `/healthz` listener.
    pub metrics: Option<Spanned<String>>,
    /// Must be true for a metrics address that is not loopback.
    pub metrics_public: Option<bool>,
    /// Rotations in flight at once, all portals together; default 64.
    pub max_concurrent: Option<Spanned<i64>>,
    /// Rotations in flight at once against one portal host; default 8.
    pub max_per_host: Option<Spanned<i64>>,
    /// On SIGTERM, how long rotations past their intent get to seal; default 10s.
    pub stop_timeout: Option<Spanned<String>>,
    /// Timeout of one HTTP request to a portal; default 30s.
    pub http_timeout: Option<Spanned<String>>,
}

/// `[smtp]`: the mail server for email sinks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    /// Host name of the server.
    pub host: Spanned<String>,
    /// Port; default 587 for starttls, 465 for tls, 25 for none.
    pub port: Option<Spanned<i64>>,
    /// `"starttls"` (default), `"tls"` or `"none"` (loopback only).
    pub security: Option<Spanned<String>>,
    /// AUTH user name; no AUTH when absent.
    pub username: Option<Spanned<String>>,
    /// AUTH password.
    pub password: Option<Spanned<SecretRef>>,
    /// The From address.
    pub from: Spanned<String>,
    /// An extra CA certificate (PEM) to trust besides the system's.
    pub ca_file: Option<Spanned<String>>,
    /// Bound of each SMTP step (three times it bounds a conversation); default 30s.
    pub timeout: Option<Spanned<String>>,
    /// Conversations with the server at once; default 4.
    pub max_sessions: Option<Spanned<i64>>,
}

/// `[schedules.NAME]`: when portals rotate.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    /// 5 fields, or 6 with seconds first, or `@hourly` … `@yearly`.
    pub cron: Spanned<String>,
    /// IANA time zone; default UTC.
    pub timezone: Option<Spanned<String>>,
    /// Random delay in `[0, jitter)`, fixed per portal.
    pub jitter: Option<Spanned<String>>,
    /// Run a fire time missed while down once at start; default true.
    pub catch_up: Option<bool>,
    /// Rotate a portal when its entry changes; default true.
    pub rotate_on_change: Option<bool>,
    /// Never rotate one portal more often than this; default none.
    pub min_interval: Option<Spanned<String>>,
    /// Rotate when fewer unused codes remain.
    pub rotate_when_unused_below: Option<Spanned<i64>>,
    /// How often every portal is read (unused count, drift); default 6h; `"off"` disables.
    pub watch_every: Option<Spanned<String>>,
    /// The portal's set changed outside us: `"resend"` (default) or `"rotate"`.
    pub on_drift: Option<Spanned<String>>,
    /// How long a PUT of unknown outcome is re-checked by GET; default 15m.
    pub settle_window: Option<Spanned<String>>,
}

/// `[sinks.NAME]`: where codes go. One struct for every type, so that a key that belongs to
/// another type gets a clear error instead of serde's untagged guesswork.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    /// `"email"`, `"file"` or `"exec"`.
    #[serde(rename = "type")]
    pub kind: Spanned<String>,
    /// email: recipient addresses.
    pub to: Option<Spanned<Vec<Spanned<String>>>>,
    /// email: ASCII-armored public keys, together covering every address in `to`.
    pub pgp_keys: Option<Spanned<Vec<Spanned<String>>>>,
    /// file: target path, `{portal}` replaced by the portal's name.
    pub path: Option<Spanned<String>>,
    /// file, exec: `{ age = [...] }` or `{ pgp_keys = [...] }`; absent means plain text.
    pub encrypt: Option<Spanned<RawEncrypt>>,
    /// file: octal mode, default "0600"; wider than 0640 is refused.
    pub mode: Option<Spanned<String>>,
    /// exec: the argv, `{portal}` replaced by the portal's name.
    pub command: Option<Spanned<Vec<Spanned<String>>>>,
    /// exec: environment variables besides PATH, HOME and TFA_*: strings or secret references.
    pub env: Option<Spanned<std::collections::BTreeMap<String, Spanned<SecretRef>>>>,
    /// exec: how long the hook may run; default 30s.
    pub timeout: Option<Spanned<String>>,
}

/// A file sink's encryption.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEncrypt {
    /// age recipients (`age1…` or SSH public keys).
    pub age: Option<Vec<Spanned<String>>>,
    /// ASCII-armored OpenPGP public keys.
    pub pgp_keys: Option<Vec<Spanned<String>>>,
}

/// `[alerts]`: who hears about failures.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Email sinks that receive the notices.
    pub sinks: Spanned<Vec<Spanned<String>>>,
    /// Consecutive failed rotations before a notice; default 3.
    pub after_failures: Option<Spanned<i64>>,
    /// A delivery pending longer than this raises a notice; default 1h.
    pub pending_longer_than: Option<Spanned<String>>,
}

/// `[portals.NAME]`: one DocSpace account.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPortal {
    /// Base URL of the portal.
    pub url: Spanned<String>,
    /// The account's API key.
    pub api_key: Spanned<SecretRef>,
    /// Name of a `[schedules.*]` entry; absent means manual rotation only.
    pub schedule: Option<Spanned<String>>,
    /// Names of `[sinks.*]` entries; at least one.
    pub sinks: Spanned<Vec<Spanned<String>>>,
}
