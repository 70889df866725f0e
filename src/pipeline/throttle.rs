//! Throttle: trouble that repeats (a broker or a store that is down) is said once, at once, then
//! at most once every [`EVERY`] while it lasts, with how often it happened meanwhile, and once more
//! when it ends. librdkafka reports a broker that refuses connections about 20 times a second, and
//! every upload in flight fails on its own: said each time, the cause scrolls away in seconds.
//!
//! The callers write the lines (their level, words and fields); this only decides when. Written
//! here rather than taken from a crate: the rate-limiting crates drop repeats, and the point is to
//! count them and to say when the trouble ends.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The most often a trouble that goes on is said again.
pub const EVERY: Duration = Duration::from_secs(10);

/// What to say about one more occurrence of a trouble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Say {
    /// It just started: say what is wrong and what to check.
    First,
    /// It goes on: say that it still does, and how often it happened since it was last said.
    Again { times: u64, since: Duration },
    /// Said recently: nothing.
    Nothing,
}

/// A trouble that ended: how long it lasted and how often it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    pub lasted: Duration,
    pub times: u64,
}

#[derive(Debug)]
struct Ongoing {
    since: Instant,
    said_at: Instant,
    last_at: Instant,
    /// Occurrences since it was last said.
    unsaid: u64,
    times: u64,
}

/// Troubles by kind (`K`: an error code, or `()` for one kind).
#[derive(Debug)]
pub struct Throttle<K> {
    every: Duration,
    ongoing: Mutex<HashMap<K, Ongoing>>,
}

impl<K: Eq + Hash + Clone> Default for Throttle<K> {
    fn default() -> Self {
        Throttle::new(EVERY)
    }
}

impl<K: Eq + Hash + Clone> Throttle<K> {
    pub fn new(every: Duration) -> Self {
        Throttle { every, ongoing: Mutex::new(HashMap::new()) }
    }

    /// The trouble `kind` happened (again).
    pub fn happened(&self, kind: &K) -> Say {
        self.happened_at(kind, Instant::now())
    }

    fn happened_at(&self, kind: &K, now: Instant) -> Say {
        let mut ongoing = self.ongoing.lock().expect("throttle lock");
        let Some(o) = ongoing.get_mut(kind) else {
            ongoing.insert(kind.clone(), Ongoing { since: now, said_at: now, last_at: now, unsaid: 0, times: 1 });
            return Say::First;
        };
        o.times += 1;
        o.unsaid += 1;
        o.last_at = now;
        if now.duration_since(o.said_at) < self.every {
            return Say::Nothing;
        }
        let say = Say::Again { times: o.unsaid, since: now.duration_since(o.said_at) };
        (o.said_at, o.unsaid) = (now, 0);
        say
    }

    /// Every trouble going on is over (the broker or the store answered): each one that was.
    pub fn ended(&self) -> Vec<(K, Ended)> {
        self.ended_at(Instant::now())
    }

    fn ended_at(&self, now: Instant) -> Vec<(K, Ended)> {
        let mut ongoing = self.ongoing.lock().expect("throttle lock");
        ongoing.drain().map(|(k, o)| (k, Ended { lasted: now.duration_since(o.since), times: o.times })).collect()
    }

    /// The troubles whose last occurrence `over` says is over (given when it was) end: for trouble
    /// that comes and goes (one request failing among many that succeed), a success alone does
    /// not end it.
    pub fn end_where(&self, over: impl Fn(Instant) -> bool) -> Vec<(K, Ended)> {
        let mut ongoing = self.ongoing.lock().expect("throttle lock");
        let done: Vec<K> = ongoing.iter().filter(|(_, o)| over(o.last_at)).map(|(k, _)| k.clone()).collect();
        done.into_iter()
            .filter_map(|k| {
                let o = ongoing.remove(&k)?;
                Some((k, Ended { lasted: o.last_at.duration_since(o.since), times: o.times }))
            })
            .collect()
    }

    /// Whether any trouble is going on (cheap enough for every successful request).
    pub fn any(&self) -> bool {
        !self.ongoing.lock().expect("throttle lock").is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn said_at_once_then_once_per_period_with_the_count_then_when_it_ends() {
        let t: Throttle<&str> = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        assert_eq!(t.happened_at(&"down", at(0)), Say::First);
        // 20 times a second for 25 s: said again twice, each time with what went unsaid.
        let mut said = Vec::new();
        for i in 1..500 {
            match t.happened_at(&"down", at(i * 50)) {
                Say::Nothing => {}
                say => said.push(say),
            }
        }
        assert_eq!(
            said,
            [
                Say::Again { times: 200, since: Duration::from_secs(10) },
                Say::Again { times: 200, since: Duration::from_secs(10) }
            ]
        );
        assert_eq!(t.happened_at(&"other", at(25_000)), Say::First, "another kind is said on its own");
        assert!(t.any());
        let mut ended = t.ended_at(at(30_000));
        ended.sort_by_key(|(k, _)| *k);
        assert_eq!(ended[0], ("down", Ended { lasted: Duration::from_secs(30), times: 500 }));
        assert_eq!(ended[1].1.times, 1);
        assert!(!t.any() && t.ended_at(at(31_000)).is_empty(), "said to end once");
        assert_eq!(t.happened_at(&"down", at(40_000)), Say::First, "it starts again");
    }

    #[test]
    fn trouble_that_comes_and_goes_ends_where_the_caller_says() {
        let t: Throttle<&str> = Throttle::new(Duration::from_secs(10));
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(t.happened_at(&"503", at(0)), Say::First);
        assert_eq!(t.happened_at(&"503", at(8)), Say::Nothing, "still the same trouble");
        assert_eq!(t.happened_at(&"403", at(9)), Say::First, "another kind is said at once");
        // Over when it last happened 10 s before now (18 s).
        let ended = t.end_where(|last| last + Duration::from_secs(10) <= at(18));
        assert_eq!(ended, [("503", Ended { lasted: Duration::from_secs(8), times: 2 })]);
        assert!(t.any(), "the 403 happened 9 s before");
    }
}
