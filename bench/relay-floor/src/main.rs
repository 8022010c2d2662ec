//! The floor under any Postgres proxy on this machine: how long a 64-byte
//! request/response takes over loopback TCP, straight and through a relay that
//! does nothing but copy bytes, with each way a relay can wait for a socket.
//!
//! `relay-floor run ROUNDS N` starts an echo server (a stand-in for Postgres,
//! one thread per connection) and one relay of each kind, then, round after
//! round, times N round trips of one client through each (interleaved, so noise
//! hits them alike) and prints the median round trip per kind and its added
//! time over the direct one. See docs/benchmarks.md ("the floor under a proxy").
//!
//! Relays (each serves one client at a time, like a proxy at one client):
//! - `epoll`: non-blocking sockets, edge-triggered epoll; read, and wait only
//!   when a read finds nothing (what pgbouncer and tokio do).
//! - `uring`: io_uring; the send to one side and the receive of its answer are
//!   submitted together and waited for in one system call.
//! - `uring-defer`: the same with SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN.
//! - `block`: blocking reads and writes on a thread of its own.
//! - `spin`: never sleeps; retries the non-blocking read (a busy poller).
//!
//! `relay-floor tokio-relay LISTEN UPSTREAM [THREADS] [hand|copy]` is a relay
//! for real clients (bench/cpu.sh, FLOOR=1): shardgate's session-thread model
//! doing no work. A listener thread accepts and hands each client to the
//! least-loaded of THREADS session threads (default: the number of cores),
//! each running a current-thread tokio runtime with only I/O enabled. Per
//! client, one fresh upstream connection (TCP_NODELAY on both) and one task
//! copying bytes both ways: `hand` (the default) with one buffer per direction
//! in one poll function, `copy` with `tokio::io::copy_bidirectional`. It only
//! copies bytes, so any protocol passes (Postgres without TLS: PGSSLMODE=disable).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command};
use std::time::Instant;

const MSG: usize = 64;
const KINDS: [&str; 5] = ["epoll", "uring", "uring-defer", "block", "spin"];

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    match arg(1).as_str() {
        "run" => run(arg(2).parse().unwrap_or(7), arg(3).parse().unwrap_or(20_000)),
        "echo" => echo(listener(&arg(2))),
        "relay" => relay(&arg(2), listener(&arg(3)), &arg(4)),
        "client" => println!("{:.2}", client(&arg(2), arg(3).parse().unwrap())),
        "tokio-relay" if a.len() >= 4 => {
            let threads = match arg(4).as_str() {
                "" => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n.parse().expect("THREADS is a number"),
            };
            let hand = match arg(5).as_str() {
                "" | "hand" => true,
                "copy" => false,
                other => panic!("unknown copy loop {other} (hand or copy)"),
            };
            tokio_relay::run(listener(&arg(2)), &arg(3), threads, hand)
        }
        _ => {
            eprintln!("usage: relay-floor run [ROUNDS] [ROUND_TRIPS]");
            eprintln!("       relay-floor tokio-relay LISTEN UPSTREAM [THREADS] [hand|copy]");
            std::process::exit(2);
        }
    }
}

fn listener(addr: &str) -> TcpListener {
    TcpListener::bind(addr).unwrap_or_else(|e| panic!("cannot listen on {addr}: {e}"))
}

