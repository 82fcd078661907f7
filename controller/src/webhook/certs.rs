//! The webhook's serving certificate when nobody provides one: a self-signed CA and a serving certificate for
//! `<service>.<namespace>.svc` (plus `localhost`/`127.0.0.1` for local runs), kept in a Secret (created once,
//! reused by every replica, re-issued 30 days before expiry), and the CA written into the
//! MutatingWebhookConfiguration's `caBundle` by server-side apply of only our own webhook entry.
//!
//! CA rotation: a new CA keeps the one it replaces in the Secret (`ca-previous.crt`) and the caBundle holds both
//! ([`CertBundle::ca_bundle_pem`]) until the old CA expires — so a replica still serving a certificate of the old CA
//! (it re-reads the Secret within the hour) stays trusted while the others serve the new chain.

use super::Error;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SanType,
};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Field manager of every write this module makes.
pub const FIELD_MANAGER: &str = "portcullis-controller";
/// Certificates are re-issued when they expire within this many days.
pub const ROTATE_BEFORE_DAYS: i64 = 30;
const CA_VALIDITY_DAYS: i64 = 3650;
const SERVING_VALIDITY_DAYS: i64 = 365;
const DAY: i64 = 86_400;

pub const KEY_TLS_CRT: &str = "tls.crt";
pub const KEY_TLS_KEY: &str = "tls.key";
pub const KEY_CA_CRT: &str = "ca.crt";
pub const KEY_CA_KEY: &str = "ca.key";
/// The CA a rotation replaced, still in the caBundle until it expires.
pub const KEY_CA_PREVIOUS: &str = "ca-previous.crt";

/// A serving certificate, its key and the CA that signed it, all PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct CertBundle {
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
    ca_key_pem: String,
    /// The CA this one replaced (rotation), kept in the caBundle until it expires.
    pub previous_ca_pem: Option<String>,
}

impl CertBundle {
    /// What the caBundle must hold: the CA, then the previous one while it is still valid at `now_unix`.
    pub fn ca_bundle_pem(&self, now_unix: i64) -> String {
        match &self.previous_ca_pem {
            Some(prev) if inspect(prev).is_ok_and(|i| i.not_after_unix > now_unix) => {
                format!("{}\n{}", self.ca_pem.trim_end(), prev.trim_end()) + "\n"
            }
            _ => self.ca_pem.clone(),
        }
    }
}

impl std::fmt::Debug for CertBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertBundle").field("cert_pem", &self.cert_pem).field("ca_pem", &self.ca_pem).finish()
    }
}

/// DNS names the serving certificate must carry for `service` in `namespace`.
pub fn dns_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_string(),
        "localhost".to_string(),
    ]
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Sets `not_before` (a day ago, for clock skew) and `not_after` (`days` from now), at day granularity.
fn validity(params: &mut CertificateParams, days: i64) -> Result<(), Error> {
    let ymd = |t: i64| -> Result<_, Error> {
        let d = jiff::Timestamp::from_second(t).map_err(|e| Error::Cert(e.to_string()))?;
        let d = jiff::tz::Offset::UTC.to_datetime(d);
        Ok(rcgen::date_time_ymd(i32::from(d.year()), d.month() as u8, d.day() as u8))
    };
    params.not_before = ymd(now() - DAY)?;
    params.not_after = ymd(now() + days * DAY)?;
    Ok(())
}

fn cert_err(what: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Cert(format!("{what}: {e}"))
}

