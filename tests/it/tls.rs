//! TLS to every dependency against real TLS endpoints made by the test: a private
//! PostgreSQL cluster (`initdb` into a temporary directory, `ssl=on`), a TLS-only
//! `redis-server`, a private tansu broker behind a TLS terminator (socat) that it
//! advertises, and a JWKS served over HTTPS (`openssl s_server`), each with a CA and a
//! server certificate generated here (openssl). With that CA the service connects; with
//! another CA it does not (startup fails saying why, or no call succeeds).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use orders_service::app::App;

use crate::{
    cluster::{PgCluster, run},
    kafka,
    support::{self, Reaped, valid_order},
};

/// A CA, and a server certificate it signed for `localhost` and 127.0.0.1.
fn certificates(dir: &Path, name: &str) -> PathBuf {
    let path = |file: &str| dir.join(format!("{name}-{file}")).to_string_lossy().into_owned();
    run(Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj"])
        .arg(format!("/CN={name} test CA"))
        .args(["-keyout", &path("ca.key"), "-out", &path("ca.crt")]));
    run(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"])
        .args(["-keyout", &path("server.key"), "-out", &path("server.csr")]));
    std::fs::write(path("ext.cnf"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").expect("ext");
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-in", &path("server.csr"), "-CA", &path("ca.crt")])
        .args([
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-extfile",
            &path("ext.cnf"),
            "-out",
            &path("server.crt"),
        ]));
    dir.join(format!("{name}-ca.crt"))
}

/// A private TLS-only cluster with a certificate from a CA made here.
struct TlsCluster {
    cluster: PgCluster,
    ca: PathBuf,
    _certificates: tempfile::TempDir,
}

impl TlsCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = certificates(dir.path(), "good");
        let file = |name: &str| dir.path().join(name);
        let cluster = PgCluster::start_tls(&file("good-server.crt"), &file("good-server.key"));
        Self { cluster, ca, _certificates: dir }
    }

    fn url(&self, ca: &Path) -> String {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            self.cluster.port,
            ca.display()
        )
    }
}

#[tokio::test]
async fn verify_full_with_the_private_ca_connects_encrypted() {
    let cluster = TlsCluster::start();
    let app = support::TestApp::start_on(cluster.url(&cluster.ca), &[]).await;
    let created = app.create(&valid_order()).await;
    assert_eq!(created.status(), 201);
    // The server's view: every session of the service is encrypted.
    let mut db =
        <sqlx::PgConnection as sqlx::Connection>::connect(&cluster.url(&cluster.ca)).await.expect("connect");
    let (plain, encrypted): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE NOT s.ssl), count(*) FILTER (WHERE s.ssl)
           FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
          WHERE a.application_name LIKE 'orders-service/%'",
    )
    .fetch_one(&mut db)
    .await
    .expect("pg_stat_ssl");
    assert_eq!(plain, 0);
    assert!(encrypted >= 1, "the service's sessions use TLS");
}

