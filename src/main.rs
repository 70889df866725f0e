//! The `kafka-s3-archiver` command: parses the command line, sets up logging and metrics, and
//! runs the archiver until SIGINT or SIGTERM, or checks a configuration (`check`).

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use kafka_s3_archiver::config::{Config, DEFAULTS, LogFormat, Settings};

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
    /// Audits the archive of a topic (KAFKA_TOPIC or --topic; --all-topics for every topic in
    /// the bucket): every offset still in Kafka has its objects with the right bodies, offsets Kafka
    /// no longer has are complete in the bucket, and nothing else is there. Exit status 0 only
    /// when clean.
    Verify(VerifyArgs),
    /// Replays the archive of a topic (KAFKA_TOPIC or --topic) into --to-topic: SINETStream v3
    /// messages rebuilt from the payload objects, in offset order, partition P to partition P.
    Restore(RestoreArgs),
}

/// Which part of an archive: partition, offsets and time.
#[derive(clap::Args, Debug, Clone)]
struct Selection {
    /// Only this partition.
    #[arg(long)]
    partition: Option<i32>,
    /// First offset (inclusive).
    #[arg(long)]
    from_offset: Option<i64>,
    /// Last offset (inclusive).
    #[arg(long)]
    to_offset: Option<i64>,
    /// From this time: RFC 3339 (2022-04-18T10:00:00+09:00), or YYYY-MM-DD[THH[:MM]] in PARTITION_TIMEZONE.
    #[arg(long)]
    since: Option<String>,
    /// Up to this time (exclusive), same forms as --since.
    #[arg(long)]
    until: Option<String>,
    /// Listings and object reads in flight.
    #[arg(long, default_value_t = 32)]
    parallel: usize,
}

#[derive(clap::Args, Debug)]
struct VerifyArgs {
    #[command(flatten)]
    settings: Settings,
    #[command(flatten)]
    selection: Selection,
    /// Every topic the bucket holds (instead of KAFKA_TOPIC).
    #[arg(long)]
    all_topics: bool,
    /// Check the bucket alone (completeness), without reading Kafka.
    #[arg(long)]
    bucket_only: bool,
    /// Compare object sizes only, not bodies (no read of each object).
    #[arg(long)]
    sizes_only: bool,
    /// How many problems to print in full (all are counted).
    #[arg(long, default_value_t = 20)]
    show: usize,
}

#[derive(clap::Args, Debug)]
struct RestoreArgs {
    #[command(flatten)]
    settings: Settings,
    #[command(flatten)]
    selection: Selection,
    /// Topic to produce to; it must exist with at least as many partitions as the archive.
    #[arg(long)]
    to_topic: Option<String>,
    /// Also produce the raw values of dead-lettered records.
    #[arg(long)]
    dead_letters: bool,
    /// Read and rebuild every record, produce nothing.
    #[arg(long)]
    dry_run: bool,
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
    /// Put the payloads without the user metadata the archiver gives them on S3, to see what
    /// the metadata costs the store.
    #[arg(long)]
    no_metadata: bool,
}

/// Exit status: 0 done (or nothing found wrong); 1 a runtime failure, or problems found (`check`,
/// `verify`, `restore`); 2 a configuration or usage error, before anything was done.
const FAILED: u8 = 1;
const USAGE: u8 = 2;

fn main() -> ExitCode {
    kafka_s3_archiver::malloc::tune();
    // `.env` fills in what the process environment does not set; it never overrides it.
    let dotenv = dotenvy::dotenv();
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    let (settings, checking) = match cli.command {
        None => (cli.settings, false),
        Some(Command::Run(s)) => (s, false),
        Some(Command::Check(s)) => (s, true),
        Some(Command::BenchStore(args)) => return bench_store(args),
        Some(Command::Verify(args)) => return verify(args),
        Some(Command::Restore(args)) => return restore(args),
    };
    let env: Vec<(String, String)> = std::env::vars().collect();
    // librdkafka checks the pass-through properties: a bad one is a configuration error too.
    let config =
        Config::from_settings(&settings, &env).and_then(|c| kafka_s3_archiver::kafka::client_config(&c).map(|_| c));
    let config = match config {
        Ok(c) => c,
        Err(e) if checking => {
            println!("FAIL  configuration: {e}");
            return ExitCode::from(USAGE);
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(USAGE);
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
    for warning in config.warnings() {
        tracing::warn!("{warning}");
    }
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged once: the log is standard error.
            tracing::error!("{e:#}");
            // A store that cannot be set up (a bad endpoint, an unreadable S3_CA_FILE) is a setting.
            let setting = e.downcast_ref::<kafka_s3_archiver::config::ConfigError>().is_some()
                || matches!(
                    e.downcast_ref::<kafka_s3_archiver::RunError>(),
                    Some(kafka_s3_archiver::RunError::Store(_))
                );
            ExitCode::from(if setting { USAGE } else { FAILED })
        }
    }
}

