//! Where codes go. Every sink does three things, in the order the rotation
//! protocol needs them:
//! - `preflight`: proves delivery can work, with no side effect a reader could see;
//! - `seal`: turns the new set into the exact bytes to deliver (encrypted where configured),
//!   which the spool stores before any delivery begins;
//! - `deliver`: hands those bytes over; may fail and be retried, any number of times.
//!
//! [`build`] turns the config's sinks into ready [`Sink`]s, reading and checking keys; its
//! errors carry the config location of the key that failed.

pub mod email;
pub mod exec;
pub mod file;
pub mod webhook;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use url::Url;
use zeroize::Zeroizing;

use crate::config::{Config, ConfigIssue, FileEncryption, Located, SinkKind};
use crate::crypto::age::AgeRecipients;
use crate::crypto::pgp::{self, PgpKey};
use crate::docspace::Account;
use crate::secret::{CodeSet, ExposeSecret};

pub use email::EmailSink;
pub use exec::ExecSink;
pub use file::FileSink;
pub use webhook::WebhookSink;

/// A sink could not be prepared or could not seal.
#[derive(Debug, thiserror::Error)]
#[error("sink {sink}: {message}")]
pub struct SinkError {
    /// The sink.
    pub sink: String,
    /// What failed.
    pub message: String,
}

/// A delivery attempt failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct DeliveryError {
    /// True when retrying can help without anyone acting (connection refused, 4xx).
    pub temporary: bool,
    /// What failed.
    pub message: String,
    /// A partial delivery (some mail recipients refused): what is left to deliver, which
    /// replaces the spooled payload. `None`: the payload stays as it was.
    pub rest: Option<Zeroizing<Vec<u8>>>,
}

impl DeliveryError {
    /// A failure that retrying may cure.
    pub fn temporary(message: impl Into<String>) -> Self {
        Self {
            temporary: true,
            message: message.into(),
            rest: None,
        }
    }
    /// A refusal that needs someone to act (the payload is kept; `deliver` retries it).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            temporary: false,
            message: message.into(),
            rest: None,
        }
    }
}

/// What a sealed message says besides the codes.
pub struct Delivery<'a> {
    /// Portal name.
    pub portal: &'a str,
    /// Portal URL.
    pub url: &'a Url,
    /// The account the codes belong to.
    pub account: &'a Account,
    /// When the set was issued (or read, for a resend).
    pub at: DateTime<Utc>,
    /// The codes.
    pub codes: &'a CodeSet,
    /// True for a new set (the old codes are dead), false for a resend of the current one.
    pub rotated: bool,
}

