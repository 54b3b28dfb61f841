//! The API server's own HTTPS calls: to kubelets (`pods/log`) and to admission webhooks,
//! each trusting only the CA bundle it was given.

use std::sync::Arc;

use axum::body::Bytes;
use http_body_util::Full;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// An HTTPS client.
pub type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client trusting exactly the certificates in `ca_pem`.
pub fn https_client(ca_pem: &[u8]) -> Result<HttpsClient, String> {
    https_client_for(ca_pem, None)
}

/// [`https_client`], checking the server's certificate for `server_name` instead of the
/// URL's host (a Service reached at its ClusterIP presents `<svc>.<ns>.svc`).
pub fn https_client_for(ca_pem: &[u8], server_name: Option<&str>) -> Result<HttpsClient, String> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| format!("CA bundle: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the CA bundle holds no certificate".into());
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let https = match server_name {
        Some(name) => {
            let name = rustls::pki_types::ServerName::try_from(name.to_owned())
                .map_err(|e| format!("server name {name:?}: {e}"))?;
            builder
                .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(name))
                .enable_http1()
                .build()
        }
        None => builder.enable_http1().build(),
    };
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// How the API server reaches kubelets.
#[derive(Clone)]
pub struct KubeletClient {
    /// Trusts the kubelets' serving CA.
    pub client: HttpsClient,
    /// The API server's credential at kubelets.
    pub token: String,
}
