//! Request metrics per model version: counters, latency histograms for
//! `/metrics` (Prometheus text format), and recent samples for the exact
//! p50/p99 in `models/<name>/<version>/stats`.
//!
//! Metric names live here as constants. `requests` counts every request
//! submitted (accepted or rejected); `failures` those that ended `failed`.
//! The exposition is rendered by hand from this state on each read (the
//! text format is small and stable; a registry crate would keep a second
//! copy of the same numbers).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write;
use std::sync::Mutex;

pub const REQUESTS: &str = "aifs_requests_total";
pub const FAILURES: &str = "aifs_request_failures_total";
pub const BATCHES: &str = "aifs_batches_total";
pub const QUEUE_SECONDS: &str = "aifs_queue_seconds";
pub const COMPUTE_SECONDS: &str = "aifs_compute_seconds";
pub const BATCH_SIZE: &str = "aifs_batch_size";
pub const QUEUE_DEPTH: &str = "aifs_queue_depth";
pub const RUNNING: &str = "aifs_running";
pub const DEVICE_UTIL: &str = "aifs_device_utilization_percent";
pub const DEVICE_MEMORY_USED: &str = "aifs_device_memory_used_bytes";
pub const DEVICE_MEMORY_TOTAL: &str = "aifs_device_memory_total_bytes";

/// Seconds.
const LATENCY_BUCKETS: [f64; 14] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];
const BATCH_BUCKETS: [f64; 7] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];
/// Samples kept for the quantiles in `stats`.
const RECENT: usize = 1024;

#[derive(Clone, Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        for (i, b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Clone, Debug, Default)]
struct VersionStats {
    requests: u64,
    failures: u64,
    batches: u64,
    queue: Histogram,
    compute: Histogram,
    batch_size: Histogram,
    recent_queue_us: VecDeque<u64>,
    recent_compute_us: VecDeque<u64>,
}

/// A device's live numbers, for `/metrics`.
pub struct DeviceSample {
    pub id: String,
    pub queue: usize,
    pub running: usize,
    pub util: u8,
    pub memory_used: u64,
    pub memory_total: u64,
}

