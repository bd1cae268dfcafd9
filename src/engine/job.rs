//! A [`Job`]: one request from submission to output, its state as the
//! job files show it, how it ends (once), and the [`Registry`] of all jobs
//! with their retention order.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::codec::Request;
use crate::error::Error;
use crate::store::{Digest, ModelConfig, Version};

use super::run::Run;
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
    pub(super) fn of(e: &Error) -> Failure {
        Failure { errno: e.errno(), reason: crate::error::one_line(&e.to_string()) }
    }

    pub fn to_error(&self) -> Error {
        Error::Job { errno: self.errno, message: self.reason.clone() }
    }
}

/// How a job ended: its output, or its failure.
pub type Outcome = std::result::Result<Arc<Vec<u8>>, Failure>;

pub(super) type Waiter = Box<dyn FnOnce(&Outcome) + Send>;

/// What a reader at some position gets ([`Job::when_output`]).
pub enum Output {
    /// The answer so far, streamed while the job runs (a language
    /// model's): longer than the reader's position.
    More(Arc<Vec<u8>>),
    /// The job ended.
    Ended(Outcome),
}

type Reader = Box<dyn FnOnce(Output) + Send>;

/// A generation's progress, for `status`, `times` and `/status`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub prompt_tokens: usize,
    pub tokens: usize,
    pub max_tokens: usize,
    /// From the start of its run to its first token.
    pub first_token_us: Option<u64>,
    /// Tokens per second after the first, an end-of-turn token counted
    /// (it takes a step like any other).
    pub tokens_per_s: f64,
}

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
    pub(super) deadline: OnceLock<Instant>,
    pub(super) device: OnceLock<usize>,
    /// The journal its acceptance went to, until the job ends: taken once,
    /// by whichever path ends it.
    pub(super) journal: Mutex<Option<u64>>,
    /// The same, kept: where its entry is while that journal exists.
    pub(super) journaled_in: OnceLock<u64>,
    /// A reader has had its whole output ([`Job::mark_output_read`]).
    pub(super) output_read: std::sync::atomic::AtomicBool,
    /// Input bytes charged to its user while it is queued or running
    /// ([`Registry::charge`]); its whole payload once it has finished.
    pub(super) charged: std::sync::atomic::AtomicUsize,
    /// The length of its output, once dropped ([`Job::drop_payload`]).
    pub(super) dropped_len: OnceLock<usize>,
    pub(super) inner: Mutex<Inner>,
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
    /// A language model's job: its generation's progress, once it began.
    pub generation: Option<Progress>,
}

impl JobState {
    pub(super) fn payload_bytes(&self) -> usize {
        self.input.len() + self.outcome.as_ref().and_then(|o| o.as_ref().ok()).map_or(0, |o| o.len())
    }
}

pub(super) struct Inner {
    pub(super) state: JobState,
    /// The decoded request, between submit and run.
    pub(super) request: Option<Request>,
    /// The version record (signature, files), while the job may still run.
    pub(super) version: Option<Arc<Version>>,
    pub(super) config: ModelConfig,
    pub(super) queued_at: Option<Instant>,
    pub(super) waiters: Vec<Waiter>,
    /// The run it is part of, while it runs.
    pub(super) run: Option<Arc<Run>>,
    /// A language model's answer so far, while it is generated.
    pub(super) streamed: Arc<Vec<u8>>,
    /// Readers waiting past the answer so far, with their positions.
    pub(super) readers: Vec<(usize, Reader)>,
    /// A generation between its turns on a worker.
    pub(super) generating: Option<Box<super::generate::Generating>>,
}

impl Inner {
    /// A queued job starts running now, in a batch of `batch_size`.
    pub(super) fn start(&mut self, now: SystemTime, batch_size: usize) {
        self.state.status = Status::Running;
        self.state.started = Some(now);
        self.state.batch_size = Some(batch_size);
        self.state.queue_us = self.queued_at.take().map(|t| t.elapsed().as_micros() as u64);
    }
}

