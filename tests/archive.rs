//! Multi-file versions: a tar (or .tar.gz) copied into a model directory
//! is one version whose tree the version directory shows, byte for byte.
//! Driven through `aifs::fs::Fs` with the fake backend (a version's one
//! `.fake` file is its model; the other files come along).

mod tree;

use std::io::Write;

use aifs::engine::EngineConfig;
use aifs::fs::FsConfig;
use aifs::store::MAX_MEMBERS;
use sha2::{Digest, Sha256};

use tree::*;

/// A tar of `(path, bytes)` files, plus directory entries for `dirs`, the
/// way `tar -C DIR -cf - .` writes it (every path under `./`).
fn tar_of(files: &[(&str, &[u8])], dirs: &[&str]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for dir in [".".to_string()].into_iter().chain(dirs.iter().map(|d| format!("./{d}"))) {
        b.append(&header(dir.as_bytes(), tar::EntryType::Directory, 0), &[][..]).unwrap();
    }
    for (path, bytes) in files {
        b.append(&header(format!("./{path}").as_bytes(), tar::EntryType::Regular, bytes.len()), *bytes).unwrap();
    }
    b.into_inner().unwrap()
}

/// A header with `path` as is (the tar crate's own setters refuse the bad
/// paths these tests need).
fn header(path: &[u8], kind: tar::EntryType, size: usize) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..path.len()].copy_from_slice(path);
    h.set_entry_type(kind);
    h.set_size(size as u64);
    h.set_mode(0o644);
    h.set_cksum();
    h
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

/// A sentence-transformers-like tree around the MLP fixture.
fn model_tree() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.fake", fixture("mlp.fake")),
        ("config.json", br#"{"model_type": "bert"}"#.to_vec()),
        (".gitattributes", b"*.fake binary\n".to_vec()),
        ("1_Pooling/config.json", br#"{"pooling_mode_mean_tokens": true}"#.to_vec()),
        ("a/b/c.txt", b"deep".to_vec()),
    ]
}

fn as_refs<'a>(files: &'a [(&'static str, Vec<u8>)]) -> Vec<(&'static str, &'a [u8])> {
    files.iter().map(|(p, b)| (*p, b.as_slice())).collect()
}

#[test]
fn a_tar_is_one_version_whose_tree_is_shown_byte_for_byte() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    let files = model_tree();
    t.copy_in("m", "model.tar", &tar_of(&as_refs(&files), &["1_Pooling", "a", "a/b", "empty"])).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "v1"]);
    assert_eq!(
        t.names("models/m/v1"),
        [".gitattributes", "1_Pooling", "a", "config.json", "model.fake"]
            .into_iter()
            .chain(["digest", "meta.json", "stats", "signature", "infer", "clone", "error"])
            .collect::<Vec<_>>()
    );
    assert_eq!(t.names("models/m/v1/1_Pooling"), ["config.json"]);
    assert_eq!(t.names("models/m/v1/a"), ["b"]);
    for (path, bytes) in &files {
        assert_eq!(&t.read_all(&format!("models/m/v1/{path}")), bytes, "{path}");
    }
    assert!(t.try_ino("models/m/v1/empty").is_err(), "empty directories are not kept");
    assert_eq!(t.try_ino("models/m/v1/a/nope").unwrap_err().errno(), libc::ENOENT);

    // The digest covers every path: sha256 of the sorted manifest.
    let mut sorted: Vec<_> = files.iter().collect();
    sorted.sort_by_key(|(p, _)| *p);
    let manifest: String =
        sorted.iter().map(|(p, b)| format!("sha256:{}  {p}\n", hex::encode(Sha256::digest(b)))).collect();
    let digest = format!("sha256:{}\n", hex::encode(Sha256::digest(manifest.as_bytes())));
    assert_eq!(String::from_utf8(t.read_all("models/m/v1/digest")).unwrap(), digest);
    let meta: serde_json::Value = serde_json::from_slice(&t.read_all("models/m/v1/meta.json")).unwrap();
    assert_eq!(meta["files"].as_object().unwrap().len(), files.len());
    assert_eq!(meta["size"], files.iter().map(|(_, b)| b.len()).sum::<usize>());
    assert_eq!(meta["backend"], "fake");

    // It runs: the extra files do not get in the way.
    let out = t.infer("models/m/v1/infer", format!("[{:?}]", [1.0f32; 16]).as_bytes()).unwrap();
    assert!(out.starts_with(b"[[2.0"), "{}", String::from_utf8_lossy(&out));

    // The same tree again, as .tar.gz and in another order: no new version.
    let mut reordered = as_refs(&files);
    reordered.reverse();
    t.copy_in("m", "model.tar.gz", &gzip(&tar_of(&reordered, &[]))).unwrap();
    t.copy_in("m", "again.tgz", &gzip(&tar_of(&as_refs(&files), &[]))).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "v1"]);

    // One file changed: a new version, sharing the other blobs.
    let mut changed = files.clone();
    changed[4].1 = b"deeper".to_vec();
    t.copy_in("m", "model.tar", &tar_of(&as_refs(&changed), &[])).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "v1", "v2"]);
    assert_eq!(t.blob_files().len(), files.len() + 1, "{:?}", t.blob_files());

    // A tree and a single file with the same bytes are different versions.
    t.copy_in("m", "model.fake", &fixture("mlp.fake")).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "v1", "v2", "v3"]);
    assert_eq!(t.blob_files().len(), files.len() + 1, "the blob is shared");
}

