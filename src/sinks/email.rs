//! The email sink: PGP/MIME over SMTP that GnuPG and Thunderbird read.
//!
//! A message is RFC 3156 `multipart/encrypted; protocol="application/pgp-encrypted"`: a
//! `Version: 1` part, then the ASCII-armored SEIPD v1 (AES-256) message, encrypted once to
//! every recipient's key. Headers are protected as RFC 9788 does it: the real Subject, From,
//! To and Date live in the encrypted part (`protected-headers="v1"`, `hp="cipher"`); the
//! visible Subject is `[...]` and the Message-ID is random and names no host. Mail is never
//! sent unencrypted: a sink without a key for every recipient does not build.
//!
//! The sealed payload is the whole message plus its envelope, so a delivery retried after a
//! restart sends exactly what was sealed, to exactly whom it was sealed for.

use std::sync::Arc;
use std::time::Duration;

use lettre::address::Envelope;
use lettre::message::header::{self, ContentType};
use lettre::message::{Mailbox, MultiPart, SinglePart};
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, Certificate, TlsParameters};
use lettre::transport::smtp::commands::{Data, Ehlo, Mail, Rcpt, Rset};
use lettre::transport::smtp::extension::{ClientId, Extension, MailBodyParameter, MailParameter};
use lettre::{Address, Message};
use rand::Rng;
use tokio::sync::Semaphore;

use super::{DeliveryError, SinkError};
use crate::config::{SmtpConfig, SmtpSecurity};
use crate::crypto::pgp::{self, PgpKey};
use crate::crypto::smime::{self, SmimeCert};
use crate::secret::{ExposeSecret, SecretString};

/// The ready SMTP settings shared by every email sink.
///
/// Every conversation is driven step by step (connect and greeting, STARTTLS, AUTH, MAIL,
/// each RCPT, DATA, the message, QUIT), each step bounded by `timeout` and the whole by three
/// times it, so a server that accepts and never answers holds nothing longer than that. At
/// most `max_sessions` conversations run at once; waiting for one is bounded by `timeout`.
pub struct Smtp {
    host: String,
    port: u16,
    security: SmtpSecurity,
    credentials: Option<(String, SecretString)>,
    /// The From mailbox.
    pub from: Mailbox,
    /// The extra CA of `ca_file`, parsed once by `build`.
    ca: Option<Certificate>,
    /// The TLS settings, made at the first conversation and kept: making them reads the
    /// system's certificate store, which every conversation would otherwise do again.
    tls: std::sync::OnceLock<Result<TlsParameters, String>>,
    timeout: Duration,
    sessions: Semaphore,
    /// The password could not be read (built with `Secrets::Defer`): every conversation
    /// fails with this, before connecting.
    unreadable: Option<String>,
}

/// Why a conversation failed: what the server said (or did not), and whether it refused.
#[derive(Debug)]
struct Failure {
    message: String,
    /// A 5xx answer: retrying the same thing cannot help until someone acts.
    permanent: bool,
}

impl Failure {
    fn temporary(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            permanent: false,
        }
    }
}

/// Recipients the server refused at `RCPT TO`, with its answer.
type Refused = Vec<(Address, Failure)>;

/// One failure for refused recipients, each named with the server's answer; permanent
/// when every refusal is.
fn refusal(refused: &Refused, how: &str) -> Failure {
    Failure {
        permanent: refused.iter().all(|(_, f)| f.permanent),
        message: refused
            .iter()
            .map(|(a, f)| format!("recipient <{a}> {how}: {}", f.message))
            .collect::<Vec<_>>()
            .join("; "),
    }
}

