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

pub(crate) fn into_code_set(raw: Vec<RawCode>) -> CodeSet {
    CodeSet::new(
        raw.into_iter()
            .map(|c| BackupCode {
                code: c.code,
                used: c.is_used,
            })
            .collect(),
    )
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
