//! Compression of file bytes on the wire (`qnode/2`): one zstd frame per chunk reply or upload
//! block, decoded under a cap. Part of the protocol layer: bytes in, bytes out, no files, no
//! sockets.
//!
//! - A sender compresses only when it pays: the frame must be at most [`WORTH`] of the plain
//!   bytes (random or already-compressed data goes plain, after one try), and in `auto` mode only
//!   while compressing a chunk takes well under the time its frame takes on the wire
//!   ([`Mode::level`]): on loopback or a fast LAN the compressor would be the bottleneck, so bytes
//!   go plain there. A connection's [`Pace`] measures the wire bytes it gets through per second
//!   and how much its frames shrink; it starts plain and measures. The slower the link, the
//!   higher the level that still fits ([`LEVELS`]).
//! - A receiver knows how many plain bytes to expect (a chunk's length, a block's announced
//!   length, both capped) and decompresses into exactly that much room: a frame that would
//!   produce more (a decompression bomb) or less is an error, and nothing beyond the expected
//!   length is ever allocated. Hashes and verification stay over the plain bytes.
//! - Each chunk is one frame (a chunk is compressed alone, so a chunk can come from any peer):
//!   levels 5 and 3 are used (their ratios and speeds on text: docs/performance.md); their
//!   speeds are measured in CPU time (what a core can do, however busy the machine).
//!   At most one compression context per core exists (a piece waits for a free one);
//!   decompression contexts, small, are kept per thread.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The levels a sender chooses from, the strongest first.
pub const LEVELS: [i32; 2] = [5, 3];
/// The level `always` uses whatever the link.
pub const ALWAYS_LEVEL: i32 = 3;
/// In `auto`, the share of the machine's cores compression may count on (at least one core): a
/// sender compresses the replies in flight side by side, on its blocking pool.
pub const CPU_SHARE: f64 = 0.75;
/// The share of the machine's CPU time that must be idle for levels above [`ALWAYS_LEVEL`].
pub const IDLE_FOR_STRONG: f64 = 0.10;

/// The cores this process may use, read once: `available_parallelism` reads cgroup files on each
/// call, too slow to ask at every reply.
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A frame is sent only if it is at most this share of the plain bytes (7/8).
pub const WORTH: (usize, usize) = (7, 8);
/// Largest plain block of an upload body, in bytes.
pub const MAX_BLOCK: u32 = 1 << 20;
/// Largest window a frame may ask for (2^27 = 128 MiB covers the largest chunk, 64 MiB).
const MAX_WINDOW_LOG: u32 = 27;

/// When a sender compresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// When the link is slower than the compressor and the bytes shrink.
    #[default]
    Auto,
    /// Whenever the bytes shrink.
    Always,
    /// Never.
    Never,
}

impl Mode {
    /// The level to compress the next piece at, if any, for a connection whose [`Pace`] is
    /// `pace`. In `auto`: the strongest of [`LEVELS`] at which [`CPU_SHARE`] of the cores turn
    /// out plain bytes faster than the link takes their frames (`speed × cores × share > wire
    /// rate / ratio`); none before the pace is measured, and none on a link faster than that. Levels
    /// above [`ALWAYS_LEVEL`] only while the machine's cores are [`IDLE_FOR_STRONG`] idle: a
    /// seeder sharing its machine (or serving many peers) keeps to the lighter level.
    pub fn level(self, pace: &Pace) -> Option<i32> {
        // The stronger levels only while the machine has cores to spare (the connection's
        // probe, from whoever made it: the wire reads no machine state).
        self.level_given(pace, pace.spare)
    }

    /// [`Mode::level`], with whether the machine has cores to spare for the stronger levels
    /// asked of `spare` (only when it matters).
    fn level_given(self, pace: &Pace, spare: impl Fn() -> bool) -> Option<i32> {
        match self {
            Self::Never => None,
            Self::Always => Some(ALWAYS_LEVEL),
            Self::Auto => {
                let (wire, ratio) = pace.rates()?;
                let share = (cores() as f64 * CPU_SHARE).max(1.0);
                let spare = spare();
                LEVELS
                    .into_iter()
                    .filter(|&l| spare || l == ALWAYS_LEVEL)
                    .find(|&l| wire / ratio < share * speed(l))
            }
        }
    }
}

