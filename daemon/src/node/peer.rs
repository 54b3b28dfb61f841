//! The client side of daemon-to-daemon calls: a target node's daemon asks the source
//! node's daemon to hand over a Pod's checkpoint (`POST /migrate/{uid}` with a
//! `handover`) and later tells it the verdict (`POST /migrations/{id}/complete`). HTTPS
//! verified against the daemons' CA; authenticated with this daemon's own token.
//!
//! Why hyper-util and not reqwest: reqwest could carry this too (`bytes_stream` for the
//! streamed hand-over, `upgrade` for the page tunnel and page streams); this client came
//! first, is small (one rustls config trusting only the daemons' CA, `TCP_NODELAY`), and
//! the fault tests pin its behaviour, so it stays until it needs what reqwest adds. No
//! retry crate: nothing here may be retried blindly — a hand-over asked twice would freeze
//! the source twice — and the verdict's retries are the recovery rules (`recovery.rs`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use podmig_api::nodeapi::{ApiError, CHECKPOINT_MEDIA_TYPE, CompleteRequest, MigrateRequest};
use secrecy::ExposeSecret;

use super::transfer::{Receiver, TransferError};

/// Response header: milliseconds the source spent dumping.
pub const HEADER_CHECKPOINT_MS: &str = "x-podmig-checkpoint-ms";
/// Response header: milliseconds of CRIU's preflight on the source, before the freeze.
pub const HEADER_PREFLIGHT_MS: &str = "x-podmig-preflight-ms";
/// Response header: milliseconds since the source was frozen, when the headers left it.
pub const HEADER_FROZEN_MS: &str = "x-podmig-frozen-ms";
/// Answer header of a handover: `lazy` when the memory pages were left out (the target
/// pulls them through `POST /migrations/{id}/pages`), else `full`.
pub const HEADER_STRATEGY: &str = "x-podmig-strategy";
/// Answer header of a hand-over with `strategy: auto`: the full move's estimated frozen
/// time, ms.
pub const HEADER_ESTIMATE_MS: &str = "x-podmig-estimate-ms";
/// Answer header of a hand-over with `strategy: auto`: why it chose what it chose.
pub const HEADER_STRATEGY_REASON: &str = "x-podmig-strategy-reason";
/// Page stream: the bytes of memory the source expects to send (the container's memory),
/// which the target counts against its checkpoint budget while they arrive.
pub const HEADER_EXPECTED_BYTES: &str = "x-podmig-expected-bytes";
/// Bytes a link probe sends (`POST /probe`): long enough to reach the link's pace, short
/// enough not to matter before a move (~20–50 ms here).
pub const PROBE_BYTES: usize = 16 << 20;
/// The most a daemon reads of a link probe.
pub const PROBE_MAX_BYTES: usize = 64 << 20;
/// Protocol named in the `Upgrade` header of the page tunnel.
pub const PAGES_PROTOCOL: &str = "podmig-pages";

/// Where this daemon's bearer token comes from.
#[derive(Clone)]
pub enum TokenSource {
    /// A fixed token (kubeconfig).
    Fixed(String),
    /// A file read at every use (a projected service-account token rotates).
    File(PathBuf),
}

impl TokenSource {
    /// The token of a kube client configuration, if it has one.
    pub fn from_config(config: &kube::Config) -> Option<Self> {
        if let Some(t) = &config.auth_info.token {
            return Some(TokenSource::Fixed(t.expose_secret().to_owned()));
        }
        config
            .auth_info
            .token_file
            .as_ref()
            .map(|f| TokenSource::File(f.into()))
    }

    /// The token now; a file that cannot be read, or holds none, is an error (never an
    /// empty bearer header, which a peer would answer with a puzzling 401).
    fn token(&self) -> Result<String, PeerError> {
        match self {
            TokenSource::Fixed(t) => Ok(t.clone()),
            TokenSource::File(f) => {
                let unreadable = |reason: String| PeerError::Token {
                    path: f.clone(),
                    reason,
                };
                let t = std::fs::read_to_string(f).map_err(|e| unreadable(e.to_string()))?;
                let t = t.trim();
                if t.is_empty() {
                    return Err(unreadable("the file is empty".into()));
                }
                Ok(t.to_owned())
            }
        }
    }
}

