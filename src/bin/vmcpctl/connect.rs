//! Building the project's own Connect client (`VmServiceClient`) from the
//! connection flags: plaintext HTTP, HTTPS with a private CA and optional
//! client certificate (rustls, the server's ring provider), or HTTP/2 over
//! the server's host-local Unix socket. The bearer token goes on every call.

use std::path::Path;
use std::sync::Arc;

use connectrpc::ConnectError;
use connectrpc::client::{
    BoxFuture, ClientBody, ClientConfig, ClientTransport, Http2Connection, HttpClient,
    SharedHttp2Connection,
};
use http::{HeaderValue, Uri};
use rustls::RootCertStore;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use vmcp::adapters::inbound::tls::{load_certs, provider};
use vmcp::proto::vmm::v1::VmServiceClient;

use crate::cli::Connection;
use crate::error::CtlError;

/// The client every subcommand uses.
pub type Client = VmServiceClient<Transport>;

/// Requests in flight on the Unix socket's one HTTP/2 connection (vmcpctl sends one at a time).
const UNIX_STREAMS: usize = 8;

/// Where the server is, parsed from `--address`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Http(Uri),
    Https(Uri),
    Unix(std::path::PathBuf),
}

fn parse_address(text: &str) -> Result<Address, CtlError> {
    let bad = |why: &str| {
        CtlError::Usage(format!(
            "--address {text:?} {why}: use http://HOST:PORT, https://HOST:PORT or unix:///PATH"
        ))
    };
    if let Some(path) = text.strip_prefix("unix://") {
        return if path.starts_with('/') {
            Ok(Address::Unix(path.into()))
        } else {
            Err(bad("needs an absolute socket path"))
        };
    }
    let with_scheme = if text.contains("://") {
        text.to_owned()
    } else {
        format!("http://{text}")
    };
    let uri: Uri = with_scheme.parse().map_err(|_| bad("is not an address"))?;
    if uri.host().is_none() {
        return Err(bad("has no host"));
    }
    match uri.scheme_str() {
        Some("http") => Ok(Address::Http(uri)),
        Some("https") => Ok(Address::Https(uri)),
        _ => Err(bad("has an unknown scheme")),
    }
}

/// The transports vmcpctl can use, behind one type so one `Client` type serves all.
#[derive(Clone)]
pub enum Transport {
    /// HTTP/1.1 or HTTP/2 over TCP, with or without TLS.
    Tcp(Box<HttpClient>),
    /// HTTP/2 over the server's Unix socket.
    Unix(SharedHttp2Connection),
}

impl ClientTransport for Transport {
    type ResponseBody = hyper::body::Incoming;
    type Error = ConnectError;

    fn send(
        &self,
        request: http::Request<ClientBody>,
    ) -> BoxFuture<'static, Result<http::Response<Self::ResponseBody>, Self::Error>> {
        match self {
            Transport::Tcp(c) => c.send(request),
            Transport::Unix(c) => c.send(request),
        }
    }
}

/// A client for the server the flags name, every call bounded by
/// `--request-timeout`. Reads the token and TLS files; nothing is sent yet.
pub fn client(conn: &Connection) -> Result<Client, CtlError> {
    build(conn, Some(conn.request_timeout))
}

/// A client for `watch`, whose one call lasts until interrupted: no default deadline.
pub fn streaming_client(conn: &Connection) -> Result<Client, CtlError> {
    build(conn, None)
}

fn build(conn: &Connection, timeout: Option<std::time::Duration>) -> Result<Client, CtlError> {
    let address = parse_address(&conn.address)?;
    let tls_flags = conn.tls_ca.is_some() || conn.tls_cert.is_some();
    let (transport, base) = match address {
        Address::Http(uri) if !tls_flags => {
            (Transport::Tcp(Box::new(HttpClient::plaintext())), uri)
        }
        Address::Unix(path) if !tls_flags => {
            let authority = Uri::from_static("http://localhost");
            let conn = Http2Connection::lazy_unix(path, authority.clone()).shared(UNIX_STREAMS);
            (Transport::Unix(conn), authority)
        }
        Address::Http(_) | Address::Unix(_) => {
            return Err(CtlError::Usage(
                "--tls-ca, --tls-cert and --tls-key need an https:// --address".to_owned(),
            ));
        }
        Address::Https(uri) => {
            let http = HttpClient::with_tls(tls_config(conn)?);
            (Transport::Tcp(Box::new(http)), uri)
        }
    };
    let mut config = ClientConfig::new(base);
    if let Some(timeout) = timeout {
        config = config.with_default_timeout(timeout);
    }
    if let Some(path) = &conn.token_file {
        config = config.with_default_header(http::header::AUTHORIZATION, bearer(path)?);
    }
    Ok(VmServiceClient::new(transport, config))
}

