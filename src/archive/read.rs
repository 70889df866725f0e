//! The read side, for `verify` and `restore`: what a key says (topic, partition, offset, kind)
//! and a listing of a topic's objects that runs one hour prefix at a time, many at once.
//!
//! The listing walks `topics/T/` and `errors/T/` down to the `hour=` level with delimiter
//! listings, then lists the hours in parallel: a bucket of millions of objects is a few thousand
//! independent requests rather than one sequential scan. A time range prunes whole hours before
//! any of them is listed.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{NaiveDate, TimeZone};
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore};

use super::layout::{Layout, ObjectKind};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("cannot list {prefix}: {source}")]
    List { prefix: String, source: object_store::Error },
}

/// What an archive key names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedKey {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub kind: ObjectKind,
    /// `year=YYYY/month=MM/day=dd/hour=HH`.
    pub hour: String,
}

/// Parses a key the archiver (or the Kafka Connect deployment) writes; `None` for any other key.
pub fn parse_key(key: &str, layout: &Layout) -> Option<ArchivedKey> {
    let (root, rest) = key.split_once('/')?;
    let (topic, rest) = rest.split_once('/')?;
    let (hour, name) = rest.rsplit_once('/')?;
    if !is_hour_path(hour) {
        return None;
    }
    let stem_prefix = format!("{topic}+");
    let name = name.strip_prefix(&stem_prefix)?;
    let (kind, stem) = match root {
        "topics" => {
            if let Some(stem) = name.strip_suffix(super::parquet::EXTENSION) {
                (ObjectKind::Parquet, stem)
            } else if let Some(stem) = name.strip_suffix("-timestamp.txt") {
                (ObjectKind::Timestamp, stem)
            } else {
                (ObjectKind::Payload, name.strip_suffix(layout.extension.as_str())?)
            }
        }
        "errors" => {
            if let Some(stem) = name.strip_suffix("-reason.txt") {
                (ObjectKind::DeadLetterReason, stem)
            } else {
                (ObjectKind::DeadLetter, name.strip_suffix(".raw")?)
            }
        }
        _ => return None,
    };
    let (partition, offset) = stem.split_once('+')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(partition) || !digits(offset) || offset.len() < 10 {
        return None;
    }
    Some(ArchivedKey {
        topic: topic.to_string(),
        partition: partition.parse().ok()?,
        offset: offset.parse().ok()?,
        kind,
        hour: hour.to_string(),
    })
}

fn is_hour_path(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    let ok = |p: &str, name: &str, width: usize| {
        p.strip_prefix(name)
            .and_then(|v| v.strip_prefix('='))
            .is_some_and(|v| v.len() == width && v.bytes().all(|b| b.is_ascii_digit()))
    };
    parts.len() == 4
        && ok(parts[0], "year", 4)
        && ok(parts[1], "month", 2)
        && ok(parts[2], "day", 2)
        && ok(parts[3], "hour", 2)
}

/// The first instant (ms) of an hour path in the layout's time zone, if it is a valid hour.
pub fn hour_start_ms(hour: &str, layout: &Layout) -> Option<i64> {
    let num = |i: usize| hour.split('/').nth(i)?.split_once('=')?.1.parse::<u32>().ok();
    let date = NaiveDate::from_ymd_opt(num(0)? as i32, num(1)?, num(2)?)?;
    let local = date.and_hms_opt(num(3)?, 0, 0)?;
    // A local hour skipped by a DST change has no instant; one repeated takes the earlier.
    Some(layout.timezone.from_local_datetime(&local).earliest()?.timestamp_millis())
}

/// An object found in the archive.
#[derive(Debug, Clone)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    /// `None` for keys that are not archive keys (they are reported as unexpected).
    pub parsed: Option<ArchivedKey>,
}

impl Listed {
    /// The key without its kind's suffix: `topics/T/year=…/hour=HH/T+P+OOOOOOOOOO` (or under
    /// `errors/`), what a payload and its timestamp object (a dead letter and its reason) share.
    pub fn stem(&self, layout: &Layout) -> &str {
        let suffix = match self.parsed.as_ref().map(|k| k.kind) {
            Some(ObjectKind::Payload) => layout.extension.as_str(),
            Some(ObjectKind::Timestamp) => "-timestamp.txt",
            Some(ObjectKind::DeadLetter) => ".raw",
            Some(ObjectKind::DeadLetterReason) => "-reason.txt",
            Some(ObjectKind::Parquet) => super::parquet::EXTENSION,
            None => "",
        };
        self.key.strip_suffix(suffix).unwrap_or(&self.key)
    }
}

