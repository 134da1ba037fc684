//! Data lifecycle: the janitor deletes what retention and expiry allow and
//! keeps the rest; the tables level off under steady traffic; the
//! `dead-letters` commands, through the real executable.

use std::time::{Duration, Instant};

use diesel_async::RunQueryDsl;
use meshbroker::client::{self, HelloOptions};
use meshbroker::config::Dur;
use serde_json::Value;

use crate::broker_process::*;
use crate::support::*;

/// Runs a statement that returns no rows (the seeding below).
async fn exec(env: &TestEnv, sql: &str) -> usize {
    let mut conn = env.pool.get().await.expect("db conn");
    diesel::sql_query(sql)
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn count(env: &TestEnv, sql: &str) -> i64 {
    let rows = env
        .rows(&format!("SELECT count(*) AS n FROM ({sql}) c"))
        .await;
    rows[0]["n"].as_i64().expect("a count")
}

/// Inserts `n` messages from `from` with `text` as ciphertext, created at
/// `created` (SQL expression), expiring at `expires`, each with one
/// delivery to `to` whose remaining columns are `delivery` (SQL `col = expr`
/// pairs for delivered_at, dead_at, attempts, recipient_key), or with no
/// delivery when `to` is `None`.
// Each argument is one column of the rows a retention test sets up; a
// struct for them would only be built once per call site.
#[allow(clippy::too_many_arguments)]
async fn seed(
    env: &TestEnv,
    n: u32,
    from: &Member,
    to: Option<&Member>,
    text: &str,
    created: &str,
    expires: &str,
    delivery: &[(&str, &str)],
) {
    exec(
        env,
        &format!(
            "INSERT INTO mesh.message (id, mesh_id, sender_member_id, sender_name, target_spec,
                                       priority, nonce, ciphertext, created_at, expires_at)
             SELECT gen_random_uuid(), '{mesh}'::uuid, '{from}'::uuid, 'seed', 'seed', 'now', 'n',
                    '{text}', {created}, {expires}
               FROM generate_series(1, {n})",
            mesh = env.mesh_id,
            from = from.id,
        ),
    )
    .await;
    let Some(to) = to else { return };
    let (cols, values): (Vec<&str>, Vec<&str>) = delivery.iter().copied().unzip();
    let extra_cols = cols.iter().map(|c| format!(", {c}")).collect::<String>();
    let extra_values = values.iter().map(|v| format!(", {v}")).collect::<String>();
    exec(
        env,
        &format!(
            "INSERT INTO mesh.message_queue (message_id, mesh_id, recipient_member_id, priority,
                                             created_at, expires_at{extra_cols})
             SELECT id, mesh_id, '{to}'::uuid, 'now', created_at, expires_at{extra_values}
               FROM mesh.message WHERE ciphertext = '{text}'",
            to = to.id,
        ),
    )
    .await;
}

/// Messages with ciphertext `text`, and deliveries of them.
async fn left(env: &TestEnv, text: &str) -> (i64, i64) {
    let messages = count(
        env,
        &format!("SELECT 1 FROM mesh.message WHERE ciphertext = '{text}'"),
    )
    .await;
    let deliveries = count(
        env,
        &format!(
            "SELECT 1 FROM mesh.message_queue q JOIN mesh.message m ON m.id = q.message_id
              WHERE m.ciphertext = '{text}'"
        ),
    )
    .await;
    (messages, deliveries)
}

/// Inserts a closed presence row of `m` with session key `key`, closed at `closed`.
async fn closed_presence(env: &TestEnv, m: &Member, key: &str, closed: &str) {
    exec(
        env,
        &format!(
            "INSERT INTO mesh.presence (id, mesh_id, member_id, session_id, session_pubkey, role,
                                        display_name, broker_node_id, connected_at, last_seen_at,
                                        disconnected_at)
             VALUES (gen_random_uuid(), '{mesh}'::uuid, '{member}'::uuid, 'sid-{key}', '{key}',
                     'session', 'old', gen_random_uuid(), {closed}, {closed}, {closed})",
            mesh = env.mesh_id,
            member = m.id,
        ),
    )
    .await;
}

