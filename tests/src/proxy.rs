//! A TCP proxy that plays a bad network between agents and a controller: it forwards,
//! delays every chunk by a set latency, or cuts every connection and refuses new ones.
//! It works below TLS, so the two ends see exactly what a flaky field link does to them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// What the link does now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes pass as they come.
    Up,
    /// Every chunk arrives this much later (each direction).
    Delayed(Duration),
    /// Open connections are cut; new ones are closed as soon as they arrive.
    Down,
}

struct Shared {
    target: SocketAddr,
    link: Mutex<Link>,
    open: Mutex<Vec<TcpStream>>,
    stopped: AtomicBool,
    accepted: AtomicU64,
}

/// The proxy; stops when dropped.
pub struct FlakyProxy {
    shared: Arc<Shared>,
    /// Where agents connect.
    pub addr: SocketAddr,
}

impl FlakyProxy {
    /// A proxy on a fresh loopback port forwarding to `target`, link up.
    pub fn start(target: SocketAddr) -> FlakyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            target,
            link: Mutex::new(Link::Up),
            open: Mutex::default(),
            stopped: AtomicBool::new(false),
            accepted: AtomicU64::new(0),
        });
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stopped.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = client else { continue };
                accepting.accepted.fetch_add(1, Ordering::Relaxed);
                if *accepting.link.lock().expect("link lock") == Link::Down {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(accepting.target) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                forward(&accepting, &client, &server);
                forward(&accepting, &server, &client);
            }
        });
        FlakyProxy { shared, addr }
    }

    /// Changes what the link does; [`Link::Down`] also cuts every open connection.
    pub fn set(&self, link: Link) {
        *self.shared.link.lock().expect("link lock") = link;
        if link == Link::Down {
            for stream in self.shared.open.lock().expect("open lock").drain(..) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Connections accepted so far (including refused ones).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FlakyProxy {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        self.set(Link::Down);
        // Wake the accept loop so it sees the stop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` on two threads (a reader and a writer that holds each chunk for
/// the link's delay at the time it was read).
fn forward(shared: &Arc<Shared>, from: &TcpStream, to: &TcpStream) {
    let (Ok(mut reader), Ok(mut writer)) = (from.try_clone(), to.try_clone()) else {
        return;
    };
    if let Ok(kept) = from.try_clone() {
        shared.open.lock().expect("open lock").push(kept);
    }
    let (chunks, due) = mpsc::channel::<(Instant, Vec<u8>)>();
    let link = shared.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let delay = match *link.link.lock().expect("link lock") {
                Link::Delayed(delay) => delay,
                Link::Up => Duration::ZERO,
                Link::Down => break,
            };
            if chunks
                .send((Instant::now() + delay, buf[..n].to_vec()))
                .is_err()
            {
                break;
            }
        }
        let _ = reader.shutdown(Shutdown::Both);
    });
    std::thread::spawn(move || {
        for (at, chunk) in due {
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = writer.shutdown(Shutdown::Both);
    });
}
