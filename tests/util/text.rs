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

/// Prose-like bytes for compression: a vocabulary of 20,000 made-up words drawn with Zipf's
/// law (a few words very often, most rarely, as in English), capitals, commas, full stops and
/// lines of about 72 characters. zstd -1 shrinks it about 2.6×, a little less than English
/// prose (the vim manual: 3.1×), so it flatters no compressor.
pub fn prose(len: usize, seed: u64) -> Vec<u8> {
    const SYLLABLES: [&str; 40] = [
        "ka", "to", "ri", "en", "the", "an", "mo", "sa", "li", "ver", "con", "pre", "ing", "ed",
        "er", "st", "qu", "is", "ou", "al", "re", "de", "in", "ti", "on", "at", "es", "or", "te",
        "ar", "ne", "se", "ma", "co", "ro", "ha", "le", "nd", "ll", "th",
    ];
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let vocab: Vec<Vec<u8>> = (0..20_000)
        .map(|_| {
            let n = 1 + (next() % 100).min(99) as usize / 30 + usize::from(next() % 4 == 0);
            (0..n.min(5))
                .flat_map(|_| SYLLABLES[(next() % 40) as usize].bytes())
                .collect()
        })
        .collect();
    // Zipf's law with exponent 1.05: cumulative weights, then a binary search per word.
    let mut cum = Vec::with_capacity(vocab.len());
    let mut total = 0.0;
    for i in 0..vocab.len() {
        total += 1.0 / ((i + 1) as f64).powf(1.05);
        cum.push(total);
    }
    let mut out = Vec::with_capacity(len + 64);
    let mut col = 0;
    while out.len() < len {
        let r = (next() >> 11) as f64 / (1u64 << 53) as f64 * total;
        let word = &vocab[cum.partition_point(|&c| c < r).min(vocab.len() - 1)];
        let start = out.len();
        out.extend_from_slice(word);
        if next() % 100 < 8 {
            out[start] = out[start].to_ascii_uppercase();
        }
        let sep: &[u8] = match next() % 100 {
            0..6 => b". ",
            6..10 => b", ",
            _ => b" ",
        };
        col += word.len() + sep.len();
        if col > 72 {
            out.push(b'\n');
            col = 0;
        } else {
            out.extend_from_slice(sep);
        }
    }
    out.truncate(len);
    out
}
