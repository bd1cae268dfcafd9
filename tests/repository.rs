//! Watched model repositories (`--repository DIR`) through a real mount:
//! versions appear complete or not at all, follow the directory, survive
//! a restart, and say why when they cannot be imported.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

const SETTLE_MS: u64 = 1500;

fn start(repo: &Path) -> Mount {
    let settle = SETTLE_MS.to_string();
    Mount::start_with(&["--repository", repo.to_str().unwrap(), "--repository-settle-ms", &settle])
}

fn versions(m: &Mount, model: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(m.path(&format!("models/{model}"))) else { return vec![] };
    let mut v: Vec<String> = entries
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with('v') && n[1..].bytes().all(|b| b.is_ascii_digit()))
        .collect();
    v.sort();
    v
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The repository's problems in `/status`, as (path, reason).
fn problems(m: &Mount) -> Vec<(String, String)> {
    let status: Value = serde_json::from_slice(&std::fs::read(m.path("status")).unwrap()).unwrap();
    status["repositories"][0]["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["path"].as_str().unwrap().to_string(), p["reason"].as_str().unwrap().to_string()))
        .collect()
}

fn problem_of(m: &Mount, path: &Path) -> Option<String> {
    problems(m).into_iter().find(|(p, _)| Path::new(p) == path).map(|(_, why)| why)
}

/// One request of the external-data model (y = x + [0..16]) on `vN`.
fn runs_ext(m: &Mount, version: &str) {
    let out = sh_ok(
        &m.mnt,
        &format!("echo '{:?}' > models/ext/{version}/infer && cat models/ext/{version}/infer", [1.0f32; 16]),
    );
    let y: Vec<f32> = serde_json::from_str(&out).unwrap();
    assert_eq!(y, (1..=16).map(|i| i as f32).collect::<Vec<_>>());
}

#[test]
fn versions_appear_complete_follow_the_directory_and_survive_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let tree = fixture("external_tree");
    // Present before the start (old mtimes): imported by the first scan.
    std::fs::create_dir_all(repo.join("ext")).unwrap();
    sh_ok(tmp.path(), &format!("cp -rp {} repo/ext/1", tree.display()));
    let mut m = start(&repo);
    wait_for("the first scan", Duration::from_secs(10), || versions(&m, "ext") == ["v1"]);
    let meta: Value = serde_json::from_slice(&std::fs::read(m.path("models/ext/v1/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["origin"], repo.join("ext/1").to_str().unwrap());
    runs_ext(&m, "v1");

    // A slow copy, file by file, with a pause longer than the settle time
    // while the last file is held open for writing. Every moment of it is
    // a loadable model: only completeness keeps it out until it is done.
    let dir = repo.join("ext/2");
    let notes = "A model card, written slowly.\n".repeat(100);
    let copier = {
        let (dir, tree, notes) = (dir.clone(), tree.clone(), notes.clone());
        std::thread::spawn(move || {
            std::fs::create_dir(&dir).unwrap();
            std::fs::create_dir(dir.join("weights")).unwrap();
            std::fs::copy(tree.join("weights/w.bin"), dir.join("weights/w.bin")).unwrap();
            std::thread::sleep(Duration::from_millis(SETTLE_MS / 3));
            std::fs::copy(tree.join("model.onnx"), dir.join("model.onnx")).unwrap();
            std::thread::sleep(Duration::from_millis(SETTLE_MS / 3));
            let mut f = std::fs::File::create(dir.join("README.md")).unwrap();
            f.write_all(&notes.as_bytes()[..100]).unwrap();
            std::thread::sleep(Duration::from_millis(SETTLE_MS * 2));
            f.write_all(&notes.as_bytes()[100..]).unwrap();
        })
    };
    while !copier.is_finished() {
        assert_eq!(versions(&m, "ext"), ["v1"], "a version appeared while its files were being copied");
        std::thread::sleep(Duration::from_millis(50));
    }
    copier.join().unwrap();
    wait_for("v2 after the copy settled", Duration::from_millis(SETTLE_MS * 4), || versions(&m, "ext").len() == 2);
    assert_eq!(read(m.path("models/ext/v2/README.md")), notes);
    runs_ext(&m, "v2");

    // Moved into place: imported without waiting to settle.
    let staging = repo.join(".staging");
    sh_ok(tmp.path(), &format!("cp -r {} {}", tree.display(), staging.display()));
    let moved = Instant::now();
    std::fs::rename(&staging, repo.join("ext/3")).unwrap();
    wait_for("v3 after the move", Duration::from_millis(SETTLE_MS * 4), || versions(&m, "ext").len() == 3);
    assert!(moved.elapsed() < Duration::from_millis(SETTLE_MS), "took {:?}", moved.elapsed());

    // A number the mount already gave: refused, with the reason.
    sh_ok(&m.mnt, &format!("cp {} models/ext/", fixture("mlp.onnx").display()));
    assert_eq!(versions(&m, "ext"), ["v1", "v2", "v3", "v4"]);
    sh_ok(tmp.path(), &format!("cp -rp {} repo/ext/4", tree.display()));
    wait_for("the collision reported", Duration::from_millis(SETTLE_MS * 4), || {
        problem_of(&m, &repo.join("ext/4")).is_some_and(|why| why.contains("models/ext/v4 (with other files)"))
    });

    // A restart rescans: nothing new, numbers kept, the mount's v4 too.
    m.stop();
    let imports_before = m.log_text().matches("imported from the repository").count();
    m.spawn();
    assert_eq!(versions(&m, "ext"), ["v1", "v2", "v3", "v4"]);
    std::thread::sleep(Duration::from_millis(SETTLE_MS * 2));
    assert_eq!(m.log_text().matches("imported from the repository").count(), imports_before);
    runs_ext(&m, "v3");
    let meta: Value = serde_json::from_slice(&std::fs::read(m.path("models/ext/v4/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["source"], "mlp.onnx");
}

#[test]
fn bad_versions_say_why_and_changes_are_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir_all(repo.join("mlp/1")).unwrap();
    sh_ok(tmp.path(), &format!("cp -p {} repo/mlp/1/model.onnx", fixture("mlp.onnx").display()));
    let m = start(&repo);
    wait_for("the first scan", Duration::from_secs(10), || versions(&m, "mlp") == ["v1"]);

    // An invalid model: not imported; the reason is in /status and the log;
    // fixing the file retries.
    std::fs::create_dir(repo.join("mlp/2")).unwrap();
    std::fs::write(repo.join("mlp/2/model.onnx"), b"not a model").unwrap();
    wait_for("the bad model reported", Duration::from_millis(SETTLE_MS * 4), || {
        problem_of(&m, &repo.join("mlp/2")).is_some_and(|why| why.contains("invalid model"))
    });
    assert_eq!(versions(&m, "mlp"), ["v1"]);
    assert!(m.log_text().contains("not imported"), "{}", m.log_text());
    std::fs::copy(fixture("sigmoid.onnx"), repo.join("mlp/2/model.onnx")).unwrap();
    wait_for("the fixed model", Duration::from_millis(SETTLE_MS * 4), || versions(&m, "mlp").len() == 2);
    assert_eq!(problem_of(&m, &repo.join("mlp/2")), None);

    // Hidden and editor files are not part of a version; symlinks are not
    // followed.
    std::fs::create_dir(repo.join("mlp/3")).unwrap();
    std::fs::copy(fixture("mul_1.onnx"), repo.join("mlp/3/model.onnx")).unwrap();
    for junk in [".model.onnx.swp", "model.onnx~", ".DS_Store"] {
        std::fs::write(repo.join("mlp/3").join(junk), b"junk").unwrap();
    }
    std::fs::create_dir(repo.join("mlp/4")).unwrap();
    std::fs::copy(fixture("logreg_iris.onnx"), repo.join("mlp/4/model.onnx")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", repo.join("mlp/4/secret")).unwrap();
    wait_for("v3", Duration::from_millis(SETTLE_MS * 4), || versions(&m, "mlp").len() == 3);
    let meta: Value = serde_json::from_slice(&std::fs::read(m.path("models/mlp/v3/meta.json")).unwrap()).unwrap();
    assert_eq!(meta["files"].as_object().unwrap().keys().collect::<Vec<_>>(), ["model.onnx"]);
    wait_for("the symlink reported", Duration::from_millis(SETTLE_MS * 4), || {
        problem_of(&m, &repo.join("mlp/4")).is_some_and(|why| why.contains("secret: a symlink"))
    });
    assert_eq!(versions(&m, "mlp"), ["v1", "v2", "v3"]);

    // config.json beside the versions is the model's; a bad one says why.
    std::fs::write(repo.join("mlp/config.json"), r#"{"max_batch": 4}"#).unwrap();
    wait_for("the config applied", Duration::from_millis(SETTLE_MS * 4), || {
        read(m.path("models/mlp/config.json")).contains("\"max_batch\": 4")
    });
    std::fs::write(repo.join("mlp/config.json"), r#"{"max_batch": 4, "bogus": 1}"#).unwrap();
    wait_for("the bad config reported", Duration::from_millis(SETTLE_MS * 4), || {
        problem_of(&m, &repo.join("mlp/config.json")).is_some_and(|why| why.contains("unknown key \"bogus\""))
    });

    // It lives in the repository: removed there, not through the mount.
    let out = sh(&m.mnt, "rm -r models/mlp/v3");
    assert!(!out.status.success());
    assert!(m.log_text().contains("comes from the repository directory"), "{}", m.log_text());
    assert_eq!(versions(&m, "mlp"), ["v1", "v2", "v3"]);

    // A removed version goes, unless an alias holds it: then it waits.
    sh_ok(&m.mnt, "ln -s v1 models/mlp/stable");
    std::fs::remove_dir_all(repo.join("mlp/1")).unwrap();
    std::fs::remove_dir_all(repo.join("mlp/3")).unwrap();
    wait_for("v3 removed", Duration::from_millis(SETTLE_MS * 4), || versions(&m, "mlp") == ["v1", "v2"]);
    wait_for("v1 kept, with the reason", Duration::from_millis(SETTLE_MS * 4), || {
        problem_of(&m, &repo.join("mlp/1")).is_some_and(|why| why.contains("in use by alias stable"))
    });
    sh_ok(&m.mnt, "rm models/mlp/stable");
    wait_for("v1 removed on a retry", Duration::from_secs(12), || versions(&m, "mlp") == ["v2"]);

    // A repository that vanishes is reported; its versions stay.
    std::fs::remove_dir_all(&repo).unwrap();
    wait_for("the missing repository reported", Duration::from_secs(12), || {
        problem_of(&m, &repo).is_some_and(|why| why.contains("cannot read the repository"))
    });
    assert_eq!(versions(&m, "mlp"), ["v2"]);
    let mut out = Vec::new();
    std::fs::File::open(m.path("models/mlp/v2/meta.json")).unwrap().read_to_end(&mut out).unwrap();
    assert!(!out.is_empty());
}

#[test]
fn a_large_version_copied_in_chunks_is_never_visible_early_and_models_arrive_together() {
    const MB: usize = 1 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let m = start(&repo);

    // 50 MB beside a loadable model, 1 MB at a time with pauses: at every
    // moment the directory holds a model ONNX Runtime would load.
    let dir = repo.join("big/1");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture("mlp.onnx"), dir.join("model.onnx")).unwrap();
    let data: Vec<u8> = (0..50 * MB).map(|i| (i * 7 % 251) as u8).collect();
    let copier = {
        let (path, data) = (dir.join("data.bin"), data.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(path).unwrap();
            for chunk in data.chunks(MB) {
                f.write_all(chunk).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };
    let request = format!("[{:?}]", [1.0f32; 16]);
    while !copier.is_finished() {
        assert!(versions(&m, "big").is_empty(), "visible before its last byte");
        let infer = sh(&m.mnt, &format!("echo '{request}' > models/big/latest/infer"));
        assert!(!infer.status.success(), "ran before its last byte");
        std::thread::sleep(Duration::from_millis(100));
    }
    copier.join().unwrap();
    wait_for("the big version", Duration::from_millis(SETTLE_MS * 4), || versions(&m, "big") == ["v1"]);
    assert!(std::fs::read(m.path("models/big/v1/data.bin")).unwrap() == data, "not byte-identical");
    sh_ok(&m.mnt, &format!("echo '{request}' > models/big/latest/infer && cat models/big/latest/infer"));

    // Two models dropped at once both appear.
    let tree = fixture("external_tree");
    sh_ok(
        tmp.path(),
        &format!("mkdir repo/a repo/b && (cp -r {0} repo/a/1 & cp -r {0} repo/b/7 & wait)", tree.display()),
    );
    wait_for("both models", Duration::from_millis(SETTLE_MS * 4), || {
        versions(&m, "a") == ["v1"] && versions(&m, "b") == ["v7"]
    });
}
