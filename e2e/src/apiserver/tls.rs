//! A self-signed serving certificate for the test API server.

/// PEM certificate and key.
pub struct Certs {
    /// Certificate (also the CA clients trust).
    pub cert_pem: String,
    /// Private key.
    pub key_pem: String,
}

impl Certs {
    /// A certificate valid for `sans` (DNS names or IP addresses).
    pub fn generate(sans: &[String]) -> anyhow::Result<Self> {
        let mut sans = sans.to_vec();
        sans.sort();
        sans.dedup();
        let ck = rcgen::generate_simple_self_signed(sans)?;
        Ok(Self {
            cert_pem: ck.cert.pem(),
            key_pem: ck.signing_key.serialize_pem(),
        })
    }
}