impl Smtp {
    /// Builds from the config and the password (resolved by the caller, which places its
    /// errors; `None` without one, or when the caller reads no secret); reads the CA file.
    pub fn build(c: &SmtpConfig, password: Option<SecretString>) -> Result<Self, String> {
        let from: Mailbox = c
            .from
            .parse()
            .map_err(|e| format!("smtp.from `{}`: {e}", c.from))?;
        let credentials = c.username.as_ref().map(|u| {
            (
                u.clone(),
                password.unwrap_or_else(|| SecretString::from("")),
            )
        });
        let ca = match &c.ca_file {
            None => None,
            Some(p) => {
                let p = &p.value;
                let pem =
                    std::fs::read(p).map_err(|e| format!("smtp.ca_file {}: {e}", p.display()))?;
                // An empty file or one with only a key would "parse" and trust nothing.
                if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!(
                        "smtp.ca_file {}: holds no certificate; accepted: one or more PEM \
                         certificates (-----BEGIN CERTIFICATE-----)",
                        p.display()
                    ));
                }
                Some(Certificate::from_pem(&pem).map_err(|e| {
                    format!("smtp.ca_file {}: not a PEM certificate: {e}", p.display())
                })?)
            }
        };
        Ok(Self {
            host: c.host.clone(),
            port: c.port,
            security: c.security,
            credentials,
            from,
            ca,
            tls: std::sync::OnceLock::new(),
            timeout: c.timeout,
            sessions: Semaphore::new(c.max_sessions),
            unreadable: None,
        })
    }

    /// Marks the password unreadable (`why`): conversations fail with it until a reload.
    pub fn with_unreadable_password(mut self, why: Option<String>) -> Self {
        self.unreadable = why;
        self
    }

    /// Why the password could not be read, if it could not.
    pub fn unreadable(&self) -> Option<&str> {
        self.unreadable.as_deref()
    }

    fn tls(&self) -> Result<TlsParameters, Failure> {
        self.tls
            .get_or_init(|| {
                let mut b = TlsParameters::builder(self.host.clone());
                if let Some(ca) = &self.ca {
                    b = b.add_root_certificate(ca.clone());
                }
                b.build_rustls().map_err(|e| format!("TLS setup: {e}"))
            })
            .clone()
            .map_err(Failure::temporary)
    }

    /// One step of a conversation, bounded by `timeout`.
    async fn step<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, lettre::transport::smtp::Error>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Failure {
                message: format!("{what}: {}", crate::errors::chain(&e)),
                permanent: e.is_permanent(),
            }),
            Err(_) => Err(Failure::temporary(format!(
                "{what}: no answer within {} (smtp.timeout)",
                humantime::format_duration(self.timeout)
            ))),
        }
    }

    /// A whole conversation: a session slot, then `talk` under three times `timeout`. The
    /// error names the server.
    async fn conversation<T>(
        &self,
        talk: impl Future<Output = Result<T, Failure>>,
    ) -> Result<T, Failure> {
        let at = |f: Failure| Failure {
            message: format!("SMTP {}:{}: {}", self.host, self.port, f.message),
            permanent: f.permanent,
        };
        let _session = match tokio::time::timeout(self.timeout, self.sessions.acquire()).await {
            Ok(Ok(permit)) => permit,
            // The semaphore is never closed; a wait longer than `timeout` is retried later.
            _ => {
                return Err(at(Failure::temporary(
                    "every session (smtp.max_sessions) stayed busy for smtp.timeout",
                )));
            }
        };
        match tokio::time::timeout(self.timeout * 3, talk).await {
            Ok(r) => r.map_err(at),
            Err(_) => Err(at(Failure::temporary(format!(
                "the conversation took longer than {} (3 x smtp.timeout)",
                humantime::format_duration(self.timeout * 3)
            )))),
        }
    }

    /// Connects, reads the greeting, secures the connection and logs in; with `size`, also
    /// asks the server (EHLO again, before AUTH) the largest message it takes.
    async fn open(&self, size: bool) -> Result<(AsyncSmtpConnection, Option<u64>), Failure> {
        if let Some(why) = &self.unreadable {
            return Err(Failure::temporary(why.clone()));
        }
        let hello = ClientId::default();
        let implicit = match self.security {
            SmtpSecurity::Tls => Some(self.tls()?),
            _ => None,
        };
        let mut conn = self
            .step(
                "connecting (TCP, TLS and the greeting)",
                AsyncSmtpConnection::connect_tokio1(
                    (self.host.as_str(), self.port),
                    Some(self.timeout),
                    &hello,
                    implicit,
                    None,
                ),
            )
            .await?;
        if self.security == SmtpSecurity::StartTls {
            if !conn.can_starttls() {
                return Err(Failure {
                    message: "the server does not offer STARTTLS (smtp.security = \"starttls\")"
                        .into(),
                    permanent: true,
                });
            }
            let tls = self.tls()?;
            self.step("STARTTLS", conn.starttls(tls, &hello)).await?;
        }
        // lettre keeps only the EHLO answer's features it knows, not SIZE: ask again.
        let limit = if size {
            let answer = self.step("EHLO", conn.command(Ehlo::new(hello))).await?;
            size_limit(answer.message())
        } else {
            None
        };
        if let Some((user, pass)) = &self.credentials {
            let credentials = Credentials::new(user.clone(), pass.expose_secret().to_string());
            self.step("AUTH", conn.auth(DEFAULT_MECHANISMS, &credentials))
                .await?;
        }
        Ok((conn, limit))
    }

    /// `MAIL FROM`, then `RCPT TO` for each of `to`: the recipients the server refused.
    /// Fails when the sender is refused.
    async fn envelope(
        &self,
        conn: &mut AsyncSmtpConnection,
        to: &[Address],
        body_8bit: bool,
    ) -> Result<Refused, Failure> {
        let mut params = Vec::new();
        if body_8bit {
            params.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        let from = self.from.email.clone();
        self.step(
            &format!("MAIL FROM <{from}>"),
            conn.command(Mail::new(Some(from.clone()), params)),
        )
        .await
        .map_err(|f| Failure {
            message: if self.credentials.is_none() {
                format!(
                    "{} (does the server need AUTH? set smtp.username)",
                    f.message
                )
            } else {
                f.message
            },
            permanent: f.permanent,
        })?;
        let mut refused = Vec::new();
        for a in to {
            if let Err(mut f) = self
                .step(
                    &format!("RCPT TO <{a}>"),
                    conn.command(Rcpt::new(a.clone(), vec![])),
                )
                .await
            {
                // Postfix refuses relaying without AUTH at RCPT, with 554 "Relay access denied".
                let lower = f.message.to_ascii_lowercase();
                if self.credentials.is_none()
                    && (lower.contains("(554)")
                        || lower.contains("(530)")
                        || lower.contains("relay"))
                {
                    f.message
                        .push_str(" (does the server need AUTH? set smtp.username)");
                }
                refused.push((a.clone(), f));
            }
        }
        Ok(refused)
    }

    /// Goes as far as the server's answer to `RCPT TO` for every recipient, then `RSET`
    /// and `QUIT`: what the server would refuse is refused now, naming the address. With an
    /// `estimate` of the message's size, the server's `SIZE` (RFC 1870) must allow it.
    pub async fn preflight(&self, to: &[Address], estimate: Option<usize>) -> Result<(), String> {
        self.conversation(async {
            let (mut conn, limit) = self.open(estimate.is_some()).await?;
            if let (Some(limit), Some(estimate)) = (limit, estimate)
                && estimate as u64 > limit
            {
                let _ = self.step("QUIT", conn.quit()).await;
                return Err(Failure {
                    message: format!(
                        "the message would be about {estimate} bytes (this set's, sealed, and 10 % to spare) and the server takes at most {limit} (its SIZE); raise the server's limit (Postfix: message_size_limit)"
                    ),
                    permanent: true,
                });
            }
            let refused = self.envelope(&mut conn, to, false).await?;
            // Nothing was sent; a server that does not answer these is no reason to fail.
            let _ = self.step("RSET", conn.command(Rset)).await;
            let _ = self.step("QUIT", conn.quit()).await;
            if refused.is_empty() {
                Ok(())
            } else {
                Err(refusal(&refused, "would be refused"))
            }
        })
        .await
        .map_err(|f| f.message)
    }

    /// Sends raw message bytes to the envelope's recipients. Recipients the server refuses
    /// do not stop the others: they come back, with its answer, for a later attempt.
    async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<Refused, Failure> {
        self.conversation(async {
            let (mut conn, _) = self.open(false).await?;
            let body_8bit =
                !message.is_ascii() && conn.server_info().supports_feature(Extension::EightBitMime);
            let refused = self.envelope(&mut conn, envelope.to(), body_8bit).await?;
            if refused.len() == envelope.to().len() {
                let _ = self.step("QUIT", conn.quit()).await;
                return Err(refusal(&refused, "refused"));
            }
            self.step("DATA", conn.command(Data)).await?;
            self.step("sending the message", conn.message(message))
                .await?;
            // The server took the message; its answer to QUIT changes nothing.
            let _ = self.step("QUIT", conn.quit()).await;
            Ok(refused)
        })
        .await
    }
}

