//! `make bench-cluster`'s drain part: `kubectl drain` of a node holding `pods`
//! MigratingPods of `mib` MiB each, through the eviction webhook with the default limits
//! (2 moves per node), against one move of such a Pod alone and against the same drain of
//! a Deployment's Pods (plain eviction: they restart). Printed per run and as medians: the
//! drain's wall time against the bound (1.5 × pods / per-node limit × one move),
//! each Pod's frozen time and longest unanswered gap against the move alone, and whether
//! any Pod restarted (its count went back).

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};
use podmig_api::v1alpha1::{Migration, MigrationPhase};

use crate::{
    bench::median,
    cluster::Cluster,
    testapp::get_count,
    wait::{pod_ip, ready_pod, until},
};

/// Moves at once per node (the controller's default the bound is computed with).
const PER_NODE: u32 = 2;

fn mpod(name: &str, mib: u64) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  strategy: full\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      nodeName: node-0\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '{mib}']}}\n"
    )
}

/// Polls every Pod's `GET /count` at its (kept) address every 20 ms until `stop`: per
/// Pod the longest time without an answer, and whether the count ever went back.
fn poll_all(
    targets: Vec<(String, String)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<BTreeMap<String, (Duration, bool)>> {
    tokio::spawn(async move {
        let mut out = BTreeMap::new();
        let mut last: BTreeMap<String, (Instant, u64)> = targets
            .iter()
            .map(|(n, _)| (n.clone(), (Instant::now(), 0)))
            .collect();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for (name, ip) in &targets {
                if let Ok(count) = get_count(ip).await {
                    let (at, prev) = last.get(name).copied().unwrap_or((Instant::now(), 0));
                    let entry = out.entry(name.clone()).or_insert((Duration::ZERO, false));
                    entry.0 = entry.0.max(at.elapsed());
                    entry.1 |= count < prev;
                    last.insert(name.clone(), (Instant::now(), count));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The silence since each Pod's last answer counts to the end of the run; a Pod
        // that never answered was silent all along.
        for (name, (at, _)) in &last {
            let entry = out.entry(name.clone()).or_insert((Duration::ZERO, false));
            entry.0 = entry.0.max(at.elapsed());
        }
        out
    })
}

/// One drain of `pods` MigratingPods: (drain time, per Pod (frozen, longest gap,
/// restarted)).
async fn podmig_drain(
    pods: usize,
    mib: u64,
) -> anyhow::Result<(Duration, Vec<(Duration, Duration, bool)>)> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller_with_webhook("bench", "Fail", &[])?;
    let api: Api<Pod> = Api::default_namespaced(c.client.clone());
    let mut targets = Vec::new();
    for i in 0..pods {
        c.apply(&mpod(&format!("d{i}"), mib))?;
    }
    for i in 0..pods {
        let p = ready_pod(&api, &format!("d{i}-0"), Duration::from_secs(120)).await?;
        crate::testapp::wait_count(&pod_ip(&p), Duration::from_secs(60)).await?;
        targets.push((format!("d{i}"), pod_ip(&p)));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = poll_all(targets, stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    c.kubectl(&["drain", "node-0", "--ignore-daemonsets", "--timeout=600s"])?;
    let took = t.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let gaps = poller.await?;
    let migrations: Api<Migration> = Api::default_namespaced(c.client.clone());
    let done = until("every report", Duration::from_secs(30), async || {
        let l = migrations.list(&ListParams::default()).await.ok()?.items;
        (l.len() == pods
            && l.iter().all(|m| {
                m.status.as_ref().is_some_and(|s| {
                    s.phase == Some(MigrationPhase::Succeeded) && s.frozen_ms.is_some()
                })
            }))
        .then_some(l)
    })
    .await?;
    let mut out = Vec::new();
    for m in done {
        let frozen = Duration::from_millis(m.status.and_then(|s| s.frozen_ms).unwrap_or(0));
        let name = m.spec.pod_name.trim_end_matches("-0").to_owned();
        let (gap, restarted) = gaps
            .get(&name)
            .copied()
            .ok_or_else(|| anyhow::anyhow!("no figures for {name}"))?;
        out.push((frozen, gap, restarted));
    }
    tokio::task::block_in_place(|| drop(c));
    Ok((took, out))
}

/// One move of one such Pod alone: (time from the Migration to its success, frozen).
async fn alone(mib: u64) -> anyhow::Result<(Duration, Duration)> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller_with_webhook("bench", "Fail", &[])?;
    let api: Api<Pod> = Api::default_namespaced(c.client.clone());
    c.apply(&mpod("solo", mib))?;
    let p = ready_pod(&api, "solo-0", Duration::from_secs(120)).await?;
    crate::testapp::wait_count(&pod_ip(&p), Duration::from_secs(60)).await?;
    let t = Instant::now();
    c.apply("apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {name: solo}\nspec: {podName: solo-0, targetNode: node-1, strategy: full}\n")?;
    let migrations: Api<Migration> = Api::default_namespaced(c.client.clone());
    let frozen = until("the move", Duration::from_secs(300), async || {
        let s = migrations.get("solo").await.ok()?.status?;
        (s.phase == Some(MigrationPhase::Succeeded))
            .then_some(())
            .and(s.frozen_ms)
    })
    .await?;
    let took = t.elapsed();
    tokio::task::block_in_place(|| drop(c));
    Ok((took, Duration::from_millis(frozen)))
}

/// The same drain of a Deployment's `pods` Pods (plain eviction): the drain time and the
/// time until all replicas run again elsewhere (their state starts over).
async fn plain_drain(pods: usize, mib: u64) -> anyhow::Result<(Duration, Duration)> {
    let c = Cluster::up_temp(2).await?;
    c.kubectl(&["cordon", "node-1"])?;
    c.apply(&format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: plain}}\nspec:\n  replicas: {pods}\n  selector: {{matchLabels: {{app: plain}}}}\n  template:\n    metadata: {{labels: {{app: plain}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '{mib}']}}\n"
    ))?;
    let api: Api<Pod> = Api::default_namespaced(c.client.clone());
    let ready_on = |node: &'static str| {
        let api = api.clone();
        async move {
            let l = api
                .list(&ListParams::default().labels("app=plain"))
                .await
                .ok()?
                .items;
            let n = l
                .iter()
                .filter(|p| {
                    crate::wait::is_ready(p)
                        && p.metadata.deletion_timestamp.is_none()
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
                })
                .count();
            (n == pods).then_some(())
        }
    };
    until("replicas on node-0", Duration::from_secs(180), async || {
        ready_on("node-0").await
    })
    .await?;
    c.kubectl(&["uncordon", "node-1"])?;
    let t = Instant::now();
    c.kubectl(&["drain", "node-0", "--ignore-daemonsets", "--timeout=600s"])?;
    let drained = t.elapsed();
    until("replicas on node-1", Duration::from_secs(300), async || {
        ready_on("node-1").await
    })
    .await?;
    let back = t.elapsed();
    tokio::task::block_in_place(|| drop(c));
    Ok((drained, back))
}

