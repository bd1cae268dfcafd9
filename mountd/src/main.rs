//! `aifs-mountd`: parses the command line, sets up logging, and is the
//! composition root: it builds the store, the backends, the devices, the
//! engine and the filesystem, mounts, and on SIGINT/SIGTERM shuts them down
//! in order (see [`serve`]). Everything it mounts is `aifs::fs::Fs`.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use aifs::backend::{find_onnxruntime, Backend, Backends, OnnxRuntime};
use aifs::device::{Cpu, Nvidia, Probe, Simulated};
use aifs::engine::{Engine, EngineConfig};
use aifs::fs::{Fs, FsConfig};
use aifs::repository::Repositories;
use aifs::store::Store;
use clap::Parser;
use signal_hook::consts::{SIGINT, SIGTERM};

/// Mount the aifs tree: AI models, compute devices and inference jobs as files.
///
/// Detaches once the mount is ready unless --foreground is given. Logging
/// follows RUST_LOG (default "info").
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    /// Directory to mount the tree on (created if missing).
    mountpoint: PathBuf,

    /// Where blobs and the catalog live [default: $XDG_DATA_HOME/aifs, else ~/.local/share/aifs].
    #[arg(long, env = "AIFS_DATA_DIR")]
    data_dir: Option<PathBuf>,

    /// Stay in the foreground and log to stderr (otherwise detach once mounted and log to DATA_DIR/aifs-mountd.log).
    #[arg(long, short)]
    foreground: bool,

    /// Path of libonnxruntime.so [default: next to this binary, then ../lib/aifs/ from it, then .deps/ of the checkout it was built in, then /usr/local/lib, /usr/lib].
    #[arg(long, env = "AIFS_ONNXRUNTIME")]
    onnxruntime: Option<PathBuf>,

    /// Let other users and containers use the mount (the kernel still enforces each file's mode).
    #[arg(long)]
    allow_other: bool,

    /// Make the directory that holds the mount point a shared mount (binding it onto itself if needed), so that
    /// containers that bind that directory as a slave (-v /mnt:/host/mnt:rslave) see the tree again after the
    /// daemon restarts. Root only.
    #[arg(long)]
    shared: bool,

    /// FUSE worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,

    /// Threads running inference jobs [default: one per core].
    #[arg(long)]
    workers: Option<usize>,

    /// Largest request accepted through infer or a job's input, in bytes (larger: EFBIG).
    #[arg(long, default_value_t = 1 << 30)]
    max_input_bytes: u64,

    /// Largest model file an import takes, in bytes (larger: EFBIG; a sparse file counts as big as it claims).
    #[arg(long, default_value_t = 64 << 30)]
    max_import_bytes: u64,

    /// Largest answer kept, in bytes (larger: the job fails with EFBIG).
    #[arg(long, default_value_t = 1 << 30)]
    max_output_bytes: u64,

    /// Bytes of requests and answers one user's jobs may hold in memory (past it: EDQUOT).
    #[arg(long, default_value_t = 1 << 30)]
    max_user_bytes: u64,

    /// Finished jobs kept under jobs/ per user before that user's oldest are removed.
    #[arg(long, default_value_t = 10_000)]
    max_finished_jobs: usize,

    /// Bytes of inputs and outputs finished jobs may hold in memory; past it, the oldest already read drop theirs.
    #[arg(long, default_value_t = 256 << 20)]
    max_finished_bytes: u64,

    /// Seconds finished jobs are kept under jobs/.
    #[arg(long, default_value_t = 3600)]
    job_ttl_s: u64,

    /// A queued job gains one priority point per this many milliseconds waited (0: no aging).
    #[arg(long, default_value_t = 100)]
    aging_ms: u64,

    /// Add a simulated GPU (repeatable): SPEC is MEMORY, MEMORY,DELAY_MS or MEMORY,DELAY_MS,WORKERS, e.g. 512M or 2G,5. It runs
    /// on the CPU with that memory budget, extra time per run and workers (default 1); for trying
    /// scheduling and placement without a GPU.
    #[arg(long, value_name = "SPEC")]
    simulate_gpu: Vec<String>,

    /// Watch a model repository (repeatable): DIR/NAME/N/FILES becomes models/NAME/vN, picked up
    /// without a restart once complete; DIR/NAME/config.json is the model's config.
    #[arg(long, value_name = "DIR")]
    repository: Vec<PathBuf>,

    /// How long nothing in a repository's version directory may change before it is imported, in
    /// milliseconds (a directory moved into place goes at once).
    #[arg(long, default_value_t = 3000)]
    repository_settle_ms: u64,

    /// Share the catalog with other nodes: etcd://HOST:PORT[,HOST:PORT...]/PREFIX (needs --blobs;
    /// see docs/SCALE.md). This node's catalog becomes a mirror of the shared one.
    #[arg(long, value_name = "URL", requires = "blobs")]
    catalog: Option<String>,

    /// With a shared store: the most bytes of blobs kept in the data dir; past it, the least
    /// recently used go, to be fetched again when next used (0: no bound).
    #[arg(long, default_value_t = 0, requires = "catalog")]
    blob_cache_bytes: u64,

    /// This node's name in the cluster view of a shared store (default: the host name).
    #[arg(long, requires = "catalog")]
    node: Option<String>,

    /// Share the blobs with other nodes: s3://BUCKET/PREFIX, credentials, region and endpoint from
    /// the AWS_* variables (needs --catalog). The data dir's blobs become a cache.
    #[arg(long, value_name = "URL", requires = "catalog")]
    blobs: Option<String>,
}

