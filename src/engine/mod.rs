//! The inference engine: jobs, per-device queues, workers, loaded models,
//! and the job records that survive a restart. Built by the caller from
//! its parts ([`Engine::start`] takes the store, backends and devices) and
//! stopped by [`Engine::shutdown`].
//!
//! | file | owns |
//! |---|---|
//! | `job.rs` | [`Job`], its state and ending, the registry of all jobs |
//! | `queue.rs` | placing, queueing, and taking the next job or batch |
//! | `loaded.rs` | versions loaded on a device, their instances, eviction |
//! | `run.rs` | one backend call for a job or a batch |
//! | `generate.rs` | a language model's job: its generation, in turns of one token |
//! | `housekeeping.rs` | timeouts, keep-alive, retention, record writes |
//! | `records.rs` | the journal, the catalog of ended jobs, recovery |
//!
//! **Jobs.** Every request is a [`Job`], whichever way it came (`infer` or
//! `clone`). A job is `new` until its input is submitted. [`Engine::submit`]
//! decodes and checks the input against the version's signature *before*
//! queueing (a malformed request fails at once with EINVAL and its reason),
//! places the job on a device (the model's `config.json` `device`:
//! [`crate::sched::place`]), refuses it with EAGAIN if the model's queue is full,
//! journals its record and input (see Records), and queues it.
//!
//! **Queues and workers.** Each device has a queue and workers (the CPU one
//! per core, a GPU one). A worker takes the next job by priority with aging
//! ([`crate::sched::next`]) and, for a model whose inputs and outputs have a free
//! first dimension, stacks queued requests of the same version and shape
//! into one run up to `max_batch` rows ([`crate::sched::batch`]). It waits up to
//! `batch_delay_us` for a fuller batch only while other requests of that
//! version are in flight, so a lone client never waits. At most one run
//! per worker is in progress on a device, and a job is taken only when its
//! version has a free instance: until then it stays queued in its place
//! (`queued`, its wait counted in `queue_us`) and the worker takes the
//! next job that can run. A reader about to wait for its
//! own CPU job ([`Engine::run_or_wake`]) takes a free slot and runs that
//! job on its own thread when it is next, instead of handing it to a
//! worker (at most `inline_runs` such threads at once).
//!
//! **Loaded models.** A version is loaded on a device once and shared: a
//! pool of backend [`Instance`](crate::backend::Instance)s (one request at a time runs on each), up
//! to `instances` (0: one per worker). Loading makes room by unloading the
//! least recently used idle models when the device's memory budget would
//! be exceeded, never one in use; models idle for `keep_alive_s` are
//! unloaded. Every load verifies each blob's sha256, streamed from disk,
//! and hands the backend the verified paths, so a tampered file is refused
//! (EIO), not run.
//!
//! **Waiting never blocks a thread.** [`Job::when_output`] takes a callback
//! run when the job has output past the reader's position (a language
//! model's answer streams as it is generated) or has ended (at once if it
//! has); the FUSE adapter passes one that sends the reply, so a reader
//! blocked on an output holds no thread.
//!
//! **Ending.** A job ends once: done, failed (bad input, backend error,
//! ETIMEDOUT after the model's `timeout_ms`, EAGAIN), or cancelled. A
//! result that comes after a job ended (it was cancelled or timed out while
//! running) is discarded.
//!
//! **Records.** An accepted job's record and input (up to 16 MiB; a larger
//! input is not kept) are appended to the [`Journal`](crate::journal::Journal) before its `close()`
//! returns: one `writev(2)`, so it survives the daemon being killed at any
//! moment and costs no disk round trip; the housekeeper syncs the journal
//! every 500 ms. A job that ends is written once to sled (tree `jobs`:
//! its record, and its output when that is at most 256 KiB; larger ones
//! last while the daemon runs) by the housekeeper, off the request's path;
//! a journal is deleted only once its jobs' records are flushed. At start,
//! queued or running jobs are queued again, or failed with "the daemon
//! restarted" when their input is gone. Finished jobs are kept up to
//! `max_finished_jobs` and `finished_job_ttl`; a retired job whose journal
//! entry still exists leaves a tombstone record until that journal is
//! deleted, so a restart does not bring it back. Past `max_finished_bytes`,
//! the oldest finished jobs whose output was read drop input and output.
//!
//! Locks: `sched` before any job's own lock; callbacks run with no lock
//! held.

