//! The fault soak (`make soak`, a short run in `make test`): cross-node moves (full or
//! lazy) of a small and a 256 MiB MigratingPod back and forth on one local cluster, each
//! with one fault injected at a random moment after its Migration is created — the
//! source's or the target's node daemon killed (SIGKILL; its supervisor restarts it), the
//! controller killed and started again, the source node cut off from the API server and
//! the target for 1–4 s, containerd killed on the source or the target node (its shims
//! and containers live on) and started again, the API server down for 1–4 s, or none — and after each the invariants checked: the Migration
//! ends, exactly one copy of the app answers, its count never went back (a restart would
//! count from 1; only a lazy move whose Migration says the in-memory state is lost may
//! start over, the post-copy policy), and no checkpoint file, CRIU page server or Pod
//! network namespace is left on any node beyond the one copy's, and no kill is held back
//! from the kubelet. Prints a table of fault ×
//! outcome.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::ListParams};
use podmig_api::v1alpha1::{Migration, MigrationPhase};

use crate::{
    cluster::Cluster,
    testapp::{get_count, wait_count},
    wait::{migration_ended, node_of, pod_ip, ready_pod, until},
};

/// A fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// None: the control.
    None,
    /// The source node's daemon killed.
    SourceDaemon,
    /// The target node's daemon killed.
    TargetDaemon,
    /// The controller killed, then started again.
    Controller,
    /// The source node cut off from the API server and the target for 1–4 s.
    LinkCut,
    /// The source node's containerd killed (SIGKILL) and started again.
    SourceContainerd,
    /// The target node's containerd killed (SIGKILL) and started again.
    TargetContainerd,
    /// The API server down for 1–4 s (connections and watches dropped, objects kept).
    ApiServerDown,
}

impl Fault {
    const ALL: [Fault; 8] = [
        Fault::None,
        Fault::SourceDaemon,
        Fault::TargetDaemon,
        Fault::Controller,
        Fault::LinkCut,
        Fault::SourceContainerd,
        Fault::TargetContainerd,
        Fault::ApiServerDown,
    ];

    fn name(self) -> &'static str {
        match self {
            Fault::None => "none",
            Fault::SourceDaemon => "kill -9 source daemon",
            Fault::TargetDaemon => "kill -9 target daemon",
            Fault::Controller => "kill -9 controller",
            Fault::LinkCut => "source node cut off 1-4 s",
            Fault::SourceContainerd => "kill -9 source containerd",
            Fault::TargetContainerd => "kill -9 target containerd",
            Fault::ApiServerDown => "API server down 1-4 s",
        }
    }

    /// Whether a move must succeed despite this fault: the control, the controller
    /// restarted (the daemons carry the move; the new leader picks up its record), the
    /// source node cut off for a few seconds (fencing: the source waits, then settles
    /// from the target's record). A killed daemon or containerd, or the API server gone,
    /// may end a move `Failed` with the source resumed — never with two copies.
    pub fn must_succeed(self) -> bool {
        matches!(self, Fault::None | Fault::Controller | Fault::LinkCut)
    }
}

/// A small deterministic generator (xorshift64*): a soak is replayed from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// One move of the soak and how it ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The fault injected.
    pub fault: Fault,
    /// The app's memory, MiB.
    pub mib: u32,
    /// The move's strategy (`full` or `lazy`).
    pub strategy: &'static str,
    /// When the fault came, ms after the Migration was created.
    pub at_ms: u64,
    /// The Migration's end: its phase, and its reason when it failed.
    pub end: String,
    /// The count before the move and the count after it.
    pub counts: (u64, u64),
}

fn mpod_yaml(name: &str, mib: u32) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  strategy: full\n  migrationTimeoutSeconds: 60\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '{mib}']}}\n"
    )
}

/// The one copy of an app that answers, as [`the_one_copy`] found it.
#[derive(Debug)]
pub struct OneCopy {
    /// A Pod at whose address the copy answered (one of them, when Pods share a kept
    /// address).
    pub pod: Pod,
    /// Its count, as its last answer said.
    pub count: u64,
    /// How many `GET /count` the search sent to that address, the last included: a copy
    /// started afresh there could count at most this far.
    pub polls: u64,
}

