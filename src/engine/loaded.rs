//! Loaded models: each version loaded on a device is a [`Resident`] with a
//! [`Pool`] of backend instances; loading makes room by evicting the least
//! recently used idle models; every load verifies the blobs first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::backend::Instance;
use crate::error::Result;
use crate::sched;
use crate::store::{Digest, Version};

use super::job::Job;
use super::queue::Sched;
use super::Shared;

/// The idle instances of one loaded version. How many exist at once is
/// bounded by the scheduler, not here: a job is taken off its queue only
/// when its version's [`Resident`] has a free instance, so taking one
/// never waits.
#[derive(Default)]
pub(super) struct Pool {
    pub(super) idle: Mutex<Vec<Box<dyn Instance>>>,
    /// The most memory one instance took, as measured ([`Pool::measured`]).
    measured: AtomicU64,
    /// Generations of this version alive (between their turns too), and
    /// the memory their KV caches may take: the model is in use while
    /// any lives, and their caches count in the device's budget.
    generations: AtomicU64,
    kv_bytes: AtomicU64,
}

impl Pool {
    /// An idle instance, or a new one from `load`.
    pub(super) fn acquire(&self, load: impl FnOnce() -> Result<Box<dyn Instance>>) -> Result<Box<dyn Instance>> {
        let idle = self.idle.lock().unwrap().pop();
        idle.map_or_else(load, Ok)
    }

    pub(super) fn release(&self, instance: Box<dyn Instance>) {
        self.idle.lock().unwrap().push(instance);
    }

    /// What loading an instance and its first run added to the daemon's
    /// resident memory: a model's size in memory, which its file size can
    /// be far from (a 200-byte graph can fold into gigabytes).
    pub(super) fn note_measured(&self, bytes: u64) {
        self.measured.fetch_max(bytes, Ordering::Relaxed);
    }

    pub(super) fn measured(&self) -> u64 {
        self.measured.load(Ordering::Relaxed)
    }

    /// A generation began, its KV cache taking up to `kv_bytes`.
    pub(super) fn generation_began(&self, kv_bytes: u64) {
        self.generations.fetch_add(1, Ordering::Relaxed);
        self.kv_bytes.fetch_add(kv_bytes, Ordering::Relaxed);
    }

    pub(super) fn generation_ended(&self, kv_bytes: u64) {
        self.generations.fetch_sub(1, Ordering::Relaxed);
        self.kv_bytes.fetch_sub(kv_bytes, Ordering::Relaxed);
    }

    /// Drops idle instances past `max` (the model's `instances` was
    /// lowered).
    pub(super) fn keep(&self, max: usize) {
        self.idle.lock().unwrap().truncate(max);
    }
}

/// A version loaded on a device.
pub(super) struct Resident {
    pub(super) model: String,
    pub(super) version: u32,
    pub(super) bytes: u64,
    pub(super) pool: Arc<Pool>,
    /// Runs using an instance now.
    pub(super) busy: usize,
    /// The most instances at once (the model's `instances`, or one per
    /// worker of the device).
    pub(super) instances: usize,
    pub(super) last_used: Instant,
    pub(super) keep_alive: Duration,
}

impl Resident {
    pub(super) fn has_free_instance(&self) -> bool {
        self.busy < self.instances
    }

    /// Runs using it, and generations alive: it is not unloaded while any.
    pub(super) fn in_use(&self) -> usize {
        self.busy + self.pool.generations.load(Ordering::Relaxed) as usize
    }

    /// Bytes it holds for eviction and placement: its files' size until a
    /// load has been measured, then what loading took; and the KV caches
    /// of its generations.
    pub(super) fn held_bytes(&self) -> u64 {
        self.bytes.max(self.pool.measured()).saturating_add(self.pool.kv_bytes.load(Ordering::Relaxed))
    }
}

/// The daemon's resident memory, in bytes (`/proc/self/statm`).
pub(super) fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no memory effects.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    pages * page
}