/// A built email sink.
pub struct EmailSink {
    /// Sink name.
    pub name: String,
    to: Vec<Mailbox>,
    keys: Recipients,
    smtp: Arc<Smtp>,
}

/// Whom an email sink encrypts to: OpenPGP keys (PGP/MIME) or certificates (S/MIME).
#[derive(Clone, Debug)]
pub enum Recipients {
    /// PGP/MIME (RFC 3156).
    Pgp(Vec<PgpKey>),
    /// S/MIME (RFC 8551).
    Smime(Vec<SmimeCert>),
}

impl Recipients {
    /// The addresses each key or certificate names, with its fingerprint and expiry.
    fn each(&self) -> Vec<(&[String], &str, Option<std::time::SystemTime>)> {
        match self {
            Recipients::Pgp(keys) => keys
                .iter()
                .map(|k| (k.emails.as_slice(), k.fingerprint.as_str(), k.expires))
                .collect(),
            Recipients::Smime(certs) => certs
                .iter()
                .map(|c| (c.emails.as_slice(), c.fingerprint.as_str(), Some(c.expires)))
                .collect(),
        }
    }

    /// Only the keys or certificates at `indices`, in that order.
    fn only(&self, indices: &[usize]) -> Self {
        match self {
            Recipients::Pgp(k) => Recipients::Pgp(indices.iter().map(|&i| k[i].clone()).collect()),
            Recipients::Smime(c) => {
                Recipients::Smime(indices.iter().map(|&i| c[i].clone()).collect())
            }
        }
    }
}

