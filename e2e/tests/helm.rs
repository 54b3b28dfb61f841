//! The Helm chart (`helm/podmig`) with the real Helm 4: it lints, renders for default and
//! other values, every value the README names exists, and its RBAC is exactly enough —
//! the controller and the node daemons run with the chart's ServiceAccounts on the local
//! cluster (whose API server enforces RBAC) through a cross-node move and a `curl`
//! move, and not one request is denied.

use std::{path::PathBuf, process::Command, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use podmig_api::v1alpha1::MigrationPhase;
use podmig_e2e::{cluster::Cluster, testapp::get_count, wait::until};
use serde_json::Value;

fn chart() -> PathBuf {
    podmig_e2e::paths::repo_root().join("helm/podmig")
}

fn helm(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("helm").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The objects of a multi-document YAML stream.
fn objects(yaml: &str) -> anyhow::Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml)?;
    Ok(docs.into_iter().filter(|v| !v.is_null()).collect())
}

fn find<'a>(objs: &'a [Value], kind: &str, suffix: &str) -> Option<&'a Value> {
    objs.iter().find(|o| {
        o["kind"] == kind
            && o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with(suffix))
    })
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .and_then(|e| e.iter().find(|v| v["name"] == name))
        .unwrap_or(&Value::Null)
}

