//! `jobs/<id>/`: the job behind an id, and a job input being written.

use std::sync::Arc;

use crate::engine::Job;
use crate::error::{Error, Result};

use super::Fs;
/// `jobs/<id>/input` opened for writing.
pub(super) struct JobInput {
    pub(super) job: Arc<Job>,
    pub(super) input: Vec<u8>,
    pub(super) written: bool,
}

impl Fs {
    pub(super) fn job(&self, id: u64) -> Result<Arc<Job>> {
        self.engine.job(id).ok_or_else(|| Error::NotFound(format!("jobs/{id}")))
    }
}
