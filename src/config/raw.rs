//! The config file as written: serde structs, one per table, that reject unknown keys.
//!
//! Values that validation checks beyond their type are `Spanned`, so an error can name the
//! line and column. Nothing here has meaning yet; `validate` turns these into [`super::Config`].

use schemars::JsonSchema;
use serde::Deserialize;
use toml::Spanned;

use super::secret::SecretRef;

/// `[daemon]`: how the process runs.
#[derive(Deserialize, Default, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// Where the SQLite state lives; default `$STATE_DIRECTORY`, else `/var/lib/tfa-rotator`.
    #[schemars(with = "Option<String>")]
    pub state_dir: Option<Spanned<String>>,
    /// Address of the Prometheus `/metrics` and `/healthz` listener.
    #[schemars(with = "Option<String>")]
    pub metrics: Option<Spanned<String>>,
    /// Must be true for a metrics address that is not loopback.
    pub metrics_public: Option<bool>,
    /// Rotations in flight at once, all portals together; default 64.
    #[schemars(with = "Option<i64>")]
    pub max_concurrent: Option<Spanned<i64>>,
    /// Rotations in flight at once against one portal host; default 8.
    #[schemars(with = "Option<i64>")]
    pub max_per_host: Option<Spanned<i64>>,
    /// On SIGTERM, how long rotations past their intent get to seal; default 10s.
    #[schemars(with = "Option<String>")]
    pub stop_timeout: Option<Spanned<String>>,
    /// Timeout of one HTTP request to a portal; default 30s.
    #[schemars(with = "Option<String>")]
    pub http_timeout: Option<Spanned<String>>,
    /// Audit records older than this are pruned, leaving a checkpoint; default 400d.
    #[schemars(with = "Option<String>")]
    pub history_keep: Option<Spanned<String>>,
}

/// `[smtp]`: the mail server for email sinks.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSmtp {
    /// Host name of the server.
    #[schemars(with = "String")]
    pub host: Spanned<String>,
    /// Port; default 587 for starttls, 465 for tls, 25 for none.
    #[schemars(with = "Option<i64>")]
    pub port: Option<Spanned<i64>>,
    /// `"starttls"` (default), `"tls"` or `"none"` (loopback only).
    #[schemars(with = "Option<String>", extend("enum" = ["starttls", "tls", "none", null]))]
    pub security: Option<Spanned<String>>,
    /// AUTH user name; no AUTH when absent.
    #[schemars(with = "Option<String>")]
    pub username: Option<Spanned<String>>,
    /// AUTH password.
    #[schemars(with = "Option<SecretRef>")]
    pub password: Option<Spanned<SecretRef>>,
    /// The From address.
    #[schemars(with = "String")]
    pub from: Spanned<String>,
    /// An extra CA certificate (PEM) to trust besides the system's.
    #[schemars(with = "Option<String>")]
    pub ca_file: Option<Spanned<String>>,
    /// Bound of each SMTP step (three times it bounds a conversation); default 30s.
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Spanned<String>>,
    /// Conversations with the server at once; default 4.
    #[schemars(with = "Option<i64>")]
    pub max_sessions: Option<Spanned<i64>>,
}

/// `[schedules.NAME]`: when portals rotate.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    /// 5 fields, or 6 with seconds first, or `@hourly` … `@yearly`.
    #[schemars(with = "String")]
    pub cron: Spanned<String>,
    /// IANA time zone; default UTC.
    #[schemars(with = "Option<String>")]
    pub timezone: Option<Spanned<String>>,
    /// Random delay in `[0, jitter)`, fixed per portal.
    #[schemars(with = "Option<String>")]
    pub jitter: Option<Spanned<String>>,
    /// Run a fire time missed while down once at start; default true.
    pub catch_up: Option<bool>,
    /// Rotate a portal when its entry changes; default true.
    pub rotate_on_change: Option<bool>,
    /// Never rotate one portal more often than this; default none.
    #[schemars(with = "Option<String>")]
    pub min_interval: Option<Spanned<String>>,
    /// Rotate when fewer unused codes remain.
    #[schemars(with = "Option<i64>")]
    pub rotate_when_unused_below: Option<Spanned<i64>>,
    /// How often every portal is read (unused count, drift); default 6h; `"off"` disables.
    #[schemars(with = "Option<String>")]
    pub watch_every: Option<Spanned<String>>,
    /// The portal's set changed outside us: `"resend"` (default) or `"rotate"`.
    #[schemars(with = "Option<String>", extend("enum" = ["resend", "rotate", null]))]
    pub on_drift: Option<Spanned<String>>,
    /// How long a PUT of unknown outcome is re-checked by GET; default 15m.
    #[schemars(with = "Option<String>")]
    pub settle_window: Option<Spanned<String>>,
}

