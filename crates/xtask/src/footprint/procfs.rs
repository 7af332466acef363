//! What the kernel says about a running process: CPU time from
//! `/proc/<pid>/stat`, resident memory from `/proc/<pid>/status`.

use std::time::Duration;

use super::error::FootprintError;

/// A process's resources at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sample {
    /// utime + stime since exec, in clock ticks.
    pub(crate) cpu_ticks: u64,
    /// VmRSS: resident now.
    pub(crate) rss_kib: u64,
    /// VmHWM: the most that was ever resident.
    pub(crate) hwm_kib: u64,
}

/// Reads `pid`'s sample; `what` names the process in errors.
pub(crate) fn sample(pid: u32, what: &'static str) -> Result<Sample, FootprintError> {
    let read = |file: &'static str| {
        let path = format!("/proc/{pid}/{file}");
        std::fs::read_to_string(&path).map_err(|source| FootprintError::Proc {
            what,
            pid,
            path: path.clone(),
            source,
        })
    };
    let bad = |file: &'static str, field: &'static str| FootprintError::ProcField {
        what,
        pid,
        path: format!("/proc/{pid}/{file}"),
        field,
    };
    let stat = read("stat")?;
    let status = read("status")?;
    Ok(Sample {
        cpu_ticks: cpu_ticks(&stat).ok_or_else(|| bad("stat", "utime/stime"))?,
        rss_kib: status_kib(&status, "VmRSS").ok_or_else(|| bad("status", "VmRSS"))?,
        hwm_kib: status_kib(&status, "VmHWM").ok_or_else(|| bad("status", "VmHWM"))?,
    })
}

/// utime + stime (fields 14 and 15 of `/proc/<pid>/stat`), in clock ticks.
fn cpu_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may itself contain
    // spaces and parentheses: the fields after the last `)` start at 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// A `Key:   1234 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.trim().strip_suffix("kB")?.trim_end().parse().ok()
    })
}

/// The kernel's clock tick (`sysconf(_SC_CLK_TCK)`), in which
/// `/proc/<pid>/stat` counts CPU time.
pub(crate) fn tick() -> Duration {
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_secs(1) / u32::try_from(per_second).unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shapes as Linux 6.x prints them (the name of the second one is what
    // a hostile process could call itself).
    const STAT: &str = "4242 (peaqos-agent) S 1 4242 4242 0 -1 4194560 312 0 0 0 \
        7 3 0 0 20 0 1 0 123456 9437184 1267 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
    const STAT_ODD_NAME: &str = "77 (a) b) 1 2) R 1 77 77 0 -1 0 0 0 0 0 \
        120 45 0 0 20 0 1 0 5 1 1 1";

    #[test]
    fn cpu_time_is_utime_plus_stime() {
        assert_eq!(cpu_ticks(STAT), Some(10));
        assert_eq!(cpu_ticks(STAT_ODD_NAME), Some(165));
        assert_eq!(cpu_ticks("4242 (peaqos-agent) S 1 2 3"), None, "truncated");
        assert_eq!(cpu_ticks("no parentheses at all"), None);
    }

    #[test]
    fn memory_lines_are_read_in_kib() {
        let status = "Name:\tpeaqos-agent\nVmPeak:\t   14952 kB\nVmHWM:\t    5068 kB\n\
                      VmRSS:\t    4972 kB\nVmRSSx:\t 1 kB\nThreads:\t1\n";
        assert_eq!(status_kib(status, "VmRSS"), Some(4972));
        assert_eq!(status_kib(status, "VmHWM"), Some(5068));
        assert_eq!(status_kib(status, "VmSwap"), None);
        assert_eq!(status_kib("VmRSS:\t lots kB\n", "VmRSS"), None);
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn our_own_process_can_be_sampled() {
        let me = sample(std::process::id(), "xtask test").unwrap();
        assert!(me.rss_kib > 0 && me.hwm_kib >= me.rss_kib, "{me:?}");
        assert!(tick() > Duration::ZERO && tick() <= Duration::from_secs(1));
    }
}
