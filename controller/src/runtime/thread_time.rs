//! Where a stretch of synchronous work on the current thread spent its wall time: on a CPU, waiting for one (the
//! run queue), or neither (blocked: a lock, a page fault served from disk). Read from `/proc/thread-self/schedstat`
//! (nanoseconds, kept by the scheduler); used to tell a slow computation from a starved one in the phase log of a
//! table reconcile.

use std::time::{Duration, Instant};

/// The scheduler's counters of the calling thread at one moment, with the wall clock.
#[derive(Clone, Copy, Debug)]
pub struct Mark {
    at: Instant,
    /// (on a CPU, runnable but waiting), both since the thread started; `None` where the kernel keeps no schedstat.
    sched: Option<(u64, u64)>,
}

/// A stretch of work between two [`Mark`]s of the same thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spent {
    pub wall: Duration,
    pub on_cpu: Option<Duration>,
    pub waiting_for_cpu: Option<Duration>,
}

impl Mark {
    pub fn now() -> Self {
        Self::start(true)
    }

    /// `sched = false`: the wall clock only (no file read), for when nobody will look at the split.
    pub fn start(sched: bool) -> Self {
        let sched = if sched { read_schedstat() } else { None };
        Self { at: Instant::now(), sched }
    }

    /// What the calling thread spent since `self` (which must have been taken on the same thread).
    pub fn spent(&self) -> Spent {
        let now = Self::start(self.sched.is_some());
        let (on_cpu, waiting_for_cpu) = match (self.sched, now.sched) {
            (Some((c0, w0)), Some((c1, w1))) => {
                (Some(Duration::from_nanos(c1.saturating_sub(c0))), Some(Duration::from_nanos(w1.saturating_sub(w0))))
            }
            _ => (None, None),
        };
        Spent { wall: now.at.duration_since(self.at), on_cpu, waiting_for_cpu }
    }
}

fn read_schedstat() -> Option<(u64, u64)> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok().and_then(|s| parse(&s))
}

/// `schedstat`'s first two fields: nanoseconds on a CPU, nanoseconds runnable on a run queue.
fn parse(s: &str) -> Option<(u64, u64)> {
    let mut f = s.split_ascii_whitespace().map(str::parse::<u64>);
    Some((f.next()?.ok()?, f.next()?.ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_fields() {
        assert_eq!(parse("962708 1500 12\n"), Some((962_708, 1500)));
        assert_eq!(parse("962708\n"), None);
        assert_eq!(parse("x 1 2"), None);
        assert_eq!(parse(""), None);
    }

    #[test]
    fn a_wall_clock_mark_reads_no_schedstat() {
        let spent = Mark::start(false).spent();
        assert_eq!((spent.on_cpu, spent.waiting_for_cpu), (None, None));
    }

    #[test]
    fn work_on_this_thread_is_counted_on_its_cpu() {
        let mark = Mark::now();
        // Busy for a while (no sleep: the point is CPU time).
        let started = Instant::now();
        let mut x = 0u64;
        while started.elapsed() < Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let spent = mark.spent();
        assert!(spent.wall >= Duration::from_millis(30));
        if let (Some(cpu), Some(wait)) = (spent.on_cpu, spent.waiting_for_cpu) {
            // Everything the thread did was computing or waiting for a CPU; nothing else can exceed the wall time.
            assert!(cpu > Duration::ZERO, "{spent:?}");
            assert!(cpu + wait <= spent.wall + Duration::from_millis(5), "{spent:?}");
        }
    }
}
