//! `[server.tls]`: the real executable serves `wss://` and `https://` on one
//! listener with a certificate the test makes, and SIGHUP swaps in a new
//! certificate without dropping the connections already open.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};

use crate::broker_process::*;
use crate::support::*;

/// One authority for the whole test binary: what `wss://` trusts is
/// process-wide (`meshbroker::client::trust`).
struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "meshbroker test CA");
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let pem_path = dir.path().join("ca.pem");
        std::fs::write(&pem_path, cert.pem()).unwrap();
        meshbroker::client::trust(&pem_path).unwrap();
        TestCa {
            cert,
            key,
            pem_path,
            _dir: dir,
        }
    })
}

/// A certificate for 127.0.0.1 and localhost signed by [`ca`], written to
/// `cert` and `key`; returns its DER.
fn issue(common_name: &str, cert: &Path, key: &Path) -> CertificateDer<'static> {
    let ca = ca();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = params.signed_by(&leaf_key, &ca.cert, &ca.key).unwrap();
    std::fs::write(cert, leaf.pem()).unwrap();
    std::fs::write(key, leaf_key.serialize_pem()).unwrap();
    leaf.der().clone()
}

/// The certificate a fresh TLS handshake with `addr` is shown (a plain
/// rustls client, off the runtime's thread).
async fn presented(addr: String) -> CertificateDer<'static> {
    let config = meshbroker::tls::client_config(Some(&ca().pem_path)).unwrap();
    actix_web::rt::task::spawn_blocking(move || {
        let mut tcp = TcpStream::connect(&addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = rustls::ClientConnection::new(Arc::clone(&config), name).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).expect("TLS handshake");
        }
        tls.peer_certificates().expect("a certificate")[0].clone()
    })
    .await
    .unwrap()
}

#[actix_web::test]
async fn wss_and_https_on_one_listener_and_sighup_swaps_the_certificate() {
    let env = TestEnv::without_broker().await;
    let a = env.member("alice").await;
    let b = env.member("bob").await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first = issue("first", &cert, &key);
    let mut p = BrokerProcess::spawn_config(
        &env.db_url,
        ProcessConfig::new()
            // The reload's report is an INFO line.
            .set("log.level", "\"info\"")
            .set("server.tls.cert", &format!("{cert:?}"))
            .set("server.tls.key", &format!("{key:?}")),
    )
    .await;
    assert!(p.ws_url.starts_with("wss://"), "{}", p.ws_url);
    let addr = p.ws_url["wss://".len()..]
        .trim_end_matches("/ws")
        .to_owned();

    // https:// on the same listener as wss://.
    let (status, body) = http_get(&format!("{}/health", p.http_url)).await;
    assert_eq!(status, 200, "{body}");
    // The status page and what it polls, over https:// too.
    for path in ["/status", "/status.json"] {
        let (status, body) = http_get(&format!("{}{path}", p.http_url)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    // Plain WebSocket to the TLS port gets no handshake.
    let plain = format!("ws://{addr}/ws");
    assert!(
        meshbroker::client::Connection::connect(&plain)
            .await
            .is_err(),
        "a plain ws:// connection to the TLS listener must fail"
    );

    let mut ac = p.hello(&a).await;
    let mut bc = p.hello(&b).await;
    round_trip(&mut ac, &mut bc, &b, "before the swap").await;
    assert_eq!(presented(addr.clone()).await, first);

    // Renewal: new files under the same names, then SIGHUP.
    let second = issue("second", &cert, &key);
    assert_ne!(first, second);
    let log = p.sighup_until("TLS certificate re-read").await;
    assert!(!log.contains("not reloaded"), "{log}");
    assert_eq!(
        presented(addr.clone()).await,
        second,
        "new handshakes see the new certificate"
    );
    round_trip(
        &mut ac,
        &mut bc,
        &b,
        "after the swap, on the old connections",
    )
    .await;
    let mut cc = p.hello(&a).await;
    round_trip(
        &mut cc,
        &mut bc,
        &b,
        "on a connection opened after the swap",
    )
    .await;

    // A broken certificate file: the swap is refused and said why; the
    // listener keeps presenting the last good one.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let log = p.sighup_until("not reloaded").await;
    assert!(
        log.contains("server.tls.cert") && log.contains(&cert.display().to_string()),
        "the refusal names the file:\n{log}"
    );
    assert_eq!(presented(addr.clone()).await, second);
    round_trip(&mut ac, &mut bc, &b, "after a refused reload").await;
    p.sigterm();
    p.wait_exit(Duration::from_secs(15)).await;
}

async fn round_trip(
    from: &mut meshbroker::client::Connection,
    to: &mut meshbroker::client::Connection,
    recipient: &Member,
    when: &str,
) {
    let ack = from
        .send_message(&recipient.pubkey(), when, "now", None)
        .await
        .must();
    assert_eq!(ack["queued"], true, "{when}: {ack}");
    let push = to.expect("push", WAIT).await.must();
    assert_eq!(push["messageId"], ack["messageId"], "{when}");
    to.ack(&push).await.must();
}

/// A certificate that does not load stops the start with a line naming
/// the file, before anything listens.
#[actix_web::test]
async fn a_missing_certificate_stops_the_start_and_names_the_file() {
    let env = TestEnv::without_broker().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("meshbroker.toml");
    let missing = dir.path().join("missing.pem");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = {missing:?}, key = {missing:?} }}\n\
             [database]\nurl = {:?}\n",
            env.db_url
        ),
    )
    .unwrap();
    let log = dir.path().join("serve.log");
    let mut child = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env_remove("MESHBROKER_DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let status = wait_child(&mut child, Duration::from_secs(30)).await;
    let _ = child.kill();
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.is_some_and(|s| !s.success()),
        "serve must exit with an error ({status:?}):\n{stderr}"
    );
    assert!(
        stderr.contains("server.tls.cert") && stderr.contains(&missing.display().to_string()),
        "{stderr}"
    );
}
