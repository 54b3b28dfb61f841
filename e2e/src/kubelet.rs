//! A kubelet stand-in for one node of the local cluster: registers its Node, keeps its
//! Ready condition and Lease fresh, watches the Pods bound to it and runs them through
//! real CRI calls (sandbox with the RuntimeClass's handler, containers in order, restart
//! policy, graceful stop with the deletion grace period, final deletion with grace 0),
//! reporting their status. It mirrors what kubelet does closely enough that podmig
//! cannot tell — and nothing more.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use futures::StreamExt;
use k8s_cri::v1 as cri;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::watcher,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::cri::Cri;

/// What a kubelet stand-in needs to know about its node.
#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// Node name.
    pub node: String,
    /// The node's address.
    pub node_ip: String,
    /// The node's Pod subnet.
    pub pod_cidr: String,
    /// containerd's socket.
    pub cri_socket: PathBuf,
    /// Root of the Pod log directories.
    pub logs_root: PathBuf,
    /// Where Pod volumes live on the node.
    pub volumes: crate::kubelet_volumes::VolumeRoots,
    /// The API server's address as Pods reach it (`KUBERNETES_SERVICE_HOST`/`_PORT`,
    /// which in-cluster clients read).
    pub api_server: std::net::SocketAddr,
    /// kubelet's `--runtime-request-timeout` (2 minutes unless a test shortens it).
    pub runtime_request_timeout: RuntimeRequestTimeout,
    /// The runtime's name and version for the Node's status (`containerd://1.6.20`).
    pub runtime_version: String,
    /// The user-namespace ranges of the node's `hostUsers: false` Pods.
    pub user_namespaces: crate::kubelet_pod::UserNamespaces,
}

/// How long kubelet waits on one CRI call (`--runtime-request-timeout`, 2 minutes by
/// default) before it gives up with `DeadlineExceeded`; shared, so a test can shorten it
/// on a running node.
#[derive(Debug, Clone)]
pub struct RuntimeRequestTimeout(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Default for RuntimeRequestTimeout {
    fn default() -> Self {
        Self::new(Duration::from_secs(120))
    }
}

impl RuntimeRequestTimeout {
    /// A timeout of `d`.
    pub fn new(d: Duration) -> Self {
        Self(std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            d.as_millis() as u64,
        )))
    }

    /// Sets it to `d` (calls started from now on).
    pub fn set(&self, d: Duration) {
        self.0
            .store(d.as_millis() as u64, std::sync::atomic::Ordering::SeqCst);
    }

    /// The timeout now.
    pub fn get(&self) -> Duration {
        Duration::from_millis(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Runs CRI call `what`, giving up after the timeout (plus `extra`: a stop's grace
    /// period) as kubelet's context deadline does; the abandoned call is cancelled.
    pub async fn within<T>(
        &self,
        what: &str,
        extra: Duration,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.get() + extra, call).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => anyhow::bail!(
                "{what}: rpc error: code = DeadlineExceeded desc = context deadline exceeded"
            ),
        }
    }
}

/// How long kubelet's pod worker waits before it tries a failed sandbox or container
/// creation again.
pub const CREATE_BACKOFF: Duration = Duration::from_secs(10);

/// Now, as Kubernetes writes times in status fields.
pub(crate) fn now() -> String {
    crate::clock::now()
}

