//! End-to-end benchmark: a real broker in-process on a private PostgreSQL
//! cluster (fsync on), real WebSocket clients, send → push → client_ack.
//!
//! ```text
//! cargo run --release --example bench [-- --messages 4000 --pairs 4 --window 64]
//! ```
//!
//! Prints the median and p99 of each latency and the end-to-end rate; it
//! asserts nothing. `limits.send_*` are raised so the token bucket does not
//! set the pace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use meshbroker::client::{self, Connection, Credentials, Event};
use meshbroker::config::Config;
use meshbroker::db::embedded::{EmbeddedOptions, EmbeddedPostgres};
use meshbroker::{admin, broker, db};
use serde_json::{json, Value};

struct Args {
    /// Messages in the throughput phase, over all pairs.
    messages: usize,
    /// Sender/receiver member pairs in the throughput phase.
    pairs: usize,
    /// Sends a sender keeps unanswered at once.
    window: usize,
    /// Sequential round trips in the latency phase.
    round_trips: usize,
}

fn args() -> Args {
    let mut a = Args {
        messages: 4000,
        pairs: 4,
        window: 64,
        round_trips: 300,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = pair
            .get(1)
            .and_then(|v| v.parse().ok())
            .expect("flags take a number");
        match pair[0].as_str() {
            "--messages" => a.messages = value,
            "--pairs" => a.pairs = value,
            "--window" => a.window = value,
            "--round-trips" => a.round_trips = value,
            other => {
                panic!("unknown flag {other} (use --messages, --pairs, --window, --round-trips)")
            }
        }
    }
    a
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "  {name:<28} n={:<6} median {:>7.2} ms   p99 {:>7.2} ms",
        ms.len(),
        percentile(&ms, 0.5),
        percentile(&ms, 0.99)
    );
}

/// Micros since `base`, carried in the ciphertext so the receiver can time it.
fn stamp(base: Instant) -> String {
    base.elapsed().as_micros().to_string()
}

fn since(base: Instant, push: &Value) -> f64 {
    let sent: u128 = push["ciphertext"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (base.elapsed().as_micros() - sent) as f64 / 1000.0
}

async fn next_frame(conn: &mut Connection) -> Value {
    loop {
        match conn.recv(Duration::from_secs(30)).await.expect("socket") {
            Event::Frame(f) if !client::is_system_push(&f) => return f,
            Event::Frame(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = args();
    let dir = tempfile::tempdir()?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    }
    let mut pg =
        EmbeddedPostgres::start(&dir.path().join("data"), &EmbeddedOptions { fsync: true })?;
    let url = pg.url();
    let result = actix_web::rt::System::new().block_on(run(args, url));
    pg.stop();
    result
}

async fn run(args: Args, url: String) -> anyhow::Result<()> {
    db::migrate(&url).await?;
    let mut config = Config::default();
    config.limits.send_burst = 1_000_000;
    config.limits.send_per_sec = 1_000_000;
    let config = Arc::new(config);
    let pool = db::connect(&url, config.database.pool_size).await?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let broker = broker::start(config, pool.clone(), listener).await?;
    let ws = format!("ws://{}/ws", broker.local_addr());

    let mut conn = pool.get().await?;
    let mesh = admin::create_mesh(&mut conn, "bench").await?;
    let mut members = Vec::new();
    for i in 0..(2 * args.pairs.max(1)) {
        let m = admin::add_member(&mut conn, mesh.id, &format!("m{i}"), None, false).await?;
        members.push(Credentials::from_secret_hex(
            &mesh.id.to_string(),
            &m.id.to_string(),
            &m.secret_key.expect("generated"),
        )?);
    }
    drop(conn);
    println!(
        "meshbroker bench: {} round trips, then {} messages over {} pairs (window {}); PostgreSQL fsync on",
        args.round_trips, args.messages, args.pairs, args.window
    );

    // Phase 1: one message at a time.
    let (mut tx, _) = client::hello(&ws, &members[0], &Default::default()).await?;
    let (mut rx, _) = client::hello(&ws, &members[1], &Default::default()).await?;
    let to = members[1].pubkey();
    let base = Instant::now();
    let (mut stored, mut pushed, mut round) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..args.round_trips {
        let t0 = Instant::now();
        tx.send_json(&json!({"type":"send","id":"x","targetSpec":to,"priority":"now","nonce":"n","ciphertext":stamp(base)}))
            .await?;
        let ack = next_frame(&mut tx).await;
        assert_eq!(ack["queued"], true, "{ack}");
        stored.push(t0.elapsed().as_secs_f64() * 1000.0);
        let push = next_frame(&mut rx).await;
        pushed.push(since(base, &push));
        rx.ack(&push).await?;
        round.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    println!("latency, one message in flight:");
    summary("send → ack (stored)", stored);
    summary("send → push", pushed);
    summary("send → push → client_ack", round);
    tx.close().await?;
    rx.close().await?;

    // Phase 2: pipelined senders, each to its own receiver.
    let per_pair = args.messages / args.pairs.max(1);
    let base = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..args.pairs {
        let (sender, receiver) = (members[2 * p].clone(), members[2 * p + 1].clone());
        let ws = ws.clone();
        let window = args.window;
        tasks.push(actix_web::rt::spawn(async move {
            let (mut rx, _) = client::hello(&ws, &receiver, &Default::default()).await.expect("hello");
            let (mut tx, _) = client::hello(&ws, &sender, &Default::default()).await.expect("hello");
            let to = receiver.pubkey();
            let receiving = actix_web::rt::spawn(async move {
                let mut lat = Vec::with_capacity(per_pair);
                while lat.len() < per_pair {
                    let push = next_frame(&mut rx).await;
                    lat.push(since(base, &push));
                    rx.ack(&push).await.expect("ack");
                }
                lat
            });
            let (mut sent, mut acked) = (0, 0);
            while acked < per_pair {
                while sent < per_pair && sent - acked < window {
                    tx.send_json(&json!({"type":"send","id":sent.to_string(),"targetSpec":to,"priority":"now","nonce":"n","ciphertext":stamp(base)}))
                        .await
                        .expect("send");
                    sent += 1;
                }
                let ack = next_frame(&mut tx).await;
                assert_eq!(ack["queued"], true, "{ack}");
                acked += 1;
            }
            receiving.await.expect("receiver")
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await?);
    }
    let elapsed = base.elapsed().as_secs_f64();
    let total = latencies.len();
    println!("throughput, {} pairs pipelined:", args.pairs);
    println!(
        "  {total} messages sent, pushed and acked in {elapsed:.2} s = {:.0} msg/s",
        total as f64 / elapsed
    );
    summary("send → push under load", latencies);
    let m = broker.metrics();
    use std::sync::atomic::Ordering::Relaxed;
    println!(
        "  broker counters: claimed {} pushed {} acked {} redelivered {}",
        m.deliveries_claimed.load(Relaxed),
        m.deliveries_pushed.load(Relaxed),
        m.deliveries_acked.load(Relaxed),
        m.deliveries_redelivered.load(Relaxed)
    );
    broker.shutdown().await;
    Ok(())
}
