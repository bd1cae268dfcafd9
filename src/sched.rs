//! Scheduling decisions as pure functions: which queued job runs next,
//! which jobs share its batch, which device a model goes to, and which
//! loaded models make room for another. No threads, no clocks, no I/O:
//! callers pass the time and the state, so every rule is unit-tested here
//! with made-up times. The engine holds the state and calls these under
//! its lock.
//!
//! Rules:
//! - **Order**: highest effective priority first; among equals, the
//!   user whose *turn* it is, then arrival.
//! - **Aging**: a queued job's effective priority grows by one per `aging`
//!   waited, up to the highest priority queued, so under a constant stream
//!   of higher-priority jobs a low-priority one still runs (after
//!   `aging * difference` at most).
//! - **Turns**: users take turns within a priority: the user whose last
//!   job started on the device longest ago (or who has none) goes first.
//!   One user's thousand queued jobs delay another user's job by at most
//!   one run per slot, and one user's jobs stay FIFO.
//! - **Batching**: jobs join the next job's batch if they have the same
//!   batch key (same version, same trailing dimensions and dtypes), in the
//!   order they would run, while their rows fit `max_batch`.
//! - **Placement**: `auto` takes the first GPU whose memory budget holds
//!   the model, else the CPU; a named device must exist.
//! - **Eviction**: least recently used first, never a model in use.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A queued job, as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Queued {
    pub id: u64,
    /// Whose job it is (the uid).
    pub user: u32,
    pub priority: i32,
    /// Arrival order (ties in effective priority run in this order).
    pub seq: u64,
    pub since: Instant,
    /// Jobs with equal keys can be stacked into one run; `None`: not batchable.
    pub batch_key: Option<u64>,
    /// Rows along the batch (first) dimension.
    pub rows: usize,
}

/// What a queue is ordered by besides its jobs: the time, the aging rate,
/// and when each user's last job started on the device.
pub struct Clock<'a> {
    pub now: Instant,
    pub aging: Duration,
    pub last_start: &'a HashMap<u32, Instant>,
}

impl Clock<'_> {
    /// The priority `q` runs at now: its own, plus one per `aging` waited,
    /// but never past `top` (the highest priority queued) by aging alone.
    pub fn effective_priority(&self, q: &Queued, top: i32) -> i64 {
        let waited = self.now.saturating_duration_since(q.since);
        let bonus = if self.aging.is_zero() { 0 } else { (waited.as_nanos() / self.aging.as_nanos()) as i64 };
        q.priority as i64 + bonus.min((top as i64 - q.priority as i64).max(0))
    }

    /// Sorts before (is smaller than) every job that runs after `q`: by
    /// effective priority, then turns (see the module header), then
    /// arrival.
    fn rank(&self, q: &Queued, top: i32) -> (Reverse<i64>, Option<Instant>, u64) {
        (Reverse(self.effective_priority(q, top)), self.last_start.get(&q.user).copied(), q.seq)
    }
}

fn top(queue: &[Queued]) -> i32 {
    queue.iter().map(|q| q.priority).max().unwrap_or(0)
}

/// The index of the job to run next, among those that `can_run` (a job
/// whose model has no free instance cannot, and keeps its place).
pub fn next(queue: &[Queued], clock: &Clock, can_run: impl Fn(usize) -> bool) -> Option<usize> {
    let top = top(queue);
    (0..queue.len()).filter(|&i| can_run(i)).min_by_key(|&i| clock.rank(&queue[i], top))
}

/// The jobs that run together with `queue[first]` (itself included, first),
/// in the order they would run, while the total rows fit `max_batch`.
pub fn batch(queue: &[Queued], first: usize, max_batch: usize, clock: &Clock) -> Vec<usize> {
    let lead = &queue[first];
    let Some(key) = lead.batch_key else { return vec![first] };
    let top = top(queue);
    let mut others: Vec<usize> = (0..queue.len()).filter(|&i| i != first && queue[i].batch_key == Some(key)).collect();
    others.sort_by_key(|&i| clock.rank(&queue[i], top));
    let mut members = vec![first];
    let mut rows = lead.rows;
    for i in others {
        if rows + queue[i].rows > max_batch {
            continue;
        }
        rows += queue[i].rows;
        members.push(i);
    }
    members
}

/// Rows of a set of queued jobs.
pub fn rows(queue: &[Queued], members: &[usize]) -> usize {
    members.iter().map(|&i| queue[i].rows).sum()
}

/// A device as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceView {
    pub id: String,
    pub is_gpu: bool,
    /// Bytes of models it may hold.
    pub memory_budget: u64,
}

