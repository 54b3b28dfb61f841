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

/// Sends `GET /count` until the app's count is at least `n`; returns the count reached. A
/// count raised well above the polls a test makes afterwards tells a copy that kept its
/// state from one started afresh (which counts from 1).
pub async fn raise_count(ip: &str, n: u64) -> anyhow::Result<u64> {
    loop {
        let c = get_count(ip).await?;
        if c >= n {
            return Ok(c);
        }
    }
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

/// A client holding `GET /stream` open to `ip:port`: every tick with when it came, and how
/// the connection ended (`None` while open).
pub struct HeldStream {
    lines: std::sync::Arc<std::sync::Mutex<Vec<(std::time::Instant, u64)>>>,
    ended: std::sync::Arc<std::sync::Mutex<Option<(std::time::Instant, String)>>>,
}

impl HeldStream {
    /// Connects and asks for the stream.
    pub fn open(ip: &str, port: u16) -> anyhow::Result<Self> {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect((ip, port))?;
        s.write_all(b"GET /stream HTTP/1.1\r\nHost: app\r\n\r\n")?;
        // A connection that hangs shows as a read timeout.
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let ended = std::sync::Arc::new(std::sync::Mutex::new(None));
        let (l, e) = (lines.clone(), ended.clone());
        std::thread::spawn(move || {
            let mut r = std::io::BufReader::new(s);
            let mut line = String::new();
            let end = loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) => break "closed (EOF)".to_owned(),
                    Ok(_) if line.starts_with("tick") => {
                        let n = line
                            .trim()
                            .strip_prefix("tick ")
                            .and_then(|n| n.parse().ok())
                            .unwrap_or(0);
                        l.lock().expect("lock").push((std::time::Instant::now(), n));
                    }
                    Ok(_) => {}
                    Err(err) => break format!("{:?}", err.kind()),
                }
            };
            *e.lock().expect("lock") = Some((std::time::Instant::now(), end));
        });
        Ok(Self { lines, ended })
    }

    /// Ticks received after `t`.
    pub fn ticks_since(&self, t: std::time::Instant) -> usize {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .filter(|(x, _)| *x > t)
            .count()
    }

    /// The tick numbers received, in order.
    pub fn numbers(&self) -> Vec<u64> {
        self.lines
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, n)| *n)
            .collect()
    }

    /// The longest time without a tick: between two ticks, or from the last tick until
    /// now (a connection that went silent has not paused for less than that).
    pub fn longest_gap(&self) -> Duration {
        let now = std::time::Instant::now();
        let l = self.lines.lock().expect("lock");
        let between = l
            .windows(2)
            .map(|w| w[1].0.saturating_duration_since(w[0].0))
            .max()
            .unwrap_or_default();
        let trailing = l
            .last()
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t.0));
        between.max(trailing)
    }

    /// How and when the connection ended, once it did.
    pub fn ended(&self) -> Option<(std::time::Instant, String)> {
        self.ended.lock().expect("lock").clone()
    }
}
