//! Request and response codecs. The input's first bytes pick the codec; the
//! output is written with the same one.
//!
//! | first bytes        | codec        | inputs            | output                              |
//! |--------------------|--------------|-------------------|-------------------------------------|
//! | `[`                | JSON array   | the only input    | the only output (several: object)   |
//! | `{` (no `inputs`)  | JSON object  | by name           | object by name                      |
//! | `{"inputs": [...]` | KServe v2    | by name, typed    | KServe v2 response                  |
//! | `\x93NUMPY`        | .npy         | the only input    | .npy of the only (or first) output  |
//! | `PK\x03\x04`       | .npz         | by name           | .npz by name                        |
//!
//! JSON carries no element type, so JSON numbers are converted to the
//! dtype the model declares (a float where an integer is required, or a
//! value out of the dtype's range, is an error). KServe, .npy and .npz carry
//! their dtype, and it must be the model's. Decoding only builds tensors;
//! [`crate::tensor::Signature::check`] then checks them against the model.

use std::io::Cursor;

// Tensors are read from and written to little-endian bytes by bulk copies.
#[cfg(not(target_endian = "little"))]
compile_error!("aifs's .npy codec assumes a little-endian machine");

use half::f16;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::tensor::{DType, Data, Signature, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    JsonArray,
    JsonObject,
    KServe,
    Npy,
    Npz,
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
}

fn bad(msg: impl Into<String>) -> Error {
    Error::BadInput(msg.into())
}

/// Decodes a request for a model with signature `sig`. `limit` bounds the
/// bytes of decoded data (a compressed .npz can hold far more than it
/// weighs). Never panics and never allocates from an unchecked shape.
pub fn decode(bytes: &[u8], sig: &Signature, limit: u64) -> Result<Request> {
    let request = |codec, inputs| Request { codec, inputs, id: None, outputs: None };
    if bytes.starts_with(b"\x93NUMPY") || bytes.starts_with(b"PK\x03\x04") {
        // The npy header parser is not ours: a hostile header must not take
        // the daemon down.
        let numpy = std::panic::catch_unwind(|| {
            let mut budget = limit;
            if bytes.starts_with(b"PK") {
                Ok(request(Codec::Npz, npz_tensors(bytes, &mut budget)?))
            } else {
                let only = only_input(sig, ".npy")?;
                Ok(request(Codec::Npy, vec![npy_tensor(only, bytes, &mut budget)?]))
            }
        });
        return numpy.unwrap_or_else(|_| Err(bad("malformed .npy/.npz header")));
    }
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') | Some(b'{') => {}
        None => return Err(bad("empty request")),
        Some(_) => return Err(bad("unrecognized input: expected JSON, .npy or .npz")),
    }
    let value: Value = serde_json::from_slice(bytes).map_err(|e| bad(format!("malformed JSON: {e}")))?;
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

// ---- JSON ------------------------------------------------------------------

/// A nested JSON array (or a scalar, for a 0-d input) as a tensor of `dtype`.
fn json_tensor(name: &str, value: &Value, dtype: DType) -> Result<Tensor> {
    let mut shape = Vec::new();
    let mut v = value;
    while let Value::Array(items) = v {
        shape.push(items.len());
        match items.first() {
            Some(first) => v = first,
            None => break,
        }
    }
    let mut leaves = Vec::new();
    flatten(name, value, &shape, &mut leaves)?;
    Tensor::new(name, shape, json_data(name, &leaves, dtype)?)
}

fn flatten<'v>(name: &str, v: &'v Value, shape: &[usize], out: &mut Vec<&'v Value>) -> Result<()> {
    match (v, shape.split_first()) {
        (Value::Array(items), Some((&len, rest))) if items.len() == len => {
            items.iter().try_for_each(|item| flatten(name, item, rest, out))
        }
        (Value::Array(_), _) | (_, Some(_)) => {
            Err(bad(format!("input {name:?}: ragged array (not a rectangular shape)")))
        }
        (leaf, None) => {
            out.push(leaf);
            Ok(())
        }
    }
}

