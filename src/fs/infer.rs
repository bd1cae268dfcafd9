//! `infer`: a request written to a handle becomes a job; a read answers
//! with this handle's job, or its session's last (see [`Session`]).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use crate::engine::Job;
use crate::error::{Error, Result};

use super::handles::{read_answer, Handle};
use super::{Caller, Fs};
/// An open `infer`: the request being written, then the job answering it.
pub(super) struct InferStream {
    pub(super) model: String,
    pub(super) number: u32,
    pub(super) caller: Caller,
    /// The caller's session (getsid), for the write-then-read way; `None`
    /// when the caller's pid is not visible to the daemon.
    pub(super) sid: Option<u32>,
    /// Opened for reading too: the kernel sends no `flush`, so a request
    /// left unread is sent by the session's next reader or at release.
    pub(super) no_flush: bool,
    /// When the input being written began (see [`Session`]); 0 for none.
    pub(super) stamp: u64,
    pub(super) input: Vec<u8>,
    /// The request sent from this handle (or, for a handle that wrote
    /// nothing, the session's last one), once there is one.
    pub(super) job: Option<Arc<Job>>,
    /// Bytes of the response already read.
    pub(super) read_pos: usize,
    /// Its own request was sent by this handle, and a read of its answer
    /// answered: closing it before the end cancels the request.
    pub(super) sent_here: bool,
    pub(super) reading: bool,
}

impl InferStream {
    pub(super) fn session_key(&self) -> Option<SessionKey> {
        self.sid.map(|sid| (self.model.clone(), self.number, sid, self.caller.uid))
    }
}

/// (model, version, session id, uid): whose last request `cat infer` reads.
pub(super) type SessionKey = (String, u32, u32, u32);

/// A session's requests to one version, for the write-then-read way.
///
/// Inputs are stamped in the order their writing began, and the session's
/// last request is the sent one with the latest stamp: a request sent late
/// (by a release the kernel queued without waiting) does not displace a
/// later one. A `no_flush` handle's input is sent by its read, else by its
/// release, which may come after the next reader's read; so that reader
/// first sends what the session's handles hold unsent (as their `close()`
/// would have, had it had a `flush`), then reads the last request.
#[derive(Default)]
pub(super) struct Session {
    pub(super) last: Weak<Job>,
    pub(super) last_stamp: u64,
    /// `no_flush` handles holding written, unsent input, with its stamp.
    pub(super) unsent: Vec<(u64, Weak<Handle>)>,
}

impl Fs {
    /// A read of `infer` (see [`Fs::read`]): answers with this handle's
    /// request, sent now if it was written and not yet sent, else with the
    /// session's last; when the job ends, from the thread that ends it.
    /// On a FUSE thread (`on_fuse_thread`) a reader of a small CPU job may
    /// run it itself; a heavy-work thread hands it to a worker, and stays
    /// free to decode the next large request.
    pub(super) fn read_infer(
        &self,
        handle: Arc<Handle>,
        size: usize,
        on_fuse_thread: bool,
        done: impl FnOnce(Result<Vec<u8>>) -> bool + Send + 'static,
    ) {
        let Handle::Infer(stream) = &*handle else { unreachable!("an infer handle") };
        let (job, sent) = match self.infer_job(&mut stream.lock().unwrap(), on_fuse_thread) {
            Ok(found) => found,
            Err(e) => {
                done(Err(e));
                return;
            }
        };
        if sent {
            // This reader waits for the reply: it may run the job itself.
            self.engine.run_or_wake(&job);
        }
        stream.lock().unwrap().reading = true;
        read_answer(job, handle.clone(), size, done);
    }

    /// `vN/error` as `caller` reads it: the reason its session's last
    /// request of this version failed, one line; empty if it has not
    /// failed (done, or still queued or running: nothing waits here);
    /// ENODATA with no request, as for `infer`.
    pub(super) fn last_error(&self, model: &str, number: u32, caller: Caller) -> Result<String> {
        let key = (caller.pid != 0).then(|| (model.to_string(), number, session_of(caller.pid), caller.uid));
        // What was sent: reading `error` sends nothing held unsent.
        let job = key
            .and_then(|key| self.sessions.lock().unwrap().get(&key)?.last.upgrade())
            .ok_or_else(|| Error::NoRequest(format!("models/{model}/v{number}/error")))?;
        let state = job.snapshot();
        Ok(match state.outcome {
            Some(Err(failure)) => format!("{}\n", failure.reason),
            _ => String::new(),
        })
    }

