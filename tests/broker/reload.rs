//! SIGHUP re-reads the config file of the real executable: what can change
//! while serving changes (on connections already open), what cannot is
//! named in the log and kept, and a bad file changes nothing.

use std::time::Duration;

use meshbroker::client::Connection;

use crate::broker_process::*;
use crate::support::*;

async fn send(from: &mut Connection, to: &Member, text: &str) -> serde_json::Value {
    from.send_message(&to.pubkey(), text, "now", None)
        .await
        .must()
}

#[actix_web::test]
async fn sighup_reloads_what_can_change_and_names_what_cannot() {
    let env = TestEnv::without_broker().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut p = BrokerProcess::spawn(&env.db_url).await;
    let mut ac = p.hello(&a).await;
    let big = "x".repeat(2000);
    let ack = send(&mut ac, &b, &big).await;
    assert_eq!(ack["queued"], true, "within the starting limit: {ack}");

    // Reloadable keys and restart-only ones in one file. The reload's own
    // report is an INFO line: it shows only because log.level changed
    // from warn to info on this reload.
    p.rewrite_config(|c| {
        c.set("limits.max_message_bytes", "1000")
            .set("log.level", "\"info\"")
            .set("sweeper.interval", "\"1s\"")
            .set("presence.ping_interval", "\"10s\"")
    });
    let log = p.sighup_until("configuration reloaded").await;
    assert!(
        log.contains("limits.max_message_bytes = 1000 (was 65536)")
            && log.contains("log.level = \"info\" (was \"warn\")"),
        "the applied changes are named with their values:\n{log}"
    );
    let restart_line = log
        .lines()
        .find(|l| l.contains("only take effect after a restart"))
        .unwrap_or_else(|| panic!("no restart-only warning:\n{log}"));
    assert!(
        restart_line.contains("presence.ping_interval")
            && restart_line.contains("sweeper.interval")
            && !restart_line.contains("max_message_bytes"),
        "{restart_line}"
    );
    // The new limit holds on the connection that was already open.
    assert_refused(&send(&mut ac, &b, &big).await, "payload_too_large");
    assert_eq!(send(&mut ac, &b, "small").await["queued"], true);

    // A file that does not parse changes nothing and says why.
    p.write_config_text("[limits]\nmax_message_bytes = 100000\nsend_burts = 3\n");
    let log = p.sighup_until("not reloaded").await;
    let refusal = log.lines().rfind(|l| l.contains("not reloaded")).unwrap();
    assert!(
        refusal.contains("nothing changed") && refusal.contains("send_burts"),
        "{refusal}"
    );
    assert_refused(&send(&mut ac, &b, &big).await, "payload_too_large");

    // Nor does a value that fails validation.
    p.rewrite_config(|c| {
        c.set("limits.max_message_bytes", "100000")
            .set("limits.send_burst", "0")
    });
    let log = p.sighup_until("not reloaded").await;
    let refusal = log.lines().rfind(|l| l.contains("not reloaded")).unwrap();
    assert!(refusal.contains("limits.send_burst"), "{refusal}");
    assert_refused(&send(&mut ac, &b, &big).await, "payload_too_large");

    // The send rate limit changes for members already sending.
    p.rewrite_config(|c| {
        c.set("limits.send_burst", "2")
            .set("limits.send_per_sec", "1")
    });
    let log = p.sighup_until("configuration reloaded").await;
    assert!(log.contains("limits.send_burst = 2"), "{log}");
    let mut refused = None;
    for i in 0..5 {
        let ack = send(&mut ac, &b, "burst").await;
        if ack["queued"] != true {
            refused = Some((i, ack));
            break;
        }
    }
    let (i, ack) = refused.expect("the new burst of 2 refuses within 5 quick sends");
    assert!(i <= 2, "refused only after {i} sends");
    assert_refused(&ack, "rate_limit");

    assert!(
        matches!(p.child.try_wait(), Ok(None)),
        "still serving:\n{}",
        p.log()
    );
    p.sigterm();
    p.wait_exit(Duration::from_secs(15)).await;
}
