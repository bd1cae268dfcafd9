//! Scheduling through a live mount, with simulated GPUs for what this
//! machine lacks: priority order, aging, batching, placement, eviction,
//! keep-alive, cancel, timeout, backpressure, restart, config.json,
//! devices, metrics and stats.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Writes `models/<model>/config.json`; panics if the close reports an error.
fn configure(m: &Mount, model: &str, json: &str) {
    write_file(&m.path(&format!("models/{model}/config.json")), json.as_bytes())
        .unwrap_or_else(|e| panic!("config {json}: errno {e}"));
}

/// A job by clone: priority (if any) while new, then the input (submits).
fn submit(m: &Mount, model: &str, body: &str, priority: Option<i32>) -> u64 {
    let id: u64 = read(m.path(&format!("models/{model}/v1/clone"))).trim().parse().unwrap();
    if let Some(p) = priority {
        write_file(&m.path(&format!("jobs/{id}/priority")), format!("{p}\n").as_bytes()).unwrap();
    }
    write_file(&m.path(&format!("jobs/{id}/input")), body.as_bytes()).unwrap_or_else(|e| panic!("submit {body}: {e}"));
    id
}

fn output(m: &Mount, id: u64) -> Result<String, i32> {
    std::fs::read_to_string(m.path(&format!("jobs/{id}/output"))).map_err(|e| e.raw_os_error().unwrap())
}

