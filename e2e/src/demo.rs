//! `make demo`: the local two-node cluster, the example MigratingPod (test app and its
//! Service) on one node, `kubectl drain` of that node, the app polled throughout; a short
//! narration and one machine-readable result line; then teardown.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use podmig_api::v1alpha1::MigratingPod;

use crate::{
    cluster::Cluster,
    testapp::{get_count, get_count_at},
    wait::until,
};

/// What the demo saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DemoResult {
    /// Node the app ran on.
    pub from: String,
    /// Node it runs on after the drain.
    pub to: String,
    /// Longest time the app did not answer through its Service while the node drained.
    pub service_downtime_ms: u64,
    /// A connection held open through the Service (`GET /stream`) went on across the move.
    pub connection_kept: bool,
    /// The longest pause of that connection's ticks.
    pub connection_gap_ms: u64,
    /// Frozen time the node daemons reported.
    pub frozen_ms: u64,
    /// The app's count just before the drain.
    pub count_before: u64,
    /// Its count right after, on the other node.
    pub count_after: u64,
    /// Answers the Service's poller got between the two reads: each was counted too.
    pub answers_between: u64,
}

impl DemoResult {
    /// The app moved and kept counting: every request it answered between the two reads
    /// is in its count (a copy started afresh would have counted only those after its
    /// start).
    pub fn ok(&self) -> bool {
        !self.to.is_empty()
            && self.from != self.to
            && self.count_after > self.count_before + self.answers_between
    }

    /// The last line `make demo` prints.
    pub fn line(&self) -> String {
        format!(
            "podmig-demo result={} from={} to={} service_downtime_ms={} connection_kept={} connection_gap_ms={} frozen_ms={} count_before={} count_after={}",
            if self.ok() { "ok" } else { "failed" },
            self.from,
            self.to,
            self.service_downtime_ms,
            self.connection_kept,
            self.connection_gap_ms,
            self.frozen_ms,
            self.count_before,
            self.count_after
        )
    }
}

