//! The objects the plugin reads and writes, through kube's client API (no kube-runtime, no controller types): the
//! CRDs as [`DynamicObject`]s, the table ConfigMaps, generated key Secrets. Every error names the object and what to
//! do about it.

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, ApiResource, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use portcullis_table::Table;
use portcullis_table::naming::{INDEX_DATA_KEY, LABEL_ROLE, SHARD_DATA_KEY, index_name};
use portcullis_table::shard::{IndexDoc, assemble};
use serde_json::Value;
use std::time::Duration;

pub const GROUP: &str = "portcullis.dev";
pub const VERSION: &str = "v1alpha1";
/// The annotation naming the protected Service on injected pods (the webhook's `ANNOTATION_SERVICE`).
pub const ANNOTATION_SERVICE: &str = "portcullis.dev/service";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural)
}

/// The namespace and client every command works with.
#[derive(Clone)]
pub struct Ctx {
    pub client: kube::Client,
    pub ns: String,
}

/// Is `e` the API server's 404?
pub fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// An object the plugin reads does not exist (any more): the API server's 404, said for a person.
#[derive(Debug)]
pub struct NotFound(pub String);

impl std::fmt::Display for NotFound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotFound {}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Ctx {
    pub fn api_clients(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &resource("ApiClient", "apiclients"))
    }

    pub fn usage_plans(&self) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, &resource("UsagePlan", "usageplans"))
    }

    fn missing(&self, e: kube::Error, kind: &str, name: &str) -> anyhow::Error {
        let list = format!("{}s", kind.to_ascii_lowercase());
        if not_found(&e) {
            let msg = format!("{kind} {}/{name} not found: `kubectl get {list} -n {}` lists them", self.ns, self.ns);
            return anyhow::Error::new(NotFound(msg));
        }
        if let kube::Error::Api(s) = &e
            && s.code == 403
        {
            return anyhow!("reading {kind} {}/{name} is forbidden for you: {}", self.ns, s.message);
        }
        anyhow::Error::new(e).context(format!("reading {kind} {}/{name}", self.ns))
    }

    pub async fn api_client(&self, name: &str) -> Result<DynamicObject> {
        self.api_clients().get(name).await.map_err(|e| self.missing(e, "ApiClient", name))
    }

    pub async fn usage_plan(&self, name: &str) -> Result<DynamicObject> {
        self.usage_plans().get(name).await.map_err(|e| self.missing(e, "UsagePlan", name))
    }

    /// Reads ApiClient `name`, lets `edit` change its `spec`, and writes it back with its resourceVersion (a
    /// concurrent writer makes the API server answer 409; then it is read and edited again). Returns the new
    /// generation.
    pub async fn edit_api_client(&self, name: &str, mut edit: impl FnMut(&mut Value) -> Result<()>) -> Result<i64> {
        for _ in 0..5 {
            let mut obj = self.api_client(name).await?;
            let spec = obj.data.get_mut("spec").ok_or_else(|| anyhow!("ApiClient {}/{name} has no spec", self.ns))?;
            edit(spec)?;
            match self.api_clients().replace(name, &PostParams::default(), &obj).await {
                Ok(o) => return o.metadata.generation.context("the API server returned no generation"),
                Err(e) if is_conflict(&e) => continue,
                Err(kube::Error::Api(s)) if s.code == 422 => {
                    bail!("the API server refused the change to ApiClient {}/{name}: {}", self.ns, s.message)
                }
                Err(e) => return Err(anyhow::Error::new(e).context(format!("writing ApiClient {}/{name}", self.ns))),
            }
        }
        bail!("ApiClient {}/{name} kept changing under us (5 conflicts in a row); try again", self.ns)
    }

    /// The Services ApiClient `obj` is granted, through its plans (in order, without repeats). Plans that do not
    /// exist are skipped (the client's `PlanResolved` condition names them).
    pub async fn services_of(&self, obj: &DynamicObject) -> Result<Vec<String>> {
        let mut services = Vec::new();
        for plan in str_list(&obj.data, "/spec/usagePlans") {
            let Ok(p) = self.usage_plans().get(&plan).await else { continue };
            for s in p.data.pointer("/spec/services").and_then(Value::as_array).into_iter().flatten() {
                if let Some(n) = s.get("name").and_then(Value::as_str)
                    && !services.iter().any(|x| x == n)
                {
                    services.push(n.to_string());
                }
            }
        }
        Ok(services)
    }

    /// The table the controller wrote for `service`: its index and the assembled, validated table.
    pub async fn table(&self, service: &str) -> Result<(IndexDoc, Table)> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let index = index_name(service);
        let cm = cms.get(&index).await.map_err(|e| {
            if not_found(&e) {
                anyhow!(
                    "ConfigMap {}/{index} (the table of Service {service}) not found: no UsagePlan in {} grants \
                     Service {service}, or the controller is not running (`kubectl get usageplans -n {}`)",
                    self.ns,
                    self.ns,
                    self.ns
                )
            } else {
                anyhow::Error::new(e).context(format!("reading ConfigMap {}/{index}", self.ns))
            }
        })?;
        let json =
            cm.data.as_ref().and_then(|d| d.get(INDEX_DATA_KEY)).ok_or_else(|| {
                anyhow!("ConfigMap {}/{index} has no {INDEX_DATA_KEY} (not a Portcullis index)", self.ns)
            })?;
        let doc = IndexDoc::parse(json, &index).map_err(|e| anyhow!("ConfigMap {}/{index}: {e}", self.ns))?;
        let mut datas = Vec::with_capacity(doc.shards.len());
        for s in &doc.shards {
            let data = match cms.get_opt(&s.name).await.with_context(|| format!("reading ConfigMap {}", s.name))? {
                Some(cm) => cm.data.and_then(|mut d| d.remove(SHARD_DATA_KEY)),
                None => None,
            };
            datas.push(data);
        }
        let refs: Vec<Option<&str>> = datas.iter().map(Option::as_deref).collect();
        let table = assemble(&doc, &refs).map_err(|e| {
            anyhow!(
                "the table of Service {}/{service} cannot be assembled (a write in progress? try again): {e}",
                self.ns
            )
        })?;
        Ok((doc, table))
    }

    /// The index ConfigMaps in the namespace: one per protected Service.
    pub async fn indexes(&self) -> Result<Vec<(String, IndexDoc)>> {
        let cms: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let list = cms
            .list(&ListParams::default().labels(&format!("{LABEL_ROLE}=index")))
            .await
            .with_context(|| format!("listing the table ConfigMaps in {}", self.ns))?;
        let mut out = Vec::new();
        for cm in list {
            let name = cm.metadata.name.clone().unwrap_or_default();
            if let Some(json) = cm.data.as_ref().and_then(|d| d.get(INDEX_DATA_KEY))
                && let Ok(doc) = IndexDoc::parse(json, &name)
            {
                let service = doc.service.split_once('/').map_or(doc.service.clone(), |(_, s)| s.to_string());
                out.push((service, doc));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Pods of the namespace injected for `service` (by the webhook's annotation).
    pub async fn sidecar_pods(&self, service: &str) -> Result<Vec<Pod>> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let list = pods.list(&ListParams::default()).await.with_context(|| format!("listing pods in {}", self.ns))?;
        Ok(list
            .into_iter()
            .filter(|p| {
                p.metadata.annotations.as_ref().and_then(|a| a.get(ANNOTATION_SERVICE)).is_some_and(|s| s == service)
            })
            .collect())
    }

    /// The value of `data_key` in Secret `name`.
    pub async fn secret_value(&self, name: &str, data_key: &str) -> Result<Vec<u8>> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        let s = secrets.get(name).await.map_err(|e| self.missing(e, "Secret", name))?;
        let v = s
            .data
            .as_ref()
            .and_then(|d| d.get(data_key))
            .ok_or_else(|| anyhow!("Secret {}/{name} has no data key {data_key:?}", self.ns))?;
        Ok(v.0.clone())
    }

    /// Polls ApiClient `name` every 200 ms until `done` says it is done (`Ok(Some)`), fails (`Err`), or `timeout`.
    pub async fn wait_api_client<T>(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&DynamicObject) -> Result<Option<T>>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let obj = self.api_client(name).await?;
            if let Some(t) = done(&obj)? {
                return Ok(t);
            }
            if tokio::time::Instant::now() >= deadline {
                let conds = conditions_line(&obj.data);
                bail!(
                    "ApiClient {}/{name}: {what}: not within {} s. Its conditions: {conds}",
                    self.ns,
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// The strings of the list at `pointer`.
pub fn str_list(v: &Value, pointer: &str) -> Vec<String> {
    v.pointer(pointer)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
        .unwrap_or_default()
}

/// One status condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// The object's `status.conditions`.
pub fn conditions(v: &Value) -> Vec<Condition> {
    let s = |c: &Value, k: &str| c.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    v.pointer("/status/conditions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|c| Condition {
            type_: s(c, "type"),
            status: s(c, "status"),
            reason: s(c, "reason"),
            message: s(c, "message"),
        })
        .collect()
}

pub fn condition(v: &Value, type_: &str) -> Option<Condition> {
    conditions(v).into_iter().find(|c| c.type_ == type_)
}

/// `Type=Status (Reason): message` for every condition, `; `-separated.
pub fn conditions_line(v: &Value) -> String {
    let all: Vec<String> =
        conditions(v).iter().map(|c| format!("{}={} ({}): {}", c.type_, c.status, c.reason, c.message)).collect();
    if all.is_empty() { "none yet (is the controller running?)".into() } else { all.join("; ") }
}

/// `status.observedGeneration`, when the controller has written a status.
pub fn observed_generation(v: &Value) -> Option<i64> {
    v.pointer("/status/observedGeneration").and_then(Value::as_i64)
}