/// The one copy of app `name` (Pods labelled `app`) that answers, and its count. Fails at
/// once when two addresses answer in the same look (two copies run: never allowed), and
/// when none answers within `within`. Pods that share an address (a kept address: the
/// new Pod and its frozen source) are asked once per look, so one copy is never taken for
/// two.
pub async fn the_one_copy(
    pods: &Api<Pod>,
    name: &str,
    within: Duration,
) -> anyhow::Result<OneCopy> {
    let deadline = tokio::time::Instant::now() + within;
    let mut polls: std::collections::HashMap<String, u64> = Default::default();
    let mut last = String::new();
    loop {
        if let Ok(list) = pods
            .list(&ListParams::default().labels(&format!("app={name}")))
            .await
        {
            let mut by_ip: Vec<(String, Vec<Pod>)> = Vec::new();
            for p in list
                .items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
            {
                let ip = pod_ip(&p);
                if ip.is_empty() {
                    continue;
                }
                match by_ip.iter_mut().find(|(i, _)| *i == ip) {
                    Some((_, group)) => group.push(p),
                    None => by_ip.push((ip, vec![p])),
                }
            }
            let mut answers = Vec::new();
            for (ip, group) in by_ip {
                *polls.entry(ip.clone()).or_default() += 1;
                if let Ok(n) = get_count(&ip).await {
                    answers.push((ip, group, n));
                }
            }
            last = format!(
                "answering: {:?}",
                answers
                    .iter()
                    .map(|(ip, g, n)| (
                        ip.clone(),
                        g.iter()
                            .map(|p| (p.name_any(), node_of(p)))
                            .collect::<Vec<_>>(),
                        *n
                    ))
                    .collect::<Vec<_>>()
            );
            if answers.len() > 1 {
                anyhow::bail!("two copies of {name} answered at once: {last}");
            }
            if let Some((ip, mut group, count)) = answers.pop() {
                return Ok(OneCopy {
                    pod: group.remove(0),
                    count,
                    polls: polls.get(&ip).copied().unwrap_or(1),
                });
            }
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("no copy of {name} answered within {within:?}; last look {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn checkpoint_files(c: &Cluster) -> Vec<std::path::PathBuf> {
    c.nodes
        .iter()
        .flat_map(|n| crate::paths::files_under(&n.daemon.checkpoint_dir()))
        .collect()
}

/// Node `n`'s `podmig_held_kills` gauge, read from its daemon's `/metrics` (None when
/// the daemon does not answer, e.g. while it restarts).
fn held_kills(c: &Cluster, n: usize, token: &str) -> Option<u64> {
    let (code, body) = tokio::task::block_in_place(|| {
        crate::daemon_api::curl(c, n, "GET", "/metrics", Some(token), None)
    })
    .ok()?;
    (code == 200).then_some(())?;
    body.lines()
        .find_map(|l| l.strip_prefix("podmig_held_kills "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Runs `moves` faulted moves (seeded by `seed`); returns every outcome, or the first
/// broken invariant.
pub async fn run(
    moves: usize,
    sizes: &[u32],
    seed: u64,
    containerd: &[crate::containerd::ContainerdVersion],
) -> anyhow::Result<Vec<Outcome>> {
    let mut c = Cluster::up_temp_with(2, containerd).await?;
    c.install_crds()?;
    let mut controller = Some(c.start_controller("soak")?.0);
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let migrations: Api<Migration> = Api::default_namespaced(c.client.clone());
    let apps: Vec<(String, u32)> = sizes.iter().map(|m| (format!("soak-{m}"), *m)).collect();
    for (name, mib) in &apps {
        c.apply(&mpod_yaml(name, *mib))?;
    }
    for (name, _) in &apps {
        let p = ready_pod(&pods, &format!("{name}-0"), Duration::from_secs(180)).await?;
        wait_count(&pod_ip(&p), Duration::from_secs(120)).await?;
    }
    let mut rng = Rng(seed | 1);
    let first_fault = rng.below(Fault::ALL.len() as u64) as usize;
    let admin = c.token_for("soak-admin", &["system:masters", "system:authenticated"])?;
    let mut out = Vec::new();
    for i in 0..moves {
        let (name, mib) = apps[i % apps.len()].clone();
        // Faults in turn from a seeded start: a short soak tries each at least once.
        let fault = Fault::ALL[(first_fault + i) % Fault::ALL.len()];
        let at_ms = rng.below(if mib > 64 { 2500 } else { 1000 });
        let strategy = ["full", "lazy"][rng.below(2) as usize];
        let OneCopy {
            pod, count: before, ..
        } = the_one_copy(&pods, &name, Duration::from_secs(60)).await?;
        let src = c
            .nodes
            .iter()
            .position(|n| n.name == node_of(&pod))
            .unwrap_or(0);
        let dst = 1 - src;
        let m = format!("{name}-m{i}");
        c.apply(&format!(
            "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {m}}}\nspec: {{podName: {}, targetNode: {}, strategy: {strategy}, timeoutSeconds: 60}}\n",
            pod.name_any(),
            c.nodes[dst].name
        ))?;
        tokio::time::sleep(Duration::from_millis(at_ms)).await;
        match fault {
            Fault::None => {}
            Fault::SourceDaemon => c.nodes[src].daemon.kill(),
            Fault::TargetDaemon => c.nodes[dst].daemon.kill(),
            Fault::Controller => {
                if let Some(p) = controller.take() {
                    tokio::task::block_in_place(|| drop(p));
                }
                controller = Some(c.start_controller("soak")?.0);
            }
            Fault::LinkCut => {
                let cut = c.cut_off(src)?;
                tokio::time::sleep(Duration::from_millis(1000 + rng.below(3000))).await;
                cut.heal();
            }
            Fault::SourceContainerd => c.kill_containerd(src)?,
            Fault::TargetContainerd => c.kill_containerd(dst)?,
            Fault::ApiServerDown => {
                let down = Duration::from_millis(1000 + rng.below(3000));
                c.restart_apiserver(down).await?;
            }
        }
        let context = |what: String| {
            anyhow::anyhow!(
                "move {i} of {name} ({mib} MiB, {strategy}) from {} to {}, {} at {at_ms} ms: {what}",
                c.nodes[src].name,
                c.nodes[dst].name,
                fault.name()
            )
        };
        let st = migration_ended(&migrations, &m, Duration::from_secs(150))
            .await
            .map_err(|e| context(e.to_string()))?;
        let phase = st.phase.unwrap_or(MigrationPhase::Failed);
        let end = match (phase, st.reason.as_deref()) {
            (MigrationPhase::Failed, Some(r)) => format!("Failed ({r})"),
            (p, _) => format!("{p:?}"),
        };
        if fault.must_succeed() && phase != MigrationPhase::Succeeded {
            return Err(context(format!(
                "a move must survive this fault, it ended {end}: {:?}\n{}",
                st.message,
                c.daemon_log_tails(30)
            )));
        }
        let OneCopy { count: after, .. } = the_one_copy(&pods, &name, Duration::from_secs(90))
            .await
            .map_err(|e| {
                let all = tokio::task::block_in_place(|| {
                    c.kubectl(&["get", "pods,mig", "-o", "wide"])
                        .unwrap_or_default()
                });
                context(format!("{e} ({end})\n{all}\n{}", c.daemon_log_tails(30)))
            })?;
        // A lazy target that ran loses the state when its pages cannot all arrive — the
        // policy, said by the Migration; the source never resumes then (never two). Any
        // other step back is a lost state.
        let lost_on_purpose = strategy == "lazy"
            && phase == MigrationPhase::Failed
            && st
                .message
                .as_deref()
                .is_some_and(|m| m.contains("in-memory state is lost"));
        if after < before && !lost_on_purpose {
            return Err(context(format!(
                "the count went back from {before} to {after} ({phase:?})"
            )));
        }
        let end = if after < before {
            format!("{end}, state lost (lazy)")
        } else {
            end
        };
        until("no checkpoint left", Duration::from_secs(60), async || {
            checkpoint_files(&c).is_empty().then_some(())
        })
        .await
        .map_err(|e| context(format!("{e}: {:?}", checkpoint_files(&c))))?;
        // Nor a CRIU page server, nor a sandbox: one network namespace per app.
        until("no CRIU helper left", Duration::from_secs(30), async || {
            c.criu_helpers().is_empty().then_some(())
        })
        .await
        .map_err(|e| {
            // Which helper, and what the daemons did: a leftover is found by the next run.
            let helpers: Vec<String> = c
                .criu_helpers()
                .iter()
                .map(|pid| {
                    let argv = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    format!(
                        "{pid}: {}",
                        String::from_utf8_lossy(&argv).replace('\0', " ")
                    )
                })
                .collect();
            context(format!("{e}: {helpers:?}\n{}", c.daemon_log_tails(40)))
        })?;
        until(
            "one network namespace per app",
            Duration::from_secs(60),
            async || (c.pod_namespaces().len() == apps.len()).then_some(()),
        )
        .await
        .map_err(|e| context(format!("{e}: {:?}", c.pod_namespaces())))?;
        // Nor a kill the daemons still hold back from the kubelet.
        until("no held kill", Duration::from_secs(60), async || {
            (0..c.nodes.len())
                .all(|n| held_kills(&c, n, &admin) == Some(0))
                .then_some(())
        })
        .await
        .map_err(|e| {
            let held: Vec<Option<u64>> = (0..c.nodes.len())
                .map(|n| held_kills(&c, n, &admin))
                .collect();
            context(format!("{e}: podmig_held_kills per node {held:?}"))
        })?;
        // A daemon killed again soon is restarted after the supervisor's back-off (10 s,
        // doubling up to 5 min, as kubelet's for a crashing container).
        for n in &c.nodes {
            n.daemon
                .wait_serving(Duration::from_secs(330))
                .map_err(|e| context(e.to_string()))?;
        }
        eprintln!(
            "soak {i}: {name} {strategy} {} -> {}, {} at {at_ms} ms: {end}, count {before} -> {after}",
            c.nodes[src].name,
            c.nodes[dst].name,
            fault.name()
        );
        out.push(Outcome {
            fault,
            mib,
            strategy,
            at_ms,
            end,
            counts: (before, after),
        });
    }
    drop(controller);
    tokio::task::block_in_place(|| drop(c));
    Ok(out)
}

/// The table of fault × outcome (moves per cell).
pub fn table(outcomes: &[Outcome]) -> String {
    let mut cells: BTreeMap<(Fault, String), usize> = BTreeMap::new();
    let mut phases: Vec<String> = Vec::new();
    for o in outcomes {
        let p = o.end.clone();
        if !phases.contains(&p) {
            phases.push(p.clone());
        }
        *cells.entry((o.fault, p)).or_default() += 1;
    }
    phases.sort();
    let mut s = format!("| fault | {} | moves |\n", phases.join(" | "));
    s.push_str(&format!("| --- |{} --- |\n", " --- |".repeat(phases.len())));
    for f in Fault::ALL {
        let row: Vec<usize> = phases
            .iter()
            .map(|p| cells.get(&(f, p.clone())).copied().unwrap_or(0))
            .collect();
        let total: usize = row.iter().sum();
        if total == 0 {
            continue;
        }
        let cols: Vec<String> = row.iter().map(ToString::to_string).collect();
        s.push_str(&format!(
            "| {} | {} | {total} |\n",
            f.name(),
            cols.join(" | ")
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_counts_moves_per_fault_and_outcome() {
        let o = |fault, end: &str| Outcome {
            fault,
            mib: 16,
            strategy: "full",
            at_ms: 0,
            end: end.into(),
            counts: (3, 4),
        };
        let t = table(&[
            o(Fault::None, "Succeeded"),
            o(Fault::SourceDaemon, "Failed (RolledBack)"),
            o(Fault::SourceDaemon, "Succeeded"),
        ]);
        assert!(
            t.contains("| fault | Failed (RolledBack) | Succeeded | moves |"),
            "{t}"
        );
        assert!(t.contains("| kill -9 source daemon | 1 | 1 | 2 |"), "{t}");
        assert!(t.contains("| none | 0 | 1 | 1 |"), "{t}");
        assert!(!t.contains("controller"), "{t}");
    }

    #[test]
    fn a_seed_replays_the_same_faults() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        let xs: Vec<u64> = (0..5).map(|_| a.below(4)).collect();
        let ys: Vec<u64> = (0..5).map(|_| b.below(4)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| *x < 4));
    }
}
