//! `make bench`: downtime of moving the test app from node-0 to node-1 of the local
//! cluster, as a client sees it, for three strategies measured interleaved in one run:
//! - `podmig`: a `Migration` (target created first, source frozen late, state streamed
//!   daemon to daemon, restored at once);
//! - `lazy`: the same with `strategy: lazy` (only the process skeleton during the freeze,
//!   memory faulted in afterwards; the time until every page arrived is printed too);
//! - `restart`: what Kubernetes does today — delete the Pod, create a new one;
//! - `thesis`: the thesis' order — dump the source fully into a shared directory (disk),
//!   copy it to the target node, then create the target Pod, which restores it.
//!
//! A client probes the app every 10 ms at both the old and the new address; downtime is
//! the longest gap between two answers during the move.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt, api::DeleteParams};
use podmig_api::v1alpha1::{Migration, MigrationPhase};

use crate::{bench::median, cluster::Cluster, testapp::wait_count, wait::until};

/// One strategy's measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    downtime: Duration,
    frozen: Option<Duration>,
    kept_state: bool,
    /// Lazy moves: from the resume until every page had arrived.
    pages: Option<Duration>,
    /// Bytes the move carried.
    bytes: Option<u64>,
    /// Median time the app took to answer before the move and after it (until the move
    /// ended: for a lazy move, the degraded window).
    latency: (Duration, Duration),
    /// `auto`: the strategy it chose and the full move's estimated frozen time, ms.
    chose: Option<(&'static str, u64)>,
    /// Rates of the move's phases, MB/s: the pages streamed during the dump, the restore,
    /// the lazy pages after the resume (0: the phase did not run).
    rates: Rates,
}

/// A move's phase rates, MB/s.
#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    stream: f64,
    restore: f64,
    pages: f64,
}

/// `bytes` in `ms`, MB/s; 0 when either is 0 (the phase did not run).
fn mb_per_s(bytes: u64, ms: u64) -> f64 {
    if ms == 0 || bytes == 0 {
        0.0
    } else {
        bytes as f64 / 1e6 / (ms as f64 / 1e3)
    }
}

impl Rates {
    fn of(r: &podmig_api::v1alpha1::MigrationReport) -> Self {
        Self {
            stream: mb_per_s(r.streamed_bytes, r.checkpoint_ms),
            restore: mb_per_s(r.bytes, r.restore_ms),
            pages: mb_per_s(r.bytes, r.pages_ms),
        }
    }
}

/// One answer of the app: (when, count, address, how long it took).
type Answer = (Instant, u64, String, Duration);

/// Answers of the app.
type Answers = Arc<Mutex<Vec<Answer>>>;

/// Probes the app every 10 ms at every address in `addrs` until `stop` is set.
fn probe(addrs: Arc<Mutex<Vec<String>>>, stop: Arc<std::sync::atomic::AtomicBool>) -> Answers {
    let answers: Answers = Arc::default();
    let out = answers.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            tick.tick().await;
            let targets = addrs.lock().map(|a| a.clone()).unwrap_or_default();
            for ip in targets {
                let out = out.clone();
                tokio::spawn(async move {
                    let asked = Instant::now();
                    let got = tokio::time::timeout(
                        Duration::from_millis(500),
                        crate::testapp::get_count(&ip),
                    )
                    .await;
                    if let Ok(Ok(n)) = got
                        && let Ok(mut v) = out.lock()
                    {
                        v.push((Instant::now(), n, ip, asked.elapsed()));
                    }
                });
            }
        }
    });
    answers
}

/// The longest time the app did not answer from just before `from` until `end` (when the
/// probes stopped: silence after the last answer counts too), and whether it kept its
/// state (its count went on across that gap, and the last answer counts beyond the last
/// one before `from`). An error when the new address did not answer at or after `moved`
/// (with a kept address, answers from before the move would otherwise pass).
fn gap(
    answers: &Answers,
    from: Instant,
    end: Instant,
    new_ip: &str,
    moved: Instant,
) -> anyhow::Result<(Duration, bool)> {
    let mut v = answers.lock().map(|a| a.clone()).unwrap_or_default();
    v.sort_by_key(|(t, _, _, _)| *t);
    gap_of(&v, from, end, new_ip, moved)
}

