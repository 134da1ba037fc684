//! Faults injected into a live `meshbroker serve` process: a consumer that
//! stops reading, a sweeper that fails again and again, a member revoked
//! while connected. Each test sends a known set of messages, checks every
//! accepted one was pushed and acked, and prints one `FIGURES` line.

use std::time::{Duration, Instant};

use meshbroker::client::{self, hello_frame, now_ms, session_hello_frame, Connection, Event};
use nix::sys::signal::Signal;
use serde_json::Value;

use crate::broker_process::*;
use crate::support::*;

/// `GET /metrics` of a broker process: the sum of `name{labels}`.
async fn process_metric(p: &BrokerProcess, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&metrics_at(&p.http_url).await, name, labels)
}

/// Polls a process metric until `pred` holds; panics with the broker log
/// after `timeout`.
async fn wait_process_metric(
    p: &BrokerProcess,
    name: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    wait_metric_at(&p.http_url, name, labels, timeout, pred, |_| {
        format!("broker log:\n{}", p.log())
    })
    .await
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// A plain `hello` to a broker process, with the member's name shown.
async fn connect(p: &BrokerProcess, m: &Member) -> (Connection, Value) {
    let opts = client::HelloOptions {
        display_name: Some(m.name.clone()),
        ..Default::default()
    };
    client::hello(&p.ws_url, &m.creds, &opts)
        .await
        .unwrap_or_else(|e| panic!("hello of {} failed: {e:#}", m.name))
}

/// Sends `n` small messages from `from` to `to` one at a time and returns
/// each one's send → push latency; `to` acks them all.
async fn pair_latencies(
    p: &BrokerProcess,
    from: &mut Connection,
    to: &mut Connection,
    to_pubkey: &str,
    n: usize,
    ledger: &mut Ledger,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let tag = format!("probe-{i}-{}", uuid::Uuid::new_v4().simple());
        let mut frame = client::send_frame(to_pubkey, &tag, "next");
        frame["id"] = tag.as_str().into();
        let id = frame["id"].clone();
        let started = Instant::now();
        from.send_json(&frame).await.must();
        let push = to
            .expect_where("the probe's push", WAIT, |f| {
                f["type"] == "push" && f["ciphertext"] == tag.as_str()
            })
            .await
            // A refused probe (say rate_limit) never arrives: keep the
            // senders inside limits.send_per_sec.
            .unwrap_or_else(|e| panic!("probe {i}: {e:#}; broker log:\n{}", p.log()));
        latencies.push(started.elapsed());
        let ack = from
            .expect_where("the probe's ack", WAIT, |f| {
                f["type"] == "ack" && f["id"] == id
            })
            .await
            .must();
        ledger.sent(&ack);
        assert_eq!(push["messageId"], ack["messageId"], "{push}");
        ledger.pushed(&push);
        to.ack(&push).await.must();
        ledger.acked(&push);
    }
    latencies
}

/// Every event on `conn` until it closes, or `timeout`.
async fn read_until_closed(
    conn: &mut Connection,
    timeout: Duration,
) -> (Vec<Value>, Option<(Option<u16>, String)>) {
    let deadline = Instant::now() + timeout;
    let mut frames = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match conn.recv(left).await.must() {
            Event::Frame(f) => frames.push(f),
            Event::Closed { code, reason } => return (frames, Some((code, reason))),
            Event::Timeout => return (frames, None),
        }
    }
}

