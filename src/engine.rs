//! The inference engine: jobs, per-device queues, workers, loaded models,
//! and the job records that survive a restart.
//!
//! **Jobs.** Every request is a [`Job`], whichever way it came (`infer` or
//! `clone`). A job is `new` until its input is submitted. [`Engine::submit`]
//! decodes and checks the input against the version's signature *before*
//! queueing (a malformed request fails at once with EINVAL and its reason),
//! places the job on a device (the model's `config.json` `device`:
//! [`sched::place`]), refuses it with EAGAIN if the model's queue is full,
//! journals its record and input (see Records), and queues it.
//!
//! **Queues and workers.** Each device has a queue and workers (the CPU one
//! per core, a GPU one). A worker takes the next job by priority with aging
//! ([`sched::next`]) and, for a model whose inputs and outputs have a free
//! first dimension, stacks queued requests of the same version and shape
//! into one run up to `max_batch` rows ([`sched::batch`]). It waits up to
//! `batch_delay_us` for a fuller batch only while other requests of that
//! version are in flight, so a lone client never waits. At most one run
//! per worker is in progress on a device. A reader about to wait for its
//! own CPU job ([`Engine::run_or_wake`]) takes a free slot and runs that
//! job on its own thread when it is next, instead of handing it to a
//! worker (at most `inline_runs` such threads at once).
//!
//! **Loaded models.** A version is loaded on a device once and shared: a
//! pool of backend [`Instance`]s (one request at a time runs on each), up
//! to `instances` (0: one per worker). Loading makes room by unloading the
//! least recently used idle models when the device's memory budget would
//! be exceeded, never one in use; models idle for `keep_alive_s` are
//! unloaded. Every load re-reads the blob and verifies its sha256, so a
//! tampered file is refused (EIO), not run.
//!
//! **Waiting never blocks a thread.** [`Job::when_done`] takes a callback
//! run when the job ends (at once if it has); the FUSE adapter passes one
//! that sends the reply, so a reader blocked on an output holds no thread.
//!
//! **Ending.** A job ends once: done, failed (bad input, backend error,
//! ETIMEDOUT after the model's `timeout_ms`, EAGAIN), or cancelled. A
//! result that comes after a job ended (it was cancelled or timed out while
//! running) is discarded.
//!
//! **Records.** An accepted job's record and input (up to 16 MiB; a larger
//! input is not kept) are appended to the [`Journal`] before its `close()`
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

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::backend::{Backends, Instance};
use crate::codec::{self, Request};
use crate::device::Probe;
use crate::error::{Error, Result};
use crate::journal::Journal;
use crate::metrics::{DeviceSample, Metrics};
use crate::sched::{self, Queued};
use crate::store::{Digest, ModelConfig, Store, Version};
use crate::tensor::Tensor;

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Threads that run jobs on the CPU (default: one per core).
    pub workers: usize,
    /// Largest request accepted, in bytes (EFBIG beyond).
    pub max_input_bytes: u64,
    /// Finished jobs kept before the oldest are removed.
    pub max_finished_jobs: usize,
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
    /// themselves at once ([`Engine::submit_and_help`]); 0: none.
    pub inline_runs: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_input_bytes: 1 << 30,
            max_finished_jobs: 10_000,
            max_finished_bytes: 256 << 20,
            finished_job_ttl: Duration::from_secs(3600),
            new_job_ttl: Duration::from_secs(600),
            aging: Duration::from_millis(100),
            inline_runs: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    New,
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::New => "new",
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(self, Status::Done | Status::Failed | Status::Cancelled)
    }
}

/// A job's failure: the errno its readers get, and the one-line reason.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    pub errno: i32,
    pub reason: String,
}

impl Failure {
    fn of(e: &Error) -> Failure {
        Failure { errno: e.errno(), reason: e.to_string() }
    }

    pub fn to_error(&self) -> Error {
        Error::Job { errno: self.errno, message: self.reason.clone() }
    }
}

/// How a job ended: its output, or its failure.
pub type Outcome = std::result::Result<Arc<Vec<u8>>, Failure>;

type Waiter = Box<dyn FnOnce(&Outcome) + Send>;

/// One request, from submission to output.
pub struct Job {
    pub id: u64,
    pub uid: u32,
    pub gid: u32,
    pub model: String,
    pub version: u32,
    /// The version's digest (`sha256:` of its manifest).
    pub digest: Digest,
    /// Set once at submit: when it times out, and the device it is placed on.
    deadline: OnceLock<Instant>,
    device: OnceLock<usize>,
    /// The journal its acceptance went to, until the job ends: taken once,
    /// by whichever path ends it.
    journal: Mutex<Option<u64>>,
    /// The same, kept: where its entry is while that journal exists.
    journaled_in: OnceLock<u64>,
    /// A reader has had its whole output ([`Job::mark_output_read`]).
    output_read: std::sync::atomic::AtomicBool,
    inner: Mutex<Inner>,
}

