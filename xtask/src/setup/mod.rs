//! `cargo xtask setup`: everything a fresh machine of the project's kind
//! (Debian 12, kernel 6.18, root, registries only) needs, done idempotently.
//! Each step checks first; a second run when everything is present takes a
//! second or two. The routes are the measured ones recorded in docs/toolchain.md.
use crate::util::{cargo_home, clean_cargo, describe, output, run as run_cmd, workspace_root};
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod criu;

#[derive(clap::Args, Default)]
pub struct Options {
    /// Rebuild and reinstall CRIU from Debian sid's source even if a good
    /// /usr/local/sbin/criu is present (proves the route still works).
    #[arg(long)]
    pub rebuild_criu: bool,
}

/// Debian 12 packages: CRIU's build dependencies, the network tools CRIU and
/// the tests shell out to, and the workloads/baselines the demos use.
const DEBIAN_PACKAGES: &[&str] = &[
    "build-essential",
    "pkg-config",
    "libprotobuf-dev",
    "libprotobuf-c-dev",
    "protobuf-c-compiler",
    "protobuf-compiler",
    "python3-protobuf",
    "libnl-3-dev",
    "libnet1-dev",
    "libcap-dev",
    "libaio-dev",
    "libnftables-dev",
    "libbsd-dev",
    "uuid-dev",
    "libgnutls28-dev",
    "iptables",
    "nftables",
    "iproute2",
    "redis-server",
    "redis-tools",
    "haproxy",
    "iperf3",
    "socat",
    "xz-utils",
    "dpkg-dev",
    "procps",
    // Container runtimes (issue: real runtimes). runc, not crun: this kind of
    // machine has hybrid cgroups v1 and no systemd, where Debian's crun fails
    // and has no CRIU support. `--no-install-recommends` (above) keeps
    // Debian 12's CRIU 3.17 out; runc finds CRIU 4.2 in /usr/local/sbin.
    "podman",
    "runc",
    "conmon",
    "netavark",
    "aardvark-dns",
    "catatonit",
    "uidmap",
    "golang-github-containers-common",
    "zstd",
];

/// Components the nightly toolchain needs for the eBPF crate.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy", "rustfmt"];

/// The bpf-linker feature that matches the LLVM inside the nightly toolchain.
const LLVM_MAJOR: &str = "22";

const BPFFS: &str = "/sys/fs/bpf";

pub fn run(opts: &Options) -> Result<()> {
    let start = Instant::now();
    if !is_root() {
        bail!("setup installs packages, mounts bpffs and writes /usr/local/sbin: run it as root");
    }
    debian_packages()?;
    nightly_components()?;
    bpf_linker()?;
    cargo_fuzz()?;
    bpffs()?;
    criu::criu(opts.rebuild_criu)?;
    eprintln!("setup: done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_ok_and(|uid| uid.trim() == "0")
}

// ---------------------------------------------------------------- 1. Debian

/// Returns the packages of `wanted` that dpkg does not report as installed.
fn missing_packages(wanted: &[&str]) -> Result<Vec<String>> {
    // dpkg-query exits non-zero when a name is unknown to dpkg, but still
    // reports the known ones: read its output, not its status.
    let out = Command::new("dpkg-query")
        .arg("-W")
        .arg("-f=${Package} ${Status}\n")
        .args(wanted)
        .output()
        .context("could not run dpkg-query: is this a Debian machine?")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let installed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.ends_with(" install ok installed"))
        .filter_map(|l| l.split_whitespace().next())
        .map(|p| p.split(':').next().unwrap_or(p))
        .collect();
    Ok(wanted
        .iter()
        .filter(|p| !installed.contains(p))
        .map(|p| p.to_string())
        .collect())
}

fn debian_packages() -> Result<()> {
    let missing = missing_packages(DEBIAN_PACKAGES)?;
    if missing.is_empty() {
        eprintln!(
            "setup: debian packages ({}): ok (already present)",
            DEBIAN_PACKAGES.len()
        );
        return Ok(());
    }
    eprintln!("setup: debian packages: installing {}", missing.join(" "));
    run_cmd(Command::new("apt-get").arg("update"))
        .context("apt-get update failed: check the network and /etc/apt/sources.list.d")?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
    .context("apt-get install failed")?;
    let still = missing_packages(DEBIAN_PACKAGES)?;
    if !still.is_empty() {
        bail!(
            "apt-get install finished but these are still not installed: {}",
            still.join(" ")
        );
    }
    eprintln!("setup: debian packages: installed {}", missing.join(" "));
    Ok(())
}

// --------------------------------------------------------------- 2. nightly

