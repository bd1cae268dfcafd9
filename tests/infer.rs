//! Inference through a live mount: outputs against onnxruntime's, the three
//! ways under concurrency, every bad request's errno and reason, waiting
//! without holding FUSE threads, job ownership, tampered blobs, examples.

mod common;

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// `[[[[[0, 0, ...1023], ...]]]]`: nested 5 deep, 1024 wide only at the front.
fn hostile_json() -> Vec<u8> {
    let mut v = String::from("0");
    for _ in 0..5 {
        v = format!("[{v}{}]", ",0".repeat(1023));
    }
    v.into_bytes()
}

#[test]
fn outputs_match_onnxruntime_for_every_model_codec_and_way() {
    let m = Mount::start();
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/reference.py"))
        .arg(&m.mnt)
        .arg(repo().join("target/fixtures"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}\n{}", String::from_utf8_lossy(&out.stderr), m.log_text());
    // Every case ran: 19 models (one with no inputs), at least 3 checks each.
    let passed: usize = text.lines().last().unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 19 * 3, "{text}");
    assert!(text.contains("ok   constant kserve by_clone"), "{text}");
    // Each version was loaded once (one instance: the requests came one at a time).
    assert_eq!(m.log_text().matches("loaded an instance").count(), 19, "{}", m.log_text());
}

#[test]
fn concurrent_clients_get_exactly_their_own_outputs() {
    const CLIENTS: usize = 32;
    const REQUESTS: usize = 200;
    let m = Mount::start();
    let v1 = import(&m, "id", &model_fixture("identity_int64.onnx"));
    let infer = v1.join("infer");
    let request = |c: usize, r: usize| format!("[[{c},{r}]]");

    // 1. One handle each, in threads of this process.
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let infer = infer.clone();
            std::thread::spawn(move || {
                (0..REQUESTS)
                    .filter(|&r| {
                        let out = one_handle(&infer, request(c, r).as_bytes()).unwrap();
                        out != format!("{}\n", request(c, r)).as_bytes()
                    })
                    .count()
            })
        })
        .collect();
    let mismatches: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(mismatches, 0, "one handle");

    // 2. Write then read: each client is a shell in its own session.
    let shells: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let script = format!(
                r#"for r in $(seq 0 {last}); do
                     echo "[[{c},$r]]" > {infer}
                     read -r out < {infer}
                     [ "$out" = "[[{c},$r]]" ] || echo "client {c} request $r got $out"
                   done"#,
                last = REQUESTS - 1,
                infer = infer.display()
            );
            Command::new("setsid").args(["bash", "-c", &script]).output_async()
        })
        .collect();
    for shell in shells {
        let out = shell.wait_with_output().unwrap();
        assert!(
            out.status.success() && out.stdout.is_empty(),
            "write then read: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // 3. Clone: a job per request.
    let clone = v1.join("clone");
    let jobs = m.path("jobs");
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (clone, jobs) = (clone.clone(), jobs.clone());
            std::thread::spawn(move || {
                (0..REQUESTS)
                    .filter(|&r| {
                        let id = std::fs::read_to_string(&clone).unwrap();
                        let job = jobs.join(id.trim());
                        std::fs::write(job.join("input"), request(c, r)).unwrap();
                        std::fs::read(job.join("output")).unwrap() != format!("{}\n", request(c, r)).as_bytes()
                    })
                    .count()
            })
        })
        .collect();
    let mismatches: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(mismatches, 0, "clone");
}

trait OutputAsync {
    fn output_async(&mut self) -> std::process::Child;
}

impl OutputAsync for Command {
    fn output_async(&mut self) -> std::process::Child {
        self.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::inherit()).spawn().unwrap()
    }
}

