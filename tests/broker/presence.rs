//! §5 presence: peers_list, roles, system pushes, grace, keepalive.

use std::time::Duration;

use meshbroker::client::{self, HelloOptions};
use meshbroker::config::Dur;

use crate::support::*;

fn sid_opts(name: &str, sid: &str) -> HelloOptions {
    HelloOptions {
        display_name: Some(name.into()),
        session_id: Some(sid.into()),
        ..Default::default()
    }
}

#[actix_web::test]
async fn peers_list_tags_every_role_and_filters_by_roles() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let c = env.member("carol").await;
    let _daemon = env.connect(&a).await;
    let (_bot, _) = env
        .connect_opts(
            &a,
            HelloOptions {
                role: Some("service".into()),
                display_name: Some("alice-bot".into()),
                ..Default::default()
            },
        )
        .await;
    let (_session, sk) = env.session(&b, "bob-session").await;
    let mut cc = env.connect(&c).await;

    let all = cc.list_peers(None).await.must();
    for p in &all {
        assert!(p["peerRole"].is_string(), "peerRole on every entry: {p}");
        assert!(p["groups"].is_array(), "groups always an array: {p}");
        for field in [
            "pubkey",
            "memberPubkey",
            "displayName",
            "status",
            "sessionId",
            "connectedAt",
        ] {
            assert!(p.get(field).is_some(), "{field} missing: {p}");
        }
    }
    let role_of = |name: &str| {
        all.iter()
            .find(|p| p["displayName"] == name)
            .unwrap_or_else(|| panic!("{name} listed: {all:?}"))["peerRole"]
            .clone()
    };
    assert_eq!(role_of("alice"), "control-plane");
    assert_eq!(role_of("alice-bot"), "service");
    assert_eq!(role_of("bob-session"), "session");
    let session = all
        .iter()
        .find(|p| p["displayName"] == "bob-session")
        .unwrap();
    assert_eq!(
        session["pubkey"],
        spub(&sk).as_str(),
        "a session is listed by its session key"
    );
    assert_eq!(session["memberPubkey"], b.pubkey().as_str());
    assert_eq!(session["status"], "idle");
    let daemon = all.iter().find(|p| p["displayName"] == "alice").unwrap();
    assert_eq!(
        daemon["pubkey"],
        a.pubkey().as_str(),
        "no session key: the member key"
    );

    let sessions = cc.list_peers(Some(&["session"])).await.must();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["displayName"], "bob-session");
    let services = cc
        .list_peers(Some(&["service", "control-plane"]))
        .await
        .must();
    let mut names: Vec<&str> = services
        .iter()
        .filter_map(|p| p["displayName"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["alice", "alice-bot", "carol"], "{services:?}");
}

#[actix_web::test]
async fn peer_joined_goes_to_other_members_only() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let (mut a_session, _) = env.session(&a, "alice-session").await;
    let (_bs, bk) = env.session(&b, "bob-session").await;

    let ev = ac.expect_system("peer_joined", WAIT).await.must();
    assert_eq!(ev["type"], "push");
    assert_eq!(ev["senderPubkey"], "system", "{ev}");
    assert_eq!(ev["priority"], "low", "{ev}");
    assert_eq!(ev["nonce"], "", "{ev}");
    assert_eq!(ev["ciphertext"], "", "{ev}");
    assert_eq!(ev["eventData"]["name"], "bob-session", "{ev}");
    assert_eq!(ev["eventData"]["pubkey"], spub(&bk).as_str(), "{ev}");
    assert_eq!(ev["eventData"]["peerRole"], "session", "{ev}");
    // Alice's own session joining is not announced to alice's daemon.
    let frames = ac.drain_for(QUIET).await.must();
    assert!(
        !frames
            .iter()
            .any(|f| f["event"] == "peer_joined" && f["eventData"]["name"] == "alice-session"),
        "own member's join announced: {frames:?}"
    );
    a_session.expect_system("peer_joined", WAIT).await.must();
}

#[actix_web::test]
async fn a_closed_connection_is_listed_for_the_grace_then_peer_left() {
    let env = TestEnv::start().await; // grace 1s
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let (bs, bk) = env.session(&b, "bob-session").await;
    ac.expect_system("peer_joined", WAIT).await.must();
    bs.close().await.must();

    let peers = ac.list_peers(None).await.must();
    assert!(
        peers.iter().any(|p| p["pubkey"] == spub(&bk).as_str()),
        "still listed within the grace: {peers:?}"
    );
    let left = ac.expect_system("peer_left", WAIT).await.must();
    assert_eq!(left["eventData"]["pubkey"], spub(&bk).as_str(), "{left}");
    assert_eq!(left["eventData"]["name"], "bob-session", "{left}");
    assert_eq!(left["eventData"]["peerRole"], "session", "{left}");
    let peers = ac.list_peers(None).await.must();
    assert!(
        !peers.iter().any(|p| p["pubkey"] == spub(&bk).as_str()),
        "gone after peer_left: {peers:?}"
    );
}

