//! §2: hello, session_hello, hello_ack, every refusal, replacement.

use meshbroker::client::{
    self, attestation, hello_frame, now_ms, session_hello_frame, HelloOptions,
};
use meshbroker::crypto;

use crate::support::*;
use ed25519_dalek::SigningKey;

fn named(name: &str) -> HelloOptions {
    HelloOptions {
        display_name: Some(name.into()),
        ..Default::default()
    }
}

#[actix_web::test]
async fn hello_is_accepted_as_control_plane() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let (_conn, ack) = env.connect_opts(&a, named("alice-daemon")).await;
    assert_eq!(ack["type"], "hello_ack");
    assert!(
        ack["presenceId"].as_str().is_some_and(|s| !s.is_empty()),
        "{ack}"
    );
    assert_eq!(ack["peerRole"], "control-plane", "{ack}");
    assert_eq!(ack["protocolVersion"], 1, "{ack}");
    assert!(ack["memberDisplayName"].is_string(), "{ack}");
    let profile = &ack["memberProfile"];
    assert!(profile["groups"].is_array(), "{ack}");
    assert_eq!(profile["messageMode"], "push", "{ack}");
    assert!(profile.get("roleTag").is_some(), "{ack}");
}

#[actix_web::test]
async fn hello_with_role_service_is_a_service() {
    let env = TestEnv::start().await;
    let a = env.member("bot").await;
    let opts = HelloOptions {
        role: Some("service".into()),
        ..named("bot")
    };
    let (_conn, ack) = env.connect_opts(&a, opts).await;
    assert_eq!(ack["peerRole"], "service", "{ack}");
}

#[actix_web::test]
async fn hello_with_session_pubkey_is_still_control_plane() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    let opts = HelloOptions {
        session_pubkey: Some(spub(&sk)),
        ..named("cli")
    };
    let (_conn, ack) = env.connect_opts(&a, opts).await;
    assert_eq!(ack["peerRole"], "control-plane", "{ack}");
}

#[actix_web::test]
async fn session_hello_is_accepted_as_session_whatever_role_says() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    let now = now_ms();
    let mut frame = session_hello_frame(&a.creds, &sk, now + 3_600_000, &named("s1"), now);
    frame["role"] = json!("service");
    let (_conn, ack) = client::handshake(&env.ws_url, &frame).await.must();
    assert_eq!(ack["type"], "hello_ack");
    assert_eq!(ack["peerRole"], "session", "{ack}");
}

#[actix_web::test]
async fn missing_display_name_uses_member_name() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let (_a, _) = env.connect_opts(&a, HelloOptions::default()).await;
    let mut bc = env.connect(&b).await;
    let peers = bc.list_peers(None).await.must();
    let alice = peers
        .iter()
        .find(|p| p["memberPubkey"] == a.pubkey().as_str());
    let alice = alice.unwrap_or_else(|| panic!("alice listed: {peers:?}"));
    assert_eq!(alice["displayName"], "alice", "{alice}");
}

#[actix_web::test]
async fn hello_with_bad_signature_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    frame["signature"] = json!(crypto::sign_hex(&a.creds.key, "something else"));
    expect_refusal(&env.ws_url, &frame, "bad_signature", 1008).await;
}

#[actix_web::test]
async fn hello_outside_skew_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms() - 120_000);
    expect_refusal(&env.ws_url, &frame, "timestamp_skew", 1008).await;
    let frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms() + 120_000);
    expect_refusal(&env.ws_url, &frame, "timestamp_skew", 1008).await;
}

#[actix_web::test]
async fn replayed_hello_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    let (_first, ack) = client::handshake(&env.ws_url, &frame).await.must();
    assert_eq!(ack["type"], "hello_ack");
    expect_refusal(&env.ws_url, &frame, "replayed", 1008).await;
}

#[actix_web::test]
async fn hello_of_unknown_key_is_unauthorized() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let (_, secret) = crypto::generate_keypair();
    let stranger = client::Credentials::from_secret_hex(&a.creds.mesh_id, &a.id, &secret).unwrap();
    let frame = hello_frame(&stranger, &HelloOptions::default(), now_ms());
    expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
}

#[actix_web::test]
async fn hello_with_another_members_id_is_unauthorized() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut creds = a.creds.clone();
    creds.member_id = b.id.clone();
    // Correctly signed by alice's key, but naming bob's member id.
    let frame = hello_frame(&creds, &HelloOptions::default(), now_ms());
    expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
}

#[actix_web::test]
async fn hello_of_revoked_member_closes_4002() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    env.revoke(&a).await;
    let frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    expect_refusal(&env.ws_url, &frame, "revoked", 4002).await;
}

