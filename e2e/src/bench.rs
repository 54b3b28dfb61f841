//! `make bench-engine`: podmig's checkpoint, restore and frozen time next to plain
//! `criu dump` + `criu restore` of the same app, measured interleaved in one run.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{node::TestNode, paths, process::signal, scenario, testapp::get_count};

/// One measurement of a method: checkpoint, restore, frozen (all wall time).
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Dump.
    pub checkpoint: Duration,
    /// Restore.
    pub restore: Duration,
    /// Dump start to the process running again.
    pub frozen: Duration,
}

/// Median of durations (upper median for even counts).
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// Pause between measurements so one run's teardown does not slow the next.
const SETTLE: Duration = Duration::from_secs(1);

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Runs the engine benchmark for every size and prints the table and one line per size.
pub async fn engine(sizes: &[u64], runs: usize) -> anyhow::Result<()> {
    let mut node = TestNode::start().await?;
    wrapper_overhead(&mut node, runs).await?;
    let mut rows = Vec::new();
    for &mem in sizes {
        let (mut podmig, mut criu) = (Vec::new(), Vec::new());
        for run in 0..runs {
            // Interleaved so both methods see the same machine noise; each starts on a
            // settled machine (the previous run's processes have freed their memory).
            podmig.push(podmig_once(&mut node, mem, run).await?);
            tokio::time::sleep(SETTLE).await;
            criu.push(tokio::task::block_in_place(|| criu_once(mem, run))?);
            tokio::time::sleep(SETTLE).await;
            eprintln!(
                "mem={mem}MiB run={run} podmig dump={}ms restore={}ms frozen={}ms | criu dump={}ms restore={}ms frozen={}ms",
                ms(podmig[run].checkpoint),
                ms(podmig[run].restore),
                ms(podmig[run].frozen),
                ms(criu[run].checkpoint),
                ms(criu[run].restore),
                ms(criu[run].frozen)
            );
        }
        let med = |s: &[Sample], f: fn(&Sample) -> Duration| median(s.iter().map(f).collect());
        rows.push((
            mem,
            [
                med(&podmig, |s| s.checkpoint),
                med(&podmig, |s| s.restore),
                med(&podmig, |s| s.frozen),
                med(&criu, |s| s.checkpoint),
                med(&criu, |s| s.restore),
                med(&criu, |s| s.frozen),
            ],
        ));
    }
    println!(
        "engine benchmark: medians of {runs} runs (ms); criu = plain criu dump + criu restore of the same app"
    );
    println!(
        "| mem MiB | podmig checkpoint | podmig restore | podmig frozen | criu dump | criu restore | criu frozen | frozen ratio |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (mem, m) in &rows {
        let ratio = m[2].as_secs_f64() / m[5].as_secs_f64().max(1e-6);
        println!(
            "| {mem} | {} | {} | {} | {} | {} | {} | {ratio:.2} |",
            ms(m[0]),
            ms(m[1]),
            ms(m[2]),
            ms(m[3]),
            ms(m[4]),
            ms(m[5])
        );
    }
    for (mem, m) in &rows {
        println!(
            "podmig-bench-engine mem_mib={mem} runs={runs} podmig_frozen_ms={} criu_frozen_ms={}",
            ms(m[2]),
            ms(m[5])
        );
    }
    Ok(())
}

/// CreateContainer + StartContainer of an ordinary container under the plain `runc`
/// handler and under `podmig` (through podmig-runc and one hook round-trip), interleaved.
async fn wrapper_overhead(node: &mut TestNode, runs: usize) -> anyhow::Result<()> {
    let (mut plain, mut wrapped) = (Vec::new(), Vec::new());
    for run in 0..runs {
        for handler in ["runc", podmig_api::RUNTIME_HANDLER] {
            let pod = crate::cri::TestPod::new(
                &format!("start-{handler}-{run}"),
                &format!("start-{handler}-{run}"),
                &node.logs_root(),
            )
            .with_handler(handler);
            let sandbox = node.cri.run_pod(&pod).await?;
            let started = Instant::now();
            node.cri
                .run_container(&sandbox, &crate::cri::TestContainer::testapp(0))
                .await?;
            let took = started.elapsed();
            if handler == "runc" {
                plain.push(took)
            } else {
                wrapped.push(took)
            }
            node.cri.remove_pod(&sandbox.id).await?;
        }
    }
    let (p, w) = (median(plain), median(wrapped));
    println!(
        "container start (CreateContainer+StartContainer, ordinary container), median of {runs}: runc {} ms, podmig-runc {} ms",
        p.as_millis(),
        w.as_millis()
    );
    println!(
        "podmig-bench-wrapper runs={runs} runc_start_ms={} podmig_start_ms={}",
        p.as_millis(),
        w.as_millis()
    );
    Ok(())
}

