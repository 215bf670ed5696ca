//! `cargo xtask build-ebpf`: builds the kernel-side crate
//! (ebpf/shepherd-ebpf, its own workspace, nightly + bpfel-unknown-none +
//! build-std=core from its rust-toolchain.toml and .cargo/config.toml) and
//! publishes the object at target/bpf/shepherd.bpf.o for the proxy to embed.
use crate::util::{clean_cargo, path_with_cargo_bin, run as run_cmd, succeeds, workspace_root};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(clap::Args, Default)]
pub struct Options {
    /// Build the dev profile instead of release.
    #[arg(long)]
    pub debug: bool,
}

const TARGET: &str = "bpfel-unknown-none";
/// The `[[bin]]` name in ebpf/shepherd-ebpf/Cargo.toml.
const BIN: &str = "shepherd";

pub fn run(opts: &Options) -> Result<()> {
    let out = build(!opts.debug)?;
    eprintln!("build-ebpf: {}", out.display());
    Ok(())
}

/// The eBPF crate's directory.
pub fn ebpf_dir() -> PathBuf {
    workspace_root().join("ebpf").join("shepherd-ebpf")
}

/// Where the built object is published: `<workspace>/target/bpf/shepherd.bpf.o`.
pub fn object_path() -> PathBuf {
    workspace_root()
        .join("target")
        .join("bpf")
        .join("shepherd.bpf.o")
}

/// `cargo +nightly <args>` in the eBPF crate's directory, with the outer
/// cargo's toolchain variables removed and `$CARGO_HOME/bin` (bpf-linker)
/// first in PATH.
fn nightly_cargo() -> Result<Command> {
    let mut cmd = clean_cargo("cargo");
    cmd.arg("+nightly")
        .current_dir(ebpf_dir())
        .env("PATH", path_with_cargo_bin()?);
    Ok(cmd)
}

/// Fails with a pointer to `cargo xtask setup` if bpf-linker cannot run.
fn require_bpf_linker() -> Result<()> {
    let path = path_with_cargo_bin()?;
    if !succeeds(
        Command::new("bpf-linker")
            .arg("--version")
            .env("PATH", path),
    ) {
        bail!(
            "bpf-linker is missing or broken (it links the eBPF object): run `cargo xtask setup`"
        );
    }
    Ok(())
}

/// Builds the eBPF object and copies it to [`object_path`] (only when its
/// contents changed, so the proxy's build script is not re-run needlessly).
/// Returns that path.
pub fn build(release: bool) -> Result<PathBuf> {
    require_bpf_linker()?;
    let mut cmd = nightly_cargo()?;
    cmd.arg("build");
    if release {
        cmd.arg("--release");
    }
    run_cmd(&mut cmd).context(
        "building the eBPF crate failed; if the toolchain is the problem, run `cargo xtask setup`",
    )?;

    let profile = if release { "release" } else { "debug" };
    let built = ebpf_dir()
        .join("target")
        .join(TARGET)
        .join(profile)
        .join(BIN);
    if !built.is_file() {
        bail!(
            "the eBPF build succeeded but {} is missing",
            built.display()
        );
    }
    let dest = object_path();
    if copy_if_changed(&built, &dest)? {
        eprintln!("build-ebpf: updated {}", dest.display());
    } else {
        eprintln!("build-ebpf: {} unchanged", dest.display());
    }
    Ok(dest)
}

/// `cargo +nightly clippy --release -- -D warnings` on the eBPF crate.
pub fn clippy() -> Result<()> {
    let mut cmd = nightly_cargo()?;
    cmd.args(["clippy", "--release", "--", "-D", "warnings"]);
    run_cmd(&mut cmd).context("clippy found problems in ebpf/shepherd-ebpf")
}

/// `cargo +nightly fmt --check` on the eBPF crate.
pub fn fmt_check() -> Result<()> {
    let mut cmd = nightly_cargo()?;
    cmd.args(["fmt", "--check"]);
    run_cmd(&mut cmd).context(
        "ebpf/shepherd-ebpf is not formatted: run `cargo +nightly fmt` in ebpf/shepherd-ebpf",
    )
}

/// Writes `from`'s contents to `to` unless they are already identical.
/// Returns whether `to` was written.
fn copy_if_changed(from: &Path, to: &Path) -> Result<bool> {
    let new = fs::read(from).with_context(|| format!("could not read {}", from.display()))?;
    if fs::read(to).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    let dir = to.parent().context("destination has no directory")?;
    fs::create_dir_all(dir).with_context(|| format!("could not create {}", dir.display()))?;
    // Write then rename, so a concurrent reader never sees half a file.
    let tmp = dir.join(".shepherd.bpf.o.tmp");
    fs::write(&tmp, &new).with_context(|| format!("could not write {}", tmp.display()))?;
    fs::rename(&tmp, to).with_context(|| format!("could not replace {}", to.display()))?;
    Ok(true)
}