impl Mode {
    /// The level for the pieces of an edit (the ranges an update fetches, the leaves a replace
    /// sends): as [`Mode::level`], but in `auto` [`ALWAYS_LEVEL`] before the pace is measured.
    /// An edit's pieces are few and over before a pace is measured (it takes [`PACE_SAMPLE`]),
    /// and a few frames cost little CPU whatever the link; a large edit is measured as it goes.
    pub fn edit_level(self, pace: &Pace) -> Option<i32> {
        match self {
            Self::Auto if pace.rates().is_none() => Some(ALWAYS_LEVEL),
            _ => self.level(pace),
        }
    }
}

/// How fast one connection goes: the bytes it puts on the wire per second (from its UDP
/// counter, sampled over at least [`PACE_SAMPLE`]), and the share of their plain bytes its
/// compressed frames took, each smoothed.
pub struct Pace {
    state: std::sync::Mutex<PaceState>,
    /// Whether the machine has cores to spare for levels above [`ALWAYS_LEVEL`] (at least
    /// [`IDLE_FOR_STRONG`] of its CPU time idle); asked only when it matters.
    spare: fn() -> bool,
}

impl std::fmt::Debug for Pace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pace").field("state", &self.state).finish()
    }
}

#[derive(Debug)]
struct PaceState {
    /// When `bytes` was the connection's wire total.
    since: Instant,
    bytes: u64,
    /// Wire bytes per second (0 until measured).
    wire: f64,
    /// Frames' wire bytes over their plain bytes.
    ratio: f64,
}

/// How long one sample of a [`Pace`] lasts.
pub const PACE_SAMPLE: std::time::Duration = std::time::Duration::from_millis(100);

/// What a frame is expected to take of its plain bytes before one was sent (text).
const FIRST_RATIO: f64 = 0.35;

impl Default for Pace {
    /// A pace whose machine always has cores to spare.
    fn default() -> Self {
        Self::with_spare(|| true)
    }
}

impl Pace {
    /// A pace that asks `spare` whether the machine has cores to spare for the stronger levels.
    pub fn with_spare(spare: fn() -> bool) -> Self {
        Self {
            state: std::sync::Mutex::new(PaceState {
                since: Instant::now(),
                bytes: 0,
                wire: 0.0,
                ratio: FIRST_RATIO,
            }),
            spare,
        }
    }
}

impl Pace {
    /// A piece of `plain` bytes went out as `wire` bytes (equal if it went plain).
    pub fn sent(&self, plain: u64, wire: u64) {
        // Held for a few arithmetic operations; a poisoned lock still holds numbers.
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if wire < plain && plain > 0 {
            p.ratio = 0.8 * p.ratio + 0.2 * (wire as f64 / plain as f64);
        }
    }

    /// The connection has put `total` bytes on the wire since it started (its UDP counter:
    /// what the link took, not what was handed to the connection's buffers).
    pub fn on_wire(&self, total: u64) {
        let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let dt = p.since.elapsed().as_secs_f64();
        if p.bytes == 0 || total < p.bytes {
            (p.since, p.bytes) = (Instant::now(), total);
        } else if dt >= PACE_SAMPLE.as_secs_f64() {
            let now = (total - p.bytes) as f64 / dt;
            p.wire = if p.wire > 0.0 {
                0.7 * p.wire + 0.3 * now
            } else {
                now
            };
            (p.since, p.bytes) = (Instant::now(), total);
        }
    }

    /// Wire bytes per second and the frames' ratio, once measured.
    pub fn rates(&self) -> Option<(f64, f64)> {
        let p = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (p.wire > 0.0).then_some((p.wire, p.ratio))
    }
}

/// Compressor speed per level (`LEVELS`, then `ALWAYS_LEVEL` if not among them), plain bytes
/// per CPU second, smoothed (bits of an f64; 0 until measured).
static SPEEDS: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// What [`speed`] says before anything was measured: the vim manuals, one core here.
const FIRST_SPEEDS: [f64; 2] = [122e6, 238e6];

fn slot(level: i32) -> usize {
    LEVELS
        .iter()
        .position(|&l| l == level)
        .unwrap_or(LEVELS.len() - 1)
}

/// The compressor's measured speed at `level`, in plain bytes per second of one core.
pub fn speed(level: i32) -> f64 {
    let k = slot(level);
    match f64::from_bits(SPEEDS[k].load(Ordering::Relaxed)) {
        s if s > 0.0 => s,
        _ => FIRST_SPEEDS[k],
    }
}

