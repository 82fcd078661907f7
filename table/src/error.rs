use std::error::Error as StdError;
use std::fmt;
use thiserror::Error;

/// Displays an error followed by its causes (`outer: cause: root cause`), what `anyhow` prints for `{e:#}`.
///
/// Error types print their own message only and leave their cause to the chain; libraries that put an error into
/// a log field or a status message print it through this, so the cause is shown once.
pub struct Chain<'a>(pub &'a (dyn StdError + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

/// Why a table (file, index or shard) was refused. Every variant names what is wrong so it can be logged as is.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TableError {
    #[error("malformed table JSON in {what}: {detail}")]
    Malformed { what: String, detail: String },
    #[error("unsupported schemaVersion {found} in {what} (this build reads {supported})")]
    SchemaVersion { what: String, found: u32, supported: u32 },
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("shard {index} of revision {revision}: {detail}")]
    Shard { revision: String, index: usize, detail: String },
    #[error("table for {service} would need {needed} shards, more than the maximum {max}")]
    TooManyShards { service: String, needed: usize, max: usize },
    #[error("client {client} alone is {bytes} bytes, more than a shard may hold ({max})")]
    ClientTooLarge { client: String, bytes: usize, max: usize },
    #[error(
        "a shard of {service} is {bytes} bytes before any client (service name, revision), more than the {max} a shard may hold"
    )]
    ShardOverhead { service: String, bytes: usize, max: usize },
}

impl TableError {
    pub(crate) fn invalid(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::Invalid { what: what.into(), detail: detail.into() }
    }
}
