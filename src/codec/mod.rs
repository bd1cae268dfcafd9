//! Request and response codecs. The input's first bytes pick the codec; the
//! output is written with the same one.
//!
//! | first bytes        | codec        | inputs            | output                              |
//! |--------------------|--------------|-------------------|-------------------------------------|
//! | `[`                | JSON array   | the only input    | the only output (several: object)   |
//! | `{` (no `inputs`)  | JSON object  | by name           | object by name                      |
//! | `{"inputs": [...]` | KServe v2    | by name, typed    | KServe v2 response                  |
//! | `\x93NUMPY`        | .npy         | the only input    | .npy of the only (or first) output  |
//! | `PK\x03\x04`, `PK\x05\x06` (empty) | .npz | by name    | .npz by name                        |
//! | UTF-8 text (text models) | text | one string per line | JSON array, one row per line  |
//!
//! A text model is one whose only input is a string tensor (an embedding
//! model's `text`). For it, a request that is not JSON (or does not parse
//! as JSON) is UTF-8 text, one input per line; JSON requests carry strings
//! (`["a", "b"]`, `{"text": [...]}`, KServe `BYTES`).
//! JSON carries no element type, so JSON numbers are converted to the
//! dtype the model declares (a float where an integer is required, or a
//! value out of the dtype's range, is an error). KServe, .npy and .npz carry
//! their dtype, and it must be the model's. Decoding only builds tensors;
//! [`crate::tensor::Signature::check`] then checks them against the model.

//!
//! One file per format: `json.rs` (nested arrays, objects by name),
//! `kserve.rs` (KServe v2 / Triton JSON), `numpy.rs` (.npy, .npz); and
//! `prompt.rs`, requests to language models and their streamed answers.

mod json;
mod kserve;
mod numpy;
pub mod prompt;
#[cfg(test)]
mod tests;

pub use numpy::declared_len;

use std::io::Cursor;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tensor::{DType, Data, Signature, Tensor};

use json::{flat_values, json_tensor, json_value};
use kserve::{kserve_datatype, kserve_request};
use numpy::{npy_tensor, npz_tensors, write_npy};
// Tensors are read from and written to little-endian bytes by bulk copies.
#[cfg(not(target_endian = "little"))]
compile_error!("aifs's .npy codec assumes a little-endian machine");

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    JsonArray,
    JsonObject,
    KServe,
    Npy,
    Npz,
    Text,
}

/// A decoded request: the tensors, and what the response needs to know.
#[derive(Debug)]
pub struct Request {
    pub codec: Codec,
    pub inputs: Vec<Tensor>,
    /// KServe's request `id`, echoed in the response.
    pub id: Option<Value>,
    /// KServe's requested `outputs`, if it named any.
    pub outputs: Option<Vec<String>>,
    /// A language model's request ([`prompt`]): then no `inputs`.
    pub prompt: Option<prompt::Prompt>,
}

/// A request that does not fit: its reason on one short line (names in it
/// come from the request, so it is clipped).
fn bad(msg: impl Into<String>) -> Error {
    Error::BadInput(crate::error::one_line(&msg.into()))
}

/// Decodes a request for a model with signature `sig`. `limit` bounds the
/// bytes of decoded data (a compressed .npz can hold far more than it
/// weighs). Never panics and never allocates from an unchecked shape.
pub fn decode(bytes: &[u8], sig: &Signature, limit: u64) -> Result<Request> {
    let request = |codec, inputs| Request { codec, inputs, id: None, outputs: None, prompt: None };
    // An .npz with no arrays (for a model that takes no inputs) is a zip
    // of nothing: its end-of-directory record alone.
    let npz = bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06");
    if bytes.starts_with(b"\x93NUMPY") || npz {
        // The npy header parser is not ours: a hostile header must not take
        // the daemon down.
        let numpy = std::panic::catch_unwind(|| {
            let mut budget = limit;
            if bytes.starts_with(b"PK") {
                Ok(request(Codec::Npz, npz_tensors(bytes, sig, &mut budget)?))
            } else {
                let only = only_input(sig, ".npy")?;
                Ok(request(Codec::Npy, vec![npy_tensor(only, bytes, &mut budget)?]))
            }
        });
        return numpy.unwrap_or_else(|_| Err(bad("malformed .npy/.npz header")));
    }
    let text = match sig.inputs.as_slice() {
        [only] if only.dtype == DType::String => Some(only.name.as_str()),
        _ => None,
    };
    match (bytes.iter().find(|b| !b.is_ascii_whitespace()), text) {
        (Some(b'[') | Some(b'{'), _) => {}
        (None, _) => return Err(bad("empty request")),
        (Some(_), Some(name)) => return Ok(request(Codec::Text, vec![text_lines(name, bytes)?])),
        (Some(_), None) => return Err(bad("unrecognized input: expected JSON, .npy or .npz")),
    }
    let value: Value = match (serde_json::from_slice(bytes), text) {
        (Ok(value), _) => value,
        // "[citation needed]" is a sentence, not broken JSON.
        (Err(_), Some(name)) => return Ok(request(Codec::Text, vec![text_lines(name, bytes)?])),
        (Err(e), None) => return Err(bad(format!("malformed JSON: {e}"))),
    };
    match value {
        Value::Array(_) => {
            let only = only_input(sig, "a JSON array")?;
            let dtype = sig.input(only).map(|s| s.dtype).expect("only_input found it");
            Ok(request(Codec::JsonArray, vec![json_tensor(only, &value, dtype)?]))
        }
        Value::Object(map) if map.get("inputs").is_some_and(Value::is_array) => kserve_request(map),
        Value::Object(map) => {
            let inputs = map
                .iter()
                .map(|(name, v)| {
                    let spec = sig.input(name).ok_or_else(|| unknown_input(sig, name))?;
                    json_tensor(name, v, spec.dtype)
                })
                .collect::<Result<_>>()?;
            Ok(request(Codec::JsonObject, inputs))
        }
        _ => unreachable!("first byte was [ or {{"),
    }
}