/// Which hours to list: all, or those overlapping `[since, until)` (ms).
#[derive(Debug, Clone, Copy, Default)]
pub struct TimeRange {
    pub since_ms: Option<i64>,
    pub until_ms: Option<i64>,
}

impl TimeRange {
    fn keeps_hour(&self, hour: &str, layout: &Layout) -> bool {
        let Some(start) = hour_start_ms(hour, layout) else { return true };
        // Two hours of slack either side: a DST change makes a local hour longer.
        self.since_ms.is_none_or(|s| start + 2 * 3_600_000 > s) && self.until_ms.is_none_or(|u| start < u)
    }

    pub fn contains(&self, ms: i64) -> bool {
        self.since_ms.is_none_or(|s| ms >= s) && self.until_ms.is_none_or(|u| ms < u)
    }
}

/// The part of a topic's archive a command works on.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub partition: Option<i32>,
    /// First and last offset (inclusive).
    pub from_offset: Option<i64>,
    pub to_offset: Option<i64>,
    pub range: TimeRange,
    /// Listings and object reads in flight.
    pub parallel: usize,
}

impl Selection {
    pub fn keeps_offset(&self, offset: i64) -> bool {
        self.from_offset.is_none_or(|f| offset >= f) && self.to_offset.is_none_or(|t| offset <= t)
    }

    /// Drops from `index` the partitions and offsets outside the selection. Of the Parquet
    /// objects it keeps those that may hold a selected offset: the name gives only the first.
    pub fn apply(&self, index: &mut TopicIndex) {
        if let Some(p) = self.partition {
            index.partitions.retain(|&q, _| q == p);
            index.batches.retain(|&q, _| q == p);
        }
        for slots in index.partitions.values_mut() {
            slots.retain(|&o, _| self.keeps_offset(o));
        }
        for objects in index.batches.values_mut() {
            let first = |l: &Listed| l.parsed.as_ref().map_or(0, |k| k.offset);
            // The last object starting at or below `from` may hold it; those before it cannot.
            let from = self.from_offset.and_then(|f| objects.iter().map(first).filter(|&o| o <= f).max());
            objects.retain(|l| from.is_none_or(|f| first(l) >= f) && self.to_offset.is_none_or(|t| first(l) <= t));
        }
    }
}

/// The topics that have a `topics/<name>/` or `errors/<name>/` folder.
pub async fn topics(store: &dyn ObjectStore) -> Result<Vec<String>, ArchiveError> {
    let mut names = std::collections::BTreeSet::new();
    for root in ["topics", "errors"] {
        for p in children(store, &format!("{root}/")).await?.0 {
            names.insert(p);
        }
    }
    Ok(names.into_iter().collect())
}

/// The names of the folders directly under `prefix` (which ends with `/`), and the objects there.
async fn children(store: &dyn ObjectStore, prefix: &str) -> Result<(Vec<String>, Vec<ObjectMeta>), ArchiveError> {
    let listing = store
        .list_with_delimiter(Some(&Path::from(prefix)))
        .await
        .map_err(|source| ArchiveError::List { prefix: prefix.to_string(), source })?;
    let folders =
        listing.common_prefixes.iter().filter_map(|p| p.parts().next_back().map(|s| s.as_ref().to_string())).collect();
    // A folder marker (a zero-byte `topics/T/` from the AWS console, s3fs or Hadoop) is no object.
    let marker = prefix.trim_end_matches('/');
    let objects = listing.objects.into_iter().filter(|m| m.location.as_ref() != marker).collect();
    Ok((folders, objects))
}

/// How far a listing is.
#[derive(Debug, Clone, Copy, Default)]
pub struct ListState {
    /// Folders listed while looking for the hour folders.
    pub folders: usize,
    /// Hour folders found (known once the search is over), and listed so far.
    pub hours: usize,
    pub hours_listed: usize,
    /// Objects found so far.
    pub objects: usize,
}

/// Called as a listing goes on.
pub type ListProgress = Arc<dyn Fn(ListState) + Send + Sync>;

