//! The one error type of the library, and the one place where an error
//! becomes an errno.
//!
//! Every fallible operation in `store`, `backend` and `fs` returns [`Error`].
//! [`Error::errno`] is an exhaustive `match` (no catch-all arm), so adding a
//! variant forces a decision about what a shell user will see. The `Display`
//! text is the one readable line that goes to the daemon log (and, for jobs,
//! to their `error` file); [`Error::level`] says how loud that line is.

use std::io;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such model, version, alias, blob or file.
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: already exists")]
    Exists(String),
    #[error("invalid name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    /// A file copied in as a model that no backend can load.
    #[error("invalid model {name:?}: {why}")]
    InvalidModel { name: String, why: String },
    /// `close()` of a model file with no data yet. Shells close a duplicate
    /// descriptor before the program writes, so this is routine (DEBUG); an
    /// upload released empty is logged as an invalid model then.
    #[error("invalid model {0:?}: empty file")]
    EmptyUpload(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// A request that does not fit the model: malformed, wrong name, dtype, shape.
    #[error("{0}")]
    BadInput(String),
    #[error("input larger than the limit of {limit} bytes")]
    TooBig { limit: u64 },
    /// An upload past `--max-import-bytes` (sparse files count by size).
    #[error("{path}: larger than the import limit of {limit} bytes (--max-import-bytes)")]
    ImportTooBig { path: String, limit: u64 },
    /// A model's answer over `--max-output-bytes`: not kept.
    #[error("output larger than the limit of {limit} bytes (--max-output-bytes)")]
    OutputTooBig { limit: u64 },
    /// A read of a job's `output` before its input was written.
    #[error("job {0} has no input yet: write jobs/{0}/input first")]
    NoInput(u64),
    /// A read of `infer` with no request of the caller's session.
    #[error("{0}: no request from this session (write one first)")]
    NoRequest(String),
    #[error("job {0} was cancelled")]
    Cancelled(u64),
    #[error("job {id} timed out after {ms} ms (the model's timeout_ms)")]
    TimedOut { id: u64, ms: u64 },
    /// A user's jobs hold as much as `--max-user-bytes` allows.
    #[error("uid {uid}'s jobs hold {held} bytes of requests and answers (--max-user-bytes {limit}); read or wait for them to expire")]
    Quota { uid: u32, held: u64, limit: u64 },
    /// Backpressure: the model's queue is at `max_queue`.
    #[error("models/{model}: queue full ({max} jobs queued, the model's max_queue); retry later")]
    QueueFull { model: String, max: u32 },
    /// A request that came while the daemon stops: it was not accepted.
    #[error("the daemon is shutting down; retry once it is back")]
    ShuttingDown,
    /// A model pinned to a device that is not there.
    #[error("{0}")]
    NoDevice(String),
    #[error("job {0}: the daemon restarted and its input was lost")]
    Restarted(u64),
    #[error("job {0} expired: no input came while it was new")]
    Expired(u64),
    #[error("job {0} finished before the daemon restarted; its output was too large to keep")]
    OutputNotKept(u64),
    #[error("job {0}: its output was read and is no longer kept (past --max-finished-bytes)")]
    OutputDropped(u64),
    /// A job that failed earlier: its errno and reason, as recorded.
    #[error("{message}")]
    Job { errno: i32, message: String },
    /// An import a model's trust policy requires to be signed, unsigned.
    #[error("{0}")]
    Unsigned(String),
    /// An import whose signature does not verify.
    #[error("{0}")]
    BadSignature(String),
    #[error("{0}: directory not empty")]
    NotEmpty(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}: read-only (versions are immutable)")]
    ReadOnly(String),
    #[error("{0}")]
    NotPermitted(String),
    /// A file the daemon writes (README, status, device files).
    #[error("{0}: read-only file")]
    AccessDenied(String),
    #[error("{0}: not a directory")]
    NotDir(String),
    #[error("{0}: is a directory")]
    IsDir(String),
    /// A file handle that this filesystem did not hand out (or already released).
    #[error("bad file handle {0}")]
    BadHandle(u64),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("catalog: {0}")]
    Catalog(#[from] sled::Error),
    /// The catalog holds a record this build cannot read.
    #[error("catalog record {key}: {why}")]
    CorruptRecord { key: String, why: String },
    /// A backend failed to load or run a model: its own message, on one line.
    #[error("{backend}: {message}")]
    Backend { backend: &'static str, message: String },
    /// A blob whose bytes no longer hash to its name: refused, not run.
    #[error("blob {digest} of {file} does not match its digest (modified on disk?); refusing to run it")]
    CorruptBlob { file: String, digest: crate::store::Digest },
    /// The shared catalog (etcd) cannot be reached: nothing was committed.
    #[error("catalog {0}: unreachable; retry once it is back")]
    CatalogUnreachable(String),
    /// The shared catalog answered with an error (not "unavailable").
    #[error("catalog {url}: {message}")]
    CatalogRefused { url: String, message: String },
    /// Another node changed the model's record meanwhile (a write is
    /// computed again; past its retries, this reaches the user).
    #[error("models/{0}: changed by another node meanwhile; retry")]
    Conflict(String),
    /// The shared blob store (S3) failed: nothing was committed, or the
    /// blob could not be fetched.
    #[error("blob store {url}: {message}")]
    BlobStore { url: String, message: String },
    /// A broken promise inside the daemon (a panic caught, a record that
    /// names a backend this daemon lacks): a bug or a damaged install.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Wraps an I/O error with what was being done, e.g. the path.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }

    /// The errno a FUSE reply carries for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::NotFound(_) => libc::ENOENT,
            Error::Exists(_) => libc::EEXIST,
            Error::InvalidName { .. } => libc::EINVAL,
            Error::InvalidModel { .. } => libc::EINVAL,
            Error::EmptyUpload(_) => libc::EINVAL,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::BadInput(_) => libc::EINVAL,
            Error::TooBig { .. } | Error::OutputTooBig { .. } | Error::ImportTooBig { .. } => libc::EFBIG,
            Error::NoRequest(_) | Error::NoInput(_) => libc::ENODATA,
            Error::Cancelled(_) => libc::ECANCELED,
            Error::TimedOut { .. } => libc::ETIMEDOUT,
            Error::QueueFull { .. } => libc::EAGAIN,
            Error::Quota { .. } => libc::EDQUOT,
            Error::ShuttingDown => libc::EAGAIN,
            Error::NoDevice(_) => libc::ENODEV,
            Error::Restarted(_) => libc::EIO,
            Error::Expired(_) => libc::ETIMEDOUT,
            Error::OutputNotKept(_) | Error::OutputDropped(_) => libc::ENODATA,
            Error::Job { errno, .. } => *errno,
            Error::NotEmpty(_) => libc::ENOTEMPTY,
            Error::Unsigned(_) => libc::EACCES,
            Error::BadSignature(_) => libc::EINVAL,
            Error::Busy(_) => libc::EBUSY,
            Error::ReadOnly(_) => libc::EROFS,
            Error::NotPermitted(_) => libc::EPERM,
            Error::AccessDenied(_) => libc::EACCES,
            Error::NotDir(_) => libc::ENOTDIR,
            Error::IsDir(_) => libc::EISDIR,
            Error::BadHandle(_) => libc::EBADF,
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Catalog(sled::Error::Io(e)) => e.raw_os_error().unwrap_or(libc::EIO),
            Error::Catalog(_) => libc::EIO,
            Error::CorruptRecord { .. } => libc::EIO,
            Error::Backend { .. } => libc::EIO,
            Error::CorruptBlob { .. } => libc::EIO,
            Error::CatalogUnreachable(_) | Error::Conflict(_) => libc::EAGAIN,
            Error::BlobStore { .. } | Error::CatalogRefused { .. } => libc::EIO,
            Error::Internal(_) => libc::EIO,
        }
    }

    /// How loudly the daemon logs this error: lookups of names that do not
    /// exist are routine; a failed disk write is not.
    pub fn level(&self) -> tracing::Level {
        match self {
            Error::NotFound(_) | Error::Exists(_) | Error::EmptyUpload(_) => tracing::Level::DEBUG,
            Error::InvalidName { .. }
            | Error::InvalidModel { .. }
            | Error::InvalidArgument(_)
            | Error::BadInput(_)
            | Error::TooBig { .. }
            | Error::OutputTooBig { .. }
            | Error::ImportTooBig { .. }
            | Error::NoRequest(_)
            | Error::NoInput(_)
            | Error::Cancelled(_)
            | Error::TimedOut { .. }
            | Error::QueueFull { .. }
            | Error::Quota { .. }
            | Error::ShuttingDown
            | Error::NoDevice(_)
            | Error::Restarted(_)
            | Error::Expired(_)
            | Error::OutputNotKept(_)
            | Error::OutputDropped(_)
            | Error::Job { .. }
            | Error::NotEmpty(_)
            | Error::Unsigned(_)
            | Error::BadSignature(_)
            | Error::Busy(_)
            | Error::ReadOnly(_)
            | Error::NotPermitted(_)
            | Error::AccessDenied(_)
            | Error::NotDir(_)
            | Error::IsDir(_)
            | Error::BadHandle(_) => tracing::Level::INFO,
            Error::Io { .. }
            | Error::Catalog(_)
            | Error::CorruptRecord { .. }
            | Error::Backend { .. }
            | Error::CorruptBlob { .. }
            | Error::CatalogUnreachable(_)
            | Error::Conflict(_)
            | Error::BlobStore { .. }
            | Error::CatalogRefused { .. }
            | Error::Internal(_) => tracing::Level::WARN,
        }
    }
}

/// The longest reason kept in a job's `error` file and logged.
pub const MAX_REASON: usize = 200;

/// `text` as one line of at most [`MAX_REASON`] bytes: control characters
/// (newlines, escapes) become spaces and a longer text is cut, with `...`.
pub fn one_line(text: &str) -> String {
    let mut line: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if line.len() > MAX_REASON {
        let mut end = MAX_REASON - 3;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str("...");
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_one_short_line() {
        assert_eq!(one_line("a\nb\x1b[31mc"), "a b [31mc");
        let long = one_line(&"é".repeat(300));
        assert!(long.len() <= MAX_REASON && long.ends_with("..."), "{long}");
    }

    #[test]
    fn io_errors_keep_their_errno() {
        let e = Error::io("x", io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.errno(), libc::ENOSPC);
        let e = Error::io("x", io::Error::other("no os error"));
        assert_eq!(e.errno(), libc::EIO);
    }
}
