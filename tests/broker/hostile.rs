//! Hostile input over a real socket: the refusals of docs/protocol.md §1–2 not
//! covered in `handshake.rs` / `frames.rs`, text bounds, group names that
//! look like SQL or LIKE patterns, a stream of garbage frames, the limits
//! (each refused cleanly and counted in /metrics), and secrets kept out of
//! `print-config` and the broker's output.
//!
//! Every refusal of docs/protocol.md §1–2 and the test that exercises it:
//!
//! | refusal | tests |
//! |---|---|
//! | other path → 404 | `frames::other_paths_are_404_without_upgrade` |
//! | frame over the limit → 1009 | `frames::a_frame_over_the_frame_limit_closes_1009`, `a_frame_over_the_limit_closes_1009_before_or_after_hello_and_is_counted` |
//! | permessage-deflate never negotiated | `frames::permessage_deflate_is_not_negotiated` |
//! | silent connection closed | `presence::a_silent_connection_is_closed_by_the_keepalive` |
//! | not JSON / no `type` → `malformed` | `frames::malformed_frames_get_malformed_and_the_connection_stays_open`, `a_stream_of_garbage_frames_…` |
//! | binary frame → `malformed` | `binary_frames_get_malformed_before_and_after_hello_and_are_counted` |
//! | unknown type → `unsupported` + `_reqId` | `frames::unknown_type_is_unsupported_with_req_id_echoed`, `a_stream_of_garbage_frames_…` |
//! | frame before hello → `no_hello` | `frames::frames_before_hello_get_no_hello` |
//! | no hello at all → `hello_timeout` | `a_connection_without_hello_is_closed_after_the_hello_timeout` |
//! | 1. `bad_session_pubkey` | `handshake::hello_with_bad_session_pubkey_is_refused`, `session_hello_refusals_of_its_own` |
//! | 2. `timestamp_skew` | `handshake::hello_outside_skew_is_refused`, `session_hello_refusals_of_its_own`, `hostile_timestamps_are_skew_and_the_broker_stays_up` |
//! | 3. `malformed` | `handshake::hello_with_malformed_key_or_signature_is_malformed`, `session_hello_refusals_of_its_own`, `hellos_with_wrong_types_or_missing_fields_are_malformed` |
//! | 4. `bad_signature` | `handshake::hello_with_bad_signature_is_refused`, `handshake::session_hello_signed_by_the_wrong_key_is_refused`, `session_hello_refusals_of_its_own` (tampered attestation) |
//! | 5. `replayed` | `handshake::replayed_hello_is_refused`, `session_hello_refusals_of_its_own` |
//! | 6. `revoked` 4002 | `handshake::hello_of_revoked_member_closes_4002`, `handshake::session_hello_of_revoked_or_unknown_parent_is_refused` |
//! | 6. `unauthorized` | `handshake::hello_of_unknown_key_is_unauthorized`, `isolation::a_member_of_one_mesh_cannot_hello_into_another`, `a_hello_naming_a_malformed_mesh_id_is_unauthorized` |
//! | 7. `unauthorized` (memberId) | `handshake::hello_with_another_members_id_is_unauthorized` |
//! | 8. `capacity` | `handshake::mesh_connection_capacity_is_enforced`, `the_mesh_connection_cap_is_refused_counted_and_spares_the_live_ones` |
//! | `invalid` (bounds, U+0000) | `hello_text_over_its_bound_is_refused_invalid`, `nul_characters_are_refused_invalid_not_unavailable` |
//! | a second hello on one connection → `invalid` | `a_second_hello_on_one_connection_is_invalid_and_changes_nothing` |
//! | `session_replaced` 1000 | `handshake::second_hello_with_same_session_id_replaces_the_first_but_never_a_session`, `handshake::second_session_hello_with_same_session_key_replaces_the_first` |
//! | `expired` | `handshake::session_hello_with_expired_attestation_is_refused`, `hostile_timestamps_are_skew_and_the_broker_stays_up` |
//! | `ttl_too_long` | `handshake::session_hello_with_attestation_over_24h_is_refused`, `hostile_timestamps_are_skew_and_the_broker_stays_up` |
//! | `attestation_mismatch` | `handshake::session_hello_with_attestation_for_another_key_is_refused` |
//! | `parent_member_id_mismatch` | `handshake::session_hello_with_wrong_parent_member_id_is_refused` |

use std::time::Duration;

use meshbroker::client::{
    self, hello_frame, now_ms, send_frame, session_hello_frame, Connection, HelloOptions,
};
use meshbroker::crypto;
use meshbroker::protocol::bounds;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::TestRunner;
use serde_json::Value;

use crate::support::*;

fn named(name: &str) -> HelloOptions {
    HelloOptions {
        display_name: Some(name.into()),
        ..Default::default()
    }
}

/// A session_hello by `sk` for `m`, attested for the next hour, at `now`.
fn hour_session(m: &Member, sk: &ed25519_dalek::SigningKey, now: i64) -> Value {
    session_hello_frame(&m.creds, sk, now + 3_600_000, &HelloOptions::default(), now)
}

/// Sends `frame` on an open connection and returns the error frame it gets.
async fn error_for(conn: &mut Connection, frame: &Value) -> Value {
    conn.send_json(frame).await.must();
    let err = conn.expect("error", WAIT).await.must();
    assert!(!conn.is_closed(), "closed after {frame}");
    err
}

