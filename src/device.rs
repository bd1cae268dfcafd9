//! Compute devices as `devices/<id>/` directories.
//!
//! Each device is a [`Probe`]: it owns its sampling and answers with a
//! [`Reading`] of plain numbers, rendered one value per file (the sysfs
//! rule). Three kinds:
//!
//! - [`Cpu`] reads `/proc`; utilization is the busy share of all CPU time
//!   over the last second, sampled by a background thread so that a `cat`
//!   never waits a second.
//! - [`Nvidia`] GPUs: found through the CUDA driver API (cudarc, loaded at
//!   run time; nothing is called unless `libcuda` is present, since cudarc
//!   panics without it) for name and memory, and NVML for utilization,
//!   temperature, power and memory in use. No driver: no GPUs, no error.
//! - [`Simulated`] GPUs, for tests and demos on machines without one: a
//!   memory budget and a per-run delay, running on the CPU. The engine
//!   reports the bytes of models it holds as its memory in use.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// One sample of a device's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reading {
    pub name: String,
    /// Percent 0–100 averaged over the last second.
    pub util: u8,
    pub memory_total: u64,
    pub memory_used: u64,
    /// Degrees Celsius (GPUs).
    pub temperature: Option<u32>,
    /// Watts (GPUs).
    pub power: Option<u32>,
}

impl Reading {
    /// The files of `devices/<id>/` this reading fills, each one value.
    pub fn files(&self) -> Vec<(&'static str, String)> {
        let mut files = vec![
            ("name", self.name.clone()),
            ("util", self.util.to_string()),
            ("memory.total", self.memory_total.to_string()),
            ("memory.used", self.memory_used.to_string()),
        ];
        files.extend(self.temperature.map(|t| ("temperature", t.to_string())));
        files.extend(self.power.map(|p| ("power", p.to_string())));
        files
    }
}

/// Where a backend runs a model loaded for this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu,
    /// A CUDA device by ordinal.
    Cuda(u32),
}

pub trait Probe: Send + Sync {
    /// Directory name: `cpu`, `gpu0`, ...
    fn id(&self) -> &str;
    fn read(&self) -> Reading;
    fn is_gpu(&self) -> bool;
    fn target(&self) -> Target;
    /// Bytes of models it may hold at once.
    fn memory_budget(&self) -> u64;
    /// Threads that run jobs on it; `None`: one per core (the CPU).
    fn workers(&self) -> Option<usize> {
        Some(1)
    }
    /// Extra time each run takes (a simulated device's speed).
    fn run_delay(&self) -> Duration {
        Duration::ZERO
    }
    /// Told the bytes of the models loaded on it (the simulated device
    /// reports them as memory in use).
    fn note_loaded_bytes(&self, _bytes: u64) {}
}

/// The host CPU, from `/proc/cpuinfo`, `/proc/stat` and `/proc/meminfo`.
pub struct Cpu {
    name: String,
    util: Arc<AtomicU8>,
    /// Half the machine's memory (fixed at start: placement asks per request).
    budget: u64,
}

impl Cpu {
    /// Starts the once-a-second utilization sampler, which stops when the
    /// `Cpu` is dropped.
    pub fn new() -> Cpu {
        let name = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| parse_cpu_name(&s))
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let util = Arc::new(AtomicU8::new(0));
        let weak = Arc::downgrade(&util);
        std::thread::Builder::new()
            .name("cpu-util".into())
            .spawn(move || sample_util(weak))
            .expect("spawning the cpu sampler");
        let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| parse_meminfo(&s)).map_or(0, |(t, _)| t);
        Cpu { name, util, budget: total / 2 }
    }
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu::new()
    }
}

fn sample_util(util: Weak<AtomicU8>) {
    let read = || std::fs::read_to_string("/proc/stat").ok().and_then(|s| parse_proc_stat(&s));
    let mut last = read();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(util) = util.upgrade() else { return };
        let now = read();
        if let (Some(a), Some(b)) = (last, now) {
            util.store(percent_busy(a, b), Ordering::Relaxed);
        }
        last = now;
    }
}

impl Probe for Cpu {
    fn id(&self) -> &str {
        "cpu"
    }

    fn read(&self) -> Reading {
        let (total, available) =
            std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| parse_meminfo(&s)).unwrap_or((0, 0));
        Reading {
            name: self.name.clone(),
            util: self.util.load(Ordering::Relaxed),
            memory_total: total,
            memory_used: total.saturating_sub(available),
            temperature: None,
            power: None,
        }
    }

    fn is_gpu(&self) -> bool {
        false
    }

    fn target(&self) -> Target {
        Target::Cpu
    }

    fn workers(&self) -> Option<usize> {
        None
    }

    /// Half the machine's memory: the rest is for the system and requests.
    fn memory_budget(&self) -> u64 {
        self.budget
    }
}