/// A metric family rendered from one number per item: name, help, the number.
type Column<T> = (&'static str, &'static str, fn(&T) -> u64);
/// A histogram family: name, help, the histogram, its bucket bounds.
type HistogramColumn = (&'static str, &'static str, fn(&VersionStats) -> &Histogram, &'static [f64]);

#[derive(Default)]
pub struct Metrics {
    versions: Mutex<BTreeMap<(String, u32), VersionStats>>,
}

impl Metrics {
    fn with(&self, model: &str, version: u32, f: impl FnOnce(&mut VersionStats)) {
        let mut versions = self.versions.lock().unwrap();
        f(versions.entry((model.to_string(), version)).or_default());
    }

    pub fn request(&self, model: &str, version: u32) {
        self.with(model, version, |s| s.requests += 1);
    }

    pub fn failure(&self, model: &str, version: u32) {
        self.with(model, version, |s| s.failures += 1);
    }

    /// One run of `size` requests.
    pub fn batch(&self, model: &str, version: u32, size: usize) {
        self.with(model, version, |s| {
            s.batches += 1;
            s.batch_size.observe(&BATCH_BUCKETS, size as f64);
        });
    }

    /// One request's time queued and computing.
    pub fn latency(&self, model: &str, version: u32, queue_us: u64, compute_us: u64) {
        self.with(model, version, |s| {
            s.queue.observe(&LATENCY_BUCKETS, queue_us as f64 / 1e6);
            s.compute.observe(&LATENCY_BUCKETS, compute_us as f64 / 1e6);
            for (ring, v) in [(&mut s.recent_queue_us, queue_us), (&mut s.recent_compute_us, compute_us)] {
                if ring.len() == RECENT {
                    ring.pop_front();
                }
                ring.push_back(v);
            }
        });
    }

    /// `models/<name>/<version>/stats`.
    pub fn stats_json(&self, model: &str, version: u32) -> serde_json::Value {
        let versions = self.versions.lock().unwrap();
        let s = versions.get(&(model.to_string(), version)).cloned().unwrap_or_default();
        let quantiles = |ring: &VecDeque<u64>| {
            let mut v: Vec<u64> = ring.iter().copied().collect();
            v.sort_unstable();
            let q = |p: f64| v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied();
            serde_json::json!({ "p50": q(0.5), "p99": q(0.99) })
        };
        serde_json::json!({
            "requests": s.requests,
            "failures": s.failures,
            "batches": s.batches,
            "queue_us": quantiles(&s.recent_queue_us),
            "compute_us": quantiles(&s.recent_compute_us),
            "samples": s.recent_queue_us.len(),
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self, devices: &[DeviceSample]) -> String {
        let versions = self.versions.lock().unwrap().clone();
        let mut out = String::new();
        let label = |m: &str, v: u32| format!("model=\"{}\",version=\"{v}\"", escape(m));
        let mut family = |name: &str, kind: &str, help: &str, body: &dyn Fn(&mut String)| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            body(&mut out);
        };
        let counters: [Column<VersionStats>; 3] = [
            (REQUESTS, "Requests submitted (accepted or rejected).", |s| s.requests),
            (FAILURES, "Requests that ended failed.", |s| s.failures),
            (BATCHES, "Model runs (each runs one batch of requests).", |s| s.batches),
        ];
        for (name, help, pick) in counters {
            family(name, "counter", help, &|o| {
                for ((m, v), s) in &versions {
                    let _ = writeln!(o, "{name}{{{}}} {}", label(m, *v), pick(s));
                }
            });
        }
        let histograms: [HistogramColumn; 3] = [
            (QUEUE_SECONDS, "Time requests waited in the queue.", |s| &s.queue, &LATENCY_BUCKETS),
            (COMPUTE_SECONDS, "Time requests took to run.", |s| &s.compute, &LATENCY_BUCKETS),
            (BATCH_SIZE, "Requests per run.", |s| &s.batch_size, &BATCH_BUCKETS),
        ];
        for (name, help, pick, bounds) in histograms {
            family(name, "histogram", help, &|o| {
                for ((m, v), s) in &versions {
                    pick(s).render(o, name, &label(m, *v), bounds);
                }
            });
        }
        let gauges: [Column<DeviceSample>; 5] = [
            (QUEUE_DEPTH, "Jobs queued on the device.", |d| d.queue as u64),
            (RUNNING, "Jobs running on the device.", |d| d.running as u64),
            (DEVICE_UTIL, "Device utilization over the last second.", |d| d.util as u64),
            (DEVICE_MEMORY_USED, "Device memory in use.", |d| d.memory_used),
            (DEVICE_MEMORY_TOTAL, "Device memory.", |d| d.memory_total),
        ];
        for (name, help, pick) in gauges {
            family(name, "gauge", help, &|o| {
                for d in devices {
                    let _ = writeln!(o, "{name}{{device=\"{}\"}} {}", escape(&d.id), pick(d));
                }
            });
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.request("m", 1);
        m.request("m", 1);
        m.failure("m", 1);
        m.batch("m", 1, 2);
        m.latency("m", 1, 100, 2000);
        let text = m.render(&[DeviceSample {
            id: "cpu".into(),
            queue: 3,
            running: 1,
            util: 50,
            memory_used: 1,
            memory_total: 2,
        }]);
        assert!(text.contains("aifs_requests_total{model=\"m\",version=\"1\"} 2\n"), "{text}");
        assert!(text.contains("aifs_request_failures_total{model=\"m\",version=\"1\"} 1\n"));
        assert!(text.contains("aifs_compute_seconds_bucket{model=\"m\",version=\"1\",le=\"0.0025\"} 1\n"));
        assert!(text.contains("aifs_compute_seconds_bucket{model=\"m\",version=\"1\",le=\"0.001\"} 0\n"));
        assert!(text.contains("aifs_batch_size_count{model=\"m\",version=\"1\"} 1\n"));
        assert!(text.contains("aifs_queue_depth{device=\"cpu\"} 3\n"));
        let stats = m.stats_json("m", 1);
        assert_eq!(stats["compute_us"]["p50"], 2000);
        assert_eq!(stats["requests"], 2);
        assert_eq!(m.stats_json("other", 1)["requests"], 0);
    }
}
