//! Correctness that must not depend on one process's memory: two brokers on
//! one database never both hold a live lease on a delivery.

use std::collections::HashMap;
use std::sync::Arc;

use meshbroker::client::{Event, HelloOptions};
use meshbroker::config::Dur;

use crate::support::*;

#[actix_web::test]
async fn two_brokers_on_one_database_never_share_a_lease() {
    const MESSAGES: usize = 120;
    let tweak = |c: &mut meshbroker::config::Config| {
        // Long enough that no lease runs out during the test: any second
        // push of a message would be a double claim.
        c.delivery.lease = Dur::secs(60);
        c.delivery.claim_batch = 8;
    };
    let env = TestEnv::start_with(tweak).await;
    let mut second_config = test_config(&env.db_url);
    tweak(&mut second_config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let second = meshbroker::broker::start(
        Arc::new(second_config),
        make_pool(&env.db_url, 6).await,
        listener,
    )
    .await
    .expect("second broker starts");
    let second_url = format!("ws://{}/ws", second.local_addr());

    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut ac = env.connect(&a).await;
    for i in 0..MESSAGES {
        let ack = ac
            .send_message(&b.pubkey(), &format!("m{i}"), "now", None)
            .await
            .must();
        assert_eq!(ack["queued"], true, "{ack}");
    }

    // Bob comes online on both brokers at once; both drains claim. (Two
    // hellos of one key in the same millisecond would be refused `replayed`.)
    let opts = |sid: &str| HelloOptions {
        session_id: Some(sid.to_owned()),
        ..Default::default()
    };
    let (on_first, on_second) = futures_util::future::join(
        meshbroker::client::hello(&env.ws_url, &b.creds, &opts("host-1")),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            meshbroker::client::hello(&second_url, &b.creds, &opts("host-2")).await
        },
    )
    .await;
    let mut conns = [on_first.must().0, on_second.must().0];

    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut per_broker = [0usize; 2];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while seen.len() < MESSAGES && tokio::time::Instant::now() < deadline {
        for (i, conn) in conns.iter_mut().enumerate() {
            while let Ok(Event::Frame(f)) = conn.recv(std::time::Duration::from_millis(50)).await {
                if f["type"] == "push" && f["subtype"].is_null() {
                    *seen
                        .entry(f["messageId"].as_str().unwrap().to_owned())
                        .or_default() += 1;
                    per_broker[i] += 1;
                }
            }
        }
    }
    eprintln!("pushes per broker: {per_broker:?}");
    // A little longer, for any double push still on its way.
    for conn in conns.iter_mut() {
        for f in pushes_within(conn, QUIET).await {
            *seen
                .entry(f["messageId"].as_str().unwrap().to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(
        seen.len(),
        MESSAGES,
        "every message pushed (per broker: {per_broker:?})"
    );
    let doubled: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        doubled.is_empty(),
        "pushed twice under one lease: {doubled:?}"
    );
    let nodes = env
        .rows("SELECT DISTINCT claim_node_id::text AS node FROM mesh.message_queue")
        .await;
    assert!(
        nodes.iter().all(|r| !r["node"].is_null()),
        "every delivery claimed by a node: {nodes:?}"
    );
    second.shutdown().await;
}
