//! Client-certificate identities: what a verified leaf certificate says about its holder, parsed once per
//! connection, and matched against the table's [`CertIdentity`] index.

use portcullis_table::CertIdentity;
use sha2::{Digest, Sha256};

/// The identities of one verified client certificate, in the table's canonical form (see
/// [`CertIdentity::normalized`]): every subject CN, every SAN DNS name (lowercased), every SAN URI, and the
/// SHA-256 of the DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    pub identities: Vec<CertIdentity>,
}

impl PeerCert {
    /// Parses a DER certificate (already verified by the TLS layer).
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
        let mut identities = Vec::new();
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                identities.push(CertIdentity::Subject(s.to_string()));
            }
        }
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => identities.push(CertIdentity::SanDns(d.to_ascii_lowercase())),
                    GeneralName::URI(u) => identities.push(CertIdentity::SanUri(u.to_string())),
                    _ => {}
                }
            }
        }
        identities.push(CertIdentity::Sha256(hex(&Sha256::digest(der))));
        identities.sort();
        identities.dedup();
        Ok(Self { identities })
    }
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(H[(x >> 4) as usize] as char);
        s.push(H[(x & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    #[test]
    fn identities_of_a_certificate() {
        let mut p = CertificateParams::new(vec!["Svc.Example".to_string()]).unwrap();
        p.subject_alt_names.push(SanType::URI("spiffe://td/ns/a".try_into().unwrap()));
        p.distinguished_name.push(DnType::CommonName, "client a");
        p.distinguished_name.push(DnType::OrganizationName, "acme");
        let cert = p.self_signed(&KeyPair::generate().unwrap()).unwrap();
        let pc = PeerCert::from_der(cert.der()).unwrap();
        assert!(pc.identities.contains(&CertIdentity::Subject("client a".into())));
        assert!(pc.identities.contains(&CertIdentity::SanDns("svc.example".into())));
        assert!(pc.identities.contains(&CertIdentity::SanUri("spiffe://td/ns/a".into())));
        let fp = hex(&Sha256::digest(cert.der()));
        assert_eq!(fp.len(), 64);
        assert!(pc.identities.contains(&CertIdentity::Sha256(fp)));
        assert_eq!(pc.identities.len(), 4);
        assert!(PeerCert::from_der(b"not a certificate").is_err());
    }
}
