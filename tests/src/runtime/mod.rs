//! Pods as real OCI containers, run, checkpointed and restored by runc: the
//! runtime CRI-O and containerd drive underneath the kubelet.
//!
//! A [`RuncPod`] is one pod: one or more containers joining one network
//! namespace by path, as the containers of a Kubernetes pod join their
//! sandbox's. Its root filesystem is built from this machine's files
//! ([`Rootfs`]); its runc state (`runc --root`), bundles, CRIU config files
//! and logs live in a temporary directory of its own, so nothing it does
//! touches another runc user. Dropping it kills and deletes its containers.
//!
//! It is a [`Checkpointer`]: `runc checkpoint` of every container into one
//! directory of images each, `runc restore` of each into a bundle whose
//! network namespace is the destination's. [`RuncOpts`] says how, the way a
//! node would:
//! - `leave_running`: the checkpoint leaves the containers running, as the
//!   kubelet's checkpoint API does; [`Checkpointer::retire_original`] then
//!   stops them, and their sockets close (Shepherd's hold keeps that from
//!   the clients).
//! - `node_criu_conf`: TCP handling comes from the CRIU config file that
//!   runc reads, as a Kubernetes node's `/etc/criu/runc.conf` sets it (here
//!   the `org.criu.config` annotation, so nothing outside the test's own
//!   directory changes), not from runc's `--tcp-established`: CRI-O passes
//!   no TCP flag, and runc has no `--tcp-close` at all. The same lines serve
//!   the checkpoint and the restore: `tcp-established` lets a checkpoint
//!   take connected sockets, and `tcp-close` makes a restore bring them
//!   back closed (it wins over `tcp-established` there).
//! - `lo_on_restore`: addresses a CRIU action script puts on the new
//!   namespace's `lo` at the `setup-namespaces` stage, before any socket is
//!   bound: TCP sockets bound to the pod's old address then restore at its
//!   new one.
//!
//! Runc needs CRIU ≥ 4.2 first on its PATH (`/usr/local/sbin`, where
//! `cargo xtask setup` puts it). The calling process becomes a child
//! subreaper, so containers' init processes (detached by runc) are reaped
//! here and never linger as zombies.
use crate::controller::{reap, Checkpointer};
use crate::criu::{self, become_subreaper, Images, TcpRestore};
use crate::netns::Netns;
use serde_json::{json, Value};
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod rootfs;
pub use rootfs::Rootfs;

/// The runc binary (Debian's package).
const RUNC: &str = "runc";
/// How long a stopped container may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// One container of a pod: a name (unique in the pod) and the command it
/// runs, with its standard streams on the container's own `/dev/null`.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    pub name: String,
    pub argv: Vec<String>,
}

