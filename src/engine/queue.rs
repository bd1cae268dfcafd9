//! Queues and slots: placing a submitted job on a device's queue, and a
//! worker (or a waiting reader) taking the next job or batch off it, in
//! priority order, only when a slot of the device and an instance of the
//! job's version are free.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::codec;
use crate::error::{Error, Result};
use crate::sched::{self, Queued};
use crate::store::{Digest, Version};
use crate::tensor::Tensor;

use super::job::{Job, Status};
use super::loaded::{Pool, Resident};
use super::Shared;
/// One device's queue and loaded models.
#[derive(Default)]
pub(super) struct DeviceQueue {
    pub(super) entries: Vec<Queued>,
    /// `jobs[i]` is the job of `entries[i]`.
    pub(super) jobs: Vec<Arc<Job>>,
    pub(super) running: usize,
    /// Runs (a batch is one) in progress: at most the device's workers.
    pub(super) slots_busy: usize,
    pub(super) resident: HashMap<Digest, Resident>,
    /// When each user's last job started here: their next job's turn
    /// ([`sched::Clock`]).
    pub(super) last_start: HashMap<u32, Instant>,
}

/// What a worker (or a helping thread) does next.
pub(super) enum Take {
    Run(Taken),
    /// Nothing to run now: wait for a wake-up, or this long for a batch.
    Wait(Option<Duration>),
}

/// Jobs taken off a queue to run together, with their model's pool.
pub(super) struct Taken {
    pub(super) jobs: Vec<Arc<Job>>,
    pub(super) pool: Arc<Pool>,
    /// Models unloaded to make room, dropped without the lock.
    pub(super) unloaded: Vec<Resident>,
}

#[derive(Default)]
pub(super) struct Sched {
    pub(super) devices: Vec<DeviceQueue>,
    /// Queued jobs per model and user: `max_queue` bounds each user's.
    pub(super) queued_per_model: HashMap<String, HashMap<u32, usize>>,
    /// Queued or running jobs per version: batching waits only if > batch.
    pub(super) in_flight: HashMap<Digest, usize>,
    pub(super) running_jobs: HashMap<u64, Arc<Job>>,
    /// Language models' jobs queued between their turns
    /// (`generate.rs`): running, so not counted against `max_queue`.
    pub(super) parked: std::collections::HashSet<u64>,
    /// Runs in progress on threads that submitted them ([`Shared::help`]).
    pub(super) inline_runs: usize,
    pub(super) seq: u64,
    pub(super) shutdown: bool,
}

impl Sched {
    pub(super) fn remove_queued(&mut self, d: usize, i: usize) -> Arc<Job> {
        let dq = &mut self.devices[d];
        dq.entries.remove(i);
        let job = dq.jobs.remove(i);
        // A parked generation is not counted against `max_queue`.
        if !self.parked.remove(&job.id) {
            if let Some(n) = self.queued_per_model.get_mut(&job.model).and_then(|users| users.get_mut(&job.uid)) {
                *n -= 1;
            }
        }
        job
    }

    /// Jobs of `uid` queued for `model`.
    pub(super) fn queued(&self, model: &str, uid: u32) -> usize {
        self.queued_per_model.get(model).and_then(|users| users.get(&uid)).copied().unwrap_or(0)
    }

    pub(super) fn done_in_flight(&mut self, digest: &Digest) {
        if let Some(n) = self.in_flight.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(digest);
            }
        }
    }
}

/// The batch key and rows of a request, if the version can batch it: the
/// model names a batch dimension ([`crate::tensor::Signature::batch_dimension`])
/// and the request's inputs agree on its size.
pub(super) fn batch_key(version: &Version, inputs: &[Tensor]) -> Option<(u64, usize)> {
    version.signature.batch_dimension()?;
    let rows = inputs.first()?.shape.first().copied()?;
    let mut h = DefaultHasher::new();
    version.digest.hash(&mut h);
    for t in inputs {
        let (n, rest) = t.rows()?;
        if n != rows {
            return None;
        }
        (rest, t.dtype()).hash(&mut h);
    }
    Some((h.finish(), rows))
}

