//! The request-serving threads: one single-threaded tokio runtime per worker, a worker per core (the model nginx
//! uses with a process per core). Connections are accepted on the main runtime and handed to a worker round-robin;
//! everything a connection does after that (TLS, HTTP, the decision, its upstream connection, upgrades) stays on
//! that worker's thread, so a request never pays for cross-thread wake-ups or work stealing. On the benchmark's one
//! pinned core this doubled throughput over a multi-threaded runtime (docs/benchmarks/README.md).
//!
//! Each worker has a companion *probation* thread, also a single-threaded runtime, where a new connection lives until
//! it has shown it is a client: the PROXY header, the TLS handshake, and the whole first request head (HTTP/1.1) or the
//! HTTP/2 preface. Only then is its socket moved to the worker ([`crate::server`]). A flood of connections that never
//! complete a head (slowloris) is thousands of tiny reads; on the worker they would queue in front of established
//! clients' requests (every event of one poll is run before the next), on the probation thread the kernel schedules
//! them beside the worker instead, and at a lower priority (`nice` +[`PROBATION_NICE`]) so a worker woken by a
//! request preempts it.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// How much lower the probation threads' scheduling priority is than the workers' (a `nice` increment; +5 gives a
/// thread about a third of a worker's CPU share when both are busy, so new connections still progress under load).
pub const PROBATION_NICE: i32 = 5;

/// The pair of threads a connection is assigned to.
#[derive(Clone, Copy)]
pub struct Worker<'a> {
    /// Where the connection is served once it has sent a complete request head.
    pub serve: &'a Handle,
    /// Where it waits for that head (and does its TLS handshake).
    pub probation: &'a Handle,
}

pub struct Workers {
    handles: Vec<Handle>,
    probation: Vec<Handle>,
    next: AtomicUsize,
    /// Dropping these ends the workers' `block_on`, and each thread drops its runtime.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` worker threads (at least one), each with its probation thread.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        let mut probation = Vec::new();
        let mut stops = Vec::new();
        for i in 0..n.max(1) {
            handles.push(spawn_runtime(format!("portcullis-worker-{i}"), 0, &mut stops)?);
            probation.push(spawn_runtime(format!("portcullis-probation-{i}"), PROBATION_NICE, &mut stops)?);
        }
        Ok(Self { handles, probation, next: AtomicUsize::new(0), _stop: stops })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The next worker, round-robin.
    pub fn pick(&self) -> Worker<'_> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        Worker { serve: &self.handles[i], probation: &self.probation[i] }
    }

    /// Workers for `requested` (0 = one per CPU this process may use, cgroup quota included).
    pub fn default_count(requested: usize) -> usize {
        if requested > 0 { requested } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) }
    }
}

/// A thread running a single-threaded runtime until `stops` is dropped; `nice`: its scheduling priority increment.
fn spawn_runtime(name: String, nice: i32, stops: &mut Vec<oneshot::Sender<()>>) -> std::io::Result<Handle> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = rt.handle().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    stops.push(stop);
    std::thread::Builder::new().name(name).spawn(move || {
        if nice != 0 {
            lower_priority(nice);
        }
        let _ = rt.block_on(stopped);
    })?;
    Ok(handle)
}

/// Lowers the calling thread's priority by `nice` (Linux: a thread is a schedulable entity of its own, and
/// `setpriority(PRIO_PROCESS, tid)` applies to that thread only). Best effort: a refusal leaves the priority as is.
#[allow(unsafe_code)]
fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread's id; no memory is passed.
        let r = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, current + nice)
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "lowering the probation thread's priority failed");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_the_workers_round_robin() {
        let w = Workers::start(2).unwrap();
        assert_eq!(w.len(), 2);
        let mut names = Vec::new();
        for _ in 0..4 {
            let name = w.pick().serve.spawn(async { std::thread::current().name().map(str::to_owned) }).await.unwrap();
            names.push(name.unwrap());
        }
        assert_eq!(names, ["portcullis-worker-0", "portcullis-worker-1", "portcullis-worker-0", "portcullis-worker-1"]);
    }

    #[test]
    fn zero_means_one_per_cpu() {
        assert_eq!(Workers::default_count(3), 3);
        assert!(Workers::default_count(0) >= 1);
    }
}
