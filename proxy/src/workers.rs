//! The request-serving threads: one single-threaded tokio runtime per worker, a worker per core (the model nginx
//! uses with a process per core). Connections are accepted on the main runtime and handed to a worker round-robin;
//! everything a connection does after that (TLS, HTTP, the decision, its upstream connection, upgrades) stays on
//! that worker's thread, so a request never pays for cross-thread wake-ups or work stealing. On the benchmark's one
//! pinned core this doubled throughput over a multi-threaded runtime (docs/benchmarks/README.md).

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

pub struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
    /// Dropping these ends the workers' `block_on`, and each thread drops its runtime.
    _stop: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` worker threads (at least one).
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        for i in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(rt.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new().name(format!("portcullis-worker-{i}")).spawn(move || {
                let _ = rt.block_on(stopped);
            })?;
        }
        Ok(Self { handles, next: AtomicUsize::new(0), _stop: stops })
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The next worker, round-robin.
    pub fn pick(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Workers for `requested` (0 = one per CPU this process may use, cgroup quota included).
    pub fn default_count(requested: usize) -> usize {
        if requested > 0 { requested } else { std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) }
    }
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
            let name = w.pick().spawn(async { std::thread::current().name().map(str::to_owned) }).await.unwrap();
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
