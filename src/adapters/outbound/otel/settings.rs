//! What the operator configures about telemetry, as one plain struct. The
//! application's environment loader fills it from the `UNKEY_VMCP_OTEL_*`
//! variables; [`OtelSettings::validate`] turns a bad value into an error that
//! names the variable, so a misconfigured VMCP stops at start-up instead of
//! running blind.

use std::time::Duration;

/// Telemetry configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelSettings {
    /// Push traces and metrics over OTLP/HTTP (`UNKEY_VMCP_OTEL_ENABLED`, default false).
    pub enabled: bool,
    /// `service.name` resource attribute (`UNKEY_VMCP_OTEL_SERVICE_NAME`).
    pub service_name: String,
    /// `service.version` resource attribute (`UNKEY_VMCP_OTEL_SERVICE_VERSION`).
    pub service_version: String,
    /// Share of new root traces that are sampled, in [0, 1] (`UNKEY_VMCP_OTEL_SAMPLING_RATE`).
    pub sampling_rate: f64,
    /// OTLP/HTTP collector as `host:port` (or `http://host:port`) (`UNKEY_VMCP_OTEL_ENDPOINT`).
    pub endpoint: String,
    /// Serve `/metrics` for Prometheus; independent of `enabled` (`UNKEY_VMCP_OTEL_PROMETHEUS_ENABLED`).
    pub prometheus_enabled: bool,
    /// Port of the `/metrics` listener (`UNKEY_VMCP_OTEL_PROMETHEUS_PORT`).
    pub prometheus_port: u16,
    /// How often metrics are pushed over OTLP (not an environment variable; 15 s by default).
    pub metrics_interval: Duration,
}

impl Default for OtelSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            service_name: "vmm-controlplane".to_owned(),
            service_version: "0.0.1".to_owned(),
            sampling_rate: 1.0,
            endpoint: "localhost:4318".to_owned(),
            prometheus_enabled: true,
            prometheus_port: 9464,
            metrics_interval: Duration::from_secs(15),
        }
    }
}

/// A telemetry setting that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OtelSettingsError {
    /// The sampling rate is not a number in [0, 1].
    #[error("UNKEY_VMCP_OTEL_SAMPLING_RATE must be a number between 0 and 1, got {0}")]
    SamplingRate(f64),
    /// The collector endpoint cannot be turned into an `http://` URL.
    #[error(
        "UNKEY_VMCP_OTEL_ENDPOINT must be host:port or http://host:port, got {value:?}: {reason}"
    )]
    Endpoint {
        /// The configured value.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The service name is empty.
    #[error("UNKEY_VMCP_OTEL_SERVICE_NAME must not be empty")]
    ServiceName,
    /// The metrics push interval is zero.
    #[error("the OTLP metrics interval must be positive")]
    MetricsInterval,
}

impl OtelSettings {
    /// Checks every field; the error names the environment variable to fix.
    pub fn validate(&self) -> Result<(), OtelSettingsError> {
        if !(0.0..=1.0).contains(&self.sampling_rate) {
            return Err(OtelSettingsError::SamplingRate(self.sampling_rate));
        }
        if self.service_name.trim().is_empty() {
            return Err(OtelSettingsError::ServiceName);
        }
        if self.metrics_interval.is_zero() {
            return Err(OtelSettingsError::MetricsInterval);
        }
        if self.enabled {
            self.base_url()?;
        }
        Ok(())
    }

    /// The collector's base URL, `http://host:port`, without a trailing slash.
    pub fn base_url(&self) -> Result<String, OtelSettingsError> {
        let bad = |reason| OtelSettingsError::Endpoint {
            value: self.endpoint.clone(),
            reason,
        };
        let value = self.endpoint.trim();
        let authority = match value.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => return Err(bad("TLS is not supported; use http")),
            Some(_) => return Err(bad("the only scheme accepted is http")),
            None => value,
        };
        let authority = authority.trim_end_matches('/');
        if authority.is_empty() {
            return Err(bad("the host is missing"));
        }
        if authority.contains('/') {
            return Err(bad("give only host:port; the /v1/<signal> paths are added"));
        }
        let uri: http::Uri = format!("http://{authority}/")
            .parse()
            .map_err(|_| bad("not a valid host:port"))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("the host is missing"));
        }
        Ok(format!("http://{authority}"))
    }

    /// The OTLP/HTTP URL for one signal (`traces` or `metrics`).
    pub fn signal_url(&self, signal: &str) -> Result<String, OtelSettingsError> {
        Ok(format!("{}/v1/{signal}", self.base_url()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_rate(rate: f64) -> OtelSettings {
        OtelSettings {
            sampling_rate: rate,
            ..OtelSettings::default()
        }
    }

    #[test]
    fn defaults_match_the_documented_variables() {
        let s = OtelSettings::default();
        assert!(!s.enabled);
        assert_eq!(s.service_name, "vmm-controlplane");
        assert_eq!(s.service_version, "0.0.1");
        assert_eq!(s.sampling_rate, 1.0);
        assert_eq!(s.endpoint, "localhost:4318");
        assert!(s.prometheus_enabled);
        assert_eq!(s.prometheus_port, 9464);
        assert_eq!(s.validate(), Ok(()));
    }

    #[test]
    fn sampling_rate_outside_unit_interval_names_the_variable() {
        for rate in [-0.1, 1.01, f64::NAN, f64::INFINITY] {
            let err = with_rate(rate)
                .validate()
                .expect_err("rate must be rejected");
            assert!(
                err.to_string().contains("UNKEY_VMCP_OTEL_SAMPLING_RATE"),
                "{err}"
            );
        }
        for rate in [0.0, 0.5, 1.0] {
            assert_eq!(with_rate(rate).validate(), Ok(()));
        }
    }

    #[test]
    fn endpoint_accepts_host_port_and_http_urls() {
        let mut s = OtelSettings {
            enabled: true,
            ..OtelSettings::default()
        };
        for (given, url) in [
            ("localhost:4318", "http://localhost:4318/v1/traces"),
            ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
            ("[::1]:4318", "http://[::1]:4318/v1/traces"),
        ] {
            s.endpoint = given.to_owned();
            assert_eq!(s.signal_url("traces").as_deref(), Ok(url), "{given}");
            assert_eq!(s.validate(), Ok(()));
        }
    }

    #[test]
    fn bad_endpoints_name_the_variable_when_enabled() {
        for given in [
            "",
            "https://collector:4318",
            "grpc://x:1",
            "host:4318/v1/traces",
            "a b:1",
        ] {
            let s = OtelSettings {
                enabled: true,
                endpoint: given.to_owned(),
                ..OtelSettings::default()
            };
            let err = s.validate().expect_err(given);
            assert!(
                err.to_string().contains("UNKEY_VMCP_OTEL_ENDPOINT"),
                "{err}"
            );
            let off = OtelSettings {
                enabled: false,
                ..s
            };
            assert_eq!(
                off.validate(),
                Ok(()),
                "a disabled exporter's endpoint is unused"
            );
        }
    }

    #[test]
    fn empty_service_name_is_rejected() {
        let s = OtelSettings {
            service_name: " ".to_owned(),
            ..OtelSettings::default()
        };
        assert_eq!(s.validate(), Err(OtelSettingsError::ServiceName));
    }
}