fn pod_ip(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .pod_ip
        .clone()
        .filter(|ip| !ip.is_empty())
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

/// Runs the demo, printing its narration; returns what it saw.
pub async fn run() -> anyhow::Result<DemoResult> {
    let t0 = Instant::now();
    let say = |s: String| println!("[{:5.1}s] {s}", t0.elapsed().as_secs_f64());
    say("podmig demo: drain a node under a running app; the app moves, it does not restart".into());
    let mut c = Cluster::up_temp(2).await?;
    say(format!(
        "two-node cluster up ({})",
        c.nodes
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    c.install_chart(&crate::paths::repo_root().join("helm/podmig"))
        .await?;
    say("helm install podmig helm/podmig -n podmig-system --wait: CRDs, RBAC, daemon CA; a podmig-node DaemonSet Pod per node and the controller Deployment's two Pods (one leads) Ready".into());
    let examples = crate::paths::repo_root().join("examples");
    for f in ["migratingpod.yaml", "service.yaml"] {
        c.kubectl(&["apply", "-f", examples.join(f).to_str().unwrap_or_default()])?;
    }
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let p0 = crate::wait::ready_pod(&pods, "counter-0", Duration::from_secs(120)).await?;
    let ip0 = pod_ip(&p0).unwrap_or_default();
    let from = node_of(&p0);
    crate::testapp::wait_count(&ip0, Duration::from_secs(60)).await?;
    for _ in 0..8 {
        get_count(&ip0).await?;
    }
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::default_namespaced(c.client.clone());
    let cluster_ip = until(
        "the Service's ClusterIP",
        Duration::from_secs(10),
        async || svcs.get("counter").await.ok()?.spec?.cluster_ip,
    )
    .await?;
    until("the Service answers", Duration::from_secs(20), async || {
        crate::testapp::get_count_at(&cluster_ip, 80).await.ok()
    })
    .await?;
    say(format!(
        "kubectl apply -f examples/migratingpod.yaml examples/service.yaml: counter-0 runs on {from} at {ip0}; Service counter at {cluster_ip}:80"
    ));

    // Poll the app through its Service, and hold a connection open through it.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let poller = tokio::spawn(poll(
        cluster_ip.clone(),
        80,
        Duration::from_millis(20),
        stopped,
    ));
    let held = crate::testapp::HeldStream::open(&cluster_ip, 80)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let count_before = get_count_at(&cluster_ip, 80).await?;
    let read_before = Instant::now();
    say(format!(
        "GET {cluster_ip}/count -> {count_before}, GET {cluster_ip}/stream held open; kubectl drain {from} --ignore-daemonsets"
    ));
    let drain_started = Instant::now();
    c.kubectl(&["drain", &from, "--ignore-daemonsets", "--timeout=150s"])?;
    say(format!(
        "kubectl drain {from} returned after {:.1} s: its eviction of counter-0 was answered by a move (429 until the Pod ran elsewhere), not a kill",
        drain_started.elapsed().as_secs_f64()
    ));
    let mpods: Api<MigratingPod> = Api::default_namespaced(c.client.clone());
    let record = until("the move's record", Duration::from_secs(30), async || {
        mpods
            .get("counter")
            .await
            .ok()?
            .status?
            .last_migration
            .filter(|r| r.outcome.is_some())
    })
    .await?;
    let p1 = crate::wait::ready_pod(&pods, &record.target_pod, Duration::from_secs(30)).await?;
    let to = node_of(&p1);
    let ip1 = pod_ip(&p1).unwrap_or_default();
    let asked_after = Instant::now();
    let count_after = get_count_at(&cluster_ip, 80).await?;
    let moved = Instant::now();
    let connection_kept = until("ticks after the move", Duration::from_secs(5), async || {
        (held.ticks_since(moved) >= 3 && held.ended().is_none()).then_some(())
    })
    .await
    .is_ok();
    let connection_gap_ms = held.longest_gap().as_millis() as u64;
    let stopped_at = Instant::now();
    let _ = stop.send(());
    let answers = poller.await.unwrap_or_default();
    let service_downtime_ms = longest_gap(&answers, drain_started, stopped_at).as_millis() as u64;
    let answers_between = answers
        .iter()
        .filter(|t| **t > read_before && **t < asked_after)
        .count() as u64;
    let frozen_ms = record.report.as_ref().map_or(0, |r| r.frozen_ms);
    say(format!(
        "{} runs on {to} at {ip1}: GET {cluster_ip}/count -> {count_after}; through the Service the app did not answer for {service_downtime_ms} ms at most ({frozen_ms} ms frozen); the held connection {} (longest pause {connection_gap_ms} ms)",
        record.target_pod,
        if connection_kept { "went on" } else { "ended" }
    ));
    let log = c
        .kubectl(&["logs", &record.target_pod, "--tail=1"])
        .unwrap_or_default();
    say(format!(
        "kubectl logs {} --tail=1: {}",
        record.target_pod,
        log.trim()
    ));
    let _ = c.kubectl(&["uncordon", &from]);
    c.down();
    say("cluster torn down".into());
    Ok(DemoResult {
        from,
        to,
        service_downtime_ms,
        connection_kept,
        connection_gap_ms,
        frozen_ms,
        count_before,
        count_after,
        answers_between,
    })
}

/// Asks `GET /count` on `ip:port` every 20 ms until `stop`, each request retried until
/// answered (at most 10 s): the times of the answers, and how many requests were never
/// answered (what a Service's client sees of a move).
pub async fn poll_answered(
    ip: String,
    port: u16,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> (Vec<Instant>, usize) {
    let (mut answers, mut unanswered) = (Vec::new(), 0);
    loop {
        let asked = Instant::now();
        loop {
            if get_count_at(&ip, port).await.is_ok() {
                answers.push(Instant::now());
                break;
            }
            if asked.elapsed() > Duration::from_secs(10) {
                unanswered += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::select! {
            _ = &mut stop => return (answers, unanswered),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
}

/// Polls `GET /count` on `ip:port` every `every` until stopped, as a client of a Service
/// would; returns when each answer came.
pub async fn poll(
    ip: String,
    port: u16,
    every: Duration,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) -> Vec<Instant> {
    let mut answers = Vec::new();
    loop {
        if get_count_at(&ip, port).await.is_ok() {
            answers.push(Instant::now());
        }
        tokio::select! {
            _ = &mut stop => return answers,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The longest time without an answer from `from` to `end`: the silence after the last
/// answer counts (a client that got no answer at all until `end` waited all of it).
pub fn longest_gap(answers: &[Instant], from: Instant, end: Instant) -> Duration {
    let mut last = from;
    let mut longest = Duration::ZERO;
    for &t in answers.iter().filter(|t| **t >= from && **t <= end) {
        longest = longest.max(t - last);
        last = t;
    }
    longest.max(end.saturating_duration_since(last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_below_what_the_service_answered_meanwhile_is_state_lost() {
        let r = |after: u64| DemoResult {
            from: "node-0".into(),
            to: "node-1".into(),
            service_downtime_ms: 300,
            connection_kept: true,
            connection_gap_ms: 300,
            frozen_ms: 200,
            count_before: 25,
            count_after: after,
            answers_between: 40,
        };
        // The poller's 40 answers after the read of 25 were all counted: 66 at least.
        assert!(r(66).ok());
        // A copy started afresh that answered them would say 41 (> 25, yet lost).
        assert!(!r(41).ok());
        assert!(!r(65).ok());
    }

    #[test]
    fn gap_and_line() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let answers = [at(0), at(20), at(40), at(600), at(620)];
        assert_eq!(
            longest_gap(&answers, at(30), at(640)),
            Duration::from_millis(560)
        );
        // Silence after the last answer, up to the end of the run, counts too.
        assert_eq!(
            longest_gap(&answers, at(30), at(1620)),
            Duration::from_millis(1000)
        );
        // No answer at all: the whole time.
        assert_eq!(
            longest_gap(&[], at(30), at(530)),
            Duration::from_millis(500)
        );
        let r = DemoResult {
            from: "node-0".into(),
            to: "node-1".into(),
            service_downtime_ms: 560,
            connection_kept: true,
            connection_gap_ms: 300,
            frozen_ms: 200,
            count_before: 10,
            count_after: 11,
            answers_between: 0,
        };
        assert!(r.ok());
        assert_eq!(
            r.line(),
            "podmig-demo result=ok from=node-0 to=node-1 service_downtime_ms=560 connection_kept=true connection_gap_ms=300 frozen_ms=200 count_before=10 count_after=11"
        );
        assert!(
            !DemoResult {
                to: "node-0".into(),
                ..r
            }
            .ok()
        );
    }
}