impl Shared {
    /// Decodes, checks and places a `new` job, records it, then queues it.
    /// Disk I/O happens before the scheduler lock is taken; the status is
    /// checked again under it, so a job cancelled meanwhile stays cancelled.
    /// Returns the device it is queued on; the caller wakes its workers.
    /// A job `accepted` before (replayed at start) is never refused for a
    /// full queue: its `close()` returned.
    pub(super) fn enqueue(&self, job: &Arc<Job>, input: Vec<u8>, accepted: bool) -> Result<usize> {
        let len = input.len();
        let (input, version, config, priority) = {
            let mut inner = job.inner();
            if inner.state.status != Status::New {
                return Err(Error::Busy(format!("job {}: already submitted", job.id)));
            }
            inner.state.input = Arc::new(input);
            inner.state.submitted = Some(SystemTime::now());
            let version = inner.version.clone().expect("a new job has its version");
            (inner.state.input.clone(), version, inner.config.clone(), inner.state.priority)
        };
        // What the user's jobs hold, this request included, within
        // --max-user-bytes; not for a job accepted before a restart. (The
        // registry is taken with no job lock held: its order is registry,
        // then job.)
        {
            let mut r = self.registry.lock().unwrap();
            let held = r.held(job.uid);
            let limit = self.config.max_user_bytes;
            if !accepted && (held + len) as u64 > limit {
                // Refused, it keeps no input: a flood of refusals holds nothing.
                job.inner().state.input = Arc::new(Vec::new());
                return Err(Error::Quota { uid: job.uid, held: held as u64, limit });
            }
            r.charge(job.uid, len);
            job.charged.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
        }
        let request = if version.signature.generates {
            let prompt = codec::prompt::decode(&input)?;
            codec::Request { codec: codec::Codec::Text, inputs: vec![], id: None, outputs: None, prompt: Some(prompt) }
        } else {
            let mut request = codec::decode(&input, &version.signature, self.config.max_input_bytes)?;
            request.inputs = version.signature.check(std::mem::take(&mut request.inputs))?;
            request
        };
        let views: Vec<sched::DeviceView> = self
            .devices
            .iter()
            .map(|p| sched::DeviceView { id: p.id().to_string(), is_gpu: p.is_gpu(), memory_budget: p.memory_budget() })
            .collect();
        let d = sched::place(&config.device, version.size, &views)
            .map_err(|why| Error::NoDevice(format!("models/{}: {why}", job.model)))?;
        let batch = (config.max_batch > 1).then(|| batch_key(&version, &request.inputs)).flatten();
        job.inner().state.device = self.devices[d].id().to_string();
        // Refuse a full queue before writing anything (checked again below).
        let refused = |s: &Sched| {
            if s.shutdown {
                return Some(Error::ShuttingDown);
            }
            let full = s.queued(&job.model, job.uid) >= config.max_queue as usize;
            (full && !accepted).then(|| Error::QueueFull { model: job.model.clone(), max: config.max_queue })
        };
        if let Some(e) = refused(&self.sched.lock().unwrap()) {
            return Err(e);
        }
        // The journal entry makes the accepted job survive a crash.
        self.records.journal_input(job)?;

        let mut s = self.sched.lock().unwrap();
        if let Some(e) = refused(&s) {
            return Err(e);
        }
        {
            let mut inner = job.inner();
            if inner.state.status != Status::New {
                // Cancelled (or expired) while being recorded: it stays ended.
                let failure = inner.state.outcome.clone().and_then(|o| o.err());
                drop(inner);
                drop(s);
                // Its record before its journal entry goes (the canceller
                // may not have queued it yet); a second copy is harmless.
                self.records.persist(job, None);
                self.records.release_journal(job);
                return Err(failure.map_or(Error::Cancelled(job.id), |f| f.to_error()));
            }
            inner.state.status = Status::Queued;
            inner.queued_at = Some(Instant::now());
            inner.request = Some(request);
        }
        let _ = job.device.set(d);
        let _ = job.deadline.set(Instant::now() + Duration::from_millis(config.timeout_ms));
        s.seq += 1;
        let entry = Queued {
            id: job.id,
            user: job.uid,
            priority,
            seq: s.seq,
            since: Instant::now(),
            batch_key: batch.map(|(k, _)| k),
            rows: batch.map_or(1, |(_, rows)| rows),
        };
        s.devices[d].entries.push(entry);
        s.devices[d].jobs.push(job.clone());
        *s.queued_per_model.entry(job.model.clone()).or_default().entry(job.uid).or_default() += 1;
        *s.in_flight.entry(job.digest).or_default() += 1;
        Ok(d)
    }

    /// Takes a job out of its queue if it is there.
    pub(super) fn dequeue(&self, job: &Job) {
        let Some(&d) = job.device.get() else { return };
        let mut s = self.sched.lock().unwrap();
        if let Some(i) = s.devices[d].jobs.iter().position(|j| j.id == job.id) {
            s.remove_queued(d, i);
            s.done_in_flight(&job.digest);
        }
    }

    pub(super) fn work(&self, d: usize) {
        let mut s = self.sched.lock().unwrap();
        loop {
            if s.shutdown {
                return;
            }
            s = match self.take(&mut s, d, None) {
                Take::Run(run) => self.run_taken(s, d, run),
                Take::Wait(Some(timeout)) => self.wake[d].wait_timeout(s, timeout).unwrap().0,
                Take::Wait(None) => self.wake[d].wait(s).unwrap(),
            };
        }
    }

