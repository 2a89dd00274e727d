//! CPU time from /proc, which the benchmarks report beside wall time: on a shared machine the
//! wall time says more about the neighbours than the code. Included by path (`#[path]`) by the
//! benchmarks that use it.

use std::time::Duration;

/// CPU time (user + system) in a `/proc/.../stat` file (`/proc/self/stat` for the process,
/// `/proc/<pid>/stat` for another), in clock ticks of 10 ms: of the task itself, and of its
/// waited-for children. Zero when it cannot be read.
#[allow(dead_code, reason = "each benchmark uses its part")]
pub(crate) fn stat_cpu(stat_file: &str) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(stat_file).unwrap_or_default();
    // Fields after the command name (in parentheses, which may hold spaces): utime is the
    // 14th field of the line, stime the 15th, cutime and cstime the 16th and 17th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = |i: usize| Duration::from_millis(f.get(i).copied().unwrap_or(0) * 10);
    (ticks(11) + ticks(12), ticks(13) + ticks(14))
}

/// The task's own CPU time (see [`stat_cpu`]).
#[allow(dead_code, reason = "each benchmark uses its part")]
pub(crate) fn cpu_time(stat_file: &str) -> Duration {
    stat_cpu(stat_file).0
}
