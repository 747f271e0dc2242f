//! A busy worker stays awake a moment before it sleeps.
//!
//! A worker thread that runs out of tasks parks in the kernel (`epoll_wait`) until the
//! next packet or timer. On a virtual machine an idle CPU halts, and waking it for the
//! next packet costs the hypervisor a round trip, long next to the microseconds that
//! packet's own work takes. Under load the next packet comes within microseconds, so
//! a worker that parks often and briefly first yields its CPU in a loop for up to a
//! spin window (any other thread that is ready runs meanwhile) and only then parks: a
//! packet that arrived during the spin is taken when the spin ends, without the CPU
//! halting and waking in between. The worker cannot see it sooner (readiness comes
//! from `epoll_wait`), so an open window is always spun whole: it adds up to its
//! length to the wait of a packet that comes during it, and that much CPU to the park.
//!
//! The window adapts to how long the parks last, as the kernel's halt-polling
//! governor does for a guest's idle loop: a park that ended within the largest
//! window sets it to the largest (a spin would have caught that wake-up, or did); a
//! longer one halves it, and below an eighth of the largest it is zero. An idle node
//! (parks of milliseconds or seconds) therefore spins at most a few times after each
//! burst of work, and a node under a steady load of one wake-up every few hundred
//! microseconds, which a short spin would not catch, does not spin either.
//! Measured in docs/benchmarks.md (twenty-eighth series).

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Parks that began with a spin, in this process.
static SPUN: AtomicU64 = AtomicU64::new(0);

/// The spin window of one worker thread, adapted park by park.
#[derive(Debug)]
pub(crate) struct SpinWindow {
    max: Duration,
    window: Duration,
    /// When the current park began (after its spin), if the worker is parked.
    parked_at: Option<Instant>,
}

impl SpinWindow {
    /// A window of at most `max`, starting closed (a worker starts idle).
    pub(crate) fn new(max: Duration) -> Self {
        SpinWindow {
            max,
            window: Duration::ZERO,
            parked_at: None,
        }
    }

    /// How long to spin before the park about to begin.
    pub(crate) fn spin(&self) -> Duration {
        self.window
    }

    /// The park began at `at` (after its spin).
    pub(crate) fn parked(&mut self, at: Instant) {
        self.parked_at = Some(at);
    }

    /// The park ended at `at`: adapts the window to how long it lasted.
    pub(crate) fn unparked(&mut self, at: Instant) {
        let Some(parked_at) = self.parked_at.take() else {
            return;
        };
        let slept = at.saturating_duration_since(parked_at);
        self.window = if slept <= self.max {
            self.max
        } else {
            let half = self.window / 2;
            if half < self.max / 8 {
                Duration::ZERO
            } else {
                half
            }
        };
    }
}

thread_local! {
    static WINDOW: RefCell<Option<SpinWindow>> = const { RefCell::new(None) };
}

/// Makes the runtime's workers spin for up to `max` before they park, as the module
/// describes; nothing when `max` is zero.
pub(crate) fn install(builder: &mut tokio::runtime::Builder, max: Duration) {
    if max.is_zero() {
        return;
    }
    builder.on_thread_park(move || {
        WINDOW.with(|w| {
            let mut w = w.borrow_mut();
            let w = w.get_or_insert_with(|| SpinWindow::new(max));
            let spin = w.spin();
            if !spin.is_zero() {
                SPUN.fetch_add(1, Ordering::Relaxed);
                let start = Instant::now();
                // Yields, not a busy loop: the CPU goes to any other thread that is
                // ready (the machine's other processes among them).
                while start.elapsed() < spin {
                    std::thread::yield_now();
                }
            }
            w.parked(Instant::now());
        });
    });
    builder.on_thread_unpark(|| {
        WINDOW.with(|w| {
            if let Some(w) = w.borrow_mut().as_mut() {
                w.unparked(Instant::now());
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: Duration = Duration::from_micros(50);

    fn park(w: &mut SpinWindow, start: Instant, slept_us: u64) -> Instant {
        w.parked(start);
        let end = start + Duration::from_micros(slept_us);
        w.unparked(end);
        end
    }

    #[test]
    fn starts_closed_and_opens_on_a_short_park() {
        let mut w = SpinWindow::new(MAX);
        assert_eq!(w.spin(), Duration::ZERO, "a worker starts idle");
        let t = Instant::now();
        park(&mut w, t, 10);
        assert_eq!(w.spin(), MAX);
        // A park that ended at once (the spin caught the wake-up) keeps it open.
        park(&mut w, t, 0);
        assert_eq!(w.spin(), MAX);
        // One just within the window too.
        park(&mut w, t, 50);
        assert_eq!(w.spin(), MAX);
    }

    #[test]
    fn long_parks_halve_it_then_close_it() {
        let mut w = SpinWindow::new(MAX);
        let t = Instant::now();
        park(&mut w, t, 1);
        assert_eq!(w.spin(), MAX);
        park(&mut w, t, 51);
        assert_eq!(w.spin(), MAX / 2);
        park(&mut w, t, 5_000);
        assert_eq!(w.spin(), MAX / 4);
        park(&mut w, t, 300);
        assert_eq!(w.spin(), MAX / 8);
        park(&mut w, t, 300);
        assert_eq!(w.spin(), Duration::ZERO, "below an eighth it closes");
        park(&mut w, t, 5_000_000);
        assert_eq!(w.spin(), Duration::ZERO);
        // Load comes back: the next short park opens it again.
        park(&mut w, t, 20);
        assert_eq!(w.spin(), MAX);
    }

    #[test]
    fn an_unpark_without_a_park_changes_nothing() {
        let mut w = SpinWindow::new(MAX);
        let t = Instant::now();
        w.unparked(t);
        assert_eq!(w.spin(), Duration::ZERO);
        park(&mut w, t, 1);
        w.unparked(t + Duration::from_secs(1));
        assert_eq!(w.spin(), MAX, "only a park's own end adapts the window");
    }

    #[test]
    fn workers_spin_and_still_run_tasks() {
        // A real runtime with the hooks installed: tasks that wake it over and over,
        // with and without pauses, all complete, and the worker spun before some of
        // its parks. The window is wide (5 ms) so that a park between two tasks opens
        // it even on a loaded machine, where a wake-up from another thread can take
        // longer than the default 50 us; one such park among fifty is enough.
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(1).enable_all();
        install(&mut builder, Duration::from_millis(5));
        let rt = builder.build().unwrap();
        let done = rt.block_on(async {
            let mut n = 0u32;
            for i in 0..50u32 {
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    if i % 10 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let _ = tx.send(i);
                });
                n += u32::from(rx.await.unwrap() == i);
            }
            n
        });
        assert_eq!(done, 50);
        assert!(SPUN.load(Ordering::Relaxed) > 0, "the worker never spun");
    }
}
