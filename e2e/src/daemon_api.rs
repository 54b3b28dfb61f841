//! The node daemons' HTTP API as `curl` reaches it from a test: status and body of a
//! request to one node's daemon, verified against the daemons' CA.

use std::process::Command;

use podmig_api::nodeapi::ApiError;

use crate::cluster::Cluster;

/// `curl` to a daemon: (HTTP status, body).
pub fn curl(
    c: &Cluster,
    node: usize,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut cmd = Command::new("curl");
    cmd.args(["--noproxy", "*", "-sS", "--max-time", "120", "-X", method])
        .arg("--cacert")
        .arg(c.daemon_ca())
        .args(["-w", "\n%{http_code}"]);
    if let Some(t) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {t}"));
    }
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data", b]);
    }
    cmd.arg(format!("{}{path}", c.daemon_url(node)));
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    Ok((code.trim().parse()?, body.to_owned()))
}

/// `curl -X POST <daemon of node>/migrate/{target}` with a JSON body.
pub fn post_migrate(
    c: &Cluster,
    node: usize,
    target: &str,
    token: Option<&str>,
    body: &str,
) -> anyhow::Result<(u16, String)> {
    curl(
        c,
        node,
        "POST",
        &format!("/migrate/{target}"),
        token,
        Some(body),
    )
}

/// The `reason` of a daemon's JSON error body (or what the body was instead).
pub fn error_reason(body: &str) -> String {
    serde_json::from_str::<ApiError>(body)
        .map(|e| e.reason)
        .unwrap_or_else(|_| format!("not a JSON error: {body}"))
}

/// Sends raw `bytes` to node `node`'s daemon over TLS (verified against the daemons' CA)
/// and reads what comes back within `within`: the answer's text, and whether the daemon
/// closed the connection in that time. For requests `curl` will not send.
pub async fn raw_exchange(
    c: &Cluster,
    node: usize,
    bytes: &[u8],
    within: std::time::Duration,
) -> anyhow::Result<(String, bool)> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(c.daemon_ca())? {
        roots.add(cert?)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let ip = c.network.node_ip(node);
    let tcp = tokio::net::TcpStream::connect((ip.as_str(), podmig_api::nodeapi::DEFAULT_API_PORT))
        .await?;
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from(ip.clone())?, tcp)
        .await?;
    tls.write_all(bytes).await?;
    tls.flush().await?;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
            Err(_) => return Ok((String::from_utf8_lossy(&got).into_owned(), false)),
            Ok(Ok(0) | Err(_)) => return Ok((String::from_utf8_lossy(&got).into_owned(), true)),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}
