//! The shared store, from the controller's side: a check every `--store-check-seconds` (a PING with the configured
//! credentials) whose outcome ([`StoreHealth`]) drives every plan's `GlobalLimits` condition, and the copies of the
//! store credentials (`portcullis-store-credentials`) in each namespace with a protected Service, which the injected
//! sidecars read through `secretKeyRef`.

use super::{Ctx, Error, MANAGED_BY};
use crate::store::{PASSWORD_KEY, SIDECAR_CREDENTIALS_SECRET, StoreHealth, StoreSettings, USERNAME_KEY};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use portcullis_table::Chain;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Checks the store and syncs the credential copies every `check_every`, until the task is dropped.
pub async fn run(ctx: Arc<Ctx>) {
    let Some(settings) = ctx.store.clone() else { return };
    let mut client = super::usage::StoreClient::new(&settings);
    let mut tick = tokio::time::interval(settings.check_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        let health = client.check().await;
        let up = health == StoreHealth::Reachable;
        ctx.metrics.observe("store_check", started.elapsed(), up);
        ctx.metrics.store_up.set(i64::from(up));
        set_health(&ctx, health);
        if let Err(e) = sync_credentials(&ctx, &settings).await {
            tracing::warn!(error = %Chain(&e), "syncing the store credential Secrets failed; retrying");
        }
    }
}

/// Records the outcome of a check; on a change, logs it and re-decides every plan's status (through the table
/// queue, which updates the status of the plans granting each Service).
pub(crate) fn set_health(ctx: &Ctx, health: StoreHealth) {
    let old = {
        let mut h = ctx.store_health.write().expect("store health lock");
        if *h == health {
            return;
        }
        std::mem::replace(&mut *h, health.clone())
    };
    match &health {
        StoreHealth::Reachable => tracing::info!(was = old.label(), "shared store reachable"),
        StoreHealth::Unreachable(e) | StoreHealth::AuthFailed(e) | StoreHealth::Invalid(e) => {
            tracing::warn!(state = health.label(), was = old.label(), error = %e, "shared store not usable")
        }
        _ => {}
    }
    ctx.dispatch(
        "store",
        super::triggers::Triggers { services: ctx.all_services().into_iter().collect(), ..Default::default() },
    );
}

/// The copy of the credentials for a sidecar namespace: only the `username` and `password` keys of `source`.
pub fn credentials_copy(source: &Secret) -> Secret {
    let data: BTreeMap<String, ByteString> = source
        .data
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() == USERNAME_KEY || k.as_str() == PASSWORD_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(SIDECAR_CREDENTIALS_SECRET.into()),
            labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string())])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// Namespaces whose sidecars need the credentials: those with a protected Service (a table this controller wrote).
fn sidecar_namespaces(ctx: &Ctx) -> BTreeSet<String> {
    ctx.state.read().expect("state lock").keys().map(|k| k.namespace.clone()).collect()
}

/// Writes the credential copy into every sidecar namespace (when it differs) and deletes copies (ours, by label)
/// from namespaces that no longer have a protected Service. Without `--store-credentials-secret` there is nothing to
/// copy; a missing source Secret leaves the copies as they are (and says so).
pub async fn sync_credentials(ctx: &Ctx, settings: &StoreSettings) -> Result<(), Error> {
    let Some(source_name) = &settings.credentials_secret else { return Ok(()) };
    let source = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.own_namespace).get_opt(source_name).await?;
    let Some(source) = source else {
        tracing::warn!(namespace = %ctx.own_namespace, secret = %source_name, "store credentials Secret not found; sidecars keep their copies");
        return Ok(());
    };
    let want = credentials_copy(&source);
    let namespaces = sidecar_namespaces(ctx);
    for ns in &namespaces {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
        if super::access::apply_if_changed(&api, &want).await? {
            tracing::info!(namespace = %ns, secret = SIDECAR_CREDENTIALS_SECRET, "store credentials copied");
        }
    }
    let stale: Vec<String> = ctx
        .secrets
        .state()
        .iter()
        .filter(|s| s.name_any() == SIDECAR_CREDENTIALS_SECRET)
        .filter(|s| s.labels().get("app.kubernetes.io/managed-by").map(String::as_str) == Some(MANAGED_BY))
        .filter_map(|s| s.namespace())
        .filter(|ns| !namespaces.contains(ns) && *ns != ctx.own_namespace)
        .collect();
    for ns in stale {
        let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        match api.delete(SIDECAR_CREDENTIALS_SECRET, &DeleteParams::default()).await {
            Ok(_) => tracing::info!(namespace = %ns, "store credentials copy removed (no protected Service left)"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Writes the credential copy into `ns` right away (a new protected Service's pods should find it when they start),
/// from the source Secret; a no-op without a store or `--store-credentials-secret`.
pub async fn ensure_credentials(ctx: &Ctx, ns: &str) -> Result<(), Error> {
    let Some(source_name) = ctx.store.as_ref().and_then(|s| s.credentials_secret.as_ref()) else { return Ok(()) };
    let Some(source) = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.own_namespace).get_opt(source_name).await?
    else {
        return Ok(());
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    if super::access::apply_if_changed(&api, &credentials_copy(&source)).await? {
        tracing::info!(namespace = %ns, secret = SIDECAR_CREDENTIALS_SECRET, "store credentials copied");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_holds_only_the_credentials_and_is_ours() {
        let mut src = Secret::default();
        src.metadata.name = Some("redis-auth".into());
        src.metadata.annotations = Some(BTreeMap::from([("a".to_string(), "b".to_string())]));
        src.data = Some(BTreeMap::from([
            ("username".to_string(), ByteString(b"portcullis".to_vec())),
            ("password".to_string(), ByteString(b"s3cret".to_vec())),
            ("admin-password".to_string(), ByteString(b"other".to_vec())),
        ]));
        let c = credentials_copy(&src);
        assert_eq!(c.metadata.name.as_deref(), Some("portcullis-store-credentials"));
        assert_eq!(c.metadata.labels.unwrap()["app.kubernetes.io/managed-by"], MANAGED_BY);
        assert!(c.metadata.annotations.is_none());
        let keys: Vec<&String> = c.data.as_ref().unwrap().keys().collect();
        assert_eq!(keys, ["password", "username"]);
    }
}