#[test]
fn bad_archives_fail_the_close_and_leave_nothing() {
    let t = tree_with_config(
        EngineConfig { workers: 1, ..Default::default() },
        FsConfig { max_import_bytes: 8 << 20, ..Default::default() },
    );
    t.mkdir(b"m").unwrap();
    let model = fixture("mlp.fake");
    let with = |extra: tar::Header, data: &[u8]| {
        let mut b = tar::Builder::new(Vec::new());
        b.append(&header(b"./model.fake", tar::EntryType::Regular, model.len()), &model[..]).unwrap();
        b.append(&extra, data).unwrap();
        b.into_inner().unwrap()
    };
    let good = tar_of(&[("model.fake", &model)], &[]);
    let mut truncated = good.clone();
    truncated.truncate(512 + model.len() / 2);
    let mut too_many = tar::Builder::new(Vec::new());
    for i in 0..=MAX_MEMBERS {
        too_many.append(&header(format!("d{i}").as_bytes(), tar::EntryType::Directory, 0), &[][..]).unwrap();
    }
    // A GNU long name of 64 MiB: headers the tar crate would read into memory.
    let mut long_name = header(b"././@LongLink", tar::EntryType::GNULongName, 64 << 20);
    long_name.set_cksum();
    let mut bomb = long_name.as_bytes().to_vec();
    bomb.resize(512 + (64 << 20), b'a');
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("symlink", with(header(b"./link", tar::EntryType::Symlink, 0), &[]), "link: symlink members are not allowed"),
        ("hard link", with(header(b"./hard", tar::EntryType::Link, 0), &[]), "hard: hard link members are not"),
        ("device", with(header(b"./dev", tar::EntryType::Char, 0), &[]), "dev: device members are not allowed"),
        ("fifo", with(header(b"./fifo", tar::EntryType::Fifo, 0), &[]), "fifo: FIFO members are not allowed"),
        ("dot-dot", with(header(b"./../x", tar::EntryType::Regular, 1), b"x"), "paths with '..' are not allowed"),
        ("absolute", with(header(b"/etc/x", tar::EntryType::Regular, 1), b"x"), "absolute paths are not allowed"),
        ("twice", with(header(b"model.fake", tar::EntryType::Regular, 1), b"x"), "model.fake: appears twice"),
        ("file and dir", with(header(b"model.fake/x", tar::EntryType::Regular, 1), b"x"), "both a file and a dir"),
        ("control char", with(header(b"a\x1bb", tar::EntryType::Regular, 1), b"x"), "a control character"),
        ("reserved", with(header(b"./infer", tar::EntryType::Regular, 1), b"x"), "infer is reserved"),
        ("reserved dir", with(header(b"meta.json/x", tar::EntryType::Regular, 1), b"x"), "meta.json is reserved"),
        ("truncated", truncated, "truncated archive"),
        ("not a tar", fixture("garbage.fake"), "archive"),
        ("no files", tar_of(&[], &["d"]), "the archive holds no files"),
        ("too many", too_many.into_inner().unwrap(), "more than 10000 members"),
        ("long name bomb", gzip(&bomb), "headers too large"),
        ("no model", tar_of(&[("config.json", b"{}")], &[]), "no backend reads"),
    ];
    for (what, bytes, reason) in cases {
        let name = if what == "long name bomb" { "model.tgz" } else { "model.tar" };
        let err = t.copy_in("m", name, &bytes).unwrap_err();
        assert_eq!(err.errno(), libc::EINVAL, "{what}: {err}");
        assert!(err.to_string().contains(reason), "{what}: {err}");
        assert!(err.to_string().len() <= 300, "{what}: {err}");
        assert_eq!(t.names("models/m"), ["config.json", "trust", "status"], "{what}");
        assert!(t.blob_files().is_empty(), "{what}: {:?}", t.blob_files());
    }

    // Bombs: members past --max-import-bytes, however small the archive.
    let big = vec![0u8; 16 << 20];
    let err = t.copy_in("m", "model.tgz", &gzip(&tar_of(&[("model.fake", &model), ("zeros", &big)], &[]))).unwrap_err();
    assert_eq!(err.errno(), libc::EFBIG, "{err}");
    assert!(t.blob_files().is_empty(), "{:?}", t.blob_files());

    // After all that, a good archive goes in.
    t.copy_in("m", "model.tar", &good).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status", "latest", "v1"]);
}

#[test]
fn removing_a_multi_file_version_goes_through_its_directories() {
    let t = tree();
    t.mkdir(b"m").unwrap();
    t.copy_in("m", "model.tar", &tar_of(&as_refs(&model_tree()), &[])).unwrap();
    // What `rm -r models/m/v1` does, depth first.
    let dir = t.ino("models/m/v1/1_Pooling");
    t.fs.unlink(dir, std::ffi::OsStr::new("config.json")).unwrap();
    assert_eq!(t.fs.rmdir(t.ino("models/m/v1"), std::ffi::OsStr::new("1_Pooling")).map_err(|e| e.errno()), Ok(()));
    t.fs.rmdir(t.ino("models/m"), std::ffi::OsStr::new("v1")).unwrap();
    assert_eq!(t.names("models/m"), ["config.json", "trust", "status"]);
    // mkdir inside a model (what `cp -r DIR models/m/` does first) says to use tar.
    let err = t.fs.mkdir(t.ino("models/m"), std::ffi::OsStr::new("dir"), 0o755, ME).unwrap_err();
    assert_eq!(err.errno(), libc::EPERM);
    assert!(err.to_string().contains("tar -C DIR -cf - . > models/m/model.tar"), "{err}");
}
