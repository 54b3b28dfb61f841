//! The daemon's serving certificate for its migration API when the chart (or the
//! operator) gives it only the cluster's daemon CA: issued at start for this node's
//! InternalIP and name, signed by that CA, kept root-only in the state directory. Peers
//! check it against the same CA, so no per-node certificate has to be distributed.

use std::path::{Path, PathBuf};

use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};

use crate::{Error, Result};

fn invalid(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidRequest(format!("{what}: {e}"))
}

/// Issues a serving certificate for `sans` (IP addresses or DNS names) signed by the CA in
/// `ca_cert`/`ca_key` (PEM; the key PKCS #8), writes it and its new key (0600) into
/// `dir`; returns (certificate path, key path).
pub fn issue(
    ca_cert: &Path,
    ca_key: &Path,
    sans: &[String],
    dir: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| Error::State {
            path: p.to_path_buf(),
            source,
        })
    };
    let ca_key =
        KeyPair::from_pem(&read(ca_key)?).map_err(|e| invalid("the CA key (PKCS #8 PEM)", e))?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_cert)?, ca_key)
        .map_err(|e| invalid("the CA certificate", e))?;
    let mut params = CertificateParams::new(sans.to_vec()).map_err(|e| invalid("names", e))?;
    params.distinguished_name.push(
        DnType::CommonName,
        format!("podmig-node {}", sans.last().cloned().unwrap_or_default()),
    );
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().map_err(|e| invalid("key", e))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| invalid("signing", e))?;
    podmig_cri_ext::engine::create_private_dir(dir)?;
    let (c, k) = (dir.join("serving.crt"), dir.join("serving.key"));
    let write = |p: &Path, text: String| -> Result<()> {
        use std::{io::Write, os::unix::fs::OpenOptionsExt};
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(p)
            .map_err(|source| Error::State {
                path: p.to_path_buf(),
                source,
            })?;
        f.write_all(text.as_bytes()).map_err(|source| Error::State {
            path: p.to_path_buf(),
            source,
        })
    };
    write(&c, cert.pem())?;
    write(&k, key.serialize_pem())?;
    Ok((c, k))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_a_certificate_the_ca_verifies() {
        use rcgen::{BasicConstraints, CertifiedIssuer, IsCa, PKCS_ED25519};
        let tmp = tempfile::tempdir().expect("tmp");
        // An Ed25519 CA, as the chart's `genCAWithKey … (genPrivateKey "ed25519")` makes.
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_key = KeyPair::generate_for(&PKCS_ED25519).expect("key");
        let ca_key_pem = ca_key.serialize_pem();
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
        std::fs::write(tmp.path().join("ca.crt"), ca.pem()).expect("write");
        std::fs::write(tmp.path().join("ca.key"), ca_key_pem).expect("write");
        let (cert, key) = issue(
            &tmp.path().join("ca.crt"),
            &tmp.path().join("ca.key"),
            &["10.0.0.7".into(), "node-7".into()],
            &tmp.path().join("tls"),
        )
        .expect("issued");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A TLS client trusting only the CA accepts it for the node's address.
        use rustls::{
            client::danger::ServerCertVerifier,
            pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject},
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).expect("ca der"))
            .expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        let leaf = CertificateDer::from_pem_file(&cert).expect("leaf");
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from("10.0.0.7").expect("name"),
                &[],
                UnixTime::now(),
            )
            .expect("valid for the node's address");
    }
}