#[actix_web::test]
async fn binary_frames_get_malformed_before_and_after_hello_and_are_counted() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut conn = Connection::connect(&env.ws_url).await.must();
    conn.send_binary(br#"{"type":"list_peers"}"#.to_vec())
        .await
        .must();
    let err = conn.expect("error", WAIT).await.must();
    assert_eq!(err["code"], "malformed", "{err}");
    // Still open, and a hello still works.
    conn.send_json(&hello_frame(&a.creds, &HelloOptions::default(), now_ms()))
        .await
        .must();
    conn.expect("hello_ack", WAIT).await.must();
    conn.send_binary(vec![0, 159, 146, 150, 255]).await.must();
    let err = conn.expect("error", WAIT).await.must();
    assert_eq!(err["code"], "malformed", "{err}");
    conn.list_peers(None).await.must();
    env.wait_metric(
        "meshbroker_frames_rejected_total",
        &[("reason", "malformed")],
        |v| v == 2.0,
    )
    .await;
}

#[actix_web::test]
async fn a_frame_over_the_limit_closes_1009_before_or_after_hello_and_is_counted() {
    let env = TestEnv::start_with(|c| {
        c.limits.max_message_bytes = 1024;
        c.limits.max_frame_bytes = 4096;
    })
    .await;
    let a = env.member("alice").await;
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(5000));

    let mut raw = Connection::connect(&env.ws_url).await.must();
    raw.send_text(&big).await.must();
    let (code, _) = raw.expect_close(WAIT).await.must();
    assert_eq!(code, Some(1009));

    let mut conn = env.connect(&a).await;
    env.wait_metric(
        "meshbroker_connections",
        &[("role", "control-plane")],
        |v| v == 1.0,
    )
    .await;
    conn.send_text(&big).await.must();
    let (code, _) = conn.expect_close(WAIT).await.must();
    assert_eq!(code, Some(1009));
    env.wait_metric(
        "meshbroker_frames_rejected_total",
        &[("reason", "frame_too_large")],
        |v| v == 2.0,
    )
    .await;
    // The closed connection is gone from the gauge and from the mesh.
    env.wait_metric(
        "meshbroker_connections",
        &[("role", "control-plane")],
        |v| v == 0.0,
    )
    .await;
    let mut again = env.connect(&a).await;
    again.list_peers(None).await.must();
    // A frame exactly at the limit is read (and answered), not closed.
    let fits = format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(4096 - r#"{"type":"ping","pad":""}"#.len())
    );
    assert_eq!(fits.len(), 4096);
    again.send_text(&fits).await.must();
    again.expect("pong", WAIT).await.must();
}

#[actix_web::test]
async fn session_hello_refusals_of_its_own() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    let now = now_ms();

    // 1. sessionPubkey not lowercase hex (session_hello's own key).
    let mut frame = hour_session(&a, &sk, now);
    frame["sessionPubkey"] = json!(spub(&sk).to_uppercase());
    expect_refusal(&env.ws_url, &frame, "bad_session_pubkey", 1008).await;

    // 2. Timestamp outside the skew, in either direction.
    for ts in [now - 120_000, now + 120_000] {
        let frame = hour_session(&a, &sk, ts);
        expect_refusal(&env.ws_url, &frame, "timestamp_skew", 1008).await;
    }

    // 3. Bad hex in the parent key, the signature or the attestation's.
    for (path, value) in [
        (&["parentMemberPubkey"][..], json!("xyz")),
        (&["signature"][..], json!("00")),
        (
            &["parentAttestation", "signature"][..],
            json!("g".repeat(128)),
        ),
    ] {
        let mut frame = hour_session(&a, &sk, now);
        let mut v = &mut frame;
        for p in path {
            v = &mut v[*p];
        }
        *v = value;
        expect_refusal(&env.ws_url, &frame, "malformed", 1008).await;
    }

    // 4. A tampered attestation: a later expiry than the member signed.
    let mut frame = hour_session(&a, &sk, now);
    frame["parentAttestation"]["expiresAt"] = json!(now + 7_200_000);
    expect_refusal(&env.ws_url, &frame, "bad_signature", 1008).await;
    // Attested by a key that is not the parent's (signed by the session).
    let mut frame = hour_session(&a, &sk, now);
    let msg = crypto::attestation_message(&a.pubkey(), &spub(&sk), now + 3_600_000);
    frame["parentAttestation"]["signature"] = json!(crypto::sign_hex(&sk, &msg));
    expect_refusal(&env.ws_url, &frame, "bad_signature", 1008).await;

    // 5. The same signed session_hello from another connection while the
    // first is live.
    let frame = hour_session(&a, &sk, now_ms());
    let (mut first, ack) = client::handshake(&env.ws_url, &frame).await.must();
    assert_eq!(ack["type"], "hello_ack");
    expect_refusal(&env.ws_url, &frame, "replayed", 1008).await;
    first.list_peers(None).await.must();

    let text = env.metrics().await;
    for (reason, n) in [
        ("bad_session_pubkey", 1.0),
        ("timestamp_skew", 2.0),
        ("malformed", 3.0),
        ("bad_signature", 2.0),
        ("replayed", 1.0),
    ] {
        assert_eq!(
            metric(
                &text,
                "meshbroker_connections_rejected_total",
                &[("reason", reason)]
            ),
            n,
            "{reason}:\n{text}"
        );
    }
}

#[actix_web::test]
async fn hostile_timestamps_are_skew_and_the_broker_stays_up() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    // i64::MIN overflowed `now - timestamp` and killed the session actor.
    for ts in [i64::MIN, i64::MIN + 1, i64::MAX, 0, -1] {
        let frame = hello_frame(&a.creds, &HelloOptions::default(), ts);
        expect_refusal(&env.ws_url, &frame, "timestamp_skew", 1008).await;
        let expires = now_ms() + 3_600_000;
        let frame = session_hello_frame(&a.creds, &sk, expires, &HelloOptions::default(), ts);
        expect_refusal(&env.ws_url, &frame, "timestamp_skew", 1008).await;
    }
    for expires in [i64::MAX, i64::MIN] {
        let now = now_ms();
        let frame = session_hello_frame(&a.creds, &sk, expires, &HelloOptions::default(), now);
        let code = if expires > 0 {
            "ttl_too_long"
        } else {
            "expired"
        };
        expect_refusal(&env.ws_url, &frame, code, 1008).await;
    }
    let mut conn = env.connect(&a).await;
    conn.list_peers(None).await.must();
}

