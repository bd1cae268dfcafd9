//! Run as file systems and daemons are run: `mount -t fuse.aifs`, an fstab
//! line (`mount -a`), `umount`, the systemd unit (it verifies, and the
//! daemon says READY=1 once mounted), and clients in containers: new mount
//! and PID namespaces, a busybox root, other uids, across a restart of the
//! daemon.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Whether this kernel lets us make mount namespaces (as root it does; an
/// unprivileged run may be refused). The tests that need one skip, saying
/// why, when not.
fn namespaces_allowed(test: &str) -> bool {
    let ok = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("{test}: skipped: this kernel refuses us a mount namespace (unshare --mount failed)");
    }
    ok
}

/// `scripts/install.sh --prefix DIR` with this checkout's binary.
fn install(prefix: &Path) {
    let out = Command::new(repo().join("scripts/install.sh"))
        .arg("--prefix")
        .arg(prefix)
        .arg("--binary")
        .arg(daemon_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "install.sh: {}", String::from_utf8_lossy(&out.stderr));
}

/// Runs `script` with bash in a private mount namespace, the installed
/// prefix bound over /usr/local (where mount(8) lets helpers find `aifs`):
/// nothing outside the test's temp dir changes.
fn in_private_namespace(prefix: &Path, script: &str) -> String {
    let full = format!("set -euo pipefail\nmount --bind {} /usr/local\n{script}", prefix.display());
    let out =
        Command::new("unshare").args(["--mount", "--propagation", "private", "bash", "-c", &full]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "script failed:\n{text}");
    text
}

#[test]
fn mount_t_fuse_aifs_fstab_and_umount() {
    if !namespaces_allowed("mount_t_fuse_aifs_fstab_and_umount") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    install(&prefix);
    let (mnt, data) = (tmp.path().join("mnt"), tmp.path().join("data"));
    std::fs::create_dir(&mnt).unwrap();
    // Waits for the daemon's n-th clean stop, and prints it.
    let stopped = |n: u32| {
        format!(
            "for i in $(seq 100); do [ $(grep -c 'unmounted; bye' {0}/aifs-mountd.log) -ge {n} ] && break; sleep 0.1; done; \
             echo \"stops $(grep -c 'unmounted; bye' {0}/aifs-mountd.log)\"",
            data.display()
        )
    };
    let request = format!("[{:?}]", [1.0f32; 16]);
    let script = format!(
        r#"
trap 'umount -l {mnt} 2>/dev/null || true' EXIT
mount -t fuse.aifs aifs {mnt} -o data_dir={data},allow_other,threads=2
grep -q '"version"' {mnt}/status
mkdir {mnt}/models/m && cp {mlp} {mnt}/models/m/
echo '{request}' > {mnt}/models/m/v1/infer && echo "answer $(cat {mnt}/models/m/v1/infer)"
umount {mnt}
{stopped1}
echo "aifs {mnt} fuse.aifs data_dir={data},allow_other,nofail 0 0" > {fstab}
mount -a -T {fstab}
mount -a -T {fstab}
echo "mounts $(grep -c ' {mnt} ' /proc/self/mountinfo)"
echo "models $(ls {mnt}/models)"
umount {mnt}
{stopped2}
"#,
        mnt = mnt.display(),
        data = data.display(),
        mlp = fixture("mlp.onnx").display(),
        fstab = tmp.path().join("fstab").display(),
        stopped1 = stopped(1),
        stopped2 = stopped(2),
    );
    let out = in_private_namespace(&prefix, &script);
    assert!(out.contains("answer [["), "{out}");
    assert!(out.contains("mounts 1\n"), "mount -a twice mounts once: {out}");
    assert!(out.contains("models m\n"), "{out}");
    // Each umount stopped the daemon cleanly: engine stopped, records flushed.
    assert!(out.contains("stops 1\n") && out.contains("stops 2\n"), "{out}");
    assert!(!is_mounted(&mnt));
}

#[test]
fn the_systemd_unit_verifies_and_the_daemon_says_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    install(&prefix);
    let unit = prefix.join("lib/systemd/system/aifs.service");
    let text = std::fs::read_to_string(&unit).unwrap();
    assert!(text.contains("Type=notify") && text.contains(&format!("ExecStart={}/bin/aifs-mountd", prefix.display())));
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");

    // Type=notify: READY=1 on $NOTIFY_SOCKET once the tree is mounted,
    // STOPPING=1 when it goes.
    let socket_path = tmp.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mnt = tmp.path().join("mnt");
    let daemon = Command::new(prefix.join("bin/aifs-mountd"))
        .arg(&mnt)
        .args(["--foreground", "--data-dir"])
        .arg(tmp.path().join("data"))
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Reaped(daemon, mnt.clone());
    let mut buf = [0u8; 256];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1\n");
    assert!(mnt.join("status").exists(), "ready before the tree was mounted");
    sh_ok(Path::new("/"), &format!("umount {}", mnt.display()));
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1\n");
    assert!(daemon.0.wait().unwrap().success());
}

