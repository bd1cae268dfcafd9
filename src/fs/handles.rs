//! Open files: what each [`Handle`] holds, and reading and writing their
//! bytes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use crate::engine::{Job, Output};
use crate::error::{Error, Result};
use crate::store::{Digest, MAX_SIGNATURE_BYTES};

use super::heavy::{decode_work, Work};
use super::infer::InferStream;
use super::jobs::JobInput;
use super::upload::Pending;
use super::{Caller, Fs, JobFile};
/// An open file: its handle and how the kernel should cache it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Opened {
    pub fh: u64,
    /// Content is generated per open: bypass the page cache and `i_size`.
    pub direct_io: bool,
    /// Content never changes: keep the page cache across opens.
    pub keep_cache: bool,
    /// A stream, not a file with offsets (`infer`): reads and writes
    /// ignore positions.
    pub stream: bool,
    /// `close()` has nothing to do: the handle cannot have been written,
    /// or (`infer` opened for reading too) its request is sent by its read
    /// or its release. The kernel then skips the `flush` round trip.
    pub no_flush: bool,
}

pub(super) enum Handle {
    Content(Vec<u8>),
    /// Content whose size no `stat` can tell (a new job's id, a reason):
    /// opened as a stream, read in order from its own position, so that
    /// `sendfile` (busybox's `cat`) reads it rather than stopping at the
    /// size of 0 that `stat` showed.
    Stream(Vec<u8>, Mutex<usize>),
    Blob(File),
    Upload(Mutex<Pending>),
    /// A short text for a model, written whole and applied at close.
    Text(Written, String, Mutex<Option<Vec<u8>>>),
    Infer(Mutex<InferStream>),
    JobInput(Mutex<JobInput>),
    /// Read in order from its own position (a stream: see
    /// [`Handle::Stream`]; its size is unknown until the job ends).
    JobOutput(Arc<Job>, Mutex<usize>),
    /// `ctl` or `priority` opened for writing: each write is one command.
    JobCommand(Arc<Job>, JobFile, Caller),
}

/// What a [`Handle::Text`] is.
pub(super) enum Written {
    /// `config.json`.
    Config,
    /// `trust`.
    Trust,
    /// `<file>.minisig`: a signature for the import of `<file>` to come.
    /// The signer's uid: only that user's import of `<file>` uses it.
    Signature(String, u32),
}

impl Written {
    pub(super) fn name(&self) -> String {
        match self {
            Written::Config => "config.json".into(),
            Written::Trust => "trust".into(),
            Written::Signature(target, _) => format!("{target}.minisig"),
        }
    }

    /// The most bytes it takes.
    pub(super) fn limit(&self) -> u64 {
        match self {
            Written::Config | Written::Trust => 1 << 20,
            Written::Signature(..) => MAX_SIGNATURE_BYTES as u64,
        }
    }
}

impl Handle {
    /// Where what its `close()` does runs: on the FUSE thread, unless it is
    /// an import's commit or the decoding of a large request.
    pub(super) fn close_work(&self) -> Work {
        match self {
            Handle::Upload(pending) if pending.lock().unwrap().upload.as_ref().is_some_and(|u| !u.is_empty()) => {
                Work::Import
            }
            Handle::Infer(stream) => decode_work(&stream.lock().unwrap().input),
            Handle::JobInput(w) => decode_work(&w.lock().unwrap().input),
            _ => Work::Here,
        }
    }
}

impl Fs {
    pub(super) fn open_blob(&self, digest: &Digest) -> Result<File> {
        let path = self.store.local_blob(digest)?;
        File::open(&path).map_err(|e| Error::io(path.display().to_string(), e))
    }

    // ---- helpers ------------------------------------------------------------

    pub(super) fn add_handle(&self, handle: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, Arc::new(handle));
        fh
    }

    pub(super) fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.lock().unwrap().get(&fh).cloned().ok_or(Error::BadHandle(fh))
    }

    pub(super) fn with_pending<T>(&self, fh: u64, f: impl FnOnce(&mut Pending) -> Result<T>) -> Result<T> {
        let handle = self.handle(fh)?;
        let Handle::Upload(pending) = &*handle else {
            return Err(Error::BadHandle(fh));
        };
        let mut p = pending.lock().unwrap();
        f(&mut p)
    }
}
/// Writes `data` at `offset` into a buffer that may not grow past `limit`,
/// nor past `received` (the bytes written to it so far, this write
/// included) by more than [`WRITE_WINDOW`]: a `pwrite` at 900 MB is
/// refused instead of costing 900 MB. The window lets the kernel's pieces
/// of one large write arrive out of order.
pub(super) fn write_into(
    buf: &mut Vec<u8>,
    offset: u64,
    data: &[u8],
    limit: u64,
    received: u64,
    what: &str,
) -> Result<()> {
    let end = offset.saturating_add(data.len() as u64);
    if end > limit {
        return Err(Error::TooBig { limit });
    }
    if end > received.saturating_add(WRITE_WINDOW) {
        return Err(Error::InvalidArgument(format!(
            "{what}: a write at offset {offset} would leave a hole of more than {WRITE_WINDOW} bytes; write in order"
        )));
    }
    let (start, end) = (offset as usize, end as usize);
    if buf.len() < end {
        buf.resize(end, 0);
    }
    buf[start..end].copy_from_slice(data);
    Ok(())
}