    /// See [`Engine::run_or_wake`](super::Engine::run_or_wake): job `id`, queued on device `d`.
    pub(super) fn help(&self, d: usize, id: u64) {
        let mut s = self.sched.lock().unwrap();
        if !self.devices[d].is_gpu() && s.inline_runs < self.config.inline_runs {
            if let Take::Run(run) = self.take(&mut s, d, Some(id)) {
                s.inline_runs += 1;
                let mut s = self.run_taken(s, d, run);
                s.inline_runs -= 1;
                // The slot is free again: a worker takes what is queued.
                if !s.devices[d].entries.is_empty() {
                    self.wake[d].notify_one();
                }
                return;
            }
        }
        drop(s);
        self.wake[d].notify_one();
    }

    /// Takes the next job (or batch) of device `d` off its queue if one of
    /// the device's slots is free, marking it running; with `only_with`,
    /// only if that job is among those taken. A worker that takes a run
    /// while more is queued and slots are free wakes the next worker.
    pub(super) fn take(&self, s: &mut Sched, d: usize, only_with: Option<u64>) -> Take {
        if s.shutdown || s.devices[d].slots_busy >= self.workers(d) {
            return Take::Wait(None);
        }
        let now = Instant::now();
        let dq = &s.devices[d];
        let clock = sched::Clock { now, aging: self.config.aging, last_start: &dq.last_start };
        // A job whose version has no free instance stays queued, in its
        // place, and the device's slot goes to the next job that can run.
        let free = |i: usize| dq.resident.get(&dq.jobs[i].digest).is_none_or(Resident::has_free_instance);
        let Some(first) = sched::next(&dq.entries, &clock, free) else {
            return Take::Wait(None);
        };
        let lead = dq.jobs[first].clone();
        let (max_batch, delay) = {
            let inner = lead.inner();
            (inner.config.max_batch as usize, Duration::from_micros(inner.config.batch_delay_us))
        };
        let batchable = dq.entries[first].batch_key.is_some() && max_batch > 1;
        let members = if batchable { sched::batch(&dq.entries, first, max_batch, &clock) } else { vec![first] };
        let others_in_flight = s.in_flight.get(&lead.digest).copied().unwrap_or(0) > members.len();
        if batchable && sched::rows(&dq.entries, &members) < max_batch && others_in_flight {
            let ready_at = dq.entries[first].since + delay;
            if now < ready_at {
                return Take::Wait(Some(ready_at - now));
            }
        }
        let jobs: Vec<Arc<Job>> = members.iter().map(|&i| s.devices[d].jobs[i].clone()).collect();
        if only_with.is_some_and(|id| !jobs.iter().any(|j| j.id == id)) {
            return Take::Wait(None);
        }
        let mut by_index = members.clone();
        by_index.sort_unstable_by(|a, b| b.cmp(a));
        for i in by_index {
            s.remove_queued(d, i);
        }
        for j in &jobs {
            s.running_jobs.insert(j.id, j.clone());
            s.devices[d].last_start.insert(j.uid, now);
        }
        s.devices[d].running += jobs.len();
        s.devices[d].slots_busy += 1;
        if !s.devices[d].entries.is_empty() && s.devices[d].slots_busy < self.workers(d) {
            self.wake[d].notify_one();
        }
        let (pool, unloaded) = self.make_resident(s, d, &lead);
        Take::Run(Taken { jobs, pool, unloaded })
    }

    /// Runs what [`Shared::take`] took, without the lock, then gives the
    /// slot back.
    pub(super) fn run_taken<'a>(&'a self, s: MutexGuard<'a, Sched>, d: usize, taken: Taken) -> MutexGuard<'a, Sched> {
        let Taken { jobs, pool, unloaded } = taken;
        drop(s);
        drop(unloaded);
        // A panic anywhere in the run (loading, the backend, encoding) fails
        // its jobs; the slot and the instance are given back all the same.
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if super::generate::generates(&jobs[0]) {
                self.generate(d, &jobs[0], &pool)
            } else {
                self.run(d, &jobs, &pool);
                None
            }
        }));
        let parked = ran.unwrap_or_else(|_| {
            for job in &jobs {
                self.fail(job, &Error::Internal("the run panicked".into()));
            }
            None
        });
        let mut s = self.sched.lock().unwrap();
        let dq = &mut s.devices[d];
        dq.running -= jobs.len();
        dq.slots_busy -= 1;
        if let Some(r) = dq.resident.get_mut(&jobs[0].digest) {
            r.busy -= 1;
            r.last_used = Instant::now();
        }
        // A job that waited for this instance is taken next by the thread
        // that gives it back: a worker loops to `take`, a helping thread
        // wakes one (`help`). Waking another worker here would split the
        // next batch.
        for j in &jobs {
            s.running_jobs.remove(&j.id);
            s.done_in_flight(&j.digest);
        }
        // A generation's next turn is queued once this one is given back
        // (under the same lock: no worker can take it before).
        if let Some(g) = parked {
            self.park(&mut s, d, &jobs[0], g);
        }
        // The load may have shown the model bigger than its files.
        let unloaded = self.make_room(&mut s, d, &jobs[0].digest, 0);
        if !unloaded.is_empty() {
            drop(s);
            drop(unloaded);
            s = self.sched.lock().unwrap();
        }
        s
    }
}