/// What a job's files show; a copy from [`Job::snapshot`].
#[derive(Clone, Debug)]
pub struct JobState {
    pub status: Status,
    pub input: Arc<Vec<u8>>,
    pub outcome: Option<Outcome>,
    pub priority: i32,
    pub device: String,
    pub created: SystemTime,
    pub submitted: Option<SystemTime>,
    pub started: Option<SystemTime>,
    pub finished: Option<SystemTime>,
    pub queue_us: Option<u64>,
    pub compute_us: Option<u64>,
    pub batch_size: Option<usize>,
}

impl JobState {
    fn payload_bytes(&self) -> usize {
        self.input.len() + self.outcome.as_ref().and_then(|o| o.as_ref().ok()).map_or(0, |o| o.len())
    }
}

struct Inner {
    state: JobState,
    /// The decoded request, between submit and run.
    request: Option<Request>,
    /// The version record (signature, files), while the job may still run.
    version: Option<Arc<Version>>,
    config: ModelConfig,
    queued_at: Option<Instant>,
    waiters: Vec<Waiter>,
}

impl Job {
    fn new(id: u64, uid: u32, gid: u32, model: String, version: u32, digest: Digest, inner: Inner) -> Arc<Job> {
        Arc::new(Job {
            id,
            uid,
            gid,
            model,
            version,
            digest,
            deadline: OnceLock::new(),
            device: OnceLock::new(),
            journal: Mutex::new(None),
            journaled_in: OnceLock::new(),
            output_read: Default::default(),
            inner: Mutex::new(inner),
        })
    }

    pub fn snapshot(&self) -> JobState {
        self.inner().state.clone()
    }

    /// The bytes of input and output it holds.
    fn payload_bytes(&self) -> usize {
        self.inner().state.payload_bytes()
    }

    /// A reader has had the whole output: from now on the job may drop it
    /// to stay within `max_finished_bytes`.
    pub fn mark_output_read(&self) {
        self.output_read.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops the input and output of a finished job whose output was read
    /// (or that has none); returns the bytes freed.
    fn drop_payload(&self) -> usize {
        let mut inner = self.inner();
        let read = self.output_read.load(std::sync::atomic::Ordering::Relaxed);
        let has_output = matches!(inner.state.outcome, Some(Ok(_)));
        if !inner.state.status.is_finished() || (has_output && !read) {
            return 0;
        }
        let freed = inner.state.payload_bytes();
        inner.state.input = Arc::new(Vec::new());
        if has_output {
            inner.state.outcome = Some(Err(Failure::of(&Error::OutputDropped(self.id))));
        }
        freed
    }

    pub fn status(&self) -> Status {
        self.inner().state.status
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap()
    }

    /// Calls `f` with the outcome when the job ends: now if it has ended,
    /// else from the thread that ends it. Never called with a lock held.
    pub fn when_done(&self, f: impl FnOnce(&Outcome) + Send + 'static) {
        let mut inner = self.inner();
        match inner.state.outcome.clone() {
            Some(outcome) => {
                drop(inner);
                f(&outcome);
            }
            None => inner.waiters.push(Box::new(f)),
        }
    }

    /// Ends the job unless it already ended, and wakes its waiters. Returns
    /// whether this call ended it.
    fn finish(&self, status: Status, outcome: Outcome) -> bool {
        let mut inner = self.inner();
        if inner.state.status.is_finished() {
            return false;
        }
        inner.state.status = status;
        inner.state.finished = Some(SystemTime::now());
        inner.state.outcome = Some(outcome.clone());
        inner.request = None;
        inner.version = None;
        let waiters = std::mem::take(&mut inner.waiters);
        drop(inner);
        for w in waiters {
            w(&outcome);
        }
        true
    }
}

/// Instances of one loaded version, shared by the workers of a device.
struct Pool {
    state: Mutex<PoolState>,
    returned: Condvar,
    max: usize,
}

#[derive(Default)]
struct PoolState {
    idle: Vec<Box<dyn Instance>>,
    /// Instances in existence (idle or running) or being created.
    count: usize,
}

impl Pool {
    /// An idle instance, a new one from `load` (up to `max`), or the next
    /// one returned.
    fn acquire(&self, load: impl FnOnce() -> Result<Box<dyn Instance>>) -> Result<Box<dyn Instance>> {
        let mut st = self.state.lock().unwrap();
        loop {
            if let Some(instance) = st.idle.pop() {
                return Ok(instance);
            }
            if st.count < self.max {
                st.count += 1;
                drop(st);
                let made = load();
                if made.is_err() {
                    self.state.lock().unwrap().count -= 1;
                    self.returned.notify_one();
                }
                return made;
            }
            st = self.returned.wait(st).unwrap();
        }
    }

