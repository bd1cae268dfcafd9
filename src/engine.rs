//! The inference engine: jobs, the queue, worker threads and loaded models.
//!
//! Every request is a [`Job`], whichever way it came (`infer` or `clone`).
//! A job is `new` until its input is submitted; [`Engine::submit`] decodes
//! and checks the input against the version's signature *before* queueing
//! (so a malformed request fails at once with EINVAL and its reason), then
//! queues it. Workers (one per core) take jobs in FIFO order, load the
//! version on first use, run, encode the output in the request's codec and
//! finish the job.
//!
//! **Waiting never blocks a thread.** [`Job::when_done`] takes a callback
//! that runs when the job ends (at once if it already has). The FUSE
//! adapter passes one that sends the reply, so a reader blocked on an
//! output holds no FUSE worker.
//!
//! **Loaded models.** A version is loaded once and shared: a pool of
//! backend [`Instance`]s (one request at a time runs on each), grown on
//! demand up to the number of workers. Every load re-reads the blob and
//! verifies its sha256, so a tampered file is refused (EIO), not run.
//!
//! **Retention.** Finished jobs are kept up to `max_finished_jobs` (oldest
//! dropped first); jobs left `new` are dropped after `new_job_ttl`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::{Backends, Instance};
use crate::codec::{self, Request};
use crate::error::{Error, Result};
use crate::store::{Digest, Store, Version};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Threads that run jobs (default: one per core).
    pub workers: usize,
    /// Largest request accepted, in bytes (EFBIG beyond).
    pub max_input_bytes: u64,
    /// Finished jobs kept for reading before the oldest are dropped.
    pub max_finished_jobs: usize,
    /// How long a job may stay `new` (cloned, no input) before it is dropped.
    pub new_job_ttl: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_input_bytes: 1 << 30,
            max_finished_jobs: 10_000,
            new_job_ttl: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

struct Inner {
    state: JobState,
    /// The decoded request, between submit and run.
    request: Option<Request>,
    version: Option<Version>,
    queued_at: Option<Instant>,
    waiters: Vec<Waiter>,
}

impl Job {
    pub fn snapshot(&self) -> JobState {
        self.inner().state.clone()
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

    /// Ends the job (unless it already ended) and wakes its waiters.
    /// Returns whether this call ended it.
    fn finish(&self, status: Status, outcome: Outcome) -> bool {
        let mut inner = self.inner();
        if inner.state.status.is_finished() {
            return false;
        }
        inner.state.status = status;
        inner.state.finished = Some(SystemTime::now());
        inner.state.outcome = Some(outcome.clone());
        inner.request = None;
        let waiters = std::mem::take(&mut inner.waiters);
        drop(inner);
        for w in waiters {
            w(&outcome);
        }
        true
    }
}

/// A version loaded for running: a pool of instances.
struct Loaded {
    pool: Mutex<Pool>,
    returned: Condvar,
}

#[derive(Default)]
struct Pool {
    idle: Vec<Box<dyn Instance>>,
    /// Instances in existence (idle or running) or being created.
    count: usize,
}

pub struct Engine {
    shared: Arc<Shared>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

struct Shared {
    store: Arc<Store>,
    backends: Backends,
    config: EngineConfig,
    next_id: AtomicU64,
    registry: Mutex<Registry>,
    queue: Mutex<Queue>,
    queued: Condvar,
    loaded: Mutex<HashMap<Digest, Arc<Loaded>>>,
}

/// All jobs by id, with the order in which they became finished or were
/// created, so retention is O(1) per job.
#[derive(Default)]
struct Registry {
    jobs: BTreeMap<u64, Arc<Job>>,
    finished: VecDeque<u64>,
    new: VecDeque<(Instant, u64)>,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Arc<Job>>,
    shutdown: bool,
}

impl Engine {
    pub fn start(store: Arc<Store>, backends: Backends, config: EngineConfig) -> Engine {
        let shared = Arc::new(Shared {
            store,
            backends,
            next_id: AtomicU64::new(1),
            registry: Mutex::new(Registry::default()),
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            loaded: Mutex::new(HashMap::new()),
            config,
        });
        let workers = (0..shared.config.workers.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("worker-{i}"))
                    .spawn(move || shared.work())
                    .expect("spawning a worker")
            })
            .collect();
        Engine { shared, workers }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// A new job (state `new`) for a version, owned by `uid`/`gid`.
    pub fn create_job(&self, uid: u32, gid: u32, model: &str, version: u32) -> Result<Arc<Job>> {
        let m = self.shared.store.model(model)?;
        let v = m.versions.get(&version).ok_or_else(|| Error::NotFound(format!("models/{model}/v{version}")))?;
        let job = Arc::new(Job {
            id: self.shared.next_id.fetch_add(1, Ordering::Relaxed),
            uid,
            gid,
            model: model.to_string(),
            version,
            digest: v.digest,
            inner: Mutex::new(Inner {
                state: JobState {
                    status: Status::New,
                    input: Arc::new(Vec::new()),
                    outcome: None,
                    priority: 0,
                    device: "cpu".into(),
                    created: SystemTime::now(),
                    submitted: None,
                    started: None,
                    finished: None,
                    queue_us: None,
                    compute_us: None,
                },
                request: None,
                version: Some(v.clone()),
                queued_at: None,
                waiters: Vec::new(),
            }),
        });
        let mut r = self.shared.registry.lock().unwrap();
        let ttl = self.shared.config.new_job_ttl;
        while let Some(&(created, id)) = r.new.front() {
            if created.elapsed() < ttl {
                break;
            }
            r.new.pop_front();
            if r.jobs.get(&id).is_some_and(|j| j.status() == Status::New) {
                tracing::info!(job = id, "dropping a job left new for over {ttl:?}");
                r.jobs.remove(&id);
            }
        }
        r.jobs.insert(job.id, job.clone());
        r.new.push_back((Instant::now(), job.id));
        Ok(job)
    }

