//! The journal of accepted jobs: what lets a job survive the daemon being
//! killed without a disk round trip per request.
//!
//! Append-only files, `<dir>/journal-<n>`. Accepting a job
//! appends one entry, `<header>\n<input bytes>` (the header is the job's
//! record as one JSON line, which says how long the input is), with a
//! single `writev(2)` before the job's `close()` returns. The page cache
//! keeps it if the daemon dies; a power loss may lose what was appended
//! since the owner last called [`Journal::sync`]. A journal past
//! [`ROTATE_BYTES`] or [`ROTATE_AGE`] is closed and the next one started; a
//! closed journal is deleted once every job in it has ended and the caller
//! has made the job records durable ([`Journal::collect`]).
//!
//! At start, [`Journal::open`] reads every journal back. The caller queues
//! the unfinished jobs again (into the new journal), then calls
//! [`Journal::drop_old`]. An entry cut short by a crash mid-write belonged
//! to a job whose `close()` had not returned: it is ignored.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A journal is closed and a new one started past this size...
pub const ROTATE_BYTES: u64 = 256 << 20;

/// ...or this age, so that each one can be deleted soon after its jobs end.
pub const ROTATE_AGE: Duration = Duration::from_secs(60);

/// One accepted job as the journal holds it.
pub struct Entry {
    /// The job's record, one JSON line (without the newline).
    pub header: Vec<u8>,
    pub input: Vec<u8>,
}

pub struct Journal {
    dir: PathBuf,
    state: Mutex<State>,
}

struct State {
    file: File,
    current: u64,
    size: u64,
    /// When the current journal was started.
    opened: Instant,
    /// Appended to since the last [`Journal::sync`].
    unsynced: bool,
    /// Journals (by number) and how many of their jobs have not ended.
    open_jobs: BTreeMap<u64, usize>,
    /// Journals of earlier runs, read at start.
    old: Vec<PathBuf>,
}

fn path_of(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("journal-{n}"))
}

impl Journal {
    /// Reads the journals in `dir` and starts a new one. `input_len` reads
    /// an entry's input length from its header.
    pub fn open(dir: &Path, input_len: impl Fn(&[u8]) -> Option<usize>) -> io::Result<(Journal, Vec<Entry>)> {
        let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)?
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().to_str()?.strip_prefix("journal-")?.parse().ok()?;
                Some((n, e.path()))
            })
            .collect();
        found.sort();
        let mut entries = Vec::new();
        for (_, path) in &found {
            let bytes = std::fs::read(path)?;
            let mut pos = 0;
            while let Some(newline) = bytes[pos..].iter().position(|&b| b == b'\n') {
                let header = &bytes[pos..pos + newline];
                let Some(len) = input_len(header) else { break };
                let start = pos + newline + 1;
                let Some(input) = bytes.get(start..start + len) else { break };
                entries.push(Entry { header: header.to_vec(), input: input.to_vec() });
                pos = start + len;
            }
        }
        let current = found.last().map_or(1, |(n, _)| n + 1);
        let file = OpenOptions::new().mode(0o600).create_new(true).append(true).open(path_of(dir, current))?;
        let state = State {
            file,
            current,
            size: 0,
            opened: Instant::now(),
            unsynced: false,
            open_jobs: BTreeMap::from([(current, 0)]),
            old: found.into_iter().map(|(_, p)| p).collect(),
        };
        Ok((Journal { dir: dir.to_path_buf(), state: Mutex::new(state) }, entries))
    }

    /// Appends an accepted job; returns the journal it went to (pass it to
    /// [`Journal::done`] when the job ends).
    pub fn append(&self, header: &[u8], input: &[u8]) -> io::Result<u64> {
        let len = header.len() + 1 + input.len();
        let mut st = self.state.lock().unwrap();
        if st.size > 0 && (st.size + len as u64 > ROTATE_BYTES || st.opened.elapsed() > ROTATE_AGE) {
            let next = st.current + 1;
            if st.unsynced {
                st.file.sync_data()?; // what sync() would have covered
            }
            st.file = OpenOptions::new().mode(0o600).create_new(true).append(true).open(path_of(&self.dir, next))?;
            st.current = next;
            st.size = 0;
            st.opened = Instant::now();
            st.open_jobs.insert(next, 0);
        }
        let parts = &mut [IoSlice::new(header), IoSlice::new(b"\n"), IoSlice::new(input)];
        if let Err(e) = write_all_vectored(&mut st.file, parts) {
            // No half entry may stay: later ones would be read as its input.
            let _ = st.file.set_len(st.size);
            return Err(e);
        }
        st.size += len as u64;
        st.unsynced = true;
        let n = st.current;
        *st.open_jobs.get_mut(&n).expect("the current journal is listed") += 1;
        Ok(n)
    }

    /// Makes what was appended so far durable (`fdatasync`), if anything was.
    /// The disk is waited for without the lock, so appends go on meanwhile.
    pub fn sync(&self) -> io::Result<()> {
        let file = {
            let mut st = self.state.lock().unwrap();
            if !st.unsynced {
                return Ok(());
            }
            st.unsynced = false;
            st.file.try_clone()?
        };
        file.sync_data().inspect_err(|_| self.state.lock().unwrap().unsynced = true)
    }

    /// A job in journal `n` ended.
    pub fn done(&self, n: u64) {
        if let Some(count) = self.state.lock().unwrap().open_jobs.get_mut(&n) {
            *count = count.saturating_sub(1);
        }
    }

    /// Deletes closed journals none of whose jobs is unfinished, after
    /// `make_durable` (the job records' flush) succeeds.
    /// Returns the journals deleted.
    pub fn collect(&self, make_durable: impl FnOnce() -> io::Result<()>) -> Vec<u64> {
        let mut st = self.state.lock().unwrap();
        let current = st.current;
        let empty: Vec<u64> = st.open_jobs.iter().filter(|(&n, &c)| c == 0 && n != current).map(|(&n, _)| n).collect();
        if empty.is_empty() {
            return empty;
        }
        if let Err(e) = make_durable() {
            tracing::warn!("keeping old journals: {e}");
            return Vec::new();
        }
        for &n in &empty {
            st.open_jobs.remove(&n);
            if let Err(e) = std::fs::remove_file(path_of(&self.dir, n)) {
                tracing::warn!("removing journal-{n}: {e}");
            }
        }
        empty
    }

    /// Whether journal `n` of this run is still on disk (so a restart would
    /// read its entries).
    pub fn holds(&self, n: u64) -> bool {
        self.state.lock().unwrap().open_jobs.contains_key(&n)
    }

    /// Deletes the journals of earlier runs (their unfinished jobs have been
    /// queued again, into the current journal).
    pub fn drop_old(&self) {
        for path in std::mem::take(&mut self.state.lock().unwrap().old) {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("removing {}: {e}", path.display());
            }
        }
    }
}

