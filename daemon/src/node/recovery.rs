//! Crash safety of a frozen source: while a move waits for its target's verdict, the
//! source's containers stay frozen and a marker in the daemon's state directory says so.
//! A daemon that restarts finds the markers and settles each: the target runs (it
//! reported `Restored`) → the frozen source is discarded; otherwise it resumes in place.
//! Never zero copies for longer than the move, never two.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod;
use podmig_api::{ANNOTATION_MIGRATION_PHASE, contract::DaemonPhase};
use podmig_cri_ext::engine::CheckpointEngine;
use serde::{Deserialize, Serialize};

use super::Node;

/// A source container left frozen for move `migration`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FrozenSource {
    /// runc id.
    pub container_id: String,
    /// Its Pod.
    pub pod_uid: String,
    /// The move.
    pub migration: String,
    /// Namespace of the target Pod.
    pub target_namespace: String,
    /// Name of the target Pod.
    pub target_pod: String,
    /// Its images (deleted once settled).
    pub images: PathBuf,
}

/// What a restarted daemon does with a frozen source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// The target runs with the state: stop the source for good.
    Discard,
    /// The target does not run: the source runs on.
    Resume,
}

/// The decision, from the target Pod as the API server has it (`None`: the Pod is gone).
pub fn settle(target: Option<&Pod>) -> Settle {
    let phase = target
        .and_then(|p| p.metadata.annotations.as_ref())
        .and_then(|a| a.get(ANNOTATION_MIGRATION_PHASE))
        .and_then(|v| DaemonPhase::parse(v));
    match phase {
        Some(DaemonPhase::Restored) => Settle::Discard,
        _ => Settle::Resume,
    }
}

fn dir(root: &Path) -> PathBuf {
    root.join(".frozen")
}

/// Records that `m.container_id` is frozen for a move.
pub fn remember(root: &Path, m: &FrozenSource) {
    let d = dir(root);
    let written = podmig_cri_ext::engine::create_private_dir(&d)
        .map_err(|e| e.to_string())
        .and_then(|()| serde_json::to_vec(m).map_err(|e| e.to_string()))
        .and_then(|b| {
            std::fs::write(d.join(format!("{}.json", m.container_id)), b).map_err(|e| e.to_string())
        });
    if let Err(error) = written {
        tracing::warn!(%error, container_id = %m.container_id, "cannot record the frozen source");
    }
}

/// Forgets the marker of `container_id`.
pub fn forget(root: &Path, container_id: &str) {
    let _ = std::fs::remove_file(dir(root).join(format!("{container_id}.json")));
}

/// The markers left by a previous run.
pub fn left_over(root: &Path) -> Vec<FrozenSource> {
    let Ok(rd) = std::fs::read_dir(dir(root)) else {
        return vec![];
    };
    rd.flatten()
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect()
}

/// Settles every frozen source a previous run left; retries while the API server cannot
/// be asked (the source stays frozen meanwhile: no second copy can appear).
pub async fn run<E: CheckpointEngine>(node: Arc<Node<E>>) {
    let root = node.store.root().to_path_buf();
    for m in left_over(&root) {
        let target = loop {
            let Some(client) = node.kube.clone() else {
                break None;
            };
            let api: kube::Api<Pod> = kube::Api::namespaced(client, &m.target_namespace);
            match api.get_opt(&m.target_pod).await {
                Ok(p) => break p,
                Err(error) => {
                    tracing::warn!(%error, migration = %m.migration, "cannot read the target; the source stays frozen");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        let decision = settle(target.as_ref());
        let engine = node.engine.clone();
        let id = m.container_id.clone();
        let done = tokio::task::spawn_blocking(move || match decision {
            Settle::Discard => engine.discard(&id),
            Settle::Resume => engine.resume(&id),
        })
        .await;
        tracing::warn!(migration = %m.migration, container_id = %m.container_id, pod_uid = %m.pod_uid,
            ?decision, outcome = ?done.map(|r| r.map_err(|e| e.to_string())), "settled a source left frozen by a previous run");
        node.store.remove(&m.images);
        forget(&root, &m.container_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_a_restored_target_discards_the_source() {
        let pod = |phase: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "t", "annotations": {ANNOTATION_MIGRATION_PHASE: phase}}}))
                .expect("pod")
        };
        assert_eq!(settle(Some(&pod("Restored"))), Settle::Discard);
        assert_eq!(settle(Some(&pod("Restoring"))), Settle::Resume);
        assert_eq!(settle(Some(&pod("Failed"))), Settle::Resume);
        assert_eq!(settle(None), Settle::Resume);
    }

    #[test]
    fn markers_round_trip() {
        let tmp = tempfile::tempdir().expect("tmp");
        let m = FrozenSource {
            container_id: "c1".into(),
            pod_uid: "u".into(),
            migration: "m".into(),
            target_namespace: "ns".into(),
            target_pod: "x-1".into(),
            images: "/i".into(),
        };
        remember(tmp.path(), &m);
        assert_eq!(left_over(tmp.path()), [m]);
        forget(tmp.path(), "c1");
        assert!(left_over(tmp.path()).is_empty());
    }
}
