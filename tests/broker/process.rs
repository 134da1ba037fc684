//! The real executable: SIGTERM releases leases; `client listen|send`.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use meshbroker::client::Connection;

use crate::broker_process::*;
use crate::support::*;

fn client_args(p: &BrokerProcess, m: &Member) -> Vec<String> {
    vec![
        "--config".into(),
        p.config_path.display().to_string(),
        "client".into(),
        "SUB".into(),
        "--url".into(),
        p.ws_url.clone(),
        "--mesh".into(),
        m.creds.mesh_id.clone(),
        "--member-id".into(),
        m.id.clone(),
        "--secret-key".into(),
        meshbroker::crypto::secret_hex(&m.creds.key),
    ]
}

#[actix_web::test]
async fn sigterm_closes_with_1001_and_releases_unacked_leases() {
    let env = TestEnv::without_broker().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut p = BrokerProcess::spawn(&env.db_url).await;
    let mut ac = p.hello(&a).await;
    let mut bc = p.hello(&b).await;
    let ack = ac
        .send_message(&b.pubkey(), "in flight", "now", None)
        .await
        .must();
    let mid = ack["messageId"].as_str().expect("queued").to_owned();
    let push = bc.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], mid.as_str());
    let sql = format!(
        "SELECT claim_id::text AS claim_id, delivered_at FROM mesh.message_queue WHERE message_id = '{mid}'::uuid"
    );
    let rows = env.rows(&sql).await;
    assert!(
        !rows[0]["claim_id"].is_null(),
        "claimed before SIGTERM: {rows:?}"
    );

    p.sigterm();
    let (code, reason) = bc.expect_close(Duration::from_secs(10)).await.must();
    assert_eq!(code, Some(1001), "close reason {reason:?}");
    let status = p.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "exit status; log:\n{}", p.log());
    let rows = env.rows(&sql).await;
    assert!(
        rows[0]["claim_id"].is_null(),
        "lease released by shutdown: {rows:?}"
    );
    assert!(rows[0]["delivered_at"].is_null(), "{rows:?}");
    let live = env
        .rows("SELECT id FROM mesh.presence WHERE disconnected_at IS NULL")
        .await;
    assert!(live.is_empty(), "presence marked disconnected: {live:?}");
}

