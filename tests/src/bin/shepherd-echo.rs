//! `shepherd-echo`: the TCP echo workload of the privileged tests.
//!
//! `shepherd-echo --listen IP:PORT [--listen IP:PORT ...] [--peer-log FILE]`
//!
//! One thread per listener and per connection; every byte read is written back.
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

const USAGE: &str =
    "usage: shepherd-echo --listen IP:PORT [--listen IP:PORT ...] [--peer-log FILE]";

fn main() -> ExitCode {
    let mut listen: Vec<SocketAddr> = Vec::new();
    let mut peer_log: Option<String> = None;
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
