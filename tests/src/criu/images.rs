//! [`Images`]: a temporary directory of CRIU images and CRIU's logs.
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A temporary directory of CRIU images, removed (and unmounted, for
/// [`Images::on_tmpfs`]) on drop.
///
/// Layout: `ROOT/images/` is CRIU's `-D`; `ROOT/dump.log`, `ROOT/restore.log`,
/// `ROOT/restore.pid` and CRIU's captured output sit beside it.
#[derive(Debug)]
pub struct Images {
    root: tempfile::TempDir,
    dir: PathBuf,
    tmpfs: bool,
}

impl Default for Images {
    fn default() -> Images {
        Images::new()
    }
}

impl Images {
    /// An empty image directory under the system's temp dir. Panics if it
    /// can't be made.
    pub fn new() -> Images {
        let root = tempfile::Builder::new()
            .prefix("shepherd-criu-")
            .tempdir()
            .unwrap_or_else(|e| panic!("criu images: make a temp dir: {e}"));
        let dir = root.path().join("images");
        fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Images {
            root,
            dir,
            tmpfs: false,
        }
    }

    /// An empty image directory that is a tmpfs of `size_bytes` of its own, so
    /// that a dump runs out of space half-way (a few KiB holds CRIU's first
    /// small images, not the memory pages). Unmounted on drop. Panics if the
    /// tmpfs can't be mounted.
    pub fn on_tmpfs(size_bytes: u64) -> Images {
        let mut images = Images::new();
        let target = CString::new(images.dir.as_os_str().as_bytes())
            .unwrap_or_else(|_| panic!("NUL in {}", images.dir.display()));
        let data = CString::new(format!("size={size_bytes},mode=0700")).expect("no NUL");
        // SAFETY: every pointer is a valid NUL-terminated string that outlives
        // the call; mount(2) reads them and keeps none.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            panic!(
                "mount a {size_bytes}-byte tmpfs on {}: {}",
                images.dir.display(),
                io::Error::last_os_error()
            );
        }
        images.tmpfs = true;
        images
    }

    /// The image directory (CRIU's `-D`).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The temporary directory holding the image directory and the logs;
    /// removed on drop.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Whether the image directory is a tmpfs of its own.
    pub fn is_tmpfs(&self) -> bool {
        self.tmpfs
    }

    /// Path of the dump's log.
    pub fn dump_log_path(&self) -> PathBuf {
        self.root.path().join("dump.log")
    }

    /// Path of the restore's log.
    pub fn restore_log_path(&self) -> PathBuf {
        self.root.path().join("restore.log")
    }

    /// The last dump's log (empty if none).
    pub fn dump_log(&self) -> String {
        fs::read_to_string(self.dump_log_path()).unwrap_or_default()
    }

    /// The last restore's log (empty if none).
    pub fn restore_log(&self) -> String {
        fs::read_to_string(self.restore_log_path()).unwrap_or_default()
    }

    pub(super) fn pidfile(&self) -> PathBuf {
        self.root.path().join("restore.pid")
    }

    /// Names of the image files, sorted.
    pub fn files(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Total size of the image files, in bytes (a container runtime's
    /// checkpoint keeps one directory of images per container: counted too).
    pub fn total_bytes(&self) -> u64 {
        tree_bytes(&self.dir)
    }

    /// Copies every image file (and per-container directory of them) into
    /// a new [`Images`] ("moving the images to node B"). Panics on an I/O
    /// error.
    pub fn copy_to(&self) -> Images {
        let to = Images::new();
        copy_tree(&self.dir, &to.dir);
        to
    }
}

fn tree_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| Some((e.path(), e.metadata().ok()?)))
                .map(|(p, m)| if m.is_dir() { tree_bytes(&p) } else { m.len() })
                .sum()
        })
        .unwrap_or(0)
}

fn copy_tree(from: &Path, to: &Path) {
    let entries = fs::read_dir(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
    for e in entries.filter_map(Result::ok) {
        let (src, dst) = (e.path(), to.join(e.file_name()));
        match e.metadata() {
            Ok(m) if m.is_dir() => {
                fs::create_dir(&dst).unwrap_or_else(|e| panic!("create {}: {e}", dst.display()));
                copy_tree(&src, &dst);
            }
            Ok(m) if m.is_file() => {
                fs::copy(&src, &dst)
                    .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
            }
            _ => {}
        }
    }
}

impl Drop for Images {
    fn drop(&mut self) {
        if !self.tmpfs {
            return;
        }
        let Ok(target) = CString::new(self.dir.as_os_str().as_bytes()) else {
            return;
        };
        // SAFETY: `target` is a valid NUL-terminated path. MNT_DETACH: the
        // tmpfs goes even if something still has it open.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "warning: umount {}: {}",
                self.dir.display(),
                io::Error::last_os_error()
            );
        }
        // `root` (a TempDir) then removes the directories.
    }
}
