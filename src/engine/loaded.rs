//! Loaded models: each version loaded on a device is a [`Resident`] with a
//! [`Pool`] of backend instances; loading makes room by evicting the least
//! recently used idle models; every load verifies the blobs first.

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
        let instances = if config.instances == 0 { self.workers(d) } else { config.instances as usize };
        let keep_alive = Duration::from_secs(config.keep_alive_s);
        let dq = &mut s.devices[d];
        let mut unloaded = Vec::new();
        if !dq.resident.contains_key(&lead.digest) {
            let bytes = lead.inner().version.as_ref().map_or(0, |v| v.size);
            let resident: Vec<sched::Resident<Digest>> = dq
                .resident
                .iter()
                .map(|(k, r)| sched::Resident { key: *k, bytes: r.bytes, busy: r.busy, last_used: r.last_used })
                .collect();
            for key in sched::evictions(&resident, device.memory_budget(), bytes) {
                let r = dq.resident.remove(&key).expect("listed above");
                tracing::info!(device = device.id(), model = %r.model, version = r.version, "unloaded to make room");
                unloaded.push(r);
            }
            dq.resident.insert(
                lead.digest,
                Resident {
                    model: lead.model.clone(),
                    version: lead.version,
                    bytes,
                    pool: Arc::default(),
                    busy: 0,
                    instances,
                    last_used: Instant::now(),
                    keep_alive,
                },
            );
            device.note_loaded_bytes(dq.resident.values().map(|r| r.bytes).sum());
        }
        let r = dq.resident.get_mut(&lead.digest).expect("inserted above");
        r.instances = instances;
        r.keep_alive = keep_alive;
        r.pool.keep(instances);
        r.busy += 1;
        (r.pool.clone(), unloaded)
    }

    /// Verifies the version's blobs (streamed from disk) and loads them
    /// with the backend the version was imported with.
    pub(super) fn load(&self, version: &Version, d: usize) -> Result<Box<dyn Instance>> {
        let staged = self.store.stage(version)?;
        let device = &self.devices[d];
        let instance = self.backends.get(&version.backend)?.load(staged.files(), device.target())?;
        tracing::info!(device = device.id(), version = %version.digest, "loaded an instance");
        Ok(instance)
    }
}
