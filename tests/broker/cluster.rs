//! Three `meshbroker serve` processes on one database: a cluster. The
//! janitor and the safety-net poll are set an hour apart, so a delivery
//! across nodes, an event, a kick or a status change can only pass through
//! the nodes' notices (docs/cluster.md). Each test prints one `FIGURES`
//! line.

use std::time::{Duration, Instant};

use meshbroker::client::{self, Connection, HelloOptions};
use serde_json::{json, Value};

use crate::broker_process::*;
use crate::support::*;

/// Heartbeats 5 per second, a node dead after 1 s of silence, and nothing
/// but notices to carry anything between nodes.
fn cluster_config() -> ProcessConfig {
    ProcessConfig::new()
        .set("cluster.heartbeat_interval", "\"200ms\"")
        .set("cluster.dead_after", "\"1s\"")
        .set("cluster.poll_interval", "\"1h\"")
        .set("janitor.interval", "\"1h\"")
        .set("presence.grace", "\"2s\"")
}

/// `n` brokers on `db_url`, each seeing all `n` nodes.
async fn nodes(db_url: &str, n: usize, config: ProcessConfig) -> Vec<BrokerProcess> {
    let mut nodes = Vec::with_capacity(n);
    for _ in 0..n {
        nodes.push(BrokerProcess::spawn_config(db_url, config.clone()).await);
    }
    for p in &nodes {
        wait_metric_at(
            &p.http_url,
            "meshbroker_cluster_nodes",
            &[],
            WAIT,
            |v| v == n as f64,
            |_| format!("broker log:\n{}", p.log()),
        )
        .await;
    }
    nodes
}

async fn hello_as(p: &BrokerProcess, m: &Member, opts: HelloOptions) -> (Connection, Value) {
    client::hello(&p.ws_url, &m.creds, &opts)
        .await
        .unwrap_or_else(|e| panic!("hello of {} failed: {e:#}\n{}", m.name, p.log()))
}

async fn connect(p: &BrokerProcess, m: &Member) -> Connection {
    let opts = HelloOptions {
        display_name: Some(m.name.clone()),
        ..Default::default()
    };
    hello_as(p, m, opts).await.0
}

/// Sends `n` messages `from` → `to` (pubkey `to_key`) one at a time; `to`
/// acks each. Returns the send → push latencies; the ledger records all.
async fn exchange(
    from: &mut Connection,
    to: &mut Connection,
    to_key: &str,
    n: usize,
    ledger: &mut Ledger,
) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let tag = format!("x-{i}-{}", uuid::Uuid::new_v4().simple());
        let started = Instant::now();
        let ack = from.send_message(to_key, &tag, "now", None).await.must();
        ledger.sent(&ack);
        let push = to
            .expect_where("a push across nodes", WAIT, |f| {
                f["type"] == "push" && f["ciphertext"] == tag.as_str()
            })
            .await
            .must();
        latencies.push(started.elapsed());
        ledger.pushed(&push);
        to.ack(&push).await.must();
        ledger.acked(&push);
    }
    latencies
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

