//! Tried as an attacker would, on the local two-node cluster: no Pod can be stolen or
//! killed through podmig. A Pod that copies a victim's `podmig.dev/*` annotations (in
//! another namespace, or claiming the victim's MigratingPod as its owner), and a
//! MigratingPod whose template names the victim, are refused at their container's create;
//! the peer endpoints (hand-over, verdict, page tunnel) answer 403 to a migrator's token,
//! a person's, and another node's daemon credentials. After each, the victim was never
//! frozen and keeps its count; the real move between the right two daemons still works.
//! A hostile source — a server with a node's own certificate on its address — answering
//! hand-overs with crafted streams (traversal, a symlink out, a device node, an oversize
//! frame, a bad CRC, another Pod's directory, a file no checkpoint holds) gets each move
//! failed with the check named and nothing written on the target.

use std::{process::Command, time::Duration};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use podmig_api::{
    ANNOTATION_MIGRATE_FROM, ANNOTATION_MIGRATION_ID, ANNOTATION_POD_IP, ANNOTATION_SOURCE_NODE,
    nodeapi::MoveInfo,
    v1alpha1::{MigratingPod, Migration, MigrationPhase},
};
use podmig_e2e::{
    cluster::Cluster,
    daemon_api::{curl, error_reason, post_migrate},
    process::Proc,
    testapp::{get_count, wait_count},
    wait::{migration_ended, node_of, pod_ip as ip, ready_pod as ready, until},
};
use serde_json::Value;

const IMAGE: &str = "podmig.local/testapp:latest";

