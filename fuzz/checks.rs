//! Properties the fuzz targets check, shared with `tests/fuzz_corpus.rs`, which replays the
//! committed corpus through them in every `cargo test`. Each returns normally or panics.

use qnode::model::manifest::{FileName, FilePath};
use qnode::model::peers::PeerTable;
use qnode::wire::protocol::{Request, Response, decode, encode_frame};

/// Any bytes: decoding a request never panics; what decodes re-encodes to an equal request.
pub(crate) fn request(data: &[u8]) {
    if let Ok(req) = decode::<Request>(data) {
        let frame = encode_frame(&req).expect("a decoded request encodes");
        assert_eq!(decode::<Request>(&frame[4..]).expect("re-decodes"), req);
    }
}

/// Any bytes: decoding a response header never panics; a decoded manifest is self-consistent.
pub(crate) fn response(data: &[u8]) {
    if let Ok(resp) = decode::<Response>(data) {
        if let Response::Manifest(m) = &resp {
            let total: u64 = (0..m.chunk_count())
                .map(|i| m.chunk_len(i).unwrap_or(0))
                .sum();
            assert_eq!(total, m.size());
        }
        let frame = encode_frame(&resp).expect("a decoded response encodes");
        assert_eq!(decode::<Response>(&frame[4..]).expect("re-decodes"), resp);
    }
}

/// Any text: the settings parser never panics; what it accepts has unique IDs and real ports.
pub(crate) fn settings(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(table) = PeerTable::parse(text) {
        let mut ids: Vec<_> = table.entries().iter().map(|e| e.id.clone()).collect();
        let n = ids.len();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), n, "duplicate IDs accepted");
        assert!(
            table
                .entries()
                .iter()
                .all(|e| e.addr.is_none_or(|a| a.port() != 0))
        );
    }
}

/// Any text: an accepted name is one normal path component that stays inside its folder, and an
/// accepted path is normal components only.
pub(crate) fn name(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(name) = FileName::new(text) {
        let s = name.as_str();
        assert!(!s.is_empty() && s.len() <= 255);
        assert!(!s.starts_with('.') && !s.contains(['/', '\\', '\0']));
        let mut parts = std::path::Path::new(s).components();
        assert!(matches!(
            parts.next(),
            Some(std::path::Component::Normal(_))
        ));
        assert!(parts.next().is_none());
        assert_eq!(
            std::path::Path::new("/base").join(s).parent(),
            Some(std::path::Path::new("/base"))
        );
    }
    // An accepted path: normal components only, so it stays beneath its root.
    if let Ok(path) = FilePath::new(text) {
        let s = path.as_str();
        assert!(s.len() <= 1024 && path.components().count() <= 32);
        let joined = std::path::Path::new("/base").join(s);
        assert!(joined.starts_with("/base"));
        assert!(
            std::path::Path::new(s)
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)))
        );
    }
}

/// Any bytes as a compressed block of an upload body (`[plain len: u32 BE][frame]`, the length
/// capped at 1 MiB): decoding never panics and never yields other than the announced length;
/// what compresses decodes back to itself.
pub(crate) fn block(data: &[u8]) {
    use qnode::wire::codec;
    if data.len() < 4 {
        return;
    }
    let plain = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) % (codec::MAX_BLOCK + 1);
    let frame = &data[4..];
    if let Ok(out) = codec::decode_block(plain, frame) {
        assert_eq!(out.len(), plain as usize);
    }
    if let Some(packed) = codec::compress(frame, 3) {
        let back = codec::decode_block(frame.len() as u32, &packed).expect("our frame decodes");
        assert_eq!(back, frame);
    }
}
