//! Language models' jobs: a generation runs in turns.
//!
//! A worker that takes a language model's job starts its generation (the
//! backend's [`Generation`]: the prompt through the chat template, its own
//! KV cache) and steps it one token at a time, streaming each token's
//! bytes to the job's readers ([`Job::stream`]). After each token, if
//! anything else waits on the device's queue, the generation is parked in
//! its job and the job queued again behind it (status still `running`):
//! the scheduler's usual order (priority, aging, per-user turns) decides
//! what runs next, so several generations progress together, token by
//! token, and a short request (an embedding) waits at most one token.
//! With nothing waiting, a generation keeps its worker: no cost to a lone
//! client. Cancelling or timing out a job drops its generation at its next
//! token. A live generation keeps its model loaded, and its KV cache (at
//! its longest: prompt and `max_tokens`) counts in the device's budget.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::backend::{Finish, Generation};
use crate::codec::prompt::{Answer, Prompt};
use crate::error::{Error, Result};
use crate::sched::Queued;

use super::job::{Job, Progress, Status};
use super::loaded::Pool;
use super::queue::Sched;
use super::Shared;

/// A generation with what its answer needs, parked in its job between
/// turns.
pub(super) struct Generating {
    generation: Box<dyn Generation>,
    answer: Answer,
    pool: Arc<Pool>,
    kv_bytes: u64,
    /// Tokens generated (an end-of-turn token is not counted).
    tokens: usize,
    started: Instant,
    first_token: Option<Instant>,
}

impl Drop for Generating {
    fn drop(&mut self) {
        self.pool.generation_ended(self.kv_bytes);
    }
}

/// A turn of a language model's job ([`Shared::turn`]).
enum Turn {
    Continue(Box<Generating>),
    Start(Prompt, Arc<crate::store::Version>, u32),
}

/// Whether a job is a language model's.
pub(super) fn generates(job: &Job) -> bool {
    job.inner().version.as_ref().is_some_and(|v| v.signature.generates)
}

impl Shared {
    /// One turn of a language model's job on device `d` (see the module
    /// header); the job ends here when its generation does or fails.
    /// Returns the generation to park when others wait: the caller queues
    /// it again ([`Shared::park`]) once it has given the turn's slot back.
    pub(super) fn generate(&self, d: usize, job: &Arc<Job>, pool: &Arc<Pool>) -> Option<Box<Generating>> {
        let mut g = match self.turn(job)? {
            Turn::Continue(g) => g,
            Turn::Start(prompt, version, max_tokens) => {
                match self.start_generation(d, &version, pool, &prompt, max_tokens) {
                    Ok(g) => g,
                    Err(e) => {
                        self.fail(job, &e);
                        return None;
                    }
                }
            }
        };
        loop {
            if job.status().is_finished() {
                return None; // cancelled or timed out: the generation is dropped
            }
            let token = match g.generation.step() {
                Ok(token) => token,
                Err(e) => {
                    tracing::warn!(job = job.id, model = %job.model, "generation failed: {e}");
                    self.fail(job, &e);
                    return None;
                }
            };
            let now = Instant::now();
            let first = *g.first_token.get_or_insert(now);
            let end_of_turn = token.end == Some(Finish::Stop) && token.text.is_empty();
            let (mut bytes, stopped) = if end_of_turn {
                (Vec::new(), false)
            } else {
                g.tokens += 1;
                g.answer.push(token.id, &token.text)
            };
            let end = if stopped { Some(Finish::Stop) } else { token.end };
            // The rate counts every step, the one that ends the turn too (it
            // costs a forward pass like any token), as llama.cpp counts it.
            let steps = g.tokens + usize::from(end_of_turn);
            let progress = Progress {
                prompt_tokens: g.generation.prompt_tokens(),
                tokens: g.tokens,
                max_tokens: g.generation.max_tokens(),
                first_token_us: Some((first - g.started).as_micros() as u64),
                tokens_per_s: match (now - first).as_secs_f64() {
                    t if t > 0.0 => steps.saturating_sub(1) as f64 / t,
                    _ => 0.0,
                },
            };
            if let Some(reason) = end {
                bytes.extend(g.answer.finish(reason, progress.prompt_tokens, g.tokens));
            }
            job.inner().state.generation = Some(progress);
            if end.is_none() {
                job.stream(&bytes);
                if self.others_waiting(d) {
                    return Some(g);
                }
                continue;
            }
            // The last bytes come with the end, not before it: a reader
            // that stops at the last line and closes must not find the
            // job running (its close would cancel it).
            let answer = job.take_streamed(&bytes);
            self.record_compute(job, g.started.elapsed().as_micros() as u64);
            self.end(job, Status::Done, Ok(answer));
            return None;
        }
    }

    /// What this turn of `job` does: go on with its parked generation, or
    /// start it (the job was queued); `None` if it ended meanwhile.
    fn turn(&self, job: &Arc<Job>) -> Option<Turn> {
        let mut inner = job.inner();
        match inner.state.status {
            Status::Running => inner.generating.take().map(Turn::Continue),
            Status::Queued => {
                inner.start(SystemTime::now(), 1);
                let prompt = inner.request.take().and_then(|r| r.prompt);
                match (prompt, inner.version.clone()) {
                    (Some(prompt), Some(version)) => Some(Turn::Start(prompt, version, inner.config.max_tokens)),
                    _ => {
                        drop(inner);
                        self.fail(job, &Error::Internal("a language model's job without its prompt".into()));
                        None
                    }
                }
            }
            _ => None, // ended meanwhile
        }
    }

    fn start_generation(
        &self,
        d: usize,
        version: &crate::store::Version,
        pool: &Arc<Pool>,
        prompt: &Prompt,
        max_tokens: u32,
    ) -> Result<Box<Generating>> {
        let started = Instant::now();
        let mut instance = pool.acquire(|| self.load(version, d, pool))?;
        let generation = instance.generate(prompt, max_tokens);
        pool.release(instance);
        let generation = generation?;
        let kv_bytes = generation.kv_bytes();
        pool.generation_began(kv_bytes);
        Ok(Box::new(Generating {
            generation,
            answer: Answer::new(prompt),
            pool: pool.clone(),
            kv_bytes,
            tokens: 0,
            started,
            first_token: None,
        }))
    }

    /// Whether anything waits on device `d`'s queue, or the engine stops
    /// (a parked generation does not hold up the exit; its journal entry
    /// brings it back, from the start, at the next start).
    fn others_waiting(&self, d: usize) -> bool {
        let s = self.sched.lock().unwrap();
        s.shutdown || !s.devices[d].entries.is_empty()
    }

    /// Parks a generation in its job and queues the job again, behind
    /// what waits (unless it ended meanwhile: then the generation is
    /// dropped). Called by the worker with the scheduler's lock, once the
    /// turn's slot and instance are given back.
    pub(super) fn park(&self, s: &mut Sched, d: usize, job: &Arc<Job>, g: Box<Generating>) {
        let mut inner = job.inner();
        if inner.state.status.is_finished() {
            drop(inner);
            drop(g);
            return;
        }
        inner.generating = Some(g);
        let priority = inner.state.priority;
        drop(inner);
        s.seq += 1;
        let entry =
            Queued { id: job.id, user: job.uid, priority, seq: s.seq, since: Instant::now(), batch_key: None, rows: 1 };
        s.devices[d].entries.push(entry);
        s.devices[d].jobs.push(job.clone());
        s.parked.insert(job.id);
        *s.in_flight.entry(job.digest).or_default() += 1;
    }
}
