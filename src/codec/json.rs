//! JSON requests: a nested array for the only input, or an object of
//! inputs by name; numbers take the model's dtype.
//!
//! JSON has no NaN or infinities: like protobuf's JSON mapping (and so
//! KServe's), they are the strings `"NaN"`, `"Infinity"` and
//! `"-Infinity"`, in responses and in requests.

use half::f16;
use serde_json::Value;

use crate::error::Result;
use crate::tensor::{DType, Data, Tensor};

use super::bad;
// ---- JSON ------------------------------------------------------------------

/// A nested JSON array (or a scalar, for a 0-d input) as a tensor of `dtype`.
pub(super) fn json_tensor(name: &str, value: &Value, dtype: DType) -> Result<Tensor> {
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

pub(super) fn flatten<'v>(name: &str, v: &'v Value, shape: &[usize], out: &mut Vec<&'v Value>) -> Result<()> {
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

pub(super) fn json_data(name: &str, leaves: &[&Value], dtype: DType) -> Result<Data> {
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
                            _ => {
                                return Err(bad(format!(
                                    "input {name:?}: expected a number ({dtype}), got {}",
                                    kind(v)
                                )))
                            }
                        };
                        n.ok_or_else(|| bad(format!("input {name:?}: {v} is out of range for {dtype}")))
                    })
                    .collect::<Result<_>>()?,
            )
        };
    }
    let float = |v: &Value| {
        v.as_f64()
            .or_else(|| non_finite(v))
            .ok_or_else(|| bad(format!("input {name:?}: expected a number ({dtype}), got {}", kind(v))))
    };
    Ok(match dtype {
        DType::Bool => Data::Bool(
            leaves
                .iter()
                .map(|v| {
                    v.as_bool().ok_or_else(|| bad(format!("input {name:?}: expected true or false, got {}", kind(v))))
                })
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
        DType::String => Data::String(
            leaves
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(String::from)
                        .ok_or_else(|| bad(format!("input {name:?}: expected a string, got {}", kind(v))))
                })
                .collect::<Result<_>>()?,
        ),
        DType::Bfloat16 | DType::Other => return Err(bad(format!("input {name:?}: dtype {dtype} is not supported"))),
    })
}

/// A tensor as a nested JSON array (a number for 0-d).
pub(super) fn json_value(t: &Tensor) -> Value {
    fn nest(shape: &[usize], flat: &mut impl Iterator<Item = Value>) -> Value {
        match shape.split_first() {
            None => flat.next().unwrap_or(Value::Null),
            Some((&n, rest)) => Value::Array((0..n).map(|_| nest(rest, flat)).collect()),
        }
    }
    nest(&t.shape, &mut flat_values(&t.data).into_iter())
}

pub(super) fn flat_values(data: &Data) -> Vec<Value> {
    match data {
        Data::Bool(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Float16(v) => v.iter().map(|&x| float_value(f64::from(f32::from(x)))).collect(),
        Data::Float32(v) => v.iter().map(|&x| float_value(x as f64)).collect(),
        Data::Float64(v) => v.iter().map(|&x| float_value(x)).collect(),
        Data::Uint8(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Int8(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Uint16(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Int16(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Uint32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Int32(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Uint64(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::Int64(v) => v.iter().map(|&x| Value::from(x)).collect(),
        Data::String(v) => v.iter().map(|x| Value::from(x.as_str())).collect(),
    }
}

/// A float as JSON: a number, or one of the strings NaN and the
/// infinities are written as (see the module header).
fn float_value(x: f64) -> Value {
    if x.is_nan() {
        Value::from("NaN")
    } else if x.is_infinite() {
        Value::from(if x > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        Value::from(x)
    }
}

/// The non-finite float a JSON string names, if it names one.
fn non_finite(v: &Value) -> Option<f64> {
    match v.as_str()? {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => None,
    }
}

/// What a JSON value is, for a reason that must not quote the request.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
