//! The local cluster behaves like a real one where podmig's users and tests look:
//! CRD schemas enforced (422 with field errors, defaults, pruning, strict field
//! validation), `kubectl explain`, `kubectl logs` through the kubelet stand-in, and
//! admission webhooks (including `pods/eviction`, as `kubectl drain` meets them), and
//! service-account credentials, Secrets and ConfigMaps in Pods' volumes.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{Json, extract::State, routing::post};
use base64::Engine;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    Api,
    api::{EvictParams, PostParams},
};
use podmig_e2e::{apiserver::tls::Certs, cluster::Cluster, wait::until};
use serde_json::{Value, json};

/// The stderr of a kubectl command that must fail.
fn kubectl_fails(c: &Cluster, args: &[&str]) -> String {
    match c.kubectl(args) {
        Ok(out) => panic!("kubectl {args:?} succeeded: {out}"),
        Err(e) => format!("{e:#}"),
    }
}

fn write(dir: &std::path::Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write manifest");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_schemas_are_enforced_and_explained() -> anyhow::Result<()> {
    let c = Cluster::up_temp(1).await?;
    c.install_crds()?;
    let dir = tempfile::tempdir()?;
    let template = "  template:\n    spec:\n      containers: [{name: app, image: podmig.local/testapp:latest}]\n";
    let bad = write(
        dir.path(),
        "bad.yaml",
        &format!(
            "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: bad}}\nspec:\n  migrationTimeoutSeconds: \"abc\"\n  strategy: teleport\n{template}"
        ),
    );
    let err = kubectl_fails(&c, &["apply", "-f", &bad]);
    assert!(err.contains("The MigratingPod \"bad\" is invalid"), "{err}");
    assert!(
        err.contains("spec.strategy: Unsupported value: \"teleport\": supported values: \"auto\", \"full\", \"lazy\", \"lazy-or-full\", \"precopy\""),
        "{err}"
    );
    assert!(
        err.contains("spec.migrationTimeoutSeconds: Invalid value: \"string\": spec.migrationTimeoutSeconds in body must be of type integer"),
        "{err}"
    );
    assert!(kubectl_fails(&c, &["get", "mpod", "bad"]).contains("not found"));

    let unknown = write(
        dir.path(),
        "unknown.yaml",
        &format!(
            "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: unknown}}\nspec:\n  bogus: 1\n{template}"
        ),
    );
    let err = kubectl_fails(&c, &["apply", "-f", &unknown]);
    assert!(
        err.contains("strict decoding error: unknown field \"spec.bogus\""),
        "{err}"
    );
    // Without strict validation the field is pruned, not stored.
    c.kubectl(&["apply", "--validate=false", "-f", &unknown])?;
    let stored: Value =
        serde_json::from_str(&c.kubectl(&["get", "mpod", "unknown", "-o", "json"])?)?;
    assert!(stored["spec"].get("bogus").is_none(), "{stored}");
    // Defaults from the schema.
    assert_eq!(stored["spec"]["strategy"], "auto");
    assert_eq!(stored["spec"]["maxDowntimeMs"], 1000);
    assert_eq!(stored["spec"]["migrationTimeoutSeconds"], 300);

    let err = kubectl_fails(
        &c,
        &[
            "patch",
            "mpod",
            "unknown",
            "--type=merge",
            "-p",
            r#"{"spec":{"migrationTimeoutSeconds":0}}"#,
        ],
    );
    assert!(
        err.contains("spec.migrationTimeoutSeconds: Invalid value: 0: spec.migrationTimeoutSeconds in body should be greater than or equal to 1"),
        "{err}"
    );
    let migration = write(
        dir.path(),
        "migration.yaml",
        "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {name: m}\nspec:\n  targetNode: node-0\n",
    );
    let err = kubectl_fails(&c, &["create", "-f", &migration]);
    assert!(err.contains("spec.podName: Required value"), "{err}");

    let explained = c.kubectl(&["explain", "mpod.spec.strategy"])?;
    assert!(
        explained.contains("How moves carry the Pod's state"),
        "{explained}"
    );
    assert!(
        explained.contains("KIND:       MigratingPod"),
        "{explained}"
    );
    let explained = c.kubectl(&["explain", "pods.spec.runtimeClassName"])?;
    assert!(
        explained.contains("RuntimeClassName refers to a RuntimeClass"),
        "{explained}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_reads_the_containers_log_through_the_kubelet() -> anyhow::Result<()> {
    let c = Cluster::up_temp(1).await?;
    c.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: app}\nspec:\n  containers:\n  - {name: app, image: podmig.local/testapp:latest}\n")?;
    podmig_e2e::wait::ready_pod(
        &Api::<Pod>::default_namespaced(c.client.clone()),
        "app",
        Duration::from_secs(60),
    )
    .await?;
    let seq = |line: &str| -> Option<u64> { line.rsplit("seq=").next()?.trim().parse().ok() };
    let tail = until(
        "heartbeats in the log",
        Duration::from_secs(10),
        async || {
            let out = c.kubectl(&["logs", "app", "--tail=3"]).ok()?;
            (out.lines().count() == 3).then_some(out)
        },
    )
    .await?;
    let seqs: Vec<u64> = tail.lines().filter_map(seq).collect();
    assert_eq!(seqs.len(), 3, "{tail}");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{tail}");

    let all = c.kubectl(&["logs", "app", "-c", "app"])?;
    assert!(
        all.starts_with("testapp ready port=8080"),
        "{}",
        &all[..all.len().min(200)]
    );
    let stamped = c.kubectl(&["logs", "app", "--timestamps", "--tail=1"])?;
    let (ts, text) = stamped.trim().split_once(' ').expect("timestamp and text");
    assert!(
        ts.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
        "{stamped}"
    );
    assert!(text.starts_with("heartbeat seq="), "{stamped}");

    // -f keeps streaming new lines until the client goes away.
    let mut follow = std::process::Command::new("kubectl")
        .args(["logs", "-f", "app", "--tail=1"])
        .env("KUBECONFIG", c.kubeconfig())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    follow.kill()?;
    let out = follow.wait_with_output()?;
    let followed: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(seq)
        .collect();
    assert!(
        followed.len() > 20,
        "only {} lines followed",
        followed.len()
    );
    assert!(followed.last() > followed.first());

    let err = kubectl_fails(&c, &["logs", "app", "--previous"]);
    assert!(
        err.contains("previous terminated container \"app\" in pod \"app\" not found"),
        "{err}"
    );
    let err = kubectl_fails(&c, &["logs", "app", "-c", "nope"]);
    assert!(
        err.contains("container nope is not valid for pod app"),
        "{err}"
    );
    Ok(())
}