/// Registers the node and runs its Pods until the task is dropped.
pub async fn run(client: kube::Client, cfg: KubeletConfig) -> anyhow::Result<()> {
    let cri = Cri::connect(&cfg.cri_socket).await?;
    register(&client, &cfg).await?;
    tokio::spawn(heartbeat(client.clone(), cfg.clone()));
    let pods: Api<Pod> = Api::all(client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", cfg.node));
    let mut stream = watcher(pods, wc).boxed();
    let mut workers: HashMap<String, mpsc::UnboundedSender<PodEvent>> = HashMap::new();
    while let Some(ev) = stream.next().await {
        let pods = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![PodEvent::Sync(p)],
            // Force-deleted (or gone while the watch was down): stop what runs, like kubelet's
            // pod workers do for a Pod the API server no longer has.
            Ok(watcher::Event::Delete(p)) => vec![PodEvent::Removed(p)],
            Ok(watcher::Event::Init) | Ok(watcher::Event::InitDone) => vec![],
            Err(error) => {
                tracing::warn!(node = %cfg.node, %error, "pod watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                vec![]
            }
        };
        for pod in pods {
            let uid = pod.pod().metadata.uid.clone().unwrap_or_default();
            workers.retain(|_, tx| !tx.is_closed());
            if matches!(pod, PodEvent::Removed(_)) && !workers.contains_key(&uid) {
                continue;
            }
            let tx = workers.entry(uid).or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(PodWorker::new(client.clone(), cri.clone(), cfg.clone()).run(rx));
                tx
            });
            let _ = tx.send(pod);
        }
    }
    Ok(())
}

async fn register(client: &kube::Client, cfg: &KubeletConfig) -> anyhow::Result<()> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": cfg.node, "labels": {"kubernetes.io/hostname": cfg.node, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}},
        "spec": {"podCIDR": cfg.pod_cidr, "podCIDRs": [cfg.pod_cidr]},
    });
    let pp = PatchParams::apply("kubelet").force();
    nodes.patch(&cfg.node, &pp, &Patch::Apply(&node)).await?;
    nodes
        .patch_status(
            &cfg.node,
            &PatchParams::default(),
            &Patch::Merge(node_status(cfg)),
        )
        .await?;
    Ok(())
}

