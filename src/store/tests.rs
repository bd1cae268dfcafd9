//! The store's unit tests: a real sled catalog and blob directory in a temp dir.

use std::fs;

use super::*;
use crate::backend::{Files, Inspected};
use crate::tensor::{DType, Signature, TensorSpec};

fn ok_inspect(_: &Files) -> Result<Inspected> {
    Ok(Inspected {
        format: "onnx".into(),
        backend: "test".into(),
        signature: Signature {
            inputs: vec![TensorSpec { name: "x".into(), dtype: DType::Float32, shape: vec![-1], dim_names: vec![] }],
            outputs: vec![],
            generates: false,
        },
        details: Default::default(),
    })
}

fn upload(store: &Store, bytes: &[u8]) -> Upload {
    let mut u = store.begin_upload().unwrap();
    u.write_at(0, bytes).unwrap();
    u
}

/// Everything in the blob directory, by name.
fn blob_dir(store: &Store) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(&store.blobs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Opens a store just dropped in this process: sled's flusher thread
/// may hold the file lock a moment longer (a new process never waits).
fn reopen(dir: &Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(dir) {
            Ok(store) => return store,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(e) => panic!("{e}"),
        }
    }
}

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.create_model("m", 0, 0, 0o755).unwrap();
    (dir, store)
}

#[test]
fn digest_parses_both_spellings_and_rejects_the_rest() {
    let d = Digest::of(b"abc");
    assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    assert_eq!(d.file_name().parse::<Digest>().unwrap(), d);
    assert_eq!(d.to_string(), "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    for bad in [
        "",
        "sha256:",
        "md5:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
        "sha256:BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61F20015AD",
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015a",
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad0",
        "sha256-../../../../etc/passwd",
    ] {
        assert!(bad.parse::<Digest>().is_err(), "{bad:?} parsed");
    }
}

#[test]
fn names_are_validated() {
    assert_eq!(validate_name(b"resnet-50_v2.onnx").unwrap(), "resnet-50_v2.onnx");
    assert!(validate_name(&[b'a'; 255]).is_ok());
    let controls = [&b"a\nb"[..], b"\x1b[31mred", b"tab\there", b"del\x7f"];
    for bad in [&b""[..], b".", b"..", b".hidden", b"a/b", b"a\0b", &[b'a'; 256], b"\xff"].into_iter().chain(controls) {
        let err = validate_name(bad).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{bad:?}");
    }
}

#[test]
fn version_names() {
    assert_eq!(parse_version_name("v1"), Some(1));
    assert_eq!(parse_version_name("v42"), Some(42));
    for bad in ["v", "v0", "v01", "1", "V1", "v1a", "latest", "v99999999999"] {
        assert_eq!(parse_version_name(bad), None, "{bad}");
    }
}

#[test]
fn import_commits_a_version_atomically() {
    let (_dir, store) = new_store();
    let got = store.import("m", vec![("a.onnx".into(), upload(&store, b"model bytes"))], None, ok_inspect).unwrap();
    assert_eq!(got, Imported::New(1));
    let m = store.model("m").unwrap();
    let v = &m.versions[&1];
    let blob = Digest::of(b"model bytes");
    assert_eq!(v.files, BTreeMap::from([("a.onnx".to_string(), blob)]));
    assert_eq!(v.digest, Digest::of(format!("{blob}  a.onnx\n").as_bytes()));
    assert_eq!(fs::read(store.blob_path(&blob)).unwrap(), b"model bytes");
    assert_eq!(blob_dir(&store), vec![blob.file_name()]);
    assert_eq!(store.size(), 11);
    assert_eq!(m.latest(), Some(1));
}

#[test]
fn failed_inspection_leaves_nothing() {
    let (_dir, store) = new_store();
    let err = store
        .import("m", vec![("a.onnx".into(), upload(&store, b"garbage"))], None, |_| {
            Err(Error::InvalidModel { name: "a.onnx".into(), why: "nope".into() })
        })
        .unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    assert!(store.model("m").unwrap().versions.is_empty());
    assert_eq!(blob_dir(&store), Vec::<String>::new());
    assert_eq!(store.size(), 0);
}

