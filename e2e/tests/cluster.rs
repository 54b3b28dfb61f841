//! The local cluster as users see it: kubectl and kube-rs against the test API server,
//! Pods run by the kubelet stand-ins through each node's real containerd.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams},
};
use podmig_e2e::cluster::Cluster;
use serde_json::json;

async fn cluster(nodes: usize) -> anyhow::Result<Cluster> {
    Cluster::up_temp(nodes).await
}

fn pod_yaml(name: &str, node: Option<&str>, extra_meta: &str) -> String {
    let node = node
        .map(|n| format!("  nodeName: {n}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{extra_meta}spec:\n{node}  terminationGracePeriodSeconds: 5\n  containers:\n  - name: app\n    image: podmig.local/testapp:latest\n"
    )
}

fn apply(c: &Cluster, yaml: &str) -> anyhow::Result<String> {
    c.apply(yaml)
}

use podmig_e2e::wait::until as wait_for;

async fn running_ip(pods: &Api<Pod>, name: &str) -> anyhow::Result<String> {
    wait_for(
        &format!("{name} Running"),
        Duration::from_secs(30),
        async || {
            let p = pods.get(name).await.ok()?;
            let st = p.status?;
            (st.phase.as_deref() == Some("Running"))
                .then_some(st.pod_ip)
                .flatten()
        },
    )
    .await
}

/// `GET /count` from inside a node's network namespace.
fn count_from_node(netns: &str, ip: &str) -> anyhow::Result<u64> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{netns}"))
        .args(["curl", "--noproxy", "*", "-sS", "--max-time", "3"])
        .arg(format!("http://{ip}:8080/count"))
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl from {netns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_on_both_nodes_reach_each_other_and_stop_gracefully() -> anyhow::Result<()> {
    let c = cluster(2).await?;
    let out = c.kubectl(&["get", "nodes"])?;
    assert_eq!(
        out.lines().filter(|l| l.contains(" Ready ")).count(),
        2,
        "{out}"
    );
    apply(&c, &pod_yaml("a", Some("node-0"), ""))?;
    apply(&c, &pod_yaml("b", Some("node-1"), ""))?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let ip_a = running_ip(&pods, "a").await?;
    let ip_b = running_ip(&pods, "b").await?;
    // Across nodes, both ways.
    assert_eq!(count_from_node(&c.nodes[0].netns, &ip_b)?, 1);
    assert_eq!(count_from_node(&c.nodes[1].netns, &ip_a)?, 1);
    let listed = c.kubectl(&["get", "pods", "-o", "wide"])?;
    assert!(
        listed.contains("node-0") && listed.contains("node-1") && listed.contains("Running"),
        "{listed}"
    );

    // kubectl delete: the app sees SIGTERM and the object goes.
    let started = Instant::now();
    c.kubectl(&["delete", "pod", "a"])?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the app stops on SIGTERM, not at the grace period's end"
    );
    let err = c.kubectl(&["get", "pod", "a"]).expect_err("deleted");
    assert!(
        err.to_string().contains("NotFound") || err.to_string().contains("not found"),
        "{err}"
    );
    let log = std::fs::read_dir(c.dir.join("node-0/logs"))?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("default_a_"))
        .map(|e| std::fs::read_to_string(e.path().join("app/0.log")))
        .transpose()?
        .unwrap_or_default();
    assert!(
        log.contains("received SIGTERM"),
        "graceful stop reached the app"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_shows_transitions_and_finalizer_holds_a_deleted_pod() -> anyhow::Result<()> {
    let c = cluster(1).await?;
    let mut watch = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(["get", "pods", "-w", "--no-headers"])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = watch.stdout.take().expect("stdout");
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    apply(
        &c,
        &pod_yaml("held", None, "  finalizers: [podmig.dev/migrate]\n"),
    )?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    running_ip(&pods, "held").await?;
    c.kubectl(&["delete", "pod", "held", "--wait=false"])?;
    // The kubelet stops the containers and confirms, but the finalizer keeps the object.
    let p = wait_for("containers stopped", Duration::from_secs(15), async || {
        let p = pods.get("held").await.ok()?;
        let stopped = p
            .status
            .as_ref()?
            .container_statuses
            .as_ref()?
            .iter()
            .all(|s| s.state.as_ref().is_some_and(|st| st.terminated.is_some()));
        stopped.then_some(p)
    })
    .await?;
    assert!(p.metadata.deletion_timestamp.is_some());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        pods.get("held").await.is_ok(),
        "the finalizer keeps the Pod"
    );
    c.kubectl(&[
        "patch",
        "pod",
        "held",
        "--type",
        "json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ])?;
    wait_for("pod gone", Duration::from_secs(5), async || {
        pods.get_opt("held").await.ok()?.is_none().then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    watch.kill()?;
    let _ = watch.wait();
    let seen = lines.join().expect("reader").join("\n");
    for state in ["Pending", "Running", "Terminating"] {
        assert!(
            seen.contains(state),
            "kubectl get -w shows {state}:\n{seen}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_applied_with_kubectl_is_served_with_status_and_watch() -> anyhow::Result<()> {
    let c = cluster(1).await?;
    apply(
        &c,
        r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.example.dev}
spec:
  group: example.dev
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wd]}
  versions:
  - name: v1
    served: true
    storage: true
    subresources: {status: {}}
    additionalPrinterColumns:
    - {name: Size, type: integer, jsonPath: .spec.size}
    - {name: State, type: string, jsonPath: .status.state}
    schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"#,
    )?;
    apply(
        &c,
        "apiVersion: example.dev/v1\nkind: Widget\nmetadata: {name: w1}\nspec: {size: 3}\n",
    )?;
    let ar = kube::api::ApiResource {
        group: "example.dev".into(),
        version: "v1".into(),
        api_version: "example.dev/v1".into(),
        kind: "Widget".into(),
        plural: "widgets".into(),
    };
    let api: Api<kube::api::DynamicObject> = Api::default_namespaced_with(c.client.clone(), &ar);
    let w = api.get("w1").await?;
    let rv = w.metadata.resource_version.clone().expect("rv");
    let mut stream = api.watch(&WatchParams::default(), &rv).await?.boxed();
    c.kubectl(&[
        "patch",
        "wd",
        "w1",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"size":5}}"#,
    ])?;
    c.kubectl(&[
        "patch",
        "wd",
        "w1",
        "--subresource",
        "status",
        "--type",
        "merge",
        "-p",
        r#"{"status":{"state":"Ready"}}"#,
    ])?;
    let mut sizes = vec![];
    while sizes.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await? {
            Some(Ok(WatchEvent::Modified(o))) => sizes.push((
                o.data["spec"]["size"].clone(),
                o.data["status"]["state"].clone(),
            )),
            Some(Ok(_)) => {}
            other => anyhow::bail!("watch ended: {other:?}"),
        }
    }
    assert_eq!(
        sizes,
        vec![
            (json!(5), serde_json::Value::Null),
            (json!(5), json!("Ready"))
        ]
    );
    let table = c.kubectl(&["get", "wd"])?;
    assert!(
        table.contains("SIZE") && table.contains("w1") && table.contains("Ready"),
        "{table}"
    );
    // A main-resource update cannot change the status.
    let mut w = api.get("w1").await?;
    w.data["status"] = json!({"state": "Hacked"});
    let w = api.replace("w1", &PostParams::default(), &w).await?;
    assert_eq!(w.data["status"]["state"], json!("Ready"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_evicts_and_cordons() -> anyhow::Result<()> {
    let c = cluster(2).await?;
    apply(&c, &pod_yaml("d1", Some("node-1"), ""))?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    running_ip(&pods, "d1").await?;
    let out = c.kubectl(&[
        "drain",
        "node-1",
        "--force",
        "--ignore-daemonsets",
        "--timeout=30s",
    ])?;
    assert!(out.contains("evicted") && out.contains("drained"), "{out}");
    assert!(pods.get_opt("d1").await?.is_none());
    let nodes = c.kubectl(&["get", "node", "node-1"])?;
    assert!(nodes.contains("SchedulingDisabled"), "{nodes}");
    // New Pods go to the other node.
    apply(&c, &pod_yaml("d2", None, ""))?;
    running_ip(&pods, "d2").await?;
    assert_eq!(
        pods.get("d2")
            .await?
            .spec
            .and_then(|s| s.node_name)
            .as_deref(),
        Some("node-0")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_resumed_watches_and_authorization() -> anyhow::Result<()> {
    let c = cluster(1).await?;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client.clone());
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "c1"}, "data": {"v": "0"}}))?;
    let first = cms.create(&PostParams::default(), &cm).await?;
    let rv = first.metadata.resource_version.clone().expect("rv");
    for i in 1..=3 {
        cms.patch(
            "c1",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"v": i.to_string()}})),
        )
        .await?;
    }
    // A stale update gets 409.
    let err = cms
        .replace("c1", &PostParams::default(), &first)
        .await
        .expect_err("stale");
    assert!(
        matches!(&err, kube::Error::Api(e) if e.code == 409),
        "{err:?}"
    );
    // A watch resumed from the first version gets every later change, in order.
    let mut stream = cms.watch(&WatchParams::default(), &rv).await?.boxed();
    let mut seen = vec![];
    while seen.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await? {
            Some(Ok(WatchEvent::Modified(o))) => {
                seen.push(o.data.and_then(|d| d.get("v").cloned()).unwrap_or_default())
            }
            Some(Ok(_)) => {}
            other => anyhow::bail!("watch ended: {other:?}"),
        }
    }
    assert_eq!(seen, ["1", "2", "3"]);

    // No token: 401. A ServiceAccount without RBAC: 403; with a Role: allowed.
    let url = c.apiserver.as_ref().expect("api").url();
    let out = Command::new("curl")
        .args(["--noproxy", "*", "-sk"])
        .arg(format!("{url}/api/v1/namespaces/default/pods"))
        .output()?;
    let body: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(body["code"], json!(401), "{body}");
    // NB: the test API server speaks JSON only; kubectl's typed `create` commands send
    // protobuf (415 here), so objects go in with `kubectl apply` and the token through kube-rs.
    apply(
        &c,
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: viewer}\n",
    )?;
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::default_namespaced(c.client.clone());
    let tr: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": []}}))?;
    let token = sas
        .create_token_request("viewer", &PostParams::default(), &tr)
        .await?
        .status
        .expect("status")
        .token;
    let as_viewer = |args: &[&str]| {
        let mut a = vec!["--token", token.as_str()];
        a.extend_from_slice(args);
        c.kubectl(&a)
    };
    let err = as_viewer(&["get", "pods"]).expect_err("no RBAC yet");
    assert!(
        err.to_string().contains("Forbidden") || err.to_string().contains("forbidden"),
        "{err}"
    );
    apply(
        &c,
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: pod-reader}
rules: [{apiGroups: [""], resources: [pods], verbs: [get, list, watch]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: viewer-reads}
subjects: [{kind: ServiceAccount, name: viewer, namespace: default}]
roleRef: {kind: Role, name: pod-reader, apiGroup: rbac.authorization.k8s.io}
"#,
    )?;
    as_viewer(&["get", "pods"])?;
    let err = as_viewer(&["delete", "configmap", "c1"]).expect_err("not granted");
    assert!(err.to_string().contains("forbidden"), "{err}");
    // What a node daemon does with a caller's token: TokenReview, then SubjectAccessReview.
    let reviews: Api<kube::api::DynamicObject> = Api::all_with(
        c.client.clone(),
        &kube::api::ApiResource {
            group: "authentication.k8s.io".into(),
            version: "v1".into(),
            api_version: "authentication.k8s.io/v1".into(),
            kind: "TokenReview".into(),
            plural: "tokenreviews".into(),
        },
    );
    let review: kube::api::DynamicObject = serde_json::from_value(
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "metadata": {}, "spec": {"token": token}}),
    )?;
    let r = reviews.create(&PostParams::default(), &review).await?;
    assert_eq!(
        r.data["status"]["user"]["username"],
        json!("system:serviceaccount:default:viewer")
    );
    let sars: Api<kube::api::DynamicObject> = Api::all_with(
        c.client.clone(),
        &kube::api::ApiResource {
            group: "authorization.k8s.io".into(),
            version: "v1".into(),
            api_version: "authorization.k8s.io/v1".into(),
            kind: "SubjectAccessReview".into(),
            plural: "subjectaccessreviews".into(),
        },
    );
    for (verb, allowed) in [("list", true), ("delete", false)] {
        let sar: kube::api::DynamicObject = serde_json::from_value(
            json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {},
            "spec": {"user": "system:serviceaccount:default:viewer", "groups": ["system:serviceaccounts"], "resourceAttributes": {"namespace": "default", "verb": verb, "resource": "pods"}}}),
        )?;
        let r = sars.create(&PostParams::default(), &sar).await?;
        assert_eq!(r.data["status"]["allowed"], json!(allowed), "{verb}");
    }
    Ok(())
}