#[actix_web::test]
async fn hellos_with_wrong_types_or_missing_fields_are_malformed() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let good = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    let mutations: Vec<(&str, Option<Value>)> = vec![
        ("timestamp", Some(json!("1764240000000"))),
        ("timestamp", Some(json!(1.5e300))),
        ("timestamp", Some(json!(18_446_744_073_709_551_615u64))),
        ("meshId", Some(json!(5))),
        ("pubkey", Some(json!(["a"]))),
        ("signature", None),
        ("memberId", None),
        ("groups", Some(json!(7))),
        ("groups", Some(json!([{"role": "no name"}]))),
        ("pid", Some(json!("123"))),
        ("displayName", Some(json!({"a": 1}))),
    ];
    for (field, value) in mutations {
        let mut frame = good.clone();
        match value {
            Some(v) => frame[field] = v,
            None => {
                frame.as_object_mut().unwrap().remove(field);
            }
        }
        expect_refusal(&env.ws_url, &frame, "malformed", 1008).await;
    }
    // A session_hello without its attestation.
    let sk = client::generate_session_key();
    let mut frame = hour_session(&a, &sk, now_ms());
    frame.as_object_mut().unwrap().remove("parentAttestation");
    expect_refusal(&env.ws_url, &frame, "malformed", 1008).await;
}

#[actix_web::test]
async fn a_second_hello_on_one_connection_is_invalid_and_changes_nothing() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let (mut conn, ack) = env.connect_opts(&a, named("alice")).await;
    // Bob's genuine hello, replayed on alice's connection.
    let frame = hello_frame(&b.creds, &named("bob"), now_ms());
    let err = error_for(&mut conn, &frame).await;
    assert_eq!(err["code"], "invalid", "{err}");
    let peers = conn.list_peers(None).await.must();
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["memberPubkey"], a.pubkey().as_str());
    // Bob's hello was never used: it still works on its own connection.
    let (_bob, bob_ack) = client::handshake(&env.ws_url, &frame).await.must();
    assert_eq!(bob_ack["type"], "hello_ack");
    assert_ne!(bob_ack["presenceId"], ack["presenceId"]);
}

/// A hello with `field` set to `value` (group fields as one group).
fn hello_with(m: &Member, field: &str, value: Value) -> Value {
    let mut frame = hello_frame(&m.creds, &HelloOptions::default(), now_ms());
    frame[field] = value;
    frame
}

#[actix_web::test]
async fn hello_text_over_its_bound_is_refused_invalid() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let over = |n: usize| json!("x".repeat(n + 1));
    let cases = [
        ("displayName", over(bounds::DISPLAY_NAME)),
        ("sessionId", over(bounds::SESSION_ID)),
        ("cwd", over(bounds::CWD)),
        ("hostname", over(bounds::SHORT_FIELD)),
        ("peerType", over(bounds::SHORT_FIELD)),
        ("channel", over(bounds::SHORT_FIELD)),
        ("model", over(bounds::SHORT_FIELD)),
        (
            "groups",
            json!([{"name": "x".repeat(bounds::GROUP_NAME + 1)}]),
        ),
        (
            "groups",
            json!([{"name": "g", "role": "r".repeat(bounds::SHORT_FIELD + 1)}]),
        ),
        (
            "groups",
            json!((0..=bounds::GROUPS)
                .map(|i| format!("g{i}"))
                .collect::<Vec<_>>()),
        ),
        ("groups", json!([""])),
        // Far over: a megabyte-class field inside the frame limit.
        ("displayName", json!("y".repeat(200_000))),
    ];
    for (field, value) in cases {
        let frame = hello_with(&a, field, value);
        expect_refusal(&env.ws_url, &frame, "invalid", 1008).await;
    }
    // The same on a session_hello.
    let sk = client::generate_session_key();
    let mut frame = hour_session(&a, &sk, now_ms());
    frame["cwd"] = over(bounds::CWD);
    expect_refusal(&env.ws_url, &frame, "invalid", 1008).await;

    // Every field exactly at its bound is accepted and stored whole.
    let mut frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    let at = |n: usize, c: &str| json!(c.repeat(n));
    for (field, value) in [
        ("displayName", at(bounds::DISPLAY_NAME, "d")),
        ("sessionId", at(bounds::SESSION_ID, "s")),
        ("cwd", at(bounds::CWD, "c")),
        ("hostname", at(bounds::SHORT_FIELD, "h")),
        ("peerType", at(bounds::SHORT_FIELD, "p")),
        ("channel", at(bounds::SHORT_FIELD, "c")),
        ("model", at(bounds::SHORT_FIELD, "m")),
    ] {
        frame[field] = value;
    }
    frame["groups"] = json!((0..bounds::GROUPS)
        .map(
            |i| json!({"name": format!("{i:0>width$}", width = bounds::GROUP_NAME),
                        "role": "r".repeat(bounds::SHORT_FIELD)})
        )
        .collect::<Vec<_>>());
    let (mut conn, _) = client::handshake(&env.ws_url, &frame).await.must();
    let peers = conn.list_peers(None).await.must();
    assert_eq!(peers[0]["cwd"], "c".repeat(bounds::CWD));
    assert_eq!(
        peers[0]["groups"].as_array().map(Vec::len),
        Some(bounds::GROUPS)
    );
    let text = env.metrics().await;
    assert_eq!(
        metric(
            &text,
            "meshbroker_connections_rejected_total",
            &[("reason", "invalid")]
        ),
        13.0,
        "{text}"
    );
}

