//! `kubectl podmig`: the kubectl plugin (binary `kubectl-podmig` on the PATH). It speaks
//! only to the API server, with the caller's kubeconfig and rights: a move is a Migration
//! the caller creates (RBAC decides who may), a drain is a cordon plus one Migration per
//! movable Pod (the controller's limits queue them), a cancel is an annotation the
//! controller acts on. Errors are printed as kubectl prints them, with a non-zero exit.

use std::{
    collections::BTreeMap,
    io::Write,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Event, Node, Pod},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{EvictParams, ListParams, Patch, PatchParams, PostParams},
};
use podmig_api::{
    ANNOTATION_CANCEL,
    v1alpha1::{Migration, MigrationPhase, MigrationSpec, MigrationStatus, Strategy},
};

/// Errors of the plugin, printed as kubectl prints its own.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The API server refused a call.
    #[error("Error from server ({}): {}", .0.reason, .0.message)]
    Server(Box<kube::core::Status>),
    /// The API server could not be reached or answered nonsense.
    #[error("error: {0}")]
    Client(String),
    /// A request that makes no sense.
    #[error("error: {0}")]
    Usage(String),
    /// A move ended without success.
    #[error("error: {0}")]
    Failed(String),
}

impl From<kube::Error> for PluginError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => PluginError::Server(s),
            other => PluginError::Client(other.to_string()),
        }
    }
}

/// `kubectl podmig` — live migration of Pods.
#[derive(Debug, clap::Parser)]
#[command(
    name = "kubectl podmig",
    version,
    about = "Move running Pods with podmig"
)]
pub struct Cli {
    /// Path to the kubeconfig file (default: $KUBECONFIG, ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// Namespace (default: the kubeconfig context's).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The plugin's commands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Move a Pod (of a MigratingPod) to another node.
    Migrate {
        /// The Pod.
        pod: String,
        /// Target node (default: where the scheduler puts it).
        #[arg(long)]
        to: Option<String>,
        /// auto, full, lazy or lazy-or-full.
        #[arg(long)]
        strategy: Option<String>,
        /// Wait for the outcome, printing the progress.
        #[arg(long)]
        wait: bool,
        /// Give the move up after this many seconds.
        #[arg(long)]
        timeout_seconds: Option<u32>,
    },
    /// Cordon a node and move every Pod of a MigratingPod off it (within the
    /// controller's limits); other Pods stay unless --evict-others.
    Drain {
        /// The node.
        node: String,
        /// Also evict the Pods podmig cannot move (as kubectl drain would).
        #[arg(long)]
        evict_others: bool,
        /// Longest to wait for every move, seconds.
        #[arg(long, default_value_t = 600)]
        timeout_seconds: u64,
    },
    /// List Migrations.
    List {
        /// In every namespace.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// Show a Migration: its phases, figures and Events.
    Describe {
        /// The Migration.
        migration: String,
    },
    /// Give a Migration up: a queued one ends, one under way rolls back.
    Cancel {
        /// The Migration.
        migration: String,
    },
}

/// Runs the command `cli` names, printing to `out`.
pub async fn run(cli: Cli, out: &mut dyn Write) -> Result<(), PluginError> {
    let (client, default_ns) = connect(cli.kubeconfig.as_deref()).await?;
    let ns = cli.namespace.unwrap_or(default_ns);
    match cli.command {
        Command::Migrate {
            pod,
            to,
            strategy,
            wait,
            timeout_seconds,
        } => {
            let strategy = match strategy.as_deref() {
                None => None,
                Some(s) => Some(Strategy::parse(s).ok_or_else(|| {
                    PluginError::Usage(format!(
                        "unknown strategy {s:?}: auto, full, lazy or lazy-or-full"
                    ))
                })?),
            };
            migrate(&client, &ns, &pod, to, strategy, timeout_seconds, wait, out).await
        }
        Command::Drain {
            node,
            evict_others,
            timeout_seconds,
        } => {
            drain(
                &client,
                &node,
                evict_others,
                Duration::from_secs(timeout_seconds),
                out,
            )
            .await
        }
        Command::List { all_namespaces } => {
            let api: Api<Migration> = if all_namespaces {
                Api::all(client)
            } else {
                Api::namespaced(client, &ns)
            };
            let items = api.list(&ListParams::default()).await?.items;
            write_out(out, &table(&items, all_namespaces, Timestamp::now()))
        }
        Command::Describe { migration } => {
            let m = Api::<Migration>::namespaced(client.clone(), &ns)
                .get(&migration)
                .await?;
            let events = Api::<Event>::namespaced(client, &ns)
                .list(&ListParams::default())
                .await?
                .items
                .into_iter()
                .filter(|e| {
                    e.involved_object.kind.as_deref() == Some("Migration")
                        && e.involved_object.name.as_deref() == Some(migration.as_str())
                })
                .collect::<Vec<_>>();
            write_out(out, &describe(&m, &events))
        }
        Command::Cancel { migration } => cancel(&client, &ns, &migration, out).await,
    }
}

fn write_out(out: &mut dyn Write, text: &str) -> Result<(), PluginError> {
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| PluginError::Client(format!("writing the output: {e}")))
}