fn json_data(name: &str, leaves: &[&Value], dtype: DType) -> Result<Data> {
    macro_rules! ints {
        ($variant:ident, $t:ty) => {
            Data::$variant(
                leaves
                    .iter()
                    .map(|v| {
                        let n = match (v.as_i64(), v.as_u64()) {
                            (Some(i), _) => <$t>::try_from(i).ok(),
                            (None, Some(u)) => <$t>::try_from(u).ok(),
                            _ if v.is_number() => {
                                return Err(bad(format!(
                                    "input {name:?}: a float ({v}) where an integer ({dtype}) is required"
                                )))
                            }
                            _ => return Err(bad(format!("input {name:?}: expected a number ({dtype}), got {v}"))),
                        };
                        n.ok_or_else(|| bad(format!("input {name:?}: {v} is out of range for {dtype}")))
                    })
                    .collect::<Result<_>>()?,
            )
        };
    }
    let float =
        |v: &Value| v.as_f64().ok_or_else(|| bad(format!("input {name:?}: expected a number ({dtype}), got {v}")));
    Ok(match dtype {
        DType::Bool => Data::Bool(
            leaves
                .iter()
                .map(|v| v.as_bool().ok_or_else(|| bad(format!("input {name:?}: expected true or false, got {v}"))))
                .collect::<Result<_>>()?,
        ),
        DType::Uint8 => ints!(Uint8, u8),
        DType::Int8 => ints!(Int8, i8),
        DType::Uint16 => ints!(Uint16, u16),
        DType::Int16 => ints!(Int16, i16),
        DType::Uint32 => ints!(Uint32, u32),
        DType::Int32 => ints!(Int32, i32),
        DType::Uint64 => ints!(Uint64, u64),
        DType::Int64 => ints!(Int64, i64),
        DType::Float16 => Data::Float16(leaves.iter().map(|v| float(v).map(f16::from_f64)).collect::<Result<_>>()?),
        DType::Float32 => Data::Float32(leaves.iter().map(|v| float(v).map(|f| f as f32)).collect::<Result<_>>()?),
        DType::Float64 => Data::Float64(leaves.iter().map(|v| float(v)).collect::<Result<_>>()?),
        DType::Bfloat16 | DType::String | DType::Other => {
            return Err(bad(format!("input {name:?}: dtype {dtype} is not supported")))
        }
    })
}

/// A tensor as a nested JSON array (a number for 0-d).
fn json_value(t: &Tensor) -> Value {
    fn nest(shape: &[usize], flat: &mut impl Iterator<Item = Value>) -> Value {
        match shape.split_first() {
            None => flat.next().unwrap_or(Value::Null),
            Some((&n, rest)) => Value::Array((0..n).map(|_| nest(rest, flat)).collect()),
        }
    }
    nest(&t.shape, &mut flat_values(&t.data).into_iter())
}