async fn janitor_runs(env: &TestEnv) -> f64 {
    metric(&env.metrics().await, "meshbroker_janitor_runs_total", &[])
}

/// Waits until the janitor completed `n` more passes than now.
async fn passes(env: &TestEnv, n: u32) {
    let now = janitor_runs(env).await;
    env.wait_metric("meshbroker_janitor_runs_total", &[], |v| {
        v >= now + f64::from(n)
    })
    .await;
}

#[actix_web::test]
async fn retention_deletes_in_batches_and_keeps_what_can_still_matter() {
    let env = TestEnv::start_with(|c| {
        c.delivery.retention = Dur::secs(1);
        c.delivery.dedupe_window = Dur::secs(60);
        c.delivery.lease = Dur::secs(30);
        c.janitor.interval = Dur::millis(200);
    })
    .await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await; // never connects: nothing claims his rows
    let carol = env.member("carol").await;
    let old = "now() - interval '1 hour'";
    let week = "now() + interval '7 days'";
    let gone = "now() - interval '8 days'";
    let expired = "now() - interval '1 day'";

    // More delivered rows than one statement may delete.
    let bulk = meshbroker::actors::janitor::BATCH as u32 * 2 + 500;
    seed(
        &env,
        bulk,
        &alice,
        Some(&bob),
        "bulk",
        old,
        week,
        &[("attempts", "1"), ("delivered_at", old)],
    )
    .await;
    // Undelivered and unexpired: pending, dead-lettered, keyed to an old session.
    seed(&env, 1, &alice, Some(&bob), "pending", old, week, &[]).await;
    seed(
        &env,
        1,
        &alice,
        Some(&bob),
        "dead",
        old,
        week,
        &[
            ("attempts", "10"),
            ("dead_at", old),
            ("dead_reason", "'max_attempts'"),
        ],
    )
    .await;
    let kept_key = "a".repeat(64);
    seed(
        &env,
        1,
        &alice,
        Some(&bob),
        "keyed",
        old,
        week,
        &[("recipient_key", &format!("'{kept_key}'"))],
    )
    .await;
    // Past expires_at, whatever the state.
    seed(
        &env,
        1,
        &alice,
        Some(&bob),
        "expired-pending",
        gone,
        expired,
        &[],
    )
    .await;
    seed(
        &env,
        1,
        &alice,
        Some(&bob),
        "expired-dead",
        gone,
        expired,
        &[
            ("attempts", "10"),
            ("dead_at", old),
            ("dead_reason", "'max_attempts'"),
        ],
    )
    .await;
    // Sent to nobody: only the walk over all messages finds it.
    seed(&env, 1, &alice, None, "to-nobody", old, week, &[]).await;
    // Presence: closed past message_ttl; the same but a pending delivery is
    // keyed to it; closed recently.
    let gone_key = "b".repeat(64);
    closed_presence(&env, &bob, &gone_key, gone).await;
    closed_presence(&env, &bob, &kept_key, gone).await;
    closed_presence(&env, &bob, &"c".repeat(64), "now() - interval '1 minute'").await;

    // A real message with an idempotency key, pushed and acked.
    let mut ac = env.connect(&alice).await;
    let mut cc = env.connect(&carol).await;
    let ack = ac
        .send_message(&carol.pubkey(), "keyed send", "now", Some("keep-me"))
        .await
        .must();
    let mid = ack["messageId"].as_str().expect("queued").to_owned();
    let push = cc.expect("push", WAIT).await.must();
    cc.ack(&push).await.must();

    env.wait_rows(
        "SELECT ciphertext, count(*) AS n FROM mesh.message
          WHERE ciphertext IN ('bulk', 'expired-pending', 'expired-dead', 'to-nobody')
          GROUP BY ciphertext",
        "old delivered, expired and recipient-less messages deleted",
        |rows| rows.is_empty(),
    )
    .await;
    assert_eq!(left(&env, "bulk").await, (0, 0));
    env.wait_rows(
        &format!("SELECT id FROM mesh.message_queue WHERE message_id = '{mid}'::uuid"),
        "the acked delivery deleted after retention",
        |rows| rows.is_empty(),
    )
    .await;
    env.wait_rows(
        &format!("SELECT id FROM mesh.presence WHERE session_pubkey = '{gone_key}'"),
        "presence closed past message_ttl deleted",
        |rows| rows.is_empty(),
    )
    .await;

    // A few more passes change nothing about what must stay.
    passes(&env, 3).await;
    for text in ["pending", "dead", "keyed"] {
        assert_eq!(left(&env, text).await, (1, 1), "{text} kept");
    }
    let presence = env
        .rows("SELECT session_pubkey FROM mesh.presence WHERE display_name = 'old' ORDER BY 1")
        .await;
    assert_eq!(
        presence,
        [
            json!({"session_pubkey": kept_key}),
            json!({"session_pubkey": "c".repeat(64)})
        ],
        "a key with a pending delivery and a recently closed one stay addressable"
    );
    // The message outlives its delivery while its idempotency key is held:
    // a resend is still answered as the same message, not stored again.
    let held = env
        .rows(&format!(
            "SELECT dedupe_key FROM mesh.message WHERE id = '{mid}'::uuid"
        ))
        .await;
    assert_eq!(held, [json!({"dedupe_key": "keep-me"})]);
    let again = ac
        .send_message(&carol.pubkey(), "keyed send", "now", Some("keep-me"))
        .await
        .must();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["messageId"], mid.as_str(), "{again}");
    assert_no_push(&mut cc, "carol after a duplicate").await;

    // Once the key is released (the sweeper does it after dedupe_window),
    // the walk over all messages deletes it.
    exec(
        &env,
        &format!("UPDATE mesh.message SET dedupe_key = NULL WHERE id = '{mid}'::uuid"),
    )
    .await;
    env.wait_rows(
        &format!("SELECT id FROM mesh.message WHERE id = '{mid}'::uuid"),
        "the message deleted once its key is released",
        |rows| rows.is_empty(),
    )
    .await;

    // The counters are bumped when the pass ends, just after its commits.
    let name = "meshbroker_retention_deleted_rows_total";
    let expect_queue = f64::from(bulk) + 3.0; // bulk, two expired, carol's
    let expect_message = f64::from(bulk) + 4.0; // … and the one sent to nobody
    env.wait_metric(name, &[("table", "message")], |v| v >= expect_message)
        .await;
    let text = env.metrics().await;
    let deleted = |table| metric(&text, name, &[("table", table)]);
    println!(
        "FIGURES retention: deleted message_queue={} message={} presence={}",
        deleted("message_queue"),
        deleted("message"),
        deleted("presence")
    );
    assert_eq!(deleted("message_queue"), expect_queue);
    assert_eq!(deleted("message"), expect_message);
    assert_eq!(deleted("presence"), 1.0);
}

