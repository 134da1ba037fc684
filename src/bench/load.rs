//! The peers: one local task per connection on this thread, sharing plain
//! counters (no locks, no channels on the hot path).
//!
//! A peer's task interleaves its sends (gated by the window, or by its
//! schedule in steady mode) with reading what arrives: the `ack`s of its
//! sends and the pushes to it, each acked at once with `client_ack`. A
//! message carries its sender, sequence number and send time at the start
//! of its ciphertext (`<sender>.<seq>.<micros>.` padded to `--size`), so a
//! recipient times send → push and spots duplicates without asking anyone.
//!
//! With several brokers, peer (or idle connection) i connects to broker
//! i % N ([`broker_of`]), and a direct message goes to a peer on another
//! broker than its sender's ([`pick_recipient`]): every send then crosses
//! nodes, which is what a run over several brokers is for.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rand::SeedableRng as _;
use serde_json::Value;
use tokio::sync::Semaphore;

use super::args::{BenchArgs, Mode};
use super::procstat::Monitor;
use super::progress::{Progress, RateMeter, TICK};
use super::stats::micros_between;
use super::stats::Latency;
use crate::client::{self, Connection, Credentials, Event, HelloOptions};

/// How long a task waits for a frame before it looks at the clock again.
const POLL: Duration = Duration::from_millis(100);
/// Longest a fed frame waits for a write while frames keep arriving.
const FLUSH_AFTER: Duration = Duration::from_millis(1);
/// Error texts kept for the report; the rest are only counted.
const MAX_ERRORS: usize = 10;

/// What a traffic run (burst, steady, fanout) measured.
#[derive(Debug, Default)]
pub struct TrafficRun {
    pub sent: u64,
    pub accepted: u64,
    pub refused: BTreeMap<String, u64>,
    /// Sends whose `ack` never came.
    pub unanswered: u64,
    /// Deliveries the accepted messages promised (`recipients` of each ack).
    pub expected: u64,
    /// Distinct deliveries pushed, each acked by its recipient at once.
    pub delivered: u64,
    pub duplicates: u64,
    pub lost: u64,
    pub connect: Duration,
    /// First send to the last ack or delivery.
    pub wall: Duration,
    pub send_to_ack: Latency,
    pub send_to_push: Latency,
    /// steady only: how late sends went out against their schedule.
    pub lag: Option<Latency>,
    pub errors: Vec<String>,
    pub error_count: u64,
    pub drain_timed_out: bool,
}

/// What idle mode measured.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IdleRun {
    pub connections: usize,
    pub connected: usize,
    pub hello_failures: BTreeMap<String, u64>,
    /// From the first connect to the last hello_ack.
    pub hello_wall_s: f64,
    pub hellos_per_s: f64,
    /// Connect + hello → hello_ack, per connection.
    pub hello: Latency,
    /// Frames the idle sessions received (presence pushes of later hellos).
    pub frames_received: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_rss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_kib_per_connection: Option<f64>,
}

/// Counters every task of a run adds to.
struct Shared {
    base: Instant,
    sent: Cell<u64>,
    accepted: Cell<u64>,
    answered: Cell<u64>,
    refused: RefCell<BTreeMap<String, u64>>,
    expected: Cell<u64>,
    delivered: Cell<u64>,
    duplicates: Cell<u64>,
    /// `[sender][seq]` = (deliveries promised, distinct deliveries seen).
    ledger: RefCell<Vec<Vec<(u32, u32)>>>,
    to_ack: RefCell<Vec<u32>>,
    to_push: RefCell<Vec<u32>>,
    lag: RefCell<Vec<u32>>,
    last_progress: Cell<Instant>,
    last_event: Cell<Option<Instant>>,
    done: Cell<bool>,
    errors: RefCell<Vec<String>>,
    error_count: Cell<u64>,
}

impl Shared {
    fn error(&self, text: String) {
        self.error_count.set(self.error_count.get() + 1);
        let mut e = self.errors.borrow_mut();
        if e.len() < MAX_ERRORS {
            e.push(text);
        }
    }

