//! `portcullis-demo` (run by `cargo xtask demo`, which builds the workspace's debug binaries first): the whole
//! product on one machine with no cluster. Starts the local control plane, installs the chart, runs the controller
//! and a proxy (as local processes: there is no kubelet), applies `examples/demo`, and shows real requests being
//! allowed and refused, then a change taking effect, with its measured delay. It runs the `portcullis-controller`
//! and `portcullis-proxy` binaries next to its own (`target/debug/`).
use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use portcullis_testkit::ControlPlane;
use portcullis_testkit::chart::{RELEASE_NS, controller_token, helm_install};
use portcullis_testkit::http::{Reply, get, start_echo};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const NS: &str = "demo";

struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    fn spawn(&mut self, name: &str, cmd: &mut Command, log: &Path) -> Result<()> {
        let f = std::fs::File::create(log)?;
        let child = cmd
            .stdout(f.try_clone()?)
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.0.push((name.to_string(), child));
        Ok(())
    }

    fn check(&mut self) -> Result<()> {
        for (name, c) in &mut self.0 {
            if let Some(s) = c.try_wait()? {
                bail!("{name} exited unexpectedly ({s})");
            }
        }
        Ok(())
    }
}

fn say(step: &str) {
    println!("\n==> {step}");
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn main() -> Result<()> {
    // `--up DIR` (run by `cargo xtask up`): set everything up, write DIR/playground.env, then keep it all running
    // until SIGTERM/SIGINT (`cargo xtask down`) instead of sending the demo requests.
    let args: Vec<String> = std::env::args().skip(1).collect();
    let up = match args.as_slice() {
        [] => None,
        [flag, dir] if flag == "--up" => Some(PathBuf::from(dir)),
        _ => bail!("usage: portcullis-demo [--up STATE_DIR]"),
    };
    let root = portcullis_testkit::bins::repo_root();
    let bins = portcullis_testkit::bins::bin_dir()?;
    let exe = std::env::current_exe().context("the demo's own path")?;
    let target = exe.parent().context("the directory of the demo binary")?.to_path_buf();
    for bin in ["portcullis-controller", "portcullis-proxy"] {
        if !target.join(bin).exists() {
            bail!(
                "{} is missing: run the demo with `cargo xtask demo` (it builds the binaries)",
                target.join(bin).display()
            );
        }
    }
    let (root, bins) = (root.as_path(), bins.as_path());
    say("starting the local control plane (etcd, kube-apiserver 1.37 with RBAC, kube-controller-manager)");
    let cp = {
        let t = Instant::now();
        let cp = ControlPlane::start_with_bins(bins, true)?;
        println!("    API server {} ready in {:.1}s", cp.server_url(), t.elapsed().as_secs_f64());
        cp
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = rt.block_on(demo(root, &target, &cp, up.as_deref()));
    drop(cp);
    println!("\n==> cleaned up: every process stopped, data removed");
    result
}

async fn demo(root: &Path, target: &Path, cp: &ControlPlane, up: Option<&Path>) -> Result<()> {
    let mut procs = Procs(Vec::new());
    let logs = cp.dir().to_path_buf();
    let admin = cp.admin_client().await;

    // The controller runs here as a local process, so the API server calls its webhook on loopback.
    let webhook_port = free_port()?;
    say(&format!(
        "helm install portcullis charts/portcullis -n {RELEASE_NS} --create-namespace \\\n      --set webhook.url=https://127.0.0.1:{webhook_port}/mutate"
    ));
    let out = helm_install(cp, root, webhook_port)?;
    println!("    {}", out.lines().take(6).collect::<Vec<_>>().join("\n    "));

    say("running the controller as the chart's ServiceAccount (least-privilege RBAC, not admin)");
    let (sa, token) = controller_token(cp, &admin).await?;
    let kubeconfig = cp.kubeconfig_for_token(&token);
    let metrics_port = free_port()?;
    procs.spawn(
        "portcullis-controller",
        Command::new(target.join("portcullis-controller"))
            .env("KUBECONFIG", &kubeconfig)
            .args(["--log-format", "pretty", "--lease-namespace", RELEASE_NS, "--webhook-namespace", RELEASE_NS])
            .arg(format!("--metrics-listen=127.0.0.1:{metrics_port}"))
            .arg(format!("--webhook-listen=127.0.0.1:{webhook_port}")),
        &logs.join("controller.log"),
    )?;
    println!("    ServiceAccount {RELEASE_NS}/{sa}; log: {}", logs.join("controller.log").display());

    say(&format!("kubectl apply -f examples/demo/ -n {NS}"));
    cp.apply_yaml(&format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}}}\n"), None).await?;
    let mut files: Vec<PathBuf> =
        std::fs::read_dir(root.join("examples/demo"))?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in &files {
        cp.apply_yaml_file(f, Some(NS)).await?;
        println!("    applied {}", f.strip_prefix(root).unwrap_or(f).display());
    }

    say("waiting for the ApiClients to be Ready (kubectl wait --for=condition=Ready apiclient/acme apiclient/globex)");
    let t = Instant::now();
    for name in ["acme", "globex"] {
        wait_ready(cp, name, Duration::from_secs(60), &mut procs).await?;
        println!("    apiclient/{name} Ready after {:.2}s", t.elapsed().as_secs_f64());
    }

    say(
        "creating a Pod labelled portcullis.dev/inject=true: the webhook injects the sidecar (no kubelet runs it here)",
    );
    let pod = inject_demo_pod(cp, &mut procs).await?;
    println!("    pod/echo-0 containers after admission: {pod}");

    say("starting the echo app and its sidecar proxy (reads only its own table ConfigMaps)");
    let echo = start_echo("x-api-key").await?;
    let sidecar_token = cp.service_account_token(NS, "echo").await;
    wait_sidecar_binding(cp, "echo", "echo", &mut procs).await?;
    println!("    the controller bound ServiceAccount {NS}/echo (pod/echo-0's) to Role portcullis-sidecar-echo");
    let proxy_port = free_port()?;
    let admin_port = free_port()?;
    procs.spawn(
        "portcullis-proxy",
        Command::new(target.join("portcullis-proxy"))
            .env("KUBECONFIG", cp.kubeconfig_for_token(&sidecar_token))
            .arg(format!("--listen=127.0.0.1:{proxy_port}"))
            .arg(format!("--admin-listen=127.0.0.1:{admin_port}"))
            .arg(format!("--upstream={echo}"))
            .arg(format!("--tables-from=configmap/{NS}/{}", portcullis_table::naming::index_name("echo")))
            .args(["--log-format", "pretty"]),
        &logs.join("proxy.log"),
    )?;
    let proxy = SocketAddr::from(([127, 0, 0, 1], proxy_port));
    wait_http_ok(&format!("127.0.0.1:{admin_port}"), "/readyz", Duration::from_secs(30), &mut procs).await?;
    println!("    proxy on {proxy} → app on {echo}; ready (first table loaded)");

    let acme_key = generated_key(cp, "acme-key-k1", Duration::from_secs(5), &mut procs).await?;
    let globex_key = "globex-demo-key-0123456789abcdef";
    if let Some(dir) = up {
        return playground(dir, cp, proxy, admin_port, &acme_key, globex_key, &mut procs).await;
    }
    let local: IpAddr = Ipv4Addr::new(127, 0, 0, 1).into();
    let other: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();

    say("requests");
    let mut failures = 0;
    let mut check = |what: &str, r: &Reply, want: u16| {
        let ok = r.status == want;
        failures += usize::from(!ok);
        println!("    {} {what}: {} {}", if ok { "✔" } else { "✘" }, r.status, r.body.trim());
    };
    check("acme, its key, from 127.0.0.1 (allowed)", &get(local, proxy, "/v1/orders", Some(&acme_key)).await?, 200);
    check(
        "acme's key from 127.0.0.2 (not in sourceRanges)",
        &get(other, proxy, "/v1/orders", Some(&acme_key)).await?,
        403,
    );
    check("no key", &get(local, proxy, "/v1/orders", None).await?, 401);
    check("unknown key", &get(local, proxy, "/v1/orders", Some("pcl_not_a_real_key")).await?, 401);
    check("acme on a route its plan does not grant", &get(local, proxy, "/admin", Some(&acme_key)).await?, 403);
    check(
        "globex's key from 127.0.0.1 (globex is allowed from 127.0.0.3 only)",
        &get(local, proxy, "/v1/orders", Some(globex_key)).await?,
        403,
    );
    check("globex from 127.0.0.3", &get("127.0.0.3".parse()?, proxy, "/v1/orders", Some(globex_key)).await?, 200);
    let mut limited = None;
    for i in 0..20 {
        let r = get(local, proxy, "/v1/orders", Some(&acme_key)).await?;
        if r.status == 429 {
            limited = Some((i, r));
            break;
        }
    }
    match limited {
        Some((i, r)) => check(
            &format!("acme after {i} more quick requests (plan: 5/s, burst 5; Retry-After {:?})", r.retry_after),
            &r,
            429,
        ),
        None => {
            failures += 1;
            println!("    ✘ 20 quick requests were never rate limited");
        }
    }

    say("kubectl patch apiclient acme: also allow 127.0.0.2/32 — how long until the sidecar enforces it?");
    let api = apiclients(cp).await;
    let t = Instant::now();
    api.patch(
        "acme",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"sourceRanges": ["127.0.0.1/32", "127.0.0.2/32"]}})),
    )
    .await?;
    let deadline = t + Duration::from_secs(10);
    loop {
        let r = get(other, proxy, "/v1/orders", Some(&acme_key)).await?;
        if r.status == 200 {
            println!(
                "    ✔ acme from 127.0.0.2 allowed {:.0} ms after the API write",
                t.elapsed().as_secs_f64() * 1000.0
            );
            break;
        }
        if Instant::now() > deadline {
            failures += 1;
            println!("    ✘ change not enforced within 10 s (last answer {} {})", r.status, r.body.trim());
            break;
        }
        procs.check()?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    say("rotate acme's key (README): add {name: k2, generate: {}}, hand out acme-key-k2, remove the k1 entry");
    let add = serde_json::json!([{"op": "add", "path": "/spec/keys/-", "value": {"name": "k2", "generate": {}}}]);
    api.patch("acme", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(add)?)).await?;
    let new_key = generated_key(cp, "acme-key-k2", Duration::from_secs(10), &mut procs).await?;
    match until_answer(proxy, &new_key, 200, &mut procs).await? {
        Some(d) => {
            println!("    ✔ the new key (acme-key-k2) works {:.0} ms after it was handed out", d.as_secs_f64() * 1e3)
        }
        None => {
            failures += 1;
            println!("    ✘ the new key was not accepted within 10 s");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(local, proxy, "/v1/orders", Some(&acme_key)).await?;
    failures += usize::from(r.status != 200);
    println!(
        "    {} the old key during the overlap: {} {}",
        if r.status == 200 { "✔" } else { "✘" },
        r.status,
        r.body.trim()
    );
    let remove = serde_json::json!([{"op": "test", "path": "/spec/keys/0/name", "value": "k1"},
                                    {"op": "remove", "path": "/spec/keys/0"}]);
    api.patch("acme", &PatchParams::default(), &Patch::Json::<()>(serde_json::from_value(remove)?)).await?;
    match until_answer(proxy, &acme_key, 401, &mut procs).await? {
        Some(d) => println!("    ✔ the old key is refused {:.0} ms after its entry was removed", d.as_secs_f64() * 1e3),
        None => {
            failures += 1;
            println!("    ✘ the old key was still accepted 10 s after its entry was removed");
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = get(local, proxy, "/v1/orders", Some(&new_key)).await?;
    failures += usize::from(r.status != 200);
    println!(
        "    {} the new key after the rotation: {} {}",
        if r.status == 200 { "✔" } else { "✘" },
        r.status,
        r.body.trim()
    );

    say("bypass guard: kubectl patch service echo -p '{\"spec\":{\"type\":\"NodePort\"}}'");
    let (status, msg) = plan_condition(cp, "partners", "Protected").await?;
    println!("    before: usageplan/partners Protected={status}: {msg}");
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(cp.admin_client().await, NS);
    services
        .patch("echo", &PatchParams::default(), &Patch::Merge(serde_json::json!({"spec": {"type": "NodePort"}})))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, msg) = plan_condition(cp, "partners", "Protected").await?;
        if status == "False" {
            println!("    ✔ after:  usageplan/partners Protected=False: {msg}");
            break;
        }
        if Instant::now() > deadline {
            failures += 1;
            println!("    ✘ Protected did not turn False for a NodePort Service within 20 s");
            break;
        }
        procs.check()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    if failures > 0 {
        bail!("{failures} demo request(s) got an unexpected answer; logs: {}", logs.display());
    }
    println!("\nAll demo requests answered as expected.");
    Ok(())
}

/// `--up`: writes the playground's environment (`DIR/playground.env`: KUBECONFIG, the proxy, the demo keys), marks
/// it ready (`DIR/ready`) and keeps every process running until SIGTERM or SIGINT; then the caller's drops stop
/// them and remove the control plane's data.
async fn playground(
    dir: &Path,
    cp: &ControlPlane,
    proxy: SocketAddr,
    admin_port: u16,
    acme_key: &str,
    globex_key: &str,
    procs: &mut Procs,
) -> Result<()> {
    let env = format!(
        "# cargo xtask up: the playground (stop it with `cargo xtask down`)\n\
         export KUBECONFIG={kubeconfig}\n\
         export PORTCULLIS_PROXY=http://{proxy}\n\
         export PORTCULLIS_PROXY_ADMIN=http://127.0.0.1:{admin_port}\n\
         export ACME_KEY={acme_key}\n\
         export GLOBEX_KEY={globex_key}\n\
         # logs: {logs}\n",
        kubeconfig = cp.admin_kubeconfig().display(),
        logs = cp.dir().display(),
    );
    std::fs::write(dir.join("playground.env"), &env)?;
    std::fs::write(dir.join("ready"), b"")?;
    say("the playground is up (cargo xtask down stops it)");
    print!("{env}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_secs(2)) => procs.check()?,
        }
    }
    say("stopping the playground");
    Ok(())
}

/// Creates a Pod that opts in to injection and returns its container names as admitted. The webhook's certificate
/// is self-managed by the controller, which also writes the caBundle: retry until that has happened.
async fn inject_demo_pod(cp: &ControlPlane, procs: &mut Procs) -> Result<String> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(cp.admin_client().await, NS);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "echo-0", "labels": {"app": "echo", "portcullis.dev/inject": "true"},
                     "annotations": {"portcullis.dev/service": "echo", "portcullis.dev/upstream-port": "8080",
                                     // A per-workload sidecar setting: the webhook passes it on as `--workers=2`.
                                     "portcullis.dev/workers": "2"}},
        "spec": {"serviceAccountName": "echo", "containers": [{"name": "app", "image": "example.com/echo:1",
                 "ports": [{"containerPort": 8080}]}]}
    }))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        procs.check()?;
        match pods.create(&Default::default(), &pod).await {
            Ok(p) => {
                let containers = p.spec.map(|s| s.containers).unwrap_or_default();
                let names: Vec<&str> = containers.iter().map(|c| c.name.as_str()).collect();
                let Some(sidecar) = containers.iter().find(|c| c.name == "portcullis-proxy") else {
                    bail!("the webhook admitted pod/echo-0 without the sidecar: {names:?}");
                };
                let args = sidecar.args.clone().unwrap_or_default();
                if !args.iter().any(|a| a == "--workers=2") {
                    bail!("annotation portcullis.dev/workers: \"2\" did not reach the sidecar: {args:?}");
                }
                return Ok(format!(
                    "{} (annotation portcullis.dev/workers: \"2\" → sidecar arg --workers=2)",
                    names.join(", ")
                ));
            }
            // Until the controller has written the caBundle the API server cannot call the webhook.
            Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => bail!("creating pod/echo-0 through the webhook failed: {e}"),
        }
    }
}