/// Every hour folder (`topics/T/year=…/hour=HH/`) of a topic under both roots, walked level by
/// level with `parallel` listings in flight; and the objects met on the way, which are no
/// archive's (a key directly under `topics/T/`, or in a folder above the hours).
async fn hour_prefixes(
    store: &dyn ObjectStore,
    topic: &str,
    range: TimeRange,
    layout: &Layout,
    parallel: usize,
    progress: Option<&ListProgress>,
) -> Result<(Vec<String>, Vec<ObjectMeta>), ArchiveError> {
    let mut level: Vec<String> = vec![format!("topics/{topic}/"), format!("errors/{topic}/")];
    let mut strays = Vec::new();
    let mut folders = 0;
    for _ in 0..4 {
        let next: Vec<(Vec<String>, Vec<ObjectMeta>)> = futures::stream::iter(level.iter().cloned())
            .map(|prefix| async move {
                let (names, objects) = children(store, &prefix).await?;
                Ok::<_, ArchiveError>((names.into_iter().map(|n| format!("{prefix}{n}/")).collect::<Vec<_>>(), objects))
            })
            .buffer_unordered(parallel)
            .inspect_ok(|_| {
                folders += 1;
                if let Some(p) = progress {
                    p(ListState { folders, ..ListState::default() });
                }
            })
            .try_collect()
            .await?;
        level = Vec::new();
        for (names, objects) in next {
            level.extend(names);
            strays.extend(objects);
        }
    }
    level.retain(|p| {
        let hour = p.splitn(3, '/').nth(2).unwrap_or("").trim_end_matches('/');
        range.keeps_hour(hour, layout)
    });
    level.sort();
    Ok((level, strays))
}

/// Lists a topic's archive: every object under its hour folders in range, `parallel` hours at a
/// time, and any object above them (keys that are not archive keys). Sorted by key.
pub async fn list_topic(
    store: &dyn ObjectStore,
    topic: &str,
    range: TimeRange,
    layout: &Layout,
    parallel: usize,
    progress: Option<ListProgress>,
) -> Result<Vec<Listed>, ArchiveError> {
    let (hours, strays) = hour_prefixes(store, topic, range, layout, parallel, progress.as_ref()).await?;
    let total = hours.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let seen = std::sync::atomic::AtomicUsize::new(strays.len());
    let listed = |m: ObjectMeta| {
        let key = m.location.to_string();
        Listed { parsed: parse_key(&key, layout), key, size: m.size }
    };
    let lists: Vec<Vec<Listed>> = futures::stream::iter(hours)
        .map(|prefix| {
            let (done, seen, progress) = (&done, &seen, progress.clone());
            async move {
                let metas: Vec<_> = store
                    .list(Some(&Path::from(prefix.as_str())))
                    .try_collect()
                    .await
                    .map_err(|source| ArchiveError::List { prefix: prefix.clone(), source })?;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                let s = seen.fetch_add(metas.len(), std::sync::atomic::Ordering::Relaxed) + metas.len();
                if let Some(p) = &progress {
                    p(ListState { folders: 0, hours: total, hours_listed: n, objects: s });
                }
                Ok::<_, ArchiveError>(metas.into_iter().map(listed).collect())
            }
        })
        .buffer_unordered(parallel)
        .try_collect()
        .await?;
    let mut all: Vec<Listed> = lists.into_iter().flatten().chain(strays.into_iter().map(listed)).collect();
    all.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(all)
}

/// The objects of one offset, as found.
#[derive(Debug, Clone, Default)]
pub struct OffsetObjects {
    pub payload: Vec<Listed>,
    pub timestamp: Vec<Listed>,
    pub dead_letter: Vec<Listed>,
    pub reason: Vec<Listed>,
}

impl OffsetObjects {
    pub fn all(&self) -> impl Iterator<Item = &Listed> {
        self.payload.iter().chain(&self.timestamp).chain(&self.dead_letter).chain(&self.reason)
    }

    /// The objects grouped by stem ([`Listed::stem`]): one group per time the offset was
    /// archived. An archiver writes a record under one stem, so more than one group is the offset
    /// archived again under another hour folder, under the other root, or with its partition or
    /// offset spelled with other digits.
    pub fn copies(&self, layout: &Layout) -> BTreeMap<&str, Vec<&Listed>> {
        let mut copies: BTreeMap<&str, Vec<&Listed>> = BTreeMap::new();
        for l in self.all() {
            copies.entry(l.stem(layout)).or_default().push(l);
        }
        copies
    }
}

/// Archive objects of a topic grouped by partition and offset; other keys apart.
#[derive(Debug, Default)]
pub struct TopicIndex {
    /// The per-offset (Kafka Connect) layout's objects.
    pub partitions: BTreeMap<i32, BTreeMap<i64, OffsetObjects>>,
    /// The Parquet objects of each partition, by first offset (then key).
    pub batches: BTreeMap<i32, Vec<Listed>>,
    pub unexpected: Vec<Listed>,
}

