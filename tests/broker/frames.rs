//! §1 transport and frame errors, §3 send refusals.

use meshbroker::client::{self, send_frame, Connection};

use crate::support::*;

#[actix_web::test]
async fn malformed_frames_get_malformed_and_the_connection_stays_open() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut conn = env.connect(&a).await;
    for text in ["this is not json", "{}", r#"{"type":5}"#, "[1,2]"] {
        conn.send_text(text).await.must();
        let err = conn.expect("error", WAIT).await.must();
        assert_eq!(err["code"], "malformed", "answer to {text:?}: {err}");
        assert!(err["message"].is_string(), "{err}");
    }
    conn.list_peers(None).await.must();
    assert!(!conn.is_closed());
}

#[actix_web::test]
async fn unknown_type_is_unsupported_with_req_id_echoed() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut conn = env.connect(&a).await;
    conn.send_json(&json!({"type": "warp_drive", "_reqId": "q-42"}))
        .await
        .must();
    let err = conn.expect("error", WAIT).await.must();
    assert_eq!(err["code"], "unsupported", "{err}");
    assert_ne!(err["code"], "unknown_message_type");
    assert_eq!(err["_reqId"], "q-42", "{err}");
    conn.list_peers(None).await.must();
}

/// docs/protocol.md §1: an unknown frame without `_reqId` (the claudemesh
/// CLI sends `set_stats`, `set_profile`, `set_state`, `forget`) is dropped
/// unanswered and counted: an id-less `error` would resolve the CLI's
/// oldest pending request with an empty result.
#[actix_web::test]
async fn unknown_type_without_req_id_is_ignored_and_counted() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut conn = env.connect(&a).await;
    for ty in ["set_stats", "set_profile", "set_state", "forget"] {
        conn.send_json(&json!({"type": ty, "stats": {"x": 1}}))
            .await
            .must();
    }
    // A request in flight gets its own answer, not an error.
    let peers = conn.list_peers(None).await.must();
    assert_eq!(peers.len(), 1, "{peers:?}");
    let frames = conn.drain_for(QUIET).await.must();
    assert!(
        frames.iter().all(|f| f["type"] != "error"),
        "ignored frames were answered: {frames:?}"
    );
    env.wait_metric(
        "meshbroker_frames_rejected_total",
        &[("reason", "ignored")],
        |v| v == 4.0,
    )
    .await;
}

#[actix_web::test]
async fn frames_before_hello_get_no_hello() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut conn = Connection::connect(&env.ws_url).await.must();
    conn.send_json(&json!({"type": "list_peers", "_reqId": "r1"}))
        .await
        .must();
    let err = conn.expect("error", WAIT).await.must();
    assert_eq!(err["code"], "no_hello", "{err}");
    assert_eq!(err["message"], "must send hello first", "{err}");
    conn.send_json(&send_frame(&a.pubkey(), "x", "now"))
        .await
        .must();
    let err = conn.expect("error", WAIT).await.must();
    assert_eq!(err["code"], "no_hello", "{err}");
    // A hello still works afterwards.
    let frame = client::hello_frame(&a.creds, &Default::default(), client::now_ms());
    conn.send_json(&frame).await.must();
    conn.expect("hello_ack", WAIT).await.must();
}

#[actix_web::test]
async fn a_frame_over_the_frame_limit_closes_1009() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut conn = env.connect(&a).await;
    let big = "x".repeat(env.config.limits.max_frame_bytes + 1024);
    let mut frame = send_frame(&a.pubkey(), &big, "now");
    frame["id"] = json!("big");
    conn.send_json(&frame).await.must();
    let (code, reason) = conn.expect_close(WAIT).await.must();
    assert_eq!(code, Some(1009), "close reason {reason:?}");
}

#[actix_web::test]
async fn an_oversized_message_is_refused_by_its_ack_and_the_connection_stays_open() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut conn = env.connect(&a).await;
    let big = "x".repeat(env.config.limits.max_message_bytes + 1);
    let mut frame = send_frame(&b.pubkey(), &big, "now");
    frame["id"] = json!("too-big");
    let ack = conn.send_frame(frame).await.must();
    assert_eq!(ack["id"], "too-big", "{ack}");
    assert_eq!(ack["queued"], false, "{ack}");
    assert_eq!(ack["messageId"], "", "{ack}");
    let error = ack["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("payload_too_large: "), "{ack}");
    let ack = conn
        .send_message(&b.pubkey(), "small", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
}

#[actix_web::test]
async fn permessage_deflate_is_not_negotiated() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut conn = Connection::connect_with_headers(
        &env.ws_url,
        &[(
            "Sec-WebSocket-Extensions",
            "permessage-deflate; client_max_window_bits",
        )],
    )
    .await
    .must();
    let ext = conn
        .response_header("sec-websocket-extensions")
        .unwrap_or("");
    assert!(
        !ext.contains("permessage-deflate"),
        "101 response offered {ext:?}"
    );
    let frame = client::hello_frame(&a.creds, &Default::default(), client::now_ms());
    conn.send_json(&frame).await.must();
    conn.expect("hello_ack", WAIT).await.must();
}

#[actix_web::test]
async fn other_paths_are_404_without_upgrade() {
    let env = TestEnv::start().await;
    let (status, _) = http_get(&format!("{}/nope", env.http_url)).await;
    assert_eq!(status, 404);
    // A WebSocket upgrade request on another path is refused with 404.
    let res = awc::Client::new()
        .get(format!("{}/other", env.http_url))
        .insert_header(("Connection", "Upgrade"))
        .insert_header(("Upgrade", "websocket"))
        .insert_header(("Sec-WebSocket-Version", "13"))
        .insert_header(("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="))
        .send()
        .await
        .expect("upgrade request answered");
    assert_eq!(res.status().as_u16(), 404);
    Connection::connect(&format!("{}/other", env.ws_url.trim_end_matches("/ws")))
        .await
        .expect_err("no upgrade on /other");
    let (status, _) = http_post_json(&format!("{}/join", env.http_url), &json!({})).await;
    assert_eq!(status, 404, "POST /join is not supported");
}

#[actix_web::test]
async fn invalid_targets_are_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut conn = env.connect(&a).await;

    let ack = conn
        .send_message(&a.pubkey(), "echo", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], false, "to own member: {ack}");
    assert_refused(&ack, "invalid");

    let ack = conn
        .send_message("#general", "topic", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], false, "#topic: {ack}");
    assert_refused(&ack, "invalid");

    let nobody = spub(&client::generate_session_key());
    let ack = conn.send_message(&nobody, "void", "now", None).await.must();
    assert_eq!(ack["queued"], false, "unknown key: {ack}");
    assert_refused(&ack, "not_found");

    // An invalid send frame still gets an ack echoing its id.
    conn.send_json(&json!({"type": "send", "id": "broken"}))
        .await
        .must();
    let ack = conn
        .expect_where("ack of the broken send", WAIT, |f| f["id"] == "broken")
        .await
        .must();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["queued"], false, "{ack}");
}

#[actix_web::test]
async fn sends_past_the_rate_limit_are_refused() {
    let env = TestEnv::start_with(|c| {
        c.limits.send_burst = 3;
        c.limits.send_per_sec = 1;
    })
    .await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut conn = env.connect(&a).await;
    let mut refused = None;
    for i in 0..6 {
        let ack = conn
            .send_message(&b.pubkey(), &format!("m{i}"), "now", None)
            .await
            .must();
        if ack["queued"] == false {
            refused = Some(ack);
            break;
        }
    }
    let ack = refused.expect("a send past the burst is refused");
    assert_refused(&ack, "rate_limit");
}
