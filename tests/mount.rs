//! The real thing: `aifs-mountd` mounted on a temp dir, driven with
//! `std::fs` and the shell tools a user would use. Each test has its own
//! daemon and data dir; [`common::Mount`] unmounts even when a test fails.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn ls(m: &Mount, rel: &str) -> Vec<String> {
    sh_ok(&m.mnt, &format!("ls {rel}")).split_whitespace().map(String::from).collect()
}

fn json(path: impl AsRef<Path>) -> Value {
    serde_json::from_str(&read(path)).unwrap()
}

/// `mkdir models/<model>` (if needed) and `cp <fixture> models/<model>/`.
fn import(m: &Mount, model: &str, fixture_name: &str) {
    let src = fixture(fixture_name);
    sh_ok(&m.mnt, &format!("mkdir -p models/{model} && cp {} models/{model}/", src.display()));
}

#[test]
fn the_tree_status_and_cpu_device() {
    let m = Mount::start();
    assert_eq!(ls(&m, ""), ["README", "blobs", "devices", "jobs", "metrics", "models", "status"]);
    let status = json(m.path("status"));
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["data_dir"], m.data.to_str().unwrap());
    assert_eq!(status["store"]["bytes"], 0);
    let backends: Vec<&str> =
        status["backends"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert_eq!(backends, ["candle", "candle-gguf", "onnxruntime"]);
    assert!(status["uptime_s"].is_u64());

    assert_eq!(ls(&m, "devices"), ["cpu"]);
    let cpu = |f: &str| read(m.path(&format!("devices/cpu/{f}")));
    for f in ["name", "util", "memory.total", "memory.used"] {
        assert!(cpu(f).ends_with('\n') && cpu(f).lines().count() == 1, "{f}: one value per file");
    }
    let util: u8 = cpu("util").trim().parse().unwrap();
    assert!(util <= 100);
    let total: u64 = cpu("memory.total").trim().parse().unwrap();
    let used: u64 = cpu("memory.used").trim().parse().unwrap();
    let meminfo_total =
        read("/proc/meminfo").lines().next().unwrap().split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
    assert_eq!(total, meminfo_total * 1024);
    assert!(used > 0 && used < total);
    assert!(std::fs::read_dir(m.path("jobs")).unwrap().next().is_none());
}

#[test]
fn readme_examples_work_by_copy_paste() {
    let m = Mount::start();
    import(&m, "mlp", "mlp.onnx");
    let readme = read(m.path("README"));
    let commands: Vec<&str> = readme
        .lines()
        .skip_while(|l| !l.starts_with("Example 1"))
        .filter(|l| l.starts_with("  "))
        .map(str::trim)
        .collect();
    assert!(commands.len() >= 12, "{readme}");
    let script = format!("set -ex\ncd /\n{}", commands.join("\n"));
    sh_ok(Path::new("/"), &script);
    assert!(!m.path("models/demo").exists(), "the examples clean up after themselves");
}