impl Delivery<'_> {
    /// `Display Name <email>`, or the email alone.
    fn who(&self) -> String {
        if self.account.display_name.is_empty() {
            self.account.email.clone()
        } else {
            format!("{} <{}>", self.account.display_name, self.account.email)
        }
    }

    /// How many codes of the set were already used (they are not listed).
    fn used(&self) -> usize {
        self.codes.total() - self.codes.unused()
    }

    /// The codes that still work, in the portal's order.
    fn unused_codes(&self) -> impl Iterator<Item = &str> {
        self.codes
            .iter()
            .filter(|c| !c.used)
            .map(|c| c.code.expose_secret())
    }

    /// The plain text every file sink encrypts: a short header, then one unused code per line.
    pub fn render(&self) -> Zeroizing<String> {
        // Grown without leaving copies of the codes behind, then moved into the String.
        let mut s = crate::secret::SecretBuf::with_capacity(512 + 72 * self.codes.total());
        let who = self.who();
        // Writing to a String cannot fail.
        let _ = writeln!(s, "# tfa-rotator backup codes");
        let _ = writeln!(s, "# portal: {} ({})", self.portal, self.url);
        let _ = writeln!(s, "# account: {who}");
        let _ = writeln!(s, "# issued: {}", crate::schedule::fmt_utc(self.at));
        if self.rotated {
            let _ = writeln!(
                s,
                "# Each code works once. The previous codes no longer work."
            );
        } else {
            let _ = writeln!(
                s,
                "# Each code works once. These are the current codes, sent again."
            );
        }
        let used = self.used();
        if used > 0 {
            let _ = writeln!(s, "# {used} code(s) already used are not listed.");
        }
        for c in self.unused_codes() {
            s.extend(c.as_bytes());
            s.extend(b"\n");
        }
        // Only text was written.
        s.into_string().unwrap_or_default()
    }

    /// The subject of a mail carrying this set (it travels encrypted).
    pub fn subject(&self) -> String {
        let what = if self.rotated { "New" } else { "Current" };
        format!(
            "{what} two-factor backup codes for {} ({})",
            self.portal, self.account.email
        )
    }

    /// The body of a mail carrying this set: who, where, when, then the codes.
    pub fn render_mail(&self) -> Zeroizing<String> {
        let mut s = crate::secret::SecretBuf::with_capacity(1024 + 72 * self.codes.total());
        let who = self.who();
        let what = if self.rotated { "New" } else { "The current" };
        let _ = writeln!(
            s,
            "{what} two-factor backup codes for your ONLYOFFICE DocSpace account.\n"
        );
        let _ = writeln!(s, "Portal:  {} ({})", self.portal, self.url);
        let _ = writeln!(s, "Account: {who}");
        let _ = writeln!(s, "Issued:  {}\n", self.at.format("%Y-%m-%d %H:%M:%S UTC"));
        if self.rotated {
            let _ = writeln!(
                s,
                "Each code works once. The previous codes no longer work.\n"
            );
        } else {
            let _ = writeln!(
                s,
                "Each code works once. These are the codes valid now, sent again.\n"
            );
        }
        for c in self.unused_codes() {
            s.extend(b"    ");
            s.extend(c.as_bytes());
            s.extend(b"\n");
        }
        let used = self.used();
        if used > 0 {
            let _ = writeln!(s, "\n({used} code(s) already used are not listed.)");
        }
        let _ = writeln!(
            s,
            "\nKeep them somewhere safe and offline.\n-- \ntfa-rotator"
        );
        // Only text was written.
        s.into_string().unwrap_or_default()
    }
}

/// A ready sink.
pub enum Sink {
    /// A file. Shared, so that its blocking I/O can run on the blocking pool.
    File(Arc<FileSink>),
    /// PGP/MIME email.
    Email(EmailSink),
    /// A hook program.
    Exec(ExecSink),
    /// Events, never codes: no portal's `sinks` holds one ([`crate::config::PortalConfig::webhooks`]
    /// does), so it is never sealed for or delivered a set.
    Webhook(WebhookSink),
}

impl Sink {
    /// The sink's name.
    pub fn name(&self) -> &str {
        match self {
            Sink::File(f) => &f.name,
            Sink::Email(e) => &e.name,
            Sink::Exec(x) => &x.name,
            Sink::Webhook(w) => &w.name,
        }
    }

    /// Whether payloads are encrypted (the spool then holds no plain text).
    pub fn encrypted(&self) -> bool {
        match self {
            Sink::File(f) => f.encrypted(),
            Sink::Email(_) => true,
            Sink::Exec(x) => x.encrypted(),
            // It is sent no codes.
            Sink::Webhook(_) => true,
        }
    }

    /// What identifies where and to whom this sink delivers for `portal`: part of the
    /// portal's entry fingerprint, so a change of recipients or keys is a change.
    pub fn identity(&self, portal: &str) -> String {
        match self {
            Sink::File(f) => f.identity(portal),
            Sink::Email(e) => e.identity(),
            Sink::Exec(x) => x.identity(portal),
            Sink::Webhook(w) => format!("webhook {}", w.url()),
        }
    }

    /// A one-line description for `check`.
    pub fn describe(&self, portal: &str) -> String {
        match self {
            Sink::File(f) => f.describe(portal),
            Sink::Email(e) => e.describe(),
            Sink::Exec(x) => x.describe(portal),
            Sink::Webhook(w) => w.describe(),
        }
    }