impl Shared {
    /// The pool of the lead job's version on device `d`, loading it (after
    /// unloading least recently used idle models if the budget needs it),
    /// with the model's `instances` and `keep_alive_s` as `config.json`
    /// says now. Returns the unloaded models too, to be dropped without the
    /// lock.
    pub(super) fn make_resident(&self, s: &mut Sched, d: usize, lead: &Job) -> (Arc<Pool>, Vec<Resident>) {
        let device = &self.devices[d];
        let config = self.store.model(&lead.model).map_or_else(|_| lead.inner().config.clone(), |m| m.config.clone());
        let backend = lead.inner().version.as_ref().and_then(|v| self.backends.get(&v.backend).ok());
        let instances = match config.instances {
            0 => backend.and_then(|b| b.default_instances()).unwrap_or_else(|| self.workers(d)),
            n => n as usize,
        };
        let keep_alive = Duration::from_secs(config.keep_alive_s);
        let file_bytes = lead.inner().version.as_ref().map_or(0, |v| v.size);
        let unloaded = self.make_room(s, d, &lead.digest, file_bytes);
        let dq = &mut s.devices[d];
        if let std::collections::hash_map::Entry::Vacant(slot) = dq.resident.entry(lead.digest) {
            let bytes = file_bytes;
            slot.insert(Resident {
                model: lead.model.clone(),
                version: lead.version,
                bytes,
                pool: Arc::default(),
                busy: 0,
                instances,
                last_used: Instant::now(),
                keep_alive,
            });
        }
        device.note_loaded_bytes(dq.resident.values().map(Resident::held_bytes).sum());
        let r = dq.resident.get_mut(&lead.digest).expect("inserted above");
        r.instances = instances;
        r.keep_alive = keep_alive;
        r.pool.keep(instances);
        r.busy += 1;
        (r.pool.clone(), unloaded)
    }

    /// Unloads the least recently used idle models of device `d` until the
    /// version `keep` fits its budget: at its measured size once it has
    /// been loaded, else at `file_bytes`. Called before a load and again
    /// after it, when the load may have shown a model far bigger than its
    /// files. Returns what it unloaded, to be dropped without the lock
    /// where the caller can.
    pub(super) fn make_room(&self, s: &mut Sched, d: usize, keep: &Digest, file_bytes: u64) -> Vec<Resident> {
        let device = &self.devices[d];
        let dq = &mut s.devices[d];
        let need = dq.resident.get(keep).map_or(file_bytes, Resident::held_bytes);
        let others: Vec<sched::Resident<Digest>> = dq
            .resident
            .iter()
            .filter(|(k, _)| *k != keep)
            .map(|(k, r)| sched::Resident { key: *k, bytes: r.held_bytes(), busy: r.in_use(), last_used: r.last_used })
            .collect();
        let mut unloaded = Vec::new();
        for key in sched::evictions(&others, device.memory_budget(), need) {
            let r = dq.resident.remove(&key).expect("listed above");
            tracing::info!(device = device.id(), model = %r.model, version = r.version, "unloaded to make room");
            unloaded.push(r);
        }
        device.note_loaded_bytes(dq.resident.values().map(Resident::held_bytes).sum());
        unloaded
    }

    /// Verifies the version's blobs (streamed from disk) and loads them
    /// with the backend the version was imported with. What the load added to the daemon's resident memory is noted in
    /// `pool`: the model's size for eviction from then on.
    pub(super) fn load(&self, version: &Version, d: usize, pool: &Pool) -> Result<Box<dyn Instance>> {
        let staged = self.store.stage(version)?;
        let device = &self.devices[d];
        let before = resident_bytes();
        let instance = self.backends.get(&version.backend)?.load(staged.files(), device.target())?;
        let after = resident_bytes();
        pool.note_measured(after.saturating_sub(before));
        tracing::info!(device = device.id(), version = %version.digest, "loaded an instance");
        Ok(instance)
    }
}
