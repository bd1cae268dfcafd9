//! Compute devices as `devices/<id>/` directories.
//!
//! Each device is a [`Probe`]: it owns its sampling and answers with a
//! [`Reading`] of plain numbers, rendered one value per file (the sysfs
//! rule). [`Cpu`] reads `/proc`; utilization is the busy share of all CPU
//! time over the last second, sampled by a background thread so that a
//! `cat` never waits a second.

use std::sync::atomic::{AtomicU8, Ordering};
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
}

impl Reading {
    /// The files of `devices/<id>/`, in listing order, each one value.
    pub fn files(&self) -> [(&'static str, String); 4] {
        [
            ("name", self.name.clone()),
            ("util", self.util.to_string()),
            ("memory.total", self.memory_total.to_string()),
            ("memory.used", self.memory_used.to_string()),
        ]
    }
}

pub const DEVICE_FILES: [&str; 4] = ["name", "util", "memory.total", "memory.used"];

pub trait Probe: Send + Sync {
    /// Directory name: `cpu`, `gpu0`, ...
    fn id(&self) -> &str;
    fn read(&self) -> Reading;
}

/// The host CPU, from `/proc/cpuinfo`, `/proc/stat` and `/proc/meminfo`.
pub struct Cpu {
    name: String,
    util: Arc<AtomicU8>,
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
        Cpu { name, util }
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
        }
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
}