    /// Proves delivery can work for `portal`, without delivering. `probe`, the current set
    /// when it was read, is sealed by an email sink to see whether the server takes a
    /// message that size.
    pub async fn preflight(
        &self,
        portal: &str,
        probe: Option<&Delivery<'_>>,
    ) -> Result<(), SinkError> {
        match self {
            Sink::File(f) => {
                let (f, portal) = (f.clone(), portal.to_string());
                blocking(move || f.preflight(&portal))
                    .await
                    .unwrap_or_else(|message| {
                        Err(SinkError {
                            sink: self.name().to_string(),
                            message,
                        })
                    })
            }
            Sink::Email(e) => {
                let size = match probe {
                    Some(d) => Some(self.seal(d)?.len()),
                    None => None,
                };
                e.preflight(size).await
            }
            Sink::Exec(x) => x.preflight(),
            // Not contacted (SPEC §5): a webhook that is down never holds a rotation back.
            Sink::Webhook(w) => match w.unreadable_secret() {
                None => Ok(()),
                Some(e) => Err(SinkError {
                    sink: w.name.clone(),
                    message: format!("secret: {e}"),
                }),
            },
        }
    }

    /// Who it encrypts to whose key expires, with when: an email sink's addresses, a file or
    /// exec sink's OpenPGP fingerprints.
    pub fn expiries(&self) -> Vec<(String, std::time::SystemTime)> {
        match self {
            Sink::File(f) => f.expiries(),
            Sink::Email(e) => e.expiries(),
            Sink::Exec(x) => x.expiries(),
            Sink::Webhook(_) => Vec::new(),
        }
    }

    /// A secret this sink needs that cannot be read now, with why.
    pub fn unreadable_secret(&self) -> Option<String> {
        match self {
            Sink::File(_) => None,
            Sink::Email(e) => e.unreadable_secret().map(str::to_string),
            Sink::Exec(x) => x.unreadable_secret(),
            Sink::Webhook(w) => w.unreadable_secret().map(|e| format!("secret: {e}")),
        }
    }

    /// The bytes to deliver.
    pub fn seal(&self, d: &Delivery<'_>) -> Result<Vec<u8>, SinkError> {
        match self {
            Sink::File(f) => f.seal(d.render().as_bytes()),
            Sink::Email(e) => e.seal(&email::Letter {
                subject: d.subject(),
                body: &d.render_mail(),
            }),
            Sink::Exec(x) => x.seal(&d.account.email, d.url.as_str(), d.render().as_bytes()),
            Sink::Webhook(w) => Err(SinkError {
                sink: w.name.clone(),
                message: "a webhook is sent events, never codes".into(),
            }),
        }
    }

    /// Delivers sealed bytes.
    pub async fn deliver(&self, portal: &str, payload: &[u8]) -> Result<(), DeliveryError> {
        match self {
            Sink::File(f) => {
                // Two fsyncs and a rename: off the async workers, so that the HTTP of other
                // rotations goes on meanwhile.
                let (f, portal) = (f.clone(), portal.to_string());
                let payload = Zeroizing::new(payload.to_vec());
                blocking(move || f.deliver(&portal, &payload))
                    .await
                    .unwrap_or_else(|m| Err(DeliveryError::temporary(m)))
            }
            Sink::Email(e) => e.deliver(payload).await,
            Sink::Exec(x) => x.deliver(portal, payload).await,
            Sink::Webhook(_) => Err(DeliveryError::permanent(
                "a webhook is sent events, never codes",
            )),
        }
    }
}

/// Runs blocking file work on the blocking pool; `Err` only if the task itself was lost.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| format!("the file task failed: {e}"))
}

/// Every sink of a config, built.
#[derive(Clone, Default)]
pub struct Sinks {
    by_name: BTreeMap<String, Arc<Sink>>,
}

impl Sinks {
    /// A sink by name.
    pub fn get(&self, name: &str) -> Option<&Arc<Sink>> {
        self.by_name.get(name)
    }

