//! The compatibility suite: real applications (their images built by
//! `scripts/build-images` from Debian's packages) moved on the local cluster through the
//! public API — a `Migration` to the Pod's own node, then one to the other node — each
//! checked from outside for the state that must survive. Its rows become the README's
//! compatibility table, written from this output and never by hand.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, ResourceExt};
use podmig_api::v1alpha1::MigrationPhase;

use crate::{
    cluster::Cluster,
    compat_load::{self, Seen, psql},
    wait::{node_of, pod_ip, until},
};

/// The README markers the table is written between.
pub const TABLE_START: &str = "<!-- compat-table:start -->";
/// End marker.
pub const TABLE_END: &str = "<!-- compat-table:end -->";

/// One move of one application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The application.
    pub app: String,
    /// Its version, as it reports it.
    pub version: String,
    /// `same node` or `across nodes`.
    pub mv: String,
    /// What was checked after the move.
    pub checked: String,
    /// `ok`, or `failing: <reason>`.
    pub outcome: String,
    /// The Pod's frozen time, ms (0 when the move failed).
    pub frozen_ms: u64,
    /// Bytes of file-system state carried (writable layer + volumes).
    pub filesystem_bytes: u64,
    /// Time spent capturing it, ms.
    pub filesystem_ms: u64,
    /// The client that worked through the move.
    pub client: String,
    /// Errors that client met during the move.
    pub client_errors: u64,
    /// The data check after the move (`passed: …` or `failed: …`).
    pub data: String,
    /// Whether the client's connections lasted (`yes`, `no`, `—` for none).
    pub kept: String,
}

impl Row {
    /// The suite's output line for this move.
    pub fn line(&self) -> String {
        format!(
            "podmig-compat app={} version={} move={:?} outcome={:?} frozen_ms={} client={:?} client_errors={} data={:?} kept={} filesystem_bytes={} filesystem_ms={} checked={:?}",
            self.app,
            self.version,
            self.mv,
            self.outcome,
            self.frozen_ms,
            self.client,
            self.client_errors,
            self.data,
            self.kept,
            self.filesystem_bytes,
            self.filesystem_ms,
            self.checked
        )
    }
}

/// An application under test.
struct App {
    name: &'static str,
    image: &'static str,
    port: u16,
    /// Arguments after the image's entrypoint.
    args: &'static [&'static str],
    /// What is checked after each move.
    checks: &'static str,
}

const APPS: &[App] = &[
    App {
        name: "postgresql",
        image: "postgres",
        port: 5432,
        args: &[],
        checks: "1000 rows kept, postmaster start time unchanged, writes accepted after",
    },
    App {
        name: "mariadb",
        image: "mariadb",
        port: 3306,
        // Debian's MariaDB uses io_uring, which CRIU cannot dump (see `preflight_refusal`).
        args: &["--innodb-use-native-aio=0"],
        checks: "1000 rows kept, uptime went on, writes accepted after",
    },
    App {
        name: "redis",
        image: "redis",
        port: 6379,
        args: &[],
        checks: "100 keys served, same run id, uptime went on",
    },
    App {
        name: "memcached",
        image: "memcached",
        port: 11211,
        args: &[],
        checks: "100 keys served, same pid, uptime went on",
    },
    App {
        name: "app+sidecar",
        image: "testapp",
        port: 8080,
        args: &[],
        checks: "both counts went on, the sidecar never lost the app's Unix socket in their shared emptyDir",
    },
    App {
        name: "nginx",
        image: "nginx",
        port: 80,
        args: &[],
        checks: "same content, same worker PIDs",
    },
];

/// Kubernetes name of an app's MigratingPod.
fn kube_name(app: &App) -> String {
    app.name.replace('+', "-")
}

fn mpod_yaml(app: &App) -> String {
    if app.image == "testapp" {
        return format!(
            r#"apiVersion: podmig.dev/v1alpha1
kind: MigratingPod
metadata: {{name: {n}}}
spec:
  migrationTimeoutSeconds: 90
  template:
    metadata: {{labels: {{app: {n}}}}}
    spec:
      terminationGracePeriodSeconds: 5
      volumes: [{{name: shared, emptyDir: {{}}}}]
      containers:
      - name: app
        image: podmig.local/testapp:latest
        args: ['--mem-mib', '32', '--unix-listen', '/shared/app.sock', '--hold-open', '/shared/journal']
        volumeMounts: [{{name: shared, mountPath: /shared}}]
      - name: sidecar
        image: podmig.local/testapp:latest
        args: ['--mem-mib', '8', '--port', '8081', '--unix-peer', '/shared/app.sock']
        volumeMounts: [{{name: shared, mountPath: /shared}}]
"#,
            n = kube_name(app)
        );
    }
    format!(
        "apiVersion: podmig.dev/v1alpha1\nkind: MigratingPod\nmetadata: {{name: {n}}}\nspec:\n  migrationTimeoutSeconds: 90\n  template:\n    metadata: {{labels: {{app: {n}}}}}\n    spec:\n      terminationGracePeriodSeconds: 5\n      containers:\n      - name: app\n        image: 'podmig.local/{i}:latest'\n        args: {a:?}\n",
        n = app.name,
        i = app.image,
        a = app.args,
    )
}