/// The command line, its help completed: each option's default, and for each tool only the
/// settings it reads.
fn command() -> clap::Command {
    let mut cmd = with_defaults(Cli::command());
    for sub in ["run", "check", "verify", "restore", "bench-store"] {
        cmd = cmd.mut_subcommand(sub, with_defaults);
    }
    let kafka = ["BROKER_HOSTNAME", "KAFKA_TOPIC", "kafka_property"];
    let store = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_KEY",
        "S3_BUCKET_NAME",
        "S3_REGION",
        "S3_ENDPOINT_URL",
        "S3_CA_FILE",
        "ARCHIVE_DIR",
    ];
    let layout = ["S3_OBJECT_EXTENSION", "S3_OBJECT_SEPARATOR", "PARTITION_TIMEZONE"];
    let verify: Vec<&str> = [&kafka[..], &store, &layout, &["UNDECODABLE", "UPLOAD_THREADS", "LOG_FORMAT"]].concat();
    let restore: Vec<&str> = [&kafka[..], &store, &layout, &["UPLOAD_THREADS", "LOG_FORMAT"]].concat();
    let bench: Vec<&str> = [&store[..], &["UPLOAD_WORKERS", "UPLOAD_THREADS", "LOG_FORMAT"]].concat();
    cmd.mut_subcommand("verify", |c| {
        only(c, &verify).mut_arg("kafka_topic", |a| a.help("Topic whose archive to check, or a comma-separated list"))
    })
    .mut_subcommand("restore", |c| {
        only(c, &restore).mut_arg("kafka_topic", |a| a.help("Topic whose archive to replay"))
    })
    .mut_subcommand("bench-store", |c| only(c, &bench))
}

/// Each option with a default says it in its help.
fn with_defaults(mut cmd: clap::Command) -> clap::Command {
    let found: Vec<(clap::Id, &str)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?;
            DEFAULTS.iter().find(|(var, _)| *var == env).map(|(_, d)| (a.get_id().clone(), *d))
        })
        .collect();
    for (id, default) in found {
        cmd = cmd.mut_arg(id, |a| {
            let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
            a.help(format!("{help} [default: {default}]"))
        });
    }
    cmd
}

/// Hides the settings a tool does not read: those whose variable (or, without one, whose id) is
/// not in `uses`.
fn only(mut cmd: clap::Command, uses: &[&str]) -> clap::Command {
    let settings: Vec<clap::Id> = <Settings as clap::Args>::augment_args(clap::Command::new("settings"))
        .get_arguments()
        .filter(|a| {
            let name = a.get_env().and_then(|e| e.to_str()).unwrap_or(a.get_id().as_str());
            !uses.contains(&name)
        })
        .map(|a| a.get_id().clone())
        .collect();
    for id in settings {
        cmd = cmd.mut_arg(id, |a| a.hide(true));
    }
    cmd
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
    let lines = runtime.block_on(kafka_s3_archiver::tools::check::run(&config, |line| println!("{line}")));
    if kafka_s3_archiver::tools::check::passed(&lines) {
        println!("all checks passed: start the archiver with `kafka-s3-archiver`");
        ExitCode::SUCCESS
    } else {
        let n = lines.iter().filter(|l| l.outcome == kafka_s3_archiver::tools::check::Outcome::Fail).count();
        println!("{n} problem(s): fix them and run `kafka-s3-archiver check` again");
        ExitCode::from(FAILED)
    }
}

fn bench_store(args: BenchStoreArgs) -> ExitCode {
    let config = match tool_config(args.settings, false, false) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (store, runtime) = match store_and_runtime(&config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let report = runtime.block_on(kafka_s3_archiver::tools::bench::put_ceiling(
        store,
        &args.prefix,
        args.records,
        args.payload_bytes,
        config.upload_workers,
        config.store.keeps_metadata() && !args.no_metadata,
    ));
    println!("{}", serde_json::to_string(&report).expect("serialize the report"));
    ExitCode::SUCCESS
}

fn run(config: Config) -> anyhow::Result<()> {
    let metrics = kafka_s3_archiver::metrics::install()?;
    tracing::info!(config = %config.summary(), version = env!("CARGO_PKG_VERSION"), "starting");
    let runtime = runtime(&config)?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    runtime.spawn(kafka_s3_archiver::malloc::trim(std::time::Duration::from_millis(500)));
    runtime.block_on(async {
        let result = kafka_s3_archiver::run(config, metrics, shutdown_signal()).await;
        result.map_err(|e| match e {
            kafka_s3_archiver::RunError::Config(c) => anyhow::Error::new(c),
            other => anyhow::Error::new(other),
        })
    })
}

/// The configuration of `verify` and `restore`, which need no broker (`--bucket-only`) or topic
/// (`--all-topics`) in some uses: placeholders stand in for what is not used.
fn tool_config(mut settings: Settings, need_broker: bool, need_topic: bool) -> Result<Config, ExitCode> {
    if !need_broker && settings.broker_hostname.as_deref().is_none_or(str::is_empty) {
        settings.broker_hostname = Some("unused:9092".into());
    }
    if !need_topic && settings.kafka_topic.as_deref().is_none_or(str::is_empty) {
        settings.kafka_topic = Some("unused".into());
    }
    let env: Vec<(String, String)> = std::env::vars().collect();
    // A tool that talks to Kafka has librdkafka check the pass-through properties now, not after
    // a listing of the whole bucket.
    Config::from_settings(&settings, &env)
        .and_then(|c| if need_broker { kafka_s3_archiver::kafka::client_config(&c).map(|_| c) } else { Ok(c) })
        .map_err(|e| {
            eprintln!("error: {e}");
            ExitCode::from(USAGE)
        })
}

type ArchiveStore = std::sync::Arc<dyn object_store::ObjectStore>;

/// The store named by the configuration and a runtime to reach it (exit status 2 on a bad setting).
fn store_and_runtime(config: &Config) -> Result<(ArchiveStore, tokio::runtime::Runtime), ExitCode> {
    let store = kafka_s3_archiver::store::build(&config.store).map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(USAGE)
    })?;
    Ok((store, runtime(config).expect("start the tokio runtime")))
}

