//! Writing one Service's table ConfigMaps, fenced so that a deposed leader cannot publish.
//!
//! Order of a new revision (stable layout, `portcullis_table::shard`): the changed shards, each into the slot its
//! previous version is not in (four at a time), then the index; leftovers are deleted later. Invariants:
//! - **Fencing.** The index is created with `create` (fails if it exists) or `replace`d with the resourceVersion
//!   read at the start of the reconcile (fails if anyone wrote it since), and only while this replica's Lease is
//!   valid ([`Fence::check`]). A writer that loses the precondition gets [`Error::Conflict`]: it
//!   re-reads and re-decides, or stops if it no longer leads. Deletion of the index carries the same precondition.
//! - **Sequence.** Every index write carries `sequence` = the replaced index's + 1 (see
//!   `portcullis_table::sequence`); proxies never go back to a lower one.
//! - **Shard deletion** is not part of a publish: [`Writer::publish`] returns a [`Prune`], which the table worker
//!   runs while it has nothing else to do ([`Writer::prune`]) and drops when a trigger arrives (deleting the
//!   ≈ 60 shards a bulk load leaves took 2.5 s, which the next change waited for). Only shard ConfigMaps that
//!   neither the index just written nor the one it replaced names are deleted; only after re-reading the index and
//!   finding that write still there (a later publish of the Service makes an older [`Prune`] delete nothing); each
//!   with the resourceVersion it was listed with (so not one rewritten since the list: a deletion abandoned in
//!   flight that lands after the next publish's read fails that publish's write of the same name with a conflict,
//!   which re-reads). The replaced revision stays whole for proxies mid-read. What is left: a second writer that
//!   read our index and wrote a shard of its next revision *before* our list may lose that shard; its index then
//!   names a missing shard, proxies keep their table, and the deletion event makes that writer find the damage and
//!   rewrite every shard (see *Drift*). With leader election a second writer is a deposed leader, fenced by its
//!   Lease as below.
//! - **Shards are fenced too.** [`Writer::read`] lists the shards' resourceVersions before it reads the index; each
//!   shard is replaced with the resourceVersion listed, or created if it was absent. A writer that read before
//!   another published fails on the first shard the other wrote, before its own index write. What is left: a
//!   writer that read *between* another's shard writes and that other's index write may overwrite those shards;
//!   then that index's digests do not match, proxies keep their table (they verify every shard against the index)
//!   and the shard events make the writer of the index republish. With leader election this takes a deposed leader
//!   that read after the new one started publishing, which the Lease check before every write rules out except for
//!   a process paused between that check and the write.
//! - **Drift.** A live index whose revision is the desired one is checked against the cached shards' content
//!   hashes; a missing or edited shard (confirmed with a GET) makes a fresh revision with every shard rewritten.

use super::caches::CACHED_DATA_SHA256;
use super::echoes::Echoes;
use super::leader::LeaderLease;
use super::{Ctx, Error, FIELD_MANAGER, MANAGED_BY};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, PostParams, Preconditions};
use kube::runtime::reflector::{ObjectRef, Store};
use portcullis_table::Table;
use portcullis_table::naming::{INDEX_DATA_KEY, LABEL_ROLE, LABEL_SERVICE, SHARD_DATA_KEY, index_name};
use portcullis_table::sequence::{PreviousIndex, next_sequence};
use portcullis_table::shard::{IndexDoc, Previous, Rendered, render};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

/// Shard writes of one revision in flight at once.
const SHARD_WRITES_IN_FLIGHT: usize = 4;

/// Budget of the index's data string: the same as a shard's (a ConfigMap holds at most 1 MiB in total).
pub const MAX_INDEX_BYTES: usize = portcullis_table::shard::MAX_SHARD_BYTES;

/// The live index of a Service, as read at the start of a reconcile, and the resourceVersion of each of its shard
/// ConfigMaps (listed just before the index: see [`Writer::read`]).
pub struct Live {
    pub cm: Option<ConfigMap>,
    pub doc: Option<IndexDoc>,
    pub shards: BTreeMap<String, Option<String>>,
}

impl Live {
    pub fn owners(&self) -> Vec<String> {
        let mut v: Vec<String> =
            self.cm.iter().flat_map(|cm| cm.owner_references().iter().map(|o| o.uid.clone())).collect();
        v.sort();
        v
    }
}

