//! Which topics are archived: KAFKA_TOPIC's names and patterns, minus KAFKA_TOPIC_EXCLUDE.
//!
//! An entry that begins with `^` is a regular expression, as in librdkafka's subscriptions; any
//! other entry is a topic name. A pattern matches a topic when it matches somewhere in its name, as
//! librdkafka's does (anchored at the start by its `^`; add `$` to anchor the end). Patterns never
//! match Kafka's internal topics (`__consumer_offsets`, `__transaction_state`), as Kafka's own
//! pattern subscriptions do not. The daemon's consumer, `check` and `verify` resolve a selection
//! the same way, against the topics the cluster (or the archive) has: [`TopicSelection::resolve`].

use std::fmt;

use regex::Regex;

/// One entry of KAFKA_TOPIC or KAFKA_TOPIC_EXCLUDE.
#[derive(Debug, Clone)]
enum Entry {
    Name(String),
    Pattern(Regex),
}

impl Entry {
    fn matches(&self, topic: &str) -> bool {
        match self {
            Entry::Name(n) => n == topic,
            Entry::Pattern(p) => !topic.starts_with("__") && p.is_match(topic),
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Name(n) => f.write_str(n),
            Entry::Pattern(p) => f.write_str(p.as_str()),
        }
    }
}

/// KAFKA_TOPIC and KAFKA_TOPIC_EXCLUDE, parsed.
#[derive(Debug, Clone)]
pub struct TopicSelection {
    include: Vec<Entry>,
    exclude: Vec<Entry>,
}

impl TopicSelection {
    /// Parses the two settings; the error says which entry is wrong and why (the caller names the
    /// variable).
    pub fn parse(include: &str, exclude: Option<&str>) -> Result<TopicSelection, (&'static str, String)> {
        let include = parse_entries(include).map_err(|e| ("KAFKA_TOPIC", e))?;
        let exclude = match exclude.map(str::trim).filter(|e| !e.is_empty()) {
            Some(e) => parse_entries(e).map_err(|e| ("KAFKA_TOPIC_EXCLUDE", e))?,
            None => Vec::new(),
        };
        Ok(TopicSelection { include, exclude })
    }

    /// The topics named in KAFKA_TOPIC (not those its patterns match), in the order given.
    pub fn names(&self) -> Vec<String> {
        self.include
            .iter()
            .filter_map(|e| match e {
                Entry::Name(n) => Some(n.clone()),
                Entry::Pattern(_) => None,
            })
            .collect()
    }

    /// The selection as one expression, as Kafka Connect's `topics.regex` takes it: the patterns
    /// as given and each name as `^name$` (Connect matches the whole name, where the archiver
    /// searches: a pattern without `$` means more here).
    pub fn as_one_pattern(&self) -> String {
        let one = |e: &Entry| match e {
            Entry::Pattern(p) => p.as_str().to_string(),
            Entry::Name(n) => format!("^{}$", regex::escape(n)),
        };
        self.include.iter().map(one).collect::<Vec<_>>().join("|")
    }

    /// Whether KAFKA_TOPIC holds a pattern: then the topics archived are known only from the
    /// cluster's (or the archive's) list of topics.
    pub fn has_patterns(&self) -> bool {
        self.include.iter().any(|e| matches!(e, Entry::Pattern(_)))
    }

    /// The one topic named, when KAFKA_TOPIC is exactly one name (what `restore` takes).
    pub fn single_name(&self) -> Option<&str> {
        match self.include.as_slice() {
            [Entry::Name(n)] => Some(n),
            _ => None,
        }
    }

    /// Whether `topic` is archived: KAFKA_TOPIC names it, or a pattern matches it and
    /// KAFKA_TOPIC_EXCLUDE does not (the exclusions apply to the patterns only, so a tool's
    /// `--topic T` is never refused by an exclusion in `.env`).
    pub fn selects(&self, topic: &str) -> bool {
        let named = self.include.iter().any(|e| matches!(e, Entry::Name(n) if n == topic));
        named
            || (self.include.iter().any(|e| matches!(e, Entry::Pattern(_)) && e.matches(topic))
                && !self.exclude.iter().any(|e| e.matches(topic)))
    }

    /// The topics archived, given the topics that exist: every name (a named topic that does not
    /// exist yet is still subscribed to, and archived once created) and every existing topic a
    /// pattern matches but an exclusion does not; sorted, once each.
    pub fn resolve<'a>(&self, existing: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut out = self.names();
        out.extend(existing.into_iter().filter(|t| self.selects(t)).map(str::to_string));
        out.sort();
        out.dedup();
        out
    }
}

impl fmt::Display for TopicSelection {
    /// As given: `^sensor-.*,camera` and, when there is one, ` excluding sensor-test`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let join = |entries: &[Entry]| entries.iter().map(Entry::to_string).collect::<Vec<_>>().join(",");
        f.write_str(&join(&self.include))?;
        if !self.exclude.is_empty() {
            write!(f, " excluding {}", join(&self.exclude))?;
        }
        Ok(())
    }
}

