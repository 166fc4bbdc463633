//! TLS for real: RabbitMQ (`amqps://`), the PostgreSQL store (`sslmode=require`) and the
//! Redis store (`rediss://`), each reached through a TLS-terminating proxy this test starts in
//! front of the local plain server, with a throwaway CA made by rcgen. Each connects when
//! trusting that CA (`*.tls_ca_file`), refuses another CA (and the system's roots) with an
//! error that names the key, and never shows the URL's password. A CA file that is missing or
//! holds no certificate fails at start, naming its key.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls::{pki_types::PrivatePkcs8KeyDer, ServerConfig};
use sluice::Settings;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A throwaway CA and a server certificate it signed for `localhost` and `127.0.0.1`.
struct Pki {
    ca_pem: String,
    server: Arc<ServerConfig>,
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, format!("Sluice throwaway CA {name}"));
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let server =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
            )
            .unwrap();
    Pki {
        ca_pem: ca.pem(),
        server: Arc::new(server),
    }
}

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// Terminates TLS on a loopback port and forwards the plain bytes to `upstream`. PostgreSQL
/// asks for TLS in its own protocol first (SSLRequest, answered `S`); the others start with
/// the handshake.
struct TlsProxy {
    addr: SocketAddr,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    async fn start(upstream: &str, server: Arc<ServerConfig>, postgres: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (acceptor, upstream) = (acceptor.clone(), upstream.clone());
                tokio::spawn(async move {
                    if postgres {
                        let mut req = [0u8; 8];
                        if inbound.read_exact(&mut req).await.is_err() || req != SSL_REQUEST {
                            return; // a client that did not ask for TLS gets nothing
                        }
                        if inbound.write_all(b"S").await.is_err() {
                            return;
                        }
                    }
                    // A client that rejects the certificate ends the handshake here.
                    let Ok(mut tls) = acceptor.accept(inbound).await else {
                        return;
                    };
                    if let Ok(mut up) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                    }
                });
            }
        });
        Self { addr, accept }
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