    pub fn job(&self, id: u64) -> Option<Arc<Job>> {
        self.shared.registry.lock().unwrap().jobs.get(&id).cloned()
    }

    /// Jobs of a version that have not finished (`new` ones included).
    pub fn unfinished_jobs(&self, model: &str, version: u32) -> Vec<u64> {
        let r = self.shared.registry.lock().unwrap();
        r.jobs
            .values()
            .filter(|j| j.model == model && j.version == version && !j.status().is_finished())
            .map(|j| j.id)
            .collect()
    }

    pub fn job_ids(&self) -> Vec<u64> {
        self.shared.registry.lock().unwrap().jobs.keys().copied().collect()
    }

    /// Submits a `new` job's input: decodes and checks it (failing the job
    /// with the reason if it does not fit the model), then queues it.
    pub fn submit(&self, job: &Arc<Job>, input: Vec<u8>) -> Result<()> {
        let mut inner = job.inner();
        if inner.state.status != Status::New {
            return Err(Error::Busy(format!("job {}: already submitted", job.id)));
        }
        inner.state.input = Arc::new(input);
        inner.state.submitted = Some(SystemTime::now());
        let version = inner.version.take().expect("a new job has its version");
        let decoded = codec::decode(&inner.state.input, &version.signature).and_then(|mut r| {
            version.signature.check(std::mem::take(&mut r.inputs)).map(|inputs| Request { inputs, ..r })
        });
        match decoded {
            Ok(request) => {
                inner.request = Some(request);
                inner.version = Some(version);
                inner.state.status = Status::Queued;
                inner.queued_at = Some(Instant::now());
                drop(inner);
                let mut q = self.shared.queue.lock().unwrap();
                q.jobs.push_back(job.clone());
                drop(q);
                self.shared.queued.notify_one();
                Ok(())
            }
            Err(e) => {
                drop(inner);
                tracing::info!(job = job.id, model = %job.model, version = job.version, "rejected: {e}");
                self.fail(job, &e);
                Err(e)
            }
        }
    }

    /// Cancels a job that has not finished: its readers get ECANCELED. A
    /// running job's result is discarded when it comes.
    pub fn cancel(&self, job: &Job) -> Result<()> {
        let status = job.status();
        if status.is_finished() {
            return Err(Error::InvalidArgument(format!("job {} already finished ({})", job.id, status.name())));
        }
        let e = Error::Cancelled(job.id);
        if job.finish(Status::Cancelled, Err(Failure::of(&e))) {
            self.shared.retire(job.id);
        }
        tracing::info!(job = job.id, "cancelled");
        Ok(())
    }

    /// Marks a job failed before it ran (bad input, too big).
    pub fn fail(&self, job: &Job, e: &Error) {
        if job.finish(Status::Failed, Err(Failure::of(e))) {
            self.shared.retire(job.id);
        }
    }