    /// Every recipient key that expires: (sink, recipient, when), by sink.
    pub fn expiries(&self) -> Vec<Expiry> {
        self.by_name
            .iter()
            .flat_map(|(name, s)| {
                s.expiries().into_iter().map(|(recipient, at)| Expiry {
                    sink: name.clone(),
                    recipient,
                    at,
                })
            })
            .collect()
    }
}

/// A recipient's key that expires (SPEC §5, "Expiry ahead").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// The sink.
    pub sink: String,
    /// An address (email sinks) or a key fingerprint.
    pub recipient: String,
    /// When the key stops being usable.
    pub at: std::time::SystemTime,
}

impl Expiry {
    /// `check` warns this long before.
    pub const WARN: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
    /// `[alerts]` announce it this long before.
    pub const ALERT: std::time::Duration = std::time::Duration::from_secs(14 * 86_400);

    /// Whole days from `now` to the expiry, rounded to the nearest.
    pub fn days_left(&self, now: std::time::SystemTime) -> u64 {
        self.at
            .duration_since(now)
            .map_or(0, |d| (d.as_secs() + 43_200) / 86_400)
    }

    /// Whether it is within `ahead` of `now`.
    pub fn within(&self, ahead: std::time::Duration, now: std::time::SystemTime) -> bool {
        self.at <= now + ahead
    }

    /// The expiry as a date, `2027-01-05`.
    pub fn date(&self) -> String {
        crate::crypto::day(self.at)
    }

    /// "sinks.mail: the key of ed@rotator.test expires on 2027-01-05, in 10 days; …".
    pub fn warning(&self, now: std::time::SystemTime) -> String {
        format!(
            "sinks.{}: the key of {} expires on {}, in {} day(s); extend or replace it before then (an expired key stops every rotation that delivers to it)",
            self.sink,
            self.recipient,
            self.date(),
            self.days_left(now)
        )
    }
}

fn load_pgp(
    config: &Config,
    key: &str,
    keys: &[Located<std::path::PathBuf>],
    issues: &mut Vec<ConfigIssue>,
) -> Vec<PgpKey> {
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for k in keys {
        match pgp::load_keys(&k.value, now) {
            Ok(mut ks) => out.append(&mut ks),
            Err(e) => issues.push(config.issue(Some(k.loc), key, e)),
        }
    }
    out
}

/// An email sink: its addresses (placeholders refused first), its keys, the key of each
/// address.
fn email_sink(
    config: &Config,
    name: &str,
    ec: &crate::config::EmailSinkConfig,
    smtp: Option<&Arc<email::Smtp>>,
    issues: &mut Vec<ConfigIssue>,
) -> Option<Sink> {
    let before = issues.len();
    // An example address is refused before anything else is asked of it (which key
    // covers it).
    issues.extend(placeholder_issues(config, name, "to", &ec.to, |a| {
        crate::placeholder::address(a)
    }));
    let (key, keys, loc) = match &ec.smime {
        None => {
            let key = format!("sinks.{name}.pgp_keys");
            let keys = load_pgp(config, &key, &ec.pgp_keys, issues);
            (
                key,
                email::Recipients::Pgp(keys),
                ec.pgp_keys.first().map(|k| k.loc),
            )
        }
        Some(s) => {
            let key = format!("sinks.{name}.smime_certs");
            let certs = load_smime(config, name, s, issues);
            (
                key,
                email::Recipients::Smime(certs),
                s.certs.first().map(|c| c.loc),
            )
        }
    };
    let to: Vec<String> = ec.to.iter().map(|a| a.value.clone()).collect();
    match (smtp, issues.len() == before) {
        (Some(smtp), true) => match EmailSink::new(name, &to, keys, smtp.clone()) {
            Ok(s) => Some(Sink::Email(s)),
            Err(e) => {
                issues.push(config.issue(loc, key, e));
                None
            }
        },
        _ => None,
    }
}

