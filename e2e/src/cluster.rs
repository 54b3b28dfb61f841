//! The local test cluster: the test API server, and per node a network namespace joined
//! to the others by veth through a bridge, its own containerd (with the `podmig` runtime
//! handler), the podmig node daemon and a kubelet stand-in; plus a trivial scheduler and
//! the Deployment/ReplicaSet/DaemonSet controllers (`workloads`).
//! Everything it makes is recorded in `<dir>/state.json` so `cluster down` can remove it
//! even after a crash.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::json;

use crate::{
    apiserver::{ApiServer, Options, auth::User},
    containerd::{Containerd, ContainerdOptions, ContainerdVersion},
    daemon::{DaemonOptions, NodeDaemon},
    kubelet::{self, KubeletConfig},
    kubelet_logs,
    node_fs::NodeFs,
    paths,
};

/// The scheduler's `KubeSchedulerConfiguration` in the cluster's directory
/// (`cluster up --scheduler-config` copies one there; re-read on every scheduling pass).
pub const SCHEDULER_CONFIG: &str = "scheduler-config.yaml";

/// The chart's daemon CA, once the chart is installed (relative to the cluster directory).
const CHART_CA: &str = "chart-ca.crt";

/// Where a node's runtime hook socket is, as the node sees it (the chart's `node.runDir`).
pub const HOOK_SOCKET: &str = "/run/podmig/hook.sock";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs `ip` (or another command) and fails with its stderr.
fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn quiet(program: &str, args: &[&str]) {
    let _ = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Addresses and names of one cluster's network.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Network {
    /// Bridge in the root namespace.
    pub bridge: String,
    /// Second octet of the cluster's 10.x.0.0/16.
    pub octet: u32,
    /// Name prefix of netns and veths.
    pub prefix: String,
}

impl Network {
    /// Names not in use: a bridge that exists belongs to another live cluster (another
    /// test process on this machine), whose "leftovers" `up` would otherwise remove.
    fn new() -> Self {
        let start = std::process::id() + NEXT.fetch_add(1, Ordering::SeqCst) * 7;
        let k = (0..90)
            .map(|j| (start + j) % 90)
            .find(|k| !std::path::Path::new(&format!("/sys/class/net/pmc{k}")).exists())
            .unwrap_or(start % 90);
        Self {
            bridge: format!("pmc{k}"),
            octet: 150 + k,
            prefix: format!("pmc{k}"),
        }
    }
    /// The bridge's (API server's) address.
    pub fn gateway(&self) -> String {
        format!("10.{}.0.1", self.octet)
    }
    /// Node `i`'s address.
    pub fn node_ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.octet, 10 + i)
    }
    /// Node `i`'s Pod subnet.
    pub fn pod_cidr(&self, i: usize) -> String {
        format!("10.{}.{}.0/24", self.octet, i + 1)
    }
    /// The /24 of Services' ClusterIPs (its first three octets).
    pub fn service_range(&self) -> [u8; 3] {
        [10, u8::try_from(self.octet).unwrap_or(150), 200]
    }
    /// The service proxy's iptables chain (per cluster: the host's tables are shared).
    pub fn service_chain(&self) -> String {
        format!("PMSVC-{}", self.prefix)
    }
    /// Node `i`'s network namespace.
    pub fn netns(&self, i: usize) -> String {
        format!("{}-n{i}", self.prefix)
    }
    fn veth(&self, i: usize) -> String {
        format!("{}n{i}", self.prefix)
    }

    fn create_bridge(&self) -> anyhow::Result<()> {
        sh("ip", &["link", "add", &self.bridge, "type", "bridge"])?;
        sh(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", self.gateway()),
                "dev",
                &self.bridge,
            ],
        )?;
        sh("ip", &["link", "set", &self.bridge, "up"])?;
        // Node to node traffic is routed through the bridge's host, like a top-of-rack
        // router; hosts default to not forwarding.
        sh("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
    }

    fn create_node(&self, i: usize, nodes: usize) -> anyhow::Result<()> {
        let (ns, veth, ip) = (self.netns(i), self.veth(i), self.node_ip(i));
        sh("ip", &["netns", "add", &ns])?;
        sh(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        sh("ip", &["link", "set", &veth, "master", &self.bridge, "up"])?;
        sh(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
        )?;
        sh("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        sh(
            "ip",
            &["-n", &ns, "route", "add", "default", "via", &self.gateway()],
        )?;
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        // The root namespace routes each node's Pod subnet to that node.
        sh("ip", &["route", "replace", &self.pod_cidr(i), "via", &ip])?;
        let _ = nodes;
        Ok(())
    }

    /// The Pod network namespaces (`cni-*`, made by containerd's CNI) holding an address
    /// of this cluster's Pod subnets: found by address, since their names say nothing of
    /// the cluster. Read while the nodes' namespaces exist (a Pod's `eth0` goes with them).
    pub fn pod_namespaces(&self, nodes: usize) -> Vec<String> {
        let listed = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let subnets: Vec<String> = (0..nodes)
            .map(|i| format!("inet 10.{}.{}.", self.octet, i + 1))
            .collect();
        listed
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|n| n.starts_with("cni-"))
            .filter(|n| {
                Command::new("ip")
                    .args(["-n", n, "-4", "-o", "addr"])
                    .output()
                    .is_ok_and(|o| {
                        let addrs = String::from_utf8_lossy(&o.stdout);
                        subnets.iter().any(|s| addrs.contains(s.as_str()))
                    })
            })
            .map(str::to_owned)
            .collect()
    }

    /// Removes namespaces, veths, routes and the bridge (whatever of them exists), and
    /// any Pod network namespace of the cluster that containerd left behind.
    pub fn remove(&self, nodes: usize) {
        for ns in self.pod_namespaces(nodes) {
            tracing::warn!(netns = %ns, "removing a Pod network namespace containerd left");
            quiet("ip", &["netns", "del", &ns]);
        }
        for i in 0..nodes {
            quiet("ip", &["route", "del", &self.pod_cidr(i)]);
            quiet("ip", &["netns", "del", &self.netns(i)]);
            quiet("ip", &["link", "del", &self.veth(i)]);
        }
        quiet("ip", &["link", "del", &self.bridge]);
    }
}