/// The index of the entry of [`Recipients::each`] that names `addr`.
fn covering(
    each: &[(&[String], &str, Option<std::time::SystemTime>)],
    addr: &str,
) -> Option<usize> {
    each.iter()
        .position(|(emails, ..)| emails.iter().any(|e| e.eq_ignore_ascii_case(addr)))
}

/// What a message says, before encryption.
pub struct Letter<'a> {
    /// The real subject (protected).
    pub subject: String,
    /// The plain-text body.
    pub body: &'a str,
}

impl EmailSink {
    /// Checks that every address has a key (or certificate) among `keys`; encrypts to
    /// those that cover one.
    pub fn new(
        name: &str,
        to: &[String],
        keys: Recipients,
        smtp: Arc<Smtp>,
    ) -> Result<Self, String> {
        let each = keys.each();
        let mut used: Vec<usize> = Vec::new();
        let mut boxes = Vec::new();
        for addr in to {
            let i = covering(&each, addr).ok_or_else(|| {
                let have: Vec<String> = each.iter().flat_map(|(e, ..)| e.to_vec()).collect();
                let have = if have.is_empty() { "no addresses".into() } else { have.join(", ") };
                match keys {
                    Recipients::Pgp(_) => format!(
                        "no key in pgp_keys covers `{addr}` (the keys' user IDs hold: {have}); mail is never sent unencrypted"
                    ),
                    Recipients::Smime(_) => format!(
                        "no certificate in smime_certs names `{addr}` (their subjectAltName rfc822Names hold: {have}); mail is never sent unencrypted"
                    ),
                }
            })?;
            if !used.contains(&i) {
                used.push(i);
            }
            let a: Address = addr.parse().map_err(|e| format!("`{addr}`: {e}"))?;
            boxes.push(Mailbox::new(None, a));
        }
        Ok(Self {
            name: name.to_string(),
            to: boxes,
            keys: keys.only(&used),
            smtp,
        })
    }