/// State recorded before a move, checked after it.
enum Before {
    Postgres {
        started: String,
        rows: i64,
    },
    Memcached {
        pid: String,
        uptime: u64,
    },
    Redis {
        run_id: String,
        uptime: u64,
    },
    Mariadb {
        uptime: u64,
    },
    Nginx {
        body: String,
        workers: BTreeSet<String>,
    },
    Duo {
        count: u64,
        sidecar: u64,
        failed: u64,
        last: u64,
    },
}

// ---- clients -------------------------------------------------------------------------

fn connect(ip: &str, port: u16) -> anyhow::Result<TcpStream> {
    let addr = format!("{ip}:{port}").parse()?;
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    Ok(s)
}

/// Sends memcached text-protocol commands; returns the lines up to `until`'s first match.
fn memcached(ip: &str, cmd: &str, end: &[&str]) -> anyhow::Result<Vec<String>> {
    let mut s = connect(ip, 11211)?;
    s.write_all(cmd.as_bytes())?;
    let mut r = BufReader::new(s);
    let mut lines = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l)? == 0 {
            bail!("memcached closed the connection after {lines:?}");
        }
        let l = l.trim_end().to_owned();
        let done = end.iter().any(|e| l.starts_with(e));
        lines.push(l);
        if done {
            return Ok(lines);
        }
    }
}

fn memcached_stat(ip: &str, key: &str) -> anyhow::Result<String> {
    memcached(ip, "stats\r\n", &["END"])?
        .iter()
        .find_map(|l| l.strip_prefix(&format!("STAT {key} ")).map(str::to_owned))
        .with_context(|| format!("no stat {key}"))
}

/// A field of Redis's `INFO server` (a bulk reply: `$<len>`, then the text).
fn redis_info(ip: &str, key: &str) -> anyhow::Result<String> {
    let mut s = connect(ip, 6379)?;
    s.write_all(b"INFO server\r\nQUIT\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no {key} in Redis's INFO"))
}