/// Why a call to a peer daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer answered with an error.
    #[error("the daemon at {peer} answered {status}: {} ({})", .body.error, .body.reason)]
    Refused {
        /// The peer.
        peer: String,
        /// HTTP status.
        status: u16,
        /// Its JSON error.
        body: ApiError,
    },
    /// This daemon's own token cannot be read.
    #[error("this daemon's token at {path:?} cannot be used: {reason}")]
    Token {
        /// The token file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The peer could not be reached or the connection broke.
    #[error("cannot reach the podmig daemon at {peer}: {message}")]
    Transport {
        /// The peer.
        peer: String,
        /// Why.
        message: String,
    },
    /// The checkpoint stream was cut or corrupt.
    #[error("checkpoint from {peer}: {source}")]
    Transfer {
        /// The peer.
        peer: String,
        /// Why.
        source: TransferError,
    },
    /// Nothing arrived in time.
    #[error("the podmig daemon at {peer} did not answer within {secs} s")]
    Timeout {
        /// The peer.
        peer: String,
        /// The limit.
        secs: u64,
    },
}

/// A checkpoint that arrived.
#[derive(Debug)]
pub struct Fetched {
    /// Image directories per container.
    pub dirs: Vec<(String, PathBuf)>,
    /// Bytes of images.
    pub bytes: u64,
    /// Milliseconds of the source's preflight.
    pub preflight_ms: u64,
    /// Milliseconds the source's dump took.
    pub checkpoint_ms: u64,
    /// Milliseconds the stream took, from the answer's headers to its end.
    pub transfer_ms: u64,
    /// When the source was frozen, as seen from here.
    pub frozen_at: std::time::Instant,
    /// The memory pages were left out: they come through [`PeerClient::tunnel_pages`].
    pub lazy: bool,
    /// Containers whose pages the source streamed ahead, with the figures it sent.
    pub streamed: Vec<(String, super::stream::StreamFigures)>,
    /// `auto`: the full move's estimated frozen time and why the source chose as it did.
    pub choice: Option<(u64, String)>,
}

/// How a page tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelEnd {
    /// The lazy-pages daemon had everything and closed first (bytes from the source).
    Done(u64),
    /// The source's side ended first: pages may be missing.
    Broken(u64),
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// HTTPS client to the other nodes' daemons.
#[derive(Clone)]
pub struct PeerClient {
    client: Client<Https, Full<Bytes>>,
    token: Arc<TokenSource>,
    port: u16,
}

/// Why the CA bundle peers are trusted by cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// It is not PEM.
    #[error("CA bundle: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    /// A certificate in it is not one rustls accepts, or TLS cannot be set up.
    #[error("CA certificate: {0}")]
    Certificate(#[from] rustls::Error),
    /// It holds none.
    #[error("the CA bundle holds no certificate")]
    Empty,
}

