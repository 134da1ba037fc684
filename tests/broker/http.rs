//! §6 HTTP next to the WebSocket: health, metrics, the status hook; and the
//! supervised sweeper.

use meshbroker::client::HelloOptions;
use meshbroker::config::{Config, Dur};

use crate::support::*;

#[actix_web::test]
async fn health_reports_the_database_up() {
    let env = TestEnv::start().await;
    let (status, body) = http_get(&format!("{}/health", env.http_url)).await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("JSON {e}: {body}"));
    assert_eq!(v["db"], "up", "{v}");
    let (status, body) = http_get(&format!("{}/health/ready", env.http_url)).await;
    assert_eq!(status, 200, "{body}");
}

#[actix_web::test]
async fn metrics_series_move() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let text = env.metrics().await;
    for name in [
        "meshbroker_connections",
        "meshbroker_messages_accepted_total",
        "meshbroker_deliveries_acked_total",
        "meshbroker_actors",
        "meshbroker_db_pool_connections",
    ] {
        assert!(
            metric_opt(&text, name, &[]).is_some(),
            "{name} missing from /metrics:\n{text}"
        );
    }
    assert_eq!(
        metric(&text, "meshbroker_connections", &[("role", "session")]),
        0.0
    );
    assert_eq!(
        metric(&text, "meshbroker_messages_accepted_total", &[]),
        0.0
    );

    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let (mut bs, bk) = env.session(&b, "bob-session").await;
    let ack = ac
        .send_message(&spub(&bk), "count me", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true);
    let push = bs.expect("push", WAIT).await.must();
    bs.ack(&push).await.must();

    env.wait_metric("meshbroker_deliveries_acked_total", &[], |v| v == 1.0)
        .await;
    let text = env.metrics().await;
    assert_eq!(
        metric(&text, "meshbroker_connections", &[("role", "session")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "meshbroker_connections",
            &[("role", "control-plane")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "meshbroker_messages_accepted_total",
            &[("priority", "now")]
        ),
        1.0,
        "{text}"
    );
    assert!(
        metric(&text, "meshbroker_actors", &[("kind", "drain")]) >= 1.0,
        "{text}"
    );
    assert!(
        metric(&text, "meshbroker_deliveries_pushed_total", &[]) >= 1.0,
        "{text}"
    );
    assert!(
        metric(&text, "meshbroker_db_pool_connections", &[]) >= 1.0,
        "{text}"
    );

    bs.close().await.must();
    env.wait_metric("meshbroker_connections", &[("role", "session")], |v| {
        v == 0.0
    })
    .await;
    // Nothing undelivered: no backlog gauge for the mesh.
    let mesh = a.creds.mesh_id.clone();
    let text = env.metrics().await;
    assert_eq!(
        metric_opt(
            &text,
            "meshbroker_queue_oldest_undelivered_seconds",
            &[("mesh", &mesh)]
        ),
        None,
        "{text}"
    );
    // A message to a member who is away ages in the mesh's gauge.
    let c = env.member("carol").await;
    let ack = ac
        .send_message(&c.pubkey(), "for later", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let text = env.metrics().await;
    let age = metric(
        &text,
        "meshbroker_queue_oldest_undelivered_seconds",
        &[("mesh", &mesh)],
    );
    assert!(age >= 0.2, "oldest undelivered {age} s:\n{text}");
}

#[actix_web::test]
async fn the_status_hook_gates_delivery_by_session_id() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let sid = format!("claude-{}", uuid::Uuid::new_v4());
    let key = meshbroker::client::generate_session_key();
    let opts = HelloOptions {
        display_name: Some("bob-session".into()),
        session_id: Some(sid.clone()),
        pid: Some(4242),
        cwd: Some("/work/bob".into()),
        ..Default::default()
    };
    let (mut bs, _) = env.session_opts(&b, &key, opts).await;

    let hook = format!("{}/hook/set-status", env.http_url);
    let body = json!({"cwd": "/work/bob", "pid": 4242, "status": "working", "session_id": sid});
    let (status, text) = http_post_json(&hook, &body).await;
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["presence_id"].is_string(), "{v}");

    let held = ac
        .send_message(&spub(&key), "wait", "next", None)
        .await
        .must();
    let urgent = ac
        .send_message(&spub(&key), "urgent", "now", None)
        .await
        .must();
    let push = bs.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], urgent["messageId"], "{push}");
    bs.ack(&push).await.must();
    assert_no_push(&mut bs, "a working session").await;

    let body = json!({"cwd": "/work/bob", "pid": 4242, "status": "idle", "session_id": sid});
    let (status, text) = http_post_json(&hook, &body).await;
    assert_eq!(status, 200, "{text}");
    let push = bs.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], held["messageId"], "{push}");

    let body = json!({"status": "idle", "session_id": "no-such-session"});
    let (_, text) = http_post_json(&hook, &body).await;
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ok"], false, "unknown session: {v}");
    assert!(v["error"].is_string(), "{v}");
}