mod generate;
mod housekeeping;
mod job;
mod loaded;
mod queue;
mod records;
mod run;
#[cfg(test)]
mod tests;

pub use job::{Failure, Job, JobState, Outcome, Output, Progress, Status};

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::Backends;
use crate::device::Probe;
use crate::error::{Error, Result};
use crate::metrics::{DeviceSample, Metrics};
use crate::store::Store;

use job::{Inner, Registry};
use queue::{DeviceQueue, Sched};
use records::Records;
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Threads that run jobs on the CPU (default: one per core).
    pub workers: usize,
    /// Largest request accepted, in bytes (EFBIG beyond).
    pub max_input_bytes: u64,
    /// Largest answer kept, in bytes, as the model returns it and as
    /// encoded: a job whose output is larger fails with EFBIG.
    pub max_output_bytes: u64,
    /// Finished jobs kept per user before that user's oldest are removed.
    pub max_finished_jobs: usize,
    /// Bytes of requests and answers one user's jobs may hold in memory
    /// (queued inputs, finished inputs and outputs); a request past it
    /// fails with EDQUOT.
    pub max_user_bytes: u64,
    /// Bytes of input and output the finished jobs may hold in memory:
    /// past it, the oldest whose output was read (or that have none) drop
    /// both. Outputs not yet read are kept.
    pub max_finished_bytes: u64,
    /// How long finished jobs are kept.
    pub finished_job_ttl: Duration,
    /// How long a job may stay `new` (cloned, no input) before it is removed.
    pub new_job_ttl: Duration,
    /// A queued job gains one priority point per `aging` waited.
    pub aging: Duration,
    /// How many threads that submitted a job and wait for it may run jobs
    /// themselves at once ([`Engine::run_or_wake`]); 0: none.
    pub inline_runs: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_input_bytes: 1 << 30,
            max_output_bytes: 1 << 30,
            max_finished_jobs: 10_000,
            max_user_bytes: 1 << 30,
            max_finished_bytes: 256 << 20,
            finished_job_ttl: Duration::from_secs(3600),
            new_job_ttl: Duration::from_secs(600),
            aging: Duration::from_millis(100),
            inline_runs: 0,
        }
    }
}

/// A device's live state, for `devices/<id>/{queue,running,models}`.
pub struct DeviceState {
    pub queue: usize,
    pub running: usize,
    /// `name/vN` of each loaded model.
    pub models: Vec<String>,
}

pub struct Engine {
    shared: Arc<Shared>,
    /// The workers and the housekeeper, until [`Engine::shutdown`].
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

struct Shared {
    store: Arc<Store>,
    backends: Backends,
    config: EngineConfig,
    devices: Vec<Arc<dyn Probe>>,