    fn progressed(&self, now: Instant, event: bool) {
        self.last_progress.set(now);
        if event {
            self.last_event.set(Some(now));
        }
    }
}

enum Pacing {
    Window(usize),
    /// The k-th send is due at `first + k * every`.
    Schedule {
        first: Instant,
        every: Duration,
    },
}

/// One peer's part of the run.
struct Plan {
    me: usize,
    messages: usize,
    pacing: Pacing,
    /// Every peer's pubkey; `None`: broadcast to `*`.
    others: Option<Rc<Vec<String>>>,
    /// Brokers the peers are spread over ([`broker_of`]).
    brokers: usize,
    /// Recipients on the sender's own broker (`--same-node`).
    same_node: bool,
    seed: u64,
    size: usize,
}

/// The broker (index into the URLs) that peer or connection `i` uses.
pub fn broker_of(i: usize, brokers: usize) -> usize {
    i % brokers
}

/// How many of `n` peers or connections [`broker_of`] puts on each broker.
pub fn placed(n: usize, brokers: usize) -> Vec<usize> {
    let mut counts = vec![0; brokers];
    for i in 0..n {
        counts[broker_of(i, brokers)] += 1;
    }
    counts
}

/// A uniformly random recipient for peer `me` of `n`: any other peer on
/// one broker; with several, a peer on another broker than `me`'s. There
/// is one for every `me` once `n >= 2`: peer 1 is on another broker than
/// peer 0, and every other peer is on another broker than 0 or than 1.
/// With `same_node`, another peer on `me`'s broker instead (the control
/// run: the same processes, nothing crossing; needs 2 peers per broker).
fn pick_recipient(
    rng: &mut impl rand::Rng,
    me: usize,
    n: usize,
    brokers: usize,
    same_node: bool,
) -> usize {
    if brokers <= 1 {
        let i = rng.gen_range(0..n - 1);
        return if i >= me { i + 1 } else { i };
    }
    if same_node {
        // The peers of `me`'s broker are me % brokers + k × brokers.
        let mine = placed(n, brokers)[broker_of(me, brokers)];
        let k = rng.gen_range(0..mine - 1);
        let k = if k >= me / brokers { k + 1 } else { k };
        return broker_of(me, brokers) + k * brokers;
    }
    // Rejection: a broker holds at most ceil(n / brokers) peers, so at
    // least a third of them (3 peers on 2 brokers) are elsewhere: three
    // draws on average at most.
    loop {
        let j = rng.gen_range(0..n);
        if broker_of(j, brokers) != broker_of(me, brokers) {
            return j;
        }
    }
}

/// Connects `members` (at most `concurrency` hellos at once), in order,
/// member i to `ws[broker_of(i)]`.
async fn connect_all(
    ws: &[String],
    members: &[Credentials],
    concurrency: usize,
    progress: &Progress,
) -> anyhow::Result<Vec<Connection>> {
    let gate = Rc::new(Semaphore::new(concurrency));
    let done = Rc::new(Cell::new(0u64));
    let tasks: Vec<_> = members
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, m)| {
            let (gate, done) = (gate.clone(), done.clone());
            let ws = ws[broker_of(i, ws.len())].clone();
            actix_web::rt::spawn(async move {
                let _permit = gate.acquire().await.expect("never closed");
                let r = client::hello(&ws, &m, &HelloOptions::default()).await;
                done.set(done.get() + 1);
                r.map(|(conn, _)| conn)
            })
        })
        .collect();
    let total = members.len() as u64;
    let ticker = {
        let done = done.clone();
        async move {
            let meter = RateMeter::default();
            loop {
                let d = done.get();
                progress.show(
                    "connect",
                    d,
                    total,
                    "hellos",
                    meter.rate(Instant::now(), d),
                    "hello/s",
                );
                tokio::time::sleep(TICK).await;
            }
        }
    };
    let joined = async {
        let mut conns = Vec::with_capacity(tasks.len());
        for t in tasks {
            conns.push(t.await.map_err(|e| anyhow!("hello task: {e}"))??);
        }
        anyhow::Ok(conns)
    };
    tokio::select! {
        r = joined => r,
        () = ticker => unreachable!("the ticker never ends"),
    }
}