/// A GPU that is not there: a memory budget and a speed, running on the CPU.
pub struct Simulated {
    id: String,
    memory: u64,
    delay: Duration,
    workers: usize,
    loaded: AtomicU64,
}

impl Simulated {
    pub fn new(ordinal: usize, memory: u64, delay: Duration, workers: usize) -> Simulated {
        Simulated { id: format!("gpu{ordinal}"), memory, delay, workers: workers.max(1), loaded: AtomicU64::new(0) }
    }

    /// Parses `--simulate-gpu MEMORY[,DELAY_MS[,WORKERS]]`, e.g. `64M` or `1G,5,2`.
    pub fn parse(ordinal: usize, spec: &str) -> Result<Simulated, String> {
        let mut parts = spec.split(',');
        let memory = parts.next().unwrap_or_default();
        let memory =
            parse_bytes(memory).ok_or_else(|| format!("simulated GPU memory {memory:?}: expected e.g. 512M or 2G"))?;
        let number = |what: &str, default: u64, part: Option<&str>| {
            part.map_or(Ok(default), |p| {
                p.parse().map_err(|_| format!("simulated GPU {what} {p:?}: expected a number"))
            })
        };
        let delay = number("delay (ms)", 0, parts.next())?;
        let workers = number("workers", 1, parts.next())?;
        if parts.next().is_some() {
            return Err(format!("simulated GPU {spec:?}: expected MEMORY[,DELAY_MS[,WORKERS]]"));
        }
        Ok(Simulated::new(ordinal, memory, Duration::from_millis(delay), workers as usize))
    }
}

fn parse_bytes(s: &str) -> Option<u64> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

impl Probe for Simulated {
    fn id(&self) -> &str {
        &self.id
    }

    fn read(&self) -> Reading {
        Reading {
            name: "Simulated GPU".into(),
            util: 0,
            memory_total: self.memory,
            memory_used: self.loaded.load(Ordering::Relaxed),
            temperature: Some(40),
            power: Some(0),
        }
    }

    fn is_gpu(&self) -> bool {
        true
    }

    fn target(&self) -> Target {
        Target::Cpu
    }

    fn memory_budget(&self) -> u64 {
        self.memory
    }

    fn run_delay(&self) -> Duration {
        self.delay
    }

    fn workers(&self) -> Option<usize> {
        Some(self.workers)
    }

    fn note_loaded_bytes(&self, bytes: u64) {
        self.loaded.store(bytes, Ordering::Relaxed);
    }
}

/// An NVIDIA GPU: name and total memory from the CUDA driver, the rest from
/// NVML (when NVML is there; otherwise those values read 0).
pub struct Nvidia {
    id: String,
    ordinal: u32,
    name: String,
    memory: u64,
    nvml: Option<Arc<nvml_wrapper::Nvml>>,
}

impl Nvidia {
    /// Every NVIDIA GPU the driver reports; none (and no error) without a
    /// driver. The reason none were found is logged at DEBUG.
    pub fn discover() -> Vec<Nvidia> {
        match Nvidia::try_discover() {
            Ok(gpus) => gpus,
            Err(why) => {
                tracing::debug!("no NVIDIA GPU: {why}");
                Vec::new()
            }
        }
    }

    fn try_discover() -> Result<Vec<Nvidia>, String> {
        use cudarc::driver::result as cu;
        // SAFETY: only probes for the library; cudarc's calls panic without it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("libcuda is not present".into());
        }
        cu::init().map_err(|e| format!("cuInit: {e}"))?;
        let count = cu::device::get_count().map_err(|e| format!("cuDeviceGetCount: {e}"))?;
        let nvml = nvml_wrapper::Nvml::init().map(Arc::new).map_err(|e| tracing::warn!("NVML: {e}")).ok();
        (0..count)
            .map(|i| {
                let dev = cu::device::get(i).map_err(|e| format!("cuDeviceGet({i}): {e}"))?;
                let name = cu::device::get_name(dev).map_err(|e| format!("cuDeviceGetName({i}): {e}"))?;
                // SAFETY: `dev` came from cuDeviceGet.
                let memory =
                    unsafe { cu::device::total_mem(dev) }.map_err(|e| format!("cuDeviceTotalMem({i}): {e}"))?;
                Ok(Nvidia { id: format!("gpu{i}"), ordinal: i as u32, name, memory: memory as u64, nvml: nvml.clone() })
            })
            .collect()
    }
}

