//! A CRI client that plays kubelet: sandboxes and containers shaped the way kubelet
//! shapes them (per-container PID namespace, Pod log directory, runtime handler).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use anyhow::Context;
use k8s_cri::v1::{
    self as cri, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};
use tonic::transport::Channel;

/// What kubelet asks for by default: Pod network and IPC, a PID namespace per container
/// (which CRIU needs: it dumps a process tree with its own PID namespace).
pub fn kubelet_namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Pod as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

/// A Pod as the tests describe it.
#[derive(Debug, Clone)]
pub struct TestPod {
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod uid.
    pub uid: String,
    /// Pod annotations (the `podmig.dev/*` ones reach the OCI spec).
    pub annotations: HashMap<String, String>,
    /// Runtime handler (`podmig` for migratable Pods).
    pub runtime_handler: String,
    /// Directory for container logs.
    pub log_dir: PathBuf,
}

impl TestPod {
    /// A Pod `name` with uid `uid` under the `podmig` runtime handler.
    pub fn new(name: &str, uid: &str, logs_root: &Path) -> Self {
        // Its uid reaches podmig the way kubelet passes it: in the log directory's name.
        let annotations = HashMap::new();
        Self {
            name: name.into(),
            namespace: "default".into(),
            uid: uid.into(),
            annotations,
            runtime_handler: podmig_api::RUNTIME_HANDLER.into(),
            log_dir: logs_root.join(format!("default_{name}_{uid}")),
        }
    }

    /// Marks the Pod as the migration target of Pod `source_uid`.
    pub fn migrating_from(mut self, source_uid: &str) -> Self {
        self.annotations.insert(
            podmig_api::ANNOTATION_MIGRATE_FROM.into(),
            source_uid.into(),
        );
        self
    }

    /// Uses another runtime handler.
    pub fn with_handler(mut self, handler: &str) -> Self {
        self.runtime_handler = handler.into();
        self
    }

    fn namespaces() -> cri::NamespaceOption {
        kubelet_namespaces()
    }

    /// The sandbox configuration kubelet would send.
    pub fn sandbox_config(&self) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            hostname: self.name.clone(),
            log_directory: self.log_dir.display().to_string(),
            annotations: self.annotations.clone(),
            labels: HashMap::from([("io.kubernetes.pod.uid".to_owned(), self.uid.clone())]),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(Self::namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// A container as the tests describe it.
#[derive(Debug, Clone)]
pub struct TestContainer {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Command and arguments.
    pub command: Vec<String>,
}

impl TestContainer {
    /// The test app with `mem_mib` MiB of ballast.
    pub fn testapp(mem_mib: u64) -> Self {
        Self {
            name: "app".into(),
            image: crate::paths::TESTAPP_IMAGE.into(),
            command: vec![
                "/bin/testapp".into(),
                "--mem-mib".into(),
                mem_mib.to_string(),
            ],
        }
    }

    fn config(&self) -> cri::ContainerConfig {
        cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: self.name.clone(),
                attempt: 0,
            }),
            image: Some(cri::ImageSpec {
                image: self.image.clone(),
                ..Default::default()
            }),
            command: self.command.clone(),
            log_path: format!("{}/0.log", self.name),
            linux: Some(cri::LinuxContainerConfig {
                security_context: Some(cri::LinuxContainerSecurityContext {
                    namespace_options: Some(TestPod::namespaces()),
                    ..Default::default()
                }),
                // What kubelet sets for a Pod requesting one CPU.
                resources: Some(cri::LinuxContainerResources {
                    cpu_shares: 1024,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }
    }
}

/// A sandbox the tests created.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Sandbox id.
    pub id: String,
    /// What it was created from.
    pub pod: TestPod,
}

impl Sandbox {
    /// Path of a container's CRI log.
    pub fn log_path(&self, container: &str) -> PathBuf {
        self.pod.log_dir.join(format!("{container}/0.log"))
    }
}

/// CRI runtime and image clients on one containerd socket (cheap to clone: the clients
/// share one channel).
#[derive(Clone)]
pub struct Cri {
    /// RuntimeService.
    pub runtime: RuntimeServiceClient<Channel>,
    /// ImageService.
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to the CRI endpoint at `socket`.
    pub async fn connect(socket: &Path) -> anyhow::Result<Self> {
        let channel = podmig_cri_ext::connect(socket).await?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// RunPodSandbox.
    pub async fn run_pod(&mut self, pod: &TestPod) -> anyhow::Result<Sandbox> {
        std::fs::create_dir_all(&pod.log_dir)?;
        let resp = self
            .runtime
            .run_pod_sandbox(cri::RunPodSandboxRequest {
                config: Some(pod.sandbox_config()),
                runtime_handler: pod.runtime_handler.clone(),
            })
            .await
            .with_context(|| format!("RunPodSandbox {}", pod.name))?;
        Ok(Sandbox {
            id: resp.into_inner().pod_sandbox_id,
            pod: pod.clone(),
        })
    }

    /// CreateContainer (the step podmig-runc turns into a restore for migration targets).
    pub async fn create_container(
        &mut self,
        sandbox: &Sandbox,
        container: &TestContainer,
    ) -> Result<String, tonic::Status> {
        let resp = self
            .runtime
            .create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.id.clone(),
                config: Some(container.config()),
                sandbox_config: Some(sandbox.pod.sandbox_config()),
            })
            .await?;
        Ok(resp.into_inner().container_id)
    }

    /// StartContainer.
    pub async fn start_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.runtime
            .start_container(cri::StartContainerRequest {
                container_id: id.into(),
            })
            .await?;
        Ok(())
    }

