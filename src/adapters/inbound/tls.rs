//! TLS for the API port (rustls with the ring provider): the server's
//! certificate chain and key from PEM files, ALPN `h2` and `http/1.1`, and,
//! when a client CA is configured, verification of client certificates
//! against it. A connection without a client certificate is still accepted
//! so the health endpoints stay reachable; the auth layer then refuses its
//! VM API calls as `unauthenticated`. A certificate that does not verify
//! ends the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ServerConfig, crypto::CryptoProvider};

/// The default of how long a client may take to finish the TLS handshake
/// (`UNKEY_VMCP_TLS_HANDSHAKE_TIMEOUT_SECONDS`).
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the TLS configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}: {source}")]
    Pem {
        /// Which file (certificate chain, private key, client CA).
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file held no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificates {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificates, the key, or the CA.
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[source] rustls::Error),
    /// The client CA cannot be used to verify clients.
    #[error("cannot verify clients with the CA in {path}: {source}")]
    ClientCa {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// The crypto provider VMCP uses (ring), independent of any process default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Builds the server's TLS configuration.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = load_certs("the certificate chain", cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem {
        what: "the private key",
        path: key.to_owned(),
        source,
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in load_certs("the client CA", ca)? {
                roots.add(c).map_err(TlsError::Rustls)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|source| TlsError::ClientCa {
                    path: ca.to_owned(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, data: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, data).expect("write");
        p
    }

    #[test]
    fn builds_with_and_without_a_client_ca_and_reports_bad_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = rcgen::generate_simple_self_signed(vec!["ca".into()]).expect("ca");
        let srv = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("cert");
        let cert = write(dir.path(), "cert.pem", &srv.cert.pem());
        let key = write(dir.path(), "key.pem", &srv.signing_key.serialize_pem());
        let ca_pem = write(dir.path(), "ca.pem", &ca.cert.pem());

        let plain = server_config(&cert, &key, None).expect("server-only TLS");
        assert_eq!(
            plain.alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
        server_config(&cert, &key, Some(&ca_pem)).expect("mutual TLS");

        let empty = write(dir.path(), "empty.pem", "");
        assert!(matches!(
            server_config(&empty, &key, None),
            Err(TlsError::NoCertificates { .. })
        ));
        assert!(matches!(
            server_config(&cert, &empty, None),
            Err(TlsError::Pem { .. })
        ));
        assert!(matches!(
            server_config(&cert, &dir.path().join("missing"), None),
            Err(TlsError::Pem { .. })
        ));
        // A key that does not belong to the certificate is refused.
        let other = rcgen::generate_simple_self_signed(vec!["x".into()]).expect("cert");
        let other_key = write(dir.path(), "other.pem", &other.signing_key.serialize_pem());
        assert!(matches!(
            server_config(&cert, &other_key, None),
            Err(TlsError::Rustls(_))
        ));
        assert!(matches!(
            server_config(&cert, &key, Some(&empty)),
            Err(TlsError::NoCertificates { .. })
        ));
    }
}
