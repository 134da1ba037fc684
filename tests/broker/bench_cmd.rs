//! `meshbroker bench`, the real executable: with a broker of its own
//! (embedded PostgreSQL, durable) and against a running broker.

use serde_json::Value;

use crate::broker_process::*;
use crate::support::*;

/// Runs `meshbroker bench <args> --json --quiet` and parses its one object.
async fn bench(args: &[&str]) -> Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--json", "--quiet"]);
    // No --config: the shipped defaults; the bench writes its broker's own.
    let out = run_cli(std::path::Path::new("config/meshbroker.toml"), &all).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {stderr}\n{stdout}"
    );
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}\n{stderr}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a count in {v}"))
}

#[actix_web::test]
async fn burst_with_its_own_durable_broker_delivers_everything() {
    let r = bench(&["--mode", "burst", "--peers", "4", "--messages", "50"]).await;
    assert_eq!(r["mode"], "burst");
    assert_eq!(r["target"], "local");
    assert_eq!(r["durability"]["fsync"], "on", "{r}");
    assert_eq!(r["durability"]["synchronous_commit"], "on", "{r}");
    assert_eq!(n(&r, "sent"), 200, "{r}");
    assert_eq!(n(&r, "accepted"), n(&r, "sent"), "{r}");
    assert_eq!(n(&r, "acked"), n(&r, "accepted"), "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "unanswered"), 0, "{r}");
    assert_eq!(r["refused"], json!({}), "{r}");
    assert!(n(&r, "pushed") >= n(&r, "acked"), "{r}");
    assert_eq!(r["send_to_ack"]["n"], 200, "{r}");
    assert_eq!(r["send_to_push"]["n"], 200, "{r}");
    assert!(r["acked_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(n(&r["broker"], "peak_rss_kib") > 0, "{r}");
    assert!(n(&r["postgres"], "peak_rss_kib") > 0, "{r}");
    assert!(n(&r["postgres"], "peak_processes") > 1, "{r}");
    // One broker: one entry, holding every peer and the same figures.
    let brokers = r["brokers"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(brokers.len(), 1, "{r}");
    assert_eq!(n(&brokers[0], "peers"), 4, "{r}");
    assert_eq!(brokers[0]["cpu_s"], r["broker"]["cpu_s"], "{r}");
}

#[actix_web::test]
async fn idle_connections_are_counted_and_weighed() {
    let r = bench(&["--mode", "idle", "--connections", "6", "--duration", "0.5"]).await;
    let idle = &r["idle"];
    assert_eq!(n(idle, "connections"), 6, "{r}");
    assert_eq!(n(idle, "connected"), 6, "{r}");
    assert_eq!(idle["hello_failures"], json!({}), "{r}");
    assert_eq!(idle["hello"]["n"], 6, "{r}");
    assert!(idle["hellos_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(n(idle, "broker_rss_before_kib") > 0, "{r}");
    assert!(n(idle, "broker_rss_after_kib") > 0, "{r}");
    assert!(idle["broker_kib_per_connection"].is_number(), "{r}");
}

/// `--members 1`: one member's hello and the rest its sessions, so no
/// connection hears of another (presence events go to other members only).
#[actix_web::test]
async fn idle_sessions_of_one_member_hear_no_presence_events() {
    let r = bench(&[
        "--mode",
        "idle",
        "--connections",
        "5",
        "--members",
        "1",
        "--duration",
        "0.5",
    ])
    .await;
    let idle = &r["idle"];
    assert_eq!(n(idle, "connected"), 5, "{r}");
    assert_eq!(idle["hello_failures"], json!({}), "{r}");
    assert_eq!(n(idle, "frames_received"), 0, "{r}");
}

/// `--url` with members as `meshbroker member add --json` prints them.
#[actix_web::test]
async fn against_a_running_broker_with_a_provision_file() {
    let env = TestEnv::without_broker().await;
    let p = BrokerProcess::spawn(&env.db_url).await;
    let mesh = env.mesh_id.to_string();
    let (_dir, path) = provision_file(&p.config_path, &mesh, &["p1", "p2", "p3"]).await;
    let r = bench(&[
        "--url",
        &p.ws_url,
        "--provision",
        &path,
        "--mode",
        "fanout",
        "--peers",
        "3",
        "--senders",
        "2",
        "--messages",
        "10",
    ])
    .await;
    assert_eq!(r["target"], p.ws_url.as_str());
    assert_eq!(n(&r, "accepted"), 20, "{r}");
    // Each broadcast reaches the two other peers.
    assert_eq!(n(&r, "expected_deliveries"), 40, "{r}");
    assert_eq!(n(&r, "acked"), 40, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert!(
        r.get("broker").is_none(),
        "no figures for a broker not ours: {r}"
    );
    // More connections than members: the rest are sessions of the members.
    let idle = bench(&[
        "--url",
        &p.ws_url,
        "--provision",
        &path,
        "--mode",
        "idle",
        "--connections",
        "5",
        "--duration",
        "0.2",
    ])
    .await;
    assert_eq!(n(&idle["idle"], "connected"), 5, "{idle}");
    assert!(
        idle["idle"].get("broker_rss_before_kib").is_none(),
        "{idle}"
    );
    // The broker takes the last acks after the bench hung up.
    env.wait_rows(
        "SELECT count(*) AS n FROM mesh.message_queue WHERE delivered_at IS NOT NULL",
        "the 40 deliveries the bench acked, stored as delivered",
        |rows| rows[0]["n"] == 40,
    )
    .await;
}

/// `--brokers 2`: two brokers on the first one's embedded PostgreSQL, the
/// peers spread over them and every message sent to the other one's peers.
#[actix_web::test]
async fn burst_over_two_brokers_on_one_database_delivers_everything() {
    let r = bench(&[
        "--brokers",
        "2",
        "--mode",
        "burst",
        "--peers",
        "4",
        "--messages",
        "10",
    ])
    .await;
    let brokers = r["brokers"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(brokers.len(), 2, "{r}");
    assert_ne!(brokers[0]["url"], brokers[1]["url"], "{r}");
    for b in brokers {
        assert_eq!(n(b, "peers"), 2, "{r}");
        assert!(n(b, "peak_rss_kib") > 0, "{r}");
        // Both have senders: each stored messages.
        assert!(
            b["batches"]["writer"]["rounds"].as_f64().unwrap() > 0.0,
            "{r}"
        );
    }
    assert_eq!(r["target"], "local");
    assert_eq!(r["durability"]["fsync"], "on", "{r}");
    assert_eq!(n(&r, "sent"), 40, "{r}");
    assert_eq!(n(&r, "accepted"), 40, "{r}");
    assert_eq!(n(&r, "acked"), 40, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
    assert_eq!(n(&r, "unanswered"), 0, "{r}");
    // The totals are over both brokers.
    let peak = |b: &Value| n(b, "peak_rss_kib");
    assert!(
        peak(&r["broker"]) >= peak(&brokers[0]).max(peak(&brokers[1])),
        "{r}"
    );
    let rounds = |b: &Value| b["batches"]["writer"]["rounds"].as_f64().unwrap();
    assert_eq!(
        r["batches"]["writer"]["rounds"].as_f64().unwrap(),
        rounds(&brokers[0]) + rounds(&brokers[1]),
        "{r}"
    );
}

/// `--url` twice: two running brokers on one database share the peers.
#[actix_web::test]
async fn against_two_running_brokers_with_one_provision_file() {
    let env = TestEnv::without_broker().await;
    let (a, b) = (
        BrokerProcess::spawn(&env.db_url).await,
        BrokerProcess::spawn(&env.db_url).await,
    );
    let mesh = env.mesh_id.to_string();
    let (_dir, path) = provision_file(&a.config_path, &mesh, &["p1", "p2", "p3", "p4"]).await;
    let r = bench(&[
        "--url",
        &a.ws_url,
        "--url",
        &b.ws_url,
        "--provision",
        &path,
        "--mode",
        "burst",
        "--peers",
        "4",
        "--messages",
        "5",
    ])
    .await;
    assert_eq!(r["target"], format!("{}, {}", a.ws_url, b.ws_url), "{r}");
    let brokers = r["brokers"].as_array().unwrap_or_else(|| panic!("{r}"));
    assert_eq!(brokers.len(), 2, "{r}");
    for (got, url) in brokers.iter().zip([&a.ws_url, &b.ws_url]) {
        assert_eq!(got["url"], url.as_str(), "{r}");
        assert_eq!(n(got, "peers"), 2, "{r}");
        assert!(got.get("peak_rss_kib").is_none(), "not ours: {r}");
    }
    assert_eq!(n(&r, "accepted"), 20, "{r}");
    assert_eq!(n(&r, "acked"), 20, "{r}");
    assert_eq!(n(&r, "lost"), 0, "{r}");
}

/// Members `names` of `mesh`, added with `meshbroker member add --json`
/// and written to a provision file for `bench --url`; returns the file's
/// directory (kept while it lives) and path.
async fn provision_file(
    config: &std::path::Path,
    mesh: &str,
    names: &[&str],
) -> (tempfile::TempDir, String) {
    let mut file = String::new();
    for name in names {
        let out = run_cli(
            config,
            &["member", "add", "--mesh", mesh, "--name", name, "--json"],
        )
        .await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        file.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("members.jsonl");
    std::fs::write(&path, file).unwrap();
    let path = path.display().to_string();
    (dir, path)
}
