//! The store's operations against a real `redis-server` (tests/testkit).

use portcullis_store::{Store, StoreConfig, StoreError, Take};
use portcullis_table::Period;
use portcullis_table::store_keys::{quota_key, quota_key_expires_at, replicas_key, throttle_key};
use portcullis_testkit::redis::RedisServer;
use std::time::Duration;

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// Generous timeouts: these tests are about what the store answers, not how fast; the default 50 ms operation
/// timeout was exceeded by a first connection on a loaded CI machine (`Timeout(50ms)` in `connect`).
fn config(r: &RedisServer) -> StoreConfig {
    let mut c = StoreConfig::new(r.url());
    c.timeout = Duration::from_secs(2);
    c.connect_timeout = Duration::from_secs(2);
    c
}

fn take<'a>(tk: &'a str, tokens: u64, qk: &'a str, units: u64, limit: u64, exp: i64) -> Take<'a> {
    Take {
        throttle_key: tk,
        tokens,
        interval_us: 1_000_000, // 1 per second: no refill during the test
        burst: 5,
        quota_key: qk,
        units,
        limit,
        expires_at: exp,
    }
}

#[tokio::test]
async fn ping_and_quota_used_read_missing_keys_as_zero() {
    let r = RedisServer::start();
    let s = Store::connect(&config(&r)).await.unwrap();
    s.ping().await.unwrap();
    let now = unix_now();
    let k = quota_key("ns/a", "gold", Period::Day, now);
    let exp = quota_key_expires_at(Period::Day, now);
    let g = s.take(&take(&throttle_key("ns/a", "gold"), 0, &k, 3, 10, exp)).await.unwrap();
    assert_eq!((g.units, g.used), (3, 3));
    let used = s.quota_used(&[k.clone(), quota_key("ns/b", "gold", Period::Day, now)]).await.unwrap();
    assert_eq!(used, vec![3, 0]);
    assert!(s.quota_used(&[]).await.unwrap().is_empty());
}

#[tokio::test]
async fn gcra_grants_the_burst_then_refuses_with_a_wait() {
    let r = RedisServer::start();
    let s = Store::connect(&config(&r)).await.unwrap();
    let tk = throttle_key("ns/a", "p");
    // One token per 10 s: a loaded machine (CI once took 121 ms between two commands) refills nothing meanwhile.
    let interval_us = 10_000_000;
    let take = |tokens| Take { interval_us, ..take(&tk, tokens, "unused", 0, 0, 0) };
    let started = std::time::Instant::now();
    let g = s.take(&take(3)).await.unwrap();
    assert_eq!(g.tokens, 3);
    let g = s.take(&take(10)).await.unwrap();
    assert_eq!(g.tokens, 2, "burst 5 in all");
    let g = s.take(&take(1)).await.unwrap();
    let elapsed_us = started.elapsed().as_micros() as u64;
    assert_eq!(g.tokens, 0);
    // The next token is due one interval after the burst was taken (a schedule that starts the carry behind).
    let carry = portcullis_store::scripts::carry_us(interval_us);
    assert!(g.wait_us <= interval_us && g.wait_us + elapsed_us + carry >= interval_us, "{g:?} after {elapsed_us} µs");
    // Giving 2 back makes 2 available again.
    s.give_back(&tk, 2, interval_us, "unused", 0).await.unwrap();
    assert_eq!(s.take(&take(5)).await.unwrap().tokens, 2);
}

/// The store's clock in µs.
async fn server_us(c: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, us): (u64, u64) = redis::cmd("TIME").query_async(c).await.unwrap();
    secs * 1_000_000 + us
}

