//! Which migration targets are real. A Pod's annotations are written by whoever creates
//! the Pod, so a target Pod proves nothing by itself: a node daemon restores memory into
//! a target, and a source hands its memory over, only for a target that podmig's
//! controller made for a move that exists — the target is owned by a MigratingPod of its
//! own namespace whose status (writable only by the controller) records this very Pod,
//! by the uid the API server gave it, with this move's id, source Pod and source node.
//!
//! A daemon without API access (the standalone engine: no cluster, only root on the node
//! talks to the runtime) has no untrusted Pod creators and restores from its own store.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use podmig_api::{
    ANNOTATION_MIGRATE_FROM, ANNOTATION_MIGRATION_ID, ANNOTATION_SOURCE_NODE, EXTRA_NODE_NAME,
    v1alpha1::MigratingPod,
};

/// A target Pod checked against its move record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedTarget {
    /// The move's id.
    pub migration_id: String,
    /// Namespace of the target (and of the source).
    pub namespace: String,
    /// The target Pod.
    pub target_pod: String,
    /// Its uid.
    pub target_uid: String,
    /// The node it is bound to.
    pub target_node: String,
    /// The source Pod's uid.
    pub source_uid: String,
    /// The source Pod's name.
    pub source_pod: String,
    /// The source Pod's node, as recorded.
    pub source_node: Option<String>,
}

/// Why a target is not (yet) verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    /// Its MigratingPod records another move or none: the controller writes the record
    /// right after it creates the Pod, so this may still change.
    #[error(transparent)]
    NotRecorded(#[from] NotYet),
    /// It can never be a target podmig made (no owner, another namespace, unreadable).
    #[error(transparent)]
    Refused(#[from] Never),
}

/// Why a target is not verified yet (asked again until the move's record may have come).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotYet {
    /// The MigratingPod records no move.
    #[error(
        "MigratingPod {namespace}/{owner} records no move: podmig's controller did not make Pod {pod}"
    )]
    NoRecord {
        /// Namespace.
        namespace: String,
        /// The MigratingPod.
        owner: String,
        /// The Pod.
        pod: String,
    },
    /// The MigratingPod records another target.
    #[error(transparent)]
    OtherRecord(Box<RecordMismatch>),
    /// The Pod is not bound to a node yet.
    #[error("Pod {namespace}/{pod} is not bound to a node")]
    Unbound {
        /// Namespace.
        namespace: String,
        /// The Pod.
        pod: String,
    },
    /// The API server could not be read.
    #[error("cannot read {kind} {namespace}/{name}: {reason}")]
    Unreadable {
        /// `Pod` or `MigratingPod`.
        kind: &'static str,
        /// Namespace.
        namespace: String,
        /// Its name.
        name: String,
        /// The client's error.
        reason: String,
    },
}

/// A target Pod that is not the one its MigratingPod records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Pod {namespace}/{pod} (uid {uid}, move {migration:?}, source {source_uid}) is not the target MigratingPod {owner} records (Pod {recorded_pod} uid {recorded_uid}, move {recorded_migration:?}, source {recorded_source}): podmig's controller did not make it"
)]
pub struct RecordMismatch {
    /// Namespace.
    namespace: String,
    /// The Pod.
    pod: String,
    /// Its uid.
    uid: String,
    /// The move its annotations name.
    migration: String,
    /// The source its annotations name.
    source_uid: String,
    /// The MigratingPod.
    owner: String,
    /// The target Pod recorded.
    recorded_pod: String,
    /// Its uid.
    recorded_uid: String,
    /// The move recorded.
    recorded_migration: String,
    /// The source recorded.
    recorded_source: String,
}

/// Why a Pod can never be a target podmig's controller made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Never {
    /// It names no source.
    #[error("Pod {namespace}/{pod} is not a migration target")]
    NotATarget {
        /// Namespace.
        namespace: String,
        /// The Pod.
        pod: String,
    },
    /// No MigratingPod controls it.
    #[error("Pod {namespace}/{pod} names a source but no MigratingPod controls it")]
    NoController {
        /// Namespace.
        namespace: String,
        /// The Pod.
        pod: String,
    },
    /// The MigratingPod it names does not exist.
    #[error(
        "the MigratingPod {namespace}/{owner} that Pod {pod} names as its controller does not exist"
    )]
    ControllerGone {
        /// Namespace.
        namespace: String,
        /// The MigratingPod named.
        owner: String,
        /// The Pod.
        pod: String,
    },
    /// There is no such Pod.
    #[error("no Pod {namespace}/{pod}")]
    NoPod {
        /// Namespace.
        namespace: String,
        /// The Pod.
        pod: String,
    },
}