    registry: Mutex<Registry>,
    sched: Mutex<Sched>,
    /// Per device: wakes its workers (new work, a batch to re-check).
    wake: Vec<Condvar>,
    /// Wakes the housekeeper only at shutdown; it otherwise ticks.
    tick: Condvar,
    metrics: Metrics,
    records: Records,
}

impl Engine {
    /// Starts the workers (per device) and the housekeeper, after bringing
    /// back the jobs recorded by an earlier run.
    pub fn start(
        store: Arc<Store>,
        backends: Backends,
        devices: Vec<Arc<dyn Probe>>,
        config: EngineConfig,
    ) -> Result<Engine> {
        let (records, entries) = Records::open(&store)?;
        let sched = Sched { devices: devices.iter().map(|_| DeviceQueue::default()).collect(), ..Default::default() };
        let wake = devices.iter().map(|_| Condvar::new()).collect();
        let shared = Arc::new(Shared {
            store,
            backends,
            devices,
            registry: Mutex::new(Registry::default()),
            sched: Mutex::new(sched),
            wake,
            tick: Condvar::new(),
            metrics: Metrics::default(),
            records,
            config,
        });
        shared.recover(entries)?;
        let mut threads = Vec::new();
        for (d, device) in shared.devices.iter().enumerate() {
            for i in 0..shared.workers(d) {
                let shared = shared.clone();
                let name = format!("{}-{i}", device.id());
                threads.push(
                    std::thread::Builder::new().name(name).spawn(move || shared.work(d)).expect("spawning a worker"),
                );
            }
        }
        let housekeeper = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("housekeeping".into())
                .spawn(move || housekeeper.housekeeping())
                .expect("spawning the housekeeper"),
        );
        Ok(Engine { shared, threads: Mutex::new(threads) })
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    pub fn devices(&self) -> &[Arc<dyn Probe>] {
        &self.shared.devices
    }

    /// A new job (state `new`) for a version, owned by `uid`/`gid`, with the
    /// model's default priority.
    pub fn create_job(&self, uid: u32, gid: u32, model: &str, version: u32) -> Result<Arc<Job>> {
        let m = self.shared.store.model(model)?;
        let v = m.versions.get(&version).ok_or_else(|| Error::NotFound(format!("models/{model}/v{version}")))?;
        // sled's ids only grow, across restarts too: a job id never names
        // two jobs. (It writes its counter once per million ids: no room
        // check on this path.)
        let id = self.shared.store.db().generate_id()? + 1;
        let job = Job::new(
            id,
            uid,
            gid,
            model.to_string(),
            version,
            v.digest,
            Inner {
                state: JobState {
                    status: Status::New,
                    input: Arc::new(Vec::new()),
                    outcome: None,
                    priority: m.config.priority,
                    device: String::new(),
                    created: SystemTime::now(),
                    submitted: None,
                    started: None,
                    finished: None,
                    queue_us: None,
                    compute_us: None,
                    batch_size: None,
                    generation: None,
                },
                request: None,
                version: Some(v.clone()),
                config: m.config.clone(),
                queued_at: None,
                waiters: Vec::new(),
                run: None,
                streamed: Arc::default(),
                readers: Vec::new(),
                generating: None,
            },
        );
        // Not recorded while new: a job that never got its input does not
        // outlive the daemon.
        self.shared.register(&job, false);
        Ok(job)
    }

    pub fn job(&self, id: u64) -> Option<Arc<Job>> {
        self.shared.registry.lock().unwrap().jobs.get(&id).cloned()
    }

    pub fn job_ids(&self) -> Vec<u64> {
        self.shared.registry.lock().unwrap().jobs.keys().copied().collect()
    }

    /// Jobs queued or running on a version: they use it.
    pub fn active_jobs(&self, model: &str, version: u32) -> Vec<u64> {
        let r = self.shared.registry.lock().unwrap();
        r.jobs
            .values()
            .filter(|j| {
                j.model == model && j.version == version && matches!(j.status(), Status::Queued | Status::Running)
            })
            .map(|j| j.id)
            .collect()
    }

    /// The generations running, with their progress.
    pub fn generations(&self) -> Vec<(Arc<Job>, Progress)> {
        let r = self.shared.registry.lock().unwrap();
        r.jobs
            .values()
            .filter_map(|j| {
                let inner = j.inner();
                let progress = inner.state.generation.clone().filter(|_| inner.state.status == Status::Running)?;
                Some((j.clone(), progress))
            })
            .collect()
    }

    /// Fails the `new` jobs of a version that was deleted.
    pub fn abandon_new_jobs(&self, model: &str, version: u32) {
        let jobs: Vec<Arc<Job>> = {
            let r = self.shared.registry.lock().unwrap();
            r.jobs
                .values()
                .filter(|j| j.model == model && j.version == version && j.status() == Status::New)
                .cloned()
                .collect()
        };
        for job in jobs {
            self.shared.fail(&job, &Error::NotFound(format!("models/{model}/v{version} (deleted)")));
        }
    }

