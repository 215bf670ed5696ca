//! CRIU ≥ 4.2 at /usr/local/sbin/criu, built from Debian sid's source package
//! (docs/toolchain.md: Debian 12's 3.17 and trixie's 4.1.1 do not work with this
//! kernel and redis-server). The system's apt state is left untouched.
use crate::util::{clean_cargo, describe, output, run as run_cmd, workspace_root};
use anyhow::{bail, Context, Result};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Where CRIU is installed, and the oldest version that works on kernel 6.18
/// (4.1.1 fails on redis-server's sockets; Debian 12's 3.17 does not even run).
const CRIU_PATH: &str = "/usr/local/sbin/criu";
const CRIU_MIN: (u64, u64) = (4, 2);
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

pub(super) fn criu(force: bool) -> Result<()> {
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
