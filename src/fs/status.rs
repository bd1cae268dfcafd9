//! The daemon's own files: `status` (facts as JSON) and `README` (help
//! whose examples work by copy-paste on this mount).

use super::Fs;
use crate::engine::Engine;
/// A JSON request of zeros for a signature (free dimensions 1), for the
/// README's examples; `None` for types or sizes that make a poor example.
pub(super) fn example_request(sig: &crate::tensor::Signature) -> Option<String> {
    use crate::tensor::DType;
    let mut inputs = serde_json::Map::new();
    for spec in &sig.inputs {
        let zero = match spec.dtype {
            DType::Bool => serde_json::json!(false),
            DType::Float16 | DType::Float32 | DType::Float64 => serde_json::json!(0.0),
            DType::String | DType::Bfloat16 | DType::Other => return None,
            _ => serde_json::json!(0),
        };
        let dims: Vec<usize> = spec.shape.iter().map(|&d| if d < 0 { 1 } else { d as usize }).collect();
        if dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_none_or(|n| n > 64) {
            return None;
        }
        let value = dims.iter().rev().fold(zero, |inner, &n| serde_json::Value::Array(vec![inner; n]));
        inputs.insert(spec.name.clone(), value);
    }
    Some(serde_json::Value::Object(inputs).to_string())
}

/// Each device's id, name, queue, jobs running and loaded models.
fn devices(engine: &Engine) -> Vec<serde_json::Value> {
    engine
        .devices()
        .iter()
        .map(|d| {
            let state = engine.device_state(d.id());
            serde_json::json!({
                "id": d.id(),
                "name": d.read().name,
                "queue": state.as_ref().map(|s| s.queue),
                "running": state.as_ref().map(|s| s.running),
                "models": state.map(|s| s.models),
            })
        })
        .collect()
}

/// What this node says of itself in the cluster view of a shared store
/// (`/status` `shared.nodes`): its devices, their queues and loaded models.
pub fn node_entry(engine: &Engine) -> serde_json::Value {
    serde_json::json!({ "devices": devices(engine) })
}

