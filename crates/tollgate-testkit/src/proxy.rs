//! A TCP forwarder a test puts between a client and a server so it can cut the link for real:
//! [`TcpProxy::cut`] severs every forwarded connection (both sockets shut down, so both ends see
//! the connection end) and blackholes new ones (accepted, never forwarded, never answered), until
//! [`TcpProxy::heal`] forwards again.
//!
//! Built on `std::net` and one thread per direction of each connection rather than tokio, so the
//! testkit keeps no runtime dependency and the proxy works the same under any test runtime.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::process::TestkitError;

/// How long connecting to the target may take before the accepted connection is dropped.
pub const TARGET_CONNECT_TIMEOUT_MS: u64 = 1_000;
/// Bytes copied per read.
const COPY_BUFFER_BYTES: usize = 16 * 1024;
/// Connections forwarded or blackholed at once; more are dropped as soon as accepted.
pub const CONNECTIONS_MAX: usize = 1_024;

/// A forwarder from a port of 127.0.0.1 to `target`. Dropping it stops accepting and severs
/// every connection.
pub struct TcpProxy {
    listen: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    target: SocketAddr,
    cut: AtomicBool,
    stopped: AtomicBool,
    next_id: AtomicU64,
    /// Live forwarded connections: (id, the client's socket, the target's socket).
    forwarded: Mutex<Vec<(u64, TcpStream, TcpStream)>>,
    /// Connections accepted while cut: held open, never read, closed at heal.
    blackholed: Mutex<Vec<TcpStream>>,
    /// Connections severed by `cut` since the proxy started.
    severed_total: AtomicU64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl TcpProxy {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `target`.
    pub fn start(target: SocketAddr) -> Result<TcpProxy, TestkitError> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let listen = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            cut: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            next_id: AtomicU64::new(0),
            forwarded: Mutex::new(Vec::new()),
            blackholed: Mutex::new(Vec::new()),
            severed_total: AtomicU64::new(0),
        });
        let accepting = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name(format!("proxy {listen} -> {target}"))
            .spawn(move || accept_loop(listener, accepting))
            .map_err(|source| TestkitError::Spawn {
                what: "the proxy's accept thread".into(),
                source,
            })?;
        Ok(TcpProxy {
            listen,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    /// Severs every forwarded connection and blackholes new ones until [`TcpProxy::heal`].
    /// Returns how many connections were severed.
    pub fn cut(&self) -> usize {
        self.shared.cut.store(true, Ordering::SeqCst);
        let severed: Vec<_> = lock(&self.shared.forwarded).drain(..).collect();
        for (_, client, server) in &severed {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
        self.shared
            .severed_total
            .fetch_add(severed.len() as u64, Ordering::SeqCst);
        severed.len()
    }

    /// Forwards new connections again, and closes those blackholed during the cut (their
    /// clients see them end and reconnect).
    pub fn heal(&self) {
        for held in lock(&self.shared.blackholed).drain(..) {
            let _ = held.shutdown(Shutdown::Both);
        }
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Whether the link is cut.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// Connections forwarded right now.
    pub fn connections(&self) -> usize {
        lock(&self.shared.forwarded).len()
    }

    /// Connections accepted and held unanswered during the current cut.
    pub fn blackholed(&self) -> usize {
        lock(&self.shared.blackholed).len()
    }

    /// Connections severed by cuts since the proxy started.
    pub fn severed_total(&self) -> u64 {
        self.shared.severed_total.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.cut();
        self.heal();
        // Wakes the blocking accept so the thread sees `stopped`.
        let _ = TcpStream::connect_timeout(&self.listen, Duration::from_millis(500));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for incoming in listener.incoming() {
        if shared.stopped.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = incoming else { continue };
        if shared.cut.load(Ordering::SeqCst) {
            let mut held = lock(&shared.blackholed);
            if held.len() < CONNECTIONS_MAX {
                held.push(client);
            }
            continue;
        }
        forward(client, &shared);
    }
}

/// Connects to the target and copies both ways on two threads; an unreachable target or a
/// full table drops the client's connection.
fn forward(client: TcpStream, shared: &Arc<Shared>) {
    if lock(&shared.forwarded).len() >= CONNECTIONS_MAX {
        return;
    }
    let timeout = Duration::from_millis(TARGET_CONNECT_TIMEOUT_MS);
    let Ok(server) = TcpStream::connect_timeout(&shared.target, timeout) else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let clones = (
        client.try_clone(),
        server.try_clone(),
        server.try_clone(),
        client.try_clone(),
    );
    let (Ok(client_read), Ok(server_write), Ok(server_read), Ok(client_write)) = clones else {
        return;
    };
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    lock(&shared.forwarded).push((id, client, server));
    for (from, to) in [(client_read, server_write), (server_read, client_write)] {
        let copying = Arc::clone(shared);
        let spawned = std::thread::Builder::new()
            .name(format!("proxy copy {id}"))
            .spawn(move || {
                copy(from, to);
                // One direction ended: end the connection on both sides and forget it.
                let mut forwarded = lock(&copying.forwarded);
                if let Some(at) = forwarded.iter().position(|(i, _, _)| *i == id) {
                    let (_, client, server) = forwarded.swap_remove(at);
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                }
            });
        if spawned.is_err() {
            let _ = lock(&shared.forwarded)
                .iter()
                .find(|(i, _, _)| *i == id)
                .map(|(_, client, _)| client.shutdown(Shutdown::Both));
        }
    }
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buffer = vec![0_u8; COPY_BUFFER_BYTES];
    loop {
        match from.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut write = stream.try_clone().unwrap();
                    let mut read = stream;
                    let _ = std::io::copy(&mut read, &mut write);
                });
            }
        });
        addr
    }

    fn round_trip(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        stream.write_all(b"ping")?;
        let mut answer = [0_u8; 4];
        stream.read_exact(&mut answer)?;
        Ok(answer.to_vec())
    }

    #[test]
    fn a_cut_severs_connections_and_blackholes_new_ones_until_healed() {
        let proxy = TcpProxy::start(echo_server()).unwrap();
        let mut before = TcpStream::connect(proxy.addr()).unwrap();
        before
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert_eq!(round_trip(&mut before).unwrap(), b"ping");

        assert_eq!(proxy.cut(), 1);
        // The severed connection ends: a read sees EOF or an error, never an answer.
        assert!(round_trip(&mut before).is_err());
        let mut during = TcpStream::connect(proxy.addr()).unwrap();
        during
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let error = round_trip(&mut during).unwrap_err();
        assert!(
            matches!(
                error.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "a new connection during the cut hangs unanswered: {error}"
        );

        proxy.heal();
        let mut after = TcpStream::connect(proxy.addr()).unwrap();
        after
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert_eq!(round_trip(&mut after).unwrap(), b"ping");
        assert_eq!(proxy.severed_total(), 1);
    }
}