#[test]
fn bad_requests_fail_with_their_errno_and_one_line_reason() {
    let m = Mount::start_with(&["--max-input-bytes", "100000"]);
    let mlp = import(&m, "mlp", &fixture("mlp.onnx")).join("infer");
    let multi = import(&m, "multi", &model_fixture("multi.onnx")).join("infer");
    let npy_f64 = std::fs::read(fixture("cases/identity_float64/input.npy")).unwrap();
    let npy_f32 = std::fs::read(fixture("cases/identity_float32/input.npy")).unwrap();
    let big = format!("[{}]", vec!["1"; 60_000].join(","));
    let cases: Vec<(&str, &Path, Vec<u8>, i32, String)> = vec![
        ("malformed JSON", &mlp, b"[[1, 2".to_vec(), libc::EINVAL, "malformed JSON".into()),
        (
            "truncated .npy",
            &mlp,
            npy_f32[..npy_f32.len() - 5].to_vec(),
            libc::EINVAL,
            "truncated or malformed .npy".into(),
        ),
        ("wrong dtype", &mlp, npy_f64, libc::EINVAL, r#"input "x": expected dtype float32, got float64"#.into()),
        (
            "wrong rank",
            &mlp,
            b"[1, 2, 3]".to_vec(),
            libc::EINVAL,
            r#"input "x": expected shape [-1, 16], got [3]"#.into(),
        ),
        (
            "wrong dimension",
            &mlp,
            b"[[1, 2, 3]]".to_vec(),
            libc::EINVAL,
            r#"input "x": expected shape [-1, 16], got [1, 3]"#.into(),
        ),
        (
            "missing input",
            &multi,
            br#"{"a": [[1, 2, 3]]}"#.to_vec(),
            libc::EINVAL,
            r#"missing input "b" (expected int64 [-1])"#.into(),
        ),
        (
            "unknown input",
            &multi,
            br#"{"a": [[1, 2, 3]], "b": [1], "c": [1]}"#.to_vec(),
            libc::EINVAL,
            r#"unknown input "c" (the model's inputs: a, b)"#.into(),
        ),
        (
            "float for an integer",
            &multi,
            br#"{"a": [[1, 2, 3]], "b": [1.5]}"#.to_vec(),
            libc::EINVAL,
            r#"input "b": a float (1.5) where an integer (int64) is required"#.into(),
        ),
        ("not a known format", &mlp, b"hello".to_vec(), libc::EINVAL, "unrecognized input".into()),
        // 10 KB whose first elements claim a 1024^5 shape: refused, not allocated.
        ("a hostile shape", &mlp, hostile_json(), libc::EINVAL, "ragged array".into()),
        (
            "over the size limit",
            &mlp,
            big.into_bytes(),
            libc::EFBIG,
            "input larger than the limit of 100000 bytes".into(),
        ),
    ];
    for (what, infer, body, errno_want, reason) in cases {
        let err = one_handle(infer, &body).expect_err(what);
        assert_eq!(err.raw_os_error(), Some(errno_want), "{what}: {err}");
        let id = newest_job(&m);
        let error = job_file(&m, id, "error");
        assert!(error.contains(&reason), "{what}: error file {error:?} lacks {reason:?}");
        assert_eq!(error.lines().count(), 1, "{what}: one line");
        assert_eq!(job_file(&m, id, "status"), format!("failed\n{error}"), "{what}");
        // The next good request succeeds.
        one_handle(&mlp, b"[[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]]").unwrap_or_else(|e| panic!("after {what}: {e}"));
    }

    // The same reason reaches a clone job's writer at close().
    let id = read(m.path("models/mlp/v1/clone")).trim().to_string();
    let mut input = OpenOptions::new().write(true).open(m.path(&format!("jobs/{id}/input"))).unwrap();
    input.write_all(b"[[1, 2").unwrap();
    assert_eq!(close(input), Err(libc::EINVAL));
    assert!(read(m.path(&format!("jobs/{id}/error"))).starts_with("malformed JSON"));

    // Outputs are read-only; jobs that do not exist are ENOENT.
    let done = newest_job(&m) - 1;
    assert_eq!(errno(OpenOptions::new().write(true).open(m.path(&format!("jobs/{done}/output")))), libc::EROFS);
    assert_eq!(errno(std::fs::read(m.path("jobs/999999/status"))), libc::ENOENT);
    assert_eq!(errno(std::fs::read(m.path("models/mlp/v7/infer"))), libc::ENOENT);
    // Reading infer in a session that sent nothing: ENODATA.
    sh_err(&m.mnt, "setsid -w cat models/mlp/v1/infer", "No data available");
    assert!(m.log_text().contains("rejected"), "reasons are logged");
}

/// The kernel sends no `flush` for a read-write `infer` handle: one closed
/// without a read sends its request at the release, which `close()` does
/// not wait for. The session's next read still gets that request.
#[test]
fn a_read_write_handle_closed_unread_still_sends() {
    let m = Mount::start();
    let infer = import(&m, "id", &model_fixture("identity_int32.onnx")).join("infer");
    for i in 0..200 {
        let mut f = OpenOptions::new().read(true).write(true).open(&infer).unwrap();
        f.write_all(format!("[[{i}, 1]]").as_bytes()).unwrap();
        close(f).unwrap();
        assert_eq!(std::fs::read(&infer).unwrap(), format!("[[{i},1]]\n").into_bytes(), "request {i}");
    }
    // Written by one process to a descriptor the shell keeps open, read by
    // another: the reader sends what the session holds.
    let shell = "exec 3<>models/id/v1/infer; echo '[[5, 6]]' >&3; cat models/id/v1/infer; exec 3<&-";
    assert_eq!(sh_ok(&m.mnt, shell), "[[5,6]]\n");
    // A bad request closed so: no close() reports it; the read gives its errno.
    let mut f = OpenOptions::new().read(true).write(true).open(&infer).unwrap();
    f.write_all(b"[[1, 2").unwrap();
    close(f).unwrap();
    assert_eq!(errno(std::fs::read(&infer)), libc::EINVAL);
    assert!(job_file(&m, newest_job(&m), "error").starts_with("malformed JSON"));
}

#[test]
fn waiting_readers_hold_no_fuse_thread() {
    const READERS: usize = 100;
    // A simulated GPU whose every run takes 60 s: the first job runs, the
    // rest wait behind it.
    let m = Mount::start_with(&["--threads", "2", "--simulate-gpu", "1G,60000"]);
    import(&m, "mlp", &fixture("mlp.onnx"));
    write_file(&m.path("models/mlp/config.json"), br#"{"device": "gpu0", "max_batch": 1}"#).unwrap();
    let other = import(&m, "other", &model_fixture("identity_int32.onnx")).join("infer");
    write_file(&m.path("models/other/config.json"), br#"{"device": "cpu"}"#).unwrap();
    // 100 jobs that do not end soon, and a reader blocked on each output.
    let body = format!("[[{}]]", vec!["1"; 16].join(","));
    let ids: Vec<String> = (0..READERS)
        .map(|_| {
            let id = read(m.path("models/mlp/v1/clone")).trim().to_string();
            write_file(&m.path(&format!("jobs/{id}/input")), body.as_bytes()).unwrap();
            id
        })
        .collect();
    let readers: Vec<_> = ids
        .iter()
        .map(|id| {
            let output = m.path(&format!("jobs/{id}/output"));
            std::thread::spawn(move || std::fs::read(output).map_err(|e| e.raw_os_error()))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    // With 2 FUSE threads and 100 blocked readers, the tree still answers.
    let start = Instant::now();
    assert!(sh_ok(&m.mnt, "ls jobs | wc -l").trim().parse::<usize>().unwrap() >= READERS);
    assert!(read(m.path("status")).contains("\"version\""));
    assert_eq!(one_handle(&other, b"[[7, 8]]").unwrap(), b"[[7,8]]\n");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());

    // Cancelling wakes every reader with ECANCELED.
    for id in &ids {
        std::fs::write(m.path(&format!("jobs/{id}/ctl")), "cancel\n").unwrap();
    }
    for r in readers {
        assert_eq!(r.join().unwrap(), Err(Some(libc::ECANCELED)));
    }
    assert_eq!(job_file(&m, ids[0].parse().unwrap(), "status"), "cancelled\n");
}

/// A reader blocked on an answer returns on a signal (FUSE_INTERRUPT
/// answered with EINTR): Ctrl-C stops `cat`, and a program that handles
/// the signal sees its `read` fail with EINTR, while the job goes on.
#[test]
fn a_blocked_read_returns_on_a_signal() {
    // Every run on the simulated GPU takes 60 s.
    let m = Mount::start_with(&["--simulate-gpu", "1G,60000"]);
    import(&m, "mlp", &fixture("mlp.onnx"));
    write_file(&m.path("models/mlp/config.json"), br#"{"device": "gpu0"}"#).unwrap();
    let id = read(m.path("models/mlp/v1/clone")).trim().to_string();
    let body = format!("[[{}]]", vec!["1"; 16].join(","));
    write_file(&m.path(&format!("jobs/{id}/input")), body.as_bytes()).unwrap();

    let start = Instant::now();
    let out = sh(&m.mnt, &format!("timeout -s INT 1 cat jobs/{id}/output; echo rc=$?"));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "rc=124\n", "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(20), "SIGINT took {:?}", start.elapsed());

    // The same for a one-handle `infer` reader whose handler raises.
    let start = Instant::now();
    let script = format!(
        "import os, signal\n\
         def stop(*_): raise TimeoutError\n\
         signal.signal(signal.SIGALRM, stop)\n\
         f = os.open('models/mlp/v1/infer', os.O_RDWR)\n\
         os.write(f, b'{body}')\n\
         signal.alarm(1)\n\
         try:\n    os.read(f, 4096); print('answered')\n\
         except TimeoutError: print('interrupted')\n"
    );
    let out = Command::new("python3").arg("-c").arg(script).current_dir(&m.mnt).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "interrupted\n", "{out:?}");
    assert!(start.elapsed() < Duration::from_secs(20), "SIGALRM took {:?}", start.elapsed());

    // The job was not harmed, and the mount answers.
    assert_eq!(job_file(&m, id.parse().unwrap(), "status"), "running\n");
    assert!(read(m.path("status")).contains("\"version\""));
    std::fs::write(m.path(&format!("jobs/{id}/ctl")), "cancel\n").unwrap();
    assert_eq!(errno(std::fs::read(m.path(&format!("jobs/{id}/output")))), libc::ECANCELED);
    drop(m);

    // A reader whose handler returns (Python retries the read, PEP 475),
    // interrupted every 300 ms while the 2 s job runs, gets the whole
    // answer: an interrupted read consumes nothing.
    let m = Mount::start_with(&["--simulate-gpu", "1G,2000"]);
    import(&m, "mlp", &fixture("mlp.onnx"));
    write_file(&m.path("models/mlp/config.json"), br#"{"device": "gpu0"}"#).unwrap();
    let script = format!(
        "import json, os, signal\n\
         hits = []\n\
         signal.signal(signal.SIGALRM, lambda *_: hits.append(1))\n\
         signal.setitimer(signal.ITIMER_REAL, 0.3, 0.3)\n\
         f = os.open('models/mlp/v1/infer', os.O_RDWR)\n\
         os.write(f, b'{body}')\n\
         out = b''\n\
         while chunk := os.read(f, 7):\n    out += chunk\n\
         signal.setitimer(signal.ITIMER_REAL, 0)\n\
         print(len(hits) >= 3, len(json.loads(out)[0]))\n"
    );
    let out = Command::new("python3").arg("-c").arg(script).current_dir(&m.mnt).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "True 16\n", "{out:?}");
}

#[test]
fn job_files_ctl_and_priority() {
    let m = Mount::start();
    import(&m, "mlp", &fixture("mlp.onnx"));
    let id: u64 = read(m.path("models/mlp/v1/clone")).trim().parse().unwrap();
    let job = |f: &str| job_file(&m, id, f);
    assert_eq!(
        sh_ok(&m.mnt, &format!("ls jobs/{id}")).split_whitespace().collect::<Vec<_>>(),
        ["ctl", "device", "error", "input", "model", "output", "priority", "status", "times"]
    );
    assert_eq!(job("status"), "new\n");
    let digest = read(m.path("models/mlp/v1/digest"));
    assert_eq!(job("model"), format!("mlp/v1 {digest}"));
    assert_eq!(job("error"), "");
    assert_eq!(job("priority"), "0\n");
    sh_ok(&m.mnt, &format!("echo 5 > jobs/{id}/priority"));
    assert_eq!(job("priority"), "5\n");
    sh_err(&m.mnt, &format!("echo high > jobs/{id}/priority"), "Invalid argument");
    sh_err(&m.mnt, &format!("echo explode > jobs/{id}/ctl"), "Invalid argument");
    assert_eq!(sh_ok(&m.mnt, &format!("stat -c %a jobs/{id}")), "700\n");

    std::fs::write(m.path(&format!("jobs/{id}/input")), b"[[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]]").unwrap();
    let output = read(m.path(&format!("jobs/{id}/output")));
    assert!(output.starts_with("[[") && output.ends_with("]]\n"), "{output}");
    assert_eq!(job("status"), "done\n");
    assert_eq!(job("device"), "cpu\n");
    assert_eq!(job("input"), "[[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]]");
    let times: serde_json::Value = serde_json::from_str(&job("times")).unwrap();
    for key in ["created", "submitted", "started", "finished"] {
        assert!(times[key].as_str().is_some_and(|t| t.ends_with('Z')), "{key}: {times}");
    }
    assert!(times["compute_us"].is_u64() && times["queue_us"].is_u64());
    // Once submitted, input and priority are fixed.
    assert_eq!(errno(std::fs::write(m.path(&format!("jobs/{id}/input")), b"[[1]]")), libc::EROFS);
    sh_err(&m.mnt, &format!("echo 1 > jobs/{id}/priority"), "Read-only file system");
    sh_err(&m.mnt, &format!("echo cancel > jobs/{id}/ctl"), "Invalid argument");
    // A job still new does not hold its version: deleting the version fails it.
    let pending: u64 = read(m.path("models/mlp/v1/clone")).trim().parse().unwrap();
    sh_ok(&m.mnt, "rm -r models/mlp/v1");
    assert_eq!(
        job_file(&m, pending, "status"),
        format!("failed\nmodels/mlp/v1 (deleted): no such file or directory\n")
    );
    assert_eq!(errno(std::fs::read(m.path(&format!("jobs/{pending}/output")))), libc::ENOENT);
}

#[test]
fn jobs_belong_to_the_user_who_made_them() {
    let m = Mount::start_with(&["--allow-other"]);
    import(&m, "id", &model_fixture("identity_int64.onnx"));
    one_handle(&m.path("models/id/v1/infer"), b"[[1, 2]]").unwrap();
    let roots = newest_job(&m);
    let as_nobody =
        |cmd: &str| sh(&m.mnt, &format!("setpriv --reuid=65534 --regid=65534 --clear-groups -- bash -c '{cmd}'"));

    // Same session, other user: root's last request is not theirs to read.
    let out = as_nobody("cat models/id/v1/infer");
    assert!(String::from_utf8_lossy(&out.stderr).contains("No data available"), "{out:?}");
    let out = as_nobody("echo \"[[3, 4]]\" > models/id/v1/infer && cat models/id/v1/infer");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "[[3,4]]\n");
    let theirs = newest_job(&m);
    assert_eq!(sh_ok(&m.mnt, &format!("stat -c '%a %U' jobs/{theirs}")), "700 nobody\n");
    // Nor are the store's blobs (every model's bytes).
    let out = as_nobody("ls blobs");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    assert_eq!(sh_ok(&m.mnt, &format!("stat -c '%a %U' jobs/{roots}")), "700 root\n");

    for cmd in [format!("cat jobs/{roots}/output"), format!("echo cancel > jobs/{roots}/ctl")] {
        let out = as_nobody(&cmd);
        assert!(!out.status.success(), "{cmd}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{cmd}: {out:?}");
    }
    assert!(as_nobody(&format!("cat jobs/{theirs}/status")).status.success());
}

#[test]
fn a_tampered_blob_is_refused_not_run() {
    let m = Mount::start();
    let v1 = import(&m, "mlp", &fixture("mlp.onnx"));
    let blob = m.data.join(format!("blobs/sha256-{}", sha256sum(&fixture("mlp.onnx"))));
    let mut bytes = std::fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&blob, bytes).unwrap();
    let err = one_handle(&v1.join("infer"), b"[[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1]]").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    let error = job_file(&m, newest_job(&m), "error");
    assert!(error.contains("does not match its digest"), "{error}");
}

#[test]
fn the_examples_run() {
    let m = Mount::start();
    import(&m, "mlp", &fixture("mlp.onnx"));
    let mnt = m.mnt.to_str().unwrap();
    for (program, script) in [("bash", "examples/infer.sh"), ("bash", "examples/jobs.sh")] {
        let out = Command::new(program).arg(repo().join(script)).arg(mnt).output().unwrap();
        assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let out =
        Command::new(repo().join(".venv/bin/python")).arg(repo().join("examples/infer.py")).arg(mnt).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("input float32[4, 16] -> output float32[4, 16]"));
}

/// `--max-output-bytes` bounds what a job keeps: a larger answer fails the
/// job with EFBIG and the reason, instead of being held.
#[test]
fn an_answer_over_the_output_limit_fails_with_efbig() {
    let m = Mount::start_with(&["--max-output-bytes", "1000"]);
    let infer = import(&m, "id", &model_fixture("identity_float32.onnx")).join("infer");
    assert_eq!(one_handle(&infer, b"[[1.5, 2.5]]").unwrap(), b"[[1.5,2.5]]\n");
    let big = format!("[[{}]]", vec!["0.5"; 400].join(","));
    assert_eq!(errno(one_handle(&infer, big.as_bytes())), libc::EFBIG);
    let id = newest_job(&m);
    assert_eq!(job_file(&m, id, "error"), "output larger than the limit of 1000 bytes (--max-output-bytes)\n");
}

/// A job past its `timeout_ms` stops its run in ONNX Runtime (the run's
/// terminate flag): the worker is free for the next request at once, not
/// after the ~9 s the model computes for.
#[test]
fn a_timed_out_run_is_stopped_in_onnx_runtime() {
    let m = Mount::start_with(&["--workers", "1"]);
    import(&m, "slow", &fixture("slow.onnx"));
    write_file(&m.path("models/slow/config.json"), br#"{"device": "cpu", "timeout_ms": 300}"#).unwrap();
    let fast = import(&m, "id", &model_fixture("identity_float32.onnx")).join("infer");
    write_file(&m.path("models/id/config.json"), br#"{"device": "cpu"}"#).unwrap();
    let start = Instant::now();
    let id = read(m.path("models/slow/v1/clone")).trim().to_string();
    write_file(&m.path(&format!("jobs/{id}/input")), b"[1.0]").unwrap();
    assert_eq!(errno(std::fs::read(m.path(&format!("jobs/{id}/output")))), libc::ETIMEDOUT);
    assert_eq!(one_handle(&fast, b"[[2.5]]").unwrap(), b"[[2.5]]\n");
    assert!(start.elapsed() < Duration::from_secs(5), "the worker was held for {:?}", start.elapsed());
}
