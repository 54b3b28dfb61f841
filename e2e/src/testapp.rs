//! Probes of the test app: its in-memory counter over HTTP and its heartbeat log.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Port the test app listens on.
pub const PORT: u16 = 8080;

/// `GET /count` once: the counter after this call.
pub async fn get_count(ip: &str) -> anyhow::Result<u64> {
    get_count_at(ip, PORT).await
}

/// `GET /count` on another port.
pub async fn get_count_at(ip: &str, port: u16) -> anyhow::Result<u64> {
    let body = get_at(ip, port, "/count").await?;
    body.trim()
        .parse()
        .with_context(|| format!("bad count {body:?}"))
}

/// `GET path` on `port`: the body.
pub async fn get_at(ip: &str, port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect((ip, port)))
        .await
        .context("connect timed out")??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut buf = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut buf))
        .await
        .context("read timed out")??;
    Ok(buf.split("\r\n\r\n").nth(1).context("no body")?.to_owned())
}

/// What a `--unix-peer` sidecar saw of its peer (`GET /peer`): answers, failures, last.
pub async fn peer_stats(ip: &str, port: u16) -> anyhow::Result<(u64, u64, u64)> {
    let body = get_at(ip, port, "/peer").await?;
    let field = |k: &str| -> anyhow::Result<u64> {
        body.split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .with_context(|| format!("no {k} in {body:?}"))?
            .parse()
            .with_context(|| format!("bad {k} in {body:?}"))
    };
    Ok((field("ok=")?, field("failed=")?, field("last=")?))
}

/// `GET /count` until the app answers (it may still be starting).
pub async fn wait_count(ip: &str, within: Duration) -> anyhow::Result<u64> {
    wait_count_at(ip, PORT, within).await
}

/// [`wait_count`] on another port.
pub async fn wait_count_at(ip: &str, port: u16, within: Duration) -> anyhow::Result<u64> {
    let deadline = Instant::now() + within;
    loop {
        match get_count_at(ip, port).await {
            Ok(n) => return Ok(n),
            Err(e) if Instant::now() > deadline => bail!("test app at {ip} not answering: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Heartbeat sequence numbers in a CRI log file (`<time> stdout F heartbeat seq=N`).
pub fn heartbeats(log: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split("heartbeat seq=").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// A MigratingPod whose every restore fails, the failure tests' lever: its app holds a
/// file open in a `hostPath` volume the Pod declares present on every node
/// (`podmig.dev/volumes-on-every-node`), but below a subdirectory named after the Pod
/// (`subPathExpr: $(POD_NAME)`) — the target Pod, named otherwise, finds no such file
/// on any node, and CRIU refuses the restore.
pub fn unrestorable_mpod_yaml(name: &str, timeout_seconds: u32, mem_mib: u32) -> String {
    format!(
        r#"apiVersion: podmig.dev/v1alpha1
kind: MigratingPod
metadata: {{name: {name}}}
spec:
  migrationTimeoutSeconds: {timeout_seconds}
  template:
    metadata:
      labels: {{app: {name}}}
      annotations: {{podmig.dev/volumes-on-every-node: state}}
    spec:
      terminationGracePeriodSeconds: 5
      volumes:
      - {{name: state, hostPath: {{path: /srv/podmig-state, type: DirectoryOrCreate}}}}
      containers:
      - name: app
        image: podmig.local/testapp:latest
        args: ['--mem-mib', '{mem_mib}', '--hold-open', '/state/state.db']
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        volumeMounts:
        - {{name: state, mountPath: /state, subPathExpr: $(POD_NAME)}}
"#
    )
}
