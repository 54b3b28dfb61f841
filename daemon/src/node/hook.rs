//! The runtime hook adapter: `podmig-runc`'s events become updates of the Pod's worker;
//! answers that take longer than a round-trip become holds.

use std::{sync::Arc, time::Duration};

use podmig_api::ANNOTATION_MIGRATION_DEADLINE;
use podmig_cri_ext::{
    engine::CheckpointEngine,
    hook::{Decision, HookHandler},
    proto::hook::v1::{Event, HookRequest, Pass, Refuse, hook_response::Decision as Answer},
};
use tokio::sync::oneshot;

use super::{
    podsync::{PodUpdate, deadline_from},
    shared::Node,
};

/// How long the hook waits for a worker's answer before it answers `hold`.
const QUICK: Duration = Duration::from_millis(100);

/// The hook handler of the node daemon.
pub struct NodeHook<E>(pub Arc<Node<E>>);

impl<E: CheckpointEngine> HookHandler for NodeHook<E> {
    async fn decide(&self, req: HookRequest) -> Decision {
        let event = req.event();
        let c = req.container.unwrap_or_default();
        if c.pod_uid.is_empty() {
            return Decision::Reply(Answer::Pass(Pass {}));
        }
        let target = c
            .annotations
            .contains_key(podmig_api::ANNOTATION_MIGRATE_FROM);
        let node = &self.0;
        let (tx, mut rx) = oneshot::channel();
        let uid = c.pod_uid.clone();
        let hold = match event {
            Event::Create => {
                let deadline = deadline_from(
                    c.annotations.get(ANNOTATION_MIGRATION_DEADLINE),
                    node.settings.hold,
                );
                node.dispatch(
                    &uid,
                    PodUpdate::Create {
                        container: c,
                        reply: tx,
                    },
                );
                deadline.saturating_duration_since(std::time::Instant::now())
            }
            Event::Kill => {
                node.dispatch(
                    &uid,
                    PodUpdate::Kill {
                        container: c,
                        reply: tx,
                    },
                );
                node.settings.hold
            }
            _ => return Decision::Reply(Answer::Pass(Pass {})),
        };
        match tokio::time::timeout(QUICK, &mut rx).await {
            Ok(Ok(answer)) => Decision::Reply(answer),
            // A worker that dropped the request: never start a target fresh.
            Ok(Err(_)) if target && event == Event::Create => {
                Decision::Reply(Answer::Refuse(Refuse {
                    reason: "the podmig node daemon dropped the request".into(),
                }))
            }
            Ok(Err(_)) => Decision::Reply(Answer::Pass(Pass {})),
            Err(_) => {
                if event == Event::Kill {
                    tracing::info!(pod_uid = %uid, "holding kill until the checkpoint is taken");
                } else {
                    tracing::info!(pod_uid = %uid, hold_ms = hold.as_millis() as u64, "holding create until its checkpoint is there");
                }
                Decision::Hold {
                    timeout: hold,
                    release: rx,
                }
            }
        }
    }

    async fn restored(&self, req: HookRequest) {
        let container = req.container.unwrap_or_default();
        let result = req.restore_result.unwrap_or_default();
        let uid = container.pod_uid.clone();
        self.0
            .dispatch(&uid, PodUpdate::Restored { container, result });
    }
}
