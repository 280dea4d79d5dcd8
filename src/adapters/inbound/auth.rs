//! Authentication of VM API calls, as a tower layer around the RPC service
//! only (the health endpoints are routed before it and stay open). Two
//! credentials, each required when configured: a bearer token compared in
//! constant time, and a client certificate verified by the TLS acceptor
//! against the configured CA (the acceptor marks such connections with
//! [`ClientCertVerified`]). Failures are `unauthenticated` in the caller's
//! protocol; neither the expected nor the presented token ever appears in
//! an error, a log line or a `Debug` output.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use connectrpc::ErrorCode;
use http::{Request, Response, header};
use subtle::ConstantTimeEq;
use tower::{Layer, Service, ServiceExt};

use super::reject::error_response;
use super::server::Body;

/// Request extension set by the TLS acceptor when the peer presented a
/// client certificate that verified against the configured client CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertVerified;

/// The shared secret callers present as `Authorization: Bearer <token>`.
#[derive(Clone)]
pub struct BearerToken(Arc<[u8]>);

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BearerToken(<redacted>)")
    }
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file holds nothing but whitespace.
    #[error("the token file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The token has characters that cannot travel in an HTTP header.
    #[error(
        "the token in {path} must be printable ASCII without spaces (it is sent in an HTTP header)"
    )]
    Malformed {
        /// The file.
        path: PathBuf,
    },
}

impl BearerToken {
    /// Reads the token from `path`, trimming surrounding whitespace (a trailing newline).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let raw = std::fs::read(path).map_err(|source| TokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_bytes(&raw).map_err(|e| match e {
            TokenShape::Empty => TokenError::Empty {
                path: path.to_owned(),
            },
            TokenShape::Malformed => TokenError::Malformed {
                path: path.to_owned(),
            },
        })
    }

    fn from_bytes(raw: &[u8]) -> Result<Self, TokenShape> {
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(TokenShape::Empty);
        }
        if !token.iter().all(|b| b.is_ascii_graphic()) {
            return Err(TokenShape::Malformed);
        }
        Ok(Self(Arc::from(token)))
    }

    /// Length of the token in bytes (for start-up warnings about weak tokens).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the token is empty (never true for a loaded token).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Constant-time comparison (only the length can be learnt from timing).
    fn matches(&self, presented: &[u8]) -> bool {
        bool::from(self.0.as_ref().ct_eq(presented))
    }
}

enum TokenShape {
    Empty,
    Malformed,
}

/// Which credentials a VM API call must carry.
#[derive(Debug, Clone, Default)]
pub struct AuthPolicy {
    /// Required bearer token, if any.
    pub token: Option<BearerToken>,
    /// Whether a verified client certificate is required.
    pub require_client_cert: bool,
}

impl AuthPolicy {
    /// No credentials required (the seed's behaviour).
    pub fn open() -> Self {
        Self::default()
    }

    /// Whether any credential is required.
    pub fn is_enforced(&self) -> bool {
        self.token.is_some() || self.require_client_cert
    }

    /// Checks a request's credentials; the error is the message sent to the caller.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), &'static str> {
        if self.require_client_cert && req.extensions().get::<ClientCertVerified>().is_none() {
            return Err("a client certificate signed by the configured CA is required");
        }
        let Some(token) = &self.token else {
            return Ok(());
        };
        let Some(value) = req.headers().get(header::AUTHORIZATION) else {
            return Err("missing credentials: send Authorization: Bearer <token>");
        };
        let value = value.as_bytes();
        let presented = match value.split_at_checked(7) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest.trim_ascii(),
            _ => return Err("the Authorization header must use the Bearer scheme"),
        };
        if token.matches(presented) {
            Ok(())
        } else {
            Err("invalid bearer token")
        }
    }
}

/// Tower layer enforcing an [`AuthPolicy`].
#[derive(Debug, Clone)]
pub struct AuthLayer {
    policy: Arc<AuthPolicy>,
}

impl AuthLayer {
    /// A layer enforcing `policy`.
    pub fn new(policy: AuthPolicy) -> Self {
        Self {
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth {
            inner,
            policy: Arc::clone(&self.policy),
        }
    }
}

/// The service produced by [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct Auth<S> {
    inner: S,
    policy: Arc<AuthPolicy>,
}