/// The deletions a publish leaves to do: the Service's shard ConfigMaps that neither the index it wrote nor the one
/// that index replaced names, while that index is still the live one ([`Writer::prune`]).
#[derive(Debug, Clone)]
pub struct Prune {
    /// Shard names the written and the replaced index name.
    keep: BTreeSet<String>,
    /// The index as written (uid, resourceVersion).
    index: (Option<String>, Option<String>),
}

/// Who may write: the Lease this replica must hold at every write (`None`: no leader election, one writer).
#[derive(Clone, Copy)]
pub struct Fence<'a> {
    pub lease: Option<&'a LeaderLease>,
    pub lease_name: &'a str,
}

impl Fence<'_> {
    /// `Err(LostLease)` unless this replica may write now (it leads, judged on its own clock).
    pub fn check(&self) -> Result<(), Error> {
        match self.lease {
            Some(l) if !l.is_leader() => Err(Error::LostLease(self.lease_name.to_string())),
            _ => Ok(()),
        }
    }
}

/// Writes the tables of one Service.
pub struct Writer<'a> {
    pub cms: Api<ConfigMap>,
    pub service: &'a str,
    pub index: String,
    fence: Fence<'a>,
    /// The controller's ConfigMap cache, consulted before a GET when checking shards (`None`: always GET).
    cache: Option<&'a Store<ConfigMap>>,
    /// Where this writer's own writes and deletions are recorded, so that their watch events trigger nothing.
    echoes: Option<&'a Echoes>,
}

impl<'a> Writer<'a> {
    /// The controller's writer: fenced by its Lease, shard checks served from its cache first.
    pub fn new(ctx: &'a Ctx, namespace: &str, service: &'a str) -> Self {
        let mut w = Self::unfenced(ctx.client.clone(), namespace, service);
        w.fence = ctx.fence();
        w.cache = Some(&ctx.caches.configmaps);
        w.echoes = Some(&ctx.echoes);
        w
    }

    /// A writer that holds no Lease (a single writer, or a test playing a second one). The index's resourceVersion
    /// precondition still applies: it never overwrites an index it has not read.
    pub fn unfenced(client: kube::Client, namespace: &str, service: &'a str) -> Self {
        Self {
            cms: Api::namespaced(client, namespace),
            service,
            index: index_name(service),
            fence: Fence { lease: None, lease_name: "" },
            cache: None,
            echoes: None,
        }
    }

    /// Reads what a publish is fenced against. The shards are listed *before* the index is read: a writer that
    /// publishes in between has either not written its index yet (its shard writes changed resourceVersions we
    /// hold, so ours fail) or has (we read its index and write the other slot, which it did not touch).
    pub async fn read(&self) -> Result<Live, Error> {
        let lp = ListParams::default().labels(&format!("{LABEL_SERVICE}={},{LABEL_ROLE}=shard", self.service));
        let shards = self
            .cms
            .list_metadata(&lp)
            .await?
            .into_iter()
            .map(|m| (m.name_any(), m.metadata.resource_version))
            .collect();
        let cm = self.cms.get_opt(&self.index).await?;
        let doc = cm
            .as_ref()
            .and_then(|cm| cm.data.as_ref()?.get(INDEX_DATA_KEY).cloned())
            .and_then(|json| IndexDoc::parse(&json, &self.index).ok());
        Ok(Live { cm, doc, shards })
    }