#[actix_web::test]
async fn text_over_its_bound_after_hello_is_refused_invalid_and_the_connection_stays_open() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut conn = env.connect(&a).await;
    let mut bc = env.connect(&b).await;

    let send_with = |field: &str, value: Value| {
        let mut f = send_frame(&b.pubkey(), "x", "now");
        f[field] = value;
        f
    };
    let long = |n: usize| json!("x".repeat(n + 1));
    for (field, value) in [
        (
            "targetSpec",
            json!(format!("@{}", "g".repeat(bounds::TARGET_SPEC))),
        ),
        ("client_message_id", long(bounds::CLIENT_ID)),
        ("request_fingerprint", long(bounds::CLIENT_ID)),
        ("replyToId", long(bounds::CLIENT_ID)),
        ("mentions", json!(["m".repeat(bounds::MENTIONS)])),
    ] {
        let ack = conn.send_frame(send_with(field, value)).await.must();
        assert_refused(&ack, "invalid");
        assert!(
            ack["error"].as_str().unwrap().contains(field),
            "names {field}: {ack}"
        );
    }
    // At the bound it is accepted and relayed whole.
    let mut at = send_with("client_message_id", json!("k".repeat(bounds::CLIENT_ID)));
    at["replyToId"] = json!("r".repeat(bounds::CLIENT_ID));
    at["mentions"] = json!(["m".repeat(bounds::MENTIONS - 6)]);
    let ack = conn.send_frame(at).await.must();
    assert_eq!(ack["queued"], true, "{ack}");
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["replyToId"], "r".repeat(bounds::CLIENT_ID));

    let frames = [
        json!({"type": "set_summary", "summary": "s".repeat(bounds::SUMMARY + 1)}),
        json!({"type": "join_group", "name": "g".repeat(bounds::GROUP_NAME + 1)}),
        json!({"type": "join_group", "name": ""}),
        json!({"type": "join_group", "name": "g", "role": "r".repeat(bounds::SHORT_FIELD + 1)}),
        json!({"type": "nack", "brokerMessageId": push["messageId"], "delay": "3650d"}),
        json!({"type": "nack", "brokerMessageId": push["messageId"], "delay": "18446744073709551615ms"}),
        json!({"type": "set_status", "status": "idle'; DROP TABLE mesh.presence; --"}),
    ];
    for frame in &frames {
        let err = error_for(&mut conn, frame).await;
        assert_eq!(err["code"], "invalid", "{frame}: {err}");
    }
    for i in 0..bounds::GROUPS {
        conn.send_json(&json!({"type": "join_group", "name": format!("g{i}")}))
            .await
            .must();
    }
    let err = error_for(
        &mut conn,
        &json!({"type": "join_group", "name": "one-too-many"}),
    )
    .await;
    assert_eq!(err["code"], "invalid", "{err}");
    // Nothing of the refused frames was stored.
    let peers = conn.list_peers(None).await.must();
    let me = peers
        .iter()
        .find(|p| p["memberPubkey"] == a.pubkey().as_str())
        .unwrap();
    assert_eq!(me["status"], "idle", "{me}");
    assert!(me["summary"].is_null(), "{me}");
    assert_eq!(me["groups"].as_array().map(Vec::len), Some(bounds::GROUPS));
    env.wait_metric(
        "meshbroker_frames_rejected_total",
        &[("reason", "invalid")],
        |v| v == frames.len() as f64 + 1.0,
    )
    .await;
    let text = env.metrics().await;
    assert_eq!(
        metric(
            &text,
            "meshbroker_messages_rejected_total",
            &[("reason", "invalid")]
        ),
        5.0,
        "{text}"
    );
}

#[actix_web::test]
async fn nul_characters_are_refused_invalid_not_unavailable() {
    // PostgreSQL text cannot hold U+0000: before the check, each of these
    // failed in the database and was answered `unavailable`, which the
    // claudemesh daemon retries for minutes.
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    for (field, value) in [
        ("displayName", json!("a\u{0}b")),
        ("sessionId", json!("\u{0}")),
        ("cwd", json!("/tmp/\u{0}")),
        ("groups", json!(["g\u{0}"])),
        ("groups", json!([{"name": "g", "role": "\u{0}"}])),
    ] {
        expect_refusal(&env.ws_url, &hello_with(&a, field, value), "invalid", 1008).await;
    }
    let mut conn = env.connect(&a).await;
    for (field, value) in [
        ("ciphertext", json!("c\u{0}")),
        ("nonce", json!("\u{0}")),
        ("targetSpec", json!("@g\u{0}")),
        ("client_message_id", json!("k\u{0}")),
        ("mentions", json!({"\u{0}": 1})),
        ("mentions", json!([["deep", "\u{0}"]])),
    ] {
        let mut frame = send_frame(&b.pubkey(), "x", "now");
        frame[field] = value;
        let ack = conn.send_frame(frame).await.must();
        assert_refused(&ack, "invalid");
    }
    for frame in [
        json!({"type": "set_summary", "summary": "\u{0}"}),
        json!({"type": "join_group", "name": "\u{0}"}),
    ] {
        let err = error_for(&mut conn, &frame).await;
        assert_eq!(err["code"], "invalid", "{frame}: {err}");
    }
    let hook = format!("{}/hook/set-status", env.http_url);
    let (code, body) =
        http_post_json(&hook, &json!({"session_id": "s\u{0}", "status": "idle"})).await;
    assert_eq!(code, 400, "{body}");
    let text = env.metrics().await;
    assert_eq!(
        metric(
            &text,
            "meshbroker_messages_rejected_total",
            &[("reason", "unavailable")]
        ),
        0.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "meshbroker_connections_rejected_total",
            &[("reason", "unavailable")]
        ),
        0.0,
        "{text}"
    );
    let ack = conn
        .send_message(&b.pubkey(), "still fine", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
}

