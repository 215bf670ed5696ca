//! Pinning a tcx link that a program still owns, by id: aya pins a link
//! only by consuming it, and the agent must keep its own while the
//! successor opens the pin (and keep serving with it if the hand-over
//! fails). Two `bpf(2)` commands: `BPF_LINK_GET_FD_BY_ID` opens a second
//! descriptor for the link, `BPF_OBJ_PIN` pins that. And [`BpfDir`], where
//! a successor pins what a hand-over passed it, to open it with aya.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, fully initialised `bpf_attr` prefix of the
    // size passed; the kernel reads (and for some commands writes) only that.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r)
}

/// Opens a new descriptor for link `id`.
pub fn link_fd(id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetFdById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    let fd = bpf(BPF_LINK_GET_FD_BY_ID, &mut attr)?;
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
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
