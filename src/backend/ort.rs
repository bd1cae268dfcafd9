//! ONNX Runtime through `ort`, loaded at run time (`load-dynamic`) from the
//! `libonnxruntime.so` that `scripts/setup.sh` installs. [`find_onnxruntime`]
//! says where it looks. `ort` panics on first use without a library, so
//! [`OnnxRuntime::load`] loads it first and turns failure into an error.
//!
//! A version is one `.onnx` file. Inspection and loading both read it from
//! its path, so what the import checked is what runs.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use crate::device::Target;
use crate::error::{Error, Result};
use crate::tensor::{DType, Data, Signature, Tensor, TensorSpec};
use crate::with_data;

use super::{first_line, Backend, Details, Files, Instance, Stop};

const NAME: &str = "onnxruntime";

/// The ONNX Runtime library file name inside the PyPI wheel.
pub const ONNXRUNTIME_LIB: &str = "libonnxruntime.so.1.32.0";

/// Where the daemon looks for ONNX Runtime, in order:
/// 1. `explicit` (the `--onnxruntime` flag or `AIFS_ONNXRUNTIME`);
/// 2. next to the executable (an installed layout);
/// 3. `.deps/onnxruntime/onnxruntime/capi/` in the executable's ancestors
///    (what `scripts/setup.sh` makes in a checkout, so `target/*/aifs-mountd`
///    finds it with nothing exported);
/// 4. `/usr/local/lib`, `/usr/lib`.
pub fn find_onnxruntime(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = explicit {
        return if path.is_file() {
            Ok(path.to_path_buf())
        } else {
            Err(format!("ONNX Runtime library {} does not exist", path.display()))
        };
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join(ONNXRUNTIME_LIB));
            // scripts/install.sh: PREFIX/bin/aifs-mountd, PREFIX/lib/aifs/.
            candidates.push(dir.join("../lib/aifs").join(ONNXRUNTIME_LIB));
            for ancestor in dir.ancestors() {
                candidates.push(ancestor.join(".deps/onnxruntime/onnxruntime/capi").join(ONNXRUNTIME_LIB));
            }
        }
    }
    candidates.push(Path::new("/usr/local/lib").join(ONNXRUNTIME_LIB));
    candidates.push(Path::new("/usr/lib").join(ONNXRUNTIME_LIB));
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| {
        format!(
            "ONNX Runtime library {ONNXRUNTIME_LIB} not found (run scripts/setup.sh, or pass --onnxruntime PATH / set AIFS_ONNXRUNTIME)"
        )
    })
}

/// ONNX Runtime through `ort`. `ort` keeps one process-wide library and
/// environment, so this is a handle onto that global.
pub struct OnnxRuntime {
    library: PathBuf,
    env: ::ort::environment::Environment,
}

static ORT: OnceLock<std::result::Result<Arc<OnnxRuntime>, String>> = OnceLock::new();

impl OnnxRuntime {
    /// Loads the library at `library` (first call wins for the process).
    pub fn load(library: &Path) -> Result<Arc<OnnxRuntime>> {
        ORT.get_or_init(|| {
            let builder = ::ort::init_from(library).map_err(|e| format!("loading {}: {e}", library.display()))?;
            let env = builder
                .with_name("aifs")
                .build()
                .map_err(|e| format!("starting ONNX Runtime from {}: {e}", library.display()))?;
            Ok(Arc::new(OnnxRuntime { library: library.to_path_buf(), env }))
        })
        .clone()
        .map_err(|message| Error::Backend { backend: NAME, message })
    }
}

impl OnnxRuntime {
    fn session_builder(&self) -> ::ort::Result<::ort::session::builder::SessionBuilder> {
        // One intra-op thread: the engine runs independent requests in
        // parallel, one per core, which beats splitting each small one.
        ::ort::session::Session::builder(&self.env).and_then(|b| b.with_intra_threads(1).map_err(Into::into))
    }
}

/// The version's one `.onnx` file; the others (external data) sit beside
/// it as the version's tree places them, and ONNX Runtime reads them
/// relative to it.
fn model_file(files: &Files) -> Result<(&str, &Path)> {
    let mut onnx = files.iter().filter(|(name, _)| name.ends_with(".onnx"));
    match (onnx.next(), onnx.next()) {
        (Some((name, path)), None) => Ok((name, path)),
        _ => Err(Error::InvalidModel {
            name: files.keys().cloned().collect::<Vec<_>>().join(", "),
            why: "an ONNX version has exactly one .onnx file".into(),
        }),
    }
}

fn backend_error(e: ::ort::Error) -> Error {
    Error::Backend { backend: NAME, message: first_line(&e.to_string()) }
}