    /// CreateContainer + StartContainer.
    pub async fn run_container(
        &mut self,
        sandbox: &Sandbox,
        container: &TestContainer,
    ) -> anyhow::Result<String> {
        let id = self.create_container(sandbox, container).await?;
        self.start_container(&id).await?;
        Ok(id)
    }

    /// The container's status as CRI reports it.
    pub async fn container_status(&mut self, id: &str) -> anyhow::Result<cri::ContainerStatus> {
        self.runtime
            .container_status(cri::ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .with_context(|| format!("no status for container {id}"))
    }

    /// The container's state as CRI reports it.
    pub async fn container_state(&mut self, id: &str) -> anyhow::Result<cri::ContainerState> {
        Ok(self.container_status(id).await?.state())
    }

    /// The sandbox's Pod IP.
    pub async fn pod_ip(&mut self, sandbox: &Sandbox) -> anyhow::Result<String> {
        let ip = self.sandbox_ip(&sandbox.id).await?;
        anyhow::ensure!(!ip.is_empty(), "sandbox {} has no IP", sandbox.id);
        Ok(ip)
    }

    /// The IP of sandbox `id` (empty when it has none, e.g. host network).
    pub async fn sandbox_ip(&mut self, id: &str) -> anyhow::Result<String> {
        let status = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner()
            .status
            .context("no sandbox status")?;
        Ok(status.network.map(|n| n.ip).unwrap_or_default())
    }

    /// Ids of all containers.
    pub async fn containers(&mut self) -> anyhow::Result<Vec<cri::Container>> {
        Ok(self
            .runtime
            .list_containers(cri::ListContainersRequest { filter: None })
            .await?
            .into_inner()
            .containers)
    }

    /// Ids of all sandboxes.
    pub async fn sandboxes(&mut self) -> anyhow::Result<Vec<String>> {
        Ok(self
            .runtime
            .list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })
            .await?
            .into_inner()
            .items
            .into_iter()
            .map(|s| s.id)
            .collect())
    }

    /// StopPodSandbox + RemovePodSandbox (containers, network namespace, CNI lease).
    pub async fn remove_pod(&mut self, id: &str) -> anyhow::Result<()> {
        self.runtime
            .stop_pod_sandbox(cri::StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await?;
        self.runtime
            .remove_pod_sandbox(cri::RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await?;
        Ok(())
    }

    /// The network namespace file of sandbox `id` (from its verbose status).
    pub async fn sandbox_netns(&mut self, id: &str) -> anyhow::Result<Option<PathBuf>> {
        let info = self
            .runtime
            .pod_sandbox_status(cri::PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            })
            .await?
            .into_inner()
            .info;
        let spec: serde_json::Value = info
            .get("info")
            .and_then(|i| serde_json::from_str(i).ok())
            .unwrap_or_default();
        Ok(spec["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .filter(|p| !p.is_empty())
            .map(PathBuf::from))
    }

    /// Removes every sandbox (test teardown), each even when another fails, and then the
    /// network namespaces of any the runtime could not tear down.
    pub async fn remove_all_sandboxes(&mut self) -> anyhow::Result<()> {
        let ids = self.sandboxes().await?;
        let mut netns = Vec::new();
        for id in &ids {
            if let Ok(Some(p)) = self.sandbox_netns(id).await {
                netns.push(p);
            }
        }
        let mut first_error = None;
        for id in &ids {
            if let Err(e) = self.remove_pod(id).await {
                first_error.get_or_insert(e);
            }
        }
        for p in netns.iter().filter(|p| p.exists()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(p)
                .stderr(std::process::Stdio::null())
                .status();
            let _ = std::fs::remove_file(p);
        }
        first_error.map_or(Ok(()), Err)
    }
}
