//! The `bpf(2)` commands the hand-over needs that aya does not offer on a
//! plain descriptor: creating a tcx link this agent owns as a descriptor
//! (so that it can hand a duplicate to a successor without
//! `BPF_LINK_GET_FD_BY_ID`, which needs CAP_SYS_ADMIN), swapping a link's
//! program (`BPF_LINK_UPDATE`), and pinning an object (a successor pins
//! the maps it received, for aya's loader to reuse them). And [`BpfDir`],
//! where a successor pins them for the load.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised `bpf_attr` prefix of the
    // size passed; the kernel reads (and for some commands writes) only that.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Attaches the loaded program `prog` to interface `ifindex` (ingress or
/// egress) as a tcx link, last in the interface's chain; the link lives as
/// long as a descriptor of it does.
pub fn tcx_link(prog: BorrowedFd<'_>, ifindex: u32, ingress: bool) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        relative_fd: u32,
        _pad: u32,
        expected_revision: u64,
    }
    let mut attr = LinkCreate {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: if ingress {
            BPF_TCX_INGRESS
        } else {
            BPF_TCX_EGRESS
        },
        flags: 0,
        relative_fd: 0,
        _pad: 0,
        expected_revision: 0,
    };
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `link` run `prog` instead of its program, atomically.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdate {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(|_| ())
}

/// Pins the BPF object `fd` refers to at `path` (on bpffs).
pub fn pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the pin path"))?;
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let mut attr = ObjPin {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
}

/// bpffs's `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A directory on bpffs where a successor pins what it received, for as
/// long as it loads: `/sys/fs/bpf` if bpffs is mounted there, else a
/// private bpffs instance mounted on a fresh directory next to the API
/// socket (`ip netns exec` and some containers give a process a `/sys`
/// without one). Removed, and unmounted, on drop.
pub struct BpfDir {
    path: std::path::PathBuf,
    mounted: bool,
}

impl BpfDir {
    /// `spare`: a root-only directory to mount a private instance under.
    pub fn new(spare: &Path) -> io::Result<Self> {
        let name = format!("shepherd-takeover-{}", std::process::id());
        if is_bpffs(Path::new("/sys/fs/bpf")) {
            let path = Path::new("/sys/fs/bpf").join(&name);
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir(&path)?;
            return Ok(Self {
                path,
                mounted: false,
            });
        }
        let path = spare.join(&name);
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)?;
        let c = |s: &str| CString::new(s).map_err(|_| io::ErrorKind::InvalidInput);
        use std::os::unix::ffi::OsStrExt;
        let target = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let (src, fs) = (c("bpf")?, c("bpf")?);
        // SAFETY: NUL-terminated strings, no data argument.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fs.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "no bpffs at /sys/fs/bpf, and mounting one at {} failed: {e}",
                    path.display()
                ),
            ));
        }
        Ok(Self {
            path,
            mounted: true,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.path) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        if self.mounted {
            use std::os::unix::ffi::OsStrExt;
            if let Ok(t) = CString::new(self.path.as_os_str().as_bytes()) {
                // SAFETY: a NUL-terminated path.
                unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
            }
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn is_bpffs(p: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a live out-parameter.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    r == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Removes the pin directories successors left in `/sys/fs/bpf` (one that
/// died while loading). Call only when no agent runs (a fresh start holds
/// the agent lock): a successor loading right now would lose its pins.
pub fn sweep_stale() {
    let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("shepherd-takeover-") {
            continue;
        }
        if let Ok(pins) = std::fs::read_dir(e.path()) {
            for p in pins.flatten() {
                let _ = std::fs::remove_file(p.path());
            }
        }
        if std::fs::remove_dir(e.path()).is_ok() {
            tracing::info!(dir = %e.path().display(), "removed a dead successor's pins");
        }
    }
}
