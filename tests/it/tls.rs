//! TLS to PostgreSQL and Redis against real TLS endpoints made by the test: a private
//! PostgreSQL cluster (`initdb` into a temporary directory, `ssl=on`) and a TLS-only
//! `redis-server`, each with a CA and a server certificate generated here (openssl).
//! With that CA the service connects (PostgreSQL reports its sessions encrypted; Redis
//! answers its calls); with another CA, PostgreSQL fails startup with an error that says
//! why and no Redis call succeeds.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use orders_service::app::App;

use crate::support::{self, valid_order};

/// Runs a command, panicking with its stderr if it fails.
fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

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

/// The PostgreSQL binaries of the installed server.
fn pg_bin(tool: &str) -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL installed under /usr/lib/postgresql (scripts/services.sh)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(tool)))
        .filter(|p| p.exists())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("no {tool}"))
}

/// As root, PostgreSQL refuses to run: use the `postgres` account then.
fn as_postgres(tool: &str) -> Command {
    let root =
        String::from_utf8(Command::new("id").arg("-u").output().expect("id").stdout).expect("utf-8").trim()
            == "0";
    if root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        command
    } else {
        Command::new(pg_bin(tool))
    }
}

/// A private TLS-only cluster on a free port; stopped (by its PID) when dropped.
struct TlsCluster {
    server: Child,
    data: PathBuf,
    port: u16,
    ca: PathBuf,
    _dir: tempfile::TempDir,
}

impl TlsCluster {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path();
        run(Command::new("chmod").arg("755").arg(base));
        let ca = certificates(base, "good");
        let data = base.join("data");
        std::fs::create_dir(&data).expect("data dir");
        let root = String::from_utf8(Command::new("id").arg("-u").output().expect("id").stdout)
            .expect("utf-8")
            .trim()
            == "0";
        if root {
            run(Command::new("chown").args(["-R", "postgres"]).arg(base));
        }
        run(as_postgres("initdb")
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(&data));
        for (from, to) in [("good-server.crt", "server.crt"), ("good-server.key", "server.key")] {
            std::fs::copy(base.join(from), data.join(to)).expect("copy cert");
        }
        if root {
            run(Command::new("chown")
                .args(["postgres"])
                .arg(data.join("server.crt"))
                .arg(data.join("server.key")));
        }
        run(Command::new("chmod").arg("600").arg(data.join("server.key")));
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        // Only TLS: hostssl for TCP (trust, the certificate is what is tested here).
        std::fs::write(data.join("pg_hba.conf"), "local all all trust\nhostssl all all 127.0.0.1/32 trust\n")
            .expect("hba");
        let server = as_postgres("postgres")
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "ssl=on"])
            .arg("-c")
            .arg(format!("unix_socket_directories={}", base.display()))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("postgres starts");
        let ready = || {
            Command::new(pg_bin("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(std::time::Instant::now() < deadline, "the TLS cluster did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { server, data, port, ca, _dir: dir }
    }

    fn url(&self, ca: &Path) -> String {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
            self.port,
            ca.display()
        )
    }
}

impl Drop for TlsCluster {
    fn drop(&mut self) {
        // Stop the server itself (a signal to runuser would not reach it), then reap the child.
        let _ = as_postgres("pg_ctl")
            .args(["stop", "-s", "-m", "immediate", "-D"])
            .arg(&self.data)
            .stdout(std::process::Stdio::null())
            .status();
        let _ = self.server.wait();
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
    server: Child,
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
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { server, port, ca, _dir: dir }
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// `redis_call_duration_seconds_count` for one operation and outcome, from a scrape.
fn redis_calls(scrape: &str, outcome: &str) -> u64 {
    let prefix =
        format!("redis_call_duration_seconds_count{{operation=\"SET NX GET\",outcome=\"{outcome}\"}} ");
    scrape.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().expect("count"))
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