/// Whether `target` is a target podmig's controller made, judged from the Pod and the
/// MigratingPod its controller owner reference names (`None`: not found). `Err` says
/// what does not match, for the refusal.
pub fn check_target(
    target: &Pod,
    owner: Option<&MigratingPod>,
) -> Result<VerifiedTarget, Unverified> {
    let name = target.name_any();
    let namespace = target.namespace().unwrap_or_default();
    let a = target.annotations();
    let source_uid = a
        .get(ANNOTATION_MIGRATE_FROM)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            Unverified::from(Never::NotATarget {
                namespace: namespace.clone(),
                pod: name.clone(),
            })
        })?;
    let migration_id = a.get(ANNOTATION_MIGRATION_ID).cloned().unwrap_or_default();
    let owner_ref = target
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "MigratingPod")
        .ok_or_else(|| {
            Unverified::from(Never::NoController {
                namespace: namespace.clone(),
                pod: name.clone(),
            })
        })?;
    let owner = owner
        .filter(|m| {
            m.uid().as_deref() == Some(owner_ref.uid.as_str())
                && m.name_any() == owner_ref.name
                && m.namespace().as_deref() == Some(namespace.as_str())
        })
        .ok_or_else(|| {
            Unverified::from(Never::ControllerGone {
                namespace: namespace.clone(),
                owner: owner_ref.name.clone(),
                pod: name.clone(),
            })
        })?;
    let record = owner
        .status
        .as_ref()
        .and_then(|s| s.move_target.as_ref())
        .ok_or_else(|| {
            Unverified::from(NotYet::NoRecord {
                namespace: namespace.clone(),
                owner: owner.name_any(),
                pod: name.clone(),
            })
        })?;
    let uid = target.uid().unwrap_or_default();
    let matches = record.target_pod == name
        && record.target_pod_uid == uid
        && record.source_pod_uid == *source_uid
        && record.migration_id == migration_id
        && record.source_node.as_deref() == a.get(ANNOTATION_SOURCE_NODE).map(String::as_str);
    if !matches {
        return Err(NotYet::OtherRecord(Box::new(RecordMismatch {
            namespace: namespace.clone(),
            pod: name.clone(),
            uid,
            migration: migration_id,
            source_uid: source_uid.clone(),
            owner: owner.name_any(),
            recorded_pod: record.target_pod.clone(),
            recorded_uid: record.target_pod_uid.clone(),
            recorded_migration: record.migration_id.clone(),
            recorded_source: record.source_pod_uid.clone(),
        }))
        .into());
    }
    let target_node = target
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or_else(|| {
            Unverified::from(NotYet::Unbound {
                namespace: namespace.clone(),
                pod: name.clone(),
            })
        })?;
    Ok(VerifiedTarget {
        migration_id,
        namespace,
        target_pod: name,
        target_uid: uid,
        target_node,
        source_uid: source_uid.clone(),
        source_pod: record.source_pod.clone(),
        source_node: record.source_node.clone(),
    })
}

/// Reads target Pod `namespace/name` and its owner, and checks them ([`check_target`]).
pub async fn verify(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<VerifiedTarget, Unverified> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods
        .get_opt(name)
        .await
        .map_err(|e| {
            Unverified::from(NotYet::Unreadable {
                kind: "Pod",
                namespace: namespace.into(),
                name: name.into(),
                reason: e.to_string(),
            })
        })?
        .ok_or_else(|| {
            Unverified::from(Never::NoPod {
                namespace: namespace.into(),
                pod: name.into(),
            })
        })?;
    let owner = match pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "MigratingPod")
    {
        Some(o) => Api::<MigratingPod>::namespaced(client.clone(), namespace)
            .get_opt(&o.name)
            .await
            .map_err(|e| {
                Unverified::from(NotYet::Unreadable {
                    kind: "MigratingPod",
                    namespace: namespace.into(),
                    name: o.name.clone(),
                    reason: e.to_string(),
                })
            })?,
        None => None,
    };
    check_target(&pod, owner.as_ref())
}

