//! `shepherd-echo`: the TCP echo workload of the privileged tests.
//!
//! `shepherd-echo --listen IP:PORT [--listen IP:PORT ...] [--peer-log FILE] [--single-thread]`
//!
//! One thread per listener and per connection; every byte read is written back.
//! `--single-thread` serves everything from one thread with epoll(7) instead
//! (for thousands of connections: CRIU dumps one thread much faster than
//! thousands; no peer log in that mode).
//! On the client's EOF it shuts down its write side and closes. A reset or any
//! other error ends that connection only. With `--peer-log`, one line
//! `peer=IP:PORT local=IP:PORT` is appended per accepted connection, so tests
//! can see which address the pod saw. Plain std and plain files, so CRIU can
//! dump and restore it (the tests start it with stdout/stderr on a log file).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

const USAGE: &str = "usage: shepherd-echo --listen IP:PORT [--listen IP:PORT ...] [--peer-log FILE] [--single-thread]";

fn main() -> ExitCode {
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut peer_log: Option<String> = None;
    let mut single_thread = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => match args.next().map(|a| a.parse()) {
                Some(Ok(addr)) => listen.push(addr),
                _ => return usage("--listen needs IP:PORT"),
            },
            "--peer-log" => match args.next() {
                Some(f) => peer_log = Some(f),
                None => return usage("--peer-log needs a file"),
            },
            "--single-thread" => single_thread = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    if listen.is_empty() {
        return usage("at least one --listen is needed");
    }
    let peer_log = match peer_log {
        Some(path) => match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => Some(Arc::new(Mutex::new(f))),
            Err(e) => {
                eprintln!("shepherd-echo: open peer log {path}: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };

    // Bind everything first, so "listening" means all listeners are up.
    let mut listeners = Vec::new();
    for addr in &listen {
        match TcpListener::bind(addr) {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!("shepherd-echo: bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!(
        "shepherd-echo: pid {} listening on {listen:?}",
        std::process::id()
    );

    if single_thread {
        return match poll_loop(listeners) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shepherd-echo: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let log = peer_log.clone();
            std::thread::spawn(move || accept_loop(&l, log.as_ref()))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    ExitCode::FAILURE
}

fn usage(why: &str) -> ExitCode {
    eprintln!("shepherd-echo: {why}\n{USAGE}");
    ExitCode::from(2)
}

fn accept_loop(listener: &TcpListener, peer_log: Option<&Arc<Mutex<File>>>) {
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                let local = stream
                    .local_addr()
                    .map_or_else(|e| format!("?({e})"), |a| a.to_string());
                if let Some(log) = peer_log {
                    let mut f = log.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Err(e) =
                        writeln!(f, "peer={peer} local={local}").and_then(|()| f.flush())
                    {
                        eprintln!("shepherd-echo: write peer log: {e}");
                    }
                }
                std::thread::spawn(move || {
                    if let Err(e) = echo(stream) {
                        eprintln!("shepherd-echo: connection from {peer}: {e}");
                    }
                });
            }
            // E.g. ECONNABORTED, EMFILE: keep serving.
            Err(e) => {
                eprintln!("shepherd-echo: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

fn echo(mut stream: TcpStream) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stream.write_all(&buf[..n])?;
    }
    stream.flush()?;
    stream.shutdown(Shutdown::Write)
}

/// One connection of the single-threaded server: bytes read but not yet
/// written back, and whether the client has finished sending.
struct PolledConn {
    stream: TcpStream,
    pending: Vec<u8>,
    eof: bool,
    /// The events it is registered for (EPOLLIN or EPOLLOUT).
    interest: u32,
}

/// Listener tokens have this bit set; connection tokens are slab indices.
const LISTENER: u64 = 1 << 63;

fn epoll_ctl(ep: i32, op: i32, fd: i32, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a live epoll_event; the kernel copies it.
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Serves every listener and connection from this thread with epoll(7)
/// (level-triggered), so a wake-up costs what is ready, not what is open.
/// CRIU dumps and restores the epoll instance with its targets.
fn poll_loop(listeners: Vec<TcpListener>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall; the fd is owned below.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ep` was just created and nothing else owns it.
    let _ep_owner = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ep) };
    for (i, l) in listeners.iter().enumerate() {
        l.set_nonblocking(true)?;
        epoll_ctl(
            ep,
            libc::EPOLL_CTL_ADD,
            l.as_raw_fd(),
            libc::EPOLLIN as u32,
            LISTENER | i as u64,
        )?;
    }
    let mut conns: Vec<Option<PolledConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    loop {
        // SAFETY: `events` is a live array of events.len() entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token & LISTENER != 0 {
                let Some(l) = listeners.get((token & !LISTENER) as usize) else {
                    continue;
                };
                while let Ok((stream, _)) = l.accept() {
                    stream.set_nonblocking(true)?;
                    let slot = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    let interest = libc::EPOLLIN as u32;
                    epoll_ctl(
                        ep,
                        libc::EPOLL_CTL_ADD,
                        stream.as_raw_fd(),
                        interest,
                        slot as u64,
                    )?;
                    conns[slot] = Some(PolledConn {
                        stream,
                        pending: Vec::new(),
                        eof: false,
                        interest,
                    });
                }
                continue;
            }
            let slot = token as usize;
            let Some(c) = conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            let mut closed = false;
            if c.pending.is_empty() && !c.eof {
                match c.stream.read(&mut buf) {
                    Ok(0) => c.eof = true,
                    Ok(n) => c.pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => closed = true,
                }
            }
            if !closed && !c.pending.is_empty() {
                match c.stream.write(&c.pending) {
                    Ok(n) => {
                        c.pending.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => closed = true,
                }
            }
            if !closed && c.eof && c.pending.is_empty() {
                let _ = c.stream.shutdown(Shutdown::Write);
                closed = true;
            }
            if closed {
                let fd = c.stream.as_raw_fd();
                let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, 0, 0);
                conns[slot] = None;
                free.push(slot);
                continue;
            }
            let want = if c.pending.is_empty() {
                libc::EPOLLIN as u32
            } else {
                libc::EPOLLOUT as u32
            };
            if want != c.interest {
                epoll_ctl(
                    ep,
                    libc::EPOLL_CTL_MOD,
                    c.stream.as_raw_fd(),
                    want,
                    slot as u64,
                )?;
                c.interest = want;
            }
        }
    }
}