impl Job {
    pub(super) fn new(
        id: u64,
        uid: u32,
        gid: u32,
        model: String,
        version: u32,
        digest: Digest,
        inner: Inner,
    ) -> Arc<Job> {
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
            dropped_len: OnceLock::new(),
            charged: Default::default(),
            inner: Mutex::new(inner),
        })
    }

    pub fn snapshot(&self) -> JobState {
        self.inner().state.clone()
    }

    /// The bytes of input and output it holds.
    pub(super) fn payload_bytes(&self) -> usize {
        self.inner().state.payload_bytes()
    }

    /// A reader has had the whole output: from now on the job may drop it
    /// to stay within `max_finished_bytes`.
    pub fn mark_output_read(&self) {
        self.output_read.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Drops the input and output of a finished job whose output was read
    /// (or that has none); returns the bytes freed.
    pub(super) fn drop_payload(&self) -> usize {
        let mut inner = self.inner();
        let read = self.output_read.load(std::sync::atomic::Ordering::Relaxed);
        let has_output = matches!(inner.state.outcome, Some(Ok(_)));
        if !inner.state.status.is_finished() || (has_output && !read) {
            return 0;
        }
        let freed = inner.state.payload_bytes();
        inner.state.input = Arc::new(Vec::new());
        if let Some(Ok(output)) = &inner.state.outcome {
            let _ = self.dropped_len.set(output.len());
            inner.state.outcome = Some(Err(Failure::of(&Error::OutputDropped(self.id))));
        }
        freed
    }

    /// Whether a read at `offset` of a dropped output is at or past its
    /// end: a reader that had the whole answer gets end-of-file, not
    /// ENODATA, when it reads once more.
    pub fn read_past_dropped(&self, offset: usize) -> bool {
        self.dropped_len.get().is_some_and(|&len| offset >= len)
    }

    pub fn status(&self) -> Status {
        self.inner().state.status
    }

    pub(super) fn inner(&self) -> MutexGuard<'_, Inner> {
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

    /// Calls `f` once the job has output past `pos` or has ended: at once
    /// if it has, else from the thread that streams more or ends it. Only
    /// a language model's job streams; any other's readers wait for its
    /// end. Never called with a lock held.
    pub fn when_output(&self, pos: usize, f: impl FnOnce(Output) + Send + 'static) {
        let mut inner = self.inner();
        if let Some(outcome) = inner.state.outcome.clone() {
            drop(inner);
            f(Output::Ended(outcome));
        } else if inner.streamed.len() > pos {
            let so_far = inner.streamed.clone();
            drop(inner);
            f(Output::More(so_far));
        } else {
            inner.readers.push((pos, Box::new(f)));
        }
    }

    /// Adds to the answer of a running job, and wakes its readers.
    pub(super) fn stream(&self, bytes: &[u8]) {
        let mut inner = self.inner();
        if bytes.is_empty() || inner.state.status.is_finished() {
            return;
        }
        Arc::make_mut(&mut inner.streamed).extend_from_slice(bytes);
        let so_far = inner.streamed.clone();
        let readers = std::mem::take(&mut inner.readers);
        drop(inner);
        for (_, r) in readers {
            r(Output::More(so_far.clone()));
        }
    }

    /// The whole answer, to end the job with: what was streamed and then
    /// `last`, taken out of the job (a reader in between waits for the end).
    pub(super) fn take_streamed(&self, last: &[u8]) -> Arc<Vec<u8>> {
        let mut all = std::mem::take(&mut self.inner().streamed);
        Arc::make_mut(&mut all).extend_from_slice(last);
        all
    }

    /// Ends the job unless it already ended, and wakes its waiters. Returns
    /// whether this call ended it.
    pub(super) fn finish(&self, status: Status, outcome: Outcome) -> bool {
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
        let readers = std::mem::take(&mut inner.readers);
        let run = inner.run.take();
        let generating = inner.generating.take();
        inner.streamed = Arc::default();
        drop(inner);
        drop(generating);
        if let Some(run) = run {
            run.job_ended();
        }
        for w in waiters {
            w(&outcome);
        }
        for (_, r) in readers {
            r(Output::Ended(outcome.clone()));
        }
        true
    }
}

