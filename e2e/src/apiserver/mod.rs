//! A Kubernetes API server for tests: faithful for what podmig, kube-rs and kubectl use
//! (discovery, CRUD with selectors, watch with resourceVersion and bookmarks, optimistic
//! concurrency, finalizers and graceful Pod deletion, status subresources, eviction,
//! binding, CRDs, TokenReview/SubjectAccessReview with RBAC), served over HTTPS with a
//! kubeconfig for clients. No kube-apiserver can be installed on these machines.

pub mod admission;
pub mod api;
pub mod auth;
pub mod events;
pub mod http;
pub mod openapi;
pub mod outbound;
pub mod patch;
pub mod protobuf;
pub mod resources;
pub mod schema;
pub mod selectors;
pub mod store;
pub mod table;
pub mod tls;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;

pub use api::Api;
use auth::{Tokens, User};

/// A running API server.
pub struct ApiServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The API (for tests that look behind the HTTP face).
    pub api: Arc<Api>,
    /// Tokens it accepts.
    pub tokens: Arc<Tokens>,
    /// The admin kubeconfig.
    pub kubeconfig: PathBuf,
    /// The CA certificate clients trust.
    pub ca: PathBuf,
    kubelet: Arc<std::sync::OnceLock<outbound::KubeletClient>>,
    denied: Arc<std::sync::Mutex<Vec<String>>>,
    handle: axum_server::Handle<SocketAddr>,
    task: tokio::task::JoinHandle<()>,
    /// What a restart serves again: the routes (over the same state) and the TLS setup.
    app: axum::Router,
    tls: axum_server::tls_rustls::RustlsConfig,
}

/// How to start the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Address to listen on (port 0 = any).
    pub listen: SocketAddr,
    /// Names and addresses the certificate is valid for, besides the listen address.
    pub extra_sans: Vec<String>,
    /// Directory for the certificate, key and kubeconfig.
    pub dir: PathBuf,
    /// Interval of watch bookmarks.
    pub bookmark_interval: Duration,
}

impl ApiServer {
    /// Starts serving; returns once the socket is bound.
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        std::fs::create_dir_all(&opts.dir)?;
        let mut sans = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            opts.listen.ip().to_string(),
        ];
        sans.extend(opts.extra_sans.iter().cloned());
        let certs = tls::Certs::generate(&sans)?;
        let ca = opts.dir.join("ca.crt");
        std::fs::write(&ca, &certs.cert_pem)?;
        let config = axum_server::tls_rustls::RustlsConfig::from_pem(
            certs.cert_pem.clone().into_bytes(),
            certs.key_pem.clone().into_bytes(),
        )
        .await
        .context("TLS configuration")?;
        let api = Arc::new(Api::new());
        let tokens = Arc::new(Tokens::default());
        let admin_token = format!("admin-{}", uuid::Uuid::new_v4().simple());
        tokens.add(
            &admin_token,
            User {
                name: "kubernetes-admin".into(),
                uid: "admin".into(),
                groups: vec!["system:masters".into(), "system:authenticated".into()],
                ..Default::default()
            },
        );
        let kubelet = Arc::new(std::sync::OnceLock::new());
        let denied = Arc::new(std::sync::Mutex::new(Vec::new()));
        let state = Arc::new(http::ServerState {
            api: api.clone(),
            tokens: tokens.clone(),
            bookmark_interval: opts.bookmark_interval,
            kubelet: kubelet.clone(),
            denied: denied.clone(),
        });
        let app = axum::Router::new().fallback(http::handle).with_state(state);
        let (addr, handle, task) = serve(opts.listen, app.clone(), config.clone())?;
        let kubeconfig = opts.dir.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &format!("https://{addr}"), &ca, &admin_token)?;
        Ok(Self {
            addr,
            api,
            tokens,
            kubeconfig,
            ca,
            kubelet,
            denied,
            handle,
            task,
            app,
            tls: config,
        })
    }

    /// Goes down for `down` and comes back on the same address: every connection and
    /// watch is dropped, the objects and their resource versions stay (as etcd keeps
    /// them across a kube-apiserver restart), so clients must relist or resume.
    pub async fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        self.handle.shutdown();
        let _ = (&mut self.task).await;
        tokio::time::sleep(down).await;
        let (addr, handle, task) = serve(self.addr, self.app.clone(), self.tls.clone())?;
        self.addr = addr;
        self.handle = handle;
        self.task = task;
        Ok(())
    }

    /// `https://addr`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Issues a token for `user` and writes a kubeconfig using it at `path`.
    pub fn kubeconfig_for(&self, user: User, path: &Path) -> anyhow::Result<String> {
        let token = self.tokens.issue(user);
        write_kubeconfig(path, &self.url(), &self.ca, &token)?;
        Ok(token)
    }

    /// How to reach the kubelets: their serving CA and the token they accept from the API
    /// server (set once, when the cluster's PKI exists).
    pub fn set_kubelet_client(&self, ca_pem: &[u8], token: String) -> anyhow::Result<()> {
        let client = outbound::https_client(ca_pem).map_err(anyhow::Error::msg)?;
        let _ = self.kubelet.set(outbound::KubeletClient { client, token });
        Ok(())
    }

    /// The requests RBAC denied so far (`user verb resource ns/name`).
    pub fn denials(&self) -> Vec<String> {
        self.denied
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops serving.
    pub async fn stop(mut self) {
        self.handle.graceful_shutdown(Some(Duration::from_secs(1)));
        let _ = (&mut self.task).await;
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        self.task.abort();
    }
}