/// What a container sees: its environment and a file below its root, read through its
/// init process.
fn inside(c: &Cluster, uid: &str, path: &str) -> anyhow::Result<(String, Vec<u8>)> {
    let root = c.nodes[0].containerd.runc_root();
    let (id, _) = podmig_cri_ext::identity::running_containers(&root, uid)
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no container of {uid}"))?;
    let pid = podmig_cri_ext::identity::init_pid(&root.join(&id))
        .ok_or_else(|| anyhow::anyhow!("no init pid of {id}"))?;
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    let env = String::from_utf8_lossy(&environ).replace('\0', "\n");
    Ok((env, std::fs::read(format!("/proc/{pid}/root{path}"))?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_service_account_credentials_secrets_and_config_maps() -> anyhow::Result<()> {
    let c = Cluster::up_temp(1).await?;
    c.apply(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {name: reader}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {name: read-config}
rules: [{apiGroups: [""], resources: [configmaps], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: reader-reads}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: Role, name: read-config}
subjects: [{kind: ServiceAccount, name: reader, namespace: default}]
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: hunter2, user: admin}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {mode: fast}
---
apiVersion: v1
kind: Pod
metadata: {name: app}
spec:
  serviceAccountName: reader
  volumes:
  - {name: creds, secret: {secretName: creds, defaultMode: 0400, items: [{key: password, path: pw}]}}
  - {name: settings, configMap: {name: settings}}
  containers:
  - name: app
    image: podmig.local/testapp:latest
    volumeMounts:
    - {name: creds, mountPath: /etc/creds, readOnly: true}
    - {name: settings, mountPath: /etc/settings}
"#,
    )?;
    let pods = Api::<Pod>::default_namespaced(c.client.clone());
    let pod = podmig_e2e::wait::ready_pod(&pods, "app", Duration::from_secs(60)).await?;
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let sa_dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let (env, token) = inside(&c, &uid, &format!("{sa_dir}/token"))?;
    let api = c.apiserver.as_ref().expect("api server");
    assert!(
        env.contains(&format!("KUBERNETES_SERVICE_HOST={}\n", api.addr.ip())),
        "{env}"
    );
    assert!(
        env.contains(&format!("KUBERNETES_SERVICE_PORT={}\n", api.addr.port())),
        "{env}"
    );
    let (_, ca) = inside(&c, &uid, &format!("{sa_dir}/ca.crt"))?;
    assert_eq!(ca, std::fs::read(&api.ca)?, "the cluster CA");
    let (_, ns) = inside(&c, &uid, &format!("{sa_dir}/namespace"))?;
    assert_eq!(ns, b"default");
    let (_, pw) = inside(&c, &uid, "/etc/creds/pw")?;
    assert_eq!(pw, b"hunter2");
    assert!(
        inside(&c, &uid, "/etc/creds/user").is_err(),
        "only the listed key"
    );
    let (_, mode) = inside(&c, &uid, "/etc/settings/mode")?;
    assert_eq!(mode, b"fast");

    // The token authenticates as the Pod's ServiceAccount, which RBAC then judges.
    let token = String::from_utf8(token)?;
    let get = |path: &str| {
        std::process::Command::new("curl")
            .args(["--noproxy", "*", "-sS", "--cacert"])
            .arg(&api.ca)
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .arg(format!("{}{path}", api.url()))
            .output()
    };
    let allowed =
        String::from_utf8_lossy(&get("/api/v1/namespaces/default/configmaps/settings")?.stdout)
            .into_owned();
    assert!(allowed.contains("\"mode\":\"fast\""), "{allowed}");
    let denied = String::from_utf8_lossy(&get("/api/v1/namespaces/default/secrets/creds")?.stdout)
        .into_owned();
    assert!(
        denied.contains("system:serviceaccount:default:reader") && denied.contains("403"),
        "{denied}"
    );

    // A Pod that opts out gets no credentials.
    c.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: bare}\nspec:\n  automountServiceAccountToken: false\n  containers: [{name: app, image: podmig.local/testapp:latest}]\n")?;
    let bare = podmig_e2e::wait::ready_pod(&pods, "bare", Duration::from_secs(60)).await?;
    let bare_uid = bare.metadata.uid.clone().unwrap_or_default();
    assert!(inside(&c, &bare_uid, &format!("{sa_dir}/token")).is_err());
    assert_eq!(
        bare.spec.and_then(|s| s.service_account_name).as_deref(),
        Some("default")
    );
    Ok(())
}

/// A webhook server: records every AdmissionReview, denies evictions with 429, labels
/// Pods it is asked to mutate.
async fn webhook_server() -> anyhow::Result<(
    String,
    String,
    Arc<Mutex<Vec<Value>>>,
    axum_server::Handle<std::net::SocketAddr>,
)> {
    let certs = Certs::generate(&["127.0.0.1".to_owned()])?;
    let config = axum_server::tls_rustls::RustlsConfig::from_pem(
        certs.cert_pem.clone().into_bytes(),
        certs.key_pem.clone().into_bytes(),
    )
    .await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    async fn review(
        State(seen): State<Arc<Mutex<Vec<Value>>>>,
        Json(review): Json<Value>,
    ) -> Json<Value> {
        let request = review["request"].clone();
        seen.lock().expect("lock").push(request.clone());
        let uid = request["uid"].clone();
        let response = if request["subResource"] == "eviction" {
            json!({"uid": uid, "allowed": false, "status": {"code": 429, "message": "podmig is moving this Pod first"}})
        } else {
            let patch = json!([{"op": "add", "path": "/metadata/labels/mutated", "value": "true"}]);
            json!({"uid": uid, "allowed": true, "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string())})
        };
        Json(
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
        )
    }
    let app = axum::Router::new()
        .route("/review", post(review))
        .with_state(seen.clone());
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let url = format!("https://{}/review", listener.local_addr()?);
    let handle = axum_server::Handle::new();
    let server = axum_server::from_tcp_rustls(listener, config)?.handle(handle.clone());
    tokio::spawn(async move {
        let _ = server.serve(app.into_make_service()).await;
    });
    let ca = base64::engine::general_purpose::STANDARD.encode(&certs.cert_pem);
    Ok((url, ca, seen, handle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_webhooks_see_evictions_and_can_deny_and_mutate() -> anyhow::Result<()> {
    let c = Cluster::up_temp(1).await?;
    let (url, ca, seen, handle) = webhook_server().await?;
    let hooks = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "eviction-guard"},
        "webhooks": [{"name": "eviction.test.podmig.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"url": url, "caBundle": ca},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/eviction"]}],
            "failurePolicy": "Fail", "timeoutSeconds": 5}]});
    c.apply(&hooks.to_string())?;
    let mutating = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "labeller"},
        "webhooks": [{"name": "label.test.podmig.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"url": url, "caBundle": ca},
            "objectSelector": {"matchLabels": {"mutate": "yes"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}]}]});
    c.apply(&mutating.to_string())?;
    // With webhooks configured, a server-side apply still creates what does not exist (the
    // EndpointSlice controller and kubectl --server-side write this way).
    let out = c.kubectl(&[
        "create",
        "configmap",
        "ssa-probe",
        "--from-literal=a=b",
        "--dry-run=client",
        "-o",
        "yaml",
    ])?;
    std::fs::write(c.dir.join("ssa.yaml"), out)?;
    let applied = c.kubectl(&[
        "apply",
        "--server-side",
        "-f",
        &c.dir.join("ssa.yaml").display().to_string(),
    ])?;
    assert!(applied.contains("serverside-applied"), "{applied}");
    assert!(
        c.kubectl(&["get", "configmap", "ssa-probe"])?
            .contains("ssa-probe")
    );

    // A client that shows a 429 instead of retrying it (kube-rs retries 429s by default).
    let client = {
        let kc = kube::config::Kubeconfig::read_from(c.kubeconfig())?;
        let mut config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?;
        config.default_retry = false;
        kube::Client::try_from(config)?
    };
    let pods: Api<Pod> = Api::default_namespaced(client);
    let pod = |name: &str, labels: Value| -> anyhow::Result<Pod> {
        Ok(serde_json::from_value(
            json!({"metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "app", "image": "podmig.local/testapp:latest"}]}}),
        )?)
    };
    let created = pods
        .create(
            &PostParams::default(),
            &pod("chosen", json!({"mutate": "yes"}))?,
        )
        .await?;
    assert_eq!(
        created
            .metadata
            .labels
            .unwrap_or_default()
            .get("mutated")
            .map(String::as_str),
        Some("true")
    );
    let plain = pods
        .create(&PostParams::default(), &pod("plain", json!({}))?)
        .await?;
    assert!(
        !plain
            .metadata
            .labels
            .unwrap_or_default()
            .contains_key("mutated")
    );

    let denied = pods
        .evict("plain", &EvictParams::default())
        .await
        .expect_err("eviction denied");
    match denied {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 429, "{s:?}");
            assert!(s.message.contains("admission webhook \"eviction.test.podmig.dev\" denied the request: podmig is moving this Pod first"), "{}", s.message);
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(
        pods.get("plain").await.is_ok(),
        "a denied eviction deletes nothing"
    );
    let eviction = seen
        .lock()
        .expect("lock")
        .iter()
        .find(|r| r["subResource"] == "eviction")
        .cloned()
        .expect("the webhook saw the eviction");
    assert_eq!(eviction["operation"], "CREATE");
    assert_eq!(eviction["name"], "plain");
    assert_eq!(eviction["kind"]["kind"], "Eviction");
    assert_eq!(eviction["userInfo"]["username"], "kubernetes-admin");

    // kubectl drain meets the same answer and keeps retrying (once the Pod is on the node).
    until(
        "plain bound to node-0",
        Duration::from_secs(20),
        async || {
            let p = pods.get("plain").await.ok()?;
            (p.spec?.node_name.as_deref() == Some("node-0")).then_some(())
        },
    )
    .await?;
    let err = kubectl_fails(
        &c,
        &[
            "drain",
            "node-0",
            "--force",
            "--timeout=3s",
            "--pod-selector=mutate!=yes",
        ],
    );
    assert!(
        err.contains("denied the request: podmig is moving this Pod first"),
        "{err}"
    );

    // failurePolicy: an unreachable webhook fails the request (Fail) or is skipped (Ignore).
    let broken = |policy: &str| {
        json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": "broken"},
        "webhooks": [{"name": "broken.test.podmig.dev", "admissionReviewVersions": ["v1"], "sideEffects": "None",
            "clientConfig": {"url": "https://127.0.0.1:1/review", "caBundle": ca},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]}],
            "failurePolicy": policy, "timeoutSeconds": 2}]})
    };
    c.apply(&broken("Fail").to_string())?;
    let cms: Api<ConfigMap> = Api::default_namespaced(c.client.clone());
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "cm"}}))?;
    let err = cms
        .create(&PostParams::default(), &cm)
        .await
        .expect_err("webhook down");
    assert!(
        err.to_string()
            .contains("failed calling webhook \"broken.test.podmig.dev\""),
        "{err}"
    );
    c.apply(&broken("Ignore").to_string())?;
    cms.create(&PostParams::default(), &cm).await?;
    handle.shutdown();
    Ok(())
}
