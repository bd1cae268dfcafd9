//! The in-process floor for the embedding benchmarks: aifs's own candle
//! backend, called directly (no mount, no daemon, no codec), on a
//! sentence-transformers model directory. Prints one JSON line:
//! sentences per second one sentence per call, and 32 per call, and the
//! resident memory the loaded model added.
//!
//!     cargo run --release --example embed_floor -- MODEL_DIR SENTENCE SECONDS

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aifs::backend::{Backend, Candle, Stop};
use aifs::device::Target;
use aifs::tensor::{Data, Tensor};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, sentence, seconds] = &args[..] else {
        eprintln!("usage: embed_floor MODEL_DIR SENTENCE SECONDS");
        std::process::exit(2);
    };
    let seconds = Duration::from_secs_f64(seconds.parse().expect("SECONDS is a number"));
    let mut files = BTreeMap::new();
    walk(Path::new(dir), Path::new(""), &mut files);
    let before = rss_kb();
    let mut model = Candle.load(&files, Target::Cpu).expect("the model loads");
    let texts = |n: usize| vec![Tensor::new("text", vec![n], Data::String(vec![sentence.clone(); n])).unwrap()];
    model.run(texts(1), &Stop::default()).expect("a first run"); // buffers allocated
    let loaded_kb = rss_kb() - before;
    let mut rate = |n: usize| {
        let (start, mut done) = (Instant::now(), 0);
        while start.elapsed() < seconds {
            model.run(texts(n), &Stop::default()).unwrap();
            done += n;
        }
        done as f64 / start.elapsed().as_secs_f64()
    };
    let (one, batch32) = (rate(1), rate(32));
    println!("{}", serde_json::json!({ "one": one, "batch32": batch32, "loaded_kb": loaded_kb }));
}

/// The directory's files by path relative to it, as a version holds them.
fn walk(root: &Path, rel: &Path, files: &mut BTreeMap<String, PathBuf>) {
    for entry in std::fs::read_dir(root.join(rel)).unwrap() {
        let entry = entry.unwrap();
        let rel = rel.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            walk(root, &rel, files);
        } else {
            files.insert(rel.to_string_lossy().into_owned(), root.join(&rel));
        }
    }
}

fn rss_kb() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}
