//! The kubelet stand-in's log endpoint, `GET /containerLogs/{ns}/{pod}/{container}` on the
//! node's address (port 10250, HTTPS), as kubelet serves it to the API server behind
//! `kubectl logs`: read from the CRI log files (`<pod dir>/<container>/<attempt>.log`),
//! with `follow`, `previous`, `tailLines`, `timestamps` and `limitBytes`.

use std::{
    collections::HashMap,
    io::{Read, Seek, SeekFrom},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Path as UrlPath, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use crate::pki::DaemonTls;

/// The port kubelet serves on.
pub const KUBELET_PORT: u16 = 10250;

/// What the log server needs.
#[derive(Debug, Clone)]
pub struct LogServer {
    /// Root of the Pod log directories (`<ns>_<name>_<uid>`).
    pub logs_root: PathBuf,
    /// The bearer token the API server presents.
    pub token: String,
}

/// Binds `addr` inside the network namespace `netns` (the listening socket stays there
/// while this process serves it from the host namespace).
pub fn bind_in_netns(netns: &str, addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let path = Path::new("/var/run/netns").join(netns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = std::fs::File::open(&path)?;
            // This short-lived thread only: the caller's namespace is untouched.
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)?;
            let listener = std::net::TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("bind thread panicked")))
    })
}

/// Serves logs on `listener` with the node's TLS identity until the task is dropped.
pub async fn serve(
    listener: std::net::TcpListener,
    tls: &DaemonTls,
    server: LogServer,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key).await?;
    let app = axum::Router::new()
        .route("/containerLogs/{ns}/{pod}/{container}", get(container_logs))
        .with_state(Arc::new(server));
    let server = axum_server::from_tcp_rustls(listener, config)?;
    Ok(tokio::spawn(async move {
        if let Err(error) = server.serve(app.into_make_service()).await {
            tracing::error!(%error, "kubelet log server stopped");
        }
    }))
}

fn text(code: StatusCode, message: String) -> Response {
    (code, [(header::CONTENT_TYPE, "text/plain")], message).into_response()
}

