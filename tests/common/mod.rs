//! Test harness: fixture paths, and [`Mount`], a live `aifs-mountd` on a
//! temp directory that is always unmounted, even when a test panics.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A model file made by `scripts/fixtures.py`.
pub fn fixture(name: &str) -> PathBuf {
    let path = repo().join("target/fixtures").join(name);
    assert!(
        path.exists(),
        "missing fixture {}: run scripts/test.sh (or .venv/bin/python scripts/fixtures.py)",
        path.display()
    );
    path
}

/// The ONNX Runtime library `scripts/setup.sh` installs.
pub fn onnxruntime() -> PathBuf {
    let path = repo().join(".deps/onnxruntime/onnxruntime/capi").join(aifs::backend::ONNXRUNTIME_LIB);
    assert!(path.exists(), "missing {}: run scripts/setup.sh", path.display());
    path
}

/// `target/<profile>/aifs-mountd`, built by `cargo build --workspace`.
/// `cargo test` does not rebuild another package's binary, so a daemon
/// older than the sources is refused rather than silently tested.
pub fn daemon_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("aifs-mountd");
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("missing {}: run cargo build --workspace (scripts/test.sh does)", bin.display()));
    // Cargo lists the workspace sources the binary was built from in its
    // dep-info file (`<bin>: src1 src2 ...`, spaces in paths escaped).
    let dep_info = std::fs::read_to_string(bin.with_extension("d")).unwrap_or_default();
    let sources = dep_info.split_once(": ").map_or("", |(_, deps)| deps).replace("\\ ", "\0");
    let sources: Vec<PathBuf> = sources
        .split_whitespace()
        .map(|p| PathBuf::from(p.replace('\0', " ")))
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    if let Some(other) = sources.iter().find(|p| !p.starts_with(repo())) {
        panic!("{} was built from {}, not this checkout: run cargo build --workspace", bin.display(), other.display());
    }
    let newest_source = sources
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok()?.modified().ok())
        .max()
        .expect("the binary's dep-info names its sources");
    assert!(
        built >= newest_source,
        "{} is older than the sources: run cargo build --workspace (scripts/test.sh does)",
        bin.display()
    );
    bin
}

pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = path.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(path))
}

/// Runs a bash command line in `cwd`.
pub fn sh(cwd: &Path, cmd: &str) -> Output {
    Command::new("bash").arg("-c").arg(cmd).current_dir(cwd).output().unwrap()
}

/// Like [`sh`], but the command must succeed; returns its stdout.
pub fn sh_ok(cwd: &Path, cmd: &str) -> String {
    let out = sh(cwd, cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Like [`sh`], but the command must fail with `message` on stderr.
pub fn sh_err(cwd: &Path, cmd: &str, message: &str) {
    let out = sh(cwd, cmd);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "`{cmd}` succeeded");
    assert!(stderr.contains(message), "`{cmd}`: expected {message:?} in {stderr:?}");
}

pub fn errno(result: std::io::Result<impl std::fmt::Debug>) -> i32 {
    result.expect_err("expected an error").raw_os_error().expect("an OS error")
}

/// A live daemon on `<tmp>/mnt` with its data in `<tmp>/data`, logging to
/// `<tmp>/daemon.log`.
pub struct Mount {
    pub dir: tempfile::TempDir,
    pub mnt: PathBuf,
    pub data: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

impl Mount {
    pub fn start() -> Mount {
        Mount::start_with(&[])
    }

    pub fn start_with(args: &[&str]) -> Mount {
        Mount::start_with_env(args, &[])
    }

    /// With these variables in the daemon's environment.
    pub fn start_with_env(args: &[&str], env: &[(&str, String)]) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        // Let other uids (the permission tests' `nobody`) reach the mount point.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut m = Mount {
            mnt: dir.path().join("mnt"),
            data: dir.path().join("data"),
            log: dir.path().join("daemon.log"),
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
            child: None,
        };
        m.spawn();
        m
    }

    /// Starts the daemon (again) on the same data dir and mount point.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        // After a SIGKILL the kernel may still answer `stat` from its cache,
        // so wait for this daemon's own "mounted" line.
        let mounted = |m: &Mount| m.log_text().matches("aifs_mountd: mounted").count();
        let before = mounted(self);
        let log = OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(daemon_bin())
            .arg(&self.mnt)
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--foreground")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(mounted(self) > before && self.mnt.join("status").exists()) {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!("daemon exited with {status} before mounting:\n{}", self.log_text());
            }
            assert!(Instant::now() < deadline, "daemon did not mount in 30 s:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut child, Duration::from_secs(20)).expect("daemon did not exit within 20 s of SIGTERM")
    }

    /// SIGKILL: the daemon dies mid-whatever and leaves a stale mount.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("daemon running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Entries of the blob directory on disk (temp files included).
    pub fn blob_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.data.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt) {
            let path = std::ffi::CString::new(self.mnt.to_str().unwrap()).unwrap();
            // SAFETY: a valid C string.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        // --shared bound the mount point's directory (the temp dir) onto itself.
        if self.args.iter().any(|a| a == "--shared") {
            let path = std::ffi::CString::new(self.dir.path().to_str().unwrap()).unwrap();
            // SAFETY: a valid C string.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// sha256 of a file, by the coreutils tool (an independent reference).
pub fn sha256sum(path: &Path) -> String {
    let out = sh_ok(Path::new("/"), &format!("sha256sum '{}'", path.display()));
    out.split_whitespace().next().unwrap().to_string()
}

pub fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref()).unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
}

pub fn touch_file(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).create(true).truncate(true).open(path)
}

/// A model file made by `scripts/models.py` (`target/fixtures/models/`).
pub fn model_fixture(name: &str) -> PathBuf {
    fixture(&format!("models/{name}"))
}

/// `mkdir models/<model> && cp <file> models/<model>/`; returns `models/<model>/v1`.
pub fn import(m: &Mount, model: &str, file: &Path) -> PathBuf {
    sh_ok(&m.mnt, &format!("mkdir models/{model} && cp {} models/{model}/", file.display()));
    m.path(&format!("models/{model}/v1"))
}

/// One handle: open read-write, write the request, read the response.
pub fn one_handle(infer: &Path, body: &[u8]) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Write};
    let mut f = OpenOptions::new().read(true).write(true).open(infer)?;
    f.write_all(body)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

/// `close(2)`, with its error (dropping a `File` ignores it).
pub fn close(f: File) -> Result<(), i32> {
    use std::os::fd::IntoRawFd;
    // SAFETY: we own the descriptor and close it once.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap()),
    }
}

/// Writes a whole file and closes it, returning the close's errno.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), i32> {
    use std::io::Write;
    let mut f = OpenOptions::new().write(true).truncate(true).open(path).map_err(|e| e.raw_os_error().unwrap())?;
    f.write_all(bytes).map_err(|e| e.raw_os_error().unwrap())?;
    close(f)
}

pub fn newest_job(m: &Mount) -> u64 {
    std::fs::read_dir(m.path("jobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse::<u64>().unwrap())
        .max()
        .expect("a job")
}

pub fn job_file(m: &Mount, id: u64, file: &str) -> String {
    read(m.path(&format!("jobs/{id}/{file}")))
}
