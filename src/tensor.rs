//! Tensor vocabulary shared by backends, codecs and the catalog: element
//! types, typed tensors, and model signatures with the check that a request
//! fits one.
//!
//! Names follow NumPy (`float32`, `int64`, ...) because that is what users of
//! `meta.json` and `.npy` files already know. A free dimension is `-1`.
//! Data is kept typed (`Vec<f32>`, ...) from decoding to the backend, so no
//! codec or backend reinterprets bytes.

use half::f16;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

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

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::Uint8 => "uint8",
            DType::Int8 => "int8",
            DType::Uint16 => "uint16",
            DType::Int16 => "int16",
            DType::Uint32 => "uint32",
            DType::Int32 => "int32",
            DType::Uint64 => "uint64",
            DType::Int64 => "int64",
            DType::Float16 => "float16",
            DType::Bfloat16 => "bfloat16",
            DType::Float32 => "float32",
            DType::Float64 => "float64",
            DType::String => "string",
            DType::Other => "other",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One input or output of a model: name, element type, shape (`-1` = free).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<i64>,
    /// The model's names for its dimensions (`""` where it gives none), as
    /// in `["N", ""]`. A shared name is how a model says two free
    /// dimensions are the same one, e.g. the batch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dim_names: Vec<String>,
}

/// What a backend reports about a loaded model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    /// A language model: it takes a prompt and generates text, streamed
    /// (`backend::Generation`), instead of mapping tensors to tensors.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub generates: bool,
}

/// Typed tensor elements, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Int8(Vec<i8>),
    Uint16(Vec<u16>),
    Int16(Vec<i16>),
    Uint32(Vec<u32>),
    Int32(Vec<i32>),
    Uint64(Vec<u64>),
    Int64(Vec<i64>),
    Float16(Vec<f16>),
    Float32(Vec<f32>),
    Float64(Vec<f64>),
    /// UTF-8 text, one string per element (a text model's input).
    String(Vec<String>),
}

/// Runs `$body` with `$v` bound to the typed `Vec` inside a [`Data`] of
/// numbers: the caller handles [`Data::String`] first.
#[macro_export]
macro_rules! with_data {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            $crate::tensor::Data::Bool($v) => $body,
            $crate::tensor::Data::Uint8($v) => $body,
            $crate::tensor::Data::Int8($v) => $body,
            $crate::tensor::Data::Uint16($v) => $body,
            $crate::tensor::Data::Int16($v) => $body,
            $crate::tensor::Data::Uint32($v) => $body,
            $crate::tensor::Data::Int32($v) => $body,
            $crate::tensor::Data::Uint64($v) => $body,
            $crate::tensor::Data::Int64($v) => $body,
            $crate::tensor::Data::Float16($v) => $body,
            $crate::tensor::Data::Float32($v) => $body,
            $crate::tensor::Data::Float64($v) => $body,
            $crate::tensor::Data::String(_) => unreachable!("the caller handles strings first"),
        }
    };
}