/// A free loopback address (bound and released; the child binds it again).
fn free_addr() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn wait_listening(addr: &str) {
    for _ in 0..500 {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("nothing listens on {addr} after 5 s");
}

struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run(rounds: usize, n: usize) {
    let me = std::env::current_exe().unwrap();
    let echo_addr = free_addr();
    let mut children = Children(vec![Command::new(&me).args(["echo", &echo_addr]).spawn().unwrap()]);
    wait_listening(&echo_addr);
    let mut targets = vec![("direct", echo_addr.clone())];
    for kind in KINDS {
        let addr = free_addr();
        children.0.push(Command::new(&me).args(["relay", kind, &addr, &echo_addr]).spawn().unwrap());
        // A relay serves one client at a time: the probe connection is its first.
        wait_listening(&addr);
        targets.push((kind, addr));
    }
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for r in 1..=rounds {
        for (i, (_, addr)) in targets.iter().enumerate() {
            times[i].push(client(addr, n));
        }
        eprintln!("round {r}/{rounds} done");
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let direct = median(&mut times[0].clone());
    println!("{n} round trips of {MSG} bytes, median of {rounds} rounds");
    println!("{:<12} {:>10} {:>10}", "path", "µs/trip", "added µs");
    for (i, (name, _)) in targets.iter().enumerate() {
        let m = median(&mut times[i]);
        println!("{:<12} {:>10.1} {:>10.1}", name, m, m - direct);
    }
}

fn echo(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        s.set_nodelay(true).unwrap();
        std::thread::spawn(move || {
            let mut b = [0u8; MSG];
            while s.read_exact(&mut b).is_ok() {
                if s.write_all(&b).is_err() {
                    return;
                }
            }
        });
    }
}

/// Microseconds per round trip over `n` round trips (after 1,000 to warm up).
fn client(addr: &str, n: usize) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut b = [7u8; MSG];
    for _ in 0..1000 {
        s.write_all(&b).unwrap();
        s.read_exact(&mut b).unwrap();
    }
    let t = Instant::now();
    for _ in 0..n {
        s.write_all(&b).unwrap();
        s.read_exact(&mut b).unwrap();
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn relay(kind: &str, l: TcpListener, upstream: &str) {
    for c in l.incoming() {
        let Ok(c) = c else { continue };
        let Ok(u) = TcpStream::connect(upstream) else { continue };
        c.set_nodelay(true).unwrap();
        u.set_nodelay(true).unwrap();
        match kind {
            "epoll" => relay_epoll(&c, &u, false),
            "spin" => relay_epoll(&c, &u, true),
            "uring" => relay_uring(&c, &u, false),
            "uring-defer" => relay_uring(&c, &u, true),
            "block" => relay_block(c, u),
            _ => panic!("unknown relay {kind}"),
        }
    }
}

fn relay_epoll(c: &TcpStream, u: &TcpStream, spin: bool) {
    c.set_nonblocking(true).unwrap();
    u.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 8192];
    // SAFETY: plain system calls on descriptors that outlive the loop.
    unsafe {
        let ep = libc::epoll_create1(libc::EPOLL_CLOEXEC);
        for fd in [c.as_raw_fd(), u.as_raw_fd()] {
            let mut ev = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLET) as u32, u64: fd as u64 };
            libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev);
        }
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let (mut from, mut to) = (c.as_raw_fd(), u.as_raw_fd());
        loop {
            let n = libc::recv(from, buf.as_mut_ptr().cast(), buf.len(), 0);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EAGAIN) {
                break;
            }
            if n < 0 {
                if !spin {
                    libc::epoll_wait(ep, events.as_mut_ptr(), 8, -1);
                }
                continue;
            }
            if libc::send(to, buf.as_ptr().cast(), n as usize, 0) != n {
                break;
            }
            std::mem::swap(&mut from, &mut to);
        }
        libc::close(ep);
    }
}

fn relay_uring(c: &TcpStream, u: &TcpStream, defer: bool) {
    use io_uring::{opcode, types, IoUring};
    let mut ring: IoUring = if defer {
        IoUring::builder().setup_single_issuer().setup_defer_taskrun().setup_coop_taskrun().build(8).unwrap()
    } else {
        IoUring::new(8).unwrap()
    };
    let mut rbuf = vec![0u8; 8192];
    let mut sbuf = vec![0u8; 8192];
    let (cfd, ufd) = (types::Fd(c.as_raw_fd()), types::Fd(u.as_raw_fd()));
    // SAFETY: the buffers outlive every submitted operation: each loop turn
    // waits for all of its operations to complete.
    unsafe {
        let r = opcode::Recv::new(cfd, rbuf.as_mut_ptr(), rbuf.len() as u32).build().user_data(2);
        ring.submission().push(&r).unwrap();
    }
    ring.submit_and_wait(1).unwrap();
    let mut n = ring.completion().next().map_or(-1, |c| c.result());
    let mut src = cfd;
    while n > 0 {
        let dst = if src.0 == cfd.0 { ufd } else { cfd };
        sbuf[..n as usize].copy_from_slice(&rbuf[..n as usize]);
        // SAFETY: as above.
        unsafe {
            let mut sq = ring.submission();
            sq.push(&opcode::Send::new(dst, sbuf.as_ptr(), n as u32).build().user_data(1)).unwrap();
            sq.push(&opcode::Recv::new(dst, rbuf.as_mut_ptr(), rbuf.len() as u32).build().user_data(2)).unwrap();
        }
        // Both the send and the receive of the answer, in one system call.
        ring.submit_and_wait(2).unwrap();
        n = -1;
        for cqe in ring.completion() {
            if cqe.user_data() == 2 {
                n = cqe.result();
            }
        }
        src = dst;
    }
}

