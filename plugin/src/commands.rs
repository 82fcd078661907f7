//! Each command: read, decide or edit, wait until the sidecars enforce it, print. Progress goes to stderr; stdout
//! carries only what a script wants (a key, a verdict, a table).

use crate::check::{Request, Usage, check};
use crate::cli::{CheckArgs, Cli, Command, Keys, Wait};
use crate::objects::{Ctx, NotFound, condition, conditions_line, observed_generation};
use crate::report::{ServiceState, grants, render_status, render_usage, usage_rows};
use crate::{keys, objects};
use anyhow::{Context, Result, anyhow, bail};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DynamicObject, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::Value;
use std::time::Duration;

/// What the process should exit with.
pub enum Exit {
    Ok,
    /// `check`: the request would be refused.
    Refused,
}

pub async fn run(cli: Cli) -> Result<Exit> {
    let ctx = connect(&cli).await?;
    match cli.command {
        Command::Keys(k) => keys_command(&ctx, k).await.map(|()| Exit::Ok),
        Command::Check(a) => check_command(&ctx, a).await,
        Command::Status { service } => status_command(&ctx, service.as_deref()).await.map(|()| Exit::Ok),
        Command::Usage { client } => usage_command(&ctx, client.as_deref()).await.map(|()| Exit::Ok),
    }
}

async fn connect(cli: &Cli) -> Result<Ctx> {
    let options = KubeConfigOptions { context: cli.context.clone(), ..Default::default() };
    let config = match &cli.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &options).await.context("kubeconfig")?
        }
        None => {
            kube::Config::infer().await.context("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a cluster")?
        }
    };
    let ns = cli.namespace.clone().unwrap_or_else(|| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    Ok(Ctx { client, ns })
}

fn say(msg: impl AsRef<str>) {
    eprintln!("{}", msg.as_ref());
}

/// Waits until ApiClient `name` at generation `generation` or later is enforced by every sidecar of its Services
/// (`Enforced=True`); with no sidecar running, until its table is written (`Programmed=True`). `key` must be among
/// its generated keys by then. Returns the Enforced (or Programmed) message.
async fn wait_enforced(ctx: &Ctx, name: &str, generation: i64, key: Option<&str>, wait: &Wait) -> Result<String> {
    if wait.no_wait {
        return Ok("not waited for (--no-wait)".into());
    }
    ctx.wait_api_client(name, wait.timeout, "every sidecar enforcing the change", |obj| {
        let v = &obj.data;
        if observed_generation(v).is_none_or(|g| g < generation) {
            return Ok(None);
        }
        if let Some(k) = key {
            let generated =
                keys::views(v).into_iter().any(|kv| kv.name.as_deref() == Some(k) && kv.fingerprint.is_some());
            if !generated {
                if let Some(c) = condition(v, "KeysResolved").filter(|c| c.status == "False" && c.message.contains(k)) {
                    bail!(
                        "ApiClient {}/{name}: key {k} did not resolve: KeysResolved=False ({}): {}",
                        ctx.ns,
                        c.reason,
                        c.message
                    );
                }
                return Ok(None);
            }
        }
        let Some(enforced) = condition(v, "Enforced") else { return Ok(None) };
        if enforced.status == "True" {
            return Ok(Some(enforced.message));
        }
        if enforced.reason == "NoSidecars" || enforced.reason == "NoServices" {
            let programmed = condition(v, "Programmed");
            if let Some(p) = programmed.filter(|p| p.status == "True") {
                return Ok(Some(format!("{} (no sidecar runs yet: {})", p.message, enforced.message)));
            }
            if enforced.reason == "NoServices" {
                bail!("ApiClient {}/{name} reaches no Service: {} ({})", ctx.ns, enforced.message, conditions_line(v));
            }
        }
        Ok(None)
    })
    .await
}

