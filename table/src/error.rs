use thiserror::Error;

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
