//! Two daemons on this machine sharing one store (docs/SCALE.md): the
//! catalog in etcd (Debian's etcd-server), blobs in an S3-compatible
//! server (moto's server mode, from PyPI), both started and stopped here.
//! Each daemon has its own mount point and data dir.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A free TCP port on 127.0.0.1.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The tests here start servers on ports found free: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits until etcd on `port` says it is healthy (listening is not enough:
/// it may not have a leader yet).
fn wait_for_etcd(port: u16) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let healthy = std::net::TcpStream::connect(("127.0.0.1", port)).ok().and_then(|mut c| {
            c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            c.write_all(b"GET /health HTTP/1.0\r\n\r\n").ok()?;
            let mut answer = String::new();
            c.read_to_string(&mut answer).ok()?;
            Some(answer.contains("\"health\":\"true\""))
        });
        if healthy == Some(true) {
            return;
        }
        assert!(Instant::now() < deadline, "etcd on {port} never became healthy");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// etcd and an S3 server, stopped when dropped.
struct Servers {
    etcd: Option<Child>,
    etcd_args: Vec<String>,
    etcd_port: u16,
    s3: Child,
    s3_port: u16,
    _dir: tempfile::TempDir,
}

impl Servers {
    fn start() -> Servers {
        let dir = tempfile::tempdir().unwrap();
        let (etcd_port, peer) = (free_port(), free_port());
        let client = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let etcd_args: Vec<String> = [
            "--name=t",
            &format!("--data-dir={}", dir.path().join("etcd").display()),
            &format!("--listen-client-urls={client}"),
            &format!("--advertise-client-urls={client}"),
            &format!("--listen-peer-urls={peer_url}"),
            &format!("--initial-advertise-peer-urls={peer_url}"),
            &format!("--initial-cluster=t={peer_url}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let s3_port = free_port();
        let s3 = Command::new(repo().join(".venv/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &s3_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server (scripts/requirements.txt; scripts/setup.sh installs it)");
        let mut servers = Servers { etcd: None, etcd_args, etcd_port, s3, s3_port, _dir: dir };
        servers.start_etcd();
        wait_for_port(s3_port, "moto_server");
        // A bucket for the blobs (moto checks no signature).
        let out = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import urllib.request; urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:{s3_port}/aifs', method='PUT'))"
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        servers
    }

    fn start_etcd(&mut self) {
        let etcd = Command::new("etcd")
            .args(&self.etcd_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server; scripts/setup.sh installs it)");
        self.etcd = Some(etcd);
        wait_for_etcd(self.etcd_port);
    }

    fn stop_etcd(&mut self) {
        if let Some(mut etcd) = self.etcd.take() {
            let _ = etcd.kill();
            let _ = etcd.wait();
        }
    }

    /// A daemon sharing the store, named `name` in the cluster view.
    fn node(&self, name: &str) -> Mount {
        self.node_with(name, &[])
    }

    fn node_with(&self, name: &str, more: &[&str]) -> Mount {
        let args = [
            "--catalog",
            &format!("etcd://127.0.0.1:{}/aifs-test", self.etcd_port),
            "--blobs",
            "s3://aifs/blobs",
            "--node",
            name,
        ];
        Mount::start_with_env(
            &[&args[..], more].concat(),
            &[
                ("AWS_ENDPOINT", format!("http://127.0.0.1:{}", self.s3_port)),
                ("AWS_ALLOW_HTTP", "true".into()),
                ("AWS_ACCESS_KEY_ID", "test".into()),
                ("AWS_SECRET_ACCESS_KEY", "test".into()),
                ("AWS_REGION", "us-east-1".into()),
            ],
        )
    }

    /// Replaces an object's bytes behind the daemons' backs.
    fn corrupt(&self, object: &str) {
        let out = Command::new(repo().join(".venv/bin/python"))
            .arg("-c")
            .arg(format!(
                "import boto3\n\
                 s3 = boto3.client('s3', endpoint_url='http://127.0.0.1:{}', region_name='us-east-1',\n\
                 aws_access_key_id='test', aws_secret_access_key='test')\n\
                 s3.put_object(Bucket='aifs', Key='{object}', Body=b'not the model')\n",
                self.s3_port
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop_etcd();
        let _ = self.s3.kill();
        let _ = self.s3.wait();
    }
}

/// Waits until `path` exists (or not), returning how long it took.
fn until_exists(path: &Path, exists: bool) -> Duration {
    let start = Instant::now();
    while path.symlink_metadata().is_ok() != exists {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never {}",
            path.display(),
            ["went", "came"][exists as usize]
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn mlp_request() -> String {
    format!("[[{}]]", (1..=16).map(|i| i.to_string()).collect::<Vec<_>>().join(","))
}

#[test]
fn a_model_copied_on_one_node_runs_on_the_other() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let servers = Servers::start();
    let (a, b) = (servers.node("a"), servers.node("b"));

    // cp on A: the version appears on B, whose first use fetches the blob.
    sh_ok(&a.mnt, "mkdir models/mlp");
    until_exists(&b.path("models/mlp"), true);
    sh_ok(&a.mnt, &format!("cp {} models/mlp/", fixture("mlp.onnx").display()));
    let delay = until_exists(&b.path("models/mlp/v1"), true);
    eprintln!("a version made on A was visible on B after {delay:?}");
    assert!(delay < Duration::from_secs(1), "{delay:?}");
    assert_eq!(read(b.path("models/mlp/v1/digest")), read(a.path("models/mlp/v1/digest")));
    let on_a = one_handle(&a.path("models/mlp/v1/infer"), mlp_request().as_bytes()).unwrap();
    let on_b = one_handle(&b.path("models/mlp/v1/infer"), mlp_request().as_bytes()).unwrap();
    assert_eq!(on_a, on_b);
    assert_eq!(std::fs::read(b.path("models/mlp/v1/mlp.onnx")).unwrap(), std::fs::read(fixture("mlp.onnx")).unwrap());

    // ln -s and rm on B appear on A.
    sh_ok(&b.mnt, "ln -s v1 models/mlp/stable");
    until_exists(&a.path("models/mlp/stable"), true);
    assert_eq!(std::fs::read_link(a.path("models/mlp/stable")).unwrap(), PathBuf::from("v1"));
    sh_ok(&b.mnt, "rm models/mlp/stable");
    until_exists(&a.path("models/mlp/stable"), false);

    // A model removed on one node can be made again on another.
    sh_ok(&a.mnt, "mkdir models/again");
    until_exists(&b.path("models/again"), true);
    sh_ok(&b.mnt, "rmdir models/again");
    until_exists(&a.path("models/again"), false);
    sh_ok(&a.mnt, "mkdir models/again");
    until_exists(&b.path("models/again"), true);
    sh_ok(&b.mnt, "rmdir models/again");
    sh_ok(&b.mnt, "mkdir models/again");
    until_exists(&a.path("models/again"), true);

    // Imports at once on A and B get distinct versions, and lose nothing.
    sh_ok(&a.mnt, "mkdir models/many");
    until_exists(&b.path("models/many"), true);
    let names = ["identity_float32.onnx", "identity_int32.onnx", "identity_int64.onnx", "identity_uint8.onnx"];
    std::thread::scope(|scope| {
        for (i, name) in names.iter().enumerate() {
            let node = if i % 2 == 0 { &a } else { &b };
            scope.spawn(move || sh_ok(&node.mnt, &format!("cp {} models/many/", model_fixture(name).display())));
        }
    });
    for node in [&a, &b] {
        until_exists(&node.path("models/many/v4"), true);
        let mut digests: Vec<String> = (1..=4).map(|n| read(node.path(&format!("models/many/v{n}/digest")))).collect();
        digests.sort();
        digests.dedup();
        assert_eq!(digests.len(), 4, "four versions, four different models");
        assert!(!node.path("models/many/v5").exists());
    }

    // A blob corrupted in the object store is refused where it is fetched.
    sh_ok(&a.mnt, "mkdir models/other");
    sh_ok(&a.mnt, &format!("cp {} models/other/", model_fixture("identity_float64.onnx").display()));
    until_exists(&b.path("models/other/v1"), true);
    let digest = read(a.path("models/other/v1/digest"));
    let meta: serde_json::Value = serde_json::from_str(&read(a.path("models/other/v1/meta.json"))).unwrap();
    let blob = meta["files"]["identity_float64.onnx"].as_str().unwrap().replace(':', "-");
    servers.corrupt(&format!("blobs/{blob}"));
    let err = one_handle(&b.path("models/other/v1/infer"), b"[[0.5, 1.0, 2.0]]").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(read(b.path("models/other/v1/error")).contains("does not match its digest"), "{digest}");

    // The cluster view: each node's entry, with its devices, while its
    // lease lives.
    let nodes = |m: &Mount| -> Vec<String> {
        let status: serde_json::Value = serde_json::from_str(&read(m.path("status"))).unwrap();
        let nodes = status["shared"]["nodes"].as_array().unwrap().clone();
        assert!(nodes.iter().all(|n| n["devices"][0]["id"] == "cpu"), "{nodes:?}");
        nodes.iter().map(|n| n["node"].as_str().unwrap().to_string()).collect()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes(&a) != ["a", "b"] {
        assert!(Instant::now() < deadline, "{:?}", nodes(&a));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes(&a) != ["a"] {
        assert!(Instant::now() < deadline, "b never left: {:?}", nodes(&a));
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn with_etcd_stopped_nodes_serve_what_they_have_and_converge_after() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut servers = Servers::start();
    let (a, b) = (servers.node("a"), servers.node("b"));
    sh_ok(&a.mnt, "mkdir models/mlp");
    sh_ok(&a.mnt, &format!("cp {} models/mlp/", fixture("mlp.onnx").display()));
    until_exists(&b.path("models/mlp/v1"), true);

    servers.stop_etcd();
    // Reads and inference go on, from the mirror.
    for node in [&a, &b] {
        assert!(node.path("models/mlp/v1/meta.json").exists());
        one_handle(&node.path("models/mlp/v1/infer"), mlp_request().as_bytes()).unwrap();
    }
    // Writes fail with EAGAIN and the reason, and commit nothing.
    let out = sh(&a.mnt, "ln -s v1 models/mlp/stable");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Resource temporarily unavailable"), "{out:?}");
    assert!(!a.path("models/mlp/stable").exists());
    let out = sh(&b.mnt, "mkdir models/new");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Resource temporarily unavailable"), "{out:?}");
    assert!(!b.path("models/new").exists());
    let status: serde_json::Value = serde_json::from_str(&read(a.path("status"))).unwrap();
    assert!(status["shared"]["unreachable_since"].is_string(), "{status}");

    // etcd back: writes work again and both nodes converge.
    servers.start_etcd();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sh(&b.mnt, "ln -s v1 models/mlp/stable").status.success() {
        assert!(Instant::now() < deadline, "writes never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    until_exists(&a.path("models/mlp/stable"), true);
    sh_ok(&a.mnt, &format!("cp {} models/mlp/", model_fixture("identity_float32.onnx").display()));
    until_exists(&b.path("models/mlp/v2"), true);
}

#[test]
fn a_bounded_cache_keeps_the_most_recently_used_blobs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let servers = Servers::start();
    let a = servers.node("a");
    let files = [
        ("one", fixture("mlp.onnx")),
        ("two", model_fixture("identity_float32.onnx")),
        ("three", model_fixture("identity_int32.onnx")),
    ];
    // A bound that holds any two of the three blobs, not all three.
    let total: u64 = files.iter().map(|(_, f)| std::fs::metadata(f).unwrap().len()).sum();
    let b = servers.node_with("b", &["--blob-cache-bytes", &(total - 1).to_string()]);
    for (model, file) in &files {
        sh_ok(&a.mnt, &format!("mkdir models/{model} && cp {} models/{model}/", file.display()));
    }
    until_exists(&b.path("models/three/v1"), true);
    let cached = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(b.data.join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().replace('-', ":"))
            .filter(|n| n.starts_with("sha256:"))
            .collect();
        names.sort();
        names
    };
    let blob_of = |model: &str| {
        let meta: serde_json::Value =
            serde_json::from_str(&read(a.path(&format!("models/{model}/v1/meta.json")))).unwrap();
        meta["files"].as_object().unwrap().values().next().unwrap().as_str().unwrap().to_string()
    };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    // Each first use fetches the blob, the same bytes.
    let use_file = |model: &str| {
        let (_, file) = files.iter().find(|(m, _)| *m == model).unwrap();
        let name = file.file_name().unwrap().to_string_lossy();
        let got = std::fs::read(b.path(&format!("models/{model}/v1/{name}"))).unwrap();
        assert_eq!(got, std::fs::read(file).unwrap(), "{model}");
    };
    one_handle(&b.path("models/one/v1/infer"), mlp_request().as_bytes()).unwrap();
    use_file("two");
    assert_eq!(cached(), sorted(vec![blob_of("one"), blob_of("two")]));
    // One used again, then three: two is the least recently used.
    use_file("one");
    use_file("three");
    assert_eq!(cached(), sorted(vec![blob_of("one"), blob_of("three")]));
    // The evicted blob comes back when used.
    use_file("two");
    assert_eq!(cached(), sorted(vec![blob_of("two"), blob_of("three")]));
    // The loaded model runs on (its staged copy is its own).
    one_handle(&b.path("models/one/v1/infer"), mlp_request().as_bytes()).unwrap();
}