#[actix_web::test]
async fn reconnecting_within_the_grace_is_silent() {
    let env = TestEnv::start_with(|c| c.presence.grace = Dur::secs(2)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let sid = format!("sid-{}", uuid::Uuid::new_v4());
    let (bc, _) = env.connect_opts(&b, sid_opts("bob", &sid)).await;
    ac.expect_system("peer_joined", WAIT).await.must();
    bc.close().await.must();
    let (_bc, _) = env.connect_opts(&b, sid_opts("bob", &sid)).await;

    // Watch past the end of the first connection's grace.
    let frames = ac.drain_for(Duration::from_millis(2800)).await.must();
    let events: Vec<&serde_json::Value> = frames
        .iter()
        .filter(|f| client::is_system_push(f))
        .collect();
    assert!(
        events.is_empty(),
        "a takeover within the grace announces nothing: {events:?}"
    );
    let peers = ac.list_peers(None).await.must();
    let bobs = peers
        .iter()
        .filter(|p| p["memberPubkey"] == b.pubkey().as_str())
        .count();
    assert_eq!(bobs, 1, "one presence for bob: {peers:?}");
}

/// Takeover inside the grace window follows the replacement rule: a CLI
/// command's hello (same `sessionId`, a fresh `sessionPubkey`) takes over
/// nothing of an earlier command with another key, so peers hear it join.
#[actix_web::test]
async fn a_hello_with_another_session_key_takes_over_nothing() {
    let env = TestEnv::start_with(|c| c.presence.grace = Dur::secs(5)).await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let sid = format!("sid-{}", uuid::Uuid::new_v4());
    let cli = |key: &ed25519_dalek::SigningKey| HelloOptions {
        session_pubkey: Some(spub(key)),
        ..sid_opts("bob-cli", &sid)
    };
    let (k1, k2) = (
        client::generate_session_key(),
        client::generate_session_key(),
    );
    let (first, _) = env.connect_opts(&b, cli(&k1)).await;
    ac.expect_system("peer_joined", WAIT).await.must();
    first.close().await.must();
    // Another command of the same session: announced, not a takeover.
    let (second, _) = env.connect_opts(&b, cli(&k2)).await;
    let joined = ac.expect_system("peer_joined", WAIT).await.must();
    assert_eq!(
        joined["eventData"]["pubkey"],
        spub(&k2).as_str(),
        "{joined}"
    );
    second.close().await.must();
    // The same key again inside its grace: a silent takeover.
    let (_again, _) = env.connect_opts(&b, cli(&k2)).await;
    let frames = ac.drain_for(QUIET).await.must();
    assert!(
        !frames.iter().any(|f| f["event"] == "peer_joined"),
        "a takeover announces nothing: {frames:?}"
    );
}

#[actix_web::test]
async fn set_visible_hides_from_other_members_but_not_the_own_member() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let (mut a_session, _) = env.session(&a, "alice-session").await;
    let mut bc = env.connect(&b).await;

    a_session
        .send_json(&json!({"type": "set_visible", "visible": false, "_reqId": "v1"}))
        .await
        .must();
    let ack = a_session
        .expect_where("set_visible ack", WAIT, |f| f["_reqId"] == "v1")
        .await
        .must();
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], "v1", "{ack}");
    assert_eq!(ack["messageId"], "", "{ack}");
    assert_eq!(ack["queued"], false, "{ack}");

    let bob_sees = bc.list_peers(None).await.must();
    assert!(
        !bob_sees.iter().any(|p| p["displayName"] == "alice-session"),
        "{bob_sees:?}"
    );
    let alice_sees = ac.list_peers(None).await.must();
    assert!(
        alice_sees
            .iter()
            .any(|p| p["displayName"] == "alice-session"),
        "{alice_sees:?}"
    );
    let hidden = bc.expect_system("peer_hidden", WAIT).await.must();
    assert_eq!(hidden["eventData"]["name"], "alice-session", "{hidden}");
}

#[actix_web::test]
async fn set_summary_and_status_are_listed() {
    let env = TestEnv::start().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    let (mut bs, _) = env.session(&b, "bob-session").await;
    bs.send_json(&json!({"type": "set_summary", "summary": "refactoring the parser"}))
        .await
        .must();
    bs.set_status("working").await.must();
    bs.list_peers(None).await.must();
    let peers = ac.list_peers(None).await.must();
    let p = peers
        .iter()
        .find(|p| p["displayName"] == "bob-session")
        .expect("listed");
    assert_eq!(p["summary"], "refactoring the parser", "{p}");
    assert_eq!(p["status"], "working", "{p}");
}

#[actix_web::test]
async fn a_silent_connection_is_closed_by_the_keepalive() {
    let env = TestEnv::start_with(|c| {
        c.presence.ping_interval = Dur::millis(200);
        c.presence.pong_timeout = Dur::millis(800);
    })
    .await;
    let a = env.member("alice").await;
    let mut alive = env.connect(&a).await;
    let mut silent = env.connect(&a).await;
    silent.auto_pong = false;
    // Read both at once, so `alive` answers its pings meanwhile.
    let (closed, _) = futures_util::future::join(
        silent.expect_close(WAIT),
        alive.drain_for(Duration::from_millis(2500)),
    )
    .await;
    closed.must();
    assert!(
        !alive.is_closed(),
        "the connection answering pings was closed"
    );
    alive.list_peers(None).await.must();
}