/// The janitor's statements, without a broker (so without a janitor racing
/// them): each deletes at most its batch, and the walk over all messages
/// resumes where it stopped and says when it reached the end.
#[actix_web::test]
async fn each_delete_statement_is_bounded_by_its_batch() {
    use meshbroker::db::lifecycle;
    let env = TestEnv::without_broker().await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let old = "now() - interval '1 hour'";
    seed(
        &env,
        2500,
        &alice,
        Some(&bob),
        "delivered",
        old,
        "now() + interval '1 day'",
        &[("attempts", "1"), ("delivered_at", old)],
    )
    .await;
    seed(
        &env,
        1200,
        &alice,
        Some(&bob),
        "expired",
        old,
        "now() - interval '1 minute'",
        &[],
    )
    .await;
    seed(
        &env,
        10,
        &alice,
        Some(&bob),
        "fresh",
        "now()",
        "now() + interval '1 day'",
        &[("attempts", "1"), ("delivered_at", "now()")],
    )
    .await;
    let mut conn = env.pool.get().await.expect("db conn");
    let retention = Duration::from_secs(60);

    let mut sizes = Vec::new();
    loop {
        let n = lifecycle::delete_delivered(&mut conn, retention, 1000)
            .await
            .unwrap()
            .len();
        sizes.push(n);
        if n < 1000 {
            break;
        }
    }
    assert_eq!(sizes, [1000, 1000, 500], "delivered rows per statement");
    let expired = lifecycle::delete_expired_deliveries(&mut conn, 1000)
        .await
        .unwrap();
    assert_eq!(expired.len(), 1000);
    let expired = lifecycle::delete_expired_deliveries(&mut conn, 1000)
        .await
        .unwrap();
    assert_eq!(expired.len(), 200);
    drop(conn);
    assert_eq!(
        left(&env, "fresh").await,
        (10, 10),
        "delivered inside retention"
    );

    // 2500 + 1200 messages without deliveries now, 10 with.
    let mut conn = env.pool.get().await.expect("db conn");
    let (mut cursor, mut steps, mut deleted) = (None, 0, 0);
    loop {
        let (n, next) = lifecycle::walk_orphan_messages(&mut conn, cursor, retention, 1000)
            .await
            .unwrap();
        assert!(n <= 1000, "one step deletes at most its batch: {n}");
        deleted += n;
        steps += 1;
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    drop(conn);
    assert_eq!(deleted, 3700);
    assert_eq!(steps, 4, "3710 messages looked at 1000 per step");
    assert_eq!(left(&env, "fresh").await, (10, 10));
    assert_eq!(left(&env, "delivered").await, (0, 0));
    assert_eq!(left(&env, "expired").await, (0, 0));
}

#[actix_web::test]
async fn the_janitor_is_restarted_after_a_failure_and_still_deletes() {
    let env = TestEnv::start_with(|c| {
        c.delivery.retention = Dur::secs(1);
        c.janitor.interval = Dur::millis(200);
    })
    .await;
    let kind = [("kind", "janitor")];
    env.wait_metric("meshbroker_actors", &kind, |v| v == 1.0)
        .await;
    let before = metric(
        &env.metrics().await,
        "meshbroker_actor_restarts_total",
        &kind,
    );
    env.broker().inject_janitor_failure();
    env.wait_metric("meshbroker_actor_restarts_total", &kind, |v| {
        v >= before + 1.0
    })
    .await;

    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let old = "now() - interval '1 hour'";
    seed(
        &env,
        3,
        &alice,
        Some(&bob),
        "after-restart",
        old,
        "now() + interval '1 day'",
        &[("attempts", "1"), ("delivered_at", old)],
    )
    .await;
    env.wait_rows(
        "SELECT id FROM mesh.message WHERE ciphertext = 'after-restart'",
        "the restarted janitor deletes",
        |rows| rows.is_empty(),
    )
    .await;
    env.wait_metric("meshbroker_actors", &kind, |v| v == 1.0)
        .await;
}

/// `meshbroker --config <file> dead-letters …`; returns (success, stdout, stderr).
async fn cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let args: Vec<&str> = std::iter::once("dead-letters")
        .chain(args.iter().copied())
        .collect();
    let out = run_cli(config, &args).await;
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn cli_json(config: &std::path::Path, args: &[&str]) -> Value {
    let (ok, stdout, stderr) = cli(config, args).await;
    assert!(ok, "dead-letters {args:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[actix_web::test]
async fn dead_letters_are_listed_requeued_to_a_connected_member_and_purged() {
    let env = TestEnv::without_broker().await;
    let alice = env.member("alice").await;
    let bob = env.member("bob").await;
    let p = BrokerProcess::spawn_config(
        &env.db_url,
        ProcessConfig::new()
            .set("delivery.lease", "\"1s\"")
            .set("delivery.max_attempts", "1")
            .set("janitor.interval", "\"200ms\""),
    )
    .await;
    let config = p.config_path.clone();
    let mesh = env.mesh_id.to_string();
    let hello = |m: &Member| {
        let url = p.ws_url.clone();
        let creds = m.creds.clone();
        async move {
            client::hello(&url, &creds, &HelloOptions::default())
                .await
                .must()
                .0
        }
    };
    let mut ac = hello(&alice).await;
    let mut bc = hello(&bob).await;

    // Bob takes two pushes and acks neither: one attempt each, then dead.
    let mut mids = Vec::new();
    for text in ["first", "second"] {
        let ack = ac
            .send_message(&bob.pubkey(), text, "now", None)
            .await
            .must();
        mids.push(ack["messageId"].as_str().expect("queued").to_owned());
        let push = bc.expect("push", WAIT).await.must();
        assert_eq!(push["messageId"], mids.last().unwrap().as_str());
    }
    env.wait_rows(
        "SELECT id FROM mesh.message_queue WHERE dead_at IS NOT NULL",
        "both deliveries dead-lettered",
        |rows| rows.len() == 2,
    )
    .await;

    let listed = cli_json(&config, &["list", "--mesh", &mesh, "--json"]).await;
    let listed = listed.as_array().expect("a JSON array").clone();
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (d, mid) in listed.iter().zip(&mids) {
        assert_eq!(d["message_id"], mid.as_str(), "{d}");
        assert_eq!(d["recipient_member_id"], bob.id.as_str(), "{d}");
        assert_eq!(d["recipient_name"], "bob", "{d}");
        assert_eq!(d["recipient_pubkey"], bob.pubkey().as_str(), "{d}");
        assert_eq!(d["attempts"], 1, "{d}");
        assert_eq!(d["dead_reason"], "max_attempts", "{d}");
        assert!(d["id"].is_i64() && d["dead_at"].is_string(), "{d}");
    }
    let first = listed[0]["id"].as_i64().unwrap().to_string();
    let second = listed[1]["id"].as_i64().unwrap().to_string();
    let (ok, table, _) = cli(&config, &["list", "--mesh", &mesh]).await;
    assert!(
        ok && table.contains(&first) && table.contains("max_attempts"),
        "{table}"
    );

    // Requeued while bob stays connected and silent: nothing but the
    // broker's own safety net can make it push again.
    assert_no_push(&mut bc, "bob before the requeue").await;
    let requeued = cli_json(
        &config,
        &["requeue", "--mesh", &mesh, "--id", &first, "--json"],
    )
    .await;
    assert_eq!(requeued, json!({"requeued": 1, "ids": [listed[0]["id"]]}));
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], mids[0].as_str(), "{push}");
    assert_eq!(push["attempt"], 1, "attempts start over: {push}");
    bc.ack(&push).await.must();
    env.wait_rows(
        &format!("SELECT delivered_at FROM mesh.message_queue WHERE id = {first}"),
        "the requeued delivery acked",
        |rows| rows.len() == 1 && !rows[0]["delivered_at"].is_null(),
    )
    .await;

    // Errors are one line and change nothing.
    let (ok, _, stderr) = cli(
        &config,
        &["requeue", "--mesh", &mesh, "--id", &first, "--id", &second],
    )
    .await;
    assert!(!ok, "requeue of a delivered delivery must fail");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "meshbroker: error: no dead letter with id {first} in mesh {mesh}"
        )),
        "{stderr}"
    );
    let (ok, _, stderr) = cli(&config, &["purge", "--mesh", &mesh]).await;
    assert!(!ok && stderr.contains("say which dead letters"), "{stderr}");
    let (ok, _, stderr) = cli(
        &config,
        &["list", "--mesh", &uuid::Uuid::new_v4().to_string()],
    )
    .await;
    assert!(!ok && stderr.contains("not found"), "{stderr}");
    assert_eq!(
        count(
            &env,
            "SELECT 1 FROM mesh.message_queue WHERE dead_at IS NOT NULL"
        )
        .await,
        1,
        "the failed requeue left the second dead letter alone"
    );

    // --older-than selects by age of death; then the purge takes the message along.
    let none = cli_json(
        &config,
        &["purge", "--mesh", &mesh, "--older-than", "1h", "--json"],
    )
    .await;
    assert_eq!(none, json!({"purged": 0, "messages_deleted": 0, "ids": []}));
    let purged = cli_json(&config, &["purge", "--mesh", &mesh, "--all", "--json"]).await;
    assert_eq!(
        purged,
        json!({"purged": 1, "messages_deleted": 1, "ids": [listed[1]["id"]]})
    );
    assert_eq!(
        count(
            &env,
            &format!("SELECT 1 FROM mesh.message WHERE id = '{}'::uuid", mids[1])
        )
        .await,
        0
    );
    let listed = cli_json(&config, &["list", "--mesh", &mesh, "--json"]).await;
    assert_eq!(listed, json!([]));
    assert_no_push(&mut bc, "bob after the purge").await;
}