    /// Submits a `new` job's input (see the module header) and wakes a
    /// worker. On error the job has failed with that error as its reason.
    pub fn submit(&self, job: &Arc<Job>, input: Vec<u8>) -> Result<()> {
        let d = self.queue(job, input)?;
        self.shared.wake[d].notify_one();
        Ok(())
    }

    /// The same, for a reader about to wait for the job's reply, without
    /// waking a worker: the caller then calls [`Engine::run_or_wake`] once
    /// it holds no lock.
    pub fn submit_for_reader(&self, job: &Arc<Job>, input: Vec<u8>) -> Result<()> {
        self.queue(job, input).map(drop)
    }

    /// Runs a job submitted by [`Engine::submit_for_reader`] on the calling
    /// thread when its device runs on the CPU, has a free slot and would
    /// take this job next (saving the hand-off to a worker; at most
    /// `inline_runs` threads at once); otherwise wakes a worker.
    pub fn run_or_wake(&self, job: &Arc<Job>) {
        let Some(&d) = job.device.get() else { return };
        if generate::generates(job) {
            // A generation takes turns on the workers; a reader's thread
            // is not held for it.
            self.shared.wake[d].notify_one();
        } else {
            self.shared.help(d, job.id);
        }
    }

    fn queue(&self, job: &Arc<Job>, input: Vec<u8>) -> Result<usize> {
        self.shared.metrics.request(&job.model, job.version);
        self.shared.enqueue(job, input, false).inspect_err(|e| {
            tracing::info!(job = job.id, model = %job.model, version = job.version, "rejected: {e}");
            // A second submit of a job already submitted fails alone: the
            // job itself goes on.
            if !matches!(e, Error::Busy(_)) {
                self.shared.fail(job, e);
            }
        })
    }

    /// Cancels a job that has not finished: its readers get ECANCELED. A
    /// running job's result is discarded when it comes.
    pub fn cancel(&self, job: &Arc<Job>) -> Result<()> {
        let status = job.status();
        if status.is_finished() {
            return Err(Error::InvalidArgument(format!("job {} already finished ({})", job.id, status.name())));
        }
        self.shared.dequeue(job);
        if self.shared.end(job, Status::Cancelled, Err(Failure::of(&Error::Cancelled(job.id)))) {
            tracing::info!(job = job.id, "cancelled");
        }
        Ok(())
    }

    /// Fails a job before it ran (e.g. a request over the size limit).
    pub fn fail(&self, job: &Arc<Job>, e: &Error) {
        self.shared.metrics.request(&job.model, job.version);
        self.shared.fail(job, e);
    }

    /// Sets the priority of a job that has not started.
    pub fn set_priority(&self, job: &Job, priority: i32) -> Result<()> {
        let mut s = self.shared.sched.lock().unwrap();
        let mut inner = job.inner();
        match inner.state.status {
            Status::New | Status::Queued => inner.state.priority = priority,
            st => return Err(Error::ReadOnly(format!("jobs/{}/priority: the job is {}", job.id, st.name()))),
        }
        drop(inner);
        if let Some(&d) = job.device.get() {
            let dq = &mut s.devices[d];
            if let Some(i) = dq.jobs.iter().position(|j| j.id == job.id) {
                dq.entries[i].priority = priority;
            }
            self.shared.wake[d].notify_all();
        }
        Ok(())
    }

    pub fn device_state(&self, id: &str) -> Option<DeviceState> {
        let d = self.shared.devices.iter().position(|p| p.id() == id)?;
        let s = self.shared.sched.lock().unwrap();
        let dq = &s.devices[d];
        let mut models: Vec<String> = dq.resident.values().map(|r| format!("{}/v{}", r.model, r.version)).collect();
        models.sort();
        Some(DeviceState { queue: dq.entries.len(), running: dq.running, models })
    }