    /// Sets the priority of a job that has not started.
    pub fn set_priority(&self, job: &Job, priority: i32) -> Result<()> {
        let mut inner = job.inner();
        match inner.state.status {
            Status::New | Status::Queued => {
                inner.state.priority = priority;
                Ok(())
            }
            s => Err(Error::ReadOnly(format!("jobs/{}/priority: the job is {}", job.id, s.name()))),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().shutdown = true;
        self.shared.queued.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Shared {
    fn work(&self) {
        while let Some(job) = self.next_job() {
            let (request, version) = {
                let mut inner = job.inner();
                if inner.state.status != Status::Queued {
                    continue; // cancelled while queued
                }
                inner.state.status = Status::Running;
                inner.state.started = Some(SystemTime::now());
                let queued_at = inner.queued_at.take().expect("queued jobs have a time");
                inner.state.queue_us = Some(queued_at.elapsed().as_micros() as u64);
                let request = inner.request.take().expect("queued jobs have a request");
                (request, inner.version.clone().expect("queued jobs have a version"))
            };
            let started = Instant::now();
            let result = self.execute(&job, &version, request);
            job.inner().state.compute_us = Some(started.elapsed().as_micros() as u64);
            let ended = match result {
                Ok(output) => job.finish(Status::Done, Ok(Arc::new(output))),
                Err(e) => {
                    tracing::warn!(job = job.id, model = %job.model, version = job.version, "failed: {e}");
                    job.finish(Status::Failed, Err(Failure::of(&e)))
                }
            };
            if ended {
                self.retire(job.id);
            }
        }
    }

    fn next_job(&self) -> Option<Arc<Job>> {
        let mut q = self.queue.lock().unwrap();
        loop {
            if q.shutdown {
                return None;
            }
            if let Some(job) = q.jobs.pop_front() {
                return Some(job);
            }
            q = self.queued.wait(q).unwrap();
        }
    }

    fn execute(&self, job: &Job, version: &Version, request: Request) -> Result<Vec<u8>> {
        let loaded = self.loaded(version);
        let mut instance = self.acquire(&loaded, version)?;
        let result = instance.run(request.inputs.clone());
        self.release(&loaded, instance);
        codec::encode(&request, result?, &job.model, job.version)
    }

    fn loaded(&self, version: &Version) -> Arc<Loaded> {
        self.loaded
            .lock()
            .unwrap()
            .entry(version.digest)
            .or_insert_with(|| Arc::new(Loaded { pool: Mutex::new(Pool::default()), returned: Condvar::new() }))
            .clone()
    }

    /// An idle instance, a new one (up to one per worker), or the next one
    /// returned.
    fn acquire(&self, loaded: &Loaded, version: &Version) -> Result<Box<dyn Instance>> {
        let mut pool = loaded.pool.lock().unwrap();
        loop {
            if let Some(instance) = pool.idle.pop() {
                return Ok(instance);
            }
            if pool.count < self.config.workers.max(1) {
                pool.count += 1;
                drop(pool);
                let made = self.load(version);
                if made.is_err() {
                    loaded.pool.lock().unwrap().count -= 1;
                    loaded.returned.notify_one();
                }
                return made;
            }
            pool = loaded.returned.wait(pool).unwrap();
        }
    }

    fn release(&self, loaded: &Loaded, instance: Box<dyn Instance>) {
        loaded.pool.lock().unwrap().idle.push(instance);
        loaded.returned.notify_one();
    }

    /// Reads the version's file, verifies its sha256, and loads it.
    fn load(&self, version: &Version) -> Result<Box<dyn Instance>> {
        let (file_name, digest) =
            version.files.iter().next().ok_or_else(|| Error::Runtime("version has no files".into()))?;
        let path = self.store.blob_path(digest);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(path.display().to_string(), e))?;
        if Digest::of(&bytes) != *digest {
            return Err(Error::Runtime(format!(
                "blob {digest} of {file_name} does not match its digest (modified on disk?); refusing to run it"
            )));
        }
        let backend = self.backends.for_file(file_name)?;
        let instance = backend.load(&bytes, file_name)?;
        tracing::info!(file = %file_name, blob = %digest, "loaded an instance");
        Ok(instance)
    }

    /// Records that a job finished; drops the oldest finished jobs beyond
    /// the configured count.
    fn retire(&self, id: u64) {
        let mut r = self.registry.lock().unwrap();
        r.finished.push_back(id);
        while r.finished.len() > self.config.max_finished_jobs {
            let oldest = r.finished.pop_front().expect("non-empty");
            r.jobs.remove(&oldest);
        }
    }
}
