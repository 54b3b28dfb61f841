//! The lazy strategy on the local two-node cluster: a `Migration` with `strategy: lazy`
//! moves the test app across nodes, its memory faulted in after the resume through the
//! daemons' TLS channel; and what happens when the page stream breaks after the resume
//! (the target is stopped, the source stays released: never two copies, never a copy
//! running on missing memory).

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use podmig_api::v1alpha1::{Migration, MigrationPhase, MigrationStatus, Strategy};
use podmig_e2e::{
    cluster::Cluster,
    process::Proc,
    testapp::{get_at, get_count, wait_count},
    wait::{migration_ended, node_of, pod_ip as ip, ready_pod as ready, until},
};

fn mpod_yaml(name: &str, mib: u32) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  migrationTimeoutSeconds: 60\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '{mib}']}}\n"
    )
}

fn migration_yaml(name: &str, pod: &str, to: &str) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec: {{podName: {pod}, targetNode: {to}, strategy: lazy, timeoutSeconds: 60}}\n"
    )
}

async fn setup() -> anyhow::Result<(Cluster, Proc)> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (ctl, _) = c.start_controller("a")?;
    Ok((c, ctl))
}

/// Starts MigratingPod `name` with `mib` MiB; returns (the Pod's node index, its address,
/// its memory checksum).
async fn start_app(
    c: &Cluster,
    pods: &Api<Pod>,
    name: &str,
    mib: u32,
) -> anyhow::Result<(usize, String, String)> {
    c.apply(&mpod_yaml(name, mib))?;
    let p0 = ready(pods, &format!("{name}-0"), Duration::from_secs(120)).await?;
    let src = c
        .nodes
        .iter()
        .position(|n| n.name == node_of(&p0))
        .unwrap_or(0);
    let addr = ip(&p0);
    wait_count(&addr, Duration::from_secs(120)).await?;
    let checksum = get_at(&addr, 8080, "/checksum").await?;
    Ok((src, addr, checksum))
}

fn logs(c: &Cluster) -> String {
    c.nodes
        .iter()
        .map(|n| format!("--- {} daemon:\n{}", n.name, n.daemon.log()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_move_keeps_the_count_and_every_page_of_memory() -> anyhow::Result<()> {
    let (c, _ctl) = setup().await?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let (src, src_ip, checksum) = start_app(&c, &pods, "lazy", 256).await?;
    let before = get_count(&src_ip).await?;
    let to = c.nodes[1 - src].name.clone();
    c.apply(&migration_yaml("lazy", "lazy-0", &to))?;
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    let st = migration_ended(&migs, "lazy", Duration::from_secs(120)).await?;
    assert_eq!(
        st.phase,
        Some(MigrationPhase::Succeeded),
        "{st:?}\n{}",
        logs(&c)
    );
    let report = st
        .report
        .clone()
        .ok_or_else(|| anyhow::anyhow!("no figures: {st:?}\n{}", logs(&c)))?;
    eprintln!("lazy move of a 256 MiB app across nodes: {report:?}");
    assert_eq!(report.strategy, Some(Strategy::Lazy), "{report:?}");
    assert!(
        report.pages_ms > 0 && report.pages_faulted + report.pages_pushed >= 256 * 256,
        "every page of the 256 MiB ballast arrived: {report:?}"
    );
    let p1 = ready(&pods, "lazy-1", Duration::from_secs(30)).await?;
    assert_eq!(node_of(&p1), to);
    assert_eq!(
        get_count(&ip(&p1)).await?,
        before + 1,
        "the count went on after the move"
    );
    assert_eq!(
        get_at(&ip(&p1), 8080, "/checksum").await?,
        checksum,
        "memory intact after the lazy move"
    );
    for n in &c.nodes {
        until("no checkpoints left", Duration::from_secs(30), async || {
            std::fs::read_dir(n.daemon.checkpoint_dir())
                .map_or(true, |mut d| {
                    d.all(|e| {
                        e.map_or(true, |e| {
                            std::fs::read_dir(e.path()).map_or(true, |mut d| d.next().is_none())
                        })
                    })
                })
                .then_some(())
        })
        .await?;
    }
    Ok(())
}

/// Pids of processes whose command line contains every one of `words`.
fn pids_with(words: &[&str]) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                words.iter().all(|w| c.contains(w))
            })
        })
        .collect()
}