async fn keys_command(ctx: &Ctx, cmd: Keys) -> Result<()> {
    match cmd {
        Keys::Create { client, name, expires_at, wait } => {
            let (_, key, msg) = add_key(ctx, &client, name, expires_at, &wait).await?;
            say(format!("enforced: {msg}"));
            println!("{key}");
        }
        Keys::Rotate { client, name, old, remove_old_after, remove_old, wait } => {
            let (chosen, key, msg) = add_key(ctx, &client, name, None, &wait).await?;
            say(format!("the new key {chosen} is enforced: {msg}"));
            // The new key goes out before anything is retired, so a caller who loses the rest still has it.
            println!("{key}");
            let obj = ctx.api_client(&client).await?;
            let nameless = obj.data.get("spec").map_or(0, keys::unnamed);
            if nameless > 0 && (remove_old || remove_old_after.is_some()) && old.is_empty() {
                say(format!(
                    "note: {nameless} entry(ies) of spec.keys have no name (a secretRef without `name`) and are left \
                     as they are: give them a name (kubectl edit apiclient {client}) to retire them here"
                ));
            }
            if remove_old {
                let mut removed = Vec::new();
                let generation = ctx
                    .edit_api_client(&client, |spec| {
                        removed = keys::remove(spec, &old, &chosen, false)?;
                        Ok(())
                    })
                    .await?;
                let msg = wait_enforced(ctx, &client, generation, None, &wait).await?;
                say(format!("removed {}: no sidecar accepts them any more: {msg}", list(&removed)));
            } else if let Some(after) = remove_old_after {
                let at = Timestamp::now() + jiff::SignedDuration::try_from(after)?;
                let mut expiring = Vec::new();
                ctx.edit_api_client(&client, |spec| {
                    expiring = keys::expire(spec, &old, &chosen, at)?;
                    Ok(())
                })
                .await?;
                say(format!(
                    "{} expire at {} (spec.keys[].expiresAt): refused from then on, then remove them with \
                     `kubectl portcullis keys revoke {client} {}`",
                    list(&expiring),
                    keys::rfc3339(at),
                    expiring.join(" ")
                ));
            } else {
                say(format!(
                    "the old keys still work: hand out the new one, then `kubectl portcullis keys revoke {client} NAME…` \
                     (or rotate with --remove-old / --remove-old-after 24h)"
                ));
            }
        }
        Keys::Show { client, reveal } => {
            let obj = ctx.api_client(&client).await?;
            let views = keys::views(&obj.data);
            if let Some(want) = reveal {
                let Some(v) = views.iter().find(|v| v.name.as_deref() == Some(want.as_str())) else {
                    let names: Vec<&str> = views.iter().filter_map(|v| v.name.as_deref()).collect();
                    bail!("ApiClient {}/{client} has no key named {want:?} (named keys: {})", ctx.ns, names.join(", "));
                };
                let Some((secret, data_key)) = &v.secret else {
                    bail!(
                        "key {want} of ApiClient {}/{client} has no Secret yet (the controller generates it; see its KeysResolved condition)",
                        ctx.ns
                    );
                };
                let raw = ctx.secret_value(secret, data_key).await?;
                println!("{}", String::from_utf8_lossy(&raw).trim_end());
                return Ok(());
            }
            println!("{:<16} {:<40} {:<22} EXPIRES", "NAME", "SOURCE", "FINGERPRINT");
            for v in &views {
                let secret = match (&v.secret, v.source.as_str()) {
                    (Some((s, _)), "generated") => format!("generated (secret {s})"),
                    _ => v.source.clone(),
                };
                println!(
                    "{:<16} {:<40} {:<22} {}",
                    v.name.as_deref().unwrap_or("-"),
                    secret,
                    v.fingerprint.as_deref().unwrap_or("-"),
                    v.expires_at.as_deref().unwrap_or("never")
                );
            }
            let fps = objects::str_list(&obj.data, "/status/keyFingerprints");
            say(format!(
                "resolved keys (status.keyFingerprints, in spec order): {}",
                if fps.is_empty() { "none".into() } else { fps.join(", ") }
            ));
        }
        Keys::Revoke { client, names, allow_no_keys, wait } => {
            let mut removed = Vec::new();
            let generation = ctx
                .edit_api_client(&client, |spec| {
                    removed = keys::remove(spec, &names, "", allow_no_keys)?;
                    Ok(())
                })
                .await?;
            say(format!("apiclient {}/{client}: removed {} (generation {generation})", ctx.ns, list(&removed)));
            let msg = wait_enforced(ctx, &client, generation, None, &wait).await?;
            say(format!("revoked: no sidecar accepts them any more: {msg}"));
        }
    }
    Ok(())
}