impl Fs {
    /// `/status`: daemon facts as JSON.
    pub fn status(&self) -> serde_json::Value {
        let models = self.store.models();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_s": self.started_at.elapsed().as_secs(),
            "mountpoint": self.config.mountpoint,
            "data_dir": self.store.root(),
            "store": {
                "bytes": self.store.size(),
                "blobs": self.store.blobs().len(),
                "models": models.len(),
                "versions": models.iter().map(|m| m.versions.len()).sum::<usize>(),
            },
            "backends": self.backends.describe(),
            // The store shared with other nodes (docs/SCALE.md), if any.
            "shared": self.store.shared().map(|s| s.describe()),
            // Each import in flight: bytes received, then its phase.
            "imports": self.in_flight.lock().unwrap().iter().filter_map(|p| p.upgrade()).map(|p| p.to_json()).collect::<Vec<_>>(),
            // Each generation in flight: its tokens so far, and how fast.
            "generations": self.generations(None),
            "repositories": self.config.repositories.as_ref().map_or(serde_json::json!([]), |r| r.status()),
            "devices": devices(&self.engine),
        })
    }

    /// `/README`, with examples written for this mount point and, where one
    /// exists, a real model in it, so that they work by copy-paste.
    /// `models/<name>/status`: its versions, and its imports in flight
    /// (as in `/status`), so `watch cat models/x/status` follows a `cp`.
    pub(super) fn model_status(&self, model: &str) -> crate::error::Result<serde_json::Value> {
        let m = self.store.model(model)?;
        let prefix = format!("models/{model}/");
        let imports: Vec<serde_json::Value> = self
            .in_flight
            .lock()
            .unwrap()
            .iter()
            .filter_map(|p| p.upgrade())
            .filter(|p| p.path.starts_with(&prefix))
            .map(|p| p.to_json())
            .collect();
        Ok(serde_json::json!({
            "versions": m.versions.keys().collect::<Vec<_>>(),
            "latest": m.latest(),
            "imports": imports,
            "generations": self.generations(Some(model)),
        }))
    }

    /// The generations running (of `model`, or all), for the status files.
    fn generations(&self, model: Option<&str>) -> Vec<serde_json::Value> {
        self.engine
            .generations()
            .into_iter()
            .filter(|(job, _)| model.is_none_or(|m| job.model == m))
            .map(|(job, g)| {
                serde_json::json!({
                    "job": job.id,
                    "model": format!("{}/v{}", job.model, job.version),
                    "prompt_tokens": g.prompt_tokens,
                    "tokens": g.tokens,
                    "max_tokens": g.max_tokens,
                    "tokens_per_s": (g.tokens_per_s * 10.0).round() / 10.0,
                })
            })
            .collect()
    }

    pub(super) fn readme(&self) -> String {
        let mnt = self.config.mountpoint.display();
        // A model already here makes the examples concrete: its file to
        // copy, and a request of zeros shaped for it.
        let sample = self.store.models().into_iter().find_map(|m| {
            let v = m.versions.values().next_back()?.clone();
            let file = v.files.keys().next()?.clone();
            Some((m.name.clone(), v, file))
        });
        let source = match &sample {
            Some((name, v, file)) => format!("cp {mnt}/models/{name}/v{}/{file} /tmp/model.onnx", v.number),
            None => "cp /path/to/your/model.onnx /tmp/model.onnx".to_string(),
        };
        let request =
            sample.as_ref().and_then(|(_, v, _)| example_request(&v.signature)).unwrap_or_else(|| "[[0.0]]".into());
        format!(
            "aifs: AI models as files.

The tree
  README            this help
  status            daemon facts as JSON (version, uptime, store size, backends, devices)
  metrics           Prometheus text: requests, failures, latencies, batch sizes, devices
  models/<name>/    mkdir makes a model; cp a model file into it to make a new version
    config.json     scheduling settings: device, max_batch, batch_delay_us, priority, timeout_ms, ...
    trust           public keys and a policy for signed versions
    status          its versions, and imports in flight (bytes, then phase)
    model.tar       copy a tar of a directory in: one version of many files
    latest -> vN    the newest version (kept by the daemon)
    <alias> -> vN   your symlinks: ln -s v1 stable; ln -sfn v2 stable; rm stable
    vN/             an immutable version: the model file, digest, meta.json, and
      infer         write a request (JSON, KServe v2 JSON, .npy, .npz; text for text models), read the response
      clone         read it: a new job id for this version
      error         why your shell session's last request failed
      stats         requests, failures, batches, latency p50/p99
  devices/<id>/     name, util (percent over the last second), memory.total, memory.used,
                    queue, running, models
  jobs/<id>/        status, model, input, output, error, priority, device, times, ctl
  blobs/            the content-addressed store: sha256-<hex>

Example 1: look around
  ls {mnt}/models/
  cat {mnt}/status
  cat {mnt}/devices/cpu/util

Example 2: import a model as a new version
  {source}
  mkdir {mnt}/models/demo
  cp /tmp/model.onnx {mnt}/models/demo/
  ls {mnt}/models/demo/
  cat {mnt}/models/demo/v1/meta.json
  cat {mnt}/models/demo/latest/digest

Example 3: run it (the request is JSON: inputs by name)
  echo '{request}' > {mnt}/models/demo/latest/infer
  cat {mnt}/models/demo/latest/infer
  id=$(cat {mnt}/models/demo/v1/clone)
  echo '{request}' > {mnt}/jobs/$id/input
  cat {mnt}/jobs/$id/output
  cat {mnt}/jobs/$id/times

Example 4: aliases and removal
  ln -s v1 {mnt}/models/demo/stable
  readlink {mnt}/models/demo/stable
  cat {mnt}/models/demo/stable/digest
  rm {mnt}/models/demo/stable
  rm -r {mnt}/models/demo/v1
  rmdir {mnt}/models/demo

Errors are errnos, with the reason in the job's error file and the daemon
log: EINVAL for a file no backend can load or a request that does not fit
the model, EROFS for writes into a version, EBUSY for removing a version in
use, EAGAIN when a model's queue is full, ETIMEDOUT, ECANCELED.
"
        )
    }
}