fn mpod_yaml(ns: &str, name: &str, annotations: &str, mib: u32) -> String {
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  migrationTimeoutSeconds: 60\n  template:\n    metadata: {{labels: {{app: {name}}}, annotations: {{{annotations}}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - {{name: app, image: '{IMAGE}', args: ['--mem-mib', '{mib}']}}\n"
    )
}

async fn setup() -> anyhow::Result<(Cluster, Proc)> {
    let c = Cluster::up_temp(2).await?;
    c.install_crds()?;
    let (ctl, _) = c.start_controller("a")?;
    Ok((c, ctl))
}

/// The victim: MigratingPod `counter` in `default`, answering with a count.
struct Victim {
    uid: String,
    node: usize,
    ip: String,
    count: u64,
}

async fn start_victim(c: &Cluster, mib: u32) -> anyhow::Result<Victim> {
    c.apply(&mpod_yaml("default", "counter", "", mib))?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let p0 = ready(&pods, "counter-0", Duration::from_secs(120)).await?;
    let ip = ip(&p0);
    wait_count(&ip, Duration::from_secs(60)).await?;
    let count = get_count(&ip).await?;
    Ok(Victim {
        uid: p0.uid().unwrap_or_default(),
        node: c
            .nodes
            .iter()
            .position(|n| n.name == node_of(&p0))
            .unwrap_or(0),
        ip,
        count,
    })
}

impl Victim {
    /// The victim still runs where it ran, never frozen by a move: its count goes on by
    /// one, and its daemon holds no move of it.
    async fn untouched(&mut self, c: &Cluster, admin: &str) -> anyhow::Result<()> {
        let n = get_count(&self.ip).await?;
        assert_eq!(n, self.count + 1, "the victim kept its count");
        self.count = n;
        let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
        let p = pods.get("counter-0").await?;
        assert_eq!(p.uid().as_deref(), Some(self.uid.as_str()));
        assert!(p.metadata.deletion_timestamp.is_none());
        let (code, b) = curl(c, self.node, "GET", "/migrations", Some(admin), None)?;
        assert_eq!(code, 200, "{b}");
        let moves: Vec<MoveInfo> = serde_json::from_str(&b)?;
        assert!(
            !moves.iter().any(|m| m.pod_uid == self.uid),
            "the victim was never part of a move: {moves:?}"
        );
        Ok(())
    }
}

/// A Pod on `node` that copies the victim's target annotations.
fn thief_yaml(ns: &str, name: &str, node: &str, v: &Victim, c: &Cluster, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  annotations: {{{ANNOTATION_MIGRATE_FROM}: {}, {ANNOTATION_SOURCE_NODE}: {}, {ANNOTATION_MIGRATION_ID}: steal-1}}\n{extra}spec:\n  runtimeClassName: podmig\n  nodeName: {node}\n  containers:\n  - {{name: app, image: '{IMAGE}'}}\n",
        v.uid, c.nodes[v.node].name
    )
}

/// Waits until Pod `ns/name`'s container is refused at its create; returns the message.
async fn refused(c: &Cluster, ns: &str, name: &str) -> anyhow::Result<String> {
    until(
        &format!("{ns}/{name} refused"),
        Duration::from_secs(90),
        async || {
            let out = c
                .kubectl(&["get", "pod", name, "-n", ns, "-o", "json"])
                .ok()?;
            let pod: Value = serde_json::from_str(&out).ok()?;
            let st = &pod["status"]["containerStatuses"][0]["state"];
            assert!(
                st["running"].is_null(),
                "{ns}/{name} runs: {st}\n{}",
                c.nodes[0].daemon.log()
            );
            let msg = st["waiting"]["message"].as_str()?.to_owned();
            msg.contains("Refused").then_some(msg)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_targets_are_refused_and_the_victim_keeps_running() -> anyhow::Result<()> {
    let (c, _ctl) = setup().await?;
    let admin = c.token_for("alice", &["system:masters", "system:authenticated"])?;
    let mut v = start_victim(&c, 16).await?;
    let other = c.nodes[1 - v.node].name.clone();
    // `kubectl create namespace` (sent in protobuf, as kubectl does).
    c.kubectl(&["create", "namespace", "evil"])?;

    // 1. Another namespace, the victim's annotations copied.
    c.apply(&thief_yaml("evil", "thief", &other, &v, &c, ""))?;
    // 2. The victim's namespace, claiming its MigratingPod as controller.
    let mpods: Api<MigratingPod> = Api::default_namespaced(c.client.clone());
    let owner = mpods.get("counter").await?.uid().unwrap_or_default();
    let owned = format!(
        "  ownerReferences: [{{apiVersion: podmig.dev/v1alpha1, kind: MigratingPod, name: counter, uid: {owner}, controller: true}}]\n"
    );
    c.apply(&thief_yaml("default", "thief", &other, &v, &c, &owned))?;
    // 3. A MigratingPod whose template names the victim as its source.
    let forged = format!(
        "{ANNOTATION_MIGRATE_FROM}: {}, {ANNOTATION_SOURCE_NODE}: {}, {ANNOTATION_MIGRATION_ID}: steal-2",
        v.uid, c.nodes[v.node].name
    );
    c.apply(&mpod_yaml("evil", "copycat", &forged, 0))?;
    // 4. A Pod on the other node claiming the victim's address.
    c.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: squatter\n  namespace: evil\n  annotations: {{{ANNOTATION_POD_IP}: '{}'}}\nspec:\n  nodeName: {other}\n  containers:\n  - {{name: app, image: '{IMAGE}'}}\n",
        v.ip
    ))?;

    let msg = refused(&c, "evil", "thief").await?;
    eprintln!("evil/thief: {msg}");
    assert!(msg.contains("no MigratingPod controls it"), "{msg}");
    let msg = refused(&c, "default", "thief").await?;
    eprintln!("default/thief: {msg}");
    assert!(msg.contains("podmig's controller did not make"), "{msg}");
    // The copycat's Pod runs, but as itself: a fresh app, not the victim's state.
    let evil: Api<Pod> = Api::namespaced(c.client.clone(), "evil");
    let copy = ready(&evil, "copycat-0", Duration::from_secs(60)).await?;
    assert!(
        !copy.annotations().contains_key(ANNOTATION_MIGRATE_FROM),
        "{:?}",
        copy.annotations()
    );
    let fresh = wait_count(&ip(&copy), Duration::from_secs(30)).await?;
    assert!(
        fresh <= 2,
        "the copycat started afresh, not at the victim's count: {fresh}"
    );
    // The refusals are told as Events on the thieves, as `kubectl describe` shows them.
    let events = until("refusal events", Duration::from_secs(20), async || {
        let out = c
            .kubectl(&["get", "events", "-n", "evil", "-o", "json"])
            .ok()?;
        out.contains("MigrationTargetRefused").then_some(out)
    })
    .await?;
    assert!(events.contains("thief"), "{events}");
    // The squatter gets no sandbox (podmig-cni checks the move's record), and its node
    // never routes the victim's address to it.
    let squat = until(
        "the squatter refused",
        Duration::from_secs(60),
        async || {
            let out = c
                .kubectl(&["get", "pod", "squatter", "-n", "evil", "-o", "json"])
                .ok()?;
            let pod: Value = serde_json::from_str(&out).ok()?;
            let st = &pod["status"]["containerStatuses"][0]["state"];
            assert!(st["running"].is_null(), "the squatter runs: {st}");
            let msg = st["waiting"]["message"].as_str()?.to_owned();
            msg.contains("may not take address").then_some(msg)
        },
    )
    .await?;
    eprintln!("evil/squatter: {squat}");
    let node = &c.nodes[1 - v.node].netns;
    let routes = Command::new("ip")
        .args(["-n", node, "-o", "route", "show", &format!("{}/32", v.ip)])
        .output()?;
    assert!(
        routes.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&routes.stdout)
    );
    v.untouched(&c, &admin).await?;
    Ok(())
}

/// The chart's `podmig-migrator` ClusterRole, rendered by Helm, bound to user `sched`.
fn bind_chart_migrator(c: &Cluster) -> anyhow::Result<()> {
    let chart = podmig_e2e::paths::repo_root().join("helm/podmig");
    let out = Command::new("helm")
        .args(["template", "podmig"])
        .arg(&chart)
        .args(["--show-only", "templates/rbac.yaml"])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8_lossy(&out.stdout).into_owned();
    let role = rendered
        .split("\n---")
        .find(|d| d.contains("name: podmig-migrator"))
        .ok_or_else(|| anyhow::anyhow!("no migrator role in {rendered}"))?;
    c.apply(role)?;
    c.apply("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {name: sched-migrates}\nroleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: podmig-migrator}\nsubjects: [{kind: User, name: sched, apiGroup: rbac.authorization.k8s.io}]\n")?;
    Ok(())
}

/// `kubectl auth can-i <what> --as=user [--as-group=g …]`: yes or no.
fn can_i(c: &Cluster, what: &[&str], user: &str, groups: &[&str]) -> anyhow::Result<bool> {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(c.kubeconfig())
        .args(["auth", "can-i"])
        .args(what)
        .args(["--as", user]);
    for g in groups {
        cmd.args(["--as-group", g]);
    }
    let out = cmd.output()?;
    let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    anyhow::ensure!(
        answer == "yes" || answer == "no",
        "kubectl auth can-i: {answer}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(answer == "yes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_endpoints_answer_only_the_daemon_of_the_moves_target_node() -> anyhow::Result<()> {
    let (c, _ctl) = setup().await?;
    bind_chart_migrator(&c)?;
    let admin = c.token_for("alice", &["system:masters", "system:authenticated"])?;
    let mut v = start_victim(&c, 256).await?;
    let (src, dst) = (v.node, 1 - v.node);
    let sched = c.token_for("sched", &["system:authenticated"])?;
    let person = c.token_for("mallory", &["system:authenticated"])?;
    // Credentials of a node daemon that is not the target's: the source's own node.
    let other_node = c.token_for(
        &format!("system:node:{}", c.nodes[src].name),
        &["system:nodes", "system:authenticated"],
    )?;
    let target_node = c.token_for(
        &format!("system:node:{}", c.nodes[dst].name),
        &["system:nodes", "system:authenticated"],
    )?;

    // What RBAC says, asked as a person would.
    let node = format!("system:node:{}", c.nodes[dst].name);
    let migrate = ["create", "pods", "--subresource", "migrate"];
    let handover = ["create", "nodes", "--subresource", "handover"];
    assert!(can_i(&c, &migrate, "sched", &[])?);
    assert!(!can_i(&c, &handover, "sched", &[])?);
    assert!(!can_i(&c, &migrate, "mallory", &[])?);
    assert!(!can_i(&c, &handover, "mallory", &[])?);
    assert!(can_i(&c, &handover, &node, &["system:nodes"])?);
    // A migrator asks for moves; it creates no MigratingPod (whose template the controller
    // would turn into a Pod the migrator could never create) and no Migration, in any
    // namespace; it reads them.
    for ns in ["default", "podmig-system", "kube-system"] {
        for what in ["migratingpods.podmig.dev", "migrations.podmig.dev"] {
            assert!(
                !can_i(&c, &["create", what, "-n", ns], "sched", &[])?,
                "a migrator may create {what} in {ns}"
            );
            assert!(can_i(&c, &["list", what, "-n", ns], "sched", &[])?);
        }
        assert!(!can_i(&c, &["create", "pods", "-n", ns], "sched", &[])?);
    }

    // A hand-over to a made-up target: 403 for everyone, nothing frozen.
    let fake = format!(
        "{{\"handover\": {{\"migrationId\": \"evil\", \"targetNamespace\": \"default\", \"targetPod\": \"nope\", \"targetPodUid\": \"x\", \"targetNode\": \"{}\"}}}}",
        c.nodes[dst].name
    );
    for (who, token) in [
        ("migrator", &sched),
        ("person", &person),
        ("other node", &other_node),
        ("target node, forged target", &target_node),
    ] {
        let (code, b) = post_migrate(&c, src, &v.uid, Some(token), &fake)?;
        eprintln!("hand-over as {who}: {code} {b}");
        assert_eq!(
            (code, error_reason(&b)),
            (403, "Forbidden".into()),
            "{who}: {b}"
        );
        assert!(!b.contains("vnd.podmig.checkpoint"), "{b}");
    }
    v.untouched(&c, &admin).await?;

    // A real lazy move: while its pages stream, its verdict and its pages are refused to
    // everyone but the target's node.
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    c.apply(&format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: real}}\nspec: {{podName: counter-0, targetNode: {}, strategy: lazy, timeoutSeconds: 60}}\n",
        c.nodes[dst].name
    ))?;
    until("the hand-over", Duration::from_secs(60), async || {
        let (_, b) = curl(&c, src, "GET", "/migrations/real", Some(&admin), None).ok()?;
        b.contains("\"role\":\"source\"").then_some(())
    })
    .await?;
    for (who, token) in [
        ("migrator", &sched),
        ("person", &person),
        ("other node", &other_node),
    ] {
        let (code, b) = curl(
            &c,
            src,
            "POST",
            "/migrations/real/complete",
            Some(token),
            Some("{\"ok\": false, \"error\": \"abort\"}"),
        )?;
        eprintln!("verdict as {who}: {code} {b}");
        assert_eq!(
            (code, error_reason(&b)),
            (403, "Forbidden".into()),
            "{who}: {b}"
        );
        let out = Command::new("curl")
            .args(["--noproxy", "*", "-sS", "--max-time", "10", "-X", "POST"])
            .arg("--cacert")
            .arg(c.daemon_ca())
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .args(["-H", "Connection: Upgrade", "-H", "Upgrade: podmig-pages"])
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .arg(format!("{}/migrations/real/pages", c.daemon_url(src)))
            .output()?;
        let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        eprintln!("page tunnel as {who}: {code}");
        assert_eq!(code, "403", "{who}");
    }
    // The link probe reads bytes from node daemons only.
    for (who, token, expected) in [
        ("migrator", &sched, 403),
        ("person", &person, 403),
        ("other node", &other_node, 200),
    ] {
        let (code, b) = curl(&c, src, "POST", "/probe", Some(token), Some("0000"))?;
        eprintln!("link probe as {who}: {code} {b}");
        assert_eq!(code, expected, "{who}: {b}");
        if expected == 200 {
            assert!(b.contains("\"bytes\":4"), "{b}");
        }
    }
    // The real move, between the right two daemons, goes through.
    let st = migration_ended(&migs, "real", Duration::from_secs(120)).await?;
    assert_eq!(st.phase, Some(MigrationPhase::Succeeded), "{st:?}");
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let moved = ready(
        &pods,
        st.target_pod.as_deref().unwrap_or_default(),
        Duration::from_secs(30),
    )
    .await?;
    assert_eq!(node_of(&moved), c.nodes[dst].name);
    assert_eq!(
        get_count(&ip(&moved)).await?,
        v.count + 1,
        "the moved Pod went on with its count"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_http_edges_refuse_hostile_requests_at_once_with_json() -> anyhow::Result<()> {
    use podmig_e2e::daemon_api::raw_exchange;
    let c = Cluster::up_temp(1).await?;
    let quick = Duration::from_secs(3);
    // An oversize body announced with Expect: 100-continue: 413 before any 100 Continue
    // (an unauthenticated one gets its 401 just as early).
    let token = c.token_for("kubernetes-admin", &["system:masters"])?;
    let head = |auth: &str| {
        format!(
            "POST /migrate/x HTTP/1.1\r\nHost: node\r\n{auth}Content-Type: application/json\r\nContent-Length: 100000000\r\nExpect: 100-continue\r\n\r\n"
        )
    };
    let (answer, _) = raw_exchange(&c, 0, head("").as_bytes(), quick).await?;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    let (answer, _) = raw_exchange(
        &c,
        0,
        head(&format!("Authorization: Bearer {token}\r\n")).as_bytes(),
        quick,
    )
    .await?;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.contains("\"reason\":\"BodyTooLarge\""), "{answer}");
    // Garbage on the HTTP/1.1 listener: 400 at once. An HTTP/2 preface (ALPN offers
    // http/1.1 alone) is answered at once too: hyper's upgrade-capable connection
    // recognises it and speaks HTTP/2 (its SETTINGS frame, type 4).
    let t = std::time::Instant::now();
    let (answer, _) = raw_exchange(&c, 0, b"hello there\r\n\r\n", quick).await?;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(t.elapsed() < quick, "answered in {:?}", t.elapsed());
    let t = std::time::Instant::now();
    let (answer, closed) = raw_exchange(
        &c,
        0,
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        Duration::from_millis(1500),
    )
    .await?;
    assert!(
        answer.as_bytes().get(3) == Some(&4) || closed,
        "{answer:?} closed={closed}"
    );
    assert!(t.elapsed() < quick, "answered in {:?}", t.elapsed());
    // A request head that never ends is dropped, not kept forever.
    let (_, closed) = raw_exchange(
        &c,
        0,
        b"GET /healthz HTTP/1.1\r\nHost: node\r\nX-Slow: ",
        Duration::from_secs(15),
    )
    .await?;
    assert!(closed, "a never-finished request head is dropped");
    // A malformed query is refused with the JSON error body.
    let (status, body) =
        podmig_e2e::daemon_api::curl(&c, 0, "POST", "/migrate/x?wait=maybe", None, Some("{}"))?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        podmig_e2e::daemon_api::error_reason(&body),
        "BadRequest",
        "{body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_source_with_node_credentials_writes_nothing_on_the_target() -> anyhow::Result<()>
{
    use podmig_e2e::hostile::{HostileSource, cases};
    let (mut c, _ctl) = setup().await?;
    let mut v = start_victim(&c, 16).await?;
    let (src, dst) = (v.node, 1 - v.node);
    // The attacker owns the source node: its daemon is replaced by a server with that
    // node's own certificate, on its address and port.
    c.nodes[src].daemon.stop();
    let marker = format!("podmig-pwned-{}", uuid::Uuid::new_v4().simple());
    let crafted = cases("app", &marker);
    let pki = c.dir.join("pki");
    let name = c.nodes[src].name.clone();
    let hostile = HostileSource::start(
        &c.network.netns(src),
        format!(
            "{}:{}",
            c.network.node_ip(src),
            podmig_api::nodeapi::DEFAULT_API_PORT
        )
        .parse()?,
        &pki.join(format!("{name}.crt")),
        &pki.join(format!("{name}.key")),
        crafted.clone(),
    )
    .await?;
    let migs: Api<Migration> = Api::default_namespaced(c.client.clone());
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    for (i, case) in crafted.iter().enumerate() {
        let m = format!("hostile-{i}");
        c.apply(&format!(
            "apiVersion: podmig.dev/v1alpha1\nkind: Migration\nmetadata: {{name: {m}}}\nspec: {{podName: counter-0, targetNode: {}, strategy: full, timeoutSeconds: 30}}\n",
            c.nodes[dst].name
        ))?;
        let st = migration_ended(&migs, &m, Duration::from_secs(90)).await?;
        let msg = st.message.clone().unwrap_or_default();
        eprintln!("{}: {:?} {:?}: {msg}", case.name, st.phase, st.reason);
        assert_eq!(
            st.phase,
            Some(MigrationPhase::Failed),
            "{}: {st:?}",
            case.name
        );
        assert!(
            msg.contains(case.refused_with),
            "{}: the refusal names the check ({:?}): {msg}\n{}",
            case.name,
            case.refused_with,
            c.nodes[dst].daemon.log()
        );
        // The target Pod goes; nothing it received stays, nothing landed outside.
        until("the target gone", Duration::from_secs(60), async || {
            (pods.list(&Default::default()).await.ok()?.items.len() == 1).then_some(())
        })
        .await?;
        until(
            "no image left on the target",
            Duration::from_secs(30),
            async || {
                podmig_e2e::paths::files_under(&c.nodes[dst].daemon.checkpoint_dir())
                    .is_empty()
                    .then_some(())
            },
        )
        .await?;
        for root in [std::path::PathBuf::from("/"), c.nodes[dst].fs.root.clone()] {
            let planted = root.join("tmp").join(&marker);
            assert!(
                !planted.exists(),
                "{}: {} written",
                case.name,
                planted.display()
            );
        }
        // The victim was never frozen (its own daemon is gone): it counts on.
        let n = get_count(&v.ip).await?;
        assert!(n > v.count, "the victim counts on");
        v.count = n;
    }
    let seen = hostile.seen.lock().map(|s| s.handovers.len()).unwrap_or(0);
    assert_eq!(seen, crafted.len(), "every case was asked for");
    drop(hostile);
    Ok(())
}
