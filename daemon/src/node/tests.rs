//! The node daemon's decisions with a fake engine: the hook and CRI adapters drive the
//! Pod workers exactly as podmig-runc and a CRI client do.

use std::{path::Path, sync::Arc, time::Duration};

use podmig_cri_ext::{
    engine::{CheckpointEngine, CheckpointOptions, CheckpointReport},
    hook::{Decision, HookHandler},
    proto::{
        hook::v1::{
            ContainerIdentity, Event, HookRequest, RestoreResult, hook_response::Decision as Answer,
        },
        runtime::v1::{
            CheckpointContainerOptions, CheckpointContainerRequest, RestoreContainerRequest,
            checkpoint_service_server::CheckpointService,
        },
    },
};
use tonic::Request;

use super::{
    cri::CheckpointApi,
    hook::NodeHook,
    shared::{Node, Settings},
};
use crate::store::CheckpointStore;

/// Engine that writes an inventory image after a delay, or fails; records resumes and
/// discards of sources kept frozen.
pub(super) struct FakeEngine {
    delay: Duration,
    fail: bool,
    cannot_thaw: bool,
    calls: std::sync::Mutex<Vec<String>>,
}

impl CheckpointEngine for FakeEngine {
    fn resume(&self, id: &str) -> podmig_cri_ext::Result<()> {
        self.calls
            .lock()
            .expect("calls")
            .push(format!("resume {id}"));
        if self.cannot_thaw {
            return Err(podmig_cri_ext::Error::CheckpointFailed(
                "freezer gone".into(),
            ));
        }
        Ok(())
    }

    fn discard(&self, id: &str) -> podmig_cri_ext::Result<()> {
        self.calls
            .lock()
            .expect("calls")
            .push(format!("discard {id}"));
        Ok(())
    }

    fn checkpoint(
        &self,
        _id: &str,
        opts: &CheckpointOptions,
    ) -> podmig_cri_ext::Result<CheckpointReport> {
        #[allow(clippy::disallowed_methods)] // runs on a worker thread, like runc does
        std::thread::sleep(self.delay);
        if self.fail {
            return Err(podmig_cri_ext::Error::CheckpointFailed(
                "dump failed: CRIU says no".into(),
            ));
        }
        std::fs::create_dir_all(&opts.image_path).expect("mkdir");
        std::fs::write(opts.image_path.join("inventory.img"), b"x").expect("write");
        Ok(CheckpointReport {
            duration: self.delay,
            image_bytes: 1,
            filesystem: Default::default(),
        })
    }
}

pub(super) fn node(tmp: &Path, fail: bool) -> Arc<Node<FakeEngine>> {
    node_with(tmp, fail, false)
}

fn node_with(tmp: &Path, fail: bool, cannot_thaw: bool) -> Arc<Node<FakeEngine>> {
    Arc::new(
        Node::new(
            FakeEngine {
                delay: Duration::from_millis(150),
                fail,
                cannot_thaw,
                calls: Default::default(),
            },
            CheckpointStore::new(tmp),
            Settings {
                node_name: "n1".into(),
                runc_root: tmp.join("runc"),
                hold: Duration::from_secs(5),
                runtime_request_timeout: Duration::from_secs(120),
                state_dir: tmp.join("state"),
                checkpoint_budget: 1 << 40,
                move_bandwidth_mibps: 0,
            },
        )
        .expect("node"),
    )
}