#[actix_web::test]
async fn the_status_hook_refuses_oversized_bodies() {
    let env = TestEnv::start().await;
    let hook = format!("{}/hook/set-status", env.http_url);
    let big = json!({"status": "idle", "session_id": "x", "cwd": "y".repeat(env.config.limits.max_message_bytes + 10)});
    let (status, _) = http_post_raw(&hook, "application/json", big.to_string()).await;
    assert_eq!(status, 413);
}

#[actix_web::test]
async fn the_sweeper_is_restarted_after_a_failure_and_still_redelivers() {
    let env = TestEnv::start().await; // lease 1s, sweeper 200ms
    let before = metric(
        &env.metrics().await,
        "meshbroker_actor_restarts_total",
        &[("kind", "sweeper")],
    );
    env.broker().inject_sweeper_failure();
    env.wait_metric(
        "meshbroker_actor_restarts_total",
        &[("kind", "sweeper")],
        |v| v >= before + 1.0,
    )
    .await;

    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    ac.send_message(&b.pubkey(), "still swept", "now", None)
        .await
        .must();
    assert_eq!(bc.expect("push", WAIT).await.must()["attempt"], 1);
    let again = bc.expect("push", WAIT).await.must();
    assert_eq!(
        again["attempt"], 2,
        "the restarted sweeper expired the lease: {again}"
    );
    env.wait_metric("meshbroker_leases_expired_total", &[], |v| v >= 1.0)
        .await;
}

#[actix_web::test]
async fn the_status_hook_matches_pid_and_cwd_from_loopback_and_never_changes_dnd() {
    let env = TestEnv::start().await;
    let b = env.member("bob").await;
    let a = env.member("alice").await;
    let mut ac = env.connect(&a).await;
    let key = meshbroker::client::generate_session_key();
    let opts = HelloOptions {
        display_name: Some("bob-session".into()),
        pid: Some(777),
        cwd: Some("/work/pidcwd".into()),
        ..Default::default()
    };
    let (mut bs, _) = env.session_opts(&b, &key, opts).await;
    let hook = format!("{}/hook/set-status", env.http_url);
    let status_of = |peers: &[serde_json::Value]| {
        peers
            .iter()
            .find(|p| p["displayName"] == "bob-session")
            .expect("listed")["status"]
            .clone()
    };

    let body = json!({"cwd": "/work/pidcwd", "pid": 777, "status": "working"});
    let (code, text) = http_post_json(&hook, &body).await;
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("\"ok\":true"), "{text}");
    assert_eq!(status_of(&ac.list_peers(None).await.must()), "working");

    bs.set_status("dnd").await.must();
    bs.list_peers(None).await.must();
    let body = json!({"cwd": "/work/pidcwd", "pid": 777, "status": "idle"});
    http_post_json(&hook, &body).await;
    assert_eq!(
        status_of(&ac.list_peers(None).await.must()),
        "dnd",
        "a hook never changes dnd"
    );
}

