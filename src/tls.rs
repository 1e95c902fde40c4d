//! TLS for IMAP and SMTP: rustls with the ring provider (lettre uses ring too; two
//! providers in one build make rustls panic), system roots plus an
//! optional private CA. Certificates and host names are always checked.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Builds a client config trusting the system roots and `ca_file`.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("bad certificate in {}: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("no certificate in ca_file {}", path.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("unusable certificate in {}: {e}", path.display()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What to change when a TLS handshake with `ep` failed, read from the
/// error's causes: the two mistakes a new user makes are the wrong
/// `security` for the port and a private CA the system does not know.
pub fn hint(e: &(dyn std::error::Error + 'static), ep: &crate::config::Endpoint) -> Option<String> {
    use crate::config::Security;
    let key = |k: &str| format!("{}.{k}", ep.section);
    let mut cur = Some(e);
    let mut text = String::new();
    while let Some(err) = cur {
        let inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|i| i as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), inner].into_iter().flatten() {
            if let Some(r) = candidate.downcast_ref::<rustls::Error>() {
                return rustls_hint(r, ep);
            }
            text.push_str(&candidate.to_string());
            text.push('\n');
        }
        cur = err.source();
    }
    // Errors that crossed a crate boundary as text (lettre's).
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        let want = if ep.security == Security::Tls {
            "starttls"
        } else {
            "tls"
        };
        return Some(format!(
            "the server speaks plain text on port {}: try {} = \"{want}\"",
            ep.port,
            key("security")
        ));
    }
    if text.contains("UnknownIssuer") || text.contains("invalid peer certificate") {
        return Some(format!(
            "the server's certificate is not signed by a CA this machine trusts: set {} to \
             the PEM file of the CA that signed it",
            key("ca_file")
        ));
    }
    None
}

fn rustls_hint(e: &rustls::Error, ep: &crate::config::Endpoint) -> Option<String> {
    use rustls::{CertificateError, InvalidMessage};
    let key = |k: &str| format!("{}.{k}", ep.section);
    match e {
        rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType) => Some(format!(
            "the server speaks plain text on port {}: try {} = \"starttls\"",
            ep.port,
            key("security")
        )),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        | rustls::Error::InvalidCertificate(CertificateError::BadSignature) => Some(format!(
            "the server's certificate is not signed by a CA this machine trusts: set {} to \
             the PEM file of the CA that signed it",
            key("ca_file")
        )),
        rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            Some(format!(
                "the server's certificate is not for {:?}: set {} to a name the certificate has",
                ep.host,
                key("host")
            ))
        }
        rustls::Error::InvalidCertificate(CertificateError::Expired)
        | rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. }) => Some(
            "the server's certificate has expired: its admin must renew it (or check this \
             machine's clock)"
                .to_string(),
        ),
        _ => None,
    }
}
