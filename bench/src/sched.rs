//! Where a phase's CPU time went, read from `/proc` before and after it: per thread of a process
//! (`/proc/PID/task/*/schedstat`: nanoseconds run, nanoseconds spent runnable but waiting for a CPU, time slices)
//! and per CPU (`/proc/stat`: user, system, softirq, idle). Waiting time is what a latency-sensitive thread loses to
//! whatever else runs on its core, so it tells a slow proxy from a crowded core.

use serde_json::{Value, json};
use std::collections::BTreeMap;

/// Run, wait (ns) and slices of the threads of one process, summed by thread name (`comm`, 15 characters).
#[derive(Default, Clone)]
pub struct Threads(BTreeMap<String, [u64; 3]>);

impl Threads {
    pub fn read(pid: u32) -> Self {
        let mut out = BTreeMap::<String, [u64; 3]>::new();
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Self(out) };
        for task in dir.flatten() {
            let p = task.path();
            let (Ok(comm), Ok(stat)) =
                (std::fs::read_to_string(p.join("comm")), std::fs::read_to_string(p.join("schedstat")))
            else {
                continue;
            };
            let v: Vec<u64> = stat.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            if v.len() < 3 {
                continue;
            }
            let e = out.entry(comm.trim().to_string()).or_default();
            for i in 0..3 {
                e[i] += v[i];
            }
        }
        Self(out)
    }

    /// `{name: {run_ms, wait_ms, slices}}` of what happened between `before` and `self` (threads that ended in
    /// between are missing from `self` and left out).
    pub fn since(&self, before: &Self) -> Value {
        let mut m = serde_json::Map::new();
        for (name, now) in &self.0 {
            let then = before.0.get(name).copied().unwrap_or_default();
            let d = |i: usize| now[i].saturating_sub(then[i]);
            m.insert(name.clone(), json!({"run_ms": ms(d(0)), "wait_ms": ms(d(1)), "slices": d(2)}));
        }
        Value::Object(m)
    }
}

/// `/proc/stat` jiffies of one CPU: user + nice, system, irq + softirq, idle + iowait.
#[derive(Default, Clone, Copy)]
pub struct Cpu([u64; 4]);

impl Cpu {
    pub fn read(cpu: &str) -> Self {
        let name = format!("cpu{cpu} ");
        let Ok(text) = std::fs::read_to_string("/proc/stat") else { return Self::default() };
        let Some(line) = text.lines().find(|l| l.starts_with(&name)) else { return Self::default() };
        let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        let g = |i: usize| f.get(i).copied().unwrap_or(0);
        // user nice system idle iowait irq softirq
        Self([g(0) + g(1), g(2), g(5) + g(6), g(3) + g(4)])
    }

    /// `{user_ms, system_ms, irq_ms, idle_ms}` between `before` and `self` (USER_HZ is 100 on Linux).
    pub fn since(&self, before: &Self) -> Value {
        let d = |i: usize| (self.0[i].saturating_sub(before.0[i])) * 10;
        json!({"user_ms": d(0), "system_ms": d(1), "irq_ms": d(2), "idle_ms": d(3)})
    }
}

fn ms(ns: u64) -> f64 {
    (ns as f64 / 1e4).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_run_and_its_cpu_has_counted() {
        let before = Threads::read(std::process::id());
        let t0 = Cpu::read("0");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let after = Threads::read(std::process::id());
        let d = after.since(&before);
        let run: f64 = d.as_object().unwrap().values().map(|v| v["run_ms"].as_f64().unwrap()).sum();
        assert!(run > 0.0, "{d}");
        let c = Cpu::read("0").since(&t0);
        assert!(c["user_ms"].as_u64().is_some(), "{c}");
    }
}
