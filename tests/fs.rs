//! The tree's semantics, driven through `aifs::fs::Fs` directly: no FUSE,
//! no kernel, no runtime library. A real store on disk, the real engine,
//! and the fake backend (`aifs::backend::fake`): models are `.fake` files.

mod tree;

use std::ffi::OsStr;
use std::path::Path;

use aifs::engine::EngineConfig;
use aifs::fs::{Caller, Kind, SetAttr, ROOT_INO};

use tree::*;

#[test]
fn root_lists_the_tree() {
    let t = tree();
    assert_eq!(t.names("/"), ["README", "status", "metrics", "models", "devices", "jobs", "blobs"]);
    assert_eq!(t.names("devices"), ["cpu"]);
    assert_eq!(t.names("devices/cpu"), ["name", "util", "memory.total", "memory.used", "queue", "running", "models"]);
    assert!(t.names("jobs").is_empty());
    let readme = String::from_utf8(t.read_all("README")).unwrap();
    assert!(readme.contains("mkdir /mnt/aifs/models/demo"), "{readme}");
    let status: serde_json::Value = serde_json::from_slice(&t.read_all("status")).unwrap();
    assert_eq!(status["backends"][0]["name"], "fake");
    assert_eq!(status["store"]["bytes"], 0);
}

#[test]
fn invalid_model_names_create_nothing() {
    let t = tree();
    let long = vec![b'a'; 256];
    for name in [&b""[..], b".", b"..", b".hidden", b"a/b", b"a\0b", &long] {
        let err = t.mkdir(name).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{:?}", String::from_utf8_lossy(name));
    }
    assert!(t.names("models").is_empty());
    t.mkdir(&[b'a'; 255]).unwrap();
    assert_eq!(t.mkdir(&[b'a'; 255]).unwrap_err().errno(), libc::EEXIST);
}

#[test]
fn copy_in_makes_a_version_with_its_files() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    let mlp = fixture("mlp.fake");
    t.copy_in("m", "mlp.fake", &mlp).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "v1"]);
    assert_eq!(
        t.names("models/m/v1"),
        ["mlp.fake", "digest", "meta.json", "stats", "signature", "infer", "clone", "error"]
    );
    assert_eq!(t.read_all("models/m/v1/mlp.fake"), mlp);
    assert_eq!(t.fs.readlink(t.ino("models/m/latest")).unwrap(), "v1");
    let meta: serde_json::Value = serde_json::from_slice(&t.read_all("models/m/v1/meta.json")).unwrap();
    assert_eq!(
        meta["inputs"],
        serde_json::json!([{"name": "x", "dtype": "float32", "shape": [-1, 16], "dim_names": ["N", ""]}])
    );
    assert_eq!(meta["size"], mlp.len());
    // The same bytes again: no new version.
    t.copy_in("m", "mlp.fake", &mlp).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "v1"]);
}

#[test]
fn a_shell_redirect_closes_a_duplicate_before_writing() {
    // `cat f > models/m/f.fake`: the shell closes its own descriptor after
    // dup2, before cat writes. That first close must not commit (or lose)
    // anything; the last one commits.
    let t = tree();
    t.mkdir(b"m").unwrap();
    let (_, o) = t.fs.create(t.ino("models/m"), OsStr::new("s.fake"), 0o644, ME).unwrap();
    assert_eq!(t.flush(o.fh).unwrap_err().errno(), libc::EINVAL);
    t.fs.write(o.fh, 0, &fixture("b.fake")).unwrap();
    t.flush(o.fh).unwrap();
    t.release(o.fh).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "v1"]);
}

#[test]
fn bad_models_fail_the_close_and_leave_nothing() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    for name in ["empty.fake", "garbage.fake", "truncated.fake"] {
        let err = t.copy_in("m", name, &fixture(name)).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
        assert!(!err.to_string().contains("tmp-"), "reason names the temp file: {err}");
    }
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status"]);
    assert!(t.blob_files().is_empty(), "{:?}", t.blob_files());
}

#[test]
fn files_that_cannot_be_models_are_refused_at_create() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    let m = t.ino("models/m");
    let create = |parent, name: &str| t.fs.create(parent, OsStr::new(name), 0o644, ME).map(|_| ()).unwrap_err().errno();
    assert_eq!(create(m, "weights.bin"), libc::EINVAL);
    assert_eq!(create(m, "digest"), libc::EINVAL);
    assert_eq!(create(m, ".x.fake"), libc::EINVAL);
    assert_eq!(create(t.ino("models"), "x.fake"), libc::EPERM);
    assert_eq!(create(ROOT_INO, "x.fake"), libc::EPERM);
    t.copy_in("m", "mlp.fake", &fixture("mlp.fake")).unwrap();
    assert_eq!(create(t.ino("models/m/v1"), "x.fake"), libc::EROFS);
    assert_eq!(create(m, "v1"), libc::EEXIST);
    assert!(t.blob_files().len() == 1);
}