impl TopicIndex {
    pub fn build(topic: &str, listed: Vec<Listed>) -> TopicIndex {
        let mut index = TopicIndex::default();
        for l in listed {
            match &l.parsed {
                Some(k) if k.topic == topic && k.kind == ObjectKind::Parquet => {
                    index.batches.entry(k.partition).or_default().push(l);
                }
                Some(k) if k.topic == topic => {
                    let slot = index.partitions.entry(k.partition).or_default().entry(k.offset).or_default();
                    match k.kind {
                        ObjectKind::Payload => slot.payload.push(l),
                        ObjectKind::Timestamp => slot.timestamp.push(l),
                        ObjectKind::DeadLetter => slot.dead_letter.push(l),
                        ObjectKind::DeadLetterReason => slot.reason.push(l),
                        ObjectKind::Parquet => unreachable!("kept apart above"),
                    }
                }
                _ => index.unexpected.push(l),
            }
        }
        for objects in index.batches.values_mut() {
            objects.sort_by(|a, b| {
                let first = |l: &Listed| l.parsed.as_ref().map_or(0, |k| k.offset);
                (first(a), &a.key).cmp(&(first(b), &b.key))
            });
        }
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_keys_parse_and_others_do_not() {
        let layout = Layout::default();
        let k = parse_key("topics/s.t/year=2022/month=04/day=18/hour=10/s.t+3+0000000042.bin", &layout).unwrap();
        assert_eq!((k.topic.as_str(), k.partition, k.offset, k.kind), ("s.t", 3, 42, ObjectKind::Payload));
        assert_eq!(k.hour, "year=2022/month=04/day=18/hour=10");
        let k = parse_key("topics/s.t/year=2022/month=04/day=18/hour=10/s.t+3+12345678901-timestamp.txt", &layout);
        assert_eq!(k.map(|k| (k.offset, k.kind)), Some((12_345_678_901, ObjectKind::Timestamp)));
        let k = parse_key("errors/s.t/year=2022/month=04/day=18/hour=10/s.t+0+0000000001.raw", &layout);
        assert_eq!(k.map(|k| k.kind), Some(ObjectKind::DeadLetter));
        let k = parse_key("errors/s.t/year=2022/month=04/day=18/hour=10/s.t+0+0000000001-reason.txt", &layout);
        assert_eq!(k.map(|k| k.kind), Some(ObjectKind::DeadLetterReason));
        let k = parse_key("topics/s.t/year=2022/month=04/day=18/hour=10/s.t+2+0000000100.zstd.parquet", &layout);
        assert_eq!(k.map(|k| (k.partition, k.offset, k.kind)), Some((2, 100, ObjectKind::Parquet)));
        for other in [
            "topics/s.t/year=2022/month=04/day=18/hour=10/s.t+3+0000000042.json", // another extension
            "topics/s.t/year=2022/month=04/day=18/hour=10/other+3+0000000042.bin", // another topic's name
            "topics/s.t/year=2022/month=04/day=18/s.t+3+0000000042.bin",          // no hour
            "topics/s.t/year=2022/month=04/day=18/hour=10/s.t+3+42.bin",          // unpadded offset
            "topics/s.t/year=2022/month=04/day=18/hour=10/notes.txt",
            "errors/s.t/year=2022/month=04/day=18/hour=10/s.t+0+0000000001.bin-conflict.txt",
            "errors/s.t/year=2022/month=04/day=18/hour=10/s.t+0+0000000001.zstd.parquet", // only under topics/
            "topics/s.t/year=2022/month=04/day=18/hour=10/s.t+0+1.zstd.parquet",
        ] {
            assert_eq!(parse_key(other, &layout), None, "{other}");
        }
    }

    #[test]
    fn hours_start_in_the_layout_time_zone_and_ranges_prune_whole_hours() {
        let layout = Layout::default(); // Asia/Tokyo, UTC+9
        let start = hour_start_ms("year=2022/month=04/day=18/hour=10", &layout).unwrap();
        assert_eq!(start, 1_650_243_600_000, "10:00 in Tokyo is 01:00 UTC");
        let range = TimeRange { since_ms: Some(start + 3 * 3_600_000), until_ms: Some(start + 5 * 3_600_000) };
        assert!(!range.keeps_hour("year=2022/month=04/day=18/hour=10", &layout));
        assert!(range.keeps_hour("year=2022/month=04/day=18/hour=13", &layout));
        assert!(!range.keeps_hour("year=2022/month=04/day=18/hour=15", &layout));
    }
}