/// Where a model of `bytes` runs: `choice` is `auto` or a device id.
pub fn place(choice: &str, bytes: u64, devices: &[DeviceView]) -> Result<usize, String> {
    if choice == "auto" {
        let gpu = devices.iter().position(|d| d.is_gpu && d.memory_budget >= bytes);
        let cpu = devices.iter().position(|d| !d.is_gpu);
        return gpu.or(cpu).ok_or_else(|| "no device can hold the model".to_string());
    }
    devices.iter().position(|d| d.id == choice).ok_or_else(|| {
        let ids: Vec<&str> = devices.iter().map(|d| d.id.as_str()).collect();
        format!("device {choice} is not present (devices: {})", ids.join(", "))
    })
}

/// A model loaded on a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resident<K> {
    pub key: K,
    pub bytes: u64,
    /// Requests running on it now.
    pub busy: usize,
    pub last_used: Instant,
}

/// Which loaded models to unload so that `need` more bytes fit `budget`:
/// least recently used first, never a busy one. May free less than needed
/// when busy models hold the rest.
pub fn evictions<K: Clone>(resident: &[Resident<K>], budget: u64, need: u64) -> Vec<K> {
    let mut used: u64 = resident.iter().map(|r| r.bytes).sum();
    let mut idle: Vec<&Resident<K>> = resident.iter().filter(|r| r.busy == 0).collect();
    idle.sort_by_key(|r| r.last_used);
    let mut out = Vec::new();
    for r in idle {
        if used + need <= budget {
            break;
        }
        used -= r.bytes;
        out.push(r.key.clone());
    }
    out
}

