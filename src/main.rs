//! The `kafka-s3-archiver` command: parses the command line, loads the configuration once,
//! dispatches to the daemon or a tool, and turns the outcome into an exit status by one policy
//! ([`Exit`]).

use std::process::ExitCode;

use clap::FromArgMatches;
use kafka_s3_archiver::cli::{Cli, Command};
use kafka_s3_archiver::config::{Config, ConfigError, LogFormat, Needs, Settings};
use kafka_s3_archiver::exit::Exit;
use kafka_s3_archiver::tools::{bench, check, restore, verify};
use kafka_s3_archiver::{RunError, kafka, malloc, metrics};

/// The tools log only real trouble on stderr: their output is what they print.
const TOOL_LOG: &str = "warn,object_store=error,librdkafka=off,rdkafka=off";
/// The daemon keeps object_store at WARN: it logs every one of its retries, and the archiver
/// logs its own, rate-limited.
const DAEMON_LOG: &str = "info,object_store=warn";

fn main() -> ExitCode {
    malloc::tune();
    // `.env` fills in what the process environment does not set; it never overrides it.
    let dotenv = dotenvy::dotenv();
    let cli = Cli::from_arg_matches(&kafka_s3_archiver::cli::command().get_matches()).unwrap_or_else(|e| e.exit());
    let command = cli.command.unwrap_or(Command::Run(cli.settings));
    let (settings, needs) = match &command {
        Command::Run(s) | Command::Check(s) => (s.clone(), Needs::ALL),
        Command::Verify(args) => (args.settings.clone(), args.needs()),
        Command::Restore(args) => (args.settings.clone(), args.needs()),
        Command::BenchStore(args) => (args.settings.clone(), args.needs()),
    };
    let config = match load_config(settings, needs) {
        Ok(c) => c,
        Err(e) => {
            // check reports on stdout, line by line; the rest say it on stderr.
            match command {
                Command::Check(_) => println!("FAIL  configuration: {e}"),
                _ => eprintln!("error: {e}"),
            }
            return Exit::Usage.into();
        }
    };
    let exit = match command {
        Command::Run(_) => {
            init_logging(config.log_format, DAEMON_LOG);
            if let Err(e) = dotenv
                && !e.not_found()
            {
                tracing::warn!(error = %e, "cannot read .env");
            }
            run_daemon(config)
        }
        Command::Check(_) => {
            init_logging(config.log_format, TOOL_LOG);
            check::run(&config)
        }
        Command::Verify(args) => {
            init_logging(config.log_format, TOOL_LOG);
            verify::run(args, &config)
        }
        Command::Restore(args) => {
            init_logging(config.log_format, TOOL_LOG);
            restore::run(args, &config)
        }
        Command::BenchStore(args) => bench::run(args, &config),
    };
    exit.into()
}

/// The one place a configuration is loaded: flags, then the process environment, then `.env`.
/// What a command does not need (a broker for `verify --bucket-only`, a topic for
/// `verify --all-topics`) gets a placeholder; where it reaches Kafka, librdkafka checks the
/// pass-through properties now, not after a listing of the whole bucket.
fn load_config(mut settings: Settings, needs: Needs) -> Result<Config, ConfigError> {
    if !needs.broker && settings.broker_hostname.as_deref().is_none_or(str::is_empty) {
        settings.broker_hostname = Some("unused:9092".into());
    }
    if !needs.topic && settings.kafka_topic.as_deref().is_none_or(str::is_empty) {
        settings.kafka_topic = Some("unused".into());
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = Config::from_settings(&settings, &env)?;
    if needs.broker {
        kafka::client_config(&config)?;
    }
    Ok(config)
}

/// Runs the archiver until SIGINT or SIGTERM; a failure is logged once (the log is stderr).
fn run_daemon(config: Config) -> Exit {
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    let metrics = match metrics::install() {
        Ok(m) => m,
        Err(e) => {
            tracing::error!("{:#}", anyhow::Error::new(e));
            return Exit::Failed;
        }
    };
    tracing::info!(config = %config.summary(), version = env!("CARGO_PKG_VERSION"), "starting");
    let runtime =
        match tokio::runtime::Builder::new_multi_thread().worker_threads(config.upload_threads).enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{:#}", anyhow::Error::new(e));
                return Exit::Failed;
            }
        };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    runtime.spawn(malloc::trim(std::time::Duration::from_millis(500)));
    match runtime.block_on(kafka_s3_archiver::run(config, metrics, shutdown_signal())) {
        Ok(()) => Exit::Done,
        Err(e) => {
            // A store that cannot be set up (a bad endpoint, an unreadable S3_CA_FILE) is a setting.
            let exit = match e {
                RunError::Config(_) | RunError::Store(_) => Exit::Usage,
                _ => Exit::Failed,
            };
            // With its causes, once.
            let e = match e {
                RunError::Config(c) => anyhow::Error::new(c),
                other => anyhow::Error::new(other),
            };
            tracing::error!("{e:#}");
            exit
        }
    }
}

/// `default_filter` applies unless RUST_LOG is set.
fn init_logging(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    // Colours only on a terminal: a log file or journald gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
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
