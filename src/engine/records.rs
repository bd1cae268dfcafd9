//! Durable job records: the journal that makes an accepted job survive a
//! crash, the catalog tree of ended jobs, and recovery at start.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::journal::{Entry, Journal};
use crate::store::{Digest, ModelConfig, Store, Version};

use super::job::{Failure, Inner, Job, JobState, Status};
use super::Shared;
/// The journal, the catalog tree of ended jobs, and what is still to be
/// written to it. Every method takes `&self`; each part has its own lock.
pub(super) struct Records {
    /// Ended jobs: the record as one JSON line, then the output if kept.
    pub(super) tree: sled::Tree,
    /// Changes to `tree` not yet made (value to insert, or `None` to
    /// remove), written by the housekeeper in one go per tick.
    pub(super) unwritten: Mutex<Vec<(u64, Option<Vec<u8>>)>>,
    /// Retired jobs with a tombstone in `tree`, by the journal that still
    /// holds their entry.
    pub(super) retired: Mutex<BTreeMap<u64, Vec<u64>>>,
    pub(super) journal: Journal,
    /// For its free space ([`Store::check_room`]).
    store: Arc<Store>,
}

impl Records {
    /// Opens the journal in `<data>/jobs/` and the catalog tree `jobs`;
    /// returns the journal's entries left by an earlier run, for
    /// [`Shared::recover`].
    pub(super) fn open(store: &Arc<Store>) -> Result<(Records, Vec<Entry>)> {
        let dir = store.root().join("jobs");
        crate::store::private_dir(&dir)?;
        let tree = store.db().open_tree("jobs")?;
        // Earlier versions kept outputs in a tree of their own.
        store.db().drop_tree("job_outputs")?;
        let input_len = |header: &[u8]| Some(serde_json::from_slice::<Record>(header).ok()?.input_len.unwrap_or(0));
        let (journal, entries) = Journal::open(&dir, input_len).map_err(|e| Error::io(dir.display().to_string(), e))?;
        let records =
            Records { tree, unwritten: Mutex::default(), retired: Mutex::default(), journal, store: store.clone() };
        Ok((records, entries))
    }

