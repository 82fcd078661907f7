//! Where tables come from (a polled file, or ConfigMaps through the Kubernetes API), the atomic swap, and what
//! the proxy enforces right now.
//!
//! - [`store`]: the [`TableStore`] the request path reads, and its [`TableState`] (serving, deny-all, revoked,
//!   nothing yet) for `/readyz` and metrics.
//! - [`file`]: `--tables FILE`.
//! - [`index_watch`]: the table watch's state machine (pure); [`api`]: the loop that drives it with kube's client.

pub mod api;
pub mod file;
pub mod index_watch;
pub mod store;

pub use api::watch_configmap;
pub use file::FileWatcher;
pub use store::{LoadError, Revocation, TableState, TableStore};

#[cfg(test)]
mod tests {
    use crate::decision::{CompiledTable, Reason, RequestFacts, decide};
    use governor::clock::FakeRelativeClock;
    use portcullis_table::Table;

    /// `examples/tables.json` is what docs/proxy.md walks through: keep it loading and deciding as documented.
    #[test]
    fn example_table_behaves_as_documented() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tables.json");
        let text = std::fs::read_to_string(path).unwrap();
        assert!(!text.contains("demo-key-123"), "only digests in the file");
        let t = Table::from_json(&text, path).unwrap();
        let c = CompiledTable::compile(&t, None, FakeRelativeClock::default()).unwrap();
        let d = |key: &str, addr: &str, method: &str, path: &str| {
            let f = RequestFacts {
                addr: addr.parse().unwrap(),
                method,
                path,
                key: Some(key.as_bytes()),
                digest: None,
                cert: None,
                now: jiff::Timestamp::now(),
            };
            decide(Some(&c), &f).reason()
        };
        assert_eq!(d("demo-key-123", "127.0.0.1", "GET", "/anything"), None);
        assert_eq!(d("demo-key-123", "127.0.0.2", "GET", "/"), Some(Reason::SourceNotAllowed));
        assert_eq!(d("wrong", "127.0.0.1", "GET", "/"), Some(Reason::InvalidKey));
        assert_eq!(d("partner-key-456", "127.0.0.2", "GET", "/v1/items"), None);
        assert_eq!(d("partner-key-456", "127.0.0.2", "POST", "/v1/items"), Some(Reason::RouteNotAllowed));
        assert_eq!(d("partner-key-456", "127.0.0.1", "GET", "/v1/items"), Some(Reason::SourceNotAllowed));
        assert_eq!(d("disabled-key-789", "127.0.0.1", "GET", "/"), Some(Reason::ClientDisabled));
        // burst 10: 9 more pass, then 429.
        for _ in 0..9 {
            assert_eq!(d("demo-key-123", "127.0.0.1", "GET", "/"), None);
        }
        assert_eq!(d("demo-key-123", "127.0.0.1", "GET", "/"), Some(Reason::RateLimited));
    }
}