fn assert_refused(err: &str, key: &str, password: &str) {
    eprintln!("refused as: {err}");
    assert!(err.contains(key), "the error names {key}: {err}");
    assert!(
        err.contains("certificate") || err.contains("UnknownIssuer"),
        "the error says the certificate was refused: {err}"
    );
    assert!(!err.contains(password), "the password leaked: {err}");
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn postgres_store_over_tls_trusts_its_ca_file_and_refuses_another_ca_without_showing_the_password(
) {
    use sluice::store::postgres::PostgresStore;
    let (good, other) = (pki("pg"), pki("other"));
    let upstream = sluice_tests::postgres_url();
    let upstream = upstream
        .split('@')
        .nth(1)
        .and_then(|h| h.split('/').next())
        .unwrap()
        .to_owned();
    let proxy = TlsProxy::start(&upstream, good.server.clone(), true).await;
    // The local server trusts every local user: the password is there to be hidden.
    let url = format!(
        "postgres://root:pg-secret-pw@127.0.0.1:{}/test?sslmode=require",
        proxy.addr.port()
    );
    PostgresStore::open_with_ca(&url, 1024, Some(&good.ca_pem))
        .await
        .expect("connects through TLS trusting the right CA");
    // The client for a function's own set-up statements takes the same settings.
    let mut store = sluice::config::StoreSettings {
        url: url.clone(),
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &good.ca_pem).unwrap();
    store.tls_ca_file = Some(ca_file);
    let client = sluice::store::postgres::connect(&store).await.unwrap();
    let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    let wrong = PostgresStore::open_with_ca(&url, 1024, Some(&other.ca_pem))
        .await
        .err()
        .expect("another CA is refused")
        .to_string();
    assert_refused(&wrong, "store.tls_ca_file", "pg-secret-pw");
    let system = PostgresStore::open_with_ca(&url, 1024, None)
        .await
        .err()
        .expect("the system's roots do not sign a throwaway CA")
        .to_string();
    assert_refused(&system, "store.tls_ca_file", "pg-secret-pw");
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn redis_store_over_rediss_trusts_its_ca_file_and_refuses_another_ca_without_showing_the_password(
) {
    use sluice::store::redis::RedisStore;
    let (good, other) = (pki("redis"), pki("other"));
    let upstream = sluice_tests::redis_url();
    let upstream = upstream
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let proxy = TlsProxy::start(&upstream, good.server.clone(), false).await;
    let url = format!("rediss://127.0.0.1:{}/0", proxy.addr.port());
    RedisStore::open_with_ca(&url, 1024, Some(&good.ca_pem))
        .await
        .expect("connects through TLS trusting the right CA");
    // With a password in the URL (never sent: the handshake fails first).
    let secret_url = format!(
        "rediss://:redis-secret-pw@127.0.0.1:{}/0",
        proxy.addr.port()
    );
    let wrong = tokio::time::timeout(
        Duration::from_secs(30),
        RedisStore::open_with_ca(&secret_url, 1024, Some(&other.ca_pem)),
    )
    .await
    .expect("refused promptly")
    .err()
    .expect("another CA is refused")
    .to_string();
    assert_refused(&wrong, "store.tls_ca_file", "redis-secret-pw");
}

#[cfg(feature = "rabbitmq")]
#[tokio::test]
async fn rabbitmq_over_amqps_trusts_its_ca_file_and_refuses_another_ca_without_showing_the_password(
) {
    use sluice::{
        transport::{
            rabbitmq::{RabbitConfig, RabbitTransport},
            TransportOptions,
        },
        OutgoingMessage, Transport,
    };
    let (good, other) = (pki("amqp"), pki("other"));
    let base = sluice_tests::rabbit::url();
    let (userinfo, rest) = base.trim_start_matches("amqp://").split_once('@').unwrap();
    let upstream = rest.split('/').next().unwrap().to_owned();
    let proxy = TlsProxy::start(&upstream, good.server.clone(), false).await;
    let url = format!("amqps://{userinfo}@127.0.0.1:{}/%2f", proxy.addr.port());
    let opts = TransportOptions {
        queue: sluice::conformance::unique("tls"),
        function: "tls-test".into(),
        url: url.clone(),
        lease: Duration::from_secs(30),
        max_deliveries: 5,
        poll_interval: Duration::from_millis(50),
        declare: true,
    };
    let config = |ca: &str| RabbitConfig {
        tls_ca_pem: Some(ca.to_owned()),
        queue_expires: Some(sluice_tests::rabbit::TEST_QUEUE_EXPIRES),
        ..RabbitConfig::default()
    };
    let t = RabbitTransport::open_with(opts.clone(), config(&good.ca_pem))
        .await
        .expect("connects through TLS trusting the right CA");
    t.publish(vec![OutgoingMessage::new("over TLS")])
        .await
        .unwrap();
    assert_eq!(t.stats().await.unwrap().ready, 1);
    drop(t);

    let wrong = tokio::time::timeout(
        Duration::from_secs(60),
        RabbitTransport::open_with(opts, config(&other.ca_pem)),
    )
    .await
    .expect("refused without retrying for ever")
    .err()
    .expect("another CA is refused")
    .to_string();
    eprintln!("refused as: {wrong}");
    assert!(wrong.contains("transport.tls_ca_file"), "{wrong}");
    assert!(wrong.contains("TLS handshake"), "{wrong}");
    assert!(!wrong.contains(userinfo), "the password leaked: {wrong}");
}

#[test]
fn a_ca_file_that_is_missing_or_holds_no_certificate_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    for key in ["store.tls_ca_file", "transport.tls_ca_file"] {
        for (path, why) in [
            (dir.path().join("missing.pem"), "cannot read"),
            (not_pem.clone(), "holds no PEM certificate"),
        ] {
            let err = Settings::load(
                "t",
                None,
                std::iter::empty(),
                &[format!("{key}={}", path.display())],
            )
            .err()
            .unwrap_or_else(|| panic!("{key}={} was accepted", path.display()))
            .to_string();
            assert!(
                err.contains(&format!("`{key}`")) && err.contains(why),
                "{err}"
            );
        }
    }
}