#[actix_web::test]
async fn ready_is_503_while_migrations_are_missing() {
    use diesel_async::RunQueryDsl;
    let env = TestEnv::start().await;
    let mut conn = env.pool.get().await.expect("db conn");
    diesel::sql_query("DELETE FROM __diesel_schema_migrations")
        .execute(&mut *conn)
        .await
        .expect("forget the migrations");
    let (status, body) = http_get(&format!("{}/health/ready", env.http_url)).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("migrations missing"), "{body}");
    let (status, body) = http_get(&format!("{}/health", env.http_url)).await;
    assert_eq!(status, 200, "{body}");
}

/// A session the hook can find by pid and cwd only (from a loopback client).
async fn session_found_by_process(
    env: &TestEnv,
    pid: i64,
    cwd: &str,
) -> meshbroker::client::Connection {
    let b = env.member("bob").await;
    let key = meshbroker::client::generate_session_key();
    let opts = HelloOptions {
        display_name: Some("bob-session".into()),
        pid: Some(pid),
        cwd: Some(cwd.into()),
        ..Default::default()
    };
    env.session_opts(&b, &key, opts).await.0
}

fn trust_loopback_proxy(c: &mut Config) {
    c.server.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
}

/// A proxy on loopback forwards for a remote client: the hook must not
/// take the proxy's loopback address for the client's, or anyone behind
/// the proxy could set any session's status by pid/cwd.
#[actix_web::test]
async fn behind_a_trusted_proxy_the_hook_sees_the_forwarded_client() {
    let env = TestEnv::start_with(trust_loopback_proxy).await;
    let _bs = session_found_by_process(&env, 4343, "/work/proxied").await;
    let hook = format!("{}/hook/set-status", env.http_url);
    let body = json!({"pid": 4343, "cwd": "/work/proxied", "status": "working"});

    let remote = [("x-forwarded-for", "203.0.113.7")];
    let (code, text) = http_post_json_with(&hook, &remote, &body).await;
    assert_eq!(code, 403, "a remote client behind the proxy: {text}");
    assert!(text.contains("forbidden"), "{text}");

    // A client the proxy names as loopback is one, and the proxy's own
    // requests (no header) are its own address's.
    let local = [("x-forwarded-for", "::1")];
    let (code, text) = http_post_json_with(&hook, &local, &body).await;
    assert_eq!(code, 200, "a loopback client behind the proxy: {text}");
    let (code, text) = http_post_json(&hook, &body).await;
    assert_eq!(code, 200, "the proxy itself: {text}");
}

/// Without trusted proxies a client cannot claim another address.
#[actix_web::test]
async fn without_trusted_proxies_x_forwarded_for_is_ignored() {
    let env = TestEnv::start().await;
    assert!(env.config.server.trusted_proxies.is_empty());
    let _bs = session_found_by_process(&env, 4344, "/work/unproxied").await;
    let hook = format!("{}/hook/set-status", env.http_url);
    let body = json!({"pid": 4344, "cwd": "/work/unproxied", "status": "working"});
    let spoofed = [("x-forwarded-for", "203.0.113.7")];
    let (code, text) = http_post_json_with(&hook, &spoofed, &body).await;
    assert_eq!(
        code, 200,
        "the loopback peer counts, not the header: {text}"
    );
    assert!(text.contains("\"updated\":1"), "{text}");
}

/// The hook's per-source rate limit keys on the forwarded client: one
/// client behind the proxy spending its budget leaves the others theirs.
#[actix_web::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_hook_budget() {
    let env = TestEnv::start_with(trust_loopback_proxy).await;
    let hook = format!("{}/hook/set-status", env.http_url);
    // Refused before the database: cheap to send many of.
    let body = json!({});
    let first = [("x-forwarded-for", "198.51.100.1")];
    let mut limited = false;
    for _ in 0..500 {
        let (code, _) = http_post_json_with(&hook, &first, &body).await;
        if code == 429 {
            limited = true;
            break;
        }
        assert_eq!(code, 400);
    }
    assert!(limited, "the first client was never rate limited");
    let second = [("x-forwarded-for", "198.51.100.2")];
    let (code, text) = http_post_json_with(&hook, &second, &body).await;
    assert_eq!(code, 400, "another client keeps its own budget: {text}");
    let (code, text) = http_post_json(&hook, &body).await;
    assert_eq!(code, 400, "and so does the proxy itself: {text}");
}