/// burst, steady or fanout.
pub async fn traffic(
    args: &BenchArgs,
    ws: &[String],
    members: &[Credentials],
    progress: &Progress,
) -> anyhow::Result<TrafficRun> {
    let n = members.len();
    let t_connect = Instant::now();
    let conns = connect_all(ws, members, args.hello_concurrency, progress).await?;
    let connect = t_connect.elapsed();
    let pubkeys: Rc<Vec<String>> = Rc::new(members.iter().map(Credentials::pubkey).collect());

    let start = Instant::now() + Duration::from_millis(20);
    let seed = args.seed.unwrap_or_else(rand::random);
    let plans: Vec<Plan> = (0..n)
        .map(|me| {
            let (messages, pacing, others) = match args.mode {
                Mode::Burst => (
                    args.messages,
                    Pacing::Window(args.window),
                    Some(pubkeys.clone()),
                ),
                Mode::Fanout => {
                    let m = if me < args.senders { args.messages } else { 0 };
                    (m, Pacing::Window(args.window), None)
                }
                Mode::Steady => {
                    // Global send j goes to peer j % n at start + j / rate.
                    let total = (args.rate as f64 * args.steady_secs()).round() as usize;
                    let m = total.saturating_sub(me).div_ceil(n);
                    let first = start + Duration::from_secs_f64(me as f64 / args.rate as f64);
                    let every = Duration::from_secs_f64(n as f64 / args.rate as f64);
                    (m, Pacing::Schedule { first, every }, Some(pubkeys.clone()))
                }
                Mode::Idle => unreachable!("idle mode has no traffic"),
            };
            Plan {
                me,
                messages,
                pacing,
                others,
                brokers: ws.len(),
                same_node: args.same_node,
                seed: seed.wrapping_add(me as u64),
                size: args.size,
            }
        })
        .collect();
    let total_to_send: u64 = plans.iter().map(|p| p.messages as u64).sum();
    let shared = Rc::new(Shared {
        base: start,
        sent: Cell::new(0),
        accepted: Cell::new(0),
        answered: Cell::new(0),
        refused: RefCell::default(),
        expected: Cell::new(0),
        delivered: Cell::new(0),
        duplicates: Cell::new(0),
        ledger: RefCell::new(plans.iter().map(|p| vec![(0, 0); p.messages]).collect()),
        to_ack: RefCell::new(Vec::with_capacity(total_to_send as usize)),
        to_push: RefCell::new(Vec::with_capacity(total_to_send as usize)),
        lag: RefCell::default(),
        last_progress: Cell::new(start),
        last_event: Cell::new(None),
        done: Cell::new(false),
        errors: RefCell::default(),
        error_count: Cell::new(0),
    });
    // Until the first ack, the total is a guess: each send promises one
    // delivery, a broadcast one per other peer.
    let per_send = if args.mode == Mode::Fanout {
        n as u64 - 1
    } else {
        1
    };

    tokio::time::sleep_until(start.into()).await;
    let tasks: Vec<_> = conns
        .into_iter()
        .zip(plans)
        .map(|(conn, plan)| actix_web::rt::spawn(run_peer(conn, plan, shared.clone())))
        .collect();

    let label = args.mode.name();
    let meter = RateMeter::default();
    let mut timed_out = false;
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let sh = &shared;
        let delivered = sh.delivered.get();
        let promised = sh.expected.get() + (total_to_send - sh.answered.get()) * per_send;
        progress.show(
            label,
            delivered,
            promised,
            "acked",
            meter.rate(now, delivered),
            "msg/s",
        );
        let all_sent = sh.sent.get() == total_to_send;
        let all_answered = sh.answered.get() == sh.sent.get();
        if all_sent && all_answered && delivered >= sh.expected.get() {
            break;
        }
        if now.duration_since(sh.last_progress.get()) > args.drain_timeout.get() {
            timed_out = true;
            break;
        }
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
    }
    shared.done.set(true);
    for t in tasks {
        let _ = t.await;
    }

    let sh = &shared;
    let lost = sh
        .ledger
        .borrow()
        .iter()
        .flatten()
        .map(|&(promised, seen)| u64::from(promised.saturating_sub(seen)))
        .sum();
    let end = sh.last_event.get().unwrap_or_else(Instant::now);
    let run = TrafficRun {
        sent: sh.sent.get(),
        accepted: sh.accepted.get(),
        refused: sh.refused.borrow().clone(),
        unanswered: sh.sent.get() - sh.answered.get(),
        expected: sh.expected.get(),
        delivered: sh.delivered.get(),
        duplicates: sh.duplicates.get(),
        lost,
        connect,
        wall: end.saturating_duration_since(start),
        send_to_ack: Latency::of(&mut sh.to_ack.borrow_mut()),
        send_to_push: Latency::of(&mut sh.to_push.borrow_mut()),
        lag: (args.mode == Mode::Steady).then(|| Latency::of(&mut sh.lag.borrow_mut())),
        errors: sh.errors.borrow().clone(),
        error_count: sh.error_count.get(),
        drain_timed_out: timed_out,
    };
    Ok(run)
}