impl Backend for OnnxRuntime {
    fn name(&self) -> &'static str {
        NAME
    }

    fn format(&self) -> &'static str {
        "onnx"
    }

    fn handles(&self, names: &[&str]) -> bool {
        names.iter().filter(|name| name.ends_with(".onnx")).count() == 1
    }

    fn inspect(&self, files: &Files) -> Result<(Signature, Details)> {
        let (name, path) = model_file(files)?;
        // ONNX Runtime names the temp file it read; the user knows it by its name.
        let invalid = |e: ::ort::Error| Error::InvalidModel {
            name: name.to_string(),
            why: first_line(&e.to_string()).replace(&*path.to_string_lossy(), name),
        };
        // Only the signature is wanted: no graph optimizations, so that a
        // tiny model that folds into a huge constant (ConstantOfShape) costs
        // an import nothing; a load pays for it, and is measured.
        let session = self
            .session_builder()
            .and_then(|b| {
                b.with_optimization_level(::ort::session::builder::GraphOptimizationLevel::Disable).map_err(Into::into)
            })
            .map_err(backend_error)?
            .commit_from_file(path)
            .map_err(invalid)?;
        let specs = |outlets: &[::ort::value::Outlet]| -> Vec<TensorSpec> {
            outlets
                .iter()
                .map(|o| {
                    let dim_names = match o.dtype() {
                        ::ort::value::ValueType::Tensor { dimension_symbols, .. } => dimension_symbols.to_vec(),
                        _ => Vec::new(),
                    };
                    TensorSpec {
                        name: o.name().to_string(),
                        dtype: o.dtype().tensor_type().map_or(DType::Other, dtype_of),
                        shape: o.dtype().tensor_shape().map(|s| s.to_vec()).unwrap_or_default(),
                        dim_names,
                    }
                })
                .collect()
        };
        Ok((
            Signature { inputs: specs(session.inputs()), outputs: specs(session.outputs()), generates: false },
            Details::new(),
        ))
    }

    fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name(),
            "format": self.format(),
            "library": self.library,
        })
    }

    fn load(&self, files: &Files, target: Target) -> Result<Box<dyn Instance>> {
        let (name, path) = model_file(files)?;
        // On a GPU the CUDA provider must register (it needs the GPU build
        // of the library); no silent fallback to the CPU.
        let providers = match target {
            Target::Cpu => vec![],
            Target::Cuda(ordinal) => {
                vec![::ort::ep::CUDA::default().with_device_id(ordinal as i32).build().error_on_failure()]
            }
        };
        let session = self
            .session_builder()
            .and_then(|b| b.with_execution_providers(providers).map_err(Into::into))
            .and_then(|mut b| b.commit_from_file(path))
            .map_err(|e| Error::Backend {
                backend: NAME,
                message: format!(
                    "loading {name}: {}",
                    first_line(&e.to_string()).replace(&*path.to_string_lossy(), name)
                ),
            })?;
        Ok(Box::new(OnnxInstance { session }))
    }
}

struct OnnxInstance {
    session: ::ort::session::Session,
}

impl Instance for OnnxInstance {
    fn run(&mut self, inputs: Vec<Tensor>, stop: &Stop) -> Result<Vec<Tensor>> {
        let mut values: Vec<(String, ::ort::session::SessionInputValue)> = Vec::with_capacity(inputs.len());
        for t in inputs {
            let value: ::ort::value::DynValue = match t.data {
                Data::String(v) => {
                    ::ort::value::Tensor::from_string_array((t.shape, &v[..])).map_err(backend_error)?.into_dyn()
                }
                numbers => with_data!(numbers, v => ::ort::value::Tensor::from_array((t.shape, v))
                    .map_err(backend_error)?
                    .into_dyn()),
            };
            values.push((t.name, value.into()));
        }
        // Stopping sets the run's terminate flag: ONNX Runtime checks it
        // between nodes and returns an error.
        let options = Arc::new(::ort::session::RunOptions::new().map_err(backend_error)?);
        let terminate = options.clone();
        stop.on_stop(move || {
            let _ = terminate.terminate();
        });
        let outputs = self.session.run_with_options(values, &*options).map_err(backend_error)?;
        outputs.iter().map(|(name, value)| output_tensor(name, &value)).collect()
    }
}

fn output_tensor(name: &str, value: &::ort::value::DynValueRef<'_>) -> Result<Tensor> {
    use ::ort::value::TensorElementType as T;
    let runtime = |e: ::ort::Error| Error::Backend {
        backend: NAME,
        message: format!("output {name:?}: {}", first_line(&e.to_string())),
    };
    macro_rules! extract {
        ($variant:ident, $t:ty) => {{
            let (shape, data) = value.try_extract_tensor::<$t>().map_err(runtime)?;
            (shape.iter().map(|&d| d as usize).collect(), Data::$variant(data.to_vec()))
        }};
    }
    let (shape, data): (Vec<usize>, Data) = match value.dtype().tensor_type() {
        Some(T::Bool) => extract!(Bool, bool),
        Some(T::Uint8) => extract!(Uint8, u8),
        Some(T::Int8) => extract!(Int8, i8),
        Some(T::Uint16) => extract!(Uint16, u16),
        Some(T::Int16) => extract!(Int16, i16),
        Some(T::Uint32) => extract!(Uint32, u32),
        Some(T::Int32) => extract!(Int32, i32),
        Some(T::Uint64) => extract!(Uint64, u64),
        Some(T::Int64) => extract!(Int64, i64),
        Some(T::Float16) => extract!(Float16, half::f16),
        Some(T::Float32) => extract!(Float32, f32),
        Some(T::Float64) => extract!(Float64, f64),
        other => {
            return Err(Error::Backend {
                backend: NAME,
                message: format!("output {name:?}: element type {other:?} is not supported"),
            })
        }
    };
    Tensor::new(name, shape, data)
}

fn dtype_of(t: ::ort::value::TensorElementType) -> DType {
    use ::ort::value::TensorElementType as T;
    match t {
        T::Bool => DType::Bool,
        T::Uint8 => DType::Uint8,
        T::Int8 => DType::Int8,
        T::Uint16 => DType::Uint16,
        T::Int16 => DType::Int16,
        T::Uint32 => DType::Uint32,
        T::Int32 => DType::Int32,
        T::Uint64 => DType::Uint64,
        T::Int64 => DType::Int64,
        T::Float16 => DType::Float16,
        T::Bfloat16 => DType::Bfloat16,
        T::Float32 => DType::Float32,
        T::Float64 => DType::Float64,
        T::String => DType::String,
        _ => DType::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_not_a_panic() {
        let err = find_onnxruntime(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
    }
}