#[test]
fn versions_are_read_only() {
    let t = tree();
    t.add_mlp();
    for path in ["models/m/v1/mlp.fake", "models/m/v1/digest", "models/m/v1/meta.json"] {
        for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
            assert_eq!(t.fs.open(t.ino(path), flags, ME).unwrap_err().errno(), libc::EROFS, "{path}");
        }
    }
    let chmod = SetAttr { mode: Some(0o777), ..Default::default() };
    assert_eq!(t.fs.setattr(t.ino("models/m/v1"), chmod).unwrap_err().errno(), libc::EROFS);
    let truncate = SetAttr { size: Some(0), ..Default::default() };
    assert_eq!(t.fs.setattr(t.ino("models/m/v1/mlp.fake"), truncate).unwrap_err().errno(), libc::EROFS);
    assert_eq!(t.fs.mkdir(t.ino("models/m/v1"), OsStr::new("d"), 0o755, ME).unwrap_err().errno(), libc::EROFS);
    assert_eq!(t.fs.open(t.ino("README"), libc::O_WRONLY, ME).unwrap_err().errno(), libc::EACCES);
    assert_eq!(t.fs.open(t.ino("status"), libc::O_RDWR, ME).unwrap_err().errno(), libc::EACCES);
    let blob = t.names("blobs").remove(0);
    assert_eq!(t.fs.open(t.ino(&format!("blobs/{blob}")), libc::O_WRONLY, ME).unwrap_err().errno(), libc::EROFS);
}

#[test]
fn aliases_rename_and_pin() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    t.copy_in("m", "a.fake", &fixture("a.fake")).unwrap();
    t.copy_in("m", "b.fake", &fixture("b.fake")).unwrap();
    let m = t.ino("models/m");
    t.fs.symlink(m, OsStr::new("stable"), Path::new("v1")).unwrap();
    assert_eq!(t.fs.getattr(t.ino("models/m/stable")).unwrap().kind, Kind::Symlink);
    // ln -sfn v2 stable == symlink to a temp name, rename over.
    t.fs.symlink(m, OsStr::new("CuTmp"), Path::new("v2")).unwrap();
    assert_eq!(t.fs.rename(m, OsStr::new("CuTmp"), m, OsStr::new("stable"), true).unwrap_err().errno(), libc::EEXIST);
    t.fs.rename(m, OsStr::new("CuTmp"), m, OsStr::new("stable"), false).unwrap();
    assert_eq!(t.fs.readlink(t.ino("models/m/stable")).unwrap(), "v2");
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "stable", "v1", "v2"]);
    // Neither versions nor latest can be renamed or replaced.
    assert_eq!(t.fs.rename(m, OsStr::new("stable"), m, OsStr::new("latest"), false).unwrap_err().errno(), libc::EPERM);
    assert_eq!(t.fs.rename(m, OsStr::new("stable"), m, OsStr::new("v1"), false).unwrap_err().errno(), libc::EPERM);
    assert_eq!(t.fs.rename(m, OsStr::new("latest"), m, OsStr::new("x"), false).unwrap_err().errno(), libc::EPERM);
    assert_eq!(t.fs.rename(m, OsStr::new("v1"), m, OsStr::new("x"), false).unwrap_err().errno(), libc::EPERM);
    // A dangling alias is refused.
    assert_eq!(t.fs.symlink(m, OsStr::new("x"), Path::new("v9")).unwrap_err().errno(), libc::ENOENT);
    assert_eq!(t.fs.symlink(m, OsStr::new("x"), Path::new("/etc")).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(t.fs.symlink(t.ino("models"), OsStr::new("x"), Path::new("m")).unwrap_err().errno(), libc::EPERM);
}