    /// Each address whose key expires, with when.
    pub fn expiries(&self) -> Vec<(String, std::time::SystemTime)> {
        let each = self.keys.each();
        self.to
            .iter()
            .filter_map(|m| {
                let addr = m.email.to_string();
                let i = covering(&each, &addr)?;
                each[i].2.map(|e| (addr, e))
            })
            .collect()
    }

    /// Why the SMTP password could not be read, if it could not.
    pub fn unreadable_secret(&self) -> Option<&str> {
        self.smtp.unreadable()
    }

    /// What identifies to whom this sink sends (no secrets).
    pub fn identity(&self) -> String {
        let to: Vec<String> = self.to.iter().map(|m| m.email.to_string()).collect();
        let each = self.keys.each();
        let fprs: Vec<&str> = each.iter().map(|(_, f, _)| *f).collect();
        match self.keys {
            // As before S/MIME existed: an OpenPGP sink's identity, and so its portals'
            // entry fingerprints, did not change.
            Recipients::Pgp(_) => format!("email to {} keys {}", to.join(","), fprs.join(",")),
            Recipients::Smime(_) => {
                format!("email to {} smime {}", to.join(","), fprs.join(","))
            }
        }
    }

    /// A description for `check`.
    pub fn describe(&self) -> String {
        let to: Vec<String> = self.to.iter().map(|m| m.email.to_string()).collect();
        match &self.keys {
            Recipients::Pgp(k) => {
                format!("email to {} (OpenPGP, {} key(s))", to.join(", "), k.len())
            }
            Recipients::Smime(c) => format!(
                "email to {} (S/MIME, {} certificate(s))",
                to.join(", "),
                c.len()
            ),
        }
    }

    /// Proves the SMTP server can be reached, secured and logged into, takes every
    /// recipient, and takes a message of `sealed` bytes (the current set's, sealed) with 10 %
    /// to spare.
    pub async fn preflight(&self, sealed: Option<usize>) -> Result<(), SinkError> {
        let to: Vec<Address> = self.to.iter().map(|m| m.email.clone()).collect();
        let estimate = sealed.map(|n| n + n / 10);
        self.smtp
            .preflight(&to, estimate)
            .await
            .map_err(|m| SinkError {
                sink: self.name.clone(),
                message: m,
            })
    }