#[test]
fn chart_lints_and_renders_for_default_and_other_values() -> anyhow::Result<()> {
    let chart = chart();
    let chart = chart.to_str().expect("utf-8 path");
    helm(&["lint", "--strict", chart])?;

    let objs = objects(&helm(&[
        "template",
        "podmig",
        chart,
        "-n",
        "podmig-system",
    ])?)?;
    let deploy = find(&objs, "Deployment", "-controller").expect("controller Deployment");
    assert_eq!(deploy["spec"]["replicas"], 2);
    let ctl = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(env(ctl, "PODMIG_LEASE_NAMESPACE")["value"], "podmig-system");
    assert_eq!(ctl["livenessProbe"]["httpGet"]["path"], "/healthz");
    let ds = find(&objs, "DaemonSet", "-node").expect("node DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    let node = &pod["containers"][0];
    assert_eq!(node["securityContext"]["privileged"], true);
    assert_eq!(
        env(node, "PODMIG_NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(node["readinessProbe"]["httpGet"]["scheme"], "HTTPS");
    assert_eq!(node["ports"][0]["containerPort"], 10443);
    let prep = &pod["initContainers"][0];
    assert_eq!(prep["command"][1], "prepare-node");
    assert_eq!(env(prep, "PODMIG_RESTART_RUNTIME")["value"], "auto");
    assert_eq!(prep["volumeMounts"][0]["mountPath"], "/host");
    let host = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "host-root"))
        .expect("host root volume");
    assert_eq!(host["hostPath"]["path"], "/");
    assert!(find(&objs, "RuntimeClass", "podmig").is_some_and(|r| r["handler"] == "podmig"));
    // The uninstall hook: a cleanup DaemonSet and a Job waiting for it, before the release goes.
    let cleanup = find(&objs, "DaemonSet", "-node-cleanup").expect("cleanup DaemonSet");
    assert_eq!(
        cleanup["metadata"]["annotations"]["helm.sh/hook"],
        "pre-delete"
    );
    let unprep = &cleanup["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(unprep["command"][2], "--uninstall");
    let job = find(&objs, "Job", "-node-cleanup").expect("cleanup Job");
    assert_eq!(
        job["spec"]["template"]["spec"]["containers"][0]["command"][1],
        "await-daemonset"
    );
    let secret = find(&objs, "Secret", "-node-ca").expect("generated CA");
    assert!(secret["data"]["tls.key"].is_string());
    // The eviction webhook: registered by Service, its CA in the configuration, served by
    // the controller from the mounted serving certificate, limits passed on.
    let hook = find(&objs, "ValidatingWebhookConfiguration", "-eviction").expect("webhook");
    let w = &hook["webhooks"][0];
    assert_eq!(w["rules"][0]["resources"][0], "pods/eviction");
    assert_eq!(w["failurePolicy"], "Ignore");
    assert_eq!(w["clientConfig"]["service"]["name"], "podmig-webhook");
    assert_eq!(w["clientConfig"]["service"]["path"], "/evict");
    let ca = find(&objs, "Secret", "-webhook-ca").expect("webhook CA");
    assert_eq!(w["clientConfig"]["caBundle"], ca["data"]["tls.crt"]);
    assert!(find(&objs, "Secret", "-webhook-tls").is_some());
    assert!(find(&objs, "Service", "-webhook").is_some());
    assert_eq!(env(ctl, "PODMIG_WEBHOOK_ADDR")["value"], "0.0.0.0:8443");
    assert_eq!(env(ctl, "PODMIG_MAX_MOVES_PER_NODE")["value"], "2");
    assert!(
        find(&objs, "Deployment", "-extender").is_none(),
        "extender off by default"
    );
    for kind in [
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ServiceAccount",
    ] {
        assert!(objs.iter().any(|o| o["kind"] == kind), "no {kind}");
    }

    let objs = objects(&helm(&[
        "template",
        "podmig",
        chart,
        "-n",
        "ops",
        "--set",
        "controller.replicas=3",
        "--set",
        "tls.existingSecret=my-daemon-ca",
        "--set",
        "rbac.create=false",
        "--set",
        "node.apiPort=11443",
        "--set",
        "runtimeClass.create=false",
        "--set",
        "node.prepare.enabled=false",
        "--set",
        "webhook.enabled=false",
        "--set",
        "extender.enabled=true",
    ])?)?;
    // The scheduler extender: only the daemons' CA certificate, never its key.
    let ext = find(&objs, "Deployment", "-extender").expect("extender");
    let ext_pod = &ext["spec"]["template"]["spec"];
    assert_eq!(ext_pod["containers"][0]["command"][1], "extender");
    assert_eq!(
        ext_pod["volumes"][0]["secret"]["secretName"],
        "my-daemon-ca"
    );
    assert_eq!(
        ext_pod["volumes"][0]["secret"]["items"],
        serde_json::json!([{"key": "ca.crt", "path": "ca.crt"}])
    );
    let deploy = find(&objs, "Deployment", "-controller").expect("controller");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let ds = find(&objs, "DaemonSet", "-node").expect("daemonset");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["ports"][0]["containerPort"], 11443);
    let tls = pod["volumes"]
        .as_array()
        .and_then(|v| v.iter().find(|v| v["name"] == "tls"))
        .expect("tls volume");
    assert_eq!(tls["secret"]["secretName"], "my-daemon-ca");
    assert!(
        pod["initContainers"].is_null(),
        "node preparation left to the operator"
    );
    for kind in ["Secret", "RuntimeClass", "ValidatingWebhookConfiguration"] {
        assert!(!objs.iter().any(|o| o["kind"] == kind), "{kind} rendered");
    }
    assert!(
        env(
            &deploy["spec"]["template"]["spec"]["containers"][0],
            "PODMIG_WEBHOOK_ADDR"
        )
        .is_null()
    );
    // Without RBAC and node preparation only the post-delete hook's own role is rendered.
    let roles: Vec<&str> = objs
        .iter()
        .filter(|o| o["kind"] == "ClusterRole")
        .filter_map(|o| o["metadata"]["name"].as_str())
        .collect();
    assert_eq!(roles, ["podmig-release-finalizers"]);
    assert!(find(&objs, "Job", "-node-cleanup").is_none());
    Ok(())
}

#[test]
fn every_value_the_readme_names_exists() -> anyhow::Result<()> {
    let root = podmig_e2e::paths::repo_root();
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("values.yaml"))?)?;
    let readme = std::fs::read_to_string(root.join("README.md"))?;
    let tops: Vec<String> = values
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    let named: Vec<&str> = readme
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            s.contains('.')
                && !s.contains(' ')
                && tops.iter().any(|t| s.starts_with(&format!("{t}.")))
        })
        .collect();
    assert!(named.len() >= 5, "the README names chart values: {named:?}");
    for path in named {
        let found = path.split('.').try_fold(&values, |v, key| v.get(key));
        assert!(
            found.is_some(),
            "README names `{path}`, values.yaml has no such value"
        );
    }
    Ok(())
}