#[actix_web::test]
async fn hello_with_malformed_key_or_signature_is_malformed() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    frame["signature"] = json!("abcd");
    expect_refusal(&env.ws_url, &frame, "malformed", 1008).await;
    let mut frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    frame["pubkey"] = json!("not-a-key");
    expect_refusal(&env.ws_url, &frame, "malformed", 1008).await;
}

#[actix_web::test]
async fn hello_with_bad_session_pubkey_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let opts = HelloOptions {
        session_pubkey: Some("ABCDEF".into()),
        ..Default::default()
    };
    let frame = hello_frame(&a.creds, &opts, now_ms());
    expect_refusal(&env.ws_url, &frame, "bad_session_pubkey", 1008).await;
    // Uppercase hex of the right length is not lowercase hex either.
    let sk = client::generate_session_key();
    let opts = HelloOptions {
        session_pubkey: Some(spub(&sk).to_uppercase()),
        ..Default::default()
    };
    let frame = hello_frame(&a.creds, &opts, now_ms());
    expect_refusal(&env.ws_url, &frame, "bad_session_pubkey", 1008).await;
}

#[actix_web::test]
async fn session_hello_with_expired_attestation_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    let now = now_ms();
    let frame = session_hello_frame(&a.creds, &sk, now - 1_000, &HelloOptions::default(), now);
    expect_refusal(&env.ws_url, &frame, "expired", 1008).await;
}

#[actix_web::test]
async fn session_hello_with_attestation_over_24h_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    let now = now_ms();
    let frame = session_hello_frame(
        &a.creds,
        &sk,
        now + 25 * 3_600_000,
        &HelloOptions::default(),
        now,
    );
    expect_refusal(&env.ws_url, &frame, "ttl_too_long", 1008).await;
}

#[actix_web::test]
async fn session_hello_with_attestation_for_another_key_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    let other = client::generate_session_key();
    let now = now_ms();
    let mut frame = hour_session_frame(&a.creds, &sk, now);
    frame["parentAttestation"] = attestation(&a.creds, &spub(&other), now + 3_600_000);
    expect_refusal(&env.ws_url, &frame, "attestation_mismatch", 1008).await;
}

#[actix_web::test]
async fn session_hello_with_wrong_parent_member_id_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let sk = client::generate_session_key();
    let now = now_ms();
    let mut frame = hour_session_frame(&a.creds, &sk, now);
    frame["parentMemberId"] = json!(b.id);
    expect_refusal(&env.ws_url, &frame, "parent_member_id_mismatch", 1008).await;
}

#[actix_web::test]
async fn session_hello_signed_by_the_wrong_key_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    let now = now_ms();
    let mut frame = hour_session_frame(&a.creds, &sk, now);
    // Signed by the member key instead of the session key.
    let msg = crypto::session_hello_message(&a.creds.mesh_id, &a.pubkey(), &spub(&sk), now);
    frame["signature"] = json!(crypto::sign_hex(&a.creds.key, &msg));
    expect_refusal(&env.ws_url, &frame, "bad_signature", 1008).await;
}

#[actix_web::test]
async fn session_hello_of_revoked_or_unknown_parent_is_refused() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    env.revoke(&a).await;
    let sk = client::generate_session_key();
    let now = now_ms();
    let frame = hour_session_frame(&a.creds, &sk, now);
    expect_refusal(&env.ws_url, &frame, "revoked", 4002).await;

    let (_, secret) = crypto::generate_keypair();
    let stranger = client::Credentials::from_secret_hex(&a.creds.mesh_id, &a.id, &secret).unwrap();
    let mut frame = hour_session_frame(&stranger, &sk, now);
    frame.as_object_mut().unwrap().remove("parentMemberId");
    expect_refusal(&env.ws_url, &frame, "unauthorized", 1008).await;
}

#[actix_web::test]
async fn mesh_connection_capacity_is_enforced() {
    let env = TestEnv::start_with(|c| c.limits.max_connections_per_mesh = 2).await;
    let a = env.member("alice").await;
    let _c1 = env.connect(&a).await;
    let _c2 = env.connect(&a).await;
    let frame = hello_frame(&a.creds, &HelloOptions::default(), now_ms());
    expect_refusal(&env.ws_url, &frame, "capacity", 1008).await;
}

