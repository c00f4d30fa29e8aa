#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

mod error;
mod settings;

pub use error::{
    AwsError, Operation, PERMISSION_ERRORS, REJECTED_ERRORS, SERVICE_FAULT_ERRORS, SharedSource,
};
pub use settings::{
    AwsSettings, CREDENTIALS_TIMEOUT, LOAD_TIMEOUT, MAX_ATTEMPTS, MAX_CACHE_TTL, MAX_CALL_TIMEOUT,
    MIN_CALL_TIMEOUT, SetupError, cache_ttl_for,
};

/// The SDK's own lists of throttling and transient error codes, which [`AwsError::from_sdk`]
/// uses (re-exported from `aws-runtime`).
pub use aws_runtime::retries::classifiers::{THROTTLING_ERRORS, TRANSIENT_ERRORS};