/// A Migration of Pod `pod` to another node is refused before anything freezes
/// (`NotMigratable`, its message naming each of `named`), and the Pod runs on.
async fn refused_and_runs(c: &Cluster, pod: &str, named: &[&str]) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let before = podmig_e2e::wait::ready_pod(&pods, pod, Duration::from_secs(60)).await?;
    let here = podmig_e2e::wait::node_of(&before);
    let other = c
        .nodes
        .iter()
        .find(|n| n.name != here)
        .map(|n| n.name.clone())
        .expect("other node");
    let st = c.migrate(&format!("move-{pod}"), pod, &other, 60).await?;
    assert_eq!(st.reason.as_deref(), Some("NotMigratable"), "{st:?}");
    // Refused before anything froze: no frozen time recorded, none at all or zero.
    let frozen = st.report.as_ref().map_or(0, |r| r.frozen_ms);
    assert_eq!(frozen, 0, "nothing froze before the refusal: {st:?}");
    let msg = st.message.unwrap_or_default();
    for n in named {
        assert!(msg.contains(n), "{n:?} not in {msg}");
    }
    let still = pods.get(pod).await?;
    assert!(
        still.metadata.uid == before.metadata.uid && podmig_e2e::wait::is_ready(&still),
        "{pod} keeps running"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charts_rbac_is_enough_for_cross_node_moves() -> anyhow::Result<()> {
    let mut c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    // The real `helm install --wait`: podmig's image on every node, a daemon Pod per node
    // (the node's paths through the chart's hostPath volumes) and the controller
    // Deployment's Pods, all with their projected service-account credentials.
    c.install_chart(&chart()).await?;
    let api = c.apiserver.as_ref().expect("api server");
    let ds = c.kubectl(&[
        "get",
        "ds",
        "podmig-node",
        "-n",
        "podmig-system",
        "-o",
        "jsonpath={.status.desiredNumberScheduled} {.status.numberReady}",
    ])?;
    assert_eq!(ds.trim(), "2 2", "a Ready daemon Pod per node: {ds}");
    let ready = c.kubectl(&[
        "get",
        "deploy",
        "podmig-controller",
        "-n",
        "podmig-system",
        "-o",
        "jsonpath={.status.readyReplicas}",
    ])?;
    assert_eq!(ready.trim(), "2", "both controller replicas Ready");
    let system_pods: Api<Pod> = Api::namespaced(c.client.clone(), "podmig-system");
    let controllers: Vec<String> = system_pods
        .list(&kube::api::ListParams::default().labels("app.kubernetes.io/component=controller"))
        .await?
        .items
        .iter()
        .filter(|p| podmig_e2e::wait::is_ready(p))
        .map(|p| p.metadata.name.clone().unwrap_or_default())
        .collect();
    assert_eq!(controllers.len(), 2, "{controllers:?}");
    // One of them leads, through the chart's Lease.
    let holder = until("a leader", Duration::from_secs(30), async || {
        let out = c
            .kubectl(&[
                "get",
                "lease",
                "podmig-controller",
                "-n",
                "podmig-system",
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ])
            .ok()?;
        let h = out.trim().to_owned();
        (!h.is_empty()).then_some(h)
    })
    .await?;
    assert!(
        controllers.contains(&holder),
        "{holder} not in {controllers:?}"
    );

    // A Migration across nodes.
    c.apply(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {name: rbac}\nspec:\n  migrationTimeoutSeconds: 60\n  template:\n    metadata: {labels: {app: rbac}}\n    spec:\n      containers:\n      - {name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '16']}\n",
    )?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let p0 = podmig_e2e::wait::ready_pod(&pods, "rbac-0", Duration::from_secs(60)).await?;
    let ip0 = p0
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    // Ready once the container runs (no readiness probe): wait for the app to listen.
    podmig_e2e::testapp::wait_count(&ip0, Duration::from_secs(30)).await?;
    for _ in 0..2 {
        get_count(&ip0).await?;
    }
    let from = p0
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let to = c
        .nodes
        .iter()
        .find(|n| n.name != from)
        .map(|n| n.name.clone())
        .expect("other node");
    let st = c.migrate("rbac", "rbac-0", &to, 60).await?;
    assert_eq!(
        st.phase,
        Some(MigrationPhase::Succeeded),
        "{st:?}\ndenied: {:?}",
        api.denials()
    );
    let p1 = podmig_e2e::wait::ready_pod(&pods, "rbac-1", Duration::from_secs(30)).await?;
    let ip1 = p1
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default();
    assert_eq!(get_count(&ip1).await?, 4, "the count went on");

    // A person bound to the chart's migrator role moves it back with curl.
    c.apply("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: bob-migrates}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: podmig-migrator}\nsubjects: [{kind: User, name: bob, apiGroup: rbac.authorization.k8s.io}]\n")?;
    let bob = c.token_for("bob", &["system:authenticated"])?;
    let uid = p1.metadata.uid.clone().unwrap_or_default();
    let node = c.nodes.iter().position(|n| n.name == to).expect("node");
    let out = Command::new("curl")
        .args([
            "--noproxy",
            "*",
            "-sS",
            "--max-time",
            "90",
            "-w",
            "\n%{http_code}",
        ])
        .arg("--cacert")
        .arg(c.daemon_ca())
        .arg("-H")
        .arg(format!("Authorization: Bearer {bob}"))
        .args(["-H", "Content-Type: application/json", "--data"])
        .arg(format!("{{\"targetNode\": \"{from}\"}}"))
        .arg(format!("{}/migrate/{uid}?wait=true", c.daemon_url(node)))
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.ends_with("\n200"),
        "{text}\ndenied: {:?}",
        api.denials()
    );
    // `?wait=true` answers 200 for a move that ended either way: the body says how.
    let body: serde_json::Value = serde_json::from_str(text.trim_end_matches("\n200").trim())
        .map_err(|e| anyhow::anyhow!("the answer is not JSON ({e}): {text}"))?;
    assert_eq!(
        body["phase"], "Succeeded",
        "the move back succeeded: {body}"
    );
    // The migrator may ask for moves, never act as a peer daemon: its hand-over and its
    // verdict are refused; only the node daemons' ServiceAccount holds nodes/handover.
    let source = podmig_e2e::daemon_api::curl(
        &c,
        node,
        "POST",
        &format!("/migrate/{uid}"),
        Some(&bob),
        Some(&format!(
            "{{\"handover\": {{\"migrationId\": \"x\", \"targetNamespace\": \"default\", \"targetPod\": \"rbac-1\", \"targetPodUid\": \"{uid}\", \"targetNode\": \"{from}\"}}}}"
        )),
    )?;
    assert_eq!(source.0, 403, "{source:?}");
    let verdict = podmig_e2e::daemon_api::curl(
        &c,
        node,
        "POST",
        "/migrations/x/complete",
        Some(&bob),
        Some("{\"ok\": true}"),
    )?;
    assert_eq!(verdict.0, 403, "{verdict:?}");
    // `kubectl auth can-i` answers on stdout (and exits 1 for "no").
    let can_i = |who: &str| -> anyhow::Result<String> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .args([
                "auth",
                "can-i",
                "create",
                "nodes",
                "--subresource",
                "handover",
            ])
            .args(["--as", who])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    assert_eq!(
        can_i("system:serviceaccount:podmig-system:podmig-node")?,
        "yes"
    );
    assert_eq!(can_i("bob")?, "no");

    // A Pod whose claim is bound to a local PersistentVolume is refused before anything
    // freezes, naming the claim and the volume, and keeps running.
    c.apply(&format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: pv-ssd}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  local: {{path: /mnt/ssd1}}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{{key: kubernetes.io/hostname, operator: In, values: [{from}]}}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: pgdata}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 1Gi}}}}
  volumeName: pv-ssd
