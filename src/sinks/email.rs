//! The email sink (SPEC §5): PGP/MIME over SMTP that GnuPG and Thunderbird read.
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
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{Address, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use rand::Rng;

use super::{DeliveryError, SinkError};
use crate::config::{SmtpConfig, SmtpSecurity};
use crate::crypto::pgp::{self, PgpKey};
use crate::secret::{ExposeSecret, SecretString};

/// The ready SMTP settings shared by every email sink.
pub struct Smtp {
    host: String,
    port: u16,
    security: SmtpSecurity,
    credentials: Option<(String, SecretString)>,
    /// The From mailbox.
    pub from: Mailbox,
    ca_pem: Option<Vec<u8>>,
    timeout: Duration,
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
        let ca_pem = match &c.ca_file {
            None => None,
            Some(p) => {
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
                Certificate::from_pem(&pem).map_err(|e| {
                    format!("smtp.ca_file {}: not a PEM certificate: {e}", p.display())
                })?;
                Some(pem)
            }
        };
        Ok(Self {
            host: c.host.clone(),
            port: c.port,
            security: c.security,
            credentials,
            from,
            ca_pem,
            timeout: c.timeout,
        })
    }

    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
        let tls = || -> Result<TlsParameters, String> {
            let mut b = TlsParameters::builder(self.host.clone());
            if let Some(pem) = &self.ca_pem {
                b = b.add_root_certificate(Certificate::from_pem(pem).map_err(|e| e.to_string())?);
            }
            b.build_rustls().map_err(|e| format!("TLS setup: {e}"))
        };
        let tls = match self.security {
            SmtpSecurity::StartTls => Tls::Required(tls()?),
            SmtpSecurity::Tls => Tls::Wrapper(tls()?),
            SmtpSecurity::None => Tls::None,
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(self.host.clone())
            .port(self.port)
            .tls(tls)
            .timeout(Some(self.timeout));
        if let Some((user, pass)) = &self.credentials {
            b = b.credentials(Credentials::new(
                user.clone(),
                pass.expose_secret().to_string(),
            ));
        }
        Ok(b.build())
    }

    /// Connects, negotiates TLS, authenticates and quits, without sending.
    pub async fn preflight(&self) -> Result<(), String> {
        let t = self.transport()?;
        match t.test_connection().await {
            Ok(true) => Ok(()),
            Ok(false) => Err(format!(
                "SMTP {}:{}: the server did not answer NOOP",
                self.host, self.port
            )),
            Err(e) => Err(format!(
                "SMTP {}:{}: {}",
                self.host,
                self.port,
                smtp_error(&e)
            )),
        }
    }

    /// Sends raw message bytes; 5xx is permanent, anything else temporary.
    pub async fn send(&self, envelope: &Envelope, message: &[u8]) -> Result<(), DeliveryError> {
        let t = self.transport().map_err(DeliveryError::temporary)?;
        match t.send_raw(envelope, message).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let msg = format!("SMTP {}:{}: {}", self.host, self.port, smtp_error(&e));
                if e.is_permanent() {
                    Err(DeliveryError::permanent(msg))
                } else {
                    Err(DeliveryError::temporary(msg))
                }
            }
        }
    }
}

/// lettre's error with its sources, which say what really failed (TLS, refused, 5xx),
/// each once.
fn smtp_error(e: &lettre::transport::smtp::Error) -> String {
    crate::errors::chain(e)
}

/// A built email sink.
pub struct EmailSink {
    /// Sink name.
    pub name: String,
    to: Vec<Mailbox>,
    keys: Vec<PgpKey>,
    smtp: Arc<Smtp>,
}

/// What a message says, before encryption.
pub struct Letter<'a> {
    /// The real subject (protected).
    pub subject: String,
    /// The plain-text body.
    pub body: &'a str,
}

impl EmailSink {
    /// Checks that every address has a key among `keys`; encrypts to those that cover one.
    pub fn new(
        name: &str,
        to: &[String],
        keys: Vec<PgpKey>,
        smtp: Arc<Smtp>,
    ) -> Result<Self, String> {
        let mut used: Vec<PgpKey> = Vec::new();
        let mut boxes = Vec::new();
        for addr in to {
            let key = keys.iter().find(|k| k.emails.iter().any(|e| e.eq_ignore_ascii_case(addr))).ok_or_else(|| {
                let have: Vec<String> = keys.iter().flat_map(|k| k.emails.clone()).collect();
                format!(
                    "no key in pgp_keys covers `{addr}` (the keys' user IDs hold: {}); mail is never sent unencrypted",
                    if have.is_empty() { "no addresses".into() } else { have.join(", ") }
                )
            })?;
            if !used.iter().any(|k| k.fingerprint == key.fingerprint) {
                used.push(key.clone());
            }
            let a: Address = addr.parse().map_err(|e| format!("`{addr}`: {e}"))?;
            boxes.push(Mailbox::new(None, a));
        }
        Ok(Self {
            name: name.to_string(),
            to: boxes,
            keys: used,
            smtp,
        })
    }

    /// What identifies to whom this sink sends (no secrets).
    pub fn identity(&self) -> String {
        let to: Vec<String> = self.to.iter().map(|m| m.email.to_string()).collect();
        let keys: Vec<&str> = self.keys.iter().map(|k| k.fingerprint.as_str()).collect();
        format!("email to {} keys {}", to.join(","), keys.join(","))
    }

    /// A description for `check`.
    pub fn describe(&self) -> String {
        let to: Vec<String> = self.to.iter().map(|m| m.email.to_string()).collect();
        format!(
            "email to {} (OpenPGP, {} key(s))",
            to.join(", "),
            self.keys.len()
        )
    }

    /// Proves the SMTP server can be reached, secured and logged into.
    pub async fn preflight(&self) -> Result<(), SinkError> {
        self.smtp.preflight().await.map_err(|m| SinkError {
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
        let date = now.to_rfc2822();
        let to_list: Vec<String> = self.to.iter().map(ToString::to_string).collect();
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
            .header(header::Subject::from(letter.subject.clone()))
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
            .body(letter.body.to_string());
        let mut inner_bytes = zeroize::Zeroizing::new(inner.formatted());
        // lettre has no typed HP-Outer header; RFC 9788 puts one per outer field at the top.
        let hp = format!(
            "HP-Outer: Date: {date}\r\nHP-Outer: From: {}\r\nHP-Outer: To: {}\r\nHP-Outer: Message-ID: {message_id}\r\nHP-Outer: Subject: [...]\r\n",
            self.smtp.from,
            to_list.join(", ")
        );
        let mut with_hp = zeroize::Zeroizing::new(hp.into_bytes());
        with_hp.extend_from_slice(&inner_bytes);
        inner_bytes.clear();
        let refs: Vec<&PgpKey> = self.keys.iter().collect();
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
        let mut builder = Message::builder()
            .from(self.smtp.from.clone())
            .subject("[...]")
            .date(now.into())
            .message_id(Some(message_id));
        for m in &self.to {
            builder = builder.to(m.clone());
        }
        let message = builder
            .multipart(outer)
            .map_err(|e| err(format!("building the message: {e}")))?;
        let envelope = message.envelope().clone();
        let mut out = envelope_line(&envelope).into_bytes();
        out.extend_from_slice(&message.formatted());
        Ok(out)
    }

    /// Sends a sealed payload.
    pub async fn deliver(&self, payload: &[u8]) -> Result<(), DeliveryError> {
        let (envelope, message) = split_payload(payload).map_err(DeliveryError::permanent)?;
        self.smtp.send(&envelope, message).await
    }
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
