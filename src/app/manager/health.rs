//! Backend health: whether the VMM binary runs and KVM opens, checked at
//! most every few seconds and cached between checks.

use std::time::{Duration, Instant};

use crate::ports::{BackendHealth, Hypervisor, Telemetry};

use crate::app::owner::timed_call;

/// How long a backend check result is trusted.
pub const CHECK_TTL: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Cached {
    at: Option<Instant>,
    result: Result<String, String>,
}

impl Cached {
    /// Whether the answer is younger than [`CHECK_TTL`].
    fn is_fresh(&self) -> bool {
        self.at.is_some_and(|at| at.elapsed() < CHECK_TTL)
    }
}

/// The cached result of the backend check. Reads of a fresh answer take a
/// shared lock only (every VM call asks); one caller at a time refreshes.
#[derive(Debug)]
pub struct BackendHealthCache {
    cached: std::sync::RwLock<Cached>,
    refresh: tokio::sync::Mutex<()>,
}

impl Default for BackendHealthCache {
    fn default() -> Self {
        Self {
            cached: std::sync::RwLock::new(Cached {
                at: None,
                result: Err("not checked yet".into()),
            }),
            refresh: tokio::sync::Mutex::new(()),
        }
    }
}

impl BackendHealthCache {
    /// The backend's health, re-checked when the cached answer is older than [`CHECK_TTL`].
    pub async fn get<H: Hypervisor>(
        &self,
        hypervisor: &H,
        telemetry: &dyn Telemetry,
        timeout: Duration,
    ) -> BackendHealth {
        let started = Instant::now();
        if let Some(result) = self.fresh() {
            return health(hypervisor, result, started);
        }
        let _refreshing = self.refresh.lock().await;
        // Another caller may have refreshed while this one waited.
        if let Some(result) = self.fresh() {
            return health(hypervisor, result, started);
        }
        let result = match timed_call(
            hypervisor.kind(),
            telemetry,
            "check",
            timeout,
            hypervisor.check(),
        )
        .await
        {
            Ok(c) => Ok(c.version),
            Err(e) => Err(e.to_string()),
        };
        {
            let mut cached = self.cached.write().unwrap_or_else(|p| p.into_inner());
            cached.result = result.clone();
            cached.at = Some(Instant::now());
        }
        health(hypervisor, result, started)
    }

    /// Whether a fresh cached answer says healthy: what every VM call asks,
    /// answered without copying the answer out.
    pub fn fresh_and_healthy(&self) -> bool {
        let cached = self.cached.read().unwrap_or_else(|p| p.into_inner());
        cached.result.is_ok() && cached.is_fresh()
    }

    fn fresh(&self) -> Option<Result<String, String>> {
        let cached = self.cached.read().unwrap_or_else(|p| p.into_inner());
        cached.is_fresh().then(|| cached.result.clone())
    }
}

fn health<H: Hypervisor>(
    hypervisor: &H,
    result: Result<String, String>,
    started: Instant,
) -> BackendHealth {
    BackendHealth {
        kind: hypervisor.kind().as_str(),
        healthy: result.is_ok(),
        version: result.clone().unwrap_or_default(),
        error: result.err().unwrap_or_default(),
        duration: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(at: Option<Instant>, result: Result<&str, &str>) -> BackendHealthCache {
        let c = BackendHealthCache::default();
        *c.cached.write().expect("lock") = Cached {
            at,
            result: result.map(str::to_owned).map_err(str::to_owned),
        };
        c
    }

    #[test]
    fn only_a_fresh_healthy_answer_skips_the_check() {
        assert!(
            !BackendHealthCache::default().fresh_and_healthy(),
            "never checked"
        );
        assert!(cache(Some(Instant::now()), Ok("v53")).fresh_and_healthy());
        assert!(!cache(Some(Instant::now()), Err("no kvm")).fresh_and_healthy());
        let old = Instant::now().checked_sub(CHECK_TTL + Duration::from_secs(1));
        assert!(old.is_some(), "the clock is far enough from its origin");
        assert!(!cache(old, Ok("v53")).fresh_and_healthy(), "stale");
    }
}