impl<S, B> Service<Request<B>> for Auth<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Readiness of the inner service is awaited per call on a clone (see `call`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Err(reason) = self.policy.check(&req) {
            // Debug, not warn: unauthenticated floods must not become log floods; the
            // telemetry layer around this one counts them by code.
            tracing::debug!(
                path = %req.uri().path(),
                reason,
                "rejected an unauthenticated VM API call"
            );
            let resp = error_response(req.headers(), ErrorCode::Unauthenticated, reason);
            return Box::pin(std::future::ready(Ok(resp)));
        }
        // The credential has done its job; nothing further in must see it.
        req.headers_mut().remove(header::AUTHORIZATION);
        let inner = self.inner.clone();
        Box::pin(inner.oneshot(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(s: &str) -> BearerToken {
        BearerToken::from_bytes(s.as_bytes()).unwrap_or_else(|_| panic!("valid token {s:?}"))
    }

    fn req(auth: Option<&str>, cert: bool) -> Request<()> {
        let mut r = Request::builder().uri("/vmm.v1.VmService/ListVms");
        if let Some(a) = auth {
            r = r.header(header::AUTHORIZATION, a);
        }
        let mut r = r.body(()).expect("valid request");
        if cert {
            r.extensions_mut().insert(ClientCertVerified);
        }
        r
    }

    #[test]
    fn token_files_are_trimmed_and_checked() {
        assert_eq!(&*token("  s3cret\n").0, b"s3cret");
        assert!(matches!(
            BearerToken::from_bytes(b" \n\t"),
            Err(TokenShape::Empty)
        ));
        assert!(matches!(
            BearerToken::from_bytes(b"two words"),
            Err(TokenShape::Malformed)
        ));
        assert!(matches!(
            BearerToken::from_bytes("tökén".as_bytes()),
            Err(TokenShape::Malformed)
        ));
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").expect("write");
        assert!(matches!(
            BearerToken::from_file(&empty),
            Err(TokenError::Empty { .. })
        ));
        assert!(matches!(
            BearerToken::from_file(&dir.path().join("missing")),
            Err(TokenError::Read { .. })
        ));
        let good = dir.path().join("good");
        std::fs::write(&good, "abc123\n").expect("write");
        assert_eq!(BearerToken::from_file(&good).expect("loads").len(), 6);
    }

    #[test]
    fn debug_never_shows_the_token() {
        let t = token("hunter2-very-secret");
        let policy = AuthPolicy {
            token: Some(t.clone()),
            require_client_cert: false,
        };
        for shown in [format!("{t:?}"), format!("{policy:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
        }
    }

    #[test]
    fn token_policy() {
        let p = AuthPolicy {
            token: Some(token("s3cret")),
            require_client_cert: false,
        };
        assert_eq!(p.check(&req(Some("Bearer s3cret"), false)), Ok(()));
        assert_eq!(p.check(&req(Some("bearer s3cret"), false)), Ok(()));
        for (auth, why) in [
            (None, "missing"),
            (Some("Bearer s3cre"), "invalid"),
            (Some("Bearer s3cret2"), "invalid"),
            (Some("Bearer "), "invalid"),
            (Some("Basic czNjcmV0"), "Bearer scheme"),
            (Some("s3cret"), "Bearer scheme"),
        ] {
            let err = p.check(&req(auth, false)).expect_err("rejected");
            assert!(err.contains(why), "{auth:?}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
    }

    #[test]
    fn client_cert_policy_and_both() {
        let p = AuthPolicy {
            token: None,
            require_client_cert: true,
        };
        assert!(p.check(&req(None, false)).is_err());
        assert_eq!(p.check(&req(None, true)), Ok(()));
        let both = AuthPolicy {
            token: Some(token("t")),
            require_client_cert: true,
        };
        assert!(both.check(&req(Some("Bearer t"), false)).is_err());
        assert!(both.check(&req(None, true)).is_err());
        assert_eq!(both.check(&req(Some("Bearer t"), true)), Ok(()));
        assert_eq!(AuthPolicy::open().check(&req(None, false)), Ok(()));
        assert!(!AuthPolicy::open().is_enforced());
        assert!(both.is_enforced());
    }

    #[tokio::test]
    async fn the_layer_answers_unauthenticated_and_strips_the_header() {
        use http_body_util::{BodyExt, Full};
        let seen = Arc::new(std::sync::Mutex::new(None::<bool>));
        let seen2 = Arc::clone(&seen);
        let inner = tower::service_fn(move |r: Request<()>| {
            *seen2.lock().expect("lock") = Some(r.headers().contains_key(header::AUTHORIZATION));
            async {
                Ok::<_, Infallible>(Response::new(
                    Full::new(bytes::Bytes::from_static(b"ok")).boxed_unsync(),
                ))
            }
        });
        let svc = AuthLayer::new(AuthPolicy {
            token: Some(token("s3cret")),
            require_client_cert: false,
        })
        .layer(inner);
        let denied = svc
            .clone()
            .oneshot(req(Some("Bearer nope"), false))
            .await
            .expect("infallible");
        assert_eq!(denied.status(), http::StatusCode::UNAUTHORIZED);
        assert_eq!(*seen.lock().expect("lock"), None, "inner not called");
        let ok = svc
            .oneshot(req(Some("Bearer s3cret"), false))
            .await
            .expect("infallible");
        assert_eq!(ok.status(), http::StatusCode::OK);
        assert_eq!(*seen.lock().expect("lock"), Some(false), "header stripped");
        let body = ok.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"ok");
    }
}