#[test]
fn removing_a_version_file_by_file_follows_rmdir_rules() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    t.copy_in("m", "a.fake", &fixture("a.fake")).unwrap();
    let m = t.ino("models/m");
    let v1 = t.ino("models/m/v1");
    t.fs.symlink(m, OsStr::new("stable"), Path::new("v1")).unwrap();
    assert_eq!(t.fs.unlink(v1, OsStr::new("a.fake")).unwrap_err().errno(), libc::EBUSY);
    assert_eq!(t.fs.rmdir(m, OsStr::new("v1")).unwrap_err().errno(), libc::EBUSY);
    assert_eq!(t.fs.rmdir(t.ino("models"), OsStr::new("m")).unwrap_err().errno(), libc::ENOTEMPTY);
    t.fs.unlink(m, OsStr::new("stable")).unwrap();
    // rm -r v1: unlink each file (accepted, nothing changes yet), then rmdir.
    for f in ["a.fake", "digest", "meta.json", "stats", "signature", "infer", "clone", "error"] {
        t.fs.unlink(v1, OsStr::new(f)).unwrap();
    }
    assert_eq!(t.names("models/m/v1").len(), 8);
    t.fs.unlink(m, OsStr::new("latest")).unwrap();
    t.fs.rmdir(m, OsStr::new("v1")).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status"]);
    assert!(t.blob_files().is_empty());
    assert_eq!(t.try_ino("models/m/v1").unwrap_err().errno(), libc::ENOENT);
    t.fs.rmdir(t.ino("models"), OsStr::new("m")).unwrap();
    assert_eq!(t.fs.getattr(m).unwrap_err().errno(), libc::ENOENT);
}

#[test]
fn chmod_and_chown_of_models_are_kept() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    let m = t.ino("models/m");
    let a = t.fs.getattr(m).unwrap();
    assert_eq!((a.uid, a.gid, a.perm), (1000, 1000, 0o755));
    let a = t.fs.setattr(m, SetAttr { mode: Some(0o40700), uid: Some(7), gid: Some(8), size: None }).unwrap();
    assert_eq!((a.uid, a.gid, a.perm), (7, 8, 0o700));
    let m = t.fs.store().model("m").unwrap();
    assert_eq!((m.uid, m.gid, m.mode), (7, 8, 0o700));
}

