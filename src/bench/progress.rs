//! The progress line on stderr: redrawn in place with `\r` on a terminal,
//! a plain line every few seconds otherwise (logs, CI), none with --quiet.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, Instant};

/// How often a caller should redraw.
pub const TICK: Duration = Duration::from_millis(250);
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    enabled: bool,
    tty: bool,
    /// A `\r` line is on screen and must be cleared before other output.
    drawn: Cell<bool>,
    last_plain: Cell<Option<Instant>>,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        Progress {
            enabled: !quiet,
            tty: std::io::stderr().is_terminal(),
            drawn: Cell::new(false),
            last_plain: Cell::new(None),
        }
    }

    /// A line of its own, e.g. the phase that starts now.
    pub fn note(&self, text: &str) {
        if !self.enabled {
            return;
        }
        self.clear();
        eprintln!("meshbroker bench: {text}");
    }

    /// `burst  53% 53000/100000 acked  14210 msg/s`.
    pub fn show(&self, label: &str, done: u64, total: u64, what: &str, rate: f64, unit: &str) {
        if !self.enabled {
            return;
        }
        let line = line(label, done, total, what, rate, unit);
        if self.tty {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r{line}\x1b[K");
            let _ = err.flush();
            self.drawn.set(true);
        } else {
            let due = self
                .last_plain
                .get()
                .is_none_or(|t| t.elapsed() >= PLAIN_EVERY);
            if due {
                self.last_plain.set(Some(Instant::now()));
                eprintln!("{line}");
            }
        }
    }

    pub fn clear(&self) {
        if self.drawn.replace(false) {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

fn line(label: &str, done: u64, total: u64, what: &str, rate: f64, unit: &str) -> String {
    let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
    format!("{label:<7}{pct:>3}% {done}/{total} {what} {rate:>7.0} {unit}")
}

/// A rate over the last second or so of counter readings.
#[derive(Default)]
pub struct RateMeter {
    readings: RefCell<VecDeque<(Instant, u64)>>,
}

impl RateMeter {
    pub fn rate(&self, now: Instant, count: u64) -> f64 {
        let mut r = self.readings.borrow_mut();
        r.push_back((now, count));
        while r.len() > 2 && now.duration_since(r[0].0) > Duration::from_secs(1) {
            r.pop_front();
        }
        let (t0, c0) = r[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt <= 0.0 {
            0.0
        } else {
            count.saturating_sub(c0) as f64 / dt
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_reads_like_the_brief() {
        assert_eq!(
            line("burst", 53_000, 100_000, "acked", 14_210.4, "msg/s"),
            "burst   53% 53000/100000 acked   14210 msg/s"
        );
        assert!(line("idle", 0, 0, "hellos", 0.0, "hello/s").contains("100%"));
    }

    #[test]
    fn rate_over_the_last_second() {
        let m = RateMeter::default();
        let t = Instant::now();
        assert_eq!(m.rate(t, 0), 0.0);
        let r = m.rate(t + Duration::from_millis(500), 500);
        assert!((r - 1000.0).abs() < 1e-6, "{r}");
    }
}