/// What `state.json` records.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct State {
    network: Network,
    nodes: usize,
    pids: Vec<u32>,
    /// The nodes' checkpoint directory (on tmpfs, outside the cluster directory).
    #[serde(default)]
    checkpoints: Option<PathBuf>,
    /// Each node's containerd.
    #[serde(default)]
    containerd: Vec<ContainerdVersion>,
}

/// One node of the cluster.
pub struct ClusterNode {
    /// Node name (`node-0`).
    pub name: String,
    /// Address.
    pub ip: String,
    /// Network namespace.
    pub netns: String,
    /// containerd (dropped first).
    pub containerd: Containerd,
    /// The node's own file system (its mount namespace and root directory).
    pub fs: NodeFs,
    /// The podmig node daemon.
    pub daemon: NodeDaemon,
    kubelet: tokio::task::JoinHandle<()>,
    logs: Option<tokio::task::JoinHandle<()>>,
    /// The kubelet stand-in's `--runtime-request-timeout` (a test may shorten it).
    pub runtime_request_timeout: kubelet::RuntimeRequestTimeout,
}

/// A running cluster, torn down when dropped.
pub struct Cluster {
    /// Its directory.
    pub dir: PathBuf,
    /// Network layout.
    pub network: Network,
    /// Nodes.
    pub nodes: Vec<ClusterNode>,
    /// The API server.
    pub apiserver: Option<ApiServer>,
    /// An admin client.
    pub client: kube::Client,
    scheduler: tokio::task::JoinHandle<()>,
    /// Deployment, ReplicaSet and DaemonSet controllers (kube-controller-manager's part).
    workloads: tokio::task::JoinHandle<()>,
    _checkpoints: tempfile::TempDir,
    /// A temporary parent directory the cluster owns (removed after the teardown).
    _tmp: Option<tempfile::TempDir>,
    /// Routes of Pod addresses kept across nodes.
    fabric: Option<crate::fabric::Fabric>,
    /// The EndpointSlice controller and the service proxy.
    services: [tokio::task::JoinHandle<()>; 2],
}

/// A kube client from a kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

fn write_state(dir: &Path, state: &State) -> anyhow::Result<()> {
    std::fs::write(dir.join("state.json"), serde_json::to_vec_pretty(state)?)?;
    Ok(())
}

impl Cluster {
    /// Brings up a cluster of `nodes` nodes in `dir` (created; must not hold a running cluster).
    /// Its nodes run the containerd `PODMIG_E2E_CONTAINERD` names (1 unless set).
    pub async fn up(dir: &Path, nodes: usize) -> anyhow::Result<Self> {
        Self::up_with(dir, nodes, &ContainerdVersion::from_env()?).await
    }