mod helper;
mod memory;

fn main() -> ExitCode {
    // First, while this is the only thread.
    aifs::backend::settle_thread_count();
    // Run as `aifs` by mount.fuse3 (or as mount.fuse.aifs by mount(8)):
    // SOURCE MOUNTPOINT -o OPTIONS becomes the daemon's flags.
    let args = match helper::daemon_args(std::env::args_os().collect()) {
        Ok(args) => args,
        Err(msg) => {
            eprintln!("aifs: {msg}");
            return ExitCode::from(2);
        }
    };
    let cli = Cli::parse_from(args);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("aifs-mountd: {msg}");
            tracing::error!("{msg}");
            ExitCode::FAILURE
        }
    }
}

fn default_data_dir() -> Result<PathBuf, String> {
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("aifs"));
    }
    let home = std::env::var_os("HOME").ok_or("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/aifs"))
}

fn run(cli: Cli) -> Result<(), String> {
    let data_dir = match cli.data_dir.clone() {
        Some(d) => d,
        None => default_data_dir()?,
    };
    if !data_dir.exists() {
        // Models, requests and outputs of every user: the daemon's alone.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
    }
    // A daemon that died leaves its mount behind ("Transport endpoint is not connected").
    let cleared_stale = aifs::fuse::clear_stale_mount(&cli.mountpoint)
        .map_err(|e| format!("mount point {}: {e}", cli.mountpoint.display()))?;
    std::fs::create_dir_all(&cli.mountpoint).map_err(|e| format!("mount point {}: {e}", cli.mountpoint.display()))?;
    if cli.shared {
        aifs::fuse::share_parent(&cli.mountpoint)
            .map_err(|e| format!("making the directory that holds {} a shared mount: {e}", cli.mountpoint.display()))?;
    }
    // From here on, whatever the daemon creates (blobs, the catalog, the
    // journal, the log) is its user's alone, whatever the data directory's
    // mode; the library sets the modes it relies on itself too.
    // SAFETY: umask only sets the process's file mode mask.
    unsafe { libc::umask(0o077) };
    let library = find_onnxruntime(cli.onnxruntime.as_deref())?;

    // Detach before any thread exists; the parent waits for "mounted".
    let ready = if cli.foreground { None } else { Some(detach(&data_dir.join("aifs-mountd.log"))?) };
    init_logging();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), data_dir = %data_dir.display(), onnxruntime = %library.display(), "starting");

    if cleared_stale {
        tracing::warn!(mountpoint = %cli.mountpoint.display(), "cleared a stale mount left by a daemon that died");
    }
    let result = serve(&cli, &data_dir, &library, ready);
    if let Err(msg) = &result {
        tracing::error!("{msg}");
    }
    result
}

