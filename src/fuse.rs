//! The `fuser::Filesystem` adapter: converts arguments, calls [`Fs`],
//! replies. Every operation has the same shape: call, reply on `Ok`, and on
//! `Err` go through [`Adapter::fail`], which logs the one line and picks
//! the errno ([`Error::errno`]). No tree logic lives here.
//!
//! Reads are the one operation that may wait (for a job's answer), so their
//! replies are held in [`Waiting`] until answered: a signal to the reader
//! (FUSE_INTERRUPT) answers the read with EINTR instead, and the answer
//! that comes later is dropped.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, IoctlFlags, KernelConfig,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, RequestId, SessionACL, TimeOrNow,
    WriteFlags,
};

use crate::error::Error;
use crate::fs::{Attr, Caller, Fs, Kind, Opened, SetAttr};

/// How long the kernel may cache entries and attributes. Changes made
/// through the mount update the kernel's caches themselves; this only
/// bounds how stale a daemon-side change (a new `latest`) can look.
const TTL: Duration = Duration::from_secs(1);

pub struct Adapter {
    fs: Arc<Fs>,
    reads: Arc<Waiting<ReplyData>>,
}

impl Adapter {
    pub fn new(fs: Arc<Fs>) -> Adapter {
        Adapter { fs, reads: Arc::default() }
    }

    fn fail(op: &str, err: Error) -> Errno {
        macro_rules! log {
            ($level:expr) => {
                tracing::event!($level, op, errno = err.errno(), "{err}")
            };
        }
        match err.level() {
            tracing::Level::ERROR => log!(tracing::Level::ERROR),
            tracing::Level::WARN => log!(tracing::Level::WARN),
            tracing::Level::INFO => log!(tracing::Level::INFO),
            tracing::Level::DEBUG => log!(tracing::Level::DEBUG),
            tracing::Level::TRACE => log!(tracing::Level::TRACE),
        }
        Errno::from_i32(err.errno())
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let (kind, nlink) = match a.kind {
        Kind::Dir => (FileType::Directory, 2),
        Kind::File => (FileType::RegularFile, 1),
        Kind::Symlink => (FileType::Symlink, 1),
    };
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind,
        perm: a.perm,
        nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn ttl(a: &Attr) -> Duration {
    if a.cacheable {
        TTL
    } else {
        Duration::ZERO
    }
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid(), pid: req.pid() }
}

fn fopen_flags(o: &Opened) -> FopenFlags {
    let mut flags = FopenFlags::empty();
    if o.direct_io {
        flags |= FopenFlags::FOPEN_DIRECT_IO;
    }
    if o.keep_cache {
        flags |= FopenFlags::FOPEN_KEEP_CACHE;
    }
    if o.stream {
        flags |= FopenFlags::FOPEN_STREAM | FopenFlags::FOPEN_NONSEEKABLE;
    }
    if o.no_flush {
        flags |= FopenFlags::FOPEN_NOFLUSH;
    }
    flags
}

/// What aifs asks of the kernel at `init` (the benchmarks' trivial FUSE
/// floor asks the same): 1 MiB writes, which make imports and large
/// tensors faster; the kernel may clamp it.
pub fn init_kernel_config(config: &mut KernelConfig) -> io::Result<()> {
    let _ = config.set_max_write(1 << 20);
    Ok(())
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        init_kernel_config(config)
    }

    fn interrupt(&self, _req: &Request, unique: RequestId) {
        if let Some(reply) = self.reads.interrupt(unique.0) {
            tracing::debug!(unique = unique.0, "read interrupted by a signal");
            reply.error(Errno::EINTR);
        }
    }

