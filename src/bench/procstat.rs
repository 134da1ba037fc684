//! Memory and CPU of our own brokers and their PostgreSQL, read from `/proc`:
//! each broker, the brokers together, and the cluster.
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

/// What the brokers and PostgreSQL used over the run.
pub struct Finished {
    /// Each broker process, in `--brokers` order.
    pub brokers: Vec<Option<Usage>>,
    /// The brokers together: CPU summed, RSS the peak of their sum (not the
    /// sum of their peaks, which need not coincide).
    pub total: Option<Usage>,
    pub postgres: Option<Usage>,
}

/// The tracks a monitor keeps, one per broker plus their sum and PostgreSQL.
#[derive(Default)]
struct Tracks {
    brokers: Vec<Track>,
    total: Track,
    postgres: Track,
}

/// Samples the brokers and PostgreSQL a few times a second until finished.
pub struct Monitor {
    broker_pids: Vec<u32>,
    pgdata: PathBuf,
    state: Rc<RefCell<Tracks>>,
    task: actix_web::rt::task::JoinHandle<()>,
}

impl Monitor {
    pub fn start(broker_pids: Vec<u32>, pgdata: PathBuf) -> Monitor {
        let state = Rc::new(RefCell::new(Tracks {
            brokers: broker_pids.iter().map(|_| Track::default()).collect(),
            ..Tracks::default()
        }));
        let task = {
            let state = state.clone();
            let pgdata = pgdata.clone();
            let pids = broker_pids.clone();
            actix_web::rt::spawn(async move {
                loop {
                    sample_into(&state, &pids, &pgdata);
                    tokio::time::sleep(SAMPLE_EVERY).await;
                }
            })
        };
        Monitor {
            broker_pids,
            pgdata,
            state,
            task,
        }
    }

    /// The brokers' RSS together right now (idle mode's before/after
    /// figures); `None` unless every one of them could be read.
    pub fn broker_rss_now(&self) -> Option<u64> {
        self.broker_pids.iter().map(|&pid| rss_kib(pid)).sum()
    }

    /// CPU counted from the monitor's start.
    pub fn finish(self) -> Finished {
        self.task.abort();
        sample_into(&self.state, &self.broker_pids, &self.pgdata);
        let state = self.state.borrow();
        Finished {
            brokers: state.brokers.iter().map(|t| t.usage(false)).collect(),
            total: state.total.usage(false),
            postgres: state.postgres.usage(true),
        }
    }
}

fn sample_into(state: &RefCell<Tracks>, broker_pids: &[u32], pgdata: &Path) {
    let samples: Vec<Option<Sample>> = broker_pids.iter().map(|&p| broker_sample(p)).collect();
    let p = postgres_sample(pgdata);
    let mut s = state.borrow_mut();
    for (track, sample) in s.brokers.iter_mut().zip(&samples) {
        track.add(*sample);
    }
    s.total.add(sum(&samples));
    s.postgres.add(p);
}

/// The brokers' samples added up; `None` if one is missing, so a broker
/// that could not be read does not show as a dip.
fn sum(samples: &[Option<Sample>]) -> Option<Sample> {
    samples.iter().try_fold(Sample::default(), |acc, s| {
        let s = (*s)?;
        Some(Sample {
            rss_kib: acc.rss_kib + s.rss_kib,
            ticks: acc.ticks + s.ticks,
            processes: acc.processes + s.processes,
        })
    })
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

    #[test]
    fn the_brokers_total_is_the_peak_of_their_sum() {
        let s = |rss_kib, ticks| {
            Some(Sample {
                rss_kib,
                ticks,
                processes: 1,
            })
        };
        let mut total = Track::default();
        // Their peaks (30 and 40) never coincide: the sum peaks at 60, not 70.
        total.add(sum(&[s(30, 0), s(30, 0)]));
        total.add(sum(&[s(20, 100), s(40, 300)]));
        total.add(sum(&[s(10, 200), None]));
        let u = total.usage(false).unwrap();
        assert_eq!((u.peak_rss_kib, u.cpu_s), (60, 4.0));
        let me = std::process::id();
        assert_eq!(
            sum(&[broker_sample(me), broker_sample(me)]).map(|s| s.processes),
            Some(2)
        );
    }
}
