//! Writing one Service's table ConfigMaps, fenced so that a deposed leader cannot publish.
//!
//! Order of a new revision: shards into the slot the live index does not point at (server-side apply), then the
//! index, then leftovers of the slot just written. Invariants:
//! - **Fencing.** The index is created with `create` (fails if it exists) or `replace`d with the resourceVersion
//!   read at the start of the reconcile (fails if anyone wrote it since), and only while this replica's Lease is
//!   valid ([`super::Ctx::ensure_leader`]). A writer that loses the precondition gets [`Error::Conflict`]: it
//!   re-reads and re-decides, or stops if it no longer leads. Deletion of the index carries the same precondition.
//! - **Sequence.** Every index write carries `sequence` = the replaced index's + 1 (see
//!   `portcullis_table::sequence`); proxies never go back to a lower one.
//! - **Shard deletion never hits another writer's shards.** Only shards of the slot this writer has just pointed the
//!   index at, numbered beyond its own count, are deleted; only after re-reading the index and finding our own
//!   write still there; and each with the resourceVersion it was listed with. The previous slot stays whole for
//!   proxies mid-read.
//! - **Residual window.** Shards are not fenced by a precondition (their names are fixed, for RBAC). A writer
//!   paused between its Lease check and a shard write, and resumed after another leader published into the same
//!   slot, overwrites that leader's shards; its index write then fails, and the new leader sees the shard events and
//!   republishes. Proxies verify every shard against the index digest, so they never load a mixed table: at worst
//!   they keep their current table for those milliseconds.
//! - **Drift.** A live index whose revision is the desired one is checked against the cached shards' content
//!   hashes; a missing or edited shard (confirmed with a GET) makes a fresh revision in the other slot.

use super::caches::CACHED_DATA_SHA256;
use super::{Ctx, Error, FIELD_MANAGER, MANAGED_BY};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::reflector::ObjectRef;
use portcullis_table::Table;
use portcullis_table::naming::{INDEX_DATA_KEY, LABEL_ROLE, LABEL_SERVICE, SHARD_DATA_KEY, Slot, index_name};
use portcullis_table::sequence::{PreviousIndex, next_sequence};
use portcullis_table::shard::{IndexDoc, Rendered, render};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Budget of the index's data string: the same as a shard's (a ConfigMap holds at most 1 MiB in total).
pub const MAX_INDEX_BYTES: usize = portcullis_table::shard::MAX_SHARD_BYTES;

/// The live index of a Service, as read at the start of a reconcile.
pub struct Live {
    pub cm: Option<ConfigMap>,
    pub doc: Option<IndexDoc>,
}

impl Live {
    pub fn owners(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.cm.iter().flat_map(|cm| cm.owner_references().iter().map(|o| o.uid.clone())).collect();
        v.sort();
        v
    }
}

/// Writes the tables of one Service.
pub struct Writer<'a> {
    pub ctx: &'a Ctx,
    pub cms: Api<ConfigMap>,
    pub service: &'a str,
    pub index: String,
}

impl<'a> Writer<'a> {
    pub fn new(ctx: &'a Ctx, namespace: &str, service: &'a str) -> Self {
        Self { ctx, cms: Api::namespaced(ctx.client.clone(), namespace), service, index: index_name(service) }
    }

    pub async fn read(&self) -> Result<Live, Error> {
        let cm = self.cms.get_opt(&self.index).await?;
        let doc = cm
            .as_ref()
            .and_then(|cm| cm.data.as_ref()?.get(INDEX_DATA_KEY).cloned())
            .and_then(|json| IndexDoc::parse(&json, &self.index).ok());
        Ok(Live { cm, doc })
    }

    /// Publishes `table` as a new revision replacing `live`; returns the number of shards written.
    pub async fn publish(
        &self,
        live: &Live,
        table: &Table,
        owners: &[OwnerReference],
        max_shard_bytes: usize,
    ) -> Result<Rendered, Error> {
        let slot = live.doc.as_ref().map(|d| d.slot.other()).unwrap_or(Slot::A);
        let previous = match (&live.cm, &live.doc) {
            (None, _) => PreviousIndex::Absent,
            (Some(_), Some(doc)) => PreviousIndex::Readable(doc),
            (Some(_), None) => PreviousIndex::Unreadable,
        };
        let sequence = next_sequence(previous, jiff::Timestamp::now());
        let rendered = render(table, &self.index, slot, sequence, max_shard_bytes)
            .map_err(|source| Error::Table { service: table.service.clone(), source })?;
        if rendered.index_json.len() > MAX_INDEX_BYTES {
            return Err(Error::IndexTooLarge {
                service: table.service.clone(),
                bytes: rendered.index_json.len(),
                max: MAX_INDEX_BYTES,
            });
        }
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        for (name, json) in &rendered.shards {
            self.ctx.ensure_leader()?;
            let cm = table_configmap(name, self.service, "shard", SHARD_DATA_KEY, json, owners, None);
            self.cms.patch(name, &pp, &Patch::Apply(&cm)).await?;
        }
        let mut cm = table_configmap(
            &self.index,
            self.service,
            "index",
            INDEX_DATA_KEY,
            &rendered.index_json,
            owners,
            Some(&table.revision),
        );
        self.ctx.ensure_leader()?;
        let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        let written = match &live.cm {
            None => self.cms.create(&pp, &cm).await,
            Some(current) => {
                cm.metadata.resource_version = current.metadata.resource_version.clone();
                self.cms.replace(&self.index, &pp, &cm).await
            }
        };
        let written = written.map_err(|e| self.conflict(e))?;
        self.prune_slot(slot, rendered.shards.len(), &written).await?;
        Ok(rendered)
    }

