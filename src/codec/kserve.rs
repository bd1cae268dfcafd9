//! KServe v2 / Triton JSON: typed inputs by name, and the response shape.

use serde_json::{Map, Value};

use crate::error::Result;
use crate::tensor::{DType, Tensor};

use super::json::json_data;
use super::{bad, Codec, Request};
// ---- KServe v2 ---------------------------------------------------------------

/// KServe v2 datatypes and the element types they decode to, both ways.
pub(super) const KSERVE_DATATYPES: [(&str, DType); 13] = [
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
    // Text, as KServe's JSON form carries it: one string per element.
    ("BYTES", DType::String),
];

pub(super) fn kserve_dtype(datatype: &str) -> Option<DType> {
    KSERVE_DATATYPES.iter().find(|(name, _)| *name == datatype).map(|(_, dtype)| *dtype)
}

/// Outputs are always one of the table's types (they come from [`Data`](crate::tensor::Data)).
pub(super) fn kserve_datatype(dtype: DType) -> &'static str {
    KSERVE_DATATYPES.iter().find(|(_, d)| *d == dtype).map_or("UNKNOWN", |(name, _)| name)
}

pub(super) fn kserve_request(mut map: Map<String, Value>) -> Result<Request> {
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
    Ok(Request { codec: Codec::KServe, inputs, id: map.remove("id"), outputs, prompt: None })
}

/// KServe allows `data` flat or nested; both flatten row-major.
pub(super) fn flatten_any<'v>(v: &'v Value, out: &mut Vec<&'v Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|item| flatten_any(item, out)),
        leaf => out.push(leaf),
    }
}