    /// No file here is a terminal or takes commands by ioctl: ENOTTY, as a
    /// regular file answers (`tar` asks whether its output is a tape).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name) {
            Ok(a) => reply.entry(&ttl(&a), &file_attr(&a), Generation(0)),
            Err(e) => reply.error(Self::fail("lookup", e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(a) => reply.attr(&ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(Self::fail("getattr", e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        match self.fs.setattr(ino.0, SetAttr { mode, uid, gid, size }) {
            Ok(a) => reply.attr(&ttl(&a), &file_attr(&a)),
            Err(e) => reply.error(Self::fail("setattr", e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(Self::fail("readlink", e)),
        }
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        match self.fs.mkdir(parent.0, name, mode & !umask, caller(req)) {
            Ok(a) => reply.entry(&ttl(&a), &file_attr(&a), Generation(0)),
            Err(e) => reply.error(Self::fail("mkdir", e)),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.unlink(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("unlink", e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.fs.rmdir(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("rmdir", e)),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        match self.fs.symlink(parent.0, link_name, target) {
            Ok(a) => reply.entry(&ttl(&a), &file_attr(&a), Generation(0)),
            Err(e) => reply.error(Self::fail("symlink", e)),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Self::fail("rename", Error::InvalidArgument("rename flags not supported".into())));
        }
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.fs.rename(parent.0, name, newparent.0, newname, no_replace) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("rename", e)),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let why = format!("{}: special files cannot be made here", name.to_string_lossy());
        reply.error(Self::fail("mknod", Error::NotPermitted(why)));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(ino.0, flags.0, caller(req)) {
            Ok(o) => reply.opened(FileHandle(o.fh), fopen_flags(&o)),
            Err(e) => reply.error(Self::fail("open", e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        match self.fs.create(parent.0, name, mode & !umask, caller(req)) {
            Ok((a, o)) => reply.created(&ttl(&a), &file_attr(&a), Generation(0), FileHandle(o.fh), fopen_flags(&o)),
            Err(e) => reply.error(Self::fail("create", e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // The reply may be sent later, from the thread that ends a job, or
        // sooner, by `interrupt`.
        let unique = req.unique().0;
        if let Err(reply) = self.reads.hold(unique, reply) {
            return reply.error(Errno::EINTR);
        }
        let held = Held { reads: self.reads.clone(), unique };
        self.fs.read(fh.0, offset, size, move |result| {
            let Some(reply) = held.take() else {
                return false; // interrupted: answered with EINTR
            };
            match result {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(Self::fail("read", e)),
            }
            true
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(Self::fail("write", e)),
        }
    }

    fn flush(&self, req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        // The reply may be sent later, from a heavy-work thread (an import's
        // commit, a large request's decoding).
        self.fs.flush(fh.0, req.pid(), move |result| match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("flush", e)),
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.fs.fsync(fh.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("fsync", e)),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0, move |result| match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(Self::fail("release", e)),
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.fs.readdir(ino.0) {
            Ok(entries) => entries,
            Err(e) => return reply.error(Self::fail("readdir", e)),
        };
        // Offsets: 1 and 2 are "." and "..", entry i is i + 3.
        let dots = [(ino.0, FileType::Directory, "."), (ino.0, FileType::Directory, "..")];
        let all = dots.into_iter().chain(entries.iter().map(|e| {
            let kind = match e.kind {
                Kind::Dir => FileType::Directory,
                Kind::File => FileType::RegularFile,
                Kind::Symlink => FileType::Symlink,
            };
            (e.ino, kind, e.name.as_str())
        }));
        for (i, (entry_ino, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(entry_ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// No extended attributes; answering saves the kernel's repeated
    /// `security.capability` probes a round trip to fuser's default.
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize),
            Err(e) => reply.error(Self::fail("statfs", e)),
        }
    }
}

/// Mount options: kernel permission checks (`default_permissions`), and
/// `allow_other` when other users (containers) should see the mount.
pub fn mount_config(allow_other: bool, threads: usize) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("aifs".into()),
        MountOption::Subtype("aifs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    config.acl = if allow_other { SessionACL::All } else { SessionACL::Owner };
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    config
}

/// If `path` is a mount whose daemon died ("Transport endpoint is not
/// connected"), detaches it. Returns whether it did.
pub fn clear_stale_mount(path: &Path) -> io::Result<bool> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL"))?;
    // statfs, not stat: the kernel may answer stat from its attribute cache
    // for a while after the daemon died, but always asks the daemon for statfs.
    // SAFETY: statfs is plain old data, for which all zeros is valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string, and a struct statfs only writes into.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } == 0
        || io::Error::last_os_error().raw_os_error() != Some(libc::ENOTCONN)
    {
        return Ok(false);
    }
    // SAFETY: a valid C string; umount2 does not keep the pointer.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(true);
    }
    // Not root: fusermount3 can unmount what this user mounted.
    let status = std::process::Command::new("fusermount3").arg("-uz").arg(path).status()?;
    if status.success() {
        Ok(true)
    } else {
        Err(io::Error::other(format!("could not unmount stale mount {}", path.display())))
    }
}

/// A read's held reply, as its answer closure carries it: if the closure
/// is dropped unanswered (a panic on the way), the reader gets EIO rather
/// than waiting for a signal.
struct Held {
    reads: Arc<Waiting<ReplyData>>,
    unique: u64,
}

impl Held {
    fn take(&self) -> Option<ReplyData> {
        self.reads.take(self.unique)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(reply) = self.take() {
            reply.error(Errno::EIO);
        }
    }
}

/// Replies held by request id until answered, and the ids of interrupts
/// that came first. The kernel interrupts only a request some thread has
/// read, but that thread may not have called [`Waiting::hold`] yet: such an
/// interrupt is remembered (the last [`Waiting::EARLY`]), and the hold that
/// follows answers EINTR at once. Request ids are not reused.
struct Waiting<R> {
    inner: Mutex<(HashMap<u64, R>, VecDeque<u64>)>,
}

impl<R> Default for Waiting<R> {
    fn default() -> Self {
        Waiting { inner: Mutex::default() }
    }
}

impl<R> Waiting<R> {
    /// Interrupts remembered for requests not (yet) held: most are of
    /// requests already answered, so a few suffice.
    const EARLY: usize = 64;

    /// Holds `reply` for request `unique`; gives it back if that request
    /// was interrupted already (answer EINTR).
    fn hold(&self, unique: u64, reply: R) -> std::result::Result<(), R> {
        let mut inner = self.inner.lock().unwrap();
        let (held, early) = &mut *inner;
        if let Some(i) = early.iter().position(|&u| u == unique) {
            early.remove(i);
            return Err(reply);
        }
        held.insert(unique, reply);
        Ok(())
    }

    /// The reply to answer request `unique` with; `None` once an interrupt
    /// has taken it.
    fn take(&self, unique: u64) -> Option<R> {
        self.inner.lock().unwrap().0.remove(&unique)
    }

    /// The reply of interrupted request `unique`, to answer with EINTR;
    /// `None` if it is not held (answered already, or not yet held).
    fn interrupt(&self, unique: u64) -> Option<R> {
        let mut inner = self.inner.lock().unwrap();
        let (held, early) = &mut *inner;
        let reply = held.remove(&unique);
        if reply.is_none() {
            if early.len() == Self::EARLY {
                early.pop_front();
            }
            early.push_back(unique);
        }
        reply
    }
}

/// Makes the directory that holds `mountpoint` a shared mount point,
/// binding it onto itself first if it is not a mount point yet. Then this
/// daemon's tree, and the next daemon's after a crash or an upgrade, are
/// mounts under a shared mount, and reach every container that bound that
/// directory as a slave (`-v /mnt:/host/mnt:rslave`). A container that
/// bound the mount point itself holds the mount it found, and a restart
/// leaves it that mount, dead (ENOTCONN). Needs root (CAP_SYS_ADMIN).
pub fn share_parent(mountpoint: &Path) -> io::Result<()> {
    let mountpoint = std::fs::canonicalize(mountpoint)?;
    let path = mountpoint.parent().unwrap_or(&mountpoint).to_path_buf();
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // Field 5 is the mount point, with spaces and the like as octal escapes.
    let escaped = path.to_string_lossy().replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011");
    let mounted = mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(escaped.as_str()));
    let call = |source: *const libc::c_char, flags| {
        // SAFETY: valid C strings (or null where mount(2) allows it); mount
        // does not keep the pointers.
        let rc = unsafe { libc::mount(source, c_path.as_ptr(), std::ptr::null(), flags, std::ptr::null()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    if !mounted {
        // Recursive: the mounts already under it stay visible.
        call(c_path.as_ptr(), libc::MS_BIND | libc::MS_REC)?;
    }
    call(std::ptr::null(), libc::MS_SHARED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flush_reaches_the_kernel_as_fopen_noflush() {
        let o = Opened { fh: 1, direct_io: true, keep_cache: false, stream: true, no_flush: true };
        assert!(fopen_flags(&o).contains(FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_DIRECT_IO));
        assert!(!fopen_flags(&Opened { no_flush: false, ..o }).contains(FopenFlags::FOPEN_NOFLUSH));
    }

    #[test]
    fn an_interrupt_takes_a_held_reply_and_the_answer_finds_none() {
        let w = Waiting::default();
        w.hold(7, "reply").unwrap();
        assert_eq!(w.interrupt(7), Some("reply"));
        assert_eq!(w.take(7), None, "the late answer is dropped");
    }

    #[test]
    fn an_answer_first_leaves_the_interrupt_nothing() {
        let w = Waiting::default();
        w.hold(7, "reply").unwrap();
        assert_eq!(w.take(7), Some("reply"));
        assert_eq!(w.interrupt(7), None);
    }

    #[test]
    fn an_interrupt_before_its_hold_is_remembered_once() {
        let w = Waiting::default();
        assert_eq!(w.interrupt(7), None);
        assert_eq!(w.hold(7, "reply"), Err("reply"), "answered EINTR at once");
        w.hold(8, "other").unwrap();
        assert_eq!(w.take(8), Some("other"), "other requests are untouched");
    }

    #[test]
    fn early_interrupts_are_bounded() {
        let w = Waiting::default();
        for unique in 0..1000 {
            w.interrupt(unique);
        }
        assert_eq!(w.inner.lock().unwrap().1.len(), Waiting::<()>::EARLY);
        assert_eq!(w.hold(999, ()), Err(()), "the newest are kept");
        assert_eq!(w.hold(0, ()), Ok(()));
    }
}