/// How far a write may land past the bytes written so far.
pub(super) const WRITE_WINDOW: u64 = 16 << 20;

pub(super) fn slice_at(bytes: &[u8], offset: usize, size: usize) -> Vec<u8> {
    let start = offset.min(bytes.len());
    bytes[start..(start + size).min(bytes.len())].to_vec()
}

/// A read of a stream (`clone`, `error`, a job's `output`): the next
/// `size` bytes of `bytes` from `pos`, taken before the reply (the reader,
/// woken by it, goes on at once) and given back if the reader did not get
/// them (a signal ended its wait: EINTR). Returns whether this read was
/// delivered and reached the end.
pub(super) fn read_in_order(
    pos: &Mutex<usize>,
    bytes: &[u8],
    size: usize,
    done: impl FnOnce(Result<Vec<u8>>) -> bool,
) -> bool {
    let (chunk, at_end) = {
        let mut pos = pos.lock().unwrap();
        let chunk = slice_at(bytes, *pos, size);
        *pos += chunk.len();
        (chunk, *pos >= bytes.len())
    };
    let n = chunk.len();
    if done(Ok(chunk)) {
        return at_end;
    }
    *pos.lock().unwrap() -= n;
    false
}

impl Handle {
    /// Where a reader of a job's answer (`infer`, a job's `output`) is.
    fn with_answer_pos<T>(&self, f: impl FnOnce(&mut usize) -> T) -> T {
        match self {
            Handle::JobOutput(_, pos) => f(&mut pos.lock().unwrap()),
            Handle::Infer(stream) => f(&mut stream.lock().unwrap().read_pos),
            _ => unreachable!("only infer and a job's output read answers"),
        }
    }
}

/// A read of `job`'s answer through `handle` (`infer` or a job's
/// `output`), from the handle's position: replied once there are bytes
/// past it or the job has ended. The bytes are taken before the reply
/// (the reader, woken by it, goes on at once: work left for after it cost
/// one-handle requests 12 us, 13%, in an interleaved A/B) and given back
/// if the reader did not get them (a signal ended its wait: EINTR), to be
/// read again from the same place. A read woken with nothing new (another
/// read on the same handle took it) waits again.
pub(super) fn read_answer<F>(job: Arc<Job>, handle: Arc<Handle>, size: usize, done: F)
where
    F: FnOnce(Result<Vec<u8>>) -> bool + Send + 'static,
{
    if size == 0 {
        // Nothing fits: answered now (waiting would find nothing to take).
        done(Ok(Vec::new()));
        return;
    }
    let at = handle.with_answer_pos(|pos| *pos);
    let waiting = job.clone();
    waiting.when_output(at, move |output| {
        let taken = handle.with_answer_pos(|pos| {
            let (bytes, to_the_end) = answer_at(&job, &output, *pos, size)?;
            *pos += bytes.len();
            Ok((bytes, to_the_end))
        });
        match taken {
            Ok((bytes, _)) if bytes.is_empty() && matches!(output, Output::More(_)) => {
                read_answer(job, handle, size, done)
            }
            Ok((bytes, to_the_end)) => {
                let n = bytes.len();
                if !done(Ok(bytes)) {
                    handle.with_answer_pos(|pos| *pos -= n);
                } else if to_the_end {
                    job.mark_output_read();
                }
            }
            Err(e) => {
                done(Err(e));
            }
        }
    });
}

/// What a read of a job's answer at `pos` returns, given what the job
/// has: the next bytes streamed so far (whole UTF-8 characters where
/// `size` allows: the answer is text), or of the whole answer once the
/// job ended (nothing: end of file), or its failure. `true` with bytes
/// that reach the end of a finished answer.
fn answer_at(job: &Job, output: &Output, pos: usize, size: usize) -> Result<(Vec<u8>, bool)> {
    match output {
        Output::More(so_far) => {
            let start = pos.min(so_far.len());
            let mut end = (start + size).min(so_far.len());
            let whole = end;
            while end > start && end < so_far.len() && so_far[end] & 0xC0 == 0x80 {
                end -= 1; // inside a character: it goes to the next read
            }
            let end = if end == start { whole } else { end };
            Ok((so_far[start..end].to_vec(), false))
        }
        Output::Ended(Ok(out)) => {
            let bytes = slice_at(out, pos, size);
            let to_the_end = pos + bytes.len() >= out.len();
            Ok((bytes, to_the_end))
        }
        Output::Ended(Err(_)) if job.read_past_dropped(pos) => Ok((Vec::new(), false)),
        Output::Ended(Err(f)) => Err(f.to_error()),
    }
}

pub(super) fn read_file_at(file: &File, offset: u64, size: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        let n = file.read_at(&mut buf[filled..], offset + filled as u64).map_err(|e| Error::io("reading blob", e))?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    buf.truncate(filled);
    Ok(buf)
}
