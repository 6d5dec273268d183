//! A fault proxy: sits between the service and a dependency (PostgreSQL, Redis, the broker)
//! and, on demand, passes traffic, cuts every connection, blackholes (accepts and holds
//! connections, answers nothing), delays, or resets connections mid-request.

use std::{net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward both ways.
    Pass,
    /// Close every open connection and every new one at once (a crashed peer).
    Cut,
    /// Keep connections open and answer nothing (a blackholed host).
    Blackhole,
    /// Forward each chunk after this delay.
    Delay(Duration),
}

/// A running proxy; dropping it stops accepting.
pub struct ChaosProxy {
    /// Where clients connect instead of the upstream.
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
    /// Bumped by [`ChaosProxy::reset`]: connections open at that moment are reset.
    resets: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl ChaosProxy {
    /// Starts forwarding 127.0.0.1:<random> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        Self::serve(listener, upstream)
    }

    /// Forwards from `listener` (e.g. a fixed port the upstream advertises) to `upstream`.
    pub fn serve(listener: TcpListener, upstream: SocketAddr) -> Self {
        let addr = listener.local_addr().expect("proxy addr");
        let (mode, _) = watch::channel(Mode::Pass);
        let (resets, _) = watch::channel(0u64);
        let (mode_rx, resets_rx) = (mode.subscribe(), resets.subscribe());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else { return };
                tokio::spawn(connection(client, upstream, mode_rx.clone(), resets_rx.clone()));
            }
        });
        Self { addr, mode, resets, task }
    }

    /// Switches what happens to traffic from now on.
    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Kills every open connection and refuses new ones.
    pub fn cut(&self) {
        self.set(Mode::Cut);
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.set(Mode::Pass);
    }

    /// Resets (TCP RST) every connection open now; new ones pass.
    pub fn reset(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

impl Drop for ChaosProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(
    client: TcpStream,
    upstream: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    mut resets: watch::Receiver<u64>,
) {
    resets.mark_unchanged();
    let current = *mode.borrow_and_update();
    match current {
        Mode::Cut => return, // closed at once
        Mode::Blackhole => return hold(client, mode).await,
        _ => {}
    }
    let Ok(server) = TcpStream::connect(upstream).await else { return };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let reset = tokio::select! {
        _ = pump(&mut client_read, &mut server_write, mode.clone()) => false,
        _ = pump(&mut server_read, &mut client_write, mode.clone()) => false,
        _ = mode.wait_for(|m| *m == Mode::Cut) => false,
        _ = resets.changed() => true,
    };
    if reset {
        let _ = client_write.as_ref().set_zero_linger(); // dropping now sends RST, not FIN
    }
}

/// Accepts and holds a connection, reading and discarding whatever arrives, until the
/// proxy stops blackholing (then closes it: the client reconnects).
async fn hold(mut client: TcpStream, mut mode: watch::Receiver<Mode>) {
    let mut sink = [0u8; 4096];
    loop {
        tokio::select! {
            read = client.read(&mut sink) => if matches!(read, Ok(0) | Err(_)) { return },
            _ = mode.wait_for(|m| *m != Mode::Blackhole) => return,
        }
    }
}

/// Copies one direction, obeying the mode for every chunk.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let current = *mode.borrow_and_update();
            match current {
                Mode::Pass => break,
                Mode::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Mode::Cut => return,
                // Swallow: hold the data until the mode changes (never answered).
                Mode::Blackhole => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A peer that accepts connections and never answers (a blackholed host: the connect
/// succeeds, every read waits forever). Dropping it closes everything.
pub struct Blackhole {
    /// Where clients connect.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    /// Starts listening on 127.0.0.1:<random>.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind blackhole");
        let addr = listener.local_addr().expect("blackhole addr");
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket); // kept open, never read or written
            }
        });
        Self { addr, task }
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a Kubernetes ClusterIP Service does without a mesh: each new connection goes to
/// the next upstream in turn; calls on a connection stay with its upstream.
pub struct RoundRobin {
    /// Where clients connect (the "Service").
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl RoundRobin {
    /// Balances connections to 127.0.0.1:<random> over `upstreams`.
    pub async fn start(upstreams: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind balancer");
        let addr = listener.local_addr().expect("balancer addr");
        let task = tokio::spawn(async move {
            for next in 0.. {
                let Ok((mut client, _)) = listener.accept().await else { return };
                let upstream = upstreams[next % upstreams.len()];
                tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { addr, task }
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.task.abort();
    }
}
