//! A private PostgreSQL cluster (`initdb` into a temporary directory, on a free port) for
//! tests that must do to the server what they may not do to the shared one: make it
//! TLS-only, or restart it in the middle of a load.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Runs a command, panicking with its stderr if it fails.
pub fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

fn is_root() -> bool {
    String::from_utf8(Command::new("id").arg("-u").output().expect("id").stdout).expect("utf-8").trim() == "0"
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
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        command
    } else {
        Command::new(pg_bin(tool))
    }
}

/// A private cluster; stopped (by `pg_ctl`, which reaches the server itself) when dropped.
pub struct PgCluster {
    server: Option<Child>,
    base: tempfile::TempDir,
    /// The TCP port it listens on (127.0.0.1).
    pub port: u16,
    tls: bool,
}

impl PgCluster {
    /// Plain TCP, trust authentication.
    pub fn start() -> Self {
        Self::init(None)
    }

    /// TLS only (`hostssl`), presenting this certificate and key.
    pub fn start_tls(certificate: &Path, key: &Path) -> Self {
        Self::init(Some((certificate, key)))
    }

    fn init(tls: Option<(&Path, &Path)>) -> Self {
        let base = tempfile::tempdir().expect("tempdir");
        run(Command::new("chmod").arg("755").arg(base.path()));
        let data = base.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        if is_root() {
            run(Command::new("chown").args(["-R", "postgres"]).arg(base.path()));
        }
        run(as_postgres("initdb")
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(&data));
        let hba = if let Some((certificate, key)) = tls {
            for (from, to) in [(certificate, "server.crt"), (key, "server.key")] {
                std::fs::copy(from, data.join(to)).expect("copy certificate");
                if is_root() {
                    run(Command::new("chown").arg("postgres").arg(data.join(to)));
                }
            }
            run(Command::new("chmod").arg("600").arg(data.join("server.key")));
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
        } else {
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        };
        std::fs::write(data.join("pg_hba.conf"), hba).expect("hba");
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let mut cluster = Self { server: None, base, port, tls: tls.is_some() };
        cluster.launch();
        cluster
    }

    fn data(&self) -> PathBuf {
        self.base.path().join("data")
    }

    /// Starts the server and waits until it accepts connections.
    fn launch(&mut self) {
        let mut command = as_postgres("postgres");
        command.arg("-D").arg(self.data());
        command.args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1"]);
        command.arg("-c").arg(format!("unix_socket_directories={}", self.base.path().display()));
        if self.tls {
            command.args(["-c", "ssl=on"]);
        }
        let server = command.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("postgres starts");
        self.server = Some(server);
        let port = self.port.to_string();
        let ready = || {
            Command::new(pg_bin("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &port])
                .status()
                .is_ok_and(|s| s.success())
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(Instant::now() < deadline, "the private cluster did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (`fast`: sessions are terminated, as in a managed failover or a
    /// rolling upgrade) and reaps it.
    fn stop(&mut self, mode: &str) {
        let _ = as_postgres("pg_ctl")
            .args(["stop", "-s", "-m", mode, "-D"])
            .arg(self.data())
            .stdout(Stdio::null())
            .status();
        if let Some(mut server) = self.server.take() {
            let _ = server.wait();
        }
    }

    /// Restarts the server: every session is cut, and new ones are refused until it is up.
    pub fn restart(&mut self) {
        self.stop("fast");
        self.launch();
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (plain clusters).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop("immediate");
    }
}