/// [`gap`] of answers sorted by time.
fn gap_of(
    v: &[Answer],
    from: Instant,
    end: Instant,
    new_ip: &str,
    moved: Instant,
) -> anyhow::Result<(Duration, bool)> {
    let before = v.iter().rposition(|(t, _, _, _)| *t < from);
    let last_before = before.map(|i| v[i].1);
    let v = &v[before.unwrap_or(0)..];
    anyhow::ensure!(
        v.iter().any(|(t, _, ip, _)| ip == new_ip && *t >= moved),
        "the app never answered at its new address {new_ip} after its move"
    );
    let mut worst = (Duration::ZERO, true);
    for w in v.windows(2) {
        let d = w[1].0 - w[0].0;
        if d > worst.0 {
            worst = (d, w[1].1 > w[0].1);
        }
    }
    let last = v.last().map_or((from, 0), |a| (a.0, a.1));
    let trailing = end.saturating_duration_since(last.0);
    if trailing > worst.0 {
        worst = (trailing, true);
    }
    let went_on = last_before.is_none_or(|b| last.1 > b);
    Ok((worst.0, worst.1 && went_on))
}

/// Adds Pod `name`'s address to the probed ones as soon as it has one (its sandbox runs),
/// as for podmig's target: every strategy is probed from the same moment on.
async fn probe_once_addressed(
    pods: &Api<Pod>,
    name: &str,
    addrs: &Arc<Mutex<Vec<String>>>,
    within: Duration,
) -> anyhow::Result<String> {
    until(&format!("{name}'s address"), within, async || {
        let ip = pods.get(name).await.ok()?.status?.pod_ip?;
        if let Ok(mut a) = addrs.lock() {
            a.push(ip.clone());
        }
        Some(ip)
    })
    .await
}

fn pod_yaml(name: &str, mem: u64, node: &str, extra_meta: &str, runtime: bool) -> String {
    let rc = if runtime {
        "  runtimeClassName: podmig\n"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n{extra_meta}spec:\n  nodeName: {node}\n{rc}  terminationGracePeriodSeconds: 5\n  containers:\n  - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '{mem}']}}\n"
    )
}

async fn ready_ip(pods: &Api<Pod>, name: &str, within: Duration) -> anyhow::Result<String> {
    until(&format!("{name} ready"), within, async || {
        let p = pods.get(name).await.ok()?;
        let s = p.status?;
        let ready = s
            .conditions?
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        ready.then_some(s.pod_ip?)
    })
    .await
}

async fn gone(pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    crate::wait::pod_gone(pods, name, Duration::from_secs(60)).await
}

/// Starts the source on node-0 and its probe; returns its address.
async fn source(
    c: &Cluster,
    pods: &Api<Pod>,
    yaml: &str,
    name: &str,
    mem: u64,
) -> anyhow::Result<String> {
    c.apply(yaml)?;
    let ip = ready_ip(pods, name, Duration::from_secs(120)).await?;
    wait_count(&ip, Duration::from_secs(60 + mem / 10)).await?;
    Ok(ip)
}

/// Median answer time of the app before `from` and at `new_ip` from `from` to `until`.
fn latencies(
    answers: &Answers,
    from: Instant,
    until: Instant,
    new_ip: &str,
) -> (Duration, Duration) {
    let v = answers.lock().map(|a| a.clone()).unwrap_or_default();
    let pick = |f: &dyn Fn(&Answer) -> bool| {
        let d: Vec<Duration> = v.iter().filter(|a| f(a)).map(|a| a.3).collect();
        if d.is_empty() {
            Duration::ZERO
        } else {
            median(d)
        }
    };
    (
        pick(&|a| a.0 < from),
        pick(&|a| a.0 >= from && a.0 <= until && a.2 == new_ip),
    )
}