    /// The whole PGP/MIME message, with its envelope, ready for the spool.
    pub fn seal(&self, letter: &Letter<'_>) -> Result<Vec<u8>, SinkError> {
        let err = |m: String| SinkError {
            sink: self.name.clone(),
            message: m,
        };
        let now = chrono::Utc::now();
        let message_id = format!(
            "<{}@tfa-rotator.invalid>",
            hex::encode(rand::thread_rng().r#gen::<[u8; 16]>())
        );

        // The protected part: real headers inside, plus copies of the outer ones (HP-Outer).
        let inner_type = ContentType::parse(
            "text/plain; charset=utf-8; protected-headers=\"v1\"; hp=\"cipher\"",
        )
        .map_err(|e| err(e.to_string()))?;
        let inner = SinglePart::builder()
            .header(inner_type)
            .header(header::ContentTransferEncoding::QuotedPrintable)
            .header(QSubject(letter.subject.clone()))
            .header(header::From::from(
                vec![self.smtp.from.clone()]
                    .into_iter()
                    .collect::<lettre::message::Mailboxes>(),
            ))
            .header(header::To::from(
                self.to
                    .iter()
                    .cloned()
                    .collect::<lettre::message::Mailboxes>(),
            ))
            .header(header::Date::new(now.into()))
            .header(header::MessageId::from(message_id.clone()))
            .body(letter.body.to_string());
        let mut inner_bytes = zeroize::Zeroizing::new(inner.formatted());
        // RFC 9788 puts a copy of each outer field at the top, as `HP-Outer`; lettre has no
        // such header, so the outer fields are formatted (and RFC 2047-encoded) by lettre and
        // renamed.
        let mut outer_fields = header::Headers::new();
        outer_fields.set(header::Date::new(now.into()));
        outer_fields.set(header::From::from(lettre::message::Mailboxes::from(
            self.smtp.from.clone(),
        )));
        outer_fields.set(header::To::from(
            self.to
                .iter()
                .cloned()
                .collect::<lettre::message::Mailboxes>(),
        ));
        outer_fields.set(header::MessageId::from(message_id.clone()));
        outer_fields.set(header::Subject::from("[...]".to_string()));
        let hp = hp_outer(&outer_fields.to_string());
        let mut with_hp = zeroize::Zeroizing::new(hp.into_bytes());
        with_hp.extend_from_slice(&inner_bytes);
        inner_bytes.clear();
        let keys = match &self.keys {
            Recipients::Pgp(keys) => keys,
            Recipients::Smime(certs) => {
                let refs: Vec<&SmimeCert> = certs.iter().collect();
                let der = smime::encrypt(&refs, &with_hp).map_err(err)?;
                let part = SinglePart::builder()
                    .header(
                        ContentType::parse(
                            "application/pkcs7-mime; smime-type=enveloped-data; name=\"smime.p7m\"",
                        )
                        .map_err(|e| err(e.to_string()))?,
                    )
                    .header(header::ContentDisposition::attachment("smime.p7m"))
                    .header(header::ContentTransferEncoding::Base64)
                    .body(der);
                return self.finish(now, message_id, |b| b.singlepart(part), &err);
            }
        };
        let refs: Vec<&PgpKey> = keys.iter().collect();
        let armored = pgp::encrypt(&refs, &with_hp).map_err(err)?;

        let outer = MultiPart::encrypted("application/pgp-encrypted".to_owned())
            .singlepart(
                SinglePart::builder()
                    .header(
                        ContentType::parse("application/pgp-encrypted")
                            .map_err(|e| err(e.to_string()))?,
                    )
                    .body("Version: 1\r\n".to_string()),
            )
            .singlepart(
                SinglePart::builder()
                    .header(
                        ContentType::parse("application/octet-stream; name=\"encrypted.asc\"")
                            .map_err(|e| err(e.to_string()))?,
                    )
                    .header(header::ContentDisposition::inline_with_name(
                        "encrypted.asc",
                    ))
                    .body(armored),
            );
        self.finish(now, message_id, |b| b.multipart(outer), &err)
    }

    /// The outer message around `body` (visible Subject `[...]`), with its envelope line.
    fn finish(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        message_id: String,
        body: impl FnOnce(lettre::message::MessageBuilder) -> Result<Message, lettre::error::Error>,
        err: &dyn Fn(String) -> SinkError,
    ) -> Result<Vec<u8>, SinkError> {
        let mut builder = Message::builder()
            .from(self.smtp.from.clone())
            .subject("[...]")
            .date(now.into())
            .message_id(Some(message_id));
        for m in &self.to {
            builder = builder.to(m.clone());
        }
        let message = body(builder).map_err(|e| err(format!("building the message: {e}")))?;
        let envelope = message.envelope().clone();
        let mut out = envelope_line(&envelope).into_bytes();
        out.extend_from_slice(&message.formatted());
        Ok(out)
    }

    /// Sends a sealed payload to the recipients its envelope still lists. When the server
    /// refuses some and takes the message for the others, the error carries the payload
    /// for the refused ones alone, so a retry sends nobody a duplicate.
    pub async fn deliver(&self, payload: &[u8]) -> Result<(), DeliveryError> {
        let (envelope, message) = split_payload(payload).map_err(DeliveryError::permanent)?;
        let refused = match self.smtp.send(&envelope, message).await {
            Ok(refused) => refused,
            Err(f) if f.permanent => return Err(DeliveryError::permanent(f.message)),
            Err(f) => return Err(DeliveryError::temporary(f.message)),
        };
        if refused.is_empty() {
            return Ok(());
        }
        let to: Vec<Address> = refused.iter().map(|(a, _)| a.clone()).collect();
        let rest = Envelope::new(envelope.from().cloned(), to)
            .map_err(|e| DeliveryError::temporary(format!("envelope: {e}")))?;
        let mut kept = zeroize::Zeroizing::new(envelope_line(&rest).into_bytes());
        kept.extend_from_slice(message);
        let delivered = envelope.to().len() - refused.len();
        let error = DeliveryError {
            temporary: refused.iter().any(|(_, f)| !f.permanent),
            message: format!(
                "delivered to {delivered} recipient(s); refused: {}",
                refused
                    .iter()
                    .map(|(a, f)| format!("<{a}>: {}", f.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            rest: Some(kept),
        };
        Err(error)
    }
}

/// The `SIZE` an EHLO answer announces (RFC 1870), when it announces one; `SIZE 0` and a
/// bare `SIZE` say there is no fixed limit.
fn size_limit<'a>(lines: impl Iterator<Item = &'a str>) -> Option<u64> {
    lines
        .filter_map(|l| {
            let mut words = l.split_ascii_whitespace();
            words
                .next()
                .filter(|w| w.eq_ignore_ascii_case("SIZE"))
                .map(|_| words.next().and_then(|n| n.parse::<u64>().ok()))
        })
        .next()
        .flatten()
        .filter(|&n| n > 0)
}

/// The protected Subject, RFC 2047-encoded here rather than by lettre: lettre's base64
/// words may end in `=` padding between adjacent words, where GMime 3.2 (notmuch) cuts the
/// Subject. ASCII stays as it is; anything else becomes Q-encoded words of whole UTF-8
/// characters, each at most 75 characters, folded onto lines of their own.
#[derive(Clone)]
struct QSubject(String);

impl header::Header for QSubject {
    fn name() -> header::HeaderName {
        header::HeaderName::new_from_ascii_str("Subject")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Self(s.to_string()))
    }

    fn display(&self) -> header::HeaderValue {
        header::HeaderValue::dangerous_new_pre_encoded(
            Self::name(),
            self.0.clone(),
            q_encoded(&self.0),
        )
    }
}

/// `text` for a header: as it is when it is printable ASCII without `=?` (so it cannot be
/// read as an encoded word), else RFC 2047 Q-encoded words (`=?utf-8?q?…?=`) joined by
/// CRLF SP, each word at most 75 characters and never splitting a character.
fn q_encoded(text: &str) -> String {
    const OPEN: &str = "=?utf-8?q?";
    const MAX_WORD: usize = 75;
    if text.bytes().all(|b| (0x20..0x7f).contains(&b)) && !text.contains("=?") {
        return text.to_string();
    }
    let mut words: Vec<String> = Vec::new();
    let mut word = String::from(OPEN);
    for c in text.chars() {
        let mut enc = String::new();
        match c {
            ' ' => enc.push('_'),
            c if c.is_ascii_alphanumeric() || "!*+-/".contains(c) => enc.push(c),
            c => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    enc.push_str(&format!("={b:02X}"));
                }
            }
        }
        if word.len() + enc.len() + 2 > MAX_WORD {
            word.push_str("?=");
            words.push(std::mem::replace(&mut word, String::from(OPEN)));
        }
        word.push_str(&enc);
    }
    word.push_str("?=");
    words.push(word);
    words.join("\r\n ")
}

