//! A container root filesystem made from this machine's own files: the
//! binaries a pod runs, the shared libraries `ldd` lists for them, and
//! `/bin/sh` (so a container can redirect its standard streams to its own
//! `/dev/null`: CRIU cannot dump a descriptor that points outside the
//! container's mounts). No registry is needed, and nothing is fetched.
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A root filesystem in a temporary directory, removed on drop.
#[derive(Debug)]
pub struct Rootfs {
    dir: tempfile::TempDir,
}

impl Rootfs {
    /// Builds a root filesystem holding `binaries` (each at the same path
    /// as on the host), their libraries and `/bin/sh`.
    pub fn build(binaries: &[&Path]) -> io::Result<Rootfs> {
        let dir = tempfile::Builder::new()
            .prefix("shepherd-rootfs-")
            .tempdir()?;
        let root = dir.path();
        for d in ["bin", "dev", "proc", "sys", "tmp", "data", "etc"] {
            fs::create_dir_all(root.join(d))?;
        }
        fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n")?;
        fs::write(root.join("etc/group"), "root:x:0:\n")?;
        let sh = Path::new("/bin/sh");
        let mut files: Vec<PathBuf> = vec![fs::canonicalize(sh)?];
        for b in binaries.iter().copied().chain([sh]) {
            files.extend(libraries(b)?);
        }
        for b in binaries {
            copy_into(root, b, b)?;
        }
        // /bin/sh is usually a link (to dash): the container gets the file.
        copy_into(root, &files[0], sh)?;
        for lib in &files[1..] {
            copy_into(root, lib, lib)?;
        }
        Ok(Rootfs { dir })
    }

    /// The root filesystem's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// The shared libraries `ldd` lists for `bin` (absolute paths, the dynamic
/// loader included).
fn libraries(bin: &Path) -> io::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ldd {}: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

/// Copies host file `from` to `at` inside `root` (following links).
fn copy_into(root: &Path, from: &Path, at: &Path) -> io::Result<()> {
    let rel = at.strip_prefix("/").unwrap_or(at);
    let to = root.join(rel);
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, &to)
        .map(|_| ())
        .map_err(|e| io::Error::other(format!("copy {} into the rootfs: {e}", from.display())))
}
