//! `cargo xtask setup`: everything a fresh machine of the project's kind
//! (Debian 12, kernel 6.18, root, registries only) needs, done idempotently.
//! Each step checks first; a second run when everything is present takes a
//! second or two. The routes are the measured ones recorded in TOOLCHAIN.md.
use crate::util::{cargo_home, clean_cargo, describe, output, run as run_cmd, workspace_root};
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

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
];

/// Components the nightly toolchain needs for the eBPF crate.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy", "rustfmt"];

/// The bpf-linker feature that matches the LLVM inside the nightly toolchain.
const LLVM_MAJOR: &str = "22";

/// Where CRIU is installed, and the oldest version that works on kernel 6.18
/// (4.1.1 fails on redis-server's sockets; Debian 12's 3.17 does not even run).
const CRIU_PATH: &str = "/usr/local/sbin/criu";
const CRIU_MIN: (u64, u64) = (4, 2);

const BPFFS: &str = "/sys/fs/bpf";

pub fn run(opts: &Options) -> Result<()> {
    let start = Instant::now();
    if !is_root() {
        bail!("setup installs packages, mounts bpffs and writes /usr/local/sbin: run it as root");
    }
    debian_packages()?;
    nightly_components()?;
    bpf_linker()?;
    bpffs()?;
    criu(opts.rebuild_criu)?;
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

/// `(major, minor, patch)` from `criu --version` ("Version: 4.2.1").
fn criu_version(binary: &Path) -> Option<(u64, u64, u64)> {
    let out = output(Command::new(binary).arg("--version")).ok()?;
    let v = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?
        .trim();
    let n = numbers(v);
    Some((
        *n.first()?,
        n.get(1).copied().unwrap_or(0),
        n.get(2).copied().unwrap_or(0),
    ))
}

/// The runs of digits in `s`, as numbers ("4.2.1+ds" -> [4, 2, 1]).
fn numbers(s: &str) -> Vec<u64> {
    s.split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty())
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn fmt_version((a, b, c): (u64, u64, u64)) -> String {
    format!("{a}.{b}.{c}")
}

fn criu(force: bool) -> Result<()> {
    let binary = Path::new(CRIU_PATH);
    let current = criu_version(binary);
    let good = current.is_some_and(|(a, b, _)| (a, b) >= CRIU_MIN);
    if good && !force {
        if let Some(v) = current {
            eprintln!(
                "setup: criu {} at {CRIU_PATH}: ok (already present)",
                fmt_version(v)
            );
        }
        warn_if_shadowed();
        return Ok(());
    }
    let why = match (current, binary.exists()) {
        _ if good => "rebuild requested".to_string(),
        (Some(v), _) => format!(
            "{} is too old (need {}.{}+)",
            fmt_version(v),
            CRIU_MIN.0,
            CRIU_MIN.1
        ),
        (None, true) => "present but does not run".to_string(),
        (None, false) => "not installed".to_string(),
    };
    eprintln!(
        "setup: criu at {CRIU_PATH}: {why}; building {}.{}+ from Debian sid's source",
        CRIU_MIN.0, CRIU_MIN.1
    );
    let start = Instant::now();

    let build = workspace_root().join("target").join("criu-build");
    if build.exists() {
        fs::remove_dir_all(&build)
            .with_context(|| format!("could not clear {}", build.display()))?;
    }
    fs::create_dir_all(&build).with_context(|| format!("could not create {}", build.display()))?;
    let apt_dir = build.join("apt");
    let fetched = fetch_criu_source(&build, &apt_dir);
    // The private apt state (indexes, caches) is only needed for the fetch.
    if let Err(e) = fs::remove_dir_all(&apt_dir) {
        eprintln!(
            "setup: warning: could not remove {}: {e}",
            apt_dir.display()
        );
    }
    let (version, tarball) = fetched?;

    let tree = build.join("tree");
    fs::create_dir_all(&tree)?;
    run_cmd(
        Command::new("tar")
            .arg("-xf")
            .arg(&tarball)
            .arg("-C")
            .arg(&tree),
    )
    .context("could not unpack the CRIU source")?;
    let src = fs::read_dir(&tree)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.join("Makefile").is_file())
        .with_context(|| {
            format!(
                "no CRIU source tree (with a Makefile) under {}",
                tree.display()
            )
        })?;

    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    run_cmd(
        clean_cargo("make")
            .current_dir(&src)
            .arg(format!("-j{jobs}"))
            .arg("criu"),
    )
    .with_context(|| {
        format!(
            "building CRIU {version} failed; its build dependencies are the Debian packages of \
             step 1; the tree is kept at {}",
            src.display()
        )
    })?;
    let built = src.join("criu").join("criu");
    if !built.is_file() {
        bail!("make succeeded but {} is missing", built.display());
    }

    install_binary(&built, binary)?;
    let installed = criu_version(binary)
        .with_context(|| format!("{CRIU_PATH} was installed but `criu --version` does not run"))?;
    if (installed.0, installed.1) < CRIU_MIN {
        bail!(
            "installed {CRIU_PATH} reports {}, expected {}.{}+",
            fmt_version(installed),
            CRIU_MIN.0,
            CRIU_MIN.1
        );
    }
    eprintln!(
        "setup: criu {} at {CRIU_PATH}: installed (Debian source {version}) in {:.0} s",
        fmt_version(installed),
        start.elapsed().as_secs_f64()
    );
    criu_check(binary)?;
    if let Err(e) = fs::remove_dir_all(&build) {
        eprintln!("setup: warning: could not remove {}: {e}", build.display());
    }
    warn_if_shadowed();
    Ok(())
}