/// Steady send → push → ack traffic against a real broker with a short
/// retention, printing row counts and relation sizes as it goes:
///
/// ```text
/// cargo test --release --test broker lifecycle::tables_level_off -- --ignored --nocapture
/// ```
///
/// `LEVEL_OFF_SECS` (default 150) sets how long the traffic runs,
/// `LEVEL_OFF_RATE` (default 200) the messages per second it aims at.
#[actix_web::test]
#[ignore = "runs for minutes; prints figures"]
async fn tables_level_off() {
    let secs: u64 = std::env::var("LEVEL_OFF_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    let rate: u64 = std::env::var("LEVEL_OFF_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    const PAIRS: u64 = 4;
    let env = TestEnv::start_with(|c| {
        c.delivery.retention = Dur::secs(2);
        c.delivery.message_ttl = Dur::secs(10);
        c.delivery.dedupe_window = Dur::secs(5);
        c.delivery.lease = Dur::secs(30);
        c.janitor.interval = Dur::millis(500);
        c.presence.grace = Dur::secs(1);
        c.limits.send_burst = 100_000;
        c.limits.send_per_sec = 100_000;
        c.database.pool_size = 8;
    })
    .await;
    println!(
        "FIGURES level-off: retention 2s, message_ttl 10s, dedupe_window 5s, janitor 500ms, \
         {PAIRS} sender/receiver pairs aiming at {rate} msg/s, one connection opened and closed \
         every 250ms, {secs}s of traffic"
    );
    let stop = std::rc::Rc::new(std::cell::Cell::new(false));
    let mut tasks = Vec::new();
    for i in 0..PAIRS {
        let from = env.member(&format!("sender{i}")).await;
        let to = env.member(&format!("receiver{i}")).await;
        let mut sc = env.connect(&from).await;
        let mut rc = env.connect(&to).await;
        let to_key = to.pubkey();
        let period = Duration::from_micros(1_000_000 * PAIRS / rate);
        let stop_s = stop.clone();
        tasks.push(actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut sent = 0u64;
            while !stop_s.get() {
                tick.tick().await;
                let cmid = format!("m{i}-{sent}");
                let ack = sc
                    .send_message(&to_key, "steady", "now", Some(&cmid))
                    .await
                    .must();
                assert_eq!(ack["queued"], true, "{ack}");
                sent += 1;
            }
            sent
        }));
        let stop_r = stop.clone();
        tasks.push(actix_web::rt::spawn(async move {
            let mut acked = 0u64;
            loop {
                match rc.recv(Duration::from_millis(500)).await.must() {
                    client::Event::Frame(f)
                        if f["type"] == "push" && !client::is_system_push(&f) =>
                    {
                        rc.ack(&f).await.must();
                        acked += 1;
                    }
                    client::Event::Timeout if stop_r.get() => return acked,
                    client::Event::Closed { .. } => panic!("receiver closed"),
                    _ => {}
                }
            }
        }));
    }
    let churner = env.member("churner").await;
    let ws_url = env.ws_url.clone();
    let stop_c = stop.clone();
    let churn = actix_web::rt::spawn(async move {
        let mut n = 0u64;
        while !stop_c.get() {
            let key = client::generate_session_key();
            let opts = HelloOptions {
                display_name: Some(format!("churn{n}")),
                ..Default::default()
            };
            let (c, _) = client::session_hello(&ws_url, &churner.creds, &key, &opts)
                .await
                .must();
            c.close().await.must();
            n += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        n
    });

    let sample_sql = "SELECT (SELECT count(*) FROM mesh.message) AS messages,
                             (SELECT count(*) FROM mesh.message_queue) AS deliveries,
                             (SELECT count(*) FROM mesh.presence) AS presence,
                             pg_total_relation_size('mesh.message') AS message_bytes,
                             pg_total_relation_size('mesh.message_queue') AS queue_bytes,
                             pg_total_relation_size('mesh.presence') AS presence_bytes,
                             (SELECT sum(autovacuum_count) FROM pg_stat_user_tables
                               WHERE schemaname = 'mesh') AS autovacuums";
    let started = Instant::now();
    let mut samples: Vec<(u64, Value)> = Vec::new();
    let sample = |phase: &'static str, row: &Value| {
        let kib = |k: &str| row[k].as_i64().unwrap_or(0) / 1024;
        println!(
            "FIGURES level-off {phase:<6} t={:>4}s  rows: message {:>6} message_queue {:>6} presence {:>5}   \
             total size: message {:>6} KiB message_queue {:>6} KiB presence {:>5} KiB   autovacuums {}",
            started.elapsed().as_secs(),
            row["messages"], row["deliveries"], row["presence"],
            kib("message_bytes"), kib("queue_bytes"), kib("presence_bytes"),
            row["autovacuums"]
        );
    };
    let first = env.rows(sample_sql).await.remove(0);
    sample("before", &first);
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let row = env.rows(sample_sql).await.remove(0);
        sample("during", &row);
        samples.push((started.elapsed().as_secs(), row));
    }
    stop.set(true);
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.expect("traffic task"));
    }
    let churned = churn.await.expect("churn task");
    let sent: u64 = counts.iter().step_by(2).sum();
    let acked: u64 = counts.iter().skip(1).step_by(2).sum();
    println!(
        "FIGURES level-off: sent {sent}, acked {acked} ({:.0} msg/s achieved), {churned} connections churned",
        sent as f64 / secs as f64
    );
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(10)).await;
        sample("after", &env.rows(sample_sql).await.remove(0));
    }

    for row in env
        .rows(
            "SELECT relname, n_tup_upd, n_tup_hot_upd, n_tup_del, autovacuum_count
               FROM pg_stat_user_tables
              WHERE schemaname = 'mesh' AND relname IN ('message', 'message_queue', 'presence')
              ORDER BY relname",
        )
        .await
    {
        println!(
            "FIGURES level-off {}: updates {} (HOT {}), deletes {}, autovacuums {}",
            row["relname"],
            row["n_tup_upd"],
            row["n_tup_hot_upd"],
            row["n_tup_del"],
            row["autovacuum_count"]
        );
    }
    assert_eq!(sent, acked, "every message pushed and acked");
    // Rows are bounded by the windows, not by how long the traffic ran:
    // the second half of the run never holds more than the first half did
    // (with slack for scheduling noise).
    let half = samples.len() / 2;
    let peak = |range: &[(u64, Value)], k: &str| {
        range
            .iter()
            .map(|(_, r)| r[k].as_i64().unwrap_or(0))
            .max()
            .unwrap_or(0)
    };
    for k in ["messages", "deliveries", "presence"] {
        let (early, late) = (peak(&samples[..half], k), peak(&samples[half..], k));
        assert!(
            late <= early * 2 + 50,
            "{k} kept growing: first half peak {early}, second half {late}"
        );
    }
    let last = env.rows(sample_sql).await.remove(0);
    assert_eq!(
        last["deliveries"], 0,
        "every delivery deleted after the traffic: {last}"
    );
    assert_eq!(
        last["messages"], 0,
        "every message deleted after the traffic: {last}"
    );
}
