//! TLS for the tests: a throw-away PKI made with rcgen at test time (a CA
//! that signs the server and a good client, a rogue CA that signs an
//! impostor), and a connectrpc `ClientTransport` that opens one rustls
//! connection per request, speaking HTTP/2 (gRPC) or HTTP/1.1 (Connect,
//! gRPC-Web) as asked, with or without a client certificate.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use connectrpc::Protocol;
use connectrpc::client::{ClientBody, ClientConfig, ClientTransport};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use vmcp::proto::vmm::v1::VmServiceClient;

use super::harness::Wire;

/// One certificate with its key, as DER.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl Identity {
    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

/// Files and identities of a test PKI.
pub struct Pki {
    _dir: tempfile::TempDir,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_ca: PathBuf,
    ca: CertificateDer<'static>,
    pub client: Identity,
    pub impostor: Identity,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("CA")
}

fn leaf(name: &str, issuer: &CertifiedIssuer<'static, KeyPair>) -> (String, String, Identity) {
    let key = KeyPair::generate().expect("key");
    let mut params = CertificateParams::new(vec![name.to_owned()]).expect("params");
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, issuer).expect("signed");
    let id = Identity {
        chain: vec![cert.der().clone(), issuer.der().clone()],
        key: key.serialize_der(),
    };
    (cert.pem(), key.serialize_pem(), id)
}

impl Pki {
    /// A fresh PKI written to a temporary directory.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rogue = ca("rogue CA");
        let ca = ca("vmcp test CA");
        let (server_pem, server_key_pem, _) = leaf("localhost", &ca);
        let (_, _, client) = leaf("deploy-controlplane", &ca);
        let (_, _, impostor) = leaf("deploy-controlplane", &rogue);
        let write = |name: &str, data: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, data).expect("write");
            p
        };
        Self {
            server_cert: write("server.pem", &format!("{server_pem}{}", ca.pem())),
            server_key: write("server.key", &server_key_pem),
            client_ca: write("ca.pem", &ca.pem()),
            ca: ca.der().clone(),
            client,
            impostor,
            _dir: dir,
        }
    }

    /// A client TLS config trusting the test CA, presenting `identity` if given.
    pub fn client_config(
        &self,
        identity: Option<&Identity>,
        h2: bool,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.clone()).expect("CA");
        let builder =
            rustls::ClientConfig::builder_with_provider(vmcp::adapters::inbound::tls::provider())
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots);
        let mut cfg = match identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key())
                .expect("client cert"),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![if h2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        Arc::new(cfg)
    }
}

/// Transport errors (TCP, TLS, HTTP) as one error type.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(String);

fn err(e: impl std::fmt::Display) -> TransportError {
    TransportError(e.to_string())
}

/// One TLS connection per request to a fixed address.
#[derive(Clone)]
pub struct TlsTransport {
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    h2: bool,
}

impl ClientTransport for TlsTransport {
    type ResponseBody = Incoming;
    type Error = TransportError;

    fn send(
        &self,
        request: http::Request<ClientBody>,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<Incoming>, TransportError>> + Send>>
    {
        let this = self.clone();
        Box::pin(async move {
            let tcp = TcpStream::connect(this.addr).await.map_err(err)?;
            let name = ServerName::try_from("localhost").map_err(err)?;
            let tls = TlsConnector::from(this.config)
                .connect(name, tcp)
                .await
                .map_err(err)?;
            let io = TokioIo::new(tls);
            if this.h2 {
                let (mut send, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(err)?;
                tokio::spawn(conn);
                send.send_request(request).await.map_err(err)
            } else {
                let (mut send, conn) = hyper::client::conn::http1::handshake(io)
                    .await
                    .map_err(err)?;
                tokio::spawn(conn);
                send.send_request(request).await.map_err(err)
            }
        })
    }
}

/// A VM API client over TLS speaking `wire`, presenting `identity` and `token` when given.
pub fn client(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&Identity>,
    token: Option<&str>,
    wire: Wire,
) -> VmServiceClient<TlsTransport> {
    let base = format!("https://localhost:{}", addr.port())
        .parse()
        .expect("uri");
    let config = match wire {
        Wire::ConnectJson => ClientConfig::new(base).json(),
        Wire::ConnectProto => ClientConfig::new(base).proto(),
        Wire::Grpc => ClientConfig::new(base).with_protocol(Protocol::Grpc),
        Wire::GrpcWeb => ClientConfig::new(base).with_protocol(Protocol::GrpcWeb),
    };
    let config = match token {
        Some(t) => config.with_default_header("authorization", format!("Bearer {t}")),
        None => config,
    };
    VmServiceClient::new(
        transport(addr, pki, identity, matches!(wire, Wire::Grpc)),
        config,
    )
}

/// A raw TLS transport (HTTP/2 when `h2`), presenting `identity` when given.
pub fn transport(
    addr: SocketAddr,
    pki: &Pki,
    identity: Option<&Identity>,
    h2: bool,
) -> TlsTransport {
    TlsTransport {
        addr,
        config: pki.client_config(identity, h2),
        h2,
    }
}