/// Downloads the newest CRIU 4.2+ orig tarball from Debian sid using a
/// private apt configuration under `apt_dir`, leaving the system's apt
/// sources, lists and caches untouched. Returns (Debian version, tarball).
fn fetch_criu_source(build: &Path, apt_dir: &Path) -> Result<(String, PathBuf)> {
    let (uri, signed_by) = debian_mirror()?;
    let lists = apt_dir.join("lists");
    let cache = apt_dir.join("cache");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(cache.join("archives").join("partial"))?;
    let sources = apt_dir.join("sources.list");
    let opts = match &signed_by {
        Some(k) => format!(" [signed-by={k}]"),
        None => String::new(),
    };
    fs::write(&sources, format!("deb-src{opts} {uri} sid main\n"))
        .with_context(|| format!("could not write {}", sources.display()))?;

    let apt = |program: &str| {
        let mut c = Command::new(program);
        c.env("DEBIAN_FRONTEND", "noninteractive").args([
            "-o".to_string(),
            format!("Dir::Etc::sourcelist={}", sources.display()),
            "-o".to_string(),
            "Dir::Etc::sourceparts=-".to_string(),
            "-o".to_string(),
            format!("Dir::State::Lists={}", lists.display()),
            "-o".to_string(),
            format!("Dir::Cache={}", cache.display()),
            "-o".to_string(),
            "Acquire::Languages=none".to_string(),
            // Files live under the workspace, which _apt may not be able to
            // write: download as root instead of warning about it.
            "-o".to_string(),
            "APT::Sandbox::User=root".to_string(),
        ]);
        c
    };

    run_cmd(apt("apt-get").arg("update"))
        .with_context(|| format!("apt-get update for sid's sources at {uri} failed"))?;
    let showsrc = output(apt("apt-cache").args(["showsrc", "criu"]))
        .context("apt-cache showsrc criu (sid) failed")?;
    let version = newest_criu(&showsrc).with_context(|| {
        format!(
            "Debian sid at {uri} has no CRIU {}.{}+ source (versions seen: {})",
            CRIU_MIN.0,
            CRIU_MIN.1,
            source_versions(&showsrc).join(", ")
        )
    })?;
    eprintln!("setup: criu: newest suitable source in sid is {version}");

    let download = build.join("download");
    fs::create_dir_all(&download)?;
    // The .debian.tar.xz may 404 while the orig tarball arrives, so judge by
    // the tarball, not by the exit status.
    let mut get = apt("apt-get");
    get.current_dir(&download)
        .args(["source", "--download-only"])
        .arg(format!("criu={version}"));
    eprintln!("+ {}", describe(&get));
    let status = get.status().context("could not start apt-get source")?;
    let upstream = upstream_version(&version);
    let tarball = fs::read_dir(&download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("criu_{upstream}.orig.tar."))
                    && fs::metadata(p).is_ok_and(|m| m.len() > 0)
            })
        })
        .with_context(|| {
            format!(
                "apt-get source criu={version} ({status}) did not deliver criu_{upstream}.orig.tar.*"
            )
        })?;
    if !status.success() {
        eprintln!("setup: criu: apt-get source exited with {status}, but the orig tarball arrived; that is all the build needs");
    }
    Ok((version, tarball))
}