/// Sends Redis inline commands; returns the reply lines.
fn redis(ip: &str, cmds: &str) -> anyhow::Result<Vec<String>> {
    let mut s = connect(ip, 6379)?;
    s.write_all(format!("{cmds}QUIT\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text.lines().map(str::to_owned).collect())
}

/// MariaDB's `Uptime` status, seconds.
fn mariadb_uptime(ip: &str) -> anyhow::Result<u64> {
    let out = compat_load::mariadb(ip, "SHOW GLOBAL STATUS LIKE 'Uptime'")?;
    out.split_whitespace()
        .nth(1)
        .context("no Uptime")?
        .parse()
        .context("Uptime")
}

/// `GET path` over HTTP/1.0: (headers, body).
fn http_get(ip: &str, port: u16, path: &str) -> anyhow::Result<(String, String)> {
    let mut s = connect(ip, port)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: app\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok((head.to_owned(), body.to_owned()))
}

// ---- per-application state -----------------------------------------------------------

/// Waits for the app to serve, records its version and the state a move must keep.
async fn prepare(app: &App, ip: &str) -> anyhow::Result<(String, Before)> {
    let ip = ip.to_owned();
    until(
        &format!("{} answering", app.name),
        Duration::from_secs(60),
        async || connect(&ip, app.port).ok().map(|_| ()),
    )
    .await?;
    match app.image {
        "postgres" => {
            let version = until("postgres ready", Duration::from_secs(60), async || {
                psql(&ip, "SHOW server_version").ok()
            })
            .await?;
            psql(
                &ip,
                "CREATE TABLE moved (id serial PRIMARY KEY, note text); \
                 INSERT INTO moved (note) SELECT 'row ' || g FROM generate_series(1, 1000) g",
            )?;
            compat_load::pgbench_init(&ip)?;
            let started = psql(&ip, "SELECT pg_postmaster_start_time()")?;
            let rows = psql(&ip, "SELECT count(*) FROM moved")?.parse()?;
            Ok((version, Before::Postgres { started, rows }))
        }
        "testapp" => {
            use crate::testapp::{get_count_at, peer_stats};
            let count = get_count_at(&ip, 8080).await?;
            let sidecar = until("sidecar", Duration::from_secs(30), async || {
                get_count_at(&ip, 8081).await.ok()
            })
            .await?;
            let (_, failed, last) =
                until("sidecar reaches app", Duration::from_secs(30), async || {
                    peer_stats(&ip, 8081)
                        .await
                        .ok()
                        .filter(|(ok, _, _)| *ok >= 5)
                })
                .await?;
            Ok((
                "podmig testapp".into(),
                Before::Duo {
                    count,
                    sidecar,
                    failed,
                    last,
                },
            ))
        }
        "mariadb" => {
            let version = until("mariadb ready", Duration::from_secs(60), async || {
                compat_load::mariadb(&ip, "SELECT VERSION()").ok()
            })
            .await?;
            compat_load::mariadb(
                &ip,
                "CREATE DATABASE moved; USE moved; CREATE TABLE t (id INT PRIMARY KEY, note TEXT); \
                 INSERT INTO t SELECT seq, CONCAT('row ', seq) FROM seq_1_to_1000",
            )?;
            let uptime = mariadb_uptime(&ip)?;
            Ok((version, Before::Mariadb { uptime }))
        }
        "redis" => {
            let mut cmds = String::new();
            for k in 0..100 {
                cmds.push_str(&format!("SET key{k} v{k}\r\n"));
            }
            let replies = redis(&ip, &cmds)?;
            anyhow::ensure!(
                // One per SET, one for the QUIT.
                replies.iter().filter(|l| *l == "+OK").count() == 101,
                "Redis did not store the keys: {replies:?}"
            );
            let version = redis_info(&ip, "redis_version")?;
            let run_id = redis_info(&ip, "run_id")?;
            let uptime = redis_info(&ip, "uptime_in_seconds")?.parse()?;
            Ok((version, Before::Redis { run_id, uptime }))
        }
        "memcached" => {
            let mut cmds = String::new();
            for k in 0..100 {
                cmds.push_str(&format!(
                    "set key{k} 0 0 {} noreply\r\n",
                    format!("v{k}").len()
                ));
                cmds.push_str(&format!("v{k}\r\n"));
            }
            cmds.push_str("version\r\n");
            let version = memcached(&ip, &cmds, &["VERSION"])?
                .last()
                .and_then(|l| l.strip_prefix("VERSION ").map(str::to_owned))
                .context("no version")?;
            let pid = memcached_stat(&ip, "pid")?;
            let uptime = memcached_stat(&ip, "uptime")?.parse()?;
            Ok((version, Before::Memcached { pid, uptime }))
        }
        _ => {
            let (head, body) = http_get(&ip, 80, "/")?;
            let version = head
                .lines()
                .find_map(|l| l.strip_prefix("Server: nginx/"))
                .unwrap_or("?")
                .to_owned();
            let mut workers = BTreeSet::new();
            for _ in 0..20 {
                workers.insert(http_get(&ip, 80, "/pid")?.1.trim().to_owned());
            }
            Ok((version, Before::Nginx { body, workers }))
        }
    }
}

/// Checks the moved app against what it held before (and records the state the next
/// move must keep).
async fn verify(ip: &str, before: &mut Before) -> anyhow::Result<()> {
    match before {
        Before::Duo {
            count,
            sidecar,
            failed,
            last,
        } => {
            use crate::testapp::{get_count_at, peer_stats};
            let now = get_count_at(ip, 8080).await?;
            anyhow::ensure!(
                now == *count + 1,
                "app count {now} after {count}: restarted"
            );
            let side = get_count_at(ip, 8081).await?;
            anyhow::ensure!(side == *sidecar + 1, "sidecar count {side} after {sidecar}");
            let (_, f, l) = peer_stats(ip, 8081).await?;
            anyhow::ensure!(
                f == *failed,
                "the sidecar lost the app {} times during the move",
                f - *failed
            );
            anyhow::ensure!(
                l > *last,
                "the app's sequence did not go on: {l} after {last}"
            );
            (*count, *sidecar, *last) = (now, side, l);
            Ok(())
        }
        Before::Postgres { started, rows } => {
            let (started, rows) = (&*started, &*rows);
            let now: i64 = psql(ip, "SELECT count(*) FROM moved")?.parse()?;
            anyhow::ensure!(now == *rows, "{now} rows after the move, {rows} before");
            let start = psql(ip, "SELECT pg_postmaster_start_time()")?;
            anyhow::ensure!(
                start == *started,
                "the postmaster restarted: started {start}, was {started}"
            );
            psql(ip, "INSERT INTO moved (note) VALUES ('after the move')")?;
            psql(ip, "DELETE FROM moved WHERE note = 'after the move'")?;
            Ok(())
        }
        Before::Memcached { pid, uptime } => {
            let (pid, uptime) = (&*pid, &*uptime);
            let mut cmd = String::from("get");
            for k in 0..100 {
                cmd.push_str(&format!(" key{k}"));
            }
            cmd.push_str("\r\n");
            let lines = memcached(ip, &cmd, &["END"])?;
            for k in 0..100 {
                let at = lines
                    .iter()
                    .position(|l| l.starts_with(&format!("VALUE key{k} ")))
                    .with_context(|| format!("key{k} lost"))?;
                anyhow::ensure!(
                    lines.get(at + 1) == Some(&format!("v{k}")),
                    "key{k} changed"
                );
            }
            let now_pid = memcached_stat(ip, "pid")?;
            anyhow::ensure!(now_pid == *pid, "pid {now_pid}, was {pid}");
            let now_up: u64 = memcached_stat(ip, "uptime")?.parse()?;
            anyhow::ensure!(now_up >= *uptime, "uptime {now_up} < {uptime}: restarted");
            Ok(())
        }
        Before::Redis { run_id, uptime } => {
            let mut cmds = String::new();
            for k in 0..100 {
                cmds.push_str(&format!("GET key{k}\r\n"));
            }
            let replies = redis(ip, &cmds)?;
            for k in 0..100 {
                anyhow::ensure!(
                    replies.get(k * 2 + 1) == Some(&format!("v{k}")),
                    "key{k} lost or changed"
                );
            }
            let now_id = redis_info(ip, "run_id")?;
            anyhow::ensure!(
                now_id == *run_id,
                "run id {now_id}, was {run_id}: restarted"
            );
            let now_up: u64 = redis_info(ip, "uptime_in_seconds")?.parse()?;
            anyhow::ensure!(now_up >= *uptime, "uptime {now_up} < {uptime}: restarted");
            Ok(())
        }
        Before::Mariadb { uptime } => {
            let rows: u64 = compat_load::mariadb(ip, "SELECT count(*) FROM moved.t")?.parse()?;
            anyhow::ensure!(rows == 1000, "{rows} rows after the move, 1000 before");
            let now_up = mariadb_uptime(ip)?;
            anyhow::ensure!(now_up >= *uptime, "uptime {now_up} < {uptime}: restarted");
            compat_load::mariadb(ip, "INSERT INTO moved.t VALUES (1001, 'after the move')")?;
            compat_load::mariadb(ip, "DELETE FROM moved.t WHERE id = 1001")?;
            Ok(())
        }
        Before::Nginx { body, workers } => {
            let (body, workers) = (&*body, &*workers);
            let (_, now) = http_get(ip, 80, "/")?;
            anyhow::ensure!(now == *body, "content changed: {now:?}");
            for _ in 0..20 {
                let pid = http_get(ip, 80, "/pid")?.1.trim().to_owned();
                anyhow::ensure!(
                    workers.contains(&pid),
                    "worker pid {pid} not among {workers:?}: workers restarted"
                );
            }
            Ok(())
        }
    }
}

// ---- moves ---------------------------------------------------------------------------

/// The gist of a failed move's message: CRIU's first error that matters (not the warning-like
/// `RLIMIT_NOFILE for self` every run logs where root lacks `CAP_SYS_RESOURCE`) and podmig's
/// hint, if any.
pub fn short_reason(message: &str) -> String {
    let criu = message
        .lines()
        .flat_map(|l| l.split("\\n"))
        .filter(|l| !l.contains("RLIMIT_NOFILE for self"))
        .find_map(|l| l.split_once("Error (criu/").map(|(_, e)| e.to_owned()))
        .map(|e| {
            format!(
                "CRIU: {}",
                e.split_once("): ").map_or(e.as_str(), |(_, m)| m)
            )
        });
    let hint = message
        .split_once("hint: ")
        .map(|(_, h)| h.lines().next().unwrap_or_default().trim_end_matches('"'));
    match (criu, hint) {
        (Some(c), Some(h)) => format!("{c} — {h}"),
        (Some(c), None) => c,
        (None, _) => message.lines().next().unwrap_or_default().to_owned(),
    }
}

/// Starts `app`'s MigratingPod and waits for its first Pod to serve: the Pod, the app's
/// version and the state its moves must keep.
async fn set_up(c: &Cluster, app: &App) -> anyhow::Result<(Pod, String, Before)> {
    c.apply(&mpod_yaml(app))?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let pod = crate::wait::ready_pod(
        &pods,
        &format!("{}-0", kube_name(app)),
        Duration::from_secs(90),
    )
    .await?;
    let (version, before) = prepare(app, &pod_ip(&pod)).await?;
    Ok((pod, version, before))
}

/// The client `app` keeps working during a move of the Pod at `ip`; `None` for the
/// app+sidecar pair, whose client is its own sidecar (checked by [`verify`]).
fn start_client(app: &App, ip: &str) -> Option<compat_load::Running> {
    match app.image {
        "postgres" => Some(compat_load::pgbench(ip, 8)),
        "memcached" => Some(compat_load::kv_writer(compat_load::Kv::Memcached, ip)),
        "redis" => Some(compat_load::kv_writer(compat_load::Kv::Redis, ip)),
        "mariadb" => Some(compat_load::mariadb_writer(ip)),
        "nginx" => Some(compat_load::download(ip)),
        _ => None,
    }
}

/// A node of the cluster other than `here`.
fn other_node(c: &Cluster, here: &str) -> Option<String> {
    c.nodes.iter().map(|n| n.name.clone()).find(|n| n != here)
}

/// How long a client works before the move starts.
const CLIENT_LEAD: Duration = Duration::from_millis(1500);

/// Moves `app`'s Pod `pod` to node `to` with Migration `name` (`mv`: "same node" or
/// "across nodes"; across nodes its client works through the move) and checks it after:
/// the table row, and the moved Pod when the move succeeded and every check passed.
#[allow(clippy::too_many_arguments)]
async fn move_once(
    c: &Cluster,
    app: &App,
    pod: &Pod,
    before: &mut Before,
    version: &str,
    mv: &str,
    to: &str,
    name: &str,
    spec: &str,
) -> anyhow::Result<(Row, Option<Pod>)> {
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    // Across nodes the Pod keeps its address and its clients their connections; a
    // same-node move gives it a new address (two Pods of one node cannot share one).
    let client = (mv == "across nodes")
        .then(|| start_client(app, &pod_ip(pod)))
        .flatten();
    if client.is_some() {
        tokio::time::sleep(CLIENT_LEAD).await;
    }
    let mut st = c.migrate_with(name, &pod.name_any(), to, 90, spec).await?;
    if st.phase == Some(MigrationPhase::Succeeded) && st.report.is_none() {
        // The move's figures are recorded just after its phase: wait for them, or the row
        // would say 0 ms frozen for a move that froze.
        let migs: Api<podmig_api::v1alpha1::Migration> = Api::default_namespaced(c.client.clone());
        st = crate::wait::migration_report(&migs, name, Duration::from_secs(30)).await?;
    }
    let seen = match client {
        Some(r) => Some(tokio::task::spawn_blocking(move || r.finish()).await??),
        None => None,
    };
    let report = st.report.clone().unwrap_or_default();
    let mut row = Row {
        app: app.name.into(),
        version: version.to_owned(),
        mv: mv.into(),
        checked: app.checks.into(),
        outcome: "ok".into(),
        frozen_ms: report.frozen_ms,
        filesystem_bytes: report.filesystem_bytes,
        filesystem_ms: report.filesystem_ms,
        client: if app.image == "testapp" {
            "its sidecar, over a Unix socket".into()
        } else {
            "—".into()
        },
        client_errors: 0,
        data: "passed: the checks after the move".into(),
        kept: "—".into(),
    };
    if let Some(seen) = &seen {
        record_client(&mut row, seen);
    }
    if st.phase != Some(MigrationPhase::Succeeded) {
        let message = st
            .message
            .clone()
            .unwrap_or_else(|| format!("{:?}", st.phase));
        row.outcome = format!("failing: {}", short_reason(&message));
        row.frozen_ms = 0;
        return Ok((row, None));
    }
    let next = st.target_pod.clone().context("no target pod")?;
    let moved = crate::wait::ready_pod(&pods, &next, Duration::from_secs(30)).await?;
    let checked = verify(&pod_ip(&moved), before).await;
    if let (Err(e), None) = (&checked, &seen) {
        row.client_errors = 1;
        row.data = format!("failed: {e}");
    }
    let failed = match (checked, seen.map(|s| s.data)) {
        (Err(e), _) => Some(format!("failing: {e}")),
        (Ok(()), Some(Err(lost))) => Some(format!("failing: {lost}")),
        _ => None,
    };
    Ok(match failed {
        Some(outcome) => {
            row.outcome = outcome;
            (row, None)
        }
        None => (row, Some(moved)),
    })
}

/// Moves application `name` (one of the suite's) across nodes `moves` times in a row, back
/// and forth, its client working through each move and its data checked after each; one
/// row per move, stopping at the first that did not pass. The moves take turns: `full`,
/// `lazy`, then `auto` with a 1 ms budget (it chooses lazy), as users' moves would.
pub async fn repeat_across(c: &Cluster, name: &str, moves: usize) -> anyhow::Result<Vec<Row>> {
    let app = APPS
        .iter()
        .find(|a| a.name == name)
        .with_context(|| format!("no application {name} in the suite"))?;
    if app.image != "testapp" {
        for n in &c.nodes {
            tokio::task::block_in_place(|| n.containerd.import(app.image))?;
        }
    }
    let (pod, version, before) = set_up(c, app).await?;
    let steps: Vec<Step> = (0..moves)
        .map(|i| Step {
            mv: "across nodes",
            name: format!("{}-r{}", kube_name(app), i + 1),
            spec: [
                "strategy: full",
                "strategy: lazy",
                "strategy: auto, maxDowntimeMs: 1",
            ][i % 3],
        })
        .collect();
    move_in_turn(c, app, pod, before, &version, &steps).await
}

/// One move of [`move_in_turn`]: "same node" or "across nodes" (from wherever the Pod is
/// then), the Migration's name and the rest of its spec.
struct Step {
    mv: &'static str,
    name: String,
    spec: &'static str,
}

/// Moves `app`'s Pod `pod` through `steps` in turn with [`move_once`], stopping at the
/// first that did not pass; deletes the app after. One row per move made.
async fn move_in_turn(
    c: &Cluster,
    app: &App,
    mut pod: Pod,
    mut before: Before,
    version: &str,
    steps: &[Step],
) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for step in steps {
        let here = node_of(&pod);
        let to = if step.mv == "same node" {
            here
        } else {
            other_node(c, &here).unwrap_or(here)
        };
        let (row, moved) = move_once(
            c,
            app,
            &pod,
            &mut before,
            version,
            step.mv,
            &to,
            &step.name,
            step.spec,
        )
        .await?;
        println!("podmig-move {} ({}): {}", step.name, step.spec, row.line());
        rows.push(row);
        match moved {
            Some(p) => pod = p,
            None => break,
        }
    }
    c.kubectl(&["delete", "migratingpod", &kube_name(app), "--wait=false"])?;
    Ok(rows)
}

/// Runs one application through a same-node and a cross-node move, its client working
/// through each.
async fn run_app(c: &Cluster, app: &App) -> anyhow::Result<Vec<Row>> {
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let (pod, version, before) = match set_up(c, app).await {
        Ok(ready) => ready,
        Err(e) => {
            // Once more from a fresh Pod: this is about the test's environment, not a move
            // (none happened yet); what went wrong stays in the output.
            let logs = c.kubectl(&["logs", "--tail", "20", &format!("{}-0", kube_name(app))]);
            println!(
                "{} failed to set up, trying once more: {e:#}; its log: {logs:?}",
                app.name
            );
            c.kubectl(&["delete", "migratingpod", &kube_name(app), "--wait=false"])?;
            let mpods: Api<podmig_api::v1alpha1::MigratingPod> =
                Api::default_namespaced(c.client.clone());
            let labels = format!("app={}", kube_name(app));
            until(
                "it and its Pods gone",
                Duration::from_secs(60),
                async || {
                    let left = pods
                        .list(&kube::api::ListParams::default().labels(&labels))
                        .await
                        .ok()?;
                    let mpod = mpods.get_opt(&kube_name(app)).await.ok()?;
                    (left.items.is_empty() && mpod.is_none()).then_some(())
                },
            )
            .await?;
            set_up(c, app).await?
        }
    };
    let steps = ["same node", "across nodes"]
        .into_iter()
        .enumerate()
        .map(|(i, mv)| Step {
            mv,
            name: format!("{}-{}", kube_name(app), i + 1),
            spec: "",
        })
        .collect::<Vec<_>>();
    move_in_turn(c, app, pod, before, &version, &steps).await
}

/// Writes what `seen` saw into `row`'s client columns.
fn record_client(row: &mut Row, seen: &Seen) {
    row.client = seen.client.clone();
    row.client_errors = seen.errors;
    row.data = match &seen.data {
        Ok(m) => format!("passed: {m}"),
        Err(m) => format!("failed: {m}"),
    };
    row.kept = match seen.kept {
        Some(true) => "yes",
        Some(false) => "no",
        None => "—",
    }
    .into();
}

/// Runs every application; a setup failure of one is its row, not the end of the suite.
pub async fn run(c: &Cluster) -> anyhow::Result<Vec<Row>> {
    for n in &c.nodes {
        for app in APPS.iter().filter(|a| a.image != "testapp") {
            tokio::task::block_in_place(|| n.containerd.import(app.image))?;
        }
    }
    let mut rows = Vec::new();
    for app in APPS {
        let got = run_app(c, app).await;
        match got {
            Ok(r) => rows.extend(r),
            Err(e) => rows.push({
                // What the application said, for whoever reads the failed run.
                let logs = c.kubectl(&["logs", "--tail", "20", &format!("{}-0", kube_name(app))]);
                println!("{} failed: {e:#}; its log: {logs:?}", app.name);
                Row {
                    app: app.name.into(),
                    version: "?".into(),
                    mv: "same node".into(),
                    checked: app.checks.into(),
                    outcome: format!("failing: {e:#}"),
                    frozen_ms: 0,
                    filesystem_bytes: 0,
                    filesystem_ms: 0,
                    client: "—".into(),
                    client_errors: 0,
                    data: "—".into(),
                    kept: "—".into(),
                }
            }),
        }
        for r in rows.iter().filter(|r| r.app == app.name) {
            println!("{}", r.line());
        }
    }
    Ok(rows)
}

/// MariaDB as Debian configures it (InnoDB on io_uring, which CRIU cannot dump): CRIU's
/// preflight refuses the move before anything freezes, naming io_uring in the Migration's
/// status, while a writer keeps writing over one connection without an error. Returns
/// the Migration's message.
pub async fn preflight_refusal(c: &Cluster) -> anyhow::Result<String> {
    let app = App {
        name: "uring",
        image: "mariadb",
        port: 3306,
        args: &[],
        checks: "",
    };
    c.apply(&mpod_yaml(&app))?;
    let pods: Api<Pod> = Api::default_namespaced(c.client.clone());
    let pod = crate::wait::ready_pod(&pods, "uring-0", Duration::from_secs(90)).await?;
    let ip = pod_ip(&pod);
    until("mariadb ready", Duration::from_secs(60), async || {
        compat_load::mariadb(&ip, "SELECT 1").ok()
    })
    .await?;
    let here = node_of(&pod);
    let there = other_node(c, &here).context("a second node")?;
    let writer = compat_load::mariadb_writer(&ip);
    tokio::time::sleep(CLIENT_LEAD).await;
    let st = c.migrate("uring-1", "uring-0", &there, 60).await?;
    let seen = tokio::task::spawn_blocking(move || writer.finish()).await??;
    let message = st.message.clone().unwrap_or_default();
    anyhow::ensure!(
        st.phase == Some(MigrationPhase::Failed) && st.reason.as_deref() == Some("NotMigratable"),
        "the move was not refused as not migratable: {st:?}"
    );
    anyhow::ensure!(
        message.contains("preflight") && message.contains("io_uring"),
        "the refusal does not name io_uring: {message}"
    );
    anyhow::ensure!(
        st.frozen_ms.unwrap_or(0) == 0,
        "the Pod froze for the move: {st:?}"
    );
    anyhow::ensure!(
        seen.errors == 0 && seen.data.is_ok() && seen.acknowledged > 0,
        "the writer was disturbed: {seen:?}"
    );
    let now = pods.get("uring-0").await?;
    anyhow::ensure!(
        node_of(&now) == here && crate::wait::is_ready(&now),
        "the Pod did not stay where it ran"
    );
    c.kubectl(&["delete", "migratingpod", "uring", "--wait=false"])?;
    Ok(message)
}

/// The README table of a run.
pub fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| Application | Version | Move | Outcome | Frozen ms | Client during the move | Client errors | Data check | Connections kept | Also checked | File-system state carried |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} KiB in {} ms |\n",
            r.app,
            r.version,
            r.mv,
            r.outcome.replace('|', "/").replace('\n', " "),
            r.frozen_ms,
            r.client,
            r.client_errors,
            r.data.replace('|', "/"),
            r.kept,
            r.checked,
            r.filesystem_bytes / 1024,
            r.filesystem_ms
        ));
    }
    t
}

