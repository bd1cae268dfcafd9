//! The daemon's memory allocator: jemalloc, set up for a server that
//! handles large buffers request after request. It keeps freed pages for
//! the next request instead of returning them to the kernel at each free,
//! and gives them back on a timer ([`purge_periodically`]). It clears
//! small and medium zeroed buffers with `memset` ([`Allocator`]).

use std::alloc::{GlobalAlloc, Layout};

use tikv_jemallocator::Jemalloc;

#[global_allocator]
static ALLOC: Allocator = Allocator;

/// jemalloc, except that a zeroed buffer under [`ZERO_BY_MEMSET_BELOW`]
/// is cleared with `memset`. jemalloc clears a reused large buffer that
/// its thread cache does not hold by handing its pages back
/// (`MADV_DONTNEED`: a system call, and a TLB flush on every core the
/// daemon runs on), so that each page faults in again, zeroed, at its
/// first write. candle allocates every matmul's output zeroed and then
/// writes all of it: a language model took ~280 page faults and 6
/// `madvise` calls a token, and batched candle embeddings ran 15% slower
/// than with `memset` (docs/BENCHMARKS.md). From that size up jemalloc's
/// own zeroing stays: a buffer that big is more often written sparsely,
/// and its untouched pages cost nothing (sled's 40 metric histograms of
/// 512 KiB, allocated at start and mostly never written: 20 MB more idle
/// RSS if cleared; a long KV cache, written position by position).
pub struct Allocator;

const ZERO_BY_MEMSET_BELOW: usize = 512 << 10;

// SAFETY: every call goes to jemalloc with the caller's arguments;
// `alloc_zeroed` clears all `layout.size()` bytes of what it returns.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Jemalloc.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= ZERO_BY_MEMSET_BELOW {
            return Jemalloc.alloc_zeroed(layout);
        }
        let p = Jemalloc.alloc(layout);
        if !p.is_null() {
            std::ptr::write_bytes(p, 0, layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Jemalloc.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Jemalloc.realloc(ptr, layout, new_size)
    }
}

/// jemalloc's options, read once at its start (the symbol carries the
/// crate's `_rjem_` prefix). One arena, and no separate one for large
/// buffers, so a buffer freed by one thread is reused by the next request
/// whichever thread it runs on; freed pages are kept (no decay) rather
/// than returned and faulted in again, and [`purge_periodically`] gives
/// them back instead. A 64 MB request: ~230 MB/s with the default decay,
/// ~400 MB/s this way.
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf =
    MallocConf(c"oversize_threshold:0,narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1".as_ptr());

#[repr(transparent)]
struct MallocConf(*const libc::c_char);
// SAFETY: points at a string constant; nothing writes through it.
unsafe impl Sync for MallocConf {}

/// Every 10 s, hands the memory jemalloc keeps for reuse back to the
/// kernel: under load that costs one round of page faults per period, and
/// an idle daemon shrinks back within 10 s of its last request.
pub fn purge_periodically() {
    let spawned = std::thread::Builder::new().name("purge".into()).spawn(|| loop {
        std::thread::sleep(std::time::Duration::from_secs(10));
        // "arena.4096.purge": 4096 is MALLCTL_ARENAS_ALL. SAFETY: a
        // documented mallctl that reads and writes nothing.
        let rc = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"arena.4096.purge".as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if rc != 0 {
            tracing::warn!("returning free memory to the kernel failed (jemalloc error {rc})");
            return;
        }
    });
    if let Err(e) = spawned {
        tracing::warn!("not returning free memory to the kernel: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests share jemalloc's one arena: one test's `calloc` may take
    /// and purge the pages another freed to reuse. They run one at a time.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Minor page faults of the calling thread so far.
    fn faults() -> i64 {
        // SAFETY: getrusage fills the struct it is given.
        unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut usage), 0);
            usage.ru_minflt
        }
    }

    /// Allocates `size` zeroed bytes, checks they are zero, writes them
    /// all (as a matmul's output is), frees them.
    fn zeroed_then_written(size: usize) {
        let layout = Layout::from_size_align(size, 64).unwrap();
        // SAFETY: a non-zero size; freed with the same layout.
        unsafe {
            let p = ALLOC.alloc_zeroed(layout);
            assert!(!p.is_null());
            assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0), "{size} bytes are not zeroed");
            std::ptr::write_bytes(p, 0xa5, size);
            ALLOC.dealloc(p, layout);
        }
    }

    #[test]
    fn a_reused_buffer_is_zeroed_without_faulting_its_pages_in_again() {
        let _one = ONE_AT_A_TIME.lock().unwrap();
        // A language model's logits (49,152 floats), over and over.
        let size = 196_608;
        zeroed_then_written(size);
        let before = faults();
        for _ in 0..100 {
            zeroed_then_written(size);
        }
        // jemalloc's own zeroing faults all 48 pages in again each time
        // (9,796 faults); a thread of another test that takes the pages
        // to reuse may cost a round or two.
        let faulted = faults() - before;
        assert!(faulted < 1200, "{faulted} page faults for 100 reuses of {size} bytes");
    }

    #[test]
    fn a_large_zeroed_buffer_is_not_touched_until_written() {
        let _one = ONE_AT_A_TIME.lock().unwrap();
        // Fresh or reused, jemalloc hands it over as pages not yet in
        // memory: a sparse table of 512 KiB costs only what is written.
        let size = ZERO_BY_MEMSET_BELOW;
        let layout = Layout::from_size_align(size, 4096).unwrap();
        // One to reuse.
        zeroed_then_written(size);
        // SAFETY: a non-zero size, freed with the same layout; mincore
        // reads the mapping of the pages allocated and writes one byte
        // per page into `resident`.
        unsafe {
            let p = ALLOC.alloc_zeroed(layout);
            assert!(!p.is_null());
            let mut resident = vec![0u8; size / 4096];
            assert_eq!(libc::mincore(p.cast(), size, resident.as_mut_ptr()), 0);
            ALLOC.dealloc(p, layout);
            let touched = resident.iter().filter(|&&r| r & 1 == 1).count();
            assert_eq!(touched, 0, "{touched} of {} pages in memory before any write", size / 4096);
        }
    }

    #[test]
    fn buffers_of_every_size_come_zeroed() {
        let _one = ONE_AT_A_TIME.lock().unwrap();
        for size in [1, 4096, 64 << 10, ZERO_BY_MEMSET_BELOW - 1, ZERO_BY_MEMSET_BELOW, 8 << 20] {
            zeroed_then_written(size);
            zeroed_then_written(size); // reused, written before
        }
    }
}