fn flat_values(data: &Data) -> Vec<Value> {
    match data {
        Data::Bool(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Float16(v) => v.iter().map(|&x| Value::from(f32::from(x))).collect(),
        Data::Float32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Float64(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Uint8(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Int8(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Uint16(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Int16(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Uint32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Int32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Uint64(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Int64(v) => v.iter().map(|&x| Value::from(x)).collect(),
    }
}

// ---- KServe v2 ---------------------------------------------------------------

/// KServe v2 datatypes and the element types they decode to, both ways.
const KSERVE_DATATYPES: [(&str, DType); 12] = [
    ("BOOL", DType::Bool),
    ("UINT8", DType::Uint8),
    ("UINT16", DType::Uint16),
    ("UINT32", DType::Uint32),
    ("UINT64", DType::Uint64),
    ("INT8", DType::Int8),
    ("INT16", DType::Int16),
    ("INT32", DType::Int32),
    ("INT64", DType::Int64),
    ("FP16", DType::Float16),
    ("FP32", DType::Float32),
    ("FP64", DType::Float64),
];

fn kserve_dtype(datatype: &str) -> Option<DType> {
    KSERVE_DATATYPES.iter().find(|(name, _)| *name == datatype).map(|(_, dtype)| *dtype)
}

/// Outputs are always one of the table's types (they come from [`Data`]).
fn kserve_datatype(dtype: DType) -> &'static str {
    KSERVE_DATATYPES.iter().find(|(_, d)| *d == dtype).map_or("UNKNOWN", |(name, _)| name)
}

fn kserve_request(mut map: Map<String, Value>) -> Result<Request> {
    let Some(Value::Array(items)) = map.remove("inputs") else { unreachable!("checked by the caller") };
    let inputs = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |key: &str| item.get(key).ok_or_else(|| bad(format!("KServe inputs[{i}]: missing {key:?}")));
            let name =
                field("name")?.as_str().ok_or_else(|| bad(format!("KServe inputs[{i}]: name is not a string")))?;
            let datatype = field("datatype")?.as_str().unwrap_or_default();
            let dtype = kserve_dtype(datatype)
                .ok_or_else(|| bad(format!("input {name:?}: unsupported KServe datatype {datatype:?}")))?;
            let shape: Vec<usize> = field("shape")?
                .as_array()
                .and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
                .ok_or_else(|| bad(format!("input {name:?}: shape must be a list of non-negative integers")))?;
            let data = field("data")?;
            let mut leaves = Vec::new();
            flatten_any(data, &mut leaves);
            let data = json_data(name, &leaves, dtype)?;
            Tensor::new(name, shape, data)
        })
        .collect::<Result<_>>()?;
    let outputs = map
        .get("outputs")
        .and_then(Value::as_array)
        .map(|outs| outs.iter().filter_map(|o| o.get("name").and_then(Value::as_str).map(String::from)).collect());
    Ok(Request { codec: Codec::KServe, inputs, id: map.remove("id"), outputs })
}

/// KServe allows `data` flat or nested; both flatten row-major.
fn flatten_any<'v>(v: &'v Value, out: &mut Vec<&'v Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|item| flatten_any(item, out)),
        leaf => out.push(leaf),
    }
}

// ---- NumPy -----------------------------------------------------------------

fn npy_tensor(name: &str, bytes: &[u8], budget: &mut u64) -> Result<Tensor> {
    if let Some(t) = numpy_header(bytes).and_then(|layout| npy_bulk(name, &layout, bytes, budget)) {
        return t;
    }
    let npy = npyz::NpyFile::new(bytes).map_err(|e| bad(format!("input {name:?}: malformed .npy: {e}")))?;
    if let Some(t) = npyz_layout(&npy, bytes).and_then(|layout| npy_bulk(name, &layout, bytes, budget)) {
        return t;
    }
    npy_file_tensor(name, npy, budget)
}

/// A C-order array of little-endian (or one-byte) numbers: what
/// [`npy_bulk`] copies out in one go.
struct Layout {
    /// NumPy's kind: `b` bool, `u` unsigned, `i` signed, `f` float.
    kind: u8,
    /// Bytes per element.
    size: usize,
    shape: Vec<usize>,
    /// Where the data starts.
    start: usize,
}

/// The header exactly as NumPy's `np.save` writes it,
/// `{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16), }`, read
/// without a parser: it is on every .npy request's path, and npyz's general
/// Python-literal parser cost more than the rest of a small request's
/// decode. `None` for anything else, which npyz then reads.
fn numpy_header(bytes: &[u8]) -> Option<Layout> {
    let start = npy_data_start(bytes)?;
    let header = bytes.get(if bytes[6] == 1 { 10 } else { 12 }..start)?; // version checked above
    let rest = std::str::from_utf8(header).ok()?.trim_end().strip_prefix("{'descr': '")?;
    let (descr, rest) = rest.split_once('\'')?;
    let (dims, rest) = rest.strip_prefix(", 'fortran_order': False, 'shape': (")?.split_once(')')?;
    if rest != ", }" {
        return None;
    }
    // "()" is a scalar, "(3,)" one dimension, "(1, 16)" two.
    let dims = dims.strip_suffix(',').unwrap_or(dims);
    let shape = if dims.is_empty() {
        Vec::new()
    } else {
        dims.split(',').map(|d| d.trim_start().parse().ok()).collect::<Option<_>>()?
    };
    let (order, kind, size) = (descr.as_bytes().first()?, descr.as_bytes().get(1)?, descr.get(2..)?.parse().ok()?);
    matches!((order, size), (b'<', _) | (b'|', 1)).then_some(Layout { kind: *kind, size, shape, start })
}

/// The same, from a header npyz parsed.
fn npyz_layout(npy: &npyz::NpyFile<&[u8]>, bytes: &[u8]) -> Option<Layout> {
    let npyz::DType::Plain(ts) = npy.dtype() else { return None };
    if npy.order() != npyz::Order::C || ts.endianness() == npyz::Endianness::Big {
        return None;
    }
    let kind = match ts.type_char() {
        npyz::TypeChar::Bool => b'b',
        npyz::TypeChar::Uint => b'u',
        npyz::TypeChar::Int => b'i',
        npyz::TypeChar::Float => b'f',
        _ => return None,
    };
    let shape = npy.shape().iter().map(|&d| usize::try_from(d).ok()).collect::<Option<_>>()?;
    Some(Layout { kind, size: ts.size_field() as usize, shape, start: npy_data_start(bytes)? })
}

/// The common case, fast: the data copied out in bulk rather than element
/// by element. `None` for a type it does not know or a size past `budget`
/// (npyz reads it then, and reports what is wrong).
fn npy_bulk(name: &str, layout: &Layout, bytes: &[u8], budget: &mut u64) -> Option<Result<Tensor>> {
    let Layout { kind, size, ref shape, start } = *layout;
    let count = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let needed = count.checked_mul(size)?;
    if needed as u64 > *budget {
        return None; // the general path reports it
    }
    let data = bytes.get(start..)?;
    if data.len() < needed {
        return Some(Err(bad(format!(
            "input {name:?}: truncated or malformed .npy data: {needed} bytes expected, {} present",
            data.len()
        ))));
    }
    let data = &data[..needed];
    macro_rules! le {
        ($variant:ident, $t:ty) => {
            Data::$variant(bytemuck::pod_collect_to_vec::<u8, $t>(data))
        };
    }
    let data = match (kind, size) {
        (b'b', 1) => {
            if data.iter().any(|&b| b > 1) {
                return Some(Err(bad(format!("input {name:?}: a bool .npy holds a value other than 0 or 1"))));
            }
            Data::Bool(data.iter().map(|&b| b == 1).collect())
        }
        (b'u', 1) => Data::Uint8(data.to_vec()),
        (b'i', 1) => le!(Int8, i8),
        (b'u', 2) => le!(Uint16, u16),
        (b'i', 2) => le!(Int16, i16),
        (b'u', 4) => le!(Uint32, u32),
        (b'i', 4) => le!(Int32, i32),
        (b'u', 8) => le!(Uint64, u64),
        (b'i', 8) => le!(Int64, i64),
        (b'f', 2) => le!(Float16, f16),
        (b'f', 4) => le!(Float32, f32),
        (b'f', 8) => le!(Float64, f64),
        _ => return None,
    };
    *budget -= needed as u64;
    Some(Tensor::new(name, shape.clone(), data))
}

/// Where an .npy file's data starts: after the magic, version, header
/// length and header.
fn npy_data_start(bytes: &[u8]) -> Option<usize> {
    Some(match bytes.get(6)? {
        1 => 10 + u16::from_le_bytes(bytes.get(8..10)?.try_into().ok()?) as usize,
        2 | 3 => 12 + u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize,
        _ => return None,
    })
}

/// The whole size of a request whose first bytes are a NumPy-written .npy
/// header (so a buffer can be sized once); `None` for anything else, or a
/// header cut short. Only a hint: nothing is checked against it.
pub fn declared_len(first: &[u8]) -> Option<u64> {
    if !first.starts_with(b"\x93NUMPY") {
        return None;
    }
    let layout = numpy_header(first)?;
    let data = layout.shape.iter().try_fold(layout.size as u64, |a, &d| a.checked_mul(d as u64))?;
    data.checked_add(layout.start as u64)
}

/// Reads one array, if its decoded size fits what is left of `budget`.
fn npy_file_tensor<R: std::io::Read>(name: &str, npy: npyz::NpyFile<R>, budget: &mut u64) -> Result<Tensor> {
    if npy.order() == npyz::Order::Fortran {
        return Err(bad(format!("input {name:?}: Fortran-order .npy arrays are not supported (use C order)")));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let npyz::DType::Plain(ts) = npy.dtype() else {
        return Err(bad(format!("input {name:?}: structured .npy arrays are not supported")));
    };
    let bytes = npy.shape().iter().try_fold(ts.size_field(), |acc, &d| acc.checked_mul(d));
    match bytes {
        Some(b) if b <= *budget => *budget -= b,
        _ => {
            return Err(bad(format!(
                "input {name:?}: shape {shape:?} decodes to more than the limit of {} bytes",
                *budget
            )))
        }
    }
    use npyz::TypeChar as C;
    let read_err = |e: std::io::Error| bad(format!("input {name:?}: truncated or malformed .npy data: {e}"));
    macro_rules! read {
        ($variant:ident) => {
            Data::$variant(npy.into_vec().map_err(read_err)?)
        };
    }
    let data = match (ts.type_char(), ts.size_field()) {
        (C::Bool, 1) => read!(Bool),
        (C::Uint, 1) => read!(Uint8),
        (C::Int, 1) => read!(Int8),
        (C::Uint, 2) => read!(Uint16),
        (C::Int, 2) => read!(Int16),
        (C::Uint, 4) => read!(Uint32),
        (C::Int, 4) => read!(Int32),
        (C::Uint, 8) => read!(Uint64),
        (C::Int, 8) => read!(Int64),
        (C::Float, 2) => read!(Float16),
        (C::Float, 4) => read!(Float32),
        (C::Float, 8) => read!(Float64),
        _ => return Err(bad(format!("input {name:?}: .npy dtype {ts} is not supported"))),
    };
    Tensor::new(name, shape, data)
}

fn npz_tensors(bytes: &[u8], budget: &mut u64) -> Result<Vec<Tensor>> {
    let mut npz = npyz::npz::NpzArchive::new(Cursor::new(bytes)).map_err(|e| bad(format!("malformed .npz: {e}")))?;
    let names: Vec<String> = npz.array_names().map(String::from).collect();
    names
        .iter()
        .map(|name| {
            let npy = npz
                .by_name(name)
                .map_err(|e| bad(format!("input {name:?}: malformed .npz entry: {e}")))?
                .ok_or_else(|| bad(format!("input {name:?}: missing from the .npz")))?;
            npy_file_tensor(name, npy, budget)
        })
        .collect()
}

/// Writes a tensor as .npy with the header NumPy's `np.save` writes
/// (`{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16), }`,
/// padded with spaces so the data starts at a multiple of 64): the mirror
/// of [`numpy_header`], as cheap, since every .npy response carries one.
fn write_npy(t: &Tensor, out: &mut impl std::io::Write) -> std::io::Result<()> {
    use bytemuck::cast_slice as bytes;
    let bools: Vec<u8>;
    let (descr, data): (&str, &[u8]) = match &t.data {
        Data::Bool(v) => {
            bools = v.iter().map(|&b| b as u8).collect();
            ("|b1", &bools)
        }
        Data::Uint8(v) => ("|u1", v),
        Data::Int8(v) => ("|i1", bytes(v)),
        Data::Uint16(v) => ("<u2", bytes(v)),
        Data::Int16(v) => ("<i2", bytes(v)),
        Data::Uint32(v) => ("<u4", bytes(v)),
        Data::Int32(v) => ("<i4", bytes(v)),
        Data::Uint64(v) => ("<u8", bytes(v)),
        Data::Int64(v) => ("<i8", bytes(v)),
        Data::Float16(v) => ("<f2", bytes(v)),
        Data::Float32(v) => ("<f4", bytes(v)),
        Data::Float64(v) => ("<f8", bytes(v)),
    };
    let dims: Vec<String> = t.shape.iter().map(usize::to_string).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Format 1.0 counts the header in 16 bits; 2.0 in 32, for huge ranks.
    let padded_in = |prefix: usize| (prefix + header.len() + 1).next_multiple_of(64) - prefix;
    let v1 = padded_in(10) <= 0xffff;
    let padded = padded_in(if v1 { 10 } else { 12 });
    header.extend(std::iter::repeat_n(' ', padded - header.len() - 1));
    header.push('\n');
    out.write_all(b"\x93NUMPY")?;
    if v1 {
        out.write_all(&[1, 0])?;
        out.write_all(&(header.len() as u16).to_le_bytes())?;
    } else {
        out.write_all(&[2, 0])?;
        out.write_all(&(header.len() as u32).to_le_bytes())?;
    }
    out.write_all(header.as_bytes())?;
    out.write_all(data)
}

// ---- responses ----------------------------------------------------------------

/// Encodes the outputs in the request's codec.
pub fn encode(request: &Request, mut outputs: Vec<Tensor>, model: &str, version: u32) -> Result<Vec<u8>> {
    let by_name = |outputs: &[Tensor]| -> Value {
        Value::Object(outputs.iter().map(|t| (t.name.clone(), json_value(t))).collect())
    };
    let json = match request.codec {
        Codec::JsonArray if outputs.len() == 1 => json_value(&outputs[0]),
        Codec::JsonArray | Codec::JsonObject => by_name(&outputs),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::TensorSpec;

    fn sig(inputs: &[(&str, DType, &[i64])]) -> Signature {
        Signature {
            inputs: inputs
                .iter()
                .map(|(n, d, s)| TensorSpec { name: n.to_string(), dtype: *d, shape: s.to_vec(), dim_names: vec![] })
                .collect(),
            outputs: vec![],
        }
    }

    fn decode_test(bytes: &[u8], sig: &Signature) -> Result<Request> {
        decode(bytes, sig, 1 << 20)
    }

    fn err(bytes: &[u8], sig: &Signature) -> String {
        let e = decode_test(bytes, sig).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
        e.to_string()
    }

    #[test]
    fn json_array_takes_the_models_dtype() {
        let s = sig(&[("x", DType::Float32, &[-1, 2])]);
        let r = decode_test(b" [[1, 2.5], [3, 4]]\n", &s).unwrap();
        assert_eq!(r.codec, Codec::JsonArray);
        assert_eq!(r.inputs[0].shape, [2, 2]);
        assert_eq!(r.inputs[0].data, Data::Float32(vec![1.0, 2.5, 3.0, 4.0]));
        let s = sig(&[("ids", DType::Int64, &[-1])]);
        assert_eq!(decode_test(b"[1, -2]", &s).unwrap().inputs[0].data, Data::Int64(vec![1, -2]));
    }

    #[test]
    fn json_errors_name_the_input() {
        let ints = sig(&[("ids", DType::Uint8, &[-1])]);
        assert_eq!(err(b"[1, 2.5]", &ints), "input \"ids\": a float (2.5) where an integer (uint8) is required");
        assert_eq!(err(b"[1, 300]", &ints), "input \"ids\": 300 is out of range for uint8");
        assert_eq!(err(b"[[1], [2, 3]]", &ints), "input \"ids\": ragged array (not a rectangular shape)");
        assert!(err(b"[1, 2", &ints).starts_with("malformed JSON"));
        assert_eq!(err(b"hello", &ints), "unrecognized input: expected JSON, .npy or .npz");
        assert_eq!(err(b"", &ints), "empty request");
        assert_eq!(err(br#"{"nope": [1]}"#, &ints), "unknown input \"nope\" (the model's inputs: ids)");
        let two = sig(&[("a", DType::Float32, &[-1]), ("b", DType::Float32, &[-1])]);
        assert!(err(b"[1]", &two).contains("it has 2 (a, b)"));
    }

    #[test]
    fn json_object_and_scalars() {
        let s = sig(&[("x", DType::Float32, &[1, 2]), ("sr", DType::Int64, &[])]);
        let r = decode_test(br#"{"x": [[1, 2]], "sr": 16000}"#, &s).unwrap();
        assert_eq!(r.codec, Codec::JsonObject);
        let sr = r.inputs.iter().find(|t| t.name == "sr").unwrap();
        assert_eq!((sr.shape.as_slice(), &sr.data), (&[][..], &Data::Int64(vec![16000])));
    }

    #[test]
    fn kserve_round_trip() {
        let s = sig(&[("x", DType::Float32, &[-1, 2])]);
        let body = br#"{"id": "42", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}"#;
        let r = decode_test(body, &s).unwrap();
        assert_eq!(r.codec, Codec::KServe);
        assert_eq!(r.inputs[0].data, Data::Float32(vec![1.0, 2.0]));
        let out = Tensor::new("y", vec![1, 2], Data::Float32(vec![3.0, 4.0])).unwrap();
        let bytes = encode(&r, vec![out], "m", 3).unwrap();
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "42", "model_name": "m", "model_version": "3",
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [3.0, 4.0]}]})
        );
        let wrong = br#"{"inputs": [{"name": "x", "shape": [2], "datatype": "FP32", "data": [1, 2, 3]}]}"#;
        assert_eq!(err(wrong, &s), "input \"x\": shape [2] needs 2 elements, got 3");
        let unknown = br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}"#;
        assert_eq!(err(unknown, &s), "input \"x\": unsupported KServe datatype \"BYTES\"");
    }

    /// Headers as NumPy 2's `np.save` wrote them (the test's literals).
    #[test]
    fn npy_headers_are_numpys_own() {
        let cases = [
            (Tensor::new("y", vec![1, 16], Data::Float32(vec![0.5; 16])), "'<f4'", "(1, 16)"),
            (Tensor::new("y", vec![], Data::Int64(vec![7])), "'<i8'", "()"),
            (Tensor::new("y", vec![3], Data::Bool(vec![true, false, true])), "'|b1'", "(3,)"),
            (Tensor::new("y", vec![2, 0, 3], Data::Float16(vec![])), "'<f2'", "(2, 0, 3)"),
        ];
        for (t, descr, shape) in cases {
            let t = t.unwrap();
            let mut bytes = Vec::new();
            write_npy(&t, &mut bytes).unwrap();
            let dict = format!("{{'descr': {descr}, 'fortran_order': False, 'shape': {shape}, }}");
            let header = format!("\u{93}NUMPY\u{1}\0v\0{dict:<117}\n");
            let header: Vec<u8> = header.chars().map(|c| c as u8).collect(); // one byte each
            assert_eq!(&bytes[..128], &header[..], "{shape}");
            let layout = numpy_header(&bytes).expect("read back on the fast path");
            assert_eq!((layout.shape, layout.start), (t.shape.clone(), 128));
            assert_eq!(bytes.len(), 128 + t.data.byte_len());
        }
    }

    #[test]
    fn npy_round_trip_and_truncation() {
        let s = sig(&[("x", DType::Int16, &[-1, 3])]);
        let t = Tensor::new("x", vec![2, 3], Data::Int16(vec![1, -2, 3, -4, 5, i16::MAX])).unwrap();
        let mut bytes = Vec::new();
        write_npy(&t, &mut bytes).unwrap();
        let r = decode_test(&bytes, &s).unwrap();
        assert_eq!((r.codec, &r.inputs[0]), (Codec::Npy, &t));
        let e = err(&bytes[..bytes.len() - 3], &s);
        assert!(e.contains("truncated or malformed .npy"), "{e}");
        let e = err(&bytes[..20], &s);
        assert!(e.contains("malformed .npy"), "{e}");
        let out = encode(&r, vec![t.clone()], "m", 1).unwrap();
        assert_eq!(out, bytes);
    }

    #[test]
    fn hostile_shapes_are_refused_without_allocating() {
        let s = sig(&[("x", DType::Float32, &[-1])]);
        // A first element nested 5 deep, 1024 wide: a naive reader would
        // reserve 1024^5 elements.
        let mut v = String::from("0");
        for _ in 0..5 {
            v = format!("[{v}{}]", ",0".repeat(1023));
        }
        assert!(err(v.as_bytes(), &s).contains("ragged"));
        let huge =
            br#"{"inputs": [{"name": "x", "shape": [4294967296, 4294967296], "datatype": "FP32", "data": [1]}]}"#;
        assert!(err(huge, &s).contains("too large"));
        // An .npy whose header claims 2^40 elements, with 8 bytes of data.
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }";
        let header = format!("{header:<117}\n");
        let mut npy = b"\x93NUMPY\x01\x00".to_vec();
        npy.extend((header.len() as u16).to_le_bytes());
        npy.extend(header.as_bytes());
        npy.extend([0u8; 8]);
        assert_eq!(err(&npy, &s), "input \"x\": shape [1099511627776] decodes to more than the limit of 1048576 bytes");
    }

    /// An .npy file with this header text and no data.
    fn npy_header_only(header: &str) -> Vec<u8> {
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(header.len() as u16 + 1).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.push(b'\n');
        out
    }

    #[test]
    fn numpys_own_headers_are_read_without_npyz_and_agree_with_it() {
        for (header, kind, size, shape) in [
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 16), }   ", b'f', 4, vec![1, 16]),
            ("{'descr': '<i8', 'fortran_order': False, 'shape': (3,), }", b'i', 8, vec![3]),
            ("{'descr': '<f8', 'fortran_order': False, 'shape': (), }", b'f', 8, vec![]),
            ("{'descr': '|b1', 'fortran_order': False, 'shape': (2, 3), }", b'b', 1, vec![2, 3]),
            ("{'descr': '|u1', 'fortran_order': False, 'shape': (0, 4, 5), }", b'u', 1, vec![0, 4, 5]),
        ] {
            let bytes = npy_header_only(header);
            let fast = numpy_header(&bytes).unwrap_or_else(|| panic!("{header}"));
            let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
            let slow = npyz_layout(&npy, &bytes).unwrap();
            assert_eq!((fast.kind, fast.size, &fast.shape, fast.start), (kind, size, &shape, bytes.len()), "{header}");
            assert_eq!((slow.kind, slow.size, &slow.shape, slow.start), (kind, size, &shape, bytes.len()), "{header}");
        }
        // Anything else is left to npyz.
        for header in [
            "{'descr': '>f4', 'fortran_order': False, 'shape': (1, 16), }",
            "{'descr': '<f4', 'fortran_order': True, 'shape': (1, 16), }",
            "{'fortran_order': False, 'descr': '<f4', 'shape': (1, 16), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1,, 16), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 16), }",
            "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }",
        ] {
            assert!(numpy_header(&npy_header_only(header)).is_none(), "{header}");
        }
    }

    #[test]
    fn an_npy_header_declares_the_request_size() {
        let mut bytes = npy_header_only("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 5), }");
        let whole = bytes.len() as u64 + 60;
        assert_eq!(declared_len(&bytes), Some(whole));
        bytes.extend_from_slice(&[0; 20]);
        assert_eq!(declared_len(&bytes), Some(whole), "a partial body");
        assert_eq!(declared_len(&bytes[..20]), None, "a header cut short");
        assert_eq!(declared_len(b"[[1.0]]"), None);
    }

    #[test]
    fn npz_round_trip() {
        let s = sig(&[("a", DType::Float64, &[-1]), ("b", DType::Bool, &[2])]);
        let a = Tensor::new("a", vec![3], Data::Float64(vec![1.0, 2.0, 3.0])).unwrap();
        let b = Tensor::new("b", vec![2], Data::Bool(vec![true, false])).unwrap();
        let request = Request { codec: Codec::Npz, inputs: vec![], id: None, outputs: None };
        let bytes = encode(&request, vec![a.clone(), b.clone()], "m", 1).unwrap();
        let r = decode_test(&bytes, &s).unwrap();
        assert_eq!(r.codec, Codec::Npz);
        let mut got = r.inputs;
        got.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(got, vec![a, b]);
    }
}
