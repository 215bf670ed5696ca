//! Small process helpers shared by the tasks.
use anyhow::{bail, Context, Result};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (parent of `xtask/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command, echoing it, and fails with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("+ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

/// Runs a command quietly and returns whether it succeeded.
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Runs a command and returns its stdout.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("could not start {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Variables that cargo (or rustup, or the caller) sets in the environment
/// of `cargo xtask` and that would pin a nested cargo/rustc/rustup call to
/// the outer toolchain, target or flags.
const TOOLCHAIN_ENV: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_RUSTC_WRAPPER",
    "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    "CARGO_BUILD_RUSTDOC",
    "CARGO",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
];

/// A `Command` for a nested cargo/rustc/rustup (or make) call, with the
/// variables that cargo sets for `cargo xtask` removed, so the nested call
/// picks its own toolchain (`+nightly`, `rust-toolchain.toml`), target and
/// flags instead of inheriting the outer ones.
pub fn clean_cargo(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for var in TOOLCHAIN_ENV {
        cmd.env_remove(var);
    }
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("CARGO_PKG_")) {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// `$CARGO_HOME`, or `~/.cargo` when it is unset.
pub fn cargo_home() -> PathBuf {
    match std::env::var_os("CARGO_HOME") {
        Some(h) if !h.is_empty() => PathBuf::from(h),
        _ => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/root"))
            .join(".cargo"),
    }
}

/// `$PATH` with `$CARGO_HOME/bin` in front (where `cargo install` puts
/// bpf-linker).
pub fn path_with_cargo_bin() -> Result<OsString> {
    let mut dirs = vec![cargo_home().join("bin")];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).context("PATH contains an entry that cannot be joined")
}

/// Builds what the demo and the benchmarks run — the eBPF object, the
/// release agent and the harness binaries — and points the harness at the
/// agent (`SHEPHERD_BIN`). Call before starting any thread. Returns
/// `target/release`.
pub fn build_release_binaries() -> Result<PathBuf> {
    crate::build_ebpf::build(true)?;
    run(Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "shepherd",
            "-p",
            "shepherd-tests",
            "--bins",
        ])
        .current_dir(workspace_root()))?;
    let target = workspace_root().join("target/release");
    // Set before any thread of ours starts (the harness guards read it).
    std::env::set_var("SHEPHERD_BIN", target.join("shepherd"));
    Ok(target)
}