#[actix_web::test]
async fn three_nodes_carry_traffic_events_status_kick_and_replacement_between_them() {
    let env = TestEnv::without_broker().await;
    let names = ["alice", "bob", "carol"];
    let mut members = Vec::new();
    for n in names {
        members.push(env.member(n).await);
    }
    let admin = env.admin("root").await;
    let p = nodes(&env.db_url, 3, cluster_config()).await;

    // Joins across nodes: alice (node 0) hears of bob (1) and carol (2).
    let mut conns = Vec::new();
    for (i, m) in members.iter().enumerate() {
        conns.push(connect(&p[i], m).await);
    }
    for name in ["bob", "carol"] {
        conns[0]
            .expect_where("peer_joined across nodes", WAIT, |f| {
                f["event"] == "peer_joined" && f["eventData"]["name"] == name
            })
            .await
            .unwrap_or_else(|e| panic!("alice hears {name} join: {e:#}"));
    }

    // Traffic between every ordered pair of nodes.
    let mut ledger = Ledger::default();
    let mut latencies = Vec::new();
    for i in 0..3 {
        for j in 0..3 {
            if i == j {
                continue;
            }
            let key = members[j].pubkey();
            let (a, b) = if i < j {
                let (l, r) = conns.split_at_mut(j);
                (&mut l[i], &mut r[0])
            } else {
                let (l, r) = conns.split_at_mut(i);
                (&mut r[0], &mut l[j])
            };
            latencies.extend(exchange(a, b, &key, 20, &mut ledger).await);
        }
    }
    let report = ledger.assert_nothing_lost("cluster pairs", "");
    let pairs_p99 = p99(latencies.clone());

    // The hook, posted to node 0, for a session connected to node 2: a
    // `next` message waits while the session works and is pushed when the
    // hook says idle, through the status notice.
    let session_key = client::generate_session_key();
    let opts = HelloOptions {
        session_id: Some("cluster-session".into()),
        display_name: Some("carol-session".into()),
        ..Default::default()
    };
    let (mut sc, _) = client::session_hello(&p[2].ws_url, &members[2].creds, &session_key, &opts)
        .await
        .must();
    let hook = |status: &str| json!({"session_id": "cluster-session", "status": status});
    let (code, body) = http_post_json(
        &format!("{}/hook/set-status", p[0].http_url),
        &hook("working"),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let spub = spub(&session_key);
    let ack = conns[0]
        .send_message(&spub, "held", "next", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    assert!(
        pushes_within(&mut sc, Duration::from_millis(500))
            .await
            .is_empty(),
        "a working session is not pushed `next`"
    );
    let hook_at = Instant::now();
    let (code, body) =
        http_post_json(&format!("{}/hook/set-status", p[0].http_url), &hook("idle")).await;
    assert_eq!(code, 200, "{body}");
    sc.expect_where("the held push after the hook, across nodes", WAIT, |f| {
        f["type"] == "push" && f["ciphertext"] == "held"
    })
    .await
    .must();
    let hook_to_push = hook_at.elapsed();

    // `disconnect` from node 0 names bob on node 1 (a plain hello is a
    // control-plane connection, which `kick` spares: the ack says so for
    // node 1 too); the ack covers node 1.
    let (mut ad, _) = hello_as(
        &p[0],
        &admin,
        HelloOptions {
            display_name: Some("root".into()),
            ..Default::default()
        },
    )
    .await;
    let kick = ad
        .request(json!({"type": "kick", "target": "bob"}), WAIT)
        .await
        .must();
    assert_eq!(kick["type"], "kick_ack", "{kick}");
    assert_eq!(kick["skipped_control_plane"], json!(["bob"]), "{kick}");
    let kick = ad
        .request(json!({"type": "disconnect", "target": "bob"}), WAIT)
        .await
        .must();
    assert_eq!(kick["type"], "disconnect_ack", "{kick}");
    assert_eq!(kick["kicked"], json!(["bob"]), "{kick}");
    let (code, _) = conns[1].expect_close(WAIT).await.must();
    assert_eq!(code, Some(1000), "bob is disconnected on node 1");
    // …and alice, on node 0, hears bob leave when his grace window ends
    // (ended by the leader's sweeper, announced by every node).
    conns[0]
        .expect_where("peer_left across nodes", Duration::from_secs(15), |f| {
            f["event"] == "peer_left" && f["eventData"]["name"] == "bob"
        })
        .await
        .unwrap_or_else(|e| panic!("alice hears bob leave: {e:#}\n{}", p[1].log()));

    // Replacement across nodes: carol's hello on node 0 with the same
    // session id replaces her connection on node 2.
    let same = HelloOptions {
        session_id: Some("carol-daemon".into()),
        display_name: Some("carol".into()),
        ..Default::default()
    };
    let (mut old, _) = hello_as(&p[2], &members[2], same.clone()).await;
    let (_new, _) = hello_as(&p[0], &members[2], same).await;
    let (code, reason) = old.expect_close(WAIT).await.must();
    assert_eq!((code, reason.as_str()), (Some(1000), "session_replaced"));
    let live = env
        .rows(
            "SELECT count(*) AS n FROM mesh.presence
              WHERE session_id = 'carol-daemon' AND disconnected_at IS NULL",
        )
        .await;
    assert_eq!(
        live[0]["n"], 1,
        "one live connection per identity in the cluster"
    );

    // Notices went out coalesced: fewer notifications than notice items.
    let text = metrics_at(&p[0].http_url).await;
    let notices = metric(&text, "meshbroker_cluster_notices_total", &[]);
    let sent = metric(&text, "meshbroker_cluster_notifications_sent_total", &[]);
    assert!(
        notices > 0.0 && sent > 0.0,
        "node 0 published: {notices} items, {sent} sent"
    );
    println!(
        "FIGURES cluster_pairs: messages={} duplicates={} p99_send_to_push_ms={} max_ms={} hook_to_push_ms={} node0_notices={notices} node0_notifications={sent}",
        report.accepted,
        report.duplicated,
        pairs_p99.as_millis(),
        latencies.iter().max().unwrap().as_millis(),
        hook_to_push.as_millis(),
    );
}

#[actix_web::test]
async fn a_killed_node_is_taken_over_in_seconds_and_its_members_redelivered_at_once() {
    let env = TestEnv::without_broker().await;
    let sender = env.member("sender").await;
    let victim = env.member("victim").await;
    let gone = env.member("gone").await;
    let watcher = env.member("watcher").await;
    let mut p = nodes(&env.db_url, 3, cluster_config()).await;

    let mut sc = connect(&p[0], &sender).await;
    let mut wc = connect(&p[2], &watcher).await;
    let mut vc = connect(&p[1], &victim).await;
    let _gc = connect(&p[1], &gone).await;
    // Pushed to the victim on node 1, never acked: leased by node 1 for
    // the 60 s lease.
    let mut ledger = Ledger::default();
    for i in 0..10 {
        let ack = sc
            .send_message(&victim.pubkey(), &format!("unacked {i}"), "now", None)
            .await
            .must();
        ledger.sent(&ack);
    }
    for _ in 0..10 {
        let push = vc.expect("push", WAIT).await.must();
        ledger.pushed(&push);
    }
    let node1 = env
        .rows(
            "SELECT broker_node_id::text AS id FROM mesh.presence p JOIN mesh.member m
               ON m.id = p.member_id WHERE m.name = 'victim' AND p.disconnected_at IS NULL",
        )
        .await[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    p[1].sigkill().await;
    let killed = Instant::now();
    // The victim reconnects through "the load balancer" to node 2 at once.
    let mut vc2 = connect(&p[2], &victim).await;
    let mut redelivered = None;
    while !ledger.report().lost.is_empty() {
        let push = vc2
            .expect("push", Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e:#}\nnode 2 log:\n{}", p[2].log()));
        ledger.pushed(&push);
        vc2.ack(&push).await.must();
        ledger.acked(&push);
        redelivered.get_or_insert(killed.elapsed());
    }
    let all_redelivered = killed.elapsed();
    env.wait_rows(
        &format!(
            "SELECT dead_at FROM mesh.node WHERE id = '{node1}'::uuid AND dead_at IS NOT NULL"
        ),
        "node 1 declared dead",
        |rows| !rows.is_empty(),
    )
    .await;
    let declared = killed.elapsed();
    // `gone` never comes back: the watcher on node 2 hears it leave once
    // its grace window ends.
    wc.expect_where(
        "peer_left of a dead node's member",
        Duration::from_secs(20),
        |f| f["event"] == "peer_left" && f["eventData"]["name"] == "gone",
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\nnode 2 log:\n{}", p[2].log()));
    let peer_left = killed.elapsed();
    let report = ledger.assert_nothing_lost("node death", "");
    let left = env
        .rows(&format!(
            "SELECT count(*) AS n FROM mesh.message_queue
              WHERE claim_node_id = '{node1}'::uuid AND delivered_at IS NULL"
        ))
        .await;
    assert_eq!(left[0]["n"], 0, "no lease of the dead node is left");
    assert!(
        all_redelivered < Duration::from_secs(30),
        "redelivered long before the 60 s lease: {all_redelivered:?}"
    );
    println!(
        "FIGURES node_death: kill_to_declared_ms<={} kill_to_first_redelivery_ms={} kill_to_all_redelivered_ms={} kill_to_peer_left_ms={} redelivered={} duplicates={}",
        declared.as_millis(),
        redelivered.unwrap_or_default().as_millis(),
        all_redelivered.as_millis(),
        peer_left.as_millis(),
        report.accepted,
        report.duplicated,
    );
}

#[actix_web::test]
async fn a_terminated_listening_connection_is_replaced_and_nothing_waits_for_the_poll() {
    let env = TestEnv::without_broker().await;
    let a = env.member("a").await;
    let b = env.member("b").await;
    let p = nodes(&env.db_url, 2, cluster_config()).await;
    let mut ac = connect(&p[0], &a).await;
    let mut bc = connect(&p[1], &b).await;
    let mut ledger = Ledger::default();
    exchange(&mut ac, &mut bc, &b.pubkey(), 5, &mut ledger).await;

    // Every bus connection (listening and sending) is terminated.
    let killed = env
        .rows(
            "SELECT pg_terminate_backend(pid) AS killed FROM pg_stat_activity
              WHERE datname = current_database() AND pid <> pg_backend_pid()
                AND application_name LIKE 'meshbroker bus%'",
        )
        .await;
    assert_eq!(killed.len(), 4, "two bus connections per node: {killed:?}");
    for node in &p {
        wait_metric_at(
            &node.http_url,
            "meshbroker_cluster_bus_reconnects_total",
            &[],
            WAIT,
            |v| v >= 1.0,
            |_| node.log(),
        )
        .await;
    }
    let after = exchange(&mut ac, &mut bc, &b.pubkey(), 10, &mut ledger).await;
    let report = ledger.assert_nothing_lost("bus reconnect", "");
    let max = after.iter().max().unwrap();
    assert!(
        *max < Duration::from_secs(5),
        "after the reconnect pushes cross by notice, not by the hour-long poll: {max:?}"
    );
    println!(
        "FIGURES bus_reconnect: messages={} max_send_to_push_after_ms={}",
        report.accepted,
        max.as_millis()
    );
}

#[actix_web::test]
async fn member_wide_deliveries_go_to_the_daemon_whichever_node_it_is_on() {
    let env = TestEnv::without_broker().await;
    let sender = env.member("sender").await;
    let host = env.member("host").await;
    let p = nodes(&env.db_url, 2, cluster_config()).await;
    let mut sc = connect(&p[0], &sender).await;
    // The daemon (control-plane, no session key) on node 0; a CLI command
    // connection of the same member (carrying a session key) on node 1.
    let mut daemon = connect(&p[0], &host).await;
    let cli_key = client::generate_session_key();
    let (mut cli, _) = hello_as(
        &p[1],
        &host,
        HelloOptions {
            session_pubkey: Some(spub(&cli_key)),
            display_name: Some("host-cli".into()),
            ..Default::default()
        },
    )
    .await;
    for i in 0..10 {
        let ack = sc
            .send_message(&host.pubkey(), &format!("wide {i}"), "now", None)
            .await
            .must();
        assert_eq!(ack["queued"], true, "{ack}");
    }
    let mut got = 0;
    while got < 10 {
        let push = daemon.expect("push", WAIT).await.must();
        daemon.ack(&push).await.must();
        got += 1;
    }
    assert!(
        pushes_within(&mut cli, Duration::from_millis(500))
            .await
            .is_empty(),
        "the CLI connection on the other node takes none of the daemon's deliveries"
    );
}