    /// Appends the job, as queued, and its input (if it is small enough to
    /// keep) to the journal.
    pub(super) fn journal_input(&self, job: &Job) -> Result<()> {
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
    pub(super) fn release_journal(&self, job: &Job) {
        if let Some(n) = job.journal.lock().unwrap().take() {
            self.journal.done(n);
        }
    }

    /// Records an ended job, with its output if given: one catalog write
    /// per job, made by the housekeeper (off the request's path). Until the
    /// catalog has it and is flushed, the job's journal is kept: if a crash
    /// comes first, the job runs again (or fails "restarted" if its input
    /// was too large to journal). Small outputs (answers, scores,
    /// embeddings) are kept across a restart; large ones only while the
    /// daemon runs.
    pub(super) fn persist(&self, job: &Job, output: Option<&[u8]>) {
        let mut value = serde_json::to_vec(&Record::of(job)).expect("records serialize");
        if let Some(output) = output.filter(|o| o.len() <= KEPT_OUTPUT_BYTES) {
            // Compact JSON has no raw newline: the first one ends the record.
            value.push(b'\n');
            value.extend_from_slice(output);
        }
        self.unwritten.lock().unwrap().push((job.id, Some(value)));
    }

    /// Removes a retired job's record. While its journal entry may still
    /// be read at a restart, a tombstone stands in for the record, so the
    /// job does not come back; it goes with the journal.
    pub(super) fn forget(&self, job: &Job) {
        let value = match job.journaled_in.get() {
            Some(&n) if self.journal.holds(n) => {
                self.retired.lock().unwrap().entry(n).or_default().push(job.id);
                Some(TOMBSTONE.to_vec())
            }
            _ => None,
        };
        self.unwritten.lock().unwrap().push((job.id, value));
    }

    /// Makes the catalog changes [`Records::persist`] and [`Records::forget`]
    /// queued, in order. What fails stays queued, and the error is returned
    /// (so no journal is deleted on the strength of it). Nothing is
    /// written while the disk is short of the store's reserve: it stays
    /// queued for a later tick.
    pub(super) fn write(&self) -> Result<()> {
        if self.unwritten.lock().unwrap().is_empty() {
            return Ok(());
        }
        self.store.check_room()?;
        let mut failed = Vec::new();
        let mut error = None;
        for (id, value) in std::mem::take(&mut *self.unwritten.lock().unwrap()) {
            let written = match &value {
                Some(value) => self.tree.insert(id.to_be_bytes(), value.as_slice()).map(drop),
                None => self.tree.remove(id.to_be_bytes()).map(drop),
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
                Err(e.into())
            }
        }
    }

    /// Writes what is queued and makes the catalog durable.
    pub(super) fn flush(&self) -> Result<()> {
        self.write()?;
        self.tree.flush()?;
        Ok(())
    }

    /// Makes the journal durable (the housekeeper, every [`JOURNAL_SYNC`]).
    pub(super) fn sync_journal(&self) {
        if let Err(e) = self.journal.sync() {
            tracing::warn!("syncing the job journal: {e}");
        }
    }

    /// Deletes the journals whose jobs have all ended, once their records
    /// are written and flushed; the tombstones of their retired jobs go
    /// with them.
    pub(super) fn collect(&self) {
        // A job releases its journal entry after queueing its record, so
        // writing the queue here covers every job of a journal it deletes.
        let deleted = self.journal.collect(|| self.flush().map_err(std::io::Error::other));
        let mut retired = self.retired.lock().unwrap();
        let ids: Vec<u64> = deleted.iter().filter_map(|n| retired.remove(n)).flatten().collect();
        drop(retired);
        self.unwritten.lock().unwrap().extend(ids.into_iter().map(|id| (id, None)));
    }
}

/// How often the housekeeper makes the journal durable (as sled flushes its
/// log): a power loss may lose the jobs accepted in this window.
pub(super) const JOURNAL_SYNC: Duration = Duration::from_millis(500);

impl Shared {
    /// Brings back the jobs of an earlier run (see the module header):
    /// records from the catalog, and from the journal each accepted job
    /// whose catalog record the crash lost or left behind.
    pub(super) fn recover(&self, entries: Vec<Entry>) -> Result<()> {
        let mut records = BTreeMap::new();
        let mut outputs = HashMap::new();
        let mut tombstones = Vec::new();
        for entry in self.records.tree.iter() {
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
            if let Err(e) = self.enqueue(&job, input, true) {
                self.fail(&job, &e);
            }
        }
        if count > 0 {
            tracing::info!(jobs = count, "queued again the jobs an earlier run left unfinished");
        }
        // Requeued jobs are in the new journal now, and the records of the
        // jobs failed above are made durable before the old journals go;
        // the tombstones go with them.
        let records = &self.records;
        records.journal.sync().map_err(|e| Error::io("syncing the job journal", e))?;
        match records.flush() {
            Ok(()) => records.journal.drop_old(),
            // A full disk: the daemon starts all the same, and the earlier
            // journals stay until the records they hold are written.
            Err(e) => tracing::warn!("recording recovered jobs (kept for later): {e}"),
        }
        records.unwritten.lock().unwrap().extend(tombstones.into_iter().map(|id| (id, None)));
        Ok(())
    }
}

/// The catalog value of a retired job whose journal entry still exists.
pub(super) const TOMBSTONE: &[u8] = b"retired";

/// Outputs up to this size are kept in the catalog across a restart.
pub(super) const KEPT_OUTPUT_BYTES: usize = 256 << 10;

/// Inputs up to this size are journaled, so their jobs run again after a
/// restart. Copying a larger one to disk for every request costs more than
/// the rare rerun saves (a 64 MB tensor spent a third of its time there);
/// its job fails "the daemon restarted" instead.
pub(super) const KEPT_INPUT_BYTES: usize = 16 << 20;

/// A job as kept in the catalog's `jobs` tree. Times in microseconds since
/// the Unix epoch.
#[derive(Serialize, Deserialize)]
pub(super) struct Record {
    pub(super) id: u64,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) model: String,
    pub(super) version: u32,
    pub(super) digest: Digest,
    pub(super) status: Status,
    pub(super) priority: i32,
    pub(super) device: String,
    pub(super) created: u64,
    pub(super) submitted: Option<u64>,
    pub(super) started: Option<u64>,
    pub(super) finished: Option<u64>,
    pub(super) queue_us: Option<u64>,
    pub(super) compute_us: Option<u64>,
    pub(super) batch_size: Option<usize>,
    pub(super) failure: Option<Failure>,
    /// In a journal entry: the length of the input after it; `None` when
    /// the input was too large to keep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) input_len: Option<usize>,
}

pub(super) fn micros(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub(super) fn from_micros(us: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(us)
}

impl Record {
    pub(super) fn of(job: &Job) -> Record {
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
    pub(super) fn to_job(
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
                    generation: None,
                },
                request: None,
                version: if finished { None } else { version },
                config,
                queued_at: None,
                waiters: Vec::new(),
                run: None,
                streamed: Arc::default(),
                readers: Vec::new(),
                generating: None,
            },
        )
    }
}