/// The command line's selection, its times parsed.
fn selection(selection: &Selection, config: &Config) -> Result<kafka_s3_archiver::archive::Selection, ExitCode> {
    let parse = |v: &Option<String>, name: &str| -> Result<Option<i64>, ExitCode> {
        v.as_deref()
            .map(|t| {
                parse_time(t, config.layout.timezone).ok_or_else(|| {
                    eprintln!(
                        "error: {name} {t:?}: give RFC 3339 (2022-04-18T10:00:00+09:00) or YYYY-MM-DD[THH[:MM]] \
                         (in PARTITION_TIMEZONE {})",
                        config.layout.timezone
                    );
                    ExitCode::from(USAGE)
                })
            })
            .transpose()
    };
    Ok(kafka_s3_archiver::archive::Selection {
        partition: selection.partition,
        from_offset: selection.from_offset,
        to_offset: selection.to_offset,
        range: kafka_s3_archiver::archive::TimeRange {
            since_ms: parse(&selection.since, "--since")?,
            until_ms: parse(&selection.until, "--until")?,
        },
        parallel: selection.parallel.max(1),
    })
}

/// Epoch milliseconds of an RFC 3339 time, or of a date (and hour, minute) in `tz`.
fn parse_time(text: &str, tz: chrono_tz::Tz) -> Option<i64> {
    use chrono::TimeZone;
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(t.timestamp_millis());
    }
    let naive = ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H"]
        .iter()
        .find_map(|f| chrono::NaiveDateTime::parse_from_str(&format!("{text}:00"), &format!("{f}:%S")).ok())
        .or_else(|| chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0)))?;
    Some(tz.from_local_datetime(&naive).earliest()?.timestamp_millis())
}

fn verify(args: VerifyArgs) -> ExitCode {
    use kafka_s3_archiver::tools::verify;
    let config = match tool_config(args.settings, !args.bucket_only, !args.all_topics) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.log_format, "warn,object_store=error,librdkafka=off,rdkafka=off");
    let selection = match selection(&args.selection, &config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let options = verify::VerifyOptions {
        topics: if args.all_topics { Vec::new() } else { config.topics.clone() },
        selection,
        bucket_only: args.bucket_only,
        sizes_only: args.sizes_only,
        show: args.show,
    };
    let (store, runtime) = match store_and_runtime(&config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let progress = kafka_s3_archiver::tools::progress::Progress::new("verify");
    match runtime.block_on(verify::run(&config, store, &options, progress)) {
        Ok(reports) => {
            print!("{}", verify::render(&reports, &options));
            if verify::totals(&reports).problems() == 0 { ExitCode::SUCCESS } else { ExitCode::from(FAILED) }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(FAILED)
        }
    }
}

fn restore(args: RestoreArgs) -> ExitCode {
    use kafka_s3_archiver::tools::{progress::Progress, restore};
    let config = match tool_config(args.settings, !args.dry_run, true) {
        Ok(c) => c,
        Err(code) => return code,
    };
    init_logging(config.log_format, "warn,object_store=error,librdkafka=off,rdkafka=off");
    if config.topics.len() != 1 {
        eprintln!("error: restore takes one archived topic (--topic or KAFKA_TOPIC), not {}", config.topics.join(","));
        return ExitCode::from(USAGE);
    }
    if args.to_topic.is_none() && !args.dry_run {
        eprintln!("error: give --to-topic (the topic to produce to), or --dry-run");
        return ExitCode::from(USAGE);
    }
    let selection = match selection(&args.selection, &config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let options = restore::RestoreOptions {
        topic: config.topics[0].clone(),
        to_topic: args.to_topic,
        selection,
        dead_letters: args.dead_letters,
        dry_run: args.dry_run,
    };
    let (store, runtime) = match store_and_runtime(&config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match runtime.block_on(restore::run(&config, store, &options, Progress::new("restore"))) {
        Ok(summary) => {
            print!("{}", restore::render(&summary, &options));
            if summary.skipped == 0 { ExitCode::SUCCESS } else { ExitCode::from(FAILED) }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(FAILED)
        }
    }
}

/// The async runtime of the uploads (and of bench-store, so that the ceiling is measured alike).
fn runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(config.upload_threads).enable_all().build()
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
