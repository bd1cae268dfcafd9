//! The kernel floor for the benchmarks: a FUSE filesystem that does no
//! work. It has one file, `echo`, opened like aifs's `infer` (direct I/O,
//! a stream): what a handle writes, the same handle reads back. A write +
//! read round trip through it costs what the kernel and fuser cost, nothing
//! else.
//!
//!     cargo run --release --example echofs -- MOUNTPOINT     (umount to stop)

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

const ECHO: u64 = 2;

struct Echo {
    next: AtomicU64,
    /// Per handle: the bytes written and how many were read back.
    handles: Mutex<HashMap<u64, (Vec<u8>, usize)>>,
}

fn attr(ino: u64) -> FileAttr {
    let (kind, perm) = if ino == ECHO { (FileType::RegularFile, 0o666) } else { (FileType::Directory, 0o755) };
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

const TTL: Duration = Duration::from_secs(1);

impl Filesystem for Echo {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        aifs::fuse::init_kernel_config(config)
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 == 1 && name == "echo" {
            reply.entry(&TTL, &attr(ECHO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply.attr(&TTL, &attr(ino.0));
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().unwrap().insert(fh, (Vec::new(), 0));
        reply.opened(
            FileHandle(fh),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_STREAM | FopenFlags::FOPEN_NONSEEKABLE,
        );
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if let Some((buf, _)) = self.handles.lock().unwrap().get_mut(&fh.0) {
            buf.extend_from_slice(data);
        }
        reply.written(data.len() as u32);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut handles = self.handles.lock().unwrap();
        let Some((buf, pos)) = handles.get_mut(&fh.0) else { return reply.error(Errno::EBADF) };
        let end = (*pos + size as usize).min(buf.len());
        reply.data(&buf[*pos..end]);
        *pos = end;
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: fuser::ReplyEmpty,
    ) {
        self.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }
}

fn main() {
    let mountpoint = std::env::args().nth(1).expect("usage: echofs MOUNTPOINT");
    // The same session settings as aifs-mountd's defaults.
    let config = aifs::fuse::mount_config(false, 4);
    let fs = Echo { next: AtomicU64::new(1), handles: Mutex::new(HashMap::new()) };
    fuser::mount(fs, &mountpoint, &config).expect("mounting");
}