/// The major version of a version string (`15.18 (Debian …)` → `15`): what must stay as
/// the README says — point releases follow the Debian archive a machine installs from.
pub fn major(version: &str) -> &str {
    version
        .split(|c: char| c == '.' || c.is_whitespace())
        .next()
        .unwrap_or(version)
}

/// `ok` or `failing`: what of an outcome must stay as the README says.
pub fn verdict(outcome: &str) -> &str {
    if outcome == "ok" { "ok" } else { "failing" }
}

/// What of a table row must stay as the README says, cell by cell: application, major
/// version, move, ok/failing, the client, its errors, whether the data check passed, the
/// connections kept, what else was checked. The frozen time and the bytes carried vary
/// from run to run; so do the counts inside the data check.
pub fn comparable(cells: &[&str]) -> Option<[String; 9]> {
    let data = cells.get(7)?;
    Some([
        (*cells.first()?).to_owned(),
        major(cells.get(1)?).to_owned(),
        (*cells.get(2)?).to_owned(),
        verdict(cells.get(3)?).to_owned(),
        (*cells.get(5)?).to_owned(),
        (*cells.get(6)?).to_owned(),
        data.split(':').next().unwrap_or(data).to_owned(),
        (*cells.get(8)?).to_owned(),
        (*cells.get(9)?).to_owned(),
    ])
}

