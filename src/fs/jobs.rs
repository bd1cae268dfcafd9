//! `jobs/<id>/`: the job behind an id, and a job input being written.

use std::sync::Arc;

use crate::engine::Job;
use crate::error::{one_line, Error, Result};
use crate::store::PRIORITIES;

use super::{Caller, Fs, JobFile};

/// `jobs/<id>/input` opened for writing.
pub(super) struct JobInput {
    pub(super) job: Arc<Job>,
    pub(super) input: Vec<u8>,
    pub(super) written: bool,
    /// Bytes received by writes, whatever their offsets.
    pub(super) received: u64,
}

impl Fs {
    pub(super) fn job(&self, id: u64) -> Result<Arc<Job>> {
        self.engine.job(id).ok_or_else(|| Error::NotFound(format!("jobs/{id}")))
    }

    /// A write to `ctl` (`cancel`) or `priority` (an integer in
    /// [`PRIORITIES`]; above the model's own priority only for the model's
    /// owner or root, so that a job owner cannot jump everyone's queue).
    pub(super) fn job_command(&self, job: &Arc<Job>, file: JobFile, caller: Caller, data: &[u8]) -> Result<()> {
        let text = std::str::from_utf8(data).map_err(|_| Error::InvalidArgument("not UTF-8 text".into()))?.trim();
        let path = format!("jobs/{}/{}", job.id, file.name());
        match file {
            JobFile::Ctl if text == "cancel" => self.engine.cancel(job),
            JobFile::Ctl => {
                Err(Error::InvalidArgument(format!("{path}: unknown command {:?} (known: cancel)", one_line(text))))
            }
            _ => {
                let priority: i32 = text.parse().ok().filter(|p| PRIORITIES.contains(p)).ok_or_else(|| {
                    let (low, high) = (PRIORITIES.start(), PRIORITIES.end());
                    Error::InvalidArgument(format!("{path}: expected an integer from {low} to {high}"))
                })?;
                let model = self.store.model(&job.model)?;
                let default = model.config.priority;
                if priority > default && caller.uid != 0 && caller.uid != model.uid {
                    return Err(Error::NotPermitted(format!(
                        "{path}: only the owner of models/{} may raise a job above its priority {default}",
                        job.model
                    )));
                }
                self.engine.set_priority(job, priority)
            }
        }
    }
}