#[test]
fn cp_makes_content_addressed_versions() {
    let m = Mount::start();
    let mlp = fixture("mlp.onnx");
    let sigmoid = fixture("sigmoid.onnx");
    import(&m, "m", "mlp.onnx");
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "status", "trust", "v1"]);
    assert_eq!(
        ls(&m, "models/m/v1"),
        ["clone", "digest", "error", "infer", "meta.json", "mlp.onnx", "signature", "stats"]
    );
    sh_ok(&m.mnt, &format!("cmp models/m/v1/mlp.onnx {}", mlp.display()));
    assert_eq!(sh_ok(&m.mnt, "readlink models/m/latest"), "v1\n");

    // digest = sha256 of the manifest `sha256:<blob>  <name>\n`, by sha256sum.
    let blob = sha256sum(&mlp);
    let manifest = m.dir.path().join("manifest");
    std::fs::write(&manifest, format!("sha256:{blob}  mlp.onnx\n")).unwrap();
    assert_eq!(read(m.path("models/m/v1/digest")), format!("sha256:{}\n", sha256sum(&manifest)));

    let meta = json(m.path("models/m/v1/meta.json"));
    assert_eq!(meta["format"], "onnx");
    assert_eq!(meta["backend"], "onnxruntime");
    assert_eq!(meta["source"], "mlp.onnx");
    assert_eq!(meta["size"], std::fs::metadata(&mlp).unwrap().len());
    assert!(meta["created"].as_str().unwrap().ends_with('Z'));
    assert_eq!(
        meta["inputs"],
        serde_json::json!([{"name": "x", "dtype": "float32", "shape": [-1, 16], "dim_names": ["N", ""]}])
    );
    assert_eq!(
        meta["outputs"],
        serde_json::json!([{"name": "y", "dtype": "float32", "shape": [-1, 16], "dim_names": ["N", ""]}])
    );

    // The store: blobs/ shows the blob, the data dir holds it once.
    sh_ok(&m.mnt, &format!("cmp blobs/sha256-{blob} {}", mlp.display()));
    assert_eq!(m.blob_files(), [format!("sha256-{blob}")]);

    // Python's shutil.copy sets the mode of the copy after closing it: the
    // name stays valid for that, and the copy is the same version.
    let py = format!("import shutil; shutil.copy('{}', 'models/m/')", mlp.display());
    let out = Command::new(repo().join(".venv/bin/python")).args(["-c", &py]).current_dir(&m.mnt).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "status", "trust", "v1"]);

    // Identical content: no new version. New content: v2, and latest follows.
    import(&m, "m", "mlp.onnx");
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "status", "trust", "v1"]);
    import(&m, "m", "sigmoid.onnx");
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "status", "trust", "v1", "v2"]);
    assert_eq!(sh_ok(&m.mnt, "readlink models/m/latest"), "v2\n");
    sh_ok(&m.mnt, &format!("cmp models/m/latest/sigmoid.onnx {}", sigmoid.display()));

    // The same bytes in another model: a version there, still one blob.
    import(&m, "n", "mlp.onnx");
    assert_eq!(m.blob_files().len(), 2);
    let status = json(m.path("status"));
    assert_eq!(status["store"]["models"], 2);
    assert_eq!(status["store"]["versions"], 3);
    let bytes = std::fs::metadata(&mlp).unwrap().len() + std::fs::metadata(&sigmoid).unwrap().len();
    assert_eq!(status["store"]["bytes"], bytes);
}

#[test]
fn aliases_with_ln_readlink_and_rm() {
    let m = Mount::start();
    import(&m, "m", "mul_1.onnx");
    import(&m, "m", "sigmoid.onnx");
    let sigmoid_blob = format!("sha256-{}", sha256sum(&fixture("sigmoid.onnx")));

    assert_eq!(sh_ok(&m.mnt, "cd models/m && ln -s v1 stable && readlink stable"), "v1\n");
    assert_eq!(read(m.path("models/m/stable/digest")), read(m.path("models/m/v1/digest")));
    sh_ok(&m.mnt, "ln -sfn v2 models/m/stable");
    assert_eq!(sh_ok(&m.mnt, "readlink models/m/stable"), "v2\n");
    assert_eq!(read(m.path("models/m/stable/digest")), read(m.path("models/m/v2/digest")));
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "stable", "status", "trust", "v1", "v2"]);

    // A version an alias points at cannot go.
    sh_err(&m.mnt, "rm -r models/m/v2", "Device or resource busy");
    sh_ok(&m.mnt, &format!("cmp models/m/v2/sigmoid.onnx {}", fixture("sigmoid.onnx").display()));

    sh_ok(&m.mnt, "rm models/m/stable && rm -r models/m/v2");
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "status", "trust", "v1"]);
    assert_eq!(sh_ok(&m.mnt, "readlink models/m/latest"), "v1\n");
    assert!(!m.blob_files().contains(&sigmoid_blob), "unreferenced blob collected");
    assert!(!ls(&m, "blobs").contains(&sigmoid_blob));

    // An alias to a version that does not exist.
    sh_err(&m.mnt, "ln -s v9 models/m/x", "No such file or directory");
    assert!(m.path("models/m/x").symlink_metadata().is_err());
    sh_err(&m.mnt, "rmdir models/m", "Directory not empty");
}

