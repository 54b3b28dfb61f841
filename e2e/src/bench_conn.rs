//! `make bench`'s connections part: what a client of a Service sees of a cross-node move
//! that keeps the Pod's address. Per size, a MigratingPod behind a Service on node-0, a
//! client polling `GET /count` through the ClusterIP every 10 ms (a refused or failed
//! request is tried again) and another holding `GET /stream` open through it; a
//! `Migration` to node-1. Printed: the frozen time, the held connection's longest pause
//! between two ticks and the longest wait of the polling client, each also less the frozen
//! time (the targets: pause ≤ frozen + 100 ms, wait ≤ frozen + 200 ms).

use std::time::{Duration, Instant};

use kube::Api;
use podmig_api::v1alpha1::{Migration, MigrationPhase};

use crate::{
    bench::median,
    cluster::Cluster,
    testapp::{HeldStream, get_count_at},
    wait::until,
};

/// One move's figures.
#[derive(Debug, Clone, Copy)]
pub struct ConnSample {
    /// Frozen time the daemons reported.
    pub frozen: Duration,
    /// The held connection's longest pause between ticks.
    pub held_gap: Duration,
    /// The polling client's longest wait for an answer.
    pub service_wait: Duration,
    /// The held connection went on (no reset, no lost tick).
    pub kept: bool,
}

async fn once(c: &Cluster, mem: u64, run: usize, keep: bool) -> anyhow::Result<ConnSample> {
    let name = format!("conn{}{mem}r{run}", if keep { "k" } else { "n" });
    c.apply(&format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  strategy: full\n  keepIP: {keep}\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      nodeName: node-0\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '{mem}']}}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {name}}}\n  ports:\n  - {{port: 80, targetPort: 8080}}\n"
    ))?;
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::default_namespaced(c.client.clone());
    let ip = until("a ClusterIP", Duration::from_secs(10), async || {
        svcs.get(&name).await.ok()?.spec?.cluster_ip
    })
    .await?;
    until(
        "the Service answers",
        Duration::from_secs(120 + mem / 10),
        async || get_count_at(&ip, 80).await.ok(),
    )
    .await?;
    let held = HeldStream::open(&ip, 80)?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let poller = tokio::spawn(crate::demo::poll(
        ip.clone(),
        80,
        Duration::from_millis(10),
        stopped,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let from = Instant::now();
    c.apply(&format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec: {{podName: {name}-0, targetNode: node-1, strategy: full}}\n"
    ))?;
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    let st = until("migration done", Duration::from_secs(300), async || {
        migs.get(&name)
            .await
            .ok()?
            .status
            // The frozen time comes with the daemons' report, just after the phase.
            .filter(|s| {
                s.phase == Some(MigrationPhase::Failed)
                    || s.phase.is_some_and(MigrationPhase::is_terminal) && s.frozen_ms.is_some()
            })
    })
    .await?;
    anyhow::ensure!(
        st.phase == Some(MigrationPhase::Succeeded),
        "move failed: {:?}",
        st.message
    );
    let done = Instant::now();
    // A connection that neither ticks again nor ends within 10 s hangs: not kept.
    let ticking = until(
        "ticks after the move",
        Duration::from_secs(10),
        async || (held.ticks_since(done) >= 3 || held.ended().is_some()).then_some(()),
    )
    .await
    .is_ok()
        && held.ticks_since(done) >= 3;
    // The Service answers from the target (a new address needs its endpoint first); if
    // it never does, the client's wait runs to the end of the run and says so.
    let _ = until(
        "the Service answers after the move",
        Duration::from_secs(30),
        async || get_count_at(&ip, 80).await.ok(),
    )
    .await;
    let held_gap = held.longest_gap();
    let stopped_at = Instant::now();
    let _ = stop.send(());
    let answers = poller.await.unwrap_or_default();
    let ticks = held.numbers();
    let kept = ticking && held.ended().is_none() && ticks.windows(2).all(|w| w[1] == w[0] + 1);
    c.kubectl(&["delete", "mpod,svc", &name, "--wait=true", "--timeout=60s"])?;
    Ok(ConnSample {
        frozen: Duration::from_millis(st.frozen_ms.unwrap_or(0)),
        held_gap,
        service_wait: crate::demo::longest_gap(&answers, from, stopped_at),
        kept,
    })
}

/// Measures `runs` moves per size, keeping the address and not, and prints the table.
pub async fn connections(c: &Cluster, sizes: &[u64], runs: usize) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for &mem in sizes {
        for keep in [true, false] {
            let mut samples = Vec::new();
            for run in 0..runs {
                let s = once(c, mem, run, keep).await?;
                eprintln!(
                    "connections mem={mem}MiB keepIP={keep} run={run}: frozen {} ms, held pause {} ms, Service wait {} ms, kept {}",
                    s.frozen.as_millis(),
                    s.held_gap.as_millis(),
                    s.service_wait.as_millis(),
                    s.kept
                );
                samples.push(s);
            }
            rows.push((mem, keep, samples));
        }
    }
    println!();
    println!(
        "connections through a Service across a cross-node move, medians of {runs} (ms); keepIP false: the target has a new address, connections end, the Service follows the new endpoint:"
    );
    println!(
        "| mem MiB | keepIP | frozen | held connection longest pause | pause − frozen | Service client longest wait | wait − frozen | connections kept |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for (mem, keep, s) in &rows {
        let m = |f: &dyn Fn(&ConnSample) -> Duration| median(s.iter().map(f).collect());
        let (frozen, wait) = (m(&|x| x.frozen), m(&|x| x.service_wait));
        // The pause of a held connection is a figure only where the connection went on:
        // runs whose connection ended or hung are left out of its median (and counted in
        // the last column).
        let gap = median(s.iter().filter(|x| x.kept).map(|x| x.held_gap).collect());
        let less = |d: Duration| d.as_millis() as i128 - frozen.as_millis() as i128;
        let kept = s.iter().filter(|x| x.kept).count();
        // A connection that ended has no pause to speak of.
        let (gap, gap_less) = if kept == 0 {
            ("-".to_owned(), "-".to_owned())
        } else {
            (gap.as_millis().to_string(), less(gap).to_string())
        };
        println!(
            "| {mem} | {keep} | {} | {gap} | {gap_less} | {} | {} | {kept}/{} |",
            frozen.as_millis(),
            wait.as_millis(),
            less(wait),
            s.len()
        );
    }
    Ok(())
}