    /// Brings up a cluster whose node `i` runs containerd `versions[i % len]`.
    pub async fn up_with(
        dir: &Path,
        nodes: usize,
        versions: &[ContainerdVersion],
    ) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(dir)?;
        let network = Network::new();
        let versions: Vec<ContainerdVersion> = (0..nodes)
            .map(|i| {
                versions
                    .get(i % versions.len().max(1))
                    .copied()
                    .unwrap_or_default()
            })
            .collect();
        let mut state = State {
            network: network.clone(),
            nodes,
            pids: vec![std::process::id()],
            checkpoints: None,
            containerd: versions.clone(),
        };
        write_state(dir, &state)?;
        network.remove(nodes); // leftovers of a crashed run with the same names
        network.create_bridge()?;
        for i in 0..nodes {
            network.create_node(i, nodes)?;
        }
        let fabric = crate::fabric::Fabric::start(&network, nodes, dir)?;
        let apiserver = ApiServer::start(Options {
            listen: format!("{}:6443", network.gateway()).parse()?,
            extra_sans: vec![],
            dir: dir.join("apiserver"),
            bookmark_interval: Duration::from_secs(5),
        })
        .await?;
        apiserver.api.set_service_range(network.service_range());
        let client = client_from(&apiserver.kubeconfig).await?;
        bootstrap(&client).await?;
        let scheduler = {
            let path = dir.join("scheduler.kubeconfig");
            apiserver.kubeconfig_for(
                User {
                    name: "system:kube-scheduler".into(),
                    uid: "scheduler".into(),
                    groups: vec!["system:authenticated".into()],
                    ..Default::default()
                },
                &path,
            )?;
            let c = client_from(&path).await?;
            tokio::spawn(crate::scheduler::run(c, Some(dir.join(SCHEDULER_CONFIG))))
        };
        let workloads = tokio::spawn(crate::workloads::run(
            client.clone(),
            std::fs::read_to_string(&apiserver.ca)?,
        ));
        let slices = tokio::spawn(crate::services::run_endpoint_slices(client.clone()));
        let proxy = tokio::spawn(crate::services::run_proxy(
            client.clone(),
            network.service_chain(),
            std::iter::once(crate::services::ProxyTarget {
                netns: None,
                node_ip: None,
            })
            .chain((0..nodes).map(|i| crate::services::ProxyTarget {
                netns: Some(network.netns(i)),
                node_ip: Some(network.node_ip(i)),
            }))
            .collect(),
        ));
        let checkpoints = tempfile::Builder::new()
            .prefix("podmig-ckpt-")
            .tempdir_in(crate::paths::memory_dir())?;
        state.checkpoints = Some(checkpoints.path().to_path_buf());
        write_state(dir, &state)?;
        let mut cluster = Self {
            dir: dir.to_path_buf(),
            network: network.clone(),
            nodes: vec![],
            apiserver: Some(apiserver),
            client,
            scheduler,
            workloads,
            _checkpoints: checkpoints,
            _tmp: None,
            fabric: Some(fabric),
            services: [slices, proxy],
        };
        let tls = crate::pki::create(
            &dir.join("pki"),
            &(0..nodes)
                .map(|i| (format!("node-{i}"), network.node_ip(i)))
                .collect::<Vec<_>>(),
        )?;
        let kubelet_token = format!("kubelet-client-{}", uuid::Uuid::new_v4().simple());
        if let (Some(api), Some(first)) = (cluster.apiserver.as_ref(), tls.first()) {
            api.set_kubelet_client(&std::fs::read(&first.ca)?, kubelet_token.clone())?;
        }
        for (i, &version) in versions.iter().enumerate() {
            let name = format!("node-{i}");
            let ndir = dir.join(&name);
            std::fs::create_dir_all(&ndir)?;
            let ckpts = cluster._checkpoints.path().join(&name);
            let node_fs = tokio::task::block_in_place(|| NodeFs::create(&ndir))?;
            let netns = network.netns(i);
            let kc = ndir.join("kubelet.kubeconfig");
            let containerd = tokio::task::block_in_place(|| {
                Containerd::start_with(ContainerdOptions {
                    hook_socket: PathBuf::from(HOOK_SOCKET),
                    dir: Some(ndir.join("containerd")),
                    netns: Some(netns.clone()),
                    network: Some(("cni0".into(), network.pod_cidr(i))),
                    node_fs: Some(node_fs.clone()),
                    cni_kubeconfig: Some(kc.clone()),
                    version,
                })
            })?;
            track_pid_in(dir, containerd.pid())?;
            let api = cluster.apiserver.as_ref().context("api server")?;
            api.kubeconfig_for(
                User {
                    name: format!("system:node:{name}"),
                    uid: name.clone(),
                    groups: vec!["system:nodes".into(), "system:authenticated".into()],
                    ..Default::default()
                },
                &kc,
            )?;
            let daemon = tokio::task::block_in_place(|| {
                NodeDaemon::start_with(&DaemonOptions {
                    dir: ndir.join("daemon"),
                    checkpoints: ckpts.clone(),
                    runc_root: containerd.runc_root(),
                    kubeconfig: Some(kc.clone()),
                    netns: Some(netns.clone()),
                    node_name: Some(name.clone()),
                    tls: tls.get(i).cloned(),
                    supervise: true,
                    cluster_dir: Some(dir.to_path_buf()),
                    hook_socket: node_fs.host_path(HOOK_SOCKET),
                    node_fs: Some(node_fs.clone()),
                    checkpoint_budget_mib: None,
                    move_bandwidth_mibps: None,
                    runtime_request_timeout_ms: None,
                    runc_binary: Some(version.runc()),
                })
            })?;
            let kclient = client_from(&kc).await?;
            let cfg = KubeletConfig {
                node: name.clone(),
                node_ip: network.node_ip(i),
                pod_cidr: network.pod_cidr(i),
                cri_socket: containerd.socket(),
                logs_root: ndir.join("logs"),
                volumes: crate::kubelet_volumes::VolumeRoots::of(node_fs.clone()),
                api_server: api.addr,
                runtime_request_timeout: kubelet::RuntimeRequestTimeout::default(),
                runtime_version: version.runtime_version(),
                user_namespaces: Default::default(),
            };
            let runtime_request_timeout = cfg.runtime_request_timeout.clone();
            let logs = match tls.get(i) {
                Some(t) => {
                    let addr = format!("{}:{}", network.node_ip(i), kubelet_logs::KUBELET_PORT);
                    let listener = kubelet_logs::bind_in_netns(&netns, addr.parse()?)
                        .with_context(|| format!("kubelet log server on {addr}"))?;
                    let server = kubelet_logs::LogServer {
                        logs_root: cfg.logs_root.clone(),
                        token: kubelet_token.clone(),
                    };
                    Some(kubelet_logs::serve(listener, t, server).await?)
                }
                None => None,
            };
            let kubelet = tokio::spawn(async move {
                if let Err(error) = kubelet::run(kclient, cfg).await {
                    tracing::error!(%error, "kubelet stand-in stopped");
                }
            });
            cluster.nodes.push(ClusterNode {
                name,
                ip: network.node_ip(i),
                netns,
                containerd,
                fs: node_fs,
                daemon,
                kubelet,
                logs,
                runtime_request_timeout,
            });
        }
        cluster.wait_nodes_ready(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    /// Brings up a cluster in a fresh temporary directory it owns (tests).
    pub async fn up_temp(nodes: usize) -> anyhow::Result<Self> {
        Self::up_temp_with(nodes, &ContainerdVersion::from_env()?).await
    }

    /// A temporary cluster whose node `i` runs containerd `versions[i % len]`.
    pub async fn up_temp_with(
        nodes: usize,
        versions: &[ContainerdVersion],
    ) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("podmig-cluster-")
            .tempdir_in("/var/tmp")?;
        let mut c = Self::up_with(&tmp.path().join("c"), nodes, versions).await?;
        c._tmp = Some(tmp);
        Ok(c)
    }