/// Adds a generated key (`name`, or the next `k<N>`) to `client`, waits for its Secret and for every sidecar to
/// enforce it; returns its name, the key and the Enforced message.
async fn add_key(
    ctx: &Ctx,
    client: &str,
    name: Option<String>,
    expires_at: Option<Timestamp>,
    wait: &Wait,
) -> Result<(String, String, String)> {
    let mut chosen = String::new();
    let generation = ctx
        .edit_api_client(client, |spec| {
            chosen = name.clone().unwrap_or_else(|| keys::next_name(spec));
            keys::add_generated(spec, &chosen, expires_at)
        })
        .await?;
    say(format!("apiclient {}/{client}: key {chosen} added (generation {generation})", ctx.ns));
    // From here on the key entry is written: a failure says so, and how to get the key or take it back, so that
    // running the command again does not add a second key.
    let written = |e: anyhow::Error| {
        if e.is::<NotFound>() {
            return e.context(format!(
                "ApiClient {}/{client} was deleted while waiting; key {chosen} went with it",
                ctx.ns
            ));
        }
        e.context(format!(
            "key {chosen} IS written to ApiClient {ns}/{client} (generation {generation}); once the controller has \
             generated and programmed it, `kubectl portcullis keys show {client} -n {ns} --reveal {chosen}` prints it, \
             and `kubectl portcullis keys revoke {client} {chosen} -n {ns}` removes it",
            ns = ctx.ns
        ))
    };
    let key = generated_key(ctx, client, &chosen, wait.timeout).await.map_err(written)?;
    let msg = wait_enforced(ctx, client, generation, Some(&chosen), wait).await.map_err(written)?;
    Ok((chosen, key, msg))
}

fn list(names: &[String]) -> String {
    if names.is_empty() { "no key".into() } else { format!("key(s) {}", names.join(", ")) }
}

/// Waits for the controller to generate key `key` of `client`, then reads it from its Secret.
async fn generated_key(ctx: &Ctx, client: &str, key: &str, timeout: Duration) -> Result<String> {
    let secret = ctx
        .wait_api_client(client, timeout, &format!("the controller generating key {key}"), |obj| {
            let view = keys::views(&obj.data).into_iter().find(|v| v.name.as_deref() == Some(key));
            if let Some(c) =
                condition(&obj.data, "KeysResolved").filter(|c| c.status == "False" && c.message.contains(key))
            {
                bail!("ApiClient {}/{client}: key {key}: KeysResolved=False ({}): {}", ctx.ns, c.reason, c.message);
            }
            Ok(view.filter(|v| v.fingerprint.is_some()).and_then(|v| v.secret))
        })
        .await?;
    let raw = ctx.secret_value(&secret.0, &secret.1).await?;
    String::from_utf8(raw).map_err(|_| anyhow!("Secret {}/{} does not hold text", ctx.ns, secret.0))
}

