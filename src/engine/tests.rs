//! The engine without FUSE or a runtime library: a real store and job
//! records on disk, the fake backend ([`crate::backend::fake`]), whose
//! gate holds a gated model's runs so that what is queued, running or
//! waiting can be looked at.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::backend::fake::{Fake, Spec};
use crate::backend::Backend;
use crate::device::Cpu;
use crate::store::{Imported, ModelConfig};

/// Fields drop in order: the engine stops before its directory goes.
struct Rig {
    engine: Engine,
    store: Arc<Store>,
    fake: Fake,
    dir: tempfile::TempDir,
}

fn rig(workers: usize) -> Rig {
    rig_in(tempfile::tempdir().unwrap(), workers)
}

fn rig_in(dir: tempfile::TempDir, workers: usize) -> Rig {
    let config = EngineConfig { workers, aging: Duration::from_secs(3600), ..Default::default() };
    rig_with(dir, config)
}

fn rig_with(dir: tempfile::TempDir, config: EngineConfig) -> Rig {
    // A store just dropped in this process: sled's flusher thread may hold
    // the file lock a moment longer.
    let store = Arc::new(loop {
        match Store::open(dir.path()) {
            Ok(store) => break store,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    });
    let fake = Fake::default();
    let backends = Backends::new(vec![Arc::new(fake.clone()) as Arc<dyn Backend>]);
    let engine = Engine::start(store.clone(), backends, vec![Arc::new(Cpu::new())], config).unwrap();
    Rig { dir, store, fake, engine }
}

impl Rig {
    /// Imports `spec` as the next version of `model` (made if missing),
    /// with `config`.
    fn model(&self, model: &str, spec: &Spec, config: ModelConfig) -> u32 {
        if self.store.model(model).is_err() {
            self.store.create_model(model, 0, 0, 0o755).unwrap();
        }
        self.store.set_config(model, config).unwrap();
        let mut upload = self.store.begin_upload().unwrap();
        upload.write_at(0, &spec.to_file()).unwrap();
        let backends = Backends::new(vec![Arc::new(self.fake.clone()) as Arc<dyn Backend>]);
        match self.store.import(model, vec![("m.fake".into(), upload)], None, |files| backends.inspect(files)).unwrap()
        {
            Imported::New(n) | Imported::Existing(n) => n,
        }
    }

    fn submit(&self, model: &str, version: u32, input: &str) -> Arc<Job> {
        self.submit_as(0, model, version, input).unwrap()
    }

    fn submit_as(&self, uid: u32, model: &str, version: u32, input: &str) -> Result<Arc<Job>> {
        let job = self.engine.create_job(uid, uid, model, version).unwrap();
        self.engine.submit(&job, input.as_bytes().to_vec()).map(|()| job)
    }

    fn running(&self) -> usize {
        self.fake.counters.running.load(Ordering::SeqCst)
    }
}

fn gated(width: i64) -> Spec {
    Spec { gated: true, ..Spec::scaled(width, 2.0) }
}

fn config(instances: u32, max_batch: u32) -> ModelConfig {
    ModelConfig { instances, max_batch, batch_delay_us: 0, ..Default::default() }
}

/// The job's output as text, waiting for it.
fn output(job: &Job) -> std::result::Result<String, Failure> {
    let (tx, rx) = std::sync::mpsc::channel();
    job.when_done(move |outcome| tx.send(outcome.clone()).unwrap());
    let outcome = rx.recv_timeout(Duration::from_secs(10)).expect("the job ended");
    outcome.map(|bytes| String::from_utf8(bytes.to_vec()).unwrap())
}

fn wait_until(what: &str, ok: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_submitted_job_runs_and_answers_in_its_codec() {
    let r = rig(1);
    let v = r.model("m", &Spec::scaled(4, 2.0), config(0, 8));
    let job = r.submit("m", v, "[[1, 2, 3, 4]]");
    assert_eq!(output(&job).unwrap(), "[[2.0,4.0,6.0,8.0]]\n");
    let state = job.snapshot();
    assert_eq!((state.status, state.device.as_str(), state.batch_size), (Status::Done, "cpu", Some(1)));
    assert!(state.started.is_some() && state.compute_us.is_some());
}

#[test]
fn a_bad_request_fails_at_submit_and_queues_nothing() {
    let r = rig(1);
    let v = r.model("m", &Spec::scaled(4, 2.0), config(0, 8));
    let job = r.engine.create_job(0, 0, "m", v).unwrap();
    let err = r.engine.submit(&job, b"[[1, 2, 3]]".to_vec()).unwrap_err();
    assert_eq!(err.errno(), libc::EINVAL);
    assert!(err.to_string().contains("expected shape [-1, 4], got [1, 3]"), "{err}");
    assert_eq!(job.status(), Status::Failed);
    assert_eq!(r.engine.device_state("cpu").unwrap().queue, 0);
    assert_eq!(r.fake.counters.runs.load(Ordering::SeqCst), 0);
}

#[test]
fn queued_requests_of_one_version_run_as_one_batch() {
    let r = rig(1);
    let v = r.model("m", &gated(4), config(0, 8));
    r.fake.gate.close();
    let first = r.submit("m", v, "[[1, 1, 1, 1]]");
    wait_until("the first job runs", || r.running() == 1);
    let rest: Vec<Arc<Job>> = (1..=3).map(|i| r.submit("m", v, &format!("[[{i}, 0, 0, {i}]]"))).collect();
    r.fake.gate.open();
    assert_eq!(output(&first).unwrap(), "[[2.0,2.0,2.0,2.0]]\n");
    for (i, job) in rest.iter().enumerate() {
        let n = 2.0 * (i + 1) as f32;
        assert_eq!(output(job).unwrap(), format!("[[{n:?},0.0,0.0,{n:?}]]\n"));
        assert_eq!(job.snapshot().batch_size, Some(3));
    }
    assert_eq!(r.fake.counters.runs.load(Ordering::SeqCst), 2);
}

#[test]
fn a_cancelled_queued_job_never_runs() {
    let r = rig(1);
    let v = r.model("m", &gated(4), config(0, 1));
    r.fake.gate.close();
    let running = r.submit("m", v, "[[1, 2, 3, 4]]");
    wait_until("the first job runs", || r.running() == 1);
    let queued = r.submit("m", v, "[[1, 2, 3, 4]]");
    r.engine.cancel(&queued).unwrap();
    assert_eq!(output(&queued).unwrap_err().errno, libc::ECANCELED);
    assert_eq!(r.engine.cancel(&queued).unwrap_err().errno(), libc::EINVAL, "already finished");
    r.fake.gate.open();
    output(&running).unwrap();
    assert_eq!(queued.status(), Status::Cancelled);
    assert_eq!(r.fake.counters.runs.load(Ordering::SeqCst), 1);
}

#[test]
fn a_job_past_its_timeout_fails_and_a_late_result_is_discarded() {
    let r = rig(1);
    let v = r.model("m", &gated(4), ModelConfig { timeout_ms: 100, ..config(0, 1) });
    r.fake.gate.close();
    let job = r.submit("m", v, "[[1, 2, 3, 4]]");
    let failure = output(&job).unwrap_err();
    assert_eq!(failure.errno, libc::ETIMEDOUT);
    assert!(failure.reason.contains("timed out after 100 ms"), "{}", failure.reason);
    r.fake.gate.open();
    wait_until("the run is over", || r.engine.device_state("cpu").unwrap().running == 0);
    assert_eq!(r.fake.counters.runs.load(Ordering::SeqCst), 1);
    assert_eq!(job.status(), Status::Failed);
}

#[test]
fn a_full_queue_refuses_with_eagain() {
    let r = rig(1);
    let v = r.model("m", &gated(4), ModelConfig { max_queue: 1, ..config(0, 1) });
    r.fake.gate.close();
    let running = r.submit("m", v, "[[1, 2, 3, 4]]");
    wait_until("the first job runs", || r.running() == 1);
    let queued = r.submit("m", v, "[[1, 2, 3, 4]]");
    let refused = r.engine.create_job(0, 0, "m", v).unwrap();
    let err = r.engine.submit(&refused, b"[[1, 2, 3, 4]]".to_vec()).unwrap_err();
    assert_eq!(err.errno(), libc::EAGAIN);
    r.fake.gate.open();
    output(&running).unwrap();
    output(&queued).unwrap();
}

/// Instances 1, max_batch 1, two workers: while the one instance runs a
/// job, later jobs of that version stay queued in priority order instead
/// of taking the second worker and waiting for the instance; the second
/// worker runs other models' jobs meanwhile.
#[test]
fn the_instance_limit_keeps_priority_order() {
    let r = rig(2);
    let v = r.model("m", &gated(4), config(1, 1));
    let other = r.model("other", &Spec::scaled(4, 3.0), config(0, 1));
    r.fake.gate.close();
    let long = r.submit("m", v, "[[1, 1, 1, 1]]");
    wait_until("the long job runs", || r.running() == 1);
    let low = r.engine.create_job(0, 0, "m", v).unwrap();
    r.engine.set_priority(&low, 0).unwrap();
    r.engine.submit(&low, b"[[2, 2, 2, 2]]".to_vec()).unwrap();
    let high = r.engine.create_job(0, 0, "m", v).unwrap();
    r.engine.set_priority(&high, 10).unwrap();
    r.engine.submit(&high, b"[[3, 3, 3, 3]]".to_vec()).unwrap();

    // The free worker is not tied up waiting for m's instance.
    let elsewhere = r.submit("other", other, "[[1, 1, 1, 1]]");
    assert_eq!(output(&elsewhere).unwrap(), "[[3.0,3.0,3.0,3.0]]\n");
    assert_eq!((low.status(), high.status()), (Status::Queued, Status::Queued));
    assert_eq!(r.engine.device_state("cpu").unwrap().queue, 2);
    assert_eq!(r.running(), 1);

    std::thread::sleep(Duration::from_millis(200));
    r.fake.gate.open();
    output(&long).unwrap();
    assert_eq!(output(&high).unwrap(), "[[6.0,6.0,6.0,6.0]]\n");
    assert_eq!(output(&low).unwrap(), "[[4.0,4.0,4.0,4.0]]\n");
    let (high, low) = (high.snapshot(), low.snapshot());
    assert!(high.started.unwrap() <= low.started.unwrap(), "the higher priority ran first");
    // Neither counts the 200 ms it waited for the instance as compute.
    assert!(high.compute_us.unwrap() < 150_000, "compute_us {:?}", high.compute_us);
    assert!(high.queue_us.unwrap() >= 200_000, "queue_us {:?}", high.queue_us);
    assert_eq!(r.fake.counters.loads.load(Ordering::SeqCst), 2, "one instance of m, one of other");
}

#[test]
fn a_model_with_no_inputs_runs_on_an_empty_request() {
    let r = rig(1);
    let output_spec = Spec::scaled(3, 1.0).outputs;
    let constant = Spec { inputs: vec![], outputs: output_spec, fill: 7.0, ..Spec::scaled(3, 1.0) };
    let v = r.model("c", &constant, config(0, 8));
    assert_eq!(output(&r.submit("c", v, "{}")).unwrap(), "{\"y\":[[7.0,7.0,7.0]]}\n");
    let kserve = output(&r.submit("c", v, r#"{"inputs": []}"#)).unwrap();
    assert!(kserve.contains(r#""data":[7.0,7.0,7.0]"#), "{kserve}");
}

#[test]
fn accepted_jobs_survive_a_restart_and_run_then() {
    let dir = tempfile::tempdir().unwrap();
    let (v, finished, queued) = {
        let r = rig_in(dir, 1);
        let v = r.model("m", &gated(4), config(0, 1));
        r.fake.gate.close();
        let running = r.submit("m", v, "[[1, 1, 1, 1]]");
        wait_until("the first job runs", || r.running() == 1);
        let queued: Vec<u64> = (2..=3).map(|i| r.submit("m", v, &format!("[[{i}, {i}, {i}, {i}]]")).id).collect();
        // Stopping lets the running job finish and leaves the queue to the journal.
        let stopper = std::thread::spawn({
            let (gate, shared) = (r.fake.gate.clone(), r.engine.shared.clone());
            move || {
                wait_until("the engine stops", || shared.sched.lock().unwrap().shutdown);
                gate.open();
            }
        });
        r.engine.shutdown().unwrap();
        stopper.join().unwrap();
        assert_eq!(running.status(), Status::Done);
        assert_eq!(r.fake.counters.runs.load(Ordering::SeqCst), 1, "nothing else ran");
        let Rig { dir, engine, store, .. } = r;
        drop(engine);
        drop(store);
        (v, (dir, running.id), queued)
    };
    let (dir, running) = finished;
    let r = rig_in(dir, 1);
    assert_eq!(r.engine.job(running).unwrap().status(), Status::Done);
    for (i, id) in queued.into_iter().enumerate() {
        let job = r.engine.job(id).expect("the queued job is back");
        let n = 2.0 * (i + 2) as f32;
        assert_eq!(output(&job).unwrap(), format!("[[{n:?},{n:?},{n:?},{n:?}]]\n"));
    }
    assert_eq!(r.store.model("m").unwrap().versions.len(), v as usize);
}

/// Copies a directory tree: taken while nothing writes to it, a copy of a
/// data directory is what a crash at that moment leaves on disk.
fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let dest = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &dest);
        } else {
            std::fs::copy(entry.path(), dest).unwrap();
        }
    }
}

/// The disk as a crash leaves it with one job running and two queued (no
/// record of any of them in the catalog, only their journal entries): a
/// daemon started on it runs all three, although together they are more
/// than the model's `max_queue`.
#[test]
fn a_crash_loses_no_accepted_job() {
    let r = rig(1);
    let v = r.model("m", &gated(4), ModelConfig { max_queue: 2, ..config(0, 1) });
    r.fake.gate.close();
    let first = r.submit("m", v, "[[1, 1, 1, 1]]").id;
    wait_until("the first job runs", || r.running() == 1);
    let jobs: Vec<u64> = std::iter::once(first)
        .chain((2..=3).map(|i| r.submit("m", v, &format!("[[{i}, {i}, {i}, {i}]]")).id))
        .collect();
    let image = tempfile::tempdir().unwrap();
    {
        // No housekeeping tick starts while this is held (and, no job
        // having ended, it has nothing to write).
        let _still = r.engine.shared.sched.lock().unwrap();
        copy_tree(r.dir.path(), image.path());
    }
    r.fake.gate.open();

    let after = rig_in(image, 1);
    for (i, id) in jobs.into_iter().enumerate() {
        let job = after.engine.job(id).expect("the accepted job is back");
        let n = 2.0 * (i + 1) as f32;
        assert_eq!(output(&job).unwrap(), format!("[[{n:?},{n:?},{n:?},{n:?}]]\n"));
    }
}

/// One user floods a model's queue: another user's job still gets in
/// (`max_queue` is per user) and runs next, not after the flood.
#[test]
fn users_share_a_flooded_model() {
    let r = rig(1);
    let v = r.model("m", &gated(4), ModelConfig { max_queue: 20, ..config(0, 1) });
    r.fake.gate.close();
    let first = r.submit_as(1, "m", v, "[[1, 1, 1, 1]]").unwrap();
    wait_until("the first job runs", || r.running() == 1);
    let flood: Vec<Arc<Job>> = (0..20).map(|_| r.submit_as(1, "m", v, "[[1, 1, 1, 1]]").unwrap()).collect();
    let err = r.submit_as(1, "m", v, "[[1, 1, 1, 1]]").err().expect("refused");
    assert_eq!(err.errno(), libc::EAGAIN, "user 1's own queue is full");
    let theirs = r.submit_as(2, "m", v, "[[2, 2, 2, 2]]").expect("user 2 is not refused for user 1's queue");
    r.fake.gate.open();
    output(&first).unwrap();
    output(&theirs).unwrap();
    let started = |j: &Job| j.snapshot().started.unwrap();
    flood.iter().for_each(|j| drop(output(j)));
    let before = flood.iter().filter(|j| started(j) < started(&theirs)).count();
    assert_eq!(before, 0, "user 2's job waited for {before} of user 1's");
}

/// A run whose jobs have all timed out is stopped: its worker is free at
/// once for the next job, not when the backend would have finished.
#[test]
fn a_timed_out_run_is_stopped_and_its_worker_freed() {
    let r = rig(1);
    let slow = r.model("slow", &gated(4), ModelConfig { timeout_ms: 100, ..config(0, 1) });
    let fast = r.model("fast", &Spec::scaled(4, 3.0), config(0, 1));
    r.fake.gate.close();
    let stuck = r.submit("slow", slow, "[[1, 1, 1, 1]]");
    assert_eq!(output(&stuck).unwrap_err().errno, libc::ETIMEDOUT);
    // The gate is still closed: only a stopped run frees the one worker.
    let next = r.submit("fast", fast, "[[1, 1, 1, 1]]");
    assert_eq!(output(&next).unwrap(), "[[3.0,3.0,3.0,3.0]]\n");
    assert_eq!(r.fake.counters.stopped.load(Ordering::SeqCst), 1);
    r.fake.gate.open();
}

#[test]
fn an_output_past_the_limit_fails_with_efbig_and_is_not_kept() {
    let limited = EngineConfig { workers: 1, max_output_bytes: 64, ..Default::default() };
    let r = rig_with(tempfile::tempdir().unwrap(), limited);
    let v = r.model("m", &Spec::scaled(4, 1.0), config(0, 8));
    // 4 floats: 16 bytes as the model returns them, 25 as JSON.
    assert_eq!(output(&r.submit("m", v, "[[1, 2, 3, 4]]")).unwrap(), "[[1.0,2.0,3.0,4.0]]\n");
    // 20 floats: 80 bytes.
    let failure = output(&r.submit("m", v, &format!("[{}]", ["[1, 2, 3, 4]"; 5].join(",")))).unwrap_err();
    assert_eq!(failure.errno, libc::EFBIG);
    assert!(failure.reason.contains("output larger than the limit of 64 bytes"), "{}", failure.reason);
}

/// One user's flood retires only that user's oldest results: each user
/// keeps `max_finished_jobs`.
#[test]
fn a_users_flood_retires_only_that_users_results() {
    let limits = EngineConfig { workers: 1, max_finished_jobs: 3, ..Default::default() };
    let r = rig_with(tempfile::tempdir().unwrap(), limits);
    let v = r.model("m", &Spec::scaled(4, 2.0), config(0, 1));
    let mine = r.submit_as(2, "m", v, "[[1, 1, 1, 1]]").unwrap();
    output(&mine).unwrap();
    let flood: Vec<Arc<Job>> = (0..10).map(|_| r.submit_as(1, "m", v, "[[3, 3, 3, 3]]").unwrap()).collect();
    flood.iter().for_each(|j| drop(output(j)));
    // (A job's readers are answered just before it is retired.)
    wait_until("user 1's oldest are retired", || r.engine.job(flood[6].id).is_none());
    let kept: Vec<bool> = flood.iter().map(|j| r.engine.job(j.id).is_some()).collect();
    assert_eq!(kept, [false, false, false, false, false, false, false, true, true, true]);
    let still = r.engine.job(mine.id).expect("user 2's unread answer stays");
    assert_eq!(output(&still).unwrap(), "[[2.0,2.0,2.0,2.0]]\n");
}

/// Past `max_user_bytes` of requests and answers held, a user's requests
/// fail with EDQUOT; another user's do not.
#[test]
fn a_user_past_their_bytes_is_refused_alone() {
    let limits = EngineConfig { workers: 1, max_user_bytes: 200, ..Default::default() };
    let r = rig_with(tempfile::tempdir().unwrap(), limits);
    let v = r.model("m", &Spec::scaled(4, 2.0), config(0, 1));
    // 14 bytes in, 20 out, kept: 200 bytes last six requests (seven when
    // a request comes before the previous answer is counted).
    let mut accepted = 0;
    let refused = loop {
        match r.submit_as(1, "m", v, "[[3, 3, 3, 3]]") {
            Ok(job) => drop(output(&job).unwrap()),
            Err(e) => break e,
        }
        accepted += 1;
        assert!(accepted < 100, "never refused");
    };
    assert!((6..=7).contains(&accepted), "{accepted}");
    assert_eq!(refused.errno(), libc::EDQUOT);
    assert!(refused.to_string().contains("uid 1's jobs hold 2"), "{refused}");
    output(&r.submit_as(2, "m", v, "[[1, 1, 1, 1]]").unwrap()).unwrap();
}

/// A second submit of a job already submitted (two writers of one
/// `jobs/<id>/input`) fails alone: the job runs, and what its user holds
/// is its input and output once, not more.
#[test]
fn a_second_submit_fails_alone_and_charges_nothing() {
    let r = rig(1);
    let v = r.model("m", &Spec::scaled(4, 2.0), config(0, 1));
    let job = r.engine.create_job(7, 7, "m", v).unwrap();
    r.engine.submit(&job, b"[[1, 1, 1, 1]]".to_vec()).unwrap();
    let again = r.engine.submit(&job, b"[[9, 9, 9, 9]]".to_vec()).unwrap_err();
    assert_eq!(again.errno(), libc::EBUSY);
    let answer = output(&job).unwrap();
    assert_eq!(answer, "[[2.0,2.0,2.0,2.0]]\n");
    wait_until("the job is counted", || r.engine.shared.registry.lock().unwrap().finished_count(7) == 1);
    assert_eq!(r.engine.shared.registry.lock().unwrap().held(7), 14 + answer.len());
}

/// A backend that panics fails the jobs of that run with EIO; the worker,
/// its slot and the version's instance are given back, so the next jobs
/// run.
#[test]
fn a_panicking_backend_fails_its_run_and_nothing_more() {
    let r = rig(1);
    let bad = r.model("bad", &Spec { panics: true, ..Spec::scaled(4, 1.0) }, config(1, 1));
    let good = r.model("good", &Spec::scaled(4, 2.0), config(1, 1));
    for _ in 0..2 {
        let failure = output(&r.submit("bad", bad, "[[1, 1, 1, 1]]")).unwrap_err();
        assert_eq!(failure.errno, libc::EIO);
        assert!(failure.reason.contains("the run panicked"), "{}", failure.reason);
    }
    assert_eq!(output(&r.submit("good", good, "[[1, 1, 1, 1]]")).unwrap(), "[[2.0,2.0,2.0,2.0]]\n");
}

fn generator(tokens: usize, run_ms: u64) -> Spec {
    Spec { generates: Some(tokens), run_ms, ..Spec::scaled(1, 1.0) }
}

fn answer(tokens: usize) -> String {
    (0..tokens).map(|i| format!("t{i} ")).collect::<String>() + "\n"
}

/// What the scheduler and the model's pool hold for generations.
fn generation_counters(r: &Rig) -> (usize, usize, usize, u64) {
    let s = r.engine.shared.sched.lock().unwrap();
    let queued: usize = s.queued_per_model.values().flat_map(|users| users.values()).sum();
    let pools: u64 =
        s.devices[0].resident.values().map(|res| res.held_bytes() - res.bytes.max(res.pool.measured())).sum();
    (s.devices[0].entries.len() + s.parked.len(), queued, s.in_flight.len(), pools)
}

#[test]
fn generations_take_turns_token_by_token_and_stream() {
    // One worker: two generations can only both progress by taking turns.
    let r = rig(1);
    let v = r.model("lm", &generator(30, 5), ModelConfig::default());
    let a = r.submit("lm", v, "first");
    let b = r.submit("lm", v, "second");
    let tokens = |j: &Job| j.snapshot().generation.map_or(0, |g| g.tokens);
    wait_until("the second has a token", || tokens(&b) >= 1);
    assert!(!a.status().is_finished(), "the second waited for the first's whole answer");
    // A reader gets the answer so far before the end.
    let (tx, rx) = std::sync::mpsc::channel();
    a.when_output(0, move |out| tx.send(matches!(out, Output::More(_))).unwrap());
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), "a streamed chunk, not the end");
    assert_eq!(output(&a).unwrap(), answer(30));
    assert_eq!(output(&b).unwrap(), answer(30));
    let progress = b.snapshot().generation.unwrap();
    assert_eq!((progress.tokens, progress.max_tokens), (30, 256));
    wait_until("nothing is left queued", || generation_counters(&r) == (0, 0, 0, 0));
}