/// Starts a `mib` MiB app `name`; waits until the move of its pages is under way (the
/// target's lazy-pages daemon runs and the restored app answers), then runs `cut`; returns
/// the Migration's end.
async fn cut_mid_stream(
    c: &mut Cluster,
    pods: &Api<Pod>,
    name: &str,
    mib: u32,
    cut: impl FnOnce(&mut Cluster, usize),
) -> anyhow::Result<(MigrationStatus, u64)> {
    let (src, src_ip, _) = start_app(c, pods, name, mib).await?;
    for _ in 0..20 {
        get_count(&src_ip).await?;
    }
    let before = get_count(&src_ip).await?;
    c.apply(&migration_yaml(
        name,
        &format!("{name}-0"),
        &c.nodes[1 - src].name,
    ))?;
    let started = Instant::now();
    let target_dir = c.nodes[1 - src].daemon.checkpoint_dir();
    let target_dir = target_dir.display().to_string();
    until("pages on their way", Duration::from_secs(60), async || {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let daemon = pids_with(&["criu", "lazy-pages", "--images-dir", &target_dir]);
        let restored = c.nodes[1 - src].daemon.log().contains("lazily restored");
        (!daemon.is_empty() && restored).then_some(())
    })
    .await?;
    eprintln!(
        "the app runs on the target, its pages arriving, {} ms after the Migration",
        started.elapsed().as_millis()
    );
    cut(c, src);
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    let st = migration_ended(&migs, name, Duration::from_secs(120)).await?;
    Ok((st, before))
}

