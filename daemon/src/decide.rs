//! The node daemon's decisions as plain functions of what it observes, so they are
//! unit-tested without runc or containerd.

use std::path::PathBuf;

use podmig_api::ANNOTATION_MIGRATE_FROM;
use podmig_cri_ext::proto::hook::v1::{
    ContainerIdentity, Pass, Refuse, RestoreFrom, hook_response::Decision as Answer,
};

/// What the daemon knows about a checkpoint a container could be restored from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointLookup {
    /// A restore was armed explicitly (RestoreContainer) with this directory.
    Armed(PathBuf),
    /// The store holds a complete checkpoint of the source in this directory.
    Stored(PathBuf),
    /// The store has no (complete) checkpoint; the directory it looked at.
    Missing(Option<PathBuf>),
}

/// Answer to `create`: restore a migration target from its checkpoint, refuse it when
/// there is none (never start it fresh), pass every other container through.
pub fn on_create(container: &ContainerIdentity, lookup: &CheckpointLookup) -> Answer {
    let target = container
        .annotations
        .get(ANNOTATION_MIGRATE_FROM)
        .filter(|v| !v.is_empty());
    match (lookup, target) {
        (CheckpointLookup::Armed(dir), _) | (CheckpointLookup::Stored(dir), Some(_)) => {
            Answer::RestoreFrom(RestoreFrom {
                image_path: dir.display().to_string(),
                ..Default::default()
            })
        }
        (CheckpointLookup::Missing(dir), Some(source)) => Answer::Refuse(Refuse {
            reason: format!(
                "no checkpoint of container {:?} of source pod {source} on this node{}",
                container.container_name,
                dir.as_ref()
                    .map(|d| format!(" (looked in {})", d.display()))
                    .unwrap_or_default()
            ),
        }),
        _ => Answer::Pass(Pass {}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(migrate_from: Option<&str>) -> ContainerIdentity {
        ContainerIdentity {
            container_name: "app".into(),
            annotations: migrate_from
                .map(|s| (ANNOTATION_MIGRATE_FROM.to_owned(), s.to_owned()))
                .into_iter()
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn ordinary_container_passes() {
        let a = on_create(&container(None), &CheckpointLookup::Missing(None));
        assert!(matches!(a, Answer::Pass(_)));
        // A stored checkpoint of some other pod does not turn it into a restore.
        let a = on_create(&container(None), &CheckpointLookup::Stored("/s".into()));
        assert!(matches!(a, Answer::Pass(_)));
    }

    #[test]
    fn target_with_checkpoint_restores() {
        let a = on_create(
            &container(Some("u1")),
            &CheckpointLookup::Stored("/s/u1/app".into()),
        );
        assert!(matches!(a, Answer::RestoreFrom(r) if r.image_path == "/s/u1/app"));
        let a = on_create(&container(None), &CheckpointLookup::Armed("/armed".into()));
        assert!(matches!(a, Answer::RestoreFrom(r) if r.image_path == "/armed"));
    }

    #[test]
    fn target_without_checkpoint_is_refused_with_reason() {
        let a = on_create(
            &container(Some("u1")),
            &CheckpointLookup::Missing(Some("/s/u1/app".into())),
        );
        match a {
            Answer::Refuse(r) => {
                assert!(
                    r.reason.contains("u1") && r.reason.contains("/s/u1/app"),
                    "{}",
                    r.reason
                )
            }
            other => panic!("expected refuse, got {other:?}"),
        }
    }
}