/// A fresh self-signed CA: `(cert_pem, key_pem)`.
pub fn generate_ca(common_name: &str) -> Result<(String, String), Error> {
    let key = KeyPair::generate().map_err(cert_err("generating the CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err("CA parameters"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    validity(&mut params, CA_VALIDITY_DAYS)?;
    let cert = params.self_signed(&key).map_err(cert_err("self-signing the CA"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A serving certificate for `dns` plus 127.0.0.1 and ::1, signed by the given CA: `(cert_pem, key_pem)`.
pub fn issue_serving(ca_pem: &str, ca_key_pem: &str, dns: &[String]) -> Result<(String, String), Error> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(cert_err("reading the CA key"))?;
    let issuer = Issuer::from_ca_cert_pem(ca_pem, ca_key).map_err(cert_err("reading the CA certificate"))?;
    let key = KeyPair::generate().map_err(cert_err("generating the serving key"))?;
    let mut params = CertificateParams::new(dns.to_vec()).map_err(cert_err("serving certificate parameters"))?;
    params.distinguished_name.push(DnType::CommonName, dns.first().map(String::as_str).unwrap_or("portcullis-webhook"));
    params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    params.subject_alt_names.push(SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    validity(&mut params, SERVING_VALIDITY_DAYS)?;
    let cert = params.signed_by(&key, &issuer).map_err(cert_err("signing the serving certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Facts read back from a PEM certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub not_after_unix: i64,
    pub dns_names: Vec<String>,
}

pub fn inspect(cert_pem: &str) -> Result<CertInfo, Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|e| Error::Cert(format!("certificate is not PEM: {e}")))?;
    let cert = pem.parse_x509().map_err(|e| Error::Cert(format!("certificate does not parse: {e}")))?;
    let mut dns_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                dns_names.push(d.to_string());
            }
        }
    }
    Ok(CertInfo { not_after_unix: cert.validity().not_after.timestamp(), dns_names })
}

/// Whether `cert_pem` is unusable at `now_unix`: unparseable, or expiring within [`ROTATE_BEFORE_DAYS`].
pub fn needs_rotation(cert_pem: &str, now_unix: i64) -> bool {
    inspect(cert_pem).map(|i| i.not_after_unix - now_unix < ROTATE_BEFORE_DAYS * DAY).unwrap_or(true)
}

/// Decides, from what a Secret holds, the bundle to use: reuse it, re-issue the serving certificate from the
/// existing CA, or start over with a new CA. Pure but for key generation. Returns `None` when `current` is reusable.
pub fn plan(current: Option<&CertBundle>, dns: &[String], now_unix: i64) -> Result<Option<CertBundle>, Error> {
    if let Some(c) = current {
        let ca_ok = !needs_rotation(&c.ca_pem, now_unix) && KeyPair::from_pem(&c.ca_key_pem).is_ok();
        if ca_ok {
            let serving_ok = !needs_rotation(&c.cert_pem, now_unix)
                && inspect(&c.cert_pem).is_ok_and(|i| dns.iter().all(|d| i.dns_names.contains(d)))
                && KeyPair::from_pem(&c.key_pem).is_ok();
            if serving_ok {
                return Ok(None);
            }
            let (cert_pem, key_pem) = issue_serving(&c.ca_pem, &c.ca_key_pem, dns)?;
            return Ok(Some(CertBundle {
                cert_pem,
                key_pem,
                ca_pem: c.ca_pem.clone(),
                ca_key_pem: c.ca_key_pem.clone(),
                previous_ca_pem: c.previous_ca_pem.clone(),
            }));
        }
    }
    let (ca_pem, ca_key_pem) = generate_ca("portcullis-webhook-ca")?;
    let (cert_pem, key_pem) = issue_serving(&ca_pem, &ca_key_pem, dns)?;
    // The replaced CA, if it is still a certificate that trusts something (replicas may serve its chain a while).
    let previous_ca_pem =
        current.map(|c| c.ca_pem.clone()).filter(|p| inspect(p).is_ok_and(|i| i.not_after_unix > now_unix));
    Ok(Some(CertBundle { cert_pem, key_pem, ca_pem, ca_key_pem, previous_ca_pem }))
}

fn from_secret(s: &Secret) -> Option<CertBundle> {
    let data = s.data.as_ref()?;
    let get = |k: &str| data.get(k).and_then(|b| String::from_utf8(b.0.clone()).ok());
    Some(CertBundle {
        cert_pem: get(KEY_TLS_CRT)?,
        key_pem: get(KEY_TLS_KEY)?,
        ca_pem: get(KEY_CA_CRT)?,
        ca_key_pem: get(KEY_CA_KEY)?,
        previous_ca_pem: get(KEY_CA_PREVIOUS),
    })
}

fn to_data(b: &CertBundle) -> BTreeMap<String, ByteString> {
    [(KEY_TLS_CRT, &b.cert_pem), (KEY_TLS_KEY, &b.key_pem), (KEY_CA_CRT, &b.ca_pem), (KEY_CA_KEY, &b.ca_key_pem)]
        .into_iter()
        .chain(b.previous_ca_pem.as_ref().map(|p| (KEY_CA_PREVIOUS, p)))
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect()
}

/// Returns the bundle kept in Secret `namespace/secret_name`, creating or rotating it as needed. Safe to run from
/// several replicas at once: creation and replacement are optimistic (create / resourceVersion), and the loser of
/// a race reads the winner's bundle.
pub async fn ensure_secret(
    client: &kube::Client,
    namespace: &str,
    secret_name: &str,
    service: &str,
) -> Result<CertBundle, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let dns = dns_names(service, namespace);
    let what = || format!("Secret {namespace}/{secret_name}");
    for _ in 0..5 {
        let existing = api.get_opt(secret_name).await.map_err(|e| Error::Kube(what(), e))?;
        let current = existing.as_ref().and_then(from_secret);
        let Some(next) = plan(current.as_ref(), &dns, now())? else {
            return Ok(current.expect("plan reuses only an existing bundle"));
        };
        let result = match existing {
            None => {
                let s = Secret {
                    metadata: ObjectMeta {
                        name: Some(secret_name.into()),
                        labels: Some([("app.kubernetes.io/managed-by".into(), FIELD_MANAGER.into())].into()),
                        ..Default::default()
                    },
                    type_: Some("kubernetes.io/tls".into()),
                    data: Some(to_data(&next)),
                    ..Default::default()
                };
                api.create(&PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() }, &s).await
            }
            Some(mut s) => {
                tracing::info!(secret = %what(), "rotating the webhook serving certificate");
                s.data = Some(to_data(&next));
                s.metadata.managed_fields = None;
                api.replace(
                    secret_name,
                    &PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() },
                    &s,
                )
                .await
            }
        };
        match result {
            Ok(_) => return Ok(next),
            Err(kube::Error::Api(e)) if e.code == 409 => continue, // another replica won; use its bundle
            Err(e) => return Err(Error::Kube(what(), e)),
        }
    }
    Err(Error::Cert(format!("{}: kept conflicting with concurrent writers", what())))
}

