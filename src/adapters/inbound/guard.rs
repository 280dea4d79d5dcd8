//! API load protection as a tower layer around the RPC service: a cap on
//! requests in flight (excess is shed at once with `unavailable`, never
//! queued, so a flood cannot pile up work behind slow VMM calls) and one
//! token bucket per server (excess is `resource_exhausted` with a
//! `Retry-After`). Both answer in the caller's protocol.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use connectrpc::ErrorCode;
use http::{HeaderValue, Request, Response, header};
use tokio::sync::Semaphore;
use tower::{Layer, Service, ServiceExt};

use super::reject::error_response;
use super::server::Body;

/// Load limits of the VM API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Most RPCs in flight at once; more are shed with `unavailable`.
    pub max_concurrent_requests: usize,
    /// Sustained RPCs per second for the whole server (burst of the same size); 0 disables.
    pub rate_limit_rps: u32,
}

impl Default for ApiLimits {
    /// Generous defaults: 512 concurrent RPCs and 1000 RPCs per second.
    fn default() -> Self {
        Self {
            max_concurrent_requests: 512,
            rate_limit_rps: 1000,
        }
    }
}

/// A token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` per second up to `burst`.
    pub fn new(rate: u32, burst: u32, now: Instant) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            state: Mutex::new((f64::from(burst.max(1)), now)),
        }
    }

    /// Takes one token at time `now`; false when the bucket is empty.
    pub fn try_take(&self, now: Instant) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(s.1).as_secs_f64();
        s.0 = (s.0 + elapsed * self.rate).min(self.burst);
        s.1 = s.1.max(now);
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Tower layer enforcing [`ApiLimits`]; the counters are shared by every clone.
#[derive(Debug, Clone)]
pub struct GuardLayer {
    limits: ApiLimits,
    permits: Arc<Semaphore>,
    bucket: Option<Arc<TokenBucket>>,
}

impl GuardLayer {
    /// A layer enforcing `limits`.
    pub fn new(limits: ApiLimits) -> Self {
        Self {
            limits,
            permits: Arc::new(Semaphore::new(limits.max_concurrent_requests.max(1))),
            bucket: (limits.rate_limit_rps > 0).then(|| {
                Arc::new(TokenBucket::new(
                    limits.rate_limit_rps,
                    limits.rate_limit_rps,
                    Instant::now(),
                ))
            }),
        }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Guard {
            inner,
            limits: self.limits,
            permits: Arc::clone(&self.permits),
            bucket: self.bucket.clone(),
        }
    }
}

/// The service produced by [`GuardLayer`].
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    limits: ApiLimits,
    permits: Arc<Semaphore>,
    bucket: Option<Arc<TokenBucket>>,
}

impl<S, B> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Never pending: excess load is answered, not queued.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(bucket) = &self.bucket
            && !bucket.try_take(Instant::now())
        {
            let mut r = error_response(
                req.headers(),
                ErrorCode::ResourceExhausted,
                &format!(
                    "rate limit of {} requests per second exceeded; retry later",
                    self.limits.rate_limit_rps
                ),
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Box::pin(std::future::ready(Ok(r)));
        }
        let Ok(permit) = Arc::clone(&self.permits).try_acquire_owned() else {
            let r = error_response(
                req.headers(),
                ErrorCode::Unavailable,
                &format!(
                    "too many requests in flight (limit {}); retry later",
                    self.limits.max_concurrent_requests
                ),
            );
            return Box::pin(std::future::ready(Ok(r)));
        };
        let inner = self.inner.clone();
        Box::pin(async move {
            let resp = inner.oneshot(req).await;
            drop(permit);
            resp
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_a_burst_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let b = TokenBucket::new(10, 5, t0);
        let taken = (0..8).filter(|_| b.try_take(t0)).count();
        assert_eq!(taken, 5, "burst");
        assert!(!b.try_take(t0 + Duration::from_millis(50)), "half a token");
        assert!(
            b.try_take(t0 + Duration::from_millis(110)),
            "one token after 0.1 s"
        );
        assert!(!b.try_take(t0 + Duration::from_millis(110)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 5);
    }

    #[test]
    fn bucket_tolerates_time_going_backwards() {
        let t0 = Instant::now() + Duration::from_secs(1);
        let b = TokenBucket::new(1, 1, t0);
        assert!(b.try_take(t0));
        assert!(!b.try_take(t0 - Duration::from_millis(500)));
    }

    fn slow_inner(
        gate: Arc<tokio::sync::Notify>,
    ) -> impl Service<
        Request<()>,
        Response = Response<Body>,
        Error = Infallible,
        Future = impl Future<Output = Result<Response<Body>, Infallible>> + Send,
    > + Clone
    + Send
    + 'static {
        use http_body_util::{BodyExt, Empty};
        tower::service_fn(move |_r: Request<()>| {
            let gate = Arc::clone(&gate);
            async move {
                gate.notified().await;
                Ok::<_, Infallible>(Response::new(Empty::new().boxed_unsync()))
            }
        })
    }

    fn req() -> Request<()> {
        Request::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(())
            .expect("valid")
    }

    #[tokio::test]
    async fn excess_concurrency_is_shed_with_unavailable() {
        let gate = Arc::new(tokio::sync::Notify::new());
        let svc = GuardLayer::new(ApiLimits {
            max_concurrent_requests: 2,
            rate_limit_rps: 0,
        })
        .layer(slow_inner(Arc::clone(&gate)));
        let a = tokio::spawn(svc.clone().oneshot(req()));
        let b = tokio::spawn(svc.clone().oneshot(req()));
        // Wait (bounded) until both hold a permit.
        let permits = Arc::clone(&svc.permits);
        let deadline = Instant::now() + Duration::from_secs(5);
        while permits.available_permits() > 0 {
            assert!(Instant::now() < deadline, "requests never started");
            tokio::task::yield_now().await;
        }
        let shed = svc.clone().oneshot(req()).await.expect("infallible");
        assert_eq!(shed.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        // Both are parked on the gate (the runtime is single-threaded, so they were polled).
        gate.notify_waiters();
        for h in [a, b] {
            let r = h.await.expect("joined").expect("infallible");
            assert_eq!(r.status(), http::StatusCode::OK);
        }
        assert_eq!(permits.available_permits(), 2, "permits returned");
    }

    #[tokio::test]
    async fn excess_rate_is_resource_exhausted_with_retry_after() {
        let gate = Arc::new(tokio::sync::Notify::new());
        gate.notify_one();
        let svc = GuardLayer::new(ApiLimits {
            max_concurrent_requests: 10,
            rate_limit_rps: 1,
        })
        .layer(slow_inner(Arc::clone(&gate)));
        let first = svc.clone().oneshot(req()).await.expect("infallible");
        assert_eq!(first.status(), http::StatusCode::OK);
        let second = svc.clone().oneshot(req()).await.expect("infallible");
        assert_eq!(second.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(second.headers()[header::RETRY_AFTER], "1");
    }
}