/// A text request: UTF-8, one input per line (`\n` or `\r\n`; the last
/// line's newline is optional). Blank lines are inputs too, so answers
/// line up with lines.
fn text_lines(name: &str, bytes: &[u8]) -> Result<Tensor> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        bad(format!("a text request must be UTF-8: invalid byte at offset {} (or send JSON)", e.valid_up_to()))
    })?;
    let lines: Vec<String> = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l).to_string())
        .collect();
    Tensor::new(name, vec![lines.len()], Data::String(lines))
}

fn only_input<'a>(sig: &'a Signature, what: &str) -> Result<&'a str> {
    match sig.inputs.as_slice() {
        [only] => Ok(&only.name),
        inputs => Err(bad(format!(
            "{what} is the model's only input, but it has {} ({}); send inputs by name (a JSON object or .npz)",
            inputs.len(),
            inputs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
        ))),
    }
}

fn unknown_input(sig: &Signature, name: &str) -> Error {
    let names: Vec<&str> = sig.inputs.iter().map(|s| s.name.as_str()).collect();
    bad(format!("unknown input {name:?} (the model's inputs: {})", names.join(", ")))
}

// ---- responses ----------------------------------------------------------------

/// Encodes the outputs in the request's codec.
pub fn encode(request: &Request, mut outputs: Vec<Tensor>, model: &str, version: u32) -> Result<Vec<u8>> {
    let by_name = |outputs: &[Tensor]| -> Value {
        Value::Object(outputs.iter().map(|t| (t.name.clone(), json_value(t))).collect())
    };
    let json = match request.codec {
        // One row per line, as the request had one input per line: still
        // one JSON document.
        Codec::Text if outputs.len() == 1 && !outputs[0].shape.is_empty() => {
            let Value::Array(rows) = json_value(&outputs[0]) else { unreachable!("a tensor of rank >= 1") };
            let lines: Vec<String> =
                rows.iter().map(|row| serde_json::to_string(row).expect("JSON values serialize")).collect();
            return Ok(format!("[{}]\n", lines.join(",\n")).into_bytes());
        }
        Codec::JsonArray | Codec::Text if outputs.len() == 1 => json_value(&outputs[0]),
        Codec::JsonArray | Codec::JsonObject | Codec::Text => by_name(&outputs),
        Codec::KServe => {
            if let Some(wanted) = &request.outputs {
                outputs.retain(|t| wanted.contains(&t.name));
            }
            let mut response = serde_json::json!({
                "model_name": model,
                "model_version": version.to_string(),
                "outputs": outputs.iter().map(|t| serde_json::json!({
                    "name": t.name,
                    "datatype": kserve_datatype(t.dtype()),
                    "shape": t.shape,
                    "data": flat_values(&t.data),
                })).collect::<Vec<_>>(),
            });
            if let Some(id) = &request.id {
                response["id"] = id.clone();
            }
            response
        }
        Codec::Npy => {
            let first = outputs.first().ok_or_else(|| Error::Internal("the model returned no outputs".into()))?;
            // The header is at most a few hundred bytes.
            let mut out = Vec::with_capacity(first.data.byte_len() + 512);
            write_npy(first, &mut out).map_err(|e| Error::io("encoding .npy", e))?;
            return Ok(out);
        }
        Codec::Npz => {
            let mut npz = zip::ZipWriter::new(Cursor::new(Vec::new()));
            let options = zip::write::FileOptions::default().compression_method(zip::CompressionMethod::Stored);
            for t in &outputs {
                let entry = npyz::npz::file_name_from_array_name(&t.name);
                npz.start_file(entry, options).map_err(|e| Error::io("encoding .npz", e.into()))?;
                write_npy(t, &mut npz).map_err(|e| Error::io("encoding .npz", e))?;
            }
            let cursor = npz.finish().map_err(|e| Error::io("encoding .npz", e.into()))?;
            return Ok(cursor.into_inner());
        }
    };
    let mut text = serde_json::to_vec(&json).expect("JSON values serialize");
    text.push(b'\n');
    Ok(text)
}