---
apiVersion: podmig.dev/v1alpha1
kind: MigratingPod
metadata: {{name: tied}}
spec:
  template:
    metadata: {{labels: {{app: tied}}}}
    spec:
      nodeName: {from}
      volumes: [{{name: db, persistentVolumeClaim: {{claimName: pgdata}}}}]
      containers:
      - {{name: app, image: 'podmig.local/testapp:latest', volumeMounts: [{{name: db, mountPath: /db}}]}}
"#
    ))?;
    refused_and_runs(
        &c,
        "tied-0",
        &["\"db\" (claim pgdata: local PersistentVolume pv-ssd at /mnt/ssd1)"],
    )
    .await?;

    // A hostPath volume ties the Pod to its node too: refused, named, and it runs on.
    c.apply(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {name: host}\nspec:\n  template:\n    metadata: {labels: {app: host}}\n    spec:\n      volumes: [{name: logs, hostPath: {path: /var/log/app, type: DirectoryOrCreate}}]\n      containers:\n      - {name: app, image: 'podmig.local/testapp:latest', volumeMounts: [{name: logs, mountPath: /logs}]}\n",
    )?;
    refused_and_runs(&c, "host-0", &["\"logs\" (hostPath /var/log/app)"]).await?;

    // A network volume attachable to one node at a time: the move may stay on its node
    // only, and the refusal says so.
    c.apply(&format!(
        r#"apiVersion: v1
kind: PersistentVolume
metadata: {{name: pv-nfs}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  nfs: {{server: 192.0.2.10, path: /export}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: disk}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 1Gi}}}}
  volumeName: pv-nfs
