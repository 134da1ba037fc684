//! The figures of one run: the text report, or one JSON object (`--json`)
//! with the same names.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::args::{BenchArgs, Mode};
use super::batches::Snapshot;
use super::load::{placed, IdleRun, TrafficRun};
use super::local::Durability;
use super::procstat::Usage;
use super::stats::{ms, Latency};

/// One broker of the run: where it was, its share of the peers, and what
/// it did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BrokerFigures {
    pub url: String,
    /// Peers (idle: connections) placed on it.
    pub peers: usize,
    /// Our own brokers only: `peak_rss_kib` and `cpu_s`, as `broker` has them.
    #[serde(flatten)]
    pub usage: Option<Usage>,
    /// Its batching actors over the run (from its `/metrics`).
    pub batches: Snapshot,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub mode: Mode,
    /// `local` (brokers of our own) or the `--url`s, joined by `, `.
    pub target: String,
    /// Every broker the peers were spread over, peer i on the (i % N)-th.
    pub brokers: Vec<BrokerFigures>,
    pub peers: usize,
    pub messages: usize,
    pub size: usize,
    pub window: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub senders: Option<usize>,
    /// The local cluster's settings, as it reports them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub durability: Option<Durability>,
    pub sent: u64,
    /// Answered `queued:true`.
    pub accepted: u64,
    /// Refused sends by error code.
    pub refused: BTreeMap<String, u64>,
    /// Sent, and no `ack` came by the end.
    pub unanswered: u64,
    /// Deliveries the accepted sends promised (their acks' `recipients`).
    pub expected_deliveries: u64,
    /// Every push received, duplicates included.
    pub pushed: u64,
    /// Distinct deliveries pushed and acked with `client_ack`.
    pub acked: u64,
    /// Promised deliveries never pushed by the end.
    pub lost: u64,
    /// Pushes of a message its recipient already had.
    pub duplicates: u64,
    /// Every hello of the peers.
    pub connect_s: f64,
    /// First send to the last ack or delivery.
    pub wall_s: f64,
    pub acked_per_s: f64,
    pub send_to_ack: Latency,
    pub send_to_push: Latency,
    /// steady: how far sends fell behind their schedule.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_lag: Option<Latency>,
    /// Stopped waiting after --drain-timeout without progress.
    pub drain_timed_out: bool,
    pub error_count: u64,
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleRun>,
    /// Our own brokers only, together: CPU summed, RSS the peak of the sum
    /// (each one's figures are in `brokers`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker: Option<Usage>,
    /// Our own brokers' cluster only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postgres: Option<Usage>,
    /// CPU the load generator itself used.
    pub bench_cpu_s: f64,
    /// The brokers' batching actors over the run, added up (each one's
    /// are in `brokers`).
    pub batches: Snapshot,
}

impl Report {
    pub fn new(args: &BenchArgs, ws_urls: &[String]) -> Report {
        Report {
            mode: args.mode,
            target: if args.url.is_empty() {
                "local".into()
            } else {
                ws_urls.join(", ")
            },
            brokers: ws_urls
                .iter()
                .map(|url| BrokerFigures {
                    url: url.clone(),
                    peers: 0,
                    usage: None,
                    batches: Snapshot::new(),
                })
                .collect(),
            peers: if args.mode == Mode::Idle {
                0
            } else {
                args.peers
            },
            messages: args.messages,
            size: args.size,
            window: args.window,
            rate: (args.mode == Mode::Steady).then_some(args.rate),
            duration_s: match args.mode {
                Mode::Steady => Some(args.steady_secs()),
                Mode::Idle => Some(args.hold_secs()),
                _ => None,
            },
            senders: (args.mode == Mode::Fanout).then_some(args.senders),
            durability: None,
            sent: 0,
            accepted: 0,
            refused: BTreeMap::new(),
            unanswered: 0,
            expected_deliveries: 0,
            pushed: 0,
            acked: 0,
            lost: 0,
            duplicates: 0,
            connect_s: 0.0,
            wall_s: 0.0,
            acked_per_s: 0.0,
            send_to_ack: Latency::default(),
            send_to_push: Latency::default(),
            schedule_lag: None,
            drain_timed_out: false,
            error_count: 0,
            errors: Vec::new(),
            idle: None,
            broker: None,
            postgres: None,
            bench_cpu_s: 0.0,
            batches: Default::default(),
        }
    }

    /// Records how `n` peers or connections were spread over the brokers.
    pub fn place(&mut self, n: usize) {
        let counts = placed(n, self.brokers.len());
        for (b, count) in self.brokers.iter_mut().zip(counts) {
            b.peers = count;
        }
    }

