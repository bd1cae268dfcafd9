//! Running what a worker took: one backend call for a job or a batch,
//! split back per job, each job ended with its output or the failure.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::backend::{Instance, Stop};
use crate::codec::{self, Request};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::job::{Failure, Job, Status};
use super::loaded::Pool;
use super::Shared;
impl Shared {
    /// A job's compute time, in its times and its model's latency metrics.
    pub(super) fn record_compute(&self, job: &Job, compute_us: u64) {
        let queue_us = {
            let mut inner = job.inner();
            inner.state.compute_us = Some(compute_us);
            inner.state.queue_us.unwrap_or(0)
        };
        self.metrics.latency(&job.model, job.version, queue_us, compute_us);
    }

    /// A job's answer in its request's codec, if it is within
    /// `max_output_bytes` both as the model returned it and as encoded.
    fn encode(&self, job: &Job, request: &Request, outputs: Vec<Tensor>) -> Result<Vec<u8>> {
        let limit = self.config.max_output_bytes;
        let too_big = |bytes: u64| if bytes > limit { Err(Error::OutputTooBig { limit }) } else { Ok(()) };
        too_big(outputs.iter().map(|t| t.data.byte_len() as u64).sum())?;
        let bytes = codec::encode(request, outputs, &job.model, job.version)?;
        too_big(bytes.len() as u64)?;
        Ok(bytes)
    }
}

/// A run in progress, shared by its jobs: when the last of them ends
/// before the run does (timed out, cancelled), the run is stopped, so a
/// worker and its memory are not held for a result nobody will read.
pub(super) struct Run {
    pub(super) stop: Stop,
    /// Its jobs not yet ended.
    left: AtomicUsize,
}

impl Run {
    /// One of its jobs ended.
    pub(super) fn job_ended(&self) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.stop.stop();
        }
    }
}

impl Shared {
    /// Runs a batch of jobs (one or more) of one version on device `d`,
    /// and ends each with its output or the failure.
    pub(super) fn run(&self, d: usize, jobs: &[Arc<Job>], pool: &Pool) {
        let now = SystemTime::now();
        let mut live: Vec<(Arc<Job>, Request)> = Vec::with_capacity(jobs.len());
        let mut version = None;
        let run = Arc::new(Run { stop: Stop::default(), left: AtomicUsize::new(jobs.len()) });
        for j in jobs {
            let mut inner = j.inner();
            if inner.state.status != Status::Queued {
                run.job_ended();
                continue; // cancelled or timed out meanwhile
            }
            inner.run = Some(run.clone());
            inner.start(now, jobs.len());
            version = version.or(inner.version.clone());
            live.push((j.clone(), inner.request.take().expect("queued jobs have a request")));
        }
        let Some(version) = version else { return };
        let started = Instant::now();
        let device = &self.devices[d];
        // A backend that panics unwinds to `run_taken`, which fails these
        // jobs; the instance is dropped, not given back.
        let outputs = pool.acquire(|| self.load(&version, d, pool)).and_then(|mut instance| {
            let result = run_batch(&mut *instance, &mut live, &run.stop);
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
                    self.record_compute(job, compute_us);
                    match self.encode(job, request, out) {
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
}
/// Runs one request, or several stacked along the first dimension and
/// split back; returns each request's outputs.
pub(super) fn run_batch(
    instance: &mut dyn Instance,
    live: &mut [(Arc<Job>, Request)],
    stop: &Stop,
) -> Result<Vec<Vec<Tensor>>> {
    if let [(_, request)] = live {
        return Ok(vec![instance.run(std::mem::take(&mut request.inputs), stop)?]);
    }
    let rows: Vec<usize> = live.iter().map(|(_, r)| r.inputs[0].shape[0]).collect();
    let stacked: Vec<Tensor> = (0..live[0].1.inputs.len())
        .map(|k| Tensor::stack(&live.iter().map(|(_, r)| &r.inputs[k]).collect::<Vec<_>>()))
        .collect();
    let outputs = instance.run(stacked, stop)?;
    let mut per_job: Vec<Vec<Tensor>> = vec![Vec::with_capacity(outputs.len()); live.len()];
    for out in &outputs {
        let Some(pieces) = out.split(&rows) else {
            // An output that does not keep the batch dimension: run one by one.
            return live.iter_mut().map(|(_, r)| instance.run(std::mem::take(&mut r.inputs), stop)).collect();
        };
        for (job_outputs, piece) in per_job.iter_mut().zip(pieces) {
            job_outputs.push(piece);
        }
    }
    Ok(per_job)
}