#[test]
#[allow(clippy::disallowed_methods)] // a synchronous test driving CLI processes
fn cluster_cli_up_then_down_after_a_crash_leaves_nothing() -> anyhow::Result<()> {
    let parent = tempfile::Builder::new()
        .prefix("podmig-cli-")
        .tempdir_in("/var/tmp")?;
    let dir = parent.path().join("cluster");
    let bin = podmig_e2e::paths::bin("podmig-e2e");
    let up = Command::new(&bin)
        .args(["cluster", "up", "--nodes", "2", "--dir"])
        .arg(&dir)
        .output()?;
    anyhow::ensure!(
        up.status.success(),
        "cluster up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let kubeconfig = String::from_utf8_lossy(&up.stdout).trim().to_owned();
    assert!(
        kubeconfig.ends_with("kubeconfig") && std::path::Path::new(&kubeconfig).exists(),
        "{kubeconfig}"
    );
    let nodes = podmig_e2e::cluster::kubectl(std::path::Path::new(&kubeconfig), &["get", "nodes"])?;
    assert_eq!(
        nodes.lines().filter(|l| l.contains(" Ready ")).count(),
        2,
        "{nodes}"
    );
    podmig_e2e::cluster::kubectl(
        std::path::Path::new(&kubeconfig),
        &["run", "crashme", "--image=podmig.local/testapp:latest"],
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while podmig_e2e::cluster::kubectl(
        std::path::Path::new(&kubeconfig),
        &["get", "pod", "crashme", "-o", "jsonpath={.status.phase}"],
    )? != "Running"
    {
        anyhow::ensure!(Instant::now() < deadline, "crashme did not run");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The Pod's network namespace (other tests' clusters run meanwhile: find ours by its IP).
    let ip = podmig_e2e::cluster::kubectl(
        std::path::Path::new(&kubeconfig),
        &["get", "pod", "crashme", "-o", "jsonpath={.status.podIP}"],
    )?;
    let pod_netns =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
            .filter(|n| n.starts_with("cni-"))
            .find(|n| {
                Command::new("ip")
                    .args(["-n", n, "-4", "addr"])
                    .output()
                    .is_ok_and(|o| {
                        String::from_utf8_lossy(&o.stdout).contains(&format!("inet {ip}/"))
                    })
            })
            .ok_or_else(|| anyhow::anyhow!("no network namespace holds {ip}"))?;
    // A second `up` on the same directory is refused with a clear message.
    let again = Command::new(&bin)
        .args(["cluster", "up", "--dir"])
        .arg(&dir)
        .output()?;
    assert!(
        !again.status.success() && String::from_utf8_lossy(&again.stderr).contains("cluster down")
    );
    let state: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
    let pids: Vec<u32> = state["pids"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p.as_u64())
        .map(|p| p as u32)
        .collect();
    let prefix = state["network"]["prefix"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    // Crash: the cluster process dies without tearing anything down.
    podmig_e2e::process::signal(pids[0], libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    let down = Command::new(&bin)
        .args(["cluster", "down", "--dir"])
        .arg(&dir)
        .output()?;
    anyhow::ensure!(
        down.status.success(),
        "cluster down: {}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(!dir.exists(), "state directory removed");
    for pid in &pids {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .is_ok_and(|s| !s.contains("State:\tZ"));
        assert!(!alive, "process {pid} still runs");
    }
    let netns =
        String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
            .into_owned();
    assert!(!netns.contains(&format!("{prefix}-n")), "{netns}");
    let links =
        String::from_utf8_lossy(&Command::new("ip").args(["link"]).output()?.stdout).into_owned();
    assert!(
        !links.contains(&format!(" {prefix}:")) && !links.contains(&format!(" {prefix}n")),
        "{links}"
    );
    assert!(podmig_e2e::containerd::mounts_under(parent.path()).is_empty());
    let checkpoints = state["checkpoints"].as_str().unwrap_or_default();
    assert!(
        !checkpoints.is_empty() && !std::path::Path::new(checkpoints).exists(),
        "checkpoint directory {checkpoints} removed"
    );
    assert!(
        !netns.contains(&pod_netns),
        "the Pod's network namespace {pod_netns} is removed: {netns}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_create_is_retried_under_a_new_attempt_number() -> anyhow::Result<()> {
    let c = cluster(1).await?;
    // A Pod claiming to be a migration target that no controller made: the runtime
    // refuses every create.
    apply(
        &c,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: orphan\n  annotations: {podmig.dev/migrate-from: no-such-uid}\nspec:\n  runtimeClassName: podmig\n  containers:\n  - {name: app, image: podmig.local/testapp:latest}\n",
    )?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let messages = wait_for(
        "three refused creates",
        Duration::from_secs(30),
        async || {
            let p = pods.get("orphan").await.ok()?;
            let st = p.status?.container_statuses?.into_iter().next()?;
            let waiting = st.state?.waiting?;
            (st.restart_count >= 2).then(|| waiting.message.unwrap_or_default())
        },
    )
    .await?;
    assert!(
        !messages.contains("reserved"),
        "a retry reused the name of the refused container: {messages}"
    );
    // The reason podmig's daemon gave: no controller made this target.
    assert!(
        messages.contains("Refused") && messages.contains("no MigratingPod controls it"),
        "the runtime's reason: {messages}"
    );
    Ok(())
}

/// Deployments and DaemonSets run as on a real cluster: `kubectl rollout status` reports
/// them rolled out, a Deployment keeps its replicas (also after a template change and a
/// scale), a DaemonSet one Pod per node, and deleting them removes their Pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_and_daemonsets_roll_out() -> anyhow::Result<()> {
    let c = cluster(2).await?;
    c.apply(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: app, image: 'podmig.local/testapp:latest'}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: app, image: 'podmig.local/testapp:latest'}]
"#,
    )?;
    let said = c.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"])?;
    assert!(said.contains("successfully rolled out"), "{said}");
    let said = c.kubectl(&["rollout", "status", "daemonset/agent", "--timeout=90s"])?;
    assert!(said.contains("successfully rolled out"), "{said}");
    let pods: kube::Api<Pod> = kube::Api::default_namespaced(c.client.clone());
    let running = |sel: &'static str| {
        let pods = pods.clone();
        async move {
            let list = pods
                .list(&kube::api::ListParams::default().labels(sel))
                .await
                .ok()?;
            Some(
                list.items
                    .iter()
                    .filter(|p| p.metadata.deletion_timestamp.is_none())
                    .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                    .collect::<Vec<_>>(),
            )
        }
    };
    let web = running("app=web").await.unwrap_or_default();
    assert_eq!(web.len(), 2, "{web:?}");
    let mut agents = running("app=agent").await.unwrap_or_default();
    agents.sort();
    assert_eq!(agents, ["node-0", "node-1"], "one agent per node");
    // A new template replaces the Pods; the replicas follow the spec.
    c.kubectl(&[
        "patch",
        "deployment",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec": {"replicas": 3, "template": {"metadata": {"annotations": {"rev": "2"}}}}}"#,
    ])?;
    let said = c.kubectl(&["rollout", "status", "deployment/web", "--timeout=90s"])?;
    assert!(said.contains("successfully rolled out"), "{said}");
    podmig_e2e::wait::until("3 new web Pods", Duration::from_secs(60), async || {
        let list = pods
            .list(&kube::api::ListParams::default().labels("app=web"))
            .await
            .ok()?;
        let live: Vec<&Pod> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        (live.len() == 3
            && live.iter().all(|p| {
                p.metadata
                    .annotations
                    .as_ref()
                    .is_some_and(|a| a.get("rev").map(String::as_str) == Some("2"))
            }))
        .then_some(())
    })
    .await?;
    c.kubectl(&["delete", "deployment/web", "daemonset/agent"])?;
    podmig_e2e::wait::until("their Pods gone", Duration::from_secs(60), async || {
        let list = pods.list(&kube::api::ListParams::default()).await.ok()?;
        list.items.is_empty().then_some(())
    })
    .await?;
    Ok(())
}

/// The kubelet stand-in honours probes and host namespaces: a readiness probe that passes
/// makes the Pod Ready, one that fails (404) keeps it Running but not Ready, a failing
/// liveness probe restarts the container; a `hostNetwork` Pod has its node's address and
/// answers there; a privileged container has every capability.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_host_network_and_privileged_pods() -> anyhow::Result<()> {
    let c = cluster(1).await?;
    c.apply(
        r#"apiVersion: v1
kind: Pod
metadata: {name: ready}
spec:
  containers:
  - name: app
    image: podmig.local/testapp:latest
    ports: [{name: http, containerPort: 8080}]
    readinessProbe: {httpGet: {path: /healthz, port: http}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: unready}
spec:
  containers:
  - name: app
    image: podmig.local/testapp:latest
    readinessProbe: {httpGet: {path: /nope, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: dying}
spec:
  containers:
  - name: app
    image: podmig.local/testapp:latest
    livenessProbe: {tcpSocket: {port: 9999}, periodSeconds: 1, failureThreshold: 2}
---
apiVersion: v1
kind: Pod
metadata: {name: host}
spec:
  hostNetwork: true
  containers:
  - name: app
    image: podmig.local/testapp:latest
    args: ['--port', '18181']
    securityContext: {privileged: true}
"#,
    )?;
    let pods: kube::Api<Pod> = kube::Api::default_namespaced(c.client.clone());
    podmig_e2e::wait::ready_pod(&pods, "ready", Duration::from_secs(60)).await?;
    let host = podmig_e2e::wait::ready_pod(&pods, "host", Duration::from_secs(60)).await?;
    let st = host.status.clone().unwrap_or_default();
    assert_eq!(
        st.pod_ip, st.host_ip,
        "a host-network Pod has its node's address"
    );
    let node_ip = st.host_ip.unwrap_or_default();
    assert!(
        podmig_e2e::testapp::wait_count_at(&node_ip, 18181, Duration::from_secs(30)).await? >= 1
    );
    // Privileged: the container's process has the full capability set of the host.
    let root = c.nodes[0].containerd.runc_root();
    let uid = host.metadata.uid.clone().unwrap_or_default();
    let id = podmig_cri_ext::identity::find_container(&root, &uid, "app").expect("container");
    let pid = podmig_cri_ext::identity::init_pid(&root.join(&id)).expect("pid");
    let caps = |pid: String| -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(format!("/proc/{pid}/status"))?
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:").map(|v| v.trim().to_owned()))
            .unwrap_or_default())
    };
    assert_eq!(caps(pid.to_string())?, caps("self".into())?, "privileged");
    // Not ready, yet running; and restarted by its liveness probe.
    podmig_e2e::wait::until("unready runs", Duration::from_secs(30), async || {
        let p = pods.get("unready").await.ok()?;
        (p.status.as_ref()?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!podmig_e2e::wait::is_ready(&pods.get("unready").await?));
    podmig_e2e::wait::until("dying restarted", Duration::from_secs(60), async || {
        let p = pods.get("dying").await.ok()?;
        let restarts = p.status?.container_statuses?.first()?.restart_count;
        (restarts >= 1).then_some(())
    })
    .await?;
    Ok(())
}

/// Processes whose command line names `dir` (containerd's config, the daemons' sockets…).
fn processes_under(dir: &std::path::Path) -> Vec<String> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            text.contains(&needle)
                .then(|| format!("{} {text}", e.file_name().to_string_lossy()))
        })
        .collect()
}

