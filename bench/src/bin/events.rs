//! `bench-events N`: what one watch event and one ApiClient reconcile cost the controller among N ApiClients with a
//! generated key each (N generated key Secrets in one namespace): the Secret event's triggers and the reconcile's
//! orphan check, each as the controller does it (through the indexes of `runtime::index`) and as a walk over every
//! ApiClient / Secret (what it did before). Prints µs per event: `index_trigger walk_trigger index_orphan walk_orphan`
//! (median of 5 runs of 1 000 events each through the indexes, 20 each for the walks; events spread over the objects).

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, store::Writer};
use kube::runtime::watcher::Event;
use portcullis_controller::crd::{ApiClient, ApiClientSpec, GenerateSpec, KeySpec};
use portcullis_controller::keys::{self, LABEL_API_KEY, LABEL_KEY_NAME, OrphanCheck};
use portcullis_controller::runtime::index::Index;
use portcullis_controller::runtime::rendered::Rendered;
use portcullis_controller::runtime::triggers::{View, secret_changed};
use std::hint::black_box;
use std::time::Instant;

const NS: &str = "shop";
const EVENTS: usize = 1_000;
/// Events per run of a walk over every object (at 100 000 objects, one walk takes tens of milliseconds).
const WALKS: usize = 20;

fn client(i: usize) -> ApiClient {
    let mut c = ApiClient::new(
        &format!("client-{i:06}"),
        ApiClientSpec {
            usage_plans: vec!["gold".into()],
            source_ranges: vec!["10.0.0.0/8".into()],
            keys: vec![KeySpec { name: Some("main".into()), generate: Some(GenerateSpec {}), ..Default::default() }],
            disabled: None,
            certificates: vec![],
            require_certificate: None,
        },
    );
    c.metadata.namespace = Some(NS.into());
    c.metadata.uid = Some(format!("uid-{i}"));
    c
}

fn secret(c: &ApiClient) -> Secret {
    let mut s = Secret::default();
    s.metadata.namespace = Some(NS.into());
    s.metadata.name = Some(keys::generated_secret_name(&c.name_any(), "main"));
    s.metadata.labels = Some(
        [(LABEL_API_KEY.to_string(), "true".to_string()), (LABEL_KEY_NAME.to_string(), "main".to_string())].into(),
    );
    s.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "portcullis.dev/v1alpha1".into(),
        kind: "ApiClient".into(),
        name: c.name_any(),
        uid: c.uid().unwrap_or_default(),
        controller: Some(true),
        ..Default::default()
    }]);
    s
}

/// µs per event, median of 5 runs of `events` events.
fn per_event(events: usize, mut f: impl FnMut(usize) -> usize) -> f64 {
    let mut runs: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            let mut found = 0;
            for e in 0..events {
                found += black_box(f(e));
            }
            assert!(found > 0, "every event finds its object");
            t.elapsed().as_secs_f64() * 1e6 / events as f64
        })
        .collect();
    runs.sort_by(f64::total_cmp);
    runs[2]
}

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).unwrap_or_else(|| "100000".into()).parse()?;
    let clients: Vec<ApiClient> = (0..n).map(client).collect();
    let secrets: Vec<Secret> = clients.iter().map(secret).collect();
    let readers = Index::new(keys::secret_names);
    let owners = Index::new(keys::generated_secret_owners);
    let mut cw: Writer<ApiClient> = Writer::default();
    let mut sw: Writer<Secret> = Writer::default();
    for c in &clients {
        let ev = Event::Apply(c.clone());
        readers.observe(&ev);
        cw.apply_watcher_event(&ev);
    }
    for s in &secrets {
        let ev = Event::Apply(s.clone());
        owners.observe(&ev);
        sw.apply_watcher_event(&ev);
    }
    let (client_store, secret_store) = (cw.as_reader(), sw.as_reader());
    let (plans, rendered) = (Writer::default().as_reader(), Rendered::new());
    let view = View { plans: &plans, clients: &client_store, secret_readers: &readers, rendered: &rendered };
    let pick = |e: usize| e * (n / EVENTS).max(1) % n;

    let index_trigger = per_event(EVENTS, |e| secret_changed(&view, &secrets[pick(e)]).clients.len());
    let walk_trigger = per_event(WALKS, |e| {
        let name = secrets[pick(e)].name_any();
        client_store
            .state()
            .iter()
            .filter(|c| c.namespace().as_deref() == Some(NS) && keys::uses_secret(c, &name))
            .count()
    });
    // The common case: the client's one generated Secret is named, so no orphan; `found` counts candidates looked at.
    let index_orphan = per_event(EVENTS, |e| {
        let c = &clients[pick(e)];
        let check = OrphanCheck::new(c);
        let candidates = owners.lookup(NS, &c.uid().unwrap_or_default());
        let stored = candidates.iter().filter_map(|name| secret_store.get(&ObjectRef::new(name).within(NS)));
        stored.filter(|s| check.is_orphan(s)).count() + candidates.len()
    });
    let walk_orphan = per_event(WALKS, |e| {
        let check = OrphanCheck::new(&clients[pick(e)]);
        secret_store.find(|s| check.is_orphan(s)).map_or(1, |_| 2)
    });
    println!("{index_trigger:.2} {walk_trigger:.2} {index_orphan:.2} {walk_orphan:.2}");
    Ok(())
}
