//! containerd 2.x nodes (runc 1.3, configuration version 3) beside containerd 1.6 nodes
//! (runc 1.1), as during a rolling node upgrade: a Pod moves from the old runtime to the
//! new one and back with its state, full and lazy, and each node reports its runtime.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use podmig_api::v1alpha1::MigrationPhase;
use podmig_e2e::{
    cluster::Cluster,
    containerd::ContainerdVersion,
    testapp::{get_count, wait_count},
    wait::{node_of, pod_ip, ready_pod},
};

fn mpod_yaml(name: &str) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  strategy: full\n  migrationTimeoutSeconds: 60\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      nodeSelector: {{kubernetes.io/hostname: node-0}}\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '32']}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_between_a_containerd_1_node_and_a_containerd_2_node_keep_the_count()
-> anyhow::Result<()> {
    let c = Cluster::up_temp_with(2, &[ContainerdVersion::V1, ContainerdVersion::V2]).await?;
    c.install_crds()?;
    let _ctl = c.start_controller("c2")?;
    let nodes: Api<Node> = Api::all(c.client.clone());
    for (name, want) in [("node-0", "containerd://1."), ("node-1", "containerd://2.")] {
        let runtime = nodes
            .get(name)
            .await?
            .status
            .and_then(|s| s.node_info)
            .map(|i| i.container_runtime_version)
            .unwrap_or_default();
        assert!(runtime.starts_with(want), "{name} runs {runtime}");
    }
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    c.apply(&mpod_yaml("upgrade"))?;
    let p0 = ready_pod(&pods, "upgrade-0", Duration::from_secs(120)).await?;
    wait_count(&pod_ip(&p0), Duration::from_secs(60)).await?;
    // To the other runtime (full), then back (lazy): each time the count goes on.
    let (first, back) = if node_of(&p0) == "node-0" {
        ("node-1", "node-0")
    } else {
        ("node-0", "node-1")
    };
    let mut ip = pod_ip(&p0);
    for (i, (to, strategy)) in [(first, "full"), (back, "lazy")].iter().enumerate() {
        let before = get_count(&ip).await?;
        let from = format!("upgrade-{i}");
        c.apply(&format!(
            "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: up-{i}}}\nspec: {{podName: {from}, targetNode: {to}, strategy: {strategy}, timeoutSeconds: 60}}\n"
        ))?;
        let migs: Api<podmig_api::v1alpha1::Migration> = Api::default_namespaced(c.client.clone());
        let st =
            podmig_e2e::wait::migration_ended(&migs, &format!("up-{i}"), Duration::from_secs(120))
                .await?;
        let logs = c.daemon_log_tails(30);
        assert_eq!(
            st.phase,
            Some(MigrationPhase::Succeeded),
            "{from} -> {to} ({strategy}): {st:?}\n{logs}"
        );
        let moved = ready_pod(
            &pods,
            &format!("upgrade-{}", i + 1),
            Duration::from_secs(60),
        )
        .await?;
        assert_eq!(node_of(&moved), *to);
        ip = pod_ip(&moved);
        assert_eq!(
            get_count(&ip).await?,
            before + 1,
            "{from} -> {to} ({strategy}) kept the count"
        );
    }
    Ok(())
}