/// Formatted header fields renamed to `HP-Outer: NAME: value` (RFC 9788 §2.2); folded
/// continuation lines stay continuation lines.
fn hp_outer(fields: &str) -> String {
    let mut out = String::with_capacity(fields.len() * 2);
    for line in fields.split_inclusive("\r\n") {
        if !line.starts_with([' ', '\t']) {
            out.push_str("HP-Outer: ");
        }
        out.push_str(line);
    }
    out
}

/// The first line of a spooled email: `TFA-ENVELOPE from to1,to2\r\n`.
fn envelope_line(e: &Envelope) -> String {
    let from = e.from().map(ToString::to_string).unwrap_or_default();
    let to: Vec<String> = e.to().iter().map(ToString::to_string).collect();
    format!("TFA-ENVELOPE {from} {}\r\n", to.join(","))
}

/// Splits a spooled email into its envelope and message bytes.
pub fn split_payload(payload: &[u8]) -> Result<(Envelope, &[u8]), String> {
    let end = payload
        .windows(2)
        .position(|w| w == b"\r\n")
        .ok_or("spooled email has no envelope line")?;
    let line =
        std::str::from_utf8(&payload[..end]).map_err(|_| "spooled email envelope is not UTF-8")?;
    let mut parts = line.split(' ');
    let (Some("TFA-ENVELOPE"), Some(from), Some(to)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err("spooled email envelope is malformed".into());
    };
    let from: Option<Address> = if from.is_empty() {
        None
    } else {
        Some(from.parse().map_err(|e| format!("envelope from: {e}"))?)
    };
    let to: Vec<Address> = to
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("envelope to: {e}"))?;
    let envelope = Envelope::new(from, to).map_err(|e| format!("envelope: {e}"))?;
    Ok((envelope, &payload[end + 2..]))
}

