//! API mode against the real local kube-apiserver (portcullis-testkit): a namespace, RBAC limited to the table's
//! ConfigMap names, the sidecar's own ServiceAccount token, and revisions published the way the controller does.

use super::*;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use portcullis_table::naming::{INDEX_DATA_KEY, SHARD_DATA_KEY, Slot, all_names, index_name};
use portcullis_table::shard::render;
use portcullis_testkit::ControlPlane;
pub use portcullis_testkit::relay::Relay;

pub const SERVICE: &str = "orders";
pub const SA: &str = "orders-sidecar";
const ROLE: &str = "orders-tables";

pub struct Cluster {
    pub ns: String,
    pub admin: kube::Client,
    pub cms: Api<ConfigMap>,
    /// Authenticates as the sidecar's ServiceAccount.
    pub sidecar: kube::Config,
}

impl Cluster {
    /// A fresh namespace with the sidecar's Role and RoleBinding (get/list/watch on exactly the table's names).
    pub async fn new(prefix: &str) -> Self {
        let cp = ControlPlane::shared();
        let admin = cp.admin_client().await;
        let ns = cp.namespace(prefix).await;
        let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &ns);
        let role = Role {
            metadata: ObjectMeta { name: Some(ROLE.into()), ..Default::default() },
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["configmaps".into()]),
                verbs: vec!["get".into(), "list".into(), "watch".into()],
                resource_names: Some(all_names(SERVICE)),
                ..Default::default()
            }]),
        };
        Api::<Role>::namespaced(admin.clone(), &ns).patch(ROLE, &apply(), &Patch::Apply(&role)).await.unwrap();
        let token = cp.service_account_token(&ns, SA).await;
        let kc = Kubeconfig::read_from(cp.kubeconfig_for_token(&token)).unwrap();
        let sidecar = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await.unwrap();
        let c = Self { ns, admin, cms, sidecar };
        c.grant().await;
        c
    }

    fn bindings(&self) -> Api<RoleBinding> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// Creates the RoleBinding and waits until the sidecar's token can read its index name.
    pub async fn grant(&self) {
        let binding = RoleBinding {
            metadata: ObjectMeta { name: Some(ROLE.into()), ..Default::default() },
            role_ref: RoleRef {
                api_group: Some("rbac.authorization.k8s.io".into()),
                kind: "Role".into(),
                name: ROLE.into(),
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: SA.into(),
                namespace: Some(self.ns.clone()),
                ..Default::default()
            }]),
        };
        self.bindings().patch(ROLE, &apply(), &Patch::Apply(&binding)).await.unwrap();
        let as_sidecar: Api<ConfigMap> =
            Api::namespaced(kube::Client::try_from(self.sidecar.clone()).unwrap(), &self.ns);
        let deadline = Instant::now() + WAIT;
        while let Err(e) = as_sidecar.get_opt(&index_name(SERVICE)).await {
            assert!(Instant::now() < deadline, "the sidecar's read never became allowed: {e}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Deletes the RoleBinding (the sidecar may no longer read its table).
    pub async fn ungrant(&self) {
        self.bindings().delete(ROLE, &DeleteParams::default()).await.unwrap();
    }

    pub async fn put(&self, name: &str, key: &str, data: &str) {
        let cm = ConfigMap {
            metadata: ObjectMeta { name: Some(name.into()), ..Default::default() },
            data: Some(BTreeMap::from([(key.to_string(), data.to_string())])),
            ..Default::default()
        };
        within("apply ConfigMap", self.cms.patch(name, &apply(), &Patch::Apply(&cm)))
            .await
            .unwrap_or_else(|e| panic!("applying ConfigMap {name}: {e}"));
    }

    /// Writes a revision the way the controller does: shards first, then the index. `corrupt_shard` overwrites one
    /// shard with content that does not match the index digest.
    pub async fn publish(&self, table: &Table, slot: Slot, sequence: u64, corrupt_shard: Option<usize>) {
        let r = render_in(table, slot, sequence);
        for (i, (name, data)) in r.shards.iter().enumerate() {
            let data = if corrupt_shard == Some(i) { data.replacen("\"t/", "\"x/", 1) } else { data.clone() };
            self.put(name, SHARD_DATA_KEY, &data).await;
        }
        self.put(&index_name(SERVICE), INDEX_DATA_KEY, &r.index_json).await;
    }

    pub async fn delete_index(&self) {
        within("delete index", self.cms.delete(&index_name(SERVICE), &DeleteParams::default()))
            .await
            .expect("deleting the index");
    }

    /// A proxy configuration reading this namespace's table as the sidecar, through `kube` (the sidecar's
    /// config unless given), re-watching every second.
    pub fn proxy_config(&self, upstream: SocketAddr, kube: Option<kube::Config>) -> Config {
        let kube = kube.unwrap_or_else(|| self.sidecar.clone());
        let mut c = Config::new(
            "127.0.0.1:0".parse().unwrap(),
            upstream.to_string(),
            TableSource::ConfigMap {
                namespace: self.ns.clone(),
                name: index_name(SERVICE),
                kube: Some(Box::new(kube)),
            },
        );
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.table_rewatch = Duration::from_secs(1);
        c
    }
}

fn apply() -> PatchParams {
    PatchParams::apply("portcullis-test").force()
}

/// A table spanning several 4 KiB shards: the standard clients (minus `t/reader` if `without_reader`), padding,
/// and one client per `extra` key (`t/<key>`, from 127.0.0.1, plan `open`).
pub fn sharded_table(extra: &[&str], without_reader: bool) -> Table {
    let mut clients = standard_clients();
    if without_reader {
        clients.retain(|c| c.id != "t/reader");
    }
    for i in 0..40 {
        clients.push(client(&format!("t/pad-{i:03}"), &format!("k-pad-{i}"), &["10.0.0.0/8"], &["open"]));
    }
    for k in extra {
        clients.push(client(&format!("t/{k}"), k, &["127.0.0.1/32"], &["open"]));
    }
    Table::new(format!("shop/{SERVICE}"), plans(), clients)
}

/// `table` rendered whole (every shard written, as a first revision) with all its shards in `slot`, as the
/// controller would write them into that slot: the tests choose the slot, so a revision never overwrites the shards
/// of the one before it.
pub fn render_in(table: &Table, slot: Slot, sequence: u64) -> portcullis_table::shard::Rendered {
    let index = index_name(SERVICE);
    let mut r = render(table, &index, portcullis_table::shard::Previous::NONE, sequence, 4096).expect("render");
    for (i, (name, _)) in r.shards.iter_mut().enumerate() {
        *name = portcullis_table::naming::shard_name(&index, slot, i);
        r.index.shards[i].name = name.clone();
    }
    r.index.slot = slot;
    r.index_json = serde_json::to_string(&r.index).expect("serialisable");
    r
}