fn times(m: &Mount, id: u64) -> serde_json::Value {
    serde_json::from_str(&job_file(m, id, "times")).unwrap()
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A one-row int32 `.npy` (format 1.0).
fn npy_int32(values: &[i32]) -> Vec<u8> {
    let mut header = format!("{{'descr': '<i4', 'fortran_order': False, 'shape': (1, {}), }}", values.len());
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
    out
}

fn device_file(m: &Mount, device: &str, file: &str) -> String {
    read(m.path(&format!("devices/{device}/{file}")))
}

#[test]
fn higher_priority_runs_first_then_fifo() {
    // One slow worker, no aging: the queue order is the priority order.
    let m = Mount::start_with(&["--simulate-gpu", "1G,200", "--aging-ms", "0"]);
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    configure(&m, "id", r#"{"device": "gpu0", "max_batch": 1}"#);
    let blocker = submit(&m, "id", "[[0]]", None);
    wait_for("the first job to run", Duration::from_secs(5), || job_file(&m, blocker, "status") == "running\n");
    let jobs: Vec<(i32, u64)> = [(1, 1), (2, 5), (3, 3), (4, 5), (5, 0)]
        .iter()
        .map(|&(k, p)| (k, submit(&m, "id", &format!("[[{k}]]"), Some(p))))
        .collect();
    for &(k, id) in &jobs {
        assert_eq!(output(&m, id).unwrap(), format!("[[{k}]]\n"));
    }
    let mut by_start: Vec<(String, i32)> =
        jobs.iter().map(|&(k, id)| (times(&m, id)["started"].as_str().unwrap().to_string(), k)).collect();
    by_start.sort();
    let order: Vec<i32> = by_start.into_iter().map(|(_, k)| k).collect();
    assert_eq!(order, [2, 4, 3, 1, 5], "priority 5, 5 (FIFO), 3, 1, 0");
    assert_eq!(job_file(&m, jobs[1].1, "device"), "gpu0\n");
}

#[test]
fn aging_runs_a_low_priority_job_under_a_stream_of_high_ones() {
    // 20 ms per run; high-priority jobs arrive faster than that, forever.
    let m = Mount::start_with(&["--simulate-gpu", "1G,20", "--aging-ms", "50"]);
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    configure(&m, "id", r#"{"device": "gpu0", "max_batch": 1}"#);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let feeder = {
        let (mnt, stop) = (m.mnt.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 1000 {
                let id: u64 = read(mnt.join("models/id/v1/clone")).trim().parse().unwrap();
                write_file(&mnt.join(format!("jobs/{id}/priority")), b"10").unwrap();
                write_file(&mnt.join(format!("jobs/{id}/input")), b"[[1]]").unwrap();
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let low = submit(&m, "id", "[[7]]", Some(0));
    assert_eq!(output(&m, low).unwrap(), "[[7]]\n");
    // High-priority jobs were still waiting when the low one finished.
    let queued: usize = device_file(&m, "gpu0", "queue").trim().parse().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let fed = feeder.join().unwrap();
    assert!(queued > 0 && fed < 1000, "queue {queued}, fed {fed}");
    assert!(times(&m, low)["queue_us"].as_u64().unwrap() < 5_000_000);
}

#[test]
fn batched_results_equal_unbatched_ones() {
    // The slow GPU keeps the first request busy while eight more queue up;
    // they then run as one batch. A CPU copy of the model runs them alone.
    let m = Mount::start_with(&["--simulate-gpu", "1G,1500"]);
    import(&m, "batched", &fixture("mlp.onnx"));
    import(&m, "alone", &fixture("mlp.onnx"));
    configure(&m, "batched", r#"{"device": "gpu0", "max_batch": 8, "batch_delay_us": 0}"#);
    configure(&m, "alone", r#"{"device": "cpu", "max_batch": 1}"#);
    let body = |i: usize| {
        let row: Vec<String> = (0..16).map(|j| format!("{}", (i * 16 + j) as f32 * 0.37 - 20.0)).collect();
        format!("[[{}]]", row.join(", "))
    };
    let first = submit(&m, "batched", &body(0), None);
    wait_for("the first job to run", Duration::from_secs(5), || job_file(&m, first, "status") == "running\n");
    let submitters: Vec<_> = (1..=8)
        .map(|i| {
            let (mnt, body) = (m.mnt.clone(), body(i));
            std::thread::spawn(move || {
                let id: u64 = read(mnt.join("models/batched/v1/clone")).trim().parse().unwrap();
                write_file(&mnt.join(format!("jobs/{id}/input")), body.as_bytes()).unwrap();
                id
            })
        })
        .collect();
    let ids: Vec<u64> = submitters.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(job_file(&m, first, "status"), "running\n", "all eight queued while the first ran");
    for (i, id) in ids.iter().enumerate() {
        let batched = output(&m, *id).unwrap();
        let alone =
            String::from_utf8(one_handle(&m.path("models/alone/v1/infer"), body(i + 1).as_bytes()).unwrap()).unwrap();
        assert_eq!(batched, alone, "request {}", i + 1);
        assert_eq!(times(&m, *id)["batch_size"], 8);
    }
    let stats: serde_json::Value = serde_json::from_str(&read(m.path("models/batched/v1/stats"))).unwrap();
    assert_eq!((stats["requests"].as_u64(), stats["batches"].as_u64()), (Some(9), Some(2)));
}

#[test]
fn auto_places_on_a_gpu_with_room_else_the_cpu() {
    let m = Mount::start_with(&["--simulate-gpu", "4K"]);
    import(&m, "small", &fixture("mlp.onnx")); // 1.2 KB: fits
    import(&m, "big", &model_fixture("ocr_cls.onnx")); // 0.6 MB: does not
    assert!(read(m.path("models/small/config.json")).contains("\"device\": \"auto\""));
    let row = format!("[[{}]]", vec!["1"; 16].join(","));
    one_handle(&m.path("models/small/v1/infer"), row.as_bytes()).unwrap();
    assert_eq!(job_file(&m, newest_job(&m), "device"), "gpu0\n");
    let npy = std::fs::read(fixture("cases/ocr_cls/input.npy")).unwrap();
    one_handle(&m.path("models/big/v1/infer"), &npy).unwrap();
    assert_eq!(job_file(&m, newest_job(&m), "device"), "cpu\n");
    assert_eq!(device_file(&m, "gpu0", "models"), "small/v1\n");
    assert_eq!(device_file(&m, "cpu", "models"), "big/v1\n");
    // What loading the 1.2 KB model took, measured.
    let used: u64 = device_file(&m, "gpu0", "memory.used").trim().parse().unwrap();
    assert!(used >= 1208, "{used}");
    assert_eq!(device_file(&m, "gpu0", "memory.total"), "4096\n");
    // A device that is not there: a clear reason, ENODEV.
    configure(&m, "small", r#"{"device": "gpu3"}"#);
    let err = one_handle(&m.path("models/small/v1/infer"), row.as_bytes()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENODEV));
    assert!(job_file(&m, newest_job(&m), "error").contains("device gpu3 is not present (devices: cpu, gpu0)"));
}

#[test]
fn eviction_is_least_recently_used_and_spares_busy_models() {
    // Each model folds into a 128 MB constant when loaded: 300 MB hold two.
    // Two workers let one run while another loads.
    let m = Mount::start_with(&["--simulate-gpu", "300M,400,2"]);
    for (name, file) in [("a", "fold1.onnx"), ("b", "fold2.onnx"), ("c", "fold3.onnx")] {
        import(&m, name, &fixture(file));
        configure(&m, name, r#"{"device": "gpu0", "max_batch": 1}"#);
    }
    let run = |model: &str| one_handle(&m.path(&format!("models/{model}/v1/infer")), b"[1.0]").unwrap();
    run("a");
    run("b");
    assert_eq!(device_file(&m, "gpu0", "models"), "a/v1\nb/v1\n");
    run("a"); // a is now the most recently used
    run("c");
    assert_eq!(device_file(&m, "gpu0", "models"), "a/v1\nc/v1\n", "b, least recently used, made room");
    // While c runs (busy), loading b then a must not evict c.
    let busy = {
        let infer = m.path("models/c/v1/infer");
        std::thread::spawn(move || one_handle(&infer, b"[2.0]").unwrap())
    };
    wait_for("c to run", Duration::from_secs(5), || device_file(&m, "gpu0", "running") == "1\n");
    run("b");
    busy.join().unwrap();
    // b came back and a went: the idle one, not c, which was running then
    // (once idle, c may go too: sizes are measured, so not exactly known).
    let unloaded: Vec<String> = m
        .log_text()
        .lines()
        .filter(|l| l.contains("unloaded to make room"))
        .filter_map(|l| l.split("model=").nth(1)?.split_whitespace().next().map(String::from))
        .collect();
    assert_eq!(unloaded[..2], ["b", "a"], "{}", m.log_text());
}

#[test]
fn idle_models_unload_after_keep_alive() {
    let m = Mount::start();
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    configure(&m, "id", r#"{"keep_alive_s": 1}"#);
    one_handle(&m.path("models/id/v1/infer"), b"[[1]]").unwrap();
    let loaded = Instant::now();
    assert_eq!(device_file(&m, "cpu", "models"), "id/v1\n");
    wait_for("the unload", Duration::from_secs(5), || device_file(&m, "cpu", "models").is_empty());
    assert!(loaded.elapsed() >= Duration::from_millis(900), "unloaded after {:?}", loaded.elapsed());
}

#[test]
fn cancel_timeout_and_backpressure() {
    let m = Mount::start_with(&["--simulate-gpu", "1G,600"]);
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    configure(&m, "id", r#"{"device": "gpu0", "max_batch": 1, "max_queue": 2}"#);
    let running = submit(&m, "id", "[[1]]", None);
    wait_for("the job to run", Duration::from_secs(5), || job_file(&m, running, "status") == "running\n");
    let queued = submit(&m, "id", "[[2]]", None);
    let third = submit(&m, "id", "[[3]]", None);
    // The queue holds 2: the next request is refused with EAGAIN.
    let err = one_handle(&m.path("models/id/v1/infer"), b"[[4]]").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EAGAIN));
    assert!(job_file(&m, newest_job(&m), "error").contains("queue full (2 jobs queued, the model's max_queue)"));
    // A version with queued or running jobs cannot be deleted.
    sh_err(&m.mnt, "rm -r models/id/v1", "Device or resource busy");
    // Cancel a queued and a running job: their readers get ECANCELED.
    for id in [queued, running] {
        write_file(&m.path(&format!("jobs/{id}/ctl")), b"cancel\n").unwrap();
        assert_eq!(output(&m, id), Err(libc::ECANCELED));
        assert_eq!(job_file(&m, id, "status"), "cancelled\n");
    }
    assert_eq!(output(&m, third).unwrap(), "[[3]]\n");

    // A job that outlives timeout_ms fails with ETIMEDOUT.
    configure(&m, "id", r#"{"device": "gpu0", "max_batch": 1, "timeout_ms": 200}"#);
    let slow = submit(&m, "id", "[[5]]", None);
    assert_eq!(output(&m, slow), Err(libc::ETIMEDOUT));
    assert!(job_file(&m, slow, "error").contains("timed out after 200 ms"), "{}", job_file(&m, slow, "error"));
}

#[test]
fn read_outputs_are_dropped_past_the_byte_budget_unread_ones_kept() {
    let m = Mount::start_with(&["--max-finished-bytes", "300"]);
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    // Each job holds about 2 x 100 bytes (input and output).
    let body = format!("[[{}]]", vec!["1"; 48].join(","));
    let infer = m.path("models/id/v1/infer");
    let done = |id: u64| wait_for("the job", Duration::from_secs(10), || job_file(&m, id, "status") == "done\n");
    // Read in full: through one handle, and through jobs/<id>/output.
    assert_eq!(String::from_utf8(one_handle(&infer, body.as_bytes()).unwrap()).unwrap().trim(), body);
    let first = newest_job(&m);
    let second = submit(&m, "id", &body, None);
    assert_eq!(output(&m, second).unwrap().trim(), body);
    // A reader that has had the whole answer, still open...
    let mut reader = std::fs::File::open(m.path(&format!("jobs/{second}/output"))).unwrap();
    let mut whole = vec![0; body.len() + 1];
    std::io::Read::read_exact(&mut reader, &mut whole).unwrap();
    // Not read yet: the shell way's request (its reply is read below) and two clones.
    write_file(&infer, body.as_bytes()).unwrap();
    let shell = newest_job(&m);
    let unread: Vec<u64> = (0..2).map(|_| submit(&m, "id", &body, None)).collect();
    unread.iter().for_each(|&id| done(id));
    // Over the budget, the read outputs went (the jobs stay, done)...
    for id in [first, second] {
        assert_eq!(output(&m, id), Err(libc::ENODATA), "job {id}");
        assert!(job_file(&m, id, "error").contains("no longer kept (past --max-finished-bytes)"));
        assert_eq!(job_file(&m, id, "status"), "done\n");
    }
    // ...yet a reader that had all of it reads on to end-of-file, not ENODATA.
    assert_eq!(std::io::Read::read(&mut reader, &mut [0; 16]).unwrap(), 0);
    // ...and the unread ones stay, however far over it.
    assert_eq!(read(&infer).trim(), body, "the shell way still gets its reply");
    for id in unread {
        assert_eq!(output(&m, id).unwrap().trim(), body, "job {id}");
    }
    assert_eq!(job_file(&m, shell, "status"), "done\n");
}

#[test]
fn retired_jobs_stay_gone_after_a_crash() {
    let mut m = Mount::start_with(&["--max-finished-jobs", "1"]);
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    let first = submit(&m, "id", "[[1]]", None);
    assert_eq!(output(&m, first).unwrap(), "[[1]]\n");
    let second = submit(&m, "id", "[[2]]", None);
    assert_eq!(output(&m, second).unwrap(), "[[2]]\n");
    // Only one finished job is kept: the first is gone, though its journal
    // entry is still on disk.
    assert_eq!(sh_ok(&m.mnt, "ls jobs"), format!("{second}\n"));
    std::thread::sleep(Duration::from_millis(1200)); // the catalog is flushed
    m.kill();
    m.spawn();
    assert_eq!(sh_ok(&m.mnt, "ls jobs"), format!("{second}\n"), "a retired job came back");
    assert_eq!(output(&m, second).unwrap(), "[[2]]\n");
}

#[test]
fn queued_jobs_run_after_the_daemon_is_killed_and_restarted() {
    // 600 ms per job: most of the jobs below are still queued at the kill.
    let mut m = Mount::start_with(&["--simulate-gpu", "1G,600"]);
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    configure(&m, "id", r#"{"device": "gpu0", "max_batch": 1}"#);
    let finished = submit(&m, "id", "[[42]]", None);
    assert_eq!(output(&m, finished).unwrap(), "[[42]]\n");
    let mut ids: Vec<u64> = (0..5).map(|k| submit(&m, "id", &format!("[[{k}]]"), None)).collect();
    // An input over 16 MiB is not journaled: its job fails after the crash.
    let big = read(m.path("models/id/v1/clone")).trim().parse::<u64>().unwrap();
    write_file(&m.path(&format!("jobs/{big}/input")), &npy_int32(&vec![7; 4_300_000])).unwrap();
    ids.push(submit(&m, "id", "[[5]]", None));
    std::thread::sleep(Duration::from_millis(1200));
    m.kill();
    // Cut the last entry short, as a daemon killed inside its write(2)
    // would: that job's close() never returned, so it was never accepted.
    let torn = ids.pop().unwrap();
    let journal = m.data.join("jobs/journal-1");
    let len = std::fs::metadata(&journal).unwrap().len();
    assert!(len < 1 << 20, "the large input is not in the journal ({len} bytes)");
    std::fs::OpenOptions::new().write(true).open(&journal).unwrap().set_len(len - 2).unwrap();
    m.spawn();
    assert!(m.log_text().contains("queued again"), "{}", m.log_text());
    for (k, &id) in ids.iter().enumerate() {
        assert_eq!(output(&m, id).unwrap(), format!("[[{k}]]\n"), "job {id}");
    }
    assert_eq!(errno(std::fs::read(m.path(&format!("jobs/{torn}/status")))), libc::ENOENT);
    // A job that had finished keeps its (small) output across the restart.
    assert_eq!(output(&m, finished).unwrap(), "[[42]]\n");
    assert_eq!(job_file(&m, finished, "status"), "done\n");
    assert_eq!(output(&m, big), Err(libc::EIO));
    assert!(job_file(&m, big, "error").contains("the daemon restarted and its input was lost"));
    // New ids never repeat old ones.
    assert!(submit(&m, "id", "[[9]]", None) > torn);

    // Killed right after a job ended, its record perhaps not yet written:
    // the job is not lost (it is recorded, or it runs again).
    let last = submit(&m, "id", "[[7]]", None);
    assert_eq!(output(&m, last).unwrap(), "[[7]]\n");
    m.kill();
    m.spawn();
    assert_eq!(output(&m, last).unwrap(), "[[7]]\n");
    assert_eq!(job_file(&m, last, "status"), "done\n");
}

#[test]
fn config_json_is_validated_and_kept() {
    let mut m = Mount::start();
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    let config: serde_json::Value = serde_json::from_str(&read(m.path("models/id/config.json"))).unwrap();
    assert_eq!(
        config,
        serde_json::json!({"device": "auto", "max_batch": 8, "batch_delay_us": 500, "instances": 0,
            "keep_alive_s": 300, "priority": 0, "timeout_ms": 30000, "max_queue": 1024,
            "max_tokens": 256})
    );
    for bad in [r#"{"device": "tpu"}"#, r#"{"max_batch": 0}"#, r#"{"colour": "red"}"#, "{"] {
        assert_eq!(write_file(&m.path("models/id/config.json"), bad.as_bytes()), Err(libc::EINVAL), "{bad}");
    }
    assert!(m.log_text().contains("config.json: unknown key \"colour\""), "{}", m.log_text());
    configure(&m, "id", r#"{"priority": 3, "max_queue": 5}"#);
    let id = read(m.path("models/id/v1/clone")).trim().to_string();
    assert_eq!(read(m.path(&format!("jobs/{id}/priority"))), "3\n", "the model's default priority");
    assert!(m.stop().success());
    m.spawn();
    let config: serde_json::Value = serde_json::from_str(&read(m.path("models/id/config.json"))).unwrap();
    assert_eq!((config["priority"].as_i64(), config["max_queue"].as_i64()), (Some(3), Some(5)));
}

#[test]
fn cpu_util_rises_under_load_and_falls_back() {
    let m = Mount::start();
    import(&m, "det", &model_fixture("ocr_det.onnx"));
    let npy = std::fs::read(fixture("cases/ocr_det/input.npy")).unwrap();
    let util = || device_file(&m, "cpu", "util").trim().parse::<u32>().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (infer, npy, stop) = (m.path("models/det/v1/infer"), npy.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    one_handle(&infer, &npy).unwrap();
                }
            })
        })
        .collect();
    let mut peak = 0;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8) && peak <= 80 {
        std::thread::sleep(Duration::from_millis(250));
        peak = peak.max(util());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(peak > 80, "util peaked at {peak}");
    wait_for("util to fall back", Duration::from_secs(8), || util() < 50);
}

#[test]
fn metrics_parse_as_prometheus_and_count_requests() {
    let m = Mount::start();
    import(&m, "id", &model_fixture("identity_int32.onnx"));
    for k in 0..5 {
        one_handle(&m.path("models/id/v1/infer"), format!("[[{k}]]").as_bytes()).unwrap();
    }
    for _ in 0..2 {
        one_handle(&m.path("models/id/v1/infer"), b"[[1.5]]").unwrap_err();
    }
    let text = m.dir.path().join("metrics.txt");
    std::fs::write(&text, read(m.path("metrics"))).unwrap();
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
values = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        if s.labels.get("model") == "id" or s.labels.get("device") == "cpu":
            values[s.name] = s.value
print(values["aifs_requests_total"], values["aifs_request_failures_total"],
      values["aifs_compute_seconds_count"], values["aifs_queue_depth"])
"#;
    let out =
        std::process::Command::new(repo().join(".venv/bin/python")).args(["-c", script]).arg(&text).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let values: Vec<f64> =
        String::from_utf8_lossy(&out.stdout).split_whitespace().map(|v| v.parse().unwrap()).collect();
    assert_eq!(values, [7.0, 2.0, 5.0, 0.0], "requests, failures, runs timed, queue depth");
    let stats: serde_json::Value = serde_json::from_str(&read(m.path("models/id/v1/stats"))).unwrap();
    assert_eq!((stats["requests"].as_u64(), stats["failures"].as_u64()), (Some(7), Some(2)));
    assert!(stats["compute_us"]["p50"].is_u64() && stats["queue_us"]["p99"].is_u64());
    let status: serde_json::Value = serde_json::from_str(&read(m.path("status"))).unwrap();
    assert_eq!(status["devices"][0]["models"], serde_json::json!(["id/v1"]));
}

#[test]
fn a_real_gpu_shows_up_with_nvml_memory() {
    let gpus = aifs::device::Nvidia::discover();
    if gpus.is_empty() {
        eprintln!("skipped: no NVIDIA GPU on this machine");
        return;
    }
    let m = Mount::start();
    assert!(Path::new(&m.path("devices/gpu0")).is_dir());
    let used: u64 = device_file(&m, "gpu0", "memory.used").trim().parse().unwrap();
    let nvml = nvml_wrapper::Nvml::init().unwrap();
    let reference = nvml.device_by_index(0).unwrap().memory_info().unwrap().used;
    let tolerance = 64 << 20; // other processes may allocate in between
    assert!(used.abs_diff(reference) < tolerance, "{used} vs NVML {reference}");
}

/// A model's size in memory is what loading it took, not its file's: two
/// 188-byte graphs that each fold into a 128 MB constant do not fit a
/// 200 MB device together, and the first is unloaded once the second's
/// size is known.
#[test]
fn eviction_counts_what_a_load_took_not_the_file() {
    let m = Mount::start_with(&["--simulate-gpu", "200M"]);
    for (model, file) in [("f1", "fold1.onnx"), ("f2", "fold2.onnx")] {
        import(&m, model, &fixture(file));
        configure(&m, model, r#"{"device": "gpu0"}"#);
    }
    let run = |model: &str, want: &str| {
        let infer = m.path(&format!("models/{model}/v1/infer"));
        assert_eq!(String::from_utf8(one_handle(&infer, b"[1.0]").unwrap()).unwrap(), want);
    };
    run("f1", "[33554432.0]\n");
    run("f2", "[67108864.0]\n");
    run("f2", "[67108864.0]\n");
    assert_eq!(device_file(&m, "gpu0", "models"), "f2/v1\n");
    let used: u64 = device_file(&m, "gpu0", "memory.used").trim().parse().unwrap();
    assert!(used > 64 << 20, "memory.used {used}: the measured size, not the file's");
    assert!(m.log_text().contains("unloaded to make room"), "{}", m.log_text());
}
