//! Evictions answered by a move, on the local two-node cluster with the controller's
//! eviction webhook registered as the chart registers it: `kubectl drain` of a
//! MigratingPod behind a Service, an API eviction of an annotated bare Pod, a drain of six
//! Pods within the per-node limit, and a webhook that is down.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Event, Pod, Service};
use kube::{
    Api, ResourceExt,
    api::{EvictParams, ListParams},
};
use podmig_api::{
    ANNOTATION_STARTED_BY_EVICTION,
    v1alpha1::{Migration, MigrationPhase},
};
use podmig_e2e::{
    cluster::Cluster,
    testapp::{get_count, get_count_at},
    wait::{node_of, pod_ip as ip, ready_pod as ready, until},
};

fn mpod_yaml(name: &str) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}}}\nspec:\n  strategy: full\n  migrationTimeoutSeconds: 60\n  template:\n    metadata: {{labels: {{app: {name}}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '8']}}\n"
    )
}

/// A client that shows a 429 instead of retrying it (kube-rs retries 429s by default).
async fn no_retry_client(c: &Cluster) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(c.kubeconfig())?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await?;
    config.default_retry = false;
    Ok(kube::Client::try_from(config)?)
}

/// The Event reasons recorded on Pod `pod`.
async fn event_reasons(c: &Cluster, pod: &str) -> Vec<(String, String)> {
    let events: Api<Event> = Api::default_namespaced(c.client.clone());
    events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(pod))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_drain_through_the_eviction_webhook_moves_a_migratingpod_that_serves_until_its_freeze()