fn record_speed(level: i32, bytes: usize, secs: f64) {
    if secs <= 0.0 || bytes < 64 * 1024 {
        return;
    }
    let now = bytes as f64 / secs;
    let old = speed(level);
    // A race between two threads loses one sample: harmless for an average.
    SPEEDS[slot(level)].store((0.8 * old + 0.2 * now).to_bits(), Ordering::Relaxed);
}

/// CPU seconds this thread has used.
fn thread_cpu_secs() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill; the clock always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

thread_local! {
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Compression contexts, shared by all threads, and how many exist: at most one per core, so
/// that however many threads serve, compression holds a bounded amount of memory (a level-5
/// context for a 1 MiB chunk takes a few MiB) and uses at most the machine's cores. A piece waits
/// for a free one.
static COMPRESSORS: std::sync::Mutex<(Vec<zstd::bulk::Compressor<'static>>, usize)> =
    std::sync::Mutex::new((Vec::new(), 0));
/// Signalled when a context is given back.
static COMPRESSOR_FREE: std::sync::Condvar = std::sync::Condvar::new();

/// A free compression context (made if fewer than one per core exist), or `None` if one cannot
/// be made.
fn take_compressor(level: i32) -> Option<zstd::bulk::Compressor<'static>> {
    let cap = cores();
    // Held to push or pop one context, or while waiting for one; a poisoned lock still holds
    // whole contexts.
    let mut pool = COMPRESSORS.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(c) = pool.0.pop() {
            return Some(c);
        }
        if pool.1 < cap {
            pool.1 += 1;
            drop(pool);
            let made = zstd::bulk::Compressor::new(level).ok();
            if made.is_none() {
                COMPRESSORS.lock().unwrap_or_else(|e| e.into_inner()).1 -= 1;
            }
            return made;
        }
        pool = COMPRESSOR_FREE
            .wait(pool)
            .unwrap_or_else(|e| e.into_inner());
    }
}

fn give_back(c: zstd::bulk::Compressor<'static>) {
    COMPRESSORS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .0
        .push(c);
    COMPRESSOR_FREE.notify_one();
}

/// `data` as one zstd frame at `level`, if that is at most [`WORTH`] of its size. Blocks while
/// every compression context is in use.
pub fn compress(data: &[u8], level: i32) -> Option<Vec<u8>> {
    if data.len() < 64 {
        return None;
    }
    let mut c = take_compressor(level)?;
    let room = data.len() * WORTH.0 / WORTH.1;
    let mut out = Vec::with_capacity(room);
    let started = thread_cpu_secs();
    let done = c
        .set_compression_level(level)
        .and_then(|()| c.compress_to_buffer(data, &mut out))
        .ok();
    record_speed(level, data.len(), thread_cpu_secs() - started);
    give_back(c);
    done.filter(|&n| n <= room).map(|_| out)
}

/// Decompresses `frame`, which must hold exactly `len` plain bytes, into `out` (appended after
/// what it holds). Never makes room for more than `len` bytes, whatever the frame claims.
pub fn decompress_into(frame: &[u8], len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    let start = out.len();
    // Zeroed room for exactly `len` bytes: the decompressor writes into this slice only.
    out.resize(start + len, 0);
    let got = DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            let mut fresh = zstd::bulk::Decompressor::new()?;
            fresh.window_log_max(MAX_WINDOW_LOG)?;
            *d = Some(fresh);
        }
        match d.as_mut() {
            Some(d) => d.decompress_to_buffer(frame, &mut out[start..]),
            None => Err(io::Error::other("no decompressor")),
        }
    });
    match got {
        Ok(n) if n == len => Ok(()),
        Ok(n) => {
            out.truncate(start);
            Err(bad(format!(
                "a frame of {n} bytes where {len} were announced"
            )))
        }
        Err(e) => {
            out.truncate(start);
            Err(bad(format!(
                "a frame that does not decode into {len} bytes: {e}"
            )))
        }
    }
}

