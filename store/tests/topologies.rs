//! Sentinel and Cluster through the `redis` crate's own support, against real `redis-server`s (tests/testkit):
//! a master, a replica and a Sentinel with a forced failover; three cluster masters with every slot assigned.

use portcullis_store::{Store, StoreConfig, Take};
use portcullis_table::Period;
use portcullis_table::store_keys::{quota_key, replicas_key, throttle_key};
use portcullis_testkit::redis::{RedisCluster, RedisSentinel, cli};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const NOW: i64 = 1_771_419_600; // 2026-02-18T13:00:00Z

fn take<'a>(tk: &'a str, tokens: u64, qk: &'a str, units: u64) -> Take<'a> {
    Take {
        throttle_key: tk,
        tokens,
        interval_us: 1_000_000,
        burst: 5,
        quota_key: qk,
        units,
        limit: 100,
        expires_at: 4_102_444_800, // 2100: NOW is in the past, the keys must outlive the test
    }
}

/// Generous timeouts: the first operation connects to every node (Cluster) or asks the Sentinel, on a shared
/// machine; what is tested here is the routing, not the latency.
fn config(url: String) -> StoreConfig {
    let mut c = StoreConfig::new(url);
    c.timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(2);
    c
}

#[tokio::test]
async fn a_cluster_counts_every_clients_keys_in_its_own_slot_and_reads_usage_across_nodes() {
    let cluster = RedisCluster::start();
    let store = Store::connect(&config(cluster.url())).await.unwrap();
    assert_eq!(store.topology(), "cluster");
    let clients: Vec<String> = (0..24).map(|i| format!("ns/client-{i}")).collect();
    let mut keys = Vec::new();
    let mut nodes = BTreeSet::new();
    for (i, c) in clients.iter().enumerate() {
        let (tk, qk) = (throttle_key(c, "gold"), quota_key(c, "gold", Period::Month, NOW));
        // Throttle and quota in one script: both keys in the client's slot.
        let g = store.take(&take(&tk, 2, &qk, 1 + i as u64)).await.unwrap();
        assert_eq!((g.tokens, g.units, g.used), (2, 1 + i as u64, 1 + i as u64));
        // Throttle only and quota only (the unused key is not another slot's).
        assert_eq!(store.take(&take(&tk, 1, "", 0)).await.unwrap().tokens, 1);
        assert_eq!(store.take(&take("", 0, &qk, 1)).await.unwrap().units, 1);
        store.give_back(&tk, 3, 1_000_000, &qk, 1).await.unwrap();
        nodes.insert(cluster.node_of(&qk).unwrap());
        keys.push(qk);
    }
    assert_eq!(nodes.len(), 3, "the clients' keys spread over the three masters: {nodes:?}");
    // Usage for every client at once: one MGET per slot, answers in the callers' order (missing keys 0).
    keys.push(quota_key("ns/nobody", "gold", Period::Month, NOW));
    let used = store.quota_used(&keys).await.unwrap();
    let want: Vec<u64> = (0..24).map(|i| 1 + i as u64).chain([0]).collect();
    assert_eq!(used, want);
    assert_eq!(store.heartbeat(&replicas_key("ns/api"), "a", Duration::from_secs(5)).await.unwrap(), 1);
    assert_eq!(store.heartbeat(&replicas_key("ns/api"), "b", Duration::from_secs(5)).await.unwrap(), 2);
}

#[tokio::test]
async fn sentinel_finds_the_master_and_follows_a_failover() {
    let s = RedisSentinel::start();
    let store = Store::connect(&config(s.url())).await.unwrap();
    assert_eq!(store.topology(), "sentinel");
    let (tk, qk) = (throttle_key("ns/acme", "gold"), quota_key("ns/acme", "gold", Period::Month, NOW));
    assert_eq!(store.take(&take(&tk, 1, &qk, 3)).await.unwrap().used, 3);
    let replica = s.replica.port();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cli(replica, &["GET", &qk]).unwrap().trim() != "3" {
        assert!(Instant::now() < deadline, "the replica never received the count");
        std::thread::sleep(Duration::from_millis(20));
    }
    let new_master = s.failover().unwrap_or_else(|e| panic!("{e:#}\n{}", s.log()));
    assert_eq!(new_master, replica);
    // The old connection meets READONLY (or a closed connection) once; the next call asks the Sentinel again.
    let deadline = Instant::now() + Duration::from_secs(10);
    let used = loop {
        match store.take(&take(&tk, 0, &qk, 2)).await {
            Ok(g) => break g.used,
            Err(e) => {
                assert!(Instant::now() < deadline, "the store never followed the failover: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(used, 5, "counted on the new master, on top of what was replicated");
    assert_eq!(cli(new_master, &["GET", &qk]).unwrap().trim(), "5");
    assert_eq!(store.quota_used(&[qk]).await.unwrap(), vec![5]);
}

#[tokio::test]
async fn a_sentinel_that_does_not_know_the_master_is_a_clear_error() {
    let s = RedisSentinel::start();
    let url = s.url().replace(RedisSentinel::MASTER, "no-such-master");
    let e = Store::connect(&config(url)).await.err().expect("an unknown master must fail");
    let text = e.to_string();
    assert!(text.contains("master") || text.contains("Master"), "{text}");
}