/// The main Debian mirror URI (and its Signed-By keyring, if given) from
/// /etc/apt/sources.list.d/debian.sources, else /etc/apt/sources.list.
fn debian_mirror() -> Result<(String, Option<String>)> {
    let deb822 = Path::new("/etc/apt/sources.list.d/debian.sources");
    if let Ok(text) = fs::read_to_string(deb822) {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case(name)
                        .then(|| v.trim().to_string())
                })
            };
            let Some(uris) = field("URIs") else { continue };
            if field("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no")) {
                continue;
            }
            if let Some(uri) = uris.split_whitespace().find(|u| !u.contains("security")) {
                let key = field("Signed-By").filter(|k| k.starts_with('/'));
                return Ok((uri.to_string(), key));
            }
        }
    }
    let list = Path::new("/etc/apt/sources.list");
    if let Ok(text) = fs::read_to_string(list) {
        for line in text.lines().map(str::trim) {
            let mut words = line.split_whitespace();
            if !matches!(words.next(), Some("deb" | "deb-src")) {
                continue;
            }
            // Skip an options block like "[arch=amd64 signed-by=...]".
            let mut signed_by = None;
            let mut uri = None;
            let mut in_opts = false;
            for w in words {
                if w.starts_with('[') || in_opts {
                    in_opts = !w.ends_with(']');
                    if let Some(k) = w
                        .trim_matches(|c| c == '[' || c == ']')
                        .strip_prefix("signed-by=")
                    {
                        signed_by = Some(k.to_string());
                    }
                    continue;
                }
                uri = Some(w.to_string());
                break;
            }
            if let Some(uri) = uri.filter(|u| !u.contains("security")) {
                return Ok((uri, signed_by));
            }
        }
    }
    bail!(
        "found no Debian mirror URI in {} or {}",
        deb822.display(),
        list.display()
    )
}

/// Versions of the `criu` source package in `apt-cache showsrc` output.
fn source_versions(showsrc: &str) -> Vec<String> {
    let mut versions = Vec::new();
    for stanza in showsrc.split("\n\n") {
        let package = stanza.lines().find_map(|l| l.strip_prefix("Package:"));
        if package.map(str::trim) != Some("criu") {
            continue;
        }
        if let Some(v) = stanza.lines().find_map(|l| l.strip_prefix("Version:")) {
            versions.push(v.trim().to_string());
        }
    }
    versions
}

/// Upstream part of a Debian version: "1:4.2.1-1" -> "4.2.1".
fn upstream_version(debian: &str) -> &str {
    let no_epoch = debian.split_once(':').map_or(debian, |(_, v)| v);
    no_epoch.rsplit_once('-').map_or(no_epoch, |(u, _)| u)
}

/// The newest CRIU source version whose upstream version is at least CRIU_MIN.
fn newest_criu(showsrc: &str) -> Option<String> {
    let key = |v: &str| (numbers(upstream_version(v)), numbers(v));
    source_versions(showsrc)
        .into_iter()
        .filter(|v| {
            let n = numbers(upstream_version(v));
            (
                n.first().copied().unwrap_or(0),
                n.get(1).copied().unwrap_or(0),
            ) >= CRIU_MIN
        })
        .max_by_key(|v| key(v))
}

/// Copies `from` to `to` with mode 0755, atomically (a running criu keeps
/// its old inode).
fn install_binary(from: &Path, to: &Path) -> Result<()> {
    let dir = to.parent().context("install path has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    let tmp = dir.join(".criu.xtask-tmp");
    fs::copy(from, &tmp)
        .with_context(|| format!("could not copy {} to {}", from.display(), tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, to).with_context(|| format!("could not install {}", to.display()))?;
    Ok(())
}

/// Runs `criu check` and prints its verdict; only warns if it is not clean.
fn criu_check(binary: &Path) -> Result<()> {
    let out = Command::new(binary)
        .arg("check")
        .output()
        .with_context(|| format!("could not run {} check", binary.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() && stdout.contains("Looks good.") {
        eprintln!("setup: criu check: {}", stdout.trim());
    } else {
        eprintln!(
            "setup: warning: `criu check` did not say \"Looks good.\" ({}): {}",
            out.status,
            stdout.trim()
        );
    }
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        eprintln!("setup: criu check: {line}");
    }
    Ok(())
}

/// Warns if a different `criu` comes first in PATH (Debian 12's 3.17 fails
/// on this kernel).
fn warn_if_shadowed() {
    let Ok(found) = output(Command::new("sh").args(["-c", "command -v criu"])) else {
        eprintln!("setup: warning: `criu` is not in PATH; call {CRIU_PATH} by full path");
        return;
    };
    let found = found.trim();
    let same = fs::canonicalize(found).ok() == fs::canonicalize(CRIU_PATH).ok();
    if !same {
        eprintln!("setup: warning: `criu` in PATH is {found}, not {CRIU_PATH}; use the full path");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_newest_suitable_criu() {
        let showsrc = "Package: criu\nVersion: 4.1.1-2\n\nPackage: criu\nVersion: 4.2.1-1\n\n\
                       Package: criu\nVersion: 4.2-3\n\nPackage: other\nVersion: 9.9-1\n";
        assert_eq!(newest_criu(showsrc).as_deref(), Some("4.2.1-1"));
        assert_eq!(newest_criu("Package: criu\nVersion: 4.1.1-2\n"), None);
        assert_eq!(upstream_version("1:4.2.1+ds-1~exp1"), "4.2.1+ds");
        assert_eq!(upstream_version("4.2.1"), "4.2.1");
    }
}