/// A client from `--kubeconfig` or the environment, and its context's namespace.
async fn connect(kubeconfig: Option<&std::path::Path>) -> Result<(Client, String), PluginError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| PluginError::Client(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| PluginError::Client(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| PluginError::Client(e.to_string()))?,
    };
    let ns = config.default_namespace.clone();
    let client = crate::kubeclient::from_config(config)?;
    Ok((client, ns))
}

fn suffix() -> String {
    uuid::Uuid::new_v4()
        .simple()
        .to_string()
        .chars()
        .take(5)
        .collect()
}

/// The Migration of `pod` the plugin creates (the API's defaults where not given).
fn migration_for(
    pod: &str,
    to: Option<String>,
    strategy: Option<Strategy>,
    timeout_seconds: Option<u32>,
) -> Migration {
    let mut m = Migration::new(
        &format!("{}-{}", pod.chars().take(240).collect::<String>(), suffix()),
        MigrationSpec {
            pod_name: pod.into(),
            target_node: to,
            node_selector: None,
            strategy: strategy.unwrap_or_default(),
            max_downtime_ms: podmig_api::v1alpha1::DEFAULT_MAX_DOWNTIME_MS,
            timeout_seconds: timeout_seconds.unwrap_or(300),
            timeout_seconds_per_gib: None,
            keep_ip: None,
        },
    );
    m.metadata
        .annotations
        .get_or_insert_default()
        .insert("podmig.dev/requested-by".into(), "kubectl-podmig".into());
    m
}