#[actix_web::test]
async fn cli_send_and_listen_round_trip() {
    let env = TestEnv::without_broker().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut p = BrokerProcess::spawn(&env.db_url).await;

    let mut listen_args = client_args(&p, &b);
    listen_args[3] = "listen".into();
    let mut listener = Command::new(BIN)
        .args(&listen_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn client listen");
    let stdout = listener.stdout.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut send_args = client_args(&p, &a);
    send_args[3] = "send".into();
    send_args.extend([
        "--to".into(),
        b.pubkey(),
        "--text".into(),
        "hi from the cli".into(),
    ]);
    send_args.extend([
        "--priority".into(),
        "now".into(),
        "--client-message-id".into(),
        "cli-1".into(),
    ]);
    let out = tokio::task::spawn_blocking(move || Command::new(BIN).args(&send_args).output())
        .await
        .unwrap()
        .expect("run client send");
    assert!(
        out.status.success(),
        "client send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ack: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["queued"], true, "{ack}");

    let line = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("client listen printed a line in time")
        .expect("a line");
    let push: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(push["type"], "push", "{push}");
    assert_eq!(push["messageId"], ack["messageId"], "{push}");
    assert_eq!(push["ciphertext"], "hi from the cli", "{push}");
    assert_eq!(push["client_message_id"], "cli-1", "{push}");
    let mid = ack["messageId"].as_str().unwrap().to_owned();
    env.wait_rows(
        &format!("SELECT delivered_at FROM mesh.message_queue WHERE message_id = '{mid}'::uuid"),
        "client listen acked",
        |r| !r.is_empty() && !r[0]["delivered_at"].is_null(),
    )
    .await;

    // A refused send exits non-zero with the ack's error.
    let mut bad_args = client_args(&p, &a);
    bad_args[3] = "send".into();
    bad_args.extend(["--to".into(), "#topic".into(), "--text".into(), "x".into()]);
    let out = tokio::task::spawn_blocking(move || Command::new(BIN).args(&bad_args).output())
        .await
        .unwrap()
        .expect("run client send");
    assert!(!out.status.success(), "a refused send must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("invalid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The listener exits 0 when the broker shuts down (close 1001).
    p.sigterm();
    let status = wait_child(&mut listener, Duration::from_secs(15)).await;
    if status.is_none() {
        let _ = listener.kill();
    }
    let status = status.expect("client listen exits after the broker closes");
    assert!(status.success(), "client listen exit status {status}");
    p.wait_exit(Duration::from_secs(15)).await;
    let _ = Connection::connect(&p.ws_url)
        .await
        .expect_err("broker is gone");
}

/// A broker killed with SIGKILL loses nothing: whatever it pushed without an
/// ack is pushed again by the next broker on the same database once the
/// lease runs out; what was acked is not pushed again.
#[actix_web::test]
async fn a_killed_broker_leaves_unacked_deliveries_to_the_next() {
    let env = TestEnv::without_broker().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut p = BrokerProcess::spawn_with_lease(&env.db_url, "2s").await;
    let hello = |url: String, m: Member| async move {
        meshbroker::client::hello(&url, &m.creds, &Default::default())
            .await
            .must()
            .0
    };
    let mut ac = hello(p.ws_url.clone(), a.clone()).await;
    let mut bc = hello(p.ws_url.clone(), b.clone()).await;
    let acked = ac
        .send_message(&b.pubkey(), "acked", "now", None)
        .await
        .must();
    let first = bc.expect("push", WAIT).await.must();
    bc.ack(&first).await.must();
    env.wait_rows(
        &format!(
            "SELECT delivered_at FROM mesh.message_queue WHERE message_id = '{}'::uuid",
            acked["messageId"].as_str().unwrap()
        ),
        "the first message acked",
        |r| !r[0]["delivered_at"].is_null(),
    )
    .await;
    let pending = ac
        .send_message(&b.pubkey(), "unacked", "now", None)
        .await
        .must();
    let second = bc.expect("push", WAIT).await.must();
    assert_eq!(second["messageId"], pending["messageId"]);

    p.sigkill().await;

    // The next broker, on the same database.
    let config = {
        let mut c = test_config(&env.db_url);
        c.delivery.lease = meshbroker::config::Dur::secs(2);
        std::sync::Arc::new(c)
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let next = meshbroker::broker::start(config, make_pool(&env.db_url, 4).await, listener)
        .await
        .expect("second broker starts");
    let url = format!("ws://{}/ws", next.local_addr());
    let mut bc = hello(url, b.clone()).await;
    let again = bc.expect("push", Duration::from_secs(10)).await.must();
    assert_eq!(again["messageId"], pending["messageId"], "{again}");
    assert_eq!(again["attempt"], 2, "{again}");
    bc.ack(&again).await.must();
    assert_no_push(&mut bc, "bob after the takeover").await;
    next.shutdown().await;
}

/// Admin commands print only their result: with `log.level = "info"` and
/// an embedded cluster to adopt (whose adoption `serve` logs at INFO),
/// `mesh create --json` and `member add --json` write their JSON and
/// nothing else; `-v` brings the log back. The member's secret key then
/// reaches `client send` through a file instead of the command line.
#[actix_web::test]
async fn admin_commands_are_quiet_and_the_client_reads_its_key_from_a_file() {
    let dir = cluster_tempdir("mb-quiet-");
    let data_dir = dir.path().join("d");
    let p =
        BrokerProcess::spawn_embedded(&data_dir, ProcessConfig::new().set("log.level", "\"info\""))
            .await;
    let out = run_cli(
        &p.config_path,
        &["mesh", "create", "--name", "quiet", "--json"],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "no log lines without -v"
    );
    let mesh: serde_json::Value = serde_json::from_slice(&out.stdout).expect("only JSON on stdout");
    let mesh = mesh["id"].as_str().expect("mesh id").to_owned();

    let loud = run_cli(&p.config_path, &["-v", "mesh", "create", "--name", "loud"]).await;
    assert!(loud.status.success());
    assert!(
        String::from_utf8_lossy(&loud.stderr).contains("adopted running cluster"),
        "-v logs as log.level says: {}",
        String::from_utf8_lossy(&loud.stderr)
    );

    let out = run_cli(
        &p.config_path,
        &[
            "member",
            "add",
            "--mesh",
            &mesh,
            "--name",
            "keyholder",
            "--json",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    let member: serde_json::Value = serde_json::from_slice(&out.stdout).expect("only JSON");
    let key_file = dir.path().join("key");
    std::fs::write(
        &key_file,
        format!("{}\n", member["secret_key"].as_str().unwrap()),
    )
    .unwrap();
    let key_path = key_file.display().to_string();
    let member_id = member["id"].as_str().unwrap().to_owned();
    let send = |file: String| {
        let (config, url, mesh, member_id) = (
            p.config_path.clone(),
            p.ws_url.clone(),
            mesh.clone(),
            member_id.clone(),
        );
        async move {
            run_cli(
                &config,
                &[
                    "client",
                    "send",
                    "--url",
                    &url,
                    "--mesh",
                    &mesh,
                    "--member-id",
                    &member_id,
                    "--secret-key-file",
                    &file,
                    "--to",
                    "*",
                    "--text",
                    "from a key file",
                ],
            )
            .await
        }
    };
    let out = send(key_path).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ack: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the ack");
    assert_eq!(ack["queued"], true, "{ack}");
    let out = send(dir.path().join("missing").display().to_string()).await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read --secret-key-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `meshbroker status` reads the cluster from the database: the running
/// node, a live connection by mesh and role, a queued delivery; and after
/// the broker stopped, with no broker at all, the node shown dead.
#[actix_web::test]
async fn status_reads_the_cluster_from_the_database_with_or_without_a_broker() {
    let env = TestEnv::without_broker().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let mut p = BrokerProcess::spawn(&env.db_url).await;
    let (mut ac, _) = meshbroker::client::hello(&p.ws_url, &a.creds, &Default::default())
        .await
        .expect("hello");
    let ack = ac
        .send_message(&b.pubkey(), "waits for bob", "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{ack}");
    let status = |config: std::path::PathBuf| async move {
        let out = run_cli(&config, &["status", "--json"]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("status --json")
    };
    let s = status(p.config_path.clone()).await;
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 1, "{s}");
    assert_eq!(
        (nodes[0]["alive"].as_bool(), nodes[0]["leader"].as_bool()),
        (Some(true), Some(true)),
        "{s}"
    );
    assert_eq!(s["connections"][0]["role"], "control-plane", "{s}");
    assert_eq!(s["connections"][0]["connections"], 1, "{s}");
    assert_eq!(s["queue"]["pending"], 1, "{s}");
    assert!(s["queue"]["oldest_undelivered_s"].as_f64().is_some(), "{s}");

    p.sigterm();
    p.wait_exit(Duration::from_secs(15)).await;
    let s = status(p.config_path.clone()).await;
    assert_eq!(
        s["nodes"][0]["alive"], false,
        "a node that left is shown dead: {s}"
    );
    assert_eq!(s["connections"].as_array().map(Vec::len), Some(0), "{s}");
    assert_eq!(s["queue"]["pending"], 1, "the queue is still there: {s}");
    let text = run_cli(&p.config_path, &["status"]).await;
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("nodes         0 live, 1 dead") && text.contains("1 pending"),
        "{text}"
    );
}

/// Under systemd (`Type=notify`) the broker says READY=1 once migrations
/// ran and it listens, and STOPPING=1 at SIGTERM; SIGHUP (what
/// `systemctl reload` sends) does not stop it (what it reloads: reload.rs).
#[actix_web::test]
async fn it_notifies_systemd_and_survives_sighup() {
    use std::os::unix::net::UnixDatagram;
    let env = TestEnv::without_broker().await;
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut p = BrokerProcess::spawn_with_env(
        &env.db_url,
        vec![("NOTIFY_SOCKET".into(), socket_path.clone().into_os_string())],
    )
    .await;
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).expect("READY=1 from the broker");
    assert_eq!(&buf[..n], b"READY=1");
    assert_eq!(
        http_get(&format!("{}/health/ready", p.http_url)).await.0,
        200
    );

    p.signal(nix::sys::signal::Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        matches!(p.child.try_wait(), Ok(None)),
        "SIGHUP stopped the broker:\n{}",
        p.log()
    );

    p.sigterm();
    let n = socket.recv(&mut buf).expect("STOPPING=1 from the broker");
    assert_eq!(&buf[..n], b"STOPPING=1");
    p.wait_exit(Duration::from_secs(15)).await;
}