/// `[sinks.NAME]`: where codes go. One struct for every type, so that a key that belongs to
/// another type gets a clear error instead of serde's untagged guesswork.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    /// `"email"`, `"file"`, `"exec"` or `"webhook"`.
    #[serde(rename = "type")]
    #[schemars(with = "String", extend("enum" = ["email", "file", "exec", "webhook"]))]
    pub kind: Spanned<String>,
    /// email: recipient addresses.
    #[schemars(with = "Option<Vec<String>>")]
    pub to: Option<Spanned<Vec<Spanned<String>>>>,
    /// email: ASCII-armored public keys, together covering every address in `to`.
    #[schemars(with = "Option<Vec<String>>")]
    pub pgp_keys: Option<Spanned<Vec<Spanned<String>>>>,
    /// email, instead of `pgp_keys`: X.509 certificates (PEM), one per address (S/MIME).
    #[schemars(with = "Option<Vec<String>>")]
    pub smime_certs: Option<Spanned<Vec<Spanned<String>>>>,
    /// email, with `smime_certs`: the trust anchors (PEM) the certificates must chain to.
    #[schemars(with = "Option<String>")]
    pub smime_ca: Option<Spanned<String>>,
    /// file: target path, `{portal}` replaced by the portal's name.
    #[schemars(with = "Option<String>")]
    pub path: Option<Spanned<String>>,
    /// file, exec: `{ age = [...] }` or `{ pgp_keys = [...] }`; absent means plain text.
    #[schemars(with = "Option<RawEncrypt>")]
    pub encrypt: Option<Spanned<RawEncrypt>>,
    /// file: octal mode, default "0600"; wider than 0640 is refused.
    #[schemars(with = "Option<String>")]
    pub mode: Option<Spanned<String>>,
    /// exec: the argv, `{portal}` replaced by the portal's name.
    #[schemars(with = "Option<Vec<String>>")]
    pub command: Option<Spanned<Vec<Spanned<String>>>>,
    /// exec: environment variables besides PATH, HOME and TFA_*: strings or secret references.
    #[schemars(with = "Option<std::collections::BTreeMap<String, SecretRef>>")]
    pub env: Option<Spanned<std::collections::BTreeMap<String, Spanned<SecretRef>>>>,
    /// exec: how long the hook may run; default 30s. webhook: how long one POST may take;
    /// default 10s, at most 60s.
    #[schemars(with = "Option<String>")]
    pub timeout: Option<Spanned<String>>,
    /// file: with `[storage] type = "postgres"`, true when every instance sees this path
    /// (required there); default false.
    #[schemars(with = "Option<bool>")]
    pub shared: Option<Spanned<bool>>,
    /// webhook: where events are POSTed; https (http only to a loopback host).
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
    /// webhook: the HMAC-SHA256 key of `X-TFA-Signature-256`, a secret reference.
    #[schemars(with = "Option<SecretRef>")]
    pub secret: Option<Spanned<SecretRef>>,
    /// webhook: an extra CA certificate (PEM) to trust besides the system's.
    #[schemars(with = "Option<String>")]
    pub ca_file: Option<Spanned<String>>,
    /// webhook: the events sent; default all ("failed" stands for both failures).
    #[schemars(with = "Option<Vec<String>>")]
    pub events: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[storage]`: where the state lives.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawStorage {
    /// `"sqlite"` (default, in `daemon.state_dir`) or `"postgres"` (several instances).
    #[serde(rename = "type")]
    #[schemars(with = "String", extend("enum" = ["sqlite", "postgres"]))]
    pub kind: Spanned<String>,
    /// postgres: a libpq connection string or `postgresql://` URL, as a secret reference
    /// (it may hold a password).
    #[schemars(with = "Option<SecretRef>")]
    pub url: Option<Spanned<SecretRef>>,
    /// postgres: how long a claim on a portal lasts unrenewed; at least
    /// 2 x (http_timeout + 10s), which is the default when longer than 60s.
    #[schemars(with = "Option<String>")]
    pub lease: Option<Spanned<String>>,
    /// postgres: how long past a PUT's deadline another instance still waits before it
    /// settles the intent as not applied (the PUT may still be on its way); 1s to 60s,
    /// default 10s.
    #[schemars(with = "Option<String>")]
    pub grace: Option<Spanned<String>>,
    /// postgres: this instance's name in `status` and the leases; default HOSTNAME:PID.
    #[schemars(with = "Option<String>")]
    pub instance: Option<Spanned<String>>,
    /// postgres: an extra CA certificate (PEM) to trust besides the system's, for TLS
    /// (`sslmode=require` in the url).
    #[schemars(with = "Option<String>")]
    pub ca_file: Option<Spanned<String>>,
}

