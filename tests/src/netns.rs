//! Network namespaces: the [`Netns`] guard, and running code inside one.
//!
//! [`Netns::create`] makes a named namespace (`ip netns add`, so it appears
//! under `/run/netns/NAME` where `nsenter --net=`, CRIU and `ip -n` find it)
//! with `lo` up; dropping the guard deletes it, and with it every link inside.
//!
//! [`enter`] / [`in_netns`] move only the *current thread* into a namespace and
//! back. A socket keeps the namespace it was created in, so a test can create a
//! `TcpStream` inside the client namespace and use it from any thread after.
//! Threads spawned while inside inherit the namespace.

use std::fs::File;
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
}

impl Netns {
    /// Creates namespace `name` (`ip netns add`) and brings its `lo` up.
    /// Panics with `ip`'s message on failure (e.g. the name already exists).
    pub fn create(name: &str) -> Netns {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap_or_else(|e| panic!("spawn `ip netns add {name}`: {e}"));
        if !out.status.success() {
            panic!(
                "`ip netns add {name}` failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let ns = Netns {
            name: name.to_owned(),
            path: netns_path(name),
        };
        // From here on, a panic drops `ns`, which deletes the namespace.
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/NAME`, for `nsenter --net=` and `setns`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `argv` inside the namespace with `ip netns exec` and returns its
    /// output, whatever the exit status. (`ip netns exec` also gives the command
    /// a private mount namespace with this netns's /sys: fine for tools, but use
    /// [`crate::process::Workload`] for processes CRIU must dump.)
    pub fn exec(&self, argv: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .unwrap_or_else(|e| panic!("spawn `ip netns exec {} {argv:?}`: {e}", self.name))
    }

    /// Like [`exec`](Self::exec), but panics with stderr unless the command
    /// succeeds; returns its stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        let out = self.exec(argv);
        check(
            &format!("ip netns exec {} {}", self.name, argv.join(" ")),
            out,
        )
    }

    /// Runs `ip -n NAME <args>` (cheaper than `exec`) and panics with stderr on
    /// failure; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("spawn `ip -n {} {}`: {e}", self.name, args.join(" ")));
        check(&format!("ip -n {} {}", self.name, args.join(" ")), out)
    }

    /// Sets sysctl `key` (dotted, e.g. `net.ipv4.ip_forward`) to `value` inside
    /// the namespace, by writing `/proc/sys/...` from a thread entered into it.
    pub fn sysctl(&self, key: &str, value: &str) {
        let file = format!("/proc/sys/{}", key.replace('.', "/"));
        in_netns(self, || std::fs::write(&file, value))
            .unwrap_or_else(|e| panic!("sysctl {key}={value} in netns {}: {e}", self.name));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        match Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()
        {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: spawn `ip netns del {}`: {e}", self.name),
        }
    }
}

fn check(what: &str, out: Output) -> String {
    if !out.status.success() {
        panic!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/run/netns/NAME`.
/// Names from `ip netns list` ("NAME" or "NAME (id: N)").
pub fn list() -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Anything that designates a named namespace: a [`Netns`] or its name.
pub trait AsNetns {
    /// The namespace's file, `/run/netns/NAME`.
    fn netns_path(&self) -> PathBuf;
}

impl AsNetns for Netns {
    fn netns_path(&self) -> PathBuf {
        self.path.clone()
    }
}

impl AsNetns for str {
    fn netns_path(&self) -> PathBuf {
        netns_path(self)
    }
}

impl AsNetns for String {
    fn netns_path(&self) -> PathBuf {
        netns_path(self)
    }
}

impl<T: AsNetns + ?Sized> AsNetns for &T {
    fn netns_path(&self) -> PathBuf {
        (**self).netns_path()
    }
}

/// While alive, the current thread is in another network namespace; dropping
/// it moves the thread back. Not `Send`: it must be dropped on its thread.
#[derive(Debug)]
pub struct NetnsEnter {
    original: File,
    _not_send: PhantomData<*const ()>,
}

/// Moves the current thread into `ns` until the returned guard drops.
/// Panics if the namespace can't be opened or entered.
pub fn enter(ns: &(impl AsNetns + ?Sized)) -> NetnsEnter {
    let path = ns.netns_path();
    let original = File::open("/proc/thread-self/ns/net")
        .unwrap_or_else(|e| panic!("open /proc/thread-self/ns/net: {e}"));
    let target = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: setns on a valid, open namespace fd; it only changes this
    // thread's network namespace and touches no memory of ours.
    let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        panic!(
            "setns into {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    NetnsEnter {
        original,
        _not_send: PhantomData,
    }
}

impl Drop for NetnsEnter {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; `original` is this thread's former namespace.
        let rc = unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc != 0 {
            // Leaving the thread in the wrong namespace would silently corrupt
            // every later test on it; there is no sane way to go on.
            eprintln!(
                "fatal: cannot restore this thread's network namespace: {}",
                std::io::Error::last_os_error()
            );
            std::process::abort();
        }
    }
}

/// Runs `f` on the current thread inside `ns`, then moves the thread back (also
/// if `f` panics).
pub fn in_netns<T>(ns: &(impl AsNetns + ?Sized), f: impl FnOnce() -> T) -> T {
    let _guard = enter(ns);
    f()
}
