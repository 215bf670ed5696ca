//! `shepherd-echo`: the TCP echo workload of the privileged tests.
//!
//! `shepherd-echo --listen IP:PORT [--listen IP:PORT ...] [--peer-log FILE] [--single-thread]`
//!
//! One thread per listener and per connection; every byte read is written back.
//! `--single-thread` serves everything from one thread with poll(2) instead
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
}

/// Serves every listener and connection from this thread with poll(2).
fn poll_loop(listeners: Vec<TcpListener>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    let mut conns: Vec<PolledConn> = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut fds: Vec<libc::pollfd> = listeners
            .iter()
            .map(|l| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .chain(conns.iter().map(|c| libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: if c.pending.is_empty() {
                    libc::POLLIN
                } else {
                    libc::POLLOUT
                },
                revents: 0,
            }))
            .collect();
        // SAFETY: `fds` is a live array of fds.len() pollfd structs.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for (l, fd) in listeners.iter().zip(&fds) {
            if fd.revents == 0 {
                continue;
            }
            while let Ok((stream, _)) = l.accept() {
                stream.set_nonblocking(true)?;
                conns.push(PolledConn {
                    stream,
                    pending: Vec::new(),
                    eof: false,
                });
            }
        }
        let polled = &fds[listeners.len()..];
        let mut closed = vec![false; conns.len()];
        for (i, fd) in polled.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let c = &mut conns[i];
            if c.pending.is_empty() && !c.eof {
                match c.stream.read(&mut buf) {
                    Ok(0) => c.eof = true,
                    Ok(n) => c.pending.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => closed[i] = true,
                }
            }
            if !c.pending.is_empty() {
                match c.stream.write(&c.pending) {
                    Ok(n) => {
                        c.pending.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => closed[i] = true,
                }
            }
            if c.eof && c.pending.is_empty() {
                let _ = c.stream.shutdown(Shutdown::Write);
                closed[i] = true;
            }
        }
        let mut i = 0;
        conns.retain(|_| {
            let keep = !closed[i];
            i += 1;
            keep
        });
    }
}