#[test]
#[allow(clippy::disallowed_methods)] // a synchronous test driving CLI processes
fn an_interrupted_cluster_run_tears_down_whatever_it_had_started() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let bin = podmig_e2e::paths::bin("podmig-e2e");
    // Ctrl-C once it is up, and Ctrl-C while it comes up (its network made, nodes starting).
    for when_ready in [true, false] {
        let parent = tempfile::Builder::new()
            .prefix("podmig-int-")
            .tempdir_in("/var/tmp")?;
        let dir = parent.path().join("cluster");
        let mut child = Command::new(&bin)
            .args(["cluster", "run", "--nodes", "1", "--dir"])
            .arg(&dir)
            .process_group(0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        let pgid = child.id();
        let marker = if when_ready { "ready" } else { "state.json" };
        let deadline = Instant::now() + Duration::from_secs(90);
        while !dir.join(marker).exists() {
            anyhow::ensure!(Instant::now() < deadline, "no {marker}");
            std::thread::sleep(Duration::from_millis(50));
        }
        if !when_ready {
            std::thread::sleep(Duration::from_millis(700));
        }
        let state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("state.json"))?)?;
        let prefix = state["network"]["prefix"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        // As a terminal's Ctrl-C: SIGINT to the whole process group.
        podmig_e2e::process::signal_group(pgid, libc::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "still running after SIGINT");
            std::thread::sleep(Duration::from_millis(100));
        }
        std::thread::sleep(Duration::from_millis(500));
        let left = processes_under(parent.path());
        assert!(
            left.is_empty(),
            "ready={when_ready}: left running: {left:?}"
        );
        let netns =
            String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
                .into_owned();
        assert!(
            !netns.contains(&format!("{prefix}-n")),
            "ready={when_ready}: {netns}"
        );
        assert!(podmig_e2e::containerd::mounts_under(parent.path()).is_empty());
    }
    Ok(())
}