async fn plan_condition(cp: &ControlPlane, plan: &str, kind: &str) -> Result<(String, String)> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("portcullis.dev", "v1alpha1", "UsagePlan"));
    let api: Api<DynamicObject> = Api::namespaced_with(cp.admin_client().await, NS, &ar);
    let obj = api.get(plan).await?;
    let conds = obj.data.pointer("/status/conditions").and_then(|c| c.as_array()).cloned().unwrap_or_default();
    Ok(conds
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| (c["status"].as_str().unwrap_or("").to_string(), c["message"].as_str().unwrap_or("").to_string()))
        .unwrap_or_else(|| ("Unknown".into(), "(not reported yet)".into())))
}

async fn apiclients(cp: &ControlPlane) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk("portcullis.dev", "v1alpha1", "ApiClient"));
    Api::namespaced_with(cp.admin_client().await, NS, &ar)
}

async fn wait_ready(cp: &ControlPlane, name: &str, timeout: Duration, procs: &mut Procs) -> Result<()> {
    let api = apiclients(cp).await;
    let deadline = Instant::now() + timeout;
    loop {
        procs.check()?;
        let obj = api.get(name).await?;
        let conds = obj.data.pointer("/status/conditions").and_then(|c| c.as_array()).cloned().unwrap_or_default();
        if conds.iter().any(|c| c["type"] == "Ready" && c["status"] == "True") {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("apiclient/{name} not Ready after {timeout:?}; conditions: {}", serde_json::Value::Array(conds));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The platform team hands the generated key to the partner: it is in the Secret the controller created,
/// `<client>-key-<key name>`.
async fn generated_key(cp: &ControlPlane, secret: &str, timeout: Duration, procs: &mut Procs) -> Result<String> {
    let secrets: Api<Secret> = Api::namespaced(cp.admin_client().await, NS);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = secrets.get_opt(secret).await?
            && let Some(v) = s.data.as_ref().and_then(|d| d.get("key"))
        {
            return Ok(String::from_utf8(v.0.clone())?);
        }
        if Instant::now() > deadline {
            bail!("no generated key Secret {secret} after {timeout:?}");
        }
        procs.check()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks with `key` every 300 ms (below the plan's 5/s) until the answer is `want`; the time it took.
async fn until_answer(proxy: SocketAddr, key: &str, want: u16, procs: &mut Procs) -> Result<Option<Duration>> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if get(Ipv4Addr::LOCALHOST.into(), proxy, "/v1/orders", Some(key)).await?.status == want {
            return Ok(Some(t.elapsed()));
        }
        procs.check()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(None)
}

/// The controller grants the ServiceAccount of the Service's opted-in pods read access to that Service's table
/// ConfigMaps only (Role with resourceNames + RoleBinding): wait until it has.
async fn wait_sidecar_binding(cp: &ControlPlane, service: &str, sa: &str, procs: &mut Procs) -> Result<()> {
    use k8s_openapi::api::rbac::v1::RoleBinding;
    let rbs: Api<RoleBinding> = Api::namespaced(cp.admin_client().await, NS);
    let name = format!("portcullis-sidecar-{service}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        procs.check()?;
        if let Some(rb) = rbs.get_opt(&name).await?
            && rb.subjects.iter().flatten().any(|s| s.kind == "ServiceAccount" && s.name == sa)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("rolebinding/{name} does not name ServiceAccount {sa} after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_http_ok(addr: &str, path: &str, timeout: Duration, procs: &mut Procs) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let to: SocketAddr = addr.parse()?;
    loop {
        procs.check()?;
        if let Ok(r) = get(Ipv4Addr::LOCALHOST.into(), to, path, None).await
            && r.status == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("http://{addr}{path} not 200 within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
