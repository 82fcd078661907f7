//! `/readyz` follows the admission webhook, not leadership or cache sync: a standby replica whose webhook serves is
//! ready (so with 2+ replicas the webhook Service keeps endpoints through restarts and leader changes), and a
//! replica whose webhook does not serve is not.

use crate::common::*;
use portcullis_testkit::wait_for;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

async fn readyz(admin: std::net::SocketAddr, want: &'static str) {
    wait_for(T, &format!("/readyz {want}"), || async {
        http_get(admin, "/readyz").await.filter(|(s, _)| s.contains(want)).map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_webhook_not_the_lease() {
    let env = env("ready").await;
    let lease = format!("ready-{}", env.ns);
    let leader = start_controller_with_lease(&env, "ready-1", &lease).await;
    readyz(leader.admin_addr, "200").await;
    wait_for(T, "ready-1 leads", || async {
        let (_, body) = http_get(leader.admin_addr, "/metrics").await?;
        body.contains("portcullis_controller_leader 1").then_some(())
    })
    .await;

    let gate = Arc::new(AtomicBool::new(false));
    let g = gate.clone();
    let standby = start_controller_with(&env, "ready-2", &lease, None, move |c| c.webhook_ready = Some(g)).await;
    // Its admin server answers, but its webhook does not serve yet: not ready.
    readyz(standby.admin_addr, "503").await;
    gate.store(true, Ordering::SeqCst);
    // The webhook serves: ready, while the other replica holds the Lease (this one never synced a cache).
    readyz(standby.admin_addr, "200").await;
    let (_, body) = http_get(standby.admin_addr, "/metrics").await.expect("metrics");
    assert!(body.contains("portcullis_controller_leader 0"), "ready-2 is a standby: {body}");
    gate.store(false, Ordering::SeqCst);
    readyz(standby.admin_addr, "503").await;
    standby.stop().await.unwrap();
    leader.stop().await.unwrap();
}