async fn check_command(ctx: &Ctx, a: CheckArgs) -> Result<Exit> {
    let obj = ctx.api_client(&a.client).await?;
    let services = ctx.services_of(&obj).await?;
    let service = match (&a.service, services.as_slice()) {
        (Some(s), _) => s.clone(),
        (None, [one]) => one.clone(),
        (None, []) => bail!(
            "ApiClient {}/{} reaches no Service: none of its UsagePlans ({}) exists or grants one",
            ctx.ns,
            a.client,
            objects::str_list(&obj.data, "/spec/usagePlans").join(", ")
        ),
        (None, many) => bail!(
            "ApiClient {}/{} reaches several Services ({}): name one with --service",
            ctx.ns,
            a.client,
            many.join(", ")
        ),
    };
    let (_, table) = ctx.table(&service).await?;
    let usage = usage_of(&obj);
    let req = Request { addr: a.from, method: a.method.clone(), path: a.path.clone(), now: Timestamp::now() };
    let id = format!("{}/{}", ctx.ns, a.client);
    let verdict = check(&table, &id, &req, &usage)?;
    print!("{}", verdict.render());
    Ok(if verdict.allowed() { Exit::Ok } else { Exit::Refused })
}

fn usage_of(obj: &DynamicObject) -> Vec<Usage> {
    let s = |u: &Value, k: &str| u.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    obj.data
        .pointer("/status/usage")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|u| Usage {
            plan: s(u, "plan"),
            used: u.get("used").and_then(Value::as_u64).unwrap_or(0),
            limit: u.get("limit").and_then(Value::as_u64).unwrap_or(u64::MAX),
            resets_at: s(u, "resetsAt"),
        })
        .collect()
}

async fn status_command(ctx: &Ctx, only: Option<&str>) -> Result<()> {
    let indexes = ctx.indexes().await?;
    let plans: Vec<Value> = ctx
        .usage_plans()
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing UsagePlans in {}", ctx.ns))?
        .into_iter()
        .map(|p| serde_json::to_value(p).unwrap_or_default())
        .collect();
    if let Some(s) = only
        && !indexes.iter().any(|(svc, _)| svc == s)
    {
        bail!(
            "Service {}/{s} has no table (ConfigMap portcullis-table-{s}): no UsagePlan in {} grants it, or the \
             controller is not running",
            ctx.ns,
            ctx.ns
        );
    }
    let mut states = Vec::new();
    for (service, index) in &indexes {
        if only.is_some_and(|s| s != service) {
            continue;
        }
        let pods = ctx.sidecar_pods(service).await?.iter().map(pod_line).collect();
        let granting = plans.iter().filter(|p| grants(p, service)).collect();
        states.push(ServiceState { service, index, pods, plans: granting });
    }
    print!("{}", render_status(&ctx.ns, &states));
    Ok(())
}

fn pod_line(p: &Pod) -> String {
    let st = p.status.as_ref();
    format!(
        "{} ({}, {})",
        p.metadata.name.as_deref().unwrap_or("?"),
        st.and_then(|s| s.phase.as_deref()).unwrap_or("Pending"),
        st.and_then(|s| s.pod_ip.as_deref()).unwrap_or("no IP")
    )
}

async fn usage_command(ctx: &Ctx, only: Option<&str>) -> Result<()> {
    let plans: Vec<Value> = ctx
        .usage_plans()
        .list(&ListParams::default())
        .await
        .with_context(|| format!("listing UsagePlans in {}", ctx.ns))?
        .into_iter()
        .map(|p| serde_json::to_value(p).unwrap_or_default())
        .collect();
    let clients: Vec<Value> = match only {
        Some(name) => vec![serde_json::to_value(ctx.api_client(name).await?)?],
        None => ctx
            .api_clients()
            .list(&ListParams::default())
            .await
            .with_context(|| format!("listing ApiClients in {}", ctx.ns))?
            .into_iter()
            .map(|c| serde_json::to_value(c).unwrap_or_default())
            .collect(),
    };
    let rows: Vec<_> = clients.iter().flat_map(|c| usage_rows(c, &plans)).collect();
    print!("{}", render_usage(&ctx.ns, &rows));
    Ok(())
}
