//! Which part of an archive `verify` and `restore` work on: a partition, an offset range, a
//! time range (by the hour folders), and how many listings and reads run at once.

use crate::archive::{Selection, TimeRange};
use crate::config::Config;
use crate::exit::Exit;

/// Which part of an archive: partition, offsets and time.
#[derive(clap::Args, Debug, Clone)]
pub struct SelectionArgs {
    /// Only this partition.
    #[arg(long)]
    pub partition: Option<i32>,
    /// First offset (inclusive).
    #[arg(long)]
    pub from_offset: Option<i64>,
    /// Last offset (inclusive).
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// From this time: RFC 3339 (2022-04-18T10:00:00+09:00), or YYYY-MM-DD[THH[:MM]] in PARTITION_TIMEZONE.
    #[arg(long)]
    pub since: Option<String>,
    /// Up to this time (exclusive), same forms as --since.
    #[arg(long)]
    pub until: Option<String>,
    /// Listings and object reads in flight.
    #[arg(long, default_value_t = 32)]
    pub parallel: usize,
}

impl SelectionArgs {
    /// The selection, its times parsed (exit status 2 for a time in neither form).
    pub fn parse(&self, config: &Config) -> Result<Selection, Exit> {
        let parse = |v: &Option<String>, name: &str| -> Result<Option<i64>, Exit> {
            v.as_deref()
                .map(|t| {
                    parse_time(t, config.layout.timezone).ok_or_else(|| {
                        eprintln!(
                            "error: {name} {t:?}: give RFC 3339 (2022-04-18T10:00:00+09:00) or YYYY-MM-DD[THH[:MM]] \
                         (in PARTITION_TIMEZONE {})",
                            config.layout.timezone
                        );
                        Exit::Usage
                    })
                })
                .transpose()
        };
        Ok(Selection {
            partition: self.partition,
            from_offset: self.from_offset,
            to_offset: self.to_offset,
            range: TimeRange { since_ms: parse(&self.since, "--since")?, until_ms: parse(&self.until, "--until")? },
            parallel: self.parallel.max(1),
        })
    }
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
