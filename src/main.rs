//! The `orders-service` binary: `serve` (default) runs the service, `migrate` applies
//! database migrations and exits (what the Helm pre-upgrade hook runs), `outbox
//! repartition` moves outbox rows to `APP_OUTBOX__PARTITIONS` partitions while no replica
//! runs, `openapi` prints the REST contract.

use anyhow::Context;
use orders_service::{app::App, config::Settings, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = std::env::args().nth(1).unwrap_or_else(|| "serve".to_owned());
    let settings = Settings::from_env().context("invalid configuration")?;
    let telemetry = telemetry::init(&settings.log)?;
    tracing::info!(exporting = telemetry.tracing_enabled(), "OpenTelemetry tracing");
    settings.warn_unknown_vars();
    let result = match command.as_str() {
        "serve" => App::build(settings).await?.run_until_stopped().await,
        "migrate" => orders_service::store::migrate(&settings.database).await,
        "outbox" if std::env::args().nth(2).as_deref() == Some("repartition") => {
            orders_service::store::repartition(&settings.database, settings.outbox.partitions).await
        }
        "openapi" => {
            print!("{}", orders_service::http::openapi_yaml()?);
            Ok(())
        }
        other => anyhow::bail!(
            "unknown command {other:?}; expected serve, migrate, openapi or `outbox repartition`"
        ),
    };
    telemetry.shutdown().await;
    result
}
