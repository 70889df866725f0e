//! Pace: how many uploads may be in flight, and how fast they may start.
//!
//! Every upload attempt takes a permit first ([`UploadPace::acquire`]) and hands it back with its
//! outcome ([`Permit::done`]). Two limits decide:
//!
//! - **In flight**, additive increase and multiplicative decrease, as TCP paces itself: when the
//!   store asks an attempt to slow down (503 SlowDown, 429; `crate::store::watch_slow_downs`), the
//!   limit halves, once per round: attempts that started before the last decrease were sent at the
//!   old pace and are not counted again. Each attempt that succeeds unasked adds `1/limit`, so the
//!   limit climbs back by about one per round of uploads. Never below 1, never above
//!   UPLOAD_WORKERS.
//! - **Rate** (UPLOAD_RATE_LIMIT, off by default): a token bucket of uploads per second, holding
//!   a tenth of a second's worth (at least one), for a store with a known request quota: a store
//!   that meters its quota over short windows refuses a longer burst.
//!
//! Both live under one lock, and a waiting upload sleeps until a permit is returned or a token is
//! due. (A rate-limiting crate would add a second waiting mechanism beside the in-flight limit.)

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::metrics as m;
use crate::pipeline::throttle::{Say, Throttle};

/// The rate limit's bucket holds this long's worth of tokens.
const BURST: Duration = Duration::from_millis(100);

/// Tokens the bucket holds at most.
fn burst(rate: f64) -> f64 {
    (rate * BURST.as_secs_f64()).max(1.0)
}

/// Counts the store's slow-down answers (upload_errors_total{reason="slow_down"}); every one is
/// counted where it is seen, those object_store retried included.
pub fn count_slow_downs(answers: u32) {
    if answers > 0 {
        metrics::counter!(m::UPLOAD_ERRORS, "reason" => crate::store::SLOW_DOWN).increment(u64::from(answers));
    }
}

#[derive(Debug)]
pub struct UploadPace {
    max: usize,
    rate: Option<f64>,
    state: Mutex<State>,
    returned: Notify,
    said: Throttle<()>,
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    /// Decreases so far: a permit taken before the last one belongs to the round already slowed.
    decreases: u64,
    /// Rate tokens, and when they were last refilled.
    tokens: f64,
    refilled: Instant,
}

/// An upload attempt in flight; dropping it returns its place.
#[derive(Debug)]
pub struct Permit<'a> {
    pace: &'a UploadPace,
    /// [`State::decreases`] when it was taken.
    round: u64,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.pace.state.lock().expect("pace lock").in_flight -= 1;
        self.pace.returned.notify_waiters();
    }
}

impl Permit<'_> {
    /// The attempt is over: `slowed` of its requests were asked to slow down. Halves the limit (once
    /// per round), or raises it a little after a success.
    pub fn done(self, succeeded: bool, slowed: u32) {
        let pace = self.pace;
        count_slow_downs(slowed);
        let mut s = pace.state.lock().expect("pace lock");
        if slowed > 0 {
            if self.round != s.decreases {
                return;
            }
            s.decreases += 1;
            s.limit = (s.limit / 2.0).max(1.0);
            let limit = s.limit.floor();
            // Under the lock, so that two attempts ending together leave the newer value.
            metrics::gauge!(m::UPLOAD_CONCURRENCY_LIMIT).set(limit);
            drop(s);
            if let Say::First | Say::Again { .. } = pace.said.happened(&()) {
                tracing::warn!(
                    in_flight_limit = limit,
                    "the store asks to slow down (503 SlowDown or 429): fewer uploads in flight; the limit climbs back as the store takes them"
                );
            }
        } else if succeeded && s.limit < pace.max as f64 {
            let before = s.limit.floor();
            s.limit = (s.limit + 1.0 / s.limit).min(pace.max as f64);
            let limit = s.limit.floor();
            if limit != before {
                metrics::gauge!(m::UPLOAD_CONCURRENCY_LIMIT).set(limit);
                drop(s);
                // A higher limit lets a waiting upload start.
                pace.returned.notify_waiters();
            }
        }
    }
}