#[test]
fn a_waiting_reader_runs_its_cpu_job_on_its_own_thread() {
    let t = tree_with(EngineConfig { workers: 2, inline_runs: 1, ..Default::default() });
    t.add_mlp();
    let o = t.fs.open(t.ino("models/m/v1/infer"), libc::O_RDWR, ME).unwrap();
    let body = format!("[[{}]]", vec!["0.5"; 16].join(","));
    t.fs.write(o.fh, 0, body.as_bytes()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    t.fs.read(o.fh, 0, 4096, move |r| tx.send((std::thread::current().id(), r)).is_ok());
    // Answered before read() returned, on this thread: no worker hand-off.
    let (thread, reply) = rx.try_recv().expect("answered inline");
    assert_eq!(thread, std::thread::current().id());
    assert!(reply.unwrap().starts_with(b"[["));
    t.release(o.fh).unwrap();
}

#[test]
fn only_handles_that_may_hold_unsent_writes_get_a_flush() {
    let t = tree();
    t.add_mlp();
    let cases = [
        ("models/m/v1/infer", libc::O_WRONLY, false),
        ("models/m/v1/infer", libc::O_RDWR, true),
        ("models/m/v1/infer", libc::O_RDONLY, true),
        ("models/m/config.json", libc::O_WRONLY | libc::O_TRUNC, false),
        ("models/m/v1/meta.json", libc::O_RDONLY, true),
        ("status", libc::O_RDONLY, true),
    ];
    for (path, flags, no_flush) in cases {
        let o = t.fs.open(t.ino(path), flags, ME).unwrap();
        assert_eq!(o.no_flush, no_flush, "{path} opened with {flags:#o}");
        t.release(o.fh).unwrap();
    }
}

/// A read-write `infer` handle gets no `flush`: closed unread, its request
/// is sent by its release, which the kernel queues without waiting for it.
/// The session's next reader may come first: it sends what the session's
/// handles hold, then reads the latest request.
#[test]
fn a_request_closed_unread_is_what_its_session_reads_next() {
    let t = tree();
    t.add_mlp();
    let infer = t.ino("models/m/v1/infer");
    let body = |x: f32| format!("[[{}]]", vec![x.to_string(); 16].join(","));
    let one_handle = |x: f32| {
        let o = t.fs.open(infer, libc::O_RDWR, ME).unwrap();
        t.fs.write(o.fh, 0, body(x).as_bytes()).unwrap();
        let out = t.read(o.fh, 0, 4096).unwrap();
        t.release(o.fh).unwrap();
        out
    };
    let (a, b) = (one_handle(0.25), one_handle(0.75));
    assert_ne!(a, b);

    // The session's last request is a; a handle writes b and is closed,
    // but its release has not come when the next reader reads.
    one_handle(0.25);
    let w = t.fs.open(infer, libc::O_RDWR, ME).unwrap();
    t.fs.write(w.fh, 0, body(0.75).as_bytes()).unwrap();
    let r = t.fs.open(infer, libc::O_RDONLY, ME).unwrap();
    assert_eq!(t.read(r.fh, 0, 4096).unwrap(), b, "the reader saw the request before the one closed");
    t.release(r.fh).unwrap();
    // The release finds it sent; a handle's own read gets the same reply.
    t.release(w.fh).unwrap();
    assert_eq!(t.read_all("models/m/v1/infer"), b);
    let w = t.fs.open(infer, libc::O_RDWR, ME).unwrap();
    t.fs.write(w.fh, 0, body(0.25).as_bytes()).unwrap();
    assert_eq!(t.read_all("models/m/v1/infer"), a);
    assert_eq!(t.read(w.fh, 0, 4096).unwrap(), a);
    t.release(w.fh).unwrap();

    // A request sent late (its release came after a later request was
    // sent) does not displace the later one.
    let late = t.fs.open(infer, libc::O_RDWR, ME).unwrap();
    t.fs.write(late.fh, 0, body(0.75).as_bytes()).unwrap();
    let w = t.fs.open(infer, libc::O_WRONLY, ME).unwrap();
    t.fs.write(w.fh, 0, body(0.25).as_bytes()).unwrap();
    t.flush(w.fh).unwrap();
    t.release(w.fh).unwrap();
    t.release(late.fh).unwrap();
    assert_eq!(t.read_all("models/m/v1/infer"), a);

    // A write-only handle still gets its flush, which sends (and reports).
    let w = t.fs.open(infer, libc::O_WRONLY, ME).unwrap();
    t.fs.write(w.fh, 0, b"[[1, 2").unwrap();
    assert_eq!(t.flush(w.fh).unwrap_err().errno(), libc::EINVAL);
    t.release(w.fh).unwrap();
    let r = t.fs.open(infer, libc::O_RDONLY, ME).unwrap();
    assert_eq!(t.read(r.fh, 0, 4096).unwrap_err().errno(), libc::EINVAL);
    t.release(r.fh).unwrap();
}

/// Priorities are bounded, and only the model's owner (or root) may raise
/// a job above the model's own priority: a job owner cannot jump the
/// queue of everyone else.
#[test]
fn job_priorities_are_bounded_and_raised_only_by_the_models_owner() {
    const OTHER: Caller = Caller { uid: 2000, gid: 2000, pid: 1 };
    let t = tree();
    t.add_mlp();
    let clone = t.fs.open(t.ino("models/m/v1/clone"), libc::O_RDONLY, OTHER).unwrap();
    let id = String::from_utf8(t.read(clone.fh, 0, 64).unwrap()).unwrap().trim().to_string();
    t.release(clone.fh).unwrap();
    let set = |who: Caller, value: &str| {
        let o = t.fs.open(t.ino(&format!("jobs/{id}/priority")), libc::O_WRONLY, who).unwrap();
        let written = t.fs.write(o.fh, 0, value.as_bytes()).map(drop);
        t.release(o.fh).unwrap();
        written
    };
    let errno = |r: aifs::Result<()>| r.unwrap_err().errno();
    assert_eq!(errno(set(OTHER, "5")), libc::EPERM);
    assert_eq!(errno(set(OTHER, "2147483647")), libc::EINVAL);
    assert_eq!(errno(set(ME, "101")), libc::EINVAL);
    set(OTHER, "-5").unwrap();
    set(OTHER, "0").unwrap();
    set(ME, "100").unwrap();
    assert_eq!(t.read_all(&format!("jobs/{id}/priority")), b"100\n");
}

/// `vN/error` says why the session's last request failed, without its job
/// id; empty once a request succeeds; ENODATA before any.
#[test]
fn the_error_file_gives_the_sessions_last_failure() {
    let t = tree();
    t.add_mlp();
    let error = || {
        let o = t.fs.open(t.ino("models/m/v1/error"), libc::O_RDONLY, ME)?;
        let text = t.read(o.fh, 0, 4096);
        t.release(o.fh).unwrap();
        text
    };
    assert_eq!(error().unwrap_err().errno(), libc::ENODATA);
    let send = |body: &[u8]| {
        let w = t.fs.open(t.ino("models/m/v1/infer"), libc::O_WRONLY, ME).unwrap();
        t.fs.write(w.fh, 0, body).unwrap();
        let sent = t.flush(w.fh);
        t.release(w.fh).unwrap();
        sent
    };
    assert_eq!(send(b"[[1, 2]]").unwrap_err().errno(), libc::EINVAL);
    let reason = String::from_utf8(error().unwrap()).unwrap();
    assert!(reason.starts_with("input \"x\": expected shape [-1, 16], got [1, 2]\n"), "{reason}");
    send(format!("[[{}]]", vec!["1"; 16].join(",")).as_bytes()).unwrap();
    t.read_all("models/m/v1/infer");
    assert_eq!(error().unwrap(), b"");
    assert_eq!(t.fs.open(t.ino("models/m/v1/error"), libc::O_WRONLY, ME).unwrap_err().errno(), libc::EROFS);
}

/// A job's input grows by what is written: a write past its end (a
/// `pwrite` at 900 MB) is refused before anything is allocated.
#[test]
fn job_inputs_are_written_in_order() {
    let t = tree();
    t.add_mlp();
    let id = String::from_utf8(t.read_all("models/m/v1/clone")).unwrap().trim().to_string();
    let o = t.fs.open(t.ino(&format!("jobs/{id}/input")), libc::O_WRONLY, ME).unwrap();
    let e = t.fs.write(o.fh, 900 << 20, b"x").unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("would leave a hole of more than 16777216 bytes"), "{e}");
    t.release(o.fh).unwrap();
}

