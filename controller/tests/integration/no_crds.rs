//! Without the CRDs the controller exits at once with one clear line (its own control plane: the binary's shared
//! one has the CRDs installed).

use portcullis_testkit::ControlPlane;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exits_with_one_clear_line_when_crds_are_missing() {
    let cp = own_cp();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_portcullis-controller"))
            .args(["--metrics-listen", "127.0.0.1:0", "--leader-elect=false", "--webhook=false"])
            .env("KUBECONFIG", cp.admin_kubeconfig())
            .output(),
    )
    .await
    .expect("exits within 60 s")
    .expect("runs");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(
        lines[0].starts_with("error: CustomResourceDefinition apiclients.portcullis.dev is not installed"),
        "{stderr}"
    );
}

/// This module's own control plane (see the binary's docs for why it does not share the common one).
fn own_cp() -> &'static ControlPlane {
    static CP: portcullis_testkit::OnceCell = portcullis_testkit::OnceCell::new();
    ControlPlane::once(&CP)
}