#[test]
fn identical_content_makes_no_new_version_and_is_stored_once() {
    let (_dir, store) = new_store();
    store.create_model("other", 0, 0, 0o755).unwrap();
    assert_eq!(
        store.import("m", vec![("a.onnx".into(), upload(&store, b"one"))], None, ok_inspect).unwrap(),
        Imported::New(1)
    );
    assert_eq!(
        store.import("m", vec![("a.onnx".into(), upload(&store, b"one"))], None, ok_inspect).unwrap(),
        Imported::Existing(1)
    );
    assert_eq!(
        store.import("m", vec![("b.onnx".into(), upload(&store, b"one"))], None, ok_inspect).unwrap(),
        Imported::Existing(1)
    );
    assert_eq!(
        store.import("m", vec![("a.onnx".into(), upload(&store, b"two"))], None, ok_inspect).unwrap(),
        Imported::New(2)
    );
    // Same bytes in another model: a version there, one blob on disk.
    assert_eq!(
        store.import("other", vec![("a.onnx".into(), upload(&store, b"one"))], None, ok_inspect).unwrap(),
        Imported::New(1)
    );
    assert_eq!(blob_dir(&store).len(), 2);
    assert_eq!(store.size(), 6);
}

#[test]
fn out_of_order_writes_hash_the_final_bytes() {
    let (_dir, store) = new_store();
    let mut u = store.begin_upload().unwrap();
    u.write_at(3, b"def").unwrap();
    u.write_at(0, b"abc").unwrap();
    store.import("m", vec![("a.onnx".into(), u)], None, ok_inspect).unwrap();
    let v = &store.model("m").unwrap().versions[&1];
    assert_eq!(v.files["a.onnx"], Digest::of(b"abcdef"));
}

#[test]
fn delete_collects_unreferenced_blobs_only() {
    let (_dir, store) = new_store();
    store.create_model("other", 0, 0, 0o755).unwrap();
    store.import("m", vec![("a.onnx".into(), upload(&store, b"shared"))], None, ok_inspect).unwrap();
    store.import("m", vec![("a.onnx".into(), upload(&store, b"mine"))], None, ok_inspect).unwrap();
    store.import("other", vec![("a.onnx".into(), upload(&store, b"shared"))], None, ok_inspect).unwrap();
    store.delete_version("m", 1).unwrap();
    assert_eq!(blob_dir(&store).len(), 2, "shared blob still used by other/v1");
    store.delete_version("m", 2).unwrap();
    assert_eq!(blob_dir(&store), vec![Digest::of(b"shared").file_name()]);
    assert_eq!(store.size(), 6);
    // Numbers are not reused.
    assert_eq!(
        store.import("m", vec![("a.onnx".into(), upload(&store, b"new"))], None, ok_inspect).unwrap(),
        Imported::New(3)
    );
}

#[test]
fn aliases_pin_versions() {
    let (_dir, store) = new_store();
    store.import("m", vec![("a.onnx".into(), upload(&store, b"1"))], None, ok_inspect).unwrap();
    store.import("m", vec![("a.onnx".into(), upload(&store, b"2"))], None, ok_inspect).unwrap();
    store.create_alias("m", "stable", "v1").unwrap();
    assert_eq!(store.create_alias("m", "stable", "v2").unwrap_err().errno(), libc::EEXIST);
    assert_eq!(store.create_alias("m", "x", "v9").unwrap_err().errno(), libc::ENOENT);
    assert_eq!(store.create_alias("m", "x", "../other").unwrap_err().errno(), libc::EINVAL);
    assert_eq!(store.create_alias("m", "latest", "v1").unwrap_err().errno(), libc::EPERM);
    assert_eq!(store.create_alias("m", "v7", "v1").unwrap_err().errno(), libc::EINVAL);
    assert_eq!(store.create_alias("m", "config.json", "v1").unwrap_err().errno(), libc::EINVAL);
    assert_eq!(store.delete_version("m", 1).unwrap_err().errno(), libc::EBUSY);
    // ln -sfn v2 stable: a temp alias renamed over the old one.
    store.create_alias("m", "tmp123", "./v2").unwrap();
    store.rename_alias("m", "tmp123", "stable", false).unwrap();
    let m = store.model("m").unwrap();
    assert_eq!(m.aliases, BTreeMap::from([("stable".to_string(), 2)]));
    store.delete_version("m", 1).unwrap();
    store.remove_alias("m", "stable").unwrap();
    assert_eq!(store.remove_model("m").unwrap_err().errno(), libc::ENOTEMPTY);
    store.delete_version("m", 2).unwrap();
    store.remove_model("m").unwrap();
    assert_eq!(store.model("m").unwrap_err().errno(), libc::ENOENT);
}

