//! Where a secret comes from, and how it is read.
//!
//! A secret in the config is one of `{ env = "NAME" }`, `{ file = "PATH" }`,
//! `{ credential = "NAME" }` (systemd's `$CREDENTIALS_DIRECTORY/NAME`) or a literal string.
//! The reference is parsed with the config (no I/O); the value is read only when the
//! command needs it, by [`SecretRef::resolve`], and lives in a [`SecretString`].

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::secret::SecretString;

/// A parsed secret reference.
pub enum SecretRef {
    /// An environment variable's value.
    Env(String),
    /// The first line of a file (its trailing newline ignored).
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
    /// A literal value written in the config file.
    Literal(SecretString),
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl SecretRef {
    /// A description that never includes the value (for errors and the config fingerprint).
    pub fn describe(&self) -> String {
        match self {
            SecretRef::Env(n) => format!("env:{n}"),
            SecretRef::File(p) => format!("file:{}", p.display()),
            SecretRef::Credential(n) => format!("credential:{n}"),
            SecretRef::Literal(_) => "literal".to_string(),
        }
    }

    /// Makes a relative file path relative to the config file's directory.
    pub(crate) fn rebase(self, base: &Path) -> Self {
        match self {
            SecretRef::File(p) if p.is_relative() => SecretRef::File(base.join(p)),
            other => other,
        }
    }

    /// Reads the secret's value.
    pub fn resolve(&self) -> Result<SecretString, String> {
        use crate::secret::ExposeSecret;
        let value = match self {
            SecretRef::Env(name) => std::env::var(name).map_err(|e| match e {
                std::env::VarError::NotPresent => {
                    format!("environment variable {name} is not set")
                }
                std::env::VarError::NotUnicode(_) => {
                    format!("environment variable {name} is not valid UTF-8")
                }
            })?,
            SecretRef::File(path) => read_secret_file(path)?,
            SecretRef::Credential(name) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    format!(
                        "credential {name}: $CREDENTIALS_DIRECTORY is not set: only the \
                         service gets its credentials (LoadCredential= in its unit); run the \
                         command as the service does, `tfa-rotator-run ARGS…`"
                    )
                })?;
                read_secret_file(&Path::new(&dir).join(name))?
            }
            SecretRef::Literal(s) => return Ok(SecretString::from(s.expose_secret())),
        };
        if value.is_empty() {
            return Err(format!("{} is empty", self.describe()));
        }
        Ok(SecretString::from(value))
    }
}

fn read_secret_file(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("reading secret file {}: {e}", path.display()))?;
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or_default().trim_end_matches('\r');
    if lines.any(|l| !l.trim().is_empty()) {
        return Err(format!(
            "secret file {} has more than one line",
            path.display()
        ));
    }
    Ok(first.to_string())
}

impl<'de> serde::Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SecretRef;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string, or a table with one of `env`, `file` or `credential` \
                     (for example { env = \"NAME\" })",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SecretRef, E> {
                Ok(SecretRef::Literal(SecretString::from(v)))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SecretRef, A::Error> {
                let mut found: Option<SecretRef> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if found.is_some() {
                        return Err(de::Error::custom(
                            "a secret takes exactly one of `env`, `file` or `credential`",
                        ));
                    }
                    found = Some(match key.as_str() {
                        "env" => SecretRef::Env(value),
                        "file" => SecretRef::File(PathBuf::from(value)),
                        "credential" => SecretRef::Credential(value),
                        other => {
                            return Err(de::Error::unknown_field(
                                other,
                                &["env", "file", "credential"],
                            ));
                        }
                    });
                }
                found.ok_or_else(|| {
                    de::Error::custom("a secret takes one of `env`, `file` or `credential`")
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl schemars::JsonSchema for SecretRef {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "SecretRef".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        let one = |key: &str, what: &str| {
            serde_json::json!({
                "type": "object",
                "properties": { key: { "type": "string", "description": what } },
                "required": [key],
                "additionalProperties": false
            })
        };
        schemars::json_schema!({
            "description": "A secret: { env = \"NAME\" }, { file = \"PATH\" }, { credential = \"NAME\" } (systemd's $CREDENTIALS_DIRECTORY/NAME), or a literal string (warned about; refused when the file is readable by other users). In an exec sink's env table a string is a plain value.",
            "oneOf": [
                { "type": "string" },
                one("env", "an environment variable's name"),
                one("file", "a file whose first line is the secret; relative to the config file"),
                one("credential", "a systemd credential's name (LoadCredential=)")
            ]
        })
    }
}