-> anyhow::Result<()> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller_with_webhook("a", "Fail", &[])?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    c.apply(&mpod_yaml("web"))?;
    c.apply("apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  selector: {app: web}\n  ports:\n  - {port: 80, targetPort: 8080}\n")?;
    let p0 = ready(&pods, "web-0", Duration::from_secs(60)).await?;
    let svcs: Api<Service> = Api::default_namespaced(c.client.clone());
    let cluster_ip = until("a ClusterIP", Duration::from_secs(10), async || {
        svcs.get("web").await.ok()?.spec?.cluster_ip
    })
    .await?;
    until("the Service answers", Duration::from_secs(30), async || {
        get_count_at(&cluster_ip, 80).await.ok()
    })
    .await
    .map_err(|e| {
        let nat = std::process::Command::new("iptables")
            .args(["-t", "nat", "-S"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        anyhow::anyhow!(
            "{e}\n{}\n{nat}",
            c.kubectl(&["get", "svc,endpointslices,pods", "-o", "wide"])
                .unwrap_or_default()
        )
    })?;

    // Sampled through the move: was the source ever taken out of the Service (terminating)
    // before its target served? With the webhook it is not deleted before the move ends.
    let slices: Api<EndpointSlice> = Api::default_namespaced(c.client.clone());
    let early_exit = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let early_exit = early_exit.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(s) = slices.get("web").await {
                    let state = |pod: &str| {
                        s.endpoints
                            .iter()
                            .find(|e| {
                                e.target_ref.as_ref().and_then(|r| r.name.as_deref()) == Some(pod)
                            })
                            .map(|e| e.conditions.clone().unwrap_or_default())
                    };
                    let source_leaving =
                        state("web-0").is_some_and(|c| c.terminating == Some(true));
                    let target_ready = state("web-1").is_some_and(|c| c.ready == Some(true));
                    if source_leaving && !target_ready {
                        early_exit.lock().expect("lock").push(Instant::now());
                    }
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    // Counted far beyond what the poller below can add: a copy started afresh (from 1)
    // could not pass for the moved one.
    let before = podmig_e2e::testapp::raise_count(&ip(&p0), 300).await?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let poller = tokio::spawn(podmig_e2e::demo::poll_answered(
        cluster_ip.clone(),
        80,
        stopped,
    ));
    let started = Instant::now();
    let drain = std::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args([
            "drain",
            &node_of(&p0),
            "--ignore-daemonsets",
            "--timeout=120s",
        ])
        .output()?;
    let drained_in = started.elapsed();
    let (out, err) = (
        String::from_utf8_lossy(&drain.stdout).into_owned(),
        String::from_utf8_lossy(&drain.stderr).into_owned(),
    );
    assert!(drain.status.success(), "{out}\n{err}");
    // The webhook waited for the short move inside the review: the eviction went on
    // when the Pod was gone, and kubectl never had to retry after a 429.
    assert!(!err.contains("will retry"), "{err}");
    let p1 = ready(&pods, "web-1", Duration::from_secs(30)).await?;
    let stopped_at = Instant::now();
    let _ = stop.send(());
    let (answers, unanswered) = poller.await?;
    sampler.abort();
    assert_ne!(node_of(&p1), node_of(&p0), "moved to the other node");
    assert!(out.contains("drained"), "{out}");
    assert!(pods.get_opt("web-0").await?.is_none(), "the source is gone");
    assert_eq!(
        unanswered, 0,
        "a request through the Service was never answered"
    );
    assert!(
        early_exit.lock().expect("lock").is_empty(),
        "the source left the Service before its target served"
    );
    // The move was the webhook's: a Migration started by the eviction, with the user.
    let migrations: Api<Migration> = Api::default_namespaced(c.client.clone());
    let made: Vec<Migration> = migrations.list(&ListParams::default()).await?.items;
    let m = made
        .iter()
        .find(|m| m.spec.pod_name == "web-0")
        .expect("a Migration of web-0");
    assert_eq!(
        m.annotations()
            .get(ANNOTATION_STARTED_BY_EVICTION)
            .map(String::as_str),
        Some("kubernetes-admin")
    );
    assert_eq!(
        m.status.as_ref().and_then(|s| s.phase),
        Some(MigrationPhase::Succeeded)
    );
    let frozen = m.status.as_ref().and_then(|s| s.frozen_ms).unwrap_or(0);
    // Each answered poll was counted by the one app, before or after its move: the moved
    // Pod goes on from where the source stopped.
    let count = get_count(&ip(&p1)).await?;
    assert!(
        count > before + answers.len() as u64,
        "the count went on: {count} after {before} before the drain and {} answers during it",
        answers.len()
    );
    let reasons = event_reasons(&c, "web-0").await;
    assert!(
        reasons.iter().any(|(r, m)| r == "EvictionMovesPod"
            && m.contains("kubernetes-admin")
            && m.contains(&node_of(&p1))),
        "{reasons:?}"
    );
    eprintln!(
        "drain through the webhook: {drained_in:?}, {} answers, longest wait {:?}, frozen {frozen} ms",
        answers.len(),
        podmig_e2e::demo::longest_gap(&answers, started, stopped_at)
    );
    Ok(())
}

/// The API server's refusal of an eviction of Pod `name` (`why` says why one is expected;
/// an eviction let through, or another kind of error, fails the test).
async fn refused_eviction(api: &Api<Pod>, name: &str, why: &str) -> kube::core::Status {
    match api.evict(name, &EvictParams::default()).await {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("{why}: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_eviction_of_an_annotated_bare_pod_is_answered_429_and_the_pod_moves()
-> anyhow::Result<()> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    // Answered at once (no wait for the move inside the review), as a client sees it
    // when the move outlasts the wait.
    let (_ctl, _) =
        c.start_controller_with_webhook("a", "Fail", &["--eviction-wait-seconds", "0"])?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    c.apply("apiVersion: v1\nkind: Pod\nmetadata:\n  name: cache\n  labels: {app: cache}\n  annotations: {podmig.dev/on-eviction: migrate}\nspec:\n  runtimeClassName: podmig\n  terminationGracePeriodSeconds: 5\n  containers:\n  - {name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '8']}\n")?;
    let p0 = ready(&pods, "cache", Duration::from_secs(60)).await?;
    podmig_e2e::testapp::wait_count(&ip(&p0), Duration::from_secs(30)).await?;
    let before = get_count(&ip(&p0)).await?;

    let evicting: Api<Pod> = Api::default_namespaced(no_retry_client(&c).await?);
    let s = refused_eviction(&evicting, "cache", "the eviction waits for the move").await;
    assert_eq!(s.code, 429, "{s:?}");
    assert!(
        s.message.contains("podmig moves Pod cache to node")
            && s.message.contains("Migration cache-evict-"),
        "{}",
        s.message
    );
    assert!(pods.get("cache").await.is_ok(), "not evicted yet");
    // A second eviction while it moves is refused as well, naming the same move.
    let migration = s
        .message
        .split_whitespace()
        .find(|w| w.starts_with("cache-evict-"))
        .map(|w| w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric()))
        .expect("the first refusal names its Migration")
        .to_owned();
    let again = refused_eviction(
        &evicting,
        "cache",
        "a second eviction while the Pod moves is refused",
    )
    .await;
    assert_eq!(again.code, 429, "{again:?}");
    assert!(
        again.message.contains(&format!("Migration {migration}")),
        "the second refusal names the same move {migration}: {}",
        again.message
    );
    // Adopted by a MigratingPod of its own name, then moved as its Pod cache-0.
    let moved = ready(&pods, "cache-0", Duration::from_secs(60)).await?;
    assert_ne!(node_of(&moved), node_of(&p0));
    until("the bare Pod gone", Duration::from_secs(30), async || {
        pods.get_opt("cache").await.ok()?.is_none().then_some(())
    })
    .await?;
    let after = get_count(&ip(&moved)).await?;
    assert_eq!(after, before + 1, "the moved Pod goes on counting");
    // The retried eviction finds nothing left to evict.
    match evicting.evict("cache", &EvictParams::default()).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 404, "{e:?}"),
        other => panic!("the Pod is gone: {other:?}"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_of_six_pods_moves_them_all_never_more_than_the_per_node_limit_at_once()
-> anyhow::Result<()> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller_with_webhook("a", "Fail", &["--max-moves-per-node", "2"])?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    // All six on node-0: node-1 is cordoned while they start.
    c.kubectl(&["cordon", "node-1"])?;
    let names: Vec<String> = (0..6).map(|i| format!("w{i}")).collect();
    for n in &names {
        c.apply(&mpod_yaml(n))?;
    }
    let mut before = Vec::new();
    for n in &names {
        let p = ready(&pods, &format!("{n}-0"), Duration::from_secs(90)).await?;
        assert_eq!(node_of(&p), "node-0");
        podmig_e2e::testapp::wait_count(&ip(&p), Duration::from_secs(30)).await?;
        before.push(get_count(&ip(&p)).await?);
    }
    c.kubectl(&["uncordon", "node-1"])?;

    let migrations: Api<Migration> = Api::default_namespaced(c.client.clone());
    let peak = Arc::new(Mutex::new((0usize, 0u32, String::new())));
    let sampler = {
        let peak = peak.clone();
        let migrations = migrations.clone();
        let kubeconfig = c.kubeconfig();
        tokio::spawn(async move {
            loop {
                if let Ok(l) = migrations.list(&ListParams::default()).await {
                    let running =
                        l.items
                            .iter()
                            .filter(|m| {
                                m.status.as_ref().and_then(|s| s.phase).is_some_and(|p| {
                                    p != MigrationPhase::Pending && !p.is_terminal()
                                })
                            })
                            .count();
                    let deepest = l
                        .items
                        .iter()
                        .filter_map(|m| m.status.as_ref()?.queue_position)
                        .max()
                        .unwrap_or(0);
                    let want_table = {
                        let mut p = peak.lock().expect("lock");
                        p.0 = p.0.max(running);
                        p.1 = p.1.max(deepest);
                        deepest > 0 && !p.2.contains("Queued")
                    };
                    if want_table {
                        // What a person sees while moves wait (kubectl off the runtime).
                        let kc = kubeconfig.clone();
                        let table = tokio::task::spawn_blocking(move || {
                            podmig_e2e::cluster::kubectl(&kc, &["get", "mig"])
                        })
                        .await;
                        if let Ok(Ok(t)) = table {
                            peak.lock().expect("lock").2 = t;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = Instant::now();
    c.kubectl(&["drain", "node-0", "--ignore-daemonsets", "--timeout=240s"])?;
    let drained_in = started.elapsed();
    sampler.abort();
    let (max_running, deepest, table) = peak.lock().expect("lock").clone();
    let all = migrations.list(&ListParams::default()).await?.items;
    let history: Vec<String> = all
        .iter()
        .map(|m| {
            let st = m.status.clone().unwrap_or_default();
            format!(
                "{} {:?} {:?} {:?}",
                m.name_any(),
                st.phase,
                st.reason,
                st.transitions
                    .iter()
                    .map(|t| format!("{:?}@{}", t.phase, t.at.0))
                    .collect::<Vec<_>>()
            )
        })
        .collect();
    assert!(
        max_running <= 2,
        "{max_running} moves ran out of node-0 at once: {history:#?}"
    );
    assert!(deepest >= 1, "some moves waited in the queue: {history:#?}");
    assert!(
        table.contains("Queued") && table.contains("REASON") && table.contains("QUEUE"),
        "kubectl get mig shows the queue:\n{table}"
    );
    for (n, count) in names.iter().zip(&before) {
        let p = ready(&pods, &format!("{n}-1"), Duration::from_secs(30)).await?;
        assert_eq!(node_of(&p), "node-1");
        assert_eq!(
            get_count(&ip(&p)).await?,
            count + 1,
            "{n} moved with its count"
        );
    }
    assert_eq!(all.len(), 6, "one Migration per Pod");
    assert!(
        all.iter()
            .all(|m| m.status.as_ref().and_then(|s| s.phase) == Some(MigrationPhase::Succeeded)),
        "{:?}",
        all.iter()
            .map(|m| (m.name_any(), m.status.clone()))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "drain of 6 Pods, 2 per node: {drained_in:?}, at most {max_running} at once, queue up to {deepest}\n{table}\n{history:#?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_eviction_webhook_that_is_down_follows_its_failure_policy() -> anyhow::Result<()> {
    let c = Cluster::up_temp(1).await?;
    c.install_crds()?;
    let (ctl, port) = c.start_controller_with_webhook("a", "Fail", &[])?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    for n in ["kept", "gone"] {
        c.apply(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {n}}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: app, image: 'podmig.local/testapp:latest'}}\n"))?;
        ready(&pods, n, Duration::from_secs(60)).await?;
    }
    let evicting: Api<Pod> = Api::default_namespaced(no_retry_client(&c).await?);
    // Up: a Pod podmig does not move is evicted as usual — here after the serving
    // certificate rotated (a new Secret volume): the controller serves the new one within
    // its 10 s poll, so a configuration trusting only the new one works.
    c.issue_webhook_certificate("a")?;
    c.register_webhook("a", port, "Fail")?;
    until(
        "the rotated certificate served",
        Duration::from_secs(30),
        async || evicting.evict("gone", &EvictParams::default()).await.ok(),
    )
    .await?;
    until("evicted", Duration::from_secs(30), async || {
        pods.get_opt("gone").await.ok()?.is_none().then_some(())
    })
    .await?;
    drop(ctl);
    // Down with failurePolicy Fail: evictions are refused, nothing is deleted.
    let refused = evicting
        .evict("kept", &EvictParams::default())
        .await
        .expect_err("refused while the webhook is down");
    let kube::Error::Api(s) = refused else {
        panic!("unexpected {refused}")
    };
    assert_eq!(s.code, 500, "{s:?}");
    assert!(
        s.message
            .contains("failed calling webhook \"eviction.podmig.dev\""),
        "{}",
        s.message
    );
    assert!(pods.get("kept").await.is_ok());
    // Down with Ignore: the eviction goes on.
    c.kubectl(&[
        "patch",
        "validatingwebhookconfiguration",
        "podmig-eviction",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/webhooks/0/failurePolicy", "value": "Ignore"}]"#,
    ])?;
    evicting.evict("kept", &EvictParams::default()).await?;
    until("evicted", Duration::from_secs(30), async || {
        pods.get_opt("kept").await.ok()?.is_none().then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preemption_moves_the_low_priority_migratingpod_through_the_extender_instead_of_killing_it()
-> anyhow::Result<()> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (_ctl, _) = c.start_controller("a")?;
    // The extender calls the daemons as any caller: a ServiceAccount bound to the migrate
    // permission (as the chart's podmig-migrator ClusterRole grants it).
    let user = "system:serviceaccount:kube-system:podmig-extender";
    c.apply(&format!("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\nmetadata: {{name: migrator}}\nrules:\n- {{apiGroups: [''], resources: [pods/migrate], verbs: [create]}}\n---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: extender-migrates}}\nroleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: migrator}}\nsubjects:\n- {{kind: User, name: '{user}'}}\n"))?;
    let token = c.token_for(user, &["system:serviceaccounts", "system:authenticated"])?;
    let _ext = c.start_extender(&token, true)?;
    c.apply("apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: urgent}\nvalue: 1000\n")?;
    // A low-priority MigratingPod asking for two thirds of a node.
    c.apply("apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {name: low}\nspec:\n  strategy: full\n  template:\n    metadata: {labels: {app: low}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {name: app, image: 'podmig.local/testapp:latest', args: ['--mem-mib', '8'], resources: {requests: {memory: 16Gi}}}\n")?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let p0 = ready(&pods, "low-0", Duration::from_secs(60)).await?;
    let node = node_of(&p0);
    podmig_e2e::testapp::wait_count(&ip(&p0), Duration::from_secs(30)).await?;
    let before = get_count(&ip(&p0)).await?;
    // A high-priority Pod that must run on that node and does not fit beside it.
    c.apply(&format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: urgent}}\nspec:\n  priorityClassName: urgent\n  nodeSelector: {{kubernetes.io/hostname: {node}}}\n  terminationGracePeriodSeconds: 1\n  containers:\n  - {{name: app, image: 'podmig.local/testapp:latest', resources: {{requests: {{memory: 16Gi}}}}}}\n"))?;
    let urgent = ready(&pods, "urgent", Duration::from_secs(90)).await?;
    assert_eq!(node_of(&urgent), node, "the preemptor got its room");
    assert_eq!(
        urgent.spec.as_ref().and_then(|s| s.priority),
        Some(1000),
        "priority from its PriorityClass"
    );
    let p1 = ready(&pods, "low-1", Duration::from_secs(30)).await?;
    assert_ne!(node_of(&p1), node, "the victim moved away");
    assert_eq!(get_count(&ip(&p1)).await?, before + 1, "and kept its count");
    let migrations: Api<Migration> = Api::default_namespaced(c.client.clone());
    let m = migrations
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|m| m.spec.pod_name == "low-0")
        .expect("the extender's Migration");
    assert_eq!(
        m.annotations()
            .get("podmig.dev/requested-by")
            .map(String::as_str),
        Some(user)
    );
    let reasons = event_reasons(&c, "low-0").await;
    assert!(
        !reasons.iter().any(|(r, _)| r == "Preempted"),
        "the victim was moved, not preempted: {reasons:?}"
    );
    Ok(())
}