#[allow(clippy::too_many_arguments)]
async fn migrate(
    client: &Client,
    ns: &str,
    pod: &str,
    to: Option<String>,
    strategy: Option<Strategy>,
    timeout_seconds: Option<u32>,
    wait: bool,
    out: &mut dyn Write,
) -> Result<(), PluginError> {
    // The Pod must exist: a typo is told at once, as kubectl tells it.
    Api::<Pod>::namespaced(client.clone(), ns).get(pod).await?;
    let migrations: Api<Migration> = Api::namespaced(client.clone(), ns);
    let created = migrations
        .create(
            &PostParams::default(),
            &migration_for(pod, to, strategy, timeout_seconds),
        )
        .await?;
    let name = created.name_any();
    write_out(out, &format!("migration.podmig.dev/{name} created\n"))?;
    if !wait {
        return Ok(());
    }
    let started = Instant::now();
    let bound = Duration::from_secs(u64::from(created.spec.timeout_seconds) + 3600);
    let mut last = String::new();
    loop {
        let m = migrations.get(&name).await?;
        let st = m.status.clone().unwrap_or_default();
        let line = progress_line(&name, &st, started.elapsed());
        if line != last {
            write_out(out, &format!("{line}\n"))?;
            last = line;
        }
        match st.phase {
            Some(MigrationPhase::Succeeded) if st.report.is_some() => {
                return write_out(out, &format!("{}\n", outcome_line(&name, &st)));
            }
            Some(MigrationPhase::Succeeded) if started.elapsed() > bound => return Ok(()),
            Some(MigrationPhase::Failed) => {
                return Err(PluginError::Failed(format!(
                    "migration {name} failed ({}): {}",
                    st.reason.unwrap_or_default(),
                    st.message.unwrap_or_default()
                )));
            }
            _ if started.elapsed() > bound => {
                return Err(PluginError::Failed(format!(
                    "migration {name} did not end within {bound:?}"
                )));
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

fn phase_name(p: Option<MigrationPhase>) -> String {
    p.map_or("Pending".into(), |p| format!("{p:?}"))
}

/// One progress line of a move: `<name>: <phase> [reason] [queue place] (elapsed)`.
pub fn progress_line(name: &str, st: &MigrationStatus, elapsed: Duration) -> String {
    let mut line = format!("{name}: {}", phase_name(st.phase));
    if let Some(p) = st.queue_position {
        line.push_str(&format!(", queued at place {p}"));
    }
    if let Some(t) = &st.target_node {
        line.push_str(&format!(", to {t}"));
    }
    if let Some(r) = &st.report {
        line.push_str(&format!(
            ", {} moved, frozen {} ms",
            mib(r.bytes),
            r.frozen_ms
        ));
    }
    line.push_str(&format!(" ({:.1}s)", elapsed.as_secs_f64()));
    line
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The last line of a successful move.
pub fn outcome_line(name: &str, st: &MigrationStatus) -> String {
    let r = st.report.clone().unwrap_or_default();
    format!(
        "{name}: Succeeded: {} runs as {} on {}; frozen {} ms, {} moved",
        st.migrating_pod.as_deref().unwrap_or("the Pod"),
        st.target_pod.as_deref().unwrap_or("?"),
        st.target_node.as_deref().unwrap_or("?"),
        r.frozen_ms,
        mib(r.bytes)
    )
}

fn age(
    created: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    now: Timestamp,
) -> String {
    let Some(t) = created else {
        return "<unknown>".into();
    };
    let s = (now - t.0).get_seconds().max(0);
    match s {
        0..120 => format!("{s}s"),
        120..7200 => format!("{}m", s / 60),
        _ => format!("{}h", s / 3600),
    }
}

/// The table `kubectl podmig list` prints.
pub fn table(items: &[Migration], all_namespaces: bool, now: Timestamp) -> String {
    let mut rows = vec![
        [
            "NAMESPACE",
            "NAME",
            "POD",
            "SOURCE",
            "TARGET",
            "PHASE",
            "REASON",
            "QUEUE",
            "FROZEN",
            "MOVED",
            "AGE",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for m in items {
        let st = m.status.clone().unwrap_or_default();
        let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        rows.push(vec![
            m.namespace().unwrap_or_default(),
            m.name_any(),
            m.spec.pod_name.clone(),
            dash(st.source_node.clone()),
            dash(st.target_node.clone().or(m.spec.target_node.clone())),
            phase_name(st.phase),
            dash(st.reason.clone()),
            dash(st.queue_position.map(|p| p.to_string())),
            dash(st.frozen_ms.map(|f| format!("{f}ms"))),
            dash(st.report.as_ref().map(|r| mib(r.bytes))),
            age(m.metadata.creation_timestamp.as_ref(), now),
        ]);
    }
    if !all_namespaces {
        for r in &mut rows {
            r.remove(0);
        }
    }
    format_rows(&rows)
}

/// Columns padded as kubectl pads them (three spaces between).
fn format_rows(rows: &[Vec<String>]) -> String {
    let width = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..width)
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        s.push_str(cells.join("   ").trim_end());
        s.push('\n');
    }
    s
}

/// What `kubectl podmig describe` prints.
pub fn describe(m: &Migration, events: &[Event]) -> String {
    let st = m.status.clone().unwrap_or_default();
    let mut s = String::new();
    let mut field = |k: &str, v: String| s.push_str(&format!("{:<16}{v}\n", format!("{k}:")));
    field("Name", m.name_any());
    field("Namespace", m.namespace().unwrap_or_default());
    field("Pod", m.spec.pod_name.clone());
    field("Strategy", m.spec.strategy.as_str().into());
    field("Timeout", format!("{}s", m.spec.timeout_seconds));
    field("Phase", phase_name(st.phase));
    if let Some(r) = &st.reason {
        field("Reason", r.clone());
    }
    if let Some(p) = st.queue_position {
        field("Queue place", p.to_string());
    }
    if let Some(msg) = &st.message {
        field("Message", msg.clone());
    }
    field(
        "Source",
        st.source_node.clone().unwrap_or_else(|| "-".into()),
    );
    field(
        "Target",
        format!(
            "{} on {}",
            st.target_pod.clone().unwrap_or_else(|| "-".into()),
            st.target_node.clone().unwrap_or_else(|| "-".into())
        ),
    );
    if let Some(r) = &st.report {
        field(
            "Figures",
            format!(
                "frozen {} ms; preflight {} ms (before the freeze), checkpoint {} ms, transfer {} ms, restore {} ms; {} moved ({} streamed)",
                r.frozen_ms,
                r.preflight_ms,
                r.checkpoint_ms,
                r.transfer_ms,
                r.restore_ms,
                mib(r.bytes),
                mib(r.streamed_bytes)
            ),
        );
    }
    s.push_str("Phases:\n");
    for t in &st.transitions {
        s.push_str(&format!("  {:<14}{}\n", format!("{:?}", t.phase), t.at.0));
    }
    s.push_str("Events:\n");
    if events.is_empty() {
        s.push_str("  <none>\n");
    }
    for e in events {
        s.push_str(&format!(
            "  {:<8}{:<22}{}\n",
            e.type_.clone().unwrap_or_default(),
            e.reason.clone().unwrap_or_default(),
            e.message.clone().unwrap_or_default()
        ));
    }
    s
}

async fn cancel(
    client: &Client,
    ns: &str,
    name: &str,
    out: &mut dyn Write,
) -> Result<(), PluginError> {
    let api: Api<Migration> = Api::namespaced(client.clone(), ns);
    let m = api.get(name).await?;
    if let Some(p) = m
        .status
        .as_ref()
        .and_then(|s| s.phase)
        .filter(|p| p.is_terminal())
    {
        return Err(PluginError::Usage(format!(
            "migration {name} has ended ({p:?}): nothing to cancel"
        )));
    }
    let who = std::env::var("USER").unwrap_or_else(|_| "kubectl-podmig".into());
    let patch = serde_json::json!({"metadata": {"annotations": {ANNOTATION_CANCEL: who}}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await?;
    write_out(
        out,
        &format!("migration.podmig.dev/{name} cancelled (a move under way rolls back)\n"),
    )
}

/// What a drain does with each Pod of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainStep {
    /// Moved by this Migration.
    Move,
    /// Evicted (it cannot move; `--evict-others`).
    Evict,
    /// Left alone, with why.
    Skip(String),
}

/// Decides what a drain does with `pod`.
pub fn drain_step(pod: &Pod, evict_others: bool) -> DrainStep {
    let controller = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true));
    if pod.metadata.deletion_timestamp.is_some() {
        return DrainStep::Skip("being deleted".into());
    }
    match controller {
        Some(o) if o.kind == "DaemonSet" => DrainStep::Skip("DaemonSet Pod".into()),
        Some(o) if o.kind == "MigratingPod" && o.api_version.starts_with("podmig.dev/") => {
            if crate::controller::pod::is_ready(pod) {
                DrainStep::Move
            } else {
                DrainStep::Skip("not Ready".into())
            }
        }
        _ if evict_others => DrainStep::Evict,
        Some(o) => DrainStep::Skip(format!(
            "owned by a {}: not movable (--evict-others evicts it)",
            o.kind
        )),
        None => DrainStep::Skip("not of a MigratingPod (--evict-others evicts it)".into()),
    }
}

async fn drain(
    client: &Client,
    node: &str,
    evict_others: bool,
    within: Duration,
    out: &mut dyn Write,
) -> Result<(), PluginError> {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes.get(node).await?;
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"unschedulable": true}})),
        )
        .await?;
    write_out(out, &format!("node/{node} cordoned\n"))?;
    let pods: Vec<Pod> = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
        .collect();
    // Per Pod: (namespace, name) → what happened so far.
    let mut rows: BTreeMap<(String, String), (String, Option<String>)> = BTreeMap::new();
    for p in &pods {
        let ns = p.namespace().unwrap_or_default();
        let name = p.name_any();
        let outcome = match drain_step(p, evict_others) {
            DrainStep::Move => {
                let m = Api::<Migration>::namespaced(client.clone(), &ns)
                    .create(
                        &PostParams::default(),
                        &migration_for(&name, None, None, None),
                    )
                    .await?;
                ("moving".to_owned(), Some(m.name_any()))
            }
            DrainStep::Evict => {
                match Api::<Pod>::namespaced(client.clone(), &ns)
                    .evict(&name, &EvictParams::default())
                    .await
                {
                    Ok(_) => ("evicted".to_owned(), None),
                    Err(kube::Error::Api(s)) => (format!("not evicted: {}", s.message), None),
                    Err(e) => return Err(e.into()),
                }
            }
            DrainStep::Skip(why) => (format!("left: {why}"), None),
        };
        rows.insert((ns, name), outcome);
    }
    let started = Instant::now();
    let failed = loop {
        let (mut pending, mut failed) = (0, 0);
        for ((ns, _), (state, mig)) in rows.iter_mut() {
            let Some(mig) = mig else { continue };
            let m = Api::<Migration>::namespaced(client.clone(), ns)
                .get(mig)
                .await?;
            let st = m.status.unwrap_or_default();
            *state = match st.phase {
                Some(MigrationPhase::Succeeded) => format!(
                    "moved to {} on {}, frozen {} ms",
                    st.target_pod.unwrap_or_default(),
                    st.target_node.unwrap_or_default(),
                    st.frozen_ms.map_or("?".into(), |f| f.to_string())
                ),
                Some(MigrationPhase::Failed) => {
                    failed += 1;
                    format!(
                        "failed ({}): {}",
                        st.reason.unwrap_or_default(),
                        st.message.unwrap_or_default()
                    )
                }
                p => {
                    pending += 1;
                    match st.queue_position {
                        Some(q) => format!("queued at place {q}"),
                        None => phase_name(p),
                    }
                }
            };
        }
        if pending == 0 || started.elapsed() > within {
            break failed;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let mut table = vec![
        ["NAMESPACE", "POD", "MIGRATION", "RESULT"]
            .map(str::to_owned)
            .to_vec(),
    ];
    for ((ns, name), (state, mig)) in &rows {
        table.push(vec![
            ns.clone(),
            name.clone(),
            mig.clone().unwrap_or_else(|| "-".into()),
            state.clone(),
        ]);
    }
    write_out(out, &format_rows(&table))?;
    let unfinished = rows
        .values()
        .filter(|(s, m)| m.is_some() && !s.starts_with("moved") && !s.starts_with("failed"))
        .count();
    if failed > 0 || unfinished > 0 {
        return Err(PluginError::Failed(format!(
            "node/{node} not drained: {failed} move(s) failed, {unfinished} not finished"
        )));
    }
    write_out(out, &format!("node/{node} drained\n"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(v: serde_json::Value) -> MigrationStatus {
        serde_json::from_value(v).expect("status")
    }

    #[test]
    fn the_progress_line_says_phase_queue_place_target_and_figures() {
        let queued = status(json!({"phase": "Pending", "reason": "Queued", "queuePosition": 2}));
        assert_eq!(
            progress_line("web-0-ab12c", &queued, Duration::from_millis(1500)),
            "web-0-ab12c: Pending, queued at place 2 (1.5s)"
        );
        let done = status(
            json!({"phase": "Succeeded", "targetNode": "n1", "targetPod": "web-1",
            "migratingPod": "web", "report": {"frozenMs": 304, "bytes": 10485760}}),
        );
        assert_eq!(
            progress_line("m", &done, Duration::from_secs(3)),
            "m: Succeeded, to n1, 10.0 MiB moved, frozen 304 ms (3.0s)"
        );
        assert_eq!(
            outcome_line("m", &done),
            "m: Succeeded: web runs as web-1 on n1; frozen 304 ms, 10.0 MiB moved"
        );
    }

    #[test]
    fn the_list_shows_the_queue_in_kubectls_columns() {
        let m: Migration = serde_json::from_value(json!({"metadata": {"name": "web-0-x", "namespace": "default",
            "creationTimestamp": "2026-12-03T00:00:00Z"}, "spec": {"podName": "web-0"},
            "status": {"phase": "Pending", "reason": "Queued", "queuePosition": 1, "sourceNode": "n0"}}))
        .expect("migration");
        let now: Timestamp = "2026-12-03T00:00:30Z".parse().expect("t");
        let t = table(&[m], false, now);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "NAME      POD     SOURCE   TARGET   PHASE     REASON   QUEUE   FROZEN   MOVED   AGE"
        );
        assert_eq!(
            lines[1],
            "web-0-x   web-0   n0       -        Pending   Queued   1       -        -       30s"
        );
    }

    #[test]
    fn a_drain_moves_migratingpods_and_leaves_or_evicts_the_rest() {
        let pod = |kind: Option<&str>, ready: bool| -> Pod {
            let owners = kind.map(|k| {
                json!([{"apiVersion": if k == "MigratingPod" { "podmig.dev/v1alpha1" } else { "apps/v1" },
                    "kind": k, "name": "o", "uid": "u", "controller": true}])
            });
            serde_json::from_value(json!({"metadata": {"name": "p", "ownerReferences": owners},
                "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
            .expect("pod")
        };
        assert_eq!(
            drain_step(&pod(Some("MigratingPod"), true), false),
            DrainStep::Move
        );
        assert!(matches!(
            drain_step(&pod(Some("MigratingPod"), false), true),
            DrainStep::Skip(_)
        ));
        assert!(
            matches!(drain_step(&pod(Some("ReplicaSet"), true), false), DrainStep::Skip(w) if w.contains("ReplicaSet"))
        );
        assert_eq!(
            drain_step(&pod(Some("ReplicaSet"), true), true),
            DrainStep::Evict
        );
        assert_eq!(drain_step(&pod(None, true), true), DrainStep::Evict);
        assert!(matches!(
            drain_step(&pod(Some("DaemonSet"), true), true),
            DrainStep::Skip(_)
        ));
    }
}