#[actix_web::test]
async fn group_names_and_targets_are_data_never_sql_or_like_patterns() {
    let env = TestEnv::start_with(|c| c.delivery.lease = meshbroker::config::Dur::secs(30)).await;
    let sender = env.member("sender").await;
    let mut sc = env.connect(&sender).await;
    let groups = [
        "abc",
        "a%",
        "a_c",
        "'; DROP TABLE mesh.message; --",
        r"back\slash",
        "quo\"te's",
        "é/ü",
        "%",
    ];
    let mut conns = Vec::new();
    for (i, g) in groups.iter().enumerate() {
        let m = env.member(&format!("m{i}")).await;
        let opts = HelloOptions {
            display_name: Some(format!("m{i}")),
            groups: vec![(*g).to_owned()],
            ..Default::default()
        };
        let (conn, ack) = env.connect_opts(&m, opts).await;
        assert_eq!(ack["memberProfile"]["groups"][0]["name"], *g, "{ack}");
        conns.push(conn);
    }
    // target → the indexes of `groups` that must receive it.
    let cases: [(&str, &[usize]); 13] = [
        ("@abc", &[0]),
        ("@a%", &[1]),
        ("@a_c", &[2]),
        ("@'; DROP TABLE mesh.message; --", &[3]),
        (r"@back\slash", &[4]),
        ("@quo\"te's", &[5]),
        ("@é", &[6]),
        ("@é/ü", &[6]),
        ("@%", &[7]),
        ("@a", &[]),
        ("@_", &[]),
        ("@ABC", &[]),
        ("@.*", &[]),
    ];
    for (target, want) in cases {
        let ack = sc.send_message(target, target, "now", None).await.must();
        assert_eq!(ack["queued"], true, "{target}: {ack}");
        assert_eq!(ack["recipients"], want.len(), "{target}: {ack}");
        for (i, conn) in conns.iter_mut().enumerate() {
            if want.contains(&i) {
                let push = conn.expect("push", WAIT).await.must();
                assert_eq!(push["ciphertext"], target, "{} got {push}", groups[i]);
                assert_eq!(push["targetSpec"], target);
                conn.ack(&push).await.must();
            }
        }
    }
    for (i, conn) in conns.iter_mut().enumerate() {
        assert_no_push(conn, groups[i]).await;
    }
    // The table the hostile name mentions is still there and holds them all.
    let rows = env.rows("SELECT count(*) AS n FROM mesh.message").await;
    assert_eq!(rows[0]["n"], cases.len(), "{rows:?}");
    // Hostile kick targets and roles filters match nothing.
    let admin = env.admin("root").await;
    let mut rc = env.connect(&admin).await;
    for target in ["%%%%", "____", "m%", "' OR '1'='1"] {
        let ack = rc
            .request(json!({"type": "kick", "target": target}), WAIT)
            .await
            .must();
        assert_eq!(ack["affected"], json!([]), "{target}: {ack}");
    }
    let peers = rc
        .list_peers(Some(&["%", "session' OR '1'='1"]))
        .await
        .must();
    assert!(peers.is_empty(), "{peers:?}");
}