async fn podmig_once(node: &mut TestNode, mem: u64, run: usize) -> anyhow::Result<Sample> {
    let src = scenario::start_source(
        node,
        &format!("bench-{run}-a"),
        &format!("bench-{mem}-{run}-a"),
        mem,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let moved = scenario::move_app(
        node,
        &src,
        &format!("bench-{run}-b"),
        &format!("bench-{mem}-{run}-b"),
        mem,
    )
    .await?;
    let before = get_count(&moved.ip).await?;
    anyhow::ensure!(before >= 2, "restored app lost its count ({before})");
    node.cri.remove_pod(&src.sandbox.id).await?;
    node.cri.remove_pod(&moved.sandbox.id).await?;
    let r = moved.report;
    Ok(Sample {
        checkpoint: r.checkpoint,
        restore: r.restore,
        frozen: r.frozen,
    })
}

fn criu(args: &[&str], dir: &Path, log: &str) -> anyhow::Result<()> {
    let out = Command::new("criu")
        .env("PATH", paths::RUNTIME_PATH)
        .args(args)
        .arg("-D")
        .arg(dir)
        .arg("-o")
        .arg(log)
        .stdin(Stdio::null())
        .output()
        .context("running criu")?;
    if !out.status.success() {
        let tail = podmig_cri_ext::engine::log_tail(&dir.join(log)).unwrap_or_default();
        bail!(
            "criu {args:?} failed: {} {tail}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn criu_once(mem: u64, run: usize) -> anyhow::Result<Sample> {
    let app = paths::testapp_binary();
    anyhow::ensure!(
        app.is_file(),
        "the static test app is missing at {}: `make bench-engine` builds it (or set \
         PODMIG_TESTAPP_BIN)",
        app.display()
    );
    // Same storage as the node daemon's checkpoints, so only the engines differ.
    let dir = tempfile::Builder::new()
        .prefix("podmig-bench-criu-")
        .tempdir_in(paths::memory_dir())?;
    let port = 18_000 + run as u16;
    let log = std::fs::File::create(dir.path().join("app.log"))?;
    // setsid: the app leads its own session, so CRIU can dump it without --shell-job.
    let mut child = Command::new("setsid")
        .arg(paths::testapp_binary())
        .args(["--mem-mib", &mem.to_string(), "--port", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the test app")?;
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = (|| {
        rt.block_on(wait_local(port, Duration::from_secs(60 + mem / 10)))?;
        #[allow(clippy::disallowed_methods)] // synchronous benchmark step
        std::thread::sleep(Duration::from_millis(200));
        let images = dir.path().join("images");
        std::fs::create_dir(&images)?;
        let t0 = Instant::now();
        criu(&["dump", "-t", &pid.to_string()], &images, "dump.log")?;
        let checkpoint = t0.elapsed();
        let _ = child.wait();
        let pidfile = dir.path().join("restored.pid");
        let t1 = Instant::now();
        criu(
            &["restore", "-d", "--pidfile", &pidfile.display().to_string()],
            &images,
            "restore.log",
        )?;
        let restore = t1.elapsed();
        let frozen = t0.elapsed();
        let restored: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
        let count = rt.block_on(wait_local(port, Duration::from_secs(10)));
        signal(restored, libc::SIGKILL);
        let count = count?;
        anyhow::ensure!(count >= 2, "criu-restored app lost its count ({count})");
        Ok(Sample {
            checkpoint,
            restore,
            frozen,
        })
    })();
    if result.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    result
}

async fn wait_local(port: u16, within: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        match crate::testapp::get_count_at("127.0.0.1", port).await {
            Ok(n) => return Ok(n),
            Err(e) if Instant::now() > deadline => bail!("app on port {port} not answering: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `make bench-cluster`: `cluster up`/`down` of a 2-node cluster (medians of `runs`), and
/// the API server's watch latency (write issued → event delivered) at 50 writes/s.
pub async fn cluster(runs: usize) -> anyhow::Result<()> {
    let (mut ups, mut downs) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let c = crate::cluster::Cluster::up_temp(2).await?;
        ups.push(t.elapsed());
        let t = Instant::now();
        tokio::task::block_in_place(|| drop(c));
        downs.push(t.elapsed());
    }
    let (up, down) = (median(ups), median(downs));
    println!(
        "cluster of 2 nodes, median of {runs}: up {} ms, down {} ms",
        up.as_millis(),
        down.as_millis()
    );
    println!(
        "podmig-bench-cluster nodes=2 runs={runs} up_ms={} down_ms={}",
        up.as_millis(),
        down.as_millis()
    );

    let c = crate::cluster::Cluster::up_temp(1).await?;
    let (p50, p99, max, n) = watch_latency(&c.client, 50, Duration::from_secs(10)).await?;
    println!(
        "watch latency at 50 writes/s over {n} writes: p50 {} us, p99 {} us, max {} us",
        p50.as_micros(),
        p99.as_micros(),
        max.as_micros()
    );
    println!(
        "podmig-bench-watch writes={n} rate=50 p50_us={} p99_us={} max_us={}",
        p50.as_micros(),
        p99.as_micros(),
        max.as_micros()
    );
    tokio::task::block_in_place(|| drop(c));
    Ok(())
}

/// Patches a ConfigMap `rate` times a second for `span` while a watch receives the events;
/// returns p50, p99 and max of write-issued → event-received, and the number of writes.
async fn watch_latency(
    client: &kube::Client,
    rate: u32,
    span: Duration,
) -> anyhow::Result<(Duration, Duration, Duration, usize)> {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Patch, PatchParams, PostParams, WatchEvent, WatchParams};
    let cms: kube::Api<ConfigMap> = kube::Api::default_namespaced(client.clone());
    let cm: ConfigMap = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "latency"}, "data": {"seq": "0"}}),
    )?;
    let created = cms.create(&PostParams::default(), &cm).await?;
    let rv = created.metadata.resource_version.unwrap_or_default();
    let mut stream = cms
        .watch(&WatchParams::default().fields("metadata.name=latency"), &rv)
        .await?
        .boxed();
    let total = (span.as_secs_f64() * f64::from(rate)) as usize;
    let sent = std::sync::Arc::new(std::sync::Mutex::new(vec![None::<Instant>; total + 1]));
    let writer = {
        let (cms, sent) = (cms.clone(), sent.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate)));
            for i in 1..=total {
                tick.tick().await;
                if let Ok(mut s) = sent.lock() {
                    s[i] = Some(Instant::now());
                }
                let _ = cms
                    .patch(
                        "latency",
                        &PatchParams::default(),
                        &Patch::Merge(serde_json::json!({"data": {"seq": i.to_string()}})),
                    )
                    .await;
            }
        })
    };
    let mut lat = Vec::with_capacity(total);
    while lat.len() < total {
        let ev = tokio::time::timeout(Duration::from_secs(5), stream.next()).await?;
        let Some(Ok(WatchEvent::Modified(o))) = ev else {
            continue;
        };
        let received = Instant::now();
        let seq: usize = o
            .data
            .as_ref()
            .and_then(|d| d.get("seq"))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if let Some(at) = sent.lock().ok().and_then(|s| s.get(seq).copied().flatten()) {
            lat.push(received - at);
        }
    }
    writer.await?;
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok((pct(0.5), pct(0.99), lat[lat.len() - 1], lat.len()))
}
