//! Work that must not hold a FUSE thread: committing an import (hash,
//! fsync, the backend's check) and decoding a request that may be large or
//! compressed. The kernel waits for the reply, not for the thread, so the
//! operation hands the work and its reply to one of these threads and the
//! FUSE thread goes back to serve everyone else (`cat status` stays quick
//! while imports and big requests are under way).
//!
//! Two fixed sets of threads take tasks in arrival order, one for imports
//! (which can take minutes) and one for requests, so a big import delays
//! no one's request; they end when the filesystem is dropped. A task that
//! panics is logged, and its thread goes on (its reply, dropped, answers
//! EIO).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

type Task = Box<dyn FnOnce() + Send>;

pub(super) struct Heavy {
    tasks: Sender<Task>,
}

impl Heavy {
    pub(super) fn start(name: &str, threads: usize) -> Heavy {
        let (tx, rx) = channel::<Task>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx: Arc<Mutex<Receiver<Task>>> = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    let task = rx.lock().unwrap().recv();
                    match task {
                        Ok(task) => {
                            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).is_err() {
                                tracing::error!("a heavy-work task panicked");
                            }
                        }
                        Err(_) => return, // the filesystem is gone
                    }
                })
                .expect("spawning a heavy-work thread");
        }
        Heavy { tasks: tx }
    }

    pub(super) fn run(&self, task: impl FnOnce() + Send + 'static) {
        // The threads live as long as the sender: a send cannot fail.
        let _ = self.tasks.send(Box::new(task));
    }
}

/// Where a piece of work runs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Work {
    /// On the FUSE thread that got the operation.
    Here,
    /// On a request thread: decoding a large request.
    Request,
    /// On an import thread: an import's commit.
    Import,
}

/// Where a request is decoded: here if that is fast enough for a FUSE
/// thread (a few milliseconds at most: a .npy up to 16 MiB, its data one
/// bulk copy; JSON up to 1 MiB), else on a request thread (an .npz, which
/// can inflate, and anything larger). A hand-off costs more than a small
/// request's decoding: the common small request stays on its thread, and
/// may run there too.
pub(super) fn decode_work(input: &[u8]) -> Work {
    let light = if input.starts_with(b"PK") {
        false
    } else if input.starts_with(b"\x93NUMPY") {
        input.len() <= 16 << 20
    } else {
        input.len() <= 1 << 20
    };
    if light {
        Work::Here
    } else {
        Work::Request
    }
}