impl UploadPace {
    /// Up to `max` uploads in flight, at most `rate` a second when given.
    pub fn new(max: usize, rate: Option<f64>) -> UploadPace {
        let max = max.max(1);
        metrics::gauge!(m::UPLOAD_CONCURRENCY_LIMIT).set(max as f64);
        UploadPace {
            max,
            rate,
            state: Mutex::new(State {
                limit: max as f64,
                in_flight: 0,
                decreases: 0,
                tokens: rate.map_or(0.0, burst),
                refilled: Instant::now(),
            }),
            returned: Notify::new(),
            said: Throttle::default(),
        }
    }

    /// Waits for a place in flight (and a rate token).
    pub async fn acquire(&self) -> Permit<'_> {
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            // Registered before the state is read: a permit returned meanwhile wakes it.
            returned.as_mut().enable();
            match self.try_acquire(Instant::now()) {
                Ok(round) => return Permit { pace: self, round },
                Err(None) => returned.await,
                Err(Some(due)) => {
                    tokio::select! {
                        _ = returned => {}
                        _ = tokio::time::sleep(due) => {}
                    }
                }
            }
        }
    }

    /// Takes a place if one is free and a token is there (the round it is taken in); else how long
    /// until the next token (None: wait for a place).
    fn try_acquire(&self, now: Instant) -> Result<u64, Option<Duration>> {
        let mut s = self.state.lock().expect("pace lock");
        if s.in_flight as f64 >= s.limit.floor() {
            return Err(None);
        }
        if let Some(rate) = self.rate {
            s.tokens = (s.tokens + now.duration_since(s.refilled).as_secs_f64() * rate).min(burst(rate));
            s.refilled = now;
            if s.tokens < 1.0 {
                return Err(Some(Duration::from_secs_f64((1.0 - s.tokens) / rate)));
            }
            s.tokens -= 1.0;
        }
        s.in_flight += 1;
        Ok(s.decreases)
    }

    /// The current limit of uploads in flight.
    #[cfg(test)]
    fn limit(&self) -> usize {
        self.state.lock().expect("pace lock").limit.floor() as usize
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_round_of_slow_downs_halves_the_limit_once_and_successes_raise_it_back() {
        let pace = UploadPace::new(32, None);
        let round: Vec<_> = futures::future::join_all((0..32).map(|_| pace.acquire())).await;
        for permit in round {
            permit.done(false, 2);
        }
        assert_eq!(pace.limit(), 16, "the 32 attempts of one round are one decrease");
        for expected in [8, 4, 2, 1, 1] {
            pace.acquire().await.done(true, 1);
            assert_eq!(pace.limit(), expected, "each later round halves it again, never below one");
        }
        // About one more per round of `limit` successes: 1 + 2 + … + 31.
        let mut successes = 0;
        while pace.limit() < 32 {
            pace.acquire().await.done(true, 0);
            successes += 1;
        }
        assert!((450..=550).contains(&successes), "{successes} successes from 1 to 32");
        pace.acquire().await.done(true, 0);
        assert_eq!(pace.limit(), 32, "never above UPLOAD_WORKERS");
    }

    #[tokio::test]
    async fn no_more_in_flight_than_the_limit() {
        let pace = Arc::new(UploadPace::new(3, None));
        let a = pace.acquire().await;
        let b = pace.acquire().await;
        let c = pace.acquire().await;
        let waiting = tokio::spawn({
            let pace = pace.clone();
            async move {
                let _d = pace.acquire().await;
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "a fourth waits");
        // Slowed down, the limit is 1: two in flight still hold it back.
        c.done(true, 1);
        drop(a);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "the limit is 1 and one is in flight");
        drop(b);
        tokio::time::timeout(Duration::from_secs(1), waiting).await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_spaces_the_starts() {
        let pace = UploadPace::new(32, Some(20.0));
        let started = Instant::now();
        for _ in 0..42 {
            drop(pace.acquire().await);
        }
        // A tenth of a second's worth at once (2), then 40 more at 20 a second (the clock is
        // tokio's, paused).
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(1950) && took <= Duration::from_millis(2050), "{took:?}");
    }
}
