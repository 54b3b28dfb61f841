//! `kubectl podmig`, run as a user runs it: the `kubectl-podmig` binary found on the PATH
//! by the real `kubectl`, against the local two-node cluster.

use std::{process::Command, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use podmig_e2e::{
    cluster::Cluster,
    testapp::get_count,
    wait::{node_of, pod_ip as ip, ready_pod as ready},
};

/// `kubectl podmig <args>`: (success, stdout, stderr).
fn kubectl_podmig(c: &Cluster, args: &[&str]) -> (bool, String, String) {
    let path = format!(
        "{}:{}",
        podmig_e2e::paths::bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("kubectl")
        .arg("podmig")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", c.kubeconfig())
        .output()
        .expect("kubectl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mpod_yaml(name: &str) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  strategy: full\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '8']}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_podmig_migrates_with_progress_lists_describes_cancels_and_drains()
-> anyhow::Result<()> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller("a")?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    c.apply(&mpod_yaml("web"))?;
    let p0 = ready(&pods, "web-0", Duration::from_secs(60)).await?;
    podmig_e2e::testapp::wait_count(&ip(&p0), Duration::from_secs(30)).await?;
    let before = get_count(&ip(&p0)).await?;
    let other = if node_of(&p0) == "node-0" {
        "node-1"
    } else {
        "node-0"
    };

    // migrate --wait: a line per phase, then the outcome with its figures.
    let (ok, out, err) = kubectl_podmig(&c, &["migrate", "web-0", "--to", other, "--wait"]);
    assert!(ok, "{out}\n{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("migration.podmig.dev/web-0-") && lines[0].ends_with(" created"),
        "{out}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains(": Scheduling") || l.contains(": Checkpointing")),
        "{out}"
    );
    let last = lines.last().copied().unwrap_or_default();
    assert!(
        last.contains("Succeeded: web runs as web-1 on ")
            && last.contains(other)
            && last.contains("frozen ")
            && last.contains("MiB moved"),
        "{out}"
    );
    let p1 = ready(&pods, "web-1", Duration::from_secs(10)).await?;
    assert_eq!(
        get_count(&ip(&p1)).await?,
        before + 1,
        "moved with its count"
    );

    // list and describe.
    let (ok, list, err) = kubectl_podmig(&c, &["list"]);
    assert!(ok, "{err}");
    assert!(
        list.starts_with("NAME ") && list.contains("Succeeded") && list.contains("web-0"),
        "{list}"
    );
    let name = lines[0]
        .trim_start_matches("migration.podmig.dev/")
        .trim_end_matches(" created")
        .to_owned();
    let (ok, described, err) = kubectl_podmig(&c, &["describe", &name]);
    assert!(ok, "{err}");
    assert!(
        described.contains("Phase:          Succeeded")
            && described.contains("Figures:")
            && described.contains("MigrationSucceeded"),
        "{described}"
    );

    // Errors as kubectl prints them.
    let (ok, _, err) = kubectl_podmig(&c, &["migrate", "nope"]);
    assert!(!ok);
    assert_eq!(
        err.trim(),
        "Error from server (NotFound): pods \"nope\" not found"
    );
    let (ok, _, err) = kubectl_podmig(&c, &["migrate", "web-1", "--strategy", "fast"]);
    assert!(!ok);
    assert!(err.starts_with("error: unknown strategy \"fast\""), "{err}");

    // cancel: a move that waits (for a Pod that does not exist yet) ends Cancelled.
    c.apply("apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {name: later}\nspec: {podName: not-yet}\n")?;
    let (ok, out, err) = kubectl_podmig(&c, &["cancel", "later"]);
    assert!(
        ok && out.contains("migration.podmig.dev/later cancelled"),
        "{out}{err}"
    );
    let migs: Api<podmig_api::v1alpha1::Migration> = Api::default_namespaced(c.client.clone());
    let st = podmig_e2e::wait::until("cancelled", Duration::from_secs(20), async || {
        migs.get("later")
            .await
            .ok()?
            .status
            .filter(|s| s.phase == Some(podmig_api::v1alpha1::MigrationPhase::Failed))
    })
    .await?;
    assert_eq!(st.reason.as_deref(), Some("Cancelled"));
    let (ok, _, err) = kubectl_podmig(&c, &["cancel", "later"]);
    assert!(
        !ok && err.contains("has ended (Failed): nothing to cancel"),
        "{err}"
    );

    // drain: moves the MigratingPod's Pod, leaves a plain Pod, prints a table.
    c.apply(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: plain}}\nspec:\n  nodeName: {other}\n  containers:\n  - {{name: app, image: 'podmig.local/testapp:latest'}}\n"))?;
    ready(&pods, "plain", Duration::from_secs(60)).await?;
    let (ok, out, err) = kubectl_podmig(&c, &["drain", other]);
    assert!(ok, "{out}\n{err}");
    assert!(out.starts_with(&format!("node/{other} cordoned")), "{out}");
    let row = |pod: &str| {
        out.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(pod))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(row("web-1").contains("moved to web-2 on "), "{out}");
    assert!(
        row("plain").contains("left: not of a MigratingPod"),
        "{out}"
    );
    assert!(
        out.trim_end().ends_with(&format!("node/{other} drained")),
        "{out}"
    );
    let p2 = ready(&pods, "web-2", Duration::from_secs(10)).await?;
    assert_ne!(node_of(&p2), other);
    assert_eq!(
        get_count(&ip(&p2)).await?,
        before + 2,
        "drained with its count"
    );
    assert!(
        pods.get("plain").await.is_ok(),
        "the plain Pod is left alone"
    );
    eprintln!("{out}");
    Ok(())
}
