//! Tracing for every Tollgate node: structured logs on stdout (`RUST_LOG` filters them) and, when
//! an OTLP endpoint is configured (`TOLLGATE_OTLP_ENDPOINT`, e.g. `http://127.0.0.1:4317`),
//! OpenTelemetry spans exported over OTLP/gRPC in batches from a thread of their own, so the
//! hot path never waits on the collector.
//!
//! Depends on no other Tollgate crate.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The environment variable naming the OTLP/gRPC collector.
pub const OTLP_ENDPOINT_ENV: &str = "TOLLGATE_OTLP_ENDPOINT";

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("tracing subscriber: {0}")]
    Subscriber(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the span exporter alive; dropping it flushes the spans not sent yet.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // At shutdown there is nobody left to tell; the spans are best effort.
            let _ = provider.shutdown();
        }
    }
}

/// Installs the global subscriber for the node `service` (`tollgate-edge`, …). With
/// `otlp_endpoint` set, spans also go to that collector.
pub fn init(
    service: &'static str,
    otlp_endpoint: Option<&str>,
) -> Result<Telemetry, TelemetryError> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer();
    let Some(endpoint) = otlp_endpoint else {
        tracing_subscriber::registry()
            .with(filter)
            .with(logs)
            .try_init()?;
        return Ok(Telemetry { provider: None });
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let spans = tracing_opentelemetry::layer().with_tracer(provider.tracer(service));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init()?;
    Ok(Telemetry {
        provider: Some(provider),
    })
}