    /// Whether a shard the live index names is missing or differs from the digest in the index (cache first, then
    /// a GET to confirm: the cache may lag behind our own writes).
    pub async fn damaged(&self, doc: &IndexDoc) -> Result<Vec<String>, Error> {
        let ns = self.cms_namespace();
        let mut out = Vec::new();
        for s in &doc.shards {
            let cached = self.ctx.caches.configmaps.get(&ObjectRef::new(&s.name).within(&ns));
            let cached_sha = cached.as_ref().and_then(|cm| cm.annotations().get(CACHED_DATA_SHA256).cloned());
            if cached_sha.as_deref() == Some(s.sha256.as_str()) {
                continue;
            }
            let live = self.cms.get_opt(&s.name).await?;
            let live_sha = live.as_ref().and_then(|cm| cm.data.as_ref()?.get(SHARD_DATA_KEY)).map(|d| data_sha256(d));
            if live_sha.as_deref() != Some(s.sha256.as_str()) {
                out.push(s.name.clone());
            }
        }
        Ok(out)
    }

    fn cms_namespace(&self) -> String {
        self.cms.namespace().unwrap_or_default().to_string()
    }

    /// Deletes the index (with the read resourceVersion as precondition), then every table ConfigMap of the Service.
    pub async fn remove(&self, live: &Live) -> Result<(), Error> {
        if let Some(cm) = &live.cm {
            self.ctx.ensure_leader()?;
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: cm.metadata.resource_version.clone(),
                    uid: cm.metadata.uid.clone(),
                }),
                ..Default::default()
            };
            match self.cms.delete(&self.index, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(self.conflict(e)),
            }
        }
        let lp = ListParams::default()
            .labels(&format!("{LABEL_SERVICE}={},app.kubernetes.io/managed-by={MANAGED_BY}", self.service));
        for cm in self.cms.list_metadata(&lp).await? {
            self.delete_listed(&cm.name_any(), cm.metadata.resource_version.clone()).await?;
        }
        Ok(())
    }

    /// After our index write: deletes shards of `slot` numbered `count` and above (left from an older revision in
    /// the same slot), unless the index has changed since our write (then they may be another writer's).
    async fn prune_slot(&self, slot: Slot, count: usize, written: &ConfigMap) -> Result<(), Error> {
        let lp = ListParams::default().labels(&format!("{LABEL_SERVICE}={},{LABEL_ROLE}=shard", self.service));
        let listed = self.cms.list_metadata(&lp).await?;
        let still_ours = self.cms.get_opt(&self.index).await?.is_some_and(|cm| {
            cm.metadata.uid == written.metadata.uid && cm.metadata.resource_version == written.metadata.resource_version
        });
        if !still_ours {
            return Ok(());
        }
        let prefix = format!("{}-{}-", self.index, slot.as_str());
        for cm in listed {
            let name = cm.name_any();
            let beyond = name.strip_prefix(&prefix).and_then(|n| n.parse::<usize>().ok()).is_some_and(|n| n >= count);
            if beyond && cm.labels().get("app.kubernetes.io/managed-by").map(String::as_str) == Some(MANAGED_BY) {
                self.delete_listed(&name, cm.metadata.resource_version.clone()).await?;
            }
        }
        Ok(())
    }

    async fn delete_listed(&self, name: &str, resource_version: Option<String>) -> Result<(), Error> {
        let dp =
            DeleteParams { preconditions: Some(Preconditions { resource_version, uid: None }), ..Default::default() };
        match self.cms.delete(name, &dp).await {
            Ok(_) => tracing::debug!(configmap = %name, "deleted stale table ConfigMap"),
            // Gone already, or rewritten since we listed it (then it is not stale): leave it.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    fn conflict(&self, e: kube::Error) -> Error {
        match e {
            kube::Error::Api(s) if s.code == 409 || s.code == 404 => Error::Conflict(self.index.clone()),
            e => e.into(),
        }
    }
}

/// Hex SHA-256 of a ConfigMap data string (what an index records per shard).
pub fn data_sha256(data: &str) -> String {
    hex::encode(Sha256::digest(data.as_bytes()))
}

fn table_configmap(
    name: &str,
    service: &str,
    role: &str,
    data_key: &str,
    json: &str,
    owners: &[OwnerReference],
    revision: Option<&str>,
) -> ConfigMap {
    let labels = BTreeMap::from([
        (LABEL_SERVICE.to_string(), service.to_string()),
        (LABEL_ROLE.to_string(), role.to_string()),
        ("app.kubernetes.io/managed-by".to_string(), MANAGED_BY.to_string()),
    ]);
    let annotations = revision.map(|r| BTreeMap::from([("portcullis.dev/revision".to_string(), r.to_string())]));
    ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(labels),
            annotations,
            owner_references: Some(owners.to_vec()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(data_key.to_string(), json.to_string())])),
        ..Default::default()
    }
}
