//! Text for the tests and benchmarks of edits: words and lines, not random bytes (the edits
//! benchmark includes this file).

/// Text-like bytes: words and lines, not random bytes.
pub fn text(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "the", "peer", "sends", "a", "chunk", "of", "verified", "text", "over", "quic", "and",
        "every", "byte", "is", "checked", "before", "it", "lands", "on", "disk", "while", "edits",
        "travel", "between", "nodes", "in", "small", "pieces", "only", "what", "changed", "moves",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    let mut col = 0;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let w = words[(x % words.len() as u64) as usize].as_bytes();
        out.extend_from_slice(w);
        col += w.len() + 1;
        if col > 60 + (x >> 40) as usize % 20 {
            out.push(b'\n');
            col = 0;
        } else {
            out.push(b' ');
        }
    }
    out.truncate(len);
    out
}
