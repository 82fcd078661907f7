//! The admin endpoints the controller and the kubelet rely on, over real sockets: `/revision` (what the
//! `Enforced` condition reads) and `/app-health/...` (the application's own probes, run on loopback).

use crate::common::*;
use portcullis_table::sidecar::{AppProbe, HttpGetProbe, ProbeKind, RevisionReport, TcpSocketProbe, app_health_path};

fn report(r: &Reply) -> RevisionReport {
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{:?} is not a revision report: {e}", r.body))
}

#[tokio::test]
async fn revision_reports_the_table_in_force_and_the_pod() {
    let (up, _seen) = upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tables.json");
    let mut c = config(up, &path);
    c.pod_name = Some("orders-0".into());
    let proxy = start(c).await;
    let admin = proxy.admin_addr.unwrap();

    let r = get(ip(1), admin, "/revision", &[]).await;
    assert_eq!(r.status, 503, "no table yet");
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(report(&r), RevisionReport { service: None, revision: None, pod: Some("orders-0".into()) });

    let table = standard_table();
    write_table(&path, &table);
    wait_until("table loaded", || proxy.tables.is_ready()).await;
    let r = get(ip(1), admin, "/revision", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        report(&r),
        RevisionReport {
            service: Some(table.service.clone()),
            revision: Some(table.revision.clone()),
            pod: Some("orders-0".into())
        }
    );
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}

#[tokio::test]
async fn app_health_runs_the_configured_probes_on_loopback_only() {
    let (up, seen) = upstream().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(up, &dir.path().join("tables.json"));
    let http = |port: u16, path: &str| AppProbe {
        http_get: Some(HttpGetProbe { port, path: path.into(), http_headers: vec![] }),
        tcp_socket: None,
        timeout_seconds: 1,
    };
    let tcp = |port: u16| AppProbe { http_get: None, tcp_socket: Some(TcpSocketProbe { port }), timeout_seconds: 1 };
    c.app_probes.insert(app_health_path("app", ProbeKind::Liveness), http(up.port(), "/healthz?deep=1"));
    c.app_probes.insert(app_health_path("app", ProbeKind::Readiness), tcp(up.port()));
    c.app_probes.insert(app_health_path("app", ProbeKind::Startup), tcp(closed));
    let proxy = start(c).await;
    let admin = proxy.admin_addr.unwrap();

    // Served without a table: probes are about the app, not about the keys.
    let r = get(ip(1), admin, "/app-health/app/livez", &[("user-agent", "kube-probe/1.37")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("answered 200"), "{}", r.body);
    assert_eq!(seen.count(), 1, "exactly one request reached the app");
    assert_eq!(seen.last()["user-agent"], "kube-probe/1.37", "the kubelet's User-Agent is passed on");
    let r = get(ip(1), admin, "/app-health/app/readyz", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = get(ip(1), admin, "/app-health/app/startupz", &[]).await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains(&format!("127.0.0.1:{closed}")), "{}", r.body);

    // Only configured probes: the caller picks a path among them, never a port or a path of the app.
    assert_eq!(get(ip(1), admin, "/app-health/other/livez", &[]).await.status, 404);
    assert_eq!(get(ip(1), admin, "/app-health/app/livez/../readyz", &[]).await.status, 404);
    let mut conn = Conn::open(ip(1), admin).await;
    assert_eq!(conn.send("POST", "/app-health/app/livez", &[]).await.status, 405);
    assert_eq!(seen.count(), 1);
    proxy.shutdown();
    within("shutdown", proxy.wait()).await;
}
