//! The in-process floors for the generation benchmarks, on a GGUF, greedy,
//! from the prompt token ids of the llama.cpp reference file (no mount, no
//! daemon, no tokenizer, no template):
//!
//! - `aifs`: the daemon's own forward pass (`aifs::backend::gguf::llama`)
//!   called directly: what the mount adds is the difference;
//! - `candle`: candle-transformers' `quantized_llama`, the stock candle
//!   model, for comparison.
//!
//! Like the daemon, it stops at `TOKENS` tokens or at the end of the turn
//! (`end_of_turn_ids`), whose step counts in the rate. Prints one JSON line
//! per prompt: time to first token, tokens per second after it, and
//! whether the ids equal llama.cpp's. With `--serve` it
//! loads the model once and then runs the prompt whose index each line of
//! its input names, printing its line at once: `scripts/bench_generate.py`
//! runs it request by request in turn with the mount.
//!
//!     cargo run --release --example generate_floor -- aifs|candle GGUF tests/fixtures/smollm2_llamacpp.json [TOKENS] [--serve]

use std::time::Instant;

use aifs::backend::gguf::llama;
use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

/// One way to run the model: the next token after `ids`, which follow the
/// `pos` positions it has already seen.
trait Floor {
    fn next(&mut self, ids: &[u32], pos: usize) -> u32;
}

struct Aifs<'a>(&'a llama::Weights, llama::Cache);

impl Floor for Aifs<'_> {
    fn next(&mut self, ids: &[u32], _pos: usize) -> u32 {
        llama::argmax(&self.0.forward(ids, &mut self.1).unwrap()).unwrap()
    }
}

struct Candle(ModelWeights);

impl Floor for Candle {
    fn next(&mut self, ids: &[u32], pos: usize) -> u32 {
        let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        llama::argmax(&self.0.forward(&x, pos).unwrap().squeeze(0).unwrap()).unwrap()
    }
}

fn main() {
    // As the daemon does (its threads are candle's, counted once).
    aifs::backend::settle_thread_count();
    let mut args: Vec<String> = std::env::args().collect();
    let serve = args.last().is_some_and(|a| a == "--serve");
    if serve {
        args.pop();
    }
    let (way, gguf, reference) = match &args[..] {
        [_, w, g, r] | [_, w, g, r, _] if w == "aifs" || w == "candle" => (w, g, r),
        _ => {
            eprintln!("usage: generate_floor aifs|candle GGUF REFERENCE.json [TOKENS] [--serve]");
            std::process::exit(2);
        }
    };
    let tokens: usize = args.get(4).map_or(32, |t| t.parse().expect("TOKENS is a number"));
    let mut file = std::fs::File::open(gguf).expect("the GGUF opens");
    let content = gguf_file::Content::read(&mut file).expect("a GGUF");
    let ends = aifs::backend::gguf::end_of_turn_ids(&content);
    let (ours, stock) = if way == "aifs" {
        (Some(llama::Weights::load(&content, &mut file, 4096).expect("the model loads")), None)
    } else {
        (None, Some(ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("the model loads")))
    };
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(reference).expect("the reference reads")).expect("JSON");
    let run = |case: &serde_json::Value| {
        let prompt: Vec<u32> =
            case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mut floor: Box<dyn Floor> = match (&ours, &stock) {
            (Some(w), _) => Box::new(Aifs(w, w.cache(prompt.len() + tokens))),
            (_, Some(m)) => Box::new(Candle(m.clone())),
            _ => unreachable!(),
        };
        // As the daemon: up to `tokens` tokens, or to the end of the turn,
        // whose step is timed and counted in the rate but is not a token.
        let start = Instant::now();
        let mut ids = vec![floor.next(&prompt, 0)];
        let first = start.elapsed();
        while !ends.contains(&ids[ids.len() - 1]) && ids.len() < tokens {
            let pos = prompt.len() + ids.len() - 1;
            let id = floor.next(&ids[ids.len() - 1..], pos);
            ids.push(id);
        }
        let rest = start.elapsed() - first;
        let steps = ids.len();
        if ends.contains(&ids[ids.len() - 1]) {
            ids.pop();
        }
        let n = want.len().min(ids.len());
        println!(
            "{}",
            serde_json::json!({
                "prompt": case["prompt"],
                "ttft_ms": first.as_secs_f64() * 1e3,
                "tokens_per_s": (steps - 1) as f64 / rest.as_secs_f64(),
                "equal": ids[..n] == want[..n],
                "first_diff": (0..n).find(|&i| ids[i] != want[i]),
                "ids": ids,
            })
        );
    };
    if !serve {
        cases.iter().for_each(run);
        return;
    }
    for line in std::io::stdin().lines() {
        let line = line.expect("the input reads");
        run(&cases[line.trim().parse::<usize>().expect("a prompt's index")]);
    }
}