fn req(event: Event, id: &str, uid: &str, source: Option<&str>) -> HookRequest {
    HookRequest {
        event: event as i32,
        container: Some(ContainerIdentity {
            container_id: id.into(),
            pod_uid: uid.into(),
            pod_name: format!("pod-{uid}"),
            pod_namespace: "ns".into(),
            container_name: "app".into(),
            annotations: source
                .map(|s| (podmig_api::ANNOTATION_MIGRATE_FROM.to_owned(), s.to_owned()))
                .into_iter()
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn restored(id: &str, uid: &str, ok: bool) -> HookRequest {
    let mut r = req(Event::Restored, id, uid, None);
    r.restore_result = Some(RestoreResult {
        ok,
        duration_ms: 40,
        criu_ms: 25,
        error: if ok {
            String::new()
        } else {
            "CRIU: can't open file".into()
        },
    });
    r
}

async fn answer(d: Decision) -> Answer {
    match d {
        Decision::Reply(a) => a,
        Decision::Hold { release, .. } => release.await.expect("released"),
    }
}

/// What the hook answers `r`, waiting out a hold.
async fn ask(hook: &NodeHook<FakeEngine>, r: HookRequest) -> Answer {
    answer(hook.decide(r).await).await
}

/// (role, state) of every move the manager knows.
fn states(n: &Node<FakeEngine>) -> Vec<(String, String)> {
    n.manager
        .list()
        .into_iter()
        .map(|i| (i.role.as_str().to_owned(), i.state.as_str().to_owned()))
        .collect()
}

fn ckpt_req(id: &str, path: &Path) -> Request<CheckpointContainerRequest> {
    Request::new(CheckpointContainerRequest {
        container_id: id.into(),
        options: Some(CheckpointContainerOptions {
            checkpoint_path: path.display().to_string(),
            ..Default::default()
        }),
    })
}

/// A running container `src-ctr` of Pod `pod_uid` in the fake runc root.
fn live_source(tmp: &Path, pod_uid: &str) {
    let dir = tmp.join("runc").join("src-ctr");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join("state.json"),
        format!(
            r#"{{"init_process_pid":{},"config":{{"labels":["io.kubernetes.cri.container-type=container","io.kubernetes.cri.sandbox-uid={pod_uid}","io.kubernetes.cri.container-name=app"]}}}}"#,
            std::process::id()
        ),
    )
    .expect("write");
}

/// Waits until the worker of `uid` has handled everything sent so far.
async fn settle(n: &Arc<Node<FakeEngine>>, uid: &str) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    n.dispatch(
        uid,
        super::PodUpdate::Arm {
            container: "__probe".into(),
            images: "/nonexistent".into(),
            reply: tx,
        },
    );
    let _ = rx.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_checkpoint_is_held_then_becomes_noop() {
    let tmp = tempfile::tempdir().expect("tempdir");
    live_source(tmp.path(), "src-uid");
    let n = node(tmp.path(), false);
    let api = CheckpointApi(n.clone());
    let dir = tmp.path().join("src-uid/app");
    let ck = tokio::spawn(async move { api.checkpoint_container(ckpt_req("src-ctr", &dir)).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let hook = NodeHook(n.clone());
    let d = hook
        .decide(req(Event::Kill, "src-ctr", "src-uid", None))
        .await;
    assert!(
        matches!(d, Decision::Hold { .. }),
        "the kill waits for the dump"
    );
    assert!(matches!(answer(d).await, Answer::NoOp(_)));
    ck.await.expect("join").expect("checkpoint ok");
    // Dumped away: the runtime's restart is refused, a later kill is a no-op.
    let a = ask(&hook, req(Event::Create, "c9", "src-uid", None)).await;
    assert!(
        matches!(a, Answer::Refuse(ref r) if r.reason.contains("migrated away")),
        "{a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_checkpoint_releases_held_kill_as_pass_with_criu_reason() {
    let tmp = tempfile::tempdir().expect("tempdir");
    live_source(tmp.path(), "u");
    let n = node(tmp.path(), true);
    let api = CheckpointApi(n.clone());
    let dir = tmp.path().join("u/app");
    let ck = tokio::spawn(async move { api.checkpoint_container(ckpt_req("src-ctr", &dir)).await });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let d = NodeHook(n.clone())
        .decide(req(Event::Kill, "src-ctr", "u", None))
        .await;
    assert!(matches!(answer(d).await, Answer::Pass(_)));
    let status = ck.await.expect("join").expect_err("must fail");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("CRIU says no"),
        "{}",
        status.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_create_restores_from_store_and_cleans_up_after_success() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n = node(tmp.path(), false);
    let dir = tmp.path().join("src-uid/app");
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(dir.join("inventory.img"), b"x").expect("write");
    let hook = NodeHook(n.clone());
    let a = ask(&hook, req(Event::Create, "c2", "dst-uid", Some("src-uid"))).await;
    assert!(
        matches!(&a, Answer::RestoreFrom(r) if Path::new(&r.image_path) == dir),
        "{a:?}"
    );
    hook.restored(restored("c2", "dst-uid", true)).await;
    settle(&n, "dst-uid").await;
    assert!(!dir.exists(), "checkpoint must be deleted after a restore");
    assert!(!tmp.path().join("src-uid").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_without_any_source_is_refused_and_stays_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let n = node(tmp.path(), false);
    let hook = NodeHook(n.clone());
    let a = ask(&hook, req(Event::Create, "c2", "dst", Some("gone"))).await;
    assert!(
        matches!(&a, Answer::Refuse(r) if r.reason.contains("gone")),
        "{a:?}"
    );
    // A later attempt of the runtime does not start the target fresh.
    let a = ask(&hook, req(Event::Create, "c3", "dst", Some("gone"))).await;
    assert!(matches!(a, Answer::Refuse(_)), "{a:?}");
    let info = n.manager.list();
    assert_eq!(info.len(), 1);
    assert_eq!(
        (info[0].role.as_str(), info[0].state.as_str()),
        ("target", "Failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_of_a_local_source_checkpoints_it_and_records_frozen_time() {
    let tmp = tempfile::tempdir().expect("tempdir");
    live_source(tmp.path(), "src");
    let n = node(tmp.path(), false);
    let hook = NodeHook(n.clone());
    let a = ask(&hook, req(Event::Create, "c2", "dst", Some("src"))).await;
    let image_path = match a {
        Answer::RestoreFrom(r) => r.image_path,
        other => panic!("expected a restore, got {other:?}"),
    };
    assert_eq!(Path::new(&image_path), tmp.path().join("src/app"));
    hook.restored(restored("c2", "dst", true)).await;
    settle(&n, "dst").await;
    settle(&n, "src").await;
    let records = n.manager.restores("dst");
    assert_eq!(records.len(), 1);
    let r = &records[0];
    assert!(
        r.ok && r.source_pod_uid == "src" && r.restore_ms == 40,
        "{r:?}"
    );
    assert!(r.checkpoint_ms >= 150, "fake dump takes 150 ms: {r:?}");
    assert!(r.frozen_ms >= r.checkpoint_ms, "{r:?}");
    assert!(
        !tmp.path().join("src/app").exists(),
        "images deleted after the commit"
    );
    assert_eq!(
        calls(&n),
        ["discard src-ctr"],
        "the frozen source is stopped"
    );
    // kubelet restarting the dumped source container is refused: one copy only.
    match ask(&hook, req(Event::Create, "c3", "src", None)).await {
        Answer::Refuse(r) => assert!(
            r.reason.contains("migrated away to ns/pod-dst on n1"),
            "{}",
            r.reason
        ),
        other => panic!("expected refuse, got {other:?}"),
    }
    let other = ask(&hook, req(Event::Create, "c4", "unrelated", None)).await;
    assert!(matches!(other, Answer::Pass(_)));
    // The daemon restarts (a new process: nothing in memory) before the Pod is deleted:
    // its journal still refuses the kubelet's restart of the moved-away container.
    let restarted = node(tmp.path(), false);
    crate::node::recovery::run(restarted.clone()).await;
    let again = NodeHook(restarted.clone());
    match ask(&again, req(Event::Create, "c5", "src", None)).await {
        Answer::Refuse(r) => assert!(
            r.reason.contains("migrated away to ns/pod-dst on n1"),
            "{}",
            r.reason
        ),
        other => panic!("after a restart, expected refuse, got {other:?}"),
    }
    // Once the Pod leaves the node, nothing is kept for it.
    restarted.journal.forget_moved_away(|uid| uid == "src");
    assert!(
        restarted.journal.entries().is_empty(),
        "{:?}",
        restarted.journal.entries()
    );
    let states = states(&n);
    assert!(
        states.contains(&("source".into(), "Succeeded".into())),
        "{states:?}"
    );
    assert!(
        states.contains(&("target".into(), "Succeeded".into())),
        "{states:?}"
    );
}

fn calls(n: &Node<FakeEngine>) -> Vec<String> {
    n.engine.calls.lock().expect("calls").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_restore_resumes_the_frozen_source_in_place() {
    let tmp = tempfile::tempdir().expect("tempdir");
    live_source(tmp.path(), "src");
    let n = node(tmp.path(), false);
    let hook = NodeHook(n.clone());
    let a = ask(&hook, req(Event::Create, "c2", "dst", Some("src"))).await;
    assert!(matches!(a, Answer::RestoreFrom(_)), "{a:?}");
    hook.restored(restored("c2", "dst", false)).await;
    settle(&n, "dst").await;
    settle(&n, "src").await;
    assert_eq!(calls(&n), ["resume src-ctr"], "thawed, not killed");
    assert!(
        !tmp.path().join("src/app").exists(),
        "its checkpoint is dropped"
    );
    // Running again: kills pass.
    let a = ask(&hook, req(Event::Kill, "src-ctr", "src", None)).await;
    assert!(matches!(a, Answer::Pass(_)), "{a:?}");
    // The target is never started fresh afterwards.
    let a = ask(&hook, req(Event::Create, "c6", "dst", Some("src"))).await;
    assert!(matches!(a, Answer::Refuse(_)), "{a:?}");
    let states = states(&n);
    assert!(
        states.contains(&("source".into(), "RolledBack".into())),
        "{states:?}"
    );
    let text = n.metrics.render();
    assert!(
        text.contains("podmig_migrations_total{role=\"source\",outcome=\"rolled_back\"} 1"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_that_cannot_be_thawed_resumes_from_its_checkpoint_when_restarted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    live_source(tmp.path(), "src");
    let n = node_with(tmp.path(), false, true);
    let hook = NodeHook(n.clone());
    let a = ask(&hook, req(Event::Create, "c2", "dst", Some("src"))).await;
    assert!(matches!(a, Answer::RestoreFrom(_)), "{a:?}");
    hook.restored(restored("c2", "dst", false)).await;
    settle(&n, "dst").await;
    settle(&n, "src").await;
    assert_eq!(calls(&n), ["resume src-ctr", "discard src-ctr"]);
    let images = tmp.path().join("src/app");
    assert!(
        images.join("inventory.img").exists(),
        "kept for the rollback"
    );
    // The runtime restarts the source container: it resumes from its own checkpoint.
    let a = ask(&hook, req(Event::Create, "c5", "src", None)).await;
    assert!(
        matches!(&a, Answer::RestoreFrom(r) if Path::new(&r.image_path) == images),
        "{a:?}"
    );
    hook.restored(restored("c5", "src", true)).await;
    settle(&n, "src").await;
    assert!(!images.exists(), "rollback images deleted once resumed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_local_source_checkpoint_refuses_the_target_and_the_source_runs_on() {
    let tmp = tempfile::tempdir().expect("tempdir");
    live_source(tmp.path(), "src");
    let n = node(tmp.path(), true);
    let hook = NodeHook(n.clone());
    match ask(&hook, req(Event::Create, "c2", "dst", Some("src"))).await {
        Answer::Refuse(r) => assert!(r.reason.contains("CRIU says no"), "{}", r.reason),
        other => panic!("expected refuse, got {other:?}"),
    }
    // The source was not touched: its kills and restarts pass.
    let a = ask(&hook, req(Event::Kill, "src-ctr", "src", None)).await;
    assert!(matches!(a, Answer::Pass(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_cri_requests_get_precise_status() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let api = CheckpointApi(node(tmp.path(), false));
    let s = api
        .checkpoint_container(Request::new(CheckpointContainerRequest::default()))
        .await
        .expect_err("empty id");
    assert_eq!(s.code(), tonic::Code::InvalidArgument);
    let s = api
        .restore_container(Request::new(RestoreContainerRequest {
            pod_uid: "u".into(),
            container_name: "app".into(),
            options: Some(
                podmig_cri_ext::proto::runtime::v1::RestoreContainerOptions {
                    checkpoint_path: tmp.path().join("none").display().to_string(),
                    ..Default::default()
                },
            ),
        }))
        .await
        .expect_err("no checkpoint");
    assert_eq!(s.code(), tonic::Code::NotFound);
}