#[actix_web::test]
async fn second_hello_with_same_session_id_replaces_the_first_but_never_a_session() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sid = format!("sid-{}", uuid::Uuid::new_v4());
    let with_sid = |name: &str| HelloOptions {
        session_id: Some(sid.clone()),
        ..named(name)
    };

    // A live session with that sessionId.
    let sk = client::generate_session_key();
    let (mut session, _) = env.session_opts(&a, &sk, with_sid("session")).await;

    // A short CLI-style hello carrying the session's sessionId leaves it alone.
    let (mut first, _) = env.connect_opts(&a, with_sid("cli-1")).await;
    let frames = session.drain_for(QUIET).await.must();
    assert!(
        !session.is_closed(),
        "session was closed by a hello with its sessionId: {frames:?}"
    );

    // A second hello with the same sessionId replaces the first hello.
    let (mut second, _) = env.connect_opts(&a, with_sid("cli-2")).await;
    let (code, reason) = first.expect_close(WAIT).await.must();
    assert_eq!(code, Some(1000));
    assert_eq!(reason, "session_replaced");

    // The session and the new hello are both alive and answer.
    let peers = session.list_peers(None).await.must();
    assert!(
        peers.iter().any(|p| p["pubkey"] == spub(&sk).as_str()),
        "session still listed: {peers:?}"
    );
    second.list_peers(None).await.must();
}

/// docs/protocol.md §2: a `hello` with a `sessionPubkey` replaces only the
/// hello connection with the same `sessionId` *and* `sessionPubkey`. The
/// claudemesh CLI opens one such hello per command, each with a fresh
/// session key: parallel commands of one session must not knock each other
/// off (nor the daemon, nor the session).
#[actix_web::test]
async fn parallel_cli_hellos_of_one_session_coexist_and_replace_only_their_own_key() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sid = format!("sid-{}", uuid::Uuid::new_v4());
    let cli = |name: &str, key: &SigningKey| HelloOptions {
        session_id: Some(sid.clone()),
        session_pubkey: Some(spub(key)),
        ..named(name)
    };
    let sk = client::generate_session_key();
    let (mut session, _) = env.session_opts(&a, &sk, named("session")).await;
    let (mut daemon, _) = env
        .connect_opts(
            &a,
            HelloOptions {
                session_id: Some(sid.clone()),
                ..named("daemon")
            },
        )
        .await;
    let (k1, k2) = (
        client::generate_session_key(),
        client::generate_session_key(),
    );
    let (mut one, _) = env.connect_opts(&a, cli("cli-1", &k1)).await;
    let (mut two, _) = env.connect_opts(&a, cli("cli-2", &k2)).await;
    for (who, conn) in [
        ("session", &mut session),
        ("daemon", &mut daemon),
        ("first command", &mut one),
    ] {
        let frames = conn.drain_for(QUIET).await.must();
        assert!(!conn.is_closed(), "{who} was closed: {frames:?}");
        conn.list_peers(None).await.must();
    }
    two.list_peers(None).await.must();

    // The same key and sessionId again: that one, and only that one, goes.
    let (mut again, _) = env.connect_opts(&a, cli("cli-1b", &k1)).await;
    let (code, reason) = one.expect_close(WAIT).await.must();
    assert_eq!((code, reason.as_str()), (Some(1000), "session_replaced"));
    for conn in [&mut session, &mut daemon, &mut two, &mut again] {
        conn.list_peers(None).await.must();
    }
}

#[actix_web::test]
async fn second_session_hello_with_same_session_key_replaces_the_first() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let sk = client::generate_session_key();
    let (mut first, _) = env.session_opts(&a, &sk, named("s")).await;
    let (mut second, ack) = env.session_opts(&a, &sk, named("s")).await;
    assert_eq!(ack["peerRole"], "session");
    let (code, reason) = first.expect_close(WAIT).await.must();
    assert_eq!((code, reason.as_str()), (Some(1000), "session_replaced"));
    second.list_peers(None).await.must();
}

#[actix_web::test]
async fn unsupported_hello_fields_do_not_break_the_handshake() {
    // A claudemesh-style hello with every optional field.
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let mut frame = hello_frame(&a.creds, &named("full"), now_ms());
    let extra = json!({
        "pid": 123, "cwd": "/tmp", "hostname": "h", "peerType": "ai", "channel": "c",
        "model": "m", "groups": [{"name": "backend", "role": "lead"}, "frontend"],
    });
    for (k, v) in extra.as_object().unwrap() {
        frame[k] = v.clone();
    }
    let (mut conn, ack) = client::handshake(&env.ws_url, &frame).await.must();
    assert_eq!(ack["peerRole"], "control-plane");
    let peers = conn.list_peers(None).await.must();
    let me = peers
        .iter()
        .find(|p| p["displayName"] == "full")
        .expect("listed");
    assert_eq!(me["cwd"], "/tmp", "{me}");
    assert_eq!(me["hostname"], "h", "{me}");
    assert_eq!(me["peerType"], "ai", "{me}");
    let groups: Vec<&str> = me["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert!(
        groups.contains(&"backend") && groups.contains(&"frontend"),
        "{me}"
    );
}