/// Builds the parts, mounts, serves until unmounted, then shuts down in
/// order: the mount is gone first (no new requests), then the engine stops
/// (runs in progress finish, queued jobs stay in the journal for the next
/// start, every ended job's record is written and flushed), and the store
/// closes last (its catalog writes are durable as they happen).
fn serve(cli: &Cli, data_dir: &Path, library: &Path, ready: Option<OwnedFd>) -> Result<(), String> {
    let mountpoint = std::path::absolute(&cli.mountpoint).map_err(|e| e.to_string())?;
    let store =
        Arc::new(Store::open(data_dir).map_err(|e| format!("opening the store in {}: {e}", data_dir.display()))?);
    let cluster = match (&cli.catalog, &cli.blobs) {
        (Some(catalog), Some(blobs)) => {
            let cluster = aifs::cluster::Cluster::connect(catalog, blobs).map_err(|e| e.to_string())?;
            store.share(cluster.clone());
            store.set_blob_cache_limit(cli.blob_cache_bytes);
            cluster.mirror(&store).map_err(|e| format!("reading the shared catalog: {e}"))?;
            tracing::info!(catalog, blobs, "sharing the store");
            Some(cluster)
        }
        _ => None,
    };
    let onnx: Arc<dyn Backend> = OnnxRuntime::load(library).map_err(|e| e.to_string())?;
    // Preference order: a sentence-transformers tree that also ships an
    // ONNX export is run as the embedding model it is.
    let backends = Backends::new(vec![Arc::new(aifs::backend::Candle), Arc::new(aifs::backend::Gguf), onnx]);
    let mut devices: Vec<Arc<dyn Probe>> = vec![Arc::new(Cpu::new())];
    devices.extend(Nvidia::discover().into_iter().map(|g| Arc::new(g) as Arc<dyn Probe>));
    for spec in &cli.simulate_gpu {
        devices.push(Arc::new(Simulated::parse(devices.len() - 1, spec)?));
    }
    tracing::info!(devices = ?devices.iter().map(|d| d.id().to_string()).collect::<Vec<_>>(), "devices");
    let mut engine = EngineConfig {
        max_input_bytes: cli.max_input_bytes,
        max_output_bytes: cli.max_output_bytes,
        max_user_bytes: cli.max_user_bytes,
        max_finished_jobs: cli.max_finished_jobs,
        max_finished_bytes: cli.max_finished_bytes,
        finished_job_ttl: std::time::Duration::from_secs(cli.job_ttl_s),
        aging: std::time::Duration::from_millis(cli.aging_ms),
        // A reader on the one-handle way may run its own CPU job on its FUSE
        // thread; half the FUSE threads stay free for the rest of the tree.
        inline_runs: cli.threads / 2,
        ..EngineConfig::default()
    };
    if let Some(workers) = cli.workers {
        engine.workers = workers;
    }
    let engine = Arc::new(
        Engine::start(store.clone(), backends.clone(), devices, engine)
            .map_err(|e| format!("starting the engine: {e}"))?,
    );
    if let Some(cluster) = &cluster {
        let node = cli.node.clone().unwrap_or_else(host_name);
        let engine = engine.clone();
        cluster.announce(&node, move || aifs::fs::node_entry(&engine));
    }
    // Scanned once before the mount is up: what the repositories hold
    // complete is there when the tree appears.
    let repositories = match cli.repository.as_slice() {
        [] => None,
        roots => Some(Arc::new(
            Repositories::start(
                roots.to_vec(),
                std::time::Duration::from_millis(cli.repository_settle_ms),
                store.clone(),
                backends.clone(),
                engine.clone(),
            )
            .map_err(|e| format!("watching the repositories: {e}"))?,
        )),
    };
    let fs_config = FsConfig {
        mountpoint: mountpoint.clone(),
        max_import_bytes: cli.max_import_bytes,
        repositories: repositories.clone(),
    };
    let fs = Fs::new(store, engine.clone(), backends, fs_config);

    let config = aifs::fuse::mount_config(cli.allow_other, cli.threads);
    let mut session = fuser::Session::new(aifs::fuse::Adapter::new(fs.clone()), &mountpoint, &config)
        .map_err(|e| format!("mounting on {}: {e}", mountpoint.display()))?;
    tracing::info!(mountpoint = %mountpoint.display(), "mounted");

    memory::purge_periodically();
    let mut unmounter = session.unmount_callable();
    let mountpoint_for_signal = mountpoint.clone();
    let engine_for_signal = engine.clone();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|e| e.to_string())?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            // Each signal tries again; when the mount is busy (a shell's cwd
            // in it), detach it: it goes away as its last user leaves.
            for sig in signals.forever() {
                tracing::info!(signal = sig, "unmounting");
                match unmounter.unmount() {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!("unmount failed ({e}); detaching the mount instead");
                        let detached = std::ffi::CString::new(mountpoint_for_signal.as_os_str().as_encoded_bytes())
                            // SAFETY: a valid C string.
                            .map(|p| unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) } == 0)
                            .unwrap_or(false);
                        if detached {
                            // The detached mount lives on while its users do, and so would
                            // the session: leave now, with the engine stopped and the
                            // jobs' records written.
                            if let Err(e) = engine_for_signal.shutdown() {
                                tracing::error!("stopping the engine: {e}");
                            }
                            tracing::info!("detached the busy mount; bye");
                            std::process::exit(0);
                        }
                    }
                }
            }
        })
        .map_err(|e| e.to_string())?;

    if let Some(fd) = ready {
        let mut pipe = std::fs::File::from(fd);
        let _ = pipe.write_all(b"ok");
    }
    // Under systemd (Type=notify): ready once the tree is mounted. Elsewhere
    // NOTIFY_SOCKET is unset and this does nothing.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let served = session.run().map_err(|e| format!("serving the mount: {e}"));
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(repositories) = &repositories {
        repositories.stop();
    }
    engine.shutdown().map_err(|e| format!("stopping the engine: {e}"))?;
    served?;
    tracing::info!("unmounted; bye");
    Ok(())
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// Forks. The parent waits until the child writes "ok" on the returned pipe
/// (the mount is ready) and exits 0, or exits 1 if the child dies first
/// (its error is in the log). The child starts a new session and sends its
/// stdio to `log`.
fn detach(log: &Path) -> Result<OwnedFd, String> {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(|e| format!("log file {}: {e}", log.display()))?;
    // One made by an earlier version may be wider.
    log_file
        .set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("log file {}: {e}", log.display()))?;
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned here only.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other threads exist yet, so the child may keep running Rust.
    match unsafe { libc::fork() } {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: plain syscalls on fds we own.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
                libc::dup2(null, 0);
                libc::dup2(log_file.as_raw_fd(), 1);
                libc::dup2(log_file.as_raw_fd(), 2);
            }
            Ok(write_end)
        }
        _child => {
            drop(write_end);
            let mut status = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut status);
            if status == "ok" {
                std::process::exit(0);
            }
            eprintln!("aifs-mountd: failed to start; see {}", log.display());
            std::process::exit(1);
        }
    }
}

/// The host's name (`uname -n`), for the cluster view.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "localhost".into(), |h| h.trim().to_string())
}