/// A peer's task: see the module comment.
async fn run_peer(mut conn: Connection, plan: Plan, sh: Rc<Shared>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let padding = "x".repeat(plan.size);
    let mut frame = String::with_capacity(plan.size + 256);
    // Send times (µs since base) by sequence number, the frame `id`.
    let mut sent_at: Vec<u64> = Vec::with_capacity(plan.messages);
    let mut answered = 0usize;
    let mut seen: HashSet<u64> = HashSet::new();
    // When the oldest frame fed but not yet written out was queued.
    let mut unflushed: Option<Instant> = None;
    loop {
        while sent_at.len() < plan.messages {
            let seq = sent_at.len();
            let now = Instant::now();
            let wait = match plan.pacing {
                Pacing::Window(w) => {
                    if seq - answered >= w {
                        break;
                    }
                    None
                }
                Pacing::Schedule { first, every } => {
                    let due = first + every * seq as u32;
                    if now < due {
                        break;
                    }
                    Some(due)
                }
            };
            if let Some(due) = wait {
                sh.lag.borrow_mut().push(micros_between(due, now));
            }
            let t = micros_between(sh.base, now) as u64;
            let target = match &plan.others {
                Some(others) => {
                    let n = others.len();
                    others[pick_recipient(&mut rng, plan.me, n, plan.brokers, plan.same_node)]
                        .as_str()
                }
                None => "*",
            };
            send_frame(&mut frame, seq, target, plan.me, t, &padding);
            if let Err(e) = conn.feed_text(&frame).await {
                sh.error(format!("peer {}: {e:#}", plan.me));
                return;
            }
            unflushed.get_or_insert(now);
            sent_at.push(t);
            sh.sent.set(sh.sent.get() + 1);
            sh.progressed(now, false);
        }
        if sh.done.get() {
            break;
        }
        let timeout = match plan.pacing {
            Pacing::Schedule { first, every } if sent_at.len() < plan.messages => {
                let due = first + every * sent_at.len() as u32;
                due.saturating_duration_since(Instant::now()).min(POLL)
            }
            _ => POLL,
        };
        // What is already readable is handled before the queued frames go
        // out, so a window of sends or a run of client_acks costs one write;
        // a frame never waits longer than FLUSH_AFTER for it.
        let mut next = conn.recv(Duration::ZERO).await;
        let idle = matches!(next, Ok(Event::Timeout));
        if unflushed.is_some_and(|t| idle || t.elapsed() >= FLUSH_AFTER) {
            if let Err(e) = conn.flush().await {
                sh.error(format!("peer {}: {e:#}", plan.me));
                return;
            }
            unflushed = None;
        }
        if idle {
            next = conn.recv(timeout).await;
        }
        match next {
            Ok(Event::Frame(f)) => {
                let kind = f["type"].as_str().unwrap_or("");
                if kind == "ack" {
                    answered += 1;
                    on_ack(&sh, plan.me, &f, &sent_at);
                } else if kind == "push" && !client::is_system_push(&f) {
                    on_push(&sh, &f, &mut seen);
                    // Duplicates are acked too: the broker waits for it.
                    if let Some(id) = f["messageId"].as_str() {
                        frame.clear();
                        let _ =
                            write!(frame, r#"{{"type":"client_ack","brokerMessageId":"{id}"}}"#);
                        if let Err(e) = conn.feed_text(&frame).await {
                            sh.error(format!("peer {}: {e:#}", plan.me));
                            return;
                        }
                        unflushed.get_or_insert_with(Instant::now);
                    }
                } else if kind == "error" {
                    sh.error(format!("peer {}: {f}", plan.me));
                }
            }
            Ok(Event::Timeout) => {}
            Ok(Event::Closed { code, reason }) => {
                sh.error(format!(
                    "peer {}: broker closed ({code:?}, {reason:?})",
                    plan.me
                ));
                return;
            }
            Err(e) => {
                sh.error(format!("peer {}: {e:#}", plan.me));
                return;
            }
        }
    }
    let _ = conn.close().await;
}

/// The `send` frame, written into `out` (reused between sends).
fn send_frame(out: &mut String, seq: usize, target: &str, me: usize, t: u64, padding: &str) {
    out.clear();
    let _ = write!(
        out,
        r#"{{"type":"send","id":"{seq}","targetSpec":"{target}","priority":"now","nonce":"n","ciphertext":"{me}.{seq}.{t}."#
    );
    let stamp = out.len() - out.rfind('"').map_or(0, |i| i + 1);
    out.push_str(&padding[..padding.len().saturating_sub(stamp)]);
    out.push_str("\"}");
}

/// (sender, seq, send time µs) from a pushed ciphertext.
fn parse_stamp(ciphertext: &str) -> Option<(usize, usize, u64)> {
    let mut parts = ciphertext.splitn(4, '.');
    let sender = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let t = parts.next()?.parse().ok()?;
    Some((sender, seq, t))
}

fn on_ack(sh: &Shared, me: usize, ack: &Value, sent_at: &[u64]) {
    let now = Instant::now();
    sh.answered.set(sh.answered.get() + 1);
    let seq = ack["id"].as_str().and_then(|s| s.parse::<usize>().ok());
    let Some(&t) = seq.and_then(|s| sent_at.get(s)) else {
        sh.error(format!("peer {me}: ack of no send of ours: {ack}"));
        return;
    };
    let seq = seq.expect("checked above");
    let elapsed = micros_between(sh.base, now) as u64;
    sh.to_ack
        .borrow_mut()
        .push(elapsed.saturating_sub(t) as u32);
    if ack["queued"] == true {
        let recipients = ack["recipients"].as_u64().unwrap_or(1);
        sh.accepted.set(sh.accepted.get() + 1);
        sh.expected.set(sh.expected.get() + recipients);
        sh.ledger.borrow_mut()[me][seq].0 = recipients as u32;
    } else {
        let code = crate::client::refusal_code(ack);
        *sh.refused.borrow_mut().entry(code.to_owned()).or_default() += 1;
    }
    sh.progressed(now, true);
}

fn on_push(sh: &Shared, push: &Value, seen: &mut HashSet<u64>) {
    let now = Instant::now();
    let Some((sender, seq, t)) = push["ciphertext"].as_str().and_then(parse_stamp) else {
        sh.error(format!("a push the bench did not send: {push}"));
        return;
    };
    if !seen.insert(((sender as u64) << 32) | seq as u64) {
        sh.duplicates.set(sh.duplicates.get() + 1);
        return;
    }
    let elapsed = micros_between(sh.base, now) as u64;
    sh.to_push
        .borrow_mut()
        .push(elapsed.saturating_sub(t) as u32);
    sh.delivered.set(sh.delivered.get() + 1);
    if let Some(slot) = sh
        .ledger
        .borrow_mut()
        .get_mut(sender)
        .and_then(|s| s.get_mut(seq))
    {
        slot.1 += 1;
    }
    sh.progressed(now, true);
}

/// idle: `--connections` hellos, then nothing but answering pings;
/// connection i to `ws[broker_of(i)]`.
pub async fn idle(
    args: &BenchArgs,
    ws: &[String],
    members: &[Credentials],
    progress: &Progress,
    monitor: Option<&Monitor>,
) -> anyhow::Result<IdleRun> {
    if members.is_empty() {
        bail!("no members to connect as");
    }
    let k = args.connections;
    let rss_before = monitor.and_then(Monitor::broker_rss_now);
    let gate = Rc::new(Semaphore::new(args.hello_concurrency));
    let done = Rc::new(Cell::new(false));
    let attempted = Rc::new(Cell::new(0usize));
    let latencies: Rc<RefCell<Vec<u32>>> = Rc::new(RefCell::new(Vec::with_capacity(k)));
    let failures: Rc<RefCell<BTreeMap<String, u64>>> = Rc::default();
    let last_ack = Rc::new(Cell::new(None::<Instant>));
    let frames = Rc::new(Cell::new(0u64));
    let start = Instant::now();
    let tasks: Vec<_> = (0..k)
        .map(|i| {
            // More connections than members (`--members`, or a --provision
            // file): the rest are sessions of the members, which replace
            // nothing.
            let creds = members[i % members.len()].clone();
            let as_session = i >= members.len();
            let frames = frames.clone();
            let (gate, done, attempted, latencies, failures, last_ack, ws) = (
                gate.clone(),
                done.clone(),
                attempted.clone(),
                latencies.clone(),
                failures.clone(),
                last_ack.clone(),
                ws[broker_of(i, ws.len())].clone(),
            );
            actix_web::rt::spawn(async move {
                let permit = gate.acquire().await.expect("never closed");
                let t0 = Instant::now();
                let opts = HelloOptions::default();
                let r = if as_session {
                    client::session_hello(&ws, &creds, &client::generate_session_key(), &opts).await
                } else {
                    client::hello(&ws, &creds, &opts).await
                };
                drop(permit);
                attempted.set(attempted.get() + 1);
                let mut conn = match r {
                    Ok((conn, _)) => conn,
                    Err(e) => {
                        let text = format!("{e:#}");
                        let code = text.split(": ").take(2).collect::<Vec<_>>().join(": ");
                        *failures.borrow_mut().entry(code).or_default() += 1;
                        return;
                    }
                };
                let now = Instant::now();
                latencies.borrow_mut().push(micros_between(t0, now));
                last_ack.set(Some(now));
                // Reading keeps the pings answered and the presence pushes drained.
                while !done.get() {
                    match conn.recv(Duration::from_secs(1)).await {
                        Ok(Event::Closed { .. }) | Err(_) => return,
                        Ok(Event::Frame(_)) => frames.set(frames.get() + 1),
                        Ok(Event::Timeout) => {}
                    }
                }
                let _ = conn.close().await;
            })
        })
        .collect();
    let meter = RateMeter::default();
    while attempted.get() < k {
        let a = attempted.get() as u64;
        progress.show(
            "idle",
            a,
            k as u64,
            "hellos",
            meter.rate(Instant::now(), a),
            "hello/s",
        );
        tokio::time::sleep(TICK).await;
    }
    let connected = latencies.borrow().len();
    let hello_wall = last_ack.get().map_or(Duration::ZERO, |t| t - start);
    progress.clear();
    progress.note(&format!(
        "{connected} connected; holding them {:.1} s",
        args.hold_secs()
    ));
    tokio::time::sleep(Duration::from_secs_f64(args.hold_secs())).await;
    let rss_after = monitor.and_then(Monitor::broker_rss_now);
    done.set(true);
    for t in tasks {
        let _ = t.await;
    }
    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if connected > 0 => Some(a.saturating_sub(b) as f64 / connected as f64),
        _ => None,
    };
    let secs = hello_wall.as_secs_f64();
    let hello = Latency::of(&mut latencies.borrow_mut());
    let failures = failures.borrow().clone();
    Ok(IdleRun {
        connections: k,
        connected,
        hello_failures: failures,
        hello_wall_s: secs,
        hellos_per_s: if secs > 0.0 {
            connected as f64 / secs
        } else {
            0.0
        },
        hello,
        frames_received: frames.get(),
        broker_rss_before_kib: rss_before,
        broker_rss_after_kib: rss_after,
        broker_kib_per_connection: per_conn,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_frames_are_json_with_a_ciphertext_of_the_size_asked() {
        let pad = "x".repeat(256);
        let mut out = String::new();
        send_frame(&mut out, 7, "ab", 3, 123_456, &pad);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["id"], "7");
        assert_eq!(v["targetSpec"], "ab");
        let c = v["ciphertext"].as_str().unwrap();
        assert_eq!(c.len(), 256);
        assert_eq!(parse_stamp(c), Some((3, 7, 123_456)));
        // Smaller than the stamp: the stamp alone.
        send_frame(&mut out, 7, "*", 3, 1, "");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["ciphertext"], "3.7.1.");
        assert_eq!(parse_stamp("hello"), None);
    }

    #[test]
    fn peers_are_placed_round_robin() {
        assert_eq!(
            (0..5).map(|i| broker_of(i, 2)).collect::<Vec<_>>(),
            [0, 1, 0, 1, 0]
        );
        assert_eq!(placed(5, 2), [3, 2]);
        assert_eq!(placed(7, 3), [3, 2, 2]);
        assert_eq!(placed(4, 1), [4]);
    }

    #[test]
    fn same_node_recipients_stay_on_the_senders_broker_and_all_are_chosen() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (n, brokers) in [(4, 2), (5, 2), (9, 3), (100, 2)] {
            for me in 0..n {
                let mut chosen = std::collections::HashSet::new();
                for _ in 0..2000 {
                    let j = pick_recipient(&mut rng, me, n, brokers, true);
                    assert!(j < n && j != me, "n={n} brokers={brokers} me={me} j={j}");
                    assert_eq!(broker_of(j, brokers), broker_of(me, brokers));
                    chosen.insert(j);
                }
                assert_eq!(chosen.len(), placed(n, brokers)[broker_of(me, brokers)] - 1);
            }
        }
    }

    #[test]
    fn recipients_are_on_another_broker_and_all_of_them_are_chosen() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        for (n, brokers) in [(2, 2), (5, 2), (7, 3), (4, 4), (6, 1)] {
            for me in 0..n {
                let mut chosen = vec![false; n];
                for _ in 0..500 {
                    let j = pick_recipient(&mut rng, me, n, brokers, false);
                    assert_ne!(j, me, "n={n} brokers={brokers}");
                    if brokers > 1 {
                        assert_ne!(
                            broker_of(j, brokers),
                            broker_of(me, brokers),
                            "peer {me} sent to {j} on its own broker (n={n}, brokers={brokers})"
                        );
                    }
                    chosen[j] = true;
                }
                let eligible = (0..n)
                    .filter(|&j| {
                        j != me && (brokers == 1 || broker_of(j, brokers) != broker_of(me, brokers))
                    })
                    .count();
                assert_eq!(
                    chosen.iter().filter(|&&c| c).count(),
                    eligible,
                    "n={n} brokers={brokers} me={me}"
                );
            }
        }
    }
}