---
apiVersion: podmig.dev/v1alpha1
kind: MigratingPod
metadata: {{name: rwo}}
spec:
  template:
    metadata: {{labels: {{app: rwo}}}}
    spec:
      nodeName: {from}
      volumes: [{{name: data, persistentVolumeClaim: {{claimName: disk}}}}]
      containers:
      - {{name: app, image: 'podmig.local/testapp:latest', volumeMounts: [{{name: data, mountPath: /data}}]}}
"#
    ))?;
    refused_and_runs(
        &c,
        "rwo-0",
        &["claim disk: ReadWriteOnce", &format!("targetNode: {from}")],
    )
    .await?;

    let denied: Vec<String> = api
        .denials()
        .into_iter()
        .filter(|d| d.starts_with("system:serviceaccount:podmig-system:"))
        .collect();
    assert!(denied.is_empty(), "the chart's RBAC lacks: {denied:?}");

    // `helm uninstall` removes what it installed.
    let said = helm(&[
        "uninstall",
        "podmig",
        "-n",
        "podmig-system",
        "--kubeconfig",
        c.kubeconfig().to_str().expect("utf-8"),
    ])?;
    assert!(said.contains("uninstalled"), "{said}");
    let left = c.kubectl(&[
        "get",
        "deploy,ds,sa,secret",
        "-n",
        "podmig-system",
        "-o",
        "name",
    ])?;
    assert!(
        !left.lines().any(|l| l.contains("podmig")),
        "left after uninstall: {left}"
    );
    let system_pods: Api<Pod> = Api::namespaced(c.client.clone(), "podmig-system");
    podmig_e2e::wait::no_pods(&system_pods, Duration::from_secs(60)).await?;
    Ok(())
}