#[test]
fn config_is_validated_and_kept() {
    let (dir, store) = new_store();
    assert_eq!(store.model("m").unwrap().config, ModelConfig::default());
    let c = ModelConfig::parse(br#"{"device": "gpu0", "max_batch": 16}"#).unwrap();
    assert_eq!((c.device.as_str(), c.max_batch, c.max_queue), ("gpu0", 16, 1024));
    let not_objects = [&b"[]"[..], b"[\"cpu\", 8]", b"null", b"7", b"\"cpu\""];
    let out_of_range = [
        &br#"{"keep_alive_s": 86401}"#[..],
        br#"{"priority": 101}"#,
        br#"{"priority": -101}"#,
        br#"{"max_batch": 1025}"#,
        br#"{"timeout_ms": 3600001}"#,
        br#"{"instances": 65}"#,
        br#"{"max_queue": 65537}"#,
        br#"{"batch_delay_us": 1000001}"#,
    ];
    for bad in [&br#"{"device": "tpu"}"#[..], br#"{"max_batch": 0}"#, br#"{"nope": 1}"#, br#"{"max_batch": -1}"#, b"{"]
        .into_iter()
        .chain(not_objects)
        .chain(out_of_range)
    {
        let e = ModelConfig::parse(bad).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        assert!(e.to_string().starts_with("config.json: "), "{e}");
    }
    store.set_config("m", c.clone()).unwrap();
    drop(store);
    assert_eq!(reopen(dir.path()).model("m").unwrap().config, c);
}

#[test]
fn reopen_keeps_everything_and_removes_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let blob = Digest::of(b"kept");
    {
        let store = Store::open(dir.path()).unwrap();
        store.create_model("m", 1000, 1000, 0o700).unwrap();
        store.import("m", vec![("a.onnx".into(), upload(&store, b"kept"))], None, ok_inspect).unwrap();
        store.create_alias("m", "stable", "v1").unwrap();
        // A crash mid-import (temp file) and after the blob rename but
        // before the catalog write (orphan blob):
        std::mem::forget(upload(&store, b"half"));
        fs::write(store.blob_path(&Digest::of(b"orphan")), b"orphan").unwrap();
    }
    let store = reopen(dir.path());
    assert_eq!(blob_dir(&store), vec![blob.file_name()]);
    let m = store.model("m").unwrap();
    assert_eq!((m.uid, m.gid, m.mode), (1000, 1000, 0o700));
    assert_eq!(m.aliases["stable"], 1);
    assert_eq!(store.size(), 4);
}

/// A tmpfs of `mb` MiB mounted on a temp dir, unmounted when dropped; `None`
/// where this process may not mount (not root).
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(mb: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.0.path()).status();
    }
}

/// With the disk full, catalog writes fail with ENOSPC (not EIO) before
/// sled sees the disk full; once space is freed they succeed again, with
/// no restart.
#[test]
fn a_full_disk_is_enospc_and_recovers_by_itself() {
    let Some(disk) = SmallDisk::mount(48) else {
        eprintln!("skipped: cannot mount a tmpfs (not root)");
        return;
    };
    let store = Store::open(disk.0.path()).unwrap();
    store.create_model("before", 0, 0, 0o755).unwrap();
    store.import("before", vec![("a.onnx".into(), upload(&store, b"a version"))], None, ok_inspect).unwrap();
    let filler = disk.0.path().join("filler");
    {
        use std::io::Write;
        let mut f = fs::File::create(&filler).unwrap();
        while f.write_all(&[0u8; 1 << 16]).is_ok() {}
    }
    let e = store.create_model("full", 0, 0, 0o755).unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    assert_eq!(store.free_bytes(), 0);
    // Deleting, which frees space, works on the full disk.
    store.delete_version("before", 1).unwrap();
    fs::remove_file(&filler).unwrap();
    store.create_model("after", 0, 0, 0o755).unwrap();
    drop(store);
    let names: Vec<String> = reopen(disk.0.path()).models().iter().map(|m| m.name.clone()).collect();
    assert_eq!(names, ["after", "before"]);
}