/// The plain bytes of one upload block, from its header's announced length and its frame (or
/// its raw bytes, when they are as long as announced).
pub fn decode_block(plain: u32, wire: &[u8]) -> io::Result<Vec<u8>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_owned());
    if plain == 0 || plain > MAX_BLOCK {
        return Err(bad("a block of an impossible length"));
    }
    if wire.len() > plain as usize {
        return Err(bad("a block longer than the bytes it stands for"));
    }
    if wire.len() == plain as usize {
        return Ok(wire.to_vec());
    }
    let mut out = Vec::new();
    decompress_into(wire, plain as usize, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize) -> Vec<u8> {
        let words = [
            "the ", "quick ", "peer ", "sends ", "text\n", "over ", "links ",
        ];
        let mut out = Vec::new();
        let mut x = 7u64;
        while out.len() < len {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            out.extend_from_slice(words[(x >> 60) as usize % words.len()].as_bytes());
        }
        out.truncate(len);
        out
    }

    #[test]
    fn text_shrinks_and_comes_back_random_bytes_do_not_shrink() {
        let t = text(1 << 20);
        let frame = compress(&t, 3).expect("text shrinks");
        assert!(frame.len() < t.len() / 2, "{}", frame.len());
        let mut out = vec![1, 2, 3];
        decompress_into(&frame, t.len(), &mut out).unwrap();
        assert_eq!((&out[..3], &out[3..]), (&[1u8, 2, 3][..], &t[..]));
        let mut x = 1u64;
        let random: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        assert!(compress(&random, 3).is_none());
        assert!(speed(3) > 1e6);
        let strong = compress(&t, 6).unwrap();
        assert!(strong.len() <= frame.len());
    }

    #[test]
    fn a_frame_must_hold_exactly_the_announced_bytes_and_a_bomb_is_refused() {
        // 64 MiB of zeros compress to a few KiB: announced as one chunk of 1 MiB, refused
        // without making room for more than 1 MiB.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        assert!(bomb.len() < 64 << 10);
        let mut out = Vec::new();
        let err = decompress_into(&bomb, 1 << 20, &mut out).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(out.capacity() <= 1 << 20, "{}", out.capacity());
        assert!(out.is_empty());
        // Fewer bytes than announced, and garbage.
        let short = compress(&text(1000), 3).unwrap();
        assert!(decompress_into(&short, 1001, &mut out).is_err());
        assert!(decompress_into(b"not a zstd frame at all", 10, &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn blocks_are_raw_when_as_long_as_announced_and_frames_otherwise() {
        let t = text(100_000);
        assert_eq!(decode_block(5, b"hello").unwrap(), b"hello");
        let frame = compress(&t, 3).unwrap();
        assert_eq!(decode_block(100_000, &frame).unwrap(), t);
        assert!(decode_block(4, b"hello").is_err(), "longer than announced");
        assert!(decode_block(0, b"").is_err());
        assert!(decode_block(MAX_BLOCK + 1, b"x").is_err());
        assert!(decode_block(100_001, &frame).is_err());
    }

    #[test]
    fn auto_compresses_harder_the_slower_the_link_and_not_on_a_fast_one() {
        // A pace whose connection put `wire_rate` bytes per second on the wire, over one
        // sample, with frames that shrank to 30%.
        let pace = |wire_rate: f64| {
            let p = Pace::default();
            p.on_wire(1);
            p.sent(10, 3);
            std::thread::sleep(PACE_SAMPLE);
            p.on_wire(1 + (PACE_SAMPLE.as_secs_f64() * wire_rate) as u64);
            p
        };
        let unmeasured = Pace::default();
        assert_eq!(Mode::Auto.level(&unmeasured), None, "plain until measured");
        assert_eq!(Mode::Always.level(&unmeasured), Some(ALWAYS_LEVEL));
        assert_eq!(Mode::Never.level(&pace(1e5)), None);
        let slow_link = pace(1e6);
        let slow = Mode::Auto
            .level_given(&slow_link, || true)
            .expect("a slow link compresses");
        // A machine without idle cores keeps to the lighter level.
        assert_eq!(
            Mode::Auto.level_given(&slow_link, || false),
            Some(ALWAYS_LEVEL)
        );
        let loopback = pace(2e9);
        let fast = Mode::Auto.level(&loopback);
        assert_eq!(fast, None, "loopback goes plain");
        // The pieces of an edit compress until the pace is measured, then as any other.
        assert_eq!(Mode::Auto.edit_level(&unmeasured), Some(ALWAYS_LEVEL));
        assert_eq!(Mode::Never.edit_level(&unmeasured), None);
        assert_eq!(Mode::Auto.edit_level(&loopback), None);
        assert!(LEVELS.contains(&slow));
        assert_eq!(slow, LEVELS[0], "the strongest level on a slow link");
    }
}