/// All jobs by id, with the order in which they were created or finished,
/// so retention is O(1) per job; and what each user's jobs hold, so that
/// one user's flood retires and refuses only that user's jobs.
#[derive(Default)]
pub(super) struct Registry {
    pub(super) jobs: BTreeMap<u64, Arc<Job>>,
    /// Finished jobs, oldest first: when they finished, and id (a job
    /// retired by its user's count stays listed until its time).
    pub(super) finished: VecDeque<(Instant, u64)>,
    /// What the finished jobs hold, in bytes (their inputs and outputs).
    pub(super) finished_bytes: usize,
    pub(super) new: VecDeque<(Instant, u64)>,
    /// Each user's finished jobs, oldest first, and how many there are.
    finished_of: HashMap<u32, (VecDeque<u64>, usize)>,
    /// Bytes each user's jobs hold: inputs of queued and running jobs,
    /// inputs and outputs of finished ones.
    held: HashMap<u32, usize>,
}

impl Registry {
    /// Bytes `uid`'s jobs hold.
    pub(super) fn held(&self, uid: u32) -> usize {
        self.held.get(&uid).copied().unwrap_or(0)
    }

    /// `uid`'s jobs hold `bytes` more (a request queued).
    pub(super) fn charge(&mut self, uid: u32, bytes: usize) {
        *self.held.entry(uid).or_default() += bytes;
    }

    /// `uid`'s jobs hold `bytes` less.
    pub(super) fn release(&mut self, uid: u32, bytes: usize) {
        if let Some(held) = self.held.get_mut(&uid) {
            *held = held.saturating_sub(bytes);
        }
    }

    pub(super) fn push_finished(&mut self, job: &Job) {
        self.finished.push_back((Instant::now(), job.id));
        let bytes = job.payload_bytes();
        self.finished_bytes += bytes;
        self.charge(job.uid, bytes);
        let (ids, count) = self.finished_of.entry(job.uid).or_default();
        ids.push_back(job.id);
        *count += 1;
    }

    /// Finished jobs of `uid`.
    pub(super) fn finished_count(&self, uid: u32) -> usize {
        self.finished_of.get(&uid).map_or(0, |(_, count)| *count)
    }

    /// Takes a finished job out of the registry, and what it held.
    fn remove_finished(&mut self, id: u64) -> Option<Arc<Job>> {
        let job = self.jobs.remove(&id)?;
        let bytes = job.payload_bytes();
        self.finished_bytes -= bytes;
        self.release(job.uid, bytes);
        if let Some((_, count)) = self.finished_of.get_mut(&job.uid) {
            *count -= 1;
        }
        Some(job)
    }

    /// Removes the oldest finished job.
    pub(super) fn pop_finished(&mut self) -> Option<Arc<Job>> {
        while let Some((_, id)) = self.finished.pop_front() {
            if let Some(job) = self.remove_finished(id) {
                // Its user's list is in the same order: drop what is gone
                // from its front, so the list does not outgrow the jobs.
                if let Some((ids, _)) = self.finished_of.get_mut(&job.uid) {
                    while ids.front().is_some_and(|id| !self.jobs.contains_key(id)) {
                        ids.pop_front();
                    }
                }
                return Some(job);
            }
        }
        None
    }

    /// Removes `uid`'s oldest finished job.
    pub(super) fn pop_finished_of(&mut self, uid: u32) -> Option<Arc<Job>> {
        while let Some(id) = self.finished_of.get_mut(&uid)?.0.pop_front() {
            if let Some(job) = self.remove_finished(id) {
                return Some(job);
            }
        }
        None
    }

    /// Past `max` bytes, drops the payloads of the oldest finished jobs
    /// that may drop them ([`Job::drop_payload`]).
    pub(super) fn shed_payloads(&mut self, max: u64) {
        let mut i = 0;
        while self.finished_bytes as u64 > max && i < self.finished.len() {
            let id = self.finished[i].1;
            if let Some(job) = self.jobs.get(&id).cloned() {
                let freed = job.drop_payload();
                self.finished_bytes -= freed;
                self.release(job.uid, freed);
            }
            i += 1;
        }
    }
}
