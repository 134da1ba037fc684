//! Memory and CPU of our own broker and its PostgreSQL, read from `/proc`.
//!
//! PostgreSQL is many processes: the postmaster (its pid is the first line
//! of `postmaster.pid`) and its children. Summing their VmRSS would count
//! the shared buffers and the mapped binary once per backend, so its memory
//! is the sum of their private pages (`RssAnon`) plus the largest share of
//! file-backed and of shared memory, once. (`Pss` from `smaps_rollup` would
//! be exact, but walking every backend's page tables four times a second
//! cost the bench more CPU than its clients.) Its CPU is the postmaster's
//! own plus what its children used: live ones from their `stat`, exited
//! ones through the postmaster's `cutime`/`cstime`.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

/// Linux reports `stat` times in USER_HZ, 100 on every architecture's ABI.
const TICKS_PER_SEC: f64 = 100.0;
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// Peak memory and CPU used over the run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Usage {
    pub peak_rss_kib: u64,
    pub cpu_s: f64,
    /// PostgreSQL only: processes seen at once, at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_processes: Option<usize>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Stat {
    ppid: u32,
    /// utime + stime.
    own_ticks: u64,
    /// cutime + cstime: children waited for.
    children_ticks: u64,
}

fn read_stat(pid: u32) -> Option<Stat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses; fields follow the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    Some(Stat {
        ppid: n(1)? as u32,
        own_ticks: n(11)? + n(12)?,
        children_ticks: n(13)? + n(14)?,
    })
}

fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// VmRSS of one process, KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&text, "VmRSS:")
}

/// (RssAnon, RssFile, RssShmem) in KiB.
fn rss_parts(pid: u32) -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((
        kib_field(&text, "RssAnon:")?,
        kib_field(&text, "RssFile:").unwrap_or(0),
        kib_field(&text, "RssShmem:").unwrap_or(0),
    ))
}

/// Adds up PostgreSQL's processes, shared pages counted once.
#[derive(Default)]
struct PgMemory {
    private: u64,
    file: u64,
    shmem: u64,
}

impl PgMemory {
    fn add(&mut self, (anon, file, shmem): (u64, u64, u64)) {
        self.private += anon;
        self.file = self.file.max(file);
        self.shmem = self.shmem.max(shmem);
    }

    fn kib(&self) -> u64 {
        self.private + self.file + self.shmem
    }
}

/// CPU seconds this process has used so far.
pub fn self_cpu_secs() -> f64 {
    read_stat(std::process::id()).map_or(0.0, |s| s.own_ticks as f64 / TICKS_PER_SEC)
}

#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rss_kib: u64,
    ticks: u64,
    processes: usize,
}

fn broker_sample(pid: u32) -> Option<Sample> {
    Some(Sample {
        rss_kib: rss_kib(pid)?,
        ticks: read_stat(pid)?.own_ticks,
        processes: 1,
    })
}

fn postgres_sample(pgdata: &Path) -> Option<Sample> {
    let pid_file = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let top = read_stat(postmaster)?;
    let mut memory = PgMemory::default();
    memory.add(rss_parts(postmaster)?);
    let mut s = Sample {
        rss_kib: 0,
        ticks: top.own_ticks + top.children_ticks,
        processes: 1,
    };
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(stat) = read_stat(pid).filter(|st| st.ppid == postmaster) else {
            continue;
        };
        if let Some(parts) = rss_parts(pid) {
            memory.add(parts);
        }
        s.ticks += stat.own_ticks;
        s.processes += 1;
    }
    s.rss_kib = memory.kib();
    Some(s)
}

#[derive(Default)]
struct Track {
    first: Option<Sample>,
    last: Sample,
    peak_rss: u64,
    peak_processes: usize,
}

impl Track {
    fn add(&mut self, s: Option<Sample>) {
        let Some(s) = s else { return };
        self.first.get_or_insert(s);
        self.last = s;
        self.peak_rss = self.peak_rss.max(s.rss_kib);
        self.peak_processes = self.peak_processes.max(s.processes);
    }

    fn usage(&self, processes: bool) -> Option<Usage> {
        let first = self.first?;
        Some(Usage {
            peak_rss_kib: self.peak_rss,
            // Exited backends' time lands in cutime only once reaped, so a
            // backend gone between samples can make the sum dip briefly.
            cpu_s: self.last.ticks.saturating_sub(first.ticks) as f64 / TICKS_PER_SEC,
            peak_processes: processes.then_some(self.peak_processes),
        })
    }
}

/// Samples the broker and PostgreSQL a few times a second until finished.
pub struct Monitor {
    broker_pid: u32,
    pgdata: PathBuf,
    state: Rc<RefCell<(Track, Track)>>,
    task: actix_web::rt::task::JoinHandle<()>,
}

impl Monitor {
    pub fn start(broker_pid: u32, pgdata: PathBuf) -> Monitor {
        let state = Rc::new(RefCell::new((Track::default(), Track::default())));
        let task = {
            let state = state.clone();
            let pgdata = pgdata.clone();
            actix_web::rt::spawn(async move {
                loop {
                    sample_into(&state, broker_pid, &pgdata);
                    tokio::time::sleep(SAMPLE_EVERY).await;
                }
            })
        };
        Monitor {
            broker_pid,
            pgdata,
            state,
            task,
        }
    }

    /// The broker's RSS right now (idle mode's before/after figures).
    pub fn broker_rss_now(&self) -> Option<u64> {
        rss_kib(self.broker_pid)
    }

    /// (broker, PostgreSQL), CPU counted from the monitor's start.
    pub fn finish(self) -> (Option<Usage>, Option<Usage>) {
        self.task.abort();
        sample_into(&self.state, self.broker_pid, &self.pgdata);
        let state = self.state.borrow();
        (state.0.usage(false), state.1.usage(true))
    }
}

fn sample_into(state: &RefCell<(Track, Track)>, broker_pid: u32, pgdata: &Path) {
    let b = broker_sample(broker_pid);
    let p = postgres_sample(pgdata);
    let mut s = state.borrow_mut();
    s.0.add(b);
    s.1.add(p);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let stat = read_stat(me).expect("own stat");
        assert_eq!(stat.ppid, nix::unistd::getppid().as_raw() as u32);
        let rss = rss_kib(me).expect("own status");
        let (anon, _, _) = rss_parts(me).expect("own status");
        assert!(rss > 0 && anon > 0, "{rss} {anon}");
        assert!(self_cpu_secs() >= 0.0);
        assert!(postgres_sample(Path::new("/nonexistent")).is_none());
    }
}