/// Loaded models idle for longer than their keep-alive.
pub fn expired<K: Clone>(resident: &[(Resident<K>, Duration)], now: Instant) -> Vec<K> {
    resident
        .iter()
        .filter(|(r, keep_alive)| r.busy == 0 && now.saturating_duration_since(r.last_used) >= *keep_alive)
        .map(|(r, _)| r.key.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn q(id: u64, priority: i32, since: Instant) -> Queued {
        Queued { id, user: 0, priority, seq: id, since, batch_key: Some(7), rows: 1 }
    }

    /// No user has run anything yet.
    fn at(now: Instant, aging: Duration) -> Clock<'static> {
        static NONE: std::sync::OnceLock<HashMap<u32, Instant>> = std::sync::OnceLock::new();
        Clock { now, aging, last_start: NONE.get_or_init(HashMap::new) }
    }

    fn order(mut queue: Vec<Queued>, now: Instant, aging: Duration) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(i) = next(&queue, &at(now, aging), |_| true) {
            out.push(queue.remove(i).id);
        }
        out
    }

    #[test]
    fn higher_priority_first_then_fifo() {
        let t = Instant::now();
        let queue = vec![q(1, 0, t), q(2, 5, t), q(3, 0, t), q(4, 5, t), q(5, -1, t)];
        assert_eq!(order(queue, t, Duration::ZERO), [2, 4, 1, 3, 5]);
    }

    #[test]
    fn a_job_that_cannot_run_keeps_its_place_and_the_next_runs() {
        let t = Instant::now();
        let queue = vec![q(1, 0, t), q(2, 10, t), q(3, 5, t)];
        // Job 2's model has no free instance: the best of the rest runs.
        let blocked = |i: usize| queue[i].id != 2;
        let clock = at(t, Duration::ZERO);
        assert_eq!(queue[next(&queue, &clock, blocked).unwrap()].id, 3);
        // Once it can, it is first again.
        assert_eq!(queue[next(&queue, &clock, |_| true).unwrap()].id, 2);
        assert_eq!(next(&queue, &clock, |_| false), None);
    }

    /// User 1 queued 100 jobs; user 2 queues one after them. Each run
    /// starts the next turn: user 2's job runs second, not 101st; then user
    /// 1's keep their order.
    #[test]
    fn users_take_turns_within_a_priority() {
        let t0 = Instant::now();
        let aging = Duration::from_millis(100);
        let mut queue: Vec<Queued> = (1..=100).map(|i| q(i, 0, t0)).map(|j| Queued { user: 1, ..j }).collect();
        queue.push(Queued { user: 2, ..q(101, 0, t0 + Duration::from_millis(1)) });
        let mut last_start = HashMap::new();
        let mut ran = Vec::new();
        for ms in 2..=6u64 {
            let now = t0 + 10 * S + Duration::from_millis(ms);
            let i = next(&queue, &Clock { now, aging, last_start: &last_start }, |_| true).unwrap();
            let job = queue.remove(i);
            last_start.insert(job.user, now);
            ran.push(job.id);
        }
        assert_eq!(ran, [1, 101, 2, 3, 4]);
        // Aging does not lift one user's old jobs over another's at the
        // same priority: everything is at the top already.
        assert_eq!(at(t0 + 10 * S, aging).effective_priority(&queue[0], 0), 0);
    }

    #[test]
    fn aging_lets_a_low_priority_job_through() {
        let t0 = Instant::now();
        let aging = Duration::from_millis(100);
        // Job 1 (priority 0) has waited 1 s; newcomers have priority 10.
        let queue = vec![q(1, 0, t0), q(2, 10, t0 + S), q(3, 10, t0 + S)];
        assert_eq!(at(t0 + S, aging).effective_priority(&queue[0], 10), 10);
        assert_eq!(at(t0 + 2 * S, aging).effective_priority(&queue[0], 10), 10, "no higher than the top");
        // Tied at 10 with the newcomers, and older: it runs first.
        assert_eq!(order(queue.clone(), t0 + S, aging), [1, 2, 3]);
        // Without aging it would wait behind every newcomer.
        assert_eq!(order(queue, t0 + S, Duration::ZERO), [2, 3, 1]);
    }

    #[test]
    fn a_constant_stream_of_high_priority_jobs_does_not_starve_a_low_one() {
        let t0 = Instant::now();
        let aging = Duration::from_millis(10);
        let mut queue = vec![q(0, 0, t0)];
        let mut ran = Vec::new();
        // Each millisecond a priority-5 job arrives and one job runs.
        for ms in 1..=200u64 {
            let now = t0 + Duration::from_millis(ms);
            queue.push(Queued { seq: ms, ..q(ms, 5, now) });
            let i = next(&queue, &at(now, aging), |_| true).unwrap();
            ran.push(queue.remove(i).id);
        }
        let at = ran.iter().position(|&id| id == 0).expect("the low-priority job ran");
        assert!(at <= 51, "ran after {at} others");
    }

    #[test]
    fn batches_take_compatible_jobs_in_run_order_within_max_rows() {
        let t = Instant::now();
        let mut queue: Vec<Queued> = (1..=6).map(|i| q(i, 0, t)).collect();
        queue[1].batch_key = Some(8); // another version or shape
        queue[2].rows = 3;
        queue[4].priority = 9;
        let clock = at(t, Duration::ZERO);
        let first = next(&queue, &clock, |_| true).unwrap();
        assert_eq!(queue[first].id, 5);
        let members = batch(&queue, first, 4, &clock);
        let ids: Vec<u64> = members.iter().map(|&i| queue[i].id).collect();
        // 5, then 1; job 3's 3 rows would make 5 > 4, so it waits; 4 and 6 fit.
        assert_eq!(ids, [5, 1, 4, 6]);
        assert_eq!(rows(&queue, &members), 4);
    }

    #[test]
    fn unbatchable_jobs_run_alone() {
        let t = Instant::now();
        let queue = vec![Queued { batch_key: None, ..q(1, 0, t) }, Queued { batch_key: None, ..q(2, 0, t) }];
        assert_eq!(batch(&queue, 0, 8, &at(t, Duration::ZERO)), [0]);
    }

    #[test]
    fn placement() {
        let devices = vec![
            DeviceView { id: "cpu".into(), is_gpu: false, memory_budget: 1 << 40 },
            DeviceView { id: "gpu0".into(), is_gpu: true, memory_budget: 100 },
        ];
        assert_eq!(place("auto", 100, &devices), Ok(1));
        assert_eq!(place("auto", 101, &devices), Ok(0));
        assert_eq!(place("cpu", 1, &devices), Ok(0));
        assert_eq!(place("gpu1", 1, &devices), Err("device gpu1 is not present (devices: cpu, gpu0)".into()));
        assert_eq!(place("auto", 1, &devices[..1]), Ok(0));
    }

    #[test]
    fn eviction_is_lru_and_spares_busy_models() {
        let t = Instant::now();
        let r = |key: &'static str, busy, age: u64| Resident {
            key,
            bytes: 10,
            busy,
            last_used: t - Duration::from_secs(age),
        };
        let resident = vec![r("a", 0, 1), r("b", 1, 9), r("c", 0, 5), r("d", 0, 3)];
        // 40 used of 45: 10 more need 5 freed: the oldest idle one (c; b is busy).
        assert_eq!(evictions(&resident, 45, 10), ["c"]);
        assert_eq!(evictions(&resident, 30, 10), ["c", "d"]);
        assert_eq!(evictions(&resident, 100, 10), Vec::<&str>::new());
        // Only busy b would be left to evict: stop short.
        assert_eq!(evictions(&resident, 5, 10), ["c", "d", "a"]);
    }

    #[test]
    fn keep_alive_expiry() {
        let t = Instant::now();
        let r = |key: &'static str, busy, age: u64| Resident {
            key,
            bytes: 1,
            busy,
            last_used: t - Duration::from_secs(age),
        };
        let resident = vec![(r("old", 0, 10), S * 5), (r("busy", 1, 10), S * 5), (r("fresh", 0, 1), S * 5)];
        assert_eq!(expired(&resident, t), ["old"]);
    }
}
