//! The local cluster's PKI for the node daemons' HTTPS API: one CA, and per node a serving
//! certificate for its address, as the chart's install hook makes on a real cluster.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// Files of one daemon's TLS identity.
#[derive(Debug, Clone)]
pub struct DaemonTls {
    /// Serving certificate (PEM).
    pub cert: PathBuf,
    /// Its key (PEM, 0600).
    pub key: PathBuf,
    /// The CA every daemon's certificate is signed by (PEM).
    pub ca: PathBuf,
}

/// Creates a CA in `dir` and a certificate for every `(name, ip)`.
pub fn create(dir: &Path, nodes: &[(String, String)]) -> anyhow::Result<Vec<DaemonTls>> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "podmig node daemons CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, ca.pem())?;
    let mut out = Vec::new();
    for (name, ip) in nodes {
        let mut params = CertificateParams::new(vec![ip.clone(), name.clone()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("podmig-node {name}"));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca)?;
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem())?;
        std::fs::write(&k, key.serialize_pem())?;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600))?;
        out.push(DaemonTls {
            cert: c,
            key: k,
            ca: ca_path.clone(),
        });
    }
    Ok(out)
}
