//! Tensor vocabulary shared by backends, the catalog and (later) the codecs:
//! element types and named, shaped signatures.
//!
//! Names follow NumPy (`float32`, `int64`, ...) because that is what users of
//! `meta.json` and `.npy` files already know. A free dimension is `-1`.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    Bool,
    Uint8,
    Int8,
    Uint16,
    Int16,
    Uint32,
    Int32,
    Uint64,
    Int64,
    Float16,
    Bfloat16,
    Float32,
    Float64,
    String,
    /// An element type aifs has no codec for (e.g. float8); kept so that
    /// `meta.json` can still describe such a model honestly.
    Other,
}

/// One input or output of a model: name, element type, shape (`-1` = free).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
}

/// What a backend reports about a loaded model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_serialize_with_numpy_names() {
        let spec = TensorSpec {
            name: "x".into(),
            dtype: DType::Float32,
            shape: vec![-1, 3],
        };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(json, r#"{"name":"x","dtype":"float32","shape":[-1,3]}"#);
    }
}
