//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is optional at build time so that `cargo check`/`cargo test` work
//! without a BPF toolchain; a `shepherd run` built without it fails at start-up
//! with a message saying to run `cargo xtask build-ebpf`.
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let default = manifest.join("../target/bpf/shepherd.bpf.o");
    let src = std::env::var_os("SHEPHERD_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or(default);
    println!("cargo:rerun-if-env-changed=SHEPHERD_EBPF_OBJ");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("shepherd.bpf.o");
    let bytes = std::fs::read(&src).unwrap_or_default();
    std::fs::write(&out, bytes).expect("write OUT_DIR/shepherd.bpf.o");
}
