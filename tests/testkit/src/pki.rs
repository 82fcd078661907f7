//! Certificates for the local control plane: a CA, the API server's serving certificate (IP SAN 127.0.0.1) and
//! the service-account signing key pair. Also issues serving certificates for webhooks started by tests.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::net::{IpAddr, Ipv4Addr};

pub struct Pki {
    pub ca_pem: String,
    ca_issuer: Issuer<'static, KeyPair>,
    pub sa_private_pem: String,
    pub sa_public_pem: String,
}

/// A PEM certificate and its PEM (PKCS#8) private key.
pub struct ServingCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Pki {
    pub fn generate() -> Result<Self> {
        let ca_key = KeyPair::generate().context("generating the CA key")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "portcullis-local-ca");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_cert = params.self_signed(&ca_key).context("self-signing the CA")?;
        let sa_key = KeyPair::generate().context("generating the service-account key")?;
        Ok(Self {
            ca_pem: ca_cert.pem(),
            ca_issuer: Issuer::new(params, ca_key),
            sa_private_pem: sa_key.serialize_pem(),
            sa_public_pem: sa_key.public_key_pem(),
        })
    }

    /// A serving certificate for `127.0.0.1`, `::1` and `localhost` (plus `extra_dns`), signed by the local CA.
    pub fn serving_cert(&self, common_name: &str, extra_dns: &[&str]) -> Result<ServingCert> {
        let key = KeyPair::generate()?;
        let mut dns = vec!["localhost".to_string()];
        dns.extend(extra_dns.iter().map(|s| s.to_string()));
        let mut params = CertificateParams::new(dns)?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.subject_alt_names.push(SanType::IpAddress("::1".parse().expect("valid")));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.ca_issuer).context("signing a serving certificate")?;
        Ok(ServingCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}
