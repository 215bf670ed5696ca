//! The API's Unix socket: created mode 0600 in a 0700 directory, refusing to
//! take over a socket another agent is serving.
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another shepherd agent is already serving the API at {0}; stop it first, or give this one another --api-socket")]
    InUse(String),
    #[error("cannot create the API socket {path}: {source}")]
    Create { path: String, source: io::Error },
}

/// Binds the API socket at `path` (replacing a stale socket file).
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, SocketError> {
    let shown = path.display().to_string();
    let create = |source| SocketError::Create {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::private_dir::ensure(dir).map_err(|e| match e {
            crate::private_dir::DirError::Io(e) => create(e),
            crate::private_dir::DirError::Unsafe(m) => create(std::io::Error::other(m)),
        })?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(SocketError::InUse(shown));
        }
        std::fs::remove_file(path).map_err(create)?;
    }
    // Bind under a restrictive umask so the socket is never briefly
    // accessible to others, then set the mode explicitly.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = tokio::net::UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(create)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(create)?;
    Ok(listener)
}