/// Binds `listen` and serves `app` over TLS on a task of its own.
fn serve(
    listen: SocketAddr,
    app: axum::Router,
    tls: axum_server::tls_rustls::RustlsConfig,
) -> anyhow::Result<(
    SocketAddr,
    axum_server::Handle<SocketAddr>,
    tokio::task::JoinHandle<()>,
)> {
    let handle = axum_server::Handle::new();
    let listener = std::net::TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let server = axum_server::from_tcp_rustls(listener, tls)?.handle(handle.clone());
    let task = tokio::spawn(async move {
        if let Err(error) = server.serve(app.into_make_service()).await {
            tracing::error!(%error, "API server stopped");
        }
    });
    Ok((addr, handle, task))
}

/// Writes a kubeconfig for `server` trusting `ca` and authenticating with `token`.
pub fn write_kubeconfig(path: &Path, server: &str, ca: &Path, token: &str) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: podmig-e2e\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: podmig-e2e\n  context:\n    cluster: podmig-e2e\n    user: user\n    namespace: default\ncurrent-context: podmig-e2e\n",
        ca = ca.display()
    );
    std::fs::write(path, text)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{PostParams, WatchParams};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_drops_every_watch_and_keeps_every_object() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let mut server = ApiServer::start(Options {
            listen: "127.0.0.1:0".parse()?,
            extra_sans: vec![],
            dir: dir.path().to_path_buf(),
            bookmark_interval: Duration::from_secs(60),
        })
        .await?;
        let client = crate::cluster::client_from(&server.kubeconfig).await?;
        let maps: kube::Api<ConfigMap> = kube::Api::default_namespaced(client.clone());
        let mut cm = ConfigMap::default();
        cm.metadata.name = Some("kept".into());
        let made = maps.create(&PostParams::default(), &cm).await?;
        let rv = made.metadata.resource_version.clone();
        let mut watch = maps
            .watch(&WatchParams::default(), rv.as_deref().unwrap_or("0"))
            .await?
            .boxed();
        let addr = server.addr;
        server.restart(Duration::from_millis(300)).await?;
        assert_eq!(server.addr, addr, "back on the same address");
        // The watch's connection is gone: its stream ends (or errs) instead of hanging.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match watch.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "the watch outlived the restart");
        let again = maps.get("kept").await?;
        assert_eq!(again.metadata.resource_version, rv);
        Ok(())
    }
}