impl ContainerSpec {
    pub fn new(name: &str, argv: &[&str]) -> ContainerSpec {
        ContainerSpec {
            name: name.to_string(),
            argv: argv.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// redis-server on `port`, on every address, keeping nothing on disk.
    pub fn redis(name: &str, port: u16) -> ContainerSpec {
        let mut argv = vec![REDIS_SERVER.to_string()];
        argv.extend(redis_server_args(port, Path::new("/tmp")));
        ContainerSpec {
            name: name.to_string(),
            argv,
        }
    }
}

/// Debian's redis-server.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// redis-server's arguments for a pod: `port` on every address, no
/// protected mode, nothing saved (`dir` is its working directory).
pub fn redis_server_args(port: u16, dir: &Path) -> Vec<String> {
    [
        "--port",
        &port.to_string(),
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        &dir.to_string_lossy(),
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

/// How a [`RuncPod`] is checkpointed and restored (see the module doc).
#[derive(Debug, Clone, Default)]
pub struct RuncOpts {
    pub leave_running: bool,
    /// The node's CRIU config lines; empty: runc's TCP flags instead.
    pub node_criu_conf: Vec<String>,
    pub lo_on_restore: Vec<Ipv4Addr>,
}

/// A pod of runc containers; see the module doc.
#[derive(Debug)]
pub struct RuncPod {
    containers: Vec<ContainerSpec>,
    /// Container ids are `{prefix}{name}`.
    prefix: String,
    pub opts: RuncOpts,
    /// The init pid of each running container, for reaping.
    pids: Vec<u32>,
    rootfs: Rootfs,
    state: tempfile::TempDir,
}

impl RuncPod {
    /// Runs `containers` in `ns`, on `rootfs`. On failure, what was started
    /// is removed again.
    pub fn start(
        ns: &Netns,
        prefix: &str,
        rootfs: Rootfs,
        containers: Vec<ContainerSpec>,
        opts: RuncOpts,
    ) -> Result<RuncPod, String> {
        become_subreaper().map_err(|e| format!("PR_SET_CHILD_SUBREAPER: {e}"))?;
        criu::criu().map_err(|e| e.to_string())?;
        let state = tempfile::Builder::new()
            .prefix("shepherd-runc-")
            .tempdir()
            .map_err(|e| format!("runc state dir: {e}"))?;
        let mut pod = RuncPod {
            containers,
            prefix: prefix.to_string(),
            opts,
            pids: Vec::new(),
            rootfs,
            state,
        };
        for c in pod.containers.clone() {
            let bundle = pod.bundle(&c, ns)?;
            pod.runc(
                &[
                    "run",
                    "--detach",
                    "--bundle",
                    &path_str(&bundle),
                    &pod.id(&c),
                ],
                &format!("run-{}", c.name),
            )?;
        }
        pod.pids = pod.live_pids();
        Ok(pod)
    }

    /// Names of the pod's containers.
    pub fn container_names(&self) -> Vec<String> {
        self.containers.iter().map(|c| c.name.clone()).collect()
    }

    /// The init pid of each container that runs now.
    pub fn live_pids(&self) -> Vec<u32> {
        self.containers
            .iter()
            .filter_map(|c| self.state_of(c))
            .filter(|(status, _)| status == "running")
            .map(|(_, pid)| pid)
            .collect()
    }

    fn id(&self, c: &ContainerSpec) -> String {
        format!("{}{}", self.prefix, c.name)
    }

    /// (`status`, `pid`) of `runc state`, if runc knows the container.
    fn state_of(&self, c: &ContainerSpec) -> Option<(String, u32)> {
        let out = self.command(&["state", &self.id(c)]).output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some((
            v["status"].as_str()?.to_string(),
            u32::try_from(v["pid"].as_u64()?).ok()?,
        ))
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(RUNC);
        cmd.arg("--root")
            .arg(self.state.path().join("runc"))
            .args(args)
            // runc runs `criu swrk` from PATH: 4.2 first.
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `runc ARGS`; its output goes to `{what}.log` in the state dir,
    /// whose tail an error carries.
    fn runc(&self, args: &[&str], what: &str) -> Result<(), String> {
        let log = self.state.path().join(format!("{what}.log"));
        let file = fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = file
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let status = self
            .command(args)
            .stdout(file)
            .stderr(err)
            .status()
            .map_err(|e| format!("spawn runc: {e} (is runc installed? `cargo xtask setup`)"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!(
                "`runc {}` failed ({status}): {}",
                args.join(" "),
                criu::log_tail(&log, 10)
            ))
        }
    }

    /// The bundle that runs container `c` in `ns` (made once per pair).
    fn bundle(&self, c: &ContainerSpec, ns: &Netns) -> Result<PathBuf, String> {
        let dir = self
            .state
            .path()
            .join("bundles")
            .join(format!("{}-{}", c.name, ns.name()));
        let config = dir.join("config.json");
        if config.exists() {
            return Ok(dir);
        }
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        self.runc(
            &["spec", "--bundle", &path_str(&dir)],
            &format!("spec-{}", c.name),
        )?;
        let text = fs::read_to_string(&config).map_err(|e| format!("{}: {e}", config.display()))?;
        let mut spec: Value =
            serde_json::from_str(&text).map_err(|e| format!("runc spec's config.json: {e}"))?;
        spec["root"] = json!({ "path": path_str(self.rootfs.path()), "readonly": true });
        spec["hostname"] = json!(c.name);
        // The command, with its standard streams on the container's own
        // /dev/null ("$0" "$@": no quoting of the arguments).
        let mut args = vec![
            "/bin/sh".to_string(),
            "-c".to_string(),
            "exec \"$0\" \"$@\" </dev/null >/dev/null 2>&1".to_string(),
        ];
        args.extend(c.argv.iter().cloned());
        spec["process"]["args"] = json!(args);
        spec["process"]["terminal"] = json!(false);
        let namespaces = spec["linux"]["namespaces"]
            .as_array_mut()
            .ok_or("runc spec has no linux.namespaces")?;
        namespaces.retain(|n| n["type"] != "network");
        namespaces.push(json!({ "type": "network", "path": path_str(ns.path()) }));
        spec["annotations"] = json!({ "org.criu.config": path_str(&self.criu_conf(c)) });
        fs::write(&config, spec.to_string()).map_err(|e| format!("{}: {e}", config.display()))?;
        Ok(dir)
    }

    /// The CRIU config file runc hands CRIU for container `c` (the
    /// `org.criu.config` annotation of its bundles).
    fn criu_conf(&self, c: &ContainerSpec) -> PathBuf {
        self.state.path().join(format!("{}.criu.conf", c.name))
    }

    /// Writes every container's CRIU config file: `lines`, one option each.
    fn write_criu_confs(&self, lines: &[String]) -> Result<(), String> {
        for c in &self.containers {
            let p = self.criu_conf(c);
            fs::write(&p, lines.join("\n") + "\n").map_err(|e| format!("{}: {e}", p.display()))?;
        }
        Ok(())
    }

    /// The action script that puts `opts.lo_on_restore` on the restored
    /// namespace's `lo` before CRIU binds any socket.
    fn lo_script(&self) -> Result<PathBuf, String> {
        let p = self.state.path().join("lo-addrs.sh");
        let addrs: Vec<String> = self
            .opts
            .lo_on_restore
            .iter()
            .map(|a| format!("{a}/32"))
            .collect();
        let script = format!(
            "#!/bin/sh\n\
             # CRIU action script: old pod addresses on the new namespace's lo.\n\
             [ \"$CRTOOLS_SCRIPT_ACTION\" = setup-namespaces ] || exit 0\n\
             for a in {}; do\n\
             \x20 nsenter -t \"$CRTOOLS_INIT_PID\" -n ip addr replace \"$a\" dev lo || exit 1\n\
             done\n",
            addrs.join(" ")
        );
        fs::write(&p, script).map_err(|e| format!("{}: {e}", p.display()))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(p)
    }

    /// Stops container `c` (SIGTERM, then SIGKILL after a grace), deletes
    /// it, and reaps its init.
    fn stop(&self, c: &ContainerSpec) {
        let pid = self.state_of(c).map(|(_, p)| p);
        let _ = self.runc(&["kill", &self.id(c), "TERM"], &format!("kill-{}", c.name));
        let t0 = Instant::now();
        while self.state_of(c).is_some_and(|(s, _)| s == "running") && t0.elapsed() < STOP_GRACE {
            std::thread::sleep(Duration::from_millis(10));
        }
        self.remove(c, pid);
    }

    /// Kills container `c` (whose init was `pid`), deletes it, and reaps
    /// the init.
    fn remove(&self, c: &ContainerSpec, pid: Option<u32>) {
        let id = self.id(c);
        let _ = self.runc(&["kill", &id, "KILL"], &format!("kill-{}", c.name));
        if self
            .runc(&["delete", "--force", &id], &format!("delete-{}", c.name))
            .is_err()
        {
            eprintln!("warning: runc container {id} could not be deleted");
        }
        if let Some(pid) = pid {
            reap(pid, Duration::from_secs(2));
        }
    }

    fn images_of(images: &Images, c: &ContainerSpec) -> (PathBuf, PathBuf) {
        (
            images.path().join(&c.name),
            images.root().join(format!("work-{}", c.name)),
        )
    }
}

impl Checkpointer for RuncPod {
    fn checkpoint(&mut self, from: &Netns, images: &Images) -> Result<(), String> {
        self.write_criu_confs(&self.opts.node_criu_conf)?;
        let containers = self.containers.clone();
        for (i, c) in containers.iter().enumerate() {
            let (dir, work) = Self::images_of(images, c);
            for d in [&dir, &work] {
                fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            }
            let (dir, work, id) = (path_str(&dir), path_str(&work), self.id(c));
            let mut args = vec!["checkpoint", "--image-path", &dir, "--work-path", &work];
            if self.opts.node_criu_conf.is_empty() {
                args.push("--tcp-established");
            }
            if self.opts.leave_running {
                args.push("--leave-running");
            }
            args.push(&id);
            if let Err(e) = self.runc(&args, &format!("checkpoint-{}", c.name)) {
                // CRIU rolled this one back; the ones before it stopped
                // (unless left running) and go back where they were.
                if !self.opts.leave_running && i > 0 {
                    for pid in &self.pids {
                        reap(*pid, Duration::from_secs(2));
                    }
                    for done in &containers[..i] {
                        let _ = self.restore_one(done, from, images, TcpRestore::Established);
                    }
                    self.pids = self.live_pids();
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn retire_original(&mut self) {
        if self.opts.leave_running {
            for c in &self.containers {
                self.stop(c);
            }
        } else {
            // The checkpoint ended them: reap their inits.
            for pid in &self.pids {
                reap(*pid, Duration::from_secs(2));
            }
        }
        self.pids.clear();
    }

    fn restore(&mut self, into: &Netns, images: &Images, tcp: TcpRestore) -> Result<(), String> {
        let mut conf = self.opts.node_criu_conf.clone();
        if tcp == TcpRestore::Close && conf.is_empty() {
            conf.push("tcp-close".to_string());
        }
        if !self.opts.lo_on_restore.is_empty() {
            conf.push(format!("action-script {}", path_str(&self.lo_script()?)));
        }
        self.write_criu_confs(&conf)?;
        let containers = self.containers.clone();
        for (i, c) in containers.iter().enumerate() {
            if let Err(e) = self.restore_one(c, into, images, tcp) {
                // Known limit: the containers already restored here are
                // stopped, and their restored sockets' FINs reach the
                // proxy during the hold, so those connections end at the
                // abort even though the pod goes back where it was.
                for done in &containers[..i] {
                    self.stop(done);
                }
                return Err(e);
            }
        }
        self.pids = self.live_pids();
        Ok(())
    }
}

impl RuncPod {
    fn restore_one(
        &self,
        c: &ContainerSpec,
        into: &Netns,
        images: &Images,
        tcp: TcpRestore,
    ) -> Result<(), String> {
        let bundle = path_str(&self.bundle(c, into)?);
        let (dir, work) = Self::images_of(images, c);
        fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let (dir, work, id) = (path_str(&dir), path_str(&work), self.id(c));
        let mut args = vec![
            "restore",
            "--detach",
            "--bundle",
            &bundle,
            "--image-path",
            &dir,
            "--work-path",
            &work,
        ];
        if tcp == TcpRestore::Established && self.opts.node_criu_conf.is_empty() {
            args.push("--tcp-established");
        }
        args.push(&id);
        self.runc(&args, &format!("restore-{}", c.name))
            .map_err(|e| {
                let log = Path::new(&work).join("restore.log");
                format!(
                    "{e}\nCRIU's restore log ({}):\n{}",
                    log.display(),
                    criu::log_tail(&log, 15)
                )
            })
    }
}

impl Drop for RuncPod {
    fn drop(&mut self) {
        for c in &self.containers {
            if let Some((_, pid)) = self.state_of(c) {
                self.remove(c, Some(pid));
            }
        }
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