impl PeerClient {
    /// A client trusting the CA certificates in `ca_pem`, authenticating with `token`,
    /// calling peers on `port`.
    pub fn new(ca_pem: &[u8], token: TokenSource, port: u16) -> Result<Self, TrustError> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert?)?;
        }
        if roots.is_empty() {
            return Err(TrustError::Empty);
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        // TCP_NODELAY: verdicts and the page tunnel's small requests must not wait for
        // Nagle's algorithm.
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.set_nodelay(true);
        http.enforce_http(false);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        Ok(Self {
            client: Client::builder(TokioExecutor::new()).build(https),
            token: Arc::new(token),
            port,
        })
    }

    fn request(
        &self,
        host: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Request<Full<Bytes>>, PeerError> {
        hyper::Request::post(format!("https://{host}:{}{path}", self.port))
            .header("authorization", format!("Bearer {}", self.token.token()?))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PeerError::Transport {
                peer: host.into(),
                message: e.to_string(),
            })
    }

    /// Asks the daemon on `host` to hand over Pod `source_uid`'s checkpoint and writes it
    /// through `receiver` (where each container's files go, and the bound on their bytes).
    /// `on_dumped` runs when the source answers (its dump is done).
    /// The whole exchange is bounded by `limit`.
    pub async fn fetch(
        &self,
        host: &str,
        source_uid: &str,
        req: &MigrateRequest,
        limit: Duration,
        on_dumped: impl FnOnce(),
        mut receiver: Receiver<impl FnMut(&str) -> Option<PathBuf>>,
    ) -> Result<Fetched, PeerError> {
        let peer = host.to_owned();
        let body = serde_json::to_vec(req).unwrap_or_default();
        let request = self.request(host, &format!("/migrate/{source_uid}"), body)?;
        let deadline = tokio::time::Instant::now() + limit;
        let timeout = || PeerError::Timeout {
            peer: peer.clone(),
            secs: limit.as_secs(),
        };
        let transport = |e: &dyn std::fmt::Display| PeerError::Transport {
            peer: peer.clone(),
            message: e.to_string(),
        };
        let resp = tokio::time::timeout_at(deadline, self.client.request(request))
            .await
            .map_err(|_| timeout())?
            .map_err(|e| transport(&e))?;
        let status = resp.status();
        let header_ms = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let checkpoint_ms = header_ms(HEADER_CHECKPOINT_MS);
        let preflight_ms = header_ms(HEADER_PREFLIGHT_MS);
        let frozen_at = std::time::Instant::now()
            .checked_sub(Duration::from_millis(header_ms(HEADER_FROZEN_MS)))
            .unwrap_or_else(std::time::Instant::now);
        let lazy = resp
            .headers()
            .get(HEADER_STRATEGY)
            .is_some_and(|v| v.as_bytes() == b"lazy");
        let choice = resp.headers().get(HEADER_STRATEGY_REASON).map(|v| {
            (
                header_ms(HEADER_ESTIMATE_MS),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        });
        let is_checkpoint = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes() == CHECKPOINT_MEDIA_TYPE.as_bytes());
        let mut body = resp.into_body();
        if !status.is_success() || !is_checkpoint {
            let bytes = tokio::time::timeout_at(deadline, body.collect())
                .await
                .map_err(|_| timeout())?
                .map_err(|e| transport(&e))?
                .to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| ApiError {
                error: String::from_utf8_lossy(&bytes).into_owned(),
                reason: "Unknown".into(),
            });
            return Err(PeerError::Refused {
                peer,
                status: status.as_u16(),
                body,
            });
        }
        on_dumped();
        let started = std::time::Instant::now();
        let result: Result<(), PeerError> = async {
            loop {
                let frame = tokio::time::timeout_at(deadline, body.frame())
                    .await
                    .map_err(|_| timeout())?;
                match frame {
                    None => return Ok(()),
                    Some(Err(e)) => {
                        return Err(PeerError::Transfer {
                            peer: peer.clone(),
                            source: TransferError::Cut(e.to_string()),
                        });
                    }
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            receiver.feed(&data).map_err(|source| PeerError::Transfer {
                                peer: peer.clone(),
                                source,
                            })?;
                        }
                    }
                }
            }
        }
        .await;
        let written = receiver.written();
        let finished = result.and_then(|()| {
            receiver.finish().map_err(|source| PeerError::Transfer {
                peer: peer.clone(),
                source,
            })
        });
        match finished {
            Ok(got) => Ok(Fetched {
                dirs: got.dirs,
                bytes: got.bytes,
                streamed: got.streamed,
                choice,
                preflight_ms,
                checkpoint_ms,
                transfer_ms: started.elapsed().as_millis() as u64,
                frozen_at,
                lazy,
            }),
            Err(e) => {
                for d in written {
                    let _ = std::fs::remove_dir_all(d);
                }
                Err(e)
            }
        }
    }

    /// Opens the page tunnel of lazy move `id` to the daemon on `host`, accepts the
    /// lazy-pages daemon's connection on `local` and carries bytes both ways until one side
    /// ends. `on_break` runs at once when the source's side ends first (before the
    /// lazy-pages daemon learns it), so the restored process can be stopped before it
    /// could touch a page that will never come.
    pub async fn tunnel_pages(
        &self,
        host: &str,
        id: &str,
        local: std::net::TcpListener,
        limit: Duration,
        on_break: impl FnOnce() + Send,
    ) -> Result<TunnelEnd, PeerError> {
        let transport = |e: &dyn std::fmt::Display| PeerError::Transport {
            peer: host.to_owned(),
            message: e.to_string(),
        };
        let upgraded = self
            .upgrade(host, &format!("/migrations/{id}/pages"), None)
            .await?;
        local.set_nonblocking(true).map_err(|e| transport(&e))?;
        let listener = tokio::net::TcpListener::from_std(local).map_err(|e| transport(&e))?;
        let (conn, _) = tokio::time::timeout(limit, listener.accept())
            .await
            .map_err(|_| PeerError::Timeout {
                peer: host.into(),
                secs: limit.as_secs(),
            })?
            .map_err(|e| transport(&e))?;
        conn.set_nodelay(true).map_err(|e| transport(&e))?;
        let (mut lazy_rx, mut lazy_tx) = conn.into_split();
        let (mut source_rx, mut source_tx) = tokio::io::split(upgraded);
        // Large buffers: CRIU asks for pages in runs of up to 4 MiB.
        let up = super::stream::pump(&mut lazy_rx, &mut source_tx, None);
        let down = super::stream::pump_open(&mut source_rx, &mut lazy_tx, None);
        tokio::pin!(up, down);
        tokio::select! {
            _ = &mut up => {
                let got = tokio::time::timeout(Duration::from_secs(5), down).await;
                Ok(TunnelEnd::Done(got.ok().and_then(Result::ok).map_or(0, |f| f.bytes)))
            }
            got = &mut down => {
                on_break();
                Ok(TunnelEnd::Broken(got.map_or(0, |f| f.bytes)))
            }
        }
    }

    /// Opens a raw byte stream to the daemon on `host` through `POST path` with an
    /// `Upgrade` to [`PAGES_PROTOCOL`] (inside this connection's TLS session).
    async fn upgrade(
        &self,
        host: &str,
        path: &str,
        expected_bytes: Option<u64>,
    ) -> Result<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, PeerError> {
        let transport = |e: &dyn std::fmt::Display| PeerError::Transport {
            peer: host.to_owned(),
            message: e.to_string(),
        };
        let mut request = self.request(host, path, Vec::new())?;
        request.headers_mut().insert(
            "connection",
            hyper::header::HeaderValue::from_static("upgrade"),
        );
        request.headers_mut().insert(
            "upgrade",
            hyper::header::HeaderValue::from_static(PAGES_PROTOCOL),
        );
        if let Some(bytes) = expected_bytes {
            request.headers_mut().insert(
                HEADER_EXPECTED_BYTES,
                hyper::header::HeaderValue::from(bytes),
            );
        }
        let resp = self.send_within(host, request, 10).await?;
        if resp.status() != hyper::StatusCode::SWITCHING_PROTOCOLS {
            return Err(refused(host, resp).await);
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(|e| transport(&e))?;
        Ok(hyper_util::rt::TokioIo::new(upgraded))
    }

    /// Sends `request` to the daemon on `host` and waits at most `secs` for its answer's
    /// head.
    async fn send_within(
        &self,
        host: &str,
        request: hyper::Request<Full<Bytes>>,
        secs: u64,
    ) -> Result<hyper::Response<hyper::body::Incoming>, PeerError> {
        tokio::time::timeout(Duration::from_secs(secs), self.client.request(request))
            .await
            .map_err(|_| PeerError::Timeout {
                peer: host.into(),
                secs,
            })?
            .map_err(|e| PeerError::Transport {
                peer: host.into(),
                message: e.to_string(),
            })
    }

    /// Asks the daemon on `host` to move Pod `uid` (`POST /migrate/{uid}` without a
    /// hand-over: what a person or a scheduler asks, needing `create pods/migrate`). The
    /// answer's status and body (a `MigrateResponse`, or an error body).
    pub async fn request_move(
        &self,
        host: &str,
        uid: &str,
        req: &MigrateRequest,
    ) -> Result<(u16, Vec<u8>), PeerError> {
        let body = serde_json::to_vec(req).map_err(|e| PeerError::Transport {
            peer: host.into(),
            message: e.to_string(),
        })?;
        let request = self.request(host, &format!("/migrate/{uid}"), body)?;
        let resp = self.send_within(host, request, 30).await?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| PeerError::Transport {
                peer: host.into(),
                message: e.to_string(),
            })?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    }

    /// Times the link to the daemon on `host`: `bytes` zeros sent through the daemons'
    /// TLS channel (after a first empty probe opened the connection), in MB/s.
    pub async fn probe_link(&self, host: &str, bytes: usize) -> Result<f64, PeerError> {
        let send = |n: usize| async move {
            let request = self.request(host, "/probe", vec![0u8; n])?;
            let resp = self.send_within(host, request, 10).await?;
            if !resp.status().is_success() {
                return Err(refused(host, resp).await);
            }
            // The answer's body is read so that the connection goes back to the pool.
            let _ = resp.into_body().collect().await;
            Ok(())
        };
        send(0).await?;
        let started = std::time::Instant::now();
        send(bytes).await?;
        Ok(bytes as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-6))
    }

    /// Opens the page stream of container `container` of streamed move `id` to the
    /// target's daemon on `host` (see `stream.rs`), announcing the `expected` bytes.
    pub async fn open_page_stream(
        &self,
        host: &str,
        id: &str,
        container: &str,
        expected: u64,
    ) -> Result<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, PeerError> {
        self.upgrade(
            host,
            &format!("/migrations/{id}/streams/{container}"),
            Some(expected),
        )
        .await
    }

    /// Tells the daemon on `host` the verdict on move `id`; retried a few times.
    pub async fn complete(
        &self,
        host: &str,
        id: &str,
        verdict: &CompleteRequest,
    ) -> Result<(), PeerError> {
        let body = serde_json::to_vec(verdict).unwrap_or_default();
        let mut last = None;
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            let request =
                self.request(host, &format!("/migrations/{id}/complete"), body.clone())?;
            match self.send_within(host, request, 5).await {
                Ok(resp) if resp.status().is_success() => return Ok(()),
                // A refusal is final: retrying changes nothing.
                Ok(resp) => return Err(refused(host, resp).await),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(PeerError::Timeout {
            peer: host.into(),
            secs: 5,
        }))
    }
}

/// A peer's answer that is not what was asked for, with its JSON error body.
async fn refused(host: &str, resp: hyper::Response<hyper::body::Incoming>) -> PeerError {
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    PeerError::Refused {
        peer: host.into(),
        status,
        body: serde_json::from_slice(&bytes).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_that_cannot_be_read_is_an_error_not_an_empty_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        let source = TokenSource::File(file.clone());
        assert!(matches!(source.token(), Err(PeerError::Token { .. })));
        std::fs::write(&file, "  \n").expect("write");
        let e = source.token().expect_err("empty");
        assert!(e.to_string().contains("empty"), "{e}");
        std::fs::write(&file, "abc\n").expect("write");
        assert_eq!(source.token().ok().as_deref(), Some("abc"));
        assert_eq!(
            TokenSource::Fixed("x".into()).token().ok().as_deref(),
            Some("x")
        );
    }
}
