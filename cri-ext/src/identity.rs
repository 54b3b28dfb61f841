//! Who a container is, read from what runc has on disk: the OCI bundle's `config.json`
//! (at create) or runc's `state.json` (for later commands, whose command lines carry no
//! bundle). containerd's CRI plugin writes the Pod's identity into the OCI annotations.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
};

use podmig_api::{ANNOTATION_PREFIX, cri};
use serde::Deserialize;

use crate::{Error, Result, proto::hook::v1::ContainerIdentity};

/// The OCI annotations of a container, as found on disk.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Annotations(pub BTreeMap<String, String>);

#[derive(Deserialize)]
struct OciConfig {
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RuncState {
    config: RuncStateConfig,
}

#[derive(Deserialize)]
struct RuncStateConfig {
    #[serde(default)]
    labels: Vec<String>,
}

impl Annotations {
    /// Reads the annotations of an OCI bundle (`<bundle>/config.json`).
    pub fn from_bundle(bundle: &Path) -> Result<Self> {
        let path = bundle.join("config.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        let config: OciConfig =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source })?;
        Ok(Self(config.annotations))
    }

    /// Reads the annotations runc saved for a created container
    /// (`<root>/<id>/state.json`, where libcontainer keeps them as `key=value` labels).
    /// Also returns the bundle directory runc recorded.
    pub fn from_runc_state(root: &Path, id: &str) -> Result<(Self, Option<PathBuf>)> {
        let path = root.join(id).join("state.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
        let state: RuncState =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json { path, source })?;
        let mut map = BTreeMap::new();
        let mut bundle = None;
        for label in state.config.labels {
            if let Some((k, v)) = label.split_once('=') {
                if k == "bundle" {
                    bundle = Some(PathBuf::from(v));
                } else {
                    map.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        Ok((Self(map), bundle))
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// True for a Pod's sandbox (pause) container, which podmig never touches.
    pub fn is_sandbox(&self) -> bool {
        self.get(cri::CONTAINER_TYPE) == Some(cri::CONTAINER_TYPE_SANDBOX)
    }

    /// True when the container was created by a CRI runtime for a Pod.
    pub fn is_pod_container(&self) -> bool {
        self.get(cri::CONTAINER_TYPE).is_some()
    }

    /// Uid of the Pod, from what the runtime itself recorded: containerd's sandbox uid
    /// (1.7+), else the last `_`-separated part of the Pod log directory kubelet names
    /// `<ns>_<name>_<uid>`. Never from a Pod annotation: a Pod's creator sets those, and
    /// could claim to be another Pod.
    pub fn pod_uid(&self) -> Option<String> {
        self.get(cri::SANDBOX_UID)
            .map(str::to_owned)
            .or_else(|| {
                let dir = self.get(cri::SANDBOX_LOG_DIRECTORY)?;
                let last = Path::new(dir).file_name()?.to_str()?;
                last.rsplit_once('_').map(|(_, uid)| uid.to_owned())
            })
            .filter(|uid| !uid.is_empty())
    }

    /// [`Self::pod_uid`], else that of the container's sandbox under runc root `root`
    /// (containerd 1.6 writes the log directory into the sandbox's spec only).
    pub fn pod_uid_in(&self, root: &Path) -> Option<String> {
        self.pod_uid().or_else(|| {
            let sandbox = self.get(cri::SANDBOX_ID).filter(|id| !id.contains('/'))?;
            let (ann, _) = Self::from_runc_state(root, sandbox).ok()?;
            ann.pod_uid()
        })
    }

    /// The `podmig.dev/*` annotations.
    pub fn podmig(&self) -> HashMap<String, String> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(ANNOTATION_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// True when this container is the target of a migration (its Pod names a source).
    pub fn is_migration_target(&self) -> bool {
        self.get(podmig_api::ANNOTATION_MIGRATE_FROM)
            .is_some_and(|v| !v.is_empty())
    }

    /// The identity sent to the node daemon.
    pub fn identity(
        &self,
        container_id: &str,
        bundle: &Path,
        runc_root: &Path,
    ) -> ContainerIdentity {
        let s = |k| self.get(k).unwrap_or_default().to_owned();
        ContainerIdentity {
            container_id: container_id.to_owned(),
            pod_uid: self.pod_uid_in(runc_root).unwrap_or_default(),
            pod_name: s(cri::SANDBOX_NAME),
            pod_namespace: s(cri::SANDBOX_NAMESPACE),
            container_name: s(cri::CONTAINER_NAME),
            sandbox_id: s(cri::SANDBOX_ID),
            annotations: self.podmig(),
            bundle: bundle.display().to_string(),
            runc_root: runc_root.display().to_string(),
        }
    }
}

/// Finds the running application container `container` of Pod `pod_uid` among the
/// containers runc manages under `root` (a migration source on this node).
pub fn find_container(root: &Path, pod_uid: &str, container: &str) -> Option<String> {
    let entries = std::fs::read_dir(root).ok()?;
    entries.flatten().find_map(|e| {
        let id = e.file_name().to_string_lossy().into_owned();
        let (ann, _) = Annotations::from_runc_state(root, &id).ok()?;
        let matches = !ann.is_sandbox()
            && ann.pod_uid_in(root).as_deref() == Some(pod_uid)
            && ann.get(cri::CONTAINER_NAME) == Some(container)
            && is_running(&root.join(&id));
        matches.then_some(id)
    })
}

/// The id of the sandbox container `container_id` (under runc root `root`) belongs to.
pub fn sandbox_of(root: &Path, container_id: &str) -> Option<String> {
    let (ann, _) = Annotations::from_runc_state(root, container_id).ok()?;
    ann.get(cri::SANDBOX_ID)
        .filter(|id| !id.is_empty() && !id.contains('/'))
        .map(str::to_owned)
}

/// The running application containers of Pod `pod_uid` under `root`: (id, name) pairs.
pub fn running_containers(root: &Path, pod_uid: &str) -> Vec<(String, String)> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return vec![];
    };
    let mut out: Vec<(String, String)> = entries
        .flatten()
        .filter_map(|e| {
            let id = e.file_name().to_string_lossy().into_owned();
            let (ann, _) = Annotations::from_runc_state(root, &id).ok()?;
            let name = ann.get(cri::CONTAINER_NAME)?.to_owned();
            (!ann.is_sandbox()
                && ann.pod_uid_in(root).as_deref() == Some(pod_uid)
                && is_running(&root.join(&id)))
            .then_some((id, name))
        })
        .collect();
    out.sort_by(|a, b| a.1.cmp(&b.1));
    out
}

/// True while the init process runc recorded for a container still runs (a zombie
/// waiting for its shim to reap it has ended).
fn is_running(state_dir: &Path) -> bool {
    init_pid(state_dir).is_some_and(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains("(zombie)"))
        })
    })
}

/// The host pid of a container's init process, from runc's state directory.
pub fn init_pid(state_dir: &Path) -> Option<u32> {
    #[derive(Deserialize)]
    struct Init {
        init_process_pid: u32,
    }
    std::fs::read(state_dir.join("state.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Init>(&b).ok())
        .map(|s| s.init_process_pid)
        .filter(|pid| *pid > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> Annotations {
        Annotations(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn pod_uid_comes_from_the_runtime_never_from_a_pod_annotation() {
        let a = ann(&[
            (
                cri::SANDBOX_LOG_DIRECTORY,
                "/var/log/pods/default_web-0_1234-abcd",
            ),
            // What a Pod's creator could write to claim another Pod's identity.
            ("podmig.dev/pod-uid", "victim"),
        ]);
        assert_eq!(a.pod_uid().as_deref(), Some("1234-abcd"));
        let a = ann(&[
            (cri::SANDBOX_UID, "from-containerd"),
            (
                cri::SANDBOX_LOG_DIRECTORY,
                "/var/log/pods/default_web-0_1234-abcd",
            ),
        ]);
        assert_eq!(a.pod_uid().as_deref(), Some("from-containerd"));
        assert_eq!(ann(&[("podmig.dev/pod-uid", "victim")]).pod_uid(), None);
        assert_eq!(ann(&[]).pod_uid(), None);
    }

    #[test]
    fn a_container_without_its_own_uid_takes_its_sandboxs() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sb1")).expect("mkdir");
        std::fs::write(
            dir.path().join("sb1/state.json"),
            r#"{"config":{"labels":["io.kubernetes.cri.container-type=sandbox","io.kubernetes.cri.sandbox-log-directory=/var/log/pods/ns_p_uid-1"]}}"#,
        )
        .expect("write");
        let c = ann(&[(cri::SANDBOX_ID, "sb1"), ("podmig.dev/pod-uid", "victim")]);
        assert_eq!(c.pod_uid_in(dir.path()).as_deref(), Some("uid-1"));
        let escape = ann(&[(cri::SANDBOX_ID, "../sb1")]);
        assert_eq!(escape.pod_uid_in(dir.path()), None);
    }

    #[test]
    fn sandbox_and_target_are_recognised() {
        assert!(ann(&[(cri::CONTAINER_TYPE, "sandbox")]).is_sandbox());
        assert!(!ann(&[(cri::CONTAINER_TYPE, "container")]).is_sandbox());
        assert!(ann(&[(podmig_api::ANNOTATION_MIGRATE_FROM, "u")]).is_migration_target());
        assert!(!ann(&[(podmig_api::ANNOTATION_MIGRATE_FROM, "")]).is_migration_target());
    }

    #[test]
    fn runc_state_labels_are_split_into_annotations_and_bundle() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("c1")).expect("mkdir");
        std::fs::write(
            dir.path().join("c1/state.json"),
            r#"{"config":{"labels":["bundle=/b/c1","io.kubernetes.cri.container-name=app","podmig.dev/x=y=z"]}}"#,
        )
        .expect("write");
        let (a, bundle) = Annotations::from_runc_state(dir.path(), "c1").expect("parse");
        assert_eq!(bundle, Some(PathBuf::from("/b/c1")));
        assert_eq!(a.get(cri::CONTAINER_NAME), Some("app"));
        assert_eq!(
            a.podmig().get("podmig.dev/x").map(String::as_str),
            Some("y=z")
        );
    }

    #[test]
    fn find_container_matches_pod_uid_name_and_liveness() {
        let dir = tempfile::tempdir().expect("tempdir");
        let me = std::process::id();
        let write = |id: &str, pid: u32, labels: &str| {
            std::fs::create_dir_all(dir.path().join(id)).expect("mkdir");
            std::fs::write(
                dir.path().join(id).join("state.json"),
                format!(r#"{{"init_process_pid":{pid},"config":{{"labels":[{labels}]}}}}"#),
            )
            .expect("write");
        };
        let app = r#""io.kubernetes.cri.container-type=container","io.kubernetes.cri.sandbox-uid=u1","io.kubernetes.cri.container-name=app""#;
        write(
            "sandbox",
            me,
            r#""io.kubernetes.cri.container-type=sandbox","io.kubernetes.cri.sandbox-uid=u1""#,
        );
        write("dead", 0, app);
        assert_eq!(
            find_container(dir.path(), "u1", "app"),
            None,
            "a dead container is no source"
        );
        write("live", me, app);
        assert_eq!(
            find_container(dir.path(), "u1", "app").as_deref(),
            Some("live")
        );
        assert_eq!(find_container(dir.path(), "u2", "app"), None);
        assert_eq!(find_container(dir.path(), "u1", "other"), None);
    }

    #[test]
    fn missing_state_is_an_io_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = Annotations::from_runc_state(dir.path(), "nope").expect_err("must fail");
        assert_eq!(err.metric_label(), "io");
    }
}