/// 4. A consumer that stops reading its socket holds at most
/// `max_in_flight` leases, is cut off once redelivered pushes pile up
/// behind the ones it never read (so broker memory stays bounded), does not
/// slow another pair down, and loses nothing: its messages are delivered
/// when it comes back.
#[actix_web::test]
async fn a_consumer_that_stops_reading_is_bounded_and_cut_off_without_loss() {
    const TEST: &str = "slow_consumer";
    const MAX_IN_FLIGHT: i64 = 8;
    const MESSAGES: usize = 40;
    const LARGE: usize = 180_000;
    let env = TestEnv::without_broker().await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let carol = env.member("carol").await;
    let dave = env.member("dave").await;
    let config = ProcessConfig::new()
        .set("delivery.max_in_flight", &MAX_IN_FLIGHT.to_string())
        .set("delivery.lease", "\"1s\"")
        // Redelivered again and again while stuck: not a poison message.
        .set("delivery.max_attempts", "1000")
        .set("limits.max_message_bytes", "200000");
    let p = BrokerProcess::spawn_config(&env.db_url, config).await;

    let (mut ac, _) = connect(&p, &alice).await;
    let (mut cc, _) = connect(&p, &carol).await;
    let (mut dc, _) = connect(&p, &dave).await;
    let mut probes = Ledger::default();
    // Warm up, then the baseline of the other pair.
    pair_latencies(&p, &mut cc, &mut dc, &dave.pubkey(), 5, &mut probes).await;
    let rss_before = p.rss_kib();
    let baseline = pair_latencies(&p, &mut cc, &mut dc, &dave.pubkey(), 30, &mut probes).await;

    // Bob says hello, then never reads his socket again.
    let (mut stuck, ack) = connect(&p, &bob).await;
    let stuck_presence = ack["presenceId"].as_str().expect("presenceId").to_owned();
    let mut ledger = Ledger::default();
    let started = Instant::now();
    for i in 0..MESSAGES {
        let text = if i % 3 == 2 {
            format!("small {i}")
        } else {
            format!("{i:>6}{}", "x".repeat(LARGE))
        };
        let ack = ac
            .send_message(&bob.pubkey(), &text, "next", Some(&format!("m{i}")))
            .await
            .must();
        assert_eq!(ack["queued"], true, "{ack}");
        ledger.sent(&ack);
    }

    // While he is stuck: his live leases never exceed max_in_flight, the
    // other pair keeps flowing, and the broker's memory is sampled.
    let live_leases = format!(
        "SELECT count(*) AS n FROM mesh.message_queue
          WHERE claim_presence_id = '{stuck_presence}'::uuid
            AND claim_expires_at > now() AND delivered_at IS NULL"
    );
    let mut max_leases = 0;
    let mut rss_during = 0;
    let mut during = Vec::new();
    let mut cut_at = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while cut_at.is_none() {
        assert!(
            Instant::now() < deadline,
            "the consumer that stopped reading was never cut off (max live leases {max_leases}, \
             broker RSS {rss_before} KiB before, {rss_during} KiB now); log:\n{}",
            p.log()
        );
        let n = env.rows(&live_leases).await[0]["n"].as_i64().unwrap();
        max_leases = max_leases.max(n);
        rss_during = rss_during.max(p.rss_kib());
        during.extend(pair_latencies(&p, &mut cc, &mut dc, &dave.pubkey(), 3, &mut probes).await);
        if process_metric(&p, "meshbroker_slow_consumers_closed_total", &[]).await >= 1.0 {
            cut_at = Some(started.elapsed());
        }
        // Probes stay well inside carol's send rate limit.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cut_at = cut_at.unwrap();
    assert!(
        max_leases <= MAX_IN_FLIGHT,
        "a connection held {max_leases} live leases, more than max_in_flight {MAX_IN_FLIGHT}"
    );
    assert!(max_leases > 0, "the stuck connection was pushed to at all");

    // Cut off: its presence closes and its leases are released.
    env.wait_rows(
        &format!("SELECT disconnected_at FROM mesh.presence WHERE id = '{stuck_presence}'::uuid"),
        "the stuck connection's presence closed",
        |r| !r[0]["disconnected_at"].is_null(),
    )
    .await;
    env.wait_rows(
        &format!(
            "SELECT id FROM mesh.message_queue
              WHERE claim_presence_id = '{stuck_presence}'::uuid AND delivered_at IS NULL"
        ),
        "the stuck connection's claims released",
        |r| r.is_empty(),
    )
    .await;
    // What it had buffered can still be read, then the socket ends.
    let (frames, closed) = read_until_closed(&mut stuck, Duration::from_secs(20)).await;
    let (code, reason) = closed.expect("the stuck connection ended");
    assert!(
        code.is_none() || code == Some(1013),
        "cut off without a close frame (it cannot be read) or with 1013: {code:?} {reason:?}"
    );
    for f in frames.iter().filter(|f| f["type"] == "push") {
        ledger.pushed(f);
    }

    // Bob comes back reading: everything accepted for him arrives.
    let recovered = Instant::now();
    let (mut bc, _) = connect(&p, &bob).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while ledger.outstanding() > 0 {
        assert!(
            Instant::now() < deadline,
            "{} messages for bob never arrived after he came back",
            ledger.outstanding()
        );
        let push = bc.expect("push", Duration::from_secs(10)).await.must();
        ledger.pushed(&push);
        bc.ack(&push).await.must();
        ledger.acked(&push);
    }
    let recover_time = recovered.elapsed();
    let after = pair_latencies(&p, &mut cc, &mut dc, &dave.pubkey(), 10, &mut probes).await;
    let rss_after = p.rss_kib();

    let probe_report = probes.report();
    ledger.assert_nothing_lost(
        TEST,
        &format!(
            "large={} of ~{} KB max_live_leases={max_leases}/{MAX_IN_FLIGHT} cut_off_after_ms={} \
             recover_ms={} rss_kib before={rss_before} during_max={rss_during} after={rss_after} \
             other_pair_push_median_ms before={} during={} after={} other_pair_probes={} lost={}",
            MESSAGES - MESSAGES / 3,
            LARGE / 1000,
            ms(cut_at),
            ms(recover_time),
            ms(median(baseline)),
            ms(median(during)),
            ms(median(after)),
            probe_report.accepted,
            probe_report.lost.len(),
        ),
    );
    assert!(probe_report.lost.is_empty(), "{TEST}: probes lost");
    // Generous: the backlog bound is 8 × 256 KiB + 1 MiB here; anything
    // near this means buffering was not bounded.
    assert!(
        rss_during < rss_before + 256 * 1024,
        "broker RSS grew from {rss_before} KiB to {rss_during} KiB"
    );
}

/// 5. `SIGUSR1` makes the next sweeper pass fail; injected five times, the
/// supervisor restarts the sweeper each time, and after each restart the
/// sweeper still reclaims an unacked push's expired lease (it is pushed
/// again), while other traffic is delivered as usual.
#[actix_web::test]
async fn sigusr1_sweeper_failures_are_survived_and_redelivery_goes_on() {
    const TEST: &str = "sweeper_failures";
    const ROUNDS: usize = 5;
    let env = TestEnv::without_broker().await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let config = ProcessConfig::new()
        .set("delivery.lease", "\"1s\"")
        .set("delivery.max_attempts", "100")
        // The poll would claim the expired lease too: only the sweeper may.
        .set("cluster.poll_interval", "\"1h\"");
    let p = BrokerProcess::spawn_config(&env.db_url, config).await;
    let (mut ac, _) = connect(&p, &alice).await;
    let (mut bc, _) = connect(&p, &bob).await;
    let mut ledger = Ledger::default();

    // The message bob holds without acking for the whole test.
    let held = ac
        .send_message(&bob.pubkey(), "held", "now", None)
        .await
        .must();
    ledger.sent(&held);
    let held_id = held["messageId"].as_str().unwrap().to_owned();
    let first = bc.expect("push", WAIT).await.must();
    assert_eq!(first["messageId"], held_id.as_str());
    ledger.pushed(&first);
    let mut attempt = first["attempt"].as_i64().unwrap();

    let restarts = async |p: &BrokerProcess| {
        process_metric(p, "meshbroker_actor_restarts_total", &[("kind", "sweeper")]).await
    };
    assert_eq!(restarts(&p).await, 0.0, "no restart before the drill");
    let mut recovery = Vec::new();
    for round in 1..=ROUNDS {
        // Other traffic, acked, before the fault.
        for i in 0..4 {
            let ack = ac
                .send_message(&bob.pubkey(), &format!("r{round} m{i}"), "now", None)
                .await
                .must();
            ledger.sent(&ack);
            loop {
                let push = bc.expect("push", WAIT).await.must();
                ledger.pushed(&push);
                if push["messageId"] == held_id.as_str() {
                    attempt = attempt.max(push["attempt"].as_i64().unwrap());
                    continue;
                }
                bc.ack(&push).await.must();
                ledger.acked(&push);
                if push["messageId"] == ack["messageId"] {
                    break;
                }
            }
        }

        // Let whatever is on its way arrive, so what follows is the
        // sweeper's doing alone.
        for push in pushes_within(&mut bc, Duration::from_millis(300)).await {
            assert_eq!(
                push["messageId"],
                held_id.as_str(),
                "only the held one is unacked"
            );
            ledger.pushed(&push);
            attempt = attempt.max(push["attempt"].as_i64().unwrap());
        }
        let expired_before = process_metric(&p, "meshbroker_leases_expired_total", &[]).await;
        p.signal(Signal::SIGUSR1);
        wait_process_metric(
            &p,
            "meshbroker_actor_restarts_total",
            &[("kind", "sweeper")],
            Duration::from_secs(10),
            |v| v >= round as f64,
        )
        .await;
        let restarted = Instant::now();
        // No sends or acks now: only the restarted sweeper can make the
        // held delivery claimable again.
        let again = bc
            .expect_where(
                "the held message pushed again",
                Duration::from_secs(10),
                |f| {
                    f["type"] == "push"
                        && f["messageId"] == held_id.as_str()
                        && f["attempt"].as_i64().unwrap_or(0) > attempt
                },
            )
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:#}; log:\n{}", p.log()));
        recovery.push(restarted.elapsed());
        ledger.pushed(&again);
        attempt = again["attempt"].as_i64().unwrap();
        let expired_after = process_metric(&p, "meshbroker_leases_expired_total", &[]).await;
        assert!(
            expired_after > expired_before,
            "round {round}: the restarted sweeper expired the lease ({expired_before} → {expired_after})"
        );
    }
    bc.ack(&json!({ "messageId": held_id })).await.must();
    ledger.acked(&json!({ "messageId": held_id }));
    env.wait_rows(
        &format!(
            "SELECT delivered_at FROM mesh.message_queue WHERE message_id = '{held_id}'::uuid"
        ),
        "the held message acked at last",
        |r| !r[0]["delivered_at"].is_null(),
    )
    .await;

    let total_restarts = restarts(&p).await;
    let sweeps = process_metric(&p, "meshbroker_sweeper_runs_total", &[]).await;
    let log = p.log();
    ledger.assert_nothing_lost(
        TEST,
        &format!(
            "injected={ROUNDS} restarts={total_restarts} held_attempts={attempt} \
             sweeper_runs={sweeps} restart_to_redelivery_ms={:?}",
            recovery.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
        ),
    );
    assert_eq!(
        total_restarts, ROUNDS as f64,
        "one restart per injected failure"
    );
    assert_eq!(
        log.matches("SIGUSR1").count(),
        ROUNDS,
        "each drill is logged:\n{log}"
    );
}

/// 6. `meshbroker member revoke` on a connected member: its live connections
/// (control-plane and session) close with 4002 `revoked` within one sweeper
/// interval; its next hellos are refused `revoked`; what it sent before is
/// delivered; what is queued for it stays queued, pushed to no one.
#[actix_web::test]
async fn revoking_a_connected_member_closes_it_and_keeps_its_queue() {
    const TEST: &str = "revocation";
    const SWEEP: Duration = Duration::from_secs(1);
    let env = TestEnv::without_broker().await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let carol = env.member("carol").await;
    let config = ProcessConfig::new().set("sweeper.interval", "\"1s\"");
    let p = BrokerProcess::spawn_config(&env.db_url, config).await;

    let (mut ac, _) = connect(&p, &alice).await;
    let (mut bob_cp, ack) = connect(&p, &bob).await;
    let bob_presence = ack["presenceId"].as_str().unwrap().to_owned();
    let session_key = client::generate_session_key();
    let (mut bob_session, _) = client::session_hello(
        &p.ws_url,
        &bob.creds,
        &session_key,
        &client::HelloOptions::default(),
    )
    .await
    .must();

    // Bob sends to carol, who is offline: accepted and stored.
    let mut from_bob = Ledger::default();
    for i in 0..10 {
        let ack = bob_cp
            .send_message(&carol.pubkey(), &format!("from bob {i}"), "next", None)
            .await
            .must();
        assert_eq!(ack["queued"], true, "{ack}");
        from_bob.sent(&ack);
    }
    // Alice sends to bob: he acks two and holds three.
    let mut to_bob = Vec::new();
    for i in 0..5 {
        let ack = ac
            .send_message(&bob.pubkey(), &format!("to bob {i}"), "next", None)
            .await
            .must();
        to_bob.push(ack["messageId"].as_str().unwrap().to_owned());
    }
    for (i, id) in to_bob.iter().enumerate() {
        let push = bob_cp.expect("push", WAIT).await.must();
        assert_eq!(push["messageId"], id.as_str());
        if i < 2 {
            bob_cp.ack(&push).await.must();
        }
    }
    let held_sql = |ids: &[String]| {
        let list = ids
            .iter()
            .map(|id| format!("'{id}'::uuid"))
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "SELECT message_id::text AS m, claim_presence_id::text AS holder, attempts,
                    delivered_at, dead_at, expires_at > now() + interval '1 day' AS far_from_expiry
               FROM mesh.message_queue WHERE message_id IN ({list}) ORDER BY id"
        )
    };
    env.wait_rows(&held_sql(&to_bob[2..]), "three pushes held by bob", |r| {
        r.iter()
            .all(|r| r["holder"] == bob_presence.as_str() && r["delivered_at"].is_null())
    })
    .await;

    // Revoke him with the real CLI, from another process.
    let mesh = env.mesh_id.to_string();
    let pubkey = bob.pubkey();
    let cli_started = Instant::now();
    let out = run_cli(
        &p.config_path,
        &[
            "member", "revoke", "--mesh", &mesh, "--pubkey", &pubkey, "--json",
        ],
    )
    .await;
    let revoked = Instant::now();
    let cli_time = revoked - cli_started;
    assert!(
        out.status.success(),
        "member revoke failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("revoke --json prints JSON");
    assert!(!printed["revoked_at"].is_null(), "{printed}");

    let (code, reason) = bob_cp.expect_close(SWEEP * 5).await.unwrap_or_else(|e| {
        panic!(
            "bob's control-plane connection was not closed: {e:#}; log:\n{}",
            p.log()
        )
    });
    let cp_closed = revoked.elapsed();
    assert_eq!((code, reason.as_str()), (Some(4002), "revoked"));
    let (code, reason) = bob_session.expect_close(SWEEP * 5).await.must();
    let session_closed = revoked.elapsed();
    assert_eq!((code, reason.as_str()), (Some(4002), "revoked"));
    // One sweeper interval, plus room for a loaded machine to run the pass.
    let slack = Duration::from_millis(1500);
    assert!(
        cp_closed <= SWEEP + slack && session_closed <= SWEEP + slack,
        "closed {cp_closed:?} / {session_closed:?} after the revoke, sweeper.interval is {SWEEP:?}"
    );

    // He cannot come back, with either kind of hello.
    expect_refusal(
        &p.ws_url,
        &hello_frame(&bob.creds, &Default::default(), now_ms()),
        "revoked",
        4002,
    )
    .await;
    let now = now_ms();
    expect_refusal(
        &p.ws_url,
        &session_hello_frame(
            &bob.creds,
            &session_key,
            now + 3_600_000,
            &Default::default(),
            now + 1,
        ),
        "revoked",
        4002,
    )
    .await;

    // What is queued for him stays queued: released, undelivered, not dead,
    // not expired, and pushed to no one - also what is sent to him now.
    for i in 0..2 {
        let ack = ac
            .send_message(&bob.pubkey(), &format!("after revoke {i}"), "next", None)
            .await
            .must();
        assert_eq!(
            ack["queued"], true,
            "store and forward to a revoked member: {ack}"
        );
        to_bob.push(ack["messageId"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(SWEEP * 2).await;
    let rows = env.rows(&held_sql(&to_bob[2..])).await;
    assert_eq!(rows.len(), 5, "{rows:?}");
    for r in &rows {
        assert!(
            r["holder"].is_null()
                && r["delivered_at"].is_null()
                && r["dead_at"].is_null()
                && r["far_from_expiry"] == true,
            "queued for the revoked member: {rows:?}"
        );
    }
    let attempts: Vec<i64> = rows
        .iter()
        .map(|r| r["attempts"].as_i64().unwrap())
        .collect();
    assert_eq!(
        attempts,
        [1, 1, 1, 0, 0],
        "not pushed again after the revoke: {rows:?}"
    );
    assert_no_push(&mut ac, "alice (nothing of bob's is hers)").await;
    let live = env
        .rows(&format!(
            "SELECT id FROM mesh.presence WHERE member_id = '{}'::uuid AND disconnected_at IS NULL",
            bob.id
        ))
        .await;
    assert!(live.is_empty(), "bob has no live presence: {live:?}");

    // Carol comes online: everything bob sent before the revoke arrives.
    let (mut cc, _) = connect(&p, &carol).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while from_bob.outstanding() > 0 {
        assert!(
            Instant::now() < deadline,
            "bob's messages never reached carol"
        );
        let push = cc.expect("push", WAIT).await.must();
        assert_eq!(push["senderMemberPubkey"], bob.pubkey().as_str(), "{push}");
        from_bob.pushed(&push);
        cc.ack(&push).await.must();
        from_bob.acked(&push);
    }

    from_bob.assert_nothing_lost(
        TEST,
        &format!(
            "(sent by the revoked member) queued_for_revoked={} cli_ms={} \
             revoke_to_close_ms control_plane={} session={} sweeper_interval_ms={}",
            rows.len(),
            ms(cli_time),
            ms(cp_closed),
            ms(session_closed),
            ms(SWEEP),
        ),
    );
}

/// Between a revoke and the sweeper pass that closes its connections, the
/// revoked member is pushed nothing new: the claim takes nothing for it.
/// (In-process, with a sweeper that never runs, to hold that window open.)
#[actix_web::test]
async fn a_revoked_member_is_pushed_nothing_and_sends_nothing_before_its_connections_close() {
    let env =
        TestEnv::start_with(|c| c.sweeper.interval = meshbroker::config::Dur::secs(3600)).await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let mut ac = env.connect(&alice).await;
    let mut bc = env.connect(&bob).await;
    let before = ac
        .send_message(&bob.pubkey(), "before", "now", None)
        .await
        .must();
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], before["messageId"]);
    bc.ack(&push).await.must();

    env.revoke(&bob).await;
    let after = ac
        .send_message(&bob.pubkey(), "after", "now", None)
        .await
        .must();
    assert_eq!(after["queued"], true, "{after}");
    assert_no_push(&mut bc, "bob, revoked but not yet closed").await;
    let rows = env
        .rows(&format!(
            "SELECT claim_id, attempts, delivered_at FROM mesh.message_queue
              WHERE message_id = '{}'::uuid",
            after["messageId"].as_str().unwrap()
        ))
        .await;
    assert!(
        rows[0]["claim_id"].is_null() && rows[0]["attempts"] == 0,
        "never claimed: {rows:?}"
    );
    // Nor can it send from the connection still open: refused, not stored.
    let sent = bc
        .send_message(&alice.pubkey(), "from a revoked member", "now", None)
        .await
        .must();
    assert_refused(&sent, "forbidden");
    let stored = env
        .rows(&format!(
            "SELECT id FROM mesh.message WHERE sender_member_id = '{}'::uuid",
            bob.id
        ))
        .await;
    assert!(stored.is_empty(), "nothing stored: {stored:?}");
    env.wait_metric(
        "meshbroker_messages_rejected_total",
        &[("reason", "forbidden")],
        |v| v == 1.0,
    )
    .await;
}