#[tokio::test]
async fn another_ca_fails_startup_with_a_clear_error() {
    let cluster = TlsCluster::start();
    let other = tempfile::tempdir().expect("tempdir");
    let wrong_ca = certificates(other.path(), "other");
    let err = match App::build(support::settings(&cluster.url(&wrong_ca), &[])).await {
        Ok(_) => panic!("connected with a CA that did not sign the server's certificate"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{err}");
}

/// A Redis that speaks only TLS, with a certificate from a CA made here; killed (by PID)
/// when dropped.
struct TlsRedis {
    _server: Reaped,
    port: u16,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = certificates(dir.path(), "redis");
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let file = |name: &str| dir.path().join(name);
        let server = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(file("redis-server.crt"))
            .arg("--tls-key-file")
            .arg(file("redis-server.key"))
            .arg("--tls-ca-cert-file")
            .arg(&ca)
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts");
        support::until_listening(port, "redis-server");
        Self { _server: Reaped(server), port, ca, _dir: dir }
    }
}

/// `redis_call_duration_seconds_count` for one operation and outcome, from a scrape.
fn redis_calls(scrape: &str, outcome: &str) -> u64 {
    let series =
        format!("redis_call_duration_seconds_count{{operation=\"SET NX GET\",outcome=\"{outcome}\"}}");
    support::sample(scrape, &series).map_or(0, |v| v as u64)
}

#[tokio::test]
async fn rediss_with_the_private_ca_carries_the_idempotency_keys_and_another_ca_is_refused() {
    let redis = TlsRedis::start();
    let url = format!("rediss://localhost:{}", redis.port);
    let ca = redis.ca.to_string_lossy().into_owned();
    let app =
        support::TestApp::spawn_configured(&[("APP_REDIS__URL", &url), ("APP_REDIS__CA_FILE", &ca)]).await;
    for _ in 0..2 {
        assert_eq!(app.create_with_key(&valid_order(), "tls-1").await.status(), 201);
    }
    let scrape = app.metrics().await;
    assert!(redis_calls(&scrape, "ok") >= 2, "Redis answered over TLS:\n{scrape}");
    assert_eq!(redis_calls(&scrape, "error"), 0);

    // A CA that did not sign the server's certificate: every call fails (the database
    // backstop keeps creates exactly-once meanwhile).
    let other = tempfile::tempdir().expect("tempdir");
    let wrong = certificates(other.path(), "other").to_string_lossy().into_owned();
    let app =
        support::TestApp::spawn_configured(&[("APP_REDIS__URL", &url), ("APP_REDIS__CA_FILE", &wrong)]).await;
    assert_eq!(app.create_with_key(&valid_order(), "tls-2").await.status(), 201);
    let scrape = app.metrics().await;
    assert_eq!(redis_calls(&scrape, "ok"), 0, "no call may succeed with the wrong CA");
}

/// A private tansu broker reachable only through a TLS terminator (socat): tansu advertises
/// the terminator's port, so bootstrap and every later connection to the partition leader
/// are TLS. Both are stopped (by PID) when dropped.
struct TlsBroker {
    _terminator: Reaped,
    _broker: kafka::PrivateBroker,
    /// `127.0.0.1:<TLS port>`.
    addr: String,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsBroker {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = certificates(dir.path(), "kafka");
        let (plain, tls) = (kafka::free_port(), kafka::free_port());
        assert_ne!(plain, tls);
        let broker = kafka::PrivateBroker::start_advertising(plain, tls).await;
        let file = |name: &str| dir.path().join(name).display().to_string();
        let terminator = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{tls},bind=127.0.0.1,reuseaddr,fork,verify=0,cert={},key={}",
                file("kafka-server.crt"),
                file("kafka-server.key")
            ))
            .arg(format!("TCP:127.0.0.1:{plain}"))
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("socat starts (scripts/services.sh installs it)");
        let addr = format!("127.0.0.1:{tls}");
        support::eventually(Duration::from_secs(10), "the TLS terminator to listen", || {
            let addr = addr.clone();
            async move { tokio::net::TcpStream::connect(&addr).await.is_ok() }
        })
        .await;
        Self { _terminator: Reaped(terminator), _broker: broker, addr, ca, _dir: dir }
    }

    /// librdkafka settings for TLS with `ca`.
    fn properties(ca: &Path) -> Vec<(String, String)> {
        vec![("security.protocol".into(), "ssl".into()), ("ssl.ca.location".into(), ca.display().to_string())]
    }
}