/// Signed versions: the model's owner writes keys and a policy to `trust`;
/// `<file>.minisig`, a minisign signature of the version's manifest, is
/// copied in before `<file>`; `vN/signature` says who signed. Under
/// `require`, an unsigned import is EACCES and a badly signed one EINVAL,
/// each leaving nothing behind.
#[test]
fn signed_versions() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    let keys = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let write = |path: &str, bytes: &[u8]| {
        let o = t.fs.open(t.ino(path), libc::O_WRONLY | libc::O_TRUNC, ME)?;
        t.fs.write(o.fh, 0, bytes)?;
        let closed = t.flush(o.fh);
        t.release(o.fh).unwrap();
        closed
    };
    assert_eq!(write("models/m/trust", b"policy require\n").unwrap_err().errno(), libc::EINVAL, "no key");
    write("models/m/trust", format!("untrusted comment: ours\n{}\n", keys.pk.to_base64()).as_bytes()).unwrap();
    assert!(String::from_utf8(t.read_all("models/m/trust")).unwrap().starts_with("policy require\nRW"));

    let model = fixture("mlp.fake");
    let manifest = format!("{}  mlp.fake\n", aifs::store::Digest::of(&model));
    let sign = |sk: &minisign::SecretKey, text: &str| {
        minisign::sign(None, sk, text.as_bytes(), Some("release 1"), None).unwrap().into_string().into_bytes()
    };
    // Unsigned, then signed by another key: refused, nothing kept.
    assert_eq!(t.copy_in("m", "mlp.fake", &model).unwrap_err().errno(), libc::EACCES);
    let stranger = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    t.copy_in("m", "mlp.fake.minisig", &sign(&stranger.sk, &manifest)).unwrap();
    let e = t.copy_in("m", "mlp.fake", &model).unwrap_err();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("not by any key of the model's trust file"), "{e}");
    assert!(t.blob_files().is_empty(), "{:?}", t.blob_files());
    // Signed by the key: v1, and who signed it.
    t.copy_in("m", "mlp.fake.minisig", &sign(&keys.sk, &manifest)).unwrap();
    t.copy_in("m", "mlp.fake", &model).unwrap();
    let signature = String::from_utf8(t.read_all("models/m/v1/signature")).unwrap();
    assert_eq!(signature, format!("signed by {}\ntrusted comment: release 1\n", keys.pk.to_base64()));
    // The signature was used up: the next import needs its own.
    assert_eq!(t.copy_in("m", "b.fake", &fixture("b.fake")).unwrap_err().errno(), libc::EACCES);
    write("models/m/trust", b"policy off\n").unwrap();
    t.copy_in("m", "b.fake", &fixture("b.fake")).unwrap();
    assert_eq!(t.read_all("models/m/v2/signature"), b"unsigned\n");
}