fn nightly_components() -> Result<()> {
    let version = output(clean_cargo("rustc").args(["+nightly", "--version"])).context(
        "the nightly Rust toolchain is missing or broken; it is preinstalled on this kind of \
         machine and cannot be fetched here: install it with `rustup toolchain install nightly` \
         where the network allows",
    )?;
    let installed = output(clean_cargo("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("could not list the nightly toolchain's components")?;
    let has = |c: &str| {
        installed
            .lines()
            .map(str::trim)
            .any(|l| l == c || l.strip_prefix(c).is_some_and(|r| r.starts_with('-')))
    };
    let missing: Vec<&str> = NIGHTLY_COMPONENTS
        .iter()
        .copied()
        .filter(|c| !has(c))
        .collect();
    if missing.is_empty() {
        eprintln!(
            "setup: nightly toolchain ({}) + {}: ok (already present)",
            version.trim(),
            NIGHTLY_COMPONENTS.join(", ")
        );
        return Ok(());
    }
    run_cmd(
        clean_cargo("rustup")
            .args(["component", "add"])
            .args(NIGHTLY_COMPONENTS)
            .args(["--toolchain", "nightly"]),
    )
    .context("could not add the nightly components")?;
    eprintln!(
        "setup: nightly toolchain ({}): added {}",
        version.trim(),
        missing.join(", ")
    );
    Ok(())
}

// ----------------------------------------------------------- cargo-fuzz

/// cargo-fuzz, for `cargo xtask fuzz` (from crates.io).
fn cargo_fuzz() -> Result<()> {
    if let Ok(v) = output(clean_cargo("cargo").args(["fuzz", "--version"])) {
        eprintln!("setup: cargo-fuzz ({}): ok (already present)", v.trim());
        return Ok(());
    }
    run_cmd(clean_cargo("cargo").args(["install", "cargo-fuzz", "--locked"]))
        .context("could not install cargo-fuzz from crates.io")?;
    eprintln!("setup: cargo-fuzz: installed");
    Ok(())
}

// ----------------------------------------------------------- 3. bpf-linker

/// The version line of a working bpf-linker, from PATH or `$CARGO_HOME/bin`.
fn bpf_linker_version() -> Option<String> {
    let candidates = [
        PathBuf::from("bpf-linker"),
        cargo_home().join("bin").join("bpf-linker"),
    ];
    candidates
        .iter()
        .find_map(|c| output(Command::new(c).arg("--version")).ok())
        .map(|v| v.trim().to_string())
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = bpf_linker_version() {
        eprintln!("setup: bpf-linker ({v}): ok (already present)");
        return Ok(());
    }
    eprintln!("setup: bpf-linker: missing or not working, building it against nightly's LLVM");

    // Link against the LLVM inside the nightly toolchain: plain
    // `cargo install bpf-linker` wants a system LLVM that Debian 12 lacks.
    let sysroot = output(clean_cargo("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("could not find the nightly sysroot (`rustc +nightly --print sysroot`)")?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let prefix = format!("libLLVM.so.{LLVM_MAJOR}.");
    let mut llvm: Vec<PathBuf> = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("could not list {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&prefix) && n.contains("-rust-") && n.ends_with("-nightly")
            })
        })
        .collect();
    llvm.sort();
    let Some(llvm) = llvm.pop() else {
        bail!(
            "no {}*-rust-*-nightly in {}: the nightly toolchain's LLVM is not {LLVM_MAJOR}.x, \
             so bpf-linker's `llvm-{LLVM_MAJOR}` feature does not fit; update LLVM_MAJOR in \
             xtask/src/setup.rs",
            prefix,
            sysroot_lib.display()
        );
    };
    let llvm_name = llvm
        .file_name()
        .context("LLVM library path has no file name")?
        .to_owned();

    // The binary keeps an rpath into P/lib, so P must last: $CARGO_HOME/bpf-llvm.
    let llvm_prefix = cargo_home().join("bpf-llvm");
    let lib = llvm_prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("could not create {}", lib.display()))?;
    // Drop links to older nightlies' LLVM, then link the current one.
    for entry in fs::read_dir(&lib)?.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
        if is_link && name.to_string_lossy().starts_with("libLLVM") {
            fs::remove_file(entry.path())
                .with_context(|| format!("could not remove {}", entry.path().display()))?;
        }
    }
    for name in [std::ffi::OsStr::new("libLLVM.so"), llvm_name.as_os_str()] {
        let link = lib.join(name);
        symlink(&llvm, &link)
            .with_context(|| format!("could not link {} -> {}", link.display(), llvm.display()))?;
    }

    let mut install = clean_cargo("cargo");
    install
        .current_dir(workspace_root())
        .env("LLVM_PREFIX", &llvm_prefix)
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{LLVM_MAJOR}"));
    if cargo_home().join("bin").join("bpf-linker").exists() {
        // Present but broken (e.g. its LLVM moved with a nightly update).
        install.arg("--force");
    }
    eprintln!(
        "+ LLVM_PREFIX={} {}",
        llvm_prefix.display(),
        describe(&install)
    );
    let status = install
        .status()
        .context("could not start cargo install bpf-linker")?;
    if !status.success() {
        bail!("`cargo install bpf-linker` failed ({status}); see the output above");
    }
    let v = bpf_linker_version().context(
        "bpf-linker was installed but does not run; check `ldd ~/.cargo/bin/bpf-linker`",
    )?;
    eprintln!("setup: bpf-linker ({v}): installed");
    Ok(())
}

// ---------------------------------------------------------------- 4. bpffs

fn bpffs_mounted() -> Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("could not read /proc/mounts")?;
    Ok(mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 2 && f[1] == BPFFS && f[2] == "bpf"
    }))
}

fn bpffs() -> Result<()> {
    if bpffs_mounted()? {
        eprintln!("setup: bpffs at {BPFFS}: ok (already present)");
        return Ok(());
    }
    fs::create_dir_all(BPFFS).with_context(|| format!("could not create {BPFFS}"))?;
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
        .context("could not mount bpffs (needs CAP_SYS_ADMIN)")?;
    if !bpffs_mounted()? {
        bail!("mounted bpffs at {BPFFS} but /proc/mounts does not show it");
    }
    eprintln!("setup: bpffs at {BPFFS}: mounted");
    Ok(())
}

// ----------------------------------------------------------------- 5. CRIU