impl Data {
    pub fn dtype(&self) -> DType {
        match self {
            Data::Bool(_) => DType::Bool,
            Data::Uint8(_) => DType::Uint8,
            Data::Int8(_) => DType::Int8,
            Data::Uint16(_) => DType::Uint16,
            Data::Int16(_) => DType::Int16,
            Data::Uint32(_) => DType::Uint32,
            Data::Int32(_) => DType::Int32,
            Data::Uint64(_) => DType::Uint64,
            Data::Int64(_) => DType::Int64,
            Data::Float16(_) => DType::Float16,
            Data::Float32(_) => DType::Float32,
            Data::Float64(_) => DType::Float64,
            Data::String(_) => DType::String,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Data::String(v) => v.len(),
            numbers => with_data!(numbers, v => v.len()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The size of the elements in bytes.
    pub fn byte_len(&self) -> usize {
        match self {
            Data::String(v) => v.iter().map(String::len).sum(),
            numbers => with_data!(numbers, v => std::mem::size_of_val(&v[..])),
        }
    }

    /// Concatenates data of one dtype (the caller checked they match).
    fn concat(parts: &[&Data]) -> Data {
        macro_rules! cat {
            ($($v:ident),*) => {
                match parts[0] {
                    $(Data::$v(_) => Data::$v(
                        parts.iter().flat_map(|p| match p { Data::$v(x) => x.iter().copied(), _ => unreachable!("one dtype") }).collect(),
                    ),)*
                    Data::String(_) => unreachable!("handled above"),
                }
            };
        }
        if let Data::String(_) = parts[0] {
            let strings = parts.iter().flat_map(|p| match p {
                Data::String(x) => x.iter().cloned(),
                _ => unreachable!("one dtype"),
            });
            return Data::String(strings.collect());
        }
        cat!(Bool, Uint8, Int8, Uint16, Int16, Uint32, Int32, Uint64, Int64, Float16, Float32, Float64)
    }

    /// Cuts into consecutive pieces of the given lengths (summing to `len`).
    fn cut(&self, lens: &[usize]) -> Vec<Data> {
        macro_rules! cut {
            ($($v:ident),*) => {
                match self {
                    $(Data::$v(x) => {
                        let mut at = 0;
                        lens.iter().map(|&n| { at += n; Data::$v(x[at - n..at].to_vec()) }).collect()
                    })*
                }
            };
        }
        cut!(Bool, Uint8, Int8, Uint16, Int16, Uint32, Int32, Uint64, Int64, Float16, Float32, Float64, String)
    }
}

/// A named, shaped, typed tensor: one input or output of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Tensor {
    /// Checks that the element count matches the shape.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Data) -> Result<Tensor> {
        let name = name.into();
        let expected = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| Error::BadInput(format!("input {name:?}: shape {shape:?} is too large")))?;
        if expected != data.len() {
            return Err(Error::BadInput(format!(
                "input {name:?}: shape {shape:?} needs {expected} elements, got {}",
                data.len()
            )));
        }
        Ok(Tensor { name, shape, data })
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Rows along the first (batch) dimension and the shape after it, or
    /// `None` for a 0-d tensor.
    pub fn rows(&self) -> Option<(usize, &[usize])> {
        self.shape.split_first().map(|(&n, rest)| (n, rest))
    }

    /// Stacks tensors with the same name, dtype and trailing dimensions along
    /// the first dimension: one batched input.
    pub fn stack(parts: &[&Tensor]) -> Tensor {
        let first = parts[0];
        let rows: usize = parts.iter().map(|t| t.shape[0]).sum();
        let mut shape = first.shape.clone();
        shape[0] = rows;
        let data = Data::concat(&parts.iter().map(|t| &t.data).collect::<Vec<_>>());
        Tensor { name: first.name.clone(), shape, data }
    }

    /// Splits along the first dimension into pieces of `rows` each: one
    /// output per request of a batch. `None` if the rows do not add up.
    pub fn split(&self, rows: &[usize]) -> Option<Vec<Tensor>> {
        let (total, rest) = self.rows()?;
        if rows.iter().sum::<usize>() != total {
            return None;
        }
        let row_len: usize = rest.iter().product();
        let lens: Vec<usize> = rows.iter().map(|r| r * row_len).collect();
        let pieces = self.data.cut(&lens);
        Some(
            rows.iter()
                .zip(pieces)
                .map(|(&r, data)| {
                    let mut shape = self.shape.clone();
                    shape[0] = r;
                    Tensor { name: self.name.clone(), shape, data }
                })
                .collect(),
        )
    }
}

impl Signature {
    /// The name of the batch dimension, if the model has one: every input
    /// and output starts with a free dimension, and all call it the same
    /// (non-empty) name. Only then can requests be stacked along it and the
    /// outputs be split back per request.
    pub fn batch_dimension(&self) -> Option<&str> {
        let mut first = self.inputs.iter().chain(&self.outputs).map(|s| match (s.shape.first(), s.dim_names.first()) {
            (Some(-1), Some(name)) if !name.is_empty() => Some(name.as_str()),
            _ => None,
        });
        let name = first.next()??;
        first.all(|n| n == Some(name)).then_some(name)
    }

    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|s| s.name == name)
    }

    fn input_names(&self) -> String {
        self.inputs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// Checks a request's inputs against the signature — names, dtypes,
    /// ranks, fixed dimensions — and returns them in the model's order.
    /// Errors name the input and the expected versus the received value.
    pub fn check(&self, mut inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
        if let Some(unknown) = inputs.iter().find(|t| self.input(&t.name).is_none()) {
            return Err(Error::BadInput(format!(
                "unknown input {:?} (the model's inputs: {})",
                unknown.name,
                self.input_names()
            )));
        }
        let mut ordered = Vec::with_capacity(self.inputs.len());
        for spec in &self.inputs {
            let i = inputs.iter().position(|t| t.name == spec.name).ok_or_else(|| {
                Error::BadInput(format!(
                    "missing input {:?} (expected {} {})",
                    spec.name,
                    spec.dtype,
                    shape_text(&spec.shape)
                ))
            })?;
            let t = inputs.swap_remove(i);
            if t.dtype() != spec.dtype {
                return Err(Error::BadInput(format!(
                    "input {:?}: expected dtype {}, got {}",
                    spec.name,
                    spec.dtype,
                    t.dtype()
                )));
            }
            let fits = t.shape.len() == spec.shape.len()
                && t.shape.iter().zip(&spec.shape).all(|(&got, &want)| want < 0 || got as i64 == want);
            if !fits {
                return Err(Error::BadInput(format!(
                    "input {:?}: expected shape {}, got {}",
                    spec.name,
                    shape_text(&spec.shape),
                    shape_text(&t.shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
                )));
            }
            ordered.push(t);
        }
        if let Some(dup) = inputs.first() {
            return Err(Error::BadInput(format!("input {:?} given twice", dup.name)));
        }
        Ok(ordered)
    }
}

/// `[-1, 16]` as users see shapes in `meta.json`.
pub fn shape_text(shape: &[i64]) -> String {
    format!("{shape:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig() -> Signature {
        Signature {
            inputs: vec![
                TensorSpec { name: "x".into(), dtype: DType::Float32, shape: vec![-1, 2], dim_names: vec![] },
                TensorSpec { name: "n".into(), dtype: DType::Int64, shape: vec![], dim_names: vec![] },
            ],
            outputs: vec![],
            generates: false,
        }
    }

    fn x(shape: Vec<usize>) -> Tensor {
        let n = shape.iter().product();
        Tensor::new("x", shape, Data::Float32(vec![0.0; n])).unwrap()
    }

    fn n() -> Tensor {
        Tensor::new("n", vec![], Data::Int64(vec![3])).unwrap()
    }

    #[test]
    fn dtypes_serialize_with_numpy_names() {
        let spec = TensorSpec { name: "x".into(), dtype: DType::Float32, shape: vec![-1, 3], dim_names: vec![] };
        let json = serde_json::to_string(&spec).unwrap();
        assert_eq!(json, r#"{"name":"x","dtype":"float32","shape":[-1,3]}"#);
    }

    #[test]
    fn check_orders_inputs_and_accepts_free_dimensions() {
        let got = sig().check(vec![n(), x(vec![5, 2])]).unwrap();
        assert_eq!(got.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["x", "n"]);
    }

    #[test]
    fn check_names_what_is_wrong() {
        let err = |inputs| sig().check(inputs).unwrap_err().to_string();
        assert_eq!(err(vec![x(vec![1, 2])]), r#"missing input "n" (expected int64 [])"#);
        assert_eq!(
            err(vec![x(vec![1, 2]), n(), Tensor::new("y", vec![], Data::Bool(vec![true])).unwrap()]),
            r#"unknown input "y" (the model's inputs: x, n)"#
        );
        assert_eq!(err(vec![x(vec![1, 3]), n()]), r#"input "x": expected shape [-1, 2], got [1, 3]"#);
        assert_eq!(err(vec![x(vec![2]), n()]), r#"input "x": expected shape [-1, 2], got [2]"#);
        let wrong = Tensor::new("n", vec![], Data::Float64(vec![3.0])).unwrap();
        assert_eq!(err(vec![x(vec![1, 2]), wrong]), r#"input "n": expected dtype int64, got float64"#);
        assert_eq!(err(vec![x(vec![1, 2]), n(), n()]), r#"input "n" given twice"#);
    }

    #[test]
    fn a_batch_dimension_must_be_named_alike_everywhere() {
        let spec = |name: &str, dims: &[&str]| TensorSpec {
            name: name.into(),
            dtype: DType::Float32,
            shape: dims.iter().map(|d| if d.is_empty() || d.starts_with('N') { -1 } else { 4 }).collect(),
            dim_names: dims.iter().map(|d| d.to_string()).collect(),
        };
        let sig = |i: Vec<TensorSpec>, o: Vec<TensorSpec>| Signature { inputs: i, outputs: o, generates: false };
        assert_eq!(sig(vec![spec("x", &["N", "4"])], vec![spec("y", &["N"])]).batch_dimension(), Some("N"));
        // A detector's boxes: free, but not the batch.
        assert_eq!(sig(vec![spec("x", &["N", "4"])], vec![spec("boxes", &["Nboxes", "4"])]).batch_dimension(), None);
        assert_eq!(sig(vec![spec("x", &["", "4"])], vec![spec("y", &[""])]).batch_dimension(), None);
        assert_eq!(sig(vec![spec("x", &["4"])], vec![spec("y", &["4"])]).batch_dimension(), None);
    }

    #[test]
    fn stack_and_split_round_trip() {
        let a = Tensor::new("x", vec![1, 2], Data::Int32(vec![1, 2])).unwrap();
        let b = Tensor::new("x", vec![2, 2], Data::Int32(vec![3, 4, 5, 6])).unwrap();
        let s = Tensor::stack(&[&a, &b]);
        assert_eq!((s.shape.as_slice(), &s.data), (&[3, 2][..], &Data::Int32(vec![1, 2, 3, 4, 5, 6])));
        assert_eq!(s.split(&[1, 2]).unwrap(), vec![a, b]);
        assert_eq!(s.split(&[1, 1]), None);
    }

    #[test]
    fn element_count_must_match_the_shape() {
        let e = Tensor::new("x", vec![2, 2], Data::Float32(vec![1.0; 3])).unwrap_err();
        assert_eq!(e.errno(), libc::EINVAL);
    }
}
