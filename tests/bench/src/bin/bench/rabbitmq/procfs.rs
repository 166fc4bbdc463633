//! CPU time and memory of processes, read from /proc (Linux).

/// CPU time (user + system) of the broker's Erlang VM, from `/proc/<pid>/stat` (clock
/// ticks of 10 ms: runs of a few seconds are accurate to ~1%).
pub(super) struct CpuClock {
    broker: f64,
    broker_pid: Option<String>,
}

impl CpuClock {
    pub(super) fn start() -> Self {
        let broker_pid = std::fs::read_dir("/proc").ok().and_then(|dir| {
            dir.flatten().find_map(|e| {
                let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
                (comm.trim() == "beam.smp").then(|| e.file_name().to_string_lossy().into_owned())
            })
        });
        Self {
            broker: broker_pid.as_deref().map_or(0.0, cpu_seconds),
            broker_pid,
        }
    }

    /// The broker's CPU seconds since `start`.
    pub(super) fn broker_seconds(&self) -> f64 {
        self.broker_pid
            .as_deref()
            .map_or(0.0, |p| cpu_seconds(p) - self.broker)
    }
}

/// utime + stime of `/proc/<pid>`, in seconds (assuming 100 ticks a second, Linux's USER_HZ).
pub(super) fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// This process's peak resident set since the last [`reset_peak_rss`], in MB.
pub(super) fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resets the peak resident set (Linux: writing 5 to clear_refs).
pub(super) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