/// The `clientConfig.caBundle` of webhook `webhook_name` in MutatingWebhookConfiguration `config_name` as it is
/// now (`None`: the configuration or the entry is missing; `Some("")`: no bundle).
pub async fn live_ca_bundle(
    client: &kube::Client,
    config_name: &str,
    webhook_name: &str,
) -> Result<Option<String>, Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = api
        .get_opt(config_name)
        .await
        .map_err(|e| Error::Kube(format!("MutatingWebhookConfiguration {config_name}"), e))?;
    Ok(config
        .and_then(|c| c.webhooks?.into_iter().find(|w| w.name == webhook_name))
        .map(|w| w.client_config.ca_bundle.map(|b| String::from_utf8_lossy(&b.0).into_owned()).unwrap_or_default()))
}

/// Writes `ca_pem` into `clientConfig.caBundle` of webhook `webhook_name` in MutatingWebhookConfiguration
/// `config_name`, by server-side apply of that one list entry (`webhooks` is a map keyed by name).
pub async fn patch_ca_bundle(
    client: &kube::Client,
    config_name: &str,
    webhook_name: &str,
    ca_pem: &str,
) -> Result<(), Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let patch = serde_json::json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": { "name": config_name },
        "webhooks": [{ "name": webhook_name, "clientConfig": { "caBundle": ByteString(ca_pem.as_bytes().to_vec()) } }],
    });
    api.patch(config_name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map_err(|e| Error::Kube(format!("MutatingWebhookConfiguration {config_name} (webhook {webhook_name})"), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_bundle_has_the_service_names_and_sane_validity() {
        let dns = dns_names("portcullis-webhook", "portcullis-system");
        let b = plan(None, &dns, now()).unwrap().expect("a new bundle");
        let info = inspect(&b.cert_pem).unwrap();
        assert!(info.dns_names.contains(&"portcullis-webhook.portcullis-system.svc".to_string()), "{info:?}");
        let days = (info.not_after_unix - now()) / DAY;
        assert!((360..=366).contains(&days), "serving cert valid for {days} days");
        assert!(!needs_rotation(&b.cert_pem, now()));
        assert!(!needs_rotation(&b.ca_pem, now()));
    }

    #[test]
    fn reuses_a_valid_bundle_and_reissues_near_expiry_from_the_same_ca() {
        let dns = dns_names("s", "ns");
        let b = plan(None, &dns, now()).unwrap().unwrap();
        assert_eq!(plan(Some(&b), &dns, now()).unwrap(), None, "a fresh bundle is reused");
        // 340 days later the serving certificate expires within 30 days; the CA (10 years) does not.
        let later = now() + 340 * DAY;
        let r = plan(Some(&b), &dns, later).unwrap().expect("re-issued");
        assert_eq!(r.ca_pem, b.ca_pem, "the CA is kept, so the caBundle stays valid");
        assert_ne!(r.cert_pem, b.cert_pem);
        // Near the CA's expiry everything is replaced.
        let r = plan(Some(&b), &dns, now() + 3640 * DAY).unwrap().expect("replaced");
        assert_ne!(r.ca_pem, b.ca_pem);
    }

    #[test]
    fn reissues_when_the_service_name_changes_or_data_is_garbage() {
        let b = plan(None, &dns_names("a", "ns"), now()).unwrap().unwrap();
        let r = plan(Some(&b), &dns_names("b", "ns"), now()).unwrap().expect("re-issued for the new name");
        assert_eq!(r.ca_pem, b.ca_pem);
        let garbage = CertBundle { cert_pem: "x".into(), ..b.clone() };
        assert!(plan(Some(&garbage), &dns_names("a", "ns"), now()).unwrap().is_some());
        let bad_ca = CertBundle { ca_pem: "x".into(), ..b };
        let r = plan(Some(&bad_ca), &dns_names("a", "ns"), now()).unwrap().unwrap();
        assert_ne!(r.ca_pem, "x");
    }

    /// A new CA keeps the one it replaces in the bundle (both verify) until that one expires; a serving
    /// certificate re-issued from the same CA keeps the bundle as it is.
    #[test]
    fn ca_rotation_publishes_old_and_new_until_the_old_expires() {
        let dns = dns_names("s", "ns");
        let first = plan(None, &dns, now()).unwrap().unwrap();
        assert_eq!(first.ca_bundle_pem(now()), first.ca_pem, "a first CA is alone");
        let rotated = plan(Some(&first), &dns, now() + 3640 * DAY).unwrap().expect("a new CA");
        assert_eq!(rotated.previous_ca_pem.as_deref(), Some(first.ca_pem.as_str()));
        let bundle = rotated.ca_bundle_pem(now() + 3640 * DAY);
        let certs: Vec<_> =
            x509_parser::pem::Pem::iter_from_buffer(bundle.as_bytes()).collect::<Result<_, _>>().unwrap();
        assert_eq!(certs.len(), 2, "new and old CA: {bundle}");
        assert!(bundle.starts_with(rotated.ca_pem.trim_end()));
        assert!(bundle.contains(first.ca_pem.trim_end()));
        // Past the old CA's expiry only the new one is published.
        assert_eq!(rotated.ca_bundle_pem(now() + 3660 * DAY), rotated.ca_pem);
        // Through the Secret's data and back.
        let s = Secret { data: Some(to_data(&rotated)), ..Default::default() };
        assert_eq!(from_secret(&s).unwrap(), rotated);
        // A serving re-issue keeps the previous CA in place.
        let reissued = plan(Some(&rotated), &dns_names("other", "ns"), now()).unwrap().unwrap();
        assert_eq!(reissued.previous_ca_pem, rotated.previous_ca_pem);
    }

    #[test]
    fn debug_never_prints_private_keys() {
        let b = plan(None, &dns_names("a", "ns"), now()).unwrap().unwrap();
        assert!(!format!("{b:?}").contains("PRIVATE KEY"));
    }
}