    fn release(&self, instance: Box<dyn Instance>) {
        self.state.lock().unwrap().idle.push(instance);
        self.returned.notify_one();
    }
}

/// A version loaded on a device.
struct Resident {
    model: String,
    version: u32,
    bytes: u64,
    pool: Arc<Pool>,
    busy: usize,
    last_used: Instant,
    keep_alive: Duration,
}

/// One device's queue and loaded models.
#[derive(Default)]
struct DeviceQueue {
    entries: Vec<Queued>,
    /// `jobs[i]` is the job of `entries[i]`.
    jobs: Vec<Arc<Job>>,
    running: usize,
    /// Runs (a batch is one) in progress: at most the device's workers.
    slots_busy: usize,
    resident: HashMap<Digest, Resident>,
}

/// What a worker (or a helping thread) does next.
enum Take {
    Run(Taken),
    /// Nothing to run now: wait for a wake-up, or this long for a batch.
    Wait(Option<Duration>),
}

/// Jobs taken off a queue to run together, with their model's pool.
struct Taken {
    jobs: Vec<Arc<Job>>,
    pool: Arc<Pool>,
    /// Models unloaded to make room, dropped without the lock.
    unloaded: Vec<Resident>,
}

#[derive(Default)]
struct Sched {
    devices: Vec<DeviceQueue>,
    queued_per_model: HashMap<String, usize>,
    /// Queued or running jobs per version: batching waits only if > batch.
    in_flight: HashMap<Digest, usize>,
    running_jobs: HashMap<u64, Arc<Job>>,
    /// Runs in progress on threads that submitted them ([`Shared::help`]).
    inline_runs: usize,
    seq: u64,
    shutdown: bool,
}

impl Sched {
    fn remove_queued(&mut self, d: usize, i: usize) -> Arc<Job> {
        let dq = &mut self.devices[d];
        dq.entries.remove(i);
        let job = dq.jobs.remove(i);
        if let Some(n) = self.queued_per_model.get_mut(&job.model) {
            *n -= 1;
        }
        job
    }

    fn done_in_flight(&mut self, digest: &Digest) {
        if let Some(n) = self.in_flight.get_mut(digest) {
            *n -= 1;
            if *n == 0 {
                self.in_flight.remove(digest);
            }
        }
    }
}

/// All jobs by id, with the order in which they were created or finished,
/// so retention is O(1) per job.
#[derive(Default)]
struct Registry {
    jobs: BTreeMap<u64, Arc<Job>>,
    /// Finished jobs, oldest first: when they finished, and id.
    finished: VecDeque<(Instant, u64)>,
    /// What the finished jobs hold, in bytes (their inputs and outputs).
    finished_bytes: usize,
    new: VecDeque<(Instant, u64)>,
}

impl Registry {
    fn push_finished(&mut self, job: &Job) {
        self.finished.push_back((Instant::now(), job.id));
        self.finished_bytes += job.payload_bytes();
    }

    /// Removes the oldest finished job.
    fn pop_finished(&mut self) -> Option<Arc<Job>> {
        while let Some((_, id)) = self.finished.pop_front() {
            if let Some(job) = self.jobs.remove(&id) {
                self.finished_bytes -= job.payload_bytes();
                return Some(job);
            }
        }
        None
    }

