//! The wiring of `podmig node`: builds the shared [`Node`], settles what a crashed run
//! left, then starts the adapters (runtime hook, CRI extension, watch, HTTPS API, janitor)
//! and stops them at shutdown.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Arc, time::Duration};

use podmig_cri_ext::engine::Runc;
use tokio::net::UnixListener;

use crate::{Error, Result, config::NodeConfig, store::CheckpointStore};

use super::{
    capabilities, cri, hook, http, janitor, peer, recovery,
    shared::{Node, Settings},
    tls, watch,
};

fn bind(path: &Path) -> Result<UnixListener> {
    let err = |source| Error::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // A socket left by a previous run would make bind fail.
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

async fn kube_client(
    cfg: &NodeConfig,
) -> Result<Option<(kube::Client, Option<peer::TokenSource>)>> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| {
                Error::InvalidRequest(format!("kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| Error::InvalidRequest(format!("kubeconfig {}: {e}", path.display())))?
        }
        None => match kube::Config::incluster() {
            Ok(c) => c,
            Err(_) => return Ok(None),
        },
    };
    let token = peer::TokenSource::from_config(&config);
    let client =
        crate::kubeclient::from_config(config).map_err(|e| Error::InvalidRequest(e.to_string()))?;
    Ok(Some((client, token)))
}

/// Runs the node daemon until `shutdown` resolves.
pub async fn run(cfg: NodeConfig, shutdown: impl std::future::Future<Output = ()>) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    podmig_cri_ext::engine::create_private_dir(&cfg.checkpoint_dir)?;
    let failed_logs = cfg.state_dir.join("criu-failed");
    let engine = Runc {
        binary: cfg.runc_binary.clone(),
        root: cfg.runc_root.clone(),
        failed_logs: Some(failed_logs.clone()),
    };
    let retention = Duration::from_secs(cfg.failed_log_retention_hours.saturating_mul(3600));
    tokio::spawn(async move {
        loop {
            let dir = failed_logs.clone();
            let _ = tokio::task::spawn_blocking(move || {
                podmig_cri_ext::criu_log::sweep_failed(&dir, retention)
            })
            .await;
            tokio::time::sleep(Duration::from_secs(600)).await;
        }
    });
    let settings = Settings {
        node_name: cfg.node_name.clone().unwrap_or_default(),
        runc_root: cfg.runc_root.clone(),
        hold: Duration::from_millis(cfg.kill_hold_ms),
        runtime_request_timeout: Duration::from_millis(cfg.runtime_request_timeout_ms),
        state_dir: cfg.state_dir.clone(),
        checkpoint_budget: cfg.checkpoint_budget_mib << 20,
        move_bandwidth_mibps: cfg.move_bandwidth_mibps,
    };
    let mut node = Node::new(engine, CheckpointStore::new(&cfg.checkpoint_dir), settings)?;
    let kube = kube_client(&cfg).await?;
    if let Some((client, token)) = &kube {
        node = node.with_kube(client.clone());
        match (&cfg.tls_ca, token) {
            (Some(ca), Some(token)) => {
                let pem = std::fs::read(ca).map_err(|source| Error::Listen {
                    path: ca.clone(),
                    source,
                })?;
                let peers = peer::PeerClient::new(&pem, token.clone(), cfg.peer_port)
                    .map_err(|e| Error::InvalidRequest(format!("{}: {e}", ca.display())))?;
                node = node.with_peers(peers);
            }
            _ => tracing::warn!("no --tls-ca or no token: moves from other nodes are not possible"),
        }
    }
    let lazy = tokio::task::spawn_blocking(capabilities::probe)
        .await
        .unwrap_or_else(|e| capabilities::LazySupport::Impossible(e.to_string()));
    tracing::info!(lazy_possible = lazy.possible(), "{lazy}");
    node.metrics.lazy_possible.set(i64::from(lazy.possible()));
    let _ = node.lazy.set(lazy);
    let node = Arc::new(node);
    let hook = bind(&cfg.hook_socket)?;
    let api = bind(&cfg.api_socket)?;
    // CRIU helpers of a killed run serve moves nobody will finish: stopped first.
    let mut stray = podmig_cri_ext::stray::kill_helpers_below(&cfg.checkpoint_dir);
    stray.extend(podmig_cri_ext::stray::kill_lazy_dumps_below(
        &cfg.checkpoint_dir,
    ));
    stray.extend(podmig_cri_ext::stray::kill_lazy_restores_below(
        &cfg.checkpoint_dir,
    ));
    if !stray.is_empty() {
        tracing::warn!(pids = ?stray, "stopped CRIU page servers, dumps and lazy restores a previous run left");
    }
    // Sources a crashed run left frozen are settled before anything else moves.
    recovery::run(node.clone()).await;
    let mut tasks = vec![
        tokio::spawn(podmig_cri_ext::hook::serve(
            hook,
            Arc::new(hook::NodeHook(node.clone())),
        )),
        tokio::spawn(janitor::run(node.clone())),
    ];
    if node.kube.is_some() {
        if node.settings.node_name.is_empty() {
            tracing::warn!("no --node-name: the daemon does not watch its Pods");
        } else {
            tasks.push(tokio::spawn(watch::run(node.clone())));
        }
    }
    let serving = match (&cfg.tls_cert, &cfg.tls_key, &cfg.tls_ca, &cfg.tls_ca_key) {
        (Some(cert), Some(key), _, _) => Some((cert.clone(), key.clone())),
        (None, None, Some(ca), Some(ca_key)) => {
            let mut sans = vec![node.settings.node_name.clone()];
            if !node.settings.node_name.is_empty() {
                let n = node.clone();
                let name = node.settings.node_name.clone();
                match tokio::task::spawn_blocking(move || n.node_address(&name)).await {
                    Ok(Ok(ip)) => sans.insert(0, ip),
                    other => tracing::warn!(
                        ?other,
                        "cannot learn this node's address for its certificate"
                    ),
                }
            }
            let issued = tls::issue(ca, ca_key, &sans, &cfg.state_dir.join("tls"))?;
            tracing::info!(names = ?sans, "issued this node's serving certificate from the daemon CA");
            Some(issued)
        }
        _ => None,
    };
    let http = match (&serving, &node.kube) {
        (Some((cert, key)), Some(_)) => {
            let server = http::serve(node.clone(), cfg.listen, cert, key).await?;
            tracing::info!(listen = %cfg.listen, "migration API listening (HTTPS)");
            Some(server)
        }
        _ => {
            tracing::warn!("no --tls-cert/--tls-key or no API access: the HTTP API is off");
            None
        }
    };
    tracing::info!(node = %node.settings.node_name, hook = %cfg.hook_socket.display(),
        api = %cfg.api_socket.display(), runc_root = %cfg.runc_root.display(), "podmig node daemon ready");
    let served = tonic::transport::Server::builder()
        .add_service(podmig_cri_ext::proto::runtime::v1::checkpoint_service_server::CheckpointServiceServer::new(
            cri::CheckpointApi(node.clone()),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(api),
            shutdown,
        )
        .await;
    if let Some(h) = http {
        h.shutdown();
    }
    for t in tasks {
        t.abort();
    }
    let _ = std::fs::remove_file(&cfg.hook_socket);
    let _ = std::fs::remove_file(&cfg.api_socket);
    served.map_err(Error::from)
}