#[test]
fn bad_models_fail_cp_and_leave_nothing() {
    let m = Mount::start();
    sh_ok(&m.mnt, "mkdir models/m");
    for name in ["empty.onnx", "garbage.onnx", "truncated.onnx"] {
        let src = fixture(name);
        sh_err(&m.mnt, &format!("cp {} models/m/", src.display()), "Invalid argument");
    }
    assert_eq!(ls(&m, "models/m"), ["config.json", "status", "trust"]);
    assert!(m.blob_files().is_empty(), "left behind: {:?}", m.blob_files());
    // One log line each with the reason. (The kernel releases a closed file
    // asynchronously, and an empty file's line is written at release.)
    let one_line_each = |log: &str| {
        ["empty.onnx", "garbage.onnx", "truncated.onnx"]
            .iter()
            .all(|name| log.lines().filter(|l| l.contains(&format!("invalid model \"{name}\""))).count() == 1)
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    while !one_line_each(&m.log_text()) {
        assert!(Instant::now() < deadline, "expected one line per bad model:\n{}", m.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    // A file type no backend reads is refused before any byte is copied.
    sh_err(&m.mnt, "cp /etc/hostname models/m/", "Invalid argument");
    // The daemon is fine: a good model still imports.
    import(&m, "m", "mlp.onnx");
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "status", "trust", "v1"]);
    // A model whose external data names that model's blob reaches no file
    // but its own version's, at import as at every load.
    sh_ok(&m.mnt, "mkdir models/x");
    sh_err(&m.mnt, &format!("cp {} models/x/", fixture("external.onnx").display()), "Invalid argument");
    assert_eq!(ls(&m, "models/x"), ["config.json", "status", "trust"]);
    assert!(m.log_text().contains("invalid model \"external.onnx\": "), "{}", m.log_text());
}

/// A model of several files arrives as a tar stream: `vN/` is the same tree
/// (`diff -r` passes), ONNX Runtime reads external data from it, and a bad
/// archive fails the `cp` and leaves nothing.
#[test]
fn multi_file_versions_through_tar() {
    let m = Mount::start();
    let src = fixture("external_tree");
    let src = src.display();
    sh_ok(&m.mnt, &format!("mkdir models/ext && tar -C {src} -cf - . > models/ext/model.tar"));
    let same = format!(
        "diff -r {} {src} models/ext/v1",
        ["digest", "meta.json", "stats", "signature", "infer", "clone", "error"].map(|f| format!("-x {f}")).join(" ")
    );
    sh_ok(&m.mnt, &same);
    let out = sh_ok(&m.mnt, &format!("echo '{:?}' > models/ext/v1/infer && cat models/ext/v1/infer", [1.0f32; 16]));
    let y: Vec<f32> = serde_json::from_str(&out).unwrap();
    assert_eq!(y, (1..=16).map(|i| i as f32).collect::<Vec<_>>());
    // The same tree gzipped: no new version.
    sh_ok(&m.mnt, &format!("tar -C {src} -czf - . > models/ext/model.tgz"));
    assert_eq!(ls(&m, "models/ext"), ["config.json", "latest", "status", "trust", "v1"]);

    // A symlink in the tree: the cp fails with the reason in the log.
    let evil = m.dir.path().join("evil");
    sh_ok(
        m.dir.path(),
        &format!("mkdir evil && cp -r {src}/. evil/ && ln -s /etc/passwd evil/link && tar -C evil -cf evil.tar ."),
    );
    sh_err(&m.mnt, &format!("cp {}.tar models/ext/", evil.display()), "Invalid argument");
    assert!(m.log_text().contains("link: symlink members are not allowed"), "{}", m.log_text());
    assert_eq!(ls(&m, "models/ext"), ["config.json", "latest", "status", "trust", "v1"]);
    // `cp -r` of a directory is refused at its mkdir, pointing at tar.
    sh_err(&m.mnt, &format!("cp -r {src} models/ext/"), "Operation not permitted");
    assert!(m.log_text().contains("tar -C DIR -cf - . > models/ext/model.tar"), "{}", m.log_text());
}

/// A shell that holds an upload open while its children write to it
/// (`exec 3>`; `dd >&3`): each child's exit closes an inherited copy,
/// and only the shell's own close commits, the whole file.
#[test]
fn children_closing_inherited_descriptors_do_not_commit() {
    let m = Mount::start();
    let src = fixture("mlp.onnx");
    let script = format!(
        "mkdir models/m && exec 3> models/m/mlp.onnx && dd if={0} bs=500 count=1 status=none >&3 && \
         dd if={0} bs=500 skip=1 count=1 status=none >&3 && dd if={0} bs=500 skip=2 status=none >&3 && exec 3>&-",
        src.display()
    );
    sh_ok(&m.mnt, &script);
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "status", "trust", "v1"]);
    assert_eq!(std::fs::read(m.path("models/m/v1/mlp.onnx")).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn bad_names_and_read_only_versions() {
    let m = Mount::start();
    import(&m, "m", "mlp.onnx");
    let long = "a".repeat(256);
    sh_err(&m.mnt, "mkdir models/.hidden", "Invalid argument");
    sh_err(&m.mnt, &format!("mkdir models/{long}"), "Invalid argument");
    sh_err(&m.mnt, "mkdir models/.", "File exists");
    sh_err(&m.mnt, "mkdir models/..", "File exists");
    sh_err(&m.mnt, "mkdir models/a/b", "No such file or directory");
    sh_ok(&m.mnt, &format!("mkdir models/{}", "a".repeat(255)));
    sh_ok(&m.mnt, &format!("rmdir models/{}", "a".repeat(255)));
    assert_eq!(ls(&m, "models"), ["m"]);

    // Versions are immutable.
    let v1 = m.path("models/m/v1");
    assert_eq!(errno(OpenOptions::new().write(true).open(v1.join("mlp.onnx"))), libc::EROFS);
    assert_eq!(errno(OpenOptions::new().append(true).open(v1.join("meta.json"))), libc::EROFS);
    assert_eq!(errno(std::fs::write(v1.join("new.onnx"), b"x")), libc::EROFS);
    assert_eq!(errno(std::fs::create_dir(v1.join("d"))), libc::EROFS);
    sh_err(&m.mnt, "echo x > models/m/v1/digest", "Read-only file system");
    sh_err(&m.mnt, &format!("cp {} models/m/v1/", fixture("mlp.onnx").display()), "Read-only file system");
    sh_err(&m.mnt, "chmod 777 models/m/v1", "Read-only file system");
    sh_err(&m.mnt, "mv models/m/v1 models/m/v7", "Operation not permitted");
    // Daemon files and missing things.
    assert_eq!(errno(OpenOptions::new().write(true).open(m.path("README"))), libc::EACCES);
    assert_eq!(errno(std::fs::read(m.path("models/nope/latest/digest"))), libc::ENOENT);
    assert_eq!(errno(std::fs::read(m.path("models/m/v2/digest"))), libc::ENOENT);
    assert_eq!(errno(std::fs::remove_dir(m.path("models/m"))), libc::ENOTEMPTY);
    assert_eq!(m.blob_files().len(), 1);
    sh_ok(&m.mnt, &format!("cmp models/m/v1/mlp.onnx {}", fixture("mlp.onnx").display()));
}

/// With a data directory an admin made 0755, and subdirectories an older
/// daemon left 0755, another user reads nothing the daemon keeps: no
/// model, no job input in the journal, no catalog; and request values
/// never reach the log.
#[test]
fn data_on_disk_is_private_and_the_log_holds_no_request_values() {
    let mut m = Mount::start_with(&["--allow-other"]);
    import(&m, "m", "mlp.onnx");
    assert!(m.stop().success());
    for dir in ["", "blobs", "catalog", "jobs"] {
        std::fs::set_permissions(m.data.join(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    m.spawn();
    let secret = "[[4242.4242, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, \"SECRET-VALUE\"]]";
    sh_err(&m.mnt, &format!("echo '{secret}' > models/m/v1/infer; cat models/m/v1/infer"), "Invalid argument");
    let id = sh_ok(&m.mnt, "cat models/m/v1/clone").trim().to_string();
    std::fs::write(
        m.path(&format!("jobs/{id}/input")),
        "[[4242.4242, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]]",
    )
    .unwrap();
    assert!(read(m.path(&format!("jobs/{id}/output"))).starts_with("[["));

    for dir in ["blobs", "catalog", "jobs"] {
        let mode = std::fs::metadata(m.data.join(dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "data/{dir}");
    }
    let out = sh(
        &m.data,
        "setpriv --reuid=65534 --regid=65534 --clear-groups -- find . -mindepth 1 -readable -print 2>/dev/null",
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "", "readable by another user");
    let journal = sh_ok(&m.data, "ls jobs/ | head -1");
    sh_err(
        &m.data,
        &format!("setpriv --reuid=65534 --regid=65534 --clear-groups -- cat jobs/{}", journal.trim()),
        "Permission denied",
    );
    let log = m.log_text();
    assert!(!log.contains("SECRET") && !log.contains("4242"), "{log}");
    assert!(log.contains("expected a number (float32), got a string"), "{log}");
}

/// `grep -r` and `find | xargs cat` over the whole tree finish: reading
/// `clone` makes a job, and that job's `output` (no input yet) answers at
/// once instead of blocking the walker; `infer` and `error` with no
/// request, likewise. And the shell user finds why their request failed
/// without its job id.
#[test]
fn tree_walkers_finish_and_a_failed_request_says_why() {
    let m = Mount::start();
    import(&m, "m", "mlp.onnx");
    let walked = sh(&m.mnt, "timeout 60 grep -r no-such-text . ; echo rc=$?");
    let text = String::from_utf8_lossy(&walked.stdout);
    assert!(text.contains("rc=1") || text.contains("rc=2"), "{text} {}", String::from_utf8_lossy(&walked.stderr));
    let walked = sh(&m.mnt, "timeout 60 find . -type f -print0 | timeout 60 xargs -0 cat > /dev/null 2>&1; echo rc=$?");
    assert!(!String::from_utf8_lossy(&walked.stdout).contains("rc=124"), "{walked:?}");
    let id = newest_job(&m);
    assert_eq!(errno(std::fs::read(m.path(&format!("jobs/{id}/output")))), libc::ENODATA);

    sh_err(&m.mnt, "cat models/m/v1/error", "No data available");
    let out = sh(&m.mnt, "echo '[[1, 2]]' > models/m/v1/infer; cat models/m/v1/error");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "input \"x\": expected shape [-1, 16], got [1, 2]\n");
}

#[test]
fn permissions_are_kept_and_enforced_by_the_kernel() {
    let mut m = Mount::start_with(&["--allow-other"]);
    import(&m, "private", "mlp.onnx");
    sh_ok(&m.mnt, "mkdir models/shared && chmod 700 models/private && chown nobody:nogroup models/shared && chmod 750 models/shared");
    let stat = |m: &Mount, p: &str| sh_ok(&m.mnt, &format!("stat -c '%a %U %G' {p}"));
    assert_eq!(stat(&m, "models/private"), "700 root root\n");
    assert_eq!(stat(&m, "models/shared"), "750 nobody nogroup\n");

    let as_nobody = |m: &Mount, cmd: &str| {
        sh(&m.mnt, &format!("setpriv --reuid=65534 --regid=65534 --clear-groups -- bash -c '{cmd}'"))
    };
    let out = as_nobody(&m, "ls models/private");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    assert!(as_nobody(&m, "ls models/shared").status.success());
    assert!(as_nobody(&m, "mkdir models/theirs").status.success());
    assert_eq!(stat(&m, "models/theirs"), "755 nobody nogroup\n");
    // An owner who is not root imports, aliases and removes versions with the usual tools.
    let mlp = fixture("mlp.onnx");
    std::fs::copy(&mlp, m.dir.path().join("mlp.onnx")).unwrap();
    let tools = format!(
        "cp {dir}/mlp.onnx models/theirs/ && ln -s v1 models/theirs/stable && rm models/theirs/stable && rm -r models/theirs/v1",
        dir = m.dir.path().display()
    );
    let out = as_nobody(&m, &tools);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ls(&m, "models/theirs"), ["config.json", "status", "trust"]);
    // models/ is sticky: nobody cannot remove root's model.
    assert!(!as_nobody(&m, "rmdir models/shared2 2>/dev/null; rmdir models/private").status.success());

    // The catalog keeps owners and modes across a remount.
    assert!(m.stop().success());
    m.spawn();
    assert_eq!(stat(&m, "models/private"), "700 root root\n");
    assert_eq!(stat(&m, "models/shared"), "750 nobody nogroup\n");
    assert_eq!(stat(&m, "models/theirs"), "755 nobody nogroup\n");
}

#[test]
fn everything_survives_unmount_and_remount() {
    let mut m = Mount::start();
    import(&m, "m", "mul_1.onnx");
    import(&m, "m", "sigmoid.onnx");
    sh_ok(&m.mnt, "ln -s v1 models/m/stable && chmod 711 models/m");
    let snapshot = |m: &Mount| {
        sh_ok(
            &m.mnt,
            "ls -l models/m | tail -n +2 | awk '{print $1, $NF}'; cat models/m/*/digest models/m/v1/meta.json; readlink models/m/stable models/m/latest; ls blobs",
        )
    };
    let before = snapshot(&m);

    // SIGTERM unmounts cleanly and exits 0.
    assert!(m.stop().success());
    assert!(!is_mounted(&m.mnt));
    m.spawn();
    assert_eq!(snapshot(&m), before);
    sh_ok(&m.mnt, &format!("cmp models/m/v1/mul_1.onnx {}", fixture("mul_1.onnx").display()));
    // Numbering continues.
    import(&m, "m", "logreg_iris.onnx");
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "stable", "status", "trust", "v1", "v2", "v3"]);
}

#[test]
fn sigterm_with_a_busy_mount_still_exits() {
    let mut m = Mount::start();
    // A shell whose working directory is inside the mount keeps it busy.
    let mut shell = Command::new("sleep").arg("30").current_dir(m.path("models")).spawn().unwrap();
    assert!(m.stop().success(), "{}", m.log_text());
    assert!(!is_mounted(&m.mnt));
    shell.kill().unwrap();
    shell.wait().unwrap();
}

#[test]
fn sigkill_during_a_100mb_import_loses_nothing() {
    let mut m = Mount::start();
    import(&m, "m", "mlp.onnx");
    let mlp_blob = format!("sha256-{}", sha256sum(&fixture("mlp.onnx")));
    let big = fixture("big.onnx");
    let half = std::fs::metadata(&big).unwrap().len() / 2;

    // Write half of the 100 MB model, then stall: the kill lands mid-copy.
    let mut writer = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{{ head -c {half} {big}; sleep 60; tail -c +{} {big}; }} > models/m/big.onnx",
            half + 1,
            big = big.display()
        ))
        .current_dir(&m.mnt)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tmp_len = std::fs::read_dir(m.data.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
            .map(|e| e.metadata().unwrap().len())
            .max();
        if tmp_len == Some(half) {
            break;
        }
        assert!(Instant::now() < deadline, "the copy never reached half way");
        std::thread::sleep(Duration::from_millis(10));
    }
    m.kill();
    writer.kill().unwrap();
    writer.wait().unwrap();
    assert!(is_mounted(&m.mnt), "a killed daemon leaves its mount behind");
    // An open asks the dead daemon (a stat may be answered from the
    // kernel's attribute cache for a second after the last lookup).
    assert_eq!(errno(std::fs::read(m.path("status"))), libc::ENOTCONN);

    // Start again on the same data dir and (stale) mount point.
    m.spawn();
    assert!(m.log_text().contains("cleared a stale mount"), "{}", m.log_text());
    assert_eq!(ls(&m, "models/m"), ["config.json", "latest", "status", "trust", "v1"]);
    assert_eq!(m.blob_files(), [mlp_blob], "no temp file, no orphan blob");
    sh_ok(&m.mnt, &format!("cmp models/m/v1/mlp.onnx {}", fixture("mlp.onnx").display()));
    // v1 is still loadable: ONNX Runtime accepts it on import elsewhere.
    sh_ok(&m.mnt, "mkdir models/again && cp models/m/v1/mlp.onnx models/again/ && ls models/again/v1");
    // And the whole 100 MB model imports when the copy completes.
    sh_ok(&m.mnt, &format!("cp {} models/m/ && cmp models/m/v2/big.onnx {}", big.display(), big.display()));
}