#[cfg(test)]
mod tests {
    use super::{q_encoded, size_limit};

    #[test]
    fn the_size_an_ehlo_answer_announces() {
        let lines = |t: &'static str| t.lines();
        assert_eq!(
            size_limit(lines("mx.test\nPIPELINING\nSIZE 10240000\n8BITMIME")),
            Some(10_240_000)
        );
        assert_eq!(size_limit(lines("mx.test\nsize 2048")), Some(2048));
        assert_eq!(size_limit(lines("mx.test\nSIZE 0")), None);
        assert_eq!(size_limit(lines("mx.test\nSIZE")), None);
        assert_eq!(size_limit(lines("mx.test\n8BITMIME")), None);
    }

    /// RFC 2047 Q decoding of words joined by folding white space (which decoders drop).
    fn decode(encoded: &str) -> String {
        let mut bytes = Vec::new();
        for word in encoded.split("\r\n ") {
            let body = word
                .strip_prefix("=?utf-8?q?")
                .and_then(|w| w.strip_suffix("?="))
                .unwrap_or_else(|| panic!("not an encoded word: {word}"));
            let mut it = body.bytes();
            while let Some(b) = it.next() {
                match b {
                    b'_' => bytes.push(b' '),
                    b'=' => {
                        let hex = [it.next().unwrap(), it.next().unwrap()];
                        bytes.push(
                            u8::from_str_radix(std::str::from_utf8(&hex).unwrap(), 16).unwrap(),
                        );
                    }
                    b => bytes.push(b),
                }
            }
            // Each word alone is whole characters.
            assert!(std::str::from_utf8(&bytes).is_ok(), "{word}");
        }
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn a_non_ascii_subject_is_whole_q_words_of_whole_characters() {
        let subject = "New two-factor backup codes for beta (renée.日本語.ñandú@exämple.test, \
                       a long display name that needs more than one word)";
        let enc = q_encoded(subject);
        for word in enc.split("\r\n ") {
            assert!(word.len() <= 75, "{word}");
            assert!(word.bytes().all(|b| (0x21..0x7f).contains(&b)), "{word}");
        }
        assert!(enc.contains("\r\n "), "folded: {enc}");
        assert!(!enc.contains("?b?") && !enc.contains("?B?"));
        assert_eq!(decode(&enc), subject);
    }

    #[test]
    fn an_ascii_subject_stays_as_it_is_unless_it_could_read_as_a_word() {
        assert_eq!(
            q_encoded("New codes for acme (a@b.test)"),
            "New codes for acme (a@b.test)"
        );
        let tricky = "codes for =?utf-8?q?x?=";
        assert_eq!(decode(&q_encoded(tricky)), tricky);
    }
}
