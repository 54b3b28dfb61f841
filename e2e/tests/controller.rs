//! The controller on the local cluster, driven with kubectl as a user would: MigratingPods,
//! Migrations, migrate-on-delete and its give-up path, cleanup and bad input.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use podmig_api::{
    ANNOTATION_MIGRATE_FROM, ANNOTATION_SOURCE_NODE, MIGRATE_FINALIZER,
    v1alpha1::{MigratingPod, MigratingPodState, Migration, MigrationPhase},
};
use podmig_e2e::{cluster::Cluster, testapp::get_count, wait::until};

fn mpod_yaml(name: &str, timeout: u32) -> String {
    mpod_yaml_args(name, timeout, "'--mem-mib', '16'")
}

fn mpod_yaml_args(name: &str, timeout: u32, args: &str) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  migrationTimeoutSeconds: {timeout}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: [{args}]}}\n"
    )
}

async fn setup(nodes: usize) -> anyhow::Result<(Cluster, (podmig_e2e::process::Proc, u16))> {
    let c = Cluster::up_temp(nodes).await?;
    c.install_crds()?;
    let ctl = c.start_controller("a")?;
    Ok((c, ctl))
}

fn metrics(port: u16) -> anyhow::Result<String> {
    let out = std::process::Command::new("curl")
        .args(["--noproxy", "*", "-sS"])
        .arg(format!("http://127.0.0.1:{port}/metrics"))
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn state(mpods: &Api<MigratingPod>, name: &str) -> Option<(MigratingPodState, String)> {
    let s = mpods.get(name).await.ok()?.status?;
    Some((s.state?, s.active_pod.unwrap_or_default()))
}

async fn running(pods: &Api<Pod>, name: &str) -> anyhow::Result<Pod> {
    podmig_e2e::wait::ready_pod(pods, name, Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_moves_a_running_pod_with_its_state() -> anyhow::Result<()> {
    let (c, (_ctl, port)) = setup(1).await?;
    c.apply(&mpod_yaml("counter", 120))?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let mpods: Api<MigratingPod> = Api::default_namespaced(c.client.clone());
    let p0 = running(&pods, "counter-0").await?;
    assert!(p0.finalizers().contains(&MIGRATE_FINALIZER.to_owned()));
    assert_eq!(
        p0.spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.as_deref()),
        Some("podmig")
    );
    let owner = &p0.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("MigratingPod", Some(true))
    );
    until("mpod Running", Duration::from_secs(10), async || {
        (state(&mpods, "counter").await? == (MigratingPodState::Running, "counter-0".into()))
            .then_some(())
    })
    .await?;
    let ip0 = p0.status.and_then(|s| s.pod_ip).unwrap_or_default();
    // Ready means running; the app answers once it has touched its memory.
    podmig_e2e::testapp::wait_count(&ip0, Duration::from_secs(60)).await?;
    for _ in 0..2 {
        get_count(&ip0).await?;
    }
    assert_eq!(get_count(&ip0).await?, 4);

    // Move it (same node: the node daemon dumps the source and restores it in the target).
    c.apply("apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {name: move-1}\nspec: {podName: counter-0, targetNode: node-0}\n")?;
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    let m = until("migration done", Duration::from_secs(60), async || {
        let m = migs.get("move-1").await.ok()?;
        m.status
            .as_ref()?
            .phase
            .filter(|p| p.is_terminal())
            .map(|_| m)
    })
    .await?;
    let st = m.status.expect("status");
    assert_eq!(st.phase, Some(MigrationPhase::Succeeded), "{st:?}");
    assert_eq!(
        (st.target_pod.as_deref(), st.source_node.as_deref()),
        (Some("counter-1"), Some("node-0"))
    );
    // The node daemon reports its figures on the target Pod; the Migration shows them.
    let st = until(
        "frozen time reported",
        Duration::from_secs(10),
        async || {
            migs.get("move-1")
                .await
                .ok()?
                .status
                .filter(|s| s.frozen_ms.is_some())
        },
    )
    .await?;
    let report = st.report.clone().expect("report");
    eprintln!(
        "Migration on node-0 (16 MiB app): frozen {:?} ms, {report:?}",
        st.frozen_ms
    );
    assert!(
        report.checkpoint_ms > 0 && report.restore_ms > 0 && report.bytes > 16 << 20,
        "{report:?}"
    );
    assert!(
        st.frozen_ms >= Some(report.checkpoint_ms + report.restore_ms),
        "{st:?}"
    );
    let p1 = running(&pods, "counter-1").await?;
    assert_eq!(
        p1.annotations()
            .get(podmig_api::ANNOTATION_MIGRATION_PHASE)
            .map(String::as_str),
        Some("Restored")
    );
    // Within one node the address cannot be kept (two sandboxes of a node cannot share
    // it): the target has a new one, and an Event says so and why.
    assert_ne!(
        p1.status.as_ref().and_then(|s| s.pod_ip.clone()),
        Some(ip0.clone())
    );
    let events = until(
        "the PodIPNotKept Event",
        Duration::from_secs(20),
        async || {
            let out = c.kubectl(&["get", "events", "-o", "json"]).ok()?;
            out.contains("PodIPNotKept").then_some(out)
        },
    )
    .await?;
    assert!(events.contains("the source runs on this node"), "{events}");
    assert_eq!(
        p1.annotations().get(ANNOTATION_MIGRATE_FROM),
        p0.metadata.uid.as_ref()
    );
    let ip1 = p1.status.and_then(|s| s.pod_ip).unwrap_or_default();
    assert_eq!(
        get_count(&ip1).await?,
        5,
        "the moved Pod continues the count"
    );
    podmig_e2e::wait::pod_gone(&pods, "counter-0", Duration::from_secs(30)).await?;
    until("mpod follows", Duration::from_secs(10), async || {
        (state(&mpods, "counter").await? == (MigratingPodState::Running, "counter-1".into()))
            .then_some(())
    })
    .await?;
    let table = c.kubectl(&["get", "mpod,mig"])?;
    for needle in [
        "STATE",
        "ACTIVE POD",
        "counter-1",
        "PHASE",
        "Succeeded",
        "node-0",
    ] {
        assert!(table.contains(needle), "{needle} missing in:\n{table}");
    }

    // The controller's Events, as kubectl shows them (one Event store, two APIs).
    let described = c.kubectl(&["describe", "mig", "move-1"])?;
    assert!(
        described.contains("MigrationStarted") && described.contains("MigrationSucceeded"),
        "{described}"
    );
    let events = c.kubectl(&["get", "events"])?;
    assert!(events.contains("migration/move-1"), "{events}");
    let rc = c.kubectl(&["get", "runtimeclass"])?;
    assert!(rc.contains("HANDLER") && rc.contains("podmig"), "{rc}");
    let m = metrics(port)?;
    assert!(
        m.contains("podmig_controller_reconciliations_total{kind=\"migratingpod\"}"),
        "{m}"
    );
    assert!(
        m.contains("podmig_controller_moves_total{outcome=\"MigrationSucceeded\"} 1\n"),
        "{m}"
    );

    // Deleting the MigratingPod releases the finalizers and its Pods go.
    c.kubectl(&["delete", "mpod", "counter", "--wait=false"])?;
    podmig_e2e::wait::no_pods(&pods, Duration::from_secs(30)).await?;
    until("mpod gone", Duration::from_secs(10), async || {
        mpods.get_opt("counter").await.ok()?.is_none().then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_on_delete_that_cannot_restore_anywhere_gives_up_to_a_fresh_pod()
-> anyhow::Result<()> {
    let (c, (_ctl, _)) = setup(2).await?;
    // The app keeps a file open that no target finds: CRIU refuses every restore. Two
    // attempts: one on each node.
    c.apply(
        &podmig_e2e::testapp::unrestorable_mpod_yaml("web", 60, 8).replace(
            "migrationTimeoutSeconds: 60",
            "migrationTimeoutSeconds: 60\n  moveAttempts: 2",
        ),
    )?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let p0 = running(&pods, "web-0").await?;
    let node0 = p0
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default();
    c.kubectl(&["delete", "pod", "web-0", "--wait=false"])?;
    // The target is created once, with the annotations naming its source.
    let p1 = until("target", Duration::from_secs(10), async || {
        pods.get_opt("web-1").await.ok()?
    })
    .await?;
    let a = p1.annotations();
    assert_eq!(a.get(ANNOTATION_MIGRATE_FROM), p0.metadata.uid.as_ref());
    assert_eq!(a.get(ANNOTATION_SOURCE_NODE), Some(&node0));
    assert!(
        p1.spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_none()
    );
    let held = pods.get("web-0").await?;
    assert!(
        held.metadata.deletion_timestamp.is_some(),
        "the source is being deleted…"
    );
    // Its restore fails: a second target tries the other node while the source waits.
    let p2 = until("second target", Duration::from_secs(60), async || {
        pods.get_opt("web-2").await.ok()?
    })
    .await?;
    assert_eq!(
        p2.annotations().get(ANNOTATION_MIGRATE_FROM),
        p0.metadata.uid.as_ref(),
        "a second target of the same source"
    );
    // That fails too: the source is let go and a fresh Pod takes over, with Events
    // saying why and that the state is lost.
    let p3 = running(&pods, "web-3").await?;
    assert!(
        p3.annotations().get(ANNOTATION_MIGRATE_FROM).is_none(),
        "a fresh Pod, not a target"
    );
    until(
        "source and targets gone",
        Duration::from_secs(30),
        async || {
            let names: Vec<String> = pods
                .list(&Default::default())
                .await
                .ok()?
                .items
                .iter()
                .map(|p| p.name_any())
                .collect();
            (names == ["web-3"]).then_some(())
        },
    )
    .await?;
    // The Events of the give-up are recorded once its status is written: waited for.
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::default_namespaced(c.client.clone());
    let wanted = [
        "MigrationStarted",
        "MigrationRetrying",
        "MigrationFailed",
        "MigrationStateLost",
    ];
    let events = until(
        "the give-up's Events",
        Duration::from_secs(30),
        async || {
            let items = events.list(&Default::default()).await.ok()?.items;
            wanted
                .iter()
                .all(|w| items.iter().any(|e| e.reason.as_deref() == Some(*w)))
                .then_some(items)
        },
    )
    .await
    .map_err(|e| {
        let seen = tokio::task::block_in_place(|| {
            c.kubectl(&["get", "events", "-o", "wide"])
                .unwrap_or_default()
        });
        anyhow::anyhow!("{e}; wanted {wanted:?}, the Events:\n{seen}")
    })?;
    let lost = events
        .iter()
        .find(|e| e.reason.as_deref() == Some("MigrationStateLost"))
        .and_then(|e| e.note.clone())
        .unwrap_or_default();
    assert!(
        lost.contains("2 move(s)") && lost.contains("web-1 on node-"),
        "{lost}"
    );
    let mpods: Api<MigratingPod> = Api::default_namespaced(c.client.clone());
    let mp = mpods.get("web").await?.status.expect("status");
    assert_eq!(
        mp.last_migration.and_then(|r| r.outcome),
        Some(podmig_api::v1alpha1::Outcome::Failed)
    );
    assert!(mp.failed_attempts.is_empty(), "{:?}", mp.failed_attempts);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_conditions_and_reasons_and_one_leader_acts() -> anyhow::Result<()> {
    let (c, (first, _)) = setup(1).await?;
    let (second, _) = c.start_controller("b")?;
    c.apply("apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {name: empty}\nspec: {template: {spec: {containers: []}}}\n")?;
    let mpods: Api<MigratingPod> = Api::default_namespaced(c.client.clone());
    let st = until("invalid", Duration::from_secs(10), async || {
        mpods
            .get("empty")
            .await
            .ok()?
            .status
            .filter(|s| s.state.is_some())
    })
    .await?;
    assert_eq!(st.state, Some(MigratingPodState::Invalid));
    assert_eq!(st.conditions[0].reason, "NoContainers");
    c.kubectl(&["cordon", "node-0"])?;
    c.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: plain}\nspec: {containers: [{name: app, image: 'podmig.local/testapp:latest'}]}\n")?;
    c.apply("apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {name: ghost}\nspec: {podName: nope}\n---\napiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {name: plain}\nspec: {podName: plain}\n")?;
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    for (name, reason) in [("ghost", "PodNotFound"), ("plain", "NotMigratable")] {
        let st = until(name, Duration::from_secs(45), async || {
            migs.get(name)
                .await
                .ok()?
                .status
                .filter(|s| s.phase == Some(MigrationPhase::Failed))
        })
        .await?;
        assert_eq!(st.reason.as_deref(), Some(reason));
    }
    // Exactly one replica holds the Lease.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::default_namespaced(c.client.clone());
    let holder = leases
        .get("podmig-controller")
        .await?
        .spec
        .and_then(|s| s.holder_identity)
        .unwrap_or_default();
    assert!(holder == "a" || holder == "b", "{holder}");
    // Only the leader acted: it recorded each Migration's progress (within its
    // `reconcile_migration` span); the standby's log has no line of either reconcile
    // (`reconcile_migration`, `sync_mpod`) — nothing was reconciled twice.
    let log_of = |who: &str| {
        std::fs::read_to_string(c.dir.join(format!("controller-{who}.log"))).unwrap_or_default()
    };
    let standby_name = if holder == "a" { "b" } else { "a" };
    let (led, stood_by) = (log_of(&holder), log_of(standby_name));
    assert!(
        led.contains("reconcile_migration") && led.contains("migration progressed"),
        "the leader's log shows its work:\n{led}"
    );
    assert!(
        [
            "reconcile_migration",
            "sync_mpod",
            "reconciling",
            "migration progressed"
        ]
        .iter()
        .all(|w| !stood_by.contains(w)),
        "the standby acted:\n{stood_by}"
    );

    // SIGTERM: the leader stops its controllers and hands the Lease on; the standby leads
    // at its next attempt (2 s), not after the Lease's 15 s.
    let (mut leader, mut standby, other) = if holder == "a" {
        (first, second, "b")
    } else {
        (second, first, "a")
    };
    let stopping = std::time::Instant::now();
    leader.stop(Duration::from_secs(10));
    let stopped = stopping.elapsed();
    assert!(
        stopped < Duration::from_secs(5),
        "the leader took {stopped:?} to exit"
    );
    let took_over = until("the standby leads", Duration::from_secs(20), async || {
        let h = leases
            .get("podmig-controller")
            .await
            .ok()?
            .spec?
            .holder_identity?;
        (h == other).then_some(std::time::Instant::now())
    })
    .await?;
    let handover = took_over - stopping;
    assert!(
        handover < Duration::from_secs(6),
        "handover took {handover:?}"
    );
    let stopping = std::time::Instant::now();
    standby.stop(Duration::from_secs(10));
    assert!(
        stopping.elapsed() < Duration::from_secs(5),
        "a leader exits on SIGTERM"
    );
    Ok(())
}