/// [`verify`], asked again for up to `within` while the record may still come (the
/// controller writes it right after it creates the Pod, so a target's first look may
/// come first); a target that can never be one is refused at once.
pub async fn verify_within(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    within: Duration,
) -> Result<VerifiedTarget, Unverified> {
    let deadline = Instant::now() + within;
    loop {
        match verify(client, namespace, name).await {
            Err(Unverified::NotRecorded(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            other => return other,
        }
    }
}

/// The node a caller speaks for: the node named by a token bound to a Pod (user extra
/// `authentication.kubernetes.io/node-name`, as the API server sets it for a daemon Pod's
/// ServiceAccount token), else a kubelet's node identity `system:node:<name>` in group
/// `system:nodes`. `None`: the caller is no node.
pub fn caller_node(user: &k8s_openapi::api::authentication::v1::UserInfo) -> Option<String> {
    if let Some(n) = user
        .extra
        .as_ref()
        .and_then(|e| e.get(EXTRA_NODE_NAME))
        .and_then(|v| v.first())
        .filter(|n| !n.is_empty())
    {
        return Some(n.clone());
    }
    let in_nodes = user
        .groups
        .as_ref()
        .is_some_and(|g| g.iter().any(|g| g == "system:nodes"));
    user.username
        .as_deref()
        .and_then(|u| u.strip_prefix("system:node:"))
        .filter(|n| in_nodes && !n.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target(v: serde_json::Value) -> Pod {
        let mut base = json!({"metadata": {"name": "counter-1", "namespace": "default", "uid": "t-uid",
            "annotations": {ANNOTATION_MIGRATE_FROM: "s-uid", ANNOTATION_MIGRATION_ID: "counter-1",
                ANNOTATION_SOURCE_NODE: "node-0"},
            "ownerReferences": [{"apiVersion": "podmig.dev/v1alpha1", "kind": "MigratingPod",
                "name": "counter", "uid": "mp-uid", "controller": true}]},
            "spec": {"nodeName": "node-1", "containers": [{"name": "app"}]}});
        merge(&mut base, v);
        serde_json::from_value(base).expect("pod")
    }

    fn owner(v: serde_json::Value) -> MigratingPod {
        let mut base = json!({"apiVersion": "podmig.dev/v1alpha1", "kind": "MigratingPod",
            "metadata": {"name": "counter", "namespace": "default", "uid": "mp-uid"},
            "spec": {"template": {"spec": {"containers": [{"name": "app"}]}}},
            "status": {"moveTarget": {"migrationId": "counter-1", "sourcePod": "counter-0",
                "sourcePodUid": "s-uid", "sourceNode": "node-0", "targetPod": "counter-1",
                "targetPodUid": "t-uid"}}});
        merge(&mut base, v);
        serde_json::from_value(base).expect("mpod")
    }

    fn merge(base: &mut serde_json::Value, v: serde_json::Value) {
        match (base, v) {
            (serde_json::Value::Object(b), serde_json::Value::Object(v)) => {
                for (k, val) in v {
                    merge(b.entry(k).or_insert(serde_json::Value::Null), val);
                }
            }
            (b, v) => *b = v,
        }
    }

    #[test]
    fn the_target_the_controller_recorded_is_verified() {
        let v = check_target(&target(json!({})), Some(&owner(json!({})))).expect("real target");
        assert_eq!(
            (
                v.source_uid.as_str(),
                v.target_node.as_str(),
                v.source_pod.as_str()
            ),
            ("s-uid", "node-1", "counter-0")
        );
    }

    #[test]
    fn a_forged_target_is_refused_whatever_it_copies() {
        // A Pod of another namespace with the victim's annotations and no owner.
        let thief = target(json!({"metadata": {"namespace": "evil", "ownerReferences": []}}));
        let e = check_target(&thief, None).expect_err("no owner");
        assert!(matches!(e, Unverified::Refused(_)), "{e}");
        assert!(e.to_string().contains("no MigratingPod controls it"), "{e}");
        // Owned by the victim's MigratingPod by name, from another namespace.
        let thief = target(json!({"metadata": {"namespace": "evil"}}));
        let e = check_target(&thief, None).expect_err("owner elsewhere");
        assert!(e.to_string().contains("does not exist"), "{e}");
        // Same namespace, right owner reference, but not the Pod the record names.
        let thief = target(json!({"metadata": {"name": "thief", "uid": "x"}}));
        let e = check_target(&thief, Some(&owner(json!({})))).expect_err("not recorded");
        assert!(matches!(e, Unverified::NotRecorded(_)), "{e}");
        assert!(e.to_string().contains("did not make it"), "{e}");
        // A record of another move, or none.
        let e = check_target(
            &target(json!({"metadata": {"annotations": {ANNOTATION_MIGRATION_ID: "steal-1"}}})),
            Some(&owner(json!({}))),
        )
        .expect_err("other move");
        assert!(e.to_string().contains("did not make it"), "{e}");
        let e = check_target(
            &target(json!({})),
            Some(&owner(json!({"status": {"moveTarget": null}}))),
        )
        .expect_err("no record");
        assert!(e.to_string().contains("records no move"), "{e}");
        // An owner reference whose uid is not the live MigratingPod's (a recreated name).
        let e = check_target(
            &target(json!({})),
            Some(&owner(json!({"metadata": {"uid": "other"}}))),
        )
        .expect_err("stale owner");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn a_caller_speaks_for_a_node_only_by_its_credentials() {
        let user = |v: serde_json::Value| {
            serde_json::from_value::<k8s_openapi::api::authentication::v1::UserInfo>(v)
                .expect("user")
        };
        let pod_bound = user(
            json!({"username": "system:serviceaccount:podmig:podmig-node",
            "extra": {EXTRA_NODE_NAME: ["node-1"]}}),
        );
        assert_eq!(caller_node(&pod_bound).as_deref(), Some("node-1"));
        let kubelet = user(json!({"username": "system:node:node-0", "groups": ["system:nodes"]}));
        assert_eq!(caller_node(&kubelet).as_deref(), Some("node-0"));
        let pretender = user(json!({"username": "system:node:node-0", "groups": ["devs"]}));
        assert_eq!(caller_node(&pretender), None);
        let person = user(json!({"username": "alice", "groups": ["system:authenticated"]}));
        assert_eq!(caller_node(&person), None);
    }
}
