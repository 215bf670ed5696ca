//! The agent's private directory: where its API socket and lock live. It
//! must be the agent's alone, or another user could replace the socket or
//! take the lock.
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

#[derive(Debug)]
pub enum DirError {
    Io(io::Error),
    /// The directory exists but others could write to it.
    Unsafe(String),
}

/// Creates `dir` (mode 0700) if missing, and checks that it belongs to this
/// process's user and that no one else can write to it.
pub fn ensure(dir: &Path) -> Result<(), DirError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(DirError::Io)?;
    }
    // Not through a symlink: its target could be swapped after the check.
    let meta = std::fs::symlink_metadata(dir).map_err(DirError::Io)?;
    if !meta.is_dir() {
        return Err(DirError::Unsafe(format!(
            "{} is not a directory (a symlink is refused); give another --api-socket",
            dir.display()
        )));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || meta.mode() & 0o022 != 0 {
        return Err(DirError::Unsafe(format!(
            "{} belongs to uid {} with mode {:o}; the agent's socket and lock must be in a \
             directory only it can write to (chown to uid {me}, chmod 0700), or give another \
             --api-socket",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let t = std::env::temp_dir().join(format!("shepherd-private-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&t);
        ensure(&t).expect("created");
        let mode = std::fs::metadata(&t).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = ensure(&t).expect_err("world-writable");
        assert!(
            matches!(e, DirError::Unsafe(ref m) if m.contains("chmod 0700")),
            "{e:?}"
        );
        let _ = std::fs::remove_dir_all(&t);
    }
}