/// One `writev(2)` in the common case, without copying the parts into one
/// buffer first; continues after a short write.
fn write_all_vectored(file: &mut File, mut parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !parts.is_empty() {
        match file.write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers in these tests are the input length as text.
    fn len(header: &[u8]) -> Option<usize> {
        std::str::from_utf8(header).ok()?.parse().ok()
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn entries_come_back_after_a_crash_and_old_journals_go() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, entries) = Journal::open(dir.path(), len).unwrap();
            assert!(entries.is_empty());
            assert_eq!(j.append(b"3", b"abc").unwrap(), 1);
            assert_eq!(j.append(b"0", b"").unwrap(), 1);
            // A crash: no drop_old, no done.
        }
        // A torn last entry (cut mid-write) is ignored.
        let mut f = OpenOptions::new().append(true).open(dir.path().join("journal-1")).unwrap();
        f.write_all(b"10\nshort").unwrap();
        let (j, entries) = Journal::open(dir.path(), len).unwrap();
        let got: Vec<(&[u8], &[u8])> = entries.iter().map(|e| (&e.header[..], &e.input[..])).collect();
        assert_eq!(got, [(&b"3"[..], &b"abc"[..]), (&b"0"[..], &b""[..])]);
        assert_eq!(names(dir.path()), ["journal-1", "journal-2"]);
        j.drop_old();
        assert_eq!(names(dir.path()), ["journal-2"]);
    }

    #[test]
    fn closed_journals_go_once_their_jobs_end_and_records_are_durable() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), len).unwrap();
        let big = vec![7u8; (ROTATE_BYTES / 2) as usize + 1];
        let first = j.append(b"x", &big).unwrap();
        let second = j.append(b"x", &big).unwrap(); // rotates
        assert_eq!((first, second), (1, 2));
        assert!(j.holds(1) && j.holds(2));
        assert_eq!(j.collect(|| Ok(())), [0; 0]);
        assert_eq!(names(dir.path()), ["journal-1", "journal-2"], "journal-1 still has a job");
        j.done(first);
        assert_eq!(j.collect(|| Err(io::Error::other("flush failed"))), [0; 0]);
        assert_eq!(names(dir.path()), ["journal-1", "journal-2"], "not before the records are durable");
        assert_eq!(j.collect(|| Ok(())), [1]);
        assert_eq!(names(dir.path()), ["journal-2"]);
        assert!(!j.holds(1));
        j.done(second);
        j.collect(|| Ok(()));
        assert_eq!(names(dir.path()), ["journal-2"], "the current journal stays");
    }
}
