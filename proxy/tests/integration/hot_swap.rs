//! Tables swapped under load (file mode): no failed or reset request, and a revoked key is refused on the very
//! next request on the same keep-alive connection. A deleted or unreadable file revokes the table; a bad one does
//! not.

use crate::common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const CLIENTS: usize = 4;
const MIN_REQUESTS_PER_CLIENT: usize = 750;
const REWRITES: usize = 120;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swaps_under_load_lose_nothing() {
    let (up, seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    let mut clients = standard_clients();
    clients.push(client("t/load", "k-load", &["127.0.0.0/8"], &["open"]));
    write_table(&path, &portcullis_table::Table::new("t/svc", plans(), clients.clone()));
    let proxy = start(config(up, &path)).await;
    wait_until("table loaded", || proxy.tables.is_ready()).await;
    let addr = proxy.addr;

    let done = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for i in 0..CLIENTS {
        let done = done.clone();
        let total = total.clone();
        load.push(tokio::spawn(async move {
            let mut c = Conn::open(ip(20 + i as u8), addr).await;
            let mut n = 0usize;
            while n < MIN_REQUESTS_PER_CLIENT || !done.load(Ordering::Acquire) {
                let r = c.send("GET", "/load", &[("x-api-key", "k-load")]).await;
                assert_eq!(r.status, 200, "request {n} of client {i}: {}", r.body);
                n += 1;
                total.fetch_add(1, Ordering::Relaxed);
                assert!(n < 200_000, "load loop is bounded");
            }
            n
        }));
    }

    // Rewrite the table (a different revision each time) and wait until each one is in force.
    let swaps_before = proxy.tables.revision();
    for i in 0..REWRITES {
        let mut cs = clients.clone();
        cs.push(client(&format!("t/churn-{i:04}"), &format!("k-churn-{i}"), &["10.0.0.0/8"], &["open"]));
        let t = portcullis_table::Table::new("t/svc", plans(), cs);
        write_table(&path, &t);
        let rev = t.revision.clone();
        wait_until("rewritten table applied", || proxy.tables.revision().as_deref() == Some(rev.as_str())).await;
    }
    assert_ne!(proxy.tables.revision(), swaps_before);
    done.store(true, Ordering::Release);
    let mut sum = 0;
    for l in load {
        sum += within("load client", l).await.expect("no failed request");
    }
    assert!(sum >= CLIENTS * MIN_REQUESTS_PER_CLIENT);
    assert_eq!(sum, total.load(Ordering::Relaxed));
    assert!(seen.count() >= sum);
    let m = proxy.metrics.encode();
    let swaps: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_proxy_table_swaps_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("swap counter");
    assert!(swaps > REWRITES as u64, "{swaps} swaps");
    assert!(!m.contains("tables_rejected_total{"), "no table was rejected: {m}");

    // Revocation: same keep-alive connection, the very next request after the swap is refused.
    let mut c = Conn::open(ip(1), addr).await;
    assert_eq!(c.send("GET", "/v1/a", &[("x-api-key", "k-reader")]).await.status, 200);
    let revoked: Vec<_> = clients.iter().filter(|c| c.id != "t/reader").cloned().collect();
    let t = portcullis_table::Table::new("t/svc", plans(), revoked);
    write_table(&path, &t);
    wait_until("revocation applied", || proxy.tables.revision().as_deref() == Some(t.revision.as_str())).await;
    let r = c.send("GET", "/v1/a", &[("x-api-key", "k-reader")]).await;
    assert_eq!(r.status, 401);
    assert_eq!(r.reason(), "invalid_key");
    // The connection itself is still fine for other clients' keys.
    assert_eq!(c.send("GET", "/x", &[("x-api-key", "k-load")]).await.status, 200);
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn limiter_state_survives_swaps() {
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    let clients = standard_clients();
    write_table(&path, &portcullis_table::Table::new("t/svc", plans(), clients.clone()));
    let proxy = start(config(up, &path)).await;
    wait_until("table loaded", || proxy.tables.is_ready()).await;
    let mut c = Conn::open(ip(5), proxy.addr).await;
    for _ in 0..3 {
        assert_eq!(c.send("GET", "/", &[("x-api-key", "k-throttled")]).await.status, 200);
    }
    assert_eq!(c.send("GET", "/", &[("x-api-key", "k-quota")]).await.status, 200);
    assert_eq!(c.send("GET", "/", &[("x-api-key", "k-quota")]).await.status, 200);
    // A swap that changes other things: the spent burst and quota stay spent.
    let mut cs = clients.clone();
    cs.push(client("t/new", "k-new", &["127.0.0.1/32"], &["open"]));
    let t = portcullis_table::Table::new("t/svc", plans(), cs);
    write_table(&path, &t);
    wait_until("swap", || proxy.tables.revision().as_deref() == Some(t.revision.as_str())).await;
    assert_eq!(c.send("GET", "/", &[("x-api-key", "k-throttled")]).await.reason(), "rate_limited");
    assert_eq!(c.send("GET", "/", &[("x-api-key", "k-quota")]).await.reason(), "quota_exceeded");
    // Changing the throttle itself starts a fresh limiter.
    let mut p = plans();
    p.get_mut("tight").unwrap().throttle.as_mut().unwrap().burst = 4;
    let t = portcullis_table::Table::new("t/svc", p, clients);
    write_table(&path, &t);
    wait_until("swap", || proxy.tables.revision().as_deref() == Some(t.revision.as_str())).await;
    assert_eq!(c.send("GET", "/", &[("x-api-key", "k-throttled")]).await.status, 200);
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

/// Sends requests on `c` until one gets `status`; returns that reply.
async fn until_status(c: &mut Conn, key: &str, status: u16) -> Reply {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let r = c.send("GET", "/v1/x", &[("x-api-key", key)]).await;
        if r.status.as_u16() == status {
            return r;
        }
        assert!(std::time::Instant::now() < deadline, "never got {status}; last {} {}", r.status, r.body);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn a_deleted_or_unreadable_table_file_revokes_and_a_bad_one_does_not() {
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    let t = standard_table();
    write_table(&path, &t);
    let proxy = start(config(up, &path)).await;
    wait_until("table loaded", || proxy.tables.is_ready()).await;
    let admin = proxy.admin_addr.unwrap();
    let mut c = Conn::open(ip(1), proxy.addr).await;
    assert_eq!(c.send("GET", "/v1/x", &[("x-api-key", "k-reader")]).await.status, 200);

    // A bad file is a bad table: rejected, the table in force stays.
    write_atomic(&path, b"{not json");
    wait_until("bad file rejected", || {
        proxy.metrics.encode().contains(r#"portcullis_proxy_tables_rejected_total{source="file"} 1"#)
    })
    .await;
    assert_eq!(c.send("GET", "/v1/x", &[("x-api-key", "k-reader")]).await.status, 200);

    // Deleted: every request is refused, /readyz says why.
    std::fs::remove_file(&path).unwrap();
    let r = until_status(&mut c, "k-reader", 503).await;
    assert_eq!(r.reason(), "table_revoked");
    let ready = get(ip(1), admin, "/readyz", &[]).await;
    assert_eq!(ready.status, 503);
    assert!(ready.body.contains("table revoked (file_missing)"), "{}", ready.body);
    assert_eq!(c.send("GET", "/x", &[("x-api-key", "k-other")]).await.reason(), "table_revoked");

    // The same content back: applied again.
    write_table(&path, &t);
    until_status(&mut c, "k-reader", 200).await;
    assert_eq!(get(ip(1), admin, "/readyz", &[]).await.status, 200);

    // No longer readable (the path names a directory): refused as well. Swapped in atomically (a symlink renamed
    // over the file), so the poller never finds the path missing in between (CI once saw that gap: a second
    // `file_missing`).
    let dir = path.with_extension("dir");
    std::fs::create_dir(&dir).unwrap();
    let link = path.with_extension("link");
    std::os::unix::fs::symlink(&dir, &link).unwrap();
    std::fs::rename(&link, &path).unwrap();
    assert_eq!(until_status(&mut c, "k-reader", 503).await.reason(), "table_revoked");
    let ready = get(ip(1), admin, "/readyz", &[]).await;
    assert!(ready.body.contains("table revoked (file_unreadable)"), "{}", ready.body);
    // Written over the link, atomically.
    write_table(&path, &t);
    until_status(&mut c, "k-reader", 200).await;

    let m = proxy.metrics.encode();
    assert!(m.contains(r#"portcullis_proxy_table_revocations_total{cause="file_missing"} 1"#), "{m}");
    assert!(m.contains(r#"portcullis_proxy_table_revocations_total{cause="file_unreadable"} 1"#), "{m}");
    assert!(m.contains(r#"portcullis_proxy_table_state{state="serving"} 1"#), "{m}");
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}