/// `Bearer <token>` from a token file, read the way the server reads its own:
/// surrounding whitespace trimmed, then printable ASCII only.
fn bearer(path: &Path) -> Result<HeaderValue, CtlError> {
    let raw = std::fs::read(path).map_err(|e| {
        CtlError::Usage(format!("--token-file {}: cannot read: {e}", path.display()))
    })?;
    let token = raw.trim_ascii();
    if token.is_empty() || !token.iter().all(u8::is_ascii_graphic) {
        return Err(CtlError::Usage(format!(
            "--token-file {}: must hold one token of printable ASCII characters",
            path.display()
        )));
    }
    let mut value = b"Bearer ".to_vec();
    value.extend_from_slice(token);
    let mut header = HeaderValue::from_bytes(&value).map_err(|_| {
        CtlError::Usage(format!(
            "--token-file {}: not a valid token",
            path.display()
        ))
    })?;
    header.set_sensitive(true);
    Ok(header)
}

/// rustls settings: the CA from --tls-ca, and the client identity for mutual TLS.
fn tls_config(conn: &Connection) -> Result<Arc<rustls::ClientConfig>, CtlError> {
    let usage = |e: &dyn std::fmt::Display| CtlError::Usage(e.to_string());
    let Some(ca) = &conn.tls_ca else {
        return Err(CtlError::Usage(
            "an https:// --address needs --tls-ca (the CA that signed the server's certificate)"
                .to_owned(),
        ));
    };
    let mut roots = RootCertStore::empty();
    for cert in load_certs("--tls-ca", ca).map_err(|e| usage(&e))? {
        roots
            .add(cert)
            .map_err(|e| usage(&format!("--tls-ca {}: {e}", ca.display())))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| usage(&e))?
        .with_root_certificates(roots);
    let config = match (&conn.tls_cert, &conn.tls_key) {
        (Some(cert), Some(key)) => {
            let chain = load_certs("--tls-cert", cert).map_err(|e| usage(&e))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                usage(&format!(
                    "--tls-key {}: cannot read a PEM key: {e}",
                    key.display()
                ))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| usage(&format!("--tls-cert/--tls-key: {e}")))?
        }
        // clap requires both or neither.
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("http://127.0.0.1:8080").ok(),
            Some(Address::Http(Uri::from_static("http://127.0.0.1:8080")))
        );
        assert_eq!(
            parse_address("vmcp.internal:8443").ok(),
            Some(Address::Http(Uri::from_static("http://vmcp.internal:8443")))
        );
        assert_eq!(
            parse_address("https://vmcp.internal:8443").ok(),
            Some(Address::Https(Uri::from_static(
                "https://vmcp.internal:8443"
            )))
        );
        assert_eq!(
            parse_address("unix:///run/vmcp/api.sock").ok(),
            Some(Address::Unix("/run/vmcp/api.sock".into()))
        );
        for bad in ["unix://api.sock", "ftp://h:1", "http://", "not an address"] {
            let err = parse_address(bad).expect_err(bad);
            assert_eq!(err.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn tokens_are_read_like_the_server_reads_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("token");
        std::fs::write(&path, "  s3cret\n").expect("write");
        assert_eq!(bearer(&path).expect("token"), "Bearer s3cret");
        for bad in ["", " \n", "two words", "tab\there"] {
            std::fs::write(&path, bad).expect("write");
            assert!(bearer(&path).is_err(), "{bad:?} must be refused");
        }
        assert!(bearer(&dir.path().join("missing")).is_err());
    }
}