/// Runs the drain benchmark `runs` times and prints the table and one machine line.
pub async fn run(runs: usize, pods: usize, mib: u64) -> anyhow::Result<()> {
    let (mut drains, mut moves, mut frozen_alone) = (Vec::new(), Vec::new(), Vec::new());
    let (mut frozen_each, mut gaps_each) = (Vec::new(), Vec::new());
    let (mut plain_drains, mut plain_back) = (Vec::new(), Vec::new());
    let mut restarted = 0;
    for run in 0..runs {
        let (m, f) = alone(mib).await?;
        let (d, per_pod) = podmig_drain(pods, mib).await?;
        let (pd, pb) = plain_drain(pods, mib).await?;
        let worst = per_pod.iter().map(|p| p.0).max().unwrap_or_default();
        println!(
            "run {run}: one move {} ms (frozen {} ms); drain of {pods} × {mib} MiB {} ms, frozen max {} ms, longest gap {} ms; plain eviction: drain {} ms, all running again after {} ms",
            m.as_millis(),
            f.as_millis(),
            d.as_millis(),
            worst.as_millis(),
            per_pod
                .iter()
                .map(|p| p.1)
                .max()
                .unwrap_or_default()
                .as_millis(),
            pd.as_millis(),
            pb.as_millis()
        );
        restarted += per_pod.iter().filter(|p| p.2).count();
        frozen_each.extend(per_pod.iter().map(|p| p.0));
        gaps_each.extend(per_pod.iter().map(|p| p.1));
        moves.push(m);
        frozen_alone.push(f);
        drains.push(d);
        plain_drains.push(pd);
        plain_back.push(pb);
    }
    let (m, f, d) = (median(moves), median(frozen_alone), median(drains));
    let frozen_max = frozen_each.iter().max().copied().unwrap_or_default();
    let frozen_med = median(frozen_each);
    let gap_med = median(gaps_each);
    let bound = m.mul_f64(1.5 * pods as f64 / f64::from(PER_NODE));
    println!(
        "\ndrain of {pods} MigratingPods × {mib} MiB, medians of {runs} (limits: 2 per node, 5 per cluster):\n\
         | | median | against |\n| --- | --- | --- |\n\
         | one move alone (Migration → Succeeded) | {} ms | |\n\
         | drain through the webhook | {} ms | bound 1.5 × {pods}/2 × one move = {} ms: {} |\n\
         | frozen per Pod (median / max) | {} / {} ms | alone {} ms: ×{:.2} / ×{:.2} |\n\
         | longest unanswered gap per Pod (median) | {} ms | |\n\
         | Pods restarted | {restarted} | |\n\
         | plain eviction (Deployment): drain / all running again | {} / {} ms | state lost |",
        m.as_millis(),
        d.as_millis(),
        bound.as_millis(),
        if d <= bound { "met" } else { "missed" },
        frozen_med.as_millis(),
        frozen_max.as_millis(),
        f.as_millis(),
        frozen_med.as_secs_f64() / f.as_secs_f64().max(0.001),
        frozen_max.as_secs_f64() / f.as_secs_f64().max(0.001),
        gap_med.as_millis(),
        median(plain_drains).as_millis(),
        median(plain_back).as_millis(),
    );
    println!(
        "podmig-bench-drain pods={pods} mib={mib} runs={runs} move_ms={} drain_ms={} bound_ms={} frozen_alone_ms={} frozen_median_ms={} frozen_max_ms={} restarted={restarted}",
        m.as_millis(),
        d.as_millis(),
        bound.as_millis(),
        f.as_millis(),
        frozen_med.as_millis(),
        frozen_max.as_millis()
    );
    Ok(())
}
