//! Progress of a tool that walks an archive and a topic (`verify`, `restore`): a bar on a
//! terminal, a line every 10 s otherwise, on stderr so that a report on stdout stays clean.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::archive;

/// Progress on stderr: a bar on a terminal, a line every 10 s otherwise.
pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    what: String,
    last_line: std::sync::Mutex<Instant>,
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub fn new(what: &str) -> Arc<Progress> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(Progress::style(true));
            b.set_message(what.to_string());
            b
        });
        Arc::new(Progress {
            bar,
            what: what.to_string(),
            last_line: std::sync::Mutex::new(Instant::now()),
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
        })
    }

    /// A bar with a count and a rate (whole records a second), or the message alone (a listing,
    /// whose size is not known until it is over).
    fn style(bar: bool) -> indicatif::ProgressStyle {
        let template = if bar { "{msg} [{bar:40}] {pos}/{len} ({rate}, eta {eta})" } else { "{msg}" };
        indicatif::ProgressStyle::with_template(template)
            .expect("a valid template")
            .with_key("rate", |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.0}/s", s.per_sec());
            })
            .progress_chars("=> ")
    }

    /// A listing of `topic` goes on: the folders searched for hour folders, then the hour folders
    /// listed and the objects found.
    pub fn listing(&self, topic: &str, state: archive::ListState) {
        let text = if state.hours == 0 {
            format!("listing {topic}: looking for hour folders, {} folders listed", state.folders)
        } else {
            format!(
                "listing {topic}: {} of {} hour folders, {} objects",
                state.hours_listed, state.hours, state.objects
            )
        };
        match &self.bar {
            Some(b) => b.set_message(text),
            None => {
                let mut last = self.last_line.lock().expect("progress lock");
                if last.elapsed() >= Duration::from_secs(10) {
                    *last = Instant::now();
                    eprintln!("{}: {text}", self.what);
                }
            }
        }
    }

    /// The start of a listing: the message alone until it is over.
    pub fn start_listing(&self, topic: &str) {
        match &self.bar {
            Some(b) => {
                b.set_style(Progress::style(false));
                b.set_message(format!("listing {topic}"));
            }
            None => eprintln!("{}: listing {topic}", self.what),
        }
    }

    pub fn set_stage(&self, what: &str, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        match &self.bar {
            Some(b) => {
                b.set_style(Progress::style(true));
                b.set_message(what.to_string());
                b.set_length(total);
                b.set_position(0);
            }
            None => eprintln!("{}: {what} ({total})", self.what),
        }
    }

    pub fn set(&self, done: u64, total: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.tick();
    }

    pub fn inc(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        self.tick();
    }

    fn tick(&self) {
        let (done, total) = (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed));
        match &self.bar {
            Some(b) => {
                b.set_length(total.max(done));
                b.set_position(done);
            }
            None => {
                let mut last = self.last_line.lock().expect("progress lock");
                if last.elapsed() >= Duration::from_secs(10) {
                    *last = Instant::now();
                    // Some brokers give end offsets below what is read: the count is never past the end.
                    eprintln!("{}: {done} of {}", self.what, total.max(done));
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