/// A counter's value from a scrape (0 when absent).
fn counter(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn kafka_over_tls_with_the_private_ca_carries_the_events_and_another_ca_is_refused() {
    let broker = TlsBroker::start().await;
    let topic = format!("orders.events.tls-{}", uuid::Uuid::now_v7().simple());
    let relay = |ca: &Path| {
        let properties: Vec<String> =
            TlsBroker::properties(ca).iter().map(|(k, v)| format!("{k}={v}")).collect();
        vec![
            ("APP_ROLES", "api,relay".to_owned()),
            ("APP_KAFKA__BROKERS", broker.addr.clone()),
            ("APP_KAFKA__PROPERTIES", properties.join(";")),
            ("APP_KAFKA__TOPIC_PARTITIONS", kafka::TOPIC_PARTITIONS.to_string()),
            ("APP_KAFKA__TOPIC_REPLICATION", "1".into()),
            ("APP_KAFKA__MESSAGE_TIMEOUT_MS", "2000".into()),
            ("APP_EVENTS__TOPIC", topic.clone()),
        ]
    };
    let spawn = |config: Vec<(&'static str, String)>| async move {
        let config: Vec<(&str, &str)> = config.iter().map(|(k, v)| (*k, v.as_str())).collect();
        support::TestApp::spawn_configured(&config).await
    };

    // The service creates the topic and publishes over TLS; a reader over TLS gets the event.
    let app = spawn(relay(&broker.ca)).await;
    let id = app.create_ok().await["id"].as_str().expect("id").to_owned();
    let records = kafka::read_with(
        &broker.addr,
        &TlsBroker::properties(&broker.ca),
        &topic,
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(records.len(), 1, "the event arrived over TLS");
    assert_eq!(records[0].key, id);
    drop(app);

    // A CA that did not sign the broker's certificate: nothing is published, the relay
    // counts failed attempts, and the order waits in the outbox.
    let other = tempfile::tempdir().expect("tempdir");
    let wrong = certificates(other.path(), "other");
    let app = spawn(relay(&wrong)).await;
    assert_eq!(app.create(&valid_order()).await.status(), 201, "writes still land in the outbox");
    support::eventually(Duration::from_secs(30), "failed publish attempts", || async {
        counter(&app.metrics().await, "outbox_publish_errors_total") >= 1.0
    })
    .await;
    let scrape = app.metrics().await;
    assert_eq!(counter(&scrape, "outbox_published_total"), 0.0, "nothing passed an unverified broker");
    let records =
        kafka::read_with(&broker.addr, &TlsBroker::properties(&broker.ca), &topic, 2, Duration::from_secs(3))
            .await;
    assert_eq!(records.len(), 1, "only the first event is on the topic");
}

/// SASL over TLS: PLAIN, SCRAM-SHA-256/512 and OAUTHBEARER are in this build (librdkafka
/// with OpenSSL). tansu has no SASL, so against it the handshake after TLS fails: the
/// configuration path is tested as far as it goes, and the password never appears in what
/// the settings print.
#[tokio::test]
async fn sasl_mechanisms_are_built_in_and_their_password_is_never_printed() {
    use orders_service::publish::{KafkaPublisher, OutboundMessage, Publisher};
    let broker = TlsBroker::start().await;
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] {
        let mut settings = kafka::settings(&broker.addr);
        settings.properties = vec![
            ("security.protocol".into(), "SASL_SSL".into()),
            ("ssl.ca.location".into(), broker.ca.display().to_string()),
            ("sasl.mechanism".into(), mechanism.into()),
        ];
        if mechanism != "OAUTHBEARER" {
            settings.properties.push(("sasl.username".into(), "orders".into()));
            settings.properties.push(("sasl.password".into(), "hunter2-secret".into()));
        } else {
            // librdkafka's built-in unsecured JWT: a real deployment uses its OIDC method.
            settings.properties.push(("enable.sasl.oauthbearer.unsecure.jwt".into(), "true".into()));
            settings.properties.push(("sasl.oauthbearer.config".into(), "principal=orders".into()));
        }
        assert!(!format!("{settings:?}").contains("hunter2"), "{settings:?}");
        let publisher = KafkaPublisher::new(&settings).unwrap_or_else(|e| panic!("{mechanism}: {e:#}"));
        let message = OutboundMessage {
            topic: "orders.events.sasl".into(),
            key: "o-1".into(),
            payload: b"{}".to_vec(),
            headers: Vec::new(),
        };
        let results = publisher.publish(vec![message]).await;
        assert!(results[0].is_err(), "{mechanism}: tansu cannot authenticate, so nothing is delivered");
    }
}

/// Serves the files of `dir` over HTTPS (`openssl s_server -WWW`) on a free port; killed
/// (by PID) when dropped.
struct HttpsFiles {
    _server: Reaped,
    port: u16,
}

impl HttpsFiles {
    async fn start(dir: &Path, name: &str) -> Self {
        let port = kafka::free_port();
        let file = |suffix: &str| dir.join(format!("{name}-{suffix}"));
        let server = Command::new("openssl")
            .args(["s_server", "-quiet", "-WWW", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-cert")
            .arg(file("server.crt"))
            .arg("-key")
            .arg(file("server.key"))
            .current_dir(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("openssl s_server starts");
        support::eventually(Duration::from_secs(10), "the HTTPS server to listen", || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        Self { _server: Reaped(server), port }
    }
}

#[tokio::test]
async fn a_jwks_over_https_with_the_private_ca_verifies_tokens_and_another_ca_fails_startup() {
    use crate::auth::{AUDIENCE, ISSUER, create, es256, jwks, token};
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = certificates(dir.path(), "idp");
    let key = es256("https-1");
    std::fs::write(dir.path().join("jwks.json"), jwks(&[&key])).expect("jwks");
    let server = HttpsFiles::start(dir.path(), "idp").await;
    let url = format!("https://localhost:{}/jwks.json", server.port);
    let auth = |ca: &Path| {
        vec![
            ("APP_AUTH__ENABLED", "true".to_owned()),
            ("APP_AUTH__JWKS_URL", url.clone()),
            ("APP_AUTH__JWKS_CA_FILE", ca.display().to_string()),
            ("APP_AUTH__ISSUER", ISSUER.to_owned()),
            ("APP_AUTH__AUDIENCE", AUDIENCE.to_owned()),
        ]
    };
    let config = auth(&ca);
    let config: Vec<(&str, &str)> = config.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let app = support::TestApp::spawn_configured(&config).await;
    let bearer = token(&key, "alice", "orders:write", |_| {});
    assert_eq!(create(&app, Some(&bearer), "https-jwks").await.status(), 201);
    assert_eq!(create(&app, None, "https-jwks-none").await.status(), 401);

    let other = tempfile::tempdir().expect("tempdir");
    let wrong = certificates(other.path(), "other");
    let config = auth(&wrong);
    let config: Vec<(&str, &str)> = config.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let database = support::fresh_postgres().await;
    let err = match App::build(support::settings(&database, &config)).await {
        Ok(_) => panic!("fetched a JWKS from a server that the configured CA did not sign"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("APP_AUTH__JWKS_URL"), "{err}");
}