    /// Publishes `table` as a new revision replacing `live`: only the shards whose content changed are written
    /// (`previous`: the table `live`'s index was rendered from, if this replica remembers it, and the ids of the
    /// clients in which `table` differs from it if known — shortcuts, see [`Previous`]), or every shard if
    /// `rewrite_all` (some are missing or edited) or the owners change. Returns what was rendered (`shards`: the
    /// shards written) and the shards left to delete ([`Writer::prune`]).
    pub async fn publish(
        &self,
        live: &Live,
        table: &Table,
        previous: Option<(&Table, Option<&[String]>)>,
        rewrite_all: bool,
        owners: &[OwnerReference],
        max_shard_bytes: usize,
    ) -> Result<(Rendered, Prune), Error> {
        let previous_index = match (&live.cm, &live.doc) {
            (None, _) => PreviousIndex::Absent,
            (Some(_), Some(doc)) => PreviousIndex::Readable(doc),
            (Some(_), None) => PreviousIndex::Unreadable,
        };
        let sequence = next_sequence(previous_index, jiff::Timestamp::now());
        // Shards are reused only while the owners stay: a new owner set is written everywhere (garbage collection
        // follows the owners of each ConfigMap).
        let mut want: Vec<&str> = owners.iter().map(|o| o.uid.as_str()).collect();
        want.sort();
        let rewrite_all = rewrite_all || live.owners() != want;
        let previous = Previous {
            rewrite_all,
            changed: previous.and_then(|p| p.1),
            ..Previous::of(live.doc.as_ref(), previous.map(|p| p.0))
        };
        let rendered = render(table, &self.index, previous, sequence, max_shard_bytes)
            .map_err(|source| Error::Table { service: table.service.clone(), source })?;
        if rendered.index_json.len() > MAX_INDEX_BYTES {
            return Err(Error::IndexTooLarge {
                service: table.service.clone(),
                bytes: rendered.index_json.len(),
                max: MAX_INDEX_BYTES,
            });
        }
        let pp = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
        // Several shard writes in flight: at 100 000 clients (≈ 20 shards of ≈ 1 MiB) one after another they took
        // most of a change's propagation time. The index is written only once all of them succeeded.
        let writes: Vec<_> =
            rendered.shards.iter().map(|(name, json)| self.write_new_shard(live, name, json, owners, &pp)).collect();
        futures::stream::iter(writes).buffer_unordered(SHARD_WRITES_IN_FLIGHT).try_collect::<()>().await?;
        let mut cm = table_configmap(
            &self.index,
            self.service,
            "index",
            INDEX_DATA_KEY,
            &rendered.index_json,
            owners,
            Some(&table.revision),
        );
        self.fence.check()?;
        let mark = self.writing(&cm);
        let written = match &live.cm {
            None => self.cms.create(&pp, &cm).await,
            Some(current) => {
                cm.metadata.resource_version = current.metadata.resource_version.clone();
                self.cms.replace(&self.index, &pp, &cm).await
            }
        };
        let written = written.map_err(|e| {
            self.failed(&mark);
            self.conflict(e)
        })?;
        let keep = rendered
            .index
            .shards
            .iter()
            .chain(live.doc.iter().flat_map(|d| d.shards.iter()))
            .map(|r| r.name.clone())
            .collect();
        let prune = Prune { keep, index: (written.metadata.uid, written.metadata.resource_version) };
        Ok((rendered, prune))
    }

    async fn write_new_shard(
        &self,
        live: &Live,
        name: &str,
        json: &str,
        owners: &[OwnerReference],
        pp: &PostParams,
    ) -> Result<(), Error> {
        self.fence.check()?;
        let cm = table_configmap(name, self.service, "shard", SHARD_DATA_KEY, json, owners, None);
        self.write_shard(live, cm, pp).await
    }