impl Row {
    /// [`comparable`] of this row as [`table`] writes it.
    pub fn comparable(&self) -> Option<[String; 9]> {
        let line = table(std::slice::from_ref(self));
        let row = line.lines().nth(2)?;
        comparable(&cells_of(row))
    }
}

/// The cells of a Markdown table row, without the outer bars.
fn cells_of(line: &str) -> Vec<&str> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split('|').map(str::trim).collect()
}

/// [`comparable`] of each row of the table in `readme`.
pub fn readme_outcomes(readme: &str) -> Vec<[String; 9]> {
    let Some(start) = readme.find(TABLE_START) else {
        return vec![];
    };
    let end = readme[start..]
        .find(TABLE_END)
        .map_or(readme.len(), |e| start + e);
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Application"))
        .filter_map(|l| comparable(&cells_of(l)))
        .collect()
}

/// `readme` with the table between the markers replaced by `table`.
pub fn with_table(readme: &str, table: &str) -> anyhow::Result<String> {
    let start = readme.find(TABLE_START).context("no table start marker")? + TABLE_START.len();
    let end = readme[start..]
        .find(TABLE_END)
        .context("no table end marker")?
        + start;
    Ok(format!("{}\n{}{}", &readme[..start], table, &readme[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_told_by_criu_s_first_error_and_the_hint() {
        let msg = "checkpoint failed: container \"app\": \"runc\" \"checkpoint\" failed with exit status: 1: level=error msg=\"criu failed: type NOTIFY errno 0\\nlog file: /x/dump.log\"\n--- /x/dump.log: (00.01) Handling VMA\n(00.02) Error (criu/cr-dump.c:389): Can't get rlimit 0: Operation not permitted\n(00.03) Error (criu/cr-dump.c:1975): Dumping FAILED.\nhint: CRIU cannot read the resource limits";
        assert_eq!(
            short_reason(msg),
            "CRIU: Can't get rlimit 0: Operation not permitted — CRIU cannot read the resource limits"
        );
        assert_eq!(short_reason("target unschedulable"), "target unschedulable");
        let noisy = "--- /x/dump.log: (00.004839) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted\n(00.18) Error (criu/sk-unix.c:874): unix: External socket is used. Consider using --ext-unix-sk option.";
        assert_eq!(
            short_reason(noisy),
            "CRIU: unix: External socket is used. Consider using --ext-unix-sk option."
        );
    }

    #[test]
    fn the_readme_table_is_replaced_between_its_markers_and_read_back() {
        let rows = vec![Row {
            app: "nginx".into(),
            version: "1.22.1".into(),
            mv: "same node".into(),
            checked: "same content".into(),
            outcome: "ok".into(),
            frozen_ms: 250,
            filesystem_bytes: 30722,
            filesystem_ms: 5,
            client: "a download".into(),
            client_errors: 0,
            data: "passed: unchanged".into(),
            kept: "yes".into(),
        }];
        let readme = format!("# x\n{TABLE_START}\nold\n{TABLE_END}\nrest\n");
        let new = with_table(&readme, &table(&rows)).expect("test setup");
        assert!(new.ends_with(&format!("{TABLE_END}\nrest\n")) && !new.contains("old"));
        let expected = [
            "nginx",
            "1",
            "same node",
            "ok",
            "a download",
            "0",
            "passed",
            "yes",
            "same content",
        ]
        .map(String::from);
        assert_eq!(readme_outcomes(&new), vec![expected.clone()]);
        assert_eq!(rows[0].comparable(), Some(expected));
        // A run whose client saw an error, or whose connection was not kept, differs.
        let mut worse = rows[0].clone();
        worse.client_errors = 1;
        assert_ne!(worse.comparable(), rows[0].comparable());
        worse.client_errors = 0;
        worse.kept = "no".into();
        assert_ne!(worse.comparable(), rows[0].comparable());
    }
}
