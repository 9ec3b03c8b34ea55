//! The DocSpace envelopes and payloads, parsed tolerantly: unknown fields are ignored, null
//! fields may be absent, and codes may have any count and length.

use serde::Deserialize;

use crate::secret::{BackupCode, CodeSet, SecretString};

/// `{"response": …, "status": 0|1, "statusCode": …, "error": {…}}`.
#[derive(Deserialize)]
pub(crate) struct Envelope<T> {
    pub response: Option<T>,
    pub status: Option<i64>,
    pub error: Option<ErrorBody>,
}

/// The `error` member of a failed envelope.
#[derive(Deserialize, Default)]
pub(crate) struct ErrorBody {
    pub message: Option<String>,
}

/// An error envelope without the response (parsing a failed answer).
#[derive(Deserialize)]
pub(crate) struct ErrorEnvelope {
    pub error: Option<ErrorBody>,
}

/// One element of `tfaappcodes` / `tfaappnewcodes`.
#[derive(Deserialize)]
pub(crate) struct RawCode {
    #[serde(rename = "isUsed", default)]
    pub is_used: bool,
    pub code: SecretString,
}

/// Codes are data from the network: a set is usable only with 1 to 100 codes,
/// each 1 to 64 characters of `A-Za-z0-9-_`. Anything else is refused with a description
/// that quotes no code.
pub(crate) fn into_code_set(raw: Vec<RawCode>) -> Result<CodeSet, String> {
    use crate::secret::ExposeSecret;
    if raw.is_empty() || raw.len() > MAX_CODES {
        return Err(format!(
            "a set of {} codes; a usable set has 1 to {MAX_CODES}",
            raw.len()
        ));
    }
    for (i, c) in raw.iter().enumerate() {
        let code = c.code.expose_secret();
        let ok_len = (1..=MAX_CODE_LEN).contains(&code.len());
        let ok_chars = code
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok_len || !ok_chars {
            return Err(format!(
                "code {} of the set is not 1 to {MAX_CODE_LEN} characters of A-Za-z0-9-_",
                i + 1
            ));
        }
    }
    Ok(CodeSet::new(
        raw.into_iter()
            .map(|c| BackupCode {
                code: c.code,
                used: c.is_used,
            })
            .collect(),
    ))
}

/// The most codes a usable set has.
pub const MAX_CODES: usize = 100;
/// The longest usable code.
pub const MAX_CODE_LEN: usize = 64;

/// Text from the network made safe to print: control characters (newlines, escape
/// sequences, bidirectional overrides' neighbours in C0/C1) are written as `\u{…}`, so a
/// portal can neither forge a log line nor a line of a delivered file.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control()
            || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    out
}

impl Account {
    /// The same account with every text field escaped ([`escape_controls`]).
    pub fn escaped(self) -> Self {
        Self {
            id: escape_controls(&self.id),
            display_name: escape_controls(&self.display_name),
            email: escape_controls(&self.email),
            ..self
        }
    }
}

/// The user an API key acts as (`people/@self`).
#[derive(Deserialize, Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Account {
    /// User id (a GUID).
    #[serde(default)]
    pub id: String,
    /// Display name.
    #[serde(default)]
    pub display_name: String,
    /// Email address.
    #[serde(default)]
    pub email: String,
    /// Portal administrator.
    #[serde(default)]
    pub is_admin: bool,
    /// Portal owner.
    #[serde(default)]
    pub is_owner: bool,
    /// A guest user.
    #[serde(default)]
    pub is_visitor: bool,
}

/// The API key itself (`keys/@self`).
#[derive(Deserialize, Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyInfo {
    /// Key name given by its creator.
    #[serde(default)]
    pub name: String,
    /// Scopes, like `*` or `*:read`.
    #[serde(default)]
    pub permissions: Vec<String>,
    /// When the key expires, as the portal writes it.
    #[serde(default)]
    pub expires_at: Option<String>,
    /// Whether the key is active.
    #[serde(default = "yes")]
    pub is_active: bool,
}

impl ApiKeyInfo {
    /// Whether the key may rotate codes (`PUT settings/…` needs the global write scope).
    /// A key that lists no scopes at all is taken at its word by the PUT itself.
    pub fn can_write(&self) -> bool {
        self.permissions.is_empty() || self.permissions.iter().any(|p| p == "*" || p == "*:write")
    }
}

fn yes() -> bool {
    true
}

/// One TFA method of the portal (`settings/tfaapp`).
#[derive(Deserialize, Debug, Clone, Default, serde::Serialize)]
pub struct TfaMethod {
    /// `"sms"` or `"app"`.
    #[serde(default)]
    pub id: String,
    /// Whether the method is enabled on the portal.
    #[serde(default)]
    pub enabled: bool,
    /// Whether it can be used; spelled `avaliable` up to 3.6.x.
    #[serde(default, alias = "avaliable")]
    pub available: bool,
}

/// `settings/version/build`.
#[derive(Deserialize, Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildVersion {
    /// DocSpace version.
    #[serde(default)]
    pub doc_space: Option<String>,
    /// Document Server version.
    #[serde(default)]
    pub document_server: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(codes: &[&str]) -> Vec<RawCode> {
        codes
            .iter()
            .map(|c| RawCode {
                is_used: false,
                code: SecretString::from(*c),
            })
            .collect()
    }

    #[test]
    fn only_usable_sets_pass() {
        assert!(into_code_set(raw(&["aZ3-_q", "Q0x9kB"])).is_ok());
        assert!(into_code_set(raw(&["x"])).is_ok());
        assert!(into_code_set(raw(&[&"a".repeat(64)])).is_ok());
        let many: Vec<String> = (0..100).map(|i| format!("c{i}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(into_code_set(raw(&many)).is_ok());
        for bad in [
            raw(&[]),
            raw(&[""]),
            raw(&[&"a".repeat(65)]),
            raw(&["ok", "no space"]),
            raw(&["new\nline"]),
            raw(&["ünï"]),
        ] {
            let e = into_code_set(bad).unwrap_err();
            assert!(
                !e.contains("space") && !e.contains("line"),
                "no code quoted: {e}"
            );
        }
        let too_many: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
        let too_many: Vec<&str> = too_many.iter().map(String::as_str).collect();
        assert!(into_code_set(raw(&too_many)).is_err());
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_controls("Ann Lee"), "Ann Lee");
        assert_eq!(escape_controls("a\nb"), "a\\u{a}b");
        assert_eq!(
            escape_controls("x\u{1b}[31m\r\u{202e}"),
            "x\\u{1b}[31m\\u{d}\\u{202e}"
        );
        assert_eq!(escape_controls("Zoë 李"), "Zoë 李");
    }
}