fn relay_block(mut c: TcpStream, mut u: TcpStream) {
    let mut b = [0u8; 8192];
    loop {
        let n = match c.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if u.write_all(&b[..n]).is_err() {
            return;
        }
        let n = match u.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if c.write_all(&b[..n]).is_err() {
            return;
        }
    }
}

/// Shardgate's session threads (router/src/server.rs, `SessionThreads`) with
/// nothing to do: no parsing, no routing, no pool.
mod tokio_relay {
    use std::future::poll_fn;
    use std::io;
    use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{ready, Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
    use tokio::net::TcpStream;
    use tokio::runtime::{Builder, Handle};

    struct Thread {
        handle: Handle,
        sessions: Arc<AtomicUsize>,
    }

    /// Gives a session's place back on its thread when the session ends.
    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub fn run(l: TcpListener, upstream: &str, n: usize, hand: bool) {
        let upstream: SocketAddr = upstream
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("cannot resolve {upstream}"));
        let threads: Vec<Thread> = (1..=n.max(1))
            .map(|i| {
                // I/O only, no timer: as the router's session threads.
                let rt = Builder::new_current_thread().enable_io().build().unwrap();
                let handle = rt.handle().clone();
                std::thread::Builder::new()
                    .name(format!("relay-session-{i}"))
                    .spawn(move || rt.block_on(std::future::pending::<()>()))
                    .unwrap();
                Thread { handle, sessions: Arc::new(AtomicUsize::new(0)) }
            })
            .collect();
        // The listener thread: accept, hand to the thread with the fewest sessions.
        for c in l.incoming() {
            let Ok(c) = c else { continue };
            if c.set_nonblocking(true).is_err() || c.set_nodelay(true).is_err() {
                continue;
            }
            let t = threads.iter().min_by_key(|t| t.sessions.load(Ordering::Relaxed)).unwrap();
            t.sessions.fetch_add(1, Ordering::Relaxed);
            let counted = Counted(t.sessions.clone());
            t.handle.spawn(async move {
                let _counted = counted;
                let Ok(mut c) = TcpStream::from_std(c) else { return };
                let Ok(mut u) = TcpStream::connect(upstream).await else { return };
                if u.set_nodelay(true).is_err() {
                    return;
                }
                let _ = if hand {
                    relay(&mut c, &mut u).await
                } else {
                    tokio::io::copy_bidirectional(&mut c, &mut u).await.map(|_| ())
                };
            });
        }
    }

    /// One direction's buffer: bytes read from one side not yet written to the other.
    struct Half {
        buf: Box<[u8]>,
        pos: usize,
        end: usize,
    }

    /// Copies both ways until either side ends; one buffer per direction. A
    /// read that returns less than the buffer clears tokio's readiness, so an
    /// idle direction costs no system call when the task is polled.
    async fn relay(c: &mut TcpStream, u: &mut TcpStream) -> io::Result<()> {
        let mut up = Half { buf: vec![0; 16384].into_boxed_slice(), pos: 0, end: 0 };
        let mut down = Half { buf: vec![0; 16384].into_boxed_slice(), pos: 0, end: 0 };
        poll_fn(|cx| {
            let a = pump(cx, c, u, &mut up)?;
            let b = pump(cx, u, c, &mut down)?;
            if a.is_ready() || b.is_ready() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Moves bytes from `from` to `to` until one of them would block (Pending)
    /// or `from` ends (Ready).
    fn pump(cx: &mut Context<'_>, from: &mut TcpStream, to: &mut TcpStream, h: &mut Half) -> Poll<io::Result<()>> {
        loop {
            if h.pos < h.end {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &h.buf[h.pos..h.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                h.pos += n;
                continue;
            }
            let mut rb = ReadBuf::new(&mut h.buf);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            (h.pos, h.end) = (0, n);
        }
    }
}