#[tokio::test]
async fn a_late_claim_keeps_the_schedule_up_to_the_carry_and_never_more_than_the_burst_at_once() {
    let r = RedisServer::start();
    let s = Store::connect(&config(&r)).await.unwrap();
    let mut c = redis::Client::open(r.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let tk = throttle_key("ns/a", "p");
    // 1/s, burst 1: carry 5 ms. A long interval, so a slow machine between two commands cannot make a new token due.
    let t = 1_000_000;
    assert_eq!(portcullis_store::scripts::carry_us(t), 5_000);
    let one = |n| Take {
        throttle_key: &tk,
        tokens: n,
        interval_us: t,
        burst: 1,
        quota_key: "",
        units: 0,
        limit: 0,
        expires_at: 0,
    };
    // A token due 2 ms ago (well within the carry): granted, and the next one is due one interval after the
    // first was, not one interval after the claim.
    let due = server_us(&mut c).await - 2_000;
    let _: () = redis::cmd("SET").arg(&tk).arg(due).query_async(&mut c).await.unwrap();
    assert_eq!(s.take(&one(1)).await.unwrap().tokens, 1);
    let tat: u64 = redis::cmd("GET").arg(&tk).query_async(&mut c).await.unwrap();
    let after = server_us(&mut c).await;
    assert!(tat == due + t || (after - due > 5_000 && tat <= after + t - 5_000), "tat {tat}, due {due}, now {after}");
    // Idle for long: the schedule restarts at most the carry behind now, so one claim gets the burst (1) and an
    // immediate second gets nothing.
    let before = server_us(&mut c).await;
    let _: () = redis::cmd("SET").arg(&tk).arg(before - 1_000_000).query_async(&mut c).await.unwrap();
    assert_eq!(s.take(&one(5)).await.unwrap().tokens, 1);
    let tat: u64 = redis::cmd("GET").arg(&tk).query_async(&mut c).await.unwrap();
    let after = server_us(&mut c).await;
    assert!(tat >= before + t - 5_000 && tat <= after + t - 5_000, "tat {tat} in [{before}, {after}] + 5 ms");
    let g = s.take(&one(1)).await.unwrap();
    let later = server_us(&mut c).await;
    assert_eq!(g.tokens, 0, "never more than the burst at one instant");
    // The wait is until the schedule's next token, as of the claim (between `after` and `later` on the store's
    // clock): exact bounds, however slow the machine is between commands.
    let wait = g.wait_us;
    assert!(wait <= tat - after && wait + later >= tat && wait <= t - 5_000, "{g:?}, tat {tat}, [{after}, {later}]");
}

#[tokio::test]
async fn quota_stops_at_the_limit_expires_with_its_period_and_gives_back() {
    let r = RedisServer::start();
    let s = Store::connect(&config(&r)).await.unwrap();
    let tk = throttle_key("ns/a", "q");
    let now = unix_now();
    let k = quota_key("ns/a", "q", Period::Day, now);
    let exp = quota_key_expires_at(Period::Day, now);
    assert_eq!(s.take(&take(&tk, 0, &k, 8, 10, exp)).await.unwrap().units, 8);
    assert_eq!(s.take(&take(&tk, 0, &k, 8, 10, exp)).await.unwrap().units, 2);
    assert_eq!(s.take(&take(&tk, 0, &k, 1, 10, exp)).await.unwrap().units, 0);
    s.give_back(&tk, 0, 1, &k, 3).await.unwrap();
    assert_eq!(s.quota_used(std::slice::from_ref(&k)).await.unwrap(), vec![7]);
    // The key expires at the end of its period (plus grace); the next period's key starts at zero.
    let mut c = redis::Client::open(r.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let ttl_at: i64 = redis::cmd("EXPIRETIME").arg(&k).query_async(&mut c).await.unwrap();
    assert_eq!(ttl_at, exp);
    let next_day = now + 86_400;
    let next = quota_key("ns/a", "q", Period::Day, next_day);
    assert_ne!(next, k);
    let next_exp = quota_key_expires_at(Period::Day, next_day);
    assert_eq!(s.take(&take(&tk, 0, &next, 4, 10, next_exp)).await.unwrap().units, 4);
    assert_eq!(s.quota_used(&[k, next]).await.unwrap(), vec![7, 4]);
}

#[tokio::test]
async fn a_refused_throttle_takes_no_quota() {
    let r = RedisServer::start();
    let s = Store::connect(&config(&r)).await.unwrap();
    let tk = throttle_key("ns/a", "both");
    let k = quota_key("ns/a", "both", Period::Month, 0);
    assert_eq!(s.take(&take(&tk, 5, &k, 5, 100, 1 << 40)).await.unwrap().units, 5);
    let g = s.take(&take(&tk, 1, &k, 1, 100, 1 << 40)).await.unwrap();
    assert_eq!((g.tokens, g.units), (0, 0));
    assert_eq!(s.quota_used(&[k]).await.unwrap(), vec![5]);
}

#[tokio::test]
async fn heartbeats_count_live_replicas() {
    let r = RedisServer::start();
    let s = Store::connect(&config(&r)).await.unwrap();
    let key = replicas_key("ns/svc");
    assert_eq!(s.heartbeat(&key, "a", Duration::from_secs(5)).await.unwrap(), 1);
    assert_eq!(s.heartbeat(&key, "b", Duration::from_secs(5)).await.unwrap(), 2);
    assert_eq!(s.heartbeat(&key, "a", Duration::from_secs(5)).await.unwrap(), 2);
    // With a 1 ms window, the others' older heartbeats no longer count.
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(s.heartbeat(&key, "c", Duration::from_millis(1)).await.unwrap(), 1);
}

#[tokio::test]
async fn scripts_reload_after_the_server_lost_them() {
    let mut r = RedisServer::start();
    let s = Store::connect(&config(&r)).await.unwrap();
    let tk = throttle_key("ns/a", "p");
    assert_eq!(s.take(&take(&tk, 1, "x", 0, 0, 0)).await.unwrap().tokens, 1);
    r.stop();
    assert!(s.ping().await.is_err());
    r.restart();
    // The connection comes back in the background; the script cache is empty (NOSCRIPT → reload).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match s.take(&take(&tk, 1, "x", 0, 0, 0)).await {
            Ok(g) => {
                assert_eq!(g.tokens, 1);
                break;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("waiting for the store: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("store did not come back: {e}"),
        }
    }
}

#[tokio::test]
async fn bad_credentials_and_unreachable_stores_are_clear_errors() {
    let r = RedisServer::start_with_acl("proxy", "s3cret");
    let mut c = config(&r);
    let e = Store::connect(&c).await.err().expect("no credentials must fail");
    assert!(matches!(e, StoreError::Auth(_)), "{e}");
    c.username = Some("proxy".into());
    c.password = Some("wrong".into());
    let e = Store::connect(&c).await.err().expect("a wrong password must fail");
    assert!(matches!(e, StoreError::Auth(_)), "{e}");
    assert!(!e.to_string().contains("wrong"), "{e}");
    c.password = Some("s3cret".into());
    Store::connect(&c).await.unwrap().ping().await.unwrap();

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = Store::connect(&StoreConfig::new(format!("redis://127.0.0.1:{port}"))).await.err().unwrap();
    assert!(matches!(e, StoreError::Connection(_) | StoreError::Timeout(_)), "{e}");
    let e = Store::connect(&StoreConfig::new("redis://u:p@127.0.0.1:1")).await.err().unwrap();
    assert!(matches!(e, StoreError::Config(_)), "{e}");
}

/// The quota resets at the UTC boundary: the caller's clock (here: instants either side of midnight) picks the
/// period's key, and the store counts each key on its own.
#[tokio::test]
async fn quota_counters_reset_at_the_utc_period_boundary() {
    let r = RedisServer::start();
    let s = Store::connect(&config(&r)).await.unwrap();
    let tk = throttle_key("ns/a", "roll");
    for period in [Period::Day, Period::Week, Period::Month] {
        // The next boundary after now, so the keys have not expired yet.
        let end = portcullis_table::period::period_end(period, unix_now());
        let before = end - 1;
        let k1 = quota_key("ns/a", "roll", period, before);
        let k2 = quota_key("ns/a", "roll", period, end);
        assert_ne!(k1, k2, "{period:?}");
        let take_at = |k: &str, now: i64| {
            let k = k.to_string();
            let s = s.clone();
            let tk = tk.clone();
            async move { s.take(&take(&tk, 0, &k, 1, 3, quota_key_expires_at(period, now))).await.unwrap().units }
        };
        let mut got = 0;
        for _ in 0..5 {
            got += take_at(&k1, before).await;
        }
        assert_eq!(got, 3, "{period:?}: the limit within a period");
        assert_eq!(take_at(&k2, end).await, 1, "{period:?}: a new period starts at zero");
        assert_eq!(s.quota_used(&[k1, k2]).await.unwrap(), vec![3, 1]);
    }
}