/// A node's containerd configuration before podmig (version 2, runc only).
const NODE_CONFIG: &str = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_prepares_every_node_and_uninstall_undoes_it() -> anyhow::Result<()> {
    let mut c = Cluster::up_temp(2).await?;
    // Each node's own /etc/containerd (the local cluster's containerd reads another file:
    // this one is what a real node's would be, prepared and unprepared through the chart).
    for n in &c.nodes {
        let etc = n.fs.root.join("etc/containerd");
        std::fs::create_dir_all(&etc)?;
        std::fs::write(etc.join("config.toml"), NODE_CONFIG)?;
    }
    c.install_chart_with(&chart(), &["node.prepare.restartRuntime=none"])
        .await?;
    for n in &c.nodes {
        let root = &n.fs.root;
        for f in ["opt/podmig/bin/podmig-runc", "opt/podmig/bin/criu"] {
            assert!(root.join(f).exists(), "{}: {f} not installed", n.name);
        }
        let config = std::fs::read_to_string(root.join("etc/containerd/config.toml"))?;
        assert!(config.contains("imports"), "{}: {config}", n.name);
        let dropins: Vec<_> = std::fs::read_dir(root.join("etc/containerd/conf.d"))?
            .flatten()
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect();
        assert!(
            dropins
                .iter()
                .any(|d| d.contains("podmig-runc") && d.contains("podmig.dev/*")),
            "{}: {dropins:?}",
            n.name
        );
    }
    let said = helm(&[
        "uninstall",
        "podmig",
        "-n",
        "podmig-system",
        "--wait",
        "--timeout",
        "180s",
        "--kubeconfig",
        c.kubeconfig().to_str().expect("utf-8"),
    ]);
    let said = said.map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n{}",
            c.kubectl(&["get", "pods,jobs,ds", "-n", "podmig-system", "-o", "wide"])
                .unwrap_or_default()
        )
    })?;
    assert!(said.contains("uninstalled"), "{said}");
    for n in &c.nodes {
        let root = &n.fs.root;
        assert!(
            !root.join("opt/podmig/bin/podmig-runc").exists(),
            "{}: podmig-runc left",
            n.name
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/containerd/config.toml"))?,
            NODE_CONFIG,
            "{}: the node's configuration restored",
            n.name
        );
        let dropins = std::fs::read_dir(root.join("etc/containerd/conf.d"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(dropins, 0, "{}: drop-in left", n.name);
    }
    // The hook's own objects went with it.
    let left = c.kubectl(&[
        "get",
        "ds,jobs,sa,roles",
        "-n",
        "podmig-system",
        "-o",
        "name",
    ])?;
    assert!(!left.contains("node-cleanup"), "hook objects left: {left}");
    let system_pods: Api<Pod> = Api::namespaced(c.client.clone(), "podmig-system");
    podmig_e2e::wait::no_pods(&system_pods, Duration::from_secs(60)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_curl_example_moves_a_pod_with_a_service_account_token() -> anyhow::Result<()> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller("curl-example")?;
    let chart = chart();
    let rbac = helm(&[
        "template",
        "podmig",
        chart.to_str().expect("utf-8"),
        "-n",
        "podmig-system",
        "--show-only",
        "templates/rbac.yaml",
    ])?;
    c.apply(&rbac)?;
    let examples = podmig_e2e::paths::repo_root().join("examples");
    c.kubectl(&[
        "apply",
        "-f",
        examples.join("migratingpod.yaml").to_str().expect("utf-8"),
    ])?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let p0 = podmig_e2e::wait::ready_pod(&pods, "counter-0", Duration::from_secs(60)).await?;
    let from = p0
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    let to = c
        .nodes
        .iter()
        .find(|n| n.name != from)
        .map(|n| n.name.clone())
        .expect("other node");
    let out = Command::new(examples.join("migrate-with-curl.sh"))
        .args(["counter-0", &to])
        .env("KUBECONFIG", c.kubeconfig())
        .env("PODMIG_CA", c.daemon_ca())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_str(text.trim())?;
    assert_eq!(answer["phase"], "Succeeded", "{answer}");
    assert_eq!(answer["targetNode"], to.as_str());
    assert!(
        answer["report"]["frozenMs"].as_u64().is_some_and(|f| f > 0),
        "{answer}"
    );
    Ok(())
}
