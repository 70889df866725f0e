//! The `kafka-s3-archiver` command: parses the command line, sets up logging and metrics, and
//! runs the archiver until SIGINT or SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use kafka_s3_archiver::config::{Config, LogFormat, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "kafka-s3-archiver",
    version,
    about = "Archives Kafka topics into object storage, one object per offset"
)]
struct Cli {
    #[command(flatten)]
    settings: Settings,
}

fn main() -> ExitCode {
    // `.env` fills in what the process environment does not set; it never overrides it.
    let dotenv = dotenvy::dotenv();
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::from_settings(&cli.settings, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    if let Err(e) = dotenv
        && !e.not_found()
    {
        tracing::warn!(error = %e, "cannot read .env");
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(if e.downcast_ref::<kafka_s3_archiver::config::ConfigError>().is_some() { 2 } else { 1 })
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // object_store logs every one of its retries; the archiver logs its own, rate-limited.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,object_store=warn"));
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    kafka_s3_archiver::metrics::describe();
    tracing::info!(config = %config.summary(), version = env!("CARGO_PKG_VERSION"), "starting");
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let result = kafka_s3_archiver::run(config, metrics, shutdown_signal()).await;
        result.map_err(|e| match e {
            kafka_s3_archiver::RunError::Config(c) => anyhow::Error::new(c),
            other => anyhow::Error::new(other),
        })
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