    pub fn fill_traffic(&mut self, r: TrafficRun) {
        self.sent = r.sent;
        self.accepted = r.accepted;
        self.refused = r.refused;
        self.unanswered = r.unanswered;
        self.expected_deliveries = r.expected;
        self.pushed = r.delivered + r.duplicates;
        self.acked = r.delivered;
        self.lost = r.lost;
        self.duplicates = r.duplicates;
        self.connect_s = r.connect.as_secs_f64();
        self.wall_s = r.wall.as_secs_f64();
        self.acked_per_s = if self.wall_s > 0.0 {
            r.delivered as f64 / self.wall_s
        } else {
            0.0
        };
        self.send_to_ack = r.send_to_ack;
        self.send_to_push = r.send_to_push;
        self.schedule_lag = r.lag;
        self.drain_timed_out = r.drain_timed_out;
        self.error_count = r.error_count;
        self.errors = r.errors;
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        let w = &mut o;
        let _ = writeln!(w, "meshbroker bench: {}", self.headline());
        let several = self.brokers.len() > 1;
        let target = match &self.durability {
            Some(d) if several => format!(
                "{} local brokers on one embedded PostgreSQL, fsync={} synchronous_commit={}",
                self.brokers.len(),
                d.fsync,
                d.synchronous_commit
            ),
            Some(d) => format!(
                "local broker, embedded PostgreSQL fsync={} synchronous_commit={}",
                d.fsync, d.synchronous_commit
            ),
            None if several => format!("{} brokers", self.brokers.len()),
            None => self.target.clone(),
        };
        let _ = writeln!(w, "  target        {target}");
        if several {
            let unit = if self.idle.is_some() {
                "connections"
            } else {
                "peers"
            };
            for (i, b) in self.brokers.iter().enumerate() {
                let _ = writeln!(
                    w,
                    "  {:<13} {}, {} {unit}",
                    format!("broker {i}"),
                    b.url,
                    b.peers
                );
            }
        }
        if let Some(idle) = &self.idle {
            render_idle(w, idle, several);
        } else {
            let pct = |n: u64| {
                if self.sent == 0 {
                    0.0
                } else {
                    n as f64 * 100.0 / self.sent as f64
                }
            };
            let _ = writeln!(w, "  sent          {}", self.sent);
            let _ = writeln!(
                w,
                "  accepted      {} ({:.2} %)",
                self.accepted,
                pct(self.accepted)
            );
            let refused: u64 = self.refused.values().sum();
            let by_code: Vec<String> = self
                .refused
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            let _ = writeln!(w, "  refused       {refused}{}", bracket(&by_code));
            if self.unanswered > 0 {
                let _ = writeln!(w, "  unanswered    {}", self.unanswered);
            }
            if self.expected_deliveries != self.accepted {
                let _ = writeln!(w, "  deliveries    {} promised", self.expected_deliveries);
            }
            let _ = writeln!(w, "  pushed        {}", self.pushed);
            let _ = writeln!(w, "  acked         {}", self.acked);
            let timed_out = if self.drain_timed_out {
                " (stopped waiting after --drain-timeout)"
            } else {
                ""
            };
            let _ = writeln!(w, "  lost          {}{timed_out}", self.lost);
            let _ = writeln!(w, "  duplicates    {}", self.duplicates);
            let _ = writeln!(
                w,
                "  connect       {:.2} s ({} hellos)",
                self.connect_s, self.peers
            );
            let _ = writeln!(w, "  wall time     {:.2} s", self.wall_s);
            let unit = if self.mode == Mode::Fanout {
                "deliveries/s"
            } else {
                "msg/s"
            };
            let _ = writeln!(w, "  acked rate    {:.0} {unit}", self.acked_per_s);
            let _ = writeln!(w, "  send→ack      {}", self.send_to_ack.line());
            let _ = writeln!(w, "  send→push     {}", self.send_to_push.line());
            if let Some(lag) = &self.schedule_lag {
                let _ = writeln!(
                    w,
                    "  schedule lag  p99 {}  max {}",
                    ms(lag.p99_ms),
                    ms(lag.max_ms)
                );
            }
        }
        if several {
            for (i, b) in self.brokers.iter().enumerate() {
                if let Some(u) = &b.usage {
                    let _ = writeln!(
                        w,
                        "  {:<13} peak RSS {}, CPU {:.1} s",
                        format!("broker {i}"),
                        mib(u.peak_rss_kib),
                        u.cpu_s
                    );
                }
            }
        }
        if let Some(b) = &self.broker {
            let (label, together) = if several {
                ("brokers", " together")
            } else {
                ("broker", "")
            };
            let _ = writeln!(
                w,
                "  {label:<13} peak RSS {}{together}, CPU {:.1} s",
                mib(b.peak_rss_kib),
                b.cpu_s
            );
        }
        if let Some(p) = &self.postgres {
            let _ = writeln!(
                w,
                "  postgresql    peak RSS {} ({} processes at most), CPU {:.1} s",
                mib(p.peak_rss_kib),
                p.peak_processes.unwrap_or(0),
                p.cpu_s
            );
        }
        let _ = writeln!(w, "  bench         CPU {:.2} s", self.bench_cpu_s);
        // Summed over N brokers, busy time is N actors' time.
        let actors = self.brokers.len().max(1) as f64;
        let mean_of = if several {
            format!(" (mean of {} brokers)", self.brokers.len())
        } else {
            String::new()
        };
        for (kind, b) in &self.batches {
            if b.rounds <= 0.0 {
                continue;
            }
            let busy = if self.wall_s > 0.0 {
                format!(
                    ", busy {:.0} % of the wall time{mean_of}",
                    b.busy_s * 100.0 / (self.wall_s * actors)
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                w,
                "  {kind:<13} {:.0} rounds of {:.1} requests, {:.2} ms each{busy}",
                b.rounds,
                b.requests / b.rounds,
                b.busy_s * 1e3 / b.rounds
            );
        }
        if self.error_count > 0 {
            let _ = writeln!(w, "  errors        {}", self.error_count);
            for e in &self.errors {
                let _ = writeln!(w, "    {e}");
            }
        }
        o
    }

    fn headline(&self) -> String {
        let what = match self.mode {
            Mode::Burst => format!(
                "burst, {} peers × {} messages × {} B, window {}",
                self.peers, self.messages, self.size, self.window
            ),
            Mode::Steady => format!(
                "steady, {} msg/s for {} s over {} peers, {} B",
                self.rate.unwrap_or(0),
                self.duration_s.unwrap_or(0.0),
                self.peers,
                self.size
            ),
            Mode::Fanout => format!(
                "fanout, {} senders × {} broadcasts into {} peers, {} B, window {}",
                self.senders.unwrap_or(0),
                self.messages,
                self.peers,
                self.size,
                self.window
            ),
            Mode::Idle => format!(
                "idle, {} connections",
                self.idle.as_ref().map_or(0, |i| i.connections)
            ),
        };
        match self.brokers.len() {
            0 | 1 => what,
            n => format!("{what}, over {n} brokers"),
        }
    }
}

fn render_idle(w: &mut String, idle: &IdleRun, several: bool) {
    let _ = writeln!(
        w,
        "  connected     {} of {}",
        idle.connected, idle.connections
    );
    let failures: Vec<String> = idle
        .hello_failures
        .iter()
        .map(|(c, n)| format!("{c}: {n}"))
        .collect();
    let failed: u64 = idle.hello_failures.values().sum();
    let _ = writeln!(w, "  failed        {failed}{}", bracket(&failures));
    let _ = writeln!(
        w,
        "  all hellos    {:.2} s ({:.0} hellos/s)",
        idle.hello_wall_s, idle.hellos_per_s
    );
    let _ = writeln!(w, "  hello         {}", idle.hello.line());
    let _ = writeln!(
        w,
        "  received      {} frames (presence pushes)",
        idle.frames_received
    );
    if let (Some(b), Some(a)) = (idle.broker_rss_before_kib, idle.broker_rss_after_kib) {
        let per = idle.broker_kib_per_connection.unwrap_or(0.0);
        let label = if several { "brokers RSS" } else { "broker RSS" };
        let _ = writeln!(
            w,
            "  {label:<13} {} before, {} connected: {per:.1} KiB per connection",
            mib(b),
            mib(a)
        );
    }
}

fn bracket(items: &[String]) -> String {
    if items.is_empty() {
        String::new()
    } else {
        format!(" ({})", items.join(", "))
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::args::tests::parse;

    fn usage(peak_rss_kib: u64, cpu_s: f64) -> Option<Usage> {
        Some(Usage {
            peak_rss_kib,
            cpu_s,
            peak_processes: None,
        })
    }

    #[test]
    fn several_brokers_are_named_with_their_peers_and_figures() {
        let args = parse(&["--brokers", "2", "--peers", "5"]).unwrap();
        let urls = ["ws://a:1/ws".to_owned(), "ws://b:2/ws".to_owned()];
        let mut r = Report::new(&args, &urls);
        r.place(5);
        r.brokers[0].usage = usage(2048, 1.5);
        r.brokers[1].usage = usage(1024, 0.5);
        r.broker = usage(3072, 2.0);
        let text = r.render();
        assert!(text.contains("window 256, over 2 brokers\n"), "{text}");
        assert!(
            text.contains("  broker 0      ws://a:1/ws, 3 peers\n"),
            "{text}"
        );
        assert!(
            text.contains("  broker 1      ws://b:2/ws, 2 peers\n"),
            "{text}"
        );
        assert!(
            text.contains("  broker 0      peak RSS 2.0 MiB, CPU 1.5 s\n"),
            "{text}"
        );
        assert!(
            text.contains("  brokers       peak RSS 3.0 MiB together, CPU 2.0 s\n"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["brokers"][1]["url"], "ws://b:2/ws");
        assert_eq!(json["brokers"][1]["peers"], 2);
        assert_eq!(json["brokers"][1]["peak_rss_kib"], 1024);
        assert_eq!(json["target"], "local");
    }

    #[test]
    fn one_broker_reads_as_before() {
        let args = parse(&["--peers", "4"]).unwrap();
        let mut r = Report::new(&args, &["ws://a:1/ws".to_owned()]);
        r.place(4);
        r.broker = usage(1024, 1.0);
        let text = r.render();
        assert!(
            !text.contains("over 1 brokers") && !text.contains("broker 0"),
            "{text}"
        );
        assert!(
            text.contains("  broker        peak RSS 1.0 MiB, CPU 1.0 s\n"),
            "{text}"
        );
    }
}