/// One move's phases and the rate of each, as the daemons reported them.
fn phases(strategy: &str, mem: u64, r: &podmig_api::v1alpha1::MigrationReport) -> String {
    let rate = |bytes: u64, ms: u64| match mb_per_s(bytes, ms) {
        0.0 => "-".to_owned(),
        r => format!("{r:.0}"),
    };
    let pages = if r.pages_ms > 0 {
        format!(
            " pages={}ms ({} MB/s)",
            r.pages_ms,
            rate(r.bytes, r.pages_ms)
        )
    } else {
        String::new()
    };
    format!(
        "podmig-phases strategy={strategy} mem_mib={mem} dump={}ms (criu {}ms; streamed {} MB at {} MB/s) \
         transfer={}ms ({} MB/s) restore={}ms (criu {}ms; {} MB/s) frozen={}ms bytes={}{pages}",
        r.checkpoint_ms,
        r.criu_dump_ms,
        r.streamed_bytes / 1_000_000,
        rate(r.streamed_bytes, r.checkpoint_ms),
        r.transfer_ms,
        rate(r.bytes.saturating_sub(r.streamed_bytes), r.transfer_ms),
        r.restore_ms,
        r.criu_restore_ms,
        rate(r.bytes, r.restore_ms),
        r.frozen_ms,
        r.bytes,
    )
}