#[actix_web::test]
async fn a_hello_naming_another_members_session_key_is_refused_and_takes_nothing() {
    // A plain hello's sessionPubkey is not proven (nothing signs with it).
    // Named before the key's session proved it, it is accepted but never
    // becomes the key's address; named after, the hello is refused.
    let env = TestEnv::start_with(|c| c.delivery.lease = meshbroker::config::Dur::secs(30)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mallory = env.member("mallory").await;
    let mut ac = env.connect(&a).await;
    let bk = client::generate_session_key();
    let naming_bobs_key = HelloOptions {
        session_pubkey: Some(spub(&bk)),
        ..named("not-bob")
    };
    let (mut thief, _) = env.connect_opts(&mallory, naming_bobs_key.clone()).await;
    let (mut bs, _) = env.session_opts(&b, &bk, named("bob-session")).await;
    let ack = ac
        .send_message(&spub(&bk), "for bob's session", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    let push = bs.expect("push", WAIT).await.must();
    assert_eq!(push["ciphertext"], "for bob's session");
    assert_no_push(&mut thief, "mallory's hello naming bob's session key").await;
    let rows = env
        .rows(&format!(
            "SELECT m.name FROM mesh.message_queue q JOIN mesh.member m ON m.id = q.recipient_member_id \
             WHERE q.message_id = '{}'",
            ack["messageId"].as_str().unwrap()
        ))
        .await;
    assert_eq!(rows, vec![json!({"name": "bob"})]);

    // Now the key is proven: naming it is refused, while bob's session is
    // live and after it closed.
    let frame = hello_frame(&mallory.creds, &naming_bobs_key, now_ms());
    expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
    bs.close().await.must();
    tokio::time::sleep(Duration::from_millis(3)).await;
    let frame = hello_frame(&mallory.creds, &naming_bobs_key, now_ms());
    expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
    // Bob's own member may still name it (its CLI does).
    env.connect_opts(&b, naming_bobs_key.clone()).await;
    // Offline, the key still belongs to bob.
    let ack = ac
        .send_message(&spub(&bk), "later", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    assert_no_push(&mut thief, "mallory, bob offline").await;
}

/// One garbage frame and what it must get: an `error` with this code, or a
/// refused `ack` (an invalid send).
fn garbage() -> impl Strategy<Value = (String, &'static str)> {
    use proptest::prelude::*;
    let not_json = "[^{\\[\"0-9tfn -]{1,40}".prop_map(|s| (s, "malformed"));
    let not_object = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        "[a-z]{0,10}".prop_map(|s| format!("{s:?}")),
        Just("[]".to_owned()),
        Just("null".to_owned()),
        Just(format!("{}{}", "[".repeat(300), "]".repeat(300))),
    ]
    .prop_map(|s| (s, "malformed"));
    let bad_type = prop_oneof![
        Just("{}".to_owned()),
        any::<i64>().prop_map(|n| format!(r#"{{"type":{n}}}"#)),
        Just(r#"{"type":null}"#.to_owned()),
        Just(r#"{"type":["send"]}"#.to_owned()),
    ]
    .prop_map(|s| (s, "malformed"));
    let unknown = "[a-z_]{1,16}"
        .prop_filter("not a frame type", |t| {
            ![
                "hello",
                "session_hello",
                "send",
                "client_ack",
                "nack",
                "in_progress",
                "list_peers",
                "set_status",
                "set_summary",
                "set_visible",
                "join_group",
                "leave_group",
                "kick",
                "disconnect",
                "ping",
            ]
            .contains(&t.as_str())
        })
        .prop_map(|t| (json!({"type": t, "_reqId": "g"}).to_string(), "unsupported"));
    let wrong_fields = prop_oneof![
        Just(json!({"type": "set_status", "status": 5})),
        Just(json!({"type": "set_status", "status": "asleep"})),
        Just(json!({"type": "set_visible", "visible": "no"})),
        Just(json!({"type": "join_group"})),
        Just(json!({"type": "join_group", "name": {"n": 1}})),
        Just(json!({"type": "leave_group", "name": 1e308})),
        Just(json!({"type": "nack"})),
        Just(json!({"type": "nack", "brokerMessageId": "x", "delay": "soon"})),
        Just(json!({"type": "in_progress", "brokerMessageId": []})),
        Just(json!({"type": "list_peers", "roles": "session"})),
        Just(json!({"type": "kick", "all": "yes"})),
        Just(json!({"type": "hello", "meshId": 1})),
        Just(json!({"type": "set_summary", "summary": 42})),
    ]
    .prop_map(|v| (v.to_string(), "invalid"));
    let bad_sends = prop_oneof![
        Just(json!({"type": "send"})),
        Just(json!({"type": "send", "targetSpec": 5})),
        Just(json!({"type": "send", "targetSpec": "*", "priority": "urgent"})),
        Just(json!({"type": "send", "targetSpec": "#topic"})),
        Just(json!({"type": "send", "targetSpec": "nobody"})),
        Just(json!({"type": "send", "targetSpec": "@"})),
        Just(json!({"type": "send", "targetSpec": "*", "nonce": 1})),
    ]
    .prop_map(|v| (v.to_string(), "ack"));
    prop_oneof![
        not_json,
        not_object,
        bad_type,
        unknown,
        wrong_fields,
        bad_sends
    ]
}

#[actix_web::test]
async fn a_stream_of_garbage_frames_gets_one_refusal_each_and_the_broker_stays_healthy() {
    const FRAMES: usize = 300;
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut conn = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    let mut runner = TestRunner::deterministic();
    let strategy = garbage();
    let mut errors = 0.0;
    for i in 0..FRAMES {
        let (text, want) = strategy.new_tree(&mut runner).unwrap().current();
        conn.send_text(&text).await.must();
        let reply = conn
            .expect_where("a refusal", WAIT, |f| {
                f["type"] == "error" || f["type"] == "ack"
            })
            .await
            .unwrap_or_else(|e| panic!("frame {i} {text:.200}: {e:#}"));
        if want == "ack" {
            assert_eq!(reply["type"], "ack", "{text:.200}: {reply}");
            assert_eq!(reply["queued"], false, "{text:.200}: {reply}");
        } else {
            errors += 1.0;
            assert_eq!(reply["type"], "error", "{text:.200}: {reply}");
            assert_eq!(reply["code"], want, "{text:.200}: {reply}");
        }
    }
    assert!(!conn.is_closed());
    env.wait_metric("meshbroker_frames_rejected_total", &[], |v| v == errors)
        .await;
    let (status, body) = http_get(&format!("{}/health", env.http_url)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""db":"up""#), "{body}");
    // The same connection still sends and receives.
    let ack = conn
        .send_message(&b.pubkey(), "after the garbage", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["ciphertext"], "after the garbage");
}

#[actix_web::test]
async fn the_send_rate_is_per_member_refused_counted_and_the_connection_stays_usable() {
    let env = TestEnv::start_with(|c| {
        c.limits.send_burst = 3;
        c.limits.send_per_sec = 1;
        c.delivery.lease = meshbroker::config::Dur::secs(30);
    })
    .await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut a1 = env.connect(&a).await;
    let (mut a2, _) = env.session(&a, "alice-session").await;
    let mut bc = env.connect(&b).await;
    // Pipelined on two connections at once: the bucket is the member's,
    // not the socket's.
    const SENT: usize = 10;
    for i in 0..SENT {
        let conn = if i % 2 == 0 { &mut a1 } else { &mut a2 };
        let mut frame = send_frame(&b.pubkey(), &format!("m{i}"), "now");
        frame["id"] = json!(format!("m{i}"));
        conn.send_json(&frame).await.must();
    }
    let mut queued = 0usize;
    let mut refused = 0u32;
    for i in 0..SENT {
        let conn = if i % 2 == 0 { &mut a1 } else { &mut a2 };
        let id = format!("m{i}");
        let ack = conn
            .expect_where("the ack", WAIT, |f| {
                f["type"] == "ack" && f["id"] == id.as_str()
            })
            .await
            .must();
        if ack["queued"] == true {
            queued += 1;
        } else {
            assert_refused(&ack, "rate_limit");
            refused += 1;
        }
    }
    // The burst of 3, and at most what refilled meanwhile (1/s).
    assert!((3..=5).contains(&queued), "queued {queued}");
    assert_eq!(queued + refused as usize, SENT);
    env.wait_metric(
        "meshbroker_messages_rejected_total",
        &[("reason", "rate_limit")],
        |v| v == f64::from(refused),
    )
    .await;
    // Another member is not limited by alice's bucket.
    let ack = bc
        .send_message(&a.pubkey(), "bob's own", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    // Alice's connections are open and answer; only what was queued arrives.
    a1.list_peers(None).await.must();
    a2.list_peers(None).await.must();
    let pushes = pushes_within(&mut bc, Duration::from_millis(800)).await;
    assert_eq!(pushes.len(), queued, "{pushes:?}");
    // The bucket refills.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ack = a1
        .send_message(&b.pubkey(), "refilled", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
}

#[actix_web::test]
async fn the_mesh_connection_cap_is_refused_counted_and_spares_the_live_ones() {
    let env = TestEnv::start_with(|c| c.limits.max_connections_per_mesh = 2).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut c1 = env.connect(&a).await;
    let (c2, _) = env.session(&b, "bob-session").await;
    let frame = hello_frame(&b.creds, &HelloOptions::default(), now_ms());
    expect_refusal(&env.ws_url, &frame, "capacity", 1008).await;
    let sk = client::generate_session_key();
    expect_refusal(
        &env.ws_url,
        &hour_session(&a, &sk, now_ms()),
        "capacity",
        1008,
    )
    .await;
    let text = env.metrics().await;
    assert_eq!(
        metric(
            &text,
            "meshbroker_connections_rejected_total",
            &[("reason", "capacity")]
        ),
        2.0,
        "{text}"
    );
    assert_eq!(metric(&text, "meshbroker_connections", &[]), 2.0, "{text}");
    let live = env
        .rows("SELECT id FROM mesh.presence WHERE disconnected_at IS NULL")
        .await;
    assert_eq!(
        live.len(),
        2,
        "a refused hello left a presence row: {live:?}"
    );
    // The live ones still work, and a closed one frees its place.
    let peers = c1.list_peers(None).await.must();
    assert_eq!(peers.len(), 2, "{peers:?}");
    c2.close().await.must();
    env.wait_rows(
        "SELECT id FROM mesh.presence WHERE disconnected_at IS NULL",
        "bob's session closed",
        |r| r.len() == 1,
    )
    .await;
    env.connect(&b).await;
}

/// Simultaneous hellos cannot take a mesh past its cap: the count and the
/// insert are one step under a per-mesh lock.
#[actix_web::test]
async fn simultaneous_hellos_never_exceed_the_mesh_cap() {
    const CAP: usize = 3;
    let env = TestEnv::start_with(|c| {
        c.limits.max_connections_per_mesh = CAP as u32;
        c.database.pool_size = 12;
    })
    .await;
    let mut members = Vec::new();
    for i in 0..12 {
        members.push(env.member(&format!("m{i}")).await);
    }
    let hellos = members.iter().map(|m| {
        let url = env.ws_url.clone();
        async move { client::hello(&url, &m.creds, &HelloOptions::default()).await }
    });
    let results = futures_util::future::join_all(hellos).await;
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(format!("{r:#}").contains("capacity"), "{r:#}");
    }
    assert_eq!(accepted, CAP, "accepted hellos with a cap of {CAP}");
    let live = env
        .rows("SELECT id FROM mesh.presence WHERE disconnected_at IS NULL")
        .await;
    assert_eq!(live.len(), CAP, "{live:?}");
}

#[actix_web::test]
async fn an_oversized_message_is_counted_and_stores_nothing() {
    let env = TestEnv::start_with(|c| c.limits.max_message_bytes = 1024).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut conn = env.connect(&a).await;
    let ack = conn
        .send_message(&b.pubkey(), &"x".repeat(1025), "now", None)
        .await
        .must();
    assert_refused(&ack, "payload_too_large");
    // Just at the limit (nonce + ciphertext + targetSpec) is accepted.
    let mut frame = send_frame(&b.pubkey(), "", "now");
    frame["nonce"] = json!("n");
    frame["ciphertext"] = json!("c".repeat(1024 - 1 - 64));
    let ack = conn.send_frame(frame).await.must();
    assert_eq!(ack["queued"], true, "{ack}");
    let text = env.metrics().await;
    assert_eq!(
        metric(
            &text,
            "meshbroker_messages_rejected_total",
            &[("reason", "payload_too_large")]
        ),
        1.0,
        "{text}"
    );
    let rows = env.rows("SELECT id FROM mesh.message").await;
    assert_eq!(rows.len(), 1, "{rows:?}");
}

#[actix_web::test]
async fn a_hello_naming_a_malformed_mesh_id_is_unauthorized() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    for mesh in ["", "not-a-uuid", "'; DROP TABLE mesh.member; --", "%"] {
        let mut creds = a.creds.clone();
        creds.mesh_id = mesh.to_owned();
        let frame = hello_frame(&creds, &HelloOptions::default(), now_ms());
        expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
    }
    env.connect(&a).await;
}

// ---------------------------------------------------------------------------
// Secrets: no database password in `print-config` or in a broker's output.

/// Runs the real executable with `args`, a config file holding `toml`, and
/// `env_url` as MESHBROKER_DATABASE_URL; returns (exit success, stdout +
/// stderr). Never waits longer than 60 s.
async fn run_meshbroker(toml: &str, env_url: Option<&str>, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("meshbroker.toml");
    std::fs::write(&config, toml).expect("write config");
    let mut cmd = std::process::Command::new(crate::broker_process::BIN);
    cmd.arg("--config")
        .arg(&config)
        .args(args)
        .env_remove("MESHBROKER_DATABASE_URL")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(url) = env_url {
        cmd.env("MESHBROKER_DATABASE_URL", url);
    }
    let mut child = cmd.spawn().expect("spawn meshbroker");
    let status = crate::broker_process::wait_child(&mut child, Duration::from_secs(60)).await;
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (status.is_some_and(|s| s.success()), text)
}

/// Database URLs with a password in every place one can be written; the
/// password always contains `hunter2`.
const SECRET_URLS: [&str; 5] = [
    "postgres://meshuser:hunter2@127.0.0.1:1/meshbroker",
    "postgresql://meshuser:hun@ter2/x?y@127.0.0.1:1/meshbroker?connect_timeout=2",
    "postgres://meshuser@127.0.0.1:1/meshbroker?password=hunter2&connect_timeout=2",
    "host=127.0.0.1 port=1 user=meshuser password='hunter2 with spaces' dbname=meshbroker",
    "host=127.0.0.1 port=1 password = hunter2 dbname=meshbroker",
];

fn assert_no_secret(what: &str, text: &str) {
    for leak in ["hunter2", "hun@ter2", "ter2/x", "with spaces"] {
        assert!(
            !text.contains(leak),
            "{what} shows the password ({leak:?}):\n{text}"
        );
    }
}

#[actix_web::test]
async fn print_config_never_shows_a_database_password() {
    for url in SECRET_URLS {
        let toml = format!("[database]\nurl = {url:?}\n");
        let (ok, out) = run_meshbroker(&toml, None, &["print-config"]).await;
        assert!(ok, "print-config failed: {out}");
        assert!(out.contains("***"), "{url}: redaction is visible:\n{out}");
        assert_no_secret(&format!("print-config of {url}"), &out);
        // The same URL through the environment overrides the file's.
        let (ok, out) = run_meshbroker(
            "[database]\nurl = \"postgres://other@h/db\"\n",
            Some(url),
            &["print-config"],
        )
        .await;
        assert!(ok, "print-config failed: {out}");
        assert!(!out.contains("other@h"), "the env URL wins:\n{out}");
        assert_no_secret(&format!("print-config with env {url}"), &out);
    }
}

#[actix_web::test]
async fn serve_with_an_unreachable_password_url_fails_without_printing_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (i, url) in SECRET_URLS.iter().enumerate() {
        // Trace logging: the most a broker ever prints.
        let toml = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\n[log]\nlevel = \"trace\"\n[database]\nurl = {url:?}\n"
        );
        let (env_url, file) = if i % 2 == 0 {
            (None, toml)
        } else {
            (Some(*url), toml.replace(&format!("url = {url:?}\n"), ""))
        };
        let (ok, out) = run_meshbroker(&file, env_url, &["serve"]).await;
        assert!(!ok, "serve on an unreachable database must fail: {out}");
        assert!(
            out.contains("meshbroker: error:") && out.contains("***"),
            "{url}: the error names the redacted URL:\n{out}"
        );
        assert_no_secret(&format!("serve on {url}"), &out);
        // `migrate` and the admin commands take the same path.
        let (ok, out) = run_meshbroker(&file, env_url, &["mesh", "create", "--name", "x"]).await;
        assert!(!ok, "{out}");
        assert_no_secret(&format!("mesh create on {url}"), &out);
    }
}

#[actix_web::test]
async fn a_connection_without_hello_is_closed_after_the_hello_timeout() {
    let env = TestEnv::start_with(|c| {
        c.limits.hello_timeout = meshbroker::config::Dur::millis(600);
    })
    .await;
    let a = env.member("alice").await;
    // Keeps talking (pings, frames refused no_hello) but never says hello.
    let mut idle = Connection::connect(&env.ws_url).await.must();
    idle.ping().await.must();
    idle.send_json(&json!({"type": "list_peers"})).await.must();
    let err = idle.expect("error", WAIT).await.must();
    assert_eq!(err["code"], "no_hello", "{err}");
    let err = idle.expect("error", WAIT).await.must();
    assert_eq!(err["code"], "hello_timeout", "{err}");
    let (code, reason) = idle.expect_close(WAIT).await.must();
    assert_eq!((code, reason.as_str()), (Some(1008), "hello_timeout"));
    // One that said hello in time stays open past the timeout.
    let mut conn = env.connect(&a).await;
    let frames = conn.drain_for(Duration::from_millis(1200)).await.must();
    assert!(!conn.is_closed(), "closed after its hello: {frames:?}");
    conn.list_peers(None).await.must();
    let text = env.metrics().await;
    assert_eq!(
        metric(
            &text,
            "meshbroker_connections_rejected_total",
            &[("reason", "hello_timeout")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric(&text, "meshbroker_actors", &[("kind", "session")]),
        1.0,
        "{text}"
    );
}

/// A flood of acks, nacks and in_progress frames for deliveries the client
/// never got: more than `max_in_flight` settling queries of one connection
/// at once are dropped and counted, and real traffic goes on.
#[actix_web::test]
async fn a_flood_of_settling_frames_is_capped_and_counted() {
    let env = TestEnv::start_with(|c| {
        c.delivery.max_in_flight = 2;
        c.database.pool_size = 2;
    })
    .await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let mut bc = env.connect(&b).await;
    for i in 0..600 {
        let id = uuid::Uuid::new_v4();
        let frame = match i % 3 {
            0 => json!({"type": "client_ack", "brokerMessageId": id}),
            1 => json!({"type": "nack", "brokerMessageId": id}),
            _ => json!({"type": "in_progress", "brokerMessageId": id}),
        };
        bc.send_json(&frame).await.must();
    }
    env.wait_metric(
        "meshbroker_frames_rejected_total",
        &[("reason", "settle_overflow")],
        |v| v > 0.0,
    )
    .await;
    // The flood changed nothing, and a real delivery and its ack still work.
    let ack = ac
        .send_message(&b.pubkey(), "after the flood", "now", None)
        .await
        .must();
    let push = bc
        .expect_where("the real push", WAIT, |f| {
            f["type"] == "push" && !client::is_system_push(f)
        })
        .await
        .must();
    assert_eq!(push["messageId"], ack["messageId"]);
    bc.ack(&push).await.must();
    env.wait_rows(
        &format!(
            "SELECT delivered_at FROM mesh.message_queue WHERE message_id = '{}'::uuid",
            ack["messageId"].as_str().unwrap()
        ),
        "the real ack recorded",
        |r| !r.is_empty() && !r[0]["delivered_at"].is_null(),
    )
    .await;
}