fn parse_entries(value: &str) -> Result<Vec<Entry>, String> {
    let mut out: Vec<Entry> = Vec::new();
    for t in split(value).into_iter().map(str::trim) {
        if t.is_empty() {
            return Err(format!("{value:?} has an empty entry"));
        }
        let entry = if t.starts_with('^') {
            Entry::Pattern(Regex::new(t).map_err(|e| format!("{t:?} is not a regular expression: {e}"))?)
        } else {
            // Kafka's own rule; it also keeps topic names safe inside object keys.
            let legal = t.len() <= 249
                && t != "."
                && t != ".."
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
            if !legal {
                return Err(format!(
                    "{t:?} is not a legal Kafka topic name (letters, digits, '.', '_', '-'; at most 249; \
                     a pattern begins with ^)"
                ));
            }
            Entry::Name(t.to_string())
        };
        if !out.iter().any(|o| o.to_string() == entry.to_string()) {
            out.push(entry);
        }
    }
    Ok(out)
}

/// Splits a list at its commas, except those inside a pattern's `{m,n}` or `[...]`, or escaped.
fn split(value: &str) -> Vec<&str> {
    let (mut parts, mut start, mut depth, mut escaped) = (Vec::new(), 0, 0usize, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(include: &str, exclude: &str) -> TopicSelection {
        TopicSelection::parse(include, Some(exclude)).unwrap()
    }

    #[test]
    fn names_and_patterns_resolve_against_the_cluster() {
        let s = sel("^sensor-.*,camera", "sensor-test");
        let existing = ["sensor-a", "sensor-b", "sensor-test", "other", "xsensor-c", "__consumer_offsets"];
        // camera does not exist yet: still subscribed, archived once created.
        assert_eq!(s.resolve(existing), ["camera", "sensor-a", "sensor-b"]);
        assert!(s.has_patterns());
        assert_eq!(s.names(), ["camera"]);
        assert_eq!(s.to_string(), "^sensor-.*,camera excluding sensor-test");
    }

    #[test]
    fn a_pattern_is_searched_as_librdkafka_does_and_skips_internal_topics() {
        let s = sel("^sensor", "");
        assert!(s.selects("sensor") && s.selects("sensors.tokyo"));
        assert!(!s.selects("my-sensor"));
        let anchored = sel("^sensor$", "");
        assert!(anchored.selects("sensor") && !anchored.selects("sensors"));
        let all = sel("^.*", "");
        assert!(all.selects("x") && !all.selects("__consumer_offsets"));
        // An internal topic named explicitly is taken (an operator's choice).
        assert!(sel("__consumer_offsets", "").selects("__consumer_offsets"));
    }

    #[test]
    fn exclusions_take_names_and_patterns_and_apply_to_patterns_only() {
        let s = sel("^sensor-.*", "sensor-a,^sensor-tmp-");
        assert!(!s.selects("sensor-a") && !s.selects("sensor-tmp-1"));
        assert!(s.selects("sensor-b") && s.selects("sensor-ab"));
        assert_eq!(s.resolve(["sensor-a", "sensor-b", "sensor-tmp-1"]), ["sensor-b"]);
        // A name is taken whatever the exclusions say: `verify --topic sensor-a` with the .env.
        let named = sel("sensor-a,^sensor-", "sensor-a");
        assert!(named.selects("sensor-a"));
        assert_eq!(named.resolve(["sensor-a", "sensor-b"]), ["sensor-a", "sensor-b"]);
    }

    #[test]
    fn an_alternation_needs_its_group_to_stay_anchored() {
        assert!(sel("^a|b", "").selects("xbx"), "the regex crate's precedence, as librdkafka's");
        assert!(!sel("^(a|b)", "").selects("xbx"));
        assert_eq!(sel("^s-.*,cam.1", "").as_one_pattern(), r"^s-.*|^cam\.1$");
    }

    #[test]
    fn commas_inside_a_pattern_stay_in_it() {
        let s = sel(r"^s[,x]-\d{2,3}$,camera", "");
        assert_eq!(s.to_string(), r"^s[,x]-\d{2,3}$,camera");
        assert!(s.selects("s,-12") && s.selects("sx-123") && !s.selects("sx-1") && s.selects("camera"));
        assert_eq!(sel(r"^a\,b", "").to_string(), r"^a\,b");
    }

    #[test]
    fn bad_entries_are_named() {
        let err = |i: &str, x: Option<&str>| TopicSelection::parse(i, x).unwrap_err();
        let (var, why) = err("^sensor-(", None);
        assert_eq!(var, "KAFKA_TOPIC");
        assert!(why.contains("not a regular expression"), "{why}");
        assert!(err("a/b", None).1.contains("a pattern begins with ^"));
        assert!(err("a,,b", None).1.contains("empty entry"));
        assert_eq!(err("x", Some("bad/name")).0, "KAFKA_TOPIC_EXCLUDE");
        // An empty exclusion is none.
        assert!(TopicSelection::parse("x", Some(" ")).is_ok());
    }

    #[test]
    fn single_names_and_duplicates() {
        assert_eq!(sel("x,y,x", "").names(), ["x", "y"]);
        assert_eq!(sel("x", "").single_name(), Some("x"));
        assert_eq!(sel("x,y", "").single_name(), None);
        assert_eq!(sel("^x", "").single_name(), None);
    }
}