/// A `Migration` of a fresh MigratingPod of `mem` MiB from node-0 to `to` with `strategy`.
async fn podmig_once(
    c: &Cluster,
    mem: u64,
    run: usize,
    strategy: &str,
    to: &str,
) -> anyhow::Result<Sample> {
    let name = format!("pm{}{}{mem}r{run}", &strategy[..1], &to[to.len() - 1..]);
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    c.apply(&format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  template:\n    spec:\n      nodeName: node-0\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '{mem}']}}\n"
    ))?;
    let pod0 = format!("{name}-0");
    let ip0 = ready_ip(&pods, &pod0, Duration::from_secs(120)).await?;
    wait_count(&ip0, Duration::from_secs(60 + mem / 10)).await?;
    let addrs = Arc::new(Mutex::new(vec![ip0]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = probe(addrs.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from = Instant::now();
    c.apply(&format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec: {{podName: {pod0}, targetNode: {to}, strategy: {strategy}}}\n"
    ))?;
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    // The target's address is known once its sandbox runs; probe it from then on.
    let target = until("target pod", Duration::from_secs(30), async || {
        migs.get(&name).await.ok()?.status?.target_pod
    })
    .await?;
    let new_ip = until("target address", Duration::from_secs(60), async || {
        let ip = pods.get(&target).await.ok()?.status?.pod_ip?;
        if let Ok(mut a) = addrs.lock() {
            a.push(ip.clone());
        }
        Some(ip)
    })
    .await?;
    let st = until("migration done", Duration::from_secs(300), async || {
        migs.get(&name).await.ok()?.status.filter(|s| {
            s.phase.is_some_and(|p| p.is_terminal()) && s.report.is_some()
                || s.phase == Some(MigrationPhase::Failed)
        })
    })
    .await?;
    anyhow::ensure!(
        st.phase == Some(MigrationPhase::Succeeded),
        "podmig move failed: {:?}",
        st.message
    );
    let done = Instant::now();
    ready_ip(&pods, &target, Duration::from_secs(30)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (downtime, kept_state) = gap(&answers, from, end, &new_ip, done)?;
    c.kubectl(&["delete", "mpod", &name, "--wait=true", "--timeout=60s"])?;
    let report = until("the move's report", Duration::from_secs(30), async || {
        migs.get(&name).await.ok()?.status?.report
    })
    .await?;
    println!("{}", phases(&format!("{strategy}->{to}"), mem, &report));
    let lazy = report.strategy == Some(podmig_api::v1alpha1::Strategy::Lazy);
    Ok(Sample {
        downtime,
        frozen: st.frozen_ms.map(Duration::from_millis),
        kept_state,
        pages: lazy.then(|| Duration::from_millis(report.pages_ms)),
        bytes: Some(report.bytes),
        latency: latencies(&answers, from, done, &new_ip),
        chose: (strategy == "auto").then_some((
            if lazy { "lazy" } else { "full" },
            report.estimated_frozen_ms,
        )),
        rates: Rates::of(&report),
    })
}

async fn restart_once(c: &Cluster, mem: u64, run: usize) -> anyhow::Result<Sample> {
    let (old, new) = (format!("rs{mem}r{run}a"), format!("rs{mem}r{run}b"));
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let ip0 = source(
        c,
        &pods,
        &pod_yaml(&old, mem, "node-0", "", false),
        &old,
        mem,
    )
    .await?;
    let addrs = Arc::new(Mutex::new(vec![ip0]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = probe(addrs.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from = Instant::now();
    // A ReplicaSet creates the replacement as soon as the old Pod is being deleted.
    pods.delete(&old, &DeleteParams::default()).await?;
    c.apply(&pod_yaml(&new, mem, "node-1", "", false))?;
    let ip1 = probe_once_addressed(&pods, &new, &addrs, Duration::from_secs(120)).await?;
    ready_ip(&pods, &new, Duration::from_secs(120)).await?;
    wait_count(&ip1, Duration::from_secs(60 + mem / 10)).await?;
    let done = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (downtime, kept_state) = gap(&answers, from, end, &ip1, done)?;
    gone(&pods, &old).await?;
    pods.delete(&new, &DeleteParams::default()).await?;
    gone(&pods, &new).await?;
    Ok(Sample {
        downtime,
        frozen: None,
        kept_state,
        pages: None,
        bytes: None,
        latency: (Duration::ZERO, Duration::ZERO),
        chose: None,
        rates: Rates::default(),
    })
}

async fn thesis_once(c: &Cluster, mem: u64, run: usize) -> anyhow::Result<Sample> {
    let (old, new) = (format!("th{mem}r{run}a"), format!("th{mem}r{run}b"));
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let ip0 = source(
        c,
        &pods,
        &pod_yaml(&old, mem, "node-0", "", true),
        &old,
        mem,
    )
    .await?;
    let p0 = pods.get(&old).await?;
    let uid = p0.uid().unwrap_or_default();
    let container = p0
        .status
        .and_then(|s| s.container_statuses)
        .and_then(|s| s.first().and_then(|c| c.container_id.clone()))
        .and_then(|id| id.strip_prefix("containerd://").map(str::to_owned))
        .context("source container id")?;
    let addrs = Arc::new(Mutex::new(vec![ip0]));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answers = probe(addrs.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from = Instant::now();
    // 1. Full dump into the shared directory (the thesis used NFS; here: local disk).
    let shared = tempfile::Builder::new()
        .prefix("podmig-bench-shared-")
        .tempdir_in("/var/tmp")?;
    let images = shared.path().join("app");
    c.nodes[0]
        .daemon
        .checkpoint(&container, &images, false)
        .await
        .map_err(|e| anyhow::anyhow!("thesis dump: {e}"))?;
    // 2. The target node reads it into its own checkpoint store.
    let dest = c.nodes[1].daemon.checkpoint_path(&uid, "app");
    let (src, dst) = (images.clone(), dest.clone());
    tokio::task::spawn_blocking(move || copy_dir(&src, &dst)).await??;
    // 3. Only now the target Pod is created; its container restores the images, armed by
    //    root through the node's CRI extension (a Pod's own annotations name no source:
    //    only podmig's controller makes migration targets). The Pod waits behind a
    //    scheduling gate until the restore is armed for its uid.
    let gated = pod_yaml(&new, mem, "node-1", "", true).replace(
        "  nodeName: node-1\n",
        "  nodeSelector: {kubernetes.io/hostname: node-1}\n  schedulingGates: [{name: podmig.dev/armed}]\n",
    );
    c.apply(&gated)?;
    let target_uid = pods.get(&new).await?.uid().unwrap_or_default();
    c.nodes[1]
        .daemon
        .arm_restore(&target_uid, "app", &dest)
        .await
        .map_err(|e| anyhow::anyhow!("thesis restore: {e}"))?;
    c.kubectl(&[
        "patch",
        "pod",
        &new,
        "--type=merge",
        "-p",
        "{\"spec\": {\"schedulingGates\": []}}",
    ])?;
    let ip1 = probe_once_addressed(&pods, &new, &addrs, Duration::from_secs(120))
        .await
        .with_context(|| format!("thesis target\n{}", c.nodes[1].daemon.log()))?;
    ready_ip(&pods, &new, Duration::from_secs(120))
        .await
        .with_context(|| format!("thesis target\n{}", c.nodes[1].daemon.log()))?;
    wait_count(&ip1, Duration::from_secs(30))
        .await
        .with_context(|| format!("thesis target\n{}", c.nodes[1].daemon.log()))?;
    let done = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let end = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (downtime, kept_state) = gap(&answers, from, end, &ip1, done)?;
    for p in [&old, &new] {
        pods.delete(p, &DeleteParams::default()).await?;
        gone(&pods, p).await?;
    }
    Ok(Sample {
        downtime,
        frozen: None,
        kept_state,
        pages: None,
        bytes: None,
        latency: (Duration::ZERO, Duration::ZERO),
        chose: None,
        rates: Rates::default(),
    })
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> anyhow::Result<()> {
    podmig_cri_ext::engine::create_private_dir(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Runs the cross-node benchmark and prints the table and one line per strategy and size.
/// `moves` of one 16 MiB Pod back and forth between the two nodes, one after the other
/// (`strategy: auto`, which picks `full` for it): the fixed cost of a move.
async fn pingpong(c: &Cluster, moves: usize) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    c.apply(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {name: pingpong}\nspec:\n  template:\n    spec:\n      nodeName: node-0\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '16']}\n",
    )?;
    let ip = ready_ip(&pods, "pingpong-0", Duration::from_secs(120)).await?;
    wait_count(&ip, Duration::from_secs(60)).await?;
    let mut reports = Vec::new();
    for i in 0..moves {
        let name = format!("pingpong-m{i}");
        let to = if i % 2 == 0 { "node-1" } else { "node-0" };
        c.apply(&format!(
            "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec: {{podName: pingpong-{i}, targetNode: {to}}}\n"
        ))?;
        let st = until("pingpong move", Duration::from_secs(120), async || {
            migs.get(&name).await.ok()?.status.filter(|s| {
                s.phase == Some(MigrationPhase::Failed)
                    || s.phase == Some(MigrationPhase::Succeeded) && s.report.is_some()
            })
        })
        .await?;
        anyhow::ensure!(
            st.phase == Some(MigrationPhase::Succeeded),
            "pingpong move {i} failed: {:?}",
            st.message
        );
        let r = st.report.unwrap_or_default();
        println!("{}", phases("pingpong", 16, &r));
        reports.push(r);
        ready_ip(
            &pods,
            &format!("pingpong-{}", i + 1),
            Duration::from_secs(30),
        )
        .await?;
    }
    let pick = |f: &dyn Fn(&podmig_api::v1alpha1::MigrationReport) -> u64, q: f64| {
        let mut v: Vec<u64> = reports.iter().map(f).collect();
        v.sort_unstable();
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "pingpong: {moves} cross-node moves of a 16 MiB Pod: frozen median {} ms, p95 {} ms \
         (medians: dump {} ms of which CRIU {} ms, images {} ms, restore {} ms of which CRIU {} ms; \
         frozen outside CRIU {} ms)",
        pick(&|r| r.frozen_ms, 0.5),
        pick(&|r| r.frozen_ms, 0.95),
        pick(&|r| r.checkpoint_ms, 0.5),
        pick(&|r| r.criu_dump_ms, 0.5),
        pick(&|r| r.transfer_ms, 0.5),
        pick(&|r| r.restore_ms, 0.5),
        pick(&|r| r.criu_restore_ms, 0.5),
        pick(
            &|r| r
                .frozen_ms
                .saturating_sub(r.criu_dump_ms + r.criu_restore_ms),
            0.5
        ),
    );
    c.kubectl(&["delete", "mpod", "pingpong", "--wait=true", "--timeout=60s"])?;
    Ok(())
}

/// The cross-node benchmark: every strategy at every size, then the `pingpong` line.
pub async fn moves(
    sizes: &[u64],
    runs: usize,
    pingpong_moves: usize,
    connection_sizes: &[u64],
) -> anyhow::Result<()> {
    let limits = crate::bench_raw::measure(std::path::Path::new("/dev/shm"), 256).await?;
    println!(
        "machine: raw tmpfs write {:.0} MB/s, raw TLS loopback copy {:.0} MB/s (256 MiB each)",
        limits.tmpfs_write, limits.tls_copy
    );
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller("bench")?;
    if pingpong_moves > 0 {
        pingpong(&c, pingpong_moves).await?;
    }
    if !connection_sizes.is_empty() {
        crate::bench_conn::connections(&c, connection_sizes, runs).await?;
    }
    if sizes.is_empty() {
        return Ok(());
    }
    let strategies = ["podmig", "restart", "thesis", "lazy", "auto", "same-node"];
    let mut rows = Vec::new();
    // Runs of a state-keeping strategy that lost the state: out of the medians, told.
    let mut excluded: Vec<String> = Vec::new();
    for &mem in sizes {
        let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); strategies.len()];
        for run in 0..runs {
            for (i, s) in strategies.iter().enumerate() {
                let sample = match *s {
                    "podmig" => podmig_once(&c, mem, run, "full", "node-1").await,
                    "lazy" => podmig_once(&c, mem, run, "lazy", "node-1").await,
                    "auto" => podmig_once(&c, mem, run, "auto", "node-1").await,
                    "same-node" => podmig_once(&c, mem, run, "full", "node-0").await,
                    "restart" => restart_once(&c, mem, run).await,
                    _ => thesis_once(&c, mem, run).await,
                }
                .with_context(|| format!("{s} mem={mem} run={run}"))?;
                eprintln!(
                    "mem={mem}MiB run={run} {s}: downtime {} ms, frozen {:?} ms, pages {:?} ms, state kept: {}",
                    sample.downtime.as_millis(),
                    sample.frozen.map(|f| f.as_millis()),
                    sample.pages.map(|f| f.as_millis()),
                    sample.kept_state
                );
                if !sample.kept_state && *s != "restart" {
                    excluded.push(format!(
                        "{s} mem={mem} run={run}: state lost (the count did not go on)"
                    ));
                } else {
                    samples[i].push(sample);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        rows.push((mem, samples));
    }
    println!(
        "runs excluded from the medians: {} ({})",
        excluded.len(),
        if excluded.is_empty() {
            "none lost its state; restart loses it by design and stays in".to_owned()
        } else {
            excluded.join("; ")
        }
    );
    for s in strategies {
        let n = excluded
            .iter()
            .filter(|e| e.starts_with(&format!("{s} ")))
            .count();
        println!("podmig-bench-excluded strategy={s} runs={n}");
    }
    println!("cross-node move benchmark: medians of {runs} runs (ms), node-0 → node-1");
    println!(
        "| mem MiB | podmig downtime | podmig frozen | restart downtime | thesis downtime | podmig/thesis |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let med = |s: &[Sample]| median(s.iter().map(|x| x.downtime).collect());
    let med_frozen = |s: &[Sample]| {
        let f: Vec<Duration> = s.iter().filter_map(|x| x.frozen).collect();
        (!f.is_empty()).then(|| median(f))
    };
    for (mem, s) in &rows {
        let ratio = med(&s[0]).as_secs_f64() / med(&s[2]).as_secs_f64().max(1e-6);
        println!(
            "| {mem} | {} | {} | {} | {} | {ratio:.2} |",
            med(&s[0]).as_millis(),
            med_frozen(&s[0]).map_or("-".into(), |f| f.as_millis().to_string()),
            med(&s[1]).as_millis(),
            med(&s[2]).as_millis(),
        );
    }
    let med_of = |s: &[Sample], f: &dyn Fn(&Sample) -> Option<Duration>| {
        let v: Vec<Duration> = s.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let ms = |d: Option<Duration>| d.map_or("-".into(), |d| d.as_millis().to_string());
    let lazy_zero = rows
        .first()
        .map(|(_, s)| med(&s[3]).as_secs_f64())
        .unwrap_or(0.0);
    println!();
    println!("lazy strategy (post-copy), same runs:");
    println!(
        "| mem MiB | lazy downtime | lazy frozen | all pages in | MB moved | app answer ms before / in window | lazy / full downtime | lazy / lazy at {} MiB |",
        rows.first().map_or(0, |(m, _)| *m)
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mem, s) in &rows {
        let lat = med_of(&s[3], &|x| Some(x.latency.0));
        let lat_in = med_of(&s[3], &|x| Some(x.latency.1));
        let bytes: Vec<u64> = s[3].iter().filter_map(|x| x.bytes).collect();
        println!(
            "| {mem} | {} | {} | {} | {:.1} | {} / {} | {:.2} | {:.2} |",
            med(&s[3]).as_millis(),
            ms(med_frozen(&s[3])),
            ms(med_of(&s[3], &|x| x.pages)),
            bytes.iter().sum::<u64>() as f64 / bytes.len().max(1) as f64 / 1e6,
            lat.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1000.0)),
            lat_in.map_or("-".into(), |d| format!("{:.2}", d.as_secs_f64() * 1000.0)),
            med(&s[3]).as_secs_f64() / med(&s[0]).as_secs_f64().max(1e-6),
            med(&s[3]).as_secs_f64() / lazy_zero.max(1e-6),
        );
    }
    println!();
    println!("auto strategy (maxDowntimeMs 1000), same runs:");
    println!(
        "| mem MiB | auto downtime | auto frozen | chose | estimated full frozen | auto / full downtime |"
    );
    println!("|---:|---:|---:|---|---:|---:|");
    for (mem, s) in &rows {
        let chose: Vec<String> = s[4]
            .iter()
            .filter_map(|x| x.chose.map(|(c, _)| c.to_owned()))
            .collect();
        let estimate = s[4]
            .iter()
            .filter_map(|x| x.chose.map(|(_, e)| e))
            .max()
            .unwrap_or(0);
        println!(
            "| {mem} | {} | {} | {} | {estimate} | {:.2} |",
            med(&s[4]).as_millis(),
            ms(med_frozen(&s[4])),
            chose.join(" "),
            med(&s[4]).as_secs_f64() / med(&s[0]).as_secs_f64().max(1e-6),
        );
    }
    println!();
    println!("cross-node vs same-node (the same engine, no network in between), full, same runs:");
    println!("| mem MiB | cross-node frozen | same-node frozen | cross / same |");
    println!("|---:|---:|---:|---:|");
    for (mem, s) in &rows {
        let (cross, same) = (med_frozen(&s[0]), med_frozen(&s[5]));
        println!(
            "| {mem} | {} | {} | {} |",
            ms(cross),
            ms(same),
            cross.zip(same).map_or("-".into(), |(c, s)| format!(
                "{:.2}",
                c.as_secs_f64() / s.as_secs_f64().max(1e-6)
            )),
        );
    }
    println!();
    println!(
        "phase rates (MB/s, medians) next to the machine: raw TLS loopback copy {:.0}, raw tmpfs write {:.0}:",
        limits.tls_copy, limits.tmpfs_write
    );
    println!(
        "| mem MiB | full: dump streaming pages | / TLS copy | full: restore | / tmpfs write | lazy: pages after the resume | / TLS copy |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let med_rate = |s: &[Sample], f: &dyn Fn(&Rates) -> f64| {
        let mut v: Vec<f64> = s.iter().map(|x| f(&x.rates)).filter(|r| *r > 0.0).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    for (mem, s) in &rows {
        let (stream, restore, pages) = (
            med_rate(&s[0], &|r| r.stream),
            med_rate(&s[0], &|r| r.restore),
            med_rate(&s[3], &|r| r.pages),
        );
        println!(
            "| {mem} | {stream:.0} | {:.2} | {restore:.0} | {:.2} | {pages:.0} | {:.2} |",
            stream / limits.tls_copy.max(1e-6),
            restore / limits.tmpfs_write.max(1e-6),
            pages / limits.tls_copy.max(1e-6),
        );
    }
    let series: Vec<crate::plot::Series> = strategies
        .iter()
        .enumerate()
        .map(|(i, name)| crate::plot::Series {
            name: (*name).to_owned(),
            points: rows
                .iter()
                .map(|(mem, s)| (*mem as f64, med(&s[i]).as_secs_f64() * 1000.0))
                .collect(),
        })
        .collect();
    let svg = crate::paths::repo_root().join("docs/downtime.svg");
    std::fs::create_dir_all(svg.parent().unwrap_or(std::path::Path::new(".")))?;
    crate::plot::downtime_svg(
        &svg,
        &format!("cross-node move downtime, medians of {runs} runs (2-core VM)"),
        &series,
    )?;
    println!("plot: {}", svg.display());
    for (mem, s) in &rows {
        for (i, name) in strategies.iter().enumerate() {
            println!(
                "podmig-bench strategy={name} mem_mib={mem} runs={runs} downtime_ms={} frozen_ms={} pages_ms={} bytes={}",
                med(&s[i]).as_millis(),
                med_frozen(&s[i]).map_or("-".into(), |f| f.as_millis().to_string()),
                ms(med_of(&s[i], &|x| x.pages)),
                s[i].iter()
                    .filter_map(|x| x.bytes)
                    .max()
                    .map_or("-".into(), |b| b.to_string()),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t: Instant, ms: u64, count: u64, ip: &str) -> Answer {
        (
            t + Duration::from_millis(ms),
            count,
            ip.to_owned(),
            Duration::ZERO,
        )
    }

    #[test]
    fn silence_after_the_last_answer_counts_and_the_new_address_must_answer_after_the_move() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let v = vec![
            at(t, 0, 10, "a"),
            at(t, 10, 11, "a"),
            at(t, 400, 12, "a"), // a kept address: the same one before and after
            at(t, 410, 13, "a"),
        ];
        // Probing went on until 1400 ms: a second of silence at the end is the outage.
        let (d, kept) = gap_of(&v, ms(5), ms(1410), "a", ms(300)).expect("answered");
        assert_eq!(d, Duration::from_millis(1000));
        assert!(kept);
        // Answers from before the move do not pass for the moved copy's.
        assert!(gap_of(&v, ms(5), ms(420), "a", ms(500)).is_err());
        // The count started over: the state was lost, whatever the gaps.
        let lost = vec![at(t, 0, 10, "a"), at(t, 10, 11, "a"), at(t, 300, 1, "b")];
        let (d, kept) = gap_of(&lost, ms(5), ms(310), "b", ms(200)).expect("answered");
        assert_eq!(d, Duration::from_millis(290));
        assert!(!kept);
    }
}