impl Probe for Nvidia {
    fn id(&self) -> &str {
        &self.id
    }

    fn read(&self) -> Reading {
        let device = self.nvml.as_ref().and_then(|n| n.device_by_index(self.ordinal).ok());
        let nv = |f: &dyn Fn(&nvml_wrapper::Device) -> Option<u64>| device.as_ref().and_then(f);
        Reading {
            name: self.name.clone(),
            util: nv(&|d| d.utilization_rates().ok().map(|u| u.gpu as u64)).unwrap_or(0) as u8,
            memory_total: self.memory,
            memory_used: nv(&|d| d.memory_info().ok().map(|m| m.used)).unwrap_or(0),
            temperature: Some(
                nv(&|d| d.temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu).ok().map(u64::from))
                    .unwrap_or(0) as u32,
            ),
            power: Some((nv(&|d| d.power_usage().ok().map(u64::from)).unwrap_or(0) / 1000) as u32),
        }
    }

    fn is_gpu(&self) -> bool {
        true
    }

    fn target(&self) -> Target {
        Target::Cuda(self.ordinal)
    }

    /// 90% of the card: the rest is for the runtime's own buffers.
    fn memory_budget(&self) -> u64 {
        self.memory / 10 * 9
    }
}

fn parse_cpu_name(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// (busy, total) jiffies from the aggregate `cpu` line of `/proc/stat`.
/// Idle time is `idle + iowait`.
fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line.split_whitespace().skip(1).map_while(|f| f.parse().ok()).collect();
    if fields.len() < 4 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields[3] + fields.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn percent_busy((busy0, total0): (u64, u64), (busy1, total1): (u64, u64)) -> u8 {
    let total = total1.saturating_sub(total0);
    if total == 0 {
        return 0;
    }
    let busy = busy1.saturating_sub(busy0).min(total);
    ((busy * 100 + total / 2) / total) as u8
}

/// (MemTotal, MemAvailable) in bytes.
fn parse_meminfo(meminfo: &str) -> Option<(u64, u64)> {
    let field = |key: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(key))?;
        let kib: u64 = line[key.len()..].trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_stat_busy_share() {
        let a = parse_proc_stat("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        assert_eq!(a, (200, 1000));
        let b = parse_proc_stat("cpu  250 0 150 750 150 0 0 0 0 0\n").unwrap();
        assert_eq!(percent_busy(a, b), 67); // 200 busy of 300
        assert_eq!(percent_busy(a, a), 0);
        assert_eq!(parse_proc_stat("intr 1 2 3\n"), None);
    }

    #[test]
    fn meminfo_in_bytes() {
        let text = "MemTotal:       24576000 kB\nMemFree:  1 kB\nMemAvailable:   20480000 kB\n";
        assert_eq!(parse_meminfo(text), Some((24576000 * 1024, 20480000 * 1024)));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn cpu_name_from_cpuinfo() {
        let text = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: x\n";
        assert_eq!(parse_cpu_name(text).as_deref(), Some("AMD EPYC 7B13"));
    }

    #[test]
    fn the_real_cpu_reads_sane_values() {
        let r = Cpu::new().read();
        assert!(r.memory_total > 0 && r.memory_used <= r.memory_total, "{r:?}");
        assert!(r.util <= 100);
        assert!(!r.name.is_empty());
    }

    #[test]
    fn simulated_gpu_spec() {
        let g = Simulated::parse(0, "64M,5").unwrap();
        assert_eq!((g.id(), g.memory_budget(), g.run_delay()), ("gpu0", 64 << 20, Duration::from_millis(5)));
        assert_eq!(Simulated::parse(1, "2G").unwrap().memory_budget(), 2 << 30);
        assert_eq!(Simulated::parse(1, "2G,0,3").unwrap().workers(), Some(3));
        assert!(Simulated::parse(1, "2G,0,3,4").is_err());
        assert!(Simulated::parse(0, "lots").is_err());
        assert!(Simulated::parse(0, "1M,fast").is_err());
        g.note_loaded_bytes(10);
        assert_eq!(g.read().memory_used, 10);
        assert_eq!(g.read().files().len(), 6);
    }

    #[test]
    fn no_driver_means_no_gpus_and_no_error() {
        // On machines without libcuda this is empty; with one, each GPU reads.
        for gpu in Nvidia::discover() {
            assert!(gpu.read().memory_total > 0);
        }
    }
}
