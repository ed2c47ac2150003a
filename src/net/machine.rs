//! What the machine has to spare, read from the system: the wire's compression asks it through
//! each connection's `codec::Pace`, so the wire itself reads no machine state.

use std::time::Instant;

use crate::wire::codec::IDLE_FOR_STRONG;

/// Whether the machine's cores are idle enough for the stronger compression levels.
pub fn cores_to_spare() -> bool {
    idle_share() >= IDLE_FOR_STRONG
}

/// The machine's idle share of CPU time lately (from `/proc/stat`, sampled at most every 250
/// ms; 1 where it cannot be read).
fn idle_share() -> f64 {
    static LAST: std::sync::Mutex<Option<Sample>> = std::sync::Mutex::new(None);
    let read = || -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal: idle and iowait are idle.
        let idle = cpu.get(3)? + cpu.get(4).copied().unwrap_or(0);
        Some((cpu.iter().take(8).sum(), idle))
    };
    // Held for one read of a small file, at most every 250 ms.
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    match *last {
        Some(Sample { at, share, .. }) if at.elapsed() < std::time::Duration::from_millis(250) => {
            share
        }
        prev => {
            let Some((total, idle)) = read() else {
                return 1.0;
            };
            let share = match prev {
                Some(p) if total > p.total => {
                    (idle - p.idle.min(idle)) as f64 / (total - p.total) as f64
                }
                _ => 1.0,
            };
            let at = Instant::now();
            *last = Some(Sample {
                at,
                total,
                idle,
                share,
            });
            share
        }
    }
}

/// One look at `/proc/stat`: when, the CPU time in all and idle so far, and the idle share since
/// the look before.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    total: u64,
    idle: u64,
    share: f64,
}
