#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod autoscaler;
mod backend;
mod capacity;
pub mod celery_events;
pub mod config;
#[cfg(any(test, feature = "conformance"))]
#[cfg_attr(docsrs, doc(cfg(feature = "conformance")))]
pub mod conformance;
mod error;
pub mod layer;
pub mod lease;
mod memory;
mod observation;
pub mod policy;
pub mod protection;
pub mod record;
mod redact;
pub mod transport_option;

pub use autoscaler::{Autoscaler, Binding, BindingFactory, LoopSettings, PolicyFactory, RunReport};
pub use backend::{QueueSource, Scaler};
pub use capacity::{Capacity, CapacityUnit, SetOutcome, WorkersPerUnit};
pub use celery_events::wildcard_match;
pub use error::{BoxError, ConfigError, Error, ErrorKind, Result};
pub use memory::{MemoryMessage, MemoryQueue, MemoryScaler};
pub use observation::{Observation, QueueDepth, WorkersUnknown};
pub use redact::{SecretUrl, redact_url};

pub use async_trait::async_trait;
pub use tokio_util::sync::CancellationToken;