    /// Writes one shard, fenced like the index: replaced only if unchanged since [`Writer::read`] listed it, created
    /// only if it did not exist then. A ConfigMap of that name that is not ours (no `managed-by` label) is taken
    /// over (it is no writer's table); any other change since the read is another writer's: [`Error::Conflict`].
    async fn write_shard(&self, live: &Live, mut cm: ConfigMap, pp: &PostParams) -> Result<(), Error> {
        let name = cm.name_any();
        let mark = self.writing(&cm);
        let written = match live.shards.get(&name) {
            Some(rv) => {
                cm.metadata.resource_version = rv.clone();
                self.cms.replace(&name, pp, &cm).await
            }
            None => match self.cms.create(pp, &cm).await {
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    let existing = self.cms.get_opt(&name).await?;
                    let foreign = existing.as_ref().is_some_and(|e| {
                        e.labels().get("app.kubernetes.io/managed-by").map(String::as_str) != Some(MANAGED_BY)
                    });
                    if !foreign {
                        return Err(Error::Conflict(name));
                    }
                    tracing::warn!(configmap = %name, "taking over a ConfigMap at a table name that is not ours");
                    cm.metadata.resource_version = existing.and_then(|e| e.metadata.resource_version);
                    self.cms.replace(&name, pp, &cm).await
                }
                other => other,
            },
        };
        if written.is_err() {
            self.failed(&mark);
        }
        written.map(|_| ()).map_err(|e| match e {
            kube::Error::Api(s) if s.code == 409 || s.code == 404 => Error::Conflict(name),
            e => e.into(),
        })
    }

    /// Whether a shard the live index names is missing or differs from the digest in the index (cache first, then
    /// a GET to confirm: the cache may lag behind our own writes).
    pub async fn damaged(&self, doc: &IndexDoc) -> Result<Vec<String>, Error> {
        let ns = self.cms_namespace();
        let mut out = Vec::new();
        for s in &doc.shards {
            let cached = self.cache.and_then(|c| c.get(&ObjectRef::new(&s.name).within(&ns)));
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
            self.fence.check()?;
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    resource_version: cm.metadata.resource_version.clone(),
                    uid: cm.metadata.uid.clone(),
                }),
                ..Default::default()
            };
            let mark = self.deleting(&self.index, cm.metadata.uid.as_deref());
            match self.cms.delete(&self.index, &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => self.failed(&mark),
                Err(e) => {
                    self.failed(&mark);
                    return Err(self.conflict(e));
                }
            }
        }
        let lp = ListParams::default()
            .labels(&format!("{LABEL_SERVICE}={},app.kubernetes.io/managed-by={MANAGED_BY}", self.service));
        for cm in self.cms.list_metadata(&lp).await? {
            self.delete_listed(&cm.name_any(), &cm.metadata).await?;
        }
        Ok(())
    }

    /// Deletes the shards `prune` leaves to delete (left from older revisions, or beyond a smaller shard count),
    /// unless the index has changed since the publish that made it (then they may be another writer's, or a later
    /// publish of ours made its own [`Prune`]). Deletions are fenced like writes. Safe to abandon at any await (see
    /// *Shard deletion* above) and to run again.
    pub async fn prune(&self, prune: &Prune) -> Result<(), Error> {
        let lp = ListParams::default().labels(&format!("{LABEL_SERVICE}={},{LABEL_ROLE}=shard", self.service));
        let listed = self.cms.list_metadata(&lp).await?;
        let still_ours = self
            .cms
            .get_opt(&self.index)
            .await?
            .is_some_and(|cm| (cm.metadata.uid, cm.metadata.resource_version) == prune.index);
        if !still_ours {
            return Ok(());
        }
        // Several deletions in flight: 32 leftover shards deleted one after another took 3 s in the 100 000-client
        // bench.
        let stale: Vec<_> = listed
            .iter()
            .filter(|cm| {
                !prune.keep.contains(cm.name_any().as_str())
                    && cm.labels().get("app.kubernetes.io/managed-by").map(String::as_str) == Some(MANAGED_BY)
            })
            .map(|cm| async move {
                self.fence.check()?;
                self.delete_listed(&cm.name_any(), &cm.metadata).await
            })
            .collect();
        futures::stream::iter(stale).buffer_unordered(SHARD_WRITES_IN_FLIGHT).try_collect::<()>().await
    }

    /// Deletes `name` as listed (`listed`: its metadata then): not if it was rewritten since.
    async fn delete_listed(&self, name: &str, listed: &ObjectMeta) -> Result<(), Error> {
        let resource_version = listed.resource_version.clone();
        let dp =
            DeleteParams { preconditions: Some(Preconditions { resource_version, uid: None }), ..Default::default() };
        let mark = self.deleting(name, listed.uid.as_deref());
        match self.cms.delete(name, &dp).await {
            Ok(_) => tracing::debug!(configmap = %name, "deleted stale table ConfigMap"),
            // Gone already, or rewritten since we listed it (then it is not stale): leave it.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => self.failed(&mark),
            Err(e) => {
                self.failed(&mark);
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Marks `cm` as our write before it is sent ([`Echoes`]).
    fn writing(&self, cm: &ConfigMap) -> Option<(String, String)> {
        self.echoes.map(|e| e.writing(&self.cms_namespace(), cm))
    }

    /// Marks ConfigMap `name` (uid `uid`) as our deletion before it is sent ([`Echoes`]).
    fn deleting(&self, name: &str, uid: Option<&str>) -> Option<(String, String)> {
        self.echoes.map(|e| e.deleting(&self.cms_namespace(), name, uid))
    }

    /// The request marked by `mark` failed.
    fn failed(&self, mark: &Option<(String, String)>) {
        if let (Some(e), Some(k)) = (self.echoes, mark) {
            e.failed(k);
        }
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
