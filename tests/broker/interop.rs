//! Behaviours the real claudemesh clients rely on (found by reading their
//! source; docs/protocol.md §11): throwaway CLI connections,
//! echo suppression, how refusals are classified, the hook's matching.

use serde_json::json;

use meshbroker::client::HelloOptions;
use meshbroker::config::Dur;

use crate::support::*;

#[actix_web::test]
async fn a_cli_command_connection_is_left_out_of_fan_out() {
    let env = TestEnv::start_with(|c| c.delivery.lease = Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut daemon = env.connect_as(&b, "bob-daemon").await;
    // A `claudemesh send` connection: control-plane with a throwaway session key.
    let throwaway = meshbroker::client::generate_session_key();
    let (mut cli, _) = env
        .connect_opts(
            &b,
            HelloOptions {
                session_pubkey: Some(spub(&throwaway)),
                session_id: Some("cli-1".into()),
                ..Default::default()
            },
        )
        .await;

    let ack = ac.send_message("*", "to all", "now", None).await.must();
    assert_eq!(ack["recipients"], 1, "only bob's daemon: {ack}");
    let push = daemon.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], ack["messageId"]);
    assert_no_push(&mut cli, "the CLI's throwaway connection").await;
}

#[actix_web::test]
async fn sending_to_your_own_session_key_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let (mut session, key) = env.session(&a, "alice-session").await;
    let ack = session
        .send_message(&spub(&key), "echo", "now", None)
        .await
        .must();
    assert_refused(&ack, "invalid");
}

#[actix_web::test]
async fn permanent_refusals_name_themselves_invalid_or_unknown() {
    let env = TestEnv::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    // The claudemesh daemon retries for minutes any refusal whose text
    // lacks these words.
    let permanent = |error: &str| error.contains("invalid") || error.contains("unknown");

    let ack = ac
        .send_message(&"ab".repeat(32), "x", "now", None)
        .await
        .must();
    let error = ack["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("not_found: ") && permanent(error),
        "{ack}"
    );

    let ack = ac
        .send_message(&b.pubkey(), &"x".repeat(2000), "now", None)
        .await
        .must();
    let error = ack["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("payload_too_large: ") && permanent(error),
        "{ack}"
    );

    let mut frame = meshbroker::client::send_frame(&b.pubkey(), "one", "now");
    frame["client_message_id"] = json!("k1");
    frame["request_fingerprint"] = json!("f1");
    assert_eq!(ac.send_frame(frame.clone()).await.must()["queued"], true);
    frame["request_fingerprint"] = json!("f2");
    let ack = ac.send_frame(frame).await.must();
    let error = ack["error"].as_str().unwrap_or_default();
    assert!(
        error.starts_with("idempotency_key_reused: ") && permanent(error),
        "{ack}"
    );
}

#[actix_web::test]
async fn system_events_carry_display_name_as_well_as_name() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let _bs = env.session(&b, "bob-session").await;
    let ev = ac.expect_system("peer_joined", WAIT).await.must();
    assert_eq!(ev["eventData"]["name"], "bob-session", "{ev}");
    assert_eq!(ev["eventData"]["displayName"], "bob-session", "{ev}");
}

#[actix_web::test]
async fn the_hook_falls_back_to_pid_and_cwd_from_loopback() {
    let env = TestEnv::start().await;
    let b = env.member("bob").await;
    let a = env.member("alice").await;
    let mut ac = env.connect(&a).await;
    let key = meshbroker::client::generate_session_key();
    let opts = HelloOptions {
        display_name: Some("bob-session".into()),
        session_id: Some("connected-as".into()),
        cwd: Some("/work/resumed".into()),
        ..Default::default()
    };
    let _bs = env.session_opts(&b, &key, opts).await;
    let hook = format!("{}/hook/set-status", env.http_url);
    // A resumed Claude Code session reports another session_id.
    let body = json!({"session_id": "claude-code-id", "cwd": "/work/resumed", "status": "working"});
    let (code, text) = http_post_json(&hook, &body).await;
    assert_eq!(code, 200, "{text}");
    let peers = ac.list_peers(None).await.must();
    let bob = peers
        .iter()
        .find(|p| p["displayName"] == "bob-session")
        .expect("listed");
    assert_eq!(bob["status"], "working", "{bob}");

    let body = json!({"session_id": "nobody", "cwd": "/nowhere", "status": "idle"});
    let (code, text) = http_post_json(&hook, &body).await;
    assert_eq!(code, 404, "{text}");
}
