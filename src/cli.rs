//! The command line: the daemon's settings, the subcommands (each tool owns its arguments), and
//! the help completed with each option's default and, per tool, only the settings it reads.

use clap::{CommandFactory, Parser, Subcommand};

use crate::config::{DEFAULTS, Settings};
use crate::tools::{bench, restore, verify};

#[derive(Parser, Debug)]
#[command(
    name = "kafka-s3-archiver",
    version,
    about = "Archives Kafka topics into object storage, one object per offset",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Runs the archiver (what the command does without a subcommand).
    Run(Settings),
    /// Checks the configuration: spool directory, REST port, brokers and topics, and the bucket
    /// (writes, reads back and deletes a probe object). Exit status 0 when every check passes.
    Check(Settings),
    /// Measures the store's raw PUT rate with the archiver's S3 client: per record a payload and
    /// a timestamp object, under `--prefix`, UPLOAD_WORKERS in flight. Prints JSON. Writes to the
    /// bucket: use a scratch bucket or remove the prefix afterwards.
    BenchStore(bench::Args),
    /// Audits the archive of a topic (KAFKA_TOPIC or --topic; --all-topics for every topic in
    /// the bucket): every offset still in Kafka has its objects with the right bodies, offsets Kafka
    /// no longer has are complete in the bucket, and nothing else is there. Exit status 0 only
    /// when clean.
    Verify(verify::Args),
    /// Replays the archive of a topic (KAFKA_TOPIC or --topic) into --to-topic: SINETStream v3
    /// messages rebuilt from the payload objects, in offset order, partition P to partition P.
    Restore(restore::Args),
}

/// The command line, its help completed: each option's default, and for each tool only the
/// settings it reads.
pub fn command() -> clap::Command {
    let mut cmd = with_defaults(Cli::command());
    for sub in ["run", "check", "verify", "restore", "bench-store"] {
        cmd = cmd.mut_subcommand(sub, with_defaults);
    }
    let (verify_reads, restore_reads, bench_reads) = (verify::reads(), restore::reads(), bench::reads());
    cmd.mut_subcommand("verify", |c| {
        only(c, &verify_reads)
            .mut_arg("kafka_topic", |a| a.help("Topic whose archive to check, or a comma-separated list; a pattern beginning with ^ takes the topics it matches in Kafka (in the bucket with --bucket-only)"))
    })
    .mut_subcommand("restore", |c| {
        only(c, &restore_reads).mut_arg("kafka_topic", |a| a.help("Topic whose archive to replay"))
    })
    .mut_subcommand("bench-store", |c| only(c, &bench_reads))
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