/// A session_hello by `sk`, attested by `creds` for the next hour, at `now`.
fn hour_session_frame(
    creds: &client::Credentials,
    sk: &ed25519_dalek::SigningKey,
    now: i64,
) -> serde_json::Value {
    session_hello_frame(creds, sk, now + 3_600_000, &HelloOptions::default(), now)
}

/// The mesh's live count behind the cap (`mesh.mesh_live`, kept by a
/// trigger) follows every way a connection opens and closes: hellos,
/// closes into a grace window, a takeover inside it, replacement.
#[actix_web::test]
async fn the_live_count_behind_the_cap_follows_every_open_and_close() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let live = "SELECT count(*) AS n FROM mesh.presence WHERE disconnected_at IS NULL";
    let counted = "SELECT coalesce(sum(live), 0)::bigint AS n FROM mesh.mesh_live";
    let agree = |want: i64| {
        let env = &env;
        async move {
            env.wait_rows(live, "live rows", |r| r[0]["n"] == want)
                .await;
            assert_eq!(
                env.rows(counted).await[0]["n"],
                want,
                "counted vs {want} live"
            );
        }
    };
    let c1 = env.connect(&a).await;
    let (s1, key) = env.session(&b, "bob-session").await;
    agree(2).await;
    s1.close().await.must();
    agree(1).await;
    // A takeover of the closed session inside its grace window, then a
    // replacement of that connection by a third hello with its key.
    let opts = HelloOptions {
        display_name: Some("bob-session".into()),
        ..HelloOptions::default()
    };
    let (_s2, _) = client::session_hello(&env.ws_url, &b.creds, &key, &opts)
        .await
        .must();
    agree(2).await;
    let (_s3, _) = client::session_hello(&env.ws_url, &b.creds, &key, &opts)
        .await
        .must();
    agree(2).await;
    c1.close().await.must();
    agree(1).await;
}

/// The cap holds exactly across the count at which hellos stop sharing the
/// mesh's lock (`max_connections` below the cap): many simultaneous hellos
/// around it, and exactly the cap's number get in.
#[actix_web::test]
async fn simultaneous_hellos_where_the_lock_turns_exclusive_stop_exactly_at_the_cap() {
    let probe = TestEnv::start().await;
    let margin: u32 = probe
        .rows("SELECT current_setting('max_connections')::int AS n")
        .await[0]["n"]
        .as_u64()
        .expect("max_connections") as u32;
    drop(probe);
    // The first hellos find the mesh far enough below the cap to share the
    // lock; the rest must take it exclusive, some after a shared look.
    let cap = margin + 4;
    let env = TestEnv::start_with(|c| {
        c.limits.max_connections_per_mesh = cap;
        c.database.pool_size = 12;
    })
    .await;
    let m = env.member("many").await;
    let hellos = (0..cap as usize + 8).map(|_| {
        let (url, creds) = (env.ws_url.clone(), m.creds.clone());
        async move {
            let key = client::generate_session_key();
            client::session_hello(&url, &creds, &key, &HelloOptions::default()).await
        }
    });
    let results = futures_util::future::join_all(hellos).await;
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(format!("{r:#}").contains("capacity"), "{r:#}");
    }
    let accepted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(
        accepted, cap as usize,
        "accepted hellos with a cap of {cap}"
    );
    let live = env
        .rows("SELECT count(*) AS n FROM mesh.presence WHERE disconnected_at IS NULL")
        .await;
    assert_eq!(live[0]["n"], cap as i64);
}

/// The second call a hello makes when its shared look found the mesh too
/// close to the cap (`near_cap`): exclusive at once, and its signature,
/// recorded by the first call, neither recorded again nor taken for a
/// replay; a full mesh still refuses it.
#[actix_web::test]
async fn the_exclusive_retry_after_near_cap_opens_without_a_second_signature() {
    let env = TestEnv::start().await;
    let m = env.member("retry").await;
    let call = |max_live: i64| {
        format!(
            "SELECT outcome, display_name FROM mesh.open_hello(NULL, '{}', '{}', NULL, false, \
             {max_live}, true, gen_random_uuid(), 'sid-retry', NULL, 'control-plane', NULL, \
             '[]'::jsonb, NULL, NULL, NULL, NULL, NULL, NULL, gen_random_uuid())",
            env.mesh_id,
            m.pubkey()
        )
    };
    let seen = "SELECT count(*) AS n FROM mesh.hello_seen";
    let before = env.rows(seen).await[0]["n"].clone();
    let opened = env.rows(&call(10)).await;
    assert_eq!(opened[0]["outcome"], "opened", "{opened:?}");
    assert_eq!(opened[0]["display_name"], "retry", "{opened:?}");
    assert_eq!(
        env.rows(seen).await[0]["n"],
        before,
        "no signature recorded"
    );
    let full = env.rows(&call(1)).await;
    assert_eq!(full[0]["outcome"], "full", "{full:?}");
}
