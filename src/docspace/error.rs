//! What can go wrong talking to a portal. Every error names the portal, the endpoint and the
//! HTTP status; none carries a body verbatim, because a body can hold codes.

use std::fmt;
use std::time::Duration;

/// The longest pause a `Retry-After` imposes (the portal's daily limit asks for up to a day;
/// past an hour we ask again, and it says so again if it must).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// A failed request to a portal.
#[derive(Debug, thiserror::Error)]
pub struct ApiError {
    /// The portal's name in the config.
    pub portal: String,
    /// Method and path, like `PUT /api/2.0/settings/tfaappnewcodes`.
    pub endpoint: String,
    /// The HTTP status, when an answer arrived.
    pub status: Option<u16>,
    /// What went wrong.
    pub kind: ApiErrorKind,
    /// The portal itself answered 4xx (its error envelope, or an empty 401/402/403 or 429):
    /// the request was refused and changed nothing. False for everything a proxy or the
    /// network may have said, after which a PUT's outcome is unknown.
    pub refused: bool,
}

/// The kinds of failure, each with its own handling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiErrorKind {
    /// 401: the key is missing, wrong, expired or deactivated.
    Unauthorized,
    /// 403 without the TFA message: the key lacks the scope.
    Forbidden {
        /// The server's message, if any.
        message: Option<String>,
    },
    /// 403/405/500 with "TFA application settings are not available".
    TfaNotAvailable,
    /// 429: the portal's limiter refused; try again after the delay.
    RateLimited {
        /// `Retry-After`, when sent.
        retry_after: Option<Duration>,
    },
    /// 402: the portal is not paid.
    PaymentRequired,
    /// 404.
    NotFound,
    /// A 3xx: redirects are not followed.
    Redirect {
        /// The `Location` header.
        location: Option<String>,
    },
    /// Another 4xx.
    Client {
        /// The server's message, if any.
        message: Option<String>,
    },
    /// 5xx (the body may be an HTML page from a proxy).
    Server {
        /// The server's message when the body was an envelope.
        message: Option<String>,
    },
    /// A 2xx whose body is not the expected envelope.
    Malformed {
        /// What was wrong, never the body itself.
        detail: String,
    },
    /// The body is larger than the 1 MiB limit.
    TooLarge,
    /// No answer in time.
    Timeout,
    /// Connection refused or reset, TLS failure, or a body cut off.
    Transport {
        /// The transport error, without any URL credentials (there are none).
        detail: String,
    },
}

impl ApiError {
    /// True when trying again later can succeed (not for a bad key or TFA off).
    pub fn retryable(&self) -> bool {
        matches!(
            self.kind,
            ApiErrorKind::RateLimited { .. }
                | ApiErrorKind::Server { .. }
                | ApiErrorKind::Malformed { .. }
                | ApiErrorKind::Timeout
                | ApiErrorKind::Transport { .. }
                | ApiErrorKind::TooLarge
        )
    }

    /// True when a PUT that failed this way certainly did not change the set; any
    /// other failure leaves its outcome unknown.
    pub fn is_refusal(&self) -> bool {
        self.refused
    }

    /// The delay the portal asked for, at most [`MAX_RETRY_AFTER`]: every caller (the
    /// backoff, settling, the host's pause) reads it here, so none can overflow or wait a day.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.kind {
            ApiErrorKind::RateLimited { retry_after } => {
                retry_after.map(|d| d.min(MAX_RETRY_AFTER))
            }
            _ => None,
        }
    }

    /// A short machine-readable name of the kind, for metrics, state and `--json`.
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ApiErrorKind::Unauthorized => "unauthorized",
            ApiErrorKind::Forbidden { .. } => "forbidden",
            ApiErrorKind::TfaNotAvailable => "tfa_not_available",
            ApiErrorKind::RateLimited { .. } => "rate_limited",
            ApiErrorKind::PaymentRequired => "payment_required",
            ApiErrorKind::NotFound => "not_found",
            ApiErrorKind::Redirect { .. } => "redirect",
            ApiErrorKind::Client { .. } => "client_error",
            ApiErrorKind::Server { .. } => "server_error",
            ApiErrorKind::Malformed { .. } => "malformed",
            ApiErrorKind::TooLarge => "too_large",
            ApiErrorKind::Timeout => "timeout",
            ApiErrorKind::Transport { .. } => "transport",
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "portal {}: {}: ", self.portal, self.endpoint)?;
        if let Some(s) = self.status {
            write!(f, "HTTP {s}: ")?;
        }
        let msg = |m: &Option<String>| {
            m.as_deref()
                .map(|m| format!(" (server says: {m})"))
                .unwrap_or_default()
        };
        match &self.kind {
            ApiErrorKind::Unauthorized => {
                f.write_str("unauthorized: the API key is missing, wrong, expired or deactivated")
            }
            ApiErrorKind::Forbidden { message } => write!(
                f,
                "forbidden: the API key lacks the scope for this endpoint (settings need *:read \
                 to read and *:write to rotate){}",
                msg(message)
            ),
            ApiErrorKind::TfaNotAvailable => f.write_str(
                "TFA application settings are not available: the portal's authenticator-app \
                 method is off, or this account has not linked an app (not retryable)",
            ),
            ApiErrorKind::RateLimited { retry_after } => match retry_after {
                Some(d) => write!(f, "rate limited: retry after {}s", d.as_secs()),
                None => f.write_str("rate limited"),
            },
            ApiErrorKind::PaymentRequired => {
                f.write_str("payment required: the portal is not paid")
            }
            ApiErrorKind::NotFound => f.write_str("not found: is the URL the portal's base URL?"),
            ApiErrorKind::Redirect { location } => write!(
                f,
                "redirected to {}; redirects are not followed, configure the final URL",
                location.as_deref().unwrap_or("an unnamed location")
            ),
            ApiErrorKind::Client { message } => write!(f, "request refused{}", msg(message)),
            ApiErrorKind::Server { message } => write!(f, "server error{}", msg(message)),
            ApiErrorKind::Malformed { detail } => write!(f, "malformed answer: {detail}"),
            ApiErrorKind::TooLarge => f.write_str("answer larger than 1 MiB, refused"),
            ApiErrorKind::Timeout => f.write_str("no answer in time"),
            ApiErrorKind::Transport { detail } => write!(f, "connection failed: {detail}"),
        }
    }
}
