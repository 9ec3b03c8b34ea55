//! The HTTP client of the DocSpace API (reqwest with rustls).
//!
//! Policy: redirects are not followed (an API key must not travel to another host); bodies
//! over 1 MiB are refused; every request has the configured timeout. Read-only GETs are
//! retried a little (a short `Retry-After`, one transient failure); the PUT that rotates is
//! sent exactly once, because it is not idempotent: its caller resolves any doubt by a GET.

use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode, header};
use serde::de::DeserializeOwned;
use url::Url;

use super::error::{ApiError, ApiErrorKind};
use super::model::*;
use crate::secret::{CodeSet, ExposeSecret, SecretString};

/// The current codes.
pub const CODES_PATH: &str = "api/2.0/settings/tfaappcodes";
/// Replace the codes (PUT).
pub const NEW_CODES_PATH: &str = "api/2.0/settings/tfaappnewcodes";
/// The user the key acts as.
pub const SELF_PATH: &str = "api/2.0/people/@self";
/// The key itself.
pub const KEY_PATH: &str = "api/2.0/keys/@self";
/// The portal's TFA methods.
pub const TFA_PATH: &str = "api/2.0/settings/tfaapp";
/// Versions; no authentication.
pub const VERSION_PATH: &str = "api/2.0/settings/version/build";

const MAX_BODY: usize = 1024 * 1024;
/// The longest `Retry-After` a GET waits for by itself; longer ones fail the attempt.
const MAX_INLINE_RETRY_AFTER: Duration = Duration::from_secs(10);

/// A shared connection pool for every portal, built on first use: an idle daemon whose
/// portals are not due never loads the TLS stack and the system's root certificates.
#[derive(Clone)]
pub struct HttpClient {
    timeout: Duration,
    inner: Arc<std::sync::OnceLock<Result<reqwest::Client, String>>>,
}

