//! The webhook sink (SPEC §5): events, never codes. Each event is one POST of JSON, signed
//! with HMAC-SHA256 over the body in `X-TFA-Signature-256: sha256=HEX` (as GitHub signs
//! its webhooks), named in `X-TFA-Event`, with the history record's UUID in
//! `X-TFA-Delivery` (the same on every retry). A 2xx answer is delivered.
//!
//! Its spool is the history itself: each webhook keeps, per portal, the id of the last
//! record it delivered (`webhook_cursors`), and what follows is pending, in order.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use url::Url;

use super::DeliveryError;
use crate::config::WebhookSinkConfig;
use crate::config::secret::SecretRef;
use crate::secret::ExposeSecret;
use crate::state::history::Record;

/// A ready webhook sink.
pub struct WebhookSink {
    /// The sink's name.
    pub name: String,
    url: Url,
    secret: Arc<SecretRef>,
    events: BTreeSet<String>,
    client: reqwest::Client,
}

/// The header of the signature.
pub const SIGNATURE: &str = "X-TFA-Signature-256";

impl WebhookSink {
    /// Builds the sink: its HTTP client (the system's roots, plus `ca_file`'s).
    pub fn new(name: &str, c: &WebhookSinkConfig) -> Result<Self, String> {
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(c.timeout)
            .connect_timeout(c.timeout.min(Duration::from_secs(10)))
            .https_only(c.url.value.scheme() == "https")
            .user_agent(concat!("tfa-rotator/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &c.ca_file {
            let pem =
                std::fs::read(&ca.value).map_err(|e| format!("{}: {e}", ca.value.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: not PEM certificates: {e}", ca.value.display()))?;
            if certs.is_empty() {
                return Err(format!(
                    "{}: holds no certificate; accepted: one or more PEM certificates (-----BEGIN CERTIFICATE-----)",
                    ca.value.display()
                ));
            }
            for cert in certs {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(Self {
            name: name.to_string(),
            url: c.url.value.clone(),
            secret: c.secret.value.clone(),
            events: c.events.clone(),
            client: b
                .build()
                .map_err(|e| format!("building the HTTP client: {e}"))?,
        })
    }

    /// Whether it is sent `event`.
    pub fn wants(&self, event: &str) -> bool {
        self.events.contains(event)
    }

    /// Where it posts (no secret in it).
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// A one-line description for `check`.
    pub fn describe(&self) -> String {
        let events: Vec<&str> = self.events.iter().map(String::as_str).collect();
        format!("webhook {} (events: {})", self.url, events.join(", "))
    }

    /// Why the secret cannot be read now, if it cannot.
    pub fn unreadable_secret(&self) -> Option<String> {
        self.secret.resolve().err()
    }

    /// Posts one event: `body` signed with the secret as it is now (a changed secret signs
    /// the retries).
    pub async fn send(&self, record: &Record, body: &[u8]) -> Result<(), DeliveryError> {
        let key = self
            .secret
            .resolve()
            .map_err(|e| DeliveryError::temporary(format!("secret: {e}")))?;
        let signature = sign(key.expose_secret().as_bytes(), body);
        drop(key);
        let answer = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-TFA-Event", record.event.as_str())
            .header("X-TFA-Delivery", record.id.as_str())
            .header(SIGNATURE, signature)
            .body(body.to_vec())
            .send()
            .await
            .map_err(|e| {
                DeliveryError::temporary(format!(
                    "POST {}: {}",
                    self.url,
                    crate::errors::chain(&e.without_url())
                ))
            })?;
        let status = answer.status();
        if status.is_success() {
            return Ok(());
        }
        // The receiver's words are shown, short and escaped: it is text from the network.
        let text = answer.text().await.unwrap_or_default();
        let text: String = text.chars().take(200).collect();
        Err(DeliveryError::temporary(format!(
            "POST {} answered {status}: {}",
            self.url,
            crate::docspace::model::escape_controls(text.trim())
        )))
    }
}

/// `sha256=HEX`: HMAC-SHA256 of `body` under `key`.
pub fn sign(key: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// An event's body: the record's fields and `chain`, the hash of the record (the portal's
/// head when it was written), so a receiver that keeps them can detect a rewritten history.
pub fn body(record: &Record, hash: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        #[serde(flatten)]
        record: &'a Record,
        chain: &'a str,
    }
    // A record and a string always serialize.
    serde_json::to_vec(&Body {
        record,
        chain: hash,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature GitHub documents for its webhooks: key "It's a Secret to Everybody",
    /// body "Hello, World!".
    #[test]
    fn signs_as_github_does() {
        assert_eq!(
            sign(b"It's a Secret to Everybody", b"Hello, World!"),
            "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }
}