    /// The CA the node daemons' HTTPS certificates are signed by.
    pub fn daemon_ca(&self) -> PathBuf {
        let chart = self.dir.join(CHART_CA);
        if chart.exists() {
            return chart;
        }
        self.dir.join("pki").join("ca.crt")
    }

    /// The migration API of node `i`'s daemon.
    pub fn daemon_url(&self, i: usize) -> String {
        format!(
            "https://{}:{}",
            self.network.node_ip(i),
            podmig_api::nodeapi::DEFAULT_API_PORT
        )
    }

    /// A bearer token for `user` (name, groups) that the API server accepts.
    pub fn token_for(&self, name: &str, groups: &[&str]) -> anyhow::Result<String> {
        let api = self.apiserver.as_ref().context("api server")?;
        Ok(api.tokens.issue(User {
            name: name.into(),
            uid: name.into(),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..Default::default()
        }))
    }

    /// The admin kubeconfig.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("apiserver").join("kubeconfig")
    }

    async fn wait_nodes_ready(&self, within: Duration) -> anyhow::Result<()> {
        let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
            kube::Api::all(self.client.clone());
        let deadline = Instant::now() + within;
        loop {
            let ready = nodes
                .list(&Default::default())
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .filter(|n| {
                            n.status
                                .as_ref()
                                .and_then(|s| s.conditions.as_ref())
                                .is_some_and(|c| {
                                    c.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                                })
                        })
                        .count()
                })
                .unwrap_or(0);
            if ready == self.nodes.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("only {ready} of {} nodes became Ready", self.nodes.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Runs `kubectl` with the admin kubeconfig; returns stdout, fails with stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        kubectl(&self.kubeconfig(), args)
    }

    /// Starts `podmig controller` against this cluster (admin credentials, Lease in
    /// `default`) as a tracked process; returns it and the port of its `/metrics`.
    pub fn start_controller(&self, identity: &str) -> anyhow::Result<(crate::process::Proc, u16)> {
        self.start_controller_as(identity, &self.kubeconfig(), "default")
    }

    /// Starts `podmig controller` serving the eviction webhook on a port of its own, and
    /// registers it as the chart does (`failure_policy`: `Ignore` or `Fail`), with the
    /// limits `extra` flags set (`--max-moves-per-node`, …). Returns it and the webhook's port.
    pub fn start_controller_with_webhook(
        &self,
        identity: &str,
        failure_policy: &str,
        extra: &[&str],
    ) -> anyhow::Result<(crate::process::Proc, u16)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let (cert, key) = self.issue_webhook_certificate(identity)?;
        let mut args: Vec<String> = vec![
            "--webhook-addr".into(),
            format!("127.0.0.1:{port}"),
            "--webhook-cert".into(),
            cert.display().to_string(),
            "--webhook-key".into(),
            key.display().to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let (proc, _) =
            self.start_controller_with(identity, &self.kubeconfig(), "default", &args)?;
        self.register_webhook(identity, port, failure_policy)?;
        Ok((proc, port))
    }

    /// Writes a new serving certificate for controller `identity`'s webhook (as a rotated
    /// Secret volume would): (certificate, key) paths.
    pub fn issue_webhook_certificate(&self, identity: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
        let certs = crate::apiserver::tls::Certs::generate(&["127.0.0.1".to_owned()])?;
        let dir = self.dir.join(format!("webhook-{identity}"));
        std::fs::create_dir_all(&dir)?;
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        // Key first, then the certificate: a reader sees a matching pair or the old one.
        std::fs::write(&key, &certs.key_pem)?;
        std::fs::write(&cert, &certs.cert_pem)?;
        Ok((cert, key))
    }

    /// Registers (again) the webhook of controller `identity` on `port`, trusting its
    /// current certificate.
    pub fn register_webhook(
        &self,
        identity: &str,
        port: u16,
        failure_policy: &str,
    ) -> anyhow::Result<()> {
        use base64::Engine;
        let cert = std::fs::read(self.dir.join(format!("webhook-{identity}")).join("tls.crt"))?;
        let config = serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
            "metadata": {"name": "podmig-eviction"},
            "webhooks": [{"name": "eviction.podmig.dev", "admissionReviewVersions": ["v1"],
                "sideEffects": "NoneOnDryRun", "failurePolicy": failure_policy, "timeoutSeconds": 10,
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                    "resources": ["pods/eviction"], "scope": "Namespaced"}],
                "clientConfig": {"url": format!("https://127.0.0.1:{port}/evict"),
                    "caBundle": base64::engine::general_purpose::STANDARD.encode(&cert)}}]});
        self.apply(&config.to_string())?;
        Ok(())
    }

    /// Starts `podmig controller` with the credentials of `kubeconfig` and its Lease in
    /// `lease_namespace` (as the chart runs it).
    pub fn start_controller_as(
        &self,
        identity: &str,
        kubeconfig: &Path,
        lease_namespace: &str,
    ) -> anyhow::Result<(crate::process::Proc, u16)> {
        self.start_controller_with(identity, kubeconfig, lease_namespace, &[])
    }

    /// [`Self::start_controller_as`] with more flags.
    pub fn start_controller_with(
        &self,
        identity: &str,
        kubeconfig: &Path,
        lease_namespace: &str,
        extra: &[String],
    ) -> anyhow::Result<(crate::process::Proc, u16)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let mut cmd = Command::new(crate::paths::bin("podmig"));
        cmd.args([
            "controller",
            "--lease-namespace",
            lease_namespace,
            "--identity",
            identity,
        ])
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{port}"))
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "info,kube=warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(
            self.dir.join(format!("controller-{identity}.log")),
        )?);
        Ok((crate::process::Proc::spawn("podmig controller", cmd)?, port))
    }

    /// Starts `podmig extender` on a port of its own, reading the cluster with the admin
    /// kubeconfig and calling the node daemons with `token` (which needs `create
    /// pods/migrate`), and configures the scheduler to call it for `filter`,
    /// `prioritize` and `preempt` (weight 1, not ignorable; `node_cache_capable` as given).
    pub fn start_extender(
        &self,
        token: &str,
        node_cache_capable: bool,
    ) -> anyhow::Result<crate::process::Proc> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let token_file = self.dir.join("extender.token");
        std::fs::write(&token_file, token)?;
        let mut cmd = Command::new(crate::paths::bin("podmig"));
        cmd.arg("extender")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--daemon-ca")
            .arg(self.daemon_ca())
            .arg("--token-file")
            .arg(&token_file)
            .env("KUBECONFIG", self.kubeconfig())
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("extender.log"))?);
        let proc = crate::process::Proc::spawn("podmig extender", cmd)?;
        self.configure_scheduler(&format!(
            "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\nextenders:\n- urlPrefix: http://127.0.0.1:{port}\n  filterVerb: filter\n  prioritizeVerb: prioritize\n  preemptVerb: preempt\n  weight: 1\n  ignorable: false\n  nodeCacheCapable: {node_cache_capable}\n"
        ))?;
        Ok(proc)
    }

    /// Gives the scheduler a `KubeSchedulerConfiguration` (its `extenders:`), read from its
    /// next pass on.
    pub fn configure_scheduler(&self, yaml: &str) -> anyhow::Result<()> {
        std::fs::write(self.dir.join(SCHEDULER_CONFIG), yaml)?;
        Ok(())
    }

    /// Records a process the cluster started in `state.json`, for `cluster down`.
    pub fn track_pid(&self, pid: Option<u32>) -> anyhow::Result<()> {
        track_pid_in(&self.dir, pid)
    }

    /// Installs podmig's CRDs (`helm/podmig/crds`).
    pub fn install_crds(&self) -> anyhow::Result<()> {
        let dir = crate::paths::repo_root().join("helm/podmig/crds");
        self.kubectl(&["apply", "-f", &dir.display().to_string()])?;
        Ok(())
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("kubectl stdin")?
            .write_all(yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates Migration `name` of Pod `pod` to node `to` (with `timeoutSeconds`) and
    /// waits for it to end (its timeout and a minute more); returns its status.
    pub async fn migrate(
        &self,
        name: &str,
        pod: &str,
        to: &str,
        timeout_seconds: u32,
    ) -> anyhow::Result<podmig_api::v1alpha1::MigrationStatus> {
        self.migrate_with(name, pod, to, timeout_seconds, "").await
    }

    /// [`Cluster::migrate`] with more of the Migration's spec (`extra`: YAML flow-mapping
    /// entries such as `strategy: lazy, maxDowntimeMs: 1`; empty for none).
    pub async fn migrate_with(
        &self,
        name: &str,
        pod: &str,
        to: &str,
        timeout_seconds: u32,
        extra: &str,
    ) -> anyhow::Result<podmig_api::v1alpha1::MigrationStatus> {
        let extra = if extra.is_empty() {
            String::new()
        } else {
            format!(", {extra}")
        };
        self.apply(&format!(
            "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec: {{podName: {pod}, targetNode: {to}, timeoutSeconds: {timeout_seconds}{extra}}}\n"
        ))?;
        let migs: kube::Api<podmig_api::v1alpha1::Migration> =
            kube::Api::default_namespaced(self.client.clone());
        let within = Duration::from_secs(u64::from(timeout_seconds) + 60);
        crate::wait::migration_ended(&migs, name, within).await
    }

    /// `helm install --wait podmig` of `chart` into `podmig-system` with the real Helm (the
    /// cluster's own RuntimeClass and containerd configuration kept: no node preparation) and podmig's image built from
    /// the binaries that run here: the node daemons the cluster started as processes stop
    /// and the chart's DaemonSet runs one daemon Pod per node in their place (privileged,
    /// host PID and network, the node's paths through hostPath volumes), the controller
    /// Deployment's two Pods lead through the Lease; `--wait` returns once all are Ready.
    /// From then on [`Cluster::daemon_ca`] is the chart's CA.
    pub async fn install_chart(&mut self, chart: &Path) -> anyhow::Result<()> {
        self.install_chart_with(chart, &["node.prepare.enabled=false"])
            .await
    }

    /// [`Cluster::install_chart`] with other values (`--set key=value` each).
    pub async fn install_chart_with(&mut self, chart: &Path, sets: &[&str]) -> anyhow::Result<()> {
        let images = self.dir.join("images");
        let bins = paths::bin("podmig").parent().context("bin dir")?.to_owned();
        let out = Command::new(paths::repo_root().join("scripts/build-images"))
            .arg("--podmig")
            .arg(&bins)
            .arg(&images)
            .output()
            .context("scripts/build-images --podmig")?;
        anyhow::ensure!(
            out.status.success(),
            "build-images --podmig: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tarball = images.join("podmig.tar").display().to_string();
        for n in &mut self.nodes {
            n.containerd.ctr(&["images", "import", &tarball])?;
            n.daemon.stop();
        }
        let out = Command::new("helm")
            .args(["install", "podmig"])
            .arg(chart)
            .args([
                "-n",
                "podmig-system",
                "--create-namespace",
                "--wait",
                "--timeout",
                "180s",
                "--set",
                "runtimeClass.create=false",
                "--set",
                "image.tag=latest",
                "--kubeconfig",
            ])
            .arg(self.kubeconfig())
            .args(sets.iter().flat_map(|s| ["--set", s]))
            .output()
            .context("running helm (scripts/setup installs it)")?;
        anyhow::ensure!(
            out.status.success(),
            "helm install: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.kubectl(&["get", "pods", "-n", "podmig-system", "-o", "wide"])
                .unwrap_or_default()
        );
        let ca = self.kubectl(&[
            "get",
            "secret",
            "podmig-node-ca",
            "-n",
            "podmig-system",
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ])?;
        use base64::Engine;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(ca.trim())
            .context("the chart's CA")?;
        std::fs::write(self.dir.join(CHART_CA), pem)?;
        Ok(())
    }

    /// Cuts node `i` off from the API server and every other node (its own namespace drops
    /// their packets both ways) until the returned guard is dropped. Its Pods' traffic,
    /// forwarded through the node, and the kubelet's, over local sockets, go on.
    pub fn cut_off(&self, i: usize) -> anyhow::Result<Cut> {
        let netns = self.network.netns(i);
        let peers: Vec<String> = std::iter::once(self.network.gateway())
            .chain(
                (0..self.nodes.len())
                    .filter(|&j| j != i)
                    .map(|j| self.network.node_ip(j)),
            )
            .collect();
        let cut = Cut {
            netns,
            rules: peers
                .iter()
                .flat_map(|ip| {
                    [
                        vec!["INPUT".to_owned(), "-s".into(), ip.clone()],
                        vec!["OUTPUT".to_owned(), "-d".into(), ip.clone()],
                    ]
                })
                .collect(),
        };
        for r in &cut.rules {
            cut.iptables("-I", r)?;
        }
        Ok(cut)
    }

    /// The last `lines` lines of every node daemon's log, each under a `--- node-N daemon`
    /// header (for a failed check's report).
    pub fn daemon_log_tails(&self, lines: usize) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log = n.daemon.log();
                let all: Vec<&str> = log.lines().collect();
                format!(
                    "--- {} daemon\n{}",
                    n.name,
                    all[all.len().saturating_sub(lines)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills node `i`'s containerd (SIGKILL; shims and containers live on) and starts it
    /// again on the same state, as systemd would.
    pub fn kill_containerd(&mut self, i: usize) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(i).context("no such node")?;
        let pid = tokio::task::block_in_place(|| node.containerd.kill_and_restart())?;
        track_pid_in(&self.dir, pid)
    }

    /// Takes the API server down for `down` (every connection and watch dropped, every
    /// object kept) and brings it back on its address.
    pub async fn restart_apiserver(&mut self, down: Duration) -> anyhow::Result<()> {
        self.apiserver
            .as_mut()
            .context("no API server")?
            .restart(down)
            .await
    }

    /// CRIU page servers and lazy-pages daemons working in the nodes' checkpoint
    /// directories now (none once every move ended).
    pub fn criu_helpers(&self) -> Vec<u32> {
        podmig_cri_ext::stray::helpers_below(self._checkpoints.path())
    }

    /// The Pod network namespaces of this cluster now (see [`Network::pod_namespaces`]).
    pub fn pod_namespaces(&self) -> Vec<String> {
        self.network.pod_namespaces(self.nodes.len())
    }

    /// Stops everything and removes what the cluster made.
    pub fn down(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        self.scheduler.abort();
        self.workloads.abort();
        for t in &self.services {
            t.abort();
        }
        crate::services::remove(&self.network.service_chain(), None);
        for n in &self.nodes {
            n.kubelet.abort();
            if let Some(logs) = &n.logs {
                logs.abort();
            }
        }
        // A restore or dump that hangs would hold its shim and so containerd's stop.
        podmig_cri_ext::stray::kill_trees(&podmig_cri_ext::stray::runs_below(
            self._checkpoints.path(),
        ));
        // containerd first (its sandboxes go through CRI), then the daemons.
        let nodes = std::mem::take(&mut self.nodes);
        let count = nodes.len().max(self.network_nodes());
        drop(nodes);
        if let Some(api) = self.apiserver.take() {
            drop(api);
        }
        self.fabric = None;
        let stray = podmig_cri_ext::stray::kill_trees(&podmig_cri_ext::stray::users_of(
            self._checkpoints.path(),
        ));
        if !stray.is_empty() {
            tracing::warn!(pids = ?stray, "stopped CRIU and runc processes the daemons left");
        }
        self.network.remove(count);
        let mut mounts = crate::containerd::mounts_under(&self.dir);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            quiet("umount", &["-l", &m]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    fn network_nodes(&self) -> usize {
        std::fs::read(self.dir.join("state.json"))
            .ok()
            .and_then(|b| serde_json::from_slice::<State>(&b).ok())
            .map_or(0, |s| s.nodes)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A node cut off from the API server and the other nodes ([`Cluster::cut_off`]); the
/// link comes back when it is dropped.
pub struct Cut {
    netns: String,
    rules: Vec<Vec<String>>,
}

impl Cut {
    fn iptables(&self, op: &str, rule: &[String]) -> anyhow::Result<()> {
        let (chain, rest) = rule.split_first().context("empty rule")?;
        let status = crate::node_fs::node_command("iptables", Some(&self.netns), None)
            .args(["-w", op, chain])
            .args(rest)
            .args(["-j", "DROP"])
            .stderr(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "iptables {op} {rule:?} in {}", self.netns);
        Ok(())
    }

    /// Brings the link back.
    pub fn heal(self) {}
}

impl Drop for Cut {
    fn drop(&mut self) {
        for r in &self.rules {
            let _ = self.iptables("-D", r);
        }
    }
}

/// Runs kubectl against `kubeconfig`.
pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .context("running kubectl")?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// RBAC every cluster starts with: what nodes and the scheduler may do.
async fn bootstrap(client: &kube::Client) -> anyhow::Result<()> {
    let objects = [
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            "clusterroles",
            json!({"metadata": {"name": "system:node"}, "rules": [
            {"apiGroups": [""], "resources": ["pods", "pods/status", "nodes", "nodes/status", "events", "secrets", "configmaps", "services", "endpoints"], "verbs": ["*"]},
            {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["*"]},
            // kubelet asks for the bound tokens of its Pods' projected volumes.
            {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
            {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["*"]},
            // The podmig node daemon runs with the node's credentials here (in the chart:
            // its own ServiceAccount): it checks callers, hands over to peers, records moves.
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
            // The peer permission (hand-over, verdict, page tunnel): node daemons only.
            {"apiGroups": [""], "resources": ["nodes/handover"], "verbs": ["create"]},
            {"apiGroups": ["podmig.dev"], "resources": ["migrations"], "verbs": ["get", "list", "create"]},
            {"apiGroups": ["podmig.dev"], "resources": ["migratingpods"], "verbs": ["get"]}]}),
        ),
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            json!({"metadata": {"name": "system:node"},
            "subjects": [{"kind": "Group", "name": "system:nodes", "apiGroup": "rbac.authorization.k8s.io"}],
            "roleRef": {"kind": "ClusterRole", "name": "system:node", "apiGroup": "rbac.authorization.k8s.io"}}),
        ),
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            "clusterroles",
            json!({"metadata": {"name": "system:kube-scheduler"}, "rules": [
            {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": [""], "resources": ["pods/binding"], "verbs": ["create"]},
            {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["patch", "update"]}]}),
        ),
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            json!({"metadata": {"name": "system:kube-scheduler"},
            "subjects": [{"kind": "User", "name": "system:kube-scheduler", "apiGroup": "rbac.authorization.k8s.io"}],
            "roleRef": {"kind": "ClusterRole", "name": "system:kube-scheduler", "apiGroup": "rbac.authorization.k8s.io"}}),
        ),
        // Every authenticated user may ask what they may do (`kubectl auth can-i`), as
        // upstream's `system:basic-user` grants.
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            "clusterroles",
            json!({"metadata": {"name": "system:basic-user"}, "rules": [
            {"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}]}),
        ),
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            "clusterrolebindings",
            json!({"metadata": {"name": "system:basic-user"},
            "subjects": [{"kind": "Group", "name": "system:authenticated", "apiGroup": "rbac.authorization.k8s.io"}],
            "roleRef": {"kind": "ClusterRole", "name": "system:basic-user", "apiGroup": "rbac.authorization.k8s.io"}}),
        ),
        // The nodes' containerd has a `podmig` runtime handler.
        (
            "node.k8s.io/v1",
            "RuntimeClass",
            "runtimeclasses",
            json!({"metadata": {"name": podmig_api::RUNTIME_HANDLER}, "handler": podmig_api::RUNTIME_HANDLER}),
        ),
    ];
    for (api_version, kind, plural, mut obj) in objects {
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let ar = kube::api::ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: kind.into(),
            plural: plural.into(),
        };
        let api: kube::Api<kube::api::DynamicObject> = kube::Api::all_with(client.clone(), &ar);
        let obj: kube::api::DynamicObject = serde_json::from_value(obj)?;
        api.create(&Default::default(), &obj)
            .await
            .with_context(|| format!("bootstrap {kind}"))?;
    }
    Ok(())
}

/// Records a process started for the cluster in `dir`'s `state.json`, for `cluster down`.
pub fn track_pid_in(dir: &Path, pid: Option<u32>) -> anyhow::Result<()> {
    static WRITE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _serial = WRITE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = dir.join("state.json");
    let mut state: State = serde_json::from_slice(&std::fs::read(&path)?)?;
    state.pids.extend(pid);
    write_state(dir, &state)
}

/// `cluster down` for a directory: stops a running cluster and sweeps what a crashed one
/// left (processes, sandboxes, mounts, namespaces, links, the directory).
pub fn sweep(dir: &Path) -> anyhow::Result<()> {
    let Ok(bytes) = std::fs::read(dir.join("state.json")) else {
        let _ = std::fs::remove_dir_all(dir);
        return Ok(());
    };
    let state: State = serde_json::from_slice(&bytes)?;
    // The cluster's own process first: it tears down in order.
    if let Some(&main) = state.pids.first() {
        crate::process::signal(main, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Path::new(&format!("/proc/{main}")).exists()
            && Instant::now() < deadline
            && main != std::process::id()
        {
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for &pid in state.pids.iter().skip(1) {
        crate::process::signal(pid, libc::SIGKILL);
    }
    // Sandboxes of a crashed cluster: restart its containerd and let CRI remove them.
    for i in 0..state.nodes {
        let cdir = dir.join(format!("node-{i}")).join("containerd");
        if cdir.join("config.toml").exists() {
            let state_dir = NodeFs::of(&dir.join(format!("node-{i}")))
                .root
                .join("run/containerd");
            for pid in crate::containerd::shim_pids_in(&state_dir) {
                crate::process::signal(pid, libc::SIGKILL);
            }
            let netns = state.network.netns(i);
            let ns_alive = Path::new("/var/run/netns").join(&netns).exists();
            let node_fs = NodeFs::create(&dir.join(format!("node-{i}")))?;
            let restarted = Containerd::start_with(ContainerdOptions {
                hook_socket: dir.join("none.sock"),
                dir: Some(cdir.clone()),
                netns: ns_alive.then_some(netns),
                network: Some(("cni0".into(), state.network.pod_cidr(i))),
                node_fs: Some(node_fs),
                cni_kubeconfig: None,
                version: state.containerd.get(i).copied().unwrap_or_default(),
            });
            drop(restarted);
        }
    }
    for m in crate::containerd::mounts_under(dir) {
        quiet("umount", &["-l", &m]);
    }
    crate::services::remove(&state.network.service_chain(), None);
    state.network.remove(state.nodes);
    if let Some(c) = &state.checkpoints {
        podmig_cri_ext::stray::kill_trees(&podmig_cri_ext::stray::users_of(c));
        let _ = std::fs::remove_dir_all(c);
    }
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_file(dir.with_extension("log"));
    Ok(())
}

/// `cluster run`: brings the cluster up with podmig (as processes, or with `chart` the
/// chart's Pods), marks it ready, serves until SIGTERM or SIGINT.
pub async fn run_foreground(
    dir: &Path,
    nodes: usize,
    chart: bool,
    containerd: &[ContainerdVersion],
) -> anyhow::Result<()> {
    let mut cluster = Cluster::up_with(dir, nodes, containerd).await?;
    // podmig itself: the chart's Pods, or its CRDs and the controller as a process.
    let controller = if chart {
        cluster
            .install_chart(&paths::repo_root().join("helm/podmig"))
            .await?;
        None
    } else {
        tokio::task::block_in_place(|| cluster.install_crds())?;
        let c = cluster.start_controller("podmig-controller")?;
        // Recorded so that `cluster down` stops it even after this process crashed.
        cluster.track_pid(c.0.pid())?;
        Some(c)
    };
    std::fs::write(
        dir.join("ready"),
        cluster.kubeconfig().display().to_string(),
    )?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(controller);
    tokio::task::block_in_place(|| cluster.down());
    Ok(())
}

/// `cluster up`: starts `cluster run` detached, waits until it is ready, prints the kubeconfig.
pub fn up_background(
    dir: &Path,
    nodes: usize,
    chart: bool,
    containerd: &str,
) -> anyhow::Result<()> {
    if dir.join("state.json").exists() {
        bail!(
            "{} holds a cluster already; run `podmig-e2e cluster down --dir {}` first",
            dir.display(),
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)?;
    let log = std::fs::File::create(dir.with_extension("log"))?;
    let exe = std::env::current_exe()?;
    let mut child = Command::new("setsid")
        .arg(exe)
        .args(["cluster", "run", "--nodes", &nodes.to_string(), "--dir"])
        .arg(dir)
        .args(chart.then_some("--chart"))
        .args(["--containerd", containerd])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let within = Duration::from_secs(if chart { 300 } else { 60 });
    let deadline = Instant::now() + within;
    while !dir.join("ready").exists() {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the cluster failed to start ({status}); see {}",
                dir.with_extension("log").display()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the cluster did not become ready in {} s; see {}",
                within.as_secs(),
                dir.with_extension("log").display()
            );
        }
        #[allow(clippy::disallowed_methods)]
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("{}", dir.join("apiserver").join("kubeconfig").display());
    Ok(())
}
