//! Running what a worker took: one backend call for a job or a batch,
//! split back per job, each job ended with its output or the failure.

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use crate::backend::Instance;
use crate::codec::{self, Request};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

use super::job::{Failure, Job, Status};
use super::loaded::Pool;
use super::Shared;
impl Shared {
    /// Runs a batch of jobs (one or more) of one version on device `d`,
    /// and ends each with its output or the failure.
    pub(super) fn run(&self, d: usize, jobs: &[Arc<Job>], pool: &Pool) {
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
            // A backend that panics fails these jobs, and its instance is
            // not used again.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_batch(&mut *instance, &mut live)));
            match result {
                Ok(result) => {
                    pool.release(instance);
                    result
                }
                Err(_) => Err(Error::Internal("the backend panicked".into())),
            }
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
}
/// Runs one request, or several stacked along the first dimension and
/// split back; returns each request's outputs.
pub(super) fn run_batch(instance: &mut dyn Instance, live: &mut [(Arc<Job>, Request)]) -> Result<Vec<Vec<Tensor>>> {
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