    /// Past `max` bytes, drops the payloads of the oldest finished jobs
    /// that may drop them ([`Job::drop_payload`]).
    fn shed_payloads(&mut self, max: u64) {
        let mut i = 0;
        while self.finished_bytes as u64 > max && i < self.finished.len() {
            let id = self.finished[i].1;
            if let Some(job) = self.jobs.get(&id) {
                self.finished_bytes -= job.drop_payload();
            }
            i += 1;
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
    threads: Vec<std::thread::JoinHandle<()>>,
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
    /// Ended jobs: the record as one JSON line, then the output if kept.
    records: sled::Tree,
    /// Changes to `records` not yet made (value to insert, or `None` to
    /// remove), written by the housekeeper in one go per tick.
    unwritten: Mutex<Vec<(u64, Option<Vec<u8>>)>>,
    /// Retired jobs with a tombstone in `records`, by the journal that
    /// still holds their entry.
    retired: Mutex<BTreeMap<u64, Vec<u64>>>,
    journal: Journal,
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
        let dir = store.root().join("jobs");
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let records = store.db().open_tree("jobs")?;
        // Earlier versions kept outputs in a tree of their own.
        store.db().drop_tree("job_outputs")?;
        let input_len = |header: &[u8]| Some(serde_json::from_slice::<Record>(header).ok()?.input_len.unwrap_or(0));
        let (journal, entries) = Journal::open(&dir, input_len).map_err(|e| Error::io(dir.display().to_string(), e))?;
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
            unwritten: Mutex::default(),
            retired: Mutex::default(),
            journal,
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
        Ok(Engine { shared, threads })
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
        // sled's ids only grow, across restarts too: a job id never names two jobs.
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
                },
                request: None,
                version: Some(v.clone()),
                config: m.config.clone(),
                queued_at: None,
                waiters: Vec::new(),
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

    /// Writes the records of the jobs that ended and flushes the catalog
    /// (the housekeeper does so on its own; this is for a process about to
    /// exit without dropping the engine).
    pub fn flush_records(&self) -> Result<()> {
        self.shared.write_records()?;
        self.shared.records.flush()?;
        Ok(())
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
        if let Some(&d) = job.device.get() {
            self.shared.help(d, job.id);
        }
    }

    fn queue(&self, job: &Arc<Job>, input: Vec<u8>) -> Result<usize> {
        self.shared.metrics.request(&job.model, job.version);
        self.shared.enqueue(job, input).inspect_err(|e| {
            tracing::info!(job = job.id, model = %job.model, version = job.version, "rejected: {e}");
            self.shared.fail(job, e);
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

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.sched.lock().unwrap().shutdown = true;
        self.shared.wake.iter().for_each(Condvar::notify_all);
        self.shared.tick.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The batch key and rows of a request, if the version can batch it: the
/// model names a batch dimension ([`crate::tensor::Signature::batch_dimension`])
/// and the request's inputs agree on its size.
fn batch_key(version: &Version, inputs: &[Tensor]) -> Option<(u64, usize)> {
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

    /// Decodes, checks and places a `new` job, records it, then queues it.
    /// Disk I/O happens before the scheduler lock is taken; the status is
    /// checked again under it, so a job cancelled meanwhile stays cancelled.
    /// Returns the device it is queued on; the caller wakes its workers.
    fn enqueue(&self, job: &Arc<Job>, input: Vec<u8>) -> Result<usize> {
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
        let mut request = codec::decode(&input, &version.signature, self.config.max_input_bytes)?;
        request.inputs = version.signature.check(std::mem::take(&mut request.inputs))?;
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
        let full = |s: &Sched| s.queued_per_model.get(&job.model).copied().unwrap_or(0) >= config.max_queue as usize;
        if full(&self.sched.lock().unwrap()) {
            return Err(Error::QueueFull { model: job.model.clone(), max: config.max_queue });
        }
        // The journal entry makes the accepted job survive a crash.
        self.journal_input(job)?;

        let mut s = self.sched.lock().unwrap();
        if full(&s) {
            return Err(Error::QueueFull { model: job.model.clone(), max: config.max_queue });
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
                self.persist(job, None);
                self.release_journal(job);
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
            priority,
            seq: s.seq,
            since: Instant::now(),
            batch_key: batch.map(|(k, _)| k),
            rows: batch.map_or(1, |(_, rows)| rows),
        };
        s.devices[d].entries.push(entry);
        s.devices[d].jobs.push(job.clone());
        *s.queued_per_model.entry(job.model.clone()).or_default() += 1;
        *s.in_flight.entry(job.digest).or_default() += 1;
        Ok(d)
    }

    /// Takes a job out of its queue if it is there.
    fn dequeue(&self, job: &Job) {
        let Some(&d) = job.device.get() else { return };
        let mut s = self.sched.lock().unwrap();
        if let Some(i) = s.devices[d].jobs.iter().position(|j| j.id == job.id) {
            s.remove_queued(d, i);
            s.done_in_flight(&job.digest);
        }
    }

    fn fail(&self, job: &Arc<Job>, e: &Error) {
        self.end(job, Status::Failed, Err(Failure::of(e)));
    }

    /// Ends a job (if not already ended): counts, records, retires.
    fn end(&self, job: &Arc<Job>, status: Status, outcome: Outcome) -> bool {
        let output = outcome.as_ref().ok().cloned();
        if !job.finish(status, outcome) {
            return false;
        }
        if status == Status::Failed {
            self.metrics.failure(&job.model, job.version);
        }
        // Small outputs (answers, scores, embeddings) are kept across a
        // restart; large ones (images, big tensors) only while the daemon runs.
        self.persist(job, output.as_deref().map(Vec::as_slice).filter(|o| o.len() <= KEPT_OUTPUT_BYTES));
        self.release_journal(job);
        let mut r = self.registry.lock().unwrap();
        r.push_finished(job);
        let mut retired = Vec::new();
        while r.finished.len() > self.config.max_finished_jobs {
            retired.extend(r.pop_finished());
        }
        r.shed_payloads(self.config.max_finished_bytes);
        drop(r);
        for job in retired {
            self.forget(&job);
        }
        true
    }

    fn work(&self, d: usize) {
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

    /// See [`Engine::run_or_wake`]: job `id`, queued on device `d`.
    fn help(&self, d: usize, id: u64) {
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
    fn take(&self, s: &mut Sched, d: usize, only_with: Option<u64>) -> Take {
        if s.devices[d].slots_busy >= self.workers(d) {
            return Take::Wait(None);
        }
        let aging = self.config.aging;
        let now = Instant::now();
        let dq = &s.devices[d];
        let Some(first) = sched::next(&dq.entries, now, aging) else {
            return Take::Wait(None);
        };
        let lead = dq.jobs[first].clone();
        let (max_batch, delay) = {
            let inner = lead.inner();
            (inner.config.max_batch as usize, Duration::from_micros(inner.config.batch_delay_us))
        };
        let batchable = dq.entries[first].batch_key.is_some() && max_batch > 1;
        let members = if batchable { sched::batch(&dq.entries, first, max_batch, now, aging) } else { vec![first] };
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
    fn run_taken<'a>(&'a self, s: MutexGuard<'a, Sched>, d: usize, taken: Taken) -> MutexGuard<'a, Sched> {
        let Taken { jobs, pool, unloaded } = taken;
        drop(s);
        drop(unloaded);
        self.run(d, &jobs, &pool);
        let mut s = self.sched.lock().unwrap();
        let dq = &mut s.devices[d];
        dq.running -= jobs.len();
        dq.slots_busy -= 1;
        if let Some(r) = dq.resident.get_mut(&jobs[0].digest) {
            r.busy -= 1;
            r.last_used = Instant::now();
        }
        for j in &jobs {
            s.running_jobs.remove(&j.id);
            s.done_in_flight(&j.digest);
        }
        s
    }

    /// The pool of the lead job's version on device `d`, loading it (after
    /// unloading least recently used idle models if the budget needs it).
    /// Returns the unloaded models too, to be dropped without the lock.
    fn make_resident(&self, s: &mut Sched, d: usize, lead: &Job) -> (Arc<Pool>, Vec<Resident>) {
        let device = &self.devices[d];
        let dq = &mut s.devices[d];
        let mut unloaded = Vec::new();
        if !dq.resident.contains_key(&lead.digest) {
            let inner = lead.inner();
            let bytes = inner.version.as_ref().map_or(0, |v| v.size);
            let config = inner.config.clone();
            drop(inner);
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
            let max = if config.instances == 0 { self.workers(d) } else { config.instances as usize };
            let pool = Arc::new(Pool { state: Mutex::new(PoolState::default()), returned: Condvar::new(), max });
            dq.resident.insert(
                lead.digest,
                Resident {
                    model: lead.model.clone(),
                    version: lead.version,
                    bytes,
                    pool,
                    busy: 0,
                    last_used: Instant::now(),
                    keep_alive: Duration::from_secs(config.keep_alive_s),
                },
            );
            device.note_loaded_bytes(dq.resident.values().map(|r| r.bytes).sum());
        }
        let r = dq.resident.get_mut(&lead.digest).expect("inserted above");
        r.busy += 1;
        (r.pool.clone(), unloaded)
    }

    /// Runs a batch of jobs (one or more) of one version on device `d`.
    fn run(&self, d: usize, jobs: &[Arc<Job>], pool: &Pool) {
        let now = SystemTime::now();
        let mut live: Vec<(Arc<Job>, Request)> = Vec::with_capacity(jobs.len());
        let mut version = None;
        for j in jobs {
            let mut inner = j.inner();
            if inner.state.status != Status::Queued {
                continue; // cancelled or timed out meanwhile
            }
            inner.state.status = Status::Running;
            inner.state.started = Some(now);
            inner.state.batch_size = Some(jobs.len());
            inner.state.queue_us = inner.queued_at.take().map(|t| t.elapsed().as_micros() as u64);
            version = version.or(inner.version.clone());
            live.push((j.clone(), inner.request.take().expect("queued jobs have a request")));
        }
        let Some(version) = version else { return };
        let started = Instant::now();
        let device = &self.devices[d];
        let outputs = pool.acquire(|| self.load(&version, d)).and_then(|mut instance| {
            // A backend that panics fails these jobs, not the worker.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_batch(&mut *instance, &mut live)))
                    .unwrap_or_else(|_| Err(Error::Runtime("the backend panicked".into())));
            pool.release(instance);
            result
        });
        std::thread::sleep(device.run_delay());
        let compute_us = started.elapsed().as_micros() as u64;
        let (model, number) = (&live[0].0.model, live[0].0.version);
        self.metrics.batch(model, number, live.len());
        match outputs {
            Ok(outputs) => {
                for ((job, request), out) in live.iter().zip(outputs) {
                    let queue_us = {
                        let mut inner = job.inner();
                        inner.state.compute_us = Some(compute_us);
                        inner.state.queue_us.unwrap_or(0)
                    };
                    self.metrics.latency(model, number, queue_us, compute_us);
                    let outcome = codec::encode(request, out, &job.model, job.version);
                    match outcome {
                        Ok(bytes) => self.end(job, Status::Done, Ok(Arc::new(bytes))),
                        Err(e) => self.end(job, Status::Failed, Err(Failure::of(&e))),
                    };
                }
            }
            Err(e) => {
                tracing::warn!(model = %model, version = number, jobs = live.len(), "run failed: {e}");
                for (job, _) in &live {
                    job.inner().state.compute_us = Some(compute_us);
                    self.end(job, Status::Failed, Err(Failure::of(&e)));
                }
            }
        }
    }

    /// Reads the version's file, verifies its sha256, and loads it.
    fn load(&self, version: &Version, d: usize) -> Result<Box<dyn Instance>> {
        let (file_name, digest) =
            version.files.iter().next().ok_or_else(|| Error::Runtime("version has no files".into()))?;
        let path = self.store.blob_path(digest);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
        if Digest::of(&bytes) != *digest {
            return Err(Error::Runtime(format!(
                "blob {digest} of {file_name} does not match its digest (modified on disk?); refusing to run it"
            )));
        }
        let device = &self.devices[d];
        let instance = self.backends.for_file(file_name)?.load(&bytes, file_name, device.target())?;
        tracing::info!(device = device.id(), file = %file_name, blob = %digest, "loaded an instance");
        Ok(instance)
    }

    /// Every 50 ms: times out jobs past their deadline, unloads models idle
    /// past their keep-alive, removes old finished and stale new jobs.
    fn housekeeping(&self) {
        let tick = Duration::from_millis(50);
        let mut last_sync = Instant::now();
        loop {
            let mut s = self.sched.lock().unwrap();
            s = self.tick.wait_timeout(s, tick).unwrap().0;
            if s.shutdown {
                drop(s);
                if let Err(e) = self.write_records() {
                    tracing::warn!("recording finished jobs: {e}");
                }
                return;
            }
            let now = Instant::now();
            let past = |j: &Job| j.deadline.get().is_some_and(|&t| t <= now);
            let mut expired: Vec<Arc<Job>> = s.running_jobs.values().filter(|j| past(j)).cloned().collect();
            for d in 0..s.devices.len() {
                while let Some(i) = s.devices[d].jobs.iter().position(|j| past(j)) {
                    let job = s.remove_queued(d, i);
                    s.done_in_flight(&job.digest);
                    expired.push(job);
                }
            }
            let mut unloaded = Vec::new();
            for (d, dq) in s.devices.iter_mut().enumerate() {
                let resident: Vec<(sched::Resident<Digest>, Duration)> = dq
                    .resident
                    .iter()
                    .map(|(k, r)| {
                        (
                            sched::Resident { key: *k, bytes: r.bytes, busy: r.busy, last_used: r.last_used },
                            r.keep_alive,
                        )
                    })
                    .collect();
                let keys = sched::expired(&resident, now);
                if keys.is_empty() {
                    continue;
                }
                for key in keys {
                    let r = dq.resident.remove(&key).expect("listed above");
                    tracing::info!(device = self.devices[d].id(), model = %r.model, version = r.version, "unloaded after keep_alive_s idle");
                    unloaded.push(r);
                }
                self.devices[d].note_loaded_bytes(dq.resident.values().map(|r| r.bytes).sum());
            }
            drop(s);
            drop(unloaded);
            if last_sync.elapsed() >= JOURNAL_SYNC {
                if let Err(e) = self.journal.sync() {
                    tracing::warn!("syncing the job journal: {e}");
                }
                last_sync = Instant::now();
            }
            if let Err(e) = self.write_records() {
                tracing::warn!("recording finished jobs (will retry): {e}");
            }
            // A job releases its journal entry after queueing its record, so
            // writing the queue here covers every job of a journal it deletes.
            let deleted = self.journal.collect(|| {
                self.write_records().and_then(|()| self.records.flush().map(drop)).map_err(std::io::Error::other)
            });
            self.forget_tombstones(&deleted);
            for job in expired {
                let ms = job.inner().config.timeout_ms;
                if self.end(&job, Status::Failed, Err(Failure::of(&Error::TimedOut { id: job.id, ms }))) {
                    tracing::info!(job = job.id, "timed out after {ms} ms");
                }
            }
            self.retire_old();
        }
    }

    /// Removes finished jobs past their age and `new` jobs left too long.
    fn retire_old(&self) {
        let mut r = self.registry.lock().unwrap();
        let mut gone = Vec::new();
        while r.finished.front().is_some_and(|&(at, _)| at.elapsed() >= self.config.finished_job_ttl) {
            gone.extend(r.pop_finished());
        }
        // Outputs read since the last job ended may go now.
        r.shed_payloads(self.config.max_finished_bytes);
        let mut stale = Vec::new();
        while let Some(&(at, id)) = r.new.front() {
            if at.elapsed() < self.config.new_job_ttl {
                break;
            }
            r.new.pop_front();
            stale.extend(r.jobs.get(&id).filter(|j| j.status() == Status::New).cloned());
        }
        drop(r);
        for job in gone {
            self.forget(&job);
        }
        // Ended, not just dropped: a reader waiting on one gets an answer.
        for job in stale {
            self.fail(&job, &Error::Expired(job.id));
        }
    }

    // ---- records -------------------------------------------------------------

    /// Appends the job, as queued, and its input (if it is small enough to
    /// keep) to the journal.
    fn journal_input(&self, job: &Job) -> Result<()> {
        let input = job.inner().state.input.clone();
        let kept: &[u8] = if input.len() <= KEPT_INPUT_BYTES { &input } else { &[] };
        let mut record = Record::of(job);
        record.status = Status::Queued;
        record.input_len = (input.len() <= KEPT_INPUT_BYTES).then_some(kept.len());
        let header = serde_json::to_vec(&record).expect("records serialize");
        let n = self.journal.append(&header, kept).map_err(|e| Error::io("appending to the job journal", e))?;
        *job.journal.lock().unwrap() = Some(n);
        let _ = job.journaled_in.set(n);
        Ok(())
    }

    /// The job no longer needs its journal entry. Exactly once per job, even
    /// when a cancel and the acceptance race to end it.
    fn release_journal(&self, job: &Job) {
        if let Some(n) = job.journal.lock().unwrap().take() {
            self.journal.done(n);
        }
    }

    /// Records an ended job, with its output if given: one catalog write
    /// per job, made by the housekeeper (off the request's path). Until the
    /// catalog has it and is flushed, the job's journal is kept: if a crash
    /// comes first, the job runs again (or fails "restarted" if its input
    /// was too large to journal).
    fn persist(&self, job: &Job, output: Option<&[u8]>) {
        let mut value = serde_json::to_vec(&Record::of(job)).expect("records serialize");
        if let Some(output) = output {
            // Compact JSON has no raw newline: the first one ends the record.
            value.push(b'\n');
            value.extend_from_slice(output);
        }
        self.unwritten.lock().unwrap().push((job.id, Some(value)));
    }

    /// Removes a retired job's record. While its journal entry may still
    /// be read at a restart, a tombstone stands in for the record, so the
    /// job does not come back; it goes with the journal.
    fn forget(&self, job: &Job) {
        let value = match job.journaled_in.get() {
            Some(&n) if self.journal.holds(n) => {
                self.retired.lock().unwrap().entry(n).or_default().push(job.id);
                Some(TOMBSTONE.to_vec())
            }
            _ => None,
        };
        self.unwritten.lock().unwrap().push((job.id, value));
    }

    /// Journals `deleted` are gone: so are their retired jobs' tombstones.
    fn forget_tombstones(&self, deleted: &[u64]) {
        let mut retired = self.retired.lock().unwrap();
        let ids: Vec<u64> = deleted.iter().filter_map(|n| retired.remove(n)).flatten().collect();
        drop(retired);
        self.unwritten.lock().unwrap().extend(ids.into_iter().map(|id| (id, None)));
    }

    /// Makes the catalog changes [`Shared::persist`] and [`Shared::forget`]
    /// queued, in order. What fails stays queued, and the error is returned
    /// (so no journal is deleted on the strength of it).
    fn write_records(&self) -> sled::Result<()> {
        let mut failed = Vec::new();
        let mut error = None;
        for (id, value) in std::mem::take(&mut *self.unwritten.lock().unwrap()) {
            let written = match &value {
                Some(value) => self.records.insert(id.to_be_bytes(), value.as_slice()).map(drop),
                None => self.records.remove(id.to_be_bytes()).map(drop),
            };
            if let Err(e) = written {
                failed.push((id, value));
                error.get_or_insert(e);
            }
        }
        match error {
            None => Ok(()),
            Some(e) => {
                let mut unwritten = self.unwritten.lock().unwrap();
                failed.append(&mut unwritten);
                *unwritten = failed;
                Err(e)
            }
        }
    }

    /// Brings back the jobs of an earlier run (see the module header):
    /// records from the catalog, and from the journal each accepted job
    /// whose catalog record the crash lost or left behind.
    fn recover(&self, entries: Vec<crate::journal::Entry>) -> Result<()> {
        let mut records = BTreeMap::new();
        let mut outputs = HashMap::new();
        let mut tombstones = Vec::new();
        for entry in self.records.iter() {
            let (key, value) = entry?;
            if &*value == TOMBSTONE {
                tombstones.extend(key.as_ref().try_into().map(u64::from_be_bytes));
                continue;
            }
            let (record, output) = match value.iter().position(|&b| b == b'\n') {
                Some(n) => (&value[..n], Some(value[n + 1..].to_vec())),
                None => (&value[..], None),
            };
            match serde_json::from_slice::<Record>(record) {
                Ok(rec) => {
                    if let Some(output) = output {
                        outputs.insert(rec.id, output);
                    }
                    records.insert(rec.id, rec);
                }
                Err(_) => tracing::warn!("skipping an unreadable job record"),
            }
        }
        let mut inputs = HashMap::new();
        for entry in entries {
            let Ok(rec) = serde_json::from_slice::<Record>(&entry.header) else { continue };
            if tombstones.contains(&rec.id) {
                continue; // retired before the restart
            }
            if records.get(&rec.id).is_none_or(|r| matches!(r.status, Status::New | Status::Queued | Status::Running)) {
                if rec.input_len.is_some() {
                    inputs.insert(rec.id, entry.input);
                }
                records.insert(rec.id, rec);
            }
        }

        let mut requeue = Vec::new();
        for rec in records.into_values() {
            let version = self
                .store
                .model(&rec.model)
                .ok()
                .and_then(|m| m.versions.get(&rec.version).map(|v| (v.clone(), m.config.clone())));
            let output = outputs.remove(&rec.id);
            let input = inputs.remove(&rec.id);
            let job = rec.to_job(version.clone(), input.clone(), output);
            match rec.status {
                Status::New if version.is_some() => self.register(&job, false),
                Status::Queued | Status::Running if version.is_some() && input.is_some() => {
                    self.register(&job, false);
                    requeue.push((job, input.expect("checked")));
                }
                Status::New | Status::Queued | Status::Running => {
                    self.register(&job, false);
                    self.end(&job, Status::Failed, Err(Failure::of(&Error::Restarted(rec.id))));
                }
                Status::Done | Status::Failed | Status::Cancelled => self.register(&job, true),
            }
        }

        let count = requeue.len();
        for (job, input) in requeue {
            // The workers start after this and find the queue.
            if let Err(e) = self.enqueue(&job, input) {
                self.fail(&job, &e);
            }
        }
        if count > 0 {
            tracing::info!(jobs = count, "queued again the jobs an earlier run left unfinished");
        }
        // Requeued jobs are in the new journal now, and the records of the
        // jobs failed above are made durable before the old journals go;
        // the tombstones go with them.
        self.write_records()?;
        self.records.flush()?;
        self.journal.sync().map_err(|e| Error::io("syncing the job journal", e))?;
        self.journal.drop_old();
        self.unwritten.lock().unwrap().extend(tombstones.into_iter().map(|id| (id, None)));
        Ok(())
    }
}

/// How often the housekeeper makes the journal durable (as sled flushes its
/// log): a power loss may lose the jobs accepted in this window.
const JOURNAL_SYNC: Duration = Duration::from_millis(500);

/// The catalog value of a retired job whose journal entry still exists.
const TOMBSTONE: &[u8] = b"retired";

/// Outputs up to this size are kept in the catalog across a restart.
const KEPT_OUTPUT_BYTES: usize = 256 << 10;

/// Inputs up to this size are journaled, so their jobs run again after a
/// restart. Copying a larger one to disk for every request costs more than
/// the rare rerun saves (a 64 MB tensor spent a third of its time there);
/// its job fails "the daemon restarted" instead.
const KEPT_INPUT_BYTES: usize = 16 << 20;

/// Runs one request, or several stacked along the first dimension and
/// split back; returns each request's outputs.
fn run_batch(instance: &mut dyn Instance, live: &mut [(Arc<Job>, Request)]) -> Result<Vec<Vec<Tensor>>> {
    if let [(_, request)] = live {
        return Ok(vec![instance.run(std::mem::take(&mut request.inputs))?]);
    }
    let rows: Vec<usize> = live.iter().map(|(_, r)| r.inputs[0].shape[0]).collect();
    let stacked: Vec<Tensor> = (0..live[0].1.inputs.len())
        .map(|k| Tensor::stack(&live.iter().map(|(_, r)| &r.inputs[k]).collect::<Vec<_>>()))
        .collect();
    let outputs = instance.run(stacked)?;
    let mut per_job: Vec<Vec<Tensor>> = vec![Vec::with_capacity(outputs.len()); live.len()];
    for out in &outputs {
        let Some(pieces) = out.split(&rows) else {
            // An output that does not keep the batch dimension: run one by one.
            return live.iter_mut().map(|(_, r)| instance.run(std::mem::take(&mut r.inputs))).collect();
        };
        for (job_outputs, piece) in per_job.iter_mut().zip(pieces) {
            job_outputs.push(piece);
        }
    }
    Ok(per_job)
}

/// A job as kept in the catalog's `jobs` tree. Times in microseconds since
/// the Unix epoch.
#[derive(Serialize, Deserialize)]
struct Record {
    id: u64,
    uid: u32,
    gid: u32,
    model: String,
    version: u32,
    digest: Digest,
    status: Status,
    priority: i32,
    device: String,
    created: u64,
    submitted: Option<u64>,
    started: Option<u64>,
    finished: Option<u64>,
    queue_us: Option<u64>,
    compute_us: Option<u64>,
    batch_size: Option<usize>,
    failure: Option<Failure>,
    /// In a journal entry: the length of the input after it; `None` when
    /// the input was too large to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    input_len: Option<usize>,
}

fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn from_micros(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

impl Record {
    fn of(job: &Job) -> Record {
        let s = job.snapshot();
        Record {
            id: job.id,
            uid: job.uid,
            gid: job.gid,
            model: job.model.clone(),
            version: job.version,
            digest: job.digest,
            status: s.status,
            priority: s.priority,
            device: s.device,
            created: micros(s.created),
            submitted: s.submitted.map(micros),
            started: s.started.map(micros),
            finished: s.finished.map(micros),
            queue_us: s.queue_us,
            compute_us: s.compute_us,
            batch_size: s.batch_size,
            failure: s.outcome.and_then(|o| o.err()),
            input_len: None,
        }
    }

    /// The job as it was, `new` again if it had not finished (recovery
    /// submits it again). A finished job gets its outcome back.
    fn to_job(
        &self,
        version: Option<(Arc<Version>, ModelConfig)>,
        input: Option<Vec<u8>>,
        output: Option<Vec<u8>>,
    ) -> Arc<Job> {
        let finished = self.status.is_finished();
        let outcome = match (&self.failure, output) {
            _ if !finished => None,
            (Some(f), _) => Some(Err(f.clone())),
            (None, Some(out)) => Some(Ok(Arc::new(out))),
            (None, None) => Some(Err(Failure::of(&Error::OutputNotKept(self.id)))),
        };
        let (version, config) = version.map_or((None, ModelConfig::default()), |(v, c)| (Some(v), c));
        Job::new(
            self.id,
            self.uid,
            self.gid,
            self.model.clone(),
            self.version,
            self.digest,
            Inner {
                state: JobState {
                    status: if finished { self.status } else { Status::New },
                    input: Arc::new(input.unwrap_or_default()),
                    outcome,
                    priority: self.priority,
                    device: self.device.clone(),
                    created: from_micros(self.created),
                    submitted: self.submitted.map(from_micros),
                    started: self.started.map(from_micros),
                    finished: self.finished.map(from_micros),
                    queue_us: self.queue_us,
                    compute_us: self.compute_us,
                    batch_size: self.batch_size,
                },
                request: None,
                version: if finished { None } else { version },
                config,
                queued_at: None,
                waiters: Vec::new(),
            },
        )
    }
}
