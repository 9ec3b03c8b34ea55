//! The DocSpace API as tfa-rotator uses it (`shared/docspace/API.md`): the client, its
//! payloads and its errors.

pub mod client;
pub mod error;
pub mod model;

pub use client::{HttpClient, Portal};
pub use error::{ApiError, ApiErrorKind, MAX_RETRY_AFTER};
pub use model::{Account, ApiKeyInfo, BuildVersion, TfaMethod};