async fn container_logs(
    State(st): State<Arc<LogServer>>,
    UrlPath((ns, pod, container)): UrlPath<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let authorized = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.strip_prefix("Bearer ") == Some(st.token.as_str()));
    if !authorized {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized".into());
    }
    let flag = |k: &str| matches!(query.get(k).map(String::as_str), Some("true" | "1"));
    let options = LogOptions {
        previous: flag("previous"),
        timestamps: flag("timestamps"),
        tail: query.get("tailLines").and_then(|t| t.parse().ok()),
        limit: query.get("limitBytes").and_then(|t| t.parse().ok()),
    };
    let Some(dir) = pod_log_dir(&st.logs_root, &ns, &pod) else {
        return text(
            StatusCode::NOT_FOUND,
            format!("pod {ns}/{pod} has no logs on this node"),
        );
    };
    let attempts = attempts(&dir.join(&container));
    let chosen = if options.previous {
        attempts.iter().rev().nth(1)
    } else {
        attempts.last()
    };
    let Some(&attempt) = chosen else {
        let what = if options.previous {
            "previous terminated container"
        } else {
            "container"
        };
        return text(
            StatusCode::BAD_REQUEST,
            format!("{what} \"{container}\" in pod \"{pod}\" not found"),
        );
    };
    let file = dir.join(&container).join(format!("{attempt}.log"));
    let (first, offset) = match read_from(&file, 0) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("{}: {e}", file.display()),
            );
        }
    };
    let mut out = render(&first, &options);
    if let Some(limit) = options.limit {
        out.truncate(limit);
    }
    if !flag("follow") || options.previous {
        return text(StatusCode::OK, out);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    tokio::spawn(async move {
        if tx.send(Ok(out.into_bytes())).await.is_err() {
            return;
        }
        let mut offset = offset;
        let mut carry = String::new();
        let follow = LogOptions {
            tail: None,
            ..options
        };
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let newer = attempts_of(&dir, &container).last().copied() != Some(attempt);
            let Ok((chunk, next)) = read_from(&file, offset) else {
                return;
            };
            offset = next;
            carry.push_str(&chunk);
            let complete = carry.rfind('\n').map_or(0, |i| i + 1);
            let lines: String = carry.drain(..complete).collect();
            if !lines.is_empty()
                && tx
                    .send(Ok(render(&lines, &follow).into_bytes()))
                    .await
                    .is_err()
            {
                return;
            }
            if newer || tx.is_closed() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn attempts_of(dir: &Path, container: &str) -> Vec<u32> {
    attempts(&dir.join(container))
}

#[derive(Debug, Clone, Copy)]
struct LogOptions {
    previous: bool,
    timestamps: bool,
    tail: Option<usize>,
    limit: Option<usize>,
}

/// The newest log directory of `ns/pod` (a Pod re-created under the same name gets a new
/// uid, and kubelet serves the current one).
fn pod_log_dir(root: &Path, ns: &str, pod: &str) -> Option<PathBuf> {
    let prefix = format!("{ns}_{pod}_");
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
}

/// The attempts a container's log directory holds, oldest first.
fn attempts(dir: &Path) -> Vec<u32> {
    let mut found: Vec<u32> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    found.sort_unstable();
    found
}

fn read_from(file: &Path, offset: u64) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(file)?;
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok((
        String::from_utf8_lossy(&buf).into_owned(),
        offset + buf.len() as u64,
    ))
}

/// CRI log lines (`<RFC3339Nano> <stream> <P|F> <text>`) as `kubectl logs` shows them:
/// partial lines joined, the timestamp kept when asked, the last `tail` lines.
fn render(cri: &str, options: &LogOptions) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut partial = String::new();
    for raw in cri.lines() {
        let mut parts = raw.splitn(4, ' ');
        let (Some(ts), Some(_stream), Some(tag)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let message = parts.next().unwrap_or_default();
        if partial.is_empty() && options.timestamps {
            partial.push_str(ts);
            partial.push(' ');
        }
        partial.push_str(message);
        if tag != "P" {
            partial.push('\n');
            lines.push(std::mem::take(&mut partial));
        }
    }
    let skip = options.tail.map_or(0, |n| lines.len().saturating_sub(n));
    lines[skip..].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2026-11-22T05:00:00.000000001Z stdout F testapp ready\n\
        2026-11-22T05:00:00.100000000Z stdout P heartbeat \n\
        2026-11-22T05:00:00.100000001Z stdout F seq=1\n\
        2026-11-22T05:00:00.200000000Z stderr F heartbeat seq=2\n";

    #[test]
    fn renders_cri_lines_like_kubelet() {
        let plain = LogOptions {
            previous: false,
            timestamps: false,
            tail: None,
            limit: None,
        };
        assert_eq!(
            render(LOG, &plain),
            "testapp ready\nheartbeat seq=1\nheartbeat seq=2\n"
        );
        let tailed = LogOptions {
            tail: Some(1),
            timestamps: true,
            ..plain
        };
        assert_eq!(
            render(LOG, &tailed),
            "2026-11-22T05:00:00.200000000Z heartbeat seq=2\n"
        );
    }

    #[test]
    fn finds_attempts_and_the_newest_pod_dir() {
        let root = tempfile::tempdir().expect("tmp");
        let dir = root.path().join("default_app_u1/c");
        std::fs::create_dir_all(&dir).expect("dir");
        for a in [0, 2, 1] {
            std::fs::write(dir.join(format!("{a}.log")), "").expect("write");
        }
        assert_eq!(attempts(&dir), vec![0, 1, 2]);
        assert_eq!(
            pod_log_dir(root.path(), "default", "app"),
            Some(root.path().join("default_app_u1"))
        );
        assert_eq!(pod_log_dir(root.path(), "default", "other"), None);
    }
}
