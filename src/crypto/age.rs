//! age encryption of file-sink payloads (binary age format, X25519 or SSH recipients).

use std::io::Write;
use std::str::FromStr;

/// Parsed age recipients of one sink.
pub struct AgeRecipients {
    recipients: Vec<Box<dyn age::Recipient + Send + Sync>>,
    /// The recipients as written, for the sink's identity.
    pub written: Vec<String>,
}

impl AgeRecipients {
    /// Parses `age1…` and `ssh-…` recipients.
    pub fn parse(list: &[String]) -> Result<Self, String> {
        let mut recipients: Vec<Box<dyn age::Recipient + Send + Sync>> = Vec::new();
        for r in list {
            check_recipient(r)?;
            if r.starts_with("age1") {
                let rcp = age::x25519::Recipient::from_str(r)
                    .map_err(|e| format!("age recipient {r}: {e}"))?;
                recipients.push(Box::new(rcp));
            } else {
                let rcp = age::ssh::Recipient::from_str(r)
                    .map_err(|e| format!("age recipient {r}: {e:?}"))?;
                recipients.push(Box::new(rcp));
            }
        }
        if recipients.is_empty() {
            return Err("no age recipients".into());
        }
        Ok(Self {
            recipients,
            written: list.to_vec(),
        })
    }

    /// Encrypts to every recipient.
    pub fn encrypt(&self, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        let enc = age::Encryptor::with_recipients(
            self.recipients
                .iter()
                .map(|r| r.as_ref() as &dyn age::Recipient),
        )
        .map_err(|e| format!("age: {e}"))?;
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).map_err(|e| format!("age: {e}"))?;
        w.write_all(plaintext).map_err(|e| format!("age: {e}"))?;
        w.finish().map_err(|e| format!("age: {e}"))?;
        Ok(out)
    }
}

/// Checks an age recipient without keeping it (the sink parses it again when built).
pub fn check_recipient(r: &str) -> Result<(), String> {
    if r.starts_with("age1") {
        age::x25519::Recipient::from_str(r)
            .map(|_| ())
            .map_err(|e| format!("`{r}` is not a valid age X25519 recipient: {e}"))
    } else if r.starts_with("ssh-") {
        age::ssh::Recipient::from_str(r)
            .map(|_| ())
            .map_err(|e| format!("`{r}` is not a usable SSH public key: {e:?}"))
    } else {
        Err(format!(
            "`{r}` is not an age recipient; accepted: an X25519 recipient (age1…) or an SSH \
             public key (ssh-ed25519 … or ssh-rsa …)"
        ))
    }
}
