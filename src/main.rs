//! The `kafka-s3-archiver` command: parses the command line, sets up logging and metrics, and
//! runs the archiver until SIGINT or SIGTERM, or checks a configuration (`check`).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kafka_s3_archiver::config::{Config, LogFormat, Settings};

// sled's page updates allocate on every insert from several threads; with glibc's malloc the
// spool spends a quarter of its time in the allocator and its arenas inflate RSS (measured with
// `cargo bench --bench spool`: 1 KB inserts in batches of 1000 go from about 89 k to 150 k records/s).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "kafka-s3-archiver",
    version,
    about = "Archives Kafka topics into object storage, one object per offset",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    settings: Settings,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Runs the archiver (what the command does without a subcommand).
    Run(Settings),
    /// Checks the configuration: spool directory, REST port, brokers and topics, and the bucket
    /// (writes, reads back and deletes a probe object). Exit status 0 when every check passes.
    Check(Settings),
    /// Measures the store's raw PUT rate with the archiver's S3 client: per record a payload and
    /// a timestamp object, under `--prefix`, UPLOAD_WORKERS in flight. Prints JSON. Writes to the
    /// bucket: use a scratch bucket or remove the prefix afterwards.
    BenchStore(BenchStoreArgs),
}

#[derive(clap::Args, Debug)]
struct BenchStoreArgs {
    #[command(flatten)]
    settings: Settings,
    /// Records to put (two objects each).
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    /// Payload size in bytes (the separator byte is added).
    #[arg(long, default_value_t = 1024)]
    payload_bytes: usize,
    /// Key prefix of the objects.
    #[arg(long, default_value = ".kafka-s3-archiver/bench")]
    prefix: String,
}

fn main() -> ExitCode {
    // `.env` fills in what the process environment does not set; it never overrides it.
    let dotenv = dotenvy::dotenv();
    let cli = Cli::parse();
    let (settings, checking) = match cli.command {
        None => (cli.settings, false),
        Some(Command::Run(s)) => (s, false),
        Some(Command::Check(s)) => (s, true),
        Some(Command::BenchStore(args)) => return bench_store(args),
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::from_settings(&settings, &env) {
        Ok(c) => c,
        Err(e) if checking => {
            println!("FAIL  configuration: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if checking {
        // Only real trouble on stderr: each check prints its own outcome.
        init_logging(config.log_format, "warn,object_store=error,librdkafka=off,rdkafka=off");
        return check(config);
    }
    init_logging(config.log_format, "info,object_store=warn");
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

/// `default_filter` applies unless RUST_LOG is set. The archiver's default keeps object_store at
/// WARN: it logs every one of its retries, and the archiver logs its own, rate-limited.
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

fn check(config: Config) -> ExitCode {
    println!("kafka-s3-archiver {} check", env!("CARGO_PKG_VERSION"));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("start the tokio runtime");
    let lines = runtime.block_on(kafka_s3_archiver::check::run(&config, |line| println!("{line}")));
    if kafka_s3_archiver::check::passed(&lines) {
        println!("all checks passed: start the archiver with `kafka-s3-archiver`");
        ExitCode::SUCCESS
    } else {
        let n = lines.iter().filter(|l| l.outcome == kafka_s3_archiver::check::Outcome::Fail).count();
        println!("{n} problem(s): fix them and run `kafka-s3-archiver check` again");
        ExitCode::FAILURE
    }
}

fn bench_store(args: BenchStoreArgs) -> ExitCode {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = match Config::from_settings(&args.settings, &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let store = match kafka_s3_archiver::store::build(&config.store) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("start the tokio runtime");
    let report = runtime.block_on(kafka_s3_archiver::bench::put_ceiling(
        store,
        &args.prefix,
        args.records,
        args.payload_bytes,
        config.upload_workers,
    ));
    println!("{}", serde_json::to_string(&report).expect("serialize the report"));
    ExitCode::SUCCESS
}

fn run(config: Config) -> anyhow::Result<()> {
    let metrics = kafka_s3_archiver::metrics::install()?;
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
