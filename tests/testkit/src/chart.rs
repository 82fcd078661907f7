//! The Helm chart on the local control plane, as the demo and the propagation benchmark install it: the controller
//! then runs as a local process with the chart's ServiceAccount and RBAC.

use crate::ControlPlane;
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::Api;
use std::path::Path;
use std::process::Command;

/// The namespace the chart is installed into.
pub const RELEASE_NS: &str = "portcullis-system";

/// `helm install portcullis charts/portcullis` into the release namespace, with the webhook called on loopback
/// (the controller runs as a local process). Returns helm's output.
pub fn helm_install(cp: &ControlPlane, root: &Path, webhook_port: u16) -> Result<String> {
    let out = Command::new(cp.helm())
        .current_dir(root)
        .args(["install", "portcullis", "charts/portcullis", "-n", RELEASE_NS, "--create-namespace"])
        .args(["--set", &format!("webhook.url=https://127.0.0.1:{webhook_port}/mutate")])
        .arg("--kubeconfig")
        .arg(cp.admin_kubeconfig())
        .output()?;
    if !out.status.success() {
        bail!("helm install failed:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The chart's controller ServiceAccount and a token for it: the controller runs with its least-privilege RBAC.
pub async fn controller_token(cp: &ControlPlane, admin: &kube::Client) -> Result<(String, String)> {
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), RELEASE_NS);
    let sa = sas
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .find(|n| n != "default")
        .context("the chart created no ServiceAccount for the controller")?;
    let token = cp.service_account_token(RELEASE_NS, &sa).await;
    Ok((sa, token))
}