    /// `/metrics`.
    pub fn metrics_text(&self) -> String {
        let samples: Vec<DeviceSample> = self
            .shared
            .devices
            .iter()
            .map(|p| {
                let state = self.device_state(p.id()).expect("a known device");
                let r = p.read();
                DeviceSample {
                    id: p.id().to_string(),
                    queue: state.queue,
                    running: state.running,
                    util: r.util,
                    memory_used: r.memory_used,
                    memory_total: r.memory_total,
                }
            })
            .collect();
        self.shared.metrics.render(&samples)
    }

    /// `models/<name>/<version>/stats`.
    pub fn stats_json(&self, model: &str, version: u32) -> serde_json::Value {
        self.shared.metrics.stats_json(model, version)
    }
}

impl Engine {
    /// Stops the engine: runs in progress finish, queued jobs stay queued
    /// (their journal entries bring them back at the next start), the
    /// workers and the housekeeper end, and the records of every job that
    /// ended are written and flushed. Idempotent; dropping the engine does
    /// it too.
    pub fn shutdown(&self) -> Result<()> {
        self.shared.sched.lock().unwrap().shutdown = true;
        self.shared.wake.iter().for_each(Condvar::notify_all);
        self.shared.tick.notify_all();
        // A run that hangs in its backend must not hang the exit: past the
        // deadline its thread is left behind (the journal still holds its
        // job, which runs again at the next start).
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        let me = std::thread::current().id();
        for t in std::mem::take(&mut *self.threads.lock().unwrap()) {
            while !t.is_finished() && t.thread().id() != me && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else if t.thread().id() != me {
                tracing::warn!(thread = t.thread().name(), "still running at shutdown; not waiting for it");
            }
        }
        self.shared.records.sync_journal();
        self.shared.records.flush()
    }
}

/// How long [`Engine::shutdown`] waits for runs in progress.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!("recording finished jobs at shutdown: {e}");
        }
    }
}

impl Shared {
    fn workers(&self, d: usize) -> usize {
        self.devices[d].workers().unwrap_or(self.config.workers).max(1)
    }

    fn register(&self, job: &Arc<Job>, finished: bool) {
        let mut r = self.registry.lock().unwrap();
        r.jobs.insert(job.id, job.clone());
        if finished {
            r.push_finished(job);
        } else {
            r.new.push_back((Instant::now(), job.id));
        }
    }

    fn fail(&self, job: &Arc<Job>, e: &Error) {
        self.end(job, Status::Failed, Err(Failure::of(e)));
    }

    /// Ends a job (if not already ended): counts, records, retires.
    fn end(&self, job: &Arc<Job>, status: Status, outcome: Outcome) -> bool {
        let output = outcome.as_ref().ok().cloned();
        let generates = generate::generates(job);
        if !job.finish(status, outcome) {
            return false;
        }
        if generates {
            // Its turn may have been queued again as it ended.
            self.dequeue(job);
        }
        if status == Status::Failed {
            self.metrics.failure(&job.model, job.version);
        }
        // Small outputs (answers, scores, embeddings) are kept across a
        // restart; large ones (images, big tensors) only while the daemon runs.
        self.records.persist(job, output.as_deref().map(Vec::as_slice));
        self.records.release_journal(job);
        let mut r = self.registry.lock().unwrap();
        r.release(job.uid, job.charged.swap(0, std::sync::atomic::Ordering::Relaxed));
        r.push_finished(job);
        // Each user's own oldest go: another user's flood retires none of
        // this user's results.
        let mut retired = Vec::new();
        while r.finished_count(job.uid) > self.config.max_finished_jobs {
            retired.extend(r.pop_finished_of(job.uid));
        }
        r.shed_payloads(self.config.max_finished_bytes);
        drop(r);
        for job in retired {
            self.records.forget(&job);
        }
        true
    }
}