#[test]
fn cancelled_and_parked_generations_leave_nothing_behind() {
    let r = rig(1);
    let v = r.model("lm", &generator(1000, 2), ModelConfig::default());
    let jobs: Vec<_> = (0..3).map(|i| r.submit("lm", v, &format!("p{i}"))).collect();
    let tokens = |j: &Job| j.snapshot().generation.map_or(0, |g| g.tokens);
    wait_until("all three generate", || jobs.iter().all(|j| tokens(j) >= 2));
    for job in &jobs {
        r.engine.cancel(job).unwrap();
        assert_eq!(output(job).unwrap_err().errno, libc::ECANCELED);
    }
    wait_until("nothing is left queued, parked or charged", || generation_counters(&r) == (0, 0, 0, 0));
    // A new generation runs as usual.
    let job = r.submit("lm", v, r#"{"prompt": "x", "max_tokens": 3}"#);
    let last = r#"{"completion_tokens":3,"finish_reason":"length","prompt_tokens":1}"#;
    assert!(output(&job).unwrap().ends_with(&format!("{last}\n")));
}

#[test]
fn parked_generations_do_not_count_against_max_queue() {
    let r = rig(1);
    let v = r.model("lm", &generator(200, 2), ModelConfig { max_queue: 1, max_tokens: 2, ..Default::default() });
    let a = r.submit("lm", v, r#"{"prompt": "a", "max_tokens": 200}"#);
    let tokens = |j: &Job| j.snapshot().generation.map_or(0, |g| g.tokens);
    wait_until("it generates", || tokens(&a) >= 1);
    // A second generation: from its first token on, the two take turns,
    // one of them parked (queued again) while the other runs.
    let b = r.submit("lm", v, r#"{"prompt": "b", "max_tokens": 50}"#);
    wait_until("both generate", || tokens(&b) >= 1);
    assert!(tokens(&a) < 200 && tokens(&b) < 50, "the test needs both still generating");
    // Yet the queue of one still has room: a parked turn is not a request waiting.
    let c = r.submit_as(0, "lm", v, "c").expect("a parked generation took the queue's room");
    assert!(output(&c).unwrap().starts_with("t0 t1 "));
    assert!(output(&b).unwrap().contains("\"completion_tokens\":50"));
    r.engine.cancel(&a).unwrap();
}

#[test]
fn timeout_bounds_the_wait_for_the_first_token_not_the_answer() {
    let r = rig(1);
    let v = r.model("lm", &generator(40, 10), ModelConfig { timeout_ms: 100, ..Default::default() });
    let job = r.submit("lm", v, "a");
    assert_eq!(output(&job).unwrap(), answer(40));
    assert!(job.snapshot().compute_us.unwrap() > 300_000);
}

#[test]
fn the_rate_counts_the_step_that_ends_the_turn() {
    // Three tokens, then the end of the turn: four steps of 50 ms, three
    // intervals after the first. Sleeps only ever run long, so the rate
    // is at most 3 / 0.15 s = 20/s; not counting the last step would make
    // it at most 2 / 0.15 s = 13.3/s. Above that, the sleeps may run 74 ms
    // long in all.
    let r = rig(1);
    let v = r.model("lm", &generator(3, 50), ModelConfig::default());
    let job = r.submit("lm", v, "a");
    assert_eq!(output(&job).unwrap(), answer(3));
    let progress = job.snapshot().generation.unwrap();
    assert_eq!(progress.tokens, 3, "the end of the turn is not a token of the answer");
    assert!((13.4..=20.0).contains(&progress.tokens_per_s), "{progress:?}");
}
