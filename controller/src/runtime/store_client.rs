//! The controller's connection to the shared store, through `portcullis-store` (the proxies' own client): a PING
//! classified into a [`StoreHealth`], and batched reads of quota counts. After a failure the connection is dropped
//! and the next call connects afresh, so each check reports what a new connection meets (down, refused credentials).

use crate::store::{StoreHealth, StoreSettings};
use portcullis_store::{Store, StoreConfig, StoreError};

/// A lazily (re)connected store client.
pub struct StoreClient {
    config: StoreConfig,
    store: Option<Store>,
}

/// What a store error says about the store.
pub fn classify(e: &StoreError) -> StoreHealth {
    let text = e.to_string();
    match e {
        StoreError::Auth(_) => StoreHealth::AuthFailed(text),
        StoreError::Timeout(_) | StoreError::Connection(_) => StoreHealth::Unreachable(text),
        StoreError::Other(t) if t.starts_with("timed out") => StoreHealth::Unreachable(text),
        StoreError::Config(_) | StoreError::Other(_) => StoreHealth::Invalid(text),
    }
}

impl StoreClient {
    pub fn new(settings: &StoreSettings) -> Self {
        Self { config: settings.config(), store: None }
    }

    async fn connected(&mut self) -> Result<Store, StoreError> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let s = Store::connect(&self.config).await?;
        self.store = Some(s.clone());
        Ok(s)
    }

    /// One check: connect if needed, PING; what it found.
    pub async fn check(&mut self) -> StoreHealth {
        let res = match self.connected().await {
            Ok(s) => s.ping().await,
            Err(e) => Err(e),
        };
        match res {
            Ok(()) => StoreHealth::Reachable,
            Err(e) => {
                self.store = None;
                classify(&e)
            }
        }
    }

    /// The counts of `keys` (0 for a missing key), in one MGET.
    pub async fn quota_used(&mut self, keys: &[String]) -> Result<Vec<u64>, String> {
        let res = match self.connected().await {
            Ok(s) => s.quota_used(keys).await,
            Err(e) => Err(e),
        };
        res.map_err(|e| {
            self.store = None;
            e.to_string()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_store_states() {
        let auth = classify(&StoreError::Auth("WRONGPASS invalid username-password pair".into()));
        assert!(matches!(auth, StoreHealth::AuthFailed(m) if m.contains("WRONGPASS")));
        let down = classify(&StoreError::Connection("Connection refused (os error 111)".into()));
        assert!(matches!(down, StoreHealth::Unreachable(_)));
        let slow = classify(&StoreError::Timeout(std::time::Duration::from_millis(5)));
        assert!(matches!(slow, StoreHealth::Unreachable(_)));
        let odd = classify(&StoreError::Other("ERR unknown command".into()));
        assert!(matches!(odd, StoreHealth::Invalid(_)));
    }
}