/// A file sink's encryption.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawEncrypt {
    /// age recipients (`age1…` or SSH public keys).
    #[schemars(with = "Option<Vec<String>>")]
    pub age: Option<Vec<Spanned<String>>>,
    /// ASCII-armored OpenPGP public keys.
    #[schemars(with = "Option<Vec<String>>")]
    pub pgp_keys: Option<Vec<Spanned<String>>>,
}

/// `[alerts]`: who hears about failures.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Email or webhook sinks that receive the notices.
    #[schemars(with = "Vec<String>")]
    pub sinks: Spanned<Vec<Spanned<String>>>,
    /// Consecutive failed rotations before a notice; default 3.
    #[schemars(with = "Option<i64>")]
    pub after_failures: Option<Spanned<i64>>,
    /// A delivery pending longer than this raises a notice; default 1h.
    #[schemars(with = "Option<String>")]
    pub pending_longer_than: Option<Spanned<String>>,
}

/// `[portals.NAME]`: one DocSpace account.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPortal {
    /// Base URL of the portal.
    #[schemars(with = "String")]
    pub url: Spanned<String>,
    /// The account's API key.
    #[schemars(with = "SecretRef")]
    pub api_key: Spanned<SecretRef>,
    /// Name of a `[schedules.*]` entry; absent means manual rotation only.
    #[schemars(with = "Option<String>")]
    pub schedule: Option<Spanned<String>>,
    /// Names of `[sinks.*]` entries; at least one.
    #[schemars(with = "Vec<String>")]
    pub sinks: Spanned<Vec<Spanned<String>>>,
}

/// The whole file, for its JSON Schema only: validation walks the document itself, table by
/// table, so that every error is found and placed.
#[derive(JsonSchema)]
#[schemars(
    deny_unknown_fields,
    title = "tfa-rotator configuration",
    description = "The config file of tfa-rotator (TOML). `tfa-rotator check --offline` checks what a schema cannot: references, key files, cron expressions, durations."
)]
#[allow(dead_code)]
pub struct RawConfig {
    /// More files holding `[portals.*]`, `[sinks.*]` and `[schedules.*]`: globs relative to
    /// this file's directory, read in name order (no nested `include`).
    pub include: Option<Vec<String>>,
    /// How the process runs.
    pub daemon: Option<RawDaemon>,
    /// The mail server of the email sinks.
    pub smtp: Option<RawSmtp>,
    /// Who hears about failures.
    pub alerts: Option<RawAlerts>,
    /// Where the state lives.
    pub storage: Option<RawStorage>,
    /// When portals rotate, by name.
    pub schedules: Option<std::collections::BTreeMap<String, RawSchedule>>,
    /// Where codes go, by name.
    pub sinks: Option<std::collections::BTreeMap<String, RawSink>>,
    /// The DocSpace accounts, by name.
    pub portals: Option<std::collections::BTreeMap<String, RawPortal>>,
}

/// The config's JSON Schema (draft 2020-12), as `config/tfa-rotator.schema.json` holds it.
pub fn schema() -> String {
    let schema = schemars::schema_for!(RawConfig);
    serde_json::to_string_pretty(&schema).unwrap_or_default() + "\n"
}
