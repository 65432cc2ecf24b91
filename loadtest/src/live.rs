//! What the run is doing while it runs, on stderr (stdout is the report's, so `--json` stays
//! one JSON object): on a terminal an `indicatif` progress line redrawn in place (requests done,
//! requests per second, p99 so far, failures, elapsed and remaining time); elsewhere (a log, CI)
//! one plain line a second. The same counts feed the [`Timeline`] behind `--report`.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::report::thousands;
use crate::tally::Sample;
use crate::timeline::{DbScrapes, Second, Timeline};

/// How far the run has to go, for the bar and the time remaining.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// A fixed number of requests (seed, stampede).
    Requests(u64),
    /// Until a deadline (hot, spread).
    Duration(Duration),
}

/// The terminal line: spinner, elapsed time, bar, the counts, time left.
const TEMPLATE: &str = "{spinner} {elapsed:>4} [{bar:24}] {msg}  ~{eta} left";

/// Shared by every request task: each finished request is counted here.
pub struct Live {
    /// Time 0 of the timeline.
    started: Instant,
    goal: Goal,
    timeline: Mutex<Timeline>,
    db: Mutex<DbScrapes>,
    stage: Mutex<String>,
    /// The redrawn line, on a terminal only.
    bar: Option<ProgressBar>,
}

/// A poisoned lock only means a request task panicked mid-count; the counts are still usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Live {
    pub fn new(goal: Goal, replicas: &[String]) -> Arc<Live> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let length = match goal {
                Goal::Requests(n) => n,
                Goal::Duration(d) => d.as_millis() as u64,
            };
            let bar = ProgressBar::with_draw_target(Some(length), ProgressDrawTarget::stderr());
            // A bad template (a unit test reads this one) would only lose the style.
            if let Ok(style) = ProgressStyle::with_template(TEMPLATE) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Arc::new(Live {
            started: Instant::now(),
            goal,
            timeline: Mutex::new(Timeline::default()),
            db: Mutex::new(DbScrapes {
                replicas: replicas.to_vec(),
                scrapes: Vec::new(),
            }),
            stage: Mutex::new(String::new()),
            bar,
        })
    }

    /// Counts one finished request.
    pub fn count(&self, sample: &Sample) {
        let mut timeline = lock(&self.timeline);
        // Read under the lock, so the timeline sees times in order.
        timeline.record(self.started.elapsed(), sample);
    }

    /// What the run is at (`wave 3/25`), shown on the line.
    pub fn stage(&self, text: String) {
        *lock(&self.stage) = text;
    }

    /// Redraws the line, or prints one, every second until the task is aborted.
    pub async fn show(self: Arc<Live>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        let mut last = (Instant::now(), 0u64);
        loop {
            tick.tick().await;
            let (responses, failures, p99) = {
                let t = lock(&self.timeline);
                (t.responses, t.failures, t.p99_ms())
            };
            let done = responses + failures;
            let now = Instant::now();
            let rate = (done - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
            last = (now, done);
            let stage = lock(&self.stage).clone();
            let counts = format!(
                "{stage}  {} requests  {}/s  p99 {p99:.2} ms  {} failed",
                thousands(done),
                thousands(rate.round() as u64),
                thousands(failures)
            );
            let elapsed = self.started.elapsed();
            match &self.bar {
                Some(bar) => {
                    bar.set_position(match self.goal {
                        Goal::Requests(_) => done,
                        Goal::Duration(d) => elapsed.min(d).as_millis() as u64,
                    });
                    bar.set_message(counts);
                }
                None => eprintln!(
                    "loadtest: {:>4.0}s  {counts}{}",
                    elapsed.as_secs_f64(),
                    match self.goal {
                        Goal::Duration(d) =>
                            format!("  {:.0}s left", d.saturating_sub(elapsed).as_secs_f64()),
                        Goal::Requests(n) => format!("  of {}", thousands(n)),
                    }
                ),
            }
        }
    }

    /// Scrapes every replica's `db_hits_total` once a second until the task is aborted, for
    /// the report's DB-queries chart. A failed scrape leaves a gap; the run's own scrapes
    /// before and after are what decide whether the service could be read.
    pub async fn scrape_db(self: Arc<Live>, client: reqwest::Client, metrics: Vec<String>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Ok(fleet) = crate::client::snapshot_fleet(&client, &metrics, true).await {
                let at = self.started.elapsed().as_secs_f64();
                let values = fleet.0.iter().map(|(_, s)| s.db_hits()).collect();
                lock(&self.db).scrapes.push((at, values));
            }
        }
    }

    /// Ends the line (leaving its last state on the terminal) and hands over what was recorded.
    pub fn finish(&self) -> (Vec<Second>, DbScrapes) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        let elapsed = self.started.elapsed();
        let timeline = std::mem::take(&mut *lock(&self.timeline));
        let db = std::mem::take(&mut *lock(&self.db));
        (timeline.finish(elapsed), db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_terminal_line_template_is_valid() {
        assert!(ProgressStyle::with_template(TEMPLATE).is_ok());
    }
}