impl HttpClient {
    /// A client whose every request times out after `timeout`. Building it can only fail
    /// on first use, which [`Portal::new`] reports.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            inner: Arc::default(),
        }
    }

    /// The pool, built the first time it is needed.
    fn client(&self) -> Result<&reqwest::Client, String> {
        let timeout = self.timeout;
        self.inner
            .get_or_init(|| {
                reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(timeout)
                    .connect_timeout(timeout.min(Duration::from_secs(10)))
                    .pool_max_idle_per_host(64)
                    .user_agent(concat!("tfa-rotator/", env!("CARGO_PKG_VERSION")))
                    .build()
                    .map_err(|e| format!("building the HTTP client: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// One portal account, reached with its API key.
#[derive(Clone)]
pub struct Portal {
    http: reqwest::Client,
    name: String,
    base: Url,
    key: Arc<SecretString>,
}

impl Portal {
    /// `base` must end in `/` (the config guarantees it).
    /// Fails only if the HTTP client cannot be built.
    pub fn new(
        http: &HttpClient,
        name: &str,
        base: Url,
        key: SecretString,
    ) -> Result<Self, String> {
        Ok(Self {
            http: http.client()?.clone(),
            name: name.to_string(),
            base,
            key: Arc::new(key),
        })
    }

    /// The portal's name in the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The portal's base URL.
    pub fn url(&self) -> &Url {
        &self.base
    }

    /// `GET settings/tfaappcodes`: the set valid now.
    pub async fn codes(&self) -> Result<CodeSet, ApiError> {
        let raw: Vec<RawCode> = self.get(CODES_PATH, true).await?;
        self.usable(&Method::GET, CODES_PATH, raw)
    }

    /// `PUT settings/tfaappnewcodes`: replaces the set. Sent once, never retried here. The
    /// answer is only a hint: the caller verifies it by GET, and delivers the GET's set.
    pub async fn new_codes(&self) -> Result<CodeSet, ApiError> {
        let raw: Vec<RawCode> = self.send(Method::PUT, NEW_CODES_PATH, true).await?;
        self.usable(&Method::PUT, NEW_CODES_PATH, raw)
    }

    fn usable(&self, method: &Method, path: &str, raw: Vec<RawCode>) -> Result<CodeSet, ApiError> {
        into_code_set(raw).map_err(|detail| {
            self.error(
                method,
                path,
                Some(200),
                ApiErrorKind::Malformed {
                    detail: format!("unusable codes: {detail}"),
                },
            )
        })
    }

    /// `GET people/@self`, its text fields escaped (they are printed and delivered).
    pub async fn account(&self) -> Result<Account, ApiError> {
        self.get(SELF_PATH, true).await.map(Account::escaped)
    }

    /// `GET keys/@self`.
    pub async fn key_info(&self) -> Result<ApiKeyInfo, ApiError> {
        self.get(KEY_PATH, true).await
    }

    /// `GET settings/tfaapp`.
    pub async fn tfa_methods(&self) -> Result<Vec<TfaMethod>, ApiError> {
        self.get(TFA_PATH, true).await
    }

    /// `GET settings/version/build` (unauthenticated).
    pub async fn version(&self) -> Result<BuildVersion, ApiError> {
        self.get(VERSION_PATH, false).await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str, auth: bool) -> Result<T, ApiError> {
        let mut transient_retries = 1;
        let mut rate_retries = 2;
        loop {
            match self.send(Method::GET, path, auth).await {
                Err(e)
                    if matches!(e.kind, ApiErrorKind::RateLimited { .. }) && rate_retries > 0 =>
                {
                    let wait = e.retry_after().unwrap_or(Duration::from_secs(1));
                    if wait > MAX_INLINE_RETRY_AFTER {
                        return Err(e);
                    }
                    rate_retries -= 1;
                    tracing::info!(portal = %self.name, wait_s = wait.as_secs(), "rate limited, waiting as the portal asked");
                    tokio::time::sleep(wait).await;
                }
                Err(e)
                    if transient_retries > 0
                        && matches!(
                            e.kind,
                            ApiErrorKind::Server { .. } | ApiErrorKind::Transport { .. }
                        ) =>
                {
                    transient_retries -= 1;
                    tracing::debug!(portal = %self.name, error = %e, "retrying a read once");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => return other,
            }
        }
    }

    fn error(
        &self,
        method: &Method,
        path: &str,
        status: Option<u16>,
        kind: ApiErrorKind,
    ) -> ApiError {
        ApiError {
            portal: self.name.clone(),
            endpoint: format!("{method} /{path}"),
            status,
            kind,
            refused: false,
        }
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        auth: bool,
    ) -> Result<T, ApiError> {
        let url = self.base.join(path).map_err(|e| {
            self.error(
                &method,
                path,
                None,
                ApiErrorKind::Transport {
                    detail: e.to_string(),
                },
            )
        })?;
        let mut req = self
            .http
            .request(method.clone(), url)
            .header(header::ACCEPT, "application/json");
        if auth {
            req = req.bearer_auth(self.key.expose_secret());
        }
        if method == Method::PUT {
            req = req.header(header::CONTENT_LENGTH, "0");
        }
        let transport = |e: reqwest::Error| {
            let kind = if e.is_timeout() {
                ApiErrorKind::Timeout
            } else {
                ApiErrorKind::Transport {
                    detail: error_chain(e),
                }
            };
            self.error(&method, path, None, kind)
        };
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let code = Some(status.as_u16());
        let retry_after = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let location = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
            return Err(self.error(&method, path, code, ApiErrorKind::TooLarge));
        }
        // The body may hold codes: read into a buffer that leaves no copy as it grows and
        // is wiped when dropped (never `text()` or `json()`, whose buffers are not).
        let mut body = crate::secret::SecretBuf::with_capacity(
            resp.content_length()
                .map_or(16 * 1024, |n| usize::try_from(n).unwrap_or(MAX_BODY)),
        );
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(self.error(&method, path, code, ApiErrorKind::TooLarge));
            }
            body.extend(&chunk);
        }
        let body = body.as_slice();

        if status.is_success() {
            return decode_envelope(body).map_err(|kind| self.error(&method, path, code, kind));
        }

        let (kind, refused) = classify(status, body, retry_after, location);
        let mut e = self.error(&method, path, code, kind);
        e.refused = refused;
        Err(e)
    }
}

/// What a non-2xx answer means, and whether the portal itself refused the request.
fn classify(
    status: StatusCode,
    body: &[u8],
    retry_after: Option<Duration>,
    location: Option<String>,
) -> (ApiErrorKind, bool) {
    let envelope = serde_json::from_slice::<ErrorEnvelope>(body)
        .ok()
        .and_then(|e| e.error);
    // Who answered: the portal itself (its JSON error envelope, or the empty 401/402/403
    // and 429 it sends), or something between us (a proxy's HTML page). Only the portal's
    // own 4xx proves that a request was refused. (Its 429 comes without a body, as API.md says.)
    let refused = status.is_client_error()
        && (envelope.is_some()
            || (body.is_empty() && matches!(status.as_u16(), 401 | 402 | 403 | 429)));
    let message = envelope.and_then(|e| e.message).map(|m| clip(&m));
    let not_available = message.as_deref().is_some_and(|m| {
        m.to_ascii_lowercase()
            .contains("tfa application settings are not available")
    });
    let kind = match status {
        s if s.is_redirection() => ApiErrorKind::Redirect { location },
        StatusCode::UNAUTHORIZED => ApiErrorKind::Unauthorized,
        StatusCode::PAYMENT_REQUIRED => ApiErrorKind::PaymentRequired,
        StatusCode::FORBIDDEN
        | StatusCode::METHOD_NOT_ALLOWED
        | StatusCode::INTERNAL_SERVER_ERROR
            if not_available =>
        {
            ApiErrorKind::TfaNotAvailable
        }
        StatusCode::FORBIDDEN => ApiErrorKind::Forbidden { message },
        StatusCode::NOT_FOUND => ApiErrorKind::NotFound,
        StatusCode::TOO_MANY_REQUESTS => ApiErrorKind::RateLimited { retry_after },
        s if s.is_server_error() => ApiErrorKind::Server { message },
        _ => ApiErrorKind::Client { message },
    };
    (kind, refused)
}

/// The `response` of a 2xx answer's envelope. A 2xx carrying an error envelope (its
/// `status` is 1) is a server error: the portal speaks, but says nothing of whether a
/// change was made, so it is not a refusal.
pub fn decode_envelope<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiErrorKind> {
    let env: Envelope<T> = serde_json::from_slice(body).map_err(|e| ApiErrorKind::Malformed {
        detail: json_error(&e),
    })?;
    if env.status == Some(1) {
        let message = env.error.and_then(|e| e.message).map(|m| clip(&m));
        return Err(ApiErrorKind::Server { message });
    }
    env.response.ok_or_else(|| ApiErrorKind::Malformed {
        detail: "the envelope has no `response`".into(),
    })
}

/// A 2xx answer's body as a set of codes, checked as the client checks it (fuzzed).
pub fn decode_codes(body: &[u8]) -> Result<CodeSet, ApiErrorKind> {
    let raw: Vec<RawCode> = decode_envelope(body)?;
    into_code_set(raw).map_err(|detail| ApiErrorKind::Malformed {
        detail: format!("unusable codes: {detail}"),
    })
}

/// A serde error described without quoting the input (which may hold codes).
fn json_error(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Io => "read error",
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Data => "JSON of an unexpected shape",
        serde_json::error::Category::Eof => "JSON cut off",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

/// The causes a person can act on, without the HTTP stack's own wrappers ("error sending
/// request", hyper's "client error (Connect)"): `tcp connect error: Connection refused (os
/// error 111)`, `dns error: …`, `invalid peer certificate: UnknownIssuer`.
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&dyn std::error::Error> = Some(&e);
    while let Some(c) = next {
        let text = c.to_string();
        let wrapper = text == "error sending request" || text.starts_with("client error (");
        if !wrapper && !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = c.source();
    }
    if parts.is_empty() {
        crate::errors::chain(&e)
    } else {
        parts.join(": ")
    }
}

/// A message from the portal, at most 200 characters, control characters escaped.
fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    escape_controls(&out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulator::{SimConfig, Simulator, UserSpec};

    /// The answer of a codes GET and of a PUT is read into a [`crate::secret::SecretBuf`]
    /// (never `text()` or `json()`): the buffers it gave up, counted on this thread (a
    /// current-thread runtime reads there), hold at least the whole body.
    #[tokio::test(flavor = "current_thread")]
    async fn answers_with_codes_are_read_into_wiped_buffers() {
        let sim = Simulator::start(SimConfig::default()).await.unwrap();
        let key = sim.add_user(UserSpec::new("acme@rotator.test"));
        let portal = Portal::new(
            &HttpClient::new(Duration::from_secs(5)),
            "acme",
            Url::parse(&format!("{}/", sim.url().trim_end_matches('/'))).unwrap(),
            SecretString::from(key.clone()),
        )
        .unwrap();
        let set = sim.codes(&key);
        let before = crate::secret::wiped::total();
        let got = portal.codes().await.unwrap();
        assert_eq!(got.total(), set.len());
        let codes_bytes: usize = set.iter().map(|(c, _)| c.len()).sum();
        let read = crate::secret::wiped::total() - before;
        assert!(read > codes_bytes, "{read} bytes wiped");
        let before = crate::secret::wiped::total();
        let new = portal.new_codes().await.unwrap();
        assert!(new.total() > 0);
        assert!(crate::secret::wiped::total() - before > codes_bytes);
        sim.stop();
    }
}