fn node_status(cfg: &KubeletConfig) -> Value {
    let t = now();
    json!({"status": {
        "conditions": [
            {"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet stand-in is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t},
            {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory", "lastHeartbeatTime": t, "lastTransitionTime": t},
        ],
        "addresses": [{"type": "InternalIP", "address": cfg.node_ip}, {"type": "Hostname", "address": cfg.node}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": crate::kubelet_logs::KUBELET_PORT}},
        "capacity": {"cpu": "2", "memory": "24Gi", "pods": "110"},
        "allocatable": {"cpu": "2", "memory": "24Gi", "pods": "110"},
        "nodeInfo": {"kubeletVersion": "v1.32.0-podmig-e2e", "containerRuntimeVersion": cfg.runtime_version, "osImage": "Debian GNU/Linux 12",
                     "operatingSystem": "linux", "architecture": "amd64", "kernelVersion": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(), "kubeProxyVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
    }})
}

async fn heartbeat(client: kube::Client, cfg: KubeletConfig) {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client, "kube-node-lease");
    loop {
        let _ = nodes
            .patch_status(
                &cfg.node,
                &PatchParams::default(),
                &Patch::Merge(node_status(&cfg)),
            )
            .await;
        let lease = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {"name": cfg.node},
            "spec": {"holderIdentity": cfg.node, "leaseDurationSeconds": 40, "renewTime": crate::clock::now_micros()}});
        let _ = leases
            .patch(
                &cfg.node,
                &PatchParams::apply("kubelet").force(),
                &Patch::Apply(&lease),
            )
            .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// What the watch tells a Pod worker.
enum PodEvent {
    /// The Pod's current version.
    Sync(Pod),
    /// The Pod is gone from the API server.
    Removed(Pod),
}

impl PodEvent {
    fn pod(&self) -> &Pod {
        match self {
            PodEvent::Sync(p) | PodEvent::Removed(p) => p,
        }
    }
}

/// One container the worker started.
#[derive(Debug, Clone)]
struct Running {
    id: String,
    restarts: i32,
    /// When it was started (probes count their delays from it).
    started: std::time::Instant,
}

/// Handles one Pod, one update at a time, like kubelet's pod worker.
struct PodWorker {
    client: kube::Client,
    cri: Cri,
    cfg: KubeletConfig,
    sandbox: Option<(String, cri::PodSandboxConfig, String)>,
    containers: BTreeMap<String, Running>,
    /// The attempt number the next create of a container uses after failed ones: like
    /// kubelet, a retry never reuses the name of a container the runtime still holds.
    next_attempt: HashMap<String, u32>,
    init_done: bool,
    last_status: Value,
    started_at: String,
    /// The Pod's volumes on the node, by name (made before the sandbox).
    volume_dirs: HashMap<String, PathBuf>,
    /// Its containers' readiness and liveness probes.
    probes: crate::kubelet_pod::Probes,
    /// Failed creations (a container's name, or `SANDBOX`) not to try again before the
    /// back-off passed, with the failure the status keeps showing meanwhile.
    backoff: HashMap<String, (std::time::Instant, &'static str, String)>,
    /// The attempt number of the next sandbox (a failed one is removed, not reused).
    sandbox_attempt: u32,
}

/// The back-off key of the Pod's sandbox.
const SANDBOX: &str = "\0sandbox";

impl PodWorker {
    fn new(client: kube::Client, cri: Cri, cfg: KubeletConfig) -> Self {
        Self {
            client,
            cri,
            cfg,
            sandbox: None,
            containers: BTreeMap::new(),
            next_attempt: HashMap::new(),
            init_done: false,
            last_status: Value::Null,
            started_at: now(),
            volume_dirs: HashMap::new(),
            probes: Default::default(),
            backoff: HashMap::new(),
            sandbox_attempt: 0,
        }
    }

    /// The failure of `key` still backing off, if any.
    fn backing_off(&mut self, key: &str) -> Option<(&'static str, String)> {
        match self.backoff.get(key) {
            Some((until, reason, message)) if std::time::Instant::now() < *until => {
                Some((*reason, message.clone()))
            }
            Some(_) => {
                self.backoff.remove(key);
                None
            }
            None => None,
        }
    }

    /// Records a failed creation of `key`: not tried again for [`CREATE_BACKOFF`].
    fn back_off(&mut self, key: &str, reason: &'static str, message: &str) {
        self.backoff.insert(
            key.to_owned(),
            (
                std::time::Instant::now() + CREATE_BACKOFF,
                reason,
                message.to_owned(),
            ),
        );
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<PodEvent>) {
        let Some(mut event) = rx.recv().await else {
            return;
        };
        loop {
            // Only the newest version of the Pod matters.
            while let Ok(e) = rx.try_recv() {
                event = e;
            }
            let pod = match &event {
                PodEvent::Sync(p) => p.clone(),
                PodEvent::Removed(p) => {
                    if let Err(error) = self.stop_all(p).await {
                        tracing::warn!(pod = ?p.metadata.name, %error, "stopping a removed pod failed");
                    }
                    return;
                }
            };
            match self.sync(&pod).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => tracing::warn!(pod = ?pod.metadata.name, %error, "pod sync failed"),
            }
            tokio::select! {
                e = rx.recv() => match e { Some(e) => event = e, None => return },
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    fn pods(&self, pod: &Pod) -> Api<Pod> {
        Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        )
    }

    /// One sync; true when the Pod is gone and the worker ends.
    async fn sync(&mut self, pod: &Pod) -> anyhow::Result<bool> {
        if pod.metadata.deletion_timestamp.is_some() {
            self.kill(pod).await?;
            return Ok(true);
        }
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return Ok(false);
        }
        if self.sandbox.is_none() {
            if let Some(problem) = self.backing_off(SANDBOX) {
                self.report(pod, Some(problem)).await?;
                return Ok(false);
            }
            if let Err(e) = self.start_sandbox(pod).await {
                let message = e.to_string();
                self.back_off(SANDBOX, "CreatePodSandboxError", &message);
                // What the failed attempt left is removed; the next one is a new sandbox.
                self.remove_sandboxes_of(pod).await;
                self.sandbox_attempt += 1;
                self.report(pod, Some(("CreatePodSandboxError", message)))
                    .await?;
                return Ok(false);
            }
        }
        let spec = pod.spec.clone().unwrap_or_default();
        if !self.init_done {
            for c in spec.init_containers.clone().unwrap_or_default() {
                let key = format!("init:{}", c.name);
                if !self.containers.contains_key(&key) {
                    let id = self.start_container(pod, &c, 0).await?;
                    self.containers.insert(
                        key.clone(),
                        Running {
                            id,
                            restarts: 0,
                            started: std::time::Instant::now(),
                        },
                    );
                }
                let id = self.containers[&key].id.clone();
                let st = self.status_of(&id).await?;
                if st.state() != cri::ContainerState::ContainerExited {
                    self.report(pod, None).await?;
                    return Ok(false);
                }
            }
            self.init_done = true;
        }
        let mut problem = None;
        for c in &spec.containers {
            let attempt = match self.containers.get(&c.name).cloned() {
                None => Some(0),
                Some(r) => {
                    let st = self.status_of(&r.id).await?;
                    let policy = spec.restart_policy.as_deref().unwrap_or("Always");
                    let restart = st.state() == cri::ContainerState::ContainerExited
                        && (policy == "Always" || (policy == "OnFailure" && st.exit_code != 0));
                    restart.then_some(r.restarts as u32 + 1)
                }
            };
            let Some(attempt) = attempt else { continue };
            if let Some(p) = self.backing_off(&c.name) {
                problem = Some(p);
                continue;
            }
            if self.adopt(pod, c).await {
                continue;
            }
            if let Err(e) = self.start_attempt(pod, c, attempt).await {
                let message = e.to_string();
                self.back_off(&c.name, "CreateContainerError", &message);
                problem = Some(("CreateContainerError", message));
            }
        }
        self.report(pod, problem).await?;
        Ok(false)
    }

    /// A container of the Pod that runs although its start call failed (the call timed
    /// out while the runtime went on): taken as the running one, as kubelet's PLEG finds it.
    async fn adopt(&mut self, pod: &Pod, c: &Container) -> bool {
        if !self.next_attempt.contains_key(&c.name) {
            return false; // never failed: nothing unseen can run
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let Ok(all) = self.cri.clone().containers().await else {
            return false;
        };
        let running = all.into_iter().find(|x| {
            x.state() == cri::ContainerState::ContainerRunning
                && x.labels.get("io.kubernetes.pod.uid") == Some(&uid)
                && x.metadata.as_ref().is_some_and(|m| m.name == c.name)
                && !self.containers.values().any(|r| r.id == x.id)
        });
        let Some(found) = running else {
            return false;
        };
        let attempt = found.metadata.as_ref().map_or(0, |m| m.attempt);
        tracing::info!(pod = ?pod.metadata.name, container = %c.name, id = %found.id,
            "a container whose start failed runs: adopted");
        self.containers.insert(
            c.name.clone(),
            Running {
                id: found.id,
                restarts: attempt as i32,
                started: std::time::Instant::now(),
            },
        );
        true
    }

    /// Removes every sandbox of the Pod the runtime holds (after a failed creation).
    async fn remove_sandboxes_of(&mut self, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let mut cri = self.cri.clone();
        let Ok(list) = cri
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await
        else {
            return;
        };
        for s in list.into_inner().items {
            if s.metadata.as_ref().is_some_and(|m| m.uid == uid) {
                let _ = cri.remove_pod(&s.id).await;
            }
        }
    }

    async fn handler(&self, pod: &Pod) -> anyhow::Result<String> {
        let Some(rc) = pod.spec.as_ref().and_then(|s| s.runtime_class_name.clone()) else {
            return Ok(String::new());
        };
        let rcs: Api<k8s_openapi::api::node::v1::RuntimeClass> = Api::all(self.client.clone());
        let rc = rcs
            .get(&rc)
            .await
            .map_err(|e| anyhow::anyhow!("RuntimeClass {rc:?}: {e}"))?;
        Ok(rc.handler)
    }

    async fn start_sandbox(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let api_backed = crate::kubelet_projected::fetch(&self.client, pod).await?;
        self.volume_dirs = crate::kubelet_volumes::set_up(&self.cfg.volumes, pod, &api_backed)?;
        let spec = pod.spec.clone().unwrap_or_default();
        let m = &pod.metadata;
        let (ns, name, uid) = (
            m.namespace.clone().unwrap_or_default(),
            m.name.clone().unwrap_or_default(),
            m.uid.clone().unwrap_or_default(),
        );
        let log_dir = self.cfg.logs_root.join(format!("{ns}_{name}_{uid}"));
        std::fs::create_dir_all(&log_dir)?;
        let mut labels: HashMap<String, String> =
            m.labels.clone().unwrap_or_default().into_iter().collect();
        labels.insert("io.kubernetes.pod.name".into(), name.clone());
        labels.insert("io.kubernetes.pod.namespace".into(), ns.clone());
        labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
        // As kubelet does: the Pod's annotations as they are, nothing added.
        let annotations: HashMap<String, String> = m
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.clone(),
                uid: uid.clone(),
                namespace: ns,
                attempt: self.sandbox_attempt,
            }),
            // A host-network Pod keeps the node's hostname (its UTS namespace is the node's).
            hostname: if spec.host_network == Some(true) {
                String::new()
            } else {
                name
            },
            log_directory: log_dir.display().to_string(),
            labels,
            annotations,
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    // A `hostUsers: false` Pod gets its own user namespace and id range.
                    namespace_options: Some(cri::NamespaceOption {
                        userns_options: (spec.host_users == Some(false)).then(|| {
                            crate::kubelet_pod::user_namespace(
                                self.cfg.user_namespaces.allocate(&uid),
                            )
                        }),
                        ..crate::kubelet_pod::namespaces(&spec)
                    }),
                    privileged: crate::kubelet_pod::any_privileged(&spec),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let handler = self.handler(pod).await?;
        let mut cri = self.cri.clone();
        let mut rt = cri.runtime.clone();
        // As kubelet: a Pod in its own user namespace only on a runtime handler that says
        // it supports them (containerd 1.6 says nothing and would run it in the node's).
        if spec.host_users == Some(false) {
            let status = self
                .cfg
                .runtime_request_timeout
                .within(
                    "Status",
                    Duration::ZERO,
                    rt.status(cri::StatusRequest { verbose: false }),
                )
                .await?;
            let supported = status.runtime_handlers.iter().any(|h| {
                h.name == handler && h.features.as_ref().is_some_and(|f| f.user_namespaces)
            });
            anyhow::ensure!(
                supported,
                "the runtime handler {handler:?} does not support user namespaces (spec.hostUsers: false)"
            );
        }
        let id = self
            .cfg
            .runtime_request_timeout
            .within(
                "RunPodSandbox",
                Duration::ZERO,
                rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                    config: Some(config.clone()),
                    runtime_handler: handler,
                }),
            )
            .await?
            .pod_sandbox_id;
        // A Pod on the host network has the node's address.
        let ip = if spec.host_network == Some(true) {
            self.cfg.node_ip.clone()
        } else {
            cri.sandbox_ip(&id).await?
        };
        self.sandbox = Some((id, config, ip));
        Ok(())
    }

    /// Starts `c` under attempt `attempt`, or a later one when creates failed before (a
    /// retry never reuses the name of a container the runtime still holds, as in kubelet).
    async fn start_attempt(
        &mut self,
        pod: &Pod,
        c: &Container,
        attempt: u32,
    ) -> anyhow::Result<()> {
        let attempt = attempt.max(self.next_attempt.get(&c.name).copied().unwrap_or(0));
        match self.start_container(pod, c, attempt).await {
            Ok(id) => {
                let restarts = attempt as i32;
                self.containers.insert(
                    c.name.clone(),
                    Running {
                        id,
                        restarts,
                        started: std::time::Instant::now(),
                    },
                );
                Ok(())
            }
            Err(e) => {
                self.next_attempt.insert(c.name.clone(), attempt + 1);
                Err(e)
            }
        }
    }

    async fn start_container(
        &mut self,
        pod: &Pod,
        c: &Container,
        attempt: u32,
    ) -> anyhow::Result<String> {
        let (sandbox_id, sandbox_config, _) = self
            .sandbox
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no sandbox"))?;
        let image = c.image.clone().unwrap_or_default();
        let vars = crate::kubelet_volumes::environment(pod, c);
        let mounts =
            crate::kubelet_volumes::mounts(c, &self.cfg.volumes, &self.volume_dirs, &vars)?;
        let api = self.cfg.api_server;
        let service = [
            ("KUBERNETES_SERVICE_HOST".to_owned(), api.ip().to_string()),
            ("KUBERNETES_SERVICE_PORT".to_owned(), api.port().to_string()),
            (
                "KUBERNETES_SERVICE_PORT_HTTPS".to_owned(),
                api.port().to_string(),
            ),
        ];
        let env = service
            .into_iter()
            .chain(vars)
            .map(|(key, value)| cri::KeyValue { key, value })
            .collect();
        let shares = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("cpu"))
            .map(|q| cpu_shares(&q.0))
            .unwrap_or(2);
        let m = &pod.metadata;
        let labels = HashMap::from([
            ("io.kubernetes.container.name".to_owned(), c.name.clone()),
            (
                "io.kubernetes.pod.name".to_owned(),
                m.name.clone().unwrap_or_default(),
            ),
            (
                "io.kubernetes.pod.namespace".to_owned(),
                m.namespace.clone().unwrap_or_default(),
            ),
            (
                "io.kubernetes.pod.uid".to_owned(),
                m.uid.clone().unwrap_or_default(),
            ),
        ]);
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: c.name.clone(),
                attempt,
            }),
            image: Some(cri::ImageSpec {
                image: image.clone(),
                ..Default::default()
            }),
            command: c.command.clone().unwrap_or_default(),
            args: c.args.clone().unwrap_or_default(),
            working_dir: c.working_dir.clone().unwrap_or_default(),
            envs: env,
            mounts,
            labels,
            log_path: format!("{}/{attempt}.log", c.name),
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(cri::LinuxContainerResources {
                    cpu_shares: shares,
                    ..Default::default()
                }),
                security_context: Some(crate::kubelet_pod::security_context(
                    &pod.spec.clone().unwrap_or_default(),
                    c,
                    self.sandbox.as_ref().and_then(|(_, sb, _)| {
                        sb.linux
                            .as_ref()?
                            .security_context
                            .as_ref()?
                            .namespace_options
                            .as_ref()?
                            .userns_options
                            .clone()
                    }),
                )),
            }),
            ..Default::default()
        };
        let mut cri = self.cri.clone();
        let present = cri
            .images
            .image_status(cri::ImageStatusRequest {
                image: Some(cri::ImageSpec {
                    image: image.clone(),
                    ..Default::default()
                }),
                verbose: false,
            })
            .await?
            .into_inner()
            .image
            .is_some();
        anyhow::ensure!(
            present,
            "image {image:?} is not present on the node (nothing can be pulled here)"
        );
        let timeout = self.cfg.runtime_request_timeout.clone();
        let id = timeout
            .within(
                "CreateContainer",
                Duration::ZERO,
                cri.runtime.create_container(cri::CreateContainerRequest {
                    pod_sandbox_id: sandbox_id,
                    config: Some(config),
                    sandbox_config: Some(sandbox_config),
                }),
            )
            .await?
            .container_id;
        timeout
            .within(
                "StartContainer",
                Duration::ZERO,
                cri.runtime.start_container(cri::StartContainerRequest {
                    container_id: id.clone(),
                }),
            )
            .await?;
        Ok(id)
    }

    async fn status_of(&self, id: &str) -> anyhow::Result<cri::ContainerStatus> {
        self.cri.clone().container_status(id).await
    }

    /// Builds and, when it changed, writes the Pod's status.
    async fn report(&mut self, pod: &Pod, problem: Option<(&str, String)>) -> anyhow::Result<()> {
        let spec = pod.spec.clone().unwrap_or_default();
        let mut statuses = Vec::new();
        let (mut running, mut succeeded, mut failed) = (0, 0, 0);
        for c in &spec.containers {
            let Some(r) = self.containers.get(&c.name).cloned() else {
                let (reason, message) = problem
                    .clone()
                    .unwrap_or(("ContainerCreating", String::new()));
                // Failed attempts count as restarts, as kubelet counts its containers' attempts.
                let attempts = self.next_attempt.get(&c.name).copied().unwrap_or(0);
                statuses.push(json!({"name": c.name, "ready": false, "started": false, "restartCount": attempts, "image": c.image,
                    "imageID": "", "state": {"waiting": {"reason": reason, "message": message}}}));
                continue;
            };
            let st = self.status_of(&r.id).await?;
            let ts = crate::clock::from_unix_nanos;
            let state = match st.state() {
                cri::ContainerState::ContainerRunning => {
                    running += 1;
                    json!({"running": {"startedAt": ts(st.started_at)}})
                }
                cri::ContainerState::ContainerExited => {
                    if st.exit_code == 0 {
                        succeeded += 1
                    } else {
                        failed += 1
                    }
                    json!({"terminated": {"exitCode": st.exit_code, "reason": if st.reason.is_empty() { "Completed".to_owned() } else { st.reason.clone() },
                        "message": st.message, "startedAt": ts(st.started_at), "finishedAt": ts(st.finished_at), "containerID": format!("containerd://{}", r.id)}})
                }
                _ => json!({"waiting": {"reason": "ContainerCreating"}}),
            };
            let running_now = st.state() == cri::ContainerState::ContainerRunning;
            let ready = if running_now {
                let ip = self
                    .sandbox
                    .as_ref()
                    .map(|s| s.2.clone())
                    .unwrap_or_default();
                let mut cri = self.cri.clone();
                let (ready, alive) = self.probes.probe(c, &r.id, r.started, &ip, &mut cri).await;
                if !alive {
                    // Liveness failed: kubelet kills the container; the restart policy
                    // brings it back.
                    tracing::info!(pod = ?pod.metadata.name, container = %c.name, "liveness probe failed; restarting");
                    let _ = cri
                        .runtime
                        .stop_container(cri::StopContainerRequest {
                            container_id: r.id.clone(),
                            timeout: spec.termination_grace_period_seconds.unwrap_or(30),
                        })
                        .await;
                    self.probes.reset(&c.name);
                }
                ready && alive
            } else {
                false
            };
            statuses.push(json!({"name": c.name, "ready": ready, "started": ready, "restartCount": r.restarts, "image": c.image,
                "imageID": st.image_ref, "containerID": format!("containerd://{}", r.id), "state": state}));
        }
        let total = spec.containers.len();
        let policy = spec.restart_policy.as_deref().unwrap_or("Always");
        let phase = if running == total && total > 0 {
            "Running"
        } else if policy != "Always" && succeeded + failed == total && total > 0 {
            if failed > 0 { "Failed" } else { "Succeeded" }
        } else if running > 0 || succeeded + failed > 0 {
            "Running"
        } else {
            "Pending"
        };
        let all_ready =
            running == total && total > 0 && statuses.iter().all(|s| s["ready"] == json!(true));
        let t = now();
        let cond = |ty: &str, ok: bool| json!({"type": ty, "status": if ok { "True" } else { "False" }, "lastProbeTime": null, "lastTransitionTime": t});
        let ip = self
            .sandbox
            .as_ref()
            .map(|s| s.2.clone())
            .unwrap_or_default();
        let mut status = json!({
            "phase": phase, "hostIP": self.cfg.node_ip, "hostIPs": [{"ip": self.cfg.node_ip}], "startTime": self.started_at,
            "conditions": [cond("PodScheduled", true), cond("Initialized", self.init_done), cond("ContainersReady", all_ready), cond("Ready", all_ready)],
            "containerStatuses": statuses, "qosClass": "BestEffort",
        });
        if !ip.is_empty() {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        // Timestamps of conditions change on every pass; compare without them.
        let mut cmp = status.clone();
        if let Some(cs) = cmp["conditions"].as_array_mut() {
            for c in cs {
                c["lastTransitionTime"] = Value::Null;
            }
        }
        if cmp == self.last_status {
            return Ok(());
        }
        self.pods(pod)
            .patch_status(
                pod.metadata.name.as_deref().unwrap_or_default(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await?;
        self.last_status = cmp;
        Ok(())
    }

    /// Stops the Pod's containers with its grace period, removes its sandbox, reports the
    /// containers terminated and confirms the deletion with grace period 0.
    async fn kill(&mut self, pod: &Pod) -> anyhow::Result<()> {
        self.stop_all(pod).await?;
        let name = pod.metadata.name.clone().unwrap_or_default();
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.pods(pod).delete(&name, &dp).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Stops the Pod's containers with its grace period and removes its sandbox.
    async fn stop_all(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let grace = pod
            .metadata
            .deletion_grace_period_seconds
            .unwrap_or(30)
            .max(0);
        let ids: Vec<String> = self.containers.values().map(|r| r.id.clone()).collect();
        {
            let cri = self.cri.clone();
            // Stop containers in parallel, each with the full grace period, as kubelet does
            // (its CRI deadline then is the runtime request timeout plus the grace period).
            let stops = ids.iter().map(|id| {
                let mut rt = cri.runtime.clone();
                let id = id.clone();
                let timeout = self.cfg.runtime_request_timeout.clone();
                async move {
                    timeout
                        .within(
                            "StopContainer",
                            Duration::from_secs(grace as u64),
                            rt.stop_container(cri::StopContainerRequest {
                                container_id: id,
                                timeout: grace,
                            }),
                        )
                        .await
                }
            });
            for r in futures::future::join_all(stops).await {
                if let Err(error) = r {
                    tracing::warn!(%error, "stop container failed");
                }
            }
        }
        if !ids.is_empty() {
            let _ = self.report(pod, None).await;
        }
        // The sandbox is forgotten only once its removal succeeded (a retry removes it).
        if let Some((id, _, _)) = self.sandbox.clone() {
            let mut cri = self.cri.clone();
            cri.remove_pod(&id).await?;
            self.sandbox = None;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        crate::kubelet_volumes::tear_down(&self.cfg.volumes, &uid);
        self.cfg.user_namespaces.release(&uid);
        Ok(())
    }
}

/// CPU shares for a CPU request (`500m`, `2`), as kubelet computes them.
pub fn cpu_shares(q: &str) -> i64 {
    let milli = match q.strip_suffix('m') {
        Some(m) => m.parse::<i64>().unwrap_or(0),
        None => (q.parse::<f64>().unwrap_or(0.0) * 1000.0) as i64,
    };
    (milli * 1024 / 1000).max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cri_call_past_the_runtime_request_timeout_fails_with_deadline_exceeded() {
        let t = RuntimeRequestTimeout::new(Duration::from_millis(50));
        let started = std::time::Instant::now();
        let never = std::future::pending::<Result<tonic::Response<()>, tonic::Status>>();
        let err = t
            .within("StartContainer", Duration::ZERO, never)
            .await
            .expect_err("a call that never answers must give up");
        assert!(
            err.to_string().contains("StartContainer")
                && err.to_string().contains("DeadlineExceeded"),
            "{err}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        // A stop's grace period comes on top; a quick answer passes through.
        t.set(Duration::from_millis(10));
        let slow = async {
            tokio::time::sleep(Duration::from_millis(60)).await;
            Ok::<_, tonic::Status>(tonic::Response::new(7))
        };
        let v = t
            .within("StopContainer", Duration::from_millis(200), slow)
            .await
            .expect("within timeout plus grace");
        assert_eq!(v, 7);
        let refused = async { Err::<tonic::Response<()>, _>(tonic::Status::unknown("refused")) };
        let err = t
            .within("CreateContainer", Duration::ZERO, refused)
            .await
            .expect_err("the runtime's error passes through");
        assert!(err.to_string().contains("refused"), "{err}");
    }

    #[test]
    fn cpu_shares_follow_kubelet() {
        assert_eq!(super::cpu_shares("1"), 1024);
        assert_eq!(super::cpu_shares("500m"), 512);
        assert_eq!(super::cpu_shares("1m"), 2);
    }
}