    /// The job a read of `infer` answers with: this handle's request (sent
    /// now if it was written but not yet sent: then `true`, and the caller
    /// must call [`Engine::run_or_wake`](crate::engine::Engine::run_or_wake)), else the session's last.
    pub(super) fn infer_job(&self, st: &mut InferStream, may_run: bool) -> Result<(Arc<Job>, bool)> {
        let mut sent = false;
        if st.job.is_none() {
            if !st.input.is_empty() {
                self.send_request(st, may_run)?;
                sent = may_run;
            } else {
                let job = st.session_key().and_then(|key| self.session_last(key, st.stamp));
                st.job =
                    Some(job.ok_or_else(|| Error::NoRequest(format!("models/{}/v{}/infer", st.model, st.number)))?);
            }
        }
        Ok((st.job.clone().expect("set above"), sent))
    }

    /// Makes a job of the handle's request and submits it; it becomes the
    /// session's last request whether or not it was accepted. A reader
    /// (`for_reader`) runs it or wakes a worker itself, once it holds no
    /// lock: [`Engine::submit_for_reader`](crate::engine::Engine::submit_for_reader).
    pub(super) fn send_request(&self, st: &mut InferStream, for_reader: bool) -> Result<()> {
        let job = self.engine.create_job(st.caller.uid, st.caller.gid, &st.model, st.number)?;
        let input = std::mem::take(&mut st.input);
        let result =
            if for_reader { self.engine.submit_for_reader(&job, input) } else { self.engine.submit(&job, input) };
        st.sent_here = true;
        self.remember(st, Some(job));
        result
    }

    /// The last request of a session, after sending what its handles
    /// hold unsent (see [`Session`]). `own` is the reader's stamp: its own
    /// handle is never among those it sends.
    pub(super) fn session_last(&self, key: SessionKey, own: u64) -> Option<Arc<Job>> {
        let unsent: Vec<Arc<Handle>> = {
            let mut sessions = self.sessions.lock().unwrap();
            let session = sessions.get_mut(&key)?;
            session.unsent.retain(|(_, h)| h.strong_count() > 0);
            session.unsent.iter().filter(|(stamp, _)| *stamp != own).filter_map(|(_, h)| h.upgrade()).collect()
        };
        for handle in unsent {
            let Handle::Infer(stream) = &*handle else { continue };
            let mut st = stream.lock().unwrap();
            if st.job.is_none() && !st.input.is_empty() {
                if let Err(e) = self.send_request(&mut st, false) {
                    tracing::info!(model = %key.0, version = key.1, "a held request was not sent: {e}");
                }
            }
        }
        self.sessions.lock().unwrap().get(&key)?.last.upgrade()
    }

    /// Stamps the input a handle begins to write; a `no_flush` handle's is
    /// listed as unsent in its session.
    pub(super) fn begin_input(&self, st: &mut InferStream, handle: &Arc<Handle>) {
        st.stamp = self.stamps.fetch_add(1, Ordering::Relaxed);
        if let Some(key) = st.session_key().filter(|_| st.no_flush) {
            self.sessions.lock().unwrap().entry(key).or_default().unsent.push((st.stamp, Arc::downgrade(handle)));
        }
    }

    /// Makes `job` (if any: `None` when the input was dropped unsent) the
    /// handle's request and, unless a later input was sent already, its
    /// session's last; the input is no longer unsent.
    pub(super) fn remember(&self, st: &mut InferStream, job: Option<Arc<Job>>) {
        let stamp = std::mem::take(&mut st.stamp);
        if let Some(key) = st.session_key().filter(|_| job.is_some() || stamp != 0) {
            let mut sessions = self.sessions.lock().unwrap();
            let session = sessions.entry(key).or_default();
            if let Some(job) = job.as_ref().filter(|_| stamp >= session.last_stamp) {
                session.last = Arc::downgrade(job);
                session.last_stamp = stamp;
            }
            if st.no_flush && stamp != 0 {
                session.unsent.retain(|(s, _)| *s != stamp);
            }
        }
        if job.is_some() {
            st.job = job;
        }
    }
}
/// The session (getsid) of a process; its own pid if it is gone.
pub(super) fn session_of(pid: u32) -> u32 {
    // SAFETY: getsid has no memory effects.
    let sid = unsafe { libc::getsid(pid as libc::pid_t) };
    if sid < 0 {
        pid
    } else {
        sid as u32
    }
}
