//! The in-process floor for the generation benchmarks: candle's quantized
//! llama called directly (no mount, no daemon, no tokenizer, no template)
//! on a GGUF, greedy, from the prompt token ids of the llama.cpp reference
//! file. Prints one JSON line per prompt: time to first token, tokens per
//! second after it, and whether the ids equal llama.cpp's. With
//! `AIFS_REPACK=1`, Q4_1/Q5_0/Q5_1 weights are first converted to Q8_0 by
//! the daemon's own code (`aifs::backend::repack_gguf`): the floor then runs
//! the same weights as the daemon.
//!
//!     cargo run --release --example generate_floor -- GGUF tests/fixtures/smollm2_llamacpp.json [TOKENS]

use std::time::Instant;

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (gguf, reference) = match &args[..] {
        [_, g, r] | [_, g, r, _] => (g, r),
        _ => {
            eprintln!("usage: generate_floor GGUF REFERENCE.json [TOKENS]");
            std::process::exit(2);
        }
    };
    let tokens: usize = args.get(3).map_or(32, |t| t.parse().expect("TOKENS is a number"));
    let mut file = std::fs::File::open(gguf).expect("the GGUF opens");
    let content = gguf_file::Content::read(&mut file).expect("a GGUF");
    let weights = if std::env::var_os("AIFS_REPACK").is_some() {
        let (repacked, mut bytes) = aifs::backend::repack_gguf(content, &mut file).expect("the model repacks");
        ModelWeights::from_gguf(repacked, &mut bytes, &Device::Cpu).expect("the model loads")
    } else {
        ModelWeights::from_gguf(content, &mut file, &Device::Cpu).expect("the model loads")
    };
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(reference).expect("the reference reads")).expect("JSON");
    for case in cases {
        let prompt: Vec<u32> =
            case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let mut model = weights.clone();
        let start = Instant::now();
        let next = |model: &mut ModelWeights, ids: &[u32], pos: usize| -> u32 {
            let x = Tensor::new(ids, &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let logits = model.forward(&x, pos).unwrap().squeeze(0).unwrap();
            logits.argmax(0).unwrap().to_scalar::<u32>().unwrap()
        };
        let mut ids = vec![next(&mut model, &prompt, 0)];
        let first = start.elapsed();
        while ids.len() < tokens {
            let pos = prompt.len() + ids.len() - 1;
            let id = next(&mut model, &ids[ids.len() - 1..], pos);
            ids.push(id);
        }
        let rest = start.elapsed() - first;
        let n = want.len().min(ids.len());
        println!(
            "{}",
            serde_json::json!({
                "prompt": case["prompt"],
                "ttft_ms": first.as_secs_f64() * 1e3,
                "tokens_per_s": (ids.len() - 1) as f64 / rest.as_secs_f64(),
                "equal": ids[..n] == want[..n],
                "first_diff": (0..n).find(|&i| ids[i] != want[i]),
                "ids": ids,
            })
        );
    }
}