/// No copy of the app that kept its old state runs: whatever answers counts afresh.
async fn no_copy_kept_the_old_state(pods: &Api<Pod>, name: &str, before: u64) {
    // 15 s of looks every 250 ms at every Pod of the app: no copy with the old state
    // answers at any of them. A look that cannot list the Pods fails the test (it would
    // see nothing and pass).
    let mut answered = 0;
    for _ in 0..60 {
        let list = pods
            .list(&kube::api::ListParams::default().labels(&format!("app={name}")))
            .await
            .expect("listing the app's Pods");
        for p in list.items {
            if let Ok(n) = get_count(&ip(&p)).await {
                answered += 1;
                assert!(
                    n <= before / 2 + 5,
                    "{} answers with count {n}: a copy with the old state (count {before}) runs",
                    p.name_any()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    eprintln!("no copy with the old state in 15 s ({answered} answers from fresh copies)");
}

/// The move failed on purpose and says why: the target stopped, the source not resumed,
/// the state lost; no copy with the old state answers.
async fn failed_on_purpose(
    c: &Cluster,
    pods: &Api<Pod>,
    name: &str,
    (st, before): (MigrationStatus, u64),
    what: &str,
) -> anyhow::Result<()> {
    assert_eq!(
        st.phase,
        Some(MigrationPhase::Failed),
        "{st:?}\n{}",
        logs(c)
    );
    let message = st.message.clone().unwrap_or_default();
    eprintln!("{what} mid-stream: {message}");
    assert!(
        message.contains("in-memory state is lost"),
        "the Migration states the policy: {message}"
    );
    no_copy_kept_the_old_state(pods, name, before).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_lost_after_the_resume_stop_the_target_and_never_resume_the_source()
-> anyhow::Result<()> {
    let (mut c, _ctl) = setup().await?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    // 3 GiB: the pages still stream for a few seconds after the restore is seen, even on
    // a busy machine (with 1 GiB every page had sometimes arrived before the kill).
    let ended = cut_mid_stream(&mut c, &pods, "cut", 3072, |c, src| {
        // The page-serving side dies: runc checkpoint and its CRIU, by their own pids.
        let dir = c.nodes[src].daemon.checkpoint_dir().display().to_string();
        let serving = pids_with(&["checkpoint", "--lazy-pages", &dir]);
        assert!(!serving.is_empty(), "no page server found");
        for pid in serving {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    })
    .await?;
    assert!(
        ended
            .0
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("never runs on missing memory"),
        "{:?}",
        ended.0.message
    );
    failed_on_purpose(&c, &pods, "cut", ended, "page server killed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_daemon_killed_mid_stream_stops_the_copy_when_it_restarts() -> anyhow::Result<()> {
    let (mut c, _ctl) = setup().await?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let ended = cut_mid_stream(&mut c, &pods, "tgt", 1024, |c, src| {
        c.nodes[1 - src].daemon.kill();
    })
    .await?;
    failed_on_purpose(&c, &pods, "tgt", ended, "target daemon killed").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_cut_mid_stream_stops_the_target_and_never_resumes_the_source() -> anyhow::Result<()>
{
    let (mut c, _ctl) = setup().await?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let ended = cut_mid_stream(&mut c, &pods, "link", 1024, |c, src| {
        // The target node's TCP connections to the source's daemon are torn down (the
        // kernel resets them, as a failing link or firewall would).
        let port = format!(":{}", podmig_api::nodeapi::DEFAULT_API_PORT);
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &c.nodes[1 - src].netns, "ss", "-K", "dst"])
            .arg(&c.nodes[src].ip)
            .args(["dport", "=", &port])
            .output()
            .expect("ss -K");
        assert!(out.status.success(), "{out:?}");
    })
    .await?;
    failed_on_purpose(&c, &pods, "link", ended, "link cut").await
}

/// Moves MigratingPod `name`'s Pod `name-0` to the other node with `strategy: auto` (the
/// default: no strategy given) and `maxDowntimeMs: budget`; the ended Migration's status.
async fn auto_move(
    c: &Cluster,
    pods: &Api<Pod>,
    name: &str,
    mib: u32,
    budget: u32,
) -> anyhow::Result<(MigrationStatus, String, String)> {
    let (src, _, checksum) = start_app(c, pods, name, mib).await?;
    c.apply(&format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec: {{podName: {name}-0, targetNode: {}, maxDowntimeMs: {budget}, timeoutSeconds: 60}}\n",
        c.nodes[1 - src].name
    ))?;
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    let st = migration_ended(&migs, name, Duration::from_secs(120)).await?;
    assert_eq!(
        st.phase,
        Some(MigrationPhase::Succeeded),
        "{st:?}\n{}",
        logs(c)
    );
    let st = podmig_e2e::wait::migration_report(&migs, name, Duration::from_secs(30)).await?;
    let p1 = ready(pods, &format!("{name}-1"), Duration::from_secs(30)).await?;
    let moved = get_at(&ip(&p1), 8080, "/checksum").await?;
    Ok((st, checksum, moved))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_moves_a_big_pod_lazily_and_a_small_one_in_full_by_the_downtime_budget()
-> anyhow::Result<()> {
    let (c, _ctl) = setup().await?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    // 256 MiB cannot be dumped, carried and restored within 200 ms: lazy.
    let (st, before, after) = auto_move(&c, &pods, "bigauto", 256, 200).await?;
    let report = st.report.clone().unwrap_or_default();
    eprintln!("auto, 256 MiB, maxDowntimeMs 200: {report:?}");
    assert_eq!(report.strategy, Some(Strategy::Lazy), "{report:?}");
    assert!(report.estimated_frozen_ms > 200, "{report:?}");
    let reason_has = |r: &podmig_api::v1alpha1::MigrationReport, words: &str| {
        r.strategy_reason
            .as_deref()
            .is_some_and(|w| w.contains(words))
    };
    assert!(reason_has(&report, "over maxDowntimeMs 200"), "{report:?}");
    // The first move to that node times the link before it estimates.
    assert!(reason_has(&report, "its link probed at"), "{report:?}");
    assert_eq!(before, after, "memory intact after the lazy move");
    // A small Pod fits a generous budget: full.
    let (st, before, after) = auto_move(&c, &pods, "smallauto", 0, 5000).await?;
    let report = st.report.clone().unwrap_or_default();
    eprintln!("auto, 0 MiB, maxDowntimeMs 5000: {report:?}");
    assert_eq!(report.strategy, Some(Strategy::Full), "{report:?}");
    assert!(
        report.estimated_frozen_ms > 0 && report.estimated_frozen_ms <= 5000,
        "{report:?}"
    );
    assert!(
        reason_has(&report, "within maxDowntimeMs 5000"),
        "{report:?}"
    );
    assert_eq!(before, after);
    // `kubectl get migration -o yaml` shows the choice as a person reads it.
    let yaml = c.kubectl(&["get", "migration", "smallauto", "-o", "yaml"])?;
    assert!(
        yaml.contains("strategy: full") && yaml.contains("estimatedFrozenMs"),
        "{yaml}"
    );
    Ok(())
}

/// An app that reserves 8 TiB of address space up front (`PROT_NONE`, as MariaDB, JVMs and
/// Go do) with 8 MiB of it touched moves across nodes in `full`, `lazy` and `auto` (budget
/// 1 ms: auto chooses lazy, as it did for the MariaDB moves that failed), each time with
/// its count going on and every touched page intact. Without podmig's CRIU shim the lazy
/// dumps fail before the freeze: "page-pipe: create_page_pipe: Can't allocate 34359... bytes".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_with_a_huge_address_reservation_moves_full_lazy_and_auto() -> anyhow::Result<()> {
    let (c, _ctl) = setup().await?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    c.apply(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {name: reserve}\nspec:\n  migrationTimeoutSeconds: 60\n  template:\n    metadata: {labels: {app: reserve}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '16', '--reserve-gib', '8192', '--reserve-commit-mib', '8']}\n",
    )?;
    let p0 = ready(&pods, "reserve-0", Duration::from_secs(120)).await?;
    wait_count(&ip(&p0), Duration::from_secs(120)).await?;
    let checksum = get_at(&ip(&p0), 8080, "/checksum").await?;
    // 16 MiB of ballast (first bytes 1..=251) and 8 MiB of the reservation (3..=243).
    assert!(checksum.trim().parse::<u64>()? > 0, "{checksum}");
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    let mut pod = p0;
    for (n, (strategy, extra, expect)) in [
        ("full", "", Strategy::Full),
        ("lazy", "", Strategy::Lazy),
        ("auto", ", maxDowntimeMs: 1", Strategy::Lazy),
    ]
    .into_iter()
    .enumerate()
    {
        let before = get_count(&ip(&pod)).await?;
        let to = c
            .nodes
            .iter()
            .find(|x| x.name != node_of(&pod))
            .map(|x| x.name.clone())
            .ok_or_else(|| anyhow::anyhow!("no other node"))?;
        let name = format!("reserve-{strategy}");
        c.apply(&format!(
            "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {name}}}\nspec: {{podName: {}, targetNode: {to}, strategy: {strategy}, timeoutSeconds: 60{extra}}}\n",
            pod.name_any()
        ))?;
        let st = migration_ended(&migs, &name, Duration::from_secs(120)).await?;
        assert_eq!(
            st.phase,
            Some(MigrationPhase::Succeeded),
            "{strategy}: {st:?}\n{}",
            logs(&c)
        );
        let st = podmig_e2e::wait::migration_report(&migs, &name, Duration::from_secs(30)).await?;
        let report = st.report.unwrap_or_default();
        eprintln!("8 TiB reservation, {strategy}: {report:?}");
        // A move asked for in full records no strategy of its own; lazy ones record theirs.
        assert_eq!(
            report.strategy.unwrap_or(Strategy::Full),
            expect,
            "{strategy}: {report:?}"
        );
        if expect == Strategy::Lazy {
            assert!(
                report.pages_faulted + report.pages_pushed >= 8 * 256,
                "{strategy}: the reservation's touched pages came lazily: {report:?}"
            );
        }
        pod = ready(
            &pods,
            &format!("reserve-{}", n + 1),
            Duration::from_secs(30),
        )
        .await?;
        assert_eq!(node_of(&pod), to);
        assert_eq!(
            get_count(&ip(&pod)).await?,
            before + 1,
            "{strategy}: the count went on after the move"
        );
        assert_eq!(
            get_at(&ip(&pod), 8080, "/checksum").await?,
            checksum,
            "{strategy}: every touched page intact"
        );
    }
    Ok(())
}
