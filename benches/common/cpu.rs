//! CPU time from /proc, which the benchmarks report beside wall time: on a shared machine the
//! wall time says more about the neighbours than the code. Included by path (`#[path]`) by the
//! benchmarks that use it.

use std::time::Duration;

/// CPU time (user + system) in a `/proc/.../stat` file (`/proc/self/stat` for the process,
/// `/proc/thread-self/stat` for the calling thread), in clock ticks of 10 ms.
pub(crate) fn cpu_time(stat_file: &str) -> Duration {
    let stat = std::fs::read_to_string(stat_file).unwrap_or_default();
    // Fields after the command name (in parentheses, which may hold spaces): utime is the
    // 14th field of the line, stime the 15th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10)
}
