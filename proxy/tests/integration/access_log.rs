//! The access log and the per-client metrics of a real run: the proxy binary (its own process, its stdout read
//! line by line), the standard table, allowed requests sampled at 0.5, every refusal logged, never a key.

use crate::common::{Conn, WAIT, get, ip, standard_table, upstream, wait_until, write_table};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::net::TcpStream;

struct Proxy {
    child: Child,
    addr: SocketAddr,
    admin: SocketAddr,
    /// Every stdout line so far.
    out: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proxy {
    async fn start(args: &[&str]) -> Self {
        let (up, _seen) = upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tables.json");
        write_table(&path, &standard_table());
        let free = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let (listen, admin) = (free(), free());
        let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis-proxy"))
            .arg(format!("--listen={listen}"))
            .arg(format!("--admin-listen={admin}"))
            .arg(format!("--upstream={up}"))
            .arg(format!("--tables={}", path.display()))
            .args(args)
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + WAIT;
        loop {
            if TcpStream::connect(admin).await.is_ok() && get(ip(1), admin, "/readyz", &[]).await.status == 200 {
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "proxy exited early");
            assert!(Instant::now() < deadline, "proxy never became ready");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Proxy { child, addr: listen, admin, out, _dir: dir }
    }

    fn access(&self) -> Vec<Value> {
        let out = self.out.lock().unwrap();
        out.iter().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v["log"] == "access").collect()
    }

    async fn metrics(&self) -> String {
        get(ip(1), self.admin, "/metrics", &[]).await.body
    }
}

#[tokio::test]
async fn every_refusal_and_a_sample_of_allowed_requests_are_logged_with_their_client_never_the_key() {
    let p = Proxy::start(&["--access-log-sample=0.5", "--client-metrics=2"]).await;
    // 10 allowed requests of t/reader (GET /v1 from 127.0.0.1), with a query that must not be logged.
    let mut reader = Conn::open(ip(1), p.addr).await;
    for i in 0..10 {
        let path = if i % 2 == 0 { "/v1/items?token=QUERY-SECRET&page=2" } else { "/v1/./items" };
        assert_eq!(reader.send("GET", path, &[("x-api-key", "k-reader")]).await.status, 200);
    }
    // Refusals: unknown key, a known client from the wrong address, a route outside its plan, an invalid path,
    // and a quota (t/quota: 2 a day).
    assert_eq!(get(ip(1), p.addr, "/v1/x", &[("x-api-key", "not-a-key-SECRET")]).await.status, 401);
    assert_eq!(get(ip(9), p.addr, "/v1/x", &[("x-api-key", "k-reader")]).await.status, 403);
    assert_eq!(reader.send("DELETE", "/v1/x", &[("x-api-key", "k-reader")]).await.status, 403);
    assert_eq!(get(ip(1), p.addr, "/v1/..%2fadmin", &[("x-api-key", "k-reader")]).await.status, 400);
    let mut quota = Conn::open(ip(5), p.addr).await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(quota.send("GET", "/anything", &[("x-api-key", "k-quota")]).await.status.as_u16());
    }
    assert_eq!(got, [200, 200, 429]);
    // A third client: beyond --client-metrics=2, counted as "other".
    assert_eq!(get(ip(2), p.addr, "/", &[("x-api-key", "k-other")]).await.status, 200);

    // 13 allowed requests (10 + 2 + 1), sampled at 0.5 → ⌊13 × 0.5⌋ = 6 lines; and all 5 refusals.
    wait_until("the access-log lines", || p.access().len() >= 11).await;
    let lines = p.access();
    let refusals: Vec<&Value> = lines.iter().filter(|l| l["reason"] != "allowed").collect();
    let allowed = lines.len() - refusals.len();
    assert_eq!((allowed, refusals.len()), (6, 5), "{lines:#?}");
    let find = |reason: &str| {
        refusals.iter().find(|l| l["reason"] == reason).copied().unwrap_or_else(|| panic!("{reason}: {lines:#?}"))
    };
    let unknown = find("invalid_key");
    assert_eq!((unknown["client"].as_str(), unknown["status"].as_u64()), (Some("-"), Some(401)));
    let wrong_source = find("source_not_allowed");
    assert_eq!(wrong_source["client"], "t/reader", "a refusal after identification names the client");
    assert_eq!(wrong_source["source"], "127.0.0.9");
    let route = find("route_not_allowed");
    assert_eq!((route["method"].as_str(), route["path"].as_str()), (Some("DELETE"), Some("/v1/x")));
    assert_eq!(find("invalid_path")["path"], "/v1/..%2fadmin", "an invalid path is logged as received");
    assert_eq!(find("quota_exceeded")["client"], "t/quota");
    for l in &lines {
        for field in ["time", "client", "source", "method", "path", "status", "reason", "total_ms", "bytes"] {
            assert!(!l[field].is_null(), "{field} missing in {l}");
        }
        assert!(l["bytes"].as_u64().unwrap() > 0, "{l}");
    }
    let forwarded: Vec<&Value> = lines.iter().filter(|l| l["reason"] == "allowed").collect();
    assert!(forwarded.iter().all(|l| l["upstream_ms"].as_f64().is_some()), "{forwarded:#?}");
    assert!(forwarded.iter().any(|l| l["path"] == "/v1/items"), "normalised, without the query: {forwarded:#?}");
    assert!(refusals.iter().all(|l| l["upstream_ms"].is_null()), "refusals never reached the application");

    // Never a key, in any stdout line (diagnostics at debug level included).
    let all = p.out.lock().unwrap().join("\n");
    for key in ["k-reader", "k-quota", "k-other", "not-a-key-SECRET", "QUERY-SECRET"] {
        assert!(!all.contains(key), "{key} in the output");
    }

    // Per-client metrics: the first two clients seen have labels, the third is "other".
    let m = p.metrics().await;
    assert!(m.contains(r#"portcullis_proxy_client_requests_total{client="t/reader",outcome="allowed"} 10"#), "{m}");
    assert!(m.contains(r#"client="t/reader",outcome="source_not_allowed"} 1"#), "{m}");
    assert!(m.contains(r#"client="t/reader",outcome="route_not_allowed"} 1"#), "{m}");
    assert!(!m.contains(r#"outcome="invalid_path""#), "refused before a client was identified: not per client");
    assert!(m.contains(r#"portcullis_proxy_client_requests_total{client="other",outcome="allowed"} 1"#), "{m}");
    assert!(m.contains(r#"portcullis_proxy_client_quota_remaining{client="t/quota",plan="daily"} 0"#), "{m}");
    assert!(m.contains("portcullis_proxy_access_log_dropped_total 0"), "{m}");
}

#[tokio::test]
async fn off_means_no_line_and_no_client_series() {
    let p = Proxy::start(&["--access-log=off", "--client-metrics=0"]).await;
    assert_eq!(get(ip(1), p.addr, "/v1/x", &[("x-api-key", "k-reader")]).await.status, 200);
    assert_eq!(get(ip(1), p.addr, "/v1/x", &[("x-api-key", "nope")]).await.status, 401);
    let m = p.metrics().await;
    assert!(m.contains(r#"portcullis_proxy_requests_total{decision="deny",reason="invalid_key"} 1"#), "{m}");
    assert!(!m.contains("client_requests_total") && !m.contains("access_log_dropped"), "{m}");
    assert!(p.access().is_empty(), "{:?}", p.access());
}