/// A webhook sink: its URL (an example host refused first), its secret (read unless
/// `secrets` says not to), its `ca_file`.
fn webhook_sink(
    config: &Config,
    name: &str,
    wc: &crate::config::WebhookSinkConfig,
    secrets: Secrets,
    issues: &mut Vec<ConfigIssue>,
) -> Option<Sink> {
    if let Some(why) = crate::placeholder::webhook_url(&wc.url.value) {
        issues.push(config.issue(Some(wc.url.loc), format!("sinks.{name}.url"), why));
        return None;
    }
    if secrets == Secrets::Read
        && let Err(e) = wc.secret.value.resolve()
    {
        issues.push(config.issue(Some(wc.secret.loc), format!("sinks.{name}.secret"), e));
        return None;
    }
    match WebhookSink::new(name, wc) {
        Ok(w) => Some(Sink::Webhook(w)),
        Err(e) => {
            let loc = wc.ca_file.as_ref().map_or(wc.url.loc, |c| c.loc);
            issues.push(config.issue(Some(loc), format!("sinks.{name}.ca_file"), e));
            None
        }
    }
}

/// One issue per recipient of `sinks.NAME.KEY` that is a placeholder (SPEC §3), at its line.
fn placeholder_issues(
    config: &Config,
    sink: &str,
    key: &str,
    recipients: &[Located<String>],
    why: impl Fn(&str) -> Option<String>,
) -> Vec<ConfigIssue> {
    recipients
        .iter()
        .filter_map(|r| {
            why(&r.value).map(|m| config.issue(Some(r.loc), format!("sinks.{sink}.{key}"), m))
        })
        .collect()
}

/// Reads `smime_ca` and checks every certificate of `smime_certs` against it.
fn load_smime(
    config: &Config,
    sink: &str,
    s: &crate::config::SmimeConfig,
    issues: &mut Vec<ConfigIssue>,
) -> Vec<crate::crypto::smime::SmimeCert> {
    use crate::crypto::smime;
    let anchors = match smime::Anchors::load(&s.ca.value) {
        Ok(a) => a,
        Err(e) => {
            issues.push(config.issue(Some(s.ca.loc), format!("sinks.{sink}.smime_ca"), e));
            return Vec::new();
        }
    };
    let now = std::time::SystemTime::now();
    let mut out = Vec::new();
    for c in &s.certs {
        match smime::load_certs(&c.value, &anchors, now) {
            Ok(mut certs) => out.append(&mut certs),
            Err(e) => {
                issues.push(config.issue(Some(c.loc), format!("sinks.{sink}.smime_certs"), e))
            }
        }
    }
    out
}

/// Two portals never write one file: their targets are compared with the directories'
/// links followed (`out/../out/x` and a linked directory are the same file). The config's
/// own check compares the written paths; this one needs the file system, so it runs when the
/// sinks are built. A directory that cannot be opened yet is left to the preflight.
fn same_file_twice(
    config: &Config,
    sinks: &BTreeMap<String, Arc<Sink>>,
    issues: &mut Vec<ConfigIssue>,
) {
    let mut seen: BTreeMap<std::path::PathBuf, (String, String)> = BTreeMap::new();
    for pc in config.portals.values() {
        for sink_name in &pc.sinks {
            let Some(Sink::File(f)) = sinks.get(sink_name).map(|s| s.as_ref()) else {
                continue;
            };
            let Some(resolved) = f.resolved_target(&pc.name) else {
                continue;
            };
            match seen.get(&resolved) {
                Some((p, s)) if p != &pc.name => issues.push(config.issue(
                    None,
                    format!("sinks.{sink_name}.path"),
                    format!(
                        "portals {p} (sink {s}) and {} (sink {sink_name}) would both write {}; \
                         one portal's codes would overwrite the other's",
                        pc.name,
                        resolved.display()
                    ),
                )),
                Some(_) => {}
                None => {
                    seen.insert(resolved, (pc.name.clone(), sink_name.clone()));
                }
            }
        }
    }
}