/// A daemon started by a test: killed and its mount detached if the test
/// fails before it stops it.
struct Reaped(std::process::Child, PathBuf);

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        if is_mounted(&self.1) {
            let _ = Command::new("umount").arg("-l").arg(&self.1).status();
        }
    }
}

/// A minimal container root: busybox (Debian's busybox-static) and /tmp.
fn busybox_root(dir: &Path) -> PathBuf {
    let root = dir.join("root");
    for d in ["bin", "host", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static (scripts/setup.sh installs it)");
    sh_ok(dir, "chroot root /bin/busybox --install -s /bin && chmod 1777 root/tmp");
    root
}

/// A client in new mount and PID namespaces, chrooted into `root` as
/// `uid`, with `host` (the directory that holds the mount point) bound
/// in at /host as a slave: what `docker run -v HOST:/host:rslave` does.
fn container(root: &Path, host: &Path, uid: u32, script: &str) -> Command {
    let inner = format!(
        "mount --rbind {host} {root}/host && mount --make-rslave {root}/host && \
         exec chroot --userspec={uid}:{uid} {root} /bin/sh -c '{script}'",
        host = host.display(),
        root = root.display(),
    );
    let mut c = Command::new("unshare");
    // --kill-child: the namespace's processes go when unshare does.
    c.args(["--mount", "--pid", "--fork", "--kill-child", "--propagation", "slave", "sh", "-c", &inner]);
    c
}

#[test]
fn containers_use_the_mount_as_other_users() {
    if !namespaces_allowed("containers_use_the_mount_as_other_users") {
        return;
    }
    let m = Mount::start_with(&["--allow-other", "--shared"]);
    sh_ok(&m.mnt, &format!("mkdir models/m && chmod 755 models/m && cp {} models/m/", fixture("mlp.onnx").display()));
    let root = busybox_root(m.dir.path());
    let request = format!("[{:?}]", [1.0f32; 16]);
    // busybox's `cat` reads with sendfile(2), which the kernel serves for
    // FUSE from the page cache, bounded by the size `stat` showed: 0 for an
    // answer not yet made. `head -c` reads with read(2), as GNU cat does.
    let script = format!(
        r#"cd /host/mnt/models/m/v1
get() {{ head -c 1073741824 "$@"; }}
echo "{request}" > infer && echo "write-then-read $(get infer)"
exec 3<>infer; echo "{request}" >&3; echo "one-handle $(get <&3)"; exec 3<&-
id=$(get clone); echo "{request}" > /host/mnt/jobs/$id/input; echo "job $id $(get /host/mnt/jobs/$id/output)"
echo "util $(cat /host/mnt/devices/cpu/util)"
echo "whoami $(id -u)""#
    );
    let out = container(&root, m.dir.path(), 1000, &script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let expected = sh_ok(&m.mnt, &format!("echo '{request}' > models/m/v1/infer && cat models/m/v1/infer"));
    for way in ["write-then-read", "one-handle"] {
        assert!(text.contains(&format!("{way} {}", expected.trim())), "{way}: {text}");
    }
    assert!(text.contains("whoami 1000") && text.contains("util "), "{text}");
    let id: u64 = text.split("job ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(text.contains(&format!("job {id} {}", expected.trim())), "{text}");

    // Another container, another uid: the first one's job is not its to read.
    let peek = container(&root, m.dir.path(), 1001, &format!("cat /host/mnt/jobs/{id}/output")).output().unwrap();
    assert!(!peek.status.success());
    assert!(String::from_utf8_lossy(&peek.stderr).contains("Permission denied"), "{peek:?}");
}

#[test]
fn a_running_container_survives_a_daemon_restart() {
    if !namespaces_allowed("a_running_container_survives_a_daemon_restart") {
        return;
    }
    let mut m = Mount::start_with(&["--allow-other", "--shared"]);
    let root = busybox_root(m.dir.path());
    // Reads status every 100 ms for 15 s, one line per read.
    let script = "for i in $(seq 150); do if cat /host/mnt/status >/tmp/out 2>/tmp/err; then echo ok; \
                  else echo \"fail $(cat /tmp/err)\"; fi; sleep 0.1; done > /tmp/log 2>&1";
    let client = container(&root, m.dir.path(), 1000, script).spawn().unwrap();
    let mut client = KillOnDrop(client);
    let log = root.join("tmp/log");
    let lines = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lines().contains("ok") {
        assert!(Instant::now() < deadline, "the container never read status");
        std::thread::sleep(Duration::from_millis(50));
    }
    m.kill(); // a crash
    std::thread::sleep(Duration::from_millis(500));
    let restarted = Instant::now();
    m.spawn();
    let back = loop {
        let text = lines();
        if let Some(after_fail) = text.split_once("fail").map(|(_, rest)| rest) {
            if after_fail.contains("\nok") {
                break restarted.elapsed();
            }
        }
        assert!(restarted.elapsed() < Duration::from_secs(10), "the container never saw the new mount:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = lines();
    assert!(text.contains("fail cat: can't open '/host/mnt/status': Transport endpoint is not connected"), "{text}");
    eprintln!("the container read status again {back:?} after the daemon was started again");
    let _ = client.0.kill();
    let _ = client.0.wait();
}

/// A container process (unshare --kill-child), killed with its namespace
/// when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `watch cat status` is the progress bar of a large `cp`: bytes as they
/// arrive, then the commit's phase, each within a poll of the change.
#[test]
fn status_shows_an_import_in_flight() {
    let m = Mount::start();
    std::fs::create_dir(m.path("models/big")).unwrap();
    // A process of its own writes it, 8 MiB at a time: the tests beside
    // this one fork, and a fork's close of an inherited descriptor is a
    // close() of the upload too (see docs/PROTOCOL.md).
    let copy = format!(
        "exec 3> models/big/big.onnx; for i in $(seq 0 12); do dd if={} bs=8M skip=$i count=1 status=none >&3; sleep 0.03; done",
        fixture("big.onnx").display()
    );
    let mut writer = Command::new("bash").arg("-c").arg(copy).current_dir(&m.mnt).spawn().unwrap();
    let mut seen: Vec<(String, u64)> = Vec::new();
    let mut per_model = 0;
    while writer.try_wait().unwrap().is_none() {
        let status: serde_json::Value = serde_json::from_slice(&std::fs::read(m.path("status")).unwrap()).unwrap();
        for import in status["imports"].as_array().unwrap() {
            assert_eq!(import["path"], "models/big/big.onnx");
            seen.push((import["phase"].as_str().unwrap().to_string(), import["bytes"].as_u64().unwrap()));
        }
        // The same, per model.
        let model: serde_json::Value =
            serde_json::from_slice(&std::fs::read(m.path("models/big/status")).unwrap()).unwrap();
        per_model += model["imports"].as_array().unwrap().len();
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(writer.wait().unwrap().success());
    let receiving: Vec<u64> = seen.iter().filter(|(p, _)| p == "receiving").map(|(_, b)| *b).collect();
    assert!(receiving.windows(2).all(|w| w[0] <= w[1]) && receiving.iter().any(|&b| b > 0), "{seen:?}");
    assert!(seen.iter().any(|(p, _)| p == "hashing, checking, syncing"), "{seen:?}");
    assert!(per_model > 0, "models/big/status never showed the import");
    assert!(m.path("models/big/v1").exists());
    // The kernel releases a closed file a moment after close() returns.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status: serde_json::Value = serde_json::from_slice(&std::fs::read(m.path("status")).unwrap()).unwrap();
        if status["imports"] == serde_json::json!([]) {
            break;
        }
        assert_eq!(status["imports"][0]["phase"], "committed");
        assert!(Instant::now() < deadline, "the import stayed in /status");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_kubernetes_manifests_validate() {
    let dir = repo().join("deploy/kubernetes");
    let daemonset = std::fs::read_to_string(dir.join("daemonset.yaml")).unwrap();
    let consumer = std::fs::read_to_string(dir.join("consumer-pod.yaml")).unwrap();
    // Against the Kubernetes schema, unknown fields refused.
    let out = Command::new(repo().join(".venv/bin/kubernetes-validate"))
        .args(["--strict", "--no-warn"])
        .arg(dir.join("daemonset.yaml"))
        .arg(dir.join("consumer-pod.yaml"))
        .output()
        .expect("kubernetes-validate (scripts/requirements.txt; scripts/setup.sh installs it)");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.matches(" passed for resource ").count() == 2, "{said}");
    // What the design needs of them (docs/SCALE.md, Kubernetes).
    for needed in ["kind: DaemonSet", "mountPropagation: Bidirectional", "path: /dev/fuse", "nvidia.com/gpu: 1"] {
        assert!(daemonset.contains(needed), "daemonset.yaml lacks {needed}");
    }
    for needed in
        ["kind: Pod", "mountPropagation: HostToContainer", "> /aifs/models/mlp/latest/infer", "runAsUser: 1000"]
    {
        assert!(consumer.contains(needed), "consumer-pod.yaml lacks {needed}");
    }
}