#[test]
fn cli_help_missing_runtime_and_detaching() {
    let help = Command::new(daemon_bin()).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8(help.stdout).unwrap();
    for flag in [
        "<MOUNTPOINT>",
        "--data-dir",
        "--foreground",
        "--onnxruntime",
        "--allow-other",
        "--threads",
        "--help",
        "--version",
    ] {
        assert!(text.contains(flag), "--help lacks {flag}:\n{text}");
    }

    // No ONNX Runtime: one clear line, exit 1, no panic, nothing mounted.
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    let out = Command::new(daemon_bin())
        .arg(&mnt)
        .args(["--foreground", "--onnxruntime", "/nonexistent/libonnxruntime.so"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("aifs-mountd:")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("/nonexistent/libonnxruntime.so does not exist"), "{stderr}");
    assert!(!is_mounted(&mnt));

    // Without --foreground it returns once the mount is ready, logging to the data dir.
    let data = dir.path().join("data");
    let out = Command::new(daemon_bin()).arg(&mnt).arg("--data-dir").arg(&data).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(is_mounted(&mnt));
    assert!(mnt.join("status").exists());
    sh_ok(Path::new("/"), &format!("umount {}", mnt.display()));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !read(data.join("aifs-mountd.log")).contains("unmounted; bye") {
        assert!(Instant::now() < deadline, "daemon did not exit after umount");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_mounted(&mnt));
}

/// Heavy work holds no FUSE thread: while another user's imports commit
/// (hash, fsync, ONNX Runtime's check of 100 MB each, on two FUSE threads
/// there are three of them), `cat status` keeps answering. And an upload's
/// size is bounded by `--max-import-bytes`, a sparse one by the size it
/// claims: a 1-byte write at 2 GiB fails at once with EFBIG.
#[test]
fn imports_hold_no_fuse_thread_and_are_bounded() {
    let m = Mount::start_with(&["--allow-other", "--threads", "1", "--max-import-bytes", "1073741824"]);
    let big = m.dir.path().join("big.onnx");
    std::fs::copy(fixture("big.onnx"), &big).unwrap();
    sh_ok(&m.mnt, "mkdir models/theirs && chown nobody models/theirs");
    let as_nobody = format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups -- bash -c 'for i in 1 2 3; do cp {} models/theirs/m$i.onnx & done; wait'",
        big.display()
    );
    let importer = {
        let mnt = m.mnt.clone();
        std::thread::spawn(move || sh(&mnt, &as_nobody))
    };
    let mut took = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !importer.is_finished() && Instant::now() < deadline {
        let start = Instant::now();
        assert!(read(m.path("status")).contains("\"uptime_s\""));
        took.push(start.elapsed());
        std::thread::sleep(Duration::from_millis(20));
    }
    let imported = importer.join().unwrap();
    assert!(imported.status.success(), "{imported:?}");
    assert_eq!(
        ls(&m, "models/theirs"),
        ["config.json", "latest", "status", "trust", "v1"],
        "three equal files: one version"
    );
    took.sort();
    let p99 = took[took.len() * 99 / 100];
    eprintln!("cat status: p99 {p99:?}, max {:?} over {} reads", took.last().unwrap(), took.len());
    assert!(took.len() >= 10 && p99 < Duration::from_millis(250), "cat status p99 {p99:?} over {} reads", took.len());

    sh_err(
        &m.mnt,
        "mkdir models/sparse && dd if=/dev/zero of=models/sparse/x.onnx bs=1 count=1 seek=2G",
        "File too large",
    );
    assert!(m.log_text().contains("larger than the import limit of 1073741824 bytes"), "{}", m.log_text());
}
