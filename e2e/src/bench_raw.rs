//! What the machine itself can do, measured in the same run as the moves so that each
//! phase's rate can be put next to its limit: a raw write into tmpfs (where checkpoints
//! live) and a raw TLS copy over loopback (rustls with ring, the daemons' stack, no HTTP).

use std::{io::Write, path::Path, sync::Arc, time::Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Chunk size of both baselines: what the daemons read and send at a time.
const CHUNK: usize = 1 << 20;

/// The machine's limits for a run, in MB/s (10^6 bytes per second).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Writing fresh pages into a file in tmpfs.
    pub tmpfs_write: f64,
    /// Copying bytes through one TLS session over loopback, both ends in this process.
    pub tls_copy: f64,
}

fn mb_per_s(bytes: usize, started: Instant) -> f64 {
    bytes as f64 / 1e6 / started.elapsed().as_secs_f64().max(1e-9)
}

/// Writes `mib` MiB into a new file under `dir` (a tmpfs) and removes it.
pub fn tmpfs_write(dir: &Path, mib: usize) -> anyhow::Result<f64> {
    let file = tempfile::NamedTempFile::new_in(dir)?;
    let chunk = vec![0x5au8; CHUNK];
    let started = Instant::now();
    let mut f = file.as_file();
    for _ in 0..mib {
        f.write_all(&chunk)?;
    }
    Ok(mb_per_s(mib * CHUNK, started))
}

/// Copies `mib` MiB from a TLS client to a TLS server over 127.0.0.1 (TCP_NODELAY, one
/// session, as the daemons' page streams) and returns the rate the server received at.
pub async fn tls_copy(mib: usize) -> anyhow::Result<f64> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?.self_signed(&key)?;
    let cert_der = cert.der().clone();
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![cert_der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der)?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let total = mib * CHUNK;
    let receiver = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut tls = acceptor.accept(tcp).await?;
        let mut buf = vec![0u8; CHUNK];
        let mut got = 0;
        let mut started = None;
        while got < total {
            let n = tls.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "the copy ended after {got} of {total} bytes");
            started.get_or_insert_with(Instant::now);
            got += n;
        }
        Ok::<_, anyhow::Error>(started.map_or(0.0, |s| mb_per_s(got, s)))
    });
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(name, tcp)
        .await?;
    let chunk = vec![0xa5u8; CHUNK];
    for _ in 0..mib {
        tls.write_all(&chunk).await?;
    }
    tls.flush().await?;
    receiver.await.context("the TLS receiver")?
}

/// Both baselines: `mib` MiB each, tmpfs under `dir`.
pub async fn measure(dir: &Path, mib: usize) -> anyhow::Result<Limits> {
    let d = dir.to_owned();
    let tmpfs_write = tokio::task::spawn_blocking(move || tmpfs_write(&d, mib)).await??;
    Ok(Limits {
        tmpfs_write,
        tls_copy: tls_copy(mib).await?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn both_baselines_move_every_byte_at_a_positive_rate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let limits = measure(dir.path(), 8).await.expect("measure");
        assert!(limits.tmpfs_write > 0.0, "{limits:?}");
        assert!(limits.tls_copy > 0.0, "{limits:?}");
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("read").count(),
            0,
            "the write baseline leaves no file behind"
        );
    }
}
