//! The housekeeper: one thread that ticks every 50 ms to time out jobs,
//! unload idle models, write job records and sync the journal, and retire
//! old jobs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::sched;
use crate::store::Digest;

use super::job::{Failure, Job, Status};
use super::loaded::Resident;
use super::records::JOURNAL_SYNC;
use super::Shared;
impl Shared {
    pub(super) fn housekeeping(&self) {
        let tick = Duration::from_millis(50);
        let mut last_sync = Instant::now();
        loop {
            let mut s = self.sched.lock().unwrap();
            s = self.tick.wait_timeout(s, tick).unwrap().0;
            if s.shutdown {
                drop(s);
                if let Err(e) = self.records.write() {
                    tracing::warn!("recording finished jobs: {e}");
                }
                return;
            }
            let now = Instant::now();
            // A generation that has begun to answer is bounded by its
            // max_tokens, not by the clock: a long answer is not cut.
            let past = |j: &Job| j.deadline.get().is_some_and(|&t| t <= now) && j.inner().state.generation.is_none();
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
                            sched::Resident {
                                key: *k,
                                bytes: r.held_bytes(),
                                busy: r.in_use(),
                                last_used: r.last_used,
                            },
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
                self.devices[d].note_loaded_bytes(dq.resident.values().map(Resident::held_bytes).sum());
            }
            drop(s);
            drop(unloaded);
            if last_sync.elapsed() >= JOURNAL_SYNC {
                self.records.sync_journal();
                last_sync = Instant::now();
            }
            if let Err(e) = self.records.write() {
                tracing::warn!("recording finished jobs (will retry): {e}");
            }
            self.records.collect();
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
    pub(super) fn retire_old(&self) {
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
            self.records.forget(&job);
        }
        // Ended, not just dropped: a reader waiting on one gets an answer.
        for job in stale {
            self.fail(&job, &Error::Expired(job.id));
        }
    }
}