/// Whether building reads secret values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrets {
    /// Resolve them (every command that may connect).
    Read,
    /// Read none (`check --offline`, `status`): nothing built this way connects.
    Skip,
    /// Read them, but one that cannot be read fails only the sinks that need it, at their
    /// preflight (the daemon: the other portals keep working).
    Defer,
}

/// Builds every sink: reads and checks keys, and the SMTP password. Errors are placed like
/// config errors.
pub fn build(config: &Config) -> Result<Sinks, Vec<ConfigIssue>> {
    build_with(config, Secrets::Read)
}

/// [`build`], reading secret values or not.
pub fn build_with(config: &Config, secrets: Secrets) -> Result<Sinks, Vec<ConfigIssue>> {
    let mut issues = Vec::new();
    let mut by_name = BTreeMap::new();
    let mut unreadable = None;
    let password = match (&config.smtp, secrets) {
        (Some(c), Secrets::Read | Secrets::Defer) => {
            c.password.as_ref().and_then(|p| match p.value.resolve() {
                Ok(s) => Some(s),
                Err(e) if secrets == Secrets::Defer => {
                    unreadable = Some(format!("smtp.password: {e}"));
                    None
                }
                Err(e) => {
                    issues.push(config.issue(Some(p.loc), "smtp.password", e));
                    None
                }
            })
        }
        _ => None,
    };
    let smtp = match &config.smtp {
        None => None,
        Some(_) if !issues.is_empty() => None,
        Some(c) => match email::Smtp::build(c, password) {
            Ok(s) => Some(Arc::new(s.with_unreadable_password(unreadable))),
            Err(e) => {
                issues.push(config.issue(None, "smtp", e));
                None
            }
        },
    };
    for (name, sc) in &config.sinks {
        let mut cipher_of = |encrypt: &FileEncryption| match encrypt {
            FileEncryption::Plain => Some(file::FileCipher::Plain),
            FileEncryption::Age(list) => {
                let placeholders = placeholder_issues(config, name, "encrypt.age", list, |r| {
                    crate::placeholder::age_recipient(r)
                });
                if !placeholders.is_empty() {
                    issues.extend(placeholders);
                    return None;
                }
                let list: Vec<String> = list.iter().map(|r| r.value.clone()).collect();
                match AgeRecipients::parse(&list) {
                    Ok(r) => Some(file::FileCipher::Age(r)),
                    Err(e) => {
                        issues.push(config.issue(None, format!("sinks.{name}.encrypt.age"), e));
                        None
                    }
                }
            }
            FileEncryption::Pgp(keys) => {
                let before = issues.len();
                let key = format!("sinks.{name}.encrypt.pgp_keys");
                let loaded = load_pgp(config, &key, keys, &mut issues);
                (issues.len() == before).then_some(file::FileCipher::Pgp(loaded))
            }
        };
        let sink = match &sc.kind {
            SinkKind::File(fc) => {
                cipher_of(&fc.encrypt).map(|c| Sink::File(Arc::new(FileSink::new(name, fc, c))))
            }
            SinkKind::Exec(xc) => cipher_of(&xc.encrypt).map(|c| {
                let base = config.path.parent().unwrap_or(Path::new("."));
                Sink::Exec(ExecSink::new(name, xc, c, &config.daemon.state_dir, base))
            }),
            SinkKind::Email(ec) => email_sink(config, name, ec, smtp.as_ref(), &mut issues),
            SinkKind::Webhook(wc) => webhook_sink(config, name, wc, secrets, &mut issues),
        };
        if let Some(s) = sink {
            by_name.insert(name.clone(), Arc::new(s));
        }
    }
    same_file_twice(config, &by_name, &mut issues);
    // In the files' order, like the validation's errors: the config file, then each
    // included file, each by line (those without a place last).
    issues.sort_by_key(|i| {
        i.loc
            .map_or((usize::MAX, 0, 0), |l| (l.file, l.line, l.column))
    });
    if issues.is_empty() {
        Ok(Sinks { by_name })
    } else {
        Err(issues)
    }
}
