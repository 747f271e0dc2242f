//! One progress line per second on stderr during a long phase.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// Prints, once a second until dropped, how many operations of a phase are done and
/// the rate over the last second.
pub struct Progress {
    task: JoinHandle<()>,
}

impl Progress {
    /// Starts reporting `done` (out of `total`, when known) under the name `phase`.
    pub fn start(phase: &'static str, done: Arc<AtomicU64>, total: Option<u64>) -> Self {
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await; // the first tick is immediate
            let mut last = 0;
            loop {
                tick.tick().await;
                let now = done.load(Ordering::Relaxed);
                let of = total.map(|t| format!("/{t}")).unwrap_or_default();
                eprintln!(
                    "[{phase}] {:>5.1}s  {now}{of} done, {}/s in the last second",
                    started.elapsed().as_secs_f64(),
                    now - last
                );
                last = now;
            }
        });
        Progress { task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
    }
}
